//! `cargo xtask test`: the whole suite, as CI runs it, with the bench's smoke run and a short soak.
//! Set-up failures stop it (the kernel tests must never be skipped for want of root or cgroup v2);
//! after that every step runs and a summary names the ones that failed.

use anyhow::{Context as _, Result, bail};
use std::fs;

use crate::{build, cmd, fuzz, image, paths, setup, soak};

/// Sets up, then runs sweep, build, tests, the bench smoke run, a two-minute soak,
/// [`fuzz::TEST_SECONDS`] of fuzzing per target, the container image build, rustfmt and clippy; an
/// error when any step failed.
pub fn run() -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    let mut results: Vec<(&str, Result<()>)> = Vec::new();
    if has_sweep_bin()? {
        let mut sweep = cmd::cargo(["run", "--quiet", "-p", "ferry-tests", "--bin", "ferry-sweep"]);
        results.push(("sweep stale test leftovers", cmd::run(&mut sweep)));
    } else {
        eprintln!("test: tests crate has no ferry-sweep bin yet; not sweeping leftovers");
    }
    results.push(("build binaries", build::bins()));
    let bin_dir = paths::target_dir().join("debug");
    let mut tests = cmd::cargo(["test", "--no-fail-fast"]);
    results.push(("tests", cmd::run(tests.env("FERRY_BIN_DIR", &bin_dir))));
    // The bench's smoke run keeps every benchmark scenario working; it asserts no timing.
    let mut bench = cmd::command(bin_dir.join("ferry-bench"));
    bench.arg("--smoke").arg("--out").arg(paths::target_dir().join("bench-smoke"));
    results.push(("bench smoke run", cmd::run(bench.env("FERRY_BIN_DIR", &bin_dir))));
    // A short soak keeps its checks working and catches gross growth of the agents (the long one
    // is `cargo xtask soak`); its own directory, so it never overwrites a long run's summary.
    let soak_out = paths::target_dir().join("soak-short");
    results.push(("soak (short)", soak::soak(&bin_dir, soak::TEST_MINUTES, &soak_out)));
    results.push(("fuzz targets", fuzz::all(fuzz::TEST_SECONDS)));
    // The image definition builds for real (around the debug binary, which is already built).
    results.push(("container image", image::build(&bin_dir.join("ferry"))));
    results.push(("rustfmt", cmd::run(&mut cmd::cargo(["fmt", "--all", "--", "--check"]))));
    let mut clippy = cmd::cargo(["clippy", "--all-targets", "--", "-D", "warnings"]);
    results.push(("clippy", cmd::run(&mut clippy)));
    summarize(&results)
}

/// Whether tests/Cargo.toml declares the `ferry-sweep` binary.
fn has_sweep_bin() -> Result<bool> {
    let manifest = paths::repo_root().join("tests/Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    Ok(declares_bin(&text, "ferry-sweep"))
}

/// Whether a manifest has a `name = "<bin>"` line (as in a `[[bin]]` table).
fn declares_bin(manifest: &str, bin: &str) -> bool {
    manifest.lines().any(|line| {
        let Some((key, value)) = line.split_once('=') else { return false };
        key.trim() == "name" && value.trim().trim_matches('"') == bin
    })
}

/// Prints one line per step and fails when any step failed.
fn summarize(results: &[(&str, Result<()>)]) -> Result<()> {
    eprintln!("\n=== summary ===");
    for (name, result) in results {
        match result {
            Ok(()) => eprintln!("  ok    {name}"),
            Err(err) => eprintln!("  FAIL  {name}: {err:#}"),
        }
    }
    let failed: Vec<&str> = results.iter().filter(|(_, r)| r.is_err()).map(|(name, _)| *name).collect();
    if !failed.is_empty() {
        bail!("{} of {} steps failed: {}", failed.len(), results.len(), failed.join(", "));
    }
    eprintln!("all {} steps passed", results.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_declared_bin() {
        let manifest = "[package]\nname = \"ferry-tests\"\n\n[[bin]]\nname = \"ferry-sweep\"\n";
        assert!(declares_bin(manifest, "ferry-sweep"));
        assert!(!declares_bin(manifest, "ferry-demo"));
    }

    #[test]
    fn summary_fails_when_a_step_failed() {
        let results = [("a", Ok(())), ("b", Err(anyhow::anyhow!("boom")))];
        let err = summarize(&results).unwrap_err().to_string();
        assert!(err.contains("1 of 2 steps failed: b"), "{err}");
        assert!(summarize(&[("a", Ok(()))]).is_ok());
    }
}
