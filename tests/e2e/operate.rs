//! The operating surface against a running agent: a real Prometheus scraping the metrics endpoint,
//! the `ferry` CLI over the admin socket, the access log, and what a pod can and cannot reach.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use ferry_tests::prometheus::{Prometheus, http_get};
use ferry_tests::testapp::{self, ConnectOpts, ConnectReport, Trailer};
use ferry_tests::{Pod, bin_path};
use serde_json::Value;

/// Where the agent serves metrics inside the node's network namespace (its default).
const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
/// How long to wait for Prometheus to see what was sent.
const PROM_WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers: the CLI, plain HTTP inside a netns, Prometheus.
// ---------------------------------------------------------------------------------------------

/// One run of the `ferry` CLI.
#[derive(Debug)]
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "ferry failed: {self:?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("ferry -o json printed bad JSON ({e}): {self:?}"))
    }
}

/// Runs `ferry --admin-socket SOCKET ARGS...` from the test (the socket is a path in the shared
/// file system, so no namespace is needed); the CLI bounds its own request time.
fn ferry(socket: &Path, args: &[&str]) -> CliRun {
    let out = Command::new(bin_path("ferry"))
        .arg("--admin-socket")
        .arg(socket)
        .args(args)
        .env_remove("FERRY_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the ferry CLI");
    CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What a PromQL query must return.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Exactly this value.
    Eq(f64),
    /// At least this value.
    AtLeast(f64),
    /// No sample at all.
    Absent,
}

impl Want {
    fn accepts(self, got: Option<f64>) -> bool {
        match (self, got) {
            (Want::Eq(want), Some(v)) => v == want,
            (Want::AtLeast(want), Some(v)) => v >= want,
            (Want::Absent, None) => true,
            _ => false,
        }
    }
}

/// The bytes the echo servers wrote back over a report's connections of `bytes` each: the echo
/// and a trailer naming the peer each server saw (both server tags have the same length).
fn echoed_back(report: &ConnectReport, bytes: usize) -> u64 {
    report
        .peers_seen_by_server
        .iter()
        .map(|peer| {
            let trailer = Trailer { tag: "server-1".into(), bytes: bytes as u64, peer: peer.clone() };
            (bytes + trailer.to_line().len()) as u64
        })
        .sum()
}

/// Sends `conns` connections of `bytes` each from `pod` to `addr`, all of which must succeed.
fn traffic(pod: &Pod, addr: impl std::fmt::Display, conns: usize, bytes: usize) -> ConnectReport {
    let opts = ConnectOpts { bytes, conns, ..ConnectOpts::default() };
    let report = testapp::connect(pod, &addr, &opts).expect("testapp connect ran");
    assert_eq!((report.ok, report.failed), (conns as u64, 0), "{} -> {addr}: {report:?}", pod.name());
    report
}

// ---------------------------------------------------------------------------------------------
// Prometheus.
// ---------------------------------------------------------------------------------------------

