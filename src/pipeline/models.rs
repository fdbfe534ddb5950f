//! The served models: loading one model version (its weight file read once, the model built
//! once on its device, warmed up, registered with the shared scheduler), the immutable set of
//! served versions that requests resolve against ([`Models`], swapped whole by the
//! [`super::repository::Repository`]), and lookup by name and version.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::shadow::{Shadow, ShadowRule};
use crate::backend::Backend;
use crate::error::Error;
use crate::formats::model_dir::{self, ModelConfig, ModelDirError};
use crate::scheduler::{BatcherConfig, ModelQueue, Scheduler};
use crate::telemetry::{ModelInfoLabels, ModelMetrics, ModelStats};

/// The version a flat model directory is served as (Triton's layout numbers versions from 1).
pub const FLAT_VERSION: u64 = 1;

/// One model as the APIs see it.
#[derive(Debug)]
pub struct ServedModel {
    pub name: String,
    /// The served version: a positive integer in decimal, as Triton's clients (perf_analyzer
    /// parses it as a number) and the KServe v2 protocol expect. A flat model directory
    /// (`models/NAME/config.json`) is version 1; `models/NAME/N/` is version N.
    pub version: String,
    /// Content hash of the weight file (FNV-1a 64, hex): changes whenever the weights do.
    pub digest: String,
    pub config: ModelConfig,
    pub parameters: u64,
    pub file_bytes: u64,
    /// Forward multiply-accumulates per image.
    pub macs: u64,
    /// `fused` (compiled CPU engine) or `candle`.
    pub engine: &'static str,
    pub queue: ModelQueue,
    pub metrics: ModelMetrics,
    pub stats: Arc<ModelStats>,
    /// The `slimserve_model_info` series, set to 0 when this version is dropped.
    info: metrics::Gauge,
}

impl Drop for ServedModel {
    /// Runs when the last holder lets go: the served set no longer lists this version and every
    /// request that resolved to it has its answer (each holds it until then).
    fn drop(&mut self) {
        self.queue.retire();
        self.info.set(0.0);
        crate::backend::release_memory();
        tracing::info!("model {} version {}: unloaded", self.name, self.version);
    }
}

impl ServedModel {
    pub fn input_size(&self) -> usize {
        self.config.spec.input_size
    }

    pub fn num_classes(&self) -> usize {
        self.config.spec.num_classes
    }

    pub fn max_batch_size(&self) -> usize {
        self.queue.config().max_batch_size
    }
}

/// Every served model version, by name and version, with the shadow rules between models: one
/// immutable snapshot. Requests resolve against the snapshot current when they arrive and hold
/// the version they got until answered; the repository publishes a new snapshot to swap.
#[derive(Debug, Default, Clone)]
pub struct Models {
    pub(super) by_name: BTreeMap<String, BTreeMap<u64, Arc<ServedModel>>>,
    pub(super) default: Option<String>,
    /// Source model name -> its mirror.
    pub(super) shadows: Arc<HashMap<String, Shadow>>,
}

impl Models {
    /// The named model's newest served version; the empty name means the default model.
    pub fn get(&self, name: &str) -> Result<&Arc<ServedModel>, Error> {
        self.get_version(name, "")
    }

