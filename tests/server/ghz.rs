//! ghz itself against the live server: every config in loadtest/ (both APIs, every shipped
//! model name), once with the config's proto files and once through server reflection, each
//! report parsed (request count, no errors, all OK) and matched by the server's own request
//! counter; then a run paced above capacity, whose only errors must be RESOURCE_EXHAUSTED.
//!
//! ghz comes from `$SLIMSERVE_GHZ`, else `.ci/bin/ghz` (built by `bash .ci/setup`), else PATH;
//! a missing ghz fails the test with the fix, it never skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ghz() -> PathBuf {
    let candidates = std::env::var_os("SLIMSERVE_GHZ")
        .map(PathBuf::from)
        .into_iter()
        .chain([root().join(".ci/bin/ghz"), PathBuf::from("ghz")]);
    for c in candidates {
        if Command::new(&c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c;
        }
    }
    panic!("ghz is not installed: run `bash .ci/setup` (builds the pinned ghz into .ci/bin with Go) or set SLIMSERVE_GHZ");
}

/// A parsed ghz JSON report: (count, status code -> requests, error message -> requests).
struct Report {
    count: u64,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

/// Runs ghz with `args` (+ JSON output) off the runtime and parses its report.
async fn run_ghz(args: Vec<String>, out: PathBuf) -> Report {
    let ghz = ghz();
    let report = out.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(ghz)
            .args(args)
            .args(["--format", "json", "--output"])
            .arg(&report)
            .current_dir(root())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| {
        panic!(
            "no ghz report at {} ({e}): {}{}",
            out.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let counts = |key: &str| -> BTreeMap<String, u64> {
        json[key]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    Report {
        count: json["count"].as_u64().expect("count in the ghz report"),
        statuses: counts("statusCodeDistribution"),
        errors: counts("errorDistribution"),
    }
}

/// `loadtest/*.json` (the ghz configs), sorted.
fn configs() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("loadtest")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((name, serde_json::from_str(&text).unwrap()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn requests_ok(metrics: &str, model: &str, method: &str) -> f64 {
    sample(
        metrics,
        &format!(
            r#"slimserve_requests_total{{model="{model}",version="1",method="{method}",code="OK"}}"#
        ),
    )
    .unwrap_or(0.0)
}

/// `input_size` of the shipped `models/NAME/config.json` (prepare.py sizes the bodies from it).
fn shipped_input_size(name: &str) -> usize {
    let path = root().join("models").join(name).join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["input_size"].as_u64().expect("input_size") as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghz_runs_every_loadtest_config_with_protos_and_through_reflection() {
    const N: u64 = 24;
    let s = TestServer::start(&[], |c| {
        for name in ["big", "kd", "kd-q8"] {
            make_model_sized(&c.models, name, shipped_input_size(name));
        }
    })
    .await;
    // The request bodies, as loadtest/ghz.sh makes them (a generated photo: CI has none).
    let data = s.dir.path().join("data");
    let photo = s.dir.path().join("photo.png");
    std::fs::write(&photo, png_seeded(300, 200, 7)).unwrap();
    let out = Command::new("python3")
        .arg(root().join("loadtest/prepare.py"))
        .arg("--image")
        .arg(&photo)
        .arg("--out")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let configs = configs();
    assert!(configs.len() >= 6, "{} ghz configs", configs.len());
    let mut models_seen = BTreeMap::new();
    for (name, cfg) in &configs {
        let call = cfg["call"].as_str().expect("call");
        let method = call.rsplit('/').next().unwrap();
        let model = cfg["tags"]["model"].as_str().expect("tags.model");
        let body = data.join(format!("{name}.json"));
        assert!(body.exists(), "prepare.py made no body for {name}");
        let before = requests_ok(&s.metrics_text(), model, method);
        let common = |mode: &str| -> Vec<String> {
            vec![
                "--data-file".into(),
                body.display().to_string(),
                "--total".into(),
                N.to_string(),
                "--concurrency".into(),
                "4".into(),
                "--name".into(),
                format!("{name} ({mode})"),
            ]
        };
        // 1. The config as committed (its proto files), the server's address appended.
        let mut args = vec![
            "--config".into(),
            root()
                .join("loadtest")
                .join(format!("{name}.json"))
                .display()
                .to_string(),
        ];
        args.extend(common("protos"));
        args.push(s.grpc.to_string());
        let with_protos = run_ghz(args, s.dir.path().join(format!("{name}-protos.json"))).await;
        // 2. No proto at all: ghz asks the server's reflection service.
        let mut args = vec!["--insecure".into(), "--call".into(), call.to_string()];
        args.extend(common("reflection"));
        args.push(s.grpc.to_string());
        let reflected = run_ghz(args, s.dir.path().join(format!("{name}-reflection.json"))).await;
        for (mode, r) in [("protos", &with_protos), ("reflection", &reflected)] {
            assert_eq!(r.count, N, "{name} ({mode}): count");
            assert!(
                r.errors.is_empty(),
                "{name} ({mode}): errors {:?}",
                r.errors
            );
            assert_eq!(
                r.statuses,
                BTreeMap::from([("OK".to_string(), N)]),
                "{name} ({mode}): status codes"
            );
        }
        // The server saw exactly these requests, for that model and method.
        let after = requests_ok(&s.metrics_text(), model, method);
        assert_eq!(
            after - before,
            2.0 * N as f64,
            "{name}: server-side OK count"
        );
        *models_seen.entry(model.to_string()).or_insert(0) += 1;
    }
    // Both APIs for every shipped model.
    assert_eq!(
        models_seen,
        BTreeMap::from([
            ("big".to_string(), 2),
            ("kd".to_string(), 2),
            ("kd-q8".to_string(), 2)
        ])
    );
    s.stop().await.unwrap();
}

/// Paced far above what a deliberately slow model computes, with a short queue: some requests
/// are answered, the rest get RESOURCE_EXHAUSTED at once, and nothing else happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghz_above_capacity_sees_only_resource_exhausted() {
    const M: &str = "ghz-slow";
    const N: u64 = 200;
    let s = TestServer::start(&[M], |c| {
        c.max_batch_size = Some(2);
        c.max_queue_size = 4;
        c.inject_compute_delay = Duration::from_millis(20);
    })
    .await;
    let body = s.dir.path().join("body.json");
    let image = png_seeded(64, 64, 3);
    let b64 = base64_encode(&image);
    std::fs::write(
        &body,
        serde_json::json!({ "model": M, "image": b64, "top_k": 1 }).to_string(),
    )
    .unwrap();
    let r = run_ghz(
        vec![
            "--proto".into(),
            "proto/slimserve/v1/slimserve.proto".into(),
            "--import-paths".into(),
            "proto".into(),
            "--insecure".into(),
            "--call".into(),
            "slimserve.v1.Classifier/Classify".into(),
            "--data-file".into(),
            body.display().to_string(),
            "--total".into(),
            N.to_string(),
            "--concurrency".into(),
            "50".into(),
            "--rps".into(),
            "1000".into(),
            s.grpc.to_string(),
        ],
        s.dir.path().join("overload.json"),
    )
    .await;
    assert_eq!(r.count, N);
    let ok = r.statuses.get("OK").copied().unwrap_or(0);
    let exhausted = r.statuses.get("ResourceExhausted").copied().unwrap_or(0);
    assert!(ok > 0, "nothing answered: {:?}", r.statuses);
    assert!(exhausted > 0, "never over capacity: {:?}", r.statuses);
    assert_eq!(ok + exhausted, N, "other statuses: {:?}", r.statuses);
    let errors: u64 = r.errors.values().sum();
    assert_eq!(errors, exhausted, "{:?}", r.errors);
    for message in r.errors.keys() {
        assert!(message.contains("ResourceExhausted"), "{message}");
    }
    s.stop().await.unwrap();
}

/// Standard base64 (protobuf JSON's encoding of `bytes`).
fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
