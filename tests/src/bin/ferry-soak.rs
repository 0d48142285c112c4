//! `ferry-soak`: a long mixed load through real Ferry agents on two simulated nodes, watching the
//! agents for growth. Run it as `cargo xtask soak [--minutes N]`; `cargo xtask test` runs two
//! minutes of it.
//!
//! Node-a runs `client`, `local` and `outsider-a`; node-b runs `server-1` and `server-2` (service
//! `echo`), `web` (HTTP, port declared `http`) and `outsider-b`. The outsiders are not in the mesh.
//! Both agents have a CA and `[datapath] local_shortcut`, so the load takes every path an agent
//! has ([`paths`]): mutual TLS between the nodes (to the service VIP, and HTTP served by the
//! destination's agent), the node-local shortcut between two pods of node-a, and plaintext both
//! ways (a pod calling out of the mesh, a pod out of the mesh calling in). Each path gets
//! long-lived request/response connections, a churn of short connections at a fixed rate and a
//! periodic bulk transfer ([`ferry_tests::soak::load`], run by this same binary as a worker inside
//! the calling pod, so the agent captures it).
//!
//! Every few seconds it samples each agent's resident memory and open descriptors; after the
//! warm-up it takes a baseline, and the run fails when either grew more than 10 percent over it by
//! the end, or when the load saw a single error. It prints a summary and writes OUT/summary.json,
//! OUT/samples.csv and each agent's stderr (and after a failure, its last events). Needs root.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use ferry_tests::prometheus::{METRICS_ADDR, http_get};
use ferry_tests::scenario::{NAMESPACE, SERVER_PORT, SERVICE, SERVICE_PORT, VIP4, VIP4_IP, wait_events};
use ferry_tests::soak::load::{self, Progress, Target, TargetStats};
use ferry_tests::soak::watch::{self, Metric, Sample, Trend};
use ferry_tests::testapp::{Wire, serve, serve_http};
use ferry_tests::{Agent, BIN_DIR_ENV, ChildGuard, MeshFile, NodeLink, Pod, SimNode, link_nodes, netns};
use serde::Serialize;

/// The mesh's trust domain.
const TRUST_DOMAIN: &str = "cluster.local";
/// The mesh names of the two nodes.
const NODE_A: &str = "node-a";
/// See [`NODE_A`].
const NODE_B: &str = "node-b";
/// Long-lived connections per path.
const LONG_LIVED: usize = 4;
/// Pause between two requests on a long-lived connection: 10 requests/s each.
const INTERVAL_MS: u64 = 100;
/// New short connections per second per path.
const CHURN_PER_S: f64 = 5.0;
/// One bulk transfer per path this often...
const BULK_EVERY_S: u64 = 20;
/// ...of this many bytes over the echo...
const BULK_BYTES: u64 = 8 << 20;
/// ...and of this many over HTTP (one request body, held whole in memory by the client).
const HTTP_BULK_BYTES: u64 = 1 << 20;
/// How often a worker reports its counters.
const WORKER_REPORT: Duration = Duration::from_secs(1);
/// How long a stopped worker may take to finish its connections and report.
const WORKER_FINISH: Duration = Duration::from_secs(60);
/// How often the run prints where it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// How long the agents get after the load to close every connection before the last look.
const DRAIN: Duration = Duration::from_secs(3);

/// Command line.
#[derive(Parser)]
#[command(about = "A long mixed load through Ferry agents on two simulated nodes, watching them for growth")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    worker: Option<Sub>,
    /// How long the load runs, warm-up (a fifth of it, at least 30 s) included.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=24 * 60))]
    minutes: u64,
    /// The run's length in seconds instead of minutes (to try the soak itself).
    #[arg(long, conflicts_with = "minutes", value_parser = clap::value_parser!(u64).range(1..))]
    seconds: Option<u64>,
    /// Seconds between two samples of the agents.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    sample_secs: u64,
    /// Directory for summary.json and samples.csv.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

