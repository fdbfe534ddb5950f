//! Building blocks shared by the architectures: convolution (with the fast depthwise path),
//! BatchNorm, linear layers and activations.
//!
//! Every layer is built from a [`VarBuilder`] whose `pp` path is the PyTorch state_dict key,
//! so weights move between PyTorch and candle without renaming. Initialisation follows
//! PyTorch's defaults (uniform in ±1/sqrt(fan_in) for weights and biases; BatchNorm gamma 1,
//! beta 0) so that training from scratch behaves like the reference code.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder};

use crate::ops::activation::{self, Activation};
use crate::ops::batch_norm::{batch_norm_eval, batch_norm_train, batch_norm_train_pool2};
use crate::ops::conv2d::conv2d;
use crate::ops::depthwise::{depthwise_conv3x3, depthwise_conv3x3_bias, depthwise_conv3x3_shifted};
use crate::ops::max_pool::max_pool2x2;
use crate::ops::{fast_ops_enabled, on_cpu};

/// BatchNorm settings of the reference models (PyTorch defaults).
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

fn uniform_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A 2-D convolution `conv(i, o, k, g)` with optional bias.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv {
    /// `padding` is `k / 2` for the study's "same" convolutions; ResNet passes its own.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = in_c / groups * k * k;
        let weight =
            vb.get_with_hints((out_c, in_c / groups, k, k), "weight", uniform_init(fan_in))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_c, "bias", uniform_init(fan_in))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            groups,
        })
    }

    /// The study's convolution: stride 1, padding k/2, with bias.
    pub fn same(
        in_c: usize,
        out_c: usize,
        k: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::new(in_c, out_c, k, 1, k / 2, groups, true, vb)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The stride of a depthwise 3x3 convolution with padding 1, which the custom op
    /// computes (stride 2 as stride 1 and every other row and column); `None` otherwise.
    fn depthwise3x3_stride(&self) -> Option<usize> {
        let (out_c, in_per_group, kh, kw) = self.weight.dims4().ok()?;
        (in_per_group == 1 && out_c == self.groups && kh == 3 && kw == 3 && self.padding == 1)
            .then_some(self.stride)
    }
}

/// Rows and columns 0, s, 2s, ... of `y` [N, C, H, W]: a stride-`s` convolution's output from
/// the stride-1 one (same padding, so `ceil(H / s)` rows).
fn subsample(y: &Tensor, s: usize) -> Result<Tensor> {
    let (n, c, h, w) = y.dims4()?;
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    y.pad_with_zeros(2, 0, oh * s - h)?
        .pad_with_zeros(3, 0, ow * s - w)?
        .reshape((n, c, oh, s, ow, s))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, oh, ow))
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let depthwise = self.depthwise3x3_stride();
        if let Some(stride) = depthwise {
            if !on_cpu(x) {
                // Off the CPU: shifted multiply-adds at the layer's stride, bias included
                // (candle's grouped convolution would run one convolution per channel).
                return depthwise_conv3x3_shifted(x, &self.weight, self.bias.as_ref(), stride);
            }
        }
        if fast_ops_enabled() {
            // Custom ops with the bias fused in.
            if let Some(stride) = depthwise {
                let y = match &self.bias {
                    Some(b) => depthwise_conv3x3_bias(x, &self.weight, b)?,
                    None => depthwise_conv3x3(x, &self.weight)?,
                };
                return if stride == 1 {
                    Ok(y)
                } else {
                    subsample(&y, stride)
                };
            }
            return conv2d(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.stride,
                self.padding,
                self.groups,
            );
        }
        let y = if depthwise == Some(1) {
            depthwise_conv3x3(x, &self.weight)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// BatchNorm2d: batch statistics and a running-stat update in train mode, running stats in eval.
#[derive(Debug, Clone)]
pub struct Bn {
    inner: BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    /// The running statistics `inner` reads in eval mode (sharing its storage), which the
    /// fused train-mode op updates.
    state: (Var, Var),
}

impl Bn {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = BatchNormConfig {
            eps: BN_EPS,
            remove_mean: true,
            affine: true,
            momentum: BN_MOMENTUM,
        };
        let inner = candle_nn::batch_norm(c, cfg, vb.clone())?;
        // `running_mean()` is the Var's own tensor, so these share its storage.
        let state = (
            Var::from_tensor(inner.running_mean())?,
            Var::from_tensor(inner.running_var())?,
        );
        Ok(Self {
            inner,
            state,
            weight: vb.get(c, "weight")?,
            bias: vb.get(c, "bias")?,
            running_mean: vb.get(c, "running_mean")?,
            running_var: vb.get(c, "running_var")?,
        })
    }

    /// Gamma: the importance score used by channel pruning.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn running_mean(&self) -> &Tensor {
        &self.running_mean
    }

    pub fn running_var(&self) -> &Tensor {
        &self.running_var
    }

    /// `act(bn(x))`; in train mode on the CPU one fused op (statistics, normalisation,
    /// affine, activation and the running-stat update), otherwise candle's BatchNorm.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        if !fast_ops_enabled() {
            return act.generic(&self.inner.forward_t(x, train)?);
        }
        if train {
            let (weight, bias) = self
                .inner
                .weight_and_bias()
                .expect("the zoo's BatchNorms are affine");
            batch_norm_train(
                x,
                weight,
                bias,
                &self.state.0,
                &self.state.1,
                BN_EPS,
                BN_MOMENTUM,
                act,
            )
        } else {
            self.eval_fused(x, act, false)
        }
    }
}

