//! GPU check (run by `deploy/gpu-check.sh` in a `--features cuda` build): for every model
//! under `--models` (or, when there are none, freshly initialised `big` and `student-deeper`
//! at 256x256), compares CPU and GPU logits on the same batch (must agree within 1e-3), then
//! prints GPU throughput per batch size. Exits non-zero on any mismatch or error.
//!
//! cargo run --release --features cuda --example gpu_check -- --models models --device cuda:0

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, ModuleT, Tensor};
use clap::Parser;
use slimserve::backend::DeviceSpec;
use slimserve::formats::model_dir;
use slimserve::pipeline::models::discover;
use slimserve::zoo::{Arch, Model, ModelSpec};

#[derive(Debug, Parser)]
struct Args {
    /// Directory of model directories (as `slimserve --models`).
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// GPU to check against the CPU.
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    batches: Vec<usize>,
    /// Timed forward passes per batch size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Largest allowed |CPU - GPU| logit difference.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
}

fn logits(model: &Model, x: &Tensor, device: &Device) -> Result<Vec<f32>> {
    let y = model.forward_t(&x.to_device(device)?, false)?;
    Ok(y.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let gpu = args.device.open()?;
    let mut models: Vec<(String, ModelSpec, Model, Model)> = Vec::new();
    for dir in discover(&args.models)? {
        let loaded = model_dir::load(&dir)?;
        let cpu = loaded.build(&Device::Cpu)?;
        let on_gpu = loaded.build(&gpu)?;
        models.push((loaded.name(), loaded.config.spec.clone(), cpu, on_gpu));
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
            let on_gpu = Model::from_tensors(&spec, &tensors, &gpu)?;
            models.push((arch.to_string(), spec, cpu, on_gpu));
        }
    }

    let mut failed = false;
    for (name, spec, cpu, on_gpu) in &models {
        let s = spec.input_size;
        let x = Tensor::rand(0f32, 1f32, (8, 3, s, s), &Device::Cpu)?;
        let a = logits(cpu, &x, &Device::Cpu)?;
        let b = logits(on_gpu, &x, &gpu)?;
        let diff = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let ok = diff <= args.tolerance;
        failed |= !ok;
        println!(
            "{name}: {} {s}x{s}, max |cpu - gpu| logit = {diff:.2e} ({})",
            spec.arch,
            if ok { "ok" } else { "MISMATCH" }
        );
        for &batch in &args.batches {
            let x = Tensor::rand(0f32, 1f32, (batch, 3, s, s), &gpu)?;
            for _ in 0..3 {
                on_gpu.forward_t(&x, false)?;
            }
            gpu.synchronize()?;
            let started = Instant::now();
            for _ in 0..args.iters {
                // Copying the logits back is what the server does per batch.
                on_gpu.forward_t(&x, false)?.to_device(&Device::Cpu)?;
            }
            gpu.synchronize()?;
            let per_batch = started.elapsed().as_secs_f64() / args.iters as f64;
            println!(
                "  batch {batch:>4}: {:>8.2} ms/batch  {:>9.0} images/s",
                per_batch * 1e3,
                batch as f64 / per_batch
            );
        }
    }
    if failed {
        bail!("CPU and GPU logits differ by more than {}", args.tolerance);
    }
    println!("gpu check passed for {} model(s)", models.len());
    Ok(())
}
