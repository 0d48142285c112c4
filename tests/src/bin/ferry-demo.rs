//! `ferry-demo`: Ferry on a simulated node, with a readable account of every connection.
//!
//! It builds the shared scenario (a client pod and two server pods behind one service VIP, all
//! enrolled, and one pod outside the mesh), starts the agent, sends real traffic, and prints what
//! the agent reported for each connection: the pod, whether the connection was redirected on its
//! way out or steered on its way in, the original destination, the chosen endpoint, bytes each way
//! and how it closed. A last scene adds an Istio AuthorizationPolicy while the agent runs (it
//! hot-reloads it), shows one connection allowed and one denied and how `ferry policies` and
//! `ferry trace` explain it, then removes the policy again. An HTTP scene follows: requests on one
//! keep-alive connection are decided one by one by an L7 policy (paths, normalized as Istio does),
//! a denied one gets 403 `RBAC: access denied` and the next still succeeds, and the access log has
//! a line per request. It then checks its own results and
//! exits non-zero if any check fails. Needs root (run it with `cargo xtask demo`); everything is
//! torn down on exit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ferry_tests::control::{ferry, next_reload};
use ferry_tests::policy_dir::PolicyDir;
use ferry_tests::scenario::{
    NAMESPACE, SERVER_PORT, SERVICE, ScenarioPods, connect, echo_service, pod_key, service_addr, sock,
    wait_events,
};
use ferry_tests::testapp::{self, ConnectOpts, ConnectReport};
use ferry_tests::{Agent, ChildGuard, MeshFile, Pod, SimNode};
use serde::Deserialize;
use serde_json::Value;

/// Payload bytes per connection.
const BYTES: usize = 4096;
/// How long VIP connections stay open together, so the balancer sees them as concurrent load.
const HOLD_MS: u64 = 300;
/// Where server-1 also runs an HTTP server (undeclared: the agent detects HTTP).
const HTTP_PORT: u16 = 8081;

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

/// The shared scenario's node and pods (the echo servers labelled app=echo), with the agent
/// started on a mesh file that also names a policy directory, empty at first, so that policies
/// can come and go while it runs. Fields drop in order: the agent, the policies, the servers, the
/// node.
struct Demo {
    agent: Agent,
    policies: PolicyDir,
    client: Pod,
    servers: Vec<Pod>,
    outsider: Pod,
    _servers: Vec<ChildGuard>,
    _http: ChildGuard,
    node: SimNode,
}

impl Demo {
    fn start(name: &str) -> Result<Self> {
        let pods = ScenarioPods::start(name)?;
        let policies = PolicyDir::new()?;
        let mut mesh = MeshFile::new("node-a");
        mesh.policies(policies.path()).pod(&pods.client, NAMESPACE, "client");
        for server in &pods.servers {
            mesh.pod(server, NAMESPACE, SERVICE).labels(&[("app", "echo")]);
        }
        let agent =
            Agent::start(&pods.node, &echo_service(&mut mesh).to_toml()).context("starting the agent")?;
        let ScenarioPods { client, servers, outsider, server_guards, node } = pods;
        let http = testapp::serve_http(&servers[0], HTTP_PORT, "server-1-http")?;
        Ok(Self { agent, policies, client, servers, outsider, _servers: server_guards, _http: http, node })
    }
}

fn run() -> Result<Checks> {
    println!("ferry-demo: building a simulated node and starting the agent...");
    let s = Demo::start("demo").context("cannot start the demo scenario")?;
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

    policy_scene(&mut checks, &s)?;
    http_scene(&mut checks, &s)?;

    let s = restart_scene(&mut checks, s)?;

    println!("\nStopping the agent (SIGTERM), then `ferry uninstall`, and tearing the node down...");
    let Demo { agent, node, .. } = s;
    match agent.stop() {
        Ok(status) => checks.check(status.success(), format!("the agent exited cleanly ({status})")),
        Err(e) => checks.check(false, format!("the agent stopped: {e:#}")),
    }
    let pinned = agent.pins().join("v1").join("pods").read_dir().map(|d| d.count()).unwrap_or(0);
    checks.check(
        pinned == 3,
        format!("SIGTERM left the pinned datapath: links of {pinned} pods stay, the pods fail closed"),
    );
    match agent.uninstall(&node) {
        Ok(said) => {
            println!("  ferry uninstall: {}", said.trim());
            checks.check(!agent.pins().exists(), "ferry uninstall removed every pin: the pods talk directly");
        }
        Err(e) => checks.check(false, format!("ferry uninstall: {e:#}")),
    }
    drop(node);
    Ok(checks)
}

