//! A blocking egress `connect` to a loopback address, made on the receive
//! thread instead of a helper thread when it finishes at once.
//!
//! A blocking connect is normally handed to a helper thread
//! (`super::defer`): it may wait a network round trip or more, and the
//! receive loop never waits on the network. Handing it over costs a
//! thread wake-up, about 20 µs on a 2-vCPU VM, more than the connect
//! itself. To a loopback address the kernel completes the handshake within
//! the `connect` call, unless the listener's queue is full (or a firewall
//! drops the SYN). So the connect is tried here with the socket's send
//! timeout (`SO_SNDTIMEO`, which bounds a blocking connect) set to its
//! smallest value, one jiffy:
//!
//! * it connects or fails within the call: that is the answer;
//! * the jiffy ran out (`EINPROGRESS`, the handshake goes on): the timeout
//!   is put back and the same `connect` is made again on a helper thread,
//!   where the kernel waits for the handshake under way exactly as for the
//!   program's own blocking connect (the socket's state is `SS_CONNECTING`:
//!   the second `connect` waits, then answers 0 or the error, and leaves
//!   the socket as the first would have).
//!
//! Only a socket whose send timeout is unset (the default, waiting for
//! ever) is tried, so that the program's own timeout is never shortened;
//! the timeout is unset again before the answer. A daemon killed between
//! the two leaves the jiffy set: its successor, which finishes the call
//! (`connect::egress_replayed`), unsets a timeout of exactly one jiffy
//! first ([`clear_left_over`]).

use ax_sys::sockaddr::connect_raw;
use rustix::net::sockopt::{set_socket_timeout, socket_timeout, Timeout};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

/// What became of [`try_inline`].
pub(super) enum Inline {
    /// The connect finished: answer this.
    Done(Result<(), i32>),
    /// Still in progress after a jiffy: finish it on a helper thread.
    InProgress,
    /// Not tried (a send timeout of the program's own, or it could not be
    /// set): connect on a helper thread as usual.
    NotTried,
}

/// The smallest send timeout the kernel keeps (it rounds up to a jiffy).
const SHORTEST: Duration = Duration::from_micros(1);

/// Connects `copy` (a blocking, unconnected TCP socket of the program) to
/// the loopback address `bytes` here, if it takes no longer than a jiffy.
pub(super) fn try_inline(copy: &OwnedFd, bytes: &[u8]) -> Inline {
    match socket_timeout(copy, Timeout::Send) {
        Ok(None) => {}
        _ => return Inline::NotTried,
    }
    if set_socket_timeout(copy, Timeout::Send, Some(SHORTEST)).is_err() {
        return Inline::NotTried;
    }
    let result = connect_raw(copy.as_fd(), bytes);
    if set_socket_timeout(copy, Timeout::Send, None).is_err() {
        // Cannot happen on a TCP socket that took the timeout just now;
        // were it to, the program's socket would keep a jiffy's timeout.
        tracing::warn!("could not unset the send timeout of an egress connect");
    }
    match result {
        Ok(()) => Inline::Done(Ok(())),
        // EINTR (a signal to the broker's thread): the handshake goes on
        // too, and the helper's connect waits for it.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EINTR)) => {
            Inline::InProgress
        }
        Err(e) => Inline::Done(Err(e.raw_os_error().unwrap_or(libc::EIO))),
    }
}

/// Unsets a send timeout of exactly one jiffy on `copy`: the mark of a
/// daemon killed during [`try_inline`]. A program's own timeout of one
/// jiffy (a few milliseconds) is cleared too; that is the price.
pub(super) fn clear_left_over(copy: &OwnedFd) {
    let Some(mark) = jiffy() else {
        return;
    };
    if socket_timeout(copy, Timeout::Send).ok().flatten() == Some(mark) {
        let _ = set_socket_timeout(copy, Timeout::Send, None);
    }
}

/// How the kernel reports a send timeout of [`SHORTEST`] (one jiffy).
fn jiffy() -> Option<Duration> {
    static JIFFY: OnceLock<Option<Duration>> = OnceLock::new();
    *JIFFY.get_or_init(|| {
        let s = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .ok()?;
        set_socket_timeout(&s, Timeout::Send, Some(SHORTEST)).ok()?;
        socket_timeout(&s, Timeout::Send).ok().flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jiffy_is_kept_and_cleared() {
        let s = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        let Some(mark) = jiffy() else {
            return;
        };
        assert!(mark > Duration::ZERO && mark <= Duration::from_millis(10));
        set_socket_timeout(&s, Timeout::Send, Some(SHORTEST)).unwrap();
        clear_left_over(&s);
        assert_eq!(socket_timeout(&s, Timeout::Send).unwrap(), None);
        // A program's own timeout stays.
        set_socket_timeout(&s, Timeout::Send, Some(Duration::from_secs(3))).unwrap();
        clear_left_over(&s);
        assert_eq!(
            socket_timeout(&s, Timeout::Send).unwrap(),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn loopback_connects_inline_and_refusals_are_answered() {
        use std::net::TcpListener;
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            return;
        };
        let addr = l.local_addr().unwrap();
        let bytes = crate::addr::encode(addr, false);
        let s = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        assert!(matches!(try_inline(&s, &bytes), Inline::Done(Ok(()))));
        assert_eq!(socket_timeout(&s, Timeout::Send).unwrap(), None);
        drop(l);
        // Nobody listening any more: refused at once.
        let s = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        assert!(matches!(
            try_inline(&s, &bytes),
            Inline::Done(Err(libc::ECONNREFUSED))
        ));
        // A timeout of the program's own: not tried.
        let s = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        set_socket_timeout(&s, Timeout::Send, Some(Duration::from_secs(2))).unwrap();
        assert!(matches!(try_inline(&s, &bytes), Inline::NotTried));
    }
}
