//! One handler per trapped system call, and what they share.
//!
//! A handler reads like the call's man page: inputs, decision, effect. It
//! returns an [`Outcome`]; calls that may block (a blocking accept, an
//! egress connect on a blocking socket, a connect to a full backlog) are
//! finished on a helper thread by [`defer`], so the receive loop never
//! waits on the network.
//!
//! # Failing closed
//!
//! `CONTINUE` hands a call back to the kernel, which would run it on an IP
//! socket as if ax were not there. A handler answers it only where it has
//! decided that the kernel's answer is the right one (a socket that is not
//! ax's, a loopback bind), never because the broker could not look: when
//! the broker lacks a resource to inspect or answer a call, the call fails
//! with the errno the kernel gives under that shortage:
//!
//! | the broker got | the call fails with |
//! |---|---|
//! | `EMFILE`, `ENFILE`, `ENOBUFS` (no fd, no buffer) | `ENOBUFS` |
//! | `ENOMEM` | `ENOMEM` |
//! | `EPERM`, `EACCES` (cannot reach into the program) | `EPERM` |
//! | a quota of the app hit (see `crate::appstate`) | `ENOBUFS` |
//! | a helper thread not available | `ENOBUFS` |
//! | a handler panicked | `EIO` |
//!
//! Only a program that is gone (its call no longer valid) gets no answer.

pub(crate) mod accept;
mod bind;
mod caller;
mod carry;
mod classify;
mod client;
mod connect;
mod connect_wait;
mod egress;
mod localhost;
mod remote;
pub(crate) mod restrict;
mod send;
mod sockname;
mod sockopt;
mod udp;

use crate::serve::{respond, Shared};
use crate::target::{Errno, PidfdCache, Target};
use ax_registry::{AppId, ResolveError, UnixEndpoint};
use ax_sys::journal::Journal;
use ax_sys::{Notification, NotifyFd};
pub(crate) use classify::{
    classify, classify_expecting, known_conn, not_a_socket, own_name, peer_ident, peer_is_client,
    Expect, KnownConn, Sock,
};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// How a trapped call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Return this value.
    Value(i64),
    /// Fail with this errno.
    Errno(Errno),
    /// Let the kernel run the call unchanged.
    Continue,
    /// Already answered (by `ADDFD_FLAG_SEND`), or nobody waits any more.
    Answered,
    /// Handed to a helper thread, which answers later.
    Deferred,
}

impl From<Result<Outcome, Errno>> for Outcome {
    fn from(r: Result<Outcome, Errno>) -> Self {
        r.unwrap_or_else(Outcome::Errno)
    }
}

/// One trapped call and what answering it needs.
pub(crate) struct Call<'a> {
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) app: AppId,
    pub(crate) listener: &'a Arc<NotifyFd>,
    /// Where received, unanswered calls are recorded (see `ax_sys::journal`).
    pub(crate) journal: &'a Option<Arc<Journal>>,
    /// Where accepted connections wait while they are installed.
    pub(crate) stash: &'a Option<Arc<crate::Stash>>,
    /// What the broker keeps for this app, and its quotas.
    pub(crate) state: &'a Arc<crate::appstate::AppState>,
    /// The call was received by an earlier daemon that died before
    /// answering: part of it may already be done.
    pub(crate) replay: bool,
    /// Where a blocking accept waits, in the app's receive loop (`None` on
    /// helper threads, which wait themselves): `Some` exactly when the call
    /// runs on the receive loop, where nothing may wait.
    pub(crate) parking: Option<&'a std::cell::RefCell<Vec<accept::Parked>>>,
    pub(crate) notif: Notification,
    /// What the fdinfo of the call's fd (argument 0) said, once read (see
    /// [`Call::fd_info`]).
    pub(crate) fd_info: std::cell::OnceCell<Option<crate::target::FdInfo>>,
}

