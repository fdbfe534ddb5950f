//! The CPU inference engine the server runs: a model compiled at load time into fused layers
//! over plain f32 buffers.
//!
//! Load-time rewrites: every eval-mode BatchNorm is folded into the convolution before it (the
//! students': into the depthwise conv), so a layer is one pass `conv + bias -> activation
//! (-> 2x2 max pool)`; weights are packed for the kernels. Kernels: one set per instruction set
//! (`avx512`, `avx2`; `isa` picks the set for the detected level), portable ones with the same
//! structure elsewhere:
//! - 3x3 convolutions with 16 or more input channels (`big`, `std-conv`): Winograd F(2x2, 3x3)
//!   over bands of tile rows (`winograd.rs`); the RGB input layer: a direct convolution with
//!   bias, activation and pool in registers (im2col + GEMM per band without AVX2 or for 5 to
//!   15 input channels);
//! - the students' depthwise-separable block in one pass per band of rows: depthwise 3x3 with
//!   its bias and ReLU6 into a buffer that stays in cache, then the pointwise 1x1 GEMM over it
//!   with bias and pool (`separable.rs`);
//! - the GEMMs of both: weights packed into 8-channel tiles at load (`packed.rs`);
//! - global average pool + linear, or flatten + linear.
//!
//! Parallelism: a batch with at least as many images as threads runs one image per thread
//! (each image's activations stay in that core's caches); a smaller batch runs each image on a
//! pool worker that holds the pool's other threads for the image (`gang`: they spin between
//! layers instead of sleeping) and splits each layer's bands or channels across them. Architectures
//! without a compiled form (`group-conv`, `resnet18`) keep candle's path;
//! [`FastModel::compile`] says which.

#[cfg(x86_simd)]
mod avx2;
#[cfg(x86_simd)]
mod avx512;
mod gang;
pub mod int8;
mod inverted;
#[cfg(x86_simd)]
mod isa;
mod kernels;
mod nhwc;
mod packed;
pub mod qmodel;
pub mod quant;
mod separable;
#[cfg(test)]
mod tests;
mod winograd;

use std::cell::RefCell;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::zoo::layers::{Bn, Conv, Linear, BN_EPS};
use crate::zoo::{Model, ModelSpec, Net};
#[doc(hidden)]
pub use gang::{SPIN_SPLIT, SPLIT_ENDS};
use inverted::{Inverted, Pointwise, Strided3x3};
use kernels::conv3x3;
pub use kernels::Act;
#[doc(hidden)]
pub use kernels::{SPLIT_TASKS_PER_THREAD, STATIC_SPLIT};
#[doc(hidden)]
pub use nhwc::NHWC_AVX512;
use separable::Separable;

/// Why a model has no compiled form.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{0} has no fused CPU kernels (served by candle's path)")]
    Unsupported(String),
    #[error("reading weights: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("calibration: {0}")]
    Calibration(String),
}

/// One fused layer; shapes are per image, NCHW.
#[derive(Debug, Clone)]
enum Layer {
    /// 3x3, stride 1, pad 1; weights `[oc, ic * 9]` with BatchNorm folded in.
    Conv3x3 {
        ic: usize,
        oc: usize,
        w: Vec<f32>,
        b: Vec<f32>,
        act: Act,
        pool: bool,
    },
    /// As `Conv3x3`, by Winograd F(2x2, 3x3).
    Winograd {
        ic: usize,
        oc: usize,
        u: winograd::Weights,
        b: Vec<f32>,
        act: Act,
        pool: bool,
    },
    /// Depthwise 3x3 + BatchNorm + ReLU6, then pointwise 1x1 (+ 2x2 max pool), fused.
    Separable(Box<Separable>),
    /// 3x3 convolution with stride 2 (MobileNetV2's stem).
    Strided(Box<Strided3x3>),
    /// MobileNetV2's inverted residual block, fused per band of output rows.
    Inverted(Box<Inverted>),
    /// 1x1 convolution + bias + activation over the whole image.
    Pointwise(Box<Pointwise>),
}

