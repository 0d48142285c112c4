//! The report: `report.json` (one row per scenario plus ratios and targets) and `report.md`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::Machine;
use crate::measure::Measured;
use crate::plan::{BULK_STREAMS, HEADLINE_CONNS, Plan, RATE};

/// One scenario's row. The first eleven fields are the report's fixed schema; the rest add detail.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name.
    pub name: String,
    /// Open-loop latency percentiles at the headline connection count.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// p50 minus the baseline's p50 (same run, same load).
    pub added_p50_us: f64,
    /// p99 minus the baseline's p99.
    pub added_p99_us: f64,
    /// Requests per second achieved in the headline open-loop run.
    pub rps: f64,
    /// Bulk throughput over several streams, in Gbit/s.
    pub gbps: f64,
    /// CPU seconds of all mesh processes per 1,000 requests (0 without a mesh).
    pub cpu_s_per_1k: f64,
    /// Peak summed resident memory of all mesh processes, in MB.
    pub rss_mb: f64,
    /// The scenario the added figures are measured against.
    pub baseline: String,
    /// The connection count of the headline figures.
    pub headline_conns: usize,
    /// Closed-loop round trip on one connection: median, in µs.
    pub rr_p50_us: f64,
    /// Closed-loop round trip: 99th percentile, in µs.
    pub rr_p99_us: f64,
    /// Closed-loop median minus the baseline's.
    pub added_rr_p50_us: f64,
    /// New connections per second, one after another (connect, request, response, close).
    pub conns_per_s: f64,
    /// Bulk throughput over one stream, in Gbit/s.
    pub gbps_1_stream: f64,
    /// How many processes the cost figures add up.
    pub mesh_processes: usize,
    /// Everything measured, for a closer look.
    pub measured: Measured,
}

/// A ratio of two scenarios' figures.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// "numerator / denominator".
    pub name: String,
    /// Of the added p50.
    pub added_p50: f64,
    /// Of the added p99.
    pub added_p99: f64,
    /// Of CPU per request.
    pub cpu: f64,
    /// Of resident memory.
    pub rss: f64,
}

/// A performance target, checked against this run: one of the issue's, or an informational one
/// (its name says so).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub target: String,
    /// The measured ratio.
    pub value: f64,
    /// The largest ratio that meets it.
    pub limit: f64,
    /// Whether the run meets it (judged on `value`).
    pub met: bool,
    /// The ratio in each round, in round order: the spread behind `value`.
    pub per_round: Vec<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `git rev-parse HEAD` of the tree that was measured (with "-dirty" when it had changes).
    pub commit: String,
    /// Where it ran.
    pub machine: Machine,
    /// How much each scenario measured.
    pub plan: Plan,
    /// One row per scenario: each figure the median over the rounds.
    pub scenarios: Vec<Row>,
    /// Ferry against the sidecars, and with policies against without: each ratio the median of the
    /// per-round ratios.
    pub ratios: Vec<Ratio>,
    /// The targets, judged on the median ratios.
    pub targets: Vec<Target>,
    /// Every round's rows, in round order, for the spread behind the medians.
    pub rounds: Vec<Vec<Row>>,
}

/// Builds a row from a scenario's measurements and its baseline's (None for a baseline itself).
pub fn row(name: &str, baseline: &str, m: &Measured, base: Option<&Measured>) -> Row {
    let head = m.load_at(HEADLINE_CONNS);
    let base_head = base.and_then(|b| b.load_at(HEADLINE_CONNS));
    let pick = |l: Option<&ferry_tests::testapp::LoadReport>,
                f: fn(&ferry_tests::testapp::LoadReport) -> f64| { l.map(f).unwrap_or(0.0) };
    let added = |f: fn(&ferry_tests::testapp::LoadReport) -> f64| match base_head {
        Some(b) => pick(head, f) - f(b),
        None => 0.0,
    };
    Row {
        name: name.to_owned(),
        p50_us: pick(head, |l| l.p50_us),
        p90_us: pick(head, |l| l.p90_us),
        p99_us: pick(head, |l| l.p99_us),
        p999_us: pick(head, |l| l.p999_us),
        added_p50_us: added(|l| l.p50_us),
        added_p99_us: added(|l| l.p99_us),
        rps: pick(head, |l| l.achieved_rps),
        gbps: m.bulk_n.gbps,
        cpu_s_per_1k: m.cpu_s_per_1k(),
        rss_mb: m.rss_mb,
        baseline: baseline.to_owned(),
        headline_conns: HEADLINE_CONNS,
        rr_p50_us: m.rr.p50_us,
        rr_p99_us: m.rr.p99_us,
        added_rr_p50_us: base.map(|b| m.rr.p50_us - b.rr.p50_us).unwrap_or(0.0),
        conns_per_s: m.crr.conns_per_s,
        gbps_1_stream: m.bulk_1.gbps,
        mesh_processes: m.mesh_processes,
        measured: m.clone(),
    }
}

