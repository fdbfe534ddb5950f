//! A load run's result: throughput, counts by gRPC status, latency percentiles and histogram.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::{Api, LoadShape};

/// Latency statistics of the successful requests, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// One histogram bucket: requests with latency <= `le_ms` (and above the previous bucket).
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub le_ms: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub addr: String,
    pub api: Api,
    pub models: Vec<String>,
    pub concurrency: u32,
    /// Target rate (0: closed loop).
    pub rate: f64,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub duration_s: f64,
    /// Successful requests per second of wall time.
    pub throughput_rps: f64,
    /// Requests by gRPC status code name (OK, RESOURCE_EXHAUSTED, ...).
    pub codes: BTreeMap<String, u64>,
    /// Over successful requests; all zero when none succeeded.
    pub latency_ms: LatencySummary,
    /// Successful requests by latency, log-spaced buckets (empty buckets left out).
    pub histogram: Vec<Bucket>,
}

/// Bucket bounds in ms: 0.1 ms to 60 s, about 26% apart.
fn bucket_bounds() -> Vec<f64> {
    let mut b = Vec::new();
    let mut x = 0.1f64;
    while x < 60_000.0 {
        b.push((x * 1000.0).round() / 1000.0);
        x *= 10f64.powf(0.1);
    }
    b.push(f64::INFINITY);
    b
}

/// The `q` quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    pub fn new(
        shape: &LoadShape,
        models: Vec<String>,
        elapsed: Duration,
        samples: &[(Duration, &str)],
    ) -> Self {
        let codes = super::count_codes(samples.iter().map(|s| s.1));
        let mut ok: Vec<f64> = samples
            .iter()
            .filter(|s| s.1 == "OK")
            .map(|s| s.0.as_secs_f64() * 1e3)
            .collect();
        ok.sort_by(f64::total_cmp);
        let latency_ms = if ok.is_empty() {
            LatencySummary::default()
        } else {
            LatencySummary {
                min: ok[0],
                mean: ok.iter().sum::<f64>() / ok.len() as f64,
                p50: quantile(&ok, 0.50),
                p90: quantile(&ok, 0.90),
                p99: quantile(&ok, 0.99),
                max: ok[ok.len() - 1],
            }
        };
        let mut histogram: Vec<Bucket> = bucket_bounds()
            .into_iter()
            .map(|le_ms| Bucket { le_ms, count: 0 })
            .collect();
        for &v in &ok {
            let last = histogram.len() - 1;
            let i = histogram.partition_point(|b| b.le_ms < v).min(last);
            histogram[i].count += 1;
        }
        histogram.retain(|b| b.count > 0);
        let secs = elapsed.as_secs_f64().max(1e-9);
        Self {
            addr: shape.addr.clone(),
            api: shape.api,
            models,
            concurrency: shape.concurrency,
            rate: shape.rate,
            requests: samples.len() as u64,
            ok: ok.len() as u64,
            errors: (samples.len() - ok.len()) as u64,
            duration_s: elapsed.as_secs_f64(),
            throughput_rps: ok.len() as f64 / secs,
            codes,
            latency_ms,
            histogram,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_ms;
        writeln!(
            f,
            "{} {:?} -> {} | concurrency {}{}",
            self.addr,
            self.api,
            self.models.join(","),
            self.concurrency,
            if self.rate > 0.0 {
                format!(", target {:.1} req/s", self.rate)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "  requests {} in {:.2} s: {} ok, {} errors | throughput {:.1} req/s",
            self.requests, self.duration_s, self.ok, self.errors, self.throughput_rps
        )?;
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        writeln!(f, "  status: {}", codes.join(", "))?;
        writeln!(
            f,
            "  latency ms: min {:.2} mean {:.2} p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            l.min, l.mean, l.p50, l.p90, l.p99, l.max
        )?;
        let peak = self.histogram.iter().map(|b| b.count).max().unwrap_or(0);
        for b in &self.histogram {
            let bar = "#".repeat(((b.count * 40).div_ceil(peak.max(1))) as usize);
            writeln!(f, "  <= {:>9.2} ms {:>7} {bar}", b.le_ms, b.count)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn report_counts_and_buckets() {
        let shape = LoadShape {
            addr: "x".into(),
            api: Api::Classify,
            images: None,
            concurrency: 2,
            requests: 4,
            duration: Duration::from_secs(1),
            rate: 0.0,
            warmup: 0,
            timeout: Duration::from_secs(1),
            connections: 1,
            seed: 0,
        };
        let ms = Duration::from_millis;
        let r = Report::new(
            &shape,
            vec!["m".into()],
            Duration::from_secs(2),
            &[
                (ms(1), "OK"),
                (ms(3), "OK"),
                (ms(2), "RESOURCE_EXHAUSTED"),
                (ms(10), "OK"),
            ],
        );
        assert_eq!((r.requests, r.ok, r.errors), (4, 3, 1));
        assert_eq!(r.codes["OK"], 3);
        assert_eq!(r.codes["RESOURCE_EXHAUSTED"], 1);
        assert_eq!(r.throughput_rps, 1.5);
        assert_eq!((r.latency_ms.min, r.latency_ms.max), (1.0, 10.0));
        assert_eq!(r.latency_ms.p50, 3.0);
        assert_eq!(r.histogram.iter().map(|b| b.count).sum::<u64>(), 3);
        assert!(r.histogram.iter().all(|b| b.count > 0));
        // each latency falls in the first bucket whose bound is not below it
        assert!(r.histogram[0].le_ms >= 1.0 && r.histogram[0].le_ms < 1.3);
    }
}
