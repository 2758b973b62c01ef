//! Faults ax must survive, and who may not get in (issue 4).
//!
//! * the daemon killed with SIGKILL and restarted — by hand, or by a
//!   launcher that autostarts one — while apps serve traffic;
//! * programs killed in the middle of trapped calls, thread churn, fork
//!   storms: the daemon keeps serving and its fds and memory come back to
//!   their baseline;
//! * load: 16 apps × 8 threads × 2,000 connects;
//! * a Go program whose runtime preempts goroutines with signals;
//! * the control socket serves only its own uid and root; VIP:port and
//!   `--ip` ownership; `io_uring_setup` and 32-bit `int 0x80` calls.
//!
//! Every test is bounded in time and kills what it starts, by pid (the
//! harness guards do, also on panic). Figures are printed with
//! `--nocapture` (and always on stderr for the summary lines).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ax_e2e::serde_json::{self, Value};
use ax_e2e::{euid, note, poll, require, run, App, Daemon, TempDir, SHORT, THREADED_ECHO_SERVER};
use rustix::process::Signal;

// ---------------------------------------------------------------- helpers

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Python scripts written to files, so that `ax get apps` and the daemon's
/// log show `python3 /…/name.py` rather than whole scripts.
struct Scripts {
    dir: TempDir,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            dir: TempDir::new("scripts"),
        }
    }

    /// `python3 DIR/NAME.py ARGS…`, writing the script on first use.
    fn py(&self, name: &str, script: &str, args: &[&str]) -> Vec<String> {
        let path = self.dir.join(&format!("{name}.py"));
        if !path.exists() {
            self.dir.write(&format!("{name}.py"), script);
        }
        let mut v = vec!["python3".to_string(), p(&path).to_string()];
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    /// A scratch path inside the directory.
    fn path(&self, name: &str) -> String {
        p(&self.dir.join(name)).to_string()
    }
}

/// The last line of `text` that parses as a JSON object.
fn last_json(text: &str) -> Option<Value> {
    text.lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('{')
            .then(|| serde_json::from_str(l).ok())
            .flatten()
    })
}

/// The count in the last `P <n>` progress line of `text` (0 if none).
fn progress(text: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("P ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `app`'s progress count exceeds `above`; panics after `limit`.
fn wait_progress(app: &mut App, above: u64, limit: Duration) -> u64 {
    let got = poll(limit, Duration::from_millis(10), || {
        let n = progress(&app.stdout());
        if n > above {
            return Some(Ok(n));
        }
        app.try_status().map(|_| Err(()))
    });
    match got {
        Some(Ok(n)) => n,
        Some(Err(())) => panic!("ended before progressing past {above}: {}", app.report()),
        None => panic!(
            "made no progress past {above} within {limit:?}: {}",
            app.report()
        ),
    }
}

/// Compiles C `source` into `dir/name` with `cc EXTRA…`; returns the binary.
fn compile_c(dir: &TempDir, name: &str, source: &str, extra: &[&str]) -> String {
    let src = dir.write(&format!("{name}.c"), source);
    let bin = dir.join(name);
    let out = run(
        Command::new("cc")
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src)
            .args(extra),
        Duration::from_secs(120),
    );
    out.assert_success();
    p(&bin).to_string()
}

/// The program's pid from `ax get apps` for the app with VIP `vip`.
fn app_with_vip<'a>(apps: &'a [Value], vip: &str) -> &'a Value {
    apps.iter()
        .find(|a| {
            a["vips"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x == vip))
        })
        .unwrap_or_else(|| panic!("no app with VIP {vip}: {apps:?}"))
}

/// What must survive a daemon restart of an app: id, VIPs, program pid,
/// names, labels, owner, command.
fn app_identity(a: &Value) -> Value {
    serde_json::json!({
        "id": a["id"], "vips": a["vips"], "pid": a["pid"], "names": a["names"],
        "labels": a["labels"], "uid": a["uid"], "command": a["command"],
    })
}

fn sorted_identities(apps: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = apps.iter().map(|a| app_identity(a).to_string()).collect();
    v.sort();
    v
}

/// What must survive of a service: address and backends.
fn sorted_services(services: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = services
        .iter()
        .map(|s| serde_json::json!({"addr": s["addr"], "backends": s["backends"]}).to_string())
        .collect();
    v.sort();
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------- programs

/// asyncio line-echo server (non-blocking accept through a selector):
/// `python3 -c ASYNCIO_SERVER HOST PORT`.
const ASYNCIO_SERVER: &str = r#"
import asyncio, os, sys
host, port = sys.argv[1], int(sys.argv[2])
async def handle(r, w):
    try:
        while True:
            line = await r.readline()
            if not line:
                break
            w.write(b"echo:" + line)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
async def main():
    srv = await asyncio.start_server(handle, host, port, backlog=128)
    print("LISTENING", os.getpid(), flush=True)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

/// One established connection, a request/response every 2 ms until the
/// file STOP exists: `python3 -c HOLDING_CLIENT HOST PORT STOP`. Prints
/// `P <requests>` every 20 ms, and at the end one JSON line with the count,
/// the errors and the longest gap between two answers.
const HOLDING_CLIENT: &str = r#"
import json, os, socket, sys, threading, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=20)
f = s.makefile("rb")
state = {"n": 0, "errors": [], "max_gap": 0.0}
def report():
    while not os.path.exists(stop):
        print("P", state["n"], flush=True)
        time.sleep(0.02)
threading.Thread(target=report, daemon=True).start()
last = time.monotonic()
while not os.path.exists(stop):
    try:
        msg = b"req %d\n" % state["n"]
        s.sendall(msg)
        got = f.readline()
        if got != b"echo:" + msg:
            state["errors"].append("bad answer %r to %r" % (got, msg))
            break
    except OSError as e:
        state["errors"].append("request %d: %s" % (state["n"], e))
        break
    state["n"] += 1
    now = time.monotonic()
    state["max_gap"] = max(state["max_gap"], now - last)
    last = now
    time.sleep(0.002)
print("P", state["n"], flush=True)
print(json.dumps({"requests": state["n"], "errors": state["errors"],
                  "max_gap_ms": round(state["max_gap"] * 1000, 1)}), flush=True)
sys.exit(1 if state["errors"] else 0)
"#;

/// New connections in a loop, THREADS threads, each connect followed by one
/// echoed line, round-robin over the targets, until the file STOP exists:
/// `python3 -c CONNECT_LOOP STOP THREADS HOST:PORT…`. Prints `P <connects>`
/// every 20 ms and a JSON summary (count, errors, slowest connect+echo).
const CONNECT_LOOP: &str = r#"
import json, os, socket, sys, threading, time
stop, nthreads = sys.argv[1], int(sys.argv[2])
targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sys.argv[3:]]
lock = threading.Lock()
state = {"n": 0, "errors": [], "max": 0.0}
def worker(k):
    i = k
    while not os.path.exists(stop):
        host, port = targets[i % len(targets)]
        i += 1
        t = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=20) as s:
                s.sendall(b"hello\n")
                got = s.makefile("rb").readline()
                if got != b"echo:hello\n":
                    raise OSError("bad answer %r" % got)
        except OSError as e:
            with lock:
                state["errors"].append("%s:%d: %s" % (host, port, e))
            if len(state["errors"]) > 20:
                return
            continue
        dt = time.monotonic() - t
        with lock:
            state["n"] += 1
            state["max"] = max(state["max"], dt)
def report():
    while not os.path.exists(stop):
        print("P", state["n"], flush=True)
        time.sleep(0.02)
threading.Thread(target=report, daemon=True).start()
ts = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print("P", state["n"], flush=True)
print(json.dumps({"connects": state["n"], "errors": state["errors"],
                  "max_ms": round(state["max"] * 1000, 1)}), flush=True)
sys.exit(1 if state["errors"] else 0)
"#;

// ---------------------------------------------------------------- 1. daemon killed and restarted

