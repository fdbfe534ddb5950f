//! MobileNetV2's layers for the fused engine, channels-last (see [`super::nhwc`]): the
//! inverted residual block fused per band of output rows, the strided 3x3 stem, and a plain
//! pointwise layer. The stem reads the CHW image and writes `[h * w, c]`; the blocks and the
//! last pointwise layer read and write `[h * w, c]`, and the head pools it per channel.
//!
//! A block is `1x1 expand (+BN) -> ReLU6 -> 3x3 depthwise, stride 1 or 2 (+BN) -> ReLU6 ->
//! 1x1 project (+BN) (-> + input)`, BatchNorms folded. Per band of output rows it expands only
//! the input rows the band's depthwise needs (one halo row each side), keeps that expanded
//! band (6x the channels) and the depthwise result in cache-sized buffers, and writes only the
//! projected rows: the expanded tensor, the largest in the network, never goes to memory.

use std::cell::RefCell;

use super::kernels::{for_tasks, Act, OutPtr};
use super::nhwc::{Depthwise, Gemm1x1};

/// Frees this module's thread-local scratch on the calling thread.
pub(super) fn release_thread_scratch() {
    super::kernels::free_local(&HIDDEN);
    super::kernels::free_local(&DEPTH);
    super::kernels::free_local(&PHASED);
    super::kernels::free_local(&COLS);
}

