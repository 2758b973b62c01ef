//! Socket calls that must not tell a program it runs under ax (issue 9):
//! sshd and ssh over an IPv4 VIP (sshd drops a connection whose
//! `IP_OPTIONS` answer a non-zero length), and UDP to a VIP, which must
//! fail with `ENETUNREACH` rather than leave the host; and a client's VIP:port,
//! which no two live connections to one service share, as over TCP. The
//! option-by-option comparison with TCP is in `hostile.rs`.

use std::process::Command;
use std::time::Duration;

use ax_e2e::{free_loopback_port, note, require, run, Daemon, TempDir, SHORT};

const SSHD_VIP: &str = "10.233.0.160";
const UDP_VIP: &str = "10.233.0.161";

#[test]
fn ssh_runs_a_command_on_an_ipv4_vip() {
    require!("sshd", "ssh", "ssh-keygen");
    if !rustix::process::geteuid().is_root() {
        // Privilege separation needs root; unprivileged, sshd cannot log
        // anyone in but its own user, which it refuses without a password
        // database entry it can switch to.
        note("SKIP: ssh_runs_a_command_on_an_ipv4_vip: sshd's privilege separation needs root");
        return;
    }
    let dir = TempDir::new("sshd");
    let keygen = |path: &std::path::Path| {
        run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path),
            SHORT,
        )
        .assert_success();
    };
    let host_key = dir.join("host_key");
    let user_key = dir.join("user_key");
    keygen(&host_key);
    keygen(&user_key);
    let public = std::fs::read_to_string(dir.join("user_key.pub")).expect("public key");
    let authorized = dir.write("authorized_keys", &public);
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let port = free_loopback_port().to_string();
    let config = dir.write(
        "sshd_config",
        &format!(
            "Port {port}\nListenAddress 0.0.0.0\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel VERBOSE\n",
            host_key.display(),
            authorized.display()
        ),
    );
    let sshd = ax_e2e::find_program("sshd").expect("sshd");
    let d = Daemon::start();
    let mut server = d.spawn(
        &["--ip", SSHD_VIP],
        &[
            sshd.to_str().expect("utf-8 path"),
            "-D",
            "-e",
            "-f",
            config.to_str().expect("utf-8 path"),
        ],
    );
    d.wait_for_service(&mut server, &format!("{SSHD_VIP}:{port}"));
    let key = user_key.to_str().expect("utf-8 path");
    let out = d.run(
        &[],
        &[
            "ssh",
            "-i",
            key,
            "-p",
            &port,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            &format!("root@{SSHD_VIP}"),
            "echo",
            "ok",
        ],
    );
    let sshd_log = server.report();
    assert!(
        out.status.success() && out.stdout.trim() == "ok",
        "ssh to {SSHD_VIP}:{port} under ax: {out}\nsshd:\n{sshd_log}\ndaemon log:\n{}",
        d.log()
    );
    server.kill();
}

/// `python3 -c UDP ECHO_PORT VIP`: a native-style UDP echo on 127.0.0.1
/// (in a thread), then UDP `connect` and `sendto` to the VIP and to the
/// echo; prints one line per case.
const UDP: &str = r#"
import errno, socket, sys, threading
echo_port, vip = int(sys.argv[1]), sys.argv[2]
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
echo.bind(("127.0.0.1", echo_port))
def serve():
    while True:
        data, peer = echo.recvfrom(2048)
        echo.sendto(data, peer)
