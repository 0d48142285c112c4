//! The destination agent's HTTP server: hyper serves HTTP/1.1 or HTTP/2 (prior knowledge) on one
//! downstream connection, and each request is checked ([`harden`](super::harden)), normalized,
//! authorized, given correlation headers, and streamed to the app over that connection's own
//! [`Upstream`]. Every request is reported once, when its response ended.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    body::{BoxError, End, Metered, OnEnd, ProxyBody, grpc_status},
    harden::{self, Rejection},
    path::{Normalization, normalize},
    trace_context,
    upstream::{Upstream, UpstreamError, Version as UpstreamVersion},
};
use crate::policy;

/// Istio's body for a request denied by policy.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// How long a client may take to send a request head (slow-loris bound).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent streams one HTTP/2 client may open.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// What the owner of the connection decides and records per request.
pub trait RequestHooks: Send + Sync + 'static {
    /// Decides one request.
    fn authorize(&self, request: &policy::Request<'_>) -> Verdict;
    /// Hears about each request once, when its response ended or failed.
    fn finished(&self, log: &RequestLog);
}

/// A request's authorization outcome, for the response and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request goes to the app.
    pub allowed: bool,
    /// The deciding policy, `namespace/name`.
    pub policy: Option<String>,
    /// The deciding rule's index.
    pub rule: Option<u32>,
}

/// Istio's `request_protocol` of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// HTTP of either version.
    Http,
    /// gRPC (`content-type: application/grpc...`).
    Grpc,
}

/// One request as the access log and the metrics see it.
#[derive(Debug, Clone)]
pub struct RequestLog {
    /// The method.
    pub method: Method,
    /// The authority (Host or `:authority`).
    pub authority: String,
    /// The path as the client sent it, query included.
    pub path: String,
    /// The status sent to the client (0 if none was).
    pub status: u16,
    /// From the request head to the end of the response.
    pub duration: Duration,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Envoy's response flags (`-` for none).
    pub flags: &'static str,
    /// The authorization outcome; `None` when the request was refused before policy.
    pub verdict: Option<Verdict>,
    /// Why the request was refused with 400, if it was.
    pub rejection: Option<&'static str>,
    /// `grpc-status` from the response headers or trailers.
    pub grpc_status: Option<String>,
    /// HTTP or gRPC.
    pub kind: RequestKind,
    /// The request's `x-request-id`.
    pub request_id: Option<String>,
    /// HTTP/1.1 or HTTP/2.
    pub version: Version,
}

/// Per-connection settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Path normalization before policy and forwarding.
    pub normalization: Normalization,
    /// Whether requests without a `traceparent` get one.
    pub start_traceparent: bool,
}

struct Conn {
    hooks: Arc<dyn RequestHooks>,
    upstream: Upstream,
    settings: Settings,
}

/// Serves HTTP (`version`) on `io` until the client is done, sending requests to the app through
/// `upstream`.
pub async fn serve<IO>(
    io: IO,
    version: UpstreamVersion,
    upstream: Upstream,
    hooks: Arc<dyn RequestHooks>,
    settings: Settings,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn { hooks, upstream, settings });
    let service = hyper::service::service_fn(move |request| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, request).await) }
    });
    let io = TokioIo::new(io);
    match version {
        UpstreamVersion::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
        UpstreamVersion::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .serve_connection(io, service)
                .await
        }
    }
}

