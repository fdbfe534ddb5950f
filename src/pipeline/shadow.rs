//! Shadow traffic: a sampled fraction of one model's live inputs is mirrored to another model
//! off the critical path, and the two answers are compared.
//!
//! `--shadow kd-q8=big:0.1` sends 10% of `kd-q8`'s inputs, already preprocessed, to `big` once
//! `kd-q8` has answered them; the client gets `kd-q8`'s answer without waiting for `big`. Each
//! mirrored input counts in `slimserve_shadow_requests_total{model, shadow, outcome}` with
//! outcome `agree` (same top-1 class), `disagree`, `dropped` (the shadow model's queue was
//! full: mirrored traffic yields to live traffic) or `error`; the largest absolute logit
//! difference goes to the `slimserve_shadow_logit_gap{model, shadow}` histogram.
//!
//! The two models may take different input sizes (the shipped `big` is 224x224, the students
//! 256x256): the mirrored input is then resized bilinearly (half-pixel centres, as PyTorch's
//! `interpolate(..., align_corners=False)`) to the shadow's size.

use std::str::FromStr;

use metrics::{Counter, Histogram};

use super::models::ServedModel;
use crate::error::Error;
use crate::scheduler::Input;
use crate::telemetry::{SHADOW_LOGIT_GAP, SHADOW_REQUESTS_TOTAL};

/// One `--shadow SOURCE=TARGET[:FRACTION]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRule {
    pub source: String,
    pub target: String,
    /// Share of the source's inputs mirrored, in (0, 1].
    pub fraction: f64,
}

impl FromStr for ShadowRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || {
            format!("invalid --shadow `{s}`: expected SOURCE=TARGET[:FRACTION], e.g. kd-q8=big:0.1")
        };
        let (source, rest) = s.split_once('=').ok_or_else(usage)?;
        let (target, fraction) = match rest.split_once(':') {
            Some((t, f)) => (t, f.trim().parse::<f64>().map_err(|_| usage())?),
            None => (rest, 1.0),
        };
        let (source, target) = (source.trim(), target.trim());
        if source.is_empty() || target.is_empty() {
            return Err(usage());
        }
        if source == target {
            return Err(format!(
                "invalid --shadow `{s}`: a model cannot shadow itself"
            ));
        }
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(format!(
                "invalid --shadow `{s}`: the fraction must be in (0, 1], got {fraction}"
            ));
        }
        Ok(Self {
            source: source.to_string(),
            target: target.to_string(),
            fraction,
        })
    }
}

/// The mirror of one source model: where its sampled inputs go and how they compared.
#[derive(Debug)]
pub struct Shadow {
    /// The shadow model's name, looked up in the served models for each mirrored input.
    pub target: String,
    fraction: f64,
    agree: Counter,
    disagree: Counter,
    dropped: Counter,
    error: Counter,
    logit_gap: Histogram,
}

impl Shadow {
    pub fn new(source: &str, target: &str, fraction: f64) -> Self {
        let counter = |outcome: &'static str| {
            metrics::counter!(SHADOW_REQUESTS_TOTAL,
                "model" => source.to_string(), "shadow" => target.to_string(), "outcome" => outcome)
        };
        Self {
            target: target.to_string(),
            fraction,
            agree: counter("agree"),
            disagree: counter("disagree"),
            dropped: counter("dropped"),
            error: counter("error"),
            logit_gap: metrics::histogram!(SHADOW_LOGIT_GAP,
                "model" => source.to_string(), "shadow" => target.to_string()),
        }
    }

    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Whether this input is mirrored.
    pub fn sampled(&self) -> bool {
        self.fraction >= 1.0 || rand::random::<f64>() < self.fraction
    }

    /// Runs `input` through the shadow model `target` and records how its answer compares
    /// with the source's `logits`. Never blocks the caller's answer: call it from a spawned
    /// task. A full shadow queue drops the input (mirrored traffic yields to live traffic).
    /// `from`: the side of the source model's inputs.
    pub async fn compare(&self, target: &ServedModel, input: Input, from: usize, logits: Vec<f32>) {
        let to = target.input_size();
        let input = if from == to {
            input
        } else {
            resize(&input, from, to)
        };
        let ticket = match target.queue.admit(1) {
            Ok(t) => t,
            Err(_) => return self.dropped.increment(1),
        };
        let answer = match target.queue.submit(ticket, input, None) {
            Ok(pending) => pending.wait().await,
            Err(Error::QueueFull { .. }) => return self.dropped.increment(1),
            Err(e) => Err(e),
        };
        match answer {
            Ok(inference) if inference.logits.len() == logits.len() => {
                if argmax(&inference.logits) == argmax(&logits) {
                    self.agree.increment(1);
                } else {
                    self.disagree.increment(1);
                }
                self.logit_gap
                    .record(max_abs_diff(&inference.logits, &logits));
            }
            Ok(_) | Err(_) => self.error.increment(1),
        }
    }
}

/// Output index `o` of `to` on an axis of `from`: the two source indices and the weight of the
/// second.
fn taps(o: usize, from: usize, to: usize) -> (usize, usize, f32) {
    let x = ((o as f32 + 0.5) * from as f32 / to as f32 - 0.5).max(0.0);
    let x0 = (x.floor() as usize).min(from - 1);
    (x0, (x0 + 1).min(from - 1), x - x0 as f32)
}

