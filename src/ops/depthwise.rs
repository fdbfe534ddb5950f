//! Depthwise 3x3 convolution (temporary generic path until the custom op lands).
use candle_core::{Result, Tensor};
pub fn depthwise_conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let c = w.dim(0)?;
    x.conv2d(w, 1, 1, 1, c)
}
