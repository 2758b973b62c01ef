//! UDP `connect` and `sendto` to a VIP: `ENETUNREACH`.
//!
//! UDP is not brokered: a datagram to a VIP would go where the host routes
//! it, off the machine on a host with a default route. Until ax brokers
//! UDP, a datagram socket's `connect` or `sendto` to an address in the VIP
//! pools fails as on a host with no route there (logged once per app).
//!
//! * Inputs: the socket (the broker's copy: `AF_INET`/`AF_INET6` datagram
//!   sockets only), the destination read once from the program's memory.
//! * Decision: a VIP (`Directory::is_virtual`, v4-mapped included) is
//!   `ENETUNREACH`; anything else, and anything the kernel refuses first
//!   (a bad length, a bad pointer, a foreign family), is the kernel's.
//! * Effect: the errno, or `CONTINUE`. The `CONTINUE` decides nothing of
//!   ax's: the kernel reads the address again, so a program that rewrites
//!   it from another thread in between reaches a VIP, but it could as well
//!   name one in `sendmsg`, which no filter can read. The point is that
//!   no datagram goes off the host *by mistake*, not to confine a program
//!   that wants it there; UDP is not a path to any service of ax.

use super::{Call, Outcome};
use crate::addr::{self, Purpose};
use crate::target::Target;
use rustix::net::sockopt;
use rustix::net::{AddressFamily, SocketType};

/// `ENETUNREACH` when the call's fd is an IP datagram socket and the
/// address at `ptr` (`len` bytes) is a VIP; `None` (the kernel's to run)
/// otherwise.
pub(super) fn to_vip(call: &Call<'_>, target: &Target, ptr: u64, len: i32) -> Option<Outcome> {
    let fd = target.fd(call.arg(0)).ok()?;
    let domain = sockopt::socket_domain(&fd).ok()?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        return None;
    }
    if sockopt::socket_type(&fd).ok()? != SocketType::DGRAM {
        return None;
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= ax_sys::sockaddr::SOCKADDR_STORAGE_LEN)?;
    if ptr == 0 {
        return None;
    }
    let bytes = target.read(ptr, len).ok()?;
    let dst = addr::parse(&bytes, domain == AddressFamily::INET6, Purpose::Connect)?;
    if !call.shared.directory.is_virtual(dst.ip()) {
        return None;
    }
    if call.state.first_udp_to_vip() {
        tracing::warn!(
            app = call.app,
            %dst,
            "UDP to a VIP is not brokered: failing it with ENETUNREACH (logged once per app)"
        );
    }
    Some(Outcome::Errno(libc::ENETUNREACH))
}
