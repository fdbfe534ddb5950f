//! Quantized layers for the int8 execution path (issue 14), built on [`super::int8`]'s GEMM:
//! activations u8 with a scale and zero point (asymmetric, per tensor, from calibration), weights
//! i8 symmetric per output channel, i32 accumulation, and requantization fused into the
//! epilogue with the bias, the activation and the 2x2 max pool.
//!
//! Activations are NHWC (`[h][w][c]`, channels fastest): a 3x3 convolution's im2col row is
//! then nine runs of `c` contiguous bytes, and a pointwise convolution's input is the
//! activation itself.
//!
//! The epilogue computes in f32 per output (`real = s_in * s_w[o] * acc + bias[o]`): one
//! multiply-add per output against `k` integer products per output, and no fixed-point
//! multiplier whose rounding would differ from the f32 model's.

use super::int8::{
    conv3x3_fused, fused_available, gemm_u8i8, pointwise_fused, Int8Isa, PackedI8, Requant,
};
use super::kernels::Act;

/// Scale and zero point of a u8 tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: u8,
}

impl QParams {
    /// The affine u8 mapping of the range `[min, max]`, widened to include 0 (so that zero
    /// padding is exact) and to a non-empty range.
    pub fn from_range(min: f32, max: f32) -> Self {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let span = max - min;
        if !(span.is_finite() && span > 0.0) {
            return QParams {
                scale: 1.0,
                zero_point: 0,
            };
        }
        let scale = span / 255.0;
        let zero_point = (-min / scale).round().clamp(0.0, 255.0) as u8;
        QParams { scale, zero_point }
    }

    /// `x` quantized: rounded to the nearest step (halves up), clamped to `0..=255` (by the
    /// saturating float-to-int cast, which also maps NaN to 0). Branch-free and without a
    /// `round` call, so loops over it vectorise.
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        (x * (1.0 / self.scale) + (self.zero_point as f32 + 0.5)) as u8
    }

    #[inline]
    pub fn dequantize(&self, q: u8) -> f32 {
        self.scale * (q as i32 - self.zero_point as i32) as f32
    }
}

/// Weights `[oc][k]` (f32, row per output channel) quantized symmetrically per output
/// channel: `w[o][t] ~ scales[o] * q[o][t]`, `q` in `-127..=127` (never -128, so that a
/// weight and its negation quantize alike). An all-zero channel gets scale 1.
pub fn quantize_per_channel(w: &[f32], oc: usize) -> (Vec<i8>, Vec<f32>) {
    assert!(
        oc > 0 && w.len().is_multiple_of(oc),
        "{} weights for {oc} channels",
        w.len()
    );
    let k = w.len() / oc;
    let mut q = vec![0i8; w.len()];
    let mut scales = vec![1f32; oc];
    for o in 0..oc {
        let row = &w[o * k..(o + 1) * k];
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max > 0.0 && max.is_finite() {
            scales[o] = max / 127.0;
        }
        for (d, &v) in q[o * k..(o + 1) * k].iter_mut().zip(row) {
            *d = (v / scales[o]).round().clamp(-127.0, 127.0) as i8;
        }
    }
    (q, scales)
}

/// `x` (`[h][w][c]`) with a one-pixel border holding `zero_point` (a real zero): the input of
/// a direct 3x3 convolution ([`QConv::run_padded`]).
pub fn pad(x: &[u8], (h, w): (usize, usize), c: usize, zero_point: u8) -> Vec<u8> {
    assert_eq!(x.len(), h * w * c, "input is not {h}x{w}x{c}");
    let pitch = (w + 2) * c;
    let mut xp = vec![zero_point; (h + 2) * pitch];
    for (y, row) in x.chunks_exact(w * c).enumerate() {
        xp[(y + 1) * pitch + c..][..w * c].copy_from_slice(row);
    }
    xp
}

/// A convolution lowered to the int8 GEMM: 3x3 "same" (stride 1) or 1x1, with its bias,
/// activation, optional 2x2 max pool and output quantization.
#[derive(Debug, Clone)]
pub struct QConv {
    ic: usize,
    oc: usize,
    kernel: usize,
    /// `[k][oc]` with `k` ordered (ky, kx, ic): the im2col row's order.
    packed: PackedI8,
    /// `input.scale * w_scale[o]`: an integer sum to real units.
    mult: Vec<f32>,
    /// `zero_point * column_sum[o]`, subtracted from each sum.
    zp_sums: Vec<i32>,
    bias: Vec<f32>,
    act: Act,
    pool: bool,
    input: QParams,
    output: QParams,
}

