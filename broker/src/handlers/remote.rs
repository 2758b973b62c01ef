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
//!   program's; then it takes the program's fd number. From then on the
//!   data flows between the two programs' own sockets. `getsockname` and
//!   `getpeername` answer the client's VIP:port and the VIP:port dialled
//!   (see `crate::doors::VirtualNames`).

use super::{install_over, is_nonblocking, set_nonblock, Call, Outcome};
use crate::doors::VirtualNames;
use crate::names::SocketName;
use crate::target::Errno;
use ax_registry::RemoteRoute;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
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
    super::defer(call, move |call| {
        let (fresh, names) = match open(call, &route, dst, v6) {
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
        let real = (
            super::connect::inet_name(&fresh),
            crate::doors::inet_peer(&fresh),
        );
        if let (Some(inode), (Some(local), Some(peer))) = (super::inode(&fresh), real) {
            if call.state.note_remote(inode, (local, peer), names).is_err() {
                return Outcome::Errno(libc::ENOMEM);
            }
        }
        match install_over(call, &target, call.arg(0), &fresh) {
            Outcome::Value(_) => {
                if let Some(name) = rebind {
                    super::connect::release_listener(call, name);
                }
                tracing::debug!(app = call.app, %dst, node = %route.node, "connected to another node");
                Outcome::Value(0)
            }
            other => other,
        }
    })
}

/// A TCP connection to `route`'s node that has carried the header, and the
/// virtual addresses it stands for; of the program's family (`v6`), so
/// that the socket behaves as the one it replaces (an IPv4 node is then
/// reached at its v4-mapped address).
fn open(
    call: &Call<'_>,
    route: &RemoteRoute,
    dst: SocketAddr,
    v6: bool,
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
    // connect and write honour the send timeout.
    sockopt::set_socket_timeout(&sock, Timeout::Send, Some(CONNECT_TIMEOUT))
        .map_err(|e| e.raw_os_error())?;
    sockopt::set_tcp_nodelay(&sock, true).map_err(|e| e.raw_os_error())?;
    rustix::net::connect(&sock, &node).map_err(|e| match e {
        // A node that does not answer in time: as an unanswered SYN would.
        rustix::io::Errno::INPROGRESS | rustix::io::Errno::AGAIN => libc::ETIMEDOUT,
        e => e.raw_os_error(),
    })?;
    let local = super::connect::inet_name(&sock).ok_or(libc::EIO)?;
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
    sockopt::set_socket_timeout(&sock, Timeout::Send, None).map_err(|e| e.raw_os_error())?;
    // The program's own choice (the default) from here on.
    sockopt::set_tcp_nodelay(&sock, false).map_err(|e| e.raw_os_error())?;
    Ok((
        sock,
        VirtualNames {
            local: from,
            peer: dst,
        },
    ))
}
