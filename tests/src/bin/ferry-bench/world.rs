//! The pods every scenario measures: one client pod and [`SERVERS`] echo server pods behind one
//! service VIP, either all on one node (`-local` scenarios) or with the servers on a second node
//! joined by a link (cross-node scenarios). The servers speak the scenario's [`Wire`]: the raw
//! echo, or HTTP/1.1 (`-http` scenarios, whose server port the mesh file declares `http`). A
//! scenario's mesh is added on top by [`crate::meshes`].

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Context as _, Result};
use ferry_tests::scenario::{NAMESPACE, SERVER_PORT, SERVICE, SERVICE_PORT, VIP4, VIP4_IP};
use ferry_tests::testapp::{Wire, serve_wire};
use ferry_tests::{ChildGuard, MeshFile, NodeLink, Pod, SimNode, link_nodes, netns};

/// Server pods behind the service.
pub const SERVERS: usize = 10;
/// The client pod's service account.
pub const CLIENT_SA: &str = "client";
/// The name of the node that holds the client (and, for `-local`, the servers).
pub const NODE_A: &str = "node-a";
/// The name of the servers' node in cross-node scenarios.
pub const NODE_B: &str = "node-b";

/// Where the servers run relative to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Client and servers on one node.
    Local,
    /// Servers on a second node.
    CrossNode,
}

/// The nodes, the pods and their echo servers. Fields drop in order: the servers before the link,
/// the link before the nodes.
pub struct World {
    /// Where the servers are.
    pub topology: Topology,
    /// What the servers (and so the load) speak.
    pub wire: Wire,
    /// The client pod (on node-a).
    pub client: Pod,
    /// The server pods, each running an echo server on [`SERVER_PORT`].
    pub servers: Vec<Pod>,
    _echo: Vec<ChildGuard>,
    _link: Option<NodeLink>,
    /// Node-a, then node-b when there is one.
    pub nodes: Vec<SimNode>,
}

impl World {
    /// Builds the nodes, pods and echo servers of `topology`, the servers speaking `wire`.
    pub fn build(topology: Topology, wire: Wire) -> Result<World> {
        let mut a = SimNode::new("bench-a", 1)?;
        let mut b = match topology {
            Topology::Local => None,
            Topology::CrossNode => Some(SimNode::new("bench-b", 2)?),
        };
        let link = match &b {
            Some(b) => Some(link_nodes(&a, b)?),
            None => None,
        };
        let client = a.add_pod("client")?;
        let mut servers = Vec::with_capacity(SERVERS);
        for i in 0..SERVERS {
            let node = b.as_mut().unwrap_or(&mut a);
            servers.push(node.add_pod(&format!("server-{i}"))?);
        }
        // The connection-rate test opens thousands of connections to ten addresses; whoever closes
        // first holds TIME_WAIT, so let new connects reuse such ports.
        for pod in std::iter::once(&client).chain(&servers) {
            netns::write_sysctl(pod.netns_path(), "net/ipv4/tcp_tw_reuse", "1")?;
        }
        let echo = servers
            .iter()
            .map(|s| serve_wire(s, wire, SERVER_PORT, s.name()))
            .collect::<Result<Vec<_>>>()
            .context("starting the echo servers")?;
        let nodes = std::iter::once(a).chain(b).collect();
        Ok(World { topology, wire, client, servers, _echo: echo, _link: link, nodes })
    }

    /// The node a server pod runs on, by mesh name.
    pub fn server_node(&self) -> &'static str {
        match self.topology {
            Topology::Local => NODE_A,
            Topology::CrossNode => NODE_B,
        }
    }

    /// The service address the client calls.
    pub fn service(&self) -> SocketAddr {
        SocketAddr::new(VIP4_IP.into(), SERVICE_PORT)
    }

    /// The servers' echo addresses (IPv4).
    pub fn endpoints(&self) -> Vec<SocketAddrV4> {
        self.servers.iter().map(|s| SocketAddrV4::new(s.ipv4(), SERVER_PORT)).collect()
    }

    /// A mesh file naming every pod (client on node-a, servers on their node; `node_of` overrides
    /// the node name of each pod, as sidecars are one "node" each) and the service. Over HTTP, the
    /// servers' port is declared `protocol = "http"`.
    pub fn mesh_file(&self, this_node: &str, node_of: impl Fn(&Pod, &str) -> String) -> MeshFile {
        let mut mesh = MeshFile::new(this_node);
        mesh.pod(&self.client, NAMESPACE, CLIENT_SA)
            .node(&node_of(&self.client, NODE_A))
            .ips(&[&self.client.ipv4().to_string()]);
        for s in &self.servers {
            // Labelled as a Deployment's pods would be, for policies that select the servers.
            let entry = mesh
                .pod(s, NAMESPACE, SERVICE)
                .node(&node_of(s, self.server_node()))
                .ips(&[&s.ipv4().to_string()])
                .labels(&[("app", SERVICE)]);
            if self.wire == Wire::Http {
                entry.port_protocol(SERVER_PORT, "http");
            }
        }
        let names: Vec<&str> = self.servers.iter().map(|s| s.name()).collect();
        mesh.service(SERVICE, NAMESPACE, &[VIP4], &[(SERVICE_PORT, SERVER_PORT)], &names);
        mesh
    }
}
