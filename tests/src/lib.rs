//! Harness for ax's end-to-end tests.
//!
//! Every test starts its own daemon ([`Daemon::start`]) on a socket in a
//! private temporary directory, runs real programs under `ax exec`
//! ([`Daemon::spawn`], [`Daemon::run`]) and kills everything it started, by
//! pid, when the guards drop — also when an assertion panics, in which case
//! the daemon's log and the programs' output are printed for diagnosis.
//!
//! The tests only run inside a network namespace that has loopback only and
//! no default route (see `scripts/test.sh`): a VIP is on no interface, so if
//! interception ever failed a connect to it must end in `ENETUNREACH` and
//! never leave the machine. Outside such a namespace every test prints
//! `SKIP: …` and returns; with `AX_E2E_STRICT=1` (set by `scripts/test.sh`)
//! a test that cannot run fails instead.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use serde_json::Value;

pub use serde_json;

/// How long a daemon may take to answer on its socket.
pub const DAEMON_READY: Duration = Duration::from_secs(10);
/// How long a service may take to appear in `ax get services`.
pub const SERVICE_READY: Duration = Duration::from_secs(15);
/// Default limit for one short command (a client, `ax get`).
pub const SHORT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a line to the real stderr, bypassing libtest's output capture, so
/// that `SKIP:` lines are visible in a normal run.
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unknown test>")
        .to_string()
}

/// True when `AX_E2E_STRICT=1`: a test that cannot run fails instead of skipping.
pub fn strict() -> bool {
    std::env::var_os("AX_E2E_STRICT").is_some_and(|v| v == "1")
}

/// The `ax` binary under test: `$AX_BIN`, else `target/debug/ax` of this workspace.
pub fn ax_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AX_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/ax")
}

/// Finds a program the way a shell would (`name` containing `/` is taken as a path).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why this network namespace is not safe for VIP traffic, if it is not:
/// it must have no interface but `lo` and no IPv4 route in the main table
/// (so no default route).
pub fn isolation_problem() -> Option<String> {
    let dev = match fs::read_to_string("/proc/net/dev") {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot read /proc/net/dev: {e}")),
    };
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    if ifaces.iter().any(|i| *i != "lo") {
        return Some(format!(
            "this network namespace has interfaces other than lo: {ifaces:?}"
        ));
    }
    let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
    if routes.lines().skip(1).any(|l| !l.trim().is_empty()) {
        return Some(format!("this network namespace has IPv4 routes:\n{routes}"));
    }
    None
}

/// Checks that a test can run here: isolated network namespace, the `ax`
/// binary, and each of `programs`. Prints `SKIP: …` and returns false when
/// not (panics instead under `AX_E2E_STRICT=1`).
pub fn preflight(programs: &[&str]) -> bool {
    let mut problems = Vec::new();
    if let Some(p) = isolation_problem() {
        problems.push(format!(
            "not inside an isolated network namespace ({p}); run scripts/test.sh"
        ));
    }
    let ax = ax_bin();
    if !is_executable(&ax) {
        problems.push(format!(
            "ax binary {} not found (build it, or set AX_BIN)",
            ax.display()
        ));
    }
    for prog in programs {
        if find_program(prog).is_none() {
            problems.push(format!("required program `{prog}` is not installed"));
        }
    }
    if problems.is_empty() {
        return true;
    }
    let msg = format!("{}: {}", test_name(), problems.join("; "));
    if strict() {
        panic!("cannot run (AX_E2E_STRICT=1): {msg}");
    }
    note(&format!("SKIP: {msg}"));
    false
}

/// Returns from the calling test (after printing `SKIP: …`) unless it can run
/// here; see [`preflight`].
#[macro_export]
macro_rules! require {
    ($($prog:expr),* $(,)?) => {
        if !$crate::preflight(&[$($prog),*]) {
            return;
        }
    };
}

/// A unique suffix for names: pid, a counter and the clock.
pub fn unique() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos:08x}", std::process::id())
}

