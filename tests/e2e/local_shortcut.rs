//! The node-local shortcut (`[datapath] local_shortcut`): between two pods enrolled on one node the
//! agent joins the apps itself, without the HBONE tunnel, and says so in its records.

mod common;

use anyhow::{Context as _, Result};
use common::*;
use ferry_tests::{Agent, MeshFile};
use serde_json::Value;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// One node with a CA, a client and STRICT echo servers; the agent's shortcut set to `shortcut`.
/// Fields drop in order: the agent, the CA, then the pods and node.
struct OneNode {
    agent: Agent,
    _ca: tempfile::TempDir,
    pods: ScenarioPods,
}

impl OneNode {
    fn start(name: &str, shortcut: bool) -> Result<Self> {
        let pods = ScenarioPods::start(name)?;
        let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a"])?;
        let mut mesh = MeshFile::new("node-a");
        mesh.ca(&ca.path().join("nodes").join("node-a"), None).local_shortcut(shortcut);
        mesh.pod(&pods.client, NAMESPACE, "client");
        for s in &pods.servers {
            mesh.pod(s, NAMESPACE, SERVICE).mode("strict");
        }
        echo_service(&mut mesh);
        let agent = Agent::start(&pods.node, &mesh.to_toml()).context("starting the agent")?;
        Ok(Self { agent, _ca: ca, pods })
    }

    /// Sends 2048 bytes from the client to server-1 and to the service, both echoed.
    fn echo(&self) {
        let server = sock(self.pods.servers[0].ipv4().into(), SERVER_PORT);
        for addr in [server, service_addr(false).to_string()] {
            let r = connect(&self.pods.client, &addr, &["--bytes", "2048"]).unwrap();
            assert_eq!(r["ok"], 1, "to {addr}: {r}");
        }
    }

    /// The two `direction` connection records of [`OneNode::echo`].
    fn closes(&self, direction: &str) -> Vec<Value> {
        let found =
            wait_events(&self.agent, 2, |e| e["event"] == "conn_close" && e["direction"] == direction);
        assert_eq!(found.len(), 2, "{direction}: {:?}", self.agent.events());
        found
    }
}

#[test]
fn local_shortcut_skips_the_tunnel_between_pods_of_one_node() {
    let t = OneNode::start("lsc", true).unwrap();
    t.echo();
    let out = t.closes("outbound");
    for e in &out {
        assert_eq!(e["security"], "node_local", "{e}");
        assert_eq!(e["src_identity"], CLIENT_ID, "{e}");
        assert_eq!(e["dst_identity"], ECHO_ID, "{e}");
        assert_eq!(e["pod"], "demo/client", "{e}");
        assert_eq!(e["bytes_sent"], 2048, "{e}");
    }
    // The STRICT destination records its side too, with the same identities.
    let inb = t.closes("inbound");
    for e in &inb {
        assert_eq!(e["security"], "node_local", "{e}");
        assert_eq!((&e["src_identity"], &e["dst_identity"]), (&CLIENT_ID.into(), &ECHO_ID.into()), "{e}");
        assert_eq!(e["src_pod"], "demo/client", "{e}");
        assert!(e["pod"].as_str().is_some_and(|p| p.starts_with("demo/server-")), "{e}");
        assert_eq!(e["bytes_sent"], 2048, "{e}");
    }
    let tunnels = events_of(&t.agent, "tunnel_accept");
    assert!(tunnels.is_empty(), "no TLS connection to a tunnel port: {tunnels:?}");
    let mutual: Vec<Value> = t.agent.events().into_iter().filter(|e| e["security"] == "mutual_tls").collect();
    assert!(mutual.is_empty(), "nothing claims mutual TLS: {mutual:?}");
}

#[test]
fn without_the_shortcut_pods_of_one_node_use_the_tunnel() {
    let t = OneNode::start("lsoff", false).unwrap();
    t.echo();
    let out = t.closes("outbound");
    assert!(out.iter().all(|e| e["security"] == "mutual_tls" && e["dst_identity"] == ECHO_ID), "{out:?}");
    assert!(!events_of(&t.agent, "tunnel_accept").is_empty(), "{:?}", t.agent.events());
}
