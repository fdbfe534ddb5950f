//! The fused engine against candle's eval forward on random weights with far-from-identity
//! BatchNorms, odd sizes included, in both parallel modes; and each kernel on its own.

use candle_core::{DType, Device, ModuleT, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::kernels::{conv3x3, Act};
use super::separable::Separable;
use super::{winograd, FastModel};
use crate::simd::testing::each_level;
use crate::zoo::{Arch, Model, ModelSpec};

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// A model whose BatchNorms are far from the identity (seeded): see `zoo::test_models`.
fn model(arch: Arch, size: usize, seed: u64) -> Model {
    crate::zoo::test_models::input_dependent(&ModelSpec::new(arch, 7, size), seed).1
}

fn check_model(arch: Arch, size: usize, batches: &[usize]) {
    check_model_within(arch, size, batches, 1e-4);
}

/// candle's eval forward is the reference; the fused engine runs every instruction-set level
/// the CPU has, forced in turn (it picks its kernels per call, so one compiled model runs each).
fn check_model_within(arch: Arch, size: usize, batches: &[usize], tolerance: f32) {
    let m = model(arch, size, 7);
    let fast = FastModel::compile(&m).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let cases: Vec<(usize, Vec<f32>, Vec<f32>)> = batches
        .iter()
        .map(|&n| {
            let x = rand_vec(&mut rng, n * 3 * size * size, 1.0);
            let xt = Tensor::from_vec(x.clone(), (n, 3, size, size), &Device::Cpu).unwrap();
            let want: Vec<f32> = m
                .forward_t(&xt, false)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (n, x, want)
        })
        .collect();
    each_level(&format!("engine {arch} {size}x{size}"), |level| {
        for (n, x, want) in &cases {
            let n = *n;
            let got = fast.forward(x, n);
            let rel = max_rel(&got, want);
            assert!(
                rel < tolerance,
                "{arch} {size}x{size} batch {n} (SIMD level {level}): relative error {rel:e}"
            );
            // The logits depend on the input: a broken body cannot hide behind the fc bias.
            if n > 1 {
                let spread = max_rel(&got[..7], &got[7..14]);
                assert!(spread > 1e-3, "{arch}: logits do not depend on the input");
            }
        }
    });
}

#[test]
fn big_matches_candle() {
    // 64 keeps a pixel after six pools; 100 has odd sizes (50, 25, 12, 6, 3, 1) on the way.
    check_model(Arch::Big, 64, &[1, 3]);
    check_model(Arch::Big, 100, &[2]);
}

#[test]
fn std_conv_matches_candle() {
    check_model(Arch::StdConv, 70, &[1, 3]);
}

#[test]
fn students_match_candle() {
    check_model(Arch::StudentDeeper, 64, &[1, 3]);
    check_model(Arch::StudentDeeper, 45, &[2]);
    check_model(Arch::Student, 37, &[1, 4]);
}

#[test]
fn mobilenet_v2_matches_candle() {
    // 52 layers of randomised BatchNorms amplify float rounding to ~2.5e-4 (with trained
    // weights the engine matches candle to ~1e-6); a wrong layer is off by O(1). Each block's
    // kernel is checked to 1e-5 on its own in `inverted_kernel_matches_candle`.
    // 64: 32, 16, 8, 4, 2 after the strided layers; 45: odd sides (23, 12, 6, 3, 2).
    check_model_within(Arch::MobileNetV2, 64, &[1, 3], 1e-3);
    check_model_within(Arch::MobileNetV2, 45, &[2], 1e-3);
}

/// One inverted residual block (expansion or not, stride 1 or 2, residual or not) against
/// candle's 1x1 conv -> ReLU6 -> grouped 3x3 conv -> ReLU6 -> 1x1 conv (-> + input), whole
/// and split, on odd shapes; and the strided stem and the pointwise layer likewise.
#[test]
fn inverted_kernel_matches_candle() {
    use super::inverted::{out_size, Inverted, Pointwise, Strided3x3};
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(9);
    let t = |v: &[f32], shape: (usize, usize, usize, usize)| {
        Tensor::from_vec(v.to_vec(), shape, &dev).unwrap()
    };
    let bias = |y: Tensor, b: &[f32]| y.broadcast_add(&t(b, (1, b.len(), 1, 1))).unwrap();
    each_level("inverted, stem and pointwise kernels", |_| {
        let shapes = [
            (4, 7, 5),
            (8, 13, 16),
            (6, 1, 1),
            (16, 9, 2),
            (5, 24, 31),
            (3, 12, 10),
            // Without an expansion, many channels and rows: several bands per block.
            (64, 12, 40),
        ];
        for (ic, h, w) in shapes {
            for (expand, stride, oc) in [
                (Some(3), 1, ic),
                (Some(6), 2, 7),
                (None, 1, 9),
                (None, 1, ic),
                (None, 2, ic),
            ] {
                let hid = expand.map_or(ic, |e| e * ic);
                let residual = stride == 1 && oc == ic;
                let x = rand_vec(&mut rng, ic * h * w, 1.0);
                let ew = rand_vec(&mut rng, hid * ic, 0.5);
                let eb = rand_vec(&mut rng, hid, 0.5);
                let dw = rand_vec(&mut rng, hid * 9, 0.5);
                let db = rand_vec(&mut rng, hid, 0.5);
                let pw = rand_vec(&mut rng, oc * hid, 0.5);
                let pb = rand_vec(&mut rng, oc, 0.5);
                let xt = t(&x, (1, ic, h, w));
                let mut y = xt.clone();
                if expand.is_some() {
                    y = bias(y.conv2d(&t(&ew, (hid, ic, 1, 1)), 0, 1, 1, 1).unwrap(), &eb)
                        .clamp(0f32, 6f32)
                        .unwrap();
                }
                y = bias(
                    y.conv2d(&t(&dw, (hid, 1, 3, 3)), 1, stride, 1, hid)
                        .unwrap(),
                    &db,
                )
                .clamp(0f32, 6f32)
                .unwrap();
                y = bias(y.conv2d(&t(&pw, (oc, hid, 1, 1)), 0, 1, 1, 1).unwrap(), &pb);
                if residual {
                    y = (y + &xt).unwrap();
                }
                let want: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let (oh, ow) = (out_size(h, stride), out_size(w, stride));
                assert_eq!(want.len(), oc * oh * ow);
                let block = Inverted::new(
                    ic,
                    stride,
                    expand.map(|_| (ew.clone(), eb.clone())),
                    dw.chunks_exact(9).map(|k| k.try_into().unwrap()).collect(),
                    db.clone(),
                    pw.clone(),
                    pb.clone(),
                    residual,
                );
                let x_hwc = to_hwc(&x, (ic, h, w));
                // run's own choice, then each way of splitting forced.
                for how in ["run", "run split", "bands", "bands split", "phased"] {
                    if how == "phased" && expand.is_none() {
                        continue;
                    }
                    let mut out = vec![f32::NAN; want.len()];
                    match how {
                        "run" | "run split" => {
                            block.run(&x_hwc, (h, w), &mut out, how == "run split")
                        }
                        "bands" | "bands split" => {
                            block.run_bands(&x_hwc, (h, w), &mut out, how == "bands split")
                        }
                        _ => block.run_phased(&x_hwc, (h, w), &mut out),
                    }
                    let rel = max_rel(&to_chw(&out, (oc, oh, ow)), &want);
                    assert!(
                        rel < 1e-5,
                        "inverted {ic}x{h}x{w} x{expand:?} /{stride} -> {oc} {how}: {rel:e}"
                    );
                }
            }
            // The stem (3x3, stride 2) and the pointwise layer: 10 channels (a partial panel) and
            // 32 (whole panels: the stem gathers its interior pixels' taps from the image).
            for oc in [10, 32] {
                let sw = rand_vec(&mut rng, oc * ic * 9, 0.5);
                let sb = rand_vec(&mut rng, oc, 0.5);
                let x = rand_vec(&mut rng, ic * h * w, 1.0);
                let want_stem: Vec<f32> = bias(
                    t(&x, (1, ic, h, w))
                        .conv2d(&t(&sw, (oc, ic, 3, 3)), 1, 2, 1, 1)
                        .unwrap(),
                    &sb,
                )
                .clamp(0f32, 6f32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
                let want_pw: Vec<f32> = bias(
                    t(&x, (1, ic, h, w))
                        .conv2d(&t(&sw[..oc * ic], (oc, ic, 1, 1)), 0, 1, 1, 1)
                        .unwrap(),
                    &sb,
                )
                .relu()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
                let stem = Strided3x3::new(ic, sw.clone(), sb.clone(), Act::Relu6);
                let pointwise = Pointwise::new(ic, sw[..oc * ic].to_vec(), sb.clone(), Act::Relu);
                for split in [false, true] {
                    let mut out = vec![f32::NAN; want_stem.len()];
                    stem.run(&x, (h, w), &mut out, split);
                    let (oh, ow) = (out_size(h, 2), out_size(w, 2));
                    assert!(
                        max_rel(&to_chw(&out, (oc, oh, ow)), &want_stem) < 1e-5,
                        "stem {ic}x{h}x{w} split {split}"
                    );
                    let mut out = vec![f32::NAN; want_pw.len()];
                    pointwise.run(&to_hwc(&x, (ic, h, w)), (h, w), &mut out, split);
                    assert!(
                        max_rel(&to_chw(&out, (oc, h, w)), &want_pw) < 1e-5,
                        "pointwise {ic}x{h}x{w} split {split}"
                    );
                }
            }
        }
    });
}

/// `[c, h, w]` as `[h * w, c]`.
fn to_hwc(x: &[f32], (c, h, w): (usize, usize, usize)) -> Vec<f32> {
    let mut y = vec![0f32; c * h * w];
    for ch in 0..c {
        for p in 0..h * w {
            y[p * c + ch] = x[ch * h * w + p];
        }
    }
    y
}

/// `[h * w, c]` as `[c, h, w]`.
fn to_chw(x: &[f32], (c, h, w): (usize, usize, usize)) -> Vec<f32> {
    let mut y = vec![0f32; c * h * w];
    for ch in 0..c {
        for p in 0..h * w {
            y[ch * h * w + p] = x[p * c + ch];
        }
    }
    y
}

#[test]
fn other_architectures_are_refused() {
    for arch in [Arch::GroupConv, Arch::Resnet18] {
        let size = arch.min_input_size();
        let (_, m) = Model::init(&ModelSpec::new(arch, 3, size), &Device::Cpu).unwrap();
        let e = FastModel::compile(&m).unwrap_err().to_string();
        assert!(e.contains(arch.name()), "{e}");
    }
}

/// candle reference for one conv layer: conv + bias -> act (-> 2x2 max pool).
fn reference(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    weight: (&[f32], (usize, usize, usize, usize)),
    groups: usize,
    b: &[f32],
    act: Act,
    pool: bool,
) -> Vec<f32> {
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x.to_vec(), (1, c, h, w), &dev).unwrap();
    let wt = Tensor::from_vec(weight.0.to_vec(), weight.1, &dev).unwrap();
    let pad = weight.1 .2 / 2;
    let mut y = xt
        .conv2d(&wt, pad, 1, 1, groups)
        .unwrap()
        .broadcast_add(&Tensor::from_vec(b.to_vec(), (1, b.len(), 1, 1), &dev).unwrap())
        .unwrap();
    y = match act {
        Act::None => y,
        Act::Relu => y.relu().unwrap(),
        Act::Relu6 => y.clamp(0f32, 6f32).unwrap(),
    };
    if pool {
        y = y.max_pool2d(2).unwrap();
    }
    y.flatten_all().unwrap().to_vec1().unwrap()
}

const SHAPES: [(usize, usize, usize); 7] = [
    (3, 7, 5),
    (5, 1, 1),
    (4, 9, 13),
    (16, 33, 31),
    (2, 2, 3),
    (1, 20, 35),
    (3, 34, 48),
];

/// Every SIMD level: AVX-512's direct kernel, AVX2's gathered GEMM (16 and 32 channels: whole
/// panels), im2col + GEMM otherwise.
#[test]
fn conv3x3_kernel_matches_candle() {
    each_level("conv3x3 kernels", |_| conv3x3_cases());
}

fn conv3x3_cases() {
    let mut rng = StdRng::seed_from_u64(3);
    for (ic, h, w) in SHAPES {
        for (oc, act, pool) in [
            (6, Act::Relu, true),
            (3, Act::Relu6, false),
            (40, Act::None, true),
            (16, Act::Relu6, true),
            (32, Act::Relu, false),
        ] {
            if pool && h < 2 {
                continue;
            }
            let x = rand_vec(&mut rng, ic * h * w, 1.0);
            let wt = rand_vec(&mut rng, oc * ic * 9, 0.5);
            let b = rand_vec(&mut rng, oc, 0.5);
            let want = reference(&x, (ic, h, w), (&wt, (oc, ic, 3, 3)), 1, &b, act, pool);
            for split in [false, true] {
                let mut out = vec![f32::NAN; want.len()];
                conv3x3(&x, (ic, h, w), &wt, &b, oc, act, pool, &mut out, split);
                let rel = max_rel(&out, &want);
                assert!(
                    rel < 1e-5,
                    "conv3x3 {ic}x{h}x{w} -> {oc} {act:?} pool {pool}: {rel:e}"
                );
            }
        }
    }
}

/// The separable block against candle's depthwise conv -> ReLU6 -> pointwise conv (-> pool),
/// with the AVX-512 kernels (where the CPU has them) and the portable ones, whole and split.
#[test]
fn separable_kernel_matches_candle() {
    let mut rng = StdRng::seed_from_u64(4);
    let mut blocks = Vec::new();
    for (ic, h, w) in SHAPES.into_iter().chain([
        (16, 16, 16),
        (40, 17, 33),
        (9, 4, 53),
        (12, 6, 72),
        (16, 4, 128),
    ]) {
        for (oc, pool) in [(8, false), (5, true), (300, false), (19, true)] {
            if pool && h < 2 {
                continue;
            }
            let x = rand_vec(&mut rng, ic * h * w, 1.0);
            let (dw, dw_b) = (rand_vec(&mut rng, ic * 9, 0.8), rand_vec(&mut rng, ic, 0.5));
            let (pw, pw_b) = (
                rand_vec(&mut rng, oc * ic, 0.5),
                rand_vec(&mut rng, oc, 0.5),
            );
            let mid = reference(
                &x,
                (ic, h, w),
                (&dw, (ic, 1, 3, 3)),
                ic,
                &dw_b,
                Act::Relu6,
                false,
            );
            let want = reference(
                &mid,
                (ic, h, w),
                (&pw, (oc, ic, 1, 1)),
                1,
                &pw_b,
                Act::None,
                pool,
            );
            let taps = dw.chunks_exact(9).map(|k| k.try_into().unwrap()).collect();
            let block = Separable::new(taps, dw_b, pw, pw_b, pool);
            blocks.push((block, x, (ic, h, w), want));
        }
    }
    each_level("separable kernels", |level| {
        for (block, x, (ic, h, w), want) in &blocks {
            let (oc, pool) = (block.oc, block.pool);
            for split in [false, true] {
                let mut out = vec![f32::NAN; want.len()];
                block.run_with(x, (*h, *w), &mut out, split, level);
                let rel = max_rel(&out, want);
                assert!(
                    rel < 1e-5,
                    "separable {ic}x{h}x{w} -> {oc} pool {pool} level {level} split {split}: {rel:e}"
                );
            }
        }
    });
}

#[test]
fn winograd_kernel_matches_candle() {
    let mut rng = StdRng::seed_from_u64(6);
    let mut cases = Vec::new();
    for (ic, h, w) in SHAPES
        .into_iter()
        .chain([(16, 8, 8), (32, 17, 6), (16, 40, 70)])
    {
        for (oc, act, pool) in [
            (6, Act::Relu, true),
            (3, Act::Relu6, false),
            (40, Act::None, true),
            (33, Act::None, false),
        ] {
            if pool && h < 2 {
                continue;
            }
            let x = rand_vec(&mut rng, ic * h * w, 1.0);
            let wt = rand_vec(&mut rng, oc * ic * 9, 0.5);
            let b = rand_vec(&mut rng, oc, 0.5);
            let u = winograd::Weights::new(&wt, oc, ic);
            let want = reference(&x, (ic, h, w), (&wt, (oc, ic, 3, 3)), 1, &b, act, pool);
            cases.push(((ic, h, w), (oc, act, pool), x, u, b, want));
        }
    }
    each_level("winograd kernels", |level| {
        for ((ic, h, w), (oc, act, pool), x, u, b, want) in &cases {
            for split in [false, true] {
                let mut out = vec![f32::NAN; want.len()];
                let (shape, layer) = ((*ic, *h, *w), (*act, *pool));
                winograd::conv3x3_with(x, shape, u, b, *oc, layer, &mut out, split, level);
                let rel = max_rel(&out, want);
                assert!(
                    rel < 1e-5,
                    "winograd {ic}x{h}x{w} -> {oc} {act:?} pool {pool} split {split} level {level}: {rel:e}"
                );
            }
        }
    });
}

/// Many callers share one rayon pool, as the server's executors (one per model) do: while a
/// split layer of one image waits for its other half, rayon runs another image on the same
/// worker. Every answer must still be the model's own (no buffer shared between them).
#[test]
fn concurrent_images_on_one_pool_get_their_own_answers() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let models = [
        FastModel::compile(&model(Arch::StudentDeeper, 48, 1)).unwrap(),
        FastModel::compile(&model(Arch::Big, 64, 2)).unwrap(),
    ];
    let mut rng = StdRng::seed_from_u64(12);
    let inputs: Vec<Vec<f32>> = models
        .iter()
        .map(|m| {
            let s = m.spec().input_size;
            rand_vec(&mut rng, 3 * 3 * s * s, 1.0)
        })
        .collect();
    // References: one image at a time, nothing else on the pool.
    let want: Vec<Vec<f32>> = models
        .iter()
        .zip(&inputs)
        .map(|(m, x)| pool.install(|| m.forward(x, 3)))
        .collect();
    std::thread::scope(|scope| {
        for t in 0..6 {
            let (m, x, want, pool) = (&models[t % 2], &inputs[t % 2], &want[t % 2], &pool);
            scope.spawn(move || {
                for i in 0..40 {
                    // Batch 1 splits every layer across the pool; batch 3 runs one image
                    // per worker.
                    let n = if i % 4 == 3 { 3 } else { 1 };
                    let per = x.len() / 3;
                    let got = pool.install(|| m.forward(&x[..n * per], n));
                    let classes = got.len() / n;
                    let rel = max_rel(&got, &want[..n * classes]);
                    assert!(rel < 1e-5, "caller {t} run {i}: relative error {rel:e}");
                }
            });
        }
    });
}

