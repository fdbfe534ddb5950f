//! The server: binds the gRPC and metrics ports, loads and warms up the models, serves until
//! the shutdown future resolves, then drains.
//!
//! Start-up order: both ports listen first, with gRPC health NOT_SERVING and every API
//! answering UNAVAILABLE; models load and warm up off the runtime; health turns SERVING.
//! Shutdown: health NOT_SERVING, new requests UNAVAILABLE, requests already accepted are
//! answered (up to `--shutdown-timeout`), then the ports close and [`Server::serve`] returns.

pub mod config;
pub mod shutdown;
mod tls;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic_health::ServingStatus;

pub use config::Config;

use crate::backend::DeviceError;
use crate::grpc;
use crate::pipeline::repository::StartupModels;
use crate::pipeline::{self, LoadError, LoadOptions, ModelControl, Pipeline, Repository};
use crate::scheduler::{BatcherConfig, Scheduler};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("TLS file {}: {source}", path.display())]
    Tls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// How long connections may take to close after the drain (their last answers flushed) before
/// the rest are dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// KServe v2 HTTP/REST (`--http-addr`), unless off.
    http: Option<TcpListener>,
    metrics: TcpListener,
}

/// Binds, serves and drains: what `slimserve serve` runs.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(config).await?.serve(shutdown).await
}

