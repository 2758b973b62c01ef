//! Bad input, answered exactly as the kernel would.
//!
//! `tests/programs/hostile.c` makes bind/connect/accept/accept4/
//! getsockname/getpeername/setsockopt/getsockopt calls, and sendto/
//! sendmsg/sendmmsg with an address or `MSG_FASTOPEN`, with hostile
//! arguments (NULL, unmapped and read-only pointers, short, huge and
//! negative lengths, unknown families, sockets in the wrong state, fds
//! that are not sockets or not open, `int` arguments with garbage in their
//! upper 32 bits) as raw system calls, and prints one line per case:
//! `case return errno [what was written]`.
//!
//! It runs twice: natively, against a TCP server on 127.0.0.1, and under
//! `ax exec`, against the same server program serving a VIP under ax — so
//! that the cases that need a connected or listening socket hit real TCP
//! sockets in the first run and swapped ones in the second. Every line must
//! be the same. The whole table is printed.
//!
//! A sweep then reads every option of `SOL_IP`, `SOL_IPV6` and `SOL_TCP`
//! (0 to 80, 80 and 48) and of `SOL_SOCKET` (0 to 80) with a 256-byte
//! buffer on a connected socket, an IPv4 and an IPv6 listener (value,
//! length, errno), sets each IP/IPv6/TCP option and the socket-level ones
//! TCP and UNIX answer differently to a zero `int` on the connected
//! socket, and reads everything back. Left out of the sweep, because two
//! real TCP sockets already answer them differently:
//! * `SO_SNDBUF`/`SO_RCVBUF` (not trapped: the UNIX socket's sizes, which
//!   programs only use as hints), `SO_PEERCRED`, `SO_PEERSEC`,
//!   `SO_PEERNAME`, `SO_PEERGROUPS`, `SO_PEERPIDFD` (UNIX peers only, and
//!   the last returns a new fd), `SO_COOKIE`, `SO_NETNS_COOKIE`,
//!   `SO_MEMINFO`, `SO_INCOMING_CPU`, `SO_INCOMING_NAPI_ID` (per socket,
//!   per CPU or per queue);
//! * `IP_PROTOCOL` (for TCP the kernel answers the local port: under ax
//!   the probe's port, not the program's; nothing is known to read it),
//!   `TCP_TIMESTAMP` (a random offset per connection), `TCP_INFO` and
//!   `TCP_CC_INFO` (live counters), `TCP_ZEROCOPY_RECEIVE` (reads a request
//!   from the buffer);
//! * `TCP_MAXSEG` read back after the sweep of sets: the sets moved the
//!   native connection's MSS.
//!
//! Cases left out, and why:
//! * `connect(AF_UNSPEC)` on a *listening* socket: TCP stops listening and
//!   keeps the port bound; a UNIX listener cannot stop listening, and the
//!   service cannot be half-withdrawn while other processes may share the
//!   listener. (On connected sockets, which programs do disconnect, it is
//!   tested.)
//! * `TCP_INFO` and other read-only TCP state: a UNIX socket has none.
//! * `MSG_FASTOPEN` on an `AF_UNIX` (or other non-IP) socket: the kernel
//!   ignores the flag and sends; ax answers `EOPNOTSUPP` rather than send
//!   with the broker's credentials or let the kernel look the fd up again
//!   (see `broker/src/handlers/send.rs`).

use std::collections::BTreeMap;
use std::process::Command;

use ax_e2e::{free_loopback_port, require, run, App, Daemon, TempDir, SHORT};

const SOURCE: &str = include_str!("../programs/hostile.c");

/// `python3 -c SERVER HOST PORT`: accepts connections and holds each one
/// until the peer closes or resets it; prints `{"port": …}` when listening.
const SERVER: &str = r#"
import json, os, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(128)
print(json.dumps({"port": srv.getsockname()[1], "pid": os.getpid()}), flush=True)
def hold(c):
    try:
        while c.recv(4096):
            pass
    except OSError:
        pass
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=hold, args=(c,), daemon=True).start()
"#;

const SERVER_VIP: &str = "10.233.0.150";
const CLIENT_VIP: &str = "10.233.0.151";

