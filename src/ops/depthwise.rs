//! Depthwise 3x3 convolution (stride 1, zero padding 1, one filter per channel, no bias):
//!
//! ```text
//! y[n,c,h,w] = sum_{ky,kx in 0..3} w[c,0,ky,kx] * x[n,c,h+ky-1,w+kx-1]
//! x: [N,C,H,W], w: [C,1,3,3] -> y: [N,C,H,W]
//! ```
//!
//! It exists because candle's grouped convolution runs one full convolution per group, so a
//! depthwise layer (groups = channels) costs C separate im2col + matmul calls, which makes
//! depthwise-separable networks very slow on the CPU. Here the CPU forward and both backward
//! kernels are direct loops, parallel over (batch, channel) planes with rayon.
//!
//! Off the CPU (and inside [`super::with_device_generic_ops`]) the same convolution is
//! [`depthwise_conv3x3_shifted`]: nine shifted multiply-adds with per-channel weights in
//! candle's device-generic ops, about 20 kernel launches per layer on a GPU where the grouped
//! convolution would launch one convolution per channel (16 to 960 per layer).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, needs_grad, sum16, with_f32_slices, OpTimer};
use crate::simd::multiversion;

/// y[n,c] = sum_{ky,kx} w[c,0,ky,kx] * x[n,c,h+ky-1,w+kx-1] (zero padding). x: [N,C,H,W] f32, w: [C,1,3,3] f32 -> [N,C,H,W].
///
/// On the CPU this runs the custom op (with backprop support); on other devices
/// [`depthwise_conv3x3_shifted`], which there also accepts the other float dtypes.
pub fn depthwise_conv3x3(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    check_args(x, w)?;
    if !super::on_cpu(x) {
        return depthwise_conv3x3_shifted(x, w, None, 1);
    }
    // The kernels index planes directly, so strided views are copied once here.
    x.contiguous()?
        .apply_op2(&w.contiguous()?, DepthwiseConv3x3)
}

/// [`depthwise_conv3x3`] plus a per-channel bias `b` [C], fused into the same op (the bias
/// add would otherwise be one more full-size graph node, forward and backward).
pub fn depthwise_conv3x3_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let c = check_args(x, w)?;
    if b.dims() != [c] {
        bail!(
            "depthwise_conv3x3: bias must be [C] = [{c}], got {:?}",
            b.dims()
        );
    }
    if !super::on_cpu(x) {
        return depthwise_conv3x3_shifted(x, w, Some(b), 1);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, DepthwiseConv3x3Bias)
}

