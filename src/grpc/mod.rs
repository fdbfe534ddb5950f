//! The gRPC edge: generated protocol code, the own API (`slimserve.v1.Classifier`), the KServe
//! v2 / Triton API (`inference.GRPCInferenceService`), and the mapping of errors to status codes.
//!
//! Handlers translate protocol messages into [`crate::pipeline::Request`]s and answers back;
//! everything between (admission, preprocessing, batching, compute) is the pipeline's.

mod classifier;
mod kserve;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::server::Router;

pub use classifier::ClassifierService;
pub use kserve::{KServeInput, KServeService, INPUT_IMAGE, INPUT_NCHW, OUTPUT_LOGITS};

use crate::error::Error;
use crate::pipeline::{self, Pipeline};

/// The own API's `ClassifyRequest` as the pipeline's request: checked as the handler checks
/// it, payload not yet validated (what the fuzz targets drive).
pub fn classify_request(
    req: pb::slimserve::v1::ClassifyRequest,
) -> Result<pipeline::Request, Error> {
    classifier::to_request(req, None)
}

/// KServe's `ModelInferRequest` as the pipeline's request, as [`classify_request`].
pub fn model_infer_request(
    req: pb::inference::ModelInferRequest,
) -> Result<pipeline::Request, Error> {
    kserve::to_request(req, None).map(|(req, _id)| req)
}

/// Code generated from `proto/` by build.rs.
pub mod pb {
    pub mod slimserve {
        pub mod v1 {
            tonic::include_proto!("slimserve.v1");
        }
    }
    /// KServe v2 / Triton (`package inference`).
    pub mod inference {
        tonic::include_proto!("inference");
    }
}

/// Encoded descriptors of our protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("slimserve_descriptor");

/// Adds the own API, KServe and reflection (v1 and v1alpha, which older grpcurl uses) to a
/// router that already holds the health service.
pub fn add_services(router: Router, pipeline: Arc<Pipeline>, kserve_input: KServeInput) -> Router {
    let limit = pipeline.limits.max_message_bytes;
    let classifier = pb::slimserve::v1::classifier_server::ClassifierServer::new(
        ClassifierService::new(pipeline.clone()),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(usize::MAX);
    let kserve = pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        KServeService::new(pipeline, kserve_input),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(usize::MAX);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    router
        .add_service(status::Edge::new(classifier, limit))
        .add_service(status::Edge::new(kserve, limit))
        .add_service(reflection().build_v1().expect("descriptor sets are valid"))
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("descriptor sets are valid"),
        )
}

/// When the request reached the server (recorded by [`status::Edge`] before decoding).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival(pub Instant);

/// Our deadline falls slightly before the client's (1/20 of the timeout, 1 to 10 ms), so the
/// client still hears our DEADLINE_EXCEEDED (with its message) before its own timer fires.
fn deadline_slack(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

/// The request's deadline from its `grpc-timeout` header, counted from arrival.
pub(crate) fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)?;
    let arrival = request
        .extensions()
        .get::<Arrival>()
        .map(|a| a.0)
        .unwrap_or_else(Instant::now);
    Some(arrival + timeout.saturating_sub(deadline_slack(timeout)))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Converts a finished RPC into its answer, recording request metrics and KServe statistics.
pub(crate) fn finish<T>(
    method: &'static str,
    started: Instant,
    model: Option<&crate::pipeline::ServedModel>,
    result: Result<T, crate::error::Error>,
) -> Result<T, tonic::Status> {
    let elapsed = started.elapsed();
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => status::code(e),
    };
    crate::telemetry::count_request(
        model.map_or("", |m| m.name.as_str()),
        model.map_or("", |m| m.version.as_str()),
        method,
        code,
    );
    if let Some(m) = model {
        if result.is_ok() {
            m.metrics.request_duration.record(elapsed.as_secs_f64());
            m.stats.success.add(1, elapsed);
        } else {
            m.stats.fail.add(1, elapsed);
        }
    }
    result.map_err(tonic::Status::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }
}
