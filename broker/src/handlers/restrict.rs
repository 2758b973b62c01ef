//! `landlock_restrict_self`, `seccomp(SECCOMP_SET_MODE_FILTER)` and
//! `prctl(PR_SET_SECCOMP)`: a program restricting itself.
//!
//! * Inputs: none; the call itself is the news.
//! * Decision: nothing to decide. The app is marked self-restricted before
//!   the answer, so that every later `connect` of it sees the mark.
//! * Effect: `CONTINUE`; the kernel applies the restriction (or refuses it:
//!   a second seccomp listener, for one, is `EBUSY`).
//!
//! Why it matters: an egress `connect` (to an address that is not a VIP)
//! is normally made by the broker on its own copy of the socket, with its
//! own rights. A program that restricted itself must meet its own rules,
//! so its egress connects go to the kernel instead ([`self_restricted`]).

use super::{Call, Outcome};
use crate::target::Target;
use ax_registry::AppId;
use std::collections::HashSet;
use std::sync::Mutex;

/// Apps with a process that restricted itself, and apps whose seccomp
/// filters were counted once and found to be ax's alone.
#[derive(Debug, Default)]
pub(crate) struct SelfRestricted {
    apps: Mutex<HashSet<AppId>>,
    /// Apps whose first egress found no seccomp filter but ax's: a filter
    /// added later is added by a trapped call ([`handle`]), which marks
    /// the app, so the count need not be read again.
    counted: Mutex<HashSet<AppId>>,
}

impl SelfRestricted {
    pub(crate) fn mark(&self, app: AppId) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        if apps.insert(app) {
            tracing::info!(
                app,
                "the program restricted itself; its egress connects now go to the kernel"
            );
        }
    }

    fn contains(&self, app: AppId) -> bool {
        self.apps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&app)
    }

    fn filters_counted(&self, app: AppId) -> bool {
        self.counted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&app)
    }

    fn note_filters_counted(&self, app: AppId) {
        self.counted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(app);
    }

    /// Forgets `app` (it has exited).
    pub(crate) fn forget(&self, app: AppId) {
        self.apps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&app);
        self.counted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&app);
    }
}

pub(super) fn handle(call: &Call<'_>) -> Outcome {
    call.shared.self_restricted.mark(call.app);
    Outcome::Continue
}

/// Seccomp filters a program under ax has when it did not add any: ax's.
const AX_FILTERS: u64 = 1;

/// True when the calling thread's `connect` may be bound by rules of its
/// own, which only the kernel applies: the app restricted itself under ax
/// (Landlock or seccomp, seen by [`handle`]), or the thread has more
/// seccomp filters than ax's (inherited from whoever started `ax exec`),
/// or another LSM label than the broker (an AppArmor or SELinux domain of
/// its own). Landlock domains inherited from before `ax exec` are not
/// visible in `/proc` and are not seen.
///
/// What it costs, per egress connect: a "restricted" answer is final (a
/// restriction is never lifted) and kept per app. The seccomp filters are
/// counted once per app: every process of the app descends from the one
/// `ax exec` started and inherits its filters, and a filter added under ax
/// is added by a call ax traps, which marks the app before the kernel
/// adds it. The LSM label is read per call (an `execve` may change it
/// untrapped), unless the kernel has no LSM that keeps one: then reading
/// the broker's own label fails with `EINVAL`, as every process's would,
/// and that is asked once per daemon.
pub(crate) fn self_restricted(call: &Call<'_>, target: &Target) -> bool {
    let marks = &call.shared.self_restricted;
    if marks.contains(call.app) {
        return true;
    }
    let tid = target.tid;
    let mut restricted = false;
    if !marks.filters_counted(call.app) {
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
        let filters = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        match filters {
            Some(n) if n > AX_FILTERS => restricted = true,
            // Counted by the kernel: ax's filter alone.
            Some(_) => marks.note_filters_counted(call.app),
            // Not read (a kernel without the field, a thread gone): asked
            // again next time.
            None => {}
        }
    }
    if !restricted {
        if let Some(own) = own_label() {
            restricted = label(&format!("/proc/{tid}/attr/current")) != *own;
        }
    }
    if restricted {
        marks.mark(call.app);
    }
    restricted
}

/// A process's LSM label (`/proc/…/attr/current`), `None` if unreadable.
fn label(path: &str) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// The broker's own LSM label to compare with, or `None` when the kernel
/// has no LSM that keeps labels (reading it fails with `EINVAL`, as it
/// then does for every process): no program can have a label of its own.
fn own_label() -> Option<&'static Option<Vec<u8>>> {
    static OWN: std::sync::OnceLock<Option<Option<Vec<u8>>>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| match std::fs::read("/proc/thread-self/attr/current") {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
        Err(_) => Some(None),
        Ok(l) => Some(Some(l)),
    })
    .as_ref()
}
