//! The daemon's runtime socket: ax as the OCI seccomp agent.
//!
//! runc (≥ 1.1) and crun (≥ 1.6) connect to a profile's `listenerPath`
//! once per container process they start (`run`, `exec`), send the
//! container's state as JSON (`ociVersion`, `fds`, `pid`, `metadata`,
//! `state`: `id`, `status`, `pid`, `bundle`, `annotations`) with the
//! seccomp notify fd attached (`SCM_RIGHTS`, at the index of
//! `"seccompFd"` in `fds`), and close the connection. The daemon serves
//! that fd as it serves an `ax exec` app's: one container is one app,
//! keyed by its id, and every `exec` into it joins that app.
//!
//! Nothing is registered before the whole message and its fd arrived: a
//! runtime that dies mid-handshake leaves nothing behind.
//!
//! A container has no launcher to hand its notify fd to a restarted
//! daemon: the daemon's fd keeper keeps it (see `ax_sys::keeper`), and the
//! daemon records which fd number is which container's in a file beside
//! its socket (`.containers`), so that its successor serves it again. A container whose
//! identity is refused (a bad `io.ax.*` value, a VIP in use) has every
//! trapped call answered `EPERM` until it exits, and the reason logged.

use super::handshake::{is_notify_fd, read_message, runtime_name, ProcessState};
use super::identity;
use ax_broker::{Broker, NotifyFd, Session};
use ax_registry::{AppId, AppInfo, ContainerRef, Directory, LocalRegistry};
use ax_sys::journal::Journal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runtime connections handled at once.
const MAX_CONNECTIONS: usize = 64;

/// The containers a daemon serves.
pub struct Containers {
    registry: Arc<LocalRegistry>,
    broker: Broker,
    uid: u32,
    /// Container processes served (a container, each `exec`).
    served: Mutex<Vec<Served>>,
    /// Where the fd numbers of their notify fds are recorded.
    record: PathBuf,
    /// Held from "is this container known?" to "it is registered".
    adopting: Mutex<()>,
    /// What the daemon does for containers.
    hooks: Hooks,
    open: AtomicUsize,
}

/// One notify fd being served.
struct Served {
    session: Session,
    record: Record,
}

/// Which container a notify fd (by its number in this daemon) belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    app: AppId,
    /// The notify fd's number.
    fd: i32,
    /// The call journal's number, if it has one.
    #[serde(default)]
    journal: Option<i32>,
    container: String,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

/// What the daemon does for its containers.
pub struct Hooks {
    /// Called when the registry changed (the daemon saves its state).
    pub changed: Box<dyn Fn() + Send + Sync>,
    /// Exposes `app`'s PORT at a host address (`io.ax.expose`), as
    /// `ax exec --expose` asks the daemon to.
    #[allow(clippy::type_complexity)]
    pub expose: Box<dyn Fn(&AppInfo, u16, SocketAddr) -> Result<(), String> + Send + Sync>,
}

impl Containers {
    /// Containers of the daemon of `uid`, served by `broker` from `registry`.
    /// `record` is the file that tells a successor which kept notify fd is
    /// which container's.
    pub fn new(
        registry: Arc<LocalRegistry>,
        broker: Broker,
        uid: u32,
        record: PathBuf,
        hooks: Hooks,
    ) -> Self {
        Self {
            registry,
            broker,
            uid,
            served: Mutex::default(),
            record,
            adopting: Mutex::default(),
            hooks,
            open: AtomicUsize::new(0),
        }
    }

