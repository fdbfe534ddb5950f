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
        // SPEC.md: a 2,223,872-parameter feature extractor plus 1,281 per class.
        (Arch::MobileNetV2, 2_223_872 + 1_281 * 11),
    ];
    for (arch, count) in expected {
        let shapes = weight_shapes(&spec(arch, 256)).unwrap();
        assert_eq!(param_count(&shapes), count, "{arch}");
    }
    // torchvision's mobilenet_v2() (1000 classes) and SPEC's 9-class count.
    for (classes, count) in [(1000, 3_504_872), (9, 2_235_401)] {
        let s = ModelSpec::new(Arch::MobileNetV2, classes, 224);
        assert_eq!(param_count(&weight_shapes(&s).unwrap()), count);
    }
}

#[test]
fn mobilenet_v2_layout_and_cost() {
    let s = weight_shapes(&ModelSpec::new(Arch::MobileNetV2, 1000, 224)).unwrap();
    assert_eq!(s["features.0.0.weight"], vec![32, 3, 3, 3]);
    assert_eq!(s["features.1.conv.0.0.weight"], vec![32, 1, 3, 3]);
    assert_eq!(s["features.1.conv.1.weight"], vec![16, 32, 1, 1]);
    assert_eq!(s["features.1.conv.2.running_var"], vec![16]);
    assert_eq!(s["features.2.conv.0.0.weight"], vec![96, 16, 1, 1]);
    assert_eq!(s["features.2.conv.1.0.weight"], vec![96, 1, 3, 3]);
    assert_eq!(s["features.2.conv.2.weight"], vec![24, 96, 1, 1]);
    assert_eq!(s["features.17.conv.3.bias"], vec![320]);
    assert_eq!(s["features.18.0.weight"], vec![1280, 320, 1, 1]);
    assert_eq!(s["classifier.1.weight"], vec![1000, 1280]);
    // Convolutions have no bias (a BatchNorm follows each).
    for (k, shape) in &s {
        if shape.len() == 4 {
            let bias = k.replace(".weight", ".bias");
            assert!(!s.contains_key(&bias), "{bias}");
        }
    }
    // Strides 2 on features.{0,2,4,7,14}: 224 -> 7; residual adds where shapes allow.
    let (_, m) = Model::init(&ModelSpec::new(Arch::MobileNetV2, 1000, 224), &Device::Cpu).unwrap();
    let Net::MobileV2(net) = m.net() else {
        panic!()
    };
    let strides: Vec<usize> = net.blocks().iter().map(|b| b.stride()).collect();
    assert_eq!(strides, [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]);
    let residual = net.blocks().iter().filter(|b| b.residual).count();
    assert_eq!(residual, 10);
    // About 300 M MACs at 224 (SPEC), about 393 M at 256.
    let macs = m.macs() as f64 / 1e6;
    assert!((299.0..302.0).contains(&macs), "{macs} M MACs at 224");
}

#[test]
fn mobilenet_v2_flat_keys_map_to_torchvision() {
    use super::mobilenet_v2::torchvision_keys;
    let torchvision = weight_shapes(&ModelSpec::new(Arch::MobileNetV2, 9, 224)).unwrap();
    // The flat layout: block 1 `conv.{0,1,3,4}`, the others `conv.{0,1,3,4,6,7}`.
    let flat_key = |k: &str| -> String {
        let Some((block, rest)) = k
            .strip_prefix("features.")
            .and_then(|r| r.split_once(".conv."))
        else {
            return k.to_string();
        };
        let t1 = block == "1";
        let (layer, param) = [
            ("0.0.", "0."),
            ("0.1.", "1."),
            ("1.0.", "3."),
            ("1.1.", "4."),
            ("1.", if t1 { "3." } else { "" }),
            ("2.", if t1 { "4." } else { "6." }),
            ("3.", "7."),
        ]
        .into_iter()
        .find(|(from, to)| !to.is_empty() && rest.starts_with(from))
        .map(|(from, to)| (to, &rest[from.len()..]))
        .unwrap();
        format!("features.{block}.conv.{layer}{param}")
    };
    let flat: std::collections::BTreeMap<String, Vec<usize>> = torchvision
        .iter()
        .map(|(k, v)| (flat_key(k), v.clone()))
        .collect();
    assert!(flat.contains_key("features.1.conv.3.weight"));
    assert!(flat.contains_key("features.5.conv.7.running_mean"));
    assert_ne!(flat, torchvision);
    assert_eq!(torchvision_keys(flat), torchvision);
    assert_eq!(torchvision_keys(torchvision.clone()), torchvision);
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
    // A config anyone can edit must not make the warm-up allocate gigabytes.
    assert!(spec(Arch::Student, super::MAX_INPUT_SIZE)
        .validate()
        .is_ok());
    let err = spec(Arch::Student, super::MAX_INPUT_SIZE + 1)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("over the limit of 2048"), "{err}");
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
    let mut tensors: BTreeMap<String, Tensor> = varmap_tensors(&varmap);
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
    let tensors: BTreeMap<String, Tensor> = varmap_tensors(&varmap);
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

