use std::{sync::Mutex, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

fn labels() -> ConnLabels {
    ConnLabels {
        source_workload: "client".into(),
        source_workload_namespace: "default".into(),
        source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
        destination_workload: "web".into(),
        destination_workload_namespace: "default".into(),
        destination_service: "web.default.svc.cluster.local".into(),
        destination_principal: "spiffe://cluster.local/ns/default/sa/web".into(),
        connection_security_policy: SecurityPolicy::MutualTls,
        ..ConnLabels::unknown(Reporter::Source)
    }
}

/// The label set as the text format writes it (labels sorted by name, as the encoder does).
const SERIES: &str = "connection_security_policy=\"mutual_tls\",\
destination_principal=\"spiffe://cluster.local/ns/default/sa/web\",\
destination_service=\"web.default.svc.cluster.local\",destination_workload=\"web\",\
destination_workload_namespace=\"default\",reporter=\"source\",request_protocol=\"tcp\",\
source_principal=\"spiffe://cluster.local/ns/default/sa/client\",source_workload=\"client\",\
source_workload_namespace=\"default\"";

fn metrics() -> Metrics {
    Metrics::new(&BuildInfo { version: "9.9.9".into(), commit: "abc1234".into() }).expect("metrics")
}

fn sample(text: &str, family: &str, series: &str) -> Option<f64> {
    let prefix = format!("{family}{{{series}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().expect("number"))
}

#[test]
fn connection_counters_carry_istio_labels() {
    let m = metrics();
    let conn = m.opened(&labels());
    conn.add_received(100);
    conn.add_received(50);
    conn.add_sent(4096);
    conn.closed(Duration::from_millis(300));
    m.closed(&labels(), Duration::from_secs(45), 10, 20);
    m.failed(&ConnLabels { destination_service: "unknown".into(), ..labels() });
    let text = m.encode().expect("encode");
    assert_eq!(sample(&text, "ferry_tcp_connections_opened_total", SERIES), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ferry_tcp_connections_closed_total", SERIES), Some(2.0));
    assert_eq!(sample(&text, "ferry_tcp_received_bytes_total", SERIES), Some(170.0));
    assert_eq!(sample(&text, "ferry_tcp_sent_bytes_total", SERIES), Some(4106.0));
    assert_eq!(sample(&text, "ferry_tcp_connections_failed_total", SERIES), None);
    let failed = SERIES.replace("web.default.svc.cluster.local", "unknown");
    assert_eq!(sample(&text, "ferry_tcp_connections_failed_total", &failed), Some(1.0));
    assert!(text.contains("# TYPE ferry_tcp_connections_opened_total counter"), "{text}");
    for name in CONN_LABELS {
        assert!(SERIES.contains(&format!("{name}=")), "{name} missing from the expected set");
    }
    assert!(!text.contains("port="), "no port label anywhere");
}

#[test]
fn duration_histogram_uses_the_buckets() {
    let m = metrics();
    let conn = m.connection(&labels());
    conn.closed(Duration::from_millis(300));
    conn.closed(Duration::from_secs(45));
    conn.closed(Duration::from_secs(7200));
    let text = m.encode().expect("encode");
    let family = "ferry_tcp_connection_duration_seconds_bucket";
    let bucket = |le: &str| sample(&text, family, &format!("{SERIES},le=\"{le}\""));
    assert_eq!(bucket("0.25"), Some(0.0), "{text}");
    assert_eq!(bucket("0.5"), Some(1.0));
    assert_eq!(bucket("30"), Some(1.0));
    assert_eq!(bucket("60"), Some(2.0));
    assert_eq!(bucket("3600"), Some(2.0));
    assert_eq!(bucket("+Inf"), Some(3.0));
    let count = sample(&text, "ferry_tcp_connection_duration_seconds_count", SERIES);
    assert_eq!(count, Some(3.0));
    let sum = sample(&text, "ferry_tcp_connection_duration_seconds_sum", SERIES).expect("sum");
    assert!((sum - 7245.3).abs() < 1e-6, "{sum}");
    let buckets = text.lines().filter(|l| l.starts_with(family)).count();
    assert_eq!(buckets, DURATION_BUCKETS.len() + 1);
}

#[test]
fn bpf_rows_are_read_at_each_scrape() {
    let m = metrics();
    assert!(!m.encode().expect("encode").contains("ferry_bpf_redirects_total{"), "no source yet");
    let rows = Arc::new(Mutex::new(vec![
        BpfRedirects { direction: RedirectDirection::Outbound, pod: "default/client".into(), value: 7 },
        BpfRedirects { direction: RedirectDirection::Outbound, pod: "default/client".into(), value: 2 },
        BpfRedirects { direction: RedirectDirection::Inbound, pod: "default/web".into(), value: 3 },
    ]));
    let source = rows.clone();
    m.set_bpf_source(Arc::new(move || source.lock().expect("lock").clone()));
    let text = m.encode().expect("encode");
    let family = "ferry_bpf_redirects_total";
    assert_eq!(sample(&text, family, "direction=\"outbound\",pod=\"default/client\""), Some(9.0), "{text}");
    assert_eq!(sample(&text, family, "direction=\"inbound\",pod=\"default/web\""), Some(3.0));
    assert!(text.contains("# TYPE ferry_bpf_redirects_total counter"), "{text}");
    // The kernel's totals moved on and one pod left.
    *rows.lock().expect("lock") = vec![BpfRedirects {
        direction: RedirectDirection::Outbound,
        pod: "default/client".into(),
        value: 12,
    }];
    let text = m.encode().expect("encode");
    assert_eq!(sample(&text, family, "direction=\"outbound\",pod=\"default/client\""), Some(12.0));
    assert_eq!(sample(&text, family, "direction=\"inbound\",pod=\"default/web\""), None, "{text}");
}

#[test]
fn build_info_and_process_metrics_are_present() {
    let text = metrics().encode().expect("encode");
    assert_eq!(sample(&text, "ferry_build_info", "commit=\"abc1234\",version=\"9.9.9\""), Some(1.0));
    assert!(text.lines().any(|l| l.starts_with("process_resident_memory_bytes ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("process_open_fds ")), "{text}");
    let current = BuildInfo::current();
    assert_eq!(current.version, env!("CARGO_PKG_VERSION"));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
        .await
        .expect("answer in time")
        .expect("read");
    response
}

#[tokio::test]
async fn metrics_endpoint_serves_the_exposition_over_loopback() {
    let m = Arc::new(metrics());
    m.opened(&labels());
    let server = MetricsServer::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let addr = server.local_addr().expect("addr");
    assert!(addr.ip().is_loopback());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(m.clone(), async {
        let _ = stopped.await;
    }));
    let response = http_get(addr, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("content-type: text/plain; version=0.0.4"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).expect("body");
    assert_eq!(sample(body, "ferry_tcp_connections_opened_total", SERIES), Some(1.0), "{body}");
    let response = http_get(addr, "/other").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    let _ = stop.send(());
    task.await.expect("server task");
    assert_eq!(DEFAULT_ADDR.to_string(), "127.0.0.1:15020");
}
