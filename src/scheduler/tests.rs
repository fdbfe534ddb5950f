//! The scheduler's policies as properties: rows stay with their inputs, overload is refused
//! at once, an idle model runs an input at once, admitted inputs are waited for, and models
//! sharing the compute thread keep their batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use super::*;
use crate::preprocess::Preprocessing;
use crate::zoo::{Arch, ModelSpec};

const SIZE: usize = 32;

fn backend(seed: u64) -> Arc<Backend> {
    let spec = ModelSpec::new(Arch::Student, 3, SIZE);
    let (_, model) = crate::zoo::test_models::input_dependent(&spec, seed);
    Arc::new(Backend::new(model, Device::Cpu, &Preprocessing::for_input(SIZE)).unwrap())
}

fn config(delay: Duration, queue: usize) -> BatcherConfig {
    BatcherConfig {
        max_batch_size: 8,
        max_batch_delay: delay,
        queue_capacity: queue,
        max_in_flight: 64,
    }
}

fn queue(s: &Scheduler, name: &str, seed: u64, cfg: BatcherConfig) -> ModelQueue {
    s.add_model(
        backend(seed),
        cfg,
        ModelMetrics::new(name, "1"),
        Arc::new(ModelStats::default()),
    )
}

fn input(v: f32) -> Input {
    Input::Chw(
        (0..3 * SIZE * SIZE)
            .map(|i| v * (i % 7) as f32 / 7.0)
            .collect(),
    )
}

fn submit(q: &ModelQueue, v: f32) -> Pending {
    q.submit(q.admit(1).unwrap(), input(v), None).unwrap()
}

#[tokio::test]
// Held across awaits on purpose: the test runs on its own current-thread runtime, and nothing
// the scheduler runs takes this lock.
#[allow(clippy::await_holding_lock)]
async fn concurrent_inputs_share_a_batch_and_get_their_own_rows() {
    // Bit for bit below: no other test may force another instruction set meanwhile.
    let _simd = crate::simd::testing::LOCK.lock();
    // The compute delay holds the first batch, so the next four queue up together.
    let s = Scheduler::start(Duration::from_millis(100), None).unwrap();
    let q = queue(&s, "rows", 1, config(Duration::ZERO, 16));
    let blocker = submit(&q, 0.0);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let pending: Vec<Pending> = (1..=4).map(|i| submit(&q, i as f32)).collect();
    let mut rows = Vec::new();
    for p in pending {
        let inf = p.wait().await.unwrap();
        assert_eq!(inf.batch_size, 4);
        rows.push(inf.logits);
    }
    blocker.wait().await.unwrap();
    // The model answers differently for each input, and each input gets its own row.
    for i in 0..4 {
        for j in i + 1..4 {
            assert_ne!(rows[i], rows[j]);
        }
    }
    let single = submit(&q, 3.0).wait().await.unwrap();
    assert_eq!(single.batch_size, 1);
    assert_eq!(single.logits, rows[2]);
}

#[tokio::test]
async fn in_flight_limit_and_full_queue_refuse_at_once() {
    let s = Scheduler::start(Duration::from_millis(300), None).unwrap();
    let q = queue(&s, "refuse", 2, config(Duration::ZERO, 1));
    assert!(matches!(q.admit(65), Err(Error::TooManyInFlight { .. })));
    let first = submit(&q, 0.1);
    tokio::time::sleep(Duration::from_millis(100)).await; // the compute thread takes `first`
    let second = submit(&q, 0.2);
    let third = q.submit(q.admit(1).unwrap(), input(0.3), None);
    assert!(matches!(third, Err(Error::QueueFull { capacity: 1, .. })));
    assert!(first.wait().await.is_ok());
    assert!(second.wait().await.is_ok());
}

