//! A point-to-point link between two simulated nodes, with routes between their pod subnets.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

use crate::{SimNode, netns};

/// A veth between two node namespaces: 10.234.0.1/30 + fd00:234::1/64 on side A and
/// 10.234.0.2/30 + fd00:234::2/64 on side B. Dropping it deletes the veth.
#[derive(Debug)]
pub struct NodeLink {
    a: LinkEnd,
    b: LinkEnd,
}

/// One side of a [`NodeLink`].
#[derive(Debug, Clone)]
pub struct LinkEnd {
    /// The interface name inside the node's namespace.
    pub ifname: String,
    /// The node's network namespace name (for `ip -n` or `ip netns exec` capture tools).
    pub netns_name: String,
    /// The node's network namespace file.
    pub netns_path: PathBuf,
    /// This side's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// This side's IPv6 address.
    pub ipv6: Ipv6Addr,
    linked: Arc<AtomicBool>,
}

/// Connects `a` and `b` and routes 10.233.A.0/24 <-> 10.233.B.0/24 (and fd00:233:A::/64 <->
/// fd00:233:B::/64) over the link. Each node can have one link at a time.
pub fn link_nodes(a: &SimNode, b: &SimNode) -> Result<NodeLink> {
    if a.index() == b.index() {
        bail!("nodes {} and {} share index {}: their pod subnets would clash", a.name(), b.name(), a.index());
    }
    let claim =
        |node: &SimNode| node.linked.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst);
    if claim(a).is_err() {
        bail!("node {} already has a link (its link addresses are fixed)", a.name());
    }
    if claim(b).is_err() {
        a.linked.store(false, Ordering::SeqCst);
        bail!("node {} already has a link (its link addresses are fixed)", b.name());
    }
    let end = |node: &SimNode, peer: &SimNode, host: u8| LinkEnd {
        ifname: format!("ln{}", peer.index()),
        netns_name: node.netns_name().to_owned(),
        netns_path: node.netns_path().to_owned(),
        ipv4: Ipv4Addr::new(10, 234, 0, host),
        ipv6: Ipv6Addr::new(0xfd00, 0x234, 0, 0, 0, 0, 0, host.into()),
        linked: Arc::clone(&node.linked),
    };
    // Built before anything exists, so a failure below drops it and deletes what was made.
    let link = NodeLink { a: end(a, b, 1), b: end(b, a, 2) };
    netns::run_ip_batch(
        &link.a.netns_name,
        &[format!(
            "link add {} type veth peer name {} netns {}",
            link.a.ifname, link.b.ifname, link.b.netns_name
        )],
    )?;
    configure(&link.a, &link.b, b.index())?;
    configure(&link.b, &link.a, a.index())?;
    Ok(link)
}

/// Brings `this` side up with its addresses and routes the peer's pod subnets via the peer.
fn configure(this: &LinkEnd, peer: &LinkEnd, peer_index: u8) -> Result<()> {
    let dev = &this.ifname;
    let peer_v6_subnet = crate::node::pod_ipv6(peer_index, 0);
    netns::run_ip_batch(
        &this.netns_name,
        &[
            format!("link set {dev} up"),
            format!("addr add {}/30 dev {dev}", this.ipv4),
            format!("addr add {}/64 dev {dev} nodad", this.ipv6),
            format!("route add 10.233.{peer_index}.0/24 via {}", peer.ipv4),
            format!("route add {peer_v6_subnet}/64 via {}", peer.ipv6),
        ],
    )
}

impl NodeLink {
    /// Side A (the first node given to [`link_nodes`]).
    pub fn a(&self) -> &LinkEnd {
        &self.a
    }

    /// Side B (the second node given to [`link_nodes`]).
    pub fn b(&self) -> &LinkEnd {
        &self.b
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        // Deleting one end removes both; the node may already be gone, which is fine.
        if netns::links(&self.a.netns_name).is_ok_and(|l| l.contains(&self.a.ifname))
            && let Err(e) = netns::run_ip(Some(&self.a.netns_name), &["link", "del", &self.a.ifname])
        {
            eprintln!("ferry-tests: removing node link: {e:#}");
        }
        self.a.linked.store(false, Ordering::SeqCst);
        self.b.linked.store(false, Ordering::SeqCst);
    }
}
