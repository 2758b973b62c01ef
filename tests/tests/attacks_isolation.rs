//! Attacks on what separates a program under ax from the daemon and from
//! other apps (issue 8, items 3, 6 and 7), replayed as real programs; each
//! must fail. Run by `scripts/test.sh` as root and as an unprivileged user.
//!
//! * A program races the broker's look at a `connect`: it swaps a UNIX
//!   socket onto the fd number the broker saw as a pipe, connecting to the
//!   daemon's control socket (reached through `/proc/<daemon>/root`, since
//!   its own view of the daemon's directory is an empty tmpfs). The daemon
//!   must never serve it.
//! * A program rewrites `/etc/hosts`, or the daemon's file behind it: other
//!   apps must still resolve names as the daemon says.
//! * A program forbids itself TCP connects with Landlock: it must get
//!   `EACCES` under ax as it does natively (and a program restricted on
//!   the file system only still connects, through the kernel).
//! * `connect`/`bind` on a pipe are answered `ENOTSOCK` by the broker
//!   itself, exactly as natively.

use std::process::Command;

use ax_e2e::{free_loopback_port, note, require, run, App, Daemon, TempDir, SHORT};

/// Two threads: the main one connects fd `N` to the control socket while
/// the other flips `N` between a pipe and a fresh UNIX socket. Whenever a socket got connected it
/// sends a `ListApps` frame and reads the answer. Prints one line:
/// `tries T connected C served S refused R reachable 0|1`, after trying
/// each path in argv for the first one that leads to the socket at all.
const RACE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N 100
static atomic_int go, done, idle;
static int sock_fd = -1, pipe_fd = -1;

/* While `go` is set, flips fd N between the socket and the pipe. */
static void *flipper(void *arg) {
    (void)arg;
    while (!atomic_load(&done)) {
        if (atomic_load(&go)) {
            dup2(sock_fd, N);
            dup2(pipe_fd, N);
        } else {
            atomic_store(&idle, 1);
        }
    }
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One try, in a fresh process (nothing the broker noted about an earlier
   one applies): 0 not connected, 1 connected and refused, 2 served. */
static int attempt(const struct sockaddr_un *sa) {
    int p[2];
    if (pipe(p)) return 0;
    pipe_fd = p[0];
    sock_fd = socket(AF_UNIX, SOCK_STREAM, 0);
    dup2(pipe_fd, N);
    pthread_t t;
    pthread_create(&t, NULL, flipper, NULL);
    atomic_store(&go, 1);
    connect(N, (const struct sockaddr *)sa, sizeof *sa);
    atomic_store(&go, 0);
    atomic_store(&idle, 0);
    while (!atomic_load(&idle)) {}
    atomic_store(&done, 1);
    pthread_join(t, NULL);
    /* Whether the socket or the pipe was connected, the socket tells. */
    struct sockaddr_un peer;
    socklen_t len = sizeof peer;
    if (getpeername(sock_fd, (struct sockaddr *)&peer, &len) != 0) return 0;
    const char frame[] = "\x00\x00\x00\x03\x01\x00\x05";
    send(sock_fd, frame, 7, MSG_NOSIGNAL);
    /* One answer frame: a 4-byte big-endian length, then that. */
    char buf[4096];
    size_t got = 0, want = 4;
    ssize_t n;
    while (got < want && (n = recv(sock_fd, buf + got, want - got, 0)) > 0) {
        got += n;
        if (got == 4) {
            unsigned l = ((unsigned char)buf[0] << 24 | (unsigned char)buf[1] << 16 |
                          (unsigned char)buf[2] << 8 | (unsigned char)buf[3]);
            want = 4 + (l < sizeof buf - 5 ? l : sizeof buf - 5);
        }
    }
    buf[got] = 0;
    if (got > 4 && !memmem(buf, got, "permission denied", 17)) {
        fprintf(stderr, "SERVED: %.200s\n", buf + 4);
        return 2;
    }
    return 1;
}

static int in_child(int (*f)(const void *), const void *arg) {
    pid_t pid = fork();
    if (pid == 0) _exit(f(arg));
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return -1;
    return WEXITSTATUS(st);
}

static int probe(const void *arg) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    return connect(s, (const struct sockaddr *)arg, sizeof(struct sockaddr_un)) == 0 ? 0 : errno;
}

