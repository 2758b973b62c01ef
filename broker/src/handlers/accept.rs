//! `accept(fd, addr, addrlen)` and `accept4(fd, addr, addrlen, flags)`.
//!
//! * Inputs: a listener this broker installed (anything else runs natively).
//! * Decision: none — every accept on a swapped listener goes through here.
//! * Effect: the broker accepts on its copy of the listener, writes the
//!   client's virtual address to `addr` (in the listener's family, cut to
//!   `*addrlen` as the kernel does, with the full length stored back; a bad
//!   buffer loses the connection and fails the call, as in the kernel),
//!   then installs the connection (`SECCOMP_IOCTL_NOTIF_ADDFD`) and answers
//!   its fd number. `SOCK_NONBLOCK`/`SOCK_CLOEXEC` are honoured.
//!   Who connected is what the broker says: the hello its client socket
//!   wrote ahead of any data (taken out here), an identity it kept for the
//!   connection, or a doorbell it bound (see `crate::idents`,
//!   `crate::doors`). A connection the broker did not make is closed and
//!   the call fails with `ECONNABORTED`; one whose client left before its
//!   hello is skipped, and one whose hello is still on its way goes back
//!   behind a doorbell, while the accept goes on with the next.
//!
//! A blocking accept with nothing to accept yet is parked: the app's receive
//! loop polls the listener beside the notify fd and finishes the call when a
//! connection arrives (a helper thread does the same for replayed calls), so
//! the broker itself never blocks in `accept`. The wait ends early with
//! `EINTR` when the thread gets a signal (looked for every 50 ms in the
//! first second, every 250 ms after), and with `EAGAIN` at the listener's
//! `SO_RCVTIMEO`, as natively. An app parks at most
//! `crate::appstate::MAX_PARKED_ACCEPTS` accepts; one more fails with
//! `ENOBUFS`.

use super::caller::{caller_of, requeue, waited_hello, Caller, Namespace};
use super::{classify, defer, is_nonblocking, write_sockaddr, Call, Outcome, Sock};
use crate::addr;
use crate::names::SocketName;
use crate::target::{Errno, Target};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{sockopt, SocketFlags};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often a waiting accept checks that its caller still waits, and for
/// a signal that should interrupt it, in its first [`WAIT_BRISK`]...
const WAIT_TICK: Duration = Duration::from_millis(50);
/// ...and after: a signal (Ctrl-C on a server that handles it) interrupts
/// an accept within this long. An accept parked in its receive loop is
/// looked at this often by the broker's watch thread instead (see
/// `crate::watch`), and its loop sleeps; one waiting on a helper thread
/// wakes that thread this often.
const WAIT_TICK_IDLE: Duration = crate::watch::EVERY;
/// See [`WAIT_TICK`].
const WAIT_BRISK: Duration = Duration::from_secs(1);

/// How long an accept that has waited `waited` so far, and may wait until
/// `deadline` (its `SO_RCVTIMEO`), waits before its next check.
fn next_check(waited: Duration, deadline: Option<Instant>) -> Duration {
    let tick = if waited < WAIT_BRISK {
        WAIT_TICK
    } else {
        WAIT_TICK_IDLE
    };
    match deadline {
        Some(d) => tick.min(d.saturating_duration_since(Instant::now())),
        None => tick,
    }
}
/// Why [`complete`] installed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotHanded {
    /// The client closed the connection before its hello came (its connect
    /// was cut short by a daemon killed in between, and the program got
    /// another one): nothing is lost in dropping it, and the accept goes on
    /// with the next connection.
    ClientLeft,
    /// The call fails with this errno.
    Failed(Errno),
}

impl From<Errno> for NotHanded {
    fn from(e: Errno) -> Self {
        NotHanded::Failed(e)
    }
}