/// The soak's own subcommands.
#[derive(Subcommand)]
enum Sub {
    /// Internal: runs the load of a JSON plan (a list of targets) inside a pod until stdin closes,
    /// printing its counters as JSON lines.
    Worker {
        /// The targets, as JSON.
        #[arg(long)]
        plan: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.worker {
        Some(Sub::Worker { plan }) => worker(plan).map(|()| true),
        None => soak(&cli),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferry-soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set when the worker's stdin closes: the orchestrator's way of saying stop.
static STOP: AtomicBool = AtomicBool::new(false);

/// The worker: the load of `plan` until stdin closes, one JSON line of counters per report.
fn worker(plan: &str) -> Result<()> {
    let targets: Vec<Target> = serde_json::from_str(plan).context("the worker's plan is not valid JSON")?;
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        STOP.store(true, Ordering::Relaxed);
    });
    load::run(&targets, &STOP, WORKER_REPORT, |progress| {
        let line = serde_json::to_string(progress).expect("the counters always serialize");
        let mut out = std::io::stdout().lock();
        // Nobody left to read it means the orchestrator is gone, and this worker with it.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    });
    Ok(())
}

/// One path of the load: where it goes, from which pod, through which agents.
struct PathDef {
    target: Target,
    /// What the path is, for people.
    what: &'static str,
    /// The mesh names of the nodes whose agents carry it.
    via: &'static [&'static str],
    /// Whether the caller is the out-of-mesh pod `outsider-a` rather than `client`.
    from_outsider: bool,
}

/// The nodes, pods, servers and agents. Fields drop in order: the agents first, then the CA, the
/// servers, the link, and the nodes last.
struct World {
    /// The agents of node-a and node-b, with their mesh node names.
    agents: Vec<(&'static str, Agent)>,
    /// The enrolled calling pod on node-a.
    client: Pod,
    /// The calling pod on node-a that is not in the mesh.
    outsider_a: Pod,
    /// The load's paths.
    paths: Vec<PathDef>,
    _ca: tempfile::TempDir,
    _servers: Vec<ChildGuard>,
    _link: NodeLink,
    /// node-a, then node-b.
    nodes: Vec<SimNode>,
}

impl World {
    /// Builds both nodes, their pods and servers, and starts both agents.
    fn build() -> Result<World> {
        let mut a = SimNode::new("soak-a", 1)?;
        let mut b = SimNode::new("soak-b", 2)?;
        let link = link_nodes(&a, &b)?;
        let (client, local, outsider_a) =
            (a.add_pod("client")?, a.add_pod("local")?, a.add_pod("outsider-a")?);
        let servers = [b.add_pod("server-1")?, b.add_pod("server-2")?];
        let (web, outsider_b) = (b.add_pod("web")?, b.add_pod("outsider-b")?);
        // The churn opens thousands of connections from two pods; whoever closes first holds
        // TIME_WAIT, so let new connects reuse such ports.
        for pod in [&client, &outsider_a] {
            netns::write_sysctl(pod.netns_path(), "net/ipv4/tcp_tw_reuse", "1")?;
        }
        let mut guards = Vec::new();
        for pod in servers.iter().chain([&local, &outsider_b]) {
            guards.push(
                serve(pod, SERVER_PORT, pod.name())
                    .with_context(|| format!("echo server in {}", pod.name()))?,
            );
        }
        guards.push(serve_http(&web, SERVER_PORT, web.name()).context("HTTP server in web")?);
        let ca = ferry_tests::ca::make_ca(TRUST_DOMAIN, &[NODE_A, NODE_B])?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), None).local_shortcut(true);
            mesh.pod(&client, NAMESPACE, "client").node(NODE_A);
            mesh.pod(&local, NAMESPACE, "local").node(NODE_A);
            for s in &servers {
                mesh.pod(s, NAMESPACE, SERVICE).node(NODE_B);
            }
            mesh.pod(&web, NAMESPACE, "web").node(NODE_B).port_protocol(SERVER_PORT, "http");
            let names: Vec<&str> = servers.iter().map(Pod::name).collect();
            mesh.service(SERVICE, NAMESPACE, &[VIP4], &[(SERVICE_PORT, SERVER_PORT)], &names);
            mesh.to_toml()
        };
        // As operators run it by default: no access log.
        let agent_a = Agent::start_without_access_log(&a, &mesh_for(NODE_A)).context("agent on node-a")?;
        let agent_b = Agent::start_without_access_log(&b, &mesh_for(NODE_B)).context("agent on node-b")?;
        let at = |pod: &Pod| SocketAddr::new(pod.ipv4().into(), SERVER_PORT);
        let paths = paths(
            SocketAddr::new(VIP4_IP.into(), SERVICE_PORT),
            at(&local),
            at(&outsider_b),
            at(&servers[0]),
            at(&web),
        );
        Ok(World {
            agents: vec![(NODE_A, agent_a), (NODE_B, agent_b)],
            client,
            outsider_a,
            paths,
            _ca: ca,
            _servers: guards,
            _link: link,
            nodes: vec![a, b],
        })
    }

