//! Clusters: one network of names and VIPs across hosts.
//!
//! Each daemon started with `--cluster ADDR:PORT` is a node. Membership,
//! failure detection (phi accrual) and the shared table travel by gossip
//! with [`chitchat`] (scuttlebutt anti-entropy): every node publishes its
//! own apps and services as keys of its chitchat state (`app:<id>`,
//! `svc:<VIP:port>`, JSON) and keeps every other node's locally, so that a
//! connect never waits on the network to look anything up
//! ([`ClusterDirectory`]). A connection to a service on another node goes
//! host to host and starts with a [`header::Header`]; the daemon that
//! accepts it reads only that header.

pub mod header;
mod table;
mod transport;

pub use header::{Header, HeaderError, Replay};
pub use table::Table;

use ax_proto::{NodeInfo, NodeService};
use ax_registry::{
    AppId, BindError, BindRequest, Directory, LocalRegistry, RemoteRoute, ResolveError,
    UnixEndpoint,
};
use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How often a node gossips (and refreshes its table).
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(250);

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `--node`: this host's name in the cluster.
    pub node: String,
    /// `--cluster`: gossip (UDP) and connections (TCP) on this address.
    pub addr: SocketAddr,
    /// `--join`: members to join through.
    pub join: Vec<SocketAddr>,
    /// `--cluster-key-file`'s key: authenticates connection headers.
    pub key: Option<Vec<u8>>,
}

/// Why a cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The key file could not be read.
    #[error("cannot read the cluster key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The key is too short to be a secret.
    #[error("the cluster key in {0} is shorter than 16 bytes")]
    ShortKey(String),
    /// Gossip could not start.
    #[error("cannot start gossip on {addr}: {reason}")]
    Gossip {
        /// `--cluster`.
        addr: SocketAddr,
        /// What chitchat said.
        reason: String,
    },
}

