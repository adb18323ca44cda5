//! An ordered worker pool: jobs go to a few threads, results come back in submission order.
//!
//! The caller bounds the work in flight (submit only while [`OrderedPool::is_full`] is false),
//! so memory stays at a few jobs whatever the input size. With zero threads every job runs on
//! the calling thread at submission, which gives the same results in the same order.

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The per-thread state that turns a job into a result (e.g. a zstd context).
pub(crate) trait Worker: Send + 'static {
    /// What is submitted.
    type Job: Send + 'static;
    /// What comes back.
    type Out: Send + 'static;
    /// Does one job.
    fn run(&mut self, job: Self::Job) -> Self::Out;
}

/// A worker's result, or the payload of its panic.
type Outcome<T> = Result<T, Box<dyn Any + Send>>;

enum Engine<W: Worker> {
    Inline(W),
    Threads {
        jobs: Option<Sender<(u64, W::Job)>>,
        results: Receiver<(u64, Outcome<W::Out>)>,
        handles: Vec<JoinHandle<()>>,
    },
}

/// Runs jobs on `threads` worker threads and hands their results back in order.
pub(crate) struct OrderedPool<W: Worker> {
    engine: Engine<W>,
    window: usize,
    next_in: u64,
    next_out: u64,
    done: BTreeMap<u64, W::Out>,
}

impl<W: Worker> OrderedPool<W> {
    /// A pool of `threads` workers made by `make` (none: jobs run inline), holding at most
    /// `window` jobs (at least 1) between submission and collection.
    pub fn new(
        threads: usize,
        window: usize,
        mut make: impl FnMut() -> std::io::Result<W>,
    ) -> std::io::Result<Self> {
        let engine = if threads == 0 {
            Engine::Inline(make()?)
        } else {
            let (job_tx, job_rx) = mpsc::channel::<(u64, W::Job)>();
            let job_rx = Arc::new(Mutex::new(job_rx));
            let (out_tx, out_rx) = mpsc::channel();
            let mut handles = Vec::with_capacity(threads);
            for n in 0..threads {
                let mut worker = make()?;
                let job_rx = Arc::clone(&job_rx);
                let out_tx = out_tx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("vault-{n}"))
                    .spawn(move || loop {
                        // The lock is held only while taking one job off the queue.
                        let next = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((seq, job)) = next else { return };
                        // A panic goes back to the caller as this job's result.
                        let out = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run(job)));
                        let panicked = out.is_err();
                        if out_tx.send((seq, out)).is_err() || panicked {
                            return;
                        }
                    })?;
                handles.push(handle);
            }
            Engine::Threads {
                jobs: Some(job_tx),
                results: out_rx,
                handles,
            }
        };
        Ok(OrderedPool {
            engine,
            window: window.max(1),
            next_in: 0,
            next_out: 0,
            done: BTreeMap::new(),
        })
    }

    /// Jobs submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        // At most `window`, which is a usize.
        usize::try_from(self.next_in - self.next_out).unwrap_or(usize::MAX)
    }

    /// Whether the window is full: collect a result before submitting more.
    pub fn is_full(&self) -> bool {
        self.in_flight() >= self.window
    }

    /// Queues a job. The caller keeps the window: call only when not [`Self::is_full`].
    pub fn submit(&mut self, job: W::Job) {
        debug_assert!(!self.is_full());
        let seq = self.next_in;
        self.next_in += 1;
        match &mut self.engine {
            Engine::Inline(worker) => {
                let out = worker.run(job);
                self.done.insert(seq, out);
            }
            Engine::Threads { jobs, .. } => {
                // The workers only stop when the sender is dropped (or on a panic, which
                // `next` reports), so a failed send shows up there as a missing result.
                if let Some(jobs) = jobs {
                    let _ = jobs.send((seq, job));
                }
            }
        }
    }

    /// The result of the oldest job not yet collected, waiting for it; `None` if nothing is in
    /// flight. A worker's panic is resumed here.
    pub fn next(&mut self) -> Option<W::Out> {
        if self.next_out == self.next_in {
            return None;
        }
        let seq = self.next_out;
        loop {
            if let Some(out) = self.done.remove(&seq) {
                self.next_out += 1;
                return Some(out);
            }
            let Engine::Threads { results, .. } = &mut self.engine else {
                unreachable!("inline jobs are done at submission");
            };
            match results.recv() {
                Ok((n, Ok(out))) => {
                    self.done.insert(n, out);
                }
                Ok((_, Err(panic))) => std::panic::resume_unwind(panic),
                // Workers only exit early after sending their panic.
                Err(_) => unreachable!("vault worker threads exited with jobs queued"),
            }
        }
    }
}

impl<W: Worker> Drop for OrderedPool<W> {
    fn drop(&mut self) {
        if let Engine::Threads { jobs, handles, .. } = &mut self.engine {
            // Closing the queue stops the workers once they finish their current job.
            jobs.take();
            for handle in handles.drain(..) {
                let _ = handle.join();
            }
        }
    }
}

/// Worker threads to use by default: one per core, at most 4.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}

/// How many chunks of `chunk_size` bytes may be in flight with `threads` workers: enough to
/// keep every worker busy while the caller reads or writes one, bounded to about 64 MiB.
pub(crate) fn window(threads: usize, chunk_size: usize) -> usize {
    const BUDGET: usize = 64 * 1024 * 1024;
    if threads == 0 {
        return 1;
    }
    (BUDGET / chunk_size.max(1)).clamp(threads + 1, 2 * threads + 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sleeps a pseudo-random time, then returns its job number.
    struct Sleepy;

    impl Worker for Sleepy {
        type Job = u64;
        type Out = u64;
        fn run(&mut self, job: u64) -> u64 {
            std::thread::sleep(Duration::from_micros((job * 7919) % 500));
            job
        }
    }

    fn run_all(threads: usize, window: usize, jobs: u64) -> Vec<u64> {
        let mut pool = OrderedPool::new(threads, window, || Ok(Sleepy)).unwrap();
        let mut got = Vec::new();
        for job in 0..jobs {
            if pool.is_full() {
                got.push(pool.next().unwrap());
            }
            pool.submit(job);
            assert!(pool.in_flight() <= window.max(1));
        }
        while let Some(out) = pool.next() {
            got.push(out);
        }
        got
    }

    #[test]
    fn results_come_back_in_submission_order() {
        for (threads, window) in [(0, 1), (1, 2), (2, 3), (3, 8), (4, 1)] {
            assert_eq!(
                run_all(threads, window, 200),
                (0..200).collect::<Vec<_>>(),
                "{threads} threads, window {window}"
            );
        }
    }

    #[test]
    fn dropping_a_busy_pool_stops_its_threads() {
        let mut pool = OrderedPool::new(2, 4, || Ok(Sleepy)).unwrap();
        for job in 0..4 {
            pool.submit(job);
        }
        drop(pool);
    }

    struct Panicky;

    impl Worker for Panicky {
        type Job = ();
        type Out = ();
        fn run(&mut self, (): ()) {
            panic!("worker failure");
        }
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let result = std::panic::catch_unwind(|| {
            let mut pool = OrderedPool::new(2, 2, || Ok(Panicky)).unwrap();
            pool.submit(());
            pool.next()
        });
        assert!(result.is_err());
    }

    #[test]
    fn window_is_bounded() {
        assert_eq!(window(0, 1 << 20), 1);
        assert_eq!(window(2, 1 << 20), 6);
        assert_eq!(window(2, 16 << 20), 4);
        assert_eq!(window(2, 1024), 6);
    }
}