thread_local! {
    /// The band's expanded rows, `[rows * w, hid]`.
    static HIDDEN: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The band's depthwise result, `[out_rows * ow, hid]`.
    static DEPTH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The expanded and depthwise tensors of a block run in phases (see `run_phased`).
    static PHASED: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// im2col rows of the stem's band, `[pixels, ic * 9]`.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Largest expanded tensor (floats) a block splits over the threads in phases rather than
/// bands: the 7x7 blocks at 224, where two bands would recompute 2 of 7 rows' expansion.
/// Larger blocks stay in bands: each phase is a hand-off between threads, and on a VM waking
/// an idle one costs as much as the halo rows it saves.
const PHASED_MAX: usize = 1 << 16;

/// Expanded floats a band of a block computes at most: fewer, larger bands recompute fewer
/// halo rows.
const BAND_FLOATS: usize = 1 << 17;

/// Output side of a 3x3 convolution with padding 1 and stride `s`.
pub fn out_size(n: usize, s: usize) -> usize {
    (n - 1) / s + 1
}

/// Bands of about `rows` output rows (at most `oh`), fewer and larger when `split` would
/// otherwise cut a small image into slivers whose halo rows cost more than they balance.
fn bands(oh: usize, rows: usize, split: bool) -> Vec<(usize, usize, usize, usize)> {
    let mut rows = rows.max(1);
    if split {
        let threads = rayon::current_num_threads();
        let parts = if oh >= 8 * threads {
            2 * threads
        } else {
            threads
        };
        rows = rows.min(oh.div_ceil(parts)).max(1);
    }
    (0..oh)
        .step_by(rows)
        .map(|y0| (y0, (y0 + rows).min(oh), 0, 0))
        .collect()
}

/// Tasks of whole weight panels (`(0, 0, p0, p1)`), one per thread when `split`, else one.
fn panel_tasks(panels: usize, split: bool) -> Vec<(usize, usize, usize, usize)> {
    let per = if split {
        panels.div_ceil(rayon::current_num_threads())
    } else {
        panels
    }
    .max(1);
    (0..panels)
        .step_by(per)
        .map(|p0| (0, 0, p0, (p0 + per).min(panels)))
        .collect()
}

/// Rows `r0..r1` of a `[rows, width]` output as this band's own slice.
///
/// # Safety
/// The rows must lie inside the buffer `out` points into, and no other thread may touch them
/// during the slice's life.
unsafe fn rows_mut<'a>(out: OutPtr, (r0, r1): (usize, usize), width: usize) -> &'a mut [f32] {
    // SAFETY: as the caller guarantees.
    unsafe { std::slice::from_raw_parts_mut(out.add(r0 * width), (r1 - r0) * width) }
}

/// One compiled inverted residual block (BatchNorms folded into the convolutions).
#[derive(Debug, Clone)]
pub struct Inverted {
    pub ic: usize,
    /// Expanded channels (= `ic` when the block has no expansion).
    pub hid: usize,
    pub oc: usize,
    pub stride: usize,
    /// The 1x1 expansion (+ ReLU6).
    expand: Option<Gemm1x1>,
    dw: Depthwise,
    /// The 1x1 projection (no activation).
    proj: Gemm1x1,
    /// Adds the block's input to its output (stride 1, `ic == oc`).
    pub residual: bool,
}

impl Inverted {
    /// `expand`: `[hid, ic]` weights and bias; `dw_w`, `dw_b`: the depthwise taps per channel;
    /// `proj_w`: `[oc, hid]`.
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
            expand: expand.map(|(w, b)| Gemm1x1::new(&w, &b, ic)),
            dw: Depthwise::new(&dw_w, &dw_b),
            proj: Gemm1x1::new(&proj_w, &proj_b, hid),
            residual,
        }
    }

    /// `x` is `[h * w, ic]`; `out` receives `[oh * ow, oc]`. `split` spreads the bands of
    /// output rows over the thread pool.
    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        if split && self.expand.is_some() && self.hid * h * w <= PHASED_MAX {
            self.run_phased(x, (h, w), out);
        } else {
            self.run_bands(x, (h, w), out, split);
        }
    }

    /// The output side for `(h, w)` inputs, after checking that `x` and `out` hold the
    /// block's input and output.
    fn check(&self, x: &[f32], (h, w): (usize, usize), out: &[f32]) -> (usize, usize) {
        let (oh, ow) = (out_size(h, self.stride), out_size(w, self.stride));
        assert!(
            x.len() >= self.ic * h * w,
            "input smaller than {h}x{w}x{}",
            self.ic
        );
        assert!(
            out.len() >= self.oc * oh * ow,
            "output smaller than {oh}x{ow}x{}",
            self.oc
        );
        (oh, ow)
    }

    /// [`Self::run`] in bands of output rows, spread over the pool when `split`.
    pub(super) fn run_bands(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        out: &mut [f32],
        split: bool,
    ) {
        let (s, hid, oc) = (self.stride, self.hid, self.oc);
        let (oh, ow) = self.check(x, (h, w), out);
        // Expanded floats per output row; a band's buffers stay within about 512 KiB (L2).
        let tasks = bands(oh, BAND_FLOATS / (hid * w * s).max(1), split);
        let outp = OutPtr(out.as_mut_ptr());
        for_tasks(&tasks, split, |band, _| {
            // SAFETY: the bands are disjoint rows of the [oh * ow, oc] output.
            let dst = unsafe { rows_mut(outp, (band.0 * ow, band.1 * ow), oc) };
            self.band(x, (h, w), band, dst)
        });
    }

    /// A small image split over the threads without halo rows: the expansion of every pixel
    /// split by output-channel panels, then the depthwise split by rows, then the projection
    /// split by panels again. Bands would recompute a third of the expansion at 7x7.
    pub(super) fn run_phased(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32]) {
        let (s, ic, hid, oc) = (self.stride, self.ic, self.hid, self.oc);
        let (oh, ow) = self.check(x, (h, w), out);
        let e = self.expand.as_ref().expect("phased blocks expand");
        // Taken for the call, not borrowed: while this thread waits in a join, rayon may run
        // another image's block on it, which then allocates buffers of its own.
        let (mut hidden, mut depth) = PHASED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        hidden.resize(h * w * hid, 0.0);
        depth.resize(oh * ow * hid, 0.0);
        let hp = OutPtr(hidden.as_mut_ptr());
        for_tasks(&panel_tasks(e.panels(), true), true, |_, panels| {
            // SAFETY: hidden holds h * w rows of hid; the tasks' panels are disjoint columns.
            unsafe { e.run_panels(x, ic, h * w, hp.add(0), hid, None, Act::Relu6, panels) }
        });
        let dp = OutPtr(depth.as_mut_ptr());
        for_tasks(&bands(oh, oh, true), true, |(oy0, oy1), _| {
            // SAFETY: the bands are disjoint rows of the [oh * ow, hid] depth buffer.
            let dst = unsafe { rows_mut(dp, (oy0 * ow, oy1 * ow), hid) };
            self.dw.run(&hidden, 0, (h, w), s, (oy0, oy1), dst);
        });
        let op = OutPtr(out.as_mut_ptr());
        let add = self.residual.then(|| &x[..h * w * ic]);
        for_tasks(&panel_tasks(self.proj.panels(), true), true, |_, panels| {
            // SAFETY: out holds oh * ow rows of oc (checked by run); disjoint panels.
            unsafe {
                self.proj
                    .run_panels(&depth, hid, oh * ow, op.add(0), oc, add, Act::None, panels)
            }
        });
        PHASED.with(|b| *b.borrow_mut() = (hidden, depth));
    }

    /// Output rows `oy0..oy1` (all channels) into `out` (`[(oy1 - oy0) * ow, oc]`).
    fn band(&self, x: &[f32], (h, w): (usize, usize), (oy0, oy1): (usize, usize), out: &mut [f32]) {
        let (s, ic, hid) = (self.stride, self.ic, self.hid);
        let ow = out_size(w, s);
        // Input rows the band's depthwise reads (its halo included).
        let iy0 = (oy0 * s).saturating_sub(1);
        let iy1 = ((oy1 - 1) * s + 2).min(h);
        let n_out = (oy1 - oy0) * ow;
        HIDDEN.with(|hidden| {
            DEPTH.with(|depth| {
                let mut hidden = hidden.borrow_mut();
                let mut depth = depth.borrow_mut();
                // The depthwise source: the expanded rows iy0..iy1, or the input itself.
                let (src, first): (&[f32], usize) = match &self.expand {
                    Some(e) => {
                        let n_in = (iy1 - iy0) * w;
                        hidden.resize(n_in * hid, 0.0);
                        e.run(
                            &x[iy0 * w * ic..],
                            ic,
                            n_in,
                            &mut hidden,
                            hid,
                            None,
                            Act::Relu6,
                        );
                        (&hidden[..n_in * hid], iy0)
                    }
                    None => (&x[..h * w * ic], 0),
                };
                depth.resize(n_out * hid, 0.0);
                self.dw.run(src, first, (h, w), s, (oy0, oy1), &mut depth);
                // Residual: stride 1 and ic == oc, so the input rows line up.
                let add = self.residual.then(|| &x[oy0 * w * ic..][..n_out * ic]);
                self.proj
                    .run(&depth, hid, n_out, out, self.oc, add, Act::None);
            })
        });
    }
}