    /// The named model at `version` (decimal), or its newest served version when `version` is
    /// empty; the empty name means the default model.
    pub fn get_version(&self, name: &str, version: &str) -> Result<&Arc<ServedModel>, Error> {
        let versions = self.versions(name)?;
        let found = if version.is_empty() {
            versions.values().next_back()
        } else {
            version.parse::<u64>().ok().and_then(|v| versions.get(&v))
        };
        found.ok_or_else(|| Error::VersionNotFound {
            model: self.resolve(name).unwrap_or(name).to_string(),
            version: version.to_string(),
            serving: if versions.is_empty() {
                "none".into()
            } else {
                versions
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Result<&'a str, Error> {
        if name.is_empty() {
            self.default.as_deref().ok_or(Error::NoModels)
        } else {
            Ok(name)
        }
    }

    /// Every served version of the named model (the empty name: the default model), oldest
    /// first.
    pub fn versions(&self, name: &str) -> Result<&BTreeMap<u64, Arc<ServedModel>>, Error> {
        let name = self.resolve(name)?;
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

    /// Every served version of every model, by name then version.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.by_name.values().flat_map(|v| v.values())
    }

    /// Names of the models with at least one version served.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// How many models (not versions) are served.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn default_name(&self) -> Option<&str> {
        self.default.as_deref()
    }

    /// The mirror of `source`'s inputs, if a `--shadow` rule names it.
    pub fn shadow(&self, source: &str) -> Option<&Shadow> {
        self.shadows.get(source)
    }
}

/// Why the models could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the model directory {}: {source}", path.display())]
    ModelsDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model failed to load: {source} (start with --skip-bad-models to serve the others)")]
    Model { source: ModelDirError },
    #[error("model {model} failed its warm-up forward pass: {message}")]
    Warmup { model: String, message: String },
    #[error("--default-model {name} is not among the loaded models ({available})")]
    DefaultModel { name: String, available: String },
    #[error("--shadow {rule}: {message}")]
    Shadow { rule: String, message: String },
    /// A model directory whose layout or version policy cannot be served.
    #[error("{problem} (start with --skip-bad-models to serve the others)")]
    Layout { problem: String },
}

/// What loading needs to know.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dir: PathBuf,
    pub skip_bad_models: bool,
    pub default_model: Option<String>,
    pub shadows: Vec<ShadowRule>,
    pub batching: BatcherConfig,
    /// Label of the device in `slimserve_model_info` (e.g. `cpu`, `cuda:0`).
    pub device_label: String,
    /// Which engine computes int8 model directories on the CPU (`--int8-engine`).
    pub int8_engine: Int8Engine,
}

/// Which engine computes an int8 model directory on the CPU (`slimserve serve --int8-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Int8Engine {
    /// The int8 engine where this CPU has its fast kernels (AVX-512 VNNI), else `f32`: without
    /// VNNI the int8 kernels (AVX2 `vpmaddwd`, portable) are slower than the fused f32 engine
    /// on the same weights (about 2x on the shipped kd and big; BENCHMARKS.md).
    #[default]
    Auto,
    /// Always the int8 engine (integer activations and sums, on whatever kernel set the CPU
    /// has): to profile it, or where its numerics must match another int8 runtime.
    Int8,
    /// The fused f32 engine on the dequantized int8 weights (f32 activations).
    F32,
}

impl Int8Engine {
    /// Whether an int8 model computes in int8 on a CPU whose best int8 kernel set is `isa`.
    pub fn computes_in_int8(self, isa: crate::infer::int8::Int8Isa) -> bool {
        match self {
            Int8Engine::Auto => isa == crate::infer::int8::Int8Isa::Avx512Vnni,
            Int8Engine::Int8 => true,
            Int8Engine::F32 => false,
        }
    }
}

