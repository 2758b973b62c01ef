//! `setsockopt` and `getsockopt` on swapped sockets.
//!
//! The filter only traps the TCP, IP and IPv6 levels and `SO_DOMAIN`/
//! `SO_PROTOCOL`. On a socket the kernel still owns, they run natively. On a
//! swapped one (a UNIX socket underneath), a TCP/IP option is checked as
//! TCP checks it, remembered (keyed by the socket's inode, so `dup` and
//! `fork` share it, in the app's own bounded table: see
//! `crate::appstate`) and reads back as set; an option never set reads as a
//! fresh TCP socket of the program's family answers it where the broker can
//! ask one, else as zeroes. `SO_DOMAIN`/`SO_PROTOCOL` answer what a TCP
//! socket of the program's family would.
//!
//! Lengths and bad pointers are judged in the kernel's order:
//! `setsockopt` refuses a negative length first; TCP then wants at least an
//! `int` (but for its string options), reads it, and only then looks at the
//! option's name and value. `getsockopt` reads the length, refuses a
//! negative one, stores the length it answers, then the value — but at the
//! socket level, where the value comes first.

use super::{classify, inode, Call, Outcome, Sock};
use crate::target::{Errno, Target};
use rustix::net::sockopt;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::os::fd::OwnedFd;

/// Enough room for any TCP/IP option a program sets (`struct tcp_info`
/// is the largest common one).
const MAX_OPTION_LEN: usize = 256;
const INT_LEN: usize = std::mem::size_of::<libc::c_int>();

/// TCP options the kernel knows (Linux 6.18: 1 to `TCP_DELACK_MAX_US`, 46,
/// but for the retired 15); any other name is `ENOPROTOOPT`.
fn tcp_knows(optname: i32) -> bool {
    (1..=46).contains(&optname) && optname != 15
}

/// TCP options whose value is a string or a struct of any length; every
/// other one takes an `int`.
fn tcp_takes_bytes(optname: i32) -> bool {
    matches!(
        optname,
        libc::TCP_CONGESTION | libc::TCP_ULP | libc::TCP_FASTOPEN_KEY
    )
}

/// Whether TCP accepts `val` for the `int` option `optname`, as its setters
/// check (`tcp_sock_set_keepidle` and friends).
fn tcp_value_ok(optname: i32, val: i32) -> bool {
    const MAX_TCP_KEEPIDLE: i32 = 32767;
    const MAX_TCP_KEEPINTVL: i32 = 32767;
    const MAX_TCP_KEEPCNT: i32 = 127;
    const MAX_TCP_SYNCNT: i32 = 127;
    const TCP_MIN_MSS: i32 = 88;
    const MAX_TCP_WINDOW: i32 = 32767;
    match optname {
        libc::TCP_KEEPIDLE => (1..=MAX_TCP_KEEPIDLE).contains(&val),
        libc::TCP_KEEPINTVL => (1..=MAX_TCP_KEEPINTVL).contains(&val),
        libc::TCP_KEEPCNT => (1..=MAX_TCP_KEEPCNT).contains(&val),
        libc::TCP_SYNCNT => (1..=MAX_TCP_SYNCNT).contains(&val),
        libc::TCP_USER_TIMEOUT => val >= 0,
        libc::TCP_MAXSEG => val == 0 || (TCP_MIN_MSS..=MAX_TCP_WINDOW).contains(&val),
        _ => true,
    }
}

pub(super) fn handle_set(call: &Call<'_>, target: &Target) -> Outcome {
    let (v6, fd) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd }) => (name.is_v6(), fd),
        Ok(_) => return Outcome::Continue,
        Err(e) => return super::fd_error(call, e),
    };
    set(call, target, v6, &fd).into()
}

fn set(call: &Call<'_>, target: &Target, v6: bool, fd: &OwnedFd) -> Result<Outcome, Errno> {
    let level = call.int_arg(1);
    let optname = call.int_arg(2);
    let optval = call.arg(3);
    let optlen = call.int_arg(4);
    if optlen < 0 {
        return Ok(Outcome::Errno(libc::EINVAL));
    }
    let optlen = optlen as usize;
    if level == libc::IPPROTO_IPV6 && !v6 {
        // ip_setsockopt knows the IP level only.
        return Ok(Outcome::Errno(libc::ENOPROTOOPT));
    }
    let value = match level {
        // sk_setsockopt: an int, then the name. SO_DOMAIN and SO_PROTOCOL
        // are read-only.
        libc::SOL_SOCKET => {
            if optlen < INT_LEN {
                return Ok(Outcome::Errno(libc::EINVAL));
            }
            target.read(optval, INT_LEN)?;
            return Ok(Outcome::Errno(libc::ENOPROTOOPT));
        }
        libc::IPPROTO_TCP if !tcp_takes_bytes(optname) => {
            if optlen < INT_LEN {
                return Ok(Outcome::Errno(libc::EINVAL));
            }
            let int = target.read(optval, INT_LEN)?;
            if !tcp_knows(optname) {
                return Ok(Outcome::Errno(libc::ENOPROTOOPT));
            }
            let val = i32::from_ne_bytes([int[0], int[1], int[2], int[3]]);
            if !tcp_value_ok(optname, val) {
                return Ok(Outcome::Errno(libc::EINVAL));
            }
            int
        }
        _ => target.read(optval, optlen.min(MAX_OPTION_LEN))?,
    };
    call.check_valid()?;
    let ino = inode(fd).ok_or(libc::ENOMEM)?;
    // The app's table is full of live sockets' options: as the kernel
    // answers an option it cannot allocate for.
    call.state
        .remember_option((ino, level, optname), value)
        .map_err(|_| libc::ENOMEM)?;
    Ok(Outcome::Value(0))
}

