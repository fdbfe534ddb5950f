//! The AVX2 + FMA kernels of the channels-last engine (`infer::nhwc`: MobileNetV2's inverted
//! residual blocks): the packed 1x1 GEMM (6 pixels x 16 channels per register tile), its
//! gathering form for the stem's 3x3 taps, and the depthwise 3x3 row kernel.

use std::arch::x86_64::*;

use crate::infer::kernels::Act;
use crate::infer::nhwc::{Depthwise, Gemm1x1, MR, NR};

/// See [`Gemm1x1::run_panels`].
///
/// # Safety
/// The CPU must have AVX2 and FMA, and the rows in bounds as `run_panels` checks.
#[target_feature(enable = "avx2,fma")]
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
    let panels = g.panels.as_slice();
    let xp = x.as_ptr();
    let ap = add.map_or(std::ptr::null(), |a| a.as_ptr());
    for p in p0..p1 {
        let w = panels.as_ptr().add(p * ic * NR);
        let bias = g.bias.as_ptr().add(p * NR);
        let cols = NR.min(oc - p * NR);
        let col = p * NR;
        let mut r = 0;
        if cols <= 8 {
            // A half-empty last panel (oc = 24, 40, ...): one register column, twice the
            // pixels per tile, no multiply-adds spent on padding.
            while r < n {
                let (xr, or) = (xp.add(r * ldx), op.add(r * ldo + col));
                let ar = if ap.is_null() {
                    ap
                } else {
                    ap.add(r * ldo + col)
                };
                let t = (lo, hi, cols);
                match n - r {
                    1 => half::<1>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    2 => half::<2>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    3 => half::<3>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    4 => half::<4>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    5 => half::<5>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    6 => half::<6>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    7..=11 => half::<7>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                    _ => half::<12>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                }
                r += if n - r >= 12 { 12 } else { (n - r).min(7) };
            }
            continue;
        }
        while r < n {
            let at = |base: *const f32, ld: usize| base.add(r * ld + col);
            let (xr, or) = (xp.add(r * ldx), op.add(r * ldo + col));
            let ar = if ap.is_null() { ap } else { at(ap, ldo) };
            let t = (lo, hi, cols);
            match n - r {
                1 => tile::<1>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                2 => tile::<2>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                3 => tile::<3>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                4 => tile::<4>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                5 => tile::<5>(xr, ldx, ic, w, bias, ar, or, ldo, t),
                _ => tile::<MR>(xr, ldx, ic, w, bias, ar, or, ldo, t),
            }
            r += MR;
        }
    }
}

/// [`Gemm1x1::run_gather`] on AVX2: whole panels only (`oc % 16 == 0`).
///
/// # Safety
/// The CPU must have AVX2 and FMA; the bounds as `run_gather` checks them.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_gather(
    g: &Gemm1x1,
    x: *const f32,
    step: usize,
    offs: &[usize],
    n: usize,
    out: *mut f32,
    act: Act,
) {
    let (ic, oc) = (g.ic, g.oc);
    let (lo, hi) = act.bounds();
    let o = offs.as_ptr();
    let null = std::ptr::null();
    for p in 0..g.panels() {
        let w = g.panels.as_slice().as_ptr().add(p * ic * NR);
        let bias = g.bias.as_ptr().add(p * NR);
        let t = (lo, hi, NR);
        let mut r = 0;
        while r < n {
            let (xr, or) = (x.add(r * step), out.add(r * oc + p * NR));
            match n - r {
                1 => tile_g::<1, true>(xr, step, o, ic, w, bias, null, or, oc, t),
                2 => tile_g::<2, true>(xr, step, o, ic, w, bias, null, or, oc, t),
                3 => tile_g::<3, true>(xr, step, o, ic, w, bias, null, or, oc, t),
                4 => tile_g::<4, true>(xr, step, o, ic, w, bias, null, or, oc, t),
                5 => tile_g::<5, true>(xr, step, o, ic, w, bias, null, or, oc, t),
                _ => tile_g::<MR, true>(xr, step, o, ic, w, bias, null, or, oc, t),
            }
            r += MR;
        }
    }
}

