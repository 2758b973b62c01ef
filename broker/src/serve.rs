//! The broker object and its per-app receive loop.

use crate::appstate::AppState;
use crate::handlers::accept::{Parked, PARKED_TICK};
use crate::handlers::{self, Outcome};
use crate::pool::WorkerPool;
use crate::target::{PidfdCache, Target};
use ax_registry::{AppId, Directory};
use ax_sys::journal::Journal;
use ax_sys::{Notification, NotifyFd};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Settings of a [`Broker`].
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Tags every UNIX socket name this broker makes, so that several
    /// brokers (one per user, or per test) can share a network namespace.
    /// Keep it stable across restarts of the same daemon.
    pub instance: u32,
    /// How long a blocking connect to a VIP whose service is not up yet
    /// waits for it, unless the app says otherwise
    /// ([`ax_registry::Directory::connect_wait`]). Zero: refuse at once,
    /// as TCP does.
    pub connect_wait: std::time::Duration,
    /// Where the identities of connections are kept for a successor daemon
    /// (see `crate::idents`); `None`: in memory only.
    pub identities: Option<std::path::PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        // Distinct per process and per start, which suits an embedder that
        // runs one broker.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Self {
            instance: std::process::id().rotate_left(16) ^ nanos,
            connect_wait: std::time::Duration::ZERO,
            identities: None,
        }
    }
}

/// State shared by every app a broker serves.
pub(crate) struct Shared {
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) config: BrokerConfig,
    /// Next client port to try when naming a connected client socket.
    pub(crate) next_client_port: AtomicU32,
    /// Held around "is a connection waiting? then accept it" on listeners
    /// whose file is blocking, so that the accept never blocks the broker.
    pub(crate) accept_lock: Mutex<()>,
    /// Threads for calls that may block.
    pub(crate) pool: Arc<WorkerPool>,
    /// Connections waiting behind doorbells for a server's accept.
    pub(crate) doors: crate::doors::Doors,
    /// Apps that restricted themselves (their egress goes to the kernel).
    pub(crate) self_restricted: crate::handlers::restrict::SelfRestricted,
    /// Every UNIX socket the broker creates comes from here, in its private
    /// network namespace.
    pub(crate) sockets: Arc<crate::sockets::Sockets>,
    /// Notify fds being served, by app: an app (a container with `exec`s
    /// into it) may have several; it exits with the last.
    pub(crate) listeners: Mutex<std::collections::HashMap<AppId, usize>>,
    /// Who each end of a swapped connection stands for.
    pub(crate) idents: Arc<crate::idents::Idents>,
    /// Tidies the caches of receive loops that wait in the receive.
    pub(crate) tidy: Arc<crate::tidy::Tidy>,
    /// Looks at the blocking accepts parked for a while, for every loop.
    pub(crate) watch: Arc<crate::watch::Watch>,
    /// Whether an fd keeper shares this process's fd table (see
    /// [`Broker::kept_by`]): then a connection being handed to a server
    /// outlives the daemon without a duplicate in the app's stash.
    pub(crate) fd_kept: Arc<std::sync::atomic::AtomicBool>,
}

impl Shared {
    fn forget_app_options(&self, app: AppId) {
        self.self_restricted.forget(app);
    }
}

/// Answers trapped socket calls for any number of apps.
///
/// Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// One app being served; see [`Broker::serve`].
#[derive(Debug)]
pub struct Session {
    app: AppId,
    thread: JoinHandle<()>,
}

impl Session {
    /// The app served.
    pub fn app(&self) -> AppId {
        self.app
    }

