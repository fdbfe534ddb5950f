//! Seeded weight initialisation.
//!
//! candle's CPU device cannot be seeded, so a freshly built model would differ run to run.
//! This VarBuilder backend creates each missing variable from the layer's own [`Init`] hint with
//! an RNG keyed by (seed, weight name): the same seed gives the same weights whatever the build
//! order, which makes training runs (and their resumption) reproducible.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarMap};
use rand::{Rng, SeedableRng};

pub(crate) struct Seeded {
    pub varmap: VarMap,
    pub seed: u64,
}

/// FNV-1a: a hash of the weight name that is stable across Rust versions.
fn sample(init: Init, shape: &Shape, seed: u64) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                // Box-Muller on (0, 1] to avoid ln(0).
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                (mean + stdev * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect(),
        Init::Kaiming { .. } => {
            candle_core::bail!("seeded init: Kaiming hints are not used by the zoo's layers")
        }
    };
    Tensor::from_vec(values, shape.clone(), &Device::Cpu)
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} vs {:?}", v.shape(), s);
            }
            return Ok(v.as_tensor().clone());
        }
        let t = sample(h, &s, self.seed ^ crate::fnv1a64(name.as_bytes()))?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| {
                candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                }
                .bt()
            })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}
