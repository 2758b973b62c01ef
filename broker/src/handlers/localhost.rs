//! A loopback `connect` inside an app: `127.0.0.1:P` or `[::1]:P` reaches
//! the app's own wildcard listener on `P`, as in a pod.
//!
//! * Inputs: a fresh (unbound) `AF_INET`/`AF_INET6` stream socket the
//!   kernel still owns, and a loopback destination (`::ffff:127.x.y.z`
//!   included) already read from the program's memory.
//! * Decision: the app has a listener on `P` bound by `bind` to a wildcard
//!   address (so registered on its VIP of the destination's family): then
//!   the connection is the app's own. Else, if the daemon serves another
//!   app's wildcard listener at the host's `127.0.0.1:P`/`[::1]:P`, the
//!   connection goes to that service as to its VIP, policy included (a
//!   denial is `ECONNREFUSED`): a program under ax never reaches another
//!   app through the host's loopback around the policy. Anything else (no
//!   such listener, a socket bound or connected already) is left to the
//!   caller, which sends it to the host's loopback as before.
//! * Effect: a UNIX socket named after a loopback client address and the
//!   loopback destination is connected to that listener and replaces the
//!   program's socket, as for a VIP. The server's `accept` and
//!   `getpeername` then answer `127.0.0.1` / `::1`, so loopback-only checks
//!   (redis' protected mode) accept the client; the client's `getpeername`
//!   answers the address it asked for.
//!
//! The app's own listeners come first: each app's localhost is its own,
//! so two apps may listen on the same port.

use super::client::{finish, new_client, wait_for_room};
use super::{defer, endpoint_addr, Call, Outcome};
use crate::names::SocketName;
use crate::target::{errno_of, Errno, Target};
use ax_registry::{ResolveError, UnixEndpoint};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;

/// The loopback address `ip` stands for (a v4-mapped loopback address is
/// IPv4's), or `None` if it is not loopback.
pub(super) fn loopback(ip: IpAddr) -> Option<IpAddr> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback().then_some(ip)
}

/// Connects the program's socket to its own app's wildcard listener on
/// `dst`'s port, else to the service the daemon serves at that host
/// loopback port. `Ok(None)`: neither (or the socket is not fresh); the
/// caller connects to the host's loopback instead. `local`: the socket's
/// name, as classified.
pub(super) fn connect(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    local: Option<SocketAddr>,
    dst: SocketAddr,
) -> Result<Option<Outcome>, Errno> {
    let Some(lo) = loopback(dst.ip()) else {
        return Ok(None);
    };
    // A socket with a port of its own (bound, listening, connected) is
    // the kernel's to judge.
    if local.is_none_or(|a| a.port() != 0) {
        return Ok(None);
    }
    let mut endpoints = own_listeners(call, lo, dst.port());
    if endpoints.is_empty() {
        // Another app's wildcard listener that the daemon serves on the
        // host's loopback: reached as its VIP would be, policy included.
        let host = SocketAddr::new(host_loopback(lo), dst.port());
        let Some(service) = call.shared.directory.host_loopback_service(host) else {
            return Ok(None);
        };
        match call.shared.directory.resolve(call.app, service) {
            Ok(eps) => endpoints = eps,
            Err(ResolveError::NoService(_)) => return Ok(None),
            Err(e) => {
                super::log_denied(&e);
                return super::connect::refused(call, target, copy, v6, false).map(Some);
            }
        }
    }
    let peer = SocketAddr::new(lo, dst.port());
    let client = new_client(call, v6, lo, 0, peer)?;
    for endpoint in endpoints {
        let target_addr = endpoint_addr(&endpoint)?;
        match rustix::net::connect(&client.sock, &target_addr) {
            Ok(()) => return finish(call, target, copy, client, None).map(Some),
            Err(e) if e == rustix::io::Errno::AGAIN => {
                // A full backlog: TCP retries its SYN; wait for room off
                // the receive loop.
                let copy = copy.try_clone().map_err(|e| errno_of(&e))?;
                return Ok(Some(defer(call, move |call| {
                    wait_for_room(call, &copy, client, target_addr, None).into()
                })));
            }
            Err(e) => {
                tracing::debug!(app = call.app, %peer, %endpoint, error = %e, "own listener did not accept");
            }
        }
    }
    Ok(None)
}

/// The address the daemon listens on for a loopback destination of
/// `lo`'s family: `127.0.0.1` for all of 127/8 (a wildcard listener
/// answers there natively), `::1`.
fn host_loopback(lo: IpAddr) -> IpAddr {
    match lo {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// The UNIX listeners of the calling app bound to a wildcard address on
/// `port`, for a loopback destination of `lo`'s family.
fn own_listeners(call: &Call<'_>, lo: IpAddr, port: u16) -> Vec<UnixEndpoint> {
    let dir = &call.shared.directory;
    let Some(vip) = dir
        .app_vips(call.app)
        .into_iter()
        .find(|vip| vip.is_ipv4() == lo.is_ipv4())
    else {
        return Vec::new();
    };
    dir.own_backends(call.app, SocketAddr::new(vip, port))
        .into_iter()
        .filter(|ep| is_own_wildcard(call, ep))
        .collect()
}

fn is_own_wildcard(call: &Call<'_>, ep: &UnixEndpoint) -> bool {
    let UnixEndpoint::Abstract(name) = ep else {
        return false;
    };
    matches!(
        SocketName::parse(name),
        Some(SocketName::Listener { instance, app, bound, .. })
            if instance == call.instance() && app == call.app && bound.ip().is_unspecified()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_of_both_families() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(loopback(v4), Some(v4));
        assert_eq!(
            loopback(IpAddr::V4(Ipv4Addr::new(127, 1, 2, 3))),
            Some(IpAddr::V4(Ipv4Addr::new(127, 1, 2, 3)))
        );
        assert_eq!(
            loopback(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(
            loopback(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())),
            Some(v4)
        );
        assert_eq!(loopback(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))), None);
        assert_eq!(loopback(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), None);
    }
}