/// `R` pixels x one panel of 16 output channels (`cols` of them stored).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` must hold `R` rows at stride `ldx` of `k` floats,
/// `w` a panel of `k * 16` floats and `bias` 16, `out` (and `add`, unless null) `R` rows
/// at stride `ldo` with `cols` floats each that are this call's own.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    x: *const f32,
    ldx: usize,
    k: usize,
    w: *const f32,
    bias: *const f32,
    add: *const f32,
    out: *mut f32,
    ldo: usize,
    t: (f32, f32, usize),
) {
    tile_g::<R, false>(x, ldx, std::ptr::null(), k, w, bias, add, out, ldo, t)
}

/// [`tile`], pixel `r`'s input `i` at `x[r * ldx + offs[i]]` when `G` (gathered straight
/// from the image, no im2col buffer), else at `x[r * ldx + i]`.
///
/// # Safety
/// As [`tile`], every gathered element in bounds.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_g<const R: usize, const G: bool>(
    x: *const f32,
    ldx: usize,
    offs: *const usize,
    k: usize,
    w: *const f32,
    bias: *const f32,
    add: *const f32,
    out: *mut f32,
    ldo: usize,
    (lo, hi, cols): (f32, f32, usize),
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for i in 0..k {
        let w0 = _mm256_loadu_ps(w.add(i * NR));
        let w1 = _mm256_loadu_ps(w.add(i * NR + 8));
        let xi = if G { x.add(*offs.add(i)) } else { x.add(i) };
        for (r, a) in acc.iter_mut().enumerate() {
            let v = _mm256_broadcast_ss(&*xi.add(r * ldx));
            a[0] = _mm256_fmadd_ps(v, w0, a[0]);
            a[1] = _mm256_fmadd_ps(v, w1, a[1]);
        }
    }
    let (b0, b1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
    let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    for (r, a) in acc.iter().enumerate() {
        let mut v = [_mm256_add_ps(a[0], b0), _mm256_add_ps(a[1], b1)];
        let o = out.add(r * ldo);
        if cols == NR {
            if !add.is_null() {
                let s = add.add(r * ldo);
                v[0] = _mm256_add_ps(v[0], _mm256_loadu_ps(s));
                v[1] = _mm256_add_ps(v[1], _mm256_loadu_ps(s.add(8)));
            }
            for (j, v) in v.iter().enumerate() {
                let v = _mm256_min_ps(_mm256_max_ps(*v, vlo), vhi);
                _mm256_storeu_ps(o.add(8 * j), v);
            }
        } else {
            let mut t = [0f32; NR];
            _mm256_storeu_ps(t.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), v[1]);
            for (j, t) in t.iter().enumerate().take(cols) {
                let res = if add.is_null() {
                    0.0
                } else {
                    *add.add(r * ldo + j)
                };
                *o.add(j) = (t + res).max(lo).min(hi);
            }
        }
    }
}

/// `R` pixels x the first 8 channels of a panel (`cols <= 8` of them stored).
///
/// # Safety
/// As [`tile`], with `cols <= 8`.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn half<const R: usize>(
    x: *const f32,
    ldx: usize,
    k: usize,
    w: *const f32,
    bias: *const f32,
    add: *const f32,
    out: *mut f32,
    ldo: usize,
    (lo, hi, cols): (f32, f32, usize),
) {
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..k {
        let w0 = _mm256_loadu_ps(w.add(i * NR));
        for (r, a) in acc.iter_mut().enumerate() {
            let v = _mm256_broadcast_ss(&*x.add(r * ldx + i));
            *a = _mm256_fmadd_ps(v, w0, *a);
        }
    }
    let b0 = _mm256_loadu_ps(bias);
    let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    for (r, a) in acc.iter().enumerate() {
        let v = _mm256_add_ps(*a, b0);
        let o = out.add(r * ldo);
        if cols == 8 {
            let v = if add.is_null() {
                v
            } else {
                _mm256_add_ps(v, _mm256_loadu_ps(add.add(r * ldo)))
            };
            _mm256_storeu_ps(o, _mm256_min_ps(_mm256_max_ps(v, vlo), vhi));
        } else {
            let mut t = [0f32; 8];
            _mm256_storeu_ps(t.as_mut_ptr(), v);
            for (j, t) in t.iter().enumerate().take(cols) {
                let res = if add.is_null() {
                    0.0
                } else {
                    *add.add(r * ldo + j)
                };
                *o.add(j) = (t + res).max(lo).min(hi);
            }
        }
    }
}

