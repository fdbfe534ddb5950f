//! `report`: the results table (markdown) and plots (SVG + PNG) of training, pruning and model
//! directories.

use std::path::PathBuf;

use anyhow::Result;

use slimtrain::report::{self, ModelInput, ReportSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory: results.md and the plots (each as .svg and .png).
    #[arg(long)]
    out: PathBuf,
    /// Title of results.md and the plots.
    #[arg(long, default_value = "Results")]
    title: String,
    /// A `train`/`distill` run directory (log.csv + best/), as NAME=DIR; repeatable.
    #[arg(long = "run", value_name = "NAME=DIR", value_parser = report::parse_named)]
    runs: Vec<(String, PathBuf)>,
    /// A model directory, optionally with `slimtrain eval --json` output, as
    /// NAME=DIR[:EVAL_JSON]; repeatable.
    #[arg(long = "model", value_name = "NAME=DIR[:EVAL_JSON]", value_parser = report::parse_model)]
    models: Vec<ModelInput>,
    /// A `prune` run directory (curve.csv), as NAME=DIR; repeatable.
    #[arg(long = "prune", value_name = "NAME=DIR", value_parser = report::parse_named)]
    prunes: Vec<(String, PathBuf)>,
}

pub fn run(args: Args) -> Result<()> {
    let spec = ReportSpec {
        out: args.out,
        title: args.title,
        runs: args.runs,
        models: args.models,
        prunes: args.prunes,
    };
    for path in report::write(&spec)? {
        println!("{}", path.display());
    }
    Ok(())
}
