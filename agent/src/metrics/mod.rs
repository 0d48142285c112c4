//! Prometheus metrics: Istio's L4 families under the `ferry_` prefix, the eBPF redirect counters
//! read from the kernel at scrape time, process metrics and build info, all in one registry.
//!
//! Label values are bounded by the mesh (workloads, services, identities); ports, addresses and
//! connection ids never become labels.

mod bpf;
pub mod requests;
pub mod server;

use std::{sync::Arc, time::Duration};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub use bpf::{BpfCounterSource, BpfRedirects, RedirectDirection};
pub use requests::{ConnRequests, RequestSample};
pub use server::{DEFAULT_ADDR, MetricsServer};

/// Istio's L4 label names, in the order [`ConnLabels::values`] returns them.
pub const CONN_LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_principal",
    "connection_security_policy",
    "request_protocol",
];

/// Labels of `ferry_authorization_denials_total`: Istio's names for the workload, plus the deciding
/// policy and the decision's reason.
pub const DENIAL_LABELS: [&str; 5] =
    ["reporter", "destination_workload", "destination_workload_namespace", "policy", "reason"];

/// Upper bounds of the connection duration histogram, in seconds: from a quick RPC to an hour-long
/// stream.
pub const DURATION_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0];

/// What Istio writes for a label it does not know.
pub const UNKNOWN: &str = "unknown";

/// Errors creating, registering or encoding metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A family could not be created or registered (a bug: names clash or are invalid).
    #[error("registering metric {name}")]
    Register {
        /// The family.
        name: &'static str,
        /// The cause.
        source: prometheus::Error,
    },
    /// The text exposition could not be written.
    #[error("encoding the metrics")]
    Encode(#[source] prometheus::Error),
    /// The metrics listener could not be bound.
    #[error("binding the metrics listener on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Which proxy reports a connection (Istio's `reporter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Reporter {
    /// The source pod's side (outbound).
    Source,
    /// The destination pod's side (inbound).
    Destination,
}

/// Istio's `connection_security_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SecurityPolicy {
    /// Mutual TLS with workload identities.
    MutualTls,
    /// Plaintext.
    None,
    /// Both pods on this node, joined by the agent over each pod's loopback without the tunnel
    /// (`[datapath] local_shortcut`). Not Istio's: claiming mutual_tls would be false (no handshake
    /// happened) and none would hide that both identities were known and nothing crossed a wire.
    NodeLocal,
    /// Not known (yet).
    Unknown,
}

/// Istio's `request_protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum RequestProtocol {
    /// Opaque TCP.
    Tcp,
    /// HTTP (1.1 or 2).
    Http,
    /// gRPC.
    Grpc,
}

/// The labels of one connection, Istio's L4 set.
///
/// Workloads are the pod's workload name (its owner, such as a Deployment, when known, else the pod
/// name), never an address. `destination_service` is the service as `NAMESPACE/NAME`, the way the
/// CLI and the access log name it (Istio writes the host `NAME.NAMESPACE.svc.DOMAIN`), or
/// [`UNKNOWN`] when the destination is not a service VIP. Principals are SPIFFE IDs or [`UNKNOWN`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConnLabels {
    /// Which side reports.
    pub reporter: Reporter,
    /// Source workload name.
    pub source_workload: String,
    /// Source workload namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE ID.
    pub source_principal: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination workload namespace.
    pub destination_workload_namespace: String,
    /// Destination service host.
    pub destination_service: String,
    /// Destination SPIFFE ID.
    pub destination_principal: String,
    /// mTLS or plaintext.
    pub connection_security_policy: SecurityPolicy,
    /// The protocol carried.
    pub request_protocol: RequestProtocol,
}

impl ConnLabels {
    /// Labels with every name set to [`UNKNOWN`], plaintext TCP: fill in what is known.
    pub fn unknown(reporter: Reporter) -> Self {
        Self {
            reporter,
            source_workload: UNKNOWN.to_owned(),
            source_workload_namespace: UNKNOWN.to_owned(),
            source_principal: UNKNOWN.to_owned(),
            destination_workload: UNKNOWN.to_owned(),
            destination_workload_namespace: UNKNOWN.to_owned(),
            destination_service: UNKNOWN.to_owned(),
            destination_principal: UNKNOWN.to_owned(),
            connection_security_policy: SecurityPolicy::Unknown,
            request_protocol: RequestProtocol::Tcp,
        }
    }

