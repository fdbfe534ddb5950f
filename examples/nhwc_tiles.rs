//! MobileNetV2 at batch 1 with its channels-last layers on the AVX-512 kernel set's kernels
//! against the AVX2 set's, alternated in one process (short windows, so that a shared
//! machine's slow phases hit both alike): images/s (median window) and the per-layer profile
//! (medians), on one thread and on `THREADS`. Needs an AVX-512 CPU to compare anything.
//!
//! ```sh
//! cargo run --release --example nhwc_tiles -- [INPUT_SIZE] [THREADS]     # default 224 2
//! ```
mod common;

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Device;
use slimserve::infer::{FastModel, NHWC_AVX512};
use slimserve::zoo::{Arch, Model, ModelSpec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(224);
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let pools = [
        rayon::ThreadPoolBuilder::new().num_threads(1).build()?,
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?,
    ];
    let spec = ModelSpec::new(Arch::MobileNetV2, 11, size);
    let (_, model) = Model::init(&spec, &Device::Cpu)?;
    let fast = FastModel::compile(&model)?;
    let x: Vec<f32> = (0..3 * size * size)
        .map(|i| (i % 251) as f32 / 251.0)
        .collect();
    // (pool, AVX-512 kernels, label)
    let settings = [
        (1, true, format!("AVX-512, {threads} threads")),
        (1, false, format!("AVX2, {threads} threads")),
        (0, true, "AVX-512, 1 thread".to_string()),
        (0, false, "AVX2, 1 thread".to_string()),
    ];
    let mut rates = vec![Vec::new(); settings.len()];
    let mut profiles = vec![Vec::new(); settings.len()];
    for round in 0..24 {
        for k in 0..settings.len() {
            let m = (k + round) % settings.len();
            let (pool, wide, _) = &settings[m];
            NHWC_AVX512.store(*wide, Ordering::Relaxed);
            pools[*pool].install(|| {
                let t = Instant::now();
                let mut n = 0;
                while t.elapsed().as_secs_f64() < 0.25 {
                    std::hint::black_box(fast.forward(&x, 1));
                    n += 1;
                }
                rates[m].push(n as f64 / t.elapsed().as_secs_f64());
                if round % 3 == 0 {
                    profiles[m].push(fast.profile(&x, *pool == 1, 10));
                }
            });
        }
    }
    NHWC_AVX512.store(true, Ordering::Relaxed);
    let cpu = slimserve::simd::describe();
    println!("mobilenet-v2 {size}x{size}, batch 1, f32 engine, CPU: {cpu}");
    if !cpu.starts_with("AVX-512") {
        println!("(no AVX-512 here: both columns of each thread count ran the same kernels)");
    }
    let labels: Vec<String> = settings.iter().map(|(_, _, l)| l.clone()).collect();
    common::print_table("layer (ms, median)", &labels, &profiles, rates);
    Ok(())
}