static int race(const void *arg) { return attempt(arg); }

int main(int argc, char **argv) {
    /* The first path given that leads to the socket at all. */
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int reachable = 0;
    for (int i = 1; i < argc && !reachable; i++) {
        strncpy(sa.sun_path, argv[i], sizeof(sa.sun_path) - 1);
        int e = in_child(probe, &sa);
        if (e == 0) reachable = 1;
        else printf("UNREACHABLE %s %s\n", argv[i], strerror(e));
    }
    int tries = 0, connected = 0, served = 0, refused = 0;
    double end = now() + 5.0;
    while (reachable && tries < 2000 && now() < end) {
        int r = in_child(race, &sa);
        tries++;
        if (r >= 1) connected++;
        if (r == 1) refused++;
        if (r == 2) served++;
    }
    printf("tries %d connected %d served %d refused %d reachable %d\n", tries, connected, served,
           refused, reachable);
    return 0;
}
"#;

/// Compiles `source` as `name` in `dir`.
fn compile(dir: &TempDir, name: &str, source: &str) -> String {
    let src = dir.write(&format!("{name}.c"), source);
    let bin = dir.join(name);
    run(
        Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src),
        SHORT,
    )
    .assert_success();
    bin.to_str().expect("utf-8 path").to_string()
}

fn field(line: &str, name: &str) -> u64 {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    panic!("no `{name}` in {line:?}")
}

#[test]
fn racing_a_connect_never_reaches_the_control_socket() {
    require!("cc");
    let d = Daemon::start();
    let dir = TempDir::new("race");
    let bin = compile(&dir, "race", RACE);
    // The program's own view of the daemon's directory is empty. Root
    // reaches the real one through the daemon's /proc root; a program in
    // a user namespace of its own does not (ptrace rules across user
    // namespaces), so as an unprivileged user the socket is out of reach.
    let direct = d.socket().display().to_string();
    let via_proc = format!("/proc/{}/root{direct}", d.pid());
    assert!(via_proc.len() < 108, "socket path too long: {via_proc}");
    let out = d.run(&[], &[bin.as_str(), direct.as_str(), via_proc.as_str()]);
    out.assert_success();
    let line = out.stdout.lines().last().unwrap_or_default().to_string();
    note(&format!("race: {line}"));
    assert_eq!(
        field(&line, "served"),
        0,
        "served by the control socket: {out}"
    );
    assert!(
        out.stdout.contains(&format!("UNREACHABLE {direct} ")),
        "the socket's own path is visible to the program: {out}"
    );
    if !rustix::process::geteuid().is_root() {
        assert_eq!(field(&line, "reachable"), 0, "{out}");
        assert!(d.apps().is_empty(), "{:?}", d.apps());
        return;
    }
    assert!(
        field(&line, "connected") > 0,
        "the race never connected, the test proves nothing: {out}"
    );
    assert_eq!(field(&line, "refused"), field(&line, "connected"), "{out}");
    assert!(
        d.log().contains("refusing a program under ax"),
        "{}",
        d.log()
    );
    // Nothing registered, and clients outside ax are still served.
    assert!(d.apps().is_empty(), "{:?}", d.apps());
}

/// Lists what it finds in the daemon's directory, then tries to write
/// `/etc/hosts`, the file behind it (as /proc/self/mountinfo names it, and
/// by its real path, argv[2]) and, with argv[3] = "proc", the same path
/// through its parent's (the launcher's) /proc root and cwd. Prints one
/// line per attempt: `WROTE path` or `DENIED path errno`.
const HOSTS_WRITER: &str = r#"
import os, sys
sock_dir, hosts, via_proc = sys.argv[1], sys.argv[2], sys.argv[3] == "proc"
line = "10.233.0.66 db db.ax\n"
paths = ["/etc/hosts", hosts]
for l in open("/proc/self/mountinfo"):
    f = l.split()
    if f[4] == "/etc/hosts":
        paths.append(f[3])
if via_proc:
    paths.append("/proc/%d/root%s" % (os.getppid(), hosts))
    paths.append("/proc/%d/cwd/hosts" % os.getppid())
