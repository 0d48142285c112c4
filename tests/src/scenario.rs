//! The standard one-node scenario shared by the end-to-end tests, the demo and the benchmarks: a
//! client pod, two echo server pods behind one service VIP (IPv4 and IPv6), and one pod outside the
//! mesh, with the agent running. Plus small helpers to drive traffic and read the agent's events.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{Agent, ChildGuard, MeshFile, Pod, SimNode, bin_path};

pub use crate::testapp::serve;

/// The service's IPv4 VIP.
pub const VIP4: &str = "10.96.0.10";
/// The service's IPv6 VIP.
pub const VIP6: &str = "fd00:96::10";
/// [`VIP4`] as an address.
pub const VIP4_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// [`VIP6`] as an address.
pub const VIP6_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// The service port clients use.
pub const SERVICE_PORT: u16 = 80;
/// The port the servers listen on.
pub const SERVER_PORT: u16 = 8080;
/// The Kubernetes namespace of every enrolled pod.
pub const NAMESPACE: &str = "demo";
/// The service's name; the agent reports it as `NAMESPACE/SERVICE`.
pub const SERVICE: &str = "echo";
/// How long [`wait_events`] waits.
pub const EVENT_WAIT: Duration = Duration::from_secs(20);

/// A node named after the scenario with the agent running. Enrolled: `client` (service account
/// "client") and `servers` (server-1 and server-2, service account "echo", each running an echo
/// server on [`SERVER_PORT`] tagged with its name, and the endpoints of service [`SERVICE`]).
/// Not enrolled: `outsider`. Dropping it stops the agent, then the servers, then removes the node.
pub struct Scenario {
    /// The running agent.
    pub agent: Agent,
    /// The enrolled client pod.
    pub client: Pod,
    /// The enrolled server pods, server-1 then server-2.
    pub servers: Vec<Pod>,
    /// A pod that is not in the mesh file.
    pub outsider: Pod,
    _servers: Vec<ChildGuard>,
    /// The node; declared last so it is dropped after everything running on it.
    pub node: SimNode,
}

impl Scenario {
    /// Builds the node `name`, starts an echo server in every server pod, then the agent, and
    /// returns once the agent reported ready.
    pub fn start(name: &str) -> Result<Self> {
        let pods = ScenarioPods::start(name)?;
        let mut mesh = MeshFile::new("node-a");
        mesh.pod(&pods.client, NAMESPACE, "client");
        for s in &pods.servers {
            mesh.pod(s, NAMESPACE, SERVICE);
        }
        echo_service(&mut mesh);
        let agent = Agent::start(&pods.node, &mesh.to_toml()).context("starting the agent")?;
        let ScenarioPods { client, servers, outsider, server_guards, node } = pods;
        Ok(Self { agent, client, servers, outsider, _servers: server_guards, node })
    }
}

/// The scenario's node and pods with the echo servers running, before any agent (or sidecar)
/// starts. Fields drop in order: the servers, then the node.
pub struct ScenarioPods {
    /// The client pod.
    pub client: Pod,
    /// server-1 then server-2, each serving [`SERVER_PORT`] tagged with its name.
    pub servers: Vec<Pod>,
    /// A pod meant to stay out of the mesh.
    pub outsider: Pod,
    /// The echo servers.
    pub server_guards: Vec<ChildGuard>,
    /// The node; declared last so it is dropped after everything running on it.
    pub node: SimNode,
}

impl ScenarioPods {
    /// Builds the node `name` with its pods and starts an echo server in every server pod.
    pub fn start(name: &str) -> Result<Self> {
        let mut node = SimNode::new(name, 1)?;
        let client = node.add_pod("client")?;
        let servers = vec![node.add_pod("server-1")?, node.add_pod("server-2")?];
        let outsider = node.add_pod("outsider")?;
        let mut server_guards = Vec::new();
        for s in &servers {
            server_guards.push(serve(s, SERVER_PORT, s.name())?);
        }
        Ok(Self { client, servers, outsider, server_guards, node })
    }
}

/// Adds service [`SERVICE`] (both VIPs, [`SERVICE_PORT`] to [`SERVER_PORT`], endpoints server-1
/// and server-2) to `mesh`.
pub fn echo_service(mesh: &mut MeshFile) -> &mut MeshFile {
    mesh.service(SERVICE, NAMESPACE, &[VIP4, VIP6], &[(SERVICE_PORT, SERVER_PORT)], &["server-1", "server-2"])
}

/// The service's IPv4 or IPv6 VIP with [`SERVICE_PORT`].
pub fn service_addr(v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 { VIP6_IP.into() } else { VIP4_IP.into() };
    SocketAddr::new(ip, SERVICE_PORT)
}

/// How the agent names a pod of this scenario in its events: "namespace/name".
pub fn pod_key(pod: &Pod) -> String {
    format!("{NAMESPACE}/{}", pod.name())
}

/// Runs `ferry-testapp connect ADDR ARGS...` in a pod (netns and cgroup) and returns its JSON
/// report as printed (failed connections are in the report; an error means no report at all).
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
    SocketAddr::new(ip, port).to_string()
}

/// The agent's events of one kind (`"conn_close"`, say) so far.
pub fn events_of(agent: &Agent, kind: &str) -> Vec<Value> {
    agent.events().into_iter().filter(|e| e["event"] == kind).collect()
}

/// Waits up to [`EVENT_WAIT`] until at least `n` events match `pred`, and returns the matching
/// events (fewer than `n` when time ran out: the caller's assertion then shows what was there).
pub fn wait_events(agent: &Agent, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    wait_events_in(&[agent], n, pred)
}

/// [`wait_events`] over several agents (one sidecar per pod, say): waits until their events
/// together hold at least `n` matches, and returns those, agent by agent.
pub fn wait_events_in(agents: &[&Agent], n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let found: Vec<Value> = agents.iter().flat_map(|a| a.events()).filter(|e| pred(e)).collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_constants_agree() {
        assert_eq!(VIP4.parse::<Ipv4Addr>().unwrap(), VIP4_IP);
        assert_eq!(VIP6.parse::<Ipv6Addr>().unwrap(), VIP6_IP);
        assert_eq!(service_addr(false).to_string(), "10.96.0.10:80");
        assert_eq!(service_addr(true).to_string(), "[fd00:96::10]:80");
    }

    #[test]
    fn sock_matches_the_agents_address_format() {
        assert_eq!(sock(Ipv4Addr::new(10, 233, 1, 3).into(), 8080), "10.233.1.3:8080");
        assert_eq!(sock("fd00:233:1::3".parse().unwrap(), 8080), "[fd00:233:1::3]:8080");
    }
}
