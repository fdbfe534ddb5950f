//! One compute scheduler shared by every model: a bounded queue per model and a single compute
//! thread that forms each batch from one model's queue and runs it.
//!
//! A request is admitted with a [`Ticket`] (an in-flight permit; none left = immediate
//! `RESOURCE_EXHAUSTED`), preprocessed, then submitted as an [`Entry`] into its model's queue
//! (full = immediate `RESOURCE_EXHAUSTED`). The compute thread, whenever it is free, takes the
//! model whose oldest queued input has waited longest, and batches up to `max_batch_size` of
//! that model's inputs. Entries whose deadline passed are answered `DEADLINE_EXCEEDED` and
//! entries whose client has gone are dropped, both before compute.
//!
//! Batching policy, chosen so that it costs nothing at low load and fills batches under load:
//! - inputs that queue while the compute thread is busy join the next batch without any wait,
//!   so batches grow with load by themselves;
//! - when the queue runs dry before the batch is full, the batch waits (up to
//!   `max_batch_delay` after its first input) only while more of this model's inputs are
//!   already admitted and on their way (being decoded), and no other model has work queued;
//! - so an input arriving at an idle model with nothing else in flight runs at once.
//!
//! Sharing one compute thread keeps models from competing for the same cores: under a mixed
//! load each model's inputs accumulate while the others compute, so its batches stay as large
//! as in a single-model run, and the oldest-first pick bounds every model's wait.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Backend, BatchOutput};
use crate::error::Error;
use crate::telemetry::{BatchTimes, ModelMetrics, ModelStats};

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most inputs in one forward pass.
    pub max_batch_size: usize,
    /// How long a batch may wait for inputs already admitted after its first one.
    pub max_batch_delay: Duration,
    /// Inputs that may wait in the queue.
    pub queue_capacity: usize,
    /// Inputs admitted and not yet answered (preprocessing, queued or computing).
    pub max_in_flight: usize,
}

/// One model input, as it arrived; converted into the batch buffer on the compute thread.
#[derive(Debug, Clone)]
pub enum Input {
    /// CHW f32 at the model's input size, already preprocessed (decoded images).
    Chw(Vec<f32>),
    /// CHW f32 as little-endian bytes, already checked to be finite (raw FP32 tensors, kept
    /// as the request's buffer until batched: no copy before that).
    ChwBytes(Bytes),
    /// HWC u8 RGB pixels at the model's input size (UINT8 tensors), scaled and normalised
    /// when batched.
    Hwc(Bytes),
}

/// One input waiting for its batch.
#[derive(Debug)]
pub struct Entry {
    pub input: Input,
    pub enqueued_at: Instant,
    /// Answer `DEADLINE_EXCEEDED` instead of computing once this passes.
    pub deadline: Option<Instant>,
    /// Where the answer goes; closed when the client has gone.
    pub reply: oneshot::Sender<Result<Inference, Error>>,
    /// Keeps the input counted as in flight until it is answered or dropped.
    pub ticket: Ticket,
}

impl Entry {
    /// Sends the answer, releasing the input's in-flight slot first: a client that sends its
    /// next request the moment this one is answered must find the slot free (dropped after the
    /// send, the ticket outlived the answer by however long this thread was descheduled, and
    /// `--max-in-flight 1` refused that next request).
    fn answer(self, result: Result<Inference, Error>) {
        let Entry { reply, ticket, .. } = self;
        drop(ticket);
        let _ = reply.send(result);
    }
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

/// A submitted input: await [`Pending::wait`] for its answer. Dropping it tells the scheduler
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
            Some(deadline) => {
                let until = tokio::time::Instant::from_std(deadline);
                match tokio::time::timeout_at(until, self.rx).await {
                    Ok(answer) => answer.unwrap_or_else(|_| Err(gone())),
                    Err(_) => Err(Error::DeadlineExceeded {
                        model: self.model.to_string(),
                        waited: self.enqueued_at.elapsed(),
                    }),
                }
            }
        }
    }
}

