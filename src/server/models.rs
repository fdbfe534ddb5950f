//! The served models: discovery under `--models`, loading, warm-up, and lookup by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::Device;

use super::shadow::Shadow;
use super::{Config, ServerError};
use crate::backend::Executor;
use crate::batcher::{Batcher, BatcherConfig};
use crate::error::Error;
use crate::formats::model_dir::{self, LoadedModel, ModelConfig};
use crate::telemetry::{ModelInfoLabels, ModelMetrics, ModelStats};

/// One model as the APIs see it.
#[derive(Debug)]
pub struct ServedModel {
    pub name: String,
    /// Content hash of the weight file: changes whenever the weights do.
    pub version: String,
    pub config: ModelConfig,
    pub parameters: u64,
    pub file_bytes: u64,
    /// Forward multiply-accumulates per image.
    pub macs: u64,
    pub batcher: Batcher,
    pub metrics: ModelMetrics,
    pub stats: Arc<ModelStats>,
    /// Where `--shadow` mirrors this model's inputs; set once, after every model is built.
    pub shadow: OnceLock<Arc<Shadow>>,
}

impl ServedModel {
    pub fn input_size(&self) -> usize {
        self.config.spec.input_size
    }

    pub fn num_classes(&self) -> usize {
        self.config.spec.num_classes
    }

    /// Floats in one CHW input.
    pub fn input_len(&self) -> usize {
        3 * self.input_size() * self.input_size()
    }

    pub fn max_batch_size(&self) -> usize {
        self.batcher.config().max_batch_size
    }

    /// Accepts the empty version or this model's.
    pub fn check_version(&self, version: &str) -> Result<(), Error> {
        if version.is_empty() || version == self.version {
            Ok(())
        } else {
            Err(Error::VersionNotFound {
                model: self.name.clone(),
                version: version.to_string(),
                serving: self.version.clone(),
            })
        }
    }
}

/// Every served model, by name.
#[derive(Debug, Default)]
pub struct Models {
    by_name: BTreeMap<String, Arc<ServedModel>>,
    default: Option<String>,
}

