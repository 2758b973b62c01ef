//! `connect` to a service on another host of a cluster.
//!
//! * Inputs: the program's TCP socket, the VIP:port it dialled, and the
//!   route the directory found in its local copy of the cluster's table
//!   (the node's cluster address, the client's VIP).
//! * Decision: the directory already applied the policy; here the broker
//!   only connects.
//! * Effect: a fresh TCP socket of the broker connects to the node's
//!   cluster port and writes the header the directory gives (target,
//!   client VIP:port, labels, authentication) before anything of the
//!   program's; then it takes the program's fd number, carrying the
//!   options the program had set on its socket before `connect` (buffer
//!   sizes, `TCP_NODELAY`, keepalive, timeouts…: see [`Carried`]). From
//!   then on the data flows between the two programs' own sockets.
//!   `getsockname` and `getpeername` answer the client's VIP:port and the
//!   VIP:port dialled (see `crate::doors::VirtualNames`).
//! * A blocking connect that `--connect-wait` holds for a service that then
//!   comes up on another host ends here too ([`connect_here`]).
//! * On the server's host, a connection from another node that a listener
//!   of the program accepts gets the TCP/IP options the program set on
//!   that listener ([`inherit_listener_options`]), as the kernel's
//!   accepted sockets inherit their listener's.

use super::{install_over, is_nonblocking, set_nonblock, Call, Outcome};
use crate::doors::VirtualNames;
use crate::names::SocketName;
use crate::target::Errno;
use ax_registry::RemoteRoute;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// How long connecting to another node and writing the header may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects the program's socket (`copy`) to `dst` on `route`'s node.
/// `rebind`: the program's swapped socket, whose listener name goes once
/// the connection takes its place.
pub(super) fn connect(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    route: RemoteRoute,
    rebind: Option<SocketName>,
) -> Outcome {
    let nonblocking = is_nonblocking(copy);
    // Read whole below, not from the notes (see `super::carry`).
    super::carry::forget(call, copy);
    // The options are read on the helper thread, from a copy of the fd:
    // fifteen `getsockopt` calls the app's receive loop need not wait for.
    // Without a spare fd for the copy, they are read here.
    let options = match copy.try_clone() {
        Ok(fd) => Options::Later(fd),
        Err(_) => Options::Read(Carried::read(copy)),
    };
    super::defer(call, move |call| {
        let carried = match options {
            Options::Later(fd) => Carried::read(&fd),
            Options::Read(carried) => carried,
        };
        finish(call, nonblocking, v6, dst, &route, rebind, &carried)
    })
}

/// The program's socket options, or the copy of its fd to read them from.
enum Options {
    Read(Carried),
    Later(OwnedFd),
}

/// [`connect`], for a call already on a helper thread: a blocking connect
/// that `--connect-wait` held until the service appeared on another host.
pub(super) fn connect_here(
    call: &Call<'_>,
    copy: &OwnedFd,
    v6: bool,
    dst: SocketAddr,
    route: RemoteRoute,
    rebind: Option<SocketName>,
) -> Outcome {
    let carried = Carried::read(copy);
    finish(
        call,
        is_nonblocking(copy),
        v6,
        dst,
        &route,
        rebind,
        &carried,
    )
}

/// Connects to the node, and installs the connection over the program's
/// socket.
fn finish(
    call: &Call<'_>,
    nonblocking: bool,
    v6: bool,
    dst: SocketAddr,
    route: &RemoteRoute,
    rebind: Option<SocketName>,
    carried: &Carried,
) -> Outcome {
    let (fresh, names) = match open(call, route, dst, v6, carried) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(app = call.app, %dst, node = %route.node, cluster = %route.cluster, errno = e, "connect to another node failed");
            return Outcome::Errno(e);
        }
    };
    if let Err(e) = set_nonblock(&fresh, nonblocking) {
        return Outcome::Errno(e);
    }
    let target = match super::reopen(call) {
        Ok(t) => t,
        Err(answer) => return answer,
    };
    if !call.still_valid() {
        return Outcome::Answered;
    }
    // Noted before the program can ask, and for the socket it will hold.
    let real = (super::inet_name(&fresh), crate::doors::inet_peer(&fresh));
    if let (Some(inode), (Some(local), Some(peer))) = (super::inode(&fresh), real) {
        if call.state.note_remote(inode, (local, peer), names).is_err() {
            return Outcome::Errno(libc::ENOMEM);
        }
    }
    match install_over(call, &target, call.arg(0), &fresh) {
        Outcome::Value(_) => {
            if let Some(name) = rebind {
                super::client::release_listener(call, name);
            }
            tracing::debug!(app = call.app, %dst, node = %route.node, "connected to another node");
            Outcome::Value(0)
        }
        other => other,
    }
}