#[tokio::test]
async fn an_input_reaching_an_idle_model_runs_at_once() {
    // A batching window of 10 s: the old policy would hold a lone input that long.
    let s = Scheduler::start(Duration::ZERO, None).unwrap();
    let q = queue(&s, "idle", 3, config(Duration::from_secs(10), 16));
    let started = Instant::now();
    let inf = submit(&q, 0.5).wait().await.unwrap();
    assert_eq!(inf.batch_size, 1);
    assert!(inf.queue < Duration::from_secs(1), "queued {:?}", inf.queue);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_batch_waits_for_inputs_already_admitted() {
    let s = Scheduler::start(Duration::ZERO, None).unwrap();
    let q = queue(&s, "admitted", 4, config(Duration::from_secs(10), 16));
    // Three inputs admitted (as if being decoded); one is queued now, two a little later.
    let mut ticket = q.admit(3).unwrap();
    let first = q
        .submit(ticket.split_one().unwrap(), input(1.0), None)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rest: Vec<Pending> = (0..2)
        .map(|i| {
            q.submit(ticket.split_one().unwrap(), input(2.0 + i as f32), None)
                .unwrap()
        })
        .collect();
    assert_eq!(first.wait().await.unwrap().batch_size, 3);
    for p in rest {
        assert_eq!(p.wait().await.unwrap().batch_size, 3);
    }
    // An admitted input that never arrives (its request failed validation) releases its slot,
    // and the batch does not wait for it.
    let mut ticket = q.admit(2).unwrap();
    let lone = q
        .submit(ticket.split_one().unwrap(), input(1.0), None)
        .unwrap();
    drop(ticket);
    let inf = lone.wait().await.unwrap();
    assert_eq!(inf.batch_size, 1);
    // Whether the batcher looked before or after the drop (the window is 10 s).
    assert!(inf.queue < Duration::from_secs(1), "queued {:?}", inf.queue);
}

#[tokio::test]
async fn models_sharing_the_compute_thread_keep_their_batches() {
    let s = Scheduler::start(Duration::from_millis(60), None).unwrap();
    let a = queue(&s, "mix-a", 5, config(Duration::ZERO, 64));
    let b = queue(&s, "mix-b", 6, config(Duration::ZERO, 64));
    // While A's first input computes, eight inputs queue for each model: A's are older.
    let blocker = submit(&a, 0.0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pa: Vec<Pending> = (0..8).map(|i| submit(&a, i as f32)).collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let pb: Vec<Pending> = (0..8).map(|i| submit(&b, i as f32)).collect();
    blocker.wait().await.unwrap();
    let mut a_queue = Duration::ZERO;
    for p in pa {
        let inf = p.wait().await.unwrap();
        assert_eq!(inf.batch_size, 8, "model A's inputs form one batch");
        a_queue = a_queue.max(inf.queue);
    }
    for p in pb {
        let inf = p.wait().await.unwrap();
        assert_eq!(inf.batch_size, 8, "model B's inputs form one batch");
        // Oldest first: B queued 5 ms after A but waited for A's 60 ms batch.
        assert!(
            inf.queue > a_queue + Duration::from_millis(20),
            "B waited {:?}, A {a_queue:?}",
            inf.queue
        );
    }
}

#[tokio::test]
async fn expired_and_cancelled_inputs_are_not_computed() {
    let s = Scheduler::start(Duration::from_millis(100), None).unwrap();
    let q = queue(&s, "expire", 7, config(Duration::ZERO, 16));
    let blocker = submit(&q, 0.0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let expired = q
        .submit(
            q.admit(1).unwrap(),
            input(1.0),
            Some(Instant::now() + Duration::from_millis(10)),
        )
        .unwrap();
    drop(submit(&q, 2.0)); // its client is gone
    let live = submit(&q, 3.0);
    assert!(matches!(
        expired.wait().await,
        Err(Error::DeadlineExceeded { .. })
    ));
    blocker.wait().await.unwrap();
    assert_eq!(live.wait().await.unwrap().batch_size, 1);
}

/// With an idle period set, the compute thread releases its scratch once after the batches of
/// a burst (not once per batch, not again while nothing runs), and once more after the next
/// burst; without one it never does.
#[tokio::test]
async fn idle_release_comes_once_after_each_burst() {
    let idle = Duration::from_millis(300);
    let s = Scheduler::start(Duration::ZERO, Some(idle)).unwrap();
    let q = queue(&s, "idle-release", 6, config(Duration::ZERO, 16));
    tokio::time::sleep(idle * 3).await;
    assert_eq!(s.idle_releases(), 0, "released before any batch");
    for burst in 1..=2 {
        for i in 0..5 {
            submit(&q, i as f32).wait().await.unwrap();
        }
        assert_eq!(s.idle_releases(), burst - 1, "released during a burst");
        tokio::time::sleep(idle * 4).await;
        assert_eq!(s.idle_releases(), burst, "after burst {burst}");
    }
    let never = Scheduler::start(Duration::ZERO, None).unwrap();
    let q = queue(&never, "no-idle-release", 7, config(Duration::ZERO, 16));
    submit(&q, 1.0).wait().await.unwrap();
    tokio::time::sleep(idle * 3).await;
    assert_eq!(never.idle_releases(), 0);
}

#[tokio::test]
async fn an_answered_input_has_left_flight() {
    // With one slot in flight, the next request sent the moment an answer arrives must be
    // admitted: the slot is released before the answer is sent, not after.
    let s = Scheduler::start(Duration::ZERO, None).unwrap();
    let mut cfg = config(Duration::ZERO, 16);
    cfg.max_in_flight = 1;
    let q = queue(&s, "one-in-flight", 7, cfg);
    for i in 0..50 {
        let p = submit(&q, i as f32);
        p.wait().await.unwrap();
        let again = q.admit(1);
        assert!(again.is_ok(), "answer {i}: the slot is still taken");
    }
}
