//! The fused f32 engine's AVX-512 kernels, in one place: the packed GEMM (pointwise layers and
//! Winograd's 16 products) and its 2x2-pooling form, the separable blocks' depthwise 3x3, the
//! direct 3x3 convolution of the RGB input layer and Winograd's input and output transforms.
//! [`super::avx2`] holds their AVX2 + FMA twins (same data layouts, same packed weights, same
//! bands); the layers pick a set by the level they run with ([`crate::simd::level`]).

use std::arch::x86_64::*;
use std::cell::RefCell;

pub mod nhwc;

use super::kernels::Act;
use super::packed::MR;
use super::winograd::{input_tile, output_tile, tile_rows};

/// Floats per vector.
const L: usize = 16;

/// Lanes `0..n` of a 16-lane mask (all of them from 16 on).
#[inline(always)]
pub fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// The 2x2 max pool of two 16-pixel rows (a row and the one below it): lanes 0..8 hold
/// the max of each 2x2 window (lane pairs (0, 1), (2, 3), ... of both rows).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn pool2x2(top: __m512, bottom: __m512) -> __m512 {
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 0, 0, 0, 0, 0, 0, 0, 0);
    let v = _mm512_max_ps(top, bottom);
    _mm512_max_ps(
        _mm512_permutexvar_ps(evens, v),
        _mm512_permutexvar_ps(odds, v),
    )
}

/// One register tile over all of `ic`: `acc[j][v] += sum_i w[i][j] * x_v[i * stride ..][..16]`
/// for the tile's packed weights `w` (`[ic, MR]`) and two 16-float vectors per input row,
/// at `x.0` and `x.1` (masked by `masks`; masked-off lanes are not read).
///
/// # Safety
/// The CPU must have AVX-512F; `w` must hold `ic * MR` floats and the unmasked lanes of
/// `x.v + i * stride` must be readable for every `i < ic`.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn accumulate(
    acc: &mut [[__m512; 2]; MR],
    w: *const f32,
    ic: usize,
    x: (*const f32, *const f32),
    masks: (__mmask16, __mmask16),
    stride: usize,
) {
    let (mut wp, mut x0, mut x1) = (w, x.0, x.1);
    for _ in 0..ic {
        let b0 = _mm512_maskz_loadu_ps(masks.0, x0);
        let b1 = _mm512_maskz_loadu_ps(masks.1, x1);
        for (j, a) in acc.iter_mut().enumerate() {
            let wv = _mm512_set1_ps(*wp.add(j));
            a[0] = _mm512_fmadd_ps(wv, b0, a[0]);
            a[1] = _mm512_fmadd_ps(wv, b1, a[1]);
        }
        wp = wp.add(MR);
        x0 = x0.wrapping_add(stride);
        x1 = x1.wrapping_add(stride);
    }
}

/// As [`accumulate`] for one 16-float vector per input row (`acc[j][0]`; `acc[j][1]` is left
/// as it is).
///
/// # Safety
/// As [`accumulate`], for the unmasked lanes of `x + i * stride`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_one(
    acc: &mut [[__m512; 2]; MR],
    w: *const f32,
    ic: usize,
    x: *const f32,
    mask: __mmask16,
    stride: usize,
) {
    let mut a: [__m512; MR] = std::array::from_fn(|j| acc[j][0]);
    let (mut wp, mut xp) = (w, x);
    for _ in 0..ic {
        let b = _mm512_maskz_loadu_ps(mask, xp);
        for (j, a) in a.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(j)), b, *a);
        }
        wp = wp.add(MR);
        xp = xp.wrapping_add(stride);
    }
    for (j, v) in a.into_iter().enumerate() {
        acc[j][0] = v;
    }
}

