//! Dynamic batching: a bounded queue per model and a task that drains it into batches.
//!
//! A request is admitted with a [`Ticket`] (an in-flight permit; none left = immediate
//! `RESOURCE_EXHAUSTED`), preprocessed, then submitted as an [`Entry`] into the model's bounded
//! queue (full = immediate `RESOURCE_EXHAUSTED`). The batching task waits for the executor to
//! be free, then takes up to `max_batch_size` entries, waiting at most `max_batch_delay` for
//! more after the first (zero: take what is queued). Entries whose deadline passed are
//! answered `DEADLINE_EXCEEDED` and entries whose client has gone are dropped, both before
//! compute. Because the next batch is formed only when the executor is free, the queue absorbs
//! bursts and batches grow with load.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::backend::{ExecError, Executor};
use crate::error::Error;
use crate::telemetry::{ModelMetrics, ModelStats};

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most inputs in one forward pass.
    pub max_batch_size: usize,
    /// How long a batch may wait for more inputs after its first one.
    pub max_batch_delay: Duration,
    /// Inputs that may wait in the queue.
    pub queue_capacity: usize,
    /// Inputs admitted and not yet answered (preprocessing, queued or computing).
    pub max_in_flight: usize,
}

/// One input waiting for its batch.
#[derive(Debug)]
pub struct Entry {
    /// CHW f32 at the model's input size.
    pub input: Vec<f32>,
    pub enqueued_at: Instant,
    /// Answer `DEADLINE_EXCEEDED` instead of computing once this passes.
    pub deadline: Option<Instant>,
    /// Where the answer goes; closed when the client has gone.
    pub reply: oneshot::Sender<Result<Inference, Error>>,
    /// Keeps the input counted as in flight until it is answered or dropped.
    pub ticket: Ticket,
}

/// The answer for one input.
#[derive(Debug, Clone)]
pub struct Inference {
    /// One row of logits, `num_classes` long.
    pub logits: Vec<f32>,
    pub queue: Duration,
    pub compute: Duration,
    pub batch_size: usize,
}

/// Admission for one or more inputs; releases its in-flight slots when dropped.
#[derive(Debug)]
pub struct Ticket {
    permit: OwnedSemaphorePermit,
    in_flight: metrics::Gauge,
}

impl Ticket {
    pub fn inputs(&self) -> usize {
        self.permit.num_permits()
    }

