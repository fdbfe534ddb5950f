//! The server: binds the gRPC and metrics ports, loads and warms up the models, serves until
//! the shutdown future resolves, then drains.
//!
//! Start-up order: both ports listen first, with gRPC health NOT_SERVING and every API
//! answering UNAVAILABLE; models load and warm up off the runtime; health turns SERVING.
//! Shutdown: health NOT_SERVING, new requests UNAVAILABLE, requests already accepted are
//! answered (up to `--shutdown-timeout`), then the ports close and [`Server::serve`] returns.

pub mod config;
pub mod models;
pub mod shadow;
pub mod shutdown;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic_health::ServingStatus;

pub use config::Config;
pub use models::{Models, ServedModel};
pub use shadow::ShadowRule;
pub use shutdown::{Drain, RequestGuard};

use crate::backend::DeviceError;
use crate::error::Error;
use crate::formats::model_dir::ModelDirError;
use crate::grpc;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot read the model directory {}: {source}", path.display())]
    ModelsDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model failed to load: {source} (start with --skip-bad-models to serve the others)")]
    Model { source: ModelDirError },
    #[error("model {model} failed its warm-up forward pass: {message}")]
    Warmup { model: String, message: String },
    #[error("--default-model {name} is not among the loaded models ({available})")]
    DefaultModel { name: String, available: String },
    #[error("TLS file {}: {source}", path.display())]
    Tls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("--shadow {rule}: {message}")]
    Shadow { rule: String, message: String },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// What every RPC handler shares.
#[derive(Debug)]
pub struct State {
    /// Set once, when every model is loaded and warmed up.
    models: OnceLock<Models>,
    pub drain: Drain,
    /// Decoded images over this many pixels are refused from their header.
    pub max_image_pixels: u64,
    pub max_message_bytes: usize,
}

impl State {
    pub fn new(config: &Config) -> Self {
        Self {
            models: OnceLock::new(),
            drain: Drain::default(),
            max_image_pixels: config.max_image_pixels,
            max_message_bytes: config.max_message_bytes,
        }
    }

    /// Admits a request: UNAVAILABLE while starting or draining.
    pub fn begin(&self) -> Result<(RequestGuard, &Models), Error> {
        let guard = self.drain.begin()?;
        let models = self.models.get().ok_or(Error::Starting)?;
        Ok((guard, models))
    }

    /// The models once loaded (for metadata calls that need no drain guard).
    pub fn models(&self) -> Option<&Models> {
        self.models.get()
    }

    pub fn is_ready(&self) -> bool {
        self.models.get().is_some() && !self.drain.is_draining()
    }
}

/// gRPC service names whose health is reported (plus "" for the whole server).
const HEALTH_SERVICES: &[&str] = &[
    "",
    "slimserve.v1.Classifier",
    "inference.GRPCInferenceService",
];

/// A server with its ports bound; [`Server::serve`] runs it.
pub struct Server {
    config: Config,
    /// Opened at bind time, so a bad `--device` fails before anything listens.
    device: candle_core::Device,
    grpc: TcpListener,
    metrics: TcpListener,
}

/// Binds, serves and drains: what `slimserve serve` runs.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(config).await?.serve(shutdown).await
}

impl Server {
    /// Checks the device and TLS files, then binds both ports (port 0 picks a free one).
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let device = config.device.open()?;
        tls::server_tls(&config)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let grpc = bind(config.grpc_addr).await?;
        let metrics = bind(config.metrics_addr).await?;
        Ok(Self {
            config,
            device,
            grpc,
            metrics,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let grpc_addr = self.grpc_addr();
        let metrics_addr = self.metrics_addr();
        let Server {
            config,
            device,
            grpc: grpc_listener,
            metrics: metrics_listener,
        } = self;
        let prometheus = crate::telemetry::init();
        let state = Arc::new(State::new(&config));

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }

        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls::server_tls(&config)? {
            builder = builder.tls_config(tls)?;
        }
        let router = grpc::add_services(builder.add_service(health_service), state.clone());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        let grpc_task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = grpc_stopped.await;
        }));

        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        let metrics_task = tokio::spawn(serve_metrics(metrics_listener, prometheus, async {
            let _ = metrics_stopped.await;
        }));
        tracing::info!(
            "gRPC on {grpc_addr}, metrics on http://{metrics_addr}/metrics; loading models from {}",
            config.models.display()
        );

        let stop = |grpc_task: tokio::task::JoinHandle<_>,
                    metrics_task: tokio::task::JoinHandle<_>| async move {
            let _ = stop_grpc.send(());
            let _ = stop_metrics.send(());
            let grpc_result: Result<Result<(), tonic::transport::Error>, _> = grpc_task.await;
            let _ = metrics_task.await;
            match grpc_result {
                Ok(r) => r.map_err(ServerError::from),
                Err(join) => panic!("gRPC server task panicked: {join}"),
            }
        };

        tokio::pin!(shutdown);
        let load_config = config.clone();
        let loading = async {
            let loaded = tokio::task::spawn_blocking(move || models::load_all(&load_config))
                .await
                .expect("model loading does not panic")?;
            models::start(loaded, &config, &device).await
        };
        let models = tokio::select! {
            models = loading => models,
            _ = &mut shutdown => {
                tracing::info!("shutdown requested while loading models");
                return stop(grpc_task, metrics_task).await;
            }
        };
        let models = match models {
            Ok(models) => models,
            Err(e) => {
                stop(grpc_task, metrics_task).await?;
                return Err(e);
            }
        };
        if models.is_empty() {
            tracing::warn!(
                "no models found in {}: serving none (put model directories there and restart)",
                config.models.display()
            );
        } else {
            tracing::info!(
                "serving {} model(s), default {}",
                models.len(),
                models.default_name().unwrap_or("-")
            );
        }
        state.models.set(models).expect("models are set once, here");
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }

        shutdown.await;
        tracing::info!(
            "shutting down: draining accepted requests (up to {:?})",
            config.shutdown_timeout
        );
        state.drain.start();
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        if tokio::time::timeout(config.shutdown_timeout, state.drain.idle())
            .await
            .is_err()
        {
            tracing::warn!("shutdown timeout passed with requests still running; closing anyway");
        }
        let result = stop(grpc_task, metrics_task).await;
        tracing::info!("stopped");
        result
    }
}

/// Serves `GET /metrics` (Prometheus text format) until `stop` resolves.
async fn serve_metrics(
    listener: TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    handle.render(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("metrics server: {e}");
    }
}
