#!/usr/bin/env bash
# Runs all of ax's tests on a Debian/Ubuntu machine with Rust:
#
#   1. installs missing system packages (scripts/install-deps.sh),
#   2. builds the workspace and every test target,
#   3. runs the unit and crate tests, in a namespace with loopback only,
#   4. runs the end-to-end suite (every test binary of crate ax-e2e: e2e,
#      hostile, …) twice, each binary inside a fresh network namespace with
#      loopback only and no default route: once as root and once as the
#      unprivileged user `axtest`.
#
# A VIP is on no interface: if interception ever failed, a connect to it
# ends in ENETUNREACH inside the namespace and nothing leaves the machine.
#
# Ends with one line `N passed, N failed` (unit tests plus both end-to-end
# runs) and exits non-zero if anything failed.
#
# Environment: AX_E2E_THREADS (default 4) test threads per e2e run;
# AX_E2E_TIMEOUT (default 15m) limit per e2e test binary and run;
# AX_UNIT_TIMEOUT (default 10m) limit for the unit tests; extra
# arguments are passed to every e2e test binary (e.g. a test name filter).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
E2E_USER=axtest
THREADS=${AX_E2E_THREADS:-4}
LIMIT=${AX_E2E_TIMEOUT:-15m}
UNIT_LIMIT=${AX_UNIT_TIMEOUT:-10m}
E2E_ARGS=("$@")

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        echo "test.sh: the end-to-end runs need root (network namespaces, a second user)." >&2
        echo "test.sh: run as root, or with password-less sudo." >&2
    fi
    SUDO=(sudo)
fi

WORK=$(mktemp -d /tmp/ax-test.XXXXXX)
chmod 755 "$WORK"
RUN_PID=""
TAIL_PID=""

