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
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// The trapped thread.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) tid: u32,
    pidfd: Arc<OwnedFd>,
    /// The `/proc/PID/fdinfo/FD` files of the thread's fd table opened so
    /// far (see [`Target::fd_info`]), shared with the [`PidfdCache`].
    fdinfo: Arc<FdinfoFiles>,
    /// Set when the pidfd turned out to belong to an earlier thread that had
    /// the same tid: the cache must forget it.
    stale: Cell<bool>,
    /// The call this target is asked about (listener and notification id):
    /// its memory is reached only while that call is pending.
    call: OnceCell<(Arc<NotifyFd>, u64)>,
    /// See [`Target::signal_pending`].
    signals: OnceCell<Signals>,
}

/// The signals pending on one thread, as its `/proc/TID/status` shows them.
/// The file is opened once and read again at offset 0, which shows the
/// thread as it is then: a blocking call waited for on the thread's behalf
/// asks every tick, and an open, a `statx` and a read per kilobyte each time
/// cost more than the read itself. A file opened for an earlier thread of
/// the same tid reads nothing (procfs ties it to that thread), so a stale
/// one says "nothing pending" rather than lie about another thread.
#[derive(Debug)]
pub(crate) struct Signals {
    tid: u32,
    status: OnceCell<std::fs::File>,
}

/// Enough for the signal lines of a status file, but for a thread in very
/// many groups (its `Groups:` line comes first); such a file is read whole.
const STATUS_READ: usize = 4096;
/// A status file is read no further than this.
const STATUS_MAX: usize = 1 << 20;

impl Signals {
    /// Opens thread `tid`'s status file now (and again at the next
    /// [`Signals::pending`] if it cannot be opened now).
    pub(crate) fn open(tid: u32) -> Self {
        let signals = Signals {
            tid,
            status: OnceCell::new(),
        };
        signals.file();
        signals
    }

    fn file(&self) -> Option<&std::fs::File> {
        if let Some(file) = self.status.get() {
            return Some(file);
        }
        let file = std::fs::File::open(format!("/proc/{}/status", self.tid)).ok()?;
        Some(self.status.get_or_init(|| file))
    }

    /// True when a signal the thread does not block is pending for it or
    /// for its process.
    pub(crate) fn pending(&self) -> bool {
        let Some(file) = self.file() else {
            return false;
        };
        let mut buf = [0u8; STATUS_READ];
        let Ok(n) = file.read_at(&mut buf, 0) else {
            return false;
        };
        if let Some(pending) = buf.get(..n).and_then(pending_unblocked) {
            return pending;
        }
        // The signal lines are further on (a thread in very many groups).
        let mut whole = Vec::new();
        let mut at = 0;
        while at < STATUS_MAX {
            whole.resize(at + STATUS_READ, 0);
            match file.read_at(&mut whole[at..], at as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => at += n,
            }
        }
        whole.truncate(at);
        pending_unblocked(&whole).unwrap_or(false)
    }
}

/// From the text of a status file: whether a signal is pending (`SigPnd`,
/// `ShdPnd`) that is not blocked (`SigBlk`); `None` if a line is missing.
fn pending_unblocked(text: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(text).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((field("SigPnd:")? | field("ShdPnd:")?) & !field("SigBlk:")? != 0)
}

/// Pidfds of an app's threads, kept between calls: opening one is a system
/// call on every notification otherwise. A pidfd names one task for ever,
/// so an entry can only go stale (its thread exited and the tid was
/// reused), never point at the wrong task; stale entries are replaced.
#[derive(Debug, Default)]
pub(crate) struct PidfdCache {
    by_tid: HashMap<u32, (Arc<OwnedFd>, Arc<FdinfoFiles>)>,
    /// The fdinfo files of each fd table, by the pid whose `/proc`
    /// directory shows it: the process's, for the threads that share its
    /// table (all, but for one that unshared it), else the thread's own.
    by_table: HashMap<u32, Arc<FdinfoFiles>>,
    /// fdinfo files kept by all of them (see [`FDINFO_KEPT`]).
    fdinfo_kept: Arc<std::sync::atomic::AtomicUsize>,
}

