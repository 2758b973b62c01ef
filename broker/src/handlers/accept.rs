//! `accept(fd, addr, addrlen)` and `accept4(fd, addr, addrlen, flags)`.
//!
//! * Inputs: a listener this broker installed (anything else runs natively).
//! * Decision: none — every accept on a swapped listener goes through here.
//! * Effect: the broker accepts on its copy of the listener, writes the
//!   client's virtual address to `addr` (in the listener's family, cut to
//!   `*addrlen` as the kernel does, with the full length stored back), and
//!   installs the connection with `SECCOMP_ADDFD_FLAG_SEND`, which returns
//!   its fd number atomically. `SOCK_NONBLOCK`/`SOCK_CLOEXEC` are honoured.
//!
//! A blocking listener is waited on from a helper thread that polls it, so
//! the broker itself never blocks in `accept`; the wait ends early with
//! `EINTR` when the thread gets a signal, and with `EAGAIN` at the
//! listener's `SO_RCVTIMEO`, as natively.

use super::{classify, defer, is_nonblocking, peer_name, write_sockaddr, Call, Outcome, Sock};
use crate::addr;
use crate::names::SocketName;
use crate::target::{Errno, Target};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{sockopt, SocketFlags};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often a waiting accept checks that its caller still waits.
const WAIT_TICK: Duration = Duration::from_millis(50);

pub(super) fn handle(call: &Call<'_>, target: &Target, has_flags: bool) -> Outcome {
    let (name, listener) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd }) => (name, fd),
        _ => return Outcome::Continue,
    };
    let v6 = name.is_v6();
    if !matches!(name, SocketName::Listener { .. })
        || !sockopt::socket_acceptconn(&listener).unwrap_or(false)
    {
        return Outcome::Errno(libc::EINVAL);
    }
    let flags = if has_flags { call.int_arg(3) } else { 0 };
    if flags & !(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) != 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    let mut accept_flags = SocketFlags::CLOEXEC;
    if flags & libc::SOCK_NONBLOCK != 0 {
        accept_flags |= SocketFlags::NONBLOCK;
    }
    let cloexec = flags & libc::SOCK_CLOEXEC != 0;
    if is_nonblocking(&listener) {
        return match rustix::net::accept_with(&listener, accept_flags) {
            Ok(conn) => complete(call, target, conn, v6, cloexec).into(),
            Err(e) => Outcome::Errno(e.raw_os_error()),
        };
    }
    if let Some(conn) = try_accept(call, &listener, accept_flags) {
        return match conn {
            Ok(conn) => complete(call, target, conn, v6, cloexec).into(),
            Err(e) => Outcome::Errno(e),
        };
    }
    let timeout = sockopt::socket_timeout(&listener, sockopt::Timeout::Recv)
        .ok()
        .flatten();
    defer(call, move |call| {
        let deadline = timeout.map(|t| Instant::now() + t);
        let Ok(target) = Target::open(call.notif.pid) else {
            return Outcome::Answered;
        };
        loop {
            let mut fds = [PollFd::new(&listener, PollFlags::IN)];
            let tick = Timespec::try_from(WAIT_TICK).unwrap_or(Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            });
            let _ = poll(&mut fds, Some(&tick));
            if !fds[0].revents().is_empty() {
                if let Some(conn) = try_accept(call, &listener, accept_flags) {
                    return match conn {
                        Ok(conn) => complete(call, &target, conn, v6, cloexec).into(),
                        Err(e) => Outcome::Errno(e),
                    };
                }
            }
            if !call.still_valid() {
                return Outcome::Answered;
            }
            if target.signal_pending() {
                return Outcome::Errno(libc::EINTR);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Outcome::Errno(libc::EAGAIN);
            }
        }
    })
}

/// Accepts if a connection is waiting, without ever blocking: every accept
/// on a swapped listener goes through the broker, and this check-then-accept
/// runs under one lock.
fn try_accept(
    call: &Call<'_>,
    listener: &OwnedFd,
    flags: SocketFlags,
) -> Option<Result<OwnedFd, Errno>> {
    let _guard = call
        .shared
        .accept_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(n) if n > 0 => {
            Some(rustix::net::accept_with(listener, flags).map_err(|e| e.raw_os_error()))
        }
        _ => None,
    }
}

fn complete(
    call: &Call<'_>,
    target: &Target,
    conn: OwnedFd,
    v6: bool,
    cloexec: bool,
) -> Result<Outcome, Errno> {
    let addr_ptr = call.arg(1);
    if addr_ptr != 0 {
        let peer = match peer_name(&conn) {
            Some(SocketName::Client { local, .. }) => local,
            _ => addr::unspecified(v6),
        };
        // As the kernel: a bad addr/addrlen after the accept loses the
        // connection and fails the call.
        write_sockaddr(target, addr_ptr, call.arg(2), &addr::encode(peer, v6))?;
    }
    call.check_valid()?;
    match call
        .listener
        .add_fd(call.notif.id, conn.as_fd(), None, cloexec, true)
    {
        Ok(_) => Ok(Outcome::Answered),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::EINPROGRESS) => Ok(Outcome::Answered),
            Some(errno) => Err(errno),
            None => Err(libc::EIO),
        },
    }
}
