//! `connect` and `bind` with raw `sockaddr` bytes.
//!
//! The broker decides on its own copy of the address a target passed, then
//! performs the call with exactly those bytes, so that the kernel judges a
//! malformed address the way it would have for the target.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Size of `struct sockaddr_storage`, the kernel's upper bound for `addrlen`.
pub const SOCKADDR_STORAGE_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Copies `addr` into an aligned `sockaddr_storage`; longer input is cut.
fn storage(addr: &[u8]) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = addr.len().min(SOCKADDR_STORAGE_LEN);
    // SAFETY: both regions are at least `n` bytes and do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            n,
        )
    };
    (ss, n as libc::socklen_t)
}

/// `connect(fd, addr, addr.len())`, retried on `EINTR` only when nothing has
/// started (the kernel reports a restarted connect as `EALREADY`).
pub fn connect_raw(fd: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let (ss, len) = storage(addr);
    // SAFETY: `ss` is a valid sockaddr_storage and `len` never exceeds it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    check(rc)
}

/// `bind(fd, addr, addr.len())`.
pub fn bind_raw(fd: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let (ss, len) = storage(addr);
    // SAFETY: `ss` is a valid sockaddr_storage and `len` never exceeds it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    check(rc)
}

/// `sendto(fd, data, data.len(), flags, addr, addr.len())` — with a NULL
/// address when `addr` is `None` — returning the count of bytes sent.
/// See [sendto(2)](https://man7.org/linux/man-pages/man2/sendto.2.html).
///
/// The broker uses it to make a program's `MSG_FASTOPEN` call on its own
/// copy of the program's socket, with its own copies of the address and
/// the data. `addr` longer than `sockaddr_storage` is cut, as in
/// [`connect_raw`]; `Some(&[])` passes a non-NULL address of length 0.
///
/// # Errors
///
/// The kernel's errno: `EINPROGRESS` for a non-blocking Fast Open connect
/// that sent nothing yet, `EISCONN`, `ECONNREFUSED`, `EAGAIN`, `EPIPE`
/// (no `SIGPIPE` is raised when `flags` has `MSG_NOSIGNAL`).
pub fn sendto_raw(
    fd: BorrowedFd<'_>,
    data: &[u8],
    flags: libc::c_int,
    addr: Option<&[u8]>,
) -> io::Result<usize> {
    let (ss, len) = storage(addr.unwrap_or_default());
    let name: *const libc::sockaddr = match addr {
        Some(_) => (&ss as *const libc::sockaddr_storage).cast(),
        None => std::ptr::null(),
    };
    // SAFETY: `data` is readable for `data.len()` bytes for the call; `name`
    // is NULL (with length 0) or points at `ss`, a valid sockaddr_storage
    // that `len` never exceeds, alive until the call returns.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags,
            name,
            if addr.is_some() { len } else { 0 },
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}
