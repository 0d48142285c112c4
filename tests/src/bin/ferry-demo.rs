//! `ferry-demo`: Ferry on a simulated node, with a readable account of every connection.
//!
//! It builds the shared scenario (a client pod and two server pods behind one service VIP, all
//! enrolled, and one pod outside the mesh), starts the agent, sends real traffic, and prints what
//! the agent reported for each connection: the pod, whether the connection was redirected on its
//! way out or steered on its way in, the original destination, the chosen endpoint, bytes each way
//! and how it closed. It then checks its own results and exits non-zero if any check fails.
//! Needs root (run it with `cargo xtask demo`); everything is torn down on exit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ferry_tests::scenario::{SERVER_PORT, SERVICE, Scenario, pod_key, service_addr, wait_events};
use ferry_tests::testapp::{self, ConnectOpts, ConnectReport};
use ferry_tests::{Agent, Pod};
use serde::Deserialize;
use serde_json::Value;

/// Payload bytes per connection.
const BYTES: usize = 4096;
/// How long VIP connections stay open together, so the balancer sees them as concurrent load.
const HOLD_MS: u64 = 300;

fn main() -> ExitCode {
    let started = Instant::now();
    match run() {
        Ok(checks) => {
            let elapsed = started.elapsed().as_secs_f64();
            if checks.failed.is_empty() {
                println!("\nferry-demo: all {} checks passed in {elapsed:.1} s", checks.passed);
                ExitCode::SUCCESS
            } else {
                println!("\nferry-demo: {} of {} checks FAILED:", checks.failed.len(), checks.total());
                for f in &checks.failed {
                    println!("  - {f}");
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("ferry-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One `conn_close` event, as the agent writes it.
#[derive(Debug, Clone, Deserialize)]
struct Close {
    id: u64,
    direction: String,
    pod: String,
    src: String,
    #[serde(default)]
    src_pod: Option<String>,
    orig_dst: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    endpoint_pod: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    close_reason: String,
    security: String,
}

impl Close {
    fn outbound(&self) -> bool {
        self.direction == "outbound"
    }
}

/// What one step of traffic expects from the agent.
struct Step<'a> {
    title: String,
    from: &'a Pod,
    to: SocketAddr,
    conns: usize,
    hold_ms: u64,
    /// Whether the connections should succeed.
    expect_ok: bool,
    /// conn_close records expected: (outbound, inbound).
    expect_closes: (usize, usize),
}

impl<'a> Step<'a> {
    /// A step whose connections succeed; several are held open together, so that the balancer
    /// sees them as concurrent load.
    fn new(
        title: String,
        from: &'a Pod,
        to: SocketAddr,
        conns: usize,
        expect_closes: (usize, usize),
    ) -> Self {
        let hold_ms = if conns > 1 { HOLD_MS } else { 0 };
        Step { title, from, to, conns, hold_ms, expect_ok: true, expect_closes }
    }

    /// The same step, expected to fail.
    fn failing(self) -> Self {
        Step { expect_ok: false, ..self }
    }
}

/// A step's outcome: the app's report and the agent's records of it.
struct Outcome {
    report: ConnectReport,
    closes: Vec<Close>,
}

/// Passed and failed checks; each is printed as it is made.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if ok {
            self.passed += 1;
            println!("  ok    {what}");
        } else {
            println!("  FAIL  {what}");
            self.failed.push(what);
        }
    }

    fn total(&self) -> usize {
        self.passed + self.failed.len()
    }
}

fn run() -> Result<Checks> {
    println!("ferry-demo: building a simulated node and starting the agent...");
    let s = Scenario::start("demo").context("cannot start the demo scenario")?;
    print_node(&s);

    let (client, outsider) = (&s.client, &s.outsider);
    // server-2 over IPv4 from the client, server-1 over IPv6 from the outsider.
    let server2 = SocketAddr::new(s.servers[1].ipv4().into(), SERVER_PORT);
    let server1 = SocketAddr::new(s.servers[0].ipv6().into(), SERVER_PORT);
    let (v4, v6) = (service_addr(false), service_addr(true));
    let steps = [
        Step::new(format!("client -> VIP {v4}, 8 connections at once"), client, v4, 8, (8, 8)),
        Step::new(format!("client -> VIP {v6}, 4 connections at once"), client, v6, 4, (4, 4)),
        Step::new(format!("client -> server-2's pod address {server2}"), client, server2, 1, (1, 1)),
        Step::new(format!("outsider (not enrolled) -> server-1 at {server1}"), outsider, server1, 1, (0, 1)),
        Step::new(format!("outsider (not enrolled) -> VIP {v4}"), outsider, v4, 1, (0, 0)).failing(),
    ];

    let mut seen = BTreeSet::new();
    let mut outcomes = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        println!("\n[{}] {}", i + 1, step.title);
        let outcome = run_step(&s.agent, step, &mut seen)?;
        print_outcome(step, &outcome);
        outcomes.push(outcome);
    }
    // Anything the agent reports from now on would be a connection nobody made.
    std::thread::sleep(Duration::from_millis(200));
    let events = s.agent.events();

    print_summary(&s, &outcomes);
    println!("\nChecks");
    let mut checks = Checks::default();
    for (i, (step, outcome)) in steps.iter().zip(&outcomes).enumerate() {
        check_step(&mut checks, i + 1, step, outcome);
    }
    check_vip(&mut checks, &s, &outcomes[0], "IPv4");
    check_vip(&mut checks, &s, &outcomes[1], "IPv6");
    check_pod_address(&mut checks, &s, &outcomes[2]);
    check_outsider(&mut checks, &s, &outcomes[3], &events);
    let closes = events.iter().filter(|e| e["event"] == "conn_close").count();
    let expected: usize = steps.iter().map(|st| st.expect_closes.0 + st.expect_closes.1).sum();
    checks.check(closes == expected, format!("the agent recorded {closes} connections, {expected} expected"));
    let trouble: Vec<&Value> =
        events.iter().filter(|e| e["event"] == "conn_failed" || e["event"] == "conn_refused").collect();
    let what = "no connection failed or was refused by the proxy";
    checks.check(
        trouble.is_empty(),
        if trouble.is_empty() { what.into() } else { format!("{what}: {trouble:?}") },
    );

    println!("\nStopping the agent (SIGTERM) and tearing the node down...");
    let Scenario { agent, node, .. } = s;
    match agent.stop() {
        Ok(status) => checks.check(status.success(), format!("the agent exited cleanly ({status})")),
        Err(e) => checks.check(false, format!("the agent stopped: {e:#}")),
    }
    drop(node);
    Ok(checks)
}

/// Prints the node's pods and what the agent enrolled.
fn print_node(s: &Scenario) {
    println!("\nNode {} (pods on bridge br0, agent pid {})", s.node.name(), s.agent.pid());
    let enrolled: BTreeSet<String> = s
        .agent
        .events()
        .iter()
        .filter(|e| e["event"] == "enrolled")
        .filter_map(|e| e["pod"].as_str().map(str::to_owned))
        .collect();
    let mut pods = vec![(&s.client, "client")];
    pods.extend(s.servers.iter().map(|p| (p, "echo server, endpoint of demo/echo")));
    pods.push((&s.outsider, "not in the mesh file"));
    for (pod, role) in pods {
        let key = pod_key(pod);
        let mark = if enrolled.contains(&key) { "enrolled" } else { "NOT enrolled" };
        println!("  {:<10} {:<12} {:<16} {:<20} {role}", pod.name(), mark, pod.ipv4(), pod.ipv6());
    }
    let ready = s.agent.events().into_iter().find(|e| e["event"] == "ready").unwrap_or_default();
    let programs: Vec<String> = ready["programs"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["name"].as_str().unwrap_or("?").to_owned()).collect())
        .unwrap_or_default();
    println!(
        "  service {SERVICE}: VIPs {} and {} -> endpoints server-1, server-2",
        service_addr(false),
        service_addr(true)
    );
    println!("  kernel programs loaded: {}", programs.join(", "));
}