/// Apps serve traffic; the daemon is killed with SIGKILL and replaced on
/// the same socket — by the test (`autostart == false`, all launchers run
/// with `--no-autostart`) or by a launcher that autostarts one.
fn daemon_restart_scenario(autostart: bool, base: &str) {
    let mut d = Daemon::start();
    let sc = Scripts::new();
    let stop = sc.path("stop");
    let stop = stop.as_str();
    let opts = |ip: Option<&str>| -> Vec<String> {
        let mut v = Vec::new();
        if !autostart {
            v.push("--no-autostart".to_string());
        }
        if let Some(ip) = ip {
            v.extend(["--ip".to_string(), ip.to_string()]);
        }
        v
    };
    let (vip1, vip2, vip3) = (
        format!("{base}.1"),
        format!("{base}.2"),
        format!("{base}.3"),
    );
    let (t1, t2) = (format!("{vip1}:7000"), format!("{vip2}:7001"));

    let o = opts(Some(&vip1));
    let mut blocking = d.spawn(
        &strs(&o),
        &sc.py(
            "threaded_server",
            THREADED_ECHO_SERVER,
            &["0.0.0.0", "7000"],
        ),
    );
    let o = opts(Some(&vip2));
    let mut asyncio = d.spawn(
        &strs(&o),
        &sc.py("asyncio_server", ASYNCIO_SERVER, &["0.0.0.0", "7001"]),
    );
    d.wait_for_service(&mut blocking, &t1);
    d.wait_for_service(&mut asyncio, &t2);

    let o = opts(Some(&vip3));
    let mut hold1 = d.spawn(
        &strs(&o),
        &sc.py("holding_client", HOLDING_CLIENT, &[&vip1, "7000", stop]),
    );
    let o = opts(None);
    let mut hold2 = d.spawn(
        &strs(&o),
        &sc.py("holding_client", HOLDING_CLIENT, &[&vip2, "7001", stop]),
    );
    let mut loop1 = d.spawn(
        &strs(&o),
        &sc.py("connect_loop", CONNECT_LOOP, &[stop, "2", &t1, &t2]),
    );
    let mut loop2 = d.spawn(
        &strs(&o),
        &sc.py("connect_loop", CONNECT_LOOP, &[stop, "1", &t2, &t1]),
    );

    // ~1 s of traffic.
    for app in [&mut hold1, &mut hold2, &mut loop1, &mut loop2] {
        wait_progress(app, 0, SHORT);
    }
    sleep(Duration::from_secs(1));
    let apps_before = d.apps();
    let services_before = d.services();
    assert_eq!(apps_before.len(), 6, "apps before: {apps_before:?}");
    assert_eq!(
        services_before.len(),
        2,
        "services before: {services_before:?}"
    );
    let old_pid = d.pid();

    let counts =
        |apps: &[&App]| -> Vec<u64> { apps.iter().map(|a| progress(&a.stdout())).collect() };
    let before_kill = counts(&[&hold1, &hold2, &loop1, &loop2]);
    let killed_at = Instant::now();
    d.kill_hard();
    let new_pid;
    let during;
    if autostart {
        // Nobody restarts it by hand: a launcher starts one.
        new_pid = d.adopt_successor(Duration::from_secs(15));
        during = counts(&[&hold1, &hold2, &loop1, &loop2]);
    } else {
        sleep(Duration::from_millis(300));
        during = counts(&[&hold1, &hold2, &loop1, &loop2]);
        assert!(
            !d.socket().exists() || std::os::unix::net::UnixStream::connect(d.socket()).is_err(),
            "something answers on the socket although the daemon is dead"
        );
        d.restart();
        new_pid = d.pid();
    }
    let outage = killed_at.elapsed();
    assert_ne!(new_pid, old_pid);
    let at_restart = counts(&[&hold1, &hold2, &loop1, &loop2]);

    // The established connection to the threaded server flowed while no
    // daemon existed: its handler thread makes no trapped call. (With the
    // autostart variant the outage may be too short to see it.) The
    // asyncio server is one thread: when that thread makes a trapped call
    // during the outage — asyncio ends each burst of accepts with one more
    // `accept` that would say EAGAIN, and under ax that call waits for a
    // daemon — its established connections wait too, without error, until
    // the successor answers; that is checked after the restart below.
    if !autostart {
        assert!(
            during[0] > before_kill[0],
            "the long-lived connection to the threaded server made no request during the \
             outage ({} → {})",
            before_kill[0],
            during[0]
        );
    }
    // New connections after the restart: the connect loops go on, from
    // where they were when the daemon came back.
    sleep(Duration::from_millis(1500));
    let end = counts(&[&hold1, &hold2, &loop1, &loop2]);
    for (i, (r, e)) in at_restart.iter().zip(&end).enumerate() {
        assert!(
            e > r,
            "client {i} made no progress after the restart ({r} → {e})"
        );
    }
    // A new app registers with the new daemon and connects.
    let o = opts(None);
    let fresh = d.run(
        &strs(&o),
        &sc.py("connect_once", CONNECT_LOOP_ONCE, &[&t1, &t2]),
    );
    fresh.assert_success();
    assert_eq!(fresh.stdout.trim(), "echo:once echo:once", "{fresh}");

    // The registry is whole again: same apps (ids, VIPs, pids), same services.
    let whole = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let apps = d.apps();
        let services = d.services();
        (sorted_identities(&apps) == sorted_identities(&apps_before)
            && sorted_services(&services) == sorted_services(&services_before))
        .then_some((apps, services))
    });
    let (apps_after, services_after) = whole.unwrap_or_else(|| {
        panic!(
            "registry not whole 10 s after the restart:\nbefore: {:#?}\n{:#?}\nafter: {:#?}\n{:#?}",
            sorted_identities(&apps_before),
            sorted_services(&services_before),
            sorted_identities(&d.apps()),
            sorted_services(&d.services())
        )
    });
    let _ = (apps_after, services_after);

    // Stop the clients and collect their figures.
    fs::write(stop, "").expect("write stop file");
    let mut summaries = Vec::new();
    for app in [&mut hold1, &mut hold2, &mut loop1, &mut loop2] {
        let st = app.wait(SHORT);
        let summary =
            last_json(&app.stdout()).unwrap_or_else(|| panic!("no summary: {}", app.report()));
        assert!(
            st.success() && summary["errors"] == serde_json::json!([]),
            "client had errors across the restart: {summary}\n{}",
            app.report()
        );
        summaries.push(summary);
    }
    // A connect trapped while no daemon existed waited, then completed.
    let slowest = summaries[2]["max_ms"]
        .as_f64()
        .unwrap_or(0.0)
        .max(summaries[3]["max_ms"].as_f64().unwrap_or(0.0));
    if !autostart {
        assert!(
            slowest >= 200.0,
            "no connect spanned the {outage:?} outage (slowest {slowest} ms)? {summaries:?}"
        );
    }

    // No app was restarted: each server printed LISTENING once, and the
    // launchers still run the same programs.
    for srv in [&mut blocking, &mut asyncio] {
        assert!(srv.try_status().is_none(), "server ended: {}", srv.report());
        assert_eq!(
            srv.stdout().matches("LISTENING").count(),
            1,
            "{}",
            srv.report()
        );
    }
    for (vip, srv) in [(&vip1, &mut blocking), (&vip2, &mut asyncio)] {
        let pid = app_with_vip(&apps_before, vip)["pid"].as_u64().unwrap_or(0) as u32;
        assert!(
            srv.pids().contains(&pid),
            "app {vip}: program pid {pid} is no longer a child of its launcher"
        );
        assert!(
            srv.stdout().contains(&format!("LISTENING {pid}")),
            "{}",
            srv.report()
        );
    }
    let log = d.log();
    assert!(
        log.contains("handed over again after a daemon restart"),
        "the new daemon's log shows no hand-over:\n{log}"
    );
    note(&format!(
        "{}: daemon {old_pid} killed (SIGKILL), successor {new_pid} serving after {outage:?} \
         ({}); requests on the long-lived connections: {} and {}; connects: {} and {}; \
         slowest connect+echo {slowest} ms; errors 0",
        ax_e2e::test_name(),
        if autostart {
            "autostarted by a launcher"
        } else {
            "restarted by the test"
        },
        summaries[0]["requests"],
        summaries[1]["requests"],
        summaries[2]["connects"],
        summaries[3]["connects"],
    ));
}

/// One connect and echoed line to each `HOST:PORT` argument; prints the answers.
const CONNECT_LOOP_ONCE: &str = r#"
import socket, sys
out = []
for t in sys.argv[1:]:
    host, port = t.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(b"once\n")
        out.append(s.makefile("rb").readline().decode().strip())
print(" ".join(out), flush=True)
"#;

#[test]
fn daemon_killed_and_restarted() {
    require!("python3");
    daemon_restart_scenario(false, "10.233.1");
}

#[test]
fn daemon_killed_and_autostarted_by_a_launcher() {
    require!("python3");
    daemon_restart_scenario(true, "10.233.2");
}

/// A threaded echo server like [`THREADED_ECHO_SERVER`] that survives a failed
/// `accept` (printing `ERROR …`) instead of dying, so that one test can
/// count every failure.
const TOLERANT_THREADED_SERVER: &str = r#"
import os, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(128)
print("LISTENING", os.getpid(), flush=True)
def handle(c):
    try:
        with c:
            for line in c.makefile("rb"):
                c.sendall(b"echo:" + line)
    except OSError as e:
        print("ERROR handler:", e, flush=True)
while True:
    try:
        fd = srv._accept()[0]
    except OSError as e:
        print("ERROR accept:", e, flush=True)
        continue
    try:
        c = socket.socket(fileno=fd)
    except OSError as e:
        print("ERROR accept returned fd %d, which is not a socket: %s" % (fd, e), flush=True)
        continue
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// asyncio echo server that prints `ERROR …` for every exception its loop
/// reports (a failed accept among them).
const TOLERANT_ASYNCIO_SERVER: &str = r#"
import asyncio, os, sys
host, port = sys.argv[1], int(sys.argv[2])
async def handle(r, w):
    try:
        while True:
            line = await r.readline()
            if not line:
                break
            w.write(b"echo:" + line)
            await w.drain()
    except (ConnectionError, OSError) as e:
        print("ERROR handler:", e, flush=True)
    finally:
        w.close()
def on_error(loop, ctx):
    print("ERROR loop:", ctx.get("message"), repr(ctx.get("exception")), flush=True)