impl Call<'_> {
    /// True on the app's receive loop: a wait here holds up every trapped
    /// call of the app, so a handler that must wait defers (see [`defer`]).
    pub(crate) fn on_receive_loop(&self) -> bool {
        self.parking.is_some()
    }

    pub(crate) fn arg(&self, i: usize) -> u64 {
        self.notif.args[i]
    }

    /// Argument `i` of C type `int`: the kernel reads its low 32 bits only.
    pub(crate) fn int_arg(&self, i: usize) -> i32 {
        self.notif.args[i] as u32 as i32
    }

    /// True while the target still waits for this answer.
    pub(crate) fn still_valid(&self) -> bool {
        self.listener.id_valid(self.notif.id)
    }

    /// Fails with `ENOENT`-like silence when the target went away: the
    /// answer would go nowhere.
    pub(crate) fn check_valid(&self) -> Result<(), Errno> {
        if self.still_valid() {
            Ok(())
        } else {
            Err(libc::ENOENT)
        }
    }

    /// The fdinfo of the call's fd (argument 0 of every socket call),
    /// read once per call: a handler that looks the fd up by its inode and
    /// then needs its flags reads the file once.
    pub(crate) fn fd_info(&self, target: &Target) -> Option<crate::target::FdInfo> {
        *self.fd_info.get_or_init(|| target.fd_info(self.arg(0)))
    }

    pub(crate) fn instance(&self) -> u32 {
        self.shared.config.instance
    }
}

/// Routes a notification to its handler.
pub(crate) fn handle(call: &Call<'_>, pidfds: &mut PidfdCache) -> Outcome {
    let nr = call.notif.nr as libc::c_long;
    let target = match pidfds.target(call.notif.pid) {
        Ok(t) => t,
        // Never CONTINUE: the kernel would run the call on the IP socket.
        Err(e) => return inaccessible(call, crate::target::errno_of(&e)),
    };
    target.tie(call.listener, call.notif.id);
    let outcome = match nr {
        libc::SYS_bind => bind::handle(call, &target),
        libc::SYS_connect => connect::handle(call, &target),
        libc::SYS_accept => accept::handle(call, &target, false),
        libc::SYS_accept4 => accept::handle(call, &target, true),
        libc::SYS_getsockname => sockname::handle(call, &target, false),
        libc::SYS_getpeername => sockname::handle(call, &target, true),
        libc::SYS_setsockopt => sockopt::handle_set(call, &target),
        libc::SYS_getsockopt => sockopt::handle_get(call, &target),
        libc::SYS_sendto => send::handle_sendto(call, &target),
        libc::SYS_sendmsg => send::handle_sendmsg(call, &target),
        libc::SYS_sendmmsg => send::handle_sendmmsg(call, &target),
        libc::SYS_landlock_restrict_self | libc::SYS_seccomp | libc::SYS_prctl => {
            restrict::handle(call)
        }
        _ => Outcome::Continue,
    };
    pidfds.settle(&target);
    if let Outcome::Errno(e) = outcome {
        tracing::trace!(app = call.app, nr, errno = e, "answered with an error");
    }
    outcome
}

