//! The soak (`ferry-soak`, `cargo xtask soak`): hours-long mixed traffic through real agents, to
//! catch what a short test cannot see — memory or descriptors that grow with every connection,
//! and rare errors that only show after many thousands of them.
//!
//! [`load`] is the traffic, run by a worker process inside a pod; [`watch`] samples the agents
//! and decides whether they grew.

pub mod load;
pub mod watch;
