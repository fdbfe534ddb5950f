use std::path::PathBuf;

use anyhow::{bail, Result};
use slimserve::formats::model_dir;
use slimserve::formats::weights::WeightFormat;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source model directory (any format).
    #[arg(long)]
    model: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// uint8 (per tensor, the study's min/max form), uint8_per_channel, f16 or f32.
    #[arg(long, default_value = "uint8", value_parser = parse_format)]
    format: WeightFormat,
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
    let bytes = model_dir::save(&args.out, &config, &loaded.tensors)?;
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
