//! Attacks on the broker's and the daemon's resources (issue 8, items 2, 8
//! and 9, and the control socket's bounds).
//!
//! * an app parks 800 blocking accepts: the daemon keeps answering `ax get`,
//!   and another app's `bind(0.0.0.0:PORT)` never becomes a real TCP
//!   listener (the broker fails closed, never `CONTINUE` for lack of fds);
//! * a control-socket client registers an app with a connect wait that
//!   would overflow the clock: a clear refusal, the daemon carries on;
//! * one app's `setsockopt` storm does not wipe another app's options;
//! * 1,000 idle control connections and 300 partial 1 MiB frames: the
//!   daemon's memory and fds stay bounded, and `ax get` answers.
//!
//! Every test is bounded in time and kills what it starts (the harness
//! guards do, also on panic).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ax_e2e::{descendants, note, poll, require, run, Daemon, TempDir, SHORT};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Held by tests that change or lean on this process's fd limit (tests of
/// one binary share the process).
static FD_LIMIT: Mutex<()> = Mutex::new(());

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Starts a daemon whose soft fd limit is `soft`, as a daemon started from
/// a login shell has (1024): the daemon must raise it itself.
fn daemon_with_fd_limit(soft: u64) -> Daemon {
    let _guard = FD_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let old = getrlimit(Resource::Nofile);
    let lowered = Rlimit {
        current: Some(soft.min(old.current.unwrap_or(soft))),
        maximum: old.maximum,
    };
    setrlimit(Resource::Nofile, lowered).expect("lower the soft fd limit");
    let d = Daemon::start_with_env(&[("RUST_LOG", "info")]);
    setrlimit(Resource::Nofile, old).expect("restore the fd limit");
    d
}

/// True when a process of `pids` holds a socket that listens on TCP `port`
/// (`/proc/net/tcp`, `/proc/net/tcp6`: state 0A is LISTEN; column 10 is the
/// inode, matched against the processes' `/proc/PID/fd` links). The daemon's
/// own listener on the host's loopback for a wildcard service (a doorbell,
/// by design) is not the program's socket, and does not count.
fn tcp_listening(port: u16, pids: &[u32]) -> bool {
    let want = format!(":{port:04X}");
    let held: Vec<String> = pids
        .iter()
        .flat_map(|pid| {
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
                .collect::<Vec<_>>()
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 9
                    && cols[1].ends_with(&want)
                    && cols[3] == "0A"
                    && held.iter().any(|ino| ino == cols[9])
            })
    })
}

/// Threads of `pid` blocked in `accept` or `accept4`
/// (`/proc/PID/task/*/syscall`).
fn threads_in_accept(pid: u32) -> usize {
    // x86_64: accept 43, accept4 288; aarch64: 202, 242.
    let nrs: [&str; 2] = if cfg!(target_arch = "aarch64") {
        ["202 ", "242 "]
    } else {
        ["43 ", "288 "]
    };
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("syscall"))
                        .is_ok_and(|s| nrs.iter().any(|nr| s.starts_with(nr)))
                })
                .count()
        })
        .unwrap_or(0)
}

/// `ax get apps`, timed; panics if it fails.
fn timed_get_apps(d: &Daemon) -> Duration {
    let start = Instant::now();
    let mut cmd = d.ax();
    cmd.args(["get", "apps", "--socket", p(d.socket())]);
    let out = run(&mut cmd, SHORT);
    let took = start.elapsed();
    assert!(out.status.success(), "ax get apps failed: {out}");
    took
}

const PARKER: &str = r#"
import socket, sys, threading
threading.stack_size(65536)
n, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.bind(("0.0.0.0", port))
s.listen(1024)
def wait():
    try:
        s.accept()
    except OSError:
        pass
for _ in range(n):
    threading.Thread(target=wait, daemon=True).start()
print("started", flush=True)
sys.stdin.readline()
"#;

const BINDER: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
try:
    s.bind(("0.0.0.0", port))
    s.listen(8)
except OSError as e:
    print("bind failed", e.errno, flush=True)
    sys.exit(3)
print("listening", flush=True)
c, _ = s.accept()
c.sendall(b"hello from the vip\n")
c.close()
"#;

const CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print(c.makefile().readline().strip(), flush=True)
"#;

