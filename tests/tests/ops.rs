//! Operating ax (issue 13): Prometheus metrics scraped after real traffic,
//! the systemd units verified, `sd_notify` readiness, shell completions and
//! the man page, and an autostarted daemon that exits once idle.
//!
//! Every test is bounded in time and kills what it starts, by pid.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ax_e2e::{
    ax_bin, find_program, free_loopback_port, note, peer_pid, pid_is_alive, poll, require, run,
    run_with_input, signal_pid, Daemon, TempDir, SHORT,
};
use rustix::process::Signal;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `GET PATH` on 127.0.0.1:PORT (HTTP/1.0): the status line, the headers
/// and the body.
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to --metrics");
    s.set_read_timeout(Some(SHORT)).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read answer");
    match text.split_once("\r\n\r\n") {
        Some((head, body)) => (head.to_string(), body.to_string()),
        None => panic!("no HTTP answer: {text:?}"),
    }
}

/// The samples of an exposition text: series (name and labels as printed)
/// to value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a value: {line:?}"));
        out.insert(series.to_string(), value);
    }
    out
}

/// Scrapes `/metrics`, checking the answer is the exposition format.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (head, body) = http_get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    parse(&body)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// `ax_calls_total` of one syscall, all outcomes or one.
fn calls(m: &BTreeMap<String, f64>, syscall: &str, outcome: Option<&str>) -> f64 {
    ["ok", "errno", "continue", "deferred"]
        .iter()
        .filter(|o| outcome.is_none_or(|want| want == **o))
        .map(|o| {
            get(
                m,
                &format!("ax_calls_total{{syscall=\"{syscall}\",outcome=\"{o}\"}}"),
            )
        })
        .sum()
}

const POLICY: &str = r#"
default = "deny"
[[allow]]
name = "client-to-web"
from = { role = "client" }
to = { role = "web" }
ports = [8000]
"#;

