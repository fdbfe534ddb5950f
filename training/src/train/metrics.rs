//! Classification metrics: accuracy, per-class accuracy and the confusion matrix.

use serde::{Deserialize, Serialize};

/// `counts[truth * n + predicted]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub classes: usize,
    pub counts: Vec<u64>,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth * self.classes + predicted] += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn correct(&self) -> u64 {
        (0..self.classes)
            .map(|i| self.counts[i * self.classes + i])
            .sum()
    }

    pub fn accuracy(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            0.0
        } else {
            self.correct() as f64 / total as f64
        }
    }

    /// Recall of each class; `None` for classes absent from the ground truth.
    pub fn per_class_accuracy(&self) -> Vec<Option<f64>> {
        (0..self.classes)
            .map(|t| {
                let row = &self.counts[t * self.classes..(t + 1) * self.classes];
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[t] as f64 / n as f64)
            })
            .collect()
    }

    /// Share of the most frequent true class: what always guessing it would score.
    pub fn majority_baseline(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let best = (0..self.classes)
            .map(|t| {
                self.counts[t * self.classes..(t + 1) * self.classes]
                    .iter()
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        best as f64 / total as f64
    }
}

/// 95% Wilson score interval for `correct` successes out of `total`.
pub fn wilson_interval(correct: u64, total: u64) -> (f64, f64) {
    if total == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054f64;
    let n = total as f64;
    let p = correct as f64 / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt()) / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rates() {
        let mut c = Confusion::new(3);
        for (t, p) in [(0, 0), (0, 1), (1, 1), (1, 1), (1, 2), (0, 0)] {
            c.add(t, p);
        }
        assert_eq!(c.total(), 6);
        assert_eq!(c.correct(), 4);
        assert!((c.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        let per = c.per_class_accuracy();
        assert!((per[0].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((per[1].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(per[2], None);
        assert!((c.majority_baseline() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn wilson_matches_reference() {
        // Reference: statsmodels proportion_confint(80, 100, method="wilson") = (0.7112, 0.8666).
        let (lo, hi) = wilson_interval(80, 100);
        assert!(
            (lo - 0.7112).abs() < 1e-3 && (hi - 0.8666).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
    }
}
