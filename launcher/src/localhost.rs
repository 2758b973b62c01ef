//! Host loopback for wildcard listeners: a program under ax that listens
//! on `0.0.0.0:P` or `[::]:P` is reachable from outside ax at
//! `127.0.0.1:P` / `[::1]:P`, as it would be natively, whenever that host
//! port is free.
//!
//! The daemon listens there and hands every connection to the server
//! through the broker's doorbell, as `ax expose` does
//! ([`crate::expose`]): it only accepts; the server's `accept` returns the
//! TCP connection itself with the real client address. A port taken (by
//! another app, or by a program outside ax) is logged once; the service's
//! VIP works all the same, and the port is tried again while the service
//! lives. Programs under ax that connect there are sent to the service
//! as to its VIP, policy included (see
//! [`ax_registry::Directory::host_loopback_service`]); only programs
//! outside ax use the daemon's listener. The listeners follow the registry: one comes with a wildcard
//! service, and goes with it. A privileged port (below
//! `net.ipv4.ip_unprivileged_port_start`) is taken only for an app of
//! root, as natively.

use ax_broker::{Broker, SocketName};
use ax_registry::{AppId, Directory, LocalRegistry, UnixEndpoint};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often the listeners are checked against the services even when the
/// registry did not change (a program may close its listener silently).
const RECHECK: Duration = Duration::from_secs(1);

/// One host loopback address the daemon listens on for a service.
struct Held {
    app: AppId,
    service: SocketAddr,
    accepting: tokio::task::AbortHandle,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// The daemon's host loopback listeners, by host address.
#[derive(Default)]
pub struct HostLoopback {
    held: Mutex<HashMap<SocketAddr, Held>>,
    /// (app, host address) whose taken port was logged already.
    told: Mutex<HashSet<(AppId, SocketAddr)>>,
}

impl std::fmt::Debug for HostLoopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLoopback").finish_non_exhaustive()
    }
}

/// The host loopback address of a wildcard service at `service`.
fn host_of(service: SocketAddr) -> SocketAddr {
    let ip = match service.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    SocketAddr::new(ip, service.port())
}

/// Whether `endpoint` is a listener of `app` that the program bound to a
/// wildcard address (`0.0.0.0` or `::`), made by this broker `instance`.
fn is_wildcard_listener(instance: u32, app: AppId, endpoint: &UnixEndpoint) -> bool {
    let UnixEndpoint::Abstract(name) = endpoint else {
        return false;
    };
    matches!(
        SocketName::parse(name),
        Some(SocketName::Listener { instance: i, app: a, bound, .. })
            if i == instance && a == app && bound.ip().is_unspecified()
    )
}

