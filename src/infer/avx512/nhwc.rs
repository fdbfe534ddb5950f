//! The AVX-512 form of the channels-last 1x1 GEMM (`infer::nhwc`: MobileNetV2's expansion,
//! projection and last pointwise layers): one 16-channel weight panel is one register, so a
//! tile is up to 14 pixels x two panels (28 accumulators, each pixel's input broadcast from
//! memory straight into its multiply-adds), against the AVX2 tile's 6 x 16. The last panel of
//! an `oc` that is not a multiple of 16 is stored through a lane mask. Each output sums its
//! inputs in the same order as the AVX2 tile, so the two give the same bits.
//!
//! The stem's gathering GEMM and the depthwise row stay the AVX2 kernels
//! (`infer::avx2::nhwc`): this tile with the stem's 27 taps gathered from the image ran at
//! 0.47 ms against the AVX2 tile's 0.32 (one thread, Zen 4, `examples/nhwc_tiles.rs`), and a
//! 512-bit depthwise could not be shown to gain on the only AVX-512 CPU measured (Zen 4, which
//! splits each 512-bit multiply-add in two).

use std::arch::x86_64::*;

use super::lanes;
use crate::infer::kernels::Act;
use crate::infer::nhwc::{Gemm1x1, NR};

/// Most pixels per tile: 14 x 2 accumulators + 2 weight vectors of the 32 registers.
const MAX_ROWS: usize = 14;

/// Pixels in the next tile when `left` remain: 12 while that leaves a full tile after it,
/// then the rest in two near-equal tiles (49 = 12 + 12 + 12 + 7 + 6), so no pixel is left to
/// a one-row tile whose multiply-adds would wait on each other.
fn tile_rows(left: usize) -> usize {
    if left >= 24 {
        12
    } else if left > MAX_ROWS {
        left.div_ceil(2)
    } else {
        left
    }
}

/// See [`Gemm1x1::run_panels`].
///
/// # Safety
/// The CPU must have AVX-512F, and the rows in bounds as `run_panels` checks.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    g: &Gemm1x1,
    x: &[f32],
    ldx: usize,
    n: usize,
    op: *mut f32,
    ldo: usize,
    add: Option<&[f32]>,
    act: Act,
    (p0, p1): (usize, usize),
) {
    let (ic, oc) = (g.ic, g.oc);
    let (lo, hi) = act.bounds();
    let (xp, ap) = (x.as_ptr(), add.map_or(std::ptr::null(), |a| a.as_ptr()));
    let mut p = p0;
    while p < p1 {
        let pair = p + 1 < p1;
        let col = p * NR;
        // Lanes stored of the tile's last panel.
        let last = lanes(oc - (p + usize::from(pair)) * NR);
        let t = Tile {
            ic,
            w: g.panels.as_slice().as_ptr().add(p * ic * NR),
            bias: g.bias.as_ptr().add(col),
            bounds: (lo, hi),
            last,
            ldx,
            ldo,
        };
        let mut r = 0;
        while r < n {
            let rows = tile_rows(n - r);
            let xr = xp.add(r * ldx);
            let or = op.add(r * ldo + col);
            let ar = if ap.is_null() {
                ap
            } else {
                ap.add(r * ldo + col)
            };
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match (rows, pair) {
                        $(($r, true) => tile::<$r, 2>(&t, xr, ar, or),
                          ($r, false) => tile::<$r, 1>(&t, xr, ar, or),)*
                        _ => unreachable!("tile of {rows} rows"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
            r += rows;
        }
        p += if pair { 2 } else { 1 };
    }
}

/// What every tile of a panel (pair) shares.
struct Tile {
    ic: usize,
    /// The first panel's packed weights, `[ic, 16]`; the second follows at `ic * 16`.
    w: *const f32,
    bias: *const f32,
    bounds: (f32, f32),
    /// Lanes stored of the last panel.
    last: __mmask16,
    ldx: usize,
    ldo: usize,
}

/// `R` pixels x `P` panels: `out[r][..] = clamp(bias + sum_i x[r][i] w[i][..] (+ add[r][..]))`.
///
/// # Safety
/// The CPU must have AVX-512F; `x` must hold `R` pixels' inputs at stride `ldx`, `out` (and
/// `add`, unless null) `R` rows at stride `ldo` whose `P` panels' columns (the last masked by
/// `last`) are this call's own.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const P: usize>(
    t: &Tile,
    x: *const f32,
    add: *const f32,
    out: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let panel = t.ic * NR;
    for i in 0..t.ic {
        let w: [__m512; P] = std::array::from_fn(|j| _mm512_loadu_ps(t.w.add(j * panel + i * NR)));
        for (r, a) in acc.iter_mut().enumerate() {
            let v = _mm512_set1_ps(*x.add(r * t.ldx + i));
            for j in 0..P {
                a[j] = _mm512_fmadd_ps(v, w[j], a[j]);
            }
        }
    }
    let bias: [__m512; P] = std::array::from_fn(|j| _mm512_loadu_ps(t.bias.add(j * NR)));
    let (vlo, vhi) = (_mm512_set1_ps(t.bounds.0), _mm512_set1_ps(t.bounds.1));
    for (r, a) in acc.iter().enumerate() {
        for j in 0..P {
            let m = if j + 1 == P { t.last } else { 0xffff };
            let mut v = _mm512_add_ps(a[j], bias[j]);
            if !add.is_null() {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, add.add(r * t.ldo + j * NR)));
            }
            let v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
            _mm512_mask_storeu_ps(out.add(r * t.ldo + j * NR), m, v);
        }
    }
}
