//! Issue 8, item 4: TCP Fast Open must not go around the trap.
//!
//! `sendto(fd, buf, len, MSG_FASTOPEN, VIP)` (and `sendmsg` with the flag)
//! connects without a `connect` call. Before the fix the filter let it
//! through: the SYN went to the VIP by the host's routes (`ENETUNREACH` in
//! the test's network namespace, off the machine on a host with a default
//! route) and the policy was never asked. Now such a send is a connect
//! plus a send: to a VIP through ax (policy, UNIX shortcut, then the data),
//! to anything else as the kernel would. Also: `sendto` with an address on
//! a connected swapped socket sends, as TCP does, instead of `EISCONN`.

use std::process::Command;
use std::time::Duration;

use ax_e2e::{free_loopback_port, poll, require, run, App, Daemon, TempDir, SHORT};

/// `python3 -c SCRIPT ARGS…`
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// Listens on 0.0.0.0:PORT; prints `READY PID`, then `GOT <bytes>` for
/// every chunk any connection sends.
const SERVER: &str = r#"
import os, socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("READY", os.getpid(), flush=True)
def serve(c):
    while True:
        b = c.recv(4096)
        if not b:
            break
        print("GOT", b.decode(), flush=True)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The attacks, one per argv[3]: a Fast Open `sendto`/`sendmsg` to
/// HOST:PORT, on a fresh TCP socket. Prints `SENT n PEERPID p` (the pid
/// `SO_PEERCRED` reports: 0 on a TCP socket, the server's on the UNIX
/// socket ax installs) or `ERRNO e`.
const FASTOPEN: &str = r#"
import socket, struct, sys
host, port, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
try:
    if how == "sendto":
        n = s.sendto(b"hello", socket.MSG_FASTOPEN, (host, port))
    else:
        n = s.sendmsg([b"hel", b"lo"], [], socket.MSG_FASTOPEN, (host, port))
except OSError as e:
    print("ERRNO", e.errno, flush=True)
    sys.exit(0)
cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
print("SENT", n, "PEERPID", struct.unpack("3i", cred)[0], flush=True)
s.close()
"#;

/// Connects to HOST:PORT (blocking, then in Python's timeout mode, which
/// connects without blocking), sends with an address (which TCP ignores),
/// then tries a Fast Open on the connected socket. Prints one line per
/// step: `MODE STEP n` or `MODE STEP ERRNO e`.
const ADDRESSED: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for mode, timeout in (("blocking", None), ("timeout", 10)):
    s = socket.create_connection((host, port), timeout=timeout)
    for step, args in (("ADDRESSED", (b"again", ("192.0.2.1", 9))),
                       ("FASTOPEN", (b"x", socket.MSG_FASTOPEN, (host, port)))):
        try:
            print(mode, step, s.sendto(*args), flush=True)
        except OSError as e:
            print(mode, step, "ERRNO", e.errno, flush=True)
    s.close()
"#;

/// What [`ADDRESSED`] prints natively (checked against the kernel by the
/// test): TCP ignores the address; a Fast Open on a connected socket is
/// `EISCONN`, except after a non-blocking connect, which the kernel
/// completes then, and sends.
const ADDRESSED_NATIVE: &str = "blocking ADDRESSED 5\nblocking FASTOPEN ERRNO 106\n\
                                timeout ADDRESSED 5\ntimeout FASTOPEN 1";

fn start_server(d: &Daemon, vip: &str, port: u16) -> (App, u32) {
    let mut server = d.spawn(&["--ip", vip], &py(SERVER, &[&port.to_string()]));
    server.wait_for_stdout("READY", SHORT);
    // Read once its line is whole (the file may be read mid-write).
    let pid = poll(SHORT, Duration::from_millis(10), || {
        server
            .stdout()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .find_map(|l| l.strip_prefix("READY "))
            .and_then(|p| p.trim().parse().ok())
    });
    let Some(pid) = pid else {
        panic!("no server pid: {}", server.report());
    };
    d.wait_for_service(&mut server, &format!("{vip}:{port}"));
    (server, pid)
}

fn fastopen(d: &Daemon, opts: &[&str], host: &str, port: u16, how: &str) -> String {
    let out = d.run(opts, &py(FASTOPEN, &[host, &port.to_string(), how]));
    out.assert_success();
    out.stdout.trim().to_string()
}

/// Waits until the server printed `GOT needle`.
fn server_got(server: &App, needle: &str) -> bool {
    let want = format!("GOT {needle}");
    poll(SHORT, Duration::from_millis(20), || {
        server.stdout().contains(&want).then_some(())
    })
    .is_some()
}

