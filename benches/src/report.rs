//! Results: medians and ratios, the Markdown report, the SVG chart.

use crate::run::{Kind, Params, RoundResult};
use crate::stats::median;
use crate::worker::{ConnRate, Syscall};
use serde::Serialize;
use std::fmt::Write as _;

/// Facts about the machine and tools.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    /// When (UTC).
    pub date: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPUs available.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Whether the run was `--unprivileged`.
    pub unprivileged: bool,
    /// `ax --version`.
    pub ax_version: Option<String>,
    /// `slirp4netns --version`, first line.
    pub slirp4netns_version: Option<String>,
    /// passt package version.
    pub pasta_version: Option<String>,
}

/// The "connect latency with many services" check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScaleServices {
    /// Services registered in the small case.
    pub services_small: u32,
    /// Services registered in the big case.
    pub services_big: u32,
    /// Median connect µs per sample, small registry (main daemon).
    pub small_us: Vec<f64>,
    /// Median connect µs per sample, big registry (second daemon), paired
    /// with `small_us` by index.
    pub big_us: Vec<f64>,
    /// Time to register the big set, s.
    pub register_seconds: Option<f64>,
    /// What went wrong.
    pub error: Option<String>,
}

/// One run of the concurrency check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConcRun {
    /// The taskset CPU list.
    pub cpus: String,
    /// Number of cores.
    pub cores: u32,
    /// Successful connects, all clients.
    pub ok: u64,
    /// Failed connects, all clients.
    pub errors: u64,
    /// Clients that did not start or report.
    pub clients_failed: u32,
    /// First connect of any client to last connect of any client.
    pub seconds: f64,
    /// ok / seconds.
    pub conn_per_s: f64,
    /// The first error seen.
    pub first_error: Option<String>,
}

/// The "N apps connecting concurrently" check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Concurrency {
    /// Clients.
    pub apps: u32,
    /// Connects per client.
    pub connects_each: u64,
    /// Runs, in order.
    pub runs: Vec<ConcRun>,
    /// What went wrong.
    pub error: Option<String>,
}

/// The idle check: servers blocked in `accept`, nothing to accept.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Idle {
    /// Servers.
    pub servers: u32,
    /// Daemon CPU, µs per second and server.
    pub cpu_us_per_s: Option<f64>,
    /// Daemon threads' wake-ups, per second and server.
    pub wakeups_per_s: Option<f64>,
    /// What went wrong.
    pub error: Option<String>,
}

/// ax-only figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AxExtras {
    /// getppid natively, per round.
    pub syscall_native: Vec<Syscall>,
    /// getppid under ax, per round.
    pub syscall_ax: Vec<Syscall>,
    /// Egress connect natively, per round.
    pub egress_native: Vec<ConnRate>,
    /// Egress connect under ax, per round.
    pub egress_ax: Vec<ConnRate>,
    /// Egress connect natively to a server that never sleeps, per round.
    pub egress_busy_native: Vec<ConnRate>,
    /// Egress connect under ax to a server that never sleeps, per round.
    pub egress_busy_ax: Vec<ConnRate>,
    /// Many services.
    pub scale_services: Option<ScaleServices>,
    /// Many apps.
    pub concurrency: Option<Concurrency>,
    /// Idle servers.
    pub idle: Option<Idle>,
    /// Errors.
    pub errors: Vec<String>,
}

/// Medians over rounds and ratios (medians of per-round ratios).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Round trip, median µs.
    pub latency_median_us: Option<f64>,
    /// Round trip, p99 µs.
    pub latency_p99_us: Option<f64>,
    /// Throughput, Gbit/s.
    pub gbit_s: Option<f64>,
    /// Connections per second.
    pub conn_per_s: Option<f64>,
    /// Latency ÷ TCP loopback's.
    pub latency_vs_tcp: Option<f64>,
    /// p99 ÷ TCP loopback's.
    pub p99_vs_tcp: Option<f64>,
    /// Throughput ÷ TCP loopback's.
    pub gbit_vs_tcp: Option<f64>,
    /// Connection rate ÷ TCP loopback's.
    pub conn_vs_tcp: Option<f64>,
    /// Latency ÷ AF_UNIX's (ax only).
    pub latency_vs_unix: Option<f64>,
    /// Throughput ÷ AF_UNIX's (ax only).
    pub gbit_vs_unix: Option<f64>,
    /// Connection rate ÷ AF_UNIX's (ax only).
    pub conn_vs_unix: Option<f64>,
    /// Broker CPU as % of the bulk transfer's CPU (ax only).
    pub broker_cpu_pct: Option<f64>,
    /// Broker CPU during the bulk transfer, ms (ax only).
    pub broker_cpu_ms: Option<f64>,
    /// Broker CPU over the bulk client's whole life (start, connect,
    /// transfer, exit), ms (ax only).
    pub broker_cpu_life_ms: Option<f64>,
    /// Transfer CPU (client + server) during bulk, ms.
    pub transfer_cpu_ms: Option<f64>,
    /// Failed runs or connects.
    pub errors: usize,
}

