//! One-folder-per-class layouts, with or without split folders.

use std::path::{Path, PathBuf};

use super::rng::Rng;
use super::{dir_name, is_image_file, list_dir, DataError, Dataset, Layout, Sample};

const TRAIN_NAMES: [&str; 2] = ["train", "training"];
const VAL_NAMES: [&str; 2] = ["val", "validation"];
const TEST_NAMES: [&str; 2] = ["test", "testing"];

/// Split folders of a folder-per-class tree: (train, val, optional test).
type SplitDirs = (PathBuf, PathBuf, Option<PathBuf>);

/// Image files directly inside `dir`, sorted.
pub(crate) fn images_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter(|p| p.is_file() && is_image_file(p))
        .collect())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

fn first_existing(root: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| root.join(n)).find(|p| p.is_dir())
}

/// The split folders of a folder-per-class tree, when `root/{train,val}` hold class folders.
pub(crate) fn find_split_dirs(root: &Path) -> Result<Option<SplitDirs>, DataError> {
    let (Some(train), Some(val)) = (
        first_existing(root, &TRAIN_NAMES),
        first_existing(root, &VAL_NAMES),
    ) else {
        return Ok(None);
    };
    if subdirs(&train)?.is_empty() {
        return Ok(None);
    }
    Ok(Some((train, val, first_existing(root, &TEST_NAMES))))
}

/// True when some sub-folder of `root` holds images directly.
pub(crate) fn looks_unsplit(root: &Path) -> Result<bool, DataError> {
    for d in subdirs(root)? {
        if !images_in(&d)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn class_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads the class folders of one split; `classes` fixes the label order. Class folders that
/// are not in `classes` are an error.
fn read_split(split: &Path, classes: &[String]) -> Result<Vec<Sample>, DataError> {
    let mut samples = Vec::new();
    for d in subdirs(split)? {
        let name = class_name(&d);
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(DataError::Invalid {
                path: d,
                reason: format!(
                    "class folder `{name}` is not among the training classes {classes:?}"
                ),
            });
        };
        samples.extend(images_in(&d)?.into_iter().map(|p| Sample::file(p, label)));
    }
    if samples.is_empty() {
        return Err(DataError::Empty {
            path: split.to_path_buf(),
            what: "no images in any class folder".into(),
        });
    }
    Ok(samples)
}

/// Class folders of `dir` with their images; every class folder must hold images.
fn read_classes(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, DataError> {
    let mut classes = Vec::new();
    for d in subdirs(dir)? {
        let images = images_in(&d)?;
        if images.is_empty() {
            return Err(DataError::Empty {
                path: d,
                what: "class folder has no images (.jpg, .jpeg, .png, .webp, .bmp, .gif)".into(),
            });
        }
        classes.push((class_name(&d), images));
    }
    if classes.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
            what: "no class folders".into(),
        });
    }
    Ok(classes)
}

/// `<root>/{train|training,val|validation[,test|testing]}/<class>/*`; classes sorted by name
/// (taken from the training split).
pub fn open_folder_split(root: &Path) -> Result<Dataset, DataError> {
    let Some((train_dir, val_dir, test_dir)) = find_split_dirs(root)? else {
        return Err(DataError::NoLayout {
            path: root.to_path_buf(),
            detail: "expected train|training and val|validation folders holding class folders"
                .into(),
        });
    };
    let by_class = read_classes(&train_dir)?;
    let classes: Vec<String> = by_class.iter().map(|(c, _)| c.clone()).collect();
    let train = by_class
        .into_iter()
        .enumerate()
        .flat_map(|(label, (_, paths))| paths.into_iter().map(move |p| Sample::file(p, label)))
        .collect();
    let val = read_split(&val_dir, &classes)?;
    let test = test_dir.map(|d| read_split(&d, &classes)).transpose()?;
    Ok(Dataset {
        classes,
        train,
        val,
        test,
        name: dir_name(root),
        layout: Layout::FolderSplit,
    })
}

/// Splits each class's items into (train, val), holding out `round(n * val_fraction)` items
/// per class (at least one and never all of them when the class has two or more). The input
/// order is first made canonical by the caller (sorted); the result depends only on the items,
/// `val_fraction` and `seed`.
pub fn stratified_split<T>(
    by_class: Vec<Vec<T>>,
    val_fraction: f64,
    seed: u64,
) -> (Vec<Vec<T>>, Vec<Vec<T>>) {
    let mut train = Vec::with_capacity(by_class.len());
    let mut val = Vec::with_capacity(by_class.len());
    for (ci, mut items) in by_class.into_iter().enumerate() {
        let n = items.len();
        let n_val = if n >= 2 {
            ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1)
        } else {
            0
        };
        Rng::derive(&[seed, ci as u64, n as u64]).shuffle(&mut items);
        let rest = items.split_off(n_val);
        val.push(items);
        train.push(rest);
    }
    (train, val)
}

