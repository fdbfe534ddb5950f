//! `slimserve soak`: a long run of mixed traffic on both APIs (valid photos and tensors,
//! oversize messages, undecodable images, tensors of the wrong size, requests the client gives
//! up on) at high concurrency, while the server's resident memory is sampled from
//! `/proc/PID/status`. It fails when any request ends with a status its kind does not allow, or
//! when the memory grows by more than `--max-growth-mib` after the warm-up (Triton's
//! L0_memory_growth is the model). With `--swap-model`, new versions of a model (some corrupt)
//! are published into the server's repository meanwhile, and each must serve (or be refused)
//! without a request failing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use prost::bytes::Bytes;
use tonic::transport::Channel;

use super::swap::{SwapReport, Swapper};
use super::{
    classify_request, image_files, infer_request, random_tensors, ModelFacts, Payload, Target,
};
use crate::grpc::pb::inference as kpb;
use crate::grpc::pb::slimserve::v1 as pb;
use crate::server::config::parse_span;
use crate::telemetry::code_name;
use kpb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::classifier_client::ClassifierClient;

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Server address, HOST:PORT.
    #[arg(long, env = "SLIMSERVE_ADDR", default_value = "127.0.0.1:8001")]
    pub addr: String,

    /// PID of the server process, whose resident memory (VmRSS) is sampled every second.
    #[arg(long)]
    pub server_pid: u32,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Length of the whole run, warm-up included, with its unit (e.g. 10m, 30s).
    #[arg(long, default_value = "10m", value_parser = parse_span)]
    pub duration: Duration,

    /// First part of the run whose memory is not judged (allocator pools, caches, per-thread
    /// buffers fill up). Growth is idle to idle: the RSS 5 s after the last request minus the
    /// RSS after a 5 s pause that follows the warm-up. A leak grows it; the memory that
    /// in-flight requests hold under load (a transient peak) does not.
    #[arg(long, default_value = "60s", value_parser = parse_span)]
    pub warmup: Duration,

    /// Largest allowed growth of the server's resident memory after the warm-up, in MiB.
    #[arg(long, default_value_t = 64.0)]
    pub max_growth_mib: f64,

    /// Models to send to, in turn (default: every model the server lists).
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<String>,

    /// Photos for the valid Classify requests (default: one generated image).
    #[arg(long)]
    pub images: Option<PathBuf>,

    /// Size of the oversize messages: above the server's --max-message-bytes (16 MiB default).
    #[arg(long, default_value_t = 17 << 20)]
    pub oversize_bytes: usize,

    /// HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,

    /// Also write the report as JSON here (atomically).
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Hot-swap this model during the run: every --swap-every, a new version REPOSITORY/NAME/N/
    /// is published (a copy of the version serving at the start, written aside and renamed into
    /// place); every third one, from the second on, is corrupt (half its weights) and must be
    /// refused while the previous version keeps serving. The server must run with
    /// `--model-control poll` on --repository. Superseded versions are removed as the run goes,
    /// and all published ones at the end, so the original version serves again.
    #[arg(long, requires = "repository")]
    pub swap_model: Option<String>,

    /// The server's model repository (its --models directory), written by --swap-model.
    #[arg(long, requires = "swap_model")]
    pub repository: Option<PathBuf>,

    /// Time between two published versions (--swap-model), with its unit.
    #[arg(long, default_value = "30s", value_parser = parse_span)]
    pub swap_every: Duration,
}

/// What a request is, and so which statuses it may end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    /// Own API, a photo.
    ValidImage,
    /// KServe ModelInfer, a raw FP32 tensor.
    ValidTensor,
    /// Own API, bytes that are no image.
    MalformedImage,
    /// KServe ModelInfer, a tensor 4 bytes short of its shape.
    MalformedTensor,
    /// Own API, a message over the size limit.
    Oversize,
    /// Own API, a photo whose request the client drops after 2 ms.
    Cancelled,
}

/// One in twelve requests of each rare kind; half valid.
const PATTERN: [Kind; 12] = [
    Kind::ValidImage,
    Kind::ValidTensor,
    Kind::Cancelled,
    Kind::ValidImage,
    Kind::MalformedImage,
    Kind::ValidTensor,
    Kind::ValidImage,
    Kind::MalformedTensor,
    Kind::ValidTensor,
    Kind::Cancelled,
    Kind::Oversize,
    Kind::ValidImage,
];

/// The client gave up (`Cancelled` kind): not a gRPC status.
const DROPPED: &str = "DROPPED_BY_CLIENT";

