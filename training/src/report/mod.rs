//! `slimtrain report`: a results table (markdown) and plots (SVG + PNG) from the directories
//! that `train`/`distill`, `prune`, `quantize` and `eval --json` leave behind.
//!
//! Inputs:
//!
//! ```text
//! --run NAME=DIR              RUN/log.csv (one row per epoch) + RUN/best/ (the saved model)
//! --model NAME=DIR[:EVAL]     a model directory, optionally with `slimtrain eval --json` output
//! --prune NAME=DIR            RUN/curve.csv of `slimtrain prune`
//! ```
//!
//! Everything is read and rendered in memory first, so bad input fails before anything is
//! written; each output file is then written to a temporary sibling and renamed into place.

mod csv;
mod markdown;
pub mod plot;

use std::path::{Path, PathBuf};

use crate::train::metrics::wilson_interval;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use slimserve::formats::model_dir::{self, ModelConfig, Provenance};
use slimserve::zoo;

pub use csv::{read_curve, read_log, CurveRow, LogRow};

pub const RESULTS_FILE: &str = "results.md";
/// Plot file stems; each is written as `.svg` and `.png`.
pub const ACCURACY_PLOT: &str = "training_accuracy";
pub const LOSS_PLOT: &str = "training_loss";
pub const PRUNING_PLOT: &str = "pruning";

/// What to report on and where to write it.
#[derive(Debug, Clone, Default)]
pub struct ReportSpec {
    pub out: PathBuf,
    pub title: String,
    /// Training or distillation run directories.
    pub runs: Vec<(String, PathBuf)>,
    /// Model directories, each with an optional `eval --json` file.
    pub models: Vec<ModelInput>,
    /// Pruning run directories.
    pub prunes: Vec<(String, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    pub name: String,
    pub dir: PathBuf,
    pub eval: Option<PathBuf>,
}

/// Parses `NAME=DIR` (`--run`, `--prune`).
pub fn parse_named(s: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=DIR"))?;
    let name = name.trim();
    if name.is_empty() || dir.is_empty() {
        return Err(format!(
            "`{s}`: expected NAME=DIR with both parts non-empty"
        ));
    }
    Ok((name.to_string(), PathBuf::from(dir)))
}

/// Parses `NAME=DIR[:EVAL_JSON]` (`--model`); the eval file follows the last `:`.
pub fn parse_model(s: &str) -> Result<ModelInput, String> {
    let (name, rest) = parse_named(s)?;
    let rest = rest.to_string_lossy().into_owned();
    let (dir, eval) = match rest.rsplit_once(':') {
        Some((dir, eval)) if !dir.is_empty() && !eval.is_empty() => {
            (dir.to_string(), Some(PathBuf::from(eval)))
        }
        Some(_) => return Err(format!("`{s}`: expected NAME=DIR[:EVAL_JSON]")),
        None => (rest, None),
    };
    Ok(ModelInput {
        name,
        dir: PathBuf::from(dir),
        eval,
    })
}

/// The fields of `slimtrain eval --json` that the report uses.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalJson {
    pub accuracy: f64,
    #[serde(default)]
    pub ci95: Option<(f64, f64)>,
    #[serde(default)]
    pub images: Option<u64>,
    #[serde(default)]
    pub majority_baseline: Option<f64>,
    #[serde(default)]
    pub weight_file_bytes: Option<u64>,
    #[serde(default)]
    pub split: Option<String>,
}

pub fn read_eval(path: &Path) -> Result<EvalJson> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let eval: EvalJson = serde_json::from_str(&text)
        .with_context(|| format!("{}: not `slimtrain eval --json` output", path.display()))?;
    if !(0.0..=1.0).contains(&eval.accuracy) {
        bail!(
            "{}: accuracy {} is outside [0, 1]",
            path.display(),
            eval.accuracy
        );
    }
    Ok(eval)
}

/// One row of the results table.
#[derive(Debug, Clone)]
pub struct ModelRow {
    pub name: String,
    pub accuracy: Option<f64>,
    pub ci95: Option<(f64, f64)>,
    /// Images the accuracy was measured on.
    pub images: Option<u64>,
    /// Split of an eval file, when it names one.
    pub split: Option<String>,
    pub majority_baseline: Option<f64>,
    pub weight_format: String,
    pub file_bytes: u64,
    pub params: usize,
    /// Epochs up to the saved (best) model, and the run's length.
    pub epochs: Option<usize>,
    pub run_epochs: Option<usize>,
    pub images_seen: Option<u64>,
    /// Training wall time up to the saved model.
    pub wall_seconds: Option<f64>,
    pub provenance: Provenance,
}

