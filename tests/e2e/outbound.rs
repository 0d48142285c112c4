//! The outbound path: a pod's connect() is captured by cgroup connect4/6, the proxy recovers the
//! original destination, balances service VIPs, and connects from the pod's netns.

mod common;

use common::*;
use ferry_tests::testapp::{self, ConnectOpts};
use serde_json::Value;

fn closes_from<'a>(events: &'a [Value], pod: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events
        .iter()
        .filter(move |e| e["event"] == "conn_close" && e["direction"] == "outbound" && e["pod"] == pod)
}

#[test]
fn outbound_connect_is_redirected_to_node_proxy() {
    let s = Scenario::start("redir").unwrap();
    let target = sock(s.servers[0].ipv4().into(), SERVER_PORT);
    let report = connect(&s.client, &target, &["--bytes", "4096"]).unwrap();
    assert_eq!(report["ok"], 1, "{report}");
    let closes = wait_events(&s.agent, 1, |e| {
        e["event"] == "conn_close" && e["direction"] == "outbound" && e["orig_dst"] == target.as_str()
    });
    assert_eq!(closes.len(), 1, "the proxy must account for exactly this connection: {:?}", s.agent.events());
    let c = &closes[0];
    assert_eq!(c["pod"], "demo/client");
    assert_eq!(c["bytes_sent"], 4096);
    // The echo comes back through the proxy, plus the server's trailer.
    assert!(c["bytes_received"].as_u64().unwrap() > 4096, "{c}");
    // The client's socket was connected to the in-pod listener, not to the server.
    let local: Vec<String> =
        report["local_addrs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(c["src"].as_str().unwrap(), local[0], "the record is keyed by the app's own socket");
    assert!(local[0].starts_with("127.0.0.1:"), "app socket is bound to loopback: {local:?}");
}

#[test]
fn original_destination_is_recovered_ipv4() {
    let s = Scenario::start("odst4").unwrap();
    let mut dialled = Vec::new();
    for server in &s.servers {
        let target = sock(server.ipv4().into(), SERVER_PORT);
        let report = connect(&s.client, &target, &["--bytes", "100"]).unwrap();
        assert_eq!(report["ok"], 1, "{report}");
        assert_eq!(report["tags"][server.name()], 1, "reached the server that was dialled: {report}");
        dialled.push((report["local_addrs"][0].clone(), target));
    }
    let events = wait_events(&s.agent, 2, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    assert_eq!(closes_from(&events, "demo/client").count(), 2, "{events:?}");
    // Each connection's record (found by the app's own socket: records of two connections may be
    // written in either order) names the address that connection dialled.
    for (src, target) in &dialled {
        let e = closes_from(&events, "demo/client")
            .find(|e| &e["src"] == src)
            .unwrap_or_else(|| panic!("no record of the connection from {src}: {events:?}"));
        assert_eq!(e["orig_dst"], target.as_str(), "{e}");
        assert_eq!(e["endpoint"], e["orig_dst"], "a pod address is not rewritten");
        assert!(e["service"].is_null());
    }
}

#[test]
fn original_destination_is_recovered_ipv6() {
    let s = Scenario::start("odst6").unwrap();
    let target = sock(s.servers[1].ipv6().into(), SERVER_PORT);
    let report = connect(&s.client, &target, &["--bytes", "100"]).unwrap();
    assert_eq!(report["ok"], 1, "{report}");
    assert_eq!(report["tags"]["server-2"], 1);
    let events = wait_events(&s.agent, 1, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    let e = closes_from(&events, "demo/client").next().expect("an outbound record");
    assert_eq!(e["orig_dst"], target.as_str());
    assert!(e["src"].as_str().unwrap().starts_with("[::1]:"), "{e}");
    // The app's view: its socket was connected to the v6 loopback listener.
    assert!(report["local_addrs"][0].as_str().unwrap().starts_with("[::1]:"), "{report}");
}

#[test]
fn service_vip_is_balanced_across_endpoints() {
    let s = Scenario::start("vip").unwrap();
    // 20 connections held open together (every one proxied before any is let go): the balancer
    // sees the load and spreads it.
    let vip = sock(VIP4.parse().unwrap(), SERVICE_PORT);
    let held =
        testapp::connect_held(&s.client, &vip, &ConnectOpts { bytes: 64, conns: 20, ..Default::default() })
            .unwrap();
    let open = wait_events(&s.agent, 20, |e| {
        e["event"] == "conn_open" && e["direction"] == "outbound" && e["orig_dst"] == vip.as_str()
    });
    assert_eq!(open.len(), 20, "all 20 connections open at once: {:?}", s.agent.events());
    let report = held.release().unwrap();
    assert_eq!((report.ok, report.failed), (20, 0), "{report:?}");
    let one = report.tags.get("server-1").copied().unwrap_or(0);
    let two = report.tags.get("server-2").copied().unwrap_or(0);
    assert_eq!(one + two, 20);
    assert!((7..=13).contains(&one), "uneven spread: server-1 {one}, server-2 {two}");
    let events = wait_events(&s.agent, 20, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    for e in closes_from(&events, "demo/client") {
        assert_eq!(e["service"], "demo/echo");
        assert_eq!(e["orig_dst"], vip.as_str());
        assert!(e["endpoint"].as_str().unwrap().ends_with(":8080"), "{e}");
    }
    // The IPv6 VIP maps to the endpoints' IPv6 addresses.
    let v6 = connect(&s.client, &sock(VIP6.parse().unwrap(), SERVICE_PORT), &["--bytes", "64"]).unwrap();
    assert_eq!(v6["ok"], 1, "{v6}");
}

#[test]
fn unenrolled_pod_is_not_redirected() {
    let s = Scenario::start("unenr").unwrap();
    let target = sock(s.servers[0].ipv4().into(), SERVER_PORT);
    let report = connect(&s.outsider, &target, &["--bytes", "100"]).unwrap();
    assert_eq!(report["ok"], 1, "{report}");
    // Its socket really connected from its own address, not to a loopback listener.
    let local = report["local_addrs"][0].as_str().unwrap();
    assert!(local.starts_with(&format!("{}:", s.outsider.ipv4())), "{report}");
    // The server pod is enrolled, so the connection shows up inbound with the outsider's address,
    // and there is no outbound record at all.
    let inbound = wait_events(&s.agent, 1, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0]["src"], local);
    assert!(s.agent.events().iter().all(|e| e["direction"] != "outbound"), "{:?}", s.agent.events());
    // A VIP means nothing outside the mesh: no proxy, no route.
    let vip =
        connect(&s.outsider, &sock(VIP4.parse().unwrap(), 80), &["--bytes", "1", "--timeout-ms", "1500"])
            .unwrap();
    assert_eq!(vip["ok"], 0, "{vip}");
}

#[test]
fn proxy_upstream_connections_are_not_recaptured() {
    let s = Scenario::start("norecap").unwrap();
    let report =
        connect(&s.client, &sock(VIP4.parse().unwrap(), SERVICE_PORT), &["--bytes", "100", "--conns", "5"])
            .unwrap();
    assert_eq!(report["ok"], 5, "{report}");
    let events = wait_events(&s.agent, 10, |e| e["event"] == "conn_close");
    let outbound: Vec<_> = closes_from(&events, "demo/client").collect();
    let inbound: Vec<_> = events.iter().filter(|e| e["direction"] == "inbound").collect();
    // One outbound record per app connection: the proxy's own upstream connect from the client's
    // netns was not captured again (it would show up as a second outbound record, or loop).
    assert_eq!(outbound.len(), 5, "{events:?}");
    assert_eq!(inbound.len(), 5, "{events:?}");
    let client_ip = s.client.ipv4().to_string();
    for e in inbound {
        assert!(
            e["src"].as_str().unwrap().starts_with(&format!("{client_ip}:")),
            "upstream came from the pod: {e}"
        );
        assert_eq!(e["src_pod"], "demo/client");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(events_of(&s.agent, "conn_close").len(), 10, "no further connections appeared");
}

#[test]
fn connecting_to_proxy_ports_does_not_loop() {
    let s = Scenario::start("loop").unwrap();
    let server = s.servers[0].ipv4().to_string();
    let targets = [
        "127.0.0.1:15001".to_string(),
        "127.0.0.1:15006".to_string(),
        format!("{server}:15001"),
        format!("{server}:15006"),
    ];
    for t in &targets {
        let r = connect(&s.client, t, &["--bytes", "10", "--timeout-ms", "3000"]).unwrap();
        assert_eq!(r["ok"], 0, "{t} must not reach anything: {r}");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let events = s.agent.events();
    let refused = events.iter().filter(|e| e["event"] == "conn_refused").count();
    let relayed = events.iter().filter(|e| e["event"] == "conn_open").count();
    assert_eq!(relayed, 0, "nothing may be forwarded: {events:?}");
    // Each attempt was refused at most once: no connection bounced back into the proxy.
    assert!(refused <= targets.len(), "{events:?}");
    // The agent is still healthy afterwards.
    let ok = connect(&s.client, &sock(VIP4.parse().unwrap(), 80), &["--bytes", "10"]).unwrap();
    assert_eq!(ok["ok"], 1, "{ok}");
}

#[test]
fn payload_integrity_100mb_and_200_concurrent_connections() {
    let s = Scenario::start("bulk").unwrap();
    let vip = sock(VIP4.parse().unwrap(), SERVICE_PORT);
    // Bulk through two proxy hops in a debug build on a shared machine: the per-connection time
    // limit must not be what decides this test (scenario::connect still bounds the whole run).
    let big = connect(&s.client, &vip, &["--bytes", "100000000", "--timeout-ms", "100000"]).unwrap();
    assert_eq!(big["ok"], 1, "{big}");
    assert_eq!(big["bytes_echoed"], 100_000_000u64, "every byte came back intact: {big}");
    let many =
        connect(&s.client, &vip, &["--bytes", "65536", "--conns", "200", "--timeout-ms", "100000"]).unwrap();
    assert_eq!(many["ok"], 200, "{many}");
    assert_eq!(many["failed"], 0);
    assert_eq!(many["bytes_echoed"], 200u64 * 65536, "{many}");
    let closes = wait_events(&s.agent, 201, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    assert_eq!(closes.len(), 201);
    let sent: u64 = closes.iter().map(|e| e["bytes_sent"].as_u64().unwrap()).sum();
    assert_eq!(sent, 100_000_000 + 200 * 65536, "the proxy relayed exactly what the app sent");
}

#[test]
fn half_close_is_relayed_both_ways() {
    let s = Scenario::start("half").unwrap();
    // testapp: the client sends, then shuts down its write half; the server only sends its trailer
    // after it sees that EOF, then closes; the client reads to EOF. Both half-closes must cross two
    // proxy hops (outbound in the client pod, inbound in the server pod) for this to finish.
    let r = connect(
        &s.client,
        &sock(s.servers[0].ipv6().into(), SERVER_PORT),
        &["--bytes", "5000", "--timeout-ms", "10000"],
    )
    .unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(r["tags"]["server-1"], 1, "the trailer sent after EOF arrived: {r}");
    let closes = wait_events(&s.agent, 2, |e| e["event"] == "conn_close");
    assert_eq!(closes.len(), 2);
    for c in &closes {
        assert_eq!(c["close_reason"], "eof", "{c}");
        assert_eq!(c["bytes_sent"], 5000);
    }
}
