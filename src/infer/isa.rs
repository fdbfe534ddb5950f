//! The f32 engine's kernel sets, one per instruction set, and the one dispatch that picks them.
//!
//! Each set ([`AVX512`], [`AVX2`]) is a table of the same kernels with the same contracts (data
//! layouts, packed weights, bands), taken from its module (`infer::avx512`, `infer::avx2`).
//! A layer runs with a level ([`crate::simd::level`], detected once; the tests force each one
//! in turn) and [`set`] turns it into a table; `None` means the portable kernels, the only ones
//! a build without x86 intrinsics has. Layers call through the table, so no layer names an
//! instruction set: adding one (an aarch64 NEON set, say) is a module and a table here.
//!
//! MobileNetV2's channels-last kernels: the AVX-512 set has its own 1x1 GEMM (a 14 x 32 tile,
//! `avx512::nhwc`) and reuses the AVX2 depthwise row and the stem's gathering GEMM, which ran
//! as fast or faster there (`examples/nhwc_tiles.rs` compares the two sets).

use super::avx2;
use super::avx512;
use super::kernels::Act;
use super::nhwc::{Depthwise, Gemm1x1};

/// One instruction set's kernels. Every entry is `unsafe`: the CPU must have the set's
/// instructions (the caller of [`set`] vouches for its level), on top of each kernel's own
/// `# Safety` contract in its module.
// The entries' types are the kernels' signatures, spelled out so each reads as its contract.
#[allow(clippy::type_complexity)]
pub(super) struct Kernels {
    /// The packed GEMM (`avx512::gemm`, `avx2::gemm`): pointwise layers, Winograd's products.
    pub gemm: unsafe fn(&[f32], Option<&[f32]>, (usize, usize), *const f32, usize, *mut f32, usize),
    /// The packed GEMM followed by a 2x2 max pool and the bias, for rows at least
    /// [`Self::pool_min_width`] wide.
    pub gemm_pool: unsafe fn(
        &[f32],
        &[f32],
        (usize, usize),
        *const f32,
        (usize, usize),
        *mut f32,
        (usize, usize, usize),
    ),
    /// From this row width on `gemm_pool` beats `gemm` plus a separate pool.
    pub pool_min_width: usize,
    /// The separable blocks' depthwise 3x3 with bias and ReLU6, over a band of rows.
    pub depthwise:
        unsafe fn(&[f32], (usize, usize, usize), (usize, usize), &[[f32; 9]], &[f32], &mut [f32]),
    /// The direct 3x3 convolution of an input layer (bias, activation, pool in registers).
    pub conv3x3: unsafe fn(
        &[f32],
        (usize, usize, usize, usize, usize),
        &[f32],
        &[f32],
        (Act, bool),
        *mut f32,
    ),
    /// Up to this many input channels `conv3x3` is used.
    pub direct_max_input_channels: usize,
    /// Winograd F(2x2, 3x3)'s input transform over a band of tile rows.
    pub winograd_input:
        unsafe fn(&[f32], (usize, usize, usize), (usize, usize, usize), &mut [f32], &mut Vec<f32>),
    /// Winograd's output transform with bias, activation and optional pool.
    pub winograd_output: unsafe fn(
        &[f32],
        (usize, usize, usize, usize, usize, usize),
        &[f32],
        (Act, bool),
        *mut f32,
    ),
    /// Channels-last 1x1 convolution over pixel rows, panels `p0..p1`.
    pub nhwc_gemm: unsafe fn(
        &Gemm1x1,
        &[f32],
        usize,
        usize,
        *mut f32,
        usize,
        Option<&[f32]>,
        Act,
        (usize, usize),
    ),
    /// As `nhwc_gemm` with each pixel's inputs gathered from an image (strided taps).
    pub nhwc_gemm_gather: unsafe fn(&Gemm1x1, *const f32, usize, &[usize], usize, *mut f32, Act),
    /// One output row of the channels-last depthwise 3x3 (stride 1 or 2).
    pub nhwc_depthwise_row:
        unsafe fn(&Depthwise, [Option<&[f32]>; 3], usize, usize, *mut f32, usize, (usize, usize)),
}

/// AVX-512 F/BW/VL/DQ (with AVX2 + FMA for two channels-last kernels).
pub(super) static AVX512: Kernels = Kernels {
    gemm: avx512::gemm,
    gemm_pool: avx512::gemm_pool,
    pool_min_width: 0,
    depthwise: avx512::depthwise,
    conv3x3: avx512::conv3x3,
    direct_max_input_channels: avx512::DIRECT_MAX_INPUT_CHANNELS,
    winograd_input: avx512::winograd_input,
    winograd_output: avx512::winograd_output,
    nhwc_gemm: avx512::nhwc::gemm,
    nhwc_gemm_gather: avx2::nhwc::gemm_gather,
    nhwc_depthwise_row: avx2::nhwc::depthwise_row,
};

/// AVX2 + FMA.
pub(super) static AVX2: Kernels = Kernels {
    gemm: avx2::gemm,
    gemm_pool: avx2::gemm_pool,
    pool_min_width: avx2::POOL_MIN_WIDTH,
    depthwise: avx2::depthwise,
    conv3x3: avx2::conv3x3,
    direct_max_input_channels: avx2::DIRECT_MAX_INPUT_CHANNELS,
    winograd_input: avx2::winograd_input,
    winograd_output: avx2::winograd_output,
    nhwc_gemm: avx2::nhwc::gemm,
    nhwc_gemm_gather: avx2::nhwc::gemm_gather,
    nhwc_depthwise_row: avx2::nhwc::depthwise_row,
};

/// The kernel set of `level` ([`crate::simd::level`]'s numbering), `None` for the portable
/// kernels. The caller vouches that the CPU has the level's instructions: pass
/// [`crate::simd::level`] or a level the tests forced after checking it.
pub(super) fn set(level: u8) -> Option<&'static Kernels> {
    match level {
        crate::simd::AVX512 => Some(&AVX512),
        crate::simd::AVX2 => Some(&AVX2),
        _ => None,
    }
}

/// The set this CPU runs with ([`crate::simd::level`]).
pub(super) fn detected() -> Option<&'static Kernels> {
    set(crate::simd::level())
}
