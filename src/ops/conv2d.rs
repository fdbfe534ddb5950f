//! 2-D convolution with fused bias (any kernel size, stride, zero padding and group count):
//!
//! ```text
//! y[n,o,i,j] = b[o] + sum_{c in group(o), ky, kx} w[o,c,ky,kx] * x[n,c,i*s+ky-p,j*s+kx-p]
//! x: [N,C,H,W], w: [O,C/g,KH,KW], b: [O] -> y: [N,O,(H+2p-KH)/s+1,(W+2p-KW)/s+1]
//! ```
//!
//! Per image and group the forward is one gemm, `Y[O/g, P] = W[O/g, K] . col[K, P]` with
//! `K = C/g*KH*KW` and `col` the im2col matrix of the image (a 1x1, stride-1, unpadded
//! convolution multiplies the image itself, without im2col). The backward is two more gemms per
//! image and group: `dW += dY . col^T` and `dcol = W^T . dY`, then col2im gives dx.
//!
//! candle's own conv2d backward runs a direct-loop `conv_transpose2d` for the input gradient
//! and a convolution with an HxW kernel for the weight gradient; its bias is a separate
//! broadcast add. Here the input gradient is skipped when nothing upstream needs it (the
//! network's input image), so the first full-resolution convolution only pays for dW.
//!
//! Parallelism: with at least as many images as threads, images run in parallel with
//! single-threaded gemms; otherwise images run one after the other with a multithreaded gemm.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{f32_slice, needs_grad, sum16, with_f32_slices, OpTimer};
use crate::simd::multiversion;

