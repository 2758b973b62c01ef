//! `ax exec`: register the app, start the program under ax's seccomp filter,
//! hand its notify fd to the daemon, forward signals, and return the
//! program's exit status.
//!
//! The launcher itself never runs under the filter: only the child loads it,
//! between `fork` and `execve`.

use crate::cli::ExecArgs;
use crate::client::{Client, ConnectError};
use crate::{paths, Failure, EXIT_AX_FAILED};
use anyhow::{bail, Context};
use ax_proto::{Request, Response};
use ax_registry::{AppInfo, AppSpec};
use ax_sys::signal::{ReceivedSignal, SI_KERNEL};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::FdFlags;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Signals the launcher blocks and forwards to the program.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// How long a daemon this launcher starts stays without apps (`--idle-exit`).
const DEFAULT_IDLE_EXIT: &str = "10m";

/// How long an autostarted daemon has to say it is ready.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the program is in its life, as the signal thread sees it.
#[derive(Debug)]
enum ChildState {
    /// Not started yet: a terminating signal ends the launcher.
    NotStarted,
    /// Running: signals go to it.
    Running(Target),
    /// Reaped: signals are ignored while the launcher exits.
    Exited,
}

/// How to signal the program: by pidfd where the kernel has them, so a
/// signal can never reach a recycled pid.
#[derive(Debug)]
enum Target {
    Pidfd(OwnedFd),
    Pid(rustix::process::Pid),
}

type SharedState = Arc<Mutex<ChildState>>;

fn lock(state: &SharedState) -> MutexGuard<'_, ChildState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `ax exec`; returns the exit status.
pub fn run(args: ExecArgs) -> anyhow::Result<i32> {
    let spec = build_spec(&args)?;

    // Block the signals we forward before any thread exists, so that every
    // thread inherits the mask and only the signal thread receives them.
    // `Command` would hand this mask down to the program (and to a daemon we
    // start): both are spawned with `clear_mask_before_exec`.
    ax_sys::signal::block(FORWARDED).context("cannot block signals")?;
    let state: SharedState = Arc::new(Mutex::new(ChildState::NotStarted));
    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("ax-signals".into())
            .spawn(move || forward_signals(&state))
            .context("cannot start the signal thread")?;
    }

    let path = paths::socket_path(args.socket.socket.as_deref())?;
    let mut client = connect_or_start(&path, !args.no_autostart)?;

    // Register before anything runs, so that a refused --ip fails cleanly.
    let app = register(&mut client, &spec)?;
    for &(port, host) in &args.exposes {
        expose(&mut client, &app, port, host)?;
    }

    let filter = ax_broker::launch::compile_filter().map_err(|e| {
        Failure::new(
            EXIT_AX_FAILED,
            format!("cannot build the seccomp filter: {e}"),
        )
    })?;
    let program = &args.command[0];
    let mut cmd = Command::new(program);
    cmd.args(&args.command[1..]);
    ax_sys::signal::clear_mask_before_exec(&mut cmd);

    // Hold the state lock across spawn: a signal arriving meanwhile waits
    // and then reaches the program rather than ending the launcher.
    // Names: the daemon's hosts file stands in for /etc/hosts, read-only;
    // the daemon's directory (control socket, state, the hosts file's
    // source) is hidden from the program.
    let hosts = paths::hosts_path(&path);
    let hide = paths::socket_dir(&path);
    if !args.no_hosts_mount && Path::new("/etc/hosts").starts_with(hide) {
        return Err(Failure::new(
            EXIT_AX_FAILED,
            format!(
                "the control socket's directory {} would hide /etc from programs under ax; \
                 put the socket in a directory of its own (--socket)",
                hide.display()
            ),
        )
        .into());
    }
    let options = if args.no_hosts_mount {
        ax_broker::launch::SpawnOptions::default()
    } else {
        ax_broker::launch::SpawnOptions {
            hosts_file: (hosts.is_file() && Path::new("/etc/hosts").is_file()).then_some(hosts),
            hide_dir: Some(hide.to_path_buf()),
        }
    };
    let mut guard = lock(&state);
    let sandboxed = match ax_broker::launch::spawn_with(&mut cmd, &filter, &options) {
        Ok(s) => s,
        Err(e) => return Err(spawn_failure(program, e).into()),
    };
    let mut child = sandboxed.child;
    let pid = child.id();
    *guard = ChildState::Running(signal_target(&child));
    drop(guard);

    // `listener` stays open here for the program's whole life: the daemon
    // gets its own copy, and this one would let a restarted daemon take the
    // program over. Meanwhile trapped calls wait in the kernel.
    let listener = sandboxed.listener;
    // Calls the daemon received but had not answered when it died are
    // recorded here; its successor finishes them.
    let journal = ax_sys::journal::create().map_err(|e| {
        Failure::new(
            EXIT_AX_FAILED,
            format!("cannot create the call journal: {e}"),
        )
    })?;
    // Connections the daemon is handing to the program wait in this pair,
    // which outlives the daemon (see ax_broker::Stash).
    let (stash_recv, stash_send) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Failure::new(EXIT_AX_FAILED, format!("cannot create the stash: {e}")))?;
    let attach = Request::AttachListener { app: app.id, pid };
    let handed = [
        listener.as_fd(),
        journal.as_fd(),
        stash_recv.as_fd(),
        stash_send.as_fd(),
    ];
    let refused = match client.call_with_fds(&attach, &handed) {
        Ok(Response::Attached) => None,
        Ok(Response::Error(e)) => Some(format!("the daemon did not take the program: {e}")),
        Ok(other) => Some(format!("unexpected answer from the daemon: {other:?}")),
        Err(e) => Some(format!("{e:#}")),
    };
    if let Some(reason) = refused {
        // Nobody would answer its socket calls: do not leave it running.
        let _ = child.kill();
        let _ = child.wait();
        *lock(&state) = ChildState::Exited;
        return Err(Failure::new(EXIT_AX_FAILED, reason).into());
    }
    tracing::debug!(app = app.id, pid, "program attached");

    // If the daemon dies, hand the program to the next one: trapped calls
    // wait in the kernel meanwhile, established connections never notice.
    let mut info = app.clone();
    info.pid = pid;
    let handover = Handover {
        path: path.clone(),
        autostart: !args.no_autostart,
        info,
        listener,
        journal,
        stash: [stash_recv, stash_send],
    };
    std::thread::Builder::new()
        .name("ax-handover".into())
        .spawn(move || handover.run(client))
        .context("cannot start the hand-over thread")?;

    let status = loop {
        match child.wait() {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("waiting for the program"),
        }
    };
    *lock(&state) = ChildState::Exited;
    Ok(exit_code(status))
}

