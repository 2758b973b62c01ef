//! Who is behind a connection a swapped listener accepted: only what the
//! broker says is believed (see `crate::idents`, `crate::doors`). A client
//! under ax sends the broker's hello ahead of any data; a doorbell is a
//! peer bound to a name only the broker binds; a connection an earlier
//! daemon accepted keeps the identity it noted. A hello not there yet
//! (the connecting thread of the broker was preempted between its
//! `connect` and its hello) is waited for a moment, then the connection
//! goes back behind a doorbell, so that the accept goes on with the next.

use super::Call;
use crate::names::SocketName;
use crate::target::Errno;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::sockopt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// How long an accepted connection's hello may take to arrive.
const HELLO_WAIT: Duration = Duration::from_secs(1);
/// How long an accept waits for a hello before it puts the connection
/// back behind a doorbell (its connecting thread was preempted).
const HELLO_BRIEF: Duration = Duration::from_millis(2);

/// Puts an accepted connection whose hello is not there yet back in its
/// listener's queue, behind a doorbell (see `crate::doors`); gives it
/// back when it cannot.
pub(super) fn requeue(call: &Call<'_>, conn: OwnedFd) -> Result<(), OwnedFd> {
    // An accepted socket bears its listener's name.
    let Some(listener @ SocketName::Listener { .. }) = super::own_name(&conn) else {
        return Err(conn);
    };
    let endpoint = ax_registry::UnixEndpoint::Abstract(listener.encode());
    call.shared
        .doors
        .ring(
            call.instance(),
            &call.shared.sockets,
            conn,
            &[endpoint],
            None,
        )
        .map_err(|(_, conn)| conn)
}

/// The client's VIP:port from the hello of `conn`, a connection whose hello
/// was late once already and is now waited for (up to [`HELLO_WAIT`]):
/// `None` when its client left; `ECONNABORTED` (logged) when no hello
/// comes.
pub(super) fn waited_hello(
    call: &Call<'_>,
    conn: &OwnedFd,
    v6: bool,
) -> Result<Option<SocketAddr>, Errno> {
    match caller_of(call, conn, v6, true, Namespace::Unchecked) {
        Caller::Client(local, _) => Ok(Some(local)),
        Caller::Gone => Ok(None),
        _ => {
            tracing::warn!(
                app = call.app,
                "dropped a connection whose hello did not come"
            );
            Err(libc::ECONNABORTED)
        }
    }
}

/// Who is behind an accepted connection.
pub(super) enum Caller {
    /// A client under ax, at this VIP:port.
    Client(SocketAddr, Option<u64>),
    /// A doorbell ([`crate::doors`]) with this token.
    Door(u64),
    /// Anyone else.
    Unknown,
    /// A client of the broker's that closed the connection before its
    /// hello was written.
    Gone,
    /// A client of the broker's whose hello is on its way: the thread that
    /// connected it was preempted between its `connect` and its hello.
    NotYet,
}

/// What is known of an accepted connection's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Namespace {
    /// The broker's private one: it was accepted from a listener known to
    /// be there.
    Private,
    /// Not known yet: [`caller_of`] asks the kernel.
    Unchecked,
}