#[derive(Debug, Clone)]
enum Head {
    /// `Linear(c * h * w, classes)` over the flattened activations.
    Flatten { w: Vec<f32>, b: Vec<f32> },
    /// Global average pool, then `Linear(c, classes)`; `channels_last`: the features are
    /// `[h * w, c]` (the MobileNetV2 layers' layout) rather than `[c, h * w]`.
    Gap {
        w: Vec<f32>,
        b: Vec<f32>,
        channels_last: bool,
    },
}

/// A model compiled for CPU inference.
#[derive(Debug, Clone)]
pub struct FastModel {
    spec: ModelSpec,
    layers: Vec<Layer>,
    head: Head,
    /// Largest activation of one image, in floats.
    max_activation: usize,
}

thread_local! {
    /// Free activation buffer pairs of this thread. A pair is taken for the whole image and
    /// returned after it, never borrowed across the layers: while a split layer waits for its
    /// other half, rayon may run another image (of this or another model) on the same thread,
    /// which then takes a pair of its own.
    static ACTIVATIONS: RefCell<Vec<(Vec<f32>, Vec<f32>)>> = const { RefCell::new(Vec::new()) };
}

/// Frees the engine's scratch memory (activation buffers, im2col bands, Winograd transforms,
/// depthwise and expansion bands) on every thread of rayon's pool and on the calling thread;
/// the next image allocates it again. Call when the engine is idle: buffers in use on some
/// thread are left alone. The server does this after `--idle-memory-release` without a batch,
/// so that an idle process holds its models and little else.
pub fn release_scratch() {
    rayon::broadcast(|_| release_thread_scratch());
    release_thread_scratch();
}

fn release_thread_scratch() {
    kernels::free_local(&ACTIVATIONS);
    kernels::release_thread_scratch();
    #[cfg(x86_simd)]
    avx2::release_thread_scratch();
    #[cfg(x86_simd)]
    avx512::release_thread_scratch();
    separable::release_thread_scratch();
    winograd::release_thread_scratch();
    inverted::release_thread_scratch();
}

fn vec1(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// A conv's weights `[oc, rest]` and bias with `bn` folded in:
/// `w' = w * g / sqrt(var + eps)`, `b' = (b - mean) * g / sqrt(var + eps) + beta`.
fn fold(conv: &Conv, bn: Option<&Bn>) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let mut w = vec1(conv.weight())?;
    let oc = conv.weight().dim(0)?;
    let per = w.len() / oc;
    let mut b = match conv.bias() {
        Some(b) => vec1(b)?,
        None => vec![0.0; oc],
    };
    if let Some(bn) = bn {
        let (g, beta) = (vec1(bn.weight())?, vec1(bn.bias())?);
        let (mean, var) = (vec1(bn.running_mean())?, vec1(bn.running_var())?);
        for o in 0..oc {
            // In f64: the folded weights match the unfolded graph to float rounding.
            let scale = g[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
            for v in &mut w[o * per..(o + 1) * per] {
                *v = (*v as f64 * scale) as f32;
            }
            b[o] = ((b[o] as f64 - mean[o] as f64) * scale + beta[o] as f64) as f32;
        }
    }
    Ok((w, b))
}

fn linear(l: &Linear) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let w = vec1(l.weight())?;
    let out = l.weight().dim(0)?;
    let b = match l.bias() {
        Some(b) => vec1(b)?,
        None => vec![0.0; out],
    };
    Ok((w, b))
}

fn is_3x3_same(conv: &Conv) -> bool {
    conv.stride() == 1
        && conv.padding() == 1
        && conv.groups() == 1
        && conv
            .weight()
            .dims4()
            .is_ok_and(|(_, _, kh, kw)| kh == 3 && kw == 3)
}

/// Input channels from which Winograd F(2x2, 3x3) beats im2col + GEMM here (below, the 16
/// GEMMs are too thin; the RGB input layer stays on im2col).
const WINOGRAD_MIN_INPUT_CHANNELS: usize = 16;

