//! Exploits against ax's identity (issue 8, item 1), replayed: nothing but
//! the broker may connect to, bind, or pose as a socket of ax.
//!
//! * A process outside ax reads ax's listener names in `/proc/net/unix` and
//!   connects straight to a server, skipping a `default = "deny"` policy.
//! * A program under ax binds a client name of another VIP before
//!   connecting to a listener by name, and is reported to the server's
//!   `accept`/`getpeername` as that VIP.
//! * After a daemon restart, a look-alike listener bound by a process
//!   outside ax is adopted and receives part of a service's connections.
//! * A client of the control socket registers an app claiming a
//!   container's id, so that the container's `exec`s would join it.
//!
//! Each runs the real attack (small python3 programs) and expects it to
//! fail; as root the outsider runs as user `nobody`.

use std::process::Command;
use std::time::Duration;

use ax_e2e::{euid, poll, require, run, App, Daemon, TempDir, SHORT, THREADED_ECHO_SERVER};
use serde_json::Value;

/// `python3 -c SCRIPT ARGS…`
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// A python3 every user can run (the suite's PATH may start in /root).
fn system_python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `python3 -c SCRIPT ARGS…` as a process outside ax, of another user
/// (`nobody`) when we are root.
fn outsider(script: &str, args: &[&str]) -> Command {
    let mut cmd = if euid() == 0 {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.arg(system_python());
        c
    } else {
        Command::new("python3")
    };
    cmd.arg("-c").arg(script).args(args).current_dir("/");
    cmd
}

/// The abstract names of listening UNIX sockets in this network namespace
/// that start with `argv[1]` (a daemon's `ax/<instance>/`), and the names
/// given after it, each tried: connect, send a line, print what comes back. Prints `FOUND n`, then `SERVED name reply` or `REFUSED name err`.
const ATTACK_LISTENERS: &str = r#"
import socket, sys
names = []
with open("/proc/net/unix") as f:
    next(f)
    for line in f:
        cols = line.split()
        if len(cols) >= 8 and cols[3] == "00010000" and cols[7].startswith("@" + sys.argv[1]):
            names.append(cols[7][1:])
names += sys.argv[2:]
print("FOUND", len(names), flush=True)
for n in names:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect("\0" + n)
        s.sendall(b"hello\n")
        reply = s.recv(100)
        print("SERVED", n, reply, flush=True)
    except OSError as e:
        print("REFUSED", n, e, flush=True)
    finally:
        s.close()
"#;

/// A server on port argv[1] that, for every connection, prints `PEER ip port
/// GETPEERNAME ip port` and answers one line with `echo:LINE`, or prints
/// `ABORTED` for an accept that failed with `ECONNABORTED`; argv[2] threads
/// (default 1) accept on the listener. Prints `LISTENING` first.
const PEER_SERVER: &str = r#"
import socket, sys, threading
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
def acceptor():
    while True:
        try:
            c, peer = srv.accept()
        except ConnectionAbortedError:
            print("ABORTED", flush=True)
            continue
        gp = c.getpeername()
        print("PEER", peer[0], peer[1], "GETPEERNAME", gp[0], gp[1], flush=True)
        with c:
            line = c.makefile("rb").readline()
            c.sendall(b"echo:" + line)
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
for _ in range(threads):
    threading.Thread(target=acceptor, daemon=True).start()
print("LISTENING", flush=True)
threading.Event().wait()
"#;

/// Under ax: binds the abstract client name argv[1] (another VIP's) on a
/// UNIX socket, connects it to the listener named argv[2] — the names seen
/// in `/proc/net/unix` or `ax get services` — and sends a line; then
/// connects honestly to argv[3]:argv[4]. Prints `FORGED …` and `HONEST …`.
const FORGE_CLIENT: &str = r#"
import socket, sys
fakes, listener, vip, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for fake in fakes.split(","):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.bind("\0" + fake)
        # A name it chose does not make its socket one of ax's.
        own = s.getsockname()
        own = own.encode() if isinstance(own, str) else own
        print("SOCKNAME", "own" if own == b"\0" + fake.encode() else "other", own, flush=True)
        s.connect("\0" + listener)
        s.sendall(b"forged\n")
        print("FORGED served", fake, s.recv(100), flush=True)
    except OSError as e:
        print("FORGED refused", fake, e, flush=True)
    s.close()
