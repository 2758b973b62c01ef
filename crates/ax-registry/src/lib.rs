//! ax's service registry: which apps exist, which virtual IPs (VIPs) and
//! names they own, which VIP:port services they listen on, and which
//! backend a connection goes to.
//!
//! The broker consults it through the [`Directory`] trait, so that a
//! supervisor embedding the broker can answer from its own tables, and so
//! that a clustered backend can later stand beside [`LocalRegistry`].

mod local;
mod policy;
mod pool;

pub use local::{app_host_name, LocalRegistry, NameEntry, Snapshot};
pub use policy::{effective_labels, Decision, Policy, PolicyError};
pub use pool::{parse_cidr, VipPool};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// How connections to a service with several backends are spread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LbMode {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// A backend picked at random for each connection.
    Random,
}

impl LbMode {
    /// The spelling `--lb` takes and `ax get` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LbMode::RoundRobin => "round-robin",
            LbMode::Random => "random",
        }
    }
}

impl std::fmt::Display for LbMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LbMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" | "rr" => Ok(LbMode::RoundRobin),
            "random" => Ok(LbMode::Random),
            other => Err(format!(
                "unknown load-balancing mode '{other}' (expected round-robin or random)"
            )),
        }
    }
}

/// What a launcher asks for when it registers an app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// VIPs asked for with `--ip`; empty means "one VIP of each family the
    /// daemon has a pool for" (dual stack by default).
    pub requested_ips: Vec<IpAddr>,
    /// `--name` values. A name declared with `ax service create` brings
    /// its VIPs (and its `--lb`) to the app.
    pub names: Vec<String>,
    /// `--label KEY=VALUE` pairs.
    pub labels: BTreeMap<String, String>,
    /// The program and its arguments, for display.
    pub command: Vec<String>,
    /// `--lb`: how the app's name spreads connections over its backends.
    pub lb: Option<LbMode>,
    /// `--connect-wait`: how long a blocking connect to a service that is
    /// not up yet waits for it (`None`: the daemon's default).
    pub connect_wait: Option<Duration>,
    /// The OCI container this app is (registered by the daemon's runtime
    /// socket rather than by `ax exec`).
    #[serde(default)]
    pub container: Option<ContainerRef>,
    /// `ax exec --no-hosts-mount`: the program runs in the launcher's own
    /// user and mount namespaces (no hosts file shown, the daemon's
    /// directory not hidden).
    #[serde(default)]
    pub no_hosts_mount: bool,
}

/// A rule of [`AppSpec`] that a request broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Two different VIPs of one family.
    #[error("an app has at most one {} virtual IP ({first} and {second})", if .first.is_ipv4() { "IPv4" } else { "IPv6" })]
    TwoVips {
        /// The one asked for first.
        first: IpAddr,
        /// The other.
        second: IpAddr,
    },
    /// Two values for one label.
    #[error("a label has one value (given {key}={first} and {key}={second})")]
    LabelTwice {
        /// The label.
        key: String,
        /// The value given first.
        first: String,
        /// The other.
        second: String,
    },
}

impl AppSpec {
    /// Asks for the VIP `ip`: at most one of each family (the same one
    /// again changes nothing), IPv4's first.
    pub fn request_ip(&mut self, ip: IpAddr) -> Result<(), SpecError> {
        match self
            .requested_ips
            .iter()
            .find(|p| p.is_ipv4() == ip.is_ipv4())
        {
            Some(&first) if first != ip => Err(SpecError::TwoVips { first, second: ip }),
            Some(_) => Ok(()),
            None if ip.is_ipv4() => {
                self.requested_ips.insert(0, ip);
                Ok(())
            }
            None => {
                self.requested_ips.push(ip);
                Ok(())
            }
        }
    }

    /// Adds the name `name`, once (`web.ax` and `web` are one name).
    pub fn add_name(&mut self, name: &str) {
        let name = name.strip_suffix(".ax").unwrap_or(name);
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_string());
        }
    }

    /// Adds the label `key=value`: a label has one value (the same one
    /// again changes nothing).
    pub fn add_label(&mut self, key: &str, value: &str) -> Result<(), SpecError> {
        match self.labels.get(key) {
            Some(first) if first != value => Err(SpecError::LabelTwice {
                key: key.to_string(),
                first: first.clone(),
                second: value.to_string(),
            }),
            Some(_) => Ok(()),
            None => {
                self.labels.insert(key.to_string(), value.to_string());
                Ok(())
            }
        }
    }
}

