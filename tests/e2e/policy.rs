//! Istio AuthorizationPolicy enforcement, end to end: two nodes with mutual TLS, the policies in a
//! directory both agents read (`policies = [DIR]` in their mesh files), and every decision checked
//! where it is made, at the destination's agent: what the apps saw, the connection records, the
//! metrics and the CLI.

mod common;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use common::*;
use ferry_tests::control::{ferry, next_reload};
use ferry_tests::counting_server::CountingServer;
use ferry_tests::netns::in_netns;
use ferry_tests::policy_dir::PolicyDir;
use ferry_tests::testapp::{self, ConnectOpts};
use ferry_tests::{Agent, ChildGuard, MeshFile, NodeLink, Pod, SimNode, link_nodes};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const OTHER_ID: &str = "spiffe://cluster.local/ns/demo/sa/other";
const STRANGER_ID: &str = "spiffe://cluster.local/ns/other-ns/sa/stranger";
/// Where the server runs `ferry-testapp serve`.
const ECHO_PORT: u16 = SERVER_PORT;
/// Where the server runs a [`CountingServer`], to show what its app accepted.
const COUNTED_PORT: u16 = 9090;
/// outsider-1's address: node-b's pods get 10.233.2.2 (server), .3 and .4 in the order they are added.
const OUTSIDER_1: &str = "10.233.2.3";
/// outsider-1's IPv6 address (fd00:233:2::2 is the server's).
const OUTSIDER_1_V6: &str = "fd00:233:2::3";
/// What [`exchange`] sends.
const MESSAGE: &[u8] = b"ferry policy probe";
/// How long a held [`exchange`] waits for its connection to end.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

// ---- Policies, as Istio's documentation writes them.

/// ALLOW the client's principal to the echo workload's app ports (never the tunnel's port).
const ALLOW_CLIENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
    to:
    - operation:
        ports: ["8080", "9090"]
"#;

/// DENY every source of namespace other-ns to the echo workload.
const DENY_OTHER_NS: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-other-ns
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["other-ns"]
"#;

/// Istio's mesh-wide "allow nothing": an ALLOW without rules in the root namespace.
const ALLOW_NOTHING: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: ferry-system
spec:
  {}
"#;

/// DENY the client's principal, for every workload of namespace demo.
const DENY_CLIENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client
  namespace: demo
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
"#;

/// AUDIT the client's connections to the echo workload: logged, never deciding.
const AUDIT_CLIENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-client
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: AUDIT
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
"#;

/// ALLOW `other`'s GET requests to the echo workload: an HTTP field, which plain TCP lacks.
const ALLOW_OTHER_GET: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-other-get
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/other"]
    to:
    - operation:
        methods: ["GET"]
"#;

/// DENY requests for /admin paths on the counted port: its L4 part (the port) decides on TCP.
const DENY_ADMIN_PATH: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin-path
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["9090"]
        paths: ["/admin", "/admin/*"]
"#;

// ---- The topology.

/// Where [`Mesh`]'s server runs, and so which agent decides its inbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// On node-b: the mesh clients reach it through the HBONE tunnel; node-b's agent decides.
    Remote,
    /// On node-a with the mesh clients, whose agent has `[datapath] local_shortcut = true`: it
    /// joins them over the node-local shortcut and decides.
    Local,
}

/// Two linked nodes with one CA. node-a: `client` (namespace demo, service account client),
/// `other` (demo, other) and `stranger` (other-ns, stranger). node-b (or node-a, see [`At`]):
/// `server` (demo, echo, labels app=echo, PERMISSIVE) with `ferry-testapp serve` on [`ECHO_PORT`]
/// and a [`CountingServer`] on [`COUNTED_PORT`]. node-b: two `outsiders` that are not in the
/// mesh. Fields drop in order: the agents first, the nodes last.
struct Mesh {
    a: Agent,
    b: Agent,
    at: At,
    /// node-a's mesh file, to change it.
    mesh_a: MeshFile,
    client: Pod,
    other: Pod,
    stranger: Pod,
    server: Pod,
    outsiders: Vec<Pod>,
    counted: CountingServer,
    policies: PolicyDir,
    _ca: tempfile::TempDir,
    _echo: ChildGuard,
    _link: NodeLink,
    node_a: SimNode,
    node_b: SimNode,
}

impl Mesh {
    /// [`Mesh::start_at`] with the server on node-b.
    fn start(name: &str, policies: &[(&str, &str)]) -> Result<Self> {
        Self::start_at(name, At::Remote, policies)
    }

