use super::*;
use candle_core::{DType, Device, ModuleT, Tensor};

fn spec(arch: Arch, size: usize) -> ModelSpec {
    ModelSpec::new(arch, 11, size)
}

#[test]
fn parameter_counts_match_the_study() {
    // SPEC.md's table: counts exclude BatchNorm running statistics.
    let expected = [
        (Arch::Big, 1_615_627),
        (Arch::Student, 256_779),
        (Arch::StudentDeeper, 224_011),
        (Arch::StdConv, 277_611),
        (Arch::GroupConv, 236_571),
        (Arch::Resnet18, 11_182_155),
    ];
    for (arch, count) in expected {
        let shapes = weight_shapes(&spec(arch, 256)).unwrap();
        assert_eq!(param_count(&shapes), count, "{arch}");
    }
}

#[test]
fn macs_match_the_study() {
    // SPEC.md's cost table, in millions of MACs at 256 and 64 pixels (rounded to 0.1).
    let expected = [
        (Arch::Big, 1151.4, 72.0),
        (Arch::Student, 118.4, 7.4),
        (Arch::StudentDeeper, 136.9, 8.6),
        (Arch::StdConv, 188.8, 11.8),
        (Arch::GroupConv, 160.4, 10.0),
    ];
    for (arch, at256, at64) in expected {
        for (size, want) in [(256, at256), (64, at64)] {
            let (_, m) = Model::init(&spec(arch, size), &Device::Cpu).unwrap();
            let got = m.macs() as f64 / 1e6;
            assert!(
                (got - want).abs() < 0.051,
                "{arch}@{size}: {got:.2} M MAC, SPEC says {want}"
            );
        }
    }
}

#[test]
fn every_architecture_runs_in_both_modes() {
    for arch in Arch::ALL {
        let size = arch.min_input_size();
        let (_, m) = Model::init(&spec(arch, size), &Device::Cpu).unwrap();
        let x = Tensor::rand(0f32, 1f32, (2, 3, size, size), &Device::Cpu).unwrap();
        for train in [false, true] {
            let y = m.forward_t(&x, train).unwrap();
            assert_eq!(y.dims(), &[2, 11], "{arch} train={train}");
            let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|v| v.is_finite()),
                "{arch} produced non-finite logits"
            );
        }
    }
}

#[test]
fn plain_nets_size_their_classifier_from_the_input() {
    for (size, side) in [(64, 1), (128, 2), (256, 4)] {
        let shapes = weight_shapes(&spec(Arch::Big, size)).unwrap();
        assert_eq!(
            shapes["fc.0.weight"],
            vec![11, 256 * side * side],
            "input {size}"
        );
    }
    let err = spec(Arch::Big, 63).validate().unwrap_err().to_string();
    assert!(err.contains("at least 64"), "{err}");
}

#[test]
fn students_accept_other_input_sizes_with_the_same_weights() {
    let (_, m) = Model::init(&spec(Arch::StudentDeeper, 256), &Device::Cpu).unwrap();
    for size in [32, 45, 96] {
        let x = Tensor::zeros((1, 3, size, size), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            m.forward_t(&x, false).unwrap().dims(),
            &[1, 11],
            "size {size}"
        );
    }
}

#[test]
fn keys_follow_the_pytorch_reference() {
    let s = weight_shapes(&spec(Arch::StudentDeeper, 256)).unwrap();
    assert_eq!(s["cnn.0.0.weight"], vec![16, 3, 3, 3]);
    assert_eq!(s["cnn.0.1.running_var"], vec![16]);
    assert_eq!(s["cnn.1.0.weight"], vec![16, 1, 3, 3]);
    assert_eq!(s["cnn.1.3.weight"], vec![32, 16, 1, 1]);
    assert_eq!(s["cnn.8.3.weight"], vec![256, 256, 1, 1]);
    assert_eq!(s["fc.0.weight"], vec![11, 256]);
    let b = weight_shapes(&spec(Arch::Big, 256)).unwrap();
    assert_eq!(b["cnn.20.weight"], vec![256, 256, 3, 3]);
    assert_eq!(b["cnn.21.running_mean"], vec![256]);
    let r = weight_shapes(&spec(Arch::Resnet18, 256)).unwrap();
    assert_eq!(r["layer2.0.downsample.0.weight"], vec![128, 64, 1, 1]);
    assert_eq!(r["fc.weight"], vec![11, 512]);
    assert!(!r.contains_key("conv1.bias"));
}

