//! Fixtures for the HBONE tests: an identity store with real certificates from the embedded CA,
//! an HBONE server on loopback that counts the TCP connections it accepts, and upstream apps.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls::ServerConfig;
use rustls::pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::client::{ConnectError, HbonePool, PoolSettings};
use super::server::{Refusal, serve};
use super::stream::HboneStream;
use crate::identity::ca::{DEFAULT_NODE_VALIDITY, DEFAULT_ROOT_VALIDITY};
use crate::identity::{IdentityStore, RootCa, SpiffeId, StoreSettings, TrustDomain};
use crate::proxy::relay::{CloseReason, RelayStats, relay};

/// A node's identity store serving a client, a server and an imposter identity.
pub struct Mesh {
    /// The store.
    pub store: Arc<IdentityStore>,
    /// The source workload.
    pub client: SpiffeId,
    /// The destination workload.
    pub server: SpiffeId,
    /// A workload that is neither.
    pub imposter: SpiffeId,
}

impl Mesh {
    /// A fresh CA, node intermediate and store with the three identities issued.
    pub fn new() -> Self {
        let now = UnixTime::now();
        let td = TrustDomain::new("example.org").unwrap();
        let root = RootCa::generate(&td, DEFAULT_ROOT_VALIDITY, now).unwrap();
        let node = root.issue_node("node-a", DEFAULT_NODE_VALIDITY, now).unwrap();
        let bundle = node.trust_bundle().clone();
        let store = Arc::new(IdentityStore::new(Arc::new(node), bundle, StoreSettings::default()));
        let [client, server, imposter] =
            ["client", "server", "imposter"].map(|sa| SpiffeId::workload(&td, "default", sa).unwrap());
        for id in [&client, &server, &imposter] {
            store.add(id, now).unwrap();
        }
        Self { store, client, server, imposter }
    }

    /// A server config presenting the server identity.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::new(self.store.server_config_for(&self.server).unwrap())
    }

    /// An empty pool with default settings.
    pub fn pool(&self) -> HbonePool {
        HbonePool::new(self.store.clone(), PoolSettings::default())
    }

    /// An HTTP/2 client connection presenting the client identity, bypassing the pool, for sending
    /// requests the pool never sends.
    pub async fn raw_client(&self, server: &TestServer) -> h2::client::SendRequest<Bytes> {
        let config = self.store.client_config_for(&self.client, [self.server.clone()]).unwrap();
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = ServerName::IpAddress(server.addr.ip().into());
        let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let (send, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        send
    }
}

/// An HBONE server on loopback.
pub struct TestServer {
    /// Its address.
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl TestServer {
    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Drops every connection served so far, as a restarting server would.
    pub fn close_connections(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.close_connections();
    }
}

/// Starts an HBONE server with `handler` on a loopback port.
pub async fn start_server<H, F, R, RF>(config: Arc<ServerConfig>, handler: H) -> TestServer
where
    H: Fn(super::server::Connect) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<R, Refusal>> + Send + 'static,
    R: FnOnce(HboneStream) -> RF + Send + 'static,
    RF: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(Mutex::new(Vec::new()));
    let acceptor = {
        let (accepted, connections) = (accepted.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (config, handler) = (config.clone(), handler.clone());
                let task = tokio::spawn(async move {
                    if let Err(e) = serve(config, tcp, handler, std::future::pending()).await {
                        tracing::debug!(error = %e, "test HBONE connection ended");
                    }
                });
                connections.lock().unwrap().push(task);
            }
        })
    };
    TestServer { addr, accepted, connections, acceptor }
}

/// A server that refuses every CONNECT with `refusal`.
pub async fn refusing_server(mesh: &Mesh, refusal: Refusal) -> TestServer {
    start_server(mesh.server_config(), move |_| {
        std::future::ready(Err::<fn(HboneStream) -> std::future::Ready<()>, _>(refusal.clone()))
    })
    .await
}

/// What the relaying server saw of one tunnel.
#[derive(Debug)]
pub struct RelayReport {
    /// The CONNECT target.
    pub target: SocketAddr,
    /// The client's identity.
    pub peer: SpiffeId,
    /// How the relay ended.
    pub reason: CloseReason,
    /// Bytes from the tunnel to the app.
    pub sent: u64,
    /// Bytes from the app to the tunnel.
    pub received: u64,
}

/// A server whose handler connects to the CONNECT target and relays to it, as the inbound proxy
/// will; refuses with 503 when the target does not answer. Each finished relay is reported.
pub async fn relaying_server(
    config: Arc<ServerConfig>,
) -> (TestServer, tokio::sync::mpsc::UnboundedReceiver<RelayReport>) {
    let (reports, received) = tokio::sync::mpsc::unbounded_channel();
    let server = start_server(config, move |connect: super::server::Connect| {
        let (target, peer) = (connect.target, connect.peer);
        let reports = reports.clone();
        async move {
            let mut upstream =
                TcpStream::connect(target).await.map_err(|e| Refusal::unavailable(e.to_string()))?;
            Ok(move |mut tunnel: HboneStream| async move {
                let stats = RelayStats::default();
                let reason = relay(&mut tunnel, &mut upstream, &stats).await;
                let sent = stats.sent.load(Ordering::Relaxed);
                let received = stats.received.load(Ordering::Relaxed);
                let _ = reports.send(RelayReport { target, peer, reason, sent, received });
            })
        }
    })
    .await;
    (server, received)
}

/// A TCP app that echoes what it reads until EOF, then closes.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = socket.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP app that reads everything until EOF, then replies with `reply` and "got N bytes".
pub async fn reply_after_eof_upstream(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                socket.read_to_end(&mut got).await.unwrap();
                socket.write_all(reply).await.unwrap();
                socket.write_all(format!(" got {} bytes", got.len()).as_bytes()).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// Opens a tunnel to `target` through `server` as the mesh's client, expecting the server identity.
pub async fn tunnel_to(
    mesh: &Mesh,
    pool: &HbonePool,
    server: &TestServer,
    target: SocketAddr,
) -> Result<(HboneStream, SpiffeId), ConnectError> {
    let allowed = [mesh.server.clone()];
    let connect = pool.connect(
        super::Origin { identity: &mesh.client, netns: 1, port: 0 },
        server.addr,
        target,
        None,
        &allowed,
        TcpStream::connect,
    );
    tokio::time::timeout(Duration::from_secs(10), connect).await.expect("HBONE connect timed out")
}

/// A loopback address nothing listens on (the port was just released).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// An address for handlers that never connect anywhere.
pub fn nowhere() -> SocketAddr {
    SocketAddr::from(([10, 1, 1, 1], 80))
}

/// `len` bytes that differ per `seed` and do not repeat with any short period.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect()
}