/// `input` (3 channels of `from x from`) bilinearly resized to `to x to`, in its own layout.
pub fn resize(input: &Input, from: usize, to: usize) -> Input {
    assert!(from > 0 && to > 0, "empty image");
    let t: Vec<_> = (0..to).map(|o| taps(o, from, to)).collect();
    // out(c, y, x) from a reader of (c, y, x) at the source size.
    let sample = |get: &dyn Fn(usize, usize, usize) -> f32, c: usize, y: usize, x: usize| {
        let ((y0, y1, fy), (x0, x1, fx)) = (t[y], t[x]);
        let top = get(c, y0, x0) * (1.0 - fx) + get(c, y0, x1) * fx;
        let bottom = get(c, y1, x0) * (1.0 - fx) + get(c, y1, x1) * fx;
        top * (1.0 - fy) + bottom * fy
    };
    let chw = |get: &dyn Fn(usize, usize, usize) -> f32| -> Vec<f32> {
        let mut out = Vec::with_capacity(3 * to * to);
        for c in 0..3 {
            for y in 0..to {
                for x in 0..to {
                    out.push(sample(get, c, y, x));
                }
            }
        }
        out
    };
    match input {
        Input::Chw(v) => Input::Chw(chw(&|c, y, x| v[(c * from + y) * from + x])),
        Input::ChwBytes(b) => Input::Chw(chw(&|c, y, x| {
            let i = 4 * ((c * from + y) * from + x);
            f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
        })),
        Input::Hwc(b) => {
            let get = |c: usize, y: usize, x: usize| f32::from(b[(y * from + x) * 3 + c]);
            let mut out = Vec::with_capacity(3 * to * to);
            for y in 0..to {
                for x in 0..to {
                    for c in 0..3 {
                        out.push(sample(&get, c, y, x).round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            Input::Hwc(out.into())
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizes_mirrored_inputs_in_their_own_layout() {
        // A horizontal ramp 0..from-1 in every channel (channel c offset by 100 c).
        let from = 8;
        let ramp: Vec<f32> = (0..3 * from * from)
            .map(|i| (i % from) as f32 + 100.0 * (i / (from * from)) as f32)
            .collect();
        // Same size: unchanged.
        let Input::Chw(same) = resize(&Input::Chw(ramp.clone()), from, from) else {
            panic!("layout")
        };
        assert_eq!(same, ramp);
        // Halving: output x averages source columns 2x and 2x + 1 (half-pixel centres).
        let Input::Chw(half) = resize(&Input::Chw(ramp.clone()), from, 4) else {
            panic!("layout")
        };
        assert_eq!(half.len(), 3 * 16);
        for (i, v) in half.iter().enumerate() {
            let (c, x) = (i / 16, i % 4);
            assert!(
                (v - (2 * x) as f32 - 0.5 - 100.0 * c as f32).abs() < 1e-5,
                "{i}: {v}"
            );
        }
        // The raw-bytes form decodes to the same floats.
        let bytes: Vec<u8> = ramp.iter().flat_map(|v| v.to_le_bytes()).collect();
        let Input::Chw(from_bytes) = resize(&Input::ChwBytes(bytes.into()), from, 4) else {
            panic!("layout")
        };
        assert_eq!(from_bytes, half);
        // HWC u8: same arithmetic, rounded, channels interleaved.
        let hwc: Vec<u8> = (0..from * from * 3)
            .map(|i| (20 * ((i / 3) % from) + i % 3) as u8)
            .collect();
        let Input::Hwc(small) = resize(&Input::Hwc(hwc.into()), from, 4) else {
            panic!("layout")
        };
        assert_eq!(small.len(), 4 * 4 * 3);
        for (i, &v) in small.iter().enumerate() {
            let (x, c) = ((i / 3) % 4, i % 3);
            assert_eq!(
                v,
                (20.0 * (2 * x) as f32 + 10.0 + c as f32).round() as u8,
                "{i}"
            );
        }
        // Upsizing keeps a constant image constant (edges clamp).
        let Input::Chw(up) = resize(&Input::Chw(vec![0.25; 3 * 4]), 2, 7) else {
            panic!("layout")
        };
        assert!(up.iter().all(|&v| (v - 0.25).abs() < 1e-6) && up.len() == 3 * 49);
    }

    #[test]
    fn parses_rules() {
        let r: ShadowRule = "kd-q8=big:0.25".parse().unwrap();
        assert_eq!(
            r,
            ShadowRule {
                source: "kd-q8".into(),
                target: "big".into(),
                fraction: 0.25
            }
        );
        assert_eq!("a=b".parse::<ShadowRule>().unwrap().fraction, 1.0);
        for bad in [
            "a", "a=", "=b", "a=a", "a=b:0", "a=b:1.5", "a=b:x", "a=b:-1",
        ] {
            let e = bad.parse::<ShadowRule>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn compares() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[2.0, 2.0]), 0);
        assert_eq!(max_abs_diff(&[1.0, -2.0], &[1.5, 1.0]), 3.0);
    }
}