/// An OCI container served as an app: its id and the runtime that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// The container's id (the OCI state's `id`).
    pub id: String,
    /// The runtime that handed it over (`runc`, `crun`, …, as far as the
    /// daemon can tell from its process name).
    pub runtime: String,
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
    /// `--lb`, if given.
    pub lb: Option<LbMode>,
    /// `--connect-wait`, if given.
    pub connect_wait: Option<Duration>,
    /// The OCI container this app is, if it is one.
    #[serde(default)]
    pub container: Option<ContainerRef>,
    /// Started with `ax exec --no-hosts-mount` (see [`AppSpec`]).
    #[serde(default)]
    pub no_hosts_mount: bool,
}

/// One app listening on a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// The app that listens.
    pub app: AppId,
    /// The UNIX listener its connections are delivered to.
    pub endpoint: UnixEndpoint,
}

/// One listening VIP:port and the backends that share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The virtual address clients connect to.
    pub addr: SocketAddr,
    /// The names that resolve to its VIP.
    pub names: Vec<String>,
    /// How connections are spread over the backends.
    pub lb: LbMode,
    /// The listening apps, in the order they bound.
    pub backends: Vec<Backend>,
    /// The host loopback address (`127.0.0.1:P` / `[::1]:P`) it is also
    /// reachable at from outside ax, if the daemon holds it (wildcard
    /// listeners only; see [`LocalRegistry::set_host_loopback`]).
    #[serde(default)]
    pub host_loopback: Option<SocketAddr>,
}

/// Why an app could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RegisterError {
    /// Another live app owns that VIP (and shares no name with this one).
    #[error(
        "virtual IP {ip} is already owned by app {owner} (to add a replica behind it, give the same --name, or --lb)"
    )]
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
    /// The connect wait asked for is longer than [`MAX_CONNECT_WAIT`].
    #[error("a connect wait of {secs} s is longer than the {max} s allowed", max = MAX_CONNECT_WAIT.as_secs())]
    ConnectWaitTooLong {
        /// The wait asked for, in whole seconds.
        secs: u64,
    },
    /// The VIP is reserved for a declared service the app is not named
    /// after.
    #[error(
        "virtual IP {ip} is held by an app on node '{node}' of the cluster (to add a replica behind it, give the same --name, or --lb)"
    )]
    HeldElsewhere { ip: IpAddr, node: String },
    #[error(
        "virtual IP {ip} is reserved for the declared service '{name}' (give --name {name} to become its backend)"
    )]
    IpDeclared {
        /// The contested address.
        ip: IpAddr,
        /// The declared service holding it.
        name: String,
    },
    /// The app is named after a declared service but asks for other VIPs.
    #[error(
        "'{name}' is a declared service with virtual IP(s) {vips}; an app named '{name}' takes those (drop --ip, or give --ip {vips})",
        vips = .vips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(",")
    )]
    DeclaredElsewhere {
        /// The declared name.
        name: String,
        /// Its VIPs.
        vips: Vec<IpAddr>,
    },
}

/// A name declared with `ax service create` before (or without) any app
/// that serves it: it resolves at once, and apps started with that
/// `--name` become its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredService {
    /// The name (`db`; `db.ax` resolves too).
    pub name: String,
    /// Its VIPs, IPv4 first, reserved for it until it is deleted.
    pub vips: Vec<IpAddr>,
    /// `--lb`, if given: the default of the apps behind it.
    pub lb: Option<LbMode>,
    /// The user who declared it (only they, or root, may delete it).
    pub uid: u32,
}

