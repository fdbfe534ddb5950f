//! `slimserve compare`: the same closed-loop load against each model in turn, then all of them
//! mixed, at each concurrency level; one table with size, accuracy, client-side throughput and
//! latency, and the server-side queue/compute split from `/metrics`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use super::prom::{self, Sample};
use super::{run, LoadShape, ModelFacts, Report, Target};
use crate::telemetry::{
    BATCH_COMPUTE_DURATION_SECONDS, BATCH_SIZE_INPUTS, BATCH_UPLOAD_DURATION_SECONDS,
    PREPROCESS_DURATION_SECONDS, QUEUE_WAIT_SECONDS,
};
use crate::thousands;

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub shape: LoadShape,

    /// Models to compare, comma-separated. Default: every model the server serves.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,

    /// Concurrency levels, comma-separated; every model runs at each.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<u32>,

    /// Leave out the mixed run (all models asked in turn under one load).
    #[arg(long)]
    pub no_mixed: bool,

    /// The server's Prometheus endpoint, read before and after each run for the server-side
    /// split. Other traffic to the same server during a run is counted too.
    #[arg(long, default_value = "http://127.0.0.1:8002/metrics")]
    pub metrics_url: String,

    /// Also write the table (markdown) to this file, atomically.
    #[arg(long)]
    pub markdown: Option<PathBuf>,

    /// Also write every row, with its full load report, as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Directory of `slimtrain eval --json` reports named `eval-<model>.json` (as in
    /// docs/results/food-photos): each model's row gets its accuracy on that split ("eval acc"
    /// column; "-" for a model without a report). The provenance's validation accuracy ("val
    /// acc") picks epochs and is optimistic; an eval on a held-out split is the figure to compare.
    #[arg(long, value_name = "DIR")]
    pub eval_dir: Option<PathBuf>,
}

/// A model's accuracy from a `slimtrain eval --json` report.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalFigure {
    pub accuracy: f64,
    pub split: String,
    pub images: u64,
}

/// Reads `dir/eval-<model>.json`: `None` when there is no such file, an error naming the file
/// when it is not an eval report.
pub fn read_eval(dir: &std::path::Path, model: &str) -> Result<Option<EvalFigure>> {
    let path = dir.join(format!("eval-{model}.json"));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("--eval-dir: reading {}", path.display())),
    };
    let figure: EvalFigure = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "--eval-dir: {} is not a `slimtrain eval --json` report (needs accuracy, split, images)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&figure.accuracy),
        "--eval-dir: {}: accuracy {} is not in [0, 1]",
        path.display(),
        figure.accuracy
    );
    Ok(Some(figure))
}

/// Server-side means over one run, from `/metrics` deltas.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerSplit {
    /// Inputs the server computed during the run.
    pub inputs: f64,
    pub preprocess_ms: f64,
    /// Mean wait in the model queue per input.
    pub queue_wait_ms: f64,
    /// Mean forward pass per batch.
    pub compute_ms_per_batch: f64,
    /// Mean time writing a batch's inputs into the model's buffer (a GPU's upload).
    pub upload_ms_per_batch: f64,
    /// Mean inputs per batch.
    pub batch_size: f64,
    /// Forward time per input (batch compute / batch size).
    pub compute_ms_per_input: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub parameters: Option<u64>,
    pub file_bytes: Option<u64>,
    pub weight_format: Option<String>,
    /// The engine computing the model (`fused`, `int8`, ...).
    pub engine: Option<String>,
    pub val_accuracy: Option<f64>,
    /// From `--eval-dir`.
    pub eval: Option<EvalFigure>,
    pub concurrency: u32,
    pub server: ServerSplit,
    pub load: Report,
}

fn split(before: &[Sample], after: &[Sample], models: &[ModelFacts]) -> ServerSplit {
    let delta = |name: &str| -> f64 {
        models
            .iter()
            .map(|m| {
                let with = [("model", m.name.as_str())];
                prom::sum(after, name, &with) - prom::sum(before, name, &with)
            })
            .sum()
    };
    let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
    let (q_sum, q_n) = (
        delta(&format!("{QUEUE_WAIT_SECONDS}_sum")),
        delta(&format!("{QUEUE_WAIT_SECONDS}_count")),
    );
    let (p_sum, p_n) = (
        delta(&format!("{PREPROCESS_DURATION_SECONDS}_sum")),
        delta(&format!("{PREPROCESS_DURATION_SECONDS}_count")),
    );
    let (c_sum, c_n) = (
        delta(&format!("{BATCH_COMPUTE_DURATION_SECONDS}_sum")),
        delta(&format!("{BATCH_COMPUTE_DURATION_SECONDS}_count")),
    );
    let (u_sum, u_n) = (
        delta(&format!("{BATCH_UPLOAD_DURATION_SECONDS}_sum")),
        delta(&format!("{BATCH_UPLOAD_DURATION_SECONDS}_count")),
    );
    let b_sum = delta(&format!("{BATCH_SIZE_INPUTS}_sum"));
    ServerSplit {
        inputs: b_sum,
        preprocess_ms: ratio(p_sum, p_n) * 1e3,
        queue_wait_ms: ratio(q_sum, q_n) * 1e3,
        compute_ms_per_batch: ratio(c_sum, c_n) * 1e3,
        upload_ms_per_batch: ratio(u_sum, u_n) * 1e3,
        batch_size: ratio(b_sum, c_n),
        compute_ms_per_input: ratio(c_sum, b_sum) * 1e3,
    }
}

