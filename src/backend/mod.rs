//! Model execution: a [`Backend`] runs one batch of a model on its device, called from the
//! scheduler's compute thread.
//!
//! The batch's inputs (decoded images, raw FP32 tensors, UINT8 pixels) are written into one
//! `[N, 3, S, S]` f32 buffer, then on the CPU the model compiled by [`crate::infer::FastModel`]
//! (BatchNorm folded, fused kernels) runs when its architecture has a compiled form, else
//! candle's eval-mode forward (`forward_t(x, false)`: BatchNorm uses its running statistics).
//! A panicking forward pass fails its batch, not the model.

mod device;

use std::time::{Duration, Instant};

use candle_core::{Device, ModuleT, Tensor};

pub use device::{DeviceError, DeviceSpec};

use crate::infer::FastModel;
use crate::preprocess::Preprocessing;
use crate::scheduler::Input;
use crate::zoo::Model;

/// The logits of one executed batch, with where its time went.
#[derive(Debug)]
pub struct BatchOutput {
    /// Row-major `[N, C]`.
    pub logits: Vec<f32>,
    /// Writing the inputs into the input buffer (on a GPU: the upload).
    pub upload: Duration,
    /// The forward pass.
    pub compute: Duration,
}

/// A model built on its device, ready to run batches.
#[derive(Debug)]
pub struct Backend {
    model: Model,
    /// The compiled CPU form, when the architecture has one and the device is the CPU.
    fast: Option<FastModel>,
    device: Device,
    input_size: usize,
    num_classes: usize,
    /// UINT8 pixel value -> normalised input, per channel: exactly what the image path
    /// computes, `(v / 255 - mean) / std`.
    pixel_lut: [[f32; 256]; 3],
}

impl Backend {
    pub fn new(model: Model, device: Device, preprocessing: &Preprocessing) -> Self {
        let spec = model.spec().clone();
        let fast = if device.is_cpu() {
            FastModel::compile(&model).ok()
        } else {
            None
        };
        let mut pixel_lut = [[0f32; 256]; 3];
        for (c, lut) in pixel_lut.iter_mut().enumerate() {
            for (v, out) in lut.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - preprocessing.mean[c]) / preprocessing.std[c];
            }
        }
        Self {
            model,
            fast,
            device,
            input_size: spec.input_size,
            num_classes: spec.num_classes,
            pixel_lut,
        }
    }

    /// `fused` (the compiled CPU engine) or `candle`.
    pub fn engine(&self) -> &'static str {
        if self.fast.is_some() {
            "fused"
        } else {
            "candle"
        }
    }

    pub fn input_size(&self) -> usize {
        self.input_size
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Floats in one CHW input.
    fn input_len(&self) -> usize {
        3 * self.input_size * self.input_size
    }

    /// Runs one batch. `buffer` is scratch space reused across batches.
    pub fn run(&self, inputs: &[&Input], buffer: &mut Vec<f32>) -> Result<BatchOutput, String> {
        // A panic fails this batch (INTERNAL to its requests), not the model.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let started = Instant::now();
            self.assemble(inputs, buffer)?;
            let upload = started.elapsed();
            let logits = self.forward(&buffer[..inputs.len() * self.input_len()], inputs.len())?;
            Ok(BatchOutput {
                logits,
                upload,
                compute: started.elapsed() - upload,
            })
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the forward pass panicked: {what}"))
        })
    }

    /// Writes every input into `buffer` as CHW f32, back to back.
    fn assemble(&self, inputs: &[&Input], buffer: &mut Vec<f32>) -> Result<(), String> {
        let per = self.input_len();
        buffer.resize(inputs.len() * per, 0.0);
        let plane = self.input_size * self.input_size;
        for (input, dst) in inputs.iter().zip(buffer.chunks_exact_mut(per)) {
            let len = match input {
                Input::Chw(v) => v.len(),
                Input::ChwBytes(b) => b.len() / 4,
                Input::Hwc(b) => b.len() / 3,
            };
            let expected = match input {
                Input::Hwc(_) => plane,
                _ => per,
            };
            if len != expected {
                return Err(format!("an input holds {len} values, not {expected}"));
            }
            match input {
                Input::Chw(v) => dst.copy_from_slice(v),
                Input::ChwBytes(b) => {
                    if cfg!(target_endian = "little") {
                        // The bytes are little-endian f32: one copy into the f32 buffer.
                        bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(b);
                    } else {
                        for (d, c) in dst.iter_mut().zip(b.chunks_exact(4)) {
                            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    }
                }
                Input::Hwc(b) => {
                    let (r, rest) = dst.split_at_mut(plane);
                    let (g, bl) = rest.split_at_mut(plane);
                    let lut = &self.pixel_lut;
                    for (p, px) in b.chunks_exact(3).enumerate() {
                        r[p] = lut[0][px[0] as usize];
                        g[p] = lut[1][px[1] as usize];
                        bl[p] = lut[2][px[2] as usize];
                    }
                }
            }
        }
        Ok(())
    }

    /// The logits `[n, C]` of `n` CHW images back to back.
    pub fn forward(&self, input: &[f32], n: usize) -> Result<Vec<f32>, String> {
        match &self.fast {
            Some(f) => Ok(f.forward(input, n)),
            None => candle_forward(&self.model, &self.device, input, n, self.input_size)
                .map_err(|e| e.to_string()),
        }
    }

    /// One forward pass of `batch` zero images: checks the model runs on its device and pays
    /// first-use costs before any request does. Returns how long it took.
    pub fn warm_up(&self, batch: usize) -> Result<Duration, String> {
        let started = Instant::now();
        let zeros = vec![0f32; batch * self.input_len()];
        self.forward(&zeros, batch)?;
        Ok(started.elapsed())
    }
}

