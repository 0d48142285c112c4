//! The destination agent's HTTP layer, end to end: real agents on two simulated nodes with mutual
//! TLS between them (and the node-local shortcut, and plaintext into a PERMISSIVE pod), real
//! hyper apps in the server pod that record what reached them, and clients in the pods speaking
//! HTTP/1.1 (raw bytes) and HTTP/2 with prior knowledge (the `h2` crate). Policies are Istio
//! AuthorizationPolicy YAML as istio.io writes it. Every decision is checked where it shows: the
//! client's response, what the app received, the access log, `ferry connections`, and the metrics
//! as a real Prometheus scrapes them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_tests::Pod;
use ferry_tests::control::ferry;
use ferry_tests::http_app::{App, Received, UPGRADED_HELLO};
use ferry_tests::http_client::{
    After, H1, H1Response, H2Request, H2Response, IO_TIMEOUT, h2_exchange_holding,
};
use ferry_tests::l7_mesh::{
    At, CAPTURE_PORT, CLIENT_ID, DECLARED_PORT, ECHO_PORT, GREETER_PORT, GREETER_TCP_PORT, GREETING, L7Mesh,
    h1_request,
};
use ferry_tests::prometheus::{METRICS_ADDR, Prometheus, http_get};
use ferry_tests::scenario::{EVENT_WAIT, wait_events};
use serde_json::{Value, json};

/// Istio's body for a request denied by policy.
const RBAC_DENIED: &str = "RBAC: access denied";
/// How long to wait for Prometheus to see what was sent.
const PROM_WAIT: Duration = Duration::from_secs(60);

// ---- Policies, as istio.io writes them.