/// What a launcher needs to hand its program to a new daemon.
struct Handover {
    path: std::path::PathBuf,
    autostart: bool,
    info: AppInfo,
    listener: ax_sys::NotifyFd,
    journal: OwnedFd,
    stash: [OwnedFd; 2],
}

/// How often a launcher whose daemon died looks for a new one.
const HANDOVER_RETRY: Duration = Duration::from_millis(50);
/// How long a launcher that started a daemon waits for one to answer
/// before it starts another.
const RESTART_AFTER: Duration = Duration::from_secs(1);

impl Handover {
    /// Waits for the daemon to go away, then hands the program to its
    /// successor, for as long as the program runs (the process exits with
    /// it, ending this thread).
    fn run(self, mut client: Client) {
        loop {
            client.wait_closed();
            tracing::warn!(path = %self.path.display(), "lost the daemon; waiting for another");
            client = self.reattach();
        }
    }

    fn reattach(&self) -> Client {
        let mut started: Option<Instant> = None;
        loop {
            let mut client = match Client::connect_own(&self.path) {
                Ok(c) => c,
                Err(ConnectError::NoDaemon(_))
                    if self.autostart && started.is_none_or(|t| t.elapsed() >= RESTART_AFTER) =>
                {
                    // Another launcher may win the race; either way a daemon
                    // comes up. If none does (the winner died too), try
                    // again a little later.
                    started = Some(Instant::now());
                    if let Err(e) = start_daemon(&self.path) {
                        tracing::debug!(error = %format!("{e:#}"), "starting a daemon failed");
                    }
                    continue;
                }
                Err(_) => {
                    std::thread::sleep(HANDOVER_RETRY);
                    continue;
                }
            };
            let req = Request::ReattachApp(self.info.clone());
            let handed = [
                self.listener.as_fd(),
                self.journal.as_fd(),
                self.stash[0].as_fd(),
                self.stash[1].as_fd(),
            ];
            match client.call_with_fds(&req, &handed) {
                Ok(Response::Attached) => {
                    tracing::info!(app = self.info.id, "handed the program to the new daemon");
                    return client;
                }
                Ok(other) => {
                    tracing::warn!(answer = ?other, "the new daemon did not take the program; retrying");
                    std::thread::sleep(HANDOVER_RETRY * 20);
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "hand-over failed; retrying"),
            }
            std::thread::sleep(HANDOVER_RETRY);
        }
    }
}