async def main():
    asyncio.get_running_loop().set_exception_handler(on_error)
    srv = await asyncio.start_server(handle, host, port, backlog=128)
    print("LISTENING", os.getpid(), flush=True)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

/// A `selectors` echo server with a non-blocking listener that accepts
/// with the raw `accept` (`socket._accept`), so that it can print the fd
/// number of an accept that returns something other than a socket.
const TOLERANT_SELECTORS_SERVER: &str = r#"
import os, selectors, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(128)
srv.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ, None)
print("LISTENING", os.getpid(), flush=True)
bufs = {}
while True:
    for key, _ in sel.select():
        if key.data is None:
            while True:
                try:
                    fd = srv._accept()[0]
                except BlockingIOError:
                    break
                except OSError as e:
                    print("ERROR accept:", e, flush=True)
                    break
                try:
                    c = socket.socket(fileno=fd)
                except OSError as e:
                    print("ERROR accept returned fd %d, which is not a socket: %s" % (fd, e), flush=True)
                    continue
                c.setblocking(False)
                bufs[c] = b""
                sel.register(c, selectors.EVENT_READ, "conn")
        else:
            c = key.fileobj
            try:
                data = c.recv(65536)
            except OSError as e:
                print("ERROR recv:", e, flush=True)
                data = b""
            if not data:
                sel.unregister(c)
                del bufs[c]
                c.close()
                continue
            buf = bufs[c] + data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                c.setblocking(True)
                c.sendall(b"echo:" + line + b"\n")
                c.setblocking(False)
            bufs[c] = buf
"#;

