//! `ax daemon --metrics ADDR:PORT`: the broker's counters and the daemon's
//! own, rendered with `prometheus-client` in the OpenMetrics text format
//! (which Prometheus scrapes) at `/metrics`, over plain HTTP.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counters the daemon keeps itself (the broker's are in
/// [`ax_broker::Metrics`]).
#[derive(Debug, Default)]
pub struct DaemonCounters {
    /// Starts of a daemon on this socket after the first, as recorded
    /// beside the socket.
    pub restarts: AtomicU64,
    /// Apps taken over from a predecessor's state file.
    pub takeovers_state: AtomicU64,
    /// Apps their launchers handed back after a daemon restart.
    pub takeovers_handback: AtomicU64,
}

/// One scrape's worth of values.
#[derive(Debug)]
pub struct Scrape {
    /// The broker's counters.
    pub broker: ax_broker::Metrics,
    /// Apps registered.
    pub apps: u64,
    /// Apps whose calls this daemon serves now.
    pub sessions: u64,
    /// Listening services.
    pub services: u64,
    /// Declared services (`ax service create`).
    pub declared: u64,
    /// Starts after the first on this socket.
    pub restarts: u64,
    /// Apps taken over: (how, count).
    pub takeovers: [(&'static str, u64); 2],
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.broker;
        {
            let mut m = enc.encode_descriptor(
                "ax_calls",
                "Trapped socket calls by syscall and outcome",
                None,
                MetricType::Counter,
            )?;
            for s in &b.syscalls {
                for &(outcome, n) in &s.outcomes {
                    let labels = [("syscall", s.syscall), ("outcome", outcome)];
                    m.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "ax_call_duration",
                "Time the broker took to handle a trapped call, by syscall",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for s in &b.syscalls {
                let labels = [("syscall", s.syscall)];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    s.latency_sum_seconds,
                    s.total(),
                    &s.latency_buckets,
                    None,
                )?;
            }
        }
        counter(
            &mut enc,
            "ax_connects_denied",
            "Connects to a VIP the policy refused",
            b.connects_denied,
        )?;
        labelled_counters(
            &mut enc,
            "ax_errors",
            "Errors by kind: handler panics, answers the kernel refused, programs the broker could not look into",
            "kind",
            &b.errors,
        )?;
        labelled_counters(
            &mut enc,
            "ax_quota_hits",
            "Calls refused (ENOBUFS) because an app's quota was reached, by quota",
            "quota",
            &b.quota_hits,
        )?;
        counter(
            &mut enc,
            "ax_identity_sweeps",
            "Sweeps of the connection identity table for sockets no process holds any more",
            b.identity_sweeps,
        )?;
        gauge(
            &mut enc,
            "ax_identities",
            "Connection identities kept: two per connection between programs under ax, until a sweep finds both ends closed (at 131072 new connections are refused)",
            b.identities,
        )?;
        gauge(&mut enc, "ax_apps", "Apps registered", self.apps)?;
        gauge(
            &mut enc,
            "ax_sessions",
            "Apps whose calls this daemon serves",
            self.sessions,
        )?;
        gauge(&mut enc, "ax_services", "Listening services", self.services)?;
        gauge(
            &mut enc,
            "ax_declared_services",
            "Services declared with 'ax service create'",
            self.declared,
        )?;
        counter(
            &mut enc,
            "ax_daemon_restarts",
            "Starts of a daemon on this socket after the first",
            self.restarts,
        )?;
        labelled_counters(
            &mut enc,
            "ax_daemon_takeovers",
            "Apps taken over from a previous daemon: from its state file, or handed back by their launcher",
            "how",
            &self.takeovers,
        )?;
        Ok(())
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn labelled_counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    values: &[(&'static str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(label, n) in values {
        m.encode_family(&[(key, label)])?
            .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// The exposition text of `scrape`.
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    // Writing to a String cannot fail; an encoder error leaves what it had.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Longest request head read.
const MAX_REQUEST: usize = 8192;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait for their turn.
const MAX_CONCURRENT: usize = 8;

/// Serves `GET /metrics` on `listener` until the runtime stops, each
/// scrape from `source`.
pub async fn serve(listener: TcpListener, source: Arc<dyn Fn() -> Scrape + Send + Sync>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*source)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn answer(
    mut stream: TcpStream,
    source: &(dyn Fn() -> Scrape + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(source());
            let body = if method == "HEAD" { "" } else { &body };
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "ax serves /metrics only\n",
            )
            .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Records one more daemon start on the socket `path` (in a file beside
/// it) and returns how many came before: the restarts.
pub fn count_start(path: &std::path::Path) -> u64 {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = crate::paths::beside(path, ".starts");
    let before = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| writeln!(f, "{}", before.saturating_add(1)));
    if let Err(e) = written {
        tracing::debug!(file = %file.display(), error = %e, "cannot record the daemon's start");
    }
    before
}

/// Adds one to `c`.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let text = render(Scrape {
            broker: ax_broker::metrics::snapshot(),
            apps: 2,
            sessions: 1,
            services: 3,
            declared: 0,
            restarts: 1,
            takeovers: [("state", 0), ("handback", 4)],
        });
        for want in [
            "ax_calls_total{syscall=\"connect\",outcome=\"ok\"}",
            "ax_call_duration_seconds_bucket{le=\"+Inf\",syscall=\"bind\"}",
            "ax_call_duration_seconds_count{syscall=\"accept4\"}",
            "ax_connects_denied_total ",
            "ax_errors_total{kind=\"handler_panic\"}",
            "ax_quota_hits_total{quota=\"helpers\"}",
            "ax_identity_sweeps_total ",
            "ax_identities ",
            "ax_apps 2",
            "ax_services 3",
            "ax_daemon_restarts_total 1",
            "ax_daemon_takeovers_total{how=\"handback\"} 4",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
    }
}
