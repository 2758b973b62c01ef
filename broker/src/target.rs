//! Access to the thread that made a trapped call: its fds, its memory, its
//! pending signals. Every read of its memory is followed by a check that the
//! notification is still valid, so that a recycled pid is never trusted.

use ax_sys::process;
use std::cell::Cell;
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
        })
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
        process::write_memory(self.tid, addr, data).map_err(|e| errno_of(&e))
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