/// `a / b`, or NaN (shown as "-") when `b` is not positive.
fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// Scenario `a`'s figures over `b`'s.
fn ratio(a: &Row, b: &Row) -> Ratio {
    Ratio {
        name: format!("{} / {}", a.name, b.name),
        added_p50: div(a.added_p50_us, b.added_p50_us),
        added_p99: div(a.added_p99_us, b.added_p99_us),
        cpu: div(a.cpu_s_per_1k, b.cpu_s_per_1k),
        rss: div(a.rss_mb, b.rss_mb),
    }
}

/// The ratios and targets (the issue's, then the informational cost of policy), for the scenarios
/// present in `rows`.
pub fn compare(rows: &[Row]) -> (Vec<Ratio>, Vec<Target>) {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let mut ratios = Vec::new();
    let mut targets = Vec::new();
    let mut target = |target: String, value: f64, limit: f64| {
        let met = value.is_finite() && value <= limit;
        targets.push(Target { target, value, limit, met, per_round: vec![value] });
    };
    if let Some(ferry) = find("ferry-mtls") {
        for sidecar in ["sidecar-ferry", "sidecar-haproxy"] {
            let Some(s) = find(sidecar) else { continue };
            let r = ratio(ferry, s);
            target(format!("ferry-mtls added p50 < {sidecar}'s"), r.added_p50, 1.0);
            target(format!("ferry-mtls added p99 < {sidecar}'s"), r.added_p99, 1.0);
            target(format!("ferry-mtls CPU per request <= 0.7x {sidecar}'s"), r.cpu, 0.7);
            target(format!("ferry-mtls RSS <= 0.2x {sidecar}'s (all 11 sidecars)"), r.rss, 0.2);
            ratios.push(r);
        }
    }
    if let (Some(fast), Some(h)) = (find("ferry-local-fastpath"), find("sidecar-haproxy-local")) {
        let r = ratio(fast, h);
        target("ferry-local-fastpath added p50 <= 0.5x sidecar-haproxy-local's".to_owned(), r.added_p50, 0.5);
        ratios.push(r);
    }
    // The L7 hop: Ferry's destination agent serving HTTP/1.1 against HAProxy sidecars in HTTP mode,
    // both measured against the HTTP baseline (direct-http).
    if let (Some(http), Some(h)) = (find("ferry-mtls-http"), find("sidecar-haproxy-http")) {
        let r = ratio(http, h);
        target("ferry-mtls-http added p50 <= sidecar-haproxy-http's".to_owned(), r.added_p50, 1.0);
        target("ferry-mtls-http added p99 <= sidecar-haproxy-http's".to_owned(), r.added_p99, 1.0);
        target("ferry-mtls-http CPU per request <= 0.7x sidecar-haproxy-http's".to_owned(), r.cpu, 0.7);
        ratios.push(r);
    }
    // What the L7 layer adds to Ferry's L4 path: each against its own baseline, so the apps'
    // own HTTP parsing is not counted as the mesh's.
    if let (Some(http), Some(plain)) = (find("ferry-mtls-http"), find("ferry-mtls")) {
        let r = ratio(http, plain);
        target("ferry-mtls-http added p50 <= 1.3x ferry-mtls's".to_owned(), r.added_p50, 1.3);
        ratios.push(r);
    }
    // Transparent inbound (the apps see real client addresses) against the old loopback path:
    // the same scenario, both in this run. It should cost close to nothing.
    for (new, old) in
        [("ferry-mtls", "ferry-mtls-loopback"), ("ferry-local-fastpath", "ferry-local-fastpath-loopback")]
    {
        if let (Some(new_row), Some(old_row)) = (find(new), find(old)) {
            let r = ratio(new_row, old_row);
            target(
                format!("{new} added p50 <= 1.05x {old}'s (transparent inbound, informational)"),
                r.added_p50,
                1.05,
            );
            target(
                format!("{new} CPU per request <= 1.05x {old}'s (transparent inbound, informational)"),
                r.cpu,
                1.05,
            );
            ratios.push(r);
        }
    }
    // Not one of the targets: what enforcing a realistic policy set costs, which should be
    // close to nothing (one decision per connection, none per request).
    if let (Some(policy), Some(plain)) = (find("ferry-mtls-policy"), find("ferry-mtls")) {
        let r = ratio(policy, plain);
        target(
            "ferry-mtls-policy added p50 <= 1.05x ferry-mtls's (informational)".to_owned(),
            r.added_p50,
            1.05,
        );
        target(
            "ferry-mtls-policy CPU per request <= 1.05x ferry-mtls's (informational)".to_owned(),
            r.cpu,
            1.05,
        );
        ratios.push(r);
    }
    (ratios, targets)
}

