//! The own API's batch and stream RPCs.

use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::*;
use slimserve::grpc::pb::slimserve::v1 as pb;

const M: &str = "own";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_batch_answers_in_order_and_names_a_bad_item() {
    let s = TestServer::start(&[M], |_| {}).await;
    let mut c = s.classifier().await;
    let mut requests: Vec<pb::ClassifyRequest> =
        (0..3).map(|i| image_request(M, png(30 + i, 40))).collect();
    requests[1].top_k = 2;
    let r = c
        .classify_batch(pb::ClassifyBatchRequest {
            requests: requests.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let sizes: Vec<usize> = r.responses.iter().map(|r| r.predictions.len()).collect();
    assert_eq!(sizes, [4, 2, 4]);

    requests[2] = image_request(M, b"GIF89a-but-not-really".to_vec());
    let status = c
        .classify_batch(pb::ClassifyBatchRequest { requests })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["requests[2]: "]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_answers_every_request_by_id_and_survives_bad_items() {
    let s = TestServer::start(&[M], |_| {}).await;
    let mut c = s.classifier().await;
    let requests: Vec<pb::ClassifyRequest> = (0..5)
        .map(|i| {
            let mut r = if i == 3 {
                image_request("missing", png(8, 8))
            } else {
                image_request(M, png(20, 20))
            };
            r.id = format!("r{i}");
            r
        })
        .collect();
    let mut answers = c
        .classify_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(answer) = answers.next().await {
        let answer = answer.unwrap();
        match answer.result.unwrap() {
            pb::classify_stream_response::Result::Response(r) => {
                assert_eq!(r.id, answer.id);
                assert_eq!(r.model, M);
            }
            pb::classify_stream_response::Result::Error(e) => {
                assert_eq!(answer.id, "r3");
                assert_eq!(e.code, Code::NotFound as i32);
                assert!(
                    e.message.contains("model `missing` not found"),
                    "{}",
                    e.message
                );
            }
        }
        seen.push(answer.id);
    }
    seen.sort();
    assert_eq!(seen, ["r0", "r1", "r2", "r3", "r4"]);
}
