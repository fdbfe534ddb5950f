//! Test harness: tiny models made on the spot, the real server in-process on loopback port 0,
//! and clients for each API.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use slimserve::formats::model_dir::{self, ModelConfig};
use slimserve::grpc::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use slimserve::grpc::pb::slimserve::v1 as pb;
use slimserve::server::{Config, Server, ServerError};
use slimserve::zoo::{Arch, ModelSpec};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub use pb::classifier_client::ClassifierClient;

/// Side of the test models' square input.
pub const SIZE: usize = 32;
/// Classes of the test models.
pub const CLASSES: usize = 4;

/// Writes a 32x32 `student` with 4 classes to `root/name` whose logits depend on its input
/// (calibrated, then perturbed BatchNorms: `zoo::test_models`), seeded by its name, so that
/// mixed-up batch rows, a wrong layout or a swapped input change the answers.
pub fn make_model(root: &Path, name: &str) {
    make_model_sized(root, name, SIZE);
}

/// As [`make_model`], at another input size.
pub fn make_model_sized(root: &Path, name: &str, size: usize) {
    let spec = ModelSpec::new(Arch::Student, CLASSES, size);
    let (varmap, _) =
        slimserve::zoo::test_models::input_dependent(&spec, slimserve::fnv1a64(name.as_bytes()));
    let tensors = slimserve::zoo::varmap_tensors(&varmap);
    let mut config = ModelConfig::new(spec, model_dir::default_labels(CLASSES));
    config.provenance.val_accuracy = Some(0.5);
    model_dir::save(&root.join(name), &config, &tensors).unwrap();
}

/// The venv interpreter (`$SLIMSERVE_PYTHON`, else `.venv/bin/python` at the workspace root),
/// checked to import `modules`; a missing one fails the test with the fix, never skips it.
pub fn python(modules: &str) -> std::path::PathBuf {
    let python = std::env::var_os("SLIMSERVE_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import {modules}: run `bash .ci/setup` (installs tests/python/requirements.txt into .venv) or set SLIMSERVE_PYTHON",
        python.display()
    );
    python
}

pub struct TestServer {
    pub grpc: SocketAddr,
    /// KServe v2 HTTP/REST (on, at loopback port 0, unless a test turns it off).
    pub http: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub dir: TempDir,
    /// How the harness's own clients connect, when the server uses TLS.
    tls: Option<ClientTlsConfig>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

/// A config for loopback port 0 serving the models in `dir`.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::with_models(dir);
    c.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.metrics_addr = "127.0.0.1:0".parse().unwrap();
    c.http_addr = Some(slimserve::rest::HttpAddr::On(
        "127.0.0.1:0".parse().unwrap(),
    ));
    c
}

impl TestServer {
    /// Serves freshly made models named `models`; `tweak` adjusts the config. Waits until ready.
    pub async fn start(models: &[&str], tweak: impl FnOnce(&mut Config)) -> Self {
        let server = Self::start_unready(models, tweak).await;
        server.wait_serving().await;
        server
    }

    /// As [`TestServer::start`], without waiting for the models to load.
    pub async fn start_unready(models: &[&str], tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in models {
            make_model(dir.path(), name);
        }
        Self::spawn(dir, tweak).await
    }

    /// Serves the model repository already written in `dir`; waits until ready.
    pub async fn start_dir(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let server = Self::spawn(dir, tweak).await;
        server.wait_serving().await;
        server
    }

