//! End-to-end training as a user runs it, on a small generated Food-11-layout folder:
//! train, distill, eval, quantize, prune, a corrupt image, and resume after `kill -9`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

fn slimtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slimtrain"))
        .args(args)
        .output()
        .expect("run slimtrain")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "slimtrain failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Three classes told apart by colour, with noise so that training has something to do.
fn photo(label: usize, i: usize) -> RgbImage {
    let base = [[200u8, 40, 40], [40, 200, 40], [40, 40, 200]][label];
    RgbImage::from_fn(40, 36, |x, y| {
        let n = ((x as usize * 7 + y as usize * 13 + i * 31) % 50) as u8;
        Rgb([
            base[0].saturating_add(n),
            base[1].saturating_add(n),
            base[2].saturating_add(n),
        ])
    })
}

/// `<root>/{training,validation}/<label>_<n>.jpg`, plus one corrupt training file.
fn food11(root: &Path, per_class_train: usize) -> PathBuf {
    for (split, n) in [("training", per_class_train), ("validation", 3)] {
        let dir = root.join(split);
        std::fs::create_dir_all(&dir).unwrap();
        for label in 0..3 {
            for i in 0..n {
                photo(label, i)
                    .save(dir.join(format!("{label}_{i}.jpg")))
                    .unwrap();
            }
        }
    }
    std::fs::write(
        root.join("training/1_999.jpg"),
        b"\xff\xd8\xff\xe0 truncated",
    )
    .unwrap();
    root.to_path_buf()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn run(args: &[String]) -> Output {
    slimtrain(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn train_distill_eval_quantize_prune_on_a_food11_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = s(&food11(&tmp.path().join("food-11"), 8));
    let common = strings(&["--batch-size", "4", "--epochs", "2"]);

    let teacher = tmp.path().join("big");
    let mut args = strings(&[
        "train",
        "--arch",
        "big",
        "--data",
        &data,
        "--out",
        &s(&teacher),
        "--input-size",
        "64",
    ]);
    args.extend(common.clone());
    let log = ok(&run(&args));
    assert!(
        log.contains("1_999.jpg"),
        "the corrupt image is reported by path: {log}"
    );
    let csv = std::fs::read_to_string(teacher.join("log.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "header + one row per epoch: {csv}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(teacher.join("best/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "big");
    assert_eq!(cfg["labels"][0], "bread");
    assert!(cfg["provenance"]["val_accuracy"].as_f64().is_some());
    assert_eq!(
        cfg["provenance"]["images_seen"], 48,
        "2 epochs of the 24 readable training images"
    );

    // --train-on-val: the 9 validation images join the 24 training ones for a fixed epoch
    // count, the last epoch is kept, and no held-out validation figure is recorded.
    let tv = tmp.path().join("train-on-val");
    let tv_run = |extra: &[&str]| {
        let mut a = strings(&[
            "train",
            "--arch",
            "student-deeper",
            "--data",
            &data,
            "--out",
            &s(&tv),
            "--input-size",
            "32",
            "--batch-size",
            "4",
        ]);
        a.extend(strings(extra));
        run(&a)
    };
    let log = ok(&tv_run(&["--epochs", "1", "--train-on-val"]));
    assert!(log.contains("validation images trained on"), "{log}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tv.join("best/config.json")).unwrap()).unwrap();
    // 8 full batches of 4 from the 33 readable images (6 from the training images alone).
    assert_eq!(cfg["provenance"]["images_seen"], 32, "{cfg}");
    assert!(cfg["provenance"].get("val_accuracy").is_none(), "{cfg}");
    assert!(
        cfg["provenance"]["notes"]
            .as_str()
            .is_some_and(|n| n.contains("training and validation splits (34 images)")),
        "{cfg}"
    );
    // Resuming it without the flag would train the rest on other data: refused.
    let refused = tv_run(&["--epochs", "2", "--resume"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("had --train-on-val"),
        "{err}"
    );

    // The student must take the teacher's input size.
    let kd = tmp.path().join("kd");
    let mut args = strings(&[
        "distill",
        "--teacher",
        &s(&teacher.join("best")),
        "--arch",
        "student-deeper",
        "--data",
        &data,
        "--out",
        &s(&kd),
        "--temperature",
        "4",
        "--alpha",
        "0.5",
    ]);
    args.extend(common.clone());
    // A student of another input size than its teacher: each batch is resized for the teacher.
    let mut smaller = args.clone();
    let out_at = smaller.iter().position(|a| a == "--out").unwrap() + 1;
    smaller[out_at] = s(&tmp.path().join("kd32"));
    // ... and the teacher scores the same blended images as the student (mixup).
    smaller.extend(strings(&["--input-size", "32", "--mixup", "0.4"]));
    let resized = run(&smaller);
    assert!(
        resized.status.success(),
        "{}",
        String::from_utf8_lossy(&resized.stderr)
    );
    assert!(
        String::from_utf8_lossy(&resized.stderr)
            .contains("takes 64x64 inputs: each 32x32 batch is resized"),
        "{}",
        String::from_utf8_lossy(&resized.stderr)
    );
    args.extend(strings(&["--input-size", "64"]));
    ok(&run(&args));

    let q8 = tmp.path().join("kd-q8");
    ok(&slimtrain(&[
        "quantize",
        "--model",
        &s(&kd.join("best")),
        "--out",
        &s(&q8),
    ]));
    let eval = slimtrain(&["eval", "--model", &s(&q8), "--data", &data, "--json"]);
    ok(&eval);
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(report["images"], 9);
    assert_eq!(report["confusion"].as_array().unwrap().len(), 3);

    // int8: calibrated on the training images, evaluated on the int8 engine; without
    // calibration images it says what is missing.
    let int8 = tmp.path().join("kd-int8");
    let quantize_int8 = |extra: &[&str]| {
        let mut a = vec![
            "quantize".to_string(),
            "--model".into(),
            s(&kd.join("best")),
            "--out".into(),
            s(&int8),
            "--format".into(),
            "int8".into(),
        ];
        a.extend(strings(extra));
        slimtrain(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let refused = quantize_int8(&[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("--calibration-data"),
        "{err}"
    );
    ok(&quantize_int8(&[
        "--calibration-data",
        &data,
        "--calibration-images",
        "8",
    ]));
    let loaded = slimserve::formats::model_dir::load(&int8).unwrap();
    assert_eq!(loaded.config.weights.format.as_str(), "int8");
    assert!(loaded.calibration.is_some());
    let eval = slimtrain(&["eval", "--model", &s(&int8), "--data", &data, "--json"]);
    ok(&eval);
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(report["images"], 9);

    let pruned = tmp.path().join("pruned");
    ok(&slimtrain(&[
        "prune",
        "--model",
        &s(&kd.join("best")),
        "--rate",
        "0.9",
        "--steps",
        "2",
        "--data",
        &data,
        "--out",
        &s(&pruned),
        "--input-size",
        "64",
        "--batch-size",
        "4",
        "--epochs",
        "1",
    ]));
    let curve = std::fs::read_to_string(pruned.join("curve.csv")).unwrap();
    let params: Vec<u64> = curve
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect();
    assert_eq!(params.len(), 3, "{curve}");
    assert!(params[0] > params[1] && params[1] > params[2], "{curve}");
}

#[test]
fn resume_after_kill_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = food11(&tmp.path().join("food-11"), 40);
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--arch",
            "student",
            "--data",
            &s(&data),
            "--out",
            &s(out),
            "--input-size",
            "48",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--checkpoint-every",
            "1",
            "--seed",
            "7",
            // Blends and smoothing are keyed like the data order: a resumed run blends the
            // same batches the same way.
            "--mixup",
            "0.4",
            "--label-smoothing",
            "0.1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };

    let reference = tmp.path().join("reference");
    ok(&slimtrain(
        &args(&reference)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));

    let killed = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_slimtrain"))
        .args(args(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = killed.join("checkpoint/state.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s: Option<serde_json::Value> = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if s.is_some_and(|s| s["epoch"] == 0 && s["batch"].as_u64().unwrap_or(0) >= 3) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run finished before it could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "no mid-epoch checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let at_kill: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(at_kill["epoch"], 0, "killed mid-epoch");

    let mut resume = args(&killed);
    resume.push("--resume".into());
    let log = ok(&slimtrain(
        &resume.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(log.contains("resuming"), "{log}");

    for file in [
        "checkpoint/model.safetensors",
        "checkpoint/optimizer.safetensors",
        "best/model.safetensors",
    ] {
        let a = std::fs::read(reference.join(file)).unwrap();
        let b = std::fs::read(killed.join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
    let rows = |d: &Path| {
        std::fs::read_to_string(d.join("log.csv"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(
        rows(&killed),
        rows(&reference),
        "one log row per epoch, none lost or doubled"
    );

    // Starting over a finished run without --resume is refused rather than overwriting it.
    let again = slimtrain(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
}
