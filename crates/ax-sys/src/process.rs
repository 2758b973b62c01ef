//! Reaching into a trapped target: pidfds, `pidfd_getfd`, and its memory.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `PIDFD_THREAD` (Linux 6.9): a pidfd for a thread that is not its group's
/// leader. Same value as `O_EXCL`.
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

fn fd_result(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Opens a pidfd for `tid`. With `thread` set, `tid` may be any thread
/// (`PIDFD_THREAD`, Linux 6.9+); otherwise it must be a thread-group leader.
pub fn pidfd_open(tid: u32, thread: bool) -> io::Result<OwnedFd> {
    let flags = if thread { PIDFD_THREAD } else { 0 };
    // SAFETY: integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, tid as libc::pid_t, flags) };
    fd_result(rc)
}

/// Duplicates fd `target_fd` of the process behind `pidfd` into this process
/// (`pidfd_getfd`). The copy refers to the same open file description.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0u32) };
    fd_result(rc)
}

/// Sends signal `sig` to the process behind `pidfd`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: a null siginfo pointer is allowed and means "as kill(2)".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `KCMP_FILES` of `<linux/kcmp.h>`: compare two tasks' fd tables.
const KCMP_FILES: libc::c_int = 2;

/// Whether threads `a` and `b` share one fd table (`kcmp(2)` with
/// `KCMP_FILES`): threads of a process do unless one unshared it.
///
/// # Errors
/// What `kcmp` returns: `ESRCH` for a thread that is gone, `EPERM` without
/// ptrace access to both.
pub fn same_fd_table(a: u32, b: u32) -> io::Result<bool> {
    // SAFETY: kcmp with KCMP_FILES takes two pids, a type and two unused
    // integer arguments; it touches no memory of this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            a as libc::pid_t,
            b as libc::pid_t,
            KCMP_FILES,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc == 0)
    }
}

/// Reads exactly `buf.len()` bytes at `addr` in the address space of `tid`.
/// A short or failed read is `EFAULT`, as the kernel reports a bad pointer.
pub fn read_memory(tid: u32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we own mutably for the call;
    // `remote` is only interpreted by the kernel, in the target's address
    // space, and faults there are reported as errors.
    let n = unsafe { libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ESRCH) | Some(libc::EPERM) => Err(e),
                _ => Err(io::Error::from_raw_os_error(libc::EFAULT)),
            }
        }
        n if n as usize != buf.len() => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        _ => Ok(()),
    }
}

/// Writes all of `data` at `addr` in the address space of `tid`, honouring
/// page protections (a read-only destination is `EFAULT`).
pub fn write_memory(tid: u32, addr: u64, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: `local` describes `data`, which the kernel only reads;
    // `remote` is only interpreted in the target's address space.
    let n = unsafe { libc::process_vm_writev(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ESRCH) | Some(libc::EPERM) => Err(e),
                _ => Err(io::Error::from_raw_os_error(libc::EFAULT)),
            }
        }
        n if n as usize != data.len() => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        _ => Ok(()),
    }
}

/// Writes each `(addr, data)` part, in order, in the address space of
/// `tid` with one `process_vm_writev`, honouring page protections: `EFAULT`
/// if any byte is not writable (the parts before it may be written, as the
/// kernel's own copies in that order would be). Empty parts are skipped.
pub fn write_memory_parts(tid: u32, parts: &[(u64, &[u8])]) -> io::Result<()> {
    let mut local = Vec::with_capacity(parts.len());
    let mut remote = Vec::with_capacity(parts.len());
    let mut total: usize = 0;
    for &(addr, data) in parts.iter().filter(|p| !p.1.is_empty()) {
        let at = usize::try_from(addr).map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
        local.push(libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        });
        remote.push(libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: data.len(),
        });
        total = total
            .checked_add(data.len())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
    }
    if local.is_empty() {
        return Ok(());
    }
    let count = libc::c_ulong::try_from(local.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let pid = libc::pid_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: each `local` iovec describes a slice of `parts`, which the
    // kernel only reads and which outlive the call; `remote` is only
    // interpreted in the target's address space; both arrays hold `count`
    // entries.
    let n =
        unsafe { libc::process_vm_writev(pid, local.as_ptr(), count, remote.as_ptr(), count, 0) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ESRCH) | Some(libc::EPERM) => Err(e),
                _ => Err(io::Error::from_raw_os_error(libc::EFAULT)),
            }
        }
        n if usize::try_from(n).ok() != Some(total) => {
            Err(io::Error::from_raw_os_error(libc::EFAULT))
        }
        _ => Ok(()),
    }
}

/// True when the calling process is root in its user namespace (effective
/// uid 0), which can load a seccomp filter without `PR_SET_NO_NEW_PRIVS`.
pub fn is_effective_root() -> bool {
    // SAFETY: geteuid cannot fail and takes no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// `CLOSE_RANGE_CLOEXEC` (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Marks every fd from 3 up, except `keep`, close-on-exec. Async-signal-safe;
/// best effort (kernels before 5.11 lack the flag and are left as they are).
fn cloexec_from_3_except(keep: Option<RawFd>) {
    let mut ranges = [(3u32, u32::MAX), (0, 0)];
    let mut count = 1;
    if let Some(k) = keep.filter(|&k| k >= 3) {
        let k = k as u32;
        ranges = [(3, k.saturating_sub(1)), (k.saturating_add(1), u32::MAX)];
        count = 2;
    }
    for &(first, last) in &ranges[..count] {
        if first > last {
            continue;
        }
        // SAFETY: integer arguments only; with CLOSE_RANGE_CLOEXEC nothing
        // is closed in this process, the fds only close at execve.
        unsafe {
            libc::syscall(libc::SYS_close_range, first, last, CLOSE_RANGE_CLOEXEC);
        }
    }
}

/// Makes `cmd`'s child inherit no fd above 2 except `keep`, whatever this
/// process was given without `O_CLOEXEC` (a test harness's pipe, a shell's
/// `3>`): a long-lived child such as a daemon would otherwise hold them open
/// and keep whoever waits for their EOF waiting.
pub fn inherit_only_stdio_and(cmd: &mut std::process::Command, keep: Option<RawFd>) {
    use std::os::unix::process::CommandExt;
    let hook = move || {
        cloexec_from_3_except(keep);
        Ok(())
    };
    // SAFETY: the hook only makes raw close_range system calls with integer
    // arguments: async-signal-safe, no allocation, no lock, as pre_exec
    // requires.
    unsafe {
        cmd.pre_exec(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_share_an_fd_table_until_one_unshares_it() {
        let me = std::process::id();
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = || unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let shared = std::thread::spawn(move || same_fd_table(tid(), me).unwrap())
            .join()
            .unwrap();
        assert!(shared);
        let own = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_FILES) gives this thread a copy of the fd
            // table; it touches no memory.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_FILES) }, 0);
            same_fd_table(tid(), me).unwrap()
        })
        .join()
        .unwrap();
        assert!(!own);
    }
}
