//! Who the two ends of a swapped connection stand for, kept by the broker
//! rather than in names bound on the client's socket.
//!
//! A client socket the broker connects stays unbound: the kernel copies a
//! stream sender's bound name into every `recvfrom`/`recvmsg` address of
//! its peer, and TCP reports none there (length 0). So the identity of a
//! connection (the client's VIP:port and the VIP:port it dialled) travels
//! another way:
//!
//! * **In-band, once.** Right after connecting the client socket, and
//!   before the program holds it, the broker writes a fixed [`HELLO_LEN`]
//!   byte hello (magic, this daemon's secret, the addresses) into it. The
//!   server's trapped `accept` reads exactly that from the accepted socket
//!   before installing it. Only the broker reaches listeners in its private
//!   namespace, and the secret is never in any program's hands, so a hello
//!   cannot be forged; anything else is dropped (`ECONNABORTED`). A
//!   connection waiting in a backlog keeps its hello in the kernel's socket
//!   buffer across daemon restarts.
//! * **A table** from socket cookie (`SO_COOKIE`: assigned by the kernel,
//!   never reused while the machine runs, not settable by anyone) to the
//!   identity: the client socket's own, and the client an accepted socket
//!   is connected to. `getsockname`/`getpeername` read it. The identities
//!   are records in a file beside the daemon's socket (one 64-byte slot
//!   each, written once; in memory only the slot, so that a busy server's
//!   table stays small), which a successor daemon reads back: answers
//!   survive restarts. The table also finds an entry by its socket's inode
//!   (see [`Idents::by_inode`]), which a program's fd tells without the
//!   broker copying the fd. The file belongs to one boot and one daemon
//!   instance; any other content is discarded. Without a path (an
//!   embedder), a memfd holds the records.
//!
//! Entries of closed sockets are swept by a thread of the table's own, at
//! most once a [`SWEEP_EVERY`] and only after [`SWEEP_AFTER`] new entries
//! (or when the table is nearly full): an entry goes once two sweeps in a
//! row found its socket closed, by the list of open sockets of the
//! broker's private namespace (see [`Idents::sweep`]), which holds a socket
//! in flight between processes too. The table is
//! bounded ([`LIMIT`]): one still full refuses the connection (`ENOBUFS`),
//! never making up an address.

use crate::names::SocketName;
use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of the hello a client socket carries ahead of the program's data.
pub(crate) const HELLO_LEN: usize = 72;
/// Entries the table holds at most (two per connection).
pub(crate) const LIMIT: usize = 131_072;
/// Least time between two sweeps.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// New entries that make a sweep due.
pub(crate) const SWEEP_AFTER: usize = 64;
/// Longest time between two sweeps of a table with entries, however few
/// are new: an entry found by its inode ([`Idents::by_inode`]) must go long
/// before sockfs could give its number to another socket (the kernel's
/// inode counter is shared by all pseudo files and wraps after 2^32).
const SWEEP_AT_LEAST_EVERY: Duration = Duration::from_secs(30);
/// Entries the table has room for from the start (and keeps room for).
const RESERVED: usize = 32_768;
/// New entries that make a sweep due at once, without waiting for the
/// next [`SWEEP_EVERY`]: a busy server's table stays small.
const SWEEP_NOW: usize = 16_384;

const HELLO_MAGIC: &[u8; 8] = b"axhello1";
const FILE_MAGIC: &[u8; 8] = b"axident1";
/// Records whose copies are kept in memory ([`Inner::recent_record`]).
const RECENT: usize = 1024;
/// Bytes per record in the file; record 0 is the file's header.
const RECORD: u64 = 64;

/// Which end an entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The socket is the client: `name` is its own identity.
    Own = 1,
    /// The socket was accepted: `name` is the client at its other end.
    Peer = 2,
}

/// What is kept in memory per socket: where its record is, and what the
/// sweeps need (the identity itself is read from the record, so that a
/// busy server's table stays small).
struct Entry {
    slot: u32,
    /// The sweep that first missed its socket (0: none).
    missed: u32,
    /// The sweep that was running when it was made.
    born: u32,
    /// Its inode (sockfs numbers its inodes with 32 bits).
    inode: u32,
    /// Its [`pair_key`] (0: not a client socket of the broker's).
    pair: u32,
    /// Whether `pair` is counted in [`Inner::pairs`]: from the first
    /// sweep that found the socket live.
    counted: bool,
    /// Read back from a predecessor's file: its socket may live in a
    /// private namespace other than this broker's (see [`Idents::sweep`]).
    inherited: bool,
}