/// A TCP connection to `route`'s node that has carried the header, and the
/// virtual addresses it stands for; of the program's family (`v6`), so
/// that the socket behaves as the one it replaces (an IPv4 node is then
/// reached at its v4-mapped address), with the program's options
/// (`carried`).
fn open(
    call: &Call<'_>,
    route: &RemoteRoute,
    dst: SocketAddr,
    v6: bool,
    carried: &Carried,
) -> Result<(OwnedFd, VirtualNames), Errno> {
    let (family, node) = match (v6, route.cluster) {
        (true, SocketAddr::V4(a)) => (
            AddressFamily::INET6,
            SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        ),
        (true, a) => (AddressFamily::INET6, a),
        (false, SocketAddr::V4(a)) => (AddressFamily::INET, SocketAddr::V4(a)),
        // An IPv4 socket cannot reach an IPv6 node.
        (false, SocketAddr::V6(_)) => return Err(libc::ENETUNREACH),
    };
    let sock = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| e.raw_os_error())?;
    // Before connect: the buffer sizes bear on the window the SYN offers.
    carried.apply(&sock);
    // connect and write honour the send timeout.
    sockopt::set_socket_timeout(&sock, Timeout::Send, Some(CONNECT_TIMEOUT))
        .map_err(|e| e.raw_os_error())?;
    sockopt::set_tcp_nodelay(&sock, true).map_err(|e| e.raw_os_error())?;
    rustix::net::connect(&sock, &node).map_err(|e| match e {
        // A node that does not answer in time: as an unanswered SYN would.
        rustix::io::Errno::INPROGRESS | rustix::io::Errno::AGAIN => libc::ETIMEDOUT,
        e => e.raw_os_error(),
    })?;
    let local = super::inet_name(&sock).ok_or(libc::EIO)?;
    let from = SocketAddr::new(route.client_vip, local.port());
    let header = call
        .shared
        .directory
        .remote_header(call.app, route, dst, from);
    let mut sent = 0;
    while sent < header.len() {
        match rustix::io::write(&sock, &header[sent..]) {
            Ok(0) => return Err(libc::ECONNRESET),
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.raw_os_error()),
        }
    }
    // The program's own choices from here on.
    sockopt::set_socket_timeout(&sock, Timeout::Send, carried.send_timeout)
        .map_err(|e| e.raw_os_error())?;
    sockopt::set_tcp_nodelay(&sock, carried.nodelay).map_err(|e| e.raw_os_error())?;
    Ok((
        sock,
        VirtualNames {
            local: from,
            peer: dst,
        },
    ))
}

/// What the program had set on its TCP socket before `connect`, read from
/// it so that the socket that replaces it behaves the same: a program that
/// sized its buffers, turned Nagle off or keepalive on keeps them across
/// hosts. A value is set on the new socket only where it differs from that
/// socket's own default (a buffer size set there would turn the kernel's
/// autotuning off). Unreadable options (a socket that is not TCP, which
/// only a swapped one is) are left at their defaults.
#[derive(Debug, Default)]
struct Carried {
    /// `SO_RCVBUF`, `SO_SNDBUF`, as read back: twice what was asked.
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    keepalive: Option<bool>,
    linger: Option<Option<Duration>>,
    recv_timeout: Option<Duration>,
    send_timeout: Option<Duration>,
    nodelay: bool,
    keepidle: Option<Duration>,
    keepintvl: Option<Duration>,
    keepcnt: Option<u32>,
    user_timeout: Option<u32>,
    congestion: Option<String>,
    tos: Option<u8>,
    tclass: Option<u32>,
}

