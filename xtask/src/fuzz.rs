//! `cargo xtask fuzz [--seconds N]`: runs the policy loader's fuzz target (agent/fuzz, with
//! cargo-fuzz on nightly, which `setup` installs). `cargo xtask test` runs it for a minute; a longer
//! run is for before a release or after a change to agent/src/policy.

use anyhow::{Context as _, Result};
use std::ffi::OsString;
use std::fs;
use std::path::Path;

use crate::{cmd, paths, setup};

/// How long `cargo xtask test` fuzzes: a minute, so CI keeps to its time.
pub const TEST_SECONDS: u64 = 60;

/// The fuzz project, from the repository root.
const FUZZ_DIR: &str = "agent/fuzz";

/// The committed seed inputs, from the repository root.
const SEEDS: &str = "agent/fuzz/corpus/policy_load";

/// Sets up, then fuzzes the policy loader for `seconds`.
pub fn run(seconds: u64) -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    policy_load(seconds)
}

/// Builds and runs the `policy_load` target for `seconds`; an error when it does not build or finds
/// a crash (cargo-fuzz then prints the failing input's file and how to reproduce it).
pub fn policy_load(seconds: u64) -> Result<()> {
    // Its own target directory: the fuzz build has other flags and must not wait on the main one.
    let target_dir = paths::target_dir().join("fuzz");
    // libFuzzer adds what it finds to the first corpus directory: this one, so the seeds stay as
    // committed while later runs start from what earlier ones found.
    let corpus = target_dir.join("corpus/policy_load");
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    cmd::run(&mut cmd::cargo(fuzz_args(&target_dir, &corpus, seconds)))
}

/// The `cargo` arguments of a policy_load run.
fn fuzz_args(target_dir: &Path, corpus: &Path, seconds: u64) -> Vec<OsString> {
    let mut args: Vec<OsString> =
        ["+nightly", "fuzz", "run", "--fuzz-dir", FUZZ_DIR, "--target-dir"].map(OsString::from).into();
    args.push(target_dir.into());
    args.extend(["policy_load".into(), corpus.into(), SEEDS.into(), "--".into()]);
    args.push(format!("-max_total_time={seconds}").into());
    args.push(format!("-dict={FUZZ_DIR}/policy_load.dict").into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_dictionary_exist() {
        let root = paths::repo_root();
        assert!(root.join(FUZZ_DIR).join("Cargo.toml").is_file());
        assert!(root.join(FUZZ_DIR).join("policy_load.dict").is_file());
        assert!(fs::read_dir(root.join(SEEDS)).unwrap().count() > 0);
    }

    #[test]
    fn the_found_corpus_comes_first_and_the_time_is_passed_on() {
        let args = fuzz_args(Path::new("/t/fuzz"), Path::new("/t/fuzz/corpus/policy_load"), 60);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let run = args.iter().position(|a| *a == "policy_load").unwrap();
        assert_eq!(args[..3], ["+nightly", "fuzz", "run"]);
        assert_eq!(args[run + 1..run + 4], ["/t/fuzz/corpus/policy_load", SEEDS, "--"]);
        assert!(args.contains(&"-max_total_time=60"), "{args:?}");
    }
}
