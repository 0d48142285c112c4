//! The scenarios: which mesh runs on top of a [`World`], how it is installed, and how the bench
//! proves the traffic really takes that path before measuring it.

use anyhow::{Context as _, Result, bail, ensure};
use std::net::SocketAddr;

use ferry_tests::haproxy::{self, SidecarMesh};
use ferry_tests::iptables::SidecarCapture;
use ferry_tests::policy_dir::PolicyDir;
use ferry_tests::scenario::{NAMESPACE, SERVER_PORT, SERVICE, pod_key, wait_events};
use ferry_tests::testapp::{self, ConnectOpts, ConnectReport, Wire};
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
    /// [`MeshKind::FerryMtls`] with `[capture] original_source = false`: the apps see the proxy on
    /// loopback, as before transparent inbound (the old path, measured against the new one).
    FerryMtlsLoopback,
    /// [`MeshKind::FerryFastpath`] with `original_source = false`.
    FerryFastpathLoopback,
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
    /// What the apps speak: the raw echo, or HTTP/1.1 to a port declared `http`.
    pub wire: Wire,
}

impl ScenarioDef {
    /// The no-mesh scenario whose latency this one's "added" figures are measured against: same
    /// topology, same wire.
    pub fn baseline(&self) -> &'static str {
        match (self.topology, self.wire) {
            (Topology::Local, Wire::Echo) => "direct-local",
            (Topology::CrossNode, Wire::Echo) => "direct",
            (Topology::Local, Wire::Http) => "direct-local-http",
            (Topology::CrossNode, Wire::Http) => "direct-http",
        }
    }

    const fn new(name: &'static str, topology: Topology, mesh: MeshKind) -> ScenarioDef {
        ScenarioDef { name, topology, mesh, wire: Wire::Echo }
    }

    const fn http(name: &'static str, topology: Topology, mesh: MeshKind) -> ScenarioDef {
        ScenarioDef { name, topology, mesh, wire: Wire::Http }
    }
}

/// Every scenario, baselines first so a run's drift shows against them last. The `-http`
/// scenarios carry HTTP/1.1 (1 KiB requests and responses on keep-alive connections) against
/// their own baseline, `direct-http`.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef::new("direct-local", Topology::Local, MeshKind::Direct),
    ScenarioDef::new("direct", Topology::CrossNode, MeshKind::Direct),
    ScenarioDef::http("direct-http", Topology::CrossNode, MeshKind::Direct),
    ScenarioDef::new("ferry-l4-local", Topology::Local, MeshKind::FerryL4),
    ScenarioDef::new("ferry-local", Topology::Local, MeshKind::FerryMtls),
    ScenarioDef::new("ferry-local-fastpath", Topology::Local, MeshKind::FerryFastpath),
    ScenarioDef::new("ferry-local-fastpath-loopback", Topology::Local, MeshKind::FerryFastpathLoopback),
    ScenarioDef::new("ferry-mtls", Topology::CrossNode, MeshKind::FerryMtls),
    ScenarioDef::new("ferry-mtls-loopback", Topology::CrossNode, MeshKind::FerryMtlsLoopback),
    ScenarioDef::new("ferry-mtls-policy", Topology::CrossNode, MeshKind::FerryMtlsPolicy),
    ScenarioDef::http("ferry-mtls-http", Topology::CrossNode, MeshKind::FerryMtls),
    ScenarioDef::new("sidecar-ferry", Topology::CrossNode, MeshKind::SidecarFerry),
    ScenarioDef::new("sidecar-haproxy-local", Topology::Local, MeshKind::SidecarHaproxy),
    ScenarioDef::new("sidecar-haproxy", Topology::CrossNode, MeshKind::SidecarHaproxy),
    ScenarioDef::http("sidecar-haproxy-http", Topology::CrossNode, MeshKind::SidecarHaproxy),
];

/// A running mesh. Its processes stop when it drops (before the world they run in).
pub struct Mesh {
    agents: Vec<Agent>,
    /// What each agent is, for profiles: `agent NODE` or `sidecar POD`.
    agent_names: Vec<String>,
    haproxy: Option<SidecarMesh>,
    _ca: Option<tempfile::TempDir>,
    /// The policy files the agents read (and re-read when they change) while they run.
    _policies: Option<PolicyDir>,
}

impl Mesh {
    /// Pids of every mesh process (agents or sidecars): what the cost figures add up.
    pub fn pids(&self) -> Vec<u32> {
        self.processes().into_iter().map(|(pid, _)| pid).collect()
    }

