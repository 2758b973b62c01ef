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
//!    The id is then recorded in the journal as a placeholder, so that a
//!    successor killed in turn before finishing it passes it on.
//! 2. **Its thread and arguments.** Among the app's threads waiting in
//!    `seccomp_do_user_notification` (`/proc/…/wchan`), those whose call is
//!    neither journaled nor received by the successor are the lost ones
//!    and calls not received yet; the latter are received within moments,
//!    so the threads still waiting, with the same calls, over several looks
//!    are the lost ones. With several, the thread that has waited longest
//!    (`se.exec_start` in `/proc/TID/sched`) made the oldest call (the
//!    smallest id). `/proc/TID/syscall` gives each one's number and
//!    arguments.
//!
//! Each call is then handled as a replayed one.

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

use crate::verify::NATIVE_ARCH;

/// The system call number of a placeholder record: a lost call whose id is
/// known and whose thread is not yet.
pub(crate) const PLACEHOLDER_NR: i32 = -1;

/// Ids of calls received by a predecessor and never recorded (found now,
/// or by an earlier successor and still unfinished). Call it before
/// receiving anything on `listener`.
pub(crate) fn find(listener: &NotifyFd, journal: &Journal) -> Vec<u64> {
    let pending = journal.pending();
    let mut lost: Vec<u64> = pending
        .iter()
        .filter(|n| n.nr == PLACEHOLDER_NR && listener.id_valid(n.id))
        .map(|n| n.id)
        .collect();
    let high = journal.high_water();
    if high != 0 {
        let recorded: HashSet<u64> = pending.iter().map(|n| n.id).collect();
        for id in (1..=PROBE).map(|k| high.wrapping_add(k)) {
            if !recorded.contains(&id) && listener.id_valid(id) {
                record_lost(journal, id);
                lost.push(id);
            }
        }
    }
    lost.sort_unstable();
    lost
}

/// Records `id` as a lost call (a placeholder): its thread is looked for
/// from `/proc`, now and by a successor if this daemon dies first.
pub(crate) fn record_lost(journal: &Journal, id: u64) {
    journal.record(&Notification {
        id,
        pid: 0,
        nr: PLACEHOLDER_NR,
        arch: 0,
        args: [0; 6],
    });
}

/// Finds the threads of lost calls `ids` (oldest first) among the
/// processes of `root`'s tree and handles their calls, on a helper thread.
pub(crate) fn recover(link: &AppLink<'_>, ids: Vec<u64>, root: Option<u32>) {
    if ids.is_empty() {
        return;
    }
    let Some(root) = root else {
        tracing::warn!(
            app = link.app,
            ?ids,
            "calls were lost with the previous daemon, and the app's process is unknown"
        );
        return;
    };
    tracing::info!(
        app = link.app,
        ?ids,
        "calls the previous daemon received were never recorded; looking for their threads"
    );
    let owned = OwnedAppLink::of_link(link);
    let spawned = link.shared.pool.spawn(Box::new(move || {
        let link = owned.link();
        let mut last: Vec<Waiting> = Vec::new();
        let mut same = 0;
        for _ in 0..LOOKS {
            // A lost call whose thread died, or was killed, is gone.
            let ids: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|&id| link.listener.id_valid(id))
                .collect();
            if ids.is_empty() {
                return;
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
            waiting.sort_by_key(|w| w.tid);
            if waiting.len() == ids.len() && waiting == last {
                same += 1;
            } else {
                same = usize::from(waiting.len() == ids.len());
                last = waiting;
            }
            if same >= SAME_LOOKS {
                // The longest waiting thread made the oldest call.
                last.sort_by_key(|w| (w.blocked_since, w.tid));
                for (id, w) in ids.into_iter().zip(std::mem::take(&mut last)) {
                    tracing::info!(
                        app = link.app,
                        id,
                        tid = w.tid,
                        nr = w.nr,
                        "finishing a call the previous daemon lost"
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
            "could not tell which threads wait in the lost calls"
        );
    }));
    if spawned.is_err() {
        tracing::warn!(app = link.app, "no thread to look for lost calls");
    }
}

/// A thread waiting for a seccomp notification's answer, and its call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    tid: u32,
    nr: i32,
    args: [u64; 6],
    /// When it last ran (`se.exec_start`, in ns), which for a thread
    /// waiting in a trapped call is about when it made the call.
    blocked_since: u64,
}

/// `root` and its descendants, as (pid, tid) of every thread.
pub(crate) fn process_tree(root: u32) -> Vec<(u32, u32)> {
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
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
            {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
            out.push((pid, tid));
        }
    }
    out
}

/// Threads of `root` and its descendants waiting in a trapped call.
fn waiting_threads(root: u32) -> Vec<Waiting> {
    let mut out = Vec::new();
    for (pid, tid) in process_tree(root) {
        let dir = format!("/proc/{pid}/task/{tid}");
        let wchan = std::fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
        if !wchan.starts_with("seccomp_do_user_notification") {
            continue;
        }
        let line = std::fs::read_to_string(format!("{dir}/syscall")).unwrap_or_default();
        if let Some((nr, args)) = parse_syscall(&line) {
            let sched = std::fs::read_to_string(format!("{dir}/sched")).unwrap_or_default();
            out.push(Waiting {
                tid,
                nr,
                args,
                blocked_since: exec_start(&sched).unwrap_or(0),
            });
        }
    }
    out
}

/// Inodes of the sockets `root` and its descendants hold.
pub(crate) fn socket_inodes(root: u32) -> HashSet<u64> {
    let mut pids: Vec<u32> = process_tree(root).into_iter().map(|(pid, _)| pid).collect();
    pids.dedup();
    pids.into_iter()
        .flat_map(socket_fds)
        .map(|(_, inode)| inode)
        .collect()
}

/// Inodes of every socket some process this broker can see holds.
pub(crate) fn live_socket_inodes() -> std::collections::HashSet<u64> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return std::collections::HashSet::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .flat_map(socket_fds)
        .map(|(_, inode)| inode)
        .collect()
}

/// The socket fds of `pid` (any thread of a process sees its fd table),
/// with their inodes.
pub(crate) fn socket_fds(pid: u32) -> Vec<(i32, u64)> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let inode = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

/// `/proc/TID/syscall` of a blocked thread: the number in decimal, then six
/// arguments, the stack and the instruction pointer in hex.
pub(crate) fn parse_syscall(line: &str) -> Option<(i32, [u64; 6])> {
    let mut fields = line.split_whitespace();
    let nr: i32 = fields.next()?.parse().ok()?;
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(fields.next()?.strip_prefix("0x")?, 16).ok()?;
    }
    Some((nr, args))
}

/// `se.exec_start` of `/proc/TID/sched` (milliseconds with six decimals),
/// in nanoseconds.
fn exec_start(sched: &str) -> Option<u64> {
    let line = sched.lines().find(|l| l.starts_with("se.exec_start"))?;
    let value = line.split(':').nth(1)?.trim();
    let (ms, frac) = value.split_once('.').unwrap_or((value, "0"));
    let ms: u64 = ms.parse().ok()?;
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    Some(ms * 1_000_000 + frac.parse::<u64>().ok()?)
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

    #[test]
    fn reads_when_a_thread_last_ran() {
        let sched = "python3 (42, #threads: 2)\n---\nse.exec_start                                :      17995017.650598\nse.vruntime  :  1.0\n";
        assert_eq!(exec_start(sched), Some(17_995_017_650_598));
        assert_eq!(exec_start("se.exec_start : 12\n"), Some(12_000_000));
        assert_eq!(exec_start("nothing\n"), None);
    }
}
