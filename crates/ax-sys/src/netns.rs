//! The socket factory: a small child process in a private network namespace
//! that hands the broker fresh `AF_UNIX` sockets, and the namespace ioctls
//! that tell which namespace a socket belongs to.
//!
//! Abstract UNIX names are per network namespace, and a socket's namespace
//! is fixed when it is created: `bind` and `connect` of abstract names use
//! the socket's own namespace, whichever process calls them. A broker that
//! makes every UNIX socket it uses in a namespace no program is in (`P`)
//! binds and connects names there from its own threads, while nothing
//! outside `P` can see those names, connect to them or bind look-alikes.
//!
//! The factory is created with a raw `clone` without `CLONE_VM` (a fork)
//! in a new network namespace (`CLONE_NEWNET`, with `CLONE_NEWUSER` when
//! the caller may not create one in its own user namespace; no id maps are
//! needed to create sockets), or joins an existing one with `setns`. The
//! caller is multithreaded, so the child runs only raw, async-signal-safe
//! system calls on memory prepared before the clone. It answers each
//! request (a native-endian `u32` count) on a `SOCK_SEQPACKET` socketpair
//! with one message: a native-endian `i32` (the number of sockets, or a
//! negative errno) and that many sockets as `SCM_RIGHTS`. It exits when
//! its end of the pair reads end-of-file.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The name the factory shows in `/proc/PID/comm`.
pub const FACTORY_COMM: &str = "ax-sockets";

/// Most sockets sent in one answer.
pub const MAX_BATCH: usize = 250;

/// `SIOCGSKNS` (linux/sockios.h): an fd for a socket's network namespace.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Where the factory's network namespace comes from.
#[derive(Debug, Clone, Copy)]
pub enum Namespace<'a> {
    /// A new, empty one.
    New,
    /// An existing one (`netns`), owned by the user namespace `userns`
    /// when that is not the caller's own.
    Join {
        /// The user namespace to enter first, if not the caller's.
        userns: Option<BorrowedFd<'a>>,
        /// The network namespace.
        netns: BorrowedFd<'a>,
    },
}

/// A running factory: its pid and the broker's end of its channel.
#[derive(Debug)]
pub struct Factory {
    /// The child's pid (the caller's child: reap it).
    pub pid: u32,
    /// A `SOCK_SEQPACKET` socket: write a `u32` count, read the answer.
    pub channel: OwnedFd,
}

fn fd_result(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The network namespace of the socket `sock`, as an nsfs fd
/// (`ioctl(SIOCGSKNS)`, see
/// [socket(7)](https://man7.org/linux/man-pages/man7/socket.7.html)).
///
/// # Errors
/// `EPERM` when the caller lacks `CAP_NET_ADMIN` over that namespace's
/// owner (a namespace the caller did not create, for a rootless caller);
/// `ENOTTY`/`EINVAL` for an fd that is not a socket.
pub fn socket_netns(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS as _, 0usize) };
    fd_result(libc::c_long::from(rc))
}

/// `SO_NETNS_COOKIE` (asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace of the socket `sock`
/// (`getsockopt(SO_NETNS_COOKIE)`): a 64-bit number unique to that
/// namespace and never reused while the system runs. One call, no fd, and no
/// privilege needed, unlike [`socket_netns`].
///
/// # Errors
/// `ENOPROTOOPT` on a kernel older than 5.14; `ENOTSOCK` for an fd that is
/// not a socket.
pub fn netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: getsockopt writes at most `len` (8) bytes into `cookie`, a
    // live, owned u64, and `len` into a live, owned socklen_t.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The user namespace that owns the namespace `ns` (`ioctl(NS_GET_USERNS)`,
/// see [ioctl_ns(2)](https://man7.org/linux/man-pages/man2/ioctl_ns.2.html)).
///
/// # Errors
/// `EPERM` when that user namespace is outside the caller's.
pub fn namespace_owner(ns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: NS_GET_USERNS takes no argument and returns a new fd.
    let rc = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_USERNS as _, 0usize) };
    fd_result(libc::c_long::from(rc))
}

