//! Project tasks, run as `cargo xtask <task>`: set-up of the toolchain and host packages, build,
//! test, demo, bench, soak and fuzz. Depends on nothing in the workspace, because building the agent
//! needs the toolchain that `setup` installs.

mod bench;
mod build;
mod cmd;
mod demo;
mod fuzz;
mod image;
mod paths;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Ferry's project tasks.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "Ferry's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// One task; each lives in its own module.
#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (root; idempotent, quick when done).
    Setup {
        /// Rebuild bpf-linker even when one already runs (after a nightly update, say).
        #[arg(long)]
        rebuild_bpf_linker: bool,
    },
    /// Set up, then build every binary and test.
    Build,
    /// Set up, sweep stale test leftovers, then run the tests, rustfmt and clippy.
    Test,
    /// Set up, build, then run the demo on a simulated node.
    Demo,
    /// Set up, build in release, then benchmark: no mesh, Ferry and sidecars, in one run.
    Bench {
        /// A short run (about two minutes).
        #[arg(long)]
        quick: bool,
        /// Also write a flame graph of every mesh (perf samples during the headline load).
        #[arg(long)]
        flamegraph: bool,
    },
    /// Set up, build in release, then soak: a long mixed load through two agents, failing when
    /// their memory or open descriptors grow more than 10% or the load sees an error.
    Soak {
        /// How long the load runs, warm-up (a fifth of it, at least 30 s) included.
        #[arg(long, default_value_t = soak::DEFAULT_MINUTES,
              value_parser = clap::value_parser!(u64).range(1..))]
        minutes: u64,
    },
    /// Set up, build the agent in release mode, then its container image (deploy/Containerfile,
    /// FROM scratch, with podman).
    Image,
    /// Set up, then fuzz each target of agent/fuzz (policy loader, path normalization, HTTP/1
    /// request path, mesh file, SPIFFE IDs, SVID verifier, HBONE CONNECT) in turn.
    Fuzz {
        /// How long to fuzz each target, in seconds (`test` gives each 10).
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
}

/// Prints the error chain without a backtrace: these errors explain themselves.
fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup { rebuild_bpf_linker } => setup::run(&setup::Options { rebuild_bpf_linker }),
        Task::Build => build::run(),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::Bench { quick, flamegraph } => bench::run(quick, flamegraph),
        Task::Soak { minutes } => soak::run(minutes),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Image => image::run(),
    }
}
