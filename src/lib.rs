//! slimserve: small, fast image classifiers.
//!
//! The library is shared by the server binary (`slimserve`) and the training crate
//! (`slimtrain`), so that architectures, weight formats and preprocessing are defined once.
//!
//! Serving, in request order: [`grpc`] (both APIs: protocol messages and status codes) ->
//! [`pipeline`] (admission, preprocessing, submission, waiting, shadow traffic: written once
//! for both APIs) -> [`scheduler`] (per-model queues, one compute thread shared by every
//! model, dynamic batching) -> [`backend`] (one batch of a [`zoo`] model on its device).
//! [`server`] wires them together with the transport, health, reflection, TLS and graceful
//! shutdown; [`telemetry`] defines every metric.

pub mod backend;
pub mod client;
pub mod error;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod infer;
pub mod load;
pub mod ops;
pub mod pipeline;
pub mod preprocess;
pub mod rest;
pub mod scheduler;
pub mod server;
pub mod simd;
pub mod telemetry;
pub mod zoo;

/// FNV-1a, 64 bit: a stable, dependency-free content hash (model versions, seeded weights).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

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
