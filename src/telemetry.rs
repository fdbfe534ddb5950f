//! Every metric the server exports, defined once: names (units in the name), help texts,
//! histogram buckets, and per-model handles.
//!
//! Metrics go to one process-wide Prometheus recorder ([`init`]); `/metrics` renders it. Per-model
//! series carry a `model` label, so `big`, `kd` and `kd-q8` can be compared from `/metrics` alone,
//! e.g. p99 latency per model:
//! `histogram_quantile(0.99, sum by (model, le) (rate(slimserve_request_duration_seconds_bucket[1m])))`.
//!
//! [`ModelStats`] keeps the cumulative counters KServe's ModelStatistics reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// End-to-end latency of successful requests, from arrival to answer (histogram).
pub const REQUEST_DURATION_SECONDS: &str = "slimserve_request_duration_seconds";
/// Finished requests by model, RPC method and gRPC status code name (counter).
pub const REQUESTS_TOTAL: &str = "slimserve_requests_total";
/// Per input, by `kind`: `image` (decode + resize + crop) or `tensor` (validation) (histogram).
pub const PREPROCESS_DURATION_SECONDS: &str = "slimserve_preprocess_duration_seconds";
/// Time an input waited in its model's queue before joining a batch (histogram).
pub const QUEUE_WAIT_SECONDS: &str = "slimserve_queue_wait_seconds";
/// Forward pass of one batch on the compute thread, inputs already in place (histogram).
pub const BATCH_COMPUTE_DURATION_SECONDS: &str = "slimserve_batch_compute_duration_seconds";
/// Writing one batch's inputs into the model's input buffer (on a GPU: the upload), before
/// its forward pass (histogram).
pub const BATCH_UPLOAD_DURATION_SECONDS: &str = "slimserve_batch_upload_duration_seconds";
/// Inputs per executed batch (histogram).
pub const BATCH_SIZE_INPUTS: &str = "slimserve_batch_size_inputs";
/// Inputs waiting in the model's queue (gauge).
pub const QUEUE_DEPTH_INPUTS: &str = "slimserve_queue_depth_inputs";
/// Inputs admitted and not yet answered: preprocessing, queued or computing (gauge).
pub const IN_FLIGHT_INPUTS: &str = "slimserve_in_flight_inputs";
/// Inputs dropped from the queue before compute, by reason `deadline` or `cancelled` (counter).
pub const DROPPED_INPUTS_TOTAL: &str = "slimserve_dropped_inputs_total";
/// Inputs mirrored by `--shadow`, by source `model`, `shadow` model and `outcome` (agree,
/// disagree, dropped, error) (counter).
pub const SHADOW_REQUESTS_TOTAL: &str = "slimserve_shadow_requests_total";
/// Largest absolute difference between the source's and the shadow's logits (histogram).
pub const SHADOW_LOGIT_GAP: &str = "slimserve_shadow_logit_gap";
/// 1 while the version is served, 0 once unloaded; labels describe it (gauge).
pub const MODEL_INFO: &str = "slimserve_model_info";
/// Version loads by `model`, `version` and `result` (`success`, `failure`) (counter).
pub const MODEL_LOADS_TOTAL: &str = "slimserve_model_loads_total";
/// Versions taken out of service, by `model` and `version` (counter).
pub const MODEL_UNLOADS_TOTAL: &str = "slimserve_model_unloads_total";
/// Reading, validating, compiling and warming up one version, by `model` (histogram).
pub const MODEL_LOAD_DURATION_SECONDS: &str = "slimserve_model_load_duration_seconds";
/// Versions of the model being served (gauge).
pub const MODEL_VERSIONS_LOADED: &str = "slimserve_model_versions_loaded";
/// Idle periods after which the compute thread freed its scratch memory (counter, no labels).
pub const IDLE_MEMORY_RELEASES_TOTAL: &str = "slimserve_idle_memory_releases_total";

/// Latency buckets: about 1.5x apart from 0.25 ms to 10 s, so p50 and p99 interpolate
/// within a few tens of percent anywhere between 0.5 ms and 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
];
/// Logit gaps: 0.001 (float rounding) to 100 (unrelated models).
pub const LOGIT_GAP_BUCKETS: &[f64] = &[
    0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];
