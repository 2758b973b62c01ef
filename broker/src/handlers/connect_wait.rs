//! A connect to a service that is not up yet, under `--connect-wait`: a
//! blocking one waits on a helper thread until the service appears (or
//! the wait ends in `ECONNREFUSED`); a non-blocking one is held back on a
//! loopback port whose accept queue the broker keeps full, "in progress"
//! as over TCP, and handed to the service when it comes up.

use super::client::{deliver, BACKLOG_SLICE};
use super::{inet_name, log_denied, loopback_port, tcp_socket, Call, Outcome};
use crate::addr;
use crate::names::SocketName;
use crate::target::{errno_of, Errno};
use ax_registry::ResolveError;
use rustix::net::SocketFlags;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often a connect waiting for a service that is bound but not yet
/// listening tries again.
const NOT_LISTENING_YET: Duration = Duration::from_millis(10);

/// A blocking connect to a service that is not up yet, under
/// `--connect-wait`: waits (in slices, so that a program killed or
/// signalled meanwhile is noticed) until the service appears or the wait
/// ends in `ECONNREFUSED`.
pub(super) fn wait_for_service(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
    wait: Duration,
) -> Result<Outcome, Errno> {
    let dir = &call.shared.directory;
    let deadline = deadline_after(wait);
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return Ok(answer),
    };
    tracing::debug!(app = call.app, %dst, ?wait, "connect waits for the service");
    loop {
        let seen = dir.generation();
        // A service is registered at `bind`, and takes connections from
        // its `listen` on: until then, keep looking every slice.
        let mut slice = BACKLOG_SLICE;
        match dir.resolve(call.app, dst) {
            Ok(endpoints) => {
                let local_port = inet_name(copy).map_or(0, |a| a.port());
                if let Some(outcome) = deliver(
                    call, &target, copy, v6, dst, rebind, endpoints, local_port, true,
                )? {
                    return Ok(outcome);
                }
                slice = NOT_LISTENING_YET;
            }
            // Up on another host of a cluster meanwhile: host to host (for
            // `connect`; Fast Open's `sendto` goes on waiting for a local
            // service, as it never reaches another host).
            Err(ResolveError::NoService(_)) if !is_connect(call) => {}
            Err(ResolveError::NoService(_)) => match dir.remote(call.app, dst) {
                Ok(Some(route)) => {
                    return Ok(super::remote::connect_here(
                        call, copy, v6, dst, route, rebind,
                    ))
                }
                Ok(None) => {}
                Err(e) => {
                    log_denied(&e);
                    return Ok(Outcome::Errno(libc::ECONNREFUSED));
                }
            },
            Err(e) => {
                log_denied(&e);
                return Ok(Outcome::Errno(libc::ECONNREFUSED));
            }
        }
        if !call.still_valid() {
            return Ok(Outcome::Answered);
        }
        if target.signal_pending() {
            return Err(libc::EINTR);
        }
        let now = Instant::now();
        if now >= deadline {
            tracing::debug!(app = call.app, %dst, "connect-wait ended: no service");
            return Ok(Outcome::Errno(libc::ECONNREFUSED));
        }
        dir.wait_for_change(seen, deadline.min(now + slice));
    }
}

/// Whether the call is `connect` (not Fast Open's `sendto`/`sendmsg`).
fn is_connect(call: &Call<'_>) -> bool {
    libc::c_long::from(call.notif.nr) == libc::SYS_connect
}

/// `wait` from now; a wait too long to add ends at the longest allowed.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(ax_registry::MAX_CONNECT_WAIT))
        .unwrap_or(now)
}

/// A non-blocking connect to a service that is not up yet, under
/// `--connect-wait`. The program's own TCP socket connects to a loopback
/// port whose accept queue the broker keeps full, so its SYN goes
/// unanswered and the socket stays "in progress" (`EINPROGRESS`, not
/// writable), registered in the program's `epoll` as usual. Meanwhile a
/// helper waits for the service:
///
/// * it comes up: the broker makes room in the queue; the program's next
///   SYN (the kernel retries within a second) is accepted, and the
///   accepted TCP connection is handed to the server like an exposed one
///   ([`crate::doors`]): client and server then talk over TCP loopback,
///   never through the broker;
/// * the wait ends: the port closes, and the next SYN is refused, so the
///   program sees `ECONNREFUSED` from `SO_ERROR`;
/// * the program closes its socket, or the app exits: the wait ends at
///   once, freeing its thread and ports.
///
/// An app holds at most `crate::appstate::MAX_HELD_CONNECTS` connects at
/// once; one more fails with `ENOBUFS`.
pub(super) fn wait_in_background(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    wait: Duration,
) -> Outcome {
    let Some(held_permit) = call.state.held_connects.take() else {
        return Outcome::Errno(libc::ENOBUFS);
    };
    let Some(inode) = super::inode(copy) else {
        return Outcome::Errno(libc::ENOBUFS);
    };
    let caller = crate::target::thread_group_leader(call.notif.pid).ok();
    let hold = match HeldConnect::start(copy, v6) {
        Ok(h) => {
            let noted = h
                .address()
                .map(|held| call.state.note_held_connect(inode, held, dst));
            if !matches!(noted, Some(Ok(()))) {
                // Dropping the hold closes its port: the program's
                // connect, under way, is refused.
                return Outcome::Errno(libc::ENOBUFS);
            }
            h
        }
        Err(e) => {
            tracing::debug!(app = call.app, %dst, errno = e, "cannot hold the connect back");
            return Outcome::Errno(libc::ECONNREFUSED);
        }
    };
    let shared = call.shared.clone();
    let state = call.state.clone();
    let app = call.app;
    tracing::debug!(app, %dst, ?wait, "connect held until the service is up");
    let spawned = call.shared.pool.spawn(Box::new(move || {
        let _permit = held_permit;
        let caller_holds = || {
            state.is_alive()
                && caller.is_some_and(|pid| {
                    crate::orphans::socket_fds(pid)
                        .iter()
                        .any(|&(_, i)| i == inode)
                })
        };
        hold.wait_and_hand_over(&shared, app, dst, wait, &caller_holds);
    }));
    match spawned {
        Ok(()) => Outcome::Errno(libc::EINPROGRESS),
        Err(_) => Outcome::Errno(libc::ENOBUFS),
    }
}