/// A 3x3 convolution with stride 2 (MobileNetV2's stem), `[oc, ic * 9]` weights, bias and
/// activation, from a CHW image to channels-last rows: im2col of a band of output pixels,
/// then the 1x1 kernel over its `ic * 9` columns.
#[derive(Debug, Clone)]
pub struct Strided3x3 {
    pub ic: usize,
    pub oc: usize,
    gemm: Gemm1x1,
    act: Act,
}

impl Strided3x3 {
    pub fn new(ic: usize, w: Vec<f32>, b: Vec<f32>, act: Act) -> Self {
        let oc = b.len();
        assert_eq!(w.len(), oc * ic * 9, "weights are not {oc}x{ic}x3x3");
        Self {
            ic,
            oc,
            gemm: Gemm1x1::new(&w, &b, ic * 9),
            act,
        }
    }

    /// `x` is `[ic, h, w]`; `out` receives `[oh * ow, oc]`. The pixels whose nine taps all lie
    /// inside the image are computed with their inputs gathered straight from it; the border
    /// pixels (and everything, where the gather kernel does not apply) through an im2col row.
    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        let (ic, oc) = (self.ic, self.oc);
        let (oh, ow) = (out_size(h, 2), out_size(w, 2));
        assert!(x.len() >= ic * h * w && out.len() >= oc * oh * ow);
        let k = ic * 9;
        // Tap (c, ky, kx) relative to the window's top-left input pixel.
        let offs: Vec<usize> = (0..ic)
            .flat_map(|c| (0..3).flat_map(move |ky| (0..3).map(move |kx| c * h * w + ky * w + kx)))
            .collect();
        let tasks = bands(oh, 32768 / (k * ow).max(1), split);
        let outp = OutPtr(out.as_mut_ptr());
        for_tasks(&tasks, split, |(oy0, oy1), _| {
            // SAFETY: the bands are disjoint rows of the [oh * ow, oc] output.
            let dst = unsafe { rows_mut(outp, (oy0 * ow, oy1 * ow), oc) };
            COLS.with(|cols| {
                let mut cols = cols.borrow_mut();
                for (oy, row) in (oy0..oy1).zip(dst.chunks_exact_mut(ow * oc)) {
                    // Interior: 2 oy - 1 >= 0 and 2 oy + 1 < h; 2 ox - 1 >= 0 and 2 ox + 1 < w.
                    let (i0, i1) = (1, w / 2);
                    let gathered = oy >= 1
                        && 2 * oy + 1 < h
                        && i1 > i0
                        && self.gemm.run_gather(
                            x,
                            (2 * oy - 1) * w + 2 * i0 - 1,
                            2,
                            &offs,
                            i1 - i0,
                            &mut row[i0 * oc..i1 * oc],
                            self.act,
                        );
                    let rest = if gathered {
                        [(0, i0), (i1, ow)]
                    } else {
                        [(0, ow), (ow, ow)]
                    };
                    for (ox0, ox1) in rest {
                        if ox1 > ox0 {
                            self.im2col(x, (h, w), oy, (ox0, ox1), &mut cols);
                            let n = ox1 - ox0;
                            let dst = &mut row[ox0 * oc..ox1 * oc];
                            self.gemm.run(&cols, k, n, dst, oc, None, self.act);
                        }
                    }
                }
            })
        });
    }

    /// `cols[p, c * 9 + ky * 3 + kx] = x[c, 2 oy + ky - 1, 2 ox + kx - 1]` (0 outside) for
    /// output pixels `ox0..ox1` of row `oy`.
    fn im2col(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        oy: usize,
        (ox0, ox1): (usize, usize),
        cols: &mut Vec<f32>,
    ) {
        let (ic, k) = (self.ic, self.ic * 9);
        cols.clear();
        cols.resize((ox1 - ox0) * k, 0.0);
        for (ox, px) in (ox0..ox1).zip(cols.chunks_exact_mut(k)) {
            if oy >= 1 && 2 * oy + 1 < h && ox >= 1 && 2 * ox + 1 < w {
                // Interior: three runs of three pixels per channel.
                for c in 0..ic {
                    for ky in 0..3 {
                        let at = c * h * w + (2 * oy + ky - 1) * w + 2 * ox - 1;
                        px[c * 9 + ky * 3..][..3].copy_from_slice(&x[at..at + 3]);
                    }
                }
                continue;
            }
            for c in 0..ic {
                for ky in 0..3 {
                    let Some(y) = (2 * oy + ky).checked_sub(1).filter(|&y| y < h) else {
                        continue;
                    };
                    let src = &x[c * h * w + y * w..][..w];
                    for kx in 0..3 {
                        if let Some(xx) = (2 * ox + kx).checked_sub(1).filter(|&v| v < w) {
                            px[c * 9 + ky * 3 + kx] = src[xx];
                        }
                    }
                }
            }
        }
    }
}