/// Runs one step and collects the conn_close records it caused (those not seen before).
fn run_step(agent: &Agent, step: &Step, seen: &mut BTreeSet<u64>) -> Result<Outcome> {
    let opts = ConnectOpts {
        bytes: BYTES,
        conns: step.conns,
        hold_ms: step.hold_ms,
        timeout_ms: if step.expect_ok { 10_000 } else { 1_000 },
        in_cgroup: true,
    };
    let report = testapp::connect(step.from, step.to, &opts)
        .with_context(|| format!("running the client of step {:?}", step.title))?;
    let want = seen.len() + step.expect_closes.0 + step.expect_closes.1;
    let all = wait_events(agent, want, |e| e["event"] == "conn_close");
    let mut closes = Vec::new();
    for e in all {
        let close: Close =
            serde_json::from_value(e.clone()).with_context(|| format!("unexpected conn_close record {e}"))?;
        if seen.insert(close.id) {
            closes.push(close);
        }
    }
    closes.sort_by_key(|c| c.id);
    Ok(Outcome { report, closes })
}

/// Prints the app's view and one row per connection record.
fn print_outcome(step: &Step, o: &Outcome) {
    let r = &o.report;
    let tags: Vec<String> = r.tags.iter().map(|(t, n)| format!("{t} x{n}")).collect();
    let answered = if tags.is_empty() { String::new() } else { format!("; answered by {}", tags.join(", ")) };
    println!("    app in pod {}: {} ok, {} failed{answered}", step.from.name(), r.ok, r.failed);
    if let Some(err) = r.errors.first() {
        println!("    first error: {err}");
    }
    if o.closes.is_empty() {
        println!("    the agent saw no connection");
        return;
    }
    let header = ["id", "pod", "path", "from", "original dst", "endpoint (pod)", "sent", "recv", "close"];
    let rows: Vec<Vec<String>> = o.closes.iter().map(row).collect();
    print_table(&header, &rows, "    ");
}

