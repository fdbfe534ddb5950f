//! The own API's batch and stream RPCs.

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use crate::common::*;
use slimserve::grpc::pb::slimserve::v1 as pb;
use slimserve::infer::int8::Int8Isa;
use slimserve::pipeline::Int8Engine;

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

/// With `--int8-engine int8`, an int8 model directory is served on the int8 engine (ListModels,
/// `slimserve_model_info`), whatever int8 kernels this CPU has, and answers like the f32 model
/// it was quantized from: the same top class on nearly every input, logits close, and answers
/// that depend on the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_models_run_on_the_int8_engine_and_follow_their_f32_source() {
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), "m");
    make_int8_model(dir.path(), "m", "m-int8", 16);
    let s = TestServer::start_dir(dir, |c| c.int8_engine = Int8Engine::Int8).await;
    let mut c = s.classifier().await;
    let list = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let engine = |name: &str| {
        let m = list.models.iter().find(|m| m.name == name).unwrap();
        (m.weight_format.clone(), m.engine.clone())
    };
    assert_eq!(engine("m"), ("f32".into(), "fused".into()));
    assert_eq!(engine("m-int8"), ("int8".into(), "int8".into()));
    let info = s
        .metrics_text()
        .lines()
        .find(|l| l.starts_with("slimserve_model_info{") && l.contains("model=\"m-int8\""))
        .unwrap()
        .to_string();
    assert!(
        info.contains("engine=\"int8\"") && info.contains("format=\"int8\""),
        "{info}"
    );

    let n = 12;
    let (mut agree, mut worst, mut spread) = (0, 0f32, 0f32);
    let mut answers = Vec::new();
    for i in 0..n {
        let (_, bytes) = f32_input(1, 1000 + i);
        let logits = logits_of(&mut c, ["m", "m-int8"], &bytes).await;
        answers.push(logits[1].clone());
        let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        agree += usize::from(top(&logits[0]) == top(&logits[1]));
        worst = worst.max(max_diff(&logits[0], &logits[1]));
        spread = logits[0].iter().fold(spread, |m, v| m.max(v.abs()));
    }
    assert!(
        agree >= n as usize - 1,
        "top class agrees on {agree} of {n}"
    );
    assert!(
        worst < 0.1 * spread,
        "max |int8 - f32| {worst} against logits up to {spread}"
    );
    assert!(
        answers.windows(2).any(|w| w[0] != w[1]),
        "the int8 model answers the same for every input"
    );
}

/// `--int8-engine auto` (the default) computes an int8 model in int8 only where the CPU has
/// AVX-512 VNNI (elsewhere the int8 kernels lose to the f32 engine); `f32` always takes the
/// fused f32 engine on the dequantized weights, whose answers then follow the f32 source model
/// closely (only the weights were rounded) and still depend on the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_int8_engine_option_picks_the_engine_of_int8_models() {
    let isa = Int8Isa::detect();
    println!("best int8 kernel set here: {}", isa.name());
    for (option, expected) in [
        (
            Int8Engine::Auto,
            if isa == Int8Isa::Avx512Vnni {
                "int8"
            } else {
                "fused"
            },
        ),
        (Int8Engine::F32, "fused"),
    ] {
        // Model names no other test serves: `slimserve_model_info` is process-global, and
        // another test reads the engine label of its own int8 model there.
        let dir = tempfile::tempdir().unwrap();
        make_model(dir.path(), "opt-f32");
        make_int8_model(dir.path(), "opt-f32", "opt-int8", 16);
        let s = TestServer::start_dir(dir, |c| c.int8_engine = option).await;
        let mut c = s.classifier().await;
        let list = c
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let m = list.models.iter().find(|m| m.name == "opt-int8").unwrap();
        assert_eq!(
            (m.weight_format.as_str(), m.engine.as_str()),
            ("int8", expected),
            "--int8-engine {option:?}"
        );
        if option != Int8Engine::F32 {
            continue;
        }
        let mut answers = Vec::new();
        for i in 0..6 {
            let (_, bytes) = f32_input(1, 2000 + i);
            let [source, int8] = logits_of(&mut c, ["opt-f32", "opt-int8"], &bytes).await;
            let spread = source.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_diff(&source, &int8);
            assert!(
                diff < 0.05 * spread,
                "dequantized int8 weights: max |diff| {diff} against logits up to {spread}"
            );
            answers.push(int8);
        }
        assert!(
            answers.windows(2).any(|w| w[0] != w[1]),
            "the dequantized int8 model answers the same for every input"
        );
    }
}

/// The logits each of `models` gives for one preprocessed f32 image (`bytes`, little-endian
/// `[3, SIZE, SIZE]`), in order.
async fn logits_of(
    c: &mut ClassifierClient<Channel>,
    models: [&str; 2],
    bytes: &[u8],
) -> [Vec<f32>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for (model, logits) in models.into_iter().zip(&mut out) {
        *logits = c
            .classify(tensor_request(
                model,
                pb::DataType::Float32,
                &[3, SIZE as i64, SIZE as i64],
                bytes.to_vec(),
            ))
            .await
            .unwrap()
            .into_inner()
            .logits;
    }
    out
}
