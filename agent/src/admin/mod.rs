//! The admin API: read-only views of the agent plus log-level changes, served as JSON over HTTP/1.1
//! on a root-only Unix socket (never a TCP port, so pods cannot reach it).
//!
//! The daemon implements [`AdminState`]; [`AdminServer`] serves it. Endpoints (GET unless noted):
//!
//! | path | answer |
//! | --- | --- |
//! | `/status` | [`model::StatusView`] |
//! | `/config_dump` | the daemon's config as free-form JSON |
//! | `/workloads` | array of [`model::WorkloadView`] |
//! | `/services` | array of [`model::ServiceView`] |
//! | `/certs` | array of [`model::CertView`] |
//! | `/connections` | array of [`model::ConnectionView`] |
//! | `/bpf` | [`model::BpfView`] |
//! | `/ready` | `{"ready": bool}`, 200 when ready, 503 when not |
//! | `/live` | `{"live": true}` |
//! | `POST /log-level` | `level=` in the query or the body (or a JSON `{"level": ..}` body): `{"level": ..}` |
//! | `/policies` | array of [`model::PolicyView`] (500 when the policies failed to load at start) |
//! | `/trace?src=SOURCE&dest=DEST` | [`model::TraceView`]; SOURCE is `NS/NAME`, `spiffe://...` or an IP, DEST is `IP:PORT` or `NS/NAME:PORT` (`pod=` is the old name of `src=`) |
//!
//! The kubelet's probes have their own TCP endpoint, [`health`] (`/healthz/ready`, `/healthz/live`).
//!
//! Errors are `{"error": "message"}` with 400 (bad parameters), 404 (unknown path or pod),
//! 405 (wrong method), 500 (the daemon failed) or 503 (not ready).

pub mod health;
pub(crate) mod httpd;
pub mod log_level;
pub mod model;
pub mod query;
pub mod server;
#[cfg(test)]
pub(crate) mod test_support;

use std::net::{IpAddr, SocketAddr};

pub use server::{AdminServer, AdminServerError};

use model::{
    BpfView, CertView, ConnectionView, PolicyView, ServiceView, StatusView, TraceView, WorkloadView,
};

/// Where the agent serves the admin API unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ferry/admin.sock";

/// What the daemon exposes to the admin API. Methods run on a blocking thread, so they may take
/// locks or read eBPF maps; they should not wait on the network.
pub trait AdminState: Send + Sync + 'static {
    /// `GET /status`.
    fn status(&self) -> StatusView;
    /// `GET /config_dump`: the effective configuration, in any JSON shape.
    fn config_dump(&self) -> serde_json::Value;
    /// `GET /workloads`: the pods this node serves, enrolled or not.
    fn workloads(&self) -> Vec<WorkloadView>;
    /// `GET /services`.
    fn services(&self) -> Vec<ServiceView>;
    /// `GET /certs`: one entry per identity held.
    fn certs(&self) -> Vec<CertView>;
    /// `GET /connections`: connections being relayed now.
    fn connections(&self) -> Vec<ConnectionView>;
    /// `GET /bpf`: programs, links, map fill and counters (reads the kernel).
    fn bpf(&self) -> Result<BpfView, StateError>;
    /// `GET /ready`: programs loaded and every local pod enrolled.
    fn ready(&self) -> bool;
    /// `POST /log-level`: applies a directive the server has already checked with
    /// [`log_level::parse_directive`] (typically through [`log_level::LogControl::set`]).
    fn set_log_level(&self, directive: &str) -> Result<(), StateError>;
    /// `GET /policies`: every authorization policy, what it selects and how it is enforced.
    fn policies(&self) -> Result<Vec<PolicyView>, StateError>;
    /// `GET /trace`: what would happen if `src` connected to `dest` (and sent `request`, for an
    /// L7 decision).
    fn trace(
        &self,
        src: &TraceSource,
        dest: &TraceDest,
        request: Option<&TraceRequest>,
    ) -> Result<TraceView, StateError>;
}

/// An HTTP request to trace: the attributes an L7 decision reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceRequest {
    /// The method (`GET` when not given).
    pub method: String,
    /// The request target, normalized as the proxy would (`/` when not given).
    pub path: String,
    /// The authority (the destination address when not given).
    pub host: Option<String>,
    /// Request headers, in order.
    pub headers: Vec<(String, String)>,
}

/// Parses a `NAME:VALUE` header argument of a trace.
pub fn parse_trace_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once(':').ok_or_else(|| format!("header {text:?} is not NAME:VALUE"))?;
    let name = name.trim();
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("header {text:?}: {name:?} is not a header name"))?;
    let value = value.trim();
    http::HeaderValue::from_str(value).map_err(|_| format!("header {text:?}: the value is not valid"))?;
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

