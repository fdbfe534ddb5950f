//! `train` and `distill`: the same loop with a cross-entropy or a distillation objective.

use std::path::PathBuf;

use anyhow::{bail, Result};
use slimserve::formats::model_dir::{self, Provenance};
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
    /// Learning-rate multiplier for everything but the classifier head, e.g. 0.1 to fine-tune
    /// a pretrained backbone ten times slower than its new head.
    #[arg(long, default_value_t = 1.0)]
    pub backbone_lr_scale: f64,
    /// Train only the head for the first N epochs (backbone frozen), then everything.
    #[arg(long, default_value_t = 0)]
    pub freeze_backbone_epochs: usize,
    /// Cosine learning-rate decay from --lr to 0 over --epochs (default: constant).
    #[arg(long)]
    pub cosine: bool,
    /// Label smoothing of the hard-label cross-entropy, e.g. 0.1 (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Mixup: blend each batch with a shuffled copy of itself by lambda ~ Beta(a, a), e.g. 0.2,
    /// and the loss likewise; under distillation the teacher sees the blend too (0: off).
    #[arg(long, default_value_t = 0.0, value_name = "A")]
    pub mixup: f64,
    /// Train on the training and validation splits together for exactly --epochs (once the
    /// recipe was chosen on validation): OUT/best is the last epoch's model, and no held-out
    /// validation accuracy is recorded. A test split, when the data has one, stays untouched.
    #[arg(long)]
    pub train_on_val: bool,
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
            backbone_lr_scale: self.backbone_lr_scale,
            freeze_backbone_epochs: self.freeze_backbone_epochs,
            cosine: self.cosine,
            label_smoothing: self.label_smoothing,
            mixup: self.mixup,
            train_on_val: self.train_on_val,
        }
    }

    fn check(&self) -> Result<()> {
        if !(self.backbone_lr_scale >= 0.0 && self.backbone_lr_scale.is_finite()) {
            bail!(
                "--backbone-lr-scale must be a finite number >= 0, got {}",
                self.backbone_lr_scale
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "--label-smoothing must be in [0, 1), got {}",
                self.label_smoothing
            );
        }
        if !(self.mixup >= 0.0 && self.mixup.is_finite()) {
            bail!("--mixup must be a finite number >= 0, got {}", self.mixup);
        }
        if self.freeze_backbone_epochs > self.epochs {
            bail!(
                "--freeze-backbone-epochs {} is more than --epochs {}",
                self.freeze_backbone_epochs,
                self.epochs
            );
        }
        Ok(())
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture to train (from scratch, or from --init's weights).
    #[arg(long)]
    arch: Arch,
    /// Transfer learning: start from this model directory's weights (same architecture, e.g.
    /// `slimtrain data fetch mobilenet-v2-imagenet`'s), with a new classifier head for the
    /// dataset's classes unless the labels are the same.
    #[arg(long)]
    init: Option<PathBuf>,
    #[command(flatten)]
    fit: FitArgs,
}

#[derive(clap::Args, Debug)]
pub struct DistillArgs {
    /// Teacher model directory (any architecture, input size or weight format, e.g. a
    /// fine-tuned pretrained MobileNetV2; batches are resized when its input size differs).
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

fn report(summary: &train::FitSummary, fit: &FitArgs) {
    if fit.train_on_val {
        println!(
            "trained on training + validation images for {} epochs ({} images, {:.0} s); the last epoch's model is in {} (validation accuracy {:.4}, not held out)",
            summary.epochs,
            summary.images_seen,
            summary.wall_seconds,
            summary.best_dir.display(),
            summary.final_val_accuracy
        );
        return;
    }
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
    fit.check()?;
    let device = train::parse_device(&fit.device)?;
    let data = data::open(&fit.data, fit.seed)?;
    let spec = ModelSpec::new(args.arch, data.num_classes(), fit.input_size);
    spec.validate()?;
    let mut provenance = Provenance {
        command: Some(super::command_line()),
        ..Default::default()
    };
    let init = match &args.init {
        None => None,
        Some(dir) => {
            let loaded = model_dir::load(dir)?;
            let from = &loaded.config;
            if from.spec.arch != spec.arch {
                bail!(
                    "--init {} holds a {}, not a {} (--arch)",
                    dir.display(),
                    from.spec.arch,
                    spec.arch
                );
            }
            let new_head = from.labels != data.classes;
            if new_head {
                eprintln!(
                    "--init {}: new {}-class head for {}",
                    dir.display(),
                    data.num_classes(),
                    data.name
                );
            }
            provenance.source = Some(dir.display().to_string());
            provenance.license = from.provenance.license.clone();
            Some(train::init_weights(&spec, &loaded.tensors, new_head)?)
        }
    };
    let summary = train::fit(
        &fit.out,
        &spec,
        &data,
        &Objective::CrossEntropy,
        &fit.config(),
        fit.resume,
        init.as_ref(),
        provenance,
        &device,
    )?;
    report(&summary, fit);
    Ok(())
}

pub fn run_distill(args: DistillArgs) -> Result<()> {
    let fit = &args.fit;
    fit.check()?;
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
        eprintln!(
            "teacher {} takes {}x{} inputs: each {}x{} batch is resized for it (bilinear)",
            args.teacher.display(),
            t.spec.input_size,
            t.spec.input_size,
            fit.input_size,
            fit.input_size
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
    report(&summary, fit);
    Ok(())
}
