//! The training data layer: dataset layouts, fetching real data, augmentation and batching.
//!
//! * [`open`] auto-detects a dataset directory (Food-11, one-folder-per-class with or without
//!   splits, Fashion-MNIST IDX files) and returns a [`Dataset`] of [`Sample`]s.
//! * [`fetch`] downloads/installs real data into a cache ([`FetchTarget`]).
//! * [`Loader`] turns a split into `[B, 3, S, S]` f32 / `[B]` u32 batches, decoding and
//!   augmenting on a worker pool off the consuming thread.
//!
//! Decoding and the evaluation path use `slimserve::preprocess`, so training and serving see
//! exactly the same pixels.

mod augment;
mod fetch;
mod folder;
mod food11;
mod idx;
mod loader;
pub(crate) mod rng;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use augment::{eval_input, resize_shorter, train_input, Augment, AugmentParams};
pub use fetch::{
    fetch, fetch_efficientnet_lite0, fetch_food_photos, run_fetch_cli, FetchTarget, FoodPhotos,
};
pub use folder::{open_folder_split, open_folder_unsplit, stratified_split};
pub use food11::open_food11;
pub use idx::{open_fashion_mnist, parse_idx, read_idx, IdxArray, FASHION_MNIST_LABELS};
pub use loader::{BadImage, Batches, Loader, LoaderConfig, Mode};

/// Fraction of each class held out for validation when a folder has no splits.
pub const DEFAULT_VAL_FRACTION: f64 = 0.2;

/// File extensions (lower case) treated as images.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "bmp", "gif"];

/// Where a sample's pixels come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleSource {
    /// An encoded image file, decoded with `slimserve::preprocess::decode`.
    File(PathBuf),
    /// An in-memory 8-bit grey image (Fashion-MNIST: 28x28), row-major.
    Grey {
        width: u32,
        height: u32,
        pixels: Arc<[u8]>,
    },
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The file path, or an id such as `fashion-mnist/train/123` for in-memory images.
    pub path_or_id: String,
    /// Class index into [`Dataset::classes`].
    pub label: usize,
    pub source: SampleSource,
}

impl Sample {
    pub fn file(path: PathBuf, label: usize) -> Self {
        Self {
            path_or_id: path.display().to_string(),
            label,
            source: SampleSource::File(path),
        }
    }
}

/// Which on-disk layout a dataset was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<root>/{training,validation,testing|evaluation}/<label>_<n>.jpg`.
    Food11,
    /// `<root>/{train|training,val|validation[,test|testing]}/<class>/*.jpg`.
    FolderSplit,
    /// `<root>/<class>/*.jpg`, split here with a seeded stratified split.
    FolderUnsplit,
    /// Fashion-MNIST IDX files.
    FashionMnist,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Food11 => "food-11",
            Layout::FolderSplit => "folder-per-class (with splits)",
            Layout::FolderUnsplit => "folder-per-class (no splits; seeded stratified split)",
            Layout::FashionMnist => "fashion-mnist (IDX)",
        })
    }
}

/// A labelled dataset with its splits.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    /// A labelled test split, when the layout has one.
    pub test: Option<Vec<Sample>>,
    /// A short name (the directory name).
    pub name: String,
    pub layout: Layout,
}

