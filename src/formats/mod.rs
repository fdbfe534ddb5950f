//! On-disk formats: weight encodings and the model directory.

pub mod weights;
