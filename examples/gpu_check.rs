//! GPU check (run by `deploy/gpu-check.sh` in a `--features cuda` build). For every model under
//! `--models` (or, when there are none, freshly initialised `big` and `student-deeper` at
//! 256x256):
//!
//! 1. the server's device path (`Backend::new_device_path`: the batch uploaded as sent, UINT8
//!    pixels converted on the device, every op device-generic) on `--device` against the
//!    server's CPU path (the fused engine where the architecture has one) on the same batch, as
//!    FP32 tensors and as UINT8 pixels: logits within `--tolerance`;
//! 2. images/s per batch size through the device path with UINT8 inputs, as the server runs a
//!    batch (upload, compute, logits back), with the upload and compute split.
//!
//! `--device cpu` runs the device path on the CPU, every op on its device-generic form: what a
//! GPU computes, checked on a machine without one. Exits non-zero on any mismatch or error.
//!
//! cargo run --release --features cuda --example gpu_check -- --models models --device cuda:0

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use prost::bytes::Bytes;
use slimserve::backend::{Backend, DeviceSpec};
use slimserve::formats::model_dir;
use slimserve::pipeline::models::discover;
use slimserve::preprocess::Preprocessing;
use slimserve::scheduler::Input;
use slimserve::zoo::{Arch, Model, ModelSpec};

#[derive(Debug, Parser)]
struct Args {
    /// Directory of model directories (as `slimserve --models`).
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Where the device path runs: cuda:N, or cpu to check its numerics without a GPU.
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,32,128,256")]
    batches: Vec<usize>,
    /// Timed batches per batch size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Largest allowed |CPU - device| logit difference.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
}

/// Deterministic pseudo-random bytes (no RNG crate needed for a check).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.device.open()?;
    let imagenet = |s: usize| Preprocessing {
        resize: s,
        crop: s,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    // (name, spec, preprocessing, on the CPU, on the device)
    let mut models: Vec<(String, ModelSpec, Preprocessing, Model, Model)> = Vec::new();
    for dir in discover(&args.models)? {
        let loaded = model_dir::load(&dir)?;
        let cpu = loaded.build(&Device::Cpu)?;
        let on_device = loaded.build(&device)?;
        let pp = loaded.config.preprocessing.clone();
        models.push((
            loaded.name(),
            loaded.config.spec.clone(),
            pp,
            cpu,
            on_device,
        ));
    }
    if models.is_empty() {
        println!(
            "no models under {}: checking freshly initialised architectures",
            args.models.display()
        );
        for arch in [Arch::Big, Arch::StudentDeeper] {
            let spec = ModelSpec::new(arch, 11, 256);
            let (varmap, cpu) = Model::init(&spec, &Device::Cpu)?;
            let tensors = slimserve::zoo::varmap_tensors(&varmap);
            let on_device = Model::from_tensors(&spec, &tensors, &device)?;
            models.push((arch.to_string(), spec, imagenet(256), cpu, on_device));
        }
    }

    let count = models.len();
    let mut failed = false;
    for (name, spec, pp, cpu, on_device) in models {
        let s = spec.input_size;
        let reference = Backend::new(cpu, Device::Cpu, &pp)?;
        let backend = Backend::new_device_path(on_device, device.clone(), &pp)?;
        let pixels: Vec<Input> = (0..4)
            .map(|k| Input::Hwc(Bytes::from(noise(s * s * 3, k))))
            .collect();
        let floats: Vec<Input> = (4..8)
            .map(|k| {
                let v: Vec<f32> = noise(3 * s * s, k)
                    .into_iter()
                    .map(|b| b as f32 / 64.0 - 2.0)
                    .collect();
                Input::Chw(v)
            })
            .collect();
        let mut buffer = Vec::new();
        let mut worst = 0f32;
        for (what, batch) in [("UINT8", &pixels), ("FP32", &floats)] {
            let refs: Vec<&Input> = batch.iter().collect();
            let want = reference
                .run(&refs, &mut buffer)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{name}: CPU reference"))?;
            let got = backend
                .run(&refs, &mut buffer)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{name}: {} device path", args.device))?;
            let diff = max_diff(&want.logits, &got.logits);
            println!(
                "{name}: {} {s}x{s}, {} engine vs device path on {}, {what} batch of {}: max |logit difference| {diff:.2e}",
                spec.arch,
                reference.engine(),
                args.device,
                batch.len()
            );
            worst = worst.max(diff);
        }
        let ok = worst <= args.tolerance;
        failed |= !ok;
        println!("{name}: {}", if ok { "ok" } else { "MISMATCH" });
        for &batch in &args.batches {
            let inputs: Vec<&Input> = (0..batch).map(|k| &pixels[k % pixels.len()]).collect();
            for _ in 0..3 {
                backend
                    .run(&inputs, &mut buffer)
                    .map_err(anyhow::Error::msg)?;
            }
            let (mut upload, mut compute) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..args.iters {
                let out = backend
                    .run(&inputs, &mut buffer)
                    .map_err(anyhow::Error::msg)?;
                upload += out.upload;
                compute += out.compute;
            }
            let per_batch = (upload + compute).as_secs_f64() / args.iters as f64;
            println!(
                "  batch {batch:>4} (UINT8): {:>8.2} ms/batch ({:.2} upload + {:.2} compute)  {:>9.0} images/s",
                per_batch * 1e3,
                upload.as_secs_f64() * 1e3 / args.iters as f64,
                compute.as_secs_f64() * 1e3 / args.iters as f64,
                batch as f64 / per_batch
            );
        }
    }
    if failed {
        bail!(
            "CPU and {} logits differ by more than {}",
            args.device,
            args.tolerance
        );
    }
    println!("gpu check passed for {count} model(s) on {}", args.device);
    Ok(())
}
