//! `recvfrom`/`recvmsg` with an address buffer on a connection under ax
//! report what they report over TCP (issue 9): no address, length 0 — on
//! the server's side, which used to read the client's UNIX socket name
//! there. A real program (python3, calling libc's `recvfrom` and `recvmsg`
//! through ctypes to print the exact lengths) runs natively over TCP
//! loopback and under ax over a VIP, over localhost and with TCP Fast
//! Open; `accept`, `getpeername` and `getsockname` keep answering the
//! VIPs, also for a connection made before a daemon restart and for one
//! accepted only after it.

use std::process::Command;

use ax_e2e::{free_loopback_port, require, run, Daemon, TempDir, SHORT};

/// `server PORT [lazy]`: listens on the wildcard address, prints
/// `LISTENING`, then (after a line on stdin with `lazy`) serves every
/// connection in a thread of its own, printing what it sees as `S …`
/// lines. `client HOST PORT [fastopen]`: connects (or sends its first byte
/// with `MSG_FASTOPEN`), prints `C …` lines, then, for each `names` line
/// on stdin, has both ends print their names again. `both PORT HOST
/// [fastopen]`: a server and a client to HOST:PORT in one process.
///
/// The two ends play ping-pong with single bytes, so every receive has one
/// sender's byte to read.
const PROG: &str = r#"
import ctypes, socket, sys, threading

libc = ctypes.CDLL(None, use_errno=True)

class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]

def c_recvfrom(s):
    buf = ctypes.create_string_buffer(1)
    sa = ctypes.create_string_buffer(128)
    ln = ctypes.c_uint32(128)
    r = libc.recvfrom(s.fileno(), buf, 1, 0, sa, ctypes.byref(ln))
    if r != 1:
        raise OSError(ctypes.get_errno(), "recvfrom returned %d" % r)
    return ln.value

def c_recvmsg(s):
    buf = ctypes.create_string_buffer(1)
    sa = ctypes.create_string_buffer(128)
    iov = iovec(ctypes.cast(buf, ctypes.c_void_p), 1)
    m = msghdr(ctypes.cast(sa, ctypes.c_void_p), 128, ctypes.pointer(iov), 1, None, 0, 0)
    r = libc.recvmsg(s.fileno(), ctypes.byref(m), 0)
    if r != 1:
        raise OSError(ctypes.get_errno(), "recvmsg returned %d" % r)
    return m.namelen

OUT = threading.Lock()

def out(line):
    # One write per line, under a lock: print() writes the line and its
    # newline apart, and threads' lines would interleave.
    with OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def a(addr):
    return "%s %d" % (addr[0], addr[1])

def serve_one(c, addr, done):
    out("S ACCEPT " + a(addr))
    out("S PEER " + a(c.getpeername()))
    out("S SOCK " + a(c.getsockname()))
    out("S RECVFROM %d" % c_recvfrom(c))
    c.sendall(b"a")
    out("S RECVMSG %d" % c_recvmsg(c))
    c.sendall(b"b")
    if done:
        done.set()
    while True:
        d = c.recv(1)
        if not d:
            return
        out("S AGAIN PEER " + a(c.getpeername()) + " SOCK " + a(c.getsockname()))
        c.sendall(b"k")

