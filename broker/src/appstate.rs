//! What the broker keeps for one app: per-socket state, bounded and swept,
//! and the app's quotas.
//!
//! Nothing here is shared between apps, so one app's load can neither wipe
//! nor crowd out another's state; it all goes when the app's session ends.
//!
//! # Per-socket state
//!
//! Remembered TCP/IP options (and flags such as "told `EINPROGRESS`") and
//! held connects (`--connect-wait`) are kept by socket inode. Each table
//! holds at most [`SOCKET_STATE_LIMIT`] entries; when one is full, entries
//! of sockets that no process still holds are swept (every process's fds
//! the broker may read are read: a rootless broker cannot see a set-uid
//! program's, whose entries then go too). A table still full after a sweep refuses new
//! entries: the call that needed one fails with `ENOMEM`, as the kernel
//! answers a socket call it cannot allocate for.
//!
//! # Quotas
//!
//! | what | per app | errno when hit |
//! |---|---|---|
//! | blocking accepts parked in the receive loop | [`MAX_PARKED_ACCEPTS`] | `ENOBUFS` |
//! | calls finished on helper threads | [`MAX_HELPERS`] | `ENOBUFS` |
//! | connects held for a service not up yet | [`MAX_HELD_CONNECTS`] | `ENOBUFS` |
//!
//! `ENOBUFS` ("no buffer space available") is what the kernel answers a
//! socket call that lacks a resource. The pool of helper threads is also
//! bounded for all apps together (see `crate::pool`). Each quota logs one
//! warning when it is hit, and again only after use has fallen back below
//! three quarters of it.

use crate::doors::VirtualNames;
use crate::lock;
use ax_registry::AppId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entries a per-socket table of one app holds at most.
pub(crate) const SOCKET_STATE_LIMIT: usize = 65536;
/// Blocking accepts one app may have parked at once.
pub(crate) const MAX_PARKED_ACCEPTS: usize = 1024;
/// Calls of one app that may wait on helper threads at once.
pub(crate) const MAX_HELPERS: usize = 64;
/// Connects of one app that may be held (`--connect-wait`) at once (each
/// waits on a helper thread of its own, outside [`MAX_HELPERS`]: one app
/// alone cannot take every thread of the pool).
pub(crate) const MAX_HELD_CONNECTS: usize = 128;
/// Distinct options noted per socket (or listener) at most: a program
/// sets a handful. Notes are taken before the kernel judges the option, so
/// this bounds what a program can make the daemon hold (with
/// [`SOCKET_STATE_LIMIT`] sockets: 8 MiB), not a count of valid options.
const PRESETS_PER_SOCKET: usize = 16;
/// Listeners with options noted one app keeps at most.
const LISTENERS_WITH_OPTIONS: usize = 4096;
/// Least time between two sweeps of one table.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A limit on something an app holds, with its warning.
pub(crate) struct Quota {
    what: &'static str,
    app: AppId,
    limit: usize,
    used: AtomicUsize,
    warned: AtomicBool,
}

impl Quota {
    fn new(what: &'static str, app: AppId, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            app,
            limit,
            used: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// One unit of the quota, returned when the permit drops; `None` (and
    /// a warning, once per burst) when none is left.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Permit> {
        let took = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if took {
            Some(Permit {
                quota: self.clone(),
            })
        } else {
            self.hit();
            None
        }
    }

    /// Logs that the quota is exhausted, unless that was logged already in
    /// this burst.
    pub(crate) fn hit(&self) {
        crate::metrics::quota_hit(self.what);
        if !self.warned.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                app = self.app,
                limit = self.limit,
                "quota of {} reached; further ones fail with ENOBUFS",
                self.what
            );
        }
    }

    /// Units in use.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// One unit of a [`Quota`], held while the thing it counts exists.