    /// True once every process of the app has exited and its services have
    /// been released.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits until [`Session::is_finished`].
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl Broker {
    /// A broker answering from `directory`.
    pub fn new(directory: Arc<dyn Directory>, config: BrokerConfig) -> Self {
        let sockets = crate::sockets::Sockets::new(config.instance);
        let idents = crate::idents::Idents::open(config.instance, config.identities.as_deref());
        // Every identity names a socket of the private namespace: its list
        // of open sockets tells the sweeps which are closed.
        let watched = Arc::downgrade(&sockets);
        idents.watch(Box::new(move || watched.upgrade()?.live_inodes()));
        Self {
            shared: Arc::new(Shared {
                directory,
                next_client_port: AtomicU32::new(0),
                accept_lock: Mutex::new(()),
                pool: Arc::new(WorkerPool::default()),
                doors: crate::doors::Doors::default(),
                self_restricted: Default::default(),
                sockets,
                listeners: Mutex::default(),
                idents,
                tidy: Arc::default(),
                watch: Arc::default(),
                fd_kept: Arc::default(),
                config,
            }),
        }
    }

    /// Hands `conn`, a connection from outside ax (e.g. a TCP client of an
    /// exposed host port), to the server listening at the first of
    /// `endpoints` that takes it: the server's next `accept` on that
    /// listener returns `conn` itself, with the real client's address.
    /// Data never passes through the broker. Fails when no listener takes
    /// the doorbell (`ECONNREFUSED`, or `EAGAIN` for a full backlog).
    pub fn deliver_connection(
        &self,
        conn: std::os::fd::OwnedFd,
        endpoints: &[ax_registry::UnixEndpoint],
    ) -> io::Result<()> {
        self.shared
            .doors
            .ring(
                self.shared.config.instance,
                &self.shared.sockets,
                conn,
                endpoints,
                None,
            )
            .map_err(|(e, _conn)| e)
    }

    /// As [`Broker::deliver_connection`], for a connection that stands for
    /// a client under ax on another host: the server's `accept` and
    /// `getpeername` answer `peer` (the client's VIP:port) and its
    /// `getsockname` answers `local` (the VIP:port the client dialled), not
    /// the hosts' addresses.
    pub fn deliver_remote_connection(
        &self,
        conn: std::os::fd::OwnedFd,
        endpoints: &[ax_registry::UnixEndpoint],
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
    ) -> io::Result<()> {
        self.shared
            .doors
            .ring(
                self.shared.config.instance,
                &self.shared.sockets,
                conn,
                endpoints,
                Some(crate::doors::VirtualNames { local, peer }),
            )
            .map_err(|(e, _conn)| e)
    }

    /// Whether a program still holds the UNIX listener at `endpoint` (a
    /// closed one leaves its name free).
    pub fn listener_alive(&self, endpoint: &ax_registry::UnixEndpoint) -> bool {
        crate::handlers::endpoint_alive(&self.shared, endpoint)
    }

    /// Tells the broker that `keeper` shares its fd table, until the keeper
    /// exits. A connection accepted for a server is then parked in the
    /// app's stash only where no keeper runs: the keeper already holds it
    /// if the daemon dies before the server has it, and a successor
    /// collects it from there ([`keeper::salvage`]) — one `sendmsg`, one
    /// `recvmsg` and one `close` fewer per connection.
    ///
    /// [`keeper::salvage`]: crate::keeper::salvage
    pub fn kept_by(&self, keeper: &crate::keeper::FdKeeper) {
        let kept = self.shared.fd_kept.clone();
        kept.store(true, std::sync::atomic::Ordering::SeqCst);
        let watched = keeper.watch(move |stopped| {
            kept.store(false, std::sync::atomic::Ordering::SeqCst);
            if !stopped {
                tracing::warn!("the fd keeper exited; connections are parked in each app's stash while they are handed over");
            }
        });
        if let Err(e) = watched {
            self.shared
                .fd_kept
                .store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot watch the fd keeper; connections are parked in each app's stash while they are handed over");
        }
    }

    /// Treats `app` as restricting itself (see `handlers::restrict`): its
    /// egress connects go to the kernel. For an app taken over from a
    /// daemon that died: whether it restricted itself meanwhile (Landlock
    /// leaves no trace in `/proc`) is not known.
    pub fn assume_self_restricted(&self, app: AppId) {
        self.shared.self_restricted.mark(app);
    }

    /// Creates (or, after [`keeper::salvage`] found a predecessor's,
    /// enters) the private network namespace every UNIX socket of this
    /// broker lives in, and starts its socket factory, now rather than at
    /// the first trapped call. A daemon calls this at start and refuses to
    /// run without it; an embedder that does not gets it lazily, and calls
    /// that find no socket fail with `ENOBUFS`.
    ///
    /// # Errors
    /// Why no namespace could be had (namespaces disabled, …).
    ///
    /// [`keeper::salvage`]: crate::keeper::salvage
    pub fn open_private_namespace(&self) -> io::Result<()> {
        self.shared.sockets.open()
    }

    /// Before [`Broker::open_private_namespace`], when no predecessor's
    /// anchor was salvaged: looks for the predecessor's private namespace
    /// among the sockets of `pids` (the programs of the apps it served)
    /// and their descendants — a listener of this instance in a namespace
    /// the daemon's user owns. True when one was found.
    pub fn find_private_namespace(&self, pids: &[u32]) -> bool {
        self.shared.sockets.find_in_processes(pids)
    }

    /// The kernel's table of UNIX sockets (`/proc/net/unix`) of the
    /// broker's private network namespace, where its listeners are.
    ///
    /// # Errors
    /// `ENOENT` when no namespace was opened yet; the read's error;
    /// `EINVAL` for a table that does not parse.
    pub fn private_unix_table(&self) -> io::Result<Vec<crate::UnixSocketRow>> {
        self.shared.sockets.unix_table()
    }

    /// True when `fd` is a socket in the broker's private network
    /// namespace: one the broker made, whatever its name.
    pub fn is_private_socket(&self, fd: &impl std::os::fd::AsFd) -> bool {
        self.shared.sockets.is_private(fd)
    }

    /// The counters of every broker in this process: trapped calls by
    /// syscall and outcome, their handling time, policy denials, errors,
    /// quota hits. Reading them takes no lock the broker uses.
    pub fn metrics(&self) -> crate::metrics::Metrics {
        crate::metrics::snapshot()
    }

    /// The settings in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    /// Serves the trapped calls of `app`, whose processes share `listener`,
    /// on a new thread. When the app's last process exits, its services are
    /// released ([`Directory::app_exited`]) and the thread ends. An app may
    /// be served on several listeners at once (an OCI container and each
    /// `exec` into it): it exits when the processes of all of them have.
    pub fn serve(&self, app: AppId, listener: NotifyFd) -> io::Result<Session> {
        self.serve_with_journal(app, listener, None, None, None)
    }

    /// Like [`Broker::serve`], recording every call between its receipt and
    /// its answer in `journal` (a memfd the launcher keeps; see
    /// [`ax_sys::journal`]). Calls a previous broker recorded there and
    /// never answered are finished first: this is how a restarted daemon
    /// takes over an app without losing a call. Connections being handed
    /// to a server wait in `stash` (see [`crate::Stash`]), so that one
    /// accepted by a broker that dies is installed by its successor.
    ///
    /// `root` is the app's first process: a call the predecessor received
    /// and died before recording is looked for among its process tree.
    pub fn serve_with_journal(
        &self,
        app: AppId,
        listener: NotifyFd,
        journal: Option<Journal>,
        stash: Option<crate::Stash>,
        root: Option<u32>,
    ) -> io::Result<Session> {
        let shared = self.shared.clone();
        let listener = Arc::new(listener);
        let journal = journal.map(Arc::new);
        let stash = stash.map(Arc::new);
        let state = AppState::new(app);
        *self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(app)
            .or_default() += 1;
        // Same-CPU wake-ups halve the round trip where the kernel has them
        // (6.6+). Where it also ends a receive waiting for a call when the
        // app's last program exits (6.11+), the loop may wait there.
        let sync = listener.set_sync_wake_up();
        let wait_in_recv = sync && crate::tidy::receive_ends_on_exit();
        tracing::debug!(app, sync_wake_up = sync, wait_in_recv, "serving app");
        let thread = std::thread::Builder::new()
            .name(format!("ax-app-{app}"))
            .spawn(move || {
                let link = AppLink {
                    shared: &shared,
                    app,
                    listener: &listener,
                    journal: &journal,
                    stash: &stash,
                    state: &state,
                };
                receive_loop(&link, root, wait_in_recv)
            })?;
        Ok(Session { app, thread })
    }
}

/// No call for this long: the app is idle, and the fdinfo files kept to
/// look at its fds are closed (see `PidfdCache::forget_fdinfo`).
const FDINFO_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Receives and answers the app's calls until its last program exits.
///
/// With `wait_in_recv` (a kernel whose receive ends when the filter's last
/// program exits: see `crate::tidy`), the loop waits in the receive itself
/// whenever no blocking accept is parked, and the broker's tidy thread
/// looks after its cache; otherwise, and while accepts are parked, it
/// polls the notify fd beside the parked listeners, with a timeout for
/// their checks and its own housekeeping. An accept parked for over a
/// second is looked at by the broker's watch thread (`crate::watch`),
/// which wakes the loop through an eventfd polled beside them when the
/// accept needs it: the loop polls with no timeout then, but for a
/// listener's `SO_RCVTIMEO`.
fn receive_loop(link: &AppLink<'_>, root: Option<u32>, wait_in_recv: bool) {
    let (shared, app, listener, journal) = (link.shared, link.app, link.listener, link.journal);
    let cache = Arc::new(Mutex::new(PidfdCache::default()));
    let marks = Arc::new(crate::tidy::LoopMarks::default());
    let lock_cache = || crate::lock(&cache);
    if let Some(j) = journal {
        // Before receiving anything: every call in the "received" state
        // now is a predecessor's.
        let mut orphans = crate::orphans::find(listener, j);
        orphans.extend(take_over(link, j, &mut lock_cache(), root));
        orphans.sort_unstable();
        orphans.dedup();
        crate::orphans::recover(link, orphans, root);
    }
    // Blocking accepts with nothing to accept yet wait here, beside the
    // notify fd, rather than on threads of their own.
    let parking = RefCell::new(Vec::<Parked>::new());
    let mut last_housekeeping = Instant::now();
    let mut last_call = Instant::now();
    // This loop's part in the broker's watch of long-parked accepts, from
    // the first one on, and what it was told to watch last.
    let mut loop_watch: Option<Arc<crate::watch::LoopWatch>> = None;
    let mut watched_before: Vec<(u64, u32)> = Vec::new();
    if wait_in_recv {
        shared.tidy.watch(&cache, &marks);
    }
    loop {
        if wait_in_recv && parking.borrow().is_empty() {
            if let (Some(lw), false) = (&loop_watch, watched_before.is_empty()) {
                lw.set(&[]);
                watched_before.clear();
            }
            marks.waiting.store(true, Ordering::Relaxed);
            let received = listener.recv();
            marks.waiting.store(false, Ordering::Relaxed);
            // ENOENT here may also mean the app's last program exited.
            let gone = || hung_up(listener);
            match answer_received(link, received, &parking, &marks, &mut lock_cache(), gone) {
                Received::Call => last_call = Instant::now(),
                Received::Nothing => {}
                Received::End => break,
            }
            continue;
        }
        // Accepts parked past their first second are watched by the
        // broker's watch thread (see crate::watch), which wakes the loop
        // when one needs it; the loop looks at the others itself.
        let mut watchable: Vec<(u64, u32)> = parking
            .borrow()
            .iter()
            .filter(|p| p.watchable())
            .map(|p| (p.notif.id, p.notif.pid))
            .collect();
        watchable.sort_unstable();
        if loop_watch.is_none() && !watchable.is_empty() {
            loop_watch = shared.watch.join(listener);
        }
        // Told only when it changed: a loop with many parked accepts goes
        // round once per call of its app.
        if let (Some(lw), true) = (&loop_watch, watchable != watched_before) {
            lw.set(&watchable);
            watched_before = watchable;
        }
        let watched = loop_watch.is_some();
        // How long until a parked accept is due for a check of the loop's
        // own: `None` when none is (all are watched, with no timeout).
        let due = parking
            .borrow()
            .iter()
            .filter_map(|p| p.next_check(watched))
            .min();
        let cache_empty = lock_cache().is_empty();
        let (revents, ready, woken) = {
            let parked = parking.borrow();
            // The common case, nothing parked, polls from the stack: no
            // allocation per notification.
            let mut one = [PollFd::new(listener.as_ref(), PollFlags::IN)];
            let mut many;
            let fds: &mut [PollFd<'_>] = if parked.is_empty() {
                &mut one
            } else {
                many = Vec::with_capacity(2 + parked.len());
                many.push(PollFd::new(listener.as_ref(), PollFlags::IN));
                for p in parked.iter() {
                    many.push(PollFd::from_borrowed_fd(p.listener(), PollFlags::IN));
                }
                if let Some(lw) = &loop_watch {
                    many.push(PollFd::from_borrowed_fd(lw.fd(), PollFlags::IN));
                }
                &mut many
            };
            let due_in = due.and_then(|d| Timespec::try_from(d).ok());
            let idle = Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let timeout = if due_in.is_some() {
                due_in.as_ref()
            } else if !cache_empty && !wait_in_recv {
                // Where no tidy thread looks after the cache: once a second.
                Some(&idle)
            } else {
                None
            };
            // With nothing due, the tidy thread looks after the cache (it
            // does so only while this is set).
            let long_wait = timeout.is_none() && wait_in_recv;
            if long_wait {
                marks.waiting.store(true, Ordering::Relaxed);
            }
            let polled = poll(fds, timeout);
            if long_wait {
                marks.waiting.store(false, Ordering::Relaxed);
            }
            match polled {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(app, error = %e, "polling the notify fd failed; giving up on the app");
                    break;
                }
            }
            let listeners = fds.len().min(1 + parked.len());
            let ready: Vec<bool> = fds[1..listeners]
                .iter()
                .map(|f| !f.revents().is_empty())
                .collect();
            let woken = !parked.is_empty()
                && loop_watch.is_some()
                && fds.last().is_some_and(|f| !f.revents().is_empty());
            (fds[0].revents(), ready, woken)
        };
        if woken {
            if let Some(lw) = &loop_watch {
                lw.clear();
            }
        }
        let mut pidfds = lock_cache();
        // One clock read per wake-up, for both of the loop's marks.
        let now = Instant::now();
        let housekeeping =
            woken || now.duration_since(last_housekeeping) >= due.unwrap_or(PARKED_TICK);
        if housekeeping {
            last_housekeeping = now;
            pidfds.sweep();
        }
        if ready.iter().any(|&r| r) || housekeeping {
            resume_parked(link, &parking, &ready, housekeeping);
        }
        if !revents.contains(PollFlags::IN) {
            if revents.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
                break;
            }
            if housekeeping && now.duration_since(last_call) >= FDINFO_IDLE {
                // Idle: the fds kept to look at the app's fds go, so that
                // a quiet daemon holds what it held before the burst.
                pidfds.forget_fdinfo();
            }
            continue;
        }
        // The poll told a hang-up apart already.
        match answer_received(link, listener.recv(), &parking, &marks, &mut pidfds, || {
            false
        }) {
            Received::Call => last_call = now,
            Received::Nothing => {}
            Received::End => break,
        }
    }
    link.state.app_exited();
    let last = {
        let mut live = shared.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let n = live.entry(app).or_default();
        *n = n.saturating_sub(1);
        let last = *n == 0;
        if last {
            live.remove(&app);
        }
        last
    };
    if !last {
        tracing::debug!(app, "one of the app's listeners closed; others remain");
        return;
    }
    shared.directory.app_exited(app);
    shared.forget_app_options(app);
    tracing::debug!(app, "app exited; services released");
}

