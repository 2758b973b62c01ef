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

use super::{
    classify_expecting, copy_nonblock, defer, endpoint_addr, endpoint_alive, install_over,
    install_over_with, is_nonblocking, set_nonblock, Call, Expect, Outcome, Sock,
};
use crate::addr::{self, Purpose};
use crate::names::SocketName;
use crate::serve::next_client_port;
use crate::target::{errno_of, Errno, Target};
use ax_registry::{ResolveError, UnixEndpoint};
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a connect to a service whose backlog is full may wait.
const FULL_BACKLOG_WAIT: Duration = Duration::from_secs(60);
/// How often that wait checks that its caller still waits.
const BACKLOG_SLICE: Duration = Duration::from_millis(50);
/// How often a connect waiting for a service that is bound but not yet
/// listening tries again.
const NOT_LISTENING_YET: Duration = Duration::from_millis(10);

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

/// The IP address and port an IP socket is bound to.
pub(super) fn inet_name(fd: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
}

/// A broker TCP socket bound to a free port on 127.0.0.1, and that address.
fn loopback_port() -> Result<(OwnedFd, SocketAddr), Errno> {
    let sock = tcp_socket(false)?;
    rustix::net::bind(&sock, &SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| e.raw_os_error())?;
    let here = inet_name(&sock).ok_or(libc::EIO)?;
    Ok((sock, here))
}

/// A new TCP socket of the program's family, close-on-exec for the broker.
fn tcp_socket(v6: bool) -> Result<OwnedFd, Errno> {
    let family = if v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| e.raw_os_error())
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

fn client_vip(vips: &[IpAddr], dst: SocketAddr) -> IpAddr {
    let same = vips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4());
    match (same, dst.ip()) {
        (Some(ip), _) => *ip,
        (None, IpAddr::V6(_)) => vips
            .first()
            .copied()
            .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        (None, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
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

pub(super) fn log_denied(e: &ResolveError) {
    if let ResolveError::Denied {
        dst,
        client,
        client_labels,
        server,
        server_labels,
        rule,
    } = e
    {
        crate::metrics::connect_denied();
        tracing::warn!(
            client_app = client,
            client_labels = %labels_text(client_labels),
            server_app = server,
            server_labels = %labels_text(server_labels),
            %dst,
            %rule,
            "connect denied by policy"
        );
    }
}

fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A blocking connect to a service that is not up yet, under
/// `--connect-wait`: waits (in slices, so that a program killed or
/// signalled meanwhile is noticed) until the service appears or the wait
/// ends in `ECONNREFUSED`.
pub(super) fn wait_for_service(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
    wait: Duration,
) -> Result<Outcome, Errno> {
    let dir = &call.shared.directory;
    let deadline = deadline_after(wait);
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return Ok(answer),
    };
    tracing::debug!(app = call.app, %dst, ?wait, "connect waits for the service");
    loop {
        let seen = dir.generation();
        // A service is registered at `bind`, and takes connections from
        // its `listen` on: until then, keep looking every slice.
        let mut slice = BACKLOG_SLICE;
        match dir.resolve(call.app, dst) {
            Ok(endpoints) => {
                let local_port = inet_name(copy).map_or(0, |a| a.port());
                if let Some(outcome) = deliver(
                    call, &target, copy, v6, dst, rebind, endpoints, local_port, true,
                )? {
                    return Ok(outcome);
                }
                slice = NOT_LISTENING_YET;
            }
            // Up on another host of a cluster meanwhile: host to host (for
            // `connect`; Fast Open's `sendto` goes on waiting for a local
            // service, as it never reaches another host).
            Err(ResolveError::NoService(_)) if !is_connect(call) => {}
            Err(ResolveError::NoService(_)) => match dir.remote(call.app, dst) {
                Ok(Some(route)) => {
                    return Ok(super::remote::connect_here(
                        call, copy, v6, dst, route, rebind,
                    ))
                }
                Ok(None) => {}
                Err(e) => {
                    log_denied(&e);
                    return Ok(Outcome::Errno(libc::ECONNREFUSED));
                }
            },
            Err(e) => {
                log_denied(&e);
                return Ok(Outcome::Errno(libc::ECONNREFUSED));
            }
        }
        if !call.still_valid() {
            return Ok(Outcome::Answered);
        }
        if target.signal_pending() {
            return Err(libc::EINTR);
        }
        let now = Instant::now();
        if now >= deadline {
            tracing::debug!(app = call.app, %dst, "connect-wait ended: no service");
            return Ok(Outcome::Errno(libc::ECONNREFUSED));
        }
        dir.wait_for_change(seen, deadline.min(now + slice));
    }
}

/// Whether the call is `connect` (not Fast Open's `sendto`/`sendmsg`).
fn is_connect(call: &Call<'_>) -> bool {
    libc::c_long::from(call.notif.nr) == libc::SYS_connect
}

/// `wait` from now; a wait too long to add ends at the longest allowed.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(ax_registry::MAX_CONNECT_WAIT))
        .unwrap_or(now)
}

