//! The inbound mTLS path: HBONE connections to the pod's tunnel port. The client's identity comes
//! from its verified certificate; each CONNECT must target this pod, and is handed to the app from
//! the source pod's address (the tunnel's peer address: each source pod dials its own tunnels) and
//! the app port the source agent names in `Forwarded`.

use std::{net::SocketAddr, sync::Arc};

use serde_json::json;
use tokio::net::TcpStream;

use super::{
    PodContext,
    authorize::AuthzSubject,
    deliver,
    inbound::{connect_to_app, inbound_meta},
};
use crate::{
    config::AppProtocol,
    hbone::{self, Connect, HboneStream, Refusal},
    metrics::SecurityPolicy,
};

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
    let handler = move |connect: Connect| {
        let pod = handler_pod.clone();
        async move {
            let Connect { target, peer: peer_id, protocol: told, forwarded_for } = connect;
            let shared = &pod.shared;
            let source = client_address(peer, forwarded_for);
            let mut meta = inbound_meta(&pod, shared.next_id(), source, target, SecurityPolicy::MutualTls);
            meta.source_identity = Some(peer_id.to_string());
            meta.labels.source_principal = peer_id.to_string();
            if let Some(id) = &pod.identity {
                meta.destination_identity = Some(id.to_string());
                meta.labels.destination_principal = id.to_string();
            }
            // A tunnel that lands on this pod may only reach this pod: anything else would let a
            // client use us as a relay to a pod it could not reach (or one with another policy).
            if !pod.ips.contains(&target.ip()) {
                shared.reject_conn(&meta, "conn_refused", "target is not served here");
                return Err(Refusal::forbidden("target is not served here"));
            }
            if shared.ports.contains(target.port()) {
                shared.reject_conn(&meta, "conn_refused", "destination is a proxy port");
                return Err(Refusal::forbidden("destination is a proxy port"));
            }
            // What the source agent says of the port, else what this node's mesh file declares.
            let declared = told.or_else(|| deliver::declared(&pod, target.port()));
            // After the target check: `ports` in policy is the app's port, never the tunnel's.
            let subject = AuthzSubject {
                workload: pod.key.clone(),
                source_ip: Some(peer.ip().to_canonical()),
                peer: Some(peer_id),
                destination: target,
                http: declared != Some(AppProtocol::Tcp),
            };
            if let Err(denied) = shared.authorize(&mut meta, subject) {
                shared.reject_conn(&meta, "conn_refused", &denied);
                return Err(Refusal::forbidden(denied));
            }
            // Dialled before the 200, so a refusing app gets the client a 503 (unless only HTTP
            // could allow the stream: then after its first bytes, see deliver::dial_early).
            let app = if deliver::dial_early(shared, &meta) {
                match connect_to_app(&pod, target, Some(source)).await {
                    Ok(app) => Some(app),
                    Err(e) => {
                        shared.reject_conn(&meta, "conn_failed", &e.to_string());
                        return Err(Refusal::unavailable("upstream refused"));
                    }
                }
            } else {
                None
            };
            Ok(move |stream: HboneStream| async move {
                deliver::deliver(&pod, meta, stream, app, declared, Some(source)).await;
            })
        }
    };
    let hub = pod.shared.handoff.clone();
    let drain = async move { hub.handing_over().await };
    if let Err(e) = hbone::serve(config, tcp, handler, drain).await {
        tracing::debug!(pod = %pod.key, %peer, error = %e, "tunnel connection ended with an error");
    }
}

/// The client app's address: the tunnel's peer address, which TCP vouches for, with the port the
/// source agent says its app used. A `Forwarded` address naming another IP than the tunnel's peer
/// is not believed (a relay in between, or a claim about someone else): the port is then the
/// kernel's pick.
fn client_address(tunnel_peer: SocketAddr, forwarded_for: Option<SocketAddr>) -> SocketAddr {
    let ip = tunnel_peer.ip().to_canonical();
    let port = forwarded_for.filter(|f| f.ip().to_canonical() == ip).map_or(0, |f| f.port());
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_forwarded_port_from_the_tunnel_peer_is_believed() {
        let peer: SocketAddr = "10.0.0.5:51000".parse().unwrap();
        let cases = [
            (None, "10.0.0.5:0"),
            (Some("10.0.0.5:40000"), "10.0.0.5:40000"),
            (Some("[::ffff:10.0.0.5]:40000"), "10.0.0.5:40000"),
            (Some("10.0.0.6:40000"), "10.0.0.5:0"),
            (Some("[fd00::5]:40000"), "10.0.0.5:0"),
        ];
        for (forwarded, want) in cases {
            let forwarded = forwarded.map(|f| f.parse().unwrap());
            assert_eq!(client_address(peer, forwarded), want.parse().unwrap(), "{forwarded:?}");
        }
    }
}
