//! Model execution: a [`Backend`] runs one batch of a model on its device, called from the
//! scheduler's compute thread.
//!
//! The batch's inputs (decoded images, raw FP32 tensors, UINT8 pixels) are written into one
//! `[N, 3, S, S]` f32 buffer, then on the CPU the model compiled by [`crate::infer::FastModel`]
//! (BatchNorm folded, fused kernels) runs when its architecture has a compiled form, else
//! candle's eval-mode forward (`forward_t(x, false)`: BatchNorm uses its running statistics).
//! A panicking forward pass fails its batch, not the model.
//!
//! Off the CPU (`--device cuda`) inputs go to the device as they were sent: the batch's UINT8
//! pixels as one u8 tensor (a quarter of the bytes of f32), converted and normalised there;
//! its f32 inputs as one contiguous tensor; one upload each per batch, timed apart from the
//! compute. Every op then takes its device-generic path (see [`crate::ops::on_cpu`]).

mod device;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, ModuleT, Tensor};

pub use device::{DeviceError, DeviceSpec};

use crate::infer::qmodel::Int8Model;
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
    /// The int8 engine, for an int8 model on the CPU (then `fast` is `None`).
    int8: Option<Int8Model>,
    device: Device,
    input_size: usize,
    num_classes: usize,
    /// UINT8 pixel value -> normalised input, per channel: exactly what the image path
    /// computes, `(v / 255 - mean) / std`.
    pixel_lut: [[f32; 256]; 3],
    /// The path a GPU runs: inputs uploaded as sent, every op device-generic.
    on_device: Option<DeviceInputs>,
}

/// What the device path keeps on the device, and its host staging buffer for pixels.
#[derive(Debug)]
struct DeviceInputs {
    /// `1 / (255 std)` per channel, `[1, 3, 1, 1]`: a u8 pixel `v` becomes `v * scale + shift`.
    scale: Tensor,
    /// `-mean / std` per channel, `[1, 3, 1, 1]`.
    shift: Tensor,
    /// The batch's UINT8 inputs back to back (reused across batches).
    pixels: Mutex<Vec<u8>>,
    /// The device is the CPU (tests, gpu_check's reference): run the ops' device-generic paths
    /// anyway, so that what a GPU computes is checked here.
    force_generic: bool,
}

/// One batch on the device, before the u8 part is converted.
struct Uploaded {
    /// The f32 inputs, `[nf, 3, S, S]`.
    floats: Option<Tensor>,
    /// The UINT8 inputs as sent, `[nu, S, S, 3]` u8.
    pixels: Option<Tensor>,
    /// With both kinds in one batch: for each input in order, its row in `cat(floats, pixels)`.
    order: Option<Tensor>,
}

impl Backend {
    /// The model on `device`: on the CPU the fused engine when the architecture has one (else
    /// candle), on a GPU the device path (inputs uploaded as sent, device-generic ops).
    pub fn new(
        model: Model,
        device: Device,
        preprocessing: &Preprocessing,
    ) -> candle_core::Result<Self> {
        if device.is_cpu() {
            let fast = FastModel::compile(&model).ok();
            Ok(Self::build(model, device, preprocessing, fast, None))
        } else {
            Self::new_device_path(model, device, preprocessing)
        }
    }

    /// An int8 model (`ranges`: its calibrated activation ranges) on the CPU's int8 engine.
    /// Fails when the architecture has no int8 form or the ranges do not fit it.
    pub fn new_int8(
        model: Model,
        ranges: &[(f32, f32)],
        preprocessing: &Preprocessing,
    ) -> Result<Self, crate::infer::CompileError> {
        let int8 = Int8Model::compile(&model, ranges)?;
        let mut backend = Self::build(model, Device::Cpu, preprocessing, None, None);
        backend.int8 = Some(int8);
        Ok(backend)
    }

    /// The path `--device cuda` runs, on any device: UINT8 inputs uploaded as u8 and converted
    /// on the device, f32 inputs uploaded once per batch, candle's forward with every op on its
    /// device-generic path (also on a CPU device, where it is the reference the GPU's numerics
    /// are checked against: tests and `examples/gpu_check`).
    pub fn new_device_path(
        model: Model,
        device: Device,
        preprocessing: &Preprocessing,
    ) -> candle_core::Result<Self> {
        let per_channel = |f: &dyn Fn(usize) -> f32| {
            Tensor::from_vec((0..3).map(f).collect::<Vec<f32>>(), (1, 3, 1, 1), &device)
        };
        let (mean, std) = (preprocessing.mean, preprocessing.std);
        let on_device = DeviceInputs {
            scale: per_channel(&|c| 1.0 / (255.0 * std[c]))?,
            shift: per_channel(&|c| -mean[c] / std[c])?,
            pixels: Mutex::new(Vec::new()),
            force_generic: device.is_cpu(),
        };
        Ok(Self::build(
            model,
            device,
            preprocessing,
            None,
            Some(on_device),
        ))
    }

