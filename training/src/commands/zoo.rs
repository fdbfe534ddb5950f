use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;
use slimserve::formats::weights::{self, WeightFormat};
use slimserve::zoo::{self, Arch, Model, ModelSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Square input size the MACs (and big/std-conv's classifier width) are computed for.
    #[arg(long, default_value_t = 256, env = "SLIMTRAIN_INPUT_SIZE")]
    input_size: usize,
    /// Number of classes of the classifier head.
    #[arg(long, default_value_t = 11)]
    classes: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    name: &'static str,
    params: usize,
    f32_bytes: u64,
    uint8_bytes: u64,
    macs: u64,
    input_size: usize,
    classes: usize,
}

pub fn run(args: Args) -> Result<()> {
    let mut rows = Vec::new();
    for arch in Arch::ALL {
        let spec = ModelSpec::new(arch, args.classes, args.input_size);
        let (varmap, model) = Model::init(&spec, &Device::Cpu)?;
        let tensors: BTreeMap<String, Tensor> = zoo::varmap_tensors(&varmap);
        let shapes = zoo::weight_shapes(&spec)?;
        rows.push(Row {
            name: arch.name(),
            params: zoo::param_count(&shapes),
            f32_bytes: weights::encode(&tensors, WeightFormat::F32)?.len() as u64,
            uint8_bytes: weights::encode(&tensors, WeightFormat::Uint8)?.len() as u64,
            macs: model.macs(),
            input_size: args.input_size,
            classes: args.classes,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>14}",
        "name",
        "params",
        "f32 bytes",
        "uint8 bytes",
        format!("M MAC @{}", args.input_size)
    );
    for r in rows {
        println!(
            "{:<16} {:>12} {:>12} {:>12} {:>14.1}",
            r.name,
            r.params,
            r.f32_bytes,
            r.uint8_bytes,
            r.macs as f64 / 1e6
        );
    }
    Ok(())
}
