//! The agent under adverse conditions: its CA going away (certificates kept while valid, then fail
//! closed, then recovery), running out of file descriptors (back off, no spin, recovery), and an
//! application that stops reading (backpressure instead of buffering).

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use common::*;
use ferry_tests::counting_server::CountingServer;
use ferry_tests::procstat::{self, NofileGuard};
use ferry_tests::stall::{Sent, StallSink, send_pattern};
use ferry_tests::{Agent, MeshFile, NodeLink, Pod, SimNode, link_nodes};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// Seconds since the Unix epoch on the wall clock, the clock certificates are checked against.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`; `what` names the wait
/// in the error.
fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        sleep(Duration::from_millis(100));
    }
}

/// The value of `key=VALUE` in a log line of the agent's (tracing's plain format).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

// ---------------------------------------------------------------------------------------------
// The CA goes away.
// ---------------------------------------------------------------------------------------------

/// SVID lifetime of the CA test: renewal (and so the first failure) at 15 s leaves 15 s of a
/// still-valid certificate for the traffic that must keep working, even on a loaded machine.
const SHORT_TTL: u64 = 30;

/// Two nodes under one root with short SVIDs: node-a runs `client`; node-b runs server-1..3
/// (service account "echo", PERMISSIVE, so a plaintext fallback would be let in and show), each a
/// [`CountingServer`] on [`SERVER_PORT`]. Fields drop in order: agents first.
struct CaMesh {
    a: Agent,
    b: Agent,
    client: Pod,
    servers: Vec<Pod>,
    apps: Vec<CountingServer>,
    ca: tempfile::TempDir,
    _link: NodeLink,
    _node_a: SimNode,
    _node_b: SimNode,
}

impl CaMesh {
    fn start(name: &str) -> Result<Self> {
        let mut node_a = SimNode::new(&format!("{name}a"), 1)?;
        let mut node_b = SimNode::new(&format!("{name}b"), 2)?;
        let link = link_nodes(&node_a, &node_b)?;
        let client = node_a.add_pod("client")?;
        let servers =
            vec![node_b.add_pod("server-1")?, node_b.add_pod("server-2")?, node_b.add_pod("server-3")?];
        let apps = servers
            .iter()
            .map(|s| CountingServer::start(s, SERVER_PORT, s.name()))
            .collect::<Result<Vec<_>>>()?;
        let ca = ferry_tests::ca::make_ca(TD, &["node-a", "node-b"])?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), Some(SHORT_TTL));
            mesh.pod(&client, NAMESPACE, "client").node("node-a");
            for s in &servers {
                mesh.pod(s, NAMESPACE, SERVICE).node("node-b").mode("permissive");
            }
            mesh.to_toml()
        };
        let a = Agent::start(&node_a, &mesh_for("node-a")).context("agent on node-a")?;
        let b = Agent::start(&node_b, &mesh_for("node-b")).context("agent on node-b")?;
        Ok(Self { a, b, client, servers, apps, ca, _link: link, _node_a: node_a, _node_b: node_b })
    }

    /// server `i`'s echo address.
    fn server(&self, i: usize) -> String {
        sock(self.servers[i].ipv4().into(), SERVER_PORT)
    }

    /// node-a's private key file, what the agent needs to sign.
    fn node_a_key(&self) -> PathBuf {
        self.ca.path().join("nodes/node-a/ca.key")
    }

    /// node-a's `ferry certs` entry for the client identity, if it lists one.
    fn client_cert(&self) -> Option<Value> {
        let certs = self.a.cli_json(&["certs"]).expect("ferry certs on node-a");
        certs.as_array().into_iter().flatten().find(|c| c["identity"] == CLIENT_ID).cloned()
    }

    /// node-a's stderr lines about the client identity that contain `text`.
    fn client_log(&self, text: &str) -> Vec<String> {
        self.a
            .stderr()
            .lines()
            .filter(|l| l.contains(text) && l.contains(CLIENT_ID))
            .map(str::to_owned)
            .collect()
    }

    /// One 512-byte echo from the client to server `i`: the testapp report.
    fn echo(&self, i: usize) -> Value {
        connect(&self.client, &self.server(i), &["--bytes", "512", "--timeout-ms", "5000"]).unwrap()
    }

    /// node-b's inbound records for server `i`.
    fn inbound_records(&self, i: usize) -> Vec<Value> {
        let pod = pod_key(&self.servers[i]);
        self.b
            .events()
            .into_iter()
            .filter(|e| e["event"] == "conn_close" && e["direction"] == "inbound" && e["pod"] == pod)
            .collect()
    }

    /// Waits for node-b's inbound records of server `i` to reach `n`; asserts each came over
    /// mutual TLS from the client's identity.
    fn assert_mutual_tls_into(&self, i: usize, n: usize) {
        let pod = pod_key(&self.servers[i]);
        let found = wait_events(&self.b, n, |e| {
            e["event"] == "conn_close" && e["direction"] == "inbound" && e["pod"] == pod
        });
        assert_eq!(found.len(), n, "{pod}: {found:?}");
        for e in &found {
            assert_eq!(e["security"], "mutual_tls", "{e}");
            assert_eq!(e["src_identity"], CLIENT_ID, "{e}");
            assert_eq!(e["dst_identity"], ECHO_ID, "{e}");
        }
    }
}

