//! Child processes, namespaces and temporary files the orchestrator owns,
//! and their removal: by Drop guards on every normal or error path, and by a
//! signal thread on SIGINT/SIGTERM/SIGHUP.
//!
//! Every child runs in a process group of its own whose id is its pid; it is
//! stopped by that id (and by the pids of its descendants found in /proc),
//! never by name.

use anyhow::{bail, Context, Result};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Registry {
    pids: BTreeSet<i32>,
    netns: Vec<String>,
    paths: Vec<PathBuf>,
    stopping: bool,
}

static REG: Mutex<Registry> = Mutex::new(Registry {
    pids: BTreeSet::new(),
    netns: Vec::new(),
    paths: Vec::new(),
    stopping: false,
});

fn reg() -> std::sync::MutexGuard<'static, Registry> {
    REG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a stop was requested (Ctrl-C or SIGTERM).
pub fn stopping() -> bool {
    reg().stopping
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, kills every child,
/// removes every namespace and temporary path, and exits with 130.
pub fn install_signal_cleanup() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    // Register the handlers now, before any child exists.
    let mut signals = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::spawn(move || {
        let name = rt.block_on(async {
            tokio::select! {
                _ = signals.0.recv() => "SIGINT",
                _ = signals.1.recv() => "SIGTERM",
                _ = signals.2.recv() => "SIGHUP",
            }
        });
        eprintln!("\nax-bench: {name}: stopping processes and removing namespaces");
        cleanup_all();
        std::process::exit(130);
    });
    Ok(())
}

/// Kills every registered process and removes every registered namespace
/// and path. Safe to call more than once.
pub fn cleanup_all() {
    let (pids, netns, paths) = {
        let mut r = reg();
        r.stopping = true;
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.netns),
            std::mem::take(&mut r.paths),
        )
    };
    for &p in pids.iter().rev() {
        kill_tree(p, Duration::ZERO);
    }
    for n in netns.iter().rev() {
        netns_delete(n);
    }
    for p in paths.iter().rev() {
        remove_path(p);
    }
}

