//! `connect(fd, addr, addrlen)`.
//!
//! * Inputs: an `AF_INET`/`AF_INET6` stream socket — one the kernel still
//!   owns, or one this broker installed — and an address read once from
//!   the program's memory, checked in the kernel's order: the length
//!   (`EINVAL` outside 0..=128), the bytes (`EFAULT`), fewer than 2 bytes
//!   (`EINVAL`), `AF_UNSPEC` (disconnect), the socket's state (`EISCONN`),
//!   and only then the family and the rest of the address.
//! * Decision: a virtual destination is looked up in the directory (nothing
//!   there: `ECONNREFUSED`); any other destination is egress.
//! * Effect, virtual: an unbound UNIX socket is connected to the service's
//!   listener, sends it a hello naming the client's VIP:port and the
//!   destination (see `crate::idents`), and replaces the program's socket
//!   at the same fd number; `connect` returns 0 — or
//!   `EINPROGRESS` on a non-blocking socket, as TCP always does, and then
//!   0 once more to the next `connect`, before `EISCONN`.
//! * Effect, loopback (`127.0.0.1:P`, `[::1]:P`): the app's own wildcard
//!   listener on P, or the one the daemon serves on the host's loopback,
//!   as for a VIP (see `localhost.rs`); otherwise egress.
//! * Effect, egress: the broker connects the program's own socket (its
//!   copy shares the open file) with the broker's copy of the address, so
//!   the kernel's answer — `EINPROGRESS` for a non-blocking socket
//!   included — is exactly what the program would have had, and no other
//!   thread can swap the address in between.
//! * Swapped sockets: a listening one answers `EISCONN`, and so does a
//!   connected one; `AF_UNSPEC` disconnects a connected one (a fresh,
//!   unconnected TCP socket replaces it) and leaves a bound one as it is.
//!   A bound socket that never listened may still connect: to a VIP
//!   (keeping its port) or elsewhere (a fresh TCP socket connects with the
//!   program's bytes, and replaces it unless the kernel refuses them).
//!
//! The broker's client socket for a VIP is made and installed in
//! `client.rs`; a connect to a service not up yet waits in
//! `connect_wait.rs`.

use super::client::{deliver, release_listener, take_in_progress_of};
use super::connect_wait::{wait_for_service, wait_in_background};
use super::{
    classify_expecting, copy_nonblock, defer, install_over, is_nonblocking, log_denied,
    loopback_port, set_nonblock, tcp_socket, Call, Expect, Outcome, Sock,
};
use crate::addr::{self, Purpose};
use crate::names::SocketName;
use crate::target::{errno_of, Errno, Target};
use ax_registry::ResolveError;
use rustix::net::sockopt;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

/// Where a socket this broker installed stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Bound by `bind`, never listened on.
    Bound,
    Listening,
    /// A client, or a connection a listener accepted.
    Connected,
}

pub(super) fn handle(call: &Call<'_>, target: &Target) -> Outcome {
    run(call, target).into()
}

