//! The real Python Triton client (`tritonclient[grpc]`) against the server: liveness,
//! metadata, and an inference whose logits must match the Rust client's.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;
use slimserve::grpc::pb::slimserve::v1 as pb;

/// Runs `tests/python/NAME ARGS...` with `python` off the runtime; fails the test with the
/// script's output unless it exits 0.
async fn run_script(
    python: PathBuf,
    name: &'static str,
    args: Vec<std::ffi::OsString>,
) -> std::process::Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_infers_the_same_logits_as_the_rust_client() {
    same_logits_as_the_rust_client("grpc").await;
}

/// tritonclient.http against the HTTP/REST port: binary tensors and JSON numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_http_infers_the_same_logits_as_the_rust_client() {
    same_logits_as_the_rust_client("http").await;
}

async fn same_logits_as_the_rust_client(protocol: &str) {
    const M: &str = "triton";
    const SEED: u32 = 42;
    let python = python(&format!("numpy, tritonclient.{protocol}"));
    let s = TestServer::start(&[M], |_| {}).await;
    let addr = match protocol {
        "http" => s.http.expect("HTTP/REST is on in the test config"),
        _ => s.grpc,
    };
    let out = run_script(
        python,
        "triton_client.py",
        vec![
            addr.to_string().into(),
            M.into(),
            SEED.to_string().into(),
            protocol.into(),
        ],
    )
    .await;
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["model"], M);
    // Over HTTP the batch of two went twice (binary, then JSON numbers).
    let sent = if protocol == "http" { 4 } else { 2 };
    assert_eq!(answer["inference_count"], sent);
    // Numeric versions: perf_analyzer parses the version as an integer and aborts otherwise.
    assert_eq!(answer["versions"], serde_json::json!(["1"]));
    let py: Vec<Vec<f32>> = serde_json::from_value(answer["logits"].clone()).unwrap();

    let (v, _) = f32_input(2, SEED);
    let mut c = s.classifier().await;
    for (i, py_row) in py.iter().enumerate() {
        let one: Vec<u8> = v[i * 3072..(i + 1) * 3072]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mine = c
            .classify(tensor_request(M, pb::DataType::Float32, &[3, 32, 32], one))
            .await
            .unwrap()
            .into_inner()
            .logits;
        assert!(
            max_diff(&mine, py_row) < 1e-5,
            "python {py_row:?} vs rust {mine:?}"
        );
    }
}

/// tritonclient's repository API (`load_model`, `unload_model`,
/// `get_model_repository_index`) against `--model-control explicit`, while four client threads
/// infer in a closed loop: a version published and loaded takes over with no failed request,
/// a broken model's load fails with its reason, an unload takes a model out of service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_loads_and_unloads_models_under_load() {
    let python = python("numpy, tritonclient.grpc");
    let dir = tempfile::tempdir().unwrap();
    let staged = tempfile::tempdir().unwrap();
    crate::repository::publish(dir.path(), "m", 1);
    make_model(dir.path(), "other");
    make_model(staged.path(), "m-2");
    std::fs::create_dir_all(staged.path().join("broken-1")).unwrap();
    std::fs::write(staged.path().join("broken-1/config.json"), "{\"arch\": 1}").unwrap();
    let repo = dir.path().to_path_buf();
    let s = TestServer::start_dir(dir, |c| {
        c.model_control = slimserve::pipeline::ModelControl::Explicit;
        c.load_model = vec!["other".into()];
    })
    .await;
    let out = run_script(
        python,
        "triton_repository.py",
        vec![s.grpc.to_string().into(), repo.into(), staged.path().into()],
    )
    .await;
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(
        summary["versions"],
        serde_json::json!(["1", "2"]),
        "{summary}"
    );
    assert!(summary["requests"].as_u64().unwrap() > 10, "{summary}");
    eprintln!("tritonclient repository API under load: {summary}");
    s.stop().await.unwrap();
}
