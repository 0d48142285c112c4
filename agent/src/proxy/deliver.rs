//! The last step of every inbound path (plaintext, HBONE stream, node-local shortcut): an
//! authorized connection, with the app already dialled, is either relayed as opaque TCP or served by
//! the HTTP layer, which authorizes, counts and logs each request. A port declared `tcp` is never
//! inspected; an undeclared one is watched for HTTP for `[http] detect_timeout_ms`; bytes that are
//! not HTTP get the strict L4 decision, so no HTTP rule is bypassed by not speaking HTTP.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::BytesMut;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    PodContext, ProxyShared,
    authorize::AuthzSubject,
    conns::{Carried, ConnMeta},
    inbound::connect_to_app,
    relay::{CloseReason, RelayState},
};
use crate::{
    config::AppProtocol,
    handoff::relays::{Movable, Outcome, relay_movable},
    http::{
        detect::{Detected, detect},
        rewind::Rewind,
        server::{self, RequestHooks, RequestKind, RequestLog, Settings, Verdict},
        upstream::{AppConn, Dial, Upstream, Version},
    },
    metrics::{ConnLabels, ConnRequests, RequestProtocol, RequestSample},
    policy,
};

/// The declared protocol of `port` on `pod`, from the mesh file (the pod's ports, then services).
pub(super) fn declared(pod: &PodContext, port: u16) -> Option<AppProtocol> {
    let state = pod.shared.state();
    let config = &state.config;
    config
        .pods
        .iter()
        .find(|p| p.name == pod.name && p.namespace == pod.namespace)
        .and_then(|p| config.declared_protocol(p, port))
}

/// How an inbound connection ended, for paths that keep a second record (the shortcut).
pub(super) struct Delivered {
    /// Why it ended.
    pub reason: CloseReason,
    /// Bytes from the source, and back to it.
    pub bytes: (u64, u64),
}

/// Whether the app may be dialled before the first bytes are read: always, unless only HTTP could
/// let this connection through (an L7 ALLOW where the plain-TCP decision denies). Then the app is
/// dialled once the bytes are known to be HTTP, so a connection that ends up denied never reaches
/// it; a server-first protocol loses nothing, since such a connection is denied anyway.
pub(super) fn dial_early(shared: &ProxyShared, meta: &ConnMeta) -> bool {
    match &meta.subject {
        Some(subject) if subject.http => shared.allowed_as_tcp(subject),
        _ => true,
    }
}

/// Relays or serves `down` to the app for `meta` (already authorized, its subject recorded);
/// `app` is the app connection when it was dialled early ([`dial_early`]). `declared` is the
/// port's protocol when known; `source` is the address the app should see its client at, with
/// transparent inbound. Returns how it ended, or `None` when the connection was refused or failed
/// after detection (recorded as such).
pub(super) async fn deliver<D>(
    pod: &Arc<PodContext>,
    mut meta: ConnMeta,
    mut down: D,
    app: Option<TcpStream>,
    declared: Option<AppProtocol>,
    source: Option<SocketAddr>,
) -> Option<Delivered>
where
    D: AsyncRead + AsyncWrite + Movable + Unpin + Send + 'static,
{
    let shared = &pod.shared;
    let settings = shared.state().config.http;
    let wait = match declared {
        Some(AppProtocol::Tcp) => None,
        // Declared HTTP: the client's first bytes say which version, however long it takes to
        // send them (the HTTP server's own header timeout bounds it).
        Some(_) => Some(server::HEADER_READ_TIMEOUT),
        None => Some(settings.detect_timeout),
    };
    let mut buf = BytesMut::new();
    let detected = match wait {
        None => Detected::Opaque,
        Some(wait) => match detect(&mut down, &mut buf, Some(wait)).await {
            Ok(detected) => detected,
            Err(e) => {
                shared.reject_conn(&meta, "conn_failed", &format!("reading the first bytes: {e}"));
                return None;
            }
        },
    };
    let down = Rewind::new(buf.freeze(), down);
    let version = match detected {
        Detected::Opaque => {
            if let Some(subject) = meta.subject.clone().filter(|s| s.http) {
                // Not HTTP after all: the strict L4 decision, where an HTTP ALLOW never matches and
                // an HTTP DENY covers the connection.
                let subject = AuthzSubject { http: false, ..subject };
                if let Err(denied) = shared.authorize(&mut meta, subject) {
                    shared.reject_conn(&meta, "conn_refused", &format!("{denied} (the bytes are not HTTP)"));
                    return None;
                }
            }
            let app = dialled(pod, &meta, app, source).await?;
            let conn = shared.open_conn(meta);
            let outcome = relay_movable(shared, &conn, down, app, RelayState::default()).await;
            let bytes = totals(conn.stats());
            let reason = match outcome {
                Outcome::Closed(reason) => {
                    conn.close(&reason);
                    reason
                }
                Outcome::Moved => {
                    conn.moved();
                    CloseReason::Closed("handed over to the next agent".into())
                }
            };
            return Some(Delivered { reason, bytes });
        }
        Detected::Http1 => Version::Http1,
        Detected::Http2 => Version::Http2,
    };
    let app = dialled(pod, &meta, app, source).await?;
    meta.protocol = if version == Version::Http1 { Carried::Http1 } else { Carried::Http2 };
    meta.labels.request_protocol = RequestProtocol::Http;
    let conn = shared.open_conn(meta);
    let hooks = Arc::new(Hooks {
        shared: shared.clone(),
        labels: conn.meta().labels.clone(),
        subject: conn.meta().subject.clone(),
        conn_id: conn.meta().id,
        pod: pod.key.clone(),
        src: conn.meta().src,
        requests: conn.request_counter(),
        series: shared.metrics.requests_of(&conn.meta().labels),
    });
    let counted = super::relay::Counted::new(down, conn.stats_handle());
    let dial_pod = pod.clone();
    let target = conn.meta().original_dst;
    let dial: Dial = Arc::new(move || {
        let pod = dial_pod.clone();
        Box::pin(async move { Ok(Box::new(connect_to_app(&pod, target, source).await?) as AppConn) })
    });
    let upstream = Upstream::new(version, Some(Box::new(app)), dial);
    let settings = Settings {
        normalization: settings.path_normalization,
        start_traceparent: settings.start_traceparent,
    };
    let reason = conn
        .serve(async {
            match server::serve(counted, version, upstream, hooks, settings).await {
                Ok(()) => CloseReason::Eof,
                Err(e) => CloseReason::Error(std::io::Error::other(e).to_string()),
            }
        })
        .await;
    let bytes = totals(conn.stats());
    conn.close(&reason);
    Some(Delivered { reason, bytes })
}

