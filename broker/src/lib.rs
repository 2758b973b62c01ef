//! The ax broker: answers the socket control calls of unmodified programs.
//!
//! A program started under ax's seccomp filter has its `bind`, `connect`,
//! `accept`, `accept4`, `getsockname`, `getpeername` and some
//! `setsockopt`/`getsockopt` calls trapped (`SECCOMP_RET_USER_NOTIF`). The
//! [`Broker`] receives each trapped call on the program's notify fd, decides
//! on its own copy of the arguments, and either answers it, installs a ready
//! socket into the program (`SECCOMP_IOCTL_NOTIF_ADDFD`), or lets the kernel
//! run it unchanged. Data calls are never trapped.
//!
//! Two programs under one broker talk over an `AF_UNIX` socket while both
//! believe they use TCP to a virtual IP: a `bind` on a virtual IP (or a
//! wildcard) becomes a UNIX listener at the same fd number, a `connect` to a
//! virtual IP:port becomes a UNIX socket connected to it.
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
mod handlers;
pub mod launch;
mod names;
mod pool;
mod serve;
mod target;

pub use ax_registry::{AppId, Directory, UnixEndpoint};
pub use ax_sys::NotifyFd;
pub use names::{SocketName, MAX_NAME_LEN};
pub use serve::{Broker, BrokerConfig, Session};
