//! `getsockname(fd, addr, addrlen)` and `getpeername(fd, addr, addrlen)`.
//!
//! * Inputs: a socket this broker installed (anything else runs natively).
//! * Decision: the answer is derived from the socket's own name and the
//!   identities the broker keeps (`crate::idents`): a listener answers the address it was bound to; an accepted
//!   connection answers the VIP:port the client dialled and the client's
//!   VIP:port; a client answers its own VIP:port and the destination.
//! * Effect: the address is written in the family of the socket the
//!   program created (v4-mapped on `AF_INET6`; on `AF_INET`, an IPv6 VIP of
//!   the app's own, which a client reaches a listener on `0.0.0.0` by, as
//!   the app's IPv4 VIP), cut as the kernel does.

use super::{classify, peer_ident, write_sockaddr, Call, Outcome, Sock};
use crate::addr;
use crate::names::SocketName;
use crate::target::{Errno, Target};
use rustix::net::sockopt;
use std::net::SocketAddr;

pub(super) fn handle(call: &Call<'_>, target: &Target, peer: bool) -> Outcome {
    // The common case, a connection of the broker's: answered from what it
    // keeps, without copying the fd.
    if let Some(conn) = super::known_conn(call, target) {
        let a = if peer {
            conn.peer
        } else {
            own_in_family(
                call,
                conn.local,
                conn.v6,
                conn.accepted.then_some(conn.peer),
            )
        };
        return match write_sockaddr(target, call.arg(1), call.arg(2), &addr::encode(a, conn.v6)) {
            Ok(()) => Outcome::Value(0),
            Err(e) => Outcome::Errno(e),
        };
    }
    let (name, fd) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd, .. }) => (name, fd),
        Ok(Sock::Inet { v6, fd, .. }) if call.state.any_remote() => {
            if let Some(outcome) = remote(call, target, &fd, v6, peer) {
                return outcome;
            }
            if peer {
                return held_peer(call, target, &fd, v6);
            }
            return Outcome::Continue;
        }
        Ok(Sock::Inet { v6, fd, .. }) if peer => return held_peer(call, target, &fd, v6),
        Ok(_) => return Outcome::Continue,
        Err(e) => return super::fd_error(call, e),
    };
    let v6 = name.is_v6();
    let answer: Result<SocketAddr, Errno> = match name {
        SocketName::Client {
            local, peer: dst, ..
        } => Ok(if peer {
            dst
        } else {
            own_in_family(call, local, v6, None)
        }),
        SocketName::Listener { bound, .. } => {
            let listening = sockopt::socket_acceptconn(&fd).unwrap_or(false);
            let client = if listening {
                None
            } else {
                peer_ident(call.shared, &fd)
            };
            match (client, peer) {
                (
                    Some(SocketName::Client {
                        local, peer: dst, ..
                    }),
                    _,
                ) => Ok(if peer {
                    local
                } else {
                    own_in_family(call, dst, v6, Some(local))
                }),
                (_, false) => Ok(bound),
                (_, true) => Err(libc::ENOTCONN),
            }
        }
    };
    let result =
        answer.and_then(|a| write_sockaddr(target, call.arg(1), call.arg(2), &addr::encode(a, v6)));
    match result {
        Ok(()) => Outcome::Value(0),
        Err(e) => Outcome::Errno(e),
    }
}

/// A local address of the calling app's, as its socket of family `v6`
/// holds it (see [`addr::own_in_family`]): `peer`, the client's address,
/// for a connection the app accepted.
fn own_in_family(
    call: &Call<'_>,
    own: SocketAddr,
    v6: bool,
    peer: Option<SocketAddr>,
) -> SocketAddr {
    addr::own_in_family(own, v6, peer, || call.shared.directory.app_vips(call.app))
}

/// A TCP socket whose connect ax held for a service that was not up yet
/// (`--connect-wait`) answers the VIP:port the program asked for, not the
/// loopback port it really reached.
fn held_peer(call: &Call<'_>, target: &Target, fd: &std::os::fd::OwnedFd, v6: bool) -> Outcome {
    if !call.state.any_held_connects() {
        return Outcome::Continue;
    }
    let real = rustix::net::getpeername(fd)
        .ok()
        .flatten()
        .and_then(|a| SocketAddr::try_from(a).ok());
    let mapped = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        _ => a,
    };
    let dst =
        real.and_then(|r| super::inode(fd).and_then(|i| call.state.held_destination(i, mapped(r))));
    match dst {
        Some(dst) => match write_sockaddr(target, call.arg(1), call.arg(2), &addr::encode(dst, v6))
        {
            Ok(()) => Outcome::Value(0),
            Err(e) => Outcome::Errno(e),
        },
        None => Outcome::Continue,
    }
}

/// A TCP connection between hosts of a cluster answers the VIPs it stands
/// for (see `crate::doors::VirtualNames`); `None` for any other socket.
fn remote(
    call: &Call<'_>,
    target: &Target,
    fd: &std::os::fd::OwnedFd,
    v6: bool,
    peer: bool,
) -> Option<Outcome> {
    let local = super::inet_name(fd)?;
    let real_peer = crate::doors::inet_peer(fd)?;
    let names = call
        .state
        .remote_names(super::inode(fd)?, (local, real_peer))?;
    let answer = if peer {
        names.peer
    } else {
        own_in_family(call, names.local, v6, Some(names.peer))
    };
    Some(
        match write_sockaddr(target, call.arg(1), call.arg(2), &addr::encode(answer, v6)) {
            Ok(()) => Outcome::Value(0),
            Err(e) => Outcome::Errno(e),
        },
    )
}
