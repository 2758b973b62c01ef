#!/usr/bin/env bash
# Real-program rows of the ax benchmark: Go net/http with and without
# keep-alive, nginx with `ab` without keep-alive, redis with
# `redis-benchmark` without keep-alive, PostgreSQL with `pgbench -S`
# with and without a connection per transaction (-C), each under ax vs native
# in the same run, plus the daemon's CPU per connection and per trapped call
# that needs no target memory. The Go, nginx and redis rows without keep-alive also
# run natively under `ax-bench null-supervisor` (ax's filter, every trapped
# call answered CONTINUE: what trapping alone costs), and Go over native
# AF_UNIX, for the ceiling any broker behind this filter could reach. Run by
# scripts/bench.sh (alone with `sudo bash scripts/bench.sh --programs`),
# inside a network namespace with loopback only; it refuses to run anywhere
# else.
#
#   run.sh AX OUT_MD     (env: PROGRAMS_N requests per row, default 10000;
#                         PROGRAMS_ROUNDS rounds, default 3; PROGRAMS_CONC, default 50;
#                         PROGRAMS_PG_SECONDS seconds per pgbench run, default 5;
#                         PROGRAMS_ONLY: a comma-separated subset of
#                         go,nginx,redis,pg,percall,floor,metrics, default all)
#
# The "pg" rows run postgres (initdb and the server, natively on
# 127.0.0.1:5433 and under ax on 10.233.7.15:5432), pgbench and an ax daemon
# of their own as the unprivileged user axtest (postgres refuses to run as
# root; scripts/test.sh creates the user); the daemon CPU of those rows is
# that daemon's. Without the user (when run as root) they are skipped.
#
# The "metrics" row is the cost of counting (`ax daemon --metrics`): the
# connection rate of `ax-bench client --mode connrate` (next to AX) through
# a daemon with --metrics and one without, alternately in each round.
# A row whose program is missing (go, nginx, ab, redis-server,
# redis-benchmark, postgres, pgbench) says so
# and is skipped.
set -euo pipefail
AX="$1"
OUT="$2"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
N="${PROGRAMS_N:-10000}"
ROUNDS="${PROGRAMS_ROUNDS:-3}"
CONC="${PROGRAMS_CONC:-50}"
PG_SECS="${PROGRAMS_PG_SECONDS:-5}"
ONLY="${PROGRAMS_ONLY:-go,nginx,redis,pg,percall,floor,metrics}"
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if ip -o route show default 2>/dev/null | grep -q . || [ "$(ip -o link show | grep -vc ' lo:')" -ne 0 ]; then
    echo "programs: not in a loopback-only network namespace; refusing to run" >&2
    exit 1
fi