#[test]
fn ca_outage_keeps_valid_certificate_then_fails_closed() {
    let t = CaMesh::start("cao").unwrap();
    let started = unix_now();
    let issued_at_start = t.client_log("issued SVID").len();
    assert_eq!(issued_at_start, 1, "one SVID for the client at start: {}", t.a.stderr());

    // The CA goes away on node-a: its key is what every issuance reads (the agent runs as root,
    // so a chmod would not stop it; a missing file does).
    let key = t.node_a_key();
    let offline = key.with_file_name("ca.key.offline");
    std::fs::rename(&key, &offline).unwrap();

    let warm = t.echo(0);
    assert_eq!(warm["ok"], 1, "the mesh works: {warm}");
    t.assert_mutual_tls_into(0, 1);

    // (a) Renewal at half-life fails with an error naming the CA's file, and the agent keeps the
    // certificate it has.
    let failed = wait_for(Duration::from_secs(SHORT_TTL + 30), "a failed renewal", || {
        t.client_log("SVID renewal failed; keeping the current certificate").into_iter().next()
    })
    .unwrap();
    assert!(failed.contains("cannot sign with the node CA") && failed.contains("ca.key"), "{failed}");
    let valid_until: u64 = log_field(&failed, "valid_until").and_then(|v| v.parse().ok()).expect(&failed);
    let first_failure = unix_now();
    println!(
        "ca outage: first renewal failure {}s after start; certificate valid until +{}s",
        first_failure - started,
        valid_until.saturating_sub(started)
    );
    let held = t.client_cert().expect("the client's certificate is still listed");
    assert_eq!(held["state"], "renewing", "{held}");
    // New TLS connections too, not only the one pooled before: server-2 was never contacted.
    let pooled = t.echo(0);
    let fresh = t.echo(1);
    let done = unix_now();
    assert!(
        done < valid_until,
        "inconclusive: the traffic of phase (a) ended at {done}, after the certificate's expiry at \
         {valid_until} (a very slow machine)"
    );
    assert_eq!((pooled["ok"].as_u64(), fresh["ok"].as_u64()), (Some(1), Some(1)), "{pooled} {fresh}");
    t.assert_mutual_tls_into(1, 1);
    assert_eq!(t.client_cert().unwrap()["serial"], held["serial"], "the same certificate served on");
    assert_eq!(t.client_log("issued SVID").len(), 1, "nothing was issued meanwhile");

    // (b) Past the certificate's expiry, with the CA still gone: a new mutual-TLS connection is
    // refused, and nothing reaches the app, although it is PERMISSIVE (no plaintext fallback).
    // server-3 was never contacted, so this is a new TLS handshake. (A new app connection to
    // server-1 would still succeed: the HBONE pool lends streams of the TLS connection opened
    // with the now-expired certificate for as long as that connection stays in use, a gap in
    // agent/src/hbone/client.rs left to its own fix.)
    wait_for(Duration::from_secs(SHORT_TTL), "the certificate's expiry", || {
        (unix_now() > valid_until).then_some(())
    })
    .unwrap();
    let listed = t.client_cert();
    assert!(listed.as_ref().is_none_or(|c| c["state"] == "expired"), "expired: {listed:?}");
    let accepted_before = t.apps[2].accepted();
    let refused = t.echo(2);
    assert_eq!(refused["ok"], 0, "an expired certificate must not open a connection: {refused}");
    assert_eq!(t.apps[2].accepted(), accepted_before, "server-3's app saw a connection");
    assert!(t.inbound_records(2).is_empty(), "{:?}", t.inbound_records(2));
    let failure = wait_events(&t.a, 1, |e| {
        e["event"] == "conn_failed" && e["pod"] == "demo/client" && e["endpoint"] == t.server(2)
    });
    assert_eq!(failure.len(), 1, "node-a records the refusal: {:?}", t.a.events());
    assert_eq!(failure[0]["security"], "mutual_tls", "no fallback to plaintext: {}", failure[0]);
    assert!(!t.client_log("refusing to use it").is_empty(), "the agent says why: {}", t.a.stderr());
    let plaintext: Vec<Value> = t.b.events().into_iter().filter(|e| e["security"] == "none").collect();
    assert!(plaintext.is_empty(), "nothing crossed in plaintext: {plaintext:?}");

    // (c) The CA is back: the next retry issues a fresh certificate, and new connections work.
    std::fs::rename(&offline, &key).unwrap();
    let restored = unix_now();
    wait_for(Duration::from_secs(90), "a fresh certificate after the CA came back", || {
        (t.client_log("issued SVID").len() > 1).then_some(())
    })
    .unwrap();
    println!("ca outage: fresh certificate {}s after the CA came back", unix_now() - restored);
    let renewed = t.client_cert().expect("the client's certificate is listed again");
    assert_eq!(renewed["state"], "valid", "{renewed}");
    assert_ne!(renewed["serial"], held["serial"], "a new certificate");
    let back = t.echo(2);
    assert_eq!(back["ok"], 1, "{back}");
    t.assert_mutual_tls_into(2, 1);
    assert_eq!(t.apps[2].accepted(), accepted_before + 1);
}

