//! Integer GEMM for the int8 execution path (issue 14): unsigned 8-bit activations times signed
//! 8-bit weights, accumulated exactly in i32.
//!
//! `C[m][n] = sum_k A[m][k] * B[k][n]` with `A` u8 (activations with a zero point) and `B` i8
//! (weights, symmetric per output channel); the caller's epilogue subtracts
//! `zero_point * column_sum(B)` ([`PackedI8::column_sums`]) and requantizes.
//!
//! One kernel per instruction set, chosen once ([`Int8Isa::detect`]) and forceable in tests:
//! - **AVX-512 VNNI**: `vpdpbusd` multiplies four u8 by four i8 and adds the four products to an
//!   i32 lane in one instruction, exactly (no intermediate 16-bit sum).
//! - **AVX2**: not `vpmaddubsw`, whose u8 x i8 pair sums saturate at 16 bits (255 * 127 * 2 =
//!   64,770 > 32,767: the trap that makes naive int8 GEMMs wrong on large activations). Both
//!   operands are widened to i16 instead (weights once, at packing) and multiplied with
//!   `vpmaddwd`, whose i16 x i16 pair sums land in i32 lanes exactly.
//! - **portable**: the same arithmetic in plain Rust (i32), the reference the others are tested
//!   against on odd shapes.

/// Columns per packed panel: one 512-bit register of i32 sums.
pub(crate) const PANEL: usize = 16;

/// The int8 kernel set the CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Int8Isa {
    Portable,
    Avx2,
    Avx512Vnni,
}

impl Int8Isa {
    /// The best set this CPU has, capped by `SLIMSERVE_SIMD` like the f32 kernels
    /// (`avx512` allows VNNI, `avx2` the AVX2 set, `portable` neither).
    pub fn detect() -> Self {
        let level = crate::simd::level();
        if level >= 2 && Self::Avx512Vnni.supported() {
            Int8Isa::Avx512Vnni
        } else if level >= 1 && Self::Avx2.supported() {
            Int8Isa::Avx2
        } else {
            Int8Isa::Portable
        }
    }

    /// Whether this CPU can run the set (whatever `SLIMSERVE_SIMD` says).
    pub fn supported(self) -> bool {
        match self {
            Int8Isa::Portable => true,
            #[cfg(x86_simd)]
            Int8Isa::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(x86_simd)]
            Int8Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(x86_simd))]
            _ => false,
        }
    }

    /// Every set this CPU runs (for tests, which force each in turn), printing which ones
    /// `what` is tested with and which it cannot be here (CPU or build): reported, never a
    /// silent skip.
    #[cfg(test)]
    pub(crate) fn testable(what: &str) -> Vec<Int8Isa> {
        let all = [Int8Isa::Portable, Int8Isa::Avx2, Int8Isa::Avx512Vnni];
        let (ran, missing): (Vec<Int8Isa>, Vec<Int8Isa>) = all.iter().partition(|i| i.supported());
        eprintln!(
            "{what}: int8 kernel sets tested: {:?}; not available here (CPU or build): {:?}",
            ran.iter().map(|i| i.name()).collect::<Vec<_>>(),
            missing.iter().map(|i| i.name()).collect::<Vec<_>>()
        );
        ran
    }

    pub fn name(self) -> &'static str {
        match self {
            Int8Isa::Portable => "portable",
            Int8Isa::Avx2 => "avx2",
            Int8Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Weights `B` (`k` x `n`, i8) packed for one kernel set: panels of [`PANEL`] columns, in each
/// panel groups of four rows of `k` (zero-padded), the four values of a column side by side.
/// The AVX2 set keeps them widened to i16.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    k: usize,
    n: usize,
    isa: Int8Isa,
    /// `[n_panels][k4][PANEL][4]` i8 (portable and VNNI).
    bytes: Vec<i8>,
    /// The same layout widened (AVX2).
    #[cfg_attr(not(x86_simd), allow(dead_code))]
    words: Vec<i16>,
    column_sums: Vec<i32>,
}

