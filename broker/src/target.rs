//! Access to the thread that made a trapped call: its fds, its memory, its
//! pending signals. A target tied to its call ([`Target::for_call`])
//! checks that the notification is still pending after every read of its
//! memory and before every write, so that a recycled tid is never trusted
//! and never written to.
//!
//! Memory is reached with `process_vm_readv`/`process_vm_writev`, which
//! honour the target's page protections as the kernel's own copies do
//! (`EFAULT` on a read-only or `PROT_NONE` page). seccomp_unotify(2)
//! suggests `/proc/TID/mem` instead, but its accesses are forced
//! (`FOLL_FORCE`): the broker would then write into read-only memory and
//! read unreadable memory where the kernel fails the call. The id checks
//! around each access give the safety that advice is after.

use ax_sys::process;
use ax_sys::NotifyFd;
use std::cell::{Cell, OnceCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// The trapped thread.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) tid: u32,
    pidfd: Arc<OwnedFd>,
    /// Set when the pidfd turned out to belong to an earlier thread that had
    /// the same tid: the cache must forget it.
    stale: Cell<bool>,
    /// The call this target is asked about (listener and notification id):
    /// its memory is reached only while that call is pending.
    call: OnceCell<(Arc<NotifyFd>, u64)>,
    /// `/proc/TID/maps`, opened by the first [`Target::check_writable`] of
    /// the call and reused by the next (an accept checks two buffers).
    maps: OnceCell<std::fs::File>,
}

/// Pidfds of an app's threads, kept between calls: opening one is a system
/// call on every notification otherwise. A pidfd names one task for ever,
/// so an entry can only go stale (its thread exited and the tid was
/// reused), never point at the wrong task; stale entries are replaced.
#[derive(Debug, Default)]
pub(crate) struct PidfdCache {
    by_tid: HashMap<u32, Arc<OwnedFd>>,
}

/// Entries kept before the cache starts over (threads come and go).
const PIDFD_CACHE_LIMIT: usize = 1024;
/// New entries between two sweeps for exited threads.
const PIDFD_SWEEP_EVERY: usize = 16;

impl PidfdCache {
    /// The target `tid`, from the cache or freshly opened.
    pub(crate) fn target(&mut self, tid: u32) -> io::Result<Target> {
        if let Some(pidfd) = self.by_tid.get(&tid) {
            return Ok(Target {
                tid,
                pidfd: pidfd.clone(),
                stale: Cell::new(false),
                call: OnceCell::new(),
                maps: OnceCell::new(),
            });
        }
        let target = Target::open(tid)?;
        if self.by_tid.len() >= PIDFD_CACHE_LIMIT {
            self.by_tid.clear();
        } else if self.by_tid.len() % PIDFD_SWEEP_EVERY == PIDFD_SWEEP_EVERY - 1 {
            self.sweep();
        }
        self.by_tid.insert(tid, target.pidfd.clone());
        Ok(target)
    }

    /// Forgets the pidfds of threads that have exited (a pidfd polls
    /// readable then), so that forking servers do not pile them up.
    pub(crate) fn sweep(&mut self) {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let tids: Vec<u32> = self.by_tid.keys().copied().collect();
        let exited: Vec<u32> = {
            let mut fds: Vec<PollFd<'_>> = tids
                .iter()
                .map(|t| PollFd::new(self.by_tid[t].as_ref(), PollFlags::IN))
                .collect();
            let zero = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if poll(&mut fds, Some(&zero)).unwrap_or(0) == 0 {
                return;
            }
            tids.iter()
                .zip(fds.iter())
                .filter(|(_, f)| !f.revents().is_empty())
                .map(|(t, _)| *t)
                .collect()
        };
        for t in exited {
            self.by_tid.remove(&t);
        }
    }

    /// True when no pidfd is kept.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_tid.is_empty()
    }

    /// Drops the entry of a target whose pidfd went stale.
    pub(crate) fn settle(&mut self, target: &Target) {
        if target.stale.get() {
            self.by_tid.remove(&target.tid);
        }
    }
}

/// An errno, as handlers answer them.
pub(crate) type Errno = i32;

