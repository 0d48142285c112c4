//! The topology of the L7 end-to-end tests: two linked nodes with one CA (mutual TLS between
//! them), a policy directory both agents read, and a server pod running the in-pod apps of
//! [`crate::http_app`] on fixed ports, some undeclared (so the destination agent detects HTTP),
//! some declared in the mesh file. Clients run in forked children that joined a pod's netns and
//! cgroup ([`crate::Pod::run_in_cgroup`]), so an enrolled pod's connects are captured.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::http_app::App;
use crate::http_client::{H1, H1Response, H2Request, H2Response, h2_exchange};
use crate::policy_dir::PolicyDir;
use crate::scenario::EVENT_WAIT;
use crate::{Agent, MeshFile, NodeLink, Pod, SimNode, link_nodes};

/// The hyper echo app, on a port no one declares: the destination agent detects HTTP.
pub const ECHO_PORT: u16 = 8080;
/// The hyper echo app again, on a port the server pod declares `http`.
pub const DECLARED_PORT: u16 = 8081;
/// The capturing app, undeclared.
pub const CAPTURE_PORT: u16 = 9090;
/// The server-first app, undeclared.
pub const GREETER_PORT: u16 = 7070;
/// The server-first app again, on a port the server pod declares `tcp`.
pub const GREETER_TCP_PORT: u16 = 7071;
/// What the server-first apps say first.
pub const GREETING: &[u8] = b"220 ferry-greeter ESMTP ready\r\n";
/// The client's SPIFFE ID.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// How long a forked client may run.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// Where the server runs, and so which agent decides its inbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// On node-b: the mesh clients reach it through the HBONE tunnel (mutual TLS).
    Remote,
    /// On node-a with the mesh clients, whose agent joins them over the node-local shortcut.
    Local,
}

/// node-a: `client` (namespace demo, service account client) and `other` (demo, other). node-b
/// (node-a with [`At::Local`]): `server` (demo, service account echo, labels app=echo,
/// PERMISSIVE) with the apps. node-b: `outsider`, not in the mesh (plaintext into the server).
/// Fields drop in order: the agents first, then the apps, the nodes last.
pub struct L7Mesh {
    /// node-a's agent.
    pub a: Agent,
    /// node-b's agent.
    pub b: Agent,
    /// Where the server is.
    pub at: At,
    /// The echo app on [`ECHO_PORT`].
    pub echo: App,
    /// The echo app on [`DECLARED_PORT`].
    pub declared: App,
    /// The capturing app on [`CAPTURE_PORT`].
    pub capture: App,
    /// The server-first app on [`GREETER_PORT`].
    pub greeter: App,
    /// The server-first app on [`GREETER_TCP_PORT`].
    pub greeter_tcp: App,
    /// The mesh client.
    pub client: Pod,
    /// Another mesh pod of namespace demo.
    pub other: Pod,
    /// The server pod.
    pub server: Pod,
    /// A pod outside the mesh, on node-b.
    pub outsider: Pod,
    /// The policy directory both agents read.
    pub policies: PolicyDir,
    _ca: tempfile::TempDir,
    _link: NodeLink,
    /// node-a.
    pub node_a: SimNode,
    /// node-b.
    pub node_b: SimNode,
}

