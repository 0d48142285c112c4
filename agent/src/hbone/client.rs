//! The HBONE client: a pool of mutual-TLS HTTP/2 connections keyed by (source identity, tunnel
//! address), each carrying many CONNECT streams.
//!
//! One async mutex per key serializes the decision "reuse or open", so concurrent first connects to
//! the same destination share one TLS connection. A connection is reused while it is open, its peer
//! is one the caller accepts and it has a free stream slot; otherwise a new one replaces it in the
//! pool (the old one lives on until its streams end). Each connection has a driver task that
//! closes it after it has carried no stream for the idle timeout.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use h2::client::{Connection, SendRequest};
use http::{Method, Request, StatusCode, Uri};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::linger::Lingering;
use super::stream::HboneStream;
use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, STREAM_WINDOW};
use crate::config::AppProtocol;
use crate::identity::verifier::peer_identity;
use crate::identity::{IdentityStore, Rejection, SpiffeId, StoreError};

/// Tunables of an [`HbonePool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Limit on dialing plus the TLS and HTTP/2 handshakes of a new connection.
    pub connect_timeout: Duration,
    /// A pooled connection that has carried no stream for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(90) }
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The source identity has no usable client configuration.
    #[error("no TLS client identity for {src}: {source}")]
    Identity {
        /// The source identity.
        src: SpiffeId,
        /// Why the store refused.
        source: StoreError,
    },
    /// The TCP connection to the tunnel address failed.
    #[error("dialing HBONE tunnel {tunnel}: {source}")]
    Dial {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The TLS handshake failed (including a peer identity the verifier refused).
    #[error("TLS handshake with HBONE tunnel {tunnel}: {source}")]
    Tls {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// The handshake error; [`ConnectError::rejection`] extracts a certificate rejection.
        source: io::Error,
    },
    /// The peer's certificate carries no usable SPIFFE ID.
    #[error("HBONE tunnel {tunnel}: {source}")]
    PeerIdentity {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// Why the identity is unusable.
        source: Rejection,
    },
    /// Dial plus handshakes took too long.
    #[error("HBONE tunnel {tunnel} did not connect within {timeout:?}")]
    Timeout {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake with HBONE tunnel {tunnel}: {source}")]
    Http2 {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// The h2 error.
        source: h2::Error,
    },
    /// The target cannot be written as a CONNECT authority (an IPv6 zone, say).
    #[error("CONNECT target {authority} is not a valid authority: {source}")]
    Authority {
        /// The requested target.
        authority: SocketAddr,
        /// Why it does not parse.
        source: http::uri::InvalidUri,
    },
    /// The CONNECT request failed before a response arrived.
    #[error("CONNECT {authority} via HBONE tunnel {tunnel}: {source}")]
    Request {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// The requested target.
        authority: SocketAddr,
        /// The h2 error.
        source: h2::Error,
    },
    /// The peer answered the CONNECT with a status other than 200.
    #[error("CONNECT {authority} via HBONE tunnel {tunnel} was refused with status {status}")]
    Refused {
        /// The tunnel address.
        tunnel: SocketAddr,
        /// The requested target.
        authority: SocketAddr,
        /// The response status.
        status: StatusCode,
    },
}

impl ConnectError {
    /// The response status, when the peer refused the CONNECT.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The certificate rejection, when the handshake failed because the peer's SVID was refused.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            ConnectError::PeerIdentity { source, .. } => Some(source),
            ConnectError::Tls { source, .. } => {
                source.get_ref()?.downcast_ref::<rustls::Error>().and_then(Rejection::from_rustls)
            }
            _ => None,
        }
    }
}

/// Pooled HBONE connections and the counters that show how they are shared.
#[derive(Debug, Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    identities: Arc<IdentityStore>,
    settings: PoolSettings,
    /// Source identity, then (source pod, tunnel address): looked up by reference, so a reuse
    /// allocates no key.
    slots: Mutex<HashMap<SpiffeId, HashMap<Route, Arc<Slot>>>>,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
    /// Connections whose driver still runs.
    live: AtomicUsize,
}

/// The current connection of one key; its lock is held while deciding to reuse or open one.
type Slot = tokio::sync::Mutex<Option<PooledConn>>;

