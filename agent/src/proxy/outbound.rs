//! The outbound path: a connection the pod's app made, redirected by connect4/6 (or iptables) to
//! the in-pod outbound listener, goes to its original destination (or a service endpoint) from the
//! pod's netns: through the destination's HBONE tunnel when it is a mesh pod (or, with the node-local
//! shortcut, straight into a destination pod enrolled here), as plaintext otherwise.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use serde_json::json;
use tokio::net::TcpStream;

use super::{
    PodContext, conns::ConnMeta, relay::RelayState, routes::Resolved, shortcut, sockets::connect_from,
};
use crate::{
    admin::model::Direction,
    handoff::relays::{Outcome, relay_movable},
    hbone::Origin,
    http::rewind::Rewind,
    metrics::{ConnLabels, Reporter, SecurityPolicy},
};

/// Handles one accepted outbound connection.
pub async fn handle(mut down: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let shared = &pod.shared;
    let id = shared.next_id();
    let orig = match shared.orig_dst.outbound(pod.netns.cookie(), peer, &down) {
        Ok(orig) => orig,
        Err(e) => {
            // Nothing was redirected here: a direct connection to the proxy's port. Forwarding it
            // anywhere would be a guess (and a possible loop), so it is closed.
            shared.events.emit(json!({
                "event": "conn_refused", "id": id, "direction": "outbound", "pod": pod.key,
                "src": peer.to_string(), "reason": e.to_string(),
            }));
            tracing::debug!(pod = %pod.key, %peer, error = %e, "refused outbound connection: no destination");
            return;
        }
    };
    let state = shared.state();
    let mut labels = ConnLabels::unknown(Reporter::Source);
    labels.source_workload = pod.name.clone();
    labels.source_workload_namespace = pod.namespace.clone();
    if let Some(id) = &pod.identity {
        labels.source_principal = id.to_string();
    }
    let mut meta = ConnMeta {
        id,
        direction: Direction::Outbound,
        pod: pod.key.clone(),
        src: peer,
        src_pod: None,
        original_dst: orig,
        endpoint: None,
        endpoint_pod: None,
        service: None,
        source_identity: pod.identity.as_ref().map(|i| i.to_string()),
        destination_identity: None,
        security: SecurityPolicy::None,
        labels,
        authz: None,
        subject: None,
        protocol: Default::default(),
    };
    let (target, _pick, mut protocol) = match state.routes.resolve(orig) {
        Ok(Resolved::Direct(addr)) => (addr, None, None),
        Ok(Resolved::Service { route, pick }) => {
            meta.service = Some(route.name.clone());
            meta.labels.destination_service = route.name.clone();
            (pick.target, Some(pick), route.protocol)
        }
        Err(e) => {
            shared.reject_conn(&meta, "conn_failed", &e.to_string());
            return;
        }
    };
    meta.endpoint = Some(target);
    let dst_pod = state.config.pod_by_ip(target.ip());
    if let Some(dst) = dst_pod {
        protocol = state.config.declared_protocol(dst, target.port()).or(protocol);
        meta.endpoint_pod = Some(dst.key());
        meta.labels.destination_workload = dst.name.clone();
        meta.labels.destination_workload_namespace = dst.namespace.clone();
    }
    // Both ends enrolled here: the agent may join them itself, without the tunnel (opt-in).
    let local_peer = match &meta.endpoint_pod {
        Some(dst_key) if state.config.datapath.local_shortcut => shortcut::peer(&pod, dst_key),
        _ => None,
    };
    // A destination pod of the mesh is reached through its tunnel with mutual TLS; anything else
    // (outside the mesh, or a node without a CA) gets plaintext passthrough. Not looked up when
    // the shortcut already carries the connection.
    let tunnel_peer = match (&shared.mtls, &pod.identity, dst_pod) {
        (Some(mtls), Some(src_id), Some(dst)) if local_peer.is_none() => {
            mtls.identity_of(dst).ok().map(|dst_id| (mtls, src_id, dst_id))
        }
        _ => None,
    };
    drop(state);
    if let Some(dst) = local_peer {
        shortcut::relay_local(&pod, &dst, meta, down, target).await;
    } else if let Some((mtls, src_id, dst_id)) = tunnel_peer {
        meta.security = SecurityPolicy::MutualTls;
        meta.labels.connection_security_policy = SecurityPolicy::MutualTls;
        let tunnel = SocketAddr::new(target.ip(), shared.ports.tunnel);
        let netns = pod.netns.clone();
        let dial = move |addr| async move { connect_from(&netns, addr).await };
        // The app's port travels in the CONNECT, so the destination app sees the port it used.
        let origin = Origin { identity: src_id, netns: pod.netns.cookie(), port: peer.port() };
        let (mut stream, peer_id) =
            match mtls.pool.connect(origin, tunnel, target, protocol, &[dst_id], dial).await {
                Ok(ok) => ok,
                Err(e) => {
                    // Fail closed: never fall back to plaintext for a mesh destination.
                    shared.reject_conn(&meta, "conn_failed", &format!("{e:#}"));
                    return;
                }
            };
        meta.destination_identity = Some(peer_id.to_string());
        meta.labels.destination_principal = peer_id.to_string();
        shared.relay_conn(meta, &mut down, &mut stream).await;
    } else {
        meta.labels.connection_security_policy = SecurityPolicy::None;
        let up = match connect_from(&pod.netns, target).await {
            Ok(up) => up,
            Err(e) => {
                shared.reject_conn(&meta, "conn_failed", &e.to_string());
                return;
            }
        };
        let conn = shared.open_conn(meta);
        let down = Rewind::new(Bytes::new(), down);
        match relay_movable(shared, &conn, down, up, RelayState::default()).await {
            Outcome::Closed(reason) => conn.close(&reason),
            Outcome::Moved => conn.moved(),
        }
    }
}
