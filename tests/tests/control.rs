//! The daemon's control socket is out of reach for programs under ax: they
//! may neither register apps nor read the registry, so they cannot change
//! their own identity or another app's. Clients that are not under ax (of
//! the same user) are served as usual.

use ax_e2e::{require, Daemon};

/// Sends one raw, valid `ListApps` frame and prints what comes back.
const RAW_CLIENT: &str = r#"
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        break
    except OSError as e:
        print("UNREACHABLE", path, e.errno)
else:
    sys.exit(0)
# length 3, version 1, Request::ListApps (variant 5)
s.sendall(b"\x00\x00\x00\x03\x01\x00\x05")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print("ANSWER", data[4:].decode("utf-8", "replace"))
"#;

#[test]
fn programs_under_ax_cannot_use_the_control_socket() {
    require!("python3");
    let d = Daemon::start();
    let sock = d.socket().to_str().expect("utf-8 socket path").to_string();
    let ax = ax_e2e::ax_bin();
    let ax = ax.to_str().expect("utf-8 path");

    // A nested `ax get` does not even find the socket: the daemon's
    // directory is an empty tmpfs for programs under ax.
    let nested = d.run(&[], &[ax, "get", "apps", "--socket", &sock]);
    assert_eq!(nested.code(), Some(1), "nested ax get: {nested}");
    assert!(nested.stderr.contains("no daemon is listening"), "{nested}");
    // So is a nested `ax exec`: no app gets registered by it.
    let nested_exec = d.run(
        &["--no-autostart"],
        &[ax, "exec", "--socket", &sock, "--", "true"],
    );
    assert_ne!(nested_exec.code(), Some(0), "nested ax exec: {nested_exec}");
    // A hand-made client speaking the protocol directly, reaching the
    // socket through the daemon's /proc root (open to root only: a program
    // in a user namespace of its own may not follow it), is refused.
    let via_proc = format!("/proc/{}/root{sock}", d.pid());
    let raw = d.run(&[], &["python3", "-c", RAW_CLIENT, &sock, &via_proc]);
    assert!(
        raw.stdout.contains(&format!("UNREACHABLE {sock} ")),
        "{raw}"
    );
    assert!(
        !raw.stdout.contains("python3"),
        "the registry leaked: {raw}"
    );
    if rustix::process::geteuid().is_root() {
        assert!(raw.stdout.contains("ANSWER"), "{raw}");
        assert!(raw.stdout.contains("permission denied"), "{raw}");
        assert!(
            d.log().contains("refusing a program under ax"),
            "{}",
            d.log()
        );
    } else {
        assert!(
            raw.stdout.contains(&format!("UNREACHABLE {via_proc} ")),
            "{raw}"
        );
    }

    // None of the refused programs' attempts registered anything, and a
    // client that is not under ax is still served.
    let apps = d.apps();
    assert!(apps.is_empty(), "apps left behind: {apps:?}");
}

/// A threaded echo server whose main thread sits in a blocking `accept`
/// (a trapped call the daemon holds for as long as no client comes).
const BLOCKING_SERVER: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7300)); s.listen(64)
def serve(c):
    with c:
        while True:
            b = c.recv(100)
            if not b:
                return
            c.sendall(b)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Holds one connection, echoing a line per line of stdin; then opens a new
/// connection when told to.
const HOLDING_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection(("10.233.7.1", 7300), timeout=20)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "new":
        d = socket.create_connection(("10.233.7.1", 7300), timeout=20)
        d.sendall(b"fresh"); print("NEW", d.recv(100).decode(), flush=True)
    else:
        c.sendall(cmd.encode()); print("ECHO", c.recv(100).decode(), flush=True)
"#;

/// The daemon is killed while a server waits in a trapped `accept` and a
/// client holds an established connection; a new daemon on the same socket
/// takes the apps over: the held connection never notices, the waiting
/// accept is finished from the journal when a new client comes, and the
/// registry lists the same apps and services.
#[test]
fn daemon_killed_while_idle_is_taken_over() {
    use std::time::Duration;
    require!("python3");
    let mut d = Daemon::start();
    let mut server = d.spawn(
        &["--no-autostart", "--ip", "10.233.7.1"],
        &["python3", "-c", BLOCKING_SERVER],
    );
    d.wait_for_service(&mut server, "10.233.7.1:7300");
    let mut client = d.spawn(&["--no-autostart"], &["python3", "-c", HOLDING_CLIENT]);
    client.send("one\n");
    client.wait_for_stdout("ECHO one", Duration::from_secs(20));
    let apps_before = d.apps();
    let services_before = d.services();

    d.kill_hard();
    d.restart();
    // The launchers hand their programs over; wait until both are served.
    let back = ax_e2e::poll(Duration::from_secs(15), Duration::from_millis(20), || {
        (d.log().matches("app handed over again").count() >= 2).then_some(())
    });
    assert!(back.is_some(), "apps not handed over:\n{}", d.log());

    client.send("two\n");
    client.wait_for_stdout("ECHO two", Duration::from_secs(20));
    client.send("new\n");
    client.wait_for_stdout("NEW fresh", Duration::from_secs(20));
    assert!(
        d.log()
            .contains("finishing a call the previous daemon left unanswered"),
        "the server's waiting accept was not finished from the journal:\n{}",
        d.log()
    );
    let ids = |v: &[ax_e2e::serde_json::Value]| {
        let mut x: Vec<String> = v
            .iter()
            .map(|a| format!("{} {} {}", a["id"], a["vips"], a["pid"]))
            .collect();
        x.sort();
        x
    };
    assert_eq!(ids(&apps_before), ids(&d.apps()));
    assert_eq!(services_before.len(), d.services().len());
}
