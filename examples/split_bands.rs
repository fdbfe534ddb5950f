//! How many work items per thread a split layer (batch 1) should aim for, measured in one
//! process: the fused engine's batch-1 throughput at 1, 2, 4 and 8 items per thread,
//! alternated in short windows so that a shared machine's slow phases hit every setting alike,
//! then the median window of each and the per-layer profile.
//!
//! ```sh
//! cargo run --release --example split_bands -- [ARCH] [THREADS] [spin|steal|static|both|ends|all] [int8]
//!                                                    # default student-deeper 2 spin (f32)
//! SLIMSERVE_SIMD=avx2 cargo run --release --example split_bands     # a forced instruction set
//! ```
//!
//! `spin` holds the pool's threads for the whole image, spinning between layers ([`SPIN_SPLIT`],
//! the engine's default); `steal` hands each layer's items to rayon's work stealing, `static`
//! gives thread i the i-th contiguous share of them every layer ([`STATIC_SPLIT`]); `both`
//! alternates `spin` and `steal`, `ends` the gang's two ways of handing out items ([`SPLIT_ENDS`]:
//! helpers from the back, the default, or everyone the next item), `all` the first three. `int8`
//! measures the int8 engine (calibrated on
//! the one synthetic image) instead of the f32 one; its profile is not split, so only its
//! images/s row differs between settings.
mod common;

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Device;
use slimserve::infer::qmodel::Int8Model;
use slimserve::infer::{FastModel, SPIN_SPLIT, SPLIT_ENDS, SPLIT_TASKS_PER_THREAD, STATIC_SPLIT};
use slimserve::zoo::{Arch, Model, ModelSpec};

/// (spin, static, from the ends, label) of one way of handing out the items.
type Mode = (bool, bool, bool, &'static str);

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let arch: Arch = args.next().unwrap_or("student-deeper".into()).parse()?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let modes: &[Mode] = match args.next().as_deref().unwrap_or("spin") {
        "spin" => &[(true, false, true, "")],
        "steal" => &[(false, false, true, "")],
        "static" => &[(false, true, true, "")],
        "both" => &[
            (true, false, true, ", spin"),
            (false, false, true, ", steal"),
        ],
        "ends" => &[
            (true, false, true, ", spin, ends"),
            (true, false, false, ", spin, next"),
        ],
        "all" => &[
            (true, false, true, ", spin"),
            (false, false, true, ", steal"),
            (false, true, true, ", static"),
        ],
        other => anyhow::bail!("expected spin, steal, static, both, ends or all, got {other}"),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let spec = ModelSpec::new(arch, 11, 256);
    let (_, model) = Model::init(&spec, &Device::Cpu)?;
    let fast = FastModel::compile(&model)?;
    let x: Vec<f32> = (0..3 * 256 * 256)
        .map(|i| (i % 251) as f32 / 251.0)
        .collect();
    let int8 = match args.next().as_deref() {
        None => None,
        Some("int8") => Some(Int8Model::compile(&model, &fast.calibrate(&x, 1))?),
        Some(other) => anyhow::bail!("expected int8 or nothing, got {other}"),
    };
    let forward = |x: &[f32]| match &int8 {
        Some(q) => q.forward(x, 1),
        None => fast.forward(x, 1),
    };
    let settings: Vec<(usize, Mode)> = modes
        .iter()
        .flat_map(|&m| [1usize, 2, 4, 8].map(|k| (k, m)))
        .collect();
    let mut rates = vec![Vec::new(); settings.len()];
    let mut profiles = vec![Vec::new(); settings.len()];
    for round in 0..24 {
        for k in 0..settings.len() {
            let m = (k + round) % settings.len();
            SPLIT_TASKS_PER_THREAD.store(settings[m].0, Ordering::Relaxed);
            SPIN_SPLIT.store(settings[m].1 .0, Ordering::Relaxed);
            STATIC_SPLIT.store(settings[m].1 .1, Ordering::Relaxed);
            SPLIT_ENDS.store(settings[m].1 .2, Ordering::Relaxed);
            pool.install(|| {
                let t = Instant::now();
                let mut n = 0;
                while t.elapsed().as_secs_f64() < 0.2 {
                    std::hint::black_box(forward(&x));
                    n += 1;
                }
                rates[m].push(n as f64 / t.elapsed().as_secs_f64());
                if round % 3 == 0 {
                    profiles[m].push(fast.profile(&x, true, 10));
                }
            });
        }
    }
    let level = slimserve::simd::describe();
    let engine = if int8.is_some() { "int8" } else { "f32" };
    println!("{arch} ({engine} engine), batch 1, {threads} threads, instruction set: {level}");
    let labels: Vec<String> = settings
        .iter()
        .map(|&(k, (_, _, _, how))| format!("{k} per thread{how}"))
        .collect();
    common::print_table("layer (ms)", &labels, &profiles, rates);
    Ok(())
}
