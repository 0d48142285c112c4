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
    // Bind the operator endpoints before touching the kernel: a second agent fails here.
    let admin = AdminServer::bind(&opts.admin_socket).await.context("starting the admin API")?;
    let metrics_server =
        MetricsServer::bind(opts.metrics_addr).await.context("starting the metrics endpoint")?;
    let health_server = HealthServer::bind(opts.health_addr).await.context("starting the health endpoint")?;
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
    let node = Arc::new(NodeState::new(datapath, shared.clone(), host));
    if matches!(feed, Feed::Kubernetes(_)) {
        // Not ready until the caches have been listed and applied once.
        node.set_synced(false);
    }
    let counter_node = node.clone();
    metrics.set_bpf_source(Arc::new(move || Introspect::bpf_redirects(&counter_node)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let introspect = Arc::new(Introspect::new(node.clone(), opts.log.clone(), opts.config.clone()));
    let admin_task = tokio::spawn(admin.serve(introspect.clone(), stopped(stop_rx.clone())));
    let health_task = tokio::spawn(health_server.serve(introspect, stopped(stop_rx.clone())));
    let metrics_task = tokio::spawn(metrics_server.serve(metrics.clone(), stopped(stop_rx)));
    // A pod that cannot be enrolled waits for its retry; it never keeps the others (or the agent)
    // from starting. Readiness says whether everything is enrolled.
    let pods = node.enroll_all().await;
    // Before "ready": from then on a SIGTERM means a clean shutdown, never the default (fatal) action.
    let shutdown = ShutdownSignals::install()?;
    shared.events.emit(json!({
        "event": "ready", "pods": pods, "capture": capture_mode.to_string(), "policies": policy_count,
        "programs": program_ids.iter().map(|(n, id)| json!({"name": n, "id": id})).collect::<Vec<_>>(),
    }));
    tracing::info!(pods, "ready");
    // Start-up parsed the eBPF object and the kernel's BTF and issued SVIDs: megabytes that are
    // free now but that the allocator would otherwise keep for the agent's whole life.
    crate::memory::release_free_heap();

    let watcher = tokio::spawn(watch(feed, node.clone()));
    shutdown.wait().await;
    tracing::info!("shutting down");
    watcher.abort();
    // The watcher holds a reference; wait until it is gone so dropping `node` unloads for real.
    let _ = watcher.await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(admin_task, health_task, metrics_task);
    // The scrape hook holds a reference to the node state too.
    metrics.set_bpf_source(Arc::new(Vec::new));
    node.shutdown().await;
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
