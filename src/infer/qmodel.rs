//! The int8 engine (issue 14): a model compiled from its f32 weights (BatchNorm folded) and the
//! activation ranges measured on calibration images, computing every convolution in integers.
//!
//! - The RGB input layer: with AVX-512 VNNI, the image is quantized with its calibrated range
//!   to NHWC u8 with a fourth channel (weight zero) and the layer runs as any other 3x3
//!   convolution on the direct kernel ([`QLayer::Input`]); on the other sets it runs in f32
//!   (the f32 engine's direct kernel) and its output is quantized ([`QLayer::F32Input`]).
//! - Each further 3x3 convolution ([`QConv`]: the plain CNNs' layers, the students' stem) and each
//!   separable block ([`QDepthwise`] then a 1x1 [`QConv`]) runs on u8 activations and i8
//!   weights (symmetric, per output channel) with i32 sums; bias, activation, the output's
//!   quantization and the 2x2 max pool are one epilogue.
//! - The head stays f32: the last activation is dequantized, then global average pool +
//!   linear (students) or flatten + linear (plain CNNs). It is a few thousand multiply-adds
//!   against tens of millions in the convolutions, and the logits keep full precision.
//!
//! Ranges: static, from calibration ([`FastModel::calibrate`]), one per layer output plus the
//! input, stored in the model directory. Not per batch: a batch's own range would make an
//! image's answer depend on the other images it is batched with, and measuring it costs a
//! pass over every activation. The depthwise output inside a separable block is quantized
//! on ReLU6's fixed range `[0, 6]` (its output cannot leave it), so the fused f32 kernel
//! need not expose it.

use rayon::prelude::*;

use super::int8::Int8Isa;
use super::kernels::{conv3x3, Act};
use super::quant::{QConv, QDepthwise, QParams};
use super::{dense, fold, is_3x3_same, linear, median_profile, CompileError, FastModel, Head};
use crate::zoo::{Model, ModelSpec, Net};

/// How the RGB input layer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLayer {
    /// In f32, its output quantized ([`QLayer::F32Input`]).
    F32,
    /// In int8 on the image quantized to RGBx u8 ([`QLayer::Input`]).
    Int8,
}

impl InputLayer {
    /// The faster form for a kernel set: int8 where the direct 3x3 kernel exists (AVX-512
    /// VNNI: 9 `vpdpbusd` per output pixel and 16 channels, about 4x faster than the f32
    /// layer), f32 elsewhere (through im2col and the GEMM its 27 multiply-adds per output cost
    /// more than they save: 3.1 ms against 0.6 ms per 256x256 image on one core).
    pub fn for_isa(isa: Int8Isa) -> Self {
        if isa == Int8Isa::Avx512Vnni {
            InputLayer::Int8
        } else {
            InputLayer::F32
        }
    }
}

/// One quantized layer, NHWC u8 in and out, except the first.
#[derive(Debug, Clone)]
enum QLayer {
    /// The RGB input layer in int8: a 3x3 convolution of 4 input channels (R, G, B and one
    /// with zero weights, so that a pixel is one 32-bit word) on the image quantized with the
    /// input's calibrated range, written straight into the padded form the direct kernel
    /// reads.
    Input(QConv),
    /// The RGB input layer (3x3, 3 input channels) in f32 on the f32 engine's direct kernel,
    /// its output quantized to NHWC u8 (see [`InputLayer::for_isa`] for when).
    F32Input {
        oc: usize,
        w: Vec<f32>,
        b: Vec<f32>,
        act: Act,
        pool: bool,
        output: QParams,
    },
    Conv(QConv),
    Separable {
        dw: QDepthwise,
        pw: QConv,
    },
}

/// A model compiled for int8 inference on the CPU.
#[derive(Debug, Clone)]
pub struct Int8Model {
    spec: ModelSpec,
    input: QParams,
    layers: Vec<QLayer>,
    /// The quantization of the last layer's output (the head's input).
    features: QParams,
    head: Head,
    isa: Int8Isa,
}

