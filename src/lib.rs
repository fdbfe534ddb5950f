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
pub mod infer;
pub mod load;
pub mod ops;
pub mod preprocess;
pub mod server;
pub mod telemetry;
pub mod zoo;

/// `1234567` -> `1,234,567`, for tables people read.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