/// `c[o, p] = bias[o] + sum_i w[o, i] * x[i, p]` for `o < oc`, `p < n`: `packed` is
/// `[oc / MR, ic, MR]` (see [`super::packed::pack`]), `bias` (none: zero) padded to whole tiles,
/// `x` is `[ic, n]`, `c` has row stride `ldc`. Every channel tile (8 channels x 32 pixels, 16
/// accumulators over all of `ic`) passes over a strip of 32 pixels of `x` while it stays in L1:
/// read in place, or first copied into a contiguous `[ic, 32]` strip where its rows would
/// crowd into a few L1 sets ([`crowds_l1`]).
///
/// # Safety
/// The CPU must have AVX-512F; `x` must address `ic * n` floats and `c` `oc` rows of `n`
/// floats at stride `ldc`, written by no other thread.
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm(
    packed: &[f32],
    bias: Option<&[f32]>,
    (oc, ic): (usize, usize),
    x: *const f32,
    n: usize,
    c: *mut f32,
    ldc: usize,
) {
    let tiles = super::packed::check(packed, bias, (oc, ic));
    let strips = (0..n).step_by(32).map(|p0| {
        let masks = (lanes(n - p0), lanes((n - p0).saturating_sub(16)));
        (p0, masks)
    });
    if !crowds_l1(ic, n) {
        for (p0, masks) in strips {
            let x0 = x.wrapping_add(p0);
            gemm_strip(
                packed,
                bias,
                (oc, ic, tiles),
                (x0, n),
                masks,
                c.add(p0),
                ldc,
            );
        }
        return;
    }
    STRIP.with(|strip| {
        let mut strip = strip.borrow_mut();
        strip.resize(ic * 32, 0.0);
        for (p0, masks) in strips {
            copy_strip(&mut strip, x.wrapping_add(p0), (ic, n), masks);
            let x0 = (strip.as_ptr(), 32);
            gemm_strip(packed, bias, (oc, ic, tiles), x0, masks, c.add(p0), ldc);
        }
    })
}

/// Whether `ic` rows `n` floats apart crowd into too few L1 sets for [`gemm`] to read a strip
/// of them in place. Rows whose offsets differ by a multiple of 4 KiB fall into the same sets;
/// at stride `n` there are `1024 / gcd(n, 1024)` distinct offsets, and from 6 rows per set
/// (half of a 12-way L1, the rest being the weights' and the output's) the strip evicts itself
/// while the channel tiles pass over it: 89-101 GFLOP/s at 32x16x2048 against 180-198 at
/// n = 2040 (standalone). Copied, every `n` runs at the latter's speed; where nothing crowds
/// the copy is only extra work. Student-deeper's separable blocks (bands of 256-2048 pixels)
/// crowd; big's Winograd products (bands of 32-128 tiles over 32-128 channels) mostly do not.
fn crowds_l1(ic: usize, n: usize) -> bool {
    let (mut a, mut b) = (n % 1024, 1024);
    while a != 0 {
        (a, b) = (b % a, a);
    }
    ic > 6 * (1024 / b)
}

/// Copies the lanes `masks` select of 32 pixels of every row of `x` (`ic` rows `ldx` floats
/// apart) into `strip` as `[ic, 32]`, zeros elsewhere (see [`crowds_l1`] for why).
///
/// # Safety
/// The CPU must have AVX-512F; the unmasked lanes of `x` (and of `x + 16`) must be readable at
/// each of the `ic` rows.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn copy_strip(
    strip: &mut [f32],
    x: *const f32,
    (ic, ldx): (usize, usize),
    (m0, m1): (__mmask16, __mmask16),
) {
    assert!(strip.len() >= ic * 32);
    for i in 0..ic {
        let (src, dst) = (x.wrapping_add(i * ldx), strip.as_mut_ptr().add(i * 32));
        // Masked-off lanes are not read: past a row's end nothing is dereferenced.
        _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(m0, src));
        _mm512_storeu_ps(dst.add(16), _mm512_maskz_loadu_ps(m1, src.wrapping_add(16)));
    }
}

/// Every channel tile of [`gemm`] over one strip of 32 pixels (`ic` rows `stride` floats apart
/// from `x0`: in place or copied), written to the columns `masks` select of `c`'s rows.
///
/// # Safety
/// As [`gemm`]'s, with the unmasked lanes of every row of the strip readable and `c` the
/// strip's first column.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_strip(
    packed: &[f32],
    bias: Option<&[f32]>,
    (oc, ic, tiles): (usize, usize, usize),
    (x0, stride): (*const f32, usize),
    (m0, m1): (__mmask16, __mmask16),
    c: *mut f32,
    ldc: usize,
) {
    for t in 0..tiles {
        let rows = MR.min(oc - t * MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if let Some(bias) = bias {
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(bias[t * MR + j]);
                *a = [v, v];
            }
        }
        let w = packed.as_ptr().add(t * ic * MR);
        if m1 == 0 {
            // At most 16 pixels left (Winograd's products on small layers): one vector
            // per row, not half of every FMA wasted on masked-off lanes.
            accumulate_one(&mut acc, w, ic, x0, m0, stride);
        } else {
            accumulate(&mut acc, w, ic, (x0, x0.wrapping_add(16)), (m0, m1), stride);
        }
        for (j, a) in acc.iter().enumerate() {
            if j < rows {
                let dst = c.add((t * MR + j) * ldc);
                _mm512_mask_storeu_ps(dst, m0, a[0]);
                _mm512_mask_storeu_ps(dst.wrapping_add(16), m1, a[1]);
            }
        }
    }
}