// ---------------------------------------------------------------------------------------------
// Out of file descriptors.
// ---------------------------------------------------------------------------------------------

/// Descriptors granted above what the agent uses when the limit is first lowered: room for about
/// ten proxied connections (four descriptors each: both sides of the outbound and the inbound
/// relay).
const FD_HEADROOM: u64 = 40;

/// The most connections the holder opens, should the limit somehow never be reached.
const MAX_HELD: usize = 200;

/// What [`hold_until_refused`] did.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    /// Connections that echoed and were held open.
    held: usize,
    /// Why the next one failed.
    refused: String,
    /// Whether the connection sent while the agent had no descriptor left was served once the
    /// others had closed, and what it echoed or why not.
    pending: Result<(), String>,
}

/// One echoed byte on `s` within `limit`.
fn echo_byte(s: &mut TcpStream, limit: Duration) -> Result<(), String> {
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(b"x").map_err(|e| format!("write: {e}"))?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) if b[0] == b'x' => Ok(()),
        Ok(n) => Err(format!("read {n} bytes ({b:?})")),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// Waits (polling) until file `path` exists; an error after `limit`.
fn wait_file(path: &Path, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear within {limit:?}", path.display()));
        }
        sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// In a child forked into the client pod: opens echo connections to `addr` one at a time and holds
