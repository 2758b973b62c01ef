//! `ax daemon`: the registry, the broker and the control socket.
//!
//! The control socket speaks length-prefixed postcard frames
//! ([`ax_proto`]). Only the daemon's own user and root are served. A client
//! registers an app, starts its program under the filter and hands over the
//! notify fd (`SCM_RIGHTS` on the `AttachListener` frame); the broker then
//! serves the app on a thread of its own until its last process exits.
//!
//! The control socket is bounded: a connection that has not handed over an
//! app must complete each frame within [`IDLE_TIMEOUT`] of starting to wait
//! for it, a frame's buffer grows only as its bytes arrive, and each uid
//! keeps at most [`MAX_CONNS_PER_UID`] such connections open: one more
//! closes that uid's oldest connection waiting for a frame, so that `ax get`
//! keeps answering. A launcher's connection, once its app is attached, is
//! exempt from both (it stays open for the program's life).

use crate::cli::DaemonArgs;
use crate::expose::{ExposeError, Exposures};
use crate::hosts::HostsFile;
use crate::paths;
use anyhow::{bail, Context};
use ax_broker::keeper::FdKeeper;
use ax_broker::SocketName;
use ax_broker::{Broker, BrokerConfig, NotifyFd, Session};
use ax_proto::{FrameError, Request, Response};
use ax_registry::{AppId, AppInfo, Directory, LocalRegistry, Policy, Snapshot, UnixEndpoint};
use ax_sys::journal::Journal;
use rustix::fs::FlockOperation;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use std::io::{self, IoSliceMut, IsTerminal, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};

/// Most fds accepted with one read; more are closed unread.
const MAX_FDS_PER_READ: usize = 4;

/// How long a control connection may take to send its next frame.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Control connections one uid may keep open (launchers whose app is
/// attached not counted).
const MAX_CONNS_PER_UID: usize = 256;
/// Most bytes read from a connection at once.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes of unfinished frames one uid's connections may hold together
/// (eight frames of the largest size): past it, that uid's oldest
/// connection waiting for a frame is closed.
const MAX_BUFFERED_PER_UID: usize = 8 * ax_proto::MAX_FRAME_LEN;

/// The daemon's state, shared by every connection.
struct Daemon {
    registry: Arc<LocalRegistry>,
    broker: Broker,
    uid: u32,
    sessions: Mutex<Vec<Session>>,
    /// Where the registry's apps are kept for a successor daemon.
    state_path: PathBuf,
    /// What was last written there.
    saved: Mutex<Option<Snapshot>>,
    /// Services reachable at host addresses.
    exposures: Exposures,
    /// Wildcard services also reachable on the host's loopback.
    loopback: Arc<crate::localhost::HostLoopback>,
    /// Connections the previous daemon had accepted and not handed over,
    /// by app, until its launcher hands the app back.
    salvaged: Mutex<std::collections::HashMap<AppId, Vec<OwnedFd>>>,
    /// Tells programs under ax from clients on the control socket.
    namespaces: crate::peer::AppNamespaces,
    /// Open control connections, for the per-uid cap.
    conns: Arc<Mutex<ConnTable>>,
    /// The daemon's own counters, for `--metrics`.
    counters: Arc<crate::metrics::DaemonCounters>,
    /// OCI containers, handed over on the runtime socket.
    containers: std::sync::OnceLock<Arc<crate::oci::agent::Containers>>,
    /// This host's cluster (`--cluster`), if any.
    cluster: Option<ax_cluster::Cluster>,
    /// The hosts file the launchers show as /etc/hosts (also kept current
    /// by its own thread).
    hosts: Option<Arc<Mutex<HostsFile>>>,
}

/// Open control connections (see the module docs).
#[derive(Default)]
struct ConnTable {
    next_id: u64,
    open: Vec<ConnEntry>,
}

struct ConnEntry {
    id: u64,
    uid: u32,
    /// Since when it waits for a frame (or was accepted).
    idle_since: Instant,
    /// Between a frame received and its answer sent.
    busy: bool,
    /// Its app was handed over: it stays open for the program's life.
    attached: bool,
    /// Bytes of an unfinished frame it holds.
    buffered: usize,
    /// Told to close (no longer counted).
    closing: bool,
    /// Notified to close it.
    close: Arc<tokio::sync::Notify>,
}

/// A connection's place in the [`ConnTable`]; leaves it when dropped.
struct ConnSlot {
    table: Arc<Mutex<ConnTable>>,
    id: u64,
    close: Arc<tokio::sync::Notify>,
}

impl ConnTable {
    /// Enters a connection of `uid`, closing that uid's oldest connection
    /// waiting for a frame if the uid has too many.
    fn enter(table: &Arc<Mutex<ConnTable>>, uid: u32) -> ConnSlot {
        let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
        t.next_id += 1;
        let id = t.next_id;
        let close = Arc::new(tokio::sync::Notify::new());
        t.open.push(ConnEntry {
            id,
            uid,
            idle_since: Instant::now(),
            busy: false,
            attached: false,
            buffered: 0,
            closing: false,
            close: close.clone(),
        });
        let counted = t
            .open
            .iter()
            .filter(|c| c.uid == uid && !c.attached && !c.closing)
            .count();
        if counted > MAX_CONNS_PER_UID {
            t.close_oldest(uid, id, false, "too many control connections of one uid");
        }
        drop(t);
        ConnSlot {
            table: table.clone(),
            id,
            close,
        }
    }
}

