//! Every seed of the fuzz targets' corpora (`fuzz/seeds/<target>/`) and every input that once
//! crashed, hung or exhausted memory in one (`fuzz/regressions/<target>/`), run through the
//! target's own code (`slimserve::fuzzing`). Seeds are valid inputs unless their name starts
//! with `bad-`, and must be accepted (so a corpus that stopped reaching the code past the
//! parsers fails here); regressions must return, with an answer or an error.

use std::path::{Path, PathBuf};

type Target = fn(&[u8]) -> Result<usize, String>;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    out.sort();
    out
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn check(target: &str, run: Target) {
    let seeds = files(&fuzz_dir().join("seeds").join(target));
    assert!(
        seeds.len() >= 4,
        "fuzz/seeds/{target} holds {} seeds; run fuzz/make_seeds.sh",
        seeds.len()
    );
    let mut wrong = Vec::new();
    for path in &seeds {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        match (run(&bytes), name.starts_with("bad-")) {
            (Ok(_), false) | (Err(_), true) => {}
            (Ok(n), true) => wrong.push(format!("{name}: accepted ({n}), expected an error")),
            (Err(e), false) => wrong.push(format!("{name}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "seeds of {target}:\n{}", wrong.join("\n"));
    for path in files(&fuzz_dir().join("regressions").join(target)) {
        let bytes = std::fs::read(path).unwrap();
        let _ = run(&bytes);
    }
}

fn string_err<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{e:#}"))
}

#[test]
fn image_seeds_and_regressions() {
    check("image", |b| string_err(slimserve::fuzzing::image(b)));
}

#[test]
fn classify_request_seeds_and_regressions() {
    check("classify_request", |b| {
        string_err(slimserve::fuzzing::classify_request(b))
    });
}

#[test]
fn model_infer_request_seeds_and_regressions() {
    check("model_infer_request", |b| {
        string_err(slimserve::fuzzing::model_infer_request(b))
    });
}

#[test]
fn rest_infer_request_seeds_and_regressions() {
    check("rest_infer_request", |b| {
        string_err(slimserve::fuzzing::rest_infer_request(b))
    });
}

#[test]
fn model_dir_seeds_and_regressions() {
    check("model_dir", |b| {
        string_err(slimserve::fuzzing::model_dir(b))
    });
}