pub(crate) fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Target {
    /// Opens the thread `tid` (a pidfd; `PIDFD_THREAD` where the kernel has
    /// it, else the thread group leader, which shares the fd table).
    pub(crate) fn open(tid: u32) -> io::Result<Self> {
        let pidfd = match process::pidfd_open(tid, true) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                process::pidfd_open(thread_group_leader(tid)?, false)?
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            tid,
            pidfd: Arc::new(pidfd),
            stale: Cell::new(false),
            call: OnceCell::new(),
            maps: OnceCell::new(),
        })
    }

    /// [`Target::open`] for the thread that made notification `id` on
    /// `listener`, tied to that call (see [`Target::tie`]).
    pub(crate) fn for_call(tid: u32, listener: &Arc<NotifyFd>, id: u64) -> io::Result<Self> {
        let t = Self::open(tid)?;
        t.tie(listener, id);
        Ok(t)
    }

    /// Ties this target to notification `id` on `listener`: from now on
    /// every read of its memory is followed, and every write preceded, by
    /// `SECCOMP_IOCTL_NOTIF_ID_VALID`, and fails with `ENOENT` once the call
    /// is no longer pending (the thread was interrupted or died, and its tid
    /// may name another thread). A target is tied once; later ties are
    /// ignored.
    pub(crate) fn tie(&self, listener: &Arc<NotifyFd>, id: u64) {
        let _ = self.call.set((listener.clone(), id));
    }

    /// `Ok` while the call this target is tied to is pending (or when it is
    /// tied to none).
    fn still_pending(&self) -> Result<(), Errno> {
        match self.call.get() {
            Some((listener, id)) if !listener.id_valid(*id) => Err(libc::ENOENT),
            _ => Ok(()),
        }
    }

    /// Whether `len` bytes at `addr` are all in writable mappings of the
    /// target (`/proc/TID/maps`), without writing: `EFAULT` if not, as the
    /// kernel's copy to that buffer would fail.
    pub(crate) fn check_writable(&self, addr: u64, len: usize) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        let end = u64::try_from(len)
            .ok()
            .and_then(|l| addr.checked_add(l))
            .ok_or(libc::EFAULT)?;
        // One open per call: the file stays tied to the address space it
        // was opened on, which is the tid's while the call is pending
        // (checked below, after every query).
        let mut maps = match self.maps.get() {
            Some(m) => m,
            None => {
                let m = std::fs::File::open(format!("/proc/{}/maps", self.tid))
                    .map_err(|e| errno_of(&e))?;
                self.maps.get_or_init(|| m)
            }
        };
        let writable = match process::range_writable(maps.as_fd(), addr, end) {
            Ok(Some(w)) => w,
            // A kernel without PROCMAP_QUERY: the text, line by line, from
            // the start.
            Ok(None) => {
                use std::io::Seek;
                maps.seek(std::io::SeekFrom::Start(0))
                    .map_err(|e| errno_of(&e))?;
                let mut text = String::new();
                std::io::Read::read_to_string(&mut maps, &mut text).map_err(|e| errno_of(&e))?;
                writable_in(&text, addr, end)
            }
            Err(e) => return Err(errno_of(&e)),
        };
        // The mappings are the tid's only while the call is pending.
        self.still_pending()?;
        if writable {
            Ok(())
        } else {
            Err(libc::EFAULT)
        }
    }

    /// A copy of the target's fd `fd` (same open file description). `fd`
    /// is a raw system call argument: the kernel reads an `int` from it and
    /// ignores the upper 32 bits, and so does this.
    pub(crate) fn fd(&self, fd: u64) -> Result<OwnedFd, Errno> {
        let fd = fd_number(fd);
        if fd < 0 {
            return Err(libc::EBADF);
        }
        match process::pidfd_getfd(self.pidfd.as_fd(), fd) {
            Ok(copy) => Ok(copy),
            // A cached pidfd of an exited thread whose tid was reused.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                self.stale.set(true);
                let fresh = Target::open(self.tid).map_err(|e| errno_of(&e))?;
                process::pidfd_getfd(fresh.pidfd.as_fd(), fd).map_err(|e| errno_of(&e))
            }
            Err(e) => Err(errno_of(&e)),
        }
    }

    /// Reads `len` bytes at `addr`; `EFAULT` if any is unreadable.
    pub(crate) fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; len];
        if len > 0 && addr == 0 {
            return Err(libc::EFAULT);
        }
        process::read_memory(self.tid, addr, &mut buf).map_err(|e| errno_of(&e))?;
        self.still_pending()?;
        Ok(buf)
    }

    /// Reads a C `int` at `addr`.
    pub(crate) fn read_int(&self, addr: u64) -> Result<i32, Errno> {
        let b = self.read(addr, 4)?;
        Ok(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Writes `data` at `addr`; `EFAULT` if any byte is not writable.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        if !data.is_empty() && addr == 0 {
            return Err(libc::EFAULT);
        }
        self.still_pending()?;
        process::write_memory(self.tid, addr, data).map_err(|e| errno_of(&e))
    }

    /// Writes each `(addr, data)` part in order, with one check that the
    /// call is pending and one system call; `EFAULT` at the first byte that
    /// is not writable (a non-empty part at address 0 is not), the parts
    /// before it written, as the kernel's copies in that order would be.
    pub(crate) fn write_parts(&self, parts: &[(u64, &[u8])]) -> Result<(), Errno> {
        let null = parts
            .iter()
            .position(|&(addr, data)| addr == 0 && !data.is_empty());
        let before = parts.get(..null.unwrap_or(parts.len())).unwrap_or(parts);
        self.still_pending()?;
        process::write_memory_parts(self.tid, before).map_err(|e| errno_of(&e))?;
        match null {
            Some(_) => Err(libc::EFAULT),
            None => Ok(()),
        }
    }

    /// Whether the target's fd `fd` has `FD_CLOEXEC`, from
    /// `/proc/TID/fdinfo/FD` (a copy taken with pidfd_getfd always has it,
    /// so the copy cannot tell).
    pub(crate) fn fd_cloexec(&self, fd: u64) -> bool {
        use std::io::Read;
        let path = format!("/proc/{}/fdinfo/{}", self.tid, fd_number(fd));
        // "pos:\t0\nflags:\t02000002\n…": the flags come within 64 bytes.
        let mut buf = [0u8; 64];
        let Ok(n) = std::fs::File::open(path).and_then(|mut f| f.read(&mut buf)) else {
            return true;
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        text.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .map(|flags| flags & libc::O_CLOEXEC as u32 != 0)
            .unwrap_or(true)
    }

    /// True when the thread has a signal pending that it does not block: a
    /// long wait on its behalf should end with `EINTR` so the handler runs.
    pub(crate) fn signal_pending(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", self.tid)) else {
            return false;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0)
        };
        (field("SigPnd:") | field("ShdPnd:")) & !field("SigBlk:") != 0
    }

    /// Sends `SIGPIPE` to the target, as the kernel does to a thread whose
    /// send hits a closed connection without `MSG_NOSIGNAL`.
    pub(crate) fn raise_sigpipe(&self) {
        let _ = process::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGPIPE);
    }
}