/// The app spec for the daemon, after the checks clap cannot make alone
/// (the rules are [`AppSpec`]'s, shared with containers' annotations).
fn build_spec(args: &ExecArgs) -> anyhow::Result<AppSpec> {
    let refuse = |what: String| Failure::new(EXIT_AX_FAILED, what);
    let mut spec = AppSpec {
        command: args
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        lb: args.lb,
        connect_wait: args.connect_wait,
        container: None,
        no_hosts_mount: args.no_hosts_mount,
        ..AppSpec::default()
    };
    for &ip in &args.ips {
        spec.request_ip(ip)
            .map_err(|e| refuse(format!("--ip {ip}: {e}")))?;
    }
    for (k, v) in &args.labels {
        spec.add_label(k, v)
            .map_err(|e| refuse(format!("--label {k}={v}: {e}")))?;
    }
    for n in &args.names {
        spec.add_name(n);
    }
    Ok(spec)
}

fn register(client: &mut Client, spec: &AppSpec) -> anyhow::Result<AppInfo> {
    match client.call(&Request::RegisterApp(spec.clone()))? {
        Response::AppRegistered(info) => Ok(info),
        Response::RegisterFailed(e) => {
            Err(Failure::new(EXIT_AX_FAILED, format!("cannot register the app: {e}")).into())
        }
        Response::Error(e) => {
            Err(Failure::new(EXIT_AX_FAILED, format!("the daemon refused the app: {e}")).into())
        }
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// `--expose PORT:HOST`: the daemon listens on `host` for the app's `port`
/// for as long as the app lives. Fails before the program runs.
fn expose(
    client: &mut Client,
    app: &AppInfo,
    port: u16,
    host: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let vip = app
        .vips
        .first()
        .ok_or_else(|| Failure::new(EXIT_AX_FAILED, "the app has no virtual IP to expose"))?;
    let request = Request::Expose {
        target: vip.to_string(),
        port,
        host,
        owner: Some(app.id),
    };
    match client.call(&request)? {
        Response::Exposed(info) => {
            tracing::debug!(service = %info.service, host = %info.host, "exposed");
            Ok(())
        }
        Response::Error(e) => {
            Err(Failure::new(EXIT_AX_FAILED, format!("cannot expose port {port}: {e}")).into())
        }
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// The exit status for a program that could not be started: 127 when it is
/// not found, 126 when it cannot be executed, 125 when ax failed.
fn spawn_failure(program: &OsString, e: io::Error) -> Failure {
    let name = Path::new(program).display().to_string();
    let has_slash = program.to_string_lossy().contains('/');
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) if has_slash => {
            Failure::new(127, format!("{name}: no such file or directory"))
        }
        (io::ErrorKind::NotFound, _) => Failure::new(127, format!("{name}: command not found")),
        (io::ErrorKind::PermissionDenied, _) => {
            Failure::new(126, format!("{name}: permission denied"))
        }
        (_, Some(libc::ENOEXEC | libc::EISDIR | libc::ENOTDIR | libc::ELOOP | libc::ETXTBSY))
        | (_, Some(libc::E2BIG | libc::ENAMETOOLONG)) => {
            Failure::new(126, format!("{name}: cannot execute: {e}"))
        }
        _ => Failure::new(EXIT_AX_FAILED, format!("cannot start {name} under ax: {e}")),
    }
}

fn signal_target(child: &std::process::Child) -> Target {
    let pid = rustix::process::Pid::from_child(child);
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Target::Pidfd(fd),
        // Kernels before 5.3: the pid is ours until we reap it, and we only
        // reap after marking the state Exited.
        Err(_) => Target::Pid(pid),
    }
}

/// The signal thread: forwards what others send us to the program.
fn forward_signals(state: &SharedState) {
    loop {
        let sig = match ax_sys::signal::wait(FORWARDED) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for signals failed; no longer forwarding");
                return;
            }
        };
        let st = lock(state);
        match &*st {
            ChildState::Running(target) => forward(target, sig),
            ChildState::NotStarted if sig.signo != libc::SIGWINCH => {
                // Nothing started yet: behave as if the signal had ended us.
                // Closing the control connection unregisters the app.
                std::process::exit(128 + sig.signo);
            }
            _ => {}
        }
    }
}