/// Where a tunnelled connection comes from. Each source pod dials its own tunnels from its own
/// netns, so the destination sees the address the pod really has, and two pods sharing a service
/// account never share a connection (one would appear with the other's address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin<'a> {
    /// The source pod's identity, whose SVID the connection presents.
    pub identity: &'a SpiffeId,
    /// The source pod's netns cookie.
    pub netns: u64,
    /// The source app's port, told to the destination in `Forwarded` (0: not told).
    pub port: u16,
}

/// The pool key under the source identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Route {
    netns: u64,
    tunnel: SocketAddr,
}

#[derive(Debug)]
struct PooledConn {
    send: SendRequest<Bytes>,
    /// The server identity verified during the handshake.
    peer: SpiffeId,
    /// The tunnel socket's own address: the source IP the destination sees.
    local: Option<std::net::IpAddr>,
    shared: Arc<ConnShared>,
}

/// Set in [`ConnShared::state`] once a connection takes no more streams.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// What a connection's streams and its driver task share.
#[derive(Debug, Default)]
struct ConnShared {
    /// Live streams, plus [`CLOSED`].
    state: AtomicUsize,
    /// Bumped each time the stream count drops to zero, so the idle timer restarts.
    idle_epoch: AtomicU64,
    idle: Notify,
    /// Close as soon as no stream is left ([`HbonePool::close_all`]).
    closing: std::sync::atomic::AtomicBool,
}

impl ConnShared {
    fn streams(&self) -> usize {
        self.state.load(Ordering::Acquire) & !CLOSED
    }

    fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
    }
}

/// One stream's claim on a pooled connection; released when the stream is dropped.
#[derive(Debug)]
pub(super) struct Lease(Arc<ConnShared>);

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.state.fetch_sub(1, Ordering::AcqRel) & !CLOSED == 1 {
            self.0.idle_epoch.fetch_add(1, Ordering::AcqRel);
            self.0.idle.notify_one();
        }
    }
}

impl PooledConn {
    /// Claims a stream slot when this connection can take one more stream to an allowed peer.
    fn try_lease(&mut self, allowed_peers: &[SpiffeId]) -> Option<Lease> {
        if !allowed_peers.contains(&self.peer) {
            return None;
        }
        // Not ready means broken (error) or still opening the previous stream at the peer's limit.
        match self.send.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                self.shared.close();
                return None;
            }
            Poll::Pending => return None,
        }
        let max = self.send.current_max_send_streams();
        self.shared
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & CLOSED == 0 && s < max).then_some(s + 1)
            })
            .ok()?;
        Some(Lease(self.shared.clone()))
    }
}