/// An upgrade by handoff while a connection is open: a new agent takes the old one's listeners,
/// the open plaintext connection moves to it, and the old one exits.
fn restart_scene(checks: &mut Checks, mut s: Demo) -> Result<Demo> {
    println!("\nUpgrade by handoff: a second `ferry run` takes over while a connection is open");
    let target = sock(s.servers[0].ipv4().into(), SERVER_PORT);
    let opts = ConnectOpts { bytes: 1024, ..Default::default() };
    let held = testapp::connect_held(&s.client, &target, &opts)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let next = s.agent.start_successor(&s.node).context("starting the new agent")?;
    let handed = s.agent.wait_for_event(|e| e["event"] == "handed_over", std::time::Duration::from_secs(30));
    match &handed {
        Ok(e) => println!(
            "  the old agent handed over {} relay(s) in {:.1} ms",
            e["relays"],
            e["handoff_ms"].as_f64().unwrap_or(0.0)
        ),
        Err(e) => println!("  no handover: {e:#}"),
    }
    checks.check(handed.is_ok(), "the old agent handed its listeners and relays to the new one");
    let report = held.release()?;
    checks.check(
        report.ok == 1,
        format!("the connection opened before the upgrade finished intact: {report:?}"),
    );
    let old = std::mem::replace(&mut s.agent, next);
    let exited = old.wait_exit(std::time::Duration::from_secs(30));
    checks.check(exited.is_ok_and(|st| st.success()), "the old agent exited once nothing was left");
    let after = connect(&s.client, &target, &["--bytes", "64"])?;
    checks.check(after["ok"] == 1, "new connections go through the new agent");
    Ok(s)
}

/// Prints the node's pods and what the agent enrolled.
fn print_node(s: &Demo) {
    println!("\nNode {} (pods on bridge br0, agent pid {})", s.node.name(), s.agent.pid());
    let enrolled: BTreeSet<String> = s
        .agent
        .events()
        .iter()
        .filter(|e| e["event"] == "enrolled")
        .filter_map(|e| e["pod"].as_str().map(str::to_owned))
        .collect();
    let mut pods = vec![(&s.client, "client")];
    pods.extend(s.servers.iter().map(|p| (p, "echo server (app=echo), endpoint of demo/echo")));
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
        // Transparent inbound: the app is dialled at the address the client used, from the client.
        ("steered inbound", format!("app at {}", c.orig_dst))
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

fn print_summary(s: &Demo, outcomes: &[Outcome]) {
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
    format!("{NAMESPACE}/{SERVICE}")
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
        let named = r.peer_addrs.iter().all(|p| *p == step.to.to_string());
        checks.check(
            named && r.peer_addrs.len() == r.ok as usize,
            format!("[{n}] yet getpeername() names {} to the app, as without the mesh", step.to),
        );
    }
}

/// The VIP step: service named, endpoints of the right family, both endpoints used, app agrees.
fn check_vip(checks: &mut Checks, s: &Demo, o: &Outcome, family: &str) {
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
fn check_pod_address(checks: &mut Checks, s: &Demo, o: &Outcome) {
    let ok = o.closes.iter().filter(|c| c.outbound()).all(|c| {
        c.service.is_none()
            && c.endpoint.as_deref() == Some(c.orig_dst.as_str())
            && c.endpoint_pod.as_deref() == Some(pod_key(&s.servers[1]).as_str())
    });
    checks.check(ok, "[3] forwarded unchanged to server-2's address, no service involved");
}

/// The outsider step: not redirected, seen inbound with its own address.
fn check_outsider(checks: &mut Checks, s: &Demo, o: &Outcome, events: &[Value]) {
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
    let seen = o.report.peers_seen_by_server.first().cloned().unwrap_or_default();
    checks.check(
        seen.starts_with(&own),
        format!("[4] and so did server-1's app ({seen}): transparent inbound, not the proxy on loopback"),
    );
}

/// The policy file of the last scene.
const POLICY_FILE: &str = "deny-outsider.yaml";

/// An Istio AuthorizationPolicy as Istio's documentation writes one: DENY the outsider's two
/// addresses (plaintext has no identity to match, its source address it has) to the echo servers.
fn deny_outsider(outsider: &Pod) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-outsider
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["{}/32", "{}/128"]
"#,
        outsider.ipv4(),
        outsider.ipv6()
    )
}

/// One connection of the policy scene: what the app saw, and the destination's inbound record of
/// it (`conn_close` when relayed, `conn_refused` when denied).
struct Probe {
    report: ConnectReport,
    record: Value,
}

impl Probe {
    fn allowed(&self) -> bool {
        self.report.ok == 1
            && self.record["event"] == "conn_close"
            && self.record["policy_decision"] == "allow"
    }

    fn denied_by(&self, policy: &str) -> bool {
        self.report.ok == 0
            && self.record["event"] == "conn_refused"
            && self.record["policy_decision"] == "deny"
            && self.record["policy"] == policy
            && self.record["policy_rule"] == 0
    }
}

