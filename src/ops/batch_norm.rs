//! Train-mode BatchNorm2d fused with its activation, as one graph node:
//!
//! ```text
//! mean[c] = E[x[:,c]],  var[c] = E[(x[:,c] - mean[c])^2]           (biased, over N*H*W)
//! y = act(gamma[c] * (x - mean[c]) / sqrt(var[c] + eps) + beta[c])
//! running_mean = (1 - momentum) * running_mean + momentum * mean
//! running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (M = N*H*W)
//! ```
//!
//! which is PyTorch's `BatchNorm2d` in train mode (and candle's `BatchNorm::forward_train`,
//! whose running-stat update this reproduces). candle's version is a transpose copy, a dozen
//! full-tensor ops and as many graph nodes; here the forward is one statistics pass and one
//! normalise + affine + activation pass, and the backward two passes:
//!
//! ```text
//! g = grad_y * act'(y);  dbeta = sum g;  dgamma = sum g * xhat
//! dx = gamma / sqrt(var + eps) * (g - dbeta / M - xhat * dgamma / M)
//! ```
//!
//! Statistics accumulate in f64 per block of 4096 f32 values (shifted by the channel's first
//! value), so they stay accurate for large, offset activations.
//!
//! [`batch_norm_eval`] is the same op with the running statistics (and their constant-statistics
//! backward).
//!
//! [`batch_norm_train_pool2`] also fuses the 2x2/2 max pool that follows in the zoo's stems and
//! plain nets: the full-resolution activation is never stored (nor its gradient buffer, which
//! candle's backward would allocate, zero and add into); the backward recomputes each window's
//! argmax from x and the batch statistics, as [`crate::ops::max_pool`] does.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use super::activation::{act, activation, by_act, passes, Activation};
use super::{f32_slice, needs_grad, with_f32_slices, OpTimer};
use crate::simd::multiversion;

/// Block of values summed in f32 before the running total moves to f64.
const BLOCK: usize = 4096;

/// Train-mode BatchNorm over dim 1 of `x` [N, C, ...] followed by `act`, updating the running
/// statistics in place. `running_mean` and `running_var` are the layer's state ([C]).
///
/// f32 on the CPU runs the fused op; anything else runs candle's generic ops (same result).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Var,
    running_var: &Var,
    eps: f64,
    momentum: f64,
    act: Activation,
) -> candle_core::Result<Tensor> {
    let state = (running_mean, running_var);
    batch_norm_train_impl(x, gamma, beta, state, (eps, momentum), act, false)
}

/// [`batch_norm_train`] followed by a 2x2/2 max pool (`nn.MaxPool2d(2)`, floor), in one op:
/// x [N, C, H, W] -> [N, C, H/2, W/2].
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_pool2(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Var,
    running_var: &Var,
    eps: f64,
    momentum: f64,
    act: Activation,
) -> candle_core::Result<Tensor> {
    match x.dims() {
        &[_, _, h, w] if h >= 2 && w >= 2 => {}
        d => bail!("batch_norm_train_pool2: x must be [N,C,H,W] with H, W >= 2, got {d:?}"),
    }
    let state = (running_mean, running_var);
    batch_norm_train_impl(x, gamma, beta, state, (eps, momentum), act, true)
}

fn batch_norm_train_impl(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (running_mean, running_var): (&Var, &Var),
    (eps, momentum): (f64, f64),
    act: Activation,
    pool: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("batch_norm_train: x must be [N, C, ...], got shape {dims:?}");
    }
    let c = dims[1];
    for (name, t) in [
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", running_mean.as_tensor()),
        ("running_var", running_var.as_tensor()),
    ] {
        if t.dims() != [c] {
            bail!(
                "batch_norm_train: {name} must be [{c}] for x of shape {dims:?}, got {:?}",
                t.dims()
            );
        }
    }
    let m = x.elem_count() / c.max(1);
    if m < 2 {
        bail!("batch_norm_train: expected more than 1 value per channel when training, got input of shape {dims:?}");
    }
    if !super::on_cpu(x) || x.dtype() != DType::F32 {
        let y = generic(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            momentum,
            act,
        )?;
        return if pool {
            super::max_pool::max_pool2x2(&y)
        } else {
            Ok(y)
        };
    }
    let _t = OpTimer::start("bn stats");
    let x = x.contiguous()?;
    let (mean, var) = with_f32_slices("batch_norm_train", &[&x], |s| {
        Ok(channel_stats(s[0], ncs(x.dims())))
    })?;
    // Running statistics as in PyTorch: unbiased variance, momentum-weighted.
    let unbias = m as f64 / (m as f64 - 1.0);
    let update = |var: &Var, batch: &[f64], scale: f64| -> candle_core::Result<()> {
        let old = var.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let new: Vec<f32> = old
            .iter()
            .zip(batch)
            .map(|(o, b)| ((1.0 - momentum) * o + momentum * scale * b) as f32)
            .collect();
        let new = Tensor::from_vec(new, c, x.device())?.to_dtype(var.dtype())?;
        var.set(&new)
    };
    update(running_mean, &mean, 1.0)?;
    update(running_var, &var, unbias)?;
    let op = BatchNormTrain {
        mean: mean.iter().map(|&v| v as f32).collect(),
        invstd: var
            .iter()
            .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
            .collect(),
        act,
        pool,
        frozen: false,
    };
    drop(_t);
    x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

