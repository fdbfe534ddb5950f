//! The model repository (`--models`): which models and versions are on disk, which are served,
//! and changing that while serving.
//!
//! Layout (Triton's): `NAME/N/` (N a positive integer, no leading zeros) each holding
//! `config.json` and its weight file, or flat `NAME/config.json` + weights, served as version 1.
//! `NAME/policy.json` (optional) chooses the versions served, in Triton's terms:
//! `{"latest": {"num_versions": 1}}` (the default), `{"all": {}}` or
//! `{"specific": {"versions": [1, 3]}}`.
//!
//! A pass ([`Repository::sync`]) compares the disk with what is served, model by model: each
//! wanted version is loaded, validated, compiled and warmed up beside the versions serving, then
//! the model's new set of versions is published in one atomic swap of the [`Models`] snapshot.
//! Requests already holding an old version finish on it; the old version is dropped (its queue
//! retired, its memory returned) when the last of them is answered.
//!
//! What is never served: a version whose files change while it loads (it is retried on the next
//! pass), a version that fails to load (reported in RepositoryIndex, the log and
//! `slimserve_model_loads_total{result="failure"}`; retried once its files change). `latest`
//! counts only versions that load, so a broken newest version leaves the one before it serving.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use serde::Deserialize;

use super::models::{self, discover, load_version, LoadError, LoadOptions, Models, ServedModel};
use super::shadow::Shadow;
use crate::error::Error;
use crate::formats::model_dir::CONFIG_FILE;
use crate::scheduler::Scheduler;

/// The optional per-model file choosing which versions are served.
pub const POLICY_FILE: &str = "policy.json";

/// How the set of served models may change after start-up (Triton's `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModelControl {
    /// Load every model at start-up; never change.
    #[default]
    None,
    /// Load every model at start-up, then rescan the repository every `--repository-poll-secs`
    /// and load, swap or unload what changed.
    Poll,
    /// Load the models named by `--load-model` at start-up; afterwards only KServe's
    /// RepositoryModelLoad / RepositoryModelUnload change what is served.
    Explicit,
}

/// Which versions of a model are served (`NAME/policy.json`, Triton's version policy).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    /// The `num_versions` highest-numbered versions that load.
    Latest { num_versions: usize },
    /// Every version that loads.
    All {},
    /// These versions (those that load).
    Specific { versions: Vec<u64> },
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest { num_versions: 1 }
    }
}

impl VersionPolicy {
    fn read(model_dir: &Path) -> Result<Self, String> {
        let path = model_dir.join(POLICY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let policy: VersionPolicy = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{}: {e} (expected {{\"latest\": {{\"num_versions\": N}}}}, {{\"all\": {{}}}} or {{\"specific\": {{\"versions\": [N, ...]}}}})",
                path.display()
            )
        })?;
        match &policy {
            VersionPolicy::Latest { num_versions: 0 } => Err(format!(
                "{}: num_versions must be at least 1",
                path.display()
            )),
            VersionPolicy::Specific { versions }
                if versions.is_empty() || versions.contains(&0) =>
            {
                Err(format!(
                    "{}: list one or more versions, each a positive integer",
                    path.display()
                ))
            }
            _ => Ok(policy),
        }
    }

    /// The versions to try, best first, and how many of them to serve.
    fn candidates(&self, on_disk: &BTreeMap<u64, PathBuf>) -> (Vec<u64>, usize) {
        let newest_first = on_disk.keys().rev().copied();
        match self {
            VersionPolicy::Latest { num_versions } => (newest_first.collect(), *num_versions),
            VersionPolicy::All {} => (newest_first.collect(), usize::MAX),
            VersionPolicy::Specific { versions } => (
                newest_first.filter(|v| versions.contains(v)).collect(),
                usize::MAX,
            ),
        }
    }
}

/// A version directory's identity for change detection: every file's name, size and
/// modification time. Publishing by rename (a new `N/` directory, or files renamed over the
/// old ones) changes it; so does a file still being written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(String, u64, Option<SystemTime>)>);

fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            files.push((
                entry.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ));
        }
    }
    files.sort();
    Ok(Fingerprint(files))
}

/// `N` in canonical decimal (no sign, no leading zeros), N >= 1.
fn version_number(name: &str) -> Option<u64> {
    let canonical =
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) && !name.starts_with('0');
    canonical.then(|| name.parse().ok()).flatten()
}

/// One model directory as found on disk.
#[derive(Debug)]
struct OnDisk {
    versions: BTreeMap<u64, PathBuf>,
    policy: Result<VersionPolicy, String>,
}

