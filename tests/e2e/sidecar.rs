//! Ferry's proxy as a classic sidecar: one `ferry run` per pod inside the pod's netns, capture mode
//! iptables (REDIRECT rules in the pod, the sidecar exempt by its group id), original destinations
//! from SO_ORIGINAL_DST, and HBONE with mutual TLS between the sidecars.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;

use anyhow::{Context as _, Result};
use common::*;
use ferry_tests::iptables::{self, SidecarCapture};
use ferry_tests::{Agent, MeshFile, Pod, bin_path};
use serde_json::Value;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// One node: `client`, `server-1` (permissive) and `server-2` (strict) each with capture rules and
/// a sidecar, and `outsider` with neither. The servers are the endpoints of service `echo`.
/// Fields drop in order: sidecars first, the pods and their node last.
struct Sidecars {
    client_sidecar: Agent,
    server_sidecars: Vec<Agent>,
    _ca: tempfile::TempDir,
    pods: ScenarioPods,
}

impl Sidecars {
    fn start(name: &str) -> Result<Self> {
        let pods = ScenarioPods::start(name)?;
        let (client, servers) = (&pods.client, &pods.servers);
        // Each sidecar is its own "node": its own intermediate CA, and only its pod is local.
        let ca = ferry_tests::ca::make_ca("cluster.local", &["client", "server-1", "server-2"])?;
        let mesh_for = |local: &Pod| {
            let mut mesh = MeshFile::new(local.name());
            mesh.capture_mode("iptables").ca(&ca.path().join("nodes").join(local.name()), None);
            mesh.pod(client, NAMESPACE, "client").node(client.name());
            for (s, mode) in servers.iter().zip(["permissive", "strict"]) {
                mesh.pod(s, NAMESPACE, SERVICE).node(s.name()).mode(mode);
            }
            echo_service(&mut mesh).to_toml()
        };
        let capture =
            SidecarCapture { outbound_port: 15001, inbound_port: 15006, inbound_exclude: vec![15008] };
        let mut sidecars = Vec::new();
        for pod in [client, &servers[0], &servers[1]] {
            iptables::install(pod, &capture)?;
            let sidecar = Agent::start_sidecar(pod, &mesh_for(pod))
                .with_context(|| format!("sidecar of {}", pod.name()))?;
            sidecars.push(sidecar);
        }
        let client_sidecar = sidecars.remove(0);
        Ok(Self { client_sidecar, server_sidecars: sidecars, _ca: ca, pods })
    }
}

