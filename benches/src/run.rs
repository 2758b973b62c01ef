//! The orchestrator (`ax-bench run`): sets up every transport, runs each
//! test on each of them once per round in alternating order, then the ax
//! overhead and scale checks, and writes the report.
//!
//! Safety rules it enforces: it runs only inside a network namespace with
//! no default route (so a failed interception can never send a packet off
//! the machine), it targets only 127.0.0.1, AF_UNIX paths, virtual IPs
//! inside that namespace, and addresses in namespaces it made itself, and
//! it removes everything it made (processes by pid, namespaces, files) on
//! every exit path.

use crate::procs::{self, run_cmd, spawn, Netns, Proc, Spawn, TempDir};
use crate::report::{self, Results};
use crate::stats::{proc_sched_ns, proc_utime_stime_ns};
use crate::worker::{Bulk, ConnRate, PingPong, Report, Syscall};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `ax-bench run` options.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Rounds; every transport runs every test once per round [default: 5, 3 with --quick]
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Smaller runs (about a quarter of the data and connections)
    #[arg(long)]
    pub quick: bool,
    /// The ax binary [default: `ax` next to this program, else on PATH]
    #[arg(long, value_name = "PATH")]
    pub ax: Option<PathBuf>,
    /// Write the Markdown table here (it is printed to stdout too)
    #[arg(long, value_name = "FILE")]
    pub out_md: Option<PathBuf>,
    /// Write the SVG chart here
    #[arg(long, value_name = "FILE")]
    pub out_svg: Option<PathBuf>,
    /// Write all raw numbers here
    #[arg(long, value_name = "FILE")]
    pub out_json: Option<PathBuf>,
    /// Without root: only ax local, TCP loopback, AF_UNIX and the two
    /// trapped TCP rows (re-runs itself in `unshare --user --map-root-user
    /// --net` when this namespace has a default route)
    #[arg(long)]
    pub unprivileged: bool,
    /// Only these transports (ax, tcp, unix, trapped, installed, veth,
    /// bridge, slirp4netns, pasta; comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub only: Vec<String>,
    /// Skip the two ax scale checks
    #[arg(long)]
    pub no_scale: bool,
}

/// Sizes of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Rounds.
    pub rounds: usize,
    /// Timed ping-pong round trips per run.
    pub pingpong_iterations: u64,
    /// Bulk bytes per run (64 KiB writes).
    pub bulk_bytes: u64,
    /// Connections per connection-rate run.
    pub connrate_iterations: u64,
    /// A connection-rate run stops after this long (slow user-mode stacks).
    pub connrate_max_seconds: u64,
    /// getppid calls per syscall run.
    pub syscall_iterations: u64,
    /// Connects per egress run.
    pub egress_iterations: u64,
    /// Services registered for the "many services" check.
    pub scale_services: u32,
    /// Connects timed per scale sample.
    pub scale_connects: u64,
    /// `ax exec` clients in the concurrency check.
    pub concurrent_apps: u32,
    /// Connects per client in the concurrency check.
    pub concurrent_connects_each: u64,
}

impl Params {
    fn new(quick: bool, rounds: Option<usize>) -> Params {
        if quick {
            Params {
                rounds: rounds.unwrap_or(3),
                pingpong_iterations: 5_000,
                bulk_bytes: 512 << 20,
                connrate_iterations: 5_000,
                connrate_max_seconds: 8,
                syscall_iterations: 1_000_000,
                egress_iterations: 2_000,
                scale_services: 10_000,
                scale_connects: 2_000,
                concurrent_apps: 100,
                concurrent_connects_each: 50,
            }
        } else {
            Params {
                rounds: rounds.unwrap_or(5),
                pingpong_iterations: 20_000,
                bulk_bytes: 2 << 30,
                connrate_iterations: 20_000,
                connrate_max_seconds: 20,
                syscall_iterations: 1_000_000,
                egress_iterations: 5_000,
                scale_services: 10_000,
                scale_connects: 5_000,
                concurrent_apps: 100,
                concurrent_connects_each: 200,
            }
        }
    }
}

/// The transports, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Both ends under ax (UNIX shortcut).
    Ax,
    /// Native TCP over 127.0.0.1.
    Tcp,
    /// Native AF_UNIX.
    Unix,
    /// Native TCP over 127.0.0.1, both ends under ax's filter with a
    /// supervisor that answers every trapped call `CONTINUE`.
    Trapped,
    /// As `Trapped`, and the supervisor installs a copy of the fd of each
    /// connect and accept over itself first (`null-supervisor --install`).
    Installed,
    /// Two namespaces joined by a veth pair.
    Veth,
    /// Two namespaces on a Linux bridge.
    Bridge,
    /// slirp4netns port forward into a namespace.
    Slirp4netns,
    /// pasta port forward into a namespace.
    Pasta,
}

impl Kind {
    /// All, in table order.
    pub const ALL: [Kind; 9] = [
        Kind::Ax,
        Kind::Tcp,
        Kind::Unix,
        Kind::Trapped,
        Kind::Installed,
        Kind::Veth,
        Kind::Bridge,
        Kind::Slirp4netns,
        Kind::Pasta,
    ];

    /// The `--only` key.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Ax => "ax",
            Kind::Tcp => "tcp",
            Kind::Unix => "unix",
            Kind::Trapped => "trapped",
            Kind::Installed => "installed",
            Kind::Veth => "veth",
            Kind::Bridge => "bridge",
            Kind::Slirp4netns => "slirp4netns",
            Kind::Pasta => "pasta",
        }
    }

    /// The row label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Ax => "ax local",
            Kind::Tcp => "TCP loopback",
            Kind::Unix => "AF_UNIX",
            Kind::Trapped => "TCP, trapped, no broker",
            Kind::Installed => "TCP, trapped + installs, no broker",
            Kind::Veth => "veth pair",
            Kind::Bridge => "bridge",
            Kind::Slirp4netns => "slirp4netns",
            Kind::Pasta => "pasta",
        }
    }

    /// What the row measures, for the report's notes.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Ax => "both ends under `ax exec`; server binds 0.0.0.0 with `--ip 10.233.0.50`, client connects to the VIP (AF_UNIX underneath)",
            Kind::Tcp => "native TCP, client and server on 127.0.0.1",
            Kind::Unix => "native AF_UNIX stream socket at a path",
            Kind::Trapped => "native TCP on 127.0.0.1, both ends under `ax-bench null-supervisor`: ax's own seccomp filter, every trapped call answered `CONTINUE` at once by a receive loop laid out as ax's; what trapping alone costs, with no broker work at all",
            Kind::Installed => "as the row above, and on each `connect`, `accept` and `accept4` the supervisor first installs a copy of the call's fd over that same fd (`ax-bench null-supervisor --install`: `pidfd_getfd`, then `SECCOMP_IOCTL_NOTIF_ADDFD`, the round trip to the caller with which ax installs every socket it swaps in); still no broker work",
            Kind::Veth => "native TCP between two network namespaces joined by a veth pair (10.99.1.1 → 10.99.1.2)",
            Kind::Bridge => "native TCP between two namespaces attached to a Linux bridge in a third (10.99.2.1 → 10.99.2.2), docker's default",
            Kind::Slirp4netns => "client in a slirp4netns namespace (tap, MTU 65520) → 10.0.2.2 → server on the host side's 127.0.0.1, like a rootless container reaching a host service (client namespace: at most 1,024 TIME_WAIT entries, as slirp does not do TCP timestamps)",
            Kind::Pasta => "client in a pasta namespace (tap, MTU 65520) → gateway address → server on the host side's 127.0.0.1, the same path through pasta (same TIME_WAIT limit)",
        }
    }

    fn needs_root(self) -> bool {
        !matches!(
            self,
            Kind::Ax | Kind::Tcp | Kind::Unix | Kind::Trapped | Kind::Installed
        )
    }
}