fn scan_model(dir: &Path) -> Result<OnDisk, String> {
    let mut versions = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(v) = version_number(&name).filter(|_| entry.path().is_dir()) {
            versions.insert(v, entry.path());
        }
    }
    // A flat model directory is version 1, unless a `1/` beside it says otherwise; later
    // versions can be added as `2/`, `3/`, ... without moving it.
    if dir.join(CONFIG_FILE).is_file() {
        versions
            .entry(models::FLAT_VERSION)
            .or_insert_with(|| dir.to_path_buf());
    }
    if versions.is_empty() {
        return Err(format!(
            "{} has neither {CONFIG_FILE} nor version directories ({}/1/{CONFIG_FILE})",
            dir.display(),
            dir.display()
        ));
    }
    Ok(OnDisk {
        versions,
        policy: VersionPolicy::read(dir),
    })
}

/// A version's state as RepositoryIndex reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionState {
    Loading,
    Ready,
    Unavailable(String),
}

impl VersionState {
    pub fn name(&self) -> &'static str {
        match self {
            VersionState::Loading => "LOADING",
            VersionState::Ready => "READY",
            VersionState::Unavailable(_) => "UNAVAILABLE",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            VersionState::Unavailable(reason) => reason,
            _ => "",
        }
    }
}

/// One line of RepositoryIndex: a model's version (`None`: the model as a whole, when no
/// version of it is tracked) and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<u64>,
    pub state: VersionState,
}

#[derive(Debug)]
struct Tracked {
    /// The files the state was reached with; `None` while unknown.
    fingerprint: Option<Fingerprint>,
    state: VersionState,
    /// These files failed to load: not retried until they change (or an explicit load).
    failed: bool,
}

#[derive(Debug, Default)]
struct ModelEntry {
    /// Explicit mode: loaded by `--load-model` or RepositoryModelLoad and not unloaded since.
    wanted: bool,
    /// Why the model as a whole cannot be served (no versions, a bad policy.json).
    problem: Option<String>,
    versions: BTreeMap<u64, Tracked>,
}

/// The repository, what is served from it, and the passes that change it.
#[derive(Debug)]
pub struct Repository {
    options: LoadOptions,
    control: ModelControl,
    device: Device,
    scheduler: Arc<Scheduler>,
    served: RwLock<Arc<Models>>,
    state: Mutex<BTreeMap<String, ModelEntry>>,
    /// One pass at a time.
    pass: Mutex<()>,
    shadows: OnceLock<Arc<HashMap<String, Shadow>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which models to load at start-up in explicit mode: the names given (`*` = every one).
#[derive(Debug, Clone, Default)]
pub struct StartupModels(pub Vec<String>);

impl StartupModels {
    fn includes(&self, name: &str) -> bool {
        self.0.iter().any(|n| n == "*" || n == name)
    }
}

impl Repository {
    /// Loads what the control mode serves at start-up (blocking: run it off the runtime). A
    /// model that fails stops start-up with an error naming its file, unless
    /// `--skip-bad-models` (then it is reported and skipped).
    pub fn start(
        options: LoadOptions,
        control: ModelControl,
        startup: &StartupModels,
        device: Device,
        scheduler: Arc<Scheduler>,
    ) -> Result<Arc<Self>, LoadError> {
        let repo = Arc::new(Self {
            options,
            control,
            device,
            scheduler,
            served: RwLock::new(Arc::new(Models::default())),
            state: Mutex::new(BTreeMap::new()),
            pass: Mutex::new(()),
            shadows: OnceLock::new(),
        });
        if control == ModelControl::Explicit {
            let mut state = lock(&repo.state);
            for dir in discover(&repo.options.dir)? {
                let name = dir_name(&dir);
                let wanted = startup.includes(&name);
                state.entry(name).or_default().wanted = wanted;
            }
        }
        let strict = !repo.options.skip_bad_models;
        repo.sync_inner(None, strict, false)?;
        let models = repo.snapshot();
        if let Some(name) = &repo.options.default_model {
            if models.versions(name).is_err() {
                return Err(LoadError::DefaultModel {
                    name: name.clone(),
                    available: models.names().collect::<Vec<_>>().join(", "),
                });
            }
        }
        let shadows = Arc::new(models::shadows(&models, &repo.options.shadows)?);
        let _ = repo.shadows.set(shadows.clone());
        repo.publish(|m| m.shadows = shadows);
        Ok(repo)
    }

