#!/usr/bin/env bash
# ax in one minute: builds ax, starts a private daemon, serves a directory with
# `python3 -m http.server` on the virtual IP 10.233.0.10 and fetches it with
# curl, both under `ax exec`; then shows what the kernel sees (two AF_UNIX
# sockets in ax's private network namespace, no TCP) and what `ax get`
# lists. Everything it starts is stopped.
#
# As root (or where unprivileged user namespaces are allowed) the demo runs in
# a private network namespace with loopback only, so VIP traffic can never
# leave the machine even if something were wrong.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

bash "$ROOT/scripts/install-deps.sh"
cargo build --release -p ax
AX="$ROOT/target/release/ax"
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    AX="$CARGO_TARGET_DIR/release/ax"
fi

WORK=$(mktemp -d /tmp/ax-quickstart.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

DEMO='
set -euo pipefail
AX=$1 WORK=$2 ISOLATED=$3
# The control socket gets a directory of its own: programs under ax see that
# directory as empty.
SOCK="$WORK/run/ax.sock"
pids=()
# Each background job runs in its own process group (setsid), so that the
# program under `ax exec` is stopped together with its launcher.
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${pids[@]}"; do
        kill -KILL -- "-$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap "exit 130" INT TERM
if [ "$ISOLATED" = 1 ]; then
    ip link set lo up
    echo "# in a private network namespace: lo only, no default route"
fi
say() { printf "\n\$ %s\n" "$*"; }

setsid "$AX" daemon --socket "$SOCK" >"$WORK/daemon.log" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 10))
until "$AX" get services --socket "$SOCK" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "the daemon did not start:"; cat "$WORK/daemon.log"; exit 1; fi
    sleep 0.1
done

mkdir -p "$WORK/www"
echo "Hello from a server that thinks it listens on 10.233.0.10:8000" >"$WORK/www/index.html"
say "ax exec --ip 10.233.0.10 --name web -- python3 -m http.server 8000 &"
setsid "$AX" exec --socket "$SOCK" --no-autostart --ip 10.233.0.10 --name web -- \
    python3 -m http.server 8000 --directory "$WORK/www" >"$WORK/server.log" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 15))
until "$AX" get services -o json --socket "$SOCK" 2>/dev/null | grep -q "10.233.0.10:8000"; do
    if ((SECONDS > deadline)); then echo "the server did not start:"; cat "$WORK/server.log"; exit 1; fi
    sleep 0.1
done

say "ax exec -- curl -s http://10.233.0.10:8000/"
page=$("$AX" exec --socket "$SOCK" --no-autostart -- curl -s --max-time 10 http://10.233.0.10:8000/)
echo "$page"
case "$page" in *"Hello from a server"*) ;; *) echo "quickstart: unexpected answer from http://10.233.0.10:8000/" >&2; exit 1 ;; esac
say "ax exec -- curl -s http://web:8000/   # by name"
page=$("$AX" exec --socket "$SOCK" --no-autostart -- curl -s --max-time 10 http://web:8000/)
echo "$page"
case "$page" in *"Hello from a server"*) ;; *) echo "quickstart: unexpected answer from http://web:8000/" >&2; exit 1 ;; esac

# Hold one connection open to look at it.
setsid "$AX" exec --socket "$SOCK" --no-autostart -- python3 -c "
import socket, sys, time
s = socket.create_connection((\"10.233.0.10\", 8000))
print(\"client sees itself as\", s.getsockname(), \"and its peer as\", s.getpeername(), flush=True)
time.sleep(4)
" &
pids+=($!)
sleep 1.5
# The UNIX sockets of ax live in a private network namespace that only its
# socket factory (a child of the daemon named ax-sockets) is in.
factory=$(pgrep -P "${pids[0]}" -x ax-sockets | head -n 1)
say "nsenter -t \$(pgrep -x ax-sockets) -n ss -xp   # the connection, as the kernel sees it: AF_UNIX on both ends"
nsenter -t "$factory" -n ss -xp | sed -n "1p;/@ax\//p"
say "ss -xp | grep -c @ax/   # none of them is visible to anyone else"
ss -xp | grep -c "@ax/" || true
say "ss -tnp  # no TCP socket"
ss -tnp
say "ax get apps"
"$AX" get apps --socket "$SOCK"
say "ax get services"
"$AX" get services --socket "$SOCK"
say "ax get services -o json"
"$AX" get services -o json --socket "$SOCK"
echo
'

if [ "$(id -u)" -eq 0 ]; then
    unshare --net -- bash -c "$DEMO" demo "$AX" "$WORK" 1
elif unshare --user --map-root-user --net -- true 2>/dev/null; then
    unshare --user --map-root-user --net -- bash -c "$DEMO" demo "$AX" "$WORK" 1
else
    echo "# (no network namespace available: running in the host's network)"
    bash -c "$DEMO" demo "$AX" "$WORK" 0
fi
