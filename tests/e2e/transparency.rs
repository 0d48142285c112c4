//! Apps cannot tell the mesh is there: a captured app's getpeername() names what it connected to,
//! an app behind the inbound path sees each client's real address (plaintext, HBONE and the
//! node-local shortcut), its replies never leave the pod around the agent, and every address of an
//! enrolled pod is steered, including ones the config does not list and ones added while enrolled.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use common::*;
use ferry_tests::{Agent, ChildGuard, MeshFile, Pod};
use serde_json::Value;

/// A second address on server-1's interface, in the pods' subnet but in no config.
const SECONDARY_V4: &str = "10.233.1.200";
const SECONDARY_V6: &str = "fd00:233:1::c8";

/// One node with a CA and the scenario's pods, the shortcut `shortcut`, servers in `mode`.
fn one_node(name: &str, shortcut: bool, mode: &str) -> Result<(Agent, tempfile::TempDir, ScenarioPods)> {
    let pods = ScenarioPods::start(name)?;
    let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a"])?;
    let mut mesh = MeshFile::new("node-a");
    mesh.ca(&ca.path().join("nodes").join("node-a"), None).local_shortcut(shortcut);
    mesh.pod(&pods.client, NAMESPACE, "client");
    for s in &pods.servers {
        mesh.pod(s, NAMESPACE, SERVICE).mode(mode);
    }
    echo_service(&mut mesh);
    let agent = Agent::start(&pods.node, &mesh.to_toml()).context("starting the agent")?;
    Ok((agent, ca, pods))
}

fn ip_of(addr: &Value) -> IpAddr {
    let text = addr.as_str().unwrap_or_default();
    let sock: SocketAddr = text.parse().unwrap_or_else(|e| panic!("{text:?} is not ip:port: {e}"));
    sock.ip().to_canonical()
}

fn port_of(addr: &Value) -> u16 {
    let text = addr.as_str().unwrap_or_default();
    text.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{text:?} is not ip:port: {e}")).port()
}

/// Runs `ip ARGS` inside `pod`'s netns and returns its output.
fn ip_in(pod: &Pod, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns_name(), "ip"])
        .args(args)
        .output()
        .expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The routes of table `table` in `pod`'s netns, both families; empty when the table was never
/// created (`ip` then fails).
fn routes_of_table(pod: &Pod, table: &str) -> String {
    let mut out = String::new();
    for family in ["-4", "-6"] {
        let run = Command::new("ip")
            .args(["netns", "exec", pod.netns_name(), "ip", family, "route", "show", "table", table])
            .output()
            .expect("running ip");
        out.push_str(&String::from_utf8_lossy(&run.stdout));
    }
    out
}

fn workload(agent: &Agent, name: &str) -> Value {
    agent.workload(name).unwrap()
}