impl ConnTable {
    /// Closes the connection of `uid` that has waited longest for a frame,
    /// other than `except` (with part of a frame if `holding`); false if
    /// there is none.
    fn close_oldest(&mut self, uid: u32, except: u64, holding: bool, why: &str) -> bool {
        let oldest = self
            .open
            .iter_mut()
            .filter(|c| c.uid == uid && !c.attached && !c.busy && !c.closing && c.id != except)
            .filter(|c| !holding || c.buffered > 0)
            .min_by_key(|c| c.idle_since);
        let Some(victim) = oldest else {
            return false;
        };
        tracing::debug!(uid, "{why}; closing its oldest idle one");
        // No longer counted: it closes when its task next runs.
        victim.closing = true;
        victim.buffered = 0;
        victim.close.notify_one();
        true
    }
}

impl ConnSlot {
    /// Notes that the connection holds `n` bytes of an unfinished frame,
    /// closing others of its uid if the uid holds too many.
    fn note_buffered(&self, n: usize) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(uid) = t.open.iter_mut().find(|c| c.id == self.id).map(|c| {
            c.buffered = n;
            c.uid
        }) else {
            return;
        };
        loop {
            let total: usize = t
                .open
                .iter()
                .filter(|c| c.uid == uid)
                .map(|c| c.buffered)
                .sum();
            if total <= MAX_BUFFERED_PER_UID
                || !t.close_oldest(
                    uid,
                    self.id,
                    true,
                    "unfinished frames of one uid hold too much memory",
                )
            {
                return;
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut ConnEntry)) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = t.open.iter_mut().find(|c| c.id == self.id) {
            f(c);
        }
    }

    fn attached(&self) -> bool {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.open.iter().any(|c| c.id == self.id && c.attached)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.open.retain(|c| c.id != self.id);
    }
}

impl Daemon {
    fn sessions(&self) -> MutexGuard<'_, Vec<Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_attached(&self, app: AppId) -> bool {
        self.sessions()
            .iter()
            .any(|s| s.app() == app && !s.is_finished())
    }

    /// Writes the registry's apps to the state file when they changed, so
    /// that a daemon started after this one dies can take them over.
    fn save_state(&self) {
        let snap = self.registry.snapshot();
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if saved.as_ref() == Some(&snap) {
            return;
        }
        match write_state(&self.state_path, &snap) {
            Ok(()) => *saved = Some(snap),
            Err(e) => {
                tracing::warn!(path = %self.state_path.display(), error = %e, "cannot save state")
            }
        }
    }

    /// Registers the listeners an earlier daemon (same socket, same
    /// instance) installed for its apps: found in the broker's private
    /// network namespace (where only the broker binds names), and only
    /// those a process of that app holds.
    fn rediscover_services(&self) {
        let instance = self.broker.config().instance;
        let table = match self.broker.private_unix_table() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the private namespace's sockets; no service taken over");
                return;
            }
        };
        let mut held: std::collections::HashMap<AppId, std::collections::HashSet<u64>> =
            Default::default();
        for row in table {
            let (true, Some(name)) = (row.listening, row.abstract_name) else {
                continue;
            };
            let inode = row.inode;
            let Some(SocketName::Listener {
                instance: inst,
                v6,
                app,
                bound,
                reuseport,
            }) = SocketName::parse(name.as_bytes())
            else {
                continue;
            };
            if inst != instance {
                continue;
            }
            let inodes = held.entry(app).or_insert_with(|| {
                self.registry
                    .apps()
                    .iter()
                    .find(|a| a.id == app)
                    .map_or_else(Default::default, |a| socket_inodes_of_tree(a.pid))
            });
            if !inodes.contains(&inode) {
                tracing::warn!(app, addr = %bound, inode, "not taking over a listener no process of its app holds");
                continue;
            }
            let vips = self.registry.app_vips(app);
            let ips: Vec<_> = if bound.ip().is_unspecified() {
                vips.into_iter().filter(|ip| v6 || ip.is_ipv4()).collect()
            } else {
                vec![bound.ip()]
            };
            let endpoint = UnixEndpoint::Abstract(name.as_bytes().to_vec());
            if !ips.is_empty()
                && self.registry.restore_service(
                    app,
                    &ips,
                    bound.port(),
                    endpoint,
                    reuseport.map(|r| r.uid),
                )
            {
                tracing::info!(app, addr = %bound, "service taken over from the previous daemon");
            }
        }
    }

    /// SIGHUP: reads the policy file again; a file that does not load
    /// leaves the policy in force.
    fn reload_policy(&self, path: Option<&Path>) {
        let Some(path) = path else {
            tracing::info!("SIGHUP: no --policy file to reload");
            return;
        };
        match Policy::load(path) {
            Ok(policy) => {
                tracing::info!(file = %path.display(), rules = policy.rule_count(), "SIGHUP: policy reloaded");
                self.registry.set_policy(policy);
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: policy not reloaded; the previous one stays in force");
            }
        }
    }

    /// True when no app is registered or served, no service declared and
    /// no control connection open: what `--idle-exit` waits for.
    fn is_idle(&self) -> bool {
        let connections = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .len();
        connections == 0
            && self.sessions().is_empty()
            && self.containers.get().is_none_or(|c| c.is_empty())
            && self.registry.apps().is_empty()
            && self.registry.declared().is_empty()
    }

    /// The values `--metrics` serves now.
    fn scrape(&self) -> crate::metrics::Scrape {
        let len = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let c = &self.counters;
        crate::metrics::Scrape {
            broker: self.broker.metrics(),
            apps: len(self.registry.apps().len()),
            sessions: len(self.sessions().len()),
            services: len(self.registry.services().len()),
            declared: len(self.registry.declared().len()),
            restarts: c.restarts.load(Ordering::Relaxed),
            takeovers: [
                ("state", c.takeovers_state.load(Ordering::Relaxed)),
                ("handback", c.takeovers_handback.load(Ordering::Relaxed)),
            ],
        }
    }

    /// Forgets sessions whose app has exited, logging each, and apps that
    /// nobody serves whose program is gone (taken over from a predecessor
    /// but never handed back).
    fn reap_sessions(&self) {
        for info in self.registry.apps() {
            if info.pid != 0
                && !self.is_attached(info.id)
                && !Path::new(&format!("/proc/{}", info.pid)).exists()
            {
                tracing::info!(
                    app = info.id,
                    "app gone before its launcher came back; forgetting it"
                );
                self.registry.app_exited(info.id);
            }
        }
        self.exposures.reap(&self.registry);
        if let Some(c) = self.containers.get() {
            c.reap();
        }
        let mut sessions = self.sessions();
        let (done, live): (Vec<Session>, Vec<Session>) =
            sessions.drain(..).partition(|s| s.is_finished());
        *sessions = live;
        drop(sessions);
        for s in done {
            tracing::info!(app = s.app(), "app exited");
            self.namespaces.forget(s.app());
            s.join();
        }
    }
}

