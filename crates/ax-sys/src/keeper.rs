//! A process that shares the daemon's file-descriptor table and outlives
//! it, so that a connection the daemon accepted for a server an instant
//! before being killed is not closed with it.
//!
//! The keeper is cloned with `CLONE_FILES`: every fd the daemon opens or
//! closes is opened or closed in the keeper's table too, at no cost. While
//! the daemon lives the keeper only waits. When the daemon dies (the
//! keeper learns it from `PR_SET_PDEATHSIG`), the table is the keeper's
//! alone: it closes everything except accepted server-side connections of
//! this daemon (a UNIX stream socket named `<prefix>l…` whose peer is
//! unbound, or named `<prefix>c…`), its anchor in its private network
//! namespace (named `<prefix>p`, see [`crate::netns`]), seccomp notify fds
//! and call journals (an OCI container has no launcher to hand them to a
//! successor) — so that the daemon's control socket, its clients'
//! connections and its lock close as they would have — and lingers until a
//! successor has taken those connections (`pidfd_getfd`) and kills it, or
//! for [`LINGER_SECS`].
//!
//! Everything the child runs is raw, async-signal-safe system calls on
//! memory prepared before the clone.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// How long an orphaned keeper waits for a successor.
pub const LINGER_SECS: u32 = 120;

/// The name the keeper shows in `/proc/PID/comm`.
pub const KEEPER_COMM: &str = "ax-fd-keeper";

/// Longest name prefix handled (abstract names are at most 107 bytes).
const MAX_PREFIX: usize = 64;

/// Starts a keeper for this process's fd table. `prefix` is the abstract
/// socket-name prefix of this daemon's sockets (without the leading NUL,
/// e.g. `ax/0123abcd/`). Must be called from the thread that lives as long
/// as the process (the main thread): the keeper is told of its death.
/// Returns the keeper's pid.
pub fn spawn(prefix: &[u8]) -> io::Result<u32> {
    if prefix.is_empty() || prefix.len() > MAX_PREFIX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut name = [0u8; MAX_PREFIX];
    name[..prefix.len()].copy_from_slice(prefix);
    let len = prefix.len();
    // SAFETY: getpid has no arguments.
    let parent = unsafe { libc::getpid() };
    // SAFETY: a raw clone without CLONE_VM works like fork: the child runs
    // on a copy-on-write copy of this thread's memory (including its stack,
    // passed as 0). In the child only `keeper_main` runs, which makes raw,
    // async-signal-safe system calls on the copied `name` and never returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match rc {
        0 => keeper_main(parent, &name[..len]),
        rc if rc < 0 => Err(io::Error::last_os_error()),
        pid => Ok(pid as u32),
    }
}

fn keeper_main(parent: libc::pid_t, prefix: &[u8]) -> ! {
    // SAFETY: every call below is a raw system call on stack memory of this
    // frame or on constants; none allocates or takes a lock.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"ax-fd-keeper".as_ptr(), 0, 0, 0);
        // The daemon's signal handlers write to pipes in the shared table:
        // a signal aimed at the keeper must not look like the daemon's.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1, 0, 0, 0);
        // The daemon may have died before the request above.
        while libc::getppid() == parent {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(&set, &mut info);
        }
        close_all_but_accepted(prefix);
        let pause = libc::timespec {
            tv_sec: LINGER_SECS as libc::time_t,
            tv_nsec: 0,
        };
        libc::nanosleep(&pause, std::ptr::null_mut());
        libc::_exit(0);
    }
}

