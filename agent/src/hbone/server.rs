//! The HBONE server side: one accepted TCP connection on the tunnel port, a mutual-TLS handshake
//! that yields the client's SPIFFE ID, then an HTTP/2 server whose CONNECT requests each become a
//! tunnel the caller's handler accepts (200 and a relay) or refuses (its status).

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::stream::HboneStream;
use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, STREAM_WINDOW};
use crate::config::AppProtocol;
use crate::identity::tls::ALPN_H2;
use crate::identity::verifier::peer_identity;
use crate::identity::{Rejection, SpiffeId};

/// Limit on the TLS handshake plus the client's HTTP/2 preface, so idle sockets cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one client may have open on one connection. Each costs a task, relay buffers and an
/// upstream socket, while the receive buffers of all of them together are bounded by the connection
/// window. One HTTP/2 connection is driven by a single task, so past this the client pool opens
/// another TLS connection, which spreads heavy fan-in over cores. Go's HTTP/2 server uses 250,
/// hyper 200, nginx 128.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Streams the client may reset before we accepted them (the "rapid reset" attack, CVE-2023-44487)
/// before the connection is closed with ENHANCE_YOUR_CALM. Accepting is immediate here, so a
/// well-behaved client stays far below this.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams we may reset because of the client's protocol errors before closing the connection.
/// A correct HBONE client makes none.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 64;

/// Why a CONNECT is turned down, with the status the client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    status: StatusCode,
    reason: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with `status`; a 2xx status would read as acceptance, so it becomes 500.
    pub fn new(status: StatusCode, reason: impl Into<Cow<'static, str>>) -> Self {
        let status = if status.is_success() { StatusCode::INTERNAL_SERVER_ERROR } else { status };
        Self { status, reason: reason.into() }
    }

    /// 403: the target is not a workload this node serves, or policy denies the peer.
    pub fn forbidden(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason)
    }

    /// 503: the target refused or could not be reached.
    pub fn unavailable(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, reason)
    }

    /// The status sent to the client.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Why, for logs (not sent to the client).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Why an HBONE connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket failed before the handshake.
    #[error("HBONE connection: {0}")]
    Socket(#[source] io::Error),
    /// The TLS handshake failed (including a client certificate the verifier refused).
    #[error("TLS handshake with {remote}: {source}")]
    Tls {
        /// The client's address.
        remote: SocketAddr,
        /// The handshake error.
        source: io::Error,
    },
    /// The client did not finish the handshakes in time.
    #[error("HBONE client {remote} did not finish its handshakes within {HANDSHAKE_TIMEOUT:?}")]
    Timeout {
        /// The client's address.
        remote: SocketAddr,
    },
    /// The client did not negotiate HTTP/2 through ALPN.
    #[error("HBONE client {remote} did not negotiate ALPN h2")]
    Alpn {
        /// The client's address.
        remote: SocketAddr,
    },
    /// The client's certificate carries no usable SPIFFE ID.
    #[error("HBONE client {remote}: {source}")]
    PeerIdentity {
        /// The client's address.
        remote: SocketAddr,
        /// Why the identity is unusable.
        source: Rejection,
    },
    /// The HTTP/2 connection failed.
    #[error("HTTP/2 with HBONE client {remote} ({peer}): {source}")]
    Http2 {
        /// The client's address.
        remote: SocketAddr,
        /// The client's identity.
        peer: SpiffeId,
        /// The h2 error.
        source: h2::Error,
    },
}

/// What one CONNECT asks for, as the handler sees it.
#[derive(Clone, Debug)]
pub struct Connect {
    /// The target, `ip:port`.
    pub target: SocketAddr,
    /// The client's verified identity.
    pub peer: SpiffeId,
    /// The protocol the client declared for the target, if any.
    pub protocol: Option<AppProtocol>,
    /// The source address the client says its app connected from (`Forwarded: for=`); the
    /// handler decides whether to believe it.
    pub forwarded_for: Option<SocketAddr>,
}

