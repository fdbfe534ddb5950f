//! Depthwise 3x3 convolution as a candle custom op (placeholder, filled in by its branch).