/// The program pids of the apps in a predecessor's state file.
fn predecessor_pids(state: &Path) -> Vec<u32> {
    std::fs::read_to_string(state)
        .ok()
        .and_then(|text| serde_json::from_str::<Snapshot>(&text).ok())
        .map(|snap| snap.apps.iter().map(|a| a.pid).collect())
        .unwrap_or_default()
}

/// The inodes of the sockets held by `root` and its descendants.
fn socket_inodes_of_tree(root: u32) -> std::collections::HashSet<u64> {
    let mut out = std::collections::HashSet::new();
    if root == 0 {
        return out;
    }
    let mut todo = vec![root];
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) || seen.len() > 100_000 {
            continue;
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for link in fds
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
            {
                let link = link.to_string_lossy();
                if let Some(ino) = link
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                {
                    out.insert(ino);
                }
            }
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let children = std::fs::read_to_string(task.path().join("children"));
                todo.extend(
                    children
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// Runs `ax daemon` until SIGINT or SIGTERM; returns the exit status.
pub fn run(args: DaemonArgs) -> anyhow::Result<i32> {
    init_tracing();
    if args.connect_wait > ax_registry::MAX_CONNECT_WAIT {
        bail!(
            "--connect-wait {:?} is longer than the {} s allowed",
            args.connect_wait,
            ax_registry::MAX_CONNECT_WAIT.as_secs()
        );
    }
    raise_fd_limit();
    let path = paths::socket_path(args.socket.socket.as_deref())?;
    let dir = paths::socket_dir(&path);
    paths::prepare_dir(dir)?;
    // Everything a predecessor left is looked at under the lock only: a
    // daemon that loses the race to start touches none of it.
    let _lock = lock_socket(&path)?;
    let counters = Arc::new(crate::metrics::DaemonCounters::default());
    let restarts = crate::metrics::count_start(&path);
    counters.restarts.store(restarts, Ordering::Relaxed);
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("cannot listen for --metrics on {addr}"))?,
        ),
        None => None,
    };
    let instance = crate::instance::load_or_create(&paths::beside(&path, ".instance"))?;
    let config = BrokerConfig {
        instance,
        connect_wait: args.connect_wait,
        identities: Some(paths::beside(&path, ".idents")),
    };
    // A predecessor killed on this socket left its fd keeper holding the
    // connections it had accepted for servers: collect them. Holding the
    // lock proves it is gone (its lock went with its last fd, even while
    // it is a zombie nobody reaped).
    let keeper_path = paths::beside(&path, ".keeper");
    let salvaged = salvage_keeper(&keeper_path, &config);
    let listener = bind(&path)?;
    // Container runtimes hand over notify fds here (same access rules).
    let runtime_path = crate::oci::runtime_socket(&path);
    let runtime_listener = bind(&runtime_path)?;
    runtime_listener.set_nonblocking(false)?;
    let socket_id = std::fs::metadata(&path)
        .map(|m| (m.dev(), m.ino()))
        .with_context(|| format!("cannot inspect {}", path.display()))?;

    let registry = Arc::new(if args.vip_pools.is_empty() {
        LocalRegistry::default()
    } else {
        LocalRegistry::new(args.vip_pools.clone())
    });
    if let Some(policy_path) = &args.policy {
        let policy = Policy::load(policy_path)?;
        tracing::info!(file = %policy_path.display(), rules = policy.rule_count(), "policy loaded");
        registry.set_policy(policy);
    }
    let cluster = crate::cluster::prepare(&args, &registry)?;
    let directory: Arc<dyn Directory> = match &cluster {
        Some((c, _)) => Arc::new(ax_cluster::ClusterDirectory::new(
            registry.clone(),
            c.clone(),
        )),
        None => registry.clone(),
    };
    let broker = Broker::new(directory, config.clone());
    // Every UNIX socket of the broker lives in a private network namespace
    // (the predecessor's, when its fd keeper kept it): without one, ax's
    // listeners would be open to every process here. Fail closed.
    // Without the predecessor's anchor (its fd keeper gone), the listeners
    // of the apps it served lead there.
    broker.find_private_namespace(&predecessor_pids(&paths::beside(&path, ".state")));
    broker
        .open_private_namespace()
        .context("refusing to start")?;
    // From here on, what this daemon holds outlives a SIGKILL long enough
    // for a successor to collect it.
    let keeper = match FdKeeper::start(&config) {
        Ok(k) => {
            if let Err(e) = write_private(&keeper_path, k.record().as_bytes()) {
                tracing::warn!(file = %keeper_path.display(), error = %e, "cannot record the fd keeper");
            }
            broker.kept_by(&k);
            Some(k)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the fd keeper; connections accepted at the instant of a crash would be lost");
            None
        }
    };
    // Names: a hosts file the launchers show their programs as /etc/hosts.
    let hosts_path = paths::hosts_path(&path);
    let stop_hosts = Arc::new(AtomicBool::new(false));
    let (hosts_file, hosts_thread) = match HostsFile::open(&hosts_path) {
        Ok(hosts) => {
            let (registry, stop) = (registry.clone(), stop_hosts.clone());
            let hosts = Arc::new(Mutex::new(
                hosts.with_cluster(cluster.as_ref().map(|(c, _)| c.clone())),
            ));
            let kept = hosts.clone();
            let thread = std::thread::Builder::new()
                .name("ax-hosts".into())
                .spawn(move || HostsFile::keep_current(kept, registry, stop))
                .ok();
            (Some(hosts), thread)
        }
        Err(e) => {
            tracing::warn!(file = %hosts_path.display(), error = %e, "cannot create the hosts file; names will not resolve");
            (None, None)
        }
    };
    let pools = registry
        .pools()
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let daemon = Arc::new(Daemon {
        registry,
        broker,
        uid: paths::euid(),
        sessions: Mutex::new(Vec::new()),
        state_path: paths::beside(&path, ".state"),
        saved: Mutex::new(None),
        exposures: Exposures::default(),
        loopback: Arc::default(),
        salvaged: Mutex::new(salvaged),
        namespaces: crate::peer::AppNamespaces::new(),
        conns: Arc::new(Mutex::new(ConnTable::default())),
        counters,
        containers: std::sync::OnceLock::new(),
        cluster: cluster.as_ref().map(|(c, _)| c.clone()),
        hosts: hosts_file,
    });
    daemon.take_over_predecessor();
    // Exposures live on the async runtime, started below.
    let runtime_handle: Arc<std::sync::OnceLock<tokio::runtime::Handle>> = Arc::default();
    let containers = {
        let d = Arc::downgrade(&daemon);
        let handle = runtime_handle.clone();
        Arc::new(crate::oci::agent::Containers::new(
            daemon.registry.clone(),
            daemon.broker.clone(),
            daemon.uid,
            paths::beside(&path, ".containers"),
            crate::oci::agent::Hooks {
                changed: Box::new({
                    let d = d.clone();
                    move || {
                        if let Some(d) = d.upgrade() {
                            d.apps_changed();
                        }
                    }
                }),
                expose: Box::new(move |app, port, host| {
                    let d = d.upgrade().ok_or("the daemon is stopping")?;
                    let _entered = handle.get().ok_or("the daemon is starting")?.enter();
                    let vip = app.vips.first().ok_or("the container has no VIP")?;
                    let peer = Peer {
                        uid: app.uid,
                        pid: 0,
                    };
                    match d.expose(&vip.to_string(), port, host, Some(app.id), peer) {
                        Response::Exposed(_) => Ok(()),
                        Response::Error(e) => Err(e),
                        other => Err(format!("{other:?}")),
                    }
                }),
            },
        ))
    };
    containers.take_over(ax_broker::keeper::take_salvaged_files());
    let _ = daemon.containers.set(containers.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ax-daemon")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let _ = runtime_handle.set(rt.handle().clone());
    containers
        .listen(runtime_listener)
        .context("cannot serve the runtime socket")?;
    let result = rt.block_on(async {
        let listener =
            tokio::net::UnixListener::from_std(listener).context("cannot watch the socket")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        // SIGHUP reloads the policy; a daemon started by `ax exec` also
        // outlives the terminal it came from.
        let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        tracing::info!(
            socket = %path.display(),
            pid = std::process::id(),
            pools = %pools,
            instance = format_args!("{instance:08x}"),
            "ax daemon listening"
        );
        if let Some(listener) = metrics_listener {
            let listener = tokio::net::TcpListener::from_std(listener)
                .context("cannot watch the --metrics socket")?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics");
            }
            let d = daemon.clone();
            tokio::spawn(crate::metrics::serve(listener, Arc::new(move || d.scrape())));
        }
        if let Some(fd) = args.ready_fd {
            if let Err(e) = signal_ready(fd) {
                tracing::warn!(fd, error = %e, "could not write to --ready-fd");
            }
        }
        if let Err(e) = crate::sdnotify::notify("READY=1") {
            tracing::warn!(error = %e, "could not notify the service manager");
        }
        let loopback = tokio::spawn(
            daemon
                .loopback
                .clone()
                .watch(daemon.registry.clone(), daemon.broker.clone()),
        );
        let cluster_task = match cluster {
            Some((c, l)) => Some(
                crate::cluster::start(c, l, daemon.registry.clone(), daemon.broker.clone()).await?,
            ),
            None => None,
        };
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        let idle_exit = args.idle_exit.filter(|d| !d.is_zero());
        let mut idle_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let d = daemon.clone();
                        tokio::spawn(async move { serve_connection(d, stream).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = sighup.recv() => daemon.reload_policy(args.policy.as_deref()),
                _ = reap.tick() => {
                    daemon.reap_sessions();
                    daemon.save_state();
                    if !daemon.is_idle() {
                        idle_since = tokio::time::Instant::now();
                    } else if idle_exit.is_some_and(|d| idle_since.elapsed() >= d) {
                        tracing::info!(idle = ?idle_exit.unwrap_or_default(), "no apps for --idle-exit: stopping");
                        break;
                    }
                }
            }
        }
        let _ = crate::sdnotify::notify("STOPPING=1");
        loopback.abort();
        if let Some(t) = cluster_task {
            t.abort();
        }
        if let Some(c) = &daemon.cluster {
            c.stop();
        }
        anyhow::Ok(())
    });
    // Remove the socket only if it is still ours. The hosts file stays:
    // running programs have it mounted, and a successor rewrites it.
    if std::fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == socket_id) {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&runtime_path);
    }
    stop_hosts.store(true, Ordering::Relaxed);
    if let Some(t) = hosts_thread {
        let _ = t.join();
    }
    daemon.reap_sessions();
    daemon.save_state();
    let running = daemon.sessions().len() + daemon.containers.get().map_or(0, |c| c.len());
    if running > 0 {
        tracing::warn!(
            apps = running,
            "apps still running; their socket calls wait until a daemon serves them again"
        );
    }
    // With apps still running, the keeper outlives this daemon as after a
    // crash, holding the private network namespace's anchor for a
    // successor: their listeners live there.
    if let Some(k) = keeper.filter(|_| running == 0) {
        k.stop();
        let _ = std::fs::remove_file(&keeper_path);
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    result?;
    tracing::info!("stopped");
    Ok(0)
}

