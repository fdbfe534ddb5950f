//! The fused f32 engine's AVX2 + FMA kernels, in one place: the separable blocks' depthwise
//! 3x3 and packed pointwise GEMM, and the direct 3x3 convolution of the RGB input layer. They
//! are the AVX-512 kernels' twins (same data layouts, same packed weights, same bands), with
//! 8-lane vectors and 16 registers instead of 16 lanes and 32: tiles are sized so the
//! accumulators, the loaded inputs and one broadcast weight fit in the 16 `ymm` registers.
//!
//! AVX2 has no cheap masked store (`vmaskmovps` to memory is microcoded on AMD), so partial
//! vectors are stored through a stack copy, and masked loads are used only at row edges.
//!
//! [`nhwc`] holds the channels-last engine's AVX2 kernels (MobileNetV2's inverted blocks).

pub mod nhwc;

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::kernels::Act;
use super::packed::MR;
use super::winograd::{input_tile, output_tile, tile_rows};

/// Floats per vector.
const L: usize = 8;

/// The mask of lanes `l` with `0 <= start + l < end` (for `_mm256_maskload_ps`).
#[inline]
#[target_feature(enable = "avx2")]
fn range_mask(start: isize, end: usize) -> __m256i {
    let idx = _mm256_add_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(start as i32),
    );
    let above = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(-1));
    let below = _mm256_cmpgt_epi32(_mm256_set1_epi32(end as i32), idx);
    _mm256_and_si256(above, below)
}

/// Stores the first `n` lanes of `v` (all 8 from 8 on).
///
/// # Safety
/// The CPU must have AVX; `dst` must be writable for `n.min(8)` floats.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_part(dst: *mut f32, n: usize, v: __m256) {
    if n >= L {
        _mm256_storeu_ps(dst, v);
    } else {
        let mut t = [0f32; L];
        _mm256_storeu_ps(t.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(t.as_ptr(), dst, n);
    }
}

/// Depthwise 3x3 (pad 1) + bias + ReLU6 of rows `y0..y1` of every channel of `x`
/// (`[c, h, w]`) into `dst` (`[c, rows * w]`), 8 pixels per vector, each 8-pixel column run
/// down the rows with the three source rows' (left, centre, right) vectors rolling in
/// registers: three loads and nine FMAs per output vector. Loads are masked only where the
/// window leaves the row.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
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
    let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
    for ch in 0..c {
        let k = taps[ch].map(|t| _mm256_set1_ps(t));
        let b = _mm256_set1_ps(bias[ch]);
        let plane = x.as_ptr().add(ch * h * w);
        let out = dst.as_mut_ptr().add(ch * n);
        for xs in (0..w).step_by(L) {
            let inner = xs > 0 && xs + L < w;
            let masks = [-1isize, 0, 1].map(|d| range_mask(xs as isize + d, w));
            // Row y's (left, centre, right) neighbours of the 8 pixels; zeros outside. Masked
            // lanes are not read, so the pointers one float before (or past) the row are not
            // dereferenced there.
            let load = |y: usize| -> [__m256; 3] {
                if y >= h {
                    return [zero; 3];
                }
                let p = plane.add(y * w + xs);
                if inner {
                    [
                        _mm256_loadu_ps(p.sub(1)),
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(p.add(1)),
                    ]
                } else {
                    [
                        _mm256_maskload_ps(p.wrapping_sub(1), masks[0]),
                        _mm256_maskload_ps(p, masks[1]),
                        _mm256_maskload_ps(p.wrapping_add(1), masks[2]),
                    ]
                }
            };
            let mut above = if y0 == 0 { [zero; 3] } else { load(y0 - 1) };
            let mut cur = load(y0);
            for y in y0..y1 {
                let below = load(y + 1);
                let s0 = _mm256_fmadd_ps(
                    k[2],
                    above[2],
                    _mm256_fmadd_ps(k[1], above[1], _mm256_fmadd_ps(k[0], above[0], b)),
                );
                let s1 = _mm256_fmadd_ps(
                    k[5],
                    cur[2],
                    _mm256_fmadd_ps(k[4], cur[1], _mm256_mul_ps(k[3], cur[0])),
                );
                let s2 = _mm256_fmadd_ps(
                    k[8],
                    below[2],
                    _mm256_fmadd_ps(k[7], below[1], _mm256_mul_ps(k[6], below[0])),
                );
                let v = _mm256_add_ps(_mm256_add_ps(s0, s1), s2);
                let v = _mm256_min_ps(_mm256_max_ps(v, zero), six);
                store_part(out.add((y - y0) * w + xs), w - xs, v);
                above = cur;
                cur = below;
            }
        }
    }
}