impl Kind {
    /// The documented outcomes: the kind's own, and RESOURCE_EXHAUSTED for any (overload
    /// is refused at admission, before the input is looked at).
    fn allowed(self, outcome: &str) -> bool {
        let own: &[&str] = match self {
            Kind::ValidImage | Kind::ValidTensor => &["OK"],
            Kind::MalformedImage | Kind::MalformedTensor => &["INVALID_ARGUMENT"],
            Kind::Oversize => &[],
            // Dropped after 2 ms, or answered (or expired) within them.
            Kind::Cancelled => &[DROPPED, "OK", "DEADLINE_EXCEEDED", "CANCELLED"],
        };
        outcome == "RESOURCE_EXHAUSTED" || own.contains(&outcome)
    }
}

/// The soak's report (printed, and written with --json).
#[derive(Debug, serde::Serialize)]
pub struct SoakReport {
    pub addr: String,
    pub server_pid: u32,
    pub concurrency: u32,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub requests: u64,
    /// Kind -> outcome -> requests.
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests whose outcome their kind does not allow.
    pub unexpected: u64,
    pub rss_start_mib: f64,
    /// Once the warm-up's requests are answered and the server has been idle for 5 s.
    pub rss_idle_after_warmup_mib: f64,
    /// The peak under the judged load (in-flight decoded inputs, HTTP/2 buffers: transient).
    pub rss_peak_under_load_mib: f64,
    /// Idle again, 5 s after the last request.
    pub rss_idle_end_mib: f64,
    pub growth_mib: f64,
    pub max_growth_mib: f64,
    /// (seconds since the start, MiB), one a second.
    pub rss_samples: Vec<(f64, f64)>,
    /// --swap-model: the versions published and what the server did with them.
    pub swaps: Option<SwapReport>,
    pub passed: bool,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "soak {}: {} requests in {:.0} s at concurrency {} (warm-up {:.0} s)",
            self.addr, self.requests, self.duration_s, self.concurrency, self.warmup_s
        )?;
        writeln!(f, "| kind | outcomes |")?;
        writeln!(f, "|---|---|")?;
        for (kind, outcomes) in &self.outcomes {
            let list: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
            writeln!(f, "| {kind} | {} |", list.join(", "))?;
        }
        writeln!(
            f,
            "server RSS (pid {}): start {:.1} MiB; idle after the warm-up {:.1}; peak under load {:.1}; idle at the end {:.1}: growth {:.1} MiB (limit {:.1})",
            self.server_pid,
            self.rss_start_mib,
            self.rss_idle_after_warmup_mib,
            self.rss_peak_under_load_mib,
            self.rss_idle_end_mib,
            self.growth_mib,
            self.max_growth_mib
        )?;
        if let Some(w) = &self.swaps {
            let mut t = w.seconds_to_serve.clone();
            t.sort_by(f64::total_cmp);
            writeln!(
                f,
                "swaps of {}: {} versions published, {} served (load to serve: median {:.1} s, max {:.1} s), {} corrupt refused, {} failure(s){}",
                w.model,
                w.published,
                w.served,
                t.get(t.len() / 2).copied().unwrap_or(0.0),
                t.last().copied().unwrap_or(0.0),
                w.refused,
                w.failures.len(),
                if w.restored {
                    format!("; version {} serves again", w.original_version)
                } else {
                    String::new()
                }
            )?;
            for failure in &w.failures {
                writeln!(f, "  swap failure: {failure}")?;
            }
        }
        writeln!(
            f,
            "{}: {} unexpected outcome(s)",
            if self.passed { "PASS" } else { "FAIL" },
            self.unexpected
        )
    }
}

/// The resident memory of `pid` in MiB (Linux `/proc/PID/status`).
fn rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--server-pid {pid}: cannot read {path} (no such process?)"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{path}: no VmRSS line"))?;
    Ok(kb / 1024.0)
}

/// The request bodies every worker shares.
struct Bodies {
    images: Vec<Bytes>,
    /// Per model (in `models` order): a valid tensor and one 4 bytes short.
    tensors: Vec<(Bytes, Bytes)>,
    garbage: Bytes,
    oversize: Bytes,
}

async fn send(
    kind: Kind,
    channel: Channel,
    model: &ModelFacts,
    tensors: &(Bytes, Bytes),
    bodies: &Bodies,
    i: u64,
) -> String {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let classify = |image: Bytes| {
        let req = classify_request(model, pb::classify_request::Input::Image(image), i, TIMEOUT);
        let mut client =
            ClassifierClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
        async move { client.classify(req).await.map(|_| ()) }
    };
    let infer = |data: Bytes| {
        let req = infer_request(model, data, i, TIMEOUT);
        let mut client = GrpcInferenceServiceClient::new(channel.clone());
        async move { client.model_infer(req).await.map(|_| ()) }
    };
    let image = bodies.images[i as usize % bodies.images.len()].clone();
    let result = match kind {
        Kind::ValidImage => classify(image).await,
        Kind::ValidTensor => infer(tensors.0.clone()).await,
        Kind::MalformedImage => classify(bodies.garbage.clone()).await,
        Kind::MalformedTensor => infer(tensors.1.clone()).await,
        Kind::Oversize => classify(bodies.oversize.clone()).await,
        Kind::Cancelled => {
            match tokio::time::timeout(Duration::from_millis(2), classify(image)).await {
                Ok(r) => r,
                Err(_) => return DROPPED.to_string(),
            }
        }
    };
    match result {
        Ok(()) => "OK".to_string(),
        Err(status) => code_name(status.code()).to_string(),
    }
}