/// The broker could not reach into the target (its fd, its memory), for
/// the reason `errno` gives. The call must not fall through to the kernel,
/// where a virtual address would be routed: it fails (see the module docs
/// for the errno), or gets no answer if the program is gone.
pub(crate) fn inaccessible(call: &Call<'_>, errno: Errno) -> Outcome {
    let (app, pid) = (call.app, call.notif.pid);
    if !call.still_valid() {
        tracing::debug!(
            app,
            pid,
            errno,
            "the program exited before its call was answered"
        );
        return Outcome::Answered;
    }
    let answer = shortage_errno(errno);
    crate::metrics::error(crate::metrics::ErrorKind::Inaccessible);
    if !log_allowed() {
        return Outcome::Errno(answer);
    }
    match errno {
        libc::EPERM | libc::EACCES => tracing::warn!(
            app,
            pid,
            errno,
            "cannot inspect the program's socket: permission denied (a non-dumpable or \
             set-uid program, or kernel.yama.ptrace_scope >= 1 with a rootless daemon); \
             failing the call with EPERM"
        ),
        libc::EMFILE | libc::ENFILE => tracing::warn!(
            app,
            pid,
            errno,
            "cannot inspect the program's socket: the daemon is out of file descriptors; \
             failing the call with ENOBUFS"
        ),
        libc::ENOMEM | libc::ENOBUFS => tracing::warn!(
            app,
            pid,
            errno,
            "cannot inspect the program's socket: the daemon is out of memory; failing the \
             call with {}",
            if answer == libc::ENOMEM {
                "ENOMEM"
            } else {
                "ENOBUFS"
            }
        ),
        libc::ESRCH | libc::ENOENT => tracing::warn!(
            app,
            pid,
            errno,
            "cannot inspect the program's socket: its process or thread is gone (ESRCH) \
             though its call still waits; failing the call with EPERM"
        ),
        _ => tracing::warn!(
            app,
            pid,
            errno,
            "cannot inspect the program's socket; failing the call with EPERM"
        ),
    }
    Outcome::Errno(answer)
}

/// The errno a call fails with when the broker got `errno` trying to serve
/// it (see the module docs).
pub(crate) fn shortage_errno(errno: Errno) -> Errno {
    match errno {
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS => libc::ENOBUFS,
        libc::ENOMEM => libc::ENOMEM,
        _ => libc::EPERM,
    }
}

/// At most one warning a second about calls the broker could not inspect:
/// a shortage fails many calls at once.
fn log_allowed() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.swap(now, Ordering::Relaxed) != now
}

/// The answer to a call whose fd argument could not be classified:
/// `EBADF` (no such fd in the program) is the kernel's own answer, anything
/// else a failure to look (see [`inaccessible`]).
pub(crate) fn fd_error(call: &Call<'_>, errno: Errno) -> Outcome {
    if errno == libc::EBADF {
        Outcome::Errno(libc::EBADF)
    } else {
        inaccessible(call, errno)
    }
}

/// Opens the target again, from a helper thread or a parked call: `Err`
/// carries the answer when it cannot be (nothing for a program that is
/// gone, an errno for a shortage).
pub(crate) fn reopen(call: &Call<'_>) -> Result<Target, Outcome> {
    Target::for_call(call.notif.pid, call.listener, call.notif.id)
        .map_err(|e| inaccessible(call, crate::target::errno_of(&e)))
}

