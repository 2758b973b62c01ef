//! Checks, against the kernel, of what a client told the broker about its
//! own calls and processes: the journal ([`ax_sys::journal`]) lives in memory
//! the launcher's user can write, and the app's pid comes from the launcher.
//! Nothing from there is acted on before it passes these checks.
//!
//! A journaled call is taken over only if
//! * its notification id is still pending on the app's listener
//!   (`SECCOMP_IOCTL_NOTIF_ID_VALID`),
//! * its thread belongs to the app's process tree (the app's first process,
//!   whose parent is the launcher that handed the app over, and its
//!   descendants, as `/proc` shows them),
//! * and that thread waits in a trapped call (`/proc/TID/wchan`) with the
//!   same number and arguments (`/proc/TID/syscall`).
//!
//! The ids of entries that fail are still the kernel's to wait on: they are
//! treated as calls whose record was lost (see `crate::orphans`), whose
//! thread and arguments are found from `/proc` alone.

use ax_sys::{Notification, NotifyFd};
use std::collections::HashMap;

/// Why a journaled call was not taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejected {
    /// The kernel no longer waits for an answer with this id.
    #[error("its id is not pending on the app's listener")]
    NotPending,
    /// The app's first process is unknown or gone.
    #[error("the app's process is unknown")]
    NoApp,
    /// Not an architecture the filter lets through.
    #[error("it names a foreign architecture")]
    Arch,
    /// The thread named is not one of the app's.
    #[error("its thread is not one of the app's processes")]
    NotInApp,
    /// The thread does not wait in a trapped call.
    #[error("its thread does not wait in a trapped call")]
    NotWaiting,
    /// The thread waits in another call, or with other arguments.
    #[error("its thread waits in another call than the one recorded")]
    OtherCall,
}

/// `AUDIT_ARCH_*` of the native system calls (the filter refuses others).
pub(crate) const NATIVE_ARCH: u32 = if cfg!(target_arch = "x86_64") {
    0xC000_003E
} else if cfg!(target_arch = "aarch64") {
    0xC000_00B7
} else {
    0
};

/// The threads of an app's process tree, by tid, with their process.
#[derive(Debug, Default)]
pub(crate) struct AppThreads {
    by_tid: HashMap<u32, u32>,
    known: bool,
}

impl AppThreads {
    /// The threads of `root` and its descendants now (`None`: none known).
    pub(crate) fn of(root: Option<u32>) -> Self {
        let Some(root) = root else {
            return Self::default();
        };
        Self {
            by_tid: crate::orphans::process_tree(root)
                .into_iter()
                .map(|(pid, tid)| (tid, pid))
                .collect(),
            known: true,
        }
    }

    /// The process of thread `tid`, if it is one of the app's.
    pub(crate) fn process_of(&self, tid: u32) -> Option<u32> {
        self.by_tid.get(&tid).copied()
    }
}

/// Checks a call read from the journal (see the module docs).
///
/// # Errors
/// The first check that failed.
pub(crate) fn journaled_call(
    listener: &NotifyFd,
    app: &AppThreads,
    n: &Notification,
) -> Result<(), Rejected> {
    if !listener.id_valid(n.id) {
        return Err(Rejected::NotPending);
    }
    if !app.known {
        return Err(Rejected::NoApp);
    }
    if n.arch != NATIVE_ARCH {
        return Err(Rejected::Arch);
    }
    let pid = app.process_of(n.pid).ok_or(Rejected::NotInApp)?;
    let dir = format!("/proc/{pid}/task/{}", n.pid);
    let wchan = std::fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
    if !wchan.starts_with("seccomp_do_user_notification") {
        return Err(Rejected::NotWaiting);
    }
    let line = std::fs::read_to_string(format!("{dir}/syscall")).unwrap_or_default();
    match crate::orphans::parse_syscall(&line) {
        Some((nr, args)) if nr == n.nr && args == n.args => {}
        _ => return Err(Rejected::OtherCall),
    }
    // The thread could have ended and its tid been reused meanwhile: the
    // id stays pending only while the thread waits in that call.
    if !listener.id_valid(n.id) {
        return Err(Rejected::NotPending);
    }
    Ok(())
}

/// Whether `pid` is a child of `parent` (`PPid` in `/proc/PID/status`): the
/// app's first process is the launcher's child, so a launcher can only hand
/// over a process it started.
pub fn is_child_of(pid: u32, parent: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        == Some(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_of_this_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(is_child_of(child.id(), std::process::id()));
        assert!(!is_child_of(std::process::id(), child.id()));
        assert!(!is_child_of(u32::MAX, std::process::id()));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn outside_the_app_is_refused() {
        let app = AppThreads::of(Some(std::process::id()));
        assert!(app.process_of(std::process::id()).is_some());
        assert!(app.process_of(1).is_none() || std::process::id() == 1);
        let none = AppThreads::of(None);
        assert!(none.process_of(std::process::id()).is_none());
    }
}
