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

/// Checks that `packed` holds `[oc, ic]` packed weights ([`pack`]) and `bias` (if any) covers
/// whole tiles, as the GEMM kernels' raw reads rely on; returns the number of tiles.
#[cfg(x86_simd)]
pub fn check(packed: &[f32], bias: Option<&[f32]>, (oc, ic): (usize, usize)) -> usize {
    let tiles = oc.div_ceil(MR);
    assert!(
        packed.len() >= tiles * MR * ic,
        "packed weights are not {oc}x{ic}"
    );
    assert!(
        bias.is_none_or(|b| b.len() >= tiles * MR),
        "bias is not {oc} long"
    );
    tiles
}