def server(port, lazy, done=None):
    l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port))
    l.listen(16)
    out("LISTENING")
    if lazy:
        sys.stdin.readline()
    def loop():
        while True:
            c, addr = l.accept()
            threading.Thread(target=serve_one, args=(c, addr, done), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def client(host, port, fastopen):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if fastopen:
        s.sendto(b"1", socket.MSG_FASTOPEN, (host, port))
    else:
        s.connect((host, port))
        s.sendall(b"1")
    out("C SOCK " + a(s.getsockname()))
    out("C PEER " + a(s.getpeername()))
    out("C RECVFROM %d" % c_recvfrom(s))
    s.sendall(b"2")
    out("C RECVMSG %d" % c_recvmsg(s))
    return s

mode = sys.argv[1]
if mode == "server":
    server(int(sys.argv[2]), len(sys.argv) > 3)
    threading.Event().wait()
elif mode == "client":
    s = client(sys.argv[2], int(sys.argv[3]), len(sys.argv) > 4)
    out("C DONE")
    for line in sys.stdin:
        s.sendall(b"n")
        s.recv(1)
        out("C AGAIN SOCK " + a(s.getsockname()) + " PEER " + a(s.getpeername()))
elif mode == "both":
    done = threading.Event()
    server(int(sys.argv[2]), False, done)
    s = client(sys.argv[3], int(sys.argv[2]), len(sys.argv) > 4)
    done.wait(20)
    out("BOTH DONE")
"#;

fn prog(dir: &TempDir) -> String {
    dir.write("recvfrom_prog.py", PROG).display().to_string()
}

/// The value after `key ` on the first line that has it.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
}

/// The server side's receive lengths.
fn server_lengths(out: &str) -> (String, String) {
    (
        field(out, "S RECVFROM").to_string(),
        field(out, "S RECVMSG").to_string(),
    )
}

/// What the program prints natively, over TCP loopback.
fn native(p: &str, fastopen: bool) -> String {
    let port = free_loopback_port().to_string();
    let mut cmd = Command::new("python3");
    cmd.args([p, "both", &port, "127.0.0.1"]);
    if fastopen {
        cmd.arg("fastopen");
    }
    let o = run(&mut cmd, SHORT);
    o.assert_success();
    assert!(o.stdout.contains("BOTH DONE"), "native run: {}", o.stdout);
    o.stdout
}

/// Checks the names both ends print against each other: the server's
/// accept and getpeername are the client's own address, its getsockname
/// the address the client dialled.
fn check_names(server: &str, client: &str, dialled: &str) {
    let c_sock = field(client, "C SOCK");
    assert_eq!(field(client, "C PEER"), dialled, "client:\n{client}");
    assert_eq!(field(server, "S ACCEPT"), c_sock, "server:\n{server}");
    assert_eq!(field(server, "S PEER"), c_sock, "server:\n{server}");
    assert_eq!(field(server, "S SOCK"), dialled, "server:\n{server}");
}

fn vip_case(d: &Daemon, p: &str, server_ip: &str, client_ip: &str, fastopen: bool) {
    let mut server = d.spawn(&["--ip", server_ip], &["python3", p, "server", "8000"]);
    server.wait_for_stdout("LISTENING", SHORT);
    d.wait_for_service(&mut server, &format!("{server_ip}:8000"));
    let mut args = vec!["python3", p, "client", server_ip, "8000"];
    if fastopen {
        args.push("fastopen");
    }
    let mut client = d.spawn(&["--ip", client_ip], &args);
    let c_out = client.wait_for_stdout("C DONE", SHORT);
    let s_out = server.wait_for_stdout("S RECVMSG", SHORT);
    check_names(&s_out, &c_out, &format!("{server_ip} 8000"));
    assert!(
        field(&c_out, "C SOCK").starts_with(&format!("{client_ip} ")),
        "client's own address is not its VIP:\n{c_out}"
    );
    let want = server_lengths(&native(p, fastopen));
    assert_eq!(
        server_lengths(&s_out),
        want,
        "server-side recvfrom/recvmsg address lengths differ from TCP's (fastopen: {fastopen}):\n{s_out}"
    );
    client.close_stdin();
    client.wait(SHORT);
    server.kill();
}

#[test]
fn a_server_reads_no_address_as_over_tcp() {
    require!("python3");
    let dir = TempDir::new("recvfrom");
    let p = prog(&dir);
    let d = Daemon::start();
    vip_case(&d, &p, "10.233.9.10", "10.233.9.11", false);
}

#[test]
fn a_server_reads_no_address_after_fast_open() {
    require!("python3");
    let dir = TempDir::new("recvfrom");
    let p = prog(&dir);
    let d = Daemon::start();
    vip_case(&d, &p, "10.233.9.20", "10.233.9.21", true);
}

