//! Small statistics and clock helpers.

use rustix::time::{clock_gettime, ClockId};

/// The `q`-quantile (0..=1) of `v` by nearest rank; `None` when empty.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = (q * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// The median of `v` (mean of the two middle values for even lengths).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn ns(c: ClockId) -> u64 {
    let t = clock_gettime(c);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// CPU time (user + system) this process has used, in ns: what
/// `getrusage(RUSAGE_SELF)` reports as utime + stime, at full resolution.
pub fn process_cpu_ns() -> u64 {
    ns(ClockId::ProcessCPUTime)
}

/// `CLOCK_MONOTONIC` in ns: comparable between processes on one host.
pub fn monotonic_ns() -> u64 {
    ns(ClockId::Monotonic)
}

/// `utime` and `stime` of this process in ns, from `/proc/self/stat` (clock
/// ticks: 10 ms resolution). Used to split the CPU time into user/system.
pub fn self_utime_stime_ns() -> Option<(u64, u64)> {
    proc_utime_stime_ns("self")
}

/// `utime` and `stime` (ns) of process `pid` ("self" or a number), from
/// `/proc/PID/stat`, all threads included.
pub fn proc_utime_stime_ns(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields after the
    // last ')' are positional, starting with field 3 (state).
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 1_000_000_000 / clock_ticks();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime * tick, stime * tick))
}

/// Nanoseconds on CPU of every live thread of `pid`, from
/// `/proc/PID/task/*/schedstat` (nanosecond resolution).
pub fn proc_sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(e) = e else { continue };
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        if let Some(v) = s
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
        {
            total += v;
            any = true;
        }
    }
    any.then_some(total)
}

/// USER_HZ. Always 100 on Linux for /proc (the ABI fixes it).
fn clock_ticks() -> u64 {
    100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn reads_own_stat() {
        let (u, s) = self_utime_stime_ns().unwrap();
        assert!(u < 1 << 62 && s < 1 << 62);
        assert!(proc_sched_ns(std::process::id()).unwrap() > 0);
        let a = process_cpu_ns();
        let mut x = 0u64;
        for i in 0..100_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(process_cpu_ns() > a);
    }
}
