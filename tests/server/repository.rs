//! Model lifecycle: the versioned repository layout and version policies, requests by version,
//! `--model-control poll` swapping versions under load (corrupt and half-written versions
//! included) without a failed request, and `--model-control explicit` through KServe's
//! repository RPCs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, ModuleT, Tensor};
use slimserve::formats::model_dir;
use slimserve::grpc::pb::inference as kpb;
use slimserve::pipeline::ModelControl;
use tonic::Code;

use crate::common::*;

/// Writes version `v` of `model` as the documented way to publish says: the whole directory
/// written under a hidden name, then renamed into place. Weights are seeded by model and
/// version, so every version answers differently.
pub fn publish(root: &Path, model: &str, v: u64) {
    let staging = format!(".staging-{model}-{v}");
    make_model(root, &staging);
    std::fs::create_dir_all(root.join(model)).unwrap();
    std::fs::rename(root.join(&staging), root.join(model).join(v.to_string())).unwrap();
}

/// The logits version directory `dir` computes for `input` (CHW f32), in-process.
pub fn reference(dir: &Path, input: &[f32]) -> Vec<f32> {
    let model = model_dir::load(dir).unwrap().build(&Device::Cpu).unwrap();
    let x = Tensor::from_slice(input, (1, 3, SIZE, SIZE), &Device::Cpu).unwrap();
    model
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn classify_version(
    model: &str,
    version: &str,
    data: Vec<u8>,
) -> slimserve::grpc::pb::slimserve::v1::ClassifyRequest {
    let s = SIZE as i64;
    let mut req = tensor_request(
        model,
        slimserve::grpc::pb::slimserve::v1::DataType::Float32,
        &[3, s, s],
        data,
    );
    req.model_version = version.into();
    req
}

async fn index(server: &TestServer) -> Vec<(String, String, String, String)> {
    let r = server
        .kserve()
        .await
        .repository_index(kpb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    r.models
        .into_iter()
        .map(|m| (m.name, m.version, m.state, m.reason))
        .collect()
}

fn state_of<'a>(
    index: &'a [(String, String, String, String)],
    model: &str,
    version: &str,
) -> Option<&'a (String, String, String, String)> {
    index.iter().find(|e| e.0 == model && e.1 == version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_layout_policy_and_requests_by_version() {
    let dir = tempfile::tempdir().unwrap();
    for v in 1..=3 {
        publish(dir.path(), "versioned", v);
    }
    std::fs::write(
        dir.path().join("versioned/policy.json"),
        r#"{"latest": {"num_versions": 2}}"#,
    )
    .unwrap();
    make_model(dir.path(), "flat");
    let (input, bytes) = f32_input(1, 5);
    let refs: BTreeMap<u64, Vec<f32>> = (1..=3)
        .map(|v| {
            (
                v,
                reference(&dir.path().join(format!("versioned/{v}")), &input),
            )
        })
        .collect();
    assert!(
        max_diff(&refs[&2], &refs[&3]) > 1e-2,
        "versions must answer differently"
    );
    let server = TestServer::start_dir(dir, |_| {}).await;
    let mut own = server.classifier().await;

    for (asked, answered) in [("", "3"), ("3", "3"), ("2", "2")] {
        let r = own
            .classify(classify_version("versioned", asked, bytes.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.model_version, answered, "asked for version `{asked}`");
        let v: u64 = answered.parse().unwrap();
        assert!(
            max_diff(&r.logits, &refs[&v]) < 1e-4,
            "version {v} computed it"
        );
    }
    let err = own
        .classify(classify_version("versioned", "1", bytes.clone()))
        .await
        .unwrap_err();
    assert_status(&err, Code::NotFound, &["no version `1`", "2, 3"]);

    let mut kserve = server.kserve().await;
    let meta = kserve
        .model_metadata(kpb::ModelMetadataRequest {
            name: "versioned".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["2", "3"]);
    for (version, ready) in [("1", false), ("2", true), ("3", true), ("", true)] {
        let r = kserve
            .model_ready(kpb::ModelReadyRequest {
                name: "versioned".into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ready, ready, "version `{version}`");
    }
    let infer = kserve
        .model_infer(kpb::ModelInferRequest {
            model_name: "versioned".into(),
            model_version: "2".into(),
            inputs: vec![kpb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 3, SIZE as i64, SIZE as i64],
                ..Default::default()
            }],
            raw_input_contents: vec![bytes.clone().into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(infer.model_version, "2");

    let listed: Vec<(String, String)> = own
        .list_models(slimserve::grpc::pb::slimserve::v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| (m.name, m.version))
        .collect();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        listed,
        pairs(&[("flat", "1"), ("versioned", "2"), ("versioned", "3")])
    );
    let idx = index(&server).await;
    for (m, v) in [("flat", "1"), ("versioned", "2"), ("versioned", "3")] {
        assert_eq!(
            state_of(&idx, m, v).map(|e| e.2.as_str()),
            Some("READY"),
            "{idx:?}"
        );
    }
    assert!(
        state_of(&idx, "versioned", "1").is_none(),
        "version 1 was never loaded: {idx:?}"
    );

    // Load/unload belong to explicit mode.
    let err = kserve
        .repository_model_load(kpb::RepositoryModelLoadRequest {
            model_name: "versioned".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        &["--model-control explicit"],
    );
    let text = server.metrics_text();
    assert_eq!(
        sample(
            &text,
            r#"slimserve_model_versions_loaded{model="versioned"}"#
        ),
        Some(2.0),
        "{text}"
    );
    server.stop().await.unwrap();
}

/// Closed-loop clients on `model` until `stop`; each answer is kept with its version.
async fn closed_loop(
    server: &TestServer,
    clients: usize,
    model: &'static str,
    bytes: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(Vec<(String, Vec<f32>)>, Vec<tonic::Status>)>> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let channel = server.channel().await;
        let (bytes, stop) = (bytes.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = ClassifierClient::new(channel);
            let (mut answers, mut errors) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match client
                    .classify(classify_version(model, "", bytes.clone()))
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        answers.push((r.model_version, r.logits));
                    }
                    Err(e) => errors.push(e),
                }
            }
            (answers, errors)
        }));
    }
    tasks
}