    /// Builds the nodes with the server where `at` says, writes `policies` (file name, YAML) into
    /// the policy directory, starts the servers and then both agents.
    fn start_at(name: &str, at: At, policies: &[(&str, &str)]) -> Result<Self> {
        let mut node_a = SimNode::new(&format!("{name}a"), 1)?;
        let mut node_b = SimNode::new(&format!("{name}b"), 2)?;
        let link = link_nodes(&node_a, &node_b)?;
        let client = node_a.add_pod("client")?;
        let other = node_a.add_pod("other")?;
        let stranger = node_a.add_pod("stranger")?;
        let (server, server_node) = match at {
            At::Remote => (node_b.add_pod("server")?, "node-b"),
            At::Local => (node_a.add_pod("server")?, "node-a"),
        };
        let outsiders = vec![node_b.add_pod("outsider-1")?, node_b.add_pod("outsider-2")?];
        if at == At::Remote {
            let (v4, v6) = (outsiders[0].ipv4().to_string(), outsiders[0].ipv6().to_string());
            ensure!((v4.as_str(), v6.as_str()) == (OUTSIDER_1, OUTSIDER_1_V6), "outsider-1 is at {v4}, {v6}");
        }
        let echo = serve(&server, ECHO_PORT, "server")?;
        let counted = CountingServer::start(&server, COUNTED_PORT, "counted")?;
        let dir = PolicyDir::with_files(policies)?;
        let ca = ferry_tests::ca::make_ca("cluster.local", &["node-a", "node-b"])?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), None).policies(dir.path());
            if at == At::Local {
                mesh.local_shortcut(true);
            }
            mesh.pod(&client, "demo", "client").node("node-a");
            mesh.pod(&other, "demo", "other").node("node-a");
            mesh.pod(&stranger, "other-ns", "stranger").node("node-a");
            mesh.pod(&server, "demo", "echo").node(server_node).mode("permissive").labels(&[("app", "echo")]);
            mesh
        };
        let agent = |node: &SimNode, mesh: &MeshFile| {
            Agent::start(node, &mesh.to_toml()).with_context(|| format!("agent on {}", node.name()))
        };
        let mesh_a = mesh_for("node-a");
        Ok(Self {
            a: agent(&node_a, &mesh_a)?,
            b: agent(&node_b, &mesh_for("node-b"))?,
            at,
            mesh_a,
            client,
            other,
            stranger,
            server,
            outsiders,
            counted,
            policies: dir,
            _ca: ca,
            _echo: echo,
            _link: link,
            node_a,
            node_b,
        })
    }

    /// The agent that decides the server's inbound connections, and its node.
    fn dest(&self) -> (&Agent, &SimNode) {
        match self.at {
            At::Remote => (&self.b, &self.node_b),
            At::Local => (&self.a, &self.node_a),
        }
    }

    /// The server's IPv4 address with `port`.
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), port)
    }

    /// The server's IPv6 address with `port`.
    fn addr_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv6().into(), port)
    }

    /// Writes policy `file` and returns the deciding agent's next reload outcome (`reloaded` or
    /// `reload_rejected`).
    fn apply(&self, file: &str, yaml: &str) -> Value {
        next_reload(self.dest().0, || self.policies.write(file, yaml))
            .unwrap_or_else(|e| panic!("applying {file}: {e:#}"))
    }

    /// Turns node-a's node-local shortcut on or off by rewriting its mesh file (a hot reload).
    fn set_local_shortcut(&self, on: bool) {
        let mut mesh = self.mesh_a.clone();
        mesh.local_shortcut(on);
        let reload = next_reload(&self.a, || self.a.write_mesh(&mesh.to_toml())).unwrap();
        assert_eq!(reload["event"], "reloaded", "{reload}");
    }

    /// The `n`-th (from 1) inbound `kind` record on the deciding agent of a connection from `from`.
    fn record(&self, kind: &str, from: &Pod, n: usize) -> Value {
        let agent = self.dest().0;
        let pred = |e: &Value| e["event"] == kind && e["direction"] == "inbound" && comes_from(e, from);
        let found = wait_events(agent, n, pred);
        assert!(found.len() >= n, "no {kind} #{n} from {}: {:?}", from.name(), agent.events());
        found[n - 1].clone()
    }

    /// `ferry ARGS -o json` against the deciding agent.
    fn cli(&self, args: &[&str]) -> Value {
        let stdout = ferry(self.dest().0, &[args, &["-o", "json"]].concat()).unwrap();
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("ferry {args:?} printed bad JSON ({e}): {stdout}"))
    }

    /// `ferry trace SRC DEST -o json` against the deciding agent.
    fn trace(&self, src: &str, dest: &str) -> Value {
        self.cli(&["trace", src, dest])
    }

    /// Waits until the deciding agent counts `want` denials of the server with these extra labels.
    fn assert_denials(&self, labels: &[(&str, &str)], want: f64) {
        let mut wanted = vec![
            "reporter=\"destination\"".to_owned(),
            "destination_workload=\"server\"".to_owned(),
            "destination_workload_namespace=\"demo\"".to_owned(),
        ];
        wanted.extend(labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
        poll(|| {
            let lines = denial_series(self.dest().1);
            let value = lines
                .iter()
                .find(|l| wanted.iter().all(|w| l.contains(w.as_str())))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
            if value == Some(want) {
                Ok(())
            } else {
                Err(format!("want {want} for {wanted:?}, got {lines:?}"))
            }
        });
    }
}