/// What a receive of the loop came to.
enum Received {
    /// A call, answered (or handed on).
    Call,
    /// No call: its target died or was interrupted since it trapped
    /// (`ENOENT`), or the receive itself was interrupted.
    Nothing,
    /// The app's last program exited, or receiving failed: the loop ends.
    End,
}

/// Answers what a receive brought. `gone` tells, after an `ENOENT`,
/// whether the app's last program exited.
fn answer_received(
    link: &AppLink<'_>,
    received: std::io::Result<Notification>,
    parking: &RefCell<Vec<Parked>>,
    marks: &crate::tidy::LoopMarks,
    pidfds: &mut PidfdCache,
    gone: impl FnOnce() -> bool,
) -> Received {
    match received {
        Ok(n) => {
            marks.calls.fetch_add(1, Ordering::Relaxed);
            dispatch(link, n, false, Some(parking), pidfds);
            Received::Call
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && gone() => Received::End,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => Received::Nothing,
        Err(e) => {
            tracing::error!(app = link.app, error = %e, "receiving a notification failed; giving up on the app");
            Received::End
        }
    }
}

/// Whether the notify fd hangs up: every program of its filter exited.
fn hung_up(listener: &NotifyFd) -> bool {
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL),
        Err(rustix::io::Errno::INTR) => false,
        Err(_) => true,
    }
}

