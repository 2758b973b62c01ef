//! Where every UNIX socket the broker creates comes from: a pool filled by
//! a socket factory ([`ax_sys::netns`]) in a private network namespace `P`
//! that no program is in.
//!
//! Abstract names are per network namespace, fixed at `socket()` time: the
//! broker binds and connects names in `P` from its own threads, while no
//! process outside `P` sees them (they are not in the host's
//! `/proc/net/unix`), connects to them, or binds a look-alike; and no
//! program can create a socket in `P`. A socket is the broker's only if it
//! lives in `P` ([`Sockets::is_private`]), whatever its name says.
//!
//! The pool is refilled in batches by a thread of its own, off the hot
//! path, so that a connect costs no extra round trip or wake-up: the pool
//! is topped up by one request within [`TOP_UP`] of a take, once takes
//! pause ([`SETTLE`]), or at once when it runs below [`LOW`], rather than
//! by a request per socket; at rest it holds exactly `SPARE` sockets. A
//! successor daemon
//! keeps using the same `P` (the listeners it takes over live there): it
//! finds it through the predecessor's anchor, a socket bound to
//! `ax/<instance>/p` in `P` that the fd keeper keeps
//! ([`crate::keeper::salvage`]). Without one, a new `P` is made and the
//! loss logged.

use crate::target::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags, SocketAddrUnix,
};
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Spare sockets the pool keeps: the refill thread tops it up to exactly
/// this many after every use, so that at rest the daemon's fd count is
/// always the same.
const SPARE: usize = 64;
/// Below this many spare sockets the pool is topped up at once.
const LOW: usize = SPARE / 2;
/// Otherwise the refill thread looks this often, and tops it up once no
/// socket was taken for [`SETTLE`]: a program that connects now and then
/// costs the daemon no wake-up per connection.
const TOP_UP: Duration = Duration::from_secs(1);
/// See [`TOP_UP`].
const SETTLE: Duration = Duration::from_millis(2);
/// Most sockets [`Sockets::known_name`] remembers before it starts afresh.
const KNOWN_MAX: usize = 16_384;
/// After a failure to make a namespace, wait this long before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// The anchor's abstract name in `P`.
pub(crate) fn anchor_name(instance: u32) -> Vec<u8> {
    format!("ax/{instance:08x}/p").into_bytes()
}

/// The identity of a namespace: its nsfs inode and device.
type NsId = (u64, u64);

fn ns_id(fd: &impl AsFd) -> io::Result<NsId> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// A running factory and the namespace it makes sockets in.
struct Maker {
    factory: Option<ax_sys::netns::Factory>,
    /// A socket in `P` bound to [`anchor_name`]: keeps `P` findable by a
    /// successor (through the fd keeper) and lets a new factory join it.
    anchor: Option<OwnedFd>,
    last_failure: Option<(Instant, Errno)>,
}

impl Drop for Maker {
    fn drop(&mut self) {
        if let Some(f) = self.factory.take() {
            ax_sys::netns::reap(f);
        }
    }
}

/// What [`Sockets::known_name`] remembers of a socket in `P`.
#[derive(Debug, Clone, Copy)]
struct Known {
    name: crate::names::SocketName,
    /// Seen listening (see [`Sockets::known_listening`]).
    listening: bool,
}

/// A spare socket, with what a connect asks of it first (its cookie and
/// inode, the keys of its identity: see `crate::idents`) read ahead, off
/// the connect's path, when the pool was filled.
#[derive(Debug)]
pub(crate) struct Spare {
    pub(crate) fd: OwnedFd,
    pub(crate) cookie: u64,
    pub(crate) inode: u64,
}

impl Spare {
    /// `fd` with its cookie and inode; `None` if either cannot be read.
    fn read(fd: OwnedFd) -> Option<Self> {
        let cookie = rustix::net::sockopt::socket_cookie(&fd).ok()?;
        let inode = rustix::fs::fstat(&fd).ok()?.st_ino;
        Some(Spare { fd, cookie, inode })
    }
}

/// The broker's source of UNIX sockets in its private namespace.
pub(crate) struct Sockets {
    instance: u32,
    spare: Mutex<Vec<Spare>>,
    low: Condvar,
    maker: Mutex<Maker>,
    /// `P`, once known.
    ns: OnceLock<NsId>,
    /// The `SO_NETNS_COOKIE` of `P`, once a socket in `P` was seen.
    ns_cookie: OnceLock<u64>,
    /// See [`Sockets::known_name`].
    known: Mutex<std::collections::HashMap<u64, Known>>,
    refill_started: OnceLock<()>,
    /// An unbound socket in `P` kept for [`Sockets::name_taken`].
    probe: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets").finish_non_exhaustive()
    }
}

