//! Userspace side of the kernel programs: loading, attaching and reading their maps.
pub mod loader;
