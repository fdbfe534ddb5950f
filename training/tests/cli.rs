//! `slimtrain` as a user runs it: import, quantize and export-onnx on small real models,
//! and the errors a user sees for bad input.
//!
//! The PyTorch checkpoints are written by `tests/python/make_torch_checkpoint.py` (torch.save's
//! zip layout, without PyTorch), so the Python with numpy from `$SLIMSERVE_PYTHON` or the
//! workspace `.venv` is required; without it these tests fail rather than skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use slimserve::formats::model_dir::{self, ModelConfig};
use slimserve::formats::weights::WeightFormat;
use slimserve::zoo::{Arch, Model, ModelSpec};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn python() -> PathBuf {
    let py = std::env::var_os("SLIMSERVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        py.exists(),
        "{} does not exist: create it with `python3 -m venv .venv && .venv/bin/pip install numpy onnxruntime onnx` \
         in the workspace root, or set SLIMSERVE_PYTHON",
        py.display()
    );
    py
}

fn slimtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slimtrain"))
        .args(args)
        .output()
        .expect("run slimtrain")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "slimtrain failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    err
}

/// A small random `student-deeper` (pruned widths, 5 classes) saved as an f32 model directory.
fn make_model(dir: &Path) -> (ModelConfig, BTreeMap<String, Tensor>) {
    let mut spec = ModelSpec::new(Arch::StudentDeeper, 5, 32);
    spec.widths = vec![16, 32, 64, 120, 120, 120, 240, 240, 240];
    let (varmap, _) = Model::init(&spec, &Device::Cpu).unwrap();
    let tensors = slimserve::zoo::varmap_tensors(&varmap);
    let config = ModelConfig::new(spec, (0..5).map(|i| format!("c{i}")).collect());
    model_dir::save(dir, &config, &tensors).unwrap();
    (config, tensors)
}

fn make_checkpoint(src: &Path, out: &Path, extra: &[&str]) {
    let status = Command::new(python())
        .arg(workspace().join("tests/python/make_torch_checkpoint.py"))
        .arg("--safetensors")
        .arg(src)
        .arg("--out")
        .arg(out)
        .args(extra)
        .status()
        .expect("run python");
    assert!(status.success(), "make_torch_checkpoint.py failed");
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn import_reads_a_pytorch_zip_checkpoint_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let (config, tensors) = make_model(&src);
    let ckpt = tmp.path().join("student.pth");
    make_checkpoint(
        &src.join("model.safetensors"),
        &ckpt,
        &["--key", "state_dict", "--prefix", "module."],
    );

    let out = tmp.path().join("imported");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let stdout = ok(&slimtrain(&[
        "import",
        "--checkpoint",
        &s(&ckpt),
        "--arch",
        "student-deeper",
        "--input-size",
        "32",
        "--labels",
        "c0,c1,c2,c3,c4",
        "--out",
        &s(&out),
    ]));
    assert!(stdout.contains("imported"), "{stdout}");
    let loaded = model_dir::load(&out).unwrap();
    assert_eq!(
        loaded.config.spec, config.spec,
        "widths and classes read off the tensors"
    );
    assert_eq!(loaded.tensors.len(), tensors.len());
    for (k, t) in &tensors {
        assert_eq!(max_abs_diff(t, &loaded.tensors[k]), 0.0, "{k}");
    }
}

/// The legacy (pre-1.6) format and strided, offset storage views give the same weights.
#[test]
fn import_reads_legacy_and_strided_checkpoints_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let (_, tensors) = make_model(&src);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (name, extra) in [
        ("legacy.pth", vec!["--legacy"]),
        ("strided.pth", vec!["--strided"]),
        ("legacy-strided.pth", vec!["--legacy", "--strided"]),
    ] {
        let ckpt = tmp.path().join(name);
        make_checkpoint(&src.join("model.safetensors"), &ckpt, &extra);
        let out = tmp.path().join(format!("{name}.model"));
        ok(&slimtrain(&[
            "import",
            "--checkpoint",
            &s(&ckpt),
            "--arch",
            "student-deeper",
            "--input-size",
            "32",
            "--out",
            &s(&out),
        ]));
        let loaded = model_dir::load(&out).unwrap();
        assert_eq!(loaded.tensors.len(), tensors.len(), "{name}");
        for (k, t) in &tensors {
            assert_eq!(max_abs_diff(t, &loaded.tensors[k]), 0.0, "{name} {k}");
        }
    }
}

#[test]
fn import_errors_name_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_model(&src);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = s(&tmp.path().join("out"));

    let bad_shape = tmp.path().join("bad_shape.pth");
    make_checkpoint(
        &src.join("model.safetensors"),
        &bad_shape,
        &["--reshape", "cnn.2.3.weight"],
    );
    let err = failed(&slimtrain(&[
        "import",
        "--checkpoint",
        &s(&bad_shape),
        "--arch",
        "student-deeper",
        "--input-size",
        "32",
        "--out",
        &out,
    ]));
    assert!(
        err.contains("bad_shape.pth") && err.contains("`cnn.2.3.weight` has shape"),
        "{err}"
    );

    let good = tmp.path().join("good.pth");
    make_checkpoint(&src.join("model.safetensors"), &good, &[]);
    let err = failed(&slimtrain(&[
        "import",
        "--checkpoint",
        &s(&good),
        "--arch",
        "student",
        "--input-size",
        "32",
        "--out",
        &out,
    ]));
    assert!(err.contains("good.pth") && err.contains("student"), "{err}");

    // A file that names a global outside the allow-list (what `pickle` writes for an object
    // whose __reduce__ calls os.system) is refused by name; nothing is run.
    let evil = tmp.path().join("evil.pth");
    std::fs::write(
        &evil,
        b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    let err = failed(&slimtrain(&[
        "import",
        "--checkpoint",
        &s(&evil),
        "--arch",
        "student-deeper",
        "--out",
        &out,
    ]));
    assert!(
        err.contains("evil.pth") && err.contains("refused global `posix.system`"),
        "{err}"
    );

    let garbage = tmp.path().join("garbage.bin");
    std::fs::write(&garbage, b"hello world, not a checkpoint").unwrap();
    let err = failed(&slimtrain(&[
        "import",
        "--checkpoint",
        &s(&garbage),
        "--arch",
        "big",
        "--out",
        &out,
    ]));
    assert!(err.contains("garbage.bin"), "{err}");
    assert!(
        !Path::new(&out).exists(),
        "no model directory is written on error"
    );
}

