//! `connect(fd, addr, addrlen)`.
//!
//! * Inputs: an `AF_INET`/`AF_INET6` stream socket and an address read once
//!   from the program's memory.
//! * Decision: a virtual destination is looked up in the directory (nothing
//!   there: `ECONNREFUSED`); any other destination is egress.
//! * Effect, virtual: a UNIX socket named after the client's VIP:port and
//!   the destination is connected to the service's listener and replaces
//!   the program's socket at the same fd number; `connect` returns 0.
//! * Effect, egress: the broker connects the program's own socket (its
//!   copy shares the open file) with the broker's copy of the address, so
//!   the kernel's answer — `EINPROGRESS` for a non-blocking socket
//!   included — is exactly what the program would have had, and no other
//!   thread can swap the address in between.

use super::{
    classify, copy_nonblock, defer, endpoint_addr, endpoint_alive, install_over, is_nonblocking,
    set_nonblock, Call, Outcome, Sock,
};
use crate::addr::{self, Purpose};
use crate::names::SocketName;
use crate::serve::next_client_port;
use crate::target::{errno_of, Errno, Target};
use ax_registry::UnixEndpoint;
use rustix::net::sockopt::{self, Timeout};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;

/// How long a connect to a service whose backlog is full may wait.
const FULL_BACKLOG_WAIT: Duration = Duration::from_secs(60);

pub(super) fn handle(call: &Call<'_>, target: &Target) -> Outcome {
    run(call, target).into()
}

fn run(call: &Call<'_>, target: &Target) -> Result<Outcome, Errno> {
    let fd_arg = call.arg(0);
    let (v6, copy, rebind) = match classify(call, target, fd_arg) {
        Ok(Sock::Inet { v6, fd }) => (v6, fd, None),
        Ok(Sock::Swapped { name, fd }) => {
            let listening = sockopt::socket_acceptconn(&fd).unwrap_or(false);
            match name {
                // Bound by us but never listened on: it may still connect.
                SocketName::Listener { v6, .. }
                    if !listening && super::peer_name(&fd).is_none() =>
                {
                    (v6, fd, Some(name))
                }
                // An earlier daemon installed it and died before answering.
                SocketName::Client { .. } if call.replay => return Ok(Outcome::Value(0)),
                _ => return Ok(Outcome::Errno(libc::EISCONN)),
            }
        }
        Ok(Sock::Other) => {
            note_unix_connector(call, target);
            return Ok(Outcome::Continue);
        }
        Err(libc::EBADF) => return Ok(Outcome::Continue),
        Err(e) => return Ok(super::inaccessible(call, e)),
    };
    let addrlen = call.arg(2) as u32 as i32;
    if addrlen < 0 || addrlen as usize > ax_sys::sockaddr::SOCKADDR_STORAGE_LEN {
        return Ok(Outcome::Errno(libc::EINVAL));
    }
    let bytes = target.read(call.arg(1), addrlen as usize)?;
    call.check_valid()?;
    let dst = addr::parse(&bytes, v6, Purpose::Connect);
    let dir = &call.shared.directory;
    match dst {
        Some(dst) if dir.is_virtual(dst.ip()) => {
            connect_virtual(call, target, &copy, v6, dst, rebind)
        }
        _ if rebind.is_some() => Ok(Outcome::Errno(libc::EINVAL)),
        _ if call.replay => Ok(egress_replayed(call, copy, bytes)),
        _ => Ok(egress(call, copy, bytes)),
    }
}

