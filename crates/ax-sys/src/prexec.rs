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

/// The program's own view of the file system, prepared before `fork`: a
/// mount namespace of its own in which ax's hosts file is shown, read-only,
/// as `/etc/hosts`, and the daemon's directory (control socket, state,
/// keeper record, the hosts file's source) is covered by an empty,
/// read-only tmpfs.
#[derive(Debug, Clone)]
pub struct FileOverlay {
    /// `(source, target)` of the read-only bind mount.
    file: Option<(CString, CString)>,
    /// A directory to cover with an empty, read-only tmpfs.
    hide: Option<CString>,
    /// For an unprivileged caller: a user namespace mapping its own uid
    /// and gid to themselves, which lets it make a mount namespace.
    id_maps: Option<(Vec<u8>, Vec<u8>)>,
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
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
        Self::namespace_only(user_namespace, uid, gid).showing(source, target)
    }

    /// A mount namespace (and, with `user_namespace`, a user namespace
    /// mapping `uid` and `gid` to themselves) and nothing mounted in it yet.
    pub fn namespace_only(user_namespace: bool, uid: u32, gid: u32) -> Self {
        Self {
            file: None,
            hide: None,
            id_maps: user_namespace.then(|| {
                (
                    format!("{uid} {uid} 1\n").into_bytes(),
                    format!("{gid} {gid} 1\n").into_bytes(),
                )
            }),
        }
    }

    /// Also shows `source` at `target`, read-only.
    pub fn showing(mut self, source: &Path, target: &Path) -> io::Result<Self> {
        self.file = Some((c_path(source)?, c_path(target)?));
        Ok(self)
    }

    /// Also covers directory `dir` with an empty, read-only tmpfs (after
    /// the file is shown, so `source` may lie inside it). Without
    /// capabilities in its namespaces, the program cannot unmount it, and
    /// namespaces it makes itself inherit it locked.
    pub fn hiding(mut self, dir: &Path) -> io::Result<Self> {
        self.hide = Some(c_path(dir)?);
        Ok(self)
    }

    /// In the child: new namespaces, then the mounts. Returns the errno of
    /// the first step that failed. Async-signal-safe.
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
        mount(None, c"/", None, libc::MS_REC | libc::MS_SLAVE, None)?;
        if let Some((source, target)) = &self.file {
            mount(Some(source), target, None, libc::MS_BIND, None)?;
            // A bind mount takes the read-only flag only from a remount.
            // In a user namespace the flags the source mount has locked
            // (nosuid, nodev, noexec) must be kept.
            let locked = statvfs_flags(target)?;
            mount(
                None,
                target,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | locked,
                None,
            )?;
        }
        if let Some(dir) = &self.hide {
            // A working directory inside `dir` would still reach what lies
            // under the tmpfs: walk to it again by name afterwards.
            let mut cwd = [0u8; 4096];
            // SAFETY: the buffer is ours and its length is passed.
            let have_cwd = !unsafe { libc::getcwd(cwd.as_mut_ptr().cast(), cwd.len()) }.is_null();
            mount(
                Some(c"ax"),
                dir,
                Some(c"tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"mode=0555,size=4k"),
            )?;
            if have_cwd {
                // SAFETY: getcwd wrote a NUL-terminated path into `cwd`.
                if unsafe { libc::chdir(cwd.as_ptr().cast()) } != 0 {
                    // It was inside `dir`: the program starts in the
                    // empty tmpfs instead.
                    // SAFETY: a valid C string.
                    if unsafe { libc::chdir(dir.as_ptr()) } != 0 {
                        return Err(raw_errno());
                    }
                }
            }
        }
        Ok(())
    }
}

/// `mount(2)` with C strings prepared before fork. Async-signal-safe.
fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), i32> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is a valid C string or null, where mount(2)
    // accepts null (source and type for a remount or a propagation
    // change, data for none).
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    if rc != 0 {
        return Err(raw_errno());
    }
    Ok(())
}

/// The mount flags of `path` that a remount must repeat (`MS_NOSUID`,
/// `MS_NODEV`, `MS_NOEXEC`, and the atime flags). Async-signal-safe.
fn statvfs_flags(path: &CStr) -> Result<libc::c_ulong, i32> {
    // SAFETY: statvfs is plain old data; all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct we own for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(raw_errno());
    }
    let keep = libc::ST_NOSUID
        | libc::ST_NODEV
        | libc::ST_NOEXEC
        | libc::ST_NOATIME
        | libc::ST_NODIRATIME
        | libc::ST_RELATIME;
    let f = st.f_flag & keep;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
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
/// caller needs. `overlay` is applied before anything else; if it fails,
/// no filter is loaded, the data byte sent (without a listener) carries
/// the errno, and the caller must not let the program run.
///
/// Async-signal-safe: meant for `CommandExt::pre_exec`.
pub fn install_filter_and_send_listener(
    program: &FilterProgram,
    no_new_privs: bool,
    overlay: Option<&FileOverlay>,
    channel: RawFd,
) -> io::Result<()> {
    if let Some(Err(e)) = overlay.map(FileOverlay::apply) {
        // The program must not run outside its own view of the file
        // system: say why, and let `execve` never happen.
        let status = u8::try_from(e.clamp(1, 255)).unwrap_or(u8::MAX);
        let sent = send_byte(channel, status);
        // SAFETY: closing the channel this function was handed.
        unsafe { libc::close(channel) };
        sent?;
        return Err(io::Error::from_raw_os_error(e));
    }
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
    let sent = send_fd(channel, listener, 0);
    // SAFETY: closing fds this function owns (the new listener) or was handed
    // for this purpose (the channel); nothing else refers to them here.
    unsafe {
        libc::close(listener);
        libc::close(channel);
    }
    sent
}

/// Sends one data byte, and no fd, over `channel`. Async-signal-safe.
fn send_byte(channel: RawFd, data: u8) -> io::Result<()> {
    let byte = [data];
    loop {
        // SAFETY: `byte` lives on this stack frame for the call.
        let rc = unsafe { libc::send(channel, byte.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(());
        }
        let err = errno();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
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