impl HbonePool {
    /// An empty pool presenting identities from `identities`.
    pub fn new(identities: Arc<IdentityStore>, settings: PoolSettings) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                identities,
                settings,
                slots: Mutex::default(),
                connections_opened: AtomicU64::new(0),
                streams_opened: AtomicU64::new(0),
                live: AtomicUsize::new(0),
            }),
        }
    }

    /// Connections open now (pooled, or finishing their last streams).
    pub fn live_connections(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Closes every pooled connection once its streams are done, gracefully (an agent that
    /// handed over and drained). New connects still open new connections.
    pub fn close_all(&self) {
        let slots = std::mem::take(&mut *self.inner.lock_slots());
        for slot in slots.into_values().flat_map(HashMap::into_values) {
            if let Ok(mut conn) = slot.try_lock()
                && let Some(conn) = conn.take()
            {
                conn.shared.closing.store(true, Ordering::Release);
                conn.shared.close();
                conn.shared.idle.notify_one();
            }
        }
    }

    /// TLS connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections_opened.load(Ordering::Relaxed)
    }

    /// CONNECT streams opened so far.
    pub fn streams_opened(&self) -> u64 {
        self.inner.streams_opened.load(Ordering::Relaxed)
    }

    /// Opens a tunnel to `authority` through the HBONE endpoint `tunnel`, presenting the SVID of
    /// `origin.identity` and accepting only a server whose identity is in `allowed_peers`. A pooled connection is
    /// reused when possible; otherwise `dial` makes the TCP connection (from the source pod's network
    /// namespace). `protocol` is the target port's declared protocol, told to the destination.
    /// Returns the stream once the peer answered 200, with the peer's verified identity.
    pub async fn connect<D, F>(
        &self,
        origin: Origin<'_>,
        tunnel: SocketAddr,
        authority: SocketAddr,
        protocol: Option<AppProtocol>,
        allowed_peers: &[SpiffeId],
        dial: D,
    ) -> Result<(HboneStream, SpiffeId), ConnectError>
    where
        D: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let src = origin.identity;
        let route = Route { netns: origin.netns, tunnel };
        let slot = self.slot(src, route);
        let mut dial = Some(dial);
        loop {
            let (response, send_stream, lease, peer, fresh) = {
                let mut current = slot.lock().await;
                let mut existing = current.take();
                let reused = existing.as_mut().and_then(|c| c.try_lease(allowed_peers));
                let (mut conn, lease, fresh) = match (existing, reused, dial.take()) {
                    (Some(conn), Some(lease), unused) => {
                        // Kept for one retry should this connection turn out to be dead.
                        dial = unused;
                        (conn, lease, false)
                    }
                    (existing, _, Some(dial)) => match self.open(src, route, allowed_peers, dial).await {
                        Ok(mut conn) => match conn.try_lease(allowed_peers) {
                            Some(lease) => (conn, lease, true),
                            None => {
                                // Broken before its first stream.
                                let source = h2::Error::from(Reason::REFUSED_STREAM);
                                return Err(ConnectError::Request { tunnel, authority, source });
                            }
                        },
                        Err(e) => {
                            // A full or otherwise unusable connection still serves other callers.
                            *current = existing;
                            return Err(e);
                        }
                    },
                    // Only a fresh connection consumes `dial`, and a fresh connection is not retried.
                    (_, _, None) => {
                        let source = h2::Error::from(Reason::REFUSED_STREAM);
                        return Err(ConnectError::Request { tunnel, authority, source });
                    }
                };
                let source =
                    conn.local.filter(|_| origin.port != 0).map(|ip| SocketAddr::new(ip, origin.port));
                let request = connect_request(authority, protocol, source)
                    .map_err(|source| ConnectError::Authority { authority, source })?;
                match conn.send.send_request(request, false) {
                    Ok((response, send_stream)) => {
                        let peer = conn.peer.clone();
                        *current = Some(conn);
                        (response, send_stream, lease, peer, fresh)
                    }
                    Err(source) => {
                        // Dropped, not put back: this connection takes no more streams.
                        conn.shared.close();
                        if fresh {
                            return Err(ConnectError::Request { tunnel, authority, source });
                        }
                        continue;
                    }
                }
            };
            self.inner.streams_opened.fetch_add(1, Ordering::Relaxed);
            let response = match response.await {
                Ok(response) => response,
                Err(source) if !fresh && retryable(&source) => {
                    // The pooled connection died before the peer saw any data: retry on a new one.
                    lease.0.close();
                    continue;
                }
                Err(source) => return Err(ConnectError::Request { tunnel, authority, source }),
            };
            if response.status() != StatusCode::OK {
                return Err(ConnectError::Refused { tunnel, authority, status: response.status() });
            }
            let stream = HboneStream::new(send_stream, response.into_body()).with_lease(lease);
            return Ok((stream, peer));
        }
    }

    fn slot(&self, src: &SpiffeId, route: Route) -> Arc<Slot> {
        let mut slots = self.inner.lock_slots();
        if let Some(slot) = slots.get(src).and_then(|by_route| by_route.get(&route)) {
            return slot.clone();
        }
        slots.entry(src.clone()).or_default().entry(route).or_default().clone()
    }

    /// Dials, handshakes TLS then HTTP/2, and starts the connection's driver task.
    async fn open<D, F>(
        &self,
        src: &SpiffeId,
        route: Route,
        allowed_peers: &[SpiffeId],
        dial: D,
    ) -> Result<PooledConn, ConnectError>
    where
        D: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let config = self
            .inner
            .identities
            .client_config_for(src, allowed_peers.iter().cloned())
            .map_err(|source| ConnectError::Identity { src: src.clone(), source })?;
        let tunnel = route.tunnel;
        let handshakes = async {
            let tcp = dial(tunnel).await.map_err(|source| ConnectError::Dial { tunnel, source })?;
            tcp.set_nodelay(true).map_err(|source| ConnectError::Dial { tunnel, source })?;
            let local = tcp.local_addr().ok().map(|a| a.ip());
            // The SPIFFE verifier ignores the name; an IP name also keeps SNI off the wire.
            let name = ServerName::IpAddress(tunnel.ip().into());
            let tls = TlsConnector::from(Arc::new(config))
                .connect(name, Lingering::new(tcp))
                .await
                .map_err(|source| ConnectError::Tls { tunnel, source })?;
            let peer = peer_identity(tls.get_ref().1.peer_certificates())
                .map_err(|source| ConnectError::PeerIdentity { tunnel, source })?;
            let (send, connection) = h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .max_header_list_size(MAX_HEADER_LIST_SIZE)
                .enable_push(false)
                .handshake(tls)
                .await
                .map_err(|source| ConnectError::Http2 { tunnel, source })?;
            Ok((send, connection, peer, local))
        };
        let timeout = self.inner.settings.connect_timeout;
        let (send, connection, peer, local) = tokio::time::timeout(timeout, handshakes)
            .await
            .map_err(|_| ConnectError::Timeout { tunnel, timeout })??;
        self.inner.connections_opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%src, %tunnel, %peer, "HBONE connection opened");
        let shared = Arc::new(ConnShared::default());
        let driver = Driver {
            pool: Arc::downgrade(&self.inner),
            src: src.clone(),
            route,
            shared: shared.clone(),
            idle_timeout: self.inner.settings.idle_timeout,
        };
        self.inner.live.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(driver.run(connection));
        Ok(PooledConn { send, peer, local, shared })
    }
}

