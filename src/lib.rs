//! slimserve: small, fast image classifiers.
//!
//! The library is shared by the server binary (`slimserve`) and the training crate
//! (`slimtrain`), so that architectures, weight formats and preprocessing are defined once.

pub mod formats;
pub mod ops;
pub mod preprocess;
pub mod zoo;
