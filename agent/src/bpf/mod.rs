//! Userspace side of the kernel programs: loading them, attaching them to pods, and the maps the
//! proxy reads.
mod addr;
pub mod attach;
pub mod loader;
pub mod orig_dst;
pub mod pins;
mod relink;
pub mod steering;

pub use addr::{pod_addr, sock_addr_from_std, sock_addr_to_std};
pub use attach::PodAttachment;
pub use loader::{Datapath, DatapathError};
pub use orig_dst::OrigDstTable;
pub use pins::{PinError, PinRoot};
pub use steering::{PodListeners, SteerError, Steering};
