//! The scenarios: which mesh runs on top of a [`World`], how it is installed, and how the bench
//! proves the traffic really takes that path before measuring it.

use anyhow::{Context as _, Result, bail, ensure};
use std::net::SocketAddr;

use ferry_tests::haproxy::{HaproxySidecar, SidecarMesh};
use ferry_tests::iptables::SidecarCapture;
use ferry_tests::policy_dir::PolicyDir;
use ferry_tests::scenario::{NAMESPACE, SERVER_PORT, SERVICE, pod_key, wait_events};
use ferry_tests::testapp::{self, ConnectOpts};
use ferry_tests::{Agent, Pod, iptables};

/// Ferry's HBONE port, which a sidecar's inbound capture leaves alone.
const TUNNEL_PORT: u16 = 15008;

use crate::plan::SIZE;
use crate::policy;
use crate::world::{CLIENT_SA, NODE_A, NODE_B, Topology, World};

/// The trust domain of every mesh CA in the bench.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// What carries the client's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshKind {
    /// No mesh: the client's kernel balances the VIP with DNAT, as kube-proxy does.
    Direct,
    /// Ferry's eBPF redirect and node proxy, plaintext (no CA).
    FerryL4,
    /// Ferry with its CA: HBONE with mutual TLS between workloads (its default with a CA).
    FerryMtls,
    /// [`MeshKind::FerryMtls`] with both agents enforcing a policy set ([`policy`]): mesh-wide
    /// allow-nothing plus an ALLOW of the client's identity.
    FerryMtlsPolicy,
    /// Ferry with its CA and `[datapath] local_shortcut`: pods of one node joined by the agent
    /// without the tunnel.
    FerryFastpath,
    /// Ferry's proxy engine as a classic sidecar in every pod behind iptables REDIRECT, HBONE with
    /// mutual TLS between sidecars.
    SidecarFerry,
    /// HAProxy as a classic sidecar in every pod behind iptables REDIRECT, with mutual TLS.
    SidecarHaproxy,
}

/// One row of the report.
#[derive(Debug, Clone, Copy)]
pub struct ScenarioDef {
    /// The scenario's name in the report.
    pub name: &'static str,
    /// Where the servers are.
    pub topology: Topology,
    /// What carries the traffic.
    pub mesh: MeshKind,
}

impl ScenarioDef {
    /// The no-mesh scenario whose latency this one's "added" figures are measured against.
    pub fn baseline(&self) -> &'static str {
        match self.topology {
            Topology::Local => "direct-local",
            Topology::CrossNode => "direct",
        }
    }
}

/// Every scenario, baselines first so a run's drift shows against them last.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef { name: "direct-local", topology: Topology::Local, mesh: MeshKind::Direct },
    ScenarioDef { name: "direct", topology: Topology::CrossNode, mesh: MeshKind::Direct },
    ScenarioDef { name: "ferry-l4-local", topology: Topology::Local, mesh: MeshKind::FerryL4 },
    ScenarioDef { name: "ferry-local", topology: Topology::Local, mesh: MeshKind::FerryMtls },
    ScenarioDef { name: "ferry-local-fastpath", topology: Topology::Local, mesh: MeshKind::FerryFastpath },
    ScenarioDef { name: "ferry-mtls", topology: Topology::CrossNode, mesh: MeshKind::FerryMtls },
    ScenarioDef { name: "ferry-mtls-policy", topology: Topology::CrossNode, mesh: MeshKind::FerryMtlsPolicy },
    ScenarioDef { name: "sidecar-ferry", topology: Topology::CrossNode, mesh: MeshKind::SidecarFerry },
    ScenarioDef { name: "sidecar-haproxy-local", topology: Topology::Local, mesh: MeshKind::SidecarHaproxy },
    ScenarioDef { name: "sidecar-haproxy", topology: Topology::CrossNode, mesh: MeshKind::SidecarHaproxy },
];

/// A running mesh. Its processes stop when it drops (before the world they run in).
pub struct Mesh {
    agents: Vec<Agent>,
    haproxy: Option<SidecarMesh>,
    _ca: Option<tempfile::TempDir>,
    /// The policy files the agents read (and re-read when they change) while they run.
    _policies: Option<PolicyDir>,
}

impl Mesh {
    /// Pids of every mesh process (agents or sidecars): what the cost figures add up.
    pub fn pids(&self) -> Vec<u32> {
        let sidecars = self.haproxy.iter().flat_map(|m| m.sidecars().iter().map(HaproxySidecar::pid));
        self.agents.iter().map(Agent::pid).chain(sidecars).collect()
    }
}

/// Installs `kind` on `world` and returns once its processes are ready.
pub fn install(world: &World, kind: MeshKind) -> Result<Mesh> {
    match kind {
        MeshKind::Direct => {
            iptables::install_service_dnat(&world.client, v4(world.service())?, &world.endpoints())?;
            Ok(Mesh { agents: Vec::new(), haproxy: None, _ca: None, _policies: None })
        }
        MeshKind::FerryL4 => node_agents(world, false, false, None),
        MeshKind::FerryMtls => node_agents(world, true, false, None),
        MeshKind::FerryMtlsPolicy => node_agents(world, true, false, Some(policy::write_set()?)),
        MeshKind::FerryFastpath => node_agents(world, true, true, None),
        MeshKind::SidecarFerry => ferry_sidecars(world),
        MeshKind::SidecarHaproxy => {
            let pods: Vec<(&ferry_tests::Pod, &str)> = std::iter::once((&world.client, CLIENT_SA))
                .chain(world.servers.iter().map(|s| (s, SERVICE)))
                .collect();
            let endpoints: Vec<SocketAddr> = world.endpoints().into_iter().map(SocketAddr::V4).collect();
            let mesh = SidecarMesh::start(&pods, &endpoints, SERVER_PORT)?;
            Ok(Mesh { agents: Vec::new(), haproxy: Some(mesh), _ca: None, _policies: None })
        }
    }
}

