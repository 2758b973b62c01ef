//! Doorbells: handing a connection that did not come from a program under
//! ax — a TCP client of an exposed host port, for instance — to a server
//! whose listener ax swapped for a UNIX one.
//!
//! The server may be asleep in `epoll` on its UNIX listener, so the broker
//! rings: it connects a UNIX socket named `ax/<instance>/d/<token>` (in its
//! private network namespace, see `crate::sockets`, so that no other
//! process can ring or pose as a doorbell) to the listener and keeps the real connection under `<token>`. When the
//! server's trapped `accept` takes the doorbell, the broker installs the
//! real connection in its place and writes the real client's address.
//! Data never passes through the broker.

use crate::handlers::endpoint_addr;
use ax_registry::UnixEndpoint;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A doorbell nobody answered within this long is dropped with its
/// connection (the client sees it closed).
const UNANSWERED: Duration = Duration::from_secs(120);

/// At most this many connections wait behind doorbells at once.
const MAX_WAITING: usize = 4096;

struct Waiting {
    conn: OwnedFd,
    /// The virtual addresses the connection stands for (its own VIP:port
    /// and its peer's), when they are not its kernel addresses: a
    /// connection from another host of a cluster.
    names: Option<VirtualNames>,
    /// The ringing UNIX socket, kept open until the server accepts.
    _bell: OwnedFd,
    since: Instant,
}

/// The VIP:port a connection answers for itself (`local`) and for its
/// peer (`peer`), in place of its kernel addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VirtualNames {
    /// What `getsockname` answers.
    pub(crate) local: SocketAddr,
    /// What `accept` and `getpeername` answer.
    pub(crate) peer: SocketAddr,
}

/// Connections waiting for a server's `accept`, by token.
#[derive(Default)]
pub(crate) struct Doors {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
}

impl std::fmt::Debug for Doors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doors").finish_non_exhaustive()
    }
}

/// The doorbell's abstract name.
pub(crate) fn bell_name(instance: u32, token: u64) -> Vec<u8> {
    format!("ax/{instance:08x}/d/{token}").into_bytes()
}

/// The token of a doorbell of `instance`, from its name.
pub(crate) fn token_of(instance: u32, name: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(name).ok()?;
    let rest = s.strip_prefix(&format!("ax/{instance:08x}/d/"))?;
    rest.parse().ok()
}

impl Doors {
    /// Rings at the first of `endpoints` that takes a doorbell and keeps
    /// `conn` for the `accept` that answers it. On failure `conn` is given
    /// back.
    pub(crate) fn ring(
        &self,
        instance: u32,
        sockets: &Arc<crate::sockets::Sockets>,
        conn: OwnedFd,
        endpoints: &[UnixEndpoint],
        names: Option<VirtualNames>,
    ) -> Result<(), (io::Error, OwnedFd)> {
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let bell = (|| {
            // In the broker's private namespace, with its listeners;
            // non-blocking, as spare sockets come.
            let bell = sockets
                .take()
                .map_err(rustix::io::Errno::from_raw_os_error)?;
            let name = rustix::net::SocketAddrUnix::new_abstract_name(&bell_name(instance, token))?;
            rustix::net::bind(&bell, &name)?;
            Ok::<_, rustix::io::Errno>(bell)
        })();
        let bell = match bell {
            Ok(b) => b,
            Err(e) => return Err((e.into(), conn)),
        };
        let mut last = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        for endpoint in endpoints {
            let Ok(addr) = endpoint_addr(endpoint) else {
                continue;
            };
            // The server will accept: keep the connection before it can.
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.retain(|_, w| w.since.elapsed() < UNANSWERED);
            if waiting.len() >= MAX_WAITING {
                return Err((io::Error::from_raw_os_error(libc::EAGAIN), conn));
            }
            match rustix::net::connect(&bell, &addr) {
                Ok(()) => {
                    waiting.insert(
                        token,
                        Waiting {
                            conn,
                            names,
                            _bell: bell,
                            since: Instant::now(),
                        },
                    );
                    return Ok(());
                }
                Err(e) => last = e.into(),
            }
        }
        Err((last, conn))
    }

    /// The connection behind doorbell `token`, once, with the virtual
    /// addresses it stands for, if any.
    pub(crate) fn answer(&self, token: u64) -> Option<(OwnedFd, Option<VirtualNames>)> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token)
            .map(|w| (w.conn, w.names))
    }
}

/// The address of `conn`'s peer, if it is an IP socket.
pub(crate) fn inet_peer(conn: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getpeername(conn)
        .ok()
        .flatten()
        .and_then(|a| SocketAddr::try_from(a).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_per_instance() {
        let name = bell_name(0x1234, 99);
        assert_eq!(name, b"ax/00001234/d/99");
        assert_eq!(token_of(0x1234, &name), Some(99));
        assert_eq!(token_of(0x1235, &name), None);
        assert_eq!(token_of(0x1234, b"ax/00001234/d/x"), None);
        assert_eq!(token_of(0x1234, b"ax/00001234/l4/1/0.0.0.0/80"), None);
    }
}
