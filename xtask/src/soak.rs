//! `cargo xtask soak [--minutes N]`: builds the agent and the tests crate's binaries in release (as
//! the bench does) and runs `ferry-soak`: a long mixed load through two agents on simulated nodes,
//! failing when an agent's memory or open descriptors grow more than 10 percent past their
//! baseline, or when the load sees an error. It writes target/soak/summary.json and samples.csv.
//! Release, because that is what operators run: a debug agent's memory says little about theirs.
//! `cargo xtask test` runs two minutes of it on the debug binaries it has already built ([`soak`]).

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Result, ensure};

use crate::{cmd, paths, setup};

/// How long `cargo xtask soak` runs without `--minutes`.
pub const DEFAULT_MINUTES: u64 = 30;
/// How long `cargo xtask test` soaks: two minutes, 30 s of them warm-up, so CI keeps to its time.
pub const TEST_MINUTES: u64 = 2;

/// Sets up, builds in release and soaks for `minutes`; an error when a step fails or the soak
/// found growth or errors.
pub fn run(minutes: u64) -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    let build = ["build", "--release", "--bins", "-p", "ferry-agent", "-p", "ferry-tests"];
    cmd::run(&mut cmd::cargo(build))?;
    let target = paths::target_dir();
    soak(&target.join("release"), minutes, &target.join("soak"))
}

/// Runs the already built `ferry-soak` of `bin_dir` (with that directory's agent and test app)
/// for `minutes`, writing its summary under `out`.
pub fn soak(bin_dir: &Path, minutes: u64, out: &Path) -> Result<()> {
    let soak = bin_dir.join("ferry-soak");
    ensure!(soak.is_file(), "the soak binary {} was not built", soak.display());
    let mut run = cmd::command(&soak);
    run.args(soak_args(minutes, out)).env("FERRY_BIN_DIR", bin_dir);
    cmd::run(&mut run)
}

/// The arguments of ferry-soak.
fn soak_args(minutes: u64, out: &Path) -> Vec<OsString> {
    vec!["--minutes".into(), minutes.to_string().into(), "--out".into(), out.into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_and_out_are_passed_on() {
        let args = soak_args(TEST_MINUTES, Path::new("/t/soak-short"));
        assert_eq!(args, ["--minutes", "2", "--out", "/t/soak-short"]);
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = soak(Path::new("/nonexistent/ferry-bins"), 1, Path::new("/tmp")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ferry-bins/ferry-soak"), "{err}");
    }
}