t = socket.create_connection((vip, port), timeout=10)
t.sendall(b"honest\n")
print("HONEST", t.recv(100), flush=True)
t.close()
"#;

/// Outside ax: listens on the abstract name argv[1], accepting and
/// answering every connection with `stolen`, printing `STOLEN` for each.
/// Prints `READY` once listening.
const LOOK_ALIKE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen(64)
print("READY", flush=True)
while True:
    c, _ = s.accept()
    print("STOLEN", flush=True)
    try:
        c.sendall(b"stolen\n")
    except OSError:
        pass
    c.close()
"#;

/// Under ax: N connects to VIP:PORT, each sending a line and printing the
/// reply (`REPLY …`), then `DONE`.
const MANY_CLIENTS: &str = r#"
import socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    try:
        t = socket.create_connection((vip, port), timeout=10)
        t.sendall(b"c%d\n" % i)
        print("REPLY", t.recv(100), flush=True)
        t.close()
    except OSError as e:
        print("ERROR", e, flush=True)
print("DONE", flush=True)
"#;

/// The listener endpoint of the service at `addr` (`ax get services`),
/// without the `@` that marks an abstract name.
fn endpoint_of(d: &Daemon, addr: &str) -> String {
    let svc: Value = d
        .services()
        .into_iter()
        .find(|s| s["addr"] == addr)
        .unwrap_or_else(|| panic!("no service {addr}: {:?}", d.services()));
    let name = svc["backends"][0]["listener"]
        .as_str()
        .unwrap_or_else(|| panic!("service has no backend listener: {svc}"));
    name.strip_prefix('@')
        .unwrap_or_else(|| panic!("not an abstract name: {name}"))
        .to_string()
}

fn echo_server(d: &Daemon, vip: &str, port: u16) -> App {
    // The test restarts a killed daemon itself.
    let mut server = d.spawn(
        &["--no-autostart", "--ip", vip],
        &py(THREADED_ECHO_SERVER, &[vip, &port.to_string()]),
    );
    server.wait_for_stdout("LISTENING", SHORT);
    d.wait_for_service(&mut server, &format!("{vip}:{port}"));
    server
}

#[test]
fn outsider_cannot_reach_listeners_under_a_deny_policy() {
    require!("python3", "setpriv");
    let dir = TempDir::new("deny");
    let policy = dir.write("policy.toml", "default = \"deny\"\n");
    let d = Daemon::start_with(&[], &["--policy", policy.to_str().expect("utf-8")]);
    let _server = echo_server(&d, "10.233.0.10", 8000);
    let listener = endpoint_of(&d, "10.233.0.10:8000");
    // The attacker tries every ax-looking name it can see, and the one
    // `ax get services` shows.
    // Only this daemon's names: tests running beside this one in the same
    // network namespace bind look-alikes of their own.
    let prefix: String = listener.split_inclusive('/').take(2).collect();
    let out = run(
        &mut outsider(ATTACK_LISTENERS, &[&prefix, &listener]),
        SHORT,
    );
    out.assert_success();
    assert!(
        !out.stdout.contains("SERVED"),
        "a process outside ax reached a listener of ax: {out}"
    );
    assert!(
        out.stdout.contains(&format!("REFUSED {listener}")),
        "attack did not run: {out}"
    );
    // Nothing of this daemon is visible here at all.
    let host = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    assert!(
        !host.contains(&format!("@{prefix}")),
        "ax names in /proc/net/unix:\n{host}"
    );
}

