//! `sendto`, `sendmsg` and `sendmmsg` that may connect (TCP Fast Open) or
//! name a destination on a socket this broker swapped.
//!
//! The filter traps `sendto` with a non-NULL address or `MSG_FASTOPEN`, and
//! `sendmsg`/`sendmmsg` with `MSG_FASTOPEN` (the flags argument is the only
//! place the kernel takes that flag from). The ordinary data path — `send`,
//! `sendto(…, NULL, 0)`, `sendmsg` without the flag, `write` — is never
//! trapped.
//!
//! * Inputs, in the kernel's order: the socket (the broker's `pidfd_getfd`
//!   copy; `EBADF`, `ENOTSOCK`), the destination read once from the
//!   program's memory (`sendto`: `EINVAL` outside 0..=128 bytes, `EFAULT`;
//!   `sendmsg`: the `msghdr`, a name cut to 128 bytes, the `iovec` array,
//!   `EMSGSIZE` over 1024 entries, `EINVAL` for a negative length), then
//!   `NOTIF_ID_VALID`. The data is read once, in chunks, as it is sent.
//! * `MSG_FASTOPEN` (connect, then send). Never `CONTINUE`: the kernel would
//!   look the fd and the address up again, and another thread could change
//!   either in between.
//!   - To a VIP, from a TCP socket of the kernel's (or a swapped one bound
//!     and never connected): the policy is asked and the socket swapped for
//!     a UNIX connection exactly as `connect` does it (`ECONNREFUSED` for no
//!     service or a denied one, `EISCONN` for a connected or listening
//!     socket); then the data is sent on the broker's copy of the new socket
//!     and the count answered. A non-blocking socket is answered as its
//!     `connect` would be (`EINPROGRESS`, the connection made or, with no
//!     service, refused later) and its data is not sent: what TCP says
//!     when it has no Fast Open cookie for the server, the usual case.
//!   - To anything else (a NULL address included): the broker makes the
//!     call on its copy of the program's socket with its own copies of the
//!     address and the data, so the kernel judges it (`EISCONN`, `EINVAL`,
//!     `EOPNOTSUPP` with Fast Open off or `AF_UNSPEC`, `EINPROGRESS`, …).
//!   - A swapped connected socket: `EISCONN`, as TCP; after a non-blocking
//!     `connect` was told `EINPROGRESS`, the data is sent (TCP's handshake
//!     is over by then). A bound one connecting elsewhere than a VIP:
//!     `EOPNOTSUPP` (what TCP answers with Fast Open off; `connect` works).
//!   - IP datagram sockets (UDP ignores the flag): the broker sends the
//!     datagram on its copy. Other families ignore the flag natively; ax
//!     answers `EOPNOTSUPP` rather than send with the broker's credentials
//!     (which a UNIX peer reads with `SCM_CREDENTIALS`).
//! * An address without `MSG_FASTOPEN`:
//!   - on a swapped connected socket TCP ignores the address and sends,
//!     where the UNIX socket would say `EISCONN`: the broker sends the data
//!     on its copy and answers the count. A swapped listening or bound
//!     socket: `EPIPE` (and `SIGPIPE` without `MSG_NOSIGNAL`), as TCP.
//!   - a UDP socket to a VIP: `ENETUNREACH` (see `udp.rs`), with or
//!     without `MSG_FASTOPEN`.
//!   - anything else: `CONTINUE`, which is safe here. Without
//!     `MSG_FASTOPEN` no send connects a TCP socket (TCP ignores the
//!     address), a UDP datagram is not ax's business, and whatever another
//!     thread puts at the fd number in between, the kernel then does what a
//!     plain `sendto` on it does: no decision of the broker's is undone.
//! * `sendmmsg` with `MSG_FASTOPEN` sends the first message only and
//!   answers 1 (or its errno). On TCP that is the kernel's answer too: the
//!   second message's Fast Open finds the socket connected and `sendmmsg`
//!   stops there. A UDP socket sends the rest with its next call.
//! * Ancillary data with `MSG_FASTOPEN`: `EINVAL` (TCP takes only a few
//!   `SOL_SOCKET` records, and the broker will not send them with its own
//!   rights).
//! * A send that may block runs on a helper thread and waits in slices: a
//!   signal for the program ends it with the count so far (`EINTR` if
//!   none). `SO_SNDTIMEO` does not bound that wait; the Fast Open connect
//!   of an egress socket waits as long as the kernel's.
//! * `MSG_ZEROCOPY` is dropped from a send the broker makes (the kernel
//!   would read the broker's buffer after the call): the data is copied,
//!   and no completion reaches the socket's error queue.
//! * Deliberately not trapped: `sendmsg` with a name and no `MSG_FASTOPEN`
//!   (a seccomp filter cannot read the `msghdr`): on a swapped connected
//!   socket it still answers `EISCONN`, where TCP sends.