/// Pixels per tile of the GEMM (three vectors).
const P: usize = 3 * L;
/// Channels per tile of the GEMM (half a packed tile of [`MR`]).
const R: usize = 4;

thread_local! {
    /// The GEMM's packed input strips, `[ic, 24]` (two of them for the pool).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The GEMM's register tile, 4 channels x 24 pixels, over all of `ic`:
/// `acc[j][v] += sum_i w[i * MR + j] * x[i * 24 + 8 v ..][..8]`, with `w` pointing at the first
/// of the tile's channels in a packed tile (`[ic, MR]`) and `x` a packed strip (`[ic, 24]`).
/// Twelve accumulators, three loaded vectors and one broadcast: all 16 `ymm` registers. Written
/// in assembly because LLVM, given the same loop in intrinsics, unrolled it and spilled or
/// shuffled registers (80% of the AVX2 peak at best, with 8 x 8 tiles; 45% with this shape),
/// while this loop runs at 98-103% of the `gemm` crate's AVX2 kernel on large shapes and 2x it
/// on the first block's 32x16 (a standalone comparison on an AVX-512 machine, AVX2 code).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `ic >= 1`; `w` must hold `ic` rows of `MR` floats (reading
/// 4 from each) and `x` `ic * 24` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile4x24(acc: &mut [[__m256; 3]; R], w: *const f32, x: *const f32, ic: usize) {
    let [[mut a0, mut a1, mut a2], [mut a3, mut a4, mut a5], [mut a6, mut a7, mut a8], [mut a9, mut a10, mut a11]] =
        *acc;
    // SAFETY: the caller's contract: ic rows of both operands are readable; the loop reads
    // ic * 24 floats of x and 4 floats at each of ic rows of w, and writes no memory.
    unsafe {
        std::arch::asm!(
            "2:",
            "vmovups ymm12, [{x}]",
            "vmovups ymm13, [{x} + 32]",
            "vmovups ymm14, [{x} + 64]",
            "vbroadcastss ymm15, dword ptr [{w}]",
            "vfmadd231ps ymm0, ymm15, ymm12",
            "vfmadd231ps ymm1, ymm15, ymm13",
            "vfmadd231ps ymm2, ymm15, ymm14",
            "vbroadcastss ymm15, dword ptr [{w} + 4]",
            "vfmadd231ps ymm3, ymm15, ymm12",
            "vfmadd231ps ymm4, ymm15, ymm13",
            "vfmadd231ps ymm5, ymm15, ymm14",
            "vbroadcastss ymm15, dword ptr [{w} + 8]",
            "vfmadd231ps ymm6, ymm15, ymm12",
            "vfmadd231ps ymm7, ymm15, ymm13",
            "vfmadd231ps ymm8, ymm15, ymm14",
            "vbroadcastss ymm15, dword ptr [{w} + 12]",
            "vfmadd231ps ymm9, ymm15, ymm12",
            "vfmadd231ps ymm10, ymm15, ymm13",
            "vfmadd231ps ymm11, ymm15, ymm14",
            "add {x}, 96",
            "add {w}, 32",
            "dec {k}",
            "jnz 2b",
            x = inout(reg) x => _,
            w = inout(reg) w => _,
            k = inout(reg) ic => _,
            inout("ymm0") a0, inout("ymm1") a1, inout("ymm2") a2,
            inout("ymm3") a3, inout("ymm4") a4, inout("ymm5") a5,
            inout("ymm6") a6, inout("ymm7") a7, inout("ymm8") a8,
            inout("ymm9") a9, inout("ymm10") a10, inout("ymm11") a11,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack, readonly),
        );
    }
    *acc = [[a0, a1, a2], [a3, a4, a5], [a6, a7, a8], [a9, a10, a11]];
}

