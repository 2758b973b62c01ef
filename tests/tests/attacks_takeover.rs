//! Attacks on a daemon's take-over of running apps (issue 8, items 5 and
//! 10), and the autostart path under kill -9 (issue 8, reliability).
//!
//! * a launcher-side attacker rewrites the call journal so that the next
//!   daemon writes into another process: nothing is written there, and the
//!   app keeps working;
//! * the same attacker shrinks the journal under the daemon's mapping: the
//!   memfd is sealed, the daemon lives;
//! * a fake daemon of another uid on the socket path: `ax exec` refuses it
//!   before sending anything (root only: it takes a second uid);
//! * autostarted daemons killed every 2 s under load: no request fails or
//!   hangs, and every killed daemon is reaped;
//! * a client of the control socket hands over a pipe as an app's "notify
//!   fd": refused, and the app is still served.
//!
//! Each test kills what it starts (the harness guards do, also on panic).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ax_e2e::serde_json::{self, Value};
use ax_e2e::{euid, note, poll, require, run, App, Daemon, TempDir, SHORT};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `python3 DIR/NAME.py ARGS…`, writing the script into `dir`.
fn py(dir: &TempDir, name: &str, script: &str, args: &[&str]) -> Vec<String> {
    let path = dir.join(&format!("{name}.py"));
    if !path.exists() {
        dir.write(&format!("{name}.py"), script);
    }
    let mut v = vec!["python3".to_string(), p(&path).to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// A server that answers each connection with `hello\n` and closes it;
/// its accepts block in the main thread. Prints `LISTENING <pid>`.
const HELLO_SERVER: &str = r#"
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("LISTENING", os.getpid(), flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(b"hello\n")
"#;

/// The victim: another app's process, holding a listener the broker made
/// (so that a `getsockname` aimed at it would be answered) and a buffer
/// full of 0xaa. Prints `VICTIM <pid> <fd> <addr> <lenaddr>`, then, for
/// each line on stdin, `BUF <hex> <len>`.
const VICTIM: &str = r#"
import ctypes, os, socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
buf = ctypes.create_string_buffer(b"\xaa" * 32, 32)
blen = ctypes.c_int(32)
print("VICTIM", os.getpid(), s.fileno(), ctypes.addressof(buf),
      ctypes.addressof(blen), flush=True)
for _ in sys.stdin:
    print("BUF", buf.raw.hex(), blen.value, flush=True)
"#;

/// The attacker, outside ax, of the launcher's user:
/// `attacker.py LAUNCHER_PID (shrink | rewrite TID VICTIM_PID FD ADDR LENADDR)`.
/// Opens the launcher's journal memfd through /proc; `shrink` truncates
/// it (prints `SHRINK OK` or `SHRINK ERRNO <n>`); `rewrite` finds the
/// record of thread TID's pending accept and makes it a `getsockname`
/// of the victim's fd into the victim's buffer (prints `REWROTE <id>`).
const ATTACKER: &str = r#"
import mmap, os, struct, sys
launcher = int(sys.argv[1])
path = None
for fd in os.listdir("/proc/%d/fd" % launcher):
    try:
        link = os.readlink("/proc/%d/fd/%s" % (launcher, fd))
    except OSError:
        continue
    if link.startswith("/memfd:ax-journal"):
        path = "/proc/%d/fd/%s" % (launcher, fd)
        break
if path is None:
    print("NO-JOURNAL", flush=True)
    sys.exit(1)
f = os.open(path, os.O_RDWR)
if sys.argv[2] == "shrink":
    try:
        os.ftruncate(f, 0)
        print("SHRINK OK", flush=True)
    except OSError as e:
        print("SHRINK ERRNO", e.errno, flush=True)
    sys.exit(0)
tid, victim, vfd, addr, lenaddr = (int(a) for a in sys.argv[3:8])
size = os.fstat(f).st_size
m = mmap.mmap(f, size)
GETSOCKNAME, ACCEPTS = 51, (43, 288)
for off in range(0, size - 80, 80):
    rid, pid_nr = struct.unpack_from("<QQ", m, off)
    if rid == 0 or (pid_nr & 0xffffffff) != tid or (pid_nr >> 32) not in ACCEPTS:
        continue
    struct.pack_into("<Q", m, off + 8, victim | (GETSOCKNAME << 32))
    struct.pack_into("<6Q", m, off + 24, vfd, addr, lenaddr, 0, 0, 0)
    print("REWROTE", rid, flush=True)
    sys.exit(0)
print("NO-RECORD", flush=True)
sys.exit(1)
"#;

/// Connects to HOST PORT and prints what comes back.
const FETCH: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print("GOT", c.makefile().readline().strip(), flush=True)
"#;

/// The pid `LISTENING <pid>` names in `app`'s output.
fn listening_pid(app: &mut App) -> u32 {
    let out = app.wait_for_stdout("LISTENING", SHORT);
    out.lines()
        .find_map(|l| l.strip_prefix("LISTENING "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}

/// Waits until thread `tid` waits in a trapped accept.
fn wait_trapped_accept(tid: u32) {
    let ok = poll(SHORT, Duration::from_millis(20), || {
        let wchan = fs::read_to_string(format!("/proc/{tid}/wchan")).unwrap_or_default();
        let call = fs::read_to_string(format!("/proc/{tid}/syscall")).unwrap_or_default();
        let nr = call.split_whitespace().next().unwrap_or("");
        (wchan.starts_with("seccomp_do_user_notification") && (nr == "43" || nr == "288"))
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "thread {tid} never waited in a trapped accept"
    );
}

fn fetch(d: &Daemon, dir: &TempDir, host: &str, port: &str) -> String {
    let out = d.run(&["--no-autostart"], &py(dir, "fetch", FETCH, &[host, port]));
    assert!(
        out.status.success(),
        "fetch {host}:{port} failed: {out}\ndaemon log:\n{}",
        d.log()
    );
    out.stdout
}

/// A launcher-side attacker rewrites a pending accept's journal record into
/// a `getsockname` aimed at a buffer of another process, then the daemon
/// is killed. Before issue 8 the successor wrote the address of the
/// victim's listener there (and answered the app's accept with 0). Now the
/// record fails the kernel's checks (the thread is not the app's, nor in
/// that call), is logged and ignored; the app's real accept is found from
/// /proc and keeps serving.
#[test]
fn rewritten_journal_writes_nowhere() {
    require!("python3");
    let mut d = Daemon::start();
    let dir = TempDir::new("takeover");
    let mut app = d.spawn(
        &["--no-autostart", "--ip", "10.233.40.1"],
        &py(&dir, "hello", HELLO_SERVER, &["7000"]),
    );
    let server = listening_pid(&mut app);
    d.wait_for_service(&mut app, "10.233.40.1:7000");
    let mut victim = d.spawn(
        &["--no-autostart", "--ip", "10.233.40.2"],
        &py(&dir, "victim", VICTIM, &["7001"]),
    );
    let line = victim.wait_for_stdout("VICTIM", SHORT);
    let v: Vec<String> = line
        .lines()
        .find_map(|l| l.strip_prefix("VICTIM "))
        .expect("victim line")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(v.len(), 4, "{line}");
    assert_eq!(fetch(&d, &dir, "10.233.40.1", "7000").trim(), "GOT hello");
    wait_trapped_accept(server);

    let launcher = app.pid().to_string();
    let server_s = server.to_string();
    let mut argv = vec![launcher.as_str(), "rewrite", server_s.as_str()];
    argv.extend(v.iter().map(String::as_str));
    let out = run(
        Command::new("python3")
            .arg(dir.write("attacker.py", ATTACKER))
            .args(&argv),
        SHORT,
    );
    assert!(out.stdout.contains("REWROTE"), "attacker: {out}");

    d.kill_hard();
    d.restart();

    // Give a successor that acts on the record time to do it.
    poll(SHORT, Duration::from_millis(20), || {
        d.log().contains("finishing a call").then_some(())
    });
    victim.send("show\n");
    let shown = victim.wait_for_stdout("BUF", SHORT);
    let want = format!("BUF {} 32", "aa".repeat(32));
    assert!(
        shown.lines().any(|l| l == want),
        "the victim's memory changed: {shown}\ndaemon log:\n{}",
        d.log()
    );
    // The app serves again: its accept was finished by the successor.
    assert_eq!(fetch(&d, &dir, "10.233.40.1", "7000").trim(), "GOT hello");
    assert!(
        d.log()
            .contains("ignoring a journal record that does not match"),
        "the rejected record is not logged:\n{}",
        d.log()
    );
    assert!(d.is_running(), "daemon died:\n{}", d.log());
    app.kill();
    victim.kill();
}

/// The attacker truncates the journal under the daemon's mapping: before
/// issue 8 the daemon took SIGBUS at its next record. The memfd is sealed:
/// truncation fails with EPERM, and the daemon keeps serving.
#[test]
fn journal_cannot_be_shrunk() {
    require!("python3");
    let mut d = Daemon::start();
    let dir = TempDir::new("shrink");
    let mut app = d.spawn(
        &["--no-autostart", "--ip", "10.233.40.3"],
        &py(&dir, "hello", HELLO_SERVER, &["7000"]),
    );
    listening_pid(&mut app);
    d.wait_for_service(&mut app, "10.233.40.3:7000");
    let launcher = app.pid().to_string();
    let out = run(
        Command::new("python3")
            .arg(dir.write("attacker.py", ATTACKER))
            .args([launcher.as_str(), "shrink"]),
        SHORT,
    );
    assert!(
        out.stdout.contains(&format!("SHRINK ERRNO {EPERM}")),
        "the journal could be shrunk: {out}"
    );
    for _ in 0..3 {
        assert_eq!(fetch(&d, &dir, "10.233.40.3", "7000").trim(), "GOT hello");
    }
    assert!(d.is_running(), "daemon died:\n{}", d.log());
    app.kill();
}

/// `EPERM`, which `ftruncate` returns on a sealed memfd.
const EPERM: i32 = 1;

/// A fake daemon: binds PATH as root, then becomes `nobody` before
/// `listen` (so that `SO_PEERCRED` names nobody), accepts one connection
/// and reports what it received (`RECEIVED <bytes> FDS <n>`).
const FAKE_DAEMON: &str = r#"
import array, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s.listen(4)
print("LISTENING", flush=True)
s.settimeout(30)
c, _ = s.accept()
c.settimeout(3)
data, fds = b"", 0
try:
    while True:
        msg, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += len(payload) // 4
        if not msg:
            break
        data += msg
except OSError:
    pass
print("RECEIVED", len(data), "FDS", fds, flush=True)
"#;

/// A process of another uid listening on the socket path gets nothing from
/// `ax exec`: before issue 8 the launcher sent it its request, and, to a
/// fake that answered, the program's notify fd. Needs root (a second uid);
/// the unprivileged pass prints SKIP.
#[test]
fn fake_daemon_of_another_uid_gets_nothing() {
    require!("python3");
    if euid() != 0 {
        note(
            "SKIP fake_daemon_of_another_uid_gets_nothing: needs root to run a listener as nobody",
        );
        return;
    }
    let dir = TempDir::new("fake");
    let sock = dir.join("ax.sock");
    let script = dir.write("fake.py", FAKE_DAEMON);
    let mut fake = App::spawn({
        let mut c = Command::new("python3");
        c.arg(script).arg(&sock);
        c
    });
    fake.wait_for_stdout("LISTENING", SHORT);
    let t = Instant::now();
    let mut cmd = Command::new(ax_e2e::ax_bin());
    cmd.args(["exec", "--no-autostart", "--socket"])
        .arg(&sock)
        .args(["--", "true"]);
    let out = run(&mut cmd, SHORT);
    assert!(!out.status.success(), "ax exec used the fake daemon: {out}");
    assert!(
        out.stderr.contains("uid 65534"),
        "no clear refusal naming the listener's uid: {out}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "ax exec waited on the fake"
    );
    let got = fake.wait_for_stdout("RECEIVED", SHORT);
    assert!(
        got.contains("RECEIVED 0 FDS 0"),
        "the fake daemon received something: {got}"
    );
    fake.kill();
}

/// A threaded server answering each line with `ok:<line>` and closing.
const LINE_SERVER: &str = r#"
import os, socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(128)
print("LISTENING", os.getpid(), flush=True)
def handle(c):
    try:
        with c:
            line = c.makefile("rb").readline()
            # A connection closed without a request (a connect the killed
            # daemon had begun, redone by its successor) gets nothing.
            if line:
                c.sendall(b"ok:" + line)
    except OSError as e:
        print("ERROR handler:", e, flush=True)
while True:
    try:
        c, _ = s.accept()
    except OSError as e:
        print("ERROR accept:", e, flush=True)
        continue
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// `load.py HOST PORT SECONDS THREADS`: each thread connects, sends a line
/// and reads to EOF, again and again; a request that takes over 10 s is
/// hung. Prints `P <ok>` now and then and a JSON summary at the end.
const LOAD: &str = r#"
import json, socket, sys, threading, time
host, port, secs, n = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
end = time.time() + secs
lock = threading.Lock()
res = {"ok": 0, "failed": 0, "hung": 0, "errors": []}
def worker(k):
    i = 0
    while time.time() < end:
        i += 1
        msg = b"r%d-%d\n" % (k, i)
        try:
            c = socket.create_connection((host, port), timeout=10)
            with c:
                c.sendall(msg)
                data = b""
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            kind = "ok" if data == b"ok:" + msg else "failed"
            err = None if kind == "ok" else "reply %r" % data
        except socket.timeout:
            kind, err = "hung", "timeout"
        except OSError as e:
            kind, err = "failed", str(e)
        with lock:
            res[kind] += 1
            if err and len(res["errors"]) < 20:
                res["errors"].append(err)
            if res["ok"] % 200 == 0:
                print("P", res["ok"], flush=True)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(res), flush=True)
"#;

/// Daemons autostarted by launchers, killed every 2 s for 15 s while a
/// client makes requests on four threads: no request fails or hangs, and
/// each killed daemon is reaped by the launcher that started it (before
/// issue 8 it stayed a zombie, which its successor took for alive, and the
/// connections its fd keeper held waited out the keeper's 120 s).
#[test]
fn autostarted_daemon_killed_under_load() {
    require!("python3");
    let mut d = Daemon::start();
    let dir = TempDir::new("autoload");
    let mut server = d.spawn(
        &["--ip", "10.233.41.1"],
        &py(&dir, "server", LINE_SERVER, &["7000"]),
    );
    d.wait_for_service(&mut server, "10.233.41.1:7000");
    let mut load = d.spawn(
        &[],
        &py(&dir, "load", LOAD, &["10.233.41.1", "7000", "15", "4"]),
    );
    load.wait_for_stdout("P ", SHORT);
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < Duration::from_secs(13) {
        sleep(Duration::from_secs(2));
        let killed = d.pid();
        d.kill_hard();
        kills += 1;
        let successor = d.adopt_successor(Duration::from_secs(15));
        assert_ne!(successor, killed);
        if kills > 1 {
            // An autostarted daemon: its launcher reaps it.
            let reaped = poll(Duration::from_secs(5), Duration::from_millis(20), || {
                (!Path::new(&format!("/proc/{killed}")).exists()).then_some(())
            });
            assert!(
                reaped.is_some(),
                "killed daemon {killed} was never reaped (a zombie)"
            );
        }
    }
    let status = load.wait(Duration::from_secs(60));
    assert!(status.success(), "load client: {}", load.report());
    let out = load.stdout();
    let summary: Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no summary: {out}"));
    note(&format!("autostart under load: {kills} kills, {summary}"));
    assert!(summary["ok"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}\n{}", d.log());
    assert_eq!(summary["hung"], 0, "{summary}\n{}", d.log());
    assert!(
        !server.stdout().contains("ERROR"),
        "server: {}",
        server.stdout()
    );
    server.kill();
}

/// An app's listener is taken only if it is a seccomp notify fd: a pipe
/// handed over in its place (as a launcher hands over its program's notify
/// fd, by a process of the app's uid naming a child of its own as the
/// program) is refused, and the app goes on being served.
#[test]
fn a_pipe_handed_over_as_a_notify_fd_is_refused() {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::{IoSlice, Read};
    use std::os::fd::AsFd;
    require!("python3");
    let d = Daemon::start();
    let dir = TempDir::new("pipe");
    let vip = "10.233.0.180";
    let mut server = d.spawn(&["--ip", vip], &py(&dir, "hello", HELLO_SERVER, &["8000"]));
    d.wait_for_service(&mut server, &format!("{vip}:8000"));
    let app = d
        .apps()
        .first()
        .and_then(|a| a["id"].as_u64())
        .expect("the server's app id");
    // The "program": a child of this process, as the daemon requires.
    let program = App::spawn({
        let mut c = Command::new("sleep");
        c.arg("30");
        c
    });
    let frame = ax_proto::encode(&ax_proto::Request::AttachListener {
        app,
        pid: program.pid(),
    })
    .expect("frame");
    let (pipe, _w) = rustix::pipe::pipe().expect("pipe");
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).expect("connect");
    s.set_read_timeout(Some(SHORT)).expect("timeout");
    let fds = [pipe.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    assert!(ancillary.push(SendAncillaryMessage::ScmRights(&fds)));
    let sent = rustix::net::sendmsg(
        &s,
        &[IoSlice::new(&frame)],
        &mut ancillary,
        SendFlags::empty(),
    )
    .expect("sendmsg");
    assert_eq!(sent, frame.len());
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).expect("answer");
    let mut body = vec![0u8; ax_proto::body_len(prefix).expect("length")];
    s.read_exact(&mut body).expect("answer");
    let answer: ax_proto::Response = ax_proto::decode(&body).expect("a response");
    assert!(
        matches!(&answer, ax_proto::Response::Error(e) if e.contains("not a seccomp notify fd")),
        "a pipe was not refused as the app's notify fd: {answer:?}\ndaemon log:\n{}",
        d.log()
    );
    assert_eq!(
        fetch(&d, &dir, vip, "8000").trim(),
        "GOT hello",
        "the app is no longer served"
    );
    server.kill();
}
