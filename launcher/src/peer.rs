//! Telling a program under ax from an ordinary client on the control
//! socket, by the namespaces the kernel reports for the peer.
//!
//! Every program under ax runs in a mount namespace of its own, and an
//! unprivileged one also in a user namespace of its own, made by the
//! launcher before `execve`. The daemon refuses a peer when
//!
//! * its user namespace lies strictly below the daemon's: a process can
//!   enter a child user namespace but never return to an ancestor, so no
//!   descendant of an unprivileged program under ax (whatever it unshares,
//!   forks or races) gets out of it; or
//! * its mount namespace is one the daemon recorded for an app when it
//!   attached (the case of programs run by root, which stay in the
//!   daemon's user namespace).
//!
//! The peer is the process that called `connect`, held by a pidfd
//! (`SO_PEERPIDFD`) where the kernel has them, so that its pid cannot come
//! to mean another process while the daemon looks. Nothing here depends on
//! what the broker saw of the `connect`: a race on the fd it inspected
//! changes nothing.

use ax_registry::AppId;
use rustix::fs::{Mode, OFlags};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

/// A namespace, as `stat` on its `/proc/PID/ns` link identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NsId {
    dev: u64,
    ino: u64,
}

impl NsId {
    fn of(fd: &OwnedFd) -> io::Result<Self> {
        let st = rustix::fs::fstat(fd)?;
        Ok(Self {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

/// User namespaces are nested at most 32 deep (user_namespaces(7)).
const MAX_USERNS_DEPTH: usize = 33;

fn open_ns(pid: u32, kind: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        format!("/proc/{pid}/ns/{kind}"),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// What a control-socket peer turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a program under ax: serve it.
    Client,
    /// A program under ax (of this app, when known).
    UnderAx(Option<AppId>),
}

/// The namespaces of the daemon and of the apps it serves.
#[derive(Debug)]
pub struct AppNamespaces {
    own_user: Option<NsId>,
    own_mnt: Option<NsId>,
    /// App → its mount namespace (recorded at attach from its first
    /// process).
    apps: Mutex<HashMap<AppId, NsId>>,
}

impl AppNamespaces {
    /// The daemon's own namespaces, read now.
    pub fn new() -> Self {
        let own = |kind: &str| {
            open_ns(std::process::id(), kind)
                .and_then(|fd| NsId::of(&fd))
                .inspect_err(
                    |e| tracing::warn!(kind, error = %e, "cannot read the daemon's own namespace"),
                )
                .ok()
        };
        Self {
            own_user: own("user"),
            own_mnt: own("mnt"),
            apps: Mutex::new(HashMap::new()),
        }
    }

    /// Records the mount namespace of `pid`, the first process of `app`.
    /// A process already gone is no error (it cannot connect any more; its
    /// descendants are still told by their user namespace, or, run by
    /// root, are beyond what ax can hold anyway).
    ///
    /// # Errors
    /// The namespace cannot be read, or is the daemon's own (the program
    /// did not get a mount namespace of its own).
    pub fn record(&self, app: AppId, pid: u32) -> io::Result<()> {
        let mnt = match open_ns(pid, "mnt").and_then(|fd| NsId::of(&fd)) {
            Ok(id) => id,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if Some(mnt) == self.own_mnt {
            return Err(io::Error::other(
                "the program shares the daemon's mount namespace",
            ));
        }
        self.apps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(app, mnt);
        Ok(())
    }

    /// Forgets `app` (it has exited).
    pub fn forget(&self, app: AppId) {
        self.apps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&app);
    }

    /// Judges the peer `pid` of a control connection; `pidfd` (from
    /// `SO_PEERPIDFD`) proves afterwards that `pid` was still that peer.
    ///
    /// # Errors
    /// The peer is gone, or its namespaces cannot be read for another
    /// reason than a lack of permission: refuse it.
    pub fn judge(&self, pid: u32, pidfd: Option<&OwnedFd>) -> io::Result<Verdict> {
        let verdict = match self.judge_pid(pid) {
            // ptrace_may_access refused: another uid (root, for a rootless
            // daemon), or a non-dumpable process whose memory belongs to a
            // user namespace where the daemon has no capability. Every
            // program of this daemon's user runs in a user namespace the
            // daemon owns, so is readable; a root daemon reads everything.
            // What is left is root under a rootless daemon, which ax
            // cannot hold anyway (it may ptrace the daemon).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                Verdict::Client
            }
            other => other?,
        };
        if let Some(pidfd) = pidfd {
            // Signal 0 checks that the process the pidfd holds still runs,
            // so `pid` was not reused while we read: `ESRCH` once it has
            // exited; `EPERM` (another uid) means it runs.
            match ax_sys::process::pidfd_send_signal(pidfd.as_fd(), 0) {
                Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
                _ => {}
            }
        }
        Ok(verdict)
    }

    fn judge_pid(&self, pid: u32) -> io::Result<Verdict> {
        let mnt = NsId::of(&open_ns(pid, "mnt")?)?;
        if let Some((&app, _)) = self
            .apps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, &m)| m == mnt)
        {
            return Ok(Verdict::UnderAx(Some(app)));
        }
        let mut user = open_ns(pid, "user")?;
        for depth in 0..MAX_USERNS_DEPTH {
            if Some(NsId::of(&user)?) == self.own_user {
                // The daemon's own, or one below it.
                return Ok(if depth == 0 {
                    Verdict::Client
                } else {
                    Verdict::UnderAx(None)
                });
            }
            match ax_sys::ns::parent(user.as_fd()) {
                Ok(parent) => user = parent,
                // Above what the daemon can see: not below the daemon's.
                Err(_) => return Ok(Verdict::Client),
            }
        }
        Ok(Verdict::Client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_a_client() {
        let ns = AppNamespaces::new();
        assert_eq!(ns.judge(std::process::id(), None).unwrap(), Verdict::Client);
        // Recording ourselves as an app is refused: we share our own mount
        // namespace.
        assert!(ns.record(1, std::process::id()).is_err());
        // A pid that does not exist is an error to judge, nothing to record.
        assert!(ns.judge(u32::MAX / 2, None).is_err());
        assert!(ns.record(1, u32::MAX / 2).is_ok());
    }
}
