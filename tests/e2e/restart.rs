//! Restarts without loss: the pinned datapath outlives the agent (a crash fails closed and the
//! next agent adopts it), and an upgrade by handoff drops nothing under load.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use common::*;
use ferry_tests::{
    Agent, MeshFile, Pod, SimNode, link_nodes,
    upgrade_load::{self, LoadReport, Target},
};
use serde_json::Value;

/// The load servers' port.
const LOAD_PORT: u16 = 9100;

/// Link ids of every `enrolled` event of `agent`, by pod.
fn link_ids(agent: &Agent) -> BTreeMap<String, Vec<u64>> {
    events_of(agent, "enrolled")
        .iter()
        .map(|e| {
            let ids = e["links"].as_array().map(|l| l.iter().filter_map(|l| l["id"].as_u64()).collect());
            (e["pod"].as_str().unwrap_or_default().to_owned(), ids.unwrap_or_default())
        })
        .collect()
}

/// Program ids of `agent`'s `ready` event, sorted.
fn program_ids(agent: &Agent) -> Vec<u64> {
    let ready = events_of(agent, "ready").pop().unwrap_or_default();
    let mut ids: Vec<u64> = ready["programs"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// (port, socket inode) of every TCP listener in `pod`'s netns on one of the proxy's ports.
fn proxy_listeners(pod: &Pod) -> Vec<(String, u64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns_name(), "ss", "-Hltne"])
        .output()
        .expect("ip netns exec ss");
    let mut found: Vec<(String, u64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let local = l.split_whitespace().nth(3)?.to_owned();
            let port: u16 = local.rsplit(':').next()?.parse().ok()?;
            if ![15001, 15006, 15008].contains(&port) {
                return None;
            }
            let ino = l.split_whitespace().find_map(|f| f.strip_prefix("ino:"))?.parse().ok()?;
            Some((local, ino))
        })
        .collect();
    found.sort();
    found
}

/// The TCP counters the upgrade must not move, inside `pod`'s netns.
const NSTAT: [&str; 4] = ["TcpExtListenDrops", "TcpExtListenOverflows", "TcpEstabResets", "TcpAttemptFails"];

fn nstat(pod: &Pod) -> BTreeMap<String, u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns_name(), "nstat", "-az"])
        .args(NSTAT)
        .output()
        .expect("nstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// Two nodes under one CA with the node-local shortcut on. node-a: `client` and `near` (mesh);
/// node-b: `far` (mesh) and `outsider` (not in the mesh). A load server runs in near, far and
/// outsider. Fields drop in order: agents first.
struct Upgrade {
    a: Option<Agent>,
    b: Option<Agent>,
    client: Pod,
    near: Pod,
    far: Pod,
    outsider: Pod,
    _servers: Vec<upgrade_load::Server>,
    _ca: tempfile::TempDir,
    _link: ferry_tests::NodeLink,
    node_a: SimNode,
    node_b: SimNode,
}

impl Upgrade {
    fn start(name: &str) -> Result<Self> {
        let mut node_a = SimNode::new(&format!("{name}a"), 1)?;
        let mut node_b = SimNode::new(&format!("{name}b"), 2)?;
        let link = link_nodes(&node_a, &node_b)?;
        let client = node_a.add_pod("client")?;
        let near = node_a.add_pod("near")?;
        let far = node_b.add_pod("far")?;
        let outsider = node_b.add_pod("outsider")?;
        let servers = vec![
            upgrade_load::serve(&near, LOAD_PORT)?,
            upgrade_load::serve(&far, LOAD_PORT)?,
            upgrade_load::serve(&outsider, LOAD_PORT)?,
        ];
        let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a", "node-b"])?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), None).local_shortcut(true);
            mesh.pod(&client, "demo", "client").node("node-a");
            mesh.pod(&near, "demo", "near").node("node-a").mode("strict").port_protocol(LOAD_PORT, "tcp");
            mesh.pod(&far, "demo", "far").node("node-b").mode("strict").port_protocol(LOAD_PORT, "tcp");
            mesh.to_toml()
        };
        let a = Agent::start(&node_a, &mesh_for("node-a")).context("agent on node-a")?;
        let b = Agent::start(&node_b, &mesh_for("node-b")).context("agent on node-b")?;
        Ok(Self {
            a: Some(a),
            b: Some(b),
            client,
            near,
            far,
            outsider,
            _servers: servers,
            _ca: ca,
            _link: link,
            node_a,
            node_b,
        })
    }

    fn pods(&self) -> [&Pod; 4] {
        [&self.client, &self.near, &self.far, &self.outsider]
    }

    fn target(&self, name: &str, pod: &Pod, bulk_bytes: u64) -> Target {
        Target {
            name: name.into(),
            addr: std::net::SocketAddr::new(pod.ipv4().into(), LOAD_PORT),
            long_lived: 4,
            bulk_bytes,
            half_closed: 2,
            churn_per_sec: 10,
        }
    }
}