#[test]
fn train_mode_updates_running_statistics_and_eval_does_not() {
    let (varmap, m) = Model::init(&spec(Arch::Student, 32), &Device::Cpu).unwrap();
    let get = || {
        let data = varmap.data().lock().unwrap();
        data["cnn.0.1.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()
    };
    let before = get();
    let x = Tensor::rand(0f32, 1f32, (4, 3, 32, 32), &Device::Cpu).unwrap();
    m.forward_t(&x, false).unwrap();
    assert_eq!(get(), before, "eval must not touch running stats");
    m.forward_t(&x, true).unwrap();
    assert_ne!(get(), before, "train must update running stats");
}

#[test]
fn from_tensors_reports_missing_unexpected_and_misshaped_keys() {
    let s = spec(Arch::Student, 32);
    let (varmap, reference) = Model::init(&s, &Device::Cpu).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    // The exact tensors rebuild the same function.
    let loaded = Model::from_tensors(&s, &tensors, &Device::Cpu).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let diff = (loaded.forward_t(&x, false).unwrap() - reference.forward_t(&x, false).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);

    tensors.remove("cnn.2.3.bias");
    tensors.insert(
        "cnn.9.0.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "fc.0.weight".into(),
        Tensor::zeros((10, 256), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = Model::from_tensors(&s, &tensors, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing `cnn.2.3.bias`"), "{err}");
    assert!(err.contains("unexpected `cnn.9.0.weight`"), "{err}");
    assert!(
        err.contains("`fc.0.weight` has shape [10, 256], expected [11, 256]"),
        "{err}"
    );
}

#[test]
fn wrong_architecture_is_refused() {
    let (varmap, _) = Model::init(&spec(Arch::Student, 32), &Device::Cpu).unwrap();
    let tensors: BTreeMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let err = Model::from_tensors(&spec(Arch::Big, 64), &tensors, &Device::Cpu).unwrap_err();
    assert!(
        matches!(
            err,
            ZooError::WeightMismatch {
                arch: Arch::Big,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn invalid_specs_are_errors_not_panics() {
    assert!(Arch::parse("vgg").is_err());
    let mut s = spec(Arch::StudentDeeper, 256);
    s.widths.pop();
    assert!(s.validate().is_err());
    let mut g = spec(Arch::GroupConv, 64);
    g.widths[2] = 63;
    assert!(g.validate().is_err());
    assert!(ModelSpec::new(Arch::Student, 0, 64).validate().is_err());
}

#[test]
fn seeded_init_is_reproducible_and_follows_pytorch_defaults() {
    let s = spec(Arch::StudentDeeper, 32);
    let weights = |seed| {
        let (varmap, _) = Model::init_seeded(&s, &Device::Cpu, seed).unwrap();
        let data = varmap.data().lock().unwrap();
        let get = |k: &str| {
            data[k]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (
            get("cnn.3.3.weight"),
            get("cnn.3.1.weight"),
            get("cnn.3.1.running_var"),
        )
    };
    let (a, gamma, var) = weights(1);
    assert_eq!(a, weights(1).0, "same seed, same weights");
    assert_ne!(a, weights(2).0, "another seed, other weights");
    // Pointwise conv 64 -> 128: fan_in 64, so U(-1/8, 1/8), and not all at the bound.
    assert!(a.iter().all(|v| v.abs() <= 0.125) && a.iter().any(|v| v.abs() < 0.1));
    assert!(gamma.iter().all(|&g| g == 1.0) && var.iter().all(|&v| v == 1.0));
}