    /// Every mesh process with what it is (`agent node-b`, `haproxy server-3`), for profiles.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let sidecars = self
            .haproxy
            .iter()
            .flat_map(|m| m.sidecars().iter().map(|s| (s.pid(), format!("haproxy {}", s.pod_name()))));
        self.agents.iter().map(Agent::pid).zip(self.agent_names.iter().cloned()).chain(sidecars).collect()
    }
}

/// Installs `kind` on `world` and returns once its processes are ready.
pub fn install(world: &World, kind: MeshKind) -> Result<Mesh> {
    match kind {
        MeshKind::Direct => {
            iptables::install_service_dnat(&world.client, v4(world.service())?, &world.endpoints())?;
            Ok(Mesh {
                agents: Vec::new(),
                agent_names: Vec::new(),
                haproxy: None,
                _ca: None,
                _policies: None,
            })
        }
        MeshKind::FerryL4 => node_agents(world, Agents { mtls: false, ..Agents::DEFAULT }),
        MeshKind::FerryMtls => node_agents(world, Agents::DEFAULT),
        MeshKind::FerryMtlsPolicy => {
            node_agents(world, Agents { policies: Some(policy::write_set()?), ..Agents::DEFAULT })
        }
        MeshKind::FerryFastpath => node_agents(world, Agents { shortcut: true, ..Agents::DEFAULT }),
        MeshKind::FerryMtlsLoopback => {
            node_agents(world, Agents { original_source: false, ..Agents::DEFAULT })
        }
        MeshKind::FerryFastpathLoopback => {
            node_agents(world, Agents { shortcut: true, original_source: false, ..Agents::DEFAULT })
        }
        MeshKind::SidecarFerry => ferry_sidecars(world),
        MeshKind::SidecarHaproxy => {
            let pods: Vec<(&ferry_tests::Pod, &str)> = std::iter::once((&world.client, CLIENT_SA))
                .chain(world.servers.iter().map(|s| (s, SERVICE)))
                .collect();
            let endpoints: Vec<SocketAddr> = world.endpoints().into_iter().map(SocketAddr::V4).collect();
            let mode = match world.wire {
                Wire::Echo => haproxy::Mode::Tcp,
                Wire::Http => haproxy::Mode::Http,
            };
            let mesh = SidecarMesh::start_mode(&pods, &endpoints, SERVER_PORT, mode)?;
            Ok(Mesh {
                agents: Vec::new(),
                agent_names: Vec::new(),
                haproxy: Some(mesh),
                _ca: None,
                _policies: None,
            })
        }
    }
}

/// How the node agents of a scenario are set up.
struct Agents {
    /// A CA, so HBONE with mutual TLS.
    mtls: bool,
    /// `[datapath] local_shortcut`.
    shortcut: bool,
    /// `[capture] original_source`: apps see their clients' real addresses.
    original_source: bool,
    /// Policy files every agent reads.
    policies: Option<PolicyDir>,
}

impl Agents {
    /// Ferry's defaults with a CA.
    const DEFAULT: Agents = Agents { mtls: true, shortcut: false, original_source: true, policies: None };
}

/// One Ferry agent per node, set up as `agents` says.
fn node_agents(world: &World, agents_setup: Agents) -> Result<Mesh> {
    let Agents { mtls, shortcut, original_source, policies } = agents_setup;
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
        if !original_source {
            mesh.original_source(false);
        }
        if let Some(dir) = &policies {
            mesh.root_namespace(policy::ROOT_NAMESPACE).policies(dir.path());
        }
        // As operators run it by default: no access log (the sidecars compared log nothing).
        let agent = Agent::start_without_access_log(sim, &mesh.to_toml());
        agents.push(agent.with_context(|| format!("agent on {node}"))?);
    }
    let agent_names = nodes.iter().map(|n| format!("agent {n}")).collect();
    Ok(Mesh { agents, agent_names, haproxy: None, _ca: ca, _policies: policies })
}

