//! `setsockopt` and `getsockopt` on swapped sockets.
//!
//! The filter only traps the TCP, IP and IPv6 levels and the socket-level
//! options TCP and UNIX sockets answer differently (`SO_DOMAIN`,
//! `SO_PROTOCOL`, `SO_ACCEPTCONN`, …: see `crate::rules`). On a socket the
//! kernel still owns, they run natively. On a swapped one (a UNIX socket
//! underneath), every TCP/IP option is answered by a real TCP socket of the
//! program's family (see `crate::probe`):
//!
//! * `setsockopt` sets the program's value on a fresh TCP socket; the
//!   kernel's verdict there is the answer, and an accepted value is
//!   remembered (keyed by the socket's inode, so `dup` and `fork` share it,
//!   in the app's own bounded table: see `crate::appstate`).
//! * `getsockopt` of an option the program set asks a fresh TCP socket that
//!   was given the remembered value (so that it reads back as the kernel
//!   normalises it); of any other option, a TCP socket in the same state
//!   (connected, listening, or neither) that nobody set anything on. So
//!   `IP_OPTIONS` answers length 0 on an established connection, as sshd
//!   expects, and an option ax never heard of answers what the kernel says.
//!
//! `SO_DOMAIN`/`SO_PROTOCOL` answer what a TCP socket of the program's
//! family would, and `SO_ACCEPTCONN` whether it listens: a listener the
//! program shut down does not, as a TCP one is closed then (a UNIX one
//! would go on listening). `SO_REUSEPORT` (which a UNIX socket refuses) is
//! set and read like a TCP option; a listener bound with it, and the
//! connections it accepts, read it as set (the listener's name says so).
//!
//! Lengths and bad pointers are judged in the kernel's order:
//! `setsockopt` refuses a negative length first; TCP then wants at least an
//! `int` (but for its string options), reads it, and only then looks at the
//! option's name and value. `getsockopt` reads the length, refuses a
//! negative one, stores the length it answers, then the value — but at the
//! socket level, where the value comes first.

use super::{classify, inode, Call, Outcome, Sock};
use crate::names::SocketName;
use crate::probe::{self, Probe};
use crate::target::{Errno, Target};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

/// Enough room for any TCP/IP option a program sets or reads (`struct
/// tcp_info`, 40 bytes of IP options, a congestion control name).
pub(super) const MAX_OPTION_LEN: usize = 512;
const INT_LEN: usize = std::mem::size_of::<libc::c_int>();

/// TCP options whose value is a string or a struct of any length, read
/// before TCP wants an `int`.
fn tcp_takes_bytes(optname: i32) -> bool {
    matches!(
        optname,
        libc::TCP_CONGESTION | libc::TCP_ULP | libc::TCP_FASTOPEN_KEY
    )
}

/// The errno of a failed call on the broker's own socket.
fn errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// What answering an option of a swapped socket needs to know of it.
struct Subject {
    /// The program's socket is `AF_INET6`.
    v6: bool,
    kind: probe::Kind,
    /// The key of its remembered options.
    inode: u64,
    /// The address of its peer, when connected.
    peer: Option<SocketAddr>,
    /// A listener bound with `SO_REUSEPORT`, or a connection it accepted.
    reuseport: bool,
}

impl Subject {
    /// A connection of the broker's, known without a copy of the fd.
    fn known(conn: &super::KnownConn) -> Self {
        Subject {
            v6: conn.v6,
            kind: probe::Kind::Connected,
            inode: conn.inode,
            peer: Some(conn.peer),
            reuseport: false,
        }
    }

    /// Any swapped socket, from the broker's copy of it. Its peer is
    /// looked up only where an answer depends on it (`getsockopt` of a
    /// connected `AF_INET6` socket: IPv4's MTU and MSS for a v4 peer).
    fn of(
        call: &Call<'_>,
        name: &SocketName,
        fd: &OwnedFd,
        needs_peer: bool,
    ) -> Result<Self, Errno> {
        let kind = kind_of(name, fd);
        let v6 = name.is_v6();
        Ok(Subject {
            v6,
            kind,
            inode: inode(fd).ok_or(libc::ENOMEM)?,
            peer: match kind {
                probe::Kind::Connected if needs_peer && v6 => peer_of(call, name, fd),
                _ => None,
            },
            reuseport: matches!(
                name,
                SocketName::Listener {
                    reuseport: Some(_),
                    ..
                }
            ),
        })
    }
}