/// Why a service could not be declared or deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DeclareError {
    /// Not a usable host name.
    #[error("'{name}' cannot be a service name: {reason}")]
    InvalidName {
        /// The name asked for.
        name: String,
        /// Why.
        reason: String,
    },
    /// Already declared.
    #[error("the service '{0}' is already declared (see 'ax get services')")]
    Exists(String),
    /// Not declared.
    #[error("no service '{0}' is declared (see 'ax get services')")]
    NotDeclared(String),
    /// Apps named after it still run.
    #[error(
        "the service '{name}' still has running apps ({apps}); stop them first, or delete with --force (they keep the name and VIPs until they exit)",
        apps = .apps.iter().map(|a| format!("app {a}")).collect::<Vec<_>>().join(", ")
    )]
    HasBackends {
        /// The service.
        name: String,
        /// Its live apps.
        apps: Vec<AppId>,
    },
    /// Declared by another user.
    #[error("the service '{0}' was declared by another user")]
    NotYours(String),
    /// The VIP asked for is not usable or not free.
    #[error(transparent)]
    Ip(#[from] RegisterError),
    /// Apps with that name already run at other VIPs.
    #[error(
        "apps named '{name}' already run at {vips}; declare it without --ip, or with those",
        vips = .vips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(",")
    )]
    RunningElsewhere {
        /// The name.
        name: String,
        /// The VIPs its apps hold.
        vips: Vec<IpAddr>,
    },
}

/// The longest `connect_wait` an app may ask for (one day). Longer ones are
/// refused at registration ([`RegisterError::ConnectWaitTooLong`]): a wait
/// is added to the clock, where an unchecked huge value would overflow.
pub const MAX_CONNECT_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks a connect wait that came from outside (the wire, a state file).
pub fn check_connect_wait(wait: Option<Duration>) -> Result<(), RegisterError> {
    match wait {
        Some(w) if w > MAX_CONNECT_WAIT => {
            Err(RegisterError::ConnectWaitTooLong { secs: w.as_secs() })
        }
        _ => Ok(()),
    }
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
    /// The uid owning the program's socket when it has `SO_REUSEPORT`:
    /// the app may then hold several listeners on the port, all with the
    /// option and of one uid (the kernel's rule), each a backend.
    pub reuseport: Option<u32>,
}

/// Why a connect to a virtual address found nothing; all are `ECONNREFUSED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nobody listens on that VIP:port.
    #[error("no service at {0}")]
    NoService(SocketAddr),
    /// Policy forbids it.
    #[error("connection from app {client} {client_labels:?} to {dst} (app {server} {server_labels:?}) denied by {rule}")]
    Denied {
        /// The destination asked for.
        dst: SocketAddr,
        /// The connecting app.
        client: AppId,
        /// Its effective labels.
        client_labels: BTreeMap<String, String>,
        /// The first backend of the service.
        server: AppId,
        /// Its effective labels.
        server_labels: BTreeMap<String, String>,
        /// The rule that decided.
        rule: String,
    },
}

/// The broker's view of the registry.
///
/// Implementations must be cheap and must never block on the network: the
/// broker calls them while a program's thread waits in a trapped syscall.
/// What other hosts of a cluster hold, for a host's allocation of VIPs
/// (see [`LocalRegistry::set_claims`]): VIPs are unique cluster-wide.
pub trait VipClaims: Send + Sync + std::fmt::Debug {
    /// The part of `pool` (hosts `start..start+len`) this host allocates
    /// from; `None`: all of it.
    fn range(&self, pool: &VipPool) -> Option<(u128, u128)>;
    /// The host whose app holds `ip`, unless that app is named one of
    /// `names` or `replica` (`--lb`) is set: an explicit `--ip` there is
    /// refused.
    fn held_elsewhere(&self, ip: IpAddr, names: &[String], replica: bool) -> Option<String>;
    /// Whether an app on another host holds `ip` (never allocated here).
    fn taken_elsewhere(&self, ip: IpAddr) -> bool;
    /// The VIPs of an app on another host named one of `names`: a replica
    /// here shares them.
    fn vips_of_name(&self, names: &[String]) -> Option<Vec<IpAddr>>;
}

/// A service on another host of a cluster, as [`Directory::remote`]
/// finds it: where to connect, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRoute {
    /// The name of the host (node) that serves it.
    pub node: String,
    /// That node's cluster address: a TCP connection there carries the
    /// connection after a short header.
    pub cluster: SocketAddr,
    /// The client app's VIP the server sees.
    pub client_vip: IpAddr,
}