use super::connect::{self, State};
use super::{classify, defer, is_nonblocking, Call, Outcome, Sock};
use crate::addr::{self, Purpose};
use crate::names::SocketName;
use crate::target::{errno_of, Errno, Target};
use ax_registry::ResolveError;
use ax_sys::sockaddr::{sendto_raw, SOCKADDR_STORAGE_LEN};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::sockopt;
use rustix::net::{AddressFamily, SocketType};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

const MSG_FASTOPEN: i32 = libc::MSG_FASTOPEN;
/// `AF_UNSPEC`, as the first two bytes of a `sockaddr` read it.
const AF_UNSPEC: u16 = 0;
/// Flags the broker never passes on: with `MSG_ZEROCOPY` the kernel would
/// keep sending from the broker's buffer after the call returns, when that
/// memory may hold something else.
const NOT_PASSED: i32 = libc::MSG_ZEROCOPY;
/// `sendmsg` and `sendmmsg` refuse it from user space (`EINVAL`).
const MSG_CMSG_COMPAT: i32 = i32::MIN; // 0x80000000
/// How much of the program's data is read and sent at a time.
const CHUNK: usize = 64 * 1024;
/// The largest datagram the broker sends for a program (UDP's own limit is
/// below it).
const MAX_DATAGRAM: usize = 256 * 1024;
/// `MAX_RW_COUNT`: the kernel cuts every send to this many bytes.
const MAX_RW_COUNT: usize = 0x7fff_f000;
/// `UIO_MAXIOV`.
const UIO_MAXIOV: u64 = 1024;
/// `sizeof(struct msghdr)` / `sizeof(struct iovec)` / `sizeof(struct
/// mmsghdr)` on 64-bit Linux, and where `mmsghdr.msg_len` is.
const MSGHDR_LEN: usize = 56;
const IOVEC_LEN: usize = 16;
const MSG_LEN_OFFSET: u64 = 56;
/// The longest ancillary data the kernel copies in (`optmem_max`'s order).
const MAX_CONTROL: u64 = 128 * 1024;
/// A blocked send checks this often that its caller still waits.
const SLICE: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 50_000_000,
};

/// A trapped send, as read from the program.
struct Request {
    flags: i32,
    /// The destination's bytes; `None` for a NULL (or, in a `msghdr`,
    /// zero-length) address.
    name: Option<Vec<u8>>,
    data: Data,
    /// `sendmmsg`: where the first message's `msg_len` goes.
    len_out: Option<u64>,
    /// `sendmsg`: the length of its ancillary data.
    control_len: u64,
}

impl Request {
    fn fastopen(&self) -> bool {
        self.flags & MSG_FASTOPEN != 0
    }
}

/// The data to send: pieces (address, length) of the program's memory, and
/// how far they have been read.
struct Data {
    pieces: Vec<(u64, usize)>,
    at: usize,
    offset: usize,
    /// A piece could not be read: the next chunk fails with this.
    fault: Option<Errno>,
}

impl Data {
    fn new(pieces: Vec<(u64, usize)>) -> Self {
        Self {
            pieces,
            at: 0,
            offset: 0,
            fault: None,
        }
    }

    fn total(&self) -> usize {
        self.pieces.iter().map(|p| p.1).sum()
    }

