//! 3x3 convolution (stride 1, pad 1) by Winograd's minimal filtering F(2x2, 3x3): each 2x2
//! output tile costs 16 multiplies per (input, output) channel pair instead of 36, as 16
//! GEMMs `M[xi] = U[xi] . V[xi]` over a band of tiles between an input and an output transform
//! (Lavin & Gray, 2016). A 2x2 output tile is exactly a 2x2 max-pool window, so a following pool
//! is taken from the tile before it is written.
//!
//! Transforms: `V = B^T d B` (d: 4x4 input patch), `U = G g G^T` (g: 3x3 kernel),
//! `Y = A^T M A` (2x2 output), with
//! `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]`,
//! `A^T = [1 1 1 0; 0 1 -1 -1]`.

use std::cell::RefCell;

use gemm::Parallelism;

use super::kernels::{for_tasks, plane_offset, tasks, Act, OutPtr};
use super::packed;
#[cfg(x86_simd)]
use super::packed::{packed_len, MR};
use crate::ops::conv2d::matmul;
use crate::simd::multiversion;

/// A layer's transformed weights: `u` is `U[xi, o, i]` (16 x oc x ic); `packed` the same 16
/// matrices packed for the AVX-512 and AVX2 GEMMs ([`super::packed::pack`]).
#[derive(Debug, Clone)]
pub struct Weights {
    pub u: Vec<f32>,
    #[cfg_attr(not(x86_simd), allow(dead_code))]
    pub packed: Vec<f32>,
}

impl Weights {
    /// From PyTorch-layout weights `[oc, ic, 3, 3]`.
    pub fn new(w: &[f32], oc: usize, ic: usize) -> Self {
        let u = transform_weights(w, oc, ic);
        let packed = u
            .chunks_exact(oc * ic)
            .flat_map(|m| packed::pack(m, oc, ic))
            .collect();
        Self { u, packed }
    }
}

/// `U[xi, o, i]` (16 x oc x ic) from PyTorch-layout weights `[oc, ic, 3, 3]`.
fn transform_weights(w: &[f32], oc: usize, ic: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * oc * ic];
    for o in 0..oc {
        for i in 0..ic {
            let g = &w[(o * ic + i) * 9..(o * ic + i) * 9 + 9];
            // G g: 4x3
            let mut gg = [[0f64; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c] as f64, g[3 + c] as f64, g[6 + c] as f64);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            // (G g) G^T: 4x4
            for (r, row) in gg.iter().enumerate() {
                let t = [
                    row[0],
                    0.5 * (row[0] + row[1] + row[2]),
                    0.5 * (row[0] - row[1] + row[2]),
                    row[2],
                ];
                for (c, v) in t.iter().enumerate() {
                    u[((r * 4 + c) * oc + o) * ic + i] = *v as f32;
                }
            }
        }
    }
    u
}

/// Frees this module's thread-local scratch on the calling thread.
pub(super) fn release_thread_scratch() {
    super::kernels::free_local(&V);
    super::kernels::free_local(&M);
    super::kernels::free_local(&ROWS);
}

