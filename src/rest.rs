//! KServe v2 over HTTP/REST, Triton's port 8000 (`--http-addr`): what `perf_analyzer` (its
//! default `-i http`), `tritonclient.http` and `curl` speak.
//!
//! Every endpoint is a translation onto the gRPC KServe service ([`KServeService`]): the JSON
//! (or JSON + binary) request becomes the `ModelInferRequest` the gRPC path checks, queues and
//! answers, so both protocols share one validation, one batching queue per model, the same
//! statistics and the same errors; a gRPC status becomes its HTTP status and `{"error": ...}`.
//!
//! Endpoints (`[/versions/V]` optional): `GET /v2/health/live|ready`, `GET /v2` (server
//! metadata), `GET /v2/models/M[/versions/V]` (metadata), `.../ready`, `.../config` (Triton's
//! model configuration), `.../stats` and `GET /v2/models/stats`, `POST .../infer`, and Triton's
//! repository extension `POST /v2/repository/index`, `POST /v2/repository/models/M/load|unload`.
//!
//! Inference bodies are JSON, with tensor data as (nested) arrays of numbers, or Triton's
//! binary tensor extension: the `Inference-Header-Content-Length` header gives the JSON's
//! length, and inputs with the `binary_data_size` parameter take their bytes, in order, from
//! what follows it; outputs asked for with `"binary_data": true` (or the request parameter
//! `binary_data_output`) come back the same way.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tonic::{Code, Request, Status};

use crate::grpc::pb::inference as pb;
use crate::grpc::KServeService;
use pb::grpc_inference_service_server::GrpcInferenceService;

/// Triton's binary tensor extension: the length of the JSON that starts the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The REST edge's state: the KServe service it translates onto.
#[derive(Clone)]
struct Rest {
    kserve: KServeService,
    /// Largest request body (`--max-message-bytes`), binary; JSON bodies may be 4 times that.
    max_message_bytes: usize,
    /// Whether repository load/unload are served here (`None`), or why not.
    repository_refusal: Option<String>,
}

/// The router: every endpoint above, and a JSON 404 for the rest.
pub fn router(
    kserve: KServeService,
    max_message_bytes: usize,
    repository_refusal: Option<String>,
) -> Router {
    let state = Rest {
        kserve,
        max_message_bytes,
        repository_refusal,
    };
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/versions/{version}", get(metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/config", get(config))
        .route("/v2/models/{model}/versions/{version}/config", get(config))
        .route("/v2/models/{model}/stats", get(stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(stats))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .fallback(|uri: axum::http::Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!(
                    "no endpoint {}: this server serves KServe v2 (/v2/...)",
                    uri.path()
                ),
            )
        })
        .with_state(state)
}

/// `--http-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAddr {
    On(SocketAddr),
    Off,
}

impl std::str::FromStr for HttpAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" | "none" | "" => Ok(HttpAddr::Off),
            a => a
                .parse()
                .map(HttpAddr::On)
                .map_err(|_| format!("`{a}` is not an address (e.g. 0.0.0.0:8000) or `off`")),
        }
    }
}

/// The HTTP status for a gRPC code (Triton's mapping where it has one).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// A refused request: its HTTP status and the message of its `{"error": ...}` body.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = json_response(json!({ "error": self.message }));
        *r.status_mut() = self.status;
        r
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    refuse(status, message).into_response()
}

fn from_status(s: Status) -> Response {
    error(http_status(s.code()), s.message())
}

fn json_response(v: Value) -> Response {
    let body = serde_json::to_vec(&v).expect("JSON values serialise");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The model and version of a path (`""` = the served default version).
fn model_version(p: &HashMap<String, String>) -> (String, String) {
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    (get("model"), get("version"))
}

/// KServe health: 200 for true, 400 for false, no body.
fn health(ok: bool) -> Response {
    if ok {
        StatusCode::OK.into_response()
    } else {
        StatusCode::BAD_REQUEST.into_response()
    }
}

/// The gRPC service's answer through `f`, or its status as an HTTP error.
fn answer<T>(r: Result<tonic::Response<T>, Status>, f: impl FnOnce(T) -> Response) -> Response {
    match r {
        Ok(r) => f(r.into_inner()),
        Err(e) => from_status(e),
    }
}

async fn live(State(s): State<Rest>) -> Response {
    let r = s.kserve.server_live(Request::new(pb::ServerLiveRequest {}));
    answer(r.await, |r| health(r.live))
}

async fn ready(State(s): State<Rest>) -> Response {
    let r = s
        .kserve
        .server_ready(Request::new(pb::ServerReadyRequest {}));
    answer(r.await, |r| health(r.ready))
}

async fn model_ready(State(s): State<Rest>, Path(p): Path<HashMap<String, String>>) -> Response {
    let (name, version) = model_version(&p);
    let r = s
        .kserve
        .model_ready(Request::new(pb::ModelReadyRequest { name, version }));
    answer(r.await, |r| health(r.ready))
}

async fn server_metadata(State(s): State<Rest>) -> Response {
    let r = s
        .kserve
        .server_metadata(Request::new(pb::ServerMetadataRequest {}));
    answer(r.await, |m| {
        json_response(json!({
            "name": m.name,
            "version": m.version,
            "extensions": m.extensions,
        }))
    })
}

fn tensor_metadata(t: &pb::model_metadata_response::TensorMetadata) -> Value {
    json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape })
}