/// As [`tile4x24`] for the first 16 pixels of each strip row only (`acc[j][0..2]`; `acc[j][2]`
/// is left as it is): a strip of at most 16 pixels (the 16 tiles of a 4x4 Winograd band, the
/// last 16 of 64) then costs two thirds of a full one instead of the same. Eight accumulators,
/// as many as the FMA units need to stay busy; same loop otherwise.
///
/// # Safety
/// As [`tile4x24`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile4x16(acc: &mut [[__m256; 3]; R], w: *const f32, x: *const f32, ic: usize) {
    let [[mut a0, mut a1, _], [mut a3, mut a4, _], [mut a6, mut a7, _], [mut a9, mut a10, _]] =
        *acc;
    // SAFETY: the caller's contract: ic rows of both operands are readable; the loop reads the
    // first 16 of every 24 floats of x and 4 floats at each of ic rows of w, writes no memory.
    unsafe {
        std::arch::asm!(
            "2:",
            "vmovups ymm12, [{x}]",
            "vmovups ymm13, [{x} + 32]",
            "vbroadcastss ymm15, dword ptr [{w}]",
            "vfmadd231ps ymm0, ymm15, ymm12",
            "vfmadd231ps ymm1, ymm15, ymm13",
            "vbroadcastss ymm15, dword ptr [{w} + 4]",
            "vfmadd231ps ymm3, ymm15, ymm12",
            "vfmadd231ps ymm4, ymm15, ymm13",
            "vbroadcastss ymm15, dword ptr [{w} + 8]",
            "vfmadd231ps ymm6, ymm15, ymm12",
            "vfmadd231ps ymm7, ymm15, ymm13",
            "vbroadcastss ymm15, dword ptr [{w} + 12]",
            "vfmadd231ps ymm9, ymm15, ymm12",
            "vfmadd231ps ymm10, ymm15, ymm13",
            "add {x}, 96",
            "add {w}, 32",
            "dec {k}",
            "jnz 2b",
            x = inout(reg) x => _,
            w = inout(reg) w => _,
            k = inout(reg) ic => _,
            inout("ymm0") a0, inout("ymm1") a1,
            inout("ymm3") a3, inout("ymm4") a4,
            inout("ymm6") a6, inout("ymm7") a7,
            inout("ymm9") a9, inout("ymm10") a10,
            out("ymm12") _, out("ymm13") _, out("ymm15") _,
            options(nostack, readonly),
        );
    }
    for (a, v) in acc
        .iter_mut()
        .zip([[a0, a1], [a3, a4], [a6, a7], [a9, a10]])
    {
        a[..2].copy_from_slice(&v);
    }
}

/// Copies `np <= 24` pixels of every row of `x` (`ic` rows `ldx` floats apart) into `strip`
/// as `[ic, 24]`, zeros past `np`.
///
/// # Safety
/// The CPU must have AVX2; `x` must address `np` floats at each of the `ic` rows.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pack_strip(strip: &mut [f32], x: *const f32, (ic, ldx): (usize, usize), np: usize) {
    assert!(np <= P && strip.len() >= ic * P);
    let masks = [0, 1, 2].map(|v| range_mask(0, np.saturating_sub(v * L)));
    for i in 0..ic {
        let (src, dst) = (x.add(i * ldx), strip.as_mut_ptr().add(i * P));
        for (v, &m) in masks.iter().enumerate() {
            // Masked lanes are not read: past the row's end nothing is dereferenced.
            let val = if np >= (v + 1) * L {
                _mm256_loadu_ps(src.add(v * L))
            } else {
                _mm256_maskload_ps(src.wrapping_add(v * L), m)
            };
            _mm256_storeu_ps(dst.add(v * L), val);
        }
    }
}

/// The strips a run of `n` pixels is cut into, as (first pixel, pixels): 24-pixel strips
/// ([`tile4x24`]), then the rest as one strip of 17-23 pixels, or one or two of at most 16
/// ([`tile4x16`], two thirds of the cost), so that no strip runs mostly empty: 32 = 16 + 16
/// instead of 24 + 8 (32 units of work for 32 pixels, against 48), 128 = 4 x 24 + 2 x 16
/// instead of 5 x 24 + 8.
fn strips(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let (mut full, mut rest) = (n / P, n % P);
    // A remainder of at most 8 pixels takes the last full strip with it: 16 + the rest.
    if rest > 0 && rest <= L && full > 0 {
        full -= 1;
        rest += P;
    }
    let (a, b) = if rest > P {
        (2 * L, rest - 2 * L)
    } else {
        (rest, 0)
    };
    (0..full).map(|s| (s * P, P)).chain(
        [(full * P, a), (full * P + a, b)]
            .into_iter()
            .filter(|s| s.1 > 0),
    )
}

