//! `sockaddr_in`/`sockaddr_in6` bytes: parsing a program's address the way
//! the kernel's TCP code accepts it, and writing addresses back.

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

/// Parses `bytes` as an address for a socket of family v4 (`v6 == false`)
/// or v6. Returns `None` for anything the kernel would reject or treat
/// specially (wrong family, too short, `AF_UNSPEC` disconnect, scoped
/// link-local): the caller then lets the kernel judge the same bytes.
/// IPv4-mapped IPv6 addresses come back as IPv4.
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
    let scope = if bytes.len() >= SOCKADDR_IN6_LEN {
        u32::from_ne_bytes([bytes[24], bytes[25], bytes[26], bytes[27]])
    } else {
        0
    };
    if scope != 0 {
        return None;
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4, port)));
    }
    Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)))
}

/// Encodes `addr` for a socket of family v4 or v6; IPv4 addresses become
/// v4-mapped on v6 sockets.
pub(crate) fn encode(addr: SocketAddr, v6: bool) -> Vec<u8> {
    if !v6 {
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
        let mut scoped = encode("[fe80::1]:80".parse().unwrap(), true);
        scoped[24] = 2;
        assert_eq!(parse(&scoped, true, Purpose::Connect), None);
    }
}
