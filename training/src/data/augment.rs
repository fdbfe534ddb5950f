//! Training augmentation (SPEC: random crop with symmetric padding, horizontal flip, rotation up
//! to 15 degrees) and the evaluation path (`slimserve::preprocess::image_to_input`).
//!
//! Train: resize the shorter side to `pp.resize` exactly as the evaluation path does, then pad
//! every side by `pad` pixels (reflection), take a random `pp.crop` square, flip it
//! horizontally with p = 0.5 and rotate it about its centre by an angle uniform in
//! [-max, max]. Crop, flip and rotation are one inverse mapping with bilinear sampling;
//! positions outside the resized image are reflected back into it, so there are no fill
//! borders. With crop at the centre, no flip and angle 0 the output equals the evaluation
//! path bit for bit.

use image::RgbImage;
pub use slimserve::preprocess::resize_shorter;
use slimserve::preprocess::{image_to_input, Preprocessing};

use super::rng::Rng;

/// Augmentation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Reflection padding on each side before the random crop; `None` = crop / 8.
    pub pad: Option<usize>,
    /// Probability of a horizontal flip.
    pub flip_prob: f64,
    /// Rotation angle is uniform in [-max_rotation_deg, max_rotation_deg].
    pub max_rotation_deg: f32,
}

impl Default for Augment {
    /// The study's augmentation: pad crop/8, flip p = 0.5, rotation up to 15 degrees.
    fn default() -> Self {
        Self {
            pad: None,
            flip_prob: 0.5,
            max_rotation_deg: 15.0,
        }
    }
}

/// One sample's random draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Top-left corner of the crop in padded coordinates (0..=resized + 2 * pad - crop).
    pub crop_x: usize,
    pub crop_y: usize,
    pub flip: bool,
    /// Counter-clockwise rotation in degrees.
    pub angle_deg: f32,
}

impl Augment {
    pub fn pad_for(&self, crop: usize) -> usize {
        self.pad.unwrap_or(crop / 8)
    }

    /// The identity draw for a resized image of `w` x `h`: the evaluation centre crop.
    pub fn centre(&self, w: usize, h: usize, crop: usize) -> AugmentParams {
        let pad = self.pad_for(crop);
        AugmentParams {
            crop_x: pad + (w - crop) / 2,
            crop_y: pad + (h - crop) / 2,
            flip: false,
            angle_deg: 0.0,
        }
    }

    /// Draws the parameters for sample `index` of `epoch`, for a resized image of `w` x `h`.
    /// The draw depends only on (seed, epoch, index) and the sizes.
    pub fn sample(
        &self,
        w: usize,
        h: usize,
        crop: usize,
        seed: u64,
        epoch: u64,
        index: usize,
    ) -> AugmentParams {
        let pad = self.pad_for(crop);
        let mut rng = Rng::derive(&[seed, epoch, index as u64]);
        let crop_x = rng.below(w + 2 * pad - crop + 1);
        let crop_y = rng.below(h + 2 * pad - crop + 1);
        let flip = rng.unit() < self.flip_prob;
        let angle_deg = ((rng.unit() * 2.0 - 1.0) * self.max_rotation_deg as f64) as f32;
        AugmentParams {
            crop_x,
            crop_y,
            flip,
            angle_deg,
        }
    }