    /// The next (at most `max`) bytes, read from the target; `None` at the
    /// end. Bytes read before a fault come first, the fault next time.
    fn next_chunk(&mut self, target: &Target, max: usize) -> Option<Result<Vec<u8>, Errno>> {
        if let Some(e) = self.fault.take() {
            self.at = self.pieces.len();
            return Some(Err(e));
        }
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&(base, len)) = self.pieces.get(self.at) else {
                break;
            };
            let n = (len - self.offset).min(max - out.len());
            if n == 0 {
                self.at += 1;
                self.offset = 0;
                continue;
            }
            let from = u64::try_from(self.offset)
                .ok()
                .and_then(|o| base.checked_add(o));
            match from.ok_or(libc::EFAULT).and_then(|a| target.read(a, n)) {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(e) if out.is_empty() => {
                    self.at = self.pieces.len();
                    return Some(Err(e));
                }
                Err(e) => {
                    self.fault = Some(e);
                    break;
                }
            }
            self.offset += n;
        }
        (!out.is_empty()).then_some(Ok(out))
    }
}

/// What the program sends on.
enum Kind {
    /// A TCP socket the kernel owns.
    Tcp { v6: bool, fd: OwnedFd },
    /// A UNIX socket this broker installed.
    Swapped { name: SocketName, fd: OwnedFd },
    /// An IP socket that is not a stream.
    Datagram(OwnedFd),
    /// A socket of another family.
    Foreign,
}

/// `sendto(fd, buf, len, flags, addr, addrlen)`.
pub(super) fn handle_sendto(call: &Call<'_>, target: &Target) -> Outcome {
    if let Some(refused) = super::udp::to_vip(call, target, call.arg(4), call.int_arg(5)) {
        return refused;
    }
    let flags = call.int_arg(3);
    let kind = match kind(call, target, flags & MSG_FASTOPEN != 0) {
        Ok(k) => k,
        Err(answer) => return answer,
    };
    let read = || -> Result<Request, Errno> {
        let name = match call.arg(4) {
            0 => None,
            ptr => {
                let len = usize::try_from(call.int_arg(5))
                    .ok()
                    .filter(|&l| l <= SOCKADDR_STORAGE_LEN)
                    .ok_or(libc::EINVAL)?;
                Some(target.read(ptr, len)?)
            }
        };
        call.check_valid()?;
        let len = usize::try_from(call.arg(2)).map_or(MAX_RW_COUNT, |l| l.min(MAX_RW_COUNT));
        Ok(Request {
            flags,
            name,
            data: Data::new(vec![(call.arg(1), len)]),
            len_out: None,
            control_len: 0,
        })
    };
    match read() {
        Ok(send) => dispatch(call, target, kind, send),
        Err(e) => Outcome::Errno(e),
    }
}

/// `sendmsg(fd, msg, flags)`, trapped with `MSG_FASTOPEN`.
pub(super) fn handle_sendmsg(call: &Call<'_>, target: &Target) -> Outcome {
    let flags = call.int_arg(2);
    if flags & MSG_CMSG_COMPAT != 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    let kind = match kind(call, target, flags & MSG_FASTOPEN != 0) {
        Ok(k) => k,
        Err(answer) => return answer,
    };
    match read_msghdr(call, target, call.arg(1), flags) {
        Ok(send) => dispatch(call, target, kind, send),
        Err(e) => Outcome::Errno(e),
    }
}

/// `sendmmsg(fd, msgvec, vlen, flags)`, trapped with `MSG_FASTOPEN`: the
/// first message only (see the module docs).
pub(super) fn handle_sendmmsg(call: &Call<'_>, target: &Target) -> Outcome {
    let flags = call.int_arg(3);
    if flags & MSG_CMSG_COMPAT != 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    let kind = match kind(call, target, flags & MSG_FASTOPEN != 0) {
        Ok(k) => k,
        Err(answer) => return answer,
    };
    // vlen is an unsigned int.
    if call.arg(2) & 0xffff_ffff == 0 {
        return Outcome::Value(0);
    }
    let entry = call.arg(1);
    match read_msghdr(call, target, entry, flags) {
        Ok(mut send) => {
            send.len_out = entry.checked_add(MSG_LEN_OFFSET);
            dispatch(call, target, kind, send)
        }
        Err(e) => Outcome::Errno(e),
    }
}

