//! The cross-node bench's topology: two linked nodes, each with its own agent and its own
//! intermediate CA under one root (`ferry ca init` + `ferry ca issue-node`), one enrolled pod and
//! one pod outside the mesh on each node, and an echo server in both node-b pods.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ferry_tests::scenario::{NAMESPACE, SERVER_PORT, serve};
use ferry_tests::{Agent, ChildGuard, MeshFile, NodeLink, Pod, SimNode, link_nodes, netns};

/// The mesh name of the client's node (and its CA directory under `nodes/`).
pub const NODE_A: &str = "node-a";
/// The mesh name of the server's node.
pub const NODE_B: &str = "node-b";
/// The trust domain of the bench CA.
const TRUST_DOMAIN: &str = "cluster.local";

/// Node-a holds `client` (enrolled) and `direct_client` (not enrolled); node-b holds `server`
/// (enrolled) and `direct_server` (not enrolled), both running an echo server on [`SERVER_PORT`].
/// Fields drop in order: the agents first, the nodes last.
pub struct TwoNodes {
    /// Node-a's agent; `None` only in the middle of [`TwoNodes::restart_a`].
    a: Option<Agent>,
    /// Node-b's agent.
    pub b: Agent,
    /// The enrolled client pod on node-a.
    pub client: Pod,
    /// The enrolled server pod on node-b.
    pub server: Pod,
    /// A pod on node-a that is not in the mesh.
    pub direct_client: Pod,
    /// A pod on node-b that is not in the mesh.
    pub direct_server: Pod,
    mesh_a: String,
    _ca: tempfile::TempDir,
    _echo: Vec<ChildGuard>,
    _link: NodeLink,
    node_a: SimNode,
    _node_b: SimNode,
}

impl TwoNodes {
    /// Builds both nodes, the link, the pods, the echo servers and the CA, then starts both agents.
    pub fn start() -> Result<Self> {
        let mut node_a = SimNode::new("benchxa", 1)?;
        let mut node_b = SimNode::new("benchxb", 2)?;
        let link = link_nodes(&node_a, &node_b)?;
        let client = node_a.add_pod("client")?;
        let direct_client = node_a.add_pod("direct-a")?;
        let server = node_b.add_pod("server")?;
        let direct_server = node_b.add_pod("direct-b")?;
        // Whoever closes first keeps the connection in TIME_WAIT for a minute: the clients, and in
        // the server pod node-b's agent (its side to the app). Let a new connect reuse such a port,
        // or tens of thousands of connections to one address run out of ports.
        for pod in [&client, &direct_client, &server, &direct_server] {
            netns::write_sysctl(pod.netns_path(), "net/ipv4/tcp_tw_reuse", "1")?;
        }
        let echo =
            vec![serve(&server, SERVER_PORT, "server")?, serve(&direct_server, SERVER_PORT, "direct")?];
        let ca = ferry_tests::ca::make_ca(TRUST_DOMAIN, &[NODE_A, NODE_B])?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), None);
            mesh.pod(&client, NAMESPACE, "client").node(NODE_A);
            mesh.pod(&server, NAMESPACE, "echo").node(NODE_B);
            mesh.to_toml()
        };
        let mesh_a = mesh_for(NODE_A);
        let a = Agent::start(&node_a, &mesh_a).context("agent on node-a")?;
        let b = Agent::start(&node_b, &mesh_for(NODE_B)).context("agent on node-b")?;
        Ok(Self {
            a: Some(a),
            b,
            client,
            server,
            direct_client,
            direct_server,
            mesh_a,
            _ca: ca,
            _echo: echo,
            _link: link,
            node_a,
            _node_b: node_b,
        })
    }

    /// Node-a's agent.
    pub fn a(&self) -> Result<&Agent> {
        self.a.as_ref().context("node-a's agent is not running (a restart failed)")
    }

    /// The enrolled server's echo address.
    pub fn mesh_to(&self) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), SERVER_PORT)
    }

    /// The unenrolled server's echo address.
    pub fn direct_to(&self) -> SocketAddr {
        SocketAddr::new(self.direct_server.ipv4().into(), SERVER_PORT)
    }

    /// Stops node-a's agent (SIGTERM) and starts it again with the same mesh file, which drops its
    /// pooled tunnels; how long the new one took to report ready.
    pub fn restart_a(&mut self) -> Result<Duration> {
        if let Some(old) = self.a.take() {
            old.stop().context("stopping node-a's agent")?;
        }
        let started = Instant::now();
        let agent = Agent::start(&self.node_a, &self.mesh_a).context("restarting node-a's agent")?;
        self.a = Some(agent);
        Ok(started.elapsed())
    }
}