/// Compiles the test program into `dir`.
fn compile(dir: &TempDir) -> String {
    let src = dir.write("hostile.c", SOURCE);
    let bin = dir.join("hostile");
    let out = run(
        Command::new("cc")
            .args(["-O1", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src),
        SHORT,
    );
    out.assert_success();
    bin.to_str().expect("utf-8 path").to_string()
}

/// `n` distinct TCP ports that were free on 127.0.0.1 a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let p = free_loopback_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// The program's result lines, in order, as (case, result).
fn results(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty() && *l != "DONE")
        .map(|l| match l.split_once(' ') {
            Some((case, rest)) => (case.to_string(), rest.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

#[test]
fn hostile_arguments_are_answered_as_the_kernel_would() {
    require!("cc", "python3");
    let dir = TempDir::new("hostile");
    let bin = compile(&dir);
    let ports = free_ports(4);
    let [port, self_port, self6_port, closed_port] = [ports[0], ports[1], ports[2], ports[3]];
    let (port, self_port, self6_port, closed_port) = (
        port.to_string(),
        self_port.to_string(),
        self6_port.to_string(),
        closed_port.to_string(),
    );

    // Reference: everything native, over loopback TCP. The server stays up
    // for the second run, where it is the egress destination.
    let mut native_server = App::spawn({
        let mut c = Command::new("python3");
        c.args(["-c", SERVER, "127.0.0.1", &port]);
        c
    });
    native_server.wait_for_stdout("port", SHORT);
    let native = run(
        Command::new(&bin).args([
            "127.0.0.1",
            &port,
            "127.0.0.1",
            &self_port,
            &self6_port,
            &closed_port,
            "127.0.0.1",
            &port,
        ]),
        SHORT,
    );
    native.assert_success();
    assert!(
        native.stdout.contains("DONE"),
        "native run did not finish: {native}"
    );

    // Under ax: the server on a VIP, the program on another.
    let d = Daemon::start();
    let mut server = d.spawn(
        &["--ip", SERVER_VIP],
        &["python3", "-c", SERVER, "0.0.0.0", &port],
    );
    d.wait_for_service(&mut server, &format!("{SERVER_VIP}:{port}"));
    let under_ax = d.run(
        &["--ip", CLIENT_VIP],
        &[
            bin.as_str(),
            SERVER_VIP,
            &port,
            CLIENT_VIP,
            &self_port,
            &self6_port,
            &closed_port,
            "127.0.0.1",
            &port,
        ],
    );

    let want = results(&native.stdout);
    let got: BTreeMap<String, String> = results(&under_ax.stdout).into_iter().collect();
    let width = want.iter().map(|(c, _)| c.len()).max().unwrap_or(4).max(4);
    let col = want.iter().map(|(_, r)| r.len()).max().unwrap_or(6).max(6);
    let mut table = format!(
        "{:width$}  {:col$}  {:col$}  match\n",
        "case", "native", "ax"
    );
    let mut mismatches = Vec::new();
    for (case, native_result) in &want {
        let ax_result = got.get(case).map(String::as_str).unwrap_or("(missing)");
        let same = ax_result == native_result;
        if !same {
            mismatches.push(case.clone());
        }
        table.push_str(&format!(
            "{case:width$}  {native_result:col$}  {ax_result:col$}  {}\n",
            if same { "yes" } else { "NO" }
        ));
    }
    let extra: Vec<&String> = got
        .keys()
        .filter(|k| !want.iter().any(|(c, _)| c == *k))
        .collect();
    eprintln!(
        "hostile arguments, native TCP vs under ax ({} cases, {} mismatches):\n{table}",
        want.len(),
        mismatches.len()
    );
    assert!(
        under_ax.stdout.contains("DONE") && under_ax.status.success(),
        "the run under ax did not finish: {under_ax}\ndaemon log:\n{}",
        d.log()
    );
    assert!(
        mismatches.is_empty() && extra.is_empty(),
        "{} of {} cases answered differently under ax: {mismatches:?} (extra cases: {extra:?})",
        mismatches.len(),
        want.len()
    );
}