    /// Renders `params` from a resized image into `out` (3 x crop x crop, CHW, scaled to
    /// [0, 1] then mean/std as in `slimserve::preprocess::rgb_to_chw`).
    pub fn apply(
        &self,
        resized: &RgbImage,
        params: &AugmentParams,
        pp: &Preprocessing,
        out: &mut [f32],
    ) {
        let s = pp.crop;
        let plane = s * s;
        assert_eq!(out.len(), 3 * plane, "output buffer size");
        let (w, h) = (resized.width() as i64, resized.height() as i64);
        let raw = resized.as_raw();
        let pad = self.pad_for(s) as f32;
        let c = (s as f32 - 1.0) / 2.0;
        let (sin, cos) = params.angle_deg.to_radians().sin_cos();
        let (ox, oy) = (params.crop_x as f32 - pad, params.crop_y as f32 - pad);
        let px = |x: i64, y: i64| {
            let i = 3 * (reflect(y, h) * w as usize + reflect(x, w));
            [raw[i] as f32, raw[i + 1] as f32, raw[i + 2] as f32]
        };
        for v in 0..s {
            for u in 0..s {
                // Inverse mapping: output pixel -> rotated back -> unflipped -> resized image.
                let (du, dv) = (u as f32 - c, v as f32 - c);
                let mut xs = cos * du - sin * dv + c;
                let ys = sin * du + cos * dv + c;
                if params.flip {
                    xs = (s as f32 - 1.0) - xs;
                }
                let (x, y) = (xs + ox, ys + oy);
                let (x0, y0) = (x.floor(), y.floor());
                let (fx, fy) = (x - x0, y - y0);
                let (x0, y0) = (x0 as i64, y0 as i64);
                let p00 = px(x0, y0);
                let (p10, p01, p11) = if fx == 0.0 && fy == 0.0 {
                    (p00, p00, p00)
                } else {
                    (px(x0 + 1, y0), px(x0, y0 + 1), px(x0 + 1, y0 + 1))
                };
                for ch in 0..3 {
                    let top = p00[ch] + (p10[ch] - p00[ch]) * fx;
                    let bottom = p01[ch] + (p11[ch] - p01[ch]) * fx;
                    let value = (top + (bottom - top) * fy).clamp(0.0, 255.0);
                    out[ch * plane + v * s + u] = (value / 255.0 - pp.mean[ch]) / pp.std[ch];
                }
            }
        }
    }
}

/// Reflects an index into 0..n without repeating the edge (`-1 -> 1`, `n -> n - 2`), like
/// PyTorch's reflect padding; periodic beyond one reflection.
fn reflect(i: i64, n: i64) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// The training path for sample `index` of `epoch`: CHW floats of `pp.crop` squared.
pub fn train_input(
    img: &RgbImage,
    aug: &Augment,
    pp: &Preprocessing,
    seed: u64,
    epoch: u64,
    index: usize,
) -> Vec<f32> {
    let resized = resize_shorter(img, pp);
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    let params = aug.sample(w, h, pp.crop, seed, epoch, index);
    let mut out = vec![0f32; 3 * pp.crop * pp.crop];
    aug.apply(&resized, &params, pp, &mut out);
    out
}