fn run(call: &Call<'_>, target: &Target) -> Result<Outcome, Errno> {
    if !call.replay && call.state.reconnects() {
        if let Some(done) = connect_known(call, target)? {
            return Ok(done);
        }
    }
    let (v6, copy, swapped, local) =
        match classify_expecting(call, target, call.arg(0), Expect::Kernel) {
            Ok(Sock::Inet { v6, fd, local }) => (v6, fd, None, local),
            Ok(Sock::Swapped { name, fd, .. }) => (name.is_v6(), fd, Some(name), None),
            // No open fd, or not a socket: the kernel's answer, given here, so
            // that no fd swapped in meanwhile gets connected by it.
            Err(libc::EBADF) => return Ok(Outcome::Errno(libc::EBADF)),
            Ok(Sock::Other) if super::not_a_socket(target, call.arg(0)) => {
                return not_a_socket(call, target)
            }
            // Another kind of socket (UNIX, UDP): the kernel's to connect.
            // Nothing of ax's rests on this CONTINUE, whatever another thread
            // puts on the fd meanwhile: the daemon tells programs under ax by
            // their namespaces, not by their connects, and a TCP socket
            // swapped in is connected by the kernel to an address on no
            // interface, reaching no service of ax and carrying no VIP.
            // But a UDP socket to a VIP: ENETUNREACH (see udp.rs).
            Ok(Sock::Other) => {
                let to_vip = super::udp::to_vip(call, target, call.arg(1), call.int_arg(2));
                return Ok(to_vip.unwrap_or(Outcome::Continue));
            }
            Err(e) => return Ok(super::fd_error(call, e)),
        };
    // An earlier daemon installed it and died before answering.
    if call.replay && matches!(swapped, Some(SocketName::Client { .. })) {
        return Ok(Outcome::Value(0));
    }
    let bytes = match address(call, target)? {
        Ok(bytes) => bytes,
        Err(refused) => return Ok(refused),
    };
    let Some(name) = swapped else {
        return kernel_socket(call, target, copy, v6, local, bytes);
    };
    let state = state_of(&name, &copy);
    // __inet_stream_connect: a short address and AF_UNSPEC are judged
    // before the socket's state.
    if bytes.len() < 2 {
        return Ok(Outcome::Errno(libc::EINVAL));
    }
    if addr::family(&bytes) == libc::AF_UNSPEC as u16 {
        return match state {
            State::Connected => disconnect(call, target, &copy, v6),
            State::Bound => Ok(Outcome::Value(0)),
            // TCP would stop listening and keep the port; a UNIX listener
            // cannot stop listening, and other processes may share it.
            State::Listening => Ok(Outcome::Errno(libc::EOPNOTSUPP)),
        };
    }
    match state {
        State::Listening => Ok(Outcome::Errno(libc::EISCONN)),
        State::Connected => Ok(connected_again(call, super::inode(&copy))),
        State::Bound => match addr::parse(&bytes, v6, Purpose::Connect) {
            Some(dst) if call.shared.directory.is_virtual(dst.ip()) => {
                connect_virtual(call, target, &copy, v6, None, dst, Some(name))
            }
            // The fresh socket would be connected with the broker's rights,
            // and the kernel cannot connect the program's UNIX socket:
            // refused rather than widening what the program may do.
            _ if super::restrict::self_restricted(call, target) => Ok(Outcome::Errno(libc::EACCES)),
            _ => Ok(egress_replacing(call, &copy, v6, bytes, name)),
        },
    }
}

/// A `connect` on one of the broker's connections, known by its inode
/// without a copy of the fd (see `super::known_conn`): 0 for the connect
/// that follows an `EINPROGRESS`, `EISCONN` after, as TCP answers. Tried
/// only in an app seen connecting again after `EINPROGRESS` (APR does it
/// for every connection), where it takes one read of the fd's fdinfo
/// instead of a copy of the fd and four questions to it. `None`: the full
/// path (another socket, or `AF_UNSPEC`, which disconnects and needs the
/// socket).
fn connect_known(call: &Call<'_>, target: &Target) -> Result<Option<Outcome>, Errno> {
    let Some(conn) = super::known_conn(call, target) else {
        return Ok(None);
    };
    let bytes = match address(call, target)? {
        Ok(bytes) => bytes,
        Err(refused) => return Ok(Some(refused)),
    };
    if bytes.len() < 2 {
        return Ok(Some(Outcome::Errno(libc::EINVAL)));
    }
    if addr::family(&bytes) == libc::AF_UNSPEC as u16 {
        return Ok(None);
    }
    Ok(Some(connected_again(call, Some(conn.inode))))
}

/// The address a `connect` names, as `move_addr_to_kernel` takes it: the
/// length (`EINVAL` out of range, as an answer), then the bytes (the read
/// checks that the call is pending).
fn address(call: &Call<'_>, target: &Target) -> Result<Result<Vec<u8>, Outcome>, Errno> {
    let addrlen = call.int_arg(2);
    if addrlen < 0 || addrlen as usize > ax_sys::sockaddr::SOCKADDR_STORAGE_LEN {
        return Ok(Err(Outcome::Errno(libc::EINVAL)));
    }
    Ok(Ok(target.read(call.arg(1), addrlen as usize)?))
}

