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
//!   is connected to. `getsockname`/`getpeername` read it. Each entry is
//!   also written to a file beside the daemon's socket (slot by slot, no
//!   rewrite), which a successor daemon reads back: answers survive
//!   restarts. The file belongs to one boot and one daemon instance; any
//!   other content is discarded.
//!
//! The table is bounded ([`LIMIT`]); when full, entries of sockets no
//! process holds any more are swept (not younger than [`GRACE`]: a socket
//! in flight is in no fd table), and a table still full refuses the
//! connection (`ENOBUFS`), never making up an address.

use crate::names::SocketName;
use std::collections::{HashMap, HashSet};
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
/// Entries younger than this are never swept.
const GRACE: Duration = Duration::from_secs(5);
/// Least time between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

const HELLO_MAGIC: &[u8; 8] = b"axhello1";
const FILE_MAGIC: &[u8; 8] = b"axident1";
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

struct Entry {
    slot: u32,
    inode: u64,
    kind: Kind,
    name: SocketName,
    born: Instant,
}

struct Inner {
    map: HashMap<u64, Entry>,
    free: Vec<u32>,
    next_slot: u32,
    last_sweep: Option<Instant>,
}

/// The broker's table of connection identities (see the module docs).
pub(crate) struct Idents {
    secret: [u8; 16],
    file: Option<File>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Idents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idents").finish_non_exhaustive()
    }
}

/// The table is full even after a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl Idents {
    /// A table for the daemon `instance`, kept in the file at `path` (read
    /// back if a predecessor of this boot left one), or in memory only.
    pub(crate) fn open(instance: u32, path: Option<&Path>) -> Self {
        let mut inner = Inner {
            map: HashMap::new(),
            free: Vec::new(),
            next_slot: 0,
            last_sweep: None,
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
            if let Some(f) = &file {
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
        Idents {
            secret,
            file,
            inner: Mutex::new(inner),
        }
    }

    /// The identity kept for the socket with `cookie`.
    pub(crate) fn get(&self, cookie: u64) -> Option<(Kind, SocketName)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.map.get(&cookie).map(|e| (e.kind, e.name))
    }

    /// Keeps `name` for the socket with `cookie` and `inode`.
    pub(crate) fn insert(
        &self,
        cookie: u64,
        inode: u64,
        kind: Kind,
        name: SocketName,
    ) -> Result<(), Full> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match inner.map.get(&cookie) {
            Some(e) => e.slot,
            None => {
                if inner.map.len() >= LIMIT {
                    self.sweep(&mut inner);
                }
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
        self.write_slot(slot, &encode_record(cookie, inode, kind, &name));
        inner.map.insert(
            cookie,
            Entry {
                slot,
                inode,
                kind,
                name,
                born: Instant::now(),
            },
        );
        Ok(())
    }

    fn write_slot(&self, slot: u32, record: &[u8; RECORD as usize]) {
        if let Some(f) = &self.file {
            let at = (u64::from(slot) + 1) * RECORD;
            if let Err(e) = f.write_all_at(record, at) {
                tracing::debug!(error = %e, "connection identity not kept for a successor");
            }
        }
    }

    fn sweep(&self, inner: &mut Inner) {
        if inner.last_sweep.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
            return;
        }
        inner.last_sweep = Some(Instant::now());
        let live = live_socket_inodes();
        let dead: Vec<u64> = inner
            .map
            .iter()
            .filter(|(_, e)| e.born.elapsed() >= GRACE && !live.contains(&e.inode))
            .map(|(c, _)| *c)
            .collect();
        for cookie in dead {
            if let Some(e) = inner.map.remove(&cookie) {
                self.write_slot(e.slot, &[0u8; RECORD as usize]);
                inner.free.push(e.slot);
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

fn encode_record(cookie: u64, inode: u64, kind: Kind, name: &SocketName) -> [u8; RECORD as usize] {
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
    }
    r
}

fn decode_record(r: &[u8]) -> Option<(u64, u64, Kind, SocketName)> {
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
    Some((cookie, inode, kind, name))
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
    let now = Instant::now();
    for (i, r) in buf.chunks_exact(RECORD as usize).enumerate() {
        let Ok(slot) = u32::try_from(i) else { break };
        match decode_record(r) {
            Some((cookie, inode, kind, name)) if inner.map.len() < LIMIT => {
                inner.map.insert(
                    cookie,
                    Entry {
                        slot,
                        inode,
                        kind,
                        name,
                        born: now,
                    },
                );
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

/// Inodes of every socket some process this broker can see holds.
fn live_socket_inodes() -> HashSet<u64> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return HashSet::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .flat_map(crate::orphans::socket_fds)
        .map(|(_, inode)| inode)
        .collect()
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
    fn survives_in_its_file() {
        let dir = std::env::temp_dir().join(format!("ax-idents-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let n = client("10.233.0.4:40000", "[fd00:a8::9]:80");
        let h = {
            let ids = Idents::open(7, Some(&dir));
            ids.insert(11, 12, Kind::Peer, n).unwrap();
            ids.insert(13, 14, Kind::Own, n).unwrap();
            ids.hello(&n)
        };
        let again = Idents::open(7, Some(&dir));
        assert_eq!(again.get(11), Some((Kind::Peer, n)));
        assert_eq!(again.get(13), Some((Kind::Own, n)));
        assert_eq!(again.read_hello(&h), Some(n));
        // Another daemon instance starts afresh.
        let other = Idents::open(8, Some(&dir));
        assert_eq!(other.get(11), None);
        assert_eq!(other.read_hello(&h), None);
        let _ = std::fs::remove_file(&dir);
    }
}
