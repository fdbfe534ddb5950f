//! `slimserve load` and `slimserve compare`: a closed-loop (or rate-paced) gRPC load generator
//! for the own API and KServe v2, with latency percentiles, counts by gRPC status, and the
//! server-side queue/compute split read from `/metrics`.
//!
//! Every run is bounded twice: by a request count and by a wall-clock limit, whichever comes
//! first, so a loop always stops by itself. It only talks to the address it is given (default
//! loopback).

pub mod compare;
pub mod prom;
mod report;
pub mod soak;
pub mod swap;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use prost::bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

use crate::grpc::pb::inference as kpb;
use crate::grpc::pb::slimserve::v1 as pb;
use crate::server::config::parse_span;
use crate::telemetry::code_name;
use kpb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::classifier_client::ClassifierClient;

pub use report::{LatencySummary, Report};

/// Which API the requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `slimserve.v1.Classifier/Classify`.
    Classify,
    /// KServe v2 `inference.GRPCInferenceService/ModelInfer` (raw FP32 tensor).
    Kserve,
}

/// How much load and for how long; shared by `load` and `compare`.
#[derive(Debug, Clone, Args)]
pub struct LoadShape {
    /// Server address, HOST:PORT. Only this address is contacted.
    #[arg(long, env = "SLIMSERVE_ADDR", default_value = "127.0.0.1:8001")]
    pub addr: String,

    /// API to drive: `classify` (own API; images or FLOAT32 tensors) or `kserve` (ModelInfer
    /// with a raw FP32 NCHW tensor).
    #[arg(long, value_enum, default_value = "classify")]
    pub api: Api,

    /// Folder of images (searched recursively: JPEG, PNG, WebP, BMP, GIF) sent as encoded
    /// bytes with the own API, in turn. Without it, requests carry random preprocessed tensors
    /// of the model's input shape. KServe requests always carry tensors.
    #[arg(long)]
    pub images: Option<PathBuf>,

    /// Requests in flight at once (`load --concurrency`; `compare` sets it per level).
    #[arg(skip = 1u32)]
    pub concurrency: u32,

    /// Requests to send in total (a run also stops at --duration).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Longest a run may take, with its unit (e.g. 30s, 2m); it stops at whichever of
    /// --requests and this comes first.
    #[arg(long, default_value = "60s", value_parser = parse_span)]
    pub duration: Duration,

    /// Target request rate per second across all workers (0 = as fast as answers come back).
    /// Requests are started on a fixed schedule; if the server falls behind, workers catch up
    /// without exceeding --concurrency.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Requests sent and discarded before measuring (warms caches and the batcher).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,

    /// Per-request deadline, with its unit (sent as grpc-timeout).
    #[arg(long, default_value = "30s", value_parser = parse_span)]
    pub timeout: Duration,

    /// HTTP/2 connections the workers share (requests are multiplexed on each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,

    /// Seed of the random tensors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `slimserve load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub shape: LoadShape,

    /// Requests in flight at once (closed loop: each worker sends its next request when the
    /// previous one is answered).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,

    /// Model to load; several comma-separated models are asked in turn (a mixed load).
    /// Default: the server's default model.
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<String>,

    /// Also write the report as JSON to this file (written atomically).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One prepared request body.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    Image(Bytes),
    /// Preprocessed CHW f32, little-endian.
    Tensor(Bytes),
}

/// What the server says about a model (from ListModels).
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub name: String,
    pub input_size: usize,
    pub parameters: u64,
    pub file_bytes: u64,
    pub val_accuracy: Option<f64>,
    pub weight_format: String,
    pub architecture: String,
    /// The engine computing it (`fused`, `int8`, `candle`, `device`).
    pub engine: String,
}

/// Connected clients plus the server's model list.
pub struct Target {
    channels: Vec<Channel>,
    pub models: Vec<ModelFacts>,
    pub default_model: String,
}

