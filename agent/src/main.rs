//! `ferry`: the node agent and its CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};

/// Ferry: eBPF-accelerated node-level service mesh agent.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, after_help = ferry::cli::EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    global: ferry::cli::GlobalArgs,
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
        /// Append the access log (one JSON line per connection, Istio's labels) to this file.
        #[arg(long)]
        access_log: Option<PathBuf>,
        /// Serve Prometheus metrics here (in the node's network namespace).
        #[arg(long, default_value_t = ferry::metrics::DEFAULT_ADDR)]
        metrics_addr: std::net::SocketAddr,
        /// Serve the kubelet's probes (`/healthz/ready`, `/healthz/live`) here.
        #[arg(long, default_value_t = ferry::admin::health::DEFAULT_ADDR)]
        health_addr: std::net::SocketAddr,
        /// The host's /proc, where pods given by UID are found (with hostPID, /proc itself).
        #[arg(long, default_value = "/proc")]
        host_proc: PathBuf,
        /// The host's cgroup2 root (default: the cgroup2 mount in /proc/self/mounts).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Follow the Kubernetes API (in-cluster service account, else KUBECONFIG): pods, services
        /// and Istio's policies come from the cluster; --config is the settings file.
        #[arg(long, requires = "node")]
        kubernetes: bool,
        /// This node's name (the DaemonSet passes spec.nodeName).
        #[arg(long, env = "FERRY_NODE")]
        node: Option<String>,
        /// The cgroup whose processes' connects to pods are the kubelet's probes (default: the
        /// cgroup2 root: every process in the node's network namespace).
        #[arg(long)]
        probe_cgroup: Option<PathBuf>,
        /// Where the datapath is pinned (on bpffs; /sys/fs/bpf is mounted when nothing is).
        #[arg(long, default_value = ferry::bpf::pins::DEFAULT_ROOT)]
        bpf_root: PathBuf,
        /// After handing over to a new agent, exit at the latest this many seconds later even if
        /// tunnelled streams are still open (default: wait until they end).
        #[arg(long, value_name = "SECONDS")]
        drain_deadline: Option<u64>,
    },
    /// Remove everything Ferry left in the kernel (pinned programs, maps and links; the probe
    /// source addresses): the pods talk directly again. Refused while an agent is running.
    Uninstall {
        /// Where the datapath is pinned.
        #[arg(long, default_value = ferry::bpf::pins::DEFAULT_ROOT)]
        bpf_root: PathBuf,
    },
    /// Manage the embedded CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Commands that ask the running agent over its admin socket.
    #[command(flatten)]
    Client(ferry::cli::ClientCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root CA (root.pem, root.key) in DIR. Keep the root key off the nodes.
    Init {
        /// Directory for the root CA; refuses to overwrite an existing one.
        dir: PathBuf,
        /// The SPIFFE trust domain the root signs for.
        #[arg(long, default_value = ferry::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Create NODE's intermediate CA in DIR/nodes/NODE (ca.pem, ca.key, root.pem): the directory a
    /// node's agent is given. The agent signs its pods' SVIDs with it and never sees the root key.
    IssueNode {
        /// The root CA directory made by `ferry ca init`.
        dir: PathBuf,
        /// The node name, as in the mesh file.
        node: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Client(cmd) => return ferry::cli::run(&cli.global, cmd, Cli::command).into(),
        // The log handle changes the filter at run time (`ferry log-level`); the daemon keeps it.
        Command::Run {
            config,
            events,
            access_log,
            metrics_addr,
            health_addr,
            host_proc,
            cgroup_root,
            kubernetes,
            node,
            probe_cgroup,
            bpf_root,
            drain_deadline,
        } => init_logging().and_then(|log| {
            run_daemon(ferry::daemon::RunOptions {
                config,
                events,
                access_log,
                admin_socket: cli.global.admin_socket.clone(),
                metrics_addr,
                health_addr,
                host_proc,
                cgroup_root,
                kubernetes,
                node,
                probe_cgroup,
                bpf_root,
                drain_deadline: drain_deadline.map(std::time::Duration::from_secs),
                log: Some(log),
            })
        }),
        Command::Uninstall { bpf_root } => ferry::uninstall::run(&cli.global.admin_socket, &bpf_root),
        Command::Ca(cmd) => init_logging().and_then(|_| run_ca(cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by FERRY_LOG (default info), with a filter that can be swapped later.
fn init_logging() -> anyhow::Result<ferry::admin::log_level::LogControl> {
    Ok(ferry::admin::log_level::init("FERRY_LOG", "info")?)
}

fn run_daemon(opts: ferry::daemon::RunOptions) -> anyhow::Result<()> {
    ferry::memory::limit_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(ferry::daemon::run(opts));
    // A blocking task still waiting on a socket must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

fn run_ca(cmd: CaCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use ferry::identity::{RootCa, TrustDomain, ca};
    use rustls::pki_types::UnixTime;
    match cmd {
        CaCommand::Init { dir, trust_domain } => {
            let td =
                TrustDomain::new(&trust_domain).with_context(|| format!("trust domain {trust_domain:?}"))?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            RootCa::init_dir(&dir, &td, ca::DEFAULT_ROOT_VALIDITY, UnixTime::now())
                .with_context(|| format!("creating the root CA in {}", dir.display()))?;
            println!("root CA for {trust_domain} written to {}", dir.display());
        }
        CaCommand::IssueNode { dir, node } => {
            let root = RootCa::load(&dir, UnixTime::now())
                .with_context(|| format!("loading the root CA from {}", dir.display()))?;
            let node_dir = root
                .issue_node_dir(&dir, &node, ca::DEFAULT_NODE_VALIDITY, UnixTime::now())
                .with_context(|| format!("issuing the intermediate CA for node {node:?}"))?;
            println!("intermediate CA for node {node} written to {}", node_dir.display());
        }
    }
    Ok(())
}
