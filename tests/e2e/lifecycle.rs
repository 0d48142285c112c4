//! Agent lifecycle: a shutdown closes every listener and leaves exactly the pinned datapath (the
//! pods fail closed until the next agent), `ferry uninstall` removes everything; a pod that cannot
//! be enrolled waits for its retry without holding up the others, and health says so.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ferry_tests::{Agent, MeshFile};

/// Ids of loaded programs or links, from bpftool's JSON output.
fn bpf_ids(kind: &str) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", kind, "show"])
        .output()
        .expect("bpftool must be installed (cargo xtask setup)");
    assert!(out.status.success(), "bpftool {kind} show: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().unwrap().iter().filter_map(|p| p["id"].as_u64()).collect()
}

/// Those of `ids` that `bpftool KIND show` still lists once they are gone or 20 s have passed. An
/// exited agent's objects can outlive it for a moment: the kernel frees some after an RCU grace
/// period, and a `bpftool ... show` running meanwhile (the other test here lists every program
/// and link) holds a reference to each object it lists until it moves on.
fn still_listed(kind: &str, ids: &[u64]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = bpf_ids(kind);
        let left: Vec<u64> = ids.iter().copied().filter(|id| listed.contains(id)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TCP listening ports inside a pod's netns.
fn listening_ports(pod: &ferry_tests::Pod) -> Vec<u16> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns_name(), "ss", "-Hltn"])
        .output()
        .expect("ip netns exec ss");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next()?.parse().ok())
        .collect()
}

