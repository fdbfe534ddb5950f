use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use slimserve::formats::model_dir;
use slimserve::formats::weights::WeightFormat;
use slimserve::zoo::Arch;
use slimtrain::checkpoint::{self, to_model, IMAGENET_MEAN, IMAGENET_STD};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PyTorch checkpoint: `.pth`/`.pt`/`.bin` as torch.save writes it (zip, or the legacy
    /// pre-1.6 format), or `.safetensors`. Read with a restricted unpickler: only tensors,
    /// storages and OrderedDicts are built, nothing in the file is ever run.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Architecture the checkpoint holds.
    #[arg(long)]
    arch: Arch,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// Square input size the model was trained at (fixes big/std-conv's classifier width).
    #[arg(long, default_value_t = 256)]
    input_size: usize,
    /// Class labels: comma-separated, or @FILE with one per line. Default: Food-11's names for
    /// 11 classes, else class_<i>. The class count is read from the classifier's shape.
    #[arg(long)]
    labels: Option<String>,
    /// Key of the state dict inside the checkpoint (e.g. `state_dict`, `model_state_dict`);
    /// by default the top level, then those two, are tried.
    #[arg(long)]
    key: Option<String>,
    /// Weight encoding of the written model.
    #[arg(long, default_value = "f32", value_parser = |s: &str| WeightFormat::parse(s).ok_or(format!("unknown format `{s}`")))]
    format: WeightFormat,
    /// Fold an input normalisation into the first layer, so the model takes the [0, 1] RGB
    /// this project feeds every model: `imagenet` (mean 0.485,0.456,0.406, std
    /// 0.229,0.224,0.225, what ImageNet-pretrained torchvision models expect) or `none`.
    #[arg(long, default_value = "none", value_parser = ["none", "imagenet"])]
    input_normalization: String,
    /// Licence of the checkpoint's weights, recorded in config.json (e.g. MIT).
    #[arg(long)]
    license: Option<String>,
    /// Validation accuracy to record in config.json, if known (0..1).
    #[arg(long)]
    val_accuracy: Option<f64>,
    /// Dataset name to record in config.json.
    #[arg(long)]
    dataset: Option<String>,
}

/// Reads every tensor of a checkpoint as f32 under PyTorch keys; see [`checkpoint::read`].
pub fn read_checkpoint(path: &Path, key: Option<&str>) -> Result<BTreeMap<String, Tensor>> {
    checkpoint::read(path, key).with_context(|| format!("{}", path.display()))
}

pub fn run(args: Args) -> Result<()> {
    let tensors = read_checkpoint(&args.checkpoint, args.key.as_deref())?;
    let labels = args
        .labels
        .as_deref()
        .map(super::parse_labels)
        .transpose()?;
    let normalization = match args.input_normalization.as_str() {
        "imagenet" => Some((IMAGENET_MEAN, IMAGENET_STD)),
        _ => None,
    };
    let (mut config, tensors) =
        to_model(tensors, args.arch, args.input_size, labels, normalization)
            .with_context(|| format!("{}", args.checkpoint.display()))?;
    if let Some(notes) = &config.provenance.notes {
        eprintln!("note: {notes}");
    }
    config.weights.format = args.format;
    config.provenance.source = Some(args.checkpoint.display().to_string());
    config.provenance.command = Some(super::command_line());
    config.provenance.val_accuracy = args.val_accuracy;
    config.provenance.dataset = args.dataset.clone();
    config.provenance.license = args.license.clone();
    let bytes = model_dir::save(&args.out, &config, &tensors)?;
    println!(
        "imported {} ({} tensors) as {} -> {} ({} weights, {bytes} bytes)",
        args.checkpoint.display(),
        tensors.len(),
        config.spec.arch,
        args.out.display(),
        args.format
    );
    Ok(())
}
