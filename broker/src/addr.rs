//! `sockaddr_in`/`sockaddr_in6` bytes: parsing a program's address the way
//! the kernel's TCP code accepts it, and writing addresses back.

use crate::target::Errno;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

const AF_UNSPEC: u16 = libc::AF_UNSPEC as u16;
const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
/// `sizeof(struct sockaddr_in)`.
pub(crate) const SOCKADDR_IN_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
pub(crate) const SOCKADDR_IN6_LEN: usize = 28;
/// `SIN6_LEN_RFC2133`: the shortest `sockaddr_in6` TCP accepts.
const SIN6_LEN_RFC2133: usize = 24;

/// Which call the address is for; `bind` on IPv4 accepts `AF_UNSPEC` with
/// `INADDR_ANY` for compatibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Bind,
    Connect,
}

/// The address family in the first two bytes (0 if there are fewer).
pub(crate) fn family(bytes: &[u8]) -> u16 {
    match bytes {
        [a, b, ..] => u16::from_ne_bytes([*a, *b]),
        _ => 0,
    }
}

/// Parses `bytes` as an address for a socket of family v4 (`v6 == false`)
/// or v6. Returns `None` for anything the kernel would reject or treat
/// specially (wrong family, too short, `AF_UNSPEC` disconnect): the caller
/// then lets the kernel judge the same bytes. IPv4-mapped IPv6 addresses
/// come back as IPv4. Flow info and scope id are left out: the kernel
/// uses a scope id for link-local addresses only, and those are never
/// virtual.
pub(crate) fn parse(bytes: &[u8], v6: bool, purpose: Purpose) -> Option<SocketAddr> {
    if bytes.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([bytes[0], bytes[1]]);
    if !v6 {
        if bytes.len() < SOCKADDR_IN_LEN {
            return None;
        }
        let port = u16::from_be_bytes([bytes[2], bytes[3]]);
        let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
        return match family {
            AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(ip, port))),
            AF_UNSPEC if purpose == Purpose::Bind && ip.is_unspecified() => {
                Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            _ => None,
        };
    }
    if bytes.len() < SIN6_LEN_RFC2133 || family != AF_INET6 {
        return None;
    }
    let port = u16::from_be_bytes([bytes[2], bytes[3]]);
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&bytes[8..24]);
    let ip = Ipv6Addr::from(octets);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4, port)));
    }
    Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)))
}

/// What `bind` answers for `bytes` on a socket that is already bound (or
/// connected, or listening), as `inet_bind`/`inet6_bind` check, in their
/// order: the length, the family, then — IPv4 only — whether the address
/// is one this host may bind (`is_local`), and last the socket's state
/// (`EINVAL`). IPv6 checks the state before the address.
pub(crate) fn bind_when_bound(
    bytes: &[u8],
    v6: bool,
    is_local: impl FnOnce(IpAddr) -> bool,
) -> Errno {
    let fam = family(bytes);
    if !v6 {
        if bytes.len() < SOCKADDR_IN_LEN {
            return libc::EINVAL;
        }
        let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
        if fam != AF_INET && !(fam == AF_UNSPEC && ip.is_unspecified()) {
            return libc::EAFNOSUPPORT;
        }
        if !is_local(IpAddr::V4(ip)) {
            return libc::EADDRNOTAVAIL;
        }
        return libc::EINVAL;
    }
    if bytes.len() < SIN6_LEN_RFC2133 {
        return libc::EINVAL;
    }
    if fam != AF_INET6 {
        return libc::EAFNOSUPPORT;
    }
    // A multicast address on a stream socket, then the state: EINVAL both.
    libc::EINVAL
}

