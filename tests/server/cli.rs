//! The `slimserve` binary: `classify` against a running server, and `serve` with no models
//! stopping cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_slimserve");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_prints_top_labels_and_fails_clearly() {
    let s = TestServer::start(&["cli"], |_| {}).await;
    let photo = s.dir.path().join("photo.jpg");
    std::fs::write(&photo, jpeg(300, 200)).unwrap();
    let junk = s.dir.path().join("notes.txt");
    std::fs::write(&junk, "not a photo").unwrap();
    let addr = s.grpc.to_string();

    let run = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .arg("classify")
                .args(args)
                .output()
                .unwrap()
        })
    };
    let p = photo.display().to_string();
    let out = run(vec![
        "--addr".into(),
        addr.clone(),
        "--top-k".into(),
        "2".into(),
        p.clone(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("photo.jpg (model cli"), "{stdout}");
    assert!(
        stdout.contains("  1. class_") && stdout.contains("  2. class_"),
        "{stdout}"
    );
    assert!(!stdout.contains("  3. "), "{stdout}");

    let failures = [
        (
            vec!["--addr".into(), addr.clone(), junk.display().to_string()],
            "INVALID_ARGUMENT: not a supported image",
        ),
        (
            vec![
                "--addr".into(),
                addr.clone(),
                "--model".into(),
                "nope".into(),
                p.clone(),
            ],
            "NOT_FOUND: model `nope` not found",
        ),
        (
            vec!["--addr".into(), addr.clone(), "/no/such/photo.jpg".into()],
            "/no/such/photo.jpg",
        ),
        (
            vec!["--addr".into(), "127.0.0.1:1".into(), p.clone()],
            "cannot connect to 127.0.0.1:1",
        ),
    ];
    // One bad file among good ones: every good answer is printed, every bad file named on
    // stderr, the run fails at the end. A model error is not per image: it stops at once.
    let photo2 = s.dir.path().join("second.png");
    std::fs::write(&photo2, png(40, 30)).unwrap();
    let out = run(vec![
        "--addr".into(),
        addr.clone(),
        p.clone(),
        junk.display().to_string(),
        "/no/such/photo.jpg".into(),
        photo2.display().to_string(),
    ])
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("photo.jpg (model cli"), "{stdout}");
    assert!(stdout.contains("second.png (model cli"), "{stdout}");
    assert!(
        stderr.contains("notes.txt: server answered INVALID_ARGUMENT"),
        "{stderr}"
    );
    assert!(stderr.contains("/no/such/photo.jpg"), "{stderr}");
    assert!(stderr.contains("2 of 4 images failed"), "{stderr}");
    let out = run(vec![
        "--addr".into(),
        addr.clone(),
        "--model".into(),
        "nope".into(),
        p.clone(),
        photo2.display().to_string(),
    ])
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.matches("NOT_FOUND").count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());

    for (args, message) in failures {
        let out = run(args).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "expected failure for {message}");
        assert!(
            stderr.contains(message),
            "stderr `{stderr}` lacks `{message}`"
        );
    }
}

#[test]
fn serve_without_models_says_so_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--models",
        ])
        .arg(dir.path().join("models"))
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let done = line.contains("no models found");
        log.push(line);
        if done {
            break;
        }
    }
    assert!(log.iter().any(|l| l.contains("no models found")), "{log:?}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        log.push(line);
    }
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
}
