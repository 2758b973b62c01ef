//! Namespaces and socket peers, as the kernel reports them: what the daemon
//! needs to tell a program under ax from an ordinary client.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `NS_GET_PARENT`: `_IO(0xb7, 0x2)` (linux/nsfs.h, Linux 4.9).
const NS_GET_PARENT: libc::c_ulong = 0xb702;
/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the process that connected.
const SO_PEERPIDFD: libc::c_int = 77;

/// The parent of the user (or PID) namespace `ns` refers to
/// (`ioctl(NS_GET_PARENT)`, see ioctl_nsfs(2)).
///
/// # Errors
/// `EPERM` when the parent lies outside this process's own namespace (the
/// walk up has reached the top this process can see); `EINVAL` for a
/// namespace type that has no parent.
pub fn parent(ns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd.
    let rc = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_PARENT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// A pidfd for the process that connected the UNIX stream socket `sock`
/// (`getsockopt(SO_PEERPIDFD)`, see unix(7)): unlike `SO_PEERCRED`'s pid
/// it cannot come to mean another process.
///
/// # Errors
/// `ENOPROTOOPT` before Linux 6.5; `ESRCH` when the peer has exited.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fd` and `len` live on this frame and describe an int.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel just installed this fd for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
