use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use slimserve::infer::qmodel::Int8Model;

use slimtrain::data;
use slimtrain::train::{self, metrics::wilson_interval};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (f32, f16 or uint8 weights; int8 models run on the int8 engine).
    #[arg(long)]
    model: PathBuf,
    /// Dataset (same layouts as `train`).
    #[arg(long)]
    data: PathBuf,
    /// Split to evaluate: val or test.
    #[arg(long, default_value = "val")]
    split: String,
    /// Seed of the validation split for unsplit class folders (use the training run's).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    split: String,
    images: u64,
    accuracy: f64,
    ci95: (f64, f64),
    majority_baseline: f64,
    per_class_accuracy: Vec<(String, Option<f64>)>,
    confusion: Vec<Vec<u64>>,
    weight_file_bytes: u64,
    unreadable_images: usize,
}

pub fn run(args: Args) -> Result<()> {
    let device = train::parse_device(&args.device)?;
    let (loaded, model) = train::load_model(&args.model, &device)?;
    let data = data::open(&args.data, args.seed)?;
    if loaded.config.labels != data.classes {
        bail!(
            "{} was trained on classes {:?}, {} has {:?}",
            args.model.display(),
            loaded.config.labels,
            args.data.display(),
            data.classes
        );
    }
    let samples = match args.split.as_str() {
        "val" | "validation" => &data.val,
        "test" => data
            .test
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{} has no labelled test split", args.data.display()))?,
        "train" => &data.train,
        other => bail!("--split {other}: expected val, test or train"),
    };
    // An int8 model is judged as it is served: by the int8 engine, not by candle's f32
    // forward over its dequantized weights.
    let int8 = match &loaded.calibration {
        Some(ranges) => Some(
            Int8Model::compile(&model, ranges)
                .with_context(|| format!("{}: int8 compile", args.model.display()))?,
        ),
        None => None,
    };
    let r = match &int8 {
        Some(q) => train::evaluate_with(
            samples,
            data.num_classes(),
            args.batch_size,
            loaded.config.spec.input_size,
            &Device::Cpu,
            &|x| {
                let n = x.dim(0)?;
                let logits = q.forward(&x.flatten_all()?.to_vec1::<f32>()?, n);
                Ok(Tensor::from_vec(
                    logits,
                    (n, q.spec().num_classes),
                    &Device::Cpu,
                )?)
            },
        )?,
        None => train::evaluate(
            &model,
            samples,
            data.num_classes(),
            args.batch_size,
            &device,
        )?,
    };
    let c = &r.confusion;
    let n = c.classes;
    let report = Report {
        model: args.model.display().to_string(),
        split: args.split.clone(),
        images: c.total(),
        accuracy: c.accuracy(),
        ci95: wilson_interval(c.correct(), c.total()),
        majority_baseline: c.majority_baseline(),
        per_class_accuracy: data
            .classes
            .iter()
            .cloned()
            .zip(c.per_class_accuracy())
            .collect(),
        confusion: (0..n)
            .map(|t| c.counts[t * n..(t + 1) * n].to_vec())
            .collect(),
        weight_file_bytes: loaded.file_bytes,
        unreadable_images: r.bad_images,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} on {} ({}): accuracy {:.4} (95% CI {:.4}-{:.4}) over {} images; majority-class baseline {:.4}; weights {} ({} bytes)",
        report.model,
        args.data.display(),
        report.split,
        report.accuracy,
        report.ci95.0,
        report.ci95.1,
        report.images,
        report.majority_baseline,
        loaded.config.weights.format,
        report.weight_file_bytes
    );
    for (name, acc) in &report.per_class_accuracy {
        match acc {
            Some(a) => println!("  {name:<20} {a:.4}"),
            None => println!("  {name:<20} (no images)"),
        }
    }
    println!("confusion (rows: truth, columns: predicted):");
    for row in &report.confusion {
        println!(
            "  {}",
            row.iter().map(|v| format!("{v:>5}")).collect::<String>()
        );
    }
    if r.bad_images > 0 {
        println!("{} unreadable images were skipped", r.bad_images);
    }
    Ok(())
}
