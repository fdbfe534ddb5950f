//! The image-decoding pool: a fixed number of threads, at a lower scheduling priority than
//! the compute thread, so that decoding a burst of photos can never starve inference.
//!
//! Work is bounded upstream: every job belongs to an admitted request, and admission is
//! capped per model (`--max-in-flight`), so the job queue cannot grow without limit.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Niceness of the decoding threads (Linux): above the compute thread's 0, so compute gets
/// about three times their CPU share when both want a core. Measured on 2 cores with JPEGs
/// at concurrency 32 (BENCHMARKS.md): at 10, compute starved decoding instead (batches fell
/// from 14 to 10 inputs, throughput from 237 to 146 req/s); 5 and 0 gave the same 237 req/s.
const DECODE_NICENESS: i32 = 5;

#[derive(Debug)]
pub struct DecodePool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: usize,
}

impl DecodePool {
    /// Starts `threads` decoding threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("decode-{i}"))
                .spawn(move || {
                    lower_priority();
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
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            threads,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `work` on a decoding thread and returns its result; `Err` with the panic's
    /// message if it panicked (the thread lives on).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into())
                });
            let _ = tx.send(result);
        });
        let sent = self
            .jobs
            .lock()
            .ok()
            .and_then(|jobs| jobs.as_ref().map(|j| j.send(job).is_ok()))
            .unwrap_or(false);
        if !sent {
            return Err("the decoding pool has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the decoding thread stopped".into()))
    }
}

impl Drop for DecodePool {
    fn drop(&mut self) {
        // Closing the channel ends every worker after its current job.
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the calling thread on
    // Linux (each thread has its own nice value).
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, DECODE_NICENESS) };
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_on_its_threads_at_lower_priority() {
        let pool = DecodePool::new(2).unwrap();
        let (name, nice) = pool
            .run(|| {
                let name = std::thread::current().name().map(String::from);
                #[cfg(target_os = "linux")]
                // SAFETY: getpriority reads its integer arguments only.
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                #[cfg(not(target_os = "linux"))]
                let nice = DECODE_NICENESS;
                (name, nice)
            })
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("decode-"));
        assert_eq!(nice, DECODE_NICENESS);
        // A panicking job is an error for its caller; the threads keep serving.
        for _ in 0..3 {
            let err = pool.run(|| -> u32 { panic!("bad image") }).await;
            assert_eq!(err.unwrap_err(), "bad image");
        }
        let mut total = 0;
        for i in 0..50u64 {
            total += pool.run(move || i).await.unwrap();
        }
        assert_eq!(total, (0..50u64).sum::<u64>());
    }
}
