//! On-disk formats: weight encodings and the model directory.

pub mod onnx;
pub mod weights;
