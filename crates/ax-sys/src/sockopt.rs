//! Raw `getsockopt`/`setsockopt` with any level, name and byte value, on
//! the broker's own sockets: rustix wraps each option by name only.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `getsockopt(2)` of (`level`, `name`) on `sock` into `buf`, offering
/// `buf.len()` bytes; returns the length the kernel answered (which may
/// exceed `buf.len()` for options that report a wanted size).
///
/// # Errors
/// The kernel's errno: `ENOPROTOOPT`, `EOPNOTSUPP`, `EINVAL`, ….
pub fn get_raw(sock: BorrowedFd<'_>, level: i32, name: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `buf` is a live, writable buffer of exactly `len` bytes and
    // `len` lives on this frame; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `setsockopt(2)` of (`level`, `name`) on `sock` to the bytes `value`.
///
/// # Errors
/// The kernel's errno: `ENOPROTOOPT`, `EINVAL`, `EPERM`, `ENOENT`, ….
pub fn set_raw(sock: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `value` is a live buffer of exactly `len` bytes that the
    // kernel only reads.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