/// The median of `xs`; NaN when there is none. NaNs (missing figures) count as the largest.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// One row per scenario of the first round, each figure the median of that scenario's rows over
/// all rounds. The detail (`measured`) is that of the round with the median p50.
pub fn median_rows(rounds: &[Vec<Row>]) -> Vec<Row> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .map(|r0| {
            let mut all: Vec<&Row> =
                rounds.iter().filter_map(|round| round.iter().find(|r| r.name == r0.name)).collect();
            all.sort_by(|a, b| a.p50_us.total_cmp(&b.p50_us));
            let m = |f: fn(&Row) -> f64| median(all.iter().map(|r| f(r)).collect());
            Row {
                p50_us: m(|r| r.p50_us),
                p90_us: m(|r| r.p90_us),
                p99_us: m(|r| r.p99_us),
                p999_us: m(|r| r.p999_us),
                added_p50_us: m(|r| r.added_p50_us),
                added_p99_us: m(|r| r.added_p99_us),
                rps: m(|r| r.rps),
                gbps: m(|r| r.gbps),
                cpu_s_per_1k: m(|r| r.cpu_s_per_1k),
                rss_mb: m(|r| r.rss_mb),
                rr_p50_us: m(|r| r.rr_p50_us),
                rr_p99_us: m(|r| r.rr_p99_us),
                added_rr_p50_us: m(|r| r.added_rr_p50_us),
                conns_per_s: m(|r| r.conns_per_s),
                gbps_1_stream: m(|r| r.gbps_1_stream),
                ..all[all.len() / 2].clone()
            }
        })
        .collect()
}

/// The ratios and targets over several rounds: each ratio is the median of the per-round ratios
/// (every round pairs Ferry and the sidecars measured minutes apart, so drift of the machine
/// between rounds cancels), and each target is judged on that median, with the rounds listed.
pub fn compare_rounds(rounds: &[Vec<Row>]) -> (Vec<Ratio>, Vec<Target>) {
    let per_round: Vec<(Vec<Ratio>, Vec<Target>)> = rounds.iter().map(|r| compare(r)).collect();
    let Some((first_ratios, first_targets)) = per_round.first() else { return (Vec::new(), Vec::new()) };
    let ratios = first_ratios
        .iter()
        .map(|r0| {
            let all: Vec<&Ratio> =
                per_round.iter().filter_map(|(rs, _)| rs.iter().find(|r| r.name == r0.name)).collect();
            let m = |f: fn(&Ratio) -> f64| median(all.iter().map(|r| f(r)).collect());
            Ratio {
                name: r0.name.clone(),
                added_p50: m(|r| r.added_p50),
                added_p99: m(|r| r.added_p99),
                cpu: m(|r| r.cpu),
                rss: m(|r| r.rss),
            }
        })
        .collect();
    let targets = first_targets
        .iter()
        .map(|t0| {
            let values: Vec<f64> = per_round
                .iter()
                .filter_map(|(_, ts)| ts.iter().find(|t| t.target == t0.target).map(|t| t.value))
                .collect();
            let value = median(values.clone());
            let met = value.is_finite() && value <= t0.limit;
            Target { target: t0.target.clone(), value, limit: t0.limit, met, per_round: values }
        })
        .collect();
    (ratios, targets)
}