/// The depthwise 3x3 convolution (zero padding 1) with stride `stride` and an optional bias
/// `b` [C], in candle's device-generic ops: nine shifted views of the padded input, each
/// multiplied by its tap's per-channel weight and summed. Differentiable through candle's
/// autograd; runs on any device and float dtype. A stride `s` > 1 splits the padded input into
/// its `s * s` phases (rows and columns `a, a + s, ...`) once, so each tap is a plain window of
/// one phase and no output is computed only to be dropped.
///
/// Output: `[N, C, (H - 1) / s + 1, (W - 1) / s + 1]`, as `conv2d(x, w, padding 1, stride s,
/// groups C)`.
pub fn depthwise_conv3x3_shifted(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let c = check_args(x, w)?;
    if stride == 0 {
        bail!("depthwise_conv3x3: stride must be at least 1");
    }
    let (n, _, h, wd) = x.dims4()?;
    if h == 0 || wd == 0 {
        bail!("depthwise_conv3x3: empty input of shape {:?}", x.dims());
    }
    let s = stride;
    let (oh, ow) = ((h - 1) / s + 1, (wd - 1) / s + 1);
    // Tap (ky, kx) of output (i, j) reads padded row ky + s*i = s*(ky/s + i) + ky%s: row
    // ky/s + i of phase ky%s. Each phase needs oh + 2/s rows.
    let (hq, wq) = (oh + 2 / s, ow + 2 / s);
    // Zero padding 1 on top/left; at the bottom/right exactly what makes s*hq rows, s*wq columns.
    let fit = |t: Tensor, dim: usize, len: usize, want: usize| -> candle_core::Result<Tensor> {
        t.pad_with_zeros(dim, 1, want.saturating_sub(len + 1))?
            .narrow(dim, 0, want)
    };
    let xp = fit(fit(x.clone(), 2, h, s * hq)?, 3, wd, s * wq)?;
    let phases: Vec<Tensor> = if s == 1 {
        vec![xp]
    } else {
        let split = xp.reshape((n, c, hq, s, wq, s))?;
        let mut phases = Vec::with_capacity(s * s);
        for a in 0..s {
            for bb in 0..s {
                phases.push(
                    split
                        .narrow(3, a, 1)?
                        .narrow(5, bb, 1)?
                        .reshape((n, c, hq, wq))?
                        .contiguous()?,
                );
            }
        }
        phases
    };
    let mut acc: Option<Tensor> = None;
    for ky in 0..3 {
        for kx in 0..3 {
            let tap = phases[(ky % s) * s + kx % s]
                .narrow(2, ky / s, oh)?
                .narrow(3, kx / s, ow)?;
            let wk = w
                .narrow(2, ky, 1)?
                .narrow(3, kx, 1)?
                .reshape((1, c, 1, 1))?;
            let term = tap.broadcast_mul(&wk)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    let y = acc.expect("nine taps");
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, c, 1, 1))?),
        None => Ok(y),
    }
}

/// Checks shapes and dtypes; returns C.
fn check_args(x: &Tensor, w: &Tensor) -> candle_core::Result<usize> {
    let c = match x.dims() {
        &[_, c, _, _] => c,
        d => bail!("depthwise_conv3x3: x must be [N,C,H,W], got shape {d:?}"),
    };
    if w.dims() != [c, 1, 3, 3] {
        bail!(
            "depthwise_conv3x3: w must be [C,1,3,3] = [{c},1,3,3] for x of shape {:?}, got {:?}",
            x.dims(),
            w.dims()
        );
    }
    if x.dtype() != w.dtype() {
        bail!(
            "depthwise_conv3x3: x and w must have the same dtype, got {:?} and {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    if super::on_cpu(x) && x.dtype() != DType::F32 {
        bail!(
            "depthwise_conv3x3: only f32 is supported on the CPU, got {:?}",
            x.dtype()
        );
    }
    Ok(c)
}

/// Forward op: (x [N,C,H,W], w [C,1,3,3]) -> y [N,C,H,W].
struct DepthwiseConv3x3;

/// Forward op with bias: (x [N,C,H,W], w [C,1,3,3], b [C]) -> y [N,C,H,W].
struct DepthwiseConv3x3Bias;

/// grad_input op: (grad_y [N,C,H,W], w [C,1,3,3]) -> grad_x [N,C,H,W].
struct DepthwiseConv3x3GradInput;

/// grad_weight op: (x [N,C,H,W], grad_y [N,C,H,W]) -> grad_w [C,1,3,3].
struct DepthwiseConv3x3GradWeight;

impl CustomOp2 for DepthwiseConv3x3 {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), s1, l1)?;
        let w = f32_slice(self.name(), s2, l2)?;
        let dims = nchw_with_weight(self.name(), l1, l2)?;
        let y = correlate_planes(x, w, None, dims, false);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Gradients flowing in from e.g. a transpose or broadcast can be strided.
        let grad_res = grad_res.contiguous()?;
        let grad_x = grad_res.apply_op2_no_bwd(&w.contiguous()?, &DepthwiseConv3x3GradInput)?;
        let grad_w = x
            .contiguous()?
            .apply_op2_no_bwd(&grad_res, &DepthwiseConv3x3GradWeight)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

