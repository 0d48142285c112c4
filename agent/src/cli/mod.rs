//! The `ferry` CLI's client commands: ask the running agent over its admin socket and print the
//! answer as a table (the default), JSON or YAML.

pub mod client;
pub mod render;
pub mod table;
pub mod trace;
pub mod yaml;

use std::{error::Error, io::Write, path::PathBuf, time::SystemTime};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::admin::{self, model, query};
use client::{AdminClient, ClientError};

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the request failed, or the agent answered with an error
  2  usage error (bad arguments)
  3  the agent is not running (no socket, or nothing listening on it)";

/// How the CLI prints answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// The agent's JSON, pretty-printed.
    Json,
    /// The same data as YAML.
    Yaml,
}

/// Options every client command takes.
#[derive(Clone, Debug, clap::Args)]
pub struct GlobalArgs {
    /// The agent's admin socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "FERRY_ADMIN_SOCKET",
        default_value = admin::DEFAULT_SOCKET
    )]
    pub admin_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// The commands that talk to a running agent.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Summary of the agent: version, node, uptime, enrolled pods, readiness.
    #[command(after_help = EXIT_CODES)]
    Status,
    /// The pods this node serves: addresses, mode, identity, attached programs.
    #[command(after_help = EXIT_CODES)]
    Workloads,
    /// Services: VIPs, ports and endpoint pods.
    #[command(after_help = EXIT_CODES)]
    Services,
    /// Workload certificates: serial, expiry, next renewal.
    #[command(after_help = EXIT_CODES)]
    Certs,
    /// Connections the proxy is relaying now.
    #[command(after_help = EXIT_CODES)]
    Connections,
    /// eBPF programs, links per pod, map fill and kernel counters.
    #[command(after_help = EXIT_CODES)]
    Bpf,
    /// The agent's effective configuration (the table format prints it as YAML).
    #[command(after_help = EXIT_CODES)]
    ConfigDump,
    /// Change the agent's log filter without restarting it.
    #[command(after_help = EXIT_CODES)]
    LogLevel {
        /// trace, debug, info, warn, error, off, or directives such as `info,ferry::proxy=debug`.
        level: String,
    },
    /// Authorization policies: what each selects and how each rule is enforced.
    #[command(after_help = EXIT_CODES)]
    Policies,
    /// Explain what would happen if SOURCE connected to DEST, and why (capture, routing, mTLS and
    /// the policy decision at the destination).
    #[command(after_help = EXIT_CODES)]
    Trace {
        /// Who connects: a pod (NAMESPACE/NAME), a workload identity (spiffe://...) or an IP address
        /// (a plaintext client).
        #[arg(value_parser = source_arg)]
        src: String,
        /// Where to: IP:PORT ([IPV6]:PORT for IPv6) or NAMESPACE/NAME:PORT.
        #[arg(value_parser = dest_arg)]
        dest: String,
        /// Trace an HTTP request with this method (an L7 decision; GET when only other request
        /// options are given).
        #[arg(long)]
        method: Option<String>,
        /// The request's path (normalized as the proxy would; `/` by default).
        #[arg(long)]
        path: Option<String>,
        /// The request's authority (Host); the destination address by default.
        #[arg(long)]
        host: Option<String>,
        /// A request header, NAME:VALUE; repeat for more.
        #[arg(long = "header", value_parser = header_arg)]
        headers: Vec<String>,
    },
    /// Print a shell completion script (for example: ferry completions bash > /etc/bash_completion.d/ferry).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn source_arg(s: &str) -> Result<String, String> {
    admin::parse_source(s).map(|_| s.to_owned())
}

fn header_arg(s: &str) -> Result<String, String> {
    admin::parse_trace_header(s).map(|_| s.to_owned())
}

fn dest_arg(s: &str) -> Result<String, String> {
    admin::parse_trace_dest(s).map(|_| s.to_owned())
}

/// A client command's outcome, as the process exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: the request failed or the agent answered with an error.
    Failed = 1,
    /// 2: bad arguments (clap exits with it before we run).
    Usage = 2,
    /// 3: no agent is running.
    NotRunning = 3,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// Why a command failed after its arguments were accepted.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// The request failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The answer does not fit the expected type.
    #[error(
        "the agent's answer to {path} is not what this CLI expects (are the agent and CLI versions the same?)"
    )]
    Shape {
        /// The endpoint.
        path: &'static str,
        /// The mismatch.
        source: serde_json::Error,
    },
    /// The answer could not be rendered as YAML.
    #[error("rendering the agent's answer to {path} as YAML")]
    Yaml {
        /// The endpoint.
        path: &'static str,
        /// The serializer's complaint.
        source: yaml::Error,
    },
    /// stdout or stderr failed.
    #[error("writing the output")]
    Write(#[from] std::io::Error),
}

/// Runs `cmd` to completion on its own runtime, printing to stdout and stderr.
pub fn run(global: &GlobalArgs, cmd: ClientCommand, app: impl FnOnce() -> clap::Command) -> Exit {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return Exit::Failed;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    runtime.block_on(execute(global, cmd, app, &mut out, &mut err))
}

