//! The node-local shortcut (`[datapath] local_shortcut = true`): when both ends of a mesh connection
//! are pods enrolled on this node, the agent handles both ends anyway, so the HBONE tunnel (TLS and
//! HTTP/2 through the kernel and back into the same process) buys nothing. The agent already holds
//! both identities (the source is the pod whose netns captured the connection), so it connects to
//! the destination app from inside the destination pod's netns on loopback and relays. No byte
//! leaves either pod's loopback in plaintext, so STRICT destinations accept it.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::TcpStream;

use super::{
    PodContext,
    authorize::AuthzSubject,
    conns::ConnMeta,
    deliver,
    inbound::{connect_to_app, inbound_meta},
    relay::CloseReason,
};
use crate::{config::AppProtocol, metrics::SecurityPolicy};

/// The enrolled context of the pod `dst_key` ("namespace/name") when the shortcut applies from
/// `src`: the node has a CA, both pods have an identity, and the pod is enrolled on this node.
pub(super) fn peer(src: &PodContext, dst_key: &str) -> Option<Arc<PodContext>> {
    let shared = &src.shared;
    shared.mtls.as_ref()?;
    src.identity.as_ref()?;
    let dst = shared.local_pod(dst_key)?;
    dst.identity.is_some().then_some(dst)
}

/// Connects `down` (the source app's connection, recorded by `meta`) to the app of `dst` at
/// `target`'s port on loopback, and relays. Records the connection on both sides: outbound for the
/// source pod and inbound for the destination pod, both with security `node_local`.
pub(super) async fn relay_local(
    src: &PodContext,
    dst: &Arc<PodContext>,
    mut meta: ConnMeta,
    down: TcpStream,
    target: SocketAddr,
) {
    let shared = &src.shared;
    let security = SecurityPolicy::NodeLocal;
    meta.security = security;
    meta.labels.connection_security_policy = security;
    let mut inbound = inbound_meta(dst, shared.next_id(), meta.src, target, security);
    // The peer address is the source app's loopback socket, which names no pod: say which one it is.
    inbound.src_pod = Some(src.key.clone());
    inbound.labels.source_workload = src.name.clone();
    inbound.labels.source_workload_namespace = src.namespace.clone();
    for m in [&mut meta, &mut inbound] {
        if let Some(id) = &src.identity {
            m.source_identity = Some(id.to_string());
            m.labels.source_principal = id.to_string();
        }
        if let Some(id) = &dst.identity {
            m.destination_identity = Some(id.to_string());
            m.labels.destination_principal = id.to_string();
        }
    }
    if shared.ports.contains(target.port()) {
        // Forwarding to the destination's own proxy port over loopback would loop: refuse.
        for m in [&meta, &inbound] {
            shared.reject_conn(m, "conn_refused", "destination is a proxy port");
        }
        return;
    }
    // The same decision a tunnel would get: the source pod's identity and its own address (the
    // tunnel peer address HBONE would have shown), never the loopback socket the app used.
    let source_ip = src.ips.iter().find(|ip| ip.is_ipv4() == target.is_ipv4()).or(src.ips.first()).copied();
    // What the app would have seen without the mesh: the source pod's address and its app's port.
    // The source pod's netns holds that 4-tuple, not the destination's, so the port is free here.
    let app_source = source_ip.map(|ip| SocketAddr::new(ip, meta.src.port()));
    inbound.src = app_source.unwrap_or(inbound.src);
    let declared = deliver::declared(dst, target.port());
    let subject = AuthzSubject {
        workload: dst.key.clone(),
        source_ip,
        peer: src.identity.clone(),
        destination: target,
        http: declared != Some(AppProtocol::Tcp),
    };
    if let Err(denied) = shared.authorize(&mut inbound, subject) {
        // The source side records the refusal too, as a 403 from a tunnel would be.
        shared.reject_conn(&inbound, "conn_refused", &denied);
        shared.reject_conn(&meta, "conn_failed", &denied);
        return;
    }
    let app = if deliver::dial_early(shared, &inbound) {
        match connect_to_app(dst, target, app_source).await {
            Ok(app) => Some(app),
            Err(e) => {
                for m in [&meta, &inbound] {
                    shared.reject_conn(m, "conn_failed", &e.to_string());
                }
                return;
            }
        }
    } else {
        None
    };
    let out = shared.open_conn(meta);
    // The inbound record is the one policy changes re-check and the HTTP layer counts; the outbound
    // one gets the same totals at the end.
    let (reason, (sent, received)) =
        match deliver::deliver(dst, inbound, down, app, declared, app_source).await {
            Some(done) => (done.reason, done.bytes),
            None => (CloseReason::Closed("refused by the destination's policy".into()), (0, 0)),
        };
    out.stats().sent.store(sent, Ordering::Relaxed);
    out.stats().received.store(received, Ordering::Relaxed);
    out.close(&reason);
}