/// Hashes a key the kernel assigned (a socket cookie or inode): numbers
/// nobody chooses, counted up, which one multiplication spreads over the
/// table (SipHash, the default, guards against keys an attacker picks and
/// costs several times as much on a path every connection takes).
#[derive(Default, Clone, Copy)]
struct KernelNumberHasher(u64);

impl std::hash::Hasher for KernelNumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits, which hashbrown uses for its
        // control bytes, depend on every bit of the key.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type KernelNumbers = std::hash::BuildHasherDefault<KernelNumberHasher>;

struct Inner {
    map: HashMap<u64, Entry, KernelNumbers>,
    /// Cookie by (32-bit) inode.
    by_inode: HashMap<u32, u64, KernelNumbers>,
    /// Client sockets a sweep found live, by [`pair_key`] (how many share
    /// the key). A socket counts only once a sweep saw it: entries of
    /// closed connections linger until two sweeps miss them, and a busy
    /// client would otherwise find every port taken by the dead.
    pairs: HashMap<u32, u32>,
    free: Vec<u32>,
    next_slot: u32,
    /// Entries made since the last sweep.
    fresh: usize,
    /// Sweeps begun so far.
    sweeps: u32,
    /// Entries the last sweep missed once.
    missed: usize,
    /// When the last sweep began.
    last_sweep: Instant,
    /// Copies of the records written last, by slot modulo their number: a
    /// connection's calls come soon after it is made, and find its record
    /// here rather than in the file.
    recent: Box<[[u8; RECORD as usize]]>,
}

impl Inner {
    /// The record of `cookie` in `slot`, if a copy of it is at hand.
    fn recent_record(&self, slot: u32, cookie: u64) -> Option<[u8; RECORD as usize]> {
        let r = self.recent.get(slot as usize % RECENT)?;
        (cookie != 0 && r[..8] == cookie.to_le_bytes()).then_some(*r)
    }

    fn keep_recent(&mut self, slot: u32, record: &[u8; RECORD as usize]) {
        if let Some(r) = self.recent.get_mut(slot as usize % RECENT) {
            *r = *record;
        }
    }

    /// Enters the socket with `cookie` and `inode` (every index).
    fn add(&mut self, cookie: u64, inode: u64, slot: u32, born: u32, pair: u32, inherited: bool) {
        let inode = short_inode(inode);
        self.by_inode.insert(inode, cookie);
        let old = self.map.insert(
            cookie,
            Entry {
                slot,
                missed: 0,
                born,
                inode,
                pair,
                counted: false,
                inherited,
            },
        );
        match old {
            Some(old) => self.release_pair(&old),
            None => crate::metrics::identities_kept(1),
        }
    }

    /// Takes the socket with `cookie` out of every index; its slot.
    fn remove(&mut self, cookie: u64) -> Option<u32> {
        let e = self.map.remove(&cookie)?;
        crate::metrics::identities_kept(-1);
        if self.by_inode.get(&e.inode) == Some(&cookie) {
            self.by_inode.remove(&e.inode);
        }
        self.release_pair(&e);
        Some(e.slot)
    }

    fn release_pair(&mut self, e: &Entry) {
        if !e.counted {
            return;
        }
        if let Some(n) = self.pairs.get_mut(&e.pair) {
            *n -= 1;
            if *n == 0 {
                self.pairs.remove(&e.pair);
            }
        }
    }
}

/// The broker's table of connection identities (see the module docs).
pub(crate) struct Idents {
    secret: [u8; 16],
    /// See [`Idents::watch`].
    live: std::sync::OnceLock<LiveSockets>,
    /// Wakes the sweeper early (see [`SWEEP_NOW`]).
    wake: std::sync::Condvar,
    /// The records: the file beside the daemon's socket, or a memfd (none:
    /// nothing can be kept, and connections are refused).
    file: Option<File>,
    inner: Mutex<Inner>,
}

/// The inodes of the sockets open in the broker's private namespace, or
/// `None` when they cannot be read (see [`Idents::watch`]).
pub(crate) type LiveSockets = Box<dyn Fn() -> Option<std::collections::HashSet<u64>> + Send + Sync>;

