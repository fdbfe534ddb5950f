//! The `checkpoint` fuzz target's seeds (`fuzz/seeds/checkpoint/`: safetensors, PyTorch zip,
//! legacy and strided checkpoints of tiny models, all valid) must read; every input that once
//! failed it (`fuzz/regressions/checkpoint/`) must return, with tensors or an error.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

#[test]
fn checkpoint_seeds_and_regressions() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let seeds = files(&fuzz.join("seeds/checkpoint"));
    assert!(seeds.len() >= 8, "run fuzz/make_seeds.sh");
    for path in &seeds {
        let n = slimtrain::checkpoint::fuzz(&std::fs::read(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(n >= 4, "{}: {n} tensors", path.display());
    }
    for path in files(&fuzz.join("regressions/checkpoint")) {
        let _ = slimtrain::checkpoint::fuzz(&std::fs::read(path).unwrap());
    }
}
