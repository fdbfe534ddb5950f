use std::path::Path;

use slimserve::formats::model_dir::{ModelConfig, Provenance};
use slimserve::formats::weights::WeightFormat;
use slimserve::zoo::{self, Arch, ModelSpec};

use super::*;

const LOG_HEADER: &str =
    "epoch,train_loss,train_accuracy,val_loss,val_accuracy,images_per_s,images_seen,wall_seconds,lr";

fn spec() -> ModelSpec {
    ModelSpec::new(Arch::Student, 3, 32)
}

fn params() -> usize {
    zoo::param_count(&zoo::weight_shapes(&spec()).unwrap())
}

/// A model directory: config.json from `ModelConfig` and a dummy weight file of `bytes` bytes.
fn model_dir(dir: &Path, provenance: Provenance, format: WeightFormat, bytes: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = ModelConfig::new(spec(), vec!["a".into(), "b".into(), "c".into()]);
    config.weights.format = format;
    config.provenance = provenance;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("model.safetensors"), vec![7u8; bytes]).unwrap();
}

fn run_dir(dir: &Path, rows: &[&str], provenance: Provenance, bytes: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut log = format!("{LOG_HEADER}\n");
    for r in rows {
        log.push_str(r);
        log.push('\n');
    }
    std::fs::write(dir.join("log.csv"), log).unwrap();
    model_dir(&dir.join("best"), provenance, WeightFormat::F32, bytes);
}

struct Fixture {
    _tmp: tempfile::TempDir,
    spec: ReportSpec,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Run `scratch`: best at epoch 2 of 3, 80 of 100 validation images right.
    run_dir(
        &root.join("scratch"),
        &[
            "1,1.200000,0.500000,1.000000,0.600000,100.00,300,10.0,0.001",
            "2,0.800000,0.700000,0.700000,0.800000,100.00,600,20.5,0.001",
            "3,0.600000,0.800000,0.750000,0.790000,100.00,900,31.0,0.001",
        ],
        Provenance {
            dataset: Some("fashion-mnist".into()),
            epochs: Some(2),
            images_seen: Some(600),
            val_accuracy: Some(0.8),
            val_images: Some(100),
            command: Some("slimtrain train --arch student --data fm --out runs/scratch".into()),
            ..Default::default()
        },
        4321,
    );
    // Run `kd`: distilled, NaN train loss in epoch 1 (no steps), best at its last epoch.
    run_dir(
        &root.join("kd"),
        &[
            "1,NaN,NaN,0.900000,0.700000,0.00,0,5.0,0.001",
            "2,0.500000,0.850000,0.500000,0.870000,90.00,400,3725.0,0.001",
        ],
        Provenance {
            dataset: Some("fashion-mnist".into()),
            epochs: Some(2),
            images_seen: Some(400),
            val_accuracy: Some(0.87),
            val_images: Some(1000),
            teacher: Some("models/big".into()),
            command: Some("slimtrain distill --teacher models/big --out runs/kd".into()),
            ..Default::default()
        },
        1_234_567,
    );
    // A quantized model without accuracy in provenance, with an eval file.
    let q8 = root.join("kd-q8");
    model_dir(
        &q8,
        Provenance {
            source: Some("runs/kd/best".into()),
            command: Some("slimtrain quantize --model runs/kd/best --out kd-q8".into()),
            ..Default::default()
        },
        WeightFormat::Uint8,
        999,
    );
    let eval = root.join("kd-q8.json");
    std::fs::write(
        &eval,
        r#"{"model":"kd-q8","split":"test","images":200,"accuracy":0.75,"ci95":[0.6856,0.8047],
            "majority_baseline":0.1,"per_class_accuracy":[],"confusion":[],"weight_file_bytes":999,
            "unreadable_images":0}"#,
    )
    .unwrap();
    let prune = root.join("prune");
    std::fs::create_dir_all(&prune).unwrap();
    std::fs::write(
        prune.join("curve.csv"),
        "step,rate,width_mult,params,val_accuracy,weight_bytes\n\
         0,0.9,1.000000,224011,0.870000,900000\n\
         1,0.9,0.900000,190000,0.866000,770000\n\
         2,0.9,0.810000,150000,0.862000,610000\n",
    )
    .unwrap();
    let spec = ReportSpec {
        out: root.join("out"),
        title: "Fashion-MNIST".into(),
        runs: vec![
            ("scratch".into(), root.join("scratch")),
            ("kd".into(), root.join("kd")),
        ],
        models: vec![ModelInput {
            name: "kd-q8".into(),
            dir: q8,
            eval: Some(eval),
        }],
        prunes: vec![("slim".into(), prune)],
    };
    Fixture { _tmp: tmp, spec }
}