    /// Splits off a ticket for one input.
    pub fn split_one(&mut self) -> Option<Ticket> {
        self.permit.split(1).map(|permit| Ticket {
            permit,
            in_flight: self.in_flight.clone(),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight.decrement(self.permit.num_permits() as f64);
    }
}

/// A submitted input: await [`Pending::wait`] for its answer. Dropping it tells the batcher
/// the client has gone.
#[derive(Debug)]
pub struct Pending {
    rx: oneshot::Receiver<Result<Inference, Error>>,
    deadline: Option<Instant>,
    enqueued_at: Instant,
    model: Arc<str>,
}

impl Pending {
    pub async fn wait(self) -> Result<Inference, Error> {
        let gone = || Error::ExecutorGone {
            model: self.model.to_string(),
        };
        match self.deadline {
            None => self.rx.await.unwrap_or_else(|_| Err(gone())),
            Some(deadline) => match tokio::time::timeout_at(deadline, self.rx).await {
                Ok(answer) => answer.unwrap_or_else(|_| Err(gone())),
                Err(_) => Err(Error::DeadlineExceeded {
                    model: self.model.to_string(),
                    waited: self.enqueued_at.elapsed(),
                }),
            },
        }
    }
}

/// A model's queue; cheap to clone. The batching task ends when every clone is dropped.
#[derive(Debug, Clone)]
pub struct Batcher {
    model: Arc<str>,
    /// Bounded: a full queue refuses at once instead of letting latency grow without limit.
    queue: mpsc::Sender<Entry>,
    /// Caps admitted inputs, which bounds memory held by decoded images and queued tensors.
    in_flight: Arc<Semaphore>,
    config: BatcherConfig,
    metrics: ModelMetrics,
}

impl Batcher {
    /// Starts the batching task on the current runtime.
    pub fn spawn(
        executor: Executor,
        config: BatcherConfig,
        metrics: ModelMetrics,
        stats: Arc<ModelStats>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(config.queue_capacity.max(1));
        let model: Arc<str> = metrics.model().into();
        tokio::spawn(batching_task(
            rx,
            executor,
            config,
            metrics.clone(),
            stats,
            model.clone(),
        ));
        Self {
            model,
            queue,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            metrics,
        }
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    /// Admits `inputs` inputs, or refuses at once when the in-flight limit would be passed.
    pub fn admit(&self, inputs: usize) -> Result<Ticket, Error> {
        let refused = || Error::TooManyInFlight {
            model: self.model.to_string(),
            limit: self.config.max_in_flight,
        };
        let n = u32::try_from(inputs).map_err(|_| refused())?;
        let permit = self
            .in_flight
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| refused())?;
        self.metrics.in_flight.increment(inputs as f64);
        Ok(Ticket {
            permit,
            in_flight: self.metrics.in_flight.clone(),
        })
    }

    /// Queues one preprocessed input, or refuses at once when the queue is full.
    pub fn submit(
        &self,
        ticket: Ticket,
        input: Vec<f32>,
        deadline: Option<Instant>,
    ) -> Result<Pending, Error> {
        let (reply, rx) = oneshot::channel();
        let enqueued_at = Instant::now();
        let entry = Entry {
            input,
            enqueued_at,
            deadline,
            reply,
            ticket,
        };
        match self.queue.try_send(entry) {
            Ok(()) => {
                self.metrics.queue_depth.increment(1.0);
                Ok(Pending {
                    rx,
                    deadline,
                    enqueued_at,
                    model: self.model.clone(),
                })
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::QueueFull {
                model: self.model.to_string(),
                capacity: self.config.queue_capacity,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::ExecutorGone {
                model: self.model.to_string(),
            }),
        }
    }
}

async fn batching_task(
    mut rx: mpsc::Receiver<Entry>,
    executor: Executor,
    config: BatcherConfig,
    metrics: ModelMetrics,
    stats: Arc<ModelStats>,
    model: Arc<str>,
) {
    let max = config.max_batch_size.max(1);
    let item_len = 3 * executor.input_size() * executor.input_size();
    let classes = executor.num_classes();
    let mut batch: Vec<Entry> = Vec::with_capacity(max);
    while let Some(first) = rx.recv().await {
        let formed_at = Instant::now();
        keep_if_live(first, &mut batch, &metrics, &stats, &model);
        let until = formed_at + config.max_batch_delay;
        while batch.len() < max {
            let next = match rx.try_recv() {
                Ok(entry) => Some(entry),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if config.max_batch_delay.is_zero() || Instant::now() >= until {
                        None
                    } else {
                        tokio::time::timeout_at(until, rx.recv())
                            .await
                            .ok()
                            .flatten()
                    }
                }
            };
            match next {
                Some(entry) => keep_if_live(entry, &mut batch, &metrics, &stats, &model),
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }

        let n = batch.len();
        let started = Instant::now();
        let mut input = Vec::with_capacity(n * item_len);
        for entry in &mut batch {
            let queued = started - entry.enqueued_at;
            metrics.queue_wait.record(queued.as_secs_f64());
            stats.queue.add(1, queued);
            input.append(&mut entry.input);
        }
        metrics.batch_size.record(n as f64);
        match executor.run(input, n).await {
            Ok(out) => {
                metrics.batch_compute.record(out.compute.as_secs_f64());
                stats.record_batch(n, out.compute);
                for (i, entry) in batch.drain(..).enumerate() {
                    let logits = out.logits[i * classes..(i + 1) * classes].to_vec();
                    let _ = entry.reply.send(Ok(Inference {
                        logits,
                        queue: started - entry.enqueued_at,
                        compute: out.compute,
                        batch_size: n,
                    }));
                }
            }
            Err(e) => {
                let err = match e {
                    ExecError::Failed(message) => Error::Backend {
                        model: model.to_string(),
                        message,
                    },
                    ExecError::Stopped => Error::ExecutorGone {
                        model: model.to_string(),
                    },
                };
                for entry in batch.drain(..) {
                    let _ = entry.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Moves `entry` into the batch unless its deadline passed (answered) or its client has gone.
fn keep_if_live(
    entry: Entry,
    batch: &mut Vec<Entry>,
    metrics: &ModelMetrics,
    stats: &ModelStats,
    model: &Arc<str>,
) {
    metrics.queue_depth.decrement(1.0);
    let now = Instant::now();
    if entry.deadline.is_some_and(|d| d <= now) {
        metrics.dropped_deadline.increment(1);
        let waited = now - entry.enqueued_at;
        stats.queue.add(1, waited);
        let _ = entry.reply.send(Err(Error::DeadlineExceeded {
            model: model.to_string(),
            waited,
        }));
    } else if entry.reply.is_closed() {
        metrics.dropped_cancelled.increment(1);
    } else {
        batch.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{Arch, Model, ModelSpec};
    use candle_core::Device;

    fn batcher(delay: Duration, compute_delay: Duration, queue: usize) -> Batcher {
        let spec = ModelSpec::new(Arch::Student, 3, 32);
        let (_, model) = Model::init(&spec, &Device::Cpu).unwrap();
        let exec = Executor::spawn("b", model, Device::Cpu, compute_delay).unwrap();
        let config = BatcherConfig {
            max_batch_size: 8,
            max_batch_delay: delay,
            queue_capacity: queue,
            max_in_flight: 64,
        };
        Batcher::spawn(
            exec,
            config,
            ModelMetrics::new("batcher-unit"),
            Arc::new(ModelStats::default()),
        )
    }

    fn input(v: f32) -> Vec<f32> {
        vec![v; 3 * 32 * 32]
    }

    #[tokio::test]
    async fn concurrent_inputs_share_a_batch_and_get_their_own_rows() {
        let b = batcher(Duration::from_millis(50), Duration::ZERO, 16);
        let mut ticket = b.admit(4).unwrap();
        let pending: Vec<Pending> = (0..4)
            .map(|i| {
                let t = ticket.split_one().unwrap();
                b.submit(t, input(i as f32 / 4.0), None).unwrap()
            })
            .collect();
        let mut rows = Vec::new();
        for p in pending {
            let inf = p.wait().await.unwrap();
            assert_eq!(inf.batch_size, 4);
            rows.push(inf.logits);
        }
        // Different inputs, different logits; batch rows are not mixed up.
        let single = b.submit(b.admit(1).unwrap(), input(0.5), None).unwrap();
        assert_eq!(single.wait().await.unwrap().logits, rows[2]);
    }

    #[tokio::test]
    async fn in_flight_limit_and_full_queue_refuse_at_once() {
        let b = batcher(Duration::ZERO, Duration::from_millis(300), 1);
        assert!(matches!(b.admit(65), Err(Error::TooManyInFlight { .. })));
        let first = b.submit(b.admit(1).unwrap(), input(0.1), None).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await; // the executor takes `first`
        let second = b.submit(b.admit(1).unwrap(), input(0.2), None).unwrap();
        let third = b.submit(b.admit(1).unwrap(), input(0.3), None);
        assert!(matches!(third, Err(Error::QueueFull { capacity: 1, .. })));
        assert!(first.wait().await.is_ok());
        assert!(second.wait().await.is_ok());
    }
}
