//! `ferry-bench`: what a mesh adds to pod-to-pod traffic, Ferry against classic sidecars, measured
//! in one run on simulated nodes.
//!
//! Every scenario has the same client pod and ten echo server pods behind one service VIP, under
//! the same load ([`world`]); what carries the traffic differs ([`meshes`]). Before measuring, the
//! bench proves the traffic takes the scenario's path; then it runs the workloads ([`measure`]):
//! open loop at 1,000 requests/s over 1, 16 and 64 connections, closed-loop round trips, new
//! connections per request, and bulk streams, while reading the mesh processes' CPU time and
//! memory from /proc ([`cost`]). It writes `OUT/report.json`, `OUT/report.md` and
//! `OUT/latency.svg`. Nothing here asserts on timing; the run fails only when a scenario cannot be
//! set up or its traffic does not take the path it names. Needs root: run it with
//! `cargo xtask bench [--quick]`.

mod cost;
mod flame;
mod machine;
mod measure;
mod meshes;
mod plan;
mod plot;
mod policy;
mod profile;
mod report;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::measure::Measured;
use crate::meshes::{SCENARIOS, ScenarioDef};
use crate::plan::Plan;
use crate::report::Report;
use crate::world::World;

/// Command line.
#[derive(Parser)]
#[command(about = "Latency and cost of pod-to-pod traffic: no mesh, Ferry, and sidecars")]
struct Cli {
    /// A short run (about two minutes).
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Just enough traffic to prove every scenario runs (CI); the figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Only these scenarios (repeatable); their baselines always run too.
    #[arg(long = "only", value_name = "SCENARIO")]
    only: Vec<String>,
    /// Directory for report.json, report.md and latency.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Rounds over all scenarios (default: 3 for a full run, 1 otherwise); figures are medians.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Also sample the mesh processes' stacks with perf during round 1's headline open-loop run,
    /// and write OUT/flame-SCENARIO.svg and .folded (those figures then carry perf's overhead).
    #[arg(long)]
    flamegraph: bool,
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
    let mut plan = if cli.smoke {
        Plan::smoke()
    } else if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(rounds) = cli.rounds {
        plan.rounds = rounds;
    }
    let chosen = select(&cli.only)?;
    if cli.flamegraph {
        profile::check()?;
    }
    let flame = cli.flamegraph.then_some(cli.out.as_path());
    std::fs::create_dir_all(&cli.out).with_context(|| format!("cannot create {}", cli.out.display()))?;
    let mut rounds = Vec::new();
    for round in 1..=plan.rounds {
        rounds.push(run_round(&chosen, &plan, round, flame.filter(|_| round == 1))?);
    }
    let (ratios, targets) = report::compare_rounds(&rounds);
    let report = Report {
        commit: machine::commit(),
        machine: machine::Machine::now(),
        plan,
        scenarios: report::median_rows(&rounds),
        ratios,
        targets,
        rounds,
    };
    write(&cli.out, &report)
}

/// The scenarios to run: all, or those named plus their baselines, in [`SCENARIOS`] order.
fn select(only: &[String]) -> Result<Vec<ScenarioDef>> {
    for name in only {
        if !SCENARIOS.iter().any(|s| s.name == name) {
            let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
            bail!("no scenario {name:?}; there are {}", known.join(", "));
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| {
            only.is_empty()
                || only.iter().any(|o| o == s.name)
                || only.iter().any(|o| SCENARIOS.iter().any(|t| t.name == o && t.baseline() == s.name))
        })
        .copied()
        .collect())
}