/// `c[o, p] = bias[o] + sum_i w[o, i] * x[i, p]` for `o < oc`, `p < n`: `packed` is
/// `[oc / MR, ic, MR]` (see [`super::packed::pack`]), `bias` (none: zero) padded to whole
/// tiles, `x` is `[ic, n]`, `c` has row stride `ldc`. Each 24-pixel strip of `x` is first
/// copied into a contiguous `[ic, 24]` strip: read in place, the rows of `x` lie `n` floats
/// apart, and where that is a multiple of 1 KiB (a band of 256-wide rows, say) they all fall
/// in the same few L1 sets and evict each other (21 GFLOP/s at n = 2048 against 63 at
/// n = 2040, standalone). Then every 4-channel tile runs over it ([`tile4x24`], or [`tile4x16`]
/// for a strip of at most 16 pixels).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` must address `ic * n` floats and `c` `oc` rows of `n`
/// floats at stride `ldc`, written by no other thread.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm(
    packed: &[f32],
    bias: Option<&[f32]>,
    (oc, ic): (usize, usize),
    x: *const f32,
    n: usize,
    c: *mut f32,
    ldc: usize,
) {
    super::packed::check(packed, bias, (oc, ic));
    if ic == 0 || oc == 0 {
        return;
    }
    PANEL.with(|panel| {
        let mut strip = panel.borrow_mut();
        strip.resize(P * ic, 0.0);
        for (p0, np) in strips(n) {
            pack_strip(&mut strip, x.add(p0), (ic, n), np);
            for o0 in (0..oc).step_by(R) {
                let mut acc = [[_mm256_setzero_ps(); 3]; R];
                if let Some(bias) = bias {
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = [_mm256_set1_ps(bias[o0 + j]); 3];
                    }
                }
                // Rows o0.. of the packed tile; channels past oc are its zero padding.
                let w = packed.as_ptr().add((o0 / MR) * ic * MR + o0 % MR);
                if np <= 2 * L {
                    tile4x16(&mut acc, w, strip.as_ptr(), ic);
                } else {
                    tile4x24(&mut acc, w, strip.as_ptr(), ic);
                }
                for (j, a) in acc.iter().enumerate().take(oc - o0) {
                    let dst = c.add((o0 + j) * ldc + p0);
                    for (v, &a) in a.iter().enumerate() {
                        if np > v * L {
                            store_part(dst.add(v * L), np - v * L, a);
                        }
                    }
                }
            }
        }
    })
}

/// The 2x2 max pool of two 8-pixel rows (a row and the one below it): lanes 0..4 hold the max
/// of each 2x2 window. Only immediate shuffles: constant index vectors would be hoisted into
/// registers the GEMM tiles around it need (LLVM then spilled accumulators inside the k loop).
#[inline]
#[target_feature(enable = "avx2")]
fn pool2x2(top: __m256, bottom: __m256) -> __m128 {
    let v = _mm256_max_ps(top, bottom);
    // Lane pairs (0, 1), (2, 3), ...: the max lands in the even lanes.
    let m = _mm256_max_ps(v, _mm256_shuffle_ps::<0b10_11_00_01>(v, v));
    // Even lanes of each 128-bit half to its low 64 bits, then the two halves' low halves.
    let even = _mm256_shuffle_ps::<0b10_00_10_00>(m, m);
    let packed = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(even));
    _mm256_castps256_ps128(_mm256_castpd_ps(packed))
}

/// The 2x2 max pool of two 16-pixel rows (`top0, top1` and the row below, `bottom0, bottom1`):
/// the 8 pooled pixels in order. One shuffle pair and one permute for both halves, where two
/// [`pool2x2`] calls take twice the shuffles and two stores.
#[inline]
#[target_feature(enable = "avx2")]
fn pool2x2x2(top0: __m256, bottom0: __m256, top1: __m256, bottom1: __m256) -> __m256 {
    let (m0, m1) = (_mm256_max_ps(top0, bottom0), _mm256_max_ps(top1, bottom1));
    // Per 128-bit half: the even lanes of m0's half, then m1's; then the odd ones.
    let even = _mm256_shuffle_ps::<0b10_00_10_00>(m0, m1);
    let odd = _mm256_shuffle_ps::<0b11_01_11_01>(m0, m1);
    // (p0 p1 p4 p5 | p2 p3 p6 p7) as 64-bit pairs (a, b | c, d) -> (a, c, b, d).
    let m = _mm256_castps_pd(_mm256_max_ps(even, odd));
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(m))
}

/// Stores the first `n` lanes of `v` (all 4 from 4 on).
///
/// # Safety
/// `dst` must be writable for `n.min(4)` floats.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store4(dst: *mut f32, n: usize, v: __m128) {
    if n >= 4 {
        _mm_storeu_ps(dst, v);
    } else {
        let mut t = [0f32; 4];
        _mm_storeu_ps(t.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(t.as_ptr(), dst, n);
    }
}

