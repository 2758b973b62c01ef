//! The single-host registry kept in the daemon's memory: apps, their VIPs
//! and names (apps that share a name share its VIP and its services), the
//! services with their backends, and the policy that decides who may
//! connect to whom.

use crate::policy::{effective_labels, Policy};
use crate::{
    AppId, AppInfo, AppSpec, Backend, BindError, BindRequest, DeclareError, DeclaredService,
    Directory, LbMode, RegisterError, ResolveError, ServiceInfo, UnixEndpoint, VipPool,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First and last port handed out for `bind(…:0)`, as Linux's default
/// `ip_local_port_range`.
const EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);

/// The most services that may be declared at once (each reserves VIPs).
pub const MAX_DECLARED: usize = 4096;

/// The host name a VIP without a name gets in the hosts file, so that a
/// reverse lookup of it is answered there and never leaves the host.
pub fn app_host_name(app: AppId) -> String {
    format!("app-{app}.ax")
}

#[derive(Debug, Default)]
struct Service {
    backends: Vec<Backend>,
    /// The round-robin cursor.
    next: usize,
}

#[derive(Debug, Default)]
struct State {
    next_app: AppId,
    apps: BTreeMap<AppId, AppInfo>,
    /// Every live app holding each VIP, in the order they came.
    vip_owners: HashMap<IpAddr, Vec<AppId>>,
    services: BTreeMap<(IpAddr, u16), Service>,
    /// Services declared before (or without) their apps, by name.
    declared: BTreeMap<String, DeclaredService>,
    /// Where the next search for a free VIP starts, per pool.
    next_pool_host: HashMap<usize, u128>,
    next_port: u16,
    generation: u64,
    random: u64,
    /// The listeners bound with `SO_REUSEPORT`, with the uid owning each.
    reuseport: HashMap<UnixEndpoint, u32>,
}

impl State {
    fn changed(&mut self) {
        self.generation += 1;
    }

    /// Drops the `SO_REUSEPORT` marks of endpoints no service delivers to.
    fn prune_reuseport(&mut self) {
        if self.reuseport.is_empty() {
            return;
        }
        let live: HashSet<&UnixEndpoint> = self
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| &b.endpoint))
            .collect();
        self.reuseport.retain(|ep, _| live.contains(ep));
    }

    /// The owners of `ip` when a new app with `names` may not share it. An
    /// app joins as a replica when it shares a name with them, or when it
    /// asks for load balancing (`replica`: `--lb` given).
    fn conflicting_owner(&self, ip: IpAddr, names: &[String], replica: bool) -> Option<AppId> {
        let owners = self.vip_owners.get(&ip)?;
        if replica {
            return None;
        }
        let shares_a_name = owners.iter().any(|o| {
            self.apps
                .get(o)
                .is_some_and(|a| a.names.iter().any(|n| names.contains(n)))
        });
        if shares_a_name {
            None
        } else {
            owners.first().copied()
        }
    }

    /// The VIPs of a live app that has one of `names`, if any.
    fn vips_of_name(&self, names: &[String]) -> Option<Vec<IpAddr>> {
        self.apps
            .values()
            .find(|a| a.names.iter().any(|n| names.contains(n)))
            .map(|a| a.vips.clone())
    }

    /// The declared service that reserves `ip`, if any.
    fn declared_holder(&self, ip: IpAddr) -> Option<&DeclaredService> {
        self.declared.values().find(|d| d.vips.contains(&ip))
    }

    /// True when `ip` is held by an app or reserved by a declared service.
    fn vip_taken(&self, ip: IpAddr) -> bool {
        self.vip_owners.contains_key(&ip) || self.declared_holder(ip).is_some()
    }

    fn own(&mut self, ip: IpAddr, app: AppId) {
        let owners = self.vip_owners.entry(ip).or_default();
        if !owners.contains(&app) {
            owners.push(app);
        }
    }

    /// The load-balancing mode of the apps behind `ip`: the latest `--lb`
    /// given by one of them.
    fn lb_of(&self, ip: IpAddr) -> LbMode {
        self.vip_owners
            .get(&ip)
            .into_iter()
            .flatten()
            .rev()
            .find_map(|o| self.apps.get(o).and_then(|a| a.lb))
            .or_else(|| self.declared_holder(ip).and_then(|d| d.lb))
            .unwrap_or_default()
    }

    fn names_of(&self, ip: IpAddr) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        if let Some(d) = self.declared_holder(ip) {
            names.push(d.name.clone());
        }
        for o in self.vip_owners.get(&ip).into_iter().flatten() {
            for n in self.apps.get(o).map(|a| a.names.as_slice()).unwrap_or(&[]) {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }

    fn has_service(&self, addr: SocketAddr) -> bool {
        self.services
            .get(&(addr.ip(), addr.port()))
            .is_some_and(|s| !s.backends.is_empty())
    }

    /// See [`Directory::served_addr`]: a VIP's service, else the one at the
    /// same port of the other family's VIP of an app holding it (a client
    /// that resolved a name to its IPv6 VIP still reaches a server bound on
    /// `0.0.0.0` only, as a client trying both addresses would).
    fn served_addr(&self, dst: SocketAddr) -> SocketAddr {
        if self.has_service(dst) {
            return dst;
        }
        for owner in self.vip_owners.get(&dst.ip()).into_iter().flatten() {
            let Some(app) = self.apps.get(owner) else {
                continue;
            };
            for &ip in &app.vips {
                let other = SocketAddr::new(ip, dst.port());
                if ip.is_ipv4() != dst.is_ipv4() && self.has_service(other) {
                    return other;
                }
            }
        }
        dst
    }

    /// xorshift64*: good enough to spread connections, no dependency.
    fn next_random(&mut self) -> u64 {
        if self.random == 0 {
            self.random = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15)
                | 1;
        }
        let mut x = self.random;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// An in-memory registry for one host.
#[derive(Debug)]
pub struct LocalRegistry {
    pools: Vec<VipPool>,
    state: Mutex<State>,
    changes: Condvar,
    policy: Mutex<Policy>,
    /// Host loopback address → the service the daemon serves there.
    host_loopback: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// With a cluster: what the other hosts hold.
    claims: std::sync::RwLock<Option<std::sync::Arc<dyn crate::VipClaims>>>,
}

impl Default for LocalRegistry {
    fn default() -> Self {
        Self::new(vec![VipPool::default_v4(), VipPool::default_v6()])
    }
}

/// What a daemon keeps on disk so that a successor can take over the apps
/// it served: their ids and VIPs stay reserved until their launchers hand
/// them over again.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The next app id to hand out (ids are never reused).
    pub next_app: AppId,
    /// Every registered app.
    pub apps: Vec<AppInfo>,
    /// Every declared service.
    #[serde(default)]
    pub declared: Vec<DeclaredService>,
}