thread_local! {
    static V: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static M: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

multiversion! {
/// `V[xi, i, t]` for the tiles of tile rows `ty0..ty1` (all `tw` tiles of each row).
fn input_transform(x: &[f32], shape: (usize, usize, usize), tiles: (usize, usize, usize), v: &mut [f32], rows: &mut Vec<f32>) {
    let ((ic, h, w), (ty0, ty1, tw)) = (shape, tiles);
    let n = (ty1 - ty0) * tw;
    // One zero-padded row: columns -1 ..= 2 * tw (covers every tile's 4 columns).
    let pw = 2 * tw + 2;
    rows.resize(4 * pw, 0.0);
    for i in 0..ic {
        let plane = &x[i * h * w..(i + 1) * h * w];
        for ty in ty0..ty1 {
            // The 4 padded input rows 2ty-1 ..= 2ty+2.
            for r in 0..4 {
                let dst = &mut rows[r * pw..(r + 1) * pw];
                dst.fill(0.0);
                let y = (2 * ty + r) as isize - 1;
                if y >= 0 && (y as usize) < h {
                    let src = &plane[y as usize * w..(y as usize + 1) * w];
                    let len = w.min(pw - 1);
                    dst[1..1 + len].copy_from_slice(&src[..len]);
                }
            }
            // B^T d: row combinations, vectorised over the whole padded width.
            let (r0, rest) = rows.split_at_mut(pw);
            let (r1, rest) = rest.split_at_mut(pw);
            let (r2, r3) = rest.split_at_mut(pw);
            for c in 0..pw {
                let (a, b, cc, d) = (r0[c], r1[c], r2[c], r3[c]);
                r0[c] = a - cc;
                r3[c] = b - d;
                r1[c] = b + cc;
                r2[c] = cc - b;
            }
            // (B^T d) B: column combinations, one output row of V per (row, column) pair,
            // contiguous over the tiles so it vectorises.
            let base = (ty - ty0) * tw;
            for (ri, row) in [&*r0, &*r1, &*r2, &*r3].into_iter().enumerate() {
                let col = |k: usize| (0..tw).map(move |tx| row[2 * tx + k]);
                let at = |cj: usize| ((ri * 4 + cj) * ic + i) * n + base;
                for (d, (a, c)) in v[at(0)..at(0) + tw].iter_mut().zip(col(0).zip(col(2))) {
                    *d = a - c;
                }
                for (d, (b, c)) in v[at(1)..at(1) + tw].iter_mut().zip(col(1).zip(col(2))) {
                    *d = b + c;
                }
                for (d, (b, c)) in v[at(2)..at(2) + tw].iter_mut().zip(col(1).zip(col(2))) {
                    *d = c - b;
                }
                for (d, (b, e)) in v[at(3)..at(3) + tw].iter_mut().zip(col(1).zip(col(3))) {
                    *d = b - e;
                }
            }
        }
    }
}
}

multiversion! {
/// `Y = A^T M A` + bias, activation, optional pool, for output channels `o0..o1` of the band.
///
/// # Safety
/// As [`transform_output`].
unsafe fn output_transform(m: &[f32], geom: (usize, usize, usize, usize, usize, usize), b: &[f32], act: Act, pool: bool, out: OutPtr) {
    let (mo, n, ty0, ty1, h, w) = geom;
    let tw = n / (ty1 - ty0);
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    let plane = oh * ow;
    let apply = |v: f32, bias: f32| match act {
        Act::None => v + bias,
        Act::Relu => (v + bias).max(0.0),
        Act::Relu6 => (v + bias).clamp(0.0, 6.0),
    };
    // Row-major 2x4 `A^T M` for one tile row, then the 2x2 outputs, each as arrays over the
    // row's tiles: every loop runs over contiguous memory.
    let mut r = vec![0f32; 8 * tw];
    for (o, &bias) in b.iter().enumerate().take(mo) {
        for ty in ty0..ty1 {
            let t0 = (ty - ty0) * tw;
            let slice = |xi: usize| &m[(xi * mo + o) * n + t0..(xi * mo + o) * n + t0 + tw];
            for c in 0..4 {
                let (m0, m1, m2, m3) = (slice(c), slice(4 + c), slice(8 + c), slice(12 + c));
                let (top, bottom) = r.split_at_mut(4 * tw);
                let (top, bottom) = (&mut top[c * tw..(c + 1) * tw], &mut bottom[c * tw..(c + 1) * tw]);
                for t in 0..tw {
                    top[t] = m0[t] + m1[t] + m2[t];
                    bottom[t] = m1[t] - m2[t] - m3[t];
                }
            }
            let rr = |row: usize, c: usize| &r[(row * 4 + c) * tw..(row * 4 + c + 1) * tw];
            let y = |row: usize, t: usize| {
                let (a, b2, c, d) = (rr(row, 0)[t], rr(row, 1)[t], rr(row, 2)[t], rr(row, 3)[t]);
                (a + b2 + c, b2 - c - d)
            };
            if pool {
                // SAFETY: row ty of plane o (pooled), tw == ow when pooling.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(o * plane + ty * ow), tw) };
                for (t, d) in dst.iter_mut().enumerate() {
                    let (y00, y01) = y(0, t);
                    let (y10, y11) = y(1, t);
                    *d = apply(y00.max(y01).max(y10).max(y11), bias);
                }
            } else {
                for dy in 0..2 {
                    let yy = 2 * ty + dy;
                    if yy >= h {
                        continue;
                    }
                    // SAFETY: row yy of plane o, inside [oc, h, w].
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(o * plane + yy * ow), w) };
                    for (t, pair) in dst.chunks_mut(2).enumerate() {
                        let (a, c) = y(dy, t);
                        pair[0] = apply(a, bias);
                        if pair.len() > 1 {
                            pair[1] = apply(c, bias);
                        }
                    }
                }
            }
        }
    }
}
}

