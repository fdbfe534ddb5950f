//! torchvision ResNet-18 with an N-way head, under torchvision's state_dict keys
//! (`conv1`, `bn1`, `layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}`, `fc`).
//!
//! Input [N, 3, S, S] (S >= 32) -> logits [N, classes]. The 3x3/2 max pool with padding 1
//! follows a ReLU, so zero padding gives the same result as PyTorch's -inf padding.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{global_avg_pool, relu, Bn, Conv, Linear};
use super::Cost;
use crate::ops::activation::Activation::Relu;

#[derive(Debug, Clone)]
pub struct BasicBlock {
    pub conv1: Conv,
    pub bn1: Bn,
    pub conv2: Conv,
    pub bn2: Bn,
    pub downsample: Option<(Conv, Bn)>,
}

impl BasicBlock {
    fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || in_c != out_c {
            let d = vb.pp("downsample");
            Some((
                Conv::new(in_c, out_c, 1, stride, 0, 1, false, d.pp(0))?,
                Bn::new(out_c, d.pp(1))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv::new(in_c, out_c, 3, stride, 1, 1, false, vb.pp("conv1"))?,
            bn1: Bn::new(out_c, vb.pp("bn1"))?,
            conv2: Conv::new(out_c, out_c, 3, 1, 1, 1, false, vb.pp("conv2"))?,
            bn2: Bn::new(out_c, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn1.forward_act(&self.conv1.forward(x)?, train, Relu)?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        relu(&(y + shortcut)?)
    }
}

#[derive(Debug, Clone)]
pub struct ResNet18 {
    conv1: Conv,
    bn1: Bn,
    layers: Vec<BasicBlock>,
    fc: Linear,
    input_size: usize,
}

pub(crate) fn out_size(s: usize, k: usize, stride: usize, pad: usize) -> usize {
    (s + 2 * pad - k) / stride + 1
}

impl ResNet18 {
    pub fn new(input_size: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::with_capacity(8);
        let mut in_c = 64;
        for (li, &out_c) in [64usize, 128, 256, 512].iter().enumerate() {
            let stride = if li == 0 { 1 } else { 2 };
            let l = vb.pp(format!("layer{}", li + 1));
            layers.push(BasicBlock::new(in_c, out_c, stride, l.pp(0))?);
            layers.push(BasicBlock::new(out_c, out_c, 1, l.pp(1))?);
            in_c = out_c;
        }
        Ok(Self {
            conv1: Conv::new(3, 64, 7, 2, 3, 1, false, vb.pp("conv1"))?,
            bn1: Bn::new(64, vb.pp("bn1"))?,
            layers,
            fc: Linear::new(512, classes, vb.pp("fc"))?,
            input_size,
        })
    }

    pub fn stem(&self) -> (&Conv, &Bn) {
        (&self.conv1, &self.bn1)
    }

    pub fn blocks(&self) -> &[BasicBlock] {
        &self.layers
    }

    pub fn fc(&self) -> &Linear {
        &self.fc
    }

    pub(crate) fn cost(&self) -> Cost {
        let mut cost = Cost::default();
        let mut s = out_size(self.input_size, 7, 2, 3);
        cost.conv(&self.conv1, s, s);
        s = out_size(s, 3, 2, 1);
        for b in &self.layers {
            let so = out_size(s, 3, b.conv1.stride(), 1);
            cost.conv(&b.conv1, so, so);
            cost.conv(&b.conv2, so, so);
            if let Some((d, _)) = &b.downsample {
                cost.conv(d, so, so);
            }
            s = so;
        }
        cost.linear(&self.fc);
        cost
    }
}

/// `nn.MaxPool2d(3, stride=2, padding=1)` on non-negative input.
pub(crate) fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .max_pool2d_with_stride(3, 2)
}

impl ModuleT for ResNet18 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_act(&self.conv1.forward(x)?, train, Relu)?;
        let mut x = max_pool_3x3_s2_p1(&x)?;
        for b in &self.layers {
            x = b.forward_t(&x, train)?;
        }
        self.fc.forward(&global_avg_pool(&x)?)
    }
}