/// Eval outputs of the custom-op path equal candle's generic ops (the path before they
/// existed) for every architecture, with non-trivial running statistics.
#[test]
fn eval_output_matches_generic_ops_for_every_architecture() {
    eval_matches_for_every_architecture(5, 0xe7a1, 3, &|f| crate::ops::with_generic_ops(f));
}

/// An eval forward pass, to be run inside a mode switch.
type Forward<'a> = dyn FnMut() -> candle_core::Result<Tensor> + 'a;

/// For every architecture, after one train step (running statistics away from (0, 1)): the
/// eval output run inside `wrap` equals the plain CPU path's within 1e-5.
fn eval_matches_for_every_architecture(
    seed: u64,
    input_seed: u64,
    batch: usize,
    wrap: &dyn Fn(&mut Forward) -> candle_core::Result<Tensor>,
) {
    for arch in Arch::ALL {
        let size = arch.min_input_size();
        let (_, m) = Model::init_seeded(&spec(arch, size), &Device::Cpu, seed).unwrap();
        let x = seeded_input(input_seed, &[batch, 3, size, size]);
        m.forward_t(&x, true).unwrap();
        let cpu = m.forward_t(&x, false).unwrap();
        let other = wrap(&mut || m.forward_t(&x, false)).unwrap();
        let err = rel_err(&other, &cpu);
        assert!(err <= 1e-5, "{arch}: eval rel err {err}");
    }
}

/// What `--device cuda` computes (every op on its device-generic path: shifted-multiply-add
/// depthwise at the layer's stride, reshape-and-max pool, candle's BatchNorm, activations and
/// convolutions), run here on the CPU: eval outputs equal the CPU path's for every architecture,
/// and a train step's loss and gradients match for the students and MobileNetV2 (stride-2
/// depthwise, residual adds, pools).
#[test]
fn device_generic_path_matches_the_cpu_path() {
    use crate::ops::with_device_generic_ops;
    eval_matches_for_every_architecture(6, 0xde71, 2, &|f| with_device_generic_ops(f));
    // MobileNetV2 in eval mode: in train mode its deep layers normalise by batch statistics of
    // a few values per channel (2x2 pixels x 8 images at features.10; channels that ReLU6 left
    // constant divide by sqrt(eps)), which amplifies float rounding from layer to layer
    // (running means 2% apart). Eval mode still runs every op's backward.
    for (arch, train) in [
        (Arch::Student, true),
        (Arch::StudentDeeper, true),
        (Arch::MobileNetV2, false),
    ] {
        let size = arch.min_input_size();
        let s = spec(arch, size);
        let (vm_cpu, cpu) = Model::init_seeded(&s, &Device::Cpu, 12).unwrap();
        let (vm_dev, dev) = Model::init_seeded(&s, &Device::Cpu, 12).unwrap();
        let x = seeded_input(0x7ea1, &[8, 3, size, size]);
        let y = Tensor::new(&[1u32, 5, 10, 0, 3, 3, 7, 9], &Device::Cpu).unwrap();
        let step = |m: &Model| {
            let logits = m.forward_t(&x, train).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            (loss.clone(), loss.backward().unwrap())
        };
        let (loss_cpu, g_cpu) = step(&cpu);
        let (loss_dev, g_dev) = with_device_generic_ops(|| step(&dev));
        assert!(rel_err(&loss_dev, &loss_cpu) <= 1e-5, "{arch}: loss");
        let (a, b) = (vm_cpu.data().lock().unwrap(), vm_dev.data().lock().unwrap());
        // Gradients are judged against the largest gradient of the model: sums that cancel
        // (a conv bias before a BatchNorm) have no scale of their own, while a wrong path
        // (candle's max_pool2d backward: 1/4 of the gradient) is off by the gradient itself.
        let max_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let scale = a
            .values()
            .filter_map(|v| g_cpu.get(v.as_tensor()))
            .map(max_abs)
            .fold(0f32, f32::max);
        assert!(scale > 0.0);
        let mut compared = 0;
        for (key, v) in a.iter() {
            // A conv bias right before a BatchNorm has a true gradient of 0 in train mode:
            // both paths give rounding noise there.
            let feeds_bn = train
                && key
                    .strip_suffix(".0.bias")
                    .is_some_and(|p| a.contains_key(&format!("{p}.1.running_mean")));
            if feeds_bn {
                continue;
            }
            if is_running_stat(key) {
                let err = rel_err(b[key].as_tensor(), v.as_tensor());
                assert!(err <= 1e-5, "{arch} {key}: running stat rel err {err}");
                continue;
            }
            let gc = g_cpu.get(v.as_tensor()).expect("cpu grad");
            let gd = g_dev.get(b[key].as_tensor()).expect("device-path grad");
            let err = max_abs(&(gd - gc).unwrap()) / scale;
            assert!(
                err <= 1e-4,
                "{arch} {key}: grad err {err} of the largest gradient"
            );
            compared += 1;
        }
        assert!(compared >= 6, "{arch}: {compared} gradients");
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff.is_finite() && scale.is_finite());
    diff / scale.max(1e-6)
}

