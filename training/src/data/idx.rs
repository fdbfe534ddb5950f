//! IDX files (the MNIST family's format) and the Fashion-MNIST dataset.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{dir_name, DataError, Dataset, Layout, Sample, SampleSource};

/// Fashion-MNIST class names, by label.
pub const FASHION_MNIST_LABELS: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Refuse to inflate a `.gz` IDX file beyond this (Fashion-MNIST train images: 47 MB).
const MAX_IDX_BYTES: u64 = 1 << 30;
/// Magic of an unsigned-byte IDX file with 3 dimensions (images).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an unsigned-byte IDX file with 1 dimension (labels).
const LABELS_MAGIC: u32 = 0x0000_0801;

/// A parsed unsigned-byte IDX array.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// The 4-byte magic number (`0x0000_08NN`, NN = number of dimensions).
    pub magic: u32,
    pub dims: Vec<usize>,
    /// Row-major data, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// Parses IDX bytes (element type unsigned byte only); `path` is for error messages.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray, DataError> {
    let err = |reason: String| DataError::Idx {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 {
        return Err(err(format!(
            "{} bytes, too short for the 4-byte magic number",
            bytes.len()
        )));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(err(format!(
            "bad magic number 0x{magic:08X} (an IDX file starts with two zero bytes)"
        )));
    }
    if bytes[2] != 0x08 {
        return Err(err(format!(
            "magic 0x{magic:08X}: element type 0x{:02X} is not supported (only unsigned byte, 0x08)",
            bytes[2]
        )));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err(err(format!("magic 0x{magic:08X}: zero dimensions")));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(err(format!(
            "{} bytes, too short for the {ndims} dimension sizes",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("dimensions {dims:?} overflow")))?;
    let got = bytes.len() - header;
    if got != expected {
        return Err(err(format!(
            "dimensions {dims:?} need {expected} data bytes but the file has {got}"
        )));
    }
    Ok(IdxArray {
        magic,
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file, inflating it first when it is gzip-compressed (detected from its
/// content, whatever the file name).
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Idx {
                path: path.to_path_buf(),
                reason: format!("gzip: {e}"),
            })?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(DataError::Idx {
                path: path.to_path_buf(),
                reason: format!("inflates to more than {MAX_IDX_BYTES} bytes"),
            });
        }
        parse_idx(&out, path)
    } else {
        parse_idx(&raw, path)
    }
}

/// `<dir>/<stem>` or `<dir>/<stem>.gz`.
fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// True when `dir` holds any of the Fashion-MNIST IDX files.
pub(crate) fn has_fashion_mnist(dir: &Path) -> bool {
    FILES.iter().any(|f| find_file(dir, f).is_some())
}

fn read_split(dir: &Path, prefix: &str, split: &str) -> Result<Vec<Sample>, DataError> {
    let need = |stem: String| {
        find_file(dir, &stem).ok_or_else(|| DataError::Empty {
            path: dir.to_path_buf(),
            what: format!("Fashion-MNIST file `{stem}` (or `{stem}.gz`) is missing"),
        })
    };
    let img_path = need(format!("{prefix}-images-idx3-ubyte"))?;
    let lbl_path = need(format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx(&img_path)?;
    let labels = read_idx(&lbl_path)?;
    let bad = |path: &Path, reason: String| DataError::Idx {
        path: path.to_path_buf(),
        reason,
    };
    if images.magic != IMAGES_MAGIC {
        return Err(bad(
            &img_path,
            format!(
                "magic 0x{:08X}, expected 0x{IMAGES_MAGIC:08X} (unsigned-byte images, 3 dimensions)",
                images.magic
            ),
        ));
    }
    if labels.magic != LABELS_MAGIC {
        return Err(bad(
            &lbl_path,
            format!(
                "magic 0x{:08X}, expected 0x{LABELS_MAGIC:08X} (unsigned-byte labels, 1 dimension)",
                labels.magic
            ),
        ));
    }
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if n == 0 || h == 0 || w == 0 {
        return Err(bad(
            &img_path,
            format!("empty image array {:?}", images.dims),
        ));
    }
    if labels.dims[0] != n {
        return Err(bad(
            &lbl_path,
            format!(
                "{} labels for {n} images in {}",
                labels.dims[0],
                img_path.display()
            ),
        ));
    }
    if let Some(i) = labels
        .data
        .iter()
        .position(|&l| l as usize >= FASHION_MNIST_LABELS.len())
    {
        return Err(bad(
            &lbl_path,
            format!("label {} at index {i} is not in 0..=9", labels.data[i]),
        ));
    }
    let plane = h * w;
    Ok(labels
        .data
        .iter()
        .enumerate()
        .map(|(i, &label)| Sample {
            path_or_id: format!("fashion-mnist/{split}/{i}"),
            label: label as usize,
            source: SampleSource::Grey {
                width: w as u32,
                height: h as u32,
                pixels: Arc::from(&images.data[i * plane..(i + 1) * plane]),
            },
        })
        .collect())
}

/// Opens Fashion-MNIST IDX files in `dir`. Validation is the full 10,000-image test set (the
/// study's protocol here: evaluate on the whole test set), so there is no separate test split.
pub fn open_fashion_mnist(dir: &Path) -> Result<Dataset, DataError> {
    let train = read_split(dir, "train", "train")?;
    let val = read_split(dir, "t10k", "test")?;
    Ok(Dataset {
        classes: FASHION_MNIST_LABELS.iter().map(|s| s.to_string()).collect(),
        train,
        val,
        test: None,
        name: dir_name(dir),
        layout: Layout::FashionMnist,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Writes a tiny Fashion-MNIST: `n` 3x2 images per split, image i filled with i, label i%10.
    fn write_tiny(dir: &Path, n: u32, compress: bool) {
        for prefix in ["train", "t10k"] {
            let pixels: Vec<u8> = (0..n).flat_map(|i| [i as u8; 6]).collect();
            let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
            let files = [
                (
                    format!("{prefix}-images-idx3-ubyte"),
                    idx(0x803, &[n, 3, 2], &pixels),
                ),
                (
                    format!("{prefix}-labels-idx1-ubyte"),
                    idx(0x801, &[n], &labels),
                ),
            ];
            for (name, bytes) in files {
                if compress {
                    std::fs::write(dir.join(format!("{name}.gz")), gz(&bytes)).unwrap();
                } else {
                    std::fs::write(dir.join(name), bytes).unwrap();
                }
            }
        }
    }

    #[test]
    fn parses_plain_and_gzip_idx() {
        for compress in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_tiny(dir.path(), 12, compress);
            let ds = super::super::open(dir.path(), 0).unwrap();
            assert_eq!(ds.layout, Layout::FashionMnist);
            assert_eq!(ds.classes.len(), 10);
            assert_eq!(ds.classes[9], "Ankle boot");
            assert_eq!((ds.train.len(), ds.val.len()), (12, 12));
            assert!(ds.test.is_none());
            let s = &ds.train[11];
            assert_eq!(s.label, 1);
            assert_eq!(s.path_or_id, "fashion-mnist/train/11");
            match &s.source {
                SampleSource::Grey {
                    width,
                    height,
                    pixels,
                } => {
                    assert_eq!((*width, *height), (2, 3));
                    assert_eq!(&pixels[..], &[11u8; 6]);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn malformed_idx_is_a_clear_error() {
        let p = Path::new("x.idx");
        let e = parse_idx(&idx(0x0100_0803, &[1, 1, 1], &[0]), p).unwrap_err();
        assert!(e.to_string().contains("bad magic number 0x01000803"), "{e}");
        let e = parse_idx(&idx(0x0D03, &[1, 1, 1], &[0; 4]), p).unwrap_err();
        assert!(e.to_string().contains("element type 0x0D"), "{e}");
        let e = parse_idx(&idx(0x803, &[2, 2, 2], &[0; 7]), p).unwrap_err();
        assert!(
            e.to_string()
                .contains("need 8 data bytes but the file has 7"),
            "{e}"
        );
        assert!(e.to_string().starts_with("x.idx"), "{e}");
        assert!(parse_idx(&[0, 0, 8], p).is_err());
        assert!(parse_idx(&[0, 0, 8, 2, 0, 0, 0, 1], p).is_err());
        let ok = parse_idx(&idx(0x802, &[2, 3], &[1, 2, 3, 4, 5, 6]), p).unwrap();
        assert_eq!(ok.dims, [2, 3]);

        // Swapped files (labels where images belong) and mismatched counts.
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), 4, false);
        std::fs::copy(
            dir.path().join("train-labels-idx1-ubyte"),
            dir.path().join("train-images-idx3-ubyte"),
        )
        .unwrap();
        let e = open_fashion_mnist(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("expected 0x00000803"),
            "{e}"
        );

        write_tiny(dir.path(), 4, false);
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx(0x801, &[3], &[0, 1, 2]),
        )
        .unwrap();
        let e = open_fashion_mnist(dir.path()).unwrap_err().to_string();
        assert!(e.contains("3 labels for 4 images"), "{e}");

        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
        let e = open_fashion_mnist(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("t10k-labels-idx1-ubyte") && e.contains("missing"),
            "{e}"
        );

        // A corrupt gzip stream.
        let mut bad = gz(&idx(0x801, &[3], &[0, 1, 2]));
        let len = bad.len();
        bad.truncate(len - 10);
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte.gz"), bad).unwrap();
        let e = open_fashion_mnist(dir.path()).unwrap_err().to_string();
        assert!(e.contains("gzip"), "{e}");
    }
}
