//! Virtual IP pools: CIDR blocks addresses are allocated from.

use std::net::IpAddr;

/// Parses `ADDR/PREFIX`, e.g. `10.233.0.0/16`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = s.split_once('/').ok_or_else(|| {
        format!("'{s}' is not a CIDR block (expected ADDR/PREFIX, e.g. 10.233.0.0/16)")
    })?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' in '{s}' is not an IP address"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("'{prefix}' in '{s}' is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!(
            "prefix /{prefix} is longer than {max} bits in '{s}'"
        ));
    }
    Ok((addr, prefix))
}

/// A CIDR block of virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPool {
    base: IpAddr,
    prefix: u8,
}

impl VipPool {
    /// The default IPv4 pool, `10.233.0.0/16`.
    pub fn default_v4() -> Self {
        Self::new(IpAddr::from([10, 233, 0, 0]), 16).expect("static pool is valid")
    }

    /// The default IPv6 pool, `fd00:ax::/64` spelled `fd00:a8::/64`.
    pub fn default_v6() -> Self {
        Self::new("fd00:a8::".parse().expect("static address"), 64).expect("static pool is valid")
    }

    /// A pool from a base address and prefix length; host bits are cleared.
    pub fn new(base: IpAddr, prefix: u8) -> Result<Self, String> {
        let bits = Self::bits_of(base);
        if prefix > bits {
            return Err(format!("prefix /{prefix} too long for {base}"));
        }
        if prefix + 2 > bits {
            return Err(format!("{base}/{prefix} is too small to hold virtual IPs"));
        }
        let base = Self::from_u128(base, Self::to_u128(base) & Self::mask(bits, prefix));
        Ok(Self { base, prefix })
    }

    /// Parses `ADDR/PREFIX`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = parse_cidr(s)?;
        Self::new(addr, prefix)
    }

    fn bits_of(ip: IpAddr) -> u8 {
        if ip.is_ipv4() {
            32
        } else {
            128
        }
    }

    fn mask(bits: u8, prefix: u8) -> u128 {
        let all: u128 = if bits == 32 {
            u32::MAX as u128
        } else {
            u128::MAX
        };
        if prefix == 0 {
            0
        } else {
            all & !(all >> prefix)
        }
    }

    fn to_u128(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u32::from(v4) as u128,
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    fn from_u128(like: IpAddr, v: u128) -> IpAddr {
        match like {
            IpAddr::V4(_) => IpAddr::from((v as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(v.to_be_bytes()),
        }
    }

    /// True when `ip` lies in the pool.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.base.is_ipv4() {
            return false;
        }
        let bits = Self::bits_of(ip);
        Self::to_u128(ip) & Self::mask(bits, self.prefix) == Self::to_u128(self.base)
    }

    /// True for an IPv4 pool.
    pub fn is_ipv4(&self) -> bool {
        self.base.is_ipv4()
    }

    /// The `n`-th usable host address (skipping the network address and,
    /// for IPv4, the broadcast address and `.1`, which people often give a
    /// gateway), or `None` past the end.
    pub fn host(&self, n: u128) -> Option<IpAddr> {
        let bits = Self::bits_of(self.base);
        let host_bits = bits - self.prefix;
        let size: u128 = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let first = 2u128;
        let last = if self.base.is_ipv4() {
            size - 2
        } else {
            size - 1
        };
        let offset = first.checked_add(n)?;
        if offset > last {
            return None;
        }
        Some(Self::from_u128(
            self.base,
            Self::to_u128(self.base) + offset,
        ))
    }

    /// Number of usable host addresses, saturating.
    pub fn capacity(&self) -> u128 {
        let bits = Self::bits_of(self.base);
        let host_bits = bits - self.prefix;
        if host_bits >= 127 {
            return u128::MAX;
        }
        let size = 1u128 << host_bits;
        if self.base.is_ipv4() {
            size - 3
        } else {
            size - 2
        }
    }
}

impl std::fmt::Display for VipPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pool_hosts() {
        let p = VipPool::default_v4();
        assert_eq!(p.host(0), Some("10.233.0.2".parse().unwrap()));
        assert!(p.contains("10.233.255.1".parse().unwrap()));
        assert!(!p.contains("10.234.0.1".parse().unwrap()));
        assert!(!p.contains("fd00:a8::1".parse().unwrap()));
        assert_eq!(p.host(p.capacity()), None);
        assert_eq!(
            p.host(p.capacity() - 1),
            Some("10.233.255.254".parse().unwrap())
        );
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(VipPool::parse("10.0.0.0").is_err());
        assert!(VipPool::parse("10.0.0.0/33").is_err());
        assert!(VipPool::parse("10.0.0.0/31").is_err());
        assert!(VipPool::parse("x/8").is_err());
        assert_eq!(
            VipPool::parse("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!(VipPool::default_v6().contains("fd00:a8::5".parse().unwrap()));
    }
}