fn conv_layer(ic: usize, oc: usize, w: Vec<f32>, b: Vec<f32>, act: Act, pool: bool) -> Layer {
    if ic >= WINOGRAD_MIN_INPUT_CHANNELS {
        Layer::Winograd {
            ic,
            oc,
            u: winograd::Weights::new(&w, oc, ic),
            b,
            act,
            pool,
        }
    } else {
        Layer::Conv3x3 {
            ic,
            oc,
            w,
            b,
            act,
            pool,
        }
    }
}

impl FastModel {
    /// Compiles `model` (eval mode: BatchNorm running statistics) for CPU inference.
    pub fn compile(model: &Model) -> Result<Self, CompileError> {
        let spec = model.spec().clone();
        let unsupported = || CompileError::Unsupported(spec.arch.to_string());
        let mut layers = Vec::new();
        let head = match model.net() {
            Net::Plain(net) => {
                for (conv, bn) in net.blocks() {
                    if !is_3x3_same(conv) {
                        return Err(unsupported());
                    }
                    let (ic, oc) = (conv.weight().dim(1)?, conv.weight().dim(0)?);
                    let (w, b) = fold(conv, Some(bn))?;
                    layers.push(conv_layer(ic, oc, w, b, Act::Relu, true));
                }
                let (w, b) = linear(net.fc())?;
                Head::Flatten { w, b }
            }
            Net::Mobile(net) => {
                let (conv, bn) = net.stem();
                if !is_3x3_same(conv) {
                    return Err(unsupported());
                }
                let (ic, oc) = (conv.weight().dim(1)?, conv.weight().dim(0)?);
                let (w, b) = fold(conv, Some(bn))?;
                layers.push(conv_layer(ic, oc, w, b, Act::Relu6, true));
                for block in net.blocks() {
                    let c = block.spatial.weight().dim(0)?;
                    if block.spatial.groups() != c
                        || block.spatial.weight().dims4()? != (c, 1, 3, 3)
                        || block.spatial.stride() != 1
                        || block.spatial.padding() != 1
                    {
                        // group-conv: grouped 3x3, not depthwise
                        return Err(unsupported());
                    }
                    let (dw_w, dw_b) = fold(&block.spatial, Some(&block.bn))?;
                    let (pw_w, pw_b) = fold(&block.pointwise, None)?;
                    layers.push(Layer::Separable(Box::new(Separable::new(
                        dw_w.chunks_exact(9)
                            .map(|k| k.try_into().expect("9 taps"))
                            .collect(),
                        dw_b,
                        pw_w,
                        pw_b,
                        block.pool,
                    ))));
                }
                let (w, b) = linear(net.fc())?;
                Head::Gap {
                    w,
                    b,
                    channels_last: false,
                }
            }
            Net::MobileV2(net) => {
                let (conv, bn) = net.stem();
                if conv.weight().dims4()? != (32, 3, 3, 3)
                    || conv.stride() != 2
                    || conv.padding() != 1
                {
                    return Err(unsupported());
                }
                let (w, b) = fold(conv, Some(bn))?;
                layers.push(Layer::Strided(Box::new(Strided3x3::new(
                    3,
                    w,
                    b,
                    Act::Relu6,
                ))));
                for block in net.blocks() {
                    let (dw, dw_bn) = &block.depthwise;
                    let hid = dw.weight().dim(0)?;
                    if dw.weight().dims4()? != (hid, 1, 3, 3) || dw.padding() != 1 {
                        return Err(unsupported());
                    }
                    let (ic, expand) = match &block.expand {
                        Some((conv, bn)) => (conv.weight().dim(1)?, Some(fold(conv, Some(bn))?)),
                        None => (hid, None),
                    };
                    let (dw_w, dw_b) = fold(dw, Some(dw_bn))?;
                    let (pw, pb) = fold(&block.project.0, Some(&block.project.1))?;
                    layers.push(Layer::Inverted(Box::new(Inverted::new(
                        ic,
                        block.stride(),
                        expand,
                        dw_w.chunks_exact(9)
                            .map(|k| k.try_into().expect("9 taps"))
                            .collect(),
                        dw_b,
                        pw,
                        pb,
                        block.residual,
                    ))));
                }
                let (conv, bn) = net.head();
                let ic = conv.weight().dim(1)?;
                let (w, b) = fold(conv, Some(bn))?;
                layers.push(Layer::Pointwise(Box::new(Pointwise::new(
                    ic,
                    w,
                    b,
                    Act::Relu6,
                ))));
                let (w, b) = linear(net.classifier())?;
                Head::Gap {
                    w,
                    b,
                    channels_last: true,
                }
            }
            Net::Resnet(_) => return Err(unsupported()),
        };
        let mut fast = Self {
            spec,
            layers,
            head,
            max_activation: 0,
        };
        fast.max_activation = fast
            .shapes()
            .iter()
            .map(|(c, h, w)| c * h * w)
            .max()
            .unwrap_or(0);
        Ok(fast)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// (channels, height, width) of the input and after every layer.
    fn shapes(&self) -> Vec<(usize, usize, usize)> {
        let s = self.spec.input_size;
        let mut shape = (3, s, s);
        let mut out = vec![shape];
        for l in &self.layers {
            shape = match *l {
                Layer::Conv3x3 { oc, pool, .. } | Layer::Winograd { oc, pool, .. } => {
                    pooled((oc, shape.1, shape.2), pool)
                }
                Layer::Separable(ref s) => pooled((s.oc, shape.1, shape.2), s.pool),
                Layer::Strided(ref s) => (
                    s.oc,
                    inverted::out_size(shape.1, 2),
                    inverted::out_size(shape.2, 2),
                ),
                Layer::Inverted(ref b) => (
                    b.oc,
                    inverted::out_size(shape.1, b.stride),
                    inverted::out_size(shape.2, b.stride),
                ),
                Layer::Pointwise(ref p) => (p.oc, shape.1, shape.2),
            };
            out.push(shape);
        }
        out
    }

    /// Logits `[n, classes]` of `n` preprocessed CHW images laid end to end.
    pub fn forward(&self, input: &[f32], n: usize) -> Vec<f32> {
        let s = self.spec.input_size;
        let per = 3 * s * s;
        assert_eq!(input.len(), n * per, "input is not {n} images of 3x{s}x{s}");
        let classes = self.spec.num_classes;
        let mut out = vec![0f32; n * classes];
        let threads = rayon::current_num_threads();
        if n >= threads && threads > 1 {
            input
                .par_chunks(per)
                .zip(out.par_chunks_mut(classes))
                .for_each(|(x, o)| self.image(x, o, false));
        } else {
            for (x, o) in input.chunks(per).zip(out.chunks_mut(classes)) {
                self.image(x, o, threads > 1);
            }
        }
        out
    }

    /// Milliseconds per layer for one image (`split`: each layer spread over the thread pool,
    /// as batch 1 runs), the median of `repeats`, then a last row `whole image`: the median
    /// time of the image run untimed (what the layers' sum misses: the hand-offs between
    /// layers and the timer itself); for profiles in benchmarks.
    pub fn profile(&self, x: &[f32], split: bool, repeats: usize) -> Vec<(String, f64)> {
        let mut logits = vec![0f32; self.spec.num_classes];
        median_profile(repeats, |timed| {
            self.run(x, &mut logits, split, timed, None)
        })
    }

    /// One image through every layer; `split` spreads each layer over the thread pool.
    fn image(&self, x: &[f32], logits: &mut [f32], split: bool) {
        self.run(x, logits, split, false, None);
    }

    /// Points where the int8 engine quantizes an activation: the input and each layer's
    /// output, the length of [`FastModel::calibrate`]'s ranges.
    pub fn calibration_points(&self) -> usize {
        1 + self.layers.len()
    }

    /// The range `(min, max)` of the input and of each layer's output (after its activation
    /// and pool) over `n` preprocessed CHW images: the calibration the int8 engine
    /// ([`qmodel::Int8Model`]) quantizes its activations with.
    pub fn calibrate(&self, input: &[f32], n: usize) -> Vec<(f32, f32)> {
        let s = self.spec.input_size;
        let per = 3 * s * s;
        assert_eq!(input.len(), n * per, "input is not {n} images of 3x{s}x{s}");
        let empty = vec![(f32::INFINITY, f32::NEG_INFINITY); self.calibration_points()];
        let classes = self.spec.num_classes;
        input
            .par_chunks(per)
            .map(|x| {
                let mut ranges = empty.clone();
                let mut logits = vec![0f32; classes];
                self.run(x, &mut logits, false, false, Some(&mut ranges));
                ranges
            })
            .reduce(|| empty.clone(), |a, b| merge_ranges(&a, &b))
            .into_iter()
            .map(|r| if r.0 <= r.1 { r } else { (0.0, 0.0) })
            .collect()
    }

    fn run(
        &self,
        x: &[f32],
        logits: &mut [f32],
        split: bool,
        timed: bool,
        ranges: Option<&mut [(f32, f32)]>,
    ) -> Vec<(String, f64)> {
        if split {
            // Every layer splits: hold the pool's threads for the whole image (on a worker).
            gang::with(|| self.layers_and_head(x, logits, true, timed, ranges))
        } else {
            self.layers_and_head(x, logits, false, timed, ranges)
        }
    }

    /// [`Self::run`]'s work, on the thread (and gang) it chose.
    fn layers_and_head(
        &self,
        x: &[f32],
        logits: &mut [f32],
        split: bool,
        timed: bool,
        mut ranges: Option<&mut [(f32, f32)]>,
    ) -> Vec<(String, f64)> {
        if let Some(r) = ranges.as_deref_mut() {
            r[0] = widen(r[0], x);
        }
        let mut times = Vec::new();
        let mut bufs = ACTIVATIONS
            .with(|free| free.borrow_mut().pop())
            .unwrap_or_default();
        {
            let (a, b) = &mut bufs;
            a.resize(self.max_activation, 0.0);
            b.resize(self.max_activation, 0.0);
            let shapes = self.shapes();
            let mut src: &mut Vec<f32> = a;
            let mut dst: &mut Vec<f32> = b;
            for (i, (l, &(c, h, w))) in self.layers.iter().zip(&shapes).enumerate() {
                let started = timed.then(std::time::Instant::now);
                // The first layer reads the request's buffer in place.
                let input = if i == 0 { x } else { &src[..c * h * w] };
                match l {
                    Layer::Conv3x3 {
                        ic,
                        oc,
                        w: wt,
                        b,
                        act,
                        pool,
                    } => conv3x3(input, (*ic, h, w), wt, b, *oc, *act, *pool, dst, split),
                    Layer::Winograd {
                        ic,
                        oc,
                        u,
                        b,
                        act,
                        pool,
                    } => winograd::conv3x3(input, (*ic, h, w), u, b, *oc, *act, *pool, dst, split),
                    Layer::Separable(s) => s.run(input, (h, w), dst, split),
                    Layer::Strided(s) => s.run(input, (h, w), dst, split),
                    Layer::Inverted(b) => b.run(input, (h, w), dst, split),
                    Layer::Pointwise(p) => p.run(input, (h, w), dst, split),
                }
                if let Some(t) = started {
                    let what = match l {
                        Layer::Conv3x3 { ic, oc, .. } => format!("conv3x3 {ic}->{oc} @{h}x{w}"),
                        Layer::Winograd { ic, oc, .. } => {
                            format!("winograd 3x3 {ic}->{oc} @{h}x{w}")
                        }
                        Layer::Separable(s) => {
                            format!("separable {}->{} @{h}x{w}", s.ic, s.oc)
                        }
                        Layer::Strided(s) => format!("conv3x3/2 {}->{} @{h}x{w}", s.ic, s.oc),
                        Layer::Inverted(b) => format!(
                            "inverted {}->{}->{} /{} @{h}x{w}",
                            b.ic, b.hid, b.oc, b.stride
                        ),
                        Layer::Pointwise(p) => format!("pointwise {}->{} @{h}x{w}", p.ic, p.oc),
                    };
                    times.push((what, t.elapsed().as_secs_f64() * 1e3));
                }
                if let Some(r) = ranges.as_deref_mut() {
                    let (c, h, w) = shapes[i + 1];
                    r[i + 1] = widen(r[i + 1], &dst[..c * h * w]);
                }
                std::mem::swap(&mut src, &mut dst);
            }
            let &(c, h, w) = shapes.last().expect("input shape");
            let features = if self.layers.is_empty() {
                x
            } else {
                &src[..c * h * w]
            };
            match &self.head {
                Head::Flatten { w: wt, b } => dense(features, wt, b, logits),
                Head::Gap {
                    w: wt,
                    b,
                    channels_last,
                } => {
                    let hw = (h * w) as f32;
                    let pooled: Vec<f32> = if *channels_last {
                        let mut sum = vec![0f32; c];
                        for px in features.chunks_exact(c) {
                            sum.iter_mut().zip(px).for_each(|(s, v)| *s += v);
                        }
                        sum.into_iter().map(|s| s / hw).collect()
                    } else {
                        features
                            .chunks_exact(h * w)
                            .map(|p| p.iter().sum::<f32>() / hw)
                            .collect()
                    };
                    dense(&pooled, wt, b, logits)
                }
            }
        }
        ACTIVATIONS.with(|free| free.borrow_mut().push(bufs));
        times
    }
}

/// Per-layer milliseconds for one image, the median of `repeats`, then a last row `whole
/// image`: the median time of the image run untimed (what the layers' sum misses: the
/// hand-offs between layers and the timer itself). `run(timed)` runs the image once and, when
/// `timed`, returns each layer's name and time. A 0.5 s warm-up comes first: caches, page
/// faults, the thread pool and the clock speed settle (a cold profile reads up to 30% slower
/// than the steady state).
fn median_profile(
    repeats: usize,
    mut run: impl FnMut(bool) -> Vec<(String, f64)>,
) -> Vec<(String, f64)> {
    let warm = std::time::Instant::now();
    while warm.elapsed().as_secs_f64() < 0.5 {
        run(false);
    }
    let repeats = repeats.max(1);
    let mut runs: Vec<Vec<(String, f64)>> = Vec::with_capacity(repeats);
    let mut whole = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        runs.push(run(true));
        let t = std::time::Instant::now();
        run(false);
        whole.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out: Vec<(String, f64)> = (0..runs[0].len())
        .map(|i| {
            let name = runs[0][i].0.clone();
            (name, median(runs.iter().map(|r| r[i].1).collect()))
        })
        .collect();
    out.push(("whole image".into(), median(whole)));
    out
}

/// The union of two lists of activation ranges, point by point (what calibrating on both
/// image sets would give).
pub fn merge_ranges(a: &[(f32, f32)], b: &[(f32, f32)]) -> Vec<(f32, f32)> {
    assert_eq!(a.len(), b.len(), "ranges of different models");
    a.iter()
        .zip(b)
        .map(|(p, q)| (p.0.min(q.0), p.1.max(q.1)))
        .collect()
}

/// `range` widened to include every value of `v`.
fn widen(range: (f32, f32), v: &[f32]) -> (f32, f32) {
    v.iter().fold(range, |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// `shape` after an optional 2x2 max pool (floor).
fn pooled((c, h, w): (usize, usize, usize), pool: bool) -> (usize, usize, usize) {
    if pool {
        (c, h / 2, w / 2)
    } else {
        (c, h, w)
    }
}

/// `out = w . x + b` with `w` as `[out, in]`.
fn dense(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
    for (o, (row, bias)) in out.iter_mut().zip(w.chunks_exact(x.len()).zip(b)) {
        *o = bias + kernels::dot(row, x);
    }
}