TMP="$(mktemp -d /tmp/ax-bench-programs.XXXXXX)"
PIDS=()
PGPIDS=() # postgres servers: SIGINT first (fast shutdown), then as the others
cleanup() {
    for p in "${PGPIDS[@]:-}"; do [ -z "$p" ] || kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

SOCKDIR="$TMP/ctl"
mkdir -p "$SOCKDIR"
SOCK="$SOCKDIR/ax.sock"
"$AX" daemon --socket "$SOCK" 2>"$TMP/daemon.log" &
DAEMON=$!
PIDS+=("$DAEMON")
for _ in $(seq 200); do
    "$AX" get services --socket "$SOCK" >/dev/null 2>&1 && break
    sleep 0.05
done
AXX=("$AX" exec --socket "$SOCK" --no-autostart)
CLK=$(getconf CLK_TCK)

# CPU of process $1 (utime+stime of the whole process, in clock ticks), and
# of the daemon.
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
dcpu() { cpu_of "$DAEMON"; }
# Microseconds of CPU per unit: the ticks from $1 to $2, over $3 units.
us_per() { awk -v d=$(($2 - $1)) -v k="$CLK" -v n="$3" 'BEGIN {printf "%.1f", d / k * 1e6 / n}'; }

# Waits until a line READY appears in file $1 (the server's stdout).
wait_ready() {
    for _ in $(seq 400); do
        grep -q READY "$1" 2>/dev/null && return 0
        sleep 0.025
    done
    echo "programs: server did not start: $(tail -n 3 "$1" "$1.err" 2>/dev/null)" >&2
    return 1
}

# Waits until TCP port $2 on $1 accepts (native servers without a READY line).
wait_port() {
    for _ in $(seq 400); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.025
    done
    return 1
}

# ax-bench beside ax: its null-supervisor runs a program under ax's filter
# with every trapped call answered CONTINUE (the "trapped, no broker" side).
BENCH="$(dirname "$AX")/ax-bench"
declare -A RES   # RES[row,ax|native|trapped|unix] = space-separated rps per round
declare -A CPU   # CPU[row] = space-separated daemon µs per connection per round
declare -A SUP   # SUP[row] = space-separated null-supervisor µs per connection per round
declare -A TRAPS # TRAPS[row] = space-separated trapped calls per connection per round
ROWS=()
CEIL_ROWS=()

# Runs "$@" (a load client) under the null supervisor, its stderr (with the
# supervisor's closing line) in $TMP/sup.err.
trapped_run() { "$BENCH" null-supervisor -- "$@" 2>"$TMP/sup.err" || true; }
TRAPPED_OK=0
[ -x "$BENCH" ] && TRAPPED_OK=1
# Notes the null supervisors' CPU per connection for row $1: the server's
# (ticks $2 to $3 of its supervisor) plus the client's (SUP_US), over $4
# connections (the client's from the closing line in $TMP/sup.err); and the
# trapped calls per connection of the client's side.
sup_note() {
    local SUP_CALLS SUP_US
    read -r SUP_CALLS SUP_US < <(sed -n 's/^null-supervisor: \([0-9]*\) trapped calls, \([0-9]*\) us of CPU$/\1 \2/p' "$TMP/sup.err")
    SUP["$1"]+=" $(awk -v d=$(($3 - $2)) -v k="$CLK" -v c="${SUP_US:-0}" -v n="$4" 'BEGIN {printf "%.1f", (d / k * 1e6 + c) / n}')"
    TRAPS["$1"]+=" $(awk -v c="${SUP_CALLS:-0}" -v n="$4" 'BEGIN {printf "%.1f", c / n}')"
}

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# --- Go net/http ---------------------------------------------------------------
GO_OK=0
if want go && command -v go >/dev/null 2>&1; then
    mkdir -p "$TMP/go"
    cp "$HERE/gohttp.go" "$TMP/go/"
    if (cd "$TMP/go" && GOCACHE="$TMP/go/cache" GO111MODULE=off GOFLAGS= go build -o gohttp gohttp.go) 2>"$TMP/go/build.log"; then
        GO_OK=1
    else
        echo "programs: go build failed: $(tail -3 "$TMP/go/build.log")" >&2
    fi
fi
GOH="$TMP/go/gohttp"
VIP=10.233.7.10   # Go server
VIP_NGINX=10.233.7.11
VIP_REDIS=10.233.7.17
VIP_PY=10.233.7.12
if [ "$GO_OK" = 1 ]; then
    "$GOH" serve 127.0.0.1:8081 >"$TMP/gon.out" 2>"$TMP/gon.out.err" &
    PIDS+=($!)
    "${AXX[@]}" --ip "$VIP" -- "$GOH" serve 0.0.0.0:8080 >"$TMP/goa.out" 2>"$TMP/goa.out.err" &
    PIDS+=($!)
    "$GOH" serve "unix:$TMP/go.sock" >"$TMP/gou.out" 2>"$TMP/gou.out.err" &
    PIDS+=($!)
    wait_ready "$TMP/gon.out"
    wait_ready "$TMP/goa.out"
    wait_ready "$TMP/gou.out"
    if [ "$TRAPPED_OK" = 1 ]; then
        "$BENCH" null-supervisor -- "$GOH" serve 127.0.0.1:8082 >"$TMP/got.out" 2>"$TMP/got.out.err" &
        GOT_SUP=$!
        PIDS+=("$GOT_SUP")
        wait_ready "$TMP/got.out"
    fi
    for ka in 0 1; do
        row="Go net/http, $CONC goroutines, keep-alive $([ $ka = 1 ] && echo on || echo off)"
        ROWS+=("$row")
        n=$N
        sides="native ax"
        if [ $ka = 1 ]; then
            n=$((N * 4))
        else
            CEIL_ROWS+=("$row")
            sides="native ax unix"
            [ "$TRAPPED_OK" = 1 ] && sides+=" trapped"
        fi
        for r in $(seq "$ROUNDS"); do
            for side in $sides; do
                if [ $side = ax ]; then
                    c0=$(dcpu)
                    out=$("${AXX[@]}" -- "$GOH" load "http://$VIP:8080/" "$CONC" "$n" $ka)
                    c1=$(dcpu)
                elif [ $side = unix ]; then
                    out=$("$GOH" load "http://go/" "$CONC" "$n" $ka "unix:$TMP/go.sock")
                elif [ $side = trapped ]; then
                    c0=$(cpu_of "$GOT_SUP")
                    out=$(trapped_run "$GOH" load "http://127.0.0.1:8082/" "$CONC" "$n" $ka)
                    c1=$(cpu_of "$GOT_SUP")
                else
                    out=$("$GOH" load "http://127.0.0.1:8081/" "$CONC" "$n" $ka)
                fi
                read -r reqs errs secs <<<"$out"
                [ "$errs" = 0 ] || echo "programs: $row ($side): $errs of $reqs requests failed" >&2
                RES["$row,$side"]+=" $(awk -v n="$reqs" -v s="$secs" 'BEGIN {printf "%.0f", n / s}')"
                if [ $side = ax ] && [ $ka = 0 ]; then
                    CPU["$row"]+=" $(us_per "$c0" "$c1" "$reqs")"
                fi
                if [ $side = trapped ]; then
                    sup_note "$row" "$c0" "$c1" "$reqs"
                fi
            done
        done
    done
elif want go; then
    ROWS+=("Go net/http (go not installed)")
fi

# --- nginx + ab ------------------------------------------------------------------
if ! want nginx; then
    :
elif command -v nginx >/dev/null 2>&1 && command -v ab >/dev/null 2>&1; then
    nginx_sides="native ax"
    [ "$TRAPPED_OK" = 1 ] && nginx_sides+=" trapped"
    for side in $nginx_sides; do
        d="$TMP/nginx-$side"
        mkdir -p "$d/html" "$d/tmp"
        echo hello >"$d/html/index.html"
        case $side in
            ax) listen=8090 ;;
            native) listen=127.0.0.1:8091 ;;
            trapped) listen=127.0.0.1:8092 ;;
        esac
        cat >"$d/nginx.conf" <<CONF