impl Sockets {
    pub(crate) fn new(instance: u32) -> Arc<Self> {
        Arc::new(Sockets {
            instance,
            spare: Mutex::new(Vec::new()),
            low: Condvar::new(),
            maker: Mutex::new(Maker {
                factory: None,
                anchor: None,
                last_failure: None,
            }),
            ns: OnceLock::new(),
            ns_cookie: OnceLock::new(),
            known: Mutex::new(std::collections::HashMap::new()),
            refill_started: OnceLock::new(),
            probe: Mutex::new(None),
        })
    }

    /// A fresh, unbound `AF_UNIX` stream socket in `P` (close-on-exec and
    /// non-blocking: a connect made on it never waits).
    /// `ENOBUFS` when no private namespace can be had: a caller never lets
    /// the kernel run a call for want of one.
    pub(crate) fn take(self: &Arc<Self>) -> Result<OwnedFd, Errno> {
        self.take_spare().map(|s| s.fd)
    }

    /// [`Sockets::take`], with the socket's cookie and inode.
    pub(crate) fn take_spare(self: &Arc<Self>) -> Result<Spare, Errno> {
        {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = spare.pop() {
                // The refill thread is woken only when the pool runs low,
                // once, by the take that crosses the mark: it never waits
                // while the pool is below it (see `refill_loop`), so the
                // takes after that one need not wake it again. Other takes
                // cost no wake-up: it tops the pool up on its own within a
                // second.
                if spare.len() == LOW - 1 {
                    self.low.notify_one();
                }
                return Ok(s);
            }
        }
        let mut batch = self.make(SPARE).map_err(|e| {
            tracing::warn!(error = %e, "no socket in the broker's private network namespace");
            libc::ENOBUFS
        })?;
        self.start_refill();
        let first = batch.pop().ok_or(libc::ENOBUFS)?;
        self.keep(batch);
        Ok(first)
    }

    /// Adds `batch` to the spare sockets, up to `SPARE`; the rest close.
    fn keep(&self, batch: Vec<Spare>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let room = SPARE.saturating_sub(spare.len());
        spare.extend(batch.into_iter().take(room));
        if spare.len() < SPARE {
            self.low.notify_one();
        }
    }

    /// Makes sure `P` and a factory exist now (rather than at the first
    /// socket), so that a daemon can refuse to start without them.
    pub(crate) fn open(self: &Arc<Self>) -> io::Result<()> {
        let batch = self.make(SPARE)?;
        self.keep(batch);
        self.start_refill();
        Ok(())
    }

    /// Whether a socket in `P` holds the abstract name `addr`: a probe
    /// socket's `bind` to it fails then (`EADDRINUSE`). A probe that did
    /// not bind stays unbound and is kept for the next probe, so that a
    /// check repeated every second (the daemon's host loopback watch) costs
    /// no socket; one that bound the name (nobody held it) is closed at
    /// once, which frees the name again. `true` when there is no socket to
    /// probe with, as when the bind fails for another reason: a name is
    /// only ever judged free by the kernel's word.
    pub(crate) fn name_taken(self: &Arc<Self>, addr: &SocketAddrUnix) -> bool {
        let kept = self.probe.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(probe) = kept.or_else(|| self.take().ok()) else {
            return true;
        };
        if rustix::net::bind(&probe, addr).is_ok() {
            return false;
        }
        self.probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(probe);
        true
    }

    /// True when `fd` is a socket in `P`.
    pub(crate) fn is_private(&self, fd: &impl AsFd) -> bool {
        let Some(p) = self.ns.get() else {
            return false;
        };
        // Fast path: one getsockopt, compared with the cookie of `P`
        // (learnt from a socket the slow path found in `P`; a netns cookie
        // is never reused, and `P` never changes once known).
        if let Some(&p_cookie) = self.ns_cookie.get() {
            match ax_sys::netns::netns_cookie(fd.as_fd()) {
                Ok(c) => return c == p_cookie,
                Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {}
                Err(_) => return false,
            }
        }
        // EPERM (a namespace we have no rights over) is not ours either.
        let private = ax_sys::netns::socket_netns(fd.as_fd())
            .and_then(|ns| ns_id(&ns))
            .is_ok_and(|id| id == *p);
        if private && self.ns_cookie.get().is_none() {
            if let Ok(c) = ax_sys::netns::netns_cookie(fd.as_fd()) {
                let _ = self.ns_cookie.set(c);
            }
        }
        private
    }

