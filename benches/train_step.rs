//! Training-step speed per architecture: forward in train mode, cross-entropy, backward,
//! reading every parameter gradient, and one AdamW update. Each configuration runs twice,
//! back to back in the same process: `stock` (candle's generic ops, the code before the custom
//! ops of `slimserve::ops`, only the depthwise op custom) and `fast` (the custom ops).
//!
//! ```sh
//! cargo bench --bench train_step                       # the full table
//! cargo bench --bench train_step -- --arch big --size 256 --reps 5
//! ```
//!
//! Options (after `--`): `--arch a,b` (default: big, student, student-deeper, std-conv,
//! group-conv), `--size 64,256` (batch 32 at 64 px and below, 8 above), `--batch N` (override),
//! `--reps N` (timed steps after one warm-up step; the best is reported, default 3),
//! `--threads N` (rayon threads, default: all cores), `--variant stock|fast|both` (default both),
//! `--no-tuning` (skip `slimserve::ops::init_cpu_training`, as the code before it existed),
//! `--breakdown` (after each fast row, the custom ops' share of the timed steps; the rest is
//! candle: gradient accumulation in the backward, loss, linear layer, optimizer).
//!
//! Timings on a shared machine are noisy; the best of the repetitions is the least disturbed.

use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use slimserve::zoo::{is_running_stat, Arch, Model, ModelSpec};

struct Opts {
    archs: Vec<Arch>,
    sizes: Vec<usize>,
    batch: Option<usize>,
    reps: usize,
    variants: Vec<bool>,
    breakdown: bool,
    tuning: bool,
}

fn parse_args() -> Opts {
    let mut opts = Opts {
        archs: vec![
            Arch::StudentDeeper,
            Arch::Student,
            Arch::GroupConv,
            Arch::StdConv,
            Arch::Big,
        ],
        sizes: vec![64, 256],
        batch: None,
        reps: 3,
        variants: vec![false, true],
        breakdown: false,
        tuning: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--arch" => {
                opts.archs = value()
                    .split(',')
                    .map(|s| Arch::parse(s).unwrap_or_else(|e| panic!("{e}")))
                    .collect()
            }
            "--size" => {
                opts.sizes = value()
                    .split(',')
                    .map(|s| s.parse().expect("--size takes integers"))
                    .collect()
            }
            "--batch" => opts.batch = Some(value().parse().expect("--batch takes an integer")),
            "--reps" => opts.reps = value().parse().expect("--reps takes an integer"),
            "--variant" => {
                opts.variants = match value().as_str() {
                    "stock" => vec![false],
                    "fast" => vec![true],
                    "both" => vec![false, true],
                    v => panic!("--variant is stock, fast or both, got {v}"),
                }
            }
            "--threads" => {
                let n: usize = value().parse().expect("--threads takes an integer");
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()
                    .expect("rayon pool already built");
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            "--breakdown" => opts.breakdown = true,
            "--no-tuning" => opts.tuning = false,
            // cargo bench passes --bench to harness-less targets.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    opts
}

#[derive(Clone, Copy)]
struct StepTimes {
    forward: f64,
    backward: f64,
    optimizer: f64,
    /// CPU time of the whole process (all threads) during the step.
    cpu: f64,
    /// Wall time of all timed steps together (for the per-op breakdown).
    sum: f64,
    /// An eval-mode forward of the same batch, outside the step (what a distillation teacher
    /// or a validation pass costs).
    eval: f64,
}

/// User + system CPU time of this process in ms (Linux; 0 elsewhere).
fn cpu_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Clock ticks are 100 Hz on Linux.
    (ticks(11) + ticks(12)) * 10.0
}

