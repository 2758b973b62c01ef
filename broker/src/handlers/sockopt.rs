//! `setsockopt` and `getsockopt` on swapped sockets.
//!
//! The filter only traps the TCP, IP and IPv6 levels and `SO_DOMAIN`/
//! `SO_PROTOCOL`. On a socket the kernel still owns, they run natively. On a
//! swapped one (a UNIX socket underneath), TCP/IP options succeed as no-ops
//! and read back as zeroes, and `SO_DOMAIN`/`SO_PROTOCOL` answer what a TCP
//! socket of the program's family would.

use super::{classify, Call, Outcome, Sock};
use crate::target::{Errno, Target};

/// Enough room for any TCP/IP option a program reads (`struct tcp_info`
/// is the largest common one).
const MAX_OPTION_LEN: usize = 256;

pub(super) fn handle_set(call: &Call<'_>, target: &Target) -> Outcome {
    let name = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, .. }) => name,
        _ => return Outcome::Continue,
    };
    let _ = name;
    let level = call.arg(1) as u32 as i32;
    let optlen = call.arg(4) as u32 as i32;
    if level == libc::SOL_SOCKET {
        // SO_DOMAIN and SO_PROTOCOL are read-only.
        return Outcome::Errno(libc::ENOPROTOOPT);
    }
    if optlen < 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    if level == libc::IPPROTO_TCP && optlen < 4 && call.arg(2) as i32 == libc::TCP_NODELAY {
        return Outcome::Errno(libc::EINVAL);
    }
    Outcome::Value(0)
}

pub(super) fn handle_get(call: &Call<'_>, target: &Target) -> Outcome {
    let name = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, .. }) => name,
        _ => return Outcome::Continue,
    };
    let level = call.arg(1) as u32 as i32;
    let optname = call.arg(2) as u32 as i32;
    let value: Vec<u8> = if level == libc::SOL_SOCKET {
        let v = match optname {
            libc::SO_DOMAIN if name.is_v6() => libc::AF_INET6,
            libc::SO_DOMAIN => libc::AF_INET,
            _ => libc::IPPROTO_TCP,
        };
        v.to_ne_bytes().to_vec()
    } else {
        vec![0u8; MAX_OPTION_LEN]
    };
    let result: Result<(), Errno> = (|| {
        let len_ptr = call.arg(4);
        let len = target.read_int(len_ptr)?;
        if len < 0 {
            return Err(libc::EINVAL);
        }
        let n = (len as usize).min(value.len());
        target.write(call.arg(3), &value[..n])?;
        target.write(len_ptr, &(n as i32).to_ne_bytes())
    })();
    match result {
        Ok(()) => Outcome::Value(0),
        Err(e) => Outcome::Errno(e),
    }
}