/// One transport's row.
#[derive(Debug, Clone, Serialize)]
pub struct TransportResult {
    /// Short key.
    pub key: &'static str,
    /// Row label.
    pub label: &'static str,
    /// What it measures.
    pub setup: &'static str,
    /// Set up and measured.
    pub available: bool,
    /// Why not.
    pub reason: Option<String>,
    /// Per round.
    pub rounds: Vec<RoundResult>,
    /// Medians and ratios.
    pub summary: Summary,
}

/// A target from the issue, and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub figure: String,
    /// Measured, formatted.
    pub value: String,
    /// The target, formatted.
    pub target: String,
    /// Met (None when not measured).
    pub met: Option<bool>,
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Machine and tools.
    pub meta: Meta,
    /// Sizes.
    pub params: Params,
    /// Rows.
    pub transports: Vec<TransportResult>,
    /// Why there are no ax figures, if so.
    pub ax_unavailable: Option<String>,
    /// ax-only figures.
    pub ax: AxExtras,
    /// Targets.
    pub targets: Vec<Target>,
    /// Derived ax figures.
    pub ax_summary: AxSummary,
    /// Wall time of the run, s.
    pub elapsed_s: f64,
}

/// Derived ax-only figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AxSummary {
    /// getppid ns, native.
    pub syscall_native_ns: Option<f64>,
    /// getppid ns, under ax.
    pub syscall_ax_ns: Option<f64>,
    /// Median of per-round (ax − native).
    pub syscall_extra_ns: Option<f64>,
    /// Egress connect µs, native.
    pub egress_native_us: Option<f64>,
    /// Egress connect µs, under ax.
    pub egress_ax_us: Option<f64>,
    /// Median of per-round ax ÷ native.
    pub egress_ratio: Option<f64>,
    /// Median of per-round (ax − native), µs.
    pub egress_extra_us: Option<f64>,
    /// Egress connect µs, native, to a server that never sleeps.
    pub egress_busy_native_us: Option<f64>,
    /// Egress connect µs, under ax, to a server that never sleeps.
    pub egress_busy_ax_us: Option<f64>,
    /// Median of per-round (ax − native), µs, to a server that never sleeps.
    pub egress_busy_extra_us: Option<f64>,
    /// Connect µs with few services.
    pub scale_small_us: Option<f64>,
    /// Connect µs with many services.
    pub scale_big_us: Option<f64>,
    /// big ÷ small.
    pub scale_ratio: Option<f64>,
    /// Aggregate conn/s on one core.
    pub conc_rate_1core: Option<f64>,
    /// Aggregate conn/s on two cores.
    pub conc_rate_2core: Option<f64>,
    /// Errors + failed clients, all concurrency runs.
    pub conc_errors: Option<u64>,
    /// The connection rate a broker that swaps in AF_UNIX sockets and
    /// does nothing else could reach, ÷ TCP loopback: median over rounds
    /// of 1 ÷ (1/AF_UNIX + 1/installed − 1/TCP), ÷ TCP. `None` without
    /// those three rows.
    pub conn_ceiling_vs_tcp: Option<f64>,
}

/// Per round: what AF_UNIX's connection rate becomes with what the
/// "installed" row adds to TCP's, ÷ TCP's (`None` where a figure is
/// missing or the sum is not a rate).
fn conn_ceiling(
    tcp: &[RoundResult],
    unix: &[RoundResult],
    installed: &[RoundResult],
) -> Option<f64> {
    let per_round: Vec<f64> = tcp
        .iter()
        .zip(unix)
        .zip(installed)
        .filter_map(|((t, u), i)| {
            let (t, u, i) = (conn(t)?, conn(u)?, conn(i)?);
            let secs = 1.0 / u + 1.0 / i - 1.0 / t;
            (t > 0.0 && u > 0.0 && i > 0.0 && secs > 0.0).then(|| 1.0 / secs / t)
        })
        .collect();
    median(&per_round)
}

fn paired(a: &[Option<f64>], b: &[Option<f64>]) -> Option<f64> {
    let r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) if *y > 0.0 => Some(x / y),
            _ => None,
        })
        .collect();
    median(&r)
}

/// Median of per-round differences `a − b`.
fn paired_extra(a: &[Option<f64>], b: &[Option<f64>]) -> Option<f64> {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some((*x)? - (*y)?))
        .collect();
    median(&d)
}

fn col(rr: &[RoundResult], f: impl Fn(&RoundResult) -> Option<f64>) -> Vec<Option<f64>> {
    rr.iter().map(f).collect()
}

fn med_opt(v: &[Option<f64>]) -> Option<f64> {
    let v: Vec<f64> = v.iter().flatten().copied().collect();
    median(&v)
}

