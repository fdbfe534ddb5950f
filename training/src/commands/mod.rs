//! One module per `slimtrain` subcommand; each has an `Args` (clap) and a `run`.

pub mod bench;
pub mod data;
pub mod eval;
pub mod export;
pub mod import;
pub mod prune;
pub mod quantize;
pub mod report;
pub mod train;
pub mod zoo;

use std::path::PathBuf;

/// The command line, recorded in model provenance as a user would type it: the program is
/// named `slimtrain`, not by the path it was started from (no machine's paths in model files).
pub fn command_line() -> String {
    std::iter::once("slimtrain".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `--labels`: a comma-separated list, or `@FILE` with one label per line.
pub fn parse_labels(spec: &str) -> anyhow::Result<Vec<String>> {
    let labels: Vec<String> = if let Some(file) = spec.strip_prefix('@') {
        let path = PathBuf::from(file);
        std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    } else {
        spec.split(',').map(|s| s.trim().to_string()).collect()
    };
    if labels.iter().any(String::is_empty) {
        anyhow::bail!("--labels: empty label in `{spec}`");
    }
    Ok(labels)
}
