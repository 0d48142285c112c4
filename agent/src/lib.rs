//! Ferry's node agent.
pub mod bpf;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod events;
pub mod hbone;
pub mod identity;
pub mod proxy;
pub mod reconcile;