/// Whether record `e` is of a connection from `pod`: by its source pod, else its source address
/// (either family).
fn comes_from(e: &Value, pod: &Pod) -> bool {
    let name = e["src_pod"].as_str().and_then(|p| p.split_once('/')).map(|(_, name)| name);
    let ip = e["src"].as_str().and_then(|s| s.parse::<SocketAddr>().ok()).map(|a| a.ip().to_canonical());
    name == Some(pod.name()) || ip == Some(pod.ipv4().into()) || ip == Some(pod.ipv6().into())
}

/// Retries `probe` until it succeeds, for up to [`EVENT_WAIT`]; panics with its last complaint.
fn poll<T>(mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => panic!("not within {EVENT_WAIT:?}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The `ferry_authorization_denials_total` lines of the agent's metrics in `node`'s netns.
fn denial_series(node: &SimNode) -> Vec<String> {
    let scrape = in_netns(node.netns_path(), || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:15020".parse().unwrap(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    });
    let text = scrape.expect("entering the node's netns").expect("scraping the agent's metrics");
    text.lines().filter(|l| l.starts_with("ferry_authorization_denials_total{")).map(str::to_owned).collect()
}

/// The first line of `agent`'s access log matching `pred` (waiting for it).
fn access_line(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Value {
    poll(|| {
        agent.access_log().into_iter().find(|l| pred(l)).ok_or_else(|| format!("{:?}", agent.access_log()))
    })
}

/// Asserts a record's authorization fields: the decision, the deciding policy and rule.
fn assert_decided(e: &Value, decision: &str, policy: Option<&str>, rule: Option<u64>) {
    assert_eq!(e["policy_decision"], decision, "{e}");
    assert_eq!(e["policy"], json!(policy), "{e}");
    assert_eq!(e["policy_rule"], json!(rule), "{e}");
    for key in ["dry_run", "audit"] {
        assert!(e.get(key).is_some(), "{key} missing in {e}");
    }
}

/// Asserts a refusal record: a denial whose reason says so, naming the policy when one decided.
fn assert_denied(e: &Value, policy: Option<&str>, rule: Option<u64>) {
    assert_decided(e, "deny", policy, rule);
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("denied"), "{e}");
    if let Some(policy) = policy {
        assert!(reason.contains(policy), "the reason names {policy}: {e}");
    }
}

// ---- Clients.

/// Runs `ferry-testapp connect` (1000 bytes) from `from` to `to`, which must be echoed intact.
fn assert_echoes(from: &Pod, to: SocketAddr) {
    let report = testapp::connect(from, to, &ConnectOpts { bytes: 1000, ..ConnectOpts::default() })
        .expect("testapp connect ran");
    assert_eq!((report.ok, report.failed), (1, 0), "{} -> {to} must get through: {report:?}", from.name());
}

/// How an [`exchange`] ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Ended {
    /// The peer closed (FIN).
    Eof,
    /// Reading failed, such as a reset.
    Error(String),
    /// Nothing ended it within [`HOLD_LIMIT`].
    Timeout,
    /// The connect itself failed.
    NoConnect(String),
}

/// What the client of an [`exchange`] saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Exchange {
    received: usize,
    ended: Ended,
}

/// From `from` (its netns and cgroup, so an enrolled pod's connect is captured): connects to
/// `to`, sends [`MESSAGE`], half-closes unless `hold`, and reads until the connection ends or
/// [`HOLD_LIMIT`] passes.
fn exchange(from: &Pod, to: SocketAddr, hold: bool) -> Exchange {
    from.run_in_cgroup_timeout(HOLD_LIMIT * 2, move || {
        let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => return Exchange { received: 0, ended: Ended::NoConnect(e.to_string()) },
        };
        // A refused connection may already be gone: what the reads see is the answer.
        let _ = s.set_read_timeout(Some(HOLD_LIMIT));
        let _ = s.write_all(MESSAGE);
        if !hold {
            let _ = s.shutdown(Shutdown::Write);
        }
        let (mut received, mut buf) = (0, [0u8; 4096]);
        let ended = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ended::Eof,
                Ok(n) => received += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break Ended::Timeout;
                }
                Err(e) => break Ended::Error(e.to_string()),
            }
        };
        Exchange { received, ended }
    })
    .expect("the forked client ran")
}

/// From `from` to `to`: the connection is accepted and then closed without a byte coming back.
fn assert_refused(from: &Pod, to: SocketAddr) {
    let x = exchange(from, to, false);
    assert!(matches!(x.ended, Ended::Eof | Ended::Error(_)), "{} -> {to}: {x:?}", from.name());
    assert_eq!(x.received, 0, "{} -> {to} must get nothing back: {x:?}", from.name());
}