/// The 4 input rows `2 ty - 1 ..= 2 ty + 2` of `plane` (`[h, w]`) into `rows` (`[4, pw]`),
/// each from column 1 (zeros outside the image): the SIMD input transforms' tile rows. Columns
/// 0 and `w + 1..` are left as they are (zero: the callers clear `rows` once per call).
#[cfg(x86_simd)]
pub(super) fn tile_rows(
    rows: &mut [f32],
    plane: &[f32],
    (h, w): (usize, usize),
    ty: usize,
    pw: usize,
) {
    assert!(pw > w && rows.len() >= 4 * pw && plane.len() >= h * w);
    for r in 0..4 {
        let dst = &mut rows[r * pw + 1..r * pw + 1 + w];
        let y = (2 * ty + r) as isize - 1;
        if y >= 0 && (y as usize) < h {
            dst.copy_from_slice(&plane[y as usize * w..(y as usize + 1) * w]);
        } else {
            dst.fill(0.0);
        }
    }
}

/// F(2x2, 3x3)'s input tile transform `B^T d B` on a 4x4 tile of vectors (each lane its own
/// tile), `d[r][c]` = padded input row `r`, column `c`: the SIMD kernels' shared arithmetic,
/// `add` and `sub` being their vector type's.
#[cfg(x86_simd)]
#[inline(always)]
pub(super) fn input_tile<V: Copy>(
    d: &[[V; 4]; 4],
    add: impl Fn(V, V) -> V,
    sub: impl Fn(V, V) -> V,
) -> [[V; 4]; 4] {
    let t: [[V; 4]; 4] = [
        std::array::from_fn(|c| sub(d[0][c], d[2][c])),
        std::array::from_fn(|c| add(d[1][c], d[2][c])),
        std::array::from_fn(|c| sub(d[2][c], d[1][c])),
        std::array::from_fn(|c| sub(d[1][c], d[3][c])),
    ];
    t.map(|r| {
        [
            sub(r[0], r[2]),
            add(r[1], r[2]),
            sub(r[2], r[1]),
            sub(r[1], r[3]),
        ]
    })
}

/// F(2x2, 3x3)'s output tile transform `A^T M A` of the 16 products `m[xi]` (each lane its own
/// tile): `[[y00, y01], [y10, y11]]`, the tile's 2x2 outputs.
#[cfg(x86_simd)]
#[inline(always)]
pub(super) fn output_tile<V: Copy>(
    m: &[V; 16],
    add: impl Fn(V, V) -> V,
    sub: impl Fn(V, V) -> V,
) -> [[V; 2]; 2] {
    let r: [[V; 4]; 2] = [
        std::array::from_fn(|c| add(add(m[c], m[4 + c]), m[8 + c])),
        std::array::from_fn(|c| sub(sub(m[4 + c], m[8 + c]), m[12 + c])),
    ];
    r.map(|row| {
        [
            add(add(row[0], row[1]), row[2]),
            sub(sub(row[1], row[2]), row[3]),
        ]
    })
}

/// The input transform with `level`'s kernels (the caller checked the CPU has them).
fn transform_input(
    x: &[f32],
    shape: (usize, usize, usize),
    tiles: (usize, usize, usize),
    (v, rows): (&mut [f32], &mut Vec<f32>),
    level: u8,
) {
    #[cfg(x86_simd)]
    if let Some(k) = super::isa::set(level) {
        // SAFETY: the CPU has `level`'s instructions, checked by the caller.
        return unsafe { (k.winograd_input)(x, shape, tiles, v, rows) };
    }
    let _ = level;
    input_transform(x, shape, tiles, v, rows);
}

/// The output transform with `level`'s kernels.
///
/// # Safety
/// `out` must address plane `o0` of the layer's `[oc, h', w']` output with the `mo` planes
/// after it, and only this task may write its tiles' rows of them; the CPU must have `level`'s
/// instructions.
unsafe fn transform_output(
    m: &[f32],
    geom: (usize, usize, usize, usize, usize, usize),
    b: &[f32],
    (act, pool): (Act, bool),
    out: OutPtr,
    level: u8,
) {
    #[cfg(x86_simd)]
    if let Some(k) = super::isa::set(level) {
        // SAFETY: the caller's contract.
        return unsafe { (k.winograd_output)(m, geom, b, (act, pool), out.0) };
    }
    let _ = level;
    // SAFETY: the caller's contract.
    unsafe { output_transform(m, geom, b, act, pool, out) };
}