/// A training run: its log and its best model.
#[derive(Debug, Clone)]
pub struct RunData {
    pub name: String,
    pub log: Vec<LogRow>,
}

/// One line of the pruning plot: the rows of one prune run with one rate.
#[derive(Debug, Clone)]
pub struct PruneData {
    pub name: String,
    pub dir: PathBuf,
    pub rows: Vec<CurveRow>,
    /// `provenance.command` of the first fine-tuned step, when present.
    pub command: Option<String>,
}

/// Everything the report shows, read from disk.
#[derive(Debug, Clone)]
pub struct Report {
    pub title: String,
    pub rows: Vec<ModelRow>,
    pub runs: Vec<RunData>,
    pub prunes: Vec<PruneData>,
}

fn ci_from(accuracy: f64, images: u64) -> (f64, f64) {
    let correct = (accuracy * images as f64).round() as u64;
    wilson_interval(correct.min(images), images)
}

/// Size of the model's weight file and the architecture's trainable parameter count.
fn weights_and_params(dir: &Path, config: &ModelConfig) -> Result<(u64, usize)> {
    let weights = dir.join(&config.weights.file);
    let bytes = std::fs::metadata(&weights)
        .with_context(|| format!("{}", weights.display()))?
        .len();
    let shapes = zoo::weight_shapes(&config.spec).with_context(|| {
        format!(
            "{}: architecture",
            dir.join(model_dir::CONFIG_FILE).display()
        )
    })?;
    Ok((bytes, zoo::param_count(&shapes)))
}

fn read_run(name: &str, dir: &Path) -> Result<(ModelRow, RunData)> {
    let log = read_log(&dir.join("log.csv")).with_context(|| format!("run `{name}`"))?;
    let best = dir.join("best");
    let config = model_dir::read_config(&best).with_context(|| format!("run `{name}`"))?;
    let (file_bytes, params) = weights_and_params(&best, &config)?;
    let p = &config.provenance;
    let best_row = match p.epochs {
        Some(e) => log.iter().find(|r| r.epoch == e),
        None => log
            .iter()
            .filter(|r| r.val_accuracy.is_finite())
            .max_by(|a, b| a.val_accuracy.total_cmp(&b.val_accuracy)),
    };
    // A run that trained on its validation images (`--train-on-val`) has no held-out figure:
    // its logged validation accuracy must not reach the table, and its curves say so.
    let trained_on_val = trained_on_val(dir);
    let accuracy = if trained_on_val {
        None
    } else {
        p.val_accuracy.or(best_row.map(|r| r.val_accuracy))
    };
    let images = p.val_images.map(|n| n as u64);
    let row = ModelRow {
        name: name.to_string(),
        accuracy,
        ci95: accuracy.zip(images).map(|(a, n)| ci_from(a, n)),
        images,
        split: None,
        majority_baseline: None,
        weight_format: config.weights.format.to_string(),
        file_bytes,
        params,
        epochs: p.epochs.or(best_row.map(|r| r.epoch)),
        run_epochs: log.iter().map(|r| r.epoch).max(),
        images_seen: p.images_seen.or(best_row.map(|r| r.images_seen)),
        wall_seconds: best_row.map(|r| r.wall_seconds),
        provenance: p.clone(),
    };
    Ok((
        row,
        RunData {
            name: if trained_on_val {
                format!("{name} (validation trained on)")
            } else {
                name.to_string()
            },
            log,
        },
    ))
}

