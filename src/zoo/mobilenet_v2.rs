//! torchvision's MobileNetV2 (width 1.0) with a C-way head, under torchvision's state_dict
//! keys, so ImageNet-pretrained checkpoints load as they are.
//!
//! ```text
//! features.0   conv(3, 32, 3, stride 2) -> BN -> ReLU6
//! features.i   inverted residual, i = 1..=17, with (t, c, n, s) =
//!              (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1):
//!              [1x1 expand to t*in -> BN -> ReLU6, when t != 1]
//!              -> 3x3 depthwise (stride s on a stage's first block) -> BN -> ReLU6
//!              -> 1x1 project to c -> BN;  + input when stride 1 and in == out
//! features.18  conv(320, 1280, 1) -> BN -> ReLU6
//! global average pool -> Dropout(0.2) (training only) -> classifier.1 = Linear(1280, C)
//! ```
//!
//! Keys of a block: t = 1: `conv.0.0` (dw), `conv.0.1`, `conv.1` (project), `conv.2`;
//! t = 6: `conv.0.{0,1}` (expand), `conv.1.{0,1}` (dw), `conv.2` (project), `conv.3`.
//! Convolutions have no bias (a BatchNorm follows each). Input [N, 3, S, S] (S >= 32) ->
//! logits [N, C].

use std::sync::{Arc, Mutex};

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::layers::{global_avg_pool, Bn, Conv, Linear};
use super::resnet::out_size;
use super::Cost;
use crate::ops::activation::Activation::{Identity, Relu6};

/// (expansion t, output channels c, repeats n, first stride s) of the seven stages.
pub const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
pub const STEM_CHANNELS: usize = 32;
pub const LAST_CHANNELS: usize = 1280;
/// Dropout before the classifier, as torchvision.
pub const DROPOUT: f32 = 0.2;
const DROPOUT_SEED: u64 = 0x6d6e_7632;

/// One inverted residual block.
#[derive(Debug, Clone)]
pub struct InvertedResidual {
    pub expand: Option<(Conv, Bn)>,
    pub depthwise: (Conv, Bn),
    pub project: (Conv, Bn),
    /// Stride 1 and equal in/out channels: the input is added to the output.
    pub residual: bool,
}

impl InvertedResidual {
    fn new(in_c: usize, out_c: usize, stride: usize, t: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = in_c * t;
        let conv = vb.pp("conv");
        let (expand, dw, project, project_bn) = if t == 1 {
            (None, conv.pp(0), conv.pp(1), conv.pp(2))
        } else {
            let e = conv.pp(0);
            let expand = (
                Conv::new(in_c, hidden, 1, 1, 0, 1, false, e.pp(0))?,
                Bn::new(hidden, e.pp(1))?,
            );
            (Some(expand), conv.pp(1), conv.pp(2), conv.pp(3))
        };
        Ok(Self {
            expand,
            depthwise: (
                Conv::new(hidden, hidden, 3, stride, 1, hidden, false, dw.pp(0))?,
                Bn::new(hidden, dw.pp(1))?,
            ),
            project: (
                Conv::new(hidden, out_c, 1, 1, 0, 1, false, project)?,
                Bn::new(out_c, project_bn)?,
            ),
            residual: stride == 1 && in_c == out_c,
        })
    }

    pub fn stride(&self) -> usize {
        self.depthwise.0.stride()
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        inverted_residual_t(
            x,
            self.expand.as_ref(),
            &self.depthwise,
            &self.project,
            self.residual,
            train,
        )
    }
}

/// An inverted residual's forward, whatever its convolutions' padding (the zoo's [`Conv`]
/// here, TensorFlow's "same" in EfficientNet-Lite0): [expand -> BN -> ReLU6] -> depthwise ->
/// BN -> ReLU6 -> project -> BN [+ x].
pub(crate) fn inverted_residual_t<C: Module>(
    x: &Tensor,
    expand: Option<&(C, Bn)>,
    depthwise: &(C, Bn),
    project: &(C, Bn),
    residual: bool,
    train: bool,
) -> Result<Tensor> {
    let mut y = x.clone();
    if let Some((conv, bn)) = expand {
        y = bn.forward_act(&conv.forward(&y)?, train, Relu6)?;
    }
    let (conv, bn) = depthwise;
    y = bn.forward_act(&conv.forward(&y)?, train, Relu6)?;
    let (conv, bn) = project;
    y = bn.forward_act(&conv.forward(&y)?, train, Identity)?;
    if residual {
        y + x
    } else {
        Ok(y)
    }
}

