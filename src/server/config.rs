//! `slimserve serve` configuration: one clap struct, every flag also read from an environment
//! variable (`SLIMSERVE_*`), so containers configure it without a command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::backend::DeviceSpec;
use crate::grpc::KServeInput;
use crate::pipeline::{Int8Engine, ModelControl, ShadowRule};
use crate::preprocess::DEFAULT_MAX_PIXELS;
use crate::rest::HttpAddr;

/// The HTTP/REST port's address when `--http-addr` is unset (Triton's).
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8000";

/// `--max-batch-size` when unset, on the CPU.
pub const DEFAULT_CPU_MAX_BATCH: usize = 32;
/// `--max-batch-size` when unset, with `--device cuda`.
pub const DEFAULT_GPU_MAX_BATCH: usize = 128;

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// The model repository: one sub-directory per model, either flat (config.json + weights,
    /// served as version 1) or one numbered sub-directory per version (NAME/1/, NAME/2/, ...)
    /// with an optional NAME/policy.json choosing the versions served (default: the newest
    /// that loads). Change it to serve models from elsewhere, e.g. a mounted volume.
    #[arg(long, env = "SLIMSERVE_MODELS", default_value = "models")]
    pub models: PathBuf,

    /// How the served models may change while serving: `none` (load at start-up, never
    /// change), `poll` (rescan --models every --repository-poll-secs and load, swap or unload
    /// what changed, without dropping a request) or `explicit` (KServe RepositoryModelLoad /
    /// RepositoryModelUnload, e.g. tritonclient's load_model; only over TLS or on a loopback
    /// --grpc-addr unless --allow-remote-model-control).
    #[arg(
        long,
        env = "SLIMSERVE_MODEL_CONTROL",
        value_enum,
        default_value = "none"
    )]
    pub model_control: ModelControl,

    /// Seconds between rescans of --models with `--model-control poll`.
    #[arg(long, env = "SLIMSERVE_REPOSITORY_POLL_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub repository_poll_secs: u64,

    /// With `--model-control explicit`: a model to load at start-up (repeat the flag or
    /// separate by commas; `*` loads every model). Others wait for RepositoryModelLoad.
    #[arg(
        long = "load-model",
        env = "SLIMSERVE_LOAD_MODEL",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub load_model: Vec<String>,

    /// Serve RepositoryModelLoad/Unload (`--model-control explicit`) on a non-loopback
    /// address without TLS. Anyone who reaches the port could then swap the models.
    #[arg(long, env = "SLIMSERVE_ALLOW_REMOTE_MODEL_CONTROL")]
    pub allow_remote_model_control: bool,

    /// gRPC listen address (own API, KServe v2, health, reflection). 8001 is Triton's gRPC
    /// port, which perf_analyzer and tritonclient expect.
    #[arg(long, env = "SLIMSERVE_GRPC_ADDR", default_value = "0.0.0.0:8001")]
    pub grpc_addr: SocketAddr,

    /// KServe v2 over HTTP/REST listen address (Triton's port 8000: perf_analyzer's default
    /// `-i http`, tritonclient.http, curl), or `off`. Default: 0.0.0.0:8000, and `off` with
    /// --tls-cert (this port has no TLS: name an address to serve it in plaintext anyway).
    #[arg(long, env = "SLIMSERVE_HTTP_ADDR", value_name = "ADDR|off")]
    pub http_addr: Option<HttpAddr>,

    /// Prometheus `/metrics` listen address (HTTP). 8002 is Triton's metrics port.
    #[arg(long, env = "SLIMSERVE_METRICS_ADDR", default_value = "0.0.0.0:8002")]
    pub metrics_addr: SocketAddr,

    /// Model answering requests that name none. Default: the first model by name.
    #[arg(long, env = "SLIMSERVE_DEFAULT_MODEL")]
    pub default_model: Option<String>,

    /// Where models run: cpu, cuda or cuda:N (needs a build with `--features cuda`).
    #[arg(long, env = "SLIMSERVE_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,

    /// Which engine computes int8 model directories (`slimtrain quantize --format int8`) on the
    /// CPU: `auto` (the int8 engine where the CPU has AVX-512 VNNI, where it is the faster one;
    /// elsewhere the fused f32 engine on the dequantized weights, logged at load), `int8`
    /// (always the int8 engine, on whatever int8 kernels the CPU has) or `f32`. ListModels and
    /// `slimserve_model_info` name the engine each model got.
    #[arg(
        long,
        env = "SLIMSERVE_INT8_ENGINE",
        value_enum,
        default_value = "auto"
    )]
    pub int8_engine: Int8Engine,

    /// Most inputs per forward pass. Default: 32 on the CPU (where a batch runs image by image
    /// on the cores and larger ones only add latency), 128 with `--device cuda` (where one
    /// forward pass over many images is what fills the GPU). Batches never wait at low load
    /// (see --max-batch-delay), so a large maximum costs nothing when traffic is light.
    #[arg(long, env = "SLIMSERVE_MAX_BATCH_SIZE",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch_size: Option<u32>,

    /// Longest a batch waits for more inputs after its first (e.g. 2ms, 500us; 0 = take what
    /// is queued). It only waits while more of the model's inputs are already admitted and
    /// being decoded, so an input reaching an idle model runs at once; raise it when many
    /// clients send photos and throughput matters more than the last millisecond.
    #[arg(long, env = "SLIMSERVE_MAX_BATCH_DELAY", default_value = "2ms", value_parser = parse_duration)]
    pub max_batch_delay: Duration,

    /// Inputs that may wait in each model's queue before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SLIMSERVE_MAX_QUEUE_SIZE", default_value_t = 256)]
    pub max_queue_size: usize,

    /// Inputs per model admitted and not yet answered (decoding, queued or computing) before
    /// new ones get RESOURCE_EXHAUSTED. Bounds memory held by decoded images.
    #[arg(long, env = "SLIMSERVE_MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,

    /// Largest gRPC request message; bigger ones get RESOURCE_EXHAUSTED. Raise it for large
    /// raw-tensor batches.
    #[arg(long, env = "SLIMSERVE_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,

    /// Threads that decode and resize images, at a lower priority than inference so that a
    /// burst of photos cannot starve it. Default: half the cores (at least 1).
    #[arg(long, env = "SLIMSERVE_DECODE_THREADS")]
    pub decode_threads: Option<usize>,

    /// The input KServe ModelMetadata/ModelConfig declare: `image` (UINT8 [-1,S,S,3] RGB
    /// pixels, the default: perf_analyzer's random data is then valid pixels, where random
    /// FP32 bits include NaNs, which are refused) or `input` (FP32 [-1,3,S,S], preprocessed).
    /// perf_analyzer sends what is declared; ModelInfer accepts either, whatever is declared.
    #[arg(
        long,
        env = "SLIMSERVE_KSERVE_INPUT",
        value_enum,
        default_value = "image"
    )]
    pub kserve_input: KServeInput,

    /// Images whose header claims more pixels are refused before decoding.
    #[arg(long, env = "SLIMSERVE_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,

    /// Log and skip model directories that fail to load instead of refusing to start.
    #[arg(long, env = "SLIMSERVE_SKIP_BAD_MODELS")]
    pub skip_bad_models: bool,

    /// PEM certificate chain: serve gRPC over TLS (needs --tls-key).
    #[arg(long, env = "SLIMSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "SLIMSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "SLIMSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Mirror a sampled fraction of SOURCE's inputs to TARGET off the critical path and export
    /// how often they agree (`slimserve_shadow_requests_total`) and their logit gap, e.g.
    /// `--shadow kd-q8=big:0.1`. FRACTION defaults to 1; repeat the flag (or separate rules by
    /// commas) for several sources. Both models need the same input size and labels.
    #[arg(
        long = "shadow",
        env = "SLIMSERVE_SHADOW",
        value_name = "SOURCE=TARGET[:FRACTION]",
        value_delimiter = ','
    )]
    pub shadow: Vec<ShadowRule>,

    /// After this long without a batch, free the batch buffer and the engine's scratch memory
    /// (activations, im2col and Winograd bands: high-water marks of past load) so that an idle
    /// server holds its models and little else; the first batch after it pays a few page
    /// faults. `0` keeps them for the process's life.
    #[arg(long, env = "SLIMSERVE_IDLE_MEMORY_RELEASE", default_value = "10s", value_parser = parse_span)]
    pub idle_memory_release: Duration,

    /// After SIGTERM/SIGINT, how long accepted requests may take to finish before exit.
    #[arg(long, env = "SLIMSERVE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_span)]
    pub shutdown_timeout: Duration,

    /// Fault injection: extra time added to every batch's compute, to rehearse overload
    /// (queueing, deadlines, shedding) on fast models. Never set in production.
    #[arg(long, env = "SLIMSERVE_INJECT_COMPUTE_DELAY", default_value = "0", value_parser = parse_duration, hide = true)]
    pub inject_compute_delay: Duration,
}