impl CustomOp3 for DepthwiseConv3x3Bias {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), s1, l1)?;
        let w = f32_slice(self.name(), s2, l2)?;
        let _t = OpTimer::start("depthwise fwd");
        let b = f32_slice(self.name(), s3, l3)?;
        let dims = nchw_with_weight(self.name(), l1, l2)?;
        let y = correlate_planes(x, w, Some(b), dims, false);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = OpTimer::start("depthwise bwd");
        let grad_res = grad_res.contiguous()?;
        let grad_x = if needs_grad(x) {
            Some(grad_res.apply_op2_no_bwd(w, &DepthwiseConv3x3GradInput)?)
        } else {
            None
        };
        let grad_w = if needs_grad(w) {
            Some(x.apply_op2_no_bwd(&grad_res, &DepthwiseConv3x3GradWeight)?)
        } else {
            None
        };
        let grad_b = if needs_grad(b) {
            let (_, c, h, wd) = grad_res.dims4()?;
            let sums = with_f32_slices(self.name(), &[&grad_res], |s| {
                Ok(s[0]
                    .par_chunks((h * wd).max(1))
                    .map(sum16)
                    .collect::<Vec<f32>>())
            })?;
            let mut gb = vec![0f32; c];
            for (i, v) in sums.iter().enumerate() {
                gb[i % c] += v;
            }
            Some(Tensor::from_vec(gb, c, x.device())?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

impl CustomOp2 for DepthwiseConv3x3GradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let grad_y = f32_slice(self.name(), s1, l1)?;
        let w = f32_slice(self.name(), s2, l2)?;
        let dims = nchw_with_weight(self.name(), l1, l2)?;
        // x[h+ky-1] feeds y[h], so grad_x[h] gathers grad_y[h-ky+1]: the same
        // correlation with the kernel rotated by 180 degrees.
        let grad_x = correlate_planes(grad_y, w, None, dims, true);
        Ok((CpuStorage::F32(grad_x), l1.shape().clone()))
    }
}

impl CustomOp2 for DepthwiseConv3x3GradWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(self.name(), s1, l1)?;
        let grad_y = f32_slice(self.name(), s2, l2)?;
        let dims = nchw(self.name(), l1)?;
        if l2.dims() != l1.dims() {
            bail!(
                "{}: x {:?} and grad_y {:?} must have the same shape",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let grad_w = weight_grad(x, grad_y, dims);
        Ok((CpuStorage::F32(grad_w), Shape::from((dims.1, 1, 3, 3))))
    }
}

type Nchw = (usize, usize, usize, usize);

fn nchw(op: &str, l: &Layout) -> candle_core::Result<Nchw> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => bail!("{op}: expected a [N,C,H,W] tensor, got shape {d:?}"),
    }
}

fn nchw_with_weight(op: &str, lx: &Layout, lw: &Layout) -> candle_core::Result<Nchw> {
    let dims = nchw(op, lx)?;
    if lw.dims() != [dims.1, 1, 3, 3] {
        bail!(
            "{op}: weight must be [{},1,3,3], got {:?}",
            dims.1,
            lw.dims()
        );
    }
    Ok(dims)
}

/// out[n,c,h,w] = bias[c] + sum_{ky,kx} k[c,ky,kx] * src[n,c,h+ky-1,w+kx-1]; with `flip` the
/// kernel is rotated by 180 degrees first (used for grad_input).
fn correlate_planes(
    src: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    (_, c, h, w): Nchw,
    flip: bool,
) -> Vec<f32> {
    let plane = h * w;
    let mut out = vec![0f32; src.len()];
    if plane == 0 {
        return out;
    }
    out.par_chunks_mut(plane)
        .zip(src.par_chunks(plane))
        .enumerate()
        .for_each(|(i, (out, src))| {
            let ch = i % c;
            let mut k: [f32; 9] = weight[ch * 9..ch * 9 + 9].try_into().unwrap();
            if flip {
                k.reverse();
            }
            correlate_plane(out, src, &k, bias.map_or(0.0, |b| b[ch]), h, w);
        });
    out
}

