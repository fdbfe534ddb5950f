//! `/metrics`: per-model histograms and series an operator compares models with.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_has_per_model_histograms() {
    let s = TestServer::start(&["m-alpha", "m-beta"], |_| {}).await;
    let mut c = s.classifier().await;
    for model in ["m-alpha", "m-beta"] {
        for _ in 0..3 {
            c.classify(image_request(model, png(40, 40))).await.unwrap();
        }
    }
    let status = c
        .classify(image_request("m-alpha", vec![]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let text = s.metrics_text();
    for model in ["m-alpha", "m-beta"] {
        for hist in [
            "slimserve_request_duration_seconds{model=\"M\",version=\"1\",",
            "slimserve_queue_wait_seconds{model=\"M\",version=\"1\",",
            "slimserve_preprocess_duration_seconds{model=\"M\",version=\"1\",kind=\"image\",",
            "slimserve_batch_upload_duration_seconds{model=\"M\",version=\"1\",",
            "slimserve_batch_compute_duration_seconds{model=\"M\",version=\"1\",",
        ] {
            let (name, labels) = hist.split_once('{').unwrap();
            let labels = labels.replace('M', model);
            for le in ["0.0005", "0.001", "0.01", "0.1", "1", "10", "+Inf"] {
                let series = format!("{name}_bucket{{{labels}le=\"{le}\"}}");
                assert!(sample(&text, &series).is_some(), "missing {series}");
            }
        }
        let count =
            format!("slimserve_request_duration_seconds_count{{model=\"{model}\",version=\"1\"}}");
        assert_eq!(sample(&text, &count), Some(3.0), "{count}");
        assert!(sample(
            &text,
            &format!(
                "slimserve_batch_size_inputs_bucket{{model=\"{model}\",version=\"1\",le=\"32\"}}"
            )
        )
        .is_some());
        assert!(text.contains(&format!(
            "slimserve_queue_depth_inputs{{model=\"{model}\",version=\"1\"}} 0"
        )));
        assert!(text.contains(&format!(
            "slimserve_in_flight_inputs{{model=\"{model}\",version=\"1\"}} 0"
        )));
        let info = text
            .lines()
            .find(|l| {
                l.starts_with("slimserve_model_info{") && l.contains(&format!("model=\"{model}\""))
            })
            .unwrap_or_else(|| panic!("no model info for {model}"));
        for label in [
            "architecture=\"student\"",
            "format=\"f32\"",
            "parameters=\"",
            "file_bytes=\"",
            "device=\"cpu\"",
            // students run on the compiled CPU engine
            "engine=\"fused\"",
        ] {
            assert!(info.contains(label), "{info} lacks {label}");
        }
    }
    assert!(text
        .contains("slimserve_requests_total{model=\"m-alpha\",version=\"1\",method=\"Classify\",code=\"OK\"} 3"));
    assert!(text.contains(
        "slimserve_requests_total{model=\"m-alpha\",version=\"1\",method=\"Classify\",code=\"INVALID_ARGUMENT\"} 1"
    ));
    assert!(text.contains("# HELP slimserve_request_duration_seconds"));
}
