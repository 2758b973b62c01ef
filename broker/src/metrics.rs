//! Counters of what the brokers of this process do: trapped calls by
//! syscall and outcome, their handling time, policy denials, errors,
//! quota hits, and the connection identities they keep.
//!
//! Counting costs the hot path a few relaxed atomic additions and two
//! clock reads per call: no lock, no allocation. The counters are
//! process-wide (every [`crate::Broker`] of the process adds to the same
//! ones) and only ever grow; [`snapshot`] reads them for an exporter
//! (`ax daemon --metrics` renders them in the Prometheus text format).

use crate::handlers::Outcome;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The syscalls counted, as labels; the last one takes any other.
pub const SYSCALLS: [&str; 13] = [
    "bind",
    "connect",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
    "setsockopt",
    "getsockopt",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "restrict",
    "other",
];

/// How a trapped call was answered, as labels: `ok` (a value, or a socket
/// installed), `errno` (a failure, including `EINPROGRESS` for a
/// non-blocking connect), `continue` (left to the kernel: not a socket of
/// ax's concern), `deferred` (finished later by a helper thread or a parked
/// accept, and counted here when handed over).
pub const OUTCOMES: [&str; 4] = ["ok", "errno", "continue", "deferred"];

/// Kinds of errors counted, as labels: a handler that panicked, an answer
/// the kernel refused, a program the broker could not look into (its
/// memory or fds) and whose call therefore failed.
pub const ERRORS: [&str; 3] = ["handler_panic", "answer_failed", "inaccessible"];

/// Per-app quotas whose hits are counted, as labels (see the quota table
/// in the crate's app state), and `other`.
pub const QUOTAS: [&str; 4] = ["parked_accepts", "helpers", "held_connects", "other"];

/// Upper bounds of the latency histogram's buckets, in nanoseconds; a last
/// bucket (+Inf) takes the rest.
const BUCKETS_NS: [u64; 12] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];