/// Whether `[start, end)` lies in mappings with write permission, as
/// `/proc/PID/maps` lists them (sorted, one per line:
/// `start-end perms offset dev inode path`).
fn writable_in(maps: &str, start: u64, end: u64) -> bool {
    let mut at = start;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        if hi <= at {
            continue;
        }
        if lo > at || perms.as_bytes().get(1) != Some(&b'w') {
            return false;
        }
        at = hi;
        if at >= end {
            return true;
        }
    }
    false
}

/// Field 22 of `/proc/PID/stat`: when the process started.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain anything, ')' included: skip past the last.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The fd number in a raw `int fd` argument: its low 32 bits, as the
/// kernel reads it (`connect(1 << 32 | 3, …)` is a connect on fd 3).
pub(crate) fn fd_number(arg: u64) -> i32 {
    arg as u32 as i32
}

pub(crate) fn thread_group_leader(tid: u32) -> io::Result<u32> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_ranges() {
        let maps = "1000-2000 rw-p 00000000 00:00 0\n\
                    2000-3000 rw-p 00000000 00:00 0\n\
                    3000-4000 r--p 00000000 00:00 0 /lib/x.so\n\
                    5000-6000 rw-s 00000000 00:00 0\n";
        assert!(writable_in(maps, 0x1000, 0x1010));
        assert!(writable_in(maps, 0x1ff0, 0x2010), "across two mappings");
        assert!(!writable_in(maps, 0x2ff0, 0x3010), "into a read-only one");
        assert!(!writable_in(maps, 0x3000, 0x3001));
        assert!(!writable_in(maps, 0x4ff0, 0x5010), "across a hole");
        assert!(writable_in(maps, 0x5000, 0x6000));
        assert!(!writable_in(maps, 0x6000, 0x6001), "past the end");
        assert!(!writable_in(maps, 0x10, 0x20));
        assert!(!writable_in("", 0x1000, 0x1001));
    }
}
