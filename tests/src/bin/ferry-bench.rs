//! `ferry-bench`: the round-trip latency Ferry adds between two pods of one node.
//!
//! One node with the agent running (the shared scenario) plus two pods that are not in the mesh
//! file. Two scenarios, measured in the same run with the same sizes and counts:
//! - `direct`: between the two unenrolled pods (plain TCP over the node's bridge);
//! - `mesh`: from the enrolled client pod to an enrolled server pod's address, so each round trip
//!   crosses the outbound proxy hop in the client pod and the inbound hop in the server pod
//!   (plaintext L4: the scenario has no CA).
//!
//! Each measurement is `ferry-testapp rr`: one persistent connection, closed loop (the next 1 KiB
//! request is sent once the previous 1 KiB response has fully arrived), so it measures per-hop
//! latency at a concurrency of one, not throughput or latency under load. Rounds alternate the
//! order of the scenarios (direct, mesh, then mesh, direct, ...) to cancel drift; each scenario's
//! p50/p90/p99 is the median over rounds of that round's percentile. Results go to `OUT/rr.json`
//! and a table on stdout. Nothing here asserts on timing; the run fails only when traffic does not
//! take the path a scenario names. Needs root (run it with `cargo xtask bench [--quick]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use ferry_tests::scenario::{SERVER_PORT, Scenario, events_of, pod_key, serve, wait_events};
use ferry_tests::testapp::{self, ConnectOpts, RrReport, percentile};
use ferry_tests::{Pod, bin_path};
use serde::Serialize;

/// Request and response size.
const SIZE: usize = 1024;

/// Command line.
#[derive(Parser)]
#[command(about = "Round-trip latency between two pods: direct versus through Ferry's proxy")]
struct Cli {
    /// A short run (fewer rounds and round trips), for a smoke test.
    #[arg(long)]
    quick: bool,
    /// Directory for rr.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// How much to measure.
#[derive(Debug, Clone, Copy, Serialize)]
struct Plan {
    rounds: usize,
    round_trips: u64,
    warmup: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan { rounds: 3, round_trips: 1_000, warmup: 100 }
        } else {
            Plan { rounds: 5, round_trips: 10_000, warmup: 500 }
        }
    }
}

/// The two things compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Direct,
    Mesh,
}

impl Kind {
    /// The scenario's name in the report.
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Mesh => "mesh",
        }
    }
}

/// The order of the scenarios in round `round`: alternating, so a slow drift hits both alike.
fn order(round: usize) -> [Kind; 2] {
    if round.is_multiple_of(2) { [Kind::Direct, Kind::Mesh] } else { [Kind::Mesh, Kind::Direct] }
}

/// One scenario over all rounds.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    /// Median over rounds of each round's p50.
    p50_us: f64,
    /// Median over rounds of each round's p90.
    p90_us: f64,
    /// Median over rounds of each round's p99.
    p99_us: f64,
    /// Median over rounds of each round's mean.
    mean_us: f64,
    /// Smallest and largest per-round p50: the spread between rounds.
    p50_range_us: [f64; 2],
    /// Each round's report, in order.
    rounds: Vec<RrReport>,
}

/// Median over rounds of one figure of the reports.
fn median_of(rounds: &[RrReport], figure: impl Fn(&RrReport) -> f64) -> f64 {
    let mut values: Vec<f64> = rounds.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

fn summarize(rounds: Vec<RrReport>) -> Summary {
    let p50s = rounds.iter().map(|r| r.p50_us);
    let range = [p50s.clone().fold(f64::INFINITY, f64::min), p50s.fold(0.0, f64::max)];
    Summary {
        p50_us: median_of(&rounds, |r| r.p50_us),
        p90_us: median_of(&rounds, |r| r.p90_us),
        p99_us: median_of(&rounds, |r| r.p99_us),
        mean_us: median_of(&rounds, |r| r.mean_us),
        p50_range_us: if rounds.is_empty() { [0.0, 0.0] } else { range },
        rounds,
    }
}

/// Mesh against direct for one figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Delta {
    /// Mesh minus direct.
    added_us: f64,
    /// Mesh over direct.
    ratio: f64,
}

impl Delta {
    fn new(direct: f64, mesh: f64) -> Self {
        Delta { added_us: mesh - direct, ratio: if direct > 0.0 { mesh / direct } else { 0.0 } }
    }
}

/// Mesh against direct for every figure.
#[derive(Debug, Clone, Serialize)]
struct Comparison {
    p50: Delta,
    p90: Delta,
    p99: Delta,
    mean: Delta,
    /// Median over rounds of (mesh p50 - direct p50) within the same round.
    added_p50_paired_us: f64,
}