#[test]
fn fast_open_to_a_denied_or_missing_service_is_refused() {
    require!("python3");
    let dir = TempDir::new("tfo-deny");
    let policy = dir.write("policy.toml", "default = \"deny\"\n");
    let d = Daemon::start_with(&[], &["--policy", policy.to_str().expect("utf-8")]);
    let vip = "10.233.0.160";
    let port = 8760;
    let (mut server, _) = start_server(&d, vip, port);
    for how in ["sendto", "sendmsg"] {
        // Before the fix: ERRNO 101 (ENETUNREACH), the SYN routed natively.
        assert_eq!(
            fastopen(&d, &["--ip", "10.233.0.161"], vip, port, how),
            "ERRNO 111",
            "{how}: a denied Fast Open must be refused\n{}",
            d.log()
        );
        // Nobody serves this VIP:port.
        assert_eq!(
            fastopen(&d, &["--ip", "10.233.0.161"], vip, port + 1, how),
            "ERRNO 111",
            "{how}: a Fast Open to no service must be refused"
        );
    }
    assert!(
        d.log().contains("connect denied by policy"),
        "the policy was not asked:\n{}",
        d.log()
    );
    // The server saw nothing (its accept would print what came).
    assert!(!server.stdout().contains("GOT"), "{}", server.stdout());
    server.kill();
}

#[test]
fn fast_open_to_an_allowed_service_uses_the_unix_shortcut() {
    require!("python3");
    let d = Daemon::start();
    let vip = "10.233.0.162";
    let port = 8762;
    let (mut server, server_pid) = start_server(&d, vip, port);
    for how in ["sendto", "sendmsg"] {
        let out = fastopen(&d, &["--ip", "10.233.0.163"], vip, port, how);
        // SO_PEERCRED: a TCP socket has no peer process (0); the UNIX
        // socket ax installed reports the server that listened.
        assert_eq!(
            out,
            format!("SENT 5 PEERPID {server_pid}"),
            "{how}\n{}",
            d.log()
        );
        assert!(server_got(&server, "hello"), "{how}: {}", server.stdout());
    }
    server.kill();
}

#[test]
fn fast_open_elsewhere_is_left_to_the_kernel() {
    require!("python3");
    let d = Daemon::start();
    let port = free_loopback_port();
    // A native server on a host address: egress, done by the broker on the
    // program's own socket, so the kernel connects and sends.
    let mut native = App::spawn({
        let mut c = Command::new("python3");
        c.args(["-c", SERVER, &port.to_string()]);
        c
    });
    native.wait_for_stdout("READY", SHORT);
    let out = fastopen(&d, &[], "127.0.0.1", port, "sendto");
    assert_eq!(out, "SENT 5 PEERPID 0", "{}", d.log());
    assert!(server_got(&native, "hello"), "{}", native.stdout());
    // A closed port: the kernel's refusal.
    let closed = free_loopback_port();
    assert_eq!(
        fastopen(&d, &[], "127.0.0.1", closed, "sendmsg"),
        "ERRNO 111"
    );
    native.kill();
}

#[test]
fn sendto_with_an_address_on_a_connected_swapped_socket_sends() {
    require!("python3");
    let d = Daemon::start();
    let vip = "10.233.0.164";
    let port = 8764;
    let (mut server, _) = start_server(&d, vip, port);
    // The reference: the same program against a native server.
    let native_port = free_loopback_port();
    let mut native_server = App::spawn({
        let mut c = Command::new("python3");
        c.args(["-c", SERVER, &native_port.to_string()]);
        c
    });
    native_server.wait_for_stdout("READY", SHORT);
    let native = run(
        Command::new("python3").args(["-c", ADDRESSED, "127.0.0.1", &native_port.to_string()]),
        SHORT,
    );
    native.assert_success();
    assert_eq!(native.stdout.trim(), ADDRESSED_NATIVE, "natively: {native}");
    native_server.kill();

    let out = d.run(
        &["--ip", "10.233.0.165"],
        &py(ADDRESSED, &[vip, &port.to_string()]),
    );
    out.assert_success();
    // Before the fix: ADDRESSED ERRNO 106 (EISCONN, the UNIX socket's answer).
    assert_eq!(out.stdout.trim(), ADDRESSED_NATIVE, "{out}\n{}", d.log());
    assert!(server_got(&server, "again"), "{}", server.stdout());
    server.kill();
}
