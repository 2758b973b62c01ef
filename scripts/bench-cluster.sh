#!/usr/bin/env bash
# The ax cluster benchmark, in one command:
#
#   sudo bash scripts/bench-cluster.sh                # 3 rounds, 32 nodes for the scale part
#   sudo bash scripts/bench-cluster.sh --quick        # 1 round, 8 nodes
#   sudo bash scripts/bench-cluster.sh --nodes 16 --rounds 5
#
# Everything runs inside a new network and mount namespace: the "hosts" are
# network namespaces joined by veth pairs to a bridge, with addresses in
# 10.99.0.0/16; nothing it does can reach another machine, and all of it is
# gone when it ends.
#
# 1. Data path, between two hosts: ax (client and server under ax, connecting
#    by name) against native TCP between the same namespaces (same Python
#    worker at both ends, same release build of ax as the daemons), in 5
#    trials per round, the two alternating (ax first in every other pair):
#    throughput (1 GiB in 1 MiB writes), round-trip latency (1-byte ping-pong,
#    median) and connection set-up (connect + 1 byte + close, mean). Figures
#    are medians over all trials; ratios are ax / native. A trial takes about
#    a second, and on a shared machine its figures scatter by ±20 % (which CPU
#    each end runs on, what else runs), so one pair says little: the
#    medians of many alternating pairs are what to compare.
# 2. Scale: N daemons in N namespaces joined through the first. Time from a
#    service's bind on one host until every other host's daemon has it in its
#    table (from the daemons' logs: p50, p99, max over all services and
#    hosts), time from killing a host's daemon until every other host has
#    withdrawn its services (max), and daemon memory (RSS) per node.
#
# Results: benches/results/cluster.md (and .json); the table is printed too.
# Uses target/release/ax (built if missing), or $AX_BIN.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

nodes=32
rounds=3
for ((i = 1; i <= $#; i++)); do
    a=${!i}
    case "$a" in
        --quick) nodes=8; rounds=1 ;;
        --nodes) i=$((i + 1)); nodes=${!i} ;;
        --rounds) i=$((i + 1)); rounds=${!i} ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "bench-cluster.sh: unknown option $a (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-cluster.sh: needs root to make network namespaces. Run: sudo bash scripts/bench-cluster.sh" >&2
    exit 1
fi