    /// The served versions now. Cheap: a reference count.
    pub fn snapshot(&self) -> Arc<Models> {
        self.served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish(&self, change: impl FnOnce(&mut Models)) {
        let mut served = self.served.write().unwrap_or_else(|p| p.into_inner());
        let mut next = Models::clone(&served);
        change(&mut next);
        next.default = match &self.options.default_model {
            Some(name) if next.by_name.contains_key(name) => Some(name.clone()),
            Some(_) => None,
            None => next.by_name.keys().next().cloned(),
        };
        *served = Arc::new(next);
    }

    /// One pass over the whole repository (what `poll` runs). Failures are reported in the
    /// index, the log and the load counter; they never stop serving.
    pub fn sync(&self) {
        if let Err(e) = self.sync_inner(None, false, false) {
            tracing::warn!("model repository: {e}");
        }
    }

    /// Explicit mode: loads (or reloads) `name`'s versions per its policy. Errs when nothing of
    /// it could be served or a version it tried failed (versions already serving stay).
    pub fn load(&self, name: &str) -> Result<(), Error> {
        self.check_explicit("RepositoryModelLoad")?;
        let path = self.options.dir.join(name);
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') || !path.is_dir()
        {
            return Err(Error::ModelNotFound {
                name: name.to_string(),
                available: self.names_on_disk().join(", "),
            });
        }
        lock(&self.state)
            .entry(name.to_string())
            .or_default()
            .wanted = true;
        let failures = self
            .sync_inner(Some(name), false, true)
            .map_err(|e| Error::LoadFailed {
                model: name.to_string(),
                reason: e.to_string(),
            })?;
        let served = self.snapshot().versions(name).map(|v| v.len()).unwrap_or(0);
        if failures.is_empty() && served > 0 {
            return Ok(());
        }
        let state = lock(&self.state);
        let entry = state.get(name);
        let mut reasons: Vec<String> = failures;
        if let Some(problem) = entry.and_then(|e| e.problem.clone()) {
            reasons.push(problem);
        }
        if reasons.is_empty() {
            reasons.push("no version of it could be loaded".into());
        }
        let serving = if served > 0 {
            " (the versions served before keep serving)"
        } else {
            ""
        };
        Err(Error::LoadFailed {
            model: name.to_string(),
            reason: format!("{}{serving}", reasons.join("; ")),
        })
    }

    /// Explicit mode: stops serving every version of `name` (requests already holding one
    /// finish on it).
    pub fn unload(&self, name: &str) -> Result<(), Error> {
        self.check_explicit("RepositoryModelUnload")?;
        {
            let mut state = lock(&self.state);
            let known = state.contains_key(name) || self.snapshot().versions(name).is_ok();
            if !known || name.is_empty() {
                return Err(Error::ModelNotFound {
                    name: name.to_string(),
                    available: self.names_on_disk().join(", "),
                });
            }
            state.entry(name.to_string()).or_default().wanted = false;
        }
        self.sync_inner(Some(name), false, false)
            .map(drop)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    fn check_explicit(&self, rpc: &str) -> Result<(), Error> {
        if self.control == ModelControl::Explicit {
            Ok(())
        } else {
            Err(Error::ModelControl(format!(
                "{rpc} needs --model-control explicit; this server runs with --model-control {}",
                match self.control {
                    ModelControl::None => "none",
                    ModelControl::Poll => "poll (publish versions under --models instead)",
                    ModelControl::Explicit => "explicit",
                }
            )))
        }
    }

    fn names_on_disk(&self) -> Vec<String> {
        discover(&self.options.dir)
            .map(|dirs| dirs.iter().map(|d| dir_name(d)).collect())
            .unwrap_or_default()
    }

    /// Every model of the repository and of the served set, each tracked version with its
    /// state (`ready_only`: only READY versions).
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let state = lock(&self.state);
        let mut out = Vec::new();
        let mut names: Vec<String> = state.keys().cloned().collect();
        for name in self.names_on_disk() {
            if !state.contains_key(&name) {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let entry = state.get(&name);
            let versions: Vec<(u64, &VersionState)> = entry
                .map(|e| e.versions.iter().map(|(v, t)| (*v, &t.state)).collect())
                .unwrap_or_default();
            for (v, st) in &versions {
                if !ready_only || **st == VersionState::Ready {
                    out.push(IndexEntry {
                        name: name.clone(),
                        version: Some(*v),
                        state: (*st).clone(),
                    });
                }
            }
            if versions.is_empty() && !ready_only {
                let reason = match entry {
                    Some(e) if e.problem.is_some() => e.problem.clone().unwrap_or_default(),
                    _ if self.control == ModelControl::Explicit => "unloaded".into(),
                    _ => "not loaded".into(),
                };
                out.push(IndexEntry {
                    name,
                    version: None,
                    state: VersionState::Unavailable(reason),
                });
            }
        }
        out
    }

    /// Rescans every `every` until `stop` is set (poll mode), on a thread of its own.
    pub fn spawn_poller(
        self: &Arc<Self>,
        every: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let repo = self.clone();
        std::thread::Builder::new()
            .name("repository-poll".into())
            .spawn(move || {
                let tick = Duration::from_millis(100);
                let mut next = Instant::now() + every;
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        repo.sync();
                        // Freed memory (connections closed, answers sent, a swap's leftovers)
                        // goes back to the system between passes, so idle RSS comes down.
                        crate::backend::release_memory();
                        next = Instant::now() + every;
                    }
                    std::thread::sleep(tick);
                }
            })
    }

