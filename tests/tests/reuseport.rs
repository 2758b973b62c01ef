//! End-to-end tests of `SO_REUSEPORT` under ax: several listeners of one app
//! on one address and port each get connections (nginx with `listen …
//! reuseport` and two workers; a python program with two listeners), and
//! ax refuses a further listener exactly where the kernel does (option not
//! set on it, or a socket of another uid).

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use ax_e2e::{note, poll, require, App, Daemon, TempDir, SHORT};

/// `python3 -c SCRIPT ARGS…`
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Two `SO_REUSEPORT` listeners on IP:PORT; then, on the same address, a
/// socket without the option and (as root) one of another uid, each of
/// which prints the errno of its `bind` (`BIND name errno`, 0 when bound).
/// Then `OPT v`, `SO_REUSEPORT` as the first listener reads it, and `SET
/// errno` of setting it again on the second (0: done). Prints `READY`,
/// then `ACCEPT n v` for every connection listener `n` takes, with the
/// option as the connection reads it (it answers with its number and
/// closes). A line `MORE` on stdin binds and adds a third such listener,
/// and tries a plain socket again (`BIND more …`, `BIND plain2 …`, then
/// `MORE DONE`).
const TWO_LISTENERS: &str = r#"
import errno, os, select, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
def reuse(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s
def try_bind(name, s):
    try:
        s.bind((ip, port))
        print("BIND", name, 0, flush=True)
    except OSError as e:
        print("BIND", name, e.errno, flush=True)
ls = []
for n in (1, 2):
    s = reuse(socket.socket())
    s.bind((ip, port))
    s.listen(16)
    ls.append(s)
try_bind("plain", socket.socket())
print("OPT", ls[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), flush=True)
try:
    ls[1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    print("SET 0", flush=True)
except OSError as e:
    print("SET", e.errno, flush=True)
if os.geteuid() == 0:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setuid(65534)
        s = reuse(socket.socket())
        try:
            s.bind((ip, port))
            os.write(w, b"0")
        except OSError as e:
            os.write(w, str(e.errno).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    print("BIND otheruid", os.read(r, 16).decode(), flush=True)
print("READY", flush=True)
while True:
    ready, _, _ = select.select(ls + [sys.stdin], [], [])
    for s in ready:
        if s is sys.stdin:
            if sys.stdin.readline().strip() == "MORE":
                s = reuse(socket.socket())
                try_bind("more", s)
                s.listen(16)
                ls.append(s)
                try_bind("plain2", socket.socket())
                print("MORE DONE", flush=True)
            continue
        c, _ = s.accept()
        n = ls.index(s) + 1
        print("ACCEPT", n, c.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), flush=True)
        c.sendall(str(n).encode())
        c.close()
"#;

/// Connects to IP:PORT COUNT times, one after the other, and prints what
/// each connection answered.
const CLIENT: &str = r#"
import socket, sys
ip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    c = socket.create_connection((ip, port), timeout=10)
    print("GOT", c.recv(16).decode(), flush=True)
    c.close()
"#;

/// What COUNT connections to IP:PORT, from a client under ax, were
/// answered.
fn answers(d: &Daemon, server: &App, ip: &str, port: &str, count: usize) -> BTreeSet<String> {
    let out = d.run(&[], &py(CLIENT, &[ip, port, &count.to_string()]));
    assert!(
        out.status.success(),
        "{out}\nserver: {}\ndaemon log: {}",
        server.stdout(),
        d.log()
    );
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("GOT "))
        .map(String::from)
        .collect()
}

/// The `BIND name errno` line `name` printed.
fn bind_errno(server: &App, name: &str) -> i32 {
    let prefix = format!("BIND {name} ");
    server
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::trim).map(String::from))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} line: {}", server.stdout()))
}