/// y = conv2d(x, w) + b with stride `stride`, zero padding `padding` on every side and `groups`
/// groups. f32 on the CPU runs the custom op; anything else candle's `conv2d` (+ bias).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, h, wd) = match x.dims() {
        &[n, c, h, w] => (n, c, h, w),
        d => bail!("conv2d: x must be [N,C,H,W], got shape {d:?}"),
    };
    let (o, cg, kh, kw) = match w.dims() {
        &[o, cg, kh, kw] => (o, cg, kh, kw),
        d => bail!("conv2d: w must be [O,C/groups,KH,KW], got shape {d:?}"),
    };
    if groups == 0 || stride == 0 || c % groups != 0 || o % groups != 0 || cg != c / groups {
        bail!(
            "conv2d: x {:?} and w {:?} do not fit groups={groups}, stride={stride}",
            x.dims(),
            w.dims()
        );
    }
    if h + 2 * padding < kh || wd + 2 * padding < kw {
        bail!(
            "conv2d: kernel {kh}x{kw} is larger than the padded input {:?}",
            x.dims()
        );
    }
    if let Some(b) = bias {
        if b.dims() != [o] {
            bail!("conv2d: bias must be [{o}], got {:?}", b.dims());
        }
    }
    if x.dtype() != w.dtype() {
        bail!(
            "conv2d: x and w must have the same dtype, got {:?} and {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    if !super::on_cpu(x) || x.dtype() != DType::F32 {
        let y = x.conv2d(w, padding, stride, 1, groups)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let p = Params {
        n,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        stride,
        padding,
        groups,
    };
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(o, DType::F32, x.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, Conv2dOp(p))
}

#[derive(Debug, Clone, Copy)]
struct Params {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Params {
    fn oh(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }
    /// Output pixels per plane.
    fn pixels(&self) -> usize {
        self.oh() * self.ow()
    }
    /// Input channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Output channels per group.
    fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Rows of the im2col matrix (one group).
    fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    /// A 1x1 stride-1 unpadded convolution reads the image as its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
    /// Scratch values per worker for one group's im2col matrix.
    fn col_len(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            self.k() * self.pixels()
        }
    }
}

/// Images in parallel (single-threaded gemm) or one at a time (multithreaded gemm).
fn gemm_parallelism(n: usize) -> (bool, Parallelism) {
    let threads = rayon::current_num_threads();
    if n >= threads || threads == 1 {
        (true, Parallelism::None)
    } else {
        (false, Parallelism::Rayon(threads))
    }
}

/// `dst[m, n] (+)= lhs[m, k] . rhs[k, n]`, each operand given by (pointer, row stride,
/// column stride); `dst` is dense row-major.
///
/// # Safety
/// The pointers and strides must address valid `m x k`, `k x n` and `m x n` matrices, and
/// `dst` must not alias the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

multiversion! {
/// im2col of one group of one image: `col[(ci, ky, kx), (i, j)] = x[ci, i*s+ky-p, j*s+kx-p]`
/// (zero outside the image). `x` is the group's [C/g, H, W] block.
fn im2col(p: &Params, x: &[f32], col: &mut [f32]) {
    let (oh, ow) = (p.oh(), p.ow());
    let (h, w, s, pad) = (p.h, p.w, p.stride, p.padding);
    let mut rows = col.chunks_exact_mut(oh * ow);
    for ci in 0..p.cg() {
        let plane = &x[ci * h * w..][..h * w];
        for ky in 0..p.kh {
            for kx in 0..p.kw {
                let row = rows.next().expect("im2col: col has K rows");
                // Output columns j whose input column j*s+kx-pad lies inside the image.
                let j0 = pad.saturating_sub(kx).div_ceil(s).min(ow);
                let j1 = if w + pad > kx {
                    ((w + pad - kx - 1) / s + 1).min(ow)
                } else {
                    0
                }
                .max(j0);
                for (i, out) in row.chunks_exact_mut(ow).enumerate() {
                    let iy = (i * s + ky) as isize - pad as isize;
                    if iy < 0 || iy >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    out[..j0].fill(0.0);
                    out[j1..].fill(0.0);
                    if j1 == j0 {
                        continue;
                    }
                    let x0 = j0 * s + kx - pad;
                    if s == 1 {
                        out[j0..j1].copy_from_slice(&src[x0..x0 + (j1 - j0)]);
                    } else {
                        for (o, v) in out[j0..j1].iter_mut().zip(src[x0..].iter().step_by(s)) {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}
}

multiversion! {
/// dst[c, r] = src[r, c] for src [rows, cols] (row-major), in cache-sized tiles.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const T: usize = 32;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                let row = &src[r * cols..][..cols];
                for c in c0..(c0 + T).min(cols) {
                    dst[c * rows + r] = row[c];
                }
            }
        }
    }
}
}

multiversion! {
/// Pixel-major patches of one group of one image:
/// `rows[(i, j), (ky, kx, ci)] = x[ci, i*s+ky-p, j*s+kx-p]` (zero outside the image), read from
/// the group's channel-last copy `xt` [H, W, C/g]. Each (pixel, ky) is one copy of the kx run
/// inside the image.
fn im2row(p: &Params, xt: &[f32], rows: &mut [f32]) {
    let (ow, cg) = (p.ow(), p.cg());
    let (h, w, s, pad) = (p.h, p.w, p.stride, p.padding);
    let k = p.k();
    for (pix, row) in rows.chunks_exact_mut(k).enumerate() {
        let (i, j) = (pix / ow, pix % ow);
        for (ky, seg) in row.chunks_exact_mut(p.kw * cg).enumerate() {
            let iy = (i * s + ky) as isize - pad as isize;
            if iy < 0 || iy >= h as isize {
                seg.fill(0.0);
                continue;
            }
            // kx with 0 <= j*s + kx - pad < w.
            let x0 = (j * s) as isize - pad as isize;
            let kx0 = (-x0).clamp(0, p.kw as isize) as usize;
            let kx1 = (w as isize - x0).clamp(kx0 as isize, p.kw as isize) as usize;
            seg[..kx0 * cg].fill(0.0);
            seg[kx1 * cg..].fill(0.0);
            if kx1 > kx0 {
                let src = (iy as usize * w + (x0 + kx0 as isize) as usize) * cg;
                seg[kx0 * cg..kx1 * cg].copy_from_slice(&xt[src..src + (kx1 - kx0) * cg]);
            }
        }
    }
}
}

multiversion! {
/// col2im: the adjoint of [`im2col`], `dx[ci, y, x] = sum of the dcol entries that read it`.
/// `dx` (the group's [C/g, H, W] block) is overwritten.
fn col2im(p: &Params, dcol: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (p.oh(), p.ow());
    let (h, w, s, pad) = (p.h, p.w, p.stride, p.padding);
    dx.fill(0.0);
    let mut rows = dcol.chunks_exact(oh * ow);
    for ci in 0..p.cg() {
        let plane = &mut dx[ci * h * w..][..h * w];
        for ky in 0..p.kh {
            for kx in 0..p.kw {
                let row = rows.next().expect("col2im: dcol has K rows");
                let j0 = pad.saturating_sub(kx).div_ceil(s).min(ow);
                let j1 = if w + pad > kx {
                    ((w + pad - kx - 1) / s + 1).min(ow)
                } else {
                    0
                }
                .max(j0);
                for (i, src) in row.chunks_exact(ow).enumerate() {
                    let iy = (i * s + ky) as isize - pad as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    if j1 == j0 {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * w..][..w];
                    let x0 = j0 * s + kx - pad;
                    if s == 1 {
                        for (d, v) in dst[x0..x0 + (j1 - j0)].iter_mut().zip(&src[j0..j1]) {
                            *d += v;
                        }
                    } else {
                        for (d, v) in dst[x0..].iter_mut().step_by(s).zip(&src[j0..j1]) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}
}

/// Runs `f(image, scratch)` for every image, in parallel when there are enough images, with
/// one scratch per worker made by `init`; returns the workers' scratches.
fn for_each_image<S: Send>(
    n: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(usize, &mut S) + Sync + Send,
) -> Vec<S> {
    if parallel {
        let threads = rayon::current_num_threads();
        (0..n)
            .into_par_iter()
            .with_min_len(n.div_ceil(threads))
            .fold(&init, |mut s, i| {
                f(i, &mut s);
                s
            })
            .collect()
    } else {
        let mut s = init();
        (0..n).for_each(|i| f(i, &mut s));
        vec![s]
    }
}

/// A raw pointer that may cross threads; each image writes its own disjoint block.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// (A method, so that closures capture the whole `SyncPtr`, not its raw-pointer field.)
    fn get(self) -> *mut f32 {
        self.0
    }
}

struct Conv2dOp(Params);

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = OpTimer::start(if self.0.is_pointwise() {
            "conv1x1 fwd"
        } else {
            "conv kxk fwd"
        });
        let p = self.0;
        let x = f32_slice(self.name(), s1, l1)?;
        let wt = f32_slice(self.name(), s2, l2)?;
        let b = f32_slice(self.name(), s3, l3)?;
        let (pix, k, og, cg) = (p.pixels(), p.k(), p.og(), p.cg());
        let mut y = vec![0f32; p.n * p.o * pix];
        let yp = SyncPtr(y.as_mut_ptr());
        let (parallel, par) = gemm_parallelism(p.n);
        for_each_image(
            p.n,
            parallel,
            || vec![0f32; p.col_len()],
            |img, col| {
                // SAFETY: image `img` owns y[img*O*P .. (img+1)*O*P].
                let yi = unsafe {
                    std::slice::from_raw_parts_mut(yp.get().add(img * p.o * pix), p.o * pix)
                };
                for (oc, row) in yi.chunks_exact_mut(pix).enumerate() {
                    row.fill(b[oc]);
                }
                for g in 0..p.groups {
                    let xg = &x[(img * p.c + g * cg) * p.h * p.w..][..cg * p.h * p.w];
                    let src: &[f32] = if p.is_pointwise() {
                        xg
                    } else {
                        im2col(&p, xg, col);
                        col
                    };
                    // SAFETY: W_g [og, k] row-major, src [k, pix] row-major, dst [og, pix].
                    unsafe {
                        matmul(
                            (og, pix, k),
                            yi[g * og * pix..].as_mut_ptr(),
                            true,
                            (wt[g * og * k..].as_ptr(), k, 1),
                            (src.as_ptr(), pix, 1),
                            par,
                        )
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((p.n, p.o, p.oh(), p.ow()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = OpTimer::start(if self.0.is_pointwise() {
            "conv1x1 bwd"
        } else {
            "conv kxk bwd"
        });
        let p = self.0;
        let grad_res = grad_res.contiguous()?;
        if grad_res.dims() != [p.n, p.o, p.oh(), p.ow()] {
            bail!("{}: gradient shape {:?}", self.name(), grad_res.dims());
        }
        let (want_x, want_w, want_b) = (needs_grad(x), needs_grad(w), needs_grad(b));
        let (pix, k, og, cg) = (p.pixels(), p.k(), p.og(), p.cg());
        let dev = x.device();
        with_f32_slices(self.name(), &[x, w, &grad_res], |s| {
            let (xs, wt, dy) = (s[0], s[1], s[2]);
            let mut dx = if want_x {
                vec![0f32; xs.len()]
            } else {
                Vec::new()
            };
            let dxp = SyncPtr(dx.as_mut_ptr());
            let (parallel, par) = gemm_parallelism(p.n);
            struct Scratch {
                xt: Vec<f32>,
                col: Vec<f32>,
                dcol: Vec<f32>,
                dw: Vec<f32>,
                db: Vec<f32>,
            }
            let parts = for_each_image(
                p.n,
                parallel,
                || Scratch {
                    xt: vec![0f32; if want_w { cg * p.h * p.w } else { 0 }],
                    col: vec![0f32; if want_w { p.col_len() } else { 0 }],
                    dcol: vec![0f32; if want_x { p.col_len() } else { 0 }],
                    dw: vec![0f32; if want_w { p.o * k } else { 0 }],
                    db: vec![0f32; if want_b { p.o } else { 0 }],
                },
                |img, sc| {
                    let dyi = &dy[img * p.o * pix..][..p.o * pix];
                    if want_b {
                        for (db, row) in sc.db.iter_mut().zip(dyi.chunks_exact(pix)) {
                            *db += sum16(row);
                        }
                    }
                    for g in 0..p.groups {
                        let dyg = &dyi[g * og * pix..][..og * pix];
                        let x_off = (img * p.c + g * cg) * p.h * p.w;
                        let xg = &xs[x_off..][..cg * p.h * p.w];
                        if want_w {
                            // dW'_g[og, k] += dY_g[og, pix] . rows[pix, k], with the patches
                            // pixel-major (gemm runs 2-3x faster with this right operand than
                            // with the transposed im2col matrix) and k in (ky, kx, ci) order.
                            transpose(xg, cg, p.h * p.w, &mut sc.xt);
                            let rows: &[f32] = if p.is_pointwise() {
                                &sc.xt
                            } else {
                                im2row(&p, &sc.xt, &mut sc.col);
                                &sc.col
                            };
                            unsafe {
                                matmul(
                                    (og, k, pix),
                                    sc.dw[g * og * k..].as_mut_ptr(),
                                    true,
                                    (dyg.as_ptr(), pix, 1),
                                    (rows.as_ptr(), k, 1),
                                    par,
                                )
                            }
                        }
                        if want_x {
                            // SAFETY: image `img` owns its block of dx.
                            let dxg = unsafe {
                                std::slice::from_raw_parts_mut(dxp.get().add(x_off), cg * p.h * p.w)
                            };
                            // dcol[k, pix] = W_g^T . dY_g (W_g is [og, k]).
                            let dst = if p.is_pointwise() {
                                dxg.as_mut_ptr()
                            } else {
                                sc.dcol.as_mut_ptr()
                            };
                            unsafe {
                                matmul(
                                    (k, pix, og),
                                    dst,
                                    false,
                                    (wt[g * og * k..].as_ptr(), 1, k),
                                    (dyg.as_ptr(), pix, 1),
                                    par,
                                )
                            }
                            if !p.is_pointwise() {
                                col2im(&p, &sc.dcol, dxg);
                            }
                        }
                    }
                },
            );
            // Sum the workers' dW' and reorder k from (ky, kx, ci) to (ci, ky, kx).
            let mut dw = vec![0f32; if want_w { p.o * k } else { 0 }];
            let mut db = vec![0f32; if want_b { p.o } else { 0 }];
            let taps = p.kh * p.kw;
            for part in &parts {
                for (dst, src) in dw.chunks_exact_mut(k).zip(part.dw.chunks_exact(k)) {
                    for (t, seg) in src.chunks_exact(cg).enumerate() {
                        for (ci, v) in seg.iter().enumerate() {
                            dst[ci * taps + t] += v;
                        }
                    }
                }
                for (a, v) in db.iter_mut().zip(&part.db) {
                    *a += v;
                }
            }
            let dx = if want_x {
                Some(Tensor::from_vec(dx, x.shape(), dev)?)
            } else {
                None
            };
            let dw = if want_w {
                Some(Tensor::from_vec(dw, w.shape(), dev)?)
            } else {
                None
            };
            let db = if want_b {
                Some(Tensor::from_vec(db, b.shape(), dev)?)
            } else {
                None
            };
            Ok((dx, dw, db))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{rand_tensor, rel_err, TOL};
    use candle_core::Var;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn generic(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Tensor {
        let y = x.conv2d(w, pad, stride, 1, groups).unwrap();
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap(),
            None => y,
        }
    }

    type Conv<'a> = dyn Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor + 'a;

    /// Output and the gradients of sum(conv(x, w, b) * r) for x, w and b (x only when
    /// `x_var`, b only when given).
    fn run(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        x_var: bool,
        conv: &Conv<'_>,
    ) -> (Tensor, Option<Tensor>, Tensor, Option<Tensor>) {
        let xv = Var::from_tensor(x).unwrap();
        let wv = Var::from_tensor(w).unwrap();
        let bv = b.map(|b| Var::from_tensor(b).unwrap());
        let xin = if x_var {
            xv.as_tensor().clone()
        } else {
            x.clone()
        };
        let y = conv(&xin, wv.as_tensor(), bv.as_ref().map(|b| b.as_tensor()));
        let r = crate::ops::test_util::wave(y.dims());
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(xv.as_tensor()).cloned();
        assert_eq!(gx.is_some(), x_var, "x gradient only when x needs it");
        (
            y,
            gx,
            g.get(wv.as_tensor()).unwrap().clone(),
            bv.map(|b| g.get(b.as_tensor()).unwrap().clone()),
        )
    }

    /// Direct-loop reference in f64: y and, for the upstream gradient r, dx, dw and db.
    fn naive(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        r: &Tensor,
        (stride, pad, groups): (usize, usize, usize),
    ) -> [Tensor; 4] {
        let (n, c, h, wd) = x.dims4().unwrap();
        let (o, cg, kh, kw) = w.dims4().unwrap();
        let (_, _, oh, ow) = r.dims4().unwrap();
        let v = |t: &Tensor| -> Vec<f64> {
            let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            t.iter().map(|&v| v as f64).collect()
        };
        let (xs, ws, bs, rs) = (v(x), v(w), v(b), v(r));
        let mut y = vec![0f64; n * o * oh * ow];
        let mut dx = vec![0f64; xs.len()];
        let mut dw = vec![0f64; ws.len()];
        let mut db = vec![0f64; o];
        let og = o / groups;
        for img in 0..n {
            for oc in 0..o {
                let g = oc / og;
                for i in 0..oh {
                    for j in 0..ow {
                        let yi = ((img * o + oc) * oh + i) * ow + j;
                        let mut acc = bs[oc];
                        db[oc] += rs[yi];
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (i * stride + ky) as isize - pad as isize;
                                    let ix = (j * stride + kx) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((img * c + g * cg + ci) * h + iy as usize) * wd
                                        + ix as usize;
                                    let wi = ((oc * cg + ci) * kh + ky) * kw + kx;
                                    acc += ws[wi] * xs[xi];
                                    dx[xi] += rs[yi] * ws[wi];
                                    dw[wi] += rs[yi] * xs[xi];
                                }
                            }
                        }
                        y[yi] = acc;
                    }
                }
            }
        }
        let t = |v: Vec<f64>, dims: &[usize]| {
            let v: Vec<f32> = v.into_iter().map(|v| v as f32).collect();
            Tensor::from_vec(v, dims, &candle_core::Device::Cpu).unwrap()
        };
        [
            t(y, r.dims()),
            t(dx, x.dims()),
            t(dw, w.dims()),
            t(db, b.dims()),
        ]
    }

    #[test]
    fn matches_reference_conv_forward_and_backward() {
        let mut rng = StdRng::seed_from_u64(0xc0);
        // (k, stride, pad): the zoo's 3x3 "same" and 1x1 convs, ResNet's 7x7/2 and 1x1/2, more.
        let kinds: [(usize, usize, usize); 8] = [
            (3, 1, 1),
            (1, 1, 0),
            (7, 2, 3),
            (1, 2, 0),
            (3, 2, 1),
            (5, 1, 2),
            (3, 1, 0),
            (2, 3, 1),
        ];
        let sizes = [1, 2, 5, 8, 13, 17];
        for case in 0..60 {
            let (k, stride, pad) = kinds[case % kinds.len()];
            let groups = [1, 1, 2, 3][rng.random_range(0..4)];
            let c = groups * rng.random_range(1..=5);
            let o = groups * rng.random_range(1..=5);
            let n = rng.random_range(1..=4);
            let h = sizes[rng.random_range(0..sizes.len())].max(k.saturating_sub(2 * pad));
            let wd = sizes[rng.random_range(0..sizes.len())].max(k.saturating_sub(2 * pad));
            let x = rand_tensor(&mut rng, &[n, c, h, wd]);
            let w = rand_tensor(&mut rng, &[o, c / groups, k, k]);
            let b = rand_tensor(&mut rng, &[o]);
            let with_bias = case % 3 != 2;
            let x_var = case % 4 != 3;
            let (y, dx, dw, db) = run(&x, &w, with_bias.then_some(&b), x_var, &|x, w, b| {
                conv2d(x, w, b, stride, pad, groups).unwrap()
            });
            let zero = b.zeros_like().unwrap();
            let bias = if with_bias { &b } else { &zero };
            let r = crate::ops::test_util::wave(y.dims());
            let [y_ref, dx_ref, dw_ref, db_ref] = naive(&x, &w, bias, &r, (stride, pad, groups));
            let what = format!(
                "x {:?} w {:?} s{stride} p{pad} g{groups}",
                x.dims(),
                w.dims()
            );
            assert!(rel_err(&y, &y_ref) <= TOL, "y {what}");
            // candle's own conv2d forward agrees too.
            assert!(rel_err(&y, &generic(&x, &w, Some(bias), stride, pad, groups)) <= TOL);
            if let Some(dx) = &dx {
                assert!(rel_err(dx, &dx_ref) <= TOL, "dx {what}");
            }
            assert!(rel_err(&dw, &dw_ref) <= TOL, "dw {what}");
            if let Some(db) = &db {
                assert!(rel_err(db, &db_ref) <= TOL, "db {what}");
            }
        }
    }

    #[test]
    fn matches_candle_gradients_for_the_zoo_convolutions() {
        let mut rng = StdRng::seed_from_u64(0xc1);
        for (k, stride, pad, groups) in [(3, 1, 1, 1), (1, 1, 0, 1), (3, 1, 1, 2), (7, 2, 3, 1)] {
            // candle's backward mis-sizes dx for strided convs of odd inputs; keep them even.
            let x = rand_tensor(&mut rng, &[3, 4, 16, 14]);
            let w = rand_tensor(&mut rng, &[6, 4 / groups, k, k]);
            let b = rand_tensor(&mut rng, &[6]);
            let fast = run(&x, &w, Some(&b), true, &|x, w, b| {
                conv2d(x, w, b, stride, pad, groups).unwrap()
            });
            let slow = run(&x, &w, Some(&b), true, &|x, w, b| {
                generic(x, w, b, stride, pad, groups)
            });
            assert!(rel_err(&fast.0, &slow.0) <= TOL);
            assert!(rel_err(fast.1.as_ref().unwrap(), slow.1.as_ref().unwrap()) <= TOL);
            assert!(rel_err(&fast.2, &slow.2) <= TOL);
            assert!(rel_err(fast.3.as_ref().unwrap(), slow.3.as_ref().unwrap()) <= TOL);
        }
    }

    #[test]
    fn one_image_uses_the_threaded_gemm_path() {
        // N = 1 < threads runs images serially with a multithreaded gemm.
        let mut rng = StdRng::seed_from_u64(4);
        let x = rand_tensor(&mut rng, &[1, 8, 40, 33]);
        let w = rand_tensor(&mut rng, &[16, 8, 3, 3]);
        let b = rand_tensor(&mut rng, &[16]);
        let fast = run(&x, &w, Some(&b), true, &|x, w, b| {
            conv2d(x, w, b, 1, 1, 1).unwrap()
        });
        let slow = run(&x, &w, Some(&b), true, &|x, w, b| generic(x, w, b, 1, 1, 1));
        assert!(rel_err(&fast.0, &slow.0) <= TOL);
        assert!(rel_err(fast.1.as_ref().unwrap(), slow.1.as_ref().unwrap()) <= TOL);
        assert!(rel_err(&fast.2, &slow.2) <= TOL);
        assert!(rel_err(fast.3.as_ref().unwrap(), slow.3.as_ref().unwrap()) <= TOL);
    }

    #[test]
    fn strided_inputs_and_bad_shapes() {
        let mut rng = StdRng::seed_from_u64(8);
        let x = rand_tensor(&mut rng, &[2, 4, 9, 6])
            .transpose(2, 3)
            .unwrap();
        let w = rand_tensor(&mut rng, &[5, 4, 3, 3])
            .transpose(2, 3)
            .unwrap();
        let got = conv2d(&x, &w, None, 1, 1, 1).unwrap();
        let want = generic(
            &x.contiguous().unwrap(),
            &w.contiguous().unwrap(),
            None,
            1,
            1,
            1,
        );
        assert!(rel_err(&got, &want) <= TOL);
        let x = rand_tensor(&mut rng, &[1, 4, 5, 5]);
        let w = rand_tensor(&mut rng, &[6, 4, 3, 3]);
        assert!(conv2d(&x, &w, None, 1, 1, 2).is_err(), "groups do not fit");
        assert!(conv2d(&x, &w, Some(&rand_tensor(&mut rng, &[5])), 1, 1, 1).is_err());
        assert!(conv2d(&x.flatten_from(2).unwrap(), &w, None, 1, 1, 1).is_err());
        let big = rand_tensor(&mut rng, &[6, 4, 9, 9]);
        assert!(
            conv2d(&x, &big, None, 1, 1, 1).is_err(),
            "kernel larger than input"
        );
    }
}
