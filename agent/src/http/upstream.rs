//! The client side toward the app: one HTTP connection over the pod's loopback that belongs to one
//! downstream connection (or HBONE stream) and is never shared with another client, so what the
//! app sees of a connection (its peer address, its keep-alive) is one client's. It is dialled again
//! when the app closes it between requests.

use std::{future::Future, io, pin::Pin, sync::Arc};

use hyper::{Request, Response, body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};

use super::body::ProxyBody;

/// A byte stream to the app: a TCP socket on the pod's loopback (or, in tests, anything).
pub trait AppStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AppStream for T {}

/// A connection to the app, whatever its type.
pub type AppConn = Box<dyn AppStream>;

/// Opens a new connection to the app (on the pod's loopback, from inside its netns).
pub type Dial = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<AppConn>> + Send>> + Send + Sync>;

/// Which HTTP the app is spoken to in: the downstream's own version, so nothing is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1 (with upgrades).
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// Why a request did not get a response from the app, as Envoy's response flags say.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The app could not be connected to (UF).
    #[error("connecting to the app: {0}")]
    Connect(#[source] io::Error),
    /// The connection to the app failed or closed before the response (UC).
    #[error("the app's connection ended before the response: {0}")]
    Reset(#[source] hyper::Error),
}

impl UpstreamError {
    /// Envoy's short response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "UF",
            UpstreamError::Reset(_) => "UC",
        }
    }
}

enum Sender {
    Http1(conn::http1::SendRequest<ProxyBody>),
    Http2(conn::http2::SendRequest<ProxyBody>),
}

impl Sender {
    fn is_usable(&self) -> bool {
        match self {
            Sender::Http1(s) => !s.is_closed(),
            Sender::Http2(s) => !s.is_closed(),
        }
    }
}

/// The app-side connection of one downstream connection.
pub struct Upstream {
    version: Version,
    dial: Dial,
    /// The connection dialled while the protocol was being detected, used first.
    first: std::sync::Mutex<Option<AppConn>>,
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    /// An upstream speaking `version`, starting on `first` if given, dialling with `dial` after.
    pub fn new(version: Version, first: Option<AppConn>, dial: Dial) -> Self {
        Self { version, dial, first: std::sync::Mutex::new(first), sender: Mutex::new(None) }
    }

    /// Sends one request and waits for the response head.
    pub async fn send(&self, request: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        let mut slot = self.sender.lock().await;
        if !slot.as_ref().is_some_and(Sender::is_usable) {
            *slot = Some(self.connect().await?);
        }
        match slot.as_mut() {
            // HTTP/1 requests of one downstream connection come one at a time anyway; the lock is
            // held until the response head, as the connection is busy until then.
            Some(Sender::Http1(s)) => {
                s.ready().await.map_err(UpstreamError::Reset)?;
                s.send_request(request).await.map_err(UpstreamError::Reset)
            }
            Some(Sender::Http2(s)) => {
                // Streams are concurrent: release the lock before waiting.
                let mut s = s.clone();
                drop(slot);
                s.ready().await.map_err(UpstreamError::Reset)?;
                s.send_request(request).await.map_err(UpstreamError::Reset)
            }
            None => Err(UpstreamError::Connect(io::Error::other("no connection"))),
        }
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let tcp = match first {
            Some(tcp) => tcp,
            None => (self.dial)().await.map_err(UpstreamError::Connect)?,
        };
        let io = TokioIo::new(tcp);
        let handshake_failed = |e: hyper::Error| UpstreamError::Connect(io::Error::other(e));
        match self.version {
            Version::Http1 => {
                let (sender, connection) = conn::http1::Builder::new()
                    .handshake::<_, ProxyBody>(io)
                    .await
                    .map_err(handshake_failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.with_upgrades().await {
                        tracing::debug!(error = %e, "app HTTP/1 connection ended");
                    }
                });
                Ok(Sender::Http1(sender))
            }
            Version::Http2 => {
                let (sender, connection) = conn::http2::Builder::new(TokioExecutor::new())
                    .handshake::<_, ProxyBody>(io)
                    .await
                    .map_err(handshake_failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "app HTTP/2 connection ended");
                    }
                });
                Ok(Sender::Http2(sender))
            }
        }
    }
}
