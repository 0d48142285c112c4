//! Interleaved rounds of "direct" against "mesh" and how they are summarized: each figure of a
//! scenario is the median over rounds of that round's figure, so one disturbed round moves little.

use anyhow::{Context as _, Result};
use ferry_tests::testapp::{RrReport, percentile};
use serde::Serialize;

/// The two things compared in every pair of rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Between pods that are not in the mesh.
    Direct,
    /// Between enrolled pods, through Ferry.
    Mesh,
}

impl Kind {
    /// The scenario's name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Mesh => "mesh",
        }
    }
}

/// The order of the scenarios in round `round`: alternating, so a slow drift hits both alike.
pub fn order(round: usize) -> [Kind; 2] {
    if round.is_multiple_of(2) { [Kind::Direct, Kind::Mesh] } else { [Kind::Mesh, Kind::Direct] }
}

/// Direct results, then mesh results, each in round order.
pub type Pair<T> = (Vec<T>, Vec<T>);

/// Runs `measure(kind, round)` (rounds counted from 1) for both scenarios of every round, in
/// [`order`]; the direct results and the mesh results, each in round order. The first error ends
/// it, naming the scenario and the round.
pub fn interleave<T>(rounds: usize, mut measure: impl FnMut(Kind, usize) -> Result<T>) -> Result<Pair<T>> {
    let (mut direct, mut mesh) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for kind in order(round) {
            let result =
                measure(kind, round + 1).with_context(|| format!("{} round {}", kind.name(), round + 1))?;
            match kind {
                Kind::Direct => direct.push(result),
                Kind::Mesh => mesh.push(result),
            }
        }
    }
    Ok((direct, mesh))
}

/// Median over rounds of one figure of each round's report; 0 for no rounds.
pub fn median_of<T>(rounds: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = rounds.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

/// Smallest and largest value of one figure over rounds; zeros for no rounds.
pub fn range_of<T>(rounds: &[T], figure: impl Fn(&T) -> f64) -> [f64; 2] {
    if rounds.is_empty() {
        return [0.0, 0.0];
    }
    let values: Vec<f64> = rounds.iter().map(figure).collect();
    [
        values.iter().copied().fold(f64::INFINITY, f64::min),
        values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    ]
}

/// Median over the rounds of (mesh figure - direct figure) within the same round.
pub fn paired_median<T>(direct: &[T], mesh: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    let mut paired: Vec<f64> = direct.iter().zip(mesh).map(|(d, m)| figure(m) - figure(d)).collect();
    paired.sort_by(f64::total_cmp);
    percentile(&paired, 0.5)
}

/// One request/response scenario over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Median over rounds of each round's p50.
    pub p50_us: f64,
    /// Median over rounds of each round's p90.
    pub p90_us: f64,
    /// Median over rounds of each round's p99.
    pub p99_us: f64,
    /// Median over rounds of each round's mean.
    pub mean_us: f64,
    /// Smallest and largest per-round p50: the spread between rounds.
    pub p50_range_us: [f64; 2],
    /// Each round's report, in order.
    pub rounds: Vec<RrReport>,
}

/// The summary of a scenario's rounds.
pub fn summarize(rounds: Vec<RrReport>) -> Summary {
    Summary {
        p50_us: median_of(&rounds, |r| r.p50_us),
        p90_us: median_of(&rounds, |r| r.p90_us),
        p99_us: median_of(&rounds, |r| r.p99_us),
        mean_us: median_of(&rounds, |r| r.mean_us),
        p50_range_us: range_of(&rounds, |r| r.p50_us),
        rounds,
    }
}

/// Mesh against direct for one figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Delta {
    /// Mesh minus direct.
    pub added_us: f64,
    /// Mesh over direct.
    pub ratio: f64,
}

impl Delta {
    /// The delta from `direct` to `mesh`; a ratio of 0 when direct is 0.
    pub fn new(direct: f64, mesh: f64) -> Self {
        Delta { added_us: mesh - direct, ratio: if direct > 0.0 { mesh / direct } else { 0.0 } }
    }
}

/// Mesh against direct for every figure.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// At the median.
    pub p50: Delta,
    /// At the 90th percentile.
    pub p90: Delta,
    /// At the 99th percentile.
    pub p99: Delta,
    /// Of the means.
    pub mean: Delta,
    /// Median over rounds of (mesh p50 - direct p50) within the same round.
    pub added_p50_paired_us: f64,
}

/// Compares two summaries of the same rounds.
pub fn compare(direct: &Summary, mesh: &Summary) -> Comparison {
    Comparison {
        p50: Delta::new(direct.p50_us, mesh.p50_us),
        p90: Delta::new(direct.p90_us, mesh.p90_us),
        p99: Delta::new(direct.p99_us, mesh.p99_us),
        mean: Delta::new(direct.mean_us, mesh.mean_us),
        added_p50_paired_us: paired_median(&direct.rounds, &mesh.rounds, |r| r.p50_us),
    }
}