/// As [`gemm`] followed by a 2x2 max pool, then the bias: `x` is a band of `rows` (even) rows
/// of width `w` (`[ic, rows * w]`) whose first row is row `2 * yo` of the layer. Each output
/// tile is 4 channels x (24 pixels of a row and the 24 below them, two [`tile4x24`]), pooled in
/// registers into 12 pixels of output row `yo + r / 2`; it writes rows `yo..yo + rows / 2` of
/// every output plane (`[oh, ow]` each, from `out`). Strips do not cross rows, so a row of
/// `w` pixels costs its [`strips`] (16-pixel ones on [`tile4x16`]): worth it from `w` = 32 on
/// ([`POOL_MIN_WIDTH`]); narrower layers are better served by [`gemm`] over the band and a
/// separate pool.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` must address `ic * rows * w` floats, `out` `oc` planes
/// of `oh * ow` floats whose rows `yo..yo + rows / 2` no other thread writes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm_pool(
    packed: &[f32],
    bias: &[f32],
    (oc, ic): (usize, usize),
    x: *const f32,
    (rows, w): (usize, usize),
    out: *mut f32,
    (oh, ow, yo): (usize, usize, usize),
) {
    super::packed::check(packed, Some(bias), (oc, ic));
    assert!(rows % 2 == 0 && yo + rows / 2 <= oh && ow == w / 2);
    if ic == 0 || oc == 0 {
        return;
    }
    let n = rows * w;
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        panel.resize(2 * P * ic, 0.0);
        let (top, bottom) = panel.split_at_mut(P * ic);
        for r in (0..rows).step_by(2) {
            for (x0, np) in strips(w - w % 2) {
                pack_strip(top, x.add(r * w + x0), (ic, n), np);
                pack_strip(bottom, x.add((r + 1) * w + x0), (ic, n), np);
                for o0 in (0..oc).step_by(R) {
                    let wt = packed.as_ptr().add((o0 / MR) * ic * MR + o0 % MR);
                    let mut up = [[_mm256_setzero_ps(); 3]; R];
                    let mut down = [[_mm256_setzero_ps(); 3]; R];
                    // A branch, not a chosen fn pointer: the tiles must inline.
                    if np <= 2 * L {
                        tile4x16(&mut up, wt, top.as_ptr(), ic);
                        tile4x16(&mut down, wt, bottom.as_ptr(), ic);
                    } else {
                        tile4x24(&mut up, wt, top.as_ptr(), ic);
                        tile4x24(&mut down, wt, bottom.as_ptr(), ic);
                    }
                    for j in 0..R.min(oc - o0) {
                        let dst = out.add((o0 + j) * oh * ow + (yo + r / 2) * ow);
                        let b = bias[o0 + j];
                        // The strip's vectors only: a 16-pixel strip may sit before others.
                        // Two whole vectors at a time where they are (8 outputs, one store).
                        let mut v = 0;
                        while v < np.div_ceil(L) {
                            let xo = (x0 + v * L) / 2;
                            if xo >= ow {
                                break;
                            }
                            if (v + 2) * L <= np && xo + L <= ow {
                                let p =
                                    pool2x2x2(up[j][v], down[j][v], up[j][v + 1], down[j][v + 1]);
                                _mm256_storeu_ps(dst.add(xo), _mm256_add_ps(p, _mm256_set1_ps(b)));
                                v += 2;
                            } else {
                                let p = _mm_add_ps(pool2x2(up[j][v], down[j][v]), _mm_set1_ps(b));
                                store4(dst.add(xo), ow - xo, p);
                                v += 1;
                            }
                        }
                    }
                }
            }
        }
    })
}

/// From this row width on [`gemm_pool`] beats [`gemm`] plus a separate pool.
pub const POOL_MIN_WIDTH: usize = 32;

/// Up to this many input channels the direct input-layer kernel is used.
pub const DIRECT_MAX_INPUT_CHANNELS: usize = 4;
/// Output channels per tile of the direct kernel without a pool (8 accumulators) and with one
/// (6 channels x the two rows of the pool window: 12 accumulators).
const OB: usize = 8;
const OB_POOL: usize = 6;

