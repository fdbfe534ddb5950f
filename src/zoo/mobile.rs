//! The depthwise-separable students (`student`, `student-deeper`) and the `group-conv` study net.
//!
//! Stem: conv(3, w0, 3) -> BN -> ReLU6 -> maxpool 2, at key `cnn.0` (`.0` conv, `.1` BN).
//! Block i >= 1 at key `cnn.<i>`: `conv(c, c, 3, g) -> BN(c) -> ReLU6 -> conv(c, o, 1)` with keys
//! `.0`, `.1`, `.3` (ReLU6 sits at `.2`); g = c (depthwise, DP block) for the students and
//! g = 2 for `group-conv`. No activation follows the pointwise conv; some blocks end in a pool.
//! Then global average pool and `Linear(w_last, classes)` at `fc.0`.
//!
//! Input [N, 3, S, S] with S >= 32 -> logits [N, classes].

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{global_avg_pool, pool2, Bn, Conv, Linear};
use super::Cost;
use crate::ops::activation::Activation::Relu6;

/// One `conv(c,c,3,g) -> BN -> ReLU6 -> conv(c,o,1)` block.
#[derive(Debug, Clone)]
pub struct SeparableBlock {
    pub spatial: Conv,
    pub bn: Bn,
    pub pointwise: Conv,
    pub pool: bool,
}

#[derive(Debug, Clone)]
pub struct MobileNet {
    stem: (Conv, Bn),
    blocks: Vec<SeparableBlock>,
    fc: Linear,
    input_size: usize,
}

impl MobileNet {
    /// `widths[0]` is the stem width; block i maps `widths[i-1] -> widths[i]`.
    /// `pools[i]` says whether sequence element i (0 = stem) ends in a 2x2 max pool.
    pub fn new(
        widths: &[usize],
        pools: &[bool],
        groups: Option<usize>,
        input_size: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cnn = vb.pp("cnn");
        let stem = (
            Conv::same(3, widths[0], 3, 1, cnn.pp(0).pp(0))?,
            Bn::new(widths[0], cnn.pp(0).pp(1))?,
        );
        let mut blocks = Vec::with_capacity(widths.len() - 1);
        for i in 1..widths.len() {
            let (c, o) = (widths[i - 1], widths[i]);
            let b = cnn.pp(i);
            let g = groups.unwrap_or(c);
            blocks.push(SeparableBlock {
                spatial: Conv::same(c, c, 3, g, b.pp(0))?,
                bn: Bn::new(c, b.pp(1))?,
                pointwise: Conv::same(c, o, 1, 1, b.pp(3))?,
                pool: pools[i],
            });
        }
        let fc = Linear::new(
            *widths.last().unwrap_or(&widths[0]),
            classes,
            vb.pp("fc").pp(0),
        )?;
        debug_assert!(pools[0], "every layout pools after the stem");
        Ok(Self {
            stem,
            blocks,
            fc,
            input_size,
        })
    }

    pub fn stem(&self) -> &(Conv, Bn) {
        &self.stem
    }

    pub fn blocks(&self) -> &[SeparableBlock] {
        &self.blocks
    }

    pub fn fc(&self) -> &Linear {
        &self.fc
    }

    pub(crate) fn cost(&self) -> Cost {
        let mut cost = Cost::default();
        let mut s = self.input_size;
        cost.conv(&self.stem.0, s, s);
        s /= 2;
        for b in &self.blocks {
            cost.conv(&b.spatial, s, s);
            cost.conv(&b.pointwise, s, s);
            if b.pool {
                s /= 2;
            }
        }
        cost.linear(&self.fc);
        cost
    }
}

impl ModuleT for MobileNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (conv, bn) = &self.stem;
        let mut x = bn.forward_act_pool2(&conv.forward(x)?, train, Relu6)?;
        for b in &self.blocks {
            x = b.bn.forward_act(&b.spatial.forward(&x)?, train, Relu6)?;
            x = b.pointwise.forward(&x)?;
            if b.pool {
                x = pool2(&x)?;
            }
        }
        self.fc.forward(&global_avg_pool(&x)?)
    }
}