    /// One pass over `only` (or every model). Returns the reasons of the loads that failed;
    /// with `strict`, the first failure is returned as an error instead (start-up);
    /// `retry_failed` tries again files that failed before (an explicit load).
    fn sync_inner(
        &self,
        only: Option<&str>,
        strict: bool,
        retry_failed: bool,
    ) -> Result<Vec<String>, LoadError> {
        let _pass = lock(&self.pass);
        let on_disk: BTreeMap<String, PathBuf> = discover(&self.options.dir)?
            .into_iter()
            .map(|d| (dir_name(&d), d))
            .collect();
        let names: Vec<String> = match only {
            Some(name) => vec![name.to_string()],
            None => {
                let mut names: Vec<String> = on_disk.keys().cloned().collect();
                names.extend(self.snapshot().names().map(str::to_string));
                names.extend(lock(&self.state).keys().cloned());
                names.sort();
                names.dedup();
                names
            }
        };
        let mut failures = Vec::new();
        for name in names {
            self.sync_model(
                &name,
                on_disk.get(&name),
                strict,
                retry_failed,
                &mut failures,
            )?;
        }
        Ok(failures)
    }

    fn sync_model(
        &self,
        name: &str,
        dir: Option<&PathBuf>,
        strict: bool,
        retry_failed: bool,
        failures: &mut Vec<String>,
    ) -> Result<(), LoadError> {
        let served: BTreeMap<u64, Arc<ServedModel>> = self
            .snapshot()
            .by_name
            .get(name)
            .cloned()
            .unwrap_or_default();
        let wanted = self.control != ModelControl::Explicit
            || lock(&self.state).get(name).is_some_and(|e| e.wanted);
        let disk = match dir {
            Some(dir) if wanted => Some(scan_model(dir)),
            _ => None,
        };
        let mut keep: BTreeMap<u64, Arc<ServedModel>> = BTreeMap::new();
        match disk {
            None => {
                // Unloaded (explicit mode) or gone from disk: nothing of it is served.
                let mut state = lock(&self.state);
                if dir.is_none() && !served.is_empty() {
                    tracing::info!("model {name}: its directory is gone; unloading it");
                }
                match state.get_mut(name) {
                    Some(e) if dir.is_some() => {
                        e.versions.clear();
                        e.problem = None;
                    }
                    _ => {
                        state.remove(name);
                    }
                }
            }
            Some(Err(problem)) => {
                tracing::warn!("model {name}: {problem}");
                let mut state = lock(&self.state);
                let entry = state.entry(name.to_string()).or_default();
                entry.problem = Some(problem.clone());
                entry.versions.retain(|v, _| served.contains_key(v));
                failures.push(problem.clone());
                if strict {
                    return Err(LoadError::Layout { problem });
                }
                keep = served.clone();
            }
            Some(Ok(disk)) => {
                let policy = match disk.policy {
                    Ok(p) => {
                        lock(&self.state)
                            .entry(name.to_string())
                            .or_default()
                            .problem = None;
                        p
                    }
                    Err(problem) => {
                        // A policy that cannot be read changes nothing: what serves stays.
                        tracing::warn!("model {name}: {problem}");
                        lock(&self.state)
                            .entry(name.to_string())
                            .or_default()
                            .problem = Some(problem.clone());
                        failures.push(problem.clone());
                        if strict {
                            return Err(LoadError::Layout { problem });
                        }
                        return Ok(());
                    }
                };
                let (candidates, want) = policy.candidates(&disk.versions);
                for v in candidates {
                    if keep.len() >= want {
                        break;
                    }
                    let path = &disk.versions[&v];
                    match self.sync_version(name, v, path, served.get(&v), retry_failed) {
                        Ok(Some(model)) => {
                            keep.insert(v, model);
                        }
                        Ok(None) => {}
                        Err(failure) => {
                            let (reason, err) = *failure;
                            failures.push(format!("version {v}: {reason}"));
                            if strict {
                                return Err(err);
                            }
                            // The files now there failed; the version loaded from the files
                            // before them keeps serving.
                            if let Some(old) = served.get(&v) {
                                keep.insert(v, old.clone());
                            }
                        }
                    }
                }
                let mut state = lock(&self.state);
                let entry = state.entry(name.to_string()).or_default();
                // Versions no longer on disk are forgotten; served ones dropped below.
                entry
                    .versions
                    .retain(|v, _| disk.versions.contains_key(v) || keep.contains_key(v));
                for (v, tracked) in entry.versions.iter_mut() {
                    if tracked.state == VersionState::Ready && !keep.contains_key(v) {
                        tracked.state = VersionState::Unavailable("unloaded".into());
                    }
                }
            }
        }
        let unloaded: Vec<u64> = served
            .keys()
            .filter(|v| !keep.contains_key(v))
            .copied()
            .collect();
        let changed = !unloaded.is_empty()
            || keep.len() != served.len()
            || keep
                .iter()
                .any(|(v, m)| !served.get(v).is_some_and(|s| Arc::ptr_eq(s, m)));
        if changed {
            let count = keep.len();
            let shadows = self.shadows.get().cloned();
            self.publish(|m| {
                if keep.is_empty() {
                    m.by_name.remove(name);
                } else {
                    m.by_name.insert(name.to_string(), keep);
                }
                if let Some(shadows) = shadows {
                    m.shadows = shadows;
                }
            });
            for v in &unloaded {
                crate::telemetry::count_unload(name, *v);
                tracing::info!(
                    "model {name} version {v}: out of service (finishing the requests it holds)"
                );
            }
            crate::telemetry::set_versions_loaded(name, count);
        }
        Ok(())
    }

