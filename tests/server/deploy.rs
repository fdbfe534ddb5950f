//! loadtest/ and deploy/ against the live server: every ghz request encodes against the proto
//! and is answered OK; the Prometheus config and rules pass promtool; YAML and JSON parse; every
//! metric the Grafana dashboard and the alerts use is one the server really exports.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

async fn script(python: &Path, args: Vec<String>) -> Output {
    let python = python.to_path_buf();
    tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `input_size` of the shipped `models/NAME/config.json` (loadtest/prepare.py sizes the KServe
/// bodies from it).
fn shipped_input_size(name: &str) -> usize {
    let path = root().join("models").join(name).join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["input_size"].as_u64().expect("input_size") as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_and_deploy_files_check_against_the_live_server() {
    let python = python("yaml, grpc_tools, kubernetes_validate");
    // The shipped models' names and input sizes (read from models/), as loadtest/ and the
    // dashboard assume; every kd-q8 input is mirrored to big so the shadow series exist.
    let s = TestServer::start(&[], |c| {
        for name in ["big", "kd", "kd-q8"] {
            make_model_sized(&c.models, name, shipped_input_size(name));
        }
        c.shadow = vec!["kd-q8=big:1".parse().unwrap()];
    })
    .await;

    let ghz = root().join("tests/python/check_ghz.py");
    let out = script(
        &python,
        vec![
            ghz.display().to_string(),
            "--host".into(),
            s.grpc.to_string(),
        ],
    )
    .await;
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches("answered OK").count(), 6, "{log}");

    // kd-q8 got one Classify and one ModelInfer: both are mirrored to big.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = s.metrics_text();
        let mirrored: f64 = ["agree", "disagree"]
            .iter()
            .filter_map(|o| {
                sample(
                    &metrics,
                    &format!(
                        r#"slimserve_shadow_requests_total{{model="kd-q8",shadow="big",outcome="{o}"}}"#
                    ),
                )
            })
            .sum();
        if mirrored >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let saved = s.dir.path().join("metrics.txt");
    std::fs::write(&saved, &metrics).unwrap();
    let deploy = root().join("tests/python/check_deploy.py");
    let out = script(
        &python,
        vec![
            deploy.display().to_string(),
            "--metrics".into(),
            saved.display().to_string(),
        ],
    )
    .await;
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("all checks passed"), "{log}");

    // The name check can fail: without the queue-depth series the dashboard is wrong.
    let missing = s.dir.path().join("metrics-missing.txt");
    let cut: String = metrics
        .lines()
        .filter(|l| !l.contains("slimserve_queue_depth_inputs"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&missing, cut).unwrap();
    let out = script(
        &python,
        vec![
            deploy.display().to_string(),
            "--metrics".into(),
            missing.display().to_string(),
        ],
    )
    .await;
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("slimserve_queue_depth_inputs"), "{log}");
    s.stop().await.unwrap();
}