/// Issue 8 item 2: ~700 parked accepts exhausted a daemon's fds; another
/// app's wildcard bind then fell through to the kernel and became a real
/// TCP listener, and `ax get` hung for 30 s.
#[test]
fn parked_accepts_do_not_open_the_host() {
    require!("python3");
    let d = daemon_with_fd_limit(1024);
    let dir = TempDir::new("parked");
    let parker = dir.write("parker.py", PARKER);
    let binder = dir.write("binder.py", BINDER);
    let client = dir.write("client.py", CLIENT);
    let n = 800;
    let base_fds = d.fd_count();
    let mut server = d.spawn(&[], &["python3", p(&parker), &n.to_string(), "7100"]);
    server.wait_for_stdout("started", SHORT);
    let py = descendants(server.pid())
        .into_iter()
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.contains("python"))
        })
        .expect("the parking python process");
    // Every thread is in its trapped accept, and the daemon holds the
    // listener for each (the parking it does).
    let parked = poll(Duration::from_secs(60), Duration::from_millis(100), || {
        (threads_in_accept(py) >= n && d.fd_count() >= base_fds + n).then_some(())
    });
    note(&format!(
        "{} threads in accept, daemon fds {} (base {base_fds}); parked: {}",
        threads_in_accept(py),
        d.fd_count(),
        parked.is_some()
    ));

    let took = timed_get_apps(&d);
    assert!(took < Duration::from_secs(3), "ax get apps took {took:?}");

    let port = 8180;
    let mut other = d.spawn(
        &["--ip", "10.233.77.2"],
        &["python3", p(&binder), &port.to_string()],
    );
    let out = other.wait_for_stdout("listening", SHORT);
    assert!(!out.contains("bind failed"), "{out}");
    let mut app_pids = vec![other.pid()];
    app_pids.extend(descendants(other.pid()));
    assert!(
        !tcp_listening(port, &app_pids),
        "bind(0.0.0.0:{port}) under ax became a real TCP listener of the program:\n{}",
        std::fs::read_to_string("/proc/net/tcp").unwrap_or_default()
    );
    let reply = d.run(
        &[],
        &["python3", p(&client), "10.233.77.2", &port.to_string()],
    );
    assert!(
        reply.stdout.contains("hello from the vip"),
        "the VIP service did not answer: {reply}\ndaemon log:\n{}",
        d.log()
    );
    let took = timed_get_apps(&d);
    assert!(took < Duration::from_secs(3), "ax get apps took {took:?}");
    other.wait(SHORT);
    server.kill();
}

/// A postcard varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// One request frame and its answer's body.
fn exchange(sock: &Path, body: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).expect("connect to the daemon");
    s.set_read_timeout(Some(SHORT)).unwrap();
    let len = u32::try_from(body.len()).unwrap();
    s.write_all(&len.to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).expect("an answer");
    let mut answer = vec![0u8; u32::from_be_bytes(prefix) as usize];
    s.read_exact(&mut answer).expect("the answer's body");
    answer
}

/// Issue 8 item 9: a huge `connect_wait` from the control socket overflowed
/// `Instant + Duration` in a pool thread, leaving the call waiting forever.
/// It is refused at registration now.
#[test]
fn huge_connect_wait_is_refused() {
    require!();
    let d = Daemon::start();
    for secs in [u64::MAX, 10 * 86_400] {
        // Frame { version 3, Request::RegisterApp(AppSpec { no ips, names,
        // labels, command, lb: None, connect_wait: Some(secs), container:
        // None, no_hosts_mount: false }) }.
        let mut body = vec![0x03, 0x01, 0, 0, 0, 0, 0, 0x01];
        varint(secs, &mut body);
        varint(0, &mut body);
        body.extend_from_slice(&[0, 0]);
        let answer = exchange(d.socket(), &body);
        // Response::RegisterFailed is variant 2 (AppRegistered is 1).
        assert_eq!(
            answer.get(..2),
            Some(&[0x03, 0x02][..]),
            "connect_wait {secs} s was not refused: {answer:?}\ndaemon log:\n{}",
            d.log()
        );
    }
    assert!(
        d.log().contains("connect wait"),
        "no clear reason in the log:\n{}",
        d.log()
    );
    assert!(d.apps().is_empty(), "an app was registered: {:?}", d.apps());
    let took = timed_get_apps(&d);
    assert!(took < Duration::from_secs(3), "ax get apps took {took:?}");
}

const KEEPER: &str = r#"
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
print("set", flush=True)
sys.stdin.readline()
print("nodelay", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
      "keepidle", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), flush=True)
"#;

const STORM: &str = r#"
import socket, sys
sockets = int(sys.argv[1])
# Options TCP accepts on a bound socket (the broker answers as TCP would).
T, I = socket.IPPROTO_TCP, socket.IPPROTO_IP
options = [
    (T, socket.TCP_NODELAY, 1), (T, socket.TCP_KEEPIDLE, 60),
    (T, socket.TCP_KEEPINTVL, 10), (T, socket.TCP_KEEPCNT, 5),
    (T, socket.TCP_USER_TIMEOUT, 1000), (T, socket.TCP_SYNCNT, 3),
    (T, socket.TCP_LINGER2, 10), (T, socket.TCP_QUICKACK, 1),
    (I, socket.IP_TOS, 16), (I, socket.IP_TTL, 32),
]
failed = []
for _ in range(sockets):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    for level, name, value in options:
        try:
            s.setsockopt(level, name, value)
        except OSError as e:
            failed.append((level, name, e.errno))
    s.close()