/// Model directories under `root`, sorted by name (hidden entries skipped). A missing root
/// is an empty list: the server starts and says so.
pub fn discover(root: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LoadError::ModelsDir {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LoadError::ModelsDir {
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

/// Reads version `version` of model `name` from `dir` (`config.json` + weights), builds it on
/// `device`, warms it up at every batch size it will run, and registers its queue with the
/// scheduler (blocking: run it off the runtime). Nothing is served until the caller publishes
/// it in a [`Models`] snapshot; if the caller drops it instead, its queue is retired.
pub fn load_version(
    dir: &Path,
    name: &str,
    version: u64,
    options: &LoadOptions,
    device: &Device,
    scheduler: &Scheduler,
) -> Result<ServedModel, LoadError> {
    let model = model_dir::read(dir).map_err(|source| LoadError::Model { source })?;
    let name = name.to_string();
    let built = model
        .build(device)
        .map_err(|source| LoadError::Model { source })?;
    let macs = built.macs();
    let warmup_error = |message: String| LoadError::Warmup {
        model: name.clone(),
        message,
    };
    let isa = crate::infer::int8::Int8Isa::detect();
    let backend = match &model.calibration {
        // An int8 model computes in int8 on the CPU where that is the faster engine (or where
        // --int8-engine says so); otherwise, and on a GPU, its dequantized weights take the
        // f32 path like any other model.
        Some(ranges) if device.is_cpu() && options.int8_engine.computes_in_int8(isa) => {
            Backend::new_int8(built, ranges, &model.config.preprocessing)
                .map_err(|e| warmup_error(format!("int8 engine: {e}")))?
        }
        calibration => {
            if calibration.is_some() && device.is_cpu() {
                match options.int8_engine {
                    Int8Engine::F32 => tracing::info!(
                        "model {name} version {version}: int8 weights computed by the f32 \
                         engine (--int8-engine f32)"
                    ),
                    _ => tracing::warn!(
                        "model {name} version {version}: int8 weights computed by the f32 \
                         engine (--int8-engine auto: this CPU's int8 kernels are {}, not \
                         AVX-512 VNNI, and slower than f32 here; --int8-engine int8 forces them)",
                        isa.name()
                    ),
                }
            }
            Backend::new(built, device.clone(), &model.config.preprocessing)
                .map_err(|e| warmup_error(e.to_string()))?
        }
    };
    let warm = backend
        .warm_up(options.batching.max_batch_size)
        .map_err(warmup_error)?;
    // Fault injection (`--inject-compute-delay`): the warm-up is a batch too, so loading takes
    // at least that long (what tests of the loading state rely on).
    std::thread::sleep(scheduler.compute_delay());
    let s = model.config.spec.input_size;
    let version_str = version.to_string();
    let metrics = ModelMetrics::new(&name, &version_str);
    let engine = backend.engine();
    let info = metrics.set_info(&ModelInfoLabels {
        digest: model.digest.clone(),
        architecture: model.config.spec.arch.to_string(),
        format: model.config.weights.format.to_string(),
        parameters: model.param_count() as u64,
        file_bytes: model.file_bytes,
        input_size: s,
        device: options.device_label.clone(),
        engine: engine.to_string(),
    });
    let stats = Arc::new(ModelStats::default());
    let queue = scheduler.add_model(
        Arc::new(backend),
        options.batching,
        metrics.clone(),
        stats.clone(),
    );
    tracing::info!(
        "model {name} version {version}: {} {s}x{s}, {} params, {} weights ({} bytes, digest {}), {engine} engine, warm-up {:.1} ms",
        model.config.spec.arch,
        model.param_count(),
        model.config.weights.format,
        model.file_bytes,
        model.digest,
        warm.as_secs_f64() * 1e3
    );
    Ok(ServedModel {
        name,
        version: version_str,
        digest: model.digest.clone(),
        parameters: model.param_count() as u64,
        file_bytes: model.file_bytes,
        macs,
        engine,
        config: model.config,
        queue,
        metrics,
        stats,
        info,
    })
}

/// Checks each `--shadow` rule, refusing rules that name a model not served, give one
/// source two targets, or pair models whose inputs or labels differ.
pub(super) fn shadows(
    models: &Models,
    rules: &[ShadowRule],
) -> Result<HashMap<String, Shadow>, LoadError> {
    let mut out: HashMap<String, Shadow> = HashMap::new();
    for rule in rules {
        let fail = |message: String| LoadError::Shadow {
            rule: format!("{}={}:{}", rule.source, rule.target, rule.fraction),
            message,
        };
        let served = |name: &str| {
            models.get(name).map_err(|_| {
                fail(format!(
                    "no model named `{name}` is served ({})",
                    models.names().collect::<Vec<_>>().join(", ")
                ))
            })
        };
        let (source, target) = (served(&rule.source)?, served(&rule.target)?);
        if let Some(existing) = out.get(&source.name) {
            return Err(fail(format!(
                "`{}` already mirrors to `{}`; give each source one --shadow rule",
                source.name, existing.target
            )));
        }
        if source.config.labels != target.config.labels {
            return Err(fail(format!(
                "`{}` and `{}` have different labels, so their answers cannot be compared",
                source.name, target.name
            )));
        }
        tracing::info!(
            "shadow: {:.1}% of {}'s inputs are mirrored to {}",
            rule.fraction * 100.0,
            source.name,
            target.name
        );
        out.insert(
            source.name.clone(),
            Shadow::new(&source.name, &target.name, rule.fraction),
        );
    }
    Ok(out)
}
