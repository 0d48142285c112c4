//! The proxy's connections: one record per relayed connection, live while it runs, feeding the
//! events file, the access log, the Prometheus families and the admin API's `/connections`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::{Value, json};

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    ProxyShared,
    authorize::{AuthzRecord, AuthzSubject},
    relay::{CloseReason, RelayStats, relay},
};
use crate::{
    admin::model::{ConnectionView, Direction},
    metrics::{ConnLabels, ConnMetrics, SecurityPolicy},
};

/// What is known about a connection once it is routed.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    /// The proxy's connection id.
    pub id: u64,
    /// Outbound (the pod connected out) or inbound.
    pub direction: Direction,
    /// "namespace/name" of the enrolled pod this side serves.
    pub pod: String,
    /// The connection's source address as the proxy saw it.
    pub src: SocketAddr,
    /// "namespace/name" of the source pod, if it is in the mesh (inbound).
    pub src_pod: Option<String>,
    /// Where the app meant to go.
    pub original_dst: SocketAddr,
    /// Where the proxy actually connects (outbound).
    pub endpoint: Option<SocketAddr>,
    /// "namespace/name" of the endpoint pod, if in the mesh (outbound).
    pub endpoint_pod: Option<String>,
    /// "namespace/name" of the service, when the destination was a VIP.
    pub service: Option<String>,
    /// The source's SPIFFE ID, when known.
    pub source_identity: Option<String>,
    /// The destination's SPIFFE ID, when verified.
    pub destination_identity: Option<String>,
    /// mTLS or plaintext.
    pub security: SecurityPolicy,
    /// Istio's label set for the metrics and the access log.
    pub labels: ConnLabels,
    /// The policy decision (inbound records; `None` outbound, where nothing is enforced).
    pub authz: Option<AuthzRecord>,
    /// What the decision looked at, so the connection is re-checked when policies change.
    pub subject: Option<AuthzSubject>,
    /// What the connection carries, once known.
    pub protocol: Carried,
}

/// What a relayed connection carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Carried {
    /// Opaque bytes.
    #[default]
    Tcp,
    /// HTTP/1.1, served by the HTTP layer.
    Http1,
    /// HTTP/2, served by the HTTP layer.
    Http2,
}

impl Carried {
    /// The name `ferry connections` and the records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Carried::Tcp => "tcp",
            Carried::Http1 => "http/1.1",
            Carried::Http2 => "h2",
        }
    }
}

impl ConnMeta {
    /// The event record: the fields the events file and the access log share.
    pub fn record(&self) -> Value {
        let mut record = json!({
            "id": self.id, "direction": self.direction.as_str(), "pod": self.pod,
            "src": self.src.to_string(), "src_pod": self.src_pod, "orig_dst": self.original_dst.to_string(),
            "endpoint": self.endpoint.map(|e| e.to_string()), "endpoint_pod": self.endpoint_pod,
            "service": self.service, "security": security_str(self.security),
            "src_identity": self.source_identity, "dst_identity": self.destination_identity,
            "protocol": self.protocol.as_str(),
        });
        extend(&mut record, authz_fields(self.authz.as_ref()));
        record
    }
}

/// The policy fields of a record; all `null` for records without a decision (outbound).
fn authz_fields(authz: Option<&AuthzRecord>) -> Value {
    json!({
        "policy_decision": authz.map(|a| a.verdict.as_str()),
        "policy": authz.and_then(|a| a.policy.clone()),
        "policy_rule": authz.and_then(|a| a.rule),
        "dry_run": authz.and_then(|a| a.dry_run.as_ref()).map(|d| json!({
            "decision": d.verdict.as_str(), "policy": d.policy, "rule": d.rule,
        })),
        "audit": authz.and_then(|a| a.audit.clone()),
    })
}

fn security_str(s: SecurityPolicy) -> &'static str {
    match s {
        SecurityPolicy::MutualTls => "mutual_tls",
        SecurityPolicy::None => "none",
        SecurityPolicy::NodeLocal => "node_local",
        SecurityPolicy::Unknown => "unknown",
    }
}

/// A connection being relayed.
struct Live {
    meta: ConnMeta,
    stats: Arc<RelayStats>,
    requests: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
    closer: Closer,
}

/// Ends a live relay from outside it (a policy change that now denies the connection).
#[derive(Default)]
struct Closer {
    notify: tokio::sync::Notify,
    reason: std::sync::OnceLock<(String, AuthzRecord)>,
}

impl Closer {
    /// Asks the relay to stop; the first reason given is the one recorded, with the decision that
    /// closed it.
    fn close(&self, reason: String, decision: AuthzRecord) {
        if self.reason.set((reason, decision)).is_ok() {
            // notify_one keeps a permit if the relay is not waiting yet, so the close is never lost.
            self.notify.notify_one();
        }
    }

    /// Resolves once [`Closer::close`] was called, with its reason.
    async fn closed(&self) -> String {
        loop {
            if let Some((reason, _)) = self.reason.get() {
                return reason.clone();
            }
            self.notify.notified().await;
        }
    }
}

