//! The broker's client sockets, the far end of a connect to a VIP: one is
//! made with a client identity (the client's VIP:port and the destination,
//! see `crate::idents`), connected to a service's listener (waiting, off
//! the receive loop, for room in a full backlog), and installed over the
//! program's socket once its hello is on its way ahead of the program's
//! data. Also what such a connect leaves behind: a non-blocking socket
//! told `EINPROGRESS`, and the service of a bound socket withdrawn.

use super::{
    defer, endpoint_addr, endpoint_alive, install_over_with, is_nonblocking, Call, Outcome,
};
use crate::names::SocketName;
use crate::serve::next_client_port;
use crate::target::{errno_of, Errno, Target};
use ax_registry::UnixEndpoint;
use rustix::net::sockopt::{self, Timeout};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a connect to a service whose backlog is full may wait.
const FULL_BACKLOG_WAIT: Duration = Duration::from_secs(60);

/// How often that wait checks that its caller still waits.
pub(super) const BACKLOG_SLICE: Duration = Duration::from_millis(50);

fn client_vip(vips: &[IpAddr], dst: SocketAddr) -> IpAddr {
    let same = vips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4());
    match (same, dst.ip()) {
        (Some(ip), _) => *ip,
        (None, IpAddr::V6(_)) => vips
            .first()
            .copied()
            .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        (None, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

/// Connects a new UNIX socket, whose identity is the client's VIP:port and
/// the destination, to the first of `endpoints` that takes it (a backend that
/// refuses is skipped and forgotten), and installs it over the program's
/// socket. `waiting`: already off the receive loop, so a full backlog is
/// waited for here. `None`: no backend took the connection.
#[allow(clippy::too_many_arguments)]
pub(super) fn deliver(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    rebind: Option<SocketName>,
    endpoints: Vec<UnixEndpoint>,
    local_port: u16,
    waiting: bool,
) -> Result<Option<Outcome>, Errno> {
    let dir = &call.shared.directory;
    // A port the program bound before connecting is kept.
    let bound_port = match rebind {
        Some(SocketName::Listener { bound, .. }) => bound.port(),
        _ => local_port,
    };
    // The family of the service reached (see `Directory::served_addr`).
    let local_ip = client_vip(&dir.app_vips(call.app), dir.served_addr(dst));
    let client = new_client(call, v6, local_ip, bound_port, dst)?;
    for endpoint in endpoints {
        let target_addr = endpoint_addr(&endpoint)?;
        match rustix::net::connect(&client.sock, &target_addr) {
            Ok(()) => return finish(call, target, copy, client, rebind).map(Some),
            Err(e) if e == rustix::io::Errno::AGAIN => {
                // The listener's backlog is full: TCP would keep retrying
                // its SYN; wait for room off the receive loop.
                if waiting {
                    return wait_for_room(call, copy, client, target_addr, rebind).map(Some);
                }
                let copy = copy.try_clone().map_err(|e| errno_of(&e))?;
                return Ok(Some(defer(call, move |call| {
                    wait_for_room(call, &copy, client, target_addr, rebind).into()
                })));
            }
            Err(e) => {
                if !endpoint_alive(call.shared, &endpoint) {
                    dir.release(&endpoint);
                }
                tracing::debug!(app = call.app, %dst, %endpoint, error = %e, "backend did not accept; trying the next");
            }
        }
    }
    Ok(None)
}

/// Waits, off the receive loop, for room in a full listener's backlog.
pub(super) fn wait_for_room(
    call: &Call<'_>,
    copy: &OwnedFd,
    mut client: Client,
    target_addr: rustix::net::SocketAddrUnix,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    // Wait for room in short slices: a program killed meanwhile, or
    // interrupted by a signal, must not keep this thread (and what it
    // holds) for the whole wait.
    client.set_nonblocking(false)?;
    let sock = &client.sock;
    sockopt::set_socket_timeout(sock, Timeout::Send, Some(BACKLOG_SLICE))
        .map_err(|e| e.raw_os_error())?;
    let deadline = Instant::now() + FULL_BACKLOG_WAIT;
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return Ok(answer),
    };
    loop {
        match rustix::net::connect(sock, &target_addr) {
            Ok(()) => break,
            Err(e) if e == rustix::io::Errno::AGAIN => {}
            Err(e) => return Err(e.raw_os_error()),
        }
        if !call.still_valid() {
            return Ok(Outcome::Answered);
        }
        if target.signal_pending() {
            return Err(libc::EINTR);
        }
        if Instant::now() >= deadline {
            return Err(libc::ETIMEDOUT);
        }
    }
    sockopt::set_socket_timeout(sock, Timeout::Send, None).map_err(|e| e.raw_os_error())?;
    finish(call, &target, copy, client, rebind)
}

/// A new client socket of the broker's with its identity: the client's
/// VIP:port (a free client port unless the program bound one) and the
/// destination. The socket stays unbound, so that its peer's `recvfrom`
/// reports no address, as over TCP: the broker keeps the identity (see
/// `crate::idents`), and [`finish`] sends it to the listener ahead of the
/// program's data.
pub(super) fn new_client(
    call: &Call<'_>,
    v6: bool,
    local_ip: IpAddr,
    bound_port: u16,
    dst: SocketAddr,
) -> Result<Client, Errno> {
    // Non-blocking, as spare sockets come (see `Sockets::take`): the
    // connect below never waits on the receive loop.
    let spare = call.shared.sockets.take_spare()?;
    let name_with = |port: u16| SocketName::Client {
        instance: call.instance(),
        v6,
        local: SocketAddr::new(local_ip, port),
        peer: dst,
    };
    let name = if bound_port != 0 {
        name_with(bound_port)
    } else {
        free_client_name(call, name_with)?
    };
    let (sock, inode) = (spare.fd, spare.inode);
    call.shared
        .idents
        .insert(spare.cookie, inode, crate::idents::Kind::Own, name, None)
        .map_err(|_| {
            tracing::warn!(
                app = call.app,
                "connection refused: the identity table is full"
            );
            libc::ENOBUFS
        })?;
    Ok(Client {
        hello: call.shared.idents.hello(&name),
        sock,
        inode,
        nonblocking: true,
        v6,
    })
}

/// The client identity, `name_with` a port in turn, that no live client
/// socket of the broker's holds, as the kernel gives a connection an
/// ephemeral port no connection to the same destination uses;
/// `EADDRNOTAVAIL`, as the kernel's, when all are taken. (Ports are drawn
/// from one counter, so two connects at once never draw the same.)
fn free_client_name(
    call: &Call<'_>,
    name_with: impl Fn(u16) -> SocketName,
) -> Result<SocketName, Errno> {
    (0..crate::serve::CLIENT_PORTS)
        .map(|_| name_with(next_client_port(call.shared)))
        .find(|name| !call.shared.idents.client_taken(name))
        .ok_or(libc::EADDRNOTAVAIL)
}

/// The hello a client socket sends ahead of the program's data.
pub(super) type Hello = [u8; crate::idents::HELLO_LEN];

/// A client socket of the broker's, named (see [`new_client`]) and
/// about to connect.
pub(super) struct Client {
    pub(super) sock: OwnedFd,
    /// Its inode: the key of its state.
    inode: u64,
    /// Whether its file is non-blocking now.
    nonblocking: bool,
    hello: Hello,
    /// Whether the program's socket is `AF_INET6`.
    v6: bool,
}

impl Client {
    /// Makes the socket's file blocking or not. Its only settable status
    /// flag is `O_NONBLOCK` (spare sockets come with nothing else set, and
    /// the broker sets nothing else), so one `fcntl` sets them all, where
    /// [`super::set_nonblock`] needs two for a file whose flags it does not know.
    fn set_nonblocking(&mut self, on: bool) -> Result<(), Errno> {
        if on == self.nonblocking {
            return Ok(());
        }
        let flags = if on {
            rustix::fs::OFlags::NONBLOCK
        } else {
            rustix::fs::OFlags::empty()
        };
        rustix::fs::fcntl_setfl(&self.sock, flags).map_err(|e| e.raw_os_error())?;
        self.nonblocking = on;
        Ok(())
    }
}

/// Sends the client socket's hello (see `crate::idents`) to the listener it
/// just connected to, before the program holds the socket.
fn send_hello(sock: &OwnedFd, hello: &Hello) -> Result<(), Errno> {
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    match rustix::net::send(sock, hello, flags) {
        Ok(n) if n == hello.len() => Ok(()),
        // An empty socket takes far more: the listener is gone.
        _ => Err(libc::ECONNREFUSED),
    }
}

/// Installs the connected UNIX socket over the program's. A non-blocking
/// socket is told `EINPROGRESS`, as TCP tells it, though the connection is
/// already made: the next `connect` then answers 0, and `SO_ERROR` 0.
pub(super) fn finish(
    call: &Call<'_>,
    target: &Target,
    copy: &OwnedFd,
    mut client: Client,
    rebind: Option<SocketName>,
) -> Result<Outcome, Errno> {
    send_hello(&client.sock, &client.hello)?;
    // The program's flags, read once for both (and once in the call: an
    // app that connects again read them to look the fd up, see
    // `connect.rs`'s `connect_known`).
    let (nonblocking, cloexec) = match call.fd_info(target) {
        Some(info) => (
            info.flags & libc::O_NONBLOCK as u32 != 0,
            info.flags & libc::O_CLOEXEC as u32 != 0,
        ),
        None => (is_nonblocking(copy), true),
    };
    client.set_nonblocking(nonblocking)?;
    let sock = client.sock;
    super::copy_timeouts(copy, &sock);
    let swapped = super::carry::Swapped {
        fd: sock.as_fd(),
        inode: client.inode,
        listener: None,
    };
    super::carry::carry(call, copy, client.v6, swapped);
    if nonblocking {
        set_in_progress(call, client.inode, true);
    }
    // No ID_VALID here: ADDFD itself fails for a call nobody waits on.
    let outcome = install_over_with(call, call.arg(0), &sock, cloexec);
    if let Outcome::Value(_) = outcome {
        if let Some(name) = rebind {
            release_listener(call, name);
        }
        if nonblocking {
            return Ok(Outcome::Errno(libc::EINPROGRESS));
        }
    }
    Ok(outcome)
}

/// Withdraws the service a bound socket registered, once the socket has
/// been replaced by a connection.
pub(super) fn release_listener(call: &Call<'_>, name: SocketName) {
    if let SocketName::Listener { .. } = name {
        call.shared
            .directory
            .release(&UnixEndpoint::Abstract(name.encode()));
    }
}

/// Marks (or clears) a swapped client socket as told `EINPROGRESS` and not
/// connected again since.
fn set_in_progress(call: &Call<'_>, inode: u64, on: bool) {
    let key = super::state_key_of(inode, super::STATE_CONNECT_IN_PROGRESS);
    if !on {
        call.state.forget_option(key);
    } else if call.state.remember_option(key, vec![1]).is_err() {
        // The next connect then answers EISCONN rather than 0, which
        // programs polling for completion take as connected too.
        tracing::debug!(app = call.app, "in-progress state not kept: table full");
    }
}

/// True (once) if the socket was told `EINPROGRESS` and not connected again.
pub(super) fn take_in_progress(call: &Call<'_>, sock: &OwnedFd) -> bool {
    super::inode(sock).is_some_and(|inode| take_in_progress_of(call, inode))
}

/// [`take_in_progress`] of the socket with `inode`.
pub(super) fn take_in_progress_of(call: &Call<'_>, inode: u64) -> bool {
    let key = super::state_key_of(inode, super::STATE_CONNECT_IN_PROGRESS);
    if call.state.recall_option(key) != Some(vec![1]) {
        return false;
    }
    set_in_progress(call, inode, false);
    true
}
