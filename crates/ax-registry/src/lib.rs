//! ax's service registry: which apps exist, which virtual IPs (VIPs) they
//! own, and which VIP:port services they listen on.
//!
//! The broker consults it through the [`Directory`] trait, so that a
//! supervisor embedding the broker can answer from its own tables, and so
//! that a clustered backend can later stand beside [`LocalRegistry`].

mod local;
mod pool;

pub use local::{LocalRegistry, Snapshot};
pub use pool::{parse_cidr, VipPool};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Identifies one app: one `ax exec` invocation and all its descendants.
pub type AppId = u64;

/// Where connections to a service are delivered: a UNIX stream listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnixEndpoint {
    /// A name in the abstract namespace (without the leading NUL).
    Abstract(Vec<u8>),
    /// A filesystem path.
    Path(PathBuf),
}

impl std::fmt::Display for UnixEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnixEndpoint::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            UnixEndpoint::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What a launcher asks for when it registers an app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// VIPs asked for with `--ip`; empty means "allocate one IPv4 VIP".
    pub requested_ips: Vec<IpAddr>,
    /// `--name` values.
    pub names: Vec<String>,
    /// `--label KEY=VALUE` pairs.
    pub labels: BTreeMap<String, String>,
    /// The program and its arguments, for display.
    pub command: Vec<String>,
}

/// An app as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppInfo {
    /// Registry-assigned id.
    pub id: AppId,
    /// Pid of the program `ax exec` started (0 until it is known).
    pub pid: u32,
    /// User that registered the app.
    pub uid: u32,
    /// The app's virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Names the app answers to.
    pub names: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Registration time, seconds since the Unix epoch.
    pub started_unix: u64,
}

/// One listening VIP:port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The virtual address clients connect to.
    pub addr: SocketAddr,
    /// The app that listens.
    pub owner: AppId,
    /// The UNIX listener connections are delivered to.
    pub endpoint: UnixEndpoint,
}

/// Why an app could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RegisterError {
    /// Another live app owns that VIP.
    #[error("virtual IP {ip} is already owned by app {owner}")]
    IpInUse {
        /// The contested address.
        ip: IpAddr,
        /// Its current owner.
        owner: AppId,
    },
    /// The VIP is not usable (unspecified, loopback, multicast, …).
    #[error("{ip} cannot be a virtual IP: {reason}")]
    InvalidIp {
        /// The rejected address.
        ip: IpAddr,
        /// Why.
        reason: String,
    },
    /// The pool has no free address left.
    #[error("the virtual IP pool {0} is exhausted")]
    PoolExhausted(String),
    /// No such app.
    #[error("no app with id {0}")]
    NoSuchApp(AppId),
}

/// Why a bind on a virtual address was refused; each maps to the errno the
/// kernel would give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The VIP:port is taken (`EADDRINUSE`).
    #[error("address in use")]
    AddrInUse,
    /// The address is not one of the app's VIPs (`EADDRNOTAVAIL`).
    #[error("address not available")]
    AddrNotAvailable,
    /// No port left in the ephemeral range (`EADDRINUSE`, as the kernel).
    #[error("no free port")]
    NoFreePort,
    /// The app is not known (`EADDRNOTAVAIL`).
    #[error("unknown app")]
    UnknownApp,
}

impl BindError {
    /// The errno a program sees.
    pub fn errno(&self) -> i32 {
        match self {
            BindError::AddrInUse | BindError::NoFreePort => 98, // EADDRINUSE
            BindError::AddrNotAvailable | BindError::UnknownApp => 99, // EADDRNOTAVAIL
        }
    }
}

/// What a bind registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRequest {
    /// The app that binds.
    pub app: AppId,
    /// The VIPs the listener covers (one, or all of the app's for a wildcard).
    pub ips: Vec<IpAddr>,
    /// The port asked for; 0 lets the registry choose.
    pub port: u16,
}

/// Why a connect to a virtual address found nothing; all are `ECONNREFUSED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nobody listens on that VIP:port.
    #[error("no service at {0}")]
    NoService(SocketAddr),
    /// Policy forbids it.
    #[error("connection to {0} denied by policy")]
    Denied(SocketAddr),
}

/// The broker's view of the registry.
///
/// Implementations must be cheap and must never block on the network: the
/// broker calls them while a program's thread waits in a trapped syscall.
pub trait Directory: Send + Sync {
    /// True when `ip` is virtual: connects to it are answered by ax, never
    /// routed.
    fn is_virtual(&self, ip: IpAddr) -> bool;

    /// The VIPs of `app`, IPv4 first. Empty for an unknown app.
    fn app_vips(&self, app: AppId) -> Vec<IpAddr>;

    /// Where a connect from `client` to `dst` goes.
    fn resolve(&self, client: AppId, dst: SocketAddr) -> Result<UnixEndpoint, ResolveError>;

    /// Registers a listener for `req.ips` × `req.port`. `endpoint` makes the
    /// listener's address from the chosen port; `is_alive` tells whether a
    /// conflicting registration still has a live listener (stale ones are
    /// replaced). Returns the port.
    fn bind(
        &self,
        req: &BindRequest,
        endpoint: &dyn Fn(u16) -> UnixEndpoint,
        is_alive: &dyn Fn(&UnixEndpoint) -> bool,
    ) -> Result<u16, BindError>;

    /// Forgets every registration that delivers to `endpoint`.
    fn release(&self, endpoint: &UnixEndpoint);

    /// The app's last process exited: forget it and its services.
    fn app_exited(&self, app: AppId);
}
