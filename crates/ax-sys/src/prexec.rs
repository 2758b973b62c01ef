//! Installing the seccomp filter in a freshly forked child, before `execve`.
//!
//! Everything here runs between `fork` and `exec`, where only
//! async-signal-safe work is allowed: no allocation, no locks, raw system
//! calls only. The program is prepared in the parent with
//! [`FilterProgram::from_bpf_bytes`]; the child calls
//! [`install_filter_and_send_listener`].

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A compiled classic-BPF seccomp program, ready to be loaded.
#[derive(Debug, Clone)]
pub struct FilterProgram {
    insns: Vec<libc::sock_filter>,
}

impl FilterProgram {
    /// Builds a program from the raw bytes `seccomp_export_bpf` writes
    /// (8 bytes per instruction, native endianness).
    pub fn from_bpf_bytes(bytes: &[u8]) -> io::Result<Self> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(8) || bytes.len() / 8 > u16::MAX as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "BPF program size is not a whole, loadable number of instructions",
            ));
        }
        let insns = bytes
            .chunks_exact(8)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Self { insns })
    }

    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// True for an empty program (never produced by `from_bpf_bytes`).
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }
}

/// A file to show in place of another in the child's own mount namespace
/// (ax's `/etc/hosts`), prepared before `fork`.
#[derive(Debug, Clone)]
pub struct FileOverlay {
    source: CString,
    target: CString,
    /// For an unprivileged caller: a user namespace mapping its own uid
    /// and gid to themselves, which lets it make a mount namespace.
    id_maps: Option<(Vec<u8>, Vec<u8>)>,
}

impl FileOverlay {
    /// Shows `source` at `target`. `user_namespace`: also enter a new user
    /// namespace (needed without `CAP_SYS_ADMIN`), mapping `uid` and `gid`
    /// to themselves.
    pub fn new(
        source: &Path,
        target: &Path,
        user_namespace: bool,
        uid: u32,
        gid: u32,
    ) -> io::Result<Self> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
        };
        Ok(Self {
            source: c(source)?,
            target: c(target)?,
            id_maps: user_namespace.then(|| {
                (
                    format!("{uid} {uid} 1\n").into_bytes(),
                    format!("{gid} {gid} 1\n").into_bytes(),
                )
            }),
        })
    }

    /// In the child: new namespaces, then the bind mount. Returns the
    /// errno of the first step that failed. Async-signal-safe.
    fn apply(&self) -> Result<(), i32> {
        let mut flags = libc::CLONE_NEWNS;
        if self.id_maps.is_some() {
            flags |= libc::CLONE_NEWUSER;
        }
        // SAFETY: unshare takes flags only.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(raw_errno());
        }
        if let Some((uid_map, gid_map)) = &self.id_maps {
            write_proc_file(c"/proc/self/setgroups", b"deny")?;
            write_proc_file(c"/proc/self/uid_map", uid_map)?;
            write_proc_file(c"/proc/self/gid_map", gid_map)?;
        }
        // Mounts made on the host later still reach the program; ours do
        // not leave its namespace.
        // SAFETY: a valid C string and null pointers where mount(2) takes
        // them for a propagation change.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(raw_errno());
        }
        // SAFETY: both paths are C strings prepared before fork.
        let rc = unsafe {
            libc::mount(
                self.source.as_ptr(),
                self.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(raw_errno());
        }
        Ok(())
    }
}

fn raw_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Writes `data` to a /proc file in one `write`. Async-signal-safe.
fn write_proc_file(path: &CStr, data: &[u8]) -> Result<(), i32> {
    // SAFETY: a valid C string; flags only.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(raw_errno());
    }
    // SAFETY: `data` is valid for its length; `fd` was just opened.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = raw_errno();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if n != data.len() as isize {
        return Err(if n < 0 { err } else { libc::EIO });
    }
    Ok(())
}

fn errno() -> io::Error {
    // Reading errno does not allocate; building an io::Error from a raw code
    // does not allocate either.
    io::Error::last_os_error()
}

/// Loads `program` as a seccomp filter on the calling thread with
/// `SECCOMP_FILTER_FLAG_NEW_LISTENER` (and `WAIT_KILLABLE_RECV` where the
/// kernel has it), sends the resulting notification fd over the connected
/// UNIX socket `channel` with `SCM_RIGHTS`, then closes both.
///
/// `no_new_privs` sets `PR_SET_NO_NEW_PRIVS` first, which an unprivileged
/// caller needs. `overlay`, applied before anything else, is best effort:
/// if it fails the program still runs, and the data byte sent with the
/// listener carries the errno (0: applied or not asked for).
///
/// Async-signal-safe: meant for `CommandExt::pre_exec`.
pub fn install_filter_and_send_listener(
    program: &FilterProgram,
    no_new_privs: bool,
    overlay: Option<&FileOverlay>,
    channel: RawFd,
) -> io::Result<()> {
    let overlay_status = match overlay.map(FileOverlay::apply) {
        Some(Err(e)) => e.clamp(1, 255) as u8,
        _ => 0,
    };
    if no_new_privs {
        // SAFETY: prctl with integer arguments only; no memory is passed.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(errno());
        }
    }
    let fprog = libc::sock_fprog {
        len: program.insns.len() as u16,
        filter: program.insns.as_ptr() as *mut libc::sock_filter,
    };
    let base = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    let mut listener = -1;
    for flags in [base | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, base] {
        // SAFETY: `fprog` points at `program.insns`, which outlives the call;
        // the kernel copies the program and does not keep the pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc >= 0 {
            listener = rc as RawFd;
            break;
        }
        let err = errno();
        // Kernels before 5.19 reject the unknown WAIT_KILLABLE_RECV flag.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    if listener < 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let sent = send_fd(channel, listener, overlay_status);
    // SAFETY: closing fds this function owns (the new listener) or was handed
    // for this purpose (the channel); nothing else refers to them here.
    unsafe {
        libc::close(listener);
        libc::close(channel);
    }
    sent
}

/// Sends `fd` with one data byte over `channel`. Async-signal-safe.
fn send_fd(channel: RawFd, fd: RawFd, data: u8) -> io::Result<()> {
    // CMSG_SPACE(sizeof(int)) is 24 on 64-bit Linux and 16 on 32-bit; the
    // u64 array keeps the buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 4];
    let mut byte = [data];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
    // SAFETY: msg_control points at cmsg_buf, which is large and aligned
    // enough for one cmsghdr carrying one int (checked by the size above).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    loop {
        // SAFETY: msg and everything it points to live on this stack frame.
        let rc = unsafe { libc::sendmsg(channel, &msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(());
        }
        let err = errno();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Arranges for `cmd`'s child to load `program` and send its listener over
/// `channel` (see [`install_filter_and_send_listener`]) right before
/// `execve`. The caller keeps `channel` open until `spawn` returns, then
/// closes its copy and receives the listener on the other end.
pub fn arrange_filter_before_exec(
    cmd: &mut std::process::Command,
    program: FilterProgram,
    no_new_privs: bool,
    overlay: Option<FileOverlay>,
    channel: RawFd,
) {
    use std::os::unix::process::CommandExt;
    let hook =
        move || install_filter_and_send_listener(&program, no_new_privs, overlay.as_ref(), channel);
    // SAFETY: the hook only makes raw, async-signal-safe system calls
    // (unshare, open, write, mount, prctl, seccomp, sendmsg, close) on
    // memory prepared before fork, and touches no lock or allocator; that
    // is what pre_exec requires.
    unsafe {
        cmd.pre_exec(hook);
    }
}
