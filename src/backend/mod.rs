//! Model execution: one executor thread per model and device, off the async runtime.
//!
//! The batcher hands the executor a batch as one `[N, 3, S, S]` f32 buffer; on the CPU the
//! executor runs the model compiled by [`crate::infer::FastModel`] (BatchNorm folded, fused
//! kernels) when its architecture has a compiled form, else candle's eval-mode forward
//! (`forward_t(x, false)`: BatchNorm uses its running statistics), and answers the `[N, C]`
//! logits through a oneshot channel. Compute never blocks a runtime
//! thread, and one thread per model keeps a slow model from stalling the others.

mod device;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{Device, ModuleT, Tensor};
use tokio::sync::oneshot;

pub use device::{DeviceError, DeviceSpec};

use crate::infer::FastModel;
use crate::zoo::Model;

/// The logits of one executed batch.
#[derive(Debug)]
pub struct BatchOutput {
    /// Row-major `[N, C]`.
    pub logits: Vec<f32>,
    /// Forward pass time on the executor (device synchronised by the copy back).
    pub compute: Duration,
}

struct Job {
    input: Vec<f32>,
    batch: usize,
    reply: oneshot::Sender<Result<BatchOutput, String>>,
}

/// Handle to a model's executor thread; the thread ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Executor {
    /// Unbounded because the batcher waits for each batch before sending the next.
    jobs: mpsc::Sender<Job>,
    input_size: usize,
    num_classes: usize,
    engine: &'static str,
}

impl Executor {
    /// Starts the executor thread for `model` (already built on `device`).
    ///
    /// `compute_delay` is added to every batch: fault injection for overload drills and
    /// tests (`--inject-compute-delay`); zero in production.
    pub fn spawn(
        name: &str,
        model: Model,
        device: Device,
        compute_delay: Duration,
    ) -> std::io::Result<Self> {
        let spec = model.spec().clone();
        let fast = if device.is_cpu() {
            FastModel::compile(&model).ok()
        } else {
            None
        };
        let engine = if fast.is_some() { "fused" } else { "candle" };
        let (jobs, rx) = mpsc::channel::<Job>();
        let (s, c) = (spec.input_size, spec.num_classes);
        thread::Builder::new()
            .name(format!("executor-{name}"))
            .spawn(move || {
                for job in rx {
                    let started = Instant::now();
                    if !compute_delay.is_zero() {
                        thread::sleep(compute_delay);
                    }
                    // A panic fails this batch (INTERNAL to its requests), not the model:
                    // the executor lives on for the next one.
                    let run =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &fast {
                            Some(f) => Ok(f.forward(&job.input, job.batch)),
                            None => forward(&model, &device, job.input, job.batch, s)
                                .map_err(|e| e.to_string()),
                        }));
                    let logits = run.unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(format!("the forward pass panicked: {what}"))
                    });
                    let result = logits.map(|logits| BatchOutput {
                        logits,
                        compute: started.elapsed(),
                    });
                    // The batcher may have gone away (shutdown); nothing to answer then.
                    let _ = job.reply.send(result);
                }
            })?;
        Ok(Self {
            jobs,
            input_size: s,
            num_classes: c,
            engine,
        })
    }

    /// `fused` (the compiled CPU engine) or `candle`.
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    pub fn input_size(&self) -> usize {
        self.input_size
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Runs one batch: `input` holds `batch` CHW images back to back.
    pub async fn run(&self, input: Vec<f32>, batch: usize) -> Result<BatchOutput, ExecError> {
        debug_assert_eq!(input.len(), batch * 3 * self.input_size * self.input_size);
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                input,
                batch,
                reply,
            })
            .map_err(|_| ExecError::Stopped)?;
        match rx.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(message)) => Err(ExecError::Failed(message)),
            Err(_) => Err(ExecError::Stopped),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Failed(String),
    #[error("executor thread stopped")]
    Stopped,
}

fn forward(
    model: &Model,
    device: &Device,
    input: Vec<f32>,
    batch: usize,
    size: usize,
) -> candle_core::Result<Vec<f32>> {
    let x = Tensor::from_vec(input, (batch, 3, size, size), device)?;
    let logits = model.forward_t(&x, false)?;
    logits
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Numerically stable softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{Arch, ModelSpec};

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, 2.0, 10.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(top_k(&p, 2), vec![3, 1]);
        // Large logits do not overflow.
        assert_eq!(softmax(&[1000.0, 1000.0]), vec![0.5, 0.5]);
        assert_eq!(top_k(&[0.5, 0.5, 0.1], 3), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn executor_matches_a_direct_forward() {
        let spec = ModelSpec::new(Arch::Student, 4, 32);
        let (_, model) = Model::init(&spec, &Device::Cpu).unwrap();
        let input: Vec<f32> = (0..2 * 3 * 32 * 32)
            .map(|i| (i % 97) as f32 / 97.0)
            .collect();
        let candle = forward(&model, &Device::Cpu, input.clone(), 2, 32).unwrap();
        // On the CPU a student runs on the compiled engine: exactly its answer, and candle's
        // to float rounding.
        let fused = FastModel::compile(&model).unwrap().forward(&input, 2);
        let exec = Executor::spawn("t", model, Device::Cpu, Duration::ZERO).unwrap();
        assert_eq!(exec.engine(), "fused");
        let out = exec.run(input.clone(), 2).await.unwrap();
        assert_eq!(out.logits.len(), 2 * 4);
        assert_eq!(out.logits, fused);
        let scale = candle.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in out.logits.iter().zip(&candle) {
            assert!((a - b).abs() <= 1e-4 * scale, "{a} vs candle {b}");
        }

        // A batch whose forward pass panics (here: fewer floats than its batch size says)
        // fails alone; the executor answers the next batch.
        let (reply, rx) = oneshot::channel();
        let short = input[..3 * 32 * 32].to_vec();
        exec.jobs
            .send(Job {
                input: short,
                batch: 2,
                reply,
            })
            .unwrap();
        let err = rx.await.unwrap().unwrap_err();
        assert!(
            err.contains("panicked") && err.contains("not 2 images"),
            "{err}"
        );
        let again = exec.run(input, 2).await.unwrap();
        assert_eq!(again.logits, fused);
    }
}