/// Finishes the calls a predecessor left unanswered (see
/// [`Broker::serve_with_journal`]): accepts whose connection it installed
/// get their answer, accepts whose connection waits in the stash get that
/// connection, every other call is handled again.
/// The inode of an fd (0 if it cannot be read).
fn inode_of(fd: &impl std::os::fd::AsFd) -> u64 {
    rustix::fs::fstat(fd).map(|st| st.st_ino).unwrap_or(0)
}

/// The fd of thread `tid`'s process that is the socket with inode `ino`.
fn fd_with_inode(tid: u32, ino: u64) -> Option<i32> {
    crate::orphans::socket_fds(tid)
        .into_iter()
        .find_map(|(fd, i)| (i == ino).then_some(fd))
}

/// Returns the ids of pending calls whose record did not hold up (see
/// [`crate::verify`]): they are to be found as lost calls.
fn take_over(
    link: &AppLink<'_>,
    j: &Journal,
    pidfds: &mut PidfdCache,
    root: Option<u32>,
) -> Vec<u64> {
    let listener = link.listener;
    // The journal is the launcher's user's to write: each record is a hint,
    // acted on only once the kernel confirms it.
    let app = crate::verify::AppThreads::of(root);
    let mut unverified = Vec::new();
    let pending: Vec<Notification> = j
        .pending()
        .into_iter()
        // Lost calls' placeholders: see crate::orphans.
        .filter(|n| n.nr != crate::orphans::PLACEHOLDER_NR)
        .filter(|n| match crate::verify::journaled_call(listener, &app, n) {
            Ok(()) => true,
            Err(crate::verify::Rejected::NotPending) => {
                j.clear(n.id);
                false
            }
            Err(why) => {
                tracing::warn!(
                    app = link.app,
                    id = n.id,
                    tid = n.pid,
                    nr = n.nr,
                    reason = %why,
                    "ignoring a journal record that does not match the kernel's view"
                );
                crate::orphans::record_lost(j, n.id);
                unverified.push(n.id);
                false
            }
        })
        .collect();
    let mut stashed = link.stash.as_ref().map(|s| s.drain()).unwrap_or_default();
    // One connection may be parked twice (stash and fd keeper).
    let mut seen = std::collections::HashSet::new();
    stashed.retain(|c| seen.insert(inode_of(c)));
    // Accepts whose connection was installed, or about to be, settle
    // first: they own their connection.
    let mut rest = Vec::new();
    for n in pending {
        let call = link.call(n, true, None);
        if let Some(fd) = j.installed(n.id) {
            // Installed already; only the address and the answer were
            // missing. Its parked duplicate is not needed any more.
            let ino = Target::open(n.pid)
                .ok()
                .and_then(|t| t.fd(fd as u64).ok())
                .map(|c| inode_of(&c));
            stashed.retain(|c| Some(inode_of(c)) != ino);
            let outcome = handlers::accept::finish_installed(&call, fd);
            respond(listener, link.journal, &n, outcome);
            continue;
        }
        if let Some(ino) = j.installing(n.id) {
            if let Some(fd) = fd_with_inode(n.pid, ino) {
                // Installed, and killed before noting it.
                stashed.retain(|c| inode_of(c) != ino);
                let outcome = handlers::accept::finish_installed(&call, fd);
                respond(listener, link.journal, &n, outcome);
                continue;
            }
            if let Some(i) = stashed.iter().position(|c| inode_of(c) == ino) {
                let conn = stashed.swap_remove(i);
                let outcome = handlers::accept::finish_with(&call, conn);
                respond(listener, link.journal, &n, outcome);
                continue;
            }
        }
        rest.push(n);
    }
    // A parked connection the program already holds belongs to an accept
    // that was answered: never hand it out again.
    if !stashed.is_empty() {
        let held = root.map(crate::orphans::socket_inodes).unwrap_or_default();
        stashed.retain(|c| !held.contains(&inode_of(c)));
    }
    for n in rest {
        let call = link.call(n, true, None);
        let is_accept = matches!(n.nr as libc::c_long, libc::SYS_accept | libc::SYS_accept4);
        tracing::info!(
            app = link.app,
            id = n.id,
            nr = n.nr,
            "finishing a call the previous daemon left unanswered"
        );
        if is_accept {
            if let Some(conn) = stashed.pop() {
                let outcome = handlers::accept::finish_with(&call, conn);
                respond(listener, link.journal, &n, outcome);
                continue;
            }
        }
        dispatch(link, n, true, None, pidfds);
    }
    if !stashed.is_empty() {
        tracing::debug!(
            app = link.app,
            count = stashed.len(),
            "dropping parked duplicates of connections already installed"
        );
    }
    unverified
}