multiversion! {
fn correlate_plane(out: &mut [f32], src: &[f32], k: &[f32; 9], bias: f32, h: usize, w: usize) {
    // Rows outside the image read this zero row, so every output row takes the same path.
    let zeros = vec![0f32; w];
    for (y, out_row) in out.chunks_exact_mut(w).enumerate() {
        let row = |r: usize| &src[r * w..(r + 1) * w];
        let above = if y > 0 { row(y - 1) } else { &zeros };
        let below = if y + 1 < h { row(y + 1) } else { &zeros };
        correlate_row(out_row, [above, row(y), below], k, bias);
    }
}
}

/// One output row from its three source rows (all of the same width), plus `bias`.
#[inline(always)]
pub(crate) fn correlate_row(out: &mut [f32], rows: [&[f32]; 3], k: &[f32; 9], bias: f32) {
    let w = out.len();
    // Left and right columns: the missing neighbour is padding.
    let mut left = bias;
    let mut right = bias;
    for (r, kr) in rows.iter().zip(k.chunks_exact(3)) {
        left += kr[1] * r[0];
        if w > 1 {
            left += kr[2] * r[1];
            right += kr[0] * r[w - 2] + kr[1] * r[w - 1];
        }
    }
    out[0] = left;
    if w < 3 {
        if w == 2 {
            out[1] = right;
        }
        return;
    }
    out[w - 1] = right;
    // Interior: equal-length shifted slices let LLVM drop bounds checks and vectorise.
    let n = w - 2;
    let [r0, r1, r2] = rows;
    let (a0, b0, c0) = (&r0[..n], &r0[1..n + 1], &r0[2..n + 2]);
    let (a1, b1, c1) = (&r1[..n], &r1[1..n + 1], &r1[2..n + 2]);
    let (a2, b2, c2) = (&r2[..n], &r2[1..n + 1], &r2[2..n + 2]);
    let out = &mut out[1..n + 1];
    for i in 0..n {
        out[i] = bias
            + k[0] * a0[i]
            + k[1] * b0[i]
            + k[2] * c0[i]
            + k[3] * a1[i]
            + k[4] * b1[i]
            + k[5] * c1[i]
            + k[6] * a2[i]
            + k[7] * b2[i]
            + k[8] * c2[i];
    }
}

/// grad_w[c,0,ky,kx] = sum_{n,h,w} grad_y[n,c,h,w] * x[n,c,h+ky-1,w+kx-1].
fn weight_grad(x: &[f32], grad_y: &[f32], (_, c, h, w): Nchw) -> Vec<f32> {
    let plane = h * w;
    if plane == 0 {
        return vec![0f32; c * 9];
    }
    // One 9-tap partial per (n, c) plane keeps all planes busy even when C is small;
    // the partials are then summed over the batch.
    let partials: Vec<[f32; 9]> = x
        .par_chunks(plane)
        .zip(grad_y.par_chunks(plane))
        .map(|(x, g)| weight_grad_plane(x, g, h, w))
        .collect();
    let mut grad_w = vec![0f32; c * 9];
    for (i, p) in partials.iter().enumerate() {
        let ch = i % c;
        for (acc, v) in grad_w[ch * 9..ch * 9 + 9].iter_mut().zip(p) {
            *acc += v;
        }
    }
    grad_w
}

multiversion! {
fn weight_grad_plane(x: &[f32], g: &[f32], h: usize, w: usize) -> [f32; 9] {
    let mut taps = [0f32; 9];
    for (t, tap) in taps.iter_mut().enumerate() {
        let (ky, kx) = (t / 3, t % 3);
        // Output positions whose shifted input stays inside the image.
        let (y0, y1) = (1usize.saturating_sub(ky), (h + 1 - ky).min(h));
        let (x0, x1) = (1usize.saturating_sub(kx), (w + 1 - kx).min(w));
        if x0 >= x1 {
            continue;
        }
        for y in y0..y1 {
            let g_row = &g[y * w + x0..y * w + x1];
            let src = (y + ky - 1) * w + x0 + kx - 1;
            *tap += dot(g_row, &x[src..src + (x1 - x0)]);
        }
    }
    taps
}
}