/// One output row of [`Depthwise::run_channels`]: `out` is `ow` pixels of `c` floats,
/// each present source row `w * c`; channels `c0..c1`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `out`'s columns `c0..c1` are the caller's own.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn depthwise_row(
    d: &Depthwise,
    rows: [Option<&[f32]>; 3],
    w: usize,
    s: usize,
    out: *mut f32,
    ow: usize,
    (c0, c1): (usize, usize),
) {
    let c = d.c;
    assert!(ow >= 1 && (ow - 1) * s < w && c1 <= c);
    for r in rows.iter().flatten() {
        assert_eq!(r.len(), w * c, "source row");
    }
    let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
    let vec_c = c0 + (c1 - c0) / 8 * 8;
    // `o[..c] = relu6(b + sum over taps of k * v)` for one output pixel; a macro so the
    // 9-tap loop of interior pixels is unrolled with its count known.
    macro_rules! pixel {
        ($taps:expr, $o:expr) => {{
            let (taps, o) = ($taps, $o);
            let mut ch = c0;
            while ch + 32 <= vec_c {
                let mut acc = [zero; 4];
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(d.b.as_ptr().add(ch + 8 * j));
                }
                for &(k, v) in taps {
                    for (j, a) in acc.iter_mut().enumerate() {
                        let at = ch + 8 * j;
                        let (k, v): (*const f32, *const f32) = (k, v);
                        *a = _mm256_fmadd_ps(
                            _mm256_loadu_ps(k.add(at)),
                            _mm256_loadu_ps(v.add(at)),
                            *a,
                        );
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(
                        o.add(ch + 8 * j),
                        _mm256_min_ps(_mm256_max_ps(*a, zero), six),
                    );
                }
                ch += 32;
            }
            while ch < vec_c {
                let mut a = _mm256_loadu_ps(d.b.as_ptr().add(ch));
                for &(k, v) in taps {
                    let (k, v): (*const f32, *const f32) = (k, v);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(k.add(ch)), _mm256_loadu_ps(v.add(ch)), a);
                }
                _mm256_storeu_ps(o.add(ch), _mm256_min_ps(_mm256_max_ps(a, zero), six));
                ch += 8;
            }
            for ch in vec_c..c1 {
                let mut a = d.b[ch];
                for &(k, v) in taps {
                    let (k, v): (*const f32, *const f32) = (k, v);
                    a += *k.add(ch) * *v.add(ch);
                }
                *o.add(ch) = a.clamp(0.0, 6.0);
            }
        }};
    }
    let kp: [*const f32; 9] = std::array::from_fn(|t| d.k.as_ptr().add(t * c));
    let full = rows.iter().all(Option::is_some);
    // Interior pixels ox_lo..ox_hi (all nine taps inside the image) of a row whose three
    // source rows exist: channel block by channel block with the block's nine weight
    // vectors held in registers, two pixels at a time (one load per multiply-add).
    let (ox_lo, ox_hi) = (1, if w >= 2 { (w - 2) / s + 1 } else { 0 });
    let interior = full && ox_hi > ox_lo && (c1 - c0) % 8 == 0;
    if interior {
        let rp = rows.map(|r| r.map_or(std::ptr::null(), |r| r.as_ptr()));
        let (cs, ss) = (c, s * c);
        for ch in (c0..c1).step_by(8) {
            let kv: [__m256; 9] = std::array::from_fn(|t| _mm256_loadu_ps(kp[t].add(ch)));
            let b = _mm256_loadu_ps(d.b.as_ptr().add(ch));
            let span = (ox_lo, ox_hi);
            let mut ox = if s == 1 {
                interior_run::<1>(rp, c, ch, &kv, b, out, span)
            } else {
                interior_run::<2>(rp, c, ch, &kv, b, out, span)
            };
            while ox + 2 <= ox_hi {
                let (mut a0, mut a1) = (b, b);
                for (ky, r) in rp.iter().enumerate() {
                    let p = r.add((ox * s - 1) * cs + ch);
                    for kx in 0..3 {
                        let k = kv[ky * 3 + kx];
                        a0 = _mm256_fmadd_ps(k, _mm256_loadu_ps(p.add(kx * cs)), a0);
                        a1 = _mm256_fmadd_ps(k, _mm256_loadu_ps(p.add(ss + kx * cs)), a1);
                    }
                }
                let o = out.add(ox * c + ch);
                _mm256_storeu_ps(o, _mm256_min_ps(_mm256_max_ps(a0, zero), six));
                _mm256_storeu_ps(o.add(c), _mm256_min_ps(_mm256_max_ps(a1, zero), six));
                ox += 2;
            }
            if ox < ox_hi {
                let mut a0 = b;
                for (ky, r) in rp.iter().enumerate() {
                    let p = r.add((ox * s - 1) * cs + ch);
                    for kx in 0..3 {
                        a0 = _mm256_fmadd_ps(kv[ky * 3 + kx], _mm256_loadu_ps(p.add(kx * cs)), a0);
                    }
                }
                _mm256_storeu_ps(
                    out.add(ox * c + ch),
                    _mm256_min_ps(_mm256_max_ps(a0, zero), six),
                );
            }
        }
    }
    for ox in 0..ow {
        if interior && ox >= ox_lo && ox < ox_hi {
            continue;
        }
        let o = out.add(ox * c);
        if full && ox * s >= 1 && ox * s + 1 < w {
            // Interior pixel: all nine taps.
            let x0 = ox * s - 1;
            let rp = rows.map(|r| r.map_or(std::ptr::null(), |r| r.as_ptr().add(x0 * c)));
            let taps: [(*const f32, *const f32); 9] =
                std::array::from_fn(|t| (kp[t], rp[t / 3].add((t % 3) * c)));
            pixel!(&taps, o);
            continue;
        }
        // The taps inside the image: (weights, source pixel).
        let mut taps = [(std::ptr::null::<f32>(), std::ptr::null::<f32>()); 9];
        let mut n = 0;
        for (ky, r) in rows.iter().enumerate() {
            let Some(r) = r else { continue };
            for kx in 0..3 {
                let Some(x) = (ox * s + kx).checked_sub(1).filter(|&x| x < w) else {
                    continue;
                };
                taps[n] = (kp[ky * 3 + kx], r.as_ptr().add(x * c));
                n += 1;
            }
        }
        pixel!(&taps[..n], o);
    }
}

