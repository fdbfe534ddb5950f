//! Models for tests and benchmarks whose logits depend on their input.
//!
//! A freshly initialised network does not: with BatchNorm at mean 0, variance 1, gamma 1 and
//! beta 0, the activations of the separable students shrink layer by layer until every image
//! gets the classifier's bias to within 1e-6, so a test with such a model cannot tell mixed-up
//! batch rows or a wrong layout from the right answer. Here every BatchNorm's running
//! statistics are first calibrated on data (train-mode passes), then perturbed (mean += 0.1
//! std N(0, 1), var *= U(0.5, 1.5)), with gamma ~ U(0.5, 2) and beta ~ 0.5 N(0, 1): large
//! enough that ReLU6 clips a fair share of activations. Everything is seeded.

use candle_core::{Device, ModuleT, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Model, ModelSpec};

/// A seeded model of `spec` with calibrated, then perturbed BatchNorms (see the module doc).
pub fn input_dependent(spec: &ModelSpec, seed: u64) -> (VarMap, Model) {
    let (varmap, model) = Model::init_seeded(spec, &Device::Cpu, seed).expect("valid spec");
    randomise_batch_norms(&varmap, &model, seed);
    (varmap, model)
}

/// Calibrates, then perturbs every BatchNorm of `model` (whose weights live in `varmap`).
pub fn randomise_batch_norms(varmap: &VarMap, model: &Model, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xba7c_4e0f);
    let size = model.spec().input_size;
    let mut tensor = |dims: &[usize], f: &mut dyn FnMut(&mut StdRng) -> f32| {
        let v: Vec<f32> = (0..dims.iter().product()).map(|_| f(&mut rng)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("shape matches")
    };
    // Box-Muller: one standard normal draw from two uniforms.
    let normal = |r: &mut StdRng| -> f32 {
        let (u1, u2): (f64, f64) = (r.random_range(f64::EPSILON..1.0), r.random());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    let calib = tensor(&[4, 3, size, size], &mut |r| normal(r));
    for _ in 0..40 {
        model.forward_t(&calib, true).expect("train-mode forward");
    }
    let data = varmap.data().lock().expect("varmap lock");
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    for key in keys {
        let Some(prefix) = key.strip_suffix(".running_mean") else {
            continue;
        };
        let get = |name: &str| &data[&format!("{prefix}.{name}")];
        let (mean, var) = (data[key].as_tensor(), get("running_var").as_tensor());
        let dims = mean.dims().to_vec();
        let shift = tensor(&dims, &mut |r| 0.1 * normal(r));
        let scale = tensor(&dims, &mut |r| r.random_range(0.5..1.5));
        let gamma = tensor(&dims, &mut |r| r.random_range(0.5..2.0));
        let beta = tensor(&dims, &mut |r| 0.5 * normal(r));
        let new_mean = (mean + (shift * var.sqrt().expect("sqrt")).expect("mul")).expect("add");
        let new_var = (var * scale).expect("mul");
        data[key].set(&new_mean).expect("same shape");
        get("running_var").set(&new_var).expect("same shape");
        get("weight").set(&gamma).expect("same shape");
        get("bias").set(&beta).expect("same shape");
    }
}