/// A non-blocking connect to a service that is not up yet, under
/// `--connect-wait`. The program's own TCP socket connects to a loopback
/// port whose accept queue the broker keeps full, so its SYN goes
/// unanswered and the socket stays "in progress" (`EINPROGRESS`, not
/// writable), registered in the program's `epoll` as usual. Meanwhile a
/// helper waits for the service:
///
/// * it comes up: the broker makes room in the queue; the program's next
///   SYN (the kernel retries within a second) is accepted, and the
///   accepted TCP connection is handed to the server like an exposed one
///   ([`crate::doors`]): client and server then talk over TCP loopback,
///   never through the broker;
/// * the wait ends: the port closes, and the next SYN is refused, so the
///   program sees `ECONNREFUSED` from `SO_ERROR`;
/// * the program closes its socket, or the app exits: the wait ends at
///   once, freeing its thread and ports.
///
/// An app holds at most `crate::appstate::MAX_HELD_CONNECTS` connects at
/// once; one more fails with `ENOBUFS`.
fn wait_in_background(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    wait: Duration,
) -> Outcome {
    let Some(held_permit) = call.state.held_connects.take() else {
        return Outcome::Errno(libc::ENOBUFS);
    };
    let Some(inode) = super::inode(copy) else {
        return Outcome::Errno(libc::ENOBUFS);
    };
    let caller = crate::target::thread_group_leader(call.notif.pid).ok();
    let hold = match HeldConnect::start(copy, v6) {
        Ok(h) => {
            let noted = h
                .address()
                .map(|held| call.state.note_held_connect(inode, held, dst));
            if !matches!(noted, Some(Ok(()))) {
                // Dropping the hold closes its port: the program's
                // connect, under way, is refused.
                return Outcome::Errno(libc::ENOBUFS);
            }
            h
        }
        Err(e) => {
            tracing::debug!(app = call.app, %dst, errno = e, "cannot hold the connect back");
            return Outcome::Errno(libc::ECONNREFUSED);
        }
    };
    let shared = call.shared.clone();
    let state = call.state.clone();
    let app = call.app;
    tracing::debug!(app, %dst, ?wait, "connect held until the service is up");
    let spawned = call.shared.pool.spawn(Box::new(move || {
        let _permit = held_permit;
        let caller_holds = || {
            state.is_alive()
                && caller.is_some_and(|pid| {
                    crate::orphans::socket_fds(pid)
                        .iter()
                        .any(|&(_, i)| i == inode)
                })
        };
        hold.wait_and_hand_over(&shared, app, dst, wait, &caller_holds);
    }));
    match spawned {
        Ok(()) => Outcome::Errno(libc::EINPROGRESS),
        Err(_) => Outcome::Errno(libc::ENOBUFS),
    }
}

/// A program's TCP connect held back on a loopback port with a full
/// accept queue (see [`wait_in_background`]).
struct HeldConnect {
    port_listener: OwnedFd,
    /// Fills the queue (a listen backlog of 0 takes one connection).
    filler: OwnedFd,
}

impl HeldConnect {
    /// The loopback address the program's socket connects to.
    fn address(&self) -> Option<SocketAddr> {
        inet_name(&self.port_listener)
    }

