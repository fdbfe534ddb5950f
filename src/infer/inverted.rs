//! MobileNetV2's layers for the fused engine: the inverted residual block fused per band of
//! output rows, the strided 3x3 stem, and a plain pointwise layer.
//!
//! A block is `1x1 expand (+BN) -> ReLU6 -> 3x3 depthwise, stride 1 or 2 (+BN) -> ReLU6 ->
//! 1x1 project (+BN) (-> + input)`, BatchNorms folded. Per band of output rows it expands only
//! the input rows the band's depthwise needs (one halo row each side), keeps that expanded
//! band (6x the channels) and the depthwise result in cache-sized buffers, and writes only the
//! projected rows: the expanded tensor, the largest in the network, never goes to memory.
//! The 1x1 convolutions are GEMMs (the `gemm` crate: AVX2/AVX-512/NEON kernels) over a band of
//! pixels; the depthwise kernels are row loops compiled per instruction set.

use std::cell::RefCell;

use gemm::Parallelism;

use super::kernels::{for_tasks, Act, OutPtr};
use crate::ops::depthwise::correlate_row;
use crate::ops::multiversion;

thread_local! {
    /// The band's expanded rows, `[hid, rows * w]`.
    static HIDDEN: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The band's depthwise result, `[hid, out_rows * ow]`.
    static DEPTH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One zero row (padding) and the two halves of a row split for stride 2.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output side of a 3x3 convolution with padding 1 and stride `s`.
pub fn out_size(n: usize, s: usize) -> usize {
    (n - 1) / s + 1
}

/// `c = a . b` (+ what `c` held when `accumulate`): `a` is `[m, k]` row-major, `b` `k` rows of
/// `n` floats at stride `ldb`, `c` `m` rows of `n` floats at stride `ldc`.
///
/// # Safety
/// `b` must address `k` rows of `n` floats at stride `ldb`, and `c` `m` rows of `n` floats at
/// stride `ldc` that no other thread touches during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    assert!(a.len() >= m * k, "weights smaller than {m}x{k}");
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        false,
        a.as_ptr(),
        1,
        k as isize,
        b,
        1,
        ldb as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

multiversion! {
/// `row = act(row + bias)` (+ `add` elementwise, before the activation), vectorised.
fn bias_act(row: &mut [f32], bias: f32, add: Option<&[f32]>, act: Act) {
    let (lo, hi) = act.bounds();
    match add {
        Some(add) => {
            for (v, a) in row.iter_mut().zip(add) {
                *v = (*v + bias + a).max(lo).min(hi);
            }
        }
        None => {
            for v in row.iter_mut() {
                *v = (*v + bias).max(lo).min(hi);
            }
        }
    }
}
}

multiversion! {
/// One stride-2 output row of a 3x3 correlation with zero padding: `out[x] = bias +
/// sum k[r][j] * rows[r][2x + j - 1]`. Each source row is first split into its even and odd
/// columns (`even`, `odd` of `ceil(w / 2)` floats), so the taps are contiguous slices and the
/// loop vectorises.
fn correlate_row_s2(out: &mut [f32], rows: [&[f32]; 3], k: &[f32; 9], bias: f32, even: &mut [f32], odd: &mut [f32]) {
    let ow = out.len();
    out.iter_mut().for_each(|v| *v = bias);
    for (r, kr) in rows.iter().zip(k.chunks_exact(3)) {
        let w = r.len();
        // even[x] = r[2x], odd[x] = r[2x + 1] (0 past the row's end).
        for x in 0..ow {
            even[x] = r[2 * x];
            odd[x] = if 2 * x + 1 < w { r[2 * x + 1] } else { 0.0 };
        }
        // Tap 0 reads r[2x - 1] = odd[x - 1] (padding at x = 0).
        out[0] += kr[1] * even[0] + kr[2] * odd[0];
        let (o, e, d, dl) = (&mut out[1..], &even[1..ow], &odd[1..ow], &odd[..ow - 1]);
        for i in 0..o.len() {
            o[i] += kr[0] * dl[i] + kr[1] * e[i] + kr[2] * d[i];
        }
    }
}
}

/// One compiled inverted residual block (BatchNorms folded into the convolutions).
#[derive(Debug, Clone)]
pub struct Inverted {
    pub ic: usize,
    /// Expanded channels (= `ic` when the block has no expansion).
    pub hid: usize,
    pub oc: usize,
    pub stride: usize,
    /// `[hid, ic]` weights and bias of the 1x1 expansion (+ ReLU6).
    expand: Option<(Vec<f32>, Vec<f32>)>,
    dw_w: Vec<[f32; 9]>,
    dw_b: Vec<f32>,
    /// `[oc, hid]` weights and bias of the 1x1 projection (no activation).
    proj_w: Vec<f32>,
    proj_b: Vec<f32>,
    /// Adds the block's input to its output (stride 1, `ic == oc`).
    pub residual: bool,
}

impl Inverted {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ic: usize,
        stride: usize,
        expand: Option<(Vec<f32>, Vec<f32>)>,
        dw_w: Vec<[f32; 9]>,
        dw_b: Vec<f32>,
        proj_w: Vec<f32>,
        proj_b: Vec<f32>,
        residual: bool,
    ) -> Self {
        let hid = dw_w.len();
        let oc = proj_b.len();
        if let Some((w, b)) = &expand {
            assert_eq!((w.len(), b.len()), (hid * ic, hid), "expansion weights");
        } else {
            assert_eq!(hid, ic, "no expansion: depthwise over the input channels");
        }
        assert_eq!((dw_b.len(), proj_w.len()), (hid, oc * hid));
        assert!(stride == 1 || stride == 2, "stride {stride}");
        assert!(
            !residual || (stride == 1 && ic == oc),
            "residual needs equal shapes"
        );
        Self {
            ic,
            hid,
            oc,
            stride,
            expand,
            dw_w,
            dw_b,
            proj_w,
            proj_b,
            residual,
        }
    }

    /// `x` is `[ic, h, w]`; `out` receives `[oc, oh, ow]`. `split` spreads the bands of output
    /// rows over the thread pool.
    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        let (s, hid, oc) = (self.stride, self.hid, self.oc);
        let (oh, ow) = (out_size(h, s), out_size(w, s));
        assert!(
            x.len() >= self.ic * h * w,
            "input smaller than {}x{h}x{w}",
            self.ic
        );
        assert!(
            out.len() >= oc * oh * ow,
            "output smaller than {oc}x{oh}x{ow}"
        );
        // Expanded floats per output row; a band's buffers stay within about 256 KiB.
        let per_row = hid * w * s;
        let mut rows = (65536 / per_row.max(1)).max(1);
        if split {
            rows = rows
                .min(oh.div_ceil(2 * rayon::current_num_threads()))
                .max(1);
        }
        let tasks: Vec<_> = (0..oh)
            .step_by(rows)
            .map(|y0| (y0, (y0 + rows).min(oh), 0, oc))
            .collect();
        let outp = OutPtr(out.as_mut_ptr());
        for_tasks(&tasks, split, |(oy0, oy1), _| {
            self.band(x, (h, w), (oy0, oy1), outp)
        });
    }

    /// Output rows `oy0..oy1` of every output channel.
    fn band(&self, x: &[f32], (h, w): (usize, usize), (oy0, oy1): (usize, usize), out: OutPtr) {
        let (s, hid, oc) = (self.stride, self.hid, self.oc);
        let (oh, ow) = (out_size(h, s), out_size(w, s));
        // Input rows the band's depthwise reads (its halo included).
        let iy0 = (oy0 * s).saturating_sub(1);
        let iy1 = ((oy1 - 1) * s + 2).min(h);
        let n_out = (oy1 - oy0) * ow;
        HIDDEN.with(|hidden| {
            DEPTH.with(|depth| {
                let mut hidden = hidden.borrow_mut();
                let mut depth = depth.borrow_mut();
                // The depthwise source: the expanded rows iy0..iy1, or the input itself.
                let (src, plane, first): (&[f32], usize, usize) = match &self.expand {
                    Some((ew, eb)) => {
                        let n_in = (iy1 - iy0) * w;
                        hidden.clear();
                        hidden.resize(hid * n_in, 0.0);
                        // SAFETY: x holds ic planes of h * w, rows iy0..iy1 < h of each at
                        // stride h * w; hidden is hid rows of n_in, this thread's own.
                        unsafe {
                            matmul(
                                ew,
                                (hid, self.ic, n_in),
                                x.as_ptr().add(iy0 * w),
                                h * w,
                                hidden.as_mut_ptr(),
                                n_in,
                            )
                        };
                        for (row, &b) in hidden.chunks_exact_mut(n_in).zip(eb) {
                            bias_act(row, b, None, Act::Relu6);
                        }
                        (&hidden[..], n_in, iy0)
                    }
                    None => (x, h * w, 0),
                };
                depth.resize(hid * n_out, 0.0);
                self.depthwise(src, plane, first, (h, w), (oy0, oy1), &mut depth);
                // SAFETY: rows oy0..oy1 of every output plane ([oc, oh * ow], stride oh * ow)
                // belong to this band only; depth is hid rows of n_out.
                let c = unsafe { out.add(oy0 * ow) };
                unsafe {
                    matmul(
                        &self.proj_w,
                        (oc, hid, n_out),
                        depth.as_ptr(),
                        n_out,
                        c,
                        oh * ow,
                    )
                };
                for o in 0..oc {
                    // SAFETY: as above: row segment oy0..oy1 of plane o.
                    let row = unsafe { std::slice::from_raw_parts_mut(c.add(o * oh * ow), n_out) };
                    // Residual: stride 1 and ic == oc, so the input rows line up.
                    let add = self
                        .residual
                        .then(|| &x[o * h * w + oy0 * w..o * h * w + oy0 * w + n_out]);
                    bias_act(row, self.proj_b[o], add, Act::None);
                }
            })
        });
    }

    /// Depthwise 3x3 (stride 1 or 2, zero padding) + bias + ReLU6 of output rows `oy0..oy1`
    /// into `dst` (`[hid, rows * ow]`). Channel `c`'s source row `y` is
    /// `src[c * plane + (y - first) * w..][..w]`, for `y` in the rows the band needs.
    fn depthwise(
        &self,
        src: &[f32],
        plane: usize,
        first: usize,
        (h, w): (usize, usize),
        (oy0, oy1): (usize, usize),
        dst: &mut [f32],
    ) {
        let s = self.stride;
        let ow = out_size(w, s);
        let n_out = (oy1 - oy0) * ow;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            scratch.resize(w + 2 * ow, 0.0);
            let (zeros, halves) = scratch.split_at_mut(w);
            let (even, odd) = halves.split_at_mut(ow);
            for (c, d) in dst.chunks_exact_mut(n_out).enumerate() {
                let row = |y: isize| -> &[f32] {
                    if y < 0 || y as usize >= h {
                        zeros
                    } else {
                        let at = c * plane + (y as usize - first) * w;
                        &src[at..at + w]
                    }
                };
                let (k, b) = (&self.dw_w[c], self.dw_b[c]);
                for (oy, out_row) in (oy0..oy1).zip(d.chunks_exact_mut(ow)) {
                    let y = (oy * s) as isize;
                    let rows = [row(y - 1), row(y), row(y + 1)];
                    if s == 1 {
                        correlate_row(out_row, rows, k, b);
                    } else {
                        correlate_row_s2(out_row, rows, k, b, even, odd);
                    }
                    bias_act(out_row, 0.0, None, Act::Relu6);
                }
            }
        });
    }
}

