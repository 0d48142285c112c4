//! Workload identity and mutual TLS between node proxies (HBONE), across two simulated nodes, each
//! with its own agent and its own intermediate CA under one root.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream as StdTcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::*;
use ferry_tests::{Agent, ChildGuard, MeshFile, NodeLink, Pod, SimNode, bin_path, link_nodes};
use serde_json::Value;

const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const OTHER_ID: &str = "spiffe://cluster.local/ns/demo/sa/other";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// Two nodes: node-a runs `client` and `other`; node-b runs `server-1` and `server-2` (service
/// `echo`) and `outsider`, which is not in the mesh. Fields drop in order: agents first.
struct TwoNodes {
    a: Agent,
    b: Agent,
    client: Pod,
    other: Pod,
    servers: Vec<Pod>,
    outsider: Pod,
    ca: tempfile::TempDir,
    _servers: Vec<ChildGuard>,
    link: NodeLink,
    _node_a: SimNode,
    _node_b: SimNode,
}

struct Opts<'a> {
    server_mode: &'a str,
    svid_ttl: Option<u64>,
}

const DEFAULT: Opts<'static> = Opts { server_mode: "permissive", svid_ttl: None };

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(bin_path("ferry")).args(args).output().expect("running ferry")
}

/// The mesh CA: one root, intermediates for node-a and node-b.
fn make_ca() -> Result<tempfile::TempDir> {
    ferry_tests::ca::make_ca(TD, &["node-a", "node-b"])
}

impl TwoNodes {
    fn start(name: &str, opts: Opts) -> Result<Self> {
        let mut node_a = SimNode::new(&format!("{name}a"), 1)?;
        let mut node_b = SimNode::new(&format!("{name}b"), 2)?;
        let link = link_nodes(&node_a, &node_b)?;
        let client = node_a.add_pod("client")?;
        let other = node_a.add_pod("other")?;
        let servers = vec![node_b.add_pod("server-1")?, node_b.add_pod("server-2")?];
        let outsider = node_b.add_pod("outsider")?;
        let mut guards = Vec::new();
        for s in &servers {
            guards.push(serve(s, SERVER_PORT, s.name())?);
        }
        let ca = make_ca()?;
        let mesh_for = |node: &str| {
            let mut mesh = MeshFile::new(node);
            mesh.ca(&ca.path().join("nodes").join(node), opts.svid_ttl);
            mesh.pod(&client, "demo", "client").node("node-a");
            mesh.pod(&other, "demo", "other").node("node-a");
            for s in &servers {
                mesh.pod(s, "demo", "echo").node("node-b").mode(opts.server_mode);
            }
            mesh.service("echo", "demo", &[VIP4], &[(SERVICE_PORT, SERVER_PORT)], &["server-1", "server-2"]);
            mesh.to_toml()
        };
        let a = Agent::start(&node_a, &mesh_for("node-a")).context("agent on node-a")?;
        let b = Agent::start(&node_b, &mesh_for("node-b")).context("agent on node-b")?;
        Ok(Self {
            a,
            b,
            client,
            other,
            servers,
            outsider,
            ca,
            _servers: guards,
            link,
            _node_a: node_a,
            _node_b: node_b,
        })
    }

    fn server_addr(&self, i: usize) -> String {
        sock(self.servers[i].ipv4().into(), SERVER_PORT)
    }
}

fn closes<'a>(events: &'a [Value], direction: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events.iter().filter(move |e| e["event"] == "conn_close" && e["direction"] == direction)
}

