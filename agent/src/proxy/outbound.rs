//! The outbound path: a connection the pod's app made, redirected by connect4/6 to the in-pod
//! outbound listener, goes to its original destination (or a service endpoint) from the pod's netns.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use serde_json::json;
use tokio::net::TcpStream;

use super::{
    PodContext,
    relay::{RelayStats, relay},
    routes::Resolved,
    sockets::connect_from,
};

/// Handles one accepted outbound connection.
pub async fn handle(mut down: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let shared = &pod.shared;
    let id = shared.next_id();
    let Some(orig) = shared.orig_dst.take(pod.netns.cookie(), peer) else {
        // Nothing was redirected here: a direct connection to the proxy's port. Forwarding it
        // anywhere would be a guess (and a possible loop), so it is closed.
        shared.events.emit(json!({
            "event": "conn_refused", "id": id, "direction": "outbound", "pod": pod.key,
            "src": peer.to_string(), "reason": "no original destination recorded",
        }));
        tracing::debug!(pod = %pod.key, %peer, "refused outbound connection without original destination");
        return;
    };
    let state = shared.state();
    let (target, service, endpoint_pod, _pick) = match state.routes.resolve(orig) {
        Ok(Resolved::Direct(addr)) => (addr, None, state.config.pod_by_ip(addr.ip()).map(|p| p.key()), None),
        Ok(Resolved::Service { route, pick }) => {
            (pick.target, Some(route.name.clone()), Some(pick.pod().to_string()), Some(pick))
        }
        Err(e) => {
            shared.events.emit(json!({
                "event": "conn_failed", "id": id, "direction": "outbound", "pod": pod.key,
                "src": peer.to_string(), "orig_dst": orig.to_string(), "reason": e.to_string(),
            }));
            return;
        }
    };
    // A destination pod of the mesh is reached through its tunnel with mutual TLS; anything else
    // (outside the mesh, or a node without a CA) gets plaintext passthrough.
    let tunnel_peer = match (&shared.mtls, &pod.identity) {
        (Some(mtls), Some(src_id)) => state
            .config
            .pod_by_ip(target.ip())
            .and_then(|dst| mtls.identity_of(dst).ok())
            .map(|dst_id| (mtls, src_id, dst_id)),
        _ => None,
    };
    drop(state);
    let mut base = json!({
        "id": id, "direction": "outbound", "pod": pod.key, "src": peer.to_string(),
        "orig_dst": orig.to_string(), "service": service, "endpoint": target.to_string(),
        "endpoint_pod": endpoint_pod, "security": if tunnel_peer.is_some() { "mutual_tls" } else { "none" },
        "src_identity": pod.identity.as_ref().map(|i| i.to_string()),
    });
    let started = Instant::now();
    let stats = RelayStats::default();
    let reason = if let Some((mtls, src_id, dst_id)) = tunnel_peer {
        let tunnel = SocketAddr::new(target.ip(), shared.ports.tunnel);
        let netns = pod.netns.clone();
        let dial = move |addr| async move { connect_from(&netns, addr).await };
        let (mut stream, peer_id) = match mtls.pool.connect(src_id, tunnel, target, &[dst_id], dial).await {
            Ok(ok) => ok,
            Err(e) => {
                // Fail closed: never fall back to plaintext for a mesh destination.
                shared.events.emit(with_event(&base, "conn_failed", json!({ "reason": format!("{e:#}") })));
                return;
            }
        };
        base["dst_identity"] = peer_id.to_string().into();
        shared.events.emit(with_event(&base, "conn_open", json!({})));
        relay(&mut down, &mut stream, &stats).await
    } else {
        let mut up = match connect_from(&pod.netns, target).await {
            Ok(up) => up,
            Err(e) => {
                shared.events.emit(with_event(&base, "conn_failed", json!({ "reason": e.to_string() })));
                return;
            }
        };
        shared.events.emit(with_event(&base, "conn_open", json!({})));
        relay(&mut down, &mut up, &stats).await
    };
    shared.events.emit(with_event(&base, "conn_close", close_fields(&stats, started, &reason)));
}

/// Adds the event name and extra fields to a connection's base record.
pub(super) fn with_event(
    base: &serde_json::Value,
    event: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut v = base.clone();
    if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        obj.insert("event".into(), event.into());
        obj.extend(extra);
    }
    v
}

/// Fields of a conn_close record.
pub(super) fn close_fields(
    stats: &RelayStats,
    started: Instant,
    reason: &super::relay::CloseReason,
) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "bytes_sent": stats.sent.load(Relaxed),
        "bytes_received": stats.received.load(Relaxed),
        "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        "close_reason": reason.to_string(),
    })
}