/// A 3x3 convolution with stride 2 (MobileNetV2's stem), `[oc, ic * 9]` weights, bias and
/// activation; im2col of a band of output rows, then one GEMM.
#[derive(Debug, Clone)]
pub struct Strided3x3 {
    pub ic: usize,
    pub oc: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    act: Act,
}

thread_local! {
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Strided3x3 {
    pub fn new(ic: usize, w: Vec<f32>, b: Vec<f32>, act: Act) -> Self {
        let oc = b.len();
        assert_eq!(w.len(), oc * ic * 9, "weights are not {oc}x{ic}x3x3");
        Self { ic, oc, w, b, act }
    }

    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        let (ic, oc) = (self.ic, self.oc);
        let (oh, ow) = (out_size(h, 2), out_size(w, 2));
        assert!(x.len() >= ic * h * w && out.len() >= oc * oh * ow);
        let k = ic * 9;
        let mut rows = (32768 / (k * ow).max(1)).max(1);
        if split {
            rows = rows
                .min(oh.div_ceil(2 * rayon::current_num_threads()))
                .max(1);
        }
        let tasks: Vec<_> = (0..oh)
            .step_by(rows)
            .map(|y0| (y0, (y0 + rows).min(oh), 0, oc))
            .collect();
        let outp = OutPtr(out.as_mut_ptr());
        for_tasks(&tasks, split, |(oy0, oy1), _| {
            let n = (oy1 - oy0) * ow;
            COLS.with(|cols| {
                let mut cols = cols.borrow_mut();
                cols.clear();
                cols.resize(k * n, 0.0);
                // cols[(c * 9 + ky * 3 + kx), p] = x[c, 2 oy + ky - 1, 2 ox + kx - 1] (0 outside).
                for c in 0..ic {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let r = &mut cols[((c * 9 + ky * 3 + kx) * n)..][..n];
                            for (oy, seg) in (oy0..oy1).zip(r.chunks_exact_mut(ow)) {
                                let y = (2 * oy + ky) as isize - 1;
                                if y < 0 || y as usize >= h {
                                    continue;
                                }
                                let src = &x[c * h * w + y as usize * w..][..w];
                                for (ox, v) in seg.iter_mut().enumerate() {
                                    let xx = (2 * ox + kx) as isize - 1;
                                    if xx >= 0 && (xx as usize) < w {
                                        *v = src[xx as usize];
                                    }
                                }
                            }
                        }
                    }
                }
                // SAFETY: rows oy0..oy1 of every output plane belong to this band; cols is k
                // rows of n.
                let c = unsafe { outp.add(oy0 * ow) };
                unsafe { matmul(&self.w, (oc, k, n), cols.as_ptr(), n, c, oh * ow) };
                for o in 0..oc {
                    // SAFETY: as above.
                    let row = unsafe { std::slice::from_raw_parts_mut(c.add(o * oh * ow), n) };
                    bias_act(row, self.b[o], None, self.act);
                }
            })
        });
    }
}