/// The object of array `list` whose field `key` is `policy`.
fn entry<'a>(list: &'a Value, key: &str, policy: &str) -> &'a Value {
    let items = list.as_array().unwrap_or_else(|| panic!("not an array: {list:#}"));
    items.iter().find(|p| p[key] == policy).unwrap_or_else(|| panic!("no {policy} in {list:#}"))
}

/// Whether a JSON action names `want` (Istio writes ALLOW, DENY, AUDIT).
fn is_action(action: &Value, want: &str) -> bool {
    action.as_str().is_some_and(|a| a.eq_ignore_ascii_case(want))
}

// ---- The tests.

#[test]
fn allow_by_principal_across_nodes() {
    let t = Mesh::start("pprin", &[("allow.yaml", ALLOW_CLIENT)]).unwrap();
    let to = t.addr(ECHO_PORT);

    assert_echoes(&t.client, to);
    let allowed = t.record("conn_close", &t.client, 1);
    assert_eq!((&allowed["security"], &allowed["src_identity"]), (&"mutual_tls".into(), &CLIENT_ID.into()));
    assert_decided(&allowed, "allow", Some("demo/allow-client"), Some(0));
    assert!(allowed["dry_run"].is_null() && allowed["audit"].is_null(), "{allowed}");
    // The access log line of the same connection carries the decision too.
    let line = access_line(&t.b, |l| l["reporter"] == "destination" && l["source_workload"] == "client");
    assert_decided(&line, "allow", Some("demo/allow-client"), Some(0));
    // The source side records no decision: authorization happens at the destination.
    let out = wait_events(&t.a, 1, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    assert_eq!(out.len(), 1, "{:?}", t.a.events());
    assert_eq!(out[0].get("policy_decision"), Some(&Value::Null), "{}", out[0]);

    // Same namespace, another service account: its verified identity does not match.
    assert_refused(&t.other, to);
    let refused = t.record("conn_refused", &t.other, 1);
    assert_eq!(refused["src_identity"], OTHER_ID, "the principal comes from mTLS: {refused}");
    assert_denied(&refused, None, None);
    let failed = wait_events(&t.a, 1, |e| e["event"] == "conn_failed" && e["pod"] == "demo/other");
    assert_eq!(failed.len(), 1, "{:?}", t.a.events());
    assert!(failed[0]["reason"].as_str().unwrap_or_default().contains("403"), "{}", failed[0]);
}

#[test]
fn deny_by_namespace() {
    let t = Mesh::start("pns", &[("deny.yaml", DENY_OTHER_NS)]).unwrap();
    let to = t.addr(ECHO_PORT);

    assert_refused(&t.stranger, to);
    let refused = t.record("conn_refused", &t.stranger, 1);
    assert_eq!(refused["src_identity"], STRANGER_ID, "{refused}");
    assert_denied(&refused, Some("demo/deny-other-ns"), Some(0));
    t.assert_denials(&[("policy", "demo/deny-other-ns"), ("reason", "deny_policy")], 1.0);

    // A pod of another namespace: no DENY matches, and no ALLOW selects the server.
    assert_echoes(&t.client, to);
    let allowed = t.record("conn_close", &t.client, 1);
    assert_decided(&allowed, "allow", None, None);
}

#[test]
fn plaintext_into_permissive_pod_is_matched_by_ip_block() {
    assert_plaintext_matched_by_ip_block("pip", OUTSIDER_1.parse().unwrap());
}

#[test]
fn plaintext_over_ipv6_is_matched_by_ipv6_block() {
    assert_plaintext_matched_by_ip_block("pip6", OUTSIDER_1_V6.parse().unwrap());
}

/// With outsider-1 alone allowed by an ipBlock of its address `ip`: plaintext from it to the
/// server's address of that family gets in; the other outsider, and outsider-1 itself over the
/// other family (which the block does not cover), are refused before the app sees them.
fn assert_plaintext_matched_by_ip_block(name: &str, ip: IpAddr) {
    let prefix = if ip.is_ipv6() { 128 } else { 32 };
    let allow = format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-outsider-1
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["{ip}/{prefix}"]
"#
    );
    let t = Mesh::start(name, &[("allow.yaml", &allow)]).unwrap();
    let (inside, outside) = (&t.outsiders[0], &t.outsiders[1]);
    let (to, other_family) = if ip.is_ipv6() {
        (t.addr_v6(COUNTED_PORT), t.addr(COUNTED_PORT))
    } else {
        (t.addr(COUNTED_PORT), t.addr_v6(COUNTED_PORT))
    };

    assert_echoes(inside, to);
    let allowed = t.record("conn_close", inside, 1);
    assert_eq!((&allowed["security"], &allowed["src_identity"]), (&"none".into(), &Value::Null), "{allowed}");
    let src = allowed["src"].as_str().and_then(|s| s.parse::<SocketAddr>().ok()).map(|a| a.ip());
    assert_eq!(src, Some(ip), "decided on the client's own address: {allowed}");
    assert_decided(&allowed, "allow", Some("demo/allow-outsider-1"), Some(0));
    assert_eq!(t.counted.accepted(), 1, "the app saw the allowed plaintext connection");

    for (from, to) in [(outside, to), (inside, other_family)] {
        assert_refused(from, to);
        let refused = t.record("conn_refused", from, 1);
        assert_eq!(refused["security"], "none", "{refused}");
        assert_denied(&refused, None, None);
        assert_eq!(t.counted.accepted(), 1, "the denied connection to {to} never reached the app");
    }
}

