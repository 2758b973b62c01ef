//! `ax-bench null-supervisor`: runs a command under ax's own seccomp filter
//! (`ax_broker::launch::compile_filter`, the filter `ax exec` loads) with a
//! supervisor that answers every trapped call `CONTINUE` and does nothing
//! else. The program then works exactly as natively, over the kernel's own
//! sockets, but pays for every call ax traps: what is left between ax and
//! native when the broker's work is taken away entirely. It is a measuring
//! tool and enforces nothing: `CONTINUE` lets every call through.
//!
//! With `--install` ([`Work::Install`]) it also installs, before answering
//! each `connect`, `accept` and `accept4`, a copy of the call's fd over
//! that same fd: the `SECCOMP_IOCTL_NOTIF_ADDFD` round trip with which ax
//! installs every socket it swaps in, still with no broker work.
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

/// What the supervisor does besides answering `CONTINUE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing.
    None,
    /// On each `connect`, `accept` and `accept4`, first installs a copy of
    /// the call's fd over that same fd (`SECCOMP_IOCTL_NOTIF_ADDFD`, the
    /// round trip to the caller with which ax installs each socket it
    /// swaps in), then answers `CONTINUE`. The program's fd stays the same
    /// socket (it gains close-on-exec).
    Install,
}

/// Runs `command` under the filter, says what it cost on stderr, and
/// returns the command's exit code.
pub fn run(command: &[OsString], work: Work) -> Result<i32> {
    let done = supervise(command, work)?;
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
pub fn supervise(command: &[OsString], work: Work) -> Result<Supervised> {
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
        .spawn(move || answer_all(&listener, &counted, work))
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
/// under the filter (the fd polls hung up), after `work`.
fn answer_all(listener: &NotifyFd, calls: &AtomicU64, work: Work) {
    let mut pidfds = std::collections::HashMap::new();
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
        if work == Work::Install && installs_a_socket(notification.nr) {
            install_over_itself(listener, &notification, &mut pidfds);
        }
        // A failed answer means the call was interrupted: nothing to do.
        let _ = listener.respond_continue(notification.id);
    }
}

/// The calls on which ax installs a socket.
fn installs_a_socket(nr: i32) -> bool {
    [libc::SYS_connect, libc::SYS_accept, libc::SYS_accept4].contains(&libc::c_long::from(nr))
}

/// Installs a copy of the call's fd (argument 0) over itself: one
/// `pidfd_getfd` and one `ADDFD`, as ax's cheapest install. The caller's
/// pidfd is opened once per thread (`PIDFD_THREAD`, or the thread-group
/// leader's on kernels without it) and kept; nothing is done where
/// either fails.
fn install_over_itself(
    listener: &NotifyFd,
    notification: &ax_sys::Notification,
    pidfds: &mut std::collections::HashMap<u32, std::os::fd::OwnedFd>,
) {
    use std::os::fd::AsFd;
    let tid = notification.pid;
    let Ok(fd) = i32::try_from(notification.args[0]) else {
        return;
    };
    let pidfd = match pidfds.entry(tid) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let Ok(pidfd) = ax_sys::process::pidfd_open(tid, true)
                .or_else(|_| ax_sys::process::pidfd_open(tid, false))
            else {
                return;
            };
            e.insert(pidfd)
        }
    };
    match ax_sys::process::pidfd_getfd(pidfd.as_fd(), fd) {
        Ok(copy) => {
            let _ = listener.add_fd(notification.id, copy.as_fd(), Some(fd), true, false);
        }
        // A thread gone, whose number may come again: opened afresh then.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            pidfds.remove(&tid);
        }
        Err(_) => {}
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
        let done = supervise(&command, Work::None).expect("python3 runs under the filter");
        assert_eq!(
            done.code, 7,
            "connect to a port with no listener is refused"
        );
        assert!(done.calls >= 3, "bind, getsockname, connect: {done:?}");
    }

    /// With installs, the program's sockets stay what they were: a
    /// loopback connection is accepted and carries data, and the fds
    /// installed over themselves are still the program's sockets. The
    /// install did happen: the client's fd, inheritable before its
    /// connect, comes back close-on-exec.
    #[test]
    fn installing_an_fd_over_itself_changes_nothing_for_the_program() {
        let script = "import os, socket\n\
            l = socket.socket()\n\
            l.bind(('127.0.0.1', 0))\n\
            l.listen(1)\n\
            c = socket.socket()\n\
            os.set_inheritable(c.fileno(), True)\n\
            c.connect(l.getsockname())\n\
            assert not os.get_inheritable(c.fileno()), 'not installed'\n\
            a, peer = l.accept()\n\
            assert peer == c.getsockname(), (peer, c.getsockname())\n\
            c.sendall(b'ping')\n\
            assert a.recv(4) == b'ping'\n\
            raise SystemExit(9)\n";
        let command: Vec<OsString> = ["python3", "-c", script]
            .iter()
            .map(OsString::from)
            .collect();
        let done = supervise(&command, Work::Install).expect("python3 runs under the filter");
        assert_eq!(done.code, 9, "connect, accept and data work: {done:?}");
        assert!(
            done.calls >= 4,
            "bind, getsockname, connect, accept: {done:?}"
        );
    }

    #[test]
    fn an_empty_command_is_an_error() {
        assert!(supervise(&[], Work::None).is_err());
    }
}
