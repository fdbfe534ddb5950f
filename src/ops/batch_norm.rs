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

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use super::activation::{activation, Activation};
use super::{dot16, f32_slice, needs_grad, sum16, with_f32_slices};

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
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return generic(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            momentum,
            act,
        );
    }
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
    };
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

/// Planes of `s` values per parallel task, so each task handles at least ~16K values.
fn planes_per_task(s: usize) -> usize {
    (16 * 1024 / s.max(1)).max(1)
}

/// Sums of `d = v - shift` and `d * d` over a block, in 16 f32 lanes.
#[inline]
fn shifted_sums(block: &[f32], shift: f32) -> (f32, f32) {
    let chunks = block.chunks_exact(16);
    let (mut t1, mut t2) = (0f32, 0f32);
    for &v in chunks.remainder() {
        let d = v - shift;
        t1 += d;
        t2 += d * d;
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
    (s1.iter().sum::<f32>() + t1, s2.iter().sum::<f32>() + t2)
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
                let plane = &x[(img * c + ch) * s..][..s];
                for block in plane.chunks(BLOCK) {
                    let (b1, b2) = shifted_sums(block, shift);
                    t1 += b1 as f64;
                    t2 += b2 as f64;
                }
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
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
        let gamma = f32_slice(self.name(), s2, l2)?;
        let beta = f32_slice(self.name(), s3, l3)?;
        let (_, c, s) = ncs(l1.dims());
        let per_task = planes_per_task(s);
        let act = self.act;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(per_task * s)
            .zip(x.par_chunks(per_task * s))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (i, (y, x)) in y.chunks_mut(s).zip(x.chunks(s)).enumerate() {
                    let ch = (task * per_task + i) % c;
                    let (mean, b) = (self.mean[ch], beta[ch]);
                    let scale = gamma[ch] * self.invstd[ch];
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = act.apply((x - mean) * scale + b);
                    }
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
        let grad_res = grad_res.contiguous()?;
        if grad_res.dims() != x.dims() {
            bail!("{}: gradient shape {:?}", self.name(), grad_res.dims());
        }
        let (n, c, s) = ncs(x.dims());
        let m = (n * s) as f64;
        let act = self.act;
        let dev = x.device();
        with_f32_slices(self.name(), &[x, gamma, res, &grad_res], |sl| {
            let (xs, gs, ys, dys) = (sl[0], sl[1], sl[2], sl[3]);
            // Pass 1: per channel, sum g and sum g * (x - mean) with g = dy * act'(y).
            let (sum_g, sum_gx): (Vec<f64>, Vec<f64>) = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mean = self.mean[ch];
                    let (mut t1, mut t2) = (0f64, 0f64);
                    let mut gbuf = [0f32; BLOCK];
                    let mut dbuf = [0f32; BLOCK];
                    for img in 0..n {
                        let off = (img * c + ch) * s;
                        for start in (0..s).step_by(BLOCK) {
                            let len = BLOCK.min(s - start);
                            let (g, d) = (&mut gbuf[..len], &mut dbuf[..len]);
                            let r = off + start..off + start + len;
                            for (((g, d), (&dy, &y)), &x) in g
                                .iter_mut()
                                .zip(d.iter_mut())
                                .zip(dys[r.clone()].iter().zip(&ys[r.clone()]))
                                .zip(&xs[r])
                            {
                                *g = if act.passes(y) { dy } else { 0.0 };
                                *d = x - mean;
                            }
                            t1 += sum16(g) as f64;
                            t2 += dot16(g, d) as f64;
                        }
                    }
                    (t1, t2)
                })
                .unzip();
            let dbeta: Vec<f32> = sum_g.iter().map(|&v| v as f32).collect();
            let dgamma: Vec<f32> = sum_gx
                .iter()
                .zip(&self.invstd)
                .map(|(&v, &i)| (v * i as f64) as f32)
                .collect();
            // Pass 2: dx = k0 * g - k1 - k2 * (x - mean).
            let dx = if needs_grad(x) {
                let coef: Vec<(f32, f32, f32)> = (0..c)
                    .map(|ch| {
                        let invstd = self.invstd[ch] as f64;
                        let k0 = gs[ch] as f64 * invstd;
                        let k1 = k0 * sum_g[ch] / m;
                        let k2 = k0 * invstd * (sum_gx[ch] * invstd) / m;
                        (k0 as f32, k1 as f32, k2 as f32)
                    })
                    .collect();
                let per_task = planes_per_task(s);
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(per_task * s)
                    .enumerate()
                    .for_each(|(task, dx)| {
                        for (i, dx) in dx.chunks_mut(s).enumerate() {
                            let plane = task * per_task + i;
                            let ch = plane % c;
                            let (k0, k1, k2) = coef[ch];
                            let mean = self.mean[ch];
                            let r = plane * s..(plane + 1) * s;
                            for ((dx, (&dy, &y)), &x) in dx
                                .iter_mut()
                                .zip(dys[r.clone()].iter().zip(&ys[r.clone()]))
                                .zip(&xs[r])
                            {
                                let g = if act.passes(y) { dy } else { 0.0 };
                                *dx = k0 * g - k1 - k2 * (x - mean);
                            }
                        }
                    });
                Some(Tensor::from_vec(dx, x.shape(), dev)?)
            } else {
                None
            };
            let dgamma = if needs_grad(gamma) {
                Some(Tensor::from_vec(dgamma, c, dev)?)
            } else {
                None
            };
            let dbeta = if needs_grad(beta) {
                Some(Tensor::from_vec(dbeta, c, dev)?)
            } else {
                None
            };
            Ok((dx, dgamma, dbeta))
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
