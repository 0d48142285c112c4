//! In-pod apps for the L7 tests, served by a tokio runtime of the test process from a listener
//! made inside a pod's network namespace (not its cgroup), like
//! [`crate::counting_server::CountingServer`]. Every app records what reached it, so a test can
//! show exactly what the mesh let through:
//!
//! - [`App::echo`]: a real hyper server, HTTP/1.1 (with upgrades) and h2c with prior knowledge.
//!   Each request is recorded ([`Received`]) and answered by what it asks for: `x-app-status: N`
//!   answers N; `content-type: application/grpc...` echoes the body with trailers `grpc-status`
//!   (from `x-app-grpc-status`, default 0) and `grpc-message`; `Connection: upgrade` with
//!   `Upgrade: websocket` switches (101), then writes [`UPGRADED_HELLO`] and echoes every byte;
//!   anything else gets 200 with a JSON summary of the request.
//! - [`App::capture`]: HTTP/1 read raw: the exact bytes of each request ([`RawRequest`], framed by
//!   its Content-Length or chunked body) and everything each connection sent, each request
//!   answered with [`CAPTURED_RESPONSE`]; HTTP/2 (prior knowledge) is served by hyper and recorded
//!   as [`Received`], answered 200 [`CAPTURED_BODY`].
//! - [`App::greeter`]: speaks first ([`App::greeting`] on accept), then echoes what it reads.
//!
//! Dropping an app shuts its runtime down: the listener and every connection close.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::Pod;

/// The HTTP/2 connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What the capturing app answers to every HTTP/1 request.
pub const CAPTURED_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nx-app: capture\r\n\r\ncaptured";
/// The body of the capturing app's answers (both versions).
pub const CAPTURED_BODY: &str = "captured";
/// What the echo app writes first on a connection it switched to another protocol.
pub const UPGRADED_HELLO: &[u8] = b"app-hello\n";

/// One request as a hyper-served app read it.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// Which accepted connection (from 0) it came on.
    pub conn: usize,
    /// `HTTP/1.1`, `HTTP/1.0` or `HTTP/2.0`.
    pub version: String,
    /// The method.
    pub method: String,
    /// The request target as received: HTTP/1's request-target, HTTP/2's `:path`.
    pub target: String,
    /// HTTP/2's `:authority` (or an absolute-form target's authority).
    pub authority: Option<String>,
    /// The header fields in the order they came, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body bytes that arrived.
    pub body: Vec<u8>,
    /// Whether the body ended normally (not reset or cut off).
    pub complete: bool,
    /// The request's trailers.
    pub trailers: Vec<(String, String)>,
}

impl Received {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The path of the target (without its query).
    pub fn path(&self) -> &str {
        let t = self.target.as_str();
        t.split('?').next().unwrap_or(t)
    }
}

/// One HTTP/1 request exactly as the capturing app read it.
#[derive(Debug, Clone, Serialize)]
pub struct RawRequest {
    /// Which accepted connection (from 0) it came on.
    pub conn: usize,
    /// Its bytes: head and body.
    pub bytes: Vec<u8>,
}

impl RawRequest {
    /// The request line, without its CRLF.
    pub fn request_line(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        text.split("\r\n").next().unwrap_or_default().to_owned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Echo,
    Capture,
    Greeter,
}

/// What an app saw, shared with its connections.
#[derive(Debug, Default)]
struct State {
    accepted: AtomicUsize,
    requests: Mutex<Vec<Received>>,
    raw: Mutex<Vec<RawRequest>>,
    /// Every byte each connection sent (capture and greeter apps; the echo app's after a switch).
    bytes: Mutex<BTreeMap<usize, Vec<u8>>>,
    greeting: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running app; see the module documentation.
#[derive(Debug)]
pub struct App {
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
    port: u16,
}

impl App {
    /// The hyper echo app on `[::]:port` in `pod`'s network namespace.
    pub fn echo(pod: &Pod, port: u16) -> Result<Self> {
        Self::start(pod, port, Kind::Echo, Vec::new())
    }

    /// The capturing app on `[::]:port` in `pod`'s network namespace.
    pub fn capture(pod: &Pod, port: u16) -> Result<Self> {
        Self::start(pod, port, Kind::Capture, Vec::new())
    }

