//! `big` (the 6-layer CNN teacher) and `std-conv` (the architecture study's standard-conv net).
//!
//! Layout: 6 x [conv(c, o, 3) -> BN -> ReLU -> maxpool 2] then flatten and `Linear(o6 * s * s, classes)`
//! with `s = input_size / 64`. Keys: `cnn.<4k>` convs, `cnn.<4k+1>` BatchNorms, `fc.0`
//! (the reference `nn.Sequential` also holds the ReLU and pool at `4k+2`, `4k+3`).
//!
//! Input [N, 3, S, S] -> logits [N, classes]; S >= 64 so all six pools keep a pixel.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Bn, Conv, Linear};
use super::Cost;
use crate::ops::activation::Activation::Relu;

#[derive(Debug, Clone)]
pub struct PlainCnn {
    blocks: Vec<(Conv, Bn)>,
    fc: Linear,
    input_size: usize,
}

impl PlainCnn {
    pub fn new(
        widths: &[usize],
        input_size: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cnn = vb.pp("cnn");
        let mut blocks = Vec::with_capacity(widths.len());
        let mut in_c = 3;
        for (k, &o) in widths.iter().enumerate() {
            let conv = Conv::same(in_c, o, 3, 1, cnn.pp(4 * k))?;
            let bn = Bn::new(o, cnn.pp(4 * k + 1))?;
            blocks.push((conv, bn));
            in_c = o;
        }
        let side = input_size >> widths.len();
        let fc = Linear::new(in_c * side * side, classes, vb.pp("fc").pp(0))?;
        Ok(Self {
            blocks,
            fc,
            input_size,
        })
    }

    pub fn blocks(&self) -> &[(Conv, Bn)] {
        &self.blocks
    }

    pub fn fc(&self) -> &Linear {
        &self.fc
    }

    pub(crate) fn cost(&self) -> Cost {
        let mut cost = Cost::default();
        let mut s = self.input_size;
        for (conv, _) in &self.blocks {
            cost.conv(conv, s, s);
            s /= 2;
        }
        cost.linear(&self.fc);
        cost
    }
}

impl ModuleT for PlainCnn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for (conv, bn) in &self.blocks {
            x = bn.forward_act_pool2(&conv.forward(&x)?, train, Relu)?;
        }
        self.fc.forward(&x.flatten_from(1)?)
    }
}