/// A 1x1 convolution over a whole image (`[oc, ic]` weights) + bias + activation: MobileNetV2's
/// last layer (320 -> 1280 at 7x7 or 8x8), split over output channels.
#[derive(Debug, Clone)]
pub struct Pointwise {
    pub ic: usize,
    pub oc: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    act: Act,
}

impl Pointwise {
    pub fn new(ic: usize, w: Vec<f32>, b: Vec<f32>, act: Act) -> Self {
        let oc = b.len();
        assert_eq!(w.len(), oc * ic, "weights are not {oc}x{ic}");
        Self { ic, oc, w, b, act }
    }

    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        let (ic, oc, n) = (self.ic, self.oc, h * w);
        assert!(x.len() >= ic * n && out.len() >= oc * n);
        let per = if split {
            oc.div_ceil(2 * rayon::current_num_threads())
        } else {
            oc
        };
        let tasks: Vec<_> = (0..oc)
            .step_by(per.max(1))
            .map(|o0| (0, 1, o0, (o0 + per).min(oc)))
            .collect();
        let outp = OutPtr(out.as_mut_ptr());
        for_tasks(&tasks, split, |_, (o0, o1)| {
            // SAFETY: planes o0..o1 of the output belong to this task; x is ic rows of n.
            let c = unsafe { outp.add(o0 * n) };
            unsafe {
                matmul(
                    &self.w[o0 * ic..o1 * ic],
                    (o1 - o0, ic, n),
                    x.as_ptr(),
                    n,
                    c,
                    n,
                )
            };
            for o in o0..o1 {
                // SAFETY: plane o, this task's own.
                let row = unsafe { std::slice::from_raw_parts_mut(outp.add(o * n), n) };
                bias_act(row, self.b[o], None, self.act);
            }
        });
    }
}
