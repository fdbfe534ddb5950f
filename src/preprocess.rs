//! Image preprocessing shared by training, evaluation and serving.
//!
//! The study feeds RGB pixels scaled to [0, 1] with no mean/std normalisation, as an
//! [N, 3, S, S] tensor. Evaluation (and serving) resizes the shorter side to `resize` with
//! bilinear filtering, then takes the centre `crop` x `crop` square. Keeping this in one place
//! is what stops training and serving from drifting apart.
//!
//! Decoding is strict: a JPEG whose scan does not end in an EOI marker (a truncated upload)
//! is refused rather than decoded with its missing rows filled in. A JPEG at least twice the
//! target size is decoded straight to a reduced scale (1/2, 1/4 or 1/8, by scaling the IDCT),
//! which cuts the decode of a phone photo by up to 8x; EXIF orientation is applied. Resizing
//! is SIMD bilinear (the `fast_image_resize` crate: AVX2/SSE4.1/NEON kernels), the same tent
//! filter as before, with its support widened by the downscale factor.

use std::io::Cursor;

use fast_image_resize as fr;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
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
    #[error("truncated {format}: the data ends after {bytes} bytes, before the image's end marker ({marker}); send the whole file")]
    Truncated {
        bytes: usize,
        format: &'static str,
        marker: &'static str,
    },
}

/// Decodes an encoded image (first frame for GIF) to RGB at full resolution, refusing images
/// over `max_pixels` from their header alone.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    decode_for(bytes, max_pixels, u32::MAX)
}

/// As [`decode`], but a JPEG whose shorter side is at least twice `min_side` may be decoded at
/// a reduced scale whose shorter side is still at least `min_side`.
///
/// A decoder that panics on a malformed file is a decode error for that input, not a failed
/// request or a lost worker. The one known case, png 0.18.1 on a palette whose length is not a
/// whole number of RGB entries (`fuzz/regressions/image/`), is refused before decoding
/// ([`check_png_palette`]), so that the fuzzer, whose panic hook aborts even inside
/// `catch_unwind`, can look past it.
pub fn decode_for(
    bytes: &[u8],
    max_pixels: u64,
    min_side: u32,
) -> Result<RgbImage, PreprocessError> {
    std::panic::catch_unwind(|| decode_unguarded(bytes, max_pixels, min_side)).unwrap_or_else(
        |_| {
            Err(PreprocessError::Decode(
                "the image decoder failed on this malformed file".into(),
            ))
        },
    )
}

fn decode_unguarded(
    bytes: &[u8],
    max_pixels: u64,
    min_side: u32,
) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| PreprocessError::UnknownFormat(e.to_string()))
    };
    let probe = reader()?;
    let Some(format) = probe.format() else {
        return Err(PreprocessError::UnknownFormat(
            "unrecognised file signature".into(),
        ));
    };
    // Truncation first: a cut header would otherwise surface as a less helpful decode error.
    check_complete(format, bytes)?;
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
    if format == ImageFormat::Jpeg && width.min(height) >= min_side.saturating_mul(2) {
        if let Some(img) = decode_jpeg_scaled(bytes, min_side)? {
            return Ok(img);
        }
    }
    let mut r = reader()?;
    let mut limits = Limits::default();
    // 4 bytes per pixel covers RGBA decoders plus headroom for their scratch buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    r.limits(limits);
    let decode_err = |e: image::ImageError| PreprocessError::Decode(e.to_string());
    let mut decoder = r.into_decoder().map_err(decode_err)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// Refuses data cut short, for the formats whose decoders would otherwise decode it anyway.
fn check_complete(format: ImageFormat, bytes: &[u8]) -> Result<(), PreprocessError> {
    match format {
        ImageFormat::Jpeg => check_jpeg_complete(bytes),
        ImageFormat::Png => check_png_complete(bytes).and_then(|()| check_png_palette(bytes)),
        // Every GIF ends with its trailer byte; the decoder reads the first frame without it.
        ImageFormat::Gif if bytes.last() != Some(&0x3B) => Err(PreprocessError::Truncated {
            bytes: bytes.len(),
            format: "GIF",
            marker: "trailer 0x3B",
        }),
        _ => Ok(()),
    }
}