/// ALLOW GETs anywhere, POSTs under /api/ carrying the token, and PUTs to two hosts (the second
/// on any port); DENY /private, DELETE, the blocked host (with any port) and its subdomains, and
/// mallory.
const L7_POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-l7
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
  - to:
    - operation:
        methods: ["POST"]
        paths: ["/api/*"]
    when:
    - key: request.headers[x-token]
      values: ["secret"]
  - to:
    - operation:
        methods: ["PUT"]
        hosts: ["echo.demo.svc.cluster.local", "api.example.com:*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-l7
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/private", "/private/*"]
  - to:
    - operation:
        methods: ["DELETE"]
  - to:
    - operation:
        hosts: ["blocked.example", "blocked.example:*", "*.blocked.example"]
  - when:
    - key: request.headers[x-user]
      values: ["mallory"]
"#;

/// DENY requests for /private and below.
const DENY_PRIVATE: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-private
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/private", "/private/*"]
"#;

// ---- The allow/deny matrix.

/// One request of the matrix and what must come of it.
struct L7Case {
    name: &'static str,
    method: &'static str,
    /// The path as sent (a `?case=...` query is added to attribute it).
    path: &'static str,
    host: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static [u8],
    status: u16,
    /// The path the app must receive (normalized), or `None` when nothing may reach it.
    app_path: Option<&'static str>,
    /// The deciding policy and rule, `None` when no policy decided (an ALLOW that did not match).
    decided_by: Option<(&'static str, u64)>,
}

const HOST: &str = "echo.demo:8080";

#[allow(clippy::too_many_arguments)]
const fn l7(
    name: &'static str,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    app_path: Option<&'static str>,
    decided_by: Option<(&'static str, u64)>,
) -> L7Case {
    let body: &'static [u8] = if matches!(method.as_bytes(), b"POST") { b"{\"n\":1}" } else { b"" };
    L7Case { name, method, path, host, headers, body, status, app_path, decided_by }
}

const ALLOW: &str = "demo/allow-l7";
const DENY: &str = "demo/deny-l7";

/// The matrix: methods, paths (with Istio's default BASE normalization), hosts and headers.
const MATRIX: &[L7Case] = &[
    l7("get_public", "GET", "/public", HOST, &[], 200, Some("/public"), Some((ALLOW, 0))),
    // Paths normalize before policy and the app sees the normalized one.
    l7("dot_dot_into_private", "GET", "/public/../private", HOST, &[], 403, None, Some((DENY, 0))),
    l7(
        "encoded_dot_dot_into_private",
        "GET",
        "/public/%2E%2E/private",
        HOST,
        &[],
        403,
        None,
        Some((DENY, 0)),
    ),
    l7(
        "lower_case_encoded_dot_dot",
        "GET",
        "/public/%2e%2e/private/x",
        HOST,
        &[],
        403,
        None,
        Some((DENY, 0)),
    ),
    l7("encoded_unreserved_letter", "GET", "/%70rivate", HOST, &[], 403, None, Some((DENY, 0))),
    l7(
        "dot_dot_staying_public",
        "GET",
        "/public/x/../y",
        HOST,
        &[],
        200,
        Some("/public/y"),
        Some((ALLOW, 0)),
    ),
    // BASE neither merges slashes nor decodes %2F: the DENY on /private does not match them, the
    // GET is allowed, and the app gets the path exactly so.
    l7("double_slash_is_not_merged", "GET", "//private", HOST, &[], 200, Some("//private"), Some((ALLOW, 0))),
    l7(
        "encoded_slash_is_not_decoded",
        "GET",
        "/private%2Fdata",
        HOST,
        &[],
        200,
        Some("/private%2Fdata"),
        Some((ALLOW, 0)),
    ),
    l7("private_below", "GET", "/private/x", HOST, &[], 403, None, Some((DENY, 0))),
    // Methods.
    l7("post_without_an_allow_rule", "POST", "/public", HOST, &[], 403, None, None),
    l7("delete_is_denied", "DELETE", "/public", HOST, &[], 403, None, Some((DENY, 1))),
    // Headers.
    l7(
        "post_api_with_the_token",
        "POST",
        "/api/items",
        HOST,
        &[("x-token", "secret")],
        200,
        Some("/api/items"),
        Some((ALLOW, 1)),
    ),
    l7("post_api_with_another_token", "POST", "/api/items", HOST, &[("x-token", "guess")], 403, None, None),
    l7("post_api_without_the_token", "POST", "/api/items", HOST, &[], 403, None, None),
    l7("post_beside_api_with_the_token", "POST", "/apix", HOST, &[("x-token", "secret")], 403, None, None),
    l7("header_denied", "GET", "/public", HOST, &[("x-user", "mallory")], 403, None, Some((DENY, 3))),
    l7(
        "header_with_another_value",
        "GET",
        "/public",
        HOST,
        &[("x-user", "alice")],
        200,
        Some("/public"),
        Some((ALLOW, 0)),
    ),
    // Hosts: letter case never matters; a port matches only a `:*` entry.
    l7(
        "put_to_the_host",
        "PUT",
        "/by-host",
        "echo.demo.svc.cluster.local",
        &[],
        200,
        Some("/by-host"),
        Some((ALLOW, 2)),
    ),
    l7(
        "put_host_letter_case",
        "PUT",
        "/by-host",
        "ECHO.Demo.SVC.cluster.local",
        &[],
        200,
        Some("/by-host"),
        Some((ALLOW, 2)),
    ),
    l7("put_host_with_a_port", "PUT", "/by-host", "echo.demo.svc.cluster.local:8080", &[], 403, None, None),
    l7(
        "put_host_any_port",
        "PUT",
        "/by-host",
        "api.example.com:8080",
        &[],
        200,
        Some("/by-host"),
        Some((ALLOW, 2)),
    ),
    l7(
        "put_host_any_port_letter_case",
        "PUT",
        "/by-host",
        "API.Example.COM:9999",
        &[],
        200,
        Some("/by-host"),
        Some((ALLOW, 2)),
    ),
    l7("put_host_any_port_needs_a_port", "PUT", "/by-host", "api.example.com", &[], 403, None, None),
    l7("put_to_another_host", "PUT", "/by-host", "evil.example", &[], 403, None, None),
    l7("denied_host_letter_case", "GET", "/public", "BLOCKED.Example", &[], 403, None, Some((DENY, 2))),
    l7("denied_host_with_a_port", "GET", "/public", "blocked.example:8080", &[], 403, None, Some((DENY, 2))),
    l7(
        "denied_subdomain_letter_case",
        "GET",
        "/public",
        "Shop.BLOCKED.Example",
        &[],
        403,
        None,
        Some((DENY, 2)),
    ),
    // As in Istio, a suffix entry (`*.blocked.example`) is matched against the whole Host, port
    // included, so a port takes the request out of it (a DENY by host needs `:*` entries too).
    l7(
        "subdomain_with_a_port_is_not_the_suffix",
        "GET",
        "/public",
        "shop.blocked.example:8080",
        &[],
        200,
        Some("/public"),
        Some((ALLOW, 0)),
    ),
];

/// The query that attributes case `name` sent over `proto` to `port`.
fn case_query(proto: &str, port: u16, name: &str) -> String {
    format!("case={proto}-{port}-{name}")
}

/// What came back for one matrix request, either version.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    app_header: Option<String>,
    body: String,
}

impl From<&H1Response> for Answer {
    fn from(r: &H1Response) -> Self {
        Answer {
            status: r.status,
            content_type: r.header("content-type").map(str::to_owned),
            app_header: r.header("x-app").map(str::to_owned),
            body: r.text(),
        }
    }
}

impl From<&H2Response> for Answer {
    fn from(r: &H2Response) -> Self {
        Answer {
            status: r.status,
            content_type: r.header("content-type").map(str::to_owned),
            app_header: r.header("x-app").map(str::to_owned),
            body: r.text(),
        }
    }
}

/// Sends the whole matrix from `from` to `to` over HTTP/1.1 (one keep-alive connection) and over
/// HTTP/2 (one connection), then checks every case against the client's answers, the app and the
/// deciding agent's access log; panics naming every failed case.
fn assert_matrix(t: &L7Mesh, from: &Pod, to: SocketAddr, app: &App) {
    let h1: Vec<Vec<u8>> = MATRIX
        .iter()
        .map(|c| {
            let target = format!("{}?{}", c.path, case_query("h1", to.port(), c.name));
            h1_request(c.method, &target, Some(c.host), c.headers, c.body)
        })
        .collect();
    let h1_answers = t.h1(from, to, h1);
    let h2: Vec<H2Request> = MATRIX
        .iter()
        .map(|c| {
            let mut r = H2Request::new(
                c.method,
                c.host,
                &format!("{}?{}", c.path, case_query("h2", to.port(), c.name)),
            );
            for (k, v) in c.headers {
                r = r.header(k, v);
            }
            r.body(c.body)
        })
        .collect();
    let h2_answers = t.h2(from, to, h2);
    let n = 2 * MATRIX.len();
    let marker = format!("case=h1-{}-", to.port());
    let marker2 = format!("case=h2-{}-", to.port());
    let lines = t.wait_request_lines(n, |l| {
        l["path"].as_str().is_some_and(|p| p.contains(&marker) || p.contains(&marker2))
    });
    let received = app.requests();

    let mut failures = BTreeMap::new();
    for (proto, answers) in [
        (
            "h1",
            h1_answers.iter().map(|a| a.as_ref().map(Answer::from).map_err(Clone::clone)).collect::<Vec<_>>(),
        ),
        (
            "h2",
            h2_answers
                .iter()
                .map(|a| match &a.error {
                    Some(e) => Err(e.clone()),
                    None => Ok(Answer::from(a)),
                })
                .collect(),
        ),
    ] {
        for (i, c) in MATRIX.iter().enumerate() {
            let bad = check_case(c, proto, to.port(), answers.get(i), &received, &lines);
            if !bad.is_empty() {
                failures.insert(format!("{proto} {}", c.name), bad);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed:\n{}",
        failures.len(),
        failures
            .iter()
            .map(|(n, b)| format!("- {n}:\n    {}", b.join("\n    ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn check_case(
    c: &L7Case,
    proto: &str,
    port: u16,
    answer: Option<&Result<Answer, String>>,
    received: &[Received],
    lines: &[Value],
) -> Vec<String> {
    let mut bad = Vec::new();
    let query = case_query(proto, port, c.name);
    match answer {
        None => bad.push("no answer (an earlier request on the connection failed)".into()),
        Some(Err(e)) => bad.push(format!("failed: {e}")),
        Some(Ok(a)) => {
            if a.status != c.status {
                bad.push(format!("status {} (want {}): {a:?}", a.status, c.status));
            }
            if c.status == 403 && (a.body != RBAC_DENIED || a.content_type.as_deref() != Some("text/plain")) {
                bad.push(format!("a denial is text/plain {RBAC_DENIED:?}: {a:?}"));
            }
            if c.status == 200 && a.app_header.as_deref() != Some("echo") {
                bad.push(format!("a 200 comes from the app: {a:?}"));
            }
        }
    }
    let at_app: Vec<&Received> = received.iter().filter(|r| r.target.ends_with(&query)).collect();
    match (c.app_path, at_app.as_slice()) {
        (None, []) => {}
        (None, seen) => bad.push(format!("nothing may reach the app, it got {seen:#?}")),
        (Some(path), [r]) => {
            if r.path() != path {
                bad.push(format!("the app got path {:?}, want {path:?}", r.path()));
            }
            let host = if proto == "h1" { r.header("host") } else { r.authority.as_deref() };
            if host != Some(c.host) {
                bad.push(format!("the app got host {host:?}, want {:?} as sent", c.host));
            }
            if r.header("x-request-id").is_none() || r.header("traceparent").is_none() {
                bad.push(format!("x-request-id and traceparent are added: {:?}", r.headers));
            }
            if r.body != c.body || !r.complete {
                bad.push(format!("the app got body {:?}, want {:?}", r.body, c.body));
            }
        }
        (Some(_), seen) => bad.push(format!("want exactly one request at the app, got {seen:#?}")),
    }
    let logged: Vec<&Value> =
        lines.iter().filter(|l| l["path"].as_str().is_some_and(|p| p.ends_with(&query))).collect();
    match logged.as_slice() {
        [l] => {
            let decision = if c.status == 403 { "deny" } else { "allow" };
            let (policy, rule) = match c.decided_by {
                Some((p, r)) => (json!(p), json!(r)),
                None => (Value::Null, Value::Null),
            };
            let want = (json!(c.status), json!(decision), policy, rule, json!(c.method));
            let got = (
                l["status"].clone(),
                l["policy_decision"].clone(),
                l["policy"].clone(),
                l["policy_rule"].clone(),
                l["method"].clone(),
            );
            if got != want {
                bad.push(format!(
                    "access log (status, decision, policy, rule, method) {got:?}, want {want:?}: {l}"
                ));
            }
            if l["authority"] != c.host {
                bad.push(format!("the access log's authority is the host as sent: {l}"));
            }
        }
        more => bad.push(format!("want one access-log line, got {more:?}")),
    }
    bad
}

/// The deciding agent's inbound `conn_close` records of HTTP connections (either version).
fn http_conn_records(t: &L7Mesh) -> Vec<Value> {
    t.dest()
        .0
        .events()
        .into_iter()
        .filter(|e| e["event"] == "conn_close" && e["direction"] == "inbound")
        .filter(|e| e["protocol"] == "http/1.1" || e["protocol"] == "h2")
        .collect()
}

/// Waits for `n` HTTP connection records on the deciding agent, all of security `security`.
fn assert_http_conns(t: &L7Mesh, n: usize, security: &str) {
    let found = wait_events(t.dest().0, n, |e| {
        e["event"] == "conn_close"
            && e["direction"] == "inbound"
            && (e["protocol"] == "http/1.1" || e["protocol"] == "h2")
    });
    assert!(found.len() >= n, "want {n} HTTP connections: {:?}", http_conn_records(t));
    for e in &found {
        assert_eq!(e["security"], security, "{e}");
    }
    let protocols: Vec<&Value> = found.iter().map(|e| &e["protocol"]).collect();
    assert!(protocols.contains(&&json!("http/1.1")) && protocols.contains(&&json!("h2")), "{protocols:?}");
}

#[test]
fn allow_and_deny_by_method_path_host_and_header() {
    let t = L7Mesh::start("l7mx", At::Remote, &[("l7.yaml", L7_POLICIES)]).unwrap();
    assert_matrix(&t, &t.client, t.addr(ECHO_PORT), &t.echo);
    assert_http_conns(&t, 2, "mutual_tls");
    // The same decisions on a port declared `http` (never sniffed).
    assert_matrix(&t, &t.client, t.addr(DECLARED_PORT), &t.declared);
}

#[test]
fn l7_policy_on_plaintext_into_a_permissive_pod() {
    let t = L7Mesh::start("l7pt", At::Remote, &[("l7.yaml", L7_POLICIES)]).unwrap();
    // The outsider is not in the mesh: its plaintext goes straight to the PERMISSIVE server pod.
    assert_matrix(&t, &t.outsider, t.addr(ECHO_PORT), &t.echo);
    assert_http_conns(&t, 2, "none");
    let line = &t.request_lines()[0];
    assert_eq!(
        (&line["connection_security_policy"], &line["source_principal"]),
        (&json!("none"), &json!("unknown")),
        "{line}"
    );
    assert_eq!(line["source_ip"], t.outsider.ipv4().to_string(), "{line}");
}

#[test]
fn l7_policy_over_the_node_local_shortcut() {
    let t = L7Mesh::start("l7lo", At::Local, &[("l7.yaml", L7_POLICIES)]).unwrap();
    assert_matrix(&t, &t.client, t.addr(ECHO_PORT), &t.echo);
    assert_http_conns(&t, 2, "node_local");
    let line = &t.request_lines()[0];
    assert_eq!(line["source_principal"], CLIENT_ID, "the shortcut knows the source's identity: {line}");
}

#[test]
fn denied_request_gets_403_rbac_body_and_connection_stays_usable() {
    let t = L7Mesh::start("l7403", At::Remote, &[("deny.yaml", DENY_PRIVATE)]).unwrap();
    let to = t.addr(ECHO_PORT);

    // HTTP/1.1: a denied GET, a denied POST whose body the agent never forwards, then an allowed
    // GET, all on one keep-alive socket.
    let answers = t.h1(
        &t.client,
        to,
        vec![
            h1_request("GET", "/private", Some(HOST), &[], b""),
            h1_request("POST", "/private/upload", Some(HOST), &[], b"hello"),
            h1_request("GET", "/public", Some(HOST), &[], b""),
        ],
    );
    let answers: Vec<H1Response> =
        answers.into_iter().map(|a| a.expect("an answer on the same socket")).collect();
    for denied in &answers[..2] {
        assert_eq!(denied.status, 403, "{denied:?}");
        assert_eq!(denied.text(), RBAC_DENIED, "{denied:?}");
        assert_eq!(denied.header("content-type"), Some("text/plain"), "{denied:?}");
        assert_eq!(denied.header("content-length"), Some("19"), "{denied:?}");
    }
    assert_eq!((answers[2].status, answers[2].header("x-app")), (200, Some("echo")), "{:?}", answers[2]);

    // HTTP/2: a denied stream, then another stream on the same connection.
    let h2 = t.h2(
        &t.client,
        to,
        vec![H2Request::new("GET", HOST, "/private"), H2Request::new("GET", HOST, "/public")],
    );
    assert_eq!((h2[0].status, h2[0].text().as_str()), (403, RBAC_DENIED), "{:?}", h2[0]);
    assert_eq!(h2[0].header("content-type"), Some("text/plain"), "{:?}", h2[0]);
    assert_eq!(
        (h2[1].status, h2[1].header("x-app"), &h2[1].error),
        (200, Some("echo"), &None),
        "{:?}",
        h2[1]
    );

    // Only the allowed requests reached the app, each on the connection of its client.
    let received = t.echo.requests();
    let seen: Vec<(&str, &str)> = received.iter().map(|r| (r.version.as_str(), r.target.as_str())).collect();
    assert_eq!(seen, [("HTTP/1.1", "/public"), ("HTTP/2.0", "/public")], "{received:#?}");
    let lines = t.wait_request_lines(5, |_| true);
    let statuses: Vec<(&Value, &Value)> = lines.iter().map(|l| (&l["status"], &l["policy"])).collect();
    let deny = json!("demo/deny-private");
    assert_eq!(
        statuses,
        [
            (&json!(403), &deny),
            (&json!(403), &deny),
            (&json!(200), &Value::Null),
            (&json!(403), &deny),
            (&json!(200), &Value::Null)
        ],
        "{lines:#?}"
    );
    // One connection per client connection, each carrying all its requests.
    let conns: Vec<(Value, Value)> =
        lines.iter().map(|l| (l["conn"].clone(), l["protocol"].clone())).collect();
    assert_eq!(conns[0], conns[2], "the HTTP/1.1 requests shared one connection: {lines:#?}");
    assert_eq!(conns[3], conns[4], "the HTTP/2 streams shared one connection: {lines:#?}");
}

#[test]
fn grpc_with_trailers_passes() {
    let t = L7Mesh::start("l7grpc", At::Remote, &[]).unwrap();
    // A unary call's length-prefixed message: not compressed, 5 bytes.
    let message = b"\x00\x00\x00\x00\x05hello";
    let call = |status: &str| {
        H2Request::new("POST", "echo.demo:8080", "/ferry.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-app-grpc-status", status)
            .body(message)
    };
    for (port, app) in [(ECHO_PORT, &t.echo), (DECLARED_PORT, &t.declared)] {
        let answers = t.h2(&t.client, t.addr(port), vec![call("0"), call("5")]);
        for (answer, status) in answers.iter().zip(["0", "5"]) {
            assert_eq!((answer.status, &answer.error), (200, &None), "port {port}: {answer:?}");
            assert_eq!(answer.header("content-type"), Some("application/grpc"), "{answer:?}");
            assert_eq!(answer.body, message, "the message came back whole: {answer:?}");
            assert_eq!(
                answer.trailer("grpc-status"),
                Some(status),
                "the client sees the trailers: {answer:?}"
            );
            assert_eq!(answer.trailer("grpc-message"), Some("echoed"), "{answer:?}");
        }
        let received = app.requests();
        assert_eq!(received.len(), 2, "{received:#?}");
        for r in &received {
            assert_eq!(
                (r.version.as_str(), r.method.as_str(), r.path()),
                ("HTTP/2.0", "POST", "/ferry.Echo/Say")
            );
            assert_eq!(r.header("te"), Some("trailers"), "TE: trailers reaches a gRPC app: {r:?}");
            assert_eq!(r.header("content-type"), Some("application/grpc"));
            assert_eq!((r.body.as_slice(), r.complete), (&message[..], true));
        }
    }
    // Logged and counted as gRPC, with the trailers' status.
    let lines = t.wait_request_lines(4, |l| l["path"] == "/ferry.Echo/Say");
    let statuses: Vec<&Value> = lines.iter().map(|l| &l["grpc_status"]).collect();
    assert_eq!(statuses, [&json!("0"), &json!("5"), &json!("0"), &json!("5")], "{lines:#?}");
    let (_, metrics) = http_get(t.dest().1.netns_path(), METRICS_ADDR, "/metrics").unwrap();
    for grpc in ["0", "5"] {
        let series = metrics
            .lines()
            .find(|l| {
                l.starts_with("ferry_requests_total{")
                    && l.contains("request_protocol=\"grpc\"")
                    && l.contains(&format!("grpc_response_status=\"{grpc}\""))
            })
            .unwrap_or_else(|| panic!("no gRPC series with status {grpc}:\n{metrics}"));
        assert!(series.contains("response_code=\"200\"") && series.ends_with(" 2"), "{series}");
    }
}

#[test]
fn websocket_upgrade_passes() {
    let t = L7Mesh::start("l7ws", At::Remote, &[]).unwrap();
    let to = t.addr(ECHO_PORT);
    let upgrade = h1_request(
        "GET",
        "/chat",
        Some(HOST),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    );
    // Bytes both ways after the switch: the app's greeting, then a short and a long message echoed.
    let long: Vec<u8> = (0..48 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = [b"ping 1\n".to_vec(), long.clone()];
    let outgoing = sent.clone();
    type Seen = (Result<H1Response, String>, Vec<u8>, Vec<Vec<u8>>, After);
    let (switch, hello, echoed, after): Seen = t.run(&t.client, move || {
        let mut c = match H1::connect(to) {
            Ok(c) => c,
            Err(e) => return (Err(e.to_string()), Vec::new(), Vec::new(), After::Open),
        };
        let switch = c.request(&upgrade).map_err(|e| e.to_string());
        let hello = c.exact(UPGRADED_HELLO.len()).unwrap_or_default();
        let mut echoed = Vec::new();
        for message in &outgoing {
            if c.send(message).is_err() {
                break;
            }
            echoed.push(c.exact(message.len()).unwrap_or_default());
        }
        c.shutdown_write();
        (switch, hello, echoed, c.after(IO_TIMEOUT))
    });
    let switch = switch.expect("an answer to the upgrade");
    assert_eq!(switch.status, 101, "{switch:?}");
    assert_eq!(switch.header("upgrade"), Some("websocket"), "{switch:?}");
    assert!(switch.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")), "{switch:?}");
    assert_eq!(hello, UPGRADED_HELLO, "the app's bytes reach the client after the switch");
    assert_eq!(echoed, sent, "the client's bytes reach the app and come back intact");
    assert_eq!(after, After::Closed, "the app's close after the client's half-close comes through");

    let received = t.echo.requests();
    assert_eq!(received.len(), 1, "{received:#?}");
    let r = &received[0];
    assert_eq!((r.method.as_str(), r.target.as_str()), ("GET", "/chat"));
    assert_eq!(r.header("upgrade"), Some("websocket"), "the upgrade reaches the app: {r:?}");
    assert!(r.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")), "{r:?}");
    assert_eq!(r.header("sec-websocket-key"), Some("dGhlIHNhbXBsZSBub25jZQ=="));
    assert_eq!(t.echo.conn_bytes().get(&r.conn), Some(&sent.concat()), "what the app read after the switch");
    let line = t.wait_request_lines(1, |l| l["path"] == "/chat");
    assert_eq!(line.first().map(|l| &l["status"]), Some(&json!(101)), "{line:?}");
}

#[test]
fn expect_continue_works() {
    let t = L7Mesh::start("l7exp", At::Remote, &[("deny.yaml", DENY_PRIVATE)]).unwrap();
    let to = t.addr(ECHO_PORT);
    let body = b"hello world".to_vec();
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: {HOST}\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
            .into_bytes()
    };
    let (allowed, denied) = (head("/upload"), head("/private/upload"));
    let to_send = body.clone();
    type Answer = Result<H1Response, String>;
    let (first, second, refused): (Answer, Answer, Answer) = t.run(&t.client, move || {
        let mut c = H1::connect(to).expect("connect");
        // The head alone: the body waits for 100 Continue.
        let first = c.request(&allowed).map_err(|e| e.to_string());
        let second = match &first {
            Ok(r) if r.status == 100 => c.request(&to_send).map_err(|e| e.to_string()),
            _ => Err("no 100 Continue, so the body was never sent".into()),
        };
        // A denied upload: the final answer comes instead of 100, and the body is never sent.
        let mut d = H1::connect(to).expect("connect");
        let refused = d.request(&denied).map_err(|e| e.to_string());
        (first, second, refused)
    });
    let first = first.expect("an interim answer");
    assert_eq!(first.status, 100, "{first:?}");
    let second = second.expect("the final answer");
    assert_eq!((second.status, second.header("x-app")), (200, Some("echo")), "{second:?}");
    let refused = refused.expect("an answer to the denied upload");
    assert_eq!(
        (refused.status, refused.text().as_str()),
        (403, RBAC_DENIED),
        "no 100 before a denial: {refused:?}"
    );

    // HTTP/2 has no interim answer here; a client that sends the body anyway gets through.
    let h2 = t.h2(
        &t.client,
        to,
        vec![H2Request::new("POST", HOST, "/upload-h2").header("expect", "100-continue").body(&body)],
    );
    assert_eq!((h2[0].status, &h2[0].error), (200, &None), "{:?}", h2[0]);

    let received = t.echo.requests();
    let uploads: Vec<(&str, &[u8], bool)> =
        received.iter().map(|r| (r.target.as_str(), r.body.as_slice(), r.complete)).collect();
    assert_eq!(
        uploads,
        [("/upload", &body[..], true), ("/upload-h2", &body[..], true)],
        "the app got each allowed body whole, and nothing of the denied one: {received:#?}"
    );
    assert_eq!(received[0].header("expect"), Some("100-continue"), "{:?}", received[0]);
}

#[test]
fn server_first_protocol_is_not_stalled() {
    let t = L7Mesh::start("l7srv1", At::Remote, &[]).unwrap();
    let talk = |from: &Pod, to: SocketAddr| {
        let said = format!("EHLO {}\r\n", from.name()).into_bytes();
        let sent = said.clone();
        type Talk = (Vec<u8>, u128, Vec<u8>, After);
        let (greeting, waited_ms, echoed, after): Talk = t.run(from, move || {
            let started = Instant::now();
            let mut c = H1::connect(to).expect("connect");
            // The client sends nothing until the server has spoken.
            let greeting = c.exact(GREETING.len()).unwrap_or_default();
            let waited_ms = started.elapsed().as_millis();
            let echoed = c.send(&sent).and_then(|_| c.exact(sent.len())).unwrap_or_default();
            c.shutdown_write();
            (greeting, waited_ms, echoed, c.after(IO_TIMEOUT))
        });
        eprintln!("{} -> {to}: the greeting came after {waited_ms} ms", from.name());
        assert_eq!(greeting, GREETING, "{} -> {to}: the greeting arrived whole", from.name());
        assert_eq!(echoed, said, "{} -> {to}: then the client's bytes went through", from.name());
        assert_eq!(after, After::Closed, "{} -> {to}", from.name());
        said
    };
    // Undeclared (the agent waits for the client's first bytes, briefly), declared `tcp` (never
    // inspected), and plaintext from outside the mesh.
    let mut sent = Vec::new();
    for (from, port) in
        [(&t.client, GREETER_PORT), (&t.client, GREETER_TCP_PORT), (&t.outsider, GREETER_PORT)]
    {
        sent.push((port, talk(from, t.addr(port))));
    }
    // Nothing was lost or added: each app read exactly what its clients said.
    for (app, port) in [(&t.greeter, GREETER_PORT), (&t.greeter_tcp, GREETER_TCP_PORT)] {
        let mut got: Vec<Vec<u8>> = app.conn_bytes().into_values().collect();
        got.sort();
        let mut want: Vec<Vec<u8>> =
            sent.iter().filter(|(p, _)| *p == port).map(|(_, s)| s.clone()).collect();
        want.sort();
        assert_eq!(got, want, "port {port}");
    }
    // Relayed as opaque TCP, without requests.
    let closed = wait_events(t.dest().0, 3, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(closed.len(), 3, "{:?}", t.dest().0.events());
    for e in &closed {
        assert_eq!(e["protocol"], "tcp", "{e}");
    }
    assert!(t.request_lines().is_empty(), "{:?}", t.request_lines());
}

/// DENY /admin on the capture port: an HTTP field, so bytes that are not HTTP are denied on it.
/// ALLOW GETs on the capture port and the greeter's: HTTP-only, so nothing else ever matches.
const L7_ONLY: &str = r#"apiVersion: security.istio.io/v1
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
        ports: ["9090"]
        paths: ["/admin", "/admin/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["9090", "7070"]
        methods: ["GET"]
"#;

#[test]
fn l7_rule_on_non_http_bytes_denies() {
    let t = L7Mesh::start("l7raw", At::Remote, &[("l7.yaml", L7_ONLY)]).unwrap();
    let capture = t.addr(CAPTURE_PORT);
    let greeter = t.addr(GREETER_PORT);
    // Bytes that are not HTTP, including some that nearly are, and silence.
    let probes: Vec<(SocketAddr, Vec<u8>)> = vec![
        (capture, b"\x16\x03\x01\x00\x05hello".to_vec()),
        (capture, b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()),
        (capture, b"GET  /admin HTTP/1.1\r\nHost: echo\r\n\r\n".to_vec()),
        (capture, b"GET /admin HTTP/9.9\r\nHost: echo\r\n\r\n".to_vec()),
        (capture, Vec::new()),
        (greeter, b"HELO x\r\n".to_vec()),
        (greeter, Vec::new()),
    ];
    let inputs = probes.clone();
    let seen: Vec<After> = t.run(&t.client, move || {
        inputs
            .iter()
            .map(|(to, bytes)| {
                let mut c = H1::connect(*to).expect("connect");
                if !bytes.is_empty() {
                    let _ = c.send(bytes);
                }
                // The agent must close without a byte from the app.
                c.after(IO_TIMEOUT)
            })
            .collect()
    });
    for ((to, bytes), after) in probes.iter().zip(&seen) {
        // After::Extra would carry whatever came back; nothing may.
        assert_eq!(
            after,
            &After::Closed,
            "{:?} to {to} must be closed unanswered",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(
        (t.capture.accepted(), t.capture.bytes_received()),
        (0, 0),
        "the app never saw the denied bytes"
    );
    assert_eq!((t.greeter.accepted(), t.greeter.bytes_received()), (0, 0), "nor did the server-first app");
    let refused = wait_events(t.dest().0, probes.len(), |e| e["event"] == "conn_refused");
    assert_eq!(refused.len(), probes.len(), "{:?}", t.dest().0.events());
    for e in &refused {
        assert!(e["reason"].as_str().is_some_and(|r| r.contains("not HTTP")), "{e}");
    }

    // HTTP on the same port is decided per request.
    let answers = t.h1(
        &t.client,
        capture,
        vec![
            h1_request("GET", "/ok", Some(HOST), &[], b""),
            h1_request("GET", "/admin/x", Some(HOST), &[], b""),
        ],
    );
    let statuses: Vec<u16> = answers.iter().map(|a| a.as_ref().map(|r| r.status).unwrap_or(0)).collect();
    assert_eq!(statuses, [200, 403], "{answers:?}");
    let raw = t.capture.raw_requests();
    let lines: Vec<String> = raw.iter().map(|r| r.request_line()).collect();
    assert_eq!(lines, ["GET /ok HTTP/1.1"], "only the allowed request reached the app");
}

#[test]
fn request_metrics_seen_by_real_prometheus() {
    let deny = DENY_PRIVATE.replace("/private", "/forbidden");
    let t = L7Mesh::start("l7prom", At::Remote, &[("deny.yaml", &deny)]).unwrap();
    let dest_node = t.dest().1;
    let prom = Prometheus::start(dest_node, METRICS_ADDR).unwrap();
    let to = t.addr(ECHO_PORT);
    let ok = || h1_request("GET", "/ok", Some(HOST), &[], b"");
    let forbidden = || h1_request("GET", "/forbidden", Some(HOST), &[], b"");
    let fail = || h1_request("GET", "/fail", Some(HOST), &[("x-app-status", "503")], b"");
    // HTTP/1.1: 3 × 200, 2 × 403 (policy), 4 × 503 (the app's own answer).
    let h1 =
        t.h1(&t.client, to, vec![ok(), forbidden(), fail(), ok(), fail(), forbidden(), fail(), ok(), fail()]);
    let statuses: Vec<u16> = h1.iter().map(|a| a.as_ref().map(|r| r.status).unwrap_or(0)).collect();
    assert_eq!(statuses, [200, 403, 503, 200, 503, 403, 503, 200, 503], "{h1:?}");
    // HTTP/2: 2 × 200, 1 × 403, 1 × 503.
    let h2 = t.h2(
        &t.client,
        to,
        vec![
            H2Request::new("GET", HOST, "/ok"),
            H2Request::new("GET", HOST, "/forbidden"),
            H2Request::new("GET", HOST, "/fail").header("x-app-status", "503"),
            H2Request::new("GET", HOST, "/ok"),
        ],
    );
    let statuses: Vec<u16> = h2.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 403, 503, 200], "{h2:?}");

    let labels = format!(
        "reporter=\"destination\",destination_workload=\"server\",destination_workload_namespace=\"demo\",\
         source_workload=\"client\",source_workload_namespace=\"demo\",source_principal=\"{CLIENT_ID}\",\
         destination_principal=\"spiffe://cluster.local/ns/demo/sa/echo\",\
         connection_security_policy=\"mutual_tls\",request_protocol=\"http\""
    );
    let checks: Vec<(String, f64)> = vec![
        (format!("sum(ferry_requests_total{{{labels},response_code=\"200\",response_flags=\"-\"}})"), 5.0),
        (format!("sum(ferry_requests_total{{{labels},response_code=\"403\",response_flags=\"-\"}})"), 3.0),
        (format!("sum(ferry_requests_total{{{labels},response_code=\"503\",response_flags=\"-\"}})"), 5.0),
        (format!("sum(ferry_requests_total{{{labels}}})"), 13.0),
        (format!("sum(ferry_request_duration_milliseconds_count{{{labels}}})"), 13.0),
        ("sum(ferry_requests_total{reporter=\"destination\"})".to_owned(), 13.0),
    ];
    let deadline = Instant::now() + PROM_WAIT;
    loop {
        let bad: Vec<String> = checks
            .iter()
            .map(|(q, want)| {
                let got = prom.query(q).unwrap();
                (q, want, got.first().map(|(_, v)| *v))
            })
            .filter(|(_, want, got)| *got != Some(**want))
            .map(|(q, want, got)| format!("  {q} = {got:?}, want {want}"))
            .collect();
        if bad.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let scrape = http_get(dest_node.netns_path(), METRICS_ADDR, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            let requests: Vec<&str> =
                scrape.lines().filter(|l| l.starts_with("ferry_requests_total")).collect();
            panic!(
                "after {PROM_WAIT:?} Prometheus (pid {}) still disagrees:\n{}\ntargets: {}\nlog:\n{}\nagent's series:\n{}",
                prom.pid(),
                bad.join("\n"),
                prom.targets(),
                prom.log(),
                requests.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every series carries Istio's label set; the codes are exactly these three.
    let series = prom.query("ferry_requests_total{reporter=\"destination\"}").unwrap();
    let mut codes: Vec<String> =
        series.iter().map(|(l, _)| l["response_code"].as_str().unwrap_or_default().to_owned()).collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes, ["200", "403", "503"], "{series:?}");
    for (l, _) in &series {
        for key in ["destination_service", "grpc_response_status", "response_flags", "source_workload"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
    }
    // Prometheus is killed by pid when its guard drops, before the nodes go.
    drop(prom);
}

#[test]
fn access_log_has_one_line_per_request() {
    let deny = DENY_PRIVATE.replace("/private", "/forbidden");
    let t = L7Mesh::start("l7log", At::Remote, &[("deny.yaml", &deny)]).unwrap();
    let to = t.addr(ECHO_PORT);
    let release = tempfile::tempdir().unwrap();

    for proto in ["h1", "h2"] {
        let gate = release.path().join(proto);
        let requests = [
            ("GET", "/a", b"".as_slice(), None),
            ("POST", "/b", b"seven b".as_slice(), None),
            ("GET", "/forbidden", b"".as_slice(), None),
            ("GET", "/fail", b"".as_slice(), Some("503")),
            ("GET", "/c?x=1", b"".as_slice(), None),
        ];
        let n = requests.len();
        let owned: Vec<(String, String, Vec<u8>, Option<String>)> = requests
            .iter()
            .map(|(m, p, b, s)| {
                (
                    m.to_string(),
                    format!("{p}{}{proto}", if p.contains('?') { "&v=" } else { "?v=" }),
                    b.to_vec(),
                    s.map(str::to_owned),
                )
            })
            .collect();
        let sent = owned.clone();
        let child_gate = gate.clone();
        let done = release.path().join(format!("{proto}-done"));
        let child_done = done.clone();
        // The client holds its one connection open after its requests until released, so the
        // live connection can be inspected. It says when its requests are done: only then does
        // this process run the CLI, since a forked child keeps every descriptor it inherited
        // (a CLI's output pipe among them, were one being spawned at fork time).
        let (answers, conn) = std::thread::scope(|s| {
            let client = s.spawn(|| {
                t.run(&t.client, move || -> Vec<(u16, usize)> {
                    let wait_for_release = || {
                        let _ = std::fs::write(&child_done, b"done");
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while !child_gate.exists() && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    };
                    if proto == "h1" {
                        let mut c = H1::connect(to).expect("connect");
                        let answers = sent
                            .iter()
                            .map(|(m, p, b, s)| {
                                let headers: Vec<(&str, &str)> =
                                    s.iter().map(|s| ("x-app-status", s.as_str())).collect();
                                let r =
                                    c.request(&h1_request(m, p, Some(HOST), &headers, b)).expect("an answer");
                                (r.status, r.body.len())
                            })
                            .collect();
                        wait_for_release();
                        answers
                    } else {
                        let requests: Vec<H2Request> = sent
                            .iter()
                            .map(|(m, p, b, s)| {
                                let mut r = H2Request::new(m, HOST, p).body(b);
                                if let Some(s) = s {
                                    r = r.header("x-app-status", s);
                                }
                                r
                            })
                            .collect();
                        let answers = h2_exchange_holding(to, &requests, wait_for_release).expect("HTTP/2");
                        answers.iter().map(|r| (r.status, r.body.len())).collect()
                    }
                })
            });
            // The client is let go however this thread leaves the scope, a failed assertion too.
            let _release = Release(gate.clone());
            // While the client holds on: one live HTTP connection of the client with n requests.
            let want_protocol = if proto == "h1" { "http/1.1" } else { "h2" };
            let deadline = Instant::now() + EVENT_WAIT;
            while !done.exists() {
                assert!(Instant::now() < deadline, "{proto}: the client never finished its requests");
                std::thread::sleep(Duration::from_millis(20));
            }
            let conn = loop {
                let out = ferry(t.dest().0, &["connections", "-o", "json"]).unwrap();
                let live: Value = serde_json::from_str(&out).unwrap();
                let found = live.as_array().into_iter().flatten().find(|c| {
                    c["direction"] == "inbound"
                        && c["protocol"] == want_protocol
                        && c["requests"] == n
                        && c["source_identity"] == CLIENT_ID
                });
                if let Some(c) = found {
                    break c.clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "no live {want_protocol} connection with {n} requests: {live:#}\nevents: {:#?}",
                    t.dest().0.events()
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            drop(_release);
            (client.join().expect("the client thread"), conn)
        });
        let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, [200, 200, 403, 503, 200], "{proto}: {answers:?}");

        // Exactly n request lines of that connection, in order, with their fields.
        let id = conn["id"].clone();
        let closed = wait_events(t.dest().0, 1, |e| e["event"] == "conn_close" && e["id"] == id);
        assert_eq!(closed.len(), 1, "{proto}: the connection closed: {:?}", t.dest().0.events());
        let lines: Vec<Value> = t.request_lines().into_iter().filter(|l| l["conn"] == id).collect();
        assert_eq!(lines.len(), n, "{proto}: one line per request: {lines:#?}");
        let version = if proto == "h1" { "HTTP/1.1" } else { "HTTP/2" };
        for ((line, (method, path, body, _)), (status, body_len)) in lines.iter().zip(&owned).zip(&answers) {
            let denied = path.starts_with("/forbidden");
            let want = json!({
                "method": method, "authority": HOST, "path": path, "status": status,
                "bytes_received": body.len(), "bytes_sent": body_len, "response_flags": "-",
                "policy_decision": if denied { "deny" } else { "allow" },
                "policy": if denied { json!("demo/deny-private") } else { Value::Null },
                "policy_rule": if denied { json!(0) } else { Value::Null },
                "rejected": null, "protocol": version, "source_principal": CLIENT_ID,
                "source_workload": "client", "destination_workload": "server",
                "connection_security_policy": "mutual_tls",
            });
            for (key, value) in want.as_object().unwrap() {
                assert_eq!(&line[key], value, "{proto}: {key} of {line}");
            }
            assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
            assert!(line["time"].as_str().is_some_and(|t| !t.is_empty()), "{line}");
            assert_eq!(
                line["request_id"].is_string(),
                !denied,
                "an allowed request carries its x-request-id: {line}"
            );
        }
        // The events file has the same requests.
        let events = wait_events(t.dest().0, n, |e| e["event"] == "http_request" && e["conn"] == id);
        assert_eq!(events.len(), n, "{proto}");
    }
}

/// Releases a held client (by creating its gate file) when dropped.
struct Release(std::path::PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"go");
    }
}
