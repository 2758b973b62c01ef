//! `ax-bench null-supervisor`: runs a command under ax's own seccomp filter
//! (`ax_broker::launch::compile_filter`, the filter `ax exec` loads) with a
//! supervisor that answers every trapped call `CONTINUE` and does nothing
//! else. The program then works exactly as natively, over the kernel's own
//! sockets, but pays for every call ax traps: what is left between ax and
//! native when the broker's work is taken away entirely. It is a measuring
//! tool and enforces nothing: `CONTINUE` lets every call through.
//!
//! The supervisor is laid out as ax's per-app receive loop is: one thread
//! polls the notify fd, receives, and answers, with
//! `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` where the kernel has it. When the
//! command exits, one line goes to stderr:
//! `null-supervisor: CALLS trapped calls, CPU_US us of CPU` (the CPU of the
//! whole supervisor process over its life). `SIGTERM`, `SIGINT` and `SIGHUP`
//! sent to the supervisor go on to the command, so that stopping the
//! supervisor by pid stops what it runs.

use anyhow::{Context, Result};
use ax_sys::NotifyFd;
use rustix::event::{poll, PollFd, PollFlags};
use std::ffi::OsString;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Signals passed on to the command.
const FORWARDED: &[i32] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Runs `command` under the filter, says what it cost on stderr, and
/// returns the command's exit code.
pub fn run(command: &[OsString]) -> Result<i32> {
    let done = supervise(command)?;
    eprintln!(
        "null-supervisor: {} trapped calls, {} us of CPU",
        done.calls,
        done.cpu_ns / 1000
    );
    Ok(done.code)
}

/// What a supervised command came to.
#[derive(Debug)]
pub struct Supervised {
    /// Its exit code (128 + the signal that ended it).
    pub code: i32,
    /// The trapped calls answered.
    pub calls: u64,
    /// The CPU this process used (user + system, ns), over its whole life.
    pub cpu_ns: u64,
}

/// Runs `command` under the filter until it exits.
pub fn supervise(command: &[OsString]) -> Result<Supervised> {
    let (program, args) = command.split_first().context("no command given")?;
    let filter = ax_broker::launch::compile_filter().context("compiling ax's filter")?;
    // Blocked here and in every thread started below; the command starts
    // with an empty mask.
    ax_sys::signal::block(FORWARDED).context("blocking signals")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    ax_sys::signal::clear_mask_before_exec(&mut cmd);
    let sandboxed = ax_broker::launch::spawn(&mut cmd, &filter)
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let listener = sandboxed.listener;
    let mut child = sandboxed.child;
    // Without it the kernel wakes the supervisor on another CPU: slower
    // here, and not what ax does.
    listener.set_sync_wake_up();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    std::thread::Builder::new()
        .name("null-supervisor".into())
        .spawn(move || answer_all(&listener, &counted))
        .context("starting the receive thread")?;
    // By pidfd, opened before the child can be reaped: a signal that comes
    // after the command exited reaches no other process that got its pid.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(&child),
        rustix::process::PidfdFlags::empty(),
    )
    .context("pidfd_open of the command")?;
    std::thread::Builder::new()
        .name("null-supervisor-signals".into())
        .spawn(move || {
            while let Ok(sig) = ax_sys::signal::wait(FORWARDED) {
                if let Some(signal) = rustix::process::Signal::from_named_raw(sig.signo) {
                    // The command may have exited already: nothing to stop.
                    let _ = rustix::process::pidfd_send_signal(&pidfd, signal);
                }
            }
        })
        .context("starting the signal thread")?;
    let status = child.wait().context("waiting for the command")?;
    // A command ended by a signal: 128 + its number, as a shell says.
    use std::os::unix::process::ExitStatusExt;
    Ok(Supervised {
        code: status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1),
        calls: calls.load(Ordering::Relaxed),
        cpu_ns: crate::stats::process_cpu_ns(),
    })
}

/// Answers `CONTINUE` to every notification until no process is left
/// under the filter (the fd polls hung up).
fn answer_all(listener: &NotifyFd, calls: &AtomicU64) {
    loop {
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        if poll(&mut fds, None).is_err() {
            continue;
        }
        let revents = fds[0].revents();
        if !revents.contains(PollFlags::IN) {
            if revents.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
                return;
            }
            continue;
        }
        // ENOENT: the caller went away between the wake-up and the read.
        let Ok(notification) = listener.recv() else {
            continue;
        };
        calls.fetch_add(1, Ordering::Relaxed);
        // A failed answer means the call was interrupted: nothing to do.
        let _ = listener.respond_continue(notification.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program under the null supervisor gets the kernel's own answers,
    /// and every call ax traps is counted: here a `bind` and a
    /// `getsockname` on a loopback socket, and a `connect` refused by a
    /// port nobody listens on (nothing leaves the machine).
    #[test]
    fn trapped_calls_get_the_kernels_answers_and_are_counted() {
        let script = "import socket\n\
            s = socket.socket()\n\
            s.bind(('127.0.0.1', 0))\n\
            port = s.getsockname()[1]\n\
            assert port > 0\n\
            c = socket.socket()\n\
            try:\n    c.connect(('127.0.0.1', port))\nexcept ConnectionRefusedError:\n    raise SystemExit(7)\n";
        let command: Vec<OsString> = ["python3", "-c", script]
            .iter()
            .map(OsString::from)
            .collect();
        let done = supervise(&command).expect("python3 runs under the filter");
        assert_eq!(
            done.code, 7,
            "connect to a port with no listener is refused"
        );
        assert!(done.calls >= 3, "bind, getsockname, connect: {done:?}");
    }

    #[test]
    fn an_empty_command_is_an_error() {
        assert!(supervise(&[]).is_err());
    }
}