/// Waits until `ok` holds for the repository index (or fails with the index).
async fn wait_index(
    server: &TestServer,
    what: &str,
    ok: impl Fn(&[(String, String, String, String)]) -> bool,
) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let idx = index(server).await;
        if ok(&idx) {
            return;
        }
        assert!(Instant::now() < until, "waited 30 s for {what}: {idx:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn served_version(server: &TestServer, model: &str) -> Vec<String> {
    server
        .kserve()
        .await
        .model_metadata(kpb::ModelMetadataRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .map(|r| r.into_inner().versions)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_swaps_ten_versions_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    publish(&root, "poll-swapped", 1);
    let (input, bytes) = f32_input(1, 9);
    let server = TestServer::start_dir(dir, |c| {
        c.model_control = ModelControl::Poll;
        c.repository_poll_secs = 1;
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = closed_loop(&server, 4, "poll-swapped", bytes, stop.clone()).await;
    let mut refs: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    refs.insert("1".into(), reference(&root.join("poll-swapped/1"), &input));
    let bad: Mutex<Vec<u64>> = Mutex::new(Vec::new());

    // Ten versions, 2..=11: corrupt weights (3), an unparsable config (5), weights of another
    // shape (8), and one written in place in two halves, a poll apart (6).
    let mut serving = 1u64;
    for v in 2..=11u64 {
        let vdir = root.join(format!("poll-swapped/{v}"));
        match v {
            3 | 5 | 8 => {
                publish(&root, "poll-swapped", v);
                match v {
                    3 => std::fs::write(
                        vdir.join("model.safetensors"),
                        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"not\": \"weights",
                    )
                    .unwrap(),
                    5 => {
                        std::fs::write(vdir.join("config.json"), b"{\"config_version\": ").unwrap()
                    }
                    _ => {
                        // A valid weight file, of another architecture (std-conv): the
                        // student's config.json refuses every key.
                        let other = tempfile::tempdir().unwrap();
                        let spec = slimserve::zoo::ModelSpec::new(
                            slimserve::zoo::Arch::StdConv,
                            CLASSES,
                            64,
                        );
                        let (varmap, _) = slimserve::zoo::Model::init(&spec, &Device::Cpu).unwrap();
                        let tensors = slimserve::zoo::varmap_tensors(&varmap);
                        let config =
                            model_dir::ModelConfig::new(spec, model_dir::default_labels(CLASSES));
                        model_dir::save(other.path(), &config, &tensors).unwrap();
                        std::fs::copy(
                            other.path().join("model.safetensors"),
                            vdir.join("model.safetensors"),
                        )
                        .unwrap();
                    }
                }
                bad.lock().unwrap().push(v);
                let vs = v.to_string();
                wait_index(&server, &format!("version {v} to fail"), |idx| {
                    state_of(idx, "poll-swapped", &vs)
                        .is_some_and(|e| e.2 == "UNAVAILABLE" && !e.3.is_empty())
                })
                .await;
                assert_eq!(
                    served_version(&server, "poll-swapped").await,
                    [serving.to_string()],
                    "a failed version {v} changes nothing"
                );
            }
            6 => {
                // Written in place, not renamed: config first, then half the weights; the
                // server must not serve it until the file is whole.
                let staging = tempfile::tempdir().unwrap();
                make_model(staging.path(), "six");
                let full = std::fs::read(staging.path().join("six/model.safetensors")).unwrap();
                std::fs::create_dir_all(&vdir).unwrap();
                std::fs::copy(
                    staging.path().join("six/config.json"),
                    vdir.join("config.json"),
                )
                .unwrap();
                std::fs::write(vdir.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
                tokio::time::sleep(Duration::from_millis(2500)).await;
                assert_eq!(
                    served_version(&server, "poll-swapped").await,
                    [serving.to_string()],
                    "half-written version 6 is not served"
                );
                std::fs::write(vdir.join("model.safetensors"), &full).unwrap();
                refs.insert(v.to_string(), reference(&vdir, &input));
                serving = v;
            }
            _ => {
                publish(&root, "poll-swapped", v);
                refs.insert(v.to_string(), reference(&vdir, &input));
                serving = v;
            }
        }
        let want = [serving.to_string()];
        let until = Instant::now() + Duration::from_secs(30);
        while served_version(&server, "poll-swapped").await != want {
            assert!(
                Instant::now() < until,
                "version {serving} not served after 30 s: {:?}",
                index(&server).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Some answers from each version before the next.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut answers, mut errors) = (Vec::new(), Vec::new());
    for task in load {
        let (a, e) = task.await.unwrap();
        answers.extend(a);
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} failed requests, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    let mut per_version: BTreeMap<String, usize> = BTreeMap::new();
    for (version, logits) in &answers {
        let reference = refs
            .get(version)
            .unwrap_or_else(|| panic!("answer from version {version}, which should never serve"));
        assert!(
            max_diff(logits, reference) < 1e-4,
            "answer tagged {version} was computed by another version"
        );
        *per_version.entry(version.clone()).or_default() += 1;
    }
    let served: Vec<&String> = per_version.keys().collect();
    assert_eq!(
        served.len(),
        refs.len(),
        "every good version answered: {per_version:?}"
    );
    eprintln!(
        "swap under load: {} answers, 0 failed, by version {per_version:?}; rejected {:?}",
        answers.len(),
        bad.lock().unwrap()
    );
    let text = server.metrics_text();
    for v in [3, 5, 8] {
        let failed = sample(
            &text,
            &format!(
                r#"slimserve_model_loads_total{{model="poll-swapped",version="{v}",result="failure"}}"#
            ),
        );
        assert_eq!(
            failed,
            Some(1.0),
            "version {v} failed once and was not retried: {text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            r#"slimserve_model_versions_loaded{model="poll-swapped"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"slimserve_model_unloads_total{model="poll-swapped",version="10"}"#
        ),
        Some(1.0)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn explicit_mode_loads_and_unloads_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    publish(&root, "m", 1);
    make_model(&root, "other");
    std::fs::create_dir_all(root.join("broken/1")).unwrap();
    std::fs::write(root.join("broken/1/config.json"), "{}").unwrap();
    let server = TestServer::start_dir(dir, |c| {
        c.model_control = ModelControl::Explicit;
        c.load_model = vec!["other".into()];
    })
    .await;
    let mut kserve = server.kserve().await;
    let mut own = server.classifier().await;
    let (_, bytes) = f32_input(1, 3);
    let err = own
        .classify(classify_version("m", "", bytes.clone()))
        .await
        .unwrap_err();
    assert_status(&err, Code::NotFound, &["`m` not found"]);
    let idx = index(&server).await;
    assert_eq!(
        state_of(&idx, "m", ""),
        Some(&(
            "m".into(),
            String::new(),
            "UNAVAILABLE".into(),
            "unloaded".into()
        ))
    );
    assert_eq!(
        state_of(&idx, "other", "1").map(|e| e.2.as_str()),
        Some("READY")
    );

    let load = |name: &str| kpb::RepositoryModelLoadRequest {
        model_name: name.into(),
        ..Default::default()
    };
    kserve.repository_model_load(load("m")).await.unwrap();
    let r = own
        .classify(classify_version("m", "", bytes.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, "1");
    // Published, but explicit mode waits for a load.
    publish(&root, "m", 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_version(&server, "m").await, ["1"]);
    kserve.repository_model_load(load("m")).await.unwrap();
    assert_eq!(served_version(&server, "m").await, ["2"]);

    let err = kserve
        .repository_model_load(load("broken"))
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        &["`broken` failed to load", "version 1"],
    );
    let err = kserve
        .repository_model_load(load("nope"))
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::NotFound,
        &["`nope` not found", "broken, m, other"],
    );
    let mut with_override = load("m");
    with_override.parameters.insert(
        "config".into(),
        kpb::ModelRepositoryParameter {
            parameter_choice: Some(
                kpb::model_repository_parameter::ParameterChoice::StringParam("{}".into()),
            ),
        },
    );
    let err = kserve
        .repository_model_load(with_override)
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["parameter `config` is not supported"],
    );

    kserve
        .repository_model_unload(kpb::RepositoryModelUnloadRequest {
            model_name: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = own
        .classify(classify_version("other", "", bytes))
        .await
        .unwrap_err();
    assert_status(&err, Code::NotFound, &["`other` not found"]);
    let idx = index(&server).await;
    assert_eq!(
        state_of(&idx, "other", "").map(|e| e.3.as_str()),
        Some("unloaded"),
        "{idx:?}"
    );
    assert!(
        state_of(&idx, "broken", "1").is_some_and(|e| e.2 == "UNAVAILABLE" && !e.3.is_empty()),
        "{idx:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn explicit_mode_is_refused_on_an_open_address_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.model_control = ModelControl::Explicit;
    c.grpc_addr = "0.0.0.0:0".parse().unwrap();
    let err = slimserve::server::Server::bind(c.clone())
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("--allow-remote-model-control"),
        "{err}"
    );
    c.allow_remote_model_control = true;
    assert!(slimserve::server::Server::bind(c.clone()).await.is_ok());
    c.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.allow_remote_model_control = false;
    assert!(
        slimserve::server::Server::bind(c).await.is_ok(),
        "loopback is allowed"
    );
}
