//! On-disk formats: weight encodings and the model directory.

pub mod model_dir;
pub mod weights;