pub trait Directory: Send + Sync {
    /// True when `ip` is virtual: connects to it are answered by ax, never
    /// routed.
    fn is_virtual(&self, ip: IpAddr) -> bool;

    /// The VIPs of `app`, IPv4 first. Empty for an unknown app.
    fn app_vips(&self, app: AppId) -> Vec<IpAddr>;

    /// Where a connect from `client` to `dst` goes: the service's backends
    /// in the order to try them (the first is the load balancer's pick; the
    /// others are tried when it refuses).
    fn resolve(&self, client: AppId, dst: SocketAddr) -> Result<Vec<UnixEndpoint>, ResolveError>;

    /// The address whose service a connect to `dst` reaches: `dst`, or,
    /// when nothing listens there, the same port on the other family's VIP
    /// of the apps holding `dst.ip()` (an app listening on `0.0.0.0` only
    /// is reached at its IPv6 VIP too). The connecting app's source VIP
    /// takes this address's family.
    fn served_addr(&self, dst: SocketAddr) -> SocketAddr {
        dst
    }

    /// How long a blocking connect from `app` to a service that is not up
    /// yet may wait for it; `None` leaves the broker's default.
    fn connect_wait(&self, _app: AppId) -> Option<Duration> {
        None
    }

    /// The listeners `app` itself has at `dst` (one of its VIPs), with no
    /// policy asked: an app's connections to its own localhost are its own
    /// business, as in a pod.
    fn own_backends(&self, app: AppId, dst: SocketAddr) -> Vec<UnixEndpoint> {
        self.resolve(app, dst).unwrap_or_default()
    }

    /// The service (VIP:port) whose wildcard listener the daemon also
    /// serves at the host loopback address `host` (`127.0.0.1:P`,
    /// `[::1]:P`), if any: a program under ax that connects there is sent
    /// to that service as to its VIP, policy included.
    fn host_loopback_service(&self, _host: SocketAddr) -> Option<SocketAddr> {
        None
    }

    /// A counter that grows whenever a service or app comes or goes.
    fn generation(&self) -> u64 {
        0
    }

    /// Waits until [`Directory::generation`] differs from `seen` or
    /// `until` passes, and returns the generation. The default polls.
    fn wait_for_change(&self, seen: u64, until: Instant) -> u64 {
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(50)));
        let _ = seen;
        self.generation()
    }

    /// Registers a listener for `req.ips` × `req.port`. `endpoint` makes the
    /// listener's address from the chosen port; `is_alive` tells whether a
    /// conflicting registration still has a live listener (stale ones are
    /// replaced). Returns the port.
    /// A service at `dst` that no app on this host serves but another
    /// host of a cluster does, with the policy applied as for a local one
    /// (`Err(Denied)`); `Ok(None)` when there is none (the default: no
    /// cluster). Answered from a local copy of the cluster's table, never
    /// waiting on the network.
    fn remote(
        &self,
        _client: AppId,
        _dst: SocketAddr,
    ) -> Result<Option<RemoteRoute>, ResolveError> {
        Ok(None)
    }

    /// The header a connection to `route` starts with: `dst`, the client's
    /// VIP:port `from`, the client's labels and, with a cluster key, their
    /// authentication.
    fn remote_header(
        &self,
        _client: AppId,
        _route: &RemoteRoute,
        _dst: SocketAddr,
        _from: SocketAddr,
    ) -> Vec<u8> {
        Vec::new()
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_has_one_vip_per_family_and_one_value_per_label() {
        let mut s = AppSpec::default();
        let (v4, v6): (IpAddr, IpAddr) =
            ("10.233.0.7".parse().unwrap(), "fd00::7".parse().unwrap());
        s.request_ip(v6).unwrap();
        s.request_ip(v4).unwrap();
        s.request_ip(v4).unwrap();
        assert_eq!(s.requested_ips, vec![v4, v6]);
        let e = s.request_ip("10.233.0.8".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("at most one IPv4"), "{e}");
        s.add_label("tier", "front").unwrap();
        s.add_label("tier", "front").unwrap();
        assert!(s.add_label("tier", "back").is_err());
        s.add_name("web.ax");
        s.add_name("web");
        assert_eq!(s.names, vec!["web"]);
    }
}