/// Whether the run in `dir` trained on its validation images (`train_on_val` in its
/// `run.json`); a run without that file (or an older one) did not.
fn trained_on_val(dir: &Path) -> bool {
    std::fs::read(dir.join("run.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["config"]["train_on_val"].as_bool())
        .unwrap_or(false)
}

fn read_model(input: &ModelInput) -> Result<ModelRow> {
    let name = &input.name;
    let config = model_dir::read_config(&input.dir).with_context(|| format!("model `{name}`"))?;
    let (file_bytes, params) = weights_and_params(&input.dir, &config)?;
    let p = &config.provenance;
    let eval = input
        .eval
        .as_deref()
        .map(read_eval)
        .transpose()
        .with_context(|| format!("model `{name}`"))?;
    let (accuracy, images, ci95, split) = match &eval {
        Some(e) => {
            let ci = e.ci95.or(e.images.map(|n| ci_from(e.accuracy, n)));
            (Some(e.accuracy), e.images, ci, e.split.clone())
        }
        None => {
            let images = p.val_images.map(|n| n as u64);
            let ci = p.val_accuracy.zip(images).map(|(a, n)| ci_from(a, n));
            (p.val_accuracy, images, ci, None)
        }
    };
    Ok(ModelRow {
        name: name.clone(),
        accuracy,
        ci95,
        images,
        split,
        majority_baseline: eval.as_ref().and_then(|e| e.majority_baseline),
        weight_format: config.weights.format.to_string(),
        file_bytes,
        params,
        epochs: p.epochs,
        run_epochs: None,
        images_seen: p.images_seen,
        wall_seconds: None,
        provenance: p.clone(),
    })
}

fn read_prune(name: &str, dir: &Path) -> Result<Vec<PruneData>> {
    let rows = read_curve(&dir.join("curve.csv")).with_context(|| format!("prune run `{name}`"))?;
    let command = model_dir::read_config(&dir.join("step1").join("best"))
        .ok()
        .and_then(|c| c.provenance.command);
    // One line per rate (a curve file holds one, but concatenated files hold several).
    let mut rates: Vec<f64> = Vec::new();
    for r in &rows {
        if !rates.contains(&r.rate) {
            rates.push(r.rate);
        }
    }
    Ok(rates
        .iter()
        .map(|&rate| {
            let mut mine: Vec<CurveRow> = rows.iter().filter(|r| r.rate == rate).cloned().collect();
            mine.sort_by_key(|r| r.step);
            PruneData {
                name: name.to_string(),
                dir: dir.to_path_buf(),
                rows: mine,
                command: command.clone(),
            }
        })
        .collect())
}

/// Reads every input; fails on the first bad one, naming it and its file.
pub fn collect(spec: &ReportSpec) -> Result<Report> {
    if spec.runs.is_empty() && spec.models.is_empty() && spec.prunes.is_empty() {
        bail!("nothing to report: give at least one --run, --model or --prune");
    }
    let mut names: Vec<&str> = Vec::new();
    let all = spec
        .runs
        .iter()
        .map(|(n, _)| n)
        .chain(spec.models.iter().map(|m| &m.name))
        .chain(spec.prunes.iter().map(|(n, _)| n));
    for n in all {
        if names.contains(&n.as_str()) {
            bail!("the name `{n}` is given twice");
        }
        names.push(n);
    }
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for (name, dir) in &spec.runs {
        let (row, run) = read_run(name, dir)?;
        rows.push(row);
        runs.push(run);
    }
    for m in &spec.models {
        rows.push(read_model(m)?);
    }
    let mut prunes = Vec::new();
    for (name, dir) in &spec.prunes {
        prunes.extend(read_prune(name, dir)?);
    }
    Ok(Report {
        title: spec.title.clone(),
        rows,
        runs,
        prunes,
    })
}

/// Renders the markdown and the plots in memory: (file name, bytes), results.md last.
pub fn render(report: &Report) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut plots = Vec::new();
    let mut add = |stem: &str, alt: String, chart: Option<plot::Chart>| -> Result<()> {
        if let Some(chart) = chart {
            files.push((
                format!("{stem}.svg"),
                plot::render_svg(&chart)?.into_bytes(),
            ));
            files.push((format!("{stem}.png"), plot::render_png(&chart)?));
            plots.push((stem.to_string(), alt));
        }
        Ok(())
    };
    add(
        ACCURACY_PLOT,
        "accuracy by epoch".into(),
        plot::accuracy_chart(report),
    )?;
    add(LOSS_PLOT, "loss by epoch".into(), plot::loss_chart(report))?;
    add(
        PRUNING_PLOT,
        "pruning curve".into(),
        plot::pruning_chart(report),
    )?;
    files.push((
        RESULTS_FILE.to_string(),
        markdown::render(report, &plots).into_bytes(),
    ));
    Ok(files)
}

/// Reads the inputs, renders everything, then writes the files into `spec.out` (each atomically).
/// Returns the written paths.
pub fn write(spec: &ReportSpec) -> Result<Vec<PathBuf>> {
    let report = collect(spec)?;
    let files = render(&report)?;
    std::fs::create_dir_all(&spec.out).with_context(|| format!("{}", spec.out.display()))?;
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = spec.out.join(name);
        model_dir::write_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
