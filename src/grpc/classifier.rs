//! `slimserve.v1.Classifier`: classify encoded images or raw tensors, singly, in batches, or
//! over a bidirectional stream; list the models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::pb::slimserve::v1 as pb;
use super::{deadline_of, finish};
use crate::backend::{softmax, top_k as top_k_indices};
use crate::error::Error;
use crate::pipeline::{self, Layout, Payload, Pipeline, RawTensor, ServedModel};
use crate::scheduler::Inference;

/// Ranked labels returned when a request leaves `top_k` at 0.
pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Clone)]
pub struct ClassifierService {
    pipeline: Arc<Pipeline>,
}

impl ClassifierService {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

fn check_top_k(requested: u32, model: &ServedModel) -> Result<usize, Error> {
    let classes = model.num_classes();
    match requested as usize {
        0 => Ok(DEFAULT_TOP_K.min(classes)),
        k if k <= classes => Ok(k),
        _ => Err(Error::TopK {
            top_k: requested,
            model: model.name.clone(),
            classes,
        }),
    }
}

/// The own API's request as the pipeline's.
pub(super) fn to_request(
    req: pb::ClassifyRequest,
    deadline: Option<Instant>,
) -> Result<pipeline::Request, Error> {
    let payload = match req.input {
        None => {
            return Err(Error::invalid(
                "the request has no input: set `image` (encoded bytes) or `tensor`",
            ))
        }
        Some(pb::classify_request::Input::Image(bytes)) => Payload::Image(bytes),
        Some(pb::classify_request::Input::Tensor(t)) => {
            let layout = match pb::DataType::try_from(t.dtype) {
                Ok(pb::DataType::Float32) => Layout::Nchw,
                Ok(pb::DataType::Uint8) => Layout::Nhwc,
                _ => {
                    return Err(Error::invalid(format!(
                        "tensor dtype {} is not supported: use FLOAT32 (CHW, preprocessed) or UINT8 (HWC pixels)",
                        pb::DataType::try_from(t.dtype)
                            .map(|d| d.as_str_name().to_string())
                            .unwrap_or_else(|_| t.dtype.to_string())
                    )))
                }
            };
            Payload::Tensor(RawTensor {
                what: "tensor".into(),
                layout,
                shape: t.shape,
                data: t.data,
                batched: false,
            })
        }
    };
    Ok(pipeline::Request {
        model: req.model,
        version: req.model_version,
        payload,
        deadline,
    })
}

fn respond(
    model: &ServedModel,
    id: String,
    top_k: usize,
    include_logits: bool,
    preprocess: Duration,
    inference: Inference,
) -> pb::ClassifyResponse {
    let probs = softmax(&inference.logits);
    let predictions = top_k_indices(&probs, top_k)
        .into_iter()
        .map(|i| pb::Prediction {
            index: i as u32,
            label: model.config.labels[i].clone(),
            probability: probs[i],
            logit: inference.logits[i],
        })
        .collect();
    pb::ClassifyResponse {
        model: model.name.clone(),
        model_version: model.version.clone(),
        predictions,
        timings: Some(pb::Timings {
            preprocess_us: preprocess.as_micros() as u64,
            queue_us: inference.queue.as_micros() as u64,
            compute_us: inference.compute.as_micros() as u64,
            batch_size: inference.batch_size as u32,
        }),
        id,
        logits: if include_logits {
            inference.logits
        } else {
            Vec::new()
        },
    }
}

/// One request end to end; returns the model it resolved to (for metrics) and the answer.
async fn classify_one(
    pipeline: &Arc<Pipeline>,
    req: pb::ClassifyRequest,
    deadline: Option<Instant>,
) -> (
    Option<Arc<ServedModel>>,
    Result<pb::ClassifyResponse, Error>,
) {
    // top_k is checked against the model before anything is decoded or computed.
    let top_k = match pipeline.models().and_then(|m| {
        m.get_version(&req.model, &req.model_version)
            .and_then(|m| check_top_k(req.top_k, m))
    }) {
        Ok(k) => k,
        Err(e) => return (None, Err(e)),
    };
    let (id, include_logits) = (req.id.clone(), req.include_logits);
    let request = match to_request(req, deadline) {
        Ok(r) => r,
        Err(e) => return (None, Err(e)),
    };
    let (model, result) = pipeline.infer(request).await;
    let answer = match (&model, result) {
        (Some(m), Ok(mut r)) => match r.outputs.pop() {
            Some(inference) => Ok(respond(
                m,
                id,
                top_k,
                include_logits,
                r.preprocess,
                inference,
            )),
            None => Err(Error::Internal("no answer for the input".into())),
        },
        (_, Err(e)) => Err(e),
        (None, Ok(_)) => Err(Error::Internal("answer without a model".into())),
    };
    (model, answer)
}

/// Every item of a batch request, run concurrently; the first failing item fails the batch
/// (with its index).
async fn classify_batch(
    pipeline: &Arc<Pipeline>,
    requests: Vec<pb::ClassifyRequest>,
    deadline: Option<Instant>,
) -> (
    Option<Arc<ServedModel>>,
    Result<pb::ClassifyBatchResponse, Error>,
) {
    if requests.is_empty() {
        return (None, Err(Error::invalid("`requests` is empty")));
    }
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|req| {
            let pipeline = pipeline.clone();
            tokio::spawn(async move { classify_one(&pipeline, req, deadline).await })
        })
        .collect();
    let mut first = None;
    let mut responses = Vec::with_capacity(tasks.len());
    let mut failure = None;
    for (index, task) in tasks.into_iter().enumerate() {
        let (model, result) = match task.await {
            Ok(done) => done,
            Err(e) => (
                None,
                Err(Error::Internal(format!("request task failed: {e}"))),
            ),
        };
        if first.is_none() {
            first = model;
        }
        match result {
            Ok(r) => responses.push(r),
            Err(e) if failure.is_none() => {
                failure = Some(Error::Item {
                    index,
                    source: Box::new(e),
                })
            }
            Err(_) => {}
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None => Ok(pb::ClassifyBatchResponse { responses }),
    };
    (first, result)
}

#[tonic::async_trait]
impl pb::classifier_server::Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let (model, result) = classify_one(&self.pipeline, request.into_inner(), deadline).await;
        finish("Classify", started, model.as_deref(), result).map(Response::new)
    }

    async fn classify_batch(
        &self,
        request: Request<pb::ClassifyBatchRequest>,
    ) -> Result<Response<pb::ClassifyBatchResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let requests = request.into_inner().requests;
        let (model, result) = classify_batch(&self.pipeline, requests, deadline).await;
        finish("ClassifyBatch", started, model.as_deref(), result).map(Response::new)
    }

    type ClassifyStreamStream = ReceiverStream<Result<pb::ClassifyStreamResponse, Status>>;

    async fn classify_stream(
        &self,
        request: Request<Streaming<pb::ClassifyRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let deadline = deadline_of(&request);
        let mut inbound = request.into_inner();
        // Bounded: a client that stops reading stops getting its requests read.
        let (tx, rx) = mpsc::channel(64);
        let pipeline = self.pipeline.clone();
        tokio::spawn(async move {
            let drain = pipeline.drain.clone();
            loop {
                let next = tokio::select! {
                    biased;
                    _ = drain.draining() => break,
                    next = inbound.message() => next,
                };
                let req = match next {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(status) => {
                        let status =
                            super::status::oversize(status, pipeline.limits.max_message_bytes);
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let (tx, pipeline) = (tx.clone(), pipeline.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    let id = req.id.clone();
                    let (model, result) = classify_one(&pipeline, req, deadline).await;
                    let result = match finish("ClassifyStream", started, model.as_deref(), result) {
                        Ok(r) => pb::classify_stream_response::Result::Response(r),
                        Err(status) => pb::classify_stream_response::Result::Error(pb::Error {
                            code: status.code() as i32,
                            message: status.message().to_string(),
                        }),
                    };
                    let _ = tx
                        .send(Ok(pb::ClassifyStreamResponse {
                            id,
                            result: Some(result),
                        }))
                        .await;
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.pipeline.models()?;
        let default = models.default_name().unwrap_or_default().to_string();
        let infos = models
            .iter()
            .map(|m| {
                let s = m.input_size() as i64;
                pb::ModelInfo {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    weights_digest: m.digest.clone(),
                    architecture: m.config.spec.arch.to_string(),
                    parameters: m.parameters,
                    file_bytes: m.file_bytes,
                    weight_format: m.config.weights.format.to_string(),
                    input_shape: vec![3, s, s],
                    labels: m.config.labels.clone(),
                    val_accuracy: m.config.provenance.val_accuracy,
                    macs: m.macs,
                    is_default: m.name == default,
                    engine: m.engine.to_string(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse {
            models: infos,
            default_model: default,
        }))
    }
}
