#!/usr/bin/env bash
# Two ax daemons, alternated in one run: the connection rate and the daemon
# CPU per connection of each, for telling what a change to the broker
# costs or saves on a machine whose speed drifts between runs.
#
#   sudo bash benches/ab.sh OLD_AX NEW_AX [ROUNDS] [CONNECTIONS]
#
# OLD_AX and NEW_AX are two `ax` binaries (e.g. a copy of
# target/release/ax built before the change, and the one after). Each
# daemon serves its own `ax-bench serve` under `ax exec --ip 10.233.0.10`;
# every round runs `ax-bench client --mode connrate` against each daemon
# in turn (the order flips every round), and reads the daemon's CPU from
# /proc/PID/stat (10 ms ticks). Everything runs in a network namespace of
# its own with loopback only. Prints one line per round and the medians.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
OLD=$(realpath "$1") NEW=$(realpath "$2") ROUNDS=${3:-9} N=${4:-20000}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="${AX_BENCH:-$ROOT/target/release/ax-bench}"
for b in "$OLD" "$NEW" "$BENCH"; do
    [ -x "$b" ] || { echo "ab.sh: $b: not an executable (cargo build --release -p ax -p ax-bench)" >&2; exit 1; }
done

if [ "${AB_IN_NETNS:-}" != 1 ]; then
    [ "$(id -u)" -eq 0 ] || { echo "ab.sh: needs root for its network namespace" >&2; exit 1; }
    # shellcheck disable=SC2016
    exec unshare --net -- env AB_IN_NETNS=1 AX_BENCH="$BENCH" bash -c \
        'ip link set lo up && exec bash "$0" "$@"' "$0" "$OLD" "$NEW" "$ROUNDS" "$N"
fi

T=$(mktemp -d /tmp/ax-ab.XXXXXX)
apps=() daemons=()
# The servers first: a daemon stopped while its apps run leaves its fd
# keeper waiting for a successor.
stop() {
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
cleanup() {
    stop "${apps[@]}"
    stop "${daemons[@]}"
    rm -rf "$T"
}
trap cleanup EXIT

# One daemon and its server per binary; the socket in a directory of its
# own, as `ax exec` hides the socket's directory from the program.
start() {
    local tag=$1 ax=$2
    mkdir -p "$T/$tag/ctl"
    "$ax" daemon --socket "$T/$tag/ctl/ax.sock" 2>"$T/$tag/daemon.log" &
    daemons+=($!)
    echo $! >"$T/$tag/pid"
    for _ in $(seq 200); do
        "$ax" get services --socket "$T/$tag/ctl/ax.sock" >/dev/null 2>&1 && break
        sleep 0.05
    done
    "$ax" exec --socket "$T/$tag/ctl/ax.sock" --no-autostart --ip 10.233.0.10 -- \
        "$BENCH" serve --bind 0.0.0.0:5201 >"$T/$tag/server.out" 2>&1 &
    apps+=($!)
    for _ in $(seq 200); do
        grep -q READY "$T/$tag/server.out" && return 0
        sleep 0.05
    done
    echo "ab.sh: the $tag server did not start: $(cat "$T/$tag/server.out" "$T/$tag/daemon.log")" >&2
    exit 1
}
start old "$OLD"
start new "$NEW"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Prints "CONNECTIONS_PER_S DAEMON_US_PER_CONNECTION".
one() {
    local tag=$1 ax=$2 pid c0 c1 rate
    pid=$(cat "$T/$tag/pid")
    c0=$(ticks "$pid")
    rate=$("$ax" exec --socket "$T/$tag/ctl/ax.sock" --no-autostart -- \
        "$BENCH" client --connect 10.233.0.10:5201 --mode connrate --iterations "$N" |
        sed -n 's/.*"conn_per_s":\([0-9.]*\).*/\1/p')
    c1=$(ticks "$pid")
    awk -v r="$rate" -v d=$((c1 - c0)) -v n="$N" 'BEGIN { printf "%.0f %.1f\n", r, d * 10000 / n }'
}

echo "round  old conn/s  old µs/conn  new conn/s  new µs/conn"
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        o=$(one old "$OLD"); n=$(one new "$NEW")
    else
        n=$(one new "$NEW"); o=$(one old "$OLD")
    fi
    echo "$r $o $n" | tee -a "$T/rounds" | awk '{ printf "%5d  %10s  %11s  %10s  %11s\n", $1, $2, $3, $4, $5 }'
done
sort -n -k2 "$T/rounds" | awk '{ a[NR] = $2 } END { printf "median old conn/s %s", a[int((NR + 1) / 2)] }'
sort -n -k3 "$T/rounds" | awk '{ a[NR] = $3 } END { printf ", µs/conn %s", a[int((NR + 1) / 2)] }'
sort -n -k4 "$T/rounds" | awk '{ a[NR] = $4 } END { printf "; new conn/s %s", a[int((NR + 1) / 2)] }'
sort -n -k5 "$T/rounds" | awk '{ a[NR] = $5 } END { printf ", µs/conn %s\n", a[int((NR + 1) / 2)] }'