pub(crate) struct Permit {
    quota: Arc<Quota>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let before = self.quota.used.fetch_sub(1, Ordering::AcqRel);
        if before.saturating_sub(1) <= self.quota.limit * 3 / 4 {
            self.quota.warned.store(false, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("what", &self.quota.what)
            .finish()
    }
}

/// The state was not kept: the app's table is full of live sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFull;

/// A bounded table of per-socket entries, keyed by something that names
/// the socket's inode.
struct SocketTable<K, V> {
    map: HashMap<K, V>,
    last_sweep: Option<Instant>,
}

impl<K: std::hash::Hash + Eq + Copy, V> SocketTable<K, V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            last_sweep: None,
        }
    }

    fn insert(&mut self, key: K, value: V, inode: impl Fn(&K) -> u64) -> Result<(), TableFull> {
        self.make_room(&key, inode)?;
        self.map.insert(key, value);
        Ok(())
    }

    /// `Ok` when `key` has an entry or room for one, after a sweep if the
    /// table is full and one is due.
    fn make_room(&mut self, key: &K, inode: impl Fn(&K) -> u64) -> Result<(), TableFull> {
        if self.map.len() >= SOCKET_STATE_LIMIT && !self.map.contains_key(key) {
            let due = self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if due {
                self.last_sweep = Some(Instant::now());
                let live = crate::orphans::live_socket_inodes();
                self.map.retain(|k, _| live.contains(&inode(k)));
            }
            if self.map.len() >= SOCKET_STATE_LIMIT {
                return Err(TableFull);
            }
        }
        Ok(())
    }
}

/// A connection's kernel addresses: (local, peer).
type KernelNames = (SocketAddr, SocketAddr);

/// A listener's inode, and (level, name) of each option set on it.
pub(crate) type ListenerOptions = (u64, Vec<(i32, i32)>);

/// (inode, level, name) of a remembered option.
pub(crate) type OptionKey = (u64, i32, i32);

/// Everything the broker keeps for one app.
pub(crate) struct AppState {
    app: AppId,
    /// TCP/IP options set on swapped sockets (and state under a level no
    /// program can name).
    options: Mutex<SocketTable<OptionKey, Vec<u8>>>,
    /// TCP/IP options set on sockets the kernel still owned, by inode:
    /// (level, name) of each, carried when ax swaps the socket (see
    /// `handlers::carry`).
    presets: Mutex<SocketTable<u64, Vec<(i32, i32)>>>,
    /// Swapped listeners the program set TCP/IP options on, by cookie:
    /// their inode and (level, name) of each option, passed on to the
    /// connections they accept (see `handlers::carry`).
    listener_options: Mutex<HashMap<u64, ListenerOptions>>,
    /// TCP sockets whose connect is held on a loopback port: by inode,
    /// that port and the VIP:port the program asked for.
    held: Mutex<SocketTable<u64, (SocketAddr, SocketAddr)>>,
    /// TCP connections to or from another host of a cluster: by inode,
    /// their kernel (local, peer) addresses and the VIPs they stand for.
    remote: Mutex<SocketTable<u64, (KernelNames, VirtualNames)>>,
    /// False once the app's last process has exited.
    alive: AtomicBool,
    /// Set once a UDP datagram to a VIP was refused (and logged).
    udp_to_vip: AtomicBool,
    /// Set once the app connected a socket again after its connect was
    /// told `EINPROGRESS` (APR does, for every connection: `ab`, httpd).
    reconnects: AtomicBool,
    pub(crate) parked: Arc<Quota>,
    pub(crate) helpers: Arc<Quota>,
    pub(crate) held_connects: Arc<Quota>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub(crate) fn new(app: AppId) -> Arc<Self> {
        Arc::new(Self {
            app,
            options: Mutex::new(SocketTable::new()),
            presets: Mutex::new(SocketTable::new()),
            listener_options: Mutex::new(HashMap::new()),
            held: Mutex::new(SocketTable::new()),
            remote: Mutex::new(SocketTable::new()),
            alive: AtomicBool::new(true),
            udp_to_vip: AtomicBool::new(false),
            reconnects: AtomicBool::new(false),
            parked: Quota::new("parked blocking accepts", app, MAX_PARKED_ACCEPTS),
            helpers: Quota::new("calls waiting on helper threads", app, MAX_HELPERS),
            held_connects: Quota::new("held connects (--connect-wait)", app, MAX_HELD_CONNECTS),
        })
    }

    /// True until the app's last process has exited.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// True the first time only: a UDP `connect`/`sendto` to a VIP was
    /// refused, and is logged once per app.
    pub(crate) fn first_udp_to_vip(&self) -> bool {
        !self.udp_to_vip.swap(true, Ordering::Relaxed)
    }

    /// Notes that the app connects sockets again after `EINPROGRESS`.
    pub(crate) fn note_reconnects(&self) {
        self.reconnects.store(true, Ordering::Relaxed);
    }