/// A JPEG's entropy-coded data cannot contain the EOI marker (0xFF 0xD9: 0xFF bytes are
/// stuffed as 0xFF 0x00), so a file with no EOI after its first start-of-scan (0xFF 0xDA)
/// was cut short. Data after the EOI (camera trailers) is allowed.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), PreprocessError> {
    let sos = bytes.windows(2).position(|w| w == [0xFF, 0xDA]);
    let complete = sos.is_some_and(|at| bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]));
    if complete {
        Ok(())
    } else {
        Err(PreprocessError::Truncated {
            bytes: bytes.len(),
            format: "JPEG",
            marker: "EOI",
        })
    }
}

/// A PNG ends with its IEND chunk; the decoder stops after the last image data, so without
/// this check a file cut inside its final chunks would pass.
fn check_png_complete(bytes: &[u8]) -> Result<(), PreprocessError> {
    let idat = bytes.windows(4).position(|w| w == b"IDAT");
    let complete = idat.is_some_and(|at| {
        bytes[at..]
            .windows(4)
            .position(|w| w == b"IEND")
            // The chunk's 4-byte CRC follows its type.
            .is_some_and(|end| at + end + 8 <= bytes.len())
    });
    if complete {
        Ok(())
    } else {
        Err(PreprocessError::Truncated {
            bytes: bytes.len(),
            format: "PNG",
            marker: "IEND",
        })
    }
}

/// A PNG's palette (PLTE) and, for a palette image, its transparency (tRNS) as the
/// specification requires them: a whole number of RGB entries, 1 to 256 and no more than the
/// bit depth can index, at most one PLTE, and no more alpha values than palette entries. png
/// 0.18.1 panics (slices out of range) on a palette that is not a whole number of entries,
/// over 256 entries, or shorter than its tRNS. Chunks are walked until IEND or until one does
/// not fit in the data (truncation is [`check_png_complete`]'s to report).
fn check_png_palette(bytes: &[u8]) -> Result<(), PreprocessError> {
    let bad = |what: String| Err(PreprocessError::Decode(format!("malformed PNG: {what}")));
    let (mut at, mut depth, mut indexed, mut entries) = (8, 8u32, false, None::<usize>);
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let Some(data) = bytes.get(at + 8..(at + 8).saturating_add(len)) else {
            break;
        };
        match kind {
            b"IHDR" if data.len() >= 10 => {
                depth = data[8] as u32;
                indexed = data[9] == 3;
            }
            b"PLTE" => {
                if entries.is_some() {
                    return bad("more than one palette (PLTE) chunk".into());
                }
                let n = len / 3;
                let most = if indexed { 1usize << depth.min(8) } else { 256 };
                if !len.is_multiple_of(3) || n == 0 || n > most {
                    return bad(format!(
                        "palette (PLTE) of {len} bytes; it must hold 1 to {most} RGB entries \
                         (3 bytes each)"
                    ));
                }
                entries = Some(n);
            }
            b"tRNS" if indexed => match entries {
                None => return bad("transparency (tRNS) before the palette (PLTE)".into()),
                Some(n) if len > n => {
                    return bad(format!(
                        "{len} transparency (tRNS) values for a palette of {n} entries"
                    ))
                }
                Some(_) => {}
            },
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    Ok(())
}

/// Decodes a JPEG at the smallest IDCT scale (1/8, 1/4, 1/2) whose shorter side is at least
/// `min_side`, applying EXIF orientation. `None` for colour spaces the scaled decoder does not
/// turn into RGB (CMYK): the caller decodes those at full size.
fn decode_jpeg_scaled(bytes: &[u8], min_side: u32) -> Result<Option<RgbImage>, PreprocessError> {
    let err = |e: jpeg_decoder::Error| PreprocessError::Decode(e.to_string());
    let mut d = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    d.read_info().map_err(err)?;
    let Some(info) = d.info() else {
        return Ok(None);
    };
    let (w, h) = (info.width as u32, info.height as u32);
    let f = (w.min(h) as f64 / min_side.max(1) as f64).max(1.0);
    let want = |side: u32| ((side as f64 / f).ceil() as u16).max(1);
    let (sw, sh) = d.scale(want(w), want(h)).map_err(err)?;
    let pixels = d.decode().map_err(err)?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => return Ok(None),
    };
    let Some(img) = RgbImage::from_raw(sw as u32, sh as u32, rgb) else {
        return Ok(None);
    };
    let mut img = DynamicImage::ImageRgb8(img);
    if let Some(o) = d.exif_data().and_then(Orientation::from_exif_chunk) {
        img.apply_orientation(o);
    }
    Ok(Some(img.into_rgb8()))
}