/// Curl under ax against a Python server under ax, N times allowed and once
/// denied by the policy: the scraped counts match what the test did.
#[test]
fn metrics_count_real_traffic() {
    require!("python3", "curl");
    const N: usize = 3;
    let dir = TempDir::new("metrics");
    let policy = dir.write("policy.toml", POLICY);
    let port = free_loopback_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&[], &["--metrics", &addr, "--policy", p(&policy)]);
    let before = scrape(port);
    assert_eq!(get(&before, "ax_apps"), 0.0, "{before:?}");

    let mut server = d.spawn(
        &["--ip", "10.233.50.1", "--label", "role=web"],
        &["python3", "-m", "http.server", "--bind", "0.0.0.0", "8000"],
    );
    d.wait_for_service(&mut server, "10.233.50.1:8000");
    let url = "http://10.233.50.1:8000/";
    for _ in 0..N {
        let out = d.run(
            &["--label", "role=client"],
            &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url],
        );
        out.assert_success();
        assert_eq!(out.stdout.trim(), "200", "{out}");
    }
    let denied = d.run(&[], &["curl", "-sS", "-o", "/dev/null", url]);
    assert!(
        !denied.status.success(),
        "a denied connect went through: {denied}"
    );

    // The counts land as each call is answered: wait until the last one
    // shows, and until the clients' apps are gone.
    let after = poll(SHORT, Duration::from_millis(50), || {
        let m = scrape(port);
        let connects = calls(&m, "connect", None) - calls(&before, "connect", None);
        (connects >= (N + 1) as f64 && get(&m, "ax_apps") == 1.0).then_some(m)
    })
    .unwrap_or_else(|| panic!("counts never showed:\n{}", http_get(port, "/metrics").1));
    let delta = |syscall: &str, outcome: Option<&str>| {
        calls(&after, syscall, outcome) - calls(&before, syscall, outcome)
    };
    let text = http_get(port, "/metrics").1;
    assert_eq!(delta("bind", None), 1.0, "one bind, by the server:\n{text}");
    assert_eq!(delta("bind", Some("ok")), 1.0, "{text}");
    // curl's connects are non-blocking: EINPROGRESS, an errno.
    assert!(delta("connect", None) >= (N + 1) as f64, "{text}");
    // An accept is counted once, when first handled: "ok", or "deferred"
    // when it waits for a connection (or, under load, for a client's late
    // hello) and is answered later.
    let accepted = ["accept", "accept4"]
        .iter()
        .map(|call| delta(call, Some("ok")) + delta(call, Some("deferred")))
        .sum::<f64>();
    assert!(
        accepted >= N as f64,
        "the server accepted {N} connections:\n{text}"
    );
    assert_eq!(
        get(&after, "ax_connects_denied_total") - get(&before, "ax_connects_denied_total"),
        1.0,
        "one connect denied by policy:\n{text}"
    );
    assert_eq!(get(&after, "ax_apps"), 1.0, "{text}");
    assert!(get(&after, "ax_services") >= 1.0, "{text}");
    // Each connection between two programs under ax keeps two identities
    // (the client's own, and the client its accepted end names) until two
    // sweeps miss them; none is due yet (fewer than 64 new, not 30 s).
    assert!(
        get(&after, "ax_identities") >= (2 * N) as f64,
        "two identities per connection:\n{text}"
    );
    // The histogram counts every call its counter counts.
    for syscall in ["bind", "connect", "accept4"] {
        let count = get(
            &after,
            &format!("ax_call_duration_seconds_count{{syscall=\"{syscall}\"}}"),
        );
        let inf = get(
            &after,
            &format!("ax_call_duration_seconds_bucket{{le=\"+Inf\",syscall=\"{syscall}\"}}"),
        );
        assert_eq!(count, calls(&after, syscall, None), "{syscall}:\n{text}");
        assert_eq!(inf, count, "{syscall}:\n{text}");
    }
    for family in [
        "ax_errors_total{kind=\"handler_panic\"}",
        "ax_quota_hits_total{quota=\"helpers\"}",
        "ax_daemon_restarts_total",
        "ax_daemon_takeovers_total{how=\"handback\"}",
        "ax_identity_sweeps_total",
    ] {
        assert!(after.contains_key(family), "{family} missing:\n{text}");
    }
    let (head, _) = http_get(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    server.kill();
}

/// Accepts connections on port argv[1] and closes them at once, but for the
/// one whose first bytes are `HOLD`, which it keeps until `END!` comes.
const HOLDING_SERVER: &str = r#"
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1])))
ls.listen(512)
held = None
while True:
    c, _ = ls.accept()
    what = c.recv(4)
    if what == b"HOLD":
        held = c
        continue
    c.close()
    if what == b"END!":
        break
"#;

/// Under ax: holds one connection to VIP:PORT (argv[1], argv[2]), makes
/// argv[3] more and closes each, says `HELD` and waits for a line on stdin.
const HOLDING_CLIENT: &str = r#"
import socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hold = socket.create_connection((vip, port))
hold.sendall(b"HOLD")
for _ in range(n):
    s = socket.create_connection((vip, port))
    s.sendall(b"ping")
    s.close()
print("HELD", flush=True)
sys.stdin.readline()
socket.create_connection((vip, port)).sendall(b"END!")
hold.close()
"#;

/// `ax_identities` is exact: a connection between two programs under ax
/// keeps two identities while it lives, and the sweeps forget those of
/// closed connections (they find them closed in the list of the broker's
/// private namespace), so with one connection held and 100 closed the
/// gauge comes down to exactly 2.
#[test]
fn identities_of_closed_connections_are_forgotten_and_a_live_ones_kept() {
    require!("python3");
    const VIP: &str = "10.233.51.2";
    let port = free_loopback_port();
    let d = Daemon::start_with(&[], &["--metrics", &format!("127.0.0.1:{port}")]);
    let mut server = d.spawn(&["--ip", VIP], &["python3", "-c", HOLDING_SERVER, "7300"]);
    d.wait_for_service(&mut server, &format!("{VIP}:7300"));
    assert_eq!(
        get(&scrape(port), "ax_identities"),
        0.0,
        "before any connection"
    );
    let mut client = d.spawn(&[], &["python3", "-c", HOLDING_CLIENT, VIP, "7300", "100"]);
    client.wait_for_stdout("HELD", SHORT);
    // 202 identities made: a sweep is due at once (64 new), and the next
    // one forgets what the first found closed.
    let sweeps = get(&scrape(port), "ax_identity_sweeps_total");
    let settled = poll(Duration::from_secs(20), Duration::from_millis(100), || {
        let m = scrape(port);
        (get(&m, "ax_identities") == 2.0 && get(&m, "ax_identity_sweeps_total") >= sweeps + 2.0)
            .then_some(m)
    });
    let text = http_get(port, "/metrics").1;
    assert!(
        settled.is_some(),
        "the identities did not come down to the held connection's 2:\n{text}"
    );
    client.send("\n");
    client.wait(SHORT);
    server.wait(SHORT);
}

