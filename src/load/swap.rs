//! Hot swaps during `slimserve soak --swap-model`: new versions of one model are published into
//! the server's repository the way README.md says to (written aside, then renamed into place),
//! some deliberately corrupt, and each is followed through the server's `RepositoryIndex` until
//! it serves (or, for a corrupt one, reports it failed while the previous one keeps serving).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::Channel;

use crate::formats::model_dir::{CONFIG_FILE as CONFIG, WEIGHTS_FILE as WEIGHTS};
use crate::grpc::pb::inference as kpb;
use kpb::grpc_inference_service_client::GrpcInferenceServiceClient;

/// How long a published version may take to be served (or refused) before the soak fails.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// What the swaps did (part of the soak's report).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SwapReport {
    pub model: String,
    /// The version serving when the soak started, served again at the end.
    pub original_version: u64,
    pub published: u64,
    /// Good versions that the server loaded and switched to.
    pub served: u64,
    /// Corrupt versions (half their weights) that the server refused while the previous
    /// version kept serving.
    pub refused: u64,
    /// Seconds from the rename to the version serving, for each served version.
    pub seconds_to_serve: Vec<f64>,
    /// Whatever did not go as documented: a good version not served, a corrupt one served,
    /// a version not settled within the limit, the original not served again.
    pub failures: Vec<String>,
    /// The published versions were removed at the end and the original serves again.
    pub restored: bool,
}

/// Publishes versions of one model and watches the server pick them up.
pub(super) struct Swapper {
    client: GrpcInferenceServiceClient<Channel>,
    /// REPOSITORY/MODEL.
    dir: PathBuf,
    /// The directory holding the original version's config.json and weights.
    source: PathBuf,
    next: u64,
    /// The first version number this soak publishes (all later ones are above it).
    first: u64,
    /// Versions this soak wrote (removed when superseded, and all at the end).
    created: Vec<u64>,
    pub report: SwapReport,
}

/// A version's state in the server's RepositoryIndex: (state, reason).
type Entry = Option<(String, String)>;

impl Swapper {
    /// Finds the version of `model` that the server serves now and where its files are in
    /// `repository` (the server's `--models` directory).
    pub async fn new(channel: Channel, repository: &Path, model: &str) -> Result<Self> {
        let dir = repository.join(model);
        if !dir.is_dir() {
            bail!(
                "--swap-model {model}: {} is not a directory (is --repository the server's --models directory?)",
                dir.display()
            );
        }
        let mut client = GrpcInferenceServiceClient::new(channel);
        let ready = ready_versions(&mut client, model).await?;
        let Some(&original) = ready.last() else {
            bail!("--swap-model {model}: the server has no READY version of it (RepositoryIndex)")
        };
        let source = if dir.join(original.to_string()).is_dir() {
            dir.join(original.to_string())
        } else if original == 1 && dir.join(CONFIG).is_file() {
            dir.clone()
        } else {
            bail!(
                "--swap-model {model}: the server serves version {original}, whose files are not in {} (is --repository the server's --models directory?)",
                dir.display()
            );
        };
        for file in [CONFIG, WEIGHTS] {
            if !source.join(file).is_file() {
                bail!(
                    "--swap-model {model}: {} is missing",
                    source.join(file).display()
                );
            }
        }
        let on_disk = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let first = original.max(on_disk) + 1;
        Ok(Swapper {
            client,
            dir,
            source,
            next: first,
            first,
            created: Vec::new(),
            report: SwapReport {
                model: model.to_string(),
                original_version: original,
                ..SwapReport::default()
            },
        })
    }