/// Runs `cmd`, writing results to `out` and errors to `err`; `app` builds the whole command tree
/// (only `completions` needs it).
pub async fn execute(
    global: &GlobalArgs,
    cmd: ClientCommand,
    app: impl FnOnce() -> clap::Command,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit {
    let result = match cmd {
        ClientCommand::Completions { shell } => {
            let mut app = app();
            let name = app.get_name().to_owned();
            // clap_complete panics on a failed write; buffer so a closed pipe is an ordinary error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut app, name, &mut script);
            out.write_all(&script).map_err(CommandError::Write)
        }
        cmd => {
            let client = AdminClient::new(&global.admin_socket);
            ask(&client, &cmd, global.output, out, err).await
        }
    };
    match result {
        Ok(()) => Exit::Ok,
        // `ferry connections | head`: the reader has all it wanted.
        Err(CommandError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Ok,
        Err(e) => {
            let _ = writeln!(err, "error: {}", chain(&e));
            match e {
                CommandError::Client(c) if c.agent_not_running() => Exit::NotRunning,
                _ => Exit::Failed,
            }
        }
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Sends the command's request and prints the answer.
async fn ask(
    client: &AdminClient,
    cmd: &ClientCommand,
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CommandError> {
    let (path, value) = match cmd {
        ClientCommand::LogLevel { level } => {
            let uri = format!("/log-level?{}", query::build(&[("level", level)]));
            ("/log-level", client.post(&uri, "").await?)
        }
        ClientCommand::Trace { src, dest, method, path, host, headers } => {
            let mut pairs = vec![("src", src.as_str()), ("dest", dest.as_str())];
            for (key, value) in [("method", method), ("path", path), ("host", host)] {
                if let Some(value) = value {
                    pairs.push((key, value.as_str()));
                }
            }
            pairs.extend(headers.iter().map(|h| ("header", h.as_str())));
            let uri = format!("/trace?{}", query::build(&pairs));
            ("/trace", client.get(&uri).await?)
        }
        other => {
            let path = get_path(other);
            (path, client.get(path).await?)
        }
    };
    match format {
        OutputFormat::Json => {
            let text = serde_json::to_string_pretty(&value)
                .map_err(|source| CommandError::Shape { path, source })?;
            writeln!(out, "{text}")?;
        }
        OutputFormat::Yaml => out.write_all(render_yaml(path, &value)?.as_bytes())?,
        OutputFormat::Table => human(cmd, path, value, out, err)?,
    }
    Ok(())
}

/// The endpoint of a plain GET command.
fn get_path(cmd: &ClientCommand) -> &'static str {
    match cmd {
        ClientCommand::Workloads => "/workloads",
        ClientCommand::Services => "/services",
        ClientCommand::Certs => "/certs",
        ClientCommand::Connections => "/connections",
        ClientCommand::Bpf => "/bpf",
        ClientCommand::ConfigDump => "/config_dump",
        ClientCommand::Policies => "/policies",
        _ => "/status",
    }
}

/// [`yaml::to_yaml`], with the endpoint as context on failure.
fn render_yaml(path: &'static str, value: &Value) -> Result<String, CommandError> {
    yaml::to_yaml(value).map_err(|source| CommandError::Yaml { path, source })
}

fn parse<T: DeserializeOwned>(path: &'static str, value: Value) -> Result<T, CommandError> {
    serde_json::from_value(value).map_err(|source| CommandError::Shape { path, source })
}

/// The table format: a table, labelled lines or sentences, depending on the command.
fn human(
    cmd: &ClientCommand,
    path: &'static str,
    value: Value,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CommandError> {
    let (table, what) = match cmd {
        ClientCommand::Workloads => (render::workloads(&parse::<Vec<_>>(path, value)?), "workloads"),
        ClientCommand::Services => (render::services(&parse::<Vec<_>>(path, value)?), "services"),
        ClientCommand::Connections => (render::connections(&parse::<Vec<_>>(path, value)?), "connections"),
        ClientCommand::Policies => (render::policies(&parse::<Vec<_>>(path, value)?), "policies"),
        ClientCommand::Certs => {
            let now = model::Timestamp::from_system_time(SystemTime::now());
            (render::certs(&parse::<Vec<_>>(path, value)?, now), "certificates")
        }
        _ => {
            let text = match cmd {
                ClientCommand::Bpf => render::bpf(&parse(path, value)?),
                ClientCommand::Trace { .. } => trace::explain(&parse(path, value)?),
                ClientCommand::LogLevel { .. } => {
                    let level = value.get("level").and_then(Value::as_str).unwrap_or("?");
                    format!("log level set to {level}\n")
                }
                ClientCommand::ConfigDump => render_yaml(path, &value)?,
                _ => render::status(&parse(path, value)?),
            };
            out.write_all(text.as_bytes())?;
            return Ok(());
        }
    };
    if table.is_empty() {
        writeln!(err, "No {what} found.")?;
    } else {
        out.write_all(table.render().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
