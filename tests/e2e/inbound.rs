//! The inbound path: sk_lookup steers plaintext SYNs for an enrolled pod to its inbound listener,
//! and the proxy hands them to the app from the client's own address. Loopback inside a pod is left
//! alone.

mod common;

use common::*;

#[test]
fn inbound_plaintext_is_steered_by_sk_lookup() {
    let s = Scenario::start("inb").unwrap();
    for (ip, family) in [(s.servers[0].ipv4().into(), "v4"), (s.servers[0].ipv6().into(), "v6")] {
        let target = sock(ip, SERVER_PORT);
        let r = connect(&s.outsider, &target, &["--bytes", "300"]).unwrap();
        assert_eq!(r["ok"], 1, "{family}: {r}");
        let e = wait_events(&s.agent, 1, |e| {
            e["event"] == "conn_close" && e["direction"] == "inbound" && e["orig_dst"] == target.as_str()
        });
        assert_eq!(e.len(), 1, "{family}: {:?}", s.agent.events());
        assert_eq!(e[0]["pod"], "demo/server-1");
        assert_eq!(e[0]["src"], r["local_addrs"][0], "{family}: the proxy saw the outsider's real address");
        assert_eq!(e[0]["bytes_sent"], 300);
        // The app was reached at the dialled port, from the outsider's own address.
        let peer: std::net::SocketAddr = r["peers_seen_by_server"][0].as_str().unwrap().parse().unwrap();
        let client: std::net::SocketAddr = r["local_addrs"][0].as_str().unwrap().parse().unwrap();
        assert_eq!(peer.ip().to_canonical(), client.ip().to_canonical(), "{family}: server saw {peer}");
    }
}

#[test]
fn loopback_inside_pod_is_untouched() {
    let s = Scenario::start("lo").unwrap();
    let _local = serve(&s.client, 9000, "local").unwrap();
    for addr in ["127.0.0.1:9000", "[::1]:9000"] {
        let r = connect(&s.client, addr, &["--bytes", "100"]).unwrap();
        assert_eq!(r["ok"], 1, "{addr}: {r}");
        // The server saw the client's own socket: nothing in between.
        assert_eq!(r["peers_seen_by_server"][0], r["local_addrs"][0], "{addr}: {r}");
    }
    // A server pod talking to itself over loopback is not steered inbound either.
    let r = connect(&s.servers[0], "127.0.0.1:8080", &["--bytes", "100"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(r["peers_seen_by_server"][0], r["local_addrs"][0]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let events = s.agent.events();
    assert!(
        events.iter().all(|e| e.get("direction").is_none()),
        "no connection touched the proxy: {events:?}"
    );
}

#[test]
fn kubelet_probe_reaches_strict_pod_but_plaintext_from_elsewhere_does_not() {
    let pods = ScenarioPods::start("probe").unwrap();
    let mut mesh = ferry_tests::MeshFile::new("node-a");
    for s in &pods.servers {
        mesh.pod(s, NAMESPACE, SERVICE).mode("strict");
    }
    let agent = ferry_tests::Agent::start(&pods.node, &mesh.to_toml()).unwrap();
    let target = sock(pods.servers[0].ipv4().into(), SERVER_PORT);
    // The kubelet probes from the node itself (its own cgroup, the node's netns): its connection is
    // bound to the probe source and reaches the app, as without a mesh, in both families.
    let kubelet = pods.node.cgroup_root().join("kubelet");
    ferry_tests::cgroup::create(&kubelet).unwrap();
    for (ip, source) in [
        (std::net::IpAddr::from(pods.servers[0].ipv4()), "169.254.7.127"),
        (pods.servers[0].ipv6().into(), "[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]"),
    ] {
        let probe_target = sock(ip, SERVER_PORT);
        let mut probe = pods.node.command_in_cgroup(ferry_tests::bin_path("ferry-testapp"), &kubelet);
        probe.args(["connect", &probe_target, "--bytes", "16"]);
        let out = probe.output().unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["ok"], 1, "the probe reached the STRICT app: {r}");
        assert_eq!(r["peers_seen_by_server"][0], r["local_addrs"][0], "directly: {r}");
        assert!(
            r["local_addrs"][0].as_str().unwrap().starts_with(&format!("{source}:")),
            "from the probe source: {r}"
        );
    }
    // Anything else from the node's own address is not a probe: a process outside the kubelet's
    // cgroup (traffic forwarded by the node would be the same) is steered and refused.
    let mut other = pods.node.command(ferry_tests::bin_path("ferry-testapp"));
    other.args(["connect", &target, "--bytes", "16", "--timeout-ms", "3000"]);
    let out = other.output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], 0, "plaintext from the node's address reached a STRICT app: {r}");
    // Plaintext from anywhere else is refused.
    let r = connect(&pods.outsider, &target, &["--bytes", "16", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(r["ok"], 0, "plaintext from a pod reached a STRICT app: {r}");
    // Both refusals recorded: the node's non-probe connect and the outsider's.
    let refused =
        wait_events(&agent, 2, |e| e["event"] == "conn_refused" && e["orig_dst"] == target.as_str());
    assert_eq!(refused.len(), 2, "{:?}", agent.events());
    let bpf = agent.cli_json(&["bpf"]).unwrap();
    assert!(bpf["counters"]["node_passed"].as_u64().unwrap_or(0) >= 2, "{bpf}");
    assert!(bpf["counters"]["probe_bound"].as_u64().unwrap_or(0) >= 2, "{bpf}");
}
