//! The daemon's side of a cluster (`ax daemon --cluster`): starting the
//! node, and accepting connections from other nodes. Such a connection
//! starts with a header (see [`ax_cluster::header`]); the daemon reads
//! exactly that, applies the policy to the client it names, and hands the
//! TCP connection itself to a local server's `accept` through the broker's
//! doorbell, so that the data never passes through the daemon.

use crate::cli::DaemonArgs;
use anyhow::Context;
use ax_broker::Broker;
use ax_cluster::{header, Cluster, ClusterConfig};
use ax_registry::{LocalRegistry, ResolveError};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How long a connection from another node may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many connections from other nodes may be reading their
/// header at once; more are closed at once.
const MAX_READING: usize = 1024;

/// The node `args` describe, if `--cluster` is given, and the TCP listener
/// for connections from other nodes (bound now, so that a taken port fails
/// the start).
pub fn prepare(
    args: &DaemonArgs,
    registry: &Arc<LocalRegistry>,
) -> anyhow::Result<Option<(Cluster, std::net::TcpListener)>> {
    let Some(addr) = args.cluster else {
        return Ok(None);
    };
    let node = match &args.node {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| addr.to_string()),
    };
    let key = match &args.cluster_key_file {
        Some(path) => Some(ax_cluster::read_key(path)?),
        None => {
            tracing::warn!(
                "cluster traffic is unauthenticated: anyone who reaches {addr} can join the cluster \
                 and connect to its services as any client (give --cluster-key-file)"
            );
            None
        }
    };
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for --cluster connections on {addr}"))?;
    listener.set_nonblocking(true)?;
    let cluster = Cluster::new(
        ClusterConfig {
            node,
            addr,
            join: args.join.clone(),
            key,
        },
        registry.clone(),
    );
    Ok(Some((cluster, listener)))
}

/// Starts gossip and accepts connections from other nodes. Must run inside
/// the daemon's tokio runtime.
pub async fn start(
    cluster: Cluster,
    listener: std::net::TcpListener,
    registry: Arc<LocalRegistry>,
    broker: Broker,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    cluster.start().await?;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("cannot watch the --cluster socket")?;
    tracing::info!(
        node = cluster.node(),
        addr = %cluster.addr(),
        authenticated = cluster.key().is_some(),
        "cluster node started"
    );
    Ok(tokio::spawn(accept_loop(
        listener, cluster, registry, broker,
    )))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    cluster: Cluster,
    registry: Arc<LocalRegistry>,
    broker: Broker,
) {
    let reading = Arc::new(tokio::sync::Semaphore::new(MAX_READING));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the --cluster port failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = reading.clone().try_acquire_owned() else {
            tracing::warn!(%from, limit = MAX_READING, "too many connections from other nodes reading their header: closed");
            continue;
        };
        let (cluster, registry, broker) = (cluster.clone(), registry.clone(), broker.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let read = tokio::time::timeout(HEADER_TIMEOUT, read_header(stream, &cluster)).await;
            let (stream, header) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(%from, error = %e, "connection from another node refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%from, "connection from another node refused: no header in time");
                    return;
                }
            };
            hand_over(stream, header, &registry, &broker, from);
        });
    }
}

/// Reads exactly the header from `stream`, and checks it.
async fn read_header(
    mut stream: tokio::net::TcpStream,
    cluster: &Cluster,
) -> anyhow::Result<(tokio::net::TcpStream, header::Header)> {
    let mut prefix = [0u8; 6];
    stream.read_exact(&mut prefix).await?;
    let len = header::Header::body_len(&prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let mut mac = [0u8; header::MAC_LEN];
    stream.read_exact(&mut mac).await?;
    let h = cluster.check_header(&prefix, &body, &mac)?;
    Ok((stream, h))
}

/// Hands a checked connection to a local backend of its service, or
/// refuses it with a reset.
fn hand_over(
    stream: tokio::net::TcpStream,
    h: header::Header,
    registry: &LocalRegistry,
    broker: &Broker,
    from: std::net::SocketAddr,
) {
    let conn: OwnedFd = match stream.into_std() {
        Ok(s) => {
            let _ = s.set_nonblocking(false);
            s.into()
        }
        Err(_) => return,
    };
    let endpoints = match registry.resolve_from_remote(h.app, &h.labels, h.dst) {
        Ok(eps) => eps,
        Err(e) => {
            if let ResolveError::Denied { rule, .. } = &e {
                tracing::warn!(
                    client_node = %h.node,
                    client_app = h.app,
                    client = %h.from,
                    dst = %h.dst,
                    %rule,
                    "connect denied by policy"
                );
            } else {
                tracing::info!(client_node = %h.node, dst = %h.dst, error = %e, "connection from another node refused");
            }
            refuse(conn);
            return;
        }
    };
    match broker.deliver_remote_connection(conn, &endpoints, h.dst, h.from) {
        Ok(()) => {
            tracing::debug!(client_node = %h.node, client = %h.from, dst = %h.dst, %from, "connection from another node handed over")
        }
        Err(e) => {
            tracing::info!(client_node = %h.node, dst = %h.dst, error = %e, "connection from another node not taken")
        }
    }
}

/// Closes `conn` with a reset, as a closed port would answer.
fn refuse(conn: OwnedFd) {
    let _ = rustix::net::sockopt::set_socket_linger(&conn, Some(Duration::ZERO));
}