#[test]
fn cross_node_connection_uses_mtls_with_both_identities() {
    let t = TwoNodes::start("xn", DEFAULT).unwrap();
    let r = connect(&t.client, &t.server_addr(0), &["--bytes", "2048"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    let out = wait_events(&t.a, 1, |e| e["event"] == "conn_close" && e["direction"] == "outbound");
    assert_eq!(out.len(), 1, "{:?}", t.a.events());
    assert_eq!(out[0]["security"], "mutual_tls");
    assert_eq!(out[0]["src_identity"], CLIENT_ID);
    assert_eq!(out[0]["dst_identity"], ECHO_ID, "the client side verified the server's identity");
    let inb = wait_events(&t.b, 1, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inb.len(), 1, "{:?}", t.b.events());
    assert_eq!(inb[0]["security"], "mutual_tls");
    assert_eq!(inb[0]["src_identity"], CLIENT_ID, "the server side learned the client's identity");
    assert_eq!(inb[0]["dst_identity"], ECHO_ID);
    assert_eq!(inb[0]["src_pod"], "demo/client");
    assert_eq!(inb[0]["bytes_sent"], 2048);
}

/// tcpdump on node-a's end of the inter-node link, writing to a pcap file.
struct Capture {
    child: std::process::Child,
    file: PathBuf,
    // Kept open: tcpdump reports its counts on stderr at exit and must not die of SIGPIPE first.
    stderr: std::process::ChildStderr,
}

impl Capture {
    fn start(link: &NodeLink, dir: &Path, name: &str) -> Result<Self> {
        let file = dir.join(format!("{name}.pcap"));
        let end = link.a();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &end.netns_name,
                "tcpdump",
                "--immediate-mode",
                "-i",
                &end.ifname,
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("tcpdump must be installed (cargo xtask setup)")?;
        // tcpdump prints "listening on ..." once the socket is capturing.
        let mut stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tcpdump did not start: {}", String::from_utf8_lossy(&seen));
            }
            let n = stderr.read(&mut buf)?;
            if n == 0 {
                bail!("tcpdump exited: {}", String::from_utf8_lossy(&seen));
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(Self { child, file, stderr })
    }

    /// Waits (at most 20 s) until the file tcpdump writes packet by packet satisfies `seen`, then
    /// stops the capture and returns the raw pcap bytes. tcpdump drops what it has not yet read
    /// from the kernel when it is stopped, and on a loaded machine it lags behind the traffic.
    fn finish_when(self, seen: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen(&std::fs::read(&self.file).unwrap_or_default()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.finish()
    }

    /// Stops the capture and returns the raw pcap bytes.
    fn finish(mut self) -> Result<Vec<u8>> {
        // SIGINT lets tcpdump flush and close the file.
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let mut report = String::new();
        let _ = self.stderr.read_to_string(&mut report);
        let pcap = std::fs::read(&self.file)
            .with_context(|| format!("reading the capture; tcpdump said {report}"))?;
        Ok(pcap)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Sends `payload` from inside `pod` (netns and cgroup, so capture applies) and reads the echo.
fn send_marker(pod: &Pod, addr: SocketAddr, payload: Vec<u8>) -> Result<usize> {
    pod.run_in_cgroup(move || -> Result<usize, String> {
        let mut s =
            StdTcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        s.write_all(&payload).map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).map_err(|e| e.to_string())?;
        Ok(back.len())
    })?
    .map_err(anyhow::Error::msg)
}

#[test]
fn traffic_between_nodes_is_encrypted() {
    let t = TwoNodes::start("enc", DEFAULT).unwrap();
    let marker = b"FERRY-PLAINTEXT-MARKER-7f3a9c".to_vec();
    let payload: Vec<u8> = marker.iter().cycle().take(marker.len() * 200).copied().collect();
    let addr: SocketAddr = t.server_addr(0).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let cap = Capture::start(&t.link, dir.path(), "mesh").unwrap();
    let echoed = send_marker(&t.client, addr, payload.clone()).unwrap();
    assert!(echoed >= payload.len(), "the echo came back through the mesh");
    // The payload and its echo both crossed the link (encrypted, so at least as many bytes).
    let pcap = cap.finish_when(|pcap| pcap.len() > 2 * payload.len()).unwrap();
    assert!(pcap.len() > payload.len(), "the capture saw the tunnel traffic ({} bytes)", pcap.len());
    assert!(!contains(&pcap, &marker), "the marker crossed the link in clear with the mesh on");

    // The same traffic with the mesh off crosses the link in clear: the check above can fail.
    let TwoNodes { a, b, client, link, _node_a, _node_b, .. } = t;
    a.stop().unwrap();
    b.stop().unwrap();
    // A stopped agent leaves its datapath pinned (the pods fail closed): uninstall for plaintext.
    a.uninstall(&_node_a).unwrap();
    b.uninstall(&_node_b).unwrap();
    let cap = Capture::start(&link, dir.path(), "plain").unwrap();
    let echoed = send_marker(&client, addr, payload.clone()).unwrap();
    assert!(echoed >= payload.len());
    let pcap = cap.finish_when(|pcap| contains(pcap, &marker)).unwrap();
    assert!(contains(&pcap, &marker), "without the mesh the marker is visible on the link");
}

#[test]
fn many_app_connections_share_one_tls_connection() {
    let t = TwoNodes::start("pool", DEFAULT).unwrap();
    let r = connect(&t.client, &t.server_addr(0), &["--bytes", "512", "--conns", "20", "--hold-ms", "300"])
        .unwrap();
    assert_eq!(r["ok"], 20, "{r}");
    let inb = wait_events(&t.b, 20, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inb.len(), 20);
    assert!(inb.iter().all(|e| e["security"] == "mutual_tls" && e["src_identity"] == CLIENT_ID));
    let tunnels: Vec<Value> = events_of(&t.b, "tunnel_accept");
    assert_eq!(tunnels.len(), 1, "20 app connections, one TLS connection: {tunnels:?}");
}

#[test]
fn strict_mode_refuses_plaintext() {
    let t = TwoNodes::start("strict", Opts { server_mode: "strict", svid_ttl: None }).unwrap();
    let plain = connect(&t.outsider, &t.server_addr(0), &["--bytes", "100", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(plain["ok"], 0, "plaintext from outside the mesh must not reach a STRICT pod: {plain}");
    let refused = wait_events(&t.b, 1, |e| e["event"] == "conn_refused");
    assert_eq!(refused.len(), 1, "{:?}", t.b.events());
    assert!(refused[0]["reason"].as_str().unwrap().contains("STRICT"), "{}", refused[0]);
    // Mesh traffic still gets in, over mTLS.
    let meshed = connect(&t.client, &t.server_addr(0), &["--bytes", "100"]).unwrap();
    assert_eq!(meshed["ok"], 1, "{meshed}");
    // Its record is written once the server's proxy is done with it, maybe after the client's.
    let inb = wait_events(&t.b, 1, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inb.len(), 1, "{:?}", t.b.events());
    assert!(closes(&t.b.events(), "inbound").all(|e| e["security"] == "mutual_tls"), "{inb:?}");
}

#[test]
fn permissive_mode_accepts_plaintext() {
    let t = TwoNodes::start("perm", DEFAULT).unwrap();
    let plain = connect(&t.outsider, &t.server_addr(0), &["--bytes", "100"]).unwrap();
    assert_eq!(plain["ok"], 1, "{plain}");
    let inb = wait_events(&t.b, 1, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inb.len(), 1);
    assert_eq!(inb[0]["security"], "none", "recorded as plaintext: {}", inb[0]);
    assert!(inb[0]["src_identity"].is_null());
}

// ---- A hand-made HBONE client, to present certificates and targets the mesh itself never would.

mod client {
    use super::*;
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
    use rustls::{
        DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    };

    /// Accepts any server: these tests are about what the *server* accepts.
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A client certificate chain and key.
    pub struct ClientCert {
        pub chain: Vec<CertificateDer<'static>>,
        pub key: PrivateKeyDer<'static>,
    }

    /// Signs a leaf for `uris` with node-a's intermediate (or a foreign self-made CA), letting the
    /// test bend the validity period.
    pub fn leaf(ca_dir: &Path, uris: &[&str], foreign: bool, expired: bool) -> ClientCert {
        let (issuer_cert_pem, issuer_key) = if foreign {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.subject_alt_names = vec![SanType::URI("spiffe://evil.example".try_into().unwrap())];
            let cert = p.self_signed(&key).unwrap();
            (cert.pem(), key)
        } else {
            let node = ca_dir.join("nodes").join("node-a");
            let cert = std::fs::read_to_string(node.join("ca.pem")).unwrap();
            let key = KeyPair::from_pem(&std::fs::read_to_string(node.join("ca.key")).unwrap()).unwrap();
            (cert, key)
        };
        let issuer_der = CertificateDer::from_pem_slice(issuer_cert_pem.as_bytes()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&issuer_cert_pem, issuer_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        if expired {
            p.not_before = now - time::Duration::days(3);
            p.not_after = now - time::Duration::days(1);
        } else {
            p.not_before = now - time::Duration::minutes(5);
            p.not_after = now + time::Duration::hours(1);
        }
        let cert = p.signed_by(&key, &issuer).unwrap();
        ClientCert {
            chain: vec![cert.der().clone(), issuer_der],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }

    /// Opens TLS + HTTP/2 to `tunnel` from inside `pod`'s netns and sends CONNECT `authority`.
    /// Returns the response status, or the error text if TLS or HTTP/2 failed.
    pub fn connect_status(
        pod: &Pod,
        tunnel: SocketAddr,
        authority: &str,
        cert: ClientCert,
    ) -> Result<u16, String> {
        let tcp = pod
            .run(move || StdTcpStream::connect_timeout(&tunnel, Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let authority = authority.to_string();
        rt.block_on(async move {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
                .with_client_auth_cert(cert.chain, cert.key)
                .map_err(|e| e.to_string())?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let name = ServerName::IpAddress(tunnel.ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            let (mut send, conn) = h2::client::handshake(tls).await.map_err(|e| format!("h2: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority.as_str())
                .body(())
                .map_err(|e| e.to_string())?;
            let (resp, _stream) = send.send_request(req, false).map_err(|e| format!("h2 request: {e}"))?;
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .map_err(|_| "no response".to_string())?
                .map_err(|e| format!("h2 response: {e}"))?;
            Ok(resp.status().as_u16())
        })
    }
}

fn tunnel_of(pod: &Pod) -> SocketAddr {
    SocketAddr::new(pod.ipv4().into(), 15008)
}

#[test]
fn hbone_target_for_another_pod_is_refused() {
    let t = TwoNodes::start("tgt", DEFAULT).unwrap();
    let good = || client::leaf(t.ca.path(), &[CLIENT_ID], false, false);
    // A tunnel that lands on server-1 but targets server-2 must be refused...
    let status =
        client::connect_status(&t.outsider, tunnel_of(&t.servers[0]), &t.server_addr(1), good()).unwrap();
    assert_eq!(status, 403, "server-1's tunnel must not forward to server-2");
    let refused = wait_events(&t.b, 1, |e| e["event"] == "conn_refused");
    assert_eq!(refused[0]["reason"], "target is not served here", "{refused:?}");
    // ...while the same client targeting server-1 itself is let in: the refusal is about the target.
    let status =
        client::connect_status(&t.outsider, tunnel_of(&t.servers[0]), &t.server_addr(0), good()).unwrap();
    assert_eq!(status, 200);
}

/// Presents a bad certificate to server-1's tunnel; the agent must refuse and log `reason`.
fn assert_refused(t: &TwoNodes, cert: client::ClientCert, reason: &str) {
    let result = client::connect_status(&t.outsider, tunnel_of(&t.servers[0]), &t.server_addr(0), cert);
    assert!(result.is_err(), "the handshake must fail, got {result:?}");
    let deadline = Instant::now() + EVENT_WAIT;
    while !t.b.stderr().contains(reason) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(t.b.stderr().contains(reason), "agent logs the reason {reason:?}: {}", t.b.stderr());
    assert!(closes(&t.b.events(), "inbound").next().is_none(), "nothing reached the app");
}

#[test]
fn expired_certificate_is_refused() {
    let t = TwoNodes::start("exp", DEFAULT).unwrap();
    assert_refused(&t, client::leaf(t.ca.path(), &[CLIENT_ID], false, true), "expired");
}

#[test]
fn foreign_trust_domain_is_refused() {
    let t = TwoNodes::start("ftd", DEFAULT).unwrap();
    let cert = client::leaf(t.ca.path(), &["spiffe://evil.example/ns/demo/sa/client"], true, false);
    assert_refused(&t, cert, "foreign_trust_domain");
}

#[test]
fn multiple_uri_sans_are_refused() {
    let t = TwoNodes::start("sans", DEFAULT).unwrap();
    let cert = client::leaf(t.ca.path(), &[CLIENT_ID, OTHER_ID], false, false);
    assert_refused(&t, cert, "multiple_uri_sans");
}

#[test]
fn certificate_rotation_under_load_loses_no_connection() {
    // 10 s SVIDs renew every 5 s: keep traffic running across at least two renewals of both
    // sides, however long a loaded machine takes for them (bounded).
    let t = TwoNodes::start("rot", Opts { server_mode: "permissive", svid_ttl: Some(10) }).unwrap();
    let issued = |agent: &Agent, id: &str| {
        agent.stderr().lines().filter(|l| l.contains("issued SVID") && l.contains(id)).count()
    };
    let renewed_twice = || issued(&t.a, CLIENT_ID) >= 3 && issued(&t.b, ECHO_ID) >= 3;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut ok, mut failed) = (0u64, 0u64);
    while !(renewed_twice() && ok >= 20) && Instant::now() < deadline {
        let r = connect(&t.client, &t.server_addr(0), &["--bytes", "1000", "--conns", "4"]).unwrap();
        ok += r["ok"].as_u64().unwrap();
        failed += r["failed"].as_u64().unwrap();
        assert_eq!(r["failed"], 0, "a connection failed during rotation: {r}");
    }
    assert_eq!(failed, 0);
    assert!(ok >= 20, "traffic kept flowing: {ok} connections");
    for (agent, id) in [(&t.a, CLIENT_ID), (&t.b, ECHO_ID)] {
        let count = issued(agent, id);
        assert!(
            count >= 3,
            "{id} was renewed at least twice under load ({count} issuances): {}",
            agent.stderr()
        );
    }
}

#[test]
fn pod_cannot_obtain_another_pods_identity() {
    let t = TwoNodes::start("ident", DEFAULT).unwrap();
    let addr = t.server_addr(0);
    let (r1, r2) = std::thread::scope(|s| {
        let a =
            s.spawn(|| connect(&t.client, &addr, &["--bytes", "100", "--conns", "5", "--hold-ms", "200"]));
        let b = s.spawn(|| connect(&t.other, &addr, &["--bytes", "100", "--conns", "5", "--hold-ms", "200"]));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert_eq!((r1["ok"].as_u64(), r2["ok"].as_u64()), (Some(5), Some(5)), "{r1} {r2}");
    let inb = wait_events(&t.b, 10, |e| e["event"] == "conn_close" && e["direction"] == "inbound");
    assert_eq!(inb.len(), 10);
    for e in &inb {
        let expected = match e["src_pod"].as_str() {
            Some("demo/client") => CLIENT_ID,
            Some("demo/other") => OTHER_ID,
            other => panic!("unexpected source {other:?}: {e}"),
        };
        assert_eq!(e["src_identity"], expected, "each pod's connections carry only its own identity: {e}");
    }
    // One pooled TLS connection per source identity, never shared across identities.
    assert_eq!(events_of(&t.b, "tunnel_accept").len(), 2);
    // Node-a's agent only ever holds the identities of its own pods.
    let issued = t.a.stderr().lines().filter(|l| l.contains("issued SVID")).count();
    assert_eq!(issued, 2, "one SVID per local identity (client, other): {}", t.a.stderr());
    assert!(
        !t.a.stderr().lines().any(|l| l.contains("issued SVID") && l.contains(ECHO_ID)),
        "{}",
        t.a.stderr()
    );
}

#[test]
fn bad_ca_files_are_rejected_with_clear_error() {
    let ca = make_ca().unwrap();
    let run_with = |dir: &Path, trust_domain: &str| {
        let work = tempfile::tempdir().unwrap();
        let mut mesh = MeshFile::new("node-a");
        mesh.trust_domain(trust_domain).ca(dir, None);
        let path = work.path().join("mesh.toml");
        std::fs::write(&path, mesh.to_toml()).unwrap();
        // The agent binds its admin socket and metrics port before it reads the CA, here in the
        // test's own namespace: private ones, so nothing else on the machine decides the error.
        let socket = work.path().join("admin.sock");
        let out = ferry(&[
            "--admin-socket",
            socket.to_str().unwrap(),
            "run",
            "--config",
            path.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        assert!(!out.status.success(), "the agent must refuse to start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let node_dir = ca.path().join("nodes").join("node-a");

    let err = run_with(&ca.path().join("nodes").join("nowhere"), TD);
    assert!(err.contains("nodes/nowhere"), "names the missing directory: {err}");

    let err = run_with(&node_dir, "other.example");
    assert!(err.contains("trust domain") && err.contains("other.example"), "{err}");

    std::fs::write(node_dir.join("ca.key"), "not a key").unwrap();
    let err = run_with(&node_dir, TD);
    assert!(err.contains("ca.key") && err.contains("not a PEM private key"), "{err}");

    // A key that parses but belongs to another certificate.
    let other = make_ca().unwrap();
    std::fs::copy(other.path().join("nodes/node-a/ca.key"), node_dir.join("ca.key")).unwrap();
    let err = run_with(&node_dir, TD);
    assert!(err.contains("ca.key"), "names the mismatched key: {err}");
}