pub(super) fn handle_set(call: &Call<'_>, target: &Target) -> Outcome {
    if call.int_arg(1) == libc::SOL_SOCKET
        && crate::rules::CARRIED_SOCKET_OPTIONS.contains(&call.int_arg(2))
    {
        return super::carry::set_socket_option(call, target);
    }
    if let Some(conn) = super::known_conn(call, target) {
        return set(call, target, &Subject::known(&conn)).into();
    }
    let (name, fd, cookie) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd, cookie }) => (name, fd, cookie),
        // The kernel's to set; noted, to carry it if ax swaps the socket.
        // A note decides nothing: at the swap the value is read back from
        // the socket, whatever fd the number names by then.
        Ok(Sock::Inet { fd, .. }) => {
            super::carry::note(call, &fd, call.int_arg(1), call.int_arg(2));
            return Outcome::Continue;
        }
        Ok(Sock::Other) => return Outcome::Continue,
        Err(e) => return super::fd_error(call, e),
    };
    Subject::of(call, &name, &fd, false)
        .and_then(|subject| {
            if let (SocketName::Listener { .. }, Some(cookie)) = (name, cookie) {
                let (level, optname) = (call.int_arg(1), call.int_arg(2));
                super::carry::note_listener(call, cookie, subject.inode, level, optname);
            }
            set(call, target, &subject)
        })
        .into()
}

/// The state of a swapped socket, as [`probe::kind_of`] finds it; a
/// client's name says it without asking (a client socket is installed
/// connected and stays so, as `connect::state_of` also holds).
fn kind_of(name: &SocketName, fd: &OwnedFd) -> probe::Kind {
    match name {
        SocketName::Client { .. } => probe::Kind::Connected,
        SocketName::Listener { .. } => probe::kind_of(fd.as_fd()),
    }
}

fn set(call: &Call<'_>, target: &Target, subject: &Subject) -> Result<Outcome, Errno> {
    let v6 = subject.v6;
    let level = call.int_arg(1);
    let optname = call.int_arg(2);
    let optval = call.arg(3);
    let Ok(optlen) = usize::try_from(call.int_arg(4)) else {
        return Ok(Outcome::Errno(libc::EINVAL));
    };
    if level == libc::IPPROTO_IPV6 && !v6 {
        // ip_setsockopt knows the IP level only.
        return Ok(Outcome::Errno(libc::ENOPROTOOPT));
    }
    let want = optlen.min(MAX_OPTION_LEN);
    // Read without a check that the call is pending: the value is kept only
    // once the answer was taken (see below), and until then it decides
    // nothing but an errno.
    let value = match level {
        // sk_setsockopt: an int, then the name. SO_DOMAIN, SO_PROTOCOL and
        // SO_ACCEPTCONN are read-only.
        libc::SOL_SOCKET => {
            if optlen < INT_LEN {
                return Ok(Outcome::Errno(libc::EINVAL));
            }
            let int = target.read_unverified(optval, INT_LEN)?;
            if matches!(
                optname,
                libc::SO_DOMAIN | libc::SO_PROTOCOL | libc::SO_ACCEPTCONN
            ) {
                return Ok(Outcome::Errno(libc::ENOPROTOOPT));
            }
            int
        }
        libc::IPPROTO_TCP if !tcp_takes_bytes(optname) => {
            if optlen < INT_LEN {
                return Ok(Outcome::Errno(libc::EINVAL));
            }
            let int = target.read_unverified(optval, INT_LEN)?;
            // A struct option reads on; an int one stops at the int.
            if want > INT_LEN {
                target.read_unverified(optval, want).unwrap_or(int)
            } else {
                int
            }
        }
        _ => target.read_unverified(optval, want)?,
    };
    let kind = subject.kind;
    // TCP_QUEUE_SEQ: the state first (repair mode is for closed sockets).
    if kind != probe::Kind::Fresh && (level, optname) == (libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ) {
        return Ok(Outcome::Errno(libc::EPERM));
    }
    // The kernel's verdict, on a TCP socket of the program's family.
    if let Err(e) = crate::verdict::set_on_fresh(v6, level, optname, &value)? {
        return Ok(Outcome::Errno(e));
    }
    if let Some(refused) = refused_in_state(kind, level, optname, &value) {
        return Ok(Outcome::Errno(refused));
    }
    // The app's table is full of live sockets' options: as the kernel
    // answers an option it cannot allocate for.
    let key = (subject.inode, level, optname);
    if call.state.room_for_option(key).is_err() {
        return Ok(Outcome::Errno(libc::ENOMEM));
    }
    // Answered first, kept after: an answer the kernel takes proves the
    // caller was pending all along, so the value read was its own; one it
    // refuses (the caller died or was interrupted) leaves nothing kept.
    // The app's calls are answered one at a time by its receive loop, so
    // the caller's next call finds the value kept.
    match call.listener.respond_value(call.notif.id, 0) {
        // Full only if another receive loop of the app filled the table
        // since (`remember_option` says so in the log).
        Ok(()) => {
            let _ = call.state.remember_option(key, value);
        }
        Err(e) => super::note_answer_failure(&call.notif, &e),
    }
    Ok(Outcome::Answered)
}