impl PackedI8 {
    /// Packs `b`, row-major `k` x `n`, for `isa`.
    pub fn new(b: &[i8], k: usize, n: usize, isa: Int8Isa) -> Self {
        assert_eq!(b.len(), k * n, "weights are {k} x {n}");
        let k4 = k.div_ceil(4);
        let panels = n.div_ceil(PANEL);
        let mut bytes = vec![0i8; panels * k4 * PANEL * 4];
        for p in 0..panels {
            for kk in 0..k {
                for c in 0..PANEL {
                    let col = p * PANEL + c;
                    if col < n {
                        bytes[((p * k4 + kk / 4) * PANEL + c) * 4 + kk % 4] = b[kk * n + col];
                    }
                }
            }
        }
        let column_sums = (0..n)
            .map(|col| (0..k).map(|kk| b[kk * n + col] as i32).sum())
            .collect();
        let words = if isa == Int8Isa::Avx2 {
            bytes.iter().map(|&v| v as i16).collect()
        } else {
            Vec::new()
        };
        let bytes = if isa == Int8Isa::Avx2 {
            Vec::new()
        } else {
            bytes
        };
        PackedI8 {
            k,
            n,
            isa,
            bytes,
            words,
            column_sums,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn isa(&self) -> Int8Isa {
        self.isa
    }

    /// `sum_k B[k][n]` per column, for the zero-point correction.
    pub fn column_sums(&self) -> &[i32] {
        &self.column_sums
    }

    /// The row stride `A` must have: `k` rounded up to a multiple of four (the bytes past `k`
    /// in each row are read, and multiplied by zero).
    pub fn a_stride(&self) -> usize {
        self.k.div_ceil(4) * 4
    }
}

/// `c[m][n] = sum_k a[m][k] * b[k][n]` for `m` rows of `a` (row stride
/// [`PackedI8::a_stride`]) into `c` (row stride `b.n()`).
///
/// Panics if a slice is shorter than the shapes need, or if `b` was packed for a set this CPU
/// cannot run.
pub fn gemm_u8i8(a: &[u8], m: usize, b: &PackedI8, c: &mut [i32]) {
    let lda = b.a_stride();
    assert!(a.len() >= m * lda, "A: {} bytes for {m} x {lda}", a.len());
    assert!(c.len() >= m * b.n, "C: {} for {m} x {}", c.len(), b.n);
    assert!(
        b.isa.supported(),
        "{} kernels on a CPU without them",
        b.isa.name()
    );
    match b.isa {
        Int8Isa::Portable => portable(a, m, b, c),
        #[cfg(x86_simd)]
        // SAFETY: the CPU has AVX2 (asserted above); the lengths are checked above.
        Int8Isa::Avx2 => unsafe { x86::avx2(a, m, b, c) },
        #[cfg(x86_simd)]
        // SAFETY: the CPU has AVX-512 BW + VNNI (asserted above); lengths checked above.
        Int8Isa::Avx512Vnni => unsafe { x86::vnni(a, m, b, c) },
        #[cfg(not(x86_simd))]
        _ => unreachable!("only the portable set is supported here"),
    }
}

/// The requantization of a layer's integer sums, per output column `o`:
/// `real = (acc - corr[o]) * mult[o] + bias[o]`, clamped to `bounds` (the activation), then
/// `q = real * inv + zph` truncated to `0..=255` (`zph` holds the zero point plus one half, so
/// truncation rounds). The same arithmetic, in the same order, as the layers' epilogue.
#[derive(Clone, Copy)]
#[cfg_attr(not(x86_simd), allow(dead_code))]
pub(crate) struct Requant<'a> {
    pub corr: &'a [i32],
    pub mult: &'a [f32],
    pub bias: &'a [f32],
    pub bounds: (f32, f32),
    pub inv: f32,
    pub zph: f32,
}

/// Where a fused layer's output pixel reads its activation bytes: `runs` runs of `len` bytes
/// (a multiple of four), `stride` bytes apart, from the pixel's offset.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(x86_simd), allow(dead_code))]
pub(crate) struct Window {
    pub runs: usize,
    pub len: usize,
    pub stride: usize,
}

#[cfg_attr(not(x86_simd), allow(dead_code))]
impl Window {
    /// One run of `len` bytes (a GEMM row, a 1x1 layer's pixel).
    pub fn run(len: usize) -> Self {
        Window {
            runs: 1,
            len,
            stride: 0,
        }
    }
}

/// The layout of a fused layer's input: output pixel `(y, x)` reads `win` from byte
/// `y * row + x * px`.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(x86_simd), allow(dead_code))]
struct Geometry {
    row: usize,
    px: usize,
    win: Window,
}

impl Geometry {
    /// The bytes the input must hold for `rows` x `w` output pixels (before a pool).
    #[cfg_attr(not(x86_simd), allow(dead_code))]
    fn needs(&self, (rows, w): (usize, usize)) -> usize {
        if rows == 0 || w == 0 {
            return 0;
        }
        (rows - 1) * self.row
            + (w - 1) * self.px
            + (self.win.runs - 1) * self.win.stride
            + self.win.len
    }
}

/// Whether the fused kernels run for `b` here (only AVX-512 VNNI has them).
pub(crate) fn fused_available(b: &PackedI8) -> bool {
    b.isa == Int8Isa::Avx512Vnni && b.isa.supported()
}

/// Checks a fused layer's shapes and runs it.
fn fused(
    x: &[u8],
    (rows, w): (usize, usize),
    geo: Geometry,
    b: &PackedI8,
    rq: &Requant<'_>,
    pool: bool,
    out: &mut [u8],
) {
    let n = b.n;
    assert!(fused_available(b), "no fused kernel for {}", b.isa.name());
    assert_eq!(
        geo.win.runs * geo.win.len,
        b.a_stride(),
        "window of {geo:?} for k = {}",
        b.k
    );
    assert!(
        geo.win.len.is_multiple_of(4),
        "window runs of {} bytes",
        geo.win.len
    );
    assert!(
        x.len() >= geo.needs((rows, w)),
        "input of {} bytes for {rows}x{w} pixels of {geo:?}",
        x.len()
    );
    let pixels = if pool { (rows / 2) * (w / 2) } else { rows * w };
    assert_eq!(out.len(), pixels * n, "output is not {pixels} x {n}");
    assert!(rq.corr.len() == n && rq.mult.len() == n && rq.bias.len() == n);
    assert!(rq.mult.iter().all(|&m| m > 0.0), "a non-positive scale");
    #[cfg(x86_simd)]
    // SAFETY: the CPU has AVX-512 BW + VNNI (asserted above); shapes checked above.
    unsafe {
        x86::fused_vnni(x, (rows, w), geo, b, rq, pool, out)
    };
}

/// A 1x1 convolution over `rows` x `w` NHWC pixels of `b.k()` channels with the
/// requantization, and the 2x2 max pool where `pool`, fused into the GEMM's register tiles
/// (the sums never leave the registers). The pool is taken on the integer sums before
/// requantizing, which picks the same value: every step of the requantization is monotone
/// non-decreasing (`mult > 0`). An odd last row or column is dropped, as the pool does.
///
/// Returns `false`, doing nothing, where there is no fused kernel (only AVX-512 VNNI has
/// one, and only for `k` a multiple of four): the caller runs the GEMM and its epilogue.
pub(crate) fn pointwise_fused(
    x: &[u8],
    (rows, w): (usize, usize),
    b: &PackedI8,
    rq: &Requant<'_>,
    pool: bool,
    out: &mut [u8],
) -> bool {
    if !fused_available(b) || !b.k.is_multiple_of(4) {
        return false;
    }
    let k = b.k;
    assert_eq!(x.len(), rows * w * k, "input is not {rows}x{w}x{k}");
    let geo = Geometry {
        row: w * k,
        px: k,
        win: Window::run(k),
    };
    fused(x, (rows, w), geo, b, rq, pool, out);
    true
}

/// A 3x3 "same" convolution, stride 1, of `ic` channels (a multiple of four) computed directly
/// from the padded NHWC input (no im2col), with the requantization and the 2x2 pool fused as in
/// [`pointwise_fused`]. `xp` holds `rows + 2` rows of `w + 2` pixels: the band's input rows
/// with one row above and below and one pixel left and right (the padding holds the input's
/// zero point). `b` is `[k][oc]` with `k` ordered (ky, kx, ic): each of a window's three rows
/// is one contiguous run of `3 * ic` bytes.
///
/// Returns `false`, doing nothing, where there is no fused kernel.
pub(crate) fn conv3x3_fused(
    xp: &[u8],
    (rows, w): (usize, usize),
    ic: usize,
    b: &PackedI8,
    rq: &Requant<'_>,
    pool: bool,
    out: &mut [u8],
) -> bool {
    if !fused_available(b) || !ic.is_multiple_of(4) || b.k != 9 * ic {
        return false;
    }
    let pitch = (w + 2) * ic;
    assert_eq!(
        xp.len(),
        (rows + 2) * pitch,
        "padded input is not {}x{}x{ic}",
        rows + 2,
        w + 2
    );
    let geo = Geometry {
        row: pitch,
        px: ic,
        win: Window {
            runs: 3,
            len: 3 * ic,
            stride: pitch,
        },
    };
    fused(xp, (rows, w), geo, b, rq, pool, out);
    true
}

fn portable(a: &[u8], m: usize, b: &PackedI8, c: &mut [i32]) {
    let (lda, k4, n) = (b.a_stride(), b.k.div_ceil(4), b.n);
    for row in 0..m {
        let a = &a[row * lda..row * lda + lda];
        for (p, panel) in b.bytes.chunks_exact(k4 * PANEL * 4).enumerate() {
            let mut acc = [0i32; PANEL];
            for (q, group) in panel.chunks_exact(PANEL * 4).enumerate() {
                let a4 = &a[q * 4..q * 4 + 4];
                for (col, w) in group.chunks_exact(4).enumerate() {
                    acc[col] += (0..4).map(|i| a4[i] as i32 * w[i] as i32).sum::<i32>();
                }
            }
            let cols = PANEL.min(n - p * PANEL);
            c[row * n + p * PANEL..][..cols].copy_from_slice(&acc[..cols]);
        }
    }
}

#[cfg(x86_simd)]
pub(crate) mod x86 {
    use super::{Geometry, PackedI8, Requant, Window, PANEL};
    use std::arch::x86_64::*;

