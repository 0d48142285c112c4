//! `cargo xtask bench [--quick] [--flamegraph]`: builds the agent and the tests crate's binaries
//! (test app, bench) in release and runs `ferry-bench`, which measures every scenario (no mesh,
//! Ferry, sidecars) and writes target/bench/report.json, report.md and latency.svg (and with
//! `--flamegraph`, flame-SCENARIO.svg and .folded of every mesh, sampled with perf). Release, because a debug agent's
//! latency says little about Ferry's. `cargo xtask test` runs the same bench as a smoke run.

use anyhow::{Result, ensure};

use crate::{cmd, paths, setup};

/// Sets up, builds in release and runs the latency bench; an error when any step fails.
pub fn run(quick: bool, flamegraph: bool) -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    let build = ["build", "--release", "--bins", "-p", "ferry-agent", "-p", "ferry-tests"];
    cmd::run(&mut cmd::cargo(build))?;
    let bin_dir = paths::target_dir().join("release");
    let bench = bin_dir.join("ferry-bench");
    ensure!(bench.is_file(), "the bench binary {} was not built", bench.display());
    let out = paths::target_dir().join("bench");
    let mut run = cmd::command(&bench);
    run.arg("--out").arg(&out).args(bench_args(quick, flamegraph)).env("FERRY_BIN_DIR", &bin_dir);
    cmd::run(&mut run)
}

/// Extra arguments of ferry-bench.
fn bench_args(quick: bool, flamegraph: bool) -> Vec<&'static str> {
    [(quick, "--quick"), (flamegraph, "--flamegraph")]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, a)| a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_and_flamegraph_are_passed_on() {
        assert_eq!(bench_args(true, false), ["--quick"]);
        assert_eq!(bench_args(false, true), ["--flamegraph"]);
        assert_eq!(bench_args(true, true), ["--quick", "--flamegraph"]);
        assert!(bench_args(false, false).is_empty());
    }
}