impl std::fmt::Debug for Idents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idents").finish_non_exhaustive()
    }
}

impl Drop for Idents {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        crate::metrics::identities_kept(-i64::try_from(inner.map.len()).unwrap_or(0));
    }
}

/// An entry found by [`Idents::by_inode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ident {
    pub(crate) cookie: u64,
    pub(crate) kind: Kind,
    /// The client's identity (its VIP:port and the VIP:port it dialled).
    pub(crate) name: SocketName,
    /// For an accepted socket: whether it is `AF_INET6`, when known.
    pub(crate) local_v6: Option<bool>,
}

/// The table is full even after a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl Idents {
    /// A table for the daemon `instance`, kept in the file at `path` (read
    /// back if a predecessor of this boot left one), or in memory only.
    pub(crate) fn open(instance: u32, path: Option<&Path>) -> std::sync::Arc<Self> {
        let mut inner = Inner {
            map: HashMap::with_capacity_and_hasher(RESERVED, KernelNumbers::default()),
            by_inode: HashMap::with_capacity_and_hasher(RESERVED, KernelNumbers::default()),
            pairs: HashMap::new(),
            free: Vec::with_capacity(RESERVED),
            next_slot: 0,
            fresh: 0,
            sweeps: 0,
            missed: 0,
            last_sweep: Instant::now(),
            recent: vec![[0u8; RECORD as usize]; RECENT].into_boxed_slice(),
        };
        let boot = boot_id();
        let file = path.and_then(|p| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p)
                .map_err(|e| {
                    tracing::warn!(path = %p.display(), error = %e,
                        "cannot keep connection identities for a successor daemon");
                })
                .ok()
        });
        let kept = file.is_some();
        let mut secret = None;
        if let Some(f) = &file {
            let mut head = [0u8; RECORD as usize];
            let ok = f.read_exact_at(&mut head, 0).is_ok()
                && &head[..8] == FILE_MAGIC
                && head[8..24] == boot
                && head[24..28] == instance.to_le_bytes();
            if ok {
                let mut s = [0u8; 16];
                s.copy_from_slice(&head[28..44]);
                secret = Some(s);
                load(f, &mut inner);
            }
        }
        let secret = secret.unwrap_or_else(|| {
            let mut s = [0u8; 16];
            fill_random(&mut s);
            if let Some(f) = file.as_ref().filter(|_| kept) {
                let mut head = [0u8; RECORD as usize];
                head[..8].copy_from_slice(FILE_MAGIC);
                head[8..24].copy_from_slice(&boot);
                head[24..28].copy_from_slice(&instance.to_le_bytes());
                head[28..44].copy_from_slice(&s);
                let written = f.set_len(0).and_then(|()| f.write_all_at(&head, 0));
                if let Err(e) = written {
                    tracing::warn!(error = %e, "cannot keep connection identities for a successor daemon");
                }
            }
            s
        });
        let file = file.or_else(|| {
            rustix::fs::memfd_create("ax-idents", rustix::fs::MemfdFlags::CLOEXEC)
                .ok()
                .map(File::from)
        });
        let kept_entries = inner.map.len();
        let idents = std::sync::Arc::new(Idents {
            secret,
            live: std::sync::OnceLock::new(),
            wake: std::sync::Condvar::new(),
            file,
            inner: Mutex::new(inner),
        });
        let weak = std::sync::Arc::downgrade(&idents);
        // Entries read back from a predecessor are swept at once: most name
        // connections closed long ago (a record stays in the file until its
        // slot is reused), and an entry goes only at its second miss, a
        // sweep period later. A daemon restarted every few seconds under
        // load would otherwise pile up its predecessors' dead entries until
        // the table was full and refused connections.
        let mut inherited = kept_entries > 0;
        let spawned = std::thread::Builder::new()
            .name("ax-idents".into())
            .spawn(move || loop {
                let Some(idents) = weak.upgrade() else { return };
                let at_once = std::mem::take(&mut inherited);
                if !at_once {
                    let inner = idents.inner.lock().unwrap_or_else(|e| e.into_inner());
                    // Sleeps holding a strong reference for one period at
                    // most: the table goes a period after its broker.
                    let _ = idents
                        .wake
                        .wait_timeout_while(inner, SWEEP_EVERY, |i| i.fresh < SWEEP_NOW);
                }
                if at_once || idents.sweep_due() {
                    idents.sweep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to sweep connection identities; swept when full");
        }
        idents
    }

    /// The identity kept for the socket with `cookie`.
    pub(crate) fn get(&self, cookie: u64) -> Option<(Kind, SocketName)> {
        let (slot, recent) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let slot = inner.map.get(&cookie)?.slot;
            (slot, inner.recent_record(slot, cookie))
        };
        self.record(slot, cookie, recent).map(|r| (r.kind, r.name))
    }

    /// The record in `slot` (`recent`, or read from the file), if it is
    /// still the one of `cookie` (a slot is reused once its socket is gone).
    fn record(
        &self,
        slot: u32,
        cookie: u64,
        recent: Option<[u8; RECORD as usize]>,
    ) -> Option<Ident> {
        let r = match recent {
            Some(r) => r,
            None => {
                let mut r = [0u8; RECORD as usize];
                self.file
                    .as_ref()?
                    .read_exact_at(&mut r, (u64::from(slot) + 1) * RECORD)
                    .ok()?;
                r
            }
        };
        match decode_record(&r)? {
            (c, _, kind, name, local_v6) if c == cookie => Some(Ident {
                cookie,
                kind,
                name,
                local_v6,
            }),
            _ => None,
        }
    }

    /// The entry of the live socket with `inode`, if the broker keeps one.
    /// An inode is unique among live sockets, and an entry goes within two
    /// sweeps of its socket's end (long before sockfs could number another
    /// socket the same), so the inode of an fd on sockfs's mount names the
    /// socket as surely as its cookie.
    pub(crate) fn by_inode(&self, inode: u64) -> Option<Ident> {
        let short = u32::try_from(inode).ok()?;
        let (cookie, slot, recent) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let cookie = *inner.by_inode.get(&short)?;
            let slot = inner.map.get(&cookie)?.slot;
            (cookie, slot, inner.recent_record(slot, cookie))
        };
        self.record(slot, cookie, recent)
    }

    /// Keeps `name` for the socket with `cookie` and `inode` (for an
    /// accepted one, `local_v6` is its own family).
    pub(crate) fn insert(
        &self,
        cookie: u64,
        inode: u64,
        kind: Kind,
        name: SocketName,
        local_v6: Option<bool>,
    ) -> Result<(), Full> {
        // Full: the sweeper thread makes room within a second or two.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match inner.map.get(&cookie) {
            Some(e) => e.slot,
            None => {
                if inner.map.len() >= LIMIT {
                    return Err(Full);
                }
                match inner.free.pop() {
                    Some(s) => s,
                    None => {
                        let s = inner.next_slot;
                        inner.next_slot += 1;
                        s
                    }
                }
            }
        };
        let record = encode_record(cookie, inode, kind, &name, local_v6);
        self.write_slot(slot, &record).map_err(|()| Full)?;
        inner.keep_recent(slot, &record);
        let born = inner.sweeps;
        inner.fresh += 1;
        if inner.fresh == SWEEP_NOW {
            self.wake.notify_one();
        }
        inner.add(cookie, inode, slot, born, pair_key(kind, &name), false);
        Ok(())
    }

    /// True when a client socket of the broker's that a sweep found live
    /// has `name`'s address and peer (or, rarely, one whose [`pair_key`] is
    /// the same): a new client takes another port, as the kernel never
    /// gives two connections one address pair. A connection younger than
    /// the last sweep (a second or two) is not seen: only a daemon making
    /// more connections than there are client ports in that time could
    /// give its pair again.
    pub(crate) fn client_taken(&self, name: &SocketName) -> bool {
        let key = pair_key(Kind::Own, name);
        key != 0
            && self
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pairs
                .contains_key(&key)
    }

    fn write_slot(&self, slot: u32, record: &[u8; RECORD as usize]) -> Result<(), ()> {
        let at = (u64::from(slot) + 1) * RECORD;
        let Some(file) = &self.file else {
            return Err(());
        };
        file.write_all_at(record, at).map_err(|e| {
            tracing::warn!(error = %e, "cannot keep a connection's identity");
        })
    }

    fn sweep_due(&self) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.fresh >= SWEEP_AFTER
            || inner.missed > 0
            || inner.map.len() >= LIMIT / 4 * 3
            || (!inner.map.is_empty() && inner.last_sweep.elapsed() >= SWEEP_AT_LEAST_EVERY)
    }

    /// Tells the table where to find the sockets that are still open: the
    /// inodes of every socket alive in the broker's private namespace
    /// (`None` when they cannot be read). Without it, or when it answers
    /// `None`, a sweep reads every process's fd table instead.
    pub(crate) fn watch(&self, live: LiveSockets) {
        let _ = self.live.set(live);
    }

    /// Forgets the entries of sockets that two sweeps in a row found
    /// closed. Every socket the table names is one of the broker's, made in
    /// its private namespace, so the namespace's own list of sockets (see
    /// [`Idents::watch`]) tells which are open, whoever holds them: its
    /// length is the broker's sockets, not every fd on the machine. An
    /// entry read back from a predecessor's file and missing from that
    /// list may be a socket of the predecessor's namespace (one the broker
    /// could not take over): those are looked for in every process's fd
    /// table, as are all entries when the list cannot be read. Nothing is
    /// read with the lock held.
    fn sweep(&self) {
        let (sweep, inherited) = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.sweeps = inner.sweeps.wrapping_add(1).max(1);
            inner.fresh = 0;
            inner.last_sweep = Instant::now();
            let inherited: Vec<u32> = inner
                .map
                .values()
                .filter(|e| e.inherited)
                .map(|e| e.inode)
                .collect();
            (inner.sweeps, inherited)
        };
        crate::metrics::identity_sweep();
        let in_namespace = self.live.get().and_then(|live| live());
        let everywhere = match &in_namespace {
            Some(open) if inherited.iter().all(|&i| open.contains(&u64::from(i))) => None,
            _ => Some(crate::orphans::live_socket_inodes()),
        };
        let is_open = |e: &Entry| {
            let inode = u64::from(e.inode);
            match (&in_namespace, &everywhere) {
                (Some(open), _) if open.contains(&inode) => true,
                (Some(_), Some(held)) => e.inherited && held.contains(&inode),
                (None, Some(held)) => held.contains(&inode),
                (_, None) => false,
            }
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        let mut missed = 0;
        let Inner { map, pairs, .. } = &mut *inner;
        for (cookie, e) in map.iter_mut() {
            // Made while the lists were read: not judged yet.
            if e.born >= sweep {
                e.missed = 0;
            } else if is_open(e) {
                e.missed = 0;
                if e.pair != 0 && !e.counted {
                    e.counted = true;
                    *pairs.entry(e.pair).or_default() += 1;
                }
            } else if e.missed != 0 && e.missed < sweep {
                gone.push(*cookie);
            } else {
                e.missed = sweep;
                missed += 1;
            }
        }
        for cookie in gone {
            // Its record stays until the slot is reused: a successor that
            // reads it back sweeps it again (cookies are never reused).
            if let Some(slot) = inner.remove(cookie) {
                inner.free.push(slot);
            }
        }
        inner.missed = missed;
        // Given back only after a burst far above the usual size: a table
        // that shrinks and grows again at every sweep scatters its memory.
        if inner.map.capacity() > 8 * inner.map.len().max(RESERVED) {
            let to = 2 * inner.map.len().max(RESERVED);
            inner.map.shrink_to(to);
            inner.by_inode.shrink_to(to);
            inner.pairs.shrink_to(to);
        }
        let slots = inner.next_slot as usize;
        if inner.free.len() == slots && slots > RESERVED {
            // Empty after a burst: the file and the free list start over.
            inner.free = Vec::with_capacity(RESERVED);
            inner.next_slot = 0;
            if let Some(f) = &self.file {
                let _ = f.set_len(RECORD);
            }
        }
    }

    /// The hello a client socket named `name` carries to the listener.
    pub(crate) fn hello(&self, name: &SocketName) -> [u8; HELLO_LEN] {
        let mut h = [0u8; HELLO_LEN];
        h[..8].copy_from_slice(HELLO_MAGIC);
        h[8..24].copy_from_slice(&self.secret);
        if let SocketName::Client {
            instance,
            v6,
            local,
            peer,
        } = *name
        {
            h[24..28].copy_from_slice(&instance.to_le_bytes());
            h[28] = u8::from(v6);
            put_addr(&mut h[29..48], local);
            put_addr(&mut h[48..67], peer);
        }
        h
    }

    /// The client a hello read from an accepted socket names; `None` for
    /// anything this daemon's broker did not write.
    pub(crate) fn read_hello(&self, h: &[u8; HELLO_LEN]) -> Option<SocketName> {
        if &h[..8] != HELLO_MAGIC {
            return None;
        }
        // No early exit on the first differing byte.
        let diff = h[8..24]
            .iter()
            .zip(&self.secret)
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return None;
        }
        let instance = u32::from_le_bytes(h[24..28].try_into().ok()?);
        let v6 = match h[28] {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some(SocketName::Client {
            instance,
            v6,
            local: get_addr(&h[29..48])?,
            peer: get_addr(&h[48..67])?,
        })
    }
}