pub(super) fn handle_get(call: &Call<'_>, target: &Target) -> Outcome {
    // SO_REUSEPORT of an accepted connection follows its listener's name,
    // which only the socket itself tells.
    if (call.int_arg(1), call.int_arg(2)) != (libc::SOL_SOCKET, libc::SO_REUSEPORT) {
        if let Some(conn) = super::known_conn(call, target) {
            return get(call, target, &Subject::known(&conn)).into();
        }
    }
    let (name, fd) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd, .. }) => (name, fd),
        Ok(_) => return Outcome::Continue,
        Err(e) => return super::fd_error(call, e),
    };
    Subject::of(call, &name, &fd, true)
        .and_then(|subject| get(call, target, &subject))
        .into()
}

/// The peer a connected swapped socket stands for: the service it reached,
/// or (accepted) the client's VIP:port.
fn peer_of(call: &Call<'_>, name: &SocketName, fd: &OwnedFd) -> Option<SocketAddr> {
    match name {
        SocketName::Client { peer, .. } => Some(*peer),
        SocketName::Listener { .. } => match super::peer_ident(call.shared, fd)? {
            SocketName::Client { local, .. } => Some(local),
            SocketName::Listener { .. } => None,
        },
    }
}

fn get(call: &Call<'_>, target: &Target, subject: &Subject) -> Result<Outcome, Errno> {
    let v6 = subject.v6;
    let level = call.int_arg(1);
    let optname = call.int_arg(2);
    let (optval, len_ptr) = (call.arg(3), call.arg(4));
    if level == libc::IPPROTO_IPV6 && !v6 {
        // ip_getsockopt knows the IP level only.
        return Ok(Outcome::Errno(libc::EOPNOTSUPP));
    }
    // Nothing is kept or done on this length but the answer: the write's
    // own check that the call is pending covers this read (an answer to a
    // call no longer pending goes nowhere).
    let len = target.read_int_unverified(len_ptr)?;
    // do_ipv6_getsockopt takes a negative length as a large one.
    let len = match usize::try_from(len) {
        Ok(len) => len,
        Err(_) if level == libc::IPPROTO_IPV6 => usize::MAX,
        Err(_) => return Ok(Outcome::Errno(libc::EINVAL)),
    };
    if level == libc::SOL_SOCKET
        && matches!(
            optname,
            libc::SO_DOMAIN | libc::SO_PROTOCOL | libc::SO_ACCEPTCONN
        )
    {
        // sk_getsockopt: the value, then the length.
        let v = match optname {
            libc::SO_DOMAIN if v6 => libc::AF_INET6,
            libc::SO_DOMAIN => libc::AF_INET,
            // A listener shut down is closed, as TCP's is.
            libc::SO_ACCEPTCONN => i32::from(subject.kind == probe::Kind::Listening),
            _ => libc::IPPROTO_TCP,
        };
        let n = len.min(INT_LEN);
        target.write_parts(&[(optval, &v.to_ne_bytes()[..n]), (len_ptr, &int_bytes(n))])?;
        return Ok(Outcome::Value(0));
    }
    let mut buf = vec![0u8; len.min(MAX_OPTION_LEN)];
    let mut kind = subject.kind;
    if v6 && kind == probe::Kind::Connected && subject.peer.is_some_and(|p| p.is_ipv4()) {
        kind = probe::Kind::ConnectedMapped;
    }
    let mut remembered = call.state.recall_option((subject.inode, level, optname));
    match (level, optname) {
        // Bound with SO_REUSEPORT (its name says), unless set since: on,
        // and on for the connections it accepts, which inherit it.
        (libc::SOL_SOCKET, libc::SO_REUSEPORT) if remembered.is_none() && subject.reuseport => {
            remembered = Some(1i32.to_ne_bytes().to_vec());
        }
        // Binding a specific IPv6 address sets it (the probes are bound to
        // ::1); a socket of ax's answers as one bound to [::].
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => kind = probe::Kind::Fresh,
        // Once connected, TCP answers its current MSS, whatever was set.
        (libc::IPPROTO_TCP, libc::TCP_MAXSEG)
            if matches!(kind, probe::Kind::Connected | probe::Kind::ConnectedMapped) =>
        {
            remembered = None;
        }
        _ => {}
    }
    let asked = match remembered {
        // Given the program's value, read back as the kernel keeps it.
        Some(value) => {
            let fresh = probe::fresh(v6).ok_or(libc::ENOMEM)?;
            ax_sys::sockopt::set_raw(fresh.as_fd(), level, optname, &value)
                .and_then(|()| ax_sys::sockopt::get_raw(fresh.as_fd(), level, optname, &mut buf))
        }
        None => {
            let probe = Probe::get(v6, kind).ok_or(libc::ENOMEM)?;
            ax_sys::sockopt::get_raw(probe.fd(), level, optname, &mut buf)
        }
    };
    let n = match asked {
        Ok(n) => n.min(buf.len()),
        Err(e) => return Ok(Outcome::Errno(errno(&e))),
    };
    // The length, then the value: one write.
    target.write_parts(&[(len_ptr, &int_bytes(n)), (optval, &buf[..n])])?;
    Ok(Outcome::Value(0))
}