/// The evaluation path: `slimserve::preprocess::image_to_input` (resize, centre crop).
pub fn eval_input(img: &RgbImage, pp: &Preprocessing) -> Vec<f32> {
    image_to_input(img, pp)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::image;
    use super::*;
    use slimserve::preprocess::resize_center_crop;

    fn render(img: &RgbImage, aug: &Augment, pp: &Preprocessing, p: &AugmentParams) -> Vec<f32> {
        let r = resize_shorter(img, pp);
        let mut out = vec![0f32; 3 * pp.crop * pp.crop];
        aug.apply(&r, p, pp, &mut out);
        out
    }

    #[test]
    fn identity_draw_equals_the_eval_path() {
        let aug = Augment::default();
        for (w, h, size) in [
            (20, 16, 8),
            (16, 20, 8),
            (37, 23, 16),
            (8, 8, 8),
            (5, 9, 12),
        ] {
            let img = image(w, h, 3);
            let pp = Preprocessing::for_input(size);
            let r = resize_shorter(&img, &pp);
            let p = aug.centre(r.width() as usize, r.height() as usize, size);
            assert_eq!(
                render(&img, &aug, &pp, &p),
                eval_input(&img, &pp),
                "{w}x{h}@{size}"
            );
            // The shared crop agrees too (guards the copied resize arithmetic).
            assert_eq!(
                image::imageops::crop_imm(
                    &r,
                    (r.width() - size as u32) / 2,
                    (r.height() - size as u32) / 2,
                    size as u32,
                    size as u32
                )
                .to_image(),
                resize_center_crop(&img, &pp)
            );
        }
        // resize != crop, and mean/std are honoured the same way.
        let pp = Preprocessing {
            resize: 14,
            crop: 10,
            mean: [0.5, 0.4, 0.3],
            std: [0.2, 0.3, 0.4],
        };
        let img = image(30, 21, 1);
        let r = resize_shorter(&img, &pp);
        let p = aug.centre(r.width() as usize, r.height() as usize, 10);
        assert_eq!(render(&img, &aug, &pp, &p), eval_input(&img, &pp));
    }

    #[test]
    fn flip_and_crop_move_pixels_as_expected() {
        let aug = Augment {
            pad: Some(2),
            ..Augment::default()
        };
        let pp = Preprocessing::for_input(8);
        let img = image(8, 8, 5);
        let base = aug.centre(8, 8, 8);
        assert_eq!((base.crop_x, base.crop_y), (2, 2));
        let plain = render(&img, &aug, &pp, &base);
        let flipped = render(&img, &aug, &pp, &AugmentParams { flip: true, ..base });
        for ch in 0..3 {
            for y in 0..8 {
                for x in 0..8 {
                    assert_eq!(flipped[ch * 64 + y * 8 + x], plain[ch * 64 + y * 8 + 7 - x]);
                }
            }
        }
        // Crop shifted one pixel left: column 0 is the reflection of column 1.
        let left = render(&img, &aug, &pp, &AugmentParams { crop_x: 1, ..base });
        for y in 0..8 {
            assert_eq!(left[y * 8], plain[y * 8 + 1]);
            assert_eq!(left[y * 8 + 1], plain[y * 8]);
        }
        // A 90 degree rotation of a square is a transpose plus flip (up to float error).
        let rot = render(
            &img,
            &aug,
            &pp,
            &AugmentParams {
                angle_deg: 90.0,
                ..base
            },
        );
        for y in 0..8 {
            for x in 0..8 {
                let got = rot[y * 8 + x];
                let want = plain[x * 8 + (7 - y)];
                assert!((got - want).abs() < 1e-3, "({x},{y}) {got} vs {want}");
            }
        }
    }

    #[test]
    fn draws_are_reproducible_and_vary() {
        let aug = Augment::default();
        let pp = Preprocessing::for_input(16);
        let img = image(20, 16, 7);
        let a = train_input(&img, &aug, &pp, 9, 0, 3);
        assert_eq!(a, train_input(&img, &aug, &pp, 9, 0, 3));
        assert_ne!(a, train_input(&img, &aug, &pp, 9, 1, 3));
        assert_ne!(a, train_input(&img, &aug, &pp, 10, 0, 3));
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));

        let mut flips = 0;
        for i in 0..400 {
            let p = aug.sample(20, 16, 16, 1, 2, i);
            assert!(p.crop_x <= 20 + 4 - 16 && p.crop_y <= 16 + 4 - 16, "{p:?}");
            assert!(p.angle_deg.abs() <= 15.0, "{p:?}");
            flips += p.flip as usize;
        }
        assert!((150..250).contains(&flips), "{flips} flips of 400");
        assert!((0..400).any(|i| aug.sample(20, 16, 16, 1, 2, i).angle_deg > 10.0));
        assert!((0..400).any(|i| aug.sample(20, 16, 16, 1, 2, i).angle_deg < -10.0));
    }

    #[test]
    fn reflect_indices() {
        let r: Vec<usize> = (-4..8).map(|i| reflect(i, 4)).collect();
        assert_eq!(r, [2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
        assert_eq!(reflect(-3, 1), 0);
    }
}