/// candle's train-mode BatchNorm and activation, for other devices and dtypes.
#[allow(clippy::too_many_arguments)]
fn generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Var,
    running_var: &Var,
    eps: f64,
    momentum: f64,
    act: Activation,
) -> candle_core::Result<Tensor> {
    let bn = candle_nn::BatchNorm::new_with_momentum(
        x.dim(1)?,
        running_mean.as_tensor().clone(),
        running_var.as_tensor().clone(),
        gamma.clone(),
        beta.clone(),
        eps,
        momentum,
    )?;
    activation(&bn.forward_train(x)?, act)
}

/// Eval-mode BatchNorm with the running statistics, followed by `act` and, with `pool2`, the
/// 2x2/2 max pool, as one op: `act((x - running_mean) / sqrt(running_var + eps) * gamma + beta)`.
///
/// It has a backward too (the statistics are constants then, so `dx = gamma / sqrt(var + eps)
/// * g`); f32 on the CPU runs the fused op, anything else candle's ops (same values).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    act: Activation,
    pool2: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || (pool2 && (dims.len() != 4 || dims[2] < 2 || dims[3] < 2)) {
        bail!("batch_norm_eval: bad input shape {dims:?} (pool2: {pool2})");
    }
    let c = dims[1];
    for (name, t) in [
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ] {
        if t.dims() != [c] {
            bail!(
                "batch_norm_eval: {name} must be [{c}] for x of shape {dims:?}, got {:?}",
                t.dims()
            );
        }
    }
    if !super::on_cpu(x) || x.dtype() != DType::F32 {
        // candle_nn::BatchNorm's eval formula.
        let shape: Vec<usize> = (0..dims.len())
            .map(|i| if i == 1 { c } else { 1 })
            .collect();
        let shape = shape.as_slice();
        let y = x
            .broadcast_sub(&running_mean.detach().reshape(shape)?)?
            .broadcast_div(&(running_var.detach().reshape(shape)? + eps)?.sqrt()?)?
            .broadcast_mul(&gamma.reshape(shape)?)?
            .broadcast_add(&beta.reshape(shape)?)?;
        let y = activation(&y, act)?;
        return if pool2 {
            super::max_pool::max_pool2x2(&y)
        } else {
            Ok(y)
        };
    }
    let v = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec1::<f64>();
    let op = BatchNormTrain {
        mean: v(running_mean)?.iter().map(|&m| m as f32).collect(),
        invstd: v(running_var)?
            .iter()
            .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
            .collect(),
        act,
        pool: pool2,
        frozen: true,
    };
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

/// Planes of `s` values per parallel task, so each task handles at least ~16K values.
fn planes_per_task(s: usize) -> usize {
    (16 * 1024 / s.max(1)).max(1)
}

multiversion! {
/// Sums of `d = v - shift` and `d * d` over a plane: 16 f32 lanes per block of [`BLOCK`]
/// values, blocks added in f64.
fn shifted_sums(plane: &[f32], shift: f32) -> (f64, f64) {
    let (mut t1, mut t2) = (0f64, 0f64);
    for block in plane.chunks(BLOCK) {
        let chunks = block.chunks_exact(16);
        let (mut r1, mut r2) = (0f32, 0f32);
        for &v in chunks.remainder() {
            let d = v - shift;
            r1 += d;
            r2 += d * d;
        }
        let mut s1 = [0f32; 16];
        let mut s2 = [0f32; 16];
        for c in chunks {
            for i in 0..16 {
                let d = c[i] - shift;
                s1[i] += d;
                s2[i] += d * d;
            }
        }
        t1 += (s1.iter().sum::<f32>() + r1) as f64;
        t2 += (s2.iter().sum::<f32>() + r2) as f64;
    }
    (t1, t2)
}
}

