//! What a program's fd is, and whose: one of the broker's sockets (known
//! by its cookie, its name in the broker's private namespace, or the
//! identity the broker keeps for it), a TCP/IP socket the kernel still
//! owns, or anything else, which is not ax's to touch.

use super::{Call, Errno, Shared, Target};
use crate::names::SocketName;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
use std::os::fd::OwnedFd;

/// What the broker's copy of a target fd turned out to be.
pub(crate) enum Sock {
    /// An `AF_INET`/`AF_INET6` stream socket the kernel still owns, and
    /// its local name as it was when classified (`None`: unreadable).
    Inet {
        v6: bool,
        fd: OwnedFd,
        local: Option<std::net::SocketAddr>,
    },
    /// A UNIX socket this broker installed (`cookie`: its `SO_COOKIE`,
    /// when it could be read).
    Swapped {
        name: SocketName,
        fd: OwnedFd,
        cookie: Option<u64>,
    },
    /// Anything else: not ours to touch.
    Other,
}

/// Which kind of socket a call mostly meets, and so which question
/// [`classify_expecting`] asks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// One of the broker's (a call on a connection or a listener): its
    /// cookie first, one `getsockopt` when it is known already.
    Swapped,
    /// One the kernel still owns (a `connect`, mostly on a fresh socket):
    /// its name first, whose family rules the broker's sockets out without
    /// the cookie, as every one of them is a UNIX socket.
    Kernel,
}

/// Classifies the target's fd number `arg`. `Err` carries the errno of an
/// fd that cannot be copied (`EBADF`): the caller lets the kernel say it.
pub(crate) fn classify(call: &Call<'_>, target: &Target, arg: u64) -> Result<Sock, Errno> {
    classify_expecting(call, target, arg, Expect::Swapped)
}

/// [`classify`], asking first what tells the `expect`ed kind apart soonest.
/// Either order gives the same answer: only a UNIX socket is ever known by
/// its cookie (`Sockets::remember_name` and `crate::idents` are fed from
/// the UNIX branch below alone).
pub(crate) fn classify_expecting(
    call: &Call<'_>,
    target: &Target,
    arg: u64,
    expect: Expect,
) -> Result<Sock, Errno> {
    let mut fd = target.fd(arg)?;
    // A socket already classified as ours is known by its cookie: one
    // getsockopt instead of four (see `Sockets::known_name`).
    let mut cookie = None;
    if expect == Expect::Swapped {
        match by_cookie(call, fd) {
            Ok(settled) => return Ok(settled),
            Err((f, c)) => (fd, cookie) = (f, Some(c)),
        }
    }
    // Its own name tells its family, and is what a connect asks next;
    // `SO_DOMAIN` only for a family with no name to tell (`EOPNOTSUPP`).
    let own = match rustix::net::getsockname(&fd) {
        Ok(a) => Some(a),
        Err(rustix::io::Errno::NOTSOCK) => return Ok(Sock::Other),
        Err(_) => None,
    };
    let domain = match own.as_ref().map(|a| a.address_family()) {
        Some(d) => d,
        None => match rustix::net::sockopt::socket_domain(&fd) {
            Ok(d) => d,
            Err(rustix::io::Errno::NOTSOCK) => return Ok(Sock::Other),
            Err(e) => return Err(e.raw_os_error()),
        },
    };
    let cookie = match cookie {
        Some(c) => c,
        None if domain == AddressFamily::UNIX => match by_cookie(call, fd) {
            Ok(settled) => return Ok(settled),
            Err((f, c)) => {
                fd = f;
                c
            }
        },
        None => None,
    };
    match rustix::net::sockopt::socket_type(&fd) {
        Ok(t) if t == SocketType::STREAM => {}
        Ok(_) => return Ok(Sock::Other),
        Err(e) => return Err(e.raw_os_error()),
    }
    if domain == AddressFamily::INET || domain == AddressFamily::INET6 {
        return Ok(Sock::Inet {
            v6: domain == AddressFamily::INET6,
            local: own.and_then(|a| std::net::SocketAddr::try_from(a).ok()),
            fd,
        });
    }
    if domain == AddressFamily::UNIX {
        // A client socket is unbound: its identity is the broker's to keep
        // (see `crate::idents`), by a cookie nobody else can choose.
        if let Some((crate::idents::Kind::Own, name)) =
            cookie.and_then(|c| call.shared.idents.get(c))
        {
            if let Some(c) = cookie {
                call.shared.sockets.remember_name(c, name);
            }
            return Ok(Sock::Swapped { name, fd, cookie });
        }
        if let Some(name) = own.and_then(parse_unix) {
            let ours = match name {
                SocketName::Listener { instance, .. } | SocketName::Client { instance, .. } => {
                    instance == call.instance()
                }
            };
            // Only a socket in the broker's private namespace is ours: a
            // program may bind any name in its own.
            if ours && call.shared.sockets.is_private(&fd) {
                if let Some(c) = cookie {
                    call.shared.sockets.remember_name(c, name);
                }
                return Ok(Sock::Swapped { name, fd, cookie });
            }
        }
    }
    Ok(Sock::Other)
}

/// Classifies `fd` by its cookie alone where that settles it: not a
/// socket, or one classified as ours before. Otherwise gives `fd` back with
/// its cookie (`None`: unreadable).
fn by_cookie(call: &Call<'_>, fd: OwnedFd) -> Result<Sock, (OwnedFd, Option<u64>)> {
    match rustix::net::sockopt::socket_cookie(&fd) {
        Ok(c) => match call.shared.sockets.known_name(c) {
            Some(name) => Ok(Sock::Swapped {
                name,
                fd,
                cookie: Some(c),
            }),
            None => Err((fd, Some(c))),
        },
        Err(rustix::io::Errno::NOTSOCK) => Ok(Sock::Other),
        Err(_) => Err((fd, None)),
    }
}

