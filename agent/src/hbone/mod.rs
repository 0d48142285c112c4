//! HBONE, the tunnel between node proxies: HTTP/2 CONNECT over mutual TLS 1.3 to the destination
//! pod's port 15008, with `:authority` = the original destination. Many app connections share one
//! pooled TLS connection per (source identity, source pod, tunnel address) as HTTP/2 streams.
//!
//! [`client::HbonePool`] opens tunnels, [`server::serve`] answers them, and [`HboneStream`] is one
//! tunnel as a tokio byte stream for the proxy's relay. Identities and TLS configurations come from
//! [`crate::identity`].

pub mod client;
pub mod linger;
pub mod server;
pub mod stream;

#[cfg(test)]
mod test_support;

pub use client::{ConnectError, HbonePool, Origin, PoolSettings};
pub use server::{Connect, Refusal, ServeError, serve};
pub use stream::HboneStream;

/// The port HBONE listens on in every enrolled pod.
pub const TUNNEL_PORT: u16 = 15008;

/// CONNECT header in which the source agent says the target port's declared protocol (a Kubernetes
/// `appProtocol` value), so the destination does not inspect a port whose protocol is known. A
/// wrong value cannot weaken policy: `tcp` gets the strict L4 decision, and bytes that are not
/// HTTP are never served as HTTP.
pub const PROTOCOL_HEADER: &str = "x-ferry-app-protocol";

/// Receive window per stream: what one tunnel may have in flight, and so the most one tunnel can
/// make the receiver buffer. 1 MiB keeps a bulk stream near line rate at sub-millisecond RTTs.
const STREAM_WINDOW: u32 = 1 << 20;

/// Receive window per connection: bounds what all streams of one TLS connection together can make
/// the receiver buffer, while leaving room for several busy streams at once.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// Largest DATA frame we accept: fewer frame headers per relay buffer than the 16 KiB default.
const MAX_FRAME_SIZE: u32 = 64 << 10;

/// A CONNECT request or its response is a few short headers; refuse anything bigger than this.
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
