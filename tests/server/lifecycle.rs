//! Start-up, health, reflection and graceful shutdown.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::*;
use slimserve::grpc::pb::slimserve::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_warm_and_while_draining() {
    const M: &str = "health";
    // The compute delay also slows the warm-up pass, which keeps the server loading a while.
    let mut s = TestServer::start_unready(&[M], |c| {
        c.inject_compute_delay = Duration::from_millis(300);
    })
    .await;
    assert_eq!(s.health("").await, ServingStatus::NotServing);
    assert_eq!(
        s.health("slimserve.v1.Classifier").await,
        ServingStatus::NotServing
    );
    let mut c = s.classifier().await;
    let status = c.classify(image_request(M, png(8, 8))).await.unwrap_err();
    assert_status(&status, Code::Unavailable, &["models are still loading"]);

    s.wait_serving().await;
    assert_eq!(
        s.health("inference.GRPCInferenceService").await,
        ServingStatus::Serving
    );

    let mut busy = c.clone();
    let accepted = tokio::spawn(async move { busy.classify(image_request(M, png(8, 8))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.health("").await, ServingStatus::NotServing);
    assert_eq!(
        s.health("slimserve.v1.Classifier").await,
        ServingStatus::NotServing
    );
    accepted.await.unwrap().expect("accepted request answered");
    s.stop().await.expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_accepted_requests_and_refuses_new_ones() {
    const M: &str = "drain";
    let mut s = TestServer::start(&[M], |c| {
        c.max_batch_size = Some(1);
        c.inject_compute_delay = Duration::from_millis(300);
    })
    .await;
    let c = s.classifier().await;
    let accepted: Vec<_> = (0..3)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.classify(image_request(M, png(8, 8))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut late = c.clone();
    let status = late
        .classify(image_request(M, png(8, 8)))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unavailable, &["shutting down"]);
    for call in accepted {
        let r = call
            .await
            .unwrap()
            .expect("accepted before shutdown, answered after");
        assert_eq!(r.into_inner().model, M);
    }
    s.stop().await.expect("clean exit after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let s = TestServer::start(&["refl"], |_| {}).await;
    let mut client = ServerReflectionClient::new(s.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "slimserve.v1.Classifier",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_model_stops_start_up_naming_the_file_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), "good");
    make_model(dir.path(), "broken");
    let weights = dir.path().join("broken/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();

    let server = slimserve::server::Server::bind(config(dir.path()))
        .await
        .unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        server.serve(std::future::pending()),
    )
    .await
    .expect("start-up fails promptly")
    .unwrap_err()
    .to_string();
    assert!(err.contains("broken/model.safetensors"), "{err}");
    assert!(err.contains("--skip-bad-models"), "{err}");

    let mut c = config(dir.path());
    c.skip_bad_models = true;
    let server = slimserve::server::Server::bind(c).await.unwrap();
    let addr = server.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ClassifierClient::new(channel);
    let listed = loop {
        match client.list_models(pb::ListModelsRequest {}).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    let names: Vec<&str> = listed.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["good"]);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_models_still_starts_and_lists_none() {
    let s = TestServer::start(&[], |_| {}).await;
    let mut c = s.classifier().await;
    let listed = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.models.is_empty());
    let status = c.classify(image_request("", png(8, 8))).await.unwrap_err();
    assert_status(&status, Code::NotFound, &["no model is loaded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_describes_each_model() {
    let s = TestServer::start(&["a-model", "b-model"], |c| {
        c.default_model = Some("b-model".into())
    })
    .await;
    let mut c = s.classifier().await;
    let listed = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.default_model, "b-model");
    let a = &listed.models[0];
    assert_eq!(a.name, "a-model");
    assert_eq!(a.architecture, "student");
    assert_eq!(a.weight_format, "f32");
    assert_eq!(a.input_shape, [3, 32, 32]);
    assert_eq!(a.labels.len(), CLASSES);
    assert_eq!(a.val_accuracy, Some(0.5));
    assert!(a.parameters > 0 && a.file_bytes > a.parameters * 4 && a.macs > 0);
    // Versions are numbers (perf_analyzer parses them); the weights' hash is beside them.
    assert_eq!(a.version, "1");
    assert_eq!(a.weights_digest.len(), 16);
    assert!(a.weights_digest.chars().all(|c| c.is_ascii_hexdigit()));
    // The empty model name means the default model.
    let r = c
        .classify(image_request("", png(8, 8)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model, "b-model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_device_without_the_feature_is_a_start_up_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.device = "cuda:0".parse().unwrap();
    let err = slimserve::server::Server::bind(c)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("--features cuda"), "{err}");
}
