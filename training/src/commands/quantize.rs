use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use slimserve::formats::model_dir::{self, LoadedModel};
use slimserve::formats::weights::{WeightFormat, ACTIVATION_RANGES_KEY};
use slimserve::infer::qmodel::Int8Model;
use slimserve::infer::{merge_ranges, FastModel};
use slimtrain::data::{self, Loader, LoaderConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source model directory (any format).
    #[arg(long)]
    model: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// uint8 (per tensor, the study's min/max form, dequantized to f32 when served),
    /// uint8_per_channel, f16, f32, or int8 (symmetric per-channel int8 weights plus
    /// calibrated activation ranges: served by the int8 engine; needs --calibration-data).
    #[arg(long, default_value = "uint8", value_parser = parse_format)]
    format: WeightFormat,
    /// int8 only: dataset whose training split calibrates the activation ranges (same
    /// layouts as `train`: Food-11, one folder per class, Fashion-MNIST).
    #[arg(long, value_name = "DIR")]
    calibration_data: Option<PathBuf>,
    /// int8 only: training images to calibrate on, spread evenly over the split.
    #[arg(long, default_value_t = 256)]
    calibration_images: usize,
    /// int8 only: seed of the validation split for unsplit class folders (use the training
    /// run's, so that no validation image calibrates).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    WeightFormat::parse(s).ok_or_else(|| {
        format!(
            "unknown format `{s}` (one of: {})",
            WeightFormat::ALL.map(|f| f.as_str()).join(", ")
        )
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.model.canonicalize().ok() == args.out.canonicalize().ok() && args.out.exists() {
        bail!(
            "--out {} is the source model; choose another directory",
            args.out.display()
        );
    }
    let loaded = model_dir::load(&args.model)?;
    let mut config = loaded.config.clone();
    config.weights.format = args.format;
    config.provenance.source = Some(args.model.display().to_string());
    config.provenance.command = Some(super::command_line());
    // Accuracy belongs to the source weights; `slimtrain eval` measures the quantized ones.
    config.provenance.val_accuracy = None;
    config.provenance.val_images = None;
    let mut tensors = loaded.tensors.clone();
    if args.format == WeightFormat::Int8 {
        let (ranges, images) = calibrate(&args, &loaded)?;
        let flat: Vec<f32> = ranges.iter().flat_map(|&(lo, hi)| [lo, hi]).collect();
        tensors.insert(
            ACTIVATION_RANGES_KEY.to_string(),
            Tensor::from_vec(flat, (ranges.len(), 2), &Device::Cpu)?,
        );
        config.provenance.notes = Some(format!(
            "int8: activation ranges calibrated on {images} training images of {}",
            args.calibration_data
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
        ));
    } else if args.calibration_data.is_some() {
        bail!("--calibration-data is for --format int8 only");
    }
    let bytes = model_dir::save(&args.out, &config, &tensors)?;
    println!(
        "{} ({}, {} bytes) -> {} ({}, {} bytes, {:.2}x smaller)",
        args.model.display(),
        loaded.config.weights.format,
        loaded.file_bytes,
        args.out.display(),
        args.format,
        bytes,
        loaded.file_bytes as f64 / bytes as f64
    );
    Ok(())
}

/// The activation ranges of `loaded` over `--calibration-images` training images (fewer when
/// the split has fewer), measured by the f32 engine, and how many images that was; checked by
/// compiling the int8 model before anything is written.
fn calibrate(args: &Args, loaded: &LoadedModel) -> Result<(Vec<(f32, f32)>, usize)> {
    let Some(dir) = &args.calibration_data else {
        bail!("--format int8 needs --calibration-data DIR (training images to calibrate on)");
    };
    if args.calibration_images == 0 {
        bail!("--calibration-images must be at least 1");
    }
    let model = loaded.build(&Device::Cpu)?;
    let fast = FastModel::compile(&model).with_context(|| {
        format!(
            "{}: {} has no int8 engine",
            args.model.display(),
            loaded.config.spec.arch
        )
    })?;
    let data = data::open(dir, args.seed)?;
    if data.classes.len() != loaded.config.spec.num_classes {
        bail!(
            "{} has {} classes but {} was trained on {}",
            dir.display(),
            data.classes.len(),
            args.model.display(),
            loaded.config.spec.num_classes
        );
    }
    // Every k-th training image: all classes, whatever the split's order.
    let n = args.calibration_images.min(data.train.len());
    if n == 0 {
        bail!("{} has no training images to calibrate on", dir.display());
    }
    let step = data.train.len() as f64 / n as f64;
    let samples: Vec<_> = (0..n)
        .map(|i| data.train[(i as f64 * step) as usize].clone())
        .collect();
    let size = loaded.config.spec.input_size;
    let mut cfg = LoaderConfig::eval(32, size);
    cfg.preprocessing = loaded.config.preprocessing.clone();
    let loader = Loader::new(&samples, cfg)?;
    let bar = indicatif::ProgressBar::new(n as u64).with_message("calibrating");
    let mut ranges: Option<Vec<(f32, f32)>> = None;
    for batch in loader.epoch(0, 0) {
        let (x, _) = batch?;
        let b = x.dim(0)?;
        let r = fast.calibrate(&x.flatten_all()?.to_vec1::<f32>()?, b);
        ranges = Some(match ranges {
            None => r,
            Some(prev) => merge_ranges(&prev, &r),
        });
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    let ranges = ranges.with_context(|| format!("no readable image in {}", dir.display()))?;
    Int8Model::compile(&model, &ranges)
        .with_context(|| format!("{}: int8 compile", args.model.display()))?;
    Ok((ranges, n))
}
