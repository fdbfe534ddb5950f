//! Inference speed: candle's eval forward and the server's fused engine (`slimserve::infer`) vs
//! ONNX Runtime on the same weights with the same thread count, plus an sgemm microbenchmark
//! in the same run as the compute ceiling. With `--uint8`, each model is also measured after a
//! round trip through the uint8 per-tensor format (the weights the server dequantizes at load).
//!
//! ONNX Runtime runs in a Python child process (`onnxruntime` from PyPI) on the model exported by
//! `slimserve::formats::onnx`, so both sides compute the same function from the same weights.
//! It stays loaded while the fused engine and ONNX Runtime take turns in short windows
//! (`--rounds`), and each side reports its median window: on a shared machine whose speed
//! drifts, back-to-back runs of a few seconds each gave ratios from 0.6 to 1.1 for the same
//! code. Each round's fused window over the ONNX Runtime window right after it is a paired
//! ratio; their median and quartiles are printed beside the ratio of the medians (adjacent
//! windows share the machine's phase; the quartiles show how far one run can be trusted).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, ModuleT, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;

use slimserve::formats::onnx;
use slimserve::formats::weights::{self, WeightFormat};
use slimserve::infer::qmodel::Int8Model;
use slimserve::infer::FastModel;
use slimserve::zoo::{Arch, Model, ModelSpec};

/// The ONNX Runtime driver, embedded so the binary works from any directory.
const ORT_SCRIPT: &str = include_str!("../../../tests/python/ort_run.py");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architectures to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    arch: Vec<Arch>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    batch: Vec<usize>,
    /// Square input size.
    #[arg(long, default_value_t = 256)]
    input_size: usize,
    /// Threads for both candle (rayon) and ONNX Runtime (intra-op).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds of measurement per (architecture, batch, runtime), after a warm-up run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// The fused engine and ONNX Runtime are measured in this many alternating windows
    /// (seconds / rounds each) and each reports its median window, so a slow phase of a
    /// shared machine hits both sides alike; each round's fused / ONNX Runtime ratio is
    /// also summarised (median and quartiles: more rounds, tighter quartiles).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Python with onnxruntime and numpy (default: $SLIMSERVE_PYTHON, ./.venv/bin/python, python3).
    #[arg(long, env = "SLIMSERVE_PYTHON")]
    python: Option<PathBuf>,
    /// Also measure every model after a uint8 per-tensor round trip of its weights.
    #[arg(long)]
    uint8: bool,
    /// Also measure the int8 engine (rows with weights `int8`) for the architectures it
    /// compiles, against ONNX Runtime running the model quantized by its own tools
    /// (`quantize_static`: QDQ, u8 activations, s8 per-channel weights), both calibrated on
    /// the same images.
    #[arg(long)]
    int8: bool,
    /// Print the fused engine's time per layer (one image: split across threads as batch 1
    /// runs, and on one thread as each image of a large batch runs) and exit.
    #[arg(long)]
    profile: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    arch: &'static str,
    /// `f32`, `uint8` for weights after a uint8 per-tensor round trip, or `int8`: the int8
    /// engine (in `fused_images_per_s`) against ONNX Runtime's int8 model (in
    /// `ort_images_per_s`); candle runs the f32 weights.
    weights: &'static str,
    batch: usize,
    input_size: usize,
    threads: usize,
    macs_per_image: u64,
    candle_images_per_s: f64,
    /// The server's fused engine; absent for architectures it does not compile.
    fused_images_per_s: Option<f64>,
    ort_images_per_s: f64,
    /// Fastest of candle and fused, over ONNX Runtime.
    ratio: f64,
    /// The fused engine's window over the ONNX Runtime window right after it, per round:
    /// median and quartiles (absent without a fused engine). Adjacent windows share the
    /// machine's phase, so on a machine whose speed drifts this is steadier than `ratio`.
    paired_ratio: Option<Quartiles>,
    /// Fastest path's GFLOP/s (2 FLOP per MAC) as a share of the sgemm peak of this run.
    peak_fraction: f64,
}

#[derive(Serialize)]
struct Output {
    /// The fused engine's instruction set, and what the CPU reports.
    instruction_set: String,
    sgemm_peak_gflops: f64,
    rows: Vec<Row>,
}