/// Per-channel mean and biased variance of contiguous `x` [N, C, S].
fn channel_stats(x: &[f32], (n, c, s): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let m = (n * s) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            // Shifting by a value of the channel keeps the f32 sums small.
            let shift = x[ch * s];
            let (mut t1, mut t2) = (0f64, 0f64);
            for img in 0..n {
                let (b1, b2) = shifted_sums(&x[(img * c + ch) * s..][..s], shift);
                t1 += b1;
                t2 += b2;
            }
            let d = t1 / m;
            (shift as f64 + d, (t2 / m - d * d).max(0.0))
        })
        .unzip()
}

/// [N, C, S] with S the product of the trailing dims.
fn ncs(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

/// The forward node; keeps the batch statistics for its backward.
struct BatchNormTrain {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    act: Activation,
    /// A 2x2/2 max pool follows (x is [N, C, H, W]).
    pool: bool,
    /// Eval mode: mean and invstd are the running statistics, constants for the backward.
    frozen: bool,
}

/// Per-channel affine form of the normalisation: `bn(x) = (x - mean) * scale + beta`.
#[derive(Clone, Copy)]
struct Affine {
    mean: f32,
    scale: f32,
    beta: f32,
}

impl Affine {
    #[inline(always)]
    fn y<const A: u8>(self, x: f32) -> f32 {
        act::<A>((x - self.mean) * self.scale + self.beta)
    }
}

/// `dx = k0 * g - k1 - k2 * (x - mean)` for one channel (g: the gradient after the activation).
#[derive(Clone, Copy)]
struct DxCoef {
    mean: f32,
    k0: f32,
    k1: f32,
    k2: f32,
}

multiversion! {
/// Forward of one plane: y = act(bn(x)).
fn fwd_plane<const A: u8>(x: &[f32], y: &mut [f32], a: Affine) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.y::<A>(x);
    }
}
}

multiversion! {
/// Pooled forward of one (h, w) plane: `y[i, j] = max over the 2x2 window of act(bn(x))`.
fn fwd_pool_plane<const A: u8>(x: &[f32], y: &mut [f32], hw: (usize, usize), a: Affine) {
    let (h, w) = hw;
    let ow = w / 2;
    for (i, y) in y.chunks_exact_mut(ow).enumerate().take(h / 2) {
        let r0 = &x[2 * i * w..][..2 * ow];
        let r1 = &x[(2 * i + 1) * w..][..2 * ow];
        for ((y, t), b) in y.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
            let top = a.y::<A>(t[0]).max(a.y::<A>(t[1]));
            *y = top.max(a.y::<A>(b[0]).max(a.y::<A>(b[1])));
        }
    }
}
}

multiversion! {
/// Backward pass 1 over one plane: (sum g, sum g * (x - mean)) with g = dy * act'(y).
fn bwd_sums_plane<const A: u8>(x: &[f32], y: &[f32], dy: &[f32], mean: f32) -> (f64, f64) {
    let (mut t1, mut t2) = (0f64, 0f64);
    for ((x, y), dy) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).zip(dy.chunks(BLOCK)) {
        let mut s1 = [0f32; 16];
        let mut s2 = [0f32; 16];
        let (xc, yc, dc) = (x.chunks_exact(16), y.chunks_exact(16), dy.chunks_exact(16));
        let (mut r1, mut r2) = (0f32, 0f32);
        for ((&x, &y), &d) in xc
            .remainder()
            .iter()
            .zip(yc.remainder())
            .zip(dc.remainder())
        {
            let g = if passes::<A>(y) { d } else { 0.0 };
            r1 += g;
            r2 += g * (x - mean);
        }
        for ((x, y), d) in xc.zip(yc).zip(dc) {
            for l in 0..16 {
                let g = if passes::<A>(y[l]) { d[l] } else { 0.0 };
                s1[l] += g;
                s2[l] += g * (x[l] - mean);
            }
        }
        t1 += (s1.iter().sum::<f32>() + r1) as f64;
        t2 += (s2.iter().sum::<f32>() + r2) as f64;
    }
    (t1, t2)
}
}

multiversion! {
/// Backward pass 2 over one plane.
fn bwd_dx_plane<const A: u8>(x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], k: DxCoef) {
    for (((dx, &x), &y), &d) in dx.iter_mut().zip(x).zip(y).zip(dy) {
        let g = if passes::<A>(y) { d } else { 0.0 };
        *dx = k.k0 * g - k.k1 - k.k2 * (x - k.mean);
    }
}
}

/// Window position (0..4, row-major) of the first maximum, or [`BLOCKED`] when the
/// activation's gradient does not pass there.
const BLOCKED: u8 = 4;