/// Open `/proc/PID/fdinfo/FD` files of one fd table. Such a file shows the
/// fd *as it is when read*: reading it again (at offset 0) tells the fd's
/// flags and inode now, for a fraction of an open's cost. A file opened
/// for an earlier task of the same pid reads nothing (procfs ties it to
/// that task's `struct pid`), so a stale one fails rather than lies.
#[derive(Debug, Default)]
pub(crate) struct FdinfoFiles {
    /// The pid whose `/proc` directory holds them.
    base: u32,
    files: Mutex<HashMap<i32, std::fs::File>>,
    /// The count of files kept by every thread of the cache (shared).
    kept: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for FdinfoFiles {
    fn drop(&mut self) {
        let n = self.files.get_mut().map_or(0, |f| f.len());
        self.kept.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// fdinfo files kept per fd table, and per app (fds beyond are opened per
/// call): each is an fd of the daemon's.
const FDINFO_PER_TABLE: usize = 256;
const FDINFO_KEPT: usize = 512;

/// What `/proc/TID/fdinfo/FD` says of an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdInfo {
    /// The open flags (`O_*`; `O_CLOEXEC` for the fd's close-on-exec flag).
    pub(crate) flags: u32,
    /// The mount of the file (`mnt_id`): sockets are all on sockfs's.
    pub(crate) mnt_id: u64,
    /// The file's inode number.
    pub(crate) ino: u64,
}

impl FdInfo {
    /// Parses the text of an fdinfo file: `pos:`, `flags:` (octal),
    /// `mnt_id:`, `ino:` lines, in any order. `None` if one is missing.
    pub(crate) fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (mut flags, mut mnt_id, mut ino) = (None, None, None);
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "flags" => flags = u32::from_str_radix(value, 8).ok(),
                "mnt_id" => mnt_id = value.parse().ok(),
                "ino" => ino = value.parse().ok(),
                _ => {}
            }
        }
        Some(FdInfo {
            flags: flags?,
            mnt_id: mnt_id?,
            ino: ino?,
        })
    }
}

/// Entries kept before the cache starts over (threads come and go).
const PIDFD_CACHE_LIMIT: usize = 1024;
/// New entries between two sweeps for exited threads.
const PIDFD_SWEEP_EVERY: usize = 16;

impl PidfdCache {
    /// The target `tid`, from the cache or freshly opened.
    pub(crate) fn target(&mut self, tid: u32) -> io::Result<Target> {
        if let Some((pidfd, fdinfo)) = self.by_tid.get(&tid) {
            return Ok(Target {
                tid,
                pidfd: pidfd.clone(),
                fdinfo: fdinfo.clone(),
                stale: Cell::new(false),
                call: OnceCell::new(),
                signals: OnceCell::new(),
            });
        }
        // The process's fd table, unless this thread has one of its own. A
        // thread-group leader (every single-threaded process: a forking
        // server's children) is told by the process pidfd it alone can
        // have, which then serves as its pidfd: its tid is not reused before
        // the whole group is gone. (A thread that unshares its fd table
        // after its first trapped call is still read through the process's
        // until the cache forgets it; what that could mislead is the
        // program's own view of its own sockets, nothing of ax's decisions.)
        let (mut target, base) = match process::pidfd_open(tid, false) {
            Ok(pidfd) => (Target::with_pidfd(tid, pidfd), tid),
            Err(_) => {
                let target = Target::open(tid)?;
                let base = match thread_group_leader(tid) {
                    Ok(tgid) if process::same_fd_table(tid, tgid).unwrap_or(false) => tgid,
                    _ => tid,
                };
                (target, base)
            }
        };
        let kept = &self.fdinfo_kept;
        target.fdinfo = self
            .by_table
            .entry(base)
            .or_insert_with(|| {
                Arc::new(FdinfoFiles {
                    base,
                    files: Mutex::default(),
                    kept: kept.clone(),
                })
            })
            .clone();
        if self.by_tid.len() >= PIDFD_CACHE_LIMIT {
            self.by_tid.clear();
            self.by_table.clear();
        } else if self.by_tid.len() % PIDFD_SWEEP_EVERY == PIDFD_SWEEP_EVERY - 1 {
            self.sweep();
        }
        self.by_tid
            .insert(tid, (target.pidfd.clone(), target.fdinfo.clone()));
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
                .map(|t| PollFd::new(self.by_tid[t].0.as_ref(), PollFlags::IN))
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
        // Tables no thread of the cache uses any more.
        self.by_table.retain(|_, f| Arc::strong_count(f) > 1);
    }