impl StepTimes {
    fn total(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Per-op (kernel, seconds) of the timed steps, from `slimserve::ops`' profiler.
type OpTimes = std::collections::BTreeMap<&'static str, f64>;

fn measure(
    arch: Arch,
    size: usize,
    batch: usize,
    reps: usize,
) -> candle_core::Result<(StepTimes, OpTimes)> {
    let dev = Device::Cpu;
    let spec = ModelSpec::new(arch, 11, size);
    let (varmap, model) = Model::init(&spec, &dev).map_err(candle_core::Error::wrap)?;
    let params: Vec<_> = {
        let data = varmap.data().lock().unwrap();
        data.iter()
            .filter(|(k, _)| !is_running_stat(k))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let mut opt = AdamW::new(params.clone(), ParamsAdamW::default())?;
    let x = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &dev)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 11).collect();
    let y = Tensor::new(labels.as_slice(), &dev)?;
    let mut best: Option<StepTimes> = None;
    let mut sum = 0.0;
    let mut best_eval = f64::INFINITY;
    let mut ops = OpTimes::new();
    for rep in 0..=reps {
        let cpu0 = cpu_ms();
        let t = Instant::now();
        let logits = model.forward_t(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        loss.to_scalar::<f32>()?;
        let forward = ms(t);
        let t = Instant::now();
        let grads = loss.backward()?;
        let mut norm = 0f64;
        for p in &params {
            let g = grads.get(p).expect("every parameter has a gradient");
            norm += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        assert!(norm.is_finite() && norm > 0.0);
        let backward = ms(t);
        let t = Instant::now();
        opt.step(&grads)?;
        let optimizer = ms(t);
        let cpu = cpu_ms() - cpu0;
        let step_ops = slimserve::ops::take_op_profile();
        let t = Instant::now();
        model.forward_t(&x, false)?.to_vec2::<f32>()?;
        let eval = ms(t);
        slimserve::ops::take_op_profile();
        let s = StepTimes {
            forward,
            backward,
            optimizer,
            cpu,
            sum: 0.0,
            eval,
        };
        // The first step warms allocations and the thread pool; it is not counted.
        if rep == 0 && reps > 0 {
            continue;
        }
        for (name, _, secs) in step_ops {
            *ops.entry(name).or_default() += secs;
        }
        sum += s.total();
        best_eval = best_eval.min(s.eval);
        if best.is_none_or(|b| s.total() < b.total()) {
            best = Some(s);
        }
    }
    let best = StepTimes {
        sum,
        eval: best_eval.min(best.map_or(f64::INFINITY, |b| b.eval)),
        ..best.expect("at least one step")
    };
    Ok((best, ops))
}

fn main() -> candle_core::Result<()> {
    let opts = parse_args();
    // As a training binary should, before any candle op.
    let tuning = if opts.tuning {
        slimserve::ops::init_cpu_training()
    } else {
        "no process tuning".to_string()
    };
    println!(
        "train step = forward (train mode) + cross-entropy + backward + read grads + AdamW; best of {} after 1 warm-up; {} rayon threads; {tuning}",
        opts.reps,
        rayon::current_num_threads()
    );
    println!(
        "| arch | input | batch | ops | fwd ms/img | bwd ms/img | opt ms/img | step ms/img | images/s | cpu ms/img | speed-up | eval fwd ms/img |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &size in &opts.sizes {
        for &arch in &opts.archs {
            let batch = opts.batch.unwrap_or(if size <= 64 { 32 } else { 8 });
            let mut stock_total = None;
            for &fast in &opts.variants {
                slimserve::ops::set_op_profiling(fast && opts.breakdown);
                let (t, ops) = if fast {
                    measure(arch, size, batch, opts.reps)?
                } else {
                    slimserve::ops::with_generic_ops(|| measure(arch, size, batch, opts.reps))?
                };
                let per = |v: f64| v / batch as f64;
                let speedup = match (fast, stock_total) {
                    (true, Some(s)) => format!("{:.1}x", s / t.total()),
                    _ => String::new(),
                };
                if !fast {
                    stock_total = Some(t.total());
                }
                println!(
                    "| {} | {size} | {batch} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {speedup} | {:.1} |",
                    arch,
                    if fast { "fast" } else { "stock" },
                    per(t.forward),
                    per(t.backward),
                    per(t.optimizer),
                    per(t.total()),
                    1e3 * batch as f64 / t.total(),
                    per(t.cpu),
                    per(t.eval),
                );
                if fast && opts.breakdown {
                    let steps = opts.reps.max(1) as f64;
                    let mut parts: Vec<String> = ops
                        .iter()
                        .map(|(name, secs)| format!("{name} {:.2}", per(secs * 1e3 / steps)))
                        .collect();
                    let in_ops: f64 = ops.values().map(|s| s * 1e3).sum();
                    parts.push(format!("rest {:.2}", per((t.sum - in_ops) / steps)));
                    println!("|  |  |  | ms/img: | {} |", parts.join(", "));
                }
            }
        }
    }
    Ok(())
}