multiversion! {
/// Pooled backward pass 1 over one (h, w) plane: each window's first-maximum position (or
/// BLOCKED) into `arg`, and the plane's (sum g, sum g * (x - mean)) over the passing maxima.
fn bwd_pool_sums_plane<const A: u8>(
    x: &[f32],
    dy: &[f32],
    arg: &mut [u8],
    hw: (usize, usize),
    a: Affine,
) -> (f64, f64) {
    let (h, w) = hw;
    let ow = w / 2;
    // One window: (position code, g, x at the maximum). Selects only, no branches; the
    // first maximum wins, as in the forward's max.
    let window = |t0: f32, t1: f32, b0: f32, b1: f32, d: f32| {
        let (y0, y1, y2, y3) = (a.y::<A>(t0), a.y::<A>(t1), a.y::<A>(b0), a.y::<A>(b1));
        let m = y0.max(y1).max(y2.max(y3));
        let mut pos = 3u8;
        let mut xm = b1;
        if y2 == m {
            pos = 2;
            xm = b0;
        }
        if y1 == m {
            pos = 1;
            xm = t1;
        }
        if y0 == m {
            pos = 0;
            xm = t0;
        }
        let pass = passes::<A>(m);
        (if pass { pos } else { BLOCKED }, if pass { d } else { 0.0 }, xm)
    };
    let (mut t1, mut t2) = (0f64, 0f64);
    for (i, (arg, dy)) in arg
        .chunks_exact_mut(ow)
        .zip(dy.chunks_exact(ow))
        .enumerate()
        .take(h / 2)
    {
        let r0 = &x[2 * i * w..][..2 * ow];
        let r1 = &x[(2 * i + 1) * w..][..2 * ow];
        // 16 windows at a time into 16 f32 lanes (an f32 sum over one accumulator would
        // be a serial chain, which LLVM may not vectorise).
        let mut s1 = [0f32; 16];
        let mut s2 = [0f32; 16];
        let groups = arg
            .chunks_exact_mut(16)
            .zip(dy.chunks_exact(16))
            .zip(r0.chunks_exact(32).zip(r1.chunks_exact(32)));
        for ((arg, dy), (t, b)) in groups {
            for l in 0..16 {
                let (p, g, xm) = window(t[2 * l], t[2 * l + 1], b[2 * l], b[2 * l + 1], dy[l]);
                arg[l] = p;
                s1[l] += g;
                s2[l] += g * (xm - a.mean);
            }
        }
        let done = ow / 16 * 16;
        let (mut r1s, mut r2s) = (0f32, 0f32);
        for j in done..ow {
            let k = 2 * j;
            let (p, g, xm) = window(r0[k], r0[k + 1], r1[k], r1[k + 1], dy[j]);
            arg[j] = p;
            r1s += g;
            r2s += g * (xm - a.mean);
        }
        t1 += (s1.iter().sum::<f32>() + r1s) as f64;
        t2 += (s2.iter().sum::<f32>() + r2s) as f64;
    }
    (t1, t2)
}
}

multiversion! {
/// Pooled backward pass 2 over one (h, w) plane: `-k1 - k2 * (x - mean)` everywhere, plus
/// `k0 * g` at each window's passing maximum.
fn bwd_pool_dx_plane(
    x: &[f32],
    dy: &[f32],
    arg: &[u8],
    dx: &mut [f32],
    hw: (usize, usize),
    k: DxCoef,
) {
    let (h, w) = hw;
    for (d, &v) in dx.iter_mut().zip(x) {
        *d = -k.k1 - k.k2 * (v - k.mean);
    }
    let ow = w / 2;
    for (i, (arg, dy)) in arg
        .chunks_exact(ow)
        .zip(dy.chunks_exact(ow))
        .enumerate()
        .take(h / 2)
    {
        let (top, bottom) = dx[2 * i * w..].split_at_mut(w);
        let (top, bottom) = (&mut top[..2 * ow], &mut bottom[..2 * ow]);
        for (((&p, &g), t), b) in arg
            .iter()
            .zip(dy)
            .zip(top.chunks_exact_mut(2))
            .zip(bottom.chunks_exact_mut(2))
        {
            let g = k.k0 * g;
            t[0] += if p == 0 { g } else { 0.0 };
            t[1] += if p == 1 { g } else { 0.0 };
            b[0] += if p == 2 { g } else { 0.0 };
            b[1] += if p == 3 { g } else { 0.0 };
        }
    }
}
}

impl BatchNormTrain {
    fn affine(&self, ch: usize, gamma: &[f32], beta: &[f32]) -> Affine {
        Affine {
            mean: self.mean[ch],
            scale: gamma[ch] * self.invstd[ch],
            beta: beta[ch],
        }
    }

