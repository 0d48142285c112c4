//! Health for the kubelet: `GET /healthz/ready` and `GET /healthz/live` over HTTP/1.1 on a TCP
//! address of the node (15021, as ztunnel), for a DaemonSet's readiness and liveness probes.
//!
//! Ready means the programs are loaded and every pod that should be enrolled is; live means the
//! agent's runtime answers. Nothing else is served here: the admin API stays on its Unix socket.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;

use super::{
    AdminState,
    httpd::{self, Body},
};

/// Where health is served unless configured otherwise: loopback of the node, which a kubelet on
/// the node probes with `host: 127.0.0.1` (the agent runs in the node's network namespace).
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15021));

/// Why the health endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding the health endpoint to {addr}")]
pub struct HealthError {
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// A bound health listener.
#[derive(Debug)]
pub struct HealthServer {
    listener: TcpListener,
}

impl HealthServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, HealthError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| HealthError { addr, source })?;
        Ok(Self { listener })
    }

    /// Serves on a listener the previous agent handed over.
    pub fn from_std(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self { listener: TcpListener::from_std(listener)? })
    }

    /// A duplicate of the listening socket, for the next agent.
    pub fn listener_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, state: Arc<dyn AdminState>, shutdown: impl Future<Output = ()>) {
        tracing::info!(addr = ?self.listener.local_addr().ok(), "health listening");
        httpd::serve(self.listener, move |req| answer(state.clone(), req), shutdown).await;
    }
}

async fn answer(state: Arc<dyn AdminState>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return httpd::method_not_allowed("GET, HEAD");
    }
    match req.uri().path() {
        "/healthz/live" => httpd::json(StatusCode::OK, &json!({ "live": true })),
        "/healthz/ready" => {
            // Readiness reads the enrolled set under its lock: off the async workers.
            let ready = tokio::task::spawn_blocking(move || state.ready()).await.unwrap_or(false);
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            httpd::json(status, &json!({ "ready": ready }))
        }
        _ => httpd::error(StatusCode::NOT_FOUND, "health is at /healthz/ready and /healthz/live"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::test_support::FakeState;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn ready_follows_the_state_and_live_always_answers() {
        for (ready, want) in [(true, 200), (false, 503)] {
            let server = HealthServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = server.local_addr().unwrap();
            let fake = FakeState::default();
            fake.ready.store(ready, std::sync::atomic::Ordering::Relaxed);
            let state: Arc<dyn AdminState> = Arc::new(fake);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(server.serve(state, async move {
                let _ = stopped.await;
            }));
            let (code, body) = get(addr, "/healthz/ready").await;
            assert_eq!(code, want, "{body}");
            assert!(body.contains(&format!("\"ready\":{ready}")), "{body}");
            assert_eq!(get(addr, "/healthz/live").await.0, 200);
            assert_eq!(get(addr, "/metrics").await.0, 404);
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}
