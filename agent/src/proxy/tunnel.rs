//! The inbound mTLS path: HBONE connections to the pod's tunnel port. The client's identity comes
//! from its verified certificate; each CONNECT must target this pod, and is handed to the app over
//! loopback.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use serde_json::json;
use tokio::net::TcpStream;

use super::{
    PodContext,
    inbound::connect_to_app,
    outbound::{close_fields, with_event},
    relay::{RelayStats, relay},
};
use crate::hbone::{self, HboneStream, Refusal};

/// Serves one accepted TCP connection on the tunnel port.
pub async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    config: Arc<rustls::ServerConfig>,
) {
    // One record per TLS connection (many tunnelled app connections share one).
    pod.shared.events.emit(json!({ "event": "tunnel_accept", "pod": pod.key, "src": peer.to_string() }));
    let handler_pod = pod.clone();
    let handler = move |target: SocketAddr, peer_id: crate::identity::SpiffeId| {
        let pod = handler_pod.clone();
        async move {
            let shared = &pod.shared;
            let id = shared.next_id();
            let src_pod = shared.state().config.pod_by_ip(peer.ip()).map(|p| p.key());
            let base = json!({
                "id": id, "direction": "inbound", "pod": pod.key, "src": peer.to_string(), "src_pod": src_pod,
                "orig_dst": target.to_string(), "security": "mutual_tls",
                "src_identity": peer_id.to_string(), "dst_identity": pod.identity.as_ref().map(|i| i.to_string()),
            });
            // A tunnel that lands on this pod may only reach this pod: anything else would let a
            // client use us as a relay to a pod it could not reach (or one with another policy).
            if !pod.ips.contains(&target.ip()) {
                shared.events.emit(with_event(
                    &base,
                    "conn_refused",
                    json!({"reason": "target is not served here"}),
                ));
                return Err(Refusal::forbidden("target is not served here"));
            }
            if shared.ports.contains(target.port()) {
                shared.events.emit(with_event(
                    &base,
                    "conn_refused",
                    json!({"reason": "destination is a proxy port"}),
                ));
                return Err(Refusal::forbidden("destination is a proxy port"));
            }
            let started = Instant::now();
            let mut app = match connect_to_app(&pod, target).await {
                Ok(app) => app,
                Err(e) => {
                    shared.events.emit(with_event(&base, "conn_failed", json!({"reason": e.to_string()})));
                    return Err(Refusal::unavailable("upstream refused"));
                }
            };
            shared.events.emit(with_event(&base, "conn_open", json!({})));
            Ok(move |mut stream: HboneStream| async move {
                let stats = RelayStats::default();
                let reason = relay(&mut stream, &mut app, &stats).await;
                pod.shared.events.emit(with_event(
                    &base,
                    "conn_close",
                    close_fields(&stats, started, &reason),
                ));
            })
        }
    };
    if let Err(e) = hbone::serve(config, tcp, handler).await {
        tracing::debug!(pod = %pod.key, %peer, error = %e, "tunnel connection ended with an error");
    }
}