/// Depthwise 3x3 (pad 1) + bias + ReLU6 of rows `y0..y1` of every channel of `x`
/// (`[c, h, w]`) into `dst` (`[c, rows * w]`), 16 pixels per vector: the left and right
/// taps are masked loads one float before and after, with the lanes that fall outside the
/// row switched off. Each 16-pixel column runs down the rows with the three source rows'
/// shifted vectors in registers (three loads per output vector), and each output is three
/// short FMA chains, one per kernel row, so consecutive rows overlap in the pipeline.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn depthwise(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    (y0, y1): (usize, usize),
    taps: &[[f32; 9]],
    bias: &[f32],
    dst: &mut [f32],
) {
    let n = (y1 - y0) * w;
    assert!(x.len() >= c * h * w && dst.len() >= c * n && taps.len() >= c && bias.len() >= c);
    assert!(y0 < y1 && y1 <= h);
    let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
    for ch in 0..c {
        let k = taps[ch].map(|t| _mm512_set1_ps(t));
        let b = _mm512_set1_ps(bias[ch]);
        let plane = x.as_ptr().add(ch * h * w);
        let out = dst.as_mut_ptr().add(ch * n);
        for xs in (0..w).step_by(16) {
            let mid = lanes(w - xs);
            let left = if xs == 0 { mid & !1 } else { mid };
            let right = lanes(w - xs - 1);
            // Row y's (left, centre, right) neighbours of the 16 pixels; zeros outside.
            // Masked-off lanes are never read, so the pointers one float before the row
            // (or past it) are not dereferenced there.
            let load = |y: usize| -> [__m512; 3] {
                if y >= h {
                    return [zero; 3];
                }
                let p = plane.add(y * w + xs);
                [
                    _mm512_maskz_loadu_ps(left, p.wrapping_sub(1)),
                    _mm512_maskz_loadu_ps(mid, p),
                    _mm512_maskz_loadu_ps(right, p.wrapping_add(1)),
                ]
            };
            let mut above = if y0 == 0 { [zero; 3] } else { load(y0 - 1) };
            let mut cur = load(y0);
            for y in y0..y1 {
                let below = load(y + 1);
                let s0 = _mm512_fmadd_ps(
                    k[2],
                    above[2],
                    _mm512_fmadd_ps(k[1], above[1], _mm512_fmadd_ps(k[0], above[0], b)),
                );
                let s1 = _mm512_fmadd_ps(
                    k[5],
                    cur[2],
                    _mm512_fmadd_ps(k[4], cur[1], _mm512_mul_ps(k[3], cur[0])),
                );
                let s2 = _mm512_fmadd_ps(
                    k[8],
                    below[2],
                    _mm512_fmadd_ps(k[7], below[1], _mm512_mul_ps(k[6], below[0])),
                );
                let v = _mm512_add_ps(_mm512_add_ps(s0, s1), s2);
                let v = _mm512_min_ps(_mm512_max_ps(v, zero), six);
                _mm512_mask_storeu_ps(out.add((y - y0) * w + xs), mid, v);
                above = cur;
                cur = below;
            }
        }
    }
}

