//! A full file read into the model, and the lookups the proxy makes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

const FULL: &str = include_str!("testdata/mesh.toml");

fn v4(text: &str) -> Ipv4Addr {
    text.parse().expect("test address")
}

fn v6(text: &str) -> Ipv6Addr {
    text.parse().expect("test address")
}

#[test]
fn full_file_round_trip() {
    let config = MeshConfig::parse(FULL).expect("FULL is valid");
    assert_eq!(config.node, "node-a");
    assert_eq!(config.trust_domain, "example.org");
    assert_eq!(
        config.capture,
        CaptureSettings {
            mode: CaptureMode::Ebpf,
            exclude_ports: vec![22, 9100],
            exclude_cidrs: vec![
                "169.254.0.0/16".parse().expect("cidr"),
                "fd00:dead::/32".parse().expect("cidr")
            ],
            outbound_port: 16001,
            inbound_port: 16006,
            tunnel_port: 16008,
            original_source: true,
        }
    );
    assert_eq!(
        config.pods,
        vec![
            Pod {
                name: "client".into(),
                namespace: "demo".into(),
                service_account: "client".into(),
                node: "node-a".into(),
                netns: Some("/var/run/netns/client".into()),
                cgroup: Some("/sys/fs/cgroup/unified/ferry/client".into()),
                uid: None,
                ipv4: Some(v4("10.233.1.2")),
                ipv6: Some(v6("fd00:233:1::2")),
                mode: Mode::Strict,
                labels: Default::default(),
                ports: Vec::new(),
            },
            Pod {
                name: "server-1".into(),
                namespace: "demo".into(),
                service_account: "server".into(),
                node: "node-a".into(),
                netns: Some("/var/run/netns/server-1".into()),
                cgroup: Some("/sys/fs/cgroup/unified/ferry/server-1".into()),
                uid: None,
                ipv4: Some(v4("10.233.1.3")),
                ipv6: Some(v6("fd00:233:1::3")),
                mode: Mode::Permissive,
                labels: Default::default(),
                ports: Vec::new(),
            },
            Pod {
                name: "server-2".into(),
                namespace: "demo".into(),
                service_account: "server".into(),
                node: "node-b".into(),
                netns: None,
                cgroup: None,
                uid: None,
                ipv4: Some(v4("10.233.2.2")),
                ipv6: None,
                mode: Mode::Permissive,
                labels: Default::default(),
                ports: Vec::new(),
            },
        ]
    );
    assert_eq!(
        config.services,
        vec![Service {
            name: "echo".into(),
            namespace: "demo".into(),
            vips: vec![IpAddr::V4(v4("10.96.0.10")), IpAddr::V6(v6("fd00:96::10"))],
            ports: vec![
                ServicePort { port: 80, target_port: 8080, protocol: None },
                ServicePort { port: 443, target_port: 443, protocol: None }
            ],
            endpoints: vec![1, 2],
        }]
    );
}

#[test]
fn pod_helpers() {
    let config = MeshConfig::parse(FULL).expect("FULL is valid");
    let server = &config.pods[1];
    assert_eq!(server.key(), "demo/server-1");
    assert!(server.is_local("node-a") && !server.is_local("node-b"));
    let ips: Vec<IpAddr> = server.ips().collect();
    assert_eq!(ips, vec![IpAddr::V4(v4("10.233.1.3")), IpAddr::V6(v6("fd00:233:1::3"))]);
    assert_eq!(config.services[0].key(), "demo/echo");
    assert_eq!(
        (Mode::Strict.to_string(), Mode::Permissive.to_string()),
        ("strict".into(), "permissive".into())
    );
}

#[test]
fn lookups() {
    let config = MeshConfig::parse(FULL).expect("FULL is valid");
    let local: Vec<String> = config.local_pods().map(Pod::key).collect();
    assert_eq!(local, ["demo/client", "demo/server-1"]);

    let by_ip = |text: &str| config.pod_by_ip(text.parse().expect("ip")).map(Pod::key);
    assert_eq!(by_ip("10.233.2.2").as_deref(), Some("demo/server-2"));
    assert_eq!(by_ip("fd00:233:1::2").as_deref(), Some("demo/client"));
    assert_eq!(by_ip("::ffff:10.233.1.3").as_deref(), Some("demo/server-1"));
    assert_eq!(by_ip("10.233.9.9"), None);

    let by_vip =
        |text: &str, port| config.service_by_vip(text.parse().expect("ip"), port).map(|(s, p)| (s.key(), *p));
    let echo =
        |port, target_port| Some(("demo/echo".to_owned(), ServicePort { port, target_port, protocol: None }));
    assert_eq!(by_vip("10.96.0.10", 80), echo(80, 8080));
    assert_eq!(by_vip("fd00:96::10", 443), echo(443, 443));
    assert_eq!(by_vip("::ffff:10.96.0.10", 443), echo(443, 443));
    assert_eq!(by_vip("10.96.0.10", 8080), None);
    assert_eq!(by_vip("10.233.1.2", 80), None);

    let endpoints: Vec<String> = config.endpoints(&config.services[0]).map(Pod::key).collect();
    assert_eq!(endpoints, ["demo/server-1", "demo/server-2"]);
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mesh.toml");
    std::fs::write(&path, FULL).expect("write");
    let config = MeshConfig::load(&path).expect("FULL is valid");
    assert_eq!(config, MeshConfig::parse(FULL).expect("FULL is valid"));

    std::fs::write(&path, FULL.replace("10.233.2.2", "10.233.2.300")).expect("write");
    let message = MeshConfig::load(&path).expect_err("bad ip").to_string();
    assert_eq!(message, format!("{}: pods[2].ips[0]: \"10.233.2.300\" is not an IP address", path.display()));

    let missing = dir.path().join("absent.toml");
    let err = MeshConfig::load(&missing).expect_err("no file");
    assert!(matches!(&err, ConfigError::Read { kind: std::io::ErrorKind::NotFound, .. }), "{err:?}");
    assert!(err.to_string().starts_with(&format!("cannot read {}: ", missing.display())), "{err}");
}

