//! `results.md`: the results table, the pruning tables, the plots and the commands.

use std::fmt::Write;

use super::{ModelRow, PruneData, Report};

const NONE: &str = "–";

pub use slimserve::thousands;

/// Seconds as `12.3 s`, `4m 05s` or `2h 03m`.
pub fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return NONE.into();
    }
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let total = s.round() as u64;
    let (h, m, sec) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m")
    } else {
        format!("{m}m {sec:02}s")
    }
}

/// A table cell: no pipes or line breaks.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn accuracy_cell(r: &ModelRow) -> String {
    let Some(a) = r.accuracy else {
        return NONE.into();
    };
    let mut s = format!("{a:.4}");
    if let Some((lo, hi)) = r.ci95 {
        write!(s, " [{lo:.4}, {hi:.4}]").unwrap();
    }
    if let Some(split) = r
        .split
        .as_deref()
        .filter(|s| *s != "val" && *s != "validation")
    {
        write!(s, " ({})", cell(split)).unwrap();
    }
    s
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| NONE.into())
}

fn models_table(out: &mut String, rows: &[ModelRow]) {
    out.push_str(
        "| model | val acc [95% CI] | images | weights | file size (B) | params | epochs | images seen | wall time |\n\
         |---|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let epochs = match (r.epochs, r.run_epochs) {
            (Some(e), Some(n)) if n != e => format!("{e} of {n}"),
            (e, _) => opt(e, |e| e.to_string()),
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&r.name),
            accuracy_cell(r),
            opt(r.images, thousands),
            cell(&r.weight_format),
            thousands(r.file_bytes),
            thousands(r.params as u64),
            epochs,
            opt(r.images_seen, thousands),
            opt(r.wall_seconds, duration),
        )
        .unwrap();
    }
    out.push_str(
        "\nval acc: top-1 accuracy on the validation split recorded in the model's provenance, or \
         from the `slimtrain eval --json` file given with `--model` (its split in parentheses when \
         not `val`); the interval is the Wilson score interval over `images`. epochs, images seen \
         and wall time count up to the saved epoch (the best on validation; the last for a run \
         trained on its validation images, whose accuracy shows as –); `E of N`: the run went on \
         to epoch N. params: trainable parameters (BatchNorm running statistics excluded).\n",
    );
    let baselines: Vec<(&str, f64, Option<u64>)> = rows
        .iter()
        .filter_map(|r| r.majority_baseline.map(|b| (r.name.as_str(), b, r.images)))
        .collect();
    if let Some(&(_, first, _)) = baselines.first() {
        if baselines.iter().all(|&(_, b, _)| (b - first).abs() < 1e-12) {
            let names: Vec<&str> = baselines.iter().map(|&(n, _, _)| n).collect();
            writeln!(
                out,
                "\nMajority-class baseline (always predicting the most frequent class): **{first:.4}** \
                 (from the eval of {}).",
                names.join(", ")
            )
            .unwrap();
        } else {
            out.push_str(
                "\nMajority-class baseline (always predicting the most frequent class), per eval:\n\n",
            );
            for (name, b, images) in &baselines {
                writeln!(
                    out,
                    "- {name}: **{b:.4}** ({} images)",
                    opt(*images, thousands)
                )
                .unwrap();
            }
        }
    }
}

fn prune_table(out: &mut String, p: &PruneData) {
    let rate = p.rows.first().map(|r| r.rate).unwrap_or(f64::NAN);
    writeln!(out, "\n### {} (rate {rate})\n", cell(&p.name)).unwrap();
    writeln!(out, "From `{}`.\n", p.dir.join("curve.csv").display()).unwrap();
    out.push_str(
        "| step | rate | width_mult | params | params kept | val acc | weight file (B) |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let base = p.rows.first().map(|r| r.params).filter(|&n| n > 0);
    for r in &p.rows {
        let kept = opt(base, |b| {
            format!("{:.1}%", 100.0 * r.params as f64 / b as f64)
        });
        writeln!(
            out,
            "| {} | {} | {:.4} | {} | {} | {:.4} | {} |",
            r.step,
            r.rate,
            r.width_mult,
            thousands(r.params),
            kept,
            r.val_accuracy,
            thousands(r.weight_bytes)
        )
        .unwrap();
    }
}

fn fenced(out: &mut String, text: &str) {
    let fence = if text.contains("```") { "~~~" } else { "```" };
    writeln!(out, "{fence}sh\n{text}\n{fence}").unwrap();
}

/// The whole file; `plots` are (file stem, alt text) of the plots written beside it.
pub fn render(report: &Report, plots: &[(String, String)]) -> String {
    let mut out = String::new();
    writeln!(out, "# {}\n", report.title.trim()).unwrap();
    out.push_str("Written by `slimtrain report`.\n");
    if !report.rows.is_empty() {
        out.push_str("\n## Models\n\n");
        models_table(&mut out, &report.rows);
    }
    let images = |out: &mut String, stems: &[&str]| {
        for (stem, alt) in plots.iter().filter(|(s, _)| stems.contains(&s.as_str())) {
            writeln!(out, "\n![{alt}]({stem}.svg)").unwrap();
        }
    };
    if !report.runs.is_empty() {
        out.push_str(
            "\n## Training curves\n\nValidation solid, training dashed, one colour per run \
             (each plot is also written as PNG beside the SVG).\n",
        );
        images(&mut out, &[super::ACCURACY_PLOT, super::LOSS_PLOT]);
    }
    if !report.prunes.is_empty() {
        out.push_str("\n## Pruning\n");
        images(&mut out, &[super::PRUNING_PLOT]);
        for p in &report.prunes {
            prune_table(&mut out, p);
        }
    }
    let commands: Vec<(&str, &str, String)> = report
        .rows
        .iter()
        .filter_map(|r| {
            let p = &r.provenance;
            let mut about = Vec::new();
            if let Some(d) = &p.dataset {
                about.push(format!("dataset `{d}`"));
            }
            if let Some(t) = &p.teacher {
                about.push(format!("teacher `{t}`"));
            }
            if let Some(s) = &p.source {
                about.push(format!("from `{s}`"));
            }
            p.command
                .as_deref()
                .map(|c| (r.name.as_str(), c, about.join(", ")))
        })
        .chain(report.prunes.iter().filter_map(|p| {
            p.command
                .as_deref()
                .map(|c| (p.name.as_str(), c, String::new()))
        }))
        .collect();
    if !commands.is_empty() {
        out.push_str("\n## Commands\n\nAs recorded in each model's provenance.\n");
        for (name, command, about) in commands {
            if about.is_empty() {
                writeln!(out, "\n**{name}**:\n").unwrap();
            } else {
                writeln!(out, "\n**{name}** ({about}):\n").unwrap();
            }
            fenced(&mut out, command);
        }
    }
    out
}
