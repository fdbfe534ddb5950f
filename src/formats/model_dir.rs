//! The model directory: `config.json` + `model.safetensors`.
//!
//! `config.json` records everything needed to rebuild and serve the model: the architecture
//! spec, class labels, preprocessing, the weight encoding, and provenance (dataset, epochs,
//! validation accuracy). Both files are written to a temporary file in the same directory and
//! renamed into place, so a crash never leaves a half-written model behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::weights::{self, CodecError, WeightFormat};
use crate::preprocess::Preprocessing;
use crate::zoo::{self, Model, ModelSpec, ZooError};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Bumped when `config.json` changes incompatibly.
pub const CONFIG_VERSION: u32 = 1;

/// Food-11's class names, in label order (SPEC.md).
pub const FOOD11_LABELS: [&str; 11] = [
    "bread",
    "dairy product",
    "dessert",
    "egg",
    "fried food",
    "meat",
    "noodles/pasta",
    "rice",
    "seafood",
    "soup",
    "vegetable/fruit",
];

/// Where a model came from and how good it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_seen: Option<u64>,
    /// Top-1 accuracy on the validation (or test) split named in `dataset`, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_images: Option<usize>,
    /// Teacher model directory for distilled models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// The file or model this one was derived from (import, quantization, pruning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The command line that produced the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Licence of the source weights (e.g. `MIT`), for imported and derived models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsInfo {
    pub file: String,
    pub format: WeightFormat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub config_version: u32,
    #[serde(flatten)]
    pub spec: ModelSpec,
    pub labels: Vec<String>,
    pub preprocessing: Preprocessing,
    pub weights: WeightsInfo,
    #[serde(default)]
    pub provenance: Provenance,
}