thread_local! {
    static PAD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Frees this module's thread-local scratch on the calling thread.
pub(super) fn release_thread_scratch() {
    super::kernels::free_local(&PAD);
    super::kernels::free_local(&PANEL);
}

/// Direct 3x3 convolution (stride 1, pad 1) for few input channels (the RGB input layer): an
/// im2col reduction of only `9 * ic` is too short for a GEMM to run well, so each tile of
/// output channels x 8 pixels accumulates in registers over all taps. Output rows `y0..y1`
/// of the channels whose weights `wt` (`[m, ic * 9]`) and biases `b` hold, + activation
/// (+ 2x2 max pool), written from `out` (that layer's plane of the first of these channels).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `out` must address `b.len()` output planes of the layer
/// (`[h', w']` each) and no other thread may write rows `y0..y1` (pooled: `y0/2..y1/2`) of them.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn conv3x3(
    x: &[f32],
    (ic, h, w, y0, y1): (usize, usize, usize, usize, usize),
    wt: &[f32],
    b: &[f32],
    (act, pool): (Act, bool),
    out: *mut f32,
) {
    let (m, k) = (b.len(), ic * 9);
    assert!(x.len() >= ic * h * w && wt.len() >= m * k && y0 <= y1 && y1 <= h);
    assert!(!pool || (y0 % 2 == 0 && (y1 - y0) % 2 == 0));
    let nr = y1 - y0 + 2;
    // Padded rows y0-1 ..= y1: a zero column on the left, zeros on the right up to whole
    // vectors plus the right neighbour.
    let pw = w.div_ceil(L) * L + 2;
    PAD.with(|pad| {
        let mut pad = pad.borrow_mut();
        super::kernels::fill_padded(&mut pad, x, (ic, h, w), (y0, y1), pw);
        let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
        let ob = if pool { OB_POOL } else { OB };
        let mut wv = vec![[0f32; OB]; k];
        let (lo, hi) = act.bounds();
        let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        // Offset of each tap (channel, kernel row, kernel column) from the window's corner.
        let offs: Vec<usize> = (0..ic)
            .flat_map(|c| (0..3).flat_map(move |ky| (0..3).map(move |kx| (c * nr + ky) * pw + kx)))
            .collect();
        let geometry = Window::new(&offs, pw);
        for o in (0..m).step_by(ob) {
            let mo = ob.min(m - o);
            for (tap, v) in wv.iter_mut().enumerate() {
                for (j, x) in v.iter_mut().enumerate() {
                    *x = if j < mo { wt[(o + j) * k + tap] } else { 0.0 };
                }
            }
            if pool {
                for y in (y0..y1).step_by(2) {
                    for xs in (0..w - w % 2).step_by(L) {
                        let base = (y - y0) * pw + xs;
                        // A last block of at most 4 channels (16 = 6 + 6 + 4, 32 = 5 x 6 + 2)
                        // runs a 4-channel tile: no FMAs on the zero channels.
                        let acc = if mo <= 4 {
                            let mut acc = [[_mm256_setzero_ps(); 2]; OB_POOL];
                            acc[..4].copy_from_slice(&tile::<4, 2>(&pad, base, &geometry, &wv));
                            acc
                        } else {
                            tile::<OB_POOL, 2>(&pad, base, &geometry, &wv)
                        };
                        for (j, [top, bottom]) in acc.iter().enumerate().take(mo) {
                            let v = _mm_add_ps(pool2x2(*top, *bottom), _mm_set1_ps(b[o + j]));
                            let v = _mm_min_ps(
                                _mm_max_ps(v, _mm256_castps256_ps128(lo)),
                                _mm256_castps256_ps128(hi),
                            );
                            let dst = out.add((o + j) * oh * ow + (y / 2) * ow + xs / 2);
                            store4(dst, ow - xs / 2, v);
                        }
                    }
                }
            } else {
                for y in y0..y1 {
                    for xs in (0..w).step_by(L) {
                        let acc = tile::<OB, 1>(&pad, (y - y0) * pw + xs, &geometry, &wv);
                        for (j, [a]) in acc.iter().enumerate().take(mo) {
                            let v = _mm256_add_ps(*a, _mm256_set1_ps(b[o + j]));
                            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                            store_part(out.add((o + j) * oh * ow + y * ow + xs), w - xs, v);
                        }
                    }
                }
            }
        }
    })
}

/// The taps of a convolution window in the padded rows: each tap's offset from the window's
/// corner, the padded row stride, and how far past the corner the furthest read of a tile
/// reaches in one row (its tap + one vector), computed once here instead of per tile.
struct Window<'a> {
    offs: &'a [usize],
    pw: usize,
    reach: usize,
}