fn closes<'a>(events: &'a [Value], direction: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events.iter().filter(move |e| e["event"] == "conn_close" && e["direction"] == direction)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// `GET /metrics` from the sidecar's default listener, inside `pod`'s netns.
fn scrape(pod: &Pod) -> Result<String> {
    pod.run(|| -> Result<String> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
        let mut s = TcpStream::connect(addr).context("connecting to the metrics listener")?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

#[test]
fn ferry_sidecars_carry_service_traffic_with_mtls() {
    let t = Sidecars::start("sidecar").unwrap();
    for sidecar in [&t.client_sidecar, &t.server_sidecars[0], &t.server_sidecars[1]] {
        let ready = sidecar.wait_for_event(|e| e["event"] == "ready", EVENT_WAIT).unwrap();
        assert_eq!(ready["capture"], "iptables", "{ready}");
        assert_eq!(ready["pods"], 1, "a sidecar enrolls its own pod only: {ready}");
        assert_eq!(ready["programs"].as_array().map(Vec::len), Some(0), "no eBPF programs: {ready}");
    }

    // 20 connections held together to the IPv4 VIP: the client's sidecar balances them.
    let vip = sock(VIP4.parse().unwrap(), SERVICE_PORT);
    let r = connect(&t.pods.client, &vip, &["--bytes", "64", "--conns", "20", "--hold-ms", "300"]).unwrap();
    assert_eq!(r["ok"], 20, "{r}");
    for s in &t.pods.servers {
        assert!(r["tags"][s.name()].as_u64().unwrap_or(0) > 0, "{} got none: {r}", s.name());
    }
    // The apps see their sidecar over loopback, never the client pod's address.
    let peers = strs(&r["peers_seen_by_server"]);
    assert_eq!(peers.len(), 20, "{r}");
    assert!(peers.iter().all(|p| p.starts_with("127.0.0.1:")), "servers must see their sidecar: {peers:?}");

    // The client's sidecar recovered the VIP with SO_ORIGINAL_DST and tunnelled with mutual TLS.
    let out =
        wait_events(&t.client_sidecar, 20, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    assert_eq!(out.len(), 20, "{:?}", t.client_sidecar.events());
    for e in &out {
        assert_eq!(e["orig_dst"], vip.as_str(), "{e}");
        assert_eq!(e["service"], "demo/echo", "{e}");
        assert_eq!(e["security"], "mutual_tls", "{e}");
        assert_eq!(e["src_identity"], CLIENT_ID, "{e}");
        assert_eq!(e["dst_identity"], ECHO_ID, "the client's sidecar verified the server's identity: {e}");
        assert!(e["src"].as_str().unwrap().starts_with(&format!("{}:", t.pods.client.ipv4())), "{e}");
    }
    // Each server's sidecar learned the client's identity from its certificate. A server side
    // writes its record when it is done, which can be after the client's side wrote its own.
    let servers: Vec<&Agent> = t.server_sidecars.iter().collect();
    let arrived = wait_events_in(&servers, 20, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(arrived.len(), 20, "{arrived:?}");
    let mut inbound = 0;
    for (s, sidecar) in t.pods.servers.iter().zip(&t.server_sidecars) {
        let events = sidecar.events();
        for e in closes(&events, "inbound") {
            inbound += 1;
            assert_eq!(e["security"], "mutual_tls", "{e}");
            assert_eq!(e["src_identity"], CLIENT_ID, "{e}");
            assert_eq!(e["dst_identity"], ECHO_ID, "{e}");
            assert_eq!(e["src_pod"], "demo/client", "{e}");
            assert_eq!(e["orig_dst"], sock(s.ipv4().into(), SERVER_PORT).as_str(), "{e}");
        }
    }
    assert_eq!(inbound, 20, "every connection arrived at a server sidecar through its tunnel");
    let log = t.client_sidecar.access_log();
    let line = log.iter().find(|l| l["orig_dst"] == vip.as_str()).expect("an access-log line for the VIP");
    assert_eq!(line["connection_security_policy"], "mutual_tls", "{line}");
    assert_eq!(line["source_principal"], CLIENT_ID, "{line}");
    assert_eq!(line["destination_principal"], ECHO_ID, "{line}");

    // IPv6: IP6T_SO_ORIGINAL_DST gives the v6 VIP back.
    let vip6 = sock(VIP6.parse().unwrap(), SERVICE_PORT);
    let r6 = connect(&t.pods.client, &vip6, &["--bytes", "64"]).unwrap();
    assert_eq!(r6["ok"], 1, "{r6}");
    let out6 =
        wait_events(&t.client_sidecar, 1, |e| e["event"] == "conn_close" && e["orig_dst"] == vip6.as_str());
    assert_eq!(out6.len(), 1, "{:?}", t.client_sidecar.events());
    assert_eq!(out6[0]["security"], "mutual_tls");

    // The operating surface answers per sidecar: metrics in the pod, bpf says there is none.
    let metrics = scrape(&t.pods.client).unwrap();
    let opened = format!("source_principal=\"{CLIENT_ID}\"");
    assert!(
        metrics.lines().any(|l| l.starts_with("ferry_tcp_connections_closed_total{")
            && l.contains(&opened)
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );
    let out = Command::new(bin_path("ferry"))
        .arg("--admin-socket")
        .arg(t.client_sidecar.admin_socket())
        .args(["bpf", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bpf: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bpf["capture"], "iptables", "{bpf}");
    assert_eq!(bpf["programs"].as_array().map(Vec::len), Some(0), "{bpf}");
}

#[test]
fn strict_sidecar_refuses_plaintext_from_an_unenrolled_pod() {
    let t = Sidecars::start("sidestrict").unwrap();
    let (permissive, strict) = (&t.pods.servers[0], &t.pods.servers[1]);

    // Plaintext from outside the mesh is captured by the strict pod's rules and refused.
    let strict_addr = sock(strict.ipv4().into(), SERVER_PORT);
    let r = connect(&t.pods.outsider, &strict_addr, &["--bytes", "16", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(r["ok"], 0, "plaintext must not reach a STRICT pod's app: {r}");
    let refused = wait_events(&t.server_sidecars[1], 1, |e| e["event"] == "conn_refused");
    assert_eq!(refused.len(), 1, "{:?}", t.server_sidecars[1].events());
    assert_eq!(refused[0]["reason"], "plaintext refused: STRICT mode");
    assert_eq!(refused[0]["orig_dst"], strict_addr.as_str(), "SO_ORIGINAL_DST, not the listener's address");
    assert!(refused[0]["src"].as_str().unwrap().starts_with(&format!("{}:", t.pods.outsider.ipv4())));

    // The same pod takes the mesh client's connection: it arrives over mutual TLS.
    let ok = connect(&t.pods.client, &strict_addr, &["--bytes", "16"]).unwrap();
    assert_eq!(ok["ok"], 1, "{ok}");
    let inb =
        wait_events(&t.server_sidecars[1], 1, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inb.len(), 1, "{:?}", t.server_sidecars[1].events());
    assert_eq!(inb[0]["security"], "mutual_tls");
    assert_eq!(inb[0]["src_identity"], CLIENT_ID);

    // A permissive pod lets the outsider's plaintext through its sidecar and records it as such.
    let permissive_addr = sock(permissive.ipv6().into(), SERVER_PORT);
    let p = connect(&t.pods.outsider, &permissive_addr, &["--bytes", "16"]).unwrap();
    assert_eq!(p["ok"], 1, "{p}");
    assert!(strs(&p["peers_seen_by_server"]).iter().all(|a| a.starts_with("[::1]:")), "{p}");
    let plain =
        wait_events(&t.server_sidecars[0], 1, |e| e["event"] == "conn_close" && e["security"] == "none");
    assert_eq!(plain.len(), 1, "{:?}", t.server_sidecars[0].events());
    assert_eq!(plain[0]["orig_dst"], permissive_addr.as_str());

    // A connection made straight to the client sidecar's outbound port has nowhere to go.
    let direct =
        connect(&t.pods.client, "127.0.0.1:15001", &["--bytes", "16", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(direct["ok"], 0, "{direct}");
    let refused = wait_events(&t.client_sidecar, 1, |e| e["event"] == "conn_refused");
    assert_eq!(refused.len(), 1, "{:?}", t.client_sidecar.events());
    assert!(refused[0]["reason"].as_str().unwrap().contains("not redirected"), "{}", refused[0]);
}
