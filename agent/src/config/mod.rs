//! The standalone mesh file: a TOML description of the node, its capture settings, the pods and the
//! services, read into a validated model with the lookups the proxy makes per connection.
//!
//! ```toml
//! node = "node-a"
//! trust_domain = "cluster.local"
//!
//! [capture]
//! mode = "ebpf"   # or "iptables": a classic sidecar inside the pod's netns, no eBPF
//! exclude_ports = [22]
//! exclude_cidrs = ["169.254.0.0/16"]
//!
//! [datapath]
//! local_shortcut = true   # pod to pod on this node without the HBONE tunnel (default false)
//!
//! [http]
//! detect_timeout_ms = 100   # how long an undeclared port is watched for HTTP (default 100)
//! start_traceparent = true  # start a W3C trace context on requests without one (default true)
//! path_normalization = "BASE"   # or "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES" (Istio's names)
//!
//! [[pods]]
//! name = "client"
//! namespace = "demo"
//! service_account = "client"
//! netns = "/var/run/netns/client"
//! cgroup = "/sys/fs/cgroup/ferry/client"
//! ips = ["10.233.1.2"]
//! ports = [{ port = 9000, protocol = "tcp" }]   # Kubernetes appProtocol values
//!
//! [[services]]
//! name = "echo"
//! namespace = "demo"
//! vips = ["10.96.0.10"]
//! ports = [{ port = 80, target_port = 8080, protocol = "http" }]
//! endpoints = ["client"]
//! ```

mod error;
mod names;
mod schema;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub use error::{ConfigError, Location};

/// The trust domain of SPIFFE identities when the file names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The validated mesh file. Built only by [`MeshConfig::parse`] or [`MeshConfig::load`]; treat it as
/// read-only, since the lookup indexes are built once from the fields.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    /// This agent's node name: pods on it are local (enrolled).
    pub node: String,
    /// The SPIFFE trust domain of every identity in the mesh.
    pub trust_domain: String,
    /// What the kernel programs leave alone and where they steer the rest.
    pub capture: CaptureSettings,
    /// The embedded CA; without it the node has no identities, so no mTLS and no inbound tunnel.
    pub ca: Option<CaSettings>,
    /// How the proxy carries connections it handles at both ends.
    pub datapath: DatapathSettings,
    /// How the destination agent finds and handles HTTP.
    pub http: HttpSettings,
    /// The namespace whose AuthorizationPolicies apply mesh-wide.
    pub root_namespace: String,
    /// Policy files and directories (Istio AuthorizationPolicy YAML), in file order; relative paths
    /// are resolved against the mesh file's directory by [`MeshConfig::parse_file`].
    pub policies: Vec<PathBuf>,
    /// Every pod of the mesh, local or not, in file order.
    pub pods: Vec<Pod>,
    /// Every service of the mesh, in file order.
    pub services: Vec<Service>,
    index: Index,
}

/// Lookup tables built at parse time; the values are indexes into `pods` and `services`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Index {
    pod_by_ip: HashMap<IpAddr, usize>,
    /// (service index, port index) by VIP and service port.
    service_by_vip: HashMap<SocketAddr, (usize, usize)>,
}

/// Capture settings shared by every local pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSettings {
    /// How the pods' connections reach the proxy.
    pub mode: CaptureMode,
    /// Destination ports never captured (SSH, say).
    pub exclude_ports: Vec<u16>,
    /// Destination networks never captured.
    pub exclude_cidrs: Vec<ipnet::IpNet>,
    /// The in-pod listener that outbound connects are steered to.
    pub outbound_port: u16,
    /// The in-pod plaintext listener that inbound connections are steered to.
    pub inbound_port: u16,
    /// The in-pod HBONE (mTLS tunnel) listener on the pod IP.
    pub tunnel_port: u16,
    /// Whether the agent's connection to an app carries the client's real address (transparent
    /// inbound, eBPF capture only); `false` shows the app the proxy on loopback.
    pub original_source: bool,
}

