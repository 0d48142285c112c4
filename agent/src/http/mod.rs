//! The HTTP layer of the node proxy, at the destination agent: protocol detection on undeclared
//! ports, hyper serving HTTP/1.1 and HTTP/2 per downstream connection, the hardening hyper leaves to
//! a proxy, Istio's path normalization (which authorization and forwarding agree on), correlation
//! headers, and the app-side client that belongs to one downstream connection.

pub mod body;
pub mod detect;
pub mod harden;
pub mod path;
pub mod rewind;
pub mod server;
pub mod trace_context;
pub mod upstream;
