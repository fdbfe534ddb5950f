//! Shadow traffic: a sampled fraction of one model's live inputs is mirrored to another model
//! off the critical path, and the two answers are compared.
//!
//! `--shadow kd-q8=big:0.1` sends 10% of `kd-q8`'s inputs, already preprocessed, to `big` once
//! `kd-q8` has answered them; the client gets `kd-q8`'s answer without waiting for `big`. Each
//! mirrored input counts in `slimserve_shadow_requests_total{model, shadow, outcome}` with
//! outcome `agree` (same top-1 class), `disagree`, `dropped` (the shadow model's queue was
//! full: mirrored traffic yields to live traffic) or `error`; the largest absolute logit
//! difference goes to the `slimserve_shadow_logit_gap{model, shadow}` histogram.

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
    pub async fn compare(&self, target: &ServedModel, input: Input, logits: Vec<f32>) {
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