/// A small xorshift generator; the seed is printed so a run can be replayed
/// with `AX_E2E_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("AX_E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        note(&format!(
            "{}: random seed {seed} (AX_E2E_SEED)",
            ax_e2e::test_name()
        ));
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..hi` (milliseconds).
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// The daemon is killed (SIGKILL) and restarted many times while clients
/// connect in loops and hold connections: each kill lands at a random
/// moment, so some land in the middle of a call. Not one error anywhere.
#[test]
fn daemon_killed_and_restarted_repeatedly() {
    require!("python3");
    let kills: usize = std::env::var("AX_E2E_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rng = Rng::from_env();
    let mut d = Daemon::start();
    let sc = Scripts::new();
    let stop = sc.path("stop");
    let stop = stop.as_str();
    let nat = ["--no-autostart"];
    let mut blocking = d.spawn(
        &["--no-autostart", "--ip", "10.233.3.1"],
        &sc.py(
            "tolerant_threaded",
            TOLERANT_THREADED_SERVER,
            &["0.0.0.0", "7000"],
        ),
    );
    let mut asyncio = d.spawn(
        &["--no-autostart", "--ip", "10.233.3.2"],
        &sc.py(
            "tolerant_asyncio",
            TOLERANT_ASYNCIO_SERVER,
            &["0.0.0.0", "7001"],
        ),
    );
    let mut selectors = d.spawn(
        &["--no-autostart", "--ip", "10.233.3.3"],
        &sc.py(
            "tolerant_selectors",
            TOLERANT_SELECTORS_SERVER,
            &["0.0.0.0", "7002"],
        ),
    );
    d.wait_for_service(&mut blocking, "10.233.3.1:7000");
    d.wait_for_service(&mut asyncio, "10.233.3.2:7001");
    d.wait_for_service(&mut selectors, "10.233.3.3:7002");
    let (t1, t2, t3) = ("10.233.3.1:7000", "10.233.3.2:7001", "10.233.3.3:7002");
    let mut clients = [
        d.spawn(
            &nat,
            &sc.py(
                "holding_client",
                HOLDING_CLIENT,
                &["10.233.3.1", "7000", stop],
            ),
        ),
        d.spawn(
            &nat,
            &sc.py(
                "holding_client",
                HOLDING_CLIENT,
                &["10.233.3.2", "7001", stop],
            ),
        ),
        d.spawn(
            &nat,
            &sc.py("connect_loop", CONNECT_LOOP, &[stop, "2", t1, t2, t3]),
        ),
        d.spawn(
            &nat,
            &sc.py("connect_loop", CONNECT_LOOP, &[stop, "2", t3, t2, t1]),
        ),
    ];
    for c in clients.iter_mut() {
        wait_progress(c, 0, SHORT);
    }
    let apps_before = sorted_identities(&d.apps());
    let mut outages = Vec::new();
    for _ in 0..kills {
        sleep(rng.ms(50, 400));
        let t = Instant::now();
        d.kill_hard();
        sleep(rng.ms(0, 100));
        d.restart();
        outages.push(t.elapsed());
        // Traffic goes on before the next kill.
        for c in clients.iter_mut().skip(2) {
            let now = progress(&c.stdout());
            wait_progress(c, now, Duration::from_secs(10));
        }
    }
    sleep(Duration::from_millis(500));
    let mut problems = Vec::new();
    let apps_after = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let a = sorted_identities(&d.apps());
        (a == apps_before).then_some(a)
    });
    if apps_after.is_none() {
        problems.push(format!(
            "registry not whole: before {apps_before:#?} after {:#?}",
            sorted_identities(&d.apps())
        ));
    }
    fs::write(stop, "").expect("write stop file");
    let mut figures = Vec::new();
    for c in clients.iter_mut() {
        let st = c.wait(SHORT);
        let summary = last_json(&c.stdout()).unwrap_or(Value::Null);
        if !st.success() || summary["errors"] != serde_json::json!([]) {
            problems.push(format!("client: {summary}"));
        }
        figures.push(summary);
    }
    for srv in [&mut blocking, &mut asyncio, &mut selectors] {
        let out = srv.stdout();
        for l in out.lines().filter(|l| l.starts_with("ERROR")) {
            problems.push(format!("server: {l}"));
        }
        if srv.try_status().is_some() {
            problems.push(format!("server died: {}", srv.report()));
        }
    }
    let longest = outages.iter().max().copied().unwrap_or_default();
    note(&format!(
        "{}: {kills} SIGKILLs of the daemon (longest outage {longest:?}); clients: {}; \
         problems: {}",
        ax_e2e::test_name(),
        figures
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        problems.len()
    ));
    assert!(
        problems.is_empty(),
        "{} problem(s) across {kills} daemon kills:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ---------------------------------------------------------------- 2. targets dying

/// Forks a child per connection; the child asks for its peer's name (a
/// trapped call) and echoes lines: `python3 FORKING_SERVER HOST PORT`.
const FORKING_SERVER: &str = r#"
import os, signal, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(128)
print("LISTENING", os.getpid(), flush=True)
while True:
    c, _ = srv.accept()
    if os.fork() == 0:
        try:
            srv.close()
            c.getpeername()
            for line in c.makefile("rb"):
                c.sendall(b"echo:" + line)
        finally:
            os._exit(0)
    c.close()
"#;

/// Listens with the smallest backlog and never accepts: once its queue is
/// full, connects to it wait (in the broker).
const NEVER_ACCEPTS: &str = r#"
import os, socket, sys, time
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(0)
print("LISTENING", os.getpid(), flush=True)
while True:
    time.sleep(60)
"#;

/// The victim: threads blocked in `accept` on its own listener, threads
/// connecting in tight loops to an echo server and to the forking server,
/// threads stuck connecting to a full backlog. It never ends by itself:
/// the test kills it (SIGKILL) at a random moment.
/// `python3 VICTIM ECHO FORKING FULL` (each HOST:PORT).
const VICTIM: &str = r#"
import os, socket, sys, threading, time
def addr(a):
    h, p = a.rsplit(":", 1)
    return (h, int(p))
echo, forking, full = (addr(a) for a in sys.argv[1:4])
lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lst.bind(("0.0.0.0", 0))
lst.listen(8)
def acceptor():
    while True:
        c, _ = lst.accept()
        c.close()
def connector(t):
    while True:
        try:
            with socket.create_connection(t, timeout=5) as c:
                c.sendall(b"x\n")
                c.recv(64)
        except OSError:
            time.sleep(0.001)
def hanger():
    while True:
        try:
            socket.create_connection(full, timeout=30).close()
        except OSError:
            pass
threads = [threading.Thread(target=acceptor, daemon=True) for _ in range(3)]
threads += [threading.Thread(target=connector, args=(echo,), daemon=True) for _ in range(4)]
threads += [threading.Thread(target=connector, args=(forking,), daemon=True) for _ in range(3)]
threads += [threading.Thread(target=hanger, daemon=True) for _ in range(3)]
for t in threads:
    t.start()
print("READY", os.getpid(), flush=True)
time.sleep(120)
"#;

/// Creates and destroys threads in a loop, each making one connect and
/// echo, 4 at a time, until the file STOP exists or TOTAL threads ran:
/// `python3 THREAD_CHURN STOP TOTAL HOST:PORT`.
const THREAD_CHURN: &str = r#"
import json, os, socket, sys, threading
stop, total = sys.argv[1], int(sys.argv[2])
h, p = sys.argv[3].rsplit(":", 1)
state = {"n": 0, "errors": []}
def one():
    try:
        with socket.create_connection((h, int(p)), timeout=20) as c:
            c.sendall(b"churn\n")
            if c.makefile("rb").readline() != b"echo:churn\n":
                raise OSError("bad answer")
        state["n"] += 1
    except OSError as e:
        state["errors"].append(str(e))
threads = 0
while threads < total and not os.path.exists(stop):
    ts = [threading.Thread(target=one) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    threads += 4
    print("P", threads, flush=True)
print(json.dumps({"threads": threads, "connects": state["n"], "errors": state["errors"][:20]}), flush=True)
sys.exit(1 if state["errors"] else 0)
"#;

/// How many threads of `pid` wait in a trapped call right now.
fn threads_in_trapped_calls(pid: u32) -> usize {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            fs::read_to_string(t.path().join("wchan"))
                .is_ok_and(|w| w.contains("seccomp_do_user_notif"))
        })
        .count()
}

/// The daemon's fds and memory, measured.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    rss_kib: u64,
    threads: u64,
}

fn usage(d: &Daemon) -> Usage {
    Usage {
        fds: d.fd_count().saturating_sub(tcp_listeners_of(d.pid())),
        rss_kib: d.rss_kib(),
        threads: d.status_field("Threads"),
    }
}

/// How many of `pid`'s fds are listening TCP sockets: the daemon's
/// listeners on the host's loopback for wildcard services, which it opens
/// within a second of a bind and keeps while the service lives (and retries
/// each second for a port another app holds). They are not per-call state,
/// so fd counts leave them out.
fn tcp_listeners_of(pid: u32) -> usize {
    let listening: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    (cols.len() > 9 && cols[3] == "0A").then(|| cols[9].to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .filter(|ino| listening.contains(ino))
        .count()
}

/// RSS the daemon may keep above its baseline after a storm: glibc keeps
/// freed memory in per-thread arenas (the broker runs a thread per app and
/// a pool of helper threads, whose arenas are not returned to the system
/// at once), so a small, bounded growth is allocator retention, not a leak.
/// A leak of even a few hundred bytes per call or per app would exceed it
/// after the tens of thousands of calls the tests make.
fn rss_allowance(baseline_kib: u64) -> u64 {
    (baseline_kib / 4).max(8 * 1024)
}

/// Waits (up to 15 s: sessions are reaped every second, idle helper threads
/// exit on their own, and the spare socket pool refills within a second of
/// its last take) for the daemon's fd count to come back to `base.fds`,
/// from above or from below; returns the last measurement.
fn settle(d: &Daemon, base: Usage) -> Usage {
    let mut last = usage(d);
    let _ = poll(Duration::from_secs(15), Duration::from_millis(100), || {
        last = usage(d);
        (last.fds == base.fds).then_some(())
    });
    last
}

/// The daemon's usage once its fd count held still for three samples in a
/// row, 100 ms apart (at most 15 s, then the last sample): a baseline read
/// while a sweep has a `/proc` file open, or while the spare socket pool
/// is being topped up, would be off by the fds of that moment.
fn steady_usage(d: &Daemon) -> Usage {
    let mut last = usage(d);
    let mut same = 0;
    let _ = poll(Duration::from_secs(15), Duration::from_millis(100), || {
        let now = usage(d);
        same = if now.fds == last.fds { same + 1 } else { 0 };
        last = now;
        (same >= 2).then_some(())
    });
    BASELINE_LINKS.with(|l| *l.borrow_mut() = d.fd_links());
    last
}

std::thread_local! {
    /// The daemon's fds when this test's baseline was taken, to show what
    /// differs if the count does not come back (each test runs on a thread
    /// of its own).
    static BASELINE_LINKS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The fds in `now` and not in the baseline's list, and the other way.
fn links_changed(now: &[String]) -> String {
    BASELINE_LINKS.with(|base| {
        let base = base.borrow();
        let added: Vec<&String> = now.iter().filter(|l| !base.contains(l)).collect();
        let gone: Vec<&String> = base.iter().filter(|l| !now.contains(l)).collect();
        format!("since the baseline: added {added:?}, gone {gone:?}")
    })
}

fn assert_back_to_baseline(d: &Daemon, what: &str, base: Usage, after: Usage) {
    let allowance = rss_allowance(base.rss_kib);
    if after.fds != base.fds {
        // For the report: a slow release, or a leak for good?
        let links = d.fd_links();
        let changed = links_changed(&links);
        let t = Instant::now();
        let back = poll(Duration::from_secs(75), Duration::from_millis(250), || {
            (usage(d).fds == base.fds).then(|| t.elapsed())
        });
        panic!(
            "{what}: the daemon's fd count did not come back to its baseline within 15 s: {} → {} \
             (RSS {} → {} KiB, threads {} → {}); {}; {changed}; its fds were:\n{}",
            base.fds,
            after.fds,
            base.rss_kib,
            after.rss_kib,
            base.threads,
            after.threads,
            match back {
                Some(dt) => format!("it came back {dt:?} later"),
                None => format!("{} fds 75 s later", usage(d).fds),
            },
            links.join("\n")
        );
    }
    note(&format!(
        "{}: {what}: daemon fds {} → {}, RSS {} KiB → {} KiB (allowed +{} KiB), threads {} → {}",
        ax_e2e::test_name(),
        base.fds,
        after.fds,
        base.rss_kib,
        after.rss_kib,
        allowance,
        base.threads,
        after.threads
    ));
    // fds: exactly the baseline. Every fd the daemon holds for an app (its
    // notify fd, journal, pidfds, copies of its sockets) must go with the
    // app; the apps alive at the baseline are alive now, with the same
    // sockets.
    assert!(
        after.rss_kib <= base.rss_kib + allowance,
        "{what}: the daemon's RSS grew from {} KiB to {} KiB (more than +{allowance} KiB)",
        base.rss_kib,
        after.rss_kib
    );
}

/// Programs killed with SIGKILL in the middle of trapped calls (accepts,
/// connects, connects waiting for room in a full backlog), a program that
/// creates and destroys threads while connecting, and a fork storm (a
/// server forking a child per connection, the children making trapped
/// calls), all at once: the daemon keeps serving, the registry has no
/// leftovers, and its fds and memory come back to their baseline.
#[test]
fn targets_dying() {
    require!("python3");
    let rounds = env_count("AX_E2E_ROUNDS", 30);
    let mut rng = Rng::from_env();
    let d = Daemon::start();
    let sc = Scripts::new();
    let stop = sc.path("stop");
    let stop = stop.as_str();
    let (echo, forking, full) = ("10.233.4.1:7000", "10.233.4.2:7001", "10.233.4.3:7002");
    // Long-lived: in the baseline and still there at the end.
    let mut servers = [
        d.spawn(
            &["--ip", "10.233.4.1"],
            &sc.py(
                "threaded_server",
                THREADED_ECHO_SERVER,
                &["0.0.0.0", "7000"],
            ),
        ),
        d.spawn(
            &["--ip", "10.233.4.3"],
            &sc.py("never_accepts", NEVER_ACCEPTS, &["0.0.0.0", "7002"]),
        ),
    ];
    for (srv, addr) in servers.iter_mut().zip([echo, full]) {
        d.wait_for_service(srv, addr);
    }
    let victim =
        |d: &Daemon, forking: &str| d.spawn(&[], &sc.py("victim", VICTIM, &[echo, forking, full]));
    // Kills a victim's program at a random moment; returns how many of its
    // threads were inside trapped calls just before.
    let kill_victim = |v: &mut App, rng: &mut Rng| -> usize {
        // "READY PID\n" may arrive in pieces: wait for the whole line.
        let pid: u32 = poll(SHORT, Duration::from_millis(5), || {
            let out = v.stdout();
            let start = out.find("READY ")? + "READY ".len();
            let end = start + out[start..].find('\n')?;
            out[start..end].trim().parse().ok()
        })
        .expect("victim pid");
        sleep(rng.ms(20, 300));
        let trapped = threads_in_trapped_calls(pid);
        ax_e2e::signal_pid(pid, Signal::KILL).expect("kill the victim");
        let st = v.wait(SHORT);
        assert_eq!(
            st.code(),
            Some(137),
            "the launcher reports SIGKILL: {}",
            v.report()
        );
        trapped
    };

    // Warm-up: one of everything, so that what the daemon allocates once
    // (helper threads, buffers) is in the baseline.
    let mut v = victim(&d, echo);
    kill_victim(&mut v, &mut rng);
    let warm = d.run(
        &[],
        &sc.py("thread_churn", THREAD_CHURN, &[stop, "40", echo]),
    );
    warm.assert_success();
    sleep(Duration::from_millis(2500));
    let apps_base = sorted_identities(&d.apps());
    let services_base = sorted_services(&d.services());
    assert_eq!(apps_base.len(), 2, "apps at the baseline: {apps_base:#?}");
    let base = steady_usage(&d);

    // The storm: thread churn and a fork storm run throughout, while
    // victims are started and killed, two at a time.
    let mut forking_server = d.spawn(
        &["--ip", "10.233.4.2"],
        &sc.py("forking_server", FORKING_SERVER, &["0.0.0.0", "7001"]),
    );
    d.wait_for_service(&mut forking_server, forking);
    let mut churn = d.spawn(
        &[],
        &sc.py("thread_churn", THREAD_CHURN, &[stop, "100000", echo]),
    );
    let mut storm = d.spawn(
        &[],
        &sc.py("connect_loop", CONNECT_LOOP, &[stop, "4", forking]),
    );
    let t0 = Instant::now();
    let mut trapped_at_kill = 0;
    for _ in 0..rounds {
        let mut a = victim(&d, forking);
        let mut b = victim(&d, forking);
        trapped_at_kill += kill_victim(&mut a, &mut rng);
        trapped_at_kill += kill_victim(&mut b, &mut rng);
    }
    fs::write(stop, "").expect("write stop file");
    let mut figures = Vec::new();
    for app in [&mut churn, &mut storm] {
        let st = app.wait(SHORT);
        let summary = last_json(&app.stdout()).unwrap_or(Value::Null);
        assert!(
            st.success() && summary["errors"] == serde_json::json!([]),
            "errors while victims died around it: {summary}\n{}",
            app.report()
        );
        figures.push(summary);
    }
    let storm_secs = t0.elapsed();

    // The daemon still serves, and has nothing left of the dead.
    let out = d.run(
        &[],
        &sc.py("connect_once", CONNECT_LOOP_ONCE, &[echo, forking]),
    );
    out.assert_success();
    assert_eq!(out.stdout.trim(), "echo:once echo:once", "{out}");
    assert!(
        forking_server.try_status().is_none(),
        "{}",
        forking_server.report()
    );
    forking_server.kill();
    let clean = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let a = sorted_identities(&d.apps());
        let s = sorted_services(&d.services());
        (a == apps_base && s == services_base).then_some(())
    });
    assert!(
        clean.is_some(),
        "leftovers in the registry: apps {:#?}\nservices {:#?}\n(baseline apps {apps_base:#?} services {services_base:#?})",
        sorted_identities(&d.apps()),
        sorted_services(&d.services())
    );
    let after = settle(&d, base);
    note(&format!(
        "{}: {} victims killed with SIGKILL ({trapped_at_kill} of their threads were in trapped \
         calls at the kill), thread churn {}, fork storm {} in {storm_secs:?}",
        ax_e2e::test_name(),
        rounds * 2,
        figures[0],
        figures[1]
    ));
    assert_back_to_baseline(&d, "after the storm", base, after);
    for srv in servers.iter_mut() {
        assert!(
            srv.try_status().is_none(),
            "a server died: {}",
            srv.report()
        );
    }
}

/// A long-lived server forking a child per connection, each child making a
/// trapped call (`getpeername`): thousands of short-lived processes in one
/// app that stays. The daemon may keep nothing per dead child: its fds come
/// back to the baseline taken with the server already running.
#[test]
fn fork_storm_against_a_long_lived_server() {
    require!("python3");
    let d = Daemon::start();
    let sc = Scripts::new();
    let stop = sc.path("stop");
    let stop = stop.as_str();
    let forking = "10.233.4.12:7001";
    let mut server = d.spawn(
        &["--ip", "10.233.4.12"],
        &sc.py("forking_server", FORKING_SERVER, &["0.0.0.0", "7001"]),
    );
    d.wait_for_service(&mut server, forking);
    let warm = d.run(
        &[],
        &sc.py("thread_churn", THREAD_CHURN, &[stop, "40", forking]),
    );
    warm.assert_success();
    sleep(Duration::from_millis(2500));
    let base = steady_usage(&d);
    let t0 = Instant::now();
    let mut storm = d.spawn(
        &[],
        &sc.py("connect_loop", CONNECT_LOOP, &[stop, "4", forking]),
    );
    // Fewer than the broker's pidfd cache holds (1024), so that a cache
    // that keeps the pidfds of exited processes shows as a leak rather
    // than being emptied by its own limit.
    wait_progress(&mut storm, 500, Duration::from_secs(120));
    fs::write(stop, "").expect("write stop file");
    let st = storm.wait(SHORT);
    let summary = last_json(&storm.stdout()).unwrap_or(Value::Null);
    assert!(
        st.success() && summary["errors"] == serde_json::json!([]),
        "{summary}\n{}",
        storm.report()
    );
    note(&format!(
        "{}: fork storm: {summary} in {:?} (a child process per connection)",
        ax_e2e::test_name(),
        t0.elapsed()
    ));
    assert!(server.try_status().is_none(), "{}", server.report());
    let after = settle(&d, base);
    assert_back_to_baseline(&d, "after the fork storm", base, after);
}

// ---------------------------------------------------------------- 3. load

/// An epoll server: accepts until `EAGAIN`, reads one byte from each
/// connection, answers one byte and closes. `load_server HOST PORT`.
const LOAD_SERVER_C: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) { perror("bind/listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    printf("LISTENING %d\n", getpid());
    fflush(stdout);
    unsigned long served = 0, errors = 0;
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                for (;;) {
                    int c = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) {
                        if (errno != EAGAIN && errno != EINTR) { errors++; fprintf(stderr, "accept: %m\n"); }
                        if (errno == EINTR) continue;
                        break;
                    }
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce)) { errors++; close(c); }
                }
            } else {
                char b;
                ssize_t r = read(fd, &b, 1);
                if (r == 1) {
                    if (write(fd, "k", 1) != 1) errors++;
                    served++;
                } else if (r < 0 && errno == EAGAIN) {
                    continue;
                }
                close(fd);
            }
        }
    }
}
"#;

/// `load_client HOST PORT THREADS CONNECTS`: each thread connects CONNECTS
/// times (blocking connect, one byte each way, close); prints one JSON line
/// with the counts and the first errors.
const LOAD_CLIENT_C: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in dst;
static int connects;
static unsigned long ok, failed;
static char first[512];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *what, int e) {
    pthread_mutex_lock(&mu);
    failed++;
    if (strlen(first) < 300) {
        char b[128];
        snprintf(b, sizeof b, "%s%s: %s", first[0] ? "; " : "", what, strerror(e));
        strcat(first, b);
    }
    pthread_mutex_unlock(&mu);
}

static void *run(void *arg) {
    (void)arg;
    unsigned long mine = 0;
    for (int i = 0; i < connects; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) { fail("socket", errno); continue; }
        if (connect(s, (struct sockaddr *)&dst, sizeof dst)) { fail("connect", errno); close(s); continue; }
        char b = 'x';
        if (write(s, &b, 1) != 1) { fail("write", errno); close(s); continue; }
        ssize_t r = read(s, &b, 1);
        if (r != 1 || b != 'k') { fail(r == 0 ? "read (EOF)" : "read", r == 0 ? EPIPE : errno); close(s); continue; }
        close(s);
        mine++;
    }
    pthread_mutex_lock(&mu);
    ok += mine;
    pthread_mutex_unlock(&mu);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    dst.sin_family = AF_INET;
    dst.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    int threads = atoi(argv[3]);
    connects = atoi(argv[4]);
    pthread_t t[256];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, run, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("{\"ok\": %lu, \"failed\": %lu, \"secs\": %.3f, \"first_errors\": \"%s\"}\n", ok, failed, secs, first);
    return failed ? 1 : 0;
}
"#;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// 16 apps × 8 threads × 2,000 connects (the issue's figures; override with
/// `AX_E2E_LOAD_APPS`, `AX_E2E_LOAD_THREADS`, `AX_E2E_LOAD_CONNECTS`) to 4
/// epoll servers on VIPs, all at once: not one failed connect, and the
/// daemon's fds and memory back at their baseline afterwards.
#[test]
fn load_16_apps_8_threads() {
    require!("cc");
    let apps = env_count("AX_E2E_LOAD_APPS", 16);
    let threads = env_count("AX_E2E_LOAD_THREADS", 8);
    let connects = env_count("AX_E2E_LOAD_CONNECTS", 2000);
    let dir = TempDir::new("load");
    let server = compile_c(&dir, "load_server", LOAD_SERVER_C, &[]);
    let client = compile_c(&dir, "load_client", LOAD_CLIENT_C, &["-pthread"]);
    // Per-connect logging at debug level would be the bottleneck.
    let d = Daemon::start_with_env(&[("RUST_LOG", "info")]);
    let vips = ["10.233.5.1", "10.233.5.2", "10.233.5.3", "10.233.5.4"];
    let mut servers: Vec<App> = vips
        .iter()
        .map(|vip| d.spawn(&["--ip", vip], &[server.as_str(), "0.0.0.0", "7000"]))
        .collect();
    for (srv, vip) in servers.iter_mut().zip(vips) {
        d.wait_for_service(srv, &format!("{vip}:7000"));
    }
    // Warm-up: one short client per server.
    for vip in vips {
        let out = d.run(&[], &[client.as_str(), vip, "7000", "2", "50"]);
        out.assert_success();
    }
    sleep(Duration::from_millis(1500));
    let base = steady_usage(&d);
    let services_base = sorted_services(&d.services());

    let t0 = Instant::now();
    let (threads_s, connects_s) = (threads.to_string(), connects.to_string());
    let mut clients: Vec<App> = (0..apps)
        .map(|i| {
            d.spawn(
                &[],
                &[
                    client.as_str(),
                    vips[i % vips.len()],
                    "7000",
                    &threads_s,
                    &connects_s,
                ],
            )
        })
        .collect();
    let limit = Duration::from_secs(600);
    let mut ok = 0u64;
    let mut failed = 0u64;
    let mut errors = Vec::new();
    for c in clients.iter_mut() {
        let left = limit
            .saturating_sub(t0.elapsed())
            .max(Duration::from_secs(1));
        let st = c.wait(left);
        let r = last_json(&c.stdout()).unwrap_or(Value::Null);
        ok += r["ok"].as_u64().unwrap_or(0);
        failed += r["failed"].as_u64().unwrap_or(0);
        if !st.success() || r.is_null() {
            errors.push(format!("{r} {}", c.report()));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = (apps * threads * connects) as u64;
    note(&format!(
        "{}: {apps} apps × {threads} threads × {connects} connects = {total}: {ok} succeeded, \
         {failed} failed, in {secs:.1} s ({:.0} connects/s)",
        ax_e2e::test_name(),
        ok as f64 / secs
    ));
    assert!(
        errors.is_empty() && failed == 0 && ok == total,
        "{failed} failed connects, {ok} of {total} succeeded:\n{}",
        errors.join("\n")
    );
    for srv in servers.iter_mut() {
        assert!(
            srv.try_status().is_none(),
            "a server died: {}",
            srv.report()
        );
    }
    let clean = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        (d.apps().len() == vips.len() && sorted_services(&d.services()) == services_base)
            .then_some(())
    });
    assert!(clean.is_some(), "leftovers: apps {:?}", d.apps());
    let after = settle(&d, base);
    assert_back_to_baseline(&d, "after the load", base, after);
}

/// The port of the rest test's servers: one no other test of this file
/// uses, as the tests run side by side in one network namespace, and a
/// wildcard service's host loopback port goes to the first daemon to ask.
const REST_PORT: &str = "7390";

/// A daemon at rest holds the same sockets second after second. The host
/// loopback watch checks each wildcard service's listener every second
/// with a probe bind; that probe once took a spare socket each time, so
/// the spare pool ran a few short and was topped up again every second:
/// the daemon's fd count then depended on when it was read (which made
/// the load test's baseline flaky) and the socket factory was asked for
/// sockets every second by an idle daemon.
#[test]
fn a_daemon_at_rest_holds_the_same_sockets() {
    require!("cc");
    let dir = TempDir::new("rest");
    let server = compile_c(&dir, "load_server", LOAD_SERVER_C, &[]);
    let d = Daemon::start();
    let vips = ["10.233.5.11", "10.233.5.12", "10.233.5.13", "10.233.5.14"];
    let mut servers: Vec<App> = vips
        .iter()
        .map(|vip| d.spawn(&["--ip", vip], &[server.as_str(), "0.0.0.0", REST_PORT]))
        .collect();
    for (srv, vip) in servers.iter_mut().zip(vips) {
        d.wait_for_service(srv, &format!("{vip}:{REST_PORT}"));
    }
    // The watch has run once the first service is on host loopback.
    let on_loopback = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        (tcp_listeners_of(d.pid()) == 1).then_some(())
    });
    assert!(on_loopback.is_some(), "no host loopback listener");
    let sockets = || -> Vec<String> {
        d.fd_links()
            .into_iter()
            .filter(|l| l.contains("socket:"))
            .collect()
    };
    // Three seconds (three rounds of the watch) without a change, within
    // ten: the pool may still be topping up after the servers' binds.
    let window = Duration::from_secs(3);
    let mut last = sockets();
    let mut since = Instant::now();
    let mut changes = Vec::new();
    let quiet = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let now = sockets();
        if now != last {
            let added: Vec<&String> = now.iter().filter(|l| !last.contains(l)).collect();
            let gone: Vec<&String> = last.iter().filter(|l| !now.contains(l)).collect();
            changes.push(format!("+{added:?} -{gone:?}"));
            last = now;
            since = Instant::now();
        }
        (since.elapsed() >= window).then_some(())
    });
    assert!(
        quiet.is_some(),
        "the daemon's sockets changed at rest {} times in 10 s; the last changes: {:?}",
        changes.len(),
        changes.iter().rev().take(3).collect::<Vec<_>>()
    );
    for srv in servers.iter_mut() {
        assert!(
            srv.try_status().is_none(),
            "a server died: {}",
            srv.report()
        );
    }
}

// ---------------------------------------------------------------- 4. Go

/// `goload server ADDR` serves one byte for one byte; `goload client ADDR
/// GOROUTINES CONNECTS SPINNERS` makes GOROUTINES × CONNECTS connects while
/// SPINNERS goroutines spin without function calls, so that the runtime
/// must preempt them asynchronously with SIGURG; it counts the SIGURGs it
/// sees (signal.Notify) and prints one JSON line.
const GO_PROGRAM: &str = r#"
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func serve(addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Println("LISTENING", os.Getpid())
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "accept:", err)
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			b := make([]byte, 1)
			if _, err := c.Read(b); err == nil {
				c.Write([]byte("k"))
			}
		}(c)
	}
}

