//! Access to the thread that made a trapped call: its fds, its memory, its
//! pending signals. Every read of its memory is followed by a check that the
//! notification is still valid, so that a recycled pid is never trusted.

use ax_sys::process;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// The trapped thread.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) tid: u32,
    pidfd: OwnedFd,
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
        Ok(Self { tid, pidfd })
    }

    /// A copy of the target's fd `fd` (same open file description).
    pub(crate) fn fd(&self, fd: u64) -> Result<OwnedFd, Errno> {
        let Ok(fd) = i32::try_from(fd as i64) else {
            return Err(libc::EBADF);
        };
        if fd < 0 {
            return Err(libc::EBADF);
        }
        process::pidfd_getfd(self.pidfd.as_fd(), fd).map_err(|e| errno_of(&e))
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
        let path = format!("/proc/{}/fdinfo/{}", self.tid, fd as i64);
        let Ok(text) = std::fs::read_to_string(path) else {
            return true;
        };
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
}

fn thread_group_leader(tid: u32) -> io::Result<u32> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}