    /// Whether the app was seen connecting a socket again after
    /// `EINPROGRESS`.
    pub(crate) fn reconnects(&self) -> bool {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The app has exited: its state goes, and waits on its behalf end.
    pub(crate) fn app_exited(&self) {
        self.alive.store(false, Ordering::Release);
        lock(&self.options).map.clear();
        lock(&self.presets).map.clear();
        lock(&self.listener_options).clear();
        lock(&self.held).map.clear();
        lock(&self.remote).map.clear();
    }

    pub(crate) fn remember_option(&self, key: OptionKey, value: Vec<u8>) -> Result<(), TableFull> {
        let kept = lock(&self.options).insert(key, value, |k| k.0);
        self.warn_if_options_full(&kept);
        kept
    }

    /// `Ok` when [`AppState::remember_option`] of `key` would find room
    /// now (it may still not, if another of the app's receive loops fills
    /// the table meanwhile).
    pub(crate) fn room_for_option(&self, key: OptionKey) -> Result<(), TableFull> {
        let room = lock(&self.options).make_room(&key, |k| k.0);
        self.warn_if_options_full(&room);
        room
    }

    fn warn_if_options_full(&self, outcome: &Result<(), TableFull>) {
        if outcome.is_err() {
            tracing::warn!(
                app = self.app,
                limit = SOCKET_STATE_LIMIT,
                "socket options of too many live sockets; failing setsockopt with ENOMEM"
            );
        }
    }

    pub(crate) fn recall_option(&self, key: OptionKey) -> Option<Vec<u8>> {
        lock(&self.options).map.get(&key).cloned()
    }

    pub(crate) fn forget_option(&self, key: OptionKey) {
        lock(&self.options).map.remove(&key);
    }

    /// Notes that the program set option (`level`, `name`) on the socket
    /// with `inode` while the kernel still owned it.
    pub(crate) fn note_preset(&self, inode: u64, level: i32, name: i32) -> Result<(), TableFull> {
        let mut presets = lock(&self.presets);
        if let Some(names) = presets.map.get_mut(&inode) {
            if !names.contains(&(level, name)) && names.len() < PRESETS_PER_SOCKET {
                names.push((level, name));
            }
            return Ok(());
        }
        presets.insert(inode, vec![(level, name)], |k| *k)
    }

    /// Notes that the program set option (`level`, `name`) on the swapped
    /// listener with `cookie` and `inode`. Listeners are few: a table that
    /// fills up anyway (listeners closed long ago, whose cookies never come
    /// back) starts afresh.
    pub(crate) fn note_listener_option(&self, cookie: u64, inode: u64, level: i32, name: i32) {
        let mut listeners = lock(&self.listener_options);
        if listeners.len() >= LISTENERS_WITH_OPTIONS && !listeners.contains_key(&cookie) {
            listeners.clear();
        }
        let (_, names) = listeners.entry(cookie).or_insert((inode, Vec::new()));
        if !names.contains(&(level, name)) && names.len() < PRESETS_PER_SOCKET {
            names.push((level, name));
        }
    }

    /// Whether any listener of the app has an option noted.
    pub(crate) fn has_listener_options(&self) -> bool {
        !lock(&self.listener_options).is_empty()
    }

    /// The inode of the listener with `cookie` and the options noted for
    /// it, if any.
    pub(crate) fn listener_options(&self, cookie: u64) -> Option<ListenerOptions> {
        lock(&self.listener_options).get(&cookie).cloned()
    }

    /// Whether any socket of the app has a preset noted.
    pub(crate) fn has_presets(&self) -> bool {
        !lock(&self.presets).map.is_empty()
    }

    /// The options noted for the socket with `inode`, forgotten here.
    pub(crate) fn take_presets(&self, inode: u64) -> Vec<(i32, i32)> {
        lock(&self.presets).map.remove(&inode).unwrap_or_default()
    }

    /// Remembers that the socket with `inode` stands for `dst` while its
    /// connect is held at `held`.
    pub(crate) fn note_held_connect(
        &self,
        inode: u64,
        held: SocketAddr,
        dst: SocketAddr,
    ) -> Result<(), TableFull> {
        lock(&self.held).insert(inode, (held, dst), |k| *k)
    }

    /// True when some connect of this app was held (the common case
    /// answers `getpeername` without looking further).
    pub(crate) fn any_held_connects(&self) -> bool {
        !lock(&self.held).map.is_empty()
    }

    /// Remembers that the TCP connection with `inode`, whose kernel
    /// addresses are `real` (local, peer), stands for `names`: a
    /// connection between hosts of a cluster.
    pub(crate) fn note_remote(
        &self,
        inode: u64,
        real: (SocketAddr, SocketAddr),
        names: VirtualNames,
    ) -> Result<(), TableFull> {
        lock(&self.remote).insert(inode, (real, names), |k| *k)
    }

    /// True when some connection of this app goes to or comes from
    /// another host.
    pub(crate) fn any_remote(&self) -> bool {
        !lock(&self.remote).map.is_empty()
    }

    /// The virtual addresses of the connection with `inode`, if it was
    /// noted with these kernel addresses (a check that rules out a reused
    /// inode).
    pub(crate) fn remote_names(
        &self,
        inode: u64,
        real: (SocketAddr, SocketAddr),
    ) -> Option<VirtualNames> {
        lock(&self.remote)
            .map
            .get(&inode)
            .filter(|(r, _)| *r == real)
            .map(|(_, n)| *n)
    }

    /// The VIP:port a held socket stands for, if `inode` was held at
    /// `peer` (a check that rules out a reused inode).
    pub(crate) fn held_destination(&self, inode: u64, peer: SocketAddr) -> Option<SocketAddr> {
        lock(&self.held)
            .map
            .get(&inode)
            .filter(|(held, _)| *held == peer)
            .map(|(_, dst)| *dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_noted_once_each_and_taken_once() {
        let state = AppState::new(1);
        assert!(!state.has_presets());
        state
            .note_preset(7, libc::IPPROTO_TCP, libc::TCP_NODELAY)
            .unwrap();
        state
            .note_preset(7, libc::IPPROTO_TCP, libc::TCP_NODELAY)
            .unwrap();
        state
            .note_preset(7, libc::IPPROTO_IP, libc::IP_TOS)
            .unwrap();
        assert!(state.has_presets());
        assert_eq!(
            state.take_presets(7),
            vec![
                (libc::IPPROTO_TCP, libc::TCP_NODELAY),
                (libc::IPPROTO_IP, libc::IP_TOS)
            ]
        );
        assert!(state.take_presets(7).is_empty());
        assert!(!state.has_presets());
        // Bogus names are noted too (the kernel judges them after), up to
        // the bound.
        for name in 0..100 {
            state.note_preset(8, libc::IPPROTO_TCP, name).unwrap();
        }
        assert_eq!(state.take_presets(8).len(), PRESETS_PER_SOCKET);
    }

    #[test]
    fn listener_notes_keep_their_inode_and_go_with_the_app() {
        let state = AppState::new(1);
        assert!(!state.has_listener_options());
        state.note_listener_option(42, 7, libc::IPPROTO_TCP, libc::TCP_NODELAY);
        state.note_listener_option(42, 7, libc::IPPROTO_TCP, libc::TCP_NODELAY);
        assert_eq!(
            state.listener_options(42),
            Some((7, vec![(libc::IPPROTO_TCP, libc::TCP_NODELAY)]))
        );
        assert_eq!(state.listener_options(43), None);
        state.app_exited();
        assert!(!state.has_listener_options());
    }

    #[test]
    fn quota_counts_and_returns() {
        let q = Quota::new("things", 1, 2);
        let a = q.take().expect("first");
        let b = q.take().expect("second");
        assert!(q.take().is_none());
        assert!(q.warned.load(Ordering::Acquire));
        drop(a);
        assert_eq!(q.used(), 1);
        assert!(!q.warned.load(Ordering::Acquire), "re-armed below 3/4");
        let _c = q.take().expect("room again");
        drop(b);
    }

    #[test]
    fn full_table_sweeps_dead_sockets() {
        let state = AppState::new(1);
        // Inodes no process holds (sockfs inodes are small; these are not
        // sockets at all).
        for i in 0..SOCKET_STATE_LIMIT as u64 {
            state
                .remember_option((u64::MAX - i, 6, 1), vec![1])
                .unwrap();
        }
        let live = rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        let ino = rustix::fs::fstat(&live).unwrap().st_ino;
        state.remember_option((ino, 6, 1), vec![1]).unwrap();
        assert_eq!(lock(&state.options).map.len(), 1, "dead entries swept");
        assert_eq!(state.recall_option((ino, 6, 1)), Some(vec![1]));
        state.app_exited();
        assert!(!state.is_alive());
        assert_eq!(state.recall_option((ino, 6, 1)), None);
    }
}
