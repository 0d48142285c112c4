//! `GET /metrics` over HTTP/1.1 on a TCP address.
//!
//! The agent runs in the node's network namespace, so the default `127.0.0.1:15020` is reachable
//! from the node only (and from hostNetwork pods); pods, in their own namespaces, cannot scrape it.
//! Bind `0.0.0.0:15020` to let a cluster Prometheus scrape the node.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::{Metrics, MetricsError};
use crate::admin::httpd::{self, Body};

/// Where metrics are served unless configured otherwise (Istio's agent port, on loopback).
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15020));

/// The Prometheus text format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A bound metrics listener.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
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
    pub async fn serve(self, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
        tracing::info!(addr = ?self.listener.local_addr().ok(), "metrics listening");
        httpd::serve(self.listener, move |req| scrape(metrics.clone(), req), shutdown).await;
    }
}

async fn scrape(metrics: Arc<Metrics>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return httpd::error(StatusCode::NOT_FOUND, "metrics are at /metrics");
    }
    if req.method() != Method::GET {
        return httpd::method_not_allowed("GET");
    }
    // Gathering reads /proc and the kernel's maps: keep it off the async workers.
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(text)) => httpd::with_type(StatusCode::OK, text.into_bytes(), CONTENT_TYPE),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            httpd::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics scrape task failed");
            httpd::error(StatusCode::INTERNAL_SERVER_ERROR, "gathering metrics failed")
        }
    }
}