const TCP_PORT: u16 = 5201;
const SLIRP_PORT: u16 = 5202;
const PASTA_GW: &str = "10.99.3.254";
const EGRESS_PORT: u16 = 5203;
/// The egress server that never sleeps (`serve --spin`, see [`cpus_apart`]).
const EGRESS_BUSY_PORT: u16 = 5206;
const TRAPPED_PORT: u16 = 5204;
const INSTALLED_PORT: u16 = 5205;
const AX_PORT: u16 = 5301;
const AX_VIP: &str = "10.233.0.50";
const SCALE_SMALL_VIP: &str = "10.233.0.51";
const SCALE_BIG_VIP: &str = "10.233.0.52";
const SCALE_BASE_PORT: u16 = 20000;
/// The CPU the many-services check runs on (see `scale_services_inner`).
const SCALE_CPU: &str = "0";
const CONC_VIP: &str = "10.233.0.70";
/// The idle check: this many servers blocked in `accept`, on VIPs from
/// `IDLE_VIP_BASE`.1 up...
const IDLE_SERVERS: u32 = 8;
const IDLE_VIP_BASE: &str = "10.233.0.1";
/// ...measured for this long, once they have waited this long (past the
/// broker's first second of frequent checks on a blocked accept).
const IDLE_WINDOW: Duration = Duration::from_secs(5);
const IDLE_SETTLE: Duration = Duration::from_secs(2);
const CONC_PORT: u16 = 5401;

/// A transport that is set up: how to start a client, where it connects.
/// Fields drop in order: processes before the namespaces they live in.
#[derive(Debug)]
struct Live {
    client_prefix: Vec<String>,
    connect: String,
    _server: Proc,
    _helpers: Vec<Proc>,
    _netns: Vec<Netns>,
}

/// The private ax daemon and what the ax rows share.
#[derive(Debug)]
struct AxEnv {
    ax: PathBuf,
    sock: PathBuf,
    egress_server: Option<Proc>,
    daemon: Proc,
}

impl AxEnv {
    fn exec_prefix(&self, vip: Option<&str>) -> Vec<String> {
        exec_prefix(&self.ax, &self.sock, vip)
    }
}

fn exec_prefix(ax: &Path, sock: &Path, vip: Option<&str>) -> Vec<String> {
    let mut v = vec![
        ax.display().to_string(),
        "exec".into(),
        "--socket".into(),
        sock.display().to_string(),
        "--no-autostart".into(),
    ];
    if let Some(ip) = vip {
        v.push("--ip".into());
        v.push(ip.into());
    }
    v.push("--".into());
    v
}