impl Models {
    /// The named model; the empty name means the default model.
    pub fn get(&self, name: &str) -> Result<&Arc<ServedModel>, Error> {
        let name = if name.is_empty() {
            self.default.as_deref().ok_or(Error::NoModels)?
        } else {
            name
        };
        self.by_name.get(name).ok_or_else(|| Error::ModelNotFound {
            name: name.to_string(),
            available: if self.by_name.is_empty() {
                "no models".into()
            } else {
                self.by_name
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn default_name(&self) -> Option<&str> {
        self.default.as_deref()
    }
}

/// Model directories under `root`, sorted by name (hidden entries skipped). A missing root
/// is an empty list: the server starts and says so.
pub fn discover(root: &Path) -> Result<Vec<PathBuf>, ServerError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ServerError::ModelsDir {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ServerError::ModelsDir {
            path: root.to_path_buf(),
            source,
        })?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.path().is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Reads every model directory (blocking: run it off the runtime). Bad models stop start-up
/// with an error naming the file, or are logged and skipped with `--skip-bad-models`.
pub fn load_all(config: &Config) -> Result<Vec<(LoadedModel, String)>, ServerError> {
    let mut loaded = Vec::new();
    for dir in discover(&config.models)? {
        let result = model_dir::load(&dir).and_then(|m| {
            let path = m.weights_path();
            let bytes = std::fs::read(&path).map_err(|source| model_dir::ModelDirError::Io {
                path: path.clone(),
                source,
            })?;
            Ok((m, version_of(&bytes)))
        });
        match result {
            Ok(model) => loaded.push(model),
            Err(e) if config.skip_bad_models => {
                tracing::warn!("skipping model {}: {e}", dir.display());
            }
            Err(source) => return Err(ServerError::Model { source }),
        }
    }
    Ok(loaded)
}

/// FNV-1a 64 of the weight bytes, in hex: a stable content version.
fn version_of(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Builds each model on `device`, starts its executor, warms it up with one forward pass,
/// and starts its batcher.
pub async fn start(
    loaded: Vec<(LoadedModel, String)>,
    config: &Config,
    device: &Device,
) -> Result<Models, ServerError> {
    let batching = BatcherConfig {
        max_batch_size: config.max_batch_size as usize,
        max_batch_delay: config.max_batch_delay,
        queue_capacity: config.max_queue_size,
        max_in_flight: config.max_in_flight,
    };
    let mut by_name = BTreeMap::new();
    for (model, version) in loaded {
        let name = model.name();
        let built = model
            .build(device)
            .map_err(|source| ServerError::Model { source })?;
        let macs = built.macs();
        let executor = Executor::spawn(&name, built, device.clone(), config.inject_compute_delay)
            .map_err(ServerError::Thread)?;
        let s = model.config.spec.input_size;
        let warm =
            executor
                .run(vec![0.0; 3 * s * s], 1)
                .await
                .map_err(|e| ServerError::Warmup {
                    model: name.clone(),
                    message: e.to_string(),
                })?;
        let metrics = ModelMetrics::new(&name);
        metrics.set_info(&ModelInfoLabels {
            version: version.clone(),
            architecture: model.config.spec.arch.to_string(),
            format: model.config.weights.format.to_string(),
            parameters: model.param_count() as u64,
            file_bytes: model.file_bytes,
            input_size: s,
            device: config.device.to_string(),
            engine: executor.engine().to_string(),
        });
        let stats = Arc::new(ModelStats::default());
        let engine = executor.engine();
        let batcher = Batcher::spawn(executor, batching, metrics.clone(), stats.clone());
        tracing::info!(
            "model {name}: {} {}x{}, {} params, {} weights ({} bytes), version {version}, {} engine, warm-up {:.1} ms",
            model.config.spec.arch,
            s,
            s,
            model.param_count(),
            model.config.weights.format,
            model.file_bytes,
            engine,
            warm.compute.as_secs_f64() * 1e3
        );
        by_name.insert(
            name.clone(),
            Arc::new(ServedModel {
                name,
                version,
                parameters: model.param_count() as u64,
                file_bytes: model.file_bytes,
                macs,
                config: model.config,
                batcher,
                metrics,
                stats,
                shadow: OnceLock::new(),
            }),
        );
    }
    let default = match &config.default_model {
        Some(name) if !by_name.contains_key(name) => {
            return Err(ServerError::DefaultModel {
                name: name.clone(),
                available: by_name.keys().cloned().collect::<Vec<_>>().join(", "),
            })
        }
        Some(name) => Some(name.clone()),
        None => by_name.keys().next().cloned(),
    };
    attach_shadows(&by_name, config)?;
    Ok(Models { by_name, default })
}

/// Connects each `--shadow` rule's source to its target, refusing rules that name a model not
/// served, give one source two targets, or pair models whose inputs or labels differ.
fn attach_shadows(
    by_name: &BTreeMap<String, Arc<ServedModel>>,
    config: &Config,
) -> Result<(), ServerError> {
    for rule in &config.shadow {
        let fail = |message: String| ServerError::Shadow {
            rule: format!("{}={}:{}", rule.source, rule.target, rule.fraction),
            message,
        };
        let served = |name: &str| {
            by_name.get(name).ok_or_else(|| {
                fail(format!(
                    "no model named `{name}` is served ({})",
                    by_name.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })
        };
        let (source, target) = (served(&rule.source)?, served(&rule.target)?);
        if let Some(existing) = source.shadow.get().and_then(|s| s.target_name()) {
            return Err(fail(format!(
                "`{}` already mirrors to `{existing}`; give each source one --shadow rule",
                source.name
            )));
        }
        if source.input_size() != target.input_size() {
            return Err(fail(format!(
                "`{}` takes {}x{} inputs but `{}` takes {}x{}",
                source.name,
                source.input_size(),
                source.input_size(),
                target.name,
                target.input_size(),
                target.input_size()
            )));
        }
        if source.config.labels != target.config.labels {
            return Err(fail(format!(
                "`{}` and `{}` have different labels, so their answers cannot be compared",
                source.name, target.name
            )));
        }
        let shadow = Arc::new(Shadow::new(&source.name, target, rule.fraction));
        source
            .shadow
            .set(shadow)
            .expect("checked above: no shadow yet");
        tracing::info!(
            "shadow: {:.1}% of {}'s inputs are mirrored to {}",
            rule.fraction * 100.0,
            source.name,
            target.name
        );
    }
    Ok(())
}