/// As [`gemm`] followed by a 2x2 max pool, then the bias: `x` is a band of `rows` (even)
/// rows of width `w` (`[ic, rows * w]`) whose first row is row `2 * yo` of the layer. A
/// tile is 8 channels x (16 pixels of a row and the 16 below them), so the pool is a
/// vertical max and a max of lane pairs in registers; it writes rows `yo..yo + rows / 2`
/// of every output plane (`[oh, ow]` each, from `out`).
///
/// # Safety
/// The CPU must have AVX-512F; `x` must address `ic * rows * w` floats, `out` `oc` planes
/// of `oh * ow` floats whose rows `yo..yo + rows / 2` no other thread writes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm_pool(
    packed: &[f32],
    bias: &[f32],
    (oc, ic): (usize, usize),
    x: *const f32,
    (rows, w): (usize, usize),
    out: *mut f32,
    (oh, ow, yo): (usize, usize, usize),
) {
    let tiles = super::packed::check(packed, Some(bias), (oc, ic));
    assert!(rows % 2 == 0 && yo + rows / 2 <= oh && ow == w / 2);
    let n = rows * w;
    for r in (0..rows).step_by(2) {
        for xs in (0..w).step_by(16) {
            let m = lanes(w - xs);
            let keep = lanes((ow - xs / 2).min(8));
            for t in 0..tiles {
                let ch = MR.min(oc - t * MR);
                let mut acc = [[_mm512_setzero_ps(); 2]; MR];
                let wp = packed.as_ptr().add(t * ic * MR);
                let top = x.add(r * w + xs);
                accumulate(&mut acc, wp, ic, (top, top.add(w)), (m, m), n);
                for (j, a) in acc.iter().enumerate() {
                    if j < ch {
                        let v = pool2x2(a[0], a[1]);
                        let v = _mm512_add_ps(v, _mm512_set1_ps(bias[t * MR + j]));
                        let o = t * MR + j;
                        _mm512_mask_storeu_ps(
                            out.add(o * oh * ow + (yo + r / 2) * ow + xs / 2),
                            keep,
                            v,
                        );
                    }
                }
            }
        }
    }
}

// Winograd's transforms, 16 tiles per vector: the input's stride-2 tile columns come from
// even/odd lane permutes of two loads, the outputs' column pairs are interleaved back the same
// way, so neither transform touches a scalar.

/// Winograd F(2x2, 3x3)'s input transform, as the portable `winograd::input_transform`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn winograd_input(
    x: &[f32],
    (ic, h, w): (usize, usize, usize),
    (ty0, ty1, tw): (usize, usize, usize),
    v: &mut [f32],
    rows: &mut Vec<f32>,
) {
    let n = (ty1 - ty0) * tw;
    assert!(x.len() >= ic * h * w && v.len() >= 16 * ic * n && 2 * tw <= w + 1);
    let groups = tw.div_ceil(16);
    // Padded rows: column -1 first, zeros after the row up to the last group's loads
    // (columns 2 * t0 ..= 2 * t0 + 33 of its first tile t0).
    let pw = 32 * groups + 2;
    rows.clear();
    rows.resize(4 * pw, 0.0);
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let vp = v.as_mut_ptr();
    for i in 0..ic {
        let plane = &x[i * h * w..(i + 1) * h * w];
        for ty in ty0..ty1 {
            tile_rows(rows, plane, (h, w), ty, pw);
            let base = (ty - ty0) * tw;
            for g in 0..groups {
                let t0 = 16 * g;
                let mask = lanes(tw - t0);
                // d[r][c][t] = padded row r, column 2 t + c.
                let mut d = [[_mm512_setzero_ps(); 4]; 4];
                for (r, dr) in d.iter_mut().enumerate() {
                    let p = rows.as_ptr().add(r * pw + 2 * t0);
                    let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                    let (a2, b2) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(18)));
                    dr[0] = _mm512_permutex2var_ps(a, evens, b);
                    dr[1] = _mm512_permutex2var_ps(a, odds, b);
                    dr[2] = _mm512_permutex2var_ps(a2, evens, b2);
                    dr[3] = _mm512_permutex2var_ps(a2, odds, b2);
                }
                let add = |a, b| _mm512_add_ps(a, b);
                let sub = |a, b| _mm512_sub_ps(a, b);
                for (ri, out) in input_tile(&d, add, sub).into_iter().enumerate() {
                    for (cj, o) in out.into_iter().enumerate() {
                        let at = ((ri * 4 + cj) * ic + i) * n + base + t0;
                        _mm512_mask_storeu_ps(vp.add(at), mask, o);
                    }
                }
            }
        }
    }
}