    /// Publishes the next version (every third one, from the second on, corrupt) and waits
    /// until the server serves it or reports it failed.
    pub async fn swap_once(&mut self) -> Result<()> {
        let v = self.next;
        self.next += 1;
        let corrupt = self.report.published % 3 == 1;
        self.publish(v, corrupt)?;
        self.report.published += 1;
        let published = Instant::now();
        let model = self.report.model.clone();
        loop {
            let state = self.state(v).await?;
            match (
                state.as_ref().map(|(s, r)| (s.as_str(), r.as_str())),
                corrupt,
            ) {
                (Some(("READY", _)), false) => {
                    self.report.served += 1;
                    self.report
                        .seconds_to_serve
                        .push(published.elapsed().as_secs_f64());
                    // Superseded versions go (the server unloads them on its next poll).
                    for old in std::mem::take(&mut self.created) {
                        if old == v {
                            self.created.push(old);
                        } else {
                            self.remove(old)?;
                        }
                    }
                    return Ok(());
                }
                (Some(("READY", _)), true) => {
                    self.report
                        .failures
                        .push(format!("version {v} of {model} (corrupt) was served"));
                    return Ok(());
                }
                (Some(("UNAVAILABLE", reason)), true) if !reason.is_empty() => {
                    self.report.refused += 1;
                    return Ok(());
                }
                (Some(("UNAVAILABLE", reason)), false) => {
                    self.report
                        .failures
                        .push(format!("version {v} of {model} failed to load: {reason}"));
                    return Ok(());
                }
                _ => {}
            }
            if published.elapsed() > SETTLE_LIMIT {
                self.report.failures.push(format!(
                    "version {v} of {model} was neither served nor refused within {} s (last state {state:?}); is the server running with --model-control poll on this repository?",
                    SETTLE_LIMIT.as_secs()
                ));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Removes every version this soak published and waits for the original to serve again.
    pub async fn restore(&mut self) -> Result<()> {
        for v in std::mem::take(&mut self.created) {
            self.remove(v)?;
        }
        let (model, original) = (self.report.model.clone(), self.report.original_version);
        let start = Instant::now();
        loop {
            let ready = ready_versions(&mut self.client, &model).await?;
            // The original serves and nothing published does (a policy serving several
            // versions keeps serving the older ones too).
            if ready.contains(&original) && ready.iter().all(|&v| v < self.first) {
                self.report.restored = true;
                return Ok(());
            }
            if start.elapsed() > SETTLE_LIMIT {
                self.report.failures.push(format!(
                    "after the published versions were removed, {model} serves {ready:?}, not version {original}"
                ));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes version `v` beside the model as a hidden directory, then renames it into place.
    fn publish(&mut self, v: u64, corrupt: bool) -> Result<()> {
        let tmp = self.dir.join(format!(".soak-{v}.tmp"));
        let target = self.dir.join(v.to_string());
        let write = || -> std::io::Result<()> {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir(&tmp)?;
            std::fs::copy(self.source.join(CONFIG), tmp.join(CONFIG))?;
            if corrupt {
                let weights = std::fs::read(self.source.join(WEIGHTS))?;
                std::fs::write(tmp.join(WEIGHTS), &weights[..weights.len() / 2])?;
            } else {
                std::fs::copy(self.source.join(WEIGHTS), tmp.join(WEIGHTS))?;
            }
            std::fs::rename(&tmp, &target)
        };
        write().with_context(|| format!("cannot publish {}", target.display()))?;
        self.created.push(v);
        Ok(())
    }

    fn remove(&self, v: u64) -> Result<()> {
        let path = self.dir.join(v.to_string());
        std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))
    }

    async fn state(&mut self, v: u64) -> Result<Entry> {
        let index = repository_index(&mut self.client).await?;
        let v = v.to_string();
        Ok(index
            .into_iter()
            .find(|m| m.name == self.report.model && m.version == v)
            .map(|m| (m.state, m.reason)))
    }
}

async fn repository_index(
    client: &mut GrpcInferenceServiceClient<Channel>,
) -> Result<Vec<kpb::repository_index_response::ModelIndex>> {
    let req = kpb::RepositoryIndexRequest {
        repository_name: String::new(),
        ready: false,
    };
    Ok(client
        .repository_index(req)
        .await
        .context("RepositoryIndex")?
        .into_inner()
        .models)
}

/// The versions of `model` the server reports READY, ascending.
async fn ready_versions(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
) -> Result<Vec<u64>> {
    let mut v: Vec<u64> = repository_index(client)
        .await?
        .into_iter()
        .filter(|m| m.name == model && m.state == "READY")
        .filter_map(|m| m.version.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}
