//! ReLU and ReLU6 as single ops with their own backward:
//!
//! ```text
//! relu(x)  = max(x, 0)            grad passes where 0 < x
//! relu6(x) = min(max(x, 0), 6)    grad passes where 0 < x < 6
//! ```
//!
//! candle builds ReLU6 as `maximum(0).minimum(6)`: two full-tensor ops forward and, in the
//! backward, comparison masks, casts and products for each. Here the forward is one parallel
//! pass and the backward one more, masking by the saved output (0 < y < 6 exactly when
//! 0 < x < 6). The same activations are fused into [`crate::ops::batch_norm`].

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use rayon::prelude::*;

use super::{f32_slice, with_f32_slices, OpTimer};
use crate::simd::multiversion;

/// The activations that follow a BatchNorm in the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

impl Activation {
    /// The activation in candle's generic ops (any device and dtype), with PyTorch's (and the
    /// CPU op's) gradient: 1 strictly inside the linear range, 0 at its ends. candle's own
    /// `relu` and `clamp` pass the gradient (or half of it) on at exactly 0 and 6, which a
    /// ReLU6 after a zero-initialised BatchNorm meets often. Written as `x * mask` (plus 6 where
    /// the top clips), so a NaN still propagates.
    pub fn generic(self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Relu => x.mul(&x.gt(0f64)?.to_dtype(dt)?),
            Activation::Relu6 => {
                let inside = x.gt(0f64)?.mul(&x.lt(6f64)?)?.to_dtype(dt)?;
                let top = (x.ge(6f64)?.to_dtype(dt)? * 6.0)?;
                x.mul(&inside)? + top
            }
        }
    }
}

// The activation as a const parameter, so that every kernel is compiled branch-free for each.
pub(crate) const IDENTITY: u8 = 0;
pub(crate) const RELU: u8 = 1;
pub(crate) const RELU6: u8 = 2;

#[inline(always)]
pub(crate) fn act<const A: u8>(v: f32) -> f32 {
    match A {
        IDENTITY => v,
        RELU => v.max(0.0),
        _ => v.clamp(0.0, 6.0),
    }
}

/// Whether the gradient passes, judged from the activation's output.
#[inline(always)]
pub(crate) fn passes<const A: u8>(y: f32) -> bool {
    match A {
        IDENTITY => true,
        RELU => y > 0.0,
        // `&`, not `&&`: no branch, so loops over it vectorise.
        _ => (y > 0.0) & (y < 6.0),
    }
}

/// Calls `$f::<A>(args)` with A the const code of the runtime activation `$act`.
macro_rules! by_act {
    ($act:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $act {
            $crate::ops::activation::Activation::Identity => $f::<{ $crate::ops::activation::IDENTITY }>($($arg),*),
            $crate::ops::activation::Activation::Relu => $f::<{ $crate::ops::activation::RELU }>($($arg),*),
            $crate::ops::activation::Activation::Relu6 => $f::<{ $crate::ops::activation::RELU6 }>($($arg),*),
        }
    };
}
pub(crate) use by_act;

/// Elements per parallel work unit of the elementwise passes.
pub(crate) const CHUNK: usize = 16 * 1024;

/// `act(x)` for any tensor; f32 on the CPU runs the custom op, anything else candle's ops.
pub fn activation(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    if act == Activation::Identity {
        return Ok(x.clone());
    }
    if !super::on_cpu(x) || x.dtype() != DType::F32 {
        return act.generic(x);
    }
    x.contiguous()?.apply_op1(ActivationOp(act))
}

/// ReLU6 (`min(max(x, 0), 6)`), one op forward and backward on the CPU.
pub fn relu6(x: &Tensor) -> candle_core::Result<Tensor> {
    activation(x, Activation::Relu6)
}

/// ReLU (`max(x, 0)`), one op forward and backward on the CPU.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    activation(x, Activation::Relu)
}

struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Identity => "identity",
            Activation::Relu => "relu-fused",
            Activation::Relu6 => "relu6",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = OpTimer::start("relu/relu6 fwd");
        let x = f32_slice(self.name(), s, l)?;
        multiversion! {
            fn kernel<const A: u8>(x: &[f32], y: &mut [f32]) {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = act::<A>(x);
                }
            }
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| by_act!(self.0, kernel(x, y)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _t = OpTimer::start("relu/relu6 bwd");
        let grad_res = grad_res.contiguous()?;
        if res.dims() != grad_res.dims() {
            bail!("{}: gradient shape {:?}", self.name(), grad_res.dims());
        }
        multiversion! {
            fn kernel<const A: u8>(y: &[f32], g: &[f32], gx: &mut [f32]) {
                for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(g) {
                    *gx = if passes::<A>(y) { g } else { 0.0 };
                }
            }
        }
        let gx = with_f32_slices(self.name(), &[res, &grad_res], |s| {
            let (y, g) = (s[0], s[1]);
            let mut gx = vec![0f32; y.len()];
            gx.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(gx, (y, g))| by_act!(self.0, kernel(y, g, gx)));
            Ok(gx)
        })?;
        Ok(Some(Tensor::from_vec(gx, res.shape(), res.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{rand_tensor, rel_err};
    use candle_core::Var;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// At the ends of the linear range (exactly 0 and 6) both forms pass no gradient, as
    /// PyTorch's ReLU/ReLU6; a NaN propagates through the generic form.
    #[test]
    fn generic_form_has_pytorchs_gradient_at_the_kinks() {
        let x = Tensor::new(&[-1f32, 0., 3., 6., 7.], &candle_core::Device::Cpu).unwrap();
        for (act, value, grad) in [
            (
                Activation::Relu,
                [0f32, 0., 3., 6., 7.],
                [0f32, 0., 1., 1., 1.],
            ),
            (
                Activation::Relu6,
                [0., 0., 3., 6., 6.],
                [0., 0., 1., 0., 0.],
            ),
        ] {
            for (what, f) in [
                (
                    "generic",
                    &(|x: &Tensor| act.generic(x)) as &dyn Fn(&Tensor) -> _,
                ),
                ("cpu op", &|x: &Tensor| activation(x, act)),
            ] {
                let v = Var::from_tensor(&x).unwrap();
                let y = f(v.as_tensor()).unwrap();
                let g = y.sum_all().unwrap().backward().unwrap();
                let g: Vec<f32> = g.get(v.as_tensor()).unwrap().to_vec1().unwrap();
                assert_eq!(y.to_vec1::<f32>().unwrap(), value, "{act:?} {what}");
                assert_eq!(g, grad, "{act:?} {what} gradient");
            }
            let nan = Tensor::new(&[f32::NAN, 1.], &candle_core::Device::Cpu).unwrap();
            let y: Vec<f32> = act.generic(&nan).unwrap().to_vec1().unwrap();
            assert!(y[0].is_nan() && y[1] == 1.0, "{act:?}: {y:?}");
        }
    }

    #[test]
    fn forward_and_gradient_match_generic() {
        let mut rng = StdRng::seed_from_u64(11);
        for act in [Activation::Relu, Activation::Relu6] {
            for dims in [&[1, 1, 1, 1][..], &[2, 3, 5, 7], &[3, 17, 13, 9], &[70_001]] {
                // Spread values over [-8, 8] so both ReLU6 bounds are crossed.
                let x = (rand_tensor(&mut rng, dims) * 8.0).unwrap();
                let r = rand_tensor(&mut rng, dims);
                let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                    let v = Var::from_tensor(&x).unwrap();
                    let y = f(v.as_tensor());
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, g.get(v.as_tensor()).unwrap().clone())
                };
                let (y, gx) = grad(&|x| activation(x, act).unwrap());
                let (y_ref, gx_ref) = grad(&|x| act.generic(x).unwrap());
                assert_eq!(rel_err(&y, &y_ref), 0.0, "{act:?} {dims:?}");
                assert!(rel_err(&gx, &gx_ref) <= 1e-6, "{act:?} {dims:?}");
            }
        }
    }

    #[test]
    fn strided_input_and_gradient() {
        let mut rng = StdRng::seed_from_u64(5);
        let x = (rand_tensor(&mut rng, &[2, 3, 4, 5]) * 8.0).unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let y = relu6(&v.as_tensor().transpose(2, 3).unwrap())
            .unwrap()
            .transpose(1, 3)
            .unwrap();
        let r = rand_tensor(&mut rng, y.dims());
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(v.as_tensor()).unwrap();
        let mask = x.gt(0f32).unwrap().mul(&x.lt(6f32).unwrap()).unwrap();
        let want = r
            .transpose(1, 3)
            .unwrap()
            .transpose(2, 3)
            .unwrap()
            .mul(&mask.to_dtype(DType::F32).unwrap())
            .unwrap();
        assert!(rel_err(gx, &want) <= 1e-6);
    }
}
