//! Channels-last (NHWC) kernels for MobileNetV2's layers: the 1x1 convolution as a GEMM over
//! pixels with weights packed once at load, and the 3x3 depthwise convolution (stride 1 or 2)
//! vectorised across channels.
//!
//! Why channels-last here: a 1x1 convolution over `[pixels, ic]` rows is a GEMM whose left
//! operand needs no packing (each pixel's channels are contiguous, read by broadcast) and whose
//! right operand (the weights) is packed once, at compile time, into panels of [`NR`] output
//! channels; the output tile is written with bias, activation and the residual add fused. The
//! depthwise convolution then runs across channels, so its vectors are full whatever the
//! spatial size (7x7 rows are as fast as 112x112 ones) and stride 2 reads only the pixels it
//! needs. The CHW engine's GEMM (the `gemm` crate, which packs both operands per call) ran
//! these layers at about half of ONNX Runtime's speed.
//!
//! Each kernel has an AVX2+FMA form (x86-64, chosen at run time; in `infer::avx2::nhwc`) and a
//! portable form that the tests compare it with; the GEMM also has an AVX-512 form
//! (`infer::avx512::nhwc`), which the AVX-512 set runs with the AVX2 depthwise and stem.

use std::sync::atomic::AtomicBool;

use super::kernels::Act;

/// Output channels per packed weight panel (two AVX2 registers).
pub const NR: usize = 16;
/// Pixels per register tile of the AVX2 GEMM (6 x 2 accumulators + 2 weights + 1 broadcast).
#[cfg(x86_simd)]
pub(super) const MR: usize = 6;

/// Whether these layers run the AVX-512 kernel set's channels-last kernels on a CPU that has
/// it (on by default), else the AVX2 set's: a switch for `examples/nhwc_tiles.rs`, which
/// alternates the two in one process.
#[doc(hidden)]
pub static NHWC_AVX512: AtomicBool = AtomicBool::new(true);

/// This CPU's kernel set, if it has one (AVX2+FMA or better).
#[cfg(x86_simd)]
fn simd() -> Option<&'static super::isa::Kernels> {
    let level = crate::simd::level();
    if level == crate::simd::AVX512 && !NHWC_AVX512.load(std::sync::atomic::Ordering::Relaxed) {
        return super::isa::set(crate::simd::AVX2);
    }
    super::isa::set(level)
}

/// Floats aligned to 64 bytes: `Vec` with `off` leading floats skipped.
#[derive(Debug)]
pub(super) struct Aligned {
    buf: Vec<f32>,
    off: usize,
}

impl Clone for Aligned {
    /// A fresh allocation, aligned anew.
    fn clone(&self) -> Self {
        let data = self.as_slice();
        let n = self.buf.len() - 16;
        let mut c = Self::zeroed(n);
        c.as_mut_slice()[..n].copy_from_slice(&data[..n]);
        c
    }
}

impl Aligned {
    fn zeroed(n: usize) -> Self {
        let buf = vec![0f32; n + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        Self { buf, off }
    }

    pub(super) fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..]
    }
}

/// A 1x1 convolution (`[oc, ic]` weights + bias) over channels-last pixels.
#[derive(Debug, Clone)]
pub struct Gemm1x1 {
    pub ic: usize,
    pub oc: usize,
    /// `[oc / NR, ic, NR]`, the last panel padded with zero channels.
    pub(super) panels: Aligned,
    /// The bias padded to whole panels.
    pub(super) bias: Vec<f32>,
}

impl Gemm1x1 {
    pub fn new(w: &[f32], b: &[f32], ic: usize) -> Self {
        let oc = b.len();
        assert_eq!(w.len(), oc * ic, "weights are not {oc}x{ic}");
        let n = oc.div_ceil(NR);
        let mut panels = Aligned::zeroed(n * ic * NR);
        let p = panels.as_mut_slice();
        for o in 0..oc {
            for i in 0..ic {
                p[((o / NR) * ic + i) * NR + o % NR] = w[o * ic + i];
            }
        }
        let mut bias = b.to_vec();
        bias.resize(n * NR, 0.0);
        Self {
            ic,
            oc,
            panels,
            bias,
        }
    }

    /// Panels of [`NR`] output channels.
    pub fn panels(&self) -> usize {
        self.oc.div_ceil(NR)
    }