fn forward(target: &Target, sig: ReceivedSignal) {
    // The terminal's own signals (Ctrl-C, Ctrl-\, window size, hang-up) go
    // to the whole foreground process group, the program included: sending
    // them again would deliver them twice.
    if sig.code == SI_KERNEL {
        return;
    }
    let Some(signal) = rustix::process::Signal::from_named_raw(sig.signo) else {
        return;
    };
    let r = match target {
        Target::Pidfd(fd) => rustix::process::pidfd_send_signal(fd, signal),
        Target::Pid(pid) => rustix::process::kill_process(*pid, signal),
    };
    if let Err(e) = r {
        if e != rustix::io::Errno::SRCH {
            tracing::debug!(signo = sig.signo, error = %e, "forwarding a signal failed");
        }
    }
}

/// The shell's convention: the exit code, or 128+N for death by signal N.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => EXIT_AX_FAILED,
    }
}

/// Connects to the daemon, starting one in the background if none listens
/// and `autostart` allows it.
pub(crate) fn connect_or_start(path: &Path, autostart: bool) -> anyhow::Result<Client> {
    let dir = paths::socket_dir(path);
    // Never hand a program to a daemon in a directory others control.
    if dir.exists() {
        paths::check_dir(dir).map_err(|e| Failure::new(EXIT_AX_FAILED, format!("{e:#}")))?;
    }
    match Client::connect_own(path) {
        Ok(c) => return Ok(c),
        Err(ConnectError::NoDaemon(_)) if autostart => {}
        Err(ConnectError::NoDaemon(p)) => {
            return Err(Failure::new(
                EXIT_AX_FAILED,
                format!(
                    "no daemon is listening on {} (start one with 'ax daemon', or drop \
                     --no-autostart)",
                    p.display()
                ),
            )
            .into())
        }
        Err(e) => return Err(Failure::new(EXIT_AX_FAILED, e.to_string()).into()),
    }
    start_daemon(path).map_err(|e| Failure::new(EXIT_AX_FAILED, format!("{e:#}")))?;
    Client::connect_own(path).map_err(|e| Failure::new(EXIT_AX_FAILED, e.to_string()).into())
}

