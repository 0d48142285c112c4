//! The `sidecar-haproxy` baseline: HAProxy sidecars behind iptables REDIRECT carry service traffic
//! over mutual TLS, and nothing but TLS crosses the wire between pods.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use ferry_tests::haproxy::{INBOUND_PORT, OUTBOUND_PORT, SidecarMesh};
use ferry_tests::{ChildGuard, Pod, SimNode};
use serde_json::Value;

#[test]
fn haproxy_sidecars_carry_service_traffic_with_mutual_tls() {
    let mut node = SimNode::new("hap", 1).unwrap();
    let client = node.add_pod("client").unwrap();
    let servers = [node.add_pod("server-1").unwrap(), node.add_pod("server-2").unwrap()];
    let outsider = node.add_pod("outsider").unwrap();
    let _apps: Vec<ChildGuard> = servers.iter().map(|s| serve(s, SERVER_PORT, s.name()).unwrap()).collect();
    let target = sock(servers[0].ipv4().into(), SERVER_PORT);

    // Control: without a sidecar, plaintext reaches the app, so the refusal below is the sidecar's.
    let before = connect(&outsider, &target, &["--bytes", "100"]).unwrap();
    assert_eq!(before["ok"], 1, "{before}");

    let endpoints: Vec<SocketAddr> =
        servers.iter().map(|s| SocketAddr::new(s.ipv4().into(), SERVER_PORT)).collect();
    let pods = [(&client, "client"), (&servers[0], "echo"), (&servers[1], "echo")];
    let mesh = SidecarMesh::start(&pods, &endpoints, SERVER_PORT).unwrap();
    assert_eq!(mesh.sidecars().len(), 3);
    for sidecar in mesh.sidecars() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid())).unwrap();
        assert!(status.lines().any(|l| l.starts_with("Gid:") && l.contains("1337")), "{status}");
    }
    let capture = Capture::start(&servers[0], SERVER_PORT);

    // Through the VIP: OUTPUT's REDIRECT rewrites the destination after the route lookup, which the
    // pod's default route satisfies; the outbound frontend then balances over the endpoints.
    let report =
        connect(&client, &sock(VIP4_IP.into(), SERVICE_PORT), &["--bytes", "4096", "--conns", "10"]).unwrap();
    assert_eq!(report["ok"], 10, "{report}");
    for server in &servers {
        assert!(report["tags"][server.name()].as_u64().unwrap_or(0) >= 1, "both servers answer: {report}");
    }
    // Only a proxy can have answered for the VIP, which no pod owns; the apps' peer is their
    // own sidecar. (The client's socket keeps its own address: REDIRECT rewrites the destination.)
    for peer in strings(&report["peers_seen_by_server"]) {
        assert!(peer.starts_with("127.0.0.1:"), "the server's peer is its sidecar: {report}");
    }
    // IPv6 goes to the [::1] listener of the same frontend.
    let v6 = connect(&client, &sock(VIP6_IP.into(), SERVICE_PORT), &["--bytes", "100"]).unwrap();
    assert_eq!(v6["ok"], 1, "{v6}");
    let count = |r: &Value| r["tags"]["server-1"].as_u64().unwrap_or(0) as usize;
    let (to_server_1, payload) = (count(&report) + count(&v6), count(&report) * 4096 + count(&v6) * 100);

    // Plaintext from a pod without a sidecar is accepted by the server's inbound frontend (the TCP
    // connection is established) but gets no echo: its bytes land on the TLS handshake.
    let plain = connect(&outsider, &target, &["--bytes", "100", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(plain["ok"], 0, "plaintext must not reach the app: {plain}");
    assert_eq!(strings(&plain["local_addrs"]).len(), 1, "the connection was established: {plain}");

    // On server-1's wire, every byte of every port-8080 stream from the client's sidecar is a TLS
    // record, and application data of at least the echoed payloads went both ways. The outsider's
    // bytes were the last on that wire: once tcpdump wrote them, it wrote everything before too.
    let outsider_ip = IpAddr::from(outsider.ipv4());
    let streams = capture.stop_when(|streams| {
        streams.iter().any(|((src, _), bytes)| src.ip() == outsider_ip && bytes.len() >= 100)
    });
    let client_ip = IpAddr::from(client.ipv4());
    let mut app_data = (0, 0);
    let mut conns = 0;
    for ((src, dst), bytes) in &streams {
        if src.ip() != client_ip && dst.ip() != client_ip {
            continue;
        }
        let records = tls_records(bytes).unwrap_or_else(|e| panic!("{src} -> {dst} is not TLS: {e}"));
        assert_eq!(records.first().map(|r| r.0), Some(0x16), "{src} -> {dst} starts with a handshake");
        let data: usize = records.iter().filter(|r| r.0 == 0x17).map(|r| r.1).sum();
        if dst.port() == SERVER_PORT {
            conns += 1;
            app_data.0 += data;
        } else {
            app_data.1 += data;
        }
    }
    assert_eq!(conns, to_server_1, "one TLS stream per connection to server-1: {:?}", streams.keys());
    assert!(app_data.0 >= payload && app_data.1 >= payload, "{app_data:?} vs {payload} payload bytes");
    // The outsider's plaintext was on the wire too, and is not TLS: the check above can fail.
    let plain_stream =
        streams.iter().find(|((src, _), _)| src.ip() == outsider_ip).expect("the outsider's stream");
    assert!(tls_records(plain_stream.1).is_err(), "random plaintext parsed as TLS");

    drop(mesh);
    assert!(client.run(|| std::net::TcpStream::connect(("127.0.0.1", OUTBOUND_PORT))).is_err());
    assert!(servers[0].run(|| std::net::TcpStream::connect(("127.0.0.1", INBOUND_PORT))).is_err());
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

/// tcpdump on a pod's eth0, writing a pcap file packet by packet.
struct Capture {
    guard: ChildGuard,
    file: tempfile::NamedTempFile,
}

impl Capture {
    fn start(pod: &Pod, port: u16) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = pod.netns_command("tcpdump");
        cmd.args(["--immediate-mode", "-U", "-n", "-s", "0", "-i", "eth0", "-w"]).arg(file.path());
        cmd.args(["tcp", "port", &port.to_string()]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut guard = pod.spawn(cmd).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !guard.stderr().contains("listening on") {
            assert!(guard.try_wait().unwrap().is_none(), "tcpdump exited: {}", guard.stderr());
            assert!(Instant::now() < deadline, "tcpdump did not start: {}", guard.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { guard, file }
    }

    /// Waits (at most 20 s) until what tcpdump wrote so far satisfies `seen`, then stops it and
    /// returns each direction's TCP payload, in capture order. tcpdump writes packet by packet but
    /// drops what it has not read from the kernel yet when it is stopped, and on a loaded machine
    /// it lags behind the traffic.
    fn stop_when(mut self, seen: impl Fn(&Streams) -> bool) -> Streams {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let so_far = std::fs::read(self.file.path()).unwrap();
            // The header is written with the first packet.
            if so_far.len() >= 24 && seen(&tcp_streams(&so_far, self.file.path())) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.guard.signal(libc::SIGINT).unwrap();
        self.guard.wait_timeout(Duration::from_secs(10)).unwrap();
        tcp_streams(&std::fs::read(self.file.path()).unwrap(), self.file.path())
    }
}

/// Each direction's TCP payload, keyed by (source, destination).
type Streams = BTreeMap<(SocketAddr, SocketAddr), Vec<u8>>;

/// Splits a pcap (Ethernet, IPv4 or IPv6, TCP) into per-direction payloads, dropping
/// retransmissions by sequence number. A last record still being written is left out.
fn tcp_streams(pcap: &[u8], path: &Path) -> Streams {
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    assert!(matches!(u32_at(pcap, 0), 0xa1b2_c3d4 | 0xa1b2_3c4d), "{} is not a pcap", path.display());
    assert_eq!(u32_at(pcap, 20), 1, "link type is Ethernet");
    let mut streams: BTreeMap<(SocketAddr, SocketAddr), (u32, Vec<u8>)> = BTreeMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32_at(pcap, at + 8) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else { break };
        at += 16 + len;
        let (src_ip, dst_ip, tcp): (IpAddr, IpAddr, &[u8]) = match u16::from_be_bytes([frame[12], frame[13]])
        {
            0x0800 => {
                let ip = &frame[14..];
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                let src = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
                let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
                (src.into(), dst.into(), &ip[ihl..total])
            }
            0x86dd => {
                let ip = &frame[14..];
                let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
                let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
                (src.into(), dst.into(), &ip[40..40 + payload])
            }
            _ => continue,
        };
        let src = SocketAddr::new(src_ip, u16::from_be_bytes([tcp[0], tcp[1]]));
        let dst = SocketAddr::new(dst_ip, u16::from_be_bytes([tcp[2], tcp[3]]));
        let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
        let syn = tcp[13] & 0x02 != 0;
        let data = &tcp[usize::from(tcp[12] >> 4) * 4..];
        let stream = streams.entry((src, dst)).or_insert((seq.wrapping_add(1), Vec::new()));
        if syn {
            stream.0 = seq.wrapping_add(1);
        } else if !data.is_empty() && seq == stream.0 {
            stream.1.extend_from_slice(data);
            stream.0 = seq.wrapping_add(data.len() as u32);
        }
    }
    streams.into_iter().map(|(k, (_, bytes))| (k, bytes)).collect()
}

/// Walks `bytes` as TLS records (content type, length), requiring every byte to belong to one.
fn tls_records(bytes: &[u8]) -> Result<Vec<(u8, usize)>, String> {
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let [kind, major, _minor, hi, lo, ..] = *rest else {
            return Err(format!("{} bytes left, less than a record header", rest.len()));
        };
        if !(0x14..=0x17).contains(&kind) || major != 3 {
            return Err(format!("record header {:02x?}", &rest[..5]));
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > (1 << 14) + 256 || rest.len() < 5 + len {
            return Err(format!("record of {len} bytes with {} left", rest.len() - 5));
        }
        records.push((kind, len));
        rest = &rest[5 + len..];
    }
    if records.is_empty() {
        return Err("no bytes at all".into());
    }
    Ok(records)
}
