//! ONNX export parity: every architecture's exported graph, run by onnxruntime, must give the
//! candle eval-mode logits (max |a - b| / max |b| <= 1e-4), for batch 3 and batch 1 (the batch
//! dimension is symbolic). The graph must also pass `onnx.checker.check_model(full_check=True)`.
//!
//! Needs a Python with onnxruntime, onnx and numpy: `$SLIMSERVE_PYTHON`, else `.venv/bin/python`
//! in the package root. Without one the tests fail (they never skip).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, ModuleT, Tensor};
use slimserve::formats::onnx;
use slimserve::infer::FastModel;
use slimserve::zoo::{Arch, Model, ModelSpec};

const CLASSES: usize = 10;
const TOLERANCE: f32 = 1e-4;
const VENV_HINT: &str = "create a venv with `python3 -m venv .venv && .venv/bin/pip install \
    onnxruntime onnx numpy` in the package root, or point SLIMSERVE_PYTHON at a Python that \
    has those packages";

fn python() -> PathBuf {
    let py = std::env::var_os("SLIMSERVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        py.exists(),
        "ONNX parity tests need Python with onnxruntime, but {} does not exist: {VENV_HINT}",
        py.display()
    );
    let probe = Command::new(&py)
        .args(["-c", "import onnxruntime, onnx, numpy"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {VENV_HINT}", py.display()));
    assert!(
        probe.status.success(),
        "{} cannot import onnxruntime/onnx/numpy ({}): {VENV_HINT}",
        py.display(),
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    py
}

/// Makes every BatchNorm far from the identity while keeping activations of order one.
///
/// Freshly initialised BatchNorms (mean 0, var 1, gamma 1, beta 0) do not normalise: the
/// activations of the default-initialised separable nets shrink layer by layer until the logits
/// are the fc bias to within 1e-6, so a wrong body would still pass a 1e-4 parity check. So the
/// running statistics are first calibrated on data (train-mode passes, momentum 0.1), then
/// perturbed (mean += 0.1 std N(0,1), var *= U(0.5, 1.5)); gamma ~ U(0.5, 2) and
/// beta ~ 0.5 N(0, 1), large enough that ReLU6 clips a fair share of activations (a plain
/// ReLU in its place fails the check).
fn randomise_batch_norms(varmap: &candle_nn::VarMap, model: &Model) {
    let size = model.spec().input_size;
    let calib = Tensor::randn(0f32, 1.0, (4, 3, size, size), &Device::Cpu).unwrap();
    for _ in 0..40 {
        model.forward_t(&calib, true).unwrap();
    }
    let data = varmap.data().lock().unwrap();
    let rand = |lo: f32, hi: f32, like: &Tensor| Tensor::rand(lo, hi, like.dims(), &Device::Cpu);
    let randn = |std: f32, like: &Tensor| Tensor::randn(0f32, std, like.dims(), &Device::Cpu);
    for (key, var) in data.iter() {
        let Some(prefix) = key.strip_suffix(".running_mean") else {
            continue;
        };
        let get = |name: &str| &data[&format!("{prefix}.{name}")];
        let (mean, var_) = (var.as_tensor(), get("running_var").as_tensor());
        let new_mean =
            (mean + (randn(0.1, mean).unwrap() * var_.sqrt().unwrap()).unwrap()).unwrap();
        let new_var = (var_ * rand(0.5, 1.5, var_).unwrap()).unwrap();
        var.set(&new_mean).unwrap();
        get("running_var").set(&new_var).unwrap();
        let (gamma, beta) = (get("weight"), get("bias"));
        gamma
            .set(&rand(0.5, 2.0, gamma.as_tensor()).unwrap())
            .unwrap();
        beta.set(&randn(0.5, beta.as_tensor()).unwrap()).unwrap();
    }
}

fn write_f32(path: &Path, t: &Tensor) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Runs `input` through onnxruntime; returns the logits and the script's JSON summary.
fn ort_run(py: &Path, model: &Path, input: &Tensor, check: bool) -> (Vec<f32>, String) {
    let dir = model.parent().unwrap();
    let shape: Vec<String> = input.dims().iter().map(|d| d.to_string()).collect();
    let (x_path, y_path) = (dir.join("x.f32"), dir.join("y.f32"));
    write_f32(&x_path, input);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/ort_run.py");
    let mut cmd = Command::new(py);
    cmd.arg(&script)
        .arg("run")
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(&x_path)
        .arg("--shape")
        .arg(shape.join(","))
        .arg("--output")
        .arg(&y_path);
    if check {
        cmd.arg("--check");
    }
    let out = cmd.output().expect("running ort_run.py");
    assert!(
        out.status.success(),
        "ort_run.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        read_f32(&y_path),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn parity(arch: Arch) {
    let py = python();
    // MobileNetV2 reaches 1x1 at its minimum size, where BatchNorm statistics calibrated on a
    // few images make the comparison ill-conditioned; 96 leaves 3x3 at the end.
    let size = match arch {
        Arch::MobileNetV2 => 96,
        _ => arch.min_input_size(),
    };
    // MobileNetV2's 52 randomised BatchNorms (gamma up to 2, variances scaled by up to 1.5)
    // amplify float rounding (a different summation order in onnxruntime) to ~4e-4; with
    // real ImageNet-pretrained weights the same export agrees to ~1e-6. A wrong layer would
    // be off by O(1), far above either bound.
    let tolerance = match arch {
        Arch::MobileNetV2 => 1e-3,
        _ => TOLERANCE,
    };
    let spec = ModelSpec::new(arch, CLASSES, size);
    let (varmap, model) = Model::init(&spec, &Device::Cpu).unwrap();
    randomise_batch_norms(&varmap, &model);

    // The fused CPU form exists for the plain CNNs, the depthwise-separable students and
    // MobileNetV2.
    let fast = match arch {
        Arch::Big | Arch::StdConv | Arch::Student | Arch::StudentDeeper | Arch::MobileNetV2 => {
            Some(FastModel::compile(&model).unwrap())
        }
        _ => {
            assert!(FastModel::compile(&model).is_err(), "{arch} compiled");
            None
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{arch}.onnx"));
    std::fs::write(&path, onnx::export(&model).unwrap()).unwrap();

    for batch in [3, 1] {
        let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &Device::Cpu).unwrap();
        let want: Vec<f32> = model
            .forward_t(&x, false)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        if batch > 1 {
            // The check is only meaningful if the logits depend on the input, not just on
            // the fc bias.
            let spread = want.chunks(CLASSES).fold(0f32, |m, row| {
                row.iter()
                    .zip(&want[..CLASSES])
                    .fold(m, |m, (a, b)| m.max((a - b).abs()))
            });
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            println!("{arch}: input-dependent logit spread {:.3}", spread / scale);
            assert!(
                spread > 0.05 * scale,
                "{arch}: logits barely depend on the input (spread {spread:.3e}, max {scale:.3e})"
            );
        }
        let (got, summary) = ort_run(&py, &path, &x, batch == 3);
        assert!(
            summary.contains(&format!("\"output_shape\": [{batch}, {CLASSES}]"))
                && summary.contains(&format!("\"input_dims\": [\"N\", 3, {size}, {size}]"))
                && summary.contains(&format!("\"output_dims\": [\"N\", {CLASSES}]")),
            "{arch}: unexpected shapes from onnxruntime: {summary}"
        );
        assert_eq!(got.len(), want.len(), "{arch} batch {batch}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = diff / scale;
        println!("{arch} batch {batch}: max |ort - candle| / max |candle| = {rel:.3e} (max |logit| {scale:.3})");
        assert!(
            scale > 0.0 && scale.is_finite(),
            "{arch}: degenerate logits"
        );
        assert!(
            rel <= tolerance,
            "{arch} batch {batch}: relative error {rel:.3e} > {tolerance:e}"
        );
        // The server's rewritten model (BatchNorm folded, fused kernels) against the same
        // onnxruntime output.
        if let Some(fast) = &fast {
            let input: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let logits = fast.forward(&input, batch);
            let diff = got
                .iter()
                .zip(&logits)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let rel = diff / scale;
            println!("{arch} batch {batch}: max |ort - fused| / max |candle| = {rel:.3e}");
            assert!(
                rel <= tolerance,
                "{arch} batch {batch}: fused model vs onnxruntime: relative error {rel:.3e} > {tolerance:e}"
            );
        }
    }
}

#[test]
fn big() {
    parity(Arch::Big);
}

#[test]
fn student() {
    parity(Arch::Student);
}

#[test]
fn student_deeper() {
    parity(Arch::StudentDeeper);
}

#[test]
fn std_conv() {
    parity(Arch::StdConv);
}

#[test]
fn group_conv() {
    parity(Arch::GroupConv);
}

#[test]
fn resnet18() {
    parity(Arch::Resnet18);
}

#[test]
fn mobilenet_v2() {
    parity(Arch::MobileNetV2);
}

#[test]
fn covers_every_architecture() {
    // A new architecture fails to compile here until it gets a parity test above.
    for arch in Arch::ALL {
        match arch {
            Arch::Big
            | Arch::Student
            | Arch::StudentDeeper
            | Arch::StdConv
            | Arch::GroupConv
            | Arch::Resnet18
            | Arch::MobileNetV2 => {}
        }
    }
}