pub(super) fn handle_get(call: &Call<'_>, target: &Target) -> Outcome {
    let (v6, fd) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd }) => (name.is_v6(), fd),
        Ok(_) => return Outcome::Continue,
        Err(e) => return super::fd_error(call, e),
    };
    get(call, target, v6, &fd).into()
}

fn get(call: &Call<'_>, target: &Target, v6: bool, fd: &OwnedFd) -> Result<Outcome, Errno> {
    let level = call.int_arg(1);
    let optname = call.int_arg(2);
    let (optval, len_ptr) = (call.arg(3), call.arg(4));
    if level == libc::IPPROTO_IPV6 && !v6 {
        // ip_getsockopt knows the IP level only.
        return Ok(Outcome::Errno(libc::EOPNOTSUPP));
    }
    let len = target.read_int(len_ptr)?;
    // do_ipv6_getsockopt takes a negative length as a large one.
    let len = match usize::try_from(len) {
        Ok(len) => len,
        Err(_) if level == libc::IPPROTO_IPV6 => usize::MAX,
        Err(_) => return Ok(Outcome::Errno(libc::EINVAL)),
    };
    if level == libc::SOL_SOCKET {
        // sk_getsockopt: the value, then the length.
        let v = match optname {
            libc::SO_DOMAIN if v6 => libc::AF_INET6,
            libc::SO_DOMAIN => libc::AF_INET,
            _ => libc::IPPROTO_TCP,
        };
        let n = len.min(INT_LEN);
        target.write(optval, &v.to_ne_bytes()[..n])?;
        target.write(len_ptr, &(n as i32).to_ne_bytes())?;
        return Ok(Outcome::Value(0));
    }
    if level == libc::IPPROTO_TCP && !tcp_knows(optname) {
        return Ok(Outcome::Errno(libc::ENOPROTOOPT));
    }
    let value = inode(fd)
        .and_then(|ino| call.state.recall_option((ino, level, optname)))
        .or_else(|| default_value(v6, level, optname))
        .unwrap_or_else(|| vec![0u8; INT_LEN]);
    let mut answer: &[u8] = &value[..len.min(value.len())];
    // do_ip_getsockopt answers a small int in one byte to a short buffer.
    let byte;
    if level == libc::IPPROTO_IP && value.len() == INT_LEN && (1..INT_LEN).contains(&answer.len()) {
        let val = i32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
        if let Ok(b) = u8::try_from(val) {
            byte = [b];
            answer = &byte;
        }
    }
    // The length, then the value.
    target.write(len_ptr, &(answer.len() as i32).to_ne_bytes())?;
    target.write(optval, answer)?;
    Ok(Outcome::Value(0))
}

/// What a fresh TCP socket of the program's family answers for an option
/// nobody set, for the options the broker can ask one; `None` otherwise.
fn default_value(v6: bool, level: i32, optname: i32) -> Option<Vec<u8>> {
    let family = if v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fresh =
        rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None).ok()?;
    let secs = |d: std::time::Duration| d.as_secs() as i32;
    let val: i32 = match (level, optname) {
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => sockopt::tcp_nodelay(&fresh).ok()?.into(),
        (libc::IPPROTO_TCP, libc::TCP_CORK) => sockopt::tcp_cork(&fresh).ok()?.into(),
        (libc::IPPROTO_TCP, libc::TCP_QUICKACK) => sockopt::tcp_quickack(&fresh).ok()?.into(),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => secs(sockopt::tcp_keepidle(&fresh).ok()?),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => secs(sockopt::tcp_keepintvl(&fresh).ok()?),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => sockopt::tcp_keepcnt(&fresh).ok()? as i32,
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT) => {
            sockopt::tcp_user_timeout(&fresh).ok()? as i32
        }
        (libc::IPPROTO_IP, libc::IP_TTL) => sockopt::ip_ttl(&fresh).ok()? as i32,
        (libc::IPPROTO_IP, libc::IP_TOS) => sockopt::ip_tos(&fresh).ok()?.into(),
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => sockopt::ipv6_v6only(&fresh).ok()?.into(),
        (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS) => {
            sockopt::ipv6_unicast_hops(&fresh).ok()?.into()
        }
        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => sockopt::ipv6_tclass(&fresh).ok()? as i32,
        _ => return None,
    };
    Some(val.to_ne_bytes().to_vec())
}