var sink uint64

func spin(stop *int32) {
	x := uint64(1)
	for atomic.LoadInt32(stop) == 0 {
		for i := 0; i < 1000000; i++ {
			x = x*6364136223846793005 + 1442695040888963407
		}
	}
	atomic.AddUint64(&sink, x)
}

func client(addr string, goroutines, connects, spinners int) {
	urg := make(chan os.Signal, 4096)
	signal.Notify(urg, syscall.SIGURG)
	var sigurg int64
	go func() {
		for range urg {
			atomic.AddInt64(&sigurg, 1)
		}
	}()
	var stop int32
	for i := 0; i < spinners; i++ {
		go spin(&stop)
	}
	var ok, failed int64
	var mu sync.Mutex
	var errs []string
	var wg sync.WaitGroup
	start := time.Now()
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, 1)
			for i := 0; i < connects; i++ {
				c, err := net.DialTimeout("tcp", addr, 20*time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(20 * time.Second))
					if _, err = c.Write([]byte("x")); err == nil {
						_, err = c.Read(b)
					}
					c.Close()
				}
				if err != nil {
					atomic.AddInt64(&failed, 1)
					mu.Lock()
					if len(errs) < 10 {
						errs = append(errs, err.Error())
					}
					mu.Unlock()
					continue
				}
				atomic.AddInt64(&ok, 1)
			}
		}()
	}
	wg.Wait()
	atomic.StoreInt32(&stop, 1)
	secs := time.Since(start).Seconds()
	time.Sleep(50 * time.Millisecond)
	out, _ := json.Marshal(map[string]interface{}{
		"ok": ok, "failed": failed, "errors": errs, "secs": secs,
		"sigurg": atomic.LoadInt64(&sigurg),
	})
	fmt.Println(string(out))
	if failed > 0 {
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) >= 3 && os.Args[1] == "server" {
		serve(os.Args[2])
		return
	}
	if len(os.Args) == 6 && os.Args[1] == "client" {
		n := func(s string) int { v, _ := strconv.Atoi(s); return v }
		client(os.Args[2], n(os.Args[3]), n(os.Args[4]), n(os.Args[5]))
		return
	}
	fmt.Fprintln(os.Stderr, "usage: goload server ADDR | client ADDR GOROUTINES CONNECTS SPINNERS")
	os.Exit(2)
}
"#;

