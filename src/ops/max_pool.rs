//! 2x2 max pool with stride 2 (floor: an odd last row or column is dropped), as
//! `nn.MaxPool2d(2)`:
//!
//! ```text
//! y[n,c,i,j] = max(x[n,c,2i,2j], x[n,c,2i,2j+1], x[n,c,2i+1,2j], x[n,c,2i+1,2j+1])
//! ```
//!
//! candle's backward builds the gradient from an upsampled copy of the output, an equality
//! mask, an average pool and two more upsample/multiply passes. Here the backward recomputes
//! each window's argmax from the saved input and routes the gradient to it in one pass (ties go
//! to the first maximum in row-major order, as in PyTorch). candle 0.11's backward is also
//! wrong: it scales the gradient by 1/4 (the fraction of maxima in a window, multiplied where
//! it should divide), so stock candle training shrank gradients 4x per pool.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, with_f32_slices, OpTimer};
use crate::simd::multiversion;

/// 2x2/2 max pool of x [N, C, H, W] -> [N, C, H/2, W/2]; the custom op for f32 on the CPU,
/// candle's `max_pool2d` otherwise.
pub fn max_pool2x2(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.rank() != 4 {
        bail!("max_pool2x2: x must be [N,C,H,W], got shape {:?}", x.dims());
    }
    if !super::on_cpu(x) || x.dtype() != DType::F32 {
        return max_pool2x2_generic(x);
    }
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        bail!(
            "max_pool2x2: input {:?} is smaller than the 2x2 window",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1(MaxPool2x2)
}

/// The 2x2/2 max pool in candle's device-generic ops: the even part of each plane reshaped to
/// `[N, C, H/2, 2, W/2, 2]` and reduced by `max` over the two window axes. Unlike candle's
/// `max_pool2d`, whose backward scales the gradient of a unique maximum by 1/4 (candle 0.11),
/// its gradient is the max's: 1 to the maximum (to each of tied maxima).
fn max_pool2x2_generic(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    if oh == 0 || ow == 0 {
        bail!(
            "max_pool2x2: input {:?} is smaller than the 2x2 window",
            x.dims()
        );
    }
    x.narrow(2, 0, 2 * oh)?
        .narrow(3, 0, 2 * ow)?
        .reshape((n, c, oh, 2, ow, 2))?
        .max(5)?
        .max(3)
}

struct MaxPool2x2;

/// (planes, h, w) of a [N, C, H, W] layout.
fn planes(l: &Layout) -> (usize, usize, usize) {
    let d = l.dims();
    (d[0] * d[1], d[2], d[3])
}

multiversion! {
/// Forward of one plane of width `w`: the max of each 2x2 window.
fn pool_plane(x: &[f32], y: &mut [f32], w: usize) {
    let ow = w / 2;
    for (i, y) in y.chunks_exact_mut(ow).enumerate() {
        let r0 = &x[2 * i * w..][..2 * ow];
        let r1 = &x[(2 * i + 1) * w..][..2 * ow];
        for ((y, t), b) in y.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
            *y = t[0].max(t[1]).max(b[0].max(b[1]));
        }
    }
}
}

