//! The kubelet's probes to STRICT pods. The node's own connects to enrolled pods are bound to a
//! dedicated source address (Istio ambient's: 169.254.7.127 and fd16:9254:7127:1337:ffff:ffff:ffff:ffff)
//! by the `probe` programs, and sk_lookup lets SYNs from it reach the app. The address is put on the
//! node's loopback (a bind needs a local address, and the pods' replies come back to it) for the
//! agent's lifetime.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::enroll::netlink::Rtnl;

/// The IPv4 probe source.
pub const SOURCE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The IPv6 probe source.
pub const SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);

/// The loopback device's index in every netns.
const LOOPBACK: u32 = 1;

/// The probe source addresses on the node's loopback; removed when dropped.
pub struct SourceAddresses {
    added: Vec<(IpAddr, u8)>,
}

impl SourceAddresses {
    /// Adds both addresses to the loopback of the calling thread's netns (the node's).
    pub fn add() -> io::Result<Self> {
        let mut rtnl = Rtnl::open()?;
        let mut added = Vec::new();
        for (ip, prefix) in [(IpAddr::V4(SOURCE_V4), 32), (IpAddr::V6(SOURCE_V6), 128)] {
            rtnl.add_address(LOOPBACK, ip, prefix)?;
            added.push((ip, prefix));
        }
        Ok(Self { added })
    }
}

impl SourceAddresses {
    /// Leaves the addresses on loopback: the probe programs stay pinned after the agent, and
    /// the kubelet's probes keep reaching the pods while no agent runs.
    pub fn keep(mut self) {
        self.added.clear();
    }
}

/// Removes both addresses from the calling thread's netns' loopback (`ferry uninstall`).
pub fn remove_from_loopback() -> io::Result<()> {
    let mut rtnl = Rtnl::open()?;
    rtnl.del_address(LOOPBACK, IpAddr::V4(SOURCE_V4), 32)?;
    rtnl.del_address(LOOPBACK, IpAddr::V6(SOURCE_V6), 128)
}

impl Drop for SourceAddresses {
    fn drop(&mut self) {
        let Ok(mut rtnl) = Rtnl::open() else { return };
        for (ip, prefix) in self.added.drain(..) {
            if let Err(e) = rtnl.del_address(LOOPBACK, ip, prefix) {
                tracing::warn!(%ip, error = %e, "removing the probe source address from loopback");
            }
        }
    }
}