    /// The node (for its netns) of the agent named `name`.
    fn node(&self, name: &str) -> &SimNode {
        let i = self.agents.iter().position(|(n, _)| *n == name).unwrap_or(0);
        &self.nodes[i]
    }
}

/// The load's paths, given the addresses each one calls.
fn paths(
    service: SocketAddr,
    local: SocketAddr,
    outsider_b: SocketAddr,
    server_1: SocketAddr,
    web: SocketAddr,
) -> Vec<PathDef> {
    let echo = |name: &str, addr| Target {
        name: name.to_owned(),
        addr,
        wire: Wire::Echo,
        long_lived: LONG_LIVED,
        interval_ms: INTERVAL_MS,
        churn_per_s: CHURN_PER_S,
        bulk_bytes: BULK_BYTES,
        bulk_every_s: BULK_EVERY_S,
    };
    let path = |target, what, via, from_outsider| PathDef { target, what, via, from_outsider };
    vec![
        path(echo("mtls", service), "client -> echo service on node-b, mutual TLS", &[NODE_A, NODE_B], false),
        path(echo("shortcut", local), "client -> local on node-a, node-local shortcut", &[NODE_A], false),
        path(
            echo("plain-out", outsider_b),
            "client -> outsider-b (not in the mesh), plaintext",
            &[NODE_A],
            false,
        ),
        path(
            echo("plain-in", server_1),
            "outsider-a (not in the mesh) -> server-1, plaintext",
            &[NODE_B],
            true,
        ),
        path(
            Target { wire: Wire::Http, bulk_bytes: HTTP_BULK_BYTES, ..echo("http", web) },
            "client -> web on node-b, HTTP/1.1 over mutual TLS",
            &[NODE_A, NODE_B],
            false,
        ),
    ]
}

/// A worker process in a pod: the load of some paths, its latest counters read from its stdout.
struct Worker {
    pod: String,
    child: ChildGuard,
    /// Closing it stops the load.
    stdin: Option<ChildStdin>,
    latest: Arc<Mutex<Option<Progress>>>,
    reader: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts this binary's `worker` in `pod` (in its cgroup too when `in_cgroup`, so an enrolled
    /// pod's connects are captured) with `targets`.
    fn start(pod: &Pod, in_cgroup: bool, targets: &[&Target]) -> Result<Worker> {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let mut cmd = if in_cgroup { pod.command(&exe) } else { pod.netns_command(&exe) };
        cmd.arg("worker").arg("--plan").arg(serde_json::to_string(targets)?);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child =
            pod.spawn(cmd).with_context(|| format!("cannot start the worker in {}", pod.name()))?;
        let stdin = child.take_stdin();
        let stdout = child.take_stdout().context("the worker's stdout is not piped")?;
        let latest = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&latest);
        let name = pod.name().to_owned();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Progress>(&line) {
                    Ok(p) => *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(p),
                    Err(_) => eprintln!("ferry-soak: worker in {name}: {line}"),
                }
            }
        });
        Ok(Worker { pod: pod.name().to_owned(), child, stdin, latest, reader: Some(reader) })
    }

    /// The counters of the latest report.
    fn latest(&self) -> Option<Progress> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the load, waits for the worker to finish its connections, and returns its last report.
    fn finish(mut self) -> Result<Progress> {
        drop(self.stdin.take());
        let status = self.child.wait_timeout(WORKER_FINISH);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stderr = self.child.stderr();
        let status =
            status.with_context(|| format!("the worker in {} did not finish: {stderr}", self.pod))?;
        ensure!(status.success(), "the worker in {} failed ({status}): {stderr}", self.pod);
        match self.latest() {
            Some(last) if last.done => Ok(last),
            _ => bail!("the worker in {} exited without its last report: {stderr}", self.pod),
        }
    }
}

/// The agents' own counters, from their metrics.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct AgentCounters {
    /// Connections opened (either side).
    opened: f64,
    /// Connections closed.
    closed: f64,
    /// Accepted connections that could not reach their destination.
    failed: f64,
    /// Bytes sent and received.
    bytes: f64,
}