fn remove_path(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

fn netns_delete(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Pids of all descendants of `pid`, from /proc/PID/task/*/children.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                for c in s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()) {
                    if !out.contains(&c) {
                        out.push(c);
                        todo.push(c);
                    }
                }
            }
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; treat it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// Stops `pid`, its process group and its descendants: SIGTERM first (so
/// `ax exec` can pass it on) and SIGKILL after `grace`.
fn kill_tree(pid: i32, grace: Duration) {
    let Some(p) = Pid::from_raw(pid) else { return };
    let mut family = descendants(pid);
    if !grace.is_zero() {
        let _ = kill_process_group(p, Signal::TERM);
        let _ = kill_process(p, Signal::TERM);
        let t = Instant::now();
        while t.elapsed() < grace && (alive(pid) || family.iter().any(|&c| alive(c))) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in descendants(pid) {
            if !family.contains(&c) {
                family.push(c);
            }
        }
    }
    let _ = kill_process_group(p, Signal::KILL);
    let _ = kill_process(p, Signal::KILL);
    for c in family {
        if let Some(cp) = Pid::from_raw(c) {
            let _ = kill_process(cp, Signal::KILL);
        }
    }
}

/// A child process that is stopped (with all it started) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// A short name for messages.
    pub name: String,
    lines: Option<Receiver<String>>,
    stderr: Arc<Mutex<String>>,
    stdin: Option<ChildStdin>,
    done: Option<ExitStatus>,
}

/// How to treat the child's stdio.
#[derive(Debug, Clone, Default)]
pub struct Spawn {
    /// Keep a pipe to the child's stdin (closing it is a start signal).
    pub stdin: bool,
    /// Where stderr goes: a file (appended), or captured in memory.
    pub stderr_file: Option<PathBuf>,
}

/// Starts `argv` in a process group of its own, stdout read line by line.
pub fn spawn(name: &str, argv: &[String], how: &Spawn) -> Result<Proc> {
    if argv.is_empty() {
        bail!("empty command");
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .process_group(0)
        .stdin(if how.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped());
    match &how.stderr_file {
        Some(f) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .with_context(|| format!("open {}", f.display()))?;
            cmd.stderr(file);
        }
        None => {
            cmd.stderr(Stdio::piped());
        }
    }
    // Hold the registry lock across spawn so a concurrent cleanup either
    // sees this pid or has already refused new children.
    let mut r = reg();
    if r.stopping {
        bail!("stopping");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", argv.join(" ")))?;
    r.pids.insert(child.id() as i32);
    drop(r);

    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    if let Some(mut err) = child.stderr.take() {
        let buf = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                if b.len() < 64 * 1024 {
                    b.push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            }
        });
    }
    let stdin = child.stdin.take();
    Ok(Proc {
        child,
        name: name.to_string(),
        lines: Some(rx),
        stderr,
        stdin,
        done: None,
    })
}

impl Proc {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child wrote to stderr so far (when captured), trimmed.
    pub fn stderr(&self) -> String {
        let s = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let s = s.trim();
        // Keep messages short: the last lines say what went wrong.
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(6)..].join(" | ")
    }

    /// Waits for a stdout line for which `want` holds; errors on timeout or
    /// when the child exits first.
    pub fn wait_line(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<String> {
        let t = Instant::now();
        let rx = self.lines.as_ref().context("stdout closed")?;
        loop {
            let left = timeout.saturating_sub(t.elapsed());
            if left.is_zero() {
                bail!("{}: no expected output after {:?}", self.name, timeout);
            }
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(l) if want(&l) => return Ok(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if stopping() {
                        bail!("stopping");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.wait_exit(Duration::from_secs(2)).ok();
                    std::thread::sleep(Duration::from_millis(20));
                    bail!(
                        "{} exited ({}) {}",
                        self.name,
                        st.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Writes to the child's stdin.
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        use std::io::Write;
        let w = self.stdin.as_mut().context("no stdin pipe")?;
        w.write_all(data)?;
        w.flush()?;
        Ok(())
    }

    /// Closes the child's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the child to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.done {
            return Ok(s);
        }
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                self.done = Some(s);
                return Ok(s);
            }
            if t.elapsed() >= timeout {
                bail!("{} still running after {:?}", self.name, timeout);
            }
            if stopping() {
                bail!("stopping");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for exit, then returns all stdout lines.
    pub fn finish(&mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let st = self.wait_exit(timeout)?;
        let mut lines = Vec::new();
        if let Some(rx) = self.lines.take() {
            // The reader thread ends at EOF, shortly after exit.
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
                lines.push(l);
            }
        }
        Ok((st, lines))
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        if self.done.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.done = Some(s);
            }
        }
        self.done.is_some()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        self.stdin = None;
        if self.done.is_none() {
            kill_tree(pid, Duration::from_millis(300));
        } else if let Some(p) = Pid::from_raw(pid) {
            // Reaped already: its pid may be reused, but its process group
            // id is not while the group has members. Stop leftovers.
            let _ = kill_process_group(p, Signal::KILL);
        }
        let _ = self.child.wait();
        reg().pids.remove(&pid);
    }
}

/// Runs a short command to completion; errors carry its stderr.
pub fn run_cmd(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace made with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// `ip netns add NAME`, with loopback up and TIME_WAIT reuse (the
    /// connection-rate test makes tens of thousands of connections).
    pub fn add(name: &str) -> Result<Netns> {
        {
            let mut r = reg();
            if r.stopping {
                bail!("stopping");
            }
            r.netns.push(name.to_string());
        }
        let ns = Netns {
            name: name.to_string(),
        };
        run_cmd(&["ip", "netns", "add", name])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.exec_sh(&tune_sysctls_sh())?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        run_cmd(&v)
    }

    /// Runs a shell snippet inside the namespace.
    pub fn exec_sh(&self, script: &str) -> Result<String> {
        run_cmd(&["ip", "netns", "exec", &self.name, "sh", "-c", script])
    }

    /// The prefix that runs a command inside this namespace.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// The namespace's bind-mount path.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        netns_delete(&self.name);
        reg().netns.retain(|n| n != &self.name);
    }
}

/// Shell that sets the per-namespace sysctls the connection-rate test needs:
/// TIME_WAIT reuse for outgoing connections and a wide ephemeral port range
/// (above the benchmark's fixed ports). Failures are ignored.
pub fn tune_sysctls_sh() -> String {
    "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse 2>/dev/null; \
     echo '10000 65000' > /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; true"
        .to_string()
}

/// A temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    /// Its path.
    pub path: PathBuf,
}

impl TempDir {
    /// Makes a fresh directory under /tmp.
    pub fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        reg().paths.push(path.clone());
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        remove_path(&self.path);
        reg().paths.retain(|p| p != &self.path);
    }
}

/// Deletes `axb<PID>-*` namespaces left by a benchmark run that was killed
/// (SIGKILL leaves no chance to clean up) and whose process is gone.
pub fn remove_stale_netns() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("axb") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !alive(pid) {
            eprintln!("ax-bench: removing stale namespace {name}");
            netns_delete(&name);
        }
    }
}
