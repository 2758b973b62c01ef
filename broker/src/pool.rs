//! A pool of threads for calls that may block (a blocking accept, an egress
//! connect, a connect to a full backlog). Threads are reused: creating one
//! per call would cost more than many a call itself. The pool grows when
//! every thread is busy and shrinks when threads stay idle.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
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
    pub(crate) fn spawn(&self, job: Job) -> std::io::Result<()> {
        let (lock, cvar) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        if q.idle > q.jobs.len() {
            q.jobs.push_back(job);
            cvar.notify_one();
            return Ok(());
        }
        drop(q);
        let queue = self.queue.clone();
        std::thread::Builder::new()
            .name("ax-wait".into())
            .spawn(move || {
                job();
                worker(&queue);
            })
            .map(drop)
    }
}

fn worker(queue: &Arc<(Mutex<Queue>, Condvar)>) {
    let (lock, cvar) = &**queue;
    loop {
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        q.idle += 1;
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
        drop(q);
        match job {
            Some(job) => job(),
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
}
