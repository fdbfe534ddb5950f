//! Channel pruning by BatchNorm scale (network slimming), as SPEC.md describes.
//!
//! For the depthwise-separable students, the channels of width index `j` (the output of
//! sequence element `j`, 0 = stem) are consumed by block `j + 1`, whose depthwise conv is
//! followed by BatchNorm `cnn.<j+1>.1`; its gamma is each channel's importance. A step keeps the
//! `floor(base_width[j] * width_mult)` most important channels of every prunable width
//! (index 3 up to the last width that feeds another block), slicing together the producer's
//! pointwise output rows `cnn.<j>.3`, the consumer's depthwise conv and BatchNorm, and the
//! consumer's pointwise input columns.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use slimserve::zoo::{Arch, ModelSpec};

/// First width index that pruning shrinks (the reference code's `range(3, ...)`).
pub const FIRST_PRUNABLE: usize = 3;

/// Width indices that pruning shrinks for this architecture.
pub fn prunable(arch: Arch) -> Result<std::ops::Range<usize>> {
    if !arch.is_prunable() {
        bail!("pruning applies to the depthwise-separable students (student, student-deeper), not {arch}");
    }
    // The last width feeds the classifier, not a depthwise conv, so it has no importance score.
    Ok(FIRST_PRUNABLE..arch.default_widths().len() - 1)
}

/// The widths at `width_mult` (the reference: `int(base * width_mult)` for prunable indices).
pub fn widths_at(arch: Arch, width_mult: f64) -> Result<Vec<usize>> {
    let mut w = arch.default_widths();
    for j in prunable(arch)? {
        w[j] = ((w[j] as f64 * width_mult).floor() as usize).max(1);
    }
    Ok(w)
}

fn top_k_indices(gamma: &Tensor, k: usize) -> Result<Vec<u32>> {
    let g: Vec<f32> = gamma.to_vec1()?;
    let mut order: Vec<usize> = (0..g.len()).collect();
    // Stable sort by descending gamma: ties keep the lower channel index.
    order.sort_by(|&a, &b| g[b].total_cmp(&g[a]));
    let mut keep: Vec<u32> = order.into_iter().take(k).map(|i| i as u32).collect();
    keep.sort_unstable();
    Ok(keep)
}

