use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use slimserve::formats::model_dir::{self, ModelConfig};
use slimserve::formats::weights::{self, WeightFormat};
use slimserve::zoo::{Arch, Model, ModelSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PyTorch checkpoint: zip-format `.pth`/`.bin` (torch.save since PyTorch 1.6) or `.safetensors`.
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
    /// Validation accuracy to record in config.json, if known (0..1).
    #[arg(long)]
    val_accuracy: Option<f64>,
    /// Dataset name to record in config.json.
    #[arg(long)]
    dataset: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum FileKind {
    Zip,
    LegacyPickle,
    Safetensors,
    Unknown,
}

fn sniff(path: &Path) -> Result<FileKind> {
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let n = f
        .read(&mut head)
        .with_context(|| format!("{}", path.display()))?;
    let head = &head[..n];
    Ok(if head.starts_with(b"PK\x03\x04") {
        FileKind::Zip
    } else if head.first() == Some(&0x80) {
        FileKind::LegacyPickle
    } else if n == 9 && head[8] == b'{' {
        FileKind::Safetensors
    } else {
        FileKind::Unknown
    })
}

const LEGACY_HELP: &str = "this is a legacy (pre-1.6, non-zip) PyTorch pickle, which is not read \
here because unpickling can run arbitrary code. Convert it in Python with \
`sd = torch.load(path, map_location='cpu'); torch.save(sd, 'model.pth')` (zip format) or \
`from safetensors.torch import save_file; save_file(sd, 'model.safetensors')`";

/// Reads every tensor of a checkpoint as f32 under PyTorch keys (`module.` prefixes stripped,
/// `num_batches_tracked` dropped).
pub fn read_checkpoint(path: &Path, key: Option<&str>) -> Result<BTreeMap<String, Tensor>> {
    let raw: Vec<(String, Tensor)> = match sniff(path)? {
        FileKind::Zip => {
            let keys: Vec<Option<&str>> = match key {
                Some(k) => vec![Some(k)],
                None => vec![None, Some("state_dict"), Some("model_state_dict")],
            };
            let mut found = Vec::new();
            let mut last_err = None;
            for k in keys {
                match candle_core::pickle::read_all_with_key(path, k) {
                    Ok(t) if !t.is_empty() => {
                        found = t;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => last_err = Some(e),
                }
            }
            if found.is_empty() {
                match last_err {
                    Some(e) => bail!("{}: cannot read PyTorch checkpoint: {e}", path.display()),
                    None => bail!(
                        "{}: no tensors found (try --key with the state dict's key)",
                        path.display()
                    ),
                }
            }
            found
        }
        FileKind::Safetensors => {
            let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
            let (_, t) = weights::decode(&bytes).with_context(|| format!("{}", path.display()))?;
            t.into_iter().collect()
        }
        FileKind::LegacyPickle => bail!("{}: {LEGACY_HELP}", path.display()),
        FileKind::Unknown => bail!(
            "{}: not a PyTorch zip checkpoint or safetensors file",
            path.display()
        ),
    };
    let strip = raw.iter().all(|(k, _)| k.starts_with("module."));
    let mut out = BTreeMap::new();
    for (k, t) in raw {
        if k.ends_with("num_batches_tracked") {
            continue;
        }
        let k = if strip {
            k["module.".len()..].to_string()
        } else {
            k
        };
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        out.insert(k, t);
    }
    Ok(out)
}

/// Reads widths and class count off the tensors, so pruned students import too.
fn infer_spec(arch: Arch, input_size: usize, t: &BTreeMap<String, Tensor>) -> Result<ModelSpec> {
    let dim0 = |k: &str| -> Result<usize> {
        t.get(k)
            .map(|x| x.dims().first().copied().unwrap_or(0))
            .with_context(|| format!("missing `{k}` (is --arch {arch} right?)"))
    };
    let mut spec = ModelSpec::new(arch, 1, input_size);
    let n = spec.widths.len();
    match arch {
        Arch::Big | Arch::StdConv => {
            spec.num_classes = dim0("fc.0.weight")?;
            for (k, w) in spec.widths.iter_mut().enumerate() {
                *w = dim0(&format!("cnn.{}.weight", 4 * k))?;
            }
        }
        Arch::Student | Arch::StudentDeeper | Arch::GroupConv => {
            spec.num_classes = dim0("fc.0.weight")?;
            spec.widths[0] = dim0("cnn.0.0.weight")?;
            for i in 1..n {
                spec.widths[i] = dim0(&format!("cnn.{i}.3.weight"))?;
            }
        }
        Arch::Resnet18 => spec.num_classes = dim0("fc.weight")?,
    }
    Ok(spec)
}

pub fn run(args: Args) -> Result<()> {
    let tensors = read_checkpoint(&args.checkpoint, args.key.as_deref())?;
    let spec = infer_spec(args.arch, args.input_size, &tensors)
        .with_context(|| format!("{}", args.checkpoint.display()))?;
    let labels = match &args.labels {
        Some(l) => super::parse_labels(l)?,
        None => model_dir::default_labels(spec.num_classes),
    };
    if labels.len() != spec.num_classes {
        bail!(
            "--labels gives {} labels but the checkpoint's classifier has {} classes",
            labels.len(),
            spec.num_classes
        );
    }
    Model::from_tensors(&spec, &tensors, &Device::Cpu)
        .with_context(|| format!("{}", args.checkpoint.display()))?;
    let mut config = ModelConfig::new(spec, labels);
    config.weights.format = args.format;
    config.provenance.source = Some(args.checkpoint.display().to_string());
    config.provenance.command = Some(super::command_line());
    config.provenance.val_accuracy = args.val_accuracy;
    config.provenance.dataset = args.dataset.clone();
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
