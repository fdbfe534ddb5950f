//! KServe v2 / Triton protocol: metadata calls, both input forms of ModelInfer matching the own
//! API's logits, statistics, and its errors.

use prost::bytes::Bytes;
use tonic::Code;

use crate::common::*;
use slimserve::grpc::pb::inference as kpb;
use slimserve::grpc::pb::slimserve::v1 as pb;

const M: &str = "kmodel";

fn infer_request(
    name: &str,
    datatype: &str,
    shape: &[i64],
    raw: Vec<u8>,
) -> kpb::ModelInferRequest {
    kpb::ModelInferRequest {
        model_name: M.into(),
        id: "req-1".into(),
        inputs: vec![kpb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        outputs: vec![kpb::model_infer_request::InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}

fn logits_of(r: &kpb::ModelInferResponse) -> Vec<f32> {
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, "logits");
    assert_eq!(r.outputs[0].datatype, "FP32");
    r.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `--kserve-input input` declares the FP32 input instead (for clients that send
/// preprocessed tensors and read the metadata); ModelInfer still takes either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_input_flag_declares_the_fp32_input() {
    let server = TestServer::start(&[M], |c| {
        c.kserve_input = slimserve::grpc::KServeInput::Input
    })
    .await;
    let mut k = server.kserve().await;
    let md = k
        .model_metadata(kpb::ModelMetadataRequest {
            name: M.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.inputs.len(), 1);
    assert_eq!(
        (md.inputs[0].name.as_str(), md.inputs[0].datatype.as_str()),
        ("input", "FP32")
    );
    assert_eq!(md.inputs[0].shape, [-1, 3, 32, 32]);
    let cfg = k
        .model_config(kpb::ModelConfigRequest {
            name: M.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(cfg.input.len(), 1);
    assert_eq!(cfg.input[0].data_type, kpb::DataType::TypeFp32 as i32);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_calls_describe_the_model() {
    let s = TestServer::start(&[M], |_| {}).await;
    let mut k = s.kserve().await;
    assert!(
        k.server_live(kpb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        k.server_ready(kpb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str| kpb::ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(k.model_ready(ready(M)).await.unwrap().into_inner().ready);
    assert!(
        !k.model_ready(ready("nope"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = k
        .server_metadata(kpb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "slimserve");

    let md = k
        .model_metadata(kpb::ModelMetadataRequest {
            name: M.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let shapes: Vec<(&str, &str, &[i64])> = md
        .inputs
        .iter()
        .chain(&md.outputs)
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
        .collect();
    // One declared input, UINT8 pixels by default: perf_analyzer sends every input
    // ModelMetadata lists, with random data (valid pixels; random FP32 bits hold NaNs).
    assert_eq!(
        shapes,
        [
            ("image", "UINT8", &[-1i64, 32, 32, 3][..]),
            ("logits", "FP32", &[-1, 4][..]),
        ]
    );

    let cfg = k
        .model_config(kpb::ModelConfigRequest {
            name: M.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(cfg.max_batch_size, 32);
    assert_eq!(cfg.input.len(), 1);
    assert_eq!(cfg.input[0].dims, [32, 32, 3]);
    assert_eq!(cfg.input[0].data_type, kpb::DataType::TypeUint8 as i32);
    assert_eq!(cfg.output[0].dims, [4]);

    let status = k
        .model_metadata(kpb::ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["model `nope` not found"]);
    let status = k
        .model_metadata(kpb::ModelMetadataRequest {
            name: M.into(),
            version: "7".into(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &["no version `7`"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_infer_both_input_forms_match_the_own_api() {
    let s = TestServer::start(&[M], |_| {}).await;
    let mut k = s.kserve().await;
    let mut own = s.classifier().await;

    // FP32 NCHW, a batch of two.
    let (v, raw) = f32_input(2, 11);
    let r = k
        .model_infer(infer_request("input", "FP32", &[2, 3, 32, 32], raw))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.id, "req-1");
    assert_eq!(r.outputs[0].shape, [2, 4]);
    let batch = logits_of(&r);
    for i in 0..2 {
        let one: Vec<u8> = v[i * 3072..(i + 1) * 3072]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mine = own
            .classify(tensor_request(M, pb::DataType::Float32, &[3, 32, 32], one))
            .await
            .unwrap()
            .into_inner();
        assert!(max_diff(&mine.logits, &batch[i * 4..(i + 1) * 4]) < 1e-5);
    }

    // UINT8 NHWC pixels: the same image through KServe, the own API's UINT8 tensor, and the
    // own API's PNG path (32x32 needs no resize, so all three see identical pixels).
    let png_bytes = png(32, 32);
    let pixels = image::load_from_memory(&png_bytes)
        .unwrap()
        .to_rgb8()
        .into_raw();
    let r = k
        .model_infer(infer_request(
            "image",
            "UINT8",
            &[1, 32, 32, 3],
            pixels.clone(),
        ))
        .await
        .unwrap()
        .into_inner();
    let via_kserve = logits_of(&r);
    let via_tensor = own
        .classify(tensor_request(M, pb::DataType::Uint8, &[32, 32, 3], pixels))
        .await
        .unwrap()
        .into_inner()
        .logits;
    let mut req = image_request(M, png_bytes);
    req.include_logits = true;
    let via_png = own.classify(req).await.unwrap().into_inner().logits;
    assert!(max_diff(&via_kserve, &via_tensor) < 1e-5);
    assert!(max_diff(&via_kserve, &via_png) < 1e-5);

    let stats = k
        .model_statistics(kpb::ModelStatisticsRequest {
            name: M.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let st = &stats.model_stats[0];
    assert_eq!(st.inference_count, 2 + 2 + 1 + 2);
    assert!(st.execution_count >= 1 && st.last_inference > 0);
    assert_eq!(
        st.inference_stats
            .as_ref()
            .unwrap()
            .success
            .as_ref()
            .unwrap()
            .count,
        6
    );
    // Every compute stage counts every computed input: perf_analyzer aborts when the three
    // counts differ, and reports their times as the server's compute input / infer / output.
    let is = st.inference_stats.as_ref().unwrap();
    for stage in [&is.compute_input, &is.compute_infer, &is.compute_output] {
        let stage = stage.as_ref().unwrap();
        assert_eq!(stage.count, st.inference_count, "{is:?}");
    }
    assert!(is.compute_infer.as_ref().unwrap().ns > 0, "{is:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_infer_errors() {
    let s = TestServer::start(&[M], |_| {}).await;
    let mut k = s.kserve().await;
    let (_, raw) = f32_input(1, 0);
    let cases: Vec<(kpb::ModelInferRequest, Code, &[&str])> = vec![
        (
            infer_request("input", "INT64", &[1, 3, 32, 32], raw.clone()),
            Code::InvalidArgument,
            &["datatype INT64, expected FP32"],
        ),
        (
            infer_request("input", "FP32", &[1, 3, 32, 32], raw[..1000].to_vec()),
            Code::InvalidArgument,
            &["1000 bytes", "needs 12288"],
        ),
        (
            infer_request("input", "FP32", &[1, 3, 16, 64], raw.clone()),
            Code::InvalidArgument,
            &["shape [1, 3, 16, 64]", "[N, 3, 32, 32]"],
        ),
        (
            infer_request("input", "FP32", &[33, 3, 32, 32], raw.clone()),
            Code::InvalidArgument,
            &["1 <= N <= 32"],
        ),
        (
            infer_request("pixels", "FP32", &[1, 3, 32, 32], raw.clone()),
            Code::InvalidArgument,
            &["unknown input `pixels`"],
        ),
        (
            {
                let mut r = infer_request("input", "FP32", &[1, 3, 32, 32], raw.clone());
                r.model_name = "nope".into();
                r
            },
            Code::NotFound,
            &["model `nope` not found"],
        ),
        (
            {
                let mut r = infer_request("input", "FP32", &[1, 3, 32, 32], raw.clone());
                r.outputs[0].name = "probs".into();
                r
            },
            Code::InvalidArgument,
            &["unknown output `probs`"],
        ),
        (
            {
                let mut r = infer_request("input", "FP32", &[1, 3, 32, 32], raw.clone());
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
                r
            },
            Code::InvalidArgument,
            &["exactly one input"],
        ),
    ];
    for (req, code, needles) in cases {
        let status = k.model_infer(req).await.unwrap_err();
        assert_status(&status, code, needles);
    }
    let ok = k
        .model_infer(infer_request("input", "FP32", &[1, 3, 32, 32], raw))
        .await;
    assert!(ok.is_ok(), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_kserve_rpcs_are_unimplemented() {
    let s = TestServer::start(&[M], |_| {}).await;
    let mut grpc = tonic::client::Grpc::new(s.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    );
    let status = grpc
        .unary::<kpb::ServerLiveRequest, kpb::ServerLiveResponse, _>(
            tonic::Request::new(kpb::ServerLiveRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}