/// Winograd F(2x2, 3x3)'s output transform, as the portable `winograd::output_transform`,
/// writing from `out` (plane of the first channel).
///
/// # Safety
/// The CPU must have AVX-512F; `out` must address `b.len()` output planes whose rows of
/// tile rows `ty0..ty1` no other thread writes.
#[target_feature(enable = "avx512f")]
pub unsafe fn winograd_output(
    m: &[f32],
    (mo, n, ty0, ty1, h, w): (usize, usize, usize, usize, usize, usize),
    b: &[f32],
    (act, pool): (Act, bool),
    out: *mut f32,
) {
    let tw = n / (ty1 - ty0);
    assert!(m.len() >= 16 * mo * n && b.len() >= mo);
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    let (lo, hi) = act.bounds();
    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    // Interleave two rows of 16 into 32 consecutive outputs.
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mp = m.as_ptr();
    for (o, &bias) in b.iter().enumerate().take(mo) {
        let bias = _mm512_set1_ps(bias);
        let dst = out.add(o * oh * ow);
        for ty in ty0..ty1 {
            let row = (ty - ty0) * tw;
            for t0 in (0..tw).step_by(16) {
                let mask = lanes(tw - t0);
                let mut mm = [_mm512_setzero_ps(); 16];
                for (xi, v) in mm.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, mp.add((xi * mo + o) * n + row + t0));
                }
                let add = |a, b| _mm512_add_ps(a, b);
                let sub = |a, b| _mm512_sub_ps(a, b);
                let [[y00, y01], [y10, y11]] = output_tile(&mm, add, sub);
                let finish =
                    |v: __m512| _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, bias), lo), hi);
                if pool {
                    let v = _mm512_max_ps(_mm512_max_ps(y00, y01), _mm512_max_ps(y10, y11));
                    _mm512_mask_storeu_ps(dst.add(ty * ow + t0), mask, finish(v));
                } else {
                    for (dy, (a, c)) in [(y00, y01), (y10, y11)].into_iter().enumerate() {
                        let yy = 2 * ty + dy;
                        if yy >= h {
                            continue;
                        }
                        let (a, c) = (finish(a), finish(c));
                        let x0 = 2 * t0;
                        let p = dst.add(yy * w + x0);
                        _mm512_mask_storeu_ps(
                            p,
                            lanes(w - x0),
                            _mm512_permutex2var_ps(a, first, c),
                        );
                        let rest = lanes(w.saturating_sub(x0 + 16));
                        _mm512_mask_storeu_ps(
                            p.wrapping_add(16),
                            rest,
                            _mm512_permutex2var_ps(a, second, c),
                        );
                    }
                }
            }
        }
    }
}

// The direct 3x3 convolution of the RGB input layer: an im2col reduction of only `9 * ic` is
// too short for a GEMM to run well, so each 8-channel x 16-pixel output tile accumulates in
// eight registers over all taps, one load and eight FMAs per tap.

/// Up to this many input channels the direct kernel is used.
pub const DIRECT_MAX_INPUT_CHANNELS: usize = 4;
const OB: usize = 8;

