//! Connections a killed daemon had accepted for servers and not yet handed
//! over: its fd keeper ([`ax_sys::keeper`]) holds them open, and its
//! successor collects them here and parks them in each app's [`Stash`],
//! from which the take-over hands them to the accepts left unanswered.
//!
//! [`Stash`]: crate::Stash

use crate::names::SocketName;
use crate::BrokerConfig;
use ax_registry::AppId;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// A running fd keeper of this process.
#[derive(Debug)]
pub struct FdKeeper {
    pid: u32,
    start_time: u64,
    pidfd: OwnedFd,
    /// Set by [`FdKeeper::stop`], for [`FdKeeper::watch`].
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FdKeeper {
    /// Starts a keeper for this process's fds. Call it from the main
    /// thread (the keeper watches the thread that starts it), once the
    /// broker's instance is known.
    pub fn start(config: &BrokerConfig) -> io::Result<FdKeeper> {
        let prefix = format!("ax/{:08x}/", config.instance);
        let pid = ax_sys::keeper::spawn(prefix.as_bytes())?;
        let pidfd = ax_sys::process::pidfd_open(pid, false)?;
        let start_time = crate::target::start_time(pid).unwrap_or(0);
        Ok(FdKeeper {
            pid,
            start_time,
            pidfd,
            stopping: Default::default(),
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its start time (clock ticks since boot), which tells it from a later
    /// process with the same pid.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// A one-line record of this keeper and of the process it serves, for
    /// [`salvage_recorded`] in a successor.
    pub fn record(&self) -> String {
        let me = std::process::id();
        format!(
            "{} {} {} {}\n",
            self.pid,
            self.start_time,
            me,
            crate::target::start_time(me).unwrap_or(0)
        )
    }

    /// Calls `on_exit` from a thread of its own once the keeper has
    /// exited, with `true` when [`FdKeeper::stop`] ended it.
    ///
    /// # Errors
    /// Why the pidfd could not be duplicated or the thread not started.
    pub fn watch(&self, on_exit: impl FnOnce(bool) + Send + 'static) -> io::Result<()> {
        let pidfd = self.pidfd.try_clone()?;
        let stopping = self.stopping.clone();
        std::thread::Builder::new()
            .name("ax-keeper-watch".into())
            .spawn(move || {
                // A pidfd polls readable once its process has exited.
                let mut fds = [rustix::event::PollFd::new(
                    &pidfd,
                    rustix::event::PollFlags::IN,
                )];
                while let Err(rustix::io::Errno::INTR) = rustix::event::poll(&mut fds, None) {}
                on_exit(stopping.load(std::sync::atomic::Ordering::SeqCst));
            })?;
        Ok(())
    }

    /// Ends it (the daemon is stopping cleanly).
    pub fn stop(self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = ax_sys::process::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
    }
}

/// The predecessor's anchor in its private network namespace, found by
/// [`salvage`], until the broker takes it (`crate::sockets`).
static SALVAGED_ANCHOR: std::sync::Mutex<Option<(u32, OwnedFd)>> = std::sync::Mutex::new(None);

/// The anchor [`salvage`] found for `instance`, once.
pub(crate) fn take_salvaged_anchor(instance: u32) -> Option<OwnedFd> {
    let mut slot = SALVAGED_ANCHOR.lock().unwrap_or_else(|e| e.into_inner());
    match slot.take() {
        Some((i, fd)) if i == instance => Some(fd),
        other => {
            *slot = other;
            None
        }
    }
}

/// Seccomp notify fds and call journals the predecessor's keeper held, by
/// their fd number in the predecessor (which shared its fd table with the
/// keeper), found by [`salvage`] until taken with [`take_salvaged_files`].
static SALVAGED_FILES: std::sync::Mutex<Vec<(i32, OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// The seccomp notify fds and call journals [`salvage`] collected (OCI
/// containers have no launcher to hand theirs back), each with the fd
/// number the dead daemon had for it.
pub fn take_salvaged_files() -> Vec<(i32, OwnedFd)> {
    std::mem::take(&mut *SALVAGED_FILES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// True for a socket bound to the anchor name of `instance`.
pub(crate) fn is_anchor(fd: &OwnedFd, instance: u32) -> bool {
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| rustix::net::SocketAddrUnix::try_from(a).ok())
        .is_some_and(|u| u.abstract_name() == Some(&crate::sockets::anchor_name(instance)[..]))
}

/// [`salvage`] from a keeper described by a [`FdKeeper::record`].
///
/// Call it only while holding the lock a daemon holds for its lifetime
/// (the daemon's `PATH.lock`): holding it proves the process the keeper
/// served is gone, which nothing read from `/proc` can (a killed daemon
/// nobody reaped stays a zombie, and looks alive there). A live daemon
/// keeps its keeper.
pub fn salvage_recorded(record: &str, config: &BrokerConfig) -> HashMap<AppId, Vec<OwnedFd>> {
    let fields: Vec<u64> = record
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let [keeper, keeper_start, _daemon, _daemon_start] = fields[..] else {
        return HashMap::new();
    };
    let Ok(keeper) = u32::try_from(keeper) else {
        return HashMap::new();
    };
    salvage(keeper, keeper_start, config)
}

/// Collects, from the keeper `pid` (started at `start_time`) of a daemon
/// with the same `instance` that died, the connections it had accepted for
/// servers and not handed over, by app; then ends the keeper. The
/// predecessor's anchor in its private network namespace is kept for this
/// daemon's broker, which then works in the same namespace. Anything
/// that is not such a keeper yields nothing.
pub fn salvage(pid: u32, start_time: u64, config: &BrokerConfig) -> HashMap<AppId, Vec<OwnedFd>> {
    let mut out: HashMap<AppId, Vec<OwnedFd>> = HashMap::new();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim_end() != ax_sys::keeper::KEEPER_COMM
        || crate::target::start_time(pid) != Some(start_time)
    {
        return out;
    }
    let Ok(pidfd) = ax_sys::process::pidfd_open(pid, false) else {
        return out;
    };
    let fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        let Ok(conn) = ax_sys::process::pidfd_getfd(pidfd.as_fd(), fd) else {
            continue;
        };
        if is_anchor(&conn, config.instance) {
            *SALVAGED_ANCHOR.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((config.instance, conn));
            continue;
        }
        if ax_sys::keeper::is_kept(conn.as_fd()) {
            SALVAGED_FILES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((fd, conn));
            continue;
        }
        let own = crate::handlers::own_name(&conn);
        // A client socket of the broker is unbound (its identity is kept
        // apart, see `crate::idents`); one an earlier version made is named.
        let client = crate::handlers::peer_is_client(&conn);
        if let (Some(SocketName::Listener { instance, app, .. }), true) = (own, client) {
            if instance == config.instance {
                out.entry(app).or_default().push(conn);
            }
        }
    }
    let _ = ax_sys::process::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
    out
}