/// Raises the soft limit on open fds to the hard limit: the broker holds
/// fds for the calls it serves, and a broker out of fds fails calls (with
/// `ENOBUFS`) that it would otherwise have served.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // No hard limit: as high as the kernel lets a process go.
    let hard = limit.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    if hard.is_none() || limit.current >= hard {
        return;
    }
    let raised = Rlimit {
        current: hard,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(from = ?limit.current, to = ?hard, "raised the open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The gossip library logs every heartbeat at debug: only its warnings,
    // unless RUST_LOG names it.
    let names_chitchat = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("chitchat"));
    let filter = if names_chitchat {
        filter
    } else {
        filter.add_directive("chitchat=warn".parse().expect("a valid directive"))
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Collects what a dead predecessor's fd keeper holds (see
/// [`ax_broker::keeper`]).
fn salvage_keeper(
    record: &Path,
    config: &BrokerConfig,
) -> std::collections::HashMap<AppId, Vec<OwnedFd>> {
    let Ok(text) = std::fs::read_to_string(record) else {
        return Default::default();
    };
    let saved = ax_broker::keeper::salvage_recorded(&text, config);
    let count: usize = saved.values().map(Vec::len).sum();
    if count > 0 {
        tracing::info!(
            connections = count,
            "collected connections the previous daemon had accepted and not handed over"
        );
    }
    saved
}

/// Writes `data` to `path`, readable by this user only.
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// How long a starting daemon waits for a lock a dead daemon still holds:
/// its fd keeper keeps it (and the control socket, which then still takes
/// connections nobody answers) until it has closed the daemon's fds, an
/// instant after the death, or longer on a loaded machine.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Takes `PATH.lock` for the daemon's lifetime, so that two daemons starting
/// at once cannot both decide the socket is stale. A lock taken by a live
/// daemon fails at once; one whose taker is dead (its fd keeper holds it
/// for an instant) is waited for, up to [`LOCK_WAIT`].
fn lock_socket(path: &Path) -> anyhow::Result<std::fs::File> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match try_lock_socket(path) {
            Err(LockError::Busy(ino))
                if std::time::Instant::now() < deadline && !lock_taker_alive(ino) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(LockError::Busy(_)) => {
                bail!("another daemon is already serving {}", path.display())
            }
            Err(LockError::Other(e)) => return Err(e),
            Ok(file) => return Ok(file),
        }
    }
}