/// The answer for what [`complete`] did; a client that left is, where the
/// accept cannot go on with the next connection, a connection reset
/// before it was accepted (`ECONNABORTED`), which servers accept again
/// after.
fn answer(done: Result<Outcome, NotHanded>) -> Outcome {
    match done {
        Ok(outcome) => outcome,
        Err(NotHanded::Failed(e)) => Outcome::Errno(e),
        Err(NotHanded::ClientLeft) => Outcome::Errno(libc::ECONNABORTED),
    }
}

pub(super) fn handle(call: &Call<'_>, target: &Target, has_flags: bool) -> Outcome {
    let (name, listener, cookie) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd, cookie }) => (name, fd, cookie),
        Ok(_) => return Outcome::Continue,
        Err(e) => return super::fd_error(call, e),
    };
    let v6 = name.is_v6();
    // An accepted connection bears its listener's name too: only a socket
    // that listens is accepted on (the kernel's `EINVAL` otherwise).
    if !matches!(name, SocketName::Listener { .. })
        || !super::listens(call.shared, &listener, cookie)
    {
        return Outcome::Errno(libc::EINVAL);
    }
    let flags = if has_flags { call.int_arg(3) } else { 0 };
    if flags & !(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) != 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    let mut accept_flags = SocketFlags::CLOEXEC;
    if flags & libc::SOCK_NONBLOCK != 0 {
        accept_flags |= SocketFlags::NONBLOCK;
    }
    let cloexec = flags & libc::SOCK_CLOEXEC != 0;
    if let Some(done) = take_waiting(call, target, &listener, accept_flags, v6, cloexec) {
        return done;
    }
    if is_nonblocking(&listener) {
        return Outcome::Errno(libc::EAGAIN);
    }
    // Nothing to accept yet: wait as below.
    let timeout = sockopt::socket_timeout(&listener, sockopt::Timeout::Recv)
        .ok()
        .flatten();
    if let Some(parking) = call.parking {
        let Some(permit) = call.state.parked.take() else {
            return Outcome::Errno(libc::ENOBUFS);
        };
        parking.borrow_mut().push(Parked {
            _permit: permit,
            notif: call.notif,
            listener,
            flags: accept_flags,
            v6,
            cloexec,
            since: Instant::now(),
            // A timeout too long to add never ends.
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            signals: std::cell::OnceCell::new(),
        });
        return Outcome::Deferred;
    }
    defer(call, move |call| {
        let since = Instant::now();
        let deadline = timeout.and_then(|t| since.checked_add(t));
        let target = match super::reopen(call) {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        loop {
            let mut fds = [PollFd::new(&listener, PollFlags::IN)];
            let tick = Timespec::try_from(next_check(since.elapsed(), deadline)).ok();
            let _ = poll(&mut fds, tick.as_ref());
            if !fds[0].revents().is_empty() {
                if let Some(done) =
                    take_waiting(call, &target, &listener, accept_flags, v6, cloexec)
                {
                    return done;
                }
            }
            if !call.still_valid() {
                return Outcome::Answered;
            }
            if target.signal_pending() {
                return Outcome::Errno(libc::EINTR);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Outcome::Errno(libc::EAGAIN);
            }
        }
    })
}

/// A blocking accept waiting in its app's receive loop for a connection.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) notif: ax_sys::Notification,
    listener: OwnedFd,
    flags: SocketFlags,
    v6: bool,
    cloexec: bool,
    /// When it parked.
    since: Instant,
    deadline: Option<Instant>,
    /// The caller's pending signals, opened at the first check.
    signals: std::cell::OnceCell<crate::target::Signals>,
    /// Its place in the app's quota of parked accepts.
    _permit: crate::appstate::Permit,
}

impl Parked {
    /// The listener to poll.
    pub(crate) fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// How long it waits before its loop's next check (see
    /// [`Parked::resume`]); with `watched` (the broker's watch looks at its
    /// signals and caller once it is [`Parked::watchable`]), only its
    /// deadline is the loop's to keep, if it has one.
    pub(crate) fn next_check(&self, watched: bool) -> Option<Duration> {
        if watched && self.watchable() {
            return self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
        }
        Some(next_check(self.since.elapsed(), self.deadline))
    }