fn egress(call: &Call<'_>, copy: OwnedFd, bytes: Vec<u8>) -> Outcome {
    let nonblocking = is_nonblocking(&copy);
    let attempt =
        move || match ax_sys::sockaddr::connect_raw(std::os::fd::AsFd::as_fd(&copy), &bytes) {
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

/// A program under ax connecting a UNIX socket may be reaching for the
/// daemon's control socket: remember who, before the connection exists, so
/// that the daemon can tell it from a client that is not under ax
/// ([`crate::Broker::app_of_peer`]).
fn note_unix_connector(call: &Call<'_>, target: &Target) {
    let is_unix = target
        .fd(call.arg(0))
        .ok()
        .and_then(|fd| sockopt::socket_domain(&fd).ok())
        == Some(rustix::net::AddressFamily::UNIX);
    if is_unix {
        if let Some((pid, started)) = crate::target::process_identity(target.tid) {
            call.shared.note_unix_connector(pid, started, call.app);
        }
    }
}

/// An egress connect an earlier daemon started and did not answer: the
/// socket may be connected or connecting already.
fn egress_replayed(call: &Call<'_>, copy: OwnedFd, bytes: Vec<u8>) -> Outcome {
    defer(call, move |_| {
        match ax_sys::sockaddr::connect_raw(std::os::fd::AsFd::as_fd(&copy), &bytes) {
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

fn connect_virtual(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    let dir = &call.shared.directory;
    // A socket with no local port is neither connected nor listening: the
    // common case costs one call.
    let local_port = rustix::net::getsockname(copy)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
        .map(|a| a.port())
        .unwrap_or(0);
    if rebind.is_none() && local_port != 0 {
        if sockopt::socket_acceptconn(copy).unwrap_or(false) {
            return Ok(Outcome::Errno(libc::EISCONN));
        }
        if let Ok(Some(_)) = rustix::net::getpeername(copy) {
            return Ok(Outcome::Errno(libc::EISCONN));
        }
    }
    let endpoint = match dir.resolve(call.app, dst) {
        Ok(ep) => ep,
        Err(e) => {
            tracing::debug!(app = call.app, %dst, reason = %e, "connect refused");
            return Ok(Outcome::Errno(libc::ECONNREFUSED));
        }
    };
    // A port the program bound before connecting is kept.
    let bound_port = match rebind {
        Some(SocketName::Listener { bound, .. }) => bound.port(),
        _ => local_port,
    };
    let local_ip = client_vip(&dir.app_vips(call.app), dst);
    let sock = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| e.raw_os_error())?;
    bind_client_name(call, &sock, v6, local_ip, bound_port, dst)?;
    let target_addr = endpoint_addr(&endpoint)?;
    match rustix::net::connect(&sock, &target_addr) {
        Ok(()) => finish(call, target, copy, sock, rebind),
        Err(e) if e == rustix::io::Errno::AGAIN => {
            // The listener's backlog is full: TCP would keep retrying its
            // SYN; wait for room off the receive loop.
            let copy = copy.try_clone().map_err(|e| errno_of(&e))?;
            Ok(defer(call, move |call| {
                let waited = (|| {
                    set_nonblock(&sock, false)?;
                    sockopt::set_socket_timeout(&sock, Timeout::Send, Some(FULL_BACKLOG_WAIT))
                        .map_err(|e| e.raw_os_error())?;
                    rustix::net::connect(&sock, &target_addr).map_err(|e| {
                        match e.raw_os_error() {
                            libc::EAGAIN => libc::ETIMEDOUT,
                            other => other,
                        }
                    })?;
                    sockopt::set_socket_timeout(&sock, Timeout::Send, None)
                        .map_err(|e| e.raw_os_error())?;
                    let target = Target::open(call.notif.pid).map_err(|e| errno_of(&e))?;
                    finish(call, &target, &copy, sock, rebind)
                })();
                waited.into()
            }))
        }
        Err(e) => {
            if !endpoint_alive(&endpoint) {
                dir.release(&endpoint);
            }
            tracing::debug!(app = call.app, %dst, error = %e, "service listener did not accept");
            Ok(Outcome::Errno(libc::ECONNREFUSED))
        }
    }
}

/// Binds the client socket to its self-describing name, choosing a free
/// client port unless the program bound one.
fn bind_client_name(
    call: &Call<'_>,
    sock: &OwnedFd,
    v6: bool,
    local_ip: IpAddr,
    bound_port: u16,
    dst: SocketAddr,
) -> Result<(), Errno> {
    let attempts = if bound_port != 0 { 1 } else { 64 };
    for _ in 0..attempts {
        let port = if bound_port != 0 {
            bound_port
        } else {
            next_client_port(call.shared)
        };
        let name = SocketName::Client {
            instance: call.instance(),
            v6,
            local: SocketAddr::new(local_ip, port),
            peer: dst,
        };
        let addr = endpoint_addr(&UnixEndpoint::Abstract(name.encode()))?;
        match rustix::net::bind(sock, &addr) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::ADDRINUSE => continue,
            Err(e) => return Err(e.raw_os_error()),
        }
    }
    Err(libc::EADDRNOTAVAIL)
}

fn finish(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    sock: OwnedFd,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    copy_nonblock(copy, &sock)?;
    for which in [Timeout::Recv, Timeout::Send] {
        if let Ok(Some(t)) = sockopt::socket_timeout(copy, which) {
            let _ = sockopt::set_socket_timeout(&sock, which, Some(t));
        }
    }
    call.check_valid()?;
    let outcome = install_over(call, target, call.arg(0), &sock);
    if let (Outcome::Value(_), Some(SocketName::Listener { .. })) = (outcome, rebind) {
        if let Some(name) = rebind {
            call.shared
                .directory
                .release(&UnixEndpoint::Abstract(name.encode()));
        }
    }
    Ok(outcome)
}