/// A private directory (mode 0700) under the temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `ax-e2e-TAG-<unique>` under `std::env::temp_dir()`.
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir();
        for _ in 0..100 {
            let path = base.join(format!("ax-e2e-{tag}-{}", unique()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        }
        panic!(
            "cannot create a unique temporary directory under {}",
            base.display()
        );
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a file inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Copies the executable `from` to `to` (mode 0755) and returns once it can
/// be run: until then, a child that another test thread forked while the
/// copy was open for writing holds it (the kernel answers `ETXTBSY` to an
/// exec of a file open for writing) until that child execs.
pub fn copy_executable(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", to.display()));
    let runs = poll(SHORT, Duration::from_millis(10), || {
        match Command::new(to).arg("--version").output() {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error()) => None,
            other => Some(other),
        }
    });
    match runs {
        Some(Ok(_)) => {}
        Some(Err(e)) => panic!("{} cannot be run: {e}", to.display()),
        None => panic!("{} stayed busy (ETXTBSY)", to.display()),
    }
}

/// Polls `f` every `every` until it returns `Some` or `limit` passes.
pub fn poll<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(every);
    }
}

fn signal_group(pgid: u32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pgid as i32) {
        let _ = kill_process_group(pid, sig);
    }
}

/// Sends `sig` to one process.
pub fn signal_pid(pid: u32, sig: Signal) -> std::io::Result<()> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("pid 0"))?;
    kill_process(pid, sig).map_err(std::io::Error::from)
}

/// Waits for `child` up to `limit`; `None` if it is still running.
fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    poll(limit, Duration::from_millis(10), || {
        child.try_wait().ok().flatten()
    })
}

/// Stops a process group led by `child`: SIGTERM, up to `grace`, then SIGKILL.
fn stop_group(child: &mut Child, grace: Duration) -> ExitStatus {
    let pgid = child.id();
    if let Ok(Some(st)) = child.try_wait() {
        signal_group(pgid, Signal::KILL);
        return st;
    }
    signal_group(pgid, Signal::TERM);
    let st = wait_timeout(child, grace);
    signal_group(pgid, Signal::KILL);
    match st {
        Some(st) => st,
        None => child.wait().expect("wait for killed child"),
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Describes an exit status as a shell would (`exit 7`, `signal 9`).
pub fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st:?}"),
    }
}

/// The result of a finished command.
#[derive(Debug)]
pub struct Output {
    /// What was run, for messages.
    pub what: String,
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Output {
    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the full output unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "{} failed: {self}", self.what);
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ended with {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.what,
            describe(&self.status),
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(|c: char| c.is_whitespace() || c == '\'') || a.is_empty() {
            format!("{a:?}")
        } else {
            a.into_owned()
        }
    }));
    let s = parts.join(" ");
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}

/// Runs `cmd` to completion with `stdin` as its input, killing its process
/// group if it takes longer than `limit` (and then panicking).
pub fn run_with_input(cmd: &mut Command, stdin: &[u8], limit: Duration) -> Output {
    let dir = TempDir::new("run");
    let input = dir.join("stdin");
    fs::write(&input, stdin).expect("write stdin file");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let what = describe_command(cmd);
    cmd.stdin(File::open(&input).expect("open stdin file"))
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let status = wait_timeout(&mut child, limit);
    let timed_out = status.is_none();
    let status = match status {
        Some(st) => {
            // Strays of the command's own group (none expected).
            signal_group(child.id(), Signal::KILL);
            st
        }
        None => stop_group(&mut child, Duration::from_secs(1)),
    };
    let out = Output {
        what,
        status,
        stdout: read_lossy(&out_path),
        stderr: read_lossy(&err_path),
    };
    if timed_out {
        panic!("timed out after {limit:?}: {out}");
    }
    out
}

/// Runs `cmd` to completion with empty input; see [`run_with_input`].
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    run_with_input(cmd, b"", limit)
}

/// A program started in its own process group, killed (the whole group) on drop.
#[derive(Debug)]
pub struct App {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    status: Option<ExitStatus>,
    out_path: PathBuf,
    err_path: PathBuf,
    _dir: TempDir,
}