/// each that echoes, until one does not (the agent is out of descriptors); says how many in file
/// `held`. Once file `pinned` exists (the agent then has no descriptor at all) it sends one more
/// connection, `pending`, which the agent cannot accept, and writes file `pending`. Once file
/// `release` exists it closes the held connections and waits for the pending one's echo.
fn hold_until_refused(addr: SocketAddr, dir: &Path) -> Result<Held, String> {
    let step = Duration::from_secs(60);
    let mut conns = Vec::new();
    let refused = loop {
        if conns.len() == MAX_HELD {
            return Err(format!("{MAX_HELD} connections and the agent still had descriptors"));
        }
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut s| echo_byte(&mut s, Duration::from_secs(3)).map(|()| s));
        match attempt {
            Ok(s) => conns.push(s),
            Err(e) => break e,
        }
    };
    std::fs::write(dir.join("held"), conns.len().to_string()).map_err(|e| e.to_string())?;
    wait_file(&dir.join("pinned"), step)?;
    let mut pending = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect of the pending connection: {e}"))?;
    pending.write_all(b"x").map_err(|e| format!("write on the pending connection: {e}"))?;
    std::fs::write(dir.join("pending"), "").map_err(|e| e.to_string())?;
    wait_file(&dir.join("release"), step)?;
    let held = conns.len();
    drop(conns);
    let mut b = [0u8; 1];
    pending.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let pending = match pending.read(&mut b) {
        Ok(1) if b[0] == b'x' => Ok(()),
        Ok(n) => Err(format!("the pending connection read {n} bytes")),
        Err(e) => Err(format!("the pending connection: {e}")),
    };
    Ok(Held { held, refused, pending })
}

/// The agent's stderr lines saying an accept failed.
fn accept_failures(agent: &Agent) -> Vec<String> {
    agent.stderr().lines().filter(|l| l.contains("accept failed")).map(str::to_owned).collect()
}

