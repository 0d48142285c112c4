//! What the admin API returns: one serde type per endpoint, shared by the server (which the daemon
//! feeds through [`AdminState`](super::AdminState)) and the CLI (which reads the same types back for
//! its tables), so the two cannot drift apart.
//!
//! Every type serializes to the JSON shown in its doc comment. Optional fields are `null` when
//! unknown. Socket addresses are `"IP:PORT"` strings (`"[V6]:PORT"` for IPv6), IPs are plain strings
//! and times are RFC 3339 UTC strings.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// `GET /status`: a summary of the agent.
///
/// ```json
/// {"version": "0.1.0", "commit": "0a2b440", "node": "node-a", "uptime_seconds": 3600,
///  "pods_enrolled": 3, "ready": true, "active_connections": 12, "log_level": "info"}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// The git commit it was built from, when known.
    #[serde(default)]
    pub commit: Option<String>,
    /// The node name from the mesh file.
    pub node: String,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// Pods currently enrolled (programs attached, listeners open).
    pub pods_enrolled: u64,
    /// The same answer as `GET /ready`.
    pub ready: bool,
    /// Connections the proxy is relaying right now.
    #[serde(default)]
    pub active_connections: u64,
    /// The current log filter, as `POST /log-level` last set it.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Authorization policies in force.
    #[serde(default)]
    pub policies: u64,
    /// Why the policies failed to load at start, when they did: every inbound connection is denied.
    #[serde(default)]
    pub policy_error: Option<String>,
}

/// A pod's inbound security mode, as the mesh file names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeView {
    /// Only mTLS from the mesh is accepted.
    Strict,
    /// mTLS from the mesh and plaintext from outside it.
    Permissive,
}

impl From<crate::config::Mode> for ModeView {
    fn from(mode: crate::config::Mode) -> Self {
        match mode {
            crate::config::Mode::Strict => ModeView::Strict,
            crate::config::Mode::Permissive => ModeView::Permissive,
        }
    }
}

impl ModeView {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            ModeView::Strict => "strict",
            ModeView::Permissive => "permissive",
        }
    }
}

/// One element of `GET /workloads` (a JSON array): a pod this node serves.
///
/// ```json
/// {"namespace": "default", "name": "client", "ips": ["10.0.0.5"], "mode": "strict",
///  "identity": "spiffe://cluster.local/ns/default/sa/client",
///  "programs": ["ferry_connect4", "ferry_connect6", "ferry_sockops", "ferry_sk_lookup"],
///  "enrolled": true, "netns": "/var/run/netns/client", "cgroup": "/sys/fs/cgroup/pods/client"}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadView {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Inbound security mode.
    pub mode: ModeView,
    /// SPIFFE ID the agent holds for the pod; `null` without a CA.
    #[serde(default)]
    pub identity: Option<String>,
    /// Names of the eBPF programs attached for this pod (empty when not enrolled).
    #[serde(default)]
    pub programs: Vec<String>,
    /// Whether the pod is enrolled right now.
    #[serde(default)]
    pub enrolled: bool,
    /// The pod's network namespace file.
    #[serde(default)]
    pub netns: Option<String>,
    /// The pod's cgroup directory.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The pod's Kubernetes UID, when it is found on the node by UID.
    #[serde(default)]
    pub uid: Option<String>,
    /// The node the pod runs on.
    #[serde(default)]
    pub node: Option<String>,
    /// Every address whose inbound SYNs are steered to the proxy: the listed ones and any other
    /// the pod's netns has (empty when not enrolled, or with iptables capture).
    #[serde(default)]
    pub steered_ips: Vec<IpAddr>,
    /// Addresses of the pod's netns left unsteered, with why.
    #[serde(default)]
    pub unsteered: Vec<String>,
    /// What the pod's app sees as its inbound clients' address: `client` (their real address) or
    /// `loopback` (the proxy's).
    #[serde(default)]
    pub app_source: Option<String>,
    /// Why the app sees loopback, when it does.
    #[serde(default)]
    pub app_source_note: Option<String>,
    /// Why a pod that should be enrolled is not (yet): the last attempt's error; retried with
    /// backoff.
    #[serde(default)]
    pub waiting: Option<String>,
}

/// One element of `GET /services` (a JSON array).
///
/// ```json
/// {"namespace": "default", "name": "web", "vips": ["10.96.0.10"],
///  "ports": [{"port": 80, "target_port": 8080}],
///  "endpoints": [{"pod": "default/web-1", "ips": ["10.0.1.7"], "active_connections": 2}]}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Service ports and the endpoint ports they forward to.
    pub ports: Vec<ServicePortView>,
    /// Endpoint pods.
    pub endpoints: Vec<EndpointView>,
}

/// A service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortView {
    /// The port on the VIPs.
    pub port: u16,
    /// The port on the endpoint pods.
    pub target_port: u16,
}