/// Handles one request from head to response head; the response body reports the request's end.
async fn handle(conn: &Conn, mut request: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let mut log = RequestLog {
        method: request.method().clone(),
        authority: String::new(),
        path: request.uri().path_and_query().map_or_else(String::new, |p| p.as_str().to_owned()),
        status: 0,
        duration: Duration::ZERO,
        request_bytes: 0,
        response_bytes: 0,
        flags: "-",
        verdict: None,
        rejection: None,
        grpc_status: None,
        kind: request_kind(request.headers()),
        request_id: None,
        version: request.version(),
    };
    let (authority, path) = match admit(&request, conn.settings.normalization) {
        Ok(admitted) => admitted,
        Err(rejection) => {
            log.rejection = Some(rejection.reason());
            let http1 = log.version != Version::HTTP_2;
            let mut response = finish_local(conn, log, started, StatusCode::BAD_REQUEST, "bad request");
            // Refused for its framing: hyper would go on reading the next request where that very
            // framing says this one ends, so an HTTP/1 connection closes after the 400.
            if http1 && rejection.is_framing() {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
    };
    log.authority = authority.clone();
    let verdict = conn.hooks.authorize(&policy::Request {
        method: request.method().as_str(),
        host: &authority,
        path: &path,
        headers: request.headers(),
    });
    let allowed = verdict.allowed;
    log.verdict = Some(verdict);
    if !allowed {
        return finish_local(conn, log, started, StatusCode::FORBIDDEN, DENIED_BODY);
    }
    rewrite_path(&mut request, &path);
    let id = trace_context::ensure(request.headers_mut(), conn.settings.start_traceparent);
    log.request_id = id.to_str().ok().map(str::to_owned);

    let upgrading = request.version() == Version::HTTP_11
        && (harden::wants_upgrade(request.headers()) || request.method() == Method::CONNECT);
    let keep_upgrade = upgrading && request.method() != Method::CONNECT;
    harden::strip_hop_by_hop(request.headers_mut(), keep_upgrade);
    let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));

    let request_bytes = Arc::new(AtomicU64::new(0));
    let body_failed = Arc::new(AtomicBool::new(false));
    let failed = body_failed.clone();
    let on_request_end: OnEnd = Box::new(move |end| failed.store(end == End::Failed, Ordering::Relaxed));
    let request =
        request.map(|body| Metered::new(body, request_bytes.clone(), Some(on_request_end)).boxed_unsync());
    let mut response = match conn.upstream.send(request).await {
        Ok(response) => response,
        Err(_) if body_failed.load(Ordering::Relaxed) => {
            // The client's own body broke off the exchange (bad chunking, a reset stream, a
            // content-length it did not keep): its protocol error (Envoy's DPE), not the app's.
            log.flags = "DPE";
            log.request_bytes = request_bytes.load(Ordering::Relaxed);
            return finish_local(conn, log, started, StatusCode::BAD_REQUEST, "bad request");
        }
        Err(e) => {
            tracing::debug!(error = %e, "request to the app failed");
            log.flags = e.flag();
            log.request_bytes = request_bytes.load(Ordering::Relaxed);
            let body = match e {
                UpstreamError::Connect(_) => "upstream connect error: connection failure",
                UpstreamError::Reset(_) => "upstream connect error or disconnect/reset before headers",
            };
            return finish_local(conn, log, started, StatusCode::SERVICE_UNAVAILABLE, body);
        }
    };
    log.status = response.status().as_u16();
    log.grpc_status = grpc_status(response.headers());
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (log.method == Method::CONNECT && response.status().is_success());
    if let (Some(downstream), true) = (downstream_upgrade, switched) {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(downstream, upstream));
    }
    if response.version() == Version::HTTP_11 {
        harden::strip_hop_by_hop(response.headers_mut(), switched && log.method != Method::CONNECT);
    }
    let hooks = conn.hooks.clone();
    let response_bytes = Arc::new(AtomicU64::new(0));
    let counted = response_bytes.clone();
    let on_end = Box::new(move |end: End| {
        log.duration = started.elapsed();
        log.request_bytes = request_bytes.load(Ordering::Relaxed);
        log.response_bytes = counted.load(Ordering::Relaxed);
        match end {
            End::Complete { grpc_status: Some(status) } => log.grpc_status = Some(status),
            End::Complete { grpc_status: None } => {}
            End::Failed => log.flags = "UC",
            End::Abandoned => log.flags = "DC",
        }
        hooks.finished(&log);
    });
    response.map(|body| Metered::new(body, response_bytes, Some(on_end)).boxed_unsync())
}

/// Checks the request and gives its authority and normalized path.
fn admit(request: &Request<Incoming>, normalization: Normalization) -> Result<(String, String), Rejection> {
    let authority = harden::check(request.method(), request.uri(), request.version(), request.headers())?;
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let path = if request.method() == Method::OPTIONS && target == "*" {
        "*".to_owned()
    } else if request.method() == Method::CONNECT {
        String::new()
    } else {
        normalize(target, normalization).map_err(|_| Rejection::Path)?
    };
    Ok((authority.to_owned(), path))
}

