//! Where accepted connections wait while they are handed to a server.
//!
//! Installing an accepted connection in the server (`ADDFD`) waits for the
//! server's thread to run. Until it has, the broker would hold the only
//! reference to the connection, and a daemon killed meanwhile would drop it
//! with the client's bytes unread. So the broker first sends a duplicate
//! into a datagram socket pair the launcher also holds: a descriptor in
//! flight belongs to the socket's queue, which outlives the daemon. Once the
//! install is done the duplicate is taken back out and closed; a successor
//! daemon drains whatever is left and installs it for the accepts its
//! predecessor did not finish.
//!
//! While the daemon's fd keeper runs ([`crate::keeper`]), connections being
//! handed over skip the stash: the keeper shares the daemon's fd table and
//! holds them already (see `Broker::kept_by`). The stash then only carries
//! the connections a successor collected from its predecessor's keeper.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

/// Both ends of an app's stash (a `SOCK_DGRAM` socket pair).
#[derive(Debug)]
pub struct Stash {
    send: OwnedFd,
    recv: OwnedFd,
}

impl Stash {
    /// A stash whose `send` end delivers to `recv`.
    pub fn new(send: OwnedFd, recv: OwnedFd) -> Self {
        Self { send, recv }
    }

    /// Parks a duplicate of `fd`: a connection accepted for a server of
    /// this app, which the next take-over hands to an accept its
    /// predecessor left unanswered (a daemon uses it for connections it
    /// saved from its predecessor's fd keeper, see [`ax_sys::keeper`]).
    pub fn put(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        let fds = [fd];
        if !anc.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        rustix::net::sendmsg(
            &self.send,
            &[IoSlice::new(b"c")],
            &mut anc,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )?;
        Ok(())
    }

    /// Takes one parked descriptor back, if any.
    pub(crate) fn take(&self) -> Option<OwnedFd> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        rustix::net::recvmsg(
            &self.recv,
            &mut [IoSliceMut::new(&mut byte)],
            &mut anc,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        )
        .ok()?;
        anc.drain().find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
    }

    /// Everything parked.
    pub(crate) fn drain(&self) -> Vec<OwnedFd> {
        std::iter::from_fn(|| self.take()).collect()
    }
}
