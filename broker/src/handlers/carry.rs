//! TCP/IP options that pass from one socket to another: from a program's
//! socket to the one ax swaps in, and from a listener to its connections.
//!
//! Until its `connect` to a VIP or its `bind`, a program's TCP socket is
//! the kernel's, and a `setsockopt` of the TCP, IP or IPv6 level on it
//! runs natively (see `super::sockopt`). The broker notes which option it
//! was, by the socket's inode ([`note`]); when the socket is swapped, each
//! noted option's value is read back from the program's socket, as the
//! kernel keeps it, and remembered for the swapped one as if set there
//! ([`carry`]), so that `getsockopt` reads it back as over TCP. The notes
//! cost nothing to an app that sets no option before connecting (Go sets
//! its options on connected sockets).
//!
//! A TCP listener passes most of its options on to the connections it
//! accepts (not `TCP_DEFER_ACCEPT` or `TCP_FASTOPEN`); a swapped listener
//! does the same with the options remembered for it ([`inherit`]).
//!
//! The socket-level options of `crate::rules::CARRIED_SOCKET_OPTIONS`
//! (buffer sizes, `SO_LINGER`, `SO_PRIORITY`, `SO_RCVLOWAT`) are the UNIX
//! socket's own: the kernel sets them on either family alike
//! ([`set_socket_option`]). They are noted as the others are, and at a swap
//! or an accept copied from socket to socket as the kernel keeps them. The
//! send and receive timeouts are not trapped (programs set them on every
//! connection): they are copied at every swap and every accept
//! (`super::copy_timeouts`). Other socket-level options (`SO_KEEPALIVE`…)
//! keep the UNIX socket's defaults across a swap.

use super::{inode, Call, Outcome, Sock};
use crate::names::SocketName;
use crate::target::Target;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Notes that the program set option (`level`, `name`) on `fd`, a TCP
/// socket the kernel still owns. Best effort: a table full of live
/// sockets' notes only loses this one.
pub(super) fn note(call: &Call<'_>, fd: &OwnedFd, level: i32, name: i32) {
    let Some((level, name)) = carried(level, name) else {
        return;
    };
    if let Some(inode) = inode(fd) {
        let _ = call.state.note_preset(inode, level, name);
    }
}

/// A `setsockopt` of a socket-level option in
/// `crate::rules::CARRIED_SOCKET_OPTIONS`: the kernel's to run, on any
/// socket (a TCP and a UNIX socket take these alike, and ax decides
/// nothing by them). Noted first where it must be passed on: on a socket
/// the kernel still owns, to carry it if ax swaps the socket; on a swapped
/// listener, for the connections it accepts. A note decides nothing
/// either: what is passed on is read back from the socket itself. So the
/// answer is `CONTINUE` whatever the broker could see of the fd: a socket
/// it cannot inspect (gone, or a program it may not reach) only goes
/// unnoted, where failing the call would refuse an option the kernel takes
/// on any socket.
pub(super) fn set_socket_option(call: &Call<'_>, target: &Target) -> Outcome {
    let (level, name) = (call.int_arg(1), call.int_arg(2));
    // A connection passes nothing on: the common case costs one read.
    if super::known_conn(call, target).is_some() {
        return Outcome::Continue;
    }
    match super::classify(call, target, call.arg(0)) {
        Ok(Sock::Inet { fd, .. }) => note(call, &fd, level, name),
        Ok(Sock::Swapped {
            name: SocketName::Listener { .. },
            fd,
            cookie: Some(cookie),
        }) => {
            if let Some(inode) = inode(&fd) {
                note_listener(call, cookie, inode, level, name);
            }
        }
        Ok(_) => {}
        Err(errno) => {
            tracing::debug!(
                app = call.app,
                errno,
                "a socket option not noted: the fd could not be inspected"
            );
        }
    }
    Outcome::Continue
}

/// The (level, name) an option is noted under: its own for a TCP/IP one;
/// for a carried socket-level one, the name it is read and set by (the
/// `_FORCE` buffer sizes read as the plain ones). `None`: not carried.
fn carried(level: i32, name: i32) -> Option<(i32, i32)> {
    if is_ip_level(level) {
        return Some((level, name));
    }
    if level != libc::SOL_SOCKET || !crate::rules::CARRIED_SOCKET_OPTIONS.contains(&name) {
        return None;
    }
    let name = match name {
        libc::SO_SNDBUFFORCE => libc::SO_SNDBUF,
        libc::SO_RCVBUFFORCE => libc::SO_RCVBUF,
        other => other,
    };
    Some((libc::SOL_SOCKET, name))
}

/// The value of socket-level option `name` (as [`carried`] names it) on
/// `from`, as `setsockopt` takes it: a buffer size reads back doubled (the
/// kernel's bookkeeping), and is set halved. A size set with `_FORCE` past
/// `net.core.wmem_max`/`rmem_max` is carried capped there.
fn socket_option(from: BorrowedFd<'_>, name: i32) -> Option<Vec<u8>> {
    let mut buf = [0u8; 32];
    let len = ax_sys::sockopt::get_raw(from, libc::SOL_SOCKET, name, &mut buf).ok()?;
    let mut value = buf.get(..len)?.to_vec();
    if matches!(name, libc::SO_SNDBUF | libc::SO_RCVBUF) {
        let int: [u8; 4] = value.as_slice().try_into().ok()?;
        value = (i32::from_ne_bytes(int) / 2).to_ne_bytes().to_vec();
    }
    Some(value)
}