impl PoolInner {
    fn lock_slots(&self) -> MutexGuard<'_, HashMap<SpiffeId, HashMap<Route, Arc<Slot>>>> {
        // The map stays consistent even if a holder panicked: every update is a single call.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The authority-form CONNECT request for `authority`, saying where the app connected from when
/// `source` is known.
fn connect_request(
    authority: SocketAddr,
    protocol: Option<AppProtocol>,
    source: Option<SocketAddr>,
) -> Result<Request<()>, http::uri::InvalidUri> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    if let Some(source) = source
        && let Ok(value) = http::HeaderValue::try_from(super::server::forwarded_value(source))
    {
        request.headers_mut().insert(http::header::FORWARDED, value);
    }
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert(super::PROTOCOL_HEADER, http::HeaderValue::from_static(protocol.as_str()));
    }
    // A bare `ip:port` parses as an authority-form URI: no scheme, no path, as CONNECT requires.
    *request.uri_mut() = Uri::try_from(authority.to_string())?;
    Ok(request)
}

/// Errors that mean the connection, not the request, failed: nothing reached the target yet.
fn retryable(e: &h2::Error) -> bool {
    e.is_io() || e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM)
}

/// Drives one connection, closes it once idle, and removes it from the pool when it ends.
struct Driver {
    pool: Weak<PoolInner>,
    src: SpiffeId,
    route: Route,
    shared: Arc<ConnShared>,
    idle_timeout: Duration,
}