/// `<root>/<class>/*` with no split folders: a seeded stratified split holds out
/// `val_fraction` of every class for validation. Classes sorted by name.
pub fn open_folder_unsplit(
    root: &Path,
    seed: u64,
    val_fraction: f64,
) -> Result<Dataset, DataError> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::Config(format!(
            "validation fraction {val_fraction} is not in [0, 1)"
        )));
    }
    let by_class = read_classes(root)?;
    let classes: Vec<String> = by_class.iter().map(|(c, _)| c.clone()).collect();
    let (train, val) = stratified_split(
        by_class.into_iter().map(|(_, p)| p).collect(),
        val_fraction,
        seed,
    );
    let flatten = |parts: Vec<Vec<PathBuf>>| -> Vec<Sample> {
        parts
            .into_iter()
            .enumerate()
            .flat_map(|(label, paths)| paths.into_iter().map(move |p| Sample::file(p, label)))
            .collect()
    };
    Ok(Dataset {
        classes,
        train: flatten(train),
        val: flatten(val),
        test: None,
        name: dir_name(root),
        layout: Layout::FolderUnsplit,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::write_image;
    use super::*;

    fn names(samples: &[Sample]) -> Vec<(String, usize)> {
        samples
            .iter()
            .map(|s| {
                let p = Path::new(&s.path_or_id);
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    s.label,
                )
            })
            .collect()
    }

    #[test]
    fn split_folders_load_with_sorted_classes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (ci, class) in ["zebra", "apple", "mango"].iter().enumerate() {
            for i in 0..4 {
                let ext = if i % 2 == 0 { "png" } else { "JPG" };
                write_image(
                    &root.join("training").join(class).join(format!("{i}.{ext}")),
                    ci as u8,
                );
            }
            write_image(&root.join("val").join(class).join("v.jpeg"), 9);
        }
        std::fs::write(root.join("training/apple/notes.txt"), "not an image").unwrap();
        write_image(&root.join("test/mango/t.png"), 3);
        let ds = open_folder_split(root).unwrap();
        assert_eq!(ds.classes, ["apple", "mango", "zebra"]);
        assert_eq!(ds.layout, Layout::FolderSplit);
        assert_eq!(ds.train.len(), 12);
        assert_eq!(ds.class_counts(&ds.train), [4, 4, 4]);
        assert_eq!(ds.val.len(), 3);
        assert_eq!(names(ds.test.as_ref().unwrap()), [("t.png".to_string(), 1)]);
        assert!(ds
            .train
            .iter()
            .all(|s| s.path_or_id.contains(&ds.classes[s.label])));

        // A validation class unknown to training is an error naming the folder.
        write_image(&root.join("val/kiwi/k.png"), 1);
        let err = open_folder_split(root).unwrap_err().to_string();
        assert!(err.contains("kiwi"), "{err}");
        std::fs::remove_dir_all(root.join("val/kiwi")).unwrap();

        // An empty training class is an error naming it.
        std::fs::create_dir_all(root.join("training/empty")).unwrap();
        let err = open_folder_split(root).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("no images"), "{err}");
    }

    #[test]
    fn unsplit_folder_gets_a_deterministic_stratified_split() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (ci, class) in ["b", "a", "c"].iter().enumerate() {
            for i in 0..(5 + ci * 5) {
                write_image(&root.join(class).join(format!("{i:02}.png")), ci as u8);
            }
        }
        let ds = open_folder_unsplit(root, 42, 0.2).unwrap();
        assert_eq!(ds.classes, ["a", "b", "c"]);
        // a: 10 images, b: 5, c: 15 -> 20% held out per class.
        assert_eq!(ds.class_counts(&ds.val), [2, 1, 3]);
        assert_eq!(ds.class_counts(&ds.train), [8, 4, 12]);
        assert!(ds.test.is_none());

        let again = open_folder_unsplit(root, 42, 0.2).unwrap();
        assert_eq!(names(&ds.val), names(&again.val));
        assert_eq!(names(&ds.train), names(&again.train));
        // Train and val are disjoint and cover everything.
        let mut all: Vec<String> = ds
            .train
            .iter()
            .chain(&ds.val)
            .map(|s| s.path_or_id.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 30);

        // Another seed picks (with overwhelming probability) a different validation set.
        let other = open_folder_unsplit(root, 43, 0.2).unwrap();
        assert_ne!(names(&ds.val), names(&other.val));
        assert_eq!(other.class_counts(&other.val), [2, 1, 3]);
    }

    #[test]
    fn stratified_split_edge_cases() {
        let (t, v) = stratified_split(vec![vec![1], vec![1, 2], vec![]], 0.2, 0);
        assert_eq!(v, [vec![], vec![v[1][0]], vec![]]);
        assert_eq!(t[0], [1]);
        assert_eq!(t[1].len(), 1);
        assert!(t[2].is_empty());
    }

    #[test]
    fn empty_class_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("a/1.png"), 0);
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        let err = open_folder_unsplit(dir.path(), 0, 0.2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/b") && err.contains("no images"), "{err}");
    }
}
