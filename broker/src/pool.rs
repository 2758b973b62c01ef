//! A pool of threads for calls that may block (a blocking accept, an egress
//! connect, a connect to a full backlog). Threads are reused: creating one
//! per call would cost more than many a call itself. The pool grows when
//! every thread is busy, up to [`MAX_THREADS`] for all apps together, and
//! shrinks when threads stay idle. Each app's share is bounded by its own
//! quota (`crate::appstate::MAX_HELPERS`). A job that panics is caught: the
//! thread lives on.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// Threads of the pool at most, for all apps together.
pub(crate) const MAX_THREADS: usize = 256;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    /// Threads alive, idle or busy.
    threads: usize,
}

/// The pool; cheap to share.
#[derive(Default)]
pub(crate) struct WorkerPool {
    queue: Arc<(Mutex<Queue>, Condvar)>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// Runs `job` on an idle thread, or on a new one if none is idle.
    /// Fails (`WouldBlock`) when [`MAX_THREADS`] are busy already, or when
    /// no thread can be created.
    pub(crate) fn spawn(&self, job: Job) -> std::io::Result<()> {
        let (lock, cvar) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        if q.idle > q.jobs.len() {
            q.jobs.push_back(job);
            cvar.notify_one();
            return Ok(());
        }
        if q.threads >= MAX_THREADS {
            drop(q);
            if !FULL_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    limit = MAX_THREADS,
                    "every helper thread is busy; calls that would wait on one fail with ENOBUFS"
                );
            }
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        q.threads += 1;
        drop(q);
        let queue = self.queue.clone();
        let spawned = std::thread::Builder::new()
            .name("ax-wait".into())
            .spawn(move || {
                run(job);
                worker(&queue);
            });
        if spawned.is_err() {
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            q.threads -= 1;
        }
        spawned.map(drop)
    }
}

/// Set once the pool was found full; cleared when a thread goes idle.
static FULL_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a job; a panic is logged and ends the job, not the thread.
fn run(job: Job) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
        tracing::error!("a helper job panicked; its thread carries on");
    }
}

fn worker(queue: &Arc<(Mutex<Queue>, Condvar)>) {
    let (lock, cvar) = &**queue;
    loop {
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        q.idle += 1;
        FULL_WARNED.store(false, std::sync::atomic::Ordering::Relaxed);
        let job = loop {
            if let Some(job) = q.jobs.pop_front() {
                break Some(job);
            }
            let (guard, timeout) = cvar
                .wait_timeout(q, IDLE_EXIT)
                .unwrap_or_else(|e| e.into_inner());
            q = guard;
            if timeout.timed_out() && q.jobs.is_empty() {
                break None;
            }
        };
        q.idle -= 1;
        if job.is_none() {
            q.threads -= 1;
        }
        drop(q);
        match job {
            Some(job) => run(job),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_jobs_and_reuses_threads() {
        let pool = WorkerPool::default();
        let (tx, rx) = mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            pool.spawn(Box::new(move || {
                tx.send((i, std::thread::current().id())).unwrap();
            }))
            .unwrap();
            // Let the worker go idle so the next job can reuse it.
            let _ = rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let (lock, _) = &*pool.queue;
        assert!(lock.lock().unwrap().idle >= 1);
    }

    #[test]
    fn bounded_and_survives_panics() {
        let pool = WorkerPool::default();
        pool.spawn(Box::new(|| panic!("a job that panics")))
            .unwrap();
        while pool.queue.0.lock().unwrap().idle == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        // Fill the pool with jobs that wait; one more is refused.
        let mut accepted = 0;
        for _ in 0..MAX_THREADS + 1 {
            let (tx, rel) = (tx.clone(), release_rx.clone());
            let r = pool.spawn(Box::new(move || {
                tx.send(()).unwrap();
                let _ = rel.lock().unwrap().recv();
            }));
            if r.is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, MAX_THREADS, "the panicked thread was reused");
        for _ in 0..accepted {
            rx.recv().unwrap();
        }
        drop(release_tx);
    }
}