impl ModelConfig {
    /// A config with default preprocessing for the spec's input size and f32 weights.
    pub fn new(spec: ModelSpec, labels: Vec<String>) -> Self {
        let preprocessing = Preprocessing::for_input(spec.input_size);
        Self {
            config_version: CONFIG_VERSION,
            spec,
            labels,
            preprocessing,
            weights: WeightsInfo {
                file: WEIGHTS_FILE.into(),
                format: WeightFormat::F32,
            },
            provenance: Provenance::default(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.config_version != CONFIG_VERSION {
            return Err(format!(
                "config_version {} is not supported (this build reads {CONFIG_VERSION})",
                self.config_version
            ));
        }
        self.spec.validate().map_err(|e| e.to_string())?;
        if self.labels.len() != self.spec.num_classes {
            return Err(format!(
                "{} labels for {} classes",
                self.labels.len(),
                self.spec.num_classes
            ));
        }
        if self.preprocessing.crop != self.spec.input_size {
            return Err(format!(
                "preprocessing crops to {} but the model's input size is {}",
                self.preprocessing.crop, self.spec.input_size
            ));
        }
        let f = &self.weights.file;
        if f.is_empty() || f.contains('/') || f.contains('\\') || f == ".." {
            return Err(format!(
                "weights.file `{f}` must be a plain file name in the model directory"
            ));
        }
        Ok(())
    }
}

/// Default labels: Food-11's for 11 classes, `class_<i>` otherwise.
pub fn default_labels(num_classes: usize) -> Vec<String> {
    if num_classes == FOOD11_LABELS.len() {
        FOOD11_LABELS.iter().map(|s| s.to_string()).collect()
    } else {
        (0..num_classes).map(|i| format!("class_{i}")).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid model config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: {source}", path.display())]
    Weights { path: PathBuf, source: CodecError },
    #[error("{}: {source}", path.display())]
    Zoo { path: PathBuf, source: ZooError },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelDirError + '_ {
    move |source| ModelDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A model directory read from disk, weights decoded to f32 and checked against the spec.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, Tensor>,
    /// Size of the weight file as stored (what quantization saves).
    pub file_bytes: u64,
    /// Content hash of the weight file (FNV-1a 64, hex): changes whenever the weights do.
    /// Not the served version: that is a positive integer, as Triton's clients expect
    /// (a flat model directory is version 1).
    pub digest: String,
    /// The calibrated activation ranges of an int8 model (`(min, max)` of the input and of each
    /// layer's output), which its int8 engine quantizes with; `None` for every other format.
    pub calibration: Option<Vec<(f32, f32)>>,
}

impl LoadedModel {
    /// Builds the layers on `device`.
    pub fn build(&self, device: &Device) -> Result<Model, ModelDirError> {
        Model::from_tensors(&self.config.spec, &self.tensors, device).map_err(|source| {
            ModelDirError::Zoo {
                path: self.weights_path(),
                source,
            }
        })
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(&self.config.weights.file)
    }

    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Trainable parameters of the architecture.
    pub fn param_count(&self) -> usize {
        self.tensors
            .iter()
            .filter(|(k, _)| !zoo::is_running_stat(k))
            .map(|(_, t)| t.elem_count())
            .sum()
    }
}

pub fn read_config(dir: &Path) -> Result<ModelConfig, ModelDirError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    parse_config(&path, &bytes)
}

/// Parses and validates the bytes of a `config.json` (`path` names it in errors).
pub fn parse_config(path: &Path, bytes: &[u8]) -> Result<ModelConfig, ModelDirError> {
    let config: ModelConfig = serde_json::from_slice(bytes).map_err(|e| ModelDirError::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    config.validate().map_err(|msg| ModelDirError::Config {
        path: path.to_path_buf(),
        msg,
    })?;
    Ok(config)
}

/// Reads and validates a model directory; quantized weights are dequantized here, once.
pub fn load(dir: &Path) -> Result<LoadedModel, ModelDirError> {
    let loaded = read(dir)?;
    // Building checks every key and shape against the architecture before anyone uses it.
    loaded.build(&Device::Cpu)?;
    Ok(loaded)
}

/// Reads a model directory (config and weights, dequantized) without building the model:
/// for callers that build it themselves, once, on their device.
pub fn read(dir: &Path) -> Result<LoadedModel, ModelDirError> {
    let config = read_config(dir)?;
    let path = dir.join(&config.weights.file);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    from_parts(dir, config, &bytes)
}

/// A model directory whose files are already in memory: `config` (validated) and the bytes of
/// its weight file, decoded (and dequantized) and checked against `config.weights.format`.
/// Errors name the files as they would be in `dir`.
pub fn from_parts(
    dir: &Path,
    config: ModelConfig,
    bytes: &[u8],
) -> Result<LoadedModel, ModelDirError> {
    let path = dir.join(&config.weights.file);
    let (format, mut tensors) =
        weights::decode(bytes).map_err(|source| ModelDirError::Weights {
            path: path.clone(),
            source,
        })?;
    let calibration = match tensors.remove(weights::ACTIVATION_RANGES_KEY) {
        Some(t) => {
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| ModelDirError::Zoo {
                    path: path.clone(),
                    source: e.into(),
                })?;
            Some(v.chunks_exact(2).map(|p| (p[0], p[1])).collect())
        }
        None => None,
    };
    if format != config.weights.format {
        return Err(ModelDirError::Config {
            path: dir.join(CONFIG_FILE),
            msg: format!(
                "weights.format is {} but {} holds {format} weights",
                config.weights.format,
                path.display()
            ),
        });
    }
    Ok(LoadedModel {
        dir: dir.to_path_buf(),
        config,
        tensors,
        file_bytes: bytes.len() as u64,
        digest: format!("{:016x}", crate::fnv1a64(bytes)),
        calibration,
    })
}

/// Encodes `tensors` in `config.weights.format` and writes the directory atomically.
/// Returns the weight file's size in bytes.
pub fn save(
    dir: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<u64, ModelDirError> {
    let config_path = dir.join(CONFIG_FILE);
    config.validate().map_err(|msg| ModelDirError::Config {
        path: config_path.clone(),
        msg,
    })?;
    let weights_path = dir.join(&config.weights.file);
    let cpu: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| !k.ends_with(".num_batches_tracked"))
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| ModelDirError::Zoo {
            path: weights_path.clone(),
            source: e.into(),
        })?;
    let mut layers = cpu.clone();
    layers.remove(weights::ACTIVATION_RANGES_KEY);
    Model::from_tensors(&config.spec, &layers, &Device::Cpu).map_err(|source| {
        ModelDirError::Zoo {
            path: weights_path.clone(),
            source,
        }
    })?;
    let bytes =
        weights::encode(&cpu, config.weights.format).map_err(|source| ModelDirError::Weights {
            path: weights_path.clone(),
            source,
        })?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_atomic(&weights_path, &bytes)?;
    let mut json = serde_json::to_vec_pretty(config).expect("config serialises");
    json.push(b'\n');
    write_atomic(&config_path, &json)?;
    Ok(bytes.len() as u64)
}

/// Writes `bytes` to a temporary sibling, syncs it and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelDirError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::Arch;