/// The inode of a socket: the key of what the broker remembers about it,
/// shared by every `dup` and `fork` of it.
pub(crate) fn inode(fd: &OwnedFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

/// State of a swapped socket that its name cannot carry is kept with its
/// remembered options, under a level no trapped call can name (the filter
/// traps the TCP, IP, IPv6 and socket levels only).
const STATE_LEVEL: i32 = -1;
/// "Told `EINPROGRESS`, not connected again since": `[1]`, else `[0]`.
pub(crate) const STATE_CONNECT_IN_PROGRESS: i32 = 1;

/// The key under which `what` is kept for the socket with `inode`.
pub(crate) fn state_key_of(inode: u64, what: i32) -> crate::appstate::OptionKey {
    (inode, STATE_LEVEL, what)
}

/// The socket address of an endpoint.
pub(crate) fn endpoint_addr(ep: &UnixEndpoint) -> Result<SocketAddrUnix, Errno> {
    match ep {
        UnixEndpoint::Abstract(name) => SocketAddrUnix::new_abstract_name(name),
        UnixEndpoint::Path(p) => SocketAddrUnix::new(p.as_path()),
    }
    .map_err(|e| e.raw_os_error())
}

/// True while a listener holds `ep`. An abstract name is free again the
/// moment its last socket closes, so a probe bind (in the broker's private
/// namespace, where its listeners are) tells.
pub(crate) fn endpoint_alive(shared: &Shared, ep: &UnixEndpoint) -> bool {
    match ep {
        UnixEndpoint::Abstract(_) => {
            endpoint_addr(ep).map_or(true, |addr| shared.sockets.name_taken(&addr))
        }
        UnixEndpoint::Path(p) => p.exists(),
    }
}

/// Counts and logs an answer the kernel refused for `n`, unless it was
/// refused because nobody waits for it any more (`ENOENT`: the caller
/// died or was interrupted meanwhile).
pub(crate) fn note_answer_failure(n: &Notification, e: &std::io::Error) {
    if e.raw_os_error() != Some(libc::ENOENT) {
        crate::metrics::error(crate::metrics::ErrorKind::AnswerFailed);
        tracing::warn!(id = n.id, nr = n.nr, error = %e, "answering a trapped call failed");
    }
}

/// Copies the receive and send timeouts (`SO_RCVTIMEO`, `SO_SNDTIMEO`)
/// the program set on its socket `from` to the replacement `to`: socket-level
/// options run natively, so those set before the swap are on `from` only.
/// A listener's receive timeout bounds its blocking accepts.
pub(crate) fn copy_timeouts(from: &OwnedFd, to: &OwnedFd) {
    use rustix::net::sockopt::{set_socket_timeout, socket_timeout, Timeout};
    for which in [Timeout::Recv, Timeout::Send] {
        if let Ok(Some(t)) = socket_timeout(from, which) {
            let _ = set_socket_timeout(to, which, Some(t));
        }
    }
}

/// Copies `O_NONBLOCK` from the target's file to the replacement.
pub(crate) fn copy_nonblock(from: &OwnedFd, to: &OwnedFd) -> Result<bool, Errno> {
    use rustix::fs::OFlags;
    let flags = rustix::fs::fcntl_getfl(from).map_err(|e| e.raw_os_error())?;
    let nonblocking = flags.contains(OFlags::NONBLOCK);
    set_nonblock(to, nonblocking)?;
    Ok(nonblocking)
}

/// Whether a swapped socket listens. A UNIX socket, once listening,
/// listens until it closes (`shutdown` leaves it listening, and a stream
/// socket's `connect` fails on it), so a socket seen listening is known by
/// its cookie after (see `Sockets::known_listening`): the accept path asks
/// the kernel once per listener, not once per call.
pub(crate) fn listens(shared: &Shared, fd: &OwnedFd, cookie: Option<u64>) -> bool {
    if cookie.is_some_and(|c| shared.sockets.known_listening(c)) {
        return true;
    }
    let listening = rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false);
    if let (true, Some(c)) = (listening, cookie) {
        shared.sockets.remember_listening(c);
    }
    listening
}

pub(crate) fn set_nonblock(fd: &OwnedFd, on: bool) -> Result<(), Errno> {
    use rustix::fs::OFlags;
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| e.raw_os_error())?;
    let want = if on {
        flags | OFlags::NONBLOCK
    } else {
        flags - OFlags::NONBLOCK
    };
    if want != flags {
        rustix::fs::fcntl_setfl(fd, want).map_err(|e| e.raw_os_error())?;
    }
    Ok(())
}

pub(crate) fn is_nonblocking(fd: &OwnedFd) -> bool {
    rustix::fs::fcntl_getfl(fd)
        .map(|f| f.contains(rustix::fs::OFlags::NONBLOCK))
        .unwrap_or(false)
}

/// Installs `new` over the target's fd `fd_arg` (same number), keeping its
/// close-on-exec flag, and answers 0.
pub(crate) fn install_over(
    call: &Call<'_>,
    target: &Target,
    fd_arg: u64,
    new: &OwnedFd,
) -> Outcome {
    install_over_with(call, fd_arg, new, target.fd_cloexec(fd_arg))
}