/// The last scene: a DENY for the outsider is written while the agent runs, which hot-reloads it;
/// the client still reaches server-1, the outsider is refused, `ferry policies` and `ferry trace`
/// explain it; then the file is removed and the outsider gets through again.
fn policy_scene(checks: &mut Checks, s: &Demo) -> Result<()> {
    println!("\n[6] Authorization policy, hot-reloaded: deny the outsider by its addresses");
    let yaml = deny_outsider(&s.outsider);
    let path = s.policies.path().join(POLICY_FILE);
    println!("    writing {}:", path.display());
    print_indented(&yaml, "      ");
    let reload = next_reload(&s.agent, || s.policies.write(POLICY_FILE, &yaml))?;
    check_reload(checks, &reload, 1, "the agent hot-reloaded the policy directory");

    let server1 = SocketAddr::new(s.servers[0].ipv4().into(), SERVER_PORT);
    let client = probe(&s.agent, &s.client, server1)?;
    let outsider = probe(&s.agent, &s.outsider, server1)?;
    checks.check(client.allowed(), "[6] client -> server-1 still allowed (no policy denies it), echo intact");
    checks.check(
        outsider.denied_by("demo/deny-outsider"),
        "[6] outsider -> server-1 refused by the agent (conn_refused), by policy demo/deny-outsider rule 0",
    );

    let outsider_ip = s.outsider.ipv4().to_string();
    let dest = format!("{}:{SERVER_PORT}", pod_key(&s.servers[0]));
    // The trace in YAML: its table form stops at "Captured: no" for a source given as an address.
    for args in [vec!["policies"], vec!["trace", &outsider_ip, &dest, "-o", "yaml"]] {
        println!("\n    $ ferry {}", args.join(" "));
        print_indented(&ferry(&s.agent, &args)?, "      ");
    }
    let json = |args: &[&str]| -> Result<Value> {
        let out = ferry(&s.agent, &[args, &["-o", "json"]].concat())?;
        serde_json::from_str(&out).with_context(|| format!("ferry {args:?} printed {out:?}"))
    };
    let listed = json(&["policies"])?;
    checks.check(
        listed.as_array().is_some_and(|l| l.len() == 1)
            && listed[0]["name"] == "deny-outsider"
            && listed[0]["workloads"] == serde_json::json!(["demo/server-1", "demo/server-2"])
            && listed[0]["rules"] == serde_json::json!([{ "index": 0, "enforcement": "L4" }]),
        "[6] ferry policies: demo/deny-outsider selects server-1 and server-2, its rule enforced at L4",
    );
    let trace = json(&["trace", &outsider_ip, &dest])?;
    checks.check(
        trace["decision"] == "deny" && trace["policy"] == "demo/deny-outsider" && trace["rule"] == 0,
        "[6] ferry trace: the outsider is denied by demo/deny-outsider rule 0, as enforced",
    );

    println!("\n    removing {POLICY_FILE}");
    let reload = next_reload(&s.agent, || std::fs::remove_file(&path).context("removing the policy"))?;
    check_reload(checks, &reload, 0, "the agent reloaded without the file");
    let again = probe(&s.agent, &s.outsider, server1)?;
    checks.check(again.allowed(), "[6] outsider -> server-1 gets through again");
    Ok(())
}

/// Prints the agent's reload outcome `reload` and checks that it is a `reloaded` with `want`
/// policies in force.
fn check_reload(checks: &mut Checks, reload: &Value, want: u64, what: &str) {
    let (event, policies) = (reload["event"].as_str().unwrap_or("?"), &reload["report"]["policies"]);
    println!("    agent: {event}, policies in force: {policies}");
    checks.check(event == "reloaded" && *policies == want, format!("[6] {what}: policies in force: {want}"));
}

/// Connects once from `from` to `to`, waits for the destination's inbound record of it, and
/// prints both.
fn probe(agent: &Agent, from: &Pod, to: SocketAddr) -> Result<Probe> {
    let ours = |e: &Value| {
        let src = e["src"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()).map(|a| a.ip().to_canonical());
        (e["event"] == "conn_close" || e["event"] == "conn_refused")
            && e["direction"] == "inbound"
            && e["orig_dst"] == to.to_string()
            && src.is_some_and(|ip| ip == IpAddr::from(from.ipv4()) || ip == IpAddr::from(from.ipv6()))
    };
    let before = agent.events().iter().filter(|e| ours(e)).count();
    let opts = ConnectOpts { bytes: BYTES, timeout_ms: 2_000, ..ConnectOpts::default() };
    let report = testapp::connect(from, to, &opts).with_context(|| format!("{} -> {to}", from.name()))?;
    let record = wait_events(agent, before + 1, ours)
        .get(before)
        .cloned()
        .with_context(|| format!("the agent recorded nothing of {} -> {to}", from.name()))?;
    let error = report.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
    println!(
        "\n    {} -> server-1 at {to}: app {} ok, {} failed{error}",
        from.name(),
        report.ok,
        report.failed
    );
    println!("      agent: {}", decision_text(&record));
    Ok(Probe { report, record })
}

