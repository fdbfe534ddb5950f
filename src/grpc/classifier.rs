//! `slimserve.v1.Classifier`: classify encoded images or raw tensors, singly, in batches, or
//! over a bidirectional stream; list the models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::input::{self, Layout};
use super::pb::slimserve::v1 as pb;
use super::{deadline_of, finish};
use crate::backend::{softmax, top_k};
use crate::batcher::Inference;
use crate::error::Error;
use crate::server::shadow::Submitted;
use crate::server::{ServedModel, State};

/// Ranked labels returned when a request leaves `top_k` at 0.
pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Clone)]
pub struct ClassifierService {
    state: Arc<State>,
}

impl ClassifierService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// A request resolved to its model, validated and preprocessed, ready to queue.
struct Prepared {
    model: Arc<ServedModel>,
    top_k: usize,
    id: String,
    include_logits: bool,
    input: Vec<f32>,
    preprocess: Duration,
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

/// Validates and preprocesses one request (decode on the blocking pool).
async fn prepare(
    max_pixels: u64,
    model: Arc<ServedModel>,
    req: pb::ClassifyRequest,
) -> Result<Prepared, Error> {
    let top_k = check_top_k(req.top_k, &model)?;
    let m = model.clone();
    let (input, preprocess) = match req.input {
        None => {
            return Err(Error::invalid(
                "the request has no input: set `image` (encoded bytes) or `tensor`",
            ))
        }
        Some(pb::classify_request::Input::Image(bytes)) => {
            input::blocking(move || input::image(&bytes, &m, max_pixels)).await?
        }
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
            input::blocking(move || {
                input::tensor("tensor", layout, &t.shape, &t.data, &m, false, 1)
                    .map(|mut items| items.remove(0))
            })
            .await?
        }
    };
    model
        .metrics
        .preprocess_duration
        .record(preprocess.as_secs_f64());
    Ok(Prepared {
        model,
        top_k,
        id: req.id,
        include_logits: req.include_logits,
        input,
        preprocess,
    })
}

fn respond(p: &Prepared, inference: Inference) -> pb::ClassifyResponse {
    let model = &p.model;
    let probs = softmax(&inference.logits);
    let predictions = top_k(&probs, p.top_k)
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
            preprocess_us: p.preprocess.as_micros() as u64,
            queue_us: inference.queue.as_micros() as u64,
            compute_us: inference.compute.as_micros() as u64,
            batch_size: inference.batch_size as u32,
        }),
        id: p.id.clone(),
        logits: if p.include_logits {
            inference.logits
        } else {
            Vec::new()
        },
    }
}

/// One request end to end; returns the model it resolved to (for metrics) and the answer.
async fn classify_one(
    state: &State,
    req: pb::ClassifyRequest,
    deadline: Option<tokio::time::Instant>,
) -> (
    Option<Arc<ServedModel>>,
    Result<pb::ClassifyResponse, Error>,
) {
    let (_guard, models) = match state.begin() {
        Ok(admitted) => admitted,
        Err(e) => return (None, Err(e)),
    };
    let model = match models.get(&req.model) {
        Ok(m) => m.clone(),
        Err(e) => return (None, Err(e)),
    };
    let result = async {
        // Admit before decoding so the in-flight limit also bounds decoded-image memory.
        let ticket = model.batcher.admit(1)?;
        let mut prepared = prepare(state.max_image_pixels, model.clone(), req).await?;
        let input = std::mem::take(&mut prepared.input);
        let pending = model.submit(ticket, input, deadline)?;
        Ok(respond(&prepared, pending.wait().await?))
    }
    .await;
    (Some(model), result)
}

/// Every item of a batch request, preprocessed in parallel and queued together.
async fn classify_batch(
    state: &State,
    requests: Vec<pb::ClassifyRequest>,
    deadline: Option<tokio::time::Instant>,
) -> (
    Option<Arc<ServedModel>>,
    Result<pb::ClassifyBatchResponse, Error>,
) {
    let (_guard, models) = match state.begin() {
        Ok(admitted) => admitted,
        Err(e) => return (None, Err(e)),
    };
    let item = |index: usize| {
        move |e: Error| Error::Item {
            index,
            source: Box::new(e),
        }
    };
    let mut resolved = Vec::with_capacity(requests.len());
    for (i, req) in requests.into_iter().enumerate() {
        match models.get(&req.model) {
            Ok(m) => resolved.push((m.clone(), req)),
            Err(e) => return (None, Err(item(i)(e))),
        }
    }
    let first = resolved.first().map(|(m, _)| m.clone());
    let result = async {
        if resolved.is_empty() {
            return Err(Error::invalid("`requests` is empty"));
        }
        let mut tickets = Vec::with_capacity(resolved.len());
        for (i, (model, _)) in resolved.iter().enumerate() {
            tickets.push(model.batcher.admit(1).map_err(item(i))?);
        }
        let tasks: Vec<_> = resolved
            .into_iter()
            .map(|(model, req)| tokio::spawn(prepare(state.max_image_pixels, model, req)))
            .collect();
        let mut prepared = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.into_iter().enumerate() {
            let p = task
                .await
                .map_err(|e| Error::Internal(format!("preprocessing failed: {e}")))
                .and_then(|r| r)
                .map_err(item(i))?;
            prepared.push(p);
        }
        let mut pending: Vec<Submitted> = Vec::with_capacity(prepared.len());
        for (i, (p, ticket)) in prepared.iter_mut().zip(tickets).enumerate() {
            let input = std::mem::take(&mut p.input);
            pending.push(p.model.submit(ticket, input, deadline).map_err(item(i))?);
        }
        let mut responses = Vec::with_capacity(pending.len());
        for (i, (p, pend)) in prepared.iter().zip(pending).enumerate() {
            responses.push(respond(p, pend.wait().await.map_err(item(i))?));
        }
        Ok(pb::ClassifyBatchResponse { responses })
    }
    .await;
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
        let (model, result) = classify_one(&self.state, request.into_inner(), deadline).await;
        finish("Classify", started, model.as_deref(), result).map(Response::new)
    }

    async fn classify_batch(
        &self,
        request: Request<pb::ClassifyBatchRequest>,
    ) -> Result<Response<pb::ClassifyBatchResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let requests = request.into_inner().requests;
        let (model, result) = classify_batch(&self.state, requests, deadline).await;
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
        let state = self.state.clone();
        tokio::spawn(async move {
            let drain = state.drain.clone();
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
                        let status = super::status::oversize(status, state.max_message_bytes);
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let (tx, state) = (tx.clone(), state.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    let id = req.id.clone();
                    let (model, result) = classify_one(&state, req, deadline).await;
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
        let models = self.state.models().ok_or(Error::Starting)?;
        let default = models.default_name().unwrap_or_default().to_string();
        let infos = models
            .iter()
            .map(|m| {
                let s = m.input_size() as i64;
                pb::ModelInfo {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    architecture: m.config.spec.arch.to_string(),
                    parameters: m.parameters,
                    file_bytes: m.file_bytes,
                    weight_format: m.config.weights.format.to_string(),
                    input_shape: vec![3, s, s],
                    labels: m.config.labels.clone(),
                    val_accuracy: m.config.provenance.val_accuracy,
                    macs: m.macs,
                    is_default: m.name == default,
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse {
            models: infos,
            default_model: default,
        }))
    }
}