    async fn spawn(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut c = config(dir.path());
        tweak(&mut c);
        let server = Server::bind(c).await.unwrap();
        let (grpc, metrics, http) = (
            server.grpc_addr(),
            server.metrics_addr(),
            server.http_addr(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        Self {
            grpc,
            http,
            metrics,
            dir,
            tls: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// As [`TestServer::start`] for a TLS server; the harness connects with `tls`.
    pub async fn start_tls(
        models: &[&str],
        tls: ClientTlsConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut server = Self::start_unready(models, tweak).await;
        server.tls = Some(tls);
        server.wait_serving().await;
        server
    }

    pub async fn channel(&self) -> Channel {
        match &self.tls {
            None => Channel::from_shared(format!("http://{}", self.grpc))
                .unwrap()
                .connect()
                .await
                .unwrap(),
            Some(tls) => Channel::from_shared(format!("https://localhost:{}", self.grpc.port()))
                .unwrap()
                .tls_config(tls.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        }
    }

    pub async fn classifier(&self) -> ClassifierClient<Channel> {
        ClassifierClient::new(self.channel().await)
    }

    pub async fn kserve(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel().await)
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut client = HealthClient::new(self.channel().await);
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        r.into_inner().status()
    }

    pub async fn wait_serving(&self) {
        for _ in 0..500 {
            if self.health("").await == ServingStatus::Serving {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not become SERVING");
    }

    /// Starts graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server stops within 30 s")
            .unwrap()
    }

    /// The metrics recorder is global to the test process and the tests run in parallel: a test
    /// that reads a per-model series must use a model name no other test serves.
    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
    }
}

/// A minimal HTTP/1.1 GET; returns the body (panics on any failure or a non-200 answer).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// A minimal HTTP/1.1 GET; the body of a 200 answer, or what went wrong.
pub fn try_http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.to_string());
    }
    Ok(
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// A PNG of the given size with a simple gradient.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    png_seeded(w, h, 0)
}

/// A PNG whose pixels depend on `seed`: different seeds, different images.
pub fn png_seeded(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17 * x) % 256) as u8,
            ((x + y + seed * 53) % 256) as u8,
        ])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 3 % 256) as u8, (y * 3 % 256) as u8, 100])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

pub fn image_request(model: &str, bytes: Vec<u8>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        model: model.into(),
        input: Some(pb::classify_request::Input::Image(bytes.into())),
        ..Default::default()
    }
}

pub fn tensor_request(
    model: &str,
    dtype: pb::DataType,
    shape: &[i64],
    data: Vec<u8>,
) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        model: model.into(),
        input: Some(pb::classify_request::Input::Tensor(pb::Tensor {
            dtype: dtype as i32,
            shape: shape.to_vec(),
            data: data.into(),
        })),
        include_logits: true,
        ..Default::default()
    }
}

/// A deterministic preprocessed input: `n` CHW images as little-endian f32 bytes.
pub fn f32_input(n: usize, seed: u32) -> (Vec<f32>, Vec<u8>) {
    let v: Vec<f32> = (0..n * 3 * SIZE * SIZE)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0)
        .collect();
    let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    (v, bytes)
}

/// Asserts that a request succeeds: the server is still serving.
pub async fn assert_serving(client: &mut ClassifierClient<Channel>, model: &str) {
    let r = client
        .classify(image_request(model, png(40, 30)))
        .await
        .expect("a good request after a bad one succeeds")
        .into_inner();
    assert_eq!(r.predictions.len(), CLASSES.min(5));
}

/// Asserts the status code and that the message contains each of `needles`.
pub fn assert_status(status: &tonic::Status, code: tonic::Code, needles: &[&str]) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "message `{}` lacks `{n}`",
            status.message()
        );
    }
}

/// The value of one Prometheus sample line `name{labels} value`, if present.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Max absolute difference of two equal-length vectors.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Writes `root/to`: the model in `root/from` in the int8 format, its activation ranges
/// calibrated by the f32 engine on `images` deterministic inputs (as `slimtrain quantize
/// --format int8` does with photos).
pub fn make_int8_model(root: &Path, from: &str, to: &str, images: usize) {
    let loaded = model_dir::load(&root.join(from)).unwrap();
    let model = loaded.build(&candle_core::Device::Cpu).unwrap();
    let fast = slimserve::infer::FastModel::compile(&model).unwrap();
    let (x, _) = f32_input(images, 99);
    let ranges = fast.calibrate(&x, images);
    let flat: Vec<f32> = ranges.iter().flat_map(|r| [r.0, r.1]).collect();
    let mut tensors = loaded.tensors.clone();
    tensors.insert(
        slimserve::formats::weights::ACTIVATION_RANGES_KEY.into(),
        candle_core::Tensor::from_vec(flat, (ranges.len(), 2), &candle_core::Device::Cpu).unwrap(),
    );
    let mut config = loaded.config.clone();
    config.weights.format = slimserve::formats::weights::WeightFormat::Int8;
    model_dir::save(&root.join(to), &config, &tensors).unwrap();
}
