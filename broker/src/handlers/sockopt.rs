//! `setsockopt` and `getsockopt` on swapped sockets.
//!
//! The filter only traps the TCP, IP and IPv6 levels and `SO_DOMAIN`/
//! `SO_PROTOCOL`. On a socket the kernel still owns, they run natively. On a
//! swapped one (a UNIX socket underneath), a TCP/IP option is accepted and
//! remembered (keyed by the socket's inode, so `dup` and `fork` share it)
//! and reads back as set; an option never set reads as zeroes, as TCP's
//! defaults mostly are. `SO_DOMAIN`/`SO_PROTOCOL` answer what a TCP socket
//! of the program's family would.

use super::{classify, Call, Outcome, Sock};
use crate::target::{Errno, Target};
use std::os::fd::OwnedFd;

/// Enough room for any TCP/IP option a program reads (`struct tcp_info`
/// is the largest common one).
const MAX_OPTION_LEN: usize = 256;

fn inode(fd: &OwnedFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

pub(super) fn handle_set(call: &Call<'_>, target: &Target) -> Outcome {
    let fd = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { fd, .. }) => fd,
        _ => return Outcome::Continue,
    };
    let level = call.arg(1) as u32 as i32;
    let optname = call.arg(2) as u32 as i32;
    let optlen = call.arg(4) as u32 as i32;
    if level == libc::SOL_SOCKET {
        // SO_DOMAIN and SO_PROTOCOL are read-only.
        return Outcome::Errno(libc::ENOPROTOOPT);
    }
    if optlen < 0 {
        return Outcome::Errno(libc::EINVAL);
    }
    let int_option = level == libc::IPPROTO_TCP
        && matches!(
            optname,
            libc::TCP_NODELAY
                | libc::TCP_KEEPIDLE
                | libc::TCP_KEEPINTVL
                | libc::TCP_KEEPCNT
                | libc::TCP_QUICKACK
                | libc::TCP_USER_TIMEOUT
        );
    if int_option && optlen < 4 {
        return Outcome::Errno(libc::EINVAL);
    }
    let len = (optlen as usize).min(MAX_OPTION_LEN);
    let value = match target.read(call.arg(3), len) {
        Ok(v) => v,
        Err(e) => return Outcome::Errno(e),
    };
    if !call.still_valid() {
        return Outcome::Answered;
    }
    if let Some(ino) = inode(&fd) {
        call.shared
            .remember_option((call.app, ino, level, optname), value);
    }
    Outcome::Value(0)
}

pub(super) fn handle_get(call: &Call<'_>, target: &Target) -> Outcome {
    let (name, fd) = match classify(call, target, call.arg(0)) {
        Ok(Sock::Swapped { name, fd }) => (name, fd),
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
        inode(&fd)
            .and_then(|ino| call.shared.recall_option((call.app, ino, level, optname)))
            .unwrap_or_else(|| vec![0u8; 4])
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