impl Bn {
    /// `pool2(act(bn(x)))`; in train mode on the CPU one fused op that never stores the
    /// full-resolution activation.
    pub fn forward_act_pool2(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        if !fast_ops_enabled() {
            return pool2(&self.forward_act(x, train, act)?);
        }
        if !train {
            return self.eval_fused(x, act, true);
        }
        let (weight, bias) = self
            .inner
            .weight_and_bias()
            .expect("the zoo's BatchNorms are affine");
        batch_norm_train_pool2(
            x,
            weight,
            bias,
            &self.state.0,
            &self.state.1,
            BN_EPS,
            BN_MOMENTUM,
            act,
        )
    }
}

impl Bn {
    /// Eval mode with the running statistics, `act` and optionally the pool in one pass.
    fn eval_fused(&self, x: &Tensor, act: Activation, pool: bool) -> Result<Tensor> {
        let (weight, bias) = self
            .inner
            .weight_and_bias()
            .expect("the zoo's BatchNorms are affine");
        batch_norm_eval(
            x,
            weight,
            bias,
            self.inner.running_mean(),
            self.inner.running_var(),
            BN_EPS,
            act,
            pool,
        )
    }
}

impl ModuleT for Bn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, Activation::Identity)
    }
}

/// Fully connected layer `Linear(i, o)` with bias.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(in_f: usize, out_f: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints((out_f, in_f), "weight", uniform_init(in_f))?;
        let b = vb.get_with_hints(out_f, "bias", uniform_init(in_f))?;
        Ok(Self {
            inner: candle_nn::Linear::new(w, Some(b)),
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}

pub fn relu6(x: &Tensor) -> Result<Tensor> {
    if fast_ops_enabled() {
        activation::relu6(x)
    } else {
        x.clamp(0f32, 6f32)
    }
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    if fast_ops_enabled() {
        activation::relu(x)
    } else {
        x.relu()
    }
}

/// 2x2 max pool, stride 2 (floor), as `nn.MaxPool2d(2)`.
pub fn pool2(x: &Tensor) -> Result<Tensor> {
    if fast_ops_enabled() {
        max_pool2x2(x)
    } else {
        x.max_pool2d(2)
    }
}

/// Global average pool: [N, C, H, W] -> [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}
