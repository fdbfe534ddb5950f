//! Bilinear resizing of image batches on any device, for a teacher whose input size differs
//! from the student's: `[N, C, H, W] -> [N, C, S, S]`.
//!
//! Sampling as PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` without
//! antialiasing: output pixel `i` reads source position `(i + 0.5) * in / out - 0.5`, clamped
//! to the image, between its two neighbours. Each axis is one matrix product with a sparse
//! `[out, in]` interpolation matrix, so it runs as plain matmuls wherever the tensor lives.

use candle_core::{Result, Tensor};

/// The `[out, in]` matrix whose row `i` holds the two interpolation weights of output `i`.
fn weights(input: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * input];
    let scale = input as f64 / out as f64;
    for i in 0..out {
        let src = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (input - 1) as f64);
        let i0 = src.floor() as usize;
        let i1 = (i0 + 1).min(input - 1);
        let frac = (src - i0 as f64) as f32;
        m[i * input + i0] += 1.0 - frac;
        m[i * input + i1] += frac;
    }
    m
}

/// Resizes `x` [N, C, H, W] to [N, C, size, size]; the same tensor when already that size.
pub fn resize_bilinear(x: &Tensor, size: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == (size, size) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let rh = Tensor::from_vec(weights(h, size), (size, h), dev)?;
    let rw_t = Tensor::from_vec(weights(w, size), (size, w), dev)?.t()?;
    // Rows: [N*C*H, W] x [W, S] -> [N, C, H, S]; columns: [S, H] x [N*C, H, S].
    let x = x.reshape((n * c * h, w))?.matmul(&rw_t)?;
    let x = x.reshape((n * c, h, size))?;
    rh.broadcast_left(n * c)?
        .matmul(&x)?
        .reshape((n, c, size, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_pytorch_bilinear_sampling() {
        // 4 -> 2: outputs read positions 0.5 and 2.5, i.e. means of neighbour pairs.
        let x = Tensor::new(&[0f32, 1., 2., 3.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap()
            .broadcast_as((1, 1, 4, 4))
            .unwrap()
            .contiguous()
            .unwrap();
        let y: Vec<Vec<f32>> = resize_bilinear(&x, 2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(y, vec![vec![0.5, 2.5], vec![0.5, 2.5]]);
        // 2 -> 4 (torch: [0, 0.25, 0.75, 1] for [0, 1]), edges clamped.
        let x = Tensor::new(&[[[[0f32, 1.], [0., 1.]]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = resize_bilinear(&x, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&y[..4], &[0.0, 0.25, 0.75, 1.0]);
        // A constant image stays constant (rows of the matrices sum to 1).
        let x = Tensor::full(0.3f32, (2, 3, 256, 256), &Device::Cpu).unwrap();
        let y = resize_bilinear(&x, 224).unwrap();
        assert_eq!(y.dims(), &[2, 3, 224, 224]);
        let err = (y - 0.3).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