/// The errno TCP answers a `setsockopt` that a fresh (closed) socket
/// accepted, when the socket is connected or listening instead
/// (`do_tcp_setsockopt`'s state checks).
fn refused_in_state(kind: probe::Kind, level: i32, optname: i32, value: &[u8]) -> Option<Errno> {
    if kind == probe::Kind::Fresh || level != libc::IPPROTO_TCP {
        return None;
    }
    let connected = kind == probe::Kind::Connected;
    let val = value
        .get(..INT_LEN)
        .and_then(|b| <[u8; INT_LEN]>::try_from(b).ok())
        .map(i32::from_ne_bytes);
    match optname {
        // tcp_set_window_clamp: 0 only on a closed socket.
        libc::TCP_WINDOW_CLAMP if val == Some(0) => Some(libc::EINVAL),
        libc::TCP_FASTOPEN_CONNECT => Some(libc::EINVAL),
        libc::TCP_FASTOPEN | TCP_FASTOPEN_NO_COOKIE if connected => Some(libc::EINVAL),
        _ => None,
    }
}

/// `TCP_FASTOPEN_NO_COOKIE` (Linux 4.19), not in the libc crate.
const TCP_FASTOPEN_NO_COOKIE: i32 = 34;

/// `n` (at most [`MAX_OPTION_LEN`]) as the C `int` a length is stored in.
fn int_bytes(n: usize) -> [u8; INT_LEN] {
    i32::try_from(n).unwrap_or(i32::MAX).to_ne_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe::Kind::{Connected, Fresh, Listening};

    #[test]
    fn tcp_state_checks_as_do_tcp_setsockopt() {
        let zero = 0i32.to_ne_bytes();
        let one = 1i32.to_ne_bytes();
        let tcp = libc::IPPROTO_TCP;
        let cases = [
            (Connected, libc::TCP_WINDOW_CLAMP, zero, Some(libc::EINVAL)),
            (Listening, libc::TCP_WINDOW_CLAMP, zero, Some(libc::EINVAL)),
            (Fresh, libc::TCP_WINDOW_CLAMP, zero, None),
            (Connected, libc::TCP_WINDOW_CLAMP, one, None),
            (Connected, libc::TCP_FASTOPEN, one, Some(libc::EINVAL)),
            (Listening, libc::TCP_FASTOPEN, one, None),
            (
                Listening,
                libc::TCP_FASTOPEN_CONNECT,
                one,
                Some(libc::EINVAL),
            ),
            (Connected, TCP_FASTOPEN_NO_COOKIE, one, Some(libc::EINVAL)),
            (Listening, TCP_FASTOPEN_NO_COOKIE, one, None),
            (Connected, libc::TCP_NODELAY, one, None),
        ];
        for (kind, opt, val, want) in cases {
            assert_eq!(
                refused_in_state(kind, tcp, opt, &val),
                want,
                "{kind:?} {opt}"
            );
        }
        assert_eq!(
            refused_in_state(Connected, libc::IPPROTO_IP, libc::TCP_FASTOPEN, &one),
            None
        );
    }
}