print("storm done, failed", len(failed), failed[:5], flush=True)
"#;

/// Issue 8 item 8: the table of remembered options was shared by all apps
/// and cleared at 65,536 entries: one app's load wiped another's
/// `TCP_NODELAY`. Each app has its own table now, and entries of closed
/// sockets are swept when it fills.
#[test]
fn options_survive_another_apps_storm() {
    require!("python3");
    let d = Daemon::start_with_env(&[("RUST_LOG", "info")]);
    let dir = TempDir::new("storm");
    let keeper = dir.write("keeper.py", KEEPER);
    let storm = dir.write("storm.py", STORM);
    let mut a = d.spawn(&[], &["python3", p(&keeper)]);
    a.wait_for_stdout("set", SHORT);
    // 6,600 sockets × 10 options: 66,000 entries, more than any table
    // holds; each socket is closed before the next.
    let mut cmd = d.exec_command(&[], &["python3", p(&storm), "6600"]);
    let out = run(&mut cmd, Duration::from_secs(240));
    assert!(
        out.stdout.contains("storm done, failed 0 "),
        "the storm app's own options were refused: {out}"
    );
    a.send("\n");
    let got = a.wait_for_stdout("nodelay", SHORT);
    assert!(
        got.contains("nodelay 1 keepidle 77"),
        "app A's options were lost: {got}"
    );
    a.wait(SHORT);
}

/// The control socket: 1,000 idle connections cost 58 MB, and 300
/// connections each holding a partial 1 MiB frame pinned 344 MB. Each uid
/// keeps 256 open now (the oldest idle one closes), frames grow as bytes
/// arrive, and `ax get` keeps answering.
#[test]
fn idle_control_connections_are_bounded() {
    require!();
    let _guard = FD_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
    let d = Daemon::start_with_env(&[("RUST_LOG", "info")]);
    let rss_before = d.rss_kib();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = UnixStream::connect(d.socket()) {
            idle.push(s);
        }
    }
    let mut partial = Vec::new();
    let frame_len: u32 = 1 << 20;
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..300 {
        let Ok(mut s) = UnixStream::connect(d.socket()) else {
            continue;
        };
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sent = s.write_all(&frame_len.to_be_bytes());
        let mut left = frame_len as usize - 1;
        while sent.is_ok() && left > 0 {
            let n = left.min(chunk.len());
            sent = s.write_all(&chunk[..n]);
            left -= n;
        }
        partial.push(s);
    }
    // Let the daemon read what was sent.
    let took = timed_get_apps(&d);
    let rss_after = d.rss_kib();
    let fds = d.fd_count();
    note(&format!(
        "daemon RSS {rss_before} KiB -> {rss_after} KiB, {fds} fds, ax get apps in {took:?}"
    ));
    assert!(took < Duration::from_secs(3), "ax get apps took {took:?}");
    assert!(fds < 800, "the daemon holds {fds} fds");
    assert!(
        rss_after.saturating_sub(rss_before) < 160 * 1024,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    drop(idle);
    drop(partial);
    let _ = setrlimit(Resource::Nofile, limit);
    let took = timed_get_apps(&d);
    assert!(took < Duration::from_secs(3), "ax get apps took {took:?}");
}

const HOLDER: &str = r#"
import socket, sys
warm = socket.socket()
warm.getsockname()  # the daemon opens (and keeps) this thread's pidfd now
print("ready", flush=True)
sys.stdin.readline()
s = socket.socket()
s.setblocking(False)
print("connect", s.connect_ex((sys.argv[1], 9999)), flush=True)
s.close()
print("closed", flush=True)
sys.stdin.readline()
"#;

/// A connect held under `--connect-wait` for a service that is not up kept
/// a daemon thread and two fds until its deadline, after the program had
/// closed the socket. They are freed as soon as the socket is gone.
#[test]
fn held_connect_is_freed_when_its_socket_goes() {
    require!("python3");
    let d = Daemon::start_with_env(&[("RUST_LOG", "info")]);
    let dir = TempDir::new("held");
    let holder = dir.write("holder.py", HOLDER);
    let mut app = d.spawn(
        &["--connect-wait", "120s"],
        &["python3", p(&holder), "10.233.99.9"],
    );
    app.wait_for_stdout("ready", SHORT);
    let base = d.fd_count();
    app.send("\n");
    let out = app.wait_for_stdout("closed", SHORT);
    assert!(out.contains("connect 115"), "expected EINPROGRESS: {out}");
    let freed = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        (d.fd_count() <= base).then_some(())
    });
    assert!(
        freed.is_some(),
        "the daemon still holds {} fds (base {base}) for a closed socket's connect:\n{}",
        d.fd_count(),
        d.fd_links().join("\n")
    );
    app.send("\n");
    app.wait(SHORT);
}