#[test]
fn fd_exhaustion_backs_off_and_recovers() {
    let s = Scenario::start("fdx").unwrap();
    let pid = s.agent.pid();
    let target: SocketAddr = sock(s.servers[0].ipv4().into(), SERVER_PORT).parse().unwrap();
    // Warm up: whatever the agent opens on its first proxied connection is open already.
    let warm = connect(&s.client, &target.to_string(), &["--bytes", "100", "--conns", "4"]).unwrap();
    assert_eq!(warm["ok"], 4, "{warm}");

    let in_use = procstat::open_fds(pid).unwrap();
    let base = procstat::lowest_free_fd(pid).unwrap();
    let limit = u64::from(base) + FD_HEADROOM;
    // Only the soft limit, which is what EMFILE enforces: raising a hard limit again takes
    // CAP_SYS_RESOURCE, which a test runner (a container) may lack.
    let (orig_soft, hard) = procstat::nofile(pid).unwrap();
    let guard = NofileGuard::set(pid, limit, hard).unwrap();
    println!(
        "fd exhaustion: agent {pid} uses {} descriptors (lowest free {base}), soft limit {orig_soft} \
         lowered to {limit} (hard {hard})",
        in_use.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_owned();
    let client = s.client.clone();
    let holder = std::thread::spawn(move || {
        client.run_in_cgroup_timeout(Duration::from_secs(300), move || hold_until_refused(target, &work))
    });
    let held: usize = wait_for(Duration::from_secs(120), "the holder reaching the limit", || {
        std::fs::read_to_string(dir.path().join("held")).ok()?.parse().ok()
    })
    .unwrap();
    assert!(held > 0, "some connections fit under the limit");

    // Take away the last few descriptors (fewer than one connection needs) too, so the next
    // accept itself fails: a limit of exactly the lowest free descriptor number leaves none. A
    // descriptor the agent closes meanwhile (it reads files now and then) would reopen a gap.
    let pinned = wait_for(Duration::from_secs(10), "no descriptor left", || {
        let free = procstat::lowest_free_fd(pid).ok()?;
        guard.change(u64::from(free), hard).ok()?;
        sleep(Duration::from_millis(300));
        (procstat::lowest_free_fd(pid).ok()? >= free).then_some(free)
    })
    .unwrap();
    std::fs::write(dir.path().join("pinned"), "").unwrap();
    wait_for(Duration::from_secs(30), "the pending connection", || {
        dir.path().join("pending").exists().then_some(())
    })
    .unwrap();
    // Let the failing accept loop reach its longest wait before measuring it.
    sleep(Duration::from_millis(1000));
    let window = Duration::from_secs(4);
    let cpu = procstat::cpu_fraction(pid, window).unwrap();
    let failures = accept_failures(&s.agent);
    println!(
        "fd exhaustion: {held} connections held; limit pinned at {pinned}; agent CPU {:.1}% of one \
         core over {window:?} with accept failing ({} accept-failure lines logged)",
        cpu * 100.0,
        failures.len()
    );
    // Whatever else complained at the limit, for whoever reads the output.
    let other: Vec<String> = s
        .agent
        .stderr()
        .lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("accept failed"))
        .map(str::to_owned)
        .collect();
    println!("fd exhaustion: {} other warnings or errors: {:#?}", other.len(), &other[..other.len().min(10)]);
    assert!(procstat::alive(pid), "the agent is still running");
    assert!(cpu < 0.5, "the agent spins at the descriptor limit: {:.1}% of a core", cpu * 100.0);
    let emfile = failures.iter().find(|l| l.contains("Too many open files"));
    assert!(emfile.is_some(), "accept failed with EMFILE: {failures:?}\n{}", s.agent.stderr());
    // A streak is logged once, then every 10 s (per listener; a few may be failing): the log
    // stays quiet while the limit lasts.
    assert!(failures.len() <= 6, "accept failures flood the log: {failures:#?}");

    // Close the held connections and give back the descriptors of the first lowered limit (the
    // pinned one is below the numbers they free): the agent serves the connection that waited in
    // its listen queue, with the limit still far below the original.
    std::fs::write(dir.path().join("release"), "").unwrap();
    guard.change(limit, hard).unwrap();
    let report = holder.join().unwrap().unwrap().unwrap();
    println!("fd exhaustion: holder {report:?}");
    assert_eq!(report.held, held);
    assert_eq!(report.pending, Ok(()), "the queued connection was served once descriptors were free");
    // The recovery line of the listener that failed most (the client's, holding the pending
    // connection) proves accept failed throughout the measurement, and how often it tried.
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
    };
    let stderr = s.agent.stderr();
    for line in stderr.lines().filter(|l| l.contains("accept ")) {
        println!("fd exhaustion: agent: {line}");
    }
    let (streak, lasted_ms) = stderr
        .lines()
        .filter(|l| l.contains("accept recovered"))
        .filter_map(|l| Some((field(l, "failures")?, field(l, "for_ms")?)))
        .max_by_key(|&(failures, _)| failures)
        .unwrap_or_else(|| panic!("no recovery logged: {stderr}"));
    println!("fd exhaustion: accept failed {streak} times over {lasted_ms} ms, then recovered");
    assert!(lasted_ms >= 5000, "accept was failing during the whole measurement: {lasted_ms} ms");
    assert!(streak < lasted_ms / 100, "it backs off (under one try per 100 ms): {streak} in {lasted_ms} ms");
    assert!(procstat::alive(pid));
    let status = s.agent.cli_json(&["status"]).expect("the admin API answers");
    assert!(status.is_object(), "{status}");

    // The limit back as it was: new connections succeed, many at once.
    guard.restore().unwrap();
    let after = connect(&s.client, &target.to_string(), &["--bytes", "1000", "--conns", "20"]).unwrap();
    assert_eq!(after["ok"], 20, "{after}");
    let unenrolled = events_of(&s.agent, "unenrolled");
    assert!(unenrolled.is_empty(), "running out of descriptors unenrolled pods: {unenrolled:?}");
    assert!(procstat::alive(pid));
}