    /// What classifying a socket found, by socket cookie (`SO_COOKIE`,
    /// never reused while the system runs): the ax name of a socket known to
    /// be in `P`. A UNIX socket's name and namespace never change once bound,
    /// so an entry stays true for the socket's whole life; the map is
    /// emptied when full (a miss only costs the full look).
    pub(crate) fn known_name(&self, cookie: u64) -> Option<crate::names::SocketName> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.get(&cookie).map(|k| k.name)
    }

    /// Records that the socket with `cookie` is in `P` and bound to `name`.
    pub(crate) fn remember_name(&self, cookie: u64, name: crate::names::SocketName) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= KNOWN_MAX {
            known.clear();
        }
        known
            .entry(cookie)
            .and_modify(|k| k.name = name)
            .or_insert(Known {
                name,
                listening: false,
            });
    }

    /// True when the socket with `cookie`, known to be in `P` (see
    /// [`Sockets::known_name`]), was seen listening: a UNIX socket listens
    /// from its `listen` until it closes, so this too stays true for the
    /// socket's whole life.
    pub(crate) fn known_listening(&self, cookie: u64) -> bool {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.get(&cookie).is_some_and(|k| k.listening)
    }

    /// Records that the socket with `cookie` listens, if it is known to be
    /// in `P` (anything else is asked again next time).
    pub(crate) fn remember_listening(&self, cookie: u64) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = known.get_mut(&cookie) {
            k.listening = true;
        }
    }

    /// The factory's pid (a process in `P`, whose `/proc/PID/net` shows
    /// `P`), if one runs.
    pub(crate) fn factory_pid(&self) -> Option<u32> {
        let maker = self.maker.lock().unwrap_or_else(|e| e.into_inner());
        maker.factory.as_ref().map(|f| f.pid)
    }

    /// Every socket open in `P` now, from the socket factory's
    /// `/proc/PID/net/unix` (its length is the broker's own sockets).
    /// `ENOENT` without a factory, `EINVAL` for text that is not such a
    /// table.
    pub(crate) fn unix_table(&self) -> io::Result<Vec<UnixSocketRow>> {
        let pid = self
            .factory_pid()
            .ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix"))?;
        parse_unix_table(&text).ok_or(io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// The inodes of every socket open in `P` now (see
    /// [`Sockets::unix_table`]); `None` when they cannot be read.
    pub(crate) fn live_inodes(&self) -> Option<std::collections::HashSet<u64>> {
        Some(self.unix_table().ok()?.iter().map(|r| r.inode).collect())
    }

    fn start_refill(self: &Arc<Self>) {
        if self.refill_started.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("ax-sockets".into())
            .spawn(move || refill_loop(weak));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the socket pool's refill thread");
        }
    }

    /// Up to `n` sockets from the factory (see [`Sockets::make_sockets`]),
    /// with their cookies and inodes.
    fn make(&self, n: usize) -> io::Result<Vec<Spare>> {
        let made = self.make_sockets(n)?;
        let spares: Vec<Spare> = made.into_iter().filter_map(Spare::read).collect();
        if spares.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        Ok(spares)
    }

    /// Up to `n` sockets from the factory, starting (or restarting) it in
    /// `P` as needed.
    fn make_sockets(&self, n: usize) -> io::Result<Vec<OwnedFd>> {
        let mut maker = self.maker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &maker.factory {
            match request(&f.channel, n) {
                Ok(socks) => return Ok(socks),
                Err(e) => {
                    tracing::warn!(error = %e, "the socket factory failed; starting another");
                    if let Some(f) = maker.factory.take() {
                        ax_sys::netns::reap(f);
                    }
                }
            }
        }
        if let Some((when, errno)) = maker.last_failure {
            if when.elapsed() < RETRY {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        match self.start(&mut maker) {
            Ok(()) => {}
            Err(e) => {
                maker.last_failure = Some((Instant::now(), e.raw_os_error().unwrap_or(libc::EIO)));
                return Err(e);
            }
        }
        let f = maker
            .factory
            .as_ref()
            .ok_or(io::Error::from_raw_os_error(libc::ECHILD))?;
        request(&f.channel, n)
    }

    /// True when a way into an earlier `P` is known (an anchor salvaged
    /// from the predecessor's fd keeper, or one offered), or `P` is open.
    pub(crate) fn has_anchor(&self) -> bool {
        let mut maker = self.maker.lock().unwrap_or_else(|e| e.into_inner());
        if maker.anchor.is_none() {
            maker.anchor = crate::keeper::take_salvaged_anchor(self.instance);
        }
        maker.anchor.is_some() || self.ns.get().is_some()
    }

    /// Offers `sock`, a listener of this instance found in a process of an
    /// app a predecessor served, as the way into `P` when nothing better
    /// is known. `P` is then anchored again under [`anchor_name`].
    fn offer(&self, sock: OwnedFd) -> bool {
        let mut maker = self.maker.lock().unwrap_or_else(|e| e.into_inner());
        if maker.anchor.is_some() || maker.factory.is_some() || self.ns.get().is_some() {
            return false;
        }
        maker.anchor = Some(sock);
        true
    }

    /// Looks for `P` among the sockets of `pids` and their descendants (the
    /// programs of the apps a predecessor served, from its state file): a
    /// listener named for this instance, in a network namespace other
    /// than ours whose owner is ours (root) or a user namespace we own
    /// (rootless). Only when no anchor was salvaged.
    pub(crate) fn find_in_processes(&self, pids: &[u32]) -> bool {
        if self.has_anchor() {
            return false;
        }
        let (Ok(own_net), Ok(own_user)) = (
            std::fs::File::open("/proc/self/ns/net").and_then(|f| ns_id(&f)),
            std::fs::File::open("/proc/self/ns/user").and_then(|f| ns_id(&f)),
        ) else {
            return false;
        };
        let root = rustix::process::geteuid().is_root();
        for pid in process_tree(pids) {
            let Ok(pidfd) = ax_sys::process::pidfd_open(pid, false) else {
                continue;
            };
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for entry in fds.flatten() {
                let is_socket = std::fs::read_link(entry.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
                let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if !is_socket {
                    continue;
                }
                let Ok(sock) = ax_sys::process::pidfd_getfd(pidfd.as_fd(), fd) else {
                    continue;
                };
                let ours = matches!(
                    crate::handlers::own_name(&sock),
                    Some(crate::names::SocketName::Listener { instance, .. }) if instance == self.instance
                );
                if !ours {
                    continue;
                }
                let Ok(netns) = ax_sys::netns::socket_netns(sock.as_fd()) else {
                    continue;
                };
                let owner = ax_sys::netns::namespace_owner(netns.as_fd()).and_then(|o| ns_id(&o));
                let trusted = match (ns_id(&netns), owner) {
                    (Ok(net), Ok(owner)) => net != own_net && (owner == own_user) == root,
                    _ => false,
                };
                if trusted && self.offer(sock) {
                    tracing::info!(
                        pid,
                        fd,
                        "no anchor kept by the previous daemon's fd keeper: entering its private \
                         network namespace through a listener of one of its apps"
                    );
                    return true;
                }
            }
        }
        false
    }

    /// Starts a factory: in `P` when an anchor (ours, or one salvaged from
    /// a predecessor) names it, else in a new namespace that becomes `P`.
    fn start(&self, maker: &mut Maker) -> io::Result<()> {
        if maker.anchor.is_none() {
            maker.anchor = crate::keeper::take_salvaged_anchor(self.instance);
        }
        if let Some(anchor) = &maker.anchor {
            match join(anchor) {
                Ok((factory, id)) => {
                    if self.ns.get().is_some_and(|p| *p != id) {
                        return Err(io::Error::from_raw_os_error(libc::EXDEV));
                    }
                    let _ = self.ns.set(id);
                    tracing::info!(
                        factory = factory.pid,
                        "socket factory started in the private network namespace kept from before"
                    );
                    // Entered through an app's listener: anchor `P` again,
                    // for the next successor.
                    if !crate::keeper::is_anchor(anchor, self.instance) {
                        let fresh = request(&factory.channel, 1).ok().and_then(|mut v| v.pop());
                        if let Some(fresh) = fresh {
                            let named =
                                SocketAddrUnix::new_abstract_name(&anchor_name(self.instance))
                                    .and_then(|a| rustix::net::bind(&fresh, &a));
                            if named.is_ok() {
                                maker.anchor = Some(fresh);
                            }
                        }
                    }
                    maker.factory = Some(factory);
                    return Ok(());
                }
                Err(e) if self.ns.get().is_some() => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, "cannot enter the previous daemon's private network namespace; \
                        making a new one: services taken over from it are unreachable");
                    maker.anchor = None;
                }
            }
        } else if self.ns.get().is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let factory =
            ax_sys::netns::spawn_factory(ax_sys::netns::Namespace::New).map_err(|e| explain(&e))?;
        let made = (|| {
            let mut socks = request(&factory.channel, 1)?;
            let anchor = socks
                .pop()
                .ok_or(io::Error::from_raw_os_error(libc::ENOBUFS))?;
            let name = SocketAddrUnix::new_abstract_name(&anchor_name(self.instance))?;
            rustix::net::bind(&anchor, &name)?;
            let ns = ax_sys::netns::socket_netns(anchor.as_fd())?;
            Ok::<_, io::Error>((anchor, ns_id(&ns)?))
        })();
        match made {
            Ok((anchor, id)) => {
                if self.ns.set(id).is_err() {
                    ax_sys::netns::reap(factory);
                    return Err(io::Error::from_raw_os_error(libc::EXDEV));
                }
                tracing::info!(
                    factory = factory.pid,
                    "socket factory started in a new private network namespace"
                );
                maker.anchor = Some(anchor);
                maker.factory = Some(factory);
                Ok(())
            }
            Err(e) => {
                ax_sys::netns::reap(factory);
                Err(e)
            }
        }
    }
}

/// A factory in the namespace of `anchor`, and that namespace's identity.
fn join(anchor: &OwnedFd) -> io::Result<(ax_sys::netns::Factory, NsId)> {
    let netns = ax_sys::netns::socket_netns(anchor.as_fd())?;
    let owner = ax_sys::netns::namespace_owner(netns.as_fd())?;
    let own_user = std::fs::File::open("/proc/self/ns/user")?;
    let userns = (ns_id(&owner)? != ns_id(&own_user)?).then(|| owner.as_fd());
    let factory = ax_sys::netns::spawn_factory(ax_sys::netns::Namespace::Join {
        userns,
        netns: netns.as_fd(),
    })?;
    Ok((factory, ns_id(&netns)?))
}

/// Says why no private network namespace could be made.
fn explain(e: &io::Error) -> io::Error {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    let mut why = Vec::new();
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0")
        || read("/proc/sys/user/max_net_namespaces").as_deref() == Some("0")
    {
        why.push(
            "namespaces are disabled (user.max_user_namespaces or user.max_net_namespaces is 0)",
        );
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        why.push(
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)",
        );
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        why.push("AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)");
    }
    let why = if why.is_empty() {
        "neither CLONE_NEWNET nor CLONE_NEWUSER|CLONE_NEWNET is allowed".to_string()
    } else {
        why.join("; ")
    };
    io::Error::new(
        e.kind(),
        format!("cannot create a private network namespace for ax's sockets ({e}): {why}"),
    )
}

