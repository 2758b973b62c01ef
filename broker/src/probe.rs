//! Real TCP sockets the broker asks about options it does not model.
//!
//! A swapped socket is a UNIX socket underneath; for an IP, IPv6 or TCP
//! option ax does not model, the honest answer is what a TCP socket of the
//! same family and in the same state answers. The broker keeps, per address
//! family, one connected loopback TCP socket and one listening one, made
//! once on first use and only ever read (`getsockopt`), never changed: so
//! one pair serves every app. A socket that is neither (bound, not yet
//! listening) is asked as a fresh socket; so is every option a program set,
//! on a fresh socket that gets the program's value first (see
//! `handlers/sockopt.rs`).
//!
//! The listening probe is in the broker's network namespace at a loopback
//! port and has a backlog of zero: a process that connects to it gets at
//! most one queued connection nobody accepts, and learns nothing.

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

/// The state a swapped socket stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Connected (a client, or an accepted connection).
    Connected,
    /// An `AF_INET6` socket connected to an IPv4 peer (v4-mapped): IPv4's
    /// path MTU and MSS.
    ConnectedMapped,
    /// Listening.
    Listening,
    /// Neither: bound, or not yet anything.
    Fresh,
}

/// One family's probes.
struct Probes {
    /// The client end of a loopback connection.
    connected: TcpStream,
    /// Its accepted end: kept so the connection stays established.
    _accepted: TcpStream,
    /// For `AF_INET6`: the client end of a v4-mapped loopback connection,
    /// and its accepted end.
    mapped: Option<(TcpStream, TcpStream)>,
    listening: TcpListener,
}

impl Probes {
    fn new(v6: bool) -> Option<Self> {
        let lo: SocketAddr = if v6 {
            (Ipv6Addr::LOCALHOST, 0).into()
        } else {
            (Ipv4Addr::LOCALHOST, 0).into()
        };
        let server = TcpListener::bind(lo).ok()?;
        let connected = TcpStream::connect(server.local_addr().ok()?).ok()?;
        let (accepted, _) = server.accept().ok()?;
        drop(server);
        let listening = listen(lo)?;
        let mapped = v6.then(Self::mapped).flatten();
        Some(Self {
            connected,
            _accepted: accepted,
            mapped,
            listening,
        })
    }

    /// An `AF_INET6` socket connected to 127.0.0.1 (as `::ffff:127.0.0.1`).
    fn mapped() -> Option<(TcpStream, TcpStream)> {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        let port = server.local_addr().ok()?.port();
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port)).ok()?;
        let (accepted, _) = server.accept().ok()?;
        Some((client, accepted))
    }
}

/// A listener at `lo`, port chosen by the kernel, with a backlog of zero.
fn listen(lo: SocketAddr) -> Option<TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if lo.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fd =
        rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None).ok()?;
    rustix::net::bind(&fd, &lo).ok()?;
    rustix::net::listen(&fd, 0).ok()?;
    Some(TcpListener::from(fd))
}

/// The cached probes of the family; `None` where they could not be made
/// (no loopback in the broker's namespace when first asked; not retried):
/// callers then ask a fresh socket.
fn cached(v6: bool) -> Option<&'static Probes> {
    // get_or_init runs one initialiser at a time: one pair per family.
    static PROBES: [OnceLock<Option<Probes>>; 2] = [OnceLock::new(), OnceLock::new()];
    PROBES[usize::from(v6)]
        .get_or_init(|| Probes::new(v6))
        .as_ref()
}

/// A fresh TCP socket of the family.
pub(crate) fn fresh(v6: bool) -> Option<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None).ok()
}

/// A TCP socket of the family in the state `kind`, to be asked with
/// `getsockopt` only: a cached one where there is one, else a fresh one.
pub(crate) enum Probe {
    Cached(BorrowedFd<'static>),
    Fresh(OwnedFd),
}

impl Probe {
    pub(crate) fn get(v6: bool, kind: Kind) -> Option<Self> {
        let cached = match kind {
            Kind::Fresh => None,
            Kind::Connected => cached(v6).map(|p| p.connected.as_fd()),
            Kind::ConnectedMapped => cached(v6)
                .and_then(|p| p.mapped.as_ref())
                .map(|(c, _)| c.as_fd()),
            Kind::Listening => cached(v6).map(|p| p.listening.as_fd()),
        };
        match cached {
            Some(fd) => Some(Self::Cached(fd)),
            None => fresh(v6).map(Self::Fresh),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Cached(fd) => *fd,
            Self::Fresh(fd) => fd.as_fd(),
        }
    }
}

/// The state the broker's copy `fd` of a swapped socket stands for.
pub(crate) fn kind_of(fd: BorrowedFd<'_>) -> Kind {
    if rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false) {
        // A TCP listener shut down is closed (`tcp_disconnect`); a UNIX one
        // keeps listening, and only its shutdown flags tell.
        if listener_shut_down(fd) {
            Kind::Fresh
        } else {
            Kind::Listening
        }
    } else if rustix::net::getpeername(fd).is_ok() {
        Kind::Connected
    } else {
        Kind::Fresh
    }
}

/// Whether the program shut the listener `fd` down for reading
/// (`shutdown(2)` with `SHUT_RD` or `SHUT_RDWR`): it then polls `POLLRDHUP`,
/// or `POLLHUP` for both ways. `SHUT_WR` alone changes nothing on a TCP
/// listener, and is not seen here either.
pub(crate) fn listener_shut_down(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&fd, PollFlags::RDHUP)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero)).is_ok() && shut_down_in(fds[0].revents())
}

/// Whether a listener's poll events (`POLLRDHUP` asked for) say it was
/// shut down for reading, as [`listener_shut_down`] tells.
pub(crate) fn shut_down_in(revents: PollFlags) -> bool {
    revents.intersects(PollFlags::RDHUP | PollFlags::HUP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_as_tcp() {
        for v6 in [false, true] {
            let Some(p) = Probe::get(v6, Kind::Connected) else {
                continue;
            };
            // IP_OPTIONS on an established TCP socket: no options, length 0.
            if v6 {
                let m = Probe::get(v6, Kind::ConnectedMapped).expect("mapped");
                let mut buf = [0u8; 4];
                let n =
                    ax_sys::sockopt::get_raw(m.fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU, &mut buf);
                assert_eq!(n.ok(), Some(4));
            } else {
                let mut buf = [0u8; 40];
                let n =
                    ax_sys::sockopt::get_raw(p.fd(), libc::IPPROTO_IP, libc::IP_OPTIONS, &mut buf);
                assert_eq!(n.ok(), Some(0));
            }
            assert_eq!(kind_of(p.fd()), Kind::Connected);
            let l = Probe::get(v6, Kind::Listening).expect("listener");
            assert_eq!(kind_of(l.fd()), Kind::Listening);
            let f = Probe::get(v6, Kind::Fresh).expect("fresh");
            assert_eq!(kind_of(f.fd()), Kind::Fresh);
        }
    }
}
