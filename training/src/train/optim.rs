//! AdamW (decoupled weight decay, Loshchilov & Hutter), as `torch.optim.AdamW`:
//!
//!   p <- p - lr * wd * p
//!   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//!   p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//!
//! Written here rather than using candle-nn's so that its moments can be checkpointed and a
//! resumed run continues exactly where it stopped.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use slimserve::zoo::is_running_stat;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults with the study's learning rate.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    /// Per-parameter learning-rate multipliers (fine-tuning: a lower rate for a pretrained
    /// backbone, 0 to freeze it); 1 by default.
    scales: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// Optimises every trainable variable of `varmap` (BatchNorm running stats excluded).
    pub fn new(varmap: &VarMap, cfg: AdamWConfig) -> Result<Self> {
        let data = varmap.data().lock().expect("varmap lock");
        let params: Vec<(String, Var)> = data
            .iter()
            .filter(|(k, _)| !is_running_stat(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            scales: vec![1.0; params.len()],
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Sets each parameter's learning-rate multiplier from its key; 0 freezes it (no update,
    /// no weight decay, moments left as they are).
    pub fn set_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for (s, (name, _)) in self.scales.iter_mut().zip(&self.params) {
            *s = scale(name);
        }
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// One update from the gradients of `loss`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let lr = c.lr * self.scales[i];
            let Some(g) = grads.get(p.as_tensor()).filter(|_| lr > 0.0) else {
                continue;
            };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments keyed `m.<param>` / `v.<param>`, for checkpoints.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] at optimizer step `step`.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m), ("v", &mut self.v)] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks `{key}`"))
                })?;
                if t.dims() != p.as_tensor().dims() {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        t.dims(),
                        p.dims()
                    );
                }
                slot[i] = t.to_device(p.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{Init, VarBuilder};

    /// Reference: torch.optim.AdamW(lr=0.1, weight_decay=0.01) on f(p) = sum(p^2) from p = [1, -2],
    /// two steps. Computed by hand from the update rule above (the first Adam step moves each
    /// coordinate by ~lr * sign(g)); p1 = p0 * (1 - 0.001) - 0.1 * sign(p0).
    #[test]
    fn matches_the_adamw_update_rule() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let p = vb.get_with_hints(2, "w", Init::Const(0.0)).unwrap();
        varmap.data().lock().unwrap()["w"]
            .set(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap())
            .unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&varmap, cfg).unwrap();
        opt.backward_step(&p.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let w: Vec<f32> = varmap.data().lock().unwrap()["w"]
            .as_tensor()
            .to_vec1()
            .unwrap();
        assert!((w[0] - (1.0 * 0.999 - 0.1)).abs() < 1e-5, "{w:?}");
        assert!((w[1] - (-2.0 * 0.999 + 0.1)).abs() < 1e-5, "{w:?}");
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn scales_freeze_and_slow_parameters() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let a = vb
            .get_with_hints(1, "backbone.w", Init::Const(1.0))
            .unwrap();
        let b = vb.get_with_hints(1, "head.w", Init::Const(1.0)).unwrap();
        let c = vb.get_with_hints(1, "frozen.w", Init::Const(1.0)).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(&varmap, cfg).unwrap();
        opt.set_scales(|k| match k {
            "head.w" => 1.0,
            "backbone.w" => 0.1,
            _ => 0.0,
        });
        let loss = ((&a + &b).unwrap() + &c).unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        let get = |k: &str| {
            varmap.data().lock().unwrap()[k]
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()[0]
        };
        // The first Adam step moves a parameter by lr * sign(g).
        assert!((get("head.w") - 0.9).abs() < 1e-5);
        assert!((get("backbone.w") - 0.99).abs() < 1e-5);
        assert_eq!(get("frozen.w"), 1.0);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let run = |split: bool| -> Vec<f32> {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let p = vb.get_with_hints(3, "w", Init::Const(0.5)).unwrap();
            let target = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
            let loss = |p: &Tensor| (p - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let mut opt = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
            for _ in 0..3 {
                opt.backward_step(&loss(&p)).unwrap();
            }
            if split {
                let (state, step) = (opt.state(), opt.step_count());
                opt = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
                opt.load_state(&state, step).unwrap();
            }
            for _ in 0..3 {
                opt.backward_step(&loss(&p)).unwrap();
            }
            p.to_vec1().unwrap()
        };
        assert_eq!(run(false), run(true));
    }
}