    /// The label values in [`CONN_LABELS`] order.
    pub fn values(&self) -> [&str; 10] {
        [
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_service,
            &self.destination_principal,
            match self.connection_security_policy {
                SecurityPolicy::MutualTls => "mutual_tls",
                SecurityPolicy::None => "none",
                SecurityPolicy::NodeLocal => "node_local",
                SecurityPolicy::Unknown => UNKNOWN,
            },
            match self.request_protocol {
                RequestProtocol::Tcp => "tcp",
                RequestProtocol::Http => "http",
                RequestProtocol::Grpc => "grpc",
            },
        ]
    }
}

/// What `ferry_build_info` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The crate version.
    pub version: String,
    /// The git commit, or "unknown".
    pub commit: String,
}

impl BuildInfo {
    /// This binary's version, and the commit from `FERRY_GIT_COMMIT` at build time if it was set.
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: option_env!("FERRY_GIT_COMMIT").unwrap_or(UNKNOWN).to_owned(),
        }
    }
}

/// The agent's metrics registry and families. Share it as `Arc<Metrics>`.
///
/// Count a connection one of two ways, never both: keep the handle from [`Metrics::opened`], add
/// bytes to it as they flow and call [`ConnMetrics::closed`] at the end; or, when only totals are
/// known at the end, call [`Metrics::closed`] with them.
pub struct Metrics {
    registry: Registry,
    opened: IntCounterVec,
    closed: IntCounterVec,
    failed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    duration: HistogramVec,
    denials: IntCounterVec,
    requests: requests::RequestFamilies,
    bpf: Arc<bpf::BpfCollector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates and registers every family, including process metrics and build info.
    pub fn new(build: &BuildInfo) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &'static str, help: &str| -> Result<IntCounterVec, MetricsError> {
            let family = IntCounterVec::new(Opts::new(name, help), &CONN_LABELS)
                .map_err(|source| MetricsError::Register { name, source })?;
            register(&registry, name, Box::new(family.clone()))?;
            Ok(family)
        };
        let opened = counter("ferry_tcp_connections_opened_total", "TCP connections opened.")?;
        let closed = counter("ferry_tcp_connections_closed_total", "TCP connections closed.")?;
        let failed = counter(
            "ferry_tcp_connections_failed_total",
            "TCP connections accepted that could not reach their destination.",
        )?;
        let sent = counter(
            "ferry_tcp_sent_bytes_total",
            "Bytes sent back to the connection's source (response direction).",
        )?;
        let received = counter(
            "ferry_tcp_received_bytes_total",
            "Bytes received from the connection's source (request direction).",
        )?;
        let name = "ferry_tcp_connection_duration_seconds";
        let duration = HistogramVec::new(
            HistogramOpts::new(name, "How long TCP connections stayed open.")
                .buckets(DURATION_BUCKETS.to_vec()),
            &CONN_LABELS,
        )
        .map_err(|source| MetricsError::Register { name, source })?;
        register(&registry, name, Box::new(duration.clone()))?;

        let name = "ferry_authorization_denials_total";
        let denials = IntCounterVec::new(
            Opts::new(name, "Connections denied by authorization policy at the destination."),
            &DENIAL_LABELS,
        )
        .map_err(|source| MetricsError::Register { name, source })?;
        register(&registry, name, Box::new(denials.clone()))?;

        let requests = requests::RequestFamilies::new(&registry)?;

        let bpf = Arc::new(bpf::BpfCollector::new()?);
        register(&registry, bpf::FAMILY, Box::new(bpf::Registered(bpf.clone())))?;

        let name = "ferry_build_info";
        let info =
            IntGaugeVec::new(Opts::new(name, "Always 1; labels name the build."), &["version", "commit"])
                .map_err(|source| MetricsError::Register { name, source })?;
        info.with_label_values(&[build.version.as_str(), build.commit.as_str()]).set(1);
        register(&registry, name, Box::new(info))?;

        let process = prometheus::process_collector::ProcessCollector::for_self();
        register(&registry, "process_*", Box::new(process))?;

        Ok(Self { registry, opened, closed, failed, sent, received, duration, denials, requests, bpf })
    }

    /// Resolves a connection's label values once; the handle then counts without lookups.
    pub fn connection(&self, labels: &ConnLabels) -> ConnMetrics {
        let values = labels.values();
        ConnMetrics {
            opened: self.opened.with_label_values(&values),
            closed: self.closed.with_label_values(&values),
            sent: self.sent.with_label_values(&values),
            received: self.received.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
        }
    }

    /// Counts an opened connection and returns its resolved handle.
    pub fn opened(&self, labels: &ConnLabels) -> ConnMetrics {
        let conn = self.connection(labels);
        conn.opened.inc();
        conn
    }

    /// Counts a closed connection with its lifetime and byte totals (one label lookup).
    pub fn closed(&self, labels: &ConnLabels, duration: Duration, sent: u64, received: u64) {
        let conn = self.connection(labels);
        conn.add_sent(sent);
        conn.add_received(received);
        conn.closed(duration);
    }

    /// Counts a connection that was accepted but never reached its destination (refused, timed out,
    /// denied). It is not counted as opened or closed.
    pub fn failed(&self, labels: &ConnLabels) {
        self.failed.with_label_values(&labels.values()).inc();
    }

    /// Counts a connection denied by policy: `policy` is the deciding `namespace/name` (empty when
    /// none decided, as for "no ALLOW matched"), `reason` the decision's reason label.
    pub fn denied(&self, labels: &ConnLabels, policy: &str, reason: &str) {
        let values = [
            "destination",
            labels.destination_workload.as_str(),
            labels.destination_workload_namespace.as_str(),
            policy,
            reason,
        ];
        self.denials.with_label_values(&values).inc();
    }

    /// Counts one finished HTTP request in Istio's request families.
    pub fn request(&self, sample: &RequestSample<'_>) {
        self.requests.observe(sample);
    }

    /// The request series of one connection with `labels`, resolved once per distinct outcome.
    pub fn requests_of(&self, labels: &ConnLabels) -> requests::ConnRequests {
        self.requests.for_connection(labels)
    }

    /// Counts a request the HTTP layer refused with 400 before policy, with the reason.
    pub fn rejected_request(&self, labels: &ConnLabels, reason: &str) {
        self.requests.rejected(labels, reason);
    }

    /// Sets where `ferry_bpf_redirects_total` is read from at each scrape (the datapath loads after
    /// the metrics exist); replaces any earlier source.
    pub fn set_bpf_source(&self, source: Arc<dyn BpfCounterSource>) {
        self.bpf.set_source(source);
    }

    /// The registry, for callers that add their own families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).map_err(MetricsError::Encode)?;
        // The text encoder only writes UTF-8 (names and escaped label values).
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

fn register(
    registry: &Registry,
    name: &'static str,
    collector: Box<dyn prometheus::core::Collector>,
) -> Result<(), MetricsError> {
    registry.register(collector).map_err(|source| MetricsError::Register { name, source })
}

/// One connection's counters, resolved from its labels once. Byte counts may be added per chunk:
/// each call is one atomic add.
#[derive(Clone, Debug)]
pub struct ConnMetrics {
    opened: IntCounter,
    closed: IntCounter,
    sent: IntCounter,
    received: IntCounter,
    duration: Histogram,
}

impl ConnMetrics {
    /// Adds bytes sent back to the source.
    pub fn add_sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// Adds bytes received from the source.
    pub fn add_received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    /// Counts the close and observes how long the connection lived.
    pub fn closed(&self, lifetime: Duration) {
        self.closed.inc();
        self.duration.observe(lifetime.as_secs_f64());
    }

    /// Counts the open, for a handle made with [`Metrics::connection`].
    pub fn opened(&self) {
        self.opened.inc();
    }
}

#[cfg(test)]
mod tests;