/// SVID lifetime when the file names none: 24 hours.
pub const DEFAULT_SVID_TTL_SECONDS: u64 = 86_400;

/// `[ca]`: where this node's intermediate CA lives and how long SVIDs last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    /// The node CA directory written by `ferry ca issue-node` (ca.pem, ca.key, root.pem).
    pub dir: PathBuf,
    /// SVID lifetime; renewal happens at half of it.
    pub svid_ttl_seconds: u64,
}

/// `[datapath]`: optional shortcuts the proxy may take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathSettings {
    /// Connections between two pods enrolled on this node skip the HBONE tunnel: the proxy, which
    /// holds both identities, connects to the destination app from inside its netns.
    pub local_shortcut: bool,
}

/// `[http]`: protocol detection and request handling at the destination agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// How long the first bytes of a connection to an undeclared port are awaited to tell HTTP from
    /// opaque TCP; a server-first protocol is delayed by at most this.
    pub detect_timeout: std::time::Duration,
    /// Whether a request without a W3C `traceparent` gets one.
    pub start_traceparent: bool,
    /// Istio's `meshConfig.pathNormalization`: how paths are normalized before policy and the app.
    pub path_normalization: crate::http::path::Normalization,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            detect_timeout: std::time::Duration::from_millis(100),
            start_traceparent: true,
            path_normalization: crate::http::path::Normalization::Base,
        }
    }
}

/// A port's application protocol, as Kubernetes' `appProtocol` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// HTTP/1.1 (`http`).
    Http,
    /// HTTP/2 with prior knowledge (`http2`, `kubernetes.io/h2c`).
    Http2,
    /// gRPC: HTTP/2 with trailers (`grpc`).
    Grpc,
    /// Opaque TCP, never inspected (`tcp`).
    Tcp,
}

impl AppProtocol {
    /// Reads an `appProtocol` value; `None` for one Ferry does not know.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "http" => AppProtocol::Http,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            _ => return None,
        })
    }

    /// The `appProtocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }

    /// Whether the port carries HTTP of either version.
    pub fn is_http(self) -> bool {
        self != AppProtocol::Tcp
    }
}

impl fmt::Display for AppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the connections of local pods are sent to the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CaptureMode {
    /// The agent's eBPF programs steer the pods' sockets (connect4/6 redirect, sk_lookup steering).
    #[default]
    Ebpf,
    /// iptables REDIRECT rules in the pod's netns send the traffic, as for a classic sidecar: the
    /// agent loads no programs and reads original destinations with `SO_ORIGINAL_DST`.
    Iptables,
}

impl fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaptureMode::Ebpf => "ebpf",
            CaptureMode::Iptables => "iptables",
        })
    }
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            mode: CaptureMode::Ebpf,
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            original_source: true,
        }
    }
}

/// A workload of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The pod's name, unique in its namespace.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The service account that its SPIFFE identity names.
    pub service_account: String,
    /// The node it runs on.
    pub node: String,
    /// Its network namespace file; present for local pods, unless `uid` is.
    pub netns: Option<PathBuf>,
    /// Its cgroup v2 directory; present for local pods when capture is eBPF, unless `uid` is.
    pub cgroup: Option<PathBuf>,
    /// Its Kubernetes UID: a local pod given by UID has its netns and cgroup found on the node
    /// (from /proc and the cgroup2 mount) when it is enrolled.
    pub uid: Option<String>,
    /// Its IPv4 address, if it has one.
    pub ipv4: Option<Ipv4Addr>,
    /// Its IPv6 address, if it has one.
    pub ipv6: Option<Ipv6Addr>,
    /// Whether it also accepts plaintext from outside the mesh.
    pub mode: Mode,
    /// Its labels, for policy selectors (`selector.matchLabels`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Ports whose protocol is declared (`ports = [{ port, protocol }]`).
    pub ports: Vec<(u16, AppProtocol)>,
}