/// Closes every fd except accepted connections named with `prefix`.
///
/// # Safety
/// Only for the keeper child: it closes fds of the whole (now private)
/// table.
unsafe fn close_all_but_accepted(prefix: &[u8]) {
    // Walk /proc/self/fd with getdents64 into a stack buffer.
    // SAFETY: a constant C string; flags only.
    let dir = unsafe {
        libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off + 19 < n as usize {
            // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type,
            // then the NUL-terminated name.
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 || off + reclen > n as usize {
                break;
            }
            let name = &buf[off + 19..off + reclen];
            let mut fd: i32 = 0;
            let mut digits = 0;
            for &c in name {
                if !c.is_ascii_digit() {
                    break;
                }
                fd = fd.saturating_mul(10).saturating_add((c - b'0') as i32);
                digits += 1;
            }
            if digits > 0
                && fd != dir
                && !is_accepted_connection(fd, prefix)
                && !is_anchor(fd, prefix)
                && !is_kept_file(fd)
            {
                // SAFETY: closing an fd of this (private) table.
                unsafe { libc::close(fd) };
            }
            off += reclen;
        }
    }
    // SAFETY: closing the directory fd opened above.
    unsafe { libc::close(dir) };
}

/// What `readlink /proc/self/fd/N` shows for a seccomp notify fd.
const NOTIFY_FD_LINK: &[u8] = b"anon_inode:seccomp notify";
/// How `readlink /proc/self/fd/N` begins for a call journal
/// ([`crate::journal`]).
const JOURNAL_LINK_PREFIX: &[u8] = b"/memfd:ax-journal";

/// True when `fd` is a seccomp notify fd (`/proc/self/fd/N` links to
/// `anon_inode:seccomp notify`); false when the link cannot be read.
pub fn is_notify_fd(fd: BorrowedFd<'_>) -> bool {
    let mut link = [0u8; 64];
    fd_link(fd.as_raw_fd(), &mut link) == Some(NOTIFY_FD_LINK)
}

/// True when `fd` is a seccomp notify fd or a call journal: what a keeper
/// keeps.
pub fn is_kept(fd: BorrowedFd<'_>) -> bool {
    is_kept_file(fd.as_raw_fd())
}

/// [`is_kept`] of a raw fd. Async-signal-safe: stack buffers and one
/// `readlink`.
fn is_kept_file(fd: i32) -> bool {
    let mut link = [0u8; 64];
    fd_link(fd, &mut link)
        .is_some_and(|link| link == NOTIFY_FD_LINK || link.starts_with(JOURNAL_LINK_PREFIX))
}