    /// `out[p, o] = act(bias[o] + sum_i x[p, i] w[o, i] (+ add[p, o]))` for pixels `0..n`:
    /// pixel `p`'s channels are `x[p * ldx..][..ic]`, its outputs `out[p * ldo..][..oc]` and
    /// its residual `add[p * ldo..][..oc]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        x: &[f32],
        ldx: usize,
        n: usize,
        out: &mut [f32],
        ldo: usize,
        add: Option<&[f32]>,
        act: Act,
    ) {
        if n == 0 {
            return;
        }
        assert!(
            ldo >= self.oc && out.len() >= (n - 1) * ldo + self.oc,
            "output rows"
        );
        // SAFETY: out holds the n rows (checked), borrowed exclusively.
        unsafe {
            self.run_panels(
                x,
                ldx,
                n,
                out.as_mut_ptr(),
                ldo,
                add,
                act,
                (0, self.panels()),
            )
        }
    }

    /// Whether [`Self::run_gather`] has a kernel here (AVX2, whole 16-channel panels).
    pub fn gathers(&self) -> bool {
        #[cfg(x86_simd)]
        {
            simd().is_some() && self.oc.is_multiple_of(NR)
        }
        #[cfg(not(x86_simd))]
        {
            false
        }
    }

    /// [`Self::run`] with each pixel's inputs gathered from `x` instead of a dense row: pixel
    /// `p`'s input `i` is `x[base + p * step + offs[i]]` (a strided convolution's taps read
    /// straight from the image), outputs dense (`ldo = oc`), no residual. `false` (nothing
    /// written) where there is no such kernel: without AVX2, or `oc` not whole panels; the
    /// caller then packs the inputs itself.
    #[allow(clippy::too_many_arguments)]
    pub fn run_gather(
        &self,
        x: &[f32],
        base: usize,
        step: usize,
        offs: &[usize],
        n: usize,
        out: &mut [f32],
        act: Act,
    ) -> bool {
        assert_eq!(offs.len(), self.ic, "one offset per input");
        if n == 0 {
            return true;
        }
        let last = base + (n - 1) * step + offs.iter().copied().max().unwrap_or(0);
        assert!(last < x.len(), "gathered input {last} past {}", x.len());
        assert!(out.len() >= n * self.oc, "output rows");
        #[cfg(x86_simd)]
        if let Some(k) = simd().filter(|_| self.gathers()) {
            // SAFETY: the CPU has the set's instructions; every gathered index is at most `last`
            // (checked), out holds n rows of oc (checked) and is borrowed exclusively.
            unsafe {
                (k.nhwc_gemm_gather)(
                    self,
                    x.as_ptr().add(base),
                    step,
                    offs,
                    n,
                    out.as_mut_ptr(),
                    act,
                )
            };
            return true;
        }
        let _ = act;
        false
    }

    /// [`Self::run`] for the output channels of panels `p0..p1` only.
    ///
    /// # Safety
    /// `out` must address `n` rows of `ldo >= oc` floats, whose columns
    /// `p0 * NR..min(p1 * NR, oc)` no other thread reads or writes during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_panels(
        &self,
        x: &[f32],
        ldx: usize,
        n: usize,
        out: *mut f32,
        ldo: usize,
        add: Option<&[f32]>,
        act: Act,
        (p0, p1): (usize, usize),
    ) {
        let (ic, oc) = (self.ic, self.oc);
        if n == 0 || oc == 0 || p0 >= p1 {
            return;
        }
        assert!(
            p1 <= self.panels(),
            "panels {p0}..{p1} of {}",
            self.panels()
        );
        assert!(ldx >= ic && x.len() >= (n - 1) * ldx + ic, "input rows");
        assert!(ldo >= oc, "output row stride {ldo} < {oc}");
        if let Some(a) = add {
            assert!(a.len() >= (n - 1) * ldo + oc, "residual rows");
        }
        #[cfg(x86_simd)]
        if let Some(k) = simd() {
            // SAFETY: the CPU has the set's instructions; the lengths are checked above, out is
            // the caller's.
            unsafe { (k.nhwc_gemm)(self, x, ldx, n, out, ldo, add, act, (p0, p1)) };
            return;
        }
        // SAFETY: as above.
        unsafe { self.portable(x, ldx, n, out, ldo, add, act, (p0, p1)) };
    }

    /// # Safety
    /// As [`Self::run_panels`], with its checks done.
    #[allow(clippy::too_many_arguments)]
    unsafe fn portable(
        &self,
        x: &[f32],
        ldx: usize,
        n: usize,
        out: *mut f32,
        ldo: usize,
        add: Option<&[f32]>,
        act: Act,
        (p0, p1): (usize, usize),
    ) {
        let (ic, oc) = (self.ic, self.oc);
        let (lo, hi) = act.bounds();
        let panels = self.panels.as_slice();
        for p in p0..p1 {
            let panel = &panels[p * ic * NR..][..ic * NR];
            let cols = NR.min(oc - p * NR);
            for r in 0..n {
                let mut acc = [0f32; NR];
                acc.copy_from_slice(&self.bias[p * NR..][..NR]);
                for (&a, wk) in x[r * ldx..][..ic].iter().zip(panel.chunks_exact(NR)) {
                    for j in 0..NR {
                        acc[j] += a * wk[j];
                    }
                }
                for (j, acc) in acc.iter().enumerate().take(cols) {
                    let at = r * ldo + p * NR + j;
                    let res = add.map_or(0.0, |a| a[at]);
                    // SAFETY: row r < n, column < oc <= ldo: inside the caller's rows.
                    unsafe { *out.add(at) = (acc + res).max(lo).min(hi) };
                }
            }
        }
    }
}