    /// The server-first app on `[::]:port` in `pod`'s network namespace, greeting with `greeting`.
    pub fn greeter(pod: &Pod, port: u16, greeting: &[u8]) -> Result<Self> {
        Self::start(pod, port, Kind::Greeter, greeting.to_vec())
    }

    fn start(pod: &Pod, port: u16, kind: Kind, greeting: Vec<u8>) -> Result<Self> {
        let listener = pod.listen(port, 128)?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("app-{port}"))
            .enable_all()
            .build()
            .context("cannot start the app's runtime")?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener).context("cannot register the app's listener")?
        };
        let state = Arc::new(State { greeting, ..State::default() });
        runtime.spawn(accept_loop(listener, state.clone(), kind));
        Ok(Self { state, runtime: Some(runtime), port })
    }

    /// The port the app listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The greeting of a greeter app.
    pub fn greeting(&self) -> &[u8] {
        &self.state.greeting
    }

    /// How many connections the app accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// The requests recorded so far (hyper-served ones), in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        lock(&self.state.requests).clone()
    }

    /// The raw HTTP/1 requests the capturing app read so far, in arrival order.
    pub fn raw_requests(&self) -> Vec<RawRequest> {
        lock(&self.state.raw).clone()
    }

    /// Every byte each connection sent so far, by connection (capture and greeter apps, and the
    /// echo app's switched connections).
    pub fn conn_bytes(&self) -> BTreeMap<usize, Vec<u8>> {
        lock(&self.state.bytes).clone()
    }

    /// All bytes of [`App::conn_bytes`] together.
    pub fn bytes_received(&self) -> usize {
        lock(&self.state.bytes).values().map(Vec::len).sum()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, kind: Kind) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("ferry-tests: app accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = state.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_conn(stream, conn, state.clone(), kind));
    }
}

async fn serve_conn(mut stream: TcpStream, conn: usize, state: Arc<State>, kind: Kind) {
    if kind == Kind::Greeter {
        let _ = greet(&mut stream, conn, &state).await;
        return;
    }
    let h2 = sniff_h2(&stream).await;
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |request| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(respond(request, conn, state, kind).await) }
    });
    let io = TokioIo::new(stream);
    let served = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
    } else if kind == Kind::Capture {
        let _ = capture_h1(io.into_inner(), conn, &state).await;
        Ok(())
    } else {
        hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades().await
    };
    if let Err(e) = served {
        // Clients that reset or misbehave on purpose end here; nothing to report.
        let _ = e;
    }
}

/// Whether the connection starts with the HTTP/2 preface (peeked, so nothing is consumed).
async fn sniff_h2(stream: &TcpStream) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 24];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return false;
        }
        if n == H2_PREFACE.len() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn greet(stream: &mut TcpStream, conn: usize, state: &State) -> std::io::Result<()> {
    lock(&state.bytes).entry(conn).or_default();
    stream.write_all(&state.greeting).await?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        lock(&state.bytes).entry(conn).or_default().extend_from_slice(&buf[..n]);
        stream.write_all(&buf[..n]).await?;
    }
}