worker_processes 2;
daemon off;
master_process on;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/tmp; proxy_temp_path $d/tmp; fastcgi_temp_path $d/tmp;
    uwsgi_temp_path $d/tmp; scgi_temp_path $d/tmp;
    keepalive_timeout 0;
    server { listen $listen; root $d/html; }
}
CONF
        if [ $side = ax ]; then
            "${AXX[@]}" --ip "$VIP_NGINX" -- nginx -c "$d/nginx.conf" -e "$d/error.log" 2>"$d/stderr" &
        elif [ $side = trapped ]; then
            "$BENCH" null-supervisor -- nginx -c "$d/nginx.conf" -e "$d/error.log" 2>"$d/stderr" &
            NGT_SUP=$!
        else
            nginx -c "$d/nginx.conf" -e "$d/error.log" 2>"$d/stderr" &
        fi
        PIDS+=($!)
    done
    wait_port 127.0.0.1 8091
    [ "$TRAPPED_OK" = 1 ] && wait_port 127.0.0.1 8092
    # The ax side: ready once a client under ax gets an answer.
    for _ in $(seq 400); do
        "${AXX[@]}" -- ab -q -n 1 "http://$VIP_NGINX:8090/" >/dev/null 2>&1 && break
        sleep 0.025
    done
    row="nginx (2 workers) + ab -c $CONC, keep-alive off"
    ROWS+=("$row")
    CEIL_ROWS+=("$row")
    for r in $(seq "$ROUNDS"); do
        for side in $nginx_sides; do
            if [ $side = ax ]; then
                c0=$(dcpu)
                out=$("${AXX[@]}" -- ab -q -r -c "$CONC" -n "$N" "http://$VIP_NGINX:8090/" 2>&1)
                c1=$(dcpu)
                CPU["$row"]+=" $(us_per "$c0" "$c1" "$N")"
            elif [ $side = trapped ]; then
                c0=$(cpu_of "$NGT_SUP")
                out=$(trapped_run ab -q -r -c "$CONC" -n "$N" "http://127.0.0.1:8092/")
                c1=$(cpu_of "$NGT_SUP")
                sup_note "$row" "$c0" "$c1" "$N"
            else
                out=$(ab -q -r -c "$CONC" -n "$N" "http://127.0.0.1:8091/" 2>&1)
            fi
            rps=$(awk '/^Requests per second/ {print $4}' <<<"$out")
            failed=$(awk '/^Failed requests/ {print $3}' <<<"$out")
            [ "${failed:-x}" = 0 ] || echo "programs: $row ($side): failed requests: ${failed:-?}" >&2
            RES["$row,$side"]+=" ${rps:-nan}"
        done
    done
