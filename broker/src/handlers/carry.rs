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
//! Socket-level options the filter does not trap (`SO_RCVBUF`,
//! `SO_KEEPALIVE`…) are not noted: the send and receive timeouts are
//! carried at every swap (`super::copy_timeouts`), the others keep the
//! UNIX socket's defaults.

use super::{inode, Call};
use std::os::fd::{AsFd, OwnedFd};

/// Notes that the program set option (`level`, `name`) on `fd`, a TCP
/// socket the kernel still owns. Best effort: a table full of live
/// sockets' notes only loses this one.
pub(super) fn note(call: &Call<'_>, fd: &OwnedFd, level: i32, name: i32) {
    if !is_ip_level(level) {
        return;
    }
    if let Some(inode) = inode(fd) {
        let _ = call.state.note_preset(inode, level, name);
    }
}

/// The socket that takes the place of a program's.
#[derive(Debug, Clone, Copy)]
pub(super) struct Swapped {
    pub(super) inode: u64,
    /// Its cookie, when it is a listener (bound by `bind`).
    pub(super) listener: Option<u64>,
}

/// Remembers for `swapped` the options noted for `program`, the program's
/// socket of family `v6` that it replaces (and notes them for a listener,
/// see [`inherit`]). An option whose value a fresh TCP socket of the family
/// refuses (one that can only be set, or only in some state) is left out,
/// so that `getsockopt` of it answers as for an option never set.
pub(super) fn carry(call: &Call<'_>, program: &OwnedFd, v6: bool, swapped: Swapped) {
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
    if is_ip_level(level) && !listener_only(level, name) {
        call.state.note_listener_option(cookie, inode, level, name);
    }
}

/// Remembers for `conn` (its inode given by `accepted`), a connection
/// accepted on `listener`, the TCP/IP options the program set on the
/// listener, as a TCP listener passes its options on to the connections it
/// accepts.
pub(super) fn inherit(call: &Call<'_>, listener: &OwnedFd, accepted: impl FnOnce() -> Option<u64>) {
    let options = listener_options(call, listener);
    if options.is_empty() {
        return;
    }
    let Some(conn) = accepted() else {
        return;
    };
    for (level, name, value) in options {
        if call
            .state
            .remember_option((conn, level, name), value)
            .is_err()
        {
            break;
        }
    }
}

/// The TCP/IP options the program set on `listener` (a swapped one) that
/// pass on to the connections it accepts, as (level, name, value). Costs
/// one `getsockopt`, and only in an app that set options on a listener.
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
            let value = call.state.recall_option((inode, level, name))?;
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
    level == libc::IPPROTO_TCP && matches!(name, libc::TCP_DEFER_ACCEPT | libc::TCP_FASTOPEN)
}
