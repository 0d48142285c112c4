//! The CLI's side of the admin API: one HTTP/1.1 request per connection over the Unix socket.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// How long one request may take before the CLI gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the socket path.
    #[error("the Ferry agent is not running (no socket at {})", .0.display())]
    NoSocket(PathBuf),
    /// A socket file no process listens on.
    #[error("the Ferry agent is not running ({} refuses connections: a stale socket)", .0.display())]
    Refused(PathBuf),
    /// The socket is root-only.
    #[error("permission denied opening {}: the admin socket is root-only; run as root", .0.display())]
    PermissionDenied(PathBuf),
    /// Any other connect failure.
    #[error("connecting to {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The HTTP exchange broke off.
    #[error("talking to the agent at {}", path.display())]
    Http {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: hyper::Error,
    },
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error status.
    #[error("the agent refused the request ({status}): {message}")]
    Agent {
        /// The HTTP status.
        status: StatusCode,
        /// The agent's `error` message, or the raw body.
        message: String,
    },
    /// The CLI built a request the HTTP library refused (a bug, reported rather than hidden).
    #[error("invalid request {0:?}")]
    InvalidRequest(String),
    /// The answer was not JSON.
    #[error("the agent's answer is not valid JSON")]
    BadJson(#[source] serde_json::Error),
}

impl ClientError {
    /// Whether this means no agent is running (as opposed to a failed request).
    pub fn agent_not_running(&self) -> bool {
        matches!(self, ClientError::NoSocket(_) | ClientError::Refused(_))
    }
}

/// A client for one admin socket.
#[derive(Clone, Debug)]
pub struct AdminClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AdminClient {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path_and_query`; an error status becomes [`ClientError::Agent`].
    pub async fn get(&self, path_and_query: &str) -> Result<serde_json::Value, ClientError> {
        self.send(Method::GET, path_and_query, Bytes::new()).await?.ok()
    }

    /// `POST path_and_query` with a plain-text body.
    pub async fn post(&self, path_and_query: &str, body: &str) -> Result<serde_json::Value, ClientError> {
        self.send(Method::POST, path_and_query, Bytes::copy_from_slice(body.as_bytes())).await?.ok()
    }

    /// Sends one request and returns the status and body, whatever the status.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Answer, ClientError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path_and_query, body))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Answer, ClientError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ClientError::NoSocket(self.socket.clone()),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(self.socket.clone()),
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(self.socket.clone()),
            _ => ClientError::Connect { path: self.socket.clone(), source: e },
        })?;
        let http_err = |source| ClientError::Http { path: self.socket.clone(), source };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
        let conn = tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(body))
            .map_err(|e| ClientError::InvalidRequest(format!("{path_and_query}: {e}")))?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(http_err)?.to_bytes();
        conn.abort();
        Ok(Answer { status, body: bytes })
    }
}

/// A raw answer from the agent.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body as sent.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON for a success status, else the agent's error message.
    pub fn ok(self) -> Result<serde_json::Value, ClientError> {
        let json: Result<serde_json::Value, _> = serde_json::from_slice(&self.body);
        if self.status.is_success() {
            return json.map_err(ClientError::BadJson);
        }
        let message = match json.ok().as_ref().and_then(|v| v.get("error")).and_then(|e| e.as_str()) {
            Some(m) => m.to_owned(),
            None => String::from_utf8_lossy(&self.body).trim().to_owned(),
        };
        Err(ClientError::Agent { status: self.status, message })
    }
}