/// An inbound record's decision in words.
fn decision_text(e: &Value) -> String {
    let decision = e["policy_decision"].as_str().unwrap_or("no decision");
    let by = match e["policy"].as_str() {
        Some(policy) => format!("by policy {policy} rule {}", e["policy_rule"]),
        None => "no policy decided it".to_owned(),
    };
    let what = if e["event"] == "conn_refused" {
        format!("refused before the app was dialled: {}", e["reason"].as_str().unwrap_or("?"))
    } else {
        format!("relayed to the app, closed {}", e["close_reason"].as_str().unwrap_or("?"))
    };
    format!("{decision} ({by}); {what}")
}

/// The HTTP scene's policy: DENY /admin paths to the echo servers, for every source.
const DENY_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
"#;

/// The HTTP scene: an L7 DENY is hot-reloaded; the outsider sends four requests on one keep-alive
/// connection to server-1's HTTP port, which the agent detects as HTTP and decides one by one.
fn http_scene(checks: &mut Checks, s: &Demo) -> Result<()> {
    println!("\n[7] HTTP in the node proxy: an L7 policy decides each request of one connection");
    print_indented(DENY_ADMIN, "      ");
    let reload = next_reload(&s.agent, || s.policies.write("deny-admin.yaml", DENY_ADMIN))?;
    check_reload(checks, &reload, 1, "the agent hot-reloaded the L7 policy");
    let to = SocketAddr::new(s.servers[0].ipv4().into(), HTTP_PORT);
    let paths = ["/public", "/admin/users", "/public/../admin", "/public?again=1"];
    let answers = ferry_tests::netns::in_netns(s.outsider.netns_path(), || keep_alive_gets(to, &paths))??;
    for (path, (status, body)) in paths.iter().zip(&answers) {
        println!(
            "    GET {path:<20} -> {status} {}",
            if *status == 200 { "(from the app)".into() } else { format!("{body:?}") }
        );
    }
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    checks.check(statuses == [200, 403, 403, 200], "[7] GET /public 200, /admin/users 403, /public/../admin 403 (normalized), /public 200 again, on one connection");
    checks.check(
        answers.iter().filter(|(status, _)| *status == 403).all(|(_, body)| body == "RBAC: access denied"),
        "[7] a denied request gets Istio's answer: 403 RBAC: access denied",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let lines: Vec<Value> = s.agent.access_log().into_iter().filter(|l| l["kind"] == "request").collect();
        if lines.len() >= paths.len() || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("    access log:");
    for l in &lines {
        println!(
            "      {} {} {} -> {} ({}{})",
            l["method"].as_str().unwrap_or("?"),
            l["authority"].as_str().unwrap_or("?"),
            l["path"].as_str().unwrap_or("?"),
            l["status"],
            l["policy_decision"].as_str().unwrap_or("?"),
            l["policy"].as_str().map(|p| format!(" by {p}")).unwrap_or_default(),
        );
    }
    let denied = lines.iter().filter(|l| l["status"] == 403 && l["policy"] == "demo/deny-admin").count();
    checks.check(
        lines.len() == paths.len() && denied == 2,
        format!(
            "[7] the access log has one line per request ({} of {}), the two 403s by demo/deny-admin",
            lines.len(),
            paths.len()
        ),
    );
    let reload = next_reload(&s.agent, || {
        std::fs::remove_file(s.policies.path().join("deny-admin.yaml")).context("removing the policy")
    })?;
    check_reload(checks, &reload, 0, "the agent reloaded without the L7 policy");
    Ok(())
}

/// Sends `GET` for each of `paths` on one keep-alive connection to `to`; each answer's status and
/// body (bodies are read by their Content-Length).
fn keep_alive_gets(to: SocketAddr, paths: &[&str]) -> Result<Vec<(u16, String)>> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).context("connecting")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut answers = Vec::new();
    for path in paths {
        write!(writer, "GET {path} HTTP/1.1\r\nHost: server-1.demo\r\n\r\n")?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().context("content-length")?;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        answers.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    Ok(answers)
}

/// Prints `text` line by line after `indent`.
fn print_indented(text: &str, indent: &str) {
    for line in text.lines() {
        println!("{indent}{line}");
    }
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
        assert_eq!(inb[5], "app at [fd00:96::10]:80");
    }
}
