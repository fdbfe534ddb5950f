//! Custom tensor operations that candle lacks or runs slowly.
//!
//! Each op has a multithreaded (rayon) CPU forward and its own backward, and falls back to
//! candle's generic operations on other devices and dtypes. Training on the CPU spends its time
//! in these: candle's generic train-mode BatchNorm is a dozen full-tensor passes, its
//! convolution backward is a direct loop, and every graph node costs two more passes in the
//! backward (a zero-filled gradient buffer plus an add), so the ops fuse what they can into one
//! node.

pub mod activation;
pub mod batch_norm;
pub mod conv2d;
pub mod depthwise;
pub mod max_pool;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Storage, Tensor};

thread_local! {
    static GENERIC: Cell<bool> = const { Cell::new(false) };
    static OFF_CPU: Cell<bool> = const { Cell::new(false) };
}

/// Sets a thread-local flag for the duration of `f`, restoring it even if `f` panics.
fn with_flag<R>(flag: &'static std::thread::LocalKey<Cell<bool>>, f: impl FnOnce() -> R) -> R {
    struct Restore(&'static std::thread::LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|g| g.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|g| g.replace(true)));
    f()
}

/// Runs `f` with the model layers on candle's generic operations instead of the custom ops of
/// this module (for this thread only): the reference path in tests and the "before" column
/// of `benches/train_step.rs`. The depthwise op is kept, as it was before the others existed.
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&GENERIC, f)
}

/// Whether the layers use the custom ops (false inside [`with_generic_ops`]).
pub fn fast_ops_enabled() -> bool {
    !GENERIC.with(|g| g.get())
}

/// Runs `f` with every op of this module taking the path it takes off the CPU (candle's
/// device-generic operations: the shifted-multiply-add depthwise, candle's pool, activations,
/// BatchNorm and convolution), on CPU tensors, for this thread only. This is how the numerics of
/// what `--device cuda` runs are tested on a machine without a GPU.
pub fn with_device_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&OFF_CPU, f)
}

/// Whether an op on `x` runs its CPU kernel: `x` is on the CPU and the thread is not inside
/// [`with_device_generic_ops`].
pub fn on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && !OFF_CPU.with(|g| g.get())
}

static PROFILING: AtomicBool = AtomicBool::new(false);
static PROFILE: Mutex<BTreeMap<&'static str, (usize, f64)>> = Mutex::new(BTreeMap::new());

/// Turns per-op timing on or off (process-wide; off by default, when it costs one atomic load
/// per op call). While on, every forward and backward kernel of this module adds its wall time
/// to a table read by [`take_op_profile`].
pub fn set_op_profiling(on: bool) {
    PROFILING.store(on, Ordering::Relaxed);
}

/// The timings gathered since the last call, as (kernel, calls, seconds), and a reset.
pub fn take_op_profile() -> Vec<(&'static str, usize, f64)> {
    let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *p)
        .into_iter()
        .map(|(k, (n, s))| (k, n, s))
        .collect()
}

/// Adds its lifetime to the profile under `name` (when profiling is on).
pub(crate) struct OpTimer(Option<(&'static str, Instant)>);

impl OpTimer {
    pub(crate) fn start(name: &'static str) -> Self {
        Self(
            PROFILING
                .load(Ordering::Relaxed)
                .then(|| (name, Instant::now())),
        )
    }
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        if let Some((name, t)) = self.0 {
            let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
            let e = p.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += t.elapsed().as_secs_f64();
        }
    }
}

/// Process settings for CPU training, to call at the very start of a training binary (before
/// any candle operation). Returns what it applied, for logging.
///
/// - [`retain_freed_memory`].
/// - Unless `CANDLE_NUM_THREADS` is already set, sets it to 1: candle's element-wise ops (which
///   a training step still uses for gradient accumulation in the backward, the loss and the
///   optimizer) then run on the calling thread instead of candle's spin-waiting barrier pool,
///   whose extra thread competes with rayon's workers (this crate's ops and gemm keep all
///   cores). On the 2-core machine this was measured on, steps got 1.3-1.4x faster and
///   AdamW on `big` 5x faster.
pub fn init_cpu_training() -> String {
    let retained = retain_freed_memory();
    let candle_threads = match std::env::var("CANDLE_NUM_THREADS") {
        Ok(v) => v,
        Err(_) => {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
            "1".to_string()
        }
    };
    format!("retain_freed_memory: {retained}, CANDLE_NUM_THREADS={candle_threads}")
}

/// Makes glibc's malloc serve every allocation from its heap and keep freed memory instead of
/// returning it to the OS, for the rest of the process.
///
/// A training step allocates and frees the same large tensors (activations, gradients, candle's
/// zero-filled gradient buffers) every step. By default glibc maps each allocation above its
/// mmap threshold (at most 32 MiB) freshly and unmaps it on free, so every step page-faults its
/// whole working set again: at 256x256 that was about a quarter of a step's CPU time. With this
/// the pages stay mapped and are reused; the process keeps its peak footprint.
///
/// Call once at the start of a training (or serving) binary. Returns whether the settings were
/// applied (false off glibc Linux, where it does nothing).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The op's data as a dense f32 slice; callers pass contiguous tensors, this re-checks it.
pub(crate) fn f32_slice<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: only f32 is supported, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!(
            "{op}: inputs must be contiguous, got strides {:?}",
            l.stride()
        ),
    }
}

/// Calls `f` with the data of contiguous f32 CPU tensors (used by the backward passes, which
/// read their saved tensors directly instead of building more graph nodes).
pub(crate) fn with_f32_slices<R>(
    op: &str,
    ts: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(cpu) => slices.push(f32_slice(op, cpu, l)?),
            _ => bail!("{op}: expected a CPU tensor"),
        }
    }
    f(&slices)
}

/// Whether some variable upstream of `t` needs its gradient.
pub(crate) fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// Sum of `a` with 16 independent f32 accumulators, so that LLVM vectorises it.
pub(crate) fn sum16(a: &[f32]) -> f32 {
    let chunks = a.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    let mut acc = [0f32; 16];
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};
    use rand::rngs::StdRng;
    use rand::Rng;

    pub const TOL: f32 = 1e-4;

    pub fn rand_tensor(rng: &mut StdRng, dims: &[usize]) -> Tensor {
        let len = dims.iter().product();
        let data: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    /// A deterministic, varied upstream gradient: sin(1.3 * index).
    pub fn wave(dims: &[usize]) -> Tensor {
        let len: usize = dims.iter().product();
        let data: Vec<f32> = (0..len).map(|i| (1.3 * i as f32).sin()).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    /// max |a-b| / max(1e-6, max |b|)
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // f32::max skips NaN, so a NaN result would otherwise look like zero error.
        assert!(
            a.iter().chain(&b).all(|v| v.is_finite()),
            "non-finite values"
        );
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
        diff / scale.max(1e-6)
    }
}
