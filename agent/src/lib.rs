//! Ferry's node agent.
pub mod admin;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod events;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod introspect;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reconcile;
pub mod sources;