/// One Ferry agent per node, with a CA when `mtls`, the node-local shortcut when `shortcut`, and
/// every agent reading `policies` when given.
fn node_agents(world: &World, mtls: bool, shortcut: bool, policies: Option<PolicyDir>) -> Result<Mesh> {
    let nodes: &[&str] = match world.topology {
        Topology::Local => &[NODE_A],
        Topology::CrossNode => &[NODE_A, NODE_B],
    };
    let ca = if mtls { Some(ferry_tests::ca::make_ca(TRUST_DOMAIN, nodes)?) } else { None };
    let mut agents = Vec::new();
    for (node, sim) in nodes.iter().zip(&world.nodes) {
        let mut mesh = world.mesh_file(node, |_, node| node.to_owned());
        if let Some(ca) = &ca {
            mesh.ca(&ca.path().join("nodes").join(node), None);
        }
        if shortcut {
            mesh.local_shortcut(true);
        }
        if let Some(dir) = &policies {
            mesh.root_namespace(policy::ROOT_NAMESPACE).policies(dir.path());
        }
        agents.push(Agent::start(sim, &mesh.to_toml()).with_context(|| format!("agent on {node}"))?);
    }
    Ok(Mesh { agents, haproxy: None, _ca: ca, _policies: policies })
}

/// One Ferry sidecar per pod, each its own "node" with its own intermediate CA.
fn ferry_sidecars(world: &World) -> Result<Mesh> {
    let pods: Vec<&Pod> = std::iter::once(&world.client).chain(&world.servers).collect();
    let names: Vec<&str> = pods.iter().map(|p| p.name()).collect();
    let ca = ferry_tests::ca::make_ca(TRUST_DOMAIN, &names)?;
    let capture =
        SidecarCapture { outbound_port: 15001, inbound_port: 15006, inbound_exclude: vec![TUNNEL_PORT] };
    let mut agents = Vec::new();
    for pod in pods {
        let mut mesh = world.mesh_file(pod.name(), |p, _| p.name().to_owned());
        mesh.capture_mode("iptables").ca(&ca.path().join("nodes").join(pod.name()), None);
        iptables::install(pod, &capture)?;
        agents.push(Agent::start_sidecar(pod, &mesh.to_toml())?);
    }
    Ok(Mesh { agents, haproxy: None, _ca: Some(ca), _policies: None })
}

fn v4(addr: std::net::SocketAddr) -> Result<std::net::SocketAddrV4> {
    match addr {
        std::net::SocketAddr::V4(a) => Ok(a),
        std::net::SocketAddr::V6(a) => anyhow::bail!("the bench service is IPv4, not {a}"),
    }
}

/// Proves the client's service traffic takes `kind`'s path: connections to the VIP reach several
/// servers; the servers see the client itself (direct) or a local proxy (mesh); Ferry's agents
/// record the connections with the expected security; with policies, the servers' agent allowed
/// them by the client's ALLOW and refuses an identity the set does not allow.
pub fn check_path(world: &World, mesh: &Mesh, kind: MeshKind) -> Result<()> {
    const CONNS: usize = 20;
    let opts = ConnectOpts { bytes: SIZE, conns: CONNS, ..ConnectOpts::default() };
    let r = testapp::connect(&world.client, world.service(), &opts)?;
    ensure!(r.ok == CONNS as u64, "connections to the service failed: {r:?}");
    ensure!(r.tags.len() > 1, "the service did not balance over its servers: {r:?}");
    let client_ip = world.client.ipv4().to_string();
    let seen_ok = |peer: &String| match kind {
        MeshKind::Direct => peer.starts_with(&format!("{client_ip}:")),
        _ => peer.starts_with("127.0.0.1:"),
    };
    ensure!(
        r.peers_seen_by_server.iter().all(seen_ok),
        "the servers saw unexpected peers for {kind:?}: {r:?}"
    );
    let Some(client_agent) = mesh.agents.first() else { return Ok(()) };
    let security = match kind {
        MeshKind::FerryL4 => "none",
        MeshKind::FerryFastpath => "node_local",
        _ => "mutual_tls",
    };
    let client = pod_key(&world.client);
    let service = format!("{NAMESPACE}/{SERVICE}");
    let recorded = wait_events(client_agent, CONNS, |e| {
        e["event"] == "conn_close"
            && e["direction"] == "outbound"
            && e["pod"] == client.as_str()
            && e["service"] == service.as_str()
            && e["security"] == security
    });
    ensure!(
        recorded.len() >= CONNS,
        "the client's agent recorded {} of {CONNS} outbound service connections with security {security}",
        recorded.len()
    );
    match (kind, mesh.agents.as_slice()) {
        (MeshKind::FerryMtlsPolicy, [client_agent, server_agent]) => {
            policy::check(world, client_agent, server_agent, CONNS)
        }
        (MeshKind::FerryMtlsPolicy, agents) => bail!("policy check needs two agents, not {}", agents.len()),
        _ => Ok(()),
    }
}
