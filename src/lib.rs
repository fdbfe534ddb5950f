//! slimserve: small, fast image classifiers.
//!
//! The library is shared by the server binary (`slimserve`) and the training crate
//! (`slimtrain`), so that architectures, weight formats and preprocessing are defined once.
//!
//! Serving, in request order: [`grpc`] (both APIs, status codes) -> [`batcher`] (per-model
//! queue, dynamic batching, overload) -> [`backend`] (executor threads running [`zoo`] models).
//! [`server`] wires them together with health, reflection, TLS and graceful shutdown;
//! [`telemetry`] defines every metric.

pub mod backend;
pub mod batcher;
pub mod client;
pub mod error;
pub mod formats;
pub mod grpc;
pub mod ops;
pub mod preprocess;
pub mod server;
pub mod telemetry;
pub mod zoo;