async fn metadata(State(s): State<Rest>, Path(p): Path<HashMap<String, String>>) -> Response {
    let (name, version) = model_version(&p);
    let r = s
        .kserve
        .model_metadata(Request::new(pb::ModelMetadataRequest { name, version }));
    answer(r.await, |m| {
        json_response(json!({
            "name": m.name,
            "versions": m.versions,
            "platform": m.platform,
            "inputs": m.inputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
            "outputs": m.outputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
        }))
    })
}

/// Triton's JSON form of a model configuration (protobuf field names, enum names as strings,
/// 64-bit integers as numbers).
fn config_json(c: &pb::ModelConfig) -> Value {
    let data_type = |t: i32| {
        pb::DataType::try_from(t)
            .map(|t| t.as_str_name())
            .unwrap_or("TYPE_INVALID")
    };
    let inputs: Vec<Value> = c
        .input
        .iter()
        .map(|i| {
            json!({
                "name": i.name,
                "data_type": data_type(i.data_type),
                "format": pb::model_input::Format::try_from(i.format)
                    .map(|f| f.as_str_name())
                    .unwrap_or("FORMAT_NONE"),
                "dims": i.dims,
                "is_shape_tensor": false,
                "allow_ragged_batch": false,
                "optional": i.optional,
            })
        })
        .collect();
    let outputs: Vec<Value> = c
        .output
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "data_type": data_type(o.data_type),
                "dims": o.dims,
                "label_filename": "",
                "is_shape_tensor": false,
            })
        })
        .collect();
    let mut v = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": inputs,
        "output": outputs,
    });
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(d)) = &c.scheduling_choice {
        v["dynamic_batching"] = json!({
            "preferred_batch_size": d.preferred_batch_size,
            "max_queue_delay_microseconds": d.max_queue_delay_microseconds,
        });
    }
    v
}

async fn config(State(s): State<Rest>, Path(p): Path<HashMap<String, String>>) -> Response {
    let (name, version) = model_version(&p);
    let r = s
        .kserve
        .model_config(Request::new(pb::ModelConfigRequest { name, version }));
    answer(r.await, |r| match r.config {
        Some(c) => json_response(config_json(&c)),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "no configuration"),
    })
}

fn duration_json(d: &Option<pb::StatisticDuration>) -> Value {
    let (count, ns) = d.as_ref().map_or((0, 0), |d| (d.count, d.ns));
    json!({ "count": count, "ns": ns })
}

async fn statistics(s: Rest, name: String, version: String) -> Response {
    let r = s
        .kserve
        .model_statistics(Request::new(pb::ModelStatisticsRequest { name, version }));
    answer(r.await, |r| {
        let stats: Vec<Value> = r
            .model_stats
            .iter()
            .map(|m| {
                let i = m.inference_stats.unwrap_or_default();
                json!({
                    "name": m.name,
                    "version": m.version,
                    "last_inference": m.last_inference,
                    "inference_count": m.inference_count,
                    "execution_count": m.execution_count,
                    "inference_stats": {
                        "success": duration_json(&i.success),
                        "fail": duration_json(&i.fail),
                        "queue": duration_json(&i.queue),
                        "compute_input": duration_json(&i.compute_input),
                        "compute_infer": duration_json(&i.compute_infer),
                        "compute_output": duration_json(&i.compute_output),
                        // No response cache here.
                        "cache_hit": duration_json(&None),
                        "cache_miss": duration_json(&None),
                    },
                    "batch_stats": [],
                })
            })
            .collect();
        json_response(json!({ "model_stats": stats }))
    })
}

