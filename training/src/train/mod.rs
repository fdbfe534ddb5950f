//! The training loop shared by `train`, `distill` and `prune`'s fine-tuning.
//!
//! A run directory holds everything needed to continue after a kill:
//!
//! ```text
//! RUN/run.json            what is being trained (spec, data, hyper-parameters); checked on --resume
//! RUN/checkpoint/         model.safetensors + optimizer.safetensors + state.json, replaced atomically
//! RUN/best/               the best-on-validation model so far (a normal model directory)
//! RUN/log.csv             one row per epoch
//! ```
//!
//! Checkpoints are written at the end of every epoch and every `checkpoint_every` steps. The
//! data order and augmentation are keyed by (seed, epoch, sample), and initialisation by the
//! seed, so a resumed run continues the same sequence of batches as an uninterrupted one.

pub mod loss;
pub mod metrics;
pub mod mixup;
pub mod optim;
pub mod resize;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, ModuleT, Tensor, D};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use slimserve::formats::model_dir::{self, ModelConfig, Provenance};
use slimserve::formats::weights::{self, WeightFormat};
use slimserve::zoo::{Model, ModelSpec};

use crate::data::{Dataset, Loader, LoaderConfig, Sample};
use metrics::Confusion;
use optim::{AdamW, AdamWConfig};

/// Hyper-parameters of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    pub seed: u64,
    /// Also checkpoint every this many optimizer steps (0: only at epoch ends).
    pub checkpoint_every: usize,
    /// Stop each epoch after this many steps (quick experiments and tests); None = full epochs.
    pub max_steps_per_epoch: Option<usize>,
    /// Learning-rate multiplier of every parameter outside the classifier head (fine-tuning a
    /// pretrained backbone slower than its new head); 1 = one rate for all.
    #[serde(default = "one")]
    pub backbone_lr_scale: f64,
    /// Epochs at the start during which only the head learns (the backbone is frozen).
    #[serde(default)]
    pub freeze_backbone_epochs: usize,
    /// Cosine learning-rate decay from `lr` at the first epoch to 0 after the last
    /// (`lr * (1 + cos(pi * epoch / epochs)) / 2`); off = constant.
    #[serde(default)]
    pub cosine: bool,
    /// Label smoothing of the hard-label cross-entropy (0: none).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Mixup's Beta(a, a) shape (0: no mixup).
    #[serde(default)]
    pub mixup: f64,
    /// Train on the training and validation images together for a fixed number of epochs
    /// (the recipe chosen on validation before): `OUT/best` is then the last epoch's model,
    /// and the validation accuracy still logged is no longer held out.
    #[serde(default)]
    pub train_on_val: bool,
}

fn one() -> f64 {
    1.0
}

impl TrainConfig {
    /// The learning rate of `epoch` (0-based) for the head; the backbone's is scaled.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let lr = self.optimizer.lr;
        if self.cosine {
            let t = epoch as f64 / self.epochs.max(1) as f64;
            lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        } else {
            lr
        }
    }

    /// The backbone's learning-rate multiplier during `epoch`.
    pub fn backbone_scale_at(&self, epoch: usize) -> f64 {
        if epoch < self.freeze_backbone_epochs {
            0.0
        } else {
            self.backbone_lr_scale
        }
    }
}

/// What the student learns from.
pub enum Objective {
    CrossEntropy,
    Distill {
        teacher: Box<Model>,
        teacher_dir: String,
        temperature: f64,
        alpha: f64,
    },
}

impl Objective {
    fn describe(&self) -> String {
        match self {
            Objective::CrossEntropy => "cross-entropy".into(),
            Objective::Distill {
                teacher_dir,
                temperature,
                alpha,
                ..
            } => format!("distill from {teacher_dir} (T={temperature}, alpha={alpha})"),
        }
    }
}

/// Recorded in `run.json`; a resumed run must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunInfo {
    spec: ModelSpec,
    dataset: String,
    classes: Vec<String>,
    objective: String,
    config: TrainConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// Epoch in progress (0-based) and the batches of it already done.
    epoch: usize,
    batch: usize,
    images_seen: u64,
    optimizer_step: u64,
    best_val_accuracy: Option<f64>,
    /// Training wall time accumulated over all sessions of this run.
    wall_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    pub best_val_accuracy: f64,
    pub final_val_accuracy: f64,
    pub epochs: usize,
    pub images_seen: u64,
    pub wall_seconds: f64,
    pub best_dir: PathBuf,
}

