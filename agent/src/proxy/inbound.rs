//! The inbound plaintext path: a SYN from outside the pod, steered by sk_lookup (or redirected by
//! iptables) to the in-pod inbound listener, is handed to the app at the address the client dialled,
//! from the client's own address (transparent inbound; the client's port stays with the client's
//! own connection, which holds that 4-tuple in this netns). STRICT pods refuse it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{
    PodContext,
    authorize::AuthzSubject,
    conns::ConnMeta,
    deliver,
    sockets::{connect_from, connect_transparent},
};
use crate::{
    admin::model::Direction,
    config::{AppProtocol, Mode},
    metrics::{ConnLabels, Reporter, SecurityPolicy},
};

/// Builds the record of an inbound connection to `pod` from `peer` for `orig`.
pub(super) fn inbound_meta(
    pod: &PodContext,
    id: u64,
    peer: SocketAddr,
    orig: SocketAddr,
    security: SecurityPolicy,
) -> ConnMeta {
    let mut labels = ConnLabels::unknown(Reporter::Destination);
    labels.destination_workload = pod.name.clone();
    labels.destination_workload_namespace = pod.namespace.clone();
    labels.connection_security_policy = security;
    let src_pod = pod.shared.state().config.pod_by_ip(peer.ip()).map(|p| {
        labels.source_workload = p.name.clone();
        labels.source_workload_namespace = p.namespace.clone();
        p.key()
    });
    ConnMeta {
        id,
        direction: Direction::Inbound,
        pod: pod.key.clone(),
        src: peer,
        src_pod,
        original_dst: orig,
        endpoint: None,
        endpoint_pod: None,
        service: None,
        source_identity: None,
        destination_identity: None,
        security,
        labels,
        authz: None,
        subject: None,
        protocol: Default::default(),
    }
}

/// Handles one accepted inbound plaintext connection.
pub async fn handle(down: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let shared = &pod.shared;
    let id = shared.next_id();
    let orig = match shared.orig_dst.inbound(&down) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(pod = %pod.key, %peer, error = %e, "inbound connection has no destination");
            return;
        }
    };
    let mut meta = inbound_meta(&pod, id, peer, orig, SecurityPolicy::None);
    // The mode in force now: a change of mode (say, a PeerAuthentication) applies without
    // re-enrolling the pod.
    let mode = {
        let state = shared.state();
        state.config.pods.iter().find(|p| p.name == pod.name && p.namespace == pod.namespace).map(|p| p.mode)
    };
    if mode.unwrap_or(pod.mode) == Mode::Strict {
        // STRICT: only mutually authenticated tunnels may reach this pod.
        shared.reject_conn(&meta, "conn_refused", "plaintext refused: STRICT mode");
        return;
    }
    if shared.ports.contains(orig.port()) {
        // Forwarding to our own port over loopback would come straight back: refuse.
        shared.reject_conn(&meta, "conn_refused", "destination is a proxy port");
        return;
    }
    let declared = deliver::declared(&pod, orig.port());
    // Plaintext has no principal: only the source address is known to policy.
    let subject = AuthzSubject {
        workload: pod.key.clone(),
        source_ip: Some(peer.ip().to_canonical()),
        peer: None,
        destination: orig,
        http: declared != Some(AppProtocol::Tcp),
    };
    if let Err(denied) = shared.authorize(&mut meta, subject) {
        shared.reject_conn(&meta, "conn_refused", &denied);
        return;
    }
    // The client's port is taken in this netns by its own connection to `orig`: only its address.
    let source = Some(SocketAddr::new(peer.ip(), 0));
    let up = if deliver::dial_early(shared, &meta) {
        match connect_to_app(&pod, orig, source).await {
            Ok(up) => Some(up),
            Err(e) => {
                shared.reject_conn(&meta, "conn_failed", &e.to_string());
                return;
            }
        }
    } else {
        None
    };
    deliver::deliver(&pod, meta, down, up, declared, source).await;
}

/// Connects to the app for a connection to `orig` from `source`. With transparent inbound in the
/// pod, at `orig` itself from `source`, so the app sees the client's address as its peer and the
/// dialled address as its own. Otherwise (or when the app does not listen on `orig`, say only on
/// loopback or on the other family's wildcard) on loopback, where the app sees the proxy.
pub(super) async fn connect_to_app(
    pod: &PodContext,
    orig: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    // A link-local destination needs its interface's scope, which the loopback-bound transparent
    // socket cannot have: such connections take the loopback path.
    let scoped = matches!(orig.ip(), IpAddr::V6(v6) if v6.is_unicast_link_local());
    let transparent = pod.transparency.is_some() && !scoped;
    if let Some(source) = source.filter(|s| transparent && s.is_ipv4() == orig.is_ipv4()) {
        match connect_transparent(&pod.netns, source, orig).await {
            Ok(app) => return Ok(app),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::debug!(pod = %pod.key, %orig, "app not listening on the dialled address; trying loopback");
            }
            Err(e) => return Err(e),
        }
    }
    let (first, second) = match orig.ip() {
        IpAddr::V4(_) => (IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)),
        IpAddr::V6(_) => (IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    let app = match connect_from(&pod.netns, SocketAddr::new(first, orig.port())).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            connect_from(&pod.netns, SocketAddr::new(second, orig.port())).await
        }
        other => other,
    }?;
    // Requests and replies are written whole: Nagle would only hold the last segment back.
    let _ = app.set_nodelay(true);
    Ok(app)
}