/// Runs every (model or mixed, concurrency) cell and returns the rows in table order.
pub async fn compare(args: &CompareArgs) -> Result<Vec<Row>> {
    let target = Target::connect(&args.shape.addr, args.shape.connections).await?;
    let models = if args.models.is_empty() {
        target.models.clone()
    } else {
        target.resolve(&args.models)?
    };
    anyhow::ensure!(!models.is_empty(), "the server serves no models");
    // Read before any load runs, so that a bad report fails at once.
    let mut evals = std::collections::BTreeMap::new();
    if let Some(dir) = &args.eval_dir {
        anyhow::ensure!(
            dir.is_dir(),
            "--eval-dir {}: not a directory",
            dir.display()
        );
        for m in &models {
            evals.insert(m.name.clone(), read_eval(dir, &m.name)?);
        }
    }
    anyhow::ensure!(
        !args.concurrency.is_empty() && !args.concurrency.contains(&0),
        "--concurrency needs levels >= 1"
    );
    let mut groups: Vec<(String, Vec<ModelFacts>)> = models
        .iter()
        .map(|m| (m.name.clone(), vec![m.clone()]))
        .collect();
    if !args.no_mixed && models.len() > 1 {
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        groups.push((format!("mixed ({})", names.join("+")), models.clone()));
    }
    let mut rows = Vec::new();
    for &concurrency in &args.concurrency {
        for (label, group) in &groups {
            let shape = LoadShape {
                concurrency,
                ..args.shape.clone()
            };
            let before = prom::parse(
                &prom::fetch(&args.metrics_url)
                    .await
                    .context("--metrics-url")?,
            );
            let report = run(&target, &shape, group).await?;
            // The batcher answers before the metrics of the batch are recorded: give the
            // last batch's histogram updates a moment to land.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let after = prom::parse(
                &prom::fetch(&args.metrics_url)
                    .await
                    .context("--metrics-url")?,
            );
            let one = (group.len() == 1).then(|| &group[0]);
            eprintln!(
                "{label} @ concurrency {concurrency}: {:.1} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                report.throughput_rps, report.latency_ms.p50, report.latency_ms.p99, report.errors
            );
            rows.push(Row {
                model: label.clone(),
                parameters: one.map(|m| m.parameters),
                file_bytes: one.map(|m| m.file_bytes),
                weight_format: one.map(|m| m.weight_format.clone()),
                engine: one.map(|m| m.engine.clone()),
                val_accuracy: one.and_then(|m| m.val_accuracy),
                eval: one.and_then(|m| evals.get(&m.name).cloned().flatten()),
                concurrency,
                server: split(&before, &after, group),
                load: report,
            });
        }
    }
    if let Some(path) = &args.json {
        crate::formats::model_dir::write_atomic(path, &serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        crate::formats::model_dir::write_atomic(path, markdown(&rows).as_bytes())
            .with_context(|| format!("--markdown {}", path.display()))?;
    }
    Ok(rows)
}

/// The comparison as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut t = String::from(
        "| model | format | engine | params | file bytes | val acc | eval acc | concurrency | req/s | p50 ms | p99 ms | errors | queue wait ms | upload ms/batch | compute ms/batch | batch size | compute ms/input | p50 - upload - compute ms |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in rows {
        let s = &r.server;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} |",
            r.model,
            opt(r.weight_format.clone()),
            opt(r.engine.clone()),
            opt(r.parameters.map(thousands)),
            opt(r.file_bytes.map(thousands)),
            opt(r.val_accuracy.map(|a| format!("{a:.3}"))),
            opt(r
                .eval
                .as_ref()
                .map(|e| format!("{:.3} ({} {})", e.accuracy, e.split, e.images))),
            r.concurrency,
            r.load.throughput_rps,
            r.load.latency_ms.p50,
            r.load.latency_ms.p99,
            r.load.errors,
            s.queue_wait_ms,
            s.upload_ms_per_batch,
            s.compute_ms_per_batch,
            s.batch_size,
            s.compute_ms_per_input,
            r.load.latency_ms.p50 - s.upload_ms_per_batch - s.compute_ms_per_batch,
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_from_deltas() {
        let m = |name: &str| ModelFacts {
            name: name.into(),
            input_size: 8,
            parameters: 1,
            file_bytes: 1,
            val_accuracy: None,
            weight_format: "f32".into(),
            architecture: "student".into(),
            engine: "fused".into(),
        };
        let before = prom::parse(
            "slimserve_queue_wait_seconds_sum{model=\"a\"} 1\n\
             slimserve_queue_wait_seconds_count{model=\"a\"} 10\n",
        );
        let after = prom::parse(
            "slimserve_queue_wait_seconds_sum{model=\"a\"} 1.5\n\
             slimserve_queue_wait_seconds_count{model=\"a\"} 20\n\
             slimserve_queue_wait_seconds_sum{model=\"b\"} 9\n\
             slimserve_queue_wait_seconds_count{model=\"b\"} 9\n\
             slimserve_batch_compute_duration_seconds_sum{model=\"a\"} 0.2\n\
             slimserve_batch_compute_duration_seconds_count{model=\"a\"} 4\n\
             slimserve_batch_size_inputs_sum{model=\"a\"} 10\n",
        );
        let s = split(&before, &after, &[m("a")]);
        assert!((s.queue_wait_ms - 50.0).abs() < 1e-9, "{s:?}");
        assert!((s.compute_ms_per_batch - 50.0).abs() < 1e-9);
        assert!((s.batch_size - 2.5).abs() < 1e-9);
        assert!((s.compute_ms_per_input - 20.0).abs() < 1e-9);
        assert_eq!(s.inputs, 10.0);
        // both models: b's queue samples count too
        let both = split(&before, &after, &[m("a"), m("b")]);
        assert!((both.queue_wait_ms - 9.5 / 19.0 * 1e3).abs() < 1e-9);
    }
}