impl Server {
    /// Checks the device and TLS files, then binds both ports (port 0 picks a free one).
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        config.check_model_control().map_err(ServerError::Config)?;
        let device = config.device.open()?;
        tls::server_tls(&config)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let grpc = bind(config.grpc_addr).await?;
        let http = match config.http_listen_addr() {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let metrics = bind(config.metrics_addr).await?;
        Ok(Self {
            config,
            device,
            grpc,
            http,
            metrics,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The HTTP/REST port's address, unless `--http-addr off` (or TLS without it).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
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
        let http_addr = self.http_addr();
        let Server {
            config,
            device,
            grpc: grpc_listener,
            http: http_listener,
            metrics: metrics_listener,
        } = self;
        let prometheus = crate::telemetry::init();
        let limits = pipeline::Limits {
            max_image_pixels: config.max_image_pixels,
            max_message_bytes: config.max_message_bytes,
        };
        let pipeline =
            Arc::new(Pipeline::new(limits, config.decode_threads()).map_err(ServerError::Thread)?);
        let scheduler = Scheduler::start(
            config.inject_compute_delay,
            Some(config.idle_memory_release).filter(|d| !d.is_zero()),
        )
        .map_err(ServerError::Thread)?;

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }

        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let mut builder = transport::builder();
        if let Some(tls) = tls::server_tls(&config)? {
            builder = builder.tls_config(tls)?;
        }
        let router = grpc::add_services(
            builder.add_service(health_service),
            pipeline.clone(),
            config.kserve_input,
        );
        let (stop_http, http_stopped) = oneshot::channel::<()>();
        let http_task = http_listener.map(|listener| {
            let rest = crate::rest::router(
                grpc::KServeService::new(pipeline.clone(), config.kserve_input),
                config.max_message_bytes,
                config.http_repository_refusal(),
            );
            tokio::spawn(serve_http("HTTP/REST", listener, rest, async {
                let _ = http_stopped.await;
            }))
        });
        let incoming = transport::accept(grpc_listener);
        let grpc_task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = grpc_stopped.await;
        }));

        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        let metrics_task = tokio::spawn(serve_metrics(metrics_listener, prometheus, async {
            let _ = metrics_stopped.await;
        }));
        let http_note = match (http_addr, config.tls_cert.is_some()) {
            (Some(addr), false) => format!("KServe HTTP/REST on http://{addr}/v2"),
            (Some(addr), true) => {
                format!("KServe HTTP/REST on http://{addr}/v2 (plaintext: TLS covers gRPC only)")
            }
            (None, false) => "HTTP/REST off".into(),
            (None, true) => {
                "HTTP/REST off with TLS (--http-addr ADDR serves it in plaintext)".into()
            }
        };
        tracing::info!(
            "gRPC on {grpc_addr}, {http_note}, metrics on http://{metrics_addr}/metrics; loading models from {}",
            config.models.display()
        );

        let stop = |mut grpc_task: tokio::task::JoinHandle<_>,
                    metrics_task: tokio::task::JoinHandle<()>| async move {
            let _ = stop_grpc.send(());
            let _ = stop_http.send(());
            let _ = stop_metrics.send(());
            // The listeners close and each connection gets a GOAWAY, then the server task waits
            // for every connection to end. A client that never finishes the HTTP/2 handshake
            // (a half-open connection) or never reads would hold that forever: after
            // CLOSE_GRACE the remaining connections are dropped.
            let grpc_result: Result<Result<(), tonic::transport::Error>, _> =
                match tokio::time::timeout(CLOSE_GRACE, &mut grpc_task).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(
                            "connections still open {CLOSE_GRACE:?} after the drain (clients that never finished their handshake or never read): closing them"
                        );
                        grpc_task.abort();
                        Ok(Ok(()))
                    }
                };
            close_within(CLOSE_GRACE, metrics_task).await;
            if let Some(http_task) = http_task {
                close_within(CLOSE_GRACE, http_task).await;
            }
            match grpc_result {
                Ok(r) => r.map_err(ServerError::from),
                // The runtime is going away under us (its owner stopped waiting).
                Err(join) if join.is_cancelled() => Ok(()),
                Err(join) => panic!("gRPC server task panicked: {join}"),
            }
        };

        tokio::pin!(shutdown);
        let options = LoadOptions {
            dir: config.models.clone(),
            skip_bad_models: config.skip_bad_models,
            default_model: config.default_model.clone(),
            shadows: config.shadow.clone(),
            batching: BatcherConfig {
                max_batch_size: config.effective_max_batch_size(),
                max_batch_delay: config.max_batch_delay,
                queue_capacity: config.max_queue_size,
                max_in_flight: config.max_in_flight,
            },
            device_label: config.device.to_string(),
            int8_engine: config.int8_engine,
        };
        let scheduler = Arc::new(scheduler);
        let loader = scheduler.clone();
        let (control, startup) = (
            config.model_control,
            StartupModels(config.load_model.clone()),
        );
        let loading = async move {
            tokio::task::spawn_blocking(move || {
                Repository::start(options, control, &startup, device, loader)
            })
            .await
            .expect("model loading does not panic")
        };
        let models = tokio::select! {
            models = loading => models,
            _ = &mut shutdown => {
                tracing::info!("shutdown requested while loading models");
                return stop(grpc_task, metrics_task).await;
            }
        };
        let repository = match models {
            Ok(repository) => repository,
            Err(e) => {
                stop(grpc_task, metrics_task).await?;
                return Err(e.into());
            }
        };
        // What start-up loaded, logged once the models actually answer (below): a client that
        // waits for this line must not race the switch to ready.
        let models = repository.snapshot();
        let loaded = (
            models.len(),
            models.default_name().unwrap_or("-").to_string(),
        );
        drop(models);
        let stop_polling = Arc::new(AtomicBool::new(false));
        let poller = match control {
            ModelControl::Poll => Some(
                repository
                    .spawn_poller(
                        std::time::Duration::from_secs(config.repository_poll_secs),
                        stop_polling.clone(),
                    )
                    .map_err(ServerError::Thread)?,
            ),
            _ => None,
        };
        pipeline.set_repository(repository);
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        match loaded {
            (0, _) if control == ModelControl::Explicit => tracing::info!(
                "model control explicit: no model loaded at start-up (load them with RepositoryModelLoad, or --load-model)"
            ),
            (0, _) => tracing::warn!(
                "no models found in {}: serving none (put model directories there{})",
                config.models.display(),
                if control == ModelControl::Poll {
                    "; they are picked up on the next poll"
                } else {
                    " and restart"
                }
            ),
            (n, default) => tracing::info!(
                "serving {n} model(s), default {default}; model control {control:?}"
            ),
        }

        shutdown.await;
        tracing::info!(
            "shutting down: draining accepted requests (up to {:?})",
            config.shutdown_timeout
        );
        pipeline.drain.start();
        stop_polling.store(true, Ordering::Relaxed);
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        if tokio::time::timeout(config.shutdown_timeout, pipeline.drain.idle())
            .await
            .is_err()
        {
            tracing::warn!("shutdown timeout passed with requests still running; closing anyway");
        }
        let result = stop(grpc_task, metrics_task).await;
        if let Some(poller) = poller {
            // A pass in progress finishes (at most one model load).
            let _ = tokio::task::spawn_blocking(move || poller.join()).await;
        }
        // The compute thread stops once the last handle (held by the pipeline's models) goes.
        drop(pipeline);
        drop(scheduler);
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
    serve_http("metrics", listener, app, stop).await;
}

/// Serves an HTTP/1 router on `listener` until `stop` resolves (connections then finish).
async fn serve_http(
    what: &str,
    listener: TcpListener,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("{what} server: {e}");
    }
}

/// Waits up to `grace` for a server task to finish its connections, then drops them.
async fn close_within(grace: std::time::Duration, mut task: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(grace, &mut task).await.is_err() {
        task.abort();
    }
}