    /// Keeps, loads or skips one version. `Ok(None)`: not served this pass (it failed before
    /// with the same files, or its files changed while it loaded).
    fn sync_version(
        &self,
        name: &str,
        v: u64,
        path: &Path,
        serving: Option<&Arc<ServedModel>>,
        retry_failed: bool,
    ) -> Result<Option<Arc<ServedModel>>, Box<(String, LoadError)>> {
        let before = fingerprint(path).ok();
        let (same_files, failed) = {
            let state = lock(&self.state);
            state
                .get(name)
                .and_then(|e| e.versions.get(&v))
                .filter(|t| t.fingerprint.is_some() && t.fingerprint == before)
                .map_or((false, false), |t| (true, t.failed))
        };
        if same_files && (!failed || !retry_failed) {
            if let Some(model) = serving {
                // Unchanged and serving (or the files that replaced it failed: it keeps serving).
                return Ok(Some(model.clone()));
            }
            if failed {
                // Failed with these very files: wait for them to change.
                return Ok(None);
            }
        }
        self.track(name, v, None, VersionState::Loading, false);
        let started = Instant::now();
        let result = load_version(path, name, v, &self.options, &self.device, &self.scheduler);
        let took = started.elapsed();
        // Whatever the attempt read and built is freed by now unless it is about to serve:
        // give it back (a failed load frees no version, so nothing else would).
        if result.is_err() {
            crate::backend::release_memory();
        }
        let after = fingerprint(path).ok();
        if before != after {
            // Still being written: whatever was read is not served; the next pass retries.
            tracing::info!(
                "model {name} version {v}: files changed while loading; retrying on the next pass"
            );
            let state = match serving {
                Some(_) => VersionState::Ready,
                None => VersionState::Unavailable("files changed while loading".into()),
            };
            self.track(name, v, None, state, false);
            drop(result);
            crate::backend::release_memory();
            return Ok(serving.cloned());
        }
        crate::telemetry::count_load(name, v, result.is_ok(), took);
        match result {
            Ok(model) => {
                tracing::info!(
                    "model {name} version {v}: loaded in {:.0} ms{}",
                    took.as_secs_f64() * 1e3,
                    if serving.is_some() {
                        " (replaces the version serving)"
                    } else {
                        ""
                    }
                );
                self.track(name, v, after, VersionState::Ready, false);
                Ok(Some(Arc::new(model)))
            }
            Err(e) => {
                let reason = match &e {
                    LoadError::Model { source } => source.to_string(),
                    other => other.to_string(),
                };
                tracing::warn!("model {name} version {v}: failed to load: {reason}");
                let state = match serving {
                    // The old files' version keeps serving; the index says why the new failed.
                    Some(_) => VersionState::Unavailable(format!(
                        "new files failed to load ({reason}); the version loaded before keeps serving"
                    )),
                    None => VersionState::Unavailable(reason.clone()),
                };
                self.track(name, v, after, state, true);
                Err(Box::new((reason, e)))
            }
        }
    }