#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    stem: (Conv, Bn),
    blocks: Vec<InvertedResidual>,
    head: (Conv, Bn),
    classifier: Linear,
    input_size: usize,
    /// Dropout masks come from a seeded generator (shared by clones), so two identically
    /// built models draw the same masks and a run is reproducible.
    dropout_rng: Arc<Mutex<StdRng>>,
}

impl MobileNetV2 {
    pub fn new(input_size: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        let f = vb.pp("features");
        let stem = (
            Conv::new(3, STEM_CHANNELS, 3, 2, 1, 1, false, f.pp(0).pp(0))?,
            Bn::new(STEM_CHANNELS, f.pp(0).pp(1))?,
        );
        let mut blocks = Vec::with_capacity(17);
        let mut in_c = STEM_CHANNELS;
        for (t, c, n, s) in STAGES {
            for r in 0..n {
                let stride = if r == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(
                    in_c,
                    c,
                    stride,
                    t,
                    f.pp(blocks.len() + 1),
                )?);
                in_c = c;
            }
        }
        let last = f.pp(blocks.len() + 1);
        let head = (
            Conv::new(in_c, LAST_CHANNELS, 1, 1, 0, 1, false, last.pp(0))?,
            Bn::new(LAST_CHANNELS, last.pp(1))?,
        );
        let classifier = Linear::new(LAST_CHANNELS, classes, vb.pp("classifier").pp(1))?;
        Ok(Self {
            stem,
            blocks,
            head,
            classifier,
            input_size,
            dropout_rng: Arc::new(Mutex::new(StdRng::seed_from_u64(DROPOUT_SEED))),
        })
    }

    /// Inverted dropout: zeroes each value with probability [`DROPOUT`], scales the rest.
    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let keep = 1.0 - DROPOUT;
        let mask: Vec<f32> = {
            let mut rng = self.dropout_rng.lock().expect("dropout rng lock");
            (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }

    pub fn stem(&self) -> &(Conv, Bn) {
        &self.stem
    }

    pub fn blocks(&self) -> &[InvertedResidual] {
        &self.blocks
    }

    pub fn head(&self) -> &(Conv, Bn) {
        &self.head
    }

    pub fn classifier(&self) -> &Linear {
        &self.classifier
    }

    pub(crate) fn cost(&self) -> Cost {
        let mut cost = Cost::default();
        let mut s = out_size(self.input_size, 3, 2, 1);
        cost.conv(&self.stem.0, s, s);
        for b in &self.blocks {
            if let Some((conv, _)) = &b.expand {
                cost.conv(conv, s, s);
            }
            s = out_size(s, 3, b.stride(), 1);
            cost.conv(&b.depthwise.0, s, s);
            cost.conv(&b.project.0, s, s);
        }
        cost.conv(&self.head.0, s, s);
        cost.linear(&self.classifier);
        cost
    }
}

impl MobileNetV2 {
    /// The pooled features the classifier reads: [N, 3, S, S] -> [N, 1280].
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (conv, bn) = &self.stem;
        let mut x = bn.forward_act(&conv.forward(x)?, train, Relu6)?;
        for b in &self.blocks {
            x = b.forward_t(&x, train)?;
        }
        let (conv, bn) = &self.head;
        x = bn.forward_act(&conv.forward(&x)?, train, Relu6)?;
        global_avg_pool(&x)
    }
}

impl ModuleT for MobileNetV2 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.features_t(x, train)?;
        if train {
            x = self.dropout(&x)?;
        }
        self.classifier.forward(&x)
    }
}

/// Renames the older flat key layout some checkpoints use (`features.N.conv.{0,1,3,4,6,7}`
/// for t = 6 blocks, `conv.{0,1,3,4}` for t = 1) to torchvision's nested one; a dict already in
/// torchvision's layout (or any other keys) passes through unchanged.
pub fn torchvision_keys<T>(
    tensors: std::collections::BTreeMap<String, T>,
) -> std::collections::BTreeMap<String, T> {
    // Only the flat layout has a fourth layer in block 1 (its project BatchNorm).
    if !tensors.keys().any(|k| k.starts_with("features.1.conv.3.")) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| (flat_to_torchvision(&k).unwrap_or(k), v))
        .collect()
}

fn flat_to_torchvision(key: &str) -> Option<String> {
    let rest = key.strip_prefix("features.")?;
    let (block, rest) = rest.split_once(".conv.")?;
    let (layer, param) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let new = match (block == 1, layer) {
        (_, "0") => "0.0",
        (_, "1") => "0.1",
        (true, "3") => "1",
        (true, "4") => "2",
        (false, "3") => "1.0",
        (false, "4") => "1.1",
        (false, "6") => "2",
        (false, "7") => "3",
        _ => return None,
    };
    Some(format!("features.{block}.conv.{new}.{param}"))
}