/// Who connects, in a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceSource {
    /// A pod of the mesh, `namespace/name`.
    Pod(String),
    /// A workload identity (an mTLS peer).
    Identity(crate::identity::SpiffeId),
    /// A plaintext client at this address.
    Address(IpAddr),
}

/// Where to, in a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceDest {
    /// An address and port (a pod IP, a service VIP, anything).
    Address(SocketAddr),
    /// A pod of the mesh (`namespace/name`) and the app's port.
    Pod(String, u16),
}

/// Parses a trace source: `NAMESPACE/NAME`, `spiffe://TRUST_DOMAIN/...` or an IP address.
pub fn parse_source(src: &str) -> Result<TraceSource, String> {
    if src.starts_with("spiffe://") {
        return crate::identity::SpiffeId::parse(src)
            .map(TraceSource::Identity)
            .map_err(|e| format!("source {src:?} is not a valid SPIFFE ID: {e}"));
    }
    if let Ok(ip) = src.parse::<IpAddr>() {
        return Ok(TraceSource::Address(ip));
    }
    check_pod_key(src)
        .map(|()| TraceSource::Pod(src.to_owned()))
        .map_err(|_| format!("source {src:?} is not NAMESPACE/NAME, a spiffe:// ID or an IP address"))
}

/// Parses a trace destination: `IP:PORT` (`[V6]:PORT` for IPv6) or `NAMESPACE/NAME:PORT`.
pub fn parse_trace_dest(dest: &str) -> Result<TraceDest, String> {
    if let Some((pod, port)) = dest.rsplit_once(':')
        && check_pod_key(pod).is_ok()
    {
        return match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(TraceDest::Pod(pod.to_owned(), p)),
            _ => Err(format!("destination {dest:?} needs a port in 1..65535 after the pod")),
        };
    }
    parse_dest(dest).map(TraceDest::Address).map_err(|e| format!("{e}, or NAMESPACE/NAME:PORT"))
}

/// A failure the daemon reports to the admin API; the variant picks the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Something named in the request does not exist (404), such as a pod not on this node.
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense for this agent (400).
    #[error("{0}")]
    Invalid(String),
    /// The daemon could not answer (500), such as a failed map read.
    #[error("{0}")]
    Failed(String),
}

/// Checks a pod key of the form `namespace/name`, as the trace endpoint and the CLI take it.
pub fn check_pod_key(key: &str) -> Result<(), String> {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(()),
        _ => Err(format!("pod {key:?} is not NAMESPACE/NAME")),
    }
}

/// Parses a trace destination `IP:PORT` (`[V6]:PORT` for IPv6), refusing port 0.
pub fn parse_dest(dest: &str) -> Result<SocketAddr, String> {
    match dest.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        Ok(_) => Err(format!("destination {dest:?} has port 0")),
        Err(_) => Err(format!("destination {dest:?} is not IP:PORT (write IPv6 as [ADDR]:PORT)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_keys() {
        assert!(check_pod_key("default/web").is_ok());
        for bad in ["web", "/web", "default/", "a/b/c", ""] {
            let e = check_pod_key(bad).expect_err(bad);
            assert!(e.contains("NAMESPACE/NAME"), "{e}");
        }
    }

    #[test]
    fn trace_sources_and_destinations() {
        assert_eq!(parse_source("demo/web"), Ok(TraceSource::Pod("demo/web".into())));
        assert!(matches!(parse_source("10.0.0.1"), Ok(TraceSource::Address(_))));
        assert!(matches!(parse_source("fd00::1"), Ok(TraceSource::Address(_))));
        assert!(matches!(parse_source("spiffe://td/ns/a/sa/b"), Ok(TraceSource::Identity(_))));
        assert!(parse_source("spiffe://").unwrap_err().contains("not a valid SPIFFE ID"));
        assert!(parse_source("web").unwrap_err().contains("NAMESPACE/NAME"));
        assert_eq!(parse_trace_dest("demo/web:8080"), Ok(TraceDest::Pod("demo/web".into(), 8080)));
        assert!(parse_trace_dest("demo/web:0").unwrap_err().contains("1..65535"));
        assert!(matches!(parse_trace_dest("[fd00::1]:80"), Ok(TraceDest::Address(_))));
        assert!(parse_trace_dest("web").unwrap_err().contains("NAMESPACE/NAME:PORT"));
    }

    #[test]
    fn destinations() {
        assert_eq!(parse_dest("10.0.0.1:80").expect("v4").port(), 80);
        assert!(parse_dest("[fd00::1]:443").expect("v6").is_ipv6());
        assert!(parse_dest("10.0.0.1:0").expect_err("port 0").contains("port 0"));
        assert!(parse_dest("10.0.0.1").expect_err("no port").contains("IP:PORT"));
        assert!(parse_dest("web:80").expect_err("name").contains("IP:PORT"));
    }
}