    fn start(program_socket: &OwnedFd, v6: bool) -> Result<Self, Errno> {
        let errno = |e: rustix::io::Errno| e.raw_os_error();
        let (port_listener, here) = loopback_port()?;
        rustix::net::listen(&port_listener, 0).map_err(errno)?;
        let filler = tcp_socket(false)?;
        rustix::net::connect(&filler, &here).map_err(errno)?;
        let bytes = addr::encode(here, v6);
        match ax_sys::sockaddr::connect_raw(program_socket.as_fd(), &bytes) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Ok(()) => return Err(libc::EIO),
            Err(e) => return Err(errno_of(&e)),
        }
        Ok(Self {
            port_listener,
            filler,
        })
    }

    fn wait_and_hand_over(
        self,
        shared: &std::sync::Arc<crate::serve::Shared>,
        app: ax_registry::AppId,
        dst: SocketAddr,
        wait: Duration,
        caller_holds: &dyn Fn() -> bool,
    ) {
        let dir = &shared.directory;
        let deadline = deadline_after(wait);
        let endpoints = loop {
            let seen = dir.generation();
            match dir.resolve(app, dst) {
                Ok(endpoints) => break endpoints,
                // Up on another host: the program's socket, held on a
                // loopback port, cannot be handed there; it is refused now
                // rather than at the end of the wait, and a new connect
                // goes host to host.
                Err(ResolveError::NoService(_)) if matches!(dir.remote(app, dst), Ok(Some(_))) => {
                    tracing::info!(app, %dst, "connect-wait ended: the service is up on another host; a non-blocking connect held is refused, the next one reaches it");
                    return;
                }
                Err(ResolveError::NoService(_)) => {}
                Err(e) => {
                    log_denied(&e);
                    return; // closing the port refuses the program's SYN
                }
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(app, %dst, "connect-wait ended: no service");
                return;
            }
            if !caller_holds() {
                tracing::debug!(app, %dst, "connect-wait ended: the program closed its socket");
                return;
            }
            dir.wait_for_change(seen, deadline.min(now + Duration::from_secs(1)));
        };
        // Room for the program's SYN, which the kernel retries within a
        // second (tcp_syn_linear_timeouts); a program that closed its
        // socket meanwhile never comes.
        drop(rustix::net::accept(&self.port_listener));
        drop(self.filler);
        let mut fds = [rustix::event::PollFd::new(
            &self.port_listener,
            rustix::event::PollFlags::IN,
        )];
        let limit = rustix::event::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        if !matches!(rustix::event::poll(&mut fds, Some(&limit)), Ok(n) if n > 0) {
            return;
        }
        let Ok(mut conn) = rustix::net::accept_with(&self.port_listener, SocketFlags::CLOEXEC)
        else {
            return;
        };
        // The service may be bound and not listening yet: ring again until
        // it answers, or the wait ends (the program then sees the
        // connection closed).
        let mut endpoints = endpoints;
        loop {
            match shared.doors.ring(
                shared.config.instance,
                &shared.sockets,
                conn,
                &endpoints,
                None,
            ) {
                Ok(()) => {
                    tracing::debug!(app, %dst, "held connect handed to the service");
                    return;
                }
                Err((e, back)) => {
                    if Instant::now() >= deadline {
                        tracing::debug!(app, %dst, error = %e, "held connect not taken by the service");
                        return;
                    }
                    conn = back;
                }
            }
            std::thread::sleep(NOT_LISTENING_YET);
            if let Ok(eps) = dir.resolve(app, dst) {
                endpoints = eps;
            }
        }
    }
}

/// Connects a new UNIX socket, whose identity is the client's VIP:port and
/// the destination, to the first of `endpoints` that takes it (a backend that
/// refuses is skipped and forgotten), and installs it over the program's
/// socket. `waiting`: already off the receive loop, so a full backlog is
/// waited for here. `None`: no backend took the connection.
#[allow(clippy::too_many_arguments)]
pub(super) fn deliver(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
    endpoints: Vec<UnixEndpoint>,
    local_port: u16,
    waiting: bool,
) -> Result<Option<Outcome>, Errno> {
    let dir = &call.shared.directory;
    // A port the program bound before connecting is kept.
    let bound_port = match rebind {
        Some(SocketName::Listener { bound, .. }) => bound.port(),
        _ => local_port,
    };
    // The family of the service reached (see `Directory::served_addr`).
    let local_ip = client_vip(&dir.app_vips(call.app), dir.served_addr(dst));
    let client = new_client(call, v6, local_ip, bound_port, dst)?;
    for endpoint in endpoints {
        let target_addr = endpoint_addr(&endpoint)?;
        match rustix::net::connect(&client.sock, &target_addr) {
            Ok(()) => return finish(call, target, copy, client, rebind).map(Some),
            Err(e) if e == rustix::io::Errno::AGAIN => {
                // The listener's backlog is full: TCP would keep retrying
                // its SYN; wait for room off the receive loop.
                if waiting {
                    return wait_for_room(call, copy, client, target_addr, rebind).map(Some);
                }
                let copy = copy.try_clone().map_err(|e| errno_of(&e))?;
                return Ok(Some(defer(call, move |call| {
                    wait_for_room(call, &copy, client, target_addr, rebind).into()
                })));
            }
            Err(e) => {
                if !endpoint_alive(call.shared, &endpoint) {
                    dir.release(&endpoint);
                }
                tracing::debug!(app = call.app, %dst, %endpoint, error = %e, "backend did not accept; trying the next");
            }
        }
    }
    Ok(None)
}

