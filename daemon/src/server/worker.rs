//! The blocking side of the server: an elastic pool of threads that run
//! device commands. A thread that hangs on a device holds only itself: a new
//! thread is started whenever no idle one is waiting, up to a cap.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);

struct Shared {
    rx: Mutex<Receiver<Job>>,
    idle: AtomicUsize,
    threads: AtomicUsize,
}

pub struct Pool {
    tx: Sender<Job>,
    shared: Arc<Shared>,
    max_threads: usize,
}

impl Pool {
    pub fn new(max_threads: usize) -> Pool {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            rx: Mutex::new(rx),
            idle: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
        });
        Pool {
            tx,
            shared,
            max_threads: max_threads.max(1),
        }
    }

    /// Threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.threads.load(Ordering::SeqCst)
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        // Claim an idle thread, or start one if under the cap.
        let claimed = self
            .shared
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !claimed && self.shared.threads.load(Ordering::SeqCst) < self.max_threads {
            self.spawn();
        }
        // The receiver lives as long as any thread or this pool: never fails.
        let _ = self.tx.send(Box::new(job));
    }

    fn spawn(&self) {
        let shared = Arc::clone(&self.shared);
        shared.threads.fetch_add(1, Ordering::SeqCst);
        let r = std::thread::Builder::new()
            .name("reservd-io".into())
            .spawn(move || {
                loop {
                    let job = {
                        let rx = shared.rx.lock().unwrap_or_else(|e| e.into_inner());
                        rx.recv_timeout(IDLE_EXIT)
                    };
                    match job {
                        Ok(job) => {
                            job();
                            shared.idle.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            // Leave only if this thread's idle slot can be taken back.
                            if shared
                                .idle
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                            {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
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
}
