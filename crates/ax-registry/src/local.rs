//! The single-host registry kept in the daemon's memory: apps, their VIPs
//! and names (apps that share a name share its VIP and its services), the
//! services with their backends, and the policy that decides who may
//! connect to whom.

use crate::policy::{effective_labels, Policy};
use crate::{
    AppId, AppInfo, AppSpec, Backend, BindError, BindRequest, Directory, LbMode, RegisterError,
    ResolveError, ServiceInfo, UnixEndpoint, VipPool,
};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First and last port handed out for `bind(…:0)`, as Linux's default
/// `ip_local_port_range`.
const EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);

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
    next_pool_host: u128,
    next_port: u16,
    generation: u64,
    random: u64,
}

impl State {
    fn changed(&mut self) {
        self.generation += 1;
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
            .unwrap_or_default()
    }

    fn names_of(&self, ip: IpAddr) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for o in self.vip_owners.get(&ip).into_iter().flatten() {
            for n in self.apps.get(o).map(|a| a.names.as_slice()).unwrap_or(&[]) {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
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
        }
    }

    /// Takes over apps from a predecessor's snapshot; `keep` decides which
    /// (e.g. those whose program still runs). Returns the apps restored.
    pub fn restore(&self, snap: &Snapshot, keep: &dyn Fn(&AppInfo) -> bool) -> Vec<AppId> {
        let mut st = self.lock();
        st.next_app = st.next_app.max(snap.next_app);
        let mut restored = Vec::new();
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
    ) -> bool {
        let mut st = self.lock();
        if !st.apps.contains_key(&app) {
            return false;
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
        }
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
        let mut vips = Vec::new();
        for &ip in &spec.requested_ips {
            validate_vip(ip)?;
            if let Some(owner) = st.conflicting_owner(ip, &spec.names, spec.lb.is_some()) {
                return Err(RegisterError::IpInUse { ip, owner });
            }
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
        if vips.is_empty() {
            if let Some(shared) = st.vips_of_name(&spec.names) {
                vips = shared;
            }
        }
        if vips.is_empty() {
            let pool = self
                .pools
                .iter()
                .find(|p| p.is_ipv4())
                .or_else(|| self.pools.first())
                .ok_or_else(|| RegisterError::PoolExhausted("(no pool configured)".into()))?;
            let cap = pool.capacity();
            let mut found = None;
            for i in 0..cap.min(1 << 24) {
                let n = (st.next_pool_host + i) % cap;
                let Some(ip) = pool.host(n) else { continue };
                if !st.vip_owners.contains_key(&ip) {
                    found = Some((ip, n));
                    break;
                }
            }
            let (ip, n) = found.ok_or_else(|| RegisterError::PoolExhausted(pool.to_string()))?;
            st.next_pool_host = n + 1;
            vips.push(ip);
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
            lb: spec.lb,
            connect_wait: spec.connect_wait,
        };
        st.apps.insert(id, info.clone());
        self.notify(st);
        Ok(info)
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

    /// All services, by address, each with its backends.
    pub fn services(&self) -> Vec<ServiceInfo> {
        let st = self.lock();
        st.services
            .iter()
            .filter(|(_, s)| !s.backends.is_empty())
            .map(|(&(ip, port), s)| ServiceInfo {
                addr: SocketAddr::new(ip, port),
                names: st.names_of(ip),
                lb: st.lb_of(ip),
                backends: s.backends.clone(),
            })
            .collect()
    }
}

/// The backends of `dst` in the order to try them: the load balancer's
/// pick first, then the others.
fn pick(st: &mut State, dst: SocketAddr) -> Result<Vec<Backend>, ResolveError> {
    let lb = st.lb_of(dst.ip());
    let random = match lb {
        LbMode::RoundRobin => None,
        LbMode::Random => Some(st.next_random()),
    };
    let service = st
        .services
        .get_mut(&(dst.ip(), dst.port()))
        .filter(|s| !s.backends.is_empty())
        .ok_or(ResolveError::NoService(dst))?;
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
        self.lock().vip_owners.contains_key(&ip)
    }

    fn app_vips(&self, app: AppId) -> Vec<IpAddr> {
        self.lock()
            .apps
            .get(&app)
            .map(|a| a.vips.clone())
            .unwrap_or_default()
    }

    fn resolve(&self, client: AppId, dst: SocketAddr) -> Result<Vec<UnixEndpoint>, ResolveError> {
        let mut st = self.lock();
        let ordered = pick(&mut st, dst)?;
        // Policy: judged against the picked backend's labels; backends of
        // one service share a name, and normally their labels.
        let no_labels = BTreeMap::new();
        let client_labels = st
            .apps
            .get(&client)
            .map(|a| &a.labels)
            .unwrap_or(&no_labels);
        let server = ordered[0].app;
        let server_labels = st
            .apps
            .get(&server)
            .map(|a| &a.labels)
            .unwrap_or(&no_labels);
        let policy = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        let decision = policy.decide(client_labels, server_labels, dst.port());
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

    fn connect_wait(&self, app: AppId) -> Option<Duration> {
        self.lock().apps.get(&app).and_then(|a| a.connect_wait)
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
        // on any of the IPs (other apps sharing the VIP add backends).
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
                        free = false;
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
        self.notify(st);
        Ok(port)
    }

    fn release(&self, endpoint: &UnixEndpoint) {
        let mut st = self.lock();
        for service in st.services.values_mut() {
            service.backends.retain(|b| &b.endpoint != endpoint);
        }
        st.services.retain(|_, s| !s.backends.is_empty());
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
        assert_eq!(d.vips, a.vips);
        r.app_exited(d.id);
        let ip = a.vips[0];
        for (app, tag) in [(a.id, "a"), (b.id, "b"), (c.id, "c")] {
            let req = BindRequest {
                app,
                ips: vec![ip],
                port: 80,
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