    /// Whether it has waited past its first second, after which the
    /// broker's watch (`crate::watch`) may look at it instead of its loop.
    pub(crate) fn watchable(&self) -> bool {
        self.since.elapsed() >= WAIT_BRISK
    }

    /// Tries to finish the call: `readable` when the listener polled
    /// readable, `housekeeping` every [`Parked::next_check`] or sooner to
    /// notice a target that left, a signal, or the deadline. `None` means
    /// keep waiting.
    pub(crate) fn resume(
        &self,
        call: &Call<'_>,
        readable: bool,
        housekeeping: bool,
    ) -> Option<Outcome> {
        if readable {
            let target = match super::reopen(call) {
                Ok(t) => t,
                Err(answer) => return Some(answer),
            };
            let done = take_waiting(
                call,
                &target,
                &self.listener,
                self.flags,
                self.v6,
                self.cloexec,
            );
            if done.is_some() {
                return done;
            }
        }
        if !housekeeping {
            return None;
        }
        // Opened before the check that the call is pending, so that it
        // names the caller (its tid could name another thread only after
        // the caller left), and keeps naming it after.
        let signals = self
            .signals
            .get_or_init(|| crate::target::Signals::open(self.notif.pid));
        if !call.still_valid() {
            return Some(Outcome::Answered);
        }
        if signals.pending() {
            return Some(Outcome::Errno(libc::EINTR));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(Outcome::Errno(libc::EAGAIN));
        }
        None
    }
}

/// How often a receive loop with parked accepts looks at them at most.
pub(crate) const PARKED_TICK: Duration = WAIT_TICK;

/// Accepts if a connection is waiting, without blocking, whatever the
/// listener's `O_NONBLOCK` (which the program may change meanwhile): every
/// accept the program makes on a swapped listener goes through the broker,
/// and this check-then-accept runs under one lock. An empty queue is told
/// by a poll, not by an accept, which allocates a socket and a file before
/// it finds the queue empty (3.4 µs here, against 0.3 µs for the poll).
fn try_accept(
    call: &Call<'_>,
    listener: &OwnedFd,
    flags: SocketFlags,
) -> Option<Result<OwnedFd, Errno>> {
    let _guard = call
        .shared
        .accept_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match queue_of(listener) {
        Queue::Empty => None,
        Queue::ShutDown => {
            close_shut_down(call, listener);
            Some(Err(libc::EINVAL))
        }
        Queue::Waiting => {
            Some(rustix::net::accept_with(listener, flags).map_err(|e| e.raw_os_error()))
        }
    }
}

/// Does to a listener the program shut down what TCP does at `shutdown`,
/// which a UNIX listener does not: its service stops taking connections
/// (new clients are refused, `ECONNREFUSED`), and the connections waiting
/// in its queue are reset (their clients read `ECONNRESET`: each is closed
/// with its hello unread). Called with the accept lock held, on every
/// accept after the shutdown (a thread blocked in one wakes to it): the
/// first does the work, the later ones find nothing left to do.
///
/// The queue is drained with the listener made non-blocking for the
/// moment, as an accept on a blocking one would wait for a connection that
/// no longer comes. A program can see that flag only with `F_GETFL` in that
/// moment (its accepts all pass through here, under the same lock); a
/// daemon killed in it leaves the flag set on a listener whose every
/// accept fails with `EINVAL` from then on.
fn close_shut_down(call: &Call<'_>, listener: &OwnedFd) {
    if let Some(name) = super::own_name(listener) {
        super::client::release_listener(call, name);
    }
    let was_blocking = !is_nonblocking(listener);
    if was_blocking && super::set_nonblock(listener, true).is_err() {
        return;
    }
    let mut reset = 0usize;
    while let Ok(conn) = rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
        drop(conn);
        reset += 1;
    }
    if was_blocking {
        let _ = super::set_nonblock(listener, false);
    }
    if reset > 0 {
        tracing::debug!(
            app = call.app,
            reset,
            "connections queued on a listener shut down reset"
        );
    }
}