/// Batch sizes up to the largest `--max-batch-size` worth using.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle)
/// and describes every metric.
pub fn init() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BATCH_SIZE_INPUTS.into()),
                        BATCH_SIZE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SHADOW_LOGIT_GAP.into()),
                        LOGIT_GAP_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                eprintln!("slimserve: another metrics recorder is installed; /metrics stays empty");
            }
            describe();
            // Upkeep drains histogram samples into buckets even when nobody scrapes.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "End-to-end latency of successful requests, arrival to answer"
    );
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Finished requests by model, method and gRPC status code"
    );
    describe_histogram!(
        PREPROCESS_DURATION_SECONDS,
        Unit::Seconds,
        "Per input: image decode and resize (kind=image) or tensor validation (kind=tensor)"
    );
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time an input waited in the model queue before joining a batch"
    );
    describe_histogram!(
        BATCH_COMPUTE_DURATION_SECONDS,
        Unit::Seconds,
        "Forward pass of one batch"
    );
    describe_histogram!(
        BATCH_UPLOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Writing a batch's inputs into the model's input buffer (on a GPU: the upload)"
    );
    describe_histogram!(BATCH_SIZE_INPUTS, Unit::Count, "Inputs per executed batch");
    describe_gauge!(
        QUEUE_DEPTH_INPUTS,
        Unit::Count,
        "Inputs waiting in the model queue"
    );
    describe_gauge!(
        IN_FLIGHT_INPUTS,
        Unit::Count,
        "Inputs admitted and not yet answered"
    );
    describe_counter!(
        SHADOW_REQUESTS_TOTAL,
        Unit::Count,
        "Inputs mirrored to a shadow model, by outcome (agree, disagree, dropped, error)"
    );
    describe_histogram!(
        SHADOW_LOGIT_GAP,
        "Largest absolute logit difference between a model and its shadow, per mirrored input"
    );
    describe_counter!(
        DROPPED_INPUTS_TOTAL,
        Unit::Count,
        "Inputs dropped before compute, by reason (deadline, cancelled)"
    );
    describe_gauge!(
        MODEL_INFO,
        "Model version: architecture, weight format, parameters, file bytes, device, engine; 1 while served, 0 once unloaded"
    );
    describe_counter!(
        MODEL_LOADS_TOTAL,
        Unit::Count,
        "Model version loads by result (success, failure)"
    );
    describe_counter!(
        MODEL_UNLOADS_TOTAL,
        Unit::Count,
        "Model versions taken out of service"
    );
    describe_histogram!(
        MODEL_LOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Reading, validating, compiling and warming up one model version"
    );
    describe_gauge!(
        MODEL_VERSIONS_LOADED,
        Unit::Count,
        "Versions of the model being served"
    );
    describe_counter!(
        IDLE_MEMORY_RELEASES_TOTAL,
        Unit::Count,
        "Idle periods (--idle-memory-release) after which the batch buffer and the engine's scratch were freed"
    );
}

/// Counts one version load (`ok`: served; otherwise it failed) and its duration.
pub fn count_load(model: &str, version: u64, ok: bool, took: Duration) {
    metrics::counter!(
        MODEL_LOADS_TOTAL,
        "model" => model.to_string(),
        "version" => version.to_string(),
        "result" => if ok { "success" } else { "failure" },
    )
    .increment(1);
    metrics::histogram!(MODEL_LOAD_DURATION_SECONDS, "model" => model.to_string())
        .record(took.as_secs_f64());
    if ok {
        // The version's unload series exists from its load on (at 0), so that rates and
        // dashboards see it before its first unload.
        metrics::counter!(
            MODEL_UNLOADS_TOTAL,
            "model" => model.to_string(),
            "version" => version.to_string(),
        )
        .increment(0);
    }
}

/// Counts one version taken out of service.
pub fn count_unload(model: &str, version: u64) {
    metrics::counter!(
        MODEL_UNLOADS_TOTAL,
        "model" => model.to_string(),
        "version" => version.to_string(),
    )
    .increment(1);
}

/// Sets how many versions of `model` are served.
pub fn set_versions_loaded(model: &str, n: usize) {
    metrics::gauge!(MODEL_VERSIONS_LOADED, "model" => model.to_string()).set(n as f64);
}

/// What the model info series says about a model.
#[derive(Debug, Clone)]
pub struct ModelInfoLabels {
    /// Content hash of the weight file.
    pub digest: String,
    pub architecture: String,
    pub format: String,
    pub parameters: u64,
    pub file_bytes: u64,
    pub input_size: usize,
    pub device: String,
    /// `fused` (compiled CPU kernels) or `candle`.
    pub engine: String,
}

/// One model's metric handles, created once so the hot path does no label formatting.
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    model: String,
    version: String,
    pub request_duration: Histogram,
    /// Decode + resize + crop of an encoded image.
    pub preprocess_image: Histogram,
    /// Validation of a raw tensor.
    pub preprocess_tensor: Histogram,
    pub queue_wait: Histogram,
    pub batch_compute: Histogram,
    pub batch_upload: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub dropped_deadline: Counter,
    pub dropped_cancelled: Counter,
}