#[test]
fn labels_root_namespace_and_policy_sources() {
    let text = "node = \"n\"\nroot_namespace = \"mesh-root\"\npolicies = [\"/etc/ferry/policies\", \"extra.yaml\"]\n\
                [[pods]]\nname = \"a\"\nnamespace = \"d\"\nservice_account = \"a\"\nnetns = \"/n\"\ncgroup = \"/c\"\n\
                ips = [\"10.0.0.1\"]\nlabels = { app = \"echo\", \"app.kubernetes.io/version\" = \"v1\" }\n";
    let config = MeshConfig::parse_file(std::path::Path::new("/etc/ferry/mesh.toml"), text).expect("valid");
    assert_eq!(config.root_namespace, "mesh-root");
    assert_eq!(
        config.policies,
        vec![
            std::path::PathBuf::from("/etc/ferry/policies"),
            std::path::PathBuf::from("/etc/ferry/extra.yaml")
        ]
    );
    assert_eq!(config.pods[0].labels.get("app").map(String::as_str), Some("echo"));
    let default = MeshConfig::parse("node = \"n\"\n").expect("valid");
    assert_eq!(default.root_namespace, "ferry-system");
    for (bad, want) in [
        ("labels = { app = \"a b\" }", "pods[0].labels.app: \"a b\" is not a valid label value"),
        ("labels = { \"-x\" = \"a\" }", "is not a valid label key"),
    ] {
        let e = MeshConfig::parse(
            &text.replace("labels = { app = \"echo\", \"app.kubernetes.io/version\" = \"v1\" }", bad),
        )
        .expect_err(bad)
        .to_string();
        assert!(e.contains(want), "{e}");
    }
    let e = MeshConfig::parse("node = \"n\"\nroot_namespace = \"Root\"\n").expect_err("bad root").to_string();
    assert!(e.starts_with("root_namespace: "), "{e}");
    let e = MeshConfig::parse("node = \"n\"\npolicies = [\"\"]\n").expect_err("empty").to_string();
    assert!(e.starts_with("policies[0]: "), "{e}");
}

#[test]
fn declared_protocols_come_from_the_pod_then_its_services() {
    let text = "node = \"a\"\n[[pods]]\nname = \"echo\"\nnamespace = \"demo\"\nservice_account = \"echo\"\n\
                node = \"b\"\nips = [\"10.1.0.2\"]\nports = [{ port = 9000, protocol = \"tcp\" }]\n\
                [[services]]\nname = \"echo\"\nnamespace = \"demo\"\nvips = [\"10.96.0.1\"]\n\
                ports = [{ port = 80, target_port = 8080, protocol = \"http\" }, { port = 90, target_port = 9000, protocol = \"grpc\" }, { port = 91 }]\n\
                endpoints = [\"echo\"]\n";
    let config = MeshConfig::parse(text).expect("valid");
    let pod = &config.pods[0];
    assert_eq!(config.declared_protocol(pod, 8080), Some(AppProtocol::Http));
    assert_eq!(config.declared_protocol(pod, 9000), Some(AppProtocol::Tcp), "the pod's own wins");
    assert_eq!(config.declared_protocol(pod, 91), None);
    assert_eq!(config.http.detect_timeout, std::time::Duration::from_millis(100));
    assert!(config.http.start_traceparent);
}

#[test]
fn unknown_protocols_and_timeouts_are_named() {
    let pod = "node = \"a\"\n[[pods]]\nname = \"echo\"\nnamespace = \"demo\"\nservice_account = \"echo\"\n\
               node = \"b\"\nips = [\"10.1.0.2\"]\nports = [{ port = 9000, protocol = \"HTTP\" }]\n";
    let e = MeshConfig::parse(pod).expect_err("bad protocol").to_string();
    assert!(e.starts_with("pods[0].ports[0].protocol: \"HTTP\" is not a protocol"), "{e}");
    let e = MeshConfig::parse("node = \"a\"\n[http]\ndetect_timeout_ms = 0\n").expect_err("0 ms").to_string();
    assert!(e.starts_with("http.detect_timeout_ms: 0 is outside"), "{e}");
    let text = "node = \"a\"\n[http]\ndetect_timeout_ms = 250\nstart_traceparent = false\n\
                path_normalization = \"MERGE_SLASHES\"\n";
    let config = MeshConfig::parse(text).expect("valid");
    assert_eq!(config.http.detect_timeout, std::time::Duration::from_millis(250));
    assert!(!config.http.start_traceparent);
    assert_eq!(config.http.path_normalization, crate::http::path::Normalization::MergeSlashes);
    let e = MeshConfig::parse("node = \"a\"\n[http]\npath_normalization = \"NONE\"\n").expect_err("bad");
    assert!(e.to_string().starts_with("http.path_normalization: \"NONE\" is not a normalization"), "{e}");
}