impl Pod {
    /// "namespace/name", unique in the mesh.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the pod runs on `node`.
    pub fn is_local(&self, node: &str) -> bool {
        self.node == node
    }

    /// Its addresses, IPv4 first.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4.map(IpAddr::V4).into_iter().chain(self.ipv6.map(IpAddr::V6))
    }
}

/// A pod's inbound security mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only mTLS from the mesh; plaintext inbound is refused.
    Strict,
    /// mTLS from the mesh and plaintext from outside it.
    #[default]
    Permissive,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Strict => "strict",
            Mode::Permissive => "permissive",
        })
    }
}

/// A service: virtual IPs and ports balanced over pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service's name, unique in its namespace.
    pub name: String,
    /// The service's namespace.
    pub namespace: String,
    /// Its virtual addresses.
    pub vips: Vec<IpAddr>,
    /// Its ports, each unique in the service.
    pub ports: Vec<ServicePort>,
    /// Its endpoints, as indexes into [`MeshConfig::pods`].
    pub endpoints: Vec<usize>,
}

impl Service {
    /// "namespace/name", unique in the mesh.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service port and the endpoint port it forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// The port clients connect to on a VIP.
    pub port: u16,
    /// The port on the endpoint pods.
    pub target_port: u16,
    /// The declared protocol (`appProtocol`), if any.
    pub protocol: Option<AppProtocol>,
}

impl MeshConfig {
    /// Parses and validates the text of a mesh file.
    pub fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
        validate::validate(schema::read(text)?)
    }

    /// Reads, parses and validates the mesh file at `path`; errors name the file.
    pub fn load(path: &Path) -> Result<MeshConfig, ConfigError> {
        Self::parse_file(path, &Self::read_file(path)?)
    }

    /// Reads the mesh file's text, so a watcher can compare against exactly what was applied.
    pub fn read_file(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            kind: e.kind(),
            message: e.to_string(),
        })
    }

    /// Parses and validates `text`, read from `path`; errors name the file.
    pub fn parse_file(path: &Path, text: &str) -> Result<MeshConfig, ConfigError> {
        let mut config =
            Self::parse(text).map_err(|e| ConfigError::File { path: path.to_owned(), cause: Box::new(e) })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for source in &mut config.policies {
            if source.is_relative() {
                *source = dir.join(&*source);
            }
        }
        Ok(config)
    }

    /// The pods on this node, which the agent enrolls.
    pub fn local_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(|p| p.is_local(&self.node))
    }

    /// The pod with address `ip` (an IPv4-mapped IPv6 address finds the IPv4 pod).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.index.pod_by_ip.get(&ip.to_canonical()).and_then(|&i| self.pods.get(i))
    }

    /// The service and service port at `vip`:`port` (an IPv4-mapped IPv6 address finds IPv4 VIPs).
    pub fn service_by_vip(&self, vip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let &(s, p) = self.index.service_by_vip.get(&SocketAddr::new(vip.to_canonical(), port))?;
        let service = self.services.get(s)?;
        Some((service, service.ports.get(p)?))
    }

    /// The declared protocol of `port` on `pod`: the pod's own declaration, else that of a service
    /// port forwarding to it; `None` when undeclared (the destination agent then detects).
    pub fn declared_protocol(&self, pod: &Pod, port: u16) -> Option<AppProtocol> {
        if let Some(&(_, protocol)) = pod.ports.iter().find(|(p, _)| *p == port) {
            return Some(protocol);
        }
        let index = self.pods.iter().position(|p| std::ptr::eq(p, pod))?;
        self.services
            .iter()
            .filter(|s| s.endpoints.contains(&index))
            .flat_map(|s| &s.ports)
            .find(|sp| sp.target_port == port && sp.protocol.is_some())
            .and_then(|sp| sp.protocol)
    }

    /// The endpoint pods of `service`.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        service.endpoints.iter().filter_map(|&i| self.pods.get(i))
    }
}

#[cfg(test)]
mod tests;