fn lat(r: &RoundResult) -> Option<f64> {
    r.pingpong.as_ref().map(|p| p.median_us)
}
fn p99(r: &RoundResult) -> Option<f64> {
    r.pingpong.as_ref().map(|p| p.p99_us)
}
fn gbit(r: &RoundResult) -> Option<f64> {
    r.bulk.as_ref().map(|b| b.gbit_s)
}
fn conn(r: &RoundResult) -> Option<f64> {
    r.connrate.as_ref().map(|c| c.conn_per_s)
}

impl Results {
    /// Computes summaries and targets.
    pub fn build(
        params: &Params,
        transports: Vec<(Kind, Option<String>, Vec<RoundResult>)>,
        ax_unavailable: Option<String>,
        ax: AxExtras,
        meta: Meta,
        elapsed_s: f64,
    ) -> Results {
        let find = |k: Kind| {
            transports
                .iter()
                .find(|(kk, e, _)| *kk == k && e.is_none())
                .map(|(_, _, r)| r.clone())
        };
        let tcp = find(Kind::Tcp);
        let unix = find(Kind::Unix);
        let mut rows = Vec::new();
        for (k, reason, rr) in &transports {
            let mut s = Summary {
                latency_median_us: med_opt(&col(rr, lat)),
                latency_p99_us: med_opt(&col(rr, p99)),
                gbit_s: med_opt(&col(rr, gbit)),
                conn_per_s: med_opt(&col(rr, conn)),
                errors: rr.iter().map(|r| r.errors.len()).sum(),
                ..Default::default()
            };
            if let Some(t) = &tcp {
                s.latency_vs_tcp = paired(&col(rr, lat), &col(t, lat));
                s.p99_vs_tcp = paired(&col(rr, p99), &col(t, p99));
                s.gbit_vs_tcp = paired(&col(rr, gbit), &col(t, gbit));
                s.conn_vs_tcp = paired(&col(rr, conn), &col(t, conn));
            }
            if *k == Kind::Ax {
                if let Some(u) = &unix {
                    s.latency_vs_unix = paired(&col(rr, lat), &col(u, lat));
                    s.gbit_vs_unix = paired(&col(rr, gbit), &col(u, gbit));
                    s.conn_vs_unix = paired(&col(rr, conn), &col(u, conn));
                }
                let transfer = |r: &RoundResult| {
                    r.bulk
                        .as_ref()
                        .map(|b| (b.client_cpu_ns + b.server_cpu_ns) as f64)
                };
                let broker = |r: &RoundResult| r.broker_cpu_ns.map(|b| b as f64);
                s.broker_cpu_pct = paired(&col(rr, broker), &col(rr, transfer)).map(|x| x * 100.0);
                s.broker_cpu_ms = med_opt(&col(rr, broker)).map(|x| x / 1e6);
                s.broker_cpu_life_ms =
                    med_opt(&col(rr, |r| r.broker_cpu_life_ns.map(|b| b as f64))).map(|x| x / 1e6);
                s.transfer_cpu_ms = med_opt(&col(rr, transfer)).map(|x| x / 1e6);
            }
            rows.push(TransportResult {
                key: k.key(),
                label: k.label(),
                setup: k.describe(),
                available: reason.is_none(),
                reason: reason.clone(),
                rounds: rr.clone(),
                summary: s,
            });
        }

        let mut a = AxSummary::default();
        let sn: Vec<Option<f64>> = ax
            .syscall_native
            .iter()
            .map(|s| Some(s.median_ns))
            .collect();
        let sa: Vec<Option<f64>> = ax.syscall_ax.iter().map(|s| Some(s.median_ns)).collect();
        a.syscall_native_ns = med_opt(&sn);
        a.syscall_ax_ns = med_opt(&sa);
        a.syscall_extra_ns = paired_extra(&sa, &sn);
        let medians = |v: &[ConnRate]| -> Vec<Option<f64>> {
            v.iter().map(|c| Some(c.connect_median_us)).collect()
        };
        let (en, ea) = (medians(&ax.egress_native), medians(&ax.egress_ax));
        a.egress_native_us = med_opt(&en);
        a.egress_ax_us = med_opt(&ea);
        a.egress_ratio = paired(&ea, &en);
        a.egress_extra_us = paired_extra(&ea, &en);
        let (bn, ba) = (medians(&ax.egress_busy_native), medians(&ax.egress_busy_ax));
        a.egress_busy_native_us = med_opt(&bn);
        a.egress_busy_ax_us = med_opt(&ba);
        a.egress_busy_extra_us = paired_extra(&ba, &bn);
        if let (Some(t), Some(u), Some(i)) = (&tcp, &unix, find(Kind::Installed)) {
            a.conn_ceiling_vs_tcp = conn_ceiling(t, u, &i);
        }
        if let Some(s) = &ax.scale_services {
            a.scale_small_us = median(&s.small_us);
            a.scale_big_us = median(&s.big_us);
            if s.error.is_none() {
                let b: Vec<Option<f64>> = s.big_us.iter().map(|x| Some(*x)).collect();
                let m: Vec<Option<f64>> = s.small_us.iter().map(|x| Some(*x)).collect();
                a.scale_ratio = paired(&b, &m);
            }
        }
        if let Some(c) = &ax.concurrency {
            let rate = |cores: u32| {
                let v: Vec<f64> = c
                    .runs
                    .iter()
                    .filter(|r| r.cores == cores)
                    .map(|r| r.conn_per_s)
                    .collect();
                median(&v)
            };
            a.conc_rate_1core = rate(1);
            a.conc_rate_2core = rate(2);
            if !c.runs.is_empty() {
                a.conc_errors = Some(
                    c.runs
                        .iter()
                        .map(|r| r.errors + u64::from(r.clients_failed))
                        .sum(),
                );
            }
        }

        let axrow = rows
            .iter()
            .find(|r| r.key == "ax" && r.available)
            .map(|r| r.summary.clone());
        let targets = targets(axrow.as_ref(), &a, &ax);
        Results {
            meta,
            params: params.clone(),
            transports: rows,
            ax_unavailable,
            ax,
            targets,
            ax_summary: a,
            elapsed_s,
        }
    }
}