/// A 3x3 depthwise convolution (padding 1, stride 1 or 2) + bias + ReLU6 over channels-last
/// rows, `c` channels.
#[derive(Debug, Clone)]
pub struct Depthwise {
    pub c: usize,
    /// `[9, c]`: tap `ky * 3 + kx` of every channel, contiguous.
    pub(super) k: Vec<f32>,
    pub(super) b: Vec<f32>,
}

impl Depthwise {
    pub fn new(k: &[[f32; 9]], b: &[f32]) -> Self {
        let c = k.len();
        assert_eq!(b.len(), c, "bias");
        let mut t = vec![0f32; 9 * c];
        for (ch, taps) in k.iter().enumerate() {
            for (i, &v) in taps.iter().enumerate() {
                t[i * c + ch] = v;
            }
        }
        Self {
            c,
            k: t,
            b: b.to_vec(),
        }
    }

    /// Output rows `oy0..oy1` (of an `h x w` input at stride `s`) into `dst`
    /// (`[(oy1 - oy0) * ow, c]`). Source row `y` is `src[(y - first) * w * c..][..w * c]`
    /// for the rows `oy0 * s - 1 ..= (oy1 - 1) * s + 1` that lie inside `0..h`.
    pub fn run(
        &self,
        src: &[f32],
        first: usize,
        (h, w): (usize, usize),
        s: usize,
        (oy0, oy1): (usize, usize),
        dst: &mut [f32],
    ) {
        let ow = (w - 1) / s + 1;
        assert!(
            dst.len() >= (oy1 - oy0) * ow * self.c,
            "depthwise output rows"
        );
        // SAFETY: dst holds the rows (checked), borrowed exclusively.
        unsafe {
            self.run_channels(
                src,
                first,
                (h, w),
                s,
                (oy0, oy1),
                dst.as_mut_ptr(),
                (0, self.c),
            )
        }
    }