/// Scrapes the metrics of the agent in `node`'s netns.
fn counters(node: &SimNode) -> Result<AgentCounters> {
    let (status, text) = http_get(node.netns_path(), METRICS_ADDR, "/metrics")?;
    ensure!(status == 200, "the metrics endpoint answered {status}");
    let sum = |name| watch::family_sum(&text, name);
    Ok(AgentCounters {
        opened: sum("ferry_tcp_connections_opened_total")?,
        closed: sum("ferry_tcp_connections_closed_total")?,
        failed: sum("ferry_tcp_connections_failed_total")?,
        bytes: sum("ferry_tcp_sent_bytes_total")? + sum("ferry_tcp_received_bytes_total")?,
    })
}

/// How one agent did.
#[derive(Debug, Serialize)]
struct AgentSummary {
    /// Its node's mesh name.
    name: String,
    /// Its pid.
    pid: u32,
    /// Resident memory in bytes.
    rss: Trend,
    /// Growth of `rss` over its baseline, in percent.
    rss_growth_pct: f64,
    /// Open file descriptors.
    fds: Trend,
    /// Growth of `fds` over its baseline, in percent.
    fds_growth_pct: f64,
    /// Connections the agent counted (its `ferry_tcp_connections_opened_total`).
    connections: u64,
    /// Bytes the agent moved (`ferry_tcp_sent_bytes_total` plus `..._received_bytes_total`).
    bytes: u64,
    /// Load errors on the paths through this agent.
    errors: u64,
    /// Connections the agent could not take to their destination (its own counter).
    agent_failed_connections: u64,
    /// Connections still open by the agent's counters once the load had stopped and drained.
    open_after_load: i64,
    /// Open descriptors once the load had stopped and drained.
    fds_after_load: u64,
}

/// How one path of the load did.
#[derive(Debug, Serialize)]
struct PathSummary {
    /// What the path is.
    what: &'static str,
    /// The agents that carry it.
    via: &'static [&'static str],
    /// The load's counters.
    #[serde(flatten)]
    stats: TargetStats,
}

/// Everything the run found: OUT/summary.json.
#[derive(Debug, Serialize)]
struct Summary {
    /// No growth over the limit and no load error.
    passed: bool,
    /// Why not.
    failures: Vec<String>,
    /// The load's length, warm-up included.
    duration_s: f64,
    /// The warm-up, left out of the baseline.
    warmup_s: f64,
    /// Seconds between samples.
    sample_every_s: u64,
    /// Samples whose median is the baseline, and the end.
    window: usize,
    /// The allowed growth, in percent.
    growth_limit_pct: f64,
    /// The binaries the run used.
    bin_dir: String,
    /// One per agent.
    agents: Vec<AgentSummary>,
    /// One per path.
    load: Vec<PathSummary>,
}

/// The whole soak; whether it passed (the reasons are printed and in the summary).
fn soak(cli: &Cli) -> Result<bool> {
    let duration = Duration::from_secs(cli.seconds.unwrap_or(cli.minutes * 60));
    let warmup = watch::warmup(duration);
    let every = Duration::from_secs(cli.sample_secs);
    let measured = duration.saturating_sub(warmup).as_secs() / cli.sample_secs + 1;
    ensure!(
        measured >= 2 * watch::WINDOW as u64,
        "a {} s run leaves {measured} samples after its {} s warm-up, and the verdict needs {}: run longer",
        duration.as_secs(),
        warmup.as_secs(),
        2 * watch::WINDOW
    );
    std::fs::create_dir_all(&cli.out).with_context(|| format!("cannot create {}", cli.out.display()))?;
    eprintln!("ferry-soak: building two nodes and starting their agents");
    let setup = Instant::now();
    let world = World::build()?;
    eprintln!("ferry-soak: agents ready after {:.1} s", setup.elapsed().as_secs_f64());
    let client_targets: Vec<&Target> =
        world.paths.iter().filter(|p| !p.from_outsider).map(|p| &p.target).collect();
    let outsider_targets: Vec<&Target> =
        world.paths.iter().filter(|p| p.from_outsider).map(|p| &p.target).collect();
    eprintln!(
        "ferry-soak: {} s of load ({} s warm-up), sampling every {} s",
        duration.as_secs(),
        warmup.as_secs(),
        every.as_secs()
    );
    let start = Instant::now();
    let workers = [
        Worker::start(&world.client, true, &client_targets)?,
        Worker::start(&world.outsider_a, false, &outsider_targets)?,
    ];
    check_paths(&world)?;
    eprintln!("ferry-soak: every path is carried as it should be; soaking");
    let samples = watch_agents(&world, &workers, start, duration, every)?;
    let mut reports = Vec::new();
    for w in workers {
        reports.extend(w.finish()?.targets);
    }
    std::thread::sleep(DRAIN);
    let summary = summarize(&world, &samples, &reports, duration, warmup, every)?;
    write(&cli.out, &summary, &world, &samples)?;
    keep_logs(&cli.out, &world, !summary.passed)?;
    print(&summary);
    Ok(summary.passed)
}