/// [`install_over`] with the program fd's close-on-exec flag known.
pub(crate) fn install_over_with(
    call: &Call<'_>,
    fd_arg: u64,
    new: &OwnedFd,
    cloexec: bool,
) -> Outcome {
    match call.listener.add_fd(
        call.notif.id,
        new.as_fd(),
        Some(crate::target::fd_number(fd_arg)),
        cloexec,
        false,
    ) {
        Ok(_) => Outcome::Value(0),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::EINPROGRESS) => Outcome::Answered,
            Some(errno) => Outcome::Errno(errno),
            None => Outcome::Errno(libc::EIO),
        },
    }
}

/// Writes a socket address to the target as `move_addr_to_user` does, in
/// its order: reads the buffer length at `len_ptr`; unless it is negative,
/// stores the full length back *first*; then copies at most that many
/// bytes of `bytes` to `addr_ptr` (nothing, and no access, for length 0).
/// A negative length is `EINVAL`, any unreachable byte `EFAULT`.
pub(crate) fn write_sockaddr(
    target: &Target,
    addr_ptr: u64,
    len_ptr: u64,
    bytes: &[u8],
) -> Result<(), Errno> {
    let full = bytes.len() as i32;
    // The write's own check that the call is pending covers this read.
    let len = target.read_int_unverified(len_ptr)?.min(full);
    let n = usize::try_from(len).map_err(|_| libc::EINVAL)?;
    // The length, then the address, as the kernel copies them: one write.
    target.write_parts(&[(len_ptr, &full.to_ne_bytes()), (addr_ptr, &bytes[..n])])
}

/// Finishes a call on a helper thread, for work that may block. The app's
/// quota of helpers, or the pool, exhausted: `ENOBUFS`. Calls a previous
/// daemon left unanswered are exempt from the quota (they are as many as
/// the program had waiting, e.g. one per thread blocked in `accept`). A
/// panic in `work` answers `EIO`.
pub(crate) fn defer<F>(call: &Call<'_>, work: F) -> Outcome
where
    F: FnOnce(&Call<'_>) -> Outcome + Send + 'static,
{
    let permit = if call.replay {
        None
    } else {
        match call.state.helpers.take() {
            Some(p) => Some(p),
            None => return Outcome::Errno(libc::ENOBUFS),
        }
    };
    let owned = crate::serve::OwnedAppLink::of(call);
    let (notif, replay) = (call.notif, call.replay);
    let spawned = call.shared.pool.spawn(Box::new(move || {
        let _permit = permit;
        let link = owned.link();
        let call = link.call(notif, replay, None);
        let outcome = crate::serve::unwind_to_errno(&notif, || work(&call));
        respond(link.listener, link.journal, &notif, outcome);
    }));
    match spawned {
        Ok(_) => Outcome::Deferred,
        Err(_) => Outcome::Errno(libc::ENOBUFS),
    }
}

/// The IP address and port an IP socket is bound to.
pub(crate) fn inet_name(fd: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
}

/// A broker TCP socket bound to a free port on 127.0.0.1, and that address.
pub(crate) fn loopback_port() -> Result<(OwnedFd, SocketAddr), Errno> {
    let sock = tcp_socket(false)?;
    rustix::net::bind(&sock, &SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| e.raw_os_error())?;
    let here = inet_name(&sock).ok_or(libc::EIO)?;
    Ok((sock, here))
}

/// A new TCP socket of the program's family, close-on-exec for the broker.
pub(crate) fn tcp_socket(v6: bool) -> Result<OwnedFd, Errno> {
    let family = if v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| e.raw_os_error())
}

/// Logs a connect the policy refused (and counts it), with both apps'
/// labels and the rule that decided.
pub(crate) fn log_denied(e: &ResolveError) {
    if let ResolveError::Denied {
        dst,
        client,
        client_labels,
        server,
        server_labels,
        rule,
    } = e
    {
        crate::metrics::connect_denied();
        tracing::warn!(
            client_app = client,
            client_labels = %labels_text(client_labels),
            server_app = server,
            server_labels = %labels_text(server_labels),
            %dst,
            %rule,
            "connect denied by policy"
        );
    }
}

fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