/// A number for a table: "-" for NaN.
fn n(x: f64, decimals: usize) -> String {
    if x.is_finite() { format!("{x:.decimals$}") } else { "-".to_owned() }
}

/// "label | x | y": a label and numbers with their decimals.
fn cells<'a>(label: &str, nums: impl IntoIterator<Item = &'a (f64, usize)>) -> String {
    nums.into_iter().fold(label.to_owned(), |row, &(x, d)| format!("{row} | {}", n(x, d)))
}

/// Appends a Markdown table: `header` is "a | b | c"; the first column is text, the rest numbers.
fn table(md: &mut String, header: &str, rows: impl Iterator<Item = String>) {
    let columns = header.split('|').count();
    let _ = writeln!(md, "| {header} |\n|---|{}", "---:|".repeat(columns - 1));
    for row in rows {
        let _ = writeln!(md, "| {row} |");
    }
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Ferry benchmark ({} run)\n", r.plan.mode);
    let _ = writeln!(
        md,
        "Commit `{}`; kernel {}, {} CPUs ({}), load average at the end {}.\n",
        r.commit, m.kernel, m.cpus, m.cpu_model, m.load_average
    );
    let _ = writeln!(
        md,
        "Latency: open loop at {RATE} requests/s of 1 KiB over {HEADLINE_CONNS} persistent connections, \
         measured from each request's intended send time (coordinated omission corrected), {:.1} s per run. \
         Added = scenario minus its no-mesh baseline in the same run. CPU: user+system seconds of all mesh \
         processes per 1,000 requests during the open-loop runs. RSS: peak summed resident memory of all \
         mesh processes. Gbit/s: {BULK_STREAMS} bulk echo streams. Scenarios ending in `-http` speak \
         HTTP/1.1 (POSTs of 1 KiB answered with 1 KiB on keep-alive connections; bulk: 256 KiB POSTs) \
         and are measured against `direct-http`.\n",
        r.plan.load.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Rounds: {}. The scenarios run one after another in each round, and every figure is the median \
         over the rounds; each ratio is the median of the per-round ratios, and the targets table lists \
         every round's value.\n",
        r.rounds.len()
    );
    table(
        &mut md,
        "scenario | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | rps | Gbit/s | CPU s/1k req | RSS MB",
        r.scenarios.iter().map(|s| {
            let nums = [(s.p50_us, 1), (s.p90_us, 1), (s.p99_us, 1), (s.p999_us, 1), (s.added_p50_us, 1)];
            let more = [(s.added_p99_us, 1), (s.rps, 0), (s.gbps, 2), (s.cpu_s_per_1k, 3), (s.rss_mb, 1)];
            cells(&s.name, nums.iter().chain(&more))
        }),
    );
    md += "\n## Ratios\n\n";
    table(
        &mut md,
        "ratio | added p50 | added p99 | CPU | RSS",
        r.ratios
            .iter()
            .map(|q| cells(&q.name, &[(q.added_p50, 2), (q.added_p99, 2), (q.cpu, 2), (q.rss, 2)])),
    );
    md += "\n## Targets\n\n";
    table(
        &mut md,
        "target | median | per round | limit | met",
        r.targets.iter().map(|t| {
            let met = if t.met { "yes" } else { "**no**" };
            let rounds: Vec<String> = t.per_round.iter().map(|&v| n(v, 2)).collect();
            format!(
                "{} | {} | {} | {met}",
                cells(&t.target, &[(t.value, 2)]),
                rounds.join(", "),
                n(t.limit, 2)
            )
        }),
    );
    md += "\n## Latency by connection count (open loop, 1,000 requests/s)\n\n";
    table(
        &mut md,
        "scenario | conns | p50 µs | p99 µs | p99.9 µs | max µs | rps",
        r.scenarios.iter().flat_map(|s| {
            s.measured.load.iter().map(|l| {
                let nums = [(l.p50_us, 1), (l.p99_us, 1), (l.p999_us, 1), (l.max_us, 1), (l.achieved_rps, 0)];
                cells(&format!("{} | {}", s.name, l.conns), &nums)
            })
        }),
    );
    md += "\n## Per-hop cost, connection rate, throughput\n\n";
    table(
        &mut md,
        "scenario | rr p50 µs | rr p99 µs | added rr p50 µs | new conns/s | Gbit/s 1 stream | Gbit/s 8 streams",
        r.scenarios.iter().map(|s| {
            let nums = [(s.rr_p50_us, 1), (s.rr_p99_us, 1), (s.added_rr_p50_us, 1), (s.conns_per_s, 0)];
            cells(&s.name, nums.iter().chain(&[(s.gbps_1_stream, 2), (s.gbps, 2)]))
        }),
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_tests::testapp::{BulkReport, CrrReport, LoadReport, RrReport};

    /// A scenario whose latency at every connection count is `p50` (p99 = 2 x p50), costing `cpu`
    /// seconds over 10,000 requests and `rss` MB.
    fn measured(p50: f64, cpu: f64, rss: f64) -> Measured {
        let load = crate::plan::CONNS
            .iter()
            .map(|&conns| LoadReport {
                conns,
                p50_us: p50,
                p90_us: p50 * 1.5,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
                achieved_rps: 1000.0,
                ..LoadReport::default()
            })
            .collect();
        Measured {
            load,
            rr: RrReport { count: 1, p50_us: p50 / 2.0, ..RrReport::default() },
            crr: CrrReport::default(),
            bulk_1: BulkReport::default(),
            bulk_n: BulkReport { gbps: 1.5, ..BulkReport::default() },
            cpu_s: cpu,
            requests_sent: 10_000,
            rss_mb: rss,
            mesh_processes: 1,
        }
    }

    fn rows() -> Vec<Row> {
        let direct = measured(100.0, 0.0, 0.0);
        let local = measured(90.0, 0.0, 0.0);
        vec![
            row("direct", "direct", &direct, None),
            row("direct-local", "direct-local", &local, None),
            row("ferry-mtls", "direct", &measured(140.0, 1.0, 50.0), Some(&direct)),
            row("sidecar-haproxy", "direct", &measured(180.0, 2.0, 300.0), Some(&direct)),
            row("ferry-local-fastpath", "direct-local", &measured(110.0, 0.5, 25.0), Some(&local)),
            row("sidecar-haproxy-local", "direct-local", &measured(150.0, 2.0, 300.0), Some(&local)),
            row("ferry-mtls-policy", "direct", &measured(141.6, 1.02, 51.0), Some(&direct)),
        ]
    }

    /// [`rows`] plus the HTTP scenarios: direct-http at 120 us, ferry-mtls-http at 170 us costing
    /// 1.2 s, HAProxy in HTTP mode at 220 us costing 2.4 s.
    fn http_rows() -> Vec<Row> {
        let direct = measured(120.0, 0.0, 0.0);
        let mut rows = rows();
        rows.extend([
            row("direct-http", "direct-http", &direct, None),
            row("ferry-mtls-http", "direct-http", &measured(170.0, 1.2, 52.0), Some(&direct)),
            row("sidecar-haproxy-http", "direct-http", &measured(220.0, 2.4, 320.0), Some(&direct)),
        ]);
        rows
    }

    #[test]
    fn http_is_compared_with_haproxy_in_http_mode_and_with_ferrys_l4_path() {
        let (ratios, targets) = compare(&http_rows());
        let h = ratios.iter().find(|r| r.name == "ferry-mtls-http / sidecar-haproxy-http").unwrap();
        // 50 us added against 100 (each over direct-http), 0.12 s/1k against 0.24.
        assert!((h.added_p50 - 0.5).abs() < 1e-9 && (h.cpu - 0.5).abs() < 1e-9, "{h:?}");
        let l4 = ratios.iter().find(|r| r.name == "ferry-mtls-http / ferry-mtls").unwrap();
        // 50 us added over direct-http against ferry-mtls's 40 over direct.
        assert!((l4.added_p50 - 1.25).abs() < 1e-9, "{l4:?}");
        let http: Vec<&Target> = targets.iter().filter(|t| t.target.starts_with("ferry-mtls-http")).collect();
        let limits: Vec<f64> = http.iter().map(|t| t.limit).collect();
        assert_eq!(limits, [1.0, 1.0, 0.7, 1.3], "{http:?}");
        assert!(http.iter().all(|t| t.met), "{http:?}");
        // Without the HTTP scenarios in the run, no HTTP ratio is made up.
        let (ratios, targets) = compare(&rows());
        assert!(ratios.iter().all(|r| !r.name.contains("http")), "{ratios:?}");
        assert!(targets.iter().all(|t| !t.target.contains("http")), "{targets:?}");
    }

    #[test]
    fn rows_subtract_their_baseline_in_the_same_run() {
        let rows = rows();
        let ferry = &rows[2];
        assert_eq!((ferry.p50_us, ferry.added_p50_us, ferry.added_p99_us), (140.0, 40.0, 80.0));
        assert_eq!(ferry.added_rr_p50_us, 20.0);
        assert_eq!(ferry.cpu_s_per_1k, 0.1);
        assert_eq!(rows[0].added_p50_us, 0.0);
    }

    #[test]
    fn ratios_and_targets_compare_ferry_with_the_sidecars() {
        let (ratios, targets) = compare(&rows());
        let names: Vec<&str> = ratios.iter().map(|r| r.name.as_str()).collect();
        // No sidecar-ferry row: its ratio is left out rather than made up.
        assert_eq!(
            names,
            [
                "ferry-mtls / sidecar-haproxy",
                "ferry-local-fastpath / sidecar-haproxy-local",
                "ferry-mtls-policy / ferry-mtls"
            ]
        );
        let r = &ratios[0];
        assert_eq!((r.added_p50, r.added_p99, r.cpu), (0.5, 0.5, 0.5));
        assert!((r.rss - 50.0 / 300.0).abs() < 1e-9);
        assert!(targets.iter().all(|t| t.met), "{targets:?}");
        // 20 us added against 60: 0.33, under the 0.5 limit.
        assert!((ratios[1].added_p50 - 20.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn policy_is_compared_with_ferry_mtls_of_the_same_run() {
        let (ratios, targets) = compare(&rows());
        let r = ratios.iter().find(|r| r.name == "ferry-mtls-policy / ferry-mtls").unwrap();
        // 41.6 us added against 40, 0.102 s/1k against 0.100.
        assert!((r.added_p50 - 1.04).abs() < 1e-9 && (r.cpu - 1.02).abs() < 1e-9, "{r:?}");
        let policy: Vec<&Target> =
            targets.iter().filter(|t| t.target.starts_with("ferry-mtls-policy")).collect();
        assert_eq!(policy.len(), 2, "{targets:?}");
        assert!(policy.iter().all(|t| t.met && t.limit == 1.05 && t.target.ends_with("(informational)")));
        // Without ferry-mtls in the run there is nothing to compare with.
        let alone: Vec<Row> = rows().into_iter().filter(|r| r.name != "ferry-mtls").collect();
        let (ratios, targets) = compare(&alone);
        assert!(ratios.iter().all(|r| !r.name.starts_with("ferry-mtls-policy")), "{ratios:?}");
        assert!(targets.iter().all(|t| !t.target.starts_with("ferry-mtls-policy")), "{targets:?}");
    }

    #[test]
    fn a_missed_target_says_so() {
        let mut rows = rows();
        rows[2] = row("ferry-mtls", "direct", &measured(300.0, 3.0, 50.0), Some(&measured(100.0, 0.0, 0.0)));
        let (_, targets) = compare(&rows);
        let p50 = targets.iter().find(|t| t.target.starts_with("ferry-mtls added p50")).unwrap();
        assert!(!p50.met && p50.value > 1.0, "{p50:?}");
    }

    /// One round: direct at 100 us, ferry-mtls at `ferry_p50` costing `ferry_cpu`, HAProxy at 180 us
    /// costing 2 s.
    fn round(ferry_p50: f64, ferry_cpu: f64) -> Vec<Row> {
        let direct = measured(100.0, 0.0, 0.0);
        vec![
            row("direct", "direct", &direct, None),
            row("ferry-mtls", "direct", &measured(ferry_p50, ferry_cpu, 50.0), Some(&direct)),
            row("sidecar-haproxy", "direct", &measured(180.0, 2.0, 300.0), Some(&direct)),
        ]
    }

    #[test]
    fn rounds_report_the_median_and_keep_every_value() {
        // CPU ratios 0.6, 0.8, 0.65 per round: the median 0.65 meets the 0.7 target although one
        // round does not; added p50 40, 100, 60 us: median 60.
        let rounds = vec![round(140.0, 1.2), round(200.0, 1.6), round(160.0, 1.3)];
        let rows = median_rows(&rounds);
        let ferry = rows.iter().find(|r| r.name == "ferry-mtls").unwrap();
        assert_eq!((ferry.p50_us, ferry.added_p50_us), (160.0, 60.0));
        assert!((ferry.cpu_s_per_1k - 0.13).abs() < 1e-9, "{}", ferry.cpu_s_per_1k);
        // The detail comes from the median round.
        assert_eq!(ferry.measured.load[0].p50_us, 160.0);
        let (ratios, targets) = compare_rounds(&rounds);
        assert!((ratios[0].cpu - 0.65).abs() < 1e-9, "{:?}", ratios[0]);
        let cpu = targets.iter().find(|t| t.target.contains("CPU")).unwrap();
        assert!(cpu.met, "{cpu:?}");
        let expected = [0.6, 0.8, 0.65];
        assert_eq!(cpu.per_round.len(), 3);
        assert!(cpu.per_round.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-9), "{cpu:?}");
        // Two rounds: the median is the mean of the two.
        assert_eq!(median(vec![1.0, 3.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn markdown_and_plot_show_every_scenario() {
        let rows = rows();
        let (ratios, targets) = compare(&rows);
        let report = Report {
            commit: "abc".into(),
            machine: crate::machine::Machine::now(),
            plan: Plan::smoke(),
            scenarios: rows.clone(),
            ratios,
            targets,
            rounds: vec![rows],
        };
        let md = markdown(&report);
        assert!(
            md.contains(
                "| ferry-mtls | 140.0 | 210.0 | 280.0 | 420.0 | 40.0 | 80.0 | 1000 | 1.50 | 0.100 | 50.0 |"
            ),
            "{md}"
        );
        assert!(md.contains("| ferry-mtls / sidecar-haproxy | 0.50 | 0.50 | 0.50 | 0.17 |"), "{md}");
        assert!(md.contains("| ferry-mtls-policy / ferry-mtls | 1.04 | 1.04 | 1.02 | 1.02 |"), "{md}");
        assert!(
            md.contains(
                "| ferry-mtls CPU per request <= 0.7x sidecar-haproxy's | 0.50 | 0.50 | 0.70 | yes |"
            ),
            "{md}"
        );
        assert!(md.contains("| ferry-mtls | 16 | 140.0 | 280.0 | 420.0 | 0.0 | 1000 |"), "{md}");
        let svg = crate::plot::latency_svg(&report.scenarios, "t").unwrap();
        for s in &report.scenarios {
            assert!(svg.contains(&format!(">\n{}\n</text>", s.name)), "{} missing", s.name);
        }
        // One bar per percentile per scenario, in its series' colour.
        for colour in ["#1B9E77", "#7570B3", "#D95F02", "#E7298A"] {
            let bars = svg.matches(&format!("fill=\"{colour}\"")).count();
            // Plus the legend's swatch.
            assert_eq!(bars, report.scenarios.len() + 1, "{colour} in {svg}");
        }
    }
}
