//! Speed baseline: candle eval forward vs ONNX Runtime on the same weights, same thread count.
//!
//! ONNX Runtime runs in a Python child process (`onnxruntime` from PyPI) on the model exported by
//! `slimserve::formats::onnx`, so both sides compute the same function from the same weights.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, ModuleT, Tensor};
use serde::Serialize;
use slimserve::formats::onnx;
use slimserve::zoo::{Arch, Model, ModelSpec};

/// The ONNX Runtime driver, embedded so the binary works from any directory.
const ORT_SCRIPT: &str = include_str!("../../../tests/python/ort_run.py");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architectures to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    arch: Vec<Arch>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    batch: Vec<usize>,
    /// Square input size.
    #[arg(long, default_value_t = 256)]
    input_size: usize,
    /// Threads for both candle (rayon) and ONNX Runtime (intra-op).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds of measurement per (architecture, batch, runtime), after a warm-up run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Python with onnxruntime and numpy (default: $SLIMSERVE_PYTHON, ./.venv/bin/python, python3).
    #[arg(long, env = "SLIMSERVE_PYTHON")]
    python: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    arch: &'static str,
    batch: usize,
    input_size: usize,
    threads: usize,
    macs_per_image: u64,
    candle_images_per_s: f64,
    ort_images_per_s: f64,
    ratio: f64,
}

fn python(args: &Args) -> PathBuf {
    if let Some(p) = &args.python {
        return p.clone();
    }
    let venv = Path::new(".venv/bin/python");
    if venv.exists() {
        venv.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

fn candle_images_per_s(model: &Model, batch: usize, size: usize, seconds: f64) -> Result<f64> {
    let x = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &Device::Cpu)?;
    model.forward_t(&x, false)?; // warm-up: allocations, thread pool start
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut iters = 0usize;
    while iters < 2 || start.elapsed() < budget {
        model.forward_t(&x, false)?.to_vec2::<f32>()?;
        iters += 1;
    }
    Ok((iters * batch) as f64 / start.elapsed().as_secs_f64())
}

#[derive(serde::Deserialize)]
struct OrtResult {
    images_per_s: f64,
}

fn ort_images_per_s(
    py: &Path,
    script: &Path,
    model: &Path,
    batch: usize,
    args: &Args,
) -> Result<f64> {
    let out = Command::new(py)
        .arg(script)
        .arg("bench")
        .arg("--model")
        .arg(model)
        .args(["--batch", &batch.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .output()
        .with_context(|| {
            format!(
                "running {} (install onnxruntime: python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy)",
                py.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "ONNX Runtime bench failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let r: OrtResult = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "unexpected output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok(r.images_per_s)
}

pub fn run(args: Args) -> Result<()> {
    if args.threads == 0 || args.batch.contains(&0) {
        bail!("--threads and --batch must be positive");
    }
    // candle's GEMM reads RAYON_NUM_THREADS; the depthwise op uses rayon's global pool.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .ok();
    let archs = if args.arch.is_empty() {
        Arch::ALL.to_vec()
    } else {
        args.arch.clone()
    };
    let py = python(&args);
    let tmp = tempfile::tempdir()?;
    let script = tmp.path().join("ort_run.py");
    std::fs::write(&script, ORT_SCRIPT)?;

    let mut rows = Vec::new();
    for arch in archs {
        let spec = ModelSpec::new(arch, 11, args.input_size);
        let (_, model) = Model::init(&spec, &Device::Cpu)?;
        let onnx_path = tmp.path().join(format!("{arch}.onnx"));
        std::fs::write(&onnx_path, onnx::export(&model)?)?;
        for &batch in &args.batch {
            let c = candle_images_per_s(&model, batch, args.input_size, args.seconds)?;
            let o = ort_images_per_s(&py, &script, &onnx_path, batch, &args)?;
            let row = Row {
                arch: arch.name(),
                batch,
                input_size: args.input_size,
                threads: args.threads,
                macs_per_image: model.macs(),
                candle_images_per_s: c,
                ort_images_per_s: o,
                ratio: c / o,
            };
            if !args.json {
                eprintln!(
                    "{:<15} batch {:>3}: candle {:>8.1} img/s, onnxruntime {:>8.1} img/s, ratio {:.2}",
                    row.arch, batch, c, o, row.ratio
                );
            }
            rows.push(row);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "\n| model | batch | M MAC/img | candle img/s | ONNX Runtime img/s | candle / ORT |\n|---|---|---|---|---|---|"
        );
        for r in &rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
                r.arch,
                r.batch,
                r.macs_per_image as f64 / 1e6,
                r.candle_images_per_s,
                r.ort_images_per_s,
                r.ratio
            );
        }
    }
    Ok(())
}