/// An address in 19 bytes: family (4 or 6), port, 16 address bytes (an
/// IPv4 address v4-mapped).
fn put_addr(out: &mut [u8], a: SocketAddr) {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    if let Some(out) = out.get_mut(..19) {
        out[0] = if a.is_ipv4() { 4 } else { 6 };
        out[1..3].copy_from_slice(&a.port().to_le_bytes());
        out[3..19].copy_from_slice(&ip);
    }
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let b = b.get(..19)?;
    let port = u16::from_le_bytes([b[1], b[2]]);
    let ip: [u8; 16] = b[3..19].try_into().ok()?;
    let v6 = Ipv6Addr::from(ip);
    match b[0] {
        4 => Some(SocketAddr::new(IpAddr::V4(v6.to_ipv4_mapped()?), port)),
        6 => Some(SocketAddr::new(IpAddr::V6(v6), port)),
        _ => None,
    }
}

fn encode_record(
    cookie: u64,
    inode: u64,
    kind: Kind,
    name: &SocketName,
    local_v6: Option<bool>,
) -> [u8; RECORD as usize] {
    let mut r = [0u8; RECORD as usize];
    if let SocketName::Client {
        instance,
        v6,
        local,
        peer,
    } = *name
    {
        r[..8].copy_from_slice(&cookie.to_le_bytes());
        r[8..16].copy_from_slice(&inode.to_le_bytes());
        r[16] = kind as u8;
        r[17] = u8::from(v6);
        r[18..22].copy_from_slice(&instance.to_le_bytes());
        put_addr(&mut r[22..41], local);
        put_addr(&mut r[41..60], peer);
        r[60] = match local_v6 {
            None => 0,
            Some(false) => 4,
            Some(true) => 6,
        };
    }
    r
}

