//! KServe v2 over HTTP/REST (`--http-addr`), spoken byte by byte over a plain TCP socket: the
//! answers must equal the own API's, and every bad request must get its HTTP status and a JSON
//! error naming the problem. (tritonclient.http and perf_analyzer: tests/server/triton.rs and
//! by hand, loadtest/README.md.)

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use slimserve::grpc::pb::slimserve::v1 as pb;

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: body {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), read to the end.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) and close before reading all of a large body.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = raw[split + 4..].to_vec();
    if let Some((_, n)) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        assert_eq!(body.len(), n.parse::<usize>().unwrap(), "body length");
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// `n` deterministic 32x32 RGB images, NHWC.
fn pixels(n: usize, seed: usize) -> Vec<u8> {
    (0..n * SIZE * SIZE * 3)
        .map(|i| ((i * 7919 + seed * 104729) % 251) as u8)
        .collect()
}

fn infer_json(pixels: &[u8], n: usize, binary: bool) -> serde_json::Value {
    let mut input = serde_json::json!({
        "name": "image",
        "datatype": "UINT8",
        "shape": [n, SIZE, SIZE, 3],
    });
    if binary {
        input["parameters"] = serde_json::json!({ "binary_data_size": pixels.len() });
    } else {
        input["data"] = serde_json::json!(pixels);
    }
    serde_json::json!({
        "id": "req-7",
        "inputs": [input],
        "outputs": [{ "name": "logits", "parameters": { "binary_data": binary } }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_inference_answers_what_the_own_api_answers() {
    const M: &str = "rest";
    let s = TestServer::start(&[M], |_| {}).await;
    let addr = s.http.expect("HTTP/REST on");
    let x = pixels(2, 3);
    let mut own = Vec::new();
    let mut c = s.classifier().await;
    for row in x.chunks(SIZE * SIZE * 3) {
        let r = c
            .classify(tensor_request(
                M,
                pb::DataType::Uint8,
                &[32, 32, 3],
                row.to_vec(),
            ))
            .await
            .unwrap()
            .into_inner();
        own.push(r.logits);
    }
    assert!(
        max_diff(&own[0], &own[1]) > 1e-3,
        "the test model's rows must differ"
    );

    // JSON numbers in and out.
    let body = serde_json::to_vec(&infer_json(&x, 2, false)).unwrap();
    let a = http(addr, "POST", &format!("/v2/models/{M}/infer"), &[], &body).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("content-type"), Some("application/json"));
    let v = a.json();
    assert_eq!(v["model_name"], M);
    assert_eq!(v["model_version"], "1");
    assert_eq!(v["id"], "req-7");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([2, CLASSES]));
    let data: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(data, own.concat(), "JSON logits equal the own API's");

    // The binary tensor extension both ways, on the versioned path.
    let head = serde_json::to_vec(&infer_json(&x, 2, true)).unwrap();
    let mut body = head.clone();
    body.extend_from_slice(&x);
    let a = http(
        addr,
        "POST",
        &format!("/v2/models/{M}/versions/1/infer"),
        &[("Inference-Header-Content-Length", head.len().to_string())],
        &body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let len: usize = a
        .header("inference-header-content-length")
        .expect("binary answer names its JSON length")
        .parse()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&a.body[..len]).unwrap();
    assert_eq!(
        v["outputs"][0]["parameters"]["binary_data_size"],
        2 * CLASSES * 4
    );
    let logits: Vec<f32> = a.body[len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(logits, own.concat(), "binary logits equal the own API's");

    // Metadata, config and statistics are the gRPC service's.
    let meta = http(addr, "GET", &format!("/v2/models/{M}"), &[], b"")
        .await
        .json();
    assert_eq!(
        meta["inputs"][0]["shape"],
        serde_json::json!([-1, SIZE, SIZE, 3])
    );
    assert_eq!(meta["versions"], serde_json::json!(["1"]));
    let config = http(addr, "GET", &format!("/v2/models/{M}/config"), &[], b"")
        .await
        .json();
    assert_eq!(config["input"][0]["data_type"], "TYPE_UINT8");
    assert_eq!(config["max_batch_size"], 32);
    let stats = http(addr, "GET", "/v2/models/stats", &[], b"").await.json();
    assert_eq!(stats["model_stats"][0]["inference_count"], 6);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_bad_requests_with_their_http_status() {
    const M: &str = "m";
    let s = TestServer::start(&[M], |c| c.max_message_bytes = 20_000).await;
    let addr = s.http.unwrap();
    let good = serde_json::to_vec(&infer_json(&pixels(1, 1), 1, false)).unwrap();
    let infer = format!("/v2/models/{M}/infer");
    let head = serde_json::to_vec(&infer_json(&pixels(1, 1), 1, true)).unwrap();
    let mut oversize = head.clone();
    oversize.resize(head.len() + 20_001, 0);
    let seven = br#"{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,7,7,3],"data":[0]}]}"#;
    /// Method, path, headers, body, expected status, a phrase of the expected error.
    type Case<'a> = (
        &'a str,
        String,
        Vec<(&'a str, String)>,
        Vec<u8>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("GET", "/v2/health/live".into(), vec![], vec![], 200, ""),
        ("GET", "/v2/health/ready".into(), vec![], vec![], 200, ""),
        (
            "GET",
            format!("/v2/models/{M}/ready"),
            vec![],
            vec![],
            200,
            "",
        ),
        (
            "GET",
            "/v2/models/nope/ready".into(),
            vec![],
            vec![],
            400,
            "",
        ),
        (
            "GET",
            "/v2/models/nope".into(),
            vec![],
            vec![],
            404,
            "model `nope` not found",
        ),
        (
            "GET",
            format!("/v2/models/{M}/versions/7"),
            vec![],
            vec![],
            404,
            "no version `7`",
        ),
        (
            "POST",
            "/v2/models/nope/infer".into(),
            vec![],
            good.clone(),
            404,
            "not found",
        ),
        (
            "POST",
            infer.clone(),
            vec![],
            b"{".to_vec(),
            400,
            "inference request JSON",
        ),
        (
            "POST",
            infer.clone(),
            vec![],
            seven.to_vec(),
            400,
            "expects UINT8 [N, 32, 32, 3]",
        ),
        (
            "POST",
            infer.clone(),
            vec![("Content-Encoding", "gzip".into())],
            good.clone(),
            415,
            "Content-Encoding `gzip`",
        ),
        (
            "POST",
            infer.clone(),
            vec![("Inference-Header-Content-Length", head.len().to_string())],
            oversize,
            413,
            "limit of 20000 bytes",
        ),
        (
            "POST",
            infer.clone(),
            vec![("Inference-Header-Content-Length", "lots".into())],
            good.clone(),
            400,
            "not a byte count",
        ),
        (
            "POST",
            format!("/v2/repository/models/{M}/load"),
            vec![],
            vec![],
            400,
            "--model-control",
        ),
        (
            "GET",
            "/v1/models".into(),
            vec![],
            vec![],
            404,
            "no endpoint /v1/models",
        ),
        ("GET", infer.clone(), vec![], vec![], 405, ""),
    ];
    for (method, path, headers, body, status, needle) in cases {
        let a = http(addr, method, &path, &headers, &body).await;
        let text = String::from_utf8_lossy(&a.body).to_string();
        assert_eq!(a.status, status, "{method} {path}: {text}");
        if !needle.is_empty() {
            assert!(
                a.json()["error"].as_str().unwrap().contains(needle),
                "{method} {path}: {text}"
            );
        }
    }
    // Still serving after all of that.
    let a = http(addr, "POST", &infer, &[], &good).await;
    assert_eq!(a.status, 200);
    s.stop().await.unwrap();
}

/// Explicit model control: repository changes over plaintext HTTP only on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_repository_changes_need_a_loopback_http_address() {
    let s = TestServer::start(&["m"], |c| {
        c.model_control = slimserve::pipeline::ModelControl::Explicit;
        c.load_model = vec!["*".into()];
        c.http_addr = Some(slimserve::rest::HttpAddr::On("0.0.0.0:0".parse().unwrap()));
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], s.http.unwrap().port()).into();
    let a = http(addr, "POST", "/v2/repository/models/m/unload", &[], b"").await;
    assert_eq!(a.status, 403);
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("--allow-remote-model-control"));
    let index = http(addr, "POST", "/v2/repository/index", &[], b"")
        .await
        .json();
    assert_eq!(index[0]["name"], "m");
    assert_eq!(index[0]["state"], "READY");
    s.stop().await.unwrap();

    let s = TestServer::start(&["m"], |c| {
        c.model_control = slimserve::pipeline::ModelControl::Explicit;
        c.load_model = vec!["*".into()];
    })
    .await;
    let addr = s.http.unwrap();
    let a = http(addr, "POST", "/v2/repository/models/m/unload", &[], b"{}").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let a = http(addr, "GET", "/v2/models/m/ready", &[], b"").await;
    assert_eq!(a.status, 400, "unloaded");
    let a = http(addr, "POST", "/v2/repository/models/m/load", &[], b"").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let a = http(addr, "GET", "/v2/models/m/ready", &[], b"").await;
    assert_eq!(a.status, 200, "loaded again");
    s.stop().await.unwrap();
}