/// Live connections by id.
#[derive(Default)]
pub struct ConnTable {
    live: Mutex<HashMap<u64, Arc<Live>>>,
}

impl ConnTable {
    /// Snapshot for `GET /connections`.
    pub fn views(&self) -> Vec<ConnectionView> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut views: Vec<ConnectionView> = live.values().map(|l| view(l)).collect();
        views.sort_by_key(|v| v.id);
        views
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every live connection whose re-checked subject `deny` turns down (returning the close
    /// reason and the decision); returns how many were closed.
    pub fn close_where(
        &self,
        mut deny: impl FnMut(&ConnMeta, &AuthzSubject) -> Option<(String, AuthzRecord)>,
    ) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for l in live.values() {
            if let Some(subject) = &l.meta.subject
                && l.closer.reason.get().is_none()
                && let Some((reason, decision)) = deny(&l.meta, subject)
            {
                l.closer.close(reason, decision);
                closed += 1;
            }
        }
        closed
    }

    /// Live connections per endpoint pod (for `GET /services`).
    pub fn per_endpoint_pod(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for l in self.live.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if let Some(pod) = &l.meta.endpoint_pod {
                *out.entry(pod.clone()).or_default() += 1;
            }
        }
        out
    }
}

fn view(l: &Live) -> ConnectionView {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &l.meta;
    ConnectionView {
        id: m.id,
        direction: m.direction,
        pod: m.pod.clone(),
        src: m.src,
        original_dst: m.original_dst,
        endpoint: m.endpoint,
        service: m.service.clone(),
        source_identity: m.source_identity.clone(),
        destination_identity: m.destination_identity.clone(),
        security: Some(security_str(m.security).to_owned()),
        protocol: Some(m.protocol.as_str().to_owned()),
        requests: l.requests.load(Relaxed),
        // Istio's convention: received is what came from the source, sent what went back to it.
        bytes_received: l.stats.sent.load(Relaxed),
        bytes_sent: l.stats.received.load(Relaxed),
        age_seconds: l.started.elapsed().as_secs_f64(),
    }
}

/// A registered connection; [`OpenConn::close`] accounts for it everywhere.
pub struct OpenConn<'a> {
    shared: &'a ProxyShared,
    live: Arc<Live>,
    metrics: ConnMetrics,
}

impl OpenConn<'_> {
    /// The byte counters the relay updates.
    pub fn stats(&self) -> &RelayStats {
        &self.live.stats
    }

    /// Relays between the two streams until both are done, or until the connection is closed from
    /// outside (a policy change), whose reason is returned then.
    pub async fn relay<D, U>(&self, downstream: &mut D, upstream: &mut U, stats: &RelayStats) -> CloseReason
    where
        D: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::select! {
            reason = relay(downstream, upstream, stats) => reason,
            reason = self.live.closer.closed() => CloseReason::Closed(reason),
        }
    }

    /// Resolves once the connection is closed from outside (a policy change), with the reason.
    pub async fn closed(&self) -> String {
        self.live.closer.closed().await
    }

    /// How long the connection has been open (across agents, for a moved one).
    pub fn age(&self) -> std::time::Duration {
        self.live.started.elapsed()
    }

    /// Records that the connection went to the next agent, which records its end.
    pub fn moved(self) {
        self.shared.conns.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.live.meta.id);
        if self.shared.events.enabled() {
            let mut record = self.live.meta.record();
            extend(&mut record, json!({ "event": "conn_handed_over" }));
            self.shared.events.emit(record);
        }
    }

    /// Runs `serve` (the HTTP layer) until it ends or the connection is closed from outside.
    pub async fn serve<F>(&self, serve: F) -> CloseReason
    where
        F: Future<Output = CloseReason>,
    {
        tokio::select! {
            reason = serve => reason,
            reason = self.live.closer.closed() => CloseReason::Closed(reason),
        }
    }

    /// The byte counters, for a stream wrapper that outlives this borrow (the HTTP layer's).
    pub fn stats_handle(&self) -> Arc<RelayStats> {
        self.live.stats.clone()
    }

    /// The counter of HTTP requests on this connection (shown by `ferry connections`).
    pub fn request_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.live.requests.clone()
    }

    /// The connection's record.
    pub fn meta(&self) -> &ConnMeta {
        &self.live.meta
    }

    /// Records the end of the connection: events, access log, metrics, and out of the live table.
    pub fn close(self, reason: &CloseReason) {
        use std::sync::atomic::Ordering::Relaxed;
        let (sent, received) = (self.live.stats.sent.load(Relaxed), self.live.stats.received.load(Relaxed));
        let duration = self.live.started.elapsed();
        self.metrics.add_received(sent);
        self.metrics.add_sent(received);
        self.metrics.closed(duration);
        self.shared.conns.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.live.meta.id);
        let (events, access_log) = (&self.shared.events, &self.shared.access_log);
        // Records are built only for sinks that are on: off is the production default, and this
        // runs once per connection.
        if !events.enabled() && !access_log.enabled() {
            return;
        }
        let mut record = self.live.meta.record();
        if let Some((_, decision)) = self.live.closer.reason.get() {
            // Closed by a policy change: the record says which decision ended it.
            extend(&mut record, authz_fields(Some(decision)));
        }
        extend(
            &mut record,
            json!({ "duration_ms": duration.as_secs_f64() * 1000.0, "close_reason": reason.to_string() }),
        );
        if access_log.enabled() {
            // The access log counts bytes as Istio (and the metrics and /connections) do: received
            // from the source, sent back to it. The events file keeps the relay's directions.
            let mut access = record.clone();
            extend(&mut access, json!({ "bytes_sent": received, "bytes_received": sent }));
            access_log.emit(access_line(&self.live.meta.labels, &access));
        }
        if events.enabled() {
            extend(
                &mut record,
                json!({ "bytes_sent": sent, "bytes_received": received, "event": "conn_close" }),
            );
            events.emit(record);
        }
    }
}