/// Waits, off the receive loop, for room in a full listener's backlog.
pub(super) fn wait_for_room(
    call: &Call<'_>,
    copy: &OwnedFd,
    mut client: Client,
    target_addr: rustix::net::SocketAddrUnix,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    // Wait for room in short slices: a program killed meanwhile, or
    // interrupted by a signal, must not keep this thread (and what it
    // holds) for the whole wait.
    client.set_nonblocking(false)?;
    let sock = &client.sock;
    sockopt::set_socket_timeout(sock, Timeout::Send, Some(BACKLOG_SLICE))
        .map_err(|e| e.raw_os_error())?;
    let deadline = Instant::now() + FULL_BACKLOG_WAIT;
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return Ok(answer),
    };
    loop {
        match rustix::net::connect(sock, &target_addr) {
            Ok(()) => break,
            Err(e) if e == rustix::io::Errno::AGAIN => {}
            Err(e) => return Err(e.raw_os_error()),
        }
        if !call.still_valid() {
            return Ok(Outcome::Answered);
        }
        if target.signal_pending() {
            return Err(libc::EINTR);
        }
        if Instant::now() >= deadline {
            return Err(libc::ETIMEDOUT);
        }
    }
    sockopt::set_socket_timeout(sock, Timeout::Send, None).map_err(|e| e.raw_os_error())?;
    finish(call, &target, copy, client, rebind)
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

/// A new client socket of the broker's with its identity: the client's
/// VIP:port (a free client port unless the program bound one) and the
/// destination. The socket stays unbound, so that its peer's `recvfrom`
/// reports no address, as over TCP: the broker keeps the identity (see
/// `crate::idents`), and [`finish`] sends it to the listener ahead of the
/// program's data.
pub(super) fn new_client(
    call: &Call<'_>,
    v6: bool,
    local_ip: IpAddr,
    bound_port: u16,
    dst: SocketAddr,
) -> Result<Client, Errno> {
    // Non-blocking, as spare sockets come (see `Sockets::take`): the
    // connect below never waits on the receive loop.
    let spare = call.shared.sockets.take_spare()?;
    let name_with = |port: u16| SocketName::Client {
        instance: call.instance(),
        v6,
        local: SocketAddr::new(local_ip, port),
        peer: dst,
    };
    let name = if bound_port != 0 {
        name_with(bound_port)
    } else {
        free_client_name(call, name_with)?
    };
    let (sock, inode) = (spare.fd, spare.inode);
    call.shared
        .idents
        .insert(spare.cookie, inode, crate::idents::Kind::Own, name, None)
        .map_err(|_| {
            tracing::warn!(
                app = call.app,
                "connection refused: the identity table is full"
            );
            libc::ENOBUFS
        })?;
    Ok(Client {
        hello: call.shared.idents.hello(&name),
        sock,
        inode,
        nonblocking: true,
        v6,
    })
}

/// The client identity, `name_with` a port in turn, that no live client
/// socket of the broker's holds, as the kernel gives a connection an
/// ephemeral port no connection to the same destination uses;
/// `EADDRNOTAVAIL`, as the kernel's, when all are taken. (Ports are drawn
/// from one counter, so two connects at once never draw the same.)
fn free_client_name(
    call: &Call<'_>,
    name_with: impl Fn(u16) -> SocketName,
) -> Result<SocketName, Errno> {
    (0..crate::serve::CLIENT_PORTS)
        .map(|_| name_with(next_client_port(call.shared)))
        .find(|name| !call.shared.idents.client_taken(name))
        .ok_or(libc::EADDRNOTAVAIL)
}

/// The hello a client socket sends ahead of the program's data.
pub(super) type Hello = [u8; crate::idents::HELLO_LEN];

/// A client socket of the broker's, named (see [`new_client`]) and
/// about to connect.
pub(super) struct Client {
    pub(super) sock: OwnedFd,
    /// Its inode: the key of its state.
    inode: u64,
    /// Whether its file is non-blocking now.
    nonblocking: bool,
    hello: Hello,
    /// Whether the program's socket is `AF_INET6`.
    v6: bool,
}