/// Waits until each agent has recorded a connection of each path it carries with the expected
/// security (and the HTTP path as HTTP), so the soak measures what it claims to.
fn check_paths(world: &World) -> Result<()> {
    let [(_, a), (_, b)] = &world.agents[..] else {
        bail!("there are {} agents, not two", world.agents.len())
    };
    let closed = |e: &serde_json::Value, direction: &str, security: &str| {
        e["event"] == "conn_close" && e["direction"] == direction && e["security"] == security
    };
    let service = format!("{NAMESPACE}/{SERVICE}");
    seen("mtls (node-a, to the service)", a, |e| {
        closed(e, "outbound", "mutual_tls") && e["service"] == service.as_str()
    })?;
    seen("shortcut (node-a)", a, |e| closed(e, "outbound", "node_local"))?;
    seen("plain-out (node-a)", a, |e| closed(e, "outbound", "none"))?;
    seen("plain-in (node-b)", b, |e| closed(e, "inbound", "none"))?;
    seen("http (node-b, served as HTTP)", b, |e| {
        closed(e, "inbound", "mutual_tls") && e["protocol"] == "http/1.1"
    })
}

/// Waits (bounded) until `agent` recorded an event matching `pred`; an error naming path `what`.
fn seen(what: &str, agent: &Agent, pred: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
    ensure!(!wait_events(agent, 1, pred).is_empty(), "the agent did not record a connection of path {what}");
    Ok(())
}

/// Samples every agent every `every` until `duration` after `start`, printing where the run is;
/// the samples, per agent. An error when an agent is gone.
fn watch_agents(
    world: &World,
    workers: &[Worker],
    start: Instant,
    duration: Duration,
    every: Duration,
) -> Result<Vec<Vec<Sample>>> {
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); world.agents.len()];
    let mut next_progress = start + PROGRESS_EVERY;
    let mut due = start;
    loop {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = start.elapsed().as_secs_f64();
        for ((name, agent), series) in world.agents.iter().zip(&mut samples) {
            let sample = watch::sample(agent.pid(), t).with_context(|| {
                format!(
                    "agent {name} (pid {}) is gone at {t:.0} s; its stderr:\n{}",
                    agent.pid(),
                    agent.stderr()
                )
            })?;
            series.push(sample);
        }
        if Instant::now() >= next_progress {
            print_progress(world, workers, &samples, t);
            next_progress += PROGRESS_EVERY;
        }
        if t >= duration.as_secs_f64() {
            return Ok(samples);
        }
        due += every;
    }
}

/// One line of where the run is: each agent's latest sample and the load's totals so far.
fn print_progress(world: &World, workers: &[Worker], samples: &[Vec<Sample>], t: f64) {
    let agents: Vec<String> = world
        .agents
        .iter()
        .zip(samples)
        .filter_map(|((name, _), s)| s.last().map(|s| (name, s)))
        .map(|(name, s)| format!("{name} {} {} fds", Metric::Rss.show(s.rss_bytes as f64), s.fds))
        .collect();
    let stats: Vec<TargetStats> = workers.iter().filter_map(Worker::latest).flat_map(|p| p.targets).collect();
    let (conns, errors) = stats.iter().fold((0, 0), |(c, e), s| (c + s.connections, e + s.errors()));
    eprintln!("ferry-soak: {t:.0} s: {}; load {conns} connections, {errors} errors", agents.join(", "));
}