#[test]
fn go_client_under_preemption() {
    require!("go");
    let dir = TempDir::new("go");
    let t = Instant::now();
    let bin = ax_e2e::build_go(&dir, GO_PROGRAM);
    let build = t.elapsed();
    assert!(
        ax_e2e::elf_is_static(Path::new(&bin)).unwrap_or(false),
        "the Go program should be static"
    );
    let d = Daemon::start();
    let mut server = d.spawn(&["--ip", "10.233.6.1"], &[bin.as_str(), "server", ":7000"]);
    d.wait_for_service(&mut server, "10.233.6.1:7000");
    let (goroutines, connects, spinners) = (
        env_count("AX_E2E_GO_GOROUTINES", 64),
        env_count("AX_E2E_GO_CONNECTS", 200),
        4,
    );
    let t = Instant::now();
    let mut c = d.spawn(
        &[],
        &[
            bin.as_str(),
            "client",
            "10.233.6.1:7000",
            &goroutines.to_string(),
            &connects.to_string(),
            &spinners.to_string(),
        ],
    );
    // No hang: bounded.
    let st = c.wait(Duration::from_secs(180));
    let r = last_json(&c.stdout()).unwrap_or_else(|| panic!("no result: {}", c.report()));
    note(&format!(
        "{}: Go ({}; built in {build:?}): {} connects ok, {} failed, in {:.1} s (run {:?}); \
         SIGURG seen by the program: {}",
        ax_e2e::test_name(),
        fs::read_to_string("/usr/lib/go/VERSION")
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("go"),
        r["ok"],
        r["failed"],
        r["secs"].as_f64().unwrap_or(0.0),
        t.elapsed(),
        r["sigurg"]
    ));
    assert!(st.success(), "{}", c.report());
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(
        r["ok"].as_u64(),
        Some((goroutines * connects) as u64),
        "{r}"
    );
    assert!(
        r["sigurg"].as_u64().unwrap_or(0) > 0,
        "no SIGURG: the runtime did not preempt anything, the test proves nothing: {r}"
    );
    assert!(server.try_status().is_none(), "{}", server.report());
}

// ---------------------------------------------------------------- 5. nobody gets in