/// Whether the process that took the `flock` on the file with inode `ino`
/// still runs (`/proc/locks` names it; a zombie counts as dead). False when
/// the lock is gone meanwhile; true when `/proc/locks` cannot be read.
fn lock_taker_alive(ino: u64) -> bool {
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return true;
    };
    // `1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE START END`
    let taker = locks.lines().find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(kind), Some(pid), Some(dev)) = (cols.get(1), cols.get(4), cols.get(5)) else {
            return None;
        };
        let inode = dev.rsplit(':').next()?.parse::<u64>().ok()?;
        (*kind == "FLOCK" && inode == ino)
            .then(|| pid.parse::<u32>().ok())
            .flatten()
    });
    // No such lock any more: it was let go since the attempt; try again.
    let Some(pid) = taker else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which may contain anything.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Why [`try_lock_socket`] failed.
enum LockError {
    /// Another process holds the lock on the file with this inode.
    Busy(u64),
    Other(anyhow::Error),
}

fn try_lock_socket(path: &Path) -> Result<std::fs::File, LockError> {
    let lock_path = paths::beside(path, ".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))
        .map_err(LockError::Other)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Busy(
            file.metadata().map(|m| m.ino()).unwrap_or(0),
        )),
        Err(e) => Err(LockError::Other(
            anyhow::Error::from(io::Error::from(e))
                .context(format!("cannot lock {}", lock_path.display())),
        )),
    }
}