/// However a split layer's work items reach the threads (the gang that holds the pool's threads
/// for the image, the default; rayon's work stealing, `SPIN_SPLIT` off; thread i taking the
/// i-th share, the `STATIC_SPLIT` hook), each item computes the same bands: the same logits,
/// bit for bit, for every architecture the engine compiles (the separable, Winograd, direct and
/// inverted layers all split through `for_tasks`). Other tests may run split while a flag is
/// set; their answers do not change either.
#[test]
fn every_way_of_handing_out_a_split_gives_the_same_logits() {
    use std::sync::atomic::Ordering;
    // Bit-for-bit across runs: no other test may force another instruction set in between.
    let _simd = crate::simd::testing::LOCK.lock();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    for (arch, size) in [
        (Arch::StudentDeeper, 64),
        (Arch::Big, 64),
        (Arch::MobileNetV2, 64),
    ] {
        let fast = FastModel::compile(&model(arch, size, 3)).unwrap();
        let x = rand_vec(&mut rng, 3 * size * size, 1.0);
        let spinning = pool.install(|| fast.forward(&x, 1));
        super::SPIN_SPLIT.store(false, Ordering::Relaxed);
        let stealing = pool.install(|| fast.forward(&x, 1));
        super::STATIC_SPLIT.store(true, Ordering::Relaxed);
        let fixed = pool.install(|| fast.forward(&x, 1));
        super::STATIC_SPLIT.store(false, Ordering::Relaxed);
        super::SPIN_SPLIT.store(true, Ordering::Relaxed);
        assert_eq!(
            stealing, spinning,
            "{arch}: work stealing changed the logits"
        );
        assert_eq!(fixed, spinning, "{arch}: static split changed the logits");
    }
}