#[test]
fn mesh_wide_deny_all_with_namespace_allow() {
    // ferry-system is the root namespace by default: its policies apply to every namespace.
    let t = Mesh::start("pwide", &[("allow-nothing.yaml", ALLOW_NOTHING)]).unwrap();
    let to = t.addr(ECHO_PORT);
    assert_refused(&t.client, to);
    assert_denied(&t.record("conn_refused", &t.client, 1), None, None);

    let reload = t.apply("allow-client.yaml", ALLOW_CLIENT);
    assert_eq!(reload["event"], "reloaded", "{reload}");
    assert_echoes(&t.client, to);
    assert_decided(&t.record("conn_close", &t.client, 1), "allow", Some("demo/allow-client"), Some(0));
    for pod in [&t.other, &t.stranger, &t.outsiders[0]] {
        assert_refused(pod, to);
        assert_denied(&t.record("conn_refused", pod, 1), None, None);
    }
    t.assert_denials(&[("reason", "no_allow_match")], 4.0);
}

#[test]
fn denied_hbone_connect_gets_403_and_app_sees_nothing() {
    let t = Mesh::start("p403", &[("allow.yaml", ALLOW_CLIENT)]).unwrap();
    let to = t.addr(COUNTED_PORT);
    // The counting app does see mesh connections: the client's is allowed.
    assert_echoes(&t.client, to);
    assert_eq!(t.counted.accepted(), 1);

    assert_refused(&t.other, to);
    // The source's agent got 403 for its CONNECT...
    let failed = wait_events(&t.a, 1, |e| {
        e["event"] == "conn_failed" && e["pod"] == "demo/other" && e["orig_dst"] == to.to_string()
    });
    assert_eq!(failed.len(), 1, "{:?}", t.a.events());
    assert!(failed[0]["reason"].as_str().unwrap_or_default().contains("403"), "{}", failed[0]);
    // ...the destination's agent recorded the refusal and never relayed anything...
    let refused = t.record("conn_refused", &t.other, 1);
    assert_eq!((&refused["orig_dst"], &refused["src_identity"]), (&to.to_string().into(), &OTHER_ID.into()));
    assert_denied(&refused, None, None);
    let opened: Vec<Value> =
        events_of(&t.b, "conn_open").into_iter().filter(|e| comes_from(e, &t.other)).collect();
    assert!(opened.is_empty(), "a denied connection is never opened: {opened:?}");
    // ...and the app never accepted it.
    assert_eq!(t.counted.accepted(), 1, "the app accepted the denied connection");
}

#[test]
fn policy_change_closes_now_denied_connection() {
    let t = Mesh::start("pchg", &[]).unwrap();
    let closed = assert_policy_change_closes_the_clients(&t);
    assert_eq!(closed["security"], "mutual_tls", "{closed}");
}

#[test]
fn policy_change_closes_now_denied_shortcut_connection() {
    let t = Mesh::start_at("plchg", At::Local, &[]).unwrap();
    let closed = assert_policy_change_closes_the_clients(&t);
    assert_eq!(closed["security"], "node_local", "{closed}");
}

