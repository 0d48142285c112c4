//! Watching the agents during a soak: resident memory and open descriptors read from /proc, the
//! agents' own connection counters, and the verdict on growth. A growth verdict compares medians
//! of a few samples at each end of the measured part of the run, so that one noisy sample (a bulk
//! transfer's buffers in flight, a burst of churn) does not decide it.

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// The shortest warm-up: the agents' allocators and connection pools settle in this time.
pub const MIN_WARMUP: Duration = Duration::from_secs(30);
/// The share of a run that is warm-up when that is longer than [`MIN_WARMUP`].
pub const WARMUP_SHARE: f64 = 0.2;
/// How much a metric may grow over its baseline by the end of the run (10 percent).
pub const GROWTH_LIMIT: f64 = 0.10;
/// Samples whose median makes the baseline, and the end.
pub const WINDOW: usize = 5;

/// The warm-up of a run of `duration`: [`WARMUP_SHARE`] of it, at least [`MIN_WARMUP`].
pub fn warmup(duration: Duration) -> Duration {
    duration.mul_f64(WARMUP_SHARE).max(MIN_WARMUP)
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    /// Resident set size (VmRSS), in bytes.
    pub rss_bytes: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Reads `pid`'s resident memory and descriptor count now; an error when the process is gone.
pub fn sample(pid: u32, t_s: f64) -> Result<Sample> {
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path)
        .with_context(|| format!("cannot read {status_path} (did the process exit?)"))?;
    let rss_bytes = vm_rss(&status).with_context(|| format!("{status_path} has no VmRSS line"))?;
    let fd_dir = format!("/proc/{pid}/fd");
    let fds = std::fs::read_dir(&fd_dir).with_context(|| format!("cannot list {fd_dir}"))?.count() as u64;
    Ok(Sample { t_s, rss_bytes, fds })
}

/// VmRSS of a /proc/PID/status text, in bytes (the kernel writes it in kB, meaning KiB).
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// What is watched for growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Resident memory.
    Rss,
    /// Open file descriptors.
    Fds,
}

impl Metric {
    /// Every watched metric.
    pub const ALL: [Metric; 2] = [Metric::Rss, Metric::Fds];

    /// The metric's value in `sample`.
    pub fn of(self, sample: &Sample) -> f64 {
        match self {
            Metric::Rss => sample.rss_bytes as f64,
            Metric::Fds => sample.fds as f64,
        }
    }

    /// How messages name it.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Rss => "RSS",
            Metric::Fds => "open fds",
        }
    }

    /// A value of it for people: MiB for memory, a count for descriptors.
    pub fn show(self, value: f64) -> String {
        match self {
            Metric::Rss => format!("{:.1} MiB", value / (1024.0 * 1024.0)),
            Metric::Fds => format!("{value:.0}"),
        }
    }
}

/// A metric over the measured part of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Trend {
    /// Median of the first [`WINDOW`] samples after the warm-up.
    pub baseline: f64,
    /// Median of the last [`WINDOW`] samples.
    pub end: f64,
    /// The highest sample of the whole run, warm-up included.
    pub max: f64,
}

impl Trend {
    /// `end` over `baseline`, as a fraction (0.1 is 10 percent more); 0 without a baseline.
    pub fn growth(&self) -> f64 {
        if self.baseline > 0.0 { (self.end - self.baseline) / self.baseline } else { 0.0 }
    }
}

