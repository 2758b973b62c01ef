//! Housekeeping for receive loops that wait in the notification receive
//! itself.
//!
//! Where the kernel wakes a receive blocked in `SECCOMP_IOCTL_NOTIF_RECV`
//! when the last program of its filter exits (Linux 6.11+: see
//! [`receive_ends_on_exit`]), an app's receive
//! loop waits there instead of in a `poll` before each receive (see
//! `serve::receive_loop`): one system call fewer per trapped call. It then
//! no longer wakes once a second, so the pidfds and fdinfo files it keeps
//! for its app's threads (`target::PidfdCache`) would outlive the threads
//! of an app gone quiet. One thread per broker tidies them instead: twice a
//! second it forgets the exited threads of every cache whose loop waits in
//! the receive, and closes the fdinfo files of an app that made no call
//! since its last look, as the loop itself does while it polls (then the
//! loop alone looks after its cache).

use crate::lock;
use crate::target::PidfdCache;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError, Weak};
use std::time::Duration;

/// The first kernel whose blocked `SECCOMP_IOCTL_NOTIF_RECV` returns once
/// the filter has no program left ("seccomp: interrupt
/// SECCOMP_IOCTL_NOTIF_RECV when all users have exited"). Before it (6.6
/// to 6.10 included, where a receive waits on the poll queue but its wake
/// ignores the hang-up) such a receive would wait for ever.
const RECEIVE_ENDS_ON_EXIT: (u32, u32) = (6, 11);

/// Whether this kernel ends a blocked receive when the filter's last
/// program exits (read once, from `/proc/sys/kernel/osrelease`; `false`
/// when it cannot be read or parsed: the loop then polls).
pub(crate) fn receive_ends_on_exit() -> bool {
    static KNOWN: OnceLock<bool> = OnceLock::new();
    *KNOWN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|r| release_version(&r))
            .is_some_and(|v| v >= RECEIVE_ENDS_ON_EXIT)
    })
}

/// (major, minor) of a kernel release string such as `6.18.44-generic`.
fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// How often the caches are looked at: an app's fdinfo files are closed
/// within a second of its last call (between one and two looks after it),
/// as its loop closes them when it polls.
const EVERY: Duration = Duration::from_millis(500);

/// The caches of the loops that wait in the receive, and the thread that
/// tidies them.
#[derive(Debug, Default)]
pub(crate) struct Tidy {
    caches: Mutex<Vec<Watched>>,
    started: OnceLock<()>,
}

/// What a receive loop shows the tidy thread.
#[derive(Debug, Default)]
pub(crate) struct LoopMarks {
    /// Calls the loop has received so far.
    pub(crate) calls: AtomicU64,
    /// Set while the loop waits in the receive (and so does not look
    /// after its cache itself).
    pub(crate) waiting: AtomicBool,
}

#[derive(Debug)]
struct Watched {
    cache: Weak<Mutex<PidfdCache>>,
    marks: Arc<LoopMarks>,
    /// `marks.calls` at the last look.
    seen: u64,
}

impl Tidy {
    /// Tidies `cache` while its loop waits in the receive, until the loop
    /// drops it (an app whose count of calls stands still for a look is
    /// idle).
    pub(crate) fn watch(self: &Arc<Self>, cache: &Arc<Mutex<PidfdCache>>, marks: &Arc<LoopMarks>) {
        self.add(cache, marks);
        start_ticking(
            &self.started,
            self,
            "ax-tidy",
            EVERY,
            Tidy::tick,
            "the thread that tidies idle apps' caches",
        );
    }

    fn add(&self, cache: &Arc<Mutex<PidfdCache>>, marks: &Arc<LoopMarks>) {
        lock(&self.caches).push(Watched {
            cache: Arc::downgrade(cache),
            marks: marks.clone(),
            seen: marks.calls.load(Ordering::Relaxed),
        });
    }

    /// One look at every cache.
    fn tick(&self) {
        lock(&self.caches).retain_mut(|w| {
            let Some(cache) = w.cache.upgrade() else {
                return false;
            };
            let calls = w.marks.calls.load(Ordering::Relaxed);
            let idle = calls == w.seen;
            w.seen = calls;
            if !w.marks.waiting.load(Ordering::Relaxed) {
                // Polling: the loop looks after its cache itself.
                return true;
            }
            let mut cache = match cache.try_lock() {
                Ok(c) => c,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                // Busy with a call: looked at next time.
                Err(TryLockError::WouldBlock) => return true,
            };
            cache.sweep();
            if idle {
                cache.forget_fdinfo();
            }
            true
        });
    }
}

/// Starts, the first time only (`started`), a thread `name` that calls
/// `tick` on `owner` every `every` for as long as `owner` lives; `what`
/// names it in the warning if it cannot start.
pub(crate) fn start_ticking<T: Send + Sync + 'static>(
    started: &OnceLock<()>,
    owner: &Arc<T>,
    name: &str,
    every: Duration,
    tick: fn(&T),
    what: &str,
) {
    if started.set(()).is_err() {
        return;
    }
    let weak: Weak<T> = Arc::downgrade(owner);
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            std::thread::sleep(every);
            match weak.upgrade() {
                Some(owner) => tick(&owner),
                None => return,
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(release_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(release_version("6.8.0-45-generic"), Some((6, 8)));
        assert_eq!(release_version("5.15.0+"), Some((5, 15)));
        assert_eq!(release_version("6.11-rc1"), Some((6, 11)));
        assert_eq!(release_version("garbage"), None);
        assert!(release_version("6.10.14").unwrap() < RECEIVE_ENDS_ON_EXIT);
        assert!(release_version("7.0.1").unwrap() >= RECEIVE_ENDS_ON_EXIT);
    }

    #[test]
    fn an_idle_cache_forgets_exited_threads_and_a_dropped_one_is_let_go() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let cache = Arc::new(Mutex::new(PidfdCache::default()));
        let marks = Arc::new(LoopMarks::default());
        marks.waiting.store(true, Ordering::Relaxed);
        lock(&cache).target(child.id()).unwrap();
        assert!(!lock(&cache).is_empty());
        // Looked at by hand here, not by the thread `watch` starts.
        let tidy = Tidy::default();
        tidy.add(&cache, &marks);
        // A live thread stays.
        tidy.tick();
        assert!(!lock(&cache).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        // Busy with a call, or polling: left alone.
        {
            let _busy = lock(&cache);
            tidy.tick();
        }
        marks.waiting.store(false, Ordering::Relaxed);
        tidy.tick();
        assert!(!lock(&cache).is_empty());
        marks.waiting.store(true, Ordering::Relaxed);
        tidy.tick();
        assert!(lock(&cache).is_empty(), "the exited child is forgotten");
        drop(cache);
        tidy.tick();
        assert!(lock(&tidy.caches).is_empty());
    }
}