/// A record: cookie, inode, kind, identity, and (accepted sockets) family.
type Record = (u64, u64, Kind, SocketName, Option<bool>);

fn decode_record(r: &[u8]) -> Option<Record> {
    let cookie = u64::from_le_bytes(r.get(..8)?.try_into().ok()?);
    if cookie == 0 {
        return None;
    }
    let inode = u64::from_le_bytes(r.get(8..16)?.try_into().ok()?);
    let kind = match r.get(16)? {
        1 => Kind::Own,
        2 => Kind::Peer,
        _ => return None,
    };
    let v6 = match r.get(17)? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let instance = u32::from_le_bytes(r.get(18..22)?.try_into().ok()?);
    let name = SocketName::Client {
        instance,
        v6,
        local: get_addr(r.get(22..41)?)?,
        peer: get_addr(r.get(41..60)?)?,
    };
    let local_v6 = match r.get(60)? {
        4 => Some(false),
        6 => Some(true),
        _ => None,
    };
    Some((cookie, inode, kind, name, local_v6))
}

/// A client socket's own address and peer as a nonzero 32-bit key; 0 for
/// any other entry.
fn pair_key(kind: Kind, name: &SocketName) -> u32 {
    use std::hash::{Hash, Hasher};
    match (kind, name) {
        (Kind::Own, SocketName::Client { local, peer, .. }) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (local, peer).hash(&mut h);
            (h.finish() as u32).max(1)
        }
        _ => 0,
    }
}