/// What an accept on a swapped listener would find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Empty,
    Waiting,
    /// The program shut the listener down (`shutdown(2)`). A TCP listener
    /// then stops listening and its accepts fail with `EINVAL`, which
    /// wakes a thread blocked in one; a UNIX listener keeps its state and
    /// its queue and would answer `EAGAIN`, on which a server polling the
    /// listener (readable for ever) would spin.
    ShutDown,
}

/// Polls `listener` without waiting: a connection waits, or none does, or
/// it was shut down.
fn queue_of(listener: &OwnedFd) -> Queue {
    let mut fds = [PollFd::new(listener, PollFlags::IN | PollFlags::RDHUP)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(n) if n > 0 => {
            if crate::probe::shut_down_in(fds[0].revents()) {
                Queue::ShutDown
            } else {
                Queue::Waiting
            }
        }
        _ => Queue::Empty,
    }
}

/// Accepts a connection waiting on `listener` (a swapped listener), if any,
/// and hands it over, going on with the next one while their clients had
/// left: the answer, or `None` when none is waiting.
fn take_waiting(
    call: &Call<'_>,
    target: &Target,
    listener: &OwnedFd,
    flags: SocketFlags,
    v6: bool,
    cloexec: bool,
) -> Option<Outcome> {
    loop {
        let done = try_accept(call, listener, flags)?
            .map_err(NotHanded::Failed)
            .and_then(|conn| {
                complete(
                    call,
                    target,
                    Some(listener),
                    conn,
                    v6,
                    cloexec,
                    Namespace::Private,
                )
            });
        if done != Err(NotHanded::ClientLeft) {
            return Some(answer(done));
        }
    }
}

/// Hands `conn`, accepted on `listener` (the broker's copy of the
/// program's, when at hand), over to the program. `namespace`: `Private`
/// for a connection accepted just now from a swapped listener, which is in
/// the broker's private namespace: the kernel makes an accepted UNIX socket
/// in its client's namespace, and a client finds an abstract name (every
/// swapped listener has one) only in its own, here the listener's.
/// `Unchecked` for one an earlier daemon parked.
fn complete(
    call: &Call<'_>,
    target: &Target,
    listener: Option<&OwnedFd>,
    conn: OwnedFd,
    v6: bool,
    cloexec: bool,
    namespace: Namespace,
) -> Result<Outcome, NotHanded> {
    // Who connected, from the peer's name (read once): a client under ax
    // (its VIP:port), or a doorbell, whose real connection takes its place.
    // The inode of the connection, where it was read already.
    let mut inode = None;
    let (conn, peer) = match caller_of(call, &conn, v6, false, namespace) {
        Caller::Client(local, known) => {
            inode = known;
            if let Some(listener) = listener {
                super::carry::inherit(call, listener, &conn, inode);
            }
            (conn, local)
        }
        // Rather than keep the server waiting for it (and every connection
        // behind it), the connection goes back behind a doorbell, and the
        // accept goes on with the next one.
        Caller::NotYet => match requeue(call, conn) {
            Ok(()) => return Err(NotHanded::ClientLeft),
            Err(conn) => return late_hello(call, target, conn, v6, cloexec),
        },
        // Not a connection the broker made (in its private namespace only
        // the broker binds names, so this is e.g. a program's own swapped
        // socket connected natively): never reported with a made-up
        // address. The program sees it as a connection reset before it
        // was accepted, and accepts again.
        Caller::Gone => return Err(NotHanded::ClientLeft),
        Caller::Unknown => {
            tracing::warn!(
                app = call.app,
                "dropped a connection to a listener of ax that the broker did not make"
            );
            drop(conn);
            return Err(NotHanded::Failed(libc::ECONNABORTED));
        }
        Caller::Door(token) => {
            let Some((real, names)) = call.shared.doors.answer(token) else {
                // Nobody keeps a connection for it (an earlier daemon
                // rang): nothing to hand over; the accept goes on.
                return Err(NotHanded::ClientLeft);
            };
            super::set_nonblock(&real, is_nonblocking(&conn))?;
            let kernel_peer = crate::doors::inet_peer(&real);
            match (names, kernel_peer) {
                // From another host of a cluster: the client's VIP:port,
                // kept for getpeername/getsockname too.
                (Some(names), _) => {
                    if let Some(listener) = listener {
                        super::remote::inherit_listener_options(call, listener, &real);
                    }
                    let peer = names.peer;
                    let local = super::inet_name(&real);
                    if let (Some(inode), Some(local), Some(kernel_peer)) =
                        (super::inode(&real), local, kernel_peer)
                    {
                        if call
                            .state
                            .note_remote(inode, (local, kernel_peer), names)
                            .is_err()
                        {
                            return Err(NotHanded::Failed(libc::ENOMEM));
                        }
                    }
                    (real, addr::peer_in_family(peer, v6))
                }
                (None, Some(peer)) => (real, addr::peer_in_family(peer, v6)),
                // One of the broker's own, put back by `requeue`: its
                // hello was late.
                (None, None) => return late_hello(call, target, real, v6, cloexec),
            }
        }
    };
    Ok(hand_over(call, target, conn, peer, inode, v6, cloexec)?)
}