/// The median of `values`.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[test]
fn upgrade_under_load_drops_nothing() {
    const HANDOFFS: usize = 20;
    let mut t = Upgrade::start("upg").unwrap();
    let (mut a, mut b) = (t.a.take(), t.b.take());
    let (first_a, first_b) = (a.as_ref().expect("node-a agent"), b.as_ref().expect("node-b agent"));
    let programs = (program_ids(first_a), program_ids(first_b));
    let links = (link_ids(first_a), link_ids(first_b));
    let listeners: Vec<_> = [&t.client, &t.near, &t.far].iter().map(|p| proxy_listeners(p)).collect();
    assert!(listeners.iter().all(|l| !l.is_empty()), "{listeners:?}");
    let counters: Vec<_> = t.pods().iter().map(|p| nstat(p)).collect();

    let stop_dir = tempfile::tempdir().unwrap();
    let stop = stop_dir.path().join("stop");
    let targets = vec![
        t.target("plaintext", &t.outsider, 100 << 20),
        t.target("mtls", &t.far, 100 << 20),
        t.target("shortcut", &t.near, 100 << 20),
    ];
    let load_spawned = Instant::now();
    let load = {
        let (client, stop) = (t.client.clone(), stop.clone());
        std::thread::spawn(move || upgrade_load::run(&client, targets, stop, Duration::from_secs(900)))
    };
    std::thread::sleep(Duration::from_secs(3));

    // Alternately node-a's and node-b's agent hands over to a new one.
    let mut retired = Vec::new();
    let mut handoffs = Vec::new();
    for i in 0..HANDOFFS {
        let (slot, node) = if i % 2 == 0 { (&mut a, &t.node_a) } else { (&mut b, &t.node_b) };
        let old = slot.take().expect("a serving agent");
        let began = Instant::now();
        let new = old.start_successor(node).unwrap_or_else(|e| panic!("handoff {i}: {e:#}"));
        let ready = began.elapsed();
        let handed = old
            .wait_for_event(|e| e["event"] == "handed_over", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("handoff {i}: the old agent did not hand over: {e:#}"));
        let took = events_of(&new, "took_over").pop().unwrap_or_default();
        handoffs.push(serde_json::json!({
            "handoff": i, "node": node.name(), "at_ms": (began - load_spawned).as_millis() as u64,
            "new_agent_ready_ms": ready.as_secs_f64() * 1000.0,
            "relays_moved": handed["relays"], "old_agent_handoff_ms": handed["handoff_ms"],
            "draining": handed["draining"], "resumed": took["relays"], "resume_failed": took["failed"],
        }));
        assert_eq!(took["failed"], 0, "handoff {i}: {took}");
        retired.push(old);
        *slot = Some(new);
        std::thread::sleep(Duration::from_millis(1500));
    }
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, b"").unwrap();
    let report: LoadReport = load.join().expect("load thread").expect("load report");

    eprintln!("handoffs: {}", serde_json::to_string_pretty(&handoffs).unwrap_or_default());
    eprintln!("load: {}", serde_json::to_string_pretty(&report).unwrap_or_default());
    for p in &report.paths {
        assert_eq!(p.connect_failures + p.resets + p.checksum_errors, 0, "{}: {:?}", p.name, p.errors);
        assert!(p.requests > 100 && p.churn_ok > 50, "{}: the load ran: {p:?}", p.name);
        assert_eq!(p.churn_ok, p.churn_attempts, "{}", p.name);
        assert!(p.half_closed_done > 0 && p.bulk_done > 0, "{}: {p:?}", p.name);
    }
    let moved: u64 = handoffs.iter().filter_map(|h| h["relays_moved"].as_u64()).sum();
    assert!(moved > 0, "plaintext and shortcut relays moved: {handoffs:?}");
    let mut ready_ms: Vec<f64> = handoffs.iter().filter_map(|h| h["new_agent_ready_ms"].as_f64()).collect();
    let mut handoff_ms: Vec<f64> =
        handoffs.iter().filter_map(|h| h["old_agent_handoff_ms"].as_f64()).collect();
    eprintln!(
        "summary: {HANDOFFS} handoffs, {moved} relays moved, new agent ready median {:.0} ms, relay handover median {:.1} ms (max {:.1} ms)",
        median(&mut ready_ms),
        median(&mut handoff_ms),
        handoff_ms.iter().copied().fold(0.0, f64::max)
    );

    // The latency spike: the slowest request within a handoff (from the new agent's start to one
    // second after it is ready) against the slowest outside them.
    let windows: Vec<(u64, u64)> = handoffs
        .iter()
        .filter_map(|h| {
            let at = h["at_ms"].as_u64()?;
            Some((at, at + h["new_agent_ready_ms"].as_f64()? as u64 + 1000))
        })
        .collect();
    for p in &report.paths {
        let (inside, outside): (Vec<_>, Vec<_>) =
            p.slow.iter().partition(|(at, _)| windows.iter().any(|(s, e)| at >= s && at <= e));
        let max = |v: &[&(u64, u64)]| v.iter().map(|(_, us)| *us).max().unwrap_or(0) as f64 / 1000.0;
        eprintln!(
            "latency {}: p50 {:.1} ms, max {:.1} ms; >20 ms requests {} during handoffs (max {:.1} ms), {} outside (max {:.1} ms)",
            p.name,
            p.p50_latency_us as f64 / 1000.0,
            p.max_latency_us as f64 / 1000.0,
            inside.len(),
            max(&inside),
            outside.len(),
            max(&outside)
        );
    }

    // The datapath is the one the first agents attached: same programs, links and listeners.
    let (a, b) = (a.expect("node-a agent"), b.expect("node-b agent"));
    assert_eq!((program_ids(&a), program_ids(&b)), programs, "program ids changed");
    assert_eq!((link_ids(&a), link_ids(&b)), links, "link ids changed");
    let after: Vec<_> = [&t.client, &t.near, &t.far].iter().map(|p| proxy_listeners(p)).collect();
    assert_eq!(after, listeners, "listener inodes changed");
    // Old agents exit once what they drain is over (the load has ended).
    for old in &retired {
        let status = old.wait_exit(Duration::from_secs(30)).expect("a retired agent exits when drained");
        assert!(status.success(), "{status:?}: {}", old.stderr());
    }
    for (pod, before) in t.pods().iter().zip(&counters) {
        let now = nstat(pod);
        for name in NSTAT {
            let delta = now.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
            assert_eq!(delta, 0, "{name} moved by {delta} in {}", pod.name());
        }
    }
    drop((a, b, retired));
}