impl<'a> Window<'a> {
    fn new(offs: &'a [usize], pw: usize) -> Self {
        let reach = offs.iter().max().map_or(0, |&o| o + L);
        Self { offs, pw, reach }
    }
}

/// One tile of `C` channels x `ROWS` rows (one, or the two of a pool window) x 8 pixels:
/// `acc[j][r] = sum over taps t of w[t][j] * pad[base + offs[t] + r * pw ..][..8]`; each weight
/// broadcast feeds the `ROWS` accumulators of its channel. One flat loop over the taps (an
/// offset table, not nested channel / row / column loops): unrolled over the 3x3 window, LLVM
/// interleaved the taps and spilled half the accumulators.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tile<const C: usize, const ROWS: usize>(
    pad: &[f32],
    base: usize,
    &Window { offs, pw, reach }: &Window<'_>,
    wv: &[[f32; OB]],
) -> [[__m256; ROWS]; C] {
    // Every read below is within pad: the furthest tap's vector, `ROWS - 1` rows down.
    assert!(base + reach + (ROWS - 1) * pw <= pad.len() && wv.len() >= offs.len());
    let mut acc = [[_mm256_setzero_ps(); ROWS]; C];
    for (&off, wj) in offs.iter().zip(wv) {
        let mut s = [_mm256_setzero_ps(); ROWS];
        for (r, s) in s.iter_mut().enumerate() {
            // SAFETY: in bounds by the assert above.
            *s = unsafe { _mm256_loadu_ps(pad.as_ptr().add(base + off + r * pw)) };
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_set1_ps(wj[j]);
            for (a, &s) in a.iter_mut().zip(&s) {
                *a = _mm256_fmadd_ps(wv, s, *a);
            }
        }
    }
    acc
}

// Winograd F(2x2, 3x3)'s transforms, 8 tiles per vector, as the AVX-512 ones: the input's
// stride-2 tile columns are de-interleaved from two loads by an in-lane shuffle and a
// cross-lane permute, the outputs' column pairs are interleaved back by unpack + permute.

/// The even (`ODD = false`) or odd floats of `a` then `b`: `[a0, a2, a4, a6, b0, b2, b4, b6]`.
#[inline]
#[target_feature(enable = "avx2")]
fn deinterleave<const ODD: bool>(a: __m256, b: __m256) -> __m256 {
    // In each 128-bit half: [a0, a2, b0, b2 | a4, a6, b4, b6] (or the odd ones).
    let s = if ODD {
        _mm256_shuffle_ps::<0b11_01_11_01>(a, b)
    } else {
        _mm256_shuffle_ps::<0b10_00_10_00>(a, b)
    };
    // 64-bit pairs (0, 2, 1, 3): the a's, then the b's.
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(s)))
}

