//! Checkpoint tensors to a model: the spec read off the tensor shapes, key layouts mapped to
//! the zoo's, a zero head for backbone-only checkpoints, and an input normalisation folded
//! into the first layer.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use slimserve::formats::model_dir::{self, ModelConfig};
use slimserve::zoo::{mobilenet_v2, Arch, Model, ModelSpec};

/// Reads widths and class count off the tensors, so pruned students import too.
fn infer_spec(arch: Arch, input_size: usize, t: &BTreeMap<String, Tensor>) -> Result<ModelSpec> {
    let dim0 = |k: &str| -> Result<usize> {
        t.get(k)
            .map(|x| x.dims().first().copied().unwrap_or(0))
            .with_context(|| format!("missing `{k}` (is the architecture {arch} right?)"))
    };
    let mut spec = ModelSpec::new(arch, 1, input_size);
    let n = spec.widths.len();
    match arch {
        Arch::Big | Arch::StdConv => {
            spec.num_classes = dim0("fc.0.weight")?;
            for (k, w) in spec.widths.iter_mut().enumerate() {
                *w = dim0(&format!("cnn.{}.weight", 4 * k))?;
            }
        }
        Arch::Student | Arch::StudentDeeper | Arch::GroupConv => {
            spec.num_classes = dim0("fc.0.weight")?;
            spec.widths[0] = dim0("cnn.0.0.weight")?;
            for i in 1..n {
                spec.widths[i] = dim0(&format!("cnn.{i}.3.weight"))?;
            }
        }
        Arch::Resnet18 => spec.num_classes = dim0("fc.weight")?,
        Arch::MobileNetV2 => {
            spec.num_classes = t
                .get(MOBILENET_HEAD)
                .map(|w| w.dims()[0])
                .unwrap_or(BACKBONE_ONLY_CLASSES)
        }
    }
    Ok(spec)
}

/// MobileNetV2's classifier weight; backbone-only checkpoints (feature extractors) lack it.
const MOBILENET_HEAD: &str = "classifier.1.weight";
/// Classes of the zero head given to a backbone-only checkpoint (ImageNet's), for
/// `train --init`, which replaces the head anyway.
const BACKBONE_ONLY_CLASSES: usize = 1000;

/// ImageNet's per-channel mean and std of [0, 1] RGB.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The first convolution and the BatchNorm after it (if any) of each architecture.
fn first_layer(arch: Arch) -> (&'static str, Option<&'static str>) {
    match arch {
        Arch::Big | Arch::StdConv => ("cnn.0", None),
        Arch::Student | Arch::StudentDeeper | Arch::GroupConv => ("cnn.0.0", None),
        Arch::Resnet18 => ("conv1", Some("bn1")),
        Arch::MobileNetV2 => ("features.0.0", Some("features.0.1")),
    }
}

/// Rewrites the first layer so that on [0, 1] RGB it computes what it computed on
/// `(x - mean) / std`: weights divided by std per input channel, and the constant
/// `-sum(w * mean / std)` moved into the bias or, for a bias-free conv, into the following
/// BatchNorm's running mean (in training mode BatchNorm subtracts the batch mean, so the
/// constant cancels there too). Exact except at the zero-padded border, where the original
/// saw the normalised value 0 and the folded layer sees the pixel value 0.
pub fn fold_input_normalization(
    tensors: &mut BTreeMap<String, Tensor>,
    arch: Arch,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<()> {
    let (conv, bn) = first_layer(arch);
    let wkey = format!("{conv}.weight");
    let w = tensors
        .get(&wkey)
        .with_context(|| format!("missing `{wkey}`"))?;
    let (o, c, _, _) = w.dims4()?;
    if c != 3 {
        bail!("`{wkey}` takes {c} input channels, not 3 (RGB)");
    }
    let inv_std = Tensor::new(&std.map(|s| 1.0 / s), &Device::Cpu)?.reshape((1, 3, 1, 1))?;
    let m = Tensor::new(&mean, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
    let folded = w.broadcast_mul(&inv_std)?;
    // offset[o] = -sum_{c,ky,kx} w'[o,c,ky,kx] * mean[c]
    let offset = folded.broadcast_mul(&m)?.reshape((o, ()))?.sum(1)?.neg()?;
    tensors.insert(wkey, folded);
    let bias = format!("{conv}.bias");
    if let Some(b) = tensors.get(&bias) {
        let b = (b + &offset)?;
        tensors.insert(bias, b);
    } else {
        let bn = bn.context("a bias-free first conv without a BatchNorm after it")?;
        let key = format!("{bn}.running_mean");
        let rm = tensors
            .get(&key)
            .with_context(|| format!("missing `{key}`"))?;
        let rm = (rm - &offset)?;
        tensors.insert(key, rm);
    }
    Ok(())
}

/// Turns checkpoint tensors into a complete model of `arch`: checks every key and shape,
/// adds a zero head to a backbone-only MobileNetV2, and folds `normalization` (mean, std)
/// into the first layer. What was done is said in `provenance.notes`.
pub fn to_model(
    tensors: BTreeMap<String, Tensor>,
    arch: Arch,
    input_size: usize,
    labels: Option<Vec<String>>,
    normalization: Option<([f32; 3], [f32; 3])>,
) -> Result<(ModelConfig, BTreeMap<String, Tensor>)> {
    let mut tensors = if arch == Arch::MobileNetV2 {
        mobilenet_v2::torchvision_keys(tensors)
    } else {
        tensors
    };
    let mut notes = Vec::new();
    if arch == Arch::MobileNetV2 && !tensors.contains_key(MOBILENET_HEAD) {
        // A feature extractor: a zero head (uniform answers) makes it a complete model;
        // `slimtrain train --init` replaces the head with one for the dataset's classes.
        let c = labels.as_ref().map_or(BACKBONE_ONLY_CLASSES, Vec::len);
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        tensors.insert(
            MOBILENET_HEAD.into(),
            zeros(&[c, mobilenet_v2::LAST_CHANNELS])?,
        );
        tensors.insert("classifier.1.bias".into(), zeros(&[c])?);
        notes.push(format!(
            "backbone only: the checkpoint has no classifier, so a zero {c}-class head was added (use with `slimtrain train --init`)"
        ));
    }
    let spec = infer_spec(arch, input_size, &tensors)?;
    let labels = labels.unwrap_or_else(|| model_dir::default_labels(spec.num_classes));
    if labels.len() != spec.num_classes {
        bail!(
            "{} labels given, but the checkpoint's classifier has {} classes",
            labels.len(),
            spec.num_classes
        );
    }
    if let Some((mean, std)) = normalization {
        fold_input_normalization(&mut tensors, arch, mean, std)?;
        notes.push(format!(
            "input normalisation (mean {mean:?}, std {std:?}) folded into the first layer: inputs are [0, 1] RGB"
        ));
    }
    Model::from_tensors(&spec, &tensors, &Device::Cpu)?;
    let mut config = ModelConfig::new(spec, labels);
    if !notes.is_empty() {
        config.provenance.notes = Some(notes.join("; "));
    }
    Ok((config, tensors))
}
