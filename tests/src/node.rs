//! A simulated node: its own network namespace with a bridge, a cgroup, and pods behind the bridge.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context as _, Result, bail};

use crate::pod::{Pod, PodInner, remove_cgroup};
use crate::process::{self, ChildGuard, Tracker};
use crate::{cgroup, names, netns};

/// The bridge every pod of a node hangs off.
pub const BRIDGE: &str = "br0";

/// A node: network namespace `fy<uid>-<name>` with bridge br0 (10.233.INDEX.1/24,
/// fd00:233:INDEX::1/64) and forwarding on, plus cgroup `<cgroup2>/ferry-test-<uid>-<name>`.
///
/// Dropping it (also while unwinding from a panic) kills the processes started through it or its
/// pods, and removes pods, interfaces, namespaces and cgroups.
#[derive(Debug)]
pub struct SimNode {
    name: String,
    index: u8,
    netns_name: String,
    netns_path: PathBuf,
    cgroup_root: PathBuf,
    pods: Vec<Pod>,
    next_host: u8,
    tracker: Arc<Tracker>,
    /// Set while a [`crate::NodeLink`] uses this node (one link per node: its addresses are fixed).
    pub(crate) linked: Arc<AtomicBool>,
}

impl SimNode {
    /// Creates the node's namespace, bridge and cgroup; everything made so far is removed on error.
    pub fn new(name: &str, index: u8) -> Result<SimNode> {
        names::check_name("node", name)?;
        let uid = names::fresh_uid();
        let netns_name = names::netns_name(&uid, name);
        let node = SimNode {
            name: name.to_owned(),
            index,
            netns_path: netns::path_of(&netns_name),
            netns_name,
            cgroup_root: cgroup::cgroup2_mount()?.join(names::cgroup_dir_name(&uid, name)),
            pods: Vec::new(),
            next_host: 2,
            tracker: Arc::default(),
            linked: Arc::default(),
        };
        // From here on, an early return drops `node`, whose Drop removes what exists.
        netns::add(&node.netns_name)?;
        let (v4, v6) = (node.bridge_ipv4(), node.bridge_ipv6());
        netns::run_ip_batch(
            &node.netns_name,
            &[
                "link set lo up".into(),
                format!("link add {BRIDGE} type bridge forward_delay 0"),
                format!("link set {BRIDGE} up"),
                format!("addr add {v4}/24 dev {BRIDGE}"),
                format!("addr add {v6}/64 dev {BRIDGE} nodad"),
            ],
        )?;
        netns::write_sysctl(&node.netns_path, "net/ipv4/ip_forward", "1")?;
        netns::write_sysctl(&node.netns_path, "net/ipv6/conf/all/forwarding", "1")?;
        cgroup::create(&node.cgroup_root)?;
        Ok(node)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's index: the third octet of its pod subnet 10.233.INDEX.0/24.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The file of the node's network namespace.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The name of the node's network namespace (for `ip -n`).
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// The node's cgroup directory; pod cgroups are its children.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The bridge's IPv4 address, the pods' default gateway.
    pub fn bridge_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, self.index, 1)
    }

    /// The bridge's IPv6 address, the pods' default gateway.
    pub fn bridge_ipv6(&self) -> Ipv6Addr {
        pod_ipv6(self.index, 1)
    }

    /// The pods added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod called `name`, if any.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.pods.iter().find(|p| p.name() == name).cloned()
    }

    /// Adds pod `name`: namespace, veth (eth0 inside, attached to br0 outside), the next free
    /// addresses 10.233.INDEX.N/24 and fd00:233:INDEX::N/64, default routes, and a child cgroup.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        names::check_name("pod", name)?;
        if self.pod(name).is_some() {
            bail!("node {} already has a pod named {name}", self.name);
        }
        let host = self.next_host;
        if host == 255 {
            bail!("node {} has no free pod address left", self.name);
        }
        let netns_name = names::netns_name(&names::fresh_uid(), name);
        let pod = Pod::new(PodInner {
            name: name.to_owned(),
            netns_path: netns::path_of(&netns_name),
            netns_name,
            cgroup_path: self.cgroup_root.join(name),
            ipv4: Ipv4Addr::new(10, 233, self.index, host),
            ipv6: pod_ipv6(self.index, host),
            host_ifname: format!("vp{host}"),
            node_netns: self.netns_name.clone(),
            tracker: Arc::clone(&self.tracker),
        });
        self.next_host += 1;
        match self.build_pod(&pod) {
            Ok(()) => {
                self.pods.push(pod.clone());
                Ok(pod)
            }
            Err(e) => {
                let leftovers = pod.teardown();
                if !leftovers.is_empty() {
                    eprintln!("ferry-tests: cleaning up failed pod {name}: {}", leftovers.join("; "));
                }
                Err(e.context(format!("cannot add pod {name} to node {}", self.name)))
            }
        }
    }

    fn build_pod(&self, pod: &Pod) -> Result<()> {
        netns::add(pod.netns_name())?;
        let veth = pod.host_ifname();
        netns::run_ip_batch(
            &self.netns_name,
            &[
                format!("link add {veth} type veth peer name eth0 netns {}", pod.netns_name()),
                format!("link set {veth} master {BRIDGE}"),
                format!("link set {veth} up"),
            ],
        )?;
        netns::run_ip_batch(
            pod.netns_name(),
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("addr add {}/24 dev eth0", pod.ipv4()),
                format!("addr add {}/64 dev eth0 nodad", pod.ipv6()),
                format!("route add default via {}", self.bridge_ipv4()),
                format!("route add default via {}", self.bridge_ipv6()),
            ],
        )?;
        cgroup::create(pod.cgroup_path())
    }

    /// A command that runs `program` in the node's netns and in cgroup `dir` (under the node's
    /// cgroup root: the node's own processes, such as its kubelet).
    pub fn command_in_cgroup(&self, program: impl AsRef<OsStr>, dir: &Path) -> Command {
        let mut cmd = Command::new(program);
        process::enter_on_exec(&mut cmd, &self.netns_path, Some(dir));
        cmd
    }

    /// A command that runs `program` in the node's network namespace (in no pod cgroup): the agent.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        process::enter_on_exec(&mut cmd, &self.netns_path, None);
        cmd
    }

    /// Starts `cmd` (usually from [`SimNode::command`]) and tracks it so teardown kills it.
    pub fn spawn(&self, cmd: Command) -> Result<ChildGuard> {
        ChildGuard::spawn(cmd, &self.tracker)
    }

    fn teardown(&mut self) -> Vec<String> {
        self.tracker.kill_all();
        let mut errors: Vec<String> = self.pods.drain(..).flat_map(|pod| pod.teardown()).collect();
        if let Err(e) = netns::delete(&self.netns_name) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = remove_cgroup(&self.cgroup_root).context("node cgroup") {
            errors.push(format!("{e:#}"));
        }
        errors
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        let errors = self.teardown();
        if !errors.is_empty() {
            eprintln!("ferry-tests: tearing down node {} left: {}", self.name, errors.join("; "));
        }
    }
}

/// fd00:233:INDEX::HOST, with INDEX and HOST written in decimal digits as in 10.233.INDEX.HOST.
pub(crate) fn pod_ipv6(index: u8, host: u8) -> Ipv6Addr {
    // Reading decimal digits as hex keeps the text aligned with the IPv4 form and stays injective.
    let hex = |n: u8| u16::from_str_radix(&n.to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0xfd00, 0x233, hex(index), 0, 0, 0, 0, hex(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ipv6_reads_like_the_ipv4_form() {
        assert_eq!(pod_ipv6(1, 2).to_string(), "fd00:233:1::2");
        assert_eq!(pod_ipv6(12, 254).to_string(), "fd00:233:12::254");
        assert_ne!(pod_ipv6(1, 10), pod_ipv6(1, 16));
    }
}