impl ProxyShared {
    /// Registers `meta`, relays between `downstream` and `upstream` until both sides are done, and
    /// accounts for the connection: the one way every path relays.
    pub async fn relay_conn<D, U>(&self, meta: ConnMeta, downstream: &mut D, upstream: &mut U)
    where
        D: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let conn = self.open_conn(meta);
        let reason = conn.relay(downstream, upstream, conn.stats()).await;
        conn.close(&reason);
    }

    /// Registers a connection the previous agent handed over, with its bytes and age so far; its
    /// subject is decided again now, so it is held to this agent's policies.
    pub fn open_resumed(
        &self,
        mut meta: ConnMeta,
        bytes: (u64, u64),
        age: std::time::Duration,
    ) -> OpenConn<'_> {
        if let Some(subject) = meta.subject.clone() {
            // Denied now: the relay sees the close at once and records it.
            let denied = self.authorize(&mut meta, subject).err();
            let conn = self.open_conn_at(meta, age, "conn_resumed");
            conn.live.stats.sent.store(bytes.0, std::sync::atomic::Ordering::Relaxed);
            conn.live.stats.received.store(bytes.1, std::sync::atomic::Ordering::Relaxed);
            if let (Some(reason), Some(decision)) = (denied, conn.live.meta.authz.clone()) {
                conn.live.closer.close(format!("closed by policy after handoff: {reason}"), decision);
            }
            return conn;
        }
        let conn = self.open_conn_at(meta, age, "conn_resumed");
        conn.live.stats.sent.store(bytes.0, std::sync::atomic::Ordering::Relaxed);
        conn.live.stats.received.store(bytes.1, std::sync::atomic::Ordering::Relaxed);
        conn
    }

    /// Registers a connection the proxy is about to relay.
    pub fn open_conn(&self, meta: ConnMeta) -> OpenConn<'_> {
        self.open_conn_at(meta, std::time::Duration::ZERO, "conn_open")
    }

    fn open_conn_at(&self, meta: ConnMeta, age: std::time::Duration, event: &str) -> OpenConn<'_> {
        let metrics = self.metrics.opened(&meta.labels);
        if self.events.enabled() {
            let mut record = meta.record();
            extend(&mut record, json!({ "event": event }));
            self.events.emit(record);
        }
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let live = Arc::new(Live {
            meta,
            stats: Arc::default(),
            requests: Default::default(),
            started,
            closer: Closer::default(),
        });
        self.conns.live.lock().unwrap_or_else(|p| p.into_inner()).insert(live.meta.id, live.clone());
        OpenConn { shared: self, live, metrics }
    }

    /// Records a connection that was refused (`event` = "conn_refused") or could not be set up
    /// ("conn_failed"), with the reason.
    pub fn reject_conn(&self, meta: &ConnMeta, event: &str, reason: &str) {
        // Refused (STRICT, a proxy port, a target not served here) or failed: either way accepted
        // and never relayed, which is what the failed family counts.
        self.metrics.failed(&meta.labels);
        if !self.events.enabled() && !self.access_log.enabled() {
            return;
        }
        let mut record = meta.record();
        extend(
            &mut record,
            json!({ "close_reason": reason, "reason": reason, "bytes_sent": 0, "bytes_received": 0 }),
        );
        // Every access-log line has the same fields; how long the attempt took is not measured.
        if self.access_log.enabled() {
            let mut access = record.clone();
            extend(&mut access, json!({ "duration_ms": null }));
            self.access_log.emit(access_line(&meta.labels, &access));
        }
        if self.events.enabled() {
            extend(&mut record, json!({ "event": event }));
            self.events.emit(record);
        }
    }
}

/// One access-log line: Istio's labels plus the connection's record (addresses, bytes, duration,
/// close reason).
fn access_line(labels: &ConnLabels, record: &Value) -> Value {
    let names = crate::metrics::CONN_LABELS;
    let mut line = json!({ "time": humantime_now() });
    if let Some(obj) = line.as_object_mut() {
        for (name, value) in names.iter().zip(labels.values()) {
            obj.insert((*name).to_owned(), value.into());
        }
    }
    extend(&mut line, record.clone());
    line
}

fn humantime_now() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn extend(target: &mut Value, extra: Value) {
    if let (Some(obj), Value::Object(extra)) = (target.as_object_mut(), extra) {
        obj.extend(extra);
    }
}