impl Dataset {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Images per class in `samples` (indexed by label).
    pub fn class_counts(&self, samples: &[Sample]) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for s in samples {
            counts[s.label] += 1;
        }
        counts
    }

    /// A one-paragraph human-readable description (sizes per split).
    pub fn summary(&self) -> String {
        let test = match &self.test {
            Some(t) => format!(", test {}", t.len()),
            None => String::new(),
        };
        format!(
            "{} [{}]: {} classes, train {}, val {}{}",
            self.name,
            self.layout,
            self.classes.len(),
            self.train.len(),
            self.val.len(),
            test
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: no dataset layout recognised ({detail}). Accepted layouts: \
         Food-11 `<root>/{{training,validation,testing|evaluation}}/<label>_<n>.jpg`; \
         one folder per class with splits `<root>/{{train|training,val|validation[,test|testing]}}/<class>/*.{{jpg,jpeg,png,webp,bmp,gif}}`; \
         one folder per class without splits `<root>/<class>/*.jpg`; \
         Fashion-MNIST `<root>/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]`",
        path.display()
    )]
    NoLayout { path: PathBuf, detail: String },
    #[error("{}: {what}", path.display())]
    Empty { path: PathBuf, what: String },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: bad IDX file: {reason}", path.display())]
    Idx { path: PathBuf, reason: String },
    #[error("{0}")]
    Fetch(String),
    #[error("loader: {0}")]
    Config(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// True when `path` has an image extension (case-insensitive).
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Lists a directory's entries sorted by name, skipping hidden ones.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

pub(crate) fn dir_name(path: &Path) -> String {
    std::fs::canonicalize(path)
        .ok()
        .as_deref()
        .unwrap_or(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Opens a dataset directory, detecting its layout. `seed` fixes the validation split of
/// layouts that have none (a stratified [`DEFAULT_VAL_FRACTION`] of each class).
pub fn open(path: &Path, seed: u64) -> Result<Dataset, DataError> {
    if !path.is_dir() {
        let detail = if path.exists() {
            "not a directory"
        } else {
            "does not exist"
        };
        return Err(DataError::NoLayout {
            path: path.to_path_buf(),
            detail: detail.into(),
        });
    }
    if idx::has_fashion_mnist(path) {
        return open_fashion_mnist(path);
    }
    if food11::looks_like_food11(path)? {
        return open_food11(path);
    }
    if folder::find_split_dirs(path)?.is_some() {
        return open_folder_split(path);
    }
    if folder::looks_unsplit(path)? {
        return open_folder_unsplit(path, seed, DEFAULT_VAL_FRACTION);
    }
    Err(DataError::NoLayout {
        path: path.to_path_buf(),
        detail: "no IDX files, no training/validation folders and no class folders with images"
            .into(),
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Cursor;
    use std::path::Path;

    use image::{ImageFormat, Rgb, RgbImage};

    /// A small deterministic test image whose pixels depend on `tag`.
    pub fn image(w: u32, h: u32, tag: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 13 + tag as u32 * 40) as u8,
                (y * 17 + tag as u32 * 7) as u8,
                ((x + y) * 5) as u8 ^ tag,
            ])
        })
    }

    pub fn encode(img: &RgbImage, fmt: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        buf.into_inner()
    }

    /// Writes a 20x16 PNG (even `tag`) or JPEG (odd `tag`) to `path`.
    pub fn write_image(path: &Path, tag: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let fmt = if path.extension().unwrap() == "png" {
            ImageFormat::Png
        } else {
            ImageFormat::Jpeg
        };
        std::fs::write(path, encode(&image(20, 16, tag), fmt)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::write_image;
    use super::*;

    #[test]
    fn open_detects_each_layout_and_rejects_others() {
        let dir = tempfile::tempdir().unwrap();
        let food = dir.path().join("food");
        for split in ["training", "validation"] {
            for label in 0..2 {
                write_image(&food.join(split).join(format!("{label}_0.jpg")), 1);
            }
        }
        assert_eq!(open(&food, 1).unwrap().layout, Layout::Food11);

        let split = dir.path().join("split");
        for s in ["train", "val"] {
            write_image(&split.join(s).join("cat").join("a.png"), 2);
        }
        assert_eq!(open(&split, 1).unwrap().layout, Layout::FolderSplit);

        let unsplit = dir.path().join("unsplit");
        for i in 0..3 {
            write_image(&unsplit.join("dog").join(format!("{i}.png")), 2);
        }
        assert_eq!(open(&unsplit, 1).unwrap().layout, Layout::FolderUnsplit);

        let nothing = dir.path().join("nothing");
        std::fs::create_dir_all(nothing.join("sub")).unwrap();
        std::fs::write(nothing.join("notes.txt"), "hi").unwrap();
        let err = open(&nothing, 1).unwrap_err().to_string();
        assert!(err.contains("nothing"), "{err}");
        assert!(err.contains("Accepted layouts"), "{err}");
        assert!(err.contains("Fashion-MNIST"), "{err}");

        let missing = open(&dir.path().join("missing"), 1).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
    }
}