/// Starting without policies: a held connection of `other` and one of the client are relayed; then
/// DENY_CLIENT arrives. The client's connection is closed with a reason naming the policy, `other`'s
/// lives on, and the client's new connections are refused. Returns the closed connection's record.
fn assert_policy_change_closes_the_clients(t: &Mesh) -> Value {
    let to = t.addr(ECHO_PORT);
    // `other`'s connection stays allowed by the new set and must survive it.
    let kept = testapp::connect_held(&t.other, to, &ConnectOpts { bytes: 1000, ..ConnectOpts::default() })
        .expect("testapp connect started");
    std::thread::scope(|s| {
        let doomed = s.spawn(|| exchange(&t.client, to, true));
        assert_decided(&t.record("conn_open", &t.client, 1), "allow", None, None);
        t.record("conn_open", &t.other, 1);
        // The client's connection is relayed end to end: its bytes went through. (Over the shortcut
        // the outbound record counts them while it lives, the inbound one only at its close.)
        poll(|| {
            let live = t.cli(&["connections"]);
            let echoed = live.as_array().into_iter().flatten().any(|c| {
                c["source_identity"] == CLIENT_ID && c["bytes_sent"].as_u64() >= Some(MESSAGE.len() as u64)
            });
            if echoed { Ok(()) } else { Err(format!("no echoing client connection in {live:#}")) }
        });

        let reload = t.apply("deny-client.yaml", DENY_CLIENT);
        assert_eq!(reload["event"], "reloaded", "{reload}");
        let seen = doomed.join().expect("the client thread");
        assert!(
            matches!(seen.ended, Ended::Eof | Ended::Error(_)),
            "the client's connection was closed: {seen:?}"
        );
    });
    let closed = t.record("conn_close", &t.client, 1);
    let reason = closed["close_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("closed by policy change: denied"), "{closed}");
    assert!(reason.contains("demo/deny-client"), "names the policy: {closed}");
    // The record carries the decision that closed it.
    assert_decided(&closed, "deny", Some("demo/deny-client"), Some(0));

    let report = kept.release().unwrap();
    assert_eq!((report.ok, report.failed), (1, 0), "the still-allowed connection survived: {report:?}");
    assert_decided(&t.record("conn_close", &t.other, 1), "allow", None, None);
    // New connections of the client are denied too.
    assert_refused(&t.client, to);
    assert_denied(&t.record("conn_refused", &t.client, 1), Some("demo/deny-client"), Some(0));
    closed
}

#[test]
fn invalid_policy_on_reload_keeps_running_set() {
    let t = Mesh::start("pbad", &[("policies.yaml", ALLOW_CLIENT)]).unwrap();
    let to = t.addr(ECHO_PORT);
    assert_echoes(&t.client, to);
    assert_refused(&t.other, to);

    // Document 1 would also let `other` in; document 2 is invalid, so neither applies.
    let widened = ALLOW_CLIENT.replace(
        r#"principals: ["cluster.local/ns/demo/sa/client"]"#,
        r#"principals: ["cluster.local/ns/demo/sa/client", "cluster.local/ns/demo/sa/other"]"#,
    );
    let bad = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad-block
  namespace: demo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.300"]
"#;
    let rejected = t.apply("policies.yaml", &format!("{widened}---\n{bad}"));
    assert_eq!(rejected["event"], "reload_rejected", "{rejected}");
    let error = rejected["error"].as_str().unwrap_or_default();
    let file: PathBuf = t.policies.path().join("policies.yaml");
    for part in [
        &file.display().to_string(),
        "document 2",
        "demo/bad-block",
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "10.0.0.300",
    ] {
        assert!(error.contains(part), "the error names {part:?}: {error}");
    }

    // The running set is the old one: the client still gets in, `other` is still denied.
    assert_echoes(&t.client, to);
    assert_refused(&t.other, to);
    assert_denied(&t.record("conn_refused", &t.other, 2), None, None);
    let listed = t.cli(&["policies"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");
    let p = &listed[0];
    assert_eq!(
        (&p["namespace"], &p["name"], &p["dry_run"]),
        (&"demo".into(), &"allow-client".into(), &false.into())
    );
    assert!(is_action(&p["action"], "ALLOW"), "{p}");
    assert_eq!(p["workloads"], json!(["demo/server"]), "{p}");
    assert_eq!(p["rules"].as_array().map(Vec::len), Some(1), "{p}");
    assert_eq!((&p["rules"][0]["index"], &p["rules"][0]["enforcement"]), (&0.into(), &"L4".into()), "{p}");
}

#[test]
fn trace_explains_allow_and_deny() {
    let both = format!("{ALLOW_CLIENT}---\n{DENY_OTHER_NS}");
    let t = Mesh::start("ptrace", &[("policies.yaml", &both)]).unwrap();
    let by_name = format!("demo/server:{ECHO_PORT}");
    let by_addr = t.addr(ECHO_PORT).to_string();
    let assert_trace = |trace: &Value, decision: &str, policy: Option<&str>, rule: Option<u64>| {
        assert_eq!((&trace["decision"], &trace["policy"]), (&decision.into(), &json!(policy)), "{trace:#}");
        assert_eq!(trace["rule"], json!(rule), "{trace:#}");
        assert_eq!(
            trace["policies"].as_array().map(Vec::len),
            Some(2),
            "both policies considered: {trace:#}"
        );
    };
    let assert_considered = |trace: &Value, policy: &str, action: &str, matched: bool| {
        let p = entry(&trace["policies"], "policy", policy);
        assert!(is_action(&p["action"], action), "{p}");
        assert_eq!(p["matched"], matched, "{p}");
        assert!(p["why"].as_str().is_some_and(|w| !w.is_empty()), "says why: {p}");
    };

    for (src, dest) in [("demo/client", &by_name), (CLIENT_ID, &by_addr)] {
        let allow = t.trace(src, dest);
        assert_trace(&allow, "allow", Some("demo/allow-client"), Some(0));
        assert_considered(&allow, "demo/allow-client", "ALLOW", true);
        assert_considered(&allow, "demo/deny-other-ns", "DENY", false);
    }
    let deny = t.trace(STRANGER_ID, &by_addr);
    assert_trace(&deny, "deny", Some("demo/deny-other-ns"), Some(0));
    assert_considered(&deny, "demo/deny-other-ns", "DENY", true);
    for src in ["demo/other".to_owned(), t.outsiders[0].ipv4().to_string()] {
        let unmatched = t.trace(&src, &by_name);
        assert_trace(&unmatched, "deny", None, None);
        assert_considered(&unmatched, "demo/allow-client", "ALLOW", false);
    }

    // What the agent enforces is what trace said.
    assert_echoes(&t.client, t.addr(ECHO_PORT));
    assert_refused(&t.stranger, t.addr(ECHO_PORT));
    assert_denied(&t.record("conn_refused", &t.stranger, 1), Some("demo/deny-other-ns"), Some(0));
}

#[test]
fn dry_run_policy_logs_but_allows() {
    // DENY_CLIENT, annotated as Istio's docs annotate a policy to try it out.
    let dry_run = DENY_CLIENT.replace(
        "  namespace: demo\n",
        "  namespace: demo\n  annotations:\n    \"istio.io/dry-run\": \"true\"\n",
    );
    assert!(dry_run.contains("istio.io/dry-run"), "{dry_run}");
    let t = Mesh::start("pdry", &[("dry-run.yaml", &dry_run)]).unwrap();
    assert_echoes(&t.client, t.addr(ECHO_PORT));
    let record = t.record("conn_close", &t.client, 1);
    let line = access_line(&t.b, |l| l["reporter"] == "destination" && l["source_workload"] == "client");
    for e in [&record, &line] {
        assert_decided(e, "allow", None, None);
        let would = &e["dry_run"];
        assert_eq!((&would["decision"], &would["policy"]), (&"deny".into(), &"demo/deny-client".into()));
        assert_eq!(would["rule"], 0, "{e}");
    }
    let listed = t.cli(&["policies"]);
    let p = entry(&listed, "name", "deny-client");
    assert_eq!(p["dry_run"], true, "{p}");
    assert!(is_action(&p["action"], "DENY"), "{p}");
}

#[test]
fn local_shortcut_reaches_the_same_decision() {
    let t = Mesh::start_at("plocal", At::Local, &[("allow.yaml", ALLOW_CLIENT)]).unwrap();
    let to = t.addr(COUNTED_PORT);
    let by_name = format!("demo/server:{COUNTED_PORT}");
    // The same two pairs twice: over the shortcut, then (the shortcut turned off) over the tunnel.
    for (n, security, transport) in [(1, "node_local", "local"), (2, "mutual_tls", "hbone")] {
        if n == 2 {
            t.set_local_shortcut(false);
        }
        assert_echoes(&t.client, to);
        let allowed = t.record("conn_close", &t.client, n);
        assert_eq!((&allowed["security"], &allowed["src_identity"]), (&security.into(), &CLIENT_ID.into()));
        assert_decided(&allowed, "allow", Some("demo/allow-client"), Some(0));
        assert_eq!(t.counted.accepted(), n, "the app accepted the client's connection");

        assert_refused(&t.other, to);
        let refused = t.record("conn_refused", &t.other, n);
        assert_eq!((&refused["security"], &refused["src_identity"]), (&security.into(), &OTHER_ID.into()));
        assert_denied(&refused, None, None);
        assert_eq!(t.counted.accepted(), n, "the denied connection ({security}) never reached the app");
        let opened: Vec<Value> =
            events_of(&t.a, "conn_open").into_iter().filter(|e| comes_from(e, &t.other)).collect();
        assert!(opened.is_empty(), "a denied connection is never opened: {opened:?}");

        // What trace says for this path is what the agent did.
        for (src, decision, policy) in
            [("demo/client", "allow", Some("demo/allow-client")), ("demo/other", "deny", None)]
        {
            let trace = t.trace(src, &by_name);
            assert_eq!(
                (&trace["transport"], &trace["decision"], &trace["policy"]),
                (&transport.into(), &decision.into(), &json!(policy)),
                "{trace:#}"
            );
        }
    }
    assert!(!events_of(&t.a, "tunnel_accept").is_empty(), "the second round used the tunnel");
    t.assert_denials(&[("reason", "no_allow_match")], 2.0);
}

#[test]
fn audit_and_http_fields_fail_closed_on_tcp() {
    let all = [ALLOW_CLIENT, AUDIT_CLIENT, ALLOW_OTHER_GET, DENY_ADMIN_PATH].join("---\n");
    let t = Mesh::start("phttp", &[("policies.yaml", &all)]).unwrap();

    // The AUDIT policy matches the client and is recorded; allow-client still decides.
    assert_echoes(&t.client, t.addr(ECHO_PORT));
    let allowed = t.record("conn_close", &t.client, 1);
    assert_decided(&allowed, "allow", Some("demo/allow-client"), Some(0));
    assert_eq!(allowed["audit"], "demo/audit-client", "{allowed}");

    // A DENY rule with paths denies the whole connection to its port, which allow-client allows
    // (the AUDIT match is recorded and changes nothing here either).
    assert_refused(&t.client, t.addr(COUNTED_PORT));
    let denied = t.record("conn_refused", &t.client, 1);
    assert_denied(&denied, Some("demo/deny-admin-path"), Some(0));
    assert_eq!(denied["audit"], "demo/audit-client", "{denied}");
    assert_eq!(t.counted.accepted(), 0, "the app never saw the denied connection");
    t.assert_denials(&[("policy", "demo/deny-admin-path"), ("reason", "deny_policy")], 1.0);

    // An ALLOW rule with methods never matches plain TCP: `other`, whom it alone would allow, is denied.
    assert_refused(&t.other, t.addr(ECHO_PORT));
    let refused = t.record("conn_refused", &t.other, 1);
    assert_eq!(refused["src_identity"], OTHER_ID, "{refused}");
    assert_denied(&refused, None, None);
    assert!(refused["audit"].is_null(), "the AUDIT rule does not match other: {refused}");
    let trace = t.trace("demo/other", &format!("demo/server:{ECHO_PORT}"));
    let get = entry(&trace["policies"], "policy", "demo/allow-other-get");
    assert_eq!((&get["selects"], &get["matched"]), (&true.into(), &false.into()), "{get}");
    assert!(get["why"].as_str().is_some_and(|w| w.contains("needs HTTP")), "{get}");

    // `ferry policies` says per rule which of the three applies.
    let listed = t.cli(&["policies"]);
    for (name, action, enforcement) in [
        ("allow-client", "ALLOW", "L4"),
        ("audit-client", "AUDIT", "L4"),
        ("allow-other-get", "ALLOW", "needs HTTP: never matches"),
        ("deny-admin-path", "DENY", "needs HTTP: denies the connection"),
    ] {
        let p = entry(&listed, "name", name);
        assert!(is_action(&p["action"], action), "{p}");
        assert_eq!(p["rules"], json!([{ "index": 0, "enforcement": enforcement }]), "{p}");
    }
}

/// DENY requests to /admin paths from anyone but the client, and ALLOW `other`'s GETs: L7 rules.
const L7_RULES: &str = r#"apiVersion: security.istio.io/v1
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
  - from:
    - source:
        notPrincipals: ["cluster.local/ns/demo/sa/client"]
    to:
    - operation:
        paths: ["/admin", "/admin/*"]
"#;

#[test]
fn trace_explains_an_l7_decision() {
    let both = format!("{L7_RULES}---\n{ALLOW_OTHER_GET}---\n{ALLOW_CLIENT}");
    let t = Mesh::start("ptrl7", &[("policies.yaml", &both)]).unwrap();
    let dest = format!("demo/server:{ECHO_PORT}");
    let trace = |src: &str, extra: &[&str]| t.cli(&[&["trace", src, dest.as_str()][..], extra].concat());

    // A GET from `other` is allowed by its rule; a POST is not; a path that normalizes into /admin is
    // denied, and the trace shows the path policy saw.
    let get = trace("demo/other", &["--method", "GET", "--path", "/public"]);
    assert_eq!(
        (&get["decision"], &get["policy"]),
        (&"allow".into(), &"demo/allow-other-get".into()),
        "{get:#}"
    );
    assert_eq!(get["request"]["normalized_path"], "/public", "{get:#}");
    let post = trace("demo/other", &["--method", "POST", "--path", "/public"]);
    assert_eq!((&post["decision"], &post["policy"]), (&"deny".into(), &Value::Null), "{post:#}");
    let sneaky = trace("demo/other", &["--path", "/public/../admin/x", "--host", "Echo.Demo"]);
    assert_eq!(
        (&sneaky["decision"], &sneaky["policy"]),
        (&"deny".into(), &"demo/deny-admin".into()),
        "{sneaky:#}"
    );
    assert_eq!(sneaky["request"]["normalized_path"], "/admin/x", "{sneaky:#}");
    assert_eq!(sneaky["request"]["method"], "GET", "GET when only other request options are given");
    let admin = entry(&sneaky["policies"], "policy", "demo/deny-admin");
    assert_eq!(admin["matched"], true, "{admin}");
    // The client is exempt from the DENY and allowed by principal; %00 is refused before policy.
    let client = trace("demo/client", &["--path", "/admin"]);
    assert_eq!(
        (&client["decision"], &client["policy"]),
        (&"allow".into(), &"demo/allow-client".into()),
        "{client:#}"
    );
    let nul = trace("demo/client", &["--path", "/a%00b"]);
    assert_eq!(nul["decision"], "deny", "{nul:#}");
    assert!(nul["decision_reason"].as_str().is_some_and(|r| r.contains("400")), "{nul:#}");
    // Without request options the trace is the connection's, and says each request would be decided.
    let tcp = trace("demo/other", &[]);
    assert!(tcp["request"].is_null(), "{tcp:#}");
    let notes = tcp["notes"].to_string();
    assert!(notes.contains("each request is decided"), "{tcp:#}");
}