    /// [`Self::run`] for channels `c0..c1` only.
    ///
    /// # Safety
    /// `dst` must address `(oy1 - oy0) * ow` rows of `c` floats whose columns `c0..c1` no
    /// other thread reads or writes during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_channels(
        &self,
        src: &[f32],
        first: usize,
        (h, w): (usize, usize),
        s: usize,
        (oy0, oy1): (usize, usize),
        dst: *mut f32,
        (c0, c1): (usize, usize),
    ) {
        let c = self.c;
        assert!(c0 <= c1 && c1 <= c, "channels {c0}..{c1} of {c}");
        assert!(s >= 1 && w >= 1, "stride {s}, width {w}");
        let ow = (w - 1) / s + 1;
        let row_len = w * c;
        for oy in oy0..oy1 {
            let row = |ky: usize| -> Option<&[f32]> {
                let y = (oy * s + ky).checked_sub(1)?;
                if y >= h {
                    return None;
                }
                let at = (y - first) * row_len;
                Some(&src[at..at + row_len])
            };
            let rows = [row(0), row(1), row(2)];
            // SAFETY: output row oy - oy0 of the caller's rows.
            let out = unsafe { dst.add((oy - oy0) * ow * c) };
            #[cfg(x86_simd)]
            if let Some(k) = simd() {
                // SAFETY: the CPU has the set's instructions; every row is w * c floats (sliced
                // above), out ow rows of c floats, channels checked.
                unsafe { (k.nhwc_depthwise_row)(self, rows, w, s, out, ow, (c0, c1)) };
                continue;
            }
            // SAFETY: as above.
            unsafe { self.row_portable(rows, w, s, out, ow, (c0, c1)) };
        }
    }

    /// # Safety
    /// `out` addresses `ow` pixels of `c` floats, columns `c0..c1` this call's own.
    unsafe fn row_portable(
        &self,
        rows: [Option<&[f32]>; 3],
        w: usize,
        s: usize,
        out: *mut f32,
        ow: usize,
        (c0, c1): (usize, usize),
    ) {
        let c = self.c;
        for ox in 0..ow {
            // SAFETY: pixel ox's columns c0..c1, the caller's.
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(ox * c + c0), c1 - c0) };
            o.copy_from_slice(&self.b[c0..c1]);
            for (ky, r) in rows.iter().enumerate() {
                let Some(r) = r else { continue };
                for kx in 0..3 {
                    let Some(x) = (ox * s + kx).checked_sub(1).filter(|&x| x < w) else {
                        continue;
                    };
                    let k = &self.k[(ky * 3 + kx) * c + c0..][..c1 - c0];
                    for ((o, &k), &v) in o.iter_mut().zip(k).zip(&r[x * c + c0..][..c1 - c0]) {
                        *o += k * v;
                    }
                }
            }
            for v in o.iter_mut() {
                *v = v.clamp(0.0, 6.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The dispatched kernels against the portable ones and a plain reference at every level
    /// the CPU has, forced in turn (the AVX-512 set has its own GEMM and the AVX2 depthwise), on
    /// odd shapes: pixel tails of every tile height (AVX2: 6 rows; AVX-512: 12, then two
    /// near-equal tiles of up to 14), channel tails of every panel width, panel pairs and a
    /// lone last panel, strided rows, the residual add and each activation.
    #[test]
    fn kernels_match_reference() {
        let mut gemms = Vec::new();
        crate::simd::testing::each_level("nhwc kernels", |level| gemms.push((level, nhwc_cases())));
        // The AVX2 and AVX-512 GEMM tiles sum each output's inputs in the same order from
        // zero, then add the bias and the residual: the same bits (the portable loop starts
        // from the bias, so it only agrees within rounding).
        let simd: Vec<_> = gemms
            .iter()
            .filter(|(level, _)| *level != crate::simd::PORTABLE)
            .collect();
        for pair in simd.windows(2) {
            let ((a, x), (b, y)) = (pair[0], pair[1]);
            assert_eq!(x.len(), y.len());
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert!(
                    x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits()),
                    "gemm case {i}: levels {a} and {b} differ"
                );
            }
        }
    }

    /// Every case's checks at the level in force; returns each GEMM output.
    fn nhwc_cases() -> Vec<Vec<f32>> {
        let mut outs = Vec::new();
        let mut rng = StdRng::seed_from_u64(3);
        for (ic, oc, n) in [
            (1, 1, 1),
            (3, 16, 6),
            (27, 32, 7),
            (5, 17, 13),
            (24, 144, 11),
            (40, 8, 2),
            (16, 24, 31),
            (9, 3, 12),
            (7, 40, 8),
            (32, 48, 49),
            (16, 16, 14),
            (8, 33, 26),
            (12, 64, 37),
        ] {
            let (ldx, ldo) = (ic + 3, oc + 5);
            let w = rand_vec(&mut rng, oc * ic);
            let b = rand_vec(&mut rng, oc);
            let x = rand_vec(&mut rng, n * ldx);
            let add = rand_vec(&mut rng, n * ldo);
            let g = Gemm1x1::new(&w, &b, ic);
            for act in [Act::None, Act::Relu6] {
                for res in [None, Some(&add[..])] {
                    let mut want = vec![f32::NAN; n * ldo];
                    let (lo, hi) = act.bounds();
                    for p in 0..n {
                        for o in 0..oc {
                            let dot: f32 = (0..ic).map(|i| x[p * ldx + i] * w[o * ic + i]).sum();
                            let r = res.map_or(0.0, |a| a[p * ldo + o]);
                            want[p * ldo + o] = (dot + b[o] + r).max(lo).min(hi);
                        }
                    }
                    let mut fast = vec![f32::NAN; n * ldo];
                    g.run(&x, ldx, n, &mut fast, ldo, res, act);
                    // The panels in two calls (a pair cut in two, a lone panel first): each
                    // output the same, bit for bit.
                    let mut parts = vec![f32::NAN; n * ldo];
                    let cut = 1.min(g.panels());
                    for panels in [(0, cut), (cut, g.panels())] {
                        // SAFETY: parts holds the n rows; the calls run one after the other.
                        unsafe {
                            g.run_panels(&x, ldx, n, parts.as_mut_ptr(), ldo, res, act, panels)
                        };
                    }
                    assert!(
                        fast.iter()
                            .zip(&parts)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "gemm {ic}->{oc} x{n} in two calls"
                    );
                    outs.push(fast.clone());
                    let mut port = vec![f32::NAN; n * ldo];
                    // SAFETY: port holds the n rows.
                    unsafe {
                        g.portable(
                            &x,
                            ldx,
                            n,
                            port.as_mut_ptr(),
                            ldo,
                            res,
                            act,
                            (0, g.panels()),
                        )
                    };
                    for p in 0..n {
                        for o in 0..oc {
                            let i = p * ldo + o;
                            assert!(
                                (fast[i] - want[i]).abs() < 1e-5,
                                "gemm {ic}->{oc} x{n} at {p},{o}"
                            );
                            assert!((port[i] - want[i]).abs() < 1e-5, "portable gemm at {p},{o}");
                        }
                        // Past oc: untouched.
                        assert!(fast[p * ldo + oc].is_nan() && port[p * ldo + oc].is_nan());
                    }
                }
            }
        }
        for (c, h, w) in [
            (8, 5, 7),
            (37, 6, 3),
            (96, 4, 1),
            (40, 1, 9),
            (32, 4, 8),
            (16, 3, 2),
            (24, 5, 5),
            (8, 3, 19),
            (16, 4, 12),
        ] {
            let k: Vec<[f32; 9]> = (0..c)
                .map(|_| rand_vec(&mut rng, 9).try_into().unwrap())
                .collect();
            let b = rand_vec(&mut rng, c);
            let x: Vec<f32> = rand_vec(&mut rng, h * w * c)
                .iter()
                .map(|v| v * 4.0)
                .collect();
            let d = Depthwise::new(&k, &b);
            for s in [1, 2] {
                let (oh, ow) = ((h - 1) / s + 1, (w - 1) / s + 1);
                let mut want = vec![0f32; oh * ow * c];
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ch in 0..c {
                            let mut a = b[ch];
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (y, xx) =
                                        ((oy * s + ky) as isize - 1, (ox * s + kx) as isize - 1);
                                    if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                                        a += k[ch][ky * 3 + kx]
                                            * x[(y as usize * w + xx as usize) * c + ch];
                                    }
                                }
                            }
                            want[(oy * ow + ox) * c + ch] = a.clamp(0.0, 6.0);
                        }
                    }
                }
                // The whole image, then the rows one band at a time from a partial source.
                let mut got = vec![f32::NAN; want.len()];
                d.run(&x, 0, (h, w), s, (0, oh), &mut got);
                assert!(
                    got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
                    "depthwise {c}x{h}x{w}/{s}"
                );
                for oy in 0..oh {
                    let first = (oy * s).saturating_sub(1);
                    let last = (oy * s + 1).min(h - 1);
                    let src = &x[first * w * c..(last + 1) * w * c];
                    let mut row = vec![f32::NAN; ow * c];
                    d.run(src, first, (h, w), s, (oy, oy + 1), &mut row);
                    assert!(
                        row.iter()
                            .zip(&want[oy * ow * c..])
                            .all(|(a, b)| (a - b).abs() < 1e-5),
                        "depthwise band {oy}"
                    );
                    let mut port = vec![f32::NAN; ow * c];
                    let rs = |ky: usize| {
                        (oy * s + ky)
                            .checked_sub(1)
                            .filter(|&y| y < h)
                            .map(|y| &x[y * w * c..][..w * c])
                    };
                    // SAFETY: port holds the ow pixels.
                    unsafe {
                        d.row_portable([rs(0), rs(1), rs(2)], w, s, port.as_mut_ptr(), ow, (0, c))
                    };
                    assert!(
                        port.iter()
                            .zip(&want[oy * ow * c..])
                            .all(|(a, b)| (a - b).abs() < 1e-5),
                        "portable depthwise {oy}"
                    );
                }
            }
        }
        outs
    }
}