/// The app connection: the one dialled early, or a new one; `None` (recorded) when it fails.
async fn dialled(
    pod: &PodContext,
    meta: &ConnMeta,
    app: Option<TcpStream>,
    source: Option<SocketAddr>,
) -> Option<TcpStream> {
    if let Some(app) = app {
        return Some(app);
    }
    match connect_to_app(pod, meta.original_dst, source).await {
        Ok(app) => Some(app),
        Err(e) => {
            pod.shared.reject_conn(meta, "conn_failed", &e.to_string());
            None
        }
    }
}

fn totals(stats: &super::relay::RelayStats) -> (u64, u64) {
    (stats.sent.load(Ordering::Relaxed), stats.received.load(Ordering::Relaxed))
}

/// The proxy's answers to the HTTP layer for one connection.
struct Hooks {
    shared: Arc<ProxyShared>,
    labels: ConnLabels,
    subject: Option<AuthzSubject>,
    conn_id: u64,
    pod: String,
    src: SocketAddr,
    requests: Arc<AtomicU64>,
    series: ConnRequests,
}

impl RequestHooks for Hooks {
    fn authorize(&self, request: &policy::Request<'_>) -> Verdict {
        let Some(subject) = &self.subject else {
            // Every inbound path records a subject before delivering; without one, fail closed.
            return Verdict { allowed: false, policy: None, rule: None };
        };
        let rec = self.shared.authorize_request(&self.labels, subject, request);
        Verdict { allowed: rec.verdict == policy::Verdict::Allow, policy: rec.policy, rule: rec.rule }
    }

    fn finished(&self, log: &RequestLog) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let shared = &self.shared;
        if let Some(reason) = log.rejection {
            shared.metrics.rejected_request(&self.labels, reason);
            tracing::info!(pod = %self.pod, conn = self.conn_id, reason, method = %log.method, path = %log.path,
                "HTTP request refused");
        }
        self.series.observe(&RequestSample {
            labels: &self.labels,
            protocol: match log.kind {
                RequestKind::Grpc => RequestProtocol::Grpc,
                RequestKind::Http => RequestProtocol::Http,
            },
            response_code: log.status,
            response_flags: log.flags,
            grpc_status: log.grpc_status.as_deref(),
            duration: log.duration,
            request_bytes: log.request_bytes,
            response_bytes: log.response_bytes,
        });
        if !shared.access_log.enabled() && !shared.events.enabled() {
            return;
        }
        // One record, serialized once, for both sinks (this runs once per request).
        let mut line = self.record(log).to_string();
        line.push('\n');
        shared.access_log.emit_line(&line);
        shared.events.emit_line(&line);
    }
}

impl Hooks {
    /// One access-log line: the request, its outcome, and the connection it came on.
    fn record(&self, log: &RequestLog) -> serde_json::Value {
        let decision = log.verdict.as_ref().map(|v| if v.allowed { "allow" } else { "deny" });
        let l = &self.labels;
        json!({
            "time": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "kind": "request",
            "event": "http_request",
            "conn": self.conn_id,
            "pod": self.pod,
            "src": self.src.to_string(),
            "source_ip": self.subject.as_ref().and_then(|s| s.source_ip).map(|ip| ip.to_string()),
            "source_workload": l.source_workload,
            "source_workload_namespace": l.source_workload_namespace,
            "source_principal": l.source_principal,
            "destination_workload": l.destination_workload,
            "destination_workload_namespace": l.destination_workload_namespace,
            "destination_service": l.destination_service,
            "connection_security_policy": l.values()[8],
            "protocol": if log.version == http::Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
            "method": log.method.as_str(),
            "authority": log.authority,
            "path": log.path,
            "status": log.status,
            "duration_ms": log.duration.as_secs_f64() * 1000.0,
            "bytes_received": log.request_bytes,
            "bytes_sent": log.response_bytes,
            "response_flags": log.flags,
            "grpc_status": log.grpc_status,
            "request_id": log.request_id,
            "policy_decision": decision,
            "policy": log.verdict.as_ref().and_then(|v| v.policy.clone()),
            "policy_rule": log.verdict.as_ref().and_then(|v| v.rule),
            "rejected": log.rejection,
        })
    }
}
