//! KServe v2 / Triton gRPC (`inference.GRPCInferenceService`), as tritonclient and
//! perf_analyzer use it.
//!
//! Each model has one output, `logits` (FP32 `[-1, C]`, answered in `raw_output_contents`),
//! and takes one of two inputs per request: `input`, FP32 NCHW `[-1, 3, S, S]` already
//! preprocessed, or `image`, UINT8 NHWC `[-1, S, S, 3]` RGB pixels that the server scales and
//! normalises. ModelMetadata and ModelConfig declare one of them (`--kserve-input`, default
//! `image`), because perf_analyzer sends every declared input (and its random FP32 data holds
//! NaNs, which are refused, while random UINT8 data are valid pixels); ModelInfer accepts
//! either.
//! Every item of the request's batch dimension is queued on its own, so it shares forward
//! passes with other clients' requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::pb::inference as pb;
use super::{deadline_of, finish};
use crate::error::Error;
use crate::pipeline::{self, Layout, Payload, Pipeline, RawTensor, Repository, ServedModel};

pub const INPUT_NCHW: &str = "input";
pub const INPUT_IMAGE: &str = "image";
pub const OUTPUT_LOGITS: &str = "logits";
const PLATFORM: &str = "slimserve_candle";

/// The input ModelMetadata and ModelConfig declare (`--kserve-input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KServeInput {
    /// `input`: FP32 `[-1, 3, S, S]`, preprocessed.
    Input,
    /// `image`: UINT8 `[-1, S, S, 3]` RGB pixels.
    #[default]
    Image,
}

impl KServeInput {
    fn layout(self) -> Layout {
        match self {
            KServeInput::Input => Layout::Nchw,
            KServeInput::Image => Layout::Nhwc,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KServeInput::Input => INPUT_NCHW,
            KServeInput::Image => INPUT_IMAGE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KServeService {
    pipeline: Arc<Pipeline>,
    declared: KServeInput,
}

impl KServeService {
    pub fn new(pipeline: Arc<Pipeline>, declared: KServeInput) -> Self {
        Self { pipeline, declared }
    }

    fn model(&self, name: &str, version: &str) -> Result<Arc<ServedModel>, Error> {
        let models = self.pipeline.models()?;
        if name.is_empty() {
            return Err(Error::invalid("the request names no model"));
        }
        models.get_version(name, version).cloned()
    }

    /// Runs a repository operation off the runtime (loading compiles and warms up models).
    async fn repository_op(
        &self,
        op: impl FnOnce(&Repository) -> Result<(), Error> + Send + 'static,
    ) -> Result<(), Error> {
        let repo = self.pipeline.repository()?.clone();
        tokio::task::spawn_blocking(move || op(&repo))
            .await
            .map_err(|e| Error::Internal(format!("repository operation panicked: {e}")))?
    }
}

/// Repository load/unload parameters: none is supported but `unload_dependents` (no
/// ensembles here, so it changes nothing); others are refused rather than ignored.
fn check_parameters(
    parameters: &std::collections::HashMap<String, pb::ModelRepositoryParameter>,
    allowed: &[&str],
) -> Result<(), Error> {
    match parameters.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(Error::invalid(format!(
            "parameter `{key}` is not supported (config overrides and model files are read from the repository)"
        ))),
        None => Ok(()),
    }
}

fn check_repository(name: &str) -> Result<(), Error> {
    if name.is_empty() || name == "models" {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "unknown repository `{name}`: this server has one (--models); leave repository_name empty"
        )))
    }
}

fn tensor_meta(
    name: &str,
    layout: Layout,
    s: usize,
) -> pb::model_metadata_response::TensorMetadata {
    let mut shape = vec![-1];
    shape.extend(layout.item_dims(s));
    pb::model_metadata_response::TensorMetadata {
        name: name.into(),
        datatype: layout.datatype().into(),
        shape,
    }
}

fn layout_of(name: &str) -> Option<Layout> {
    match name {
        INPUT_NCHW => Some(Layout::Nchw),
        INPUT_IMAGE => Some(Layout::Nhwc),
        _ => None,
    }
}