fn targets(s: Option<&Summary>, a: &AxSummary, ax: &AxExtras) -> Vec<Target> {
    let mut t = Vec::new();
    let mut add = |figure: &str,
                   value: Option<f64>,
                   shown: String,
                   target: &str,
                   ok: &dyn Fn(f64) -> bool| {
        t.push(Target {
            figure: figure.into(),
            value: if value.is_some() {
                shown
            } else {
                "not measured".into()
            },
            target: target.into(),
            met: value.map(ok),
        });
    };
    let s = s.cloned().unwrap_or_default();
    add(
        "ax local round trip ÷ TCP loopback",
        s.latency_vs_tcp,
        ratio(s.latency_vs_tcp),
        "≤ 0.85",
        &|x| x <= 0.85,
    );
    add(
        "ax local throughput ÷ TCP loopback",
        s.gbit_vs_tcp,
        ratio(s.gbit_vs_tcp),
        "≥ 1.5",
        &|x| x >= 1.5,
    );
    add(
        "ax local connection rate ÷ TCP loopback",
        s.conn_vs_tcp,
        ratio(s.conn_vs_tcp),
        "≥ 1.0",
        &|x| x >= 1.0,
    );
    let within = match (s.latency_vs_unix, s.gbit_vs_unix) {
        (Some(l), Some(g)) => Some(((l - 1.0).abs()).max((g - 1.0).abs())),
        _ => None,
    };
    add(
        "ax local round trip and throughput ÷ native AF_UNIX",
        within,
        format!(
            "round trip {}, throughput {}",
            ratio(s.latency_vs_unix),
            ratio(s.gbit_vs_unix)
        ),
        "within 10%",
        // Faster than AF_UNIX is fine too.
        &|_| s.latency_vs_unix.unwrap_or(9.0) <= 1.1 && s.gbit_vs_unix.unwrap_or(0.0) >= 0.9,
    );
    add(
        "non-network syscall (getppid) under the filter",
        a.syscall_extra_ns,
        format!(
            "{:+.0} ns ({} → {} ns)",
            a.syscall_extra_ns.unwrap_or(0.0),
            f0(a.syscall_native_ns),
            f0(a.syscall_ax_ns)
        ),
        "≤ 0.1 µs extra",
        &|x| x <= 100.0,
    );
    add(
        "broker CPU during the bulk run ÷ transfer CPU",
        s.broker_cpu_pct,
        format!(
            "{:.2}% ({} ms of {} ms; {} ms over the client's whole life, `ax exec` and connect included)",
            s.broker_cpu_pct.unwrap_or(0.0),
            f2(s.broker_cpu_ms),
            f0(s.transfer_cpu_ms),
            f2(s.broker_cpu_life_ms)
        ),
        "≤ 1%",
        &|x| x <= 1.0,
    );
    let sc = ax.scale_services.as_ref();
    add(
        &format!(
            "connect latency, {} services ÷ {}",
            thousands(sc.map(|x| f64::from(x.services_big))),
            sc.map(|x| x.services_small).unwrap_or(10)
        ),
        a.scale_ratio,
        format!(
            "{} ({} µs vs {} µs)",
            ratio(a.scale_ratio),
            f1(a.scale_big_us),
            f1(a.scale_small_us)
        ),
        "≤ 1.1",
        &|x| x <= 1.1,
    );
    let conc = ax.concurrency.as_ref();
    let growth = match (a.conc_rate_2core, a.conc_rate_1core) {
        (Some(two), Some(one)) if one > 0.0 => Some(two / one),
        _ => None,
    };
    let errs = a.conc_errors.unwrap_or(0);
    add(
        &format!(
            "{} apps connecting concurrently",
            conc.map(|c| c.apps).unwrap_or(100)
        ),
        growth.filter(|_| a.conc_errors.is_some()),
        format!(
            "{errs} errors; {} conn/s on 1 core, {} on 2 ({})",
            thousands(a.conc_rate_1core),
            thousands(a.conc_rate_2core),
            ratio(growth)
        ),
        "no errors; rate grows from 1 to 2 cores",
        &|g| errs == 0 && g > 1.0,
    );
    add(
        "egress connect to a native server on 127.0.0.1 that never sleeps, extra over native",
        a.egress_busy_extra_us,
        format!(
            "{:+.1} µs ({} µs native, {} µs under ax)",
            a.egress_busy_extra_us.unwrap_or(f64::NAN),
            f1(a.egress_busy_native_us),
            f1(a.egress_busy_ax_us)
        ),
        "≤ +15 µs",
        &|x| x <= 15.0,
    );
    let idle = ax.idle.as_ref();
    add(
        &format!(
            "daemon CPU per idle server ({} blocked in `accept`)",
            idle.map(|i| i.servers).unwrap_or(0)
        ),
        idle.and_then(|i| i.cpu_us_per_s),
        format!(
            "{} µs a second, {} wake-ups a second",
            f0(idle.and_then(|i| i.cpu_us_per_s)),
            f1(idle.and_then(|i| i.wakeups_per_s))
        ),
        "≤ 500 µs a second",
        &|x| x <= 500.0,
    );
    t
}

