//! `cargo xtask bench [--quick]`: builds the agent and the tests crate's binaries (test app, bench) in
//! release and runs `ferry-bench`, which measures every scenario (no mesh, Ferry, sidecars) and
//! writes target/bench/report.json, report.md and latency.svg. Release, because a debug agent's
//! latency says little about Ferry's. `cargo xtask test` runs the same bench as a smoke run.

use anyhow::{Result, ensure};

use crate::{cmd, paths, setup};

/// Sets up, builds in release and runs the latency bench; an error when any step fails.
pub fn run(quick: bool) -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    let build = ["build", "--release", "--bins", "-p", "ferry-agent", "-p", "ferry-tests"];
    cmd::run(&mut cmd::cargo(build))?;
    let bin_dir = paths::target_dir().join("release");
    let bench = bin_dir.join("ferry-bench");
    ensure!(bench.is_file(), "the bench binary {} was not built", bench.display());
    let out = paths::target_dir().join("bench");
    let mut run = cmd::command(&bench);
    run.arg("--out").arg(&out).args(bench_args(quick)).env("FERRY_BIN_DIR", &bin_dir);
    cmd::run(&mut run)
}

/// Extra arguments of ferry-bench.
fn bench_args(quick: bool) -> Vec<&'static str> {
    if quick { vec!["--quick"] } else { Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_is_passed_on() {
        assert_eq!(bench_args(true), ["--quick"]);
        assert!(bench_args(false).is_empty());
    }
}
