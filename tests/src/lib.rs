//! Simulated-node harness for Ferry's end-to-end tests: nodes and pods as network namespaces with
//! cgroups, the agent as a process in a node's namespace, and a TCP workload (`ferry-testapp`).
//!
//! Everything is torn down when its owner drops, also while unwinding from a panic; what a crashed
//! run leaves behind carries recognisable names and is removed by [`cleanup::sweep_stale`].
//! Needs root, iproute2 and a cgroup2 mount.

pub mod agent;
mod bins;
pub mod ca;
pub mod cgroup;
pub mod cleanup;
pub mod control;
pub mod counting_server;
mod fork;
pub mod haproxy;
pub mod http_app;
pub mod http_client;
pub mod iptables;
pub mod kube_api;
pub mod l7_mesh;
mod link;
pub mod loadgen;
pub mod mesh;
pub mod names;
pub mod netns;
mod node;
mod pod;
pub mod policy_dir;
mod process;
pub mod procstat;
pub mod prometheus;
pub mod scenario;
pub mod soak;
pub mod stall;
pub mod testapp;
pub mod upgrade_load;

pub use agent::Agent;
pub use bins::{BIN_DIR_ENV, bin_path};
pub use link::{LinkEnd, NodeLink, link_nodes};
pub use mesh::{MeshFile, PodEntry};
pub use node::{BRIDGE, SimNode};
pub use pod::{DEFAULT_TIMEOUT, Pod};
pub use process::{ChildGuard, CollectedChild};
pub use scenario::Scenario;