/// Starts a socket factory in `ns`. Waits for the child's first message,
/// which says whether it got into the namespace.
///
/// # Errors
/// The `clone` errno for a new namespace (`EPERM`: no right to create one;
/// `ENOSPC`: the user-namespace limit is 0), the `setns` errno when
/// joining, `ETIMEDOUT` when the child does not answer.
pub fn spawn_factory(ns: Namespace<'_>) -> io::Result<Factory> {
    let mut pair = [0 as RawFd; 2];
    // SAFETY: `pair` is writable for two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair just returned both fds; nobody else owns them.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let pid = match ns {
        Namespace::New => {
            match clone_child(libc::CLONE_NEWNET, theirs.as_raw_fd(), None) {
                Ok(pid) => pid,
                // No CAP_SYS_ADMIN here: a user namespace of our own grants it.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => clone_child(
                    libc::CLONE_NEWUSER | libc::CLONE_NEWNET,
                    theirs.as_raw_fd(),
                    None,
                )?,
                Err(e) => return Err(e),
            }
        }
        Namespace::Join { userns, netns } => {
            let user = userns.map_or(-1, |u| u.as_raw_fd());
            clone_child(0, theirs.as_raw_fd(), Some((user, netns.as_raw_fd())))?
        }
    };
    drop(theirs);
    let factory = Factory { pid, channel: ours };
    // The first message: 0, or the negative errno of a failed setns.
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: `timeout` is a valid timeval for the option's size.
    unsafe {
        libc::setsockopt(
            factory.channel.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            socklen_of::<libc::timeval>(),
        )
    };
    let mut status = [0u8; 4];
    // SAFETY: `status` is writable for its length.
    let n = unsafe {
        libc::recv(
            factory.channel.as_raw_fd(),
            status.as_mut_ptr().cast(),
            status.len(),
            0,
        )
    };
    let failure = if n == 4 {
        match i32::from_ne_bytes(status) {
            0 => None,
            e => Some(io::Error::from_raw_os_error(e.saturating_neg())),
        }
    } else if n < 0 {
        let e = io::Error::last_os_error();
        Some(match e.raw_os_error() {
            Some(libc::EAGAIN) => io::Error::from_raw_os_error(libc::ETIMEDOUT),
            _ => e,
        })
    } else {
        Some(io::Error::from_raw_os_error(libc::ECHILD))
    };
    if let Some(e) = failure {
        reap(factory);
        return Err(e);
    }
    Ok(factory)
}

/// Ends a factory: closes its channel (it exits on end-of-file) and waits
/// for it.
pub fn reap(factory: Factory) {
    let Factory { pid, channel } = factory;
    drop(channel);
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: a signal to our own child, which may already have exited.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is writable.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// Clones the factory child with `flags` (namespaces), giving it `channel`
/// and, to join, `(userns or -1, netns)`.
fn clone_child(
    flags: libc::c_int,
    channel: RawFd,
    join: Option<(RawFd, RawFd)>,
) -> io::Result<u32> {
    let flags = libc::c_ulong::try_from(flags | libc::SIGCHLD)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a raw clone without CLONE_VM works like fork: the child runs
    // on a copy-on-write copy of this thread's memory (including its stack,
    // passed as 0). In the child only `factory_main` runs, which makes raw,
    // async-signal-safe system calls on its stack and never returns.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match rc {
        0 => factory_main(channel, join),
        rc if rc < 0 => Err(io::Error::last_os_error()),
        pid => u32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// The errno of the last failed call, negated.
fn neg_errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { -*libc::__errno_location() }
}

fn factory_main(channel: RawFd, join: Option<(RawFd, RawFd)>) -> ! {
    // SAFETY: every call below is a raw system call (or libc's thin wrapper
    // of one) on stack memory of this frame or on constants; none allocates
    // or takes a lock, as a child of a multithreaded process requires.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"ax-sockets".as_ptr(), 0, 0, 0);
        // The daemon's handlers write to fds this child closes: signals
        // aimed at it act as on any process.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut status: i32 = 0;
        if let Some((user, net)) = join {
            if user >= 0 && libc::setns(user, libc::CLONE_NEWUSER) != 0 {
                status = neg_errno();
            }
            if status == 0 && libc::setns(net, libc::CLONE_NEWNET) != 0 {
                status = neg_errno();
            }
        }
        // Nothing of the daemon's stays open here, its end of the channel
        // included: the channel then ends with the daemon.
        let ch = libc::c_uint::try_from(channel).unwrap_or(0);
        let closed = (ch == 0 || libc::syscall(libc::SYS_close_range, 0u32, ch - 1, 0u32) == 0)
            && libc::syscall(libc::SYS_close_range, ch + 1, libc::c_uint::MAX, 0u32) == 0;
        if !closed {
            for fd in 0..65536 {
                if fd != channel {
                    libc::close(fd);
                }
            }
        }
        let bytes = status.to_ne_bytes();
        libc::send(
            channel,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        );
        if status != 0 {
            libc::_exit(1);
        }
        serve(channel)
    }
}

