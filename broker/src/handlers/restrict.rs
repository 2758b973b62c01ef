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

/// Apps with a process that restricted itself.
#[derive(Debug, Default)]
pub(crate) struct SelfRestricted {
    apps: Mutex<HashSet<AppId>>,
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

    /// Forgets `app` (it has exited).
    pub(crate) fn forget(&self, app: AppId) {
        self.apps
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
pub(crate) fn self_restricted(call: &Call<'_>, target: &Target) -> bool {
    if call.shared.self_restricted.contains(call.app) {
        return true;
    }
    let tid = target.tid;
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
    let filters = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(AX_FILTERS);
    let label = |path: &str| std::fs::read(path).ok();
    let restricted = filters > AX_FILTERS
        || label(&format!("/proc/{tid}/attr/current")) != label("/proc/thread-self/attr/current");
    if restricted {
        call.shared.self_restricted.mark(call.app);
    }
    restricted
}