#[test]
fn a_server_reads_no_address_over_localhost() {
    require!("python3");
    let dir = TempDir::new("recvfrom");
    let p = prog(&dir);
    let d = Daemon::start();
    let port = free_loopback_port().to_string();
    let mut app = d.spawn(&[], &["python3", &p, "both", &port, "127.0.0.1"]);
    let o = app.wait_for_stdout("BOTH DONE", SHORT);
    let st = app.wait(SHORT);
    assert!(st.success(), "{}", app.report());
    check_names(&o, &o, &format!("127.0.0.1 {port}"));
    assert!(
        field(&o, "C SOCK").starts_with("127.0.0.1 "),
        "a loopback client is not at 127.0.0.1:\n{o}"
    );
    assert_eq!(
        server_lengths(&o),
        server_lengths(&native(&p, false)),
        "over localhost:\n{o}"
    );
}

#[test]
fn names_survive_a_daemon_restart() {
    require!("python3");
    let dir = TempDir::new("recvfrom");
    let p = prog(&dir);
    let mut d = Daemon::start();
    // Restarted by the test only: no launcher races it with one of its own.
    let (sip, cip) = ("10.233.9.30", "10.233.9.31");
    let mut server = d.spawn(
        &["--no-autostart", "--ip", sip],
        &["python3", &p, "server", "8000"],
    );
    server.wait_for_stdout("LISTENING", SHORT);
    d.wait_for_service(&mut server, &format!("{sip}:8000"));
    let mut client = d.spawn(
        &["--no-autostart", "--ip", cip],
        &["python3", &p, "client", sip, "8000"],
    );
    let c_out = client.wait_for_stdout("C DONE", SHORT);
    let s_out = server.wait_for_stdout("S RECVMSG", SHORT);
    check_names(&s_out, &c_out, &format!("{sip} 8000"));
    let c_sock = field(&c_out, "C SOCK").to_string();

    // A second server that accepts only when told: its connection waits in
    // the backlog across the restart.
    let (lip, kip) = ("10.233.9.32", "10.233.9.33");
    let mut lazy = d.spawn(
        &["--no-autostart", "--ip", lip],
        &["python3", &p, "server", "8000", "lazy"],
    );
    lazy.wait_for_stdout("LISTENING", SHORT);
    d.wait_for_service(&mut lazy, &format!("{lip}:8000"));
    let mut waiting = d.spawn(
        &["--no-autostart", "--ip", kip],
        &["python3", &p, "client", lip, "8000"],
    );
    // Connected (the hello and its first byte are queued) once it prints
    // its names; its recvfrom then waits for the server.
    let w_out = waiting.wait_for_stdout("C PEER", SHORT);

    d.kill_hard();
    d.restart();

    client.send("names\n");
    let c_again = client.wait_for_stdout("C AGAIN", SHORT);
    assert_eq!(
        field(&c_again, "C AGAIN SOCK"),
        format!("{c_sock} PEER {sip} 8000"),
        "client's names after the restart:\n{c_again}"
    );
    let s_again = server.wait_for_stdout("S AGAIN", SHORT);
    assert_eq!(
        field(&s_again, "S AGAIN PEER"),
        format!("{c_sock} SOCK {sip} 8000"),
        "server's names after the restart:\n{s_again}"
    );

    lazy.send("go\n");
    let l_out = lazy.wait_for_stdout("S RECVMSG", SHORT);
    let w_out = format!("{w_out}{}", waiting.wait_for_stdout("C DONE", SHORT));
    check_names(&l_out, &w_out, &format!("{lip} 8000"));
    assert_eq!(
        server_lengths(&l_out),
        ("0".to_string(), "0".to_string()),
        "a connection accepted after the restart:\n{l_out}"
    );
    for app in [&mut client, &mut waiting] {
        app.close_stdin();
        app.wait(SHORT);
    }
    for app in [&mut server, &mut lazy] {
        app.kill();
    }
}