/// Reads a predecessor's records; their slots are kept, the others freed.
fn load(f: &File, inner: &mut Inner) {
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    let slots = (len / RECORD).saturating_sub(1).min(LIMIT as u64 * 2);
    let mut buf = vec![0u8; (slots * RECORD) as usize];
    if f.read_exact_at(&mut buf, RECORD).is_err() {
        return;
    }
    for (i, r) in buf.chunks_exact(RECORD as usize).enumerate() {
        let Ok(slot) = u32::try_from(i) else { break };
        match decode_record(r) {
            Some((cookie, inode, kind, name, _)) if inner.map.len() < LIMIT => {
                inner.add(cookie, inode, slot, 0, pair_key(kind, &name), true);
            }
            _ => inner.free.push(slot),
        }
    }
    inner.next_slot = u32::try_from(slots).unwrap_or(u32::MAX);
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`) as 16 bytes.
fn boot_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: Vec<u8> = text
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect();
    let n = hex.len().min(16);
    out[..n].copy_from_slice(&hex[..n]);
    out
}

fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => {
                // Without the kernel's randomness, a secret nobody can
                // guess in advance still: time and addresses.
                let seed = format!("{:?}{:p}", Instant::now(), buf.as_ptr());
                for (i, b) in seed.bytes().enumerate() {
                    buf[i % 16] ^= b;
                }
                return;
            }
        }
    }
}

/// A socket's inode in the 32 bits sockfs gives it (anything wider is
/// never seen live, and its entry is swept).
fn short_inode(inode: u64) -> u32 {
    u32::try_from(inode).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(local: &str, peer: &str) -> SocketName {
        SocketName::Client {
            instance: 7,
            v6: true,
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
        }
    }

    #[test]
    fn hello_round_trips_and_needs_the_secret() {
        let ids = Idents::open(7, None);
        for n in [
            client("10.233.0.4:40000", "10.233.0.9:80"),
            client("[fd00:a8::4]:40000", "[fd00:a8::ffff:ffff]:65535"),
        ] {
            let h = ids.hello(&n);
            assert_eq!(ids.read_hello(&h), Some(n));
            let other = Idents::open(7, None);
            assert_eq!(other.read_hello(&h), None);
            let mut bad = h;
            bad[0] ^= 1;
            assert_eq!(ids.read_hello(&bad), None);
        }
        assert_eq!(ids.read_hello(&[0u8; HELLO_LEN]), None);
    }

    #[test]
    fn a_client_address_pair_is_taken_while_its_socket_lives() {
        let ids = Idents::open(7, None);
        let n = client("10.233.0.4:40000", "10.233.0.9:80");
        let live = std::os::unix::net::UnixStream::pair().unwrap();
        let live_inode = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/self/fd/{}", {
                use std::os::fd::AsRawFd;
                live.0.as_raw_fd()
            }))
            .unwrap()
            .ino()
        };
        assert!(!ids.client_taken(&n));
        ids.insert(1, live_inode, Kind::Own, n, None).unwrap();
        // Not before a sweep found it live (a closed connection lingers
        // until two sweeps miss it, and must not hold its port).
        assert!(!ids.client_taken(&n));
        ids.sweep();
        assert!(ids.client_taken(&n));
        // Another port, or another destination, is free; an accepted
        // socket's entry names its peer and takes nothing.
        assert!(!ids.client_taken(&client("10.233.0.4:40001", "10.233.0.9:80")));
        assert!(!ids.client_taken(&client("10.233.0.4:40000", "10.233.0.9:81")));
        let m = client("10.233.0.5:40000", "10.233.0.9:80");
        ids.insert(2, live_inode, Kind::Peer, m, Some(false))
            .unwrap();
        ids.sweep();
        assert!(!ids.client_taken(&m));
        // A socket no process holds (sockfs inodes are small numbers) is
        // never counted.
        let dead = client("10.233.0.4:40002", "10.233.0.9:80");
        ids.insert(3, u64::MAX - 3, Kind::Own, dead, None).unwrap();
        ids.sweep();
        assert!(!ids.client_taken(&dead));
        // Gone once its socket is: free again after two sweeps miss it.
        drop(live);
        ids.sweep();
        assert!(ids.client_taken(&n), "gone after one miss");
        ids.sweep();
        assert!(!ids.client_taken(&n));
    }

    #[test]
    fn a_successor_sweeps_its_predecessors_dead_entries_at_once() {
        let path = std::env::temp_dir().join(format!("ax-idents-sweep-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let n = client("10.233.0.4:40000", "10.233.0.9:80");
        {
            let ids = Idents::open(9, Some(&path));
            // Inodes no socket has: connections closed since.
            ids.insert(21, u64::MAX - 3, Kind::Own, n, None).unwrap();
            ids.insert(22, u64::MAX - 4, Kind::Peer, n, Some(false))
                .unwrap();
        }
        let again = Idents::open(9, Some(&path));
        // Two sweeps a period apart, the first at once: before, a quiet
        // table waited 30 s for its first sweep, and a daemon restarted
        // every few seconds never swept what it inherited.
        let deadline = Instant::now() + SWEEP_EVERY * 5;
        while again.get(21).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(again.get(21), None);
        assert_eq!(again.get(22), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn sweeps_sockets_nobody_holds_after_two_misses() {
        let ids = Idents::open(7, None);
        let n = client("10.233.0.4:40000", "10.233.0.9:80");
        let live = std::os::unix::net::UnixStream::pair().unwrap();
        let live_inode = std::fs::metadata(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            live.0.as_raw_fd()
        }))
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })
        .unwrap();
        // An inode no socket has (sockfs inodes are small numbers).
        ids.insert(1, u64::MAX - 1, Kind::Own, n, None).unwrap();
        ids.insert(2, live_inode, Kind::Peer, n, Some(true))
            .unwrap();
        ids.sweep();
        assert!(ids.get(1).is_some(), "gone after one miss");
        ids.sweep();
        assert_eq!(ids.get(1), None);
        assert_eq!(ids.get(2), Some((Kind::Peer, n)));
        assert_eq!(
            ids.by_inode(live_inode),
            Some(Ident {
                cookie: 2,
                kind: Kind::Peer,
                name: n,
                local_v6: Some(true)
            })
        );
        drop(live);
    }

    #[test]
    fn sweeps_go_by_the_namespace_list_and_fd_tables_only_for_inherited_entries() {
        let inode_of = |s: &std::os::unix::net::UnixStream| rustix::fs::fstat(s).unwrap().st_ino;
        let (held, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let held_inode = inode_of(&held);
        // An inode no socket of this process has (sockfs numbers are small).
        let listed = u64::from(u32::MAX - 5);
        let n = client("10.233.0.4:40000", "10.233.0.9:80");
        let dir = std::env::temp_dir().join(format!("ax-idents-watch-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        {
            let ids = Idents::open(9, Some(&dir));
            ids.insert(21, held_inode, Kind::Own, n, None).unwrap();
        }
        let ids = Idents::open(9, Some(&dir));
        let _ = std::fs::remove_file(&dir);
        ids.watch(Box::new(move || Some([listed].into_iter().collect())));
        // Made by this broker: the namespace's list alone decides, even for
        // a socket some process holds (as no socket of the broker's is held
        // outside the list).
        ids.insert(22, listed, Kind::Own, n, None).unwrap();
        ids.insert(23, held_inode + 1, Kind::Own, n, None).unwrap();
        ids.sweep();
        ids.sweep();
        assert!(ids.get(22).is_some(), "a listed socket was forgotten");
        assert_eq!(ids.get(23), None, "an unlisted socket was kept");
        // Read back from a predecessor and not in the list (a namespace of
        // its own): kept while a process holds it.
        assert_eq!(ids.get(21), Some((Kind::Own, n)));
        drop(held);
        drop(_peer);
        ids.sweep();
        ids.sweep();
        assert_eq!(
            ids.get(21),
            None,
            "an inherited socket nobody holds was kept"
        );
        assert!(ids.get(22).is_some());
    }

    #[test]
    fn survives_in_its_file() {
        let dir = std::env::temp_dir().join(format!("ax-idents-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let n = client("10.233.0.4:40000", "[fd00:a8::9]:80");
        let h = {
            let ids = Idents::open(7, Some(&dir));
            ids.insert(11, 12, Kind::Peer, n, Some(false)).unwrap();
            ids.insert(13, 14, Kind::Own, n, None).unwrap();
            ids.hello(&n)
        };
        let again = Idents::open(7, Some(&dir));
        assert_eq!(again.get(11), Some((Kind::Peer, n)));
        assert_eq!(again.get(13), Some((Kind::Own, n)));
        assert_eq!(again.by_inode(12).map(|i| i.local_v6), Some(Some(false)));
        assert_eq!(again.read_hello(&h), Some(n));
        // Another daemon instance starts afresh.
        let other = Idents::open(8, Some(&dir));
        assert_eq!(other.get(11), None);
        assert_eq!(other.read_hello(&h), None);
        let _ = std::fs::remove_file(&dir);
    }
}
