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
/// `SO_DOMAIN`/`SO_PROTOCOL`, and the socket-level options TCP and UNIX
/// sockets answer differently (`SO_PASSCRED`, `SO_PASSSEC`, `SO_PASSPIDFD`
/// are UNIX-only, `SO_TXREHASH` and `SO_REUSEPORT` IP-only).
const SOCKOPT_SOCKET_NAMES: &[u64] = &[
    libc::SO_DOMAIN as u64,
    libc::SO_PROTOCOL as u64,
    libc::SO_PASSCRED as u64,
    libc::SO_PASSSEC as u64,
    SO_TXREHASH,
    SO_PASSPIDFD,
    libc::SO_REUSEPORT as u64,
];
/// `SO_TXREHASH` (Linux 5.18), not in the libc crate.
const SO_TXREHASH: u64 = 74;
/// `SO_PASSPIDFD` (Linux 6.5).
const SO_PASSPIDFD: u64 = 76;
/// `MSG_FASTOPEN`: a send that connects (TCP Fast Open).
const MSG_FASTOPEN: u64 = libc::MSG_FASTOPEN as u64;
/// The send calls trapped with `MSG_FASTOPEN`, and their flags argument.
const FASTOPEN_CALLS: &[(&str, u32)] = &[("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)];

/// Compiles ax's filter for the native architecture.
///
/// * the calls in [`TRAPPED_SYSCALLS`] are trapped (`SECCOMP_RET_USER_NOTIF`);
/// * `setsockopt`/`getsockopt` are trapped only at the TCP, IP and IPv6
///   levels and for the socket-level names in [`SOCKOPT_SOCKET_NAMES`] —
///   the cases a swapped socket must answer as TCP would; every other
///   option runs untouched (a UNIX socket answers it as TCP does);
/// * `sendto` is trapped when it names a destination (its address argument
///   is not NULL) or has `MSG_FASTOPEN`, and `sendmsg`/`sendmmsg` when they
///   have `MSG_FASTOPEN` (a masked comparison of the flags argument): a
///   Fast Open send connects without `connect`. `send`, `sendto` with a
///   NULL address, `sendmsg` without the flag and `write` stay untrapped;
/// * `io_uring_setup` fails with `ENOSYS`: io_uring's connect and accept
///   would not be seen by seccomp, and programs fall back to plain calls;
/// * a program restricting itself (Landlock, seccomp) is trapped, and
///   answered `CONTINUE` once the broker took note;
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
    add_self_restriction_rules(&mut ctx)?;
    let (mut reader, writer) = std::io::pipe()?;
    // The program is a few hundred bytes: far below the pipe's capacity, so
    // exporting cannot block before we read.
    ctx.export_bpf(&writer)?;
    drop(writer);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    Ok(FilterProgram::from_bpf_bytes(&bytes)?)
}

/// `landlock_restrict_self`, `seccomp(SECCOMP_SET_MODE_FILTER)` and
/// `prctl(PR_SET_SECCOMP)` are trapped, so that the broker knows the
/// program restricted itself (see `handlers::restrict`); it answers them
/// `CONTINUE`.
fn add_self_restriction_rules(ctx: &mut ScmpFilterContext) -> Result<(), FilterError> {
    let first = |v: u64| ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(0xffff_ffff), v);
    // By number where libseccomp's table is older than the call (Linux
    // 5.13 gave it 446 on every architecture).
    let landlock =
        ScmpSyscall::from_name("landlock_restrict_self").unwrap_or_else(|_| ScmpSyscall::from(446));
    ctx.add_rule(ScmpAction::Notify, landlock)?;
    ctx.add_rule_conditional(
        ScmpAction::Notify,
        ScmpSyscall::from_name("seccomp")?,
        &[first(u64::from(libc::SECCOMP_SET_MODE_FILTER))],
    )?;
    ctx.add_rule_conditional(
        ScmpAction::Notify,
        ScmpSyscall::from_name("prctl")?,
        &[first(u64::from(libc::PR_SET_SECCOMP.unsigned_abs()))],
    )?;
    Ok(())
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