/// Resizes `img` to `w` x `h` with the bilinear (tent) filter, widened when downscaling.
fn resize_to(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let src =
        fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
            .expect("an RgbImage's buffer holds width x height x 3 bytes");
    let mut dst = fr::images::Image::new(w, h, fr::PixelType::U8x3);
    let options =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    fr::Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("source and destination are both RGB8");
    RgbImage::from_raw(w, h, dst.into_vec()).expect("the resizer wrote w x h x 3 bytes")
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
        resize_to(img, nw, nh)
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

    /// A PNG from chunks (CRCs left zero: the palette check does not read them).
    fn chunks(parts: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in parts {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(*kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&[0; 4]);
        }
        out
    }

    fn ihdr(depth: u8, colour: u8) -> (&'static [u8; 4], Vec<u8>) {
        let mut d = vec![0, 0, 0, 4, 0, 0, 0, 4, depth, colour];
        d.extend_from_slice(&[0, 0, 0]);
        (b"IHDR", d)
    }

    #[test]
    fn malformed_png_palettes_are_refused_before_decoding() {
        let plte = |n: usize| (b"PLTE", vec![9u8; n]);
        let trns = |n: usize| (b"tRNS", vec![255u8; n]);
        let end = [(b"IDAT", vec![0u8; 3]), (b"IEND", vec![])];
        let ok = |parts: &[(&[u8; 4], Vec<u8>)]| {
            let png = chunks(&[parts, &end[..]].concat());
            assert!(check_png_palette(&png).is_ok(), "{parts:?}");
        };
        ok(&[ihdr(8, 3), plte(3 * 4), trns(4)]);
        ok(&[ihdr(2, 3), plte(3 * 4), trns(2)]);
        // A suggested palette in a truecolour image may hold all 256 entries.
        ok(&[ihdr(8, 2), plte(768)]);
        let refused = |parts: &[(&[u8; 4], Vec<u8>)], says: &str| {
            let png = chunks(&[parts, &end[..]].concat());
            match check_png_palette(&png) {
                Err(PreprocessError::Decode(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{parts:?}: {other:?}"),
            }
        };
        refused(&[ihdr(8, 3), plte(97)], "palette (PLTE) of 97 bytes");
        refused(&[ihdr(8, 3), plte(0)], "1 to 256");
        refused(&[ihdr(8, 2), plte(771)], "1 to 256");
        refused(&[ihdr(2, 3), plte(3 * 5)], "1 to 4 RGB entries");
        refused(
            &[ihdr(8, 3), plte(3 * 4), trns(5)],
            "5 transparency (tRNS) values",
        );
        refused(&[ihdr(8, 3), trns(1), plte(3)], "before the palette");
        refused(&[ihdr(8, 3), plte(3), plte(3)], "more than one palette");
        // Both inputs the fuzzer found (png 0.18.1 panics on them) now fail with the reason.
        for bytes in [
            &include_bytes!("../fuzz/regressions/image/panic-png-palette-index.png")[..],
            &include_bytes!("../fuzz/regressions/image/panic-png-palette-97-bytes.png")[..],
        ] {
            match decode(bytes, DEFAULT_MAX_PIXELS) {
                Err(PreprocessError::Decode(m)) => assert!(m.contains("PLTE) of 97 bytes"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
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

    fn noisy(w: u32, h: u32) -> RgbImage {
        let mut state = 0x1234_5678u32;
        RgbImage::from_fn(w, h, |x, y| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let n = (state >> 24) as u8 / 4;
            image::Rgb([
                ((x * 255 / w) as u8).saturating_add(n),
                ((y * 255 / h) as u8).saturating_add(n),
                (((x + y) % 64) as u8 * 3).saturating_add(n),
            ])
        })
    }

    fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, format).unwrap();
        buf.into_inner()
    }

    /// An APP1 EXIF segment with one IFD entry, Orientation = `value`, after the SOI.
    fn with_exif_orientation(jpeg: &[u8], value: u16) -> Vec<u8> {
        let mut tiff = b"II*\0\x08\0\0\0".to_vec(); // little endian, IFD at offset 8
        tiff.extend(1u16.to_le_bytes()); // one entry
        tiff.extend(0x0112u16.to_le_bytes()); // Orientation
        tiff.extend(3u16.to_le_bytes()); // SHORT
        tiff.extend(1u32.to_le_bytes()); // count
        tiff.extend(value.to_le_bytes());
        tiff.extend([0, 0]);
        tiff.extend(0u32.to_le_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend([0xFF, 0xE1]);
        out.extend(((app1.len() + 2) as u16).to_be_bytes());
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }

    #[test]
    fn truncated_images_are_refused_in_every_format() {
        let img = noisy(512, 512);
        let jpeg = encode(&img, ImageFormat::Jpeg);
        // The case: the first 2 KB of a 512x512 photo (headers complete, scan cut).
        match decode(&jpeg[..2048], DEFAULT_MAX_PIXELS) {
            Err(PreprocessError::Truncated { bytes: 2048, .. }) => {}
            other => panic!(
                "expected a truncation error, got {:?}",
                other.map(|i| i.dimensions())
            ),
        }
        let small = noisy(40, 30);
        for format in [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::WebP,
        ] {
            let full = encode(&small, format);
            assert!(decode(&full, DEFAULT_MAX_PIXELS).is_ok(), "{format:?}");
            for cut in [
                full.len() / 4,
                full.len() / 2,
                full.len() - full.len() / 8,
                full.len() - 2,
            ] {
                assert!(
                    decode(&full[..cut], DEFAULT_MAX_PIXELS).is_err(),
                    "{format:?} cut to {cut} of {} bytes decoded",
                    full.len()
                );
            }
        }
        // Data after the end marker (a camera's trailer) is fine.
        let mut trailer = encode(&small, ImageFormat::Jpeg);
        trailer.extend(b"vendor trailer");
        assert!(decode(&trailer, DEFAULT_MAX_PIXELS).is_ok());
    }

    #[test]
    fn large_jpegs_decode_at_a_reduced_scale_close_to_the_full_decode() {
        let img = noisy(1024, 768);
        let jpeg = encode(&img, ImageFormat::Jpeg);
        // Shorter side 768 >= 2 x 256: the largest IDCT scale keeping >= 256 is 1/2.
        let scaled = decode_for(&jpeg, DEFAULT_MAX_PIXELS, 256).unwrap();
        assert_eq!(scaled.dimensions(), (512, 384));
        assert_eq!(
            decode_for(&jpeg, DEFAULT_MAX_PIXELS, 96)
                .unwrap()
                .dimensions(),
            (128, 96)
        );
        assert_eq!(
            decode_for(&jpeg, DEFAULT_MAX_PIXELS, 500)
                .unwrap()
                .dimensions(),
            (1024, 768)
        );
        // Both paths give nearly the same model input.
        let pp = Preprocessing::for_input(256);
        let a = image_to_input(&scaled, &pp);
        let b = image_to_input(&decode(&jpeg, DEFAULT_MAX_PIXELS).unwrap(), &pp);
        let mean_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        assert!(mean_diff < 4.0 / 255.0, "mean difference {mean_diff}");
    }

    #[test]
    fn exif_orientation_is_applied_on_both_decode_paths() {
        let img = noisy(64, 32);
        let jpeg = with_exif_orientation(&encode(&img, ImageFormat::Jpeg), 6); // rotate 90 CW
        assert_eq!(
            decode(&jpeg, DEFAULT_MAX_PIXELS).unwrap().dimensions(),
            (32, 64)
        );
        // Reduced scale (shorter side 32 >= 2 x 8 -> 1/4).
        assert_eq!(
            decode_for(&jpeg, DEFAULT_MAX_PIXELS, 8)
                .unwrap()
                .dimensions(),
            (8, 16)
        );
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