fn ratio(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "—".into())
}
fn f0(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.0}")).unwrap_or_else(|| "—".into())
}
fn f1(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.1}")).unwrap_or_else(|| "—".into())
}
fn f2(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "—".into())
}
fn thousands(x: Option<f64>) -> String {
    let Some(x) = x else { return "—".into() };
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let digits: Vec<char> = s.chars().collect();
    let groups: Vec<String> = digits
        .rchunks(3)
        .rev()
        .map(|g| g.iter().collect())
        .collect();
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn bytes_h(b: u64) -> String {
    if b >= 1 << 30 && b & ((1 << 30) - 1) == 0 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let p = &r.params;
    let m = &r.meta;
    let mut o = String::new();
    let _ = writeln!(o, "### ax benchmark — {}", m.date);
    let _ = writeln!(o);
    let _ =
        writeln!(
        o,
        "Linux {}, {} CPUs ({}); {} round{}, every transport once per round in alternating order; \
         figures are medians over rounds, ratios are medians of per-round ratios. \
         Ping-pong: {} 1-byte round trips; bulk: {} in 64 KiB writes (about 8 s worth \
         on transports too slow for that); connection rate: {} × (connect, send 1 byte, close), \
         at most {} s.{}",
        m.kernel,
        m.cpus,
        if m.cpu_model.is_empty() { "?" } else { &m.cpu_model },
        p.rounds,
        if p.rounds == 1 { "" } else { "s" },
        thousands(Some(p.pingpong_iterations as f64)),
        bytes_h(p.bulk_bytes),
        thousands(Some(p.connrate_iterations as f64)),
        p.connrate_max_seconds,
        if m.unprivileged { " Unprivileged run." } else { "" }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| transport | round trip µs (median) | ÷ TCP | p99 µs | throughput Gbit/s | ÷ TCP | connections/s | ÷ TCP |"
    );
    let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|--:|");
    for t in &r.transports {
        let s = &t.summary;
        if !t.available {
            let _ = writeln!(
                o,
                "| {} | {} | | | | | | |",
                t.label,
                t.reason.clone().unwrap_or_default().replace('|', "/")
            );
            continue;
        }
        let with_unix = |x: Option<f64>, u: Option<f64>| {
            if t.key == "ax" && u.is_some() {
                format!("{} ({} AF_UNIX)", ratio(x), ratio(u))
            } else {
                ratio(x)
            }
        };
        let name = if t.key == "ax" {
            format!("**{}**", t.label)
        } else {
            t.label.to_string()
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            name,
            f1(s.latency_median_us),
            with_unix(s.latency_vs_tcp, s.latency_vs_unix),
            f1(s.latency_p99_us),
            f1(s.gbit_s),
            with_unix(s.gbit_vs_tcp, s.gbit_vs_unix),
            thousands(s.conn_per_s),
            with_unix(s.conn_vs_tcp, s.conn_vs_unix),
        );
    }
    let _ = writeln!(o);
    if let Some(c) = r.ax_summary.conn_ceiling_vs_tcp {
        let ax = r
            .transports
            .iter()
            .find(|t| t.key == "ax")
            .and_then(|t| t.summary.conn_vs_tcp);
        let _ = writeln!(
            o,
            "Connection rate a broker could reach that swaps in AF_UNIX sockets (both ends \
             trapped, each socket installed) and does no other work: {} TCP loopback (per \
             round, 1 ÷ (1/AF_UNIX + 1/installed − 1/TCP), ÷ TCP; median); ax local: {}.",
            ratio(Some(c)),
            ratio(ax)
        );
        let _ = writeln!(o);
    }
    if let Some(why) = &r.ax_unavailable {
        let _ = writeln!(o, "ax figures: {why}");
        let _ = writeln!(o);
    }
    let a = &r.ax_summary;
    let _ = writeln!(o, "| ax figure | measured | target | met |");
    let _ = writeln!(o, "|---|---|---|---|");
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(o, "| {} | {} | {} | {} |", t.figure, t.value, t.target, met);
    }
    let _ = writeln!(
        o,
        "| egress connect to a native server on 127.0.0.1 blocked in `accept` | \
         {} µs native, {} µs under ax ({:+.1} µs, {}) | — | |",
        f1(a.egress_native_us),
        f1(a.egress_ax_us),
        a.egress_extra_us.unwrap_or(f64::NAN),
        ratio(a.egress_ratio)
    );
    let _ = writeln!(o);

    // Problems, so a reader sees them next to the numbers.
    let mut problems: Vec<String> = Vec::new();
    for t in &r.transports {
        for (i, rr) in t.rounds.iter().enumerate() {
            for e in &rr.errors {
                problems.push(format!("{} round {}: {}", t.label, i + 1, e));
            }
        }
    }
    problems.extend(r.ax.errors.iter().cloned());
    if let Some(e) = r.ax.scale_services.as_ref().and_then(|s| s.error.clone()) {
        problems.push(format!("many-services check: {e}"));
    }
    if let Some(e) = r.ax.concurrency.as_ref().and_then(|s| s.error.clone()) {
        problems.push(format!("concurrency check: {e}"));
    }
    if let Some(e) = r.ax.idle.as_ref().and_then(|s| s.error.clone()) {
        problems.push(format!("idle check: {e}"));
    }
    if !problems.is_empty() {
        let _ = writeln!(o, "Problems during the run:");
        for e in problems.iter().take(20) {
            let _ = writeln!(o, "- {}", e.replace('\n', " "));
        }
        if problems.len() > 20 {
            let _ = writeln!(o, "- … and {} more (see the JSON)", problems.len() - 20);
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "<details><summary>How each row is measured</summary>");
    let _ = writeln!(o);
    for t in &r.transports {
        let _ = writeln!(o, "- **{}**: {}", t.label, t.setup);
    }
    let _ = writeln!(
        o,
        "- Every server and client is a separate `ax-bench` process; the client times its own \
         loop. CPU times are the processes' own (CLOCK_PROCESS_CPUTIME_ID = getrusage \
         utime+stime); broker CPU is the daemon's (per-thread schedstat, /proc/PID/stat as a \
         floor), sampled when the connected client starts its transfer and when the server's \
         report arrives (the client waits for the sample at both points). On two CPUs or \
         more, every transport's client runs on the first and its server on the last \
         (`taskset`, where installed); supervisors (the ax daemon, `ax exec`, the null \
         supervisor) are not pinned. Left to the scheduler, a client and its server share a \
         CPU in some rounds and not in others, which on a VM changes a TCP loopback round \
         trip tenfold (6.5 against 60 µs)."
    );
    let _ = writeln!(
        o,
        "- Overheads: getppid × {} natively vs under `ax exec` (median ns per call over \
         batches of 10,000); egress: {} × (connect, close) to a native server on 127.0.0.1, \
         one blocked in `accept` between connections and, on two CPUs or more, one that never \
         sleeps (`ax-bench serve --spin`, a busy accept loop on the last CPU, the clients on the \
         first; the daemon is never pinned): a connect wakes a server blocked in `accept`, and \
         what that costs the connecting thread is the machine's scheduling, not ax's.",
        thousands(Some(p.syscall_iterations as f64)),
        thousands(Some(p.egress_iterations as f64))
    );
    let _ = writeln!(
        o,
        "- Many services: one helper app under `ax exec` listens on many ports of its VIP; \
         median connect time over {} connects to one service; two fresh daemons, one with 10 \
         services and one with {}, each with its own copy of the server, sampled alternately; \
         ratio = median of per-pair ratios. Daemons, servers and clients of this check all run \
         on CPU 0 (`taskset`, where installed): spread over two CPUs, where the scheduler puts \
         them doubles or halves a whole sample's latency for either daemon.",
        thousands(Some(p.scale_connects as f64)),
        thousands(Some(f64::from(p.scale_services)))
    );
    let _ = writeln!(
        o,
        "- Concurrency: {} `ax exec` clients × {} connects (connect, 1 byte, close) released at \
         once; daemon, server and clients pinned with `taskset -c 0`, then `-c 0,1`; rate = \
         all connects ÷ (first start to last end).",
        p.concurrent_apps, p.concurrent_connects_each
    );
    let _ = writeln!(
        o,
        "- Idle: {} servers under `ax exec` on a fresh daemon, each blocked in `accept` on a \
         listener of its own with nothing to accept; once they have waited 2 s, the daemon's \
         CPU time (per-thread schedstat) and its threads' context switches over 5 s, per \
         second and server.",
        r.ax.idle.as_ref().map(|i| i.servers).unwrap_or(0)
    );
    let mut tools = Vec::new();
    if let Some(v) = &m.ax_version {
        tools.push(v.clone());
    }
    if let Some(v) = &m.slirp4netns_version {
        tools.push(v.clone());
    }
    if let Some(v) = &m.pasta_version {
        tools.push(v.clone());
    }
    if !tools.is_empty() {
        let _ = writeln!(o, "- Tools: {}.", tools.join("; "));
    }
    let _ = writeln!(o, "- Run time: {:.0} s.", r.elapsed_s);
    let _ = writeln!(o);
    let _ = writeln!(o, "</details>");
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum ≥ `x` and its tick step.
fn nice_axis(x: f64) -> (f64, f64) {
    let x = x.max(1.0);
    for step in [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0] {
        let top = (x / step).ceil() * step;
        if top / step <= 6.0 {
            return (top, step);
        }
    }
    let step = 10f64.powf(x.log10().ceil());
    (step, step / 5.0)
}

/// The SVG chart: one panel per measure, one bar per transport, each the
/// ratio to TCP loopback with a dashed line at 1.
pub fn svg(r: &Results) -> String {
    type Pick = fn(&Summary) -> Option<f64>;
    let panels: [(&str, &str, Pick); 3] = [
        ("Round-trip latency", "lower is better", |s| {
            s.latency_vs_tcp
        }),
        ("Throughput", "higher is better", |s| s.gbit_vs_tcp),
        ("Connection rate", "higher is better", |s| s.conn_vs_tcp),
    ];
    let rows = &r.transports;
    let n = rows.len().max(1) as f64;
    let label_w = 120.0;
    let panel_w = 230.0;
    let gap = 40.0;
    let left = 20.0 + label_w;
    let top = 96.0;
    let row_h = 30.0;
    let bar_h = 18.0;
    let plot_h = n * row_h;
    let width = left + 3.0 * panel_w + 2.0 * gap + 30.0;
    let height = top + plot_h + 76.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r##"<text x="{:.0}" y="30" font-size="20" font-weight="bold" fill="#222">ax and native transports, relative to TCP loopback</text>"##,
        20.0
    );
    let _ = writeln!(
        o,
        r##"<text x="20" y="52" font-size="12" fill="#555">{}</text>"##,
        esc(&format!(
            "Medians of per-round ratios over {} rounds (1.0 = TCP loopback). Linux {}, {} CPUs, {}.",
            r.params.rounds, r.meta.kernel, r.meta.cpus, r.meta.date
        ))
    );
    // Row labels.
    for (i, t) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h + row_h / 2.0 + 4.0;
        let weight = if t.key == "ax" { "bold" } else { "normal" };
        let _ = writeln!(
            o,
            r##"<text x="{:.0}" y="{y:.0}" font-size="13" text-anchor="end" font-weight="{weight}" fill="#222">{}</text>"##,
            left - 10.0,
            esc(t.label)
        );
    }
    for (pi, (title, hint, pick)) in panels.iter().enumerate() {
        let x0 = left + pi as f64 * (panel_w + gap);
        let vals: Vec<Option<f64>> = rows
            .iter()
            .map(|t| if t.available { pick(&t.summary) } else { None })
            .collect();
        let vmax = vals.iter().flatten().copied().fold(1.0, f64::max);
        let (axis_max, step) = nice_axis(vmax * 1.08);
        let sx = |v: f64| x0 + v / axis_max * panel_w;
        let _ = writeln!(
            o,
            r##"<text x="{:.0}" y="{:.0}" font-size="14" font-weight="bold" fill="#222">{title}</text>"##,
            x0,
            top - 24.0
        );
        let _ = writeln!(
            o,
            r##"<text x="{:.0}" y="{:.0}" font-size="11" fill="#777">{hint}</text>"##,
            x0,
            top - 9.0
        );
        // Grid and ticks.
        let mut v = 0.0;
        while v <= axis_max + 1e-9 {
            let x = sx(v);
            let _ = writeln!(
                o,
                r##"<line x1="{x:.1}" y1="{top:.0}" x2="{x:.1}" y2="{:.0}" stroke="#e6e6e6"/>"##,
                top + plot_h
            );
            let _ = writeln!(
                o,
                r##"<text x="{x:.1}" y="{:.0}" font-size="11" text-anchor="middle" fill="#555">{}</text>"##,
                top + plot_h + 16.0,
                trim_num(v)
            );
            v += step;
        }
        let _ = writeln!(
            o,
            r##"<line x1="{x0:.1}" y1="{:.0}" x2="{:.1}" y2="{:.0}" stroke="#999"/>"##,
            top + plot_h,
            x0 + panel_w,
            top + plot_h
        );
        let _ = writeln!(
            o,
            r##"<line x1="{x0:.1}" y1="{top:.0}" x2="{x0:.1}" y2="{:.0}" stroke="#999"/>"##,
            top + plot_h
        );
        // The TCP loopback reference.
        let x1 = sx(1.0);
        let _ = writeln!(
            o,
            r##"<line x1="{x1:.1}" y1="{:.0}" x2="{x1:.1}" y2="{:.0}" stroke="#333" stroke-dasharray="4 3"/>"##,
            top - 4.0,
            top + plot_h
        );
        // Bars.
        for (i, (t, val)) in rows.iter().zip(&vals).enumerate() {
            let y = top + i as f64 * row_h + (row_h - bar_h) / 2.0;
            match val {
                Some(v) => {
                    let color = match t.key {
                        "ax" => "#e4572e",
                        "tcp" => "#8c8c8c",
                        "unix" => "#4c9f70",
                        _ => "#4a78b5",
                    };
                    let w = (sx(*v) - x0).max(1.0);
                    let _ = writeln!(
                        o,
                        r#"<rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{bar_h:.0}" fill="{color}"><title>{}: {v:.3}</title></rect>"#,
                        esc(t.label)
                    );
                    // Label inside the bar end when there is no room outside.
                    let (lx, anchor, fill, halo) = if w > panel_w - 44.0 {
                        (x0 + w - 4.0, "end", "white", "")
                    } else {
                        (
                            x0 + w + 4.0,
                            "start",
                            "#222",
                            r#" stroke="white" stroke-width="3" paint-order="stroke""#,
                        )
                    };
                    let _ = writeln!(
                        o,
                        r#"<text x="{lx:.1}" y="{:.1}" font-size="11" text-anchor="{anchor}" fill="{fill}"{halo}>{v:.2}×</text>"#,
                        y + bar_h / 2.0 + 4.0
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        r##"<text x="{:.1}" y="{:.1}" font-size="11" font-style="italic" fill="#999">{}</text>"##,
                        x0 + 4.0,
                        y + bar_h / 2.0 + 4.0,
                        if t.available { "n/a" } else { "not available" }
                    );
                }
            }
        }
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.0}" font-size="12" text-anchor="middle" fill="#333">ratio to TCP loopback</text>"##,
            x0 + panel_w / 2.0,
            top + plot_h + 36.0
        );
    }
    let _ = writeln!(
        o,
        r##"<text x="20" y="{:.0}" font-size="11" fill="#777">Generated by ax-bench (benches/ in the ax repository). Bars are ratios: transport ÷ TCP loopback for each measure.</text>"##,
        height - 14.0
    );
    let _ = writeln!(o, "</svg>");
    o
}