/// After `release_scratch` no thread of the pool holds activation buffers (nor the image's
/// band buffers), and the next batch allocates them again and answers the same.
#[test]
fn release_scratch_frees_every_threads_buffers() {
    // The second batch must answer bit for bit as the first: no other test may force another
    // instruction set in between (that made this test fail once in CI).
    let _simd = crate::simd::testing::LOCK.lock();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let m = FastModel::compile(&model(Arch::StudentDeeper, 48, 3)).unwrap();
    let x = rand_vec(&mut StdRng::seed_from_u64(5), 4 * 3 * 48 * 48, 1.0);
    let held = || {
        let pairs = || super::ACTIVATIONS.with(|f| f.borrow().len());
        rayon::broadcast(|_| pairs()).iter().sum::<usize>() + pairs()
    };
    pool.install(|| {
        let want = m.forward(&x, 4);
        assert!(held() > 0, "a batch left no activation buffers to reuse");
        super::release_scratch();
        assert_eq!(held(), 0, "activation buffers kept after release_scratch");
        assert_eq!(m.forward(&x, 4), want);
        assert!(held() > 0);
    });
}

/// Each instruction set's packed GEMM (`isa::Kernels::gemm`) against a plain reference, on
/// strips of every width class (at most 8, at most 16 and full ones, the AVX2 tile's 24 and
/// the AVX-512 tile's 32, and their tails), partial channel tiles, with and without a bias,
/// an output row stride wider than the row, and rows whose stride crowds L1 (the AVX-512
/// kernel then copies its strips).
#[cfg(x86_simd)]
#[test]
fn packed_gemm_matches_reference_at_every_level() {
    let mut rng = StdRng::seed_from_u64(21);
    let mut cases = Vec::new();
    for (oc, ic, n) in [
        (1, 1, 1),
        (5, 3, 7),
        (8, 16, 8),
        (12, 9, 15),
        (33, 20, 16),
        (4, 40, 17),
        (16, 8, 24),
        (9, 17, 25),
        (40, 32, 64),
        (24, 64, 100),
        (16, 16, 1024),
        (32, 16, 2048),
        (8, 70, 2049),
    ] {
        let w = rand_vec(&mut rng, oc * ic, 1.0);
        let x = rand_vec(&mut rng, ic * n, 1.0);
        let bias = rand_vec(&mut rng, oc.next_multiple_of(super::packed::MR), 1.0);
        let packed = super::packed::pack(&w, oc, ic);
        cases.push(((oc, ic, n), w, x, bias, packed));
    }
    each_level(
        "packed GEMM (portable: none, the layers call the gemm crate)",
        |level| {
            let Some(k) = super::isa::set(level) else {
                return;
            };
            for ((oc, ic, n), w, x, bias, packed) in &cases {
                let (oc, ic, n) = (*oc, *ic, *n);
                for with_bias in [false, true] {
                    let ldc = n + 3;
                    let mut want = vec![f32::NAN; oc * ldc];
                    for o in 0..oc {
                        for p in 0..n {
                            let b = if with_bias { bias[o] } else { 0.0 };
                            want[o * ldc + p] =
                                b + (0..ic).map(|i| w[o * ic + i] * x[i * n + p]).sum::<f32>();
                        }
                    }
                    let mut got = vec![f32::NAN; oc * ldc];
                    let b = with_bias.then_some(&bias[..]);
                    // SAFETY: the CPU has `level`'s instructions (each_level); x is [ic, n],
                    // got holds oc rows of ldc >= n.
                    unsafe { (k.gemm)(packed, b, (oc, ic), x.as_ptr(), n, got.as_mut_ptr(), ldc) };
                    // Only the n columns of each row are written: the rest stays NaN.
                    for o in 0..oc {
                        let (g, r) = (&got[o * ldc..o * ldc + n], &want[o * ldc..o * ldc + n]);
                        let rel = max_rel(g, r);
                        assert!(
                            rel < 1e-5,
                            "gemm {oc}x{ic}x{n} bias {with_bias} level {level} row {o}: {rel:e}"
                        );
                        assert!(got[o * ldc + n..(o + 1) * ldc].iter().all(|v| v.is_nan()));
                    }
                }
            }
        },
    );
}