struct PerSyscall {
    outcomes: [AtomicU64; OUTCOMES.len()],
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl PerSyscall {
    const fn new() -> Self {
        Self {
            outcomes: [const { AtomicU64::new(0) }; OUTCOMES.len()],
            buckets: [const { AtomicU64::new(0) }; BUCKETS_NS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }
}

struct Counters {
    syscalls: [PerSyscall; SYSCALLS.len()],
    denied: AtomicU64,
    errors: [AtomicU64; ERRORS.len()],
    quota_hits: [AtomicU64; QUOTAS.len()],
    identity_sweeps: AtomicU64,
    /// Signed: a table's additions and removals may be counted in either
    /// order by two threads.
    identities: AtomicI64,
}

static COUNTERS: Counters = Counters {
    syscalls: [const { PerSyscall::new() }; SYSCALLS.len()],
    denied: AtomicU64::new(0),
    errors: [const { AtomicU64::new(0) }; ERRORS.len()],
    quota_hits: [const { AtomicU64::new(0) }; QUOTAS.len()],
    identity_sweeps: AtomicU64::new(0),
    identities: AtomicI64::new(0),
};

fn syscall_index(nr: i32) -> usize {
    match libc::c_long::from(nr) {
        libc::SYS_bind => 0,
        libc::SYS_connect => 1,
        libc::SYS_accept => 2,
        libc::SYS_accept4 => 3,
        libc::SYS_getsockname => 4,
        libc::SYS_getpeername => 5,
        libc::SYS_setsockopt => 6,
        libc::SYS_getsockopt => 7,
        libc::SYS_sendto => 8,
        libc::SYS_sendmsg => 9,
        libc::SYS_sendmmsg => 10,
        libc::SYS_landlock_restrict_self | libc::SYS_seccomp | libc::SYS_prctl => 11,
        _ => 12,
    }
}

/// Counts one trapped call (`nr`), answered with `outcome`, whose handling
/// began at `start`.
pub(crate) fn record_call(nr: i32, outcome: Outcome, start: Instant) {
    let s = &COUNTERS.syscalls[syscall_index(nr)];
    let o = match outcome {
        Outcome::Value(_) | Outcome::Answered => 0,
        Outcome::Errno(_) => 1,
        Outcome::Continue => 2,
        Outcome::Deferred => 3,
    };
    s.outcomes[o].fetch_add(1, Ordering::Relaxed);
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let b = BUCKETS_NS
        .iter()
        .position(|&le| ns <= le)
        .unwrap_or(BUCKETS_NS.len());
    s.buckets[b].fetch_add(1, Ordering::Relaxed);
    s.sum_ns.fetch_add(ns, Ordering::Relaxed);
}

/// Counts a connect (or a connecting send) the policy refused.
pub(crate) fn connect_denied() {
    COUNTERS.denied.fetch_add(1, Ordering::Relaxed);
}

/// Kinds of errors, see [`ERRORS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum ErrorKind {
    HandlerPanic = 0,
    AnswerFailed = 1,
    Inaccessible = 2,
}

/// Counts an error of kind `kind`.
pub(crate) fn error(kind: ErrorKind) {
    COUNTERS.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
}

/// Counts a sweep of an identity table (see `crate::idents`).
pub(crate) fn identity_sweep() {
    COUNTERS.identity_sweeps.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` (negative: takes) to the identities kept.
pub(crate) fn identities_kept(n: i64) {
    COUNTERS.identities.fetch_add(n, Ordering::Relaxed);
}

/// Counts a call refused by the quota that describes itself as `what`.
pub(crate) fn quota_hit(what: &str) {
    COUNTERS.quota_hits[quota_index(what)].fetch_add(1, Ordering::Relaxed);
}

fn quota_index(what: &str) -> usize {
    match what {
        "parked blocking accepts" => 0,
        "calls waiting on helper threads" => 1,
        "held connects (--connect-wait)" => 2,
        _ => 3,
    }
}

/// The counts of one syscall.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SyscallMetrics {
    /// Its label, one of [`SYSCALLS`].
    pub syscall: &'static str,
    /// Calls by outcome label ([`OUTCOMES`]).
    pub outcomes: Vec<(&'static str, u64)>,
    /// The latency histogram: (upper bound in seconds, calls in this
    /// bucket and not a lower one); the last bound is infinite.
    pub latency_buckets: Vec<(f64, u64)>,
    /// Total handling time of the calls counted, in seconds.
    pub latency_sum_seconds: f64,
}

impl SyscallMetrics {
    /// Calls counted, all outcomes.
    pub fn total(&self) -> u64 {
        self.outcomes.iter().map(|(_, n)| n).sum()
    }
}

/// A snapshot of the process's broker counters; see [`crate::Broker::metrics`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// One entry per label of [`SYSCALLS`], in that order.
    pub syscalls: Vec<SyscallMetrics>,
    /// Connects (and connecting sends) the policy refused.
    pub connects_denied: u64,
    /// Errors by kind label ([`ERRORS`]).
    pub errors: Vec<(&'static str, u64)>,
    /// Quota hits by quota label ([`QUOTAS`]).
    pub quota_hits: Vec<(&'static str, u64)>,
    /// Sweeps of the identity tables for connections no process holds.
    pub identity_sweeps: u64,
    /// Connection identities kept now (two per connection between
    /// programs under ax, until a sweep finds both ends closed).
    pub identities: u64,
}

/// Reads the counters. Each is read atomically, the set is not: a call
/// counted meanwhile may show in one and not yet in another.
pub fn snapshot() -> Metrics {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let syscalls = SYSCALLS
        .iter()
        .zip(&COUNTERS.syscalls)
        .map(|(&syscall, s)| {
            let bounds = BUCKETS_NS
                .iter()
                .map(|&ns| Duration::from_nanos(ns).as_secs_f64())
                .chain(std::iter::once(f64::INFINITY));
            SyscallMetrics {
                syscall,
                outcomes: OUTCOMES
                    .iter()
                    .zip(&s.outcomes)
                    .map(|(&o, n)| (o, load(n)))
                    .collect(),
                latency_buckets: bounds.zip(s.buckets.iter().map(load)).collect(),
                latency_sum_seconds: Duration::from_nanos(load(&s.sum_ns)).as_secs_f64(),
            }
        })
        .collect();
    Metrics {
        syscalls,
        connects_denied: load(&COUNTERS.denied),
        errors: ERRORS
            .iter()
            .zip(&COUNTERS.errors)
            .map(|(&e, n)| (e, load(n)))
            .collect(),
        quota_hits: QUOTAS
            .iter()
            .zip(&COUNTERS.quota_hits)
            .map(|(&q, n)| (q, load(n)))
            .collect(),
        identity_sweeps: load(&COUNTERS.identity_sweeps),
        identities: u64::try_from(COUNTERS.identities.load(Ordering::Relaxed)).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(m: &Metrics, syscall: &str) -> SyscallMetrics {
        m.syscalls
            .iter()
            .find(|s| s.syscall == syscall)
            .cloned()
            .unwrap()
    }

    #[test]
    fn counts_calls_by_syscall_outcome_and_latency() {
        let before = snapshot();
        let nr = i32::try_from(libc::SYS_getpeername).unwrap();
        record_call(nr, Outcome::Value(0), Instant::now());
        record_call(nr, Outcome::Errno(libc::ENOTCONN), Instant::now());
        record_call(nr, Outcome::Deferred, Instant::now());
        let after = snapshot();
        let (b, a) = (of(&before, "getpeername"), of(&after, "getpeername"));
        assert!(a.total() >= b.total() + 3);
        let count = |s: &SyscallMetrics| s.latency_buckets.iter().map(|(_, n)| n).sum::<u64>();
        assert_eq!(count(&a), a.total());
        assert!(a.latency_buckets.last().unwrap().0.is_infinite());
        assert_eq!(a.latency_buckets.len(), BUCKETS_NS.len() + 1);
        assert!(of(&after, "other").syscall == "other");
    }

    /// What counting adds to a call: two clock reads and three relaxed
    /// atomic additions. Printed (run with `--release --nocapture` for the
    /// figure in the README); bounded loosely, for debug builds on a busy
    /// machine. A trapped connect takes some 40 µs (benches/results).
    #[test]
    fn recording_costs_little() {
        const CALLS: u32 = 200_000;
        let nr = i32::try_from(libc::SYS_getsockopt).unwrap();
        let t = Instant::now();
        for _ in 0..CALLS {
            record_call(nr, Outcome::Continue, Instant::now());
        }
        let per_call = t.elapsed() / CALLS;
        println!("metrics: {per_call:?} per recorded call");
        assert!(per_call < Duration::from_micros(5), "{per_call:?}");
    }

    #[test]
    fn quota_labels_match_the_quotas() {
        for what in [
            "parked blocking accepts",
            "calls waiting on helper threads",
            "held connects (--connect-wait)",
        ] {
            assert_ne!(QUOTAS[quota_index(what)], "other", "{what}");
        }
    }
}