/// A `connect` on a connected socket (the one with `inode`), as TCP answers
/// it: 0 for the connect that follows an `EINPROGRESS` (it completes it;
/// the app is noted as one that connects again), `EISCONN` after.
fn connected_again(call: &Call<'_>, inode: Option<u64>) -> Outcome {
    if inode.is_some_and(|inode| take_in_progress_of(call, inode)) {
        call.state.note_reconnects();
        Outcome::Value(0)
    } else {
        Outcome::Errno(libc::EISCONN)
    }
}

/// `ENOTSOCK`, after what `__sys_connect` checks before it looks at the
/// file: the address's length and bytes.
fn not_a_socket(call: &Call<'_>, target: &Target) -> Result<Outcome, Errno> {
    if let Err(refused) = address(call, target)? {
        return Ok(refused);
    }
    call.check_valid()?;
    Ok(Outcome::Errno(libc::ENOTSOCK))
}

pub(super) fn state_of(name: &SocketName, fd: &OwnedFd) -> State {
    match name {
        SocketName::Client { .. } => State::Connected,
        SocketName::Listener { .. } => {
            if sockopt::socket_acceptconn(fd).unwrap_or(false) {
                State::Listening
            } else if rustix::net::getpeername(fd).is_ok() {
                State::Connected
            } else {
                State::Bound
            }
        }
    }
}

/// A socket the kernel still owns (`local`: its name, as classified): a
/// virtual destination is ours, anything else (including every malformed
/// address) the kernel's.
fn kernel_socket(
    call: &Call<'_>,
    target: &Target,
    copy: OwnedFd,
    v6: bool,
    local: Option<SocketAddr>,
    bytes: Vec<u8>,
) -> Result<Outcome, Errno> {
    match addr::parse(&bytes, v6, Purpose::Connect) {
        Some(dst) if call.shared.directory.is_virtual(dst.ip()) => {
            connect_virtual(call, target, &copy, v6, local, dst, None)
        }
        // Begun by the previous daemon: finished as it was begun.
        _ if call.replay => Ok(egress_replayed(call, copy, bytes)),
        // A program bound by rules of its own (Landlock, its own seccomp
        // filters, an LSM domain) meets them only in a connect the kernel
        // makes for it. CONTINUE decides nothing of ax's: if another thread
        // rewrites the address to a VIP meanwhile, the kernel makes a
        // plain TCP connect to an address on no interface, which reaches no
        // service of ax and carries no VIP as its source.
        _ if super::restrict::self_restricted(call, target) => Ok(Outcome::Continue),
        // Loopback: the app's own listener on that port, if it has one.
        Some(dst) if super::localhost::loopback(dst.ip()).is_some() => {
            match super::localhost::connect(call, target, &copy, v6, local, dst)? {
                Some(outcome) => Ok(outcome),
                None => Ok(egress(call, copy, bytes, true)),
            }
        }
        _ => Ok(egress(call, copy, bytes, false)),
    }
}

/// `loopback`: the destination is a loopback address, where a blocking
/// connect is first tried on this thread (see `super::egress`).
fn egress(call: &Call<'_>, copy: OwnedFd, bytes: Vec<u8>, loopback: bool) -> Outcome {
    super::carry::forget(call, &copy);
    let nonblocking = is_nonblocking(&copy);
    if loopback && !nonblocking {
        match super::egress::try_inline(&copy, &bytes) {
            super::egress::Inline::Done(Ok(())) => return Outcome::Value(0),
            super::egress::Inline::Done(Err(e)) => return Outcome::Errno(e),
            // Connecting: the connect below waits for the handshake.
            super::egress::Inline::InProgress | super::egress::Inline::NotTried => {}
        }
    }
    let attempt = move || match ax_sys::sockaddr::connect_raw(copy.as_fd(), &bytes) {
        Ok(()) => Outcome::Value(0),
        Err(e) => Outcome::Errno(errno_of(&e)),
    };
    if nonblocking {
        attempt()
    } else {
        // A blocking connect takes a network round trip or more.
        defer(call, move |_| attempt())
    }
}