/// Judges the run: growth per agent and metric, errors per path.
fn summarize(
    world: &World,
    samples: &[Vec<Sample>],
    reports: &[TargetStats],
    duration: Duration,
    warmup: Duration,
    every: Duration,
) -> Result<Summary> {
    let mut failures = Vec::new();
    let mut load = Vec::new();
    for path in &world.paths {
        let stats = reports
            .iter()
            .find(|s| s.name == path.target.name)
            .cloned()
            .with_context(|| format!("no report of path {}", path.target.name))?;
        if stats.errors() > 0 {
            failures.push(format!(
                "load path {} ({}): {} errors ({} failed connects, {} broken connections, \
                 {} wrong answers); first: {}",
                stats.name,
                path.what,
                stats.errors(),
                stats.connect_failures,
                stats.broken,
                stats.mismatches,
                stats.messages.join("; ")
            ));
        } else if stats.requests == 0 {
            failures.push(format!("load path {} ({}): no request was answered", stats.name, path.what));
        }
        load.push(PathSummary { what: path.what, via: path.via, stats });
    }
    let mut agents = Vec::new();
    for ((name, agent), series) in world.agents.iter().zip(samples) {
        let rss = watch::trend(series, Metric::Rss, warmup.as_secs_f64())?;
        let fds = watch::trend(series, Metric::Fds, warmup.as_secs_f64())?;
        for (metric, trend) in [(Metric::Rss, &rss), (Metric::Fds, &fds)] {
            failures.extend(watch::growth_failure(name, metric, trend));
        }
        let node = world.node(name);
        let after = counters(node).with_context(|| format!("scraping the metrics of agent {name}"))?;
        let idle = watch::sample(agent.pid(), duration.as_secs_f64()).with_context(|| {
            format!("agent {name} is gone after the load; its stderr:\n{}", agent.stderr())
        })?;
        let errors = load.iter().filter(|p| p.via.contains(name)).map(|p| p.stats.errors()).sum();
        agents.push(AgentSummary {
            name: name.to_string(),
            pid: agent.pid(),
            rss,
            rss_growth_pct: rss.growth() * 100.0,
            fds,
            fds_growth_pct: fds.growth() * 100.0,
            connections: after.opened as u64,
            bytes: after.bytes as u64,
            errors,
            agent_failed_connections: after.failed as u64,
            open_after_load: after.opened as i64 - after.closed as i64,
            fds_after_load: idle.fds,
        });
    }
    Ok(Summary {
        passed: failures.is_empty(),
        failures,
        duration_s: duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
        sample_every_s: every.as_secs(),
        window: watch::WINDOW,
        growth_limit_pct: watch::GROWTH_LIMIT * 100.0,
        bin_dir: std::env::var(BIN_DIR_ENV).unwrap_or_else(|_| "(beside ferry-soak)".into()),
        agents,
        load,
    })
}

/// Events of a failed run kept per agent: enough to see what happened around the end, while
/// a long run's whole file can be hundreds of megabytes.
const EVENTS_KEPT: usize = 5000;

/// Copies each agent's stderr to OUT/agent-NODE.stderr.log (the agents' directories go with the
/// world), and after a failure the last [`EVENTS_KEPT`] events to OUT/agent-NODE.events.jsonl.
fn keep_logs(out: &Path, world: &World, failed: bool) -> Result<()> {
    for (name, agent) in &world.agents {
        let stderr = out.join(format!("agent-{name}.stderr.log"));
        std::fs::write(&stderr, agent.stderr())
            .with_context(|| format!("cannot write {}", stderr.display()))?;
        let events = out.join(format!("agent-{name}.events.jsonl"));
        if failed {
            let text = std::fs::read_to_string(agent.events_path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(EVENTS_KEPT)..].join("\n") + "\n";
            std::fs::write(&events, tail).with_context(|| format!("cannot write {}", events.display()))?;
        } else if events.exists() {
            // A stale file from an earlier failed run would be mistaken for this run's.
            std::fs::remove_file(&events).with_context(|| format!("cannot remove {}", events.display()))?;
        }
    }
    Ok(())
}