/// Waits for the hello of `conn`, a connection whose hello was late, then
/// hands the connection over: here off the receive loop, on a helper
/// thread from it, where the wait (up to a second) would hold up every
/// trapped call of the app.
fn late_hello(
    call: &Call<'_>,
    target: &Target,
    conn: OwnedFd,
    v6: bool,
    cloexec: bool,
) -> Result<Outcome, NotHanded> {
    if !call.on_receive_loop() {
        let local = waited_hello(call, &conn, v6)?.ok_or(NotHanded::ClientLeft)?;
        return Ok(hand_over(call, target, conn, local, None, v6, cloexec)?);
    }
    // A client that left meanwhile fails this accept with `ECONNABORTED`,
    // a connection reset before it was accepted, which servers accept
    // again after.
    Ok(super::defer(call, move |call| {
        let target = match super::reopen(call) {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        match waited_hello(call, &conn, v6) {
            Ok(Some(local)) => hand_over(call, &target, conn, local, None, v6, cloexec).into(),
            Ok(None) => answer(Err(NotHanded::ClientLeft)),
            Err(e) => Outcome::Errno(e),
        }
    }))
}

/// Installs `conn`, from the client `peer` (`inode`: the connection's, if
/// read already), writing `peer` to the call's address buffer first.
fn hand_over(
    call: &Call<'_>,
    target: &Target,
    conn: OwnedFd,
    peer: std::net::SocketAddr,
    inode: Option<u64>,
    v6: bool,
    cloexec: bool,
) -> Result<Outcome, Errno> {
    // Park a duplicate where it outlives this daemon (see crate::Stash),
    // unless the fd keeper, which shares this table, holds it already.
    let stashed = !call
        .shared
        .fd_kept
        .load(std::sync::atomic::Ordering::Relaxed)
        && call
            .stash
            .as_ref()
            .is_some_and(|s| s.put(conn.as_fd()).is_ok());
    // The client's address first, as the kernel's accept copies it before
    // the program has the connection: a bad addr/addrlen loses the
    // connection and fails the call.
    let addr_ptr = call.arg(1);
    let written = if addr_ptr != 0 {
        write_sockaddr(target, addr_ptr, call.arg(2), &addr::encode(peer, v6))
    } else {
        Ok(())
    };
    let installed = written.and_then(|()| install(call, &conn, inode, cloexec));
    if stashed {
        if let Some(s) = call.stash {
            drop(s.take());
        }
    }
    installed
}

fn install(
    call: &Call<'_>,
    conn: &OwnedFd,
    inode: Option<u64>,
    cloexec: bool,
) -> Result<Outcome, Errno> {
    // Install, note it, and answer: from the moment the program holds the
    // connection, a daemon killed at any point loses nothing — its
    // successor finds the fd in the journal (or, killed between the
    // install and the note, the inode noted before it in the program's
    // fds), writes the address again and answers with it (see
    // `finish_installed`).
    //
    // Not `SECCOMP_ADDFD_FLAG_SEND`, though it would spare a wake-up: it
    // marks the call answered before the thread has installed the fd, and
    // a daemon killed while it waits for that withdraws the install but
    // not the answer — the thread's accept returns 0, an fd it never got,
    // and the connection is lost (the restart tests in `faults.rs` caught
    // it).
    if let Some(j) = call.journal {
        if let Some(inode) = inode.or_else(|| super::inode(conn)) {
            j.note_installing(call.notif.id, inode);
        }
    }
    match call
        .listener
        .add_fd(call.notif.id, conn.as_fd(), None, cloexec, false)
    {
        Ok(fd) => {
            if let Some(j) = call.journal {
                j.note_installed(call.notif.id, fd);
            }
            Ok(Outcome::Value(fd as i64))
        }
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::EINPROGRESS) => Ok(Outcome::Answered),
            Some(errno) => Err(errno),
            None => Err(libc::EIO),
        },
    }
}

