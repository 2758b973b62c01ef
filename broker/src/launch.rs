//! Starting a program under ax's seccomp filter.
//!
//! [`compile_filter`] builds the BPF program once (with libseccomp), before
//! any `fork`. [`spawn`] starts a [`Command`] whose child loads it between
//! `fork` and `execve` — doing only async-signal-safe work there — and hands
//! the notify fd back to the parent, which passes it to a [`crate::Broker`].
//! Until a broker receives on that fd, the program's trapped calls simply
//! wait in the kernel.
//!
//! What is trapped is defined once, in [`crate::rules`] (its module docs
//! list the calls and the argument comparisons that keep every other call
//! out of the broker).

use ax_sys::prexec::{arrange_filter_before_exec, FileOverlay, FilterProgram};
use ax_sys::NotifyFd;
use libseccomp::{
    ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterAttr, ScmpFilterContext, ScmpSyscall,
};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command};

/// Why the filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// libseccomp refused a rule.
    #[error("libseccomp: {0}")]
    Seccomp(#[from] libseccomp::error::SeccompError),
    /// Exporting the program failed.
    #[error("exporting the BPF program: {0}")]
    Export(#[from] io::Error),
}

pub use crate::rules::TRAPPED_SYSCALLS;

/// Compiles ax's filter for the native architecture from
/// [`crate::rules::rules`] (see there for what is trapped); calls from
/// another ABI (32-bit `int 0x80`, x32) fail with `ENOSYS` rather than slip
/// past the trap.
pub fn compile_filter() -> Result<FilterProgram, FilterError> {
    use crate::rules::{Action, Compare};
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    ctx.set_act_badarch(ScmpAction::Errno(libc::ENOSYS))?;
    // The launcher sets PR_SET_NO_NEW_PRIVS itself when it must.
    ctx.set_filter_attr(ScmpFilterAttr::CtlNnp, 0)?;
    // A binary tree of syscall numbers (libseccomp 2.5+): the calls ax does
    // not trap, nearly all of them, pass in a handful of instructions.
    let _ = ctx.set_filter_attr(ScmpFilterAttr::CtlOptimize, 2);
    for rule in crate::rules::rules() {
        let sys = match (ScmpSyscall::from_name(rule.syscall), rule.number) {
            (Ok(sys), _) => sys,
            // By number where libseccomp's table is older than the call.
            (Err(_), Some(nr)) => ScmpSyscall::from(nr),
            (Err(e), None) => return Err(e.into()),
        };
        let action = match rule.action {
            Action::Notify => ScmpAction::Notify,
            Action::Errno(e) => ScmpAction::Errno(e),
        };
        let args: Vec<ScmpArgCompare> = rule
            .args
            .iter()
            .map(|a| match a.compare {
                Compare::MaskedEqual { mask, value } => {
                    ScmpArgCompare::new(a.index, ScmpCompareOp::MaskedEqual(mask), value)
                }
                Compare::NotEqual(v) => ScmpArgCompare::new(a.index, ScmpCompareOp::NotEqual, v),
            })
            .collect();
        if args.is_empty() {
            ctx.add_rule(action, sys)?;
        } else {
            ctx.add_rule_conditional(action, sys, &args)?;
        }
    }
    let (mut reader, writer) = std::io::pipe()?;
    // The program is a few hundred bytes: far below the pipe's capacity, so
    // exporting cannot block before we read.
    ctx.export_bpf(&writer)?;
    drop(writer);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    Ok(FilterProgram::from_bpf_bytes(&bytes)?)
}

/// A child running under the filter, and its notify fd.
#[derive(Debug)]
pub struct Sandboxed {
    /// The started program.
    pub child: Child,
    /// Its notify fd: hand it to [`crate::Broker::serve`].
    pub listener: NotifyFd,
}

/// How [`spawn_with`] prepares the child besides the filter.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// A file the program sees as its `/etc/hosts`, through a bind mount in
    /// a mount namespace of its own (and, without root, a user namespace
    /// mapping the caller's uid and gid to themselves). The file itself
    /// stays shared: rewrite it in place, never replace it. The program
    /// cannot write to it there (the bind mount is read-only).
    pub hosts_file: Option<std::path::PathBuf>,
    /// A directory the program must not reach (the daemon's: its control
    /// socket, state and the hosts file's source): covered, in the same
    /// mount namespace, by an empty read-only tmpfs.
    pub hide_dir: Option<std::path::PathBuf>,
}

/// Spawns `cmd` with `filter` loaded in the child just before `execve`.
///
/// `PR_SET_NO_NEW_PRIVS` is set unless the caller is root. The child's
/// descendants inherit the filter. Errors from `execve` (program not found,
/// not executable) are returned as by [`Command::spawn`].
pub fn spawn(cmd: &mut Command, filter: &FilterProgram) -> io::Result<Sandboxed> {
    spawn_with(cmd, filter, &SpawnOptions::default())
}

/// [`spawn`], with [`SpawnOptions`].
pub fn spawn_with(
    cmd: &mut Command,
    filter: &FilterProgram,
    options: &SpawnOptions,
) -> io::Result<Sandboxed> {
    let root = ax_sys::process::is_effective_root();
    let overlay = if options.hosts_file.is_some() || options.hide_dir.is_some() {
        let mut o = FileOverlay::namespace_only(
            !root,
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        if let Some(source) = &options.hosts_file {
            o = o.showing(source, std::path::Path::new("/etc/hosts"))?;
        }
        if let Some(dir) = &options.hide_dir {
            o = o.hiding(dir)?;
        }
        Some(o)
    } else {
        None
    };
    let (parent_end, child_end) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    let no_new_privs = !root;
    // The child only makes raw system calls (unshare, mount, prctl,
    // seccomp, sendmsg, close) before execve; none of them is trapped.
    arrange_filter_before_exec(
        cmd,
        filter.clone(),
        no_new_privs,
        overlay,
        child_end.as_raw_fd(),
    );
    let spawned = cmd.spawn();
    drop(child_end);
    let child = match spawned {
        Ok(c) => c,
        // The child never ran the program; it may have said why.
        Err(e) => return Err(overlay_failure(&parent_end).unwrap_or(e)),
    };
    let listener = receive_listener(&parent_end).inspect_err(|_| {
        // The child could not hand over its listener; it must not run free.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::KILL,
        );
    })?;
    Ok(Sandboxed { child, listener })
}

/// The error a child reported instead of a listener: it could not make its
/// own mount namespace, so it did not run the program.
fn overlay_failure(sock: &OwnedFd) -> Option<io::Error> {
    let mut byte = [0u8; 1];
    match rustix::net::recv(sock, &mut byte, rustix::net::RecvFlags::DONTWAIT) {
        Ok((1, _)) if byte[0] != 0 => Some(namespace_error(byte[0])),
        _ => None,
    }
}

fn namespace_error(errno: u8) -> io::Error {
    io::Error::other(format!(
        "cannot give the program its own mount namespace ({}); ax does not run programs \
         that could reach the daemon's directory or change its hosts file (user or mount \
         namespaces may be disabled here)",
        io::Error::from_raw_os_error(i32::from(errno))
    ))
}

/// The notify fd (or the errno the child sent instead).
fn receive_listener(sock: &OwnedFd) -> io::Result<NotifyFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let msg = rustix::net::recvmsg(
        sock,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = m {
            if let Some(fd) = fds.next() {
                return Ok(NotifyFd::from(fd));
            }
        }
    }
    if msg.bytes == 1 && byte[0] != 0 {
        return Err(namespace_error(byte[0]));
    }
    Err(io::Error::other(
        "the child exited before handing over its seccomp listener",
    ))
}