thread_local! {
    static PAD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// [`gemm`]'s copied strip of its input, `[ic, 32]`.
    static STRIP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Frees this module's thread-local scratch on the calling thread.
pub(super) fn release_thread_scratch() {
    super::kernels::free_local(&PAD);
    super::kernels::free_local(&STRIP);
}

/// Output rows `y0..y1` of the channels whose weights `wt` (`[m, ic * 9]`) and biases `b`
/// hold, + activation (+ 2x2 max pool), written from `out` (that layer's plane of the
/// first of these channels).
///
/// # Safety
/// The CPU must have AVX-512F; `out` must address `b.len()` output planes of the layer
/// (`[h', w']` each) and no other thread may write rows `y0..y1` (pooled: `y0/2..y1/2`)
/// of them.
#[target_feature(enable = "avx512f")]
pub unsafe fn conv3x3(
    x: &[f32],
    (ic, h, w, y0, y1): (usize, usize, usize, usize, usize),
    wt: &[f32],
    b: &[f32],
    (act, pool): (Act, bool),
    out: *mut f32,
) {
    let (m, k) = (b.len(), ic * 9);
    let nr = y1 - y0 + 2;
    // Padded rows y0-1 ..= y1: a zero column on the left, zeros on the right up to whole
    // tiles plus the right neighbour.
    let pw = w.div_ceil(L) * L + 2;
    PAD.with(|pad| {
        let mut pad = pad.borrow_mut();
        super::kernels::fill_padded(&mut pad, x, (ic, h, w), (y0, y1), pw);
        let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
        let mut wv = vec![[0f32; OB]; k];
        let mut top = [_mm512_setzero_ps(); OB];
        let mut bottom = [_mm512_setzero_ps(); OB];
        let (lo, hi) = act.bounds();
        let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        for o in (0..m).step_by(OB) {
            let mo = OB.min(m - o);
            for (tap, v) in wv.iter_mut().enumerate() {
                for (j, x) in v.iter_mut().enumerate() {
                    *x = if j < mo { wt[(o + j) * k + tap] } else { 0.0 };
                }
            }
            let step = if pool { 2 } else { 1 };
            for y in (y0..y1).step_by(step) {
                for xs in (0..w).step_by(L) {
                    if pool {
                        let base = (y - y0) * pw + xs;
                        tile_pair(&pad, base, (nr * pw, pw), &wv, &mut top, &mut bottom);
                        let mask = lanes((ow - xs / 2).min(L / 2));
                        for j in 0..mo {
                            let v = pool2x2(top[j], bottom[j]);
                            let v = _mm512_add_ps(v, _mm512_set1_ps(b[o + j]));
                            let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                            let dst = out.add((o + j) * oh * ow + (y / 2) * ow + xs / 2);
                            _mm512_mask_storeu_ps(dst, mask, v);
                        }
                    } else {
                        tile(&pad, (y - y0) * pw + xs, (nr * pw, pw), &wv, &mut top);
                        let mask = lanes(w - xs);
                        for j in 0..mo {
                            let v = _mm512_add_ps(top[j], _mm512_set1_ps(b[o + j]));
                            let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                            let dst = out.add((o + j) * oh * ow + y * ow + xs);
                            _mm512_mask_storeu_ps(dst, mask, v);
                        }
                    }
                }
            }
        }
    })
}

/// Two tiles, one above the other (the rows of a 2x2 pool window): each weight broadcast
/// feeds both, 16 accumulators in flight.
///
/// # Safety
/// The CPU must have AVX-512F (the reads are bounds-checked by the assert inside).
#[target_feature(enable = "avx512f")]
unsafe fn tile_pair(
    pad: &[f32],
    base: usize,
    (cs, pw): (usize, usize),
    wv: &[[f32; OB]],
    top: &mut [__m512; OB],
    bottom: &mut [__m512; OB],
) {
    let mut t = [_mm512_setzero_ps(); OB];
    let mut b = [_mm512_setzero_ps(); OB];
    for (ci, taps) in wv.chunks_exact(9).enumerate() {
        for ky in 0..3 {
            let row = base + ci * cs + ky * pw;
            assert!(row + pw + 2 + L <= pad.len());
            for kx in 0..3 {
                let s0 = _mm512_loadu_ps(pad.as_ptr().add(row + kx));
                let s1 = _mm512_loadu_ps(pad.as_ptr().add(row + pw + kx));
                let wj = &taps[ky * 3 + kx];
                for j in 0..OB {
                    let wv = _mm512_set1_ps(wj[j]);
                    t[j] = _mm512_fmadd_ps(wv, s0, t[j]);
                    b[j] = _mm512_fmadd_ps(wv, s1, b[j]);
                }
            }
        }
    }
    *top = t;
    *bottom = b;
}

/// One tile: `acc[j][l] = sum over (ci, ky, kx) of w[j][tap] * pad[ci][row + ky][x + l + kx]`.
///
/// # Safety
/// The CPU must have AVX-512F; `pad` must hold every row the taps read (`row + 2 + L`
/// floats past each channel's offset, as `conv3x3` lays it out).
#[target_feature(enable = "avx512f")]
unsafe fn tile(
    pad: &[f32],
    base: usize,
    (cs, pw): (usize, usize),
    wv: &[[f32; OB]],
    acc: &mut [__m512; OB],
) {
    *acc = [_mm512_setzero_ps(); OB];
    for (ci, taps) in wv.chunks_exact(9).enumerate() {
        for ky in 0..3 {
            let row = base + ci * cs + ky * pw;
            debug_assert!(row + 2 + L <= pad.len());
            for kx in 0..3 {
                let s = _mm512_loadu_ps(pad.as_ptr().add(row + kx));
                let wj = &taps[ky * 3 + kx];
                for j in 0..OB {
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(wj[j]), s, acc[j]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Rows 4 KiB apart (or a multiple) share their L1 sets; 2040 floats apart they spread.
    #[test]
    fn crowding_follows_the_rows_l1_sets() {
        assert!(super::crowds_l1(16, 2048)); // one offset: 16 rows in the same sets
        assert!(super::crowds_l1(7, 1024));
        assert!(!super::crowds_l1(6, 1024));
        assert!(!super::crowds_l1(16, 2040)); // 128 offsets
        assert!(!super::crowds_l1(32, 128)); // 8 offsets, 4 rows each
        assert!(super::crowds_l1(256, 64)); // 16 offsets, 16 rows each
    }
}