/// Starts `ax daemon --socket PATH` in its own process group, logging to
/// `daemon.log` beside the socket, and waits until it listens.
fn start_daemon(path: &Path) -> anyhow::Result<()> {
    let dir = paths::socket_dir(path);
    paths::prepare_dir(dir)?;
    let log_path = dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the ax executable")?;

    // The daemon writes "ready\n" to the pipe once it listens. Its end must
    // survive execve: a duplicate at fd 3 or above without FD_CLOEXEC.
    let (mut reader, writer) = io::pipe().context("cannot create a pipe")?;
    let ready_end = rustix::io::fcntl_dupfd_cloexec(&writer, 3)?;
    rustix::io::fcntl_setfd(&ready_end, FdFlags::empty())?;
    drop(writer);

    let mut cmd = Command::new(&exe);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(path)
        .arg("--ready-fd")
        .arg(ready_end.as_raw_fd().to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Out of the terminal's foreground group: Ctrl-C in this terminal
        // must not stop the daemon other programs depend on.
        .process_group(0);
    // It exits after DEFAULT_IDLE_EXIT without apps, unless $AX_IDLE_EXIT
    // (which it reads itself) says otherwise.
    if std::env::var_os("AX_IDLE_EXIT").is_none() {
        cmd.arg("--idle-exit").arg(DEFAULT_IDLE_EXIT);
    }
    ax_sys::signal::clear_mask_before_exec(&mut cmd);
    // Nor may it hold fds we were given (a test harness's pipe, say).
    ax_sys::process::inherit_only_stdio_and(&mut cmd, Some(ready_end.as_raw_fd()));
    let spawned = cmd.spawn();
    // Only the daemon may hold the write end now, so that its death is EOF.
    drop(ready_end);
    drop(cmd);
    let mut daemon = spawned.with_context(|| format!("cannot start {} daemon", exe.display()))?;

    let deadline = Instant::now() + DAEMON_START_TIMEOUT;
    let mut got = Vec::new();
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err("did not become ready within 10 s");
        }
        let timeout = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(&reader, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io::Error::from(e)).context("waiting for the daemon"),
        }
        let mut buf = [0u8; 64];
        match reader.read(&mut buf) {
            Ok(0) => break Err("exited before it was ready"),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(6).any(|w| w == b"ready\n") {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("waiting for the daemon"),
        }
    };
    match outcome {
        Ok(()) => {
            // Reap it when it exits, whenever that is: a daemon killed and
            // left a zombie would look alive to anyone reading /proc.
            let reaper = std::thread::Builder::new()
                .name("ax-reap-daemon".into())
                .spawn(move || {
                    let _ = daemon.wait();
                });
            if let Err(e) = reaper {
                tracing::debug!(error = %e, "cannot start a thread to reap the daemon");
            }
            Ok(())
        }
        Err(what) => {
            if what.starts_with("did not") {
                let _ = daemon.kill();
            }
            let _ = daemon.wait();
            // Another `ax exec` may have started one at the same moment.
            if Client::connect(path).is_ok() {
                return Ok(());
            }
            let tail = log_tail(&log_path, 5);
            bail!(
                "the daemon started for {} {what}; see {}{}",
                path.display(),
                log_path.display(),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(":\n{tail}")
                }
            )
        }
    }
}

/// The last `n` lines of a file, indented, or nothing.
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as Sub};
    use clap::Parser;
    use std::net::IpAddr;

    fn exec_args(argv: &[&str]) -> ExecArgs {
        let mut full = vec!["ax", "exec"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Sub::Exec(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn spec_from_options() {
        let a = exec_args(&[
            "--ip", "fd00::5", "--ip", "10.0.0.5", "--name", "web", "--name", "web", "--label",
            "a=1", "--", "prog", "x",
        ]);
        let spec = build_spec(&a).unwrap();
        assert_eq!(
            spec.requested_ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(spec.names, vec!["web"]);
        assert_eq!(spec.labels.get("a").map(String::as_str), Some("1"));
        assert_eq!(spec.command, vec!["prog", "x"]);
    }

    #[test]
    fn one_vip_per_family() {
        let a = exec_args(&["--ip", "10.0.0.5", "--ip", "10.0.0.6", "--", "true"]);
        let e = build_spec(&a).unwrap_err();
        let f = e.downcast_ref::<Failure>().unwrap();
        assert_eq!(f.code, 125);
        assert!(f.message.contains("at most one IPv4"), "{}", f.message);
        // Repeating the same address is harmless.
        let a = exec_args(&["--ip", "10.0.0.5", "--ip", "10.0.0.5", "--", "true"]);
        assert_eq!(build_spec(&a).unwrap().requested_ips.len(), 1);
        let a = exec_args(&["--label", "a=1", "--label", "a=2", "--", "true"]);
        assert!(build_spec(&a).is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        let nf = spawn_failure(&"nope".into(), io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            (nf.code, nf.message.as_str()),
            (127, "nope: command not found")
        );
        let acc = spawn_failure(&"./x".into(), io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(acc.code, 126);
        let fmt = spawn_failure(&"./x".into(), io::Error::from_raw_os_error(libc::ENOEXEC));
        assert_eq!(fmt.code, 126);
    }
}