else
    ROWS+=("nginx + ab (nginx or apache2-utils not installed)")
fi

# --- redis + redis-benchmark ---------------------------------------------------------
# A new connection per request (-k 0), GET of a key that is not there: what
# a connection-per-request client of a small server costs. The server under
# ax runs with --protected-mode no: a client in another app comes from its
# VIP, which protected mode refuses as it would a remote one.
if ! want redis; then
    :
elif command -v redis-server >/dev/null 2>&1 && command -v redis-benchmark >/dev/null 2>&1; then
    redis_sides="native ax unix"
    [ "$TRAPPED_OK" = 1 ] && redis_sides+=" trapped"
    for side in $redis_sides; do
        d="$TMP/redis-$side"
        mkdir -p "$d"
        args=(--save "" --appendonly no --dir "$d" --protected-mode no)
        case $side in
            ax) "${AXX[@]}" --ip "$VIP_REDIS" -- redis-server --port 6379 "${args[@]}" >"$d/log" 2>&1 & ;;
            native) redis-server --bind 127.0.0.1 --port 6380 "${args[@]}" >"$d/log" 2>&1 & ;;
            unix) redis-server --port 0 --unixsocket "$d/redis.sock" "${args[@]}" >"$d/log" 2>&1 & ;;
            trapped)
                "$BENCH" null-supervisor -- redis-server --bind 127.0.0.1 --port 6381 "${args[@]}" >"$d/log" 2>&1 &
                RDT_SUP=$!
                ;;
        esac
        PIDS+=($!)
    done
    wait_port 127.0.0.1 6380
    [ "$TRAPPED_OK" = 1 ] && wait_port 127.0.0.1 6381
    for _ in $(seq 400); do
        [ -S "$TMP/redis-unix/redis.sock" ] && break
        sleep 0.025
    done
    for _ in $(seq 400); do
        "${AXX[@]}" -- redis-benchmark -h "$VIP_REDIS" -p 6379 -q -n 1 -t ping 2>/dev/null | grep -q "requests per second" && break
        sleep 0.025
    done
    # requests a second of a `redis-benchmark -q` run (its last result line;
    # progress lines end in carriage returns).
    redis_rps() { tr '\r' '\n' | awk '/requests per second/ {v = $2} END {print v}'; }
    rb=(timeout 300 redis-benchmark -q -k 0 -c "$CONC" -n "$N" -t get)
    row="redis + redis-benchmark -c $CONC -t get, keep-alive off"
    ROWS+=("$row")
    CEIL_ROWS+=("$row")
    for r in $(seq "$ROUNDS"); do
        for side in $redis_sides; do
            if [ $side = ax ]; then
                c0=$(dcpu)
                out=$("${AXX[@]}" -- "${rb[@]}" -h "$VIP_REDIS" -p 6379 2>&1)
                c1=$(dcpu)
                CPU["$row"]+=" $(us_per "$c0" "$c1" "$N")"
            elif [ $side = trapped ]; then
                c0=$(cpu_of "$RDT_SUP")
                out=$(trapped_run "${rb[@]}" -h 127.0.0.1 -p 6381)
                c1=$(cpu_of "$RDT_SUP")
                sup_note "$row" "$c0" "$c1" "$N"
            elif [ $side = unix ]; then
                out=$("${rb[@]}" -s "$TMP/redis-unix/redis.sock" 2>&1)
            else
                out=$("${rb[@]}" -h 127.0.0.1 -p 6380 2>&1)
            fi
            rps=$(redis_rps <<<"$out")
            [ -n "$rps" ] || echo "programs: $row ($side): no result: $(tail -c 300 <<<"$out")" >&2
            RES["$row,$side"]+=" ${rps:-nan}"
        done
    done
elif want redis; then
    ROWS+=("redis + redis-benchmark (redis-server or redis-tools not installed)")
fi

# --- PostgreSQL + pgbench -----------------------------------------------------------
# postgres refuses to run as root: initdb, both servers, pgbench and an ax
# daemon of these rows' own (on a private socket) run as the unprivileged
# user axtest, and the daemon CPU per connection is that daemon's.
PGBIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)
PG_CONC=8
VIP_PG=10.233.7.15
PGAS=()
if [ "$(id -u)" = 0 ]; then
    if id axtest >/dev/null 2>&1; then
        PGAS=(setpriv --reuid=axtest --regid=axtest --init-groups --)
    else
        PGAS=(none)
    fi
fi
if ! want pg; then
    :
