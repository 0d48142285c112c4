//! `ferry run`: adopt (or load and pin) the programs, enroll the node's pods, proxy until told to
//! stop, and leave the pinned datapath behind, so no stop ever opens a bypass. With `capture.mode = "iptables"` it is a classic sidecar instead:
//! started inside its pod's netns (with the group id the pod's rules exempt), it loads no programs
//! and relies on the pod's REDIRECT rules.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    admin::{AdminServer, health::HealthServer, log_level::LogControl},
    bpf::{Datapath, loader::CaptureParams},
    config::CaptureMode,
    enroll::discover::Host,
    events::EventSink,
    handoff::{Inherited, giver, taker, wire::WireListener},
    introspect::Introspect,
    kubernetes::KubeSource,
    metrics::{BuildInfo, Metrics, MetricsServer},
    proxy::{MeshState, ProxyPorts, ProxyShared, Sinks, mtls::Mtls, orig_dst::OrigDst},
    reconcile::NodeState,
    sources::{Initial, Sources},
};

/// Options of `ferry run`.
#[derive(Clone)]
pub struct RunOptions {
    /// The mesh file.
    pub config: PathBuf,
    /// Where to append JSON-lines events, if anywhere.
    pub events: Option<PathBuf>,
    /// Where to append the access log (one JSON line per connection), if anywhere.
    pub access_log: Option<PathBuf>,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// The Prometheus endpoint's address (in the node's netns).
    pub metrics_addr: std::net::SocketAddr,
    /// The kubelet probes' endpoint (in the node's netns).
    pub health_addr: std::net::SocketAddr,
    /// The host's /proc, where pods given by UID are looked for.
    pub host_proc: PathBuf,
    /// The host's cgroup2 root; `None`: the cgroup2 mount in the agent's /proc/self/mounts.
    pub cgroup_root: Option<PathBuf>,
    /// Follow the Kubernetes API (pods, services, Istio's policies) instead of the mesh file's
    /// pods and services; `config` is then the settings file.
    pub kubernetes: bool,
    /// This node's name (with `kubernetes`: the pods it enrolls are those scheduled here).
    pub node: Option<String>,
    /// The cgroup whose processes' connects to pods are the kubelet's probes (default: the
    /// cgroup2 root, so every process of the node's netns).
    pub probe_cgroup: Option<PathBuf>,
    /// Where the datapath is pinned (on bpffs).
    pub bpf_root: PathBuf,
    /// After handing over, exit at the latest this long after (default: when nothing is left).
    pub drain_deadline: Option<Duration>,
    /// Changes the log filter at run time (`ferry log-level`).
    pub log: Option<LogControl>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // An invalid mesh file stops us here, before anything touches the kernel. Invalid policies do
    // not: the node starts denying every inbound connection until they are fixed (fail closed).
    let (feed, config, policies) = if opts.kubernetes {
        let node =
            opts.node.clone().context("--kubernetes needs --node (the DaemonSet passes spec.nodeName)")?;
        let source =
            KubeSource::start(&opts.config, &node).await.context("starting the Kubernetes source")?;
        let config = source.initial().context("invalid settings file")?;
        (Feed::Kubernetes(Box::new(source)), config, Ok(Vec::new()))
    } else {
        let Initial { sources, config, policies } =
            Sources::load(&opts.config).context("invalid mesh file")?;
        (Feed::File(Box::new(sources)), config, policies)
    };
    if let Some(effective) = crate::privileges::effective() {
        for cap in crate::privileges::missing(effective) {
            tracing::warn!(
                capability = cap.name,
                needed_for = cap.why,
                "capability missing; what needs it will fail"
            );
        }
    }
    let events = EventSink::open(opts.events.as_deref())
        .with_context(|| format!("opening events file {:?}", opts.events))?;
    let access_log = EventSink::open(opts.access_log.as_deref())
        .with_context(|| format!("opening access log {:?}", opts.access_log))?;
    let metrics = Arc::new(Metrics::new(&BuildInfo::current()).context("setting up metrics")?);
    // An agent serving the node already: this one takes over from it (an upgrade), on the same
    // listening sockets, and only once it is ready.
    let handoff_path = crate::handoff::socket_path(&opts.admin_socket);
    let (taker, inherited) = match taker::connect(&handoff_path).await {
        Ok(Some((taker, inherited))) => {
            tracing::info!(socket = %handoff_path.display(), "an agent serves this node: taking over from it");
            (Some(taker), inherited)
        }
        Ok(None) => (None, Inherited::default()),
        Err(e) => return Err(anyhow::Error::new(e).context("taking over from the serving agent")),
    };
    // Bind the operator endpoints before touching the kernel: a second agent that is not taking
    // over fails here. One taking over binds the admin socket only once it has.
    let admin = match taker {
        None => Some(AdminServer::bind(&opts.admin_socket).await.context("starting the admin API")?),
        Some(_) => None,
    };
    let metrics_server = match inherited.take_operator("metrics") {
        Some(l) => MetricsServer::from_std(l).context("serving the inherited metrics endpoint")?,
        None => MetricsServer::bind(opts.metrics_addr).await.context("starting the metrics endpoint")?,
    };
    let health_server = match inherited.take_operator("health") {
        Some(l) => HealthServer::from_std(l).context("serving the inherited health endpoint")?,
        None => HealthServer::bind(opts.health_addr).await.context("starting the health endpoint")?,
    };
    let operator_fds = [("metrics", metrics_server.listener_fd()), ("health", health_server.listener_fd())];
    // Identities before the kernel: a bad CA directory must not leave half an agent behind.
    let mtls = match &config.ca {
        Some(ca) => Some(Mtls::start(ca, &config).context("setting up workload identities")?),
        None => {
            tracing::warn!("the mesh file names no CA: no identities, no mTLS, no inbound tunnel");
            None
        }
    };
    let capture = &config.capture;
    let params = CaptureParams {
        outbound_port: capture.outbound_port,
        inbound_port: capture.inbound_port,
        tunnel_port: capture.tunnel_port,
        exclude_ports: capture.exclude_ports.clone(),
        exclude_cidrs: capture.exclude_cidrs.iter().map(|n| (n.network(), n.prefix_len())).collect(),
    };
    let ports = ProxyPorts {
        outbound: capture.outbound_port,
        inbound: capture.inbound_port,
        tunnel: capture.tunnel_port,
    };
    let (datapath, orig_dst) = match capture.mode {
        CaptureMode::Ebpf => {
            let pins = crate::bpf::PinRoot::open(&opts.bpf_root)
                .with_context(|| format!("opening the pin root {}", opts.bpf_root.display()))?;
            for other in pins.other_versions() {
                tracing::warn!(path = %other.display(), "pins of another layout version are left alone (ferry uninstall removes them)");
            }
            let (datapath, table) = Datapath::load(&params, pins).context("loading eBPF programs")?;
            if datapath.adopted() {
                tracing::info!("adopted the pinned datapath");
            }
            (Some(datapath), OrigDst::Ebpf(table))
        }
        CaptureMode::Iptables => {
            tracing::info!("capture mode iptables: no eBPF programs; the pods' REDIRECT rules capture");
            (None, OrigDst::Netfilter)
        }
    };
    let capture_mode = capture.mode;
    let program_ids = datapath.as_ref().map(Datapath::program_ids).unwrap_or_default();
    let sinks = Sinks { events, access_log, metrics: metrics.clone() };
    let policies = policies.map_err(|e| {
        let error = e.to_string();
        tracing::error!(%error, "policies rejected at start: every inbound connection is denied until they are fixed");
        sinks.events.emit(json!({ "event": "policies_rejected", "error": error }));
        error
    });
    let policy_count = policies.as_ref().map_or(0, Vec::len);
    let shared = Arc::new(ProxyShared::new(orig_dst, sinks, ports, mtls, MeshState::new(config, policies)));
    if taker.is_some() {
        // The serving agent accepts alone until this one is ready and takes over.
        shared.handoff.stand_by();
    }
    let host = match Host::at(opts.host_proc.clone(), opts.cgroup_root.clone()) {
        Ok(host) => Some(host),
        Err(e) => {
            tracing::warn!(error = %e, "pods given by UID cannot be found on this node");
            None
        }
    };
    let mut datapath = datapath;
    let probe_addresses = match &mut datapath {
        Some(dp) => {
            enable_probes(dp, opts.probe_cgroup.clone().or_else(|| host.as_ref().map(|h| h.cgroup2.clone())))
        }
        None => None,
    };
    let node = Arc::new(NodeState::new(datapath, shared.clone(), host).with_inherited(inherited));
    if matches!(feed, Feed::Kubernetes(_)) {
        // Not ready until the caches have been listed and applied once.
        node.set_synced(false);
    }
    let counter_node = node.clone();
    metrics.set_bpf_source(Arc::new(move || Introspect::bpf_redirects(&counter_node)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx_admin = stop_rx.clone();
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let introspect = Arc::new(Introspect::new(node.clone(), opts.log.clone(), opts.config.clone()));
    let admin_task =
        admin.map(|admin| tokio::spawn(admin.serve(introspect.clone(), stopped(stop_rx.clone()))));
    let health_task = tokio::spawn(health_server.serve(introspect.clone(), stopped(stop_rx.clone())));
    let metrics_task = tokio::spawn(metrics_server.serve(metrics.clone(), stopped(stop_rx)));
    // A pod that cannot be enrolled waits for its retry; it never keeps the others (or the agent)
    // from starting. Readiness says whether everything is enrolled.
    let pods = node.enroll_all().await;
    // Before "ready": from then on a SIGTERM means a clean shutdown, never the default (fatal) action.
    let shutdown = ShutdownSignals::install()?;
    let mut admin_task = admin_task;
    // Watching before taking over: with Kubernetes, the first sync says which pods there are.
    let watcher = tokio::spawn(watch(feed, node.clone()));
    if let Some(taker) = taker {
        // Every pod served here first: a new agent that cannot become ready leaves the old one
        // serving (this one exits, and the old one never stopped).
        // Giving up releases, never unenrolls: the pods' addresses stay steered to the listeners
        // this agent shares with the serving one.
        let waited = wait_until_enrolled(&node, || taker.serving_agent_gone()).await;
        let taken = match waited {
            Err(e) => {
                watcher.abort();
                node.shutdown().await;
                return Err(e);
            }
            Ok(Waited::ServingAgentGone) => {
                // Nobody else serves now: waiting longer would only keep the pods failing closed.
                tracing::warn!("the serving agent went away before the takeover; serving alone");
                shared.handoff.serve();
                None
            }
            Ok(Waited::Enrolled) => {
                // From here both agents accept from the shared queues until the old one stops at
                // TakeOver.
                shared.handoff.serve();
                match taker.take_over(&shared).await {
                    Ok(taken) => Some(taken),
                    Err(e) if e.serving_agent_gone() => {
                        tracing::warn!(error = %e, "the serving agent went away during the takeover; serving alone");
                        None
                    }
                    Err(e) => {
                        watcher.abort();
                        node.shutdown().await;
                        return Err(anyhow::Error::new(e).context("taking over from the serving agent"));
                    }
                }
            }
        };
        match taken {
            Some(taken) => {
                tracing::info!(?taken, "took over from the previous agent");
                shared.events.emit(json!({
                    "event": "took_over", "relays": taken.relays, "failed": taken.failed, "draining": taken.draining,
                }));
            }
            None => shared.events.emit(json!({ "event": "serving_agent_gone" })),
        }
        let admin =
            AdminServer::bind_replacing(&opts.admin_socket).await.context("starting the admin API")?;
        admin_task = Some(tokio::spawn(admin.serve(introspect.clone(), stopped(stop_rx_admin.clone()))));
    }
    // From now on this agent is the one a next one takes over from.
    let giver = start_giver(&handoff_path, node.clone(), operator_fds)?;
    shared.events.emit(json!({
        "event": "ready", "pods": pods, "capture": capture_mode.to_string(), "policies": policy_count,
        "programs": program_ids.iter().map(|(n, id)| json!({"name": n, "id": id})).collect::<Vec<_>>(),
    }));
    tracing::info!(pods, "ready");
    // Start-up parsed the eBPF object and the kernel's BTF and issued SVIDs: megabytes that are
    // free now but that the allocator would otherwise keep for the agent's whole life.
    crate::memory::release_free_heap();

    let (giver_task, giver_listener) = giver;
    let handed_to = tokio::select! {
        () = shutdown.wait() => None,
        wire = giver_task => wire.ok(),
    };
    // Wakes a blocked accept, whichever way this ends.
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&giver_listener.fd()),
        nix::sys::socket::Shutdown::Both,
    );
    tracing::info!(handing_over = handed_to.is_some(), "shutting down");
    watcher.abort();
    // The watcher holds a reference; wait until it is gone so dropping `node` releases for real.
    let _ = watcher.await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(health_task, metrics_task);
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    // The scrape hook holds a reference to the node state too.
    metrics.set_bpf_source(Arc::new(Vec::new));
    // Listeners close here (the next agent, if any, holds the same sockets).
    node.shutdown().await;
    if let Some(wire) = handed_to {
        hand_over(wire, &shared, opts.drain_deadline).await;
    }
    // The programs, maps and links stay pinned (`ferry uninstall` removes them): the pods fail
    // closed until the next agent serves them, and the kubelet's probes still reach them.
    drop(node);
    if let Some(addresses) = probe_addresses {
        addresses.keep();
    }
    shared.events.emit(json!({ "event": "shutdown" }));
    Ok(())
}