/// `ax get services -o json`: the services' `addr` fields.
fn ax_services(ax: &Path, sock: &Path) -> Result<Vec<String>> {
    let out = run_cmd(&[
        &ax.display().to_string(),
        "get",
        "services",
        "-o",
        "json",
        "--socket",
        &sock.display().to_string(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("services JSON")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.get("addr").and_then(|x| x.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// Polls `ax get services` until `ok` holds.
fn wait_services(
    ax: &Path,
    sock: &Path,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&[String]) -> bool,
) -> Result<()> {
    let t = Instant::now();
    loop {
        let last = match ax_services(ax, sock) {
            Ok(s) if ok(&s) => return Ok(()),
            Ok(s) => format!("{} services registered", s.len()),
            Err(e) => format!("{e:#}"),
        };
        if t.elapsed() > timeout {
            bail!("{what}: not seen in `ax get services` after {timeout:?} ({last})");
        }
        if procs::stopping() {
            bail!("stopping");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One round's results on one transport.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundResult {
    /// Ping-pong.
    pub pingpong: Option<PingPong>,
    /// Bulk.
    pub bulk: Option<Bulk>,
    /// Connection rate.
    pub connrate: Option<ConnRate>,
    /// ax only: daemon CPU (ns) during the bulk transfer itself.
    pub broker_cpu_ns: Option<u64>,
    /// ax only: daemon CPU (ns) over the bulk client's whole life
    /// (`ax exec` start, connect, transfer, exit).
    pub broker_cpu_life_ns: Option<u64>,
    /// Errors of this round.
    pub errors: Vec<String>,
}

/// Everything the orchestrator needs while running.
struct Ctx {
    exe: PathBuf,
    tmp: TempDir,
    params: Params,
    tag: String,
    /// The CPUs every transport's client and server run on, apart (see
    /// [`transport_cpus`]).
    apart: Option<(String, String)>,
}

impl Ctx {
    fn log(&self, name: &str) -> PathBuf {
        self.tmp.path.join(format!("{name}.log"))
    }

    fn argv(&self, prefix: &[String], args: &[&str]) -> Vec<String> {
        let mut v = prefix.to_vec();
        v.push(self.exe.display().to_string());
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Starts a server and waits for its READY line.
    fn start_server(&self, name: &str, prefix: &[String], args: &[&str]) -> Result<Proc> {
        let argv = self.argv(prefix, args);
        let mut p = spawn(
            name,
            &argv,
            &Spawn {
                stdin: false,
                stderr_file: Some(self.log(name)),
            },
        )?;
        p.wait_line(Duration::from_secs(20), |l| l.starts_with("READY"))
            .map_err(|e| anyhow!("{e:#} (log: {})", tail(&self.log(name))))?;
        Ok(p)
    }

    /// Runs one worker to completion and parses its JSON line.
    fn worker(
        &self,
        name: &str,
        prefix: &[String],
        args: &[&str],
        timeout: Duration,
    ) -> Result<Report> {
        let argv = self.argv(prefix, args);
        let mut p = spawn(name, &argv, &Spawn::default())?;
        finish_report(&mut p, timeout)
    }

    /// A bulk client on the ax row, with the daemon's CPU sampled at the
    /// start and end of the transfer itself (the client waits for us at
    /// both points) and over the client's whole life. Returns the report,
    /// the transfer-window CPU and the whole-life CPU of the daemon (ns).
    fn bulk_synced(&self, live: &Live, bytes: &str, daemon: u32) -> Result<(Report, u64, u64)> {
        let argv = self.argv(
            &live.client_prefix,
            &[
                "client",
                "--connect",
                &live.connect,
                "--mode",
                "bulk",
                "--bytes",
                bytes,
                "--sync-stdin",
            ],
        );
        let life0 = DaemonCpu::read(daemon);
        let mut p = spawn(
            "client-bulk",
            &argv,
            &Spawn {
                stdin: true,
                stderr_file: None,
            },
        )?;
        let t = Duration::from_secs(300);
        let step = |p: &mut Proc, what: &str| -> Result<DaemonCpu> {
            p.wait_line(t, |l| l == what)
                .map_err(|e| anyhow!("{e:#} {}", p.stderr()))?;
            let c = DaemonCpu::read(daemon);
            p.write_stdin(b"go\n")?;
            Ok(c)
        };
        let w0 = step(&mut p, "SYNC start")?;
        let w1 = step(&mut p, "SYNC end")?;
        let r = finish_report(&mut p, t)?;
        let life1 = DaemonCpu::read(daemon);
        Ok((r, w1.since(&w0), life1.since(&life0)))
    }

    fn client(&self, live: &Live, mode: &str, extra: &[&str]) -> Result<Report> {
        let mut args = vec!["client", "--connect", &live.connect, "--mode", mode];
        args.extend_from_slice(extra);
        self.worker(
            &format!("client-{mode}"),
            &live.client_prefix,
            &args,
            Duration::from_secs(300),
        )
    }

    fn ns(&self, suffix: &str) -> Result<Netns> {
        Netns::add(&format!("{}-{suffix}", self.tag))
    }
}

/// Waits for a worker and parses the last JSON line it printed.
fn finish_report(p: &mut Proc, timeout: Duration) -> Result<Report> {
    let (st, lines) = p
        .finish(timeout)
        .map_err(|e| anyhow!("{e:#} {}", p.stderr()))?;
    let json = lines.iter().rev().find(|l| l.starts_with('{'));
    if !st.success() || json.is_none() {
        bail!("{} failed ({st}): {}", p.name, p.stderr());
    }
    serde_json::from_str(json.map(String::as_str).unwrap_or_default())
        .with_context(|| format!("{}: bad output", p.name))
}

/// The daemon's CPU time: per-thread schedstat (ns, live threads only) and
/// /proc/PID/stat utime+stime (10 ms ticks, exited threads included).
#[derive(Debug, Clone, Copy)]
struct DaemonCpu {
    sched: u64,
    ticks: u64,
}

impl DaemonCpu {
    fn read(pid: u32) -> DaemonCpu {
        DaemonCpu {
            sched: proc_sched_ns(pid).unwrap_or(0),
            ticks: proc_utime_stime_ns(&pid.to_string())
                .map(|(u, s)| u + s)
                .unwrap_or(0),
        }
    }

    /// CPU used since `before`: the precise figure, unless the coarse one
    /// shows more than a tick of time that threads took with them.
    fn since(&self, before: &DaemonCpu) -> u64 {
        let s = self.sched.saturating_sub(before.sched);
        let t = self.ticks.saturating_sub(before.ticks);
        if t > s + 10_000_000 {
            t
        } else {
            s
        }
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn has_default_route() -> Result<bool> {
    let v4 = run_cmd(&["ip", "-4", "route", "show", "default"])?;
    let v6 = run_cmd(&["ip", "-6", "route", "show", "default"]).unwrap_or_default();
    Ok(!v4.trim().is_empty() || !v6.trim().is_empty())
}

fn write_sysctls_here() {
    let _ = std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1");
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000");
}

/// Entry point of `ax-bench run`.
pub fn run(args: RunArgs) -> Result<i32> {
    let euid = rustix::process::geteuid().as_raw();
    let in_userns = std::env::var_os("AXB_IN_USERNS").is_some();
    if euid != 0 && !args.unprivileged {
        bail!(
            "`ax-bench run` needs root: it makes network namespaces for the veth, bridge, \
             slirp4netns and pasta rows. Run `sudo bash scripts/bench.sh`, or \
             `ax-bench run --unprivileged` for the ax local, TCP loopback, AF_UNIX and trapped TCP rows only."
        );
    }
    if which("ip").is_none() {
        bail!("`ip` (iproute2) is not installed");
    }
    let mut ax_blocked: Option<String> = None;
    if has_default_route()? {
        if !args.unprivileged {
            bail!(
                "refusing to run: this network namespace has a default route. The benchmark must \
                 run in a namespace with loopback only, so that a failed interception can never \
                 send packets off the machine. Use `bash scripts/bench.sh`, which runs it in \
                 `unshare --net` with lo up."
            );
        }
        if !in_userns {
            if let Some(code) = reexec_in_userns()? {
                return Ok(code);
            }
        }
        ax_blocked = Some(
            "not run: this namespace has a default route and no loopback-only one could be made \
             (unprivileged user namespaces disabled?)"
                .into(),
        );
    }
    if in_userns || euid == 0 {
        let _ = run_cmd(&["ip", "link", "set", "lo", "up"]);
        write_sysctls_here();
    }
    procs::install_signal_cleanup()?;
    if euid == 0 && !args.unprivileged {
        procs::remove_stale_netns();
    }
    crate::worker::raise_nofile();

    let started = Instant::now();
    let params = Params::new(args.quick, args.rounds);
    let ctx = Ctx {
        exe: std::env::current_exe().context("own path")?,
        tmp: TempDir::new("ax-bench")?,
        params,
        tag: format!("axb{}", std::process::id()),
        apart: transport_cpus(),
    };
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| args.only.is_empty() || args.only.iter().any(|o| o == k.key()))
        .collect();
    for o in &args.only {
        if !Kind::ALL.iter().any(|k| k.key() == o) {
            bail!("--only: unknown transport {o:?}");
        }
    }

    // The ax daemon first: the ax row, the overhead and the scale checks use it.
    let ax_path = resolve_ax(args.ax.as_deref());
    let ax_env: Result<AxEnv, String> = if let Some(b) = &ax_blocked {
        Err(b.clone())
    } else {
        match &ax_path {
            None => {
                Err("not available: no `ax` binary (build it: cargo build --release -p ax)".into())
            }
            Some(p) if kinds.contains(&Kind::Ax) => {
                eprintln!("ax-bench: starting a private ax daemon ({})", p.display());
                setup_ax(&ctx, p).map_err(|e| format!("not available: {e:#}"))
            }
            Some(_) => Err("not selected".into()),
        }
    };

    let mut states: Vec<(Kind, Result<Live, String>)> = Vec::new();
    for &k in &kinds {
        if procs::stopping() {
            bail!("stopping");
        }
        let st = if k.needs_root() && args.unprivileged {
            Err("not run: needs root (--unprivileged)".to_string())
        } else {
            eprintln!("ax-bench: setting up {}", k.label());
            setup(&ctx, k, ax_env.as_ref().ok()).map_err(|e| match &ax_env {
                Err(why) if k == Kind::Ax => why.clone(),
                _ => format!("not available: {e:#}"),
            })
        };
        if let Err(e) = &st {
            eprintln!("ax-bench: {}: {e}", k.label());
        }
        states.push((k, st));
    }

    let p = &ctx.params;
    let mut rounds: Vec<Vec<RoundResult>> = vec![Vec::new(); states.len()];
    let mut extras = report::AxExtras::default();
    for r in 0..p.rounds {
        let mut order: Vec<usize> = (0..states.len()).filter(|&i| states[i].1.is_ok()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        eprintln!(
            "ax-bench: round {}/{} ({})",
            r + 1,
            p.rounds,
            order
                .iter()
                .map(|&i| states[i].0.key())
                .collect::<Vec<_>>()
                .join(" → ")
        );
        for i in order {
            if procs::stopping() {
                bail!("stopping");
            }
            let (k, st) = &states[i];
            let Ok(live) = st else { continue };
            let rr = measure(&ctx, *k, live, ax_env.as_ref().ok(), &rounds[i]);
            eprintln!("  {:<13} {}", k.label(), brief(&rr));
            rounds[i].push(rr);
        }
        if let Ok(env) = &ax_env {
            overheads(&ctx, env, r, &mut extras);
        }
    }

    if let Ok(env) = &ax_env {
        if !args.no_scale {
            eprintln!("ax-bench: scale check: connect latency with many services");
            extras.scale_services = Some(scale_services(&ctx, env));
        }
    }
    // The concurrency check starts daemons of its own, pinned.
    let ax_for_conc = match (&ax_env, &ax_path) {
        (Ok(_), Some(p)) if !args.no_scale => Some(p.clone()),
        _ => None,
    };
    if let Some(ax) = ax_for_conc {
        eprintln!(
            "ax-bench: scale check: {} apps connecting concurrently",
            p.concurrent_apps
        );
        extras.concurrency = Some(concurrency(&ctx, &ax));
    }

    if let (Ok(_), Some(ax)) = (&ax_env, &ax_path) {
        eprintln!(
            "ax-bench: idle check: {IDLE_SERVERS} servers blocked in accept, for {} s",
            IDLE_WINDOW.as_secs()
        );
        extras.idle = Some(idle(&ctx, ax));
    }

    // Stop everything before writing: the namespaces go with the processes.
    let transports: Vec<(Kind, Option<String>, Vec<RoundResult>)> = states
        .into_iter()
        .zip(rounds)
        .map(|((k, st), rr)| (k, st.err(), rr))
        .collect();
    let ax_reason = ax_env.as_ref().err().cloned();
    drop(ax_env);

    let results = Results::build(
        &ctx.params,
        transports,
        ax_reason,
        extras,
        meta(ax_path.as_deref(), args.unprivileged),
        started.elapsed().as_secs_f64(),
    );
    let md = report::markdown(&results);
    println!("{md}");
    if let Some(f) = &args.out_md {
        write_file(f, &md)?;
    }
    if let Some(f) = &args.out_svg {
        write_file(f, &report::svg(&results))?;
    }
    if let Some(f) = &args.out_json {
        write_file(f, &(serde_json::to_string_pretty(&results)? + "\n"))?;
    }
    Ok(0)
}

fn write_file(f: &Path, s: &str) -> Result<()> {
    if let Some(d) = f.parent() {
        if !d.as_os_str().is_empty() {
            std::fs::create_dir_all(d)?;
        }
    }
    std::fs::write(f, s).with_context(|| format!("write {}", f.display()))
}

/// Runs the benchmark again inside `unshare --user --map-root-user --net`;
/// `None` when that cannot be done here.
fn reexec_in_userns() -> Result<Option<i32>> {
    let probe = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        return Ok(None);
    }
    eprintln!("ax-bench: re-running in a new user + network namespace (loopback only)");
    let exe = std::env::current_exe()?;
    let st = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("AXB_IN_USERNS", "1")
        .status()
        .context("unshare")?;
    Ok(Some(st.code().unwrap_or(1)))
}

fn resolve_ax(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    let sibling = std::env::current_exe().ok()?.with_file_name("ax");
    if sibling.is_file() {
        return Some(sibling);
    }
    which("ax")
}

/// `argv` run on `cpus` (`taskset -c CPUS`), or as it is without.
fn pinned(cpus: Option<&str>, argv: Vec<String>) -> Vec<String> {
    match cpus {
        Some(c) => ["taskset", "-c", c]
            .into_iter()
            .map(String::from)
            .chain(argv)
            .collect(),
        None => argv,
    }
}

/// Starts `ax daemon --socket SOCK` (pinned with taskset when `cpus` is
/// given) and waits until it answers.
fn start_daemon(ctx: &Ctx, ax: &Path, sock: &Path, name: &str, cpus: Option<&str>) -> Result<Proc> {
    let argv = pinned(
        cpus,
        vec![
            ax.display().to_string(),
            "daemon".into(),
            "--socket".into(),
            sock.display().to_string(),
        ],
    );
    let log = ctx.log(name);
    let mut daemon = spawn(
        name,
        &argv,
        &Spawn {
            stdin: false,
            stderr_file: Some(log.clone()),
        },
    )?;
    let t = Instant::now();
    loop {
        match ax_services(ax, sock) {
            Ok(_) => return Ok(daemon),
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                bail!("ax daemon did not answer: {e:#} (log: {})", tail(&log))
            }
            Err(_) => {
                if daemon.exited() {
                    bail!("ax daemon exited: {}", tail(&log));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn setup_ax(ctx: &Ctx, ax: &Path) -> Result<AxEnv> {
    let sock = ctx.tmp.path.join("ax.sock");
    let daemon = start_daemon(ctx, ax, &sock, "ax-daemon", None)?;
    let mut env = AxEnv {
        ax: ax.to_path_buf(),
        sock,
        egress_server: None,
        daemon,
    };
    // `ax exec -- true` must work before anything is measured.
    let mut argv = env.exec_prefix(None);
    argv.push("true".into());
    let mut p = spawn("ax-exec-true", &argv, &Spawn::default())?;
    let st = p.wait_exit(Duration::from_secs(20))?;
    if !st.success() {
        bail!("`ax exec -- true` failed ({st}): {}", p.stderr());
    }
    env.egress_server = Some(ctx.start_server(
        "egress-server",
        &[],
        &["serve", "--bind", &format!("127.0.0.1:{EGRESS_PORT}")],
    )?);
    Ok(env)
}

/// Starts transport `k`'s server, and says how its client reaches it: the
/// client on the first CPU and the server on the last, where there are two
/// (see [`transport_cpus`]).
fn setup(ctx: &Ctx, k: Kind, ax: Option<&AxEnv>) -> Result<Live> {
    let mut live = start_transport(ctx, k, ax)?;
    let client_cpu = ctx.apart.as_ref().map(|(client, _)| client.as_str());
    live.client_prefix = pinned_program(client_cpu, std::mem::take(&mut live.client_prefix));
    Ok(live)
}

/// `prefix` (which runs a program) with the program it runs on `cpus`:
/// after the last `--` of a supervisor's prefix (`ax exec … --`,
/// `ax-bench null-supervisor … --`), so that the supervisor itself is not
/// pinned; in front of any other (`ip netns exec NAME`).
fn pinned_program(cpus: Option<&str>, prefix: Vec<String>) -> Vec<String> {
    match prefix.iter().rposition(|a| a == "--") {
        Some(at) if cpus.is_some() => {
            let (outer, inner) = prefix.split_at(at + 1);
            let mut argv = outer.to_vec();
            argv.extend(pinned(cpus, inner.to_vec()));
            argv
        }
        _ => pinned(cpus, prefix),
    }
}

/// The CPUs (client, server) every transport's client and server run on:
/// the first and the last this process may use, when there are two and
/// `taskset` is installed. Left to the scheduler, a client and its server
/// land on one CPU in some rounds and on two in others, and on a VM the two
/// differ tenfold (a TCP loopback round trip of 6.5 µs against 60 µs), so
/// that a transport's median would tell where its rounds happened to run.
/// Supervisors (the ax daemon, `ax exec`, the null supervisor) are never
/// pinned.
fn transport_cpus() -> Option<(String, String)> {
    which("taskset")?;
    let (client, server) = cpus_apart()?;
    Some((client.to_string(), server.to_string()))
}

fn start_transport(ctx: &Ctx, k: Kind, ax: Option<&AxEnv>) -> Result<Live> {
    // Every server on the server's CPU (see `transport_cpus`).
    let server_cpu = ctx.apart.as_ref().map(|(_, server)| server.as_str());
    let serve = |name: &str, prefix: &[String], args: &[&str]| {
        ctx.start_server(name, &pinned_program(server_cpu, prefix.to_vec()), args)
    };
    match k {
        Kind::Ax => {
            let env = ax.context("no ax daemon")?;
            let server = serve(
                "ax-server",
                &env.exec_prefix(Some(AX_VIP)),
                &["serve", "--bind", &format!("0.0.0.0:{AX_PORT}")],
            )?;
            let want = format!("{AX_VIP}:{AX_PORT}");
            wait_services(&env.ax, &env.sock, Duration::from_secs(10), &want, |s| {
                s.iter().any(|a| a == &want)
            })?;
            Ok(Live {
                client_prefix: env.exec_prefix(None),
                connect: want,
                _server: server,
                _helpers: vec![],
                _netns: vec![],
            })
        }
        Kind::Tcp => {
            let a = format!("127.0.0.1:{TCP_PORT}");
            let server = serve("tcp-server", &[], &["serve", "--bind", &a])?;
            Ok(Live {
                client_prefix: vec![],
                connect: a,
                _server: server,
                _helpers: vec![],
                _netns: vec![],
            })
        }
        Kind::Unix => {
            let a = format!("unix:{}", ctx.tmp.path.join("unix.sock").display());
            let server = serve("unix-server", &[], &["serve", "--bind", &a])?;
            Ok(Live {
                client_prefix: vec![],
                connect: a,
                _server: server,
                _helpers: vec![],
                _netns: vec![],
            })
        }
        Kind::Trapped | Kind::Installed => {
            let mut prefix = vec![ctx.exe.display().to_string(), "null-supervisor".into()];
            let (port, name) = if k == Kind::Installed {
                prefix.push("--install".into());
                (INSTALLED_PORT, "installed-server")
            } else {
                (TRAPPED_PORT, "trapped-server")
            };
            prefix.push("--".into());
            let a = format!("127.0.0.1:{port}");
            let server = serve(name, &prefix, &["serve", "--bind", &a])?;
            Ok(Live {
                client_prefix: prefix,
                connect: a,
                _server: server,
                _helpers: vec![],
                _netns: vec![],
            })
        }
        Kind::Veth => {
            let n1 = ctx.ns("v1")?;
            let n2 = ctx.ns("v2")?;
            n1.ip(&[
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &n2.name,
            ])?;
            n1.ip(&["addr", "add", "10.99.1.1/24", "dev", "veth0"])?;
            n2.ip(&["addr", "add", "10.99.1.2/24", "dev", "veth1"])?;
            n1.ip(&["link", "set", "veth0", "up"])?;
            n2.ip(&["link", "set", "veth1", "up"])?;
            let a = format!("10.99.1.2:{TCP_PORT}");
            let server = serve("veth-server", &n2.prefix(), &["serve", "--bind", &a])?;
            probe(ctx, &n1.prefix(), &a)?;
            Ok(Live {
                client_prefix: n1.prefix(),
                connect: a,
                _server: server,
                _helpers: vec![],
                _netns: vec![n1, n2],
            })
        }
        Kind::Bridge => {
            let br = ctx.ns("br")?;
            let b1 = ctx.ns("b1")?;
            let b2 = ctx.ns("b2")?;
            br.ip(&["link", "add", "br0", "type", "bridge"])?;
            br.ip(&["link", "set", "br0", "up"])?;
            for (i, b) in [(1, &b1), (2, &b2)] {
                let port = format!("vb{i}");
                br.ip(&[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &b.name,
                ])?;
                br.ip(&["link", "set", &port, "master", "br0"])?;
                br.ip(&["link", "set", &port, "up"])?;
                b.ip(&["addr", "add", &format!("10.99.2.{i}/24"), "dev", "eth0"])?;
                b.ip(&["link", "set", "eth0", "up"])?;
            }
            let a = format!("10.99.2.2:{TCP_PORT}");
            let server = serve("bridge-server", &b2.prefix(), &["serve", "--bind", &a])?;
            // A new bridge port learns and forwards after a moment.
            probe(ctx, &b1.prefix(), &a)?;
            Ok(Live {
                client_prefix: b1.prefix(),
                connect: a,
                _server: server,
                _helpers: vec![],
                _netns: vec![br, b1, b2],
            })
        }
        Kind::Slirp4netns => {
            let bin = which("slirp4netns").context("slirp4netns is not installed")?;
            // The server listens on 127.0.0.1 here; the client runs in the
            // slirp namespace and reaches it at 10.0.2.2, which slirp4netns
            // maps to this namespace's loopback (a rootless container
            // talking to a service on its host).
            let a = format!("127.0.0.1:{SLIRP_PORT}");
            let server = serve("slirp-server", &[], &["serve", "--bind", &a])?;
            let ns = ctx.ns("slirp")?;
            let mut slirp = spawn(
                "slirp4netns",
                &[
                    bin.display().to_string(),
                    "--configure".into(),
                    "--mtu=65520".into(),
                    "--netns-type=path".into(),
                    ns.path(),
                    "tap0".into(),
                ],
                &Spawn {
                    stdin: false,
                    stderr_file: Some(ctx.log("slirp4netns")),
                },
            )?;
            let t = Instant::now();
            while !ns
                .ip(&["-4", "addr", "show", "tap0"])
                .map(|s| s.contains("10.0.2.100"))
                .unwrap_or(false)
            {
                if slirp.exited() || t.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "slirp4netns did not come up: {}",
                        tail(&ctx.log("slirp4netns"))
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            limit_time_wait(&ns)?;
            let a = format!("10.0.2.2:{SLIRP_PORT}");
            probe(ctx, &ns.prefix(), &a)?;
            Ok(Live {
                client_prefix: ns.prefix(),
                connect: a,
                _server: server,
                _helpers: vec![slirp],
                _netns: vec![ns],
            })
        }
        Kind::Pasta => {
            let bin = which("pasta").context("pasta (package passt) is not installed")?;
            // pasta copies addresses and routes from a host interface; this
            // namespace has none, so the "host" side is a namespace of its
            // own with a veth pair whose both ends stay inside it (and no
            // default route). The server listens on that side's loopback;
            // the client runs in pasta's namespace and reaches it at the
            // gateway address, which pasta maps to the host's loopback.
            let host = ctx.ns("pasta-host")?;
            let guest = ctx.ns("pasta")?;
            host.ip(&[
                "link", "add", "ext0", "type", "veth", "peer", "name", "ext1",
            ])?;
            host.ip(&["addr", "add", "10.99.3.1/24", "dev", "ext0"])?;
            host.ip(&["link", "set", "ext1", "up"])?;
            host.ip(&["link", "set", "ext0", "up"])?;
            let server = serve(
                "pasta-server",
                &host.prefix(),
                &["serve", "--bind", &format!("127.0.0.1:{TCP_PORT}")],
            )?;
            let mut argv = host.prefix();
            argv.extend([
                bin.display().to_string(),
                "--foreground".into(),
                "--runas".into(),
                "0:0".into(),
                "--config-net".into(),
                "-i".into(),
                "ext0".into(),
                "-g".into(),
                PASTA_GW.into(),
                "-t".into(),
                "none".into(),
                "-T".into(),
                "none".into(),
                "-u".into(),
                "none".into(),
                "-U".into(),
                "none".into(),
                "-l".into(),
                ctx.log("pasta").display().to_string(),
                "--netns".into(),
                guest.path(),
            ]);
            let pasta = spawn(
                "pasta",
                &argv,
                &Spawn {
                    stdin: false,
                    stderr_file: Some(ctx.log("pasta-stderr")),
                },
            )?;
            limit_time_wait(&guest)?;
            let a = format!("{PASTA_GW}:{TCP_PORT}");
            probe(ctx, &guest.prefix(), &a)
                .map_err(|e| anyhow!("{e:#}; pasta: {}", tail(&ctx.log("pasta"))))?;
            Ok(Live {
                client_prefix: guest.prefix(),
                connect: a,
                _server: server,
                _helpers: vec![pasta],
                _netns: vec![guest, host],
            })
        }
    }
}

/// In a rootless peer's namespace (the client side): the user-mode stacks
/// answer without TCP timestamps, so TIME_WAIT entries there cannot be
/// reused, and 20,000 connections per round would exhaust the client's
/// ports within two rounds (seen: 4,700 → 590 → 100 conn/s). Keep at most
/// 1,024 TIME_WAIT entries there, as a churning client talking to many
/// peers would effectively see.
fn limit_time_wait(ns: &Netns) -> Result<()> {
    ns.exec_sh("echo 1024 > /proc/sys/net/ipv4/tcp_max_tw_buckets")
        .map(|_| ())
}

/// Waits until a connect to `addr` from `prefix` succeeds (up to 10 s).
fn probe(ctx: &Ctx, prefix: &[String], addr: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let r = ctx.worker(
            "probe",
            prefix,
            &[
                "client",
                "--connect",
                addr,
                "--mode",
                "egress",
                "--iterations",
                "1",
            ],
            Duration::from_secs(10),
        );
        let err = match r {
            Ok(Report::Egress(c)) if c.errors == 0 => return Ok(()),
            Ok(Report::Egress(c)) => c.first_error.unwrap_or_default(),
            Ok(other) => format!("unexpected {other:?}"),
            Err(e) => format!("{e:#}"),
        };
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{addr} not reachable: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bulk bytes for a transport: `bulk_bytes`, or for a transport whose
/// earlier rounds ran slower than that allows, about 8 seconds' worth
/// (at least 64 MiB), so slow user-mode stacks do not take over the run.
fn bulk_bytes_for(full: u64, earlier: &[RoundResult]) -> u64 {
    let rates: Vec<f64> = earlier
        .iter()
        .filter_map(|r| r.bulk.as_ref().map(|b| b.gbit_s))
        .collect();
    match crate::stats::median(&rates) {
        Some(g) => {
            let cap = (g * 1e9 / 8.0 * 8.0) as u64;
            full.min(cap.max(64 << 20)) & !((1 << 20) - 1)
        }
        None => full,
    }
}

fn measure(
    ctx: &Ctx,
    k: Kind,
    live: &Live,
    ax: Option<&AxEnv>,
    earlier: &[RoundResult],
) -> RoundResult {
    let p = &ctx.params;
    let mut rr = RoundResult::default();
    let pp_iters = p.pingpong_iterations.to_string();
    match ctx.client(live, "pingpong", &["--iterations", &pp_iters]) {
        Ok(Report::Pingpong(x)) => rr.pingpong = Some(x),
        Ok(o) => rr.errors.push(format!("pingpong: unexpected {o:?}")),
        Err(e) => rr.errors.push(format!("pingpong: {e:#}")),
    }
    let bytes = bulk_bytes_for(p.bulk_bytes, earlier).to_string();
    let daemon = ax.filter(|_| k == Kind::Ax).map(|a| a.daemon.pid());
    let bulk = match daemon {
        Some(pid) => ctx.bulk_synced(live, &bytes, pid).map(|(r, w, l)| {
            rr.broker_cpu_ns = Some(w);
            rr.broker_cpu_life_ns = Some(l);
            r
        }),
        None => ctx.client(live, "bulk", &["--bytes", &bytes]),
    };
    match bulk {
        Ok(Report::Bulk(x)) => rr.bulk = Some(x),
        Ok(o) => rr.errors.push(format!("bulk: unexpected {o:?}")),
        Err(e) => rr.errors.push(format!("bulk: {e:#}")),
    }
    let n = p.connrate_iterations.to_string();
    let cap = p.connrate_max_seconds.to_string();
    match ctx.client(
        live,
        "connrate",
        &["--iterations", &n, "--max-seconds", &cap],
    ) {
        Ok(Report::Connrate(x)) => {
            if x.errors > 0 {
                rr.errors.push(format!(
                    "connrate: {} of {} failed: {}",
                    x.errors,
                    x.iterations,
                    x.first_error.clone().unwrap_or_default()
                ));
            }
            rr.connrate = Some(x);
        }
        Ok(o) => rr.errors.push(format!("connrate: unexpected {o:?}")),
        Err(e) => rr.errors.push(format!("connrate: {e:#}")),
    }
    rr
}

fn brief(rr: &RoundResult) -> String {
    let mut s = Vec::new();
    if let Some(p) = &rr.pingpong {
        s.push(format!("rtt {:.1}/{:.1} µs", p.median_us, p.p99_us));
    }
    if let Some(b) = &rr.bulk {
        s.push(format!("{:.1} Gbit/s", b.gbit_s));
    }
    if let Some(c) = &rr.connrate {
        s.push(format!("{:.0} conn/s", c.conn_per_s));
    }
    if let Some(b) = rr.broker_cpu_ns {
        s.push(format!("broker {:.2} ms", b as f64 / 1e6));
    }
    for e in &rr.errors {
        s.push(format!("ERROR {e}"));
    }
    s.join(", ")
}

/// Syscall and egress overheads, native and under ax, in alternating order.
fn overheads(ctx: &Ctx, env: &AxEnv, round: usize, x: &mut report::AxExtras) {
    let p = &ctx.params;
    let n = p.syscall_iterations.to_string();
    let axp = env.exec_prefix(None);
    let mut pair = [(false, &[][..]), (true, &axp[..])];
    if round % 2 == 1 {
        pair.reverse();
    }
    for (under_ax, prefix) in pair {
        match ctx.worker(
            "syscall",
            prefix,
            &["syscall", "--iterations", &n],
            Duration::from_secs(120),
        ) {
            Ok(Report::Syscall(s)) => {
                if under_ax {
                    x.syscall_ax.push(s)
                } else {
                    x.syscall_native.push(s)
                }
            }
            Ok(o) => x.errors.push(format!("syscall: unexpected {o:?}")),
            Err(e) => x.errors.push(format!("syscall: {e:#}")),
        }
    }
    let target = format!("127.0.0.1:{EGRESS_PORT}");
    let (native, under_ax) = egress_pair(ctx, &pair, &[], &target, &mut x.errors);
    x.egress_native.extend(native);
    x.egress_ax.extend(under_ax);
    // The same against a server that never sleeps, on a CPU of its own
    // (started for these two runs only: it keeps its CPU busy).
    if let Some((client_cpu, server_cpu)) = cpus_apart() {
        let target = format!("127.0.0.1:{EGRESS_BUSY_PORT}");
        match ctx.start_server(
            "egress-busy-server",
            &pinned(Some(&server_cpu.to_string()), Vec::new()),
            &["serve", "--bind", &target, "--spin"],
        ) {
            Ok(server) => {
                let pin = pinned(Some(&client_cpu.to_string()), Vec::new());
                let (native, under_ax) = egress_pair(ctx, &pair, &pin, &target, &mut x.errors);
                drop(server);
                x.egress_busy_native.extend(native);
                x.egress_busy_ax.extend(under_ax);
            }
            Err(e) => x.errors.push(format!("egress, busy server: {e:#}")),
        }
    }
    let med = |v: &[Syscall]| v.last().map(|s| s.median_ns).unwrap_or(f64::NAN);
    let emed = |v: &[ConnRate]| v.last().map(|s| s.connect_median_us).unwrap_or(f64::NAN);
    eprintln!(
        "  {:<13} getppid {:.0} → {:.0} ns under ax; egress connect {:.1} → {:.1} µs, \
         to a server that never sleeps {:.1} → {:.1} µs",
        "ax overheads",
        med(&x.syscall_native),
        med(&x.syscall_ax),
        emed(&x.egress_native),
        emed(&x.egress_ax),
        emed(&x.egress_busy_native),
        emed(&x.egress_busy_ax)
    );
}

/// One egress run natively and one under ax, in `pair`'s order, to the
/// server at `target`, each client started behind `pin` (empty: unpinned):
/// (native, under ax) reports.
fn egress_pair(
    ctx: &Ctx,
    pair: &[(bool, &[String]); 2],
    pin: &[String],
    target: &str,
    errors: &mut Vec<String>,
) -> (Vec<ConnRate>, Vec<ConnRate>) {
    let n = ctx.params.egress_iterations.to_string();
    let (mut native, mut under) = (Vec::new(), Vec::new());
    for &(under_ax, prefix) in pair {
        let prefix: Vec<String> = pin.iter().chain(prefix).cloned().collect();
        match ctx.worker(
            "egress",
            &prefix,
            &["egress", "--connect", target, "--iterations", &n],
            Duration::from_secs(120),
        ) {
            Ok(Report::Egress(c)) => {
                if c.errors > 0 {
                    errors.push(format!(
                        "egress to {target}{}: {} of {} failed: {}",
                        if under_ax { " under ax" } else { "" },
                        c.errors,
                        c.iterations,
                        c.first_error.clone().unwrap_or_default()
                    ));
                }
                if under_ax {
                    under.push(c)
                } else {
                    native.push(c)
                }
            }
            Ok(o) => errors.push(format!("egress: unexpected {o:?}")),
            Err(e) => errors.push(format!("egress: {e:#}")),
        }
    }
    (native, under)
}

/// Two CPUs this process may run on: (the egress clients', the busy egress
/// server's), or `None` with fewer than two.
///
/// Why a busy server: a connect to a server blocked in `accept` wakes it,
/// within the connect, and what that wake-up costs the connecting thread
/// depends on the server's CPU (on a VM, up to 20 µs and more to reach
/// another vCPU). A native client outpaces the server, which then never
/// sleeps; ax's connect, slower, lets it catch up and sleep, so that the
/// wake-up lands in ax's connect at times and not in the native one's, a
/// measure of the machine's scheduling rather than of ax. A real egress
/// connect reaches another machine, whose wake-ups cost nothing here.
fn cpus_apart() -> Option<(usize, usize)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    let cpus = parse_cpu_list(list.trim())?;
    match (cpus.first(), cpus.last()) {
        (Some(&a), Some(&b)) if a != b => Some((a, b)),
        _ => None,
    }
}

/// `0-3,6,8-9` → [0, 1, 2, 3, 6, 8, 9]; `None` if malformed.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Connect latency to one service with 10 services registered, and with
/// `scale_services`: two fresh daemons, one per registry size, each with
/// its own copy of the server; samples alternate between them.
fn scale_services(ctx: &Ctx, env: &AxEnv) -> report::ScaleServices {
    let mut out = report::ScaleServices {
        services_small: 10,
        services_big: ctx.params.scale_services,
        ..Default::default()
    };
    if let Err(e) = scale_services_inner(ctx, env, &mut out) {
        eprintln!("  many services: {e:#}");
        out.error = Some(format!("{e:#}"));
    }
    out
}

fn scale_services_inner(ctx: &Ctx, env: &AxEnv, out: &mut report::ScaleServices) -> Result<()> {
    let p = &ctx.params;
    let target = format!("{AX_VIP}:{AX_PORT}");
    let n = p.scale_connects.to_string();
    // Everything of the check on one CPU, where taskset is: on two, where
    // the scheduler happens to place client, server and daemon threads
    // changes a whole sample's latency twofold (32–40 against 64–77 µs per
    // connect, for either daemon), which drowns what the registry's size
    // does.
    let cpu = which("taskset").map(|_| SCALE_CPU);
    let pin = |v: Vec<String>| pinned(cpu, v);
    let sample = |sock: &Path| -> Result<f64> {
        match ctx.worker(
            "scale-client",
            &pin(exec_prefix(&env.ax, sock, None)),
            &[
                "client",
                "--connect",
                &target,
                "--mode",
                "connrate",
                "--iterations",
                &n,
            ],
            Duration::from_secs(120),
        )? {
            Report::Connrate(c) if c.errors == 0 => Ok(c.connect_median_us),
            Report::Connrate(c) => bail!(
                "{} connects failed: {}",
                c.errors,
                c.first_error.unwrap_or_default()
            ),
            o => bail!("unexpected {o:?}"),
        }
    };
    let helper = |name: &str, sock: &Path, vip: &str, count: u32| -> Result<Proc> {
        ctx.start_server(
            name,
            &pin(exec_prefix(&env.ax, sock, Some(vip))),
            &[
                "many-listeners",
                "--base-port",
                &SCALE_BASE_PORT.to_string(),
                "--count",
                &count.to_string(),
            ],
        )
    };

    // One fresh daemon per registry size, each with its own copy of the
    // server (one service) and a helper app with the rest. (The main
    // daemon has served every other row: its history would bias the pair.)
    let registry = |tag: &str, vip: &str, services: u32| -> Result<(PathBuf, Vec<Proc>, f64)> {
        let sock = ctx.tmp.path.join(format!("scale-{tag}.sock"));
        let daemon = start_daemon(ctx, &env.ax, &sock, &format!("scale-{tag}-daemon"), cpu)?;
        let server = ctx.start_server(
            &format!("scale-{tag}-server"),
            &pin(exec_prefix(&env.ax, &sock, Some(AX_VIP))),
            &["serve", "--bind", &format!("0.0.0.0:{AX_PORT}")],
        )?;
        wait_services(&env.ax, &sock, Duration::from_secs(10), &target, |s| {
            s.iter().any(|a| a == &target)
        })?;
        let t = Instant::now();
        let h = helper(
            &format!("scale-{tag}"),
            &sock,
            vip,
            services.saturating_sub(1).max(1),
        )?;
        wait_services(&env.ax, &sock, Duration::from_secs(120), tag, |s| {
            s.len() >= services as usize
        })?;
        let secs = t.elapsed().as_secs_f64();
        // Drop order: helper and server before their daemon.
        Ok((sock, vec![h, server, daemon], secs))
    };
    let (sock_small, _small, _) = registry("small", SCALE_SMALL_VIP, 10)?;
    let (sock_big, _big, secs) = registry("big", SCALE_BIG_VIP, p.scale_services)?;
    out.services_small = 10;
    out.services_big = p.scale_services;
    out.register_seconds = Some(secs);
    let (want_small, want_big) = (out.services_small, out.services_big);

    for i in 0..(2 * p.rounds + 1) {
        if procs::stopping() {
            bail!("stopping");
        }
        let (a, b) = if i % 2 == 0 {
            let a = sample(&sock_small)?;
            (a, sample(&sock_big)?)
        } else {
            let b = sample(&sock_big)?;
            (sample(&sock_small)?, b)
        };
        eprintln!("  connect with {want_small} services {a:.1} µs, with {want_big} {b:.1} µs");
        out.small_us.push(a);
        out.big_us.push(b);
    }
    Ok(())
}

/// What servers that do nothing cost the daemon: `IDLE_SERVERS` servers
/// under ax, each blocked in `accept` on a listener of its own, on a fresh
/// daemon; its CPU time and its threads' wake-ups over `IDLE_WINDOW`, per
/// second and server.
fn idle(ctx: &Ctx, ax: &Path) -> report::Idle {
    let mut out = report::Idle {
        servers: IDLE_SERVERS,
        ..Default::default()
    };
    if let Err(e) = idle_inner(ctx, ax, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out
}

fn idle_inner(ctx: &Ctx, ax: &Path, out: &mut report::Idle) -> Result<()> {
    let sock = ctx.tmp.path.join("idle.sock");
    let daemon = start_daemon(ctx, ax, &sock, "idle-daemon", None)?;
    let mut servers = Vec::new();
    for i in 0..IDLE_SERVERS {
        let vip = format!("{IDLE_VIP_BASE}{i}");
        servers.push(ctx.start_server(
            &format!("idle-server-{i}"),
            &exec_prefix(ax, &sock, Some(&vip)),
            &[
                "serve",
                "--bind",
                &format!("0.0.0.0:{AX_PORT}"),
                "--mode",
                "connrate",
            ],
        )?);
    }
    wait_services(ax, &sock, Duration::from_secs(30), "idle", |s| {
        s.len() >= IDLE_SERVERS as usize
    })?;
    std::thread::sleep(IDLE_SETTLE);
    let pid = daemon.pid();
    let (cpu, woken) = (DaemonCpu::read(pid), wakeups(pid));
    let t = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let per_server_s = t.elapsed().as_secs_f64() * f64::from(IDLE_SERVERS);
    out.cpu_us_per_s = Some(DaemonCpu::read(pid).since(&cpu) as f64 / 1e3 / per_server_s);
    out.wakeups_per_s = Some(wakeups(pid).saturating_sub(woken) as f64 / per_server_s);
    if servers.iter_mut().any(|s| s.exited()) {
        bail!("a server exited during the check");
    }
    // Drop order: servers before their daemon.
    drop(servers);
    drop(daemon);
    Ok(())
}

/// Context switches of all of `pid`'s threads so far: each is a wake-up
/// (a thread that runs on until it is preempted counts one too).
fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `concurrent_apps` `ax exec` clients connecting at once, everything pinned
/// to one core, then to two (order 1, 2, 2, 1 in full runs).
fn concurrency(ctx: &Ctx, ax: &Path) -> report::Concurrency {
    let mut out = report::Concurrency {
        apps: ctx.params.concurrent_apps,
        connects_each: ctx.params.concurrent_connects_each,
        ..Default::default()
    };
    if which("taskset").is_none() {
        out.error = Some("not available: taskset (util-linux) is not installed".into());
        return out;
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let plan: &[&str] = if cpus < 2 {
        out.error = Some("only one CPU: the 2-core run is skipped".into());
        &["0"]
    } else if ctx.params.rounds >= 4 {
        &["0", "0,1", "0,1", "0"]
    } else {
        &["0", "0,1"]
    };
    for (i, set) in plan.iter().enumerate() {
        if procs::stopping() {
            break;
        }
        match concurrency_run(ctx, ax, set, i) {
            Ok(r) => {
                eprintln!(
                    "  cores {:<4} {:.0} conn/s, {} errors, {} clients failed",
                    set, r.conn_per_s, r.errors, r.clients_failed
                );
                out.runs.push(r)
            }
            Err(e) => {
                eprintln!("  cores {set}: {e:#}");
                out.error = Some(format!("cores {set}: {e:#}"));
                break;
            }
        }
    }
    out
}

fn concurrency_run(ctx: &Ctx, ax: &Path, cpus: &str, i: usize) -> Result<report::ConcRun> {
    let p = &ctx.params;
    let pin = |v: Vec<String>| pinned(Some(cpus), v);
    let sock = ctx.tmp.path.join(format!("conc{i}.sock"));
    let daemon = start_daemon(ctx, ax, &sock, &format!("conc{i}-daemon"), Some(cpus))?;
    let server = ctx.start_server(
        "conc-server",
        &pin(exec_prefix(ax, &sock, Some(CONC_VIP))),
        &[
            "serve",
            "--bind",
            &format!("0.0.0.0:{CONC_PORT}"),
            "--mode",
            "connrate",
            "--threads",
            "2",
        ],
    )?;
    let target = format!("{CONC_VIP}:{CONC_PORT}");
    wait_services(ax, &sock, Duration::from_secs(10), &target, |s| {
        s.iter().any(|a| a == &target)
    })?;
    let each = p.concurrent_connects_each.to_string();
    let mut clients = Vec::new();
    for c in 0..p.concurrent_apps {
        let argv = ctx.argv(
            &pin(exec_prefix(ax, &sock, None)),
            &[
                "client",
                "--connect",
                &target,
                "--mode",
                "connrate",
                "--iterations",
                &each,
                "--wait-stdin",
            ],
        );
        clients.push(spawn(
            &format!("conc-client-{c}"),
            &argv,
            &Spawn {
                stdin: true,
                stderr_file: None,
            },
        )?);
    }
    let mut failed = 0u32;
    let mut first_error: Option<String> = None;
    for c in clients.iter_mut() {
        if let Err(e) = c.wait_line(Duration::from_secs(60), |l| l == "READY") {
            failed += 1;
            first_error.get_or_insert(format!("{e:#}"));
        }
    }
    // Start barrier: every client waits for EOF on stdin.
    for c in clients.iter_mut() {
        c.close_stdin();
    }
    let (mut ok, mut errors) = (0u64, 0u64);
    let (mut start, mut end) = (u64::MAX, 0u64);
    for c in clients.iter_mut() {
        match c.finish(Duration::from_secs(120)) {
            Ok((st, lines)) => {
                let r = lines
                    .iter()
                    .rev()
                    .find(|l| l.starts_with('{'))
                    .and_then(|l| serde_json::from_str::<Report>(l).ok());
                match (st.success(), r) {
                    (true, Some(Report::Connrate(x))) => {
                        ok += x.ok;
                        errors += x.errors;
                        if x.errors > 0 {
                            first_error.get_or_insert(x.first_error.clone().unwrap_or_default());
                        }
                        start = start.min(x.start_ns);
                        end = end.max(x.end_ns);
                    }
                    _ => {
                        failed += 1;
                        first_error.get_or_insert(format!("{} ({st}): {}", c.name, c.stderr()));
                    }
                }
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    drop(clients);
    drop(server);
    drop(daemon);
    let secs = end.saturating_sub(start) as f64 / 1e9;
    Ok(report::ConcRun {
        cpus: cpus.to_string(),
        cores: cpus.split(',').count() as u32,
        ok,
        errors,
        clients_failed: failed,
        seconds: secs,
        conn_per_s: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        first_error,
    })
}

fn meta(ax: Option<&Path>, unprivileged: bool) -> report::Meta {
    let version = |argv: &[&str]| -> Option<String> {
        let out = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        s.lines()
            .find(|l| !l.trim().is_empty() && !l.contains("syslog"))
            .map(|l| l.trim().to_string())
    };
    let ax_version = ax.and_then(|p| version(&[&p.display().to_string(), "--version"]));
    let date = version(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    report::Meta {
        date,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model: std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        unprivileged,
        ax_version,
        slirp4netns_version: version(&["slirp4netns", "--version"]),
        pasta_version: which("pasta").map(|_| {
            std::process::Command::new("dpkg-query")
                .args(["-W", "-f=${Version}", "passt"])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|v| format!("passt {v}"))
                .unwrap_or_else(|| "installed".into())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::Bulk;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("0-99999999"), None);
    }

    fn round(gbit: f64) -> RoundResult {
        RoundResult {
            bulk: Some(Bulk {
                bytes: 0,
                seconds: 0.0,
                gbit_s: gbit,
                client_cpu_ns: 0,
                server_cpu_ns: 0,
                client_utime_ns: 0,
                client_stime_ns: 0,
                server_utime_ns: 0,
                server_stime_ns: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn bulk_size_adapts_to_slow_transports() {
        let full = 2u64 << 30;
        assert_eq!(bulk_bytes_for(full, &[]), full);
        assert_eq!(bulk_bytes_for(full, &[round(30.0)]), full);
        // 1 Gbit/s: 8 s is 1e9 bytes, rounded down to whole MiB.
        assert_eq!(bulk_bytes_for(full, &[round(1.0)]), 953 << 20);
        assert_eq!(bulk_bytes_for(full, &[round(0.01)]), 64 << 20);
    }

    #[test]
    fn a_supervisors_program_is_pinned_not_the_supervisor() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ax = v(&["ax", "exec", "--ip", "10.0.0.1", "--"]);
        assert_eq!(
            pinned_program(Some("1"), ax.clone()),
            v(&["ax", "exec", "--ip", "10.0.0.1", "--", "taskset", "-c", "1"])
        );
        assert_eq!(
            pinned_program(Some("0"), v(&["ip", "netns", "exec", "n1"])),
            v(&["taskset", "-c", "0", "ip", "netns", "exec", "n1"])
        );
        assert_eq!(
            pinned_program(Some("0"), vec![]),
            v(&["taskset", "-c", "0"])
        );
        assert_eq!(pinned_program(None, ax.clone()), ax);
    }

    #[test]
    fn kinds_are_consistent() {
        for k in Kind::ALL {
            assert!(!k.key().is_empty() && !k.label().is_empty() && !k.describe().is_empty());
        }
        let p = Params::new(true, None);
        assert!(p.rounds >= 3 && p.bulk_bytes < Params::new(false, None).bulk_bytes);
    }
}