/// A 1x1 convolution over a whole image (`[oc, ic]` weights) + bias + activation, channels-
/// last in and out: MobileNetV2's last layer (320 -> 1280 at 7x7 or 8x8), split over pixels.
#[derive(Debug, Clone)]
pub struct Pointwise {
    pub ic: usize,
    pub oc: usize,
    gemm: Gemm1x1,
    act: Act,
}

impl Pointwise {
    pub fn new(ic: usize, w: Vec<f32>, b: Vec<f32>, act: Act) -> Self {
        let oc = b.len();
        assert_eq!(w.len(), oc * ic, "weights are not {oc}x{ic}");
        Self {
            ic,
            oc,
            gemm: Gemm1x1::new(&w, &b, ic),
            act,
        }
    }

    /// `x` is `[h * w, ic]`; `out` receives `[h * w, oc]`.
    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        let (ic, oc, n) = (self.ic, self.oc, h * w);
        assert!(x.len() >= ic * n && out.len() >= oc * n);
        // Split by output-channel panels: each thread reads its share of the weights (1.6 MB
        // at 320 -> 1280, more than the image) once.
        let tasks = panel_tasks(self.gemm.panels(), split);
        let outp = OutPtr(out.as_mut_ptr());
        for_tasks(&tasks, split, |_, panels| {
            // SAFETY: out holds n rows of oc (checked above); the tasks' panels are disjoint
            // columns.
            unsafe {
                self.gemm
                    .run_panels(x, ic, n, outp.add(0), oc, None, self.act, panels)
            }
        });
    }
}
