//! `ax get apps|services`: ask the daemon and print a table or JSON.

use crate::cli::{GetArgs, Output, Resource};
use crate::client::{Client, ConnectError};
use crate::{paths, table, Failure};
use anyhow::bail;
use ax_proto::{Request, Response};
use ax_registry::{AppId, ServiceInfo};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Connects to a running daemon (never starts one).
pub fn connect_to_daemon(socket: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let path = paths::socket_path(socket)?;
    match Client::connect(&path) {
        Ok(c) => Ok(c),
        Err(ConnectError::NoDaemon(p)) => Err(Failure::new(
            1,
            format!(
                "no daemon is listening on {} (start one with 'ax daemon'; 'ax exec' also \
                 starts one)",
                p.display()
            ),
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `ax get`; returns the exit status.
pub fn run(args: GetArgs) -> anyhow::Result<i32> {
    let mut client = connect_to_daemon(args.socket.socket.as_deref())?;
    let request = match args.resource {
        Resource::Apps => Request::ListApps,
        Resource::Services => Request::ListServices,
        Resource::Exposures => Request::ListExposures,
        Resource::Nodes => Request::ListNodes,
    };
    let answer = client.call(&request)?;
    // With --cluster, apps and services of every node, each with its node.
    let nodes = match args.resource {
        Resource::Apps | Resource::Services => match client.call(&Request::ListNodes) {
            Ok(Response::Nodes(nodes)) => nodes,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let out = match (answer, args.output) {
        (Response::Nodes(n), Output::Json) => crate::nodes::nodes_json(&n)?,
        (Response::Nodes(n), Output::Table) if n.is_empty() => {
            eprintln!("This daemon is not part of a cluster (start it with --cluster).");
            String::new()
        }
        (Response::Nodes(n), Output::Table) => crate::nodes::nodes_table(&n),
        (Response::Apps(apps), Output::Json) if !nodes.is_empty() => {
            crate::nodes::apps_json(&apps, &nodes)?
        }
        (Response::Apps(apps), Output::Json) => serde_json::to_string_pretty(&apps)? + "\n",
        (Response::Services(s), Output::Json) => {
            let view = ServiceView::cluster(&s, &nodes);
            serde_json::to_string_pretty(&view)? + "\n"
        }
        (Response::Exposures(e), Output::Json) => serde_json::to_string_pretty(&e)? + "\n",
        (Response::Exposures(e), Output::Table) if e.is_empty() => {
            eprintln!("Nothing is exposed.");
            String::new()
        }
        (Response::Exposures(e), Output::Table) => table::exposures_table(&e),
        (Response::Apps(apps), Output::Table) if !nodes.is_empty() => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            crate::nodes::apps_table(&apps, &nodes, now)
        }
        (Response::Apps(apps), Output::Table) if apps.is_empty() => {
            eprintln!("No apps are running.");
            String::new()
        }
        (Response::Services(s), Output::Table) if !nodes.is_empty() => {
            table::services_table(&remote_services(s, &nodes))
        }
        (Response::Services(s), Output::Table) if s.is_empty() => {
            eprintln!("No services are listening.");
            String::new()
        }
        (Response::Apps(apps), Output::Table) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            table::apps_table(&apps, now)
        }
        (Response::Services(s), Output::Table) => table::services_table(&s),
        (Response::Error(e), _) => bail!("the daemon refused: {e}"),
        (other, _) => bail!("unexpected answer from the daemon: {other:?}"),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
    {
        // `ax get apps | head -1` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        r => r.map(|_| 0).map_err(Into::into),
    }
}

/// A service as `ax get services -o json` shows it: [`ServiceInfo`] with
/// each backend's listener spelled as in the table (`@name` for an abstract
/// socket, a path otherwise) rather than as an array of bytes.
#[derive(Debug, Serialize)]
struct ServiceView {
    addr: SocketAddr,
    names: Vec<String>,
    lb: String,
    backends: Vec<BackendView>,
    /// Also reachable from outside ax at this host loopback address.
    host_loopback: Option<SocketAddr>,
}

#[derive(Debug, Serialize)]
struct BackendView {
    app: AppId,
    listener: String,
    /// With `--cluster`: the node the backend runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

impl ServiceView {
    /// The services of every node: this one's with `"node"` set on each
    /// backend when there is a cluster, then the other nodes'.
    fn cluster(local: &[ServiceInfo], nodes: &[ax_proto::NodeInfo]) -> Vec<ServiceView> {
        let here = nodes.iter().find(|n| n.local).map(|n| n.name.clone());
        let mut views: Vec<ServiceView> = local.iter().map(ServiceView::from).collect();
        for v in &mut views {
            for b in &mut v.backends {
                b.node.clone_from(&here);
            }
        }
        for n in nodes.iter().filter(|n| !n.local) {
            for s in &n.services {
                let backends = s.apps.iter().map(|app| BackendView {
                    app: *app,
                    listener: format!("{}:{}", n.name, n.address),
                    node: Some(n.name.clone()),
                });
                match views.iter_mut().find(|v| v.addr == s.addr) {
                    Some(v) => v.backends.extend(backends),
                    None => views.push(ServiceView {
                        addr: s.addr,
                        names: s.names.clone(),
                        lb: s.lb.to_string(),
                        backends: backends.collect(),
                        host_loopback: None,
                    }),
                }
            }
        }
        views
    }
}

/// This node's services and the other nodes' (a remote backend's listener
/// is shown as its node and address), for the table.
fn remote_services(mut local: Vec<ServiceInfo>, nodes: &[ax_proto::NodeInfo]) -> Vec<ServiceInfo> {
    for n in nodes.iter().filter(|n| !n.local) {
        for s in &n.services {
            let backends = s.apps.iter().map(|app| ax_registry::Backend {
                app: *app,
                endpoint: ax_registry::UnixEndpoint::Path(
                    format!("node {} ({})", n.name, n.address).into(),
                ),
            });
            match local.iter_mut().find(|v| v.addr == s.addr) {
                Some(v) => v.backends.extend(backends),
                None => local.push(ServiceInfo {
                    addr: s.addr,
                    names: s.names.clone(),
                    lb: s.lb,
                    backends: backends.collect(),
                    host_loopback: None,
                }),
            }
        }
    }
    local
}

impl From<&ServiceInfo> for ServiceView {
    fn from(s: &ServiceInfo) -> Self {
        Self {
            addr: s.addr,
            names: s.names.clone(),
            lb: s.lb.to_string(),
            backends: s
                .backends
                .iter()
                .map(|b| BackendView {
                    app: b.app,
                    listener: b.endpoint.to_string(),
                    node: None,
                })
                .collect(),
            host_loopback: s.host_loopback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ax_registry::{Backend, LbMode, UnixEndpoint};

    #[test]
    fn service_json_spells_the_endpoint() {
        let s = ServiceInfo {
            addr: "10.233.0.10:8000".parse().unwrap(),
            names: vec!["web".into()],
            lb: LbMode::RoundRobin,
            backends: vec![Backend {
                app: 4,
                endpoint: UnixEndpoint::Abstract(b"ax/1/x".to_vec()),
            }],
            host_loopback: Some("127.0.0.1:8000".parse().unwrap()),
        };
        let json = serde_json::to_value(ServiceView::from(&s)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"addr": "10.233.0.10:8000", "names": ["web"], "lb": "round-robin",
                "backends": [{"app": 4, "listener": "@ax/1/x"}],
                "host_loopback": "127.0.0.1:8000"})
        );
    }
}