#[test]
fn real_prometheus_scrapes_agent_metrics() {
    let s = Scenario::start("prom").unwrap();
    let prom = Prometheus::start(&s.node, METRICS_ADDR).unwrap();
    const N: usize = 5;
    const BYTES: usize = 1500;
    let report = traffic(&s.client, service_addr(false), N, BYTES);
    assert_eq!(report.bytes_echoed, (N * BYTES) as u64);

    // Each expectation: the PromQL and the value Prometheus must return.
    let n = N as f64;
    let sent = (N * BYTES) as f64;
    let back = echoed_back(&report, BYTES) as f64;
    let checks = [
        ("up{job=\"ferry\"}", Want::Eq(1.0)),
        ("sum(ferry_tcp_connections_opened_total{reporter=\"source\"})", Want::Eq(n)),
        ("sum(ferry_tcp_connections_closed_total{reporter=\"source\"})", Want::Eq(n)),
        ("sum(ferry_tcp_received_bytes_total{reporter=\"source\"})", Want::Eq(sent)),
        // The echo plus each server's trailer came back to the client.
        ("sum(ferry_tcp_sent_bytes_total{reporter=\"source\"})", Want::Eq(back)),
        (
            "sum(ferry_tcp_connections_closed_total{reporter=\"source\",source_workload=\"client\",\
             source_workload_namespace=\"demo\",destination_service=\"demo/echo\",\
             connection_security_policy=\"none\",request_protocol=\"tcp\"})",
            Want::Eq(n),
        ),
        // The servers' side reports the same connections and bytes.
        (
            "sum(ferry_tcp_connections_closed_total{reporter=\"destination\",source_workload=\"client\"})",
            Want::Eq(n),
        ),
        ("sum(ferry_tcp_received_bytes_total{reporter=\"destination\"})", Want::Eq(sent)),
        ("sum(ferry_tcp_sent_bytes_total{reporter=\"destination\"})", Want::Eq(back)),
        ("sum(ferry_tcp_connection_duration_seconds_count{reporter=\"source\"})", Want::Eq(n)),
        ("sum(ferry_tcp_connections_failed_total)", Want::Absent),
        ("sum(ferry_bpf_redirects_total{direction=\"outbound\",pod=\"demo/client\"})", Want::AtLeast(n)),
        ("sum(ferry_bpf_redirects_total{direction=\"inbound\"})", Want::AtLeast(n)),
        ("count(ferry_build_info)", Want::Eq(1.0)),
        ("sum(process_resident_memory_bytes{job=\"ferry\"})", Want::AtLeast(1.0)),
    ];
    let deadline = Instant::now() + PROM_WAIT;
    loop {
        let bad: Vec<String> = checks
            .iter()
            .map(|(q, want)| (q, want, prom.scalar(q).unwrap()))
            .filter(|(_, want, got)| !want.accepts(*got))
            .map(|(q, want, got)| format!("  {q} = {got:?}, want {want:?}"))
            .collect();
        if bad.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let scrape = http_get(s.node.netns_path(), METRICS_ADDR, "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_else(|e| format!("(scrape failed: {e:#})"));
            let targets = prom.targets();
            panic!(
                "after {PROM_WAIT:?} Prometheus still disagrees with the {N} connections of {BYTES} bytes sent:\n\
                 {}\ntargets: {targets}\nprometheus log:\n{}\nagent /metrics:\n{scrape}",
                bad.join("\n"),
                prom.log()
            );
        }
        sleep(Duration::from_millis(500));
    }

    // Per-series labels: one source series to each endpoint pod, with Istio's label set.
    let series = prom.query("ferry_tcp_connections_closed_total{reporter=\"source\"}").unwrap();
    let mut by_workload = BTreeMap::new();
    for (labels, value) in &series {
        for key in ["source_principal", "destination_principal"] {
            assert_eq!(labels[key], "unknown", "no CA on this node: {labels}");
        }
        assert_eq!(labels["destination_workload_namespace"], "demo", "{labels}");
        by_workload.insert(labels["destination_workload"].as_str().unwrap_or_default().to_owned(), *value);
    }
    let total: f64 = by_workload.values().sum();
    assert_eq!(total, n, "{series:?}");
    assert!(
        by_workload.keys().all(|w| w == "server-1" || w == "server-2"),
        "destination workloads are the endpoint pods: {by_workload:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The CLI.
// ---------------------------------------------------------------------------------------------

const ENROLLED: [&str; 3] = ["client", "server-1", "server-2"];

#[test]
fn cli_workloads_lists_enrolled_pods() {
    let s = Scenario::start("cliwl").unwrap();
    let sock = s.agent.admin_socket();

    let table = ferry(&sock, &["workloads"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAMESPACE", "NAME", "IP", "STEERED", "APP-PEER", "MODE", "IDENTITY", "PROGRAMS"],
        "{}",
        table.stdout
    );
    let rows: BTreeMap<String, Vec<String>> = lines
        .map(|l| {
            let cells: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
            (cells.get(1).cloned().unwrap_or_default(), cells)
        })
        .collect();
    assert_eq!(rows.keys().map(String::as_str).collect::<Vec<_>>(), ENROLLED, "{}", table.stdout);
    assert!(!table.stdout.contains(s.outsider.name()), "the outsider is not in the mesh: {}", table.stdout);
    for pod in std::iter::once(&s.client).chain(&s.servers) {
        let row = &rows[pod.name()];
        assert_eq!(row[0], NAMESPACE, "{row:?}");
        assert_eq!(row[2], format!("{},{}", pod.ipv4(), pod.ipv6()), "{row:?}");
        // Every address of the pod is steered: the listed ones and its link-local one.
        let steered: Vec<&str> = row[3].split(',').collect();
        assert!(steered.contains(&pod.ipv4().to_string().as_str()), "{row:?}");
        assert!(steered.contains(&pod.ipv6().to_string().as_str()), "{row:?}");
        assert!(steered.iter().any(|a| a.starts_with("fe80::")), "{row:?}");
        assert_eq!(row[4], "client", "the app sees its clients' real addresses: {row:?}");
        assert!(row[7].contains("connect4") && row[7].contains("sk_lookup"), "programs attached: {row:?}");
        assert!(row[7].contains("getpeername4") && row[7].contains("getpeername6"), "{row:?}");
    }

    let json = ferry(&sock, &["-o", "json", "workloads"]).json();
    let list = json.as_array().expect("workloads is an array");
    let names: Vec<&str> = list.iter().map(|w| w["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(names, ENROLLED, "{json:#}");
    for w in list {
        assert_eq!(w["enrolled"], true, "{w}");
        assert_eq!(w["namespace"], NAMESPACE, "{w}");
        let pod = s.node.pod(w["name"].as_str().unwrap()).unwrap();
        assert_eq!(w["netns"], pod.netns_path().display().to_string(), "{w}");
        assert_eq!(w["cgroup"], pod.cgroup_path().display().to_string(), "{w}");
        assert_eq!(w["programs"].as_array().map(Vec::len), Some(6), "{w}");
        assert_eq!(w["app_source"], "client", "{w}");
    }

    let yaml = ferry(&sock, &["workloads", "-o", "yaml"]);
    assert_eq!(yaml.code, Some(0), "{yaml:?}");
    assert!(yaml.stdout.starts_with("- "), "a YAML sequence: {}", yaml.stdout);
    for name in ENROLLED {
        assert!(yaml.stdout.contains(&format!("name: {name}\n")), "{name} missing from\n{}", yaml.stdout);
    }
    assert_eq!(yaml.stdout.matches("enrolled: true").count(), 3, "{}", yaml.stdout);
    assert!(!yaml.stdout.contains(s.outsider.name()), "{}", yaml.stdout);
}

#[test]
fn cli_connections_shows_live_connection() {
    let s = Scenario::start("cliconn").unwrap();
    let sock = s.agent.admin_socket();
    let vip = service_addr(false);
    let server_addrs: BTreeSet<String> = s.servers.iter().map(|p| sock_str(p.ipv4().into())).collect();

    let idle = ferry(&sock, &["connections"]);
    assert_eq!(idle.code, Some(0), "{idle:?}");
    assert!(idle.stdout.is_empty() && idle.stderr.contains("No connections found."), "{idle:?}");

    // The client holds its connection open until the listing has been checked.
    let held = testapp::connect_held(&s.client, vip, &ConnectOpts { bytes: 777, ..ConnectOpts::default() })
        .expect("testapp connect started");
    // While the client holds its connection: the outbound record and the server's inbound one.
    let deadline = Instant::now() + EVENT_WAIT;
    let (outbound, inbound) = loop {
        let list = ferry(&sock, &["-o", "json", "connections"]).json();
        let find = |dir: &str| list.as_array().unwrap().iter().find(|c| c["direction"] == dir).cloned();
        if let (Some(o), Some(i)) = (find("outbound"), find("inbound")) {
            break (o, i);
        }
        assert!(Instant::now() < deadline, "the held connection never showed up: {list:#}");
        sleep(Duration::from_millis(50));
    };
    assert_eq!(outbound["pod"], "demo/client", "{outbound}");
    assert_eq!(outbound["original_dst"], vip.to_string(), "{outbound}");
    assert_eq!(outbound["service"], "demo/echo", "{outbound}");
    assert_eq!(outbound["security"], "none", "{outbound}");
    let endpoint = outbound["endpoint"].as_str().unwrap_or_default().to_owned();
    assert!(server_addrs.contains(&endpoint), "endpoint {endpoint} is a server pod: {outbound}");
    assert!(outbound["src"].as_str().unwrap_or_default().starts_with("127.0.0.1:"), "{outbound}");
    // The server pod's side of the same connection: its original destination is the endpoint.
    let server = s.servers.iter().find(|p| sock_str(p.ipv4().into()) == endpoint).unwrap();
    assert_eq!(inbound["pod"], pod_key(server), "{inbound}");
    assert_eq!(inbound["original_dst"], endpoint.as_str(), "{inbound}");
    assert_eq!(
        inbound["src"].as_str().unwrap().split(':').next(),
        Some(s.client.ipv4().to_string().as_str())
    );

    let table = ferry(&sock, &["connections"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    let header = table.stdout.lines().next().unwrap_or_default();
    for col in
        ["ID", "DIRECTION", "POD", "SRC", "ORIGINAL_DST", "ENDPOINT", "BYTES_SENT", "BYTES_RECEIVED", "AGE"]
    {
        assert!(header.split_whitespace().any(|h| h == col), "column {col} in {header:?}");
    }
    let row = table
        .stdout
        .lines()
        .find(|l| l.contains(" outbound ") && l.contains("demo/client"))
        .unwrap_or_else(|| panic!("no outbound row:\n{}", table.stdout));
    assert!(row.contains(&format!(" {vip} ")), "the original destination is shown: {row}");
    assert!(row.contains(&format!(" {endpoint} ")), "the endpoint is shown: {row}");
    eprintln!("ferry connections (table):\n{}", table.stdout);

    let report = held.release().unwrap();
    assert_eq!(report.ok, 1, "{report:?}");
    // Closed connections leave the table.
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let list = ferry(&sock, &["-o", "json", "connections"]).json();
        if list.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "closed connections stay listed: {list:#}");
        sleep(Duration::from_millis(50));
    }
}

/// A server's address on [`SERVER_PORT`] as the agent prints it.
fn sock_str(ip: IpAddr) -> String {
    sock(ip, SERVER_PORT)
}

#[test]
fn cli_trace_explains_capture_and_endpoint() {
    let s = Scenario::start("clitrace").unwrap();
    let sock = s.agent.admin_socket();
    let servers: BTreeMap<String, &Pod> = s.servers.iter().map(|p| (pod_key(p), p)).collect();

    let t = ferry(&sock, &["trace", "demo/client", "10.96.0.10:80", "-o", "json"]).json();
    assert_eq!(t["pod"], "demo/client", "{t:#}");
    assert_eq!(t["captured"], true, "{t:#}");
    assert_eq!(t["program"], "ferry_connect4", "{t:#}");
    assert_eq!(t["service"]["name"], "demo/echo", "{t:#}");
    assert_eq!(t["service"]["target_port"], SERVER_PORT, "{t:#}");
    let ep_pod = t["endpoint"]["pod"].as_str().unwrap_or_default();
    let server = servers.get(ep_pod).unwrap_or_else(|| panic!("endpoint is a server pod: {t:#}"));
    assert_eq!(t["endpoint"]["address"], sock_str(server.ipv4().into()), "{t:#}");
    assert_eq!(t["endpoint"]["node"], "node-a", "{t:#}");
    assert_eq!(t["transport"], "plaintext", "no CA on this node: {t:#}");

    let t6 = ferry(&sock, &["-o", "json", "trace", "demo/client", "[fd00:96::10]:80"]).json();
    assert_eq!((&t6["captured"], &t6["program"]), (&Value::Bool(true), &"ferry_connect6".into()), "{t6:#}");
    let ep6 = t6["endpoint"]["address"].as_str().unwrap_or_default();
    assert!(s.servers.iter().any(|p| sock_str(p.ipv6().into()) == ep6), "a server's IPv6 endpoint: {t6:#}");

    let lo = ferry(&sock, &["-o", "json", "trace", "demo/client", "127.0.0.1:80"]).json();
    assert_eq!(lo["captured"], false, "{lo:#}");
    assert!(lo["reason"].as_str().unwrap_or_default().contains("loopback"), "{lo:#}");
    assert!(lo["service"].is_null() && lo["endpoint"].is_null(), "{lo:#}");

    let text = ferry(&sock, &["trace", "demo/client", "10.96.0.10:80"]);
    assert_eq!(text.code, Some(0), "{text:?}");
    let out = &text.stdout;
    assert!(out.starts_with("demo/client -> 10.96.0.10:80\n"), "{out}");
    let field = |label: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{label}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {label:?} line in\n{out}"))
    };
    assert!(field("Captured").starts_with("yes by ferry_connect4"), "{out}");
    assert_eq!(field("Service"), "demo/echo (VIP 10.96.0.10:80, forwarded to port 8080)", "{out}");
    let endpoint = field("Endpoint");
    assert!(
        servers
            .iter()
            .any(|(k, p)| endpoint == format!("{k} at {} on node node-a", sock_str(p.ipv4().into()))),
        "{out}"
    );
    // The servers are mesh pods: plaintext because this node has no CA, not because they are outside.
    assert!(field("Transport").starts_with("plain TCP") && field("Transport").contains("no CA"), "{out}");
    assert!(!field("Identities").contains("outside the mesh"), "{out}");
    assert!(!out.contains('{'), "human text, not JSON: {out}");
    eprintln!("ferry trace (text):\n{out}");

    let lo_text = ferry(&sock, &["trace", "demo/client", "127.0.0.1:80"]);
    assert_eq!(lo_text.code, Some(0), "{lo_text:?}");
    assert!(lo_text.stdout.contains("Captured:  no: loopback"), "{}", lo_text.stdout);
    assert!(lo_text.stdout.contains("directly"), "{}", lo_text.stdout);

    let unknown = ferry(&sock, &["trace", "demo/nobody", "10.96.0.10:80"]);
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.stdout.is_empty(), "{unknown:?}");
    assert!(unknown.stderr.starts_with("error: "), "{unknown:?}");
    assert!(unknown.stderr.contains("no pod demo/nobody"), "names the pod: {unknown:?}");
    assert_eq!(unknown.stderr.lines().count(), 1, "one clear line: {unknown:?}");

    let malformed = ferry(&sock, &["trace", "nobody", "10.96.0.10:80"]);
    assert_eq!(malformed.code, Some(2), "{malformed:?}");
    assert!(malformed.stderr.contains("NAMESPACE/NAME"), "{malformed:?}");
    let bad_dest = ferry(&sock, &["trace", "demo/client", "10.96.0.10"]);
    assert_eq!(bad_dest.code, Some(2), "{bad_dest:?}");
    assert!(bad_dest.stderr.contains("IP:PORT"), "{bad_dest:?}");
}

#[test]
fn cli_reports_clear_error_when_agent_down() {
    let dir = tempfile::Builder::new().prefix("ferry-nosock-").tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let run = ferry(&missing, &["status"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(run.stderr.contains("not running"), "{run:?}");
    assert!(run.stderr.contains(&missing.display().to_string()), "names the path: {run:?}");

    // A socket file nobody listens on (an agent killed with SIGKILL leaves one).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let run = ferry(&stale, &["workloads"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("not running") && run.stderr.contains("stale"), "{run:?}");
    assert!(run.stderr.contains(&stale.display().to_string()), "{run:?}");

    // A real agent: answering, then stopped with SIGTERM.
    let s = Scenario::start("clidown").unwrap();
    let sock = s.agent.admin_socket();
    let up = ferry(&sock, &["status", "-o", "json"]).json();
    assert_eq!((&up["ready"], &up["pods_enrolled"]), (&Value::Bool(true), &3.into()), "{up:#}");
    let text = ferry(&sock, &["status"]);
    assert!(text.stdout.contains("Ready:") && text.stdout.contains("yes"), "{text:?}");
    // SIGTERM by hand (not Agent::stop, which removes the agent's directory with the socket in
    // it): the agent itself must remove its socket.
    let pid = s.agent.pid();
    // SAFETY: kill(2) of the agent this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sock.exists() || !exited(pid) {
        assert!(Instant::now() < deadline, "agent {pid} did not exit and remove {}", sock.display());
        sleep(Duration::from_millis(20));
    }
    assert!(s.agent.dir().exists(), "the agent's directory is still there");
    let run = ferry(&sock, &["status"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("not running"), "{run:?}");
    assert!(run.stderr.contains(&sock.display().to_string()), "{run:?}");
}

/// Whether the child `pid` has exited (it stays a zombie until the harness reaps it).
fn exited(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.is_empty() || status.lines().any(|l| l.starts_with("State:") && l.contains('Z'))
}

// ---------------------------------------------------------------------------------------------
// What pods can reach.
// ---------------------------------------------------------------------------------------------

/// The nobody user and group.
const NOBODY: u32 = 65534;

/// From a child forked into `pod` (netns and cgroup), as root or after dropping root for `nobody`:
/// the errno of connecting to the Unix socket at `path`, or `None` when it connected.
fn connect_from_pod(pod: &Pod, path: &Path, as_nobody: bool) -> Option<i32> {
    let path = path.to_owned();
    pod.run_in_cgroup(move || {
        if as_nobody {
            // SAFETY: plain credential syscalls in this single-threaded forked child.
            unsafe {
                assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
                assert_eq!(libc::setgid(NOBODY), 0, "setgid");
                assert_eq!(libc::setuid(NOBODY), 0, "setuid");
                assert_eq!(libc::geteuid(), NOBODY);
            }
        }
        std::os::unix::net::UnixStream::connect(&path).err().map(|e| e.raw_os_error().unwrap_or(-1))
    })
    .expect("the forked child ran")
}

#[test]
fn admin_api_is_not_reachable_from_pods() {
    let s = Scenario::start("reach").unwrap();
    let sock = s.agent.admin_socket();

    // (a) The admin socket: a root-only file.
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket(), "{} is a socket", sock.display());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "mode of {}", sock.display());
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owned by root");
    // A non-root process in a pod cannot open it, even through a directory it may traverse: the
    // socket's own mode refuses the connect.
    let dir = s.agent.dir();
    let dir_mode = std::fs::metadata(dir).unwrap().permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let errno = connect_from_pod(&s.client, &sock, true);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode)).unwrap();
    assert_eq!(errno, Some(libc::EACCES), "connect as uid {NOBODY} must fail with EACCES");
    // The same child as root does connect: the refusal above is the permission check, not a
    // missing path.
    assert_eq!(connect_from_pod(&s.client, &sock, false), None, "root in the pod's namespaces connects");
    // The CLI run by a non-root user says why.
    let out = Command::new(bin_path("ferry"))
        .args(["--admin-socket", sock.to_str().unwrap(), "status"])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied") && stderr.contains("root"), "{stderr}");

    // (b) TCP: metrics answer on the node's loopback only.
    let node_netns = s.node.netns_path();
    let (status, body) = http_get(node_netns, METRICS_ADDR, "/metrics").unwrap();
    assert_eq!(status, 200, "the node itself scrapes {METRICS_ADDR}");
    assert!(body.contains("ferry_build_info"), "{body}");
    let node_addrs = [
        SocketAddr::new(s.node.bridge_ipv4().into(), METRICS_ADDR.port()),
        SocketAddr::new(s.node.bridge_ipv6().into(), METRICS_ADDR.port()),
    ];
    // A raw connect from the pod's netns (what an unenrolled or hostile process does): refused.
    for addr in node_addrs.iter().copied().chain([METRICS_ADDR]) {
        let result = s.client.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)));
        let err = result.expect_err(&format!("a pod reached {addr}"));
        assert!(
            matches!(err.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut),
            "{addr}: {err}"
        );
    }
    // The pod's app (captured by connect4, so the proxy dials for it): no metrics come back.
    for addr in node_addrs {
        let answer: Result<String, String> = s
            .client
            .run_in_cgroup(move || {
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
                // The write may already fail: the proxy closes once its own dial is refused.
                let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
                let mut got = Vec::new();
                match s.read_to_end(&mut got) {
                    Ok(_) => Ok(String::from_utf8_lossy(&got).into_owned()),
                    Err(e) => Err(e.to_string()),
                }
            })
            .unwrap();
        if let Ok(text) = &answer {
            assert!(text.is_empty(), "the pod's app got an answer from {addr}: {text:?}");
        }
        let failed =
            wait_events(&s.agent, 1, |e| e["event"] == "conn_failed" && e["orig_dst"] == addr.to_string());
        assert_eq!(failed.len(), 1, "the proxy's dial to {addr} from the pod failed: {:?}", s.agent.events());
    }

    // Every listener the agent has in the node's netns is on loopback or a Unix socket.
    let pid = format!("pid={},", s.agent.pid());
    let ss = |args: &[&str]| -> Vec<String> {
        let out = s.node.command("ss").args(args).output().expect("ss (iproute2)");
        assert!(out.status.success(), "ss {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&pid)).map(str::to_owned).collect()
    };
    let inet = ss(&["-Hltunp"]);
    assert!(!inet.is_empty(), "the agent's metrics listener shows up in ss");
    for line in &inet {
        let local = line.split_whitespace().nth(4).unwrap_or_default();
        assert!(local.starts_with("127.0.0.1:"), "agent listens beyond loopback: {line}");
    }
    assert!(inet.iter().any(|l| l.contains("127.0.0.1:15020")), "{inet:?}");
    let unix = ss(&["-Hlxp"]);
    // The kernel names a Unix socket by its bind path: the agent binds in place in a private
    // directory, and in a private subdirectory before moving into a shared one (as the harness's is).
    let dir = s.agent.dir().display().to_string();
    let admin: Vec<&String> = unix
        .iter()
        .filter(|l| {
            l.split_whitespace().nth(4).is_some_and(|p| p.starts_with(&dir) && p.ends_with("/admin.sock"))
        })
        .collect();
    assert_eq!(admin.len(), 1, "the admin socket is the agent's Unix listener: {unix:?}");
}

// ---------------------------------------------------------------------------------------------
// The access log.
// ---------------------------------------------------------------------------------------------

/// Every access-log line's fields: Istio's labels, then the connection's own.
const ACCESS_FIELDS: &str = "time reporter source_workload source_workload_namespace source_principal \
    destination_workload destination_workload_namespace destination_service destination_principal \
    connection_security_policy request_protocol id src orig_dst endpoint bytes_sent bytes_received \
    duration_ms close_reason";

/// Waits until the access log has `n` lines, then a little longer to catch extra ones.
fn access_lines(agent: &ferry_tests::Agent, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + EVENT_WAIT;
    while agent.access_log().len() < n && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    sleep(Duration::from_millis(500));
    agent.access_log()
}

#[test]
fn access_log_has_one_line_per_connection() {
    let s = Scenario::start("alog").unwrap();
    let (vip, server1, server2) = (service_addr(false), &s.servers[0], &s.servers[1]);
    const VIP_CONNS: usize = 3;
    const VIP_BYTES: usize = 1000;
    const DIRECT_BYTES: usize = 500;
    const OUTSIDER_BYTES: usize = 321;
    let via_vip = traffic(&s.client, vip, VIP_CONNS, VIP_BYTES);
    let direct = traffic(&s.client, sock_str(server1.ipv4().into()), 1, DIRECT_BYTES);
    let outsider = traffic(&s.outsider, sock_str(server2.ipv4().into()), 1, OUTSIDER_BYTES);
    // Plaintext straight at server-1's inbound proxy port: refused, never proxied.
    let refused_dst = SocketAddr::new(server1.ipv4().into(), 15006);
    let refused =
        testapp::connect(&s.client, refused_dst, &ConnectOpts { bytes: 10, ..ConnectOpts::default() })
            .expect("testapp connect ran");
    assert_eq!(refused.ok, 0, "a proxy port is not a way in: {refused:?}");

    // 4 outbound (client) + 5 inbound (servers) proxied connections, 1 refused.
    let lines = access_lines(&s.agent, 10);
    let dump = || lines.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
    assert_eq!(lines.len(), 10, "one line per connection per reporter:\n{}", dump());
    let ids: BTreeSet<u64> = lines.iter().filter_map(|l| l["id"].as_u64()).collect();
    assert_eq!(ids.len(), lines.len(), "each line is its own connection:\n{}", dump());

    for l in &lines {
        for key in ACCESS_FIELDS.split_whitespace() {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
            // Refusals have no endpoint or measured duration; inbound lines no endpoint.
            if !matches!(key, "duration_ms" | "endpoint") {
                assert!(!l[key].is_null(), "{key} is null in {l}");
            }
        }
        assert_eq!(l["request_protocol"], "tcp", "{l}");
        assert_eq!(l["connection_security_policy"], "none", "no CA on this node: {l}");
        assert_eq!(
            (&l["source_principal"], &l["destination_principal"]),
            (&"unknown".into(), &"unknown".into())
        );
    }
    let (refused_lines, proxied): (Vec<&Value>, Vec<&Value>) =
        lines.iter().partition(|l| l["orig_dst"] == refused_dst.to_string());
    assert_eq!(refused_lines.len(), 1, "{}", dump());
    let r = refused_lines[0];
    assert_eq!((&r["reporter"], &r["pod"]), (&"destination".into(), &pod_key(server1).into()), "{r}");
    assert_eq!((&r["bytes_sent"], &r["bytes_received"]), (&0.into(), &0.into()), "{r}");
    assert!(r["close_reason"].as_str().unwrap_or_default().contains("proxy port"), "{r}");
    for l in &proxied {
        assert_eq!(l["close_reason"], "eof", "{l}");
        assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
    }
    // The refusal is counted as a failed connection of server-1, nothing else failed.
    let (_, metrics) = http_get(s.node.netns_path(), METRICS_ADDR, "/metrics").unwrap();
    let failed: Vec<&str> =
        metrics.lines().filter(|l| l.starts_with("ferry_tcp_connections_failed_total{")).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    for want in
        ["reporter=\"destination\"", "destination_workload=\"server-1\"", "source_workload=\"client\""]
    {
        assert!(failed[0].contains(want), "{want} in {failed:?}");
    }
    assert!(failed[0].ends_with("} 1"), "{failed:?}");

    let source: Vec<&Value> = proxied.iter().copied().filter(|l| l["reporter"] == "source").collect();
    let dest: Vec<&Value> = proxied.iter().copied().filter(|l| l["reporter"] == "destination").collect();
    assert_eq!((source.len(), dest.len()), (VIP_CONNS + 1, VIP_CONNS + 2), "{}", dump());

    // The client's side: Istio's source labels, the service for VIP connections, exact bytes.
    let server_by_ip: BTreeMap<String, &Pod> =
        s.servers.iter().map(|p| (sock_str(p.ipv4().into()), p)).collect();
    for l in &source {
        assert_eq!(l["pod"], "demo/client", "{l}");
        assert_eq!(
            (&l["source_workload"], &l["source_workload_namespace"]),
            (&"client".into(), &"demo".into())
        );
        let endpoint = l["endpoint"].as_str().unwrap_or_default();
        let server = server_by_ip.get(endpoint).unwrap_or_else(|| panic!("endpoint is a server: {l}"));
        assert_eq!(l["destination_workload"], server.name(), "{l}");
        assert_eq!(l["destination_workload_namespace"], "demo", "{l}");
        let bytes = if l["orig_dst"] == vip.to_string() {
            assert_eq!(l["destination_service"], "demo/echo", "{l}");
            VIP_BYTES
        } else {
            assert_eq!(l["orig_dst"], endpoint, "{l}");
            assert_eq!(l["destination_service"], "unknown", "{l}");
            DIRECT_BYTES
        };
        assert_eq!(l["bytes_received"], bytes, "bytes received from the client: {l}");
        assert!(l["bytes_sent"].as_u64().unwrap_or(0) > bytes as u64, "echo and trailer sent back: {l}");
    }
    // What went back to the client is exactly the echo plus each server's trailer.
    let sent_back: u64 = source.iter().map(|l| l["bytes_sent"].as_u64().unwrap()).sum();
    let want = echoed_back(&via_vip, VIP_BYTES) + echoed_back(&direct, DIRECT_BYTES);
    assert_eq!(sent_back, want, "{}", dump());

    // The servers' side: destination labels, the source pod when it is in the mesh.
    let mut per_server: BTreeMap<String, usize> = BTreeMap::new();
    for l in &dest {
        let pod = l["pod"].as_str().unwrap_or_default();
        let server = s.servers.iter().find(|p| pod_key(p) == pod).unwrap_or_else(|| panic!("{l}"));
        *per_server.entry(server.name().to_owned()).or_default() += 1;
        assert_eq!(l["destination_workload"], server.name(), "{l}");
        assert_eq!(l["destination_workload_namespace"], "demo", "{l}");
        assert_eq!(l["destination_service"], "unknown", "the server's proxy sees a pod address: {l}");
        assert_eq!(l["orig_dst"], sock_str(server.ipv4().into()), "{l}");
        let src_ip = l["src"].as_str().unwrap_or_default().rsplit_once(':').map(|(ip, _)| ip.to_owned());
        if src_ip == Some(s.outsider.ipv4().to_string()) {
            assert_eq!(l["source_workload"], "unknown", "the outsider is not in the mesh: {l}");
            assert_eq!(l["bytes_received"], OUTSIDER_BYTES, "{l}");
        } else {
            assert_eq!(src_ip, Some(s.client.ipv4().to_string()), "{l}");
            assert_eq!(
                (&l["source_workload"], &l["source_workload_namespace"]),
                (&"client".into(), &"demo".into())
            );
            let b = l["bytes_received"].as_u64().unwrap_or(0);
            assert!(b == VIP_BYTES as u64 || b == DIRECT_BYTES as u64, "{l}");
        }
    }
    let from_client: u64 = dest
        .iter()
        .filter(|l| l["source_workload"] == "client")
        .map(|l| l["bytes_received"].as_u64().unwrap())
        .sum();
    assert_eq!(from_client, (VIP_CONNS * VIP_BYTES + DIRECT_BYTES) as u64, "{}", dump());
    // Each server answered what its access lines say it served.
    for (tag, n) in via_vip.tags.iter().chain(&direct.tags).chain(&outsider.tags) {
        assert!(per_server.get(tag).is_some_and(|&m| m as u64 >= *n), "{tag} served {n}: {per_server:?}");
    }
    assert_eq!(per_server.values().sum::<usize>(), VIP_CONNS + 2, "{per_server:?}");
}