/// Who connected: only a connection in the broker's private namespace is
/// believed, and there only what the broker says: a peer bound to a
/// doorbell name (only the broker binds names there), an identity the
/// broker kept for this connection, or the hello the broker's client
/// socket sent ahead of any data (see `crate::idents`).
pub(super) fn caller_of(
    call: &Call<'_>,
    conn: &OwnedFd,
    v6: bool,
    may_wait: bool,
    namespace: Namespace,
) -> Caller {
    if namespace == Namespace::Unchecked && !call.shared.sockets.is_private(conn) {
        return Caller::Unknown;
    }
    // The common case: a fresh connection, the broker's hello at its head
    // (a doorbell carries no bytes, let alone the broker's secret).
    let first = peek_hello(call, conn, None);
    if let Hello::Valid(client) = first {
        return keep(call, conn, client, v6);
    }
    let name = rustix::net::getpeername(conn)
        .ok()
        .flatten()
        .and_then(|a| rustix::net::SocketAddrUnix::try_from(a).ok());
    if let Some(name) = name.as_ref().and_then(|n| n.abstract_name()) {
        if let Some(token) = crate::doors::token_of(call.instance(), name) {
            return Caller::Door(token);
        }
    }
    // Accepted by an earlier daemon, which took its hello out (its client
    // may have said all and left since); or made by an earlier version of
    // ax, which bound its client sockets.
    if let Some(SocketName::Client { local, .. }) = super::peer_ident(call.shared, conn) {
        return Caller::Client(local, None);
    }
    match first {
        Hello::Gone => return Caller::Gone,
        // Its connect has just returned on another thread of the broker,
        // which writes the hello next: a moment's wait is the common case.
        Hello::NotYet => match peek_hello(call, conn, Some(Instant::now() + HELLO_BRIEF)) {
            Hello::Valid(client) => return keep(call, conn, client, v6),
            Hello::Gone => return Caller::Gone,
            _ if !may_wait => return Caller::NotYet,
            _ => {}
        },
        _ => {}
    }
    match peek_hello(call, conn, Some(Instant::now() + HELLO_WAIT)) {
        Hello::Valid(client) => keep(call, conn, client, v6),
        Hello::Gone => Caller::Gone,
        Hello::Missing | Hello::NotYet => {
            tracing::warn!(
                app = call.app,
                "a connection did not start with the broker's hello"
            );
            Caller::Unknown
        }
    }
}

/// Keeps the identity a hello gave for the accepted connection, then takes
/// the hello out: a daemon killed in between leaves a successor the hello
/// or the identity, never neither.
fn keep(call: &Call<'_>, conn: &OwnedFd, client: SocketName, v6: bool) -> Caller {
    let (Ok(cookie), Some(inode)) = (sockopt::socket_cookie(conn), super::inode(conn)) else {
        return Caller::Unknown;
    };
    let kept =
        call.shared
            .idents
            .insert(cookie, inode, crate::idents::Kind::Peer, client, Some(v6));
    match (kept, client) {
        (Ok(()), SocketName::Client { local, .. }) => {
            take_hello(conn);
            Caller::Client(local, Some(inode))
        }
        _ => {
            tracing::warn!(
                app = call.app,
                "connection dropped: the identity table is full"
            );
            Caller::Unknown
        }
    }
}

/// What an accepted connection starts with.
enum Hello {
    /// The broker's hello, naming the client.
    Valid(SocketName),
    /// Nothing, and its client is gone.
    Gone,
    /// Nothing yet (when not waiting).
    NotYet,
    /// Anything else, or nothing in time.
    Missing,
}

/// Looks (without taking it) at the hello at the head of an accepted
/// connection: written by the broker right after it connected, so already
/// there but for a thread of the broker preempted in between; waited for
/// until `deadline` (`None`: not at all). A hello is sent whole, in one
/// write, so it is never seen in part.
fn peek_hello(call: &Call<'_>, conn: &OwnedFd, deadline: Option<Instant>) -> Hello {
    use crate::idents::HELLO_LEN;
    let mut hello = [0u8; HELLO_LEN];
    let flags = rustix::net::RecvFlags::DONTWAIT | rustix::net::RecvFlags::PEEK;
    loop {
        match rustix::net::recv(conn, &mut hello[..], flags) {
            Ok((0, _)) => return Hello::Gone,
            Ok((n, _)) if n == HELLO_LEN => break,
            Ok(_) => return Hello::Missing,
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {
                let Some(deadline) = deadline else {
                    return Hello::NotYet;
                };
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    return Hello::Missing;
                };
                let mut fds = [PollFd::new(conn, PollFlags::IN)];
                let Ok(wait) = Timespec::try_from(left) else {
                    return Hello::Missing;
                };
                let _ = poll(&mut fds, Some(&wait));
            }
            Err(_) => return Hello::Missing,
        }
    }
    match call.shared.idents.read_hello(&hello) {
        Some(name) => Hello::Valid(name),
        None => Hello::Missing,
    }
}

/// Takes the hello [`peek_hello`] found out of the connection.
fn take_hello(conn: &OwnedFd) {
    let mut hello = [0u8; crate::idents::HELLO_LEN];
    let _ = rustix::net::recv(conn, &mut hello[..], rustix::net::RecvFlags::DONTWAIT);
}