/// Waits until `name`'s steered addresses include `ip`.
fn wait_steered(agent: &Agent, name: &str, ip: &str) {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let w = workload(agent, name);
        if w["steered_ips"].as_array().is_some_and(|a| a.iter().any(|v| v == ip)) {
            return;
        }
        assert!(Instant::now() < deadline, "{ip} never steered for {name}: {w}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn app_getpeername_returns_original_destination() {
    let s = Scenario::start("gpn").unwrap();
    let server = &s.servers[0];
    let targets = [
        sock(VIP4_IP.into(), SERVICE_PORT),
        sock(VIP6_IP.into(), SERVICE_PORT),
        format!("[::ffff:{VIP4}]:{SERVICE_PORT}"),
        sock(server.ipv4().into(), SERVER_PORT),
        sock(server.ipv6().into(), SERVER_PORT),
        format!("[::ffff:{}]:{SERVER_PORT}", server.ipv4()),
    ];
    for target in &targets {
        let r = connect(&s.client, target, &["--bytes", "64"]).unwrap();
        assert_eq!(r["ok"], 1, "{target}: {r}");
        // The app's socket names what it connected to, in the form it was written.
        assert_eq!(r["peer_addrs"][0], target.as_str(), "{target}: {r}");
        // It really went through the proxy (whose record has the app's own address as source),
        // and getsockname() is untouched: still the app socket's real local address.
        let local: SocketAddr = r["local_addrs"][0].as_str().unwrap().parse().unwrap();
        let src = SocketAddr::new(local.ip().to_canonical(), local.port()).to_string();
        let opened = wait_events(&s.agent, 1, |e| {
            e["event"] == "conn_close" && e["direction"] == "outbound" && e["src"] == src.as_str()
        });
        assert_eq!(opened.len(), 1, "{target}: no outbound record from {src}: {:?}", s.agent.events());
        assert!(ip_of(&r["local_addrs"][0]).is_loopback(), "{target}: {r}");
    }
    // A connection the programs leave alone (loopback) keeps the kernel's answer.
    let _local = serve(&s.client, 9000, "local").unwrap();
    let r = connect(&s.client, "127.0.0.1:9000", &["--bytes", "8"]).unwrap();
    assert_eq!(r["peer_addrs"][0], "127.0.0.1:9000", "{r}");
}

#[test]
fn app_sees_real_client_address_plaintext() {
    let s = Scenario::start("rcpl").unwrap();
    for ip in [IpAddr::from(s.servers[0].ipv4()), s.servers[0].ipv6().into()] {
        let target = sock(ip, SERVER_PORT);
        let r = connect(&s.outsider, &target, &["--bytes", "256"]).unwrap();
        assert_eq!(r["ok"], 1, "{target}: {r}");
        let client = &r["local_addrs"][0];
        let seen = &r["peers_seen_by_server"][0];
        assert_eq!(ip_of(seen), ip_of(client), "{target}: the app saw {seen}, the client is {client}");
        // The proxy's record and the app agree on who the client is.
        let e = wait_events(&s.agent, 1, |e| {
            e["event"] == "conn_close" && e["direction"] == "inbound" && e["orig_dst"] == target.as_str()
        });
        assert_eq!(e.len(), 1, "{target}: {:?}", s.agent.events());
        assert_eq!(&e[0]["src"], client, "{target}: {}", e[0]);
    }
    let w = workload(&s.agent, "server-1");
    assert_eq!(w["app_source"], "client", "{w}");
}

#[test]
fn many_connections_from_one_outside_address_never_collide_with_the_agents() {
    // A client on the same kernel (a pod outside the mesh on this node) draws its ports from the
    // same ephemeral sequence the kernel would give the agent's sockets to the app, which carry the
    // client's address: a port picked for one could then be the other's next, and two connections
    // with one 4-tuple in the pod's netns break each other. Thousands of short connections from one
    // address, both families, many at once.
    let s = Scenario::start("tpcol").unwrap();
    let (mut ok, mut errors) = (0u64, Vec::new());
    for round in 0..16 {
        let ip = if round % 2 == 0 { IpAddr::from(s.servers[0].ipv4()) } else { s.servers[0].ipv6().into() };
        let target = sock(ip, SERVER_PORT);
        let r = connect(&s.outsider, &target, &["--bytes", "64", "--conns", "100", "--timeout-ms", "5000"])
            .unwrap();
        ok += r["ok"].as_u64().unwrap();
        for seen in r["peers_seen_by_server"].as_array().into_iter().flatten() {
            assert!((16384..=32767).contains(&port_of(seen)), "the app saw {seen}: a port clients use");
        }
        errors.extend(r["errors"].as_array().into_iter().flatten().map(|e| format!("{target}: {e}")));
    }
    assert!(
        errors.is_empty(),
        "{} of {} connections failed: {errors:?}",
        errors.len(),
        ok as usize + errors.len()
    );
    assert_eq!(ok, 1600);
    let failed: Vec<Value> = s.agent.events().into_iter().filter(|e| e["event"] == "conn_failed").collect();
    assert!(failed.is_empty(), "the agent failed connections to the app: {failed:?}");
}

/// The app sees the client pod's own address and the port the client app used, whether the
/// connection crossed HBONE or the node-local shortcut.
fn client_pod_address_reaches_the_app(name: &str, shortcut: bool) {
    let (agent, _ca, pods) = one_node(name, shortcut, "strict").unwrap();
    let security = if shortcut { "node_local" } else { "mutual_tls" };
    for ip in [IpAddr::from(pods.servers[0].ipv4()), pods.servers[0].ipv6().into()] {
        let target = sock(ip, SERVER_PORT);
        let r = connect(&pods.client, &target, &["--bytes", "512"]).unwrap();
        assert_eq!(r["ok"], 1, "{target}: {r}");
        let seen = &r["peers_seen_by_server"][0];
        let client_ip: IpAddr =
            if ip.is_ipv4() { pods.client.ipv4().into() } else { pods.client.ipv6().into() };
        assert_eq!(ip_of(seen), client_ip, "{target}: the app saw {seen}");
        assert_eq!(port_of(seen), port_of(&r["local_addrs"][0]), "{target}: the app saw {seen}, {r}");
        let e = wait_events(&agent, 1, |e| {
            e["event"] == "conn_close" && e["direction"] == "inbound" && e["orig_dst"] == target.as_str()
        });
        assert_eq!(e.len(), 1, "{target}: {:?}", agent.events());
        assert_eq!(e[0]["security"], security, "{}", e[0]);
        assert_eq!(&e[0]["src"], seen, "{target}: the record names the same client: {}", e[0]);
    }
}

#[test]
fn app_sees_real_client_address_over_hbone() {
    client_pod_address_reaches_the_app("rchb", false);
}

#[test]
fn app_sees_real_client_address_over_local_shortcut() {
    client_pod_address_reaches_the_app("rcls", true);
}

#[test]
fn pods_sharing_an_identity_keep_their_own_address_over_hbone() {
    let pods = ScenarioPods::start("shid").unwrap();
    let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a"]).unwrap();
    let mut mesh = MeshFile::new("node-a");
    mesh.ca(&ca.path().join("nodes").join("node-a"), None);
    // Two replicas of one workload: same service account, so the same SPIFFE identity.
    mesh.pod(&pods.client, NAMESPACE, "client");
    mesh.pod(&pods.outsider, NAMESPACE, "client");
    mesh.pod(&pods.servers[0], NAMESPACE, SERVICE).mode("strict");
    let agent = Agent::start(&pods.node, &mesh.to_toml()).unwrap();
    let target = sock(pods.servers[0].ipv4().into(), SERVER_PORT);
    for _ in 0..2 {
        for from in [&pods.client, &pods.outsider] {
            let r = connect(from, &target, &["--bytes", "64"]).unwrap();
            assert_eq!(r["ok"], 1, "{}: {r}", from.name());
            let seen = &r["peers_seen_by_server"][0];
            assert_eq!(ip_of(seen), IpAddr::from(from.ipv4()), "{} appeared as {seen}", from.name());
        }
    }
    // Each replica has its own tunnel, reused by its own later connections.
    let tunnels = events_of(&agent, "tunnel_accept");
    let sources: BTreeSet<IpAddr> = tunnels.iter().map(|t| ip_of(&t["src"])).collect();
    let want: BTreeSet<IpAddr> = [pods.client.ipv4().into(), pods.outsider.ipv4().into()].into();
    assert_eq!(sources, want, "{tunnels:?}");
    assert_eq!(tunnels.len(), 2, "one pooled tunnel per source pod: {tunnels:?}");
}

/// tcpdump on a pod's interface, printing one line per TCP packet.
struct Capture {
    child: ChildGuard,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Capture {
    fn start(pod: &Pod) -> Capture {
        let mut cmd = pod.netns_command("tcpdump");
        cmd.args(["-i", "eth0", "-nn", "-l", "-U", "tcp"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = pod.spawn(cmd).expect("starting tcpdump");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.take_stdout().expect("tcpdump stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // tcpdump says "listening on" on stderr once the capture runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !child.stderr().contains("listening on") {
            assert!(Instant::now() < deadline, "tcpdump never started: {}", child.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { child, lines }
    }

    /// Every (source, destination) pair seen so far, as tcpdump writes them (`ip.port`).
    fn flows(&self, settle: Duration) -> Vec<(String, String)> {
        std::thread::sleep(settle);
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            // "12:00:00.000000 IP 10.233.1.3.8080 > 10.233.1.5.40000: Flags [S.], ..."
            let mut words = line.split_whitespace().skip(1);
            let (Some(_proto), Some(src), Some(">"), Some(dst)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            out.push((src.to_owned(), dst.trim_end_matches(':').to_owned()));
        }
        out
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// tcpdump's `ip.port` form of an `ip:port` address.
fn dotted(addr: &Value) -> String {
    let sock: SocketAddr = addr.as_str().unwrap_or_default().parse().expect("ip:port");
    format!("{}.{}", sock.ip().to_canonical(), sock.port())
}

#[test]
fn replies_never_leave_the_pod_unproxied() {
    let (agent, _ca, pods) = one_node("rnl", false, "permissive").unwrap();
    let server = &pods.servers[0];
    let capture = Capture::start(server);
    let mut seen_by_app = Vec::new();
    let mut clients = Vec::new();
    for ip in [IpAddr::from(server.ipv4()), server.ipv6().into()] {
        let target = sock(ip, SERVER_PORT);
        // Plaintext from outside the mesh, and HBONE from the client pod.
        for from in [&pods.outsider, &pods.client] {
            let r = connect(from, &target, &["--bytes", "4096", "--conns", "3"]).unwrap();
            assert_eq!(r["ok"], 3, "{target}: {r}");
            seen_by_app.extend(r["peers_seen_by_server"].as_array().unwrap().iter().map(dotted));
            clients.extend(r["local_addrs"].as_array().unwrap().iter().map(dotted));
        }
    }
    let flows = capture.flows(Duration::from_millis(500));
    let wire: BTreeSet<&str> = flows.iter().flat_map(|(s, d)| [s.as_str(), d.as_str()]).collect();
    // The capture saw the outsider's own connections: the check below is not vacuous.
    let outsider_ip = pods.outsider.ipv4().to_string();
    assert!(
        clients.iter().any(|c| c.starts_with(&outsider_ip) && wire.contains(c.as_str())),
        "the capture missed the plaintext connections: {flows:?}"
    );
    // Whatever the app sent to the address it saw went back to the agent inside the pod: that
    // address never appears on the pod's interface.
    for app_peer in &seen_by_app {
        assert!(!wire.contains(app_peer.as_str()), "{app_peer} (the app's peer) is on the wire: {flows:?}");
    }
    // The HBONE connections crossed the interface only as the tunnel.
    let client_ips = [pods.client.ipv4().to_string(), pods.client.ipv6().to_string()];
    for (src, dst) in &flows {
        let from_server_to_client = client_ips.iter().any(|c| dst.starts_with(&format!("{c}.")));
        if from_server_to_client {
            assert!(src.ends_with(".15008"), "{src} > {dst} is not tunnel traffic");
        }
    }
    drop(agent);
}

#[test]
fn unlisted_pod_address_is_steered_and_strict_holds() {
    let pods = ScenarioPods::start("unl").unwrap();
    let (strict, permissive) = (&pods.servers[0], &pods.servers[1]);
    // Secondary addresses the mesh file never names, present before the agent starts.
    ip_in(strict, &["addr", "add", &format!("{SECONDARY_V4}/24"), "dev", "eth0"]);
    ip_in(strict, &["-6", "addr", "add", &format!("{SECONDARY_V6}/64"), "dev", "eth0", "nodad"]);
    ip_in(permissive, &["addr", "add", "10.233.1.201/24", "dev", "eth0"]);
    let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a"]).unwrap();
    let mut mesh = MeshFile::new("node-a");
    mesh.ca(&ca.path().join("nodes").join("node-a"), None);
    mesh.pod(&pods.client, NAMESPACE, "client");
    mesh.pod(strict, NAMESPACE, SERVICE).mode("strict");
    mesh.pod(permissive, NAMESPACE, SERVICE).mode("permissive");
    let agent = Agent::start(&pods.node, &mesh.to_toml()).unwrap();
    let w = workload(&agent, "server-1");
    for ip in [SECONDARY_V4, SECONDARY_V6] {
        assert!(w["steered_ips"].as_array().unwrap().iter().any(|v| v == ip), "{ip} not steered: {w}");
        // STRICT holds on the unlisted address: plaintext from outside never reaches the app.
        let target = sock(ip.parse().unwrap(), SERVER_PORT);
        let r = connect(&pods.outsider, &target, &["--bytes", "64", "--timeout-ms", "3000"]).unwrap();
        assert_eq!(r["ok"], 0, "{target}: plaintext reached a STRICT app: {r}");
        let refused = wait_events(&agent, 1, |e| {
            e["event"] == "conn_refused" && e["orig_dst"] == target.as_str() && e["pod"] == "demo/server-1"
        });
        assert_eq!(refused.len(), 1, "{target}: {:?}", agent.events());
    }
    // PERMISSIVE: the unlisted address is proxied, not passed through.
    let target = sock("10.233.1.201".parse().unwrap(), SERVER_PORT);
    let r = connect(&pods.outsider, &target, &["--bytes", "64"]).unwrap();
    assert_eq!(r["ok"], 1, "{target}: {r}");
    let e = wait_events(&agent, 1, |e| e["event"] == "conn_close" && e["orig_dst"] == target.as_str());
    assert_eq!(e.len(), 1, "{target}: {:?}", agent.events());
    assert_eq!(e[0]["pod"], "demo/server-2", "{}", e[0]);
}

#[test]
fn address_added_while_enrolled_is_steered() {
    let s = Scenario::start("aawe").unwrap();
    let server = &s.servers[0];
    ip_in(server, &["addr", "add", &format!("{SECONDARY_V4}/24"), "dev", "eth0"]);
    ip_in(server, &["-6", "addr", "add", &format!("{SECONDARY_V6}/64"), "dev", "eth0", "nodad"]);
    for ip in [SECONDARY_V4, SECONDARY_V6] {
        wait_steered(&s.agent, "server-1", ip);
        let target = sock(ip.parse().unwrap(), SERVER_PORT);
        let r = connect(&s.outsider, &target, &["--bytes", "128"]).unwrap();
        assert_eq!(r["ok"], 1, "{target}: {r}");
        let e = wait_events(&s.agent, 1, |e| {
            e["event"] == "conn_close" && e["direction"] == "inbound" && e["orig_dst"] == target.as_str()
        });
        assert_eq!(e.len(), 1, "{target}: {:?}", s.agent.events());
        assert_eq!(ip_of(&r["peers_seen_by_server"][0]), ip_of(&r["local_addrs"][0]), "{r}");
    }
    // And an address removed is no longer steered.
    ip_in(server, &["addr", "del", &format!("{SECONDARY_V4}/24"), "dev", "eth0"]);
    let deadline = Instant::now() + EVENT_WAIT;
    while workload(&s.agent, "server-1")["steered_ips"].as_array().unwrap().iter().any(|v| v == SECONDARY_V4)
    {
        assert!(Instant::now() < deadline, "{SECONDARY_V4} still steered after removal");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What transparency adds to a pod's netns, as `ip` and `/proc/sys` show it.
fn transparency_state(pod: &Pod) -> (String, String, String, String) {
    let rules4 = ip_in(pod, &["rule", "show"]);
    let rules6 = ip_in(pod, &["-6", "rule", "show"]);
    let routes = routes_of_table(pod, "17989");
    let sysctl = ferry_tests::netns::read_sysctl(pod.netns_path(), "net/ipv4/tcp_fwmark_accept").unwrap();
    (rules4, rules6, routes, sysctl.trim().to_owned())
}

#[test]
fn unenroll_removes_what_transparency_added() {
    let s = Scenario::start("unt").unwrap();
    let server = &s.servers[1];
    let (rules4, rules6, routes, sysctl) = transparency_state(server);
    for rules in [&rules4, &rules6] {
        assert!(rules.contains("fwmark 0x46450000/0xffff0000 lookup 17989"), "{rules}");
    }
    assert!(routes.contains("local default dev lo"), "{routes}");
    assert_eq!(routes.matches("local default dev lo").count(), 2, "IPv4 and IPv6: {routes}");
    assert_eq!(sysctl, "1");
    // Unenroll server-2 by reloading a mesh file without it.
    let mut mesh = MeshFile::new("node-a");
    mesh.pod(&s.client, NAMESPACE, "client");
    mesh.pod(&s.servers[0], NAMESPACE, SERVICE);
    s.agent.write_mesh(&mesh.to_toml()).unwrap();
    let reloaded = s.agent.wait_for_event(|e| e["event"] == "reloaded", EVENT_WAIT).unwrap();
    assert_eq!(reloaded["report"]["unenrolled"], serde_json::json!(["demo/server-2"]), "{reloaded}");
    let (rules4, rules6, routes, sysctl) = transparency_state(server);
    for rules in [&rules4, &rules6] {
        assert!(!rules.contains("17989"), "rule left behind: {rules}");
    }
    assert!(routes.trim().is_empty(), "routes left behind: {routes}");
    assert_eq!(sysctl, "0", "tcp_fwmark_accept not restored");
    // The enrolled pod keeps its own.
    let (rules4, _, _, _) = transparency_state(&s.servers[0]);
    assert!(rules4.contains("lookup 17989"), "{rules4}");
    // And plaintext to the unenrolled pod now reaches its app directly, from the real client.
    let r = connect(&s.outsider, &sock(server.ipv4().into(), SERVER_PORT), &["--bytes", "16"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(r["peers_seen_by_server"][0], r["local_addrs"][0], "{r}");
}

#[test]
fn disabled_original_source_is_reported_per_pod() {
    let pods = ScenarioPods::start("nosrc").unwrap();
    let mut mesh = MeshFile::new("node-a");
    mesh.original_source(false);
    mesh.pod(&pods.client, NAMESPACE, "client");
    mesh.pod(&pods.servers[0], NAMESPACE, SERVICE);
    let agent = Agent::start(&pods.node, &mesh.to_toml()).unwrap();
    let w = workload(&agent, "server-1");
    assert_eq!(w["app_source"], "loopback", "{w}");
    assert!(w["app_source_note"].as_str().is_some_and(|n| n.contains("original_source = false")), "{w}");
    let r = connect(&pods.outsider, &sock(pods.servers[0].ipv4().into(), SERVER_PORT), &["--bytes", "16"])
        .unwrap();
    assert!(ip_of(&r["peers_seen_by_server"][0]).is_loopback(), "{r}");
    let (rules4, _, routes, _) = transparency_state(&pods.servers[0]);
    assert!(!rules4.contains("17989") && routes.trim().is_empty(), "nothing added: {rules4} {routes}");
}
