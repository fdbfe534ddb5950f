//! The Food-11 layout: `<root>/{training,validation,testing|evaluation}/<label>_<n>.jpg`.

use std::path::{Path, PathBuf};

use slimserve::formats::model_dir::FOOD11_LABELS;

use super::folder::images_in;
use super::{dir_name, DataError, Dataset, Layout, Sample};

/// Parses `<label>_<n>` file stems.
fn parse_stem(path: &Path) -> Option<(usize, u64)> {
    let stem = path.file_stem()?.to_str()?;
    let (label, n) = stem.split_once('_')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(label) || !all_digits(n) {
        return None;
    }
    Some((label.parse().ok()?, n.parse().ok()?))
}

/// True when `root/training` and `root/validation` exist and `training` holds images directly.
pub(crate) fn looks_like_food11(root: &Path) -> Result<bool, DataError> {
    let (train, val) = (root.join("training"), root.join("validation"));
    if !train.is_dir() || !val.is_dir() {
        return Ok(false);
    }
    Ok(images_in(&train)?.iter().any(|p| parse_stem(p).is_some()))
}

/// Labelled samples of a split; `None` when it holds unlabelled file names (a test split).
fn read_split(dir: &Path, require_labels: bool) -> Result<Option<Vec<Sample>>, DataError> {
    let mut parsed: Vec<(usize, u64, PathBuf)> = Vec::new();
    for p in images_in(dir)? {
        match parse_stem(&p) {
            Some((label, n)) => parsed.push((label, n, p)),
            None if require_labels => {
                return Err(DataError::Invalid {
                    path: p,
                    reason: "Food-11 image names must be `<label>_<n>.<ext>`".into(),
                })
            }
            None => return Ok(None),
        }
    }
    if parsed.is_empty() {
        if require_labels {
            return Err(DataError::Empty {
                path: dir.to_path_buf(),
                what: "no images".into(),
            });
        }
        return Ok(None);
    }
    parsed.sort();
    Ok(Some(
        parsed
            .into_iter()
            .map(|(label, _, p)| Sample::file(p, label))
            .collect(),
    ))
}

/// Opens a Food-11 directory. The number of classes is the largest label seen plus one;
/// labels 0..=10 are named by `FOOD11_LABELS`. An unlabelled test split is omitted.
pub fn open_food11(root: &Path) -> Result<Dataset, DataError> {
    let need = |name: &str| {
        let d = root.join(name);
        if d.is_dir() {
            Ok(d)
        } else {
            Err(DataError::NoLayout {
                path: root.to_path_buf(),
                detail: format!("Food-11 needs a `{name}` folder"),
            })
        }
    };
    let train = read_split(&need("training")?, true)?.unwrap_or_default();
    let val = read_split(&need("validation")?, true)?.unwrap_or_default();
    let test = match ["testing", "evaluation"]
        .iter()
        .map(|n| root.join(n))
        .find(|d| d.is_dir())
    {
        Some(d) => read_split(&d, false)?,
        None => None,
    };
    let num_classes = train
        .iter()
        .chain(&val)
        .chain(test.iter().flatten())
        .map(|s| s.label + 1)
        .max()
        .unwrap_or(0);
    let classes = (0..num_classes)
        .map(|i| {
            FOOD11_LABELS
                .get(i)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("class_{i}"))
        })
        .collect();
    Ok(Dataset {
        classes,
        train,
        val,
        test,
        name: dir_name(root),
        layout: Layout::Food11,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::write_image;
    use super::*;

    fn make(root: &Path) {
        for label in 0..3u8 {
            for i in 0..4 {
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                write_image(
                    &root.join("training").join(format!("{label}_{i}.{ext}")),
                    label,
                );
            }
            write_image(
                &root.join("validation").join(format!("{label}_0.jpg")),
                label,
            );
        }
    }

    #[test]
    fn loads_labels_from_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("food-11");
        make(&root);
        // Unlabelled test split (as in the Kaggle copy): omitted.
        write_image(&root.join("testing/0.jpg"), 0);
        let ds = open_food11(&root).unwrap();
        assert_eq!(ds.name, "food-11");
        assert_eq!(ds.classes, ["bread", "dairy product", "dessert"]);
        assert_eq!(ds.class_counts(&ds.train), [4, 4, 4]);
        assert_eq!(ds.class_counts(&ds.val), [1, 1, 1]);
        assert!(ds.test.is_none());
        for s in &ds.train {
            let stem = Path::new(&s.path_or_id)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(stem.starts_with(&format!("{}_", s.label)), "{stem}");
        }
        // Deterministic order: by label then number.
        assert!(ds.train.windows(2).all(|w| w[0].label <= w[1].label));

        // A labelled `evaluation` split is kept, and its labels count towards the classes.
        std::fs::remove_dir_all(root.join("testing")).unwrap();
        write_image(&root.join("evaluation/10_0.jpg"), 0);
        let ds = open_food11(&root).unwrap();
        assert_eq!(ds.num_classes(), 11);
        assert_eq!(ds.classes[10], "vegetable/fruit");
        assert_eq!(ds.test.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn bad_names_and_empty_splits_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make(root);
        write_image(&root.join("training/oops.png"), 0);
        let err = open_food11(root).unwrap_err().to_string();
        assert!(
            err.contains("oops.png") && err.contains("<label>_<n>"),
            "{err}"
        );
        std::fs::remove_file(root.join("training/oops.png")).unwrap();

        for f in std::fs::read_dir(root.join("validation")).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        let err = open_food11(root).unwrap_err().to_string();
        assert!(
            err.contains("validation") && err.contains("no images"),
            "{err}"
        );
    }
}
