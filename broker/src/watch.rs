//! One look, for every app at once, at the blocking accepts that have been
//! parked for a while.
//!
//! A blocking `accept` with nothing to accept waits in its app's receive
//! loop (see `handlers::accept::Parked`), which must notice a signal for
//! the caller (the accept then ends with `EINTR`, as natively: the filter
//! keeps the kernel from interrupting a call the broker has received) and
//! a caller that is gone. In its first second a parked accept is looked at
//! by its own loop every 50 ms. After that, rather than every loop with a
//! parked accept waking four times a second to look at its own, one thread
//! of the broker looks at all of them every [`EVERY`] and wakes only the
//! loop of an accept that needs it; a loop whose accepts are all watched
//! sleeps until a call, a connection, such a wake-up or a listener's
//! timeout. An idle server then costs the daemon one look (an `ID_VALID`
//! and a read of the caller's status file) four times a second instead of
//! four wake-ups of its loop, which cost ten times as much on a VM.

use crate::lock;
use crate::target::Signals;
use ax_sys::NotifyFd;
use rustix::event::{eventfd, EventfdFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// How often the watched accepts are looked at: a signal to a server that
/// has waited in `accept` for over a second interrupts it within this long.
pub(crate) const EVERY: Duration = Duration::from_millis(250);

/// The loops with watched accepts, and the thread that looks at them.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    loops: Mutex<Vec<Weak<LoopWatch>>>,
    started: OnceLock<()>,
}

/// What one receive loop shows the watch: its watched accepts, and how to
/// wake it.
#[derive(Debug)]
pub(crate) struct LoopWatch {
    notify: Arc<NotifyFd>,
    /// Readable once the loop is wanted (an eventfd).
    wake: OwnedFd,
    accepts: Mutex<Vec<Watched>>,
}

/// A parked accept being watched.
#[derive(Debug)]
struct Watched {
    /// Its notification.
    id: u64,
    /// Its caller's pending signals.
    signals: Signals,
}

impl Watch {
    /// A watch for the loop serving `notify`, looked at from now on by the
    /// watch's thread (started with the first). `None` when no eventfd can
    /// be made: the loop then looks after its accepts itself.
    pub(crate) fn join(self: &Arc<Self>, notify: &Arc<NotifyFd>) -> Option<Arc<LoopWatch>> {
        let wake = match eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "no eventfd for the watch of parked accepts; the loop looks at them itself");
                return None;
            }
        };
        let lw = Arc::new(LoopWatch {
            notify: notify.clone(),
            wake,
            accepts: Mutex::new(Vec::new()),
        });
        lock(&self.loops).push(Arc::downgrade(&lw));
        crate::tidy::start_ticking(
            &self.started,
            self,
            "ax-watch",
            EVERY,
            Watch::tick,
            "the thread that watches parked accepts",
        );
        Some(lw)
    }

    /// One look at every watched accept; wakes the loops that must act.
    fn tick(&self) {
        lock(&self.loops).retain(|w| {
            let Some(lw) = w.upgrade() else {
                return false;
            };
            if lw.wanted() {
                lw.wake_up();
            }
            true
        });
    }
}

impl LoopWatch {
    /// Watches exactly the accepts `parked` names, as (notification id,
    /// caller's tid), sorted by id; a caller's status file is opened once,
    /// when its accept is first watched. Kept sorted by id.
    pub(crate) fn set(&self, parked: &[(u64, u32)]) {
        let mut accepts = lock(&self.accepts);
        let had = std::mem::take(&mut *accepts);
        let mut had = had.into_iter().peekable();
        for &(id, tid) in parked {
            // Both sorted: what was watched before and is still parked
            // keeps its open status file.
            while had.next_if(|w| w.id < id).is_some() {}
            match had.next_if(|w| w.id == id) {
                Some(w) => accepts.push(w),
                None => accepts.push(Watched {
                    id,
                    signals: Signals::open(tid),
                }),
            }
        }
    }

    /// The fd the loop polls: readable once it is wanted.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Clears the wake-up (the loop then looks at every parked accept).
    pub(crate) fn clear(&self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.wake, &mut count);
    }

    /// Whether an accept needs its loop: its call ended (the caller left)
    /// or a signal is pending for its caller.
    fn wanted(&self) -> bool {
        lock(&self.accepts)
            .iter()
            .any(|w| !self.notify.id_valid(w.id) || w.signals.pending())
    }

    fn wake_up(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: BorrowedFd<'_>) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).unwrap_or(0) == 1
    }

    #[test]
    fn a_loop_is_woken_only_when_an_accept_needs_it_and_let_go_when_dropped() {
        // Any fd will do for a notify fd here: no id is valid on it, as
        // for a call whose caller left.
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let notify = Arc::new(NotifyFd::from(OwnedFd::from(devnull)));
        let watch = Arc::new(Watch::default());
        let lw = watch.join(&notify).expect("eventfd");
        // Nothing watched: nobody is woken.
        watch.tick();
        assert!(!readable(lw.fd()));
        // A call that is not pending (its caller left): the loop is woken.
        lw.set(&[(7, std::process::id())]);
        watch.tick();
        assert!(readable(lw.fd()));
        lw.clear();
        assert!(!readable(lw.fd()));
        // The set follows the loop's, keeping what stays.
        let me = std::process::id();
        lw.set(&[(1, me), (3, me), (7, me)]);
        lw.set(&[(2, me), (3, me)]);
        let ids: Vec<u64> = lock(&lw.accepts).iter().map(|w| w.id).collect();
        assert_eq!(ids, [2, 3]);
        // No longer watched: no more wake-ups.
        lw.set(&[]);
        watch.tick();
        assert!(!readable(lw.fd()));
        drop(lw);
        watch.tick();
        assert!(lock(&watch.loops).is_empty());
    }
}
