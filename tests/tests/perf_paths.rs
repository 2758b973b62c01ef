//! The faster paths of issue 12 keep the kernel's behaviour: a blocking
//! egress connect to a loopback address (tried on the broker's receive
//! thread for a jiffy) connects, leaves the socket's send timeout unset,
//! still waits for a listener whose queue is full without stalling the
//! program's other calls, and a program's own send timeout still bounds
//! it (`EINPROGRESS`, as natively). Real program: python3, against native
//! listeners of the test on 127.0.0.1.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use ax_e2e::{require, Daemon, SHORT};

/// Under ax: connects to 127.0.0.1:PORT (argv[1]) as asked by argv[2]:
/// * `plain`: 20 blocking connects, each printing `OK <sndtimeo sec> <usec>`;
/// * `full`: one blocking connect on a thread while the main thread times
///   trapped calls (`getsockname` of fresh sockets) for 0.5 s and prints
///   `B <max ms>`; then `A <errno> <sndtimeo sec> <usec>` once it returns;
/// * `own`: a blocking connect with SO_SNDTIMEO 0.3 s of its own:
///   `OWN <errno> <elapsed ms> <sndtimeo sec> <usec>`.
const CLIENT: &str = r#"
import errno, socket, struct, sys, threading, time
port, mode = int(sys.argv[1]), sys.argv[2]
def timeo(s):
    sec, usec = struct.unpack("ll", s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
    return "%d %d" % (sec, usec)
def connect(s):
    try:
        s.connect(("127.0.0.1", port))
        return 0
    except OSError as e:
        return e.errno
if mode == "plain":
    for _ in range(20):
        s = socket.socket()
        print("OK" if connect(s) == 0 else "FAIL", timeo(s), flush=True)
        s.close()
elif mode == "full":
    s = socket.socket()
    out = {}
    t = threading.Thread(target=lambda: out.update(e=connect(s)))
    t.start()
    worst, end = 0.0, time.monotonic() + 0.5
    while time.monotonic() < end:
        u = socket.socket()
        t0 = time.monotonic()
        u.getsockname()
        worst = max(worst, time.monotonic() - t0)
        u.close()
    print("B %.1f" % (worst * 1000), flush=True)
    t.join()
    print("A", out["e"], timeo(s), flush=True)
elif mode == "own":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 300000))
    t0 = time.monotonic()
    e = connect(s)
    print("OWN", e, int((time.monotonic() - t0) * 1000), timeo(s), flush=True)
"#;

/// A native listener on 127.0.0.1 with a listen backlog of 0, its accept
/// queue filled by one connection: further SYNs are dropped until it
/// accepts.
fn full_listener() -> (OwnedFd, u16, TcpStream) {
    use rustix::net::{bind, listen, socket, AddressFamily, SocketType};
    let l = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    bind(&l, &any).expect("bind");
    listen(&l, 0).expect("listen");
    let name = rustix::net::getsockname(&l).expect("getsockname");
    let port = SocketAddr::try_from(name).expect("inet").port();
    let filler = TcpStream::connect(("127.0.0.1", port)).expect("filler connect");
    (l, port, filler)
}

#[test]
fn loopback_egress_connects_and_leaves_the_send_timeout_unset() {
    require!("python3");
    let d = Daemon::start();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let out = d.run(&[], &["python3", "-c", CLIENT, &port.to_string(), "plain"]);
    out.assert_success();
    let text = &out.stdout;
    assert_eq!(
        text.lines().filter(|l| *l == "OK 0 0").count(),
        20,
        "every connect succeeds and leaves SO_SNDTIMEO unset:\n{text}"
    );
    // The kernel saw them: 20 connections wait in the native listener.
    l.set_nonblocking(true).unwrap();
    let accepted = std::iter::from_fn(|| l.accept().ok()).count();
    assert_eq!(accepted, 20);
}

#[test]
fn loopback_egress_to_a_full_queue_waits_without_stalling_the_app() {
    require!("python3");
    let d = Daemon::start();
    let (l, port, mut filler) = full_listener();
    let mut app = d.spawn(&[], &["python3", "-c", CLIENT, &port.to_string(), "full"]);
    let b = app.wait_for_stdout("B ", SHORT);
    // Room in the queue: the retransmitted SYN gets in.
    let first = rustix::net::accept(&l).expect("accept the filler");
    let out = app.wait_for_stdout("A ", SHORT);
    app.wait(SHORT);
    let worst: f64 = b
        .lines()
        .find_map(|l| l.strip_prefix("B "))
        .and_then(|v| v.trim().parse().ok())
        .expect("B line");
    assert!(
        worst < 200.0,
        "a trapped call waited {worst} ms behind the pending connect:\n{out}"
    );
    assert!(
        out.lines().any(|l| l == "A 0 0 0"),
        "the blocking connect completes once the queue has room, SO_SNDTIMEO unset:\n{out}"
    );
    drop(first);
    let mut buf = [0u8; 1];
    filler.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let _ = filler.read(&mut buf);
}

#[test]
fn own_send_timeout_bounds_a_loopback_egress_connect() {
    require!("python3");
    let d = Daemon::start();
    let (_l, port, _filler) = full_listener();
    let started = Instant::now();
    let out = d.run(&[], &["python3", "-c", CLIENT, &port.to_string(), "own"]);
    out.assert_success();
    let text = &out.stdout;
    let line = text
        .lines()
        .find(|l| l.starts_with("OWN "))
        .unwrap_or_else(|| panic!("no OWN line:\n{text}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    // As natively: a blocking connect whose send timeout runs out is
    // EINPROGRESS, after about that long, and the timeout stays the
    // program's.
    assert_eq!(f[1], "115", "EINPROGRESS expected: {line}");
    let ms: u64 = f[2].parse().unwrap();
    assert!((250..5000).contains(&ms), "waited {ms} ms: {line}");
    assert_eq!((f[3], f[4]), ("0", "300000"), "{line}");
    assert!(started.elapsed() < SHORT);
}