/// Reads HTTP/1 requests raw, records each, answers each with [`CAPTURED_RESPONSE`].
async fn capture_h1(mut stream: TcpStream, conn: usize, state: &State) -> std::io::Result<()> {
    lock(&state.bytes).entry(conn).or_default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some(len) = request_len(&buf) {
            let bytes: Vec<u8> = buf.drain(..len).collect();
            lock(&state.raw).push(RawRequest { conn, bytes });
            stream.write_all(CAPTURED_RESPONSE).await?;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        lock(&state.bytes).entry(conn).or_default().extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// The length of the complete HTTP/1 request at the start of `buf` (CRLF framing, as a proxy must
/// emit it), or `None` while it is incomplete.
pub fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n", 0)? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut length = 0usize;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        }
    }
    if !chunked {
        return (buf.len() >= head_end + length).then_some(head_end + length);
    }
    let mut pos = head_end;
    loop {
        let line_end = find(buf, b"\r\n", pos)?;
        let size_text = String::from_utf8_lossy(&buf[pos..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            if buf.get(pos..pos + 2)? == b"\r\n" {
                return Some(pos + 2);
            }
            return find(buf, b"\r\n\r\n", pos).map(|p| p + 4);
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        pos += size + 2;
    }
}

fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

/// Whether a request asks to switch to WebSocket.
fn wants_websocket(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

async fn respond(
    mut request: Request<Incoming>,
    conn: usize,
    state: Arc<State>,
    kind: Kind,
) -> Response<Frames> {
    let upgrade = (kind == Kind::Echo
        && request.version() == http::Version::HTTP_11
        && wants_websocket(request.headers()))
    .then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let (body, trailers, complete) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().map(pairs).unwrap_or_default();
            (collected.to_bytes().to_vec(), trailers, true)
        }
        Err(_) => (Vec::new(), Vec::new(), false),
    };
    let target = match parts.version {
        http::Version::HTTP_2 => {
            parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default()
        }
        _ => parts.uri.to_string(),
    };
    let received = Received {
        conn,
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        target,
        authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
        headers: pairs(&parts.headers),
        body,
        complete,
        trailers,
    };
    let summary = serde_json::json!({
        "method": received.method, "target": received.target, "version": received.version,
        "body_bytes": received.body.len(),
    });
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let status = parts
        .headers
        .get("x-app-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    let grpc_status =
        parts.headers.get("x-app-grpc-status").cloned().unwrap_or(HeaderValue::from_static("0"));
    let echoed = Bytes::from(received.body.clone());
    lock(&state.requests).push(received);

    if kind == Kind::Capture {
        return Frames::response(
            StatusCode::OK,
            "text/plain",
            [Frame::data(Bytes::from_static(CAPTURED_BODY.as_bytes()))],
        );
    }
    if let Some(upgrade) = upgrade {
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let _ = echo_upgraded(TokioIo::new(upgraded), conn, &state).await;
            }
        });
        let mut response = Response::new(Frames::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-accept", HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        return response;
    }
    if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", grpc_status);
        trailers.insert("grpc-message", HeaderValue::from_static("echoed"));
        return Frames::response(
            StatusCode::OK,
            "application/grpc",
            [Frame::data(echoed), Frame::trailers(trailers)],
        );
    }
    let body = Bytes::from(summary.to_string());
    let mut response = Frames::response(status, "application/json", [Frame::data(body)]);
    response.headers_mut().insert("x-app", HeaderValue::from_static("echo"));
    response
}

async fn echo_upgraded(
    mut io: TokioIo<hyper::upgrade::Upgraded>,
    conn: usize,
    state: &State,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    lock(&state.bytes).entry(conn).or_default();
    io.write_all(UPGRADED_HELLO).await?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return io.shutdown().await;
        }
        lock(&state.bytes).entry(conn).or_default().extend_from_slice(&buf[..n]);
        io.write_all(&buf[..n]).await?;
    }
}

/// A response body of ready frames: data, then trailers if any; its length is exact when it has
/// no trailers (so HTTP/1 answers carry a Content-Length).
#[derive(Debug, Default)]
pub struct Frames(VecDeque<Frame<Bytes>>);

impl Frames {
    fn response<const N: usize>(
        status: StatusCode,
        content_type: &'static str,
        frames: [Frame<Bytes>; N],
    ) -> Response<Self> {
        let mut response = Response::new(Frames(frames.into()));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.0.iter().any(|f| f.is_trailers()) {
            return SizeHint::default();
        }
        let len: usize = self.0.iter().filter_map(|f| f.data_ref()).map(Bytes::len).sum();
        SizeHint::with_exact(len as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_len_frames_by_length_and_chunks() {
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(request_len(get), Some(get.len()));
        assert_eq!(request_len(&get[..get.len() - 1]), None);
        let post = b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET";
        assert_eq!(request_len(post), Some(post.len() - 3));
        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nnext";
        assert_eq!(request_len(chunked), Some(chunked.len() - 4));
        let trailers = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n\r\n";
        assert_eq!(request_len(trailers), Some(trailers.len()));
        assert_eq!(request_len(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab"), None);
    }
}