/// The user the suite runs as, and a second unprivileged user
/// (`scripts/test.sh` creates both).
const USER_A: &str = "axtest";
const USER_B: &str = "axtest2";

/// `uid` of `user` from /etc/passwd.
fn uid_of(user: &str) -> Option<u32> {
    fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&user)).then(|| f.get(2)?.parse().ok())?
        })
}

/// `setpriv` to `user` (uid, gid, groups), then `argv`, with a clean
/// environment apart from PATH.
fn as_user<S: AsRef<std::ffi::OsStr>>(user: &str, argv: &[S]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", "/tmp")
        .env("RUST_LOG", "info");
    c
}

/// A python3 every user can run (the suite's PATH may start in /root).
fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// As a raw client: connects to the socket and sends one frame carrying an
/// fd (`SCM_RIGHTS`, its stdin), as a launcher hands over a notify fd;
/// prints `CONNECT-ERROR …` or `ANSWER …` with what came back.
const RAW_HANDOVER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-ERROR", e, flush=True)
    sys.exit(0)
# Request::AttachListener { app: 1, pid: <ours> }: version 1, variant 2.
body = bytes([1, 2, 1]) + bytes([os.getpid() & 0x7f])
frame = len(body).to_bytes(4, "big") + body
try:
    s.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, (0).to_bytes(4, "little"))])
except OSError as e:
    print("SEND-ERROR", e, flush=True)
data = b""
while True:
    try:
        chunk = s.recv(4096)
    except OSError as e:
        print("RECV-ERROR", e, flush=True)
        break
    if not chunk:
        break
    data += chunk
print("ANSWER", data[4:].decode("utf-8", "replace"), flush=True)
"#;

/// The control socket serves its own uid and root only. A daemon runs as
/// `axtest`; `axtest2` tries to list, to register (`ax exec`) and to hand
/// over an fd: first with the daemon's own permissions (the socket is
/// 0600 in a 0700 directory: the kernel refuses), then with the socket
/// made reachable (0666, through a symlink in a root-owned directory, so
/// that the daemon's `SO_PEERCRED` check is what refuses). Needs root to
/// switch users; in the unprivileged pass it prints SKIP.
#[test]
fn control_socket_serves_only_its_uid_and_root() {
    require!("setpriv");
    if euid() != 0 {
        note(&format!(
            "SKIP: {}: needs root to run as two users (it runs in the root pass)",
            ax_e2e::test_name()
        ));
        return;
    }
    let (Some(uid_a), Some(uid_b)) = (uid_of(USER_A), uid_of(USER_B)) else {
        let msg = format!(
            "{}: users {USER_A} and {USER_B} are needed (scripts/test.sh creates them)",
            ax_e2e::test_name()
        );
        if ax_e2e::strict() {
            panic!("cannot run (AX_E2E_STRICT=1): {msg}");
        }
        note(&format!("SKIP: {msg}"));
        return;
    };
    use std::os::unix::fs::{symlink, PermissionsExt};
    let chmod = |p: &Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
    };
    let chown = |p: &Path, uid: u32| {
        std::os::unix::fs::chown(p, Some(uid), None)
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()))
    };
    // base (root, 0755) holds a copy of ax every user can run, the
    // daemon's directory (axtest, 0700) and later a public directory.
    let base = TempDir::new("uid");
    chmod(base.path(), 0o755);
    let ax = base.join("ax");
    ax_e2e::copy_executable(&ax_e2e::ax_bin(), &ax);
    let ax = p(&ax).to_string();
    let own = base.join("a");
    fs::create_dir(&own).expect("mkdir");
    chown(&own, uid_a);
    chmod(&own, 0o700);
    let sock = own.join("ax.sock");
    let sock_s = p(&sock).to_string();
    let marker = base.join("ran");
    let touch = format!("touch {}", p(&marker));

    let mut daemon = App::spawn(as_user(
        USER_A,
        &[ax.as_str(), "daemon", "--socket", &sock_s],
    ));
    let up = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        std::os::unix::net::UnixStream::connect(&sock).ok()
    });
    assert!(
        up.is_some(),
        "the daemon of {USER_A} did not start: {}",
        daemon.report()
    );
    // axtest's own app, which nobody else may see or touch.
    let mut owned = App::spawn(as_user(
        USER_A,
        &[
            ax.as_str(),
            "exec",
            "--socket",
            &sock_s,
            "--ip",
            "10.233.7.1",
            "--",
            "sleep",
            "60",
        ],
    ));
    let get_as = |user: &str, socket: &str| {
        run(
            &mut as_user(
                user,
                &[ax.as_str(), "get", "apps", "-o", "json", "--socket", socket],
            ),
            SHORT,
        )
    };
    let listed = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let out = get_as(USER_A, &sock_s);
        out.stdout.contains("10.233.7.1").then_some(out)
    });
    assert!(
        listed.is_some(),
        "{USER_A}'s app not listed: {}",
        owned.report()
    );
    // Root is served too.
    let out = run(
        Command::new(&ax).args(["get", "apps", "-o", "json", "--socket", &sock_s]),
        SHORT,
    );
    out.assert_success();
    assert!(out.stdout.contains("10.233.7.1"), "{out}");

    let refused = |what: &str, out: &ax_e2e::Output, code: i32| {
        assert_eq!(
            out.code(),
            Some(code),
            "{USER_B}: {what} should fail: {out}"
        );
        assert!(
            !out.stdout.contains("10.233.7.1"),
            "{USER_B}: {what} leaked the registry: {out}"
        );
        note(&format!(
            "{}: {USER_B} (uid {uid_b}) {what} → exit {code}: {}",
            ax_e2e::test_name(),
            out.stderr.trim()
        ));
    };
    let exec_as_b = |socket: &str| {
        run(
            &mut as_user(
                USER_B,
                &[
                    ax.as_str(),
                    "exec",
                    "--no-autostart",
                    "--socket",
                    socket,
                    "--",
                    "sh",
                    "-c",
                    &touch,
                ],
            ),
            SHORT,
        )
    };
    let handover_as_b = |socket: &str| {
        run(
            &mut as_user(USER_B, &[system_python(), "-c", RAW_HANDOVER, socket]),
            SHORT,
        )
    };

    // 1. With the daemon's own permissions the kernel refuses the connect.
    let out = get_as(USER_B, &sock_s);
    refused("ax get apps (socket 0600 in a 0700 directory)", &out, 1);
    assert!(
        out.stderr.to_lowercase().contains("permission denied"),
        "{out}"
    );
    let out = exec_as_b(&sock_s);
    refused("ax exec (socket 0600 in a 0700 directory)", &out, 125);
    assert!(
        out.stderr.to_lowercase().contains("permission denied")
            || out.stderr.contains(&format!("belongs to uid {uid_a}")),
        "{out}"
    );
    let out = handover_as_b(&sock_s);
    assert!(
        out.stdout.contains("CONNECT-ERROR") && out.stdout.contains("Permission denied"),
        "{USER_B} reached the socket: {out}"
    );

    // 2. The socket reachable by everyone: the daemon itself refuses.
    chmod(&own, 0o755);
    chmod(&sock, 0o666);
    let public = base.join("pub");
    fs::create_dir(&public).expect("mkdir");
    chmod(&public, 0o755);
    let link = public.join("ax.sock");
    symlink(&sock, &link).expect("symlink");
    let link_s = p(&link).to_string();
    let log_before = daemon
        .stderr()
        .matches("refusing a client of another user")
        .count();
    let out = get_as(USER_B, &sock_s);
    refused("ax get apps (socket 0666)", &out, 1);
    assert!(out.stderr.contains("permission denied"), "{out}");
    assert!(out.stderr.contains(&format!("serves uid {uid_a}")), "{out}");
    let out = exec_as_b(&link_s);
    refused(
        "ax exec (socket 0666, via a root-owned directory)",
        &out,
        125,
    );
    // The launcher refuses a daemon of another uid before sending anything
    // (issue 8); the daemon would refuse the launcher too.
    assert!(
        out.stderr.contains("permission denied")
            || out.stderr.contains(&format!("it runs as uid {uid_a}")),
        "{out}"
    );
    let out = handover_as_b(&link_s);
    assert!(
        out.stdout.contains("ANSWER") && out.stdout.contains("permission denied"),
        "{USER_B} handed over an fd without a refusal: {out}"
    );
    note(&format!(
        "{}: {USER_B} raw fd hand-over → {}",
        ax_e2e::test_name(),
        out.stdout.trim()
    ));
    assert!(!marker.exists(), "{USER_B}'s program ran");
    let refusals = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        let n = daemon
            .stderr()
            .matches("refusing a client of another user")
            .count();
        (n >= log_before + 3).then_some(n)
    });
    assert!(
        refusals.is_some(),
        "the daemon's log does not show the 3 refusals:\n{}",
        daemon.stderr()
    );
    assert!(
        daemon.stderr().contains(&format!("uid={uid_b}")),
        "the log does not name uid {uid_b}:\n{}",
        daemon.stderr()
    );
    // Nothing changed: axtest's app is the only one, still running.
    let out = get_as(USER_A, &sock_s);
    out.assert_success();
    let apps: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(apps.as_array().map(Vec::len), Some(1), "{apps}");
    assert!(owned.try_status().is_none(), "{}", owned.report());
    drop(owned);
    daemon.kill();
}

