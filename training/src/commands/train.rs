//! `train` and `distill`: the same loop with a cross-entropy or a distillation objective.

use std::path::PathBuf;

use anyhow::{bail, Result};
use slimserve::formats::model_dir::Provenance;
use slimserve::zoo::{Arch, ModelSpec};

use slimtrain::data;
use slimtrain::train::optim::AdamWConfig;
use slimtrain::train::{self, Objective, TrainConfig};

/// Options shared by every command that trains.
#[derive(clap::Args, Debug, Clone)]
pub struct FitArgs {
    /// Dataset: a Food-11 folder, a folder per class (with or without train/val splits), or a
    /// folder of Fashion-MNIST IDX files.
    #[arg(long, env = "SLIMTRAIN_DATA")]
    pub data: PathBuf,
    /// Run directory: checkpoints, log.csv and the best model (`OUT/best`).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (after a kill or to add epochs).
    #[arg(long)]
    pub resume: bool,
    /// Square input size (the study: 256; Fashion-MNIST experiments: 64).
    #[arg(long, default_value_t = 256)]
    pub input_size: usize,
    /// Total epochs of the run (raise it with --resume to train longer).
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// AdamW learning rate (the study: 1e-3).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW decoupled weight decay (PyTorch's default 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Seeds initialisation, shuffling, augmentation and the validation split of unsplit folders.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also checkpoint every N steps, so a kill loses at most N steps (0: epoch ends only).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Cap on steps per epoch, for quick trials (default: the whole training split).
    #[arg(long)]
    pub max_steps_per_epoch: Option<usize>,
    /// cpu, or cuda[:N] with a CUDA build.
    #[arg(long, default_value = "cpu", env = "SLIMTRAIN_DEVICE")]
    pub device: String,
}

impl FitArgs {
    pub fn config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            max_steps_per_epoch: self.max_steps_per_epoch,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture to train from scratch.
    #[arg(long)]
    arch: Arch,
    #[command(flatten)]
    fit: FitArgs,
}

#[derive(clap::Args, Debug)]
pub struct DistillArgs {
    /// Teacher model directory (any architecture or weight format, e.g. an imported PyTorch model).
    #[arg(long)]
    teacher: PathBuf,
    /// Student architecture.
    #[arg(long, default_value = "student-deeper")]
    arch: Arch,
    /// Softmax temperature T of the soft targets (the study: 20).
    #[arg(long, default_value_t = 20.0)]
    temperature: f64,
    /// Weight of the soft-target term; 1 - alpha weighs the hard labels (the study: 0.5).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    #[command(flatten)]
    fit: FitArgs,
}

fn report(summary: &train::FitSummary) {
    println!(
        "best validation accuracy {:.4} (last epoch {:.4}) after {} epochs, {} images, {:.0} s; model in {}",
        summary.best_val_accuracy,
        summary.final_val_accuracy,
        summary.epochs,
        summary.images_seen,
        summary.wall_seconds,
        summary.best_dir.display()
    );
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    let fit = &args.fit;
    let device = train::parse_device(&fit.device)?;
    let data = data::open(&fit.data, fit.seed)?;
    let spec = ModelSpec::new(args.arch, data.num_classes(), fit.input_size);
    spec.validate()?;
    let provenance = Provenance {
        command: Some(super::command_line()),
        ..Default::default()
    };
    let summary = train::fit(
        &fit.out,
        &spec,
        &data,
        &Objective::CrossEntropy,
        &fit.config(),
        fit.resume,
        None,
        provenance,
        &device,
    )?;
    report(&summary);
    Ok(())
}

pub fn run_distill(args: DistillArgs) -> Result<()> {
    let fit = &args.fit;
    if !(0.0..=1.0).contains(&args.alpha) {
        bail!("--alpha must be in [0, 1], got {}", args.alpha);
    }
    if args.temperature <= 0.0 {
        bail!("--temperature must be positive, got {}", args.temperature);
    }
    let device = train::parse_device(&fit.device)?;
    let data = data::open(&fit.data, fit.seed)?;
    let (teacher_dir, teacher) = train::load_model(&args.teacher, &device)?;
    let t = &teacher_dir.config;
    if t.labels != data.classes {
        bail!(
            "teacher {} was trained on classes {:?}, the data has {:?}",
            args.teacher.display(),
            t.labels,
            data.classes
        );
    }
    if t.spec.input_size != fit.input_size {
        bail!(
            "teacher {} takes {}x{} inputs; pass --input-size {}",
            args.teacher.display(),
            t.spec.input_size,
            t.spec.input_size,
            t.spec.input_size
        );
    }
    let spec = ModelSpec::new(args.arch, data.num_classes(), fit.input_size);
    spec.validate()?;
    let provenance = Provenance {
        command: Some(super::command_line()),
        teacher: Some(args.teacher.display().to_string()),
        ..Default::default()
    };
    let objective = Objective::Distill {
        teacher: Box::new(teacher),
        teacher_dir: args.teacher.display().to_string(),
        temperature: args.temperature,
        alpha: args.alpha,
    };
    let summary = train::fit(
        &fit.out,
        &spec,
        &data,
        &objective,
        &fit.config(),
        fit.resume,
        None,
        provenance,
        &device,
    )?;
    report(&summary);
    Ok(())
}