elif [ ! -x "$PGBIN/postgres" ] || [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pgbench" ]; then
    ROWS+=("PostgreSQL + pgbench (postgresql not installed)")
elif [ "${PGAS[*]}" = none ] || ! "${PGAS[@]}" true 2>/dev/null; then
    ROWS+=("PostgreSQL + pgbench (needs an unprivileged user: axtest; scripts/test.sh creates it)")
else
    PGD="$TMP/pg"
    mkdir -p "$PGD/ctl" "$PGD/sock-native" "$PGD/sock-ax"
    if [ ${#PGAS[@]} -gt 0 ]; then
        chmod 711 "$TMP"
        chown -R axtest: "$PGD"
    fi
    chmod 700 "$PGD"
    # The user must be able to run ax; when a parent directory is not
    # searchable (e.g. /root), it runs a copy.
    PGAXBIN="$(readlink -f "$AX")"
    if ! "${PGAS[@]}" test -x "$PGAXBIN"; then
        install -m 755 "$PGAXBIN" "$PGD/ax"
        PGAXBIN="$PGD/ax"
    fi
    PGU=("${PGAS[@]}" env -i -C "$PGD" HOME="$PGD" LC_ALL=C PATH="$PGBIN:/usr/local/bin:/usr/bin:/bin")
    PGSOCK="$PGD/ctl/ax.sock"
    "${PGU[@]}" "$PGAXBIN" daemon --socket "$PGSOCK" 2>"$TMP/pg-daemon.log" &
    PGDAEMON=$!
    PIDS+=("$PGDAEMON")
    PGAXX=("${PGU[@]}" "$PGAXBIN" exec --socket "$PGSOCK" --no-autostart)
    pg_poll() { # command…: until it succeeds, at most about 20 s
        for _ in $(seq 800); do
            "$@" >/dev/null 2>&1 && return 0
            sleep 0.025
        done
        return 1
    }
    PGOPTS=(-c shared_buffers=16MB -c fsync=off -c max_connections=200)
    pg_ok=1
    if ! pg_poll "${PGU[@]}" "$PGAXBIN" get services --socket "$PGSOCK"; then
        echo "programs: the ax daemon of the PostgreSQL rows did not start: $(tail -n 3 "$TMP/pg-daemon.log")" >&2
        pg_ok=0
    fi
    for side in native ax; do
        [ $pg_ok = 1 ] || break
        if ! "${PGU[@]}" initdb -D "$PGD/data-$side" -U postgres -A trust --no-locale -E UTF8 --no-sync \
            >"$TMP/pg-initdb-$side.log" 2>&1; then
            echo "programs: initdb failed: $(tail -3 "$TMP/pg-initdb-$side.log")" >&2
            pg_ok=0
            break
        fi
        # Clients under ax come from their VIPs (the daemon's default pool).
        [ $side = native ] || echo "host all all 10.233.0.0/16 trust" >>"$PGD/data-ax/pg_hba.conf"
        if [ $side = ax ]; then
            "${PGAXX[@]}" --ip "$VIP_PG" -- postgres -D "$PGD/data-ax" -p 5432 -c listen_addresses='*' \
                -c unix_socket_directories="$PGD/sock-ax" "${PGOPTS[@]}" 2>"$TMP/pg-$side.log" &
        else
            "${PGU[@]}" postgres -D "$PGD/data-native" -p 5433 -c listen_addresses=127.0.0.1 \
                -c unix_socket_directories="$PGD/sock-native" "${PGOPTS[@]}" 2>"$TMP/pg-$side.log" &
        fi
        PIDS+=($!)
        PGPIDS+=($!)
    done
    # Ready once pg_isready gets an answer (the ax side through ax, at the VIP).
    if [ $pg_ok = 1 ]; then
        if ! pg_poll "${PGU[@]}" pg_isready -q -h 127.0.0.1 -p 5433 -U postgres ||
            ! pg_poll "${PGAXX[@]}" -- pg_isready -q -h "$VIP_PG" -p 5432 -U postgres; then
            echo "programs: postgres did not start: $(tail -n 3 "$TMP"/pg-*.log)" >&2
            pg_ok=0
        fi
    fi
    if [ $pg_ok = 1 ]; then
        if ! "${PGU[@]}" pgbench -i -s 1 -q -h 127.0.0.1 -p 5433 -U postgres postgres >"$TMP/pg-init-native.log" 2>&1 ||
            ! "${PGAXX[@]}" -- pgbench -i -s 1 -q -h "$VIP_PG" -p 5432 -U postgres postgres >"$TMP/pg-init-ax.log" 2>&1; then
            echo "programs: pgbench -i failed: $(tail -n 3 "$TMP"/pg-init-*.log)" >&2
            pg_ok=0
        fi
    fi
    for connect in 1 0; do
        if [ $connect = 1 ]; then
            row="PostgreSQL + pgbench -C -c $PG_CONC -T $PG_SECS -S (new connection per transaction)"
            flags=(-C)
        else
            row="PostgreSQL + pgbench -c $PG_CONC -T $PG_SECS -S (connections kept)"
            flags=()
        fi
        ROWS+=("$row")
        [ $pg_ok = 1 ] || continue
        for r in $(seq "$ROUNDS"); do
            for side in native ax; do
                args=("${flags[@]}" -n -S -c "$PG_CONC" -T "$PG_SECS" -U postgres)
                if [ $side = ax ]; then
                    c0=$(awk '{print $14 + $15}' "/proc/$PGDAEMON/stat")
                    out=$("${PGAXX[@]}" -- pgbench "${args[@]}" -h "$VIP_PG" -p 5432 postgres 2>&1) || true
                    c1=$(awk '{print $14 + $15}' "/proc/$PGDAEMON/stat")
                else
                    out=$("${PGU[@]}" pgbench "${args[@]}" -h 127.0.0.1 -p 5433 postgres 2>&1) || true
                fi
                # "tps = 1234.5 (without initial connection time)", or with -C
                # "(including reconnection times)", by version.
                tps=$(awk '/^tps = / {printf "%.0f", $3; exit}' <<<"$out")
                tx=$(awk -F': *' '/^number of transactions actually processed/ {split($2, a, "/"); print a[1]; exit}' <<<"$out")
                failed=$(awk -F': *' '/^number of failed transactions/ {split($2, a, " "); print a[1]; exit}' <<<"$out")
                if [ -z "$tps" ] || [ -z "$tx" ] || [ "${failed:-0}" != 0 ] || grep -q -i 'aborted\|error' <<<"$out"; then
                    echo "programs: $row ($side): pgbench: $(grep -i -m 3 'error\|abort\|fail' <<<"$out" || tail -3 <<<"$out")" >&2
                fi
                RES["$row,$side"]+=" ${tps:-nan}"
                if [ $side = ax ] && [ $connect = 1 ] && [ "${tx:-0}" -gt 0 ]; then
                    # Each transaction makes one connection.
                    CPU["$row"]+=" $(us_per "$c0" "$c1" "$tx")"
                fi
            done
        done
    done
fi

# --- daemon CPU per trapped call that needs no target memory ---------------------
# accept4(listener, NULL, NULL, SOCK_NONBLOCK) on a listener with nothing
# pending: trapped, answered EAGAIN, no address to read or write.
CALLS=$((N * 10))
percall=""
if want percall && command -v python3 >/dev/null 2>&1; then
    for r in $(seq "$ROUNDS"); do
        c0=$(dcpu)
        "${AXX[@]}" --ip "$VIP_PY" -- python3 - "$CALLS" <<'PY'
import ctypes, socket, sys
n = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket()
s.bind(("0.0.0.0", 8095))
s.listen(16)
s.setblocking(False)
fd = s.fileno()
acc = libc.accept4
for _ in range(n):
    if acc(fd, None, None, 0o4000) >= 0 or ctypes.get_errno() != 11:
        sys.exit("accept4: unexpected answer")
PY
        c1=$(dcpu)
        percall+=" $(awk -v d=$((c1 - c0)) -v k="$CLK" -v n="$CALLS" 'BEGIN {printf "%.2f", d / k * 1e6 / n}')"
    done
fi

# --- the floor: a notification answered with nothing done -------------------------
# benches/programs/notify_floor.c (compiled here): what any trapped call
# costs a supervisor and its caller before ax does anything, on this kernel.
floor=""
if want floor && command -v cc >/dev/null 2>&1; then
    if cc -O2 -o "$TMP/notify_floor" "$HERE/notify_floor.c" 2>"$TMP/floor.log"; then
        for r in $(seq "$ROUNDS"); do
            floor+="$("$TMP/notify_floor" "$((N * 10))" 1);"
        done
    else
        echo "programs: notify_floor did not build: $(tail -n 3 "$TMP/floor.log")" >&2
    fi
elif want floor; then
    echo "programs: the floor row needs a C compiler (cc); skipped" >&2
fi

# --- the cost of counting: a daemon with --metrics vs one without ---------------------
# Each daemon serves its own copy of an ax-bench server; each round runs the
# same connrate client through both, in alternating order.
BENCH="$(dirname "$AX")/ax-bench"
MROWS=()
if want metrics && [ -x "$BENCH" ]; then
    MSOCK="$TMP/ctlm/ax.sock"
    mkdir -p "$TMP/ctlm"
    "$AX" daemon --socket "$MSOCK" --metrics 127.0.0.1:9464 2>"$TMP/daemon-metrics.log" &
    MDAEMON=$!
    PIDS+=("$MDAEMON")
    for _ in $(seq 200); do
        "$AX" get services --socket "$MSOCK" >/dev/null 2>&1 && break
        sleep 0.05
    done
    AXM=("$AX" exec --socket "$MSOCK" --no-autostart)
    "${AXX[@]}" --ip 10.233.7.13 -- "$BENCH" serve --bind 0.0.0.0:5401 >"$TMP/mo.out" 2>&1 &
    PIDS+=($!)
    "${AXM[@]}" --ip 10.233.7.14 -- "$BENCH" serve --bind 0.0.0.0:5401 >"$TMP/mm.out" 2>&1 &
    PIDS+=($!)
    MN=$((N * 2))
    crate() { sed -n 's/.*"conn_per_s":\([0-9.]*\).*/\1/p'; }
    # Warm-up (and readiness): a few connections through each.
    for _ in $(seq 400); do
        "${AXX[@]}" -- "$BENCH" client --connect 10.233.7.13:5401 --mode connrate --iterations 10 >/dev/null 2>&1 &&
            "${AXM[@]}" -- "$BENCH" client --connect 10.233.7.14:5401 --mode connrate --iterations 10 >/dev/null 2>&1 &&
            break
        sleep 0.025
    done
    off="" on="" cpuoff="" cpuon="" ratios=""
    # At least 5 rounds: a difference of a few percent needs them.
    for r in $(seq $((ROUNDS > 5 ? ROUNDS : 5))); do
        order="off on"
        [ $((r % 2)) = 0 ] && order="on off"
        for side in $order; do
            if [ $side = on ]; then
                c0=$(cpu_of "$MDAEMON")
                rate=$("${AXM[@]}" -- "$BENCH" client --connect 10.233.7.14:5401 --mode connrate --iterations "$MN" | crate)
                c1=$(cpu_of "$MDAEMON")
                on+=" $rate"
                cpuon+=" $(us_per "$c0" "$c1" "$MN")"
            else
                c0=$(dcpu)
                rate=$("${AXX[@]}" -- "$BENCH" client --connect 10.233.7.13:5401 --mode connrate --iterations "$MN" | crate)
                c1=$(dcpu)
                off+=" $rate"
                cpuoff+=" $(us_per "$c0" "$c1" "$MN")"
            fi
        done
        ratios+=" $(awk -v a="${on##* }" -v b="${off##* }" 'BEGIN {if (b > 0) printf "%.3f", a / b; else print "nan"}')"
    done
    # The counters counted: the metrics daemon's connect calls, scraped once.
    scraped=$(exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3 || true)
    counted=$(grep -c '^ax_' <<<"$scraped" || true)
    MROWS+=("| connection rate, \`ax daemon --metrics\` ÷ without | $(median <<<"$off" | awk '{printf "%.0f", $1}') conn/s without, $(median <<<"$on" | awk '{printf "%.0f", $1}') with | $(median <<<"$ratios" | awk '{printf "%.3f×", $1}') (rounds:$ratios) | daemon CPU per connection $(median <<<"$cpuoff") µs without, $(median <<<"$cpuon") µs with; $counted ax_ series scraped |")
fi

# --- report ------------------------------------------------------------------------
{
    echo "### Real programs (under ax vs native, same run; medians of $ROUNDS rounds, $N requests per round; ratio: median of the per-round ratios)"
    echo
    echo "| workload | native req/s | under ax req/s | ratio | daemon CPU per connection |"
    echo "|---|---:|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        if [ -z "${RES["$row,ax"]:-}" ]; then
            echo "| $row | not available | | | |"
            continue
        fi
        a=$(median <<<"${RES["$row,ax"]}")
        nat=$(median <<<"${RES["$row,native"]}")
        c=$(median <<<"${CPU["$row"]:-}")
        [ "$c" = nan ] && c="–" || c="$c µs"
        # The median of the per-round ratios (each compares two runs made
        # back to back).
        ratio=$(paste -d/ <(tr ' ' '\n' <<<"${RES["$row,ax"]}" | awk 'NF') \
            <(tr ' ' '\n' <<<"${RES["$row,native"]}" | awk 'NF') |
            awk -F/ '$2 > 0 {print $1 / $2}' | median | awk '{printf "%.2f×", $1}')
        echo "| $row | $nat | $a | $ratio | $c |"
    done
    echo
    if ((${#CEIL_ROWS[@]} > 0)) && [ "$TRAPPED_OK" = 1 ]; then
        echo "What trapping alone costs (same rounds): the native TCP servers and clients again, each under \`ax-bench null-supervisor\` (ax's own seccomp filter, every trapped call answered CONTINUE at once, nothing else done), and Go over native AF_UNIX (the data path ax gives). The ceiling is what a broker that did no work at all could reach on AF_UNIX: per round, 1 ÷ (1/unix + 1/trapped − 1/native), ÷ native."
        echo
        echo "| workload | trapped, no broker ÷ native | supervisor CPU per connection | client's trapped calls per connection | AF_UNIX ÷ native | ceiling ÷ native | under ax ÷ native |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        for row in "${CEIL_ROWS[@]}"; do
            [ -n "${RES["$row,trapped"]:-}" ] || continue
            per_round() { # side: ratio to native per round
                paste -d/ <(tr ' ' '\n' <<<"${RES["$row,$1"]}" | awk 'NF') \
                    <(tr ' ' '\n' <<<"${RES["$row,native"]}" | awk 'NF') |
                    awk -F/ '$2 > 0 {print $1 / $2}'
            }
            tr_=$(per_round trapped | median | awk '{printf "%.2f×", $1}')
            ax_=$(per_round ax | median | awk '{printf "%.2f×", $1}')
            sup=$(median <<<"${SUP["$row"]:-}")
            calls=$(median <<<"${TRAPS["$row"]:-}")
            un="–" ceil="–"
            if [ -n "${RES["$row,unix"]:-}" ]; then
                un=$(per_round unix | median | awk '{printf "%.2f×", $1}')
                ceil=$(paste -d' ' <(tr ' ' '\n' <<<"${RES["$row,native"]}" | awk 'NF') \
                    <(tr ' ' '\n' <<<"${RES["$row,unix"]}" | awk 'NF') \
                    <(tr ' ' '\n' <<<"${RES["$row,trapped"]}" | awk 'NF') |
                    awk '$1 > 0 && $2 > 0 && $3 > 0 {print (1 / (1 / $2 + 1 / $3 - 1 / $1)) / $1}' |
                    median | awk '{printf "%.2f×", $1}')
            fi
            echo "| $row | $tr_ | $sup µs | $calls | $un | $ceil | $ax_ |"
        done
        echo
    fi
    if [ -n "$percall" ]; then
        pc=$(median <<<"$percall")
        echo "Daemon CPU per trapped call that needs no target memory (accept4 with nothing pending, EAGAIN): $pc µs (median of$percall)."
    fi
    if [ -n "$floor" ]; then
        fcpu=$(tr ';' '\n' <<<"$floor" | awk 'NF {print $1}' | median)
        fwall=$(tr ';' '\n' <<<"$floor" | awk 'NF {print $2}' | median)
        fsync=$(tr ';' '\n' <<<"$floor" | awk 'NF {print $3}' | tail -1)
        echo "The floor under every trapped call (benches/programs/notify_floor.c: a notification answered with nothing done, SYNC_WAKE_UP $([ "$fsync" = 1 ] && echo on || echo unavailable)): $fcpu µs of supervisor CPU and $fwall µs of the caller's wall time per call (medians of $ROUNDS rounds)."
    fi
    echo "Daemon CPU is utime+stime of /proc/<daemon>/stat (tick $((1000000 / CLK)) µs) over the ax client's run, ÷ requests."
    if [ "${pg_ok:-0}" = 1 ]; then
        echo "PostgreSQL rows: transactions per second (pgbench's tps; each transaction one SELECT by primary key, scale 1), runs of $PG_SECS s, not $N requests; their daemon CPU is ÷ transactions, each one connection with -C."
    fi
    if ((${#MROWS[@]} > 0)); then
        echo
        echo "| cost of counting ($((N * 2)) connections per side and round, alternating order) | rate | ratio (median of per-round ratios) | |"
        echo "|---|---|---:|---|"
        printf '%s\n' "${MROWS[@]}"
    fi
} | tee "$OUT"
