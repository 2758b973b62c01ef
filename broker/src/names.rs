//! The names ax gives the UNIX sockets it installs.
//!
//! Every swapped listener carries its own meaning in its abstract-namespace
//! name, so that `dup`, `fork`, fd passing and a broker restart lose
//! nothing; an accepted socket shares its listener's name. A client's
//! identity ([`SocketName::Client`]) is no longer bound on its socket (its
//! peer's `recvfrom` would report it, where TCP reports no address): the
//! broker keeps it apart, and the server learns it from a hello (see
//! `crate::idents`). Client names bound by an earlier version are still
//! understood.
//!
//! The names live in the broker's private network namespace (see
//! `crate::sockets`), not the host's: only the broker binds names there,
//! so a name is believed only on a socket in that namespace. Anywhere
//! else the same bytes are just a name some process chose.
//!
//! ```text
//! ax/<instance>/l4/<app>/<bound ip>/<port>                 listener (bind)
//! ax/<instance>/l4/<app>/<bound ip>/<port>/<uid>/<id>       SO_REUSEPORT listener
//! ax/<instance>/c6/<local ip>/<port>/<peer ip>/<port>      client (earlier versions)
//! ```
//!
//! `4`/`6` is the family of the socket the program created, so addresses
//! are answered in that family (`AF_INET6` sockets see v4-mapped addresses).

use ax_registry::AppId;
use std::net::{IpAddr, SocketAddr};

const PREFIX: &str = "ax/";

/// The longest abstract name Linux accepts (`sun_path` minus the NUL).
pub const MAX_NAME_LEN: usize = 107;

/// What a swapped socket stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketName {
    /// A listener installed by `bind` on a virtual or wildcard address.
    Listener {
        /// The broker instance that made it.
        instance: u32,
        /// The program's socket was `AF_INET6`.
        v6: bool,
        /// The app that bound it.
        app: AppId,
        /// The address as the program bound it (wildcard or VIP) and port.
        bound: SocketAddr,
        /// Set when the program's socket had `SO_REUSEPORT`: one of
        /// several listeners of the app on the same address and port.
        reuseport: Option<Reuseport>,
    },
    /// A client socket installed by `connect` to a virtual address (kept by
    /// `crate::idents`; bound as a name by earlier versions).
    Client {
        /// The broker instance that made it.
        instance: u32,
        /// The program's socket was `AF_INET6`.
        v6: bool,
        /// The client's virtual address and port.
        local: SocketAddr,
        /// The virtual address and port it connected to.
        peer: SocketAddr,
    },
}

/// A listener bound with `SO_REUSEPORT`: the owner the kernel compares
/// (`sk_uid`), and what tells it apart from the others of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuseport {
    /// The uid that owns the program's socket (the kernel lets only
    /// sockets of one uid share a port).
    pub uid: u32,
    /// Unique among the live listeners of the group (the inode number of
    /// the broker's UNIX socket, which holds the name while it lives).
    pub id: u32,
}

impl SocketName {
    /// The abstract name (without the leading NUL).
    pub fn encode(&self) -> Vec<u8> {
        let fam = |v6: bool| if v6 { '6' } else { '4' };
        match *self {
            SocketName::Listener {
                instance,
                v6,
                app,
                bound,
                reuseport,
            } => {
                let mut s = format!(
                    "{PREFIX}{instance:08x}/l{}/{app}/{}/{}",
                    fam(v6),
                    bound.ip(),
                    bound.port()
                );
                if let Some(Reuseport { uid, id }) = reuseport {
                    s.push_str(&format!("/{uid}/{id:08x}"));
                }
                s
            }
            SocketName::Client {
                instance,
                v6,
                local,
                peer,
            } => format!(
                "{PREFIX}{instance:08x}/c{}/{}/{}/{}/{}",
                fam(v6),
                local.ip(),
                local.port(),
                peer.ip(),
                peer.port()
            ),
        }
        .into_bytes()
    }

