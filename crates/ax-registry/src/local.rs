//! The single-host registry kept in the daemon's memory.

use crate::{
    AppId, AppInfo, AppSpec, BindError, BindRequest, Directory, RegisterError, ResolveError,
    ServiceInfo, UnixEndpoint, VipPool,
};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// First and last port handed out for `bind(…:0)`, as Linux's default
/// `ip_local_port_range`.
const EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);

#[derive(Debug)]
struct Service {
    owner: AppId,
    endpoint: UnixEndpoint,
}

#[derive(Debug, Default)]
struct State {
    next_app: AppId,
    apps: BTreeMap<AppId, AppInfo>,
    vip_owner: HashMap<IpAddr, AppId>,
    services: BTreeMap<(IpAddr, u16), Service>,
    next_pool_host: u128,
    next_port: u16,
}

/// An in-memory registry for one host.
#[derive(Debug)]
pub struct LocalRegistry {
    pools: Vec<VipPool>,
    state: Mutex<State>,
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
            if info.vips.iter().any(|ip| st.vip_owner.contains_key(ip)) {
                continue;
            }
            for &ip in &info.vips {
                st.vip_owner.insert(ip, info.id);
            }
            st.next_app = st.next_app.max(info.id + 1);
            st.apps.insert(info.id, info.clone());
            restored.push(info.id);
        }
        restored
    }

    /// Re-registers an app a launcher hands over after a daemon restart,
    /// with the id and VIPs it had. Succeeds when the app is already known
    /// with the same VIPs (restored from a snapshot).
    pub fn readopt_app(&self, info: &AppInfo) -> Result<(), RegisterError> {
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
            if let Some(&owner) = st.vip_owner.get(&ip) {
                return Err(RegisterError::IpInUse { ip, owner });
            }
        }
        for &ip in &info.vips {
            st.vip_owner.insert(ip, info.id);
        }
        st.next_app = st.next_app.max(info.id + 1);
        st.apps.insert(info.id, info.clone());
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
            st.services.entry((ip, port)).or_insert_with(|| {
                added = true;
                Service {
                    owner: app,
                    endpoint: endpoint.clone(),
                }
            });
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
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the daemon; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pools VIPs come from.
    pub fn pools(&self) -> &[VipPool] {
        &self.pools
    }

    /// Registers a new app for user `uid`, reserving its VIPs.
    pub fn register_app(&self, spec: &AppSpec, uid: u32) -> Result<AppInfo, RegisterError> {
        let mut st = self.lock();
        let mut vips = Vec::new();
        for &ip in &spec.requested_ips {
            validate_vip(ip)?;
            if let Some(&owner) = st.vip_owner.get(&ip) {
                return Err(RegisterError::IpInUse { ip, owner });
            }
            if !vips.contains(&ip) {
                vips.push(ip);
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
                if !st.vip_owner.contains_key(&ip) {
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
            st.vip_owner.insert(ip, id);
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
        };
        st.apps.insert(id, info.clone());
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

    /// All services, by address.
    pub fn services(&self) -> Vec<ServiceInfo> {
        self.lock()
            .services
            .iter()
            .map(|(&(ip, port), s)| ServiceInfo {
                addr: SocketAddr::new(ip, port),
                owner: s.owner,
                endpoint: s.endpoint.clone(),
            })
            .collect()
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
        self.lock().vip_owner.contains_key(&ip)
    }

    fn app_vips(&self, app: AppId) -> Vec<IpAddr> {
        self.lock()
            .apps
            .get(&app)
            .map(|a| a.vips.clone())
            .unwrap_or_default()
    }

    fn resolve(&self, _client: AppId, dst: SocketAddr) -> Result<UnixEndpoint, ResolveError> {
        self.lock()
            .services
            .get(&(dst.ip(), dst.port()))
            .map(|s| s.endpoint.clone())
            .ok_or(ResolveError::NoService(dst))
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
        // A port is free when no live listener holds it on any of the IPs.
        let mut stale = Vec::new();
        let port_free = |st: &State, port: u16, stale: &mut Vec<(IpAddr, u16)>| {
            let mut free = true;
            for &ip in &req.ips {
                if let Some(s) = st.services.get(&(ip, port)) {
                    if is_alive(&s.endpoint) {
                        free = false;
                    } else {
                        stale.push((ip, port));
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
                if port_free(&st, p, &mut stale) {
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
        for key in stale {
            st.services.remove(&key);
        }
        let ep = endpoint(port);
        for &ip in &req.ips {
            st.services.insert(
                (ip, port),
                Service {
                    owner: req.app,
                    endpoint: ep.clone(),
                },
            );
        }
        Ok(port)
    }

    fn release(&self, endpoint: &UnixEndpoint) {
        self.lock().services.retain(|_, s| &s.endpoint != endpoint);
    }

    fn app_exited(&self, app: AppId) {
        let mut st = self.lock();
        if let Some(info) = st.apps.remove(&app) {
            for ip in info.vips {
                if st.vip_owner.get(&ip) == Some(&app) {
                    st.vip_owner.remove(&ip);
                }
            }
        }
        st.services.retain(|_, s| s.owner != app);
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
        assert_eq!(r.resolve(b.id, dst), Ok(ep("a", 80)));
        // A dead listener is replaced.
        assert_eq!(r.bind(&req, &|p| ep("a3", p), &|_| false), Ok(80));
        assert_eq!(r.resolve(b.id, dst), Ok(ep("a3", 80)));
        r.release(&ep("a3", 80));
        assert!(r.resolve(b.id, dst).is_err());
        let eph = BindRequest { port: 0, ..req };
        let p = r.bind(&eph, &|p| ep("e", p), &alive).unwrap();
        assert!(p >= 32768);
        r.app_exited(a.id);
        assert!(r.services().is_empty());
    }
}