/// 3x3 conv + bias + `act` (+ 2x2 max pool) with transformed weights `u` ([`Weights`]).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    shape: (usize, usize, usize),
    u: &Weights,
    b: &[f32],
    oc: usize,
    act: Act,
    pool: bool,
    out: &mut [f32],
    split: bool,
) {
    let level = crate::simd::level();
    conv3x3_with(x, shape, u, b, oc, (act, pool), out, split, level);
}

/// As [`conv3x3`], with the kernels of `level` ([`crate::simd::level`]'s numbering; the
/// caller checked the CPU has it): the AVX-512 transforms and products at 2, the AVX2 ones at 1.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3_with(
    x: &[f32],
    (ic, h, w): (usize, usize, usize),
    weights: &Weights,
    b: &[f32],
    oc: usize,
    (act, pool): (Act, bool),
    out: &mut [f32],
    split: bool,
    level: u8,
) {
    // Tiles that produce needed outputs (a pool drops an odd last row / column).
    let (th, tw) = if pool {
        (h / 2, w / 2)
    } else {
        (h.div_ceil(2), w.div_ceil(2))
    };
    if th == 0 || tw == 0 {
        return;
    }
    // The raw-pointer writes below rely on these.
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    assert!(x.len() >= ic * h * w, "input is not {ic}x{h}x{w}");
    assert!(
        weights.u.len() >= 16 * oc * ic && b.len() >= oc,
        "weights are not {oc}x{ic}x3x3"
    );
    assert!(out.len() >= oc * oh * ow, "output is not {oc}x{oh}x{ow}");
    // Bands of tile rows holding about 1 MiB of V and M.
    let per_row = 16 * (ic + oc) * tw;
    let band = ((1 << 18) / per_row).clamp(1, th);
    let bands: Vec<(usize, usize)> = (0..th)
        .step_by(band)
        .map(|t0| (t0, (t0 + band).min(th)))
        .collect();
    // Few bands (small, deep layers): also split the output channels.
    let work = tasks(&bands, oc, split);
    let out = OutPtr(out.as_mut_ptr());
    for_tasks(&work, split, |(t0, t1), (o0, o1)| {
        let n = (t1 - t0) * tw;
        let mo = o1 - o0;
        V.with(|v| {
            M.with(|m| {
                ROWS.with(|rows| {
                    let (mut v, mut m, mut rows) =
                        (v.borrow_mut(), m.borrow_mut(), rows.borrow_mut());
                    v.resize(16 * ic * n, 0.0);
                    m.resize(16 * mo * n, 0.0);
                    transform_input(x, (ic, h, w), (t0, t1, tw), (&mut v, &mut rows), level);
                    for xi in 0..16 {
                        let (vx, mx) = (
                            v.as_ptr().wrapping_add(xi * ic * n),
                            m.as_mut_ptr().wrapping_add(xi * mo * n),
                        );
                        #[cfg(x86_simd)]
                        if let Some(k) = super::isa::set(level) {
                            assert_eq!(o0 % MR, 0, "channel slices start on a packed tile");
                            let per = packed_len(oc, ic);
                            let u = &weights.packed[xi * per + o0 * ic..(xi + 1) * per];
                            // SAFETY: the CPU has `level`'s instructions (the caller's word);
                            // u holds the tiles of channels o0..o1 of U[xi], V[xi] is [ic, n],
                            // M[xi] is [mo, n].
                            unsafe { (k.gemm)(u, None, (mo, ic), vx, n, mx, n) };
                            continue;
                        }
                        // SAFETY: U[xi] rows o0..o1 ([oc, ic]), V[xi] is [ic, n], M[xi] is
                        // [mo, n], all dense row-major.
                        unsafe {
                            matmul(
                                (mo, n, ic),
                                mx,
                                false,
                                (weights.u.as_ptr().add((xi * oc + o0) * ic), ic, 1),
                                (vx, n, 1),
                                Parallelism::None,
                            );
                        }
                    }
                    let geom = (mo, n, t0, t1, h, w);
                    // SAFETY: planes o0..o1 of the checked output, this task's tile rows only;
                    // `level` is the caller's word for the CPU.
                    unsafe {
                        let dst = plane_offset(out, o0, (h, w), pool);
                        transform_output(&m, geom, &b[o0..o1], (act, pool), dst, level);
                    }
                })
            })
        })
    });
}