    /// Parses an abstract name; `None` for anything ax did not make.
    pub fn parse(name: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(name).ok()?;
        let rest = s.strip_prefix(PREFIX)?;
        let mut parts = rest.split('/');
        let instance = u32::from_str_radix(parts.next()?, 16).ok()?;
        let kind = parts.next()?;
        let v6 = match kind.as_bytes().get(1)? {
            b'4' => false,
            b'6' => true,
            _ => return None,
        };
        let addr = |parts: &mut std::str::Split<'_, char>| -> Option<SocketAddr> {
            let ip: IpAddr = parts.next()?.parse().ok()?;
            let port: u16 = parts.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, port))
        };
        let name = match kind.as_bytes().first()? {
            b'l' if kind.len() == 2 => {
                let app: AppId = parts.next()?.parse().ok()?;
                let bound = addr(&mut parts)?;
                let reuseport = match parts.next() {
                    None => None,
                    Some(uid) => Some(Reuseport {
                        uid: uid.parse().ok()?,
                        id: u32::from_str_radix(parts.next()?, 16).ok()?,
                    }),
                };
                SocketName::Listener {
                    instance,
                    v6,
                    app,
                    bound,
                    reuseport,
                }
            }
            b'c' if kind.len() == 2 => SocketName::Client {
                instance,
                v6,
                local: addr(&mut parts)?,
                peer: addr(&mut parts)?,
            },
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(name)
    }

    /// True when the program created an `AF_INET6` socket.
    pub fn is_v6(&self) -> bool {
        match *self {
            SocketName::Listener { v6, .. } | SocketName::Client { v6, .. } => v6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fits() {
        let longest = SocketName::Client {
            instance: u32::MAX,
            v6: true,
            local: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
            peer: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
        };
        assert!(longest.encode().len() <= MAX_NAME_LEN);
        assert_eq!(SocketName::parse(&longest.encode()), Some(longest));
        let l = SocketName::Listener {
            instance: 7,
            v6: false,
            app: 42,
            bound: "0.0.0.0:8000".parse().unwrap(),
            reuseport: None,
        };
        assert_eq!(
            String::from_utf8(l.encode()).unwrap(),
            "ax/00000007/l4/42/0.0.0.0/8000"
        );
        assert_eq!(SocketName::parse(&l.encode()), Some(l));
        let shared = SocketName::Listener {
            instance: u32::MAX,
            v6: true,
            app: u64::MAX,
            bound: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
            reuseport: Some(Reuseport {
                uid: u32::MAX,
                id: u32::MAX,
            }),
        };
        assert!(shared.encode().len() <= MAX_NAME_LEN);
        assert_eq!(SocketName::parse(&shared.encode()), Some(shared));
        let r = SocketName::Listener {
            instance: 7,
            v6: false,
            app: 42,
            bound: "0.0.0.0:8000".parse().unwrap(),
            reuseport: Some(Reuseport { uid: 1000, id: 255 }),
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            "ax/00000007/l4/42/0.0.0.0/8000/1000/000000ff"
        );
        assert_eq!(SocketName::parse(&r.encode()), Some(r));
    }

    #[test]
    fn rejects_foreign_names() {
        for bad in [
            &b""[..],
            b"ax/",
            b"ax/zz/l4/1/0.0.0.0/1",
            b"ax/1/l4/1/0.0.0.0/1/extra",
            b"ax/1/l4/1/0.0.0.0/1/0",
            b"ax/1/l4/1/0.0.0.0/1/0/zz",
            b"ax/1/l4/1/0.0.0.0/1/0/1/2",
            b"ax/1/x4/1/0.0.0.0/1",
            b"ax/1/l5/1/0.0.0.0/1",
            b"ax/1/l4/1/0.0.0.0/70000",
            b"\xff\xfe",
            b"/tmp/.X11-unix/X0",
        ] {
            assert_eq!(SocketName::parse(bad), None, "{:?}", bad);
        }
    }
}