    /// Per-channel coefficients of `dx = k0 * g - k1 - k2 * (x - mean)`, from the sums of g
    /// and g * (x - mean) over the M values of each channel.
    fn dx_coefficients(&self, gamma: &[f32], sum_g: &[f64], sum_gx: &[f64], m: f64) -> Vec<DxCoef> {
        (0..gamma.len())
            .map(|ch| {
                let invstd = self.invstd[ch] as f64;
                let k0 = gamma[ch] as f64 * invstd;
                // With batch statistics, x also moves the mean and variance (k1, k2).
                let moving = if self.frozen { 0.0 } else { 1.0 };
                DxCoef {
                    mean: self.mean[ch],
                    k0: k0 as f32,
                    k1: (moving * k0 * sum_g[ch] / m) as f32,
                    k2: (moving * k0 * invstd * (sum_gx[ch] * invstd) / m) as f32,
                }
            })
            .collect()
    }

    /// The gradient tensors the arguments need, from the per-plane sums and dx.
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        (x, gamma, beta): (&Tensor, &Tensor, &Tensor),
        sums: &[(f64, f64)],
        dx: Option<Vec<f32>>,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.mean.len();
        let (sum_g, sum_gx) = per_channel(sums, c);
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let dgamma = if needs_grad(gamma) {
            let v: Vec<f32> = sum_gx
                .iter()
                .zip(&self.invstd)
                .map(|(&v, &i)| (v * i as f64) as f32)
                .collect();
            Some(Tensor::from_vec(v, c, dev)?)
        } else {
            None
        };
        let dbeta = if needs_grad(beta) {
            let v: Vec<f32> = sum_g.iter().map(|&v| v as f32).collect();
            Some(Tensor::from_vec(v, c, dev)?)
        } else {
            None
        };
        Ok((dx, dgamma, dbeta))
    }
}

/// Per-plane (sum g, sum g * (x - mean)) of an [N, C, ...] tensor, summed per channel.
fn per_channel(sums: &[(f64, f64)], c: usize) -> (Vec<f64>, Vec<f64>) {
    let mut sum_g = vec![0f64; c];
    let mut sum_gx = vec![0f64; c];
    for (plane, (t1, t2)) in sums.iter().enumerate() {
        sum_g[plane % c] += t1;
        sum_gx[plane % c] += t2;
    }
    (sum_g, sum_gx)
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        if self.frozen {
            "batch-norm-eval"
        } else {
            "batch-norm-train"
        }
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
        let _t = OpTimer::start(match (self.frozen, self.pool) {
            (true, _) => "bn eval fwd",
            (false, true) => "bn+act+pool fwd",
            (false, false) => "bn+act fwd",
        });
        let x = f32_slice(self.name(), s1, l1)?;
        let gamma = f32_slice(self.name(), s2, l2)?;
        let beta = f32_slice(self.name(), s3, l3)?;
        let (_, c, s) = ncs(l1.dims());
        if self.pool {
            let d = l1.dims();
            let (h, w) = (d[2], d[3]);
            let (oh, ow) = (h / 2, w / 2);
            let mut y = vec![0f32; d[0] * c * oh * ow];
            y.par_chunks_mut(oh * ow)
                .zip(x.par_chunks(h * w))
                .enumerate()
                .for_each(|(plane, (y, x))| {
                    let a = self.affine(plane % c, gamma, beta);
                    by_act!(self.act, fwd_pool_plane(x, y, (h, w), a));
                });
            return Ok((CpuStorage::F32(y), Shape::from((d[0], c, oh, ow))));
        }
        let per_task = planes_per_task(s);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(per_task * s)
            .zip(x.par_chunks(per_task * s))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (i, (y, x)) in y.chunks_mut(s).zip(x.chunks(s)).enumerate() {
                    let a = self.affine((task * per_task + i) % c, gamma, beta);
                    by_act!(self.act, fwd_plane(x, y, a));
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = OpTimer::start(match (self.frozen, self.pool) {
            (true, _) => "bn eval bwd",
            (false, true) => "bn+act+pool bwd",
            (false, false) => "bn+act bwd",
        });
        let grad_res = grad_res.contiguous()?;
        if self.pool {
            return self.bwd_pool(x, gamma, beta, &grad_res);
        }
        if grad_res.dims() != x.dims() {
            bail!("{}: gradient shape {:?}", self.name(), grad_res.dims());
        }
        let (n, c, s) = ncs(x.dims());
        let m = (n * s) as f64;
        with_f32_slices(self.name(), &[x, gamma, res, &grad_res], |sl| {
            let (xs, gs, ys, dys) = (sl[0], sl[1], sl[2], sl[3]);
            fn planes(v: &[f32], s: usize) -> rayon::slice::Chunks<'_, f32> {
                v.par_chunks(s.max(1))
            }
            // Pass 1: per plane, sum g and sum g * (x - mean) with g = dy * act'(y).
            let sums: Vec<(f64, f64)> = planes(xs, s)
                .zip(planes(ys, s).zip(planes(dys, s)))
                .enumerate()
                .with_min_len(planes_per_task(s))
                .map(|(plane, (x, (y, dy)))| {
                    by_act!(self.act, bwd_sums_plane(x, y, dy, self.mean[plane % c]))
                })
                .collect();
            // Pass 2: dx.
            let dx = if needs_grad(x) {
                let (sum_g, sum_gx) = per_channel(&sums, c);
                let coef = self.dx_coefficients(gs, &sum_g, &sum_gx, m);
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(s.max(1))
                    .zip(planes(xs, s).zip(planes(ys, s).zip(planes(dys, s))))
                    .enumerate()
                    .with_min_len(planes_per_task(s))
                    .for_each(|(plane, (dx, (x, (y, dy))))| {
                        by_act!(self.act, bwd_dx_plane(x, y, dy, dx, coef[plane % c]));
                    });
                Some(dx)
            } else {
                None
            };
            self.grads((x, gamma, beta), &sums, dx)
        })
    }
}

