//! The students' depthwise-separable block, fused per band of rows: depthwise 3x3 + bias +
//! ReLU6 into a band buffer that stays in cache, then the pointwise 1x1 GEMM over that buffer,
//! its bias and the optional 2x2 max pool into the layer's output. One pass per block instead of two layers
//! keeps the depthwise result out of memory and halves the points where the threads of a
//! batch-1 image wait for each other.
//!
//! With AVX-512 both halves are register-tiled kernels (the depthwise one runs 16-pixel
//! columns down the rows with masked edges; the GEMM keeps 8-channel x 32-pixel tiles in
//! registers over weights packed at load time, and pools them there); elsewhere the band runs through the portable row kernel and the `gemm`
//! crate.

use std::cell::RefCell;

use gemm::Parallelism;

use super::kernels::{depthwise_rows, epilogue, for_tasks, plane_offset, Act, OutPtr};
use super::packed::{pack, MR};

/// Frees this module's thread-local scratch on the calling thread.
pub(super) fn release_thread_scratch() {
    super::kernels::free_local(&DW);
    super::kernels::free_local(&PW);
}

thread_local! {
    /// The band's depthwise result, `[ic, rows * w]`.
    static DW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The band's pointwise result before the pool, `[oc, rows * w]`.
    static PW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One compiled block; BatchNorm is folded into the depthwise conv.
#[derive(Debug, Clone)]
pub struct Separable {
    pub ic: usize,
    pub oc: usize,
    dw_w: Vec<[f32; 9]>,
    dw_b: Vec<f32>,
    /// Pointwise weights `[oc, ic]`.
    pw_w: Vec<f32>,
    /// The same, as `[oc / MR, ic, MR]` (zero rows pad the last tile), for the AVX-512 GEMM.
    #[cfg_attr(not(x86_simd), allow(dead_code))]
    packed: Vec<f32>,
    /// Pointwise bias, zero-padded to whole tiles.
    pw_b: Vec<f32>,
    pub pool: bool,
}

impl Separable {
    /// `dw_w` / `dw_b`: depthwise taps and bias per input channel; `pw_w` is `[oc, ic]`.
    pub fn new(
        dw_w: Vec<[f32; 9]>,
        dw_b: Vec<f32>,
        pw_w: Vec<f32>,
        pw_b: Vec<f32>,
        pool: bool,
    ) -> Self {
        let (ic, oc) = (dw_w.len(), pw_b.len());
        assert_eq!(dw_b.len(), ic);
        assert_eq!(pw_w.len(), oc * ic);
        let tiles = oc.div_ceil(MR);
        let packed = pack(&pw_w, oc, ic);
        let mut padded = pw_b;
        padded.resize(tiles * MR, 0.0);
        Self {
            ic,
            oc,
            dw_w,
            dw_b,
            pw_w,
            packed,
            pw_b: padded,
            pool,
        }
    }

    /// `x` is `[ic, h, w]`; `out` receives `[oc, h', w']`. `split` spreads the bands over the
    /// thread pool.
    pub fn run(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], split: bool) {
        self.run_with(x, (h, w), out, split, crate::simd::level());
    }

    /// As [`Self::run`], with the kernels of `level` ([`crate::simd::level`]'s numbering:
    /// 2 AVX-512, 1 AVX2 + FMA, 0 portable; the caller checked the CPU has it).
    pub(super) fn run_with(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        out: &mut [f32],
        split: bool,
        level: u8,
    ) {
        let (ic, oc, pool) = (self.ic, self.oc, self.pool);
        assert!(x.len() >= ic * h * w, "input smaller than {ic}x{h}x{w}");
        let oplane = if pool { (h / 2) * (w / 2) } else { h * w };
        assert!(
            out.len() >= oc * oplane,
            "output smaller than {oc}x{oplane}"
        );
        let out = OutPtr(out.as_mut_ptr());
        let tasks: Vec<_> = bands(h, w, ic.max(oc), pool, split)
            .into_iter()
            .map(|(y0, y1)| (y0, y1, 0, oc))
            .collect();
        for_tasks(&tasks, split, |(y0, y1), _| {
            let n = (y1 - y0) * w;
            DW.with(|dw| {
                let mut dw = dw.borrow_mut();
                dw.resize(ic * n, 0.0);
                self.depthwise(x, (h, w), (y0, y1), &mut dw, level);
                #[cfg(x86_simd)]
                let fused_pool = super::isa::set(level).filter(|k| w >= k.pool_min_width);
                #[cfg(not(x86_simd))]
                let fused_pool: Option<()> = None;
                if let (true, Some(_k)) = (pool, fused_pool) {
                    #[cfg(x86_simd)]
                    {
                        let (shape, band, at) = ((oc, ic), (y1 - y0, w), (h / 2, w / 2, y0 / 2));
                        let (wt, b, x) = (&self.packed, &self.pw_b, dw.as_ptr());
                        // SAFETY: the CPU has `level`'s instructions (the caller's word); dw
                        // is [ic, n]; the band's pooled rows y0/2.. of every output plane are
                        // written by this band only.
                        unsafe { (_k.gemm_pool)(wt, b, shape, x, band, out.0, at) };
                    }
                } else if pool {
                    PW.with(|pw| {
                        let mut pw = pw.borrow_mut();
                        pw.resize(oc * n, 0.0);
                        // SAFETY: pw holds oc rows of n; the pooled rows y0/2.. of every
                        // output plane (checked above) are written by this band only; `level`
                        // is the caller's word for the CPU.
                        unsafe {
                            self.pointwise(&dw, n, pw.as_mut_ptr(), n, false, level);
                            epilogue(
                                &pw,
                                (y0, y1, h, w),
                                &self.pw_b[..oc],
                                Act::None,
                                true,
                                plane_offset(out, 0, (h, w), true),
                            );
                        }
                    })
                } else {
                    // SAFETY: row y0 of plane 0; the GEMM writes rows y0..y1 of every plane,
                    // which only this band does; `level` is the caller's word for the CPU.
                    unsafe {
                        let dst = out.0.add(y0 * w);
                        self.pointwise(&dw, n, dst, h * w, true, level);
                    }
                }
            })
        });
    }

    /// Depthwise rows `y0..y1` of every channel into `dst` (`[ic, rows * w]`).
    fn depthwise(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        (y0, y1): (usize, usize),
        dst: &mut [f32],
        level: u8,
    ) {
        let (plane, n) = (h * w, (y1 - y0) * w);
        #[cfg(x86_simd)]
        if let Some(k) = super::isa::set(level) {
            let shape = (self.ic, h, w);
            // SAFETY: the caller checked the CPU has `level`'s instructions; the kernels check
            // x (ic planes of h x w) and dst (ic x n).
            unsafe { (k.depthwise)(x, shape, (y0, y1), &self.dw_w, &self.dw_b, dst) };
            return;
        }
        let _ = level;
        let zeros = vec![0f32; w];
        for (ch, d) in dst.chunks_exact_mut(n).enumerate() {
            depthwise_rows(
                d,
                &x[ch * plane..(ch + 1) * plane],
                &self.dw_w[ch],
                self.dw_b[ch],
                (h, w),
                (y0, y1),
                Act::Relu6,
                &zeros,
            );
        }
    }

    /// `c[o, p] = sum_i w[o, i] * dw[i, p]` (+ bias when `bias`), `c` with row stride `ldc`.
    ///
    /// # Safety
    /// `dw` holds `ic` rows of `n`; `c` addresses `oc` rows of `n` floats at stride `ldc`
    /// that no other thread touches meanwhile; the CPU has `level`'s instructions.
    unsafe fn pointwise(
        &self,
        dw: &[f32],
        n: usize,
        c: *mut f32,
        ldc: usize,
        bias: bool,
        level: u8,
    ) {
        let (ic, oc) = (self.ic, self.oc);
        assert!(dw.len() >= ic * n, "depthwise band smaller than {ic}x{n}");
        #[cfg(x86_simd)]
        if let Some(k) = super::isa::set(level) {
            let (b, x) = (bias.then_some(&self.pw_b[..]), dw.as_ptr());
            // SAFETY: the CPU has `level`'s instructions (the caller's word); dw is [ic, n];
            // c addresses oc rows of n floats at stride ldc that only this band writes.
            unsafe { (k.gemm)(&self.packed, b, (oc, ic), x, n, c, ldc) };
            return;
        }
        let _ = level;
        // SAFETY: w is [oc, ic] and dw [ic, n], both dense row-major; c is oc rows of n at
        // stride ldc (gemm takes column stride, then row stride).
        unsafe {
            gemm::gemm(
                oc,
                n,
                ic,
                c,
                1,
                ldc as isize,
                false,
                self.pw_w.as_ptr(),
                1,
                ic as isize,
                dw.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        if bias {
            for (o, &b) in self.pw_b[..oc].iter().enumerate() {
                // SAFETY: row o of c, n floats, written by this band only.
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(o * ldc), n) };
                row.iter_mut().for_each(|v| *v += b);
            }
        }
    }
}

/// Bands of rows for one block: the band's depthwise and pointwise buffers (`channels` floats
/// per pixel) within about 256 KiB, and, when `split`, at least
/// [`SPLIT_TASKS_PER_THREAD`](super::kernels::SPLIT_TASKS_PER_THREAD) bands per thread.
fn bands(h: usize, w: usize, channels: usize, pool: bool, split: bool) -> Vec<(usize, usize)> {
    let rows = if pool { h / 2 * 2 } else { h };
    let mut target = 65536 / channels.max(1);
    if split {
        target = target.min((rows * w).div_ceil(super::kernels::split_tasks()));
    }
    super::kernels::bands(h, w, pool, target)
}
