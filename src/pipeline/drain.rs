//! Admission for graceful shutdown: the draining state and the count of requests being
//! answered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::error::Error;

/// Shared draining state; clones refer to the same server.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Flips to true once, when shutdown starts; streams watch it to stop reading.
    draining: watch::Sender<bool>,
    /// Requests admitted and not yet answered.
    active: AtomicUsize,
    /// Woken whenever `active` drops to zero.
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                draining: watch::Sender::new(false),
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }
}

/// Counts one request as active until dropped.
#[derive(Debug)]
pub struct RequestGuard {
    inner: Arc<Inner>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Admits a request, or refuses with UNAVAILABLE once draining has started.
    pub fn begin(&self) -> Result<RequestGuard, Error> {
        // Count first, then check: `idle` can then never miss a request admitted concurrently.
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        let guard = RequestGuard {
            inner: self.inner.clone(),
        };
        if self.is_draining() {
            return Err(Error::ShuttingDown);
        }
        Ok(guard)
    }

    pub fn start(&self) {
        self.inner.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Resolves once draining has started.
    pub async fn draining(&self) {
        let mut rx = self.inner.draining.subscribe();
        // The sender lives in `self`, so `wait_for` only ends by seeing `true`.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves when no request is active.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_refuses_new_requests_and_waits_for_active_ones() {
        let drain = Drain::default();
        let guard = drain.begin().unwrap();
        drain.start();
        assert!(matches!(drain.begin(), Err(Error::ShuttingDown)));
        let waiter = tokio::spawn({
            let d = drain.clone();
            async move { d.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        drain.draining().await;
    }
}
