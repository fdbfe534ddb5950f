//! The bodies of the fuzz targets under `fuzz/`, kept in the library so that the regression
//! tests (`tests/fuzz_corpus.rs`) run every seed and every input that once failed through the
//! same code as the fuzzer. Each takes bytes as a client or a file could hold them and runs the
//! server's own decoding and validation on them; an `Err` is an answer, a panic, a hang or an
//! allocation past the limits is a bug.
//!
//! Requests are validated against a model of input side [`INPUT_SIZE`] (small, so that the
//! fuzzer reaches valid tensors within a few hundred bytes) and images against
//! [`MAX_PIXELS`] (the server's limit check, at a value that keeps executions fast).

use std::path::Path;

use prost::Message;

use crate::error::Error;
use crate::formats::{model_dir, onnx};
use crate::grpc::pb::{inference, slimserve::v1 as own};
use crate::infer::FastModel;
use crate::pipeline::{input, Payload};
use crate::preprocess::Preprocessing;
use candle_core::Device;

/// Input side of the model requests are validated against.
pub const INPUT_SIZE: usize = 16;
/// Largest batch a request may carry.
pub const MAX_BATCH: usize = 8;
/// Pixel limit for encoded images.
pub const MAX_PIXELS: u64 = 1 << 18;

/// Runs a request's payload through the pipeline's validation and preprocessing.
fn payload(payload: Payload) -> Result<usize, Error> {
    match payload {
        Payload::Image(bytes) => image(&bytes),
        Payload::Tensor(t) => Ok(input::tensor(&t, "fuzz", INPUT_SIZE, MAX_BATCH)?.len()),
    }
}

/// An encoded image, decoded, resized and cropped as a model of [`INPUT_SIZE`] expects.
/// Returns the number of inputs made (1).
pub fn image(data: &[u8]) -> Result<usize, Error> {
    let pp = Preprocessing::for_input(INPUT_SIZE);
    input::image(data, &pp, MAX_PIXELS).map(|_| 1)
}

/// A `slimserve.v1.ClassifyRequest` as it arrives on the wire. Returns the inputs it makes.
pub fn classify_request(data: &[u8]) -> Result<usize, Error> {
    let req = own::ClassifyRequest::decode(data)
        .map_err(|e| Error::invalid(format!("undecodable ClassifyRequest: {e}")))?;
    payload(crate::grpc::classify_request(req)?.payload)
}

/// A KServe `inference.ModelInferRequest` as it arrives on the wire. Returns the inputs it
/// makes.
pub fn model_infer_request(data: &[u8]) -> Result<usize, Error> {
    let req = inference::ModelInferRequest::decode(data)
        .map_err(|e| Error::invalid(format!("undecodable ModelInferRequest: {e}")))?;
    payload(crate::grpc::model_infer_request(req)?.payload)
}

/// A KServe v2 HTTP/REST inference body: a little-endian `u16` first, the
/// Inference-Header-Content-Length header's value (`0xFFFF`: no header, the body is all JSON),
/// then the body (JSON, then binary tensor data). Returns the inputs it makes.
pub fn rest_infer_request(data: &[u8]) -> Result<usize, Error> {
    let (len, body) = data
        .split_first_chunk::<2>()
        .ok_or_else(|| Error::invalid("input too short"))?;
    let len = u16::from_le_bytes(*len);
    let header = (len != u16::MAX).then(|| len.to_string());
    let req = crate::rest::model_infer_from_http(header.as_deref(), body, 1 << 20)
        .map_err(Error::invalid)?;
    payload(crate::grpc::model_infer_request(req)?.payload)
}

/// The inverse of the split [`rest_infer_request`] makes, for writing seeds.
pub fn join_rest_infer(header_length: Option<u16>, body: &[u8]) -> Vec<u8> {
    let mut out = header_length.unwrap_or(u16::MAX).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Splits a model-directory fuzz input: a little-endian `u16` length, that many bytes of
/// `config.json`, then the weight file.
pub fn split_model_dir(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = u16::from_le_bytes(*len) as usize;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The inverse of [`split_model_dir`], for writing seeds.
pub fn join_model_dir(config: &[u8], weights: &[u8]) -> Vec<u8> {
    let len = u16::try_from(config.len()).expect("config.json under 64 KiB");
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(config);
    out.extend_from_slice(weights);
    out
}

/// What a model directory held: the server's loader (config, weights in any format,
/// dequantized, checked against the architecture), the fused engine's compiler, the int8
/// engine's (for an int8 file's activation ranges) and the ONNX exporter. Returns the ONNX
/// file's size.
pub fn model_dir(data: &[u8]) -> anyhow::Result<usize> {
    let (config, weights) =
        split_model_dir(data).ok_or_else(|| anyhow::anyhow!("input too short"))?;
    let dir = Path::new("fuzz-model");
    let config = model_dir::parse_config(&dir.join(model_dir::CONFIG_FILE), config)?;
    let loaded = model_dir::from_parts(dir, config, weights)?;
    let model = loaded.build(&Device::Cpu)?;
    // Not every architecture compiles; those that do must compile without panicking.
    let _ = FastModel::compile(&model);
    // An int8 file's stored activation ranges (any values) go to the int8 engine's compiler
    // as the server's loader passes them: refused or compiled, never a panic.
    if let Some(ranges) = &loaded.calibration {
        let _ = crate::infer::qmodel::Int8Model::compile(&model, ranges);
    }
    Ok(onnx::export(&model)?.len())
}