impl App {
    /// Starts `cmd` with piped stdin and stdout/stderr going to files.
    pub fn spawn(mut cmd: Command) -> App {
        let dir = TempDir::new("app");
        let out_path = dir.join("stdout");
        let err_path = dir.join("stderr");
        let label = describe_command(&cmd);
        cmd.stdin(Stdio::piped())
            .stdout(File::create(&out_path).expect("create stdout file"))
            .stderr(File::create(&err_path).expect("create stderr file"))
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{label}`: {e}"));
        let stdin = child.stdin.take();
        App {
            label,
            child,
            stdin,
            status: None,
            out_path,
            err_path,
            _dir: dir,
        }
    }

    /// Pid of the process started (for `ax exec`, the launcher).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What was started.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Standard output so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.out_path)
    }

    /// Standard error so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.err_path)
    }

    /// Everything known about the app, for failure messages.
    pub fn report(&mut self) -> String {
        let state = match self.try_status() {
            Some(st) => describe(&st),
            None => "running".to_string(),
        };
        let procs = if state == "running" {
            format!("\n--- processes ---\n{}", describe_processes(&self.pids()))
        } else {
            String::new()
        };
        format!(
            "`{}` (pid {}, {state})\n--- stdout ---\n{}\n--- stderr ---\n{}{procs}\n---",
            self.label,
            self.pid(),
            tail(&self.stdout(), 8000),
            tail(&self.stderr(), 8000)
        )
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until stdout contains `needle`; returns stdout. Panics (with
    /// the app's output) if the app ends first or `limit` passes.
    pub fn wait_for_stdout(&mut self, needle: &str, limit: Duration) -> String {
        let found = poll(limit, Duration::from_millis(20), || {
            let out = self.stdout();
            if out.contains(needle) {
                return Some(Ok(out));
            }
            if self.try_status().is_some() {
                // One last look: the line may have been written just before exit.
                let out = self.stdout();
                return Some(if out.contains(needle) {
                    Ok(out)
                } else {
                    Err(())
                });
            }
            None
        });
        match found {
            Some(Ok(out)) => out,
            Some(Err(())) => {
                panic!("ended before printing {needle:?}: {}", self.report())
            }
            None => panic!(
                "did not print {needle:?} within {limit:?}: {}",
                self.report()
            ),
        }
    }

    /// Writes to the app's stdin.
    pub fn send(&mut self, data: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin
            .write_all(data.as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("write to stdin of {}: {e}", self.label));
    }

    /// Closes the app's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the app to end; panics (killing it) after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        match wait_timeout(&mut self.child, limit) {
            Some(st) => {
                self.status = Some(st);
                st
            }
            None => {
                let report = self.report();
                self.kill();
                panic!("did not end within {limit:?}: {report}");
            }
        }
    }

    /// Sends a signal to the started process only (not its group).
    pub fn signal(&self, sig: Signal) {
        signal_pid(self.pid(), sig)
            .unwrap_or_else(|e| panic!("signal {sig:?} to {}: {e}", self.pid()));
    }

    /// Kills the whole process group (SIGTERM, then SIGKILL) and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        let st = stop_group(&mut self.child, Duration::from_secs(2));
        self.status = Some(st);
        st
    }

    /// The started process and all its descendants, by pid.
    pub fn pids(&self) -> Vec<u32> {
        descendants(self.pid())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stdin = None;
        if std::thread::panicking() {
            let report = self.report();
            note(&format!("[{}] app {report}", test_name()));
        }
        self.kill();
    }
}

/// One line per process (and per thread): state, signal masks and the
/// system call it waits in, from `/proc` — for diagnosing a hang.
pub fn describe_processes(pids: &[u32]) -> String {
    let mut out = String::new();
    for pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        out.push_str(&format!("pid {pid} {}\n", comm.trim()));
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let status =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            let wchan =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan")).unwrap_or_default();
            let syscall =
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).unwrap_or_default();
            let nr = syscall.split_whitespace().next().unwrap_or("?").to_string();
            out.push_str(&format!(
                "  tid {tid} {} state {} wchan {wchan} syscall {nr} SigPnd {} ShdPnd {} SigBlk {} SigCgt {}\n",
                field("Name:"),
                field("State:"),
                field("SigPnd:"),
                field("ShdPnd:"),
                field("SigBlk:"),
                field("SigCgt:"),
            ));
        }
    }
    out
}

/// `pid` and all its descendants, from `/proc/*/stat`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the command name, which is in parentheses and may contain spaces.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        for &(p, pp) in &parent_of {
            if pp == cur && !out.contains(&p) {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}

/// A private `ax daemon` on a socket in its own temp dir; killed on drop.
///
/// For fault tests it can be killed without warning ([`Daemon::kill_hard`])
/// and replaced on the same socket, either by the test
/// ([`Daemon::restart`]) or by an autostarting `ax exec`
/// ([`Daemon::adopt_successor`]); whichever daemon serves last is killed on
/// drop, by pid.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Extra `ax daemon` arguments, kept for restarts.
    args: Vec<String>,
    /// A command the daemon runs under (e.g. `nsenter -t PID -n`), kept
    /// for restarts.
    wrap: Vec<String>,
    /// `child` was killed and reaped by [`Daemon::kill_hard`].
    reaped: bool,
    /// A daemon that is not our child (autostarted by a launcher) now serves
    /// the socket: its pid.
    adopted: Option<u32>,
    sock: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl Daemon {
    /// Starts `ax daemon --socket DIR/ax.sock` and waits until it accepts
    /// connections on its socket.
    pub fn start() -> Daemon {
        Daemon::start_with_env(&[])
    }

    /// [`Daemon::start`] with extra environment variables for the daemon
    /// (e.g. `RUST_LOG=info` for a load test, whose debug log would be large).
    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(env, &[])
    }

    /// [`Daemon::start`] with extra environment variables and extra
    /// `ax daemon` arguments (e.g. `--policy FILE`).
    pub fn start_with(env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Daemon::start_wrapped(&[], env, args)
    }

    /// [`Daemon::start_with`], the daemon run by the command `wrap` (e.g.
    /// `nsenter -t PID -n`, for a daemon in another network namespace;
    /// the command must exec the daemon, so that its pid is the daemon's).
    pub fn start_wrapped(wrap: &[&str], env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let wrap: Vec<String> = wrap.iter().map(|a| a.to_string()).collect();
        let dir = TempDir::new("daemon");
        let sock = dir.join("ax.sock");
        let log = dir.join("daemon.log");
        File::create(&log).expect("create daemon log");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_daemon(&wrap, &sock, &log, dir.path(), env, &args);
        let mut d = Daemon {
            child,
            args,
            wrap,
            reaped: false,
            adopted: None,
            sock,
            log,
            dir,
        };
        d.wait_ready(None);
        d
    }

    /// Waits until our child daemon answers on the socket; panics with its
    /// log if it exits first or [`DAEMON_READY`] passes. `stale`: the
    /// [`socket_file_id`] of a dead predecessor's socket file, whose listener its fd keeper may
    /// hold open for an instant (a connect there proves nothing).
    fn wait_ready(&mut self, stale: Option<(u64, i64, i64)>) {
        let ready = poll(DAEMON_READY, Duration::from_millis(20), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(Err(st));
            }
            let ino = socket_file_id(&self.sock);
            if ino.is_none() || ino == stale {
                return None;
            }
            UnixStream::connect(&self.sock).ok().map(|_| Ok(()))
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(st)) => panic!(
                "ax daemon exited ({}) before answering on {}:\n{}",
                describe(&st),
                self.sock.display(),
                self.log()
            ),
            None => panic!(
                "ax daemon did not answer on {} within {DAEMON_READY:?}:\n{}",
                self.sock.display(),
                self.log()
            ),
        }
    }

    /// Kills the serving daemon with SIGKILL — no clean-up: its socket file
    /// and state file stay behind, as after a crash — and waits until it is
    /// gone (reaped if it is our child).
    pub fn kill_hard(&mut self) {
        if let Some(pid) = self.adopted.take() {
            let _ = signal_pid(pid, Signal::KILL);
            let gone = poll(Duration::from_secs(10), Duration::from_millis(5), || {
                (!pid_is_alive(pid)).then_some(())
            });
            assert!(gone.is_some(), "adopted daemon {pid} survived SIGKILL");
            return;
        }
        assert!(!self.reaped, "kill_hard: no daemon of ours is running");
        let _ = signal_pid(self.child.id(), Signal::KILL);
        self.child.wait().expect("wait for the killed daemon");
        self.reaped = true;
    }

    /// Starts a new `ax daemon` on the same socket (after
    /// [`Daemon::kill_hard`]), appending to the same log, and waits until it
    /// answers.
    pub fn restart(&mut self) {
        assert!(
            self.reaped && self.adopted.is_none(),
            "restart: the previous daemon must be dead (kill_hard)"
        );
        let _ = writeln!(
            fs::OpenOptions::new()
                .append(true)
                .open(&self.log)
                .expect("open daemon log"),
            "==== ax-e2e: daemon restarted on the same socket ===="
        );
        let stale = socket_file_id(&self.sock);
        self.child = spawn_daemon(
            &self.wrap,
            &self.sock,
            &self.log,
            self.dir.path(),
            &[],
            &self.args,
        );
        self.reaped = false;
        self.wait_ready(stale);
    }

    /// Waits until a daemon that is not our child (one started by an
    /// autostarting `ax exec`, logging to the same `daemon.log`) answers on
    /// the socket, and adopts it: [`Daemon::pid`] is then its pid, and it
    /// is killed on drop. Returns its pid.
    pub fn adopt_successor(&mut self, limit: Duration) -> u32 {
        assert!(
            self.reaped && self.adopted.is_none(),
            "adopt_successor: the previous daemon must be dead (kill_hard)"
        );
        // A connect can still land on the dead daemon's listener for a
        // moment (its fd keeper closes it right after the death): only a
        // live peer counts.
        let pid = poll(limit, Duration::from_millis(10), || {
            UnixStream::connect(&self.sock)
                .ok()
                .and_then(|c| peer_pid(&c))
                .filter(|&p| pid_is_alive(p))
        });
        let pid = pid.unwrap_or_else(|| {
            panic!(
                "no daemon answered on {} within {limit:?}:\n{}",
                self.sock.display(),
                tail(&self.log(), 8000)
            )
        });
        self.adopted = Some(pid);
        pid
    }

    /// Number of open fds of the serving daemon (`/proc/PID/fd`).
    pub fn fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .count()
    }

    /// The serving daemon's open fds and what they are (`readlink`), for
    /// diagnosing a leak.
    pub fn fd_links(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        let mut v: Vec<String> = fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        let link = fs::read_link(e.path())
                            .map(|l| l.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        format!("{} -> {link}", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// CPU time (user + system) the serving daemon has used, to 10 ms.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rfind(')')
            .map(|i| stat[i + 2..].split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15; fields[0] is field 3.
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        // USER_HZ is 100 on Linux for every ABI.
        Duration::from_millis(ticks * 10)
    }

    /// A field of the serving daemon's `/proc/PID/status`, in kB for
    /// memory fields (`VmRSS`, `VmHWM`) or a plain count (`Threads`).
    pub fn status_field(&self, name: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {path}"))
    }

    /// Resident memory of the serving daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS")
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// The serving daemon's pid.
    pub fn pid(&self) -> u32 {
        self.adopted.unwrap_or_else(|| self.child.id())
    }

    /// The pid of the serving daemon's socket factory: its child named
    /// `ax-sockets`, a process in the private network namespace where every
    /// UNIX socket of the broker lives (and no program is).
    pub fn private_ns_pid(&self) -> u32 {
        let daemon = self.pid();
        poll(Duration::from_secs(10), Duration::from_millis(20), || {
            descendants(daemon).into_iter().find(|&p| {
                p != daemon
                    && fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim_end() == "ax-sockets")
            })
        })
        .unwrap_or_else(|| panic!("daemon {daemon} has no ax-sockets child"))
    }

    /// The kernel's UNIX socket table (`/proc/net/unix`) of the daemon's
    /// private network namespace, read through its factory's
    /// `/proc/PID/net/unix` (readable by the same uid).
    pub fn private_unix_table(&self) -> String {
        let pid = self.private_ns_pid();
        fs::read_to_string(format!("/proc/{pid}/net/unix"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/net/unix: {e}"))
    }

    /// `argv` run inside the daemon's private network namespace (`nsenter`;
    /// as a non-root user, through the user namespace that owns it, which
    /// the daemon's user created), e.g. `ss -xpn` to see ax's sockets.
    pub fn in_private_ns<S: AsRef<OsStr>>(&self, argv: &[S]) -> Command {
        let pid = self.private_ns_pid().to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &pid, "--net"]);
        if euid() != 0 {
            cmd.args(["--user", "--preserve-credentials"]);
        }
        cmd.arg("--").args(argv);
        cmd
    }

    /// The daemon's temp dir (for scratch files of the test).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// True while the daemon process runs.
    pub fn is_running(&mut self) -> bool {
        match self.adopted {
            Some(pid) => pid_is_alive(pid),
            None => !self.reaped && matches!(self.child.try_wait(), Ok(None)),
        }
    }

    /// An `ax` command aimed at this daemon (environment only; add `--socket` yourself).
    pub fn ax(&self) -> Command {
        let mut cmd = Command::new(ax_bin());
        cmd.env("AX_SOCKET", &self.sock)
            .env("XDG_RUNTIME_DIR", self.dir.path());
        cmd
    }

    /// `ax exec --socket SOCK OPTS… -- ARGV…`
    pub fn exec_command<S: AsRef<OsStr>>(&self, opts: &[&str], argv: &[S]) -> Command {
        let mut cmd = self.ax();
        cmd.arg("exec").arg("--socket").arg(&self.sock);
        cmd.args(opts).arg("--").args(argv);
        cmd
    }

    /// Starts `ax exec … -- ARGV…` in the background.
    pub fn spawn<S: AsRef<OsStr>>(&self, opts: &[&str], argv: &[S]) -> App {
        App::spawn(self.exec_command(opts, argv))
    }

    /// Runs `ax exec … -- ARGV…` to completion (limit [`SHORT`]).
    pub fn run<S: AsRef<OsStr>>(&self, opts: &[&str], argv: &[S]) -> Output {
        run(&mut self.exec_command(opts, argv), SHORT)
    }

    /// Runs `ax get WHAT --socket SOCK EXTRA…`, which must succeed.
    pub fn get(&self, what: &str, extra: &[&str]) -> Output {
        let mut cmd = self.ax();
        cmd.arg("get")
            .arg(what)
            .args(extra)
            .arg("--socket")
            .arg(&self.sock);
        let out = run(&mut cmd, SHORT);
        assert!(
            out.status.success(),
            "ax get {what} failed: {out}\ndaemon log:\n{}",
            tail(&self.log(), 8000)
        );
        out
    }

    /// `ax get WHAT -o json`, parsed.
    pub fn get_json(&self, what: &str) -> Value {
        let out = self.get(what, &["-o", "json"]);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ax get {what} -o json is not JSON ({e}): {out}"))
    }

    /// Services as `ax get services -o json` lists them.
    pub fn services(&self) -> Vec<Value> {
        match self.get_json("services") {
            Value::Array(v) => v,
            other => panic!("ax get services -o json is not an array: {other}"),
        }
    }

    /// Apps as `ax get apps -o json` lists them.
    pub fn apps(&self) -> Vec<Value> {
        match self.get_json("apps") {
            Value::Array(v) => v,
            other => panic!("ax get apps -o json is not an array: {other}"),
        }
    }

    /// Waits until `ax get services -o json` lists `addr` (e.g. `10.233.0.10:8000`
    /// or `[fd00:a8::30]:9000`) and returns its entry. Panics, with the
    /// server's output, if `server` ends first or [`SERVICE_READY`] passes.
    pub fn wait_for_service(&self, server: &mut App, addr: &str) -> Value {
        let mut last = Vec::new();
        let found = poll(SERVICE_READY, Duration::from_millis(50), || {
            last = self.services();
            if let Some(s) = last.iter().find(|s| s["addr"] == addr) {
                return Some(Ok(s.clone()));
            }
            server.try_status().map(|_| Err(()))
        });
        match found {
            Some(Ok(s)) => s,
            Some(Err(())) => panic!(
                "server ended before service {addr} appeared: {}",
                server.report()
            ),
            None => panic!(
                "service {addr} did not appear within {SERVICE_READY:?}; services: {}\nserver: {}",
                Value::Array(last),
                server.report()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() && self.is_running() {
            note(&format!(
                "[{}] ax daemon threads at the failure:\n{}",
                test_name(),
                describe_processes(&[self.pid()])
            ));
        }
        let mut how = Vec::new();
        if !self.reaped {
            how.push(describe(&stop_group(
                &mut self.child,
                Duration::from_secs(3),
            )));
        }
        if let Some(pid) = self.adopted {
            stop_pid(pid, Duration::from_secs(3));
            how.push(format!("adopted daemon {pid} stopped"));
        }
        if std::thread::panicking() {
            note(&format!(
                "[{}] ax daemon ({}) log:\n{}\n--- end of daemon log ---",
                test_name(),
                how.join(", "),
                tail(&self.log(), 20000)
            ));
        }
    }
}

/// Starts `ax daemon --socket SOCK`, its output appended to `log`, in its
/// own process group.
/// Tells one socket file from the next at the same path: its inode number
/// alone may be reused at once, its change time not.
fn socket_file_id(path: &Path) -> Option<(u64, i64, i64)> {
    fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

fn spawn_daemon(
    wrap: &[String],
    sock: &Path,
    log: &Path,
    dir: &Path,
    env: &[(&str, &str)],
    args: &[String],
) -> Child {
    let logf = fs::OpenOptions::new()
        .append(true)
        .open(log)
        .expect("open daemon log");
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(ax_bin());
            c
        }
        None => Command::new(ax_bin()),
    };
    cmd.arg("daemon")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
        )
        .env("XDG_RUNTIME_DIR", dir)
        .env("AX_SOCKET", sock)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup log fd"))
        .stderr(logf)
        .process_group(0);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {} daemon: {e}", ax_bin().display()))
}

/// True while process `pid` exists and is not a zombie (works for processes
/// that are not our children, without reaping anything).
pub fn pid_is_alive(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

/// Stops a process that is not our child, by pid: SIGTERM, up to `grace`,
/// then SIGKILL.
pub fn stop_pid(pid: u32, grace: Duration) {
    if !pid_is_alive(pid) {
        return;
    }
    let _ = signal_pid(pid, Signal::TERM);
    if poll(grace, Duration::from_millis(10), || {
        (!pid_is_alive(pid)).then_some(())
    })
    .is_none()
    {
        let _ = signal_pid(pid, Signal::KILL);
    }
}

/// True if the ELF file at `path` has no `PT_INTERP` program header, i.e. it
/// is statically linked (no dynamic loader, so no `LD_PRELOAD` either).
pub fn elf_is_static(path: &Path) -> std::io::Result<bool> {
    let b = fs::read(path)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an ELF file");
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err(bad());
    }
    let is64 = b[4] == 2;
    let le = b[5] == 1;
    let rd = |off: usize, n: usize| -> Option<u64> {
        let s = b.get(off..off + n)?;
        let mut v = 0u64;
        for i in 0..n {
            let byte = if le { s[n - 1 - i] } else { s[i] } as u64;
            v = (v << 8) | byte;
        }
        Some(v)
    };
    let (phoff, phentsize, phnum) = if is64 {
        (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2))
    } else {
        (rd(0x1c, 4), rd(0x2a, 2), rd(0x2c, 2))
    };
    let (phoff, phentsize, phnum) = (
        phoff.ok_or_else(bad)? as usize,
        phentsize.ok_or_else(bad)? as usize,
        phnum.ok_or_else(bad)? as usize,
    );
    for i in 0..phnum {
        let p_type = rd(phoff + i * phentsize, 4).ok_or_else(bad)?;
        if p_type == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Builds the Go program `source` with Debian's Go, offline, with every
/// cache in `dir` (so that it works for an unprivileged user too), static
/// (`CGO_ENABLED=0`, so Go's own resolver and runtime, no libc); returns
/// the binary's path.
pub fn build_go(dir: &TempDir, source: &str) -> String {
    let src = dir.write("main.go", source);
    let bin = dir.join("goprog");
    let home = dir.join("home");
    fs::create_dir_all(&home).expect("mkdir home");
    let out = run(
        Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .current_dir(dir.path())
            .env("HOME", &home)
            .env("GOCACHE", dir.join("gocache"))
            .env("GOPATH", dir.join("gopath"))
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GO111MODULE", "")
            .env("CGO_ENABLED", "0"),
        Duration::from_secs(300),
    );
    out.assert_success();
    bin.to_str().expect("utf-8 path").to_string()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to 0, then closed).
pub fn free_loopback_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Pid of the process at the other end of a UNIX socket (`SO_PEERCRED`).
pub fn peer_pid(stream: &UnixStream) -> Option<u32> {
    rustix::net::sockopt::socket_peercred(stream)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// A threaded line-echo server: `python3 -c THREADED_ECHO_SERVER HOST PORT` answers each
/// line with `echo:LINE`, and prints `LISTENING <pid>` once listening. Its
/// accept is *blocking*: a trapped call the broker waits on.
pub const THREADED_ECHO_SERVER: &str = r#"
import os, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(128)
print("LISTENING", os.getpid(), flush=True)
def handle(c):
    with c:
        for line in c.makefile("rb"):
            c.sendall(b"echo:" + line)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;