/// The trend of `metric` over `samples` (in time order), the first `warmup_s` seconds left out
/// of the baseline; an error when fewer than two windows of samples follow the warm-up (the
/// baseline and the end would overlap).
pub fn trend(samples: &[Sample], metric: Metric, warmup_s: f64) -> Result<Trend> {
    let measured: Vec<f64> = samples.iter().filter(|s| s.t_s >= warmup_s).map(|s| metric.of(s)).collect();
    ensure!(
        measured.len() >= 2 * WINDOW,
        "only {} samples after the {warmup_s:.0} s warm-up; the verdict needs {}",
        measured.len(),
        2 * WINDOW
    );
    let max = samples.iter().map(|s| metric.of(s)).fold(0.0, f64::max);
    Ok(Trend {
        baseline: median(&measured[..WINDOW]),
        end: median(&measured[measured.len() - WINDOW..]),
        max,
    })
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The failure message when `trend` grew more than [`GROWTH_LIMIT`]; `None` when it did not.
pub fn growth_failure(agent: &str, metric: Metric, trend: &Trend) -> Option<String> {
    (trend.growth() > GROWTH_LIMIT).then(|| {
        format!(
            "agent {agent}: {} grew {:.1}% over its baseline (baseline {}, end {}, max {}; \
             the limit is +{:.0}%)",
            metric.label(),
            trend.growth() * 100.0,
            metric.show(trend.baseline),
            metric.show(trend.end),
            metric.show(trend.max),
            GROWTH_LIMIT * 100.0
        )
    })
}

/// The sum over every label set of the counter or gauge family `name` in a Prometheus text
/// exposition (0 when it has none).
pub fn family_sum(exposition: &str, name: &str) -> Result<f64> {
    let mut sum = 0.0;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        // `name{labels} value` or `name value`; a longer name sharing the prefix is another family.
        let value = match rest.chars().next() {
            Some('{') => rest.rsplit_once('}').map(|(_, v)| v),
            Some(' ') => Some(rest),
            _ => continue,
        };
        let Some(value) = value.and_then(|v| v.split_whitespace().next()) else {
            bail!("bad sample line {line:?}");
        };
        sum += value.parse::<f64>().with_context(|| format!("bad value in {line:?}"))?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[u64]) -> Vec<Sample> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| Sample { t_s: i as f64 * 10.0, rss_bytes: v * 1024 * 1024, fds: v })
            .collect()
    }

    #[test]
    fn warmup_is_a_fifth_but_at_least_half_a_minute() {
        assert_eq!(warmup(Duration::from_secs(120)), Duration::from_secs(30));
        assert_eq!(warmup(Duration::from_secs(1800)), Duration::from_secs(360));
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id(), 1.5).unwrap();
        assert!(s.rss_bytes > 1024 * 1024 && s.fds >= 3, "{s:?}");
        assert_eq!(s.t_s, 1.5);
        assert!(sample(4_194_304 + 7, 0.0).is_err(), "pids stop at 2^22");
        assert_eq!(vm_rss("Name:\tx\nVmRSS:\t   2048 kB\n"), Some(2 * 1024 * 1024));
    }

    #[test]
    fn the_baseline_leaves_out_the_warmup_and_one_spike_does_not_decide() {
        // Warm-up (t < 30 s) at 10..90, then flat at 100 with one spike of 500 at each end.
        let s = samples(&[10, 50, 90, 100, 500, 100, 100, 100, 100, 100, 100, 100, 100, 500, 100]);
        let t = trend(&s, Metric::Fds, 30.0).unwrap();
        assert_eq!((t.baseline, t.end, t.max), (100.0, 100.0, 500.0));
        assert_eq!(growth_failure("node-a", Metric::Fds, &t), None);
    }

    #[test]
    fn steady_growth_fails_naming_agent_metric_baseline_and_end() {
        let s = samples(&[100, 100, 100, 100, 100, 102, 104, 106, 108, 110, 112, 114, 116, 118]);
        let t = trend(&s, Metric::Rss, 0.0).unwrap();
        assert_eq!((t.baseline, t.end), (100.0 * 1048576.0, 114.0 * 1048576.0));
        let msg = growth_failure("node-b", Metric::Rss, &t).unwrap();
        assert!(msg.starts_with("agent node-b: RSS grew 14.0%"), "{msg}");
        assert!(msg.contains("baseline 100.0 MiB, end 114.0 MiB, max 118.0 MiB"), "{msg}");
        // Exactly at the limit passes.
        let at_limit = Trend { baseline: 100.0, end: 110.0, max: 110.0 };
        assert_eq!(growth_failure("a", Metric::Fds, &at_limit), None);
    }

    #[test]
    fn too_few_samples_after_the_warmup_is_an_error() {
        let s = samples(&[1; 12]);
        assert!(trend(&s, Metric::Fds, 30.0).unwrap_err().to_string().contains("only 9 samples"));
    }

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn family_sum_adds_every_label_set_of_one_family() {
        let text = "# HELP ferry_tcp_connections_opened_total x\n\
                    ferry_tcp_connections_opened_total{reporter=\"source\",a=\"}\"} 3\n\
                    ferry_tcp_connections_opened_total{reporter=\"destination\"} 4\n\
                    ferry_tcp_connections_opened_total_extra 100\n\
                    process_open_fds 12\n";
        assert_eq!(family_sum(text, "ferry_tcp_connections_opened_total").unwrap(), 7.0);
        assert_eq!(family_sum(text, "process_open_fds").unwrap(), 12.0);
        assert_eq!(family_sum(text, "absent").unwrap(), 0.0);
        assert!(family_sum("x{a=\"1\"} nope\n", "x").is_err());
    }
}
