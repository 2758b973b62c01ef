//! Seccomp user notifications: receive, answer, validate and install fds.
//!
//! See `seccomp_unotify(2)`. A [`NotifyFd`] is the listener returned by
//! `seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, …)`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (Linux 6.6): wake the supervisor on
/// the same CPU as the target, which roughly halves a notification round trip.
const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;

/// One trapped system call, as read by `SECCOMP_IOCTL_NOTIF_RECV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// Cookie that identifies this notification in every later ioctl.
    pub id: u64,
    /// Thread id (in the supervisor's pid namespace) of the trapped thread.
    pub pid: u32,
    /// System call number, for the architecture in `arch`.
    pub nr: i32,
    /// `AUDIT_ARCH_*` value of the call.
    pub arch: u32,
    /// The six raw argument registers.
    pub args: [u64; 6],
}

/// A seccomp notification listener fd.
#[derive(Debug)]
pub struct NotifyFd {
    fd: OwnedFd,
}

impl From<OwnedFd> for NotifyFd {
    fn from(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl AsFd for NotifyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn ioctl_ptr<T>(fd: RawFd, request: libc::Ioctl, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: every caller passes a pointer to a live, properly sized and
    // initialised value of the type the request expects; the kernel only
    // reads or writes that object.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl NotifyFd {
    /// Consumes the wrapper, giving the fd back.
    pub fn into_inner(self) -> OwnedFd {
        self.fd
    }

    /// Duplicates the listener (`F_DUPFD_CLOEXEC`).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// Blocks until a notification arrives. Returns `ENOENT` when the target
    /// died between the wake-up and the read: callers simply try again.
    pub fn recv(&self) -> io::Result<Notification> {
        // SAFETY: seccomp_notif is plain old data; all-zero is a valid value
        // and the kernel requires the buffer to be zeroed.
        let mut raw: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        loop {
            match ioctl_ptr(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut raw,
            ) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Notification {
            id: raw.id,
            pid: raw.pid,
            nr: raw.data.nr,
            arch: raw.data.arch,
            args: raw.data.args,
        })
    }

    fn send(&self, id: u64, val: i64, error: i32, flags: u32) -> io::Result<()> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val,
            error,
            flags,
        };
        ioctl_ptr(
            self.fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp,
        )
        .map(drop)
    }

    /// Completes the call with return value `val`.
    pub fn respond_value(&self, id: u64, val: i64) -> io::Result<()> {
        self.send(id, val, 0, 0)
    }

    /// Fails the call with `errno` (a positive errno value).
    pub fn respond_error(&self, id: u64, errno: i32) -> io::Result<()> {
        self.send(id, 0, -errno.abs(), 0)
    }

    /// Lets the kernel run the call as if it had not been trapped
    /// (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). Only for calls whose outcome
    /// does not depend on a decision made from the target's memory.
    pub fn respond_continue(&self, id: u64) -> io::Result<()> {
        self.send(id, 0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32)
    }

    /// True while the notification is still pending (the target has not died
    /// nor been interrupted). Call it after every read of target memory.
    pub fn id_valid(&self, id: u64) -> bool {
        let mut cookie = id;
        ioctl_ptr(
            self.fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &mut cookie,
        )
        .is_ok()
    }

    /// Installs `src` in the target's fd table.
    ///
    /// * `target_fd`: `Some(n)` replaces fd `n` atomically
    ///   (`SECCOMP_ADDFD_FLAG_SETFD`), `None` takes the lowest free number.
    /// * `cloexec`: sets `O_CLOEXEC` on the new fd.
    /// * `and_respond`: also completes the call, returning the new fd number
    ///   (`SECCOMP_ADDFD_FLAG_SEND`), atomically with the install.
    ///
    /// Returns the fd number in the target.
    pub fn add_fd(
        &self,
        id: u64,
        src: BorrowedFd<'_>,
        target_fd: Option<i32>,
        cloexec: bool,
        and_respond: bool,
    ) -> io::Result<i32> {
        let mut flags = 0u32;
        if target_fd.is_some() {
            flags |= libc::SECCOMP_ADDFD_FLAG_SETFD as u32;
        }
        if and_respond {
            flags |= libc::SECCOMP_ADDFD_FLAG_SEND as u32;
        }
        let newfd = match target_fd {
            Some(n) => u32::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
            None => 0,
        };
        let mut addfd = libc::seccomp_notif_addfd {
            id,
            flags,
            srcfd: src.as_raw_fd() as u32,
            newfd,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        ioctl_ptr(
            self.fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ADDFD,
            &mut addfd,
        )
    }

    /// Asks the kernel to wake the supervisor synchronously, on the target's
    /// CPU (Linux 6.6+). Returns `false` where the kernel lacks it.
    pub fn set_sync_wake_up(&self) -> bool {
        // Unlike the other requests, SET_FLAGS takes its flags by value.
        // SAFETY: no memory is passed; the kernel reads the integer argument.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP as libc::c_ulong,
            )
        };
        rc == 0
    }
}
