//! KServe v2 / Triton gRPC (`inference.GRPCInferenceService`), as tritonclient and
//! perf_analyzer use it.
//!
//! Each model has one output, `logits` (FP32 `[-1, C]`, answered in `raw_output_contents`),
//! and takes one of two inputs per request: `input`, FP32 NCHW `[-1, 3, S, S]` already
//! preprocessed, or `image`, UINT8 NHWC `[-1, S, S, 3]` RGB pixels that the server scales and
//! normalises. Every item of the request's batch dimension is queued on its own, so it shares
//! forward passes with other clients' requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::input::{self, Layout};
use super::pb::inference as pb;
use super::{deadline_of, finish};
use crate::error::Error;
use crate::server::shadow::Submitted;
use crate::server::{ServedModel, State};

pub const INPUT_NCHW: &str = "input";
pub const INPUT_IMAGE: &str = "image";
pub const OUTPUT_LOGITS: &str = "logits";
const PLATFORM: &str = "slimserve_candle";

#[derive(Debug, Clone)]
pub struct KServeService {
    state: Arc<State>,
}

impl KServeService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    fn model(&self, name: &str, version: &str) -> Result<&Arc<ServedModel>, Error> {
        let models = self.state.models().ok_or(Error::Starting)?;
        if name.is_empty() {
            return Err(Error::invalid("the request names no model"));
        }
        let model = models.get(name)?;
        model.check_version(version)?;
        Ok(model)
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

async fn infer(
    model: Arc<ServedModel>,
    mut req: pb::ModelInferRequest,
    deadline: Option<tokio::time::Instant>,
) -> Result<pb::ModelInferResponse, Error> {
    model.check_version(&req.model_version)?;
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
                out.name, model.name
            )));
        }
    }
    let tensor = &req.inputs[0];
    let layout = layout_of(&tensor.name).ok_or_else(|| {
        Error::invalid(format!(
            "unknown input `{}`: model `{}` takes `{INPUT_NCHW}` (FP32 [-1, 3, S, S]) or `{INPUT_IMAGE}` (UINT8 [-1, S, S, 3])",
            tensor.name, model.name
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
    let shape = tensor.shape.clone();
    let what = format!("input `{}`", tensor.name);
    let max_batch = model.max_batch_size();
    let n = match shape.first() {
        Some(&n) if shape.len() == 4 && n >= 1 && n as usize <= max_batch => n as usize,
        _ => 1,
    };
    // Admit before converting, so the in-flight limit also bounds conversion memory.
    let mut ticket = model.batcher.admit(n)?;
    let data = input_bytes(&mut req, layout)?;
    let m = model.clone();
    let (items, preprocess) =
        input::blocking(move || input::tensor(&what, layout, &shape, &data, &m, true, max_batch))
            .await?;
    model
        .metrics
        .preprocess_duration
        .record(preprocess.as_secs_f64());
    let mut pending: Vec<Submitted> = Vec::with_capacity(items.len());
    for item in items {
        let one = ticket
            .split_one()
            .ok_or_else(|| Error::Internal("admission ticket too small".into()))?;
        pending.push(model.submit(one, item, deadline)?);
    }
    let classes = model.num_classes();
    let mut raw = Vec::with_capacity(pending.len() * classes * 4);
    for p in pending {
        for v in p.wait().await?.logits {
            raw.extend_from_slice(&v.to_le_bytes());
        }
    }
    let batch = (raw.len() / (classes * 4)) as i64;
    Ok(pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.clone(),
        id: req.id,
        parameters: Default::default(),
        outputs: vec![pb::model_infer_response::InferOutputTensor {
            name: OUTPUT_LOGITS.into(),
            datatype: "FP32".into(),
            shape: vec![batch, classes as i64],
            parameters: Default::default(),
            contents: None,
        }],
        raw_output_contents: vec![raw.into()],
    })
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
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let req = request.into_inner();
        let ready = self.state.is_ready() && self.model(&req.name, &req.version).is_ok();
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
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec![m.version.clone()],
            platform: PLATFORM.into(),
            inputs: vec![
                tensor_meta(INPUT_NCHW, Layout::Nchw, s),
                tensor_meta(INPUT_IMAGE, Layout::Nhwc, s),
            ],
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
        let req = request.into_inner();
        let admitted = self
            .state
            .begin()
            .and_then(|(guard, models)| Ok((guard, models.get(&req.model_name)?.clone())));
        let (_guard, model) = match admitted {
            Ok(ok) => ok,
            Err(e) => return finish("ModelInfer", started, None, Err(e)),
        };
        let result = infer(model.clone(), req, deadline).await;
        finish("ModelInfer", started, Some(&model), result).map(Response::new)
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let req = request.into_inner();
        let m = self.model(&req.name, &req.version)?;
        let s = m.input_size() as i64;
        let batching = m.batcher.config();
        let config = pb::ModelConfig {
            name: m.name.clone(),
            platform: PLATFORM.into(),
            backend: "slimserve".into(),
            max_batch_size: batching.max_batch_size as i32,
            input: vec![
                pb::ModelInput {
                    name: INPUT_NCHW.into(),
                    data_type: pb::DataType::TypeFp32 as i32,
                    format: pb::model_input::Format::Nchw as i32,
                    dims: vec![3, s, s],
                    optional: false,
                },
                pb::ModelInput {
                    name: INPUT_IMAGE.into(),
                    data_type: pb::DataType::TypeUint8 as i32,
                    format: pb::model_input::Format::Nhwc as i32,
                    dims: vec![s, s, 3],
                    optional: true,
                },
            ],
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
        let models = self.state.models().ok_or(Error::Starting)?;
        let selected: Vec<&Arc<ServedModel>> = if req.name.is_empty() {
            models.iter().collect()
        } else {
            vec![self.model(&req.name, &req.version)?]
        };
        let model_stats = selected
            .into_iter()
            .map(|m| {
                let st = &m.stats;
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
                        compute_input: Some(pb::StatisticDuration::default()),
                        compute_infer: duration(&st.compute_infer),
                        compute_output: Some(pb::StatisticDuration::default()),
                    }),
                    batch_stats: Vec::new(),
                }
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }
}