/// Interior output pixels of one row, [`RUN`] at a time from `ox_lo` on, for the 8 channels
/// at `ch` (weights `kv`, bias `b`), stride `S`: each source pixel is loaded once and feeds
/// every output of the run whose window holds it (0.5 loads per multiply-add at stride 1,
/// 0.75 at stride 2, against 1 for a pixel at a time), each output summing its taps in the
/// same order as the single-pixel path. Returns the first pixel not done.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `rp` must be the three source rows of `w * c` floats,
/// `ox_lo..ox_hi` interior pixels (all nine taps inside the row) and `out`'s pixels at `ch`
/// the caller's own.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn interior_run<const S: usize>(
    rp: [*const f32; 3],
    c: usize,
    ch: usize,
    kv: &[__m256; 9],
    b: __m256,
    out: *mut f32,
    (ox_lo, ox_hi): (usize, usize),
) -> usize {
    let mut ox = ox_lo;
    while ox + RUN <= ox_hi {
        let mut acc = [b; RUN];
        for (ky, r) in rp.iter().enumerate() {
            let p = r.add((ox * S - 1) * c + ch);
            for col in 0..(RUN - 1) * S + 3 {
                let v = _mm256_loadu_ps(p.add(col * c));
                for (o, a) in acc.iter_mut().enumerate() {
                    if (o * S..o * S + 3).contains(&col) {
                        *a = _mm256_fmadd_ps(kv[ky * 3 + col - o * S], v, *a);
                    }
                }
            }
        }
        let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
        for (o, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(
                out.add((ox + o) * c + ch),
                _mm256_min_ps(_mm256_max_ps(*a, zero), six),
            );
        }
        ox += RUN;
    }
    ox
}

/// Output pixels per [`interior_run`] step: 9 weights + 4 sums + the loaded pixel fill 14 of
/// the 16 registers.
const RUN: usize = 4;