/// Slices `tensors` of `spec` down to `new_widths`; returns the new spec and tensors.
pub fn prune(
    spec: &ModelSpec,
    tensors: &BTreeMap<String, Tensor>,
    new_widths: &[usize],
) -> Result<(ModelSpec, BTreeMap<String, Tensor>)> {
    let range = prunable(spec.arch)?;
    if new_widths.len() != spec.widths.len() {
        bail!(
            "{} widths given for {} layers",
            new_widths.len(),
            spec.widths.len()
        );
    }
    let mut out = tensors.clone();
    let get = |m: &BTreeMap<String, Tensor>, k: &str| -> Result<Tensor> {
        m.get(k).cloned().with_context(|| format!("missing `{k}`"))
    };
    for (j, (&old, &new)) in spec.widths.iter().zip(new_widths).enumerate() {
        if old == new {
            continue;
        }
        if !range.contains(&j) {
            bail!("width index {j} of {} is not prunable", spec.arch);
        }
        if new > old || new == 0 {
            bail!("width {j} would go from {old} to {new}; pruning only shrinks");
        }
        let keep = top_k_indices(&get(&out, &format!("cnn.{}.1.weight", j + 1))?, new)?;
        let idx = Tensor::new(keep.as_slice(), &Device::Cpu)?;
        let mut slice = |key: String, dim: usize| -> Result<()> {
            let t = get(&out, &key)?.index_select(&idx, dim)?;
            out.insert(key, t);
            Ok(())
        };
        // Producer: block j's pointwise conv output rows.
        slice(format!("cnn.{j}.3.weight"), 0)?;
        slice(format!("cnn.{j}.3.bias"), 0)?;
        // Consumer: block j+1's depthwise conv, its BatchNorm, and its pointwise input columns.
        let c = j + 1;
        slice(format!("cnn.{c}.0.weight"), 0)?;
        slice(format!("cnn.{c}.0.bias"), 0)?;
        for s in ["weight", "bias", "running_mean", "running_var"] {
            slice(format!("cnn.{c}.1.{s}"), 0)?;
        }
        slice(format!("cnn.{c}.3.weight"), 1)?;
    }
    let new_spec = ModelSpec {
        widths: new_widths.to_vec(),
        ..spec.clone()
    };
    slimserve::zoo::Model::from_tensors(&new_spec, &out, &Device::Cpu)?;
    Ok((new_spec, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::ModuleT;
    use slimserve::zoo::{param_count, weight_shapes, Model};

    #[test]
    fn parameter_counts_follow_the_reference_curve() {
        // SPEC.md's curve for the student at rate 0.95.
        let expected = [256_779, 236_066, 217_850, 200_354, 185_091];
        let mut mult = 1.0;
        for want in expected {
            let spec = ModelSpec {
                widths: widths_at(Arch::Student, mult).unwrap(),
                ..ModelSpec::new(Arch::Student, 11, 256)
            };
            assert_eq!(
                param_count(&weight_shapes(&spec).unwrap()),
                want,
                "width_mult {mult}"
            );
            mult *= 0.95;
        }
    }

    #[test]
    fn pruning_drops_the_channels_with_the_smallest_gamma() {
        let spec = ModelSpec::new(Arch::StudentDeeper, 4, 32);
        let (varmap, _) = Model::init(&spec, &Device::Cpu).unwrap();
        let mut tensors: BTreeMap<String, Tensor> = slimserve::zoo::varmap_tensors(&varmap);
        // Width 3 (128 channels) is consumed by block 4: make gamma grow with the channel index,
        // and zero the last channels so pruning them cannot change the output.
        let mut gamma: Vec<f32> = (0..128).map(|i| 1.0 + i as f32).collect();
        for g in gamma.iter_mut().take(128).skip(121) {
            *g = 0.0;
        }
        gamma.swap(0, 127); // channel 0 now unimportant, channel 127 important
        tensors.insert(
            "cnn.4.1.weight".into(),
            Tensor::new(gamma.as_slice(), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "cnn.4.1.bias".into(),
            Tensor::zeros(128, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let mut widths = spec.widths.clone();
        widths[3] = 121;
        let (new_spec, pruned) = prune(&spec, &tensors, &widths).unwrap();
        assert_eq!(pruned["cnn.3.3.weight"].dims(), &[121, 64, 1, 1]);
        assert_eq!(pruned["cnn.4.0.weight"].dims(), &[121, 1, 3, 3]);
        assert_eq!(pruned["cnn.4.3.weight"].dims(), &[128, 121, 1, 1]);
        // Kept: channels 1..=120 and 127; dropped: 0 and 121..=126 (all with gamma 0, beta 0).
        let kept_gamma: Vec<f32> = pruned["cnn.4.1.weight"].to_vec1().unwrap();
        assert!(kept_gamma.iter().all(|&g| g > 0.0), "{kept_gamma:?}");
        // Channels whose BN output is 0 contribute nothing after ReLU6 -> the function is unchanged.
        let before = Model::from_tensors(&spec, &tensors, &Device::Cpu).unwrap();
        let after = Model::from_tensors(&new_spec, &pruned, &Device::Cpu).unwrap();
        let x = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let d = (before.forward_t(&x, false).unwrap() - after.forward_t(&x, false).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d < 1e-5,
            "pruning zero-gamma channels changed the logits by {d}"
        );
    }

    #[test]
    fn only_students_prune() {
        assert!(prunable(Arch::Big).is_err());
        assert!(prunable(Arch::GroupConv).is_err());
        assert_eq!(prunable(Arch::StudentDeeper).unwrap(), 3..8);
    }
}