/// What the fd is; `Err` is the answer already (`CONTINUE` for a socket
/// that is not ax's business without Fast Open, `EBADF`, `ENOTSOCK`).
fn kind(call: &Call<'_>, target: &Target, fastopen: bool) -> Result<Kind, Outcome> {
    let sock = classify(call, target, call.arg(0));
    if !fastopen {
        // Without Fast Open nothing but a swapped socket is ax's business:
        // see the module docs.
        return match sock {
            Ok(Sock::Swapped { name, fd, .. }) => Ok(Kind::Swapped { name, fd }),
            Ok(_) => Err(Outcome::Continue),
            // Never CONTINUE for want of an fd or memory.
            Err(e) => Err(super::fd_error(call, e)),
        };
    }
    match sock {
        Ok(Sock::Inet { v6, fd, .. }) => Ok(Kind::Tcp { v6, fd }),
        Ok(Sock::Swapped { name, fd, .. }) => Ok(Kind::Swapped { name, fd }),
        Ok(Sock::Other) => {
            let fd = target.fd(call.arg(0)).map_err(Outcome::Errno)?;
            let domain =
                sockopt::socket_domain(&fd).map_err(|e| Outcome::Errno(e.raw_os_error()))?;
            if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
                return Ok(Kind::Foreign);
            }
            match sockopt::socket_type(&fd) {
                // Another thread put a TCP socket there meanwhile: the
                // program raced itself; it may try again.
                Ok(t) if t == SocketType::STREAM => Err(Outcome::Errno(libc::EAGAIN)),
                _ => Ok(Kind::Datagram(fd)),
            }
        }
        Err(libc::EBADF) => Err(Outcome::Errno(libc::EBADF)),
        Err(e) => Err(super::inaccessible(call, e)),
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

/// Reads a `struct msghdr` and what it points to, as `__copy_msghdr` and
/// `import_iovec` do.
fn read_msghdr(call: &Call<'_>, target: &Target, at: u64, flags: i32) -> Result<Request, Errno> {
    let h = target.read(at, MSGHDR_LEN)?;
    let name_ptr = u64_at(&h, 0);
    let namelen = i32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
    let (iov_ptr, iovlen) = (u64_at(&h, 16), u64_at(&h, 24));
    let (control_ptr, control_len) = (u64_at(&h, 32), u64_at(&h, 40));
    let namelen = if name_ptr == 0 { 0 } else { namelen };
    let namelen = usize::try_from(namelen)
        .map_err(|_| libc::EINVAL)?
        .min(SOCKADDR_STORAGE_LEN);
    let name = match namelen {
        0 => None,
        n => Some(target.read(name_ptr, n)?),
    };
    if iovlen > UIO_MAXIOV {
        return Err(libc::EMSGSIZE);
    }
    let count = usize::try_from(iovlen).map_err(|_| libc::EMSGSIZE)?;
    let iov = target.read(iov_ptr, count * IOVEC_LEN)?;
    let mut pieces = Vec::with_capacity(count);
    let mut total = 0usize;
    for i in 0..count {
        let base = u64_at(&iov, i * IOVEC_LEN);
        let len = isize::try_from(u64_at(&iov, i * IOVEC_LEN + 8))
            .ok()
            .and_then(|l| usize::try_from(l).ok())
            .ok_or(libc::EINVAL)?;
        let len = len.min(MAX_RW_COUNT - total);
        total += len;
        pieces.push((base, len));
    }
    if control_len > u64::from(i32::MAX.unsigned_abs()) {
        return Err(libc::ENOBUFS);
    }
    if control_len > 0 {
        if control_len > MAX_CONTROL {
            return Err(libc::ENOBUFS);
        }
        let n = usize::try_from(control_len).map_err(|_| libc::ENOBUFS)?;
        target.read(control_ptr, n)?;
    }
    call.check_valid()?;
    Ok(Request {
        flags,
        name,
        data: Data::new(pieces),
        len_out: None,
        control_len,
    })
}

fn dispatch(call: &Call<'_>, target: &Target, kind: Kind, send: Request) -> Outcome {
    if send.fastopen() && send.control_len > 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    match kind {
        Kind::Swapped { name, fd } => swapped(call, target, name, fd, send),
        Kind::Tcp { v6, fd } => match virtual_destination(call, &send, v6) {
            Some(dst) => {
                tracing::debug!(app = call.app, %dst, "fast open to a service");
                defer(call, move |call| to_service(call, fd, v6, dst, None, send))
            }
            None => on_thread(
                call,
                target,
                may_block(&fd, send.flags),
                move |call, target| {
                    let len_out = send.len_out;
                    let outcome = transfer(call, target, &fd, send, true);
                    report_first(call, target, len_out, outcome)
                },
            ),
        },
        Kind::Datagram(fd) => on_thread(
            call,
            target,
            may_block(&fd, send.flags),
            move |call, target| {
                let len_out = send.len_out;
                let outcome = datagram(call, target, &fd, send);
                report_first(call, target, len_out, outcome)
            },
        ),
        Kind::Foreign => Outcome::Errno(libc::EOPNOTSUPP),
    }
}

/// The destination, if it is a VIP.
fn virtual_destination(call: &Call<'_>, send: &Request, v6: bool) -> Option<SocketAddr> {
    let dst = addr::parse(send.name.as_deref()?, v6, Purpose::Connect)?;
    call.shared.directory.is_virtual(dst.ip()).then_some(dst)
}

/// A send on a socket this broker installed.
fn swapped(
    call: &Call<'_>,
    target: &Target,
    name: SocketName,
    fd: OwnedFd,
    send: Request,
) -> Outcome {
    let state = connect::state_of(&name, &fd);
    if !send.fastopen() {
        // TCP ignores the address of a send without Fast Open.
        return match state {
            State::Connected => send_on(call, target, fd, send),
            State::Listening | State::Bound => pipe_error(target, send.flags),
        };
    }
    // tcp_sendmsg_fastopen, then __inet_stream_connect, in their order.
    if let Some(b) = send.name.as_deref() {
        if b.len() >= 2 && addr::family(b) == AF_UNSPEC {
            return Outcome::Errno(libc::EOPNOTSUPP);
        }
        if b.len() < 2 {
            return Outcome::Errno(libc::EINVAL);
        }
    }
    match state {
        State::Listening => Outcome::Errno(libc::EISCONN),
        State::Connected if super::client::take_in_progress(call, &fd) => {
            send_on(call, target, fd, send)
        }
        State::Connected => Outcome::Errno(libc::EISCONN),
        State::Bound => match virtual_destination(call, &send, name.is_v6()) {
            Some(dst) => {
                let v6 = name.is_v6();
                defer(call, move |call| {
                    to_service(call, fd, v6, dst, Some(name), send)
                })
            }
            // tcp_v4_connect/tcp_v6_connect: no address is too short.
            None if send.name.is_none() => Outcome::Errno(libc::EINVAL),
            None => Outcome::Errno(libc::EOPNOTSUPP),
        },
    }
}

/// Sends the data on a connected socket, ignoring the address.
fn send_on(call: &Call<'_>, target: &Target, fd: OwnedFd, send: Request) -> Outcome {
    let blocking = may_block(&fd, send.flags);
    on_thread(call, target, blocking, move |call, target| {
        let len_out = send.len_out;
        let outcome = transfer(call, target, &fd, send, false);
        report_first(call, target, len_out, outcome)
    })
}

/// False for a non-blocking socket or a send with `MSG_DONTWAIT`.
fn may_block(fd: &OwnedFd, flags: i32) -> bool {
    flags & libc::MSG_DONTWAIT == 0 && !is_nonblocking(fd)
}

/// Runs `work` here when it cannot block, else on a helper thread.
fn on_thread<F>(call: &Call<'_>, target: &Target, blocking: bool, work: F) -> Outcome
where
    F: FnOnce(&Call<'_>, &Target) -> Outcome + Send + 'static,
{
    if !blocking {
        return work(call, target);
    }
    defer(call, move |call| {
        match Target::for_call(call.notif.pid, call.listener, call.notif.id) {
            Ok(target) => work(call, &target),
            Err(_) => Outcome::Answered,
        }
    })
}

/// `EPIPE` for a send on a socket that is not connected, with the
/// `SIGPIPE` TCP raises unless told not to.
fn pipe_error(target: &Target, flags: i32) -> Outcome {
    if flags & libc::MSG_NOSIGNAL == 0 {
        target.raise_sigpipe();
    }
    Outcome::Errno(libc::EPIPE)
}

/// Fast Open to a VIP: the virtual connect of `connect`, then the data on
/// the new socket. Runs on a helper thread.
fn to_service(
    call: &Call<'_>,
    copy: OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
    send: Request,
) -> Outcome {
    let Ok(target) = Target::for_call(call.notif.pid, call.listener, call.notif.id) else {
        return Outcome::Answered;
    };
    let connected =
        virtual_connect(call, &target, &copy, v6, dst, rebind).unwrap_or_else(Outcome::Errno);
    // A non-blocking socket is told EINPROGRESS, as by `connect`, and its
    // data is not sent: TCP without a Fast Open cookie says the same.
    if connected != Outcome::Value(0) {
        return connected;
    }
    match classify(call, &target, call.arg(0)) {
        Ok(Sock::Swapped {
            name: SocketName::Client { peer, .. },
            fd,
            ..
        }) if peer == dst => {
            let len_out = send.len_out;
            let outcome = transfer(call, &target, &fd, send, false);
            report_first(call, &target, len_out, outcome)
        }
        // Another thread replaced the new socket already.
        _ => Outcome::Errno(libc::ECONNRESET),
    }
}

/// `connect`'s virtual connect, from a helper thread: a full backlog and
/// `--connect-wait` are waited for here. A non-blocking socket is not held
/// for `--connect-wait`: it is refused as without it.
fn virtual_connect(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    let dir = &call.shared.directory;
    let bound = rebind.is_some();
    let local_port = super::inet_name(copy).map_or(0, |a| a.port());
    if !bound && local_port != 0 {
        if sockopt::socket_acceptconn(copy).unwrap_or(false) {
            return Ok(Outcome::Errno(libc::EISCONN));
        }
        if let Ok(Some(_)) = rustix::net::getpeername(copy) {
            return Ok(Outcome::Errno(libc::EISCONN));
        }
    }
    match dir.resolve(call.app, dst) {
        Ok(endpoints) => {
            match super::client::deliver(
                call, target, copy, v6, dst, rebind, endpoints, local_port, true,
            )? {
                Some(outcome) => Ok(outcome),
                None => connect::refused(call, target, copy, v6, bound),
            }
        }
        Err(ResolveError::NoService(_)) => {
            let wait = dir
                .connect_wait(call.app)
                .unwrap_or(call.shared.config.connect_wait);
            if wait.is_zero() || bound || is_nonblocking(copy) {
                tracing::debug!(app = call.app, %dst, "fast open refused: no service");
                connect::refused(call, target, copy, v6, bound)
            } else {
                super::connect_wait::wait_for_service(call, copy, v6, dst, rebind, wait)
            }
        }
        Err(e) => {
            super::log_denied(&e);
            connect::refused(call, target, copy, v6, bound)
        }
    }
}

/// Writes `sendmmsg`'s `msg_len` for the first message and answers 1.
fn report_first(call: &Call<'_>, target: &Target, len_out: Option<u64>, sent: Outcome) -> Outcome {
    let (Some(at), Outcome::Value(n)) = (len_out, sent) else {
        return sent;
    };
    if !call.still_valid() {
        return Outcome::Answered;
    }
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    match target.write(at, &n.to_ne_bytes()) {
        Ok(()) => Outcome::Value(1),
        Err(e) => Outcome::Errno(e),
    }
}

/// The count so far, or `errno` if nothing was sent.
fn partial(sent: usize, errno: Errno) -> Outcome {
    match i64::try_from(sent) {
        Ok(n) if n > 0 => Outcome::Value(n),
        _ => Outcome::Errno(errno),
    }
}

/// Sends the program's data on `fd` (the broker's copy of its socket), a
/// chunk at a time. With `fastopen`, the first chunk (empty if the data
/// cannot be read: the kernel connects before it copies) goes with
/// `MSG_FASTOPEN` and the program's destination, so the kernel connects
/// first and judges the address.
fn transfer(
    call: &Call<'_>,
    target: &Target,
    fd: &OwnedFd,
    mut send: Request,
    fastopen: bool,
) -> Outcome {
    let user = send.flags;
    let base = (user & !(MSG_FASTOPEN | NOT_PASSED)) | libc::MSG_NOSIGNAL;
    let dontwait = user & libc::MSG_DONTWAIT != 0 || is_nonblocking(fd);
    let mut sent = 0usize;
    let mut first = fastopen;
    loop {
        let (bytes, fault) = match send.data.next_chunk(target, CHUNK) {
            Some(Ok(b)) => (b, None),
            Some(Err(e)) if first => (Vec::new(), Some(e)),
            Some(Err(e)) => return partial(sent, e),
            None if first => (Vec::new(), None),
            None => break,
        };
        if !call.still_valid() {
            return Outcome::Answered;
        }
        if first {
            first = false;
            let flags = base | MSG_FASTOPEN | (user & libc::MSG_DONTWAIT);
            match sendto_raw(fd.as_fd(), &bytes, flags, send.name.as_deref()) {
                Ok(n) => sent = n,
                Err(e) => return failed(target, user, sent, errno_of(&e)),
            }
            if let Some(e) = fault {
                return partial(sent, e);
            }
            if sent < bytes.len() {
                return partial(sent, libc::EAGAIN);
            }
            continue;
        }
        let mut off = 0;
        while off < bytes.len() {
            match sendto_raw(fd.as_fd(), &bytes[off..], base | libc::MSG_DONTWAIT, None) {
                Ok(n) => {
                    off += n;
                    sent += n;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && !dontwait => {
                    if let Err(outcome) = wait_writable(call, target, fd, sent) {
                        return outcome;
                    }
                }
                Err(e) => return failed(target, user, sent, errno_of(&e)),
            }
        }
    }
    count(sent)
}

fn count(sent: usize) -> Outcome {
    Outcome::Value(i64::try_from(sent).unwrap_or(i64::MAX))
}

/// A send failed after `sent` bytes: the count, or the errno (with the
/// `SIGPIPE` of a broken connection).
fn failed(target: &Target, user_flags: i32, sent: usize, errno: Errno) -> Outcome {
    if sent == 0 && errno == libc::EPIPE {
        return pipe_error(target, user_flags);
    }
    partial(sent, errno)
}

/// Waits until `fd` takes more data; `Err` is the answer when the program
/// stopped waiting or got a signal.
fn wait_writable(
    call: &Call<'_>,
    target: &Target,
    fd: &OwnedFd,
    sent: usize,
) -> Result<(), Outcome> {
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::OUT)];
        if matches!(poll(&mut fds, Some(&SLICE)), Ok(n) if n > 0) {
            return Ok(());
        }
        if !call.still_valid() {
            return Err(Outcome::Answered);
        }
        if target.signal_pending() {
            return Err(partial(sent, libc::EINTR));
        }
    }
}

/// One datagram on an IP socket that is not a stream, sent whole.
fn datagram(call: &Call<'_>, target: &Target, fd: &OwnedFd, mut send: Request) -> Outcome {
    if send.data.total() > MAX_DATAGRAM {
        return Outcome::Errno(libc::EMSGSIZE);
    }
    let bytes = match send.data.next_chunk(target, MAX_DATAGRAM) {
        None => Vec::new(),
        Some(Ok(b)) if send.data.fault.is_none() => b,
        Some(Ok(_)) => return Outcome::Errno(libc::EFAULT),
        Some(Err(e)) => return Outcome::Errno(e),
    };
    if !call.still_valid() {
        return Outcome::Answered;
    }
    match sendto_raw(
        fd.as_fd(),
        &bytes,
        (send.flags & !NOT_PASSED) | libc::MSG_NOSIGNAL,
        send.name.as_deref(),
    ) {
        Ok(n) => count(n),
        Err(e) => failed(target, send.flags, 0, errno_of(&e)),
    }
}
