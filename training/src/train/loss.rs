//! Training losses.
//!
//! Knowledge distillation (SPEC.md), with teacher logits `t`, student logits `s`, labels `y`:
//!
//!   loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
//!
//! KL uses batch-mean reduction (sum over classes, mean over the batch), as PyTorch's
//! `KLDivLoss(reduction="batchmean")`; T^2 keeps the soft-target gradients' scale independent of T.

use candle_core::{Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax_last_dim};

/// Mean cross-entropy of logits [N, C] against u32 labels [N].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// Cross-entropy against labels smoothed by `eps` (Szegedy et al. 2016, as PyTorch's
/// `CrossEntropyLoss(label_smoothing=eps)`): the target puts `1 - eps + eps/C` on the label and
/// `eps/C` on every other class, i.e. `(1 - eps) * CE + eps * mean over classes of -log p`.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    let ce = cross_entropy(logits, labels)?;
    if eps == 0.0 {
        return Ok(ce);
    }
    let uniform = log_softmax(logits, D::Minus1)?.mean_all()?.neg()?;
    (ce * (1.0 - eps))? + (uniform * eps)?
}

/// The hard-label loss of one batch: smoothed cross-entropy, and under mixup (inputs
/// `lambda * x + (1 - lambda) * x[perm]`) the same mix of the losses against both label sets.
/// One log-softmax serves every term: `(1 - eps) * (lambda * NLL(y) + (1 - lambda) * NLL(y2))
/// + eps * mean(-log p)`, the same as mixing two [`smoothed_cross_entropy`]s.
pub fn hard_loss(
    logits: &Tensor,
    labels: &Tensor,
    mixed_with: Option<(&Tensor, f64)>,
    eps: f64,
) -> Result<Tensor> {
    let log_p = log_softmax(logits, D::Minus1)?;
    let nll = candle_nn::loss::nll(&log_p, labels)?;
    let nll = match mixed_with {
        None => nll,
        Some((other, lambda)) => {
            ((nll * lambda)? + (candle_nn::loss::nll(&log_p, other)? * (1.0 - lambda))?)?
        }
    };
    if eps == 0.0 {
        return Ok(nll);
    }
    (nll * (1.0 - eps))? + (log_p.mean_all()?.neg()? * eps)?
}

/// KL(softmax(t/T) || softmax(s/T)) with batch-mean reduction; the teacher carries no gradient.
pub fn soft_target_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let teacher = teacher.detach();
    let n = student.dim(0)? as f64;
    let p_t = softmax_last_dim(&(&teacher / temperature)?)?;
    let log_p_t = log_softmax(&(&teacher / temperature)?, D::Minus1)?;
    let log_p_s = log_softmax(&(student / temperature)?, D::Minus1)?;
    (p_t * (log_p_t - log_p_s)?)?.sum_all()? / n
}

/// SPEC's loss given the hard-label term: `alpha * T^2 * KL + (1 - alpha) * hard`.
pub fn distillation_with(
    student: &Tensor,
    teacher: &Tensor,
    hard: Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let soft =
        (soft_target_kl(student, teacher, temperature)? * (alpha * temperature * temperature))?;
    soft + (hard * (1.0 - alpha))?
}