impl ModelMetrics {
    pub fn new(model: &str, version: &str) -> Self {
        let m = model.to_string();
        let v = version.to_string();
        Self {
            request_duration: metrics::histogram!(REQUEST_DURATION_SECONDS, "model" => m.clone(), "version" => v.clone()),
            preprocess_image: metrics::histogram!(PREPROCESS_DURATION_SECONDS, "model" => m.clone(), "version" => v.clone(), "kind" => "image"),
            preprocess_tensor: metrics::histogram!(PREPROCESS_DURATION_SECONDS, "model" => m.clone(), "version" => v.clone(), "kind" => "tensor"),
            queue_wait: metrics::histogram!(QUEUE_WAIT_SECONDS, "model" => m.clone(), "version" => v.clone()),
            batch_compute: metrics::histogram!(BATCH_COMPUTE_DURATION_SECONDS, "model" => m.clone(), "version" => v.clone()),
            batch_upload: metrics::histogram!(BATCH_UPLOAD_DURATION_SECONDS, "model" => m.clone(), "version" => v.clone()),
            batch_size: metrics::histogram!(BATCH_SIZE_INPUTS, "model" => m.clone(), "version" => v.clone()),
            queue_depth: metrics::gauge!(QUEUE_DEPTH_INPUTS, "model" => m.clone(), "version" => v.clone()),
            in_flight: metrics::gauge!(IN_FLIGHT_INPUTS, "model" => m.clone(), "version" => v.clone()),
            dropped_deadline: metrics::counter!(DROPPED_INPUTS_TOTAL, "model" => m.clone(), "version" => v.clone(), "reason" => "deadline"),
            dropped_cancelled: metrics::counter!(DROPPED_INPUTS_TOTAL, "model" => m.clone(), "version" => v.clone(), "reason" => "cancelled"),
            model: m,
            version: v,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Publishes the model info series (value 1) and returns it, to be set to 0 on unload.
    pub fn set_info(&self, info: &ModelInfoLabels) -> Gauge {
        let gauge = metrics::gauge!(
            MODEL_INFO,
            "model" => self.model.clone(),
            "version" => self.version.clone(),
            "digest" => info.digest.clone(),
            "architecture" => info.architecture.clone(),
            "format" => info.format.clone(),
            "parameters" => info.parameters.to_string(),
            "file_bytes" => info.file_bytes.to_string(),
            "input_size" => info.input_size.to_string(),
            "device" => info.device.clone(),
            "engine" => info.engine.clone(),
        );
        gauge.set(1.0);
        gauge
    }
}

/// Counts a finished request. `model` is empty when the request named no servable model
/// (unknown names are not used as labels, so clients cannot grow the series set).
pub fn count_request(model: &str, version: &str, method: &'static str, code: tonic::Code) {
    metrics::counter!(
        REQUESTS_TOTAL,
        "model" => model.to_string(),
        "version" => version.to_string(),
        "method" => method,
        "code" => code_name(code),
    )
    .increment(1);
}

/// The gRPC code's canonical upper-case name, as grpcurl and ghz print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A cumulative count and total duration, as KServe's `StatisticDuration`.
#[derive(Debug, Default)]
pub struct DurationStat {
    count: AtomicU64,
    ns: AtomicU64,
}

impl DurationStat {
    pub fn add(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Ordering::Relaxed);
        self.ns
            .fetch_add(d.as_nanos() as u64 * n, Ordering::Relaxed);
    }

    /// (count, nanoseconds)
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        )
    }
}

/// Cumulative per-model statistics in KServe's shape (ModelStatistics).
#[derive(Debug, Default)]
pub struct ModelStats {
    pub success: DurationStat,
    pub fail: DurationStat,
    pub queue: DurationStat,
    /// compute_input / compute_infer / compute_output, under one lock.
    compute: Mutex<ComputeTotals>,
    /// Inputs computed.
    pub inference_count: AtomicU64,
    /// Batches executed.
    pub execution_count: AtomicU64,
    /// Milliseconds since the epoch of the last computed batch.
    pub last_inference_ms: AtomicU64,
}

/// KServe's three compute stages, summed per input (each input of a batch is charged the
/// batch's time, as Triton does). Kept together because clients compare their counts:
/// perf_analyzer aborts when compute_input, compute_infer and compute_output counts differ, which
/// separately updated counters would show to a reader that lands between two updates.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ComputeTotals {
    pub count: u64,
    /// Writing the inputs into the batch buffer (on a GPU: the upload).
    pub input_ns: u64,
    /// The forward pass.
    pub infer_ns: u64,
    /// Splitting the batch's logits into the answers.
    pub output_ns: u64,
}

/// The time of each compute stage of one batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

impl ModelStats {
    pub fn record_batch(&self, inputs: usize, times: BatchTimes) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        self.inference_count
            .fetch_add(inputs as u64, Ordering::Relaxed);
        let n = inputs as u64;
        let ns = |d: Duration| d.as_nanos() as u64 * n;
        {
            let mut c = self.compute.lock().unwrap_or_else(|e| e.into_inner());
            c.count += n;
            c.input_ns += ns(times.input);
            c.infer_ns += ns(times.infer);
            c.output_ns += ns(times.output);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.last_inference_ms.store(now, Ordering::Relaxed);
    }

    /// A consistent snapshot of the compute stages.
    pub fn compute(&self) -> ComputeTotals {
        *self.compute.lock().unwrap_or_else(|e| e.into_inner())
    }
}