/// Runs every chosen scenario once, in order, and returns their rows, each against its baseline
/// from the same round.
/// With `flame`, each mesh's stacks are sampled into flame graphs under that directory.
fn run_round(
    chosen: &[ScenarioDef],
    plan: &Plan,
    round: u32,
    flame: Option<&Path>,
) -> Result<Vec<report::Row>> {
    let mut measured: Vec<(ScenarioDef, Measured)> = Vec::new();
    for def in chosen {
        eprintln!("ferry-bench: round {round}/{}: {}: setting up", plan.rounds, def.name);
        let m = run_scenario(def, plan, flame)
            .with_context(|| format!("round {round}: scenario {}", def.name))?;
        eprintln!(
            "ferry-bench: {}: open loop p50 {:.1} us p99 {:.1} us; rr p50 {:.1} us; cpu {:.3} s/1k; rss {:.1} MB",
            def.name,
            m.load_at(plan::HEADLINE_CONNS).map(|l| l.p50_us).unwrap_or(0.0),
            m.load_at(plan::HEADLINE_CONNS).map(|l| l.p99_us).unwrap_or(0.0),
            m.rr.p50_us,
            m.cpu_s_per_1k(),
            m.rss_mb
        );
        measured.push((*def, m));
    }
    Ok(measured
        .iter()
        .map(|(def, m)| {
            let base = measured.iter().find(|(d, _)| d.name == def.baseline()).map(|(_, b)| b);
            let base = if def.name == def.baseline() { None } else { base };
            report::row(def.name, def.baseline(), m, base)
        })
        .collect())
}

/// Builds the scenario's world and mesh, proves the path, measures, and tears it all down; with
/// `flame`, writes the mesh's flame graph there (scenarios without mesh processes have none).
fn run_scenario(def: &ScenarioDef, plan: &Plan, flame: Option<&Path>) -> Result<Measured> {
    let world = World::build(def.topology, def.wire)?;
    let mesh = meshes::install(&world, def.mesh)?;
    meshes::check_path(&world, &mesh, def.mesh).context("the traffic does not take the scenario's path")?;
    eprintln!("ferry-bench: {}: path checked, measuring", def.name);
    let pids = mesh.pids();
    let processes = mesh.processes();
    let perf_data = flame.filter(|_| !pids.is_empty()).map(|out| profile::data_path(out, def.name));
    let measured = measure::run(&world, &pids, plan, perf_data.as_deref())?;
    drop(mesh);
    drop(world);
    if let (Some(data), Some(out)) = (&perf_data, flame) {
        profile::write(data, out, def.name, plan.mode, &processes)?;
    }
    Ok(measured)
}

/// Writes report.json, report.md and latency.svg under `out` and prints the Markdown.
fn write(out: &Path, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("serializing the report")?;
    let md = report::markdown(report);
    let title = format!(
        "Open-loop latency, 1 KiB at {} req/s over {} connections ({} run, {})",
        plan::RATE,
        plan::HEADLINE_CONNS,
        report.plan.mode,
        &report.commit[..report.commit.len().min(12)]
    );
    let svg = plot::latency_svg(&report.scenarios, &title)?;
    for (name, text) in [("report.json", json + "\n"), ("report.md", md.clone()), ("latency.svg", svg)] {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{md}");
    println!("written to {}/report.json, report.md, latency.svg", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_brings_its_baseline_along() {
        let names: Vec<&str> = select(&["ferry-mtls".to_owned()]).unwrap().iter().map(|s| s.name).collect();
        assert_eq!(names, ["direct", "ferry-mtls"]);
        let names: Vec<&str> = select(&["ferry-mtls-policy".to_owned(), "ferry-mtls".to_owned()])
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            ["direct", "ferry-mtls", "ferry-mtls-policy"],
            "SCENARIOS order, not the order given"
        );
        let names: Vec<&str> = select(&["ferry-mtls-http".to_owned(), "sidecar-haproxy-http".to_owned()])
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["direct-http", "ferry-mtls-http", "sidecar-haproxy-http"], "the HTTP baseline");
        assert_eq!(select(&[]).unwrap().len(), SCENARIOS.len());
        assert!(select(&["nope".to_owned()]).is_err());
    }
}