/// SPEC's distillation loss; the teacher logits carry no gradient.
pub fn distillation(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let hard = cross_entropy(student, labels)?;
    distillation_with(student, teacher, hard, temperature, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference computed with numpy from the formula (float64):
    /// s = [[1, 2, 0.5], [0, -1, 3]], t = [[2, 1, 0], [0.5, 0.5, 2]], y = [1, 2], T = 2, alpha = 0.5.
    /// KL(batchmean) = 0.11582540, CE = 0.26512634 -> 0.5*4*0.11582540 + 0.5*0.26512634 = 0.36421398.
    #[test]
    fn distillation_matches_reference() {
        let d = Device::Cpu;
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &d).unwrap();
        let t = Tensor::new(&[[2.0f32, 1.0, 0.0], [0.5, 0.5, 2.0]], &d).unwrap();
        let y = Tensor::new(&[1u32, 2], &d).unwrap();
        let got = distillation(&s, &t, &y, 2.0, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - 0.364214).abs() < 1e-5, "{got}");
        let ce = cross_entropy(&s, &y).unwrap().to_scalar::<f32>().unwrap();
        assert!((ce - 0.2651263).abs() < 1e-5, "{ce}");
        // alpha = 0 is plain cross-entropy; identical logits give zero KL.
        let pure = distillation(&s, &t, &y, 20.0, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((pure - ce).abs() < 1e-6);
        let same = distillation(&s, &s, &y, 20.0, 1.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(same.abs() < 1e-6, "{same}");
    }

    #[test]
    fn teacher_gets_no_gradient() {
        let d = Device::Cpu;
        let s = candle_core::Var::new(&[[1.0f32, 2.0, 0.5]], &d).unwrap();
        let t = candle_core::Var::new(&[[2.0f32, 1.0, 0.0]], &d).unwrap();
        let y = Tensor::new(&[0u32], &d).unwrap();
        let grads = distillation(s.as_tensor(), t.as_tensor(), &y, 4.0, 0.7)
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(s.as_tensor()).is_some());
        assert!(grads.get(t.as_tensor()).is_none());
    }

    /// Reference (numpy, float64) for s = [[1, 2, 0.5], [0, -1, 3]], y = [1, 2]:
    /// mean -log p over classes and rows = 1.84845968; smoothed CE (eps 0.1)
    /// = 0.9 * 0.26512634 + 0.1 * 1.84845968 = 0.42345968.
    #[test]
    fn smoothing_and_mixing_match_reference() {
        let d = Device::Cpu;
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &d).unwrap();
        let y = Tensor::new(&[1u32, 2], &d).unwrap();
        let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let smooth = scalar(smoothed_cross_entropy(&s, &y, 0.1).unwrap());
        assert!((smooth - 0.4234597).abs() < 1e-5, "{smooth}");
        let ce = scalar(cross_entropy(&s, &y).unwrap());
        assert_eq!(scalar(smoothed_cross_entropy(&s, &y, 0.0).unwrap()), ce);
        // Mixed with itself is the plain loss; with other labels, the lambda-weighted mix.
        let same = scalar(hard_loss(&s, &y, Some((&y, 0.3)), 0.0).unwrap());
        assert!((same - ce).abs() < 1e-6);
        let y2 = Tensor::new(&[0u32, 0], &d).unwrap();
        let ce2 = scalar(cross_entropy(&s, &y2).unwrap());
        let mixed = scalar(hard_loss(&s, &y, Some((&y2, 0.3)), 0.0).unwrap());
        assert!((mixed - (0.3 * ce + 0.7 * ce2)).abs() < 1e-5, "{mixed}");
        // Smoothed and mixed: the lambda-weighted mix of the two smoothed losses.
        let both = scalar(hard_loss(&s, &y, Some((&y2, 0.3)), 0.1).unwrap());
        let smooth2 = scalar(smoothed_cross_entropy(&s, &y2, 0.1).unwrap());
        assert!(
            (both - (0.3 * smooth + 0.7 * smooth2)).abs() < 1e-5,
            "{both}"
        );
        assert!((scalar(hard_loss(&s, &y, None, 0.1).unwrap()) - smooth).abs() < 1e-6);
        // The distillation loss is unchanged by its split into terms.
        let t = Tensor::new(&[[2.0f32, 1.0, 0.0], [0.5, 0.5, 2.0]], &d).unwrap();
        let whole = scalar(distillation(&s, &t, &y, 2.0, 0.5).unwrap());
        let parts =
            scalar(distillation_with(&s, &t, cross_entropy(&s, &y).unwrap(), 2.0, 0.5).unwrap());
        assert_eq!(whole, parts);
    }
}