impl Carried {
    fn read(program: &OwnedFd) -> Carried {
        use sockopt as o;
        let tcp = matches!(
            o::socket_domain(program),
            Ok(AddressFamily::INET | AddressFamily::INET6)
        );
        if !tcp {
            return Carried::default();
        }
        Carried {
            recv_buffer: o::socket_recv_buffer_size(program).ok(),
            send_buffer: o::socket_send_buffer_size(program).ok(),
            keepalive: o::socket_keepalive(program).ok(),
            linger: o::socket_linger(program).ok(),
            recv_timeout: o::socket_timeout(program, Timeout::Recv).ok().flatten(),
            send_timeout: o::socket_timeout(program, Timeout::Send).ok().flatten(),
            nodelay: o::tcp_nodelay(program).unwrap_or(false),
            keepidle: o::tcp_keepidle(program).ok(),
            keepintvl: o::tcp_keepintvl(program).ok(),
            keepcnt: o::tcp_keepcnt(program).ok(),
            user_timeout: o::tcp_user_timeout(program).ok(),
            congestion: o::tcp_congestion(program).ok(),
            tos: o::ip_tos(program).ok(),
            tclass: o::ipv6_tclass(program).ok(),
        }
    }

    /// Sets on `sock` what differs from its defaults, but the send timeout
    /// and `TCP_NODELAY`, which [`open`] sets once the header is out.
    /// Best effort: an option the kernel refuses here (a congestion control
    /// the broker may not pick) stays at its default.
    fn apply(&self, sock: &OwnedFd) {
        use sockopt as o;
        // The kernel doubles what it is given, and answers the doubled value.
        carry(
            sock,
            self.recv_buffer,
            |s| o::socket_recv_buffer_size(s),
            |s, v| o::set_socket_recv_buffer_size(s, v / 2),
        );
        carry(
            sock,
            self.send_buffer,
            |s| o::socket_send_buffer_size(s),
            |s, v| o::set_socket_send_buffer_size(s, v / 2),
        );
        carry(
            sock,
            self.keepalive,
            |s| o::socket_keepalive(s),
            |s, v| o::set_socket_keepalive(s, v),
        );
        carry(
            sock,
            self.linger,
            |s| o::socket_linger(s),
            |s, v| o::set_socket_linger(s, v),
        );
        carry(
            sock,
            self.recv_timeout.map(Some),
            |s| o::socket_timeout(s, Timeout::Recv),
            |s, v| o::set_socket_timeout(s, Timeout::Recv, v),
        );
        carry(
            sock,
            self.keepidle,
            |s| o::tcp_keepidle(s),
            |s, v| o::set_tcp_keepidle(s, v),
        );
        carry(
            sock,
            self.keepintvl,
            |s| o::tcp_keepintvl(s),
            |s, v| o::set_tcp_keepintvl(s, v),
        );
        carry(
            sock,
            self.keepcnt,
            |s| o::tcp_keepcnt(s),
            |s, v| o::set_tcp_keepcnt(s, v),
        );
        carry(
            sock,
            self.user_timeout,
            |s| o::tcp_user_timeout(s),
            |s, v| o::set_tcp_user_timeout(s, v),
        );
        carry(
            sock,
            self.congestion.clone(),
            |s| o::tcp_congestion(s),
            |s, v| o::set_tcp_congestion(s, &v),
        );
        carry(sock, self.tos, |s| o::ip_tos(s), |s, v| o::set_ip_tos(s, v));
        carry(
            sock,
            self.tclass,
            |s| o::ipv6_tclass(s),
            |s, v| o::set_ipv6_tclass(s, v),
        );
    }
}

/// Sets `want` on `sock` with `set` if `get` reads another value there.
fn carry<T: PartialEq>(
    sock: &OwnedFd,
    want: Option<T>,
    get: impl Fn(&OwnedFd) -> rustix::io::Result<T>,
    set: impl Fn(&OwnedFd, T) -> rustix::io::Result<()>,
) {
    let Some(want) = want else { return };
    if get(sock).ok().as_ref() == Some(&want) {
        return;
    }
    if let Err(e) = set(sock, want) {
        tracing::debug!(error = %e, "a socket option of the program not carried to its connection to another node");
    }
}

/// Sets on `conn`, a connection from another node accepted on `listener`
/// (the broker's copy of the program's listener, a UNIX socket underneath,
/// whose TCP/IP options the broker remembers: see `super::sockopt`), the
/// options the program set there, as a TCP listener passes its options on
/// to the connections it accepts (see `super::carry`). Best effort: an
/// option the kernel refuses here is skipped.
pub(super) fn inherit_listener_options(call: &Call<'_>, listener: &OwnedFd, conn: &OwnedFd) {
    super::copy_timeouts(listener, conn);
    for (level, name, value) in super::carry::listener_options(call, listener) {
        if let Err(e) = ax_sys::sockopt::set_raw(conn.as_fd(), level, name, &value) {
            tracing::debug!(app = call.app, level, name, error = %e, "a listener option not passed on to a connection from another node");
        }
    }
}