impl Driver {
    async fn run(self, connection: Connection<TlsStream<Lingering>, Bytes>) {
        tokio::pin!(connection);
        let outcome = 'drive: loop {
            while self.shared.streams() > 0 {
                tokio::select! {
                    r = &mut connection => break 'drive r.map_err(|e| e.to_string()),
                    () = self.shared.idle.notified() => {}
                }
            }
            if self.shared.closing.load(Ordering::Acquire) {
                break Ok(());
            }
            let epoch = self.shared.idle_epoch.load(Ordering::Acquire);
            tokio::select! {
                r = &mut connection => break r.map_err(|e| e.to_string()),
                () = self.shared.idle.notified() => {}
                () = tokio::time::sleep(self.idle_timeout) => {
                    // Closes only if no stream came and went meanwhile and none is live now.
                    let quiet = self.shared.idle_epoch.load(Ordering::Acquire) == epoch;
                    let (state, order) = (&self.shared.state, Ordering::AcqRel);
                    if quiet && state.compare_exchange(0, CLOSED, order, Ordering::Acquire).is_ok() {
                        break Ok(());
                    }
                }
            }
        };
        self.shared.close();
        tracing::debug!(src = %self.src, tunnel = %self.route.tunnel, ?outcome, "HBONE connection closed");
        self.evict();
        if let Some(pool) = self.pool.upgrade() {
            pool.live.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes the pool entry when it still holds this (now closed) connection. An entry someone is
    /// using is left alone: they will see the connection closed and replace it.
    fn evict(&self) {
        let Some(pool) = self.pool.upgrade() else { return };
        let mut slots = pool.lock_slots();
        let Some(by_route) = slots.get_mut(&self.src) else { return };
        let stale = by_route.get(&self.route).is_some_and(|slot| {
            slot.try_lock().is_ok_and(|c| c.as_ref().is_none_or(|c| Arc::ptr_eq(&c.shared, &self.shared)))
        });
        if stale {
            by_route.remove(&self.route);
        }
        if by_route.is_empty() {
            slots.remove(&self.src);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Barrier;

    use super::super::server::Refusal;
    use super::super::test_support::{
        Mesh, closed_port, echo_upstream, nowhere, refusing_server, relaying_server,
        reply_after_eof_upstream, start_server, tunnel_to,
    };
    use super::*;
    use crate::identity::RejectReason;
    use crate::proxy::relay::CloseReason;

    /// A server that accepts every CONNECT and keeps the tunnel until the client ends it.
    async fn holding_server(mesh: &Mesh) -> super::super::test_support::TestServer {
        start_server(mesh.server_config(), |_| async {
            Ok(|mut s: HboneStream| async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            })
        })
        .await
    }

    #[tokio::test]
    async fn connect_round_trip_each_side_learns_the_other() {
        let mesh = Mesh::new();
        let app = echo_upstream().await;
        let (server, mut reports) = relaying_server(mesh.server_config()).await;
        let pool = mesh.pool();
        let (mut tunnel, peer) = tunnel_to(&mesh, &pool, &server, app).await.unwrap();
        assert_eq!(peer, mesh.server);

        tunnel.write_all(b"ping over hbone").await.unwrap();
        let mut echo = [0u8; 15];
        tunnel.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping over hbone");
        tunnel.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let report = reports.recv().await.unwrap();
        assert_eq!(report.peer, mesh.client);
        assert_eq!(report.target, app);
        assert_eq!(report.reason, CloseReason::Eof);
        assert_eq!((report.sent, report.received), (15, 15));
        assert_eq!((pool.connections_opened(), pool.streams_opened()), (1, 1));
    }

    #[tokio::test]
    async fn many_streams_share_one_tls_connection() {
        const STREAMS: usize = 20;
        let mesh = Arc::new(Mesh::new());
        let app = echo_upstream().await;
        let (server, _reports) = relaying_server(mesh.server_config()).await;
        let server = Arc::new(server);
        let pool = mesh.pool();
        // All streams are open at once before any of them sends, so they truly overlap.
        let all_open = Arc::new(Barrier::new(STREAMS));
        let tasks: Vec<_> = (0..STREAMS)
            .map(|i| {
                let (mesh, pool, server, all_open) =
                    (mesh.clone(), pool.clone(), server.clone(), all_open.clone());
                tokio::spawn(async move {
                    let (mut tunnel, _) = tunnel_to(&mesh, &pool, &server, app).await.unwrap();
                    all_open.wait().await;
                    let msg = format!("stream {i:02}");
                    tunnel.write_all(msg.as_bytes()).await.unwrap();
                    tunnel.shutdown().await.unwrap();
                    let mut echo = String::new();
                    tunnel.read_to_string(&mut echo).await.unwrap();
                    assert_eq!(echo, msg);
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap();
        }
        assert_eq!(server.accepted(), 1, "the server accepted more than one TCP connection");
        assert_eq!(pool.connections_opened(), 1);
        assert_eq!(pool.streams_opened(), STREAMS as u64);
    }

    #[tokio::test]
    async fn half_close_crosses_the_tunnel_both_ways() {
        let mesh = Mesh::new();
        // The app answers only after it has seen EOF.
        let app = reply_after_eof_upstream(b"reply after eof").await;
        let (server, mut reports) = relaying_server(mesh.server_config()).await;
        let (mut tunnel, _) = tunnel_to(&mesh, &mesh.pool(), &server, app).await.unwrap();
        tunnel.write_all(b"hello").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_string(&mut reply))
            .await
            .expect("the EOF never reached the app, or its reply never came back")
            .unwrap();
        assert_eq!(reply, "reply after eof got 5 bytes");
        let report = reports.recv().await.unwrap();
        assert_eq!(report.reason, CloseReason::Eof);
        assert_eq!((report.sent, report.received), (5, reply.len() as u64));
    }

    #[tokio::test]
    async fn a_refused_target_yields_the_status_and_no_stream() {
        let mesh = Mesh::new();
        let server = refusing_server(&mesh, Refusal::forbidden("target is not served here")).await;
        let pool = mesh.pool();
        let err = tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");
        assert!(err.to_string().contains("403"), "{err}");

        // An app that refuses the connection is a 503 from the relaying server.
        let (relaying, _reports) = relaying_server(mesh.server_config()).await;
        let err = tunnel_to(&mesh, &pool, &relaying, closed_port().await).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{err}");

        // Refusals end streams, not the pooled connection.
        let err = tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");
        assert_eq!((server.accepted(), pool.connections_opened(), pool.streams_opened()), (1, 2, 3));
    }

    #[tokio::test]
    async fn a_server_outside_the_allowed_peers_is_refused_in_the_handshake() {
        let mesh = Mesh::new();
        let handled = Arc::new(AtomicUsize::new(0));
        let imposter_config = Arc::new(mesh.store.server_config_for(&mesh.imposter).unwrap());
        let server = {
            let handled = handled.clone();
            start_server(imposter_config, move |_| {
                handled.fetch_add(1, Ordering::SeqCst);
                async { Ok(|s: HboneStream| async move { drop(s) }) }
            })
            .await
        };
        let pool = mesh.pool();
        let err = tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap_err();
        let rejection = err.rejection().unwrap_or_else(|| panic!("no certificate rejection in {err}"));
        assert_eq!(rejection.reason, RejectReason::UnexpectedIdentity);
        assert!(rejection.detail.contains("imposter"), "{}", rejection.detail);
        assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
        assert_eq!(mesh.store.rejection_counters().get(RejectReason::UnexpectedIdentity), 1);
        assert_eq!(handled.load(Ordering::SeqCst), 0);
        assert_eq!((pool.connections_opened(), pool.streams_opened()), (0, 0));
    }

    #[tokio::test]
    async fn the_pool_replaces_a_connection_the_server_closed() {
        let mesh = Mesh::new();
        let app = echo_upstream().await;
        let (server, _reports) = relaying_server(mesh.server_config()).await;
        let pool = mesh.pool();
        let echo_once = |mut tunnel: HboneStream| async move {
            tunnel.write_all(b"x").await.unwrap();
            tunnel.shutdown().await.unwrap();
            let mut back = Vec::new();
            tunnel.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"x");
        };
        echo_once(tunnel_to(&mesh, &pool, &server, app).await.unwrap().0).await;
        // On the test's single-threaded runtime the close is only processed once the next CONNECT
        // is in flight on the dead connection: that request fails and is retried on a new one.
        server.close_connections();
        echo_once(tunnel_to(&mesh, &pool, &server, app).await.unwrap().0).await;
        assert_eq!((server.accepted(), pool.connections_opened(), pool.streams_opened()), (2, 2, 3));

        // Once the close has been noticed, the dead connection is replaced without a failed request.
        server.close_connections();
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo_once(tunnel_to(&mesh, &pool, &server, app).await.unwrap().0).await;
        assert_eq!((server.accepted(), pool.connections_opened(), pool.streams_opened()), (3, 3, 4));
    }

    #[tokio::test]
    async fn a_full_connection_makes_the_pool_open_another() {
        let mesh = Mesh::new();
        let server = holding_server(&mesh).await;
        let pool = mesh.pool();
        let limit = super::super::server::MAX_CONCURRENT_STREAMS as usize;
        let mut open = Vec::new();
        for _ in 0..limit {
            open.push(tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap().0);
        }
        assert_eq!(pool.connections_opened(), 1);
        open.push(tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap().0);
        assert_eq!((pool.connections_opened(), server.accepted()), (2, 2));

        // Ending streams frees slots on the newest connection, which is the pooled one.
        open.truncate(10);
        tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap();
        assert_eq!(pool.connections_opened(), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_leaves_the_pool() {
        let mesh = Mesh::new();
        let server = holding_server(&mesh).await;
        let settings = PoolSettings { idle_timeout: Duration::from_millis(200), ..PoolSettings::default() };
        let pool = HbonePool::new(mesh.store.clone(), settings);
        let (tunnel, _) = tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap();
        // A live stream keeps the connection however long it lasts.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (second, _) = tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap();
        assert_eq!(pool.connections_opened(), 1);
        drop((tunnel, second));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(pool.inner.lock_slots().is_empty(), "the idle connection is still pooled");
        tunnel_to(&mesh, &pool, &server, nowhere()).await.unwrap();
        assert_eq!((pool.connections_opened(), server.accepted()), (2, 2));
    }
}