// ---------------------------------------------------------------------------------------------
// A reader that stalls.
// ---------------------------------------------------------------------------------------------

/// What the client pushes at the stalled reader.
const STREAM_BYTES: u64 = 200 * 1000 * 1000;
/// How much the agent's resident memory may grow while the reader stalls: a few connection
/// buffers and HTTP/2 windows (a few MiB) plus allocator slack, far below the stream's size.
const RSS_GROWTH_LIMIT: u64 = 32 * 1024 * 1024;
/// The sink's port in server-1 (its echo server has SERVER_PORT).
const SINK_PORT: u16 = 9090;

/// One node (client, server-1, server-2) with the agent, with mutual TLS through the tunnel
/// (`ca`) or plaintext. Fields drop in order: the agent, the CA, then the pods.
struct SlowNode {
    agent: Agent,
    _ca: Option<tempfile::TempDir>,
    pods: ScenarioPods,
}

impl SlowNode {
    fn start(name: &str, mtls: bool) -> Result<Self> {
        let pods = ScenarioPods::start(name)?;
        let ca = mtls.then(|| ferry_tests::ca::make_ca(TD, &["node-a"])).transpose()?;
        let mut mesh = MeshFile::new("node-a");
        if let Some(ca) = &ca {
            mesh.ca(&ca.path().join("nodes/node-a"), None).local_shortcut(false);
        }
        mesh.pod(&pods.client, NAMESPACE, "client");
        for s in &pods.servers {
            mesh.pod(s, NAMESPACE, SERVICE);
        }
        echo_service(&mut mesh);
        let agent = Agent::start(&pods.node, &mesh.to_toml()).context("starting the agent")?;
        Ok(Self { agent, _ca: ca, pods })
    }

    /// The agent's live outbound connections to `dst`: bytes it read from the client so far
    /// (`ferry connections` counts as the access log does: received is from the source).
    fn relayed_to(&self, dst: SocketAddr) -> Option<u64> {
        let conns = self.agent.cli_json(&["connections"]).ok()?;
        let bytes = conns
            .as_array()?
            .iter()
            .filter(|c| c["direction"] == "outbound" && c["original_dst"] == dst.to_string())
            .filter_map(|c| c["bytes_received"].as_u64())
            .sum();
        Some(bytes)
    }
}

/// What one stalled transfer measured.
#[derive(Debug)]
struct StallMeasure {
    rss_before: u64,
    rss_peak: u64,
    relayed_at_stall: u64,
    stalled_after: Duration,
    drained_in: Duration,
}