impl QConv {
    /// From f32 weights in PyTorch's layout (`[oc][ic][kernel][kernel]`, BatchNorm already
    /// folded) and the calibrated ranges of the layer's input and output.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &[f32],
        bias: &[f32],
        (ic, oc, kernel): (usize, usize, usize),
        act: Act,
        pool: bool,
        input: QParams,
        output: QParams,
        isa: Int8Isa,
    ) -> Self {
        assert!(
            kernel == 1 || kernel == 3,
            "kernel {kernel}: only 1x1 and 3x3"
        );
        let taps = kernel * kernel;
        assert_eq!(
            w.len(),
            oc * ic * taps,
            "weights for {oc}x{ic}x{kernel}x{kernel}"
        );
        assert_eq!(bias.len(), oc, "bias for {oc} channels");
        // Reorder each output channel's weights to (ky, kx, ic), then quantize per channel.
        let mut rows = vec![0f32; oc * taps * ic];
        for o in 0..oc {
            for c in 0..ic {
                for t in 0..taps {
                    rows[o * taps * ic + t * ic + c] = w[(o * ic + c) * taps + t];
                }
            }
        }
        let (q, w_scales) = quantize_per_channel(&rows, oc);
        let k = taps * ic;
        // PackedI8 takes B as `[k][oc]`.
        let mut b = vec![0i8; k * oc];
        for o in 0..oc {
            for t in 0..k {
                b[t * oc + o] = q[o * k + t];
            }
        }
        let packed = PackedI8::new(&b, k, oc, isa);
        let zp_sums = packed
            .column_sums()
            .iter()
            .map(|&c| input.zero_point as i32 * c)
            .collect();
        QConv {
            ic,
            oc,
            kernel,
            packed,
            mult: w_scales.iter().map(|s| s * input.scale).collect(),
            zp_sums,
            bias: bias.to_vec(),
            act,
            pool,
            input,
            output,
        }
    }

    /// Output channels.
    pub fn oc(&self) -> usize {
        self.oc
    }

    /// Output `(h, w)` for an input of `(h, w)`.
    pub fn out_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        if self.pool {
            (h / 2, w / 2)
        } else {
            (h, w)
        }
    }

    /// Whether this layer runs as a direct 3x3 convolution on a padded input
    /// ([`conv3x3_fused`]): AVX-512 VNNI, `ic` a multiple of four.
    fn direct3x3(&self) -> bool {
        self.kernel == 3 && self.ic.is_multiple_of(4) && fused_available(&self.packed)
    }

    /// The layer on one NHWC u8 image `x` (`[h][w][ic]`), into `out` (`[oh][ow][oc]`), in
    /// bands of rows: each band's sums stay in the core's registers or cache, and its
    /// epilogue runs right after them. `split`: the bands spread over rayon's pool (one image on
    /// every core, as batch 1 runs).
    pub fn run(&self, x: &[u8], (h, w): (usize, usize), out: &mut [u8], split: bool) {
        assert_eq!(x.len(), h * w * self.ic, "input is not {h}x{w}x{}", self.ic);
        if self.direct3x3() {
            let xp = pad(x, (h, w), self.ic, self.input.zero_point);
            return self.run_padded(&xp, (h, w), out, split);
        }
        self.bands((h, w), out, split, |y0, rows, dst| {
            self.band(x, (h, w), y0, rows, dst)
        });
    }

    /// As [`QConv::run`] on the input already padded (`[h + 2][w + 2][ic]`, the border holding
    /// the input's zero point), as [`pad`] makes it: the input layer writes its quantized image
    /// straight into that form.
    pub fn run_padded(&self, xp: &[u8], (h, w): (usize, usize), out: &mut [u8], split: bool) {
        let ic = self.ic;
        let pitch = (w + 2) * ic;
        assert_eq!(
            xp.len(),
            (h + 2) * pitch,
            "padded input is not {}x{}x{ic}",
            h + 2,
            w + 2
        );
        if !self.direct3x3() {
            let mut x = vec![0u8; h * w * ic];
            for (y, row) in x.chunks_exact_mut(w * ic).enumerate() {
                row.copy_from_slice(&xp[(y + 1) * pitch + ic..][..w * ic]);
            }
            return self.run(&x, (h, w), out, split);
        }
        let rq = self.epilogue().requant();
        self.bands((h, w), out, split, |y0, rows, dst| {
            let r = rows.min(h - y0);
            let kept = if self.pool { r / 2 * 2 } else { r };
            let src = &xp[y0 * pitch..(y0 + kept + 2) * pitch];
            let done = conv3x3_fused(src, (kept, w), ic, &self.packed, &rq, self.pool, dst);
            assert!(done, "the direct kernel is available (checked above)");
        });
    }

    /// Splits the output into bands of about 256 input pixels (whole pooling row pairs) and
    /// runs `band(first input row, input rows, output band)` on each.
    fn bands(
        &self,
        (h, w): (usize, usize),
        out: &mut [u8],
        split: bool,
        band: impl Fn(usize, usize, &mut [u8]) + Sync,
    ) {
        let (oh, ow) = self.out_size((h, w));
        assert_eq!(
            out.len(),
            oh * ow * self.oc,
            "output is not {oh}x{ow}x{}",
            self.oc
        );
        if oh == 0 || ow == 0 {
            return;
        }
        let mut rows = (256 / w.max(1)).clamp(1, h.max(1));
        if self.pool {
            rows = (rows.div_ceil(2) * 2).max(2);
        }
        let out_rows = if self.pool { rows / 2 } else { rows };
        let band_len = out_rows * ow * self.oc;
        super::gang::for_chunks_mut(out, band_len, split, |i, dst| band(i * rows, rows, dst));
    }

    /// Input rows `y0..y0 + rows` (fewer at the bottom) into their output rows `dst`.
    fn band(&self, x: &[u8], (h, w): (usize, usize), y0: usize, rows: usize, dst: &mut [u8]) {
        let r = rows.min(h - y0);
        let lda = self.packed.a_stride();
        // A pooled band of odd height (the image's last row) drops its last row.
        let kept = if self.pool { r / 2 * 2 } else { r };
        // A 1x1 layer's activation rows are the GEMM's rows as they are.
        let direct = self.kernel == 1 && lda == self.ic;
        if direct {
            let rows = &x[y0 * w * lda..(y0 + kept) * w * lda];
            let rq = self.epilogue().requant();
            if pointwise_fused(rows, (kept, w), &self.packed, &rq, self.pool, dst) {
                return;
            }
        }
        let mut acc = vec![0i32; r * w * self.oc];
        if direct {
            let rows = &x[y0 * w * lda..(y0 + r) * w * lda];
            gemm_u8i8(rows, r * w, &self.packed, &mut acc);
        } else {
            let mut a = vec![0u8; r * w * lda];
            self.im2col(x, (h, w), y0..y0 + r, &mut a);
            gemm_u8i8(&a, r * w, &self.packed, &mut acc);
        }
        self.epilogue()
            .run(&acc[..kept * w * self.oc], (kept, w), dst);
    }

    /// The im2col rows (stride [`PackedI8::a_stride`]) of output rows `ys`: padding pixels
    /// hold the zero point (a real zero).
    fn im2col(&self, x: &[u8], (h, w): (usize, usize), ys: std::ops::Range<usize>, a: &mut [u8]) {
        let ic = self.ic;
        let lda = self.packed.a_stride();
        let zp = self.input.zero_point;
        if self.kernel == 1 {
            let src = &x[ys.start * w * ic..ys.end * w * ic];
            for (row, px) in a.chunks_exact_mut(lda).zip(src.chunks_exact(ic)) {
                row[..ic].copy_from_slice(px);
            }
            return;
        }
        a.fill(zp);
        for (i, y) in ys.enumerate() {
            for ky in 0..3 {
                let sy = y + ky;
                if sy == 0 || sy > h {
                    continue;
                }
                let src_row = &x[(sy - 1) * w * ic..sy * w * ic];
                for kx in 0..3 {
                    let t = (ky * 3 + kx) * ic;
                    // Output pixels xx whose tap reads source column xx + kx - 1 in 0..w.
                    let lo = 1usize.saturating_sub(kx);
                    let hi = (w + 1 - kx).min(w);
                    for xx in lo..hi {
                        let src = &src_row[(xx + kx - 1) * ic..][..ic];
                        let dst = &mut a[(i * w + xx) * lda + t..][..ic];
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }

    /// `sum (x - zp) * w` per output pixel and channel (`[h][w][oc]`), exact: the GEMM's sums
    /// corrected by `zp * column_sum`. The whole image at once: the reference the banded
    /// [`QConv::run`] is tested against.
    pub fn accumulate(&self, x: &[u8], (h, w): (usize, usize)) -> Vec<i32> {
        let oc = self.oc;
        let lda = self.packed.a_stride();
        let mut a = vec![0u8; h * w * lda];
        self.im2col(x, (h, w), 0..h, &mut a);
        let mut acc = vec![0i32; h * w * oc];
        gemm_u8i8(&a, h * w, &self.packed, &mut acc);
        for px in acc.chunks_exact_mut(oc) {
            for (v, &c) in px.iter_mut().zip(&self.zp_sums) {
                *v -= c;
            }
        }
        acc
    }

    fn epilogue(&self) -> Epilogue<'_> {
        Epilogue {
            mult: &self.mult,
            bias: &self.bias,
            zp_sums: &self.zp_sums,
            act: self.act,
            pool: self.pool,
            output: self.output,
            isa: self.packed.isa(),
        }
    }
}

/// Requantization of `[h][w][c]` integer sums: `real = (acc - zp_sums[c]) * mult[c] +
/// bias[c]`, the activation, the output's quantization, then the 2x2 max pool on the u8 values
/// (quantization is monotone, so pooling after it picks the same element as before it).
/// Written as loops over a pixel's channels, compiled for the layer's instruction set
/// ([`vectorised`]), so that they run as vector code.
struct Epilogue<'a> {
    mult: &'a [f32],
    bias: &'a [f32],
    zp_sums: &'a [i32],
    act: Act,
    pool: bool,
    output: QParams,
    isa: Int8Isa,
}

impl<'a> Epilogue<'a> {
    /// The same requantization for kernels that apply it themselves.
    fn requant(&self) -> Requant<'a> {
        Requant {
            corr: self.zp_sums,
            mult: self.mult,
            bias: self.bias,
            bounds: self.act.bounds(),
            inv: 1.0 / self.output.scale,
            zph: self.output.zero_point as f32 + 0.5,
        }
    }

    fn run(&self, acc: &[i32], (h, w): (usize, usize), out: &mut [u8]) {
        let c = self.mult.len();
        let (oh, ow) = if self.pool { (h / 2, w / 2) } else { (h, w) };
        assert!(acc.len() >= h * w * c, "{} sums for {h}x{w}x{c}", acc.len());
        assert_eq!(out.len(), oh * ow * c, "output is not {oh}x{ow}x{c}");
        match self.isa {
            // SAFETY (both): a layer is built for a set only where `Int8Isa::supported` holds
            // (checked again here), which implies the features these functions enable.
            #[cfg(x86_simd)]
            Int8Isa::Avx512Vnni if self.isa.supported() => unsafe {
                x86::epilogue_avx512(self, acc, (h, w), out)
            },
            #[cfg(x86_simd)]
            Int8Isa::Avx2 if self.isa.supported() => unsafe {
                x86::epilogue_avx2(self, acc, (h, w), out)
            },
            _ => self.body(acc, (h, w), out),
        }
    }

    #[inline(always)]
    fn body(&self, acc: &[i32], (h, w): (usize, usize), out: &mut [u8]) {
        let c = self.mult.len();
        let corr = self.zp_sums;
        let (lo, hi) = self.act.bounds();
        let inv = 1.0 / self.output.scale;
        let zph = self.output.zero_point as f32 + 0.5;
        let (mult, bias) = (self.mult, self.bias);
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn requant(
            acc: &[i32],
            corr: &[i32],
            mult: &[f32],
            bias: &[f32],
            (lo, hi): (f32, f32),
            (inv, zph): (f32, f32),
            out: &mut [u8],
        ) {
            let n = out.len();
            let (acc, corr, mult, bias) = (&acc[..n], &corr[..n], &mult[..n], &bias[..n]);
            for o in 0..n {
                let v = ((acc[o] - corr[o]) as f32 * mult[o] + bias[o])
                    .max(lo)
                    .min(hi);
                // `max` then `min` never yield NaN, so the conversion below is defined; a
                // plain (non-saturating) conversion is what vectorises.
                // Not `clamp`: it would pass a NaN through.
                #[allow(clippy::manual_clamp)]
                let q = (v * inv + zph).max(0.0).min(255.0);
                // SAFETY: `q` is finite and within 0..=255.
                out[o] = unsafe { q.to_int_unchecked::<i32>() } as u8;
            }
        }
        let bounds = (lo, hi);
        let q = (inv, zph);
        if !self.pool {
            for (px, dst) in acc.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
                requant(px, corr, mult, bias, bounds, q, dst);
            }
            return;
        }
        let (oh, ow) = (h / 2, w / 2);
        let mut t = vec![0u8; 4 * c];
        for y in 0..oh {
            for x in 0..ow {
                for (i, (dy, dx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                    let at = ((2 * y + dy) * w + 2 * x + dx) * c;
                    requant(
                        &acc[at..at + c],
                        corr,
                        mult,
                        bias,
                        bounds,
                        q,
                        &mut t[i * c..(i + 1) * c],
                    );
                }
                let dst = &mut out[(y * ow + x) * c..][..c];
                let (a, rest) = t.split_at(c);
                let (b, rest) = rest.split_at(c);
                let (d, e) = rest.split_at(c);
                for o in 0..c {
                    dst[o] = a[o].max(b[o]).max(d[o]).max(e[o]);
                }
            }
        }
    }
}