/// Evaluation of a model on a sample list.
pub struct EvalResult {
    pub confusion: Confusion,
    pub mean_loss: f64,
    pub bad_images: usize,
}

pub fn evaluate(
    model: &Model,
    samples: &[Sample],
    classes: usize,
    batch: usize,
    device: &Device,
) -> Result<EvalResult> {
    let size = model.spec().input_size;
    evaluate_with(samples, classes, batch, size, device, &|x| {
        Ok(model.forward_t(x, false)?)
    })
}

/// As [`evaluate`], with the logits of each batch `[N, 3, S, S]` (on `device`) computed by
/// `forward` (e.g. an inference engine instead of candle's forward).
pub fn evaluate_with(
    samples: &[Sample],
    classes: usize,
    batch: usize,
    size: usize,
    device: &Device,
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<EvalResult> {
    let loader = Loader::new(samples, LoaderConfig::eval(batch, size))?;
    let mut confusion = Confusion::new(classes);
    let mut loss_sum = 0.0;
    let mut n = 0usize;
    for b in loader.epoch(0, 0) {
        let (x, y) = b?;
        let x = x.to_device(device)?;
        let y = y.to_device(device)?;
        let logits = forward(&x)?;
        loss_sum += loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * y.dim(0)? as f64;
        n += y.dim(0)?;
        let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let truth: Vec<u32> = y.to_vec1()?;
        for (t, p) in truth.iter().zip(&pred) {
            confusion.add(*t as usize, *p as usize);
        }
    }
    Ok(EvalResult {
        confusion,
        mean_loss: if n == 0 { 0.0 } else { loss_sum / n as f64 },
        bad_images: loader.bad_image_count(),
    })
}

fn set_vars(varmap: &VarMap, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (k, var) in data.iter() {
        let t = tensors
            .get(k)
            .with_context(|| format!("checkpoint lacks `{k}`"))?;
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

/// Initial weights for fine-tuning: every tensor of `init` except the head's (which keeps
/// its fresh initialisation for the new classes) when `new_head`; all of them otherwise.
/// The rest must match the spec's keys and shapes exactly.
pub fn init_weights(
    spec: &ModelSpec,
    init: &BTreeMap<String, Tensor>,
    new_head: bool,
) -> Result<BTreeMap<String, Tensor>> {
    let head = spec.arch.head_prefix();
    let expected = slimserve::zoo::weight_shapes(spec)?;
    let mut out = BTreeMap::new();
    for (k, shape) in &expected {
        if new_head && k.starts_with(head) {
            continue;
        }
        let t = init
            .get(k)
            .with_context(|| format!("--init: the model lacks `{k}` (is it a {}?)", spec.arch))?;
        if t.dims() != shape.as_slice() {
            bail!(
                "--init: `{k}` has shape {:?}, the {} being trained needs {shape:?}",
                t.dims(),
                spec.arch
            );
        }
        out.insert(k.clone(), t.clone());
    }
    Ok(out)
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(weights::decode(&bytes)
        .with_context(|| format!("{}", path.display()))?
        .1)
}

struct RunDir {
    root: PathBuf,
}

impl RunDir {
    fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }

    /// Writes the checkpoint into a fresh directory, then swaps it in: a kill at any moment
    /// leaves either the old or the new checkpoint complete.
    fn save_checkpoint(&self, varmap: &VarMap, opt: &AdamW, state: &State) -> Result<()> {
        let tmp = self.root.join("checkpoint.tmp");
        let old = self.root.join("checkpoint.old");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let cpu = |m: BTreeMap<String, Tensor>| -> Result<BTreeMap<String, Tensor>> {
            m.into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
                .collect()
        };
        let model = weights::encode(
            &cpu(slimserve::zoo::varmap_tensors(varmap))?,
            WeightFormat::F32,
        )?;
        model_dir::write_atomic(&tmp.join("model.safetensors"), &model)?;
        let optim = weights::encode(&cpu(opt.state())?, WeightFormat::F32)?;
        model_dir::write_atomic(&tmp.join("optimizer.safetensors"), &optim)?;
        model_dir::write_atomic(&tmp.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
        let current = self.checkpoint();
        let _ = std::fs::remove_dir_all(&old);
        if current.exists() {
            std::fs::rename(&current, &old)?;
        }
        std::fs::rename(&tmp, &current)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The newest complete checkpoint (the `.old` one survives a kill mid-swap).
    fn latest_checkpoint(&self) -> Option<PathBuf> {
        [self.checkpoint(), self.root.join("checkpoint.old")]
            .into_iter()
            .find(|d| d.join("state.json").exists())
    }

    /// Drops log rows of epochs after the checkpoint (written just before a kill), so a
    /// resumed run logs every epoch exactly once.
    fn truncate_log(&self, epochs_done: usize) -> Result<()> {
        let path = self.root.join("log.csv");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, l)| {
                *i == 0
                    || l.split(',')
                        .next()
                        .and_then(|e| e.parse::<usize>().ok())
                        .is_some_and(|e| e <= epochs_done)
            })
            .map(|(_, l)| l)
            .collect();
        model_dir::write_atomic(&path, format!("{}\n", kept.join("\n")).as_bytes())?;
        Ok(())
    }

    fn append_log(&self, line: &str) -> Result<()> {
        let path = self.root.join("log.csv");
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        if new {
            writeln!(
                f,
                "epoch,train_loss,train_accuracy,val_loss,val_accuracy,images_per_s,images_seen,wall_seconds,lr"
            )?;
        }
        writeln!(f, "{line}")?;
        f.sync_data()?;
        Ok(())
    }
}

/// Trains `spec` on `data` into the run directory `out`, continuing from its checkpoint when
/// `resume` is set. `provenance` is completed and stored with the best model.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    out: &Path,
    spec: &ModelSpec,
    data: &Dataset,
    objective: &Objective,
    cfg: &TrainConfig,
    resume: bool,
    init: Option<&BTreeMap<String, Tensor>>,
    mut provenance: Provenance,
    device: &Device,
) -> Result<FitSummary> {
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        bail!("--batch-size and --epochs must be positive");
    }
    if data.train.is_empty() || data.val.is_empty() {
        bail!(
            "{}: the train and validation splits must both hold images",
            data.name
        );
    }
    let run = RunDir {
        root: out.to_path_buf(),
    };
    let info = RunInfo {
        spec: spec.clone(),
        dataset: data.name.clone(),
        classes: data.classes.clone(),
        objective: objective.describe(),
        config: cfg.clone(),
    };
    let info_path = out.join("run.json");
    let checkpoint = run.latest_checkpoint();
    if resume {
        let recorded: RunInfo = serde_json::from_slice(
            &std::fs::read(&info_path)
                .with_context(|| format!("--resume: {}", info_path.display()))?,
        )
        .with_context(|| format!("{}", info_path.display()))?;
        if recorded.spec != info.spec
            || recorded.classes != info.classes
            || recorded.objective != info.objective
        {
            bail!(
                "--resume: {} was started with a different model, dataset classes or objective",
                info_path.display()
            );
        }
        if recorded.config.batch_size != cfg.batch_size || recorded.config.seed != cfg.seed {
            bail!(
                "--resume: batch size and seed must match the original run ({})",
                info_path.display()
            );
        }
        if recorded.config.train_on_val != cfg.train_on_val {
            bail!(
                "--resume: the original run {} --train-on-val; pass the same ({})",
                if recorded.config.train_on_val {
                    "had"
                } else {
                    "did not have"
                },
                info_path.display()
            );
        }
    } else if checkpoint.is_some() {
        bail!(
            "{} already holds a run; pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    model_dir::write_atomic(&info_path, &serde_json::to_vec_pretty(&info)?)?;

    let (varmap, model) = Model::init_seeded(spec, device, cfg.seed)?;
    if let Some(t) = init {
        // Keys absent from `init` (a new head) keep their seeded initialisation.
        let data = varmap.data().lock().expect("varmap lock");
        for (k, var) in data.iter() {
            if let Some(t) = t.get(k) {
                var.set(&t.to_device(var.device())?)?;
            }
        }
    }
    let mut opt = AdamW::new(&varmap, cfg.optimizer)?;
    let mut state = State::default();
    if resume {
        if let Some(dir) = &checkpoint {
            set_vars(&varmap, &read_tensors(&dir.join("model.safetensors"))?)?;
            state = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
                .with_context(|| format!("{}", dir.join("state.json").display()))?;
            opt.load_state(
                &read_tensors(&dir.join("optimizer.safetensors"))?,
                state.optimizer_step,
            )?;
            run.truncate_log(state.epoch)?;
            eprintln!(
                "resuming {} at epoch {} batch {} ({} images seen)",
                out.display(),
                state.epoch + 1,
                state.batch,
                state.images_seen
            );
        } else {
            eprintln!(
                "--resume: no checkpoint in {} yet, starting from scratch",
                out.display()
            );
        }
    }

    // With `train_on_val` the validation images join the training set (the split no longer
    // picks anything: the last epoch's model is kept).
    let train_samples: std::borrow::Cow<[Sample]> = if cfg.train_on_val {
        data.train.iter().chain(&data.val).cloned().collect()
    } else {
        (&data.train[..]).into()
    };
    let loader = Loader::new(
        &train_samples,
        LoaderConfig::train(cfg.batch_size, spec.input_size, cfg.seed),
    )?
    .on_bad_image(|b| {
        eprintln!(
            "warning: skipping unreadable image {}: {}",
            b.path, b.reason
        )
    });
    let steps = loader
        .batches_per_epoch()
        .min(cfg.max_steps_per_epoch.unwrap_or(usize::MAX));
    let best_dir = out.join("best");
    let mut final_acc = state.best_val_accuracy.unwrap_or(0.0);
    eprintln!(
        "training {} ({}) on {}{}: {} steps/epoch of {}",
        spec.arch,
        objective.describe(),
        data.summary(),
        if cfg.train_on_val {
            " (validation images trained on; the last epoch is kept)"
        } else {
            ""
        },
        steps,
        cfg.batch_size
    );

    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        opt.set_lr(cfg.lr_at(epoch));
        let backbone = cfg.backbone_scale_at(epoch);
        let head = spec.arch.head_prefix();
        opt.set_scales(|k| if k.starts_with(head) { 1.0 } else { backbone });
        let bar = ProgressBar::new(steps as u64).with_position(state.batch as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .expect("progress template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0u64);
        for batch in loader
            .epoch(epoch as u64, state.batch)
            .take(steps.saturating_sub(state.batch))
        {
            let (x, y) = batch?;
            let (x, y) = (x.to_device(device)?, y.to_device(device)?);
            let n = y.dim(0)? as u64;
            let mix = (cfg.mixup > 0.0).then(|| {
                mixup::draw(
                    cfg.mixup,
                    cfg.seed,
                    epoch as u64,
                    state.batch as u64,
                    n as usize,
                )
            });
            let (x, y2) = match &mix {
                Some(m) => (m.images(&x)?, Some((m.labels(&y)?, m.lambda))),
                None => (x, None),
            };
            let logits = model.forward_t(&x, true)?;
            let hard = loss::hard_loss(
                &logits,
                &y,
                y2.as_ref().map(|(y2, l)| (y2, *l)),
                cfg.label_smoothing,
            )?;
            let loss = match objective {
                Objective::CrossEntropy => hard,
                Objective::Distill {
                    teacher,
                    temperature,
                    alpha,
                    ..
                } => {
                    // A teacher trained at another size sees the same (blended) crops resized.
                    let xt = resize::resize_bilinear(&x, teacher.spec().input_size)?;
                    let t = teacher.forward_t(&xt, false)?.detach();
                    loss::distillation_with(&logits, &t, hard, *temperature, *alpha)?
                }
            };
            // Training accuracy counts the label that dominates a blended image.
            let y = match &y2 {
                Some((y2, l)) if *l < 0.5 => y2.clone(),
                _ => y,
            };
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                bail!(
                    "loss became {l} at epoch {} batch {}; lower --lr",
                    epoch + 1,
                    state.batch + 1
                );
            }
            let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            let truth: Vec<u32> = y.to_vec1()?;
            correct += pred.iter().zip(&truth).filter(|(p, t)| p == t).count() as u64;
            loss_sum += l * n as f64;
            seen += n;
            state.batch += 1;
            state.images_seen += n;
            state.optimizer_step = opt.step_count();
            let elapsed = started.elapsed().as_secs_f64();
            bar.set_position(state.batch as u64);
            bar.set_message(format!(
                "loss {:.4} acc {:.3} {:.1} img/s",
                loss_sum / seen as f64,
                correct as f64 / seen as f64,
                seen as f64 / elapsed.max(1e-9)
            ));
            if cfg.checkpoint_every > 0
                && state.batch % cfg.checkpoint_every == 0
                && state.batch < steps
            {
                state.wall_seconds += elapsed;
                run.save_checkpoint(&varmap, &opt, &state)?;
                state.wall_seconds -= elapsed;
            }
        }
        bar.finish_and_clear();
        let train_seconds = started.elapsed().as_secs_f64();
        let eval = evaluate(
            &model,
            &data.val,
            data.num_classes(),
            cfg.batch_size.max(32),
            device,
        )?;
        let acc = eval.confusion.accuracy();
        final_acc = acc;
        state.wall_seconds += started.elapsed().as_secs_f64();
        state.epoch += 1;
        state.batch = 0;
        let ips = seen as f64 / train_seconds.max(1e-9);
        let (train_loss, train_acc) = if seen > 0 {
            (loss_sum / seen as f64, correct as f64 / seen as f64)
        } else {
            (f64::NAN, f64::NAN)
        };
        eprintln!(
            "epoch {}/{}: train loss {train_loss:.4} acc {train_acc:.4} | val{} loss {:.4} acc {acc:.4} ({} images) | {ips:.1} img/s",
            state.epoch,
            cfg.epochs,
            if cfg.train_on_val { " (trained on)" } else { "" },
            eval.mean_loss,
            eval.confusion.total()
        );
        run.append_log(&format!(
            "{},{train_loss:.6},{train_acc:.6},{:.6},{acc:.6},{ips:.2},{},{:.1},{}",
            state.epoch,
            eval.mean_loss,
            state.images_seen,
            state.wall_seconds,
            opt.lr()
        ))?;
        if cfg.train_on_val || state.best_val_accuracy.is_none_or(|b| acc > b) {
            state.best_val_accuracy = Some(acc);
            provenance.dataset = Some(data.name.clone());
            provenance.epochs = Some(state.epoch);
            provenance.images_seen = Some(state.images_seen);
            if cfg.train_on_val {
                // Not a held-out figure: leave it out rather than let a table quote it.
                provenance.val_accuracy = None;
                provenance.val_images = None;
                provenance.notes = Some(format!(
                    "trained on the training and validation splits ({} images) for a fixed --epochs {}; no held-out validation figure",
                    train_samples.len(),
                    state.epoch
                ));
            } else {
                provenance.val_accuracy = Some(acc);
                provenance.val_images = Some(eval.confusion.total() as usize);
            }
            let mut config = ModelConfig::new(spec.clone(), data.classes.clone());
            config.provenance = provenance.clone();
            model_dir::save(&best_dir, &config, &slimserve::zoo::varmap_tensors(&varmap))?;
        }
        run.save_checkpoint(&varmap, &opt, &state)?;
    }
    Ok(FitSummary {
        best_val_accuracy: state.best_val_accuracy.unwrap_or(final_acc),
        final_val_accuracy: final_acc,
        epochs: state.epoch,
        images_seen: state.images_seen,
        wall_seconds: state.wall_seconds,
        best_dir,
    })
}

/// Loads a model directory and checks it can serve as a `device` model.
pub fn load_model(dir: &Path, device: &Device) -> Result<(model_dir::LoadedModel, Model)> {
    let loaded = model_dir::load(dir)?;
    let model = loaded.build(device)?;
    Ok((loaded, model))
}

/// `cpu`, or `cuda[:N]` when built with the `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = s
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support (rebuild with --features cuda)"
                );
            }
            Ok(Device::new_cuda(n)?)
        }
        other => bail!("--device {other}: expected cpu or cuda[:N]"),
    }
}