async fn all_stats(State(s): State<Rest>) -> Response {
    statistics(s, String::new(), String::new()).await
}

async fn stats(State(s): State<Rest>, Path(p): Path<HashMap<String, String>>) -> Response {
    let (name, version) = model_version(&p);
    statistics(s, name, version).await
}

/// Reads a body of at most `limit` bytes; a larger one is answered 413 naming the limit.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Refusal> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body is over this server's limit of {limit} bytes (--max-message-bytes; JSON bodies may be 4 times it)"
                ),
            )
        } else {
            refuse(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Vec<OutputTensor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputTensor {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A JSON parameter as KServe's protobuf parameter (strings, booleans and integers).
fn infer_parameter(key: &str, v: &Value) -> Result<pb::InferParameter, String> {
    use pb::infer_parameter::ParameterChoice as P;
    let choice = match v {
        Value::Bool(b) => P::BoolParam(*b),
        Value::String(s) => P::StringParam(s.clone()),
        Value::Number(n) if n.is_i64() => P::Int64Param(n.as_i64().unwrap_or_default()),
        other => {
            return Err(format!(
                "parameter `{key}` is {other}: parameters are strings, booleans or integers"
            ))
        }
    };
    Ok(pb::InferParameter {
        parameter_choice: Some(choice),
    })
}

fn parameters(m: &Map<String, Value>) -> Result<HashMap<String, pb::InferParameter>, String> {
    m.iter()
        .map(|(k, v)| Ok((k.clone(), infer_parameter(k, v)?)))
        .collect()
}

/// Appends the numbers of a (nested) JSON array to `out` as `datatype`'s little-endian bytes.
fn flatten(name: &str, datatype: &str, v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(name, datatype, item, out)?;
            }
            Ok(())
        }
        Value::Number(n) => match datatype {
            "UINT8" => match n.as_u64().and_then(|x| u8::try_from(x).ok()) {
                Some(x) => {
                    out.push(x);
                    Ok(())
                }
                None => Err(format!(
                    "input `{name}` has value {n} at element {}: UINT8 takes integers 0 to 255",
                    out.len()
                )),
            },
            "FP32" => match n.as_f64() {
                Some(x) => {
                    out.extend_from_slice(&(x as f32).to_le_bytes());
                    Ok(())
                }
                None => Err(format!("input `{name}` has value {n}, not a number")),
            },
            other => Err(format!(
                "input `{name}` has datatype {other}: this server's models take `image` (UINT8) or `input` (FP32)"
            )),
        },
        other => Err(format!(
            "input `{name}` data holds {other}: data is an array of numbers (nested or flat, row-major)"
        )),
    }
}

/// A KServe REST inference body as the server reads it (what the `rest_infer_request` fuzz
/// target drives): `header_length` is the Inference-Header-Content-Length header, if sent.
/// Returns the gRPC request every check after it sees, or the refusal's message.
pub fn model_infer_from_http(
    header_length: Option<&str>,
    body: &[u8],
    max_message_bytes: usize,
) -> Result<pb::ModelInferRequest, String> {
    let mut headers = HeaderMap::new();
    if let Some(v) = header_length {
        let v = HeaderValue::from_str(v).map_err(|e| format!("header value: {e}"))?;
        headers.insert(HEADER_LENGTH, v);
    }
    let body = Bytes::copy_from_slice(body);
    to_model_infer(
        "fuzz".into(),
        String::new(),
        &headers,
        &body,
        max_message_bytes,
    )
    .map(|(req, _)| req)
    .map_err(|r| r.message)
}

