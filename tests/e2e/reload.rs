//! Hot reload of the mesh file: valid changes apply without disturbing unaffected pods; invalid
//! files are rejected and the running config is kept.

mod common;

use common::*;
use ferry_tests::testapp::{self, ConnectOpts};
use ferry_tests::{MeshFile, Pod};

/// The scenario's mesh, with `enrolled` server pods and optionally the outsider.
fn mesh(s: &Scenario, servers: &[&Pod], outsider: bool) -> String {
    let mut mesh = MeshFile::new("node-a");
    mesh.pod(&s.client, "demo", "client");
    for p in servers {
        mesh.pod(p, "demo", "echo");
    }
    if outsider {
        mesh.pod(&s.outsider, "demo", "outsider");
    }
    let names: Vec<&str> = servers.iter().map(|p| p.name()).collect();
    mesh.service("echo", "demo", &[VIP4, VIP6], &[(SERVICE_PORT, SERVER_PORT)], &names);
    mesh.to_toml()
}

#[test]
fn hot_reload_enrolls_and_unenrolls_without_disturbing_others() {
    let s = Scenario::start("reload").unwrap();
    let (one, two) = (&s.servers[0], &s.servers[1]);
    // A long-lived connection of an unaffected pod, open across the reload: held open until the
    // reload has applied, and proxied (its record opened) before the mesh file changes.
    let addr = sock(one.ipv4().into(), SERVER_PORT);
    let long =
        testapp::connect_held(&s.client, &addr, &ConnectOpts { bytes: 1000, ..Default::default() }).unwrap();
    let opened = wait_events(&s.agent, 1, |e| {
        e["event"] == "conn_open" && e["direction"] == "outbound" && e["orig_dst"] == addr.as_str()
    });
    assert_eq!(opened.len(), 1, "the long connection is proxied: {:?}", s.agent.events());
    s.agent.write_mesh(&mesh(&s, &[one], true)).unwrap();
    let reloaded = s.agent.wait_for_event(|e| e["event"] == "reloaded", EVENT_WAIT).unwrap();
    assert_eq!(reloaded["report"]["enrolled"], serde_json::json!(["demo/outsider"]), "{reloaded}");
    assert_eq!(reloaded["report"]["unenrolled"], serde_json::json!(["demo/server-2"]), "{reloaded}");
    assert_eq!(reloaded["report"]["reenrolled"], serde_json::json!([]), "client and server-1 untouched");
    let long = long.release().unwrap();
    assert_eq!((long.ok, long.failed), (1, 0), "the connection open across the reload survived: {long:?}");

    // The newly enrolled pod is captured now.
    let r = connect(&s.outsider, &addr, &["--bytes", "10"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert!(r["local_addrs"][0].as_str().unwrap().starts_with("127.0.0.1:"), "outsider is redirected: {r}");
    // The unenrolled pod is no longer steered: the client's connection reaches its app straight
    // from the client pod's address (an inbound proxy would hand it over from loopback), without
    // an inbound record there, and the service now only has server-1.
    let before = events_of(&s.agent, "conn_close").iter().filter(|e| e["pod"] == "demo/server-2").count();
    let to_two = sock(two.ipv4().into(), SERVER_PORT);
    let r = connect(&s.client, &to_two, &["--bytes", "10"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    let peer = r["peers_seen_by_server"][0].as_str().unwrap_or_default();
    assert!(peer.starts_with(&format!("{}:", s.client.ipv4())), "server-2's app saw {peer}: {r}");
    // The client's own record of that connection is written when the proxy is done with it.
    let out = wait_events(&s.agent, 1, |e| {
        e["event"] == "conn_close" && e["direction"] == "outbound" && e["orig_dst"] == to_two.as_str()
    });
    assert_eq!(out.len(), 1, "{:?}", s.agent.events());
    let after = events_of(&s.agent, "conn_close").iter().filter(|e| e["pod"] == "demo/server-2").count();
    assert_eq!(before, after, "server-2 is not steered any more");
    let vip =
        connect(&s.client, &sock(VIP4.parse().unwrap(), SERVICE_PORT), &["--bytes", "10", "--conns", "6"])
            .unwrap();
    assert_eq!(vip["tags"]["server-1"], 6, "the service lost its removed endpoint: {vip}");
}

#[test]
fn invalid_reload_keeps_running_config() {
    let s = Scenario::start("badreload").unwrap();
    s.agent.write_mesh("node = \"node-a\"\n[[pods]]\nname = \"x\"\nips = [\"nope\"]\n").unwrap();
    let rejected = s.agent.wait_for_event(|e| e["event"] == "reload_rejected", EVENT_WAIT).unwrap();
    assert!(rejected["error"].as_str().unwrap().contains("pods[0]"), "names what is wrong: {rejected}");
    // A valid file that changes a start-up setting is refused too, with the reason.
    let mut changed = MeshFile::new("node-a");
    changed.exclude_port(2222);
    changed.pod(&s.client, "demo", "client");
    s.agent.write_mesh(&changed.to_toml()).unwrap();
    let restart = wait_events(&s.agent, 1, |e| {
        e["event"] == "reload_rejected" && e["error"].as_str().unwrap_or_default().contains("restart")
    });
    assert_eq!(restart.len(), 1, "{:?}", s.agent.events());
    assert!(restart[0]["error"].as_str().unwrap().contains("capture"), "{}", restart[0]);
    // Everything still runs on the old config: all pods enrolled, the service balanced.
    assert!(events_of(&s.agent, "reloaded").is_empty());
    let r = connect(
        &s.client,
        &sock(VIP4.parse().unwrap(), SERVICE_PORT),
        &["--bytes", "10", "--conns", "6", "--hold-ms", "200"],
    )
    .unwrap();
    assert_eq!(r["ok"], 6, "{r}");
    assert_eq!(r["tags"]["server-1"].as_u64().unwrap() + r["tags"]["server-2"].as_u64().unwrap(), 6);
    let inbound = wait_events(&s.agent, 6, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inbound.len(), 6, "the servers are still enrolled");
}