fn compare(direct: &Summary, mesh: &Summary) -> Comparison {
    let mut paired: Vec<f64> =
        direct.rounds.iter().zip(&mesh.rounds).map(|(d, m)| m.p50_us - d.p50_us).collect();
    paired.sort_by(f64::total_cmp);
    Comparison {
        p50: Delta::new(direct.p50_us, mesh.p50_us),
        p90: Delta::new(direct.p90_us, mesh.p90_us),
        p99: Delta::new(direct.p99_us, mesh.p99_us),
        mean: Delta::new(direct.mean_us, mesh.mean_us),
        added_p50_paired_us: percentile(&paired, 0.5),
    }
}

/// The rr.json document.
#[derive(Debug, Serialize)]
struct Results {
    benchmark: &'static str,
    method: &'static str,
    mode: &'static str,
    size_bytes: usize,
    plan: Plan,
    direct: Summary,
    mesh: Summary,
    mesh_vs_direct: Comparison,
    environment: Environment,
}

/// Where the figures were measured.
#[derive(Debug, Serialize)]
struct Environment {
    unix_time: u64,
    kernel: String,
    cpus: usize,
    agent_binary: String,
    bench_profile: &'static str,
    direct_path: String,
    mesh_path: String,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let plan = Plan::new(cli.quick);
    eprintln!("ferry-bench: starting the node and the agent...");
    let mut s = Scenario::start("bench").context("cannot start the bench scenario")?;
    let direct_client = s.node.add_pod("direct-a")?;
    let direct_server = s.node.add_pod("direct-b")?;
    let _direct_echo = serve(&direct_server, SERVER_PORT, direct_server.name())?;
    let mesh_server = &s.servers[0];
    let direct_to = SocketAddr::new(direct_server.ipv4().into(), SERVER_PORT);
    let mesh_to = SocketAddr::new(mesh_server.ipv4().into(), SERVER_PORT);
    check_direct_path(&direct_client, direct_to)?;
    check_mesh_path(&s, mesh_to)?;
    let closes_before = events_of(&s.agent, "conn_close").len();

