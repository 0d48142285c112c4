//! Loads the embedded eBPF object.

/// The compiled kernel programs, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf"));
