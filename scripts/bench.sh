#!/usr/bin/env bash
# The ax benchmark, in one command:
#
#   sudo bash scripts/bench.sh           # full run (5 rounds, 2 GiB bulk, …), under 15 min on 2 cores
#   sudo bash scripts/bench.sh --quick   # smaller run, under 3 min
#
# Measures ax local against native TCP loopback, AF_UNIX, a veth pair, a
# Linux bridge, slirp4netns and pasta, plus ax's overheads and scale checks,
# and writes benches/results/latest.{md,svg,json} (the table is printed too).
#
# What it does:
#   1. installs what is missing, with apt-get, only if missing: slirp4netns,
#      passt (pasta), iproute2, python3, util-linux (unshare, taskset), and
#      what building ax needs (libseccomp-dev, pkg-config);
#   2. builds `ax` and `ax-bench` in release mode;
#   3. runs `ax-bench run` inside a new network namespace with only loopback
#      (`unshare --net` + `ip link set lo up`): nothing it does can reach
#      another machine. The namespaces it makes for the veth, bridge and
#      rootless rows are removed when it ends, also on Ctrl-C.
#
# Without root, run the rows that need none:
#   cargo build --release -p ax -p ax-bench && target/release/ax-bench run --unprivileged
#
# Other options are passed to `ax-bench run` (see `ax-bench run --help`),
# e.g. --rounds 3, --only ax,tcp,unix, --no-scale.
#
# Real programs (benches/programs/run.sh): Go net/http with and without
# keep-alive, nginx with `ab` and redis with `redis-benchmark` without
# keep-alive, and PostgreSQL with `pgbench -S` with and without a
# connection per transaction, under ax vs
# native in the same run, with the daemon's CPU per connection and per
# trapped call. They run after the rows above, into
# benches/results/programs.md; a row whose program (go, nginx, ab, redis,
# postgres, pgbench) is missing is skipped, and so are the PostgreSQL rows without the
# unprivileged user axtest (postgres refuses to run as root).
#
#   sudo bash scripts/bench.sh --programs      # only the real-program rows
#   sudo bash scripts/bench.sh --no-programs   # everything else
#   PROGRAMS_N=10000 PROGRAMS_ROUNDS=3          # requests per row and rounds
#   PROGRAMS_PG_SECONDS=5                       # seconds per pgbench run
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

args=()
programs=1
only_programs=0
for a in "$@"; do
    case "$a" in
        --programs) only_programs=1 ;;
        --no-programs) programs=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) args+=("$a") ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "bench.sh: needs root to make network namespaces. Run: sudo bash scripts/bench.sh ${args[*]:-}" >&2
    echo "  (without root: cargo build --release -p ax -p ax-bench && target/release/ax-bench run --unprivileged)" >&2
    exit 1
fi

# --- 1. packages, only when missing ----------------------------------------
# package:check pairs; a package is installed only when its check fails
# (a command on PATH, or for libraries the dpkg status).
need=(slirp4netns:slirp4netns passt:pasta iproute2:ip python3:python3
    util-linux:unshare util-linux:taskset
    libseccomp-dev:dpkg pkg-config:pkg-config)
if [ "$programs" = 1 ] || [ "$only_programs" = 1 ]; then
    # pgbench comes with the server (postgresql-NN), not postgresql-client.
    need+=(golang-go:go nginx-light:nginx apache2-utils:ab
        redis-server:redis-server redis-tools:redis-benchmark
        postgresql:dpkg postgresql-contrib:dpkg)
fi
have() {
    if [ "$2" = dpkg ]; then
        dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
    else
        command -v "$2" >/dev/null 2>&1
    fi
}
missing=()
for pc in "${need[@]}"; do
    pkg="${pc%%:*}" chk="${pc#*:}"
    if ! have "$pkg" "$chk"; then
        case " ${missing[*]:-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
    fi
done
if ((${#missing[@]} > 0)); then
    if command -v apt-get >/dev/null 2>&1; then
        echo "bench.sh: installing ${missing[*]}" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } ||
            echo "bench.sh: warning: could not install ${missing[*]}; their rows will say 'not available'" >&2
    else
        echo "bench.sh: warning: no apt-get; missing ${missing[*]}; their rows will say 'not available'" >&2
    fi
fi
for cmd in ip unshare; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "bench.sh: '$cmd' is required" >&2; exit 1; }
done

# --- 2. build -----------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    for d in "${CARGO_HOME:-}/bin" "$HOME/.cargo/bin" /root/.cargo/bin; do
        [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
    done
fi
cargo build --release -p ax -p ax-bench
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BENCH="$TARGET/release/ax-bench"
AX="$TARGET/release/ax"

# --- 3. run, in a network namespace with loopback only ------------------------
OUT="$ROOT/benches/results"
mkdir -p "$OUT"
PROG=(true)
if [ "$only_programs" = 1 ] || [ "$programs" = 1 ]; then
    PROG=(bash "$ROOT/benches/programs/run.sh" "$AX" "$OUT/programs.md")
fi
if [ "$only_programs" = 1 ]; then
    # shellcheck disable=SC2016
    exec unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh "${PROG[@]}"
fi
BENCHCMD=("$BENCH" run --ax "$AX"
    --out-md "$OUT/latest.md" --out-svg "$OUT/latest.svg" --out-json "$OUT/latest.json"
    "${args[@]}")
# Both commands in one loopback-only namespace: the first N words are ax-bench's.
# shellcheck disable=SC2016
exec unshare --net -- bash -c 'ip link set lo up || exit 1; n=$1; shift
    "${@:1:n}"; rc=$?; "${@:n+1}" || rc=1; exit $rc' bash "${#BENCHCMD[@]}" "${BENCHCMD[@]}" "${PROG[@]}"