impl BatchNormTrain {
    /// Backward of the pooled variant; `grad_res` is [N, C, H/2, W/2] and contiguous.
    fn bwd_pool(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        if grad_res.dims() != [n, c, oh, ow] {
            bail!("{}: gradient shape {:?}", self.name(), grad_res.dims());
        }
        let m = (n * h * w) as f64;
        with_f32_slices(self.name(), &[x, gamma, beta, grad_res], |sl| {
            let (xs, gs, bs, dys) = (sl[0], sl[1], sl[2], sl[3]);
            // Pass 1, per plane: window argmaxes and partial sums.
            let mut arg = vec![0u8; n * c * oh * ow];
            let sums: Vec<(f64, f64)> = arg
                .par_chunks_mut(oh * ow)
                .zip(xs.par_chunks(h * w).zip(dys.par_chunks(oh * ow)))
                .enumerate()
                .map(|(plane, (arg, (x, dy)))| {
                    let a = self.affine(plane % c, gs, bs);
                    by_act!(self.act, bwd_pool_sums_plane(x, dy, arg, (h, w), a))
                })
                .collect();
            // Pass 2: dx.
            let dx = if needs_grad(x) {
                let (sum_g, sum_gx) = per_channel(&sums, c);
                let coef = self.dx_coefficients(gs, &sum_g, &sum_gx, m);
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(h * w)
                    .zip(xs.par_chunks(h * w))
                    .zip(arg.par_chunks(oh * ow).zip(dys.par_chunks(oh * ow)))
                    .enumerate()
                    .for_each(|(plane, ((dx, x), (arg, dy)))| {
                        bwd_pool_dx_plane(x, dy, arg, dx, (h, w), coef[plane % c]);
                    });
                Some(dx)
            } else {
                None
            };
            self.grads((x, gamma, beta), &sums, dx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{rand_tensor, rel_err, TOL};
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    struct Out {
        y: Tensor,
        dx: Tensor,
        dgamma: Tensor,
        dbeta: Tensor,
        running: (Tensor, Tensor),
    }

    /// One train step of BN + act on `x`, with running stats starting at (rm, rv).
    fn run(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        rm: &Tensor,
        rv: &Tensor,
        act: Activation,
        fused: bool,
    ) -> Out {
        let xv = Var::from_tensor(x).unwrap();
        let gv = Var::from_tensor(gamma).unwrap();
        let bv = Var::from_tensor(beta).unwrap();
        let rmv = Var::from_tensor(&rm.copy().unwrap()).unwrap();
        let rvv = Var::from_tensor(&rv.copy().unwrap()).unwrap();
        let (eps, momentum) = (1e-5, 0.1);
        let args = (xv.as_tensor(), gv.as_tensor(), bv.as_tensor());
        let y = if fused {
            batch_norm_train(args.0, args.1, args.2, &rmv, &rvv, eps, momentum, act).unwrap()
        } else {
            generic(args.0, args.1, args.2, &rmv, &rvv, eps, momentum, act).unwrap()
        };
        let r = crate::ops::test_util::wave(y.dims());
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        Out {
            dx: g.get(xv.as_tensor()).unwrap().clone(),
            dgamma: g.get(gv.as_tensor()).unwrap().clone(),
            dbeta: g.get(bv.as_tensor()).unwrap().clone(),
            y,
            running: (rmv.as_tensor().clone(), rvv.as_tensor().clone()),
        }
    }

    #[test]
    fn matches_candle_batch_norm_with_each_activation() {
        let mut rng = StdRng::seed_from_u64(0xb4);
        let shapes: [&[usize]; 8] = [
            &[2, 3, 5, 7],
            &[1, 16, 13, 9],
            &[4, 1, 1, 2],
            &[3, 5, 1, 1],
            &[8, 4, 32, 32],
            &[5, 7],
            &[2, 3, 4],
            &[1, 2, 71, 130],
        ];
        for (i, dims) in shapes.iter().enumerate() {
            for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
                let c = dims[1];
                // Offset and scaled activations, so that ReLU6 clips at both ends.
                let x = ((rand_tensor(&mut rng, dims) * 4.0).unwrap() + 1.5).unwrap();
                let gamma = (rand_tensor(&mut rng, &[c]) * 3.0).unwrap();
                let beta = (rand_tensor(&mut rng, &[c]) + 2.0).unwrap();
                let rm = rand_tensor(&mut rng, &[c]);
                let rv = (rand_tensor(&mut rng, &[c]) + 2.0).unwrap();
                let f = run(&x, &gamma, &beta, &rm, &rv, act, true);
                let g = run(&x, &gamma, &beta, &rm, &rv, act, false);
                let what = format!("case {i} {dims:?} {act:?}");
                assert!(rel_err(&f.y, &g.y) <= TOL, "y {what}");
                assert!(
                    rel_err(&f.dx, &g.dx) <= TOL,
                    "dx {what}: {}",
                    rel_err(&f.dx, &g.dx)
                );
                assert!(rel_err(&f.dgamma, &g.dgamma) <= TOL, "dgamma {what}");
                assert!(rel_err(&f.dbeta, &g.dbeta) <= TOL, "dbeta {what}");
                assert!(
                    rel_err(&f.running.0, &g.running.0) <= 1e-6,
                    "running mean {what}"
                );
                assert!(
                    rel_err(&f.running.1, &g.running.1) <= 1e-6,
                    "running var {what}"
                );
            }
        }
    }

    #[test]
    fn pooled_variant_matches_batch_norm_then_max_pool() {
        use crate::ops::max_pool::max_pool2x2;
        let mut rng = StdRng::seed_from_u64(0x9001);
        for dims in [
            [2usize, 3, 5, 7],
            [1, 4, 2, 2],
            [3, 2, 8, 9],
            [2, 16, 33, 32],
        ] {
            for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
                let c = dims[1];
                let x = ((rand_tensor(&mut rng, &dims) * 4.0).unwrap() + 1.5).unwrap();
                let gamma = (rand_tensor(&mut rng, &[c]) * 3.0).unwrap();
                let beta = (rand_tensor(&mut rng, &[c]) + 2.0).unwrap();
                let rm = rand_tensor(&mut rng, &[c]);
                let rv = (rand_tensor(&mut rng, &[c]) + 2.0).unwrap();
                let run = |pooled: bool| {
                    let xv = Var::from_tensor(&x).unwrap();
                    let gv = Var::from_tensor(&gamma).unwrap();
                    let bv = Var::from_tensor(&beta).unwrap();
                    let rmv = Var::from_tensor(&rm.copy().unwrap()).unwrap();
                    let rvv = Var::from_tensor(&rv.copy().unwrap()).unwrap();
                    let (xt, gt, bt) = (xv.as_tensor(), gv.as_tensor(), bv.as_tensor());
                    let y = if pooled {
                        batch_norm_train_pool2(xt, gt, bt, &rmv, &rvv, 1e-5, 0.1, act).unwrap()
                    } else {
                        let y = batch_norm_train(xt, gt, bt, &rmv, &rvv, 1e-5, 0.1, act).unwrap();
                        max_pool2x2(&y).unwrap()
                    };
                    let r = crate::ops::test_util::wave(y.dims());
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                    [
                        y,
                        get(&xv),
                        get(&gv),
                        get(&bv),
                        rmv.as_tensor().clone(),
                        rvv.as_tensor().clone(),
                    ]
                };
                let (fused, apart) = (run(true), run(false));
                for (what, (a, b)) in ["y", "dx", "dgamma", "dbeta", "rm", "rv"]
                    .iter()
                    .zip(fused.iter().zip(&apart))
                {
                    let err = rel_err(a, b);
                    assert!(err <= TOL, "{what} {dims:?} {act:?}: {err}");
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(2);
        let (rm, rv) = (
            Var::from_tensor(&rand_tensor(&mut rng, &[3])).unwrap(),
            Var::from_tensor(&rand_tensor(&mut rng, &[3])).unwrap(),
        );
        let g = rand_tensor(&mut rng, &[3]);
        let thin = rand_tensor(&mut rng, &[2, 3, 1, 8]);
        let err = batch_norm_train_pool2(&thin, &g, &g, &rm, &rv, 1e-5, 0.1, Activation::Relu);
        assert!(err.unwrap_err().to_string().contains("H, W >= 2"));
    }

    #[test]
    fn eval_variant_matches_candle_eval_with_gradients() {
        use crate::ops::max_pool::max_pool2x2;
        let mut rng = StdRng::seed_from_u64(0xe7a1);
        for dims in [[2usize, 3, 5, 7], [1, 4, 2, 2], [3, 16, 33, 32]] {
            for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
                for pool in [false, true] {
                    let c = dims[1];
                    let x = ((rand_tensor(&mut rng, &dims) * 4.0).unwrap() + 1.5).unwrap();
                    let gamma = (rand_tensor(&mut rng, &[c]) * 3.0).unwrap();
                    let beta = (rand_tensor(&mut rng, &[c]) + 2.0).unwrap();
                    let rm = rand_tensor(&mut rng, &[c]);
                    let rv = (rand_tensor(&mut rng, &[c]) + 2.0).unwrap();
                    let run = |fused: bool| {
                        let xv = Var::from_tensor(&x).unwrap();
                        let gv = Var::from_tensor(&gamma).unwrap();
                        let bv = Var::from_tensor(&beta).unwrap();
                        let (xt, gt, bt) = (xv.as_tensor(), gv.as_tensor(), bv.as_tensor());
                        let y = if fused {
                            batch_norm_eval(xt, gt, bt, &rm, &rv, 1e-5, act, pool).unwrap()
                        } else {
                            let bn = candle_nn::BatchNorm::new(
                                c,
                                rm.clone(),
                                rv.clone(),
                                gt.clone(),
                                bt.clone(),
                                1e-5,
                            )
                            .unwrap();
                            let y = act
                                .generic(&candle_core::ModuleT::forward_t(&bn, xt, false).unwrap())
                                .unwrap();
                            if pool {
                                max_pool2x2(&y).unwrap()
                            } else {
                                y
                            }
                        };
                        let r = crate::ops::test_util::wave(y.dims());
                        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                        [y, get(&xv), get(&gv), get(&bv)]
                    };
                    let (fused, candle) = (run(true), run(false));
                    for (what, (a, b)) in ["y", "dx", "dgamma", "dbeta"]
                        .iter()
                        .zip(fused.iter().zip(&candle))
                    {
                        let err = rel_err(a, b);
                        let tol = if *what == "y" { 1e-6 } else { TOL };
                        assert!(err <= tol, "{what} {dims:?} {act:?} pool {pool}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn statistics_stay_accurate_for_offset_inputs() {
        // A large common offset with a small spread: naive f32 sum-of-squares loses it all.
        let mut rng = StdRng::seed_from_u64(3);
        let dims = [4usize, 2, 64, 64];
        let noise: Vec<f32> = (0..dims.iter().product())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x = (Tensor::from_vec(noise.clone(), &dims, &Device::Cpu).unwrap() + 1000.0).unwrap();
        let (mean, var) = channel_stats(
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ncs(&dims),
        );
        let exact = |ch: usize| {
            let v: Vec<f64> = (0..4)
                .flat_map(|n| {
                    noise[(n * 2 + ch) * 4096..][..4096]
                        .iter()
                        .map(|&v| v as f64)
                })
                .collect();
            let m = v.iter().sum::<f64>() / v.len() as f64;
            (
                m,
                v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64,
            )
        };
        for ch in 0..2 {
            let (m, v) = exact(ch);
            // The input itself is rounded to f32 near 1000 (spacing 6e-5).
            assert!((mean[ch] - 1000.0 - m).abs() < 1e-5, "mean {ch}");
            assert!(
                (var[ch] - v).abs() / v < 1e-4,
                "var {ch}: {} vs {v}",
                var[ch]
            );
        }
    }

    #[test]
    fn rejects_bad_shapes_and_single_values() {
        let mut rng = StdRng::seed_from_u64(1);
        let c = 3;
        let vars = |rng: &mut StdRng| {
            (
                Var::from_tensor(&rand_tensor(rng, &[c])).unwrap(),
                Var::from_tensor(&rand_tensor(rng, &[c])).unwrap(),
            )
        };
        let (rm, rv) = vars(&mut rng);
        let g = rand_tensor(&mut rng, &[c]);
        let x = rand_tensor(&mut rng, &[2, 4, 3, 3]);
        let err = batch_norm_train(&x, &g, &g, &rm, &rv, 1e-5, 0.1, Activation::Relu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gamma must be [4]"), "{err}");
        let one = rand_tensor(&mut rng, &[1, c, 1, 1]);
        let err = batch_norm_train(&one, &g, &g, &rm, &rv, 1e-5, 0.1, Activation::Relu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 1 value per channel"), "{err}");
    }
}
