//! `cargo xtask build`: set-up, then every binary and test of the host crates. The kernel
//! programs are built by agent/build.rs. Commands build the workspace's default members, which
//! leave out the BPF-only ebpf/programs crate (it cannot build for the host).

use anyhow::Result;

use crate::{cmd, setup};

/// Sets up, then builds binaries and tests.
pub fn run() -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    cmd::run(&mut cmd::cargo(["build", "--bins", "--tests"]))
}

/// Builds the binaries the tests and demo start (agent, CLI, test helpers).
pub fn bins() -> Result<()> {
    cmd::run(&mut cmd::cargo(["build", "--bins"]))
}