/// Quiet time before an idle memory sample.
const QUIET: Duration = Duration::from_secs(5);

/// What the workers of a phase share.
struct Phase<'a> {
    target: &'a Target,
    swapper: Option<&'a Arc<tokio::sync::Mutex<Swapper>>>,
    swap_every: Duration,
    concurrency: usize,
    models: &'a Arc<Vec<ModelFacts>>,
    bodies: &'a Arc<Bodies>,
    outcomes: &'a Arc<Mutex<BTreeMap<(Kind, String), u64>>>,
    next: &'a Arc<AtomicU64>,
    pid: u32,
    started: Instant,
}

impl Phase<'_> {
    /// Closed-loop workers until `stop_at` (requests in flight then are waited for), the
    /// server's RSS sampled once a second meanwhile.
    async fn run(&self, stop_at: Instant, samples: &mut Vec<(f64, f64)>) -> Result<()> {
        let mut workers = Vec::new();
        for w in 0..self.concurrency {
            let channel = self.target.channels[w % self.target.channels.len()].clone();
            let (models, bodies, outcomes, next) = (
                self.models.clone(),
                self.bodies.clone(),
                self.outcomes.clone(),
                self.next.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut mine: BTreeMap<(Kind, String), u64> = BTreeMap::new();
                while Instant::now() < stop_at {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let kind = PATTERN[i as usize % PATTERN.len()];
                    let m = (i as usize / PATTERN.len()) % models.len();
                    let outcome = send(
                        kind,
                        channel.clone(),
                        &models[m],
                        &bodies.tensors[m],
                        &bodies,
                        i,
                    )
                    .await;
                    *mine.entry((kind, outcome)).or_insert(0) += 1;
                }
                let mut all = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                for (k, n) in mine {
                    *all.entry(k).or_insert(0) += n;
                }
            }));
        }
        // Versions published while the load runs; the last one settles before the phase ends.
        let swaps = self.swapper.map(|swapper| {
            let (swapper, every) = (swapper.clone(), self.swap_every);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if Instant::now() >= stop_at {
                        return Ok(());
                    }
                    swapper.lock().await.swap_once().await?;
                }
            })
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while Instant::now() < stop_at {
            tick.tick().await;
            samples.push((self.started.elapsed().as_secs_f64(), rss_mib(self.pid)?));
        }
        for w in workers {
            w.await.context("a soak worker panicked")?;
        }
        if let Some(swaps) = swaps {
            let swapped: Result<()> = swaps.await.context("the swapping task panicked")?;
            swapped?;
        }
        Ok(())
    }
}

