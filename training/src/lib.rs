//! The `slimtrain` library: data loading, the training loop, distillation and pruning.
//! The `slimtrain` binary (src/main.rs) is its command line.

pub mod checkpoint;
pub mod data;
pub mod prune;
pub mod report;
pub mod train;