fn trim_num(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_rate_ceiling_per_round() {
        let round = |rate: Option<f64>| RoundResult {
            connrate: rate.map(|conn_per_s| crate::worker::ConnRate {
                iterations: 1,
                ok: 1,
                errors: 0,
                seconds: 1.0,
                conn_per_s,
                connect_median_us: 0.0,
                connect_p99_us: 0.0,
                start_ns: 0,
                end_ns: 0,
                first_error: None,
            }),
            ..Default::default()
        };
        let rounds = |v: &[Option<f64>]| v.iter().map(|&r| round(r)).collect::<Vec<_>>();
        // 100 µs natively, 25 µs over AF_UNIX, 125 µs trapped with
        // installs: 25 + 25 = 50 µs, twice TCP's rate. A round with a
        // figure missing counts for nothing.
        let tcp = rounds(&[Some(10_000.0), None]);
        let unix = rounds(&[Some(40_000.0), Some(40_000.0)]);
        let installed = rounds(&[Some(8_000.0), Some(8_000.0)]);
        let c = conn_ceiling(&tcp, &unix, &installed).unwrap();
        assert!((c - 2.0).abs() < 1e-9, "{c}");
        assert_eq!(conn_ceiling(&tcp[1..], &unix[1..], &installed[1..]), None);
    }

    #[test]
    fn formats() {
        assert_eq!(thousands(Some(1234567.4)), "1,234,567");
        assert_eq!(thousands(Some(999.0)), "999");
        assert_eq!(thousands(None), "—");
        assert_eq!(nice_axis(1.08), (1.25, 0.25));
        assert_eq!(nice_axis(2.3), (2.5, 0.5));
        assert_eq!(trim_num(0.5), "0.5");
        assert_eq!(trim_num(2.0), "2");
        assert_eq!(
            paired(
                &[Some(2.0), Some(3.0), None],
                &[Some(1.0), Some(1.0), Some(1.0)]
            ),
            Some(2.5)
        );
    }
}
