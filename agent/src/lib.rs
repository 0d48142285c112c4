//! Ferry's node agent.
pub mod bpf;