impl Target {
    pub async fn connect(addr: &str, connections: u32) -> Result<Self> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("invalid server address `{addr}`"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let mut channels = Vec::new();
        for _ in 0..connections {
            channels.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {addr}"))?,
            );
        }
        let list = ClassifierClient::new(channels[0].clone())
            .list_models(pb::ListModelsRequest {})
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "{addr}: ListModels answered {}: {}",
                    code_name(s.code()),
                    s.message()
                )
            })?
            .into_inner();
        let models = list
            .models
            .into_iter()
            .map(|m| ModelFacts {
                input_size: m.input_shape.last().copied().unwrap_or(0) as usize,
                name: m.name,
                parameters: m.parameters,
                file_bytes: m.file_bytes,
                val_accuracy: m.val_accuracy,
                weight_format: m.weight_format,
                architecture: m.architecture,
                engine: m.engine,
            })
            .collect();
        Ok(Self {
            channels,
            models,
            default_model: list.default_model,
        })
    }

    /// The named models (empty: the default one), checked against the server's list.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<ModelFacts>> {
        let wanted: Vec<String> = if names.is_empty() {
            vec![self.default_model.clone()]
        } else {
            names.to_vec()
        };
        wanted
            .iter()
            .map(|n| {
                self.models
                    .iter()
                    .find(|m| &m.name == n)
                    .cloned()
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "the server has no model `{n}` (it serves: {})",
                            self.models
                                .iter()
                                .map(|m| m.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
            })
            .collect()
    }
}

/// Image files under `dir`, sorted, recursively (at most 100,000).
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const EXTS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "bmp", "gif"];
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("--images {}", d.display()))?;
        for e in entries {
            let p = e
                .with_context(|| format!("--images {}", d.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
            if out.len() >= 100_000 {
                break;
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "--images {}: no image files (jpg, jpeg, png, webp, bmp, gif) found",
            dir.display()
        );
    }
    Ok(out)
}

/// Random preprocessed tensors in [0, 1): a few distinct ones, used in turn.
pub(crate) fn random_tensors(size: usize, seed: u64, count: usize) -> Vec<Payload> {
    (0..count as u64)
        .map(|k| {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k + 1);
            let bytes: Vec<u8> = (0..3 * size * size)
                .flat_map(|_| {
                    // xorshift64*: cheap, deterministic, good enough for pixels.
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let v = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32
                        / (1u64 << 24) as f32;
                    v.to_le_bytes()
                })
                .collect();
            Payload::Tensor(Bytes::from(bytes))
        })
        .collect()
}