/// Binds the control socket (mode 0600), replacing a previous daemon's
/// socket file. Call it under the lock ([`lock_socket`]).
fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket; remove it or choose another --socket",
            path.display()
        ),
        // Called under the lock, which proves no live daemon serves here:
        // a socket that still takes connections is a dead daemon's, held
        // open for an instant by its fd keeper.
        Ok(_) => {
            tracing::info!(socket = %path.display(), "replacing the previous daemon's socket");
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    // Nobody else may connect, not even between bind and chmod.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Writes the state file atomically (a temporary file renamed over it),
/// mode 0600.
fn write_state(path: &Path, snap: &Snapshot) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let json = serde_json::to_vec(snap).map_err(io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&json)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Writes "ready\n" to inherited fd `fd`, reached through `/proc/self/fd`
/// (no unsafe fd adoption needed). Non-blocking: a pipe whose reader is gone
/// fails instead of hanging.
fn signal_ready(fd: u32) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{fd}"))?;
    f.write_all(b"ready\n")
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    pid: i32,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads frames from a connection with `recvmsg`, so that fds sent as
/// `SCM_RIGHTS` are received rather than discarded.
struct FrameReader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl FrameReader {
    /// The next frame's body and the fds that came with it, or `None` at a
    /// clean end of stream.
    async fn next(
        &mut self,
        stream: &UnixStream,
        slot: &ConnSlot,
    ) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>, ReadError> {
        loop {
            // What the frame being read still lacks: its prefix, then its
            // body. The buffer grows by what arrives, never by what a
            // prefix announces.
            let mut want = 4usize.saturating_sub(self.buf.len());
            if let Some(prefix) = self.buf.get(..4) {
                let prefix: [u8; 4] = [prefix[0], prefix[1], prefix[2], prefix[3]];
                let len = ax_proto::body_len(prefix)?;
                let end = 4 + len;
                if let Some(body) = self.buf.get(4..end) {
                    let body = body.to_vec();
                    self.buf.drain(..end);
                    if self.buf.capacity() > READ_CHUNK {
                        self.buf.shrink_to(READ_CHUNK);
                    }
                    slot.note_buffered(self.buf.len());
                    return Ok(Some((body, std::mem::take(&mut self.fds))));
                }
                want = end - self.buf.len();
            }
            let (chunk, fds) = recv_with_fds(stream, want.clamp(4096, READ_CHUNK)).await?;
            for fd in fds {
                if self.fds.len() < MAX_FDS_PER_READ {
                    self.fds.push(fd);
                }
            }
            let n = chunk.len();
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                )
                .into());
            }
            self.buf.reserve_exact(n);
            self.buf.extend_from_slice(&chunk);
            slot.note_buffered(self.buf.len());
        }
    }
}

/// Reads up to `room` bytes, and the fds that come with them. The buffer
/// is allocated once the stream is readable: an idle connection holds none.
async fn recv_with_fds(stream: &UnixStream, room: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    stream
        .async_io(Interest::READABLE, || {
            let mut buf = vec![0u8; room];
            let mut space =
                [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                stream,
                &mut [IoSliceMut::new(&mut buf)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )?;
            let mut fds = Vec::new();
            for m in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    fds.extend(received);
                }
            }
            buf.truncate(msg.bytes);
            Ok((buf, fds))
        })
        .await
}

async fn send(stream: &mut UnixStream, resp: &Response) -> io::Result<()> {
    let frame = ax_proto::encode(resp).map_err(io::Error::other)?;
    // A client that does not read its answer does not hold the task.
    tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&frame))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Answers a refused client and closes gracefully: closing a socket with
/// unread input would reset the connection and lose the answer.
async fn refuse(stream: &mut UnixStream, msg: String) {
    use tokio::io::AsyncReadExt;
    let _ = send(stream, &Response::Error(msg)).await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

async fn serve_connection(daemon: Arc<Daemon>, mut stream: UnixStream) {
    let cred = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot identify a client; closing");
            return;
        }
    };
    let peer = Peer {
        uid: cred.uid.as_raw(),
        pid: cred.pid.as_raw_nonzero().get(),
    };
    if peer.uid != daemon.uid && peer.uid != 0 {
        tracing::warn!(
            uid = peer.uid,
            pid = peer.pid,
            "refusing a client of another user"
        );
        let msg = format!(
            "permission denied: this daemon serves uid {} (and root), you are uid {}; \
             start your own with 'ax daemon' or use your own --socket",
            daemon.uid, peer.uid
        );
        refuse(&mut stream, msg).await;
        return;
    }
    let pidfd = ax_sys::ns::peer_pidfd(stream.as_fd()).ok();
    let verdict = u32::try_from(peer.pid)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))
        .and_then(|pid| daemon.namespaces.judge(pid, pidfd.as_ref()));
    if verdict.as_ref().ok() != Some(&crate::peer::Verdict::Client) {
        let what = match verdict {
            Ok(crate::peer::Verdict::UnderAx(Some(app))) => format!("runs under ax (app {app})"),
            Ok(_) => "runs under ax".to_string(),
            Err(e) => format!("cannot be identified ({e})"),
        };
        tracing::warn!(
            pid = peer.pid,
            what,
            "refusing a program under ax: it may not use the control socket"
        );
        let msg = format!(
            "permission denied: pid {} {what}; programs under ax may not \
             use the daemon's control socket (ax exec and ax get cannot be nested)",
            peer.pid
        );
        refuse(&mut stream, msg).await;
        return;
    }
    let mut reader = FrameReader {
        buf: Vec::new(),
        fds: Vec::new(),
    };
    let slot = ConnTable::enter(&daemon.conns, peer.uid);
    // Apps registered here and not (yet) handed over: if the client goes
    // away first, nothing will ever run in them.
    let mut pending: Vec<AppId> = Vec::new();
    loop {
        let attached = slot.attached();
        let next = async {
            if attached {
                Ok(reader.next(&stream, &slot).await)
            } else {
                tokio::time::timeout(IDLE_TIMEOUT, reader.next(&stream, &slot)).await
            }
        };
        let read = tokio::select! {
            r = next => r,
            _ = slot.close.notified() => {
                tracing::debug!(pid = peer.pid, "closing an idle control connection: its uid opened too many");
                break;
            }
        };
        let Ok(read) = read else {
            tracing::debug!(
                pid = peer.pid,
                "closing a control connection idle for {IDLE_TIMEOUT:?}"
            );
            break;
        };
        match read {
            Ok(None) => break,
            Ok(Some((body, fds))) => {
                slot.update(|c| c.busy = true);
                let resp = match ax_proto::decode::<Request>(&body) {
                    Ok(req) => daemon.handle(req, fds, peer, &mut pending),
                    Err(e) => {
                        tracing::warn!(pid = peer.pid, error = %e, "bad frame; closing the connection");
                        let _ = send(&mut stream, &Response::Error(e.to_string())).await;
                        break;
                    }
                };
                if resp == Response::Attached {
                    slot.update(|c| c.attached = true);
                }
                if send(&mut stream, &resp).await.is_err() {
                    break;
                }
                slot.update(|c| {
                    c.busy = false;
                    c.idle_since = Instant::now();
                });
            }
            Err(ReadError::Frame(e)) => {
                tracing::warn!(pid = peer.pid, error = %e, "bad frame; closing the connection");
                let _ = send(&mut stream, &Response::Error(e.to_string())).await;
                break;
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!(pid = peer.pid, error = %e, "connection lost");
                break;
            }
        }
    }
    for app in pending {
        if !daemon.is_attached(app) && daemon.registry.app(app).is_some() {
            tracing::info!(app, "client left before starting the app; unregistering it");
            daemon.registry.app_exited(app);
        }
    }
}

