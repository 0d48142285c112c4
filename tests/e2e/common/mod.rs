//! The standard one-node scenario the end-to-end tests share: a client pod, two server pods behind a
//! service VIP, and one pod outside the mesh.
#![allow(dead_code)]

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};
use ferry_tests::{Agent, ChildGuard, MeshFile, Pod, SimNode, bin_path};
use serde_json::Value;

/// The service's IPv4 VIP.
pub const VIP4: &str = "10.96.0.10";
/// The service's IPv6 VIP.
pub const VIP6: &str = "fd00:96::10";
/// The service port clients use.
pub const SERVICE_PORT: u16 = 80;
/// The port the servers listen on.
pub const SERVER_PORT: u16 = 8080;

/// A node with the agent running.
pub struct Scenario {
    pub agent: Agent,
    pub client: Pod,
    pub servers: Vec<Pod>,
    pub outsider: Pod,
    _servers: Vec<ChildGuard>,
    pub node: SimNode,
}

impl Scenario {
    /// Builds the node, starts echo servers in every server pod and the outsider, and the agent.
    pub fn start(name: &str) -> Result<Self> {
        let mut node = SimNode::new(name, 1)?;
        let client = node.add_pod("client")?;
        let servers = vec![node.add_pod("server-1")?, node.add_pod("server-2")?];
        let outsider = node.add_pod("outsider")?;
        let mut guards = Vec::new();
        for s in &servers {
            guards.push(serve(s, SERVER_PORT, s.name())?);
        }
        let mut mesh = MeshFile::new("node-a");
        mesh.pod(&client, "demo", "client");
        for s in &servers {
            mesh.pod(s, "demo", "echo");
        }
        mesh.service(
            "echo",
            "demo",
            &[VIP4, VIP6],
            &[(SERVICE_PORT, SERVER_PORT)],
            &["server-1", "server-2"],
        );
        let agent = Agent::start(&node, &mesh.to_toml()).context("starting the agent")?;
        Ok(Self { agent, client, servers, outsider, _servers: guards, node })
    }
}

/// Starts `ferry-testapp serve` in a pod and waits until it listens.
pub fn serve(pod: &Pod, port: u16, tag: &str) -> Result<ChildGuard> {
    let mut cmd = pod.command(bin_path("ferry-testapp"));
    cmd.args(["serve", "--port", &port.to_string(), "--tag", tag]);
    pod.spawn_server(cmd)
}

/// Runs `ferry-testapp connect` in a pod (netns and cgroup) and returns its JSON report.
pub fn connect(pod: &Pod, addr: &str, args: &[&str]) -> Result<Value> {
    let mut cmd = pod.command(bin_path("ferry-testapp"));
    cmd.arg("connect").arg(addr).args(args);
    let out = pod.output(cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!("testapp connect printed {stdout:?}, stderr {:?}", String::from_utf8_lossy(&out.stderr))
    })
}

/// Formats ip:port the way the agent prints socket addresses.
pub fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Events of one kind.
pub fn events_of(agent: &Agent, kind: &str) -> Vec<Value> {
    agent.events().into_iter().filter(|e| e["event"] == kind).collect()
}

/// Waits until `n` events match `pred`, returning them.
pub fn wait_events(agent: &Agent, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<Value> = agent.events().into_iter().filter(|e| pred(e)).collect();
        if found.len() >= n || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
