//! slimtrain: training and compression for slimserve models.

pub mod data;