impl Daemon {
    /// An app or container was registered: the state a successor reads,
    /// and the hosts file, before the app's program starts (so that it
    /// finds its own names from its first instruction).
    fn apps_changed(&self) {
        self.save_state();
        if let Some(hosts) = &self.hosts {
            HostsFile::refresh_now(hosts, &self.registry);
        }
    }

    fn handle(
        &self,
        req: Request,
        fds: Vec<OwnedFd>,
        peer: Peer,
        pending: &mut Vec<AppId>,
    ) -> Response {
        match req {
            Request::Ping => Response::Pong {
                daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
            },
            // A container's identity is the runtime's to give, on the
            // runtime socket (see `crate::oci::agent`): a client here could
            // otherwise claim a container's id and have its `exec`s join it.
            Request::RegisterApp(spec) if spec.container.is_some() => Response::Error(
                "an app is registered as a container only by its container runtime, on the \
                 daemon's runtime socket"
                    .to_string(),
            ),
            Request::RegisterApp(spec) => match self.registry.register_app(&spec, peer.uid) {
                Ok(info) => {
                    tracing::info!(
                        app = info.id,
                        uid = peer.uid,
                        vips = ?info.vips,
                        names = ?info.names,
                        command = ?info.command,
                        "app registered"
                    );
                    pending.push(info.id);
                    self.apps_changed();
                    Response::AppRegistered(info)
                }
                Err(e) => {
                    tracing::info!(uid = peer.uid, error = %e, "registration refused");
                    Response::RegisterFailed(e)
                }
            },
            Request::AttachListener { app, pid } => {
                let resp = self.attach(app, pid, fds, peer);
                if resp == Response::Attached {
                    pending.retain(|&a| a != app);
                    // The program's pid is what lets a successor take it over.
                    self.save_state();
                }
                resp
            }
            Request::ReattachApp(info) => self.reattach(info, fds, peer),
            Request::ListApps => Response::Apps(self.registry.apps()),
            Request::ListServices => Response::Services(self.registry.services()),
            Request::Expose {
                target,
                port,
                host,
                owner,
            } => self.expose(&target, port, host, owner, peer),
            Request::Unexpose { host } => match self.exposures.remove(host) {
                Ok(()) => Response::Unexposed,
                Err(e) => Response::Error(e.to_string()),
            },
            Request::ListExposures => Response::Exposures(self.exposures.list()),
            Request::ListNodes => {
                Response::Nodes(self.cluster.as_ref().map(|c| c.nodes()).unwrap_or_default())
            }
            Request::CreateService { name, ips, lb } => {
                crate::service::create(&self.registry, &name, &ips, lb, peer.uid, || {
                    self.save_state()
                })
            }
            Request::DeleteService { name, force } => {
                crate::service::delete(&self.registry, &name, force, peer.uid, || self.save_state())
            }
        }
    }

    fn expose(
        &self,
        target: &str,
        port: u16,
        host: SocketAddr,
        owner: Option<AppId>,
        peer: Peer,
    ) -> Response {
        if let Some(app) = owner {
            match self.registry.app(app) {
                Some(info) if peer.uid == 0 || info.uid == peer.uid => {}
                _ => return Response::Error(format!("no app {app} of yours to expose")),
            }
        }
        let Some((vip, mut name)) = crate::expose::resolve_target(&self.registry, target) else {
            return Response::Error(ExposeError::UnknownTarget(target.to_string()).to_string());
        };
        if name.is_none() {
            // Exposed by VIP (as `ax exec --expose` does): show its name.
            name = owner
                .and_then(|app| self.registry.app(app))
                .and_then(|info| info.names.first().cloned());
        }
        match self.exposures.add(
            &self.registry,
            &self.broker,
            SocketAddr::new(vip, port),
            name,
            host,
            owner,
        ) {
            Ok(info) => Response::Exposed(info),
            Err(e) => Response::Error(e.to_string()),
        }
    }