    /// How many container processes are served.
    pub fn len(&self) -> usize {
        self.served.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when no container process is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets container processes that exited (their app is released by
    /// the broker when its last one does).
    pub fn reap(&self) {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let (done, live): (Vec<Served>, Vec<Served>) =
            served.drain(..).partition(|s| s.session.is_finished());
        *served = live;
        if !done.is_empty() {
            self.save(&served);
        }
        let live: Vec<AppId> = served.iter().map(|s| s.session.app()).collect();
        drop(served);
        let mut logged = Vec::new();
        for s in done {
            let app = s.session.app();
            // Once per app, when its last process is gone.
            if !live.contains(&app) && !logged.contains(&app) && self.registry.app(app).is_none() {
                tracing::info!(
                    app,
                    container = s.record.container,
                    "container exited; app released"
                );
                logged.push(app);
            }
            s.session.join();
        }
    }

    /// Writes the record of served notify fds (mode 0600, atomically).
    fn save(&self, served: &[Served]) {
        let records: Vec<&Record> = served.iter().map(|s| &s.record).collect();
        let write = || -> io::Result<()> {
            let mut tmp = self.record.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = PathBuf::from(tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec(&records)?)?;
            std::fs::rename(&tmp, &self.record)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %self.record.display(), error = %e, "cannot record the containers' notify fds; a restarted daemon would not serve them");
        }
    }

    fn push(&self, session: Session, record: Record) {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.push(Served { session, record });
        self.save(&served);
    }

    /// Serves `notify` for `app` (container `container`), recording its
    /// calls in `journal` (a new one when `None`), and records both fds for
    /// a successor.
    fn serve(
        &self,
        app: AppId,
        notify: NotifyFd,
        journal: Option<OwnedFd>,
        container: String,
    ) -> io::Result<()> {
        let journal = match journal {
            Some(j) => Some(j),
            None => ax_sys::journal::create()
                .inspect_err(|e| tracing::warn!(app, error = %e, "cannot create a call journal; a call in flight when the daemon dies would be lost"))
                .ok(),
        };
        let journal_fd = journal.as_ref().map(AsRawFd::as_raw_fd);
        let journal = journal.and_then(|j| {
            Journal::map(j)
                .inspect_err(|e| tracing::warn!(app, error = %e, "cannot map the call journal"))
                .ok()
        });
        let record = Record {
            app,
            fd: notify.as_raw_fd(),
            journal: journal.as_ref().and(journal_fd),
            container,
        };
        // The app's first process: where lost calls are looked for.
        let root = self.registry.app(app).map(|a| a.pid).filter(|&p| p != 0);
        let session = self
            .broker
            .serve_with_journal(app, notify, journal, None, root)?;
        self.push(session, record);
        Ok(())
    }

    /// Serves again the containers a predecessor served: `files` are the
    /// notify fds and journals its fd keeper held, by the predecessor's fd
    /// number (see [`ax_broker::keeper::take_salvaged_files`]); the record
    /// file says whose each is. Call it after the registry took the
    /// predecessor's apps over, before listening.
    pub fn take_over(&self, files: Vec<(i32, OwnedFd)>) {
        let records: Vec<Record> = std::fs::read(&self.record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut files: HashMap<i32, OwnedFd> = files.into_iter().collect();
        for r in records {
            let Some(fd) = files.remove(&r.fd).filter(is_notify_fd) else {
                continue;
            };
            let journal = r.journal.and_then(|j| files.remove(&j));
            let known = self
                .registry
                .app(r.app)
                .is_some_and(|a| a.container.as_ref().is_some_and(|c| c.id == r.container));
            if !known {
                tracing::info!(
                    app = r.app,
                    container = r.container,
                    "container exited while no daemon served it"
                );
                continue;
            }
            // What its processes did to themselves meanwhile is not known.
            self.broker.assume_self_restricted(r.app);
            match self.serve(r.app, NotifyFd::from(fd), journal, r.container.clone()) {
                Ok(()) => {
                    tracing::info!(
                        app = r.app,
                        container = r.container,
                        "container served again after a daemon restart"
                    );
                }
                Err(e) => {
                    tracing::error!(app = r.app, container = r.container, error = %e, "cannot serve a container again")
                }
            }
        }
        // Nobody's: `ax exec` apps' launchers hand theirs over themselves.
        drop(files);
        self.save(&self.served.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Accepts runtime connections on `listener` on a thread of its own,
    /// for the daemon's life.
    pub fn listen(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("ax-oci".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => me.accepted(stream),
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a runtime connection failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(())
    }

    fn accepted(self: &Arc<Self>, stream: UnixStream) {
        let cred = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "runtime connection without credentials; closed");
                return;
            }
        };
        let uid = cred.uid.as_raw();
        if uid != self.uid && uid != 0 {
            tracing::warn!(
                uid,
                pid = cred.pid.as_raw_nonzero().get(),
                "runtime connection from another user refused"
            );
            return;
        }
        if self.open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("too many runtime connections at once; one closed");
            return;
        }
        let me = self.clone();
        let peer_pid = cred.pid.as_raw_nonzero().get();
        // Now, before the runtime sends, closes and exits.
        // Best effort: a runtime that already sent, closed and exited
        // (runc run -d does within milliseconds) is "unknown".
        let runtime = runtime_name(
            &std::fs::read_to_string(format!("/proc/{peer_pid}/comm")).unwrap_or_default(),
        );
        let spawned = std::thread::Builder::new()
            .name("ax-oci-conn".into())
            .spawn(move || {
                // Counted out however the handshake ends.
                struct Slot<'a>(&'a AtomicUsize);
                impl Drop for Slot<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let _slot = Slot(&me.open);
                me.handshake(stream, uid, peer_pid, runtime);
            });
        if let Err(e) = spawned {
            self.open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "cannot handle a runtime connection");
        }
    }

    fn handshake(&self, stream: UnixStream, uid: u32, peer_pid: i32, runtime: String) {
        let (bytes, fds) = match read_message(&stream) {
            Ok(m) => m,
            Err(e) => {
                // Nothing was registered: a runtime that died mid-handshake
                // leaves nothing behind (its fds close with this frame).
                tracing::warn!(runtime, pid = peer_pid, error = %e, "runtime handshake failed; nothing registered");
                return;
            }
        };
        let state: ProcessState = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                // Cut short (the runtime died) or garbled: if a notify fd
                // came anyway, its calls are refused rather than left hanging.
                let fd = fds.into_iter().find(is_notify_fd);
                tracing::error!(runtime, error = %e, refused = fd.is_some(), "the runtime's container state is not valid JSON; nothing registered");
                if let Some(fd) = fd {
                    refuse_calls(NotifyFd::from(fd), String::new());
                }
                return;
            }
        };
        tracing::debug!(
            runtime,
            container = state.state.id,
            oci_version = state.oci_version,
            status = state.state.status,
            bundle = state.state.bundle,
            pid = state.pid,
            "a runtime handed over a container process"
        );
        let Some(index) = state.fds.iter().position(|f| f == "seccompFd") else {
            tracing::error!(runtime, container = state.state.id, fds = ?state.fds, "the runtime sent no seccompFd");
            return;
        };
        let Some(fd) = fds.into_iter().nth(index) else {
            tracing::error!(
                runtime,
                container = state.state.id,
                "the runtime named a seccompFd it did not send"
            );
            return;
        };
        if !is_notify_fd(&fd) {
            tracing::error!(
                runtime,
                container = state.state.id,
                "the fd sent as seccompFd is not a seccomp notify fd"
            );
            return;
        }
        let notify = NotifyFd::from(fd);
        let container = ContainerRef {
            id: state.state.id.clone(),
            runtime,
        };
        if let Err(why) = self.adopt(&state, container, notify, uid) {
            tracing::error!(container = state.state.id, "{why}");
        }
    }

    /// Serves `notify` as (part of) container `container`'s app.
    fn adopt(
        &self,
        state: &ProcessState,
        container: ContainerRef,
        notify: NotifyFd,
        uid: u32,
    ) -> Result<(), String> {
        let id = container.id.clone();
        if id.is_empty() {
            refuse_calls(notify, id);
            return Err("refusing a container without an id: its calls are answered EPERM".into());
        }
        let identity::Identity { spec, exposes } =
            match identity::spec(&state.state.annotations, &state.metadata, container) {
                Ok(s) => s,
                Err(why) => {
                    refuse_calls(notify, id.clone());
                    return Err(format!(
                        "refusing container {id}: {why}; its calls are answered EPERM"
                    ));
                }
            };
        let guard = self.adopting.lock().unwrap_or_else(|e| e.into_inner());
        let existing = self.registry.apps().into_iter().find(|a| {
            a.container.as_ref().is_some_and(|c| c.id == id) && (uid == 0 || a.uid == uid)
        });
        let (app, joined): (AppInfo, bool) = match existing {
            Some(info) => (info, true),
            None => match self.registry.register_app(&spec, uid) {
                Ok(info) => {
                    let pid = [state.pid, state.state.pid]
                        .into_iter()
                        .find(|&p| p > 0)
                        .and_then(|p| u32::try_from(p).ok());
                    if let Some(pid) = pid {
                        let _ = self.registry.set_pid(info.id, pid);
                    }
                    tracing::info!(
                        app = info.id,
                        container = id,
                        runtime = spec.container.as_ref().map(|c| c.runtime.as_str()),
                        vips = ?info.vips,
                        names = ?info.names,
                        "container registered"
                    );
                    (info, false)
                }
                Err(e) => {
                    drop(guard);
                    refuse_calls(notify, id.clone());
                    return Err(format!(
                        "refusing container {id}: {e}; its calls are answered EPERM"
                    ));
                }
            },
        };
        match self.serve(app.id, notify, None, id.clone()) {
            Ok(()) => {
                drop(guard);
                if joined {
                    tracing::info!(
                        app = app.id,
                        container = id,
                        "process joined its container's app"
                    );
                } else {
                    for (port, host) in exposes {
                        match (self.hooks.expose)(&app, port, host) {
                            Ok(()) => {
                                tracing::info!(app = app.id, container = id, port, %host, "container port exposed")
                            }
                            Err(e) => {
                                tracing::error!(app = app.id, container = id, port, %host, error = %e, "cannot expose the container's port (io.ax.expose)")
                            }
                        }
                    }
                }
                (self.hooks.changed)();
                Ok(())
            }
            Err(e) => {
                if !joined {
                    self.registry.app_exited(app.id);
                }
                Err(format!("cannot serve container {id}: {e}"))
            }
        }
    }
}

/// Answers every trapped call on `notify` with `EPERM` until its processes
/// exit, on a thread of its own: a refused container fails its socket
/// calls at once rather than hang.
fn refuse_calls(notify: NotifyFd, container: String) {
    use rustix::event::{poll, PollFd, PollFlags};
    let spawned = std::thread::Builder::new()
        .name("ax-oci-refused".into())
        .spawn(move || loop {
            let mut fds = [PollFd::new(&notify, PollFlags::IN)];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
            let revents = fds[0].revents();
            if !revents.contains(PollFlags::IN) {
                if revents.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
                    break;
                }
                continue;
            }
            match notify.recv() {
                Ok(n) => {
                    let _ = notify.respond_error(n.id, libc::EPERM);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(_) => break,
            }
        });
    if let Err(e) = spawned {
        // Without a thread the fd closes here: the kernel then fails the
        // container's trapped calls with ENOSYS, which is no hang either.
        tracing::warn!(container, error = %e, "cannot start answering a refused container");
    }
}