/// A service endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointView {
    /// "namespace/name" of the endpoint pod.
    pub pod: String,
    /// The pod's addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Connections this node's proxy has open to it (the balancer's load).
    #[serde(default)]
    pub active_connections: u64,
}

/// Where a certificate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// Valid and not yet due for renewal.
    Valid,
    /// Past half-life; renewal is being attempted (the old cert is still served).
    Renewing,
    /// Expired: the identity fails closed.
    Expired,
}

/// One element of `GET /certs` (a JSON array): a workload certificate the node holds.
///
/// ```json
/// {"identity": "spiffe://cluster.local/ns/default/sa/client", "serial": "5f:0a:91",
///  "not_before": "2026-05-20T10:00:00Z", "not_after": "2026-05-21T10:00:00Z",
///  "next_renewal": "2026-05-20T22:00:00Z", "state": "valid", "pods": ["default/client"]}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertView {
    /// The SPIFFE ID in the certificate.
    pub identity: String,
    /// Serial number, as colon-separated hex bytes.
    pub serial: String,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
    /// When the agent will next try to renew; `null` when no renewal is scheduled.
    #[serde(default)]
    pub next_renewal: Option<Timestamp>,
    /// Where the certificate stands.
    pub state: CertState,
    /// "namespace/name" of the pods using this identity.
    #[serde(default)]
    pub pods: Vec<String>,
}

/// Which way a connection goes, seen from the pod the agent serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The pod connected out.
    Outbound,
    /// Something connected to the pod.
    Inbound,
}

impl Direction {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// One element of `GET /connections` (a JSON array): a connection the proxy is relaying.
///
/// Byte counts follow Istio's TCP metrics: `bytes_received` is what the proxy read from the
/// connection's source (the request direction) and `bytes_sent` what it wrote back to the source
/// (the response direction).
///
/// ```json
/// {"id": 42, "direction": "outbound", "pod": "default/client", "src": "10.0.0.5:41234",
///  "original_dst": "10.96.0.10:80", "endpoint": "10.0.1.7:8080", "service": "default/web",
///  "source_identity": "spiffe://cluster.local/ns/default/sa/client",
///  "destination_identity": "spiffe://cluster.local/ns/default/sa/web",
///  "security": "mutual_tls", "bytes_sent": 5120, "bytes_received": 312, "age_seconds": 12.5}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    /// The proxy's connection id (the same as in the events file).
    pub id: u64,
    /// Outbound or inbound.
    pub direction: Direction,
    /// "namespace/name" of the pod on this node.
    pub pod: String,
    /// The connecting side's address.
    pub src: SocketAddr,
    /// The destination the application asked for.
    pub original_dst: SocketAddr,
    /// Where the proxy connected (a picked service endpoint); `null` until connected.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// "namespace/name" of the service whose VIP was the original destination.
    #[serde(default)]
    pub service: Option<String>,
    /// The source's SPIFFE ID, when known.
    #[serde(default)]
    pub source_identity: Option<String>,
    /// The destination's SPIFFE ID, when known.
    #[serde(default)]
    pub destination_identity: Option<String>,
    /// `"mutual_tls"` or `"none"` (Istio's `connection_security_policy`).
    #[serde(default)]
    pub security: Option<String>,
    /// What the connection carries: `tcp` (relayed opaque), `http/1.1` or `h2` (served by the HTTP
    /// layer).
    #[serde(default)]
    pub protocol: Option<String>,
    /// HTTP requests handled on it so far (0 for opaque TCP).
    #[serde(default)]
    pub requests: u64,
    /// Bytes written back to the source so far.
    pub bytes_sent: u64,
    /// Bytes read from the source so far.
    pub bytes_received: u64,
    /// Seconds since the connection was accepted.
    pub age_seconds: f64,
}

/// `GET /bpf`: the kernel side of the data path.
///
/// ```json
/// {"capture": "ebpf", "programs": [{"name": "ferry_connect4", "id": 41, "kind": "cgroup_sock_addr"}],
///  "pods": [{"pod": "default/client", "cgroup": "/sys/fs/cgroup/pods/client",
///            "links": [{"program": "ferry_connect4", "id": 7}],
///            "outbound_redirects": 10, "inbound_steers": 3}],
///  "maps": [{"name": "ORIG_DST_BY_COOKIE", "entries": 2, "max_entries": 65536}],
///  "counters": {"redirects": 10, "excluded_port": 1}}
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpfView {
    /// How the agent captures traffic: `"ebpf"`, or `"iptables"` (a sidecar: no programs, no maps).
    #[serde(default)]
    pub capture: String,
    /// Loaded programs.
    pub programs: Vec<BpfProgramView>,
    /// Per enrolled pod: its links and counters.
    pub pods: Vec<BpfPodView>,
    /// Maps and how full they are.
    pub maps: Vec<BpfMapView>,
    /// Node-wide counters by name.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// A loaded eBPF program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BpfProgramView {
    /// Program name in the object file.
    pub name: String,
    /// Kernel program id (as `bpftool prog show id N` takes it).
    pub id: u32,
    /// Program type, for example `"cgroup_sock_addr"`, `"sock_ops"`, `"sk_lookup"`.
    #[serde(default)]
    pub kind: Option<String>,
}

