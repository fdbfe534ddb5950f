//! A real Prometheus (Debian package `prometheus`, installed by `.ci/setup`) scrapes the
//! server's /metrics every second; its query API must then hold each model's latency histogram.
//! (Metrics are process-wide, so other tests' models show up too; queries select this test's.)

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Kills the Prometheus this test started when the test ends, pass or fail.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn query(port: u16, promql: &str) -> Result<serde_json::Value, String> {
    let mut q = String::new();
    for b in promql.bytes() {
        if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
            q.push(b as char);
        } else {
            q += &format!("%{b:02X}");
        }
    }
    let body = try_http_get(
        ([127, 0, 0, 1], port).into(),
        &format!("/api/v1/query?query={q}"),
    )?;
    serde_json::from_str(&body).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_each_models_latency_histogram() {
    let models = ["prom-big", "prom-small"];
    let binary = ["prometheus", "/usr/bin/prometheus"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "`prometheus` is not installed: run `bash .ci/setup` (installs the Debian package)",
        );

    let s = TestServer::start(&models, |_| {}).await;
    let mut c = s.classifier().await;
    for m in models {
        for _ in 0..3 {
            c.classify(image_request(m, png(40, 40))).await.unwrap();
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: slimserve\n    static_configs:\n      - targets: ['{}']\n",
            s.metrics
        ),
    )
    .unwrap();
    let port = free_port();
    let _prometheus = Prometheus(
        Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(answer) = query(
            port,
            "count by (model) (slimserve_request_duration_seconds_bucket{model=~\"prom-.*\"})",
        ) else {
            continue; // not listening yet
        };
        seen = answer["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| s["metric"]["model"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if models.iter().all(|m| seen.iter().any(|s| s == m)) {
            break;
        }
    }
    for m in models {
        assert!(
            seen.iter().any(|s| s == m),
            "Prometheus has no latency histogram for {m}: {seen:?}"
        );
    }
    // What an operator would chart: p99 latency per model, straight from the buckets.
    let p99 = query(
        port,
        "histogram_quantile(0.99, sum by (model, le) (slimserve_request_duration_seconds_bucket{model=~\"prom-.*\"}))",
    )
    .unwrap();
    let rows = p99["data"]["result"].as_array().unwrap();
    assert_eq!(rows.len(), models.len(), "{p99}");
    for row in rows {
        let v: f64 = row["value"][1].as_str().unwrap().parse().unwrap();
        assert!(
            v > 0.0 && v < 10.0,
            "p99 {v} for {}",
            row["metric"]["model"]
        );
    }
}