/// One of the broker's connected sockets (a client, or a connection a
/// swapped listener accepted), known without a copy of the program's fd:
/// its inode, which `/proc/TID/fdinfo/FD` shows, is that of a socket the
/// broker keeps an identity for (see `crate::idents`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KnownConn {
    pub(crate) inode: u64,
    /// Whether the program's socket is `AF_INET6`.
    pub(crate) v6: bool,
    /// What `getsockname` answers: the client's VIP:port, or for an
    /// accepted connection the VIP:port its client dialled.
    pub(crate) local: std::net::SocketAddr,
    /// What `getpeername` answers.
    pub(crate) peer: std::net::SocketAddr,
    /// Accepted from a listener (else the client's own socket).
    pub(crate) accepted: bool,
}

/// The connection behind the call's fd (argument 0), if it is one of the
/// broker's (see [`KnownConn`]); `None` sends the caller to [`classify`],
/// which copies the fd and asks the socket. Only an fd on sockfs's mount
/// is looked up: a file elsewhere may have any inode number.
pub(crate) fn known_conn(call: &Call<'_>, target: &Target) -> Option<KnownConn> {
    let info = call.fd_info(target)?;
    if Some(info.mnt_id) != sockfs_mnt_id() {
        return None;
    }
    let ident = call.shared.idents.by_inode(info.ino)?;
    let SocketName::Client {
        instance,
        v6,
        local,
        peer,
    } = ident.name
    else {
        return None;
    };
    if instance != call.instance() {
        return None;
    }
    Some(match ident.kind {
        crate::idents::Kind::Own => KnownConn {
            inode: info.ino,
            v6,
            local,
            peer,
            accepted: false,
        },
        crate::idents::Kind::Peer => KnownConn {
            inode: info.ino,
            v6: ident.local_v6?,
            local: peer,
            peer: local,
            accepted: true,
        },
    })
}

/// The mount id of sockfs, where every socket's file is (read once from
/// the fdinfo of a socket of the daemon's own).
fn sockfs_mnt_id() -> Option<u64> {
    static ID: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let sock = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).ok()?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let text = std::fs::read(format!("/proc/self/fdinfo/{fd}")).ok()?;
        crate::target::FdInfo::parse(&text).map(|i| i.mnt_id)
    })
}

/// True when fd `arg` of the target is no socket at all (a pipe, a file):
/// `bind` and `connect` then fail with `ENOTSOCK`, as the kernel's would.
pub(crate) fn not_a_socket(target: &Target, arg: u64) -> bool {
    target
        .fd(arg)
        .is_ok_and(|fd| rustix::net::sockopt::socket_domain(&fd) == Err(rustix::io::Errno::NOTSOCK))
}

fn parse_unix(addr: rustix::net::SocketAddrAny) -> Option<SocketName> {
    let unix = SocketAddrUnix::try_from(addr).ok()?;
    SocketName::parse(unix.abstract_name()?)
}

/// The ax name a UNIX socket is bound to, if any.
pub(crate) fn own_name(fd: &OwnedFd) -> Option<SocketName> {
    parse_unix(rustix::net::getsockname(fd).ok()?)
}

/// The ax name of a UNIX socket's peer, if any.
fn peer_name(fd: &OwnedFd) -> Option<SocketName> {
    parse_unix(rustix::net::getpeername(fd).ok()??)
}

/// True for a connected UNIX socket whose peer is a client socket of the
/// broker's: bound to no name, as they are, or (made by an earlier version
/// of ax) to a client's name. One `getpeername`.
pub(crate) fn peer_is_client(fd: &OwnedFd) -> bool {
    let Ok(Some(peer)) = rustix::net::getpeername(fd) else {
        return false;
    };
    if peer.address_family() != AddressFamily::UNIX {
        return false;
    }
    usize::try_from(peer.addr_len()).is_ok_and(|l| l <= std::mem::size_of::<u16>())
        || matches!(parse_unix(peer), Some(SocketName::Client { .. }))
}

/// The client at the other end of a connection a swapped listener
/// accepted: kept by the broker (see `crate::idents`), or, for one an
/// earlier version of ax made, the name its client socket is bound to.
pub(crate) fn peer_ident(shared: &Shared, fd: &OwnedFd) -> Option<SocketName> {
    let kept = rustix::net::sockopt::socket_cookie(fd)
        .ok()
        .and_then(|c| shared.idents.get(c));
    match kept {
        Some((crate::idents::Kind::Peer, name)) => Some(name),
        Some(_) => None,
        None => peer_name(fd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `known_conn` trusts an inode number on: only sockfs's mount,
    /// never a file elsewhere, whose inode number anyone may come to hold.
    #[test]
    fn only_sockets_are_on_sockfs_mount() {
        let me = Target::open(std::process::id()).unwrap();
        let raw = |fd: &OwnedFd| std::os::fd::AsRawFd::as_raw_fd(fd) as u64;
        let sockfs = sockfs_mnt_id().expect("sockfs's mount id");
        let sock = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        assert_eq!(me.fd_info(raw(&sock)).unwrap().mnt_id, sockfs);
        let memfd = rustix::fs::memfd_create("ax-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let (pipe, _w) = rustix::pipe::pipe().unwrap();
        for other in [&memfd, &pipe] {
            assert_ne!(me.fd_info(raw(other)).unwrap().mnt_id, sockfs);
        }
    }
}
