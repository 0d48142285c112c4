//! `ferry`: the node agent and its CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Ferry: eBPF-accelerated node-level service mesh agent.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent with a standalone mesh file.
    Run {
        /// The mesh file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Append JSON-lines events (enrollment, readiness, one record per connection) to this file.
        #[arg(long)]
        events: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run { config, events } => run_daemon(ferry::daemon::RunOptions { config, events }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_daemon(opts: ferry::daemon::RunOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(ferry::daemon::run(opts))
}