/// One node with a CA: `client` (mesh), STRICT `server-1`/`server-2` (mesh), `outsider` (not in
/// the mesh).
fn one_node(name: &str) -> Result<(Agent, tempfile::TempDir, ScenarioPods)> {
    let pods = ScenarioPods::start(name)?;
    let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a"])?;
    let mut mesh = MeshFile::new("node-a");
    mesh.ca(&ca.path().join("nodes").join("node-a"), None);
    mesh.pod(&pods.client, NAMESPACE, "client");
    for s in &pods.servers {
        mesh.pod(s, NAMESPACE, SERVICE).mode("strict");
    }
    let agent = Agent::start(&pods.node, &mesh.to_toml())?;
    Ok((agent, ca, pods))
}

/// The mesh of [`one_node`] with server-2 pointed at a cgroup that does not exist: a successor
/// reading it cannot enroll that pod (the running agent keeps its enrollment), so it waits.
fn unenrollable_second_server(ca: &Path, pods: &ScenarioPods) -> MeshFile {
    let mut mesh = MeshFile::new("node-a");
    mesh.ca(&ca.join("nodes").join("node-a"), None);
    mesh.pod(&pods.client, NAMESPACE, "client");
    mesh.pod(&pods.servers[0], NAMESPACE, SERVICE).mode("strict");
    mesh.pod(&pods.servers[1], NAMESPACE, SERVICE)
        .mode("strict")
        .cgroup(&pods.node.cgroup_root().join("missing"));
    mesh
}