impl Config {
    /// The largest batch: `--max-batch-size`, else the device's default (32 on the CPU, 128 on
    /// a GPU).
    pub fn effective_max_batch_size(&self) -> usize {
        match (self.max_batch_size, self.device) {
            (Some(n), _) => n as usize,
            (None, DeviceSpec::Cpu) => DEFAULT_CPU_MAX_BATCH,
            (None, DeviceSpec::Cuda(_)) => DEFAULT_GPU_MAX_BATCH,
        }
    }

    /// Refuses `--model-control explicit` where anyone on the network could use it: a
    /// non-loopback --grpc-addr without TLS, unless --allow-remote-model-control.
    pub fn check_model_control(&self) -> Result<(), String> {
        let exposed = !self.grpc_addr.ip().is_loopback() && self.tls_cert.is_none();
        if self.model_control == ModelControl::Explicit
            && exposed
            && !self.allow_remote_model_control
        {
            return Err(format!(
                "--model-control explicit lets any client that reaches {} load and unload models, \
                 and it is neither loopback nor TLS: bind a loopback address (--grpc-addr \
                 127.0.0.1:{}), serve TLS (--tls-cert/--tls-key), or pass \
                 --allow-remote-model-control",
                self.grpc_addr,
                self.grpc_addr.port()
            ));
        }
        if self.model_control != ModelControl::Explicit && !self.load_model.is_empty() {
            return Err(
                "--load-model needs --model-control explicit (the other modes load every model)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Where the HTTP/REST port listens: `--http-addr`, else 0.0.0.0:8000 without TLS and
    /// nowhere with it.
    pub fn http_listen_addr(&self) -> Option<SocketAddr> {
        match self.http_addr {
            Some(HttpAddr::On(addr)) => Some(addr),
            Some(HttpAddr::Off) => None,
            None if self.tls_cert.is_some() => None,
            None => Some(DEFAULT_HTTP_ADDR.parse().expect("valid address")),
        }
    }

    /// Why the HTTP/REST port refuses repository load/unload (`None`: it serves them, as far
    /// as `--model-control` allows): it has no TLS, so only on loopback, or with
    /// --allow-remote-model-control.
    pub fn http_repository_refusal(&self) -> Option<String> {
        let addr = self.http_listen_addr()?;
        if self.model_control != ModelControl::Explicit
            || addr.ip().is_loopback()
            || self.allow_remote_model_control
        {
            return None;
        }
        Some(format!(
            "repository load/unload over HTTP on {addr} (no TLS, not loopback) is refused: use gRPC \
             (over TLS or on loopback), a loopback --http-addr, or --allow-remote-model-control"
        ))
    }

    /// The defaults, as `slimserve serve` with no flags and no environment would have them.
    pub fn with_models(models: impl Into<PathBuf>) -> Self {
        Self {
            models: models.into(),
            model_control: ModelControl::None,
            repository_poll_secs: 15,
            load_model: Vec::new(),
            allow_remote_model_control: false,
            grpc_addr: "0.0.0.0:8001".parse().expect("valid address"),
            http_addr: None,
            metrics_addr: "0.0.0.0:8002".parse().expect("valid address"),
            default_model: None,
            device: DeviceSpec::Cpu,
            max_batch_size: None,
            max_batch_delay: Duration::from_millis(2),
            max_queue_size: 256,
            max_in_flight: 512,
            max_message_bytes: 16 << 20,
            max_image_pixels: DEFAULT_MAX_PIXELS,
            decode_threads: None,
            kserve_input: KServeInput::Image,
            int8_engine: Int8Engine::Auto,
            skip_bad_models: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            shadow: Vec::new(),
            shutdown_timeout: Duration::from_secs(30),
            idle_memory_release: Duration::from_secs(10),
            inject_compute_delay: Duration::ZERO,
        }
    }
}

impl Config {
    /// `--decode-threads`, or half the cores (at least one).
    pub fn decode_threads(&self) -> usize {
        self.decode_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1)
        })
    }
}

