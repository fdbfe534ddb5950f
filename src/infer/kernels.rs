//! The fused CPU kernels of [`super::FastModel`], on one image's NCHW f32 buffers.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use gemm::Parallelism;
use rayon::prelude::*;

use crate::ops::conv2d::matmul;
use crate::ops::depthwise::correlate_row;
pub(crate) use crate::ops::depthwise::dot;
use crate::simd::multiversion;

/// The activation fused after a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
}

impl Act {
    /// The clamp `[lo, hi]` the activation is (for vector kernels: `min(max(v, lo), hi)`).
    pub(super) fn bounds(self) -> (f32, f32) {
        match self {
            Act::None => (f32::NEG_INFINITY, f32::INFINITY),
            Act::Relu => (0.0, f32::INFINITY),
            Act::Relu6 => (0.0, 6.0),
        }
    }

    #[inline(always)]
    pub(super) fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Relu => v.max(0.0),
            Act::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

/// The output buffer shared by the threads of one layer; each writes disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: only used to write disjoint elements from the bands of one layer, which all finish
// before the layer returns.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `n` floats on (a method, so closures capture the `Sync` wrapper whole).
    ///
    /// # Safety
    /// `n` must stay within the buffer.
    pub(super) unsafe fn add(self, n: usize) -> *mut f32 {
        // SAFETY: the caller keeps n within the buffer.
        unsafe { self.0.add(n) }
    }
}

/// Frees a thread-local scratch buffer (skipped if this thread is using it right now).
pub(super) fn free_local<T: Default>(key: &'static std::thread::LocalKey<RefCell<T>>) {
    key.with(|cell| {
        if let Ok(mut v) = cell.try_borrow_mut() {
            *v = T::default();
        }
    });
}

/// Rows `y0 - 1 ..= y1` of every channel of `x` (`[ic, h, w]`) into `pad`, as `[ic, nr, pw]`
/// with `nr = y1 - y0 + 2`: each row from column 1, zeros around it (`pw >= w + 2`), and zero
/// rows above and below the image. The direct 3x3 kernels read their taps from it.
#[cfg(x86_simd)]
pub(super) fn fill_padded(
    pad: &mut Vec<f32>,
    x: &[f32],
    (ic, h, w): (usize, usize, usize),
    (y0, y1): (usize, usize),
    pw: usize,
) {
    assert!(y0 <= y1 && y1 <= h && pw >= w + 2 && x.len() >= ic * h * w);
    let nr = y1 - y0 + 2;
    pad.clear();
    pad.resize(ic * nr * pw, 0.0);
    for ci in 0..ic {
        for r in 0..nr {
            let y = (y0 + r) as isize - 1;
            if y >= 0 && (y as usize) < h {
                let src = &x[(ci * h + y as usize) * w..][..w];
                pad[(ci * nr + r) * pw + 1..][..w].copy_from_slice(src);
            }
        }
    }
}

/// Work items per thread when one image's layer is split over rayon's pool (batch 1): its
/// row bands, or its output-channel slices when the rows are too few. One per thread measured
/// fastest: `cargo run --release --example split_bands` alternates 1, 2, 4 and 8 in one process
/// (2-core Zen 4, 2026-12-07, forced AVX2: student-deeper batch 1 +1.5 to +8% over 2, the
/// previous value; big +1.6%; AVX-512 +3%); each extra fork-join and each band's own halo and GEMM
/// set-up cost more than the balance they buy when every thread runs the same kernel.
/// A benchmark hook, not a setting: `examples/split_bands.rs` stores to it.
#[doc(hidden)]
pub static SPLIT_TASKS_PER_THREAD: AtomicUsize = AtomicUsize::new(1);

/// How a split layer's work items reach the threads when the image runs without a gang
/// ([`super::gang::SPIN_SPLIT`] off): `false`, rayon's work stealing (any
/// thread may take any band, so a band's input often sits in another core's cache); `true`,
/// `rayon::broadcast` with thread `i` of `n` taking the `i`-th contiguous share of the items,
/// so the same rows stay on the same core from layer to layer. A benchmark hook, not a
/// setting: `examples/split_bands.rs` stores to it.
#[doc(hidden)]
pub static STATIC_SPLIT: AtomicBool = AtomicBool::new(false);

/// How many work items a split layer aims for: [`SPLIT_TASKS_PER_THREAD`] per thread.
pub(super) fn split_tasks() -> usize {
    SPLIT_TASKS_PER_THREAD.load(Ordering::Relaxed).max(1) * rayon::current_num_threads()
}

/// Frees this module's thread-local scratch on the calling thread.
pub(super) fn release_thread_scratch() {
    free_local(&COL);
    free_local(&BAND);
    free_local(&PADDED);
}