/// Where `/proc/self/fd/FD` links to (cut at `buf`'s length), or `None`.
/// Async-signal-safe: stack buffers and one `readlink`.
fn fd_link(fd: i32, buf: &mut [u8; 64]) -> Option<&[u8]> {
    const DIR: &[u8] = b"/proc/self/fd/";
    let mut n = u32::try_from(fd).ok()?;
    // "/proc/self/fd/" + at most 10 digits + NUL.
    let mut path = [0u8; 32];
    path[..DIR.len()].copy_from_slice(DIR);
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        len += 1;
        if n == 0 || len == digits.len() {
            break;
        }
    }
    for i in 0..len {
        path[DIR.len() + i] = digits[len - 1 - i];
    }
    // SAFETY: `path` is NUL-terminated (zeroed past the digits) and `buf`
    // is writable for its length; readlink writes at most that much.
    let n = unsafe {
        libc::readlink(
            path.as_ptr().cast::<libc::c_char>(),
            buf.as_mut_ptr().cast::<libc::c_char>(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.get(..n.min(buf.len()))
}

/// True for a UNIX socket named `\0<prefix>l…` whose peer is unbound (a
/// client socket of the broker, which stays unbound) or `\0<prefix>c…`
/// (one an earlier version bound).
fn is_accepted_connection(fd: i32, prefix: &[u8]) -> bool {
    named(fd, prefix, false, b'l') && (unbound_peer(fd) || named(fd, prefix, true, b'c'))
}

/// True when `fd` is a connected UNIX socket whose peer has no name.
fn unbound_peer(fd: i32) -> bool {
    // SAFETY: sockaddr_un is plain old data; zeroed is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let ptr = (&mut sun as *mut libc::sockaddr_un).cast::<libc::sockaddr>();
    // SAFETY: `sun` and `len` are valid for writing, sized as declared.
    let rc = unsafe { libc::getpeername(fd, ptr, &mut len) };
    rc == 0
        && sun.sun_family == libc::AF_UNIX as libc::sa_family_t
        && len as usize == std::mem::size_of::<libc::sa_family_t>()
}

/// True for the daemon's anchor in its private network namespace: a UNIX
/// socket named `\0<prefix>p`.
fn is_anchor(fd: i32, prefix: &[u8]) -> bool {
    named(fd, prefix, false, b'p')
}

/// True when `fd` is a UNIX socket whose own name (or its peer's, with
/// `peer`) is `\0<prefix><kind>…`.
fn named(fd: i32, prefix: &[u8], peer: bool, kind: u8) -> bool {
    // SAFETY: sockaddr_un is plain old data; zeroed is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let ptr = (&mut sun as *mut libc::sockaddr_un).cast::<libc::sockaddr>();
    // SAFETY: `sun` and `len` are valid for writing, sized as declared.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc != 0 || sun.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return false;
    }
    let path_len = (len as usize).saturating_sub(2);
    let path = &sun.sun_path[..path_len.min(sun.sun_path.len())];
    path.len() > prefix.len() + 1
        && path[0] == 0
        && path[1..=prefix.len()]
            .iter()
            .zip(prefix)
            .all(|(&a, &b)| a as u8 == b)
        && path[prefix.len() + 1] as u8 == kind
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn recognises_accepted_connections_only() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
        let tag = format!("axtest-keeper-{}/", std::process::id());
        let l_name = format!("{tag}l4/1/0.0.0.0/80");
        let c_name = format!("{tag}c4/10.0.0.1/1/10.0.0.2/80");
        let listener =
            UnixListener::bind_addr(&SocketAddr::from_abstract_name(&l_name).unwrap()).unwrap();
        let client = bound_and_connected(&c_name, &l_name);
        let (accepted, _) = listener.accept().unwrap();
        assert!(is_accepted_connection(accepted.as_raw_fd(), tag.as_bytes()));
        // The listener, the client's end, another daemon's connection and
        // an unnamed pair are not.
        assert!(!is_accepted_connection(
            listener.as_raw_fd(),
            tag.as_bytes()
        ));
        assert!(!is_accepted_connection(client.as_raw_fd(), tag.as_bytes()));
        assert!(!is_accepted_connection(accepted.as_raw_fd(), b"ax/other/"));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!is_accepted_connection(a.as_raw_fd(), tag.as_bytes()));
        // The anchor of the private namespace is kept too; nothing else is.
        let anchor =
            UnixListener::bind_addr(&SocketAddr::from_abstract_name(format!("{tag}p")).unwrap())
                .unwrap();
        assert!(is_anchor(anchor.as_raw_fd(), tag.as_bytes()));
        assert!(!is_anchor(listener.as_raw_fd(), tag.as_bytes()));
        assert!(!is_anchor(a.as_raw_fd(), tag.as_bytes()));
    }

    #[test]
    fn keeps_journals_and_notify_fds_only() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_kept_file(a.as_raw_fd()));
        assert!(!is_kept_file(-1));
        assert!(!is_kept_file(i32::MAX));
        let journal = crate::journal::create().unwrap();
        assert!(is_kept_file(journal.as_raw_fd()));
        use std::os::fd::AsFd;
        assert!(is_kept(journal.as_fd()));
        // A journal is kept, but is no notify fd.
        assert!(!is_notify_fd(journal.as_fd()));
        assert!(!is_notify_fd(a.as_fd()));
    }

    /// A UNIX stream socket bound to abstract `name`, connected to abstract
    /// `to`.
    fn bound_and_connected(name: &str, to: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: a plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: the kernel returned it; nobody else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let bind = |n: &str, connect: bool| {
            // SAFETY: sockaddr_un is plain old data.
            let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in n.bytes().enumerate() {
                sun.sun_path[i + 1] = b as libc::c_char;
            }
            let len = (2 + 1 + n.len()) as libc::socklen_t;
            let ptr = (&sun as *const libc::sockaddr_un).cast::<libc::sockaddr>();
            // SAFETY: `sun` is valid for `len` bytes.
            let rc = unsafe {
                if connect {
                    libc::connect(fd, ptr, len)
                } else {
                    libc::bind(fd, ptr, len)
                }
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        };
        bind(name, false);
        bind(to, true);
        owned
    }
}