/// An egress connect an earlier daemon started and did not answer: the
/// socket may be connected or connecting already.
fn egress_replayed(call: &Call<'_>, copy: OwnedFd, bytes: Vec<u8>) -> Outcome {
    // A predecessor killed during an inline attempt left its mark.
    super::egress::clear_left_over(&copy);
    defer(call, move |_| {
        match ax_sys::sockaddr::connect_raw(copy.as_fd(), &bytes) {
            Ok(()) => Outcome::Value(0),
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) => Outcome::Value(0),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EALREADY) | Some(libc::EINPROGRESS)
                ) =>
            {
                if is_nonblocking(&copy) {
                    return Outcome::Errno(libc::EINPROGRESS);
                }
                let mut fds = [rustix::event::PollFd::new(
                    &copy,
                    rustix::event::PollFlags::OUT,
                )];
                let _ = rustix::event::poll(&mut fds, None);
                match sockopt::socket_error(&copy) {
                    Ok(Ok(())) => Outcome::Value(0),
                    Ok(Err(e)) => Outcome::Errno(e.raw_os_error()),
                    Err(e) => Outcome::Errno(e.raw_os_error()),
                }
            }
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    })
}

/// `connect(AF_UNSPEC)` on a connected socket: TCP drops the connection and
/// leaves an unconnected socket that may connect again. A fresh TCP socket
/// of the program's family takes the swapped one's place; the peer sees
/// the connection end.
fn disconnect(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
) -> Result<Outcome, Errno> {
    let fresh = tcp_socket(v6)?;
    copy_nonblock(copy, &fresh)?;
    super::copy_timeouts(copy, &fresh);
    call.check_valid()?;
    Ok(install_over(call, target, call.arg(0), &fresh))
}

/// A bound (swapped) socket connecting to a host address: a fresh TCP
/// socket connects with the program's bytes, so the kernel judges them,
/// and replaces the bound one if the kernel took them (connected, or
/// `EINPROGRESS`). Its port was virtual: the connection gets another.
fn egress_replacing(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    bytes: Vec<u8>,
    name: SocketName,
) -> Outcome {
    let prepared = (|| {
        let fresh = tcp_socket(v6)?;
        let nonblocking = copy_nonblock(copy, &fresh)?;
        super::copy_timeouts(copy, &fresh);
        Ok((fresh, nonblocking))
    })();
    let (fresh, nonblocking) = match prepared {
        Ok(p) => p,
        Err(e) => return Outcome::Errno(e),
    };
    let attempt = move |call: &Call<'_>| {
        let answer = match ax_sys::sockaddr::connect_raw(fresh.as_fd(), &bytes) {
            Ok(()) => Outcome::Value(0),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                Outcome::Errno(libc::EINPROGRESS)
            }
            Err(e) => return Outcome::Errno(errno_of(&e)),
        };
        let target = match super::reopen(call) {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        if !call.still_valid() {
            return Outcome::Answered;
        }
        match install_over(call, &target, call.arg(0), &fresh) {
            Outcome::Value(_) => {
                release_listener(call, name);
                answer
            }
            other => other,
        }
    };
    if nonblocking {
        attempt(call)
    } else {
        defer(call, attempt)
    }
}