/// Forwards the path policy saw (query kept), so the app never reads another one.
fn rewrite_path<B>(request: &mut Request<B>, path: &str) {
    let uri = request.uri();
    if path.is_empty() || path == "*" || uri.path() == path {
        return;
    }
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = target.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

/// Answers from the proxy itself (400, 403, 503) and reports the request.
fn finish_local(
    conn: &Conn,
    mut log: RequestLog,
    started: Instant,
    status: StatusCode,
    body: &'static str,
) -> Response<ProxyBody> {
    log.status = status.as_u16();
    log.duration = started.elapsed();
    log.response_bytes = body.len() as u64;
    conn.hooks.finished(&log);
    let mut response =
        Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(BoxError::from).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// gRPC when the content type says so.
fn request_kind(headers: &http::HeaderMap) -> RequestKind {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc { RequestKind::Grpc } else { RequestKind::Http }
}

/// After a protocol switch both sides are opaque bytes: relay them until either side is done.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "protocol switch did not complete");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::upstream::{AppConn, Dial};
    use super::*;

    /// Denies paths under /deny; records every finished request.
    #[derive(Default)]
    struct Recorder {
        logs: Mutex<Vec<RequestLog>>,
    }

    impl RequestHooks for Recorder {
        fn authorize(&self, request: &policy::Request<'_>) -> Verdict {
            Verdict { allowed: !request.path.starts_with("/deny"), policy: Some("t/p".into()), rule: Some(0) }
        }

        fn finished(&self, log: &RequestLog) {
            self.logs.lock().unwrap().push(log.clone());
        }
    }

    /// An in-memory app answering `ok` and recording each request's method and target.
    fn app(seen: Arc<Mutex<Vec<String>>>, dials: Arc<AtomicU64>) -> Dial {
        Arc::new(move || {
            let (seen, dials) = (seen.clone(), dials.clone());
            Box::pin(async move {
                dials.fetch_add(1, Ordering::Relaxed);
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(format!("{} {}", request.method(), request.uri()));
                            let _ = request.into_body().collect().await;
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(theirs), service)
                        .await;
                });
                Ok(Box::new(ours) as AppConn)
            })
        })
    }

    #[tokio::test]
    async fn a_denied_request_gets_403_and_the_connection_serves_the_next() {
        let (seen, dials) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicU64::new(0)));
        let hooks = Arc::new(Recorder::default());
        let (mut client, proxy_side) = tokio::io::duplex(64 * 1024);
        let upstream = Upstream::new(UpstreamVersion::Http1, None, app(seen.clone(), dials.clone()));
        let settings = Settings { normalization: Normalization::Base, start_traceparent: true };
        let served =
            tokio::spawn(serve(proxy_side, UpstreamVersion::Http1, upstream, hooks.clone(), settings));
        // hyper lets chunked frame a request that also has Content-Length (dropping the latter, so
        // the app reads one framing) and closes the connection after it: what follows is never
        // read as a request.
        client
            .write_all(
                b"GET /deny/x HTTP/1.1\r\nHost: a\r\n\r\nGET /public/../ok?q=1 HTTP/1.1\r\nHost: a\r\n\r\n\
                  GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n\
                  POST /cl-te HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
                  GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            )
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        served.await.unwrap().unwrap();
        let statuses: Vec<&str> = out.match_indices("HTTP/1.1 ").map(|(i, _)| &out[i + 9..i + 12]).collect();
        assert_eq!(statuses, ["403", "200", "400", "200"], "{out}");
        assert!(out.contains("\r\n\r\nRBAC: access denied"), "{out}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["GET /ok?q=1", "POST /cl-te"],
            "only allowed requests reached the app, the path normalized, nothing smuggled"
        );
        assert_eq!(dials.load(Ordering::Relaxed), 1, "one app connection for the downstream connection");
        let logs = hooks.logs.lock().unwrap();
        let summary: Vec<(u16, &str, Option<&str>)> =
            logs.iter().map(|l| (l.status, l.path.as_str(), l.rejection)).collect();
        assert_eq!(
            summary,
            [
                (403, "/deny/x", None),
                (200, "/public/../ok?q=1", None),
                (400, "/a%00", Some("invalid_path")),
                (200, "/cl-te", None)
            ]
        );
        assert!(logs[1].request_id.is_some(), "x-request-id added");
        assert_eq!(logs[0].verdict.as_ref().map(|v| v.allowed), Some(false));
    }

    #[tokio::test]
    async fn a_broken_request_body_is_the_clients_error_not_the_apps() {
        let (seen, dials) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicU64::new(0)));
        let hooks = Arc::new(Recorder::default());
        let (mut client, proxy_side) = tokio::io::duplex(64 * 1024);
        let upstream = Upstream::new(UpstreamVersion::Http1, None, app(seen.clone(), dials));
        let settings = Settings { normalization: Normalization::Base, start_traceparent: true };
        let served =
            tokio::spawn(serve(proxy_side, UpstreamVersion::Http1, upstream, hooks.clone(), settings));
        // The head is fine and goes to the app; the chunk size is not hex.
        client
            .write_all(
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        let _ = served.await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        let logs = hooks.logs.lock().unwrap();
        let summary: Vec<(u16, &str)> = logs.iter().map(|l| (l.status, l.flags)).collect();
        assert_eq!(summary, [(400, "DPE")], "a downstream protocol error, not UC");
    }

    #[tokio::test]
    async fn a_request_refused_for_its_framing_closes_the_connection() {
        let (seen, dials) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicU64::new(0)));
        let hooks = Arc::new(Recorder::default());
        let (mut client, proxy_side) = tokio::io::duplex(64 * 1024);
        let upstream = Upstream::new(UpstreamVersion::Http1, None, app(seen.clone(), dials));
        let settings = Settings { normalization: Normalization::Base, start_traceparent: true };
        let served =
            tokio::spawn(serve(proxy_side, UpstreamVersion::Http1, upstream, hooks.clone(), settings));
        // hyper frames this body by its final `chunked`; the agent refuses the coding list, so what
        // follows (a second request by hyper's reading) must never be read.
        client
            .write_all(
                b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n\
                  GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            )
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "one response, then the close: {out}");
        assert!(out.starts_with("HTTP/1.1 400 ") && out.contains("connection: close\r\n"), "{out}");
        assert!(seen.lock().unwrap().is_empty(), "nothing reached the app");
        let logs = hooks.logs.lock().unwrap();
        let summary: Vec<(u16, Option<&str>)> = logs.iter().map(|l| (l.status, l.rejection)).collect();
        assert_eq!(summary, [(400, Some("transfer_encoding"))]);
    }
}