    fn sample(format: WeightFormat) -> (ModelConfig, BTreeMap<String, Tensor>) {
        let spec = ModelSpec::new(Arch::Student, 3, 32);
        let (varmap, _) = Model::init(&spec, &Device::Cpu).unwrap();
        let mut config = ModelConfig::new(spec, default_labels(3));
        config.weights.format = format;
        config.provenance.val_accuracy = Some(0.5);
        (config, crate::zoo::varmap_tensors(&varmap))
    }

    #[test]
    fn round_trip_every_format() {
        for format in WeightFormat::ALL {
            let dir = tempfile::tempdir().unwrap();
            let (config, mut tensors) = sample(format);
            let ranges = [(-2.0f32, 2.5f32), (0.0, 6.0)];
            if format == WeightFormat::Int8 {
                let flat: Vec<f32> = ranges.iter().flat_map(|r| [r.0, r.1]).collect();
                tensors.insert(
                    weights::ACTIVATION_RANGES_KEY.into(),
                    Tensor::from_vec(flat, (2, 2), &Device::Cpu).unwrap(),
                );
            }
            let bytes = save(dir.path(), &config, &tensors).unwrap();
            let loaded = load(dir.path()).unwrap();
            assert_eq!(loaded.config, config, "{format}");
            assert_eq!(loaded.file_bytes, bytes);
            // The ranges come back as the calibration, not as a layer's tensor.
            if format == WeightFormat::Int8 {
                assert_eq!(loaded.calibration.as_deref(), Some(&ranges[..]));
                tensors.remove(weights::ACTIVATION_RANGES_KEY);
            } else {
                assert_eq!(loaded.calibration, None);
            }
            assert_eq!(loaded.tensors.len(), tensors.len());
            let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        }
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (config, tensors) = sample(WeightFormat::Uint8);
        save(dir.path(), &config, &tensors).unwrap();
        let weights = dir.path().join(WEIGHTS_FILE);
        let full = std::fs::read(&weights).unwrap();

        std::fs::write(&weights, &full[..full.len() / 2]).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");

        std::fs::write(&weights, b"").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");

        std::fs::write(&weights, &full).unwrap();
        let cfg = dir.path().join(CONFIG_FILE);
        let good = std::fs::read_to_string(&cfg).unwrap();
        let mut other = config.clone();
        other.spec.num_classes = 4;
        other.labels = default_labels(4);
        std::fs::write(&cfg, serde_json::to_vec(&other).unwrap()).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors")
                && err.contains("`fc.0.weight` has shape [3, 256], expected [4, 256]"),
            "{err}"
        );

        std::fs::write(&cfg, good.replace("\"uint8\"", "\"f32\"")).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("weights.format is f32"), "{err}");

        std::fs::write(&cfg, "{ not json").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("invalid model config"),
            "{err}"
        );

        std::fs::remove_file(&cfg).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn label_count_must_match_classes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, tensors) = sample(WeightFormat::F32);
        config.labels.pop();
        let err = save(dir.path(), &config, &tensors).unwrap_err().to_string();
        assert!(err.contains("2 labels for 3 classes"), "{err}");
        assert!(
            !dir.path().join(WEIGHTS_FILE).exists(),
            "nothing written on error"
        );
    }
}
