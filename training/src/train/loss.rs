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

/// SPEC's distillation loss; the teacher logits carry no gradient.
pub fn distillation(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let teacher = teacher.detach();
    let n = student.dim(0)? as f64;
    let p_t = softmax_last_dim(&(&teacher / temperature)?)?;
    let log_p_t = log_softmax(&(&teacher / temperature)?, D::Minus1)?;
    let log_p_s = log_softmax(&(student / temperature)?, D::Minus1)?;
    let kl = ((p_t * (log_p_t - log_p_s)?)?.sum_all()? / n)?;
    let soft = (kl * (alpha * temperature * temperature))?;
    let hard = (cross_entropy(student, labels)? * (1.0 - alpha))?;
    soft + hard
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
}