/// A socket of the private namespace, as its `/proc/net/unix` line shows
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketRow {
    /// It listens (`__SO_ACCEPTCON` in its flags).
    pub listening: bool,
    /// Its inode.
    pub inode: u64,
    /// Its abstract name, without the `@` the table shows it with.
    pub abstract_name: Option<String>,
}

/// The rows of a `/proc/net/unix` table, under its header (`Num RefCount
/// Protocol Flags Type St Inode Path`). `None` for text that is not such a
/// table, or that has a line without an inode: nothing is guessed.
fn parse_unix_table(text: &str) -> Option<Vec<UnixSocketRow>> {
    /// `__SO_ACCEPTCON`, as the table prints a listener's flags.
    const LISTENING: &str = "00010000";
    let mut lines = text.lines();
    if !lines.next()?.starts_with("Num ") {
        return None;
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some(UnixSocketRow {
                listening: *cols.get(3)? == LISTENING,
                inode: cols.get(6)?.parse().ok()?,
                abstract_name: cols
                    .get(7)
                    .and_then(|p| p.strip_prefix('@'))
                    .map(String::from),
            })
        })
        .collect()
}

/// Asks the factory on `channel` for `n` sockets.
fn request(channel: &OwnedFd, n: usize) -> io::Result<Vec<OwnedFd>> {
    let n = n.min(ax_sys::netns::MAX_BATCH);
    let count = u32::try_from(n).unwrap_or(1);
    rustix::net::send(channel, &count.to_ne_bytes(), SendFlags::NOSIGNAL)?;
    let mut head = [0u8; 4];
    let mut space =
        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(ax_sys::netns::MAX_BATCH))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        channel,
        &mut [IoSliceMut::new(&mut head)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut out = Vec::with_capacity(n);
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            out.extend(fds);
        }
    }
    if msg.bytes != 4 {
        return Err(io::Error::from_raw_os_error(libc::EPIPE));
    }
    let answer = i32::from_ne_bytes(head);
    if answer < 0 {
        return Err(io::Error::from_raw_os_error(answer.saturating_neg()));
    }
    if out.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    }
    Ok(out)
}