    /// Closes every fdinfo file kept (see [`FdinfoFiles`]); they are
    /// opened again as calls come.
    pub(crate) fn forget_fdinfo(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        for table in self.by_table.values() {
            let mut files = table.files.lock().unwrap_or_else(|e| e.into_inner());
            self.fdinfo_kept.fetch_sub(files.len(), Relaxed);
            files.clear();
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
        Ok(Self::with_pidfd(tid, pidfd))
    }

    /// The thread `tid`, known by `pidfd` (its own or, for a thread-group
    /// leader, its process's).
    fn with_pidfd(tid: u32, pidfd: OwnedFd) -> Self {
        Self {
            tid,
            pidfd: Arc::new(pidfd),
            fdinfo: Arc::new(FdinfoFiles {
                base: tid,
                files: Mutex::default(),
                kept: Arc::default(),
            }),
            stale: Cell::new(false),
            call: OnceCell::new(),
            signals: OnceCell::new(),
        }
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
        let buf = self.read_unverified(addr, len)?;
        self.still_pending()?;
        Ok(buf)
    }

    /// Reads `len` bytes at `addr` without checking after that the call is
    /// pending, for a value kept only once the call's answer was taken:
    /// the kernel takes an answer only while the call is pending, which
    /// proves its thread lived all along and so that the memory read was
    /// its own. Until then, as for [`Target::read_int_unverified`], only an
    /// errno may be decided on it.
    pub(crate) fn read_unverified(&self, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; len];
        if len > 0 && addr == 0 {
            return Err(libc::EFAULT);
        }
        process::read_memory(self.tid, addr, &mut buf).map_err(|e| errno_of(&e))?;
        Ok(buf)
    }