/// Waits until `agent` has enrolled a pod (it holds the shared listeners by then).
fn wait_until_enrolling(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent.stderr().contains("enrolled") {
        assert!(Instant::now() < deadline, "no pod enrolled: {}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `report` (testapp connect) got through, and whom the server saw.
fn got_through(report: &Value) -> bool {
    report["ok"].as_u64().unwrap_or(0) > 0
        || report["peers_seen_by_server"].as_array().is_some_and(|p| !p.is_empty())
}

#[test]
fn crash_fails_closed_and_recovers() {
    let (agent, _ca, pods) = one_node("crf").unwrap();
    let target = sock(pods.servers[0].ipv4().into(), SERVER_PORT);
    let ok = connect(&pods.client, &target, &["--bytes", "64"]).unwrap();
    assert_eq!(ok["ok"], 1, "through the proxy before the crash: {ok}");
    let links = link_ids(&agent);
    let programs = program_ids(&agent);

    let status = agent.kill().unwrap();
    assert!(!status.success(), "killed: {status:?}");
    // The gap: nothing reaches the STRICT app in plaintext, and the client's captured connect
    // never goes straight to the server.
    let server = std::net::SocketAddr::new(pods.servers[0].ipv4().into(), SERVER_PORT);
    let plain = pods.outsider.run(|| std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2)));
    // sk_lookup's drop of a SYN it has no listener for makes the kernel answer with a RST: the
    // app listens on that port, so a connection that reached it would have succeeded.
    let err = plain.expect_err("a plaintext SYN to a STRICT pod never reaches its app while no agent runs");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let captured = connect(&pods.client, &target, &["--bytes", "64", "--timeout-ms", "2000"]).unwrap();
    assert!(!got_through(&captured), "no captured connect bypasses the proxy: {captured}");
    eprintln!("during the gap: plaintext to STRICT: {err}; captured connect: {}", captured["errors"]);

    let next = agent.start_successor(&pods.node).unwrap();
    assert_eq!(link_ids(&next), links, "the new agent adopted the pinned links");
    assert_eq!(program_ids(&next), programs, "and the pinned programs");
    let adopted: Vec<u64> =
        events_of(&next, "enrolled").iter().filter_map(|e| e["adopted_links"].as_u64()).collect();
    assert!(adopted.iter().all(|n| *n == 6), "every link adopted, none attached again: {adopted:?}");
    let after = connect(&pods.client, &target, &["--bytes", "64"]).unwrap();
    assert_eq!(after["ok"], 1, "new connections succeed once the new agent is ready: {after}");
    let plain = connect(&pods.outsider, &target, &["--bytes", "64", "--timeout-ms", "2000"]).unwrap();
    assert_eq!(plain["ok"], 0, "and STRICT still refuses plaintext: {plain}");
}

#[test]
fn a_new_agent_that_cannot_become_ready_leaves_the_old_one_serving() {
    let (agent, ca, pods) = one_node("nrd").unwrap();
    let target = sock(pods.servers[0].ipv4().into(), SERVER_PORT);
    let mesh = unenrollable_second_server(ca.path(), &pods);
    let held = ferry_tests::testapp::connect_held(
        &pods.client,
        &target,
        &ferry_tests::testapp::ConnectOpts { bytes: 32, ..Default::default() },
    )
    .unwrap();
    // A mesh file change the running agent rejects (it would re-enroll server-2 and fail) is
    // still what a new agent reads at start.
    agent.write_mesh(&mesh.to_toml()).unwrap();
    let next = agent.spawn_successor(&pods.node).unwrap();
    // A connection opened while the new agent holds the shared listeners and waits: the old one
    // accepts it (a new agent accepts nothing before it takes over), so it outlives the attempt.
    wait_until_enrolling(&next);
    let during = ferry_tests::testapp::connect_held(
        &pods.client,
        &target,
        &ferry_tests::testapp::ConnectOpts { bytes: 32, ..Default::default() },
    )
    .unwrap();
    let status = next.wait_exit(Duration::from_secs(120)).expect("the new agent gives up");
    assert!(!status.success(), "it exits with an error: {}", next.stderr());
    assert!(next.stderr().contains("serving agent stays in charge"), "{}", next.stderr());
    assert!(events_of(&agent, "handed_over").is_empty(), "the old agent never handed over");
    let r = connect(&pods.client, &target, &["--bytes", "64"]).unwrap();
    assert_eq!(r["ok"], 1, "the old agent still serves: {r}");
    let report = held.release().unwrap();
    assert_eq!(report.ok, 1, "its connections too: {report:?}");
    let report = during.release().unwrap();
    assert_eq!(report.ok, 1, "and the one opened during the attempt: {report:?}");
}

#[test]
fn a_new_agent_serves_alone_when_the_old_one_dies_before_the_takeover() {
    let (agent, ca, pods) = one_node("gone").unwrap();
    let target = sock(pods.servers[0].ipv4().into(), SERVER_PORT);
    // As above, one pod the successor cannot enroll keeps it waiting to take over...
    agent.write_mesh(&unenrollable_second_server(ca.path(), &pods).to_toml()).unwrap();
    let next = agent.spawn_successor(&pods.node).unwrap();
    wait_until_enrolling(&next);
    // ...when the serving agent dies: the successor must not wait for a takeover nobody can give,
    // nor give up and leave the node without an agent.
    agent.kill().unwrap();
    let gone = next
        .wait_for_event(|e| e["event"] == "serving_agent_gone", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}: {}", next.stderr()));
    assert_eq!(gone["event"], "serving_agent_gone");
    next.wait_for_event(|e| e["event"] == "ready", Duration::from_secs(20)).unwrap();
    let r = connect(&pods.client, &target, &["--bytes", "64", "--conns", "4"]).unwrap();
    assert_eq!(r["ok"], 4, "the successor serves the node alone: {r}");
    let status = next.cli_json(&["status"]).expect("its admin API answers");
    assert!(status.is_object(), "{status}");
    assert!(next.pid() != agent.pid() && ferry_tests::procstat::alive(next.pid()));
}