/// How often the mesh file and the policy files are checked for changes (and waiting pods
/// retried). Polling (rather than inotify) also sees files replaced by rename, as editors and
/// Kubernetes ConfigMap updates do.
const RELOAD_POLL: Duration = Duration::from_millis(500);

/// Where the desired state comes from.
enum Feed {
    /// The mesh file and its policy files.
    File(Box<Sources>),
    /// The Kubernetes API.
    Kubernetes(Box<KubeSource>),
}

async fn watch(feed: Feed, node: Arc<NodeState>) {
    match feed {
        Feed::File(sources) => watch_sources(*sources, node).await,
        Feed::Kubernetes(source) => watch_kubernetes(*source, node).await,
    }
}

/// Applies each desired state the Kubernetes source makes, through the same apply as the file's;
/// waiting pods are retried on their own schedule meanwhile.
async fn watch_kubernetes(mut source: KubeSource, node: Arc<NodeState>) {
    let retry = async {
        loop {
            tokio::time::sleep(RELOAD_POLL).await;
            node.retry_waiting().await;
        }
    };
    let apply = async {
        loop {
            let (desired, left) = source.next().await;
            for (pod, why) in &left {
                tracing::debug!(%pod, ?why, "pod on this node not in the mesh");
            }
            let result = match desired {
                Ok(desired) => node.apply(desired).await.map_err(anyhow::Error::new),
                Err(e) => Err(anyhow::Error::new(e)),
            };
            report_apply(&node, result);
            if !node.synced() {
                node.set_synced(true);
                node.shared.events.emit(json!({ "event": "synced", "source": "kubernetes" }));
            }
        }
    };
    tokio::join!(retry, apply);
}