/// The table rows of a direct/mesh comparison: one per scenario, then added and ratio, for p50,
/// p90, p99 and mean, under a header line.
pub fn rr_rows(names: [&str; 2], direct: &Summary, mesh: &Summary, c: &Comparison) -> String {
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0).max(10);
    let mut out =
        format!("{:<width$} {:>9} {:>9} {:>9} {:>9}\n", "", "p50 us", "p90 us", "p99 us", "mean us");
    for (name, s) in names.iter().zip([direct, mesh]) {
        out += &format!(
            "{name:<width$} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
            s.p50_us, s.p90_us, s.p99_us, s.mean_us
        );
    }
    let deltas = [c.p50, c.p90, c.p99, c.mean];
    let added: Vec<String> = deltas.iter().map(|d| format!("{:>9.1}", d.added_us)).collect();
    let ratio: Vec<String> = deltas.iter().map(|d| format!("{:>8.2}x", d.ratio)).collect();
    out += &format!("{:<width$} {}\n", "added", added.join(" "));
    out += &format!("{:<width$} {}\n", "ratio", ratio.join(" "));
    out
}

/// The line under a direct/mesh table: how far the rounds' p50s spread, and the paired p50 delta.
pub fn spread_line(direct: &Summary, mesh: &Summary, c: &Comparison) -> String {
    let (d, m) = (direct.p50_range_us, mesh.p50_range_us);
    format!(
        "p50 spread over rounds: direct {:.1}..{:.1} us, mesh {:.1}..{:.1} us; paired added p50 {:.1} us\n",
        d[0], d[1], m[0], m[1], c.added_p50_paired_us
    )
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A round whose figures derive from its p50.
    pub fn report(p50: f64) -> RrReport {
        RrReport { count: 10, p50_us: p50, p90_us: p50 * 2.0, p99_us: p50 * 3.0, mean_us: p50 + 1.0 }
    }

    #[test]
    fn rounds_alternate_the_order() {
        assert_eq!(order(0), [Kind::Direct, Kind::Mesh]);
        assert_eq!(order(1), [Kind::Mesh, Kind::Direct]);
        assert_eq!(order(4), order(0));
    }

    #[test]
    fn summary_takes_the_median_round_of_each_figure() {
        let s = summarize(vec![report(30.0), report(10.0), report(20.0)]);
        assert_eq!((s.p50_us, s.p90_us, s.p99_us, s.mean_us), (20.0, 40.0, 60.0, 21.0));
        assert_eq!(s.p50_range_us, [10.0, 30.0]);
        assert_eq!(s.rounds.len(), 3);
        assert_eq!(summarize(Vec::new()).p50_range_us, [0.0, 0.0]);
    }

    #[test]
    fn comparison_pairs_rounds() {
        let direct = summarize(vec![report(10.0), report(20.0), report(12.0)]);
        let mesh = summarize(vec![report(25.0), report(26.0), report(30.0)]);
        let c = compare(&direct, &mesh);
        assert_eq!(c.p50, Delta { added_us: 14.0, ratio: 26.0 / 12.0 });
        // Per round: 15, 6, 18; the median is 15.
        assert_eq!(c.added_p50_paired_us, 15.0);
        assert_eq!(Delta::new(0.0, 5.0).ratio, 0.0);
    }

    #[test]
    fn interleave_alternates_and_names_the_failing_round() {
        let mut calls = Vec::new();
        let (direct, mesh) = interleave(3, |kind, round| {
            calls.push((kind, round));
            Ok(round * 10 + usize::from(kind == Kind::Mesh))
        })
        .unwrap();
        use Kind::{Direct, Mesh};
        assert_eq!(calls, [(Direct, 1), (Mesh, 1), (Mesh, 2), (Direct, 2), (Direct, 3), (Mesh, 3)]);
        assert_eq!((direct, mesh), (vec![10, 20, 30], vec![11, 21, 31]));
        let e = interleave(2, |kind, round| {
            anyhow::ensure!(!(kind == Kind::Direct && round == 2), "boom");
            Ok(())
        })
        .unwrap_err();
        assert_eq!(format!("{e:#}"), "direct round 2: boom");
    }

    #[test]
    fn range_covers_negative_figures() {
        assert_eq!(range_of(&[-3.0, -1.0, -2.0], |v| *v), [-3.0, -1.0]);
        assert_eq!(range_of::<f64>(&[], |v| *v), [0.0, 0.0]);
    }

    #[test]
    fn rows_align_under_the_longest_name() {
        let direct = summarize(vec![report(10.0)]);
        let mesh = summarize(vec![report(25.0)]);
        let text = rr_rows(["direct", "mesh (mTLS)"], &direct, &mesh, &compare(&direct, &mesh));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[1], "direct           10.0      20.0      30.0      11.0");
        assert_eq!(lines[2], "mesh (mTLS)      25.0      50.0      75.0      26.0");
        assert!(lines[4].starts_with("ratio           2.50x"), "{text}");
    }
}