/// Finishes the parked accepts that can be finished.
fn resume_parked(
    link: &AppLink<'_>,
    parking: &RefCell<Vec<Parked>>,
    ready: &[bool],
    housekeeping: bool,
) {
    let parked = std::mem::take(&mut *parking.borrow_mut());
    let mut still = Vec::with_capacity(parked.len());
    for (i, p) in parked.into_iter().enumerate() {
        // On the receive loop: what must wait is deferred (a resumed
        // accept parks nothing again).
        let call = link.call(p.notif, false, Some(parking));
        let readable = ready.get(i).copied().unwrap_or(false);
        let resumed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.resume(&call, readable, housekeeping)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(
                id = p.notif.id,
                "a parked accept panicked; failing it with EIO"
            );
            Some(Outcome::Errno(PANIC_ERRNO))
        });
        match resumed {
            Some(outcome) => respond(link.listener, link.journal, &p.notif, outcome),
            None => still.push(p),
        }
    }
    parking.borrow_mut().extend(still);
}

/// The app a receive loop serves, and where its answers go.
pub(crate) struct AppLink<'a> {
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) app: AppId,
    pub(crate) listener: &'a Arc<NotifyFd>,
    pub(crate) journal: &'a Option<Arc<Journal>>,
    pub(crate) stash: &'a Option<Arc<crate::Stash>>,
    /// What the broker keeps for this app, and its quotas.
    pub(crate) state: &'a Arc<AppState>,
}