if [ -z "${AX_BENCH_INNER:-}" ]; then
    # Packages, only when missing (package:command pairs; dpkg: a library).
    missing=()
    for pc in python3:python3 iproute2:ip util-linux:nsenter util-linux:unshare \
        libseccomp-dev:dpkg pkg-config:pkg-config; do
        pkg="${pc%%:*}" chk="${pc#*:}"
        if [ "$chk" = dpkg ]; then
            dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && continue
        else
            command -v "$chk" >/dev/null 2>&1 && continue
        fi
        case " ${missing[*]:-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
    done
    if ((${#missing[@]} > 0)) && command -v apt-get >/dev/null 2>&1; then
        echo "bench-cluster.sh: installing ${missing[*]}" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    for prog in python3 ip nsenter unshare; do
        command -v "$prog" >/dev/null || { echo "bench-cluster.sh: $prog is missing (bash scripts/install-deps.sh)" >&2; exit 1; }
    done
    if [ -z "${AX_BIN:-}" ]; then
        # Under sudo, root's PATH may not have cargo: look where rustup puts it.
        if ! command -v cargo >/dev/null 2>&1; then
            for d in "${CARGO_HOME:-}/bin" "$HOME/.cargo/bin" /root/.cargo/bin "/home/${SUDO_USER:-}/.cargo/bin"; do
                [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
            done
        fi
        command -v cargo >/dev/null 2>&1 || { echo "bench-cluster.sh: cargo not found; install Rust or set AX_BIN" >&2; exit 1; }
        cargo build --release -q -p ax
        export AX_BIN="$ROOT/target/release/ax"
    fi
    mkdir -p benches/results
    exec unshare --net --mount --propagation private \
        env AX_BENCH_INNER=1 bash "$0" --nodes "$nodes" --rounds "$rounds"
fi

ip link set lo up
exec python3 - "$AX_BIN" "$nodes" "$rounds" "$ROOT/benches/results" <<'PY'
import datetime, json, os, re, socket, statistics, subprocess, sys, tempfile, time

AX, NODES, ROUNDS, OUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
PORT = 7946
procs = []          # everything started, ended at exit
tmp = tempfile.mkdtemp(prefix="ax-bench-cluster.")

WORKER = r'''
import socket, sys, time, json
def server(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128); print("READY", flush=True)
    while True:
        c, _ = s.accept()
        kind = c.recv(1)
        if kind == b"T":
            while c.recv(1 << 20):
                pass
            c.sendall(b"k")
        elif kind == b"P":
            while True:
                b = c.recv(1)
                if not b:
                    break
                c.sendall(b)
        c.close()
def client(host, port):
    port = int(port)
    chunk = b"x" * (1 << 20)
    c = socket.create_connection((host, port)); c.sendall(b"T")
    t = time.perf_counter()
    for _ in range(1024):
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR); c.recv(1)
    gbps = 1024 * (1 << 20) * 8 / (time.perf_counter() - t) / 1e9
    c.close()
    c = socket.create_connection((host, port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"P"); rtts = []
    for _ in range(2000):
        t = time.perf_counter(); c.sendall(b"a"); c.recv(1); rtts.append(time.perf_counter() - t)
    c.close()
    rtts.sort()
    n = 300; t = time.perf_counter()
    for _ in range(n):
        c = socket.create_connection((host, port)); c.sendall(b"C"); c.recv(1); c.close()
    setup = (time.perf_counter() - t) / n
    print(json.dumps({"gbps": gbps, "rtt_us": rtts[len(rtts) // 2] * 1e6, "setup_us": setup * 1e6}))
if sys.argv[1] == "server":
    server(int(sys.argv[2]))
else:
    client(sys.argv[2], sys.argv[3])
'''
worker = os.path.join(tmp, "worker.py")
open(worker, "w").write(WORKER)

def start(argv, **kw):
    p = subprocess.Popen(argv, **kw)
    procs.append(p)
    return p

def netns():
    ours = os.readlink("/proc/self/ns/net")
    p = start(["unshare", "--net", "--", "sleep", "86400"])
    for _ in range(1000):
        try:
            if os.readlink(f"/proc/{p.pid}/ns/net") != ours:
                return p.pid
        except OSError:
            pass
        time.sleep(0.005)
    raise SystemExit("unshare --net did not start")

def ns(pid, *argv):
    return ["nsenter", "-t", str(pid), "-n", "--", *argv]

def sh(pid, *argv):
    subprocess.run(ns(pid, *argv), check=True, capture_output=True)

switch = netns()
sh(switch, "ip", "link", "add", "br0", "type", "bridge")
sh(switch, "ip", "link", "set", "br0", "up")

class Host:
    def __init__(self, i):
        self.i, self.name = i, f"n{i}"
        self.pid = netns()
        self.addr = f"10.99.{i // 250}.{i % 250 + 1}"
        subprocess.run(ns(switch, "ip", "link", "add", "eth0", "netns", str(self.pid),
                          "type", "veth", "peer", "name", f"p{i}"), check=True)
        sh(switch, "ip", "link", "set", f"p{i}", "master", "br0")
        sh(switch, "ip", "link", "set", f"p{i}", "up")
        sh(self.pid, "ip", "link", "set", "lo", "up")
        sh(self.pid, "ip", "addr", "add", f"{self.addr}/16", "dev", "eth0")
        sh(self.pid, "ip", "link", "set", "eth0", "up")
        self.dir = os.path.join(tmp, self.name); os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "ax.sock")
        self.log = os.path.join(self.dir, "daemon.log")
        self.daemon = None

    def env(self):
        return dict(os.environ, AX_SOCKET=self.sock, XDG_RUNTIME_DIR=self.dir,
                    RUST_LOG="info,ax_broker::handlers::bind=debug")

    def start_daemon(self, join):
        argv = [AX, "daemon", "--socket", self.sock, "--node", self.name,
                "--cluster", f"{self.addr}:{PORT}"]
        if join:
            argv += ["--join", f"{join}:{PORT}"]
        self.daemon = start(ns(self.pid, *argv), env=self.env(),
                            stdout=open(self.log, "a"), stderr=subprocess.STDOUT)

    def wait_ready(self):
        for _ in range(1000):
            try:
                s = socket.socket(socket.AF_UNIX); s.connect(self.sock); s.close(); return
            except OSError:
                time.sleep(0.01)
        raise SystemExit(f"{self.name}: daemon not ready")

    def exec(self, opts, argv, **kw):
        return start(ns(self.pid, AX, "exec", "--socket", self.sock, "--no-autostart", *opts, "--", *argv),
                     env=self.env(), **kw)

    def run_ax(self, *argv):
        return subprocess.run([AX, *argv, "--socket", self.sock], env=self.env(),
                              capture_output=True, text=True, check=True).stdout

def ready(p):
    line = p.stdout.readline()
    if "READY" not in line:
        raise SystemExit(f"server did not start: {line!r}")

def stop(p):
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill(); p.wait()

def cleanup():
    for p in reversed(procs):
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(5)
        except Exception:
            pass

results = {"nodes": NODES, "rounds": ROUNDS, "trials": 5 * ROUNDS}
try:
    hosts = [Host(i) for i in range(NODES)]
    for h in hosts:
        h.start_daemon(hosts[0].addr if h.i else None)
    for h in hosts:
        h.wait_ready()
    t0 = time.time()
    while True:
        alive = json.loads(hosts[0].run_ax("get", "nodes", "-o", "json"))
        if sum(n["state"] == "alive" for n in alive) == NODES:
            break
        if time.time() - t0 > 120:
            raise SystemExit(f"only {len(alive)} nodes joined: {alive}")
        time.sleep(0.2)
    results["join_all_s"] = time.time() - t0

    # 1. Data path between n0 (client) and n1 (server).
    a, b = hosts[0], hosts[1]
    native_srv = start(ns(b.pid, "python3", worker, "server", "9000"), stdout=subprocess.PIPE, text=True)
    ready(native_srv)
    ax_srv = b.exec(["--name", "benchsrv"], ["python3", worker, "server", "9100"],
                    stdout=subprocess.PIPE, text=True)
    ready(ax_srv)
    time.sleep(1)  # the name reaches n0's table within a gossip round or two
    rows = {"native": [], "ax": []}
    TRIALS = 5 * ROUNDS
    for r in range(TRIALS):
        for kind in (["native", "ax"] if r % 2 == 0 else ["ax", "native"]):
            if kind == "native":
                out = subprocess.run(ns(a.pid, "python3", worker, "client", b.addr, "9000"),
                                     capture_output=True, text=True, check=True).stdout
            else:
                p = a.exec([], ["python3", worker, "client", "benchsrv", "9100"],
                           stdout=subprocess.PIPE, text=True)
                out, _ = p.communicate(timeout=600)
                if p.returncode != 0:
                    raise SystemExit(f"ax client failed: {out}")
            rows[kind].append(json.loads(out.strip().splitlines()[-1]))
    results["trials_gbps"] = {k: [round(x["gbps"], 2) for x in v] for k, v in rows.items()}
    med = lambda kind, k: statistics.median(x[k] for x in rows[kind])
    for k in ("gbps", "rtt_us", "setup_us"):
        results[f"native_{k}"] = med("native", k)
        results[f"ax_{k}"] = med("ax", k)
        results[f"ratio_{k}"] = med("ax", k) / med("native", k)
    stop(ax_srv); stop(native_srv)

    # 2. Scale: services appearing everywhere, a dead host withdrawn.
    ts_re = re.compile(r"^(\S+Z)\s")
    def stamp(line):
        m = ts_re.match(line)
        return datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp() if m else None
    def first(log, needle, after=0.0):
        for line in open(log, errors="replace"):
            if needle(line):
                t = stamp(line)
                if t is not None and t >= after:
                    return t
        return None
    K = min(10, NODES - 1)
    samples, servers = [], []
    last = hosts[-1]
    for k in range(K):
        h = hosts[1 + k % (NODES - 1)] if k else last
        port = 7000 + k
        p = h.exec(["--name", f"svc{k}"],
                   ["python3", "-c", "import socket,time\ns=socket.socket()\n"
                    f"s.bind(('0.0.0.0',{port}))\ns.listen()\nprint('READY',flush=True)\ntime.sleep(86400)"],
                   stdout=subprocess.PIPE, text=True)
        ready(p); servers.append(p)
        bound = None
        for _ in range(100):
            bound = first(h.log, lambda l: "bound virtual listener" in l and f"port={port}" in l)
            if bound:
                break
            time.sleep(0.05)
        deadline = time.time() + 15
        pending = [o for o in hosts if o is not h]
        while pending and time.time() < deadline:
            for o in list(pending):
                t = first(o.log, lambda l: "service on another node added" in l
                          and f"node={h.name}" in l and f":{port}" in l)
                if t is not None:
                    samples.append(t - bound); pending.remove(o)
            time.sleep(0.1)
        if pending:
            raise SystemExit(f"svc{k} did not reach {[o.name for o in pending]}")
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]
    results["propagation_samples"] = len(samples)
    results["propagation_p50_s"], results["propagation_p99_s"] = q(0.5), q(0.99)
    results["propagation_max_s"] = samples[-1]

    rss = []
    for h in hosts:
        for line in open(f"/proc/{h.daemon.pid}/status"):
            if line.startswith("VmRSS:"):
                rss.append(int(line.split()[1]))
    results["daemon_rss_mib_mean"] = statistics.mean(rss) / 1024
    results["daemon_rss_mib_max"] = max(rss) / 1024

    killed_at = time.time()
    last.daemon.kill()
    deadline = time.time() + 60
    pending = [o for o in hosts if o is not last]
    withdrawn = []
    while pending and time.time() < deadline:
        for o in list(pending):
            t = first(o.log, lambda l: "service on another node withdrawn" in l
                      and f"node={last.name}" in l, after=killed_at)
            if t is not None:
                withdrawn.append(t - killed_at); pending.remove(o)
        time.sleep(0.1)
    if pending:
        raise SystemExit(f"{last.name} not withdrawn on {[o.name for o in pending]}")
    results["withdraw_max_s"] = max(withdrawn)
    results["withdraw_p50_s"] = statistics.median(withdrawn)
finally:
    cleanup()

r = results
md = f"""# ax cluster benchmark

`sudo bash scripts/bench-cluster.sh --nodes {NODES} --rounds {ROUNDS}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,
`{os.uname().release}`, {os.cpu_count()} CPUs. Hosts are network namespaces on one machine joined by
veth pairs and a bridge; the Python worker at both ends is the same for ax and native.

| cross-host data path (n0 → n1, median of {r['trials']} alternating trials) | native TCP | ax | ax / native |
|---|---|---|---|
| throughput, 1 GiB in 1 MiB writes | {r['native_gbps']:.2f} Gbit/s | {r['ax_gbps']:.2f} Gbit/s | {r['ratio_gbps']:.2f} |
| round trip, 1 byte | {r['native_rtt_us']:.1f} µs | {r['ax_rtt_us']:.1f} µs | {r['ratio_rtt_us']:.2f} |
| connection set-up (connect, 1 byte, close) | {r['native_setup_us']:.0f} µs | {r['ax_setup_us']:.0f} µs | {r['ratio_setup_us']:.2f} |

| scale, {NODES} daemons | |
|---|---|
| all nodes alive on n0 after start | {r['join_all_s']:.1f} s |
| new service in every other host's table (bind → table), {r['propagation_samples']} samples | p50 {r['propagation_p50_s'] * 1000:.0f} ms, p99 {r['propagation_p99_s'] * 1000:.0f} ms, max {r['propagation_max_s'] * 1000:.0f} ms |
| dead host's services withdrawn everywhere (kill -9 → last host) | max {r['withdraw_max_s']:.1f} s (median {r['withdraw_p50_s']:.1f} s) |
| daemon memory (RSS) per node | mean {r['daemon_rss_mib_mean']:.1f} MiB, max {r['daemon_rss_mib_max']:.1f} MiB |
"""
open(os.path.join(OUT, "cluster.md"), "w").write(md)
open(os.path.join(OUT, "cluster.json"), "w").write(json.dumps(results, indent=2) + "\n")
print(md)
PY
