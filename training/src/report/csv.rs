//! The two CSV files the report reads: a run's `log.csv` and a prune run's `curve.csv`.
//! Columns are found by header name; every error names the file and the line.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

pub const LOG_COLUMNS: [&str; 9] = [
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "images_per_s",
    "images_seen",
    "wall_seconds",
    "lr",
];

pub const CURVE_COLUMNS: [&str; 6] = [
    "step",
    "rate",
    "width_mult",
    "params",
    "val_accuracy",
    "weight_bytes",
];

/// One epoch of `log.csv`. Losses and accuracies may be NaN (an epoch without training steps).
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub images_seen: u64,
    pub wall_seconds: f64,
}

/// One step of `curve.csv` (step 0 is the unpruned model).
#[derive(Debug, Clone, PartialEq)]
pub struct CurveRow {
    pub step: usize,
    pub rate: f64,
    pub width_mult: f64,
    pub params: u64,
    pub val_accuracy: f64,
    pub weight_bytes: u64,
}

struct Table {
    path: PathBuf,
    /// Index of each requested column in a row.
    index: Vec<usize>,
    width: usize,
    /// (1-based line number, fields)
    rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    fn read(path: &Path, columns: &[&str]) -> Result<Table> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let Some((_, header)) = lines.next() else {
            bail!("{}: empty file, expected a header line", path.display());
        };
        let header: Vec<&str> = header.split(',').map(str::trim).collect();
        let index = columns
            .iter()
            .map(|c| {
                header.iter().position(|h| h == c).with_context(|| {
                    format!(
                        "{}: header has no column `{c}` (expected {})",
                        path.display(),
                        columns.join(",")
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<(usize, Vec<String>)> = lines
            .map(|(n, l)| (n, l.split(',').map(|f| f.trim().to_string()).collect()))
            .collect();
        let width = header.len();
        for (n, fields) in &rows {
            if fields.len() != width {
                bail!(
                    "{}: line {n}: {} fields, the header has {width}",
                    path.display(),
                    fields.len()
                );
            }
        }
        if rows.is_empty() {
            bail!("{}: no data rows", path.display());
        }
        Ok(Table {
            path: path.to_path_buf(),
            index,
            width,
            rows,
        })
    }

    /// Field `col` (an index into the requested columns) of data row `row`.
    fn get<T: FromStr>(&self, row: usize, col: usize, name: &str) -> Result<T> {
        let (line, fields) = &self.rows[row];
        debug_assert_eq!(fields.len(), self.width);
        let raw = &fields[self.index[col]];
        raw.parse().ok().with_context(|| {
            format!(
                "{}: line {line}: column `{name}`: cannot parse `{raw}`",
                self.path.display()
            )
        })
    }
}

/// Reads a run's `log.csv` (as `slimtrain train` writes it).
pub fn read_log(path: &Path) -> Result<Vec<LogRow>> {
    let t = Table::read(path, &LOG_COLUMNS)?;
    let c = LOG_COLUMNS;
    (0..t.rows.len())
        .map(|i| {
            Ok(LogRow {
                epoch: t.get(i, 0, c[0])?,
                train_loss: t.get(i, 1, c[1])?,
                train_accuracy: t.get(i, 2, c[2])?,
                val_loss: t.get(i, 3, c[3])?,
                val_accuracy: t.get(i, 4, c[4])?,
                images_seen: t.get(i, 6, c[6])?,
                wall_seconds: t.get(i, 7, c[7])?,
            })
        })
        .collect()
}

/// Reads a prune run's `curve.csv` (as `slimtrain prune` writes it).
pub fn read_curve(path: &Path) -> Result<Vec<CurveRow>> {
    let t = Table::read(path, &CURVE_COLUMNS)?;
    let c = CURVE_COLUMNS;
    (0..t.rows.len())
        .map(|i| {
            Ok(CurveRow {
                step: t.get(i, 0, c[0])?,
                rate: t.get(i, 1, c[1])?,
                width_mult: t.get(i, 2, c[2])?,
                params: t.get(i, 3, c[3])?,
                val_accuracy: t.get(i, 4, c[4])?,
                weight_bytes: t.get(i, 5, c[5])?,
            })
        })
        .collect()
}
