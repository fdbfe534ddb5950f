use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use slimserve::formats::{model_dir, onnx};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + weights); quantized weights are dequantized first.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the .onnx file (written atomically).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = model_dir::load(&args.model)?;
    let model = loaded.build(&Device::Cpu)?;
    let bytes =
        onnx::export(&model).with_context(|| format!("exporting {}", args.model.display()))?;
    model_dir::write_atomic(&args.out, &bytes)?;
    println!(
        "wrote {} ({} bytes, {} {}x{}, opset {}, input `{}` [N,3,{},{}], output `{}` [N,{}])",
        args.out.display(),
        bytes.len(),
        loaded.config.spec.arch,
        loaded.config.spec.input_size,
        loaded.config.spec.input_size,
        onnx::OPSET_VERSION,
        onnx::INPUT_NAME,
        loaded.config.spec.input_size,
        loaded.config.spec.input_size,
        onnx::OUTPUT_NAME,
        loaded.config.spec.num_classes
    );
    Ok(())
}