/// One Ferry sidecar per pod, each its own "node" with its own intermediate CA.
fn ferry_sidecars(world: &World) -> Result<Mesh> {
    let pods: Vec<&Pod> = std::iter::once(&world.client).chain(&world.servers).collect();
    let names: Vec<&str> = pods.iter().map(|p| p.name()).collect();
    let ca = ferry_tests::ca::make_ca(TRUST_DOMAIN, &names)?;
    let capture =
        SidecarCapture { outbound_port: 15001, inbound_port: 15006, inbound_exclude: vec![TUNNEL_PORT] };
    let mut agents = Vec::new();
    let agent_names = names.iter().map(|n| format!("sidecar {n}")).collect();
    for pod in pods {
        let mut mesh = world.mesh_file(pod.name(), |p, _| p.name().to_owned());
        mesh.capture_mode("iptables").ca(&ca.path().join("nodes").join(pod.name()), None);
        iptables::install(pod, &capture)?;
        agents.push(Agent::start_sidecar(pod, &mesh.to_toml())?);
    }
    Ok(Mesh { agents, agent_names, haproxy: None, _ca: Some(ca), _policies: None })
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
/// them by the client's ALLOW and refuses an identity the set does not allow. Over HTTP, the
/// servers' agent served every connection as HTTP/1.1 and recorded its requests, and HAProxy
/// balances the requests of one connection over several servers (which only an HTTP proxy does).
pub fn check_path(world: &World, mesh: &Mesh, kind: MeshKind) -> Result<()> {
    const CONNS: usize = 20;
    let opts = ConnectOpts { bytes: SIZE, conns: CONNS, ..ConnectOpts::default() };
    let r = connect(world, &opts, 1)?;
    ensure!(r.ok == CONNS as u64, "connections to the service failed: {r:?}");
    ensure!(r.tags.len() > 1, "the service did not balance over its servers: {r:?}");
    let client_ip = world.client.ipv4().to_string();
    // Without a mesh and behind Ferry's node agents the servers see the client itself; behind
    // sidecars (and with original_source off) they see a local proxy.
    let seen_ok = |peer: &String| match kind {
        MeshKind::Direct
        | MeshKind::FerryL4
        | MeshKind::FerryMtls
        | MeshKind::FerryMtlsPolicy
        | MeshKind::FerryFastpath => peer.starts_with(&format!("{client_ip}:")),
        _ => peer.starts_with("127.0.0.1:"),
    };
    ensure!(
        r.peers_seen_by_server.iter().all(seen_ok),
        "the servers saw unexpected peers for {kind:?}: {r:?}"
    );
    if (world.wire, kind) == (Wire::Http, MeshKind::SidecarHaproxy) {
        let one = ConnectOpts { bytes: SIZE, conns: 1, ..ConnectOpts::default() };
        let r = connect(world, &one, CONNS as u32)?;
        ensure!(
            r.ok == 1 && r.tags.values().sum::<u64>() == CONNS as u64 && r.tags.len() > 1,
            "HAProxy did not balance {CONNS} requests of one connection over several servers: {r:?}"
        );
    }
    let Some(client_agent) = mesh.agents.first() else { return Ok(()) };
    let security = match kind {
        MeshKind::FerryL4 => "none",
        MeshKind::FerryFastpath | MeshKind::FerryFastpathLoopback => "node_local",
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
    if world.wire == Wire::Http {
        let server_agent = mesh.agents.last().expect("there is a first agent");
        served_http(world, server_agent, CONNS)?;
    }
    match (kind, mesh.agents.as_slice()) {
        (MeshKind::FerryMtlsPolicy, [client_agent, server_agent]) => {
            policy::check(world, client_agent, server_agent, CONNS)
        }
        (MeshKind::FerryMtlsPolicy, agents) => bail!("policy check needs two agents, not {}", agents.len()),
        _ => Ok(()),
    }
}

/// `conns` connections from the client to the service, each with `requests` requests over HTTP
/// (one payload over the echo).
fn connect(world: &World, opts: &ConnectOpts, requests: u32) -> Result<ConnectReport> {
    match world.wire {
        Wire::Echo => testapp::connect(&world.client, world.service(), opts),
        Wire::Http => testapp::connect_http(&world.client, world.service(), opts, requests),
    }
}

/// The servers' agent (the destination) served the client's `conns` connections as HTTP/1.1:
/// each inbound connection from the client is recorded with protocol `http/1.1`, and each of its
/// requests as an `http_request` that got the app's 200.
fn served_http(world: &World, server_agent: &Agent, conns: usize) -> Result<()> {
    let client_id = format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{CLIENT_SA}");
    let servers: Vec<String> = world.servers.iter().map(pod_key).collect();
    let to_server = |e: &serde_json::Value| servers.iter().any(|s| e["pod"] == s.as_str());
    let conns_seen = wait_events(server_agent, conns, |e| {
        e["event"] == "conn_close"
            && e["direction"] == "inbound"
            && e["src_identity"] == client_id.as_str()
            && to_server(e)
    });
    let not_http: Vec<_> = conns_seen.iter().filter(|e| e["protocol"] != "http/1.1").collect();
    ensure!(
        conns_seen.len() >= conns && not_http.is_empty(),
        "the servers' agent recorded {} of {conns} client connections, these not as http/1.1: {not_http:?}",
        conns_seen.len()
    );
    let requests = wait_events(server_agent, conns, |e| {
        e["event"] == "http_request" && e["protocol"] == "HTTP/1.1" && e["status"] == 200 && to_server(e)
    });
    ensure!(
        requests.len() >= conns,
        "the servers' agent recorded {} of {conns} HTTP requests with status 200",
        requests.len()
    );
    Ok(())
}