/// An [`AppLink`] that owns its parts, for work moved to a helper thread.
pub(crate) struct OwnedAppLink {
    shared: Arc<Shared>,
    app: AppId,
    listener: Arc<NotifyFd>,
    journal: Option<Arc<Journal>>,
    stash: Option<Arc<crate::Stash>>,
    state: Arc<AppState>,
}

impl OwnedAppLink {
    /// The parts of `link`, shared.
    pub(crate) fn of_link(link: &AppLink<'_>) -> Self {
        Self {
            shared: link.shared.clone(),
            app: link.app,
            listener: link.listener.clone(),
            journal: link.journal.clone(),
            stash: link.stash.clone(),
            state: link.state.clone(),
        }
    }

    /// The parts of `call`'s link, shared.
    pub(crate) fn of(call: &handlers::Call<'_>) -> Self {
        Self::of_link(&AppLink {
            shared: call.shared,
            app: call.app,
            listener: call.listener,
            journal: call.journal,
            stash: call.stash,
            state: call.state,
        })
    }

    /// Borrows it back as an [`AppLink`].
    pub(crate) fn link(&self) -> AppLink<'_> {
        AppLink {
            shared: &self.shared,
            app: self.app,
            listener: &self.listener,
            journal: &self.journal,
            stash: &self.stash,
            state: &self.state,
        }
    }
}