/// Writes OUT/summary.json and OUT/samples.csv.
fn write(out: &Path, summary: &Summary, world: &World, samples: &[Vec<Sample>]) -> Result<()> {
    let json = serde_json::to_string_pretty(summary).context("serializing the summary")? + "\n";
    let mut csv = String::from("agent,t_s,rss_bytes,fds\n");
    for ((name, _), series) in world.agents.iter().zip(samples) {
        for s in series {
            csv.push_str(&format!("{name},{:.1},{},{}\n", s.t_s, s.rss_bytes, s.fds));
        }
    }
    for (file, text) in [("summary.json", json), ("samples.csv", csv)] {
        let path = out.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("ferry-soak: written to {}/summary.json and samples.csv", out.display());
    Ok(())
}

/// Bytes for people.
fn show_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.2} GiB", b / 1_073_741_824.0),
    }
}

/// Prints the summary's tables and verdict.
fn print(summary: &Summary) {
    let mib = |v: f64| Metric::Rss.show(v);
    println!(
        "\n{:<7} {:>10} {:>10} {:>10} {:>7} | {:>5} {:>5} {:>5} {:>7} | {:>9} {:>10} {:>6}",
        "agent",
        "RSS base",
        "RSS end",
        "RSS max",
        "growth",
        "fds",
        "end",
        "max",
        "growth",
        "conns",
        "bytes",
        "errors"
    );
    for a in &summary.agents {
        println!(
            "{:<7} {:>10} {:>10} {:>10} {:>6.1}% | {:>5.0} {:>5.0} {:>5.0} {:>6.1}% | {:>9} {:>10} {:>6}",
            a.name,
            mib(a.rss.baseline),
            mib(a.rss.end),
            mib(a.rss.max),
            a.rss_growth_pct,
            a.fds.baseline,
            a.fds.end,
            a.fds.max,
            a.fds_growth_pct,
            a.connections,
            show_bytes(a.bytes),
            a.errors
        );
    }
    println!(
        "\n{:<10} {:>8} {:>9} {:>5} {:>10} {:>8} {:>7} {:>7} {:>8}  via",
        "path", "conns", "requests", "bulk", "bytes", "connect", "broken", "wrong", "max ms"
    );
    for p in &summary.load {
        let s = &p.stats;
        println!(
            "{:<10} {:>8} {:>9} {:>5} {:>10} {:>8} {:>7} {:>7} {:>8.1}  {}",
            s.name,
            s.connections,
            s.requests,
            s.bulk_transfers,
            show_bytes(s.bytes),
            s.connect_failures,
            s.broken,
            s.mismatches,
            s.max_latency_ms,
            p.via.join(", ")
        );
    }
    for a in &summary.agents {
        println!(
            "after the load, agent {}: {} connections open by its counters, {} fds",
            a.name, a.open_after_load, a.fds_after_load
        );
    }
    if summary.passed {
        println!(
            "\nferry-soak: passed: no agent grew more than {:.0}% past its baseline and the load \
             saw no error",
            summary.growth_limit_pct
        );
    } else {
        println!("\nferry-soak: FAILED:");
        for f in &summary.failures {
            println!("  - {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_has_its_own_name_and_agents() {
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let paths = paths(addr, addr, addr, addr, addr);
        let mut names: Vec<&str> = paths.iter().map(|p| p.target.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), paths.len());
        assert!(paths.iter().all(|p| !p.via.is_empty()));
        assert_eq!(paths.iter().filter(|p| p.from_outsider).count(), 1);
        assert!(paths.iter().any(|p| p.target.wire == Wire::Http));
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(show_bytes(2048), "2.0 KiB");
        assert_eq!(show_bytes(3 << 20), "3.0 MiB");
        assert_eq!(show_bytes(5 << 30), "5.00 GiB");
    }

    #[test]
    fn the_command_line_has_a_worker_and_defaults() {
        let cli = Cli::try_parse_from(["ferry-soak"]).unwrap();
        assert_eq!((cli.minutes, cli.seconds, cli.sample_secs), (30, None, 3));
        let cli = Cli::try_parse_from(["ferry-soak", "--minutes", "2", "--out", "x"]).unwrap();
        assert_eq!((cli.minutes, cli.out), (2, PathBuf::from("x")));
        assert!(Cli::try_parse_from(["ferry-soak", "--minutes", "0"]).is_err());
        assert!(Cli::try_parse_from(["ferry-soak", "--minutes", "2", "--seconds", "60"]).is_err());
        let cli = Cli::try_parse_from(["ferry-soak", "worker", "--plan", "[]"]).unwrap();
        assert!(matches!(cli.worker, Some(Sub::Worker { plan }) if plan == "[]"));
    }
}
