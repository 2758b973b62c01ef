//! The kernel's verdict on a `setsockopt` of a fresh TCP socket,
//! remembered for the options whose verdict depends on the value alone.
//!
//! `setsockopt` of a swapped socket asks a fresh TCP socket of the
//! program's family whether TCP would take the value (see
//! `handlers::sockopt`): a `socket`, a `setsockopt` and a `close` per call.
//! For the options every connection sets (`TCP_NODELAY`, keep-alive, …)
//! TCP's answer on a fresh socket is a range check of the value, the same
//! every time, so the answer is kept, keyed by family, option and value
//! bytes. Other options (those that depend on sysctls, capabilities or the
//! socket's state) are asked every time.

use crate::target::Errno;
use std::os::fd::AsFd;
use std::sync::Mutex;

/// Verdicts kept before starting afresh (a miss only costs the question).
const MAX: usize = 64;
/// Longest value kept (the options below take an `int`).
const MAX_VALUE: usize = 8;

/// (IPv6, level, optname, value, verdict).
type Entry = (bool, i32, i32, Vec<u8>, Result<(), Errno>);

static KNOWN: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Options whose verdict on a fresh TCP socket is a function of the value
/// only: `do_tcp_setsockopt` and `sk_setsockopt` check the length and the
/// range, nothing else.
fn pure(level: i32, optname: i32) -> bool {
    matches!(
        (level, optname),
        (
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY | libc::TCP_KEEPIDLE | libc::TCP_KEEPINTVL | libc::TCP_KEEPCNT
        ) | (
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE | libc::SO_REUSEADDR | libc::SO_REUSEPORT
        )
    )
}

/// What `setsockopt(level, optname, value)` answers on a fresh TCP socket
/// of the family: `Ok(verdict)`, or `Err(ENOMEM)` when no socket could be
/// had to ask.
pub(crate) fn set_on_fresh(
    v6: bool,
    level: i32,
    optname: i32,
    value: &[u8],
) -> Result<Result<(), Errno>, Errno> {
    let keep = pure(level, optname) && value.len() <= MAX_VALUE;
    if keep {
        let known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = known
            .iter()
            .find(|e| e.0 == v6 && e.1 == level && e.2 == optname && e.3 == value)
        {
            return Ok(e.4);
        }
    }
    let fresh = crate::probe::fresh(v6).ok_or(libc::ENOMEM)?;
    let verdict = ax_sys::sockopt::set_raw(fresh.as_fd(), level, optname, value)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
    if keep {
        let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX {
            known.clear();
        }
        known.push((v6, level, optname, value.to_vec(), verdict));
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_verdicts_are_the_kernels() {
        let one = 1i32.to_ne_bytes();
        let zero = 0i32.to_ne_bytes();
        for _ in 0..2 {
            assert_eq!(
                set_on_fresh(false, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one),
                Ok(Ok(()))
            );
            assert_eq!(
                set_on_fresh(false, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &zero),
                Ok(Err(libc::EINVAL))
            );
            assert_eq!(
                set_on_fresh(true, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one[..2]),
                Ok(Err(libc::EINVAL))
            );
        }
    }
}