/// Encodes `addr` for a socket of family v4 or v6; IPv4 addresses become
/// v4-mapped on v6 sockets.
pub(crate) fn encode(addr: SocketAddr, v6: bool) -> Vec<u8> {
    if !v6 {
        // Never an `AF_INET6` name for an `AF_INET` socket: callers fit the
        // address to the family first (see [`own_in_family`]); what does
        // not fit is told as [`peer_in_family`] tells it.
        let addr = peer_in_family(addr, false);
        if let IpAddr::V4(ip) = addr.ip() {
            let mut out = vec![0u8; SOCKADDR_IN_LEN];
            out[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
            out[2..4].copy_from_slice(&addr.port().to_be_bytes());
            out[4..8].copy_from_slice(&ip.octets());
            return out;
        }
    }
    let ip6 = match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    };
    let mut out = vec![0u8; SOCKADDR_IN6_LEN];
    out[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    out[8..24].copy_from_slice(&ip6.octets());
    out
}

/// A peer's address as a socket of family `v6` reports it: v4-mapped on
/// an `AF_INET6` socket; an IPv6 peer of an `AF_INET` socket cannot be
/// told, and is reported unspecified (`0.0.0.0:0`).
pub(crate) fn peer_in_family(peer: SocketAddr, v6: bool) -> SocketAddr {
    match (peer, v6) {
        (SocketAddr::V6(p), false) => match p.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), p.port()),
            None => unspecified(false),
        },
        _ => peer,
    }
}

/// An address of the app's own as a socket of family `v6` reports it:
/// `own` is the VIP:port a client dialled, as its server's connection
/// answers it (then `peer` is the client's VIP:port), or a client's own
/// VIP:port (`peer` `None`). A client that dials an app's VIP of the
/// family the server does not listen on reaches its listener of the other
/// family, and takes a VIP of that family itself (see
/// `Directory::served_addr`), so the client's family is the family of the
/// service reached; a server's connection names the app's VIP of that
/// family (from `vips`, asked only then):
/// * an IPv6 VIP on an `AF_INET` socket (a listener on `0.0.0.0` only)
///   becomes the app's IPv4 VIP and the port (unspecified without one);
/// * an IPv4 VIP on an `AF_INET6` socket is v4-mapped, as a dual-stack
///   socket reports it, unless the client is IPv6 (a listener on `::` with
///   `IPV6_V6ONLY`, which no IPv4 client reaches natively): then the app's
///   IPv6 VIP and the port.
pub(crate) fn own_in_family(
    own: SocketAddr,
    v6: bool,
    peer: Option<SocketAddr>,
    vips: impl FnOnce() -> Vec<IpAddr>,
) -> SocketAddr {
    let is_v6_only = |a: &SocketAddr| match a {
        SocketAddr::V6(p) => p.ip().to_ipv4_mapped().is_none(),
        SocketAddr::V4(_) => false,
    };
    let reached_v6 = peer.map_or(is_v6_only(&own), |p| is_v6_only(&p));
    let app_vip = |want_v6: bool| {
        vips()
            .into_iter()
            .find(|ip| match ip {
                IpAddr::V6(v6) => want_v6 && v6.to_ipv4_mapped().is_none(),
                IpAddr::V4(_) => !want_v6,
            })
            .map(|ip| SocketAddr::new(ip, own.port()))
    };
    match (v6, is_v6_only(&own)) {
        (true, false) if reached_v6 => app_vip(true).unwrap_or(own),
        (false, true) => app_vip(false).unwrap_or_else(|| unspecified(false)),
        _ => peer_in_family(own, v6),
    }
}