fn candle_forward(
    model: &Model,
    device: &Device,
    input: &[f32],
    batch: usize,
    size: usize,
) -> candle_core::Result<Vec<f32>> {
    let x = Tensor::from_slice(input, (batch, 3, size, size), device)?;
    let logits = model.forward_t(&x, false)?;
    logits
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Numerically stable softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{Arch, ModelSpec};
    use prost::bytes::Bytes;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, 2.0, 10.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(top_k(&p, 2), vec![3, 1]);
        // Large logits do not overflow.
        assert_eq!(softmax(&[1000.0, 1000.0]), vec![0.5, 0.5]);
        assert_eq!(top_k(&[0.5, 0.5, 0.1], 3), vec![0, 1, 2]);
    }

    /// Every input form gives exactly the logits of the same pixels as preprocessed floats,
    /// batch rows are not mixed up, and a bad batch fails alone.
    #[test]
    fn input_forms_and_batch_rows() {
        let spec = ModelSpec::new(Arch::Student, 4, 32);
        let (_, model) = crate::zoo::test_models::input_dependent(&spec, 3);
        let pp = Preprocessing {
            resize: 32,
            crop: 32,
            mean: [0.5, 0.4, 0.3],
            std: [0.2, 0.25, 0.3],
        };
        let candle = candle_forward(&model, &Device::Cpu, &[0.0; 3 * 32 * 32], 1, 32).unwrap();
        let backend = Backend::new(model, Device::Cpu, &pp);
        assert_eq!(backend.engine(), "fused");
        // Two images as HWC pixels, and the same as normalised CHW floats.
        let pixels: Vec<Vec<u8>> = (0..2)
            .map(|k| {
                (0..32 * 32 * 3)
                    .map(|i| ((i * 7 + k * 91) % 256) as u8)
                    .collect()
            })
            .collect();
        let chw: Vec<Vec<f32>> = pixels
            .iter()
            .map(|hwc| {
                let mut out = vec![0f32; 3 * 1024];
                for (p, px) in hwc.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * 1024 + p] = (px[c] as f32 / 255.0 - pp.mean[c]) / pp.std[c];
                    }
                }
                out
            })
            .collect();
        let as_bytes =
            |v: &[f32]| Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        let mut buf = Vec::new();
        let want: Vec<Vec<f32>> = chw
            .iter()
            .map(|x| {
                backend
                    .run(&[&Input::Chw(x.clone())], &mut buf)
                    .unwrap()
                    .logits
            })
            .collect();
        assert_ne!(
            want[0], want[1],
            "the test model's logits depend on its input"
        );
        let inputs = [
            Input::Hwc(Bytes::from(pixels[1].clone())),
            Input::ChwBytes(as_bytes(&chw[0])),
            Input::Chw(chw[1].clone()),
            Input::Hwc(Bytes::from(pixels[0].clone())),
        ];
        let refs: Vec<&Input> = inputs.iter().collect();
        let out = backend.run(&refs, &mut buf).unwrap().logits;
        for (row, k) in out.chunks(4).zip([1, 0, 1, 0]) {
            assert_eq!(row, want[k].as_slice());
        }
        // candle's forward of zeros matches the engine's to float rounding.
        let zeros = backend.forward(&[0.0; 3 * 32 * 32], 1).unwrap();
        for (a, b) in zeros.iter().zip(&candle) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        // A wrongly sized input fails its batch with a message; the next batch runs.
        let short = Input::Chw(vec![0.0; 10]);
        let err = backend.run(&[&short], &mut buf).unwrap_err();
        assert!(err.contains("holds 10 values"), "{err}");
        assert_eq!(
            backend.run(&[&inputs[2]], &mut buf).unwrap().logits,
            want[1]
        );
    }
}