/// The epilogue and the depthwise layer compiled for AVX2 and AVX-512: the same Rust
/// (`#[inline(always)]` bodies), vectorised by the compiler for each instruction set. (The
/// hand-written kernels, the VNNI depthwise among them, are `int8::x86`'s.)
#[cfg(x86_simd)]
mod x86 {
    use super::{Epilogue, QDepthwise};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn epilogue_avx2(
        e: &Epilogue<'_>,
        acc: &[i32],
        hw: (usize, usize),
        out: &mut [u8],
    ) {
        e.body(acc, hw, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn epilogue_avx512(
        e: &Epilogue<'_>,
        acc: &[i32],
        hw: (usize, usize),
        out: &mut [u8],
    ) {
        e.body(acc, hw, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn depthwise_avx2(
        d: &QDepthwise,
        x: &[u8],
        hw: (usize, usize),
        y0: usize,
        out: &mut [u8],
    ) {
        d.rows(x, hw, y0, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn depthwise_avx512(
        d: &QDepthwise,
        x: &[u8],
        hw: (usize, usize),
        y0: usize,
        out: &mut [u8],
    ) {
        d.rows(x, hw, y0, out)
    }
}

/// A 3x3 depthwise convolution ("same", stride 1) on u8 NHWC activations: per-channel i8
/// weights, i32 sums, the same fused epilogue as [`QConv`] (no pool: in the students the pool
/// follows the pointwise convolution).
#[derive(Debug, Clone)]
pub struct QDepthwise {
    c: usize,
    /// `[9][c]`: a tap's weights for all channels side by side (the inner loop's order).
    weights: Vec<i8>,
    mult: Vec<f32>,
    bias: Vec<f32>,
    act: Act,
    input: QParams,
    output: QParams,
    isa: Int8Isa,
    /// `c` zeros: the epilogue's correction (the zero point is subtracted in the sums).
    no_correction: Vec<i32>,
    /// The weights laid out for `vpdpbusd`, where the layer runs on AVX-512 VNNI.
    #[cfg_attr(not(x86_simd), allow(dead_code))]
    vnni: Option<DwVnni>,
}

/// A depthwise layer's weights for AVX-512 VNNI (`c` a multiple of 16): per column tap `kx`
/// and channel, the three kernel rows' weights and a zero (`[3][c][4]`), so that one
/// `vpdpbusd` adds a column's three products for 16 channels; and per channel
/// `zero_point * sum(weights)`, the correction for sums taken over the raw u8 values with the
/// image's border padded with the zero point.
#[derive(Debug, Clone)]
#[cfg_attr(not(x86_simd), allow(dead_code))]
struct DwVnni {
    taps: Vec<i8>,
    corr: Vec<i32>,
}

impl DwVnni {
    /// From the per-channel weights `q` (`[c][3][3]`), where the set and `c` allow it.
    fn new(q: &[i8], c: usize, zero_point: u8, isa: Int8Isa) -> Option<Self> {
        if isa != Int8Isa::Avx512Vnni || !c.is_multiple_of(16) {
            return None;
        }
        let mut taps = vec![0i8; 3 * c * 4];
        for ch in 0..c {
            for ky in 0..3 {
                for kx in 0..3 {
                    taps[(kx * c + ch) * 4 + ky] = q[ch * 9 + ky * 3 + kx];
                }
            }
        }
        let corr = (0..c)
            .map(|ch| zero_point as i32 * q[ch * 9..][..9].iter().map(|&v| v as i32).sum::<i32>())
            .collect();
        Some(DwVnni { taps, corr })
    }
}

impl QDepthwise {
    /// From f32 weights in PyTorch's layout (`[c][1][3][3]`, BatchNorm folded).
    pub fn new(
        w: &[f32],
        bias: &[f32],
        c: usize,
        act: Act,
        input: QParams,
        output: QParams,
        isa: Int8Isa,
    ) -> Self {
        assert_eq!(w.len(), c * 9, "depthwise weights for {c} channels");
        assert_eq!(bias.len(), c, "bias for {c} channels");
        let (q, scales) = quantize_per_channel(w, c);
        let mut weights = vec![0i8; 9 * c];
        for ch in 0..c {
            for t in 0..9 {
                weights[t * c + ch] = q[ch * 9 + t];
            }
        }
        QDepthwise {
            c,
            weights,
            mult: scales.iter().map(|s| s * input.scale).collect(),
            bias: bias.to_vec(),
            act,
            input,
            output,
            isa,
            no_correction: vec![0; c],
            vnni: DwVnni::new(&q, c, input.zero_point, isa),
        }
    }

    /// `sum (x - zp) * w` per pixel and channel (`[h][w][c]`), exact.
    pub fn accumulate(&self, x: &[u8], (h, w): (usize, usize)) -> Vec<i32> {
        let c = self.c;
        assert_eq!(x.len(), h * w * c, "input is not {h}x{w}x{c}");
        let mut acc = vec![0i32; h * w * c];
        for (y, row) in acc.chunks_exact_mut(w * c).enumerate() {
            self.row_sums(x, (h, w), y, row);
        }
        acc
    }

    /// The sums of output row `y` into `acc` (`[w][c]`).
    #[inline(always)]
    fn row_sums(&self, x: &[u8], (h, w): (usize, usize), y: usize, acc: &mut [i32]) {
        let c = self.c;
        let zp = self.input.zero_point as i32;
        acc.fill(0);
        for ky in 0..3 {
            let sy = y + ky;
            if sy == 0 || sy > h {
                continue;
            }
            let src_row = &x[(sy - 1) * w * c..sy * w * c];
            for kx in 0..3 {
                let wt = &self.weights[(ky * 3 + kx) * c..][..c];
                let lo = 1usize.saturating_sub(kx);
                let hi = (w + 1 - kx).min(w);
                for xx in lo..hi {
                    let src = &src_row[(xx + kx - 1) * c..][..c];
                    let dst = &mut acc[xx * c..][..c];
                    for i in 0..c {
                        dst[i] += (src[i] as i32 - zp) * wt[i] as i32;
                    }
                }
            }
        }
    }

    /// The layer on one NHWC u8 image into `out` (`[h][w][c]`), a row at a time (its sums
    /// stay in L1), compiled for the layer's instruction set.
    pub fn run(&self, x: &[u8], (h, w): (usize, usize), out: &mut [u8], split: bool) {
        let c = self.c;
        assert_eq!(x.len(), h * w * c, "input is not {h}x{w}x{c}");
        assert_eq!(out.len(), h * w * c, "output is not {h}x{w}x{c}");
        if h == 0 || w == 0 || c == 0 {
            return;
        }
        if split {
            // Bands of rows over the image's gang (or rayon's pool).
            let rows = (h / (4 * rayon::current_num_threads())).max(1);
            super::gang::for_chunks_mut(out, rows * w * c, true, |i, dst| {
                self.dispatch(x, (h, w), i * rows, dst)
            });
        } else {
            self.dispatch(x, (h, w), 0, out);
        }
    }

    /// Output rows from `y0` into `out`, compiled for the layer's instruction set.
    fn dispatch(&self, x: &[u8], (h, w): (usize, usize), y0: usize, out: &mut [u8]) {
        match self.isa {
            // SAFETY (both): as in `Epilogue::run`.
            #[cfg(x86_simd)]
            Int8Isa::Avx512Vnni if self.isa.supported() => unsafe {
                match &self.vnni {
                    Some(v) => {
                        let rq = self.epilogue(&v.corr).requant();
                        let zp = self.input.zero_point;
                        crate::infer::int8::x86::depthwise_vnni(
                            (self.c, &v.taps, zp),
                            &rq,
                            x,
                            (h, w),
                            y0,
                            out,
                        )
                    }
                    None => x86::depthwise_avx512(self, x, (h, w), y0, out),
                }
            },
            #[cfg(x86_simd)]
            Int8Isa::Avx2 if self.isa.supported() => unsafe {
                x86::depthwise_avx2(self, x, (h, w), y0, out)
            },
            _ => self.rows(x, (h, w), y0, out),
        }
    }

    /// The requantization of this layer's sums, `zp_sums` subtracted first.
    fn epilogue<'a>(&'a self, zp_sums: &'a [i32]) -> Epilogue<'a> {
        Epilogue {
            mult: &self.mult,
            bias: &self.bias,
            zp_sums,
            act: self.act,
            pool: false,
            output: self.output,
            isa: self.isa,
        }
    }

    #[inline(always)]
    fn rows(&self, x: &[u8], (h, w): (usize, usize), y0: usize, out: &mut [u8]) {
        let c = self.c;
        let e = self.epilogue(&self.no_correction);
        let mut acc = vec![0i32; w * c];
        for (y, dst) in out.chunks_exact_mut(w * c).enumerate() {
            self.row_sums(x, (h, w), y0 + y, &mut acc);
            e.body(&acc, (1, w), dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn sets() -> Vec<Int8Isa> {
        Int8Isa::testable("quantized layers")
    }

    /// Exact reference: `sum (x - zp) * q` over the taps inside the image, straight from the
    /// NCHW-free definition (no im2col, no packing).
    fn reference_acc(
        x: &[u8],
        (h, w, ic): (usize, usize, usize),
        zp: u8,
        q: &[i8],
        (oc, kernel): (usize, usize),
    ) -> Vec<i32> {
        // `q` is `[oc][ky][kx][ic]`.
        let r = (kernel / 2) as isize;
        let mut acc = vec![0i32; h * w * oc];
        for y in 0..h as isize {
            for xx in 0..w as isize {
                for o in 0..oc {
                    let mut s = 0i32;
                    for ky in 0..kernel as isize {
                        for kx in 0..kernel as isize {
                            let (sy, sx) = (y + ky - r, xx + kx - r);
                            if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                continue;
                            }
                            for c in 0..ic {
                                let xv = x[((sy as usize) * w + sx as usize) * ic + c] as i32
                                    - zp as i32;
                                let t = ((ky as usize * kernel) + kx as usize) * ic + c;
                                s += xv * q[o * kernel * kernel * ic + t] as i32;
                            }
                        }
                    }
                    acc[((y as usize) * w + xx as usize) * oc + o] = s;
                }
            }
        }
        acc
    }

    /// Every kernel set, 3x3 and 1x1, odd sizes and channel counts (not multiples of 4 or 16),
    /// nonzero zero points: the layer's integer sums equal the exact reference.
    #[test]
    fn conv_sums_match_the_exact_reference_on_every_kernel_set() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for isa in sets() {
            for &(h, w, ic, oc, kernel) in &[
                (5, 7, 3, 5, 3),
                (4, 4, 1, 17, 3),
                (6, 3, 13, 33, 3),
                (3, 5, 7, 9, 1),
                (2, 9, 20, 16, 1),
            ] {
                let wts: Vec<f32> = (0..oc * ic * kernel * kernel).map(|_| rng.f32()).collect();
                let bias = vec![0.0; oc];
                let input = QParams {
                    scale: 0.02,
                    zero_point: (rng.next() % 256) as u8,
                };
                let layer = QConv::new(
                    &wts,
                    &bias,
                    (ic, oc, kernel),
                    Act::None,
                    false,
                    input,
                    QParams::from_range(-1.0, 1.0),
                    isa,
                );
                let x: Vec<u8> = (0..h * w * ic).map(|_| rng.next() as u8).collect();
                // The reference uses the same quantized weights, in (ky, kx, ic) order.
                let taps = kernel * kernel;
                let mut rows = vec![0f32; oc * taps * ic];
                for o in 0..oc {
                    for c in 0..ic {
                        for t in 0..taps {
                            rows[o * taps * ic + t * ic + c] = wts[(o * ic + c) * taps + t];
                        }
                    }
                }
                let (q, _) = quantize_per_channel(&rows, oc);
                let want = reference_acc(&x, (h, w, ic), input.zero_point, &q, (oc, kernel));
                assert_eq!(
                    layer.accumulate(&x, (h, w)),
                    want,
                    "{} {h}x{w} ic={ic} oc={oc} k={kernel}",
                    isa.name()
                );
            }
        }
    }

    /// The banded, vectorised `run` equals the whole-image sums requantized by the plain
    /// definition (`QParams::quantize` of the activation, then the max of each 2x2 window), on
    /// every kernel set, with images tall enough for several bands and an odd last row.
    #[test]
    fn banded_run_equals_the_reference_epilogue_on_every_kernel_set() {
        let mut rng = Rng(31);
        for isa in sets() {
            for &(h, w, ic, oc, kernel, pool, act) in &[
                (71, 5, 3, 16, 3, true, Act::Relu6),
                (9, 40, 7, 20, 3, false, Act::Relu),
                (33, 17, 24, 40, 1, true, Act::None),
                (6, 6, 16, 32, 1, false, Act::None),
                (5, 9, 20, 50, 1, false, Act::Relu6),
                (4, 7, 12, 16, 1, true, Act::Relu),
                // Multiples of four input channels: the direct 3x3 kernel on VNNI.
                (13, 11, 4, 16, 3, true, Act::Relu6),
                (7, 9, 8, 40, 3, false, Act::Relu),
                (10, 3, 12, 33, 3, true, Act::None),
                (1, 1, 4, 5, 3, false, Act::Relu),
                (3, 70, 32, 64, 3, true, Act::Relu),
            ] {
                let wts: Vec<f32> = (0..oc * ic * kernel * kernel).map(|_| rng.f32()).collect();
                let bias: Vec<f32> = (0..oc).map(|_| rng.f32()).collect();
                let input = QParams::from_range(-1.0, 3.0);
                let output = QParams::from_range(-2.0, 6.0);
                let layer =
                    QConv::new(&wts, &bias, (ic, oc, kernel), act, pool, input, output, isa);
                let x: Vec<u8> = (0..h * w * ic).map(|_| rng.next() as u8).collect();
                let acc = layer.accumulate(&x, (h, w));
                let q = |p: usize, o: usize| {
                    let real = acc[p * oc + o] as f32 * layer.mult[o] + bias[o];
                    output.quantize(act.apply(real))
                };
                let (oh, ow) = layer.out_size((h, w));
                let mut want = vec![0u8; oh * ow * oc];
                for y in 0..oh {
                    for xx in 0..ow {
                        for o in 0..oc {
                            want[(y * ow + xx) * oc + o] = if pool {
                                q((2 * y) * w + 2 * xx, o)
                                    .max(q((2 * y) * w + 2 * xx + 1, o))
                                    .max(q((2 * y + 1) * w + 2 * xx, o))
                                    .max(q((2 * y + 1) * w + 2 * xx + 1, o))
                            } else {
                                q(y * w + xx, o)
                            };
                        }
                    }
                }
                let mut got = vec![0u8; oh * ow * oc];
                layer.run(&x, (h, w), &mut got, false);
                let mut split = vec![0u8; oh * ow * oc];
                layer.run(&x, (h, w), &mut split, true);
                assert_eq!(split, got, "{} split", isa.name());
                if kernel == 3 {
                    let xp = pad(&x, (h, w), ic, input.zero_point);
                    let mut padded = vec![0u8; oh * ow * oc];
                    layer.run_padded(&xp, (h, w), &mut padded, false);
                    assert_eq!(padded, got, "{} padded input", isa.name());
                }
                assert_eq!(
                    got,
                    want,
                    "{} {h}x{w} {ic}->{oc} k{kernel} pool {pool}",
                    isa.name()
                );
            }
        }
    }

    /// Against the f32 layer: a 3x3 conv + ReLU + pool on quantized data, dequantized, stays
    /// within the quantization steps of the f32 result computed from the same (dequantized)
    /// input.
    #[test]
    fn conv_relu_pool_follows_the_f32_layer() {
        let mut rng = Rng(7);
        let (h, w, ic, oc) = (8, 6, 5, 12);
        let wts: Vec<f32> = (0..oc * ic * 9).map(|_| rng.f32() * 0.3).collect();
        let bias: Vec<f32> = (0..oc).map(|_| rng.f32() * 0.1).collect();
        let input = QParams::from_range(-1.0, 1.0);
        let output = QParams::from_range(0.0, 3.0);
        let x: Vec<u8> = (0..h * w * ic).map(|_| rng.next() as u8).collect();
        let xf: Vec<f32> = x.iter().map(|&q| input.dequantize(q)).collect();
        // f32 reference in NHWC with the original weights.
        let mut want = vec![f32::MIN; (h / 2) * (w / 2) * oc];
        for y in 0..h {
            for xx in 0..w {
                for o in 0..oc {
                    let mut s = bias[o];
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (sy, sx) = (y as isize + ky - 1, xx as isize + kx - 1);
                            if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                continue;
                            }
                            for c in 0..ic {
                                s += xf[((sy as usize) * w + sx as usize) * ic + c]
                                    * wts[((o * ic + c) * 3 + ky as usize) * 3 + kx as usize];
                            }
                        }
                    }
                    let p = ((y / 2) * (w / 2) + xx / 2) * oc + o;
                    want[p] = want[p].max(s.max(0.0));
                }
            }
        }
        for isa in sets() {
            let layer = QConv::new(
                &wts,
                &bias,
                (ic, oc, 3),
                Act::Relu,
                true,
                input,
                output,
                isa,
            );
            let mut out = vec![0u8; (h / 2) * (w / 2) * oc];
            layer.run(&x, (h, w), &mut out, false);
            let mut worst = 0f32;
            for (&q, &f) in out.iter().zip(&want) {
                let got = output.dequantize(q);
                worst = worst.max((got - f.min(3.0)).abs());
            }
            eprintln!("{} worst {worst} step {}", isa.name(), output.scale);
            // One output step for rounding, plus the weights' quantization error (about
            // half a step of each weight's channel scale times the input's magnitude, summed
            // over 45 taps): measured well under two output steps.
            assert!(
                worst <= 2.0 * output.scale,
                "{}: worst error {worst} (output step {})",
                isa.name(),
                output.scale
            );
        }
    }

    #[test]
    fn quantization_parameters_cover_zero_and_round_trip() {
        let p = QParams::from_range(-0.5, 1.5);
        assert_eq!(p.quantize(0.0), p.zero_point);
        assert_eq!(p.dequantize(p.zero_point), 0.0);
        for v in [-0.5f32, -0.1, 0.3, 1.5] {
            assert!((p.dequantize(p.quantize(v)) - v).abs() <= p.scale / 2.0 + 1e-6);
        }
        // A range on one side of zero is widened to include it.
        let relu = QParams::from_range(0.25, 4.0);
        assert_eq!(relu.zero_point, 0);
        assert!((relu.scale - 4.0 / 255.0).abs() < 1e-7);
        // Degenerate ranges do not divide by zero.
        assert_eq!(QParams::from_range(0.0, 0.0).scale, 1.0);
        let (q, s) = quantize_per_channel(&[0.0, 0.0, 1.0, -2.0], 2);
        assert_eq!(q, vec![0, 0, 64, -127]);
        assert_eq!(s, vec![1.0, 2.0 / 127.0]);
    }

    /// The depthwise layer's integer sums equal the exact reference (the 3x3 reference with
    /// one input channel per output channel), and its output follows the f32 layer.
    /// Every kernel set this CPU runs (the VNNI one where `c` is a multiple of 16, on its
    /// own interleaved layout) gives the portable set's bytes exactly: the same integer sums
    /// through the same requantization. Odd sizes, one-pixel images, zero points at both ends
    /// (the border padding), bands split over the pool.
    #[test]
    fn depthwise_kernel_sets_agree_exactly() {
        let mut rng = Rng(7);
        let sets = sets();
        for &(h, w, c) in &[
            (5, 7, 16),
            (1, 1, 16),
            (4, 9, 32),
            (3, 3, 48),
            (6, 5, 17),
            (2, 8, 3),
        ] {
            for zp in [0u8, 255, (rng.next() % 256) as u8] {
                let wts: Vec<f32> = (0..c * 9).map(|_| rng.f32()).collect();
                let bias: Vec<f32> = (0..c).map(|_| rng.f32() * 0.1).collect();
                let input = QParams {
                    scale: 1.0 / 64.0,
                    zero_point: zp,
                };
                let output = QParams::from_range(-1.0, 6.0);
                let x: Vec<u8> = (0..h * w * c).map(|_| rng.next() as u8).collect();
                let layer = |isa| QDepthwise::new(&wts, &bias, c, Act::Relu6, input, output, isa);
                let mut want = vec![0u8; h * w * c];
                layer(Int8Isa::Portable).run(&x, (h, w), &mut want, false);
                for &isa in &sets {
                    for split in [false, true] {
                        let mut got = vec![0u8; h * w * c];
                        layer(isa).run(&x, (h, w), &mut got, split);
                        assert_eq!(
                            got,
                            want,
                            "{} {h}x{w}x{c} zp={zp} split={split}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn depthwise_matches_the_exact_reference_and_the_f32_layer() {
        let mut rng = Rng(99);
        for &(h, w, c) in &[(5, 7, 3), (4, 4, 17), (3, 6, 40)] {
            let wts: Vec<f32> = (0..c * 9).map(|_| rng.f32()).collect();
            let bias: Vec<f32> = (0..c).map(|_| rng.f32() * 0.1).collect();
            let input = QParams {
                scale: 1.0 / 64.0,
                zero_point: (rng.next() % 256) as u8,
            };
            let output = QParams::from_range(0.0, 6.0);
            let isa = sets()[(rng.next() % sets().len() as u64) as usize];
            let layer = QDepthwise::new(&wts, &bias, c, Act::Relu6, input, output, isa);
            let x: Vec<u8> = (0..h * w * c).map(|_| rng.next() as u8).collect();
            let (q, w_scales) = quantize_per_channel(&wts, c);
            let acc = layer.accumulate(&x, (h, w));
            for ch in 0..c {
                // Channel `ch` alone, as a 1-in 1-out 3x3 convolution.
                let xc: Vec<u8> = (0..h * w).map(|p| x[p * c + ch]).collect();
                let want =
                    reference_acc(&xc, (h, w, 1), input.zero_point, &q[ch * 9..][..9], (1, 3));
                let got: Vec<i32> = (0..h * w).map(|p| acc[p * c + ch]).collect();
                assert_eq!(got, want, "{h}x{w} c={c} channel {ch}");
            }
            let mut out = vec![0u8; h * w * c];
            layer.run(&x, (h, w), &mut out, false);
            // Each output within half an output step (rounding) plus what the weights'
            // rounding (at most half their channel's step each) can move it: sum |x| * step / 2.
            let mut worst = 0f32;
            for y in 0..h {
                for xx in 0..w {
                    for ch in 0..c {
                        let (mut s, mut bound) = (bias[ch], output.scale / 2.0 + 1e-5);
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (sy, sx) = (y as isize + ky - 1, xx as isize + kx - 1);
                                if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                    continue;
                                }
                                let v =
                                    input.dequantize(x[((sy as usize) * w + sx as usize) * c + ch]);
                                s += v * wts[ch * 9 + (ky * 3 + kx) as usize];
                                bound += v.abs() * w_scales[ch] / 2.0;
                            }
                        }
                        let got = output.dequantize(out[(y * w + xx) * c + ch]);
                        let err = (got - s.clamp(0.0, 6.0)).abs();
                        assert!(err <= bound, "({y},{xx},{ch}): error {err} > bound {bound}");
                        worst = worst.max(err / output.scale);
                    }
                }
            }
            eprintln!("depthwise {h}x{w}x{c}: worst error {worst:.2} output steps");
        }
    }
}
