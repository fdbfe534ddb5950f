//! Image preprocessing shared by training, evaluation and serving.
//!
//! The study feeds RGB pixels scaled to [0, 1] with no mean/std normalisation, as an
//! [N, 3, S, S] tensor. Evaluation (and serving) resizes the shorter side to `resize` with
//! bilinear filtering, then takes the centre `crop` x `crop` square. Keeping this in one place
//! is what stops training and serving from drifting apart.

use std::io::Cursor;

use image::{imageops::FilterType, DynamicImage, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

/// Default refusal threshold for decoded images: 40 megapixels (a 30000x30000 header is refused
/// before any pixel buffer is allocated).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// The shorter image side is resized to this many pixels.
    pub resize: usize,
    /// Side of the centre square fed to the model (the model's input size).
    pub crop: usize,
    /// Per-channel mean subtracted after scaling to [0, 1] (the study: none).
    pub mean: [f32; 3],
    /// Per-channel divisor applied after the mean (the study: none).
    pub std: [f32; 3],
}

impl Preprocessing {
    /// The study's preprocessing for a square input of `size` pixels.
    pub fn for_input(size: usize) -> Self {
        Self {
            resize: size,
            crop: size,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PreprocessError {
    #[error("empty image data")]
    Empty,
    #[error("not a supported image (JPEG, PNG, WebP, BMP, GIF): {0}")]
    UnknownFormat(String),
    #[error("image is {width}x{height} = {} pixels, over the limit of {max} pixels", *width as u64 * *height as u64)]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSized { width: u32, height: u32 },
    #[error("could not decode image: {0}")]
    Decode(String),
}

/// Decodes an encoded image (first frame for GIF) to RGB, refusing images over `max_pixels`
/// from their header alone.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| PreprocessError::UnknownFormat(e.to_string()))
    };
    let probe = reader()?;
    if probe.format().is_none() {
        return Err(PreprocessError::UnknownFormat(
            "unrecognised file signature".into(),
        ));
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(PreprocessError::ZeroSized { width, height });
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            max: max_pixels,
        });
    }
    let mut r = reader()?;
    let mut limits = Limits::default();
    // 4 bytes per pixel covers RGBA decoders plus headroom for their scratch buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    r.limits(limits);
    let img = r
        .decode()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Resizes the shorter side to `resize` (bilinear), keeping both sides at least `crop`.
/// Training augments from this image; evaluation crops its centre.
pub fn resize_shorter(img: &RgbImage, pp: &Preprocessing) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = pp.resize as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).max(pp.crop as u32);
    let nh = ((h as f64 * scale).round() as u32).max(pp.crop as u32);
    if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, FilterType::Triangle)
    }
}

/// Resizes the shorter side to `resize` and takes the centre `crop` square.
pub fn resize_center_crop(img: &RgbImage, pp: &Preprocessing) -> RgbImage {
    let resized = resize_shorter(img, pp);
    let (nw, nh) = resized.dimensions();
    let c = pp.crop as u32;
    let x = (nw - c) / 2;
    let y = (nh - c) / 2;
    image::imageops::crop_imm(&resized, x, y, c, c).to_image()
}

/// Writes an RGB image as CHW floats (scaled to [0, 1], then mean/std) into `out`
/// (length 3 * width * height).
pub fn rgb_to_chw(img: &RgbImage, pp: &Preprocessing, out: &mut [f32]) {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer size");
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - pp.mean[c]) / pp.std[c];
        }
    }
}

/// The evaluation/serving path: decoded image -> CHW floats of the model's input size.
pub fn image_to_input(img: &RgbImage, pp: &Preprocessing) -> Vec<f32> {
    let cropped = resize_center_crop(img, pp);
    let mut out = vec![0f32; 3 * pp.crop * pp.crop];
    rgb_to_chw(&cropped, pp, &mut out);
    out
}

/// Convenience for callers holding a `DynamicImage`.
pub fn dynamic_to_input(img: &DynamicImage, pp: &Preprocessing) -> Vec<f32> {
    image_to_input(&img.to_rgb8(), pp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        });
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn decodes_and_crops_to_the_input_size() {
        let img = decode(&png(80, 40), DEFAULT_MAX_PIXELS).unwrap();
        let pp = Preprocessing::for_input(32);
        let x = image_to_input(&img, &pp);
        assert_eq!(x.len(), 3 * 32 * 32);
        assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
        // The blue channel is constant 7/255 everywhere, through resize and crop.
        assert!(x[2 * 1024..].iter().all(|v| (v - 7.0 / 255.0).abs() < 1e-6));
    }

    #[test]
    fn same_size_input_is_passed_through_exactly() {
        let src = RgbImage::from_fn(4, 4, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 20) as u8, 255])
        });
        let x = image_to_input(&src, &Preprocessing::for_input(4));
        assert_eq!(x[1], 10.0 / 255.0); // R at (x=1, y=0)
        assert_eq!(x[16 + 4], 20.0 / 255.0); // G at (x=0, y=1)
        assert_eq!(x[32], 1.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(decode(b"", 100), Err(PreprocessError::Empty)));
        assert!(matches!(
            decode(b"definitely not an image", 100),
            Err(PreprocessError::UnknownFormat(_))
        ));
        let good = png(20, 20);
        assert!(matches!(
            decode(&good, 100),
            Err(PreprocessError::TooLarge {
                width: 20,
                height: 20,
                max: 100
            })
        ));
        assert!(decode(&good[..good.len() / 2], DEFAULT_MAX_PIXELS).is_err());
    }
}
