//! The blocking side of the server: an elastic pool of threads that run
//! device commands. A thread that hangs on a device holds only itself: a new
//! thread is started whenever no idle one is waiting, up to a cap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);

struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// The pool is gone: threads exit once the queue is empty.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Idle threads wait here, without holding the lock: a job wakes one.
    ready: Condvar,
    threads: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Pool {
    shared: Arc<Shared>,
    max_threads: usize,
}

impl Pool {
    pub fn new(max_threads: usize) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    idle: 0,
                    closed: false,
                }),
                ready: Condvar::new(),
                threads: AtomicUsize::new(0),
            }),
            max_threads: max_threads.max(1),
        }
    }

    /// Threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.threads.load(Ordering::SeqCst)
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.shared.lock();
        q.jobs.push_back(Box::new(job));
        // Every queued job needs a thread of its own: one that is waiting,
        // or a new one while under the cap (past it, jobs wait their turn).
        let short = q.jobs.len() > q.idle;
        drop(q);
        if short && self.threads() < self.max_threads {
            self.spawn();
        }
        self.shared.ready.notify_one();
    }

    fn spawn(&self) {
        let shared = Arc::clone(&self.shared);
        shared.threads.fetch_add(1, Ordering::SeqCst);
        let r = std::thread::Builder::new()
            .name("reservd-io".into())
            .spawn(move || {
                let mut q = shared.lock();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        drop(q);
                        job();
                        q = shared.lock();
                        continue;
                    }
                    if q.closed {
                        break;
                    }
                    q.idle += 1;
                    let (g, wait) = shared
                        .ready
                        .wait_timeout(q, IDLE_EXIT)
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    q.idle -= 1;
                    if wait.timed_out() && q.jobs.is_empty() {
                        break;
                    }
                }
                shared.threads.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = r {
            self.shared.threads.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start a worker thread: {e}");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_blocked_job_does_not_stall_the_next() {
        let pool = Pool::new(8);
        let (gate_tx, gate_rx) = channel::<()>();
        let (done_tx, done_rx) = channel();
        pool.submit(move || {
            let _ = gate_rx.recv();
        });
        let d = done_tx.clone();
        pool.submit(move || d.send(2).unwrap());
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(2));
        assert_eq!(pool.threads(), 2);
        gate_tx.send(()).unwrap();
    }

    #[test]
    fn idle_threads_are_reused() {
        let pool = Pool::new(8);
        let (tx, rx) = channel();
        for i in 0..20 {
            let t = tx.clone();
            pool.submit(move || t.send(i).unwrap());
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
            // Let the thread go back to waiting.
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(pool.threads() <= 2, "{} threads", pool.threads());
    }

    #[test]
    fn threads_leave_when_the_pool_is_dropped() {
        let pool = Pool::new(8);
        let shared = Arc::clone(&pool.shared);
        let (tx, rx) = channel();
        for i in 0..3 {
            let t = tx.clone();
            pool.submit(move || t.send(i).unwrap());
        }
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        drop(pool);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while shared.threads.load(Ordering::SeqCst) > 0 {
            assert!(std::time::Instant::now() < deadline, "threads still alive");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn jobs_beyond_the_cap_wait_their_turn() {
        let pool = Pool::new(2);
        let (gate_tx, gate_rx) = channel::<()>();
        let gate_rx = Arc::new(Mutex::new(gate_rx));
        let (done_tx, done_rx) = channel();
        for i in 0..4 {
            let (g, d) = (Arc::clone(&gate_rx), done_tx.clone());
            pool.submit(move || {
                let _ = g.lock().unwrap().recv();
                d.send(i).unwrap();
            });
        }
        assert_eq!(pool.threads(), 2);
        for _ in 0..4 {
            gate_tx.send(()).unwrap();
        }
        let mut got: Vec<i32> = (0..4)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(pool.threads(), 2);
    }
}
