//! Custom tensor operations that candle lacks or runs slowly.

pub mod depthwise;