    eprintln!(
        "ferry-bench: {} rounds x {} round trips of {SIZE} bytes (+{} warm-up) per scenario",
        plan.rounds, plan.round_trips, plan.warmup
    );
    let (mut direct, mut mesh) = (Vec::new(), Vec::new());
    for round in 0..plan.rounds {
        for kind in order(round) {
            let (pod, to, into) = match kind {
                Kind::Direct => (&direct_client, direct_to, &mut direct),
                Kind::Mesh => (&s.client, mesh_to, &mut mesh),
            };
            let report = testapp::rr(pod, to, SIZE, plan.round_trips, plan.warmup)
                .with_context(|| format!("{} round {}", kind.name(), round + 1))?;
            ensure!(report.count == plan.round_trips, "{} round {}: {report:?}", kind.name(), round + 1);
            eprintln!("  round {} {:<6} p50 {:>8.1} us", round + 1, kind.name(), report.p50_us);
            into.push(report);
        }
    }
    // Each mesh round is one connection through two proxy hops; direct rounds are not seen at all.
    let want = closes_before + 2 * plan.rounds;
    let closes = wait_events(&s.agent, want, |e| e["event"] == "conn_close");
    ensure!(
        closes.len() == want,
        "expected {} proxy records for {} mesh rounds and none for direct rounds, got {:?}",
        2 * plan.rounds,
        plan.rounds,
        &closes[closes_before.min(closes.len())..]
    );
    let (direct, mesh) = (summarize(direct), summarize(mesh));
    let results = Results {
        benchmark: "rr",
        method: "closed loop: 1 KiB request, then its 1 KiB echo, on one persistent TCP connection; \
                 per-scenario percentiles are the median over rounds of each round's percentile",
        mode: if cli.quick { "quick" } else { "full" },
        size_bytes: SIZE,
        plan,
        mesh_vs_direct: compare(&direct, &mesh),
        direct,
        mesh,
        environment: environment(&s, &direct_client, direct_to, mesh_to),
    };
    std::fs::create_dir_all(&cli.out).with_context(|| format!("cannot create {}", cli.out.display()))?;
    let path = cli.out.join("rr.json");
    let json = serde_json::to_string_pretty(&results).context("serializing the results")?;
    std::fs::write(&path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    print!("{}", table(&results));
    println!("written to {}", path.display());
    Ok(())
}

/// The direct pair is really direct: the server sees the client's own address on both ends.
fn check_direct_path(client: &Pod, to: SocketAddr) -> Result<()> {
    let r = testapp::connect(client, to, &ConnectOpts { bytes: SIZE, ..ConnectOpts::default() })?;
    ensure!(r.ok == 1, "direct path {} -> {to} does not work: {r:?}", client.name());
    let own = format!("{}:", client.ipv4());
    ensure!(
        r.local_addrs.iter().chain(&r.peers_seen_by_server).all(|a| a.starts_with(&own)),
        "direct path {} -> {to} is not direct: {r:?}",
        client.name()
    );
    Ok(())
}

/// The mesh pair goes through both hops: the app is redirected to loopback, and the agent records
/// an outbound and an inbound connection.
fn check_mesh_path(s: &Scenario, to: SocketAddr) -> Result<()> {
    let r = testapp::connect(&s.client, to, &ConnectOpts { bytes: SIZE, ..ConnectOpts::default() })?;
    ensure!(r.ok == 1, "mesh path client -> {to} does not work: {r:?}");
    ensure!(r.local_addrs.iter().all(|a| a.starts_with("127.0.0.1:")), "client was not redirected: {r:?}");
    let dst = to.to_string();
    let hops = wait_events(&s.agent, 2, |e| e["event"] == "conn_close" && e["orig_dst"] == dst.as_str());
    let client = pod_key(&s.client);
    ensure!(
        hops.iter().any(|e| e["direction"] == "outbound" && e["pod"] == client.as_str())
            && hops.iter().any(|e| e["direction"] == "inbound" && e["src_pod"] == client.as_str()),
        "mesh path client -> {to} did not cross both proxy hops: {hops:?}"
    );
    Ok(())
}

fn environment(s: &Scenario, direct: &Pod, direct_to: SocketAddr, mesh_to: SocketAddr) -> Environment {
    Environment {
        unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        agent_binary: bin_path("ferry").display().to_string(),
        bench_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        direct_path: format!("{} (not enrolled) -> {direct_to} (not enrolled)", direct.name()),
        mesh_path: format!("{} -> outbound proxy -> inbound proxy -> {mesh_to}", pod_key(&s.client)),
    }
}

/// The human-readable table.
fn table(r: &Results) -> String {
    let (d, m, c) = (&r.direct, &r.mesh, &r.mesh_vs_direct);
    let mut out = format!(
        "\nrr: {} B request/response, closed loop, one connection; {} rounds x {} round trips ({})\n",
        r.size_bytes, r.plan.rounds, r.plan.round_trips, r.mode
    );
    out += &format!("{:<10} {:>9} {:>9} {:>9} {:>9}\n", "", "p50 us", "p90 us", "p99 us", "mean us");
    for (name, s) in [("direct", d), ("mesh", m)] {
        out +=
            &format!("{name:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n", s.p50_us, s.p90_us, s.p99_us, s.mean_us);
    }
    let deltas = [c.p50, c.p90, c.p99, c.mean];
    let added: Vec<String> = deltas.iter().map(|d| format!("{:>9.1}", d.added_us)).collect();
    let ratio: Vec<String> = deltas.iter().map(|d| format!("{:>8.2}x", d.ratio)).collect();
    out += &format!("{:<10} {}\n", "added", added.join(" "));
    out += &format!("{:<10} {}\n", "ratio", ratio.join(" "));
    out += &format!(
        "p50 spread over rounds: direct {:.1}..{:.1} us, mesh {:.1}..{:.1} us; paired added p50 {:.1} us\n",
        d.p50_range_us[0], d.p50_range_us[1], m.p50_range_us[0], m.p50_range_us[1], c.added_p50_paired_us
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(p50: f64) -> RrReport {
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
    fn table_shows_both_scenarios_and_the_difference() {
        let direct = summarize(vec![report(10.0)]);
        let mesh = summarize(vec![report(25.0)]);
        let results = Results {
            benchmark: "rr",
            method: "",
            mode: "quick",
            size_bytes: SIZE,
            plan: Plan::new(true),
            mesh_vs_direct: compare(&direct, &mesh),
            direct,
            mesh,
            environment: Environment {
                unix_time: 0,
                kernel: String::new(),
                cpus: 1,
                agent_binary: String::new(),
                bench_profile: "debug",
                direct_path: String::new(),
                mesh_path: String::new(),
            },
        };
        let text = table(&results);
        assert!(text.contains("direct          10.0      20.0      30.0      11.0"), "{text}");
        assert!(text.contains("added           15.0      30.0      45.0      15.0"), "{text}");
        assert!(text.contains("ratio          2.50x"), "{text}");
    }
}
