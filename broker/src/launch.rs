//! Starting a program under ax's seccomp filter.
//!
//! [`compile_filter`] builds the BPF program once (with libseccomp), before
//! any `fork`. [`spawn`] starts a [`Command`] whose child loads it between
//! `fork` and `execve` — doing only async-signal-safe work there — and hands
//! the notify fd back to the parent, which passes it to a [`crate::Broker`].
//! Until a broker receives on that fd, the program's trapped calls simply
//! wait in the kernel.
//!
//! What is trapped: the calls in [`TRAPPED_SYSCALLS`]; `setsockopt`/
//! `getsockopt` at the TCP, IP and IPv6 levels and for `SO_DOMAIN`/
//! `SO_PROTOCOL`; `sendto` with a non-NULL address or `MSG_FASTOPEN`, and
//! `sendmsg`/`sendmmsg` with `MSG_FASTOPEN` (TCP Fast Open connects
//! without `connect`). Argument comparisons keep every other send, and all
//! other calls, out of the broker.

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

/// The system calls ax traps unconditionally.
pub const TRAPPED_SYSCALLS: &[&str] = &[
    "bind",
    "connect",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
];

const SOL_SOCKET: u64 = libc::SOL_SOCKET as u64;
const SOCKOPT_LEVELS: &[u64] = &[
    libc::IPPROTO_TCP as u64,
    libc::IPPROTO_IP as u64,
    libc::IPPROTO_IPV6 as u64,
];
const SOCKOPT_SOCKET_NAMES: &[u64] = &[libc::SO_DOMAIN as u64, libc::SO_PROTOCOL as u64];
/// `MSG_FASTOPEN`: a send that connects (TCP Fast Open).
const MSG_FASTOPEN: u64 = libc::MSG_FASTOPEN as u64;
/// The send calls trapped with `MSG_FASTOPEN`, and their flags argument.
const FASTOPEN_CALLS: &[(&str, u32)] = &[("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)];

/// Compiles ax's filter for the native architecture.
///
/// * the calls in [`TRAPPED_SYSCALLS`] are trapped (`SECCOMP_RET_USER_NOTIF`);
/// * `setsockopt`/`getsockopt` are trapped only at the TCP, IP and IPv6
///   levels and for `SO_DOMAIN`/`SO_PROTOCOL` — the cases a swapped socket
///   must answer as TCP would; every other option runs untouched;
/// * `sendto` is trapped when it names a destination (its address argument
///   is not NULL) or has `MSG_FASTOPEN`, and `sendmsg`/`sendmmsg` when they
///   have `MSG_FASTOPEN` (a masked comparison of the flags argument): a
///   Fast Open send connects without `connect`. `send`, `sendto` with a
///   NULL address, `sendmsg` without the flag and `write` stay untrapped;
/// * `io_uring_setup` fails with `ENOSYS`: io_uring's connect and accept
///   would not be seen by seccomp, and programs fall back to plain calls;
/// * calls from another ABI (32-bit `int 0x80`, x32) fail with `ENOSYS`
///   rather than slip past the trap.
pub fn compile_filter() -> Result<FilterProgram, FilterError> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    ctx.set_act_badarch(ScmpAction::Errno(libc::ENOSYS))?;
    // The launcher sets PR_SET_NO_NEW_PRIVS itself when it must.
    ctx.set_filter_attr(ScmpFilterAttr::CtlNnp, 0)?;
    // A binary tree of syscall numbers (libseccomp 2.5+): the calls ax does
    // not trap, nearly all of them, pass in a handful of instructions.
    let _ = ctx.set_filter_attr(ScmpFilterAttr::CtlOptimize, 2);
    for name in TRAPPED_SYSCALLS {
        ctx.add_rule(ScmpAction::Notify, ScmpSyscall::from_name(name)?)?;
    }
    // int arguments: compare the low 32 bits only, as the kernel reads them.
    let int =
        |arg: u32, v: u64| ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(0xffff_ffff), v);
    for name in ["setsockopt", "getsockopt"] {
        let sys = ScmpSyscall::from_name(name)?;
        for &level in SOCKOPT_LEVELS {
            ctx.add_rule_conditional(ScmpAction::Notify, sys, &[int(1, level)])?;
        }
        for &opt in SOCKOPT_SOCKET_NAMES {
            ctx.add_rule_conditional(ScmpAction::Notify, sys, &[int(1, SOL_SOCKET), int(2, opt)])?;
        }
    }
    // TCP Fast Open: the flag bit alone decides, whatever else is set.
    let flag = |arg: u32, bit: u64| ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(bit), bit);
    for &(name, flags) in FASTOPEN_CALLS {
        let sys = ScmpSyscall::from_name(name)?;
        ctx.add_rule_conditional(ScmpAction::Notify, sys, &[flag(flags, MSG_FASTOPEN)])?;
    }
    // sendto with a destination (a pointer: all 64 bits).
    ctx.add_rule_conditional(
        ScmpAction::Notify,
        ScmpSyscall::from_name("sendto")?,
        &[ScmpArgCompare::new(4, ScmpCompareOp::NotEqual, 0)],
    )?;
    ctx.add_rule(
        ScmpAction::Errno(libc::ENOSYS),
        ScmpSyscall::from_name("io_uring_setup")?,
    )?;
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
    /// Why [`SpawnOptions::hosts_file`] could not be shown to the program
    /// (it runs anyway, with the host's `/etc/hosts`).
    pub hosts_error: Option<io::Error>,
}

/// How [`spawn_with`] prepares the child besides the filter.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// A file the program sees as its `/etc/hosts`, through a bind mount in
    /// a mount namespace of its own (and, without root, a user namespace
    /// mapping the caller's uid and gid to themselves). The file itself
    /// stays shared: rewrite it in place, never replace it.
    pub hosts_file: Option<std::path::PathBuf>,
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
    let overlay = match &options.hosts_file {
        Some(source) => Some(FileOverlay::new(
            source,
            std::path::Path::new("/etc/hosts"),
            !root,
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        )?),
        None => None,
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
    let child = spawned?;
    let (listener, overlay_status) = receive_listener(&parent_end).inspect_err(|_| {
        // The child could not hand over its listener; it must not run free.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::KILL,
        );
    })?;
    let hosts_error =
        (overlay_status != 0).then(|| io::Error::from_raw_os_error(i32::from(overlay_status)));
    Ok(Sandboxed {
        child,
        listener,
        hosts_error,
    })
}

/// The notify fd and the child's status byte (an errno of the overlay, or 0).
fn receive_listener(sock: &OwnedFd) -> io::Result<(NotifyFd, u8)> {
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
                return Ok((NotifyFd::from(fd), byte[0]));
            }
        }
    }
    let _ = msg;
    Err(io::Error::other(
        "the child exited before handing over its seccomp listener",
    ))
}
