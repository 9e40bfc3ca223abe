//! A fixed set of threads for image work, with a bounded queue.
//!
//! Decoding and resizing are seconds of CPU at worst; on the async runtime's threads they would
//! stall every request those threads serve, and on its blocking pool (hundreds of threads) a
//! burst of them would take every core. Here they run on `workers` threads of their own, at most
//! `queue` more wait, and anything beyond that is refused at once ([`PoolError::Busy`]), so
//! request handling always keeps the remaining cores.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use futures::channel::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("every thumbnail worker is busy and the queue is full")]
    Busy,
    /// The job panicked (a codec bug on hostile input); the worker survives it.
    #[error("the thumbnail job failed: {0}")]
    Panicked(String),
}

pub struct Pool {
    jobs: mpsc::SyncSender<Job>,
    /// Jobs queued or running.
    pending: Arc<AtomicUsize>,
}

impl Pool {
    /// `workers` threads (at least one) and room for `queue` waiting jobs.
    pub fn new(workers: usize, queue: usize) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new().name(format!("mxcas-thumb-{i}")).spawn(move || {
                loop {
                    // The lock is held only while waiting for the next job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the pool was dropped
                    }
                }
            })?;
        }
        Ok(Self { jobs, pending: Arc::new(AtomicUsize::new(0)) })
    }

    /// Jobs queued or running now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queues `f`, or refuses at once when the queue is full. The job runs to the end even if
    /// the returned future is dropped.
    pub fn run<T, F>(&self, f: F) -> Result<impl Future<Output = Result<T, PoolError>> + use<T, F>, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let pending = Arc::clone(&self.pending);
        pending.fetch_add(1, Ordering::Relaxed);
        let job: Job = Box::new(move || {
            let out = std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                PoolError::Panicked(what)
            });
            pending.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(out);
        });
        if self.jobs.try_send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(PoolError::Busy);
        }
        Ok(async move { rx.await.unwrap_or_else(|_| Err(PoolError::Panicked("worker gone".into()))) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_beyond_the_queue_are_refused_at_once_and_a_panic_does_not_kill_a_worker() {
        let pool = Pool::new(1, 1).expect("pool");
        // Hold the only worker until released.
        let (release, held) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let first = pool
            .run(move || {
                started_tx.send(()).ok();
                held.recv().ok();
                1
            })
            .expect("first job queued");
        started.recv().expect("first job started");
        let second = pool.run(|| 2).expect("second job fits the queue");
        assert_eq!(pool.run(|| 3).err(), Some(PoolError::Busy));
        assert_eq!(pool.pending(), 2);
        release.send(()).expect("release");
        assert_eq!(futures::executor::block_on(first), Ok(1));
        assert_eq!(futures::executor::block_on(second), Ok(2));
        let boom = pool.run(|| -> u32 { panic!("codec bug") }).expect("queued");
        assert_eq!(futures::executor::block_on(boom), Err(PoolError::Panicked("codec bug".into())));
        let after = pool.run(|| 4).expect("queued");
        assert_eq!(futures::executor::block_on(after), Ok(4));
        assert_eq!(pool.pending(), 0);
    }
}