/// Copies socket-level option `name` from `from` to `to`. Best effort, as
/// a copy by the kernel would be: a value `to`'s family refuses is left.
fn copy_socket_option(from: BorrowedFd<'_>, to: BorrowedFd<'_>, name: i32) {
    if let Some(value) = socket_option(from, name) {
        let _ = ax_sys::sockopt::set_raw(to, libc::SOL_SOCKET, name, &value);
    }
}

/// The socket that takes the place of a program's.
#[derive(Debug, Clone, Copy)]
pub(super) struct Swapped<'a> {
    pub(super) fd: BorrowedFd<'a>,
    pub(super) inode: u64,
    /// Its cookie, when it is a listener (bound by `bind`).
    pub(super) listener: Option<u64>,
}

/// Remembers for `swapped` the options noted for `program`, the program's
/// socket of family `v6` that it replaces (and notes them for a listener,
/// see [`inherit`]). An option whose value a fresh TCP socket of the family
/// refuses (one that can only be set, or only in some state) is left out,
/// so that `getsockopt` of it answers as for an option never set. A
/// socket-level one is copied to the swapped socket itself.
pub(super) fn carry(call: &Call<'_>, program: &OwnedFd, v6: bool, swapped: Swapped<'_>) {
    if !call.state.has_presets() {
        return;
    }
    let Some(old) = inode(program) else {
        return;
    };
    let noted = call.state.take_presets(old);
    let new = swapped.inode;
    let mut buf = [0u8; super::sockopt::MAX_OPTION_LEN];
    for (level, name) in noted {
        if level == libc::SOL_SOCKET {
            copy_socket_option(program.as_fd(), swapped.fd, name);
            if let Some(cookie) = swapped.listener {
                note_listener(call, cookie, new, level, name);
            }
            continue;
        }
        let Ok(len) = ax_sys::sockopt::get_raw(program.as_fd(), level, name, &mut buf) else {
            continue;
        };
        let value = buf[..len.min(buf.len())].to_vec();
        if !matches!(
            crate::verdict::set_on_fresh(v6, level, name, &value),
            Ok(Ok(()))
        ) {
            continue;
        }
        if call
            .state
            .remember_option((new, level, name), value)
            .is_err()
        {
            break;
        }
        if let Some(cookie) = swapped.listener {
            note_listener(call, cookie, new, level, name);
        }
    }
}

/// Forgets the options noted for `program`, a socket whose connect goes
/// out over TCP (egress, or to another host, where the options are read
/// whole): so that an app that sets options before each such connect does
/// not fill its table with them.
pub(super) fn forget(call: &Call<'_>, program: &OwnedFd) {
    if call.state.has_presets() {
        if let Some(inode) = inode(program) {
            call.state.take_presets(inode);
        }
    }
}

/// Notes that the program set option (`level`, `name`) on the swapped
/// listener with `cookie` and `inode`, to pass it on to the connections the
/// listener accepts ([`inherit`]). A hint: what is passed on is the value
/// remembered for the listener, if the option was set.
pub(super) fn note_listener(call: &Call<'_>, cookie: u64, inode: u64, level: i32, name: i32) {
    if let Some((level, name)) = carried(level, name) {
        if !listener_only(level, name) {
            call.state.note_listener_option(cookie, inode, level, name);
        }
    }
}

/// Passes on to `conn` (`inode`: its inode, if read already), a connection
/// accepted on `listener`, the options the program set on the listener, as
/// a TCP listener passes its options on to the connections it accepts: a
/// TCP/IP one remembered for it, a socket-level one set on it, and the
/// listener's timeouts, which nothing notes (two `getsockopt`, 0.25 µs
/// each here).
pub(super) fn inherit(call: &Call<'_>, listener: &OwnedFd, conn: &OwnedFd, inode: Option<u64>) {
    super::copy_timeouts(listener, conn);
    let options = listener_options(call, listener);
    if options.is_empty() {
        return;
    }
    let Some(inode) = inode.or_else(|| super::inode(conn)) else {
        return;
    };
    for (level, name, value) in options {
        if level == libc::SOL_SOCKET {
            let _ = ax_sys::sockopt::set_raw(conn.as_fd(), level, name, &value);
            continue;
        }
        if call
            .state
            .remember_option((inode, level, name), value)
            .is_err()
        {
            break;
        }
    }
}

/// The options the program set on `listener` (a swapped one) that pass on
/// to the connections it accepts, as (level, name, value): a TCP/IP one's
/// remembered value, a socket-level one's read from the listener (as
/// `setsockopt` takes it). Costs one `getsockopt`, and only in an app that
/// set options on a listener, and one per socket-level option set.
pub(super) fn listener_options(call: &Call<'_>, listener: &OwnedFd) -> Vec<(i32, i32, Vec<u8>)> {
    if !call.state.has_listener_options() {
        return Vec::new();
    }
    let Ok(cookie) = rustix::net::sockopt::socket_cookie(listener) else {
        return Vec::new();
    };
    let Some((inode, names)) = call.state.listener_options(cookie) else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter_map(|(level, name)| {
            let value = if level == libc::SOL_SOCKET {
                socket_option(listener.as_fd(), name)?
            } else {
                call.state.recall_option((inode, level, name))?
            };
            Some((level, name, value))
        })
        .collect()
}

fn is_ip_level(level: i32) -> bool {
    matches!(
        level,
        libc::IPPROTO_TCP | libc::IPPROTO_IP | libc::IPPROTO_IPV6
    )
}

/// Options of a TCP listener that its accepted connections do not take
/// (they read 0 there).
fn listener_only(level: i32, name: i32) -> bool {
    match level {
        libc::IPPROTO_TCP => matches!(name, libc::TCP_DEFER_ACCEPT | libc::TCP_FASTOPEN),
        libc::SOL_SOCKET => name == libc::SO_PRIORITY,
        _ => false,
    }
}
