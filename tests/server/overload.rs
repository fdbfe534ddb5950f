//! Overload and client behaviour while queued: deadlines, a full queue, the in-flight limit,
//! and clients that give up. A per-batch compute delay (fault injection) makes the model slow
//! enough to hold a queue deterministically.

use std::time::Duration;

use tonic::Code;

use crate::common::*;

/// Batches of one that take 400 ms: the second request waits in the queue.
fn slow(c: &mut slimserve::server::Config) {
    c.max_batch_size = Some(1);
    c.max_batch_delay = Duration::ZERO;
    c.inject_compute_delay = Duration::from_millis(400);
}

fn batches(text: &str, model: &str) -> f64 {
    sample(
        text,
        &format!("slimserve_batch_size_inputs_count{{model=\"{model}\",version=\"1\"}}"),
    )
    .unwrap_or(0.0)
}

fn dropped(text: &str, model: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!(
            "slimserve_dropped_inputs_total{{model=\"{model}\",version=\"1\",reason=\"{reason}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_expiring_in_the_queue_is_answered_and_not_computed() {
    const M: &str = "slow-deadline";
    // A longer compute than `slow`'s, so that "answered at the deadline" and "answered after
    // the compute" stay far apart on a loaded 2-core machine (this test once failed there with
    // 400 ms and a 300 ms bound).
    let s = TestServer::start(&[M], |c| {
        slow(c);
        c.inject_compute_delay = Duration::from_millis(2000);
    })
    .await;
    let mut a = s.classifier().await;
    let mut b = s.classifier().await;
    let first = tokio::spawn(async move { a.classify(image_request(M, png(32, 32))).await });
    tokio::time::sleep(Duration::from_millis(300)).await; // computing

    let mut req = tonic::Request::new(image_request(M, png(32, 32)));
    req.set_timeout(Duration::from_millis(150));
    let started = std::time::Instant::now();
    let status = b
        .classify(req)
        .await
        .expect_err("deadline passes while queued");
    assert_status(
        &status,
        Code::DeadlineExceeded,
        &[
            "waiting in the queue of model `slow-deadline`",
            "not computed",
        ],
    );
    // After the compute it would be at least 1700 ms (2000 - 300).
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(1000),
        "answered at the deadline, not after compute: {waited:?}"
    );

    first.await.unwrap().expect("the first request completes");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let text = s.metrics_text();
    assert_eq!(
        batches(&text, M),
        1.0,
        "only the first request was computed"
    );
    assert_eq!(dropped(&text, M, "deadline"), 1.0);
    assert_serving(&mut b, M).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted_at_once() {
    const M: &str = "slow-queue";
    let s = TestServer::start(&[M], |c| {
        slow(c);
        c.max_queue_size = 1;
    })
    .await;
    let (mut a, mut b, mut c) = (
        s.classifier().await,
        s.classifier().await,
        s.classifier().await,
    );
    let first = tokio::spawn(async move { a.classify(image_request(M, png(32, 32))).await });
    tokio::time::sleep(Duration::from_millis(100)).await; // computing
    let second = tokio::spawn(async move { b.classify(image_request(M, png(32, 32))).await });
    tokio::time::sleep(Duration::from_millis(100)).await; // queued
    let started = std::time::Instant::now();
    let status = c
        .classify(image_request(M, png(32, 32)))
        .await
        .expect_err("queue is full");
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "refused at once"
    );
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["queue of model `slow-queue` is full", "1 requests waiting"],
    );
    first.await.unwrap().expect("first answered");
    second.await.unwrap().expect("queued request answered");
    assert_serving(&mut c, M).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_is_resource_exhausted_at_once() {
    const M: &str = "slow-inflight";
    let s = TestServer::start(&[M], |c| {
        slow(c);
        c.max_in_flight = 1;
    })
    .await;
    let (mut a, mut b) = (s.classifier().await, s.classifier().await);
    let first = tokio::spawn(async move { a.classify(image_request(M, png(32, 32))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = b
        .classify(image_request(M, png(32, 32)))
        .await
        .expect_err("limit reached");
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["1 requests in flight", "--max-in-flight"],
    );
    first.await.unwrap().expect("first answered");
    assert_serving(&mut b, M).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_client_is_dropped_before_compute() {
    const M: &str = "slow-cancel";
    let s = TestServer::start(&[M], slow).await;
    let (mut a, mut b) = (s.classifier().await, s.classifier().await);
    let first = tokio::spawn(async move { a.classify(image_request(M, png(32, 32))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gives_up = tokio::spawn(async move { b.classify(image_request(M, png(32, 32))).await });
    tokio::time::sleep(Duration::from_millis(100)).await; // queued behind `first`
    gives_up.abort(); // drops the call: the client cancels the stream
    first.await.unwrap().expect("first answered");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = s.metrics_text();
    assert_eq!(dropped(&text, M, "cancelled"), 1.0, "{text}");
    assert_eq!(
        batches(&text, M),
        1.0,
        "the cancelled request was not computed"
    );
    let mut c = s.classifier().await;
    assert_serving(&mut c, M).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_batches() {
    const M: &str = "batching";
    let s = TestServer::start(&[M], |c| c.max_batch_delay = Duration::from_millis(50)).await;
    let client = s.classifier().await;
    let request = |seed: u32| {
        let mut r = image_request(M, png_seeded(32, 32, seed));
        r.include_logits = true;
        r
    };
    // Each image alone first: its own answer.
    let mut alone = Vec::new();
    for seed in 0..6 {
        let mut c = client.clone();
        alone.push(c.classify(request(seed)).await.unwrap().into_inner().logits);
    }
    for i in 1..6 {
        assert_ne!(
            alone[i], alone[0],
            "the test model answers each image differently"
        );
    }
    let calls: Vec<_> = (0..6)
        .map(|seed| {
            let mut c = client.clone();
            tokio::spawn(async move { c.classify(request(seed)).await })
        })
        .collect();
    let mut largest = 0;
    for (seed, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap().unwrap().into_inner();
        largest = largest.max(r.timings.unwrap().batch_size);
        // Batched with the others, each image still gets exactly its own row.
        assert_eq!(r.logits, alone[seed], "image {seed}");
    }
    assert!(
        largest > 1,
        "six concurrent requests within 50 ms share a batch"
    );
}