/// A program's TCP connect held back on a loopback port with a full
/// accept queue (see [`wait_in_background`]).
struct HeldConnect {
    port_listener: OwnedFd,
    /// Fills the queue (a listen backlog of 0 takes one connection).
    filler: OwnedFd,
}

impl HeldConnect {
    /// The loopback address the program's socket connects to.
    fn address(&self) -> Option<SocketAddr> {
        inet_name(&self.port_listener)
    }

    fn start(program_socket: &OwnedFd, v6: bool) -> Result<Self, Errno> {
        let errno = |e: rustix::io::Errno| e.raw_os_error();
        let (port_listener, here) = loopback_port()?;
        rustix::net::listen(&port_listener, 0).map_err(errno)?;
        let filler = tcp_socket(false)?;
        rustix::net::connect(&filler, &here).map_err(errno)?;
        let bytes = addr::encode(here, v6);
        match ax_sys::sockaddr::connect_raw(program_socket.as_fd(), &bytes) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Ok(()) => return Err(libc::EIO),
            Err(e) => return Err(errno_of(&e)),
        }
        Ok(Self {
            port_listener,
            filler,
        })
    }

    fn wait_and_hand_over(
        self,
        shared: &std::sync::Arc<crate::serve::Shared>,
        app: ax_registry::AppId,
        dst: SocketAddr,
        wait: Duration,
        caller_holds: &dyn Fn() -> bool,
    ) {
        let dir = &shared.directory;
        let deadline = deadline_after(wait);
        let endpoints = loop {
            let seen = dir.generation();
            match dir.resolve(app, dst) {
                Ok(endpoints) => break endpoints,
                // Up on another host: the program's socket, held on a
                // loopback port, cannot be handed there; it is refused now
                // rather than at the end of the wait, and a new connect
                // goes host to host.
                Err(ResolveError::NoService(_)) if matches!(dir.remote(app, dst), Ok(Some(_))) => {
                    tracing::info!(app, %dst, "connect-wait ended: the service is up on another host; a non-blocking connect held is refused, the next one reaches it");
                    return;
                }
                Err(ResolveError::NoService(_)) => {}
                Err(e) => {
                    log_denied(&e);
                    return; // closing the port refuses the program's SYN
                }
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(app, %dst, "connect-wait ended: no service");
                return;
            }
            if !caller_holds() {
                tracing::debug!(app, %dst, "connect-wait ended: the program closed its socket");
                return;
            }
            dir.wait_for_change(seen, deadline.min(now + Duration::from_secs(1)));
        };
        // Room for the program's SYN, which the kernel retries within a
        // second (tcp_syn_linear_timeouts); a program that closed its
        // socket meanwhile never comes.
        drop(rustix::net::accept(&self.port_listener));
        drop(self.filler);
        let mut fds = [rustix::event::PollFd::new(
            &self.port_listener,
            rustix::event::PollFlags::IN,
        )];
        let limit = rustix::event::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        if !matches!(rustix::event::poll(&mut fds, Some(&limit)), Ok(n) if n > 0) {
            return;
        }
        let Ok(mut conn) = rustix::net::accept_with(&self.port_listener, SocketFlags::CLOEXEC)
        else {
            return;
        };
        // The service may be bound and not listening yet: ring again until
        // it answers, or the wait ends (the program then sees the
        // connection closed).
        let mut endpoints = endpoints;
        loop {
            match shared.doors.ring(
                shared.config.instance,
                &shared.sockets,
                conn,
                &endpoints,
                None,
            ) {
                Ok(()) => {
                    tracing::debug!(app, %dst, "held connect handed to the service");
                    return;
                }
                Err((e, back)) => {
                    if Instant::now() >= deadline {
                        tracing::debug!(app, %dst, error = %e, "held connect not taken by the service");
                        return;
                    }
                    conn = back;
                }
            }
            std::thread::sleep(NOT_LISTENING_YET);
            if let Ok(eps) = dir.resolve(app, dst) {
                endpoints = eps;
            }
        }
    }
}