multiversion! {
/// Backward of one plane of width `w`: each window's gradient to its first maximum. Branch-free,
/// every window position is written (argmaxes are random, so branches would mispredict).
fn pool_grad_plane(x: &[f32], g: &[f32], gx: &mut [f32], w: usize) {
    let ow = w / 2;
    for (i, g) in g.chunks_exact(ow).enumerate() {
        let (top, bottom) = gx[2 * i * w..].split_at_mut(w);
        let (top, bottom) = (&mut top[..2 * ow], &mut bottom[..2 * ow]);
        let r0 = &x[2 * i * w..][..2 * ow];
        let r1 = &x[(2 * i + 1) * w..][..2 * ow];
        for ((((&g, gt), gb), t), b) in g
            .iter()
            .zip(top.chunks_exact_mut(2))
            .zip(bottom.chunks_exact_mut(2))
            .zip(r0.chunks_exact(2))
            .zip(r1.chunks_exact(2))
        {
            let m = t[0].max(t[1]).max(b[0].max(b[1]));
            let e0 = t[0] == m;
            let e1 = !e0 & (t[1] == m);
            let e2 = !e0 & !e1 & (b[0] == m);
            let e3 = !(e0 | e1 | e2);
            gt[0] = if e0 { g } else { 0.0 };
            gt[1] = if e1 { g } else { 0.0 };
            gb[0] = if e2 { g } else { 0.0 };
            gb[1] = if e3 { g } else { 0.0 };
        }
    }
}
}

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = OpTimer::start("max pool fwd");
        let x = f32_slice(self.name(), s, l)?;
        let (_, h, w) = planes(l);
        let (oh, ow) = (h / 2, w / 2);
        let mut y = vec![0f32; x.len() / (h * w) * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(y, x)| pool_plane(x, y, w));
        let d = l.dims();
        Ok((CpuStorage::F32(y), Shape::from((d[0], d[1], oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _t = OpTimer::start("max pool bwd");
        let grad_res = grad_res.contiguous()?;
        let (n, c, h, w) = x.dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        if grad_res.dims() != [n, c, oh, ow] {
            bail!("{}: gradient shape {:?}", self.name(), grad_res.dims());
        }
        let gx = with_f32_slices(self.name(), &[x, &grad_res], |s| {
            let (x, g) = (s[0], s[1]);
            let mut gx = vec![0f32; x.len()];
            gx.par_chunks_mut(h * w)
                .zip(x.par_chunks(h * w).zip(g.par_chunks(oh * ow)))
                .for_each(|(gx, (x, g))| pool_grad_plane(x, g, gx, w));
            Ok(gx)
        })?;
        Ok(Some(Tensor::from_vec(gx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{rand_tensor, rel_err};
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn grad(x: &Tensor, r: &Tensor, pool: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = pool(v.as_tensor());
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    /// Direct-loop gradient: each window's first maximum gets the window's gradient.
    fn naive_grad(x: &Tensor, r: &Tensor) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let rs: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        let mut gx = vec![0f32; xs.len()];
        let (oh, ow) = (h / 2, w / 2);
        for p in 0..n * c {
            for i in 0..oh {
                for j in 0..ow {
                    let idx = |dy: usize, dx: usize| p * h * w + (2 * i + dy) * w + 2 * j + dx;
                    let mut best = idx(0, 0);
                    for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
                        if xs[idx(dy, dx)] > xs[best] {
                            best = idx(dy, dx);
                        }
                    }
                    gx[best] += rs[p * oh * ow + i * ow + j];
                }
            }
        }
        Tensor::from_vec(gx, x.dims(), &Device::Cpu).unwrap()
    }

    /// A random input [N, C, H, W] with odd and even sizes, and an upstream gradient of the
    /// pooled shape.
    fn random_case(rng: &mut StdRng) -> (Tensor, Tensor) {
        let sizes = [2, 3, 4, 7, 16, 33];
        let n = rng.random_range(1..=3);
        let c = rng.random_range(1..=5);
        let h = sizes[rng.random_range(0..sizes.len())];
        let w = sizes[rng.random_range(0..sizes.len())];
        let x = rand_tensor(rng, &[n, c, h, w]);
        let r = rand_tensor(rng, &[n, c, h / 2, w / 2]);
        (x, r)
    }

    #[test]
    fn matches_generic_max_pool_on_odd_and_even_sizes() {
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..30 {
            let (x, r) = random_case(&mut rng);
            let (y, gx) = grad(&x, &r, |x| max_pool2x2(x).unwrap());
            let y_ref = x.max_pool2d(2).unwrap();
            assert_eq!(rel_err(&y, &y_ref), 0.0, "{:?}", x.dims());
            // Not candle's backward: in candle 0.11 it multiplies the gradient by the
            // fraction of maxima in the window (1/4 for a unique maximum) instead of dividing.
            assert_eq!(rel_err(&gx, &naive_grad(&x, &r)), 0.0, "{:?}", x.dims());
        }
    }

    /// What `--device cuda` runs (the reshape-and-max form), on the CPU: the same outputs and,
    /// with random (untied) inputs, the same gradient as the custom op; odd sizes drop their
    /// last row or column as the op does; too-small inputs are refused.
    #[test]
    fn device_generic_form_matches_the_cpu_op() {
        use crate::ops::with_device_generic_ops;
        let mut rng = StdRng::seed_from_u64(19);
        for _ in 0..20 {
            let (x, r) = random_case(&mut rng);
            let (y, gx) = with_device_generic_ops(|| grad(&x, &r, |x| max_pool2x2(x).unwrap()));
            let (y_ref, gx_ref) = grad(&x, &r, |x| max_pool2x2(x).unwrap());
            assert_eq!(rel_err(&y, &y_ref), 0.0, "{:?}", x.dims());
            assert_eq!(rel_err(&gx, &gx_ref), 0.0, "{:?}", x.dims());
        }
        let small = rand_tensor(&mut rng, &[1, 1, 1, 4]);
        assert!(with_device_generic_ops(|| max_pool2x2(&small)).is_err());
    }

    #[test]
    fn ties_go_to_the_first_maximum() {
        let x = Tensor::new(&[[[[1f32, 1.], [1., 0.]]]], &Device::Cpu).unwrap();
        let r = Tensor::new(&[[[[2f32]]]], &Device::Cpu).unwrap();
        let (_, gx) = grad(&x, &r, |x| max_pool2x2(x).unwrap());
        let gx: Vec<f32> = gx.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gx, [2., 0., 0., 0.]);
    }

    #[test]
    fn strided_input_and_bad_shapes() {
        let mut rng = StdRng::seed_from_u64(2);
        let x = rand_tensor(&mut rng, &[2, 3, 6, 8])
            .transpose(2, 3)
            .unwrap();
        let got = max_pool2x2(&x).unwrap();
        let want = x.contiguous().unwrap().max_pool2d(2).unwrap();
        assert_eq!(rel_err(&got, &want), 0.0);
        let small = rand_tensor(&mut rng, &[1, 1, 1, 4]);
        assert!(max_pool2x2(&small).is_err());
        let flat = rand_tensor(&mut rng, &[4, 4]);
        assert!(max_pool2x2(&flat).is_err());
    }
}