/// Logs and records the outcome of one apply.
fn report_apply(node: &NodeState, result: anyhow::Result<crate::reconcile::ApplyReport>) {
    let events = &node.shared.events;
    match result {
        Ok(report) => {
            tracing::info!(?report, "configuration applied");
            events.emit(json!({ "event": "reloaded", "report": report }));
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::error!(%error, "change rejected; keeping the running config and policies");
            events.emit(json!({ "event": "reload_rejected", "error": error }));
        }
    }
}

/// Applies valid changes of the mesh file or of any policy file it names; an invalid change is
/// rejected whole and the running config and policies are kept.
async fn watch_sources(mut sources: Sources, node: Arc<NodeState>) {
    loop {
        tokio::time::sleep(RELOAD_POLL).await;
        node.retry_waiting().await;
        let current = node.shared.state();
        let Some(change) = sources.poll(&current.config) else { continue };
        drop(current);
        let result = match change {
            Ok(desired) => node.apply(desired).await.map_err(anyhow::Error::new),
            Err(e) => Err(anyhow::Error::new(e)),
        };
        if result.is_ok() {
            sources.commit();
        }
        report_apply(&node, result);
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed (a signal that arrives before
/// [`ShutdownSignals::wait`] is kept, not lost).
struct ShutdownSignals {
    term: Signal,
    int: Signal,
}

impl ShutdownSignals {
    /// Replaces the signals' default action, which would end the process without cleaning up.
    fn install() -> anyhow::Result<Self> {
        let term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        Ok(Self { term, int })
    }

    /// Returns once either signal arrived (or had arrived since [`ShutdownSignals::install`]).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// How long a taking-over agent waits for every pod to enroll before giving up (and leaving the
/// serving agent in charge).
const TAKE_OVER_WAIT: Duration = Duration::from_secs(30);
/// How often that wait looks again (pods, sync, the serving agent still there).
const TAKE_OVER_POLL: Duration = Duration::from_millis(100);

/// How a taking-over agent's wait for its pods ended.
enum Waited {
    /// Every pod is enrolled and the desired state known: take over.
    Enrolled,
    /// The serving agent exited or died meanwhile: serve alone (pods still waiting retry as
    /// after any start).
    ServingAgentGone,
}

/// Waits until the desired state is known (the Kubernetes caches synced) and no pod is waiting
/// for its enrollment, the watcher retrying them on their schedule meanwhile; or until `gone`
/// says the serving agent went away.
async fn wait_until_enrolled(node: &NodeState, gone: impl Fn() -> bool) -> anyhow::Result<Waited> {
    let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
    loop {
        let waiting = node.waiting();
        if waiting.is_empty() && node.synced() {
            return Ok(Waited::Enrolled);
        }
        if gone() {
            return Ok(Waited::ServingAgentGone);
        }
        if tokio::time::Instant::now() > deadline {
            let pods: Vec<&String> = waiting.keys().collect();
            anyhow::bail!(
                "not synced, or pods not enrolled, after {TAKE_OVER_WAIT:?} (waiting: {pods:?}); the serving agent stays in charge"
            );
        }
        tokio::time::sleep(TAKE_OVER_POLL).await;
    }
}

/// The handoff socket, and the task that resolves when an agent takes over from this one.
type Giver = (tokio::task::JoinHandle<crate::handoff::wire::Wire>, Arc<WireListener>);

fn start_giver(
    path: &std::path::Path,
    node: Arc<NodeState>,
    operator: [(&'static str, std::io::Result<std::os::fd::OwnedFd>); 2],
) -> anyhow::Result<Giver> {
    let listener = Arc::new(
        WireListener::bind(path)
            .with_context(|| format!("listening on the handoff socket {}", path.display()))?,
    );
    let operator: Vec<(String, std::os::fd::OwnedFd)> =
        operator.into_iter().filter_map(|(name, fd)| Some((name.to_owned(), fd.ok()?))).collect();
    let operator = Arc::new(operator);
    let offer = move || -> giver::OfferFuture {
        let node = node.clone();
        let operator = operator.clone();
        Box::pin(async move {
            let operator =
                operator.iter().filter_map(|(n, fd)| Some((n.clone(), fd.try_clone().ok()?))).collect();
            giver::Offer { operator, pods: node.listener_offer().await }
        })
    };
    let task = tokio::spawn(giver::wait_for_taker(listener.clone(), offer));
    Ok((task, listener))
}

/// How long a drained agent waits for its tunnel connections to close.
const TUNNELS_CLOSE: Duration = Duration::from_secs(5);

/// After `TakeOver`: moves the relays, then waits for what stays (tunnel streams, HTTP) to end, or
/// for the drain deadline.
async fn hand_over(wire: crate::handoff::wire::Wire, shared: &Arc<ProxyShared>, deadline: Option<Duration>) {
    let started = std::time::Instant::now();
    let moved = match giver::send_relays(wire, &shared.handoff, || shared.conns.len()).await {
        Ok(moved) => moved,
        Err(e) => {
            tracing::warn!(error = %e, "handing the relays over failed; the rest drain here");
            0
        }
    };
    let draining = shared.conns.len().max(shared.handoff.in_flight());
    tracing::info!(moved, draining, "handed over; draining");
    shared.events.emit(json!({
        "event": "handed_over", "relays": moved, "draining": draining,
        "handoff_ms": started.elapsed().as_secs_f64() * 1000.0,
    }));
    let end = deadline.map(|d| tokio::time::Instant::now() + d);
    // Every accepted connection, including those still being set up, and every relayed one.
    while !shared.conns.is_empty() || shared.handoff.in_flight() > 0 {
        if end.is_some_and(|end| tokio::time::Instant::now() >= end) {
            tracing::warn!(left = shared.conns.len(), "drain deadline reached; closing what is left");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Tunnel connections close gracefully (FIN, never a RST): pooled ones are told to close,
    // served ones end when their clients, told by the GOAWAY, close them.
    if let Some(mtls) = &shared.mtls {
        mtls.pool.close_all();
    }
    let quiet = tokio::time::Instant::now() + TUNNELS_CLOSE;
    loop {
        let pooled = shared.mtls.as_ref().map_or(0, |m| m.pool.live_connections());
        let open = pooled + crate::hbone::server::serving() + crate::hbone::linger::closing();
        if open == 0
            || tokio::time::Instant::now() >= quiet
            || end.is_some_and(|e| tokio::time::Instant::now() >= e)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.events.emit(json!({ "event": "drained", "left": shared.conns.len() }));
}

/// Lets the kubelet's probes reach STRICT pods: the probe source addresses on the node's loopback,
/// and the programs that bind the node's connects in `cgroup` to them. A failure is logged (probes
/// to STRICT pods are then refused); nothing else depends on it.
fn enable_probes(datapath: &mut Datapath, cgroup: Option<PathBuf>) -> Option<crate::probes::SourceAddresses> {
    let Some(cgroup) = cgroup else {
        tracing::warn!("no cgroup2 root known: the kubelet's probes to STRICT pods are refused");
        return None;
    };
    let result = (|| -> anyhow::Result<crate::probes::SourceAddresses> {
        let addresses =
            crate::probes::SourceAddresses::add().context("adding the probe source to loopback")?;
        let host_netns = crate::enroll::netns::netns_cookie().context("reading the node's netns cookie")?;
        datapath
            .enable_probes(&cgroup, host_netns, crate::probes::SOURCE_V4, crate::probes::SOURCE_V6)
            .with_context(|| format!("attaching the probe programs to {}", cgroup.display()))?;
        Ok(addresses)
    })();
    match result {
        Ok(addresses) => Some(addresses),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the kubelet's probes to STRICT pods are refused");
            None
        }
    }
}