/// A JSON (and binary) inference request as the gRPC one; the second value says whether the
/// answer's logits go back as binary.
fn to_model_infer(
    model: String,
    version: String,
    headers: &HeaderMap,
    body: &Bytes,
    max_message_bytes: usize,
) -> Result<(pb::ModelInferRequest, bool), Refusal> {
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, m);
    let json_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "header Inference-Header-Content-Length is `{}`, not a byte count",
                        String::from_utf8_lossy(v.as_bytes())
                    ))
                })?;
            if n > body.len() {
                return Err(bad(format!(
                    "header Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                    body.len()
                )));
            }
            n
        }
    };
    let req: InferRequest = serde_json::from_slice(&body[..json_len])
        .map_err(|e| bad(format!("inference request JSON: {e}")))?;
    let mut binary = body.slice(json_len..);
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut raw = Vec::with_capacity(req.inputs.len());
    for t in req.inputs {
        let size = match t.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                bad(format!(
                    "input `{}` has binary_data_size {v}, not a byte count",
                    t.name
                ))
            })? as usize),
        };
        let bytes = match (size, &t.data) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input `{}` has both `data` and binary_data_size; send one",
                    t.name
                )))
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(bad(format!(
                        "input `{}` has binary_data_size {n}, but only {} bytes of binary data are left after the JSON (Inference-Header-Content-Length)",
                        t.name,
                        binary.len()
                    )));
                }
                binary.split_to(n)
            }
            (None, Some(data)) => {
                let mut out = Vec::new();
                flatten(&t.name, &t.datatype, data, &mut out).map_err(bad)?;
                if out.len() > max_message_bytes {
                    return Err(refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "input `{}` is {} bytes, over this server's limit of {max_message_bytes} bytes (--max-message-bytes)",
                            t.name,
                            out.len()
                        ),
                    ));
                }
                Bytes::from(out)
            }
            (None, None) => {
                return Err(bad(format!(
                    "input `{}` has no data: send `data` or binary data (binary_data_size)",
                    t.name
                )))
            }
        };
        let mut params = t.parameters;
        params.remove("binary_data_size");
        inputs.push(pb::model_infer_request::InferInputTensor {
            name: t.name,
            datatype: t.datatype,
            shape: t.shape,
            parameters: parameters(&params).map_err(bad)?,
            contents: None,
        });
        raw.push(bytes);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are left after the inputs' binary_data_size",
            binary.len()
        )));
    }
    let mut binary_output = req
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in req.outputs {
        let mut params = o.parameters;
        if let Some(b) = params.remove("binary_data") {
            binary_output |= b.as_bool().ok_or_else(|| {
                bad(format!(
                    "output `{}` has binary_data {b}, not true or false",
                    o.name
                ))
            })?;
        }
        outputs.push(pb::model_infer_request::InferRequestedOutputTensor {
            name: o.name,
            parameters: parameters(&params).map_err(bad)?,
        });
    }
    let mut req_params = req.parameters;
    req_params.remove("binary_data_output");
    Ok((
        pb::ModelInferRequest {
            model_name: model,
            model_version: version,
            id: req.id.unwrap_or_default(),
            parameters: parameters(&req_params).map_err(bad)?,
            inputs,
            outputs,
            raw_input_contents: raw,
        },
        binary_output,
    ))
}

#[derive(serde::Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(serde::Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    /// f32, so that each number is written in its shortest exact form.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Vec<f32>>,
}

/// The gRPC answer as KServe's JSON (and binary) response.
fn infer_response(r: pb::ModelInferResponse, binary: bool) -> Response {
    let mut outputs = Vec::with_capacity(r.outputs.len());
    let mut tail: Vec<u8> = Vec::new();
    for (i, o) in r.outputs.iter().enumerate() {
        let bytes = r.raw_output_contents.get(i).cloned().unwrap_or_default();
        let mut out = OutputJson {
            name: &o.name,
            datatype: &o.datatype,
            shape: &o.shape,
            parameters: None,
            data: None,
        };
        if binary {
            out.parameters = Some(json!({ "binary_data_size": bytes.len() }));
            tail.extend_from_slice(&bytes);
        } else {
            out.data = Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        outputs.push(out);
    }
    let head = InferResponse {
        model_name: &r.model_name,
        model_version: &r.model_version,
        id: &r.id,
        outputs,
    };
    let head = serde_json::to_vec(&head).expect("JSON values serialise");
    if !binary {
        return ([(header::CONTENT_TYPE, "application/json")], head).into_response();
    }
    let len = head.len();
    let mut body = head;
    body.extend_from_slice(&tail);
    let mut resp = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    resp.headers_mut()
        .insert(HEADER_LENGTH, HeaderValue::from(len as u64));
    resp
}

async fn infer(
    State(s): State<Rest>,
    Path(p): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        if enc.as_bytes() != b"identity" {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding `{}` is not supported: send the body uncompressed",
                    String::from_utf8_lossy(enc.as_bytes())
                ),
            );
        }
    }
    let limit = if headers.contains_key(HEADER_LENGTH) {
        s.max_message_bytes
    } else {
        s.max_message_bytes.saturating_mul(4)
    };
    let body = match read_body(body, limit).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let (model, version) = model_version(&p);
    let (req, binary) = match to_model_infer(model, version, &headers, &body, s.max_message_bytes) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    drop(body);
    match s.kserve.model_infer(Request::new(req)).await {
        Ok(r) => infer_response(r.into_inner(), binary),
        Err(e) => from_status(e),
    }
}