/// A daemon killed with SIGKILL and restarted on the same socket (and the
/// same --metrics address, which nothing of the dead one holds): the
/// restart and the take-over of the running app are counted.
#[test]
fn metrics_count_restarts_and_takeovers() {
    require!("python3");
    let port = free_loopback_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start_with(&[], &["--metrics", &addr]);
    assert_eq!(get(&scrape(port), "ax_daemon_restarts_total"), 0.0);
    let mut server = d.spawn(
        &["--no-autostart", "--ip", "10.233.50.2"],
        &["python3", "-m", "http.server", "--bind", "0.0.0.0", "8001"],
    );
    d.wait_for_service(&mut server, "10.233.50.2:8001");
    d.kill_hard();
    d.restart();
    let m = poll(SHORT, Duration::from_millis(50), || {
        TcpStream::connect(("127.0.0.1", port)).ok()?;
        let m = scrape(port);
        (get(&m, "ax_daemon_takeovers_total{how=\"handback\"}") >= 1.0).then_some(m)
    })
    .unwrap_or_else(|| panic!("no hand-back counted:\n{}", d.log()));
    assert_eq!(get(&m, "ax_daemon_restarts_total"), 1.0, "{m:?}");
    assert_eq!(
        get(&m, "ax_daemon_takeovers_total{how=\"state\"}"),
        1.0,
        "{m:?}"
    );
    assert_eq!(get(&m, "ax_apps"), 1.0, "{m:?}");
    server.kill();
}

/// Kills a process by pid when dropped, unless it is gone.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if pid_is_alive(self.0) {
            let _ = signal_pid(self.0, Signal::KILL);
        }
    }
}

/// A daemon `ax exec` started by itself exits after `--idle-exit` without
/// apps (here 2 s, by `AX_IDLE_EXIT`) and removes its socket; one started
/// explicitly without the flag stays.
#[test]
fn autostarted_daemon_exits_when_idle() {
    let explicit = Daemon::start();
    let dir = TempDir::new("idle");
    let sock = dir.join("run/ax.sock");
    let mut cmd = Command::new(ax_bin());
    cmd.env("AX_IDLE_EXIT", "2s")
        .arg("exec")
        .arg("--socket")
        .arg(&sock)
        .args(["--", "true"]);
    run(&mut cmd, SHORT).assert_success();
    let conn = UnixStream::connect(&sock).expect("the autostarted daemon answers");
    let pid = peer_pid(&conn).expect("the daemon's pid");
    drop(conn);
    let _guard = KillOnDrop(pid);
    let log = || std::fs::read_to_string(dir.join("run/daemon.log")).unwrap_or_default();
    let gone = poll(Duration::from_secs(20), Duration::from_millis(50), || {
        (!pid_is_alive(pid)).then_some(())
    });
    assert!(gone.is_some(), "the idle daemon {pid} stayed:\n{}", log());
    assert!(
        !sock.exists(),
        "the idle daemon left its socket behind:\n{}",
        log()
    );
    assert!(log().contains("--idle-exit"), "{}", log());
    let mut explicit = explicit;
    assert!(
        explicit.is_running(),
        "an explicitly started daemon exited:\n{}",
        explicit.log()
    );
}

