//! Exposed services: the daemon listens on a host address and hands every
//! connection to a service's server through the broker's doorbell
//! ([`ax_broker::Broker::deliver_connection`]). The daemon only accepts;
//! the server's `accept` returns the TCP connection itself, so data never
//! passes through the daemon and the server sees the real client address.

use crate::cli::ExposeArgs;
use crate::get::connect_to_daemon;
use anyhow::bail;
use ax_broker::Broker;
use ax_proto::{ExposureInfo, Request, Response};
use ax_registry::{AppId, LocalRegistry};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

struct Exposure {
    info: ExposureInfo,
    accepting: tokio::task::AbortHandle,
}

/// The daemon's exposures.
#[derive(Default)]
pub struct Exposures {
    list: Mutex<Vec<Exposure>>,
}

impl std::fmt::Debug for Exposures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.lock().iter().map(|e| &e.info))
            .finish()
    }
}

/// Why a service could not be exposed.
#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    /// The name or VIP is not known.
    #[error("no app is named or has the virtual IP '{0}' (see 'ax get apps')")]
    UnknownTarget(String),
    /// The host address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The host address.
        addr: SocketAddr,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Nothing exposed there.
    #[error("nothing is exposed at {0} (see 'ax get exposures')")]
    NotExposed(SocketAddr),
}

/// The VIP `target` (a name, `name.ax`, or an address) stands for.
pub fn resolve_target(registry: &LocalRegistry, target: &str) -> Option<(IpAddr, Option<String>)> {
    if let Ok(ip) = target.parse::<IpAddr>() {
        let held = registry.apps().iter().any(|a| a.vips.contains(&ip))
            || registry.declared().iter().any(|d| d.vips.contains(&ip));
        return held.then_some((ip, None));
    }
    let name = target.strip_suffix(".ax").unwrap_or(target);
    let entry = registry.names().into_iter().find(|e| e.name == name)?;
    let ip = *entry.vips.first()?;
    Some((ip, Some(name.to_string())))
}

impl Exposures {
    fn lock(&self) -> MutexGuard<'_, Vec<Exposure>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Listens on `host` for the service at `vip`:`port`. Must run inside
    /// the daemon's tokio runtime.
    pub fn add(
        &self,
        registry: &Arc<LocalRegistry>,
        broker: &Broker,
        service: SocketAddr,
        name: Option<String>,
        host: SocketAddr,
        owner: Option<AppId>,
    ) -> Result<ExposureInfo, ExposeError> {
        let listen_error = |source| ExposeError::Listen { addr: host, source };
        let std_listener = std::net::TcpListener::bind(host).map_err(listen_error)?;
        std_listener.set_nonblocking(true).map_err(listen_error)?;
        let bound = std_listener.local_addr().map_err(listen_error)?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(listen_error)?;
        let info = ExposureInfo {
            service,
            name,
            host: bound,
            owner,
        };
        let (registry, broker) = (registry.clone(), broker.clone());
        let task =
            tokio::spawn(async move { accept_loop(listener, service, registry, broker).await });
        tracing::info!(service = %service, host = %bound, ?owner, "service exposed");
        self.lock().push(Exposure {
            info: info.clone(),
            accepting: task.abort_handle(),
        });
        Ok(info)
    }

    /// Stops listening on `host`.
    pub fn remove(&self, host: SocketAddr) -> Result<(), ExposeError> {
        let mut list = self.lock();
        let before = list.len();
        list.retain(|e| {
            let keep = e.info.host != host;
            if !keep {
                e.accepting.abort();
                tracing::info!(service = %e.info.service, host = %host, "exposure removed");
            }
            keep
        });
        if list.len() == before {
            return Err(ExposeError::NotExposed(host));
        }
        Ok(())
    }

    /// Every exposure.
    pub fn list(&self) -> Vec<ExposureInfo> {
        self.lock().iter().map(|e| e.info.clone()).collect()
    }

    /// Ends the exposures whose app exited, or whose VIP nobody holds (no
    /// app, no declared service).
    pub fn reap(&self, registry: &LocalRegistry) {
        let apps = registry.apps();
        let declared = registry.declared();
        self.lock().retain(|e| {
            let ip = e.info.service.ip();
            let live = match e.info.owner {
                Some(app) => apps.iter().any(|a| a.id == app),
                // A declared service's VIP is held until it is deleted.
                None => {
                    apps.iter().any(|a| a.vips.contains(&ip))
                        || declared.iter().any(|d| d.vips.contains(&ip))
                }
            };
            if !live {
                e.accepting.abort();
                tracing::info!(service = %e.info.service, host = %e.info.host, "exposure ended with its app");
            }
            live
        });
    }
}

pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    service: SocketAddr,
    registry: Arc<LocalRegistry>,
    broker: Broker,
) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(%service, error = %e, "accepting on an exposed port failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn: OwnedFd = match stream.into_std() {
            Ok(s) => {
                // The server decides its own blocking mode at accept.
                let _ = s.set_nonblocking(false);
                s.into()
            }
            Err(_) => continue,
        };
        let handed = match registry.backends(service) {
            Ok(endpoints) => broker
                .deliver_connection(conn, &endpoints)
                .map_err(|e| e.to_string()),
            Err(e) => {
                refuse(conn);
                Err(e.to_string())
            }
        };
        match handed {
            Ok(()) => tracing::debug!(%service, %client, "exposed connection handed over"),
            Err(e) => tracing::info!(%service, %client, error = %e, "exposed connection refused"),
        }
    }
}

/// Closes `conn` with a reset, as a closed port would answer.
fn refuse(conn: OwnedFd) {
    let _ = rustix::net::sockopt::set_socket_linger(&conn, Some(Duration::ZERO));
}

/// Runs `ax expose`; returns the exit status.
pub fn run(args: ExposeArgs) -> anyhow::Result<i32> {
    let mut client = connect_to_daemon(args.socket.socket.as_deref())?;
    let request = match (args.remove, args.service, args.host) {
        (Some(host), _, _) => Request::Unexpose { host },
        (None, Some((target, port)), Some(host)) => Request::Expose {
            target,
            port,
            host,
            owner: None,
        },
        _ => bail!("give SERVICE and HOSTADDR:HOSTPORT, or --remove HOSTADDR:HOSTPORT"),
    };
    match client.call(&request)? {
        Response::Exposed(info) => {
            let name = info
                .name
                .as_ref()
                .map(|n| format!("{n}:{} ", info.service.port()))
                .unwrap_or_default();
            println!("{name}({}) is exposed at {}", info.service, info.host);
            Ok(0)
        }
        Response::Unexposed => Ok(0),
        Response::Error(e) => Err(crate::Failure::new(1, e).into()),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}