impl L7Mesh {
    /// Builds the nodes (named `NAMEa`, `NAMEb`), writes `policies` (file name, YAML), starts the
    /// apps and then both agents.
    pub fn start(name: &str, at: At, policies: &[(&str, &str)]) -> Result<Self> {
        let mut node_a = SimNode::new(&format!("{name}a"), 1)?;
        let mut node_b = SimNode::new(&format!("{name}b"), 2)?;
        let link = link_nodes(&node_a, &node_b)?;
        let client = node_a.add_pod("client")?;
        let other = node_a.add_pod("other")?;
        let (server, server_node) = match at {
            At::Remote => (node_b.add_pod("server")?, "node-b"),
            At::Local => (node_a.add_pod("server")?, "node-a"),
        };
        let outsider = node_b.add_pod("outsider")?;
        let echo = App::echo(&server, ECHO_PORT)?;
        let declared = App::echo(&server, DECLARED_PORT)?;
        let capture = App::capture(&server, CAPTURE_PORT)?;
        let greeter = App::greeter(&server, GREETER_PORT, GREETING)?;
        let greeter_tcp = App::greeter(&server, GREETER_TCP_PORT, GREETING)?;
        let dir = PolicyDir::with_files(policies)?;
        let ca = crate::ca::make_ca("cluster.local", &["node-a", "node-b"])?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), None).policies(dir.path());
            if at == At::Local {
                mesh.local_shortcut(true);
            }
            mesh.pod(&client, "demo", "client").node("node-a");
            mesh.pod(&other, "demo", "other").node("node-a");
            mesh.pod(&server, "demo", "echo")
                .node(server_node)
                .mode("permissive")
                .port_protocol(DECLARED_PORT, "http")
                .port_protocol(GREETER_TCP_PORT, "tcp")
                .labels(&[("app", "echo")]);
            mesh
        };
        let agent = |node: &SimNode, mesh: &MeshFile| {
            Agent::start(node, &mesh.to_toml()).with_context(|| format!("agent on {}", node.name()))
        };
        Ok(Self {
            a: agent(&node_a, &mesh_for("node-a"))?,
            b: agent(&node_b, &mesh_for("node-b"))?,
            at,
            echo,
            declared,
            capture,
            greeter,
            greeter_tcp,
            client,
            other,
            server,
            outsider,
            policies: dir,
            _ca: ca,
            _link: link,
            node_a,
            node_b,
        })
    }

    /// The agent that decides the server's inbound connections, and its node.
    pub fn dest(&self) -> (&Agent, &SimNode) {
        match self.at {
            At::Remote => (&self.b, &self.node_b),
            At::Local => (&self.a, &self.node_a),
        }
    }

    /// The server's IPv4 address with `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), port)
    }

    /// Runs `f` in a child in `from`'s netns and cgroup (see [`Pod::run_in_cgroup`]).
    pub fn run<T, F>(&self, from: &Pod, f: F) -> T
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> T,
    {
        from.run_in_cgroup_timeout(CLIENT_LIMIT, f)
            .unwrap_or_else(|e| panic!("the client in {} failed: {e:#}", from.name()))
    }

    /// From `from`, one HTTP/1 connection to `to` carrying `requests` (raw bytes) one after the
    /// other; each request's response, or why there was none (the rest are then not sent).
    pub fn h1(&self, from: &Pod, to: SocketAddr, requests: Vec<Vec<u8>>) -> Vec<Result<H1Response, String>> {
        self.run(from, move || {
            let mut conn = match H1::connect(to) {
                Ok(c) => c,
                Err(e) => return vec![Err(format!("connecting to {to}: {e}"))],
            };
            let mut out = Vec::new();
            for request in &requests {
                let response = conn.request(request).map_err(|e| e.to_string());
                let failed = response.is_err();
                out.push(response);
                if failed {
                    break;
                }
            }
            out
        })
    }

    /// From `from`, one HTTP/2 (prior knowledge) connection to `to` carrying `requests` as streams
    /// one after the other.
    pub fn h2(&self, from: &Pod, to: SocketAddr, requests: Vec<H2Request>) -> Vec<H2Response> {
        self.run(from, move || h2_exchange(to, &requests))
            .unwrap_or_else(|e| panic!("HTTP/2 from {} to {to}: {e}", from.name()))
    }

    /// The deciding agent's access-log lines of HTTP requests.
    pub fn request_lines(&self) -> Vec<Value> {
        self.dest().0.access_log().into_iter().filter(|l| l["kind"] == "request").collect()
    }

    /// Waits up to [`EVENT_WAIT`] for at least `n` request lines matching `pred`; returns those
    /// found (fewer when time ran out, for the caller's assertion to show).
    pub fn wait_request_lines(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let found: Vec<Value> = self.request_lines().into_iter().filter(|l| pred(l)).collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An HTTP/1.1 request's bytes: `METHOD TARGET HTTP/1.1`, `Host` when given, `headers`, and a
/// Content-Length body when `body` is not empty.
pub fn h1_request(
    method: &str,
    target: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\n");
    if let Some(host) = host {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}
