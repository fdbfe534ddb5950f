//! On-disk formats: weight encodings, the model directory and ONNX export.

pub mod model_dir;
pub mod onnx;
pub mod weights;