#[test]
fn a_forged_client_name_is_not_an_identity() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(&["--ip", "10.233.0.20"], &py(PEER_SERVER, &["8000"]));
    server.wait_for_stdout("LISTENING", SHORT);
    d.wait_for_service(&mut server, "10.233.0.20:8000");
    let listener = endpoint_of(&d, "10.233.0.20:8000");
    // `ax/<instance>/l4/…` → `ax/<instance>/c4/<a VIP it is not>/…`.
    let instance = listener.split('/').nth(1).expect("instance in the name");
    // With this daemon's instance, and with another one's (which the old
    // broker took for a foreign socket, let the kernel connect, and then
    // believed at accept).
    let other = if instance == "00000000" {
        "00000001"
    } else {
        "00000000"
    };
    let fake = format!(
        "ax/{instance}/c4/10.233.0.99/1234/10.233.0.20/8000,ax/{other}/c4/10.233.0.98/1234/10.233.0.20/8000"
    );
    let mut client = d.spawn(
        &["--ip", "10.233.0.21"],
        &py(FORGE_CLIENT, &[&fake, &listener, "10.233.0.20", "8000"]),
    );
    let out = client.wait_for_stdout("HONEST", SHORT);
    let st = client.wait(SHORT);
    assert!(st.success(), "client: {}", client.report());
    assert!(
        !out.contains("FORGED served"),
        "a forged client reached the listener: {out}"
    );
    assert_eq!(
        out.matches("SOCKNAME own").count(),
        2,
        "getsockname on a program's own UNIX socket answered by ax: {out}"
    );
    assert!(
        out.contains("HONEST b'echo:honest\\n'"),
        "honest connect: {out}"
    );
    let seen = server.wait_for_stdout("PEER 10.233.0.21", SHORT);
    assert!(
        !seen.contains("10.233.0.99") && !seen.contains("10.233.0.98"),
        "the server was told a forged VIP: {seen}"
    );
    for line in seen.lines().filter(|l| l.starts_with("PEER")) {
        assert!(
            line.starts_with("PEER 10.233.0.21 ") && line.contains("GETPEERNAME 10.233.0.21 "),
            "the server saw a peer that is not the client's VIP: {line}\n{seen}"
        );
    }
}