/// Streams [`STREAM_BYTES`] from the client to a sink in server-1 that does not read, watches
/// the agent while the stream is stuck, then lets the sink read and checks every byte.
fn stalled_transfer(name: &str, mtls: bool) -> StallMeasure {
    let t = SlowNode::start(name, mtls).unwrap();
    let pid = t.agent.pid();
    let server = &t.pods.servers[0];
    // Warm up the same path (the tunnel's TLS and HTTP/2 included) so what it allocates once is
    // in the baseline.
    let echo = sock(server.ipv4().into(), SERVER_PORT);
    let warm = connect(&t.pods.client, &echo, &["--bytes", "4000000", "--conns", "2"]).unwrap();
    assert_eq!(warm["ok"], 2, "{warm}");
    let expected_security = if mtls { "mutual_tls" } else { "none" };
    let warm_close = wait_events(&t.agent, 2, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    assert!(warm_close.iter().all(|e| e["security"] == expected_security), "{warm_close:?}");
    sleep(Duration::from_millis(500));
    let rss_before = procstat::rss_bytes(pid).unwrap();

    let seed = 0x5107_5eed ^ u64::from(mtls);
    let mut sink = StallSink::start(server, SINK_PORT, seed).unwrap();
    let dst = SocketAddr::new(server.ipv4().into(), SINK_PORT);
    let client = t.pods.client.clone();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        client.run_in_cgroup_timeout(Duration::from_secs(600), move || send_pattern(dst, seed, STREAM_BYTES))
    });

    // Until the relayed byte count stops moving (every buffer on the way is full), and two seconds
    // more, sample the agent's memory.
    let mut rss_peak = rss_before;
    let mut sample = || {
        let rss = procstat::rss_bytes(pid).unwrap();
        rss_peak = rss_peak.max(rss);
    };
    // No child process (the CLI below) before the sender's fork: a child forked without exec
    // would inherit the CLI's output pipe, and reading it would wait for the sender to end.
    wait_for(Duration::from_secs(60), "the sender's connection", || {
        sample();
        sink.accepted().then_some(())
    })
    .unwrap();
    let (mut last, mut still_since) = (None, Instant::now());
    let relayed_at_stall = wait_for(Duration::from_secs(120), "the stream to stall", || {
        sample();
        let now = t.relayed_to(dst).filter(|&b| b > 0);
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
        (now.is_some() && still_since.elapsed() > Duration::from_millis(1500)).then_some(now?)
    })
    .unwrap();
    let stalled_after = started.elapsed();
    for _ in 0..20 {
        sample();
        sleep(Duration::from_millis(100));
    }
    assert!(sink.accepted(), "the agent delivered the connection to the sink");
    assert_eq!(sink.bytes_read(), 0, "the sink read nothing yet");
    assert_eq!(t.relayed_to(dst), Some(relayed_at_stall), "the stream is still stuck");
    println!(
        "slow reader ({expected_security}): stalled after {stalled_after:?} with {relayed_at_stall} bytes \
         taken from the client; agent RSS {} KiB before, peak {} KiB (+{} KiB)",
        rss_before / 1024,
        rss_peak / 1024,
        rss_peak.saturating_sub(rss_before) / 1024
    );

    // The agent stopped reading from the client instead of buffering its stream.
    assert!(
        relayed_at_stall < STREAM_BYTES / 4,
        "the agent took {relayed_at_stall} of {STREAM_BYTES} bytes from the client while the reader stalled"
    );
    assert!(
        rss_peak.saturating_sub(rss_before) < RSS_GROWTH_LIMIT,
        "the agent's memory grew from {rss_before} to {rss_peak} bytes while the reader stalled"
    );

    // The reader resumes: everything arrives, in order, intact.
    let resumed = Instant::now();
    sink.resume();
    let sent: Sent = sender.join().unwrap().unwrap().unwrap();
    let report = sink.finish().unwrap();
    let drained_in = resumed.elapsed();
    assert_eq!(sent.bytes, STREAM_BYTES);
    assert_eq!(report.bytes, STREAM_BYTES, "{report:?}");
    assert_eq!(report.first_mismatch, None, "{report:?}");
    assert_eq!(report.checksum, sent.checksum, "the checksums agree");
    assert_eq!(sent.answer, report.to_line(), "the client got the sink's answer back");
    let closed = wait_events(&t.agent, 1, |e| {
        e["event"] == "conn_close" && e["direction"] == "outbound" && e["orig_dst"] == dst.to_string()
    });
    assert_eq!(closed.len(), 1, "{:?}", t.agent.events());
    assert_eq!(closed[0]["bytes_sent"], STREAM_BYTES, "{}", closed[0]);
    assert_eq!(closed[0]["security"], expected_security, "{}", closed[0]);
    StallMeasure { rss_before, rss_peak, relayed_at_stall, stalled_after, drained_in }
}

#[test]
fn slow_reader_keeps_memory_bounded() {
    for (name, mtls) in [("slowp", false), ("slowm", true)] {
        let m = stalled_transfer(name, mtls);
        println!(
            "slow reader ({}): RSS {} KiB before, {} KiB peak during the stall; {} bytes taken from \
             the client when it stalled after {:?}; drained in {:?} once the reader resumed",
            if mtls { "mTLS" } else { "plaintext" },
            m.rss_before / 1024,
            m.rss_peak / 1024,
            m.relayed_at_stall,
            m.stalled_after,
            m.drained_in
        );
    }
}