impl HostLoopback {
    fn held(&self) -> MutexGuard<'_, HashMap<SocketAddr, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the listeners in line with the registry's wildcard services.
    /// Must run inside the daemon's tokio runtime.
    pub fn sync(&self, registry: &Arc<LocalRegistry>, broker: &Broker) {
        let instance = broker.config().instance;
        // Each service with a live wildcard backend, under its host
        // loopback address: (app, service), in the services' order.
        let mut candidates: HashMap<SocketAddr, Vec<(AppId, SocketAddr)>> = HashMap::new();
        let mut services = registry.services();
        services.sort_by_key(|s| s.addr);
        for s in &services {
            if s.addr.port() == 0 {
                continue;
            }
            let live = s.backends.iter().find(|b| {
                is_wildcard_listener(instance, b.app, &b.endpoint)
                    && broker.listener_alive(&b.endpoint)
            });
            if let Some(b) = live {
                candidates
                    .entry(host_of(s.addr))
                    .or_default()
                    .push((b.app, s.addr));
            }
        }
        // A program of an unprivileged user cannot bind a privileged port
        // natively: nor does the daemon (perhaps root) for it.
        let first_unprivileged = unprivileged_port_start();
        let uids: HashMap<AppId, u32> = registry.apps().iter().map(|a| (a.id, a.uid)).collect();
        for wanting in candidates.values_mut() {
            wanting.retain(|(app, service)| {
                service.port() >= first_unprivileged || uids.get(app) == Some(&0)
            });
        }
        candidates.retain(|_, wanting| !wanting.is_empty());
        let mut held = self.held();
        held.retain(|host, h| {
            let keep = candidates
                .get(host)
                .is_some_and(|c| c.contains(&(h.app, h.service)));
            if !keep {
                tracing::info!(app = h.app, service = %h.service, %host, "host loopback listener closed");
            }
            keep
        });
        let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
        told.retain(|(app, host)| {
            candidates
                .get(host)
                .is_some_and(|c| c.iter().any(|(a, _)| a == app))
        });
        for (host, wanting) in candidates {
            for (app, service) in wanting {
                let holder = held.get(&host).map(|h| h.app);
                if holder == Some(app) {
                    continue;
                }
                if let Some(other) = holder {
                    if told.insert((app, host)) {
                        tracing::info!(
                            app, %service, %host, holder_app = other,
                            "host loopback port held by another app; the service is on its VIP only"
                        );
                    }
                    continue;
                }
                match listen(registry, broker, host, service) {
                    Ok(accepting) => {
                        tracing::info!(app, %service, %host, "service also on host loopback");
                        told.remove(&(app, host));
                        held.insert(
                            host,
                            Held {
                                app,
                                service,
                                accepting,
                            },
                        );
                    }
                    Err(e) if told.insert((app, host)) => {
                        if e.kind() == io::ErrorKind::AddrInUse {
                            tracing::info!(
                                app, %service, %host,
                                "host loopback port taken by a program outside ax; the service is on its VIP only"
                            );
                        } else {
                            tracing::info!(
                                app, %service, %host, error = %e,
                                "cannot listen on host loopback; the service is on its VIP only"
                            );
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        registry.set_host_loopback(held.iter().map(|(host, h)| (*host, h.service)).collect());
    }

    /// Follows the registry until the task is aborted: syncs at each
    /// change, and every [`RECHECK`].
    pub async fn watch(self: Arc<Self>, registry: Arc<LocalRegistry>, broker: Broker) {
        let mut seen = registry.generation();
        loop {
            self.sync(&registry, &broker);
            let r = registry.clone();
            match tokio::task::spawn_blocking(move || {
                r.wait_for_change(seen, Instant::now() + RECHECK)
            })
            .await
            {
                Ok(now) => seen = now,
                Err(_) => return,
            }
        }
    }
}

/// The first port an unprivileged program may bind
/// (`net.ipv4.ip_unprivileged_port_start`, 1024 if unreadable).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Listens on `host` for `service`, handing connections over as an
/// exposure does.
fn listen(
    registry: &Arc<LocalRegistry>,
    broker: &Broker,
    host: SocketAddr,
    service: SocketAddr,
) -> io::Result<tokio::task::AbortHandle> {
    let std_listener = std::net::TcpListener::bind(host)?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let (registry, broker) = (registry.clone(), broker.clone());
    let task = tokio::spawn(async move {
        crate::expose::accept_loop(listener, service, registry, broker).await
    });
    Ok(task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_of_each_family() {
        assert_eq!(
            host_of("10.233.0.4:6379".parse().unwrap()),
            "127.0.0.1:6379".parse().unwrap()
        );
        assert_eq!(
            host_of("[fd00:a8::4]:6379".parse().unwrap()),
            "[::1]:6379".parse().unwrap()
        );
    }

    #[test]
    fn only_wildcard_listeners_of_the_app() {
        let name = |app, bound: &str| {
            UnixEndpoint::Abstract(
                SocketName::Listener {
                    instance: 7,
                    v6: false,
                    app,
                    bound: bound.parse().unwrap(),
                    reuseport: None,
                }
                .encode(),
            )
        };
        assert!(is_wildcard_listener(7, 3, &name(3, "0.0.0.0:80")));
        assert!(is_wildcard_listener(7, 3, &name(3, "[::]:80")));
        assert!(!is_wildcard_listener(7, 3, &name(3, "10.233.0.4:80")));
        assert!(!is_wildcard_listener(7, 4, &name(3, "0.0.0.0:80")));
        assert!(!is_wildcard_listener(8, 3, &name(3, "0.0.0.0:80")));
        assert!(!is_wildcard_listener(
            7,
            3,
            &UnixEndpoint::Path("/tmp/x".into())
        ));
    }
}