/// Dot product with 8 independent accumulators: without them the f32 sum is one serial
/// chain that LLVM may not reorder, so it would not vectorise.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += xa[i] * xb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const TOL: f32 = 1e-4;

    fn rand_tensor(rng: &mut StdRng, dims: &[usize]) -> Tensor {
        let len = dims.iter().product();
        let data: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    /// max |a-b| / max(1e-6, max |b|)
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // f32::max skips NaN, so a NaN result would otherwise look like zero error.
        assert!(
            a.iter().chain(&b).all(|v| v.is_finite()),
            "non-finite values"
        );
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
        diff / scale.max(1e-6)
    }

    fn generic(x: &Tensor, w: &Tensor) -> Tensor {
        x.conv2d(w, 1, 1, 1, x.dim(1).unwrap()).unwrap()
    }

    #[test]
    fn forward_matches_generic_conv() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let sizes = [1, 2, 5, 7, 13, 32];
        for c in [1, 3, 16, 17] {
            for h in sizes {
                for wd in sizes {
                    let n = rng.random_range(1..=3);
                    let x = rand_tensor(&mut rng, &[n, c, h, wd]);
                    let w = rand_tensor(&mut rng, &[c, 1, 3, 3]);
                    let got = depthwise_conv3x3(&x, &w).unwrap();
                    let err = rel_err(&got, &generic(&x, &w));
                    assert!(err <= TOL, "shape {:?}: rel err {err}", x.dims());
                }
            }
        }
    }

    #[test]
    fn forward_accepts_strided_inputs() {
        let mut rng = StdRng::seed_from_u64(7);
        // Transposed views are not contiguous.
        let x = rand_tensor(&mut rng, &[2, 5, 9, 6])
            .transpose(2, 3)
            .unwrap();
        let w = rand_tensor(&mut rng, &[5, 1, 3, 3])
            .transpose(2, 3)
            .unwrap();
        assert!(!x.is_contiguous() && !w.is_contiguous());
        let got = depthwise_conv3x3(&x, &w).unwrap();
        let want = generic(&x.contiguous().unwrap(), &w.contiguous().unwrap());
        assert!(rel_err(&got, &want) <= TOL);
    }

    /// grad x and grad w of sum(conv(x, w) * r), for the given conv.
    fn grads(
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        conv: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> (Tensor, Tensor) {
        let xv = Var::from_tensor(x).unwrap();
        let wv = Var::from_tensor(w).unwrap();
        let loss = (conv(xv.as_tensor(), wv.as_tensor()) * r)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        (
            g.get(xv.as_tensor()).unwrap().clone(),
            g.get(wv.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn gradients_match_generic_conv() {
        let mut rng = StdRng::seed_from_u64(42);
        let channels = [1, 3, 16, 17];
        let sizes = [1, 2, 5, 7, 13, 32];
        for _ in 0..40 {
            let n = rng.random_range(1..=3);
            let c = channels[rng.random_range(0..channels.len())];
            let h = sizes[rng.random_range(0..sizes.len())];
            let wd = sizes[rng.random_range(0..sizes.len())];
            let x = rand_tensor(&mut rng, &[n, c, h, wd]);
            let w = rand_tensor(&mut rng, &[c, 1, 3, 3]);
            let r = rand_tensor(&mut rng, &[n, c, h, wd]);
            let (gx, gw) = grads(&x, &w, &r, |x, w| depthwise_conv3x3(x, w).unwrap());
            let (gx_ref, gw_ref) = grads(&x, &w, &r, generic);
            let ex = rel_err(&gx, &gx_ref);
            let ew = rel_err(&gw, &gw_ref);
            assert!(ex <= TOL, "shape {:?}: grad x rel err {ex}", x.dims());
            assert!(ew <= TOL, "shape {:?}: grad w rel err {ew}", x.dims());
        }
    }

    #[test]
    fn gradients_accept_strided_upstream_gradient() {
        let mut rng = StdRng::seed_from_u64(3);
        let x = rand_tensor(&mut rng, &[2, 3, 7, 5]);
        let w = rand_tensor(&mut rng, &[3, 1, 3, 3]);
        let r = rand_tensor(&mut rng, &[2, 3, 5, 7]);
        // The transpose after the conv hands bwd a non-contiguous grad_res.
        let through_transpose = |conv: fn(&Tensor, &Tensor) -> Tensor| {
            grads(&x, &w, &r, move |x, w| conv(x, w).transpose(2, 3).unwrap())
        };
        let (gx, gw) = through_transpose(|x, w| depthwise_conv3x3(x, w).unwrap());
        let (gx_ref, gw_ref) = through_transpose(generic);
        assert!(rel_err(&gx, &gx_ref) <= TOL);
        assert!(rel_err(&gw, &gw_ref) <= TOL);
    }

    /// `f(x, w, b)` and the gradients of `sum(f(x, w, b) * r)` with respect to x, w and b.
    fn value_and_grads(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        r: &Tensor,
        f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let (xv, wv, bv) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(w).unwrap(),
            Var::from_tensor(b).unwrap(),
        );
        let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        (y, get(&xv), get(&wv), get(&bv))
    }

    #[test]
    fn bias_variant_matches_conv_plus_bias() {
        let mut rng = StdRng::seed_from_u64(77);
        for dims in [
            [1usize, 1, 1, 1],
            [2, 3, 5, 7],
            [3, 17, 13, 2],
            [2, 16, 32, 32],
        ] {
            let c = dims[1];
            let x = rand_tensor(&mut rng, &dims);
            let w = rand_tensor(&mut rng, &[c, 1, 3, 3]);
            let b = rand_tensor(&mut rng, &[c]);
            let r = rand_tensor(&mut rng, &dims);
            let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
                value_and_grads(&x, &w, &b, &r, f)
            };
            let fast = run(&|x, w, b| depthwise_conv3x3_bias(x, w, b).unwrap());
            let slow = run(&|x, w, b| {
                generic(x, w)
                    .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                    .unwrap()
            });
            assert!(rel_err(&fast.0, &slow.0) <= TOL, "y {dims:?}");
            assert!(rel_err(&fast.1, &slow.1) <= TOL, "dx {dims:?}");
            assert!(rel_err(&fast.2, &slow.2) <= TOL, "dw {dims:?}");
            assert!(rel_err(&fast.3, &slow.3) <= TOL, "db {dims:?}");
        }
        let x = rand_tensor(&mut rng, &[1, 4, 5, 5]);
        let w = rand_tensor(&mut rng, &[4, 1, 3, 3]);
        assert!(depthwise_conv3x3_bias(&x, &w, &rand_tensor(&mut rng, &[3])).is_err());
    }

    /// The device-generic form (what `--device cuda` runs) against the CPU custom op: outputs
    /// and all three gradients within 1e-5, on odd shapes, at strides 1, 2 and 3 (the CPU
    /// reference for stride s is the stride-1 op's rows and columns 0, s, 2s, ...).
    #[test]
    fn shifted_form_matches_the_cpu_op() {
        const TIGHT: f32 = 1e-5;
        let mut rng = StdRng::seed_from_u64(0xd1ce);
        for (dims, stride) in [
            ([1usize, 1, 1, 1], 1),
            ([2, 3, 5, 7], 1),
            ([1, 17, 13, 2], 1),
            ([2, 16, 32, 32], 1),
            ([1, 1, 1, 1], 2),
            ([2, 3, 5, 7], 2),
            ([1, 24, 14, 14], 2),
            ([2, 17, 13, 8], 2),
            ([1, 5, 10, 11], 3),
        ] {
            let [n, c, h, wd] = dims;
            let (oh, ow) = ((h - 1) / stride + 1, (wd - 1) / stride + 1);
            let x = rand_tensor(&mut rng, &dims);
            let w = rand_tensor(&mut rng, &[c, 1, 3, 3]);
            let b = rand_tensor(&mut rng, &[c]);
            let r = rand_tensor(&mut rng, &[n, c, oh, ow]);
            let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
                value_and_grads(&x, &w, &b, &r, f)
            };
            let keep = |y: Tensor| {
                // Rows and columns 0, s, 2s, ... of the stride-1 output.
                let rows: Vec<u32> = (0..oh as u32).map(|i| i * stride as u32).collect();
                let cols: Vec<u32> = (0..ow as u32).map(|i| i * stride as u32).collect();
                let idx = |v: Vec<u32>| Tensor::new(v, &Device::Cpu).unwrap();
                y.index_select(&idx(rows), 2)
                    .unwrap()
                    .index_select(&idx(cols), 3)
                    .unwrap()
            };
            let cpu = run(&|x, w, b| keep(depthwise_conv3x3_bias(x, w, b).unwrap()));
            let shifted = run(&|x, w, b| depthwise_conv3x3_shifted(x, w, Some(b), stride).unwrap());
            let what = ["y", "dx", "dw", "db"];
            for (k, (a, e)) in [
                (&shifted.0, &cpu.0),
                (&shifted.1, &cpu.1),
                (&shifted.2, &cpu.2),
                (&shifted.3, &cpu.3),
            ]
            .into_iter()
            .enumerate()
            {
                let err = rel_err(a, e);
                assert!(
                    err <= TIGHT,
                    "{} {dims:?} stride {stride}: rel err {err}",
                    what[k]
                );
            }
            // Without a bias, and through the public entry point off the CPU.
            if stride == 1 {
                let want = depthwise_conv3x3(&x, &w).unwrap();
                let got =
                    super::super::with_device_generic_ops(|| depthwise_conv3x3(&x, &w)).unwrap();
                assert!(rel_err(&got, &want) <= TIGHT, "{dims:?} without bias");
            }
        }
        let x = rand_tensor(&mut rng, &[1, 4, 5, 5]);
        let w = rand_tensor(&mut rng, &[4, 1, 3, 3]);
        let err = depthwise_conv3x3_shifted(&x, &w, None, 0).unwrap_err();
        assert!(err.to_string().contains("stride"), "{err}");
    }

    #[test]
    fn rejects_bad_shapes_and_dtypes() {
        let mut rng = StdRng::seed_from_u64(1);
        let x = rand_tensor(&mut rng, &[1, 4, 5, 5]);
        for bad in [&[4, 1, 5, 5][..], &[3, 1, 3, 3], &[4, 3, 3], &[4, 2, 3, 3]] {
            let w = rand_tensor(&mut rng, bad);
            let err = depthwise_conv3x3(&x, &w).unwrap_err().to_string();
            assert!(err.contains("[C,1,3,3]"), "{err}");
        }
        let w = rand_tensor(&mut rng, &[4, 1, 3, 3]);
        let flat = x.flatten_from(2).unwrap();
        let err = depthwise_conv3x3(&flat, &w).unwrap_err().to_string();
        assert!(err.contains("[N,C,H,W]"), "{err}");
        let err = depthwise_conv3x3(&x.to_dtype(DType::F64).unwrap(), &w)
            .unwrap_err()
            .to_string();
        assert!(err.contains("same dtype"), "{err}");
        let err = depthwise_conv3x3(
            &x.to_dtype(DType::F64).unwrap(),
            &w.to_dtype(DType::F64).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("only f32"), "{err}");
    }
}