/// The range `[0, 6]` of a ReLU6 output.
fn relu6_range() -> QParams {
    QParams::from_range(0.0, 6.0)
}

impl Int8Model {
    /// Compiles `model` with `ranges` (input, then each layer's output, as
    /// [`FastModel::calibrate`] measures them) for the best int8 kernel set of this CPU.
    pub fn compile(model: &Model, ranges: &[(f32, f32)]) -> Result<Self, CompileError> {
        Self::compile_for(model, ranges, Int8Isa::detect())
    }

    /// As [`Int8Model::compile`] with a chosen kernel set (tests force each one).
    pub fn compile_for(
        model: &Model,
        ranges: &[(f32, f32)],
        isa: Int8Isa,
    ) -> Result<Self, CompileError> {
        Self::compile_with(model, ranges, isa, InputLayer::for_isa(isa))
    }

    /// As [`Int8Model::compile_for`] with a chosen form of the input layer (tests compare the
    /// kernel sets with the same one: their integer sums are exact, so equal).
    pub fn compile_with(
        model: &Model,
        ranges: &[(f32, f32)],
        isa: Int8Isa,
        input_layer: InputLayer,
    ) -> Result<Self, CompileError> {
        let spec = model.spec().clone();
        let unsupported = || CompileError::Unsupported(format!("{} in int8", spec.arch));
        let expected = FastModel::compile(model)?.calibration_points();
        if ranges.len() != expected {
            return Err(CompileError::Calibration(format!(
                "{} activation ranges for {} (expected {expected}: the input and each layer's \
                 output)",
                ranges.len(),
                spec.arch
            )));
        }
        if let Some((i, r)) = ranges
            .iter()
            .enumerate()
            .find(|(_, r)| !(r.0.is_finite() && r.1.is_finite() && r.0 <= r.1))
        {
            return Err(CompileError::Calibration(format!(
                "activation range {i} is [{}, {}], not a finite interval",
                r.0, r.1
            )));
        }
        let q: Vec<QParams> = ranges
            .iter()
            .map(|&(lo, hi)| QParams::from_range(lo, hi))
            .collect();
        let mut layers = Vec::new();
        // The input layer (3x3, 3 -> oc, pooled) in the chosen form.
        let input = |w: Vec<f32>, b: Vec<f32>, oc: usize, act: Act, input, output| {
            match input_layer {
                InputLayer::F32 => QLayer::F32Input {
                    oc,
                    w,
                    b,
                    act,
                    pool: true,
                    output,
                },
                InputLayer::Int8 => {
                    // [oc][3][3][3] -> [oc][4][3][3], the fourth channel's weights zero.
                    let mut w4 = vec![0f32; oc * 4 * 9];
                    for (dst, src) in w4.chunks_exact_mut(4 * 9).zip(w.chunks_exact(3 * 9)) {
                        dst[..3 * 9].copy_from_slice(src);
                    }
                    QLayer::Input(QConv::new(
                        &w4,
                        &b,
                        (4, oc, 3),
                        act,
                        true,
                        input,
                        output,
                        isa,
                    ))
                }
            }
        };
        let head = match model.net() {
            Net::Plain(net) => {
                for (i, (conv, bn)) in net.blocks().iter().enumerate() {
                    if !is_3x3_same(conv) {
                        return Err(unsupported());
                    }
                    let (ic, oc) = (conv.weight().dim(1)?, conv.weight().dim(0)?);
                    let (w, b) = fold(conv, Some(bn))?;
                    layers.push(if i == 0 {
                        input(w, b, oc, Act::Relu, q[0], q[1])
                    } else {
                        QLayer::Conv(QConv::new(
                            &w,
                            &b,
                            (ic, oc, 3),
                            Act::Relu,
                            true,
                            q[i],
                            q[i + 1],
                            isa,
                        ))
                    });
                }
                let (w, b) = linear(net.fc())?;
                Head::Flatten { w, b }
            }
            Net::Mobile(net) => {
                let (conv, bn) = net.stem();
                if !is_3x3_same(conv) {
                    return Err(unsupported());
                }
                let oc = conv.weight().dim(0)?;
                let (w, b) = fold(conv, Some(bn))?;
                layers.push(input(w, b, oc, Act::Relu6, q[0], q[1]));
                for (i, block) in net.blocks().iter().enumerate() {
                    let c = block.spatial.weight().dim(0)?;
                    if block.spatial.groups() != c
                        || block.spatial.weight().dims4()? != (c, 1, 3, 3)
                        || block.spatial.stride() != 1
                        || block.spatial.padding() != 1
                    {
                        return Err(unsupported());
                    }
                    let oc = block.pointwise.weight().dim(0)?;
                    let (dw_w, dw_b) = fold(&block.spatial, Some(&block.bn))?;
                    let (pw_w, pw_b) = fold(&block.pointwise, None)?;
                    let (input, output) = (q[i + 1], q[i + 2]);
                    layers.push(QLayer::Separable {
                        dw: QDepthwise::new(&dw_w, &dw_b, c, Act::Relu6, input, relu6_range(), isa),
                        pw: QConv::new(
                            &pw_w,
                            &pw_b,
                            (c, oc, 1),
                            Act::None,
                            block.pool,
                            relu6_range(),
                            output,
                            isa,
                        ),
                    });
                }
                let (w, b) = linear(net.fc())?;
                Head::Gap {
                    w,
                    b,
                    channels_last: true,
                }
            }
            Net::MobileV2(_) | Net::Resnet(_) => return Err(unsupported()),
        };
        Ok(Self {
            spec,
            input: q[0],
            features: *q.last().expect("at least the input's range"),
            layers,
            head,
            isa,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The kernel set this model runs.
    pub fn isa(&self) -> Int8Isa {
        self.isa
    }

    /// Logits `[n, classes]` of `n` preprocessed CHW images laid end to end (the same contract
    /// as [`FastModel::forward`]). A batch runs one image per thread.
    pub fn forward(&self, input: &[f32], n: usize) -> Vec<f32> {
        let s = self.spec.input_size;
        let per = 3 * s * s;
        assert_eq!(input.len(), n * per, "input is not {n} images of 3x{s}x{s}");
        let classes = self.spec.num_classes;
        let mut out = vec![0f32; n * classes];
        let threads = rayon::current_num_threads();
        if n >= threads || threads == 1 {
            input
                .par_chunks(per)
                .zip(out.par_chunks_mut(classes))
                .for_each(|(x, o)| self.run(x, o, None, false));
        } else {
            // Fewer images than threads: each layer's bands spread over the threads, which
            // the image holds between layers (`gang`), on a worker.
            for (x, o) in input.chunks(per).zip(out.chunks_mut(classes)) {
                super::gang::with(|| self.run(x, o, None, true));
            }
        }
        out
    }

    /// Milliseconds per layer for one image on one thread, the median of `repeats` (after a
    /// 0.5 s warm-up), then a last row `whole image` (as [`FastModel::profile`]); for profiles
    /// in benchmarks.
    pub fn profile(&self, x: &[f32], repeats: usize) -> Vec<(String, f64)> {
        let mut logits = vec![0f32; self.spec.num_classes];
        median_profile(repeats, |timed| {
            let mut times = Vec::new();
            self.run(x, &mut logits, timed.then_some(&mut times), false);
            times
        })
    }

    fn run(
        &self,
        x: &[f32],
        logits: &mut [f32],
        mut times: Option<&mut Vec<(String, f64)>>,
        split: bool,
    ) {
        let mut started = std::time::Instant::now();
        let mut lap = |what: String, times: &mut Option<&mut Vec<(String, f64)>>| {
            if let Some(t) = times.as_deref_mut() {
                t.push((what, started.elapsed().as_secs_f64() * 1e3));
                started = std::time::Instant::now();
            }
        };
        let s = self.spec.input_size;
        let (mut h, mut w) = (s, s);
        let mut c = 3;
        let mut act = Vec::new();
        for l in &self.layers {
            let (oc, (oh, ow), next) = match l {
                QLayer::Input(conv) => {
                    let xp = quantize_image(x, s, self.input, self.isa);
                    lap(format!("quantize input @{s}x{s}"), &mut times);
                    let (oh, ow) = conv.out_size((h, w));
                    let mut out = vec![0u8; oh * ow * conv.oc()];
                    conv.run_padded(bytemuck::cast_slice(&xp), (h, w), &mut out, split);
                    lap(format!("conv {c}->{} @{h}x{w}", conv.oc()), &mut times);
                    (conv.oc(), (oh, ow), out)
                }
                QLayer::F32Input {
                    oc,
                    w: wt,
                    b,
                    act: a,
                    pool,
                    output,
                } => {
                    let (oh, ow) = if *pool { (h / 2, w / 2) } else { (h, w) };
                    let mut f = vec![0f32; oc * oh * ow];
                    conv3x3(x, (c, h, w), wt, b, *oc, *a, *pool, &mut f, split);
                    // CHW f32 -> NHWC u8.
                    let n = oh * ow;
                    let mut out = vec![0u8; n * oc];
                    for (ch, plane) in f.chunks_exact(n).enumerate() {
                        for (p, &v) in plane.iter().enumerate() {
                            out[p * oc + ch] = output.quantize(v);
                        }
                    }
                    lap(format!("conv {c}->{oc} @{h}x{w} (f32)"), &mut times);
                    (*oc, (oh, ow), out)
                }
                QLayer::Conv(conv) => {
                    let (oh, ow) = conv.out_size((h, w));
                    let mut out = vec![0u8; oh * ow * conv.oc()];
                    conv.run(&act, (h, w), &mut out, split);
                    lap(format!("conv {c}->{} @{h}x{w}", conv.oc()), &mut times);
                    (conv.oc(), (oh, ow), out)
                }
                QLayer::Separable { dw, pw } => {
                    let mut mid = vec![0u8; h * w * c];
                    dw.run(&act, (h, w), &mut mid, split);
                    lap(format!("depthwise {c} @{h}x{w}"), &mut times);
                    let (oh, ow) = pw.out_size((h, w));
                    let mut out = vec![0u8; oh * ow * pw.oc()];
                    pw.run(&mid, (h, w), &mut out, split);
                    lap(format!("pointwise {c}->{} @{h}x{w}", pw.oc()), &mut times);
                    (pw.oc(), (oh, ow), out)
                }
            };
            (c, h, w, act) = (oc, oh, ow, next);
        }
        let f = self.features;
        match &self.head {
            Head::Flatten { w: wt, b } => {
                // The linear layer reads CHW order.
                let mut chw = vec![0f32; c * h * w];
                for (p, px) in act.chunks_exact(c).enumerate() {
                    for (ch, &v) in px.iter().enumerate() {
                        chw[ch * h * w + p] = f.dequantize(v);
                    }
                }
                dense(&chw, wt, b, logits);
            }
            Head::Gap { w: wt, b, .. } => {
                let mut sums = vec![0u32; c];
                for px in act.chunks_exact(c) {
                    sums.iter_mut().zip(px).for_each(|(s, &v)| *s += v as u32);
                }
                let n = (h * w) as f32;
                let pooled: Vec<f32> = sums
                    .iter()
                    .map(|&s| f.scale * (s as f32 / n - f.zero_point as f32))
                    .collect();
                dense(&pooled, wt, b, logits);
            }
        }
        lap("head".into(), &mut times);
    }
}

/// A CHW f32 image (`3 x s x s`) quantized to the padded RGBx form of [`QLayer::Input`]:
/// `[s + 2][s + 2]` pixels of four bytes (R, G, B, then the zero point; the fourth channel's
/// weights are zero), the border holding the zero point (a real zero) in every byte. Words, so
/// that a pixel is one store; [`bytemuck::cast_slice`] views them as the bytes the kernel reads.
fn quantize_image(x: &[f32], s: usize, q: QParams, isa: Int8Isa) -> Vec<u32> {
    assert_eq!(x.len(), 3 * s * s, "input is not 3x{s}x{s}");
    let mut words = vec![q.zero_point as u32 * 0x0101_0101; (s + 2) * (s + 2)];
    match isa {
        // SAFETY: the model was compiled for this set only where it is supported (checked
        // again here), which implies AVX-512 F + BW.
        #[cfg(x86_simd)]
        Int8Isa::Avx512Vnni if isa.supported() => unsafe {
            quantize_image_avx512(x, s, q, &mut words)
        },
        _ => quantize_image_body(x, s, q, &mut words),
    }
    words
}

/// # Safety
/// AVX-512 F + BW.
#[cfg(x86_simd)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_image_avx512(x: &[f32], s: usize, q: QParams, words: &mut [u32]) {
    quantize_image_body(x, s, q, words)
}

/// The loop of [`quantize_image`], the same arithmetic as [`QParams::quantize`] (NaN to 0),
/// written so that it vectorises.
#[inline(always)]
fn quantize_image_body(x: &[f32], s: usize, q: QParams, words: &mut [u32]) {
    let hw = s * s;
    let (r, g, b) = (&x[..hw], &x[hw..2 * hw], &x[2 * hw..3 * hw]);
    let (inv, zph) = (1.0 / q.scale, q.zero_point as f32 + 0.5);
    let zp = q.zero_point;
    #[inline(always)]
    fn byte(v: f32, inv: f32, zph: f32) -> u8 {
        // `max` then `min` never yield NaN (a NaN input becomes 0, as the saturating cast in
        // `QParams::quantize` makes it), so the conversion is defined.
        #[allow(clippy::manual_clamp)]
        let t = (v * inv + zph).max(0.0).min(255.0);
        // SAFETY: `t` is finite and within 0..=255.
        unsafe { t.to_int_unchecked::<i32>() as u8 }
    }
    let pitch = s + 2;
    for y in 0..s {
        let dst = &mut words[(y + 1) * pitch + 1..][..s];
        let (r, g, b) = (&r[y * s..][..s], &g[y * s..][..s], &b[y * s..][..s]);
        for i in 0..s {
            // Native byte order: the bytes in memory are R, G, B, zero point on any target.
            dst[i] = u32::from_ne_bytes([
                byte(r[i], inv, zph),
                byte(g[i], inv, zph),
                byte(b[i], inv, zph),
                zp,
            ]);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::zoo::{Arch, ModelSpec};

    fn model(arch: Arch, size: usize) -> Model {
        crate::zoo::test_models::input_dependent(&ModelSpec::new(arch, 7, size), 5).1
    }

    fn images(n: usize, size: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n * 3 * size * size)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect()
    }

    /// The whole model in int8 against the f32 engine, calibrated on other images than it is
    /// tested on: logits close (relative to their spread), the same top class for most
    /// images, and identical results from every kernel set (the integer sums are exact, so
    /// the sets may differ in speed only).
    fn check(arch: Arch, size: usize) {
        let m = model(arch, size);
        let fast = FastModel::compile(&m).unwrap();
        let ranges = fast.calibrate(&images(16, size, 1), 16);
        assert_eq!(ranges.len(), fast.calibration_points());
        let n = 24;
        let x = images(n, size, 2);
        let want = fast.forward(&x, n);
        let classes = 7;
        let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let argmax = |row: &[f32]| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        for input_layer in [InputLayer::F32, InputLayer::Int8] {
            let mut first: Option<Vec<f32>> = None;
            for isa in Int8Isa::testable("int8 engine") {
                let q = Int8Model::compile_with(&m, &ranges, isa, input_layer).unwrap();
                let what = format!("{arch} {} ({input_layer:?} input layer)", isa.name());
                let got = q.forward(&x, n);
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
                assert!(
                    err < 0.1 * spread,
                    "{what}: max |int8 - f32| = {err} against logits up to {spread}"
                );
                let agree = got
                    .chunks(classes)
                    .zip(want.chunks(classes))
                    .filter(|(g, w)| argmax(g) == argmax(w))
                    .count();
                eprintln!(
                    "{what}: max |int8 - f32| {err:.4} (logits up to {spread:.3}), top class agrees on {agree} of {n}"
                );
                // The test models' logits sit close together (near ties flip under any
                // rounding); the error bound above is the main check.
                assert!(
                    agree * 4 >= n * 3,
                    "{what}: top class agrees on {agree} of {n}"
                );
                // The logits depend on the image.
                assert!(got[..classes] != got[classes..2 * classes]);
                // Batch 1 (each layer split over the pool) answers as the batch does.
                let per = 3 * size * size;
                for i in [0, n - 1] {
                    let one = q.forward(&x[i * per..(i + 1) * per], 1);
                    assert_eq!(
                        one,
                        got[i * classes..(i + 1) * classes],
                        "{what}: image {i} alone"
                    );
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(&got, f, "{what} differs from the first set"),
                }
            }
        }
    }

    #[test]
    fn student_deeper_in_int8_follows_the_f32_engine() {
        check(Arch::StudentDeeper, 32);
    }

    #[test]
    fn student_in_int8_follows_the_f32_engine() {
        check(Arch::Student, 32);
    }

    #[test]
    fn big_in_int8_follows_the_f32_engine() {
        check(Arch::Big, 64);
    }

    /// The padded RGBx image, on every kernel set, is `QParams::quantize` of each value (NaN,
    /// infinities and out-of-range values included) with the zero point in the border and in
    /// every fourth byte.
    #[test]
    fn the_quantized_image_is_exact_on_every_kernel_set() {
        let s = 19;
        let mut x = images(1, s, 3);
        x[5] = f32::NAN;
        x[s * s + 7] = f32::INFINITY;
        x[2 * s * s + 11] = f32::NEG_INFINITY;
        x[40] = 1e9;
        let q = QParams::from_range(-1.7, 2.3);
        let zp = q.zero_point;
        let mut want = vec![zp; (s + 2) * (s + 2) * 4];
        for y in 0..s {
            for xx in 0..s {
                for c in 0..3 {
                    want[((y + 1) * (s + 2) + xx + 1) * 4 + c] =
                        q.quantize(x[c * s * s + y * s + xx]);
                }
            }
        }
        for isa in Int8Isa::testable("quantized input image") {
            let got = quantize_image(&x, s, q, isa);
            assert_eq!(
                bytemuck::cast_slice::<u32, u8>(&got),
                &want[..],
                "{}",
                isa.name()
            );
        }
    }

    #[test]
    fn bad_calibration_is_an_error() {
        let m = model(Arch::Student, 32);
        let points = FastModel::compile(&m).unwrap().calibration_points();
        let short = vec![(0.0, 1.0); points - 1];
        let err = Int8Model::compile(&m, &short).unwrap_err().to_string();
        assert!(err.contains("activation ranges"), "{err}");
        let mut nan = vec![(0.0, 1.0); points];
        nan[2] = (f32::NAN, 1.0);
        let err = Int8Model::compile(&m, &nan).unwrap_err().to_string();
        assert!(err.contains("range 2"), "{err}");
        let mut inverted = vec![(0.0, 1.0); points];
        inverted[1] = (2.0, 1.0);
        assert!(Int8Model::compile(&m, &inverted).is_err());
    }

    #[test]
    fn architectures_without_int8_layers_are_refused() {
        let m = model(Arch::GroupConv, 32);
        assert!(Int8Model::compile(&m, &[(0.0, 1.0); 3]).is_err());
    }
}