/// The trimmed contents of every `<text>` element.
fn svg_texts(path: &Path) -> Vec<String> {
    let svg = std::fs::read_to_string(path).unwrap();
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

#[test]
fn writes_table_plots_and_commands() {
    let f = fixture();
    let written = write(&f.spec).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in [
        "results.md",
        "training_accuracy.svg",
        "training_accuracy.png",
        "training_loss.svg",
        "training_loss.png",
        "pruning.svg",
        "pruning.png",
    ] {
        assert!(names.contains(&n.to_string()), "{n} not in {names:?}");
        assert!(f.spec.out.join(n).is_file(), "{n} missing on disk");
    }
    let md = std::fs::read_to_string(f.spec.out.join("results.md")).unwrap();
    let p = markdown::thousands(params() as u64);
    // 80/100: Wilson (0.7112, 0.8666), as statsmodels gives.
    let scratch = format!(
        "| scratch | 0.8000 [0.7112, 0.8666] | 100 | f32 | 4,321 | {p} | 2 of 3 | 600 | 20.5 s |"
    );
    assert!(md.contains(&scratch), "missing row\n{scratch}\nin\n{md}");
    let kd_ci = ci_from(0.87, 1000);
    let kd = format!(
        "| kd | 0.8700 [{:.4}, {:.4}] | 1,000 | f32 | 1,234,567 | {p} | 2 | 400 | 1h 02m |",
        kd_ci.0, kd_ci.1
    );
    assert!(md.contains(&kd), "missing row\n{kd}\nin\n{md}");
    let q8 =
        format!("| kd-q8 | 0.7500 [0.6856, 0.8047] (test) | 200 | uint8 | 999 | {p} | – | – | – |");
    assert!(md.contains(&q8), "missing row\n{q8}\nin\n{md}");
    assert!(md.contains("Majority-class baseline"), "{md}");
    assert!(md.contains("**0.1000**"), "{md}");
    assert!(
        md.contains("| 1 | 0.9 | 0.9000 | 190,000 | 84.8% | 0.8660 | 770,000 |"),
        "{md}"
    );
    assert!(md.contains("### slim (rate 0.9)"), "{md}");
    for cmd in [
        "slimtrain train --arch student --data fm --out runs/scratch",
        "slimtrain distill --teacher models/big --out runs/kd",
        "slimtrain quantize --model runs/kd/best --out kd-q8",
    ] {
        assert!(
            md.contains(&format!("```sh\n{cmd}\n```")),
            "{cmd} not in\n{md}"
        );
    }
    assert!(md.contains("teacher `models/big`"), "{md}");
    assert!(
        md.contains("![accuracy by epoch](training_accuracy.svg)"),
        "{md}"
    );
    assert!(md.contains("![pruning curve](pruning.svg)"), "{md}");
    assert!(!md.contains("\n\n\n"), "{md}");
    assert!(md.starts_with("# Fashion-MNIST\n"), "{md}");

    for stem in ["training_accuracy", "training_loss", "pruning"] {
        let svg = std::fs::read_to_string(f.spec.out.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{stem}.svg"
        );
        assert!(
            svg.contains("<polyline") || svg.contains("<path"),
            "{stem}.svg has no lines"
        );
        let png = std::fs::read(f.spec.out.join(format!("{stem}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{stem}.png signature"
        );
        assert!(png.len() > 10_000, "{stem}.png is only {} bytes", png.len());
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (plot::WIDTH, plot::HEIGHT));
        // The first series' colour is drawn, and so is dark text.
        let plotters::style::RGBColor(r, g, b) = plot::colour(0);
        let c0 = [r, g, b];
        let coloured = img.pixels().filter(|p| p.0 == c0).count();
        assert!(
            coloured > 100,
            "{stem}.png: {coloured} pixels of the first colour"
        );
        let dark = img.pixels().filter(|p| p.0.iter().all(|&v| v < 60)).count();
        assert!(dark > 500, "{stem}.png: {dark} dark pixels (text, axes)");
    }
    let acc = svg_texts(&f.spec.out.join("training_accuracy.svg"));
    for label in [
        "scratch",
        "kd",
        "validation",
        "train",
        "epoch",
        "top-1 accuracy",
        "1",
        "3",
    ] {
        assert!(
            acc.iter().any(|t| t == label),
            "no `{label}` text in the accuracy svg: {acc:?}"
        );
    }
    assert!(
        !acc.iter().any(|t| t == "1.5"),
        "fractional epoch label: {acc:?}"
    );
    let pr = svg_texts(&f.spec.out.join("pruning.svg"));
    let y_labels: Vec<&String> = pr.iter().filter(|t| t.starts_with("0.")).collect();
    let mut unique = y_labels.clone();
    unique.dedup();
    assert!(
        y_labels.len() >= 4 && unique == y_labels,
        "y labels repeat: {y_labels:?}"
    );
    for label in ["slim (rate 0.9)", "150k", "trainable parameters"] {
        assert!(
            pr.iter().any(|t| t == label),
            "no `{label}` text in the pruning svg: {pr:?}"
        );
    }
}

#[test]
fn a_run_trained_on_validation_reports_no_validation_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("teacher");
    run_dir(
        &dir,
        &["1,0.500000,0.850000,0.010000,1.000000,90.00,400,30.0,0.001"],
        Provenance {
            epochs: Some(1),
            images_seen: Some(400),
            ..Default::default()
        },
        100,
    );
    // Without run.json (or with train_on_val false) the logged figure is the run's.
    let (row, run) = read_run("teacher", &dir).unwrap();
    assert_eq!(row.accuracy, Some(1.0));
    assert_eq!(run.name, "teacher");
    std::fs::write(
        dir.join("run.json"),
        r#"{"config": {"train_on_val": true, "epochs": 1}}"#,
    )
    .unwrap();
    let (row, run) = read_run("teacher", &dir).unwrap();
    assert_eq!(row.accuracy, None, "trained on: not a held-out figure");
    assert_eq!(run.name, "teacher (validation trained on)");
}

#[test]
fn only_prune_runs_give_only_the_pruning_plot() {
    let mut f = fixture();
    f.spec.runs.clear();
    f.spec.models.clear();
    let written = write(&f.spec).unwrap();
    assert_eq!(written.len(), 3, "{written:?}");
    assert!(!f.spec.out.join("training_accuracy.svg").exists());
    let md = std::fs::read_to_string(f.spec.out.join("results.md")).unwrap();
    assert!(!md.contains("## Models"), "{md}");
    assert!(md.contains("## Pruning"), "{md}");
}

fn error_of(spec: &ReportSpec) -> String {
    let e = write(spec).expect_err("bad input must fail");
    let msg = format!("{e:#}");
    assert!(
        !spec.out.exists(),
        "nothing may be written on bad input: {msg}"
    );
    msg
}

#[test]
fn missing_log_names_the_file() {
    let f = fixture();
    let log = f.spec.runs[1].1.join("log.csv");
    std::fs::remove_file(&log).unwrap();
    let msg = error_of(&f.spec);
    assert!(msg.contains(&log.display().to_string()), "{msg}");
    assert!(msg.contains("run `kd`"), "{msg}");
}

#[test]
fn malformed_rows_name_the_file_and_line() {
    let f = fixture();
    let log = f.spec.runs[0].1.join("log.csv");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replace("0.700000,0.800000", "0.7x,0.800000")).unwrap();
    let msg = error_of(&f.spec);
    assert!(msg.contains(&format!("{}: line 3", log.display())), "{msg}");
    assert!(msg.contains("val_loss") && msg.contains("`0.7x`"), "{msg}");

    std::fs::write(&log, format!("{LOG_HEADER}\n1,2,3\n")).unwrap();
    let msg = error_of(&f.spec);
    assert!(msg.contains("line 2: 3 fields, the header has 9"), "{msg}");

    std::fs::write(&log, "epoch,val_accuracy\n1,0.5\n").unwrap();
    let msg = error_of(&f.spec);
    assert!(msg.contains("no column `train_loss`"), "{msg}");

    std::fs::write(&log, format!("{LOG_HEADER}\n")).unwrap();
    let msg = error_of(&f.spec);
    assert!(msg.contains("no data rows"), "{msg}");
}