impl<'a> AppLink<'a> {
    pub(crate) fn call(
        &self,
        notif: Notification,
        replay: bool,
        parking: Option<&'a RefCell<Vec<Parked>>>,
    ) -> handlers::Call<'a> {
        handlers::Call {
            shared: self.shared,
            app: self.app,
            listener: self.listener,
            journal: self.journal,
            stash: self.stash,
            state: self.state,
            replay,
            parking,
            notif,
            fd_info: std::cell::OnceCell::new(),
        }
    }
}

/// Handles one notification and answers it (now, or from a helper thread
/// for calls that may block).
pub(crate) fn dispatch(
    link: &AppLink<'_>,
    n: Notification,
    replay: bool,
    parking: Option<&RefCell<Vec<Parked>>>,
    pidfds: &mut PidfdCache,
) {
    if let Some(j) = link.journal {
        j.record(&n);
    }
    let call = link.call(n, replay, parking);
    let start = Instant::now();
    let outcome = unwind_to_errno(&n, || handlers::handle(&call, pidfds));
    respond(link.listener, link.journal, &n, outcome);
    crate::metrics::record_call(n.nr, outcome, start);
}

/// The errno a trapped call gets when its handler panics: `EIO`, a call
/// that failed for a reason the program cannot act on. The panic is logged
/// (and printed by the panic hook); the program is never left waiting.
pub(crate) const PANIC_ERRNO: i32 = libc::EIO;