    /// Takes over an app a launcher hands back after this daemon replaced
    /// one that died: same id, same VIPs, its listeners found again.
    fn reattach(&self, info: AppInfo, fds: Vec<OwnedFd>, peer: Peer) -> Response {
        if peer.uid != 0 && info.uid != peer.uid {
            return Response::Error(format!(
                "permission denied: app {} belongs to uid {}",
                info.id, info.uid
            ));
        }
        if let Err(e) = self.registry.readopt_app(&info) {
            return Response::Error(format!("cannot take over app {}: {e}", info.id));
        }
        self.rediscover_services();
        // Its programs may have restricted themselves under the previous
        // daemon: their egress is left to the kernel, as after a
        // restriction seen here.
        self.broker.assume_self_restricted(info.id);
        let resp = self.attach(info.id, info.pid, fds, peer);
        if resp == Response::Attached {
            crate::metrics::bump(&self.counters.takeovers_handback);
            tracing::info!(
                app = info.id,
                pid = info.pid,
                "app handed over again after a daemon restart"
            );
            self.save_state();
        }
        resp
    }

    /// Restores the apps a predecessor on this socket left in its state
    /// file (those whose program still runs) and their listeners, so that
    /// connections to them work before their launchers even reconnect.
    fn take_over_predecessor(&self) {
        let Ok(text) = std::fs::read_to_string(&self.state_path) else {
            return;
        };
        let snap: Snapshot = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %self.state_path.display(), error = %e, "ignoring an unreadable state file");
                return;
            }
        };
        let alive =
            |info: &AppInfo| info.pid != 0 && Path::new(&format!("/proc/{}", info.pid)).exists();
        let restored = self.registry.restore(&snap, &alive);
        let taken = u64::try_from(restored.len()).unwrap_or(u64::MAX);
        self.counters
            .takeovers_state
            .fetch_add(taken, Ordering::Relaxed);
        if !restored.is_empty() {
            tracing::info!(apps = ?restored, "taking over apps from the previous daemon; waiting for their launchers");
            self.rediscover_services();
        }
        self.save_state();
    }

    fn attach(&self, app: AppId, pid: u32, fds: Vec<OwnedFd>, peer: Peer) -> Response {
        let mut fds = fds.into_iter();
        let Some(fd) = fds.next() else {
            return Response::Error(
                "AttachListener carried no notify fd (it must come as SCM_RIGHTS)".into(),
            );
        };
        let Some(info) = self.registry.app(app) else {
            return Response::Error(format!("no app with id {app}; register it first"));
        };
        if peer.uid != 0 && info.uid != peer.uid {
            return Response::Error(format!(
                "permission denied: app {app} belongs to uid {}",
                info.uid
            ));
        }
        if pid == 0 || i32::try_from(pid).is_err() {
            return Response::Error(format!("AttachListener needs the program's pid, not {pid}"));
        }
        // The pid decides whose threads a take-over may act on: only a
        // process the launcher itself started is taken.
        if u32::try_from(peer.pid).map_or(true, |p| !ax_broker::verify::is_child_of(pid, p)) {
            return Response::Error(format!(
                "process {pid} is not a child of the launcher that hands it over"
            ));
        }
        // Fails closed: an fd whose kind cannot be read is refused too.
        if !ax_sys::keeper::is_notify_fd(fd.as_fd()) {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            return Response::Error(format!(
                "the fd sent is not a seccomp notify fd ({})",
                link.map_or_else(|e| e.to_string(), |l| l.display().to_string())
            ));
        }
        // Checked and recorded under one lock: two attaches cannot race.
        let mut sessions = self.sessions();
        if sessions.iter().any(|s| s.app() == app && !s.is_finished()) {
            return Response::Error(format!("app {app} is already being served"));
        }
        // `--no-hosts-mount`: the program shares the launcher's namespaces
        // by the user's choice, and is told from clients by nothing.
        if info.no_hosts_mount {
            tracing::info!(app, "app without namespaces of its own (--no-hosts-mount)");
        } else if let Err(e) = self.namespaces.record(app, pid) {
            return Response::Error(format!(
                "cannot tell the program's processes from clients: {e}"
            ));
        }
        if let Err(e) = self.registry.set_pid(app, pid) {
            return Response::Error(e.to_string());
        }
        let journal = fds.next().and_then(|j| match Journal::map(j) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(app, error = %e, "ignoring an unusable journal");
                None
            }
        });
        // Connections being handed to a server wait in a socket pair the
        // launcher also holds: its receiving end, then its sending end.
        let stash = match (fds.next(), fds.next()) {
            (Some(recv), Some(send)) => Some(ax_broker::Stash::new(send, recv)),
            _ => None,
        };
        // Connections the previous daemon had accepted for this app's
        // servers and not handed over (collected from its fd keeper).
        let saved = self
            .salvaged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&app)
            .unwrap_or_default();
        if let Some(stash) = &stash {
            if !saved.is_empty() {
                tracing::info!(
                    app,
                    count = saved.len(),
                    "handing back connections the previous daemon had accepted"
                );
            }
            for conn in &saved {
                if let Err(e) = stash.put(conn.as_fd()) {
                    tracing::warn!(app, error = %e, "cannot park a saved connection");
                }
            }
        }
        match self
            .broker
            .serve_with_journal(app, NotifyFd::from(fd), journal, stash, Some(pid))
        {
            Ok(session) => {
                tracing::info!(app, pid, "serving app");
                sessions.push(session);
                Response::Attached
            }
            Err(e) => Response::Error(format!("cannot serve app {app}: {e}")),
        }
    }
}
