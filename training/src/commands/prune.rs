//! `prune`: iterative channel pruning with fine-tuning after every step.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use slimserve::formats::model_dir::{self, Provenance};

use super::train::FitArgs;
use slimtrain::data;
use slimtrain::prune::{prune, widths_at};
use slimtrain::train::{self, Objective};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trained student or student-deeper model directory to prune.
    #[arg(long)]
    model: PathBuf,
    /// width_mult is multiplied by this at every step (the study: 0.95 and 0.90).
    #[arg(long, default_value_t = 0.95)]
    rate: f64,
    /// Number of prune + fine-tune steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Distil from this teacher while fine-tuning (default: cross-entropy only, as the study).
    #[arg(long)]
    teacher: Option<PathBuf>,
    #[arg(long, default_value_t = 20.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// --epochs is the fine-tuning length of each step (the study: 5).
    #[command(flatten)]
    fit: FitArgs,
}

pub fn run(args: Args) -> Result<()> {
    if !(0.0 < args.rate && args.rate < 1.0) {
        bail!("--rate must be in (0, 1), got {}", args.rate);
    }
    let fit = &args.fit;
    let device = train::parse_device(&fit.device)?;
    let data = data::open(&fit.data, fit.seed)?;
    let (start, _) = train::load_model(&args.model, &device)?;
    if start.config.labels != data.classes {
        bail!(
            "{} was trained on other classes than {}",
            args.model.display(),
            fit.data.display()
        );
    }
    let objective = match &args.teacher {
        Some(t) => Objective::Distill {
            teacher: Box::new(train::load_model(t, &device)?.1),
            teacher_dir: t.display().to_string(),
            temperature: args.temperature,
            alpha: args.alpha,
        },
        None => Objective::CrossEntropy,
    };
    std::fs::create_dir_all(&fit.out)?;
    let curve_path = fit.out.join("curve.csv");
    let mut curve = String::from("step,rate,width_mult,params,val_accuracy,weight_bytes\n");
    let first = train::evaluate(
        &start.build(&device)?,
        &data.val,
        data.num_classes(),
        64,
        &device,
    )?;
    let mut row = |step: usize, mult: f64, loaded: &model_dir::LoadedModel, acc: f64| {
        let line = format!(
            "{step},{},{mult:.6},{},{acc:.6},{}\n",
            args.rate,
            loaded.param_count(),
            loaded.file_bytes
        );
        eprint!("pruning curve: {line}");
        curve.push_str(&line);
    };
    row(0, 1.0, &start, first.confusion.accuracy());

    let mut current = start;
    let mut mult = 1.0;
    for step in 1..=args.steps {
        mult *= args.rate;
        let widths = widths_at(current.config.spec.arch, mult)?;
        let (spec, tensors) = prune(&current.config.spec, &current.tensors, &widths)?;
        let out = fit.out.join(format!("step{step}"));
        let provenance = Provenance {
            source: Some(current.dir.display().to_string()),
            command: Some(super::command_line()),
            notes: Some(format!(
                "pruned to width_mult {mult:.4} (rate {})",
                args.rate
            )),
            ..Default::default()
        };
        // A fresh optimizer every step: the reference code's single optimizer never fine-tuned.
        let resume = out.join("run.json").exists();
        train::fit(
            &out,
            &spec,
            &data,
            &objective,
            &fit.config(),
            resume,
            Some(&tensors),
            provenance,
            &device,
        )?;
        current = model_dir::load(&out.join("best"))?;
        let acc = current.config.provenance.val_accuracy.unwrap_or(0.0);
        row(step, mult, &current, acc);
    }
    let mut f = tempfile::NamedTempFile::new_in(&fit.out)?;
    f.write_all(curve.as_bytes())?;
    f.persist(&curve_path)?;
    println!("pruning curve written to {}", curve_path.display());
    Ok(())
}