threading.Thread(target=serve, daemon=True).start()
def outcome(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def udp(family=socket.AF_INET):
    return socket.socket(family, socket.SOCK_DGRAM)
print("connect_vip", outcome(lambda: udp().connect((vip, 53))))
print("sendto_vip", outcome(lambda: udp().sendto(b"x", (vip, 53))))
s6 = udp(socket.AF_INET6)
print("sendto_mapped_vip", outcome(lambda: s6.sendto(b"x", ("::ffff:" + vip, 53))))
s = udp()
s.settimeout(10)
print("sendto_loopback", outcome(lambda: s.sendto(b"hello", ("127.0.0.1", echo_port))))
print("echo", s.recvfrom(2048)[0].decode())
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(10)
print("connect_loopback", outcome(lambda: c.connect(("127.0.0.1", echo_port))))
c.send(b"again")
print("echo", c.recv(2048).decode())
"#;

/// A route to a VIP through `lo`, in a table of its own (the main table,
/// which the isolation preflight checks, stays empty): natively, a datagram
/// to it is then accepted by the kernel and sent (to be dropped by
/// loopback, the only interface here), as one routed off a host with a
/// default route would be. Removed on drop.
struct LoRoute(&'static str);

impl LoRoute {
    const TABLE: &'static str = "4242";

    fn add(ip: &'static str) -> LoRoute {
        let dst = format!("{ip}/32");
        run(
            Command::new("ip").args(["route", "add", &dst, "dev", "lo", "table", Self::TABLE]),
            SHORT,
        )
        .assert_success();
        let route = LoRoute(ip);
        run(
            Command::new("ip").args(["rule", "add", "to", &dst, "table", Self::TABLE]),
            SHORT,
        )
        .assert_success();
        route
    }
}

impl Drop for LoRoute {
    fn drop(&mut self) {
        let dst = format!("{}/32", self.0);
        let _ = Command::new("ip")
            .args(["rule", "del", "to", &dst, "table", Self::TABLE])
            .status();
        let _ = Command::new("ip")
            .args(["route", "del", &dst, "dev", "lo", "table", Self::TABLE])
            .status();
    }
}

#[test]
fn udp_to_a_vip_is_unreachable_and_loopback_works() {
    require!("python3");
    // As root, give the VIP a route, so that it is ax, not the missing
    // route of this namespace, that refuses the datagrams.
    let _route = rustix::process::geteuid().is_root().then(|| {
        let route = LoRoute::add(UDP_VIP);
        let port = free_loopback_port().to_string();
        let native = run(
            Command::new("python3").args(["-c", UDP, &port, UDP_VIP]),
            SHORT,
        );
        native.assert_success();
        assert!(
            native.stdout.starts_with("connect_vip ok\nsendto_vip ok\n"),
            "natively, the routed VIP takes datagrams: {native}"
        );
        route
    });
    let d = Daemon::start();
    let port = free_loopback_port().to_string();
    let out = d.run(
        &["--ip", "10.233.0.162"],
        &["python3", "-c", UDP, &port, UDP_VIP],
    );
    out.assert_success();
    let want = "connect_vip ENETUNREACH\nsendto_vip ENETUNREACH\nsendto_mapped_vip ENETUNREACH\n\
                sendto_loopback ok\necho hello\nconnect_loopback ok\necho again\n";
    assert_eq!(out.stdout, want, "{out}\ndaemon log:\n{}", d.log());
    let log = d.log();
    assert_eq!(
        log.matches("UDP to a VIP is not brokered").count(),
        1,
        "logged once per app:\n{log}"
    );
}

/// Under ax: accepts on 0.0.0.0:PORT (argv[1]); keeps the connection that
/// sends `HOLD`, counts the others (each sends `ping`) and those whose peer
/// address is the held one's, and prints `N <count> DUPS <same peer>` when
/// one sends `END!`.
const PAIR_SERVER: &str = r#"
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(512)
held, hold, n, dups = None, None, 0, 0
while True:
    c, peer = l.accept()
    what = c.recv(4)
    if what == b"HOLD":
        hold, held = c, peer
        continue
    if what == b"END!":
        print("N", n, "DUPS", dups, "HELD", held, flush=True)
        break
    n += 1
    dups += peer == held
    c.close()
"#;

/// Under ax: holds one connection to VIP:PORT (argv[1], argv[2]), makes 100
/// more, waits until the broker's identity table has been swept twice
/// since (`ax_identity_sweeps_total` on the daemon's `--metrics` port,
/// argv[4]: the first sweep marks the closed connections, the second
/// forgets them), then makes argv[3] more, more than there are client
/// ports, and says `END!`.
const PAIR_CLIENT: &str = r#"
import socket, sys, time
vip, port, n, metrics = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def sweeps():
    host, mport = metrics.rsplit(":", 1)
    with socket.create_connection((host, int(mport)), timeout=5) as m:
        m.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        text = b"".join(iter(lambda: m.recv(65536), b"")).decode()
    return int(next(l.split()[1] for l in text.splitlines() if l.startswith("ax_identity_sweeps_total ")))
def one(msg):
    s = socket.create_connection((vip, port))
    s.sendall(msg)
    return s
hold = one(b"HOLD")
for _ in range(100):
    one(b"ping").close()
first = sweeps()
deadline = time.monotonic() + 30
while sweeps() < first + 2:
    if time.monotonic() > deadline:
        sys.exit("the identity table was not swept twice in 30 s")
    time.sleep(0.05)
for _ in range(n):
    one(b"ping").close()
one(b"END!").close()
hold.close()
print("DONE", flush=True)
"#;

#[test]
fn a_live_connection_keeps_its_client_port_to_itself() {
    require!("python3");
    const VIP: &str = "10.233.0.163";
    // The client ports, 32768-60999, and some: the counter comes round to
    // the held connection's port once.
    const MORE: u32 = 60999 - 32768 + 1 + 50;
    let metrics = format!("127.0.0.1:{}", free_loopback_port());
    let d = Daemon::start_with(&[], &["--metrics", &metrics]);
    let mut server = d.spawn(&["--ip", VIP], &["python3", "-c", PAIR_SERVER, "7000"]);
    d.wait_for_service(&mut server, &format!("{VIP}:7000"));
    let mut client = d.exec_command(
        &["--ip", "10.233.0.164"],
        &[
            "python3",
            "-c",
            PAIR_CLIENT,
            VIP,
            "7000",
            &MORE.to_string(),
            &metrics,
        ],
    );
    let out = run(&mut client, Duration::from_secs(120));
    out.assert_success();
    server.wait(SHORT);
    let said = server.stdout();
    assert_eq!(
        said.split_whitespace().take(4).collect::<Vec<_>>(),
        ["N", &(100 + MORE).to_string(), "DUPS", "0"],
        "every connection got through, none with the held one's address: {said}\n{out}"
    );
}

/// `python3 -c OPTIONS BIND_HOST CONNECT_HOST PORT FAMILY`: sets TCP/IP
/// options on a listener before its `bind` and on a client socket before
/// its `connect` (FAMILY `4` or `6`), connects the two, and prints the
/// options as the client, the listener and the accepted connection read
/// them.
const OPTIONS: &str = r#"
import socket, sys
bind_host, connect_host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if sys.argv[4] == "6" else socket.AF_INET
TCP = socket.IPPROTO_TCP
TOS = (socket.IPPROTO_IPV6, socket.IPV6_TCLASS) if sys.argv[4] == "6" else (socket.IPPROTO_IP, socket.IP_TOS)
FASTOPEN = 23
listener_opts = [(TCP, socket.TCP_NODELAY, 1), (TCP, socket.TCP_KEEPCNT, 3),
                 (TCP, socket.TCP_USER_TIMEOUT, 1234), (*TOS, 8),
                 (TCP, socket.TCP_DEFER_ACCEPT, 5), (TCP, FASTOPEN, 5)]
client_opts = [(TCP, socket.TCP_NODELAY, 1), (TCP, socket.TCP_KEEPIDLE, 77),
               (TCP, socket.TCP_KEEPINTVL, 11), (TCP, socket.TCP_USER_TIMEOUT, 4321),
               (*TOS, 16)]
l = socket.socket(family)
for level, name, value in listener_opts:
    l.setsockopt(level, name, value)
l.bind((bind_host, port))
l.listen()
c = socket.socket(family)
for level, name, value in client_opts:
    c.setsockopt(level, name, value)
c.connect((connect_host, port))
a, _ = l.accept()
def show(tag, s, opts):
    print(tag, " ".join(f"{name}={s.getsockopt(level, name)}" for level, name, _ in opts))
show("client", c, client_opts)
show("listener", l, listener_opts)
show("accepted", a, listener_opts)
"#;

/// TCP/IP options set before ax swaps a socket (before `connect` to a VIP,
/// before `bind`) read back afterwards as they would over TCP, and a
/// listener's options pass on to the connections it accepts (but
/// `TCP_DEFER_ACCEPT` and `TCP_FASTOPEN`, which TCP does not pass on).
#[test]
fn options_set_before_the_swap_and_on_listeners_read_as_over_tcp() {
    options_as_over_tcp(OPTIONS, "165", |family| {
        let tos = if family == "4" { "1=8" } else { "67=8" };
        format!("accepted 1=1 6=3 18=1234 {tos} 9=0 23=0")
    });
}

/// Runs `program` (`python3 -c PROGRAM BIND_HOST CONNECT_HOST PORT
/// FAMILY`) over TCP loopback and under ax (its VIP ending in `vip_tail`),
/// for IPv4 and IPv6, and asserts that it prints the same both ways, and
/// natively what `baseline(FAMILY)` says (so that the comparison compares
/// something).
fn options_as_over_tcp(program: &str, vip_tail: &str, baseline: impl Fn(&str) -> String) {
    require!("python3");
    let d = Daemon::start();
    for (family, loopback, wildcard, vip) in [
        ("4", "127.0.0.1", "0.0.0.0", format!("10.233.0.{vip_tail}")),
        ("6", "::1", "::", format!("fd00:a8::{vip_tail}")),
    ] {
        let port = free_loopback_port().to_string();
        let native = run(
            Command::new("python3").args(["-c", program, loopback, loopback, &port, family]),
            SHORT,
        );
        native.assert_success();
        let under_ax = d.run(
            &["--ip", &vip],
            &["python3", "-c", program, wildcard, &vip, "7000", family],
        );
        under_ax.assert_success();
        assert!(
            native.stdout.contains(&baseline(family)),
            "the native baseline is as expected: {native}"
        );
        assert_eq!(
            under_ax.stdout, native.stdout,
            "IPv{family} under ax as over TCP:\n{under_ax}\nnatively:\n{native}"
        );
    }
}

/// `python3 -c SOCKET_OPTIONS BIND_HOST CONNECT_HOST PORT FAMILY`: sets
/// socket-level options on a listener before its `bind` and after its
/// `listen`, and on a client socket before its `connect`; connects the two;
/// prints each option as the client, the listener and the accepted
/// connection read it; then reads from the accepted connection, which
/// nobody writes to: its receive timeout, taken from the listener, ends
/// the read.
const SOCKET_OPTIONS: &str = r#"
import socket, struct, sys, signal, time
bind_host, connect_host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if sys.argv[4] == "6" else socket.AF_INET
S = socket.SOL_SOCKET
def tv(sec, usec): return struct.pack("ll", sec, usec)
before_bind = [(socket.SO_RCVTIMEO, tv(0, 300000)), (socket.SO_SNDBUF, 65536),
               (socket.SO_LINGER, struct.pack("ii", 1, 7)), (socket.SO_PRIORITY, 3),
               (socket.SO_RCVLOWAT, 5)]
after_listen = [(socket.SO_RCVBUF, 70000)]
before_connect = [(socket.SO_SNDTIMEO, tv(2, 500000)), (socket.SO_RCVBUF, 50000),
                  (socket.SO_LINGER, struct.pack("ii", 1, 3)), (socket.SO_PRIORITY, 5),
                  (socket.SO_RCVLOWAT, 2)]
def show(tag, s, opts):
    vals = []
    for name, value in opts:
        if isinstance(value, bytes):
            vals.append(f"{name}={s.getsockopt(S, name, 16).hex()}")
        else:
            vals.append(f"{name}={s.getsockopt(S, name)}")
    print(tag, " ".join(vals))
l = socket.socket(family)
for name, value in before_bind:
    l.setsockopt(S, name, value)
l.bind((bind_host, port))
l.listen()
for name, value in after_listen:
    l.setsockopt(S, name, value)
c = socket.socket(family)
for name, value in before_connect:
    c.setsockopt(S, name, value)
c.connect((connect_host, port))
a, _ = l.accept()
show("client", c, before_connect)
show("listener", l, before_bind + after_listen)
show("accepted", a, before_bind + after_listen)
def hung(*_): raise SystemExit("the accepted connection's recv did not time out")
signal.signal(signal.SIGALRM, hung)
signal.alarm(5)
start = time.monotonic()
try:
    a.recv(1)
    print("recv returned")
except BlockingIOError:
    print("recv timed out", round(time.monotonic() - start, 1))
"#;

/// Socket-level options (timeouts, buffer sizes, `SO_LINGER`,
/// `SO_PRIORITY`, `SO_RCVLOWAT`) set before ax swaps a socket read back
/// afterwards as over TCP, and a listener's pass on to the connections it
/// accepts, as TCP's do (but `SO_PRIORITY`, which TCP does not pass on):
/// so a server that sets `SO_RCVTIMEO` on its listener gets connections
/// whose reads time out. Before, the client read the UNIX socket's
/// defaults and the accepted connection's read never ended.
#[test]
fn socket_level_options_carry_across_the_swap_as_over_tcp() {
    options_as_over_tcp(SOCKET_OPTIONS, "167", |_| {
        "12=0 18=5 8=140000\nrecv timed out 0.3".to_string()
    });
}