/// Reads a cluster key: the file's bytes, surrounding whitespace trimmed.
pub fn read_key(path: &Path) -> Result<Vec<u8>, ClusterError> {
    let bytes = std::fs::read(path).map_err(|source| ClusterError::KeyFile {
        path: path.display().to_string(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let key = text.trim().as_bytes().to_vec();
    if key.len() < 16 {
        return Err(ClusterError::ShortKey(path.display().to_string()));
    }
    Ok(key)
}

/// A node's view of its cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    registry: Arc<LocalRegistry>,
    handle: Mutex<Option<ChitchatHandle>>,
    table: RwLock<Arc<Table>>,
    generation: AtomicU64,
    next: AtomicUsize,
    replay: Mutex<Replay>,
    /// The block of each VIP pool this node allocates from (see
    /// [`table::BLOCKS`]).
    block: AtomicUsize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.config.node)
            .field("addr", &self.inner.config.addr)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A node of the cluster `config` describes, not gossiping yet (see
    /// [`Cluster::start`]).
    pub fn new(config: ClusterConfig, registry: Arc<LocalRegistry>) -> Cluster {
        let config_node = config.node.clone();
        let cluster = Cluster {
            inner: Arc::new(Inner {
                config,
                registry,
                handle: Mutex::new(None),
                table: RwLock::new(Arc::new(Table::default())),
                generation: AtomicU64::new(1),
                next: AtomicUsize::new(0),
                replay: Mutex::new(Replay::default()),
                block: AtomicUsize::new(table::first_block(&config_node)),
            }),
        };
        cluster
            .inner
            .registry
            .set_claims(Arc::new(Claims(cluster.clone())));
        cluster
    }

    /// Starts gossip on `--cluster` and keeps this node's apps and services
    /// published. Must run inside a tokio runtime.
    pub async fn start(&self) -> Result<(), ClusterError> {
        let config = &self.inner.config;
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        let id = ChitchatId::new(config.node.clone(), generation, config.addr);
        let chitchat_config = ChitchatConfig {
            chitchat_id: id,
            cluster_id: "ax".to_string(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: config.addr,
            seed_nodes: config.join.iter().map(|a| a.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(2),
                initial_interval: GOSSIP_INTERVAL,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let spawned = match &config.key {
            Some(key) => {
                let transport = transport::SealedTransport {
                    key: Arc::new(key.clone()),
                };
                spawn_chitchat(chitchat_config, Vec::new(), &transport).await
            }
            None => spawn_chitchat(chitchat_config, Vec::new(), &UdpTransport).await,
        };
        let handle = spawned.map_err(|e| ClusterError::Gossip {
            addr: config.addr,
            reason: format!("{e:#}"),
        })?;
        *self.inner.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let c = self.clone();
        tokio::spawn(async move { c.keep_current().await });
        Ok(())
    }

    /// `--node`.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// `--cluster`.
    pub fn addr(&self) -> SocketAddr {
        self.inner.config.addr
    }

    /// The cluster key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.config.key.as_deref()
    }

    /// The current table (every node's apps and services).
    pub fn table(&self) -> Arc<Table> {
        self.inner
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bumped whenever the table changes.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Every node, this one first.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut nodes = vec![NodeInfo {
            name: self.node().to_string(),
            address: self.addr(),
            state: ax_proto::NodeState::Alive,
            local: true,
            apps: table::local_apps(&self.inner.registry),
            services: table::local_services(&self.inner.registry),
        }];
        nodes.extend(self.table().nodes.iter().cloned());
        nodes
    }

    /// Checks a header read from a connection (see [`header`]).
    pub fn check_header(
        &self,
        prefix: &[u8; 6],
        body: &[u8],
        mac: &[u8; header::MAC_LEN],
    ) -> Result<Header, HeaderError> {
        let mut replay = self.inner.replay.lock().unwrap_or_else(|e| e.into_inner());
        Header::decode(prefix, body, mac, self.key(), &mut replay)
    }

    /// Stops gossiping (the others then see this node die).
    pub fn stop(&self) {
        if let Some(h) = self
            .inner
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.initiate_shutdown();
            h.abort();
        }
    }

    /// Publishes this node's apps and services and reads everyone else's,
    /// every gossip interval, until the cluster stops.
    async fn keep_current(self) {
        let mut published: HashMap<String, String> = HashMap::new();
        let mut beats = table::Heartbeats::default();
        let mut tick = tokio::time::interval(GOSSIP_INTERVAL / 2);
        loop {
            tick.tick().await;
            let Some(chitchat) = self
                .inner
                .handle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|h| h.chitchat())
            else {
                return;
            };
            let mut wanted = table::local_keys(&self.inner.registry);
            wanted.insert(
                table::BLOCK_KEY.to_string(),
                self.inner.block.load(Ordering::Relaxed).to_string(),
            );
            let fresh = {
                let mut cc = chitchat.lock().await;
                let me = cc.self_node_state();
                for (k, v) in &wanted {
                    if published.get(k) != Some(v) {
                        me.set(k.clone(), v.clone());
                    }
                }
                for k in published.keys() {
                    if !wanted.contains_key(k) {
                        me.delete(k);
                    }
                }
                table::read(&cc, &mut beats, Instant::now())
            };
            published = wanted;
            // Two nodes on one block: the one with the greater name moves.
            let mine = self.inner.block.load(Ordering::Relaxed);
            if let Some(other) = fresh.block_conflict(self.node(), mine) {
                let next = fresh.free_block(mine);
                tracing::info!(block = mine, node = %other, next, "VIP block also claimed by another node: moving");
                self.inner.block.store(next, Ordering::Relaxed);
            }
            let old = {
                let mut t = self.inner.table.write().unwrap_or_else(|e| e.into_inner());
                if **t == fresh {
                    None
                } else {
                    let old = std::mem::replace(&mut *t, Arc::new(fresh));
                    Some((old, t.clone()))
                }
            };
            if let Some((old, new)) = old {
                self.inner.generation.fetch_add(1, Ordering::AcqRel);
                table::log_changes(&old, &new);
            }
        }
    }

    /// The route to `dst` on another node, policy applied; `Ok(None)` if
    /// no live node serves it.
    fn route(&self, client: AppId, dst: SocketAddr) -> Result<Option<RemoteRoute>, ResolveError> {
        let table = self.table();
        let candidates: Vec<(&NodeInfo, &NodeService)> = table
            .nodes
            .iter()
            .filter(|n| n.state != ax_proto::NodeState::Dead)
            .filter_map(|n| table::service_at(n, dst).map(|s| (n, s)))
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        let lb = candidates[0].1.lb;
        let i = match lb {
            ax_registry::LbMode::RoundRobin => self.inner.next.fetch_add(1, Ordering::Relaxed),
            ax_registry::LbMode::Random => usize::try_from(header::random()).unwrap_or(0),
        } % candidates.len();
        let (node, service) = candidates[i];
        let client_info = self.inner.registry.app(client);
        let no_labels = Default::default();
        let client_labels = client_info.as_ref().map_or(&no_labels, |a| &a.labels);
        let server = service.apps.first().copied().unwrap_or(0);
        let server_labels = node
            .apps
            .iter()
            .find(|a| a.id == server)
            .map_or(&no_labels, |a| &a.labels);
        let decision = self
            .inner
            .registry
            .decide(client_labels, server_labels, dst.port());
        if !decision.allowed {
            return Err(ResolveError::Denied {
                dst,
                client,
                client_labels: ax_registry::effective_labels(client_labels).into_owned(),
                server,
                server_labels: ax_registry::effective_labels(server_labels).into_owned(),
                rule: format!("{} (server on node {})", decision.rule, node.name),
            });
        }
        let vips = client_info.map(|a| a.vips).unwrap_or_default();
        let client_vip = vips
            .iter()
            .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            .or(vips.first())
            .copied()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        Ok(Some(RemoteRoute {
            node: node.name.clone(),
            cluster: node.address,
            client_vip,
        }))
    }

    /// Names of apps on other live nodes and their VIPs (for the hosts
    /// file).
    pub fn remote_names(&self) -> Vec<(String, Vec<IpAddr>)> {
        let mut by_name: std::collections::BTreeMap<String, Vec<IpAddr>> = Default::default();
        for node in self.table().nodes.iter() {
            if node.state == ax_proto::NodeState::Dead {
                continue;
            }
            for app in &node.apps {
                for name in &app.names {
                    let vips = by_name.entry(name.clone()).or_default();
                    for ip in &app.vips {
                        if !vips.contains(ip) {
                            vips.push(*ip);
                        }
                    }
                }
            }
        }
        by_name.into_iter().collect()
    }

    /// Whether `ip` is the VIP of an app on another live node.
    pub fn is_remote_vip(&self, ip: IpAddr) -> bool {
        self.table()
            .nodes
            .iter()
            .filter(|n| n.state != ax_proto::NodeState::Dead)
            .any(|n| n.apps.iter().any(|a| a.vips.contains(&ip)))
    }
}

/// The broker's [`Directory`] on a node: the local registry first, then
/// the cluster's table for services served elsewhere.
#[derive(Debug, Clone)]
pub struct ClusterDirectory {
    local: Arc<LocalRegistry>,
    cluster: Cluster,
}

impl ClusterDirectory {
    /// Answers from `local`, and from `cluster` for what `local` lacks.
    pub fn new(local: Arc<LocalRegistry>, cluster: Cluster) -> Self {
        Self { local, cluster }
    }
}

impl Directory for ClusterDirectory {
    fn is_virtual(&self, ip: IpAddr) -> bool {
        self.local.is_virtual(ip) || self.cluster.is_remote_vip(ip)
    }

    fn app_vips(&self, app: AppId) -> Vec<IpAddr> {
        self.local.app_vips(app)
    }

    fn resolve(&self, client: AppId, dst: SocketAddr) -> Result<Vec<UnixEndpoint>, ResolveError> {
        self.local.resolve(client, dst)
    }

    fn served_addr(&self, dst: SocketAddr) -> SocketAddr {
        self.local.served_addr(dst)
    }

    fn connect_wait(&self, app: AppId) -> Option<Duration> {
        self.local.connect_wait(app)
    }

    fn own_backends(&self, app: AppId, dst: SocketAddr) -> Vec<UnixEndpoint> {
        self.local.own_backends(app, dst)
    }

    fn host_loopback_service(&self, host: SocketAddr) -> Option<SocketAddr> {
        self.local.host_loopback_service(host)
    }

    fn generation(&self) -> u64 {
        // Either side changing is a change (a connect waiting for a
        // service notices one that appears on another node).
        self.local
            .generation()
            .wrapping_add(self.cluster.generation().wrapping_shl(32))
    }

    fn wait_for_change(&self, seen: u64, until: Instant) -> u64 {
        let local_seen = seen.wrapping_sub(self.cluster.generation().wrapping_shl(32));
        if local_seen == self.local.generation() {
            // The cluster's table changes by gossip: looked at every slice.
            let slice = (Instant::now() + GOSSIP_INTERVAL).min(until);
            self.local.wait_for_change(local_seen, slice);
        }
        self.generation()
    }

    fn remote(&self, client: AppId, dst: SocketAddr) -> Result<Option<RemoteRoute>, ResolveError> {
        self.cluster.route(client, dst)
    }

    fn remote_header(
        &self,
        client: AppId,
        _route: &RemoteRoute,
        dst: SocketAddr,
        from: SocketAddr,
    ) -> Vec<u8> {
        let labels = self.local.app(client).map(|a| a.labels).unwrap_or_default();
        Header::new(dst, from, client, labels, self.cluster.node().to_string())
            .encode(self.cluster.key())
    }

    fn bind(
        &self,
        req: &BindRequest,
        endpoint: &dyn Fn(u16) -> UnixEndpoint,
        is_alive: &dyn Fn(&UnixEndpoint) -> bool,
    ) -> Result<u16, BindError> {
        self.local.bind(req, endpoint, is_alive)
    }

    fn release(&self, endpoint: &UnixEndpoint) {
        self.local.release(endpoint)
    }

    fn app_exited(&self, app: AppId) {
        self.local.app_exited(app)
    }
}

/// The cluster's side of VIP allocation (see [`ax_registry::VipClaims`]).
#[derive(Debug)]
struct Claims(Cluster);

impl ax_registry::VipClaims for Claims {
    fn range(&self, pool: &ax_registry::VipPool) -> Option<(u128, u128)> {
        // Blocks aligned on the pool's own size (a power of two), so that a
        // node's VIPs read as a sub-network: 10.233.<block>.x in a /16.
        let cap = pool.capacity();
        let nominal = cap.checked_add(2)?.checked_next_power_of_two()?;
        let size = nominal / table::BLOCKS;
        if size < 4 {
            return None;
        }
        let block = u128::try_from(self.0.inner.block.load(Ordering::Relaxed)).ok()?;
        let low = block.checked_mul(size)?;
        (low < cap).then(|| (low, size.min(cap - low)))
    }

    fn held_elsewhere(&self, ip: IpAddr, names: &[String], replica: bool) -> Option<String> {
        if replica {
            return None;
        }
        let table = self.0.table();
        let node = table
            .live()
            .find(|n| {
                n.apps.iter().any(|a| {
                    a.vips.contains(&ip) && !a.names.iter().any(|name| names.contains(name))
                })
            })
            .map(|n| n.name.clone());
        node
    }

    fn taken_elsewhere(&self, ip: IpAddr) -> bool {
        self.0.is_remote_vip(ip)
    }

    fn vips_of_name(&self, names: &[String]) -> Option<Vec<IpAddr>> {
        let table = self.0.table();
        let vips = table
            .live()
            .flat_map(|n| n.apps.iter())
            .find(|a| a.names.iter().any(|name| names.contains(name)))
            .map(|a| a.vips.clone());
        vips
    }
}