#[test]
fn quantize_then_export_onnx() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("f32");
    let (_, tensors) = make_model(&src);
    let q8 = tmp.path().join("q8");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&slimtrain(&[
        "quantize",
        "--model",
        &s(&src),
        "--out",
        &s(&q8),
        "--format",
        "uint8",
    ]));
    let loaded = model_dir::load(&q8).unwrap();
    assert_eq!(loaded.config.weights.format, WeightFormat::Uint8);
    let f32_bytes = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        loaded.file_bytes * 3 < f32_bytes,
        "{} vs {f32_bytes}",
        loaded.file_bytes
    );
    for (k, t) in &tensors {
        let range = (t.max_all().unwrap().to_scalar::<f32>().unwrap()
            - t.min_all().unwrap().to_scalar::<f32>().unwrap())
        .max(0.0);
        assert!(
            max_abs_diff(t, &loaded.tensors[k]) <= range / 510.0 + 1e-6,
            "{k}"
        );
    }

    let onnx = tmp.path().join("m.onnx");
    let stdout = ok(&slimtrain(&[
        "export-onnx",
        "--model",
        &s(&q8),
        "--out",
        &s(&onnx),
    ]));
    assert!(stdout.contains("opset 17"), "{stdout}");
    assert!(
        std::fs::metadata(&onnx).unwrap().len() > 4 * 200_000,
        "dequantized f32 initializers"
    );

    let err = failed(&slimtrain(&[
        "quantize",
        "--model",
        &s(&src),
        "--out",
        &s(&q8),
        "--format",
        "int4",
    ]));
    assert!(err.contains("int4"), "{err}");
    let err = failed(&slimtrain(&[
        "export-onnx",
        "--model",
        "/nonexistent/model",
        "--out",
        &s(&onnx),
    ]));
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

/// `bench` end to end at a tiny size: ONNX Runtime in its child and the fused engine take
/// turns (a separable student, candle-only `group-conv` and the pretrained teacher's
/// MobileNetV2, channels-last); the JSON rows carry both rates, their ratio and the per-round
/// ratios' quartiles, and bad settings are refused.
#[test]
fn bench_compares_the_fused_engine_with_onnx_runtime() {
    let py = python();
    let py = py.to_str().unwrap();
    let out = slimtrain(&[
        "bench",
        "--arch",
        "student-deeper,group-conv,mobilenet-v2",
        "--input-size",
        "32",
        "--batch",
        "1,2",
        "--threads",
        "1",
        "--seconds",
        "0.2",
        "--rounds",
        "2",
        "--python",
        py,
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).expect("bench --json output");
    assert!(json["sgemm_peak_gflops"].as_f64().unwrap() > 0.0);
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
    for row in rows {
        let ort = row["ort_images_per_s"].as_f64().unwrap();
        let candle = row["candle_images_per_s"].as_f64().unwrap();
        assert!(ort > 0.0 && candle > 0.0, "{row}");
        let best = match row["arch"].as_str().unwrap() {
            // group-conv has no fused form: candle's path is the best there is.
            "group-conv" => {
                assert!(row["fused_images_per_s"].is_null(), "{row}");
                assert!(row["paired_ratio"].is_null(), "{row}");
                candle
            }
            _ => {
                // Per-round fused / ORT ratios: ordered quartiles, positive.
                let q = &row["paired_ratio"];
                let (q1, m, q3) = (
                    q["q1"].as_f64().unwrap(),
                    q["median"].as_f64().unwrap(),
                    q["q3"].as_f64().unwrap(),
                );
                assert!(0.0 < q1 && q1 <= m && m <= q3, "{row}");
                row["fused_images_per_s"].as_f64().unwrap().max(candle)
            }
        };
        let ratio = row["ratio"].as_f64().unwrap();
        assert!((ratio - best / ort).abs() < 1e-9 * ratio.max(1.0), "{row}");
    }

    for (flag, value, want) in [
        ("--rounds", "0", "--rounds"),
        ("--seconds", "0", "--seconds"),
        ("--seconds", "nan", "--seconds"),
    ] {
        let out = slimtrain(&["bench", "--arch", "student", flag, value, "--python", py]);
        let err = failed(&out);
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
    let out = slimtrain(&[
        "bench",
        "--arch",
        "student",
        "--input-size",
        "32",
        "--seconds",
        "0.1",
        "--python",
        "/nonexistent/python3",
    ]);
    let err = failed(&out);
    assert!(err.contains("/nonexistent/python3"), "{err}");
}