impl Client {
    /// Makes the socket's file blocking or not. Its only settable status
    /// flag is `O_NONBLOCK` (spare sockets come with nothing else set, and
    /// the broker sets nothing else), so one `fcntl` sets them all, where
    /// [`set_nonblock`] needs two for a file whose flags it does not know.
    fn set_nonblocking(&mut self, on: bool) -> Result<(), Errno> {
        if on == self.nonblocking {
            return Ok(());
        }
        let flags = if on {
            rustix::fs::OFlags::NONBLOCK
        } else {
            rustix::fs::OFlags::empty()
        };
        rustix::fs::fcntl_setfl(&self.sock, flags).map_err(|e| e.raw_os_error())?;
        self.nonblocking = on;
        Ok(())
    }
}

/// Sends the client socket's hello (see `crate::idents`) to the listener it
/// just connected to, before the program holds the socket.
fn send_hello(sock: &OwnedFd, hello: &Hello) -> Result<(), Errno> {
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    match rustix::net::send(sock, hello, flags) {
        Ok(n) if n == hello.len() => Ok(()),
        // An empty socket takes far more: the listener is gone.
        _ => Err(libc::ECONNREFUSED),
    }
}

/// Installs the connected UNIX socket over the program's. A non-blocking
/// socket is told `EINPROGRESS`, as TCP tells it, though the connection is
/// already made: the next `connect` then answers 0, and `SO_ERROR` 0.
pub(super) fn finish(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    mut client: Client,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    send_hello(&client.sock, &client.hello)?;
    // The program's flags, read once for both (and once in the call: an
    // app that connects again read them to look the fd up, see
    // `connect_known`).
    let (nonblocking, cloexec) = match call.fd_info(target) {
        Some(info) => (
            info.flags & libc::O_NONBLOCK as u32 != 0,
            info.flags & libc::O_CLOEXEC as u32 != 0,
        ),
        None => (is_nonblocking(copy), true),
    };
    client.set_nonblocking(nonblocking)?;
    let sock = client.sock;
    super::copy_timeouts(copy, &sock);
    let swapped = super::carry::Swapped {
        fd: sock.as_fd(),
        inode: client.inode,
        listener: None,
    };
    super::carry::carry(call, copy, client.v6, swapped);
    if nonblocking {
        set_in_progress(call, client.inode, true);
    }
    // No ID_VALID here: ADDFD itself fails for a call nobody waits on.
    let outcome = install_over_with(call, call.arg(0), &sock, cloexec);
    if let Outcome::Value(_) = outcome {
        if let Some(name) = rebind {
            release_listener(call, name);
        }
        if nonblocking {
            return Ok(Outcome::Errno(libc::EINPROGRESS));
        }
    }
    Ok(outcome)
}

/// Withdraws the service a bound socket registered, once the socket has
/// been replaced by a connection.
pub(super) fn release_listener(call: &Call<'_>, name: SocketName) {
    if let SocketName::Listener { .. } = name {
        call.shared
            .directory
            .release(&UnixEndpoint::Abstract(name.encode()));
    }
}

/// Marks (or clears) a swapped client socket as told `EINPROGRESS` and not
/// connected again since.
fn set_in_progress(call: &Call<'_>, inode: u64, on: bool) {
    let key = super::state_key_of(inode, super::STATE_CONNECT_IN_PROGRESS);
    if !on {
        call.state.forget_option(key);
    } else if call.state.remember_option(key, vec![1]).is_err() {
        // The next connect then answers EISCONN rather than 0, which
        // programs polling for completion take as connected too.
        tracing::debug!(app = call.app, "in-progress state not kept: table full");
    }
}

/// True (once) if the socket was told `EINPROGRESS` and not connected again.
pub(super) fn take_in_progress(call: &Call<'_>, sock: &OwnedFd) -> bool {
    super::inode(sock).is_some_and(|inode| take_in_progress_of(call, inode))
}

/// [`take_in_progress`] of the socket with `inode`.
fn take_in_progress_of(call: &Call<'_>, inode: u64) -> bool {
    let key = super::state_key_of(inode, super::STATE_CONNECT_IN_PROGRESS);
    if call.state.recall_option(key) != Some(vec![1]) {
        return false;
    }
    set_in_progress(call, inode, false);
    true
}