/// `local`: the name of a kernel socket, as classified (`None` for a
/// swapped one).
fn connect_virtual(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    local: Option<SocketAddr>,
    dst: SocketAddr,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    let dir = &call.shared.directory;
    // A socket with no local port is neither connected nor listening: the
    // common case costs no call.
    let local_port = local.map_or(0, |a| a.port());
    if rebind.is_none() && local_port != 0 {
        if sockopt::socket_acceptconn(copy).unwrap_or(false) {
            return Ok(Outcome::Errno(libc::EISCONN));
        }
        if let Ok(Some(_)) = rustix::net::getpeername(copy) {
            return Ok(Outcome::Errno(libc::EISCONN));
        }
    }
    let endpoints = match dir.resolve(call.app, dst) {
        Ok(eps) => eps,
        Err(ResolveError::NoService(_)) => {
            // Served on another host of a cluster: host to host.
            match dir.remote(call.app, dst) {
                Ok(Some(route)) => {
                    return Ok(super::remote::connect(call, copy, v6, dst, route, rebind))
                }
                Ok(None) => {}
                Err(e) => {
                    log_denied(&e);
                    return refused(call, target, copy, v6, rebind.is_some());
                }
            }
            // Capped: a wait from the wire is validated, an embedder's
            // configuration may not be.
            let wait = dir
                .connect_wait(call.app)
                .unwrap_or(call.shared.config.connect_wait)
                .min(ax_registry::MAX_CONNECT_WAIT);
            if wait.is_zero() || rebind.is_some() {
                tracing::debug!(app = call.app, %dst, "connect refused: no service");
                return refused(call, target, copy, v6, rebind.is_some());
            }
            if is_nonblocking(copy) {
                return Ok(wait_in_background(call, copy, v6, dst, wait));
            }
            // --connect-wait: the service may come up; wait for it off the
            // receive loop.
            let copy = copy.try_clone().map_err(|e| errno_of(&e))?;
            return Ok(defer(call, move |call| {
                wait_for_service(call, &copy, v6, dst, rebind, wait).into()
            }));
        }
        Err(e) => {
            log_denied(&e);
            return refused(call, target, copy, v6, rebind.is_some());
        }
    };
    match deliver(
        call, target, copy, v6, dst, rebind, endpoints, local_port, false,
    )? {
        Some(outcome) => Ok(outcome),
        None => refused(call, target, copy, v6, rebind.is_some()),
    }
}

/// Nobody serves the destination. A blocking connect fails with
/// `ECONNREFUSED`. A non-blocking one gets `EINPROGRESS` from TCP, and the
/// refusal later, from `poll` and `SO_ERROR`: a fresh TCP socket that
/// connects to a loopback port nobody listens on does just that, and
/// replaces the program's. (A socket the program bound keeps its binding,
/// and the immediate answer.)
pub(super) fn refused(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    bound: bool,
) -> Result<Outcome, Errno> {
    if bound || !is_nonblocking(copy) {
        return Ok(Outcome::Errno(libc::ECONNREFUSED));
    }
    let Ok(fresh) = refusing_connection(v6) else {
        return Ok(Outcome::Errno(libc::ECONNREFUSED));
    };
    super::copy_timeouts(copy, &fresh);
    call.check_valid()?;
    Ok(match install_over(call, target, call.arg(0), &fresh) {
        Outcome::Value(_) => Outcome::Errno(libc::EINPROGRESS),
        other => other,
    })
}

/// A non-blocking TCP socket of the program's family whose connect to a
/// closed loopback port is under way (and will be refused).
fn refusing_connection(v6: bool) -> Result<OwnedFd, Errno> {
    let errno = |e: rustix::io::Errno| e.raw_os_error();
    // A bound, never listening socket holds a port nobody listens on.
    let (_closed, here) = loopback_port()?;
    let port = here.port();
    let fresh = tcp_socket(v6)?;
    set_nonblock(&fresh, true)?;
    let dst = if v6 {
        sockopt::set_ipv6_v6only(&fresh, false).map_err(errno)?;
        SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port))
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    };
    match rustix::net::connect(&fresh, &dst) {
        Err(rustix::io::Errno::INPROGRESS) => Ok(fresh),
        Ok(()) => Err(libc::EIO),
        Err(e) => Err(e.raw_os_error()),
    }
}