/// A model's queue on the shared scheduler; cheap to clone.
#[derive(Debug, Clone)]
pub struct ModelQueue {
    slot: usize,
    model: Arc<str>,
    shared: Arc<Shared>,
    /// Caps admitted inputs, which bounds memory held by decoded images and queued tensors,
    /// and tells the batching policy how many inputs are on their way.
    in_flight: Arc<Semaphore>,
    config: BatcherConfig,
    metrics: ModelMetrics,
}

impl ModelQueue {
    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    /// Takes the queue out of the scheduler for good (its model version is unloaded): its
    /// backend, with the weights and buffers, is dropped once no batch holds it. Entries
    /// still queued belong to clients that have gone and are dropped unanswered.
    pub fn retire(&self) {
        let retired = self.shared.lock().queues[self.slot].take();
        if let Some(q) = retired {
            self.metrics.queue_depth.decrement(q.entries.len() as f64);
        }
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

    /// Queues one input, or refuses at once when the queue is full.
    pub fn submit(
        &self,
        ticket: Ticket,
        input: Input,
        deadline: Option<Instant>,
    ) -> Result<Pending, Error> {
        let (reply, rx) = oneshot::channel();
        let enqueued_at = Instant::now();
        {
            let mut state = self.shared.lock();
            if state.stopping {
                return Err(Error::ExecutorGone {
                    model: self.model.to_string(),
                });
            }
            let Some(q) = state.queues[self.slot].as_mut() else {
                return Err(Error::ExecutorGone {
                    model: self.model.to_string(),
                });
            };
            if q.entries.len() >= q.capacity {
                return Err(Error::QueueFull {
                    model: self.model.to_string(),
                    capacity: self.config.queue_capacity,
                });
            }
            q.entries.push_back(Entry {
                input,
                enqueued_at,
                deadline,
                reply,
                ticket,
            });
        }
        self.metrics.queue_depth.increment(1.0);
        self.shared.wake.notify_one();
        Ok(Pending {
            rx,
            deadline,
            enqueued_at,
            model: self.model.clone(),
        })
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when an input is queued or the scheduler stops.
    wake: Condvar,
    /// Idle releases of scratch memory so far (`--idle-memory-release`).
    idle_releases: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (compute runs outside it).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Default)]
struct State {
    /// By slot; a retired model version's slot is `None` (never reused, so a slot names one
    /// version for the scheduler's life).
    queues: Vec<Option<Queue>>,
    stopping: bool,
}

#[derive(Debug)]
struct Queue {
    entries: VecDeque<Entry>,
    capacity: usize,
    backend: Arc<Backend>,
    config: BatcherConfig,
    metrics: ModelMetrics,
    stats: Arc<ModelStats>,
    in_flight: Arc<Semaphore>,
    model: Arc<str>,
}

/// The shared compute thread; stops (after answering what is queued) when dropped.
#[derive(Debug)]
pub struct Scheduler {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    compute_delay: Duration,
}

impl Scheduler {
    /// Starts the compute thread. `compute_delay` is added to every batch: fault injection for
    /// overload drills and tests (`--inject-compute-delay`); zero in production. After
    /// `idle_release` without a batch (`--idle-memory-release`), the thread frees its batch
    /// buffer and the engine's scratch memory; `None` keeps them for the process's life.
    pub fn start(compute_delay: Duration, idle_release: Option<Duration>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            idle_releases: Default::default(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || compute_loop(&worker, compute_delay, idle_release))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            compute_delay,
        })
    }

    /// How many times the compute thread has released its scratch memory for being idle: once
    /// per idle period that followed a batch.
    pub fn idle_releases(&self) -> u64 {
        self.shared
            .idle_releases
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The injected per-batch delay (zero in production); model warm-ups pay it too.
    pub fn compute_delay(&self) -> Duration {
        self.compute_delay
    }

    /// Adds a model (already built and warmed up) and returns its queue.
    pub fn add_model(
        &self,
        backend: Arc<Backend>,
        config: BatcherConfig,
        metrics: ModelMetrics,
        stats: Arc<ModelStats>,
    ) -> ModelQueue {
        let model: Arc<str> = metrics.model().into();
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        let mut state = self.shared.lock();
        state.queues.push(Some(Queue {
            entries: VecDeque::new(),
            capacity: config.queue_capacity.max(1),
            backend,
            config,
            metrics: metrics.clone(),
            stats,
            in_flight: in_flight.clone(),
            model: model.clone(),
        }));
        ModelQueue {
            slot: state.queues.len() - 1,
            model,
            shared: self.shared.clone(),
            in_flight,
            config,
            metrics,
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A batch taken from one model's queue.
struct Batch {
    entries: Vec<Entry>,
    backend: Arc<Backend>,
    metrics: ModelMetrics,
    stats: Arc<ModelStats>,
    model: Arc<str>,
}

fn compute_loop(shared: &Shared, compute_delay: Duration, idle_release: Option<Duration>) {
    // Reused across batches: a fresh 25 MB buffer per batch would cost its page faults.
    let mut buffer: Vec<f32> = Vec::new();
    // Whether scratch memory was used since it was last released.
    let mut used = false;
    loop {
        match next_batch(shared, idle_release.filter(|_| used)) {
            Next::Stop => break,
            Next::Idle => {
                // No batch for `idle_release`: hand the batch buffer and the engine's scratch
                // (high-water marks of past load) back, so an idle server holds its models and
                // little else; the next batch allocates again.
                buffer = Vec::new();
                crate::infer::release_scratch();
                crate::backend::release_memory();
                used = false;
                shared
                    .idle_releases
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(crate::telemetry::IDLE_MEMORY_RELEASES_TOTAL).increment(1);
                tracing::debug!("idle: scratch memory released");
            }
            Next::Batch(batch) => {
                used = true;
                let backend = run_batch(batch, &mut buffer, compute_delay);
                if let Some(last) = Arc::into_inner(backend) {
                    // The last batch of a model version unloaded meanwhile: its weights and
                    // buffers go here, on this thread, so this is where memory goes back to
                    // the system.
                    drop(last);
                    crate::backend::release_memory();
                }
            }
        }
    }
}

/// What the compute thread does next.
// One value per batch, moved once: boxing the batch would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    Batch(Batch),
    /// Nothing queued for the idle period asked for.
    Idle,
    /// The scheduler stops and nothing is queued.
    Stop,
}

/// Blocks until a batch is ready, the scheduler stops with nothing queued, or (when `idle` is
/// given) nothing has been queued for that long.
fn next_batch(shared: &Shared, idle: Option<Duration>) -> Next {
    let mut state = shared.lock();
    loop {
        if let Some(slot) = oldest(&state) {
            let until = match &state.queues[slot] {
                Some(q) => Instant::now() + q.config.max_batch_delay,
                None => continue,
            };
            let mut entries = Vec::new();
            loop {
                // Retired while this batch waited: its entries' clients have all gone (every
                // waiting request holds its model version, which holds the queue).
                let Some(q) = state.queues[slot].as_mut() else {
                    entries.clear();
                    break;
                };
                take_live(q, &mut entries);
                let max = q.config.max_batch_size.max(1);
                let on_the_way = on_the_way(q, entries.len());
                let now = Instant::now();
                let others_queued =
                    state.queues.iter().enumerate().any(|(i, q)| {
                        i != slot && q.as_ref().is_some_and(|q| !q.entries.is_empty())
                    });
                let wait = entries.len() < max
                    && now < until
                    && !others_queued
                    && !state.stopping
                    && on_the_way > 0;
                if !wait {
                    break;
                }
                // Woken by new entries; polled for admitted inputs that will never come (their
                // request failed before reaching the queue): a dropped ticket cannot notify,
                // since tickets are also dropped under this lock.
                state = shared
                    .wake
                    .wait_timeout(state, (until - now).min(ON_THE_WAY_POLL))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let Some(q) = state.queues[slot].as_ref().filter(|_| !entries.is_empty()) else {
                // Every taken entry was expired or cancelled.
                continue;
            };
            return Next::Batch(Batch {
                entries,
                backend: q.backend.clone(),
                metrics: q.metrics.clone(),
                stats: q.stats.clone(),
                model: q.model.clone(),
            });
        }
        if state.stopping {
            return Next::Stop;
        }
        match idle {
            None => state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(idle) => {
                let (guard, waited) = shared
                    .wake
                    .wait_timeout(state, idle)
                    .unwrap_or_else(|p| p.into_inner());
                state = guard;
                if waited.timed_out() && oldest(&state).is_none() && !state.stopping {
                    return Next::Idle;
                }
            }
        }
    }
}

/// The queue whose front input has waited longest.
fn oldest(state: &State) -> Option<usize> {
    state
        .queues
        .iter()
        .enumerate()
        .filter_map(|(i, q)| {
            q.as_ref()
                .and_then(|q| q.entries.front())
                .map(|e| (i, e.enqueued_at))
        })
        .min_by_key(|&(_, t)| t)
        .map(|(i, _)| i)
}

/// How often a batch waiting for admitted inputs re-counts them.
const ON_THE_WAY_POLL: Duration = Duration::from_millis(1);

/// Inputs of this model admitted but neither queued nor in `taken`: on their way to the
/// queue (being decoded), so worth a short wait.
fn on_the_way(q: &Queue, taken: usize) -> usize {
    let admitted = q.config.max_in_flight - q.in_flight.available_permits();
    admitted.saturating_sub(taken + q.entries.len())
}

/// Moves queued entries into `batch` (up to the batch size), answering expired ones and
/// dropping those whose client has gone.
fn take_live(q: &mut Queue, batch: &mut Vec<Entry>) {
    let max = q.config.max_batch_size.max(1);
    while batch.len() < max {
        let Some(entry) = q.entries.pop_front() else {
            break;
        };
        q.metrics.queue_depth.decrement(1.0);
        let now = Instant::now();
        if entry.deadline.is_some_and(|d| d <= now) {
            q.metrics.dropped_deadline.increment(1);
            let waited = now - entry.enqueued_at;
            q.stats.queue.add(1, waited);
            entry.answer(Err(Error::DeadlineExceeded {
                model: q.model.to_string(),
                waited,
            }));
        } else if entry.reply.is_closed() {
            q.metrics.dropped_cancelled.increment(1);
        } else {
            batch.push(entry);
        }
    }
}

/// Runs one batch and answers its entries; returns the batch's backend.
fn run_batch(batch: Batch, buffer: &mut Vec<f32>, compute_delay: Duration) -> Arc<Backend> {
    let Batch {
        entries,
        backend,
        metrics,
        stats,
        model,
    } = batch;
    let n = entries.len();
    let started = Instant::now();
    for entry in &entries {
        let queued = started - entry.enqueued_at;
        metrics.queue_wait.record(queued.as_secs_f64());
        stats.queue.add(1, queued);
    }
    metrics.batch_size.record(n as f64);
    if !compute_delay.is_zero() {
        std::thread::sleep(compute_delay);
    }
    let inputs: Vec<&Input> = entries.iter().map(|e| &e.input).collect();
    let result = backend.run(&inputs, buffer);
    // Answers report the whole time on the compute thread (upload and forward pass).
    let compute = started.elapsed();
    match result {
        Ok(BatchOutput {
            logits,
            upload,
            compute: forward,
        }) => {
            metrics.batch_upload.record(upload.as_secs_f64());
            metrics.batch_compute.record(forward.as_secs_f64());
            let split = Instant::now();
            let classes = backend.num_classes();
            let answers: Vec<Vec<f32>> =
                logits.chunks_exact(classes).map(<[f32]>::to_vec).collect();
            // Recorded before any answer is sent: a client that reads the statistics after its
            // answer sees its own request counted.
            stats.record_batch(
                n,
                BatchTimes {
                    input: upload,
                    infer: forward,
                    output: split.elapsed(),
                },
            );
            for (entry, logits) in entries.into_iter().zip(answers) {
                let queue = started - entry.enqueued_at;
                entry.answer(Ok(Inference {
                    logits,
                    queue,
                    compute,
                    batch_size: n,
                }));
            }
        }
        Err(message) => {
            let err = Error::Backend {
                model: model.to_string(),
                message,
            };
            for entry in entries {
                entry.answer(Err(err.clone()));
            }
        }
    }
    backend
}

#[cfg(test)]
mod tests;