/// Runs a handler, answering [`PANIC_ERRNO`] if it panics.
pub(crate) fn unwind_to_errno(n: &Notification, f: impl FnOnce() -> Outcome) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!(
            id = n.id,
            nr = n.nr,
            pid = n.pid,
            "a handler panicked; failing the call with EIO"
        );
        crate::metrics::error(crate::metrics::ErrorKind::HandlerPanic);
        Outcome::Errno(PANIC_ERRNO)
    })
}

pub(crate) fn respond(
    listener: &NotifyFd,
    journal: &Option<Arc<Journal>>,
    n: &Notification,
    outcome: Outcome,
) {
    let result = match outcome {
        Outcome::Value(v) => listener.respond_value(n.id, v),
        Outcome::Errno(e) => listener.respond_error(n.id, e),
        Outcome::Continue => listener.respond_continue(n.id),
        Outcome::Answered => Ok(()),
        Outcome::Deferred => return,
    };
    if let Some(j) = journal {
        j.clear(n.id);
    }
    if let Err(e) = result {
        handlers::note_answer_failure(n, &e);
    }
}

/// The first of the client ports (Linux's default ephemeral range).
const FIRST_CLIENT_PORT: u32 = 32768;
/// How many client ports there are.
pub(crate) const CLIENT_PORTS: u32 = 60999 - FIRST_CLIENT_PORT + 1;

/// The next client port in turn (see `handlers::connect`, which skips one
/// a live connection to the same destination holds).
pub(crate) fn next_client_port(shared: &Shared) -> u16 {
    (FIRST_CLIENT_PORT + shared.next_client_port.fetch_add(1, Ordering::Relaxed) % CLIENT_PORTS)
        as u16
}