    /// Reads a C `int` at `addr` without checking after that the call is
    /// still pending: only for a value that decides what is written next,
    /// whose own check ([`Target::write_parts`]) covers the read too (a call
    /// pending then was pending all along, so the memory read was its
    /// thread's), or the errno of a call that then writes nothing (an
    /// answer to a call no longer pending goes nowhere). Nothing else may
    /// be decided on it: nothing kept, nothing done on the caller's behalf.
    pub(crate) fn read_int_unverified(&self, addr: u64) -> Result<i32, Errno> {
        let mut b = [0u8; 4];
        if addr == 0 {
            return Err(libc::EFAULT);
        }
        process::read_memory(self.tid, addr, &mut b).map_err(|e| errno_of(&e))?;
        Ok(i32::from_ne_bytes(b))
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

    /// What `/proc/TID/fdinfo/FD` says of the target's fd `fd` now:
    /// `None` when it cannot be read (no such fd, the thread is gone). A
    /// file kept from an earlier call is read again; the first call on an
    /// fd opens it.
    pub(crate) fn fd_info(&self, fd: u64) -> Option<FdInfo> {
        let fd = fd_number(fd);
        if fd < 0 {
            return None;
        }
        let mut buf = [0u8; 128];
        use std::sync::atomic::Ordering::Relaxed;
        let kept = &self.fdinfo.kept;
        let mut files = self.fdinfo.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = files.get(&fd) {
            // An error: closed since, or the thread is gone; opened afresh
            // below.
            if let Some(info) = file
                .read_at(&mut buf, 0)
                .ok()
                .and_then(|n| buf.get(..n).and_then(FdInfo::parse))
            {
                return Some(info);
            }
            files.remove(&fd);
            kept.fetch_sub(1, Relaxed);
        }
        let file = std::fs::File::open(format!("/proc/{}/fdinfo/{fd}", self.fdinfo.base)).ok()?;
        let n = file.read_at(&mut buf, 0).ok()?;
        let info = FdInfo::parse(buf.get(..n)?)?;
        if files.len() < FDINFO_PER_TABLE && kept.fetch_add(1, Relaxed) < FDINFO_KEPT {
            files.insert(fd, file);
        } else if files.len() < FDINFO_PER_TABLE {
            kept.fetch_sub(1, Relaxed);
        }
        Some(info)
    }

    /// Whether the target's fd `fd` has `FD_CLOEXEC` (a copy taken with
    /// pidfd_getfd always has it, so the copy cannot tell); `true` when it
    /// cannot be read.
    pub(crate) fn fd_cloexec(&self, fd: u64) -> bool {
        self.fd_info(fd)
            .is_none_or(|i| i.flags & libc::O_CLOEXEC as u32 != 0)
    }

    /// True when the thread has a signal pending that it does not block: a
    /// long wait on its behalf should end with `EINTR` so the handler runs.
    /// Asked every tick of such a wait: the thread's status file is opened
    /// once (see [`Signals`]).
    pub(crate) fn signal_pending(&self) -> bool {
        self.signals
            .get_or_init(|| Signals::open(self.tid))
            .pending()
    }

    /// Sends `SIGPIPE` to the target, as the kernel does to a thread whose
    /// send hits a closed connection without `MSG_NOSIGNAL`.
    pub(crate) fn raise_sigpipe(&self) {
        let _ = process::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGPIPE);
    }
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
    fn a_pending_signal_counts_unless_blocked() {
        let status = |pnd: &str, shd: &str, blk: &str| {
            format!(
                "Name:\tx\nState:\tS (sleeping)\nSigQ:\t0/100\nSigPnd:\t{pnd}\n\
                 ShdPnd:\t{shd}\nSigBlk:\t{blk}\nSigIgn:\t0\nSigCgt:\t2\n"
            )
        };
        let pending = |t: String| pending_unblocked(t.as_bytes());
        // SIGINT (bit 1) to the process, SIGUSR1 (bit 9) to the thread.
        assert_eq!(
            pending(status("0000000000000000", "0000000000000002", "0")),
            Some(true)
        );
        assert_eq!(
            pending(status("0000000000000200", "0000000000000000", "0")),
            Some(true)
        );
        assert_eq!(
            pending(status("0", "0000000000000002", "0000000000000002")),
            Some(false)
        );
        assert_eq!(pending(status("0", "0", "0")), Some(false));
        // A line missing (a status file cut short): not known.
        assert_eq!(pending_unblocked(b"Name:\tx\nSigPnd:\t0\n"), None);
        // This thread's own file reads, twice, through one open file.
        let own = Signals::open(rustix::thread::gettid().as_raw_nonzero().get() as u32);
        assert!(!own.pending() && !own.pending());
        assert!(own.status.get().is_some());
    }

    #[test]
    fn fdinfo_is_read_and_read_again() {
        let text = b"pos:\t0\nflags:\t02000002\nmnt_id:\t10\nino:\t168649565\nscm_fds: 0\n";
        assert_eq!(
            FdInfo::parse(text),
            Some(FdInfo {
                flags: 0o2000002,
                mnt_id: 10,
                ino: 168649565
            })
        );
        assert_eq!(FdInfo::parse(b"pos:\t0\nflags:\t02\n"), None);
        let me = Target::open(std::process::id()).unwrap();
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&sock) as u64;
        let ino = rustix::fs::fstat(&sock).unwrap().st_ino;
        for _ in 0..2 {
            let info = me.fd_info(raw).unwrap();
            assert_eq!(info.ino, ino);
            assert_eq!(info.flags & libc::O_CLOEXEC as u32, libc::O_CLOEXEC as u32);
        }
        // The same fd number, another socket: the kept file tells.
        drop(sock);
        assert_eq!(me.fd_info(raw), None);
    }
}
