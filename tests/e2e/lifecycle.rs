//! Agent lifecycle: shutdown detaches every program and link and closes every listener.

mod common;

use std::process::Command;

use common::*;

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

#[test]
fn shutdown_leaves_no_programs_links_or_listeners() {
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
    assert_eq!(prog_ids.len(), 4, "connect4, connect6, sock_ops, sk_lookup: {ready}");
    // Three enrolled pods, four links each.
    assert_eq!(link_ids.len(), 12, "{:?}", events_of(&s.agent, "enrolled"));
    let (progs, links) = (bpf_ids("prog"), bpf_ids("link"));
    assert!(prog_ids.iter().all(|id| progs.contains(id)), "programs are loaded while running");
    assert!(link_ids.iter().all(|id| links.contains(id)), "links exist while running");
    for pod in [&s.client, &s.servers[0]] {
        let ports = listening_ports(pod);
        assert!(ports.contains(&15001) && ports.contains(&15006), "{} listens: {ports:?}", pod.name());
    }
    // Traffic flows through the proxy before shutdown.
    let target = sock(s.servers[0].ipv4().into(), SERVER_PORT);
    let before = connect(&s.client, &target, &["--bytes", "10"]).unwrap();
    assert!(before["local_addrs"][0].as_str().unwrap().starts_with("127.0.0.1:"), "{before}");

    let Scenario { agent, client, servers, node, .. } = s;
    let status = agent.stop().unwrap();
    assert!(status.success(), "agent exits cleanly on SIGTERM: {status:?}");

    let (progs, links) = (bpf_ids("prog"), bpf_ids("link"));
    let left_progs: Vec<_> = prog_ids.iter().filter(|id| progs.contains(id)).collect();
    let left_links: Vec<_> = link_ids.iter().filter(|id| links.contains(id)).collect();
    assert!(left_progs.is_empty(), "programs left loaded: {left_progs:?}");
    assert!(left_links.is_empty(), "links left attached: {left_links:?}");
    for pod in [&client, &servers[0], &servers[1]] {
        let ports = listening_ports(pod);
        assert!(
            !ports.contains(&15001) && !ports.contains(&15006),
            "{} still listens: {ports:?}",
            pod.name()
        );
    }
    // And the pods' networking is back to plain: the client reaches the server directly.
    let after = connect(&client, &target, &["--bytes", "10"]).unwrap();
    assert_eq!(after["ok"], 1, "{after}");
    assert!(after["local_addrs"][0].as_str().unwrap().starts_with(&format!("{}:", client.ipv4())), "{after}");
    assert_eq!(after["peers_seen_by_server"][0], after["local_addrs"][0]);
    drop(node);
}