/// `pids` and their descendants, each once (see `crate::orphans::process_tree`).
fn process_tree(pids: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for &root in pids.iter().filter(|&&p| p != 0) {
        for (pid, _) in crate::orphans::process_tree(root) {
            if !out.contains(&pid) {
                out.push(pid);
            }
        }
    }
    out
}

fn refill_loop(weak: Weak<Sockets>) {
    loop {
        let Some(sockets) = weak.upgrade() else {
            return;
        };
        let need = {
            let spare = sockets.spare.lock().unwrap_or_else(|e| e.into_inner());
            let (mut spare, _) = sockets
                .low
                .wait_timeout_while(spare, TOP_UP, |s| s.len() >= SPARE)
                .unwrap_or_else(|e| e.into_inner());
            // A burst of takes: one request once it pauses, or at once
            // when the pool runs low.
            loop {
                let before = spare.len();
                if !(LOW..SPARE).contains(&before) {
                    break;
                }
                let (after, _) = sockets
                    .low
                    .wait_timeout_while(spare, SETTLE, |s| s.len() >= LOW && s.len() == before)
                    .unwrap_or_else(|e| e.into_inner());
                spare = after;
                if spare.len() == before {
                    break;
                }
            }
            SPARE.saturating_sub(spare.len())
        };
        if need > 0 {
            match sockets.make(need) {
                Ok(batch) => sockets.keep(batch),
                // Back off: the next take asks again.
                Err(_) => std::thread::sleep(RETRY),
            }
        }
        drop(sockets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inode of the network namespace `fd` (a socket) lives in.
    fn netns_of(fd: &OwnedFd) -> NsId {
        ns_id(&ax_sys::netns::socket_netns(fd.as_fd()).unwrap()).unwrap()
    }

    #[test]
    fn a_socket_is_known_listening_only_once_known_and_seen_listening() {
        let sockets = Sockets::new(0x5eed_0003);
        let name = crate::names::SocketName::Listener {
            instance: 0x5eed_0003,
            v6: false,
            app: 1,
            bound: "0.0.0.0:8000".parse().unwrap(),
            reuseport: None,
        };
        // Not known to be in `P`: nothing is remembered of it.
        sockets.remember_listening(1);
        assert!(!sockets.known_listening(1));
        sockets.remember_name(1, name);
        assert!(!sockets.known_listening(1));
        sockets.remember_listening(1);
        assert!(sockets.known_listening(1));
        // Classified again: still listening; another cookie is not.
        sockets.remember_name(1, name);
        assert!(sockets.known_listening(1));
        assert_eq!(sockets.known_name(1), Some(name));
        assert!(!sockets.known_listening(2));
    }

    /// A pool with its private namespace and factory; `None` (the test is
    /// skipped) where no namespace can be made.
    fn opened(instance: u32) -> Option<Arc<Sockets>> {
        let sockets = Sockets::new(instance);
        match sockets.open() {
            Ok(()) => Some(sockets),
            Err(e) => {
                eprintln!("no private namespace here ({e}); skipped");
                None
            }
        }
    }

    #[test]
    fn sockets_come_from_one_private_namespace() {
        let Some(sockets) = opened(0x5eed_0001) else {
            return;
        };
        let a = sockets.take().unwrap();
        let b = sockets.take().unwrap();
        assert!(sockets.is_private(&a) && sockets.is_private(&b));
        assert_eq!(netns_of(&a), netns_of(&b));
        // A socket of this process's own namespace, even one bound to an
        // ax-looking name, is not the broker's.
        let host = rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        let name = format!("ax/{:08x}/c4/10.233.0.9/1/10.233.0.1/80", 0x5eed_0001);
        rustix::net::bind(
            &host,
            &SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(!sockets.is_private(&host));
        // The same name is free in the private namespace: names there are
        // not the host's.
        let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap();
        rustix::net::bind(&a, &addr).unwrap();
        // Many more than one batch, all private.
        let many: Vec<_> = (0..300).map(|_| sockets.take().unwrap()).collect();
        assert!(many.iter().all(|s| sockets.is_private(s)));
        assert!(sockets.factory_pid().is_some());
    }

    #[test]
    fn a_name_is_probed_with_one_kept_socket_and_left_free() {
        let Some(sockets) = opened(0x5eed_0005) else {
            return;
        };
        let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
        let probe_inode = || sockets.probe.lock().unwrap().as_ref().map(inode);
        let name = |s: &str| SocketAddrUnix::new_abstract_name(s.as_bytes()).unwrap();
        let held = sockets.take().unwrap();
        rustix::net::bind(&held, &name("ax/5eed0005/held")).unwrap();
        assert!(sockets.name_taken(&name("ax/5eed0005/held")));
        let first = probe_inode().expect("a probe that did not bind is kept");
        for _ in 0..100 {
            assert!(sockets.name_taken(&name("ax/5eed0005/held")));
        }
        assert_eq!(probe_inode(), Some(first), "each probe took a socket");
        // A free name: the probe binds it, and is closed at once.
        assert!(!sockets.name_taken(&name("ax/5eed0005/free")));
        assert_eq!(probe_inode(), None);
        // Free again once no process holds the probe: another test of this
        // process that forks at this moment holds a copy until its child
        // execs.
        let other = sockets.take().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = rustix::net::bind(&other, &name("ax/5eed0005/free")) {
            assert!(
                e == rustix::io::Errno::ADDRINUSE && std::time::Instant::now() < deadline,
                "the name is not free again: {e}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The next probe takes another socket, and keeps it.
        assert!(sockets.name_taken(&name("ax/5eed0005/free")));
        assert!(probe_inode().is_some_and(|i| i != first));
    }

    #[test]
    fn the_open_sockets_of_the_namespace_are_listed_by_inode() {
        let Some(sockets) = opened(0x5eed_0004) else {
            return;
        };
        let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
        let kept = sockets.take().unwrap();
        let closed = sockets.take().unwrap();
        let closed_inode = inode(&closed);
        let open = sockets.live_inodes().expect("the namespace's socket table");
        assert!(open.contains(&inode(&kept)) && open.contains(&closed_inode));
        drop(closed);
        // Gone once no process holds it: another test of this process that
        // forks at this moment holds a copy until its child execs.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let open = sockets.live_inodes().unwrap();
            assert!(open.contains(&inode(&kept)), "an open socket is not listed");
            if !open.contains(&closed_inode) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a closed socket is still listed after 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // A socket of this process's own namespace is not in the list.
        let (host, _) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(!sockets.live_inodes().unwrap().contains(&inode(&host)));
    }

    #[test]
    fn unix_tables_parse_to_rows() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 381629 @ax/5eed0004/p\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 17\n";
        let rows = parse_unix_table(text).unwrap();
        assert_eq!(
            rows,
            [
                UnixSocketRow {
                    listening: true,
                    inode: 381_629,
                    abstract_name: Some("ax/5eed0004/p".into()),
                },
                UnixSocketRow {
                    listening: false,
                    inode: 17,
                    abstract_name: None,
                },
            ]
        );
        assert_eq!(parse_unix_table("Num RefCount\n"), Some(Vec::new()));
        // Not a table, or a line without an inode: nothing is guessed.
        assert_eq!(parse_unix_table("garbage\n1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_unix_table("Num x\n0: 1 2 3 4 5\n"), None);
        assert_eq!(parse_unix_table(""), None);
    }

    #[test]
    fn a_killed_factory_is_replaced_in_the_same_namespace() {
        let Some(sockets) = opened(0x5eed_0002) else {
            return;
        };
        let before = netns_of(&sockets.take().unwrap());
        let pid = sockets.factory_pid().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        // More than the pool holds: the factory is asked again.
        for _ in 0..(3 * SPARE) {
            let s = sockets.take().unwrap();
            assert_eq!(netns_of(&s), before);
        }
        assert_ne!(sockets.factory_pid(), Some(pid));
    }
}