/// Runs the soak; the report says whether it passed.
pub async fn soak(args: &SoakArgs) -> Result<SoakReport> {
    if args.warmup >= args.duration {
        bail!(
            "--warmup ({:?}) must be shorter than --duration ({:?})",
            args.warmup,
            args.duration
        );
    }
    let rss_start = rss_mib(args.server_pid)?;
    let target = Target::connect(&args.addr, args.connections).await?;
    let names: Vec<String> = if args.model.is_empty() {
        target.models.iter().map(|m| m.name.clone()).collect()
    } else {
        args.model.clone()
    };
    let models = Arc::new(target.resolve(&names)?);
    let swapper = match (&args.swap_model, &args.repository) {
        (Some(model), Some(repository)) => Some(Arc::new(tokio::sync::Mutex::new(
            Swapper::new(target.channels[0].clone(), repository, model).await?,
        ))),
        _ => None,
    };
    let images = match &args.images {
        Some(dir) => image_files(dir)?
            .iter()
            .take(100)
            .map(|p| {
                std::fs::read(p)
                    .map(Bytes::from)
                    .with_context(|| p.display().to_string())
            })
            .collect::<Result<Vec<_>>>()?,
        None => vec![Bytes::from(generated_png())],
    };
    let tensors = models
        .iter()
        .map(|m| {
            let Payload::Tensor(t) = random_tensors(m.input_size, 7, 1).remove(0) else {
                unreachable!("random_tensors makes tensors")
            };
            let short = t.slice(..t.len() - 4);
            (t, short)
        })
        .collect();
    let bodies = Arc::new(Bodies {
        images,
        tensors,
        garbage: Bytes::from_static(b"these bytes are not an image, whatever the server tries"),
        oversize: Bytes::from(vec![0u8; args.oversize_bytes]),
    });
    let started = Instant::now();
    let outcomes: Arc<Mutex<BTreeMap<(Kind, String), u64>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let mut samples = vec![(0.0, rss_start)];
    let shared = Phase {
        target: &target,
        swapper: swapper.as_ref(),
        swap_every: args.swap_every,
        concurrency: args.concurrency as usize,
        models: &models,
        bodies: &bodies,
        outcomes: &outcomes,
        next: &next,
        pid: args.server_pid,
        started,
    };
    // Warm-up traffic, a quiet pause, the idle baseline; the judged traffic, a pause, the
    // idle end. Idle to idle: what the server keeps once its requests are gone.
    shared.run(started + args.warmup, &mut samples).await?;
    tokio::time::sleep(QUIET).await;
    let idle_baseline = rss_mib(args.server_pid)?;
    samples.push((started.elapsed().as_secs_f64(), idle_baseline));
    let judged_from = started.elapsed().as_secs_f64();
    shared
        .run(Instant::now() + (args.duration - args.warmup), &mut samples)
        .await?;
    tokio::time::sleep(QUIET).await;
    let rss_end = rss_mib(args.server_pid)?;
    samples.push((started.elapsed().as_secs_f64(), rss_end));
    // The repository as it was: the published versions go, the original serves again.
    let swaps = match swapper {
        Some(swapper) => {
            let mut swapper = swapper.lock().await;
            swapper.restore().await?;
            Some(swapper.report.clone())
        }
        None => None,
    };
    let peak = samples
        .iter()
        .filter(|s| s.0 >= judged_from)
        .map(|s| s.1)
        .fold(idle_baseline, f64::max);
    let warm = args.warmup.as_secs_f64();
    let outcomes = Arc::try_unwrap(outcomes)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default();
    let mut by_kind: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let (mut requests, mut unexpected) = (0, 0);
    for ((kind, outcome), n) in outcomes {
        requests += n;
        if !kind.allowed(&outcome) {
            unexpected += n;
        }
        let kind_name = serde_json::to_value(kind)?
            .as_str()
            .unwrap_or("?")
            .to_string();
        by_kind.entry(kind_name).or_default().insert(outcome, n);
    }
    let report = SoakReport {
        addr: args.addr.clone(),
        server_pid: args.server_pid,
        concurrency: args.concurrency,
        duration_s: started.elapsed().as_secs_f64(),
        warmup_s: warm,
        requests,
        outcomes: by_kind,
        unexpected,
        rss_start_mib: rss_start,
        rss_idle_after_warmup_mib: idle_baseline,
        rss_peak_under_load_mib: peak,
        rss_idle_end_mib: rss_end,
        growth_mib: rss_end - idle_baseline,
        max_growth_mib: args.max_growth_mib,
        rss_samples: samples,
        passed: unexpected == 0
            && rss_end - idle_baseline <= args.max_growth_mib
            && swaps.as_ref().is_none_or(|w| w.failures.is_empty()),
        swaps,
    };
    if let Some(path) = &args.json {
        crate::formats::model_dir::write_atomic(path, &serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    Ok(report)
}

/// A 320x240 PNG with a gradient (the default photo).
fn generated_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(320, 240, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .expect("encoding a PNG in memory");
    buf.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_allows_only_its_documented_outcomes() {
        assert!(Kind::ValidImage.allowed("OK"));
        assert!(Kind::ValidTensor.allowed("RESOURCE_EXHAUSTED"));
        assert!(!Kind::ValidImage.allowed("INTERNAL"));
        assert!(!Kind::ValidTensor.allowed("INVALID_ARGUMENT"));
        assert!(Kind::MalformedImage.allowed("INVALID_ARGUMENT"));
        assert!(!Kind::MalformedTensor.allowed("OK"));
        assert!(Kind::Oversize.allowed("RESOURCE_EXHAUSTED"));
        assert!(!Kind::Oversize.allowed("OK"));
        assert!(Kind::Cancelled.allowed(DROPPED));
        assert!(!Kind::Cancelled.allowed("UNKNOWN"));
        // Every kind appears in the pattern.
        for k in [
            Kind::ValidImage,
            Kind::ValidTensor,
            Kind::MalformedImage,
            Kind::MalformedTensor,
            Kind::Oversize,
            Kind::Cancelled,
        ] {
            assert!(PATTERN.contains(&k), "{k:?}");
        }
    }

    #[test]
    fn rss_of_this_process_and_a_missing_one() {
        let mine = rss_mib(std::process::id()).unwrap();
        assert!(mine > 1.0 && mine < 1e6, "{mine}");
        let err = rss_mib(u32::MAX).unwrap_err().to_string();
        assert!(
            err.contains("--server-pid") && err.contains("no such process"),
            "{err}"
        );
    }
}