/// `ax daemon` under a service manager: READY=1 on `$NOTIFY_SOCKET` once it
/// answers on its socket (systemd's Type=notify).
#[test]
fn daemon_notifies_readiness() {
    let dir = TempDir::new("notify");
    let path = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&path).expect("bind the notify socket");
    manager.set_read_timeout(Some(SHORT)).expect("read timeout");
    let d = Daemon::start_with(&[("NOTIFY_SOCKET", p(&path))], &[]);
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("a notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    UnixStream::connect(d.socket()).expect("ready means it answers");
}

/// The unit files under contrib/systemd, with ExecStart pointed at the
/// ax under test.
fn unit(name: &str, dir: &TempDir) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/systemd")
        .join(name);
    let text = std::fs::read_to_string(&src).expect("read the unit");
    for want in [
        "Type=notify",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/ax daemon --socket",
        "KillMode=process",
    ] {
        assert!(text.contains(want), "{name}: {want} missing");
    }
    dir.write(
        name,
        &text.replace(
            "/usr/local/bin/ax",
            p(&ax_bin().canonicalize().expect("ax")),
        ),
    )
}

#[test]
fn systemd_units_verify() {
    let dir = TempDir::new("units");
    let root = unit("ax.service", &dir);
    let user = unit("ax-user.service", &dir);
    assert!(std::fs::read_to_string(&root)
        .expect("unit")
        .contains("--socket /run/ax/ax.sock"));
    assert!(std::fs::read_to_string(&user)
        .expect("unit")
        .contains("--socket %t/ax/ax.sock"));
    if find_program("systemd-analyze").is_none() {
        note("SKIP systemd_units_verify (systemd-analyze): the units' contents were checked");
        return;
    }
    let runtime = TempDir::new("xdg");
    for (unit, user_mode) in [(&root, false), (&user, true)] {
        let mut cmd = Command::new("systemd-analyze");
        if user_mode {
            cmd.arg("--user").env("XDG_RUNTIME_DIR", runtime.path());
        }
        cmd.args(["verify", "--man=no"]).arg(unit);
        let out = run(&mut cmd, SHORT);
        assert!(
            out.status.success() && out.stderr.trim().is_empty(),
            "{}: {out}",
            unit.display()
        );
    }
}

/// Each shell's script is produced and knows the subcommands and options.
#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(Command::new(ax_bin()).args(["completions", shell]), SHORT);
        out.assert_success();
        for word in [
            "exec",
            "daemon",
            "get",
            "service",
            "expose",
            "completions",
            "idle-exit",
            "metrics",
        ] {
            assert!(out.stdout.contains(word), "{shell}: {word} missing");
        }
        // The script parses in its own shell, where that shell is here.
        if find_program(shell).is_some() {
            let check = run_with_input(Command::new(shell).arg("-n"), out.stdout.as_bytes(), SHORT);
            assert!(check.status.success(), "{shell} -n: {check}");
        }
    }
    let bad = run(Command::new(ax_bin()).args(["completions", "tcsh"]), SHORT);
    assert_eq!(bad.code(), Some(2), "{bad}");
}

/// `ax man` prints a roff page that `man -l` renders, naming every
/// subcommand.
#[test]
fn man_page_renders() {
    let out = run(Command::new(ax_bin()).arg("man"), SHORT);
    out.assert_success();
    assert!(
        out.stdout.starts_with(".ie") || out.stdout.contains(".TH ax"),
        "{out}"
    );
    if find_program("man").is_none() {
        note("SKIP man_page_renders (man): the roff was checked");
        return;
    }
    let dir = TempDir::new("man");
    let page = dir.write("ax.1", &out.stdout);
    let shown = run(
        Command::new("man")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .env("MANWIDTH", "80")
            .arg("-l")
            .arg(&page),
        SHORT,
    );
    shown.assert_success();
    for word in ["NAME", "SYNOPSIS", "exec", "daemon", "completions", "man"] {
        assert!(shown.stdout.contains(word), "{word} missing:\n{shown}");
    }
}