/// One connection record as a table row.
fn row(c: &Close) -> Vec<String> {
    let (path, endpoint) = if c.outbound() {
        let pod = c.endpoint_pod.as_deref().unwrap_or("outside the mesh");
        ("redirected outbound", format!("{} ({pod})", c.endpoint.as_deref().unwrap_or("?")))
    } else {
        ("steered inbound", format!("app on loopback :{}", port_of(&c.orig_dst)))
    };
    let from = match (&c.src_pod, c.outbound()) {
        (Some(p), false) => format!("{} ({p})", c.src),
        (None, false) => format!("{} (outside the mesh)", c.src),
        _ => format!("{} (app socket)", c.src),
    };
    vec![
        c.id.to_string(),
        c.pod.clone(),
        path.to_owned(),
        from,
        c.orig_dst.clone(),
        endpoint,
        c.bytes_sent.to_string(),
        c.bytes_received.to_string(),
        format!("{} ({:.1} ms, {})", c.close_reason, c.duration_ms, security(&c.security)),
    ]
}

fn security(s: &str) -> &str {
    if s == "none" { "plaintext" } else { s }
}

/// The port of an "ip:port" or "[ip]:port" string.
fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>], indent: &str) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{indent}{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Outbound records per endpoint pod.
fn per_endpoint(closes: &[Close]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in closes.iter().filter(|c| c.outbound()) {
        *counts.entry(c.endpoint_pod.clone().unwrap_or_default()).or_default() += 1;
    }
    counts
}

fn print_summary(s: &Scenario, outcomes: &[Outcome]) {
    println!("\nSummary");
    for (o, family) in [(&outcomes[0], "IPv4"), (&outcomes[1], "IPv6")] {
        let counts: Vec<String> = per_endpoint(&o.closes).iter().map(|(p, n)| format!("{p}: {n}")).collect();
        println!(
            "  {family} VIP: proxied connections per endpoint of {}: {}",
            service_name(),
            counts.join(", ")
        );
    }
    let direct = &outcomes[2];
    let out: Vec<&Close> = direct.closes.iter().filter(|c| c.outbound()).collect();
    if let Some(c) = out.first() {
        println!(
            "  pod address: redirected to the in-pod listener, forwarded unchanged to {} ({})",
            c.endpoint.as_deref().unwrap_or("?"),
            c.endpoint_pod.as_deref().unwrap_or("?")
        );
    }
    let o = &outcomes[3];
    println!(
        "  outsider (not enrolled): its socket connected from its own address {} (no redirect, no \
         outbound record); {} inbound record(s) at the enrolled server",
        o.report.local_addrs.first().map(String::as_str).unwrap_or("?"),
        o.closes.iter().filter(|c| !c.outbound() && c.pod == pod_key(&s.servers[0])).count()
    );
    let vip = &outcomes[4].report;
    println!(
        "  outsider -> VIP: {} of 1 connected (a VIP only exists inside the mesh): {}",
        vip.ok,
        vip.errors.first().map(String::as_str).unwrap_or("")
    );
    let all: Vec<&Close> = outcomes.iter().flat_map(|o| &o.closes).collect();
    let sent: u64 = all.iter().filter(|c| c.outbound()).map(|c| c.bytes_sent).sum();
    let received: u64 = all.iter().filter(|c| c.outbound()).map(|c| c.bytes_received).sum();
    println!(
        "  the agent proxied {} connection records ({} outbound, {} inbound); \
         outbound bytes {sent} sent, {received} received",
        all.len(),
        all.iter().filter(|c| c.outbound()).count(),
        all.iter().filter(|c| !c.outbound()).count()
    );
}

fn service_name() -> String {
    format!("{}/{SERVICE}", ferry_tests::scenario::NAMESPACE)
}

/// Checks every step shares: the app's result, the number of records, clean closes and byte
/// counts; `n` is the step's number in the report.
fn check_step(checks: &mut Checks, n: usize, step: &Step, o: &Outcome) {
    let r = &o.report;
    let conns = step.conns as u64;
    if step.expect_ok {
        checks.check(
            r.ok == conns && r.failed == 0 && r.bytes_echoed == conns * BYTES as u64,
            format!("[{n}] all {conns} connection(s) ok, {BYTES} bytes each echoed intact"),
        );
    } else {
        checks.check(r.ok == 0 && r.failed == conns, format!("[{n}] the connection fails, as it should"));
    }
    let outbound = o.closes.iter().filter(|c| c.outbound()).count();
    let inbound = o.closes.len() - outbound;
    let (want_out, want_in) = step.expect_closes;
    checks.check(
        (outbound, inbound) == (want_out, want_in),
        format!(
            "[{n}] {outbound} outbound and {inbound} inbound records ({want_out} and {want_in} expected)"
        ),
    );
    if !o.closes.is_empty() {
        let clean = o.closes.iter().all(|c| c.close_reason == "eof" && c.bytes_sent == BYTES as u64);
        let replies = o.closes.iter().all(|c| c.bytes_received > BYTES as u64);
        checks.check(
            clean && replies,
            format!("[{n}] every record: eof, {BYTES} bytes sent, the echo plus trailer received"),
        );
    }
    if step.expect_ok && want_out > 0 {
        let loopback = r.local_addrs.iter().all(|a| a.starts_with("127.0.0.1:") || a.starts_with("[::1]:"));
        checks.check(loopback, format!("[{n}] the app's sockets were redirected to the in-pod listener"));
    }
}

/// The VIP step: service named, endpoints of the right family, both endpoints used, app agrees.
fn check_vip(checks: &mut Checks, s: &Scenario, o: &Outcome, family: &str) {
    let v6 = family == "IPv6";
    let n = if v6 { 2 } else { 1 };
    let vip = service_addr(v6).to_string();
    let out: Vec<&Close> = o.closes.iter().filter(|c| c.outbound()).collect();
    checks.check(
        out.iter().all(|c| c.service.as_deref() == Some(service_name().as_str()) && c.orig_dst == vip),
        format!(
            "[{n}] {family} VIP: every record names service {} and original destination {vip}",
            service_name()
        ),
    );
    let right_family = out.iter().all(|c| c.endpoint.as_deref().is_some_and(|e| e.starts_with('[') == v6));
    checks
        .check(right_family, format!("[{n}] {family} VIP: the chosen endpoints are {family} pod addresses"));
    let counts = per_endpoint(&o.closes);
    let both = s.servers.iter().all(|p| counts.get(&pod_key(p)).is_some_and(|&n| n > 0));
    checks.check(both, format!("[{n}] {family} VIP: both endpoints used ({counts:?})"));
    let agree = s.servers.iter().all(|p| {
        counts.get(&pod_key(p)).copied().unwrap_or(0) as u64
            == o.report.tags.get(p.name()).copied().unwrap_or(0)
    });
    checks.check(
        agree,
        format!("[{n}] {family} VIP: the servers that answered are the endpoints the proxy chose"),
    );
    let inbound_from_client = o
        .closes
        .iter()
        .filter(|c| !c.outbound())
        .all(|c| c.src_pod.as_deref() == Some(pod_key(&s.client).as_str()));
    checks.check(
        inbound_from_client,
        format!("[{n}] {family} VIP: each server's inbound hop saw the client pod"),
    );
}

/// The pod-address step: not a service, forwarded to the address that was dialled.
fn check_pod_address(checks: &mut Checks, s: &Scenario, o: &Outcome) {
    let ok = o.closes.iter().filter(|c| c.outbound()).all(|c| {
        c.service.is_none()
            && c.endpoint.as_deref() == Some(c.orig_dst.as_str())
            && c.endpoint_pod.as_deref() == Some(pod_key(&s.servers[1]).as_str())
    });
    checks.check(ok, "[3] forwarded unchanged to server-2's address, no service involved");
}

/// The outsider step: not redirected, seen inbound with its own address.
fn check_outsider(checks: &mut Checks, s: &Scenario, o: &Outcome, events: &[Value]) {
    let own = format!("[{}]:", s.outsider.ipv6());
    let local = o.report.local_addrs.first().cloned().unwrap_or_default();
    checks.check(
        local.starts_with(&own),
        format!("[4] the outsider's socket used its own address ({local}): not redirected"),
    );
    let key = pod_key(&s.outsider);
    checks.check(
        events.iter().all(|e| e["pod"] != key.as_str()),
        "[4] the agent has no record for the unenrolled pod itself",
    );
    let inbound = o.closes.iter().find(|c| !c.outbound());
    checks.check(
        inbound.is_some_and(|c| c.src == local && c.src_pod.is_none() && c.pod == pod_key(&s.servers[0])),
        "[4] server-1's inbound hop saw the outsider's real address, outside the mesh",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(id: u64, direction: &str, endpoint_pod: Option<&str>) -> Close {
        serde_json::from_value(serde_json::json!({
            "event": "conn_close", "id": id, "direction": direction, "pod": "demo/client",
            "src": "127.0.0.1:4000", "orig_dst": "[fd00:96::10]:80", "service": "demo/echo",
            "endpoint": "[fd00:233:1::3]:8080", "endpoint_pod": endpoint_pod, "bytes_sent": 10,
            "bytes_received": 70, "duration_ms": 1.5, "close_reason": "eof", "security": "none",
        }))
        .unwrap()
    }

    #[test]
    fn counts_outbound_records_per_endpoint() {
        let closes = [
            close(1, "outbound", Some("demo/server-1")),
            close(2, "inbound", None),
            close(3, "outbound", Some("demo/server-2")),
            close(4, "outbound", Some("demo/server-1")),
        ];
        let counts = per_endpoint(&closes);
        assert_eq!(counts.get("demo/server-1"), Some(&2));
        assert_eq!(counts.get("demo/server-2"), Some(&1));
        assert_eq!(counts.len(), 2, "inbound records are not endpoint choices: {counts:?}");
    }

    #[test]
    fn rows_say_redirected_or_steered() {
        let out = row(&close(7, "outbound", Some("demo/server-1")));
        assert_eq!(out[2], "redirected outbound");
        assert_eq!(out[5], "[fd00:233:1::3]:8080 (demo/server-1)");
        assert_eq!(out[8], "eof (1.5 ms, plaintext)");
        let inb = row(&close(8, "inbound", None));
        assert_eq!(inb[2], "steered inbound");
        assert_eq!(inb[3], "127.0.0.1:4000 (outside the mesh)");
        assert_eq!(inb[5], "app on loopback :80");
    }

    #[test]
    fn port_of_handles_both_families() {
        assert_eq!(port_of("10.233.1.3:8080"), "8080");
        assert_eq!(port_of("[fd00:233:1::3]:8080"), "8080");
    }
}