/// Winograd F(2x2, 3x3)'s input transform, as the portable `winograd::input_transform`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn winograd_input(
    x: &[f32],
    (ic, h, w): (usize, usize, usize),
    (ty0, ty1, tw): (usize, usize, usize),
    v: &mut [f32],
    rows: &mut Vec<f32>,
) {
    let n = (ty1 - ty0) * tw;
    assert!(x.len() >= ic * h * w && v.len() >= 16 * ic * n && 2 * tw <= w + 1);
    let groups = tw.div_ceil(L);
    // Padded rows: column -1 first, zeros after the row up to the last group's loads
    // (columns 2 * t0 ..= 2 * t0 + 17 of its first tile t0).
    let pw = (2 * L * groups + 2).max(w + 1);
    rows.clear();
    rows.resize(4 * pw, 0.0);
    let vp = v.as_mut_ptr();
    for i in 0..ic {
        let plane = &x[i * h * w..(i + 1) * h * w];
        for ty in ty0..ty1 {
            tile_rows(rows, plane, (h, w), ty, pw);
            let base = (ty - ty0) * tw;
            for g in 0..groups {
                let t0 = L * g;
                let valid = tw - t0;
                // d[r][c][t] = padded row r, column 2 t + c.
                let mut d = [[_mm256_setzero_ps(); 4]; 4];
                for (r, dr) in d.iter_mut().enumerate() {
                    let at = r * pw + 2 * t0;
                    assert!(at + 2 + 2 * L <= rows.len());
                    let p = rows.as_ptr().add(at);
                    let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(L)));
                    let (a2, b2) = (_mm256_loadu_ps(p.add(2)), _mm256_loadu_ps(p.add(L + 2)));
                    dr[0] = deinterleave::<false>(a, b);
                    dr[1] = deinterleave::<true>(a, b);
                    dr[2] = deinterleave::<false>(a2, b2);
                    dr[3] = deinterleave::<true>(a2, b2);
                }
                let add = |a, b| _mm256_add_ps(a, b);
                let sub = |a, b| _mm256_sub_ps(a, b);
                for (ri, out) in input_tile(&d, add, sub).into_iter().enumerate() {
                    for (cj, o) in out.into_iter().enumerate() {
                        let at = ((ri * 4 + cj) * ic + i) * n + base + t0;
                        store_part(vp.add(at), valid, o);
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
/// The CPU must have AVX2 and FMA; `out` must address `b.len()` output planes whose rows of
/// tile rows `ty0..ty1` no other thread writes.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn winograd_output(
    m: &[f32],
    (mo, n, ty0, ty1, h, w): (usize, usize, usize, usize, usize, usize),
    b: &[f32],
    (act, pool): (Act, bool),
    out: *mut f32,
) {
    let tw = n / (ty1 - ty0);
    assert!(m.len() >= 16 * mo * n && b.len() >= mo);
    assert!(!pool || tw == w / 2, "pooled rows are one output per tile");
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    let (lo, hi) = act.bounds();
    let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let mp = m.as_ptr();
    for (o, &bias) in b.iter().enumerate().take(mo) {
        let bias = _mm256_set1_ps(bias);
        let dst = out.add(o * oh * ow);
        for ty in ty0..ty1 {
            let row = (ty - ty0) * tw;
            for t0 in (0..tw).step_by(L) {
                let valid = tw - t0;
                let mask = range_mask(t0 as isize, tw);
                let mut mm = [_mm256_setzero_ps(); 16];
                for (xi, v) in mm.iter_mut().enumerate() {
                    *v = _mm256_maskload_ps(mp.add((xi * mo + o) * n + row + t0), mask);
                }
                let add = |a, b| _mm256_add_ps(a, b);
                let sub = |a, b| _mm256_sub_ps(a, b);
                let [[y00, y01], [y10, y11]] = output_tile(&mm, add, sub);
                let finish =
                    |v: __m256| _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, bias), lo), hi);
                if pool {
                    let v = _mm256_max_ps(_mm256_max_ps(y00, y01), _mm256_max_ps(y10, y11));
                    store_part(dst.add(ty * ow + t0), valid, finish(v));
                } else {
                    for (dy, (a, c)) in [(y00, y01), (y10, y11)].into_iter().enumerate() {
                        let yy = 2 * ty + dy;
                        if yy >= h {
                            continue;
                        }
                        let (a, c) = (finish(a), finish(c));
                        // [a0 c0 a1 c1 | a4 c4 a5 c5] and [a2 c2 a3 c3 | a6 c6 a7 c7].
                        let (lo4, hi4) = (_mm256_unpacklo_ps(a, c), _mm256_unpackhi_ps(a, c));
                        let x0 = 2 * t0;
                        let p = dst.add(yy * w + x0);
                        store_part(p, w - x0, _mm256_permute2f128_ps::<0x20>(lo4, hi4));
                        if w > x0 + L {
                            let rest = _mm256_permute2f128_ps::<0x31>(lo4, hi4);
                            store_part(p.add(L), w - x0 - L, rest);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{strips, L, P};

    /// Strips cover `0..n` in order without gaps, none wider than the 24-pixel tile, and only
    /// the last run may be narrower than 16 (a strip of at most 8 only where n itself is).
    #[test]
    fn strips_tile_every_run() {
        for n in 0..200 {
            let s: Vec<_> = strips(n).collect();
            let mut next = 0;
            for (i, &(x0, np)) in s.iter().enumerate() {
                assert_eq!(x0, next, "n = {n}: {s:?}");
                assert!(np > 0 && np <= P, "n = {n}: {s:?}");
                if i + 1 < s.len() {
                    assert!(np >= 2 * L, "n = {n}: {s:?}");
                }
                next += np;
            }
            assert_eq!(next, n, "n = {n}: {s:?}");
            assert!(n <= L || s.iter().all(|&(_, np)| np > L), "n = {n}: {s:?}");
        }
        assert_eq!(strips(32).collect::<Vec<_>>(), [(0, 16), (16, 16)]);
        assert_eq!(
            strips(128).map(|s| s.1).collect::<Vec<_>>(),
            [24, 24, 24, 24, 16, 16]
        );
    }
}