/// The raw bytes of the request's single input, from `raw_input_contents` or typed contents.
fn input_bytes(
    req: &mut pb::ModelInferRequest,
    layout: Layout,
) -> Result<prost::bytes::Bytes, Error> {
    let tensor = &req.inputs[0];
    if !req.raw_input_contents.is_empty() {
        if req.raw_input_contents.len() != req.inputs.len() {
            return Err(Error::invalid(format!(
                "{} raw_input_contents entries for {} inputs",
                req.raw_input_contents.len(),
                req.inputs.len()
            )));
        }
        if tensor.contents.is_some() {
            return Err(Error::invalid(
                "input has both `contents` and raw_input_contents; send one",
            ));
        }
        return Ok(std::mem::take(&mut req.raw_input_contents[0]));
    }
    let Some(contents) = &tensor.contents else {
        return Err(Error::invalid(format!(
            "input `{}` has no data: send raw_input_contents (or contents)",
            tensor.name
        )));
    };
    Ok(match layout {
        Layout::Nchw => contents
            .fp32_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        Layout::Nhwc => contents
            .uint_contents
            .iter()
            .map(|&v| {
                u8::try_from(v).map_err(|_| {
                    Error::invalid(format!("input `image` has value {v}, over UINT8's 255"))
                })
            })
            .collect::<Result<Vec<u8>, Error>>()?
            .into(),
    })
}

/// Checks the request's one input and output names and returns it as the pipeline's.
pub(super) fn to_request(
    mut req: pb::ModelInferRequest,
    deadline: Option<Instant>,
) -> Result<(pipeline::Request, String), Error> {
    if req.inputs.len() != 1 {
        let names: Vec<String> = req.inputs.iter().map(|t| format!("`{}`", t.name)).collect();
        return Err(Error::invalid(format!(
            "send exactly one input, `{INPUT_NCHW}` (FP32 NCHW) or `{INPUT_IMAGE}` (UINT8 NHWC); got {} ({})",
            req.inputs.len(),
            names.join(", ")
        )));
    }
    for out in &req.outputs {
        if out.name != OUTPUT_LOGITS {
            return Err(Error::invalid(format!(
                "unknown output `{}`: model `{}` has one output, `{OUTPUT_LOGITS}`",
                out.name, req.model_name
            )));
        }
        // Answering FP32 logits where the client asked for classification strings would be
        // decoded wrongly on its side.
        if out.parameters.contains_key("classification") {
            return Err(Error::invalid(format!(
                "output `{OUTPUT_LOGITS}`: the classification extension (class_count) is not supported; \
                 ask for the logits and take their top k, or use slimserve.v1.Classifier/Classify (top_k, labels)"
            )));
        }
    }
    let tensor = &req.inputs[0];
    let layout = layout_of(&tensor.name).ok_or_else(|| {
        Error::invalid(format!(
            "unknown input `{}`: model `{}` takes `{INPUT_NCHW}` (FP32 [-1, 3, S, S]) or `{INPUT_IMAGE}` (UINT8 [-1, S, S, 3])",
            tensor.name, req.model_name
        ))
    })?;
    if tensor.datatype != layout.datatype() {
        return Err(Error::invalid(format!(
            "input `{}` has datatype {}, expected {}",
            tensor.name,
            if tensor.datatype.is_empty() {
                "(none)"
            } else {
                &tensor.datatype
            },
            layout.datatype()
        )));
    }
    let what = format!("input `{}`", tensor.name);
    let shape = tensor.shape.clone();
    let data = input_bytes(&mut req, layout)?;
    Ok((
        pipeline::Request {
            model: req.model_name,
            version: req.model_version,
            payload: Payload::Tensor(RawTensor {
                what,
                layout,
                shape,
                data,
                batched: true,
            }),
            deadline,
        },
        req.id,
    ))
}

fn respond(model: &ServedModel, id: String, answer: pipeline::Response) -> pb::ModelInferResponse {
    let classes = model.num_classes();
    let mut raw = Vec::with_capacity(answer.outputs.len() * classes * 4);
    for out in &answer.outputs {
        for v in &out.logits {
            raw.extend_from_slice(&v.to_le_bytes());
        }
    }
    pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.clone(),
        id,
        parameters: Default::default(),
        outputs: vec![pb::model_infer_response::InferOutputTensor {
            name: OUTPUT_LOGITS.into(),
            datatype: "FP32".into(),
            shape: vec![answer.outputs.len() as i64, classes as i64],
            parameters: Default::default(),
            contents: None,
        }],
        raw_output_contents: vec![raw.into()],
    }
}

