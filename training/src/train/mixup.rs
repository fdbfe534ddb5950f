//! Mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself,
//! `lambda * x + (1 - lambda) * x[perm]` with `lambda ~ Beta(a, a)`, and the loss is the same
//! blend of the losses against both label sets. Under distillation the teacher sees the blended
//! image too, so the student matches the teacher's function on points between the photos (the
//! "patient and consistent" recipe of Beyer et al. 2022), which is where a few hundred photos
//! leave it unconstrained.
//!
//! The draw is keyed by (seed, epoch, batch) like the data order, so a resumed run blends the
//! same batches the same way.

use candle_core::{Result, Tensor};

use crate::data::rng::Rng;

/// How one batch is blended.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    pub lambda: f64,
    /// `perm[i]`: the sample blended into sample `i`.
    pub perm: Vec<u32>,
}

/// The blend of batch `batch` of `epoch`, for `n` samples; `alpha` > 0.
pub fn draw(alpha: f64, seed: u64, epoch: u64, batch: u64, n: usize) -> Mix {
    let mut rng = Rng::derive(&[seed, 0x3141_5926, epoch, batch]);
    let lambda = beta(&mut rng, alpha);
    let mut perm: Vec<u32> = (0..n as u32).collect();
    rng.shuffle(&mut perm);
    Mix { lambda, perm }
}

impl Mix {
    /// `lambda * x + (1 - lambda) * x[perm]` along the first dimension.
    pub fn images(&self, x: &Tensor) -> Result<Tensor> {
        let idx = Tensor::new(self.perm.as_slice(), x.device())?;
        (x * self.lambda)? + (x.index_select(&idx, 0)? * (1.0 - self.lambda))?
    }

    /// The labels of the blended-in samples.
    pub fn labels(&self, y: &Tensor) -> Result<Tensor> {
        y.index_select(&Tensor::new(self.perm.as_slice(), y.device())?, 0)
    }
}

/// Standard normal (Box-Muller).
fn normal(rng: &mut Rng) -> f64 {
    let u = 1.0 - rng.unit(); // (0, 1]
    let v = rng.unit();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000); shapes below 1 through
/// `Gamma(shape + 1) * U^(1/shape)`.
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.unit();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(rng);
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.unit();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Beta(a, a) as `X / (X + Y)` with X, Y ~ Gamma(a).
fn beta(rng: &mut Rng, a: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, a);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)); 20,000 draws pin both within a
    /// few standard errors, for a shape below 1 (the usual mixup setting) and above.
    #[test]
    fn beta_draws_have_the_right_moments() {
        for a in [0.2, 0.4, 2.0] {
            let n = 20_000;
            let xs: Vec<f64> = (0..n).map(|i| draw(a, 7, 0, i, 1).lambda).collect();
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let want_var = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!((mean - 0.5).abs() < 0.015, "a={a}: mean {mean}");
            assert!(
                (var / want_var - 1.0).abs() < 0.05,
                "a={a}: var {var}, want {want_var}"
            );
        }
    }

    #[test]
    fn blends_images_and_labels_by_the_same_permutation() {
        let d = Device::Cpu;
        let mix = draw(0.4, 3, 1, 2, 4);
        let mut sorted = mix.perm.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        assert_eq!(mix, draw(0.4, 3, 1, 2, 4), "keyed, so resumable");
        assert_ne!(mix, draw(0.4, 3, 1, 3, 4));
        let x = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], &d).unwrap();
        let got: Vec<Vec<f32>> = mix.images(&x).unwrap().to_vec2().unwrap();
        let rows: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let l = mix.lambda as f32;
        for (i, row) in got.iter().enumerate() {
            let other = &rows[mix.perm[i] as usize];
            for c in 0..2 {
                let want = l * rows[i][c] + (1.0 - l) * other[c];
                assert!((row[c] - want).abs() < 1e-5, "{row:?} vs {want}");
            }
        }
        let y = Tensor::new(&[10u32, 11, 12, 13], &d).unwrap();
        let y2: Vec<u32> = mix.labels(&y).unwrap().to_vec1().unwrap();
        let want: Vec<u32> = mix.perm.iter().map(|&p| 10 + p).collect();
        assert_eq!(y2, want);
    }
}