print("LISTING", sorted(os.listdir(sock_dir)), flush=True)
for p in paths:
    try:
        with open(p, "a") as f:
            f.write(line)
        print("WROTE", p, flush=True)
    except OSError as e:
        print("DENIED", p, e.errno, flush=True)
"#;

#[test]
fn apps_cannot_change_what_others_resolve() {
    require!("python3", "getent");
    let d = Daemon::start();
    let mut db = d.spawn(&["--name", "db"], &["sleep", "30"]);
    let db_vip = ax_e2e::poll(SHORT, std::time::Duration::from_millis(50), || {
        d.apps()
            .iter()
            .find(|a| a["names"][0] == "db")
            .and_then(|a| a["vips"][0].as_str().map(str::to_string))
    })
    .expect("db registered");
    let sock_dir = d.socket().parent().expect("socket dir").to_path_buf();
    let hosts = format!("{}.hosts", d.socket().display());
    // Root holds CAP_SYS_PTRACE and CAP_DAC_OVERRIDE: the /proc entries of
    // processes outside ax are open to it anyway (README: threat model).
    let root = rustix::process::geteuid().is_root();
    let out = d.run(
        &[],
        &[
            "python3",
            "-c",
            HOSTS_WRITER,
            sock_dir.to_str().expect("utf-8"),
            &hosts,
            if root { "" } else { "proc" },
        ],
    );
    out.assert_success();
    assert!(
        out.stdout.contains("LISTING []"),
        "the daemon's directory is visible: {out}"
    );
    assert!(
        !out.stdout.contains("WROTE"),
        "a program under ax changed the hosts file: {out}"
    );
    assert!(
        out.stdout.contains("DENIED /etc/hosts 30"),
        "not EROFS: {out}"
    );
    // Another app still resolves db to its VIP (IPv4: `gethostbyname`).
    let other = d.run(
        &[],
        &[
            "python3",
            "-c",
            "import socket; print(socket.gethostbyname('db'), 'db')",
        ],
    );
    other.assert_success();
    assert!(
        other.stdout.starts_with(&format!("{db_vip} ")),
        "db resolved elsewhere: {other}"
    );
    assert!(!other.stdout.contains("10.233.0.66"), "{other}");
    db.kill();
}

#[test]
fn not_a_socket_is_enotsock_from_the_broker() {
    require!("python3");
    let d = Daemon::start();
    let script = r#"
import ctypes, errno, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
sa = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(80), socket.inet_aton("10.233.0.9"))
for name in ("connect", "bind"):
    rc = getattr(libc, name)(r, sa, len(sa))
    print(name, rc, errno.errorcode.get(ctypes.get_errno()))
"#;
    let native = run(Command::new("python3").args(["-c", script]), SHORT);
    native.assert_success();
    let under = d.run(&[], &["python3", "-c", script]);
    under.assert_success();
    assert_eq!(native.stdout, under.stdout, "native vs under ax");
    assert!(under.stdout.contains("connect -1 ENOTSOCK"), "{under}");
}

