//! `cargo xtask fuzz [--seconds N]`: runs each of the agent's fuzz targets (agent/fuzz, with
//! cargo-fuzz on nightly, which `setup` installs) in turn: the policy loader, path normalization,
//! the HTTP/1 request path, the mesh file, SPIFFE IDs, the mTLS certificate verifiers and HBONE
//! CONNECT requests. `cargo xtask test` gives each 10 seconds; a longer run is for before a release
//! or after a change to agent/src/policy, http, config, identity or hbone.

use anyhow::{Context as _, Result};
use std::ffi::OsString;
use std::fs;
use std::path::Path;

use crate::{cmd, paths, setup};

/// How long `cargo xtask test` fuzzes each target: with seven, still about a minute in all (plus
/// the builds), so CI keeps to its time.
pub const TEST_SECONDS: u64 = 10;

/// The targets, in the order they run.
pub const TARGETS: [&str; 7] = [
    "policy_load",
    "path_normalize",
    "http1_request",
    "mesh_config",
    "spiffe_id",
    "svid_verifier",
    "hbone_connect",
];

/// The fuzz project, from the repository root.
const FUZZ_DIR: &str = "agent/fuzz";

/// Sets up, then fuzzes every target for `seconds` each.
pub fn run(seconds: u64) -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    all(seconds)
}

/// Runs every target for `seconds` each; an error names each target that did not build or found a
/// crash (cargo-fuzz then prints the failing input's file and how to reproduce it).
pub fn all(seconds: u64) -> Result<()> {
    let failed: Vec<&str> = TARGETS.into_iter().filter(|t| target(t, seconds).is_err()).collect();
    anyhow::ensure!(failed.is_empty(), "fuzz targets failed: {}", failed.join(", "));
    Ok(())
}

/// Builds and runs one target for `seconds`.
fn target(name: &str, seconds: u64) -> Result<()> {
    // Its own target directory: the fuzz build has other flags and must not wait on the main one.
    let target_dir = paths::target_dir().join("fuzz");
    // libFuzzer adds what it finds to the first corpus directory: this one, so the seeds stay as
    // committed while later runs start from what earlier ones found.
    let corpus = target_dir.join("corpus").join(name);
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    cmd::run(&mut cmd::cargo(fuzz_args(name, &target_dir, &corpus, seconds)))
}

/// The `cargo` arguments of one target's run: its found corpus first, then its committed seeds,
/// and its dictionary when it has one.
fn fuzz_args(name: &str, target_dir: &Path, corpus: &Path, seconds: u64) -> Vec<OsString> {
    let mut args: Vec<OsString> =
        ["+nightly", "fuzz", "run", "--fuzz-dir", FUZZ_DIR, "--target-dir"].map(OsString::from).into();
    args.push(target_dir.into());
    let seeds = format!("{FUZZ_DIR}/corpus/{name}");
    args.extend([name.into(), corpus.into(), seeds.into(), "--".into()]);
    args.push(format!("-max_total_time={seconds}").into());
    let dict = format!("{FUZZ_DIR}/{name}.dict");
    if paths::repo_root().join(&dict).is_file() {
        args.push(format!("-dict={dict}").into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_seeds_and_a_binary() {
        let root = paths::repo_root();
        let manifest = fs::read_to_string(root.join(FUZZ_DIR).join("Cargo.toml")).unwrap();
        for dict in ["policy_load.dict", "mesh_config.dict", "hbone_connect.dict"] {
            assert!(root.join(FUZZ_DIR).join(dict).is_file(), "{dict} is missing");
        }
        for name in TARGETS {
            assert!(manifest.contains(&format!("name = \"{name}\"")), "{name} is not a bin of agent/fuzz");
            let source = root.join(FUZZ_DIR).join("fuzz_targets").join(format!("{name}.rs"));
            assert!(source.is_file(), "{} is missing", source.display());
            let seeds = root.join(FUZZ_DIR).join("corpus").join(name);
            assert!(fs::read_dir(&seeds).unwrap().count() > 0, "{} has no seeds", seeds.display());
        }
    }

    #[test]
    fn every_bin_of_agent_fuzz_runs_once_and_ci_keeps_to_about_a_minute() {
        let manifest = fs::read_to_string(paths::repo_root().join(FUZZ_DIR).join("Cargo.toml")).unwrap();
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "agent/fuzz has {bins} targets, TARGETS lists {}", TARGETS.len());
        let unique: std::collections::BTreeSet<&str> = TARGETS.into_iter().collect();
        assert_eq!(unique.len(), TARGETS.len(), "a target is listed twice: {TARGETS:?}");
        let total = TEST_SECONDS * TARGETS.len() as u64;
        assert!((45..=90).contains(&total), "`cargo xtask test` would fuzz for {total} s");
    }

    #[test]
    fn the_found_corpus_comes_first_and_the_time_is_passed_on() {
        let args =
            fuzz_args("policy_load", Path::new("/t/fuzz"), Path::new("/t/fuzz/corpus/policy_load"), 60);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let run = args.iter().position(|a| *a == "policy_load").unwrap();
        assert_eq!(args[..3], ["+nightly", "fuzz", "run"]);
        assert_eq!(
            args[run + 1..run + 4],
            ["/t/fuzz/corpus/policy_load", "agent/fuzz/corpus/policy_load", "--"]
        );
        assert!(args.contains(&"-max_total_time=60"), "{args:?}");
        assert!(args.contains(&"-dict=agent/fuzz/policy_load.dict"), "{args:?}");
        let other = fuzz_args("path_normalize", Path::new("/t"), Path::new("/t/c"), 5);
        assert!(!other.iter().any(|a| a.to_string_lossy().starts_with("-dict")), "no dictionary: {other:?}");
        let mesh = fuzz_args("mesh_config", Path::new("/t"), Path::new("/t/c"), TEST_SECONDS);
        let mesh: Vec<&str> = mesh.iter().map(|a| a.to_str().unwrap()).collect();
        assert!(mesh.contains(&"agent/fuzz/corpus/mesh_config"), "{mesh:?}");
        assert!(mesh.contains(&"-dict=agent/fuzz/mesh_config.dict"), "{mesh:?}");
        assert!(mesh.contains(&"-max_total_time=10"), "{mesh:?}");
        let verifier = fuzz_args("svid_verifier", Path::new("/t"), Path::new("/t/c"), 5);
        assert!(verifier.iter().any(|a| a == "agent/fuzz/corpus/svid_verifier"), "{verifier:?}");
        assert!(!verifier.iter().any(|a| a.to_string_lossy().starts_with("-dict")), "{verifier:?}");
    }
}
