//! The `ax` binary end to end, without networking: exit statuses, signal
//! forwarding, and usage errors. Each test runs its own daemon on a private
//! socket and stops it by pid.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const AX: &str = env!("CARGO_BIN_EXE_ax");

/// A daemon on a private socket, stopped (and its directory removed) on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ax-cli-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("ax.sock");
        let mut child = Command::new(AX)
            .args(["daemon", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ax daemon");
        // The daemon logs its "listening" line once the socket is bound.
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening") => break,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("ax daemon exited before listening");
                }
            }
        }
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, dir, socket }
    }

    fn exec(&self, args: &[&str]) -> Command {
        self.exec_opts(&[], args)
    }

    fn exec_opts(&self, opts: &[&str], args: &[&str]) -> Command {
        let mut cmd = Command::new(AX);
        cmd.args(["exec", "--no-autostart", "--socket"])
            .arg(&self.socket)
            .args(opts)
            .arg("--")
            .args(args);
        cmd
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// True when this process ignores `signo` (then so would the program, and
/// a signal test proves nothing).
fn ignored(signo: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (signo - 1)) != 0)
}

/// Starts `ax exec` with stdout piped and waits for the program's first line.
fn start_and_wait_ready(d: &Daemon, script: &str) -> Child {
    let mut child = d
        .exec(&["sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ax exec");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read ready line");
    assert_eq!(line, "ready\n");
    child
}

#[test]
fn exit_statuses() {
    let d = Daemon::start();
    let code = |args: &[&str]| d.exec(args).status().expect("run ax exec").code();
    assert_eq!(code(&["true"]), Some(0));
    assert_eq!(code(&["sh", "-c", "exit 3"]), Some(3));
    assert_eq!(code(&["sh", "-c", "kill -KILL $$"]), Some(128 + 9));
    assert_eq!(code(&["ax-no-such-program-here"]), Some(127));
    assert_eq!(code(&["/dev/null"]), Some(126));
}

#[test]
fn program_receives_sigint_sent_to_the_launcher() {
    if ignored(2) {
        eprintln!("SIGINT is ignored in this environment; skipping");
        return;
    }
    let d = Daemon::start();
    // `sleep` leaves its signal mask alone (a shell with a trap would reset
    // it and hide a mask inherited from the launcher).
    let mut child = start_and_wait_ready(&d, "echo ready; exec sleep 30");
    signal(child.id(), "INT");
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 2), "SIGINT ended the program");
}

#[test]
fn program_receives_sigterm_and_status_is_128_plus_signo() {
    let d = Daemon::start();
    let mut child = start_and_wait_ready(&d, "echo ready; exec sleep 30");
    signal(child.id(), "TERM");
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 15));
}

#[test]
fn usage_errors_exit_125() {
    let run = |args: &[&str]| {
        Command::new(AX)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run ax")
            .code()
    };
    assert_eq!(run(&["exec"]), Some(125));
    assert_eq!(run(&["exec", "--ip", "not-an-ip", "--", "true"]), Some(125));
    assert_eq!(
        run(&["exec", "--name", "Bad_Name", "--", "true"]),
        Some(125)
    );
    assert_eq!(
        run(&["exec", "--label", "novalue", "--", "true"]),
        Some(125)
    );
    assert_eq!(
        run(&["exec", "--ip", "10.9.0.1", "--ip", "10.9.0.2", "--", "true"]),
        Some(125)
    );
    assert_eq!(run(&["get", "pods"]), Some(2));
    assert_eq!(run(&["exec", "--help"]), Some(0));
    assert_eq!(run(&["--version"]), Some(0));
}

#[test]
fn no_daemon_is_reported() {
    let dir = std::env::temp_dir().join(format!("ax-cli-test-nodaemon-{}", std::process::id()));
    let socket = dir.join("ax.sock");
    let out = Command::new(AX)
        .args(["exec", "--no-autostart", "--socket"])
        .arg(&socket)
        .args(["--", "true"])
        .output()
        .expect("run ax exec");
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ax: no daemon is listening on"), "{err}");
    let out = Command::new(AX)
        .args(["get", "apps", "--socket"])
        .arg(&socket)
        .output()
        .expect("run ax get");
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_vip_fails_before_the_program_runs() {
    let d = Daemon::start();
    let mut owner = d
        .exec_opts(
            &["--ip", "10.234.5.6"],
            &["sh", "-c", "echo ready; exec sleep 30"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn owner");
    let mut line = String::new();
    BufReader::new(owner.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "ready\n");
    let marker = d.dir.join("ran");
    let out = d
        .exec_opts(
            &["--ip", "10.234.5.6"],
            &["sh", "-c", &format!("touch {}", marker.display())],
        )
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already owned by app"), "{err}");
    assert!(
        !marker.exists(),
        "the program ran although its VIP was refused"
    );
    signal(owner.id(), "TERM");
    wait_timeout(&mut owner, Duration::from_secs(10));
}