    fn track(
        &self,
        name: &str,
        v: u64,
        fingerprint: Option<Fingerprint>,
        state: VersionState,
        failed: bool,
    ) {
        let mut all = lock(&self.state);
        all.entry(name.to_string()).or_default().versions.insert(
            v,
            Tracked {
                fingerprint,
                state,
                failed,
            },
        );
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_directories_are_canonical_positive_integers() {
        assert_eq!(version_number("1"), Some(1));
        assert_eq!(version_number("42"), Some(42));
        for bad in [
            "0",
            "01",
            "-1",
            "+1",
            "1a",
            "",
            " 1",
            ".1",
            "99999999999999999999999",
        ] {
            assert_eq!(version_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn policies_parse_as_triton_writes_them_and_pick_versions() {
        let dir = tempfile::tempdir().unwrap();
        let disk: BTreeMap<u64, PathBuf> =
            [1, 2, 5].map(|v| (v, PathBuf::from(v.to_string()))).into();
        let read = |text: &str| {
            std::fs::write(dir.path().join(POLICY_FILE), text).unwrap();
            VersionPolicy::read(dir.path())
        };
        assert_eq!(
            VersionPolicy::read(dir.path()),
            Ok(VersionPolicy::Latest { num_versions: 1 }),
            "no policy.json: latest 1"
        );
        let latest2 = read(r#"{"latest": {"num_versions": 2}}"#).unwrap();
        assert_eq!(latest2.candidates(&disk), (vec![5, 2, 1], 2));
        let all = read(r#"{"all": {}}"#).unwrap();
        assert_eq!(all.candidates(&disk), (vec![5, 2, 1], usize::MAX));
        let specific = read(r#"{"specific": {"versions": [1, 5, 7]}}"#).unwrap();
        assert_eq!(specific.candidates(&disk), (vec![5, 1], usize::MAX));
        for bad in [
            r#"{"latest": {"num_versions": 0}}"#,
            r#"{"specific": {"versions": []}}"#,
            r#"{"newest": {}}"#,
            r#"{"latest": {"num_versions": 1, "extra": 2}}"#,
            "not json",
        ] {
            let err = read(bad).unwrap_err();
            assert!(err.contains(POLICY_FILE), "{bad}: {err}");
        }
    }

    #[test]
    fn layouts_flat_versioned_and_neither() {
        let root = tempfile::tempdir().unwrap();
        let flat = root.path().join("flat");
        std::fs::create_dir_all(&flat).unwrap();
        std::fs::write(flat.join(CONFIG_FILE), "{}").unwrap();
        assert_eq!(
            scan_model(&flat)
                .unwrap()
                .versions
                .keys()
                .collect::<Vec<_>>(),
            [&1]
        );
        let versioned = root.path().join("versioned");
        for v in ["1", "3", "07", ".4.tmp", "notes"] {
            std::fs::create_dir_all(versioned.join(v)).unwrap();
        }
        std::fs::write(versioned.join("10"), "a file, not a version").unwrap();
        assert_eq!(
            scan_model(&versioned)
                .unwrap()
                .versions
                .keys()
                .collect::<Vec<_>>(),
            [&1, &3]
        );
        let empty = root.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = scan_model(&empty).unwrap_err();
        assert!(
            err.contains("neither config.json nor version directories"),
            "{err}"
        );
    }

    #[test]
    fn fingerprint_changes_with_any_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "1").unwrap();
        let one = fingerprint(dir.path()).unwrap();
        assert_eq!(one, fingerprint(dir.path()).unwrap());
        std::fs::write(dir.path().join("a"), "12").unwrap();
        let two = fingerprint(dir.path()).unwrap();
        assert_ne!(one, two, "size changed");
        std::fs::write(dir.path().join("b"), "").unwrap();
        assert_ne!(two, fingerprint(dir.path()).unwrap(), "file added");
    }
}