/// An optional JSON body of a repository request (`{}` when empty).
async fn json_body(body: Body) -> Result<Map<String, Value>, Refusal> {
    let bytes = read_body(body, 1 << 20).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("request JSON: {e}")))
}

async fn index(State(s): State<Rest>, body: Body) -> Response {
    let body = match json_body(body).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let ready = body.get("ready").and_then(Value::as_bool).unwrap_or(false);
    let r = s
        .kserve
        .repository_index(Request::new(pb::RepositoryIndexRequest {
            repository_name: String::new(),
            ready,
        }));
    answer(r.await, |r| {
        let models: Vec<Value> = r
            .models
            .iter()
            .map(|m| {
                let mut v = json!({ "name": m.name, "state": m.state, "reason": m.reason });
                if !m.version.is_empty() {
                    v["version"] = json!(m.version);
                }
                v
            })
            .collect();
        json_response(Value::Array(models))
    })
}

/// Load/unload parameters as the gRPC request's (refused there unless supported).
fn repository_parameters(
    body: &Map<String, Value>,
) -> Result<HashMap<String, pb::ModelRepositoryParameter>, Refusal> {
    use pb::model_repository_parameter::ParameterChoice as P;
    let Some(params) = body.get("parameters") else {
        return Ok(HashMap::new());
    };
    let Some(params) = params.as_object() else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "`parameters` is not an object",
        ));
    };
    params
        .iter()
        .map(|(k, v)| {
            let choice = match v {
                Value::Bool(b) => P::BoolParam(*b),
                Value::Number(n) if n.is_i64() => P::Int64Param(n.as_i64().unwrap_or_default()),
                other => P::StringParam(
                    other
                        .as_str()
                        .map_or_else(|| other.to_string(), str::to_string),
                ),
            };
            Ok((
                k.clone(),
                pb::ModelRepositoryParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

async fn load(
    State(s): State<Rest>,
    Path(p): Path<HashMap<String, String>>,
    body: Body,
) -> Response {
    repository_change(s, p, body, true).await
}

async fn unload(
    State(s): State<Rest>,
    Path(p): Path<HashMap<String, String>>,
    body: Body,
) -> Response {
    repository_change(s, p, body, false).await
}

async fn repository_change(
    s: Rest,
    p: HashMap<String, String>,
    body: Body,
    load: bool,
) -> Response {
    if let Some(why) = &s.repository_refusal {
        return error(StatusCode::FORBIDDEN, why.clone());
    }
    let body = match json_body(body).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let parameters = match repository_parameters(&body) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let (model_name, _) = model_version(&p);
    let result = if load {
        s.kserve
            .repository_model_load(Request::new(pb::RepositoryModelLoadRequest {
                repository_name: String::new(),
                model_name,
                parameters,
            }))
            .await
            .map(|_| ())
    } else {
        s.kserve
            .repository_model_unload(Request::new(pb::RepositoryModelUnloadRequest {
                repository_name: String::new(),
                model_name,
                parameters,
            }))
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => from_status(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(len: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = len {
            h.insert(HEADER_LENGTH, HeaderValue::from(n as u64));
        }
        h
    }

    #[test]
    fn json_data_nested_or_flat_becomes_the_same_raw_bytes() {
        let nested = br#"{"inputs":[{"name":"image","shape":[1,2,2,1],"datatype":"UINT8","data":[[[[1],[2]],[[3],[255]]]]}]}"#;
        let flat = br#"{"inputs":[{"name":"image","shape":[1,2,2,1],"datatype":"UINT8","data":[1,2,3,255]}]}"#;
        for body in [&nested[..], &flat[..]] {
            let (req, binary) = to_model_infer(
                "m".into(),
                "".into(),
                &headers(None),
                &Bytes::copy_from_slice(body),
                1 << 20,
            )
            .unwrap();
            assert!(!binary);
            assert_eq!(
                req.raw_input_contents,
                vec![Bytes::from_static(&[1, 2, 3, 255])]
            );
            assert_eq!(req.inputs[0].shape, vec![1, 2, 2, 1]);
        }
        let fp = br#"{"inputs":[{"name":"input","shape":[2],"datatype":"FP32","data":[0.5,-2]}]}"#;
        let (req, _) = to_model_infer(
            "m".into(),
            "".into(),
            &headers(None),
            &Bytes::copy_from_slice(fp),
            1 << 20,
        )
        .unwrap();
        let want: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(req.raw_input_contents[0].as_ref(), &want[..]);
    }

    #[test]
    fn binary_extension_splits_the_body_by_the_header() {
        let head = br#"{"inputs":[{"name":"image","shape":[1,3],"datatype":"UINT8","parameters":{"binary_data_size":3}}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}"#;
        let mut body = head.to_vec();
        body.extend_from_slice(&[7, 8, 9]);
        let (req, binary) = to_model_infer(
            "m".into(),
            "2".into(),
            &headers(Some(head.len())),
            &Bytes::from(body.clone()),
            1 << 20,
        )
        .unwrap();
        assert!(binary);
        assert_eq!(req.model_version, "2");
        assert_eq!(req.raw_input_contents[0].as_ref(), &[7, 8, 9]);
        assert!(req.inputs[0].parameters.is_empty());
        assert!(req.outputs[0].parameters.is_empty());
        // A byte too many, a byte too few, a header past the body.
        for (extra, len) in [
            (Some(1u8), head.len()),
            (None, head.len() + 1),
            (None, body.len() + 1),
        ] {
            let mut b = body.clone();
            b.extend(extra);
            let r = to_model_infer(
                "m".into(),
                "".into(),
                &headers(Some(len)),
                &Bytes::from(b),
                1 << 20,
            );
            assert_eq!(r.unwrap_err().status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn bad_values_are_named() {
        for (body, needle) in [
            (
                &br#"{"inputs":[{"name":"image","shape":[1],"datatype":"UINT8","data":[256]}]}"#[..],
                "integers 0 to 255",
            ),
            (
                br#"{"inputs":[{"name":"image","shape":[1],"datatype":"UINT8","data":["a"]}]}"#,
                "array of numbers",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1]}]}"#,
                "datatype INT64",
            ),
            (
                br#"{"inputs":[{"name":"image","shape":[1],"datatype":"UINT8"}]}"#,
                "has no data",
            ),
            (
                br#"{"inputs":[{"name":"image","datatype":"UINT8","data":[1]}]}"#,
                "missing field `shape`",
            ),
            (br#"{"inputs":[],"oops":1}"#, "unknown field `oops`"),
        ] {
            let r = to_model_infer(
                "m".into(),
                "".into(),
                &headers(None),
                &Bytes::copy_from_slice(body),
                1 << 20,
            );
            let refusal = r.unwrap_err();
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST, "{needle}");
            let text = futures_body(refusal.into_response());
            assert!(text.contains(needle), "{text} lacks {needle}");
        }
        let big =
            br#"{"inputs":[{"name":"image","shape":[5],"datatype":"UINT8","data":[1,2,3,4,5]}]}"#;
        let r = to_model_infer(
            "m".into(),
            "".into(),
            &headers(None),
            &Bytes::copy_from_slice(big),
            4,
        );
        assert_eq!(r.unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    fn futures_body(resp: Response) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt
            .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn response_binary_and_json() {
        let logits: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let r = pb::ModelInferResponse {
            model_name: "kd".into(),
            model_version: "1".into(),
            id: "abc".into(),
            parameters: Default::default(),
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                parameters: Default::default(),
                contents: None,
            }],
            raw_output_contents: vec![logits.clone().into()],
        };
        let json_resp = infer_response(r.clone(), false);
        let v: Value = serde_json::from_str(&futures_body(json_resp)).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([1.5, -0.25]));
        assert_eq!(v["id"], "abc");
        let bin = infer_response(r, true);
        let len: usize = bin.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let body = rt
            .block_on(axum::body::to_bytes(bin.into_body(), 1 << 20))
            .unwrap();
        let head: Value = serde_json::from_slice(&body[..len]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(&body[len..], &logits[..]);
    }

    #[test]
    fn http_addr_parses_off() {
        assert_eq!("off".parse::<HttpAddr>().unwrap(), HttpAddr::Off);
        assert_eq!(
            "127.0.0.1:8000".parse::<HttpAddr>().unwrap(),
            HttpAddr::On("127.0.0.1:8000".parse().unwrap())
        );
        assert!("8000".parse::<HttpAddr>().unwrap_err().contains("off"));
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