#[test]
fn two_reuseport_listeners_both_accept_and_others_are_refused() {
    require!("python3");
    let d = Daemon::start();
    let vip = "10.233.0.61";
    let port = "8061";
    let mut server = d.spawn(&["--ip", vip], &py(TWO_LISTENERS, &[vip, port]));
    server.wait_for_stdout("READY", SHORT);
    // As natively: no SO_REUSEPORT on the newcomer, or another owner.
    assert_eq!(
        bind_errno(&server, "plain"),
        rustix::io::Errno::ADDRINUSE.raw_os_error(),
        "{}",
        server.stdout()
    );
    if is_root() {
        assert_eq!(
            bind_errno(&server, "otheruid"),
            rustix::io::Errno::ADDRINUSE.raw_os_error(),
            "{}",
            server.stdout()
        );
    }
    // The option reads back as set and may be set again, as on TCP (a
    // UNIX socket refuses it).
    let stdout = server.stdout();
    assert!(stdout.contains("\nOPT 1\n"), "{stdout}");
    assert!(stdout.contains("\nSET 0\n"), "{stdout}");
    assert_eq!(
        answers(&d, &server, vip, port, 6),
        BTreeSet::from(["1", "2"].map(String::from)),
        "both listeners answer; server: {}",
        server.stdout()
    );
    // Accepted connections inherit the option, as natively.
    let stdout = server.stdout();
    let accepted: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("ACCEPT "))
        .collect();
    assert!(
        !accepted.is_empty() && accepted.iter().all(|l| l.ends_with(" 1")),
        "{stdout}"
    );
    server.kill();
}

#[test]
fn reuseport_group_survives_a_daemon_restart() {
    require!("python3");
    let mut d = Daemon::start();
    let vip = "10.233.0.63";
    let port = "8063";
    let addr = format!("{vip}:{port}");
    // The test restarts the killed daemon itself: the launcher must not
    // race it with one of its own.
    let mut server = d.spawn(
        &["--no-autostart", "--ip", vip],
        &py(TWO_LISTENERS, &[vip, port]),
    );
    server.wait_for_stdout("READY", SHORT);
    d.kill_hard();
    d.restart();
    // Both listeners are taken over, still as one group: a third joins it,
    // a socket without the option is still refused.
    poll(SHORT, Duration::from_millis(20), || {
        d.services()
            .iter()
            .find(|s| s["addr"] == addr.as_str())
            .and_then(|s| s["backends"].as_array().map(Vec::len))
            .filter(|&n| n == 2)
    })
    .unwrap_or_else(|| panic!("listeners not taken over: {}", d.log()));
    server.send("MORE\n");
    server.wait_for_stdout("MORE DONE", SHORT);
    assert_eq!(bind_errno(&server, "more"), 0, "{}", server.stdout());
    assert_eq!(
        bind_errno(&server, "plain2"),
        rustix::io::Errno::ADDRINUSE.raw_os_error(),
        "{}",
        server.stdout()
    );
    assert_eq!(
        answers(&d, &server, vip, port, 9),
        BTreeSet::from(["1", "2", "3"].map(String::from)),
        "{}",
        server.stdout()
    );
    server.kill();
}

#[test]
fn nginx_reuseport_workers_share_connections() {
    require!("nginx", "curl");
    let d = Daemon::start();
    let dir = TempDir::new("nginx-reuseport");
    let vip = "10.233.0.62";
    let port = "8062";
    let p = dir.path().display().to_string();
    let user = if is_root() { "user root;" } else { "" };
    let conf = dir.write(
        "nginx.conf",
        &format!(
            "{user}
daemon off;
master_process on;
worker_processes 2;
pid {p}/nginx.pid;
error_log {p}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format bypid '$pid';
    access_log {p}/access.log bypid;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen {vip}:{port} reuseport;
        location / {{ return 200 \"hello\\n\"; }}
    }}
}}
"
        ),
    );
    let conf = conf.display().to_string();
    let errlog = format!("{p}/error.log");
    let prefix = format!("{p}/");
    let mut nginx = d.spawn(
        &["--ip", vip],
        &["nginx", "-p", &prefix, "-e", &errlog, "-c", &conf],
    );
    d.wait_for_service(&mut nginx, &format!("{vip}:{port}"));
    // Both workers' listeners are registered before the workers start.
    let url = format!("http://{vip}:{port}/");
    let access = dir.join("access.log");
    let pids = poll(SHORT, Duration::from_millis(20), || {
        let out = d.run(&[], &["curl", "-sS", "--max-time", "10", &url]);
        out.assert_success();
        assert_eq!(out.stdout, "hello\n", "{out}");
        let pids: BTreeSet<String> = fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        (pids.len() >= 2).then_some(pids)
    });
    let log = fs::read_to_string(&errlog).unwrap_or_default();
    let pids =
        pids.unwrap_or_else(|| panic!("one nginx worker took every connection; error.log: {log}"));
    note(&format!("nginx workers that served: {pids:?}"));
    nginx.kill();
}