    /// Rows computed together: each loaded weight vector is used this many times.
    const ROWS: usize = 4;

    /// Writes the first `cols` sums of a panel (all 16 unless it is the last one).
    ///
    /// # Safety
    /// `dst` is valid for `cols` writes.
    #[inline(always)]
    unsafe fn store(dst: *mut i32, sums: &[i32; PANEL], cols: usize) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(sums.as_ptr(), dst, cols) }
    }

    /// The sums of one tile: `R` rows of `a` (starting at byte offsets `at`) by `P` panels from
    /// panel `p` (16 columns each). A row's `k` bytes are `win`'s runs (one run of
    /// `b.a_stride()` bytes for a GEMM or a 1x1 layer; three runs of a 3x3 window's rows for a
    /// direct 3x3 convolution). The `R * P` accumulators stay in registers for the whole `k`
    /// loop; each weight vector loaded serves `R` rows and each broadcast activation word `P`
    /// panels.
    ///
    /// # Safety
    /// AVX-512 F + BW + VNNI; `win.runs * win.len == b.a_stride()`; every run of every row lies
    /// inside `a` (`at[r] + (win.runs - 1) * win.stride + win.len <= a.len()`); panels
    /// `p..p + P` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile_sums<const R: usize, const P: usize>(
        a: &[u8],
        at: [usize; R],
        win: Window,
        b: &PackedI8,
        p: usize,
    ) -> [[__m512i; P]; R] {
        let k4 = b.k.div_ceil(4);
        let panel_len = k4 * PANEL * 4;
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        let w0 = b.bytes.as_ptr().add(p * panel_len);
        let groups = win.len / 4;
        for run in 0..win.runs {
            let a0 = a.as_ptr().add(run * win.stride);
            let w0 = w0.add(run * groups * PANEL * 4);
            for g in 0..groups {
                let mut wv = [_mm512_setzero_si512(); P];
                for (j, wv) in wv.iter_mut().enumerate() {
                    // SAFETY: panel p + j exists and run * groups + g < k4: 64 bytes inside
                    // `b.bytes`.
                    *wv = _mm512_loadu_si512(w0.add(j * panel_len + g * PANEL * 4) as *const _);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: inside the run, inside `a` (the caller's contract).
                    let a4 = (a0.add(at[r] + g * 4) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(a4);
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_dpbusd_epi32(*acc, av, *wv);
                    }
                }
            }
        }
        acc
    }

    /// The lanes of the first `cols` (at most 16) columns of a panel.
    #[inline(always)]
    fn lanes(cols: usize) -> __mmask16 {
        if cols == PANEL {
            !0
        } else {
            (1 << cols) - 1
        }
    }

    /// One tile of `R` rows by `P` panels ([`tile_sums`]) stored as i32 sums; columns past
    /// `n` in the last panel are not stored.
    ///
    /// # Safety
    /// AVX-512 F + BW + VNNI; rows `row..row + R` of `a` (stride `lda`) and of `c` (stride `n`)
    /// and panels `p..p + P` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn vnni_tile<const R: usize, const P: usize>(
        a: &[u8],
        b: &PackedI8,
        c: &mut [i32],
        row: usize,
        p: usize,
    ) {
        let (lda, n) = (b.a_stride(), b.n);
        let at = std::array::from_fn(|r| (row + r) * lda);
        let acc = tile_sums::<R, P>(a, at, Window::run(lda), b, p);
        for (r, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                let col = (p + j) * PANEL;
                let cols = PANEL.min(n - col);
                // SAFETY: (row + r) * n + col + cols <= m * n <= c.len(); the masked-off
                // lanes are neither written nor faulted on.
                _mm512_mask_storeu_epi32(
                    c.as_mut_ptr().add((row + r) * n + col) as *mut _,
                    lanes(cols),
                    *acc,
                );
            }
        }
    }

    /// The panels of rows `row..row + R`, two at a time.
    ///
    /// # Safety
    /// As [`vnni_tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn vnni_rows<const R: usize>(a: &[u8], b: &PackedI8, c: &mut [i32], row: usize) {
        let panels = b.n.div_ceil(PANEL);
        let mut p = 0;
        while p + 2 <= panels {
            vnni_tile::<R, 2>(a, b, c, row, p);
            p += 2;
        }
        if p < panels {
            vnni_tile::<R, 1>(a, b, c, row, p);
        }
    }

    /// # Safety
    /// AVX-512 F + BW + VNNI; `a`, `c` as [`super::gemm_u8i8`] checked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni(a: &[u8], m: usize, b: &PackedI8, c: &mut [i32]) {
        // Tiles of 4 rows x 32 columns (8 accumulators), then the last 1-3 rows.
        let mut row = 0;
        while row + ROWS <= m {
            vnni_rows::<ROWS>(a, b, c, row);
            row += ROWS;
        }
        match m - row {
            3 => vnni_rows::<3>(a, b, c, row),
            2 => vnni_rows::<2>(a, b, c, row),
            1 => vnni_rows::<1>(a, b, c, row),
            _ => {}
        }
    }

    /// 16 sums requantized ([`super::Requant`]) to 16 bytes at `dst`, the first `cols` kept.
    ///
    /// # Safety
    /// AVX-512 F + BW + VL; `col + cols <= n` for `rq`'s slices, `dst` valid for `cols`
    /// writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    pub(crate) unsafe fn requant16(
        acc: __m512i,
        rq: &Requant<'_>,
        col: usize,
        cols: usize,
        dst: *mut u8,
    ) {
        let m = lanes(cols);
        // SAFETY (the loads): col + cols <= n, the masked-off lanes are not read.
        let corr = _mm512_maskz_loadu_epi32(m, rq.corr.as_ptr().add(col) as *const _);
        let mult = _mm512_maskz_loadu_ps(m, rq.mult.as_ptr().add(col));
        let bias = _mm512_maskz_loadu_ps(m, rq.bias.as_ptr().add(col));
        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr));
        let v = _mm512_add_ps(_mm512_mul_ps(v, mult), bias);
        let v = _mm512_min_ps(
            _mm512_max_ps(v, _mm512_set1_ps(rq.bounds.0)),
            _mm512_set1_ps(rq.bounds.1),
        );
        let q = _mm512_add_ps(
            _mm512_mul_ps(v, _mm512_set1_ps(rq.inv)),
            _mm512_set1_ps(rq.zph),
        );
        let q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(255.0));
        let bytes = _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(q));
        // SAFETY: the caller's contract; masked-off bytes are not written.
        _mm_mask_storeu_epi8(dst as *mut _, m, bytes);
    }

    /// `R` pixels (at byte offsets `at` in `x`, each reading `win`) by `P` panels; with `POOL`
    /// each four pixels are a 2x2 window, maxed into one output pixel.
    ///
    /// # Safety
    /// AVX-512 F + BW + VL + VNNI; as [`tile_sums`] for `at` and `win`; panels `p..p + P`
    /// exist; the output pixel(s) from `o` (in pixels) lie inside `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn fused_tile<const R: usize, const P: usize, const POOL: bool>(
        x: &[u8],
        at: [usize; R],
        win: Window,
        b: &PackedI8,
        rq: &Requant<'_>,
        p: usize,
        out: &mut [u8],
        o: usize,
    ) {
        let n = b.n;
        let acc = tile_sums::<R, P>(x, at, win, b, p);
        for j in 0..P {
            let col = (p + j) * PANEL;
            let cols = PANEL.min(n - col);
            if POOL {
                // Each four pixels are a 2x2 window: one output pixel.
                for (g, win4) in acc.chunks_exact(4).enumerate() {
                    let mut m = win4[0][j];
                    for acc in &win4[1..] {
                        m = _mm512_max_epi32(m, acc[j]);
                    }
                    // SAFETY: output pixels o..o + R / 4 exist.
                    requant16(m, rq, col, cols, out.as_mut_ptr().add((o + g) * n + col));
                }
            } else {
                for (r, acc) in acc.iter().enumerate() {
                    // SAFETY: output pixels o..o + R exist.
                    requant16(
                        acc[j],
                        rq,
                        col,
                        cols,
                        out.as_mut_ptr().add((o + r) * n + col),
                    );
                }
            }
        }
    }

    /// Every panel of one tile, two at a time.
    ///
    /// # Safety
    /// As [`fused_tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn fused_panels<const R: usize, const POOL: bool>(
        x: &[u8],
        at: [usize; R],
        win: Window,
        b: &PackedI8,
        rq: &Requant<'_>,
        out: &mut [u8],
        o: usize,
    ) {
        let panels = b.n.div_ceil(PANEL);
        let mut p = 0;
        while p + 2 <= panels {
            fused_tile::<R, 2, POOL>(x, at, win, b, rq, p, out, o);
            p += 2;
        }
        if p < panels {
            fused_tile::<R, 1, POOL>(x, at, win, b, rq, p, out, o);
        }
    }

    /// # Safety
    /// AVX-512 F + BW + VL + VNNI; the shapes as [`super::fused`] checked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn fused_vnni(
        x: &[u8],
        (rows, w): (usize, usize),
        geo: Geometry,
        b: &PackedI8,
        rq: &Requant<'_>,
        pool: bool,
        out: &mut [u8],
    ) {
        let win = geo.win;
        let at = |y: usize, x: usize| y * geo.row + x * geo.px;
        if pool {
            let ow = w / 2;
            let window = |oy: usize, ox: usize| {
                let (y, x0) = (2 * oy, 2 * ox);
                [at(y, x0), at(y, x0 + 1), at(y + 1, x0), at(y + 1, x0 + 1)]
            };
            for oy in 0..rows / 2 {
                // Two windows at a time (each weight vector serves eight pixels), then the last.
                let mut ox = 0;
                while ox + 2 <= ow {
                    let (a, b2) = (window(oy, ox), window(oy, ox + 1));
                    let px = std::array::from_fn(|i| if i < 4 { a[i] } else { b2[i - 4] });
                    fused_panels::<8, true>(x, px, win, b, rq, out, oy * ow + ox);
                    ox += 2;
                }
                if ox < ow {
                    fused_panels::<4, true>(x, window(oy, ox), win, b, rq, out, oy * ow + ox);
                }
            }
            return;
        }
        let m = rows * w;
        let pixel = |i: usize| at(i / w, i % w);
        let mut i = 0;
        while i + 4 <= m {
            let px = [pixel(i), pixel(i + 1), pixel(i + 2), pixel(i + 3)];
            fused_panels::<4, false>(x, px, win, b, rq, out, i);
            i += 4;
        }
        while i < m {
            fused_panels::<1, false>(x, [pixel(i)], win, b, rq, out, i);
            i += 1;
        }
    }

    /// Sixteen u8 at `src` widened to the low bytes of sixteen i32 lanes.
    ///
    /// # Safety
    /// AVX-512 F; `src` valid for 16 reads.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn widen(src: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(src as *const _))
    }

    /// The depthwise layer on AVX-512 VNNI: for each output row, input rows `y - 1`, `y` and
    /// `y + 1` interleaved per channel into `[w + 2][c][4]` bytes (three rows and a zero; the
    /// border columns and the rows outside the image hold the zero point), then three
    /// `vpdpbusd` per output pixel and 16 channels, one per column tap, each adding that
    /// column's three products exactly in i32, requantized in registers. `zero_point *
    /// sum(weights)` is the requantization's correction (`rq.corr`; `taps` is
    /// `[3][c][4]`: per column tap, the three kernel rows' weights and a zero, see
    /// `quant::DwVnni`), `zp` the input's zero point.
    ///
    /// # Safety
    /// AVX-512 F + BW + VL + VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(crate) unsafe fn depthwise_vnni(
        (c, taps, zp): (usize, &[i8], u8),
        rq: &Requant<'_>,
        x: &[u8],
        (h, w): (usize, usize),
        y0: usize,
        out: &mut [u8],
    ) {
        assert!(c.is_multiple_of(16) && taps.len() == 12 * c);
        assert!(rq.corr.len() == c && rq.mult.len() >= c && rq.bias.len() >= c);
        assert_eq!(x.len(), h * w * c, "input is not {h}x{w}x{c}");
        assert!(out.len().is_multiple_of(w * c) && y0 + out.len() / (w * c) <= h);
        let zp32 = _mm512_set1_epi32(zp as i32);
        let pad = _mm512_set1_epi32(i32::from_le_bytes([zp, zp, zp, 0]));
        let mut t = vec![0u8; (w + 2) * c * 4];
        let (tp, wp) = (t.as_mut_ptr(), taps.as_ptr());
        // SAFETY (every pointer access below): `t` holds (w + 2) * c * 4 bytes and `taps`
        // 12 * c; pixel p < w + 2 and channel j + 16 <= c address bytes (p * c + j) * 4 ..
        // + 64 of `t`; input rows y - 1, y, y + 1 are checked against h and hold w * c bytes;
        // the output row holds w * c bytes.
        for j in (0..c).step_by(16) {
            _mm512_storeu_si512(tp.add(j * 4) as *mut _, pad);
            _mm512_storeu_si512(tp.add(((w + 1) * c + j) * 4) as *mut _, pad);
        }
        for (i, dst) in out.chunks_exact_mut(w * c).enumerate() {
            let y = y0 + i;
            let row = x.as_ptr().add(y * w * c);
            let (above, below) = (y > 0, y + 1 < h);
            for at in (0..w * c).step_by(16) {
                let a = if above {
                    widen(row.sub(w * c).add(at))
                } else {
                    zp32
                };
                let b = widen(row.add(at));
                let f = if below {
                    widen(row.add(w * c + at))
                } else {
                    zp32
                };
                let bytes = _mm512_or_si512(
                    _mm512_or_si512(a, _mm512_slli_epi32::<8>(b)),
                    _mm512_slli_epi32::<16>(f),
                );
                _mm512_storeu_si512(tp.add((c + at) * 4) as *mut _, bytes);
            }
            for xx in 0..w {
                for j in (0..c).step_by(16) {
                    let mut s = _mm512_setzero_si512();
                    for kx in 0..3 {
                        let tv = _mm512_loadu_si512(tp.add(((xx + kx) * c + j) * 4) as *const _);
                        let wv = _mm512_loadu_si512(wp.add((kx * c + j) * 4) as *const _);
                        s = _mm512_dpbusd_epi32(s, tv, wv);
                    }
                    requant16(s, rq, j, 16, dst.as_mut_ptr().add(xx * c + j));
                }
            }
        }
    }

    /// # Safety
    /// AVX2; `a`, `c` as [`super::gemm_u8i8`] checked.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(a: &[u8], m: usize, b: &PackedI8, c: &mut [i32]) {
        let (lda, k4, n) = (b.a_stride(), b.k.div_ceil(4), b.n);
        let panel_len = k4 * PANEL * 4;
        let mut row = 0;
        while row < m {
            let rows = ROWS.min(m - row);
            for (p, panel) in b.words.chunks_exact(panel_len).enumerate() {
                // Per row, four registers of eight i32: columns 4j..4j+4, two partial sums
                // each (k pairs 0-1 and 2-3 of every group of four).
                let mut acc = [[_mm256_setzero_si256(); 4]; ROWS];
                let w = panel.as_ptr();
                let a0 = a.as_ptr().add(row * lda);
                for q in 0..k4 {
                    // SAFETY: 64 i16 at q * 64 lie inside the panel.
                    let wq = w.add(q * PANEL * 4);
                    let wv = [
                        _mm256_loadu_si256(wq as *const _),
                        _mm256_loadu_si256(wq.add(16) as *const _),
                        _mm256_loadu_si256(wq.add(32) as *const _),
                        _mm256_loadu_si256(wq.add(48) as *const _),
                    ];
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        // SAFETY: inside `a`, as in `vnni`.
                        let a4 = (a0.add(r * lda + q * 4) as *const u32).read_unaligned();
                        // The four u8 widened to i16, repeated for the four columns.
                        let a16 = _mm256_cvtepu8_epi16(_mm_set1_epi32(a4 as i32));
                        for j in 0..4 {
                            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(a16, wv[j]));
                        }
                    }
                }
                let cols = PANEL.min(n - p * PANEL);
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    // Lanes of acc[j]: (col 4j: 2 partials, col 4j+1: 2 | col 4j+2, col 4j+3).
                    // hadd pairs them within 128-bit halves: (4j, 4j+1, 4j+4, 4j+5 | ...).
                    let h01 = _mm256_hadd_epi32(acc[0], acc[1]);
                    let h23 = _mm256_hadd_epi32(acc[2], acc[3]);
                    let lo =
                        _mm256_permutevar8x32_epi32(h01, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
                    let hi =
                        _mm256_permutevar8x32_epi32(h23, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
                    let mut sums = [0i32; PANEL];
                    _mm256_storeu_si256(sums.as_mut_ptr() as *mut _, lo);
                    _mm256_storeu_si256(sums.as_mut_ptr().add(8) as *mut _, hi);
                    // SAFETY: as in `vnni`.
                    store(c.as_mut_ptr().add((row + r) * n + p * PANEL), &sums, cols);
                }
            }
            row += rows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact reference: plain i32 triple loop over the unpacked matrices.
    fn reference(a: &[u8], lda: usize, m: usize, b: &[i8], k: usize, n: usize) -> Vec<i32> {
        let mut c = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|t| a[i * lda + t] as i32 * b[t * n + j] as i32)
                    .sum();
            }
        }
        c
    }

    /// Every kernel set this CPU runs, forced one by one, against the exact reference on odd
    /// shapes and on the extremes (255 x -128 everywhere: the saturation trap); the sets it
    /// cannot run are reported, not silently skipped.
    #[test]
    fn every_kernel_set_matches_the_exact_reference() {
        let ran = Int8Isa::testable("int8 GEMM");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let shapes: [(usize, usize, usize); 9] = [
            (1, 1, 1),
            (1, 3, 17),
            (3, 27, 16),
            (5, 9, 31),
            (4, 64, 32),
            (7, 144, 50),
            (9, 300, 33),
            (2, 1152, 128),
            (13, 40, 96),
        ];
        for &(m, k, n) in &shapes {
            for extreme in [false, true] {
                let b: Vec<i8> = (0..k * n)
                    .map(|_| if extreme { -128 } else { next() as i8 })
                    .collect();
                let lda = k.div_ceil(4) * 4;
                // Padding bytes are garbage on purpose: the kernels must multiply them by zero.
                let a: Vec<u8> = (0..m * lda)
                    .map(|i| {
                        if extreme || i % lda >= k {
                            255
                        } else {
                            next() as u8
                        }
                    })
                    .collect();
                let want = reference(&a, lda, m, &b, k, n);
                for isa in &ran {
                    let packed = PackedI8::new(&b, k, n, *isa);
                    assert_eq!(packed.a_stride(), lda);
                    let mut c = vec![i32::MIN; m * n + 3];
                    gemm_u8i8(&a, m, &packed, &mut c);
                    assert_eq!(
                        &c[..m * n],
                        &want[..],
                        "{} m={m} k={k} n={n} extreme={extreme}",
                        isa.name()
                    );
                    // Nothing written past m x n.
                    assert!(c[m * n..].iter().all(|&v| v == i32::MIN), "{}", isa.name());
                    let sums: Vec<i32> = (0..n)
                        .map(|j| (0..k).map(|t| b[t * n + j] as i32).sum())
                        .collect();
                    assert_eq!(packed.column_sums(), &sums[..]);
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "A:")]
    fn a_shorter_than_its_shape_is_refused() {
        let b = PackedI8::new(&[1; 6 * 2], 6, 2, Int8Isa::Portable);
        // Two rows need 2 x 8 bytes (k = 6 rounded up to 8).
        gemm_u8i8(&[1; 15], 2, &b, &mut [0; 4]);
    }
}
