//! The inbound path: a SYN from outside the pod, steered by sk_lookup to the in-pod inbound
//! listener, is handed to the app over loopback with its destination port preserved. The accepted
//! socket's local address is the original destination.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use serde_json::json;

use crate::config::Mode;
use tokio::net::TcpStream;

use super::{
    PodContext,
    outbound::{close_fields, with_event},
    relay::{RelayStats, relay},
    sockets::connect_from,
};

/// Handles one accepted inbound plaintext connection.
pub async fn handle(mut down: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let shared = &pod.shared;
    let id = shared.next_id();
    let orig = match down.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(pod = %pod.key, error = %e, "inbound connection vanished");
            return;
        }
    };
    let src_pod = shared.state().config.pod_by_ip(peer.ip()).map(|p| p.key());
    let base = json!({
        "id": id, "direction": "inbound", "pod": pod.key, "src": peer.to_string(), "src_pod": src_pod,
        "orig_dst": orig.to_string(), "security": "none",
    });
    if pod.mode == Mode::Strict {
        // STRICT: only mutually authenticated tunnels may reach this pod.
        shared.events.emit(with_event(
            &base,
            "conn_refused",
            json!({ "reason": "plaintext refused: STRICT mode" }),
        ));
        return;
    }
    if shared.ports.contains(orig.port()) {
        // Forwarding to our own port over loopback would come straight back: refuse.
        shared.events.emit(with_event(
            &base,
            "conn_refused",
            json!({ "reason": "destination is a proxy port" }),
        ));
        return;
    }
    let started = Instant::now();
    let mut up = match connect_to_app(&pod, orig).await {
        Ok(up) => up,
        Err(e) => {
            shared.events.emit(with_event(&base, "conn_failed", json!({ "reason": e.to_string() })));
            return;
        }
    };
    shared.events.emit(with_event(&base, "conn_open", json!({})));
    let stats = RelayStats::default();
    let reason = relay(&mut down, &mut up, &stats).await;
    shared.events.emit(with_event(&base, "conn_close", close_fields(&stats, started, &reason)));
}

/// Connects to the app on loopback of the same family; an app listening on only the other family's
/// wildcard is tried next.
pub(super) async fn connect_to_app(pod: &PodContext, orig: SocketAddr) -> io::Result<TcpStream> {
    let (first, second) = match orig.ip() {
        IpAddr::V4(_) => (IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)),
        IpAddr::V6(_) => (IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    match connect_from(&pod.netns, SocketAddr::new(first, orig.port())).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            connect_from(&pod.netns, SocketAddr::new(second, orig.port())).await
        }
        other => other,
    }
}