fn duration(stat: &crate::telemetry::DurationStat) -> Option<pb::StatisticDuration> {
    let (count, ns) = stat.get();
    Some(pb::StatisticDuration { count, ns })
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for KServeService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.pipeline.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let req = request.into_inner();
        let ready = self.pipeline.is_ready() && self.model(&req.name, &req.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "slimserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_configuration".into(), "statistics".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let req = request.into_inner();
        let m = self.model(&req.name, &req.version)?;
        let s = m.input_size();
        let versions = self
            .pipeline
            .models()?
            .versions(&m.name)
            .map(|v| v.keys().map(u64::to_string).collect())
            .unwrap_or_else(|_| vec![m.version.clone()]);
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions,
            platform: PLATFORM.into(),
            inputs: vec![tensor_meta(self.declared.name(), self.declared.layout(), s)],
            outputs: vec![pb::model_metadata_response::TensorMetadata {
                name: OUTPUT_LOGITS.into(),
                datatype: "FP32".into(),
                shape: vec![-1, m.num_classes() as i64],
            }],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline_of(&request);
        let (req, id) = match to_request(request.into_inner(), deadline) {
            Ok(r) => r,
            Err(e) => return finish("ModelInfer", started, None, Err(e)),
        };
        let (model, result) = self.pipeline.infer(req).await;
        let result = match (&model, result) {
            (Some(m), Ok(answer)) => Ok(respond(m, id, answer)),
            (_, Err(e)) => Err(e),
            (None, Ok(_)) => Err(Error::Internal("answer without a model".into())),
        };
        finish("ModelInfer", started, model.as_deref(), result).map(Response::new)
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let req = request.into_inner();
        let m = self.model(&req.name, &req.version)?;
        let s = m.input_size() as i64;
        let batching = m.queue.config();
        let config = pb::ModelConfig {
            name: m.name.clone(),
            platform: PLATFORM.into(),
            backend: "slimserve".into(),
            max_batch_size: batching.max_batch_size as i32,
            input: vec![match self.declared {
                KServeInput::Input => pb::ModelInput {
                    name: INPUT_NCHW.into(),
                    data_type: pb::DataType::TypeFp32 as i32,
                    format: pb::model_input::Format::Nchw as i32,
                    dims: vec![3, s, s],
                    optional: false,
                },
                KServeInput::Image => pb::ModelInput {
                    name: INPUT_IMAGE.into(),
                    data_type: pb::DataType::TypeUint8 as i32,
                    format: pb::model_input::Format::Nhwc as i32,
                    dims: vec![s, s, 3],
                    optional: false,
                },
            }],
            output: vec![pb::ModelOutput {
                name: OUTPUT_LOGITS.into(),
                data_type: pb::DataType::TypeFp32 as i32,
                dims: vec![m.num_classes() as i64],
            }],
            scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(
                pb::ModelDynamicBatching {
                    preferred_batch_size: vec![batching.max_batch_size as i32],
                    max_queue_delay_microseconds: batching.max_batch_delay.as_micros() as u64,
                },
            )),
        };
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let req = request.into_inner();
        let models = self.pipeline.models()?;
        let selected: Vec<Arc<ServedModel>> = match (req.name.is_empty(), req.version.is_empty()) {
            (true, _) => models.iter().cloned().collect(),
            // Triton: a model without a version gives every version's statistics.
            (false, true) => {
                self.model(&req.name, "")?;
                models.versions(&req.name)?.values().cloned().collect()
            }
            (false, false) => vec![self.model(&req.name, &req.version)?],
        };
        let model_stats = selected
            .into_iter()
            .map(|m| {
                let st = &m.stats;
                let c = st.compute();
                let stage = |ns: u64| Some(pb::StatisticDuration { count: c.count, ns });
                pb::ModelStatistics {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    last_inference: st.last_inference_ms.load(Ordering::Relaxed),
                    inference_count: st.inference_count.load(Ordering::Relaxed),
                    execution_count: st.execution_count.load(Ordering::Relaxed),
                    inference_stats: Some(pb::InferStatistics {
                        success: duration(&st.success),
                        fail: duration(&st.fail),
                        queue: duration(&st.queue),
                        compute_input: stage(c.input_ns),
                        compute_infer: stage(c.infer_ns),
                        compute_output: stage(c.output_ns),
                    }),
                    batch_stats: Vec::new(),
                }
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let req = request.into_inner();
        check_repository(&req.repository_name)?;
        let models = self
            .pipeline
            .repository()?
            .index(req.ready)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.map(|v| v.to_string()).unwrap_or_default(),
                state: e.state.name().into(),
                reason: e.state.reason().into(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let req = request.into_inner();
        check_repository(&req.repository_name)?;
        check_parameters(&req.parameters, &[])?;
        let name = req.model_name;
        self.repository_op(move |repo| repo.load(&name)).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let req = request.into_inner();
        check_repository(&req.repository_name)?;
        check_parameters(&req.parameters, &["unload_dependents"])?;
        let name = req.model_name;
        self.repository_op(move |repo| repo.unload(&name)).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}