#[test]
fn a_restarted_daemon_adopts_no_look_alike_listener() {
    require!("python3", "setpriv");
    let mut d = Daemon::start();
    let _server = echo_server(&d, "10.233.0.30", 8000);
    let listener = endpoint_of(&d, "10.233.0.30:8000");
    // The old naming scheme, for the VIP rather than the wildcard: another
    // listener of the same app and port, as a successor would see it.
    let look_alike = if listener.contains("/0.0.0.0/") {
        listener.replace("/0.0.0.0/", "/10.233.0.30/")
    } else {
        listener.replace("/10.233.0.30/", "/0.0.0.0/")
    };
    assert_ne!(look_alike, listener, "unexpected listener name {listener}");
    let mut thief = App::spawn(outsider(LOOK_ALIKE, &[&look_alike]));
    thief.wait_for_stdout("READY", SHORT);

    d.kill_hard();
    d.restart();
    // The service is back once its launcher handed the app over again.
    poll(SHORT, Duration::from_millis(20), || {
        d.log()
            .contains("app handed over again after a daemon restart")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the app was not handed back:\n{}", d.log()));
    let mut client = d.spawn(&[], &py(MANY_CLIENTS, &["10.233.0.30", "8000", "30"]));
    let out = client.wait_for_stdout("DONE", Duration::from_secs(60));
    let replies = out.lines().filter(|l| l.starts_with("REPLY")).count();
    assert!(
        !out.contains("stolen") && !thief.stdout().contains("STOLEN"),
        "a look-alike listener received connections of the service:\n{out}\nthief: {}",
        thief.stdout()
    );
    assert_eq!(replies, 30, "clients: {out}\ndaemon log:\n{}", d.log());
    assert!(
        out.lines()
            .filter(|l| l.starts_with("REPLY"))
            .all(|l| l.contains("echo:c")),
        "clients: {out}"
    );
    thief.kill();
}

/// Not an attack, the take-over it must not break: a successor whose
/// predecessor's fd keeper is gone (and with it the anchor of the private
/// network namespace) finds the namespace through the listener of an app
/// it takes over, and serves that app's service.
#[test]
fn a_successor_without_the_fd_keeper_finds_the_namespace() {
    require!("python3");
    let mut d = Daemon::start();
    let _server = echo_server(&d, "10.233.0.40", 8000);
    let record = format!("{}.keeper", d.socket().display());
    let keeper: u32 = std::fs::read_to_string(&record)
        .unwrap_or_else(|e| panic!("{record}: {e}"))
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("keeper pid");
    d.kill_hard();
    let _ = ax_e2e::signal_pid(keeper, rustix::process::Signal::KILL);
    poll(SHORT, Duration::from_millis(10), || {
        (!ax_e2e::pid_is_alive(keeper)).then_some(())
    })
    .expect("the fd keeper survived SIGKILL");
    d.restart();
    poll(SHORT, Duration::from_millis(20), || {
        d.log()
            .contains("app handed over again after a daemon restart")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the app was not handed back:\n{}", d.log()));
    let mut client = d.spawn(&[], &py(MANY_CLIENTS, &["10.233.0.40", "8000", "5"]));
    let out = client.wait_for_stdout("DONE", SHORT);
    assert_eq!(
        out.lines().filter(|l| l.contains("REPLY b'echo:c")).count(),
        5,
        "clients: {out}\ndaemon log:\n{}",
        d.log()
    );
    assert!(
        d.log().contains("through a listener of one of its apps"),
        "{}",
        d.log()
    );
}

/// A client of the control socket claims a container's identity in its
/// registration: only the runtime socket may give one, so the daemon
/// refuses, and no app of that container exists.
/// Connects to the abstract UNIX name argv[1] and says nothing until its
/// stdin closes.
const SILENT_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0" + sys.argv[1])
print("CONNECTED", flush=True)
sys.stdin.read()
"#;

/// Waits for a line on stdin, then connects to argv[1]:argv[2], sends a
/// line and prints the reply.
const CLIENT_ON_CUE: &str = r#"
import socket, sys
sys.stdin.readline()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"hi\n")
print("REPLY", s.makefile("rb").readline(), flush=True)
"#;

/// A connection into a listener's private name that never says who it is
/// (no hello: not made by a broker) is waited for off the app's receive
/// loop: the server's other threads accept honest clients meanwhile, and
/// the silent one ends as an accept failing with `ECONNABORTED`, never as
/// a peer with a made-up address.
#[test]
fn a_silent_connection_holds_up_no_other_accept() {
    require!("python3", "nsenter");
    let d = Daemon::start();
    let mut server = d.spawn(&["--ip", "10.233.0.30"], &py(PEER_SERVER, &["8000", "2"]));
    server.wait_for_stdout("LISTENING", SHORT);
    d.wait_for_service(&mut server, "10.233.0.30:8000");
    let listener = endpoint_of(&d, "10.233.0.30:8000");
    // Started first, so that only its connect remains once cued.
    let mut honest = d.spawn(
        &["--ip", "10.233.0.31"],
        &py(CLIENT_ON_CUE, &["10.233.0.30", "8000"]),
    );
    let silent_argv = py(SILENT_CLIENT, &[&listener]);
    let mut silent = App::spawn(d.in_private_ns(&silent_argv));
    silent.wait_for_stdout("CONNECTED", SHORT);
    honest.send("go\n");
    let out = honest.wait_for_stdout("REPLY", SHORT);
    assert!(out.contains("REPLY b'echo:hi\\n'"), "honest client: {out}");
    let seen = server.wait_for_stdout("PEER 10.233.0.31 ", SHORT);
    // The silent connection is given up on a second after it was taken
    // up: the honest client was served while it was still waited for.
    assert!(
        !seen.contains("ABORTED"),
        "the honest client waited behind the silent connection: {seen}"
    );
    let seen = server.wait_for_stdout("ABORTED", SHORT);
    let peers: Vec<&str> = seen.lines().filter(|l| l.starts_with("PEER")).collect();
    assert_eq!(peers.len(), 1, "the server was handed: {seen}");
    silent.close_stdin();
}

#[test]
fn a_control_client_cannot_register_as_a_container() {
    use std::io::{Read, Write};
    let d = Daemon::start();
    let spec = ax_registry::AppSpec {
        command: vec!["true".into()],
        container: Some(ax_registry::ContainerRef {
            id: "victim".into(),
            runtime: "runc".into(),
        }),
        ..Default::default()
    };
    let frame = ax_proto::encode(&ax_proto::Request::RegisterApp(spec)).unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    s.write_all(&frame).unwrap();
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).unwrap();
    let mut body = vec![0u8; ax_proto::body_len(prefix).unwrap()];
    s.read_exact(&mut body).unwrap();
    let answer: ax_proto::Response = ax_proto::decode(&body).unwrap();
    assert!(
        matches!(&answer, ax_proto::Response::Error(e) if e.contains("container runtime")),
        "{answer:?}"
    );
    let apps = d.apps();
    assert!(apps.iter().all(|a| a["container"].is_null()), "{apps:?}");
}