/// Builds the request bodies, one list per model in `models`' order: the same image files for
/// every model, or random tensors at each model's own input size (a 224x224 teacher beside
/// 256x256 students is compared side by side, each sent what it takes).
fn payloads(shape: &LoadShape, models: &[ModelFacts]) -> Result<Vec<Vec<Payload>>> {
    match (&shape.images, shape.api) {
        (Some(dir), Api::Classify) => {
            let images = image_files(dir)?
                .iter()
                .take(1000)
                .map(|p| {
                    std::fs::read(p)
                        .map(|b| Payload::Image(Bytes::from(b)))
                        .with_context(|| format!("{}", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(vec![images; models.len()])
        }
        (Some(_), Api::Kserve) => {
            bail!("--images works with --api classify; KServe requests carry raw tensors")
        }
        (None, _) => {
            let mut by_size: HashMap<usize, Vec<Payload>> = HashMap::new();
            Ok(models
                .iter()
                .map(|m| {
                    by_size
                        .entry(m.input_size)
                        .or_insert_with(|| random_tensors(m.input_size, shape.seed, 4))
                        .clone()
                })
                .collect())
        }
    }
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    latency: Duration,
    code: tonic::Code,
}

/// A Classify request for `model` (top 1), with its deadline.
pub(crate) fn classify_request(
    model: &ModelFacts,
    input: pb::classify_request::Input,
    id: u64,
    timeout: Duration,
) -> tonic::Request<pb::ClassifyRequest> {
    let mut req = tonic::Request::new(pb::ClassifyRequest {
        model: model.name.clone(),
        top_k: 1,
        input: Some(input),
        id: id.to_string(),
        include_logits: false,
        model_version: String::new(),
    });
    req.set_timeout(timeout);
    req
}

/// A ModelInfer request carrying `data` as the raw FP32 `[1, 3, S, S]` input at `model`'s
/// size (whatever its length: the soak sends short ones on purpose), with its deadline.
pub(crate) fn infer_request(
    model: &ModelFacts,
    data: Bytes,
    id: u64,
    timeout: Duration,
) -> tonic::Request<kpb::ModelInferRequest> {
    let s = model.input_size as i64;
    let mut req = tonic::Request::new(kpb::ModelInferRequest {
        model_name: model.name.clone(),
        id: id.to_string(),
        inputs: vec![kpb::model_infer_request::InferInputTensor {
            name: crate::grpc::INPUT_NCHW.into(),
            datatype: "FP32".into(),
            shape: vec![1, 3, s, s],
            ..Default::default()
        }],
        raw_input_contents: vec![data],
        ..Default::default()
    });
    req.set_timeout(timeout);
    req
}

async fn send(
    api: Api,
    channel: Channel,
    model: &ModelFacts,
    payload: &Payload,
    timeout: Duration,
    id: u64,
) -> tonic::Code {
    let s = model.input_size as i64;
    let result = match (api, payload) {
        (Api::Classify, p) => {
            let input = match p {
                Payload::Image(b) => pb::classify_request::Input::Image(b.clone()),
                Payload::Tensor(b) => pb::classify_request::Input::Tensor(pb::Tensor {
                    dtype: pb::DataType::Float32 as i32,
                    shape: vec![3, s, s],
                    data: b.clone(),
                }),
            };
            ClassifierClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .classify(classify_request(model, input, id, timeout))
                .await
                .map(|_| ())
        }
        (Api::Kserve, Payload::Tensor(b)) => GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .model_infer(infer_request(model, b.clone(), id, timeout))
            .await
            .map(|_| ()),
        (Api::Kserve, Payload::Image(_)) => unreachable!("payloads() refuses images for KServe"),
    };
    match result {
        Ok(()) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// Runs one bounded load against `models` (asked in turn) and returns its report.
pub async fn run(target: &Target, shape: &LoadShape, models: &[ModelFacts]) -> Result<Report> {
    if models.is_empty() {
        bail!("no model to load");
    }
    if !(shape.rate >= 0.0 && shape.rate.is_finite()) {
        bail!("--rate must be >= 0, got {}", shape.rate);
    }
    let payloads = Arc::new(payloads(shape, models)?);
    let models_arc = Arc::new(models.to_vec());
    if shape.warmup > 0 {
        let warm = LoadShape {
            requests: shape.warmup,
            warmup: 0,
            rate: 0.0,
            ..shape.clone()
        };
        drive(target, &warm, &models_arc, &payloads).await;
    }
    let started = Instant::now();
    let samples = drive(target, shape, &models_arc, &payloads).await;
    let elapsed = started.elapsed();
    Ok(Report::new(
        shape,
        models.iter().map(|m| m.name.clone()).collect(),
        elapsed,
        &samples
            .iter()
            .map(|s| (s.latency, code_name(s.code)))
            .collect::<Vec<_>>(),
    ))
}

async fn drive(
    target: &Target,
    shape: &LoadShape,
    models: &Arc<Vec<ModelFacts>>,
    payloads: &Arc<Vec<Vec<Payload>>>,
) -> Vec<Sample> {
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let stop_at = start + shape.duration;
    let mut workers = Vec::new();
    for w in 0..shape.concurrency {
        let channel = target.channels[w as usize % target.channels.len()].clone();
        let (next, models, payloads) = (next.clone(), models.clone(), payloads.clone());
        let (api, total, rate, timeout) = (shape.api, shape.requests, shape.rate, shape.timeout);
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if due >= stop_at {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                }
                let now = tokio::time::Instant::now();
                if now >= stop_at {
                    break;
                }
                let m = i as usize % models.len();
                let (model, list) = (&models[m], &payloads[m]);
                let payload = &list[i as usize % list.len()];
                // A request sent before the run's end is waited for (up to --timeout, so a hung
                // server cannot keep the loop alive): cutting the in-flight ones off at the end
                // would count up to --concurrency healthy requests as errors.
                let sent = Instant::now();
                let code = match tokio::time::timeout(
                    timeout,
                    send(api, channel.clone(), model, payload, timeout, i),
                )
                .await
                {
                    Ok(code) => code,
                    Err(_) => tonic::Code::DeadlineExceeded,
                };
                samples.push(Sample {
                    latency: sent.elapsed(),
                    code,
                });
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        if let Ok(s) = w.await {
            all.extend(s);
        }
    }
    all
}

/// `slimserve load`: prints a summary, optionally writes JSON.
pub async fn load(args: &LoadArgs) -> Result<Report> {
    let shape = LoadShape {
        concurrency: args.concurrency,
        ..args.shape.clone()
    };
    let target = Target::connect(&shape.addr, shape.connections).await?;
    let models = target.resolve(&args.model)?;
    let report = run(&target, &shape, &models).await?;
    if let Some(path) = &args.json {
        crate::formats::model_dir::write_atomic(path, &serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    Ok(report)
}

/// Counts by status name, for reports.
pub fn count_codes<'a>(codes: impl Iterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in codes {
        *m.entry(c.to_string()).or_insert(0) += 1;
    }
    m
}