/// The best sgemm rate over a few square sizes (gemm crate, `threads` threads), in GFLOP/s.
fn sgemm_peak(threads: usize, seconds: f64) -> f64 {
    let mut best = 0f64;
    for n in [256usize, 512, 1024] {
        let a = vec![1.0f32; n * n];
        let b = vec![0.5f32; n * n];
        let mut c = vec![0f32; n * n];
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let mut run = || unsafe {
            // SAFETY: three dense row-major n x n matrices.
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        };
        run();
        let budget = Duration::from_secs_f64(seconds / 3.0);
        let start = Instant::now();
        let mut iters = 0u32;
        while iters < 3 || start.elapsed() < budget {
            run();
            iters += 1;
        }
        let flops = 2.0 * (n * n * n) as f64 * iters as f64;
        best = best.max(flops / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// The server's CPU engines.
#[derive(Clone, Copy)]
enum Engine<'a> {
    Fused(&'a FastModel),
    Int8(&'a Int8Model),
}

impl Engine<'_> {
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self {
            Engine::Fused(m) => m.forward(x, n),
            Engine::Int8(m) => m.forward(x, n),
        }
    }
}

/// `n` images `[n, 3, size, size]` with a fixed pseudo-random N(0, 1)-like content.
fn synthetic_images(n: usize, size: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n * 3 * size * size)
        .map(|_| {
            // Sum of four uniforms: mean 0, variance 1/3 * 4 / 4 ~ close enough to N(0, 1/3).
            (0..4)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .sum::<f32>()
                * 1.7
        })
        .collect()
}

fn fused_images_per_s(model: Engine<'_>, batch: usize, size: usize, seconds: f64) -> f64 {
    let x: Vec<f32> = (0..batch * 3 * size * size)
        .map(|i| (i % 251) as f32 / 251.0)
        .collect();
    std::hint::black_box(model.forward(&x, batch));
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut iters = 0usize;
    while iters < 2 || start.elapsed() < budget {
        std::hint::black_box(model.forward(&x, batch));
        iters += 1;
    }
    (iters * batch) as f64 / start.elapsed().as_secs_f64()
}

fn profile(archs: &[Arch], args: &Args, py: &Path, script: &Path, tmp: &Path) -> Result<()> {
    println!("fused engine: {}", slimserve::simd::describe());
    for &arch in archs {
        let spec = ModelSpec::new(arch, 11, args.input_size);
        let (_, model) = Model::init(&spec, &Device::Cpu)?;
        let Ok(fast) = FastModel::compile(&model) else {
            println!("{arch}: no fused form");
            continue;
        };
        let x: Vec<f32> = (0..3 * args.input_size * args.input_size)
            .map(|i| (i % 251) as f32 / 251.0)
            .collect();
        if args.int8 {
            let ranges = fast.calibrate(&x, 1);
            let q = Int8Model::compile(&model, &ranges)?;
            let f32_single = fast.profile(&x, false, 20);
            let int8 = q.profile(&x, 20);
            println!(
                "\n{arch} ({}x{}) int8 engine ({}), ms per layer on one thread, median of 20:\n| layer | ms |\n|---|---|",
                args.input_size,
                args.input_size,
                q.isa().name()
            );
            for (name, ms) in &int8 {
                println!("| {name} | {ms:.3} |");
            }
            println!(
                "| f32 engine, whole image, one thread | {:.3} |",
                f32_single.last().map(|t| t.1).unwrap_or(0.0)
            );
            continue;
        }
        let split = fast.profile(&x, true, 100);
        let single = fast.profile(&x, false, 100);
        let layers = split.len() - 1;
        let onnx_path = tmp.join(format!("{arch}.onnx"));
        std::fs::write(&onnx_path, onnx::export(&model)?)?;
        let ort = ort_profile(py, script, &onnx_path, args.threads)?;
        let by_layer = ort_layers(&ort.nodes, layers);
        println!(
            "\n{arch} ({}x{}), ms per layer, median of 100 after 0.5 s warm-up; ONNX Runtime {} \
             (its profiler, batch 1, {} threads; its nodes grouped by the layer they compute):\n\
             | layer | {} threads (batch 1) | 1 thread | ONNX Runtime, {} threads | fused / ORT | \
             share of the layers' sum: fused | ORT |\n|---|---|---|---|---|---|---|",
            args.input_size,
            args.input_size,
            ort.onnxruntime,
            args.threads,
            args.threads,
            args.threads
        );
        let (ta, tb): (f64, f64) = (
            split[..layers].iter().map(|t| t.1).sum(),
            single[..layers].iter().map(|t| t.1).sum(),
        );
        let to: f64 = by_layer.layers.iter().sum();
        for (((name, a), (_, b)), o) in split.iter().zip(&single).zip(&by_layer.layers) {
            println!(
                "| {name} | {a:.3} | {b:.3} | {o:.3} | {:.2} | {:.1}% | {:.1}% |",
                a / o,
                100.0 * a / ta,
                100.0 * o / to
            );
        }
        println!(
            "| sum of the layers | {ta:.3} | {tb:.3} | {to:.3} | {:.2} | | |",
            ta / to
        );
        println!(
            "| head and other nodes ({}) | | | {:.3} | | | |",
            by_layer.other_names.join(", "),
            by_layer.other
        );
        println!(
            "| whole image (fused: layers untimed; ORT: model_run) | {:.3} | {:.3} | {:.3} | {:.2} | | |",
            split[layers].1,
            single[layers].1,
            ort.run_ms,
            split[layers].1 / ort.run_ms
        );
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct OrtProfile {
    run_ms: f64,
    nodes: Vec<OrtNode>,
    onnxruntime: String,
}

#[derive(serde::Deserialize)]
struct OrtNode {
    name: String,
    op: String,
    ms: f64,
}

/// ONNX Runtime's profiler on `model` at batch 1 (`ort_run.py profile`): median time per node.
fn ort_profile(py: &Path, script: &Path, model: &Path, threads: usize) -> Result<OrtProfile> {
    let out = Command::new(py)
        .arg(script)
        .arg("profile")
        .arg("--model")
        .arg(model)
        .args(["--batch", "1", "--threads", &threads.to_string()])
        .args(["--iterations", "100"])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} (ONNX Runtime's profiler)", py.display()))?;
    if !out.status.success() {
        bail!(
            "ONNX Runtime's profiler exited ({}); its error is printed above",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .with_context(|| format!("unexpected output from ONNX Runtime's profiler: {text}"))
}

/// ONNX Runtime's node times summed per fused-engine layer.
struct OrtLayers {
    layers: Vec<f64>,
    /// Nodes of no layer: the head, and layout reorders ORT inserts.
    other: f64,
    other_names: Vec<String>,
}

/// Groups ONNX Runtime's nodes by the engine layer they belong to, from the exported names
/// (`slimserve::formats::onnx`): the plain CNNs' block k is `cnn.{4k..4k+3}`, the separable
/// nets' layer i is `cnn.{i}.*` (the stem is `cnn.0`), MobileNetV2's is `features.{i}.*`. ORT
/// keeps the first node's name on a fused node (a conv with its BatchNorm and activation).
fn ort_layers(nodes: &[OrtNode], layers: usize) -> OrtLayers {
    let mut out = OrtLayers {
        layers: vec![0.0; layers],
        other: 0.0,
        other_names: Vec::new(),
    };
    for node in nodes {
        let index = layer_index(&node.name).filter(|&i| i < layers);
        match index {
            Some(i) => out.layers[i] += node.ms,
            None => {
                out.other += node.ms;
                out.other_names.push(format!("{} {}", node.op, node.name));
            }
        }
    }
    out
}

fn layer_index(name: &str) -> Option<usize> {
    // The number after `prefix`, and what follows it.
    let number = |prefix: &str| -> Option<(usize, &str)> {
        let rest = name.strip_prefix(prefix)?;
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        Some((rest[..end].parse().ok()?, &rest[end..]))
    };
    if let Some((i, _)) = number("features.") {
        return Some(i);
    }
    let (i, tail) = number("cnn.")?;
    // Plain CNNs name nodes `cnn.N` (four per block), the separable ones `cnn.N.M`; ORT's
    // layout pass renames some to `<name>.out_nchwc`.
    let separable = tail
        .strip_prefix('.')
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    Some(if separable { i } else { i / 4 })
}

/// Calibration images for the int8 rows (both engines calibrate on these).
const CALIBRATION_IMAGES: usize = 8;

/// The int8 engine for `model` (calibrated on synthetic images by the f32 engine) and the ONNX
/// model ONNX Runtime's `quantize_static` makes from the same weights and images; `None` when
/// the architecture has no int8 form.
fn int8_engine(
    model: &Model,
    fast: &FastModel,
    onnx_path: &Path,
    py: &Path,
    script: &Path,
    args: &Args,
) -> Result<Option<(Int8Model, PathBuf)>> {
    let s = args.input_size;
    let images = synthetic_images(CALIBRATION_IMAGES, s, 3);
    let ranges = fast.calibrate(&images, CALIBRATION_IMAGES);
    let Ok(q) = Int8Model::compile(model, &ranges) else {
        return Ok(None);
    };
    let calib = onnx_path.with_extension("calib.f32");
    std::fs::write(
        &calib,
        images
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;
    let out = onnx_path.with_extension("int8.onnx");
    let status = Command::new(py)
        .arg(script)
        .arg("quantize")
        .arg("--model")
        .arg(onnx_path)
        .arg("--calibration")
        .arg(&calib)
        .args(["--shape", &format!("{CALIBRATION_IMAGES},3,{s},{s}")])
        .arg("--output")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", py.display()))?;
    if !status.success() {
        bail!("ONNX Runtime's quantize_static failed ({status}); its error is printed above");
    }
    Ok(Some((q, out)))
}

/// The model after its weights went through the uint8 per-tensor codec and back.
fn uint8_round_trip(spec: &ModelSpec, model_tensors: &BTreeMap<String, Tensor>) -> Result<Model> {
    let bytes = weights::encode(model_tensors, WeightFormat::Uint8)?;
    let (_, decoded) = weights::decode(&bytes)?;
    Ok(Model::from_tensors(spec, &decoded, &Device::Cpu)?)
}

fn python(args: &Args) -> PathBuf {
    if let Some(p) = &args.python {
        return p.clone();
    }
    let venv = Path::new(".venv/bin/python");
    if venv.exists() {
        venv.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

fn candle_images_per_s(model: &Model, batch: usize, size: usize, seconds: f64) -> Result<f64> {
    let x = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &Device::Cpu)?;
    model.forward_t(&x, false)?; // warm-up: allocations, thread pool start
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut iters = 0usize;
    while iters < 2 || start.elapsed() < budget {
        model.forward_t(&x, false)?.to_vec2::<f32>()?;
        iters += 1;
    }
    Ok((iters * batch) as f64 / start.elapsed().as_secs_f64())
}

#[derive(serde::Deserialize)]
struct OrtResult {
    images_per_s: f64,
}

/// ONNX Runtime in a Python child (`ort_run.py serve`) with one model and batch loaded,
/// measuring for as long as asked, whenever asked.
struct Ort {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Ort {
    fn start(py: &Path, script: &Path, model: &Path, batch: usize, threads: usize) -> Result<Self> {
        let mut child = Command::new(py)
            .arg(script)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--batch", &batch.to_string()])
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "running {} (install onnxruntime: python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy)",
                    py.display()
                )
            })?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?).lines();
        let mut ort = Self {
            child,
            stdin,
            stdout,
        };
        ort.reply().context("starting ONNX Runtime")?;
        Ok(ort)
    }

    fn reply(&mut self) -> Result<String> {
        match self.stdout.next() {
            Some(line) => Ok(line?),
            None => {
                let status = self.child.wait()?;
                bail!("the ONNX Runtime child exited ({status}); its error is printed above")
            }
        }
    }

    fn images_per_s(&mut self, seconds: f64) -> Result<f64> {
        writeln!(self.stdin, "{seconds}")?;
        self.stdin.flush()?;
        let line = self.reply()?;
        let r: OrtResult = serde_json::from_str(&line)
            .with_context(|| format!("unexpected output from ONNX Runtime: {line}"))?;
        Ok(r.images_per_s)
    }
}

impl Drop for Ort {
    fn drop(&mut self) {
        // Closing stdin ends the child's loop; kill covers a child stuck in a run.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// First quartile, median and third quartile of a sample.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
struct Quartiles {
    q1: f64,
    median: f64,
    q3: f64,
}

impl Quartiles {
    /// `None` for an empty sample; quartiles interpolate between order statistics.
    fn of(v: &[f64]) -> Option<Self> {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        (!v.is_empty()).then(|| Self {
            q1: at(0.25),
            median: at(0.5),
            q3: at(0.75),
        })
    }

    /// `1.06 [0.98, 1.12]`
    fn bracketed(&self) -> String {
        format!("{:.2} [{:.2}, {:.2}]", self.median, self.q1, self.q3)
    }
}

/// Median images/s of the fused engine (when there is one) and of ONNX Runtime over
/// `args.rounds` alternating windows, and the quartiles of the per-round ratio.
fn interleaved(
    fast: Option<Engine<'_>>,
    ort: &mut Ort,
    batch: usize,
    args: &Args,
) -> Result<(Option<f64>, f64, Option<Quartiles>)> {
    let window = args.seconds / args.rounds as f64;
    let (mut f, mut o) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        if let Some(m) = fast {
            f.push(fused_images_per_s(m, batch, args.input_size, window));
        }
        o.push(ort.images_per_s(window)?);
    }
    let paired: Vec<f64> = f.iter().zip(&o).map(|(f, o)| f / o).collect();
    let median = |v: &[f64]| Quartiles::of(v).map(|q| q.median);
    Ok((
        median(&f),
        median(&o).expect("--rounds is positive"),
        Quartiles::of(&paired),
    ))
}

pub fn run(args: Args) -> Result<()> {
    if args.threads == 0 || args.batch.contains(&0) || args.rounds == 0 {
        bail!("--threads, --batch and --rounds must be positive");
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--seconds must be a positive number, got {}", args.seconds);
    }
    // candle's GEMM reads RAYON_NUM_THREADS; the depthwise op uses rayon's global pool.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .ok();
    let archs = if args.arch.is_empty() {
        Arch::ALL.to_vec()
    } else {
        args.arch.clone()
    };
    let py = python(&args);
    let tmp = tempfile::tempdir()?;
    let script = tmp.path().join("ort_run.py");
    std::fs::write(&script, ORT_SCRIPT)?;

    if args.profile {
        return profile(&archs, &args, &py, &script, tmp.path());
    }
    let peak = sgemm_peak(args.threads, args.seconds);
    let isa = slimserve::simd::describe();
    if !args.json {
        eprintln!("sgemm peak ({} threads): {peak:.1} GFLOP/s", args.threads);
        eprintln!("fused engine: {isa}");
    }
    let mut rows = Vec::new();
    for arch in archs {
        let spec = ModelSpec::new(arch, 11, args.input_size);
        let (varmap, f32_model) = Model::init(&spec, &Device::Cpu)?;
        let mut variants = vec![("f32", f32_model)];
        if args.uint8 {
            let tensors = slimserve::zoo::varmap_tensors(&varmap);
            variants.push(("uint8", uint8_round_trip(&spec, &tensors)?));
        }
        for (weights, model) in variants {
            let onnx_path = tmp.path().join(format!("{arch}-{weights}.onnx"));
            std::fs::write(&onnx_path, onnx::export(&model)?)?;
            let fast = FastModel::compile(&model).ok();
            let int8 = match (&fast, args.int8 && weights == "f32") {
                (Some(f), true) => int8_engine(&model, f, &onnx_path, &py, &script, &args)?,
                _ => None,
            };
            let mut engines: Vec<(&'static str, Option<Engine<'_>>, &Path)> = vec![(
                weights,
                fast.as_ref().map(Engine::Fused),
                onnx_path.as_path(),
            )];
            if let Some((q, path)) = &int8 {
                engines.push(("int8", Some(Engine::Int8(q)), path.as_path()));
            }
            for &batch in &args.batch {
                for &(weights, engine, onnx_path) in &engines {
                    let c = candle_images_per_s(&model, batch, args.input_size, args.seconds)?;
                    let mut ort = Ort::start(&py, &script, onnx_path, batch, args.threads)?;
                    let (f, o, paired) = interleaved(engine, &mut ort, batch, &args)?;
                    drop(ort);
                    let best = f.unwrap_or(0.0).max(c);
                    let row = Row {
                        arch: arch.name(),
                        weights,
                        batch,
                        input_size: args.input_size,
                        threads: args.threads,
                        macs_per_image: model.macs(),
                        candle_images_per_s: c,
                        fused_images_per_s: f,
                        ort_images_per_s: o,
                        ratio: best / o,
                        paired_ratio: paired,
                        peak_fraction: best * 2.0 * model.macs() as f64 / 1e9 / peak,
                    };
                    if !args.json {
                        eprintln!(
                        "{:<15} {:<5} batch {:>3}: candle {:>8.1} img/s, fused {:>8} img/s, onnxruntime {:>8.1} img/s, ratio {:.2}{}",
                        row.arch,
                        weights,
                        batch,
                        c,
                        f.map(|f| format!("{f:.1}")).unwrap_or_else(|| "-".into()),
                        o,
                        row.ratio,
                        paired
                            .map(|q| format!(", per round {}", q.bracketed()))
                            .unwrap_or_default()
                    );
                    }
                    rows.push(row);
                }
            }
        }
    }
    if args.json {
        let out = Output {
            instruction_set: isa,
            sgemm_peak_gflops: peak,
            rows,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "\nsgemm peak, {} threads, same run: {peak:.1} GFLOP/s; fused engine: {}\n\n\
             | model | weights | batch | M MAC/img | candle img/s | fused img/s | ONNX Runtime img/s | best / ORT | fused / ORT per round, median [quartiles] | share of sgemm peak |\n\
             |---|---|---|---|---|---|---|---|---|---|",
            args.threads,
            isa
        );
        for r in &rows {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.2} | {} | {:.0}% |",
                r.arch,
                r.weights,
                r.batch,
                r.macs_per_image as f64 / 1e6,
                r.candle_images_per_s,
                r.fused_images_per_s
                    .map(|f| format!("{f:.1}"))
                    .unwrap_or_else(|| "-".into()),
                r.ort_images_per_s,
                r.ratio,
                r.paired_ratio
                    .map(|q| q.bracketed())
                    .unwrap_or_else(|| "-".into()),
                r.peak_fraction * 100.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_interpolate_between_order_statistics() {
        // Sorted: 1, 2, 4, 8, 16; positions 1, 2, 3 of 0..=4.
        let q = Quartiles::of(&[8.0, 1.0, 16.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            q,
            Quartiles {
                q1: 2.0,
                median: 4.0,
                q3: 8.0
            }
        );
        // Four values: positions 0.75, 1.5, 2.25.
        let q = Quartiles::of(&[0.0, 10.0, 20.0, 40.0]).unwrap();
        assert_eq!((q.q1, q.median, q.q3), (7.5, 15.0, 25.0));
        assert_eq!(q.bracketed(), "15.00 [7.50, 25.00]");
        assert_eq!(Quartiles::of(&[]), None);
        let one = Quartiles::of(&[1.25]).unwrap();
        assert_eq!((one.q1, one.median, one.q3), (1.25, 1.25, 1.25));
    }

    #[test]
    fn ort_nodes_are_grouped_by_the_layer_they_compute() {
        assert_eq!(layer_index("cnn.0"), Some(0));
        assert_eq!(layer_index("cnn.7"), Some(1));
        assert_eq!(layer_index("cnn.8"), Some(2));
        assert_eq!(layer_index("cnn.10.out_nchwc"), Some(2));
        assert_eq!(layer_index("cnn.3.0.out_nchwc"), Some(3));
        assert_eq!(layer_index("cnn.0.0"), Some(0));
        assert_eq!(layer_index("cnn.3.3"), Some(3));
        assert_eq!(layer_index("cnn.12.0_fused"), Some(12));
        assert_eq!(layer_index("features.17.conv.0.0"), Some(17));
        assert_eq!(layer_index("fc.0"), None);
        assert_eq!(layer_index("reorder_input"), None);
        let node = |name: &str, ms| OrtNode {
            name: name.into(),
            op: "Conv".into(),
            ms,
        };
        let grouped = ort_layers(
            &[
                node("cnn.0.0", 1.0),
                node("cnn.0.3", 0.5),
                node("cnn.1.0", 2.0),
                node("cnn.9.0", 4.0),
                node("fc.0", 0.25),
            ],
            2,
        );
        assert_eq!(grouped.layers, vec![1.5, 2.0]);
        assert_eq!(grouped.other, 4.25);
        assert_eq!(grouped.other_names, vec!["Conv cnn.9.0", "Conv fc.0"]);
    }
}
