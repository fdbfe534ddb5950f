//! The request pipeline below the gRPC layer, written once for both APIs:
//!
//! ```text
//! admission (draining? model, version, in-flight limit)
//!   -> preprocess (images: decode + resize on the decoding pool; tensors: validate in place)
//!   -> submit (the model's queue on the shared scheduler)
//!   -> wait (answers, deadline)
//!   -> shadow mirroring of sampled inputs, off the critical path
//! ```
//!
//! The APIs only translate their messages into a [`Request`] and the [`Response`] back.

mod decode;
pub mod drain;
pub mod input;
pub mod models;
pub mod repository;
pub mod shadow;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;

pub use decode::DecodePool;
pub use drain::{Drain, RequestGuard};
pub use input::{Layout, RawTensor};
pub use models::{Int8Engine, LoadError, LoadOptions, Models, ServedModel};
pub use repository::{ModelControl, Repository};
pub use shadow::ShadowRule;

use crate::error::Error;
use crate::scheduler::{Inference, Input};

/// What a request asks to classify.
#[derive(Debug, Clone)]
pub enum Payload {
    /// An encoded image (JPEG, PNG, WebP, BMP, GIF).
    Image(Bytes),
    Tensor(RawTensor),
}

/// One request, whichever API it came from.
#[derive(Debug, Clone)]
pub struct Request {
    /// Model name; empty = the default model.
    pub model: String,
    /// Empty = whatever version is served.
    pub version: String,
    pub payload: Payload,
    /// Answer `DEADLINE_EXCEEDED` instead of computing once this passes.
    pub deadline: Option<Instant>,
}

/// The answers for every item of a request, in order.
#[derive(Debug)]
pub struct Response {
    pub outputs: Vec<Inference>,
    /// Decoding and resizing, or tensor validation, for the whole request.
    pub preprocess: Duration,
}

/// Limits applied before any work is done.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Decoded images over this many pixels are refused from their header.
    pub max_image_pixels: u64,
    pub max_message_bytes: usize,
}

/// What every RPC handler shares.
#[derive(Debug)]
pub struct Pipeline {
    /// Set once, when the start-up models are loaded and warmed up.
    repository: OnceLock<Arc<Repository>>,
    pub drain: Drain,
    pub limits: Limits,
    /// Bounded and below compute's priority, so decoding never starves inference.
    decoder: DecodePool,
}

impl Pipeline {
    pub fn new(limits: Limits, decode_threads: usize) -> std::io::Result<Self> {
        Ok(Self {
            repository: OnceLock::new(),
            drain: Drain::default(),
            limits,
            decoder: DecodePool::new(decode_threads)?,
        })
    }

    /// Publishes the repository with its start-up models loaded (once); requests are
    /// answered from then on.
    pub fn set_repository(&self, repository: Arc<Repository>) {
        if self.repository.set(repository).is_err() {
            panic!("the repository is set once");
        }
    }

    /// The repository, once its start-up models are loaded.
    pub fn repository(&self) -> Result<&Arc<Repository>, Error> {
        self.repository.get().ok_or(Error::Starting)
    }

    /// The served model versions now (for metadata calls that need no drain guard).
    pub fn models(&self) -> Result<Arc<Models>, Error> {
        Ok(self.repository()?.snapshot())
    }

    pub fn is_ready(&self) -> bool {
        self.repository.get().is_some() && !self.drain.is_draining()
    }

    pub fn decode_threads(&self) -> usize {
        self.decoder.threads()
    }

    /// Runs one request end to end. Returns the model it resolved to (for request metrics)
    /// with the answer.
    pub async fn infer(
        self: &Arc<Self>,
        req: Request,
    ) -> (Option<Arc<ServedModel>>, Result<Response, Error>) {
        let _guard = match self.drain.begin() {
            Ok(g) => g,
            Err(e) => return (None, Err(e)),
        };
        // The version resolved now is held until answered, whatever is published meanwhile.
        let model = match self
            .models()
            .and_then(|m| m.get_version(&req.model, &req.version).cloned())
        {
            Ok(m) => m,
            Err(e) => return (None, Err(e)),
        };
        let result = self.run(&model, req).await;
        (Some(model), result)
    }

    async fn run(
        self: &Arc<Self>,
        model: &Arc<ServedModel>,
        req: Request,
    ) -> Result<Response, Error> {
        let max_batch = model.max_batch_size();
        let claimed = match &req.payload {
            Payload::Image(_) => 1,
            Payload::Tensor(t) => t.claimed_items(max_batch),
        };
        // Admit before decoding, so the in-flight limit also bounds decoded-image memory.
        let mut ticket = model.queue.admit(claimed)?;
        let started = Instant::now();
        let inputs = match req.payload {
            Payload::Image(bytes) => {
                let m = model.clone();
                let max_pixels = self.limits.max_image_pixels;
                // Timed on the decoding thread: the histogram shows the work, not the wait.
                let (image, work) = self
                    .decoder
                    .run(move || {
                        let t = Instant::now();
                        (
                            input::image(&bytes, &m.config.preprocessing, max_pixels),
                            t.elapsed(),
                        )
                    })
                    .await
                    .map_err(|panic| Error::Internal(format!("decoding panicked: {panic}")))?;
                model.metrics.preprocess_image.record(work.as_secs_f64());
                vec![image?]
            }
            Payload::Tensor(t) => {
                let inputs = input::tensor(&t, &model.name, model.input_size(), max_batch)?;
                let per_input = started.elapsed().as_secs_f64() / inputs.len() as f64;
                model.metrics.preprocess_tensor.record(per_input);
                inputs
            }
        };
        let preprocess = started.elapsed();
        let models = self.models()?;
        let shadow = models.shadow(&model.name);
        let mut pending = Vec::with_capacity(inputs.len());
        for input in inputs {
            let one = ticket
                .split_one()
                .ok_or_else(|| Error::Internal("admission ticket too small".into()))?;
            let mirror = shadow.filter(|s| s.sampled()).map(|_| input.clone());
            pending.push((model.queue.submit(one, input, req.deadline)?, mirror));
        }
        let mut outputs = Vec::with_capacity(pending.len());
        for (p, mirror) in pending {
            let answer = p.wait().await?;
            if let Some(input) = mirror {
                self.mirror(&model.name, input, answer.logits.clone());
            }
            outputs.push(answer);
        }
        Ok(Response {
            outputs,
            preprocess,
        })
    }

    /// Sends a sampled input to `source`'s shadow model in the background.
    fn mirror(self: &Arc<Self>, source: &str, input: Input, logits: Vec<f32>) {
        let pipeline = self.clone();
        let source = source.to_string();
        tokio::spawn(async move {
            let Ok(models) = pipeline.models() else {
                return;
            };
            let Some(shadow) = models.shadow(&source) else {
                return;
            };
            if let (Ok(source), Ok(target)) = (models.get(&source), models.get(&shadow.target)) {
                shadow
                    .compare(target, input, source.input_size(), logits)
                    .await;
            }
        });
    }
}