/// A name and the VIPs it resolves to, for a hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    /// The name as given to `--name`.
    pub name: String,
    /// Its VIPs, IPv4 first.
    pub vips: Vec<IpAddr>,
}

impl LocalRegistry {
    /// The apps and the id counter, for a successor daemon.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        Snapshot {
            next_app: st.next_app,
            apps: st.apps.values().cloned().collect(),
            declared: st.declared.values().cloned().collect(),
        }
    }

    /// Takes over apps from a predecessor's snapshot; `keep` decides which
    /// (e.g. those whose program still runs). Returns the apps restored.
    pub fn restore(&self, snap: &Snapshot, keep: &dyn Fn(&AppInfo) -> bool) -> Vec<AppId> {
        let mut st = self.lock();
        st.next_app = st.next_app.max(snap.next_app);
        let mut restored = Vec::new();
        for d in &snap.declared {
            if st.declared.len() < MAX_DECLARED && !st.declared.contains_key(&d.name) {
                st.declared.insert(d.name.clone(), d.clone());
            }
        }
        for info in &snap.apps {
            if !keep(info) || st.apps.contains_key(&info.id) {
                continue;
            }
            if info.vips.iter().any(|&ip| {
                st.conflicting_owner(ip, &info.names, info.lb.is_some())
                    .is_some()
            }) {
                continue;
            }
            for &ip in &info.vips {
                st.own(ip, info.id);
            }
            st.next_app = st.next_app.max(info.id + 1);
            st.apps.insert(info.id, info.clone());
            restored.push(info.id);
        }
        st.changed();
        drop(st);
        self.changes.notify_all();
        restored
    }

    /// Re-registers an app a launcher hands over after a daemon restart,
    /// with the id and VIPs it had. Succeeds when the app is already known
    /// with the same VIPs (restored from a snapshot).
    pub fn readopt_app(&self, info: &AppInfo) -> Result<(), RegisterError> {
        crate::check_connect_wait(info.connect_wait)?;
        let mut st = self.lock();
        if let Some(known) = st.apps.get(&info.id) {
            if known.vips == info.vips {
                return Ok(());
            }
            return Err(RegisterError::IpInUse {
                ip: info
                    .vips
                    .first()
                    .copied()
                    .unwrap_or(IpAddr::from([0, 0, 0, 0])),
                owner: info.id,
            });
        }
        for &ip in &info.vips {
            if let Some(owner) = st.conflicting_owner(ip, &info.names, info.lb.is_some()) {
                return Err(RegisterError::IpInUse { ip, owner });
            }
        }
        for &ip in &info.vips {
            st.own(ip, info.id);
        }
        st.next_app = st.next_app.max(info.id + 1);
        st.apps.insert(info.id, info.clone());
        st.changed();
        drop(st);
        self.changes.notify_all();
        Ok(())
    }

    /// Records a live listener found after a restart (it was bound under a
    /// predecessor). Existing registrations are left alone.
    /// Returns true when something new was recorded.
    pub fn restore_service(
        &self,
        app: AppId,
        ips: &[IpAddr],
        port: u16,
        endpoint: UnixEndpoint,
        reuseport: Option<u32>,
    ) -> bool {
        let mut st = self.lock();
        if !st.apps.contains_key(&app) {
            return false;
        }
        if let Some(uid) = reuseport {
            st.reuseport.insert(endpoint.clone(), uid);
        }
        let mut added = false;
        for &ip in ips {
            let service = st.services.entry((ip, port)).or_default();
            if !service.backends.iter().any(|b| b.endpoint == endpoint) {
                added = true;
                service.backends.push(Backend {
                    app,
                    endpoint: endpoint.clone(),
                });
            }
        }
        if added {
            st.changed();
            drop(st);
            self.changes.notify_all();
        }
        added
    }

    /// A registry allocating VIPs from `pools` (the first IPv4 pool is used
    /// for apps that ask for none).
    pub fn new(pools: Vec<VipPool>) -> Self {
        Self {
            pools,
            state: Mutex::new(State {
                next_app: 1,
                next_port: EPHEMERAL_PORTS.0,
                ..State::default()
            }),
            changes: Condvar::new(),
            policy: Mutex::new(Policy::default()),
            claims: std::sync::RwLock::new(None),
            host_loopback: Mutex::default(),
        }
    }

    /// Records which service the daemon serves at each host loopback
    /// address (see [`Directory::host_loopback_service`]), replacing the
    /// previous record.
    pub fn set_host_loopback(&self, held: HashMap<SocketAddr, SocketAddr>) {
        *self.host_loopback.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    fn host_loopback_of(&self, service: SocketAddr) -> Option<SocketAddr> {
        self.host_loopback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, s)| **s == service)
            .map(|(host, _)| *host)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the daemon; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, mut st: MutexGuard<'_, State>) {
        st.changed();
        drop(st);
        self.changes.notify_all();
    }

    /// Replaces the connection policy (the daemon's `--policy`, reloaded on
    /// SIGHUP).
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// The pools VIPs come from.
    pub fn pools(&self) -> &[VipPool] {
        &self.pools
    }

    /// Registers a new app for user `uid`, reserving its VIPs. An app that
    /// shares a name with a live one joins it: same VIPs, and its listeners
    /// become further backends of the same services.
    pub fn register_app(&self, spec: &AppSpec, uid: u32) -> Result<AppInfo, RegisterError> {
        crate::check_connect_wait(spec.connect_wait)?;
        let mut st = self.lock();
        // A declared name brings its VIPs: explicit ones must be among them.
        let declared = spec.names.iter().find_map(|n| st.declared.get(n)).cloned();
        if let Some(d) = &declared {
            let elsewhere = spec.requested_ips.iter().any(|ip| !d.vips.contains(ip))
                || spec
                    .names
                    .iter()
                    .filter_map(|n| st.declared.get(n))
                    .any(|other| other.vips != d.vips);
            if elsewhere {
                return Err(RegisterError::DeclaredElsewhere {
                    name: d.name.clone(),
                    vips: d.vips.clone(),
                });
            }
        }
        let claims = self.claims();
        let mut vips = Vec::new();
        for &ip in &spec.requested_ips {
            validate_vip(ip)?;
            if let Some(node) = claims
                .as_ref()
                .and_then(|c| c.held_elsewhere(ip, &spec.names, spec.lb.is_some()))
            {
                return Err(RegisterError::HeldElsewhere { ip, node });
            }
            if let Some(holder) = st.declared_holder(ip) {
                if !spec.names.contains(&holder.name) {
                    return Err(RegisterError::IpDeclared {
                        ip,
                        name: holder.name.clone(),
                    });
                }
            }
            if let Some(owner) = st.conflicting_owner(ip, &spec.names, spec.lb.is_some()) {
                return Err(RegisterError::IpInUse { ip, owner });
            }
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
        if vips.is_empty() {
            if let Some(d) = &declared {
                vips = d.vips.clone();
            } else if let Some(shared) = st.vips_of_name(&spec.names) {
                vips = shared;
            } else if let Some(shared) = claims.as_ref().and_then(|c| c.vips_of_name(&spec.names)) {
                // A replica of an app on another host of the cluster.
                vips = shared;
            }
        }
        if vips.is_empty() {
            vips = self.allocate(&mut st)?;
        }
        vips.sort_by_key(|ip| ip.is_ipv6());
        let id = st.next_app;
        st.next_app += 1;
        for &ip in &vips {
            st.own(ip, id);
        }
        let info = AppInfo {
            id,
            pid: 0,
            uid,
            vips,
            names: spec.names.clone(),
            labels: spec.labels.clone(),
            command: spec.command.clone(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            lb: spec.lb.or(declared.and_then(|d| d.lb)),
            connect_wait: spec.connect_wait,
            container: spec.container.clone(),
            no_hosts_mount: spec.no_hosts_mount,
        };
        st.apps.insert(id, info.clone());
        self.notify(st);
        Ok(info)
    }

    /// One free VIP from the first pool of each family (dual stack by
    /// default: a daemon with only an IPv4 pool hands out IPv4 VIPs only).
    fn allocate(&self, st: &mut State) -> Result<Vec<IpAddr>, RegisterError> {
        if self.pools.is_empty() {
            return Err(RegisterError::PoolExhausted("(no pool configured)".into()));
        }
        let mut vips = Vec::new();
        for v4 in [true, false] {
            let Some((index, pool)) = self
                .pools
                .iter()
                .enumerate()
                .find(|(_, p)| p.is_ipv4() == v4)
            else {
                continue;
            };
            let cap = pool.capacity();
            // With a cluster: this host's part of the pool only.
            let claims = self.claims();
            let (low, len) = claims
                .as_ref()
                .and_then(|c| c.range(pool))
                .filter(|(low, len)| *len > 0 && low.saturating_add(*len) <= cap)
                .unwrap_or((0, cap));
            let next = st.next_pool_host.get(&index).copied().unwrap_or(low);
            let start = next.saturating_sub(low);
            let mut found = None;
            for i in 0..len.min(1 << 24) {
                let n = low + (start + i) % len;
                let Some(ip) = pool.host(n) else { continue };
                let elsewhere = claims.as_ref().is_some_and(|c| c.taken_elsewhere(ip));
                if !st.vip_taken(ip) && !elsewhere {
                    found = Some((ip, n));
                    break;
                }
            }
            let (ip, n) = found.ok_or_else(|| RegisterError::PoolExhausted(pool.to_string()))?;
            st.next_pool_host.insert(index, n + 1);
            vips.push(ip);
        }
        Ok(vips)
    }

    /// Declares the service `name` (`ax service create`): it resolves at
    /// once to `ips`, or to VIPs allocated as for an app (those of live apps
    /// already named so, if any), reserved until it is deleted.
    pub fn declare(
        &self,
        name: &str,
        ips: &[IpAddr],
        lb: Option<LbMode>,
        uid: u32,
    ) -> Result<DeclaredService, DeclareError> {
        validate_name(name)?;
        let mut st = self.lock();
        if st.declared.contains_key(name) {
            return Err(DeclareError::Exists(name.to_string()));
        }
        if st.declared.len() >= MAX_DECLARED {
            return Err(DeclareError::InvalidName {
                name: name.to_string(),
                reason: format!("{MAX_DECLARED} services are declared already"),
            });
        }
        let names = [name.to_string()];
        let running = st.vips_of_name(&names);
        let mut vips = Vec::new();
        for &ip in ips {
            validate_vip(ip)?;
            if let Some(holder) = st.declared_holder(ip) {
                return Err(RegisterError::IpDeclared {
                    ip,
                    name: holder.name.clone(),
                }
                .into());
            }
            if let Some(owner) = st.conflicting_owner(ip, &names, false) {
                return Err(RegisterError::IpInUse { ip, owner }.into());
            }
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
        if let Some(running) = running {
            if vips.is_empty() {
                vips = running;
            } else if vips.iter().any(|ip| !running.contains(ip)) {
                return Err(DeclareError::RunningElsewhere {
                    name: name.to_string(),
                    vips: running,
                });
            }
        }
        if vips.is_empty() {
            vips = self.allocate(&mut st)?;
        }
        vips.sort_by_key(|ip| ip.is_ipv6());
        let declared = DeclaredService {
            name: name.to_string(),
            vips,
            lb,
            uid,
        };
        st.declared.insert(name.to_string(), declared.clone());
        self.notify(st);
        Ok(declared)
    }

    /// Deletes a declared service (`ax service delete`). Refused while live
    /// apps are named after it, unless `force` (they then keep the name and
    /// its VIPs until they exit). Only its declarer or root may delete it.
    pub fn undeclare(
        &self,
        name: &str,
        force: bool,
        uid: u32,
    ) -> Result<DeclaredService, DeclareError> {
        let mut st = self.lock();
        let declared = st
            .declared
            .get(name)
            .ok_or_else(|| DeclareError::NotDeclared(name.to_string()))?;
        if uid != 0 && declared.uid != uid {
            return Err(DeclareError::NotYours(name.to_string()));
        }
        let apps: Vec<AppId> = st
            .apps
            .values()
            .filter(|a| a.names.iter().any(|n| n == name))
            .map(|a| a.id)
            .collect();
        if !apps.is_empty() && !force {
            return Err(DeclareError::HasBackends {
                name: name.to_string(),
                apps,
            });
        }
        let removed = st
            .declared
            .remove(name)
            .ok_or_else(|| DeclareError::NotDeclared(name.to_string()))?;
        self.notify(st);
        Ok(removed)
    }

    /// Every declared service, by name.
    pub fn declared(&self) -> Vec<DeclaredService> {
        self.lock().declared.values().cloned().collect()
    }

    /// Records the pid of the app's main program.
    pub fn set_pid(&self, app: AppId, pid: u32) -> Result<(), RegisterError> {
        let mut st = self.lock();
        let info = st.apps.get_mut(&app).ok_or(RegisterError::NoSuchApp(app))?;
        info.pid = pid;
        Ok(())
    }

    /// One app.
    pub fn app(&self, app: AppId) -> Option<AppInfo> {
        self.lock().apps.get(&app).cloned()
    }

    /// All apps, by id.
    pub fn apps(&self) -> Vec<AppInfo> {
        self.lock().apps.values().cloned().collect()
    }

    /// Every name of a live app and the VIPs it resolves to, by name.
    pub fn names(&self) -> Vec<NameEntry> {
        let st = self.lock();
        let mut by_name: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
        for d in st.declared.values() {
            by_name.insert(&d.name, d.vips.clone());
        }
        for app in st.apps.values() {
            for name in &app.names {
                let vips = by_name.entry(name).or_default();
                for ip in &app.vips {
                    if !vips.contains(ip) {
                        vips.push(*ip);
                    }
                }
            }
        }
        by_name
            .into_iter()
            .map(|(name, mut vips)| {
                vips.sort_by_key(|ip| ip.is_ipv6());
                NameEntry {
                    name: name.to_string(),
                    vips,
                }
            })
            .collect()
    }

    /// The backends of `dst` in the order to try them, with no policy
    /// check: for connections from outside ax (an exposed host port),
    /// which an operator let in explicitly.
    pub fn backends(&self, dst: SocketAddr) -> Result<Vec<UnixEndpoint>, ResolveError> {
        let mut st = self.lock();
        Ok(pick(&mut st, dst)?
            .into_iter()
            .map(|b| b.endpoint)
            .collect())
    }

    /// Makes VIPs unique across a cluster: allocation keeps to this host's
    /// part of each pool and skips VIPs held elsewhere; an explicit `--ip`
    /// held elsewhere is refused unless it names a replica.
    pub fn set_claims(&self, claims: std::sync::Arc<dyn crate::VipClaims>) {
        *self.claims.write().unwrap_or_else(|e| e.into_inner()) = Some(claims);
    }

    fn claims(&self) -> Option<std::sync::Arc<dyn crate::VipClaims>> {
        self.claims
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The backends of `dst` in the order to try them, if the policy lets a
    /// client (`client`, with `client_labels`, or the labels of local app
    /// `client` when `None`) reach them. Judged against
    /// the picked backend's labels: backends of one service share a name,
    /// and normally their labels.
    fn allowed_backends(
        &self,
        st: &mut State,
        client: AppId,
        client_labels: Option<&BTreeMap<String, String>>,
        dst: SocketAddr,
    ) -> Result<Vec<UnixEndpoint>, ResolveError> {
        let ordered = pick(st, dst)?;
        let no_labels = BTreeMap::new();
        let client_labels = client_labels
            .or_else(|| st.apps.get(&client).map(|a| &a.labels))
            .unwrap_or(&no_labels);
        let server = ordered[0].app;
        let server_labels = st
            .apps
            .get(&server)
            .map(|a| &a.labels)
            .unwrap_or(&no_labels);
        let decision = self.decide(client_labels, server_labels, dst.port());
        if !decision.allowed {
            return Err(ResolveError::Denied {
                dst,
                client,
                client_labels: effective_labels(client_labels).into_owned(),
                server,
                server_labels: effective_labels(server_labels).into_owned(),
                rule: decision.rule,
            });
        }
        Ok(ordered.into_iter().map(|b| b.endpoint).collect())
    }

    /// The backends of `dst` for a client on another host of a cluster
    /// with `client_labels` (app `client` there), with the policy applied
    /// as to a local client.
    pub fn resolve_from_remote(
        &self,
        client: AppId,
        client_labels: &BTreeMap<String, String>,
        dst: SocketAddr,
    ) -> Result<Vec<UnixEndpoint>, ResolveError> {
        self.allowed_backends(&mut self.lock(), client, Some(client_labels), dst)
    }

    /// The policy's decision on a connect from `client` labels to `server`
    /// labels on `port` (for a server on another host of a cluster).
    pub fn decide(
        &self,
        client: &BTreeMap<String, String>,
        server: &BTreeMap<String, String>,
        port: u16,
    ) -> crate::Decision {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(client, server, port)
    }

    /// All services, by address, each with its backends; then each VIP of
    /// a declared service that has none yet, at port 0 with no backend.
    pub fn services(&self) -> Vec<ServiceInfo> {
        let mut services = self.services_unmarked();
        for s in &mut services {
            s.host_loopback = self.host_loopback_of(s.addr);
        }
        services
    }

    fn services_unmarked(&self) -> Vec<ServiceInfo> {
        let st = self.lock();
        let mut services: Vec<ServiceInfo> = st
            .services
            .iter()
            .filter(|(_, s)| !s.backends.is_empty())
            .map(|(&(ip, port), s)| ServiceInfo {
                addr: SocketAddr::new(ip, port),
                names: st.names_of(ip),
                lb: st.lb_of(ip),
                backends: s.backends.clone(),
                host_loopback: None,
            })
            .collect();
        for d in st.declared.values() {
            for &ip in &d.vips {
                if !services.iter().any(|s| s.addr.ip() == ip) {
                    services.push(ServiceInfo {
                        addr: SocketAddr::new(ip, 0),
                        names: st.names_of(ip),
                        lb: st.lb_of(ip),
                        backends: Vec::new(),
                        host_loopback: None,
                    });
                }
            }
        }
        services
    }

    /// Each VIP that no name resolves to, with the first app holding it:
    /// the hosts file gives it [`app_host_name`].
    pub fn unnamed_vips(&self) -> Vec<(IpAddr, AppId)> {
        let st = self.lock();
        let mut out: Vec<(IpAddr, AppId)> = st
            .vip_owners
            .iter()
            .filter(|(ip, _)| st.names_of(**ip).is_empty())
            .filter_map(|(ip, owners)| owners.first().map(|o| (*ip, *o)))
            .collect();
        out.sort_by_key(|(ip, _)| (ip.is_ipv6(), *ip));
        out
    }
}

/// The backends of `dst` in the order to try them: the load balancer's
/// pick first, then the others.
fn pick(st: &mut State, asked: SocketAddr) -> Result<Vec<Backend>, ResolveError> {
    let dst = st.served_addr(asked);
    let lb = st.lb_of(dst.ip());
    let random = match lb {
        LbMode::RoundRobin => None,
        LbMode::Random => Some(st.next_random()),
    };
    let service = st
        .services
        .get_mut(&(dst.ip(), dst.port()))
        .filter(|s| !s.backends.is_empty())
        .ok_or(ResolveError::NoService(asked))?;
    let count = service.backends.len();
    let first = match random {
        Some(r) => (r % count as u64) as usize,
        None => {
            let n = service.next % count;
            service.next = n + 1;
            n
        }
    };
    Ok((0..count)
        .map(|i| service.backends[(first + i) % count].clone())
        .collect())
}

/// A service name must be a host name: a-z, 0-9, '-' and '.', at most 253
/// characters (the CLI explains finer points before asking).
fn validate_name(name: &str) -> Result<(), DeclareError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 253 {
        Some("it is longer than 253 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("names use a-z, 0-9, '-' and '.'")
    } else if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) {
        Some("it starts or ends with '-' or '.'")
    } else {
        None
    };
    match reason {
        Some(r) => Err(DeclareError::InvalidName {
            name: name.to_string(),
            reason: r.to_string(),
        }),
        None => Ok(()),
    }
}

fn validate_vip(ip: IpAddr) -> Result<(), RegisterError> {
    let reason = if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address is left to the kernel")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        Some("an IPv4-mapped IPv6 address; give the IPv4 address instead")
    } else {
        None
    };
    match reason {
        Some(r) => Err(RegisterError::InvalidIp {
            ip,
            reason: r.to_string(),
        }),
        None => Ok(()),
    }
}

impl Directory for LocalRegistry {
    fn is_virtual(&self, ip: IpAddr) -> bool {
        if self.pools.iter().any(|p| p.contains(ip)) {
            return true;
        }
        self.lock().vip_taken(ip)
    }

    fn app_vips(&self, app: AppId) -> Vec<IpAddr> {
        self.lock()
            .apps
            .get(&app)
            .map(|a| a.vips.clone())
            .unwrap_or_default()
    }

    fn resolve(&self, client: AppId, dst: SocketAddr) -> Result<Vec<UnixEndpoint>, ResolveError> {
        self.allowed_backends(&mut self.lock(), client, None, dst)
    }

    fn own_backends(&self, app: AppId, dst: SocketAddr) -> Vec<UnixEndpoint> {
        let st = self.lock();
        st.services
            .get(&(dst.ip(), dst.port()))
            .map(|s| {
                s.backends
                    .iter()
                    .filter(|b| b.app == app)
                    .map(|b| b.endpoint.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn host_loopback_service(&self, host: SocketAddr) -> Option<SocketAddr> {
        self.host_loopback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&host)
            .copied()
    }

    fn connect_wait(&self, app: AppId) -> Option<Duration> {
        self.lock().apps.get(&app).and_then(|a| a.connect_wait)
    }

    fn served_addr(&self, dst: SocketAddr) -> SocketAddr {
        self.lock().served_addr(dst)
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn wait_for_change(&self, seen: u64, until: Instant) -> u64 {
        let mut st = self.lock();
        while st.generation == seen {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.changes.wait_timeout(st, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        st.generation
    }

    fn bind(
        &self,
        req: &BindRequest,
        endpoint: &dyn Fn(u16) -> UnixEndpoint,
        is_alive: &dyn Fn(&UnixEndpoint) -> bool,
    ) -> Result<u16, BindError> {
        let mut st = self.lock();
        if !st.apps.contains_key(&req.app) {
            return Err(BindError::UnknownApp);
        }
        if req.ips.is_empty() {
            return Err(BindError::AddrNotAvailable);
        }
        // A port is free for this app when it holds no live listener there
        // on any of the IPs (other apps sharing the VIP add backends), or
        // when, as inet_bind_conflict has it, this one and every such
        // listener have SO_REUSEPORT and one owner.
        let mut stale = Vec::new();
        let port_free = |st: &State, port: u16, stale: &mut Vec<UnixEndpoint>| {
            let mut free = true;
            for &ip in &req.ips {
                for b in st
                    .services
                    .get(&(ip, port))
                    .map(|s| s.backends.as_slice())
                    .unwrap_or(&[])
                {
                    if !is_alive(&b.endpoint) {
                        stale.push(b.endpoint.clone());
                    } else if b.app == req.app {
                        let shares = req.reuseport.is_some()
                            && st.reuseport.get(&b.endpoint) == req.reuseport.as_ref();
                        free &= shares;
                    }
                }
            }
            free
        };
        let port = if req.port != 0 {
            if !port_free(&st, req.port, &mut stale) {
                return Err(BindError::AddrInUse);
            }
            req.port
        } else {
            let span = (EPHEMERAL_PORTS.1 - EPHEMERAL_PORTS.0) as u32 + 1;
            let mut chosen = None;
            for i in 0..span {
                let p = EPHEMERAL_PORTS.0
                    + ((st.next_port - EPHEMERAL_PORTS.0) as u32 + i).rem_euclid(span) as u16;
                // An ephemeral port is one nobody listens on.
                let taken = req.ips.iter().any(|&ip| {
                    st.services
                        .get(&(ip, p))
                        .is_some_and(|s| s.backends.iter().any(|b| is_alive(&b.endpoint)))
                });
                if !taken {
                    chosen = Some(p);
                    break;
                }
            }
            let p = chosen.ok_or(BindError::NoFreePort)?;
            st.next_port = if p == EPHEMERAL_PORTS.1 {
                EPHEMERAL_PORTS.0
            } else {
                p + 1
            };
            p
        };
        for service in st.services.values_mut() {
            service.backends.retain(|b| !stale.contains(&b.endpoint));
        }
        let ep = endpoint(port);
        for &ip in &req.ips {
            st.services
                .entry((ip, port))
                .or_default()
                .backends
                .push(Backend {
                    app: req.app,
                    endpoint: ep.clone(),
                });
        }
        st.services.retain(|_, s| !s.backends.is_empty());
        st.prune_reuseport();
        if let Some(uid) = req.reuseport {
            st.reuseport.insert(ep, uid);
        }
        self.notify(st);
        Ok(port)
    }

    fn release(&self, endpoint: &UnixEndpoint) {
        let mut st = self.lock();
        for service in st.services.values_mut() {
            service.backends.retain(|b| &b.endpoint != endpoint);
        }
        st.services.retain(|_, s| !s.backends.is_empty());
        st.prune_reuseport();
        self.notify(st);
    }

    fn app_exited(&self, app: AppId) {
        let mut st = self.lock();
        if let Some(info) = st.apps.remove(&app) {
            for ip in info.vips {
                if let Some(owners) = st.vip_owners.get_mut(&ip) {
                    owners.retain(|&o| o != app);
                    if owners.is_empty() {
                        st.vip_owners.remove(&ip);
                    }
                }
            }
        }
        for service in st.services.values_mut() {
            service.backends.retain(|b| b.app != app);
        }
        st.services.retain(|_, s| !s.backends.is_empty());
        st.prune_reuseport();
        self.notify(st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(tag: &str, port: u16) -> UnixEndpoint {
        UnixEndpoint::Abstract(format!("{tag}/{port}").into_bytes())
    }

    #[test]
    fn register_allocates_and_rejects_duplicates() {
        let r = LocalRegistry::default();
        let a = r.register_app(&AppSpec::default(), 0).unwrap();
        let b = r.register_app(&AppSpec::default(), 0).unwrap();
        assert_ne!(a.vips, b.vips);
        assert!(r.is_virtual(a.vips[0]));
        let spec = AppSpec {
            requested_ips: vec![a.vips[0]],
            ..AppSpec::default()
        };
        assert!(matches!(
            r.register_app(&spec, 0),
            Err(RegisterError::IpInUse { .. })
        ));
        r.app_exited(a.id);
        assert!(r.register_app(&spec, 0).is_ok());
        let lo = AppSpec {
            requested_ips: vec!["127.0.0.1".parse().unwrap()],
            ..AppSpec::default()
        };
        assert!(matches!(
            r.register_app(&lo, 0),
            Err(RegisterError::InvalidIp { .. })
        ));
    }

    #[test]
    fn bind_resolve_release() {
        let r = LocalRegistry::default();
        let a = r.register_app(&AppSpec::default(), 0).unwrap();
        let b = r.register_app(&AppSpec::default(), 0).unwrap();
        let ip = a.vips[0];
        let req = BindRequest {
            app: a.id,
            ips: vec![ip],
            port: 80,
            reuseport: None,
        };
        let alive = |_: &UnixEndpoint| true;
        assert_eq!(r.bind(&req, &|p| ep("a", p), &alive), Ok(80));
        assert_eq!(
            r.bind(&req, &|p| ep("a2", p), &alive),
            Err(BindError::AddrInUse)
        );
        let dst = SocketAddr::new(ip, 80);
        assert_eq!(r.resolve(b.id, dst), Ok(vec![ep("a", 80)]));
        // A dead listener is replaced.
        assert_eq!(r.bind(&req, &|p| ep("a3", p), &|_| false), Ok(80));
        assert_eq!(r.resolve(b.id, dst), Ok(vec![ep("a3", 80)]));
        r.release(&ep("a3", 80));
        assert!(r.resolve(b.id, dst).is_err());
        let eph = BindRequest { port: 0, ..req };
        let p = r.bind(&eph, &|p| ep("e", p), &alive).unwrap();
        assert!(p >= 32768);
        r.app_exited(a.id);
        assert!(r.services().is_empty());
    }

    #[test]
    fn reuseport_listeners_share_a_port_as_the_kernel_allows() {
        let r = LocalRegistry::default();
        let a = r.register_app(&AppSpec::default(), 0).unwrap();
        let b = r.register_app(&AppSpec::default(), 0).unwrap();
        let ip = a.vips[0];
        let alive = |_: &UnixEndpoint| true;
        let req = |reuseport| BindRequest {
            app: a.id,
            ips: vec![ip],
            port: 80,
            reuseport,
        };
        assert_eq!(r.bind(&req(Some(7)), &|p| ep("r1", p), &alive), Ok(80));
        assert_eq!(r.bind(&req(Some(7)), &|p| ep("r2", p), &alive), Ok(80));
        // Without the option, or of another uid: EADDRINUSE.
        for other in [None, Some(8)] {
            assert_eq!(
                r.bind(&req(other), &|p| ep("x", p), &alive),
                Err(BindError::AddrInUse)
            );
        }
        // Both are backends, taken in turn.
        let dst = SocketAddr::new(ip, 80);
        let first = r.resolve(b.id, dst).unwrap();
        let second = r.resolve(b.id, dst).unwrap();
        assert_eq!(first.len(), 2);
        assert_ne!(first[0], second[0]);
        // A listener without the option keeps the port to itself.
        r.release(&ep("r1", 80));
        r.release(&ep("r2", 80));
        assert_eq!(r.bind(&req(None), &|p| ep("n", p), &alive), Ok(80));
        assert_eq!(
            r.bind(&req(Some(7)), &|p| ep("r3", p), &alive),
            Err(BindError::AddrInUse)
        );
        r.release(&ep("n", 80));
        assert!(r.lock().reuseport.is_empty());
    }

    fn named(names: &[&str], ips: &[&str]) -> AppSpec {
        AppSpec {
            names: names.iter().map(|s| s.to_string()).collect(),
            requested_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ..AppSpec::default()
        }
    }

    #[test]
    fn apps_with_one_name_share_its_vip_and_services() {
        let r = LocalRegistry::default();
        let alive = |_: &UnixEndpoint| true;
        let a = r.register_app(&named(&["web"], &[]), 0).unwrap();
        let b = r.register_app(&named(&["web"], &[]), 0).unwrap();
        assert_eq!(a.vips, b.vips);
        // The same --ip joins too when the name matches…
        let c = r
            .register_app(&named(&["web"], &[&a.vips[0].to_string()]), 0)
            .unwrap();
        // …and is refused, with a hint, when it does not.
        let err = r
            .register_app(&named(&["other"], &[&a.vips[0].to_string()]), 0)
            .unwrap_err();
        assert!(err.to_string().contains("--name"), "{err}");
        // Asking for load balancing joins too.
        let mut lb = named(&[], &[&a.vips[0].to_string()]);
        lb.lb = Some(LbMode::RoundRobin);
        let d = r.register_app(&lb, 0).unwrap();
        assert_eq!(d.vips, vec![a.vips[0]]);
        r.app_exited(d.id);
        let ip = a.vips[0];
        for (app, tag) in [(a.id, "a"), (b.id, "b"), (c.id, "c")] {
            let req = BindRequest {
                app,
                ips: vec![ip],
                port: 80,
                reuseport: None,
            };
            assert_eq!(r.bind(&req, &|p| ep(tag, p), &alive), Ok(80));
            // One app cannot bind the same port twice.
            assert_eq!(
                r.bind(&req, &|p| ep(tag, p), &alive),
                Err(BindError::AddrInUse)
            );
        }
        let client = r.register_app(&AppSpec::default(), 0).unwrap();
        let dst = SocketAddr::new(ip, 80);
        let firsts: Vec<UnixEndpoint> = (0..6)
            .map(|_| r.resolve(client.id, dst).unwrap()[0].clone())
            .collect();
        assert_eq!(
            firsts,
            [
                ep("a", 80),
                ep("b", 80),
                ep("c", 80),
                ep("a", 80),
                ep("b", 80),
                ep("c", 80)
            ]
        );
        // Every backend is offered, the pick first.
        assert_eq!(r.resolve(client.id, dst).unwrap().len(), 3);
        let services = r.services();
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].backends.len(), 3);
        assert_eq!(services[0].names, vec!["web".to_string()]);
        // A backend that exits is never picked again.
        r.app_exited(b.id);
        for _ in 0..4 {
            assert_ne!(r.resolve(client.id, dst).unwrap()[0], ep("b", 80));
        }
        // The VIP stays while any app behind it lives.
        r.app_exited(a.id);
        assert!(r.lock().vip_owners.contains_key(&ip));
        r.app_exited(c.id);
        assert!(!r.lock().vip_owners.contains_key(&ip));
        assert!(r.resolve(client.id, dst).is_err());
    }

    #[test]
    fn random_mode_reaches_every_backend() {
        let r = LocalRegistry::default();
        let mut spec = named(&["db"], &[]);
        spec.lb = Some(LbMode::Random);
        let apps: Vec<AppInfo> = (0..3).map(|_| r.register_app(&spec, 0).unwrap()).collect();
        let ip = apps[0].vips[0];
        for (i, a) in apps.iter().enumerate() {
            let req = BindRequest {
                app: a.id,
                ips: vec![ip],
                port: 5432,
                reuseport: None,
            };
            r.bind(&req, &|p| ep(&i.to_string(), p), &|_| true).unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(r.resolve(0, SocketAddr::new(ip, 5432)).unwrap()[0].clone());
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(r.services()[0].lb, LbMode::Random);
    }

    #[test]
    fn own_backends_skip_the_policy_and_host_loopback_is_recorded() {
        let r = LocalRegistry::default();
        r.set_policy(Policy::from_toml("default = \"deny\"\n").unwrap());
        let app = r.register_app(&AppSpec::default(), 0).unwrap();
        let other = r.register_app(&AppSpec::default(), 0).unwrap();
        let ip = app.vips[0];
        let req = BindRequest {
            app: app.id,
            ips: vec![ip],
            port: 6379,
            reuseport: None,
        };
        r.bind(&req, &|p| ep("redis", p), &|_| true).unwrap();
        let dst = SocketAddr::new(ip, 6379);
        assert!(matches!(
            r.resolve(app.id, dst),
            Err(ResolveError::Denied { .. })
        ));
        assert_eq!(r.own_backends(app.id, dst), vec![ep("redis", 6379)]);
        assert!(r.own_backends(other.id, dst).is_empty());
        let host: SocketAddr = "127.0.0.1:6379".parse().unwrap();
        assert_eq!(r.host_loopback_service(host), None);
        r.set_host_loopback([(host, dst)].into_iter().collect());
        assert_eq!(r.host_loopback_service(host), Some(dst));
        let shown = r.services();
        assert_eq!(shown[0].host_loopback, Some(host));
    }

    #[test]
    fn labels_decide_by_default_and_policy_overrides() {
        let r = LocalRegistry::default();
        let labelled = |pairs: &[(&str, &str)]| AppSpec {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..AppSpec::default()
        };
        let server = r.register_app(&labelled(&[("tier", "db")]), 0).unwrap();
        let ip = server.vips[0];
        let req = BindRequest {
            app: server.id,
            ips: vec![ip],
            port: 5432,
            reuseport: None,
        };
        r.bind(&req, &|p| ep("db", p), &|_| true).unwrap();
        let dst = SocketAddr::new(ip, 5432);
        let friend = r.register_app(&labelled(&[("tier", "db")]), 0).unwrap();
        let stranger = r.register_app(&AppSpec::default(), 0).unwrap();
        assert!(r.resolve(friend.id, dst).is_ok());
        match r.resolve(stranger.id, dst) {
            Err(ResolveError::Denied {
                client,
                server: s,
                client_labels,
                rule,
                ..
            }) => {
                assert_eq!((client, s), (stranger.id, server.id));
                assert_eq!(
                    client_labels.get("zone").map(String::as_str),
                    Some("default")
                );
                assert!(rule.contains("default"), "{rule}");
            }
            other => panic!("expected a denial, got {other:?}"),
        }
        r.set_policy(
            Policy::from_toml(
                "default = \"deny\"\n[[allow]]\nname = \"any-to-db\"\nto = { tier = \"db\" }\nports = [5432]\n",
            )
            .unwrap(),
        );
        assert!(r.resolve(stranger.id, dst).is_ok());
    }

    #[test]
    fn apps_get_one_vip_of_each_family() {
        let r = LocalRegistry::default();
        let a = r.register_app(&AppSpec::default(), 0).unwrap();
        assert_eq!(a.vips.len(), 2, "{:?}", a.vips);
        assert!(a.vips[0].is_ipv4() && a.vips[1].is_ipv6(), "{:?}", a.vips);
        let b = r.register_app(&AppSpec::default(), 0).unwrap();
        assert!(a.vips.iter().all(|ip| !b.vips.contains(ip)));
        // --ip says otherwise.
        let c = r.register_app(&named(&[], &["10.233.9.9"]), 0).unwrap();
        assert_eq!(c.vips, vec!["10.233.9.9".parse::<IpAddr>().unwrap()]);
        // A daemon with an IPv4 pool only hands out IPv4 VIPs.
        let v4 = LocalRegistry::new(vec![VipPool::default_v4()]);
        assert_eq!(
            v4.register_app(&AppSpec::default(), 0).unwrap().vips.len(),
            1
        );
        // Unnamed VIPs are listed for the hosts file, named ones are not.
        let named_app = r.register_app(&named(&["web"], &[]), 0).unwrap();
        let unnamed: Vec<IpAddr> = r.unnamed_vips().into_iter().map(|(ip, _)| ip).collect();
        assert!(a.vips.iter().all(|ip| unnamed.contains(ip)));
        assert!(named_app.vips.iter().all(|ip| !unnamed.contains(ip)));
    }

    #[test]
    fn a_vip_without_a_listener_reaches_the_other_familys() {
        let r = LocalRegistry::default();
        let a = r.register_app(&AppSpec::default(), 0).unwrap();
        let (v4, v6) = (a.vips[0], a.vips[1]);
        let alive = |_: &UnixEndpoint| true;
        let req = |ips: Vec<IpAddr>, port| BindRequest {
            app: a.id,
            ips,
            port,
            reuseport: None,
        };
        // 0.0.0.0:80 only: reached at [v6]:80 too.
        r.bind(&req(vec![v4], 80), &|p| ep("v4", p), &alive)
            .unwrap();
        let at6 = SocketAddr::new(v6, 80);
        assert_eq!(r.resolve(0, at6), Ok(vec![ep("v4", 80)]));
        assert_eq!(r.served_addr(at6), SocketAddr::new(v4, 80));
        // A listener of the asked family wins.
        r.bind(&req(vec![v6], 80), &|p| ep("v6", p), &alive)
            .unwrap();
        assert_eq!(r.resolve(0, at6), Ok(vec![ep("v6", 80)]));
        assert_eq!(r.served_addr(at6), at6);
        // Nothing on either: refused, naming the address asked for.
        let none = SocketAddr::new(v6, 81);
        assert_eq!(r.resolve(0, none), Err(ResolveError::NoService(none)));
    }

    #[test]
    fn declared_services_resolve_before_their_apps() {
        let r = LocalRegistry::default();
        let db = r.declare("db", &[], Some(LbMode::Random), 1000).unwrap();
        assert_eq!(db.vips.len(), 2);
        assert!(r.is_virtual(db.vips[0]));
        assert!(r
            .names()
            .iter()
            .any(|n| n.name == "db" && n.vips == db.vips));
        // Shown with no backend yet.
        let services = r.services();
        assert_eq!(services.len(), 2);
        assert!(services
            .iter()
            .all(|s| s.backends.is_empty() && s.addr.port() == 0));
        assert_eq!(services[0].names, vec!["db".to_string()]);
        assert_eq!(services[0].lb, LbMode::Random);
        // Its VIPs are reserved: never allocated, refused to other names.
        for _ in 0..4 {
            let other = r.register_app(&AppSpec::default(), 0).unwrap();
            assert!(other.vips.iter().all(|ip| !db.vips.contains(ip)));
        }
        let ip = db.vips[0].to_string();
        assert!(matches!(
            r.register_app(&named(&["web"], &[&ip]), 0),
            Err(RegisterError::IpDeclared { .. })
        ));
        // An app named after it takes its VIPs; another --ip is refused.
        let err = r
            .register_app(&named(&["db"], &["10.233.77.1"]), 0)
            .unwrap_err();
        assert!(matches!(err, RegisterError::DeclaredElsewhere { .. }));
        assert!(err.to_string().contains(&ip), "{err}");
        let backend = r.register_app(&named(&["db"], &[]), 1000).unwrap();
        assert_eq!(backend.vips, db.vips);
        assert_eq!(backend.lb, Some(LbMode::Random));
        assert!(r.register_app(&named(&["db"], &[&ip]), 0).is_ok());
        // Declared twice, or deleted while it has apps: refused.
        assert!(matches!(
            r.declare("db", &[], None, 1000),
            Err(DeclareError::Exists(_))
        ));
        assert!(matches!(
            r.undeclare("db", false, 1000),
            Err(DeclareError::HasBackends { .. })
        ));
        assert!(matches!(
            r.undeclare("db", true, 1001),
            Err(DeclareError::NotYours(_))
        ));
        // The VIPs outlive the apps while the name is declared.
        for app in r.apps() {
            r.app_exited(app.id);
        }
        assert!(r.names().iter().any(|n| n.name == "db"));
        let snap = r.snapshot();
        assert_eq!(snap.declared.len(), 1);
        r.undeclare("db", false, 1000).unwrap();
        assert!(r.names().is_empty());
        assert!(r.services().is_empty());
        // A successor keeps declarations.
        let successor = LocalRegistry::default();
        successor.restore(&snap, &|_| true);
        assert_eq!(successor.declared(), snap.declared);
        // Names are host names; explicit VIPs are checked.
        assert!(matches!(
            r.declare("Bad Name", &[], None, 0),
            Err(DeclareError::InvalidName { .. })
        ));
        assert!(r
            .declare("lo", &["127.0.0.1".parse().unwrap()], None, 0)
            .is_err());
        let fixed = r
            .declare("cache", &["10.233.50.50".parse().unwrap()], None, 0)
            .unwrap();
        assert_eq!(fixed.vips.len(), 1);
        // Declaring a name that apps already have keeps their VIPs.
        let web = r.register_app(&named(&["web"], &[]), 0).unwrap();
        assert!(matches!(
            r.declare("web", &["10.233.60.1".parse().unwrap()], None, 0),
            Err(DeclareError::RunningElsewhere { .. })
        ));
        assert_eq!(r.declare("web", &[], None, 0).unwrap().vips, web.vips);
    }

    #[test]
    fn waiting_for_a_change_wakes_on_bind() {
        let r = std::sync::Arc::new(LocalRegistry::default());
        let a = r.register_app(&AppSpec::default(), 0).unwrap();
        let seen = r.generation();
        let r2 = r.clone();
        let waiter = std::thread::spawn(move || {
            r2.wait_for_change(seen, Instant::now() + Duration::from_secs(10))
        });
        let req = BindRequest {
            app: a.id,
            ips: a.vips.clone(),
            port: 1,
            reuseport: None,
        };
        r.bind(&req, &|p| ep("x", p), &|_| true).unwrap();
        assert!(waiter.join().unwrap() > seen);
        // Nothing changes: the wait ends at its deadline.
        let now = r.generation();
        assert_eq!(
            r.wait_for_change(now, Instant::now() + Duration::from_millis(20)),
            now
        );
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;
    use std::sync::Arc;

    /// Another host holds 10.233.5.2 (app "web") and this host allocates
    /// from 10.233.5.x.
    #[derive(Debug)]
    struct Elsewhere;

    impl crate::VipClaims for Elsewhere {
        fn range(&self, pool: &VipPool) -> Option<(u128, u128)> {
            pool.is_ipv4().then_some((5 * 256, 256))
        }
        fn held_elsewhere(&self, ip: IpAddr, names: &[String], replica: bool) -> Option<String> {
            let web = names.iter().any(|n| n == "web");
            (ip == "10.233.5.2".parse::<IpAddr>().unwrap() && !web && !replica)
                .then(|| "b".to_string())
        }
        fn taken_elsewhere(&self, ip: IpAddr) -> bool {
            ip == "10.233.5.2".parse::<IpAddr>().unwrap()
        }
        fn vips_of_name(&self, names: &[String]) -> Option<Vec<IpAddr>> {
            names
                .iter()
                .any(|n| n == "web")
                .then(|| vec!["10.233.5.2".parse().unwrap()])
        }
    }

    fn spec(names: &[&str], ips: &[&str]) -> AppSpec {
        AppSpec {
            names: names.iter().map(|s| s.to_string()).collect(),
            requested_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ..AppSpec::default()
        }
    }

    #[test]
    fn allocation_keeps_to_this_hosts_block_and_skips_vips_held_elsewhere() {
        let r = LocalRegistry::new(vec![VipPool::default_v4()]);
        r.set_claims(Arc::new(Elsewhere));
        let a = r.register_app(&spec(&[], &[]), 0).unwrap();
        assert_eq!(a.vips, vec!["10.233.5.3".parse::<IpAddr>().unwrap()]);
        let b = r.register_app(&spec(&[], &[]), 0).unwrap();
        assert_eq!(b.vips, vec!["10.233.5.4".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn an_explicit_ip_held_elsewhere_is_refused_unless_a_replica() {
        let r = LocalRegistry::new(vec![VipPool::default_v4()]);
        r.set_claims(Arc::new(Elsewhere));
        assert_eq!(
            r.register_app(&spec(&["db"], &["10.233.5.2"]), 0),
            Err(RegisterError::HeldElsewhere {
                ip: "10.233.5.2".parse().unwrap(),
                node: "b".into()
            })
        );
        let replica = r.register_app(&spec(&["web"], &["10.233.5.2"]), 0).unwrap();
        assert_eq!(replica.vips, vec!["10.233.5.2".parse::<IpAddr>().unwrap()]);
        // Named like the app elsewhere: its VIPs, without --ip.
        let named = r.register_app(&spec(&["web"], &[]), 0).unwrap();
        assert_eq!(named.vips, vec!["10.233.5.2".parse::<IpAddr>().unwrap()]);
    }
}
