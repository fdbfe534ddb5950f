//! The pointwise-style GEMM both the separable blocks and Winograd's 16 products run with
//! AVX-512: `c = w . x` with the weights packed at load time into tiles of 8 output channels,
//! so a tile's column of weights is 8 consecutive floats, and `x` (`[k, n]`, row-major, e.g.
//! NCHW activations) read in strips of 32 columns that stay in L1 while every tile passes
//! over them. On these shapes (k and the channel count at most a few hundred, n a band of
//! pixels or tiles) it runs near the sgemm peak, where a general GEMM's own packing of both
//! operands per call costs a third of the time.

/// Output channels per register tile.
pub const MR: usize = 8;

/// `w` (`[oc, ic]`) as `[oc / MR, ic, MR]`, the last tile padded with zero rows.
pub fn pack(w: &[f32], oc: usize, ic: usize) -> Vec<f32> {
    assert_eq!(w.len(), oc * ic, "weights are not {oc}x{ic}");
    let tiles = oc.div_ceil(MR);
    let mut packed = vec![0f32; tiles * MR * ic];
    for o in 0..oc {
        let (t, j) = (o / MR, o % MR);
        for i in 0..ic {
            packed[(t * ic + i) * MR + j] = w[o * ic + i];
        }
    }
    packed
}

/// Floats of one packed `[oc, ic]` matrix.
#[cfg(x86_simd)]
pub fn packed_len(oc: usize, ic: usize) -> usize {
    oc.div_ceil(MR) * MR * ic
}

#[cfg(x86_simd)]
pub mod avx512 {
    use std::arch::x86_64::*;

    use super::MR;

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

    /// `c[o, p] = bias[o] + sum_i w[o, i] * x[i, p]` for `o < oc`, `p < n`: `packed` is
    /// `[oc / MR, ic, MR]` (see [`super::pack`]), `bias` (none: zero) padded to whole tiles,
    /// `x` is `[ic, n]`, `c` has row stride `ldc`. Tiles of 8 channels x 32 pixels accumulate in 16 registers over all of `ic`; a
    /// strip of `x` (`ic x 32`) stays in L1 while every channel tile passes over it.
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
        let tiles = oc.div_ceil(MR);
        assert!(packed.len() >= tiles * MR * ic);
        assert!(bias.is_none_or(|b| b.len() >= tiles * MR));
        for p0 in (0..n).step_by(32) {
            let (m0, m1) = (lanes(n - p0), lanes((n - p0).saturating_sub(16)));
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
                let x0 = x.wrapping_add(p0);
                accumulate(&mut acc, w, ic, (x0, x0.wrapping_add(16)), (m0, m1), n);
                for (j, a) in acc.iter().enumerate() {
                    if j < rows {
                        let dst = c.add((t * MR + j) * ldc + p0);
                        _mm512_mask_storeu_ps(dst, m0, a[0]);
                        _mm512_mask_storeu_ps(dst.wrapping_add(16), m1, a[1]);
                    }
                }
            }
        }
    }
}
