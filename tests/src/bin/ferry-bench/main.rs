//! `ferry-bench`: what Ferry adds to pod-to-pod traffic, measured in one run.
//!
//! - One node ([`one_node`], `OUT/rr.json`): 1 KiB request/response round trips between two pods
//!   of one node, direct versus through the proxy (plaintext L4).
//! - Two nodes ([`cross_node`], `OUT/cross_node.json`): the same round trips between pods on two
//!   nodes, direct versus through Ferry with mTLS (HBONE); then new connections per second, direct
//!   and through the pooled tunnel; then the first connection after an agent restart, which has to
//!   open a new TLS connection.
//!
//! Each pair of scenarios runs in interleaved rounds (direct, mesh, then mesh, direct, ...) to
//! cancel drift; a scenario's figure is the median over rounds of that round's figure. Nothing here
//! asserts on timing; the run fails only when traffic does not take the path a scenario names.
//! Needs root (run it with `cargo xtask bench [--quick]`).

mod cross_node;
mod cross_report;
mod one_node;
mod rounds;
mod two_nodes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use ferry_tests::testapp::{self, ConnectOpts, RrReport};
use ferry_tests::{Pod, bin_path};
use serde::Serialize;

use crate::rounds::{Kind, Pair, interleave};

/// Request and response size.
pub const SIZE: usize = 1024;

/// Command line.
#[derive(Parser)]
#[command(about = "Latency and connection rate between pods: direct versus through Ferry")]
struct Cli {
    /// A short run (fewer rounds, round trips and connections), for a smoke test.
    #[arg(long)]
    quick: bool,
    /// Directory for rr.json and cross_node.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// How many request/response round trips to measure.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RrPlan {
    /// Rounds of each scenario.
    pub rounds: usize,
    /// Measured round trips per round.
    pub round_trips: u64,
    /// Unmeasured round trips before them.
    pub warmup: u64,
}

impl RrPlan {
    /// The plan of a quick or a full run.
    pub fn new(quick: bool) -> Self {
        if quick {
            RrPlan { rounds: 3, round_trips: 1_000, warmup: 100 }
        } else {
            RrPlan { rounds: 5, round_trips: 10_000, warmup: 500 }
        }
    }
}

/// The run's mode as written in the reports.
pub fn mode(quick: bool) -> &'static str {
    if quick { "quick" } else { "full" }
}

/// The machine and build the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    /// When the report was made.
    pub unix_time: u64,
    /// The kernel release.
    pub kernel: String,
    /// CPUs available to the bench.
    pub cpus: usize,
    /// The 1, 5 and 15 minute load averages when the report was made: other work on the machine
    /// shows up in the figures.
    pub load_average: String,
    /// The agent binary that ran.
    pub agent_binary: String,
    /// How the bench itself was built.
    pub bench_profile: &'static str,
}

impl Host {
    /// This machine, now.
    pub fn now() -> Self {
        Host {
            unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            agent_binary: bin_path("ferry").display().to_string(),
            bench_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        }
    }
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
    std::fs::create_dir_all(&cli.out).with_context(|| format!("cannot create {}", cli.out.display()))?;
    one_node::run(cli.quick, &cli.out)?;
    cross_node::run(cli.quick, &cli.out)
}

/// Writes `results` as pretty JSON to `dir/name`; the path written.
pub fn write_results(dir: &Path, name: &str, results: &impl Serialize) -> Result<PathBuf> {
    let path = dir.join(name);
    let json = serde_json::to_string_pretty(results).context("serializing the results")?;
    std::fs::write(&path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The direct pair is really direct: the server sees the client's own address on both ends.
pub fn check_direct_path(client: &Pod, to: SocketAddr) -> Result<()> {
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

/// Interleaved `rr` rounds from each (client pod, server address) pair; direct rounds, mesh rounds.
pub fn rr_rounds(
    plan: RrPlan,
    direct: (&Pod, SocketAddr),
    mesh: (&Pod, SocketAddr),
) -> Result<Pair<RrReport>> {
    eprintln!(
        "ferry-bench: rr: {} rounds x {} round trips of {SIZE} bytes (+{} warm-up) per scenario",
        plan.rounds, plan.round_trips, plan.warmup
    );
    interleave(plan.rounds, |kind, round| {
        let (pod, to) = if kind == Kind::Direct { direct } else { mesh };
        let report = testapp::rr(pod, to, SIZE, plan.round_trips, plan.warmup)?;
        ensure!(report.count == plan.round_trips, "too few round trips: {report:?}");
        eprintln!("  round {round} {:<6} p50 {:>8.1} us", kind.name(), report.p50_us);
        Ok(report)
    })
}
