//! The ax broker: answers the socket control calls of unmodified programs.
//!
//! A program started under ax's seccomp filter has its `bind`, `connect`,
//! `accept`, `accept4`, `getsockname`, `getpeername` and some
//! `setsockopt`/`getsockopt` calls trapped (`SECCOMP_RET_USER_NOTIF`), and
//! the sends that can connect or name a destination: `sendto` with an
//! address or `MSG_FASTOPEN`, `sendmsg`/`sendmmsg` with `MSG_FASTOPEN`
//! (TCP Fast Open, a connect without `connect`). The
//! [`Broker`] receives each trapped call on the program's notify fd, decides
//! on its own copy of the arguments, and either answers it, installs a ready
//! socket into the program (`SECCOMP_IOCTL_NOTIF_ADDFD`), or lets the kernel
//! run it unchanged. The ordinary data path (`send`, `write`, `sendto`
//! without an address, `sendmsg` without `MSG_FASTOPEN`) is never trapped.
//!
//! Two programs under one broker talk over an `AF_UNIX` socket while both
//! believe they use TCP to a virtual IP: a `bind` on a virtual IP (or a
//! wildcard) becomes a UNIX listener at the same fd number, a `connect` to a
//! virtual IP:port becomes a UNIX socket connected to it.
//!
//! Every UNIX socket the broker creates lives in a private network
//! namespace no program is in (made by a small child process, the socket
//! factory): no other process can see, reach, bind or imitate its abstract
//! names, and a socket counts as the broker's only if it lives there. See
//! [`Broker::open_private_namespace`].
//!
//! # Embedding
//!
//! ```no_run
//! use std::sync::Arc;
//! use ax_broker::{launch, Broker, BrokerConfig};
//! use ax_registry::{AppSpec, LocalRegistry};
//!
//! let registry = Arc::new(LocalRegistry::default());
//! let app = registry.register_app(&AppSpec::default(), 0).unwrap();
//! let broker = Broker::new(registry.clone(), BrokerConfig::default());
//! let filter = launch::compile_filter().unwrap();
//! let mut cmd = std::process::Command::new("curl");
//! cmd.arg("http://10.233.0.10:8000/");
//! let mut sandboxed = launch::spawn(&mut cmd, &filter).unwrap();
//! let session = broker.serve(app.id, sandboxed.listener).unwrap();
//! let status = sandboxed.child.wait().unwrap();
//! session.join();
//! ```
//!
//! Any [`ax_registry::Directory`] can stand in for the registry: see
//! `examples/embed.rs`, which maps one VIP:port to a UNIX socket it serves
//! itself.

#![forbid(unsafe_code)]

mod addr;
mod appstate;
mod doors;
mod handlers;
mod idents;
pub mod keeper;
pub mod launch;
pub mod metrics;
mod names;
mod orphans;
mod pool;
mod probe;
pub mod rules;
mod serve;
mod sockets;
mod stash;
mod target;
mod tidy;
mod verdict;
pub mod verify;
mod watch;

pub use ax_registry::{AppId, Directory, UnixEndpoint};
pub use ax_sys::NotifyFd;
pub use metrics::Metrics;
pub use names::{Reuseport, SocketName, MAX_NAME_LEN};
pub use serve::{Broker, BrokerConfig, Session};
pub use sockets::UnixSocketRow;
pub use stash::Stash;

/// Locks `m`, taking over a lock a panicking thread left poisoned: every
/// state the broker keeps under a lock stays valid between its steps.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Entry points for the fuzz targets in `fuzz/` (cargo-fuzz); not part of
/// the embedding API and not covered by semver.
#[doc(hidden)]
pub mod fuzzing {
    use crate::addr::{self, Purpose};
    use std::net::SocketAddr;

    /// Parses `bytes` as a program's `sockaddr` for both socket families
    /// and both purposes (`bind`, `connect`), and panics if a property
    /// fails:
    ///
    /// - nothing is accepted shorter than the family's struct (16 bytes for
    ///   `AF_INET`, `SIN6_LEN_RFC2133` = 24 for `AF_INET6`);
    /// - a v4 socket only ever yields IPv4 addresses; a v6 socket yields
    ///   IPv4 only for v4-mapped input, never a v4-mapped `SocketAddrV6`,
    ///   and never flow info or a scope id;
    /// - `bind` accepts everything `connect` accepts, with the same result;
    /// - what parses encodes and parses back to itself, in the socket's
    ///   family's struct size.
    ///
    /// Returns the parsed addresses, indexed `[v6][bind]`.
    pub fn sockaddr(bytes: &[u8]) -> [[Option<SocketAddr>; 2]; 2] {
        let mut out = [[None; 2]; 2];
        for v6 in [false, true] {
            let connect = addr::parse(bytes, v6, Purpose::Connect);
            let bind = addr::parse(bytes, v6, Purpose::Bind);
            if connect.is_some() {
                assert_eq!(bind, connect, "bind must accept what connect accepts");
            }
            for a in [connect, bind].into_iter().flatten() {
                let min = if v6 { 24 } else { addr::SOCKADDR_IN_LEN };
                assert!(bytes.len() >= min, "{a} parsed from {} bytes", bytes.len());
                match a {
                    SocketAddr::V4(_) => {}
                    SocketAddr::V6(a6) => {
                        assert!(v6, "v4 socket yielded {a}");
                        assert!(a6.ip().to_ipv4_mapped().is_none(), "mapped {a}");
                        assert_eq!((a6.flowinfo(), a6.scope_id()), (0, 0), "{a}");
                    }
                }
                let enc = addr::encode(a, v6);
                let len = if v6 {
                    addr::SOCKADDR_IN6_LEN
                } else {
                    addr::SOCKADDR_IN_LEN
                };
                assert_eq!(enc.len(), len, "encoding of {a}");
                assert_eq!(addr::parse(&enc, v6, Purpose::Connect), Some(a));
                assert_eq!(addr::parse(&enc, v6, Purpose::Bind), Some(a));
            }
            out[usize::from(v6)] = [connect, bind];
        }
        out
    }
}
