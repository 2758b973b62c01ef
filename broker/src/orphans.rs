//! Calls a killed daemon received and died before recording.
//!
//! The journal ([`ax_sys::journal`]) records each notification right after
//! `RECV`; a daemon killed between the two leaves a call the kernel counts
//! as received, which no later `RECV` shows again and no journal entry
//! describes: its thread would wait for ever. A successor finds it in two
//! steps:
//!
//! 1. **Its id.** Ids of one listener grow by one per trapped call and
//!    `RECV` hands them out oldest first, so the lost call's id lies just
//!    above the journal's high-water mark; before the successor receives
//!    anything, `ID_VALID` is true there only for calls already received.
//! 2. **Its thread and arguments.** Among the app's threads waiting in
//!    `seccomp_do_user_notification` (`/proc/…/wchan`), those whose call is
//!    neither journaled nor received by the successor are the lost one and
//!    calls not received yet; the latter are received within moments, so
//!    the one thread still waiting, with the same call, over several looks
//!    is the lost one. `/proc/TID/syscall` gives its number and arguments.
//!
//! The call is then handled as a replayed one.

use crate::serve::{dispatch, AppLink, OwnedAppLink};
use crate::target::PidfdCache;
use ax_sys::journal::Journal;
use ax_sys::{Notification, NotifyFd};
use std::collections::HashSet;
use std::time::Duration;

/// How far above the high-water mark lost ids are looked for: calls whose
/// thread was interrupted before `RECV` leave gaps.
const PROBE: u64 = 4096;
/// Looks at the threads this often…
const LOOK_EVERY: Duration = Duration::from_millis(50);
/// …this many times at most…
const LOOKS: usize = 100;
/// …and takes a thread seen waiting in the same call this many times.
const SAME_LOOKS: usize = 3;

/// `AUDIT_ARCH_*` of the native system calls (the filter refuses others).
const NATIVE_ARCH: u32 = if cfg!(target_arch = "x86_64") {
    0xC000_003E
} else if cfg!(target_arch = "aarch64") {
    0xC000_00B7
} else {
    0
};

/// Ids of calls received by a predecessor and not in the journal. Call it
/// before receiving anything on `listener`.
pub(crate) fn find(listener: &NotifyFd, journal: &Journal) -> Vec<u64> {
    let high = journal.high_water();
    if high == 0 {
        return Vec::new();
    }
    let recorded: HashSet<u64> = journal.pending().iter().map(|n| n.id).collect();
    (1..=PROBE)
        .map(|k| high.wrapping_add(k))
        .filter(|id| !recorded.contains(id) && listener.id_valid(*id))
        .collect()
}

/// Finds the thread of lost call `id` among the processes of `root`'s tree
/// and handles its call, on a helper thread.
pub(crate) fn recover(link: &AppLink<'_>, id: u64, root: Option<u32>) {
    let Some(root) = root else {
        tracing::warn!(
            app = link.app,
            id,
            "a call was lost with the previous daemon, and the app's process is unknown"
        );
        return;
    };
    tracing::info!(
        app = link.app,
        id,
        "a call the previous daemon received was never recorded; looking for its thread"
    );
    let owned = OwnedAppLink::of_link(link);
    let spawned = link.shared.pool.spawn(Box::new(move || {
        let link = owned.link();
        let mut last: Option<Waiting> = None;
        let mut same = 0;
        for _ in 0..LOOKS {
            if !link.listener.id_valid(id) {
                return; // its thread died, or was killed
            }
            let known: HashSet<u32> = link
                .journal
                .as_ref()
                .map(|j| j.pending().iter().map(|n| n.pid).collect())
                .unwrap_or_default();
            let mut waiting: Vec<Waiting> = waiting_threads(root)
                .into_iter()
                .filter(|w| !known.contains(&w.tid))
                .collect();
            match (waiting.len(), &last) {
                (1, Some(prev)) if *prev == waiting[0] => same += 1,
                (1, _) => {
                    same = 1;
                    last = waiting.pop();
                }
                _ => {
                    same = 0;
                    last = None;
                }
            }
            if same >= SAME_LOOKS {
                if let Some(w) = last.take() {
                    tracing::info!(
                        app = link.app,
                        id,
                        tid = w.tid,
                        nr = w.nr,
                        "finishing the call the previous daemon lost"
                    );
                    let n = Notification {
                        id,
                        pid: w.tid,
                        nr: w.nr,
                        arch: NATIVE_ARCH,
                        args: w.args,
                    };
                    dispatch(&link, n, true, None, &mut PidfdCache::default());
                }
                return;
            }
            std::thread::sleep(LOOK_EVERY);
        }
        tracing::warn!(
            app = link.app,
            id,
            "could not tell which thread waits in the lost call"
        );
    }));
    if spawned.is_err() {
        tracing::warn!(app = link.app, id, "no thread to look for a lost call");
    }
}

/// A thread waiting for a seccomp notification's answer, and its call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    tid: u32,
    nr: i32,
    args: [u64; 6],
}

/// Threads of `root` and its descendants waiting in a trapped call.
fn waiting_threads(root: u32) -> Vec<Waiting> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    let mut seen = HashSet::new();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) || seen.len() > 65536 {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let dir = format!("/proc/{pid}/task/{tid}");
            if let Ok(children) = std::fs::read_to_string(format!("{dir}/children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
            let wchan = std::fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
            if !wchan.starts_with("seccomp_do_user_notification") {
                continue;
            }
            let line = std::fs::read_to_string(format!("{dir}/syscall")).unwrap_or_default();
            if let Some((nr, args)) = parse_syscall(&line) {
                out.push(Waiting { tid, nr, args });
            }
        }
    }
    out
}

/// `/proc/TID/syscall` of a blocked thread: the number in decimal, then six
/// arguments, the stack and the instruction pointer in hex.
fn parse_syscall(line: &str) -> Option<(i32, [u64; 6])> {
    let mut fields = line.split_whitespace();
    let nr: i32 = fields.next()?.parse().ok()?;
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(fields.next()?.strip_prefix("0x")?, 16).ok()?;
    }
    Some((nr, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_blocked_thread() {
        let line = "42 0x3 0x7ffd5b0 0x10 0x0 0x0 0x0 0x7ffd5a8 0x7f00123\n";
        assert_eq!(
            parse_syscall(line),
            Some((42, [3, 0x7ffd5b0, 0x10, 0, 0, 0]))
        );
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f\n"), None);
        assert_eq!(parse_syscall(""), None);
    }
}