/// Answers requests until the channel ends.
///
/// # Safety
/// Only for the factory child.
unsafe fn serve(channel: RawFd) -> ! {
    const SPACE: usize = (MAX_BATCH * 4 + 64) / 8;
    let mut fds = [0 as RawFd; MAX_BATCH];
    // u64 for the alignment cmsghdr needs.
    let mut control = [0u64; SPACE];
    loop {
        let mut req = [0u8; 4];
        // SAFETY: `req` is writable for its length.
        let n = unsafe { libc::recv(channel, req.as_mut_ptr().cast(), req.len(), 0) };
        if n != 4 {
            // SAFETY: ends this child.
            unsafe { libc::_exit(0) };
        }
        let want = usize::try_from(u32::from_ne_bytes(req))
            .unwrap_or(MAX_BATCH)
            .min(MAX_BATCH);
        let mut made = 0usize;
        let mut failure = 0i32;
        while made < want {
            // SAFETY: integer arguments only.
            let fd = unsafe {
                libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                failure = neg_errno();
                break;
            }
            fds[made] = fd;
            made += 1;
        }
        let count = if made > 0 {
            i32::try_from(made).unwrap_or(0)
        } else if failure != 0 {
            failure
        } else {
            -libc::EINVAL
        };
        let head = count.to_ne_bytes();
        let mut iov = libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        };
        // SAFETY: msghdr is plain old data; zeroed is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let data_len = u32::try_from(made * std::mem::size_of::<RawFd>()).unwrap_or(0);
        if made > 0 {
            // SAFETY: CMSG_SPACE is arithmetic on its argument.
            let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space.min(std::mem::size_of_val(&control)) as _;
            // SAFETY: `msg` points at `control`, large enough for one
            // header and MAX_BATCH fds; the header and data pointers stay
            // inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    made * std::mem::size_of::<RawFd>(),
                );
            }
        }
        // SAFETY: `msg` describes `head` and `control`, both live.
        let sent = unsafe { libc::sendmsg(channel, &msg, libc::MSG_NOSIGNAL) };
        for &fd in &fds[..made] {
            // SAFETY: closing our own copies; the receiver has its own.
            unsafe { libc::close(fd) };
        }
        if sent < 0 {
            // SAFETY: ends this child.
            unsafe { libc::_exit(0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn request(f: &Factory, n: u32) -> (i32, Vec<OwnedFd>) {
        let req = n.to_ne_bytes();
        // SAFETY: `req` is readable for its length.
        let rc = unsafe { libc::send(f.channel.as_raw_fd(), req.as_ptr().cast(), 4, 0) };
        assert_eq!(rc, 4);
        let mut head = [0u8; 4];
        let mut control = [0u64; 160];
        let mut iov = libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: 4,
        };
        // SAFETY: plain old data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` describes live buffers.
        let n = unsafe { libc::recvmsg(f.channel.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        assert_eq!(n, 4);
        let count = i32::from_ne_bytes(head);
        let mut out = Vec::new();
        // SAFETY: walking the control data the kernel wrote.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if !cmsg.is_null() {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..usize::try_from(count).unwrap_or(0) {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
        }
        (count, out)
    }

    #[test]
    fn factory_sockets_live_in_another_namespace() {
        let Ok(f) = spawn_factory(Namespace::New) else {
            eprintln!("no private namespace here; skipped");
            return;
        };
        let (count, socks) = request(&f, 3);
        assert_eq!(count, 3);
        assert_eq!(socks.len(), 3);
        let ns_ino = |fd: BorrowedFd<'_>| {
            let ns = socket_netns(fd).unwrap();
            std::fs::metadata(format!("/proc/self/fd/{}", ns.as_raw_fd()))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap()
        };
        let own = std::fs::metadata("/proc/self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let p = ns_ino(socks[0].as_fd());
        assert_ne!(p, own);
        assert_eq!(ns_ino(socks[2].as_fd()), p);
        // A second factory joins the same namespace.
        let netns = socket_netns(socks[0].as_fd()).unwrap();
        let owner = namespace_owner(netns.as_fd()).unwrap();
        let own_user = std::fs::metadata("/proc/self/ns/user")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let owner_ino = std::fs::metadata(format!("/proc/self/fd/{}", owner.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let userns = (owner_ino != own_user).then(|| owner.as_fd());
        let g = spawn_factory(Namespace::Join {
            userns,
            netns: netns.as_fd(),
        })
        .unwrap();
        let (_, more) = request(&g, 1);
        assert_eq!(ns_ino(more[0].as_fd()), p);
        reap(f);
        reap(g);
    }
}