cleanup() {
    if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
        echo "test.sh: stopping the running e2e run (pid $RUN_PID)" >&2
        kill -TERM "$RUN_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$RUN_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$RUN_PID" 2>/dev/null || true
    fi
    if [ -n "$TAIL_PID" ]; then
        kill "$TAIL_PID" 2>/dev/null || true
    fi
    "${SUDO[@]}" rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

section() { printf '\n==== %s ====\n' "$*"; }

section "system packages"
bash "$ROOT/scripts/install-deps.sh"

section "build"
cargo build --workspace --all-targets
cargo test --workspace --no-run

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
AX_BIN="$TARGET_DIR/debug/ax"
# Every test binary of crate ax-e2e (tests/tests/*.rs), as "NAME PATH" lines.
E2E_LIST=$(cargo test -p ax-e2e --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
exes = {}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if (m.get("reason") == "compiler-artifact" and t.get("kind") == ["test"]
            and "ax-e2e" in m.get("package_id", "") and m.get("executable")):
        exes[t["name"]] = m["executable"]
if "e2e" not in exes:
    sys.exit("cannot find the e2e test binary in cargo output")
for name in sorted(exes):
    print(name, exes[name])
')
E2E_NAMES=()
E2E_BINS=()
while read -r name exe; do
    E2E_NAMES+=("$name")
    E2E_BINS+=("$exe")
done <<<"$E2E_LIST"
[ -x "$AX_BIN" ] || { echo "test.sh: $AX_BIN was not built" >&2; exit 1; }
for exe in "${E2E_BINS[@]}"; do
    [ -x "$exe" ] || { echo "test.sh: $exe was not built" >&2; exit 1; }
done
echo "ax binary:      $AX_BIN"
echo "e2e test binaries:"
printf '  %s\n' "${E2E_BINS[@]}"

# Sums the `test result:` lines of a cargo/libtest log: prints "PASSED FAILED".
# A log without any result line (crash, timeout) counts one failure.
tally() {
    python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
res = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)
if not res:
    print(0, 1)
else:
    print(sum(int(p) for p, _ in res), sum(int(f) for _, f in res))
PY
}

TOTAL_PASSED=0
TOTAL_FAILED=0
SUMMARY=()
STATUS=0

account() { # label log rc
    local passed failed
    read -r passed failed < <(tally "$2")
    if [ "$3" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed=1 # the runner failed without reporting a failed test
    fi
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    SUMMARY+=("$(printf '%-30s %s passed, %s failed (exit %s)' "$1:" "$passed" "$failed" "$3")")
    if [ "$3" -ne 0 ]; then
        STATUS=1
    fi
}

section "unit tests"
set +e
# Some of these (the embedded broker, the CLI) run real programs that
# connect to VIPs: they too run in a namespace with loopback only.
# A hang is a failure within UNIT_LIMIT, never a stalled CI run.
"${SUDO[@]}" timeout --kill-after=30s "$UNIT_LIMIT" \
    unshare --net -- bash -c 'ip link set lo up && exec "$@"' sh \
    cargo test --offline --workspace --exclude ax-e2e 2>&1 | tee "$WORK/unit.log"
rc=${PIPESTATUS[0]}
set -e
account "unit tests" "$WORK/unit.log" "$rc"

section "fuzz"
# A bounded run of each cargo-fuzz target (fuzz/), AX_FUZZ_SECONDS each;
# one test per target in the tally (scripts/fuzz.sh).
set +e
bash "$ROOT/scripts/fuzz.sh" 2>&1 | tee "$WORK/fuzz.log"
rc=${PIPESTATUS[0]}
set -e
account "fuzz" "$WORK/fuzz.log" "$rc"

section "end-to-end set-up"
# A second unprivileged user, for the tests that check that one user cannot
# use another's daemon (tests/tests/faults.rs).
for u in "$E2E_USER" axtest2; do
    if ! id "$u" >/dev/null 2>&1; then
        echo "creating user $u"
        "${SUDO[@]}" useradd --system --no-create-home --shell /usr/sbin/nologin "$u"
    fi
done
# Rootless containers (tests/tests/oci*.rs) map subordinate ids: give the
# unprivileged user a range when it has none.
for f in /etc/subuid /etc/subgid; do
    if ! grep -q "^$E2E_USER:" "$f" 2>/dev/null; then
        echo "giving $E2E_USER subordinate ids in $f"
        "${SUDO[@]}" usermod --add-subuids 200000-265535 --add-subgids 200000-265535 "$E2E_USER" || true
        break
    fi
done
# The unprivileged user must be able to reach and run every binary; when a
# parent directory (e.g. /root) is not traversable, run copies instead.
if ! "${SUDO[@]}" setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
    sh -c 'for f; do test -x "$f" && test -r "$f" || exit 1; done' sh "$AX_BIN" "${E2E_BINS[@]}"; then
    echo "$E2E_USER cannot run binaries in $TARGET_DIR; using copies in $WORK/bin"
    mkdir -p "$WORK/bin"
    chmod 755 "$WORK/bin"
    install -m 755 "$AX_BIN" "$WORK/bin/ax"
    AX_BIN="$WORK/bin/ax"
    for i in "${!E2E_BINS[@]}"; do
        install -m 755 "${E2E_BINS[$i]}" "$WORK/bin/${E2E_NAMES[$i]}"
        E2E_BINS[i]="$WORK/bin/${E2E_NAMES[$i]}"
    done
fi

# The unprivileged run gets the PATH entries that user can search (root's
# PATH often starts with directories under /root, where a lookup would fail
# with EACCES instead of "not found").
USER_PATH=$("${SUDO[@]}" setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
    sh -c 'out=; IFS=:; for d in $1; do [ -d "$d" ] && [ -x "$d" ] && out="${out:+$out:}$d"; done; echo "$out"' \
    sh "$PATH")
echo "PATH for $E2E_USER: $USER_PATH"

# Runs inside the new network namespace, as root: brings up lo, checks the
# namespace is isolated, runs the e2e binary (as $1 if given), and on the way
# out kills every process left in this namespace, by pid.
INNER='
set -euo pipefail
run_as=$1; shift
netns=$(readlink /proc/$$/ns/net)
cleanup() {
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [ "$pid" = "$$" ] && continue
        [ "$(readlink "$d/ns/net" 2>/dev/null)" = "$netns" ] || continue
        [ "$(readlink "$d/exe" 2>/dev/null)" = "" ] && continue
        echo "netns cleanup: killing leftover pid $pid: $(tr "\0\n" "  " <"$d/cmdline" 2>/dev/null | cut -c1-160)" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap "exit 143" TERM INT HUP
ip link set lo up
if [ -n "$(ip route show default)" ] || [ -n "$(ip -6 route show default)" ]; then
    echo "FATAL: the test network namespace has a default route:" >&2
    ip route show >&2; ip -6 route show >&2
    exit 99
fi
if [ -n "$(ip route show table main)" ]; then
    echo "FATAL: the test network namespace has IPv4 routes:" >&2
    ip route show table main >&2
    exit 99
fi
if ip -o link show | grep -v ": lo:" | grep -q .; then
    echo "FATAL: the test network namespace has interfaces besides lo:" >&2
    ip -o link show >&2
    exit 99
fi
echo "network namespace $netns: lo only, no default route"
cd /tmp
if [ -n "$run_as" ]; then
    setpriv --reuid="$run_as" --regid="$run_as" --init-groups -- \
        env HOME=/tmp PATH="$AX_E2E_USER_PATH" "$@"
else
    "$@"
fi
'

run_e2e() { # label user name binary
    local label=$1 user=$2 name=$3 bin=$4 log="$WORK/e2e-$1-$3.log" rc
    section "end-to-end tests ($name), $label"
    : >"$log"
    chmod 644 "$log"
    # The tests' temporary files go here, and are removed with $WORK even
    # if a run is killed.
    mkdir -p "$WORK/tmp-$label"
    chmod 1777 "$WORK/tmp-$label"
    set +e
    "${SUDO[@]}" env -u XDG_RUNTIME_DIR -u AX_SOCKET \
        AX_BIN="$AX_BIN" AX_E2E_STRICT=1 RUST_BACKTRACE=1 AX_E2E_USER_PATH="$USER_PATH" \
        TMPDIR="$WORK/tmp-$label" \
        timeout --kill-after=30s "$LIMIT" \
        unshare --net -- bash -c "$INNER" inner "$user" \
        "$bin" --test-threads="$THREADS" "${E2E_ARGS[@]}" >"$log" 2>&1 &
    RUN_PID=$!
    tail -n +1 --pid="$RUN_PID" -f "$log" &
    TAIL_PID=$!
    wait "$RUN_PID"
    rc=$?
    RUN_PID=""
    wait "$TAIL_PID" 2>/dev/null
    TAIL_PID=""
    set -e
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "test.sh: the e2e run ($name) as $label timed out after $LIMIT" | tee -a "$log"
    fi
    account "e2e ($name) as $label" "$log" "$rc"
}

for user in "" "$E2E_USER"; do
    for i in "${!E2E_BINS[@]}"; do
        run_e2e "${user:-root}" "$user" "${E2E_NAMES[$i]}" "${E2E_BINS[$i]}"
    done
done

section "summary"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
if [ "$TOTAL_FAILED" -ne 0 ]; then
    STATUS=1
fi
exit "$STATUS"