/// The unspecified address of a family, port 0.
pub(crate) fn unspecified(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_v4_and_mapped() {
        let a: SocketAddr = "10.233.0.10:8000".parse().unwrap();
        assert_eq!(parse(&encode(a, false), false, Purpose::Connect), Some(a));
        let mapped = encode(a, true);
        assert_eq!(mapped.len(), SOCKADDR_IN6_LEN);
        assert_eq!(parse(&mapped, true, Purpose::Connect), Some(a));
        let b: SocketAddr = "[fd00:a8::30]:9000".parse().unwrap();
        assert_eq!(parse(&encode(b, true), true, Purpose::Connect), Some(b));
    }

    #[test]
    fn an_ipv6_address_never_makes_an_af_inet6_name_for_an_af_inet_socket() {
        let v6: SocketAddr = "[fd00:a8::2]:9000".parse().unwrap();
        let out = encode(v6, false);
        assert_eq!(out.len(), SOCKADDR_IN_LEN);
        assert_eq!(
            parse(&out, false, Purpose::Bind),
            Some("0.0.0.0:0".parse().unwrap())
        );
        // A mapped one is its IPv4 address.
        let mapped: SocketAddr = "[::ffff:10.233.0.2]:9000".parse().unwrap();
        assert_eq!(
            parse(&encode(mapped, false), false, Purpose::Connect),
            Some("10.233.0.2:9000".parse().unwrap())
        );
        // A server's connection dialled at the app's IPv6 VIP on AF_INET
        // (its client is IPv4): the app's IPv4 VIP, else unspecified;
        // untouched on AF_INET6.
        let client4: SocketAddr = "10.233.0.3:32768".parse().unwrap();
        let vips = || vec!["fd00:a8::2".parse().unwrap(), "10.233.0.7".parse().unwrap()];
        assert_eq!(
            own_in_family(v6, false, Some(client4), vips),
            "10.233.0.7:9000".parse().unwrap()
        );
        assert_eq!(
            own_in_family(v6, false, Some(client4), Vec::new),
            "0.0.0.0:0".parse().unwrap()
        );
        assert_eq!(own_in_family(v6, true, Some(client4), vips), v6);
        let v4: SocketAddr = "10.233.0.2:9000".parse().unwrap();
        assert_eq!(own_in_family(v4, false, Some(client4), Vec::new), v4);
        // An IPv4 VIP on AF_INET6: v4-mapped (it stays an IPv4 address),
        // but the app's IPv6 VIP when the client is IPv6 (the service
        // reached is); a client's own address as it is.
        assert_eq!(own_in_family(v4, true, Some(client4), Vec::new), v4);
        let client6: SocketAddr = "[fd00:a8::3]:32768".parse().unwrap();
        assert_eq!(own_in_family(v4, true, Some(client6), vips), v6);
        assert_eq!(own_in_family(v4, true, None, vips), v4);
    }

    #[test]
    fn rejects_what_the_kernel_rejects() {
        let a: SocketAddr = "10.233.0.10:80".parse().unwrap();
        let v4 = encode(a, false);
        assert_eq!(parse(&v4[..15], false, Purpose::Connect), None);
        assert_eq!(parse(&v4, true, Purpose::Connect), None);
        assert_eq!(parse(&encode(a, true), false, Purpose::Connect), None);
        assert_eq!(parse(&[], false, Purpose::Connect), None);
        let mut unspec = encode("0.0.0.0:80".parse().unwrap(), false);
        unspec[0..2].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(parse(&unspec, false, Purpose::Connect), None);
        assert!(parse(&unspec, false, Purpose::Bind).is_some());
    }

    #[test]
    fn scope_id_and_flow_info_are_ignored() {
        // The kernel ignores a scope id but on link-local addresses.
        let a: SocketAddr = "10.233.0.10:80".parse().unwrap();
        let mut mapped = encode(a, true);
        mapped[4] = 7;
        mapped[24] = 1;
        assert_eq!(parse(&mapped, true, Purpose::Connect), Some(a));
    }

    #[test]
    fn bind_on_a_bound_socket_checks_in_the_kernels_order() {
        let local = |_| true;
        let any = encode("0.0.0.0:0".parse().unwrap(), false);
        assert_eq!(bind_when_bound(&any, false, local), libc::EINVAL);
        assert_eq!(bind_when_bound(&any[..8], false, local), libc::EINVAL);
        let mut fam = any.clone();
        fam[0..2].copy_from_slice(&99u16.to_ne_bytes());
        assert_eq!(bind_when_bound(&fam, false, local), libc::EAFNOSUPPORT);
        let v6 = encode("[::]:0".parse().unwrap(), true);
        assert_eq!(bind_when_bound(&v6, false, local), libc::EAFNOSUPPORT);
        assert_eq!(bind_when_bound(&any, true, local), libc::EINVAL);
        assert_eq!(bind_when_bound(&fam, true, local), libc::EINVAL);
        let mut fam6 = v6.clone();
        fam6[0..2].copy_from_slice(&99u16.to_ne_bytes());
        assert_eq!(bind_when_bound(&fam6, true, local), libc::EAFNOSUPPORT);
        let foreign = encode("192.0.2.1:0".parse().unwrap(), false);
        assert_eq!(
            bind_when_bound(&foreign, false, |_| false),
            libc::EADDRNOTAVAIL
        );
        // IPv6 checks the state before the address.
        assert_eq!(bind_when_bound(&v6, true, |_| false), libc::EINVAL);
    }
}