/// Binds VIP:port twice in one app — from the same process and from a
/// forked child — and prints the errno names as JSON, then serves.
const DOUBLE_BIND: &str = r#"
import errno, json, os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def bind():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        s.listen(8)
        return s, "OK"
    except OSError as e:
        s.close()
        return None, errno.errorcode.get(e.errno, str(e.errno))
first, r1 = bind()
_, r2 = bind()
rd, wr = os.pipe()
if os.fork() == 0:
    _, r3 = bind()
    os.write(wr, r3.encode())
    os._exit(0)
os.wait()
r3 = os.read(rd, 64).decode()
print(json.dumps({"first": r1, "again": r2, "again_from_child": r3}), flush=True)
while True:
    c, _ = first.accept()
    c.close()
"#;

/// An app cannot take a VIP:port another app holds, nor an `--ip` another
/// live app owns. (`e2e.rs`'s `bind_conflicts_and_foreign_vips` covers
/// binds on another app's VIP and wildcard/own-VIP overlaps; this adds
/// `--ip` ownership and a double bind of the same VIP:port within one app.)
#[test]
fn vip_and_port_ownership() {
    require!("python3");
    let d = Daemon::start();
    let sc = Scripts::new();
    let mut a = d.spawn(
        &["--ip", "10.233.8.1"],
        &sc.py("double_bind", DOUBLE_BIND, &["10.233.8.1", "7000"]),
    );
    d.wait_for_service(&mut a, "10.233.8.1:7000");
    let got = last_json(&a.wait_for_stdout("again", SHORT)).expect("json");
    assert_eq!(
        got,
        serde_json::json!({"first": "OK", "again": "EADDRINUSE", "again_from_child": "EADDRINUSE"}),
        "same app binding its VIP:port twice"
    );
    let owner = app_with_vip(&d.apps(), "10.233.8.1")["id"].clone();

    // Another app may not take the VIP…
    let marker = sc.path("ran");
    let out = d.run(
        &["--ip", "10.233.8.1"],
        &["sh", "-c", &format!("touch {marker}")],
    );
    assert_eq!(out.code(), Some(125), "{out}");
    assert!(
        out.stderr.contains("10.233.8.1") && out.stderr.contains(&format!("owned by app {owner}")),
        "the message should name the VIP and its owner (app {owner}): {out}"
    );
    assert!(!Path::new(&marker).exists(), "the program ran");
    // … nor bind it (not its VIP), on the held port or another.
    let out = d.run(
        &[],
        &sc.py(
            "double_bind_probe",
            BIND_PROBE_ONE,
            &["10.233.8.1", "7000", "7001"],
        ),
    );
    out.assert_success();
    assert_eq!(
        last_json(&out.stdout).expect("json"),
        serde_json::json!({"7000": "EADDRNOTAVAIL", "7001": "EADDRNOTAVAIL"}),
        "{out}"
    );
    // Once the owner is gone, the VIP is free again.
    a.kill();
    let free = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = d.run(&["--ip", "10.233.8.1"], &["true"]);
        out.status.success().then_some(())
    });
    assert!(free.is_some(), "the VIP stayed owned after its app ended");
}

/// Binds HOST:PORT for each PORT argument; prints `{port: errno name}`.
const BIND_PROBE_ONE: &str = r#"
import errno, json, socket, sys
host = sys.argv[1]
res = {}
for port in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, int(port)))
        res[port] = "OK"
    except OSError as e:
        res[port] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(res), flush=True)
"#;

/// 32-bit calls through `int 0x80` (socketcall and the direct i386 socket
/// calls, and io_uring_setup) and an x32 call, each printed as
/// `case result`; plus a plain 64-bit connect to the VIP as a control.
/// `int80 VIP PORT`.
const INT80_C: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static long i386(long nr, long a, long b, long c) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}

static void show(const char *name, long r) {
    if (r < 0) printf("%s %s\n", name, strerrorname_np(-r) ? strerrorname_np(-r) : "?");
    else printf("%s OK\n", name);
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    /* Memory a 32-bit call can address. */
    uint32_t *low = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (low == MAP_FAILED) { perror("mmap"); return 1; }
    struct sockaddr_in *sin = (struct sockaddr_in *)(low + 64);
    sin->sin_family = AF_INET;
    sin->sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &sin->sin_addr);

    /* socketcall(SYS_SOCKET = 1, {AF_INET, SOCK_STREAM, 0}) */
    low[0] = AF_INET; low[1] = SOCK_STREAM; low[2] = 0;
    show("i386_socketcall_socket", i386(102, 1, (long)(uintptr_t)low, 0));
    /* socketcall(SYS_CONNECT = 3, {fd, sin, 16}) on a 64-bit socket */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    low[0] = fd; low[1] = (uint32_t)(uintptr_t)sin; low[2] = sizeof *sin;
    show("i386_socketcall_connect", i386(102, 3, (long)(uintptr_t)low, 0));
    /* socketcall(SYS_BIND = 2, …) */
    show("i386_socketcall_bind", i386(102, 2, (long)(uintptr_t)low, 0));
    /* the direct i386 calls: socket 359, bind 361, connect 362 */
    show("i386_socket", i386(359, AF_INET, SOCK_STREAM, 0));
    int fd2 = socket(AF_INET, SOCK_STREAM, 0);
    show("i386_connect", i386(362, fd2, (long)(uintptr_t)sin, sizeof *sin));
    show("i386_bind", i386(361, fd2, (long)(uintptr_t)sin, sizeof *sin));
    /* i386 io_uring_setup (425) */
    show("i386_io_uring_setup", i386(425, 4, (long)(uintptr_t)(low + 256), 0));
    /* x32 connect: __X32_SYSCALL_BIT | 42 */
    int fd3 = socket(AF_INET, SOCK_STREAM, 0);
    long r = syscall(0x40000000L | 42, fd3, sin, sizeof *sin);
    show("x32_connect", r < 0 ? -errno : r);
    /* control: a 64-bit connect */
    int fd4 = socket(AF_INET, SOCK_STREAM, 0);
    show("x86_64_connect", connect(fd4, (struct sockaddr *)sin, sizeof *sin) ? -errno : 0);
    return 0;
}
"#;

/// `io_uring_setup` and 32-bit/x32 socket calls cannot slip past the
/// broker: under ax each fails with ENOSYS, while the same calls work (or
/// fail for another reason) natively. (`e2e.rs`'s
/// `io_uring_setup_is_refused_with_enosys` checks the 64-bit io_uring_setup
/// through the CLI; `broker/tests/filter.rs` checks the filter through the
/// library, as root.)
#[test]
fn int80_and_x32_socket_calls_fail_with_enosys() {
    require!("cc", "python3");
    let dir = TempDir::new("int80");
    let bin = compile_c(&dir, "int80", INT80_C, &[]);
    let d = Daemon::start();
    let sc = Scripts::new();
    let mut server = d.spawn(
        &["--ip", "10.233.9.1"],
        &sc.py(
            "threaded_server",
            THREADED_ECHO_SERVER,
            &["0.0.0.0", "7000"],
        ),
    );
    d.wait_for_service(&mut server, "10.233.9.1:7000");
    let parse = |out: &str| -> BTreeMap<String, String> {
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let native = run(Command::new(&bin).args(["10.233.9.1", "7000"]), SHORT);
    if !native.status.success() || !native.stdout.contains("i386_socket OK") {
        // A kernel without the 32-bit ABI (no IA32 emulation): there is
        // nothing to slip past the broker.
        note(&format!(
            "SKIP: {}: this kernel does not run 32-bit system calls natively: {native}",
            ax_e2e::test_name()
        ));
        return;
    }
    let native = parse(&native.stdout);
    let under = d.run(&[], &[bin.as_str(), "10.233.9.1", "7000"]);
    under.assert_success();
    let under = parse(&under.stdout);
    let mut table = String::from("case                      native         under ax\n");
    for (k, v) in &native {
        table.push_str(&format!(
            "{k:25} {v:14} {}\n",
            under.get(k).map(String::as_str).unwrap_or("(missing)")
        ));
    }
    note(&format!("{}:\n{table}", ax_e2e::test_name()));
    // Natively the 32-bit socket calls work (the VIP is unroutable here,
    // so a connect that slipped past ax would say ENETUNREACH).
    assert_eq!(native["i386_socketcall_socket"], "OK", "{table}");
    assert_eq!(native["i386_socket"], "OK", "{table}");
    assert_eq!(native["i386_socketcall_connect"], "ENETUNREACH", "{table}");
    assert_eq!(native["i386_connect"], "ENETUNREACH", "{table}");
    for case in [
        "i386_socketcall_socket",
        "i386_socketcall_connect",
        "i386_socketcall_bind",
        "i386_socket",
        "i386_connect",
        "i386_bind",
        "i386_io_uring_setup",
        "x32_connect",
    ] {
        assert_eq!(
            under.get(case).map(String::as_str),
            Some("ENOSYS"),
            "{case} under ax:\n{table}"
        );
    }
    // The control: the 64-bit connect to the VIP goes through ax.
    assert_eq!(under["x86_64_connect"], "OK", "{table}");
    assert_eq!(native["x86_64_connect"], "ENETUNREACH", "{table}");
}
