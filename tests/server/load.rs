//! `slimserve load` and `slimserve compare` against the real server, and `--shadow` traffic.

use std::process::Command;
use std::time::{Duration, Instant};

use slimserve::load::compare::{self, CompareArgs};
use slimserve::load::{Api, LoadShape};
use slimserve::pipeline::LoadError;
use slimserve::server::{Server, ServerError};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_slimserve");

/// Runs `slimserve load ARGS` off the runtime.
async fn load(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || Command::new(BIN).arg("load").args(args).output().unwrap())
        .await
        .unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_counts_every_request_by_status_and_writes_json() {
    let s = TestServer::start(&["load-a", "load-b"], |_| {}).await;
    let addr = s.grpc.to_string();
    let out_json = s.dir.path().join("report.json");
    let images = s.dir.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    std::fs::write(images.join("one.png"), png(40, 30)).unwrap();
    std::fs::write(images.join("sub/two.jpg"), jpeg(50, 60)).unwrap();
    std::fs::write(images.join("sub/broken.jpg"), b"not a jpeg").unwrap();

    // Raw tensors, own API, 4 workers.
    let out = load(vec![
        "--addr".into(),
        addr.clone(),
        "--model".into(),
        "load-a".into(),
        "--concurrency".into(),
        "4".into(),
        "--requests".into(),
        "30".into(),
        "--json".into(),
        out_json.display().to_string(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("30 ok, 0 errors"), "{stdout}");
    let r = json(&out_json);
    assert_eq!(r["requests"], 30);
    assert_eq!(r["ok"], 30);
    assert_eq!(r["codes"]["OK"], 30);
    let l = &r["latency_ms"];
    let (min, p50, p99, max) = (
        l["min"].as_f64().unwrap(),
        l["p50"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= p50 && p50 <= p99 && p99 <= max, "{l}");
    let in_hist: u64 = r["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(in_hist, 30);
    assert!(r["throughput_rps"].as_f64().unwrap() > 0.0);
    let m = s.metrics_text();
    assert_eq!(
        sample(
            &m,
            r#"slimserve_requests_total{model="load-a",version="1",method="Classify",code="OK"}"#
        ),
        Some(30.0),
        "the server saw every request"
    );

    // Images from a folder, one of them corrupt: its answers are counted by status.
    let out = load(vec![
        "--addr".into(),
        addr.clone(),
        "--model".into(),
        "load-b".into(),
        "--images".into(),
        images.display().to_string(),
        "--requests".into(),
        "9".into(),
        "--json".into(),
        out_json.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out_json);
    assert_eq!(r["codes"]["OK"], 6, "{r}");
    assert_eq!(r["codes"]["INVALID_ARGUMENT"], 3, "{r}");
    assert_eq!(r["errors"], 3);

    // KServe ModelInfer with raw tensors, two models in turn.
    let out = load(vec![
        "--addr".into(),
        addr.clone(),
        "--api".into(),
        "kserve".into(),
        "--model".into(),
        "load-a,load-b".into(),
        "--requests".into(),
        "10".into(),
        "--concurrency".into(),
        "3".into(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = s.metrics_text();
    for model in ["load-a", "load-b"] {
        let counted: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("slimserve_requests_total") && l.contains(model))
            .collect();
        assert_eq!(
            sample(
                &m,
                &format!(
                    r#"slimserve_requests_total{{model="{model}",version="1",method="ModelInfer",code="OK"}}"#
                )
            ),
            Some(5.0),
            "{model}: the load run printed\n{}\nthe server counted {counted:#?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Clear failures: an unknown model, an empty image folder, no server, a bare duration.
    let empty = s.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for (args, needle) in [
        (
            vec!["--addr", &addr, "--model", "nope"],
            "no model `nope` (it serves: load-a, load-b)",
        ),
        (
            vec!["--addr", &addr, "--images", empty.to_str().unwrap()],
            "no image files",
        ),
        (
            vec![
                "--addr",
                &addr,
                "--api",
                "kserve",
                "--images",
                images.to_str().unwrap(),
            ],
            "--images works with --api classify",
        ),
        (
            vec!["--addr", "127.0.0.1:1"],
            "cannot connect to 127.0.0.1:1",
        ),
        // A bare number would read as milliseconds: a run length needs its unit.
        (
            vec!["--addr", &addr, "--duration", "4"],
            "`4` needs a unit: e.g. 4s or 4ms",
        ),
    ] {
        let out = load(args.iter().map(|a| a.to_string()).collect()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stops_at_its_time_limit_and_keeps_its_rate() {
    // Every batch takes 300 ms more: a million requests cannot finish within one second.
    let s = TestServer::start(&["slow"], |c| {
        c.inject_compute_delay = Duration::from_millis(300)
    })
    .await;
    let addr = s.grpc.to_string();
    let out_json = s.dir.path().join("report.json");
    let started = Instant::now();
    let out = load(vec![
        "--addr".into(),
        addr.clone(),
        "--requests".into(),
        "1000000".into(),
        "--duration".into(),
        "1s".into(),
        "--concurrency".into(),
        "2".into(),
        "--json".into(),
        out_json.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let r = json(&out_json);
    let sent = r["requests"].as_u64().unwrap();
    assert!((1..100).contains(&sent), "{r}");
    assert!(r["duration_s"].as_f64().unwrap() < 3.0, "{r}");

    // --rate paces the starts: 6 requests at 10/s cannot take less than 0.5 s.
    let fast = TestServer::start(&["fast"], |_| {}).await;
    let out = load(vec![
        "--addr".into(),
        fast.grpc.to_string(),
        "--requests".into(),
        "6".into(),
        "--rate".into(),
        "10".into(),
        "--concurrency".into(),
        "3".into(),
        "--json".into(),
        out_json.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out_json);
    assert_eq!(r["ok"], 6);
    assert!(r["duration_s"].as_f64().unwrap() >= 0.5, "{r}");
    s.stop().await.unwrap();
    fast.stop().await.unwrap();
}

fn shape(addr: String, requests: u64) -> LoadShape {
    LoadShape {
        addr,
        api: Api::Classify,
        images: None,
        concurrency: 1,
        requests,
        duration: Duration::from_secs(60),
        rate: 0.0,
        warmup: 0,
        timeout: Duration::from_secs(30),
        connections: 1,
        seed: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_tables_each_model_and_the_mix_with_the_server_split() {
    let s = TestServer::start(&["cmp-a", "cmp-b"], |_| {}).await;
    // An eval report for cmp-b only (extra fields, as `slimtrain eval --json` writes them).
    let evals = tempfile::tempdir().unwrap();
    std::fs::write(
        evals.path().join("eval-cmp-b.json"),
        r#"{"model": "x", "split": "test", "images": 83, "accuracy": 0.5903, "ci95": [0.48, 0.69]}"#,
    )
    .unwrap();
    let args = CompareArgs {
        shape: shape(s.grpc.to_string(), 12),
        models: vec![],
        concurrency: vec![1, 4],
        no_mixed: false,
        metrics_url: format!("http://{}/metrics", s.metrics),
        markdown: Some(s.dir.path().join("table.md")),
        json: None,
        eval_dir: Some(evals.path().to_path_buf()),
    };
    let rows = compare::compare(&args).await.unwrap();
    let labels: Vec<(String, u32)> = rows
        .iter()
        .map(|r| (r.model.clone(), r.concurrency))
        .collect();
    assert_eq!(
        labels,
        [
            ("cmp-a", 1),
            ("cmp-b", 1),
            ("mixed (cmp-a+cmp-b)", 1),
            ("cmp-a", 4),
            ("cmp-b", 4),
            ("mixed (cmp-a+cmp-b)", 4)
        ]
        .map(|(m, c)| (m.to_string(), c))
    );
    for r in &rows {
        assert_eq!(r.load.ok, 12, "{}", r.model);
        // the server computed exactly this run's inputs (nothing else talks to it)
        assert_eq!(r.server.inputs, 12.0, "{}", r.model);
        assert!(r.server.compute_ms_per_batch > 0.0, "{r:?}");
        assert!(r.server.upload_ms_per_batch > 0.0, "{r:?}");
        assert!(r.server.batch_size >= 1.0, "{r:?}");
        assert!(r.server.queue_wait_ms >= 0.0, "{r:?}");
        assert!(r.load.latency_ms.p50 <= r.load.latency_ms.p99);
    }
    assert_eq!(rows[0].parameters, rows[1].parameters, "same architecture");
    assert_eq!(rows[0].val_accuracy, Some(0.5));
    assert_eq!(rows[2].parameters, None, "the mix has no single size");
    let table = std::fs::read_to_string(s.dir.path().join("table.md")).unwrap();
    assert_eq!(table.lines().count(), 2 + rows.len(), "{table}");
    assert!(table.contains("| cmp-a | f32 | fused | "), "{table}");
    assert!(
        table.lines().all(|l| l.matches('|').count() == 19),
        "{table}"
    );
    assert_eq!(rows[0].eval, None, "cmp-a has no report");
    assert_eq!(
        rows[1]
            .eval
            .as_ref()
            .map(|e| (e.accuracy, e.split.as_str(), e.images)),
        Some((0.5903, "test", 83))
    );
    assert!(
        table.contains("| 0.500 | 0.590 (test 83) | 1 |"),
        "cmp-b's row shows both accuracies: {table}"
    );
    assert_eq!(rows[0].engine.as_deref(), Some("fused"));
    assert_eq!(rows[2].engine, None, "the mix has no single engine");

    // A wrong metrics URL is a clear error, not a silent zero.
    let bad = CompareArgs {
        metrics_url: format!("http://{}/nope", s.metrics),
        ..args.clone()
    };
    let e = format!("{:#}", compare::compare(&bad).await.unwrap_err());
    assert!(e.contains("--metrics-url") && e.contains("404"), "{e}");

    // A report that is not one names the file, before any load runs.
    std::fs::write(evals.path().join("eval-cmp-a.json"), b"{\"accuracy\": ").unwrap();
    let e = format!("{:#}", compare::compare(&args).await.unwrap_err());
    assert!(
        e.contains("eval-cmp-a.json") && e.contains("--eval-dir"),
        "{e}"
    );
    s.stop().await.unwrap();
}

/// Polls /metrics until the shadow counters of `source` add up to `n`.
async fn shadow_counts(s: &TestServer, source: &str, shadow: &str, n: f64) -> String {
    for _ in 0..200 {
        let m = s.metrics_text();
        let total: f64 = ["agree", "disagree", "dropped", "error"]
            .iter()
            .filter_map(|o| {
                sample(
                    &m,
                    &format!(
                        r#"slimserve_shadow_requests_total{{model="{source}",shadow="{shadow}",outcome="{o}"}}"#
                    ),
                )
            })
            .sum();
        if total >= n {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "shadow counts for {source} never reached {n}:\n{}",
        s.metrics_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_traffic_measures_agreement_off_the_critical_path() {
    let s = TestServer::start(&["sh-a", "sh-b"], |c| {
        // `twin` has a's exact weights: it must agree on every input, with no logit gap.
        let (from, to) = (c.models.join("sh-a"), c.models.join("twin"));
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
        c.shadow = vec!["sh-a=twin".parse().unwrap(), "sh-b=sh-a:1".parse().unwrap()];
    })
    .await;
    let target = slimserve::load::Target::connect(&s.grpc.to_string(), 1)
        .await
        .unwrap();
    for (model, n) in [("sh-a", 20u64), ("sh-b", 15)] {
        let mut sh = shape(s.grpc.to_string(), n);
        sh.concurrency = 4;
        let r = slimserve::load::run(&target, &sh, &target.resolve(&[model.into()]).unwrap())
            .await
            .unwrap();
        assert_eq!(r.ok, n);
    }
    let m = shadow_counts(&s, "sh-a", "twin", 20.0).await;
    let get = |name_labels: &str| sample(&m, name_labels).unwrap_or(-1.0);
    assert_eq!(
        get(r#"slimserve_shadow_requests_total{model="sh-a",shadow="twin",outcome="agree"}"#),
        20.0
    );
    assert_eq!(
        get(r#"slimserve_shadow_requests_total{model="sh-a",shadow="twin",outcome="disagree"}"#),
        0.0
    );
    assert_eq!(
        get(r#"slimserve_shadow_logit_gap_count{model="sh-a",shadow="twin"}"#),
        20.0
    );
    assert!(get(r#"slimserve_shadow_logit_gap_sum{model="sh-a",shadow="twin"}"#) < 1e-3);
    // Nothing was mirrored to a model nobody shadows with, and the clients' own counts are
    // untouched by the mirrored inputs.
    assert!(
        !m.contains(r#"model="twin",version="1",method="Classify""#),
        "{m}"
    );

    // Two differently initialised models: every input is compared, their logits differ.
    let m = shadow_counts(&s, "sh-b", "sh-a", 15.0).await;
    let agree = get_in(
        &m,
        r#"slimserve_shadow_requests_total{model="sh-b",shadow="sh-a",outcome="agree"}"#,
    );
    let disagree = get_in(
        &m,
        r#"slimserve_shadow_requests_total{model="sh-b",shadow="sh-a",outcome="disagree"}"#,
    );
    assert_eq!(agree + disagree, 15.0, "{m}");
    assert!(
        get_in(
            &m,
            r#"slimserve_shadow_logit_gap_sum{model="sh-b",shadow="sh-a"}"#
        ) > 0.0
    );
    // b's 15 mirrored inputs ran on a's batcher: a computed 20 + 15 inputs in all.
    assert_eq!(
        get_in(
            &m,
            r#"slimserve_batch_size_inputs_sum{model="sh-a",version="1"}"#
        ),
        35.0
    );
    s.stop().await.unwrap();
}

fn get_in(m: &str, name_labels: &str) -> f64 {
    sample(m, name_labels).unwrap_or_else(|| panic!("{name_labels} missing:\n{m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shadow_rules_stop_start_up_with_a_clear_error() {
    use slimserve::formats::model_dir::{self, ModelConfig};
    use slimserve::zoo::{Arch, Model, ModelSpec};
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), "bad-a");
    make_model(dir.path(), "bad-b");
    let spec = ModelSpec::new(Arch::Student, CLASSES, 64);
    let (varmap, _) = Model::init(&spec, &candle_core::Device::Cpu).unwrap();
    let wide = ModelConfig::new(spec, model_dir::default_labels(CLASSES));
    model_dir::save(
        &dir.path().join("bad-wide"),
        &wide,
        &slimserve::zoo::varmap_tensors(&varmap),
    )
    .unwrap();
    for (rules, needle) in [
        (
            vec!["bad-a=missing"],
            "no model named `missing` is served (bad-a, bad-b, bad-wide)",
        ),
        (
            // Different input sizes are fine (mirrored inputs are resized); one rule a source.
            vec!["bad-a=bad-b", "bad-a=bad-wide:0.5"],
            "`bad-a` already mirrors to `bad-b`",
        ),
    ] {
        let mut c = config(dir.path());
        c.shadow = rules.iter().map(|r| r.parse().unwrap()).collect();
        let server = Server::bind(c).await.unwrap();
        let err = server.serve(std::future::pending()).await.unwrap_err();
        assert!(
            matches!(err, ServerError::Load(LoadError::Shadow { .. })),
            "{err}"
        );
        assert!(err.to_string().contains(needle), "{rules:?}: {err}");
    }
}

/// Runs `slimserve soak` against the test server at `addr`, sampling this process's memory
/// (the server runs in it), with oversize messages just over the 1 MiB limit the soak tests
/// set; then `base` and `extra`.
fn run_soak(
    addr: &str,
    base: &[&str],
    extra: Vec<String>,
) -> tokio::task::JoinHandle<std::process::Output> {
    let pid = std::process::id().to_string();
    let mut args: Vec<String> = [
        "soak",
        "--addr",
        addr,
        "--server-pid",
        &pid,
        "--oversize-bytes",
        "1048577",
    ]
    .iter()
    .chain(base)
    .map(|a| a.to_string())
    .collect();
    args.extend(extra);
    tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
}

/// `slimserve soak` against a live server (this test process, whose memory it samples): every
/// kind of request is sent and ends only as its kind allows; the report is written; a memory
/// limit it cannot meet makes it fail with a message; a missing process is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_sends_every_kind_and_judges_statuses_and_memory() {
    let s = TestServer::start(&["soak-a", "soak-b"], |c| c.max_message_bytes = 1 << 20).await;
    let addr = s.grpc.to_string();
    let out_json = s.dir.path().join("soak.json");
    let soak = |extra: Vec<String>| {
        run_soak(
            &addr,
            &["--duration", "3s", "--warmup", "1s", "--concurrency", "8"],
            extra,
        )
    };
    // Memory is not judged here (other tests share this process): a limit nobody reaches.
    let out = soak(vec![
        "--max-growth-mib".into(),
        "100000".into(),
        "--json".into(),
        out_json.display().to_string(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASS: 0 unexpected"), "{stdout}");
    let report = json(&out_json);
    let outcomes = report["outcomes"].as_object().unwrap();
    let only = |kind: &str, code: &str| {
        let o = outcomes[kind].as_object().unwrap();
        assert!(o[code].as_u64().unwrap() > 0, "{kind}: {o:?}");
        assert_eq!(o.len(), 1, "{kind}: {o:?}");
    };
    only("valid_image", "OK");
    only("valid_tensor", "OK");
    only("malformed_image", "INVALID_ARGUMENT");
    only("malformed_tensor", "INVALID_ARGUMENT");
    only("oversize", "RESOURCE_EXHAUSTED");
    assert!(outcomes.contains_key("cancelled"), "{outcomes:?}");
    assert!(report["rss_samples"].as_array().unwrap().len() >= 3);
    assert_eq!(report["unexpected"], 0);
    // A limit below any growth fails the run, saying why.
    let out = soak(vec!["--max-growth-mib=-100000".into()]).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("soak failed") && stderr.contains("limit -100000.0"),
        "{stderr}"
    );
    // No such process.
    let out = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            Command::new(BIN)
                .args(["soak", "--addr", &addr, "--server-pid", "4294967295"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no such process"), "{stderr}");
    s.stop().await.unwrap();
}

/// `slimserve soak --swap-model` against a server in poll mode: versions are published into
/// its repository while the load runs (the second corrupt), each served or refused as
/// documented with no request failing, and the repository is left as it was found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_hot_swaps_versions_without_a_failed_request() {
    let s = TestServer::start(&["swapped"], |c| {
        c.model_control = slimserve::pipeline::ModelControl::Poll;
        c.repository_poll_secs = 1;
        c.max_message_bytes = 1 << 20;
    })
    .await;
    let addr = s.grpc.to_string();
    let repo = s.dir.path().to_path_buf();
    let out_json = repo.join("..").join(format!(
        "{}-swap-soak.json",
        repo.file_name().unwrap().to_string_lossy()
    ));
    let soak = |extra: Vec<String>| {
        run_soak(
            &addr,
            &["--concurrency", "4", "--max-growth-mib", "100000"],
            extra,
        )
    };
    let out = soak(
        [
            "--duration",
            "9s",
            "--warmup",
            "2s",
            "--swap-model",
            "swapped",
            "--repository",
            &repo.display().to_string(),
            "--swap-every",
            "1s",
            "--json",
            &out_json.display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let report = json(&out_json);
    std::fs::remove_file(&out_json).unwrap();
    assert_eq!(report["unexpected"], 0, "{stdout}");
    let w = &report["swaps"];
    let n = |k: &str| w[k].as_u64().unwrap();
    assert!(n("published") >= 3, "{w}");
    assert!(n("served") >= 2, "{w}");
    assert!(n("refused") >= 1, "{w}");
    assert_eq!(n("published"), n("served") + n("refused"), "{w}");
    assert_eq!(w["failures"].as_array().unwrap().len(), 0, "{w}");
    assert_eq!(w["restored"], true, "{w}");
    assert_eq!(w["original_version"], 1, "{w}");
    assert!(stdout.contains("corrupt refused"), "{stdout}");
    // Every valid request was answered while the versions changed under it.
    let outcomes = report["outcomes"].as_object().unwrap();
    for kind in ["valid_image", "valid_tensor"] {
        let o = outcomes[kind].as_object().unwrap();
        assert!(o["OK"].as_u64().unwrap() > 0, "{kind}: {o:?}");
        assert_eq!(o.len(), 1, "{kind}: {o:?}");
    }
    // The repository as it was found: the flat model, nothing published left behind.
    let left: Vec<String> = std::fs::read_dir(repo.join("swapped"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json") && !n.ends_with(".safetensors"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Misuse is a clear error before any traffic.
    let out = soak(vec!["--swap-model".into(), "swapped".into()])
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--repository"), "{stderr}");
    let out = soak(vec![
        "--swap-model".into(),
        "absent".into(),
        "--repository".into(),
        repo.display().to_string(),
    ])
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--swap-model absent") && stderr.contains("not a directory"),
        "{stderr}"
    );
    s.stop().await.unwrap();
}