    fn build(
        model: Model,
        device: Device,
        preprocessing: &Preprocessing,
        fast: Option<FastModel>,
        on_device: Option<DeviceInputs>,
    ) -> Self {
        let spec = model.spec().clone();
        let mut pixel_lut = [[0f32; 256]; 3];
        for (c, lut) in pixel_lut.iter_mut().enumerate() {
            for (v, out) in lut.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - preprocessing.mean[c]) / preprocessing.std[c];
            }
        }
        Self {
            model,
            fast,
            int8: None,
            device,
            input_size: spec.input_size,
            num_classes: spec.num_classes,
            pixel_lut,
            on_device,
        }
    }

    /// `fused` (the compiled CPU engine), `int8` (the int8 engine), `candle` (candle's forward
    /// on the CPU) or `device` (inputs uploaded as sent, device-generic ops).
    pub fn engine(&self) -> &'static str {
        if self.int8.is_some() {
            "int8"
        } else if self.fast.is_some() {
            "fused"
        } else if self.on_device.is_some() {
            "device"
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
            if let Some(d) = &self.on_device {
                return self.run_on_device(d, inputs, buffer);
            }
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

    /// Checks that an input holds one image at the model's size.
    fn check_len(&self, input: &Input) -> Result<(), String> {
        let (len, expected) = match input {
            Input::Chw(v) => (v.len(), self.input_len()),
            Input::ChwBytes(b) => (b.len() / 4, self.input_len()),
            Input::Hwc(b) => (b.len() / 3, self.input_size * self.input_size),
        };
        if len != expected {
            return Err(format!("an input holds {len} values, not {expected}"));
        }
        Ok(())
    }

    /// Writes every input into `buffer` as CHW f32, back to back.
    fn assemble(&self, inputs: &[&Input], buffer: &mut Vec<f32>) -> Result<(), String> {
        let per = self.input_len();
        buffer.resize(inputs.len() * per, 0.0);
        for (input, dst) in inputs.iter().zip(buffer.chunks_exact_mut(per)) {
            self.check_len(input)?;
            self.write_chw(input, dst);
        }
        Ok(())
    }

    /// One checked input as normalised CHW f32 into `dst`.
    fn write_chw(&self, input: &Input, dst: &mut [f32]) {
        let plane = self.input_size * self.input_size;
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

    /// [`Self::run`] on the device path.
    fn run_on_device(
        &self,
        d: &DeviceInputs,
        inputs: &[&Input],
        buffer: &mut Vec<f32>,
    ) -> Result<BatchOutput, String> {
        let started = Instant::now();
        let uploaded = self.upload(d, inputs, buffer)?;
        let upload = started.elapsed();
        let compute = || -> candle_core::Result<Vec<f32>> {
            let x = self.device_input(d, uploaded)?;
            let logits = self.model.forward_t(&x, false)?;
            logits
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let logits = if d.force_generic {
            crate::ops::with_device_generic_ops(compute)
        } else {
            compute()
        }
        .map_err(|e| e.to_string())?;
        Ok(BatchOutput {
            logits,
            upload,
            compute: started.elapsed() - upload,
        })
    }

    /// Copies the batch to the device as sent: f32 inputs as one `[nf, 3, S, S]` tensor, UINT8
    /// ones as one `[nu, S, S, 3]` u8 tensor; returns once the copies are complete.
    fn upload(
        &self,
        d: &DeviceInputs,
        inputs: &[&Input],
        floats: &mut Vec<f32>,
    ) -> Result<Uploaded, String> {
        let s = self.input_size;
        let per = self.input_len();
        let mut pixels = d.pixels.lock().unwrap_or_else(|e| e.into_inner());
        pixels.clear();
        floats.clear();
        let (mut nf, mut nu) = (0u32, 0u32);
        // Row of each input in cat(floats, pixels), floats first.
        let mut rows = Vec::with_capacity(inputs.len());
        for input in inputs {
            self.check_len(input)?;
            match input {
                Input::Hwc(b) => {
                    pixels.extend_from_slice(b);
                    rows.push((true, nu));
                    nu += 1;
                }
                _ => {
                    let at = floats.len();
                    floats.resize(at + per, 0.0);
                    self.write_chw(input, &mut floats[at..]);
                    rows.push((false, nf));
                    nf += 1;
                }
            }
        }
        let err = |e: candle_core::Error| format!("upload to {:?}: {e}", self.device.location());
        let floats = (nf > 0)
            .then(|| Tensor::from_slice(&floats[..], (nf as usize, 3, s, s), &self.device))
            .transpose()
            .map_err(err)?;
        let pixel_tensor = (nu > 0)
            .then(|| Tensor::from_slice(&pixels[..], (nu as usize, s, s, 3), &self.device))
            .transpose()
            .map_err(err)?;
        let order = (nf > 0 && nu > 0)
            .then(|| {
                let order: Vec<u32> = rows
                    .iter()
                    .map(|&(is_pixels, k)| if is_pixels { nf + k } else { k })
                    .collect();
                Tensor::from_vec(order, inputs.len(), &self.device)
            })
            .transpose()
            .map_err(err)?;
        self.device.synchronize().map_err(err)?;
        Ok(Uploaded {
            floats,
            pixels: pixel_tensor,
            order,
        })
    }

    /// The batch as the model's `[N, 3, S, S]` f32 input, on the device: pixels converted and
    /// normalised there (`v * scale + shift` per channel), rows back in the inputs' order.
    fn device_input(&self, d: &DeviceInputs, up: Uploaded) -> candle_core::Result<Tensor> {
        let pixels = up
            .pixels
            .map(|p| {
                p.to_dtype(DType::F32)?
                    .permute((0, 3, 1, 2))?
                    .broadcast_mul(&d.scale)?
                    .broadcast_add(&d.shift)
            })
            .transpose()?;
        match (up.floats, pixels, up.order) {
            (Some(f), Some(p), Some(order)) => Tensor::cat(&[f, p], 0)?.index_select(&order, 0),
            (Some(x), None, _) | (None, Some(x), _) => Ok(x),
            _ => candle_core::bail!("a batch without inputs"),
        }
    }

    /// The logits `[n, C]` of `n` CHW images back to back.
    pub fn forward(&self, input: &[f32], n: usize) -> Result<Vec<f32>, String> {
        let forward = || candle_forward(&self.model, &self.device, input, n, self.input_size);
        if let Some(q) = &self.int8 {
            return Ok(q.forward(input, n));
        }
        match (&self.fast, &self.on_device) {
            (Some(f), _) => Ok(f.forward(input, n)),
            (None, Some(d)) if d.force_generic => {
                crate::ops::with_device_generic_ops(forward).map_err(|e| e.to_string())
            }
            _ => forward().map_err(|e| e.to_string()),
        }
    }

    /// The batch sizes [`Self::warm_up`] runs with batches of up to `max_batch` inputs: on the
    /// CPU one (nothing there depends on the batch size); on the device path 1, 2, 4, ... and
    /// `max_batch` itself, so that the kernels, cuBLAS's plans and the allocator's blocks a
    /// batch needs exist before the first request.
    pub fn warm_up_sizes(&self, max_batch: usize) -> Vec<usize> {
        let max = max_batch.max(1);
        if self.on_device.is_none() {
            return vec![1];
        }
        let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |&n| Some(n * 2))
            .take_while(|&n| n < max)
            .collect();
        sizes.push(max);
        sizes
    }

    /// Forward passes of zero images at each of [`Self::warm_up_sizes`]: checks the model runs
    /// on its device and pays first-use costs before any request does. On the device path each
    /// size runs through [`Self::run`] with UINT8 and f32 inputs mixed (the upload, conversion and
    /// reordering kernels included). Returns how long it took.
    pub fn warm_up(&self, max_batch: usize) -> Result<Duration, String> {
        let started = Instant::now();
        let sizes = self.warm_up_sizes(max_batch);
        if self.on_device.is_none() {
            let zeros = vec![0f32; self.input_len()];
            self.forward(&zeros, 1)?;
            return Ok(started.elapsed());
        }
        let pixels = prost::bytes::Bytes::from(vec![0u8; 3 * self.input_size * self.input_size]);
        let floats = prost::bytes::Bytes::from(vec![0u8; 4 * self.input_len()]);
        let mut buffer = Vec::new();
        for n in sizes {
            // Pixels first, so that a batch of one warms the u8 path and two both.
            let inputs: Vec<Input> = (0..n)
                .map(|k| {
                    if k % 2 == 0 {
                        Input::Hwc(pixels.clone())
                    } else {
                        Input::ChwBytes(floats.clone())
                    }
                })
                .collect();
            let refs: Vec<&Input> = inputs.iter().collect();
            self.run(&refs, &mut buffer)?;
            if n == 1 {
                self.run(&[&Input::ChwBytes(floats.clone())], &mut buffer)?;
            }
        }
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

/// Puts every thread's allocations in glibc's main arena (`mallopt(M_ARENA_MAX, 1)`), unless
/// the environment sets `MALLOC_ARENA_MAX` itself. Call at the start of the server's `main`,
/// before any thread exists (a thread keeps the arena of its first allocation). Returns whether
/// the limit was set (false off glibc Linux, or when the environment decides).
///
/// glibc gives threads that allocate at once their own arenas (up to 8 per core), and
/// [`release_memory`]'s `malloc_trim` returns the free memory at the top of the main arena
/// only: glibc's `mtrim` madvises free chunks inside a thread arena but never shrinks its top
/// chunk, where a thread's freed request buffers end up. So an idle server kept whatever its
/// decode, gRPC and engine threads had last freed, a different amount after every burst of
/// load. Measured (shipped kd, 3 s of load at concurrency 1-32 then 2.5 s idle, 2-core Xeon):
/// RssAnon idled at 37-52 MiB with per-thread arenas and at 24.9 MiB after every burst with
/// one arena, at the same throughput: a request makes few allocations, and the small ones come
/// from each thread's cache (tcache) without taking the arena's lock.
pub fn one_malloc_arena() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return false;
        }
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands freed heap memory back to the operating system, after a model version is unloaded:
/// glibc keeps freed chunks of its arenas mapped otherwise, so RSS would not come down.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory at the top of glibc's heaps to the system;
    // it takes no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
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
        let backend = Backend::new(model, Device::Cpu, &pp).unwrap();
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

    /// The path `--device cuda` runs, here on a CPU device: UINT8 and f32 inputs in one batch
    /// (uploaded as two tensors, the pixels converted on the device, rows put back in order)
    /// give each input's logits as the fused CPU engine computes them; the warm-up covers the
    /// batch sizes the batcher forms.
    #[test]
    fn device_path_uploads_inputs_as_sent() {
        let spec = ModelSpec::new(Arch::StudentDeeper, 5, 32);
        let (_, model) = crate::zoo::test_models::input_dependent(&spec, 4);
        let pp = Preprocessing {
            resize: 32,
            crop: 32,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let cpu = Backend::new(model.clone(), Device::Cpu, &pp).unwrap();
        let dev = Backend::new_device_path(model, Device::Cpu, &pp).unwrap();
        assert_eq!((cpu.engine(), dev.engine()), ("fused", "device"));
        let pixels: Vec<Bytes> = (0..3)
            .map(|k| {
                (0..32 * 32 * 3)
                    .map(|i| ((i * 13 + k * 57) % 256) as u8)
                    .collect()
            })
            .collect();
        let floats: Vec<Vec<f32>> = (0..2)
            .map(|k| {
                (0..3 * 32 * 32)
                    .map(|i| ((i * 7 + k * 3) % 17) as f32 / 8.0 - 1.0)
                    .collect()
            })
            .collect();
        let inputs = [
            Input::Chw(floats[0].clone()),
            Input::Hwc(pixels[0].clone()),
            Input::Hwc(pixels[1].clone()),
            Input::ChwBytes(Bytes::from(
                floats[1]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )),
            Input::Hwc(pixels[2].clone()),
        ];
        let mut buf = Vec::new();
        let want: Vec<Vec<f32>> = inputs
            .iter()
            .map(|x| cpu.run(&[x], &mut buf).unwrap().logits)
            .collect();
        for k in 1..want.len() {
            assert_ne!(
                want[0], want[k],
                "the test model's logits depend on its input"
            );
        }
        let close = |got: &[f32], want: &[f32], what: &str| {
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() <= 1e-4 * scale, "{what}: {a} vs {b}");
            }
        };
        let refs: Vec<&Input> = inputs.iter().collect();
        let out = dev.run(&refs, &mut buf).unwrap();
        assert_eq!(out.logits.len(), 5 * 5);
        for (k, row) in out.logits.chunks(5).enumerate() {
            close(row, &want[k], &format!("mixed batch, input {k}"));
        }
        // Only pixels, only floats, one input.
        let only_pixels = [&inputs[4], &inputs[1]];
        let out = dev.run(&only_pixels, &mut buf).unwrap().logits;
        close(&out[..5], &want[4], "pixels only, row 0");
        close(&out[5..], &want[1], "pixels only, row 1");
        let out = dev.run(&[&inputs[3], &inputs[0]], &mut buf).unwrap().logits;
        close(&out[..5], &want[3], "floats only, row 0");
        close(&out[5..], &want[0], "floats only, row 1");
        // A wrongly sized input fails its batch with a message; the next one runs.
        let short = Input::Hwc(Bytes::from(vec![0u8; 30]));
        let err = dev.run(&[&inputs[1], &short], &mut buf).unwrap_err();
        assert!(err.contains("holds 10 values"), "{err}");
        close(
            &dev.run(&[&inputs[2]], &mut buf).unwrap().logits,
            &want[2],
            "after an error",
        );
        // Warm-up: every power of two below the largest batch, and the largest.
        assert_eq!(dev.warm_up_sizes(128), [1, 2, 4, 8, 16, 32, 64, 128]);
        assert_eq!(dev.warm_up_sizes(48), [1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(dev.warm_up_sizes(1), [1]);
        assert_eq!(cpu.warm_up_sizes(128), [1]);
        dev.warm_up(5).unwrap();
    }
}