/// Forbids itself every TCP connect with Landlock (ABI 4+), then connects
/// to 127.0.0.1:PORT; prints `ABI n`, then `EACCES` or `CONNECTED` (or
/// `NOLANDLOCK` where the kernel lacks network rules).
const LANDLOCKED_CLIENT: &str = r#"
import ctypes, errno, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
abi = libc.syscall(444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
print("ABI", abi, flush=True)
if abi < 4:
    print("NOLANDLOCK", flush=True)
    sys.exit(0)
# struct landlock_ruleset_attr { u64 handled_access_fs; u64 handled_access_net; }
CONNECT_TCP = 1 << 1
attr = (ctypes.c_uint64 * 2)(0, CONNECT_TCP)
fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
assert fd >= 0, ctypes.get_errno()
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.syscall(446, fd, 0) == 0, ctypes.get_errno()
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("CONNECTED", flush=True)
except OSError as e:
    print(errno.errorcode.get(e.errno), flush=True)
"#;

#[test]
fn landlock_forbids_connect_under_ax_as_natively() {
    require!("python3");
    let d = Daemon::start();
    let port = free_loopback_port();
    let port_s = port.to_string();
    let mut server = App::spawn({
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',int(sys.argv[1])))\ns.listen(64)\nprint('READY',flush=True)\nwhile True:\n  c,_=s.accept()\n  c.close()",
            &port_s,
        ]);
        c
    });
    server.wait_for_stdout("READY", SHORT);
    let native = run(
        Command::new("python3").args(["-c", LANDLOCKED_CLIENT, &port_s]),
        SHORT,
    );
    native.assert_success();
    if native.stdout.contains("NOLANDLOCK") {
        note("SKIP: this kernel has no Landlock network rules (ABI < 4)");
        server.kill();
        return;
    }
    assert!(native.stdout.contains("EACCES"), "natively: {native}");
    let under = d.run(&[], &["python3", "-c", LANDLOCKED_CLIENT, &port_s]);
    under.assert_success();
    assert_eq!(native.stdout, under.stdout, "native vs under ax");
    // Without the restriction the same connect works under ax.
    let plain = d.run(
        &[],
        &[
            "python3",
            "-c",
            "import socket,sys\nsocket.create_connection(('127.0.0.1',int(sys.argv[1]))).close()\nprint('CONNECTED')",
            &port_s,
        ],
    );
    plain.assert_success();
    assert!(plain.stdout.contains("CONNECTED"), "{plain}");
    server.kill();
}

#[test]
fn the_daemons_directory_is_an_empty_read_only_tmpfs() {
    require!();
    let d = Daemon::start();
    let dir = d
        .socket()
        .parent()
        .expect("socket dir")
        .display()
        .to_string();
    let out = d.run(&[], &["cat", "/proc/self/mountinfo"]);
    out.assert_success();
    let line = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(dir.as_str()))
        .unwrap_or_else(|| panic!("nothing mounted on {dir}: {out}"));
    assert!(line.contains(" - tmpfs ax ro"), "{line}");
    let hosts = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/etc/hosts"))
        .unwrap_or_else(|| panic!("nothing mounted on /etc/hosts: {out}"));
    assert!(
        hosts
            .split_whitespace()
            .nth(5)
            .is_some_and(|o| o.starts_with("ro")),
        "{hosts}"
    );
}

/// Restricts itself with Landlock on the file system only (ABI 1 rights,
/// nothing about the network), then connects to 127.0.0.1:PORT, blocking
/// and non-blocking; prints `CONNECTED n` for each that worked.
const FS_LANDLOCKED_CLIENT: &str = r#"
import ctypes, errno, select, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
if libc.syscall(444, None, 0, 1) < 1:
    print("NOLANDLOCK", flush=True)
    sys.exit(0)
EXECUTE = 1 << 0
attr = (ctypes.c_uint64 * 1)(EXECUTE)
fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
assert fd >= 0, ctypes.get_errno()
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.syscall(446, fd, 0) == 0, ctypes.get_errno()
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=10)
print("CONNECTED 1", flush=True)
n = socket.socket()
n.setblocking(False)
rc = n.connect_ex(("127.0.0.1", port))
if rc == errno.EINPROGRESS:
    select.select([], [n], [], 10)
    rc = n.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
if rc == 0:
    print("CONNECTED 2", flush=True)
"#;

#[test]
fn egress_of_a_self_restricted_program_still_works() {
    require!("python3");
    let d = Daemon::start();
    let port = free_loopback_port();
    let port_s = port.to_string();
    let mut server = App::spawn({
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',int(sys.argv[1])))\ns.listen(64)\nprint('READY',flush=True)\nwhile True:\n  c,_=s.accept()\n  c.close()",
            &port_s,
        ]);
        c
    });
    server.wait_for_stdout("READY", SHORT);
    let out = d.run(&[], &["python3", "-c", FS_LANDLOCKED_CLIENT, &port_s]);
    out.assert_success();
    if out.stdout.contains("NOLANDLOCK") {
        note("SKIP: this kernel has no Landlock");
        server.kill();
        return;
    }
    assert!(out.stdout.contains("CONNECTED 1"), "{out}");
    assert!(out.stdout.contains("CONNECTED 2"), "{out}");
    assert!(
        d.log().contains("the program restricted itself"),
        "{}",
        d.log()
    );
    server.kill();
}