/// One pod's attachments and counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BpfPodView {
    /// "namespace/name".
    pub pod: String,
    /// The cgroup the cgroup programs are attached to.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Its bpf_links.
    pub links: Vec<BpfLinkView>,
    /// Outbound connects redirected to the proxy (kernel counter).
    #[serde(default)]
    pub outbound_redirects: u64,
    /// Inbound SYNs steered to the proxy (kernel counter).
    #[serde(default)]
    pub inbound_steers: u64,
}

/// A bpf_link attaching a program for a pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BpfLinkView {
    /// Program name.
    pub program: String,
    /// Kernel link id (as `bpftool link show id N` takes it).
    pub id: u32,
}

/// A map and its fill level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BpfMapView {
    /// Map name in the object file.
    pub name: String,
    /// Entries present now.
    pub entries: u64,
    /// Capacity, when the map has one.
    #[serde(default)]
    pub max_entries: Option<u64>,
}

/// How a traced connection would travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// HTTP/2 CONNECT over mTLS to the destination node's tunnel port.
    Hbone,
    /// Plain TCP from the proxy to the destination (outside the mesh, or no CA).
    Plaintext,
    /// Source and destination are on this node: spliced in-process, identity checks kept.
    Local,
    /// Not captured: the kernel connects the pod directly, without the proxy.
    Passthrough,
}

/// One entry of `GET /policies`: an AuthorizationPolicy, what it selects and how each rule is
/// enforced.
///
/// ```json
/// {"namespace": "demo", "name": "allow-client", "action": "ALLOW", "dry_run": false,
///  "source": "/etc/ferry/policies/demo.yaml#2", "selector": {"app": "echo"},
///  "workloads": ["demo/echo-1"], "rules": [{"index": 0, "enforcement": "L4"}]}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// ALLOW, DENY or AUDIT.
    pub action: String,
    /// Evaluated and logged, not enforced (`istio.io/dry-run`).
    pub dry_run: bool,
    /// The file and document it was read from (`FILE#N`).
    pub source: String,
    /// `selector.matchLabels`; `null` selects every workload in scope.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// The mesh's pods it selects (`namespace/name`).
    pub workloads: Vec<String>,
    /// Each rule and how it is enforced.
    pub rules: Vec<PolicyRuleView>,
}

/// One rule of a [`PolicyView`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRuleView {
    /// The rule's index in `spec.rules`.
    pub index: u32,
    /// `L4`, or for a rule with HTTP fields (decided per request on HTTP connections) what it does
    /// on a connection that is not HTTP: `needs HTTP: never matches` or `needs HTTP: denies the
    /// connection`.
    pub enforcement: String,
}