/// What candle's max_pool2d backward passes on for a unique maximum (0.25 in candle 0.11,
/// where the correct value is 1).
fn candle_max_pool_grad_scale() -> f32 {
    let x = Tensor::new(&[[[[0f32, 1.], [2., 3.]]]], &Device::Cpu).unwrap();
    let v = candle_core::Var::from_tensor(&x).unwrap();
    let g = v.as_tensor().max_pool2d(2).unwrap().sum_all().unwrap();
    let g = g.backward().unwrap();
    g.get(v.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A train step through the custom ops matches candle's generic ops: logits, loss, running
/// statistics and every parameter gradient. Generic gradients are rescaled by candle's
/// max-pool gradient factor once per pool between the parameter and the loss.
#[test]
fn train_step_matches_generic_ops() {
    use crate::ops::with_generic_ops;
    let pool_scale = candle_max_pool_grad_scale();
    // (arch, size, pools after each `cnn.<i>` key prefix)
    type PoolsAfter = fn(usize) -> i32;
    let cases: [(Arch, usize, PoolsAfter); 3] = [
        (Arch::Student, 32, |i| 4 - i.min(4) as i32),
        (Arch::GroupConv, 32, |i| 4 - i.min(4) as i32),
        (Arch::StdConv, 64, |i| 6 - (i / 4) as i32),
    ];
    for (arch, size, pools_after) in cases {
        let s = spec(arch, size);
        // Fixed weights and input: with batch statistics over few values in the deepest
        // layers, some draws make the comparison ill-conditioned, and a test must not be flaky.
        let (vm_fast, fast) = Model::init_seeded(&s, &Device::Cpu, 11).unwrap();
        let (vm_gen, generic) = Model::init_seeded(&s, &Device::Cpu, 11).unwrap();
        // A fixed input: with batch statistics over few values in the deepest layers, some
        // inputs make the comparison ill-conditioned, and a test must not be flaky.
        let x = seeded_input(0x5eed, &[8, 3, size, size]);
        let y = Tensor::new(&[1u32, 5, 10, 0, 3, 3, 7, 9], &Device::Cpu).unwrap();
        let _simd = crate::simd::testing::LOCK.lock();
        let step = |m: &Model| {
            let logits = m.forward_t(&x, true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            let grads = loss.backward().unwrap();
            (logits, grads)
        };
        let (l_fast, g_fast) = step(&fast);
        let (l_gen, g_gen) = with_generic_ops(|| step(&generic));
        assert!(rel_err(&l_fast, &l_gen) <= 1e-4, "{arch}: logits");
        let (a, b) = (
            vm_fast.data().lock().unwrap(),
            vm_gen.data().lock().unwrap(),
        );
        for (key, v) in a.iter() {
            let w = &b[key];
            if is_running_stat(key) {
                let err = rel_err(v.as_tensor(), w.as_tensor());
                assert!(err <= 1e-5, "{arch} {key}: rel err {err}");
                continue;
            }
            let gf = g_fast.get(v.as_tensor()).expect("fast grad");
            let gg = g_gen.get(w.as_tensor()).expect("generic grad");
            let pools = key
                .strip_prefix("cnn.")
                .and_then(|k| k.split('.').next())
                .map_or(0, |i| pools_after(i.parse().unwrap()));
            let gg = (gg / (pool_scale as f64).powi(pools)).unwrap();
            // Two gradients are sums that nearly cancel, so their error is judged against the
            // scale of the terms: a conv bias right before a BatchNorm (zero up to rounding;
            // scale: its weight's gradient) and a BatchNorm gamma (sum of g * xhat with
            // xhat ~ 1; scale: beta's gradient, the sum of g).
            let is_bn = |k: &str| a.contains_key(&k.replace(".weight", ".running_mean"));
            let before_bn = key.ends_with(".bias")
                && key.starts_with("cnn.")
                && !is_bn(&key.replace(".bias", ".weight"))
                && (key.ends_with(".0.bias") || arch == Arch::StdConv);
            let scale_key = if before_bn {
                Some(key.replace(".bias", ".weight"))
            } else if key.ends_with(".weight") && is_bn(key) {
                Some(key.replace(".weight", ".bias"))
            } else {
                None
            };
            let err = match scale_key {
                Some(sk) => {
                    let scale = g_gen.get(b[&sk].as_tensor()).unwrap();
                    let scale = (scale / (pool_scale as f64).powi(pools)).unwrap();
                    let scale = scale.abs().unwrap().max_all().unwrap();
                    let diff = (gf - &gg).unwrap().abs().unwrap().max_all().unwrap();
                    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
                }
                None => rel_err(gf, &gg),
            };
            // Gradients flow through up to a dozen layers, so allow f32 accumulation drift.
            // (MobileNetV2's 52 layers drift further; its one new op, the stride-2 depthwise
            // conv, is checked on its own in `strided_depthwise_matches_grouped_conv`.)
            assert!(err <= 1e-3, "{arch} {key}: grad rel err {err}");
        }
    }
}

/// The stride-2 depthwise convolution (stride-1 custom op, then every other row and column)
/// equals candle's grouped convolution, forward and backward, on even and odd sizes.
#[test]
fn strided_depthwise_matches_grouped_conv() {
    use crate::ops::with_generic_ops;
    use candle_core::Module;
    use candle_nn::VarBuilder;
    for (c, h, w) in [(8, 16, 16), (5, 7, 9), (3, 3, 5)] {
        for bias in [false, true] {
            let varmap = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let conv = Conv::new(c, c, 3, 2, 1, c, bias, vb).unwrap();
            let x = candle_core::Var::from_tensor(&seeded_input(7, &[2, c, h, w])).unwrap();
            let run = || {
                let y = conv.forward(x.as_tensor()).unwrap();
                let loss = (&y * &seeded_input(8, y.dims()))
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = loss.backward().unwrap();
                let params: Vec<Tensor> = varmap
                    .all_vars()
                    .iter()
                    .map(|v| g.get(v.as_tensor()).unwrap().clone())
                    .collect();
                (y, g.get(x.as_tensor()).unwrap().clone(), params)
            };
            let (y, dx, dp) = run();
            let (y_ref, dx_ref, dp_ref) = with_generic_ops(run);
            assert_eq!(y.dims(), &[2, c, h.div_ceil(2), w.div_ceil(2)]);
            assert!(rel_err(&y, &y_ref) <= 1e-6, "{c}x{h}x{w} forward");
            assert!(rel_err(&dx, &dx_ref) <= 1e-6, "{c}x{h}x{w} dx");
            for (a, b) in dp.iter().zip(&dp_ref) {
                assert!(rel_err(a, b) <= 1e-5, "{c}x{h}x{w} dw/db");
            }
        }
    }
}

fn seeded_input(seed: u64, dims: &[usize]) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..dims.iter().product())
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// The kernels' baseline (SSE2) and AVX2 builds agree with the best one this CPU runs.
#[test]
#[cfg(x86_simd)]
fn kernels_agree_across_instruction_sets() {
    use crate::simd::testing::FORCED_LEVEL;
    use std::sync::atomic::Ordering;
    let _simd = crate::simd::testing::LOCK.lock();
    let x64 = seeded_input(0x64, &[4, 3, 64, 64]);
    let y = Tensor::new(&[1u32, 5, 10, 0], &Device::Cpu).unwrap();
    for arch in [Arch::Student, Arch::StdConv] {
        let (vm, m) = Model::init_seeded(&spec(arch, 64), &Device::Cpu, 9).unwrap();
        let params: Vec<(String, candle_core::Var)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !is_running_stat(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let step = || {
            let logits = m.forward_t(&x64, true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = params
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (logits, g)
        };
        let (l_best, g_best) = step();
        let max_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let floor = 1e-3 * g_best.iter().map(max_abs).fold(0f32, f32::max);
        for level in [0u8, 1] {
            if level > crate::simd::level() {
                crate::simd::testing::report(&format!(
                    "training ops {arch}: level {level} NOT tested: this CPU lacks it"
                ));
                continue;
            }
            FORCED_LEVEL.store(level, Ordering::Relaxed);
            let (l, g) = step();
            FORCED_LEVEL.store(u8::MAX, Ordering::Relaxed);
            assert!(rel_err(&l, &l_best) <= 1e-4, "{arch} level {level}: logits");
            for ((key, _), (a, b)) in params.iter().zip(g.iter().zip(&g_best)) {
                // Judged against the parameter's gradient scale, floored by the model's (the
                // conv biases that feed a BatchNorm have gradients that are rounding noise).
                let err = max_abs(&(a - b).unwrap()) / max_abs(b).max(floor);
                assert!(err <= 1e-3, "{arch} level {level} {key}: {err}");
            }
        }
    }
}