/// Finishes an accept with `conn`, a connection an earlier daemon accepted
/// for it and parked before dying.
pub(crate) fn finish_with(call: &Call<'_>, conn: OwnedFd) -> Outcome {
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return answer,
    };
    let (v6, listener) = match classify(call, &target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd, .. }) => (name.is_v6(), Some(fd)),
        _ => (false, None),
    };
    let has_flags = call.notif.nr as libc::c_long == libc::SYS_accept4;
    let flags = if has_flags { call.int_arg(3) } else { 0 };
    if flags & libc::SOCK_NONBLOCK != 0 {
        let _ = super::set_nonblock(&conn, true);
    }
    let cloexec = flags & libc::SOCK_CLOEXEC != 0;
    match complete(
        call,
        &target,
        listener.as_ref(),
        conn,
        v6,
        cloexec,
        Namespace::Unchecked,
    ) {
        // Its client left before saying who it was: accept the next one.
        Err(NotHanded::ClientLeft) => handle(call, &target, has_flags),
        done => answer(done),
    }
}

/// Answers an accept whose connection an earlier daemon installed as fd
/// `fd` before dying: writes the client's address and returns `fd`.
pub(crate) fn finish_installed(call: &Call<'_>, fd: i32) -> Outcome {
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return answer,
    };
    let addr_ptr = call.arg(1);
    if addr_ptr != 0 {
        if let Ok(conn) = target.fd(fd as u64) {
            let v6 = match classify(call, &target, call.arg(0)) {
                Ok(Sock::Swapped { name, .. }) => name.is_v6(),
                _ => super::own_name(&conn).is_some_and(|n| n.is_v6()),
            };
            // A name is believed only on a socket the broker made.
            let named = call
                .shared
                .sockets
                .is_private(&conn)
                .then(|| super::peer_ident(call.shared, &conn))
                .flatten();
            let peer = match (crate::doors::inet_peer(&conn), named) {
                (Some(real), _) => addr::peer_in_family(real, v6),
                (None, Some(SocketName::Client { local, .. })) => local,
                _ => addr::unspecified(v6),
            };
            if let Err(e) = write_sockaddr(&target, addr_ptr, call.arg(2), &addr::encode(peer, v6))
            {
                return Outcome::Errno(e);
            }
        }
    }
    Outcome::Value(fd as i64)
}