/// `GET /trace?src=SOURCE&dest=DEST`: what would happen if SOURCE (a pod, a SPIFFE ID or an IP)
/// connected to DEST (`IP:PORT` or `NAMESPACE/NAME:PORT`), and why.
///
/// ```json
/// {"pod": "default/client", "dest": "10.96.0.10:80", "captured": true,
///  "program": "ferry_connect4", "reason": "destination is not excluded",
///  "service": {"name": "default/web", "vip": "10.96.0.10:80", "target_port": 8080},
///  "endpoint": {"pod": "default/web-1", "address": "10.0.1.7:8080", "node": "node-b"},
///  "source_identity": "spiffe://cluster.local/ns/default/sa/client",
///  "destination_identity": "spiffe://cluster.local/ns/default/sa/web",
///  "transport": "hbone", "destination_mode": "strict", "allowed": true,
///  "notes": ["endpoint picked by power of two choices; a real connection may pick another"]}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceView {
    /// "namespace/name" of the source pod.
    pub pod: String,
    /// The destination traced.
    pub dest: SocketAddr,
    /// Whether the kernel programs would send the connect to the proxy.
    pub captured: bool,
    /// The program that decides (`ferry_connect4` or `ferry_connect6`).
    #[serde(default)]
    pub program: Option<String>,
    /// Why it is captured or not (an excluded port or CIDR, loopback, the pod not enrolled, ...).
    pub reason: String,
    /// The service whose VIP `dest` is, if any.
    #[serde(default)]
    pub service: Option<TraceServiceView>,
    /// The endpoint the proxy would pick.
    #[serde(default)]
    pub endpoint: Option<TraceEndpointView>,
    /// The source pod's SPIFFE ID.
    #[serde(default)]
    pub source_identity: Option<String>,
    /// The identity the destination must present.
    #[serde(default)]
    pub destination_identity: Option<String>,
    /// How the bytes would travel.
    #[serde(default)]
    pub transport: Option<Transport>,
    /// The destination pod's inbound mode, when it is in the mesh.
    #[serde(default)]
    pub destination_mode: Option<ModeView>,
    /// Whether it would get through (`null` when it is unknown).
    #[serde(default)]
    pub allowed: Option<bool>,
    /// The authorization decision at the destination: `allow` or `deny` (`null` when the
    /// destination is outside the mesh, or the connection never reaches policy).
    #[serde(default)]
    pub decision: Option<String>,
    /// The deciding policy (`namespace/name`), `null` when none decided.
    #[serde(default)]
    pub policy: Option<String>,
    /// The deciding rule's index.
    #[serde(default)]
    pub rule: Option<u32>,
    /// The decision in a sentence.
    #[serde(default)]
    pub decision_reason: Option<String>,
    /// What the dry-run policies would decide, when any selects the destination.
    #[serde(default)]
    pub dry_run: Option<TraceDryRunView>,
    /// The HTTP request decided, when the trace was given one (an L7 decision).
    #[serde(default)]
    pub request: Option<TraceRequestView>,
    /// Every policy of the destination's namespace and the root namespace, and why it matched or
    /// not.
    #[serde(default)]
    pub policies: Vec<crate::policy::Considered>,
    /// Further explanations, one sentence each.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The HTTP request of an L7 trace, as policy saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequestView {
    /// The method.
    pub method: String,
    /// The path as given.
    pub path: String,
    /// The path after the configured normalization (Istio's BASE by default): what policy matches and the app receives.
    pub normalized_path: String,
    /// The authority.
    pub host: String,
}

/// The dry-run side of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceDryRunView {
    /// `allow` or `deny`.
    pub decision: String,
    /// The deciding policy.
    #[serde(default)]
    pub policy: Option<String>,
    /// The deciding rule.
    #[serde(default)]
    pub rule: Option<u32>,
}

/// The service side of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceServiceView {
    /// "namespace/name".
    pub name: String,
    /// The VIP and port matched.
    pub vip: SocketAddr,
    /// The endpoint port it forwards to.
    pub target_port: u16,
}

/// The endpoint side of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceEndpointView {
    /// "namespace/name" of the endpoint pod, when it is in the mesh.
    #[serde(default)]
    pub pod: Option<String>,
    /// Where the proxy would connect.
    pub address: SocketAddr,
    /// The node serving the endpoint, when known.
    #[serde(default)]
    pub node: Option<String>,
}

/// A UTC point in time with second precision, written as RFC 3339 (`"2026-05-20T10:00:00Z"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// From seconds since the Unix epoch.
    pub fn from_unix_seconds(seconds: i64) -> Self {
        Self(seconds)
    }

    /// From a system time (sub-second precision is dropped).
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix_seconds(self) -> i64 {
        self.0
    }

    /// RFC 3339, or the raw seconds for a time outside what RFC 3339 can write.
    pub fn to_rfc3339(self) -> String {
        OffsetDateTime::from_unix_timestamp(self.0)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| self.0.to_string())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339)
            .map(|t| Self(t.unix_timestamp()))
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trips_as_rfc3339() {
        let t = Timestamp::from_unix_seconds(1_779_271_200);
        let json = serde_json::to_string(&t).expect("serialize");
        assert_eq!(json, "\"2026-05-20T10:00:00Z\"");
        let back: Timestamp = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, t);
        let err = serde_json::from_str::<Timestamp>("\"yesterday\"").expect_err("not a time");
        assert!(err.to_string().contains("not an RFC 3339 time"), "{err}");
    }

    #[test]
    fn enums_use_the_documented_names() {
        let v = serde_json::to_value([Direction::Outbound, Direction::Inbound]).expect("json");
        assert_eq!(v, serde_json::json!(["outbound", "inbound"]));
        let v =
            serde_json::to_value((ModeView::Strict, CertState::Renewing, Transport::Hbone)).expect("json");
        assert_eq!(v, serde_json::json!(["strict", "renewing", "hbone"]));
        assert_eq!(ModeView::from(crate::config::Mode::Permissive), ModeView::Permissive);
    }

    #[test]
    fn optional_fields_may_be_missing() {
        let w: WorkloadView = serde_json::from_value(serde_json::json!({
            "namespace": "d", "name": "a", "ips": ["10.0.0.1"], "mode": "permissive"
        }))
        .expect("minimal workload");
        assert_eq!(w.identity, None);
        assert!(w.programs.is_empty() && !w.enrolled);
    }
}