thread_local! {
    /// im2col rows of the band being computed.
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The band's GEMM result before bias, activation and pool.
    static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The zero-padded image of [`conv3x3_gathered`] (taken for the call, not borrowed).
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Bands of output rows `[y0, y1)` covering the rows a layer computes (an odd last row is
/// skipped when a 2x2 pool follows, as PyTorch's floor does), about `target` floats wide.
pub(super) fn bands(h: usize, w: usize, pool: bool, target: usize) -> Vec<(usize, usize)> {
    let rows = if pool { h / 2 * 2 } else { h };
    let mut band = (target / w.max(1)).max(1);
    if pool {
        band = (band / 2 * 2).max(2);
    }
    (0..rows)
        .step_by(band)
        .map(|y0| (y0, (y0 + band).min(rows)))
        .collect()
}

/// Work items `(y0, y1, o0, o1)`: a band of rows (or of Winograd tile rows) and a slice of output channels. When `split`
/// leaves fewer bands than [`split_tasks`] (small images deep in the net), the output
/// channels are cut into slices of at least 16 so every thread gets work.
pub(super) fn tasks(
    bands: &[(usize, usize)],
    oc: usize,
    split: bool,
) -> Vec<(usize, usize, usize, usize)> {
    let want = if split { split_tasks() } else { 1 };
    let chunks = if bands.len() >= want {
        1
    } else {
        want.div_ceil(bands.len().max(1)).min(oc / 16).max(1)
    };
    // Whole tiles of the packed GEMM (8 channels) per slice.
    let per = oc.div_ceil(chunks).next_multiple_of(8);
    bands
        .iter()
        .flat_map(|&(y0, y1)| {
            (0..oc)
                .step_by(per.max(1))
                .map(move |o0| (y0, y1, o0, (o0 + per).min(oc)))
        })
        .collect()
}

/// Runs `f(rows, channels)` for each work item: in order on this thread, or, when `split`, on
/// the image's gang ([`super::gang`], the default for a split image), else on rayon's pool.
pub(super) fn for_tasks(
    tasks: &[(usize, usize, usize, usize)],
    split: bool,
    f: impl Fn((usize, usize), (usize, usize)) + Sync,
) {
    let run = |&(y0, y1, o0, o1): &(usize, usize, usize, usize)| f((y0, y1), (o0, o1));
    if !split || tasks.len() < 2 {
        tasks.iter().for_each(run);
        return;
    }
    // The image's gang first: its helpers spin until the image ends, so they would never
    // take part in a broadcast or a join from here.
    let held = super::gang::current(|gang| {
        let gang = gang.filter(|_| tasks.len() <= super::gang::MAX_ITEMS)?;
        gang.run(tasks.len(), &|i| run(&tasks[i]));
        Some(())
    });
    if held.is_some() {
        return;
    }
    if STATIC_SPLIT.load(Ordering::Relaxed) {
        rayon::broadcast(|ctx| {
            let (i, n) = (ctx.index(), ctx.num_threads());
            tasks[tasks.len() * i / n..tasks.len() * (i + 1) / n]
                .iter()
                .for_each(run);
        });
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// `out` advanced to output plane `o0` of a layer with `(h, w)` inputs.
///
/// # Safety
/// `out` must address at least `o0` planes of that layer's output (and one past them).
pub(super) unsafe fn plane_offset(
    out: OutPtr,
    o0: usize,
    (h, w): (usize, usize),
    pool: bool,
) -> OutPtr {
    let plane = if pool { (h / 2) * (w / 2) } else { h * w };
    // SAFETY: the caller's contract.
    OutPtr(unsafe { out.0.add(o0 * plane) })
}

multiversion! {
/// Bias, activation and the optional 2x2 max pool from a band's raw GEMM result
/// (`[oc, rows * w]`) into the layer's output (`[oc, oh, ow]`).
///
/// # Safety
/// `out` must address `b.len()` output planes of `[h', w']` floats (`h' = h / 2` pooled)
/// whose rows `y0..y1` (pooled: `y0 / 2..y1 / 2`) no other thread reads or writes meanwhile.
pub(super) unsafe fn epilogue(
    band: &[f32],
    rows: (usize, usize, usize, usize),
    b: &[f32],
    act: Act,
    pool: bool,
    out: OutPtr,
) {
    let (y0, y1, h, w) = rows;
    let n = (y1 - y0) * w;
    for (o, (plane, &bias)) in band.chunks_exact(n).zip(b).enumerate() {
        if pool {
            let (oh, ow) = (h / 2, w / 2);
            for r in (0..y1 - y0).step_by(2) {
                let (top, bottom) = (&plane[r * w..(r + 1) * w], &plane[(r + 1) * w..(r + 2) * w]);
                let yo = (y0 + r) / 2;
                // SAFETY: row `yo` of plane `o` belongs to this band only; in bounds of [oc, oh, ow].
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.0.add(o * oh * ow + yo * ow), ow)
                };
                for (xo, d) in dst.iter_mut().enumerate() {
                    let m = top[2 * xo]
                        .max(top[2 * xo + 1])
                        .max(bottom[2 * xo])
                        .max(bottom[2 * xo + 1]);
                    *d = act.apply(m + bias);
                }
            }
        } else {
            // SAFETY: rows y0..y1 of plane `o` belong to this band only.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(o * h * w + y0 * w), n) };
            for (d, &v) in dst.iter_mut().zip(plane) {
                *d = act.apply(v + bias);
            }
        }
    }
}
}

multiversion! {
/// im2col of output rows `[y0, y1)` of a 3x3 / stride 1 / pad 1 convolution:
/// `col[(ci, ky, kx), (y - y0) * w + x] = x[ci, y + ky - 1, x + kx - 1]`, zero outside.
fn im2col_band(x: &[f32], shape: (usize, usize, usize), rows: (usize, usize), col: &mut [f32]) {
    let ((ic, h, w), (y0, y1)) = (shape, rows);
    let n = (y1 - y0) * w;
    for ci in 0..ic {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..3 {
            for kx in 0..3 {
                let dst = &mut col[(ci * 9 + ky * 3 + kx) * n..(ci * 9 + ky * 3 + kx + 1) * n];
                for (r, y) in (y0..y1).enumerate() {
                    let row = &mut dst[r * w..(r + 1) * w];
                    let sy = y + ky;
                    if sy < 1 || sy > h {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[(sy - 1) * w..sy * w];
                    match kx {
                        0 => {
                            row[0] = 0.0;
                            row[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => row.copy_from_slice(src),
                        _ => {
                            row[..w - 1].copy_from_slice(&src[1..]);
                            row[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
}
}

/// 3x3 convolution (stride 1, pad 1) + bias + `act` (+ 2x2 max pool): `x` is `[ic, h, w]`,
/// `wt` is `[oc, ic * 9]`, `out` receives `[oc, h', w']`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    (ic, h, w): (usize, usize, usize),
    wt: &[f32],
    b: &[f32],
    oc: usize,
    act: Act,
    pool: bool,
    out: &mut [f32],
    split: bool,
) {
    let k = ic * 9;
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    // The raw-pointer writes below rely on these.
    assert!(x.len() >= ic * h * w, "input is not {ic}x{h}x{w}");
    assert!(
        wt.len() >= oc * k && b.len() >= oc,
        "weights are not {oc}x{ic}x3x3"
    );
    assert!(out.len() >= oc * oh * ow, "output is not {oc}x{oh}x{ow}");
    let out = OutPtr(out.as_mut_ptr());
    #[cfg(x86_simd)]
    {
        let direct = super::isa::detected().filter(|k| ic <= k.direct_max_input_channels);
        if let Some(set) = direct {
            let work = tasks(&bands(h, w, pool, 4096), oc, split);
            for_tasks(&work, split, |rows, (o0, o1)| {
                // SAFETY: o0 < oc planes (checked above).
                let dst = unsafe { plane_offset(out, o0, (h, w), pool) };
                let shape = (ic, h, w, rows.0, rows.1);
                let (wt, b) = (&wt[o0 * k..o1 * k], &b[o0..o1]);
                // SAFETY: the CPU has the set's instructions (simd::level); dst is plane o0 of
                // the output and this task writes rows `rows` of channels o0..o1 only.
                unsafe { (set.conv3x3)(x, shape, wt, b, (act, pool), dst.0) };
            });
            return;
        }
    }
    if conv3x3_gathered(
        x,
        (ic, h, w),
        &wt[..oc * k],
        &b[..oc],
        act,
        pool,
        out,
        split,
    ) {
        return;
    }
    // About 256 KiB of im2col rows per band: the band's columns and result stay in L2.
    let work = tasks(&bands(h, w, pool, 65536 / k), oc, split);
    for_tasks(&work, split, |(y0, y1), (o0, o1)| {
        let (n, m) = ((y1 - y0) * w, o1 - o0);
        COL.with(|col| {
            BAND.with(|band| {
                let (mut col, mut band) = (col.borrow_mut(), band.borrow_mut());
                col.resize(k * n, 0.0);
                band.resize(m * n, 0.0);
                im2col_band(x, (ic, h, w), (y0, y1), &mut col);
                // SAFETY: rows o0..o1 of wt ([oc, k]), col is [k, n], band is [m, n], all
                // dense row-major.
                unsafe {
                    matmul(
                        (m, n, k),
                        band.as_mut_ptr(),
                        false,
                        (wt.as_ptr().add(o0 * k), k, 1),
                        (col.as_ptr(), n, 1),
                        Parallelism::None,
                    );
                }
                // SAFETY: planes o0..o1 of the checked output; this task's rows y0..y1 only.
                unsafe {
                    let dst = plane_offset(out, o0, (h, w), pool);
                    epilogue(&band, (y0, y1, h, w), &b[o0..o1], act, pool, dst);
                }
            })
        })
    });
}

/// [`conv3x3`] for few input channels (the RGB input layer) on AVX2: the image is copied once
/// into a zero-padded buffer, then each output row is one pass of the packed 6x16 GEMM with every
/// pixel's `ic * 9` taps gathered straight from it (`nhwc::Gemm1x1::run_gather`, bias and
/// activation in its store), followed by the 2x2 pool and the transpose into planes. No im2col
/// buffer. `false` (nothing written) where it does not apply: more than 8 input channels, `oc`
/// not whole 16-channel panels, or no AVX2.
#[allow(clippy::too_many_arguments)]
fn conv3x3_gathered(
    x: &[f32],
    (ic, h, w): (usize, usize, usize),
    wt: &[f32],
    b: &[f32],
    act: Act,
    pool: bool,
    out: OutPtr,
    split: bool,
) -> bool {
    let (k, oc) = (ic * 9, b.len());
    if ic > 8 || h == 0 || w == 0 {
        return false;
    }
    let gemm = super::nhwc::Gemm1x1::new(wt, b, k);
    if !gemm.gathers() {
        return false;
    }
    let (ph, pw) = (h + 2, w + 2);
    let mut padded = PADDED.with(|p| std::mem::take(&mut *p.borrow_mut()));
    padded.clear();
    padded.resize(ic * ph * pw, 0.0);
    for c in 0..ic {
        for y in 0..h {
            let at = c * ph * pw + (y + 1) * pw + 1;
            padded[at..at + w].copy_from_slice(&x[c * h * w + y * w..][..w]);
        }
    }
    let offs: Vec<usize> = (0..ic)
        .flat_map(|c| (0..3).flat_map(move |ky| (0..3).map(move |kx| c * ph * pw + ky * pw + kx)))
        .collect();
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    let step = if pool { 2 } else { 1 };
    let work: Vec<_> = bands(h, w, pool, 8192)
        .into_iter()
        .map(|(y0, y1)| (y0, y1, 0, oc))
        .collect();
    for_tasks(&work, split, |(y0, y1), _| {
        BAND.with(|rows| {
            let mut rows = rows.borrow_mut();
            rows.resize(step * w * oc, 0.0);
            for y in (y0..y1).step_by(step) {
                for (r, row) in rows.chunks_exact_mut(w * oc).enumerate() {
                    // Output row y + r: window rows y + r .. y + r + 2 of the padded image.
                    let done = gemm.run_gather(&padded, (y + r) * pw, 1, &offs, w, row, act);
                    assert!(done, "the gather kernel was checked");
                }
                if pool {
                    let (top, bottom) = rows.split_at(w * oc);
                    for o in 0..oc {
                        // SAFETY: row y / 2 of plane o < oc of the [oc, oh, ow] output (the
                        // caller checked its length); only this band writes it.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.add(o * oh * ow + y / 2 * ow), ow)
                        };
                        for (xo, d) in dst.iter_mut().enumerate() {
                            let (a, c) = (2 * xo * oc + o, (2 * xo + 1) * oc + o);
                            *d = top[a].max(top[c]).max(bottom[a]).max(bottom[c]);
                        }
                    }
                } else {
                    for o in 0..oc {
                        // SAFETY: row y of plane o < oc of the checked output; this band's.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.add(o * h * w + y * w), w)
                        };
                        for (xx, d) in dst.iter_mut().enumerate() {
                            *d = rows[xx * oc + o];
                        }
                    }
                }
            }
        })
    });
    PADDED.with(|p| *p.borrow_mut() = padded);
    true
}

multiversion! {
/// Rows `y0..y1` of one channel's 3x3 correlation with zero padding, bias and `act` (`out`
/// holds those rows), row by row in cache.
#[allow(clippy::too_many_arguments)]
pub(super) fn depthwise_rows(
    out: &mut [f32],
    src: &[f32],
    k: &[f32; 9],
    bias: f32,
    hw: (usize, usize),
    rows: (usize, usize),
    act: Act,
    zeros: &[f32],
) {
    let ((h, w), (y0, y1)) = (hw, rows);
    for (y, out_row) in (y0..y1).zip(out.chunks_exact_mut(w)) {
        let row = |r: usize| &src[r * w..(r + 1) * w];
        let above = if y > 0 { row(y - 1) } else { zeros };
        let below = if y + 1 < h { row(y + 1) } else { zeros };
        correlate_row(out_row, [above, row(y), below], k, bias);
        match act {
            Act::None => {}
            Act::Relu => out_row.iter_mut().for_each(|v| *v = v.max(0.0)),
            Act::Relu6 => out_row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
        }
    }
}
}