/// Names of the entries of directory `dir` (sorted).
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// What `ip ARGS` prints inside the named netns.
fn ip_in(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", netns, "ip"]).args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the node's loopback has the probe source address.
fn node_has_probe_source(node: &ferry_tests::SimNode) -> bool {
    ip_in(node.netns_name(), &["addr", "show", "dev", "lo"]).contains("169.254.7.127")
}

#[test]
fn shutdown_leaves_only_the_pinned_datapath_and_uninstall_leaves_nothing() {
    let s = Scenario::start("shut").unwrap();
    let ready = events_of(&s.agent, "ready").pop().expect("ready event");
    let prog_ids: Vec<u64> =
        ready["programs"].as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
    let link_ids: Vec<u64> = events_of(&s.agent, "enrolled")
        .iter()
        .flat_map(|e| {
            e["links"].as_array().unwrap().iter().map(|l| l["id"].as_u64().unwrap()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        prog_ids.len(),
        8,
        "connect4/6, getpeername4/6, sock_ops, sk_lookup, probe connect4/6: {ready}"
    );
    // Three enrolled pods, six links each.
    assert_eq!(link_ids.len(), 18, "{:?}", events_of(&s.agent, "enrolled"));
    let (progs, links) = (bpf_ids("prog"), bpf_ids("link"));
    assert!(prog_ids.iter().all(|id| progs.contains(id)), "programs are loaded while running");
    assert!(link_ids.iter().all(|id| links.contains(id)), "links exist while running");
    for pod in [&s.client, &s.servers[0]] {
        let ports = listening_ports(pod);
        assert!(ports.contains(&15001) && ports.contains(&15006), "{} listens: {ports:?}", pod.name());
    }
    assert!(node_has_probe_source(&s.node), "the probe source is on the node");
    let target = sock(s.servers[0].ipv4().into(), SERVER_PORT);
    let before = connect(&s.client, &target, &["--bytes", "10"]).unwrap();
    assert!(before["local_addrs"][0].as_str().unwrap().starts_with("127.0.0.1:"), "{before}");

    let Scenario { agent, client, servers, node, .. } = s;
    let status = agent.stop().unwrap();
    assert!(status.success(), "agent exits cleanly on SIGTERM: {status:?}");

    // SIGTERM leaves exactly the pinned datapath: the same programs and links, pinned under the
    // versioned root, and no listener in any pod.
    let version = agent.pins().join(format!("v{}", ferry_common::LAYOUT_VERSION));
    assert_eq!(entries(agent.pins()), [format!("v{}", ferry_common::LAYOUT_VERSION)]);
    assert_eq!(entries(&version), ["maps", "node", "pods", "programs"]);
    assert_eq!(entries(&version.join("maps")).len(), ferry_common::maps::ALL.len());
    assert_eq!(entries(&version.join("programs")).len(), 8);
    let pods = entries(&version.join("pods"));
    assert_eq!(pods.len(), 3, "one link directory per pod: {pods:?}");
    for pod in &pods {
        assert_eq!(entries(&version.join("pods").join(pod)).len(), 6, "{pod}");
    }
    let (progs, links) = (bpf_ids("prog"), bpf_ids("link"));
    let gone: Vec<&u64> = prog_ids.iter().filter(|id| !progs.contains(id)).collect();
    assert!(gone.is_empty(), "programs unloaded by SIGTERM: {gone:?}");
    let gone: Vec<&u64> = link_ids.iter().filter(|id| !links.contains(id)).collect();
    assert!(gone.is_empty(), "links detached by SIGTERM: {gone:?}");
    for pod in [&client, &servers[0], &servers[1]] {
        let ports = listening_ports(pod);
        assert!(
            !ports.contains(&15001) && !ports.contains(&15006) && !ports.contains(&15008),
            "{} still listens: {ports:?}",
            pod.name()
        );
    }
    // Fail closed while no agent runs: the captured connect finds no proxy and never reaches the
    // server directly.
    let gap = connect(&client, &target, &["--bytes", "10", "--timeout-ms", "1500"]).unwrap();
    assert_eq!(gap["ok"], 0, "no connection without an agent: {gap}");
    assert!(gap["peers_seen_by_server"].as_array().is_none_or(|p| p.is_empty()), "{gap}");
    assert!(node_has_probe_source(&node), "the kubelet's probes keep their source while no agent runs");

    // Uninstall removes everything.
    let said = agent.uninstall(&node).unwrap();
    assert!(said.contains("removed"), "{said}");
    assert!(!agent.pins().exists(), "the pin root is gone");
    let left_progs = still_listed("prog", &prog_ids);
    let left_links = still_listed("link", &link_ids);
    assert!(left_progs.is_empty(), "programs left loaded: {left_progs:?}");
    assert!(left_links.is_empty(), "links left attached: {left_links:?}");
    assert!(!node_has_probe_source(&node), "the probe source stayed on the node");
    for pod in [&client, &servers[0], &servers[1]] {
        assert!(!has_transparency_rule(pod), "{} keeps the transparency rule", pod.name());
    }
    // And the pods' networking is back to plain: the client reaches the server directly.
    let after = connect(&client, &target, &["--bytes", "10"]).unwrap();
    assert_eq!(after["ok"], 1, "{after}");
    assert!(after["local_addrs"][0].as_str().unwrap().starts_with(&format!("{}:", client.ipv4())), "{after}");
    assert_eq!(after["peers_seen_by_server"][0], after["local_addrs"][0]);
    drop(node);
}

/// Whether the pod's netns has the transparent-inbound rule.
fn has_transparency_rule(pod: &ferry_tests::Pod) -> bool {
    ip_in(pod.netns_name(), &["rule", "show"]).contains("lookup 17989")
}

#[test]
fn uninstall_leaves_another_nodes_pods_alone() {
    // Two simulated nodes on one host (as in the demo and these tests): uninstalling one must not
    // touch the other's pods, whose inbound connections depend on their transparency routing.
    let gone = Scenario::start("ungo").unwrap();
    let kept = Scenario::start("unkp").unwrap();
    let Scenario { agent, node, .. } = gone;
    assert!(agent.stop().unwrap().success());
    let said = agent.uninstall(&node).unwrap();
    assert!(said.contains("removed"), "{said}");
    for pod in [&kept.client, &kept.servers[0], &kept.servers[1]] {
        assert!(
            has_transparency_rule(pod),
            "{} lost its transparency rule to another node's uninstall",
            pod.name()
        );
    }
    let target = sock(kept.servers[0].ipv4().into(), SERVER_PORT);
    for _ in 0..3 {
        let r = connect(&kept.outsider, &target, &["--bytes", "100", "--timeout-ms", "3000"]).unwrap();
        assert_eq!(r["ok"], 1, "inbound to the other node still reaches its app: {r}");
        let peer: std::net::SocketAddr = r["peers_seen_by_server"][0].as_str().unwrap().parse().unwrap();
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::from(kept.outsider.ipv4()),
            "the app still sees the real client: {r}"
        );
    }
}

#[test]
fn uninstall_is_refused_while_an_agent_runs() {
    let s = Scenario::start("unr").unwrap();
    let err = s.agent.uninstall(&s.node).expect_err("refused");
    assert!(format!("{err:#}").contains("an agent is running"), "{err:#}");
    let target = sock(s.servers[0].ipv4().into(), SERVER_PORT);
    let r = connect(&s.client, &target, &["--bytes", "10"]).unwrap();
    assert_eq!(r["ok"], 1, "the mesh is untouched: {r}");
}

/// GET `path` on the agent's health endpoint (127.0.0.1:15021 in the node's netns): the status.
fn health(node: &ferry_tests::SimNode, path: &str) -> u16 {
    use std::io::{Read as _, Write as _};
    let path = path.to_owned();
    ferry_tests::netns::in_netns(node.netns_path(), move || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:15021").expect("health endpoint");
        write!(s, "GET {path} HTTP/1.1\r\nhost: node\r\nconnection: close\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    })
    .unwrap()
}

#[test]
fn unenrollable_pod_does_not_block_others() {
    let pods = ScenarioPods::start("unb").unwrap();
    // server-1's cgroup directory does not exist yet: it cannot be enrolled until it does.
    let late = pods.node.cgroup_root().join("late");
    let mut mesh = MeshFile::new("node-a");
    mesh.pod(&pods.client, NAMESPACE, "client");
    mesh.pod(&pods.servers[0], NAMESPACE, SERVICE).cgroup(&late);
    mesh.pod(&pods.servers[1], NAMESPACE, SERVICE);
    let agent = Agent::start(&pods.node, &mesh.to_toml()).expect("the agent starts anyway");
    assert_eq!(health(&pods.node, "/healthz/live"), 200);
    assert_eq!(health(&pods.node, "/healthz/ready"), 503, "not every pod is enrolled");
    let w = agent.workload("server-1").unwrap();
    assert_eq!(w["enrolled"], false, "{w}");
    let why = w["waiting"].as_str().unwrap_or_default();
    assert!(why.contains("cgroup"), "ferry workloads says why it waits: {w}");
    // The others serve meanwhile.
    let r =
        connect(&pods.client, &sock(pods.servers[1].ipv4().into(), SERVER_PORT), &["--bytes", "32"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(agent.workload("server-2").unwrap()["enrolled"], true);
    // Once the cgroup exists, a retry enrolls the pod and the node turns ready.
    ferry_tests::cgroup::create(&late).unwrap();
    agent
        .wait_for_event(|e| e["event"] == "enrolled" && e["pod"] == "demo/server-1", Duration::from_secs(20))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&pods.node, "/healthz/ready") != 200 {
        assert!(Instant::now() < deadline, "never ready: {:?}", agent.workload("server-1"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.workload("server-1").unwrap()["waiting"].is_null());
    let failed = events_of(&agent, "enroll_failed");
    assert!(!failed.is_empty() && failed.iter().all(|e| e["pod"] == "demo/server-1"), "{failed:?}");
}