/// Parses a length of time that needs its unit (`30s`, `2m`, `500ms`; `0` = zero): the run
/// lengths and timeouts, where a bare `30` would read as 30 milliseconds to the parser and as
/// 30 seconds to the user.
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        let zero = t.parse::<f64>().is_ok_and(|v| v == 0.0);
        if !zero {
            return Err(format!(
                "`{t}` needs a unit: e.g. {t}s or {t}ms (ns, us, ms, s or m)"
            ));
        }
    }
    parse_duration(s)
}

/// Parses `250us`, `2ms`, `1.5s`, `1m`; a bare number is milliseconds (`0` = zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: expected e.g. 2ms, 500us, 1.5s"))?;
    let seconds = match unit.trim() {
        "" | "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "s" => value,
        "m" => value * 60.0,
        other => {
            return Err(format!(
                "invalid duration unit `{other}` in `{s}`: use ns, us, ms, s or m"
            ))
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("invalid duration `{s}`"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses serve flags as the binary does (environment variables aside).
    fn parse(args: &[&str]) -> Config {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: Config,
        }
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("slimserve").chain(args.iter().copied()))
            .unwrap()
            .config
    }

    #[test]
    fn max_batch_size_defaults_follow_the_device_and_the_flag_wins() {
        // The environment would override the defaults under test.
        if std::env::var_os("SLIMSERVE_MAX_BATCH_SIZE").is_some() {
            panic!("unset SLIMSERVE_MAX_BATCH_SIZE to run this test");
        }
        assert_eq!(parse(&[]).effective_max_batch_size(), 32);
        assert_eq!(parse(&["--device", "cuda"]).effective_max_batch_size(), 128);
        assert_eq!(
            parse(&["--device", "cuda:1"]).effective_max_batch_size(),
            128
        );
        let set = parse(&["--device", "cuda", "--max-batch-size", "8"]);
        assert_eq!(set.effective_max_batch_size(), 8);
        assert_eq!(
            parse(&["--max-batch-size", "256"]).effective_max_batch_size(),
            256
        );
        assert_eq!(
            Config::with_models("m").effective_max_batch_size(),
            DEFAULT_CPU_MAX_BATCH
        );
    }

    #[test]
    fn http_port_defaults_to_8000_and_is_off_with_tls_unless_named() {
        if std::env::var_os("SLIMSERVE_HTTP_ADDR").is_some() {
            panic!("unset SLIMSERVE_HTTP_ADDR to run this test");
        }
        let addr = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(parse(&[]).http_listen_addr(), addr("0.0.0.0:8000"));
        assert_eq!(parse(&["--http-addr", "off"]).http_listen_addr(), None);
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        assert_eq!(parse(&tls).http_listen_addr(), None);
        let named = [&tls[..], &["--http-addr", "127.0.0.1:9000"]].concat();
        assert_eq!(parse(&named).http_listen_addr(), addr("127.0.0.1:9000"));
        // Repository changes over plaintext HTTP: loopback, or allowed explicitly.
        let explicit = [
            "--model-control",
            "explicit",
            "--grpc-addr",
            "127.0.0.1:8001",
        ];
        assert!(parse(&explicit).http_repository_refusal().is_some());
        let lo = [&explicit[..], &["--http-addr", "127.0.0.1:8000"]].concat();
        assert_eq!(parse(&lo).http_repository_refusal(), None);
        let allowed = [&explicit[..], &["--allow-remote-model-control"]].concat();
        assert_eq!(parse(&allowed).http_repository_refusal(), None);
        assert_eq!(parse(&[]).http_repository_refusal(), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
        // Run lengths and timeouts need a unit.
        assert_eq!(parse_span("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_span("0").unwrap(), Duration::ZERO);
        let err = parse_span("4").unwrap_err();
        assert!(err.contains("needs a unit") && err.contains("4s"), "{err}");
        assert!(parse_span("2.5").is_err());
        assert!(parse_span("fast").is_err());
    }
}