#[test]
fn bad_curve_eval_and_model_dirs_are_named() {
    let f = fixture();
    let curve = f.spec.prunes[0].1.join("curve.csv");
    std::fs::write(
        &curve,
        "step,rate,width_mult,params,val_accuracy,weight_bytes\n0,0.9,1,-5,0.8,10\n",
    )
    .unwrap();
    let msg = error_of(&f.spec);
    assert!(
        msg.contains(&format!("{}: line 2: column `params`", curve.display())),
        "{msg}"
    );

    let f = fixture();
    let eval = f.spec.models[0].eval.clone().unwrap();
    std::fs::write(&eval, "{\"images\": 3}").unwrap();
    let msg = error_of(&f.spec);
    assert!(
        msg.contains(&eval.display().to_string()) && msg.contains("kd-q8"),
        "{msg}"
    );

    let f = fixture();
    let weights = f.spec.models[0].dir.join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let msg = error_of(&f.spec);
    assert!(msg.contains(&weights.display().to_string()), "{msg}");

    let mut f = fixture();
    f.spec.prunes[0].0 = "kd".into();
    assert!(error_of(&f.spec).contains("`kd` is given twice"));
    assert!(error_of(&ReportSpec::default()).contains("nothing to report"));
}

#[test]
fn parses_names_and_eval_files() {
    assert_eq!(
        parse_named("kd=runs/kd").unwrap(),
        ("kd".to_string(), PathBuf::from("runs/kd"))
    );
    assert!(parse_named("runs/kd").is_err());
    assert!(parse_named("=runs/kd").is_err());
    assert_eq!(
        parse_model("q8=models/q8:evals/q8.json").unwrap(),
        ModelInput {
            name: "q8".into(),
            dir: "models/q8".into(),
            eval: Some("evals/q8.json".into()),
        }
    );
    assert_eq!(parse_model("q8=models/q8").unwrap().eval, None);
    assert!(parse_model("q8=models/q8:").is_err());
}

#[test]
fn formats_numbers() {
    assert_eq!(markdown::thousands(0), "0");
    assert_eq!(markdown::thousands(999), "999");
    assert_eq!(markdown::thousands(1000), "1,000");
    assert_eq!(markdown::thousands(224_011), "224,011");
    assert_eq!(markdown::duration(20.54), "20.5 s");
    assert_eq!(markdown::duration(245.0), "4m 05s");
    assert_eq!(markdown::duration(3725.0), "1h 02m");
}