/// Serves one accepted HBONE connection until the client closes it. For each CONNECT, `handler`
/// gets the [`Connect`] and either refuses (the refusal's status is sent) or returns a relay, which
/// receives the tunnel after the 200 is sent. Streams run concurrently, one
/// task each. Once `drain` completes (the agent hands over), a GOAWAY tells the client to open its
/// next streams elsewhere, and the open ones finish here.
pub async fn serve<H, F, R, RF>(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    handler: H,
    drain: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    H: Fn(Connect) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<R, Refusal>> + Send + 'static,
    R: FnOnce(HboneStream) -> RF + Send + 'static,
    RF: Future<Output = ()> + Send + 'static,
{
    let remote = tcp.peer_addr().map_err(ServeError::Socket)?;
    tcp.set_nodelay(true).map_err(ServeError::Socket)?;
    let _serving = Serving::count();
    let handshakes = async {
        let tls = TlsAcceptor::from(config)
            .accept(super::linger::Lingering::new(tcp))
            .await
            .map_err(|source| ServeError::Tls { remote, source })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err(ServeError::Alpn { remote });
        }
        let peer = peer_identity(session.peer_certificates())
            .map_err(|source| ServeError::PeerIdentity { remote, source })?;
        let connection = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .handshake(tls)
            .await
            .map_err(|source| ServeError::Http2 { remote, peer: peer.clone(), source })?;
        Ok((connection, peer))
    };
    let (mut connection, peer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
        .await
        .map_err(|_| ServeError::Timeout { remote })??;
    tracing::debug!(%remote, %peer, "HBONE connection accepted");
    // Accepting also drives the connection, so it continues while stream tasks run.
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut drain, if !draining => {
                draining = true;
                tracing::debug!(%remote, %peer, "HBONE connection draining (GOAWAY)");
                connection.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        let (request, respond) =
            next.map_err(|source| ServeError::Http2 { remote, peer: peer.clone(), source })?;
        tokio::spawn(serve_stream(request, respond, peer.clone(), handler.clone()));
    }
    Ok(())
}

/// Tunnel connections being served now.
static SERVING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tunnel connections this agent serves now (a draining agent waits for none).
pub fn serving() -> usize {
    SERVING.load(std::sync::atomic::Ordering::Acquire)
}

/// Counts one served connection while it lives.
struct Serving;

impl Serving {
    fn count() -> Self {
        SERVING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Serving
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Answers one request: 405 for anything but CONNECT, 400 for a target that is not `ip:port`,
/// otherwise what the handler decides.
async fn serve_stream<H, F, R, RF>(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SpiffeId,
    handler: H,
) where
    H: Fn(Connect) -> F,
    F: Future<Output = Result<R, Refusal>>,
    R: FnOnce(HboneStream) -> RF,
    RF: Future<Output = ()>,
{
    let connect = match parse_connect(&request, &peer) {
        Ok(connect) => connect,
        Err(status) => return reply(&mut respond, status),
    };
    let authority = connect.target;
    let relay = match handler(connect).await {
        Ok(relay) => relay,
        Err(refusal) => {
            let (status, reason) = (refusal.status, &refusal.reason);
            tracing::debug!(%peer, %authority, %status, %reason, "HBONE CONNECT refused");
            return reply(&mut respond, refusal.status);
        }
    };
    let send = match respond.send_response(status_response(StatusCode::OK), false) {
        Ok(send) => send,
        Err(e) => {
            // The client gave up (reset) while the handler was deciding.
            tracing::debug!(%peer, %authority, error = %e, "HBONE stream gone before its 200");
            return;
        }
    };
    relay(HboneStream::new(send, request.into_body())).await;
}

/// What a request asks of the handler, or the status refusing it: 405 for anything but CONNECT,
/// 400 for a target that is not `ip:port`. Public so the fuzz target reaches it without HTTP/2.
pub fn parse_connect<B>(request: &Request<B>, peer: &SpiffeId) -> Result<Connect, StatusCode> {
    if request.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = target(request) else {
        tracing::debug!(%peer, uri = %request.uri(), "HBONE CONNECT with a malformed target");
        return Err(StatusCode::BAD_REQUEST);
    };
    let protocol = request
        .headers()
        .get(super::PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(AppProtocol::parse);
    let forwarded_for =
        request.headers().get(http::header::FORWARDED).and_then(|v| v.to_str().ok()).and_then(forwarded_for);
    Ok(Connect { target, peer: peer.clone(), protocol, forwarded_for })
}

/// The CONNECT target: an `ip:port` with a non-zero port; anything else is malformed here.
fn target<B>(request: &Request<B>) -> Option<SocketAddr> {
    let uri = request.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return None;
    }
    let addr: SocketAddr = uri.authority()?.as_str().parse().ok()?;
    (addr.port() != 0).then_some(addr)
}

/// The `for=` address of a `Forwarded` header (RFC 7239) that names an `ip:port`, as the HBONE
/// client writes it: `for="10.0.0.1:40000"` or `for="[fd00::1]:40000"`. Anything else is `None`.
pub fn forwarded_for(value: &str) -> Option<SocketAddr> {
    // Only the first element: the one closest to the app.
    let element = value.split(',').next()?;
    element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        if !key.eq_ignore_ascii_case("for") {
            return None;
        }
        value.trim().trim_matches('"').parse().ok()
    })
}

/// The `Forwarded` value naming `source`, as [`forwarded_for`] reads it.
pub fn forwarded_value(source: SocketAddr) -> String {
    format!("for=\"{source}\"")
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// Sends a final, body-less response.
fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    // Fails only when the client already reset the stream; there is no one left to tell.
    let _ = respond.send_response(status_response(status), true);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::HeaderValue;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn forwarded_for_reads_the_first_element_and_refuses_the_rest() {
        let v4: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:40000".parse().unwrap();
        for (value, want) in [
            (forwarded_value(v4), Some(v4)),
            (forwarded_value(v6), Some(v6)),
            ("For=\"10.0.0.1:40000\";proto=http".into(), Some(v4)),
            ("proto=http; for=\"[fd00::1]:40000\", for=\"10.9.9.9:1\"".into(), Some(v6)),
            ("for=10.0.0.1".into(), None),
            ("for=\"_hidden\"".into(), None),
            ("for=unknown".into(), None),
            ("by=\"10.0.0.1:40000\"".into(), None),
            ("".into(), None),
            ("for=\"[fd00::1]\"".into(), None),
        ] {
            assert_eq!(forwarded_for(&value), want, "{value}");
        }
    }
    use tokio::sync::Barrier;

    use super::super::test_support::{Mesh, TestServer, start_server};
    use super::*;

    /// A server whose handler counts calls and accepts, holding each tunnel until the client ends.
    async fn counting_server(mesh: &Mesh) -> (TestServer, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = start_server(mesh.server_config(), move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                Ok(|mut s: HboneStream| async move {
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut Vec::new()).await;
                })
            }
        })
        .await;
        (server, calls)
    }

    fn request(method: Method, uri: &str) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri.parse().unwrap();
        request
    }

    async fn status_of(client: &mut h2::client::SendRequest<Bytes>, request: Request<()>) -> StatusCode {
        let (response, _body) = client.send_request(request, false).unwrap();
        response.await.unwrap().status()
    }

    #[tokio::test]
    async fn only_connect_to_an_ip_and_port_reaches_the_handler() {
        let mesh = Mesh::new();
        let (server, calls) = counting_server(&mesh).await;
        let mut client = mesh.raw_client(&server).await;
        let get = request(Method::GET, "https://10.0.0.1:80/");
        assert_eq!(status_of(&mut client, get).await, StatusCode::METHOD_NOT_ALLOWED);
        for bad in ["example.com:80", "10.0.0.1:0", "[::1]"] {
            let connect = request(Method::CONNECT, bad);
            assert_eq!(status_of(&mut client, connect).await, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        for good in ["10.0.0.1:80", "[fd00::1]:8080"] {
            let connect = request(Method::CONNECT, good);
            assert_eq!(status_of(&mut client, connect).await, StatusCode::OK, "{good}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(server.accepted(), 1);
    }

    #[tokio::test]
    async fn oversized_headers_never_reach_the_handler() {
        let mesh = Mesh::new();
        let (server, calls) = counting_server(&mesh).await;
        let mut client = mesh.raw_client(&server).await;
        let mut connect = request(Method::CONNECT, "10.0.0.1:80");
        let big = HeaderValue::try_from("x".repeat(MAX_HEADER_LIST_SIZE as usize)).unwrap();
        connect.headers_mut().insert("x-padding", big);
        // The client may refuse to send it, or the server answers 431: either way, no tunnel.
        if let Ok((response, _body)) = client.send_request(connect, false)
            && let Ok(response) = response.await
        {
            assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn streams_of_one_connection_are_handled_concurrently() {
        let mesh = Mesh::new();
        // Each handler call waits for the other: handling them one at a time would never finish.
        let both_deciding = Arc::new(Barrier::new(2));
        let server = start_server(mesh.server_config(), move |_| {
            let both_deciding = both_deciding.clone();
            async move {
                both_deciding.wait().await;
                Ok(|s: HboneStream| async move { drop(s) })
            }
        })
        .await;
        let client = mesh.raw_client(&server).await;
        let (mut a, mut b) = (client.clone(), client);
        let both = async {
            tokio::join!(
                status_of(&mut a, request(Method::CONNECT, "10.0.0.1:80")),
                status_of(&mut b, request(Method::CONNECT, "10.0.0.2:80")),
            )
        };
        let statuses =
            tokio::time::timeout(Duration::from_secs(5), both).await.expect("streams were serialized");
        assert_eq!(statuses, (StatusCode::OK, StatusCode::OK));
    }

    #[tokio::test]
    async fn a_client_without_tls_is_refused() {
        let mesh = Mesh::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n").await.unwrap();
            tcp
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let never = |_| async { Ok(|s: HboneStream| async move { drop(s) }) };
        let err = serve(mesh.server_config(), tcp, never, std::future::pending()).await.unwrap_err();
        assert!(matches!(err, ServeError::Tls { .. }), "{err}");
        drop(client);
    }

    #[test]
    fn a_refusal_never_carries_a_success_status() {
        assert_eq!(Refusal::new(StatusCode::OK, "oops").status(), StatusCode::INTERNAL_SERVER_ERROR);
        let refusal = Refusal::forbidden("target is not served here");
        assert_eq!(
            (refusal.status(), refusal.reason()),
            (StatusCode::FORBIDDEN, "target is not served here")
        );
        assert_eq!(Refusal::unavailable("upstream refused").status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
