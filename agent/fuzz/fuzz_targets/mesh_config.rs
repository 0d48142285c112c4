//! The mesh file is written by operators and re-read whenever it changes, while the agent runs:
//! whatever its bytes, parsing must fail with a message, never panic, and what parses must hold
//! the promises the proxy relies on per connection. So: bytes (as UTF-8 when they are) go to
//! `MeshConfig::parse`; in a file that loads, every pod address and service VIP finds its own
//! entry, endpoints resolve, and every pod can be given a SPIFFE identity (the proxy issues one for
//! each local pod, and an invalid one would only show when a connection needs it).

#![no_main]

use std::net::{IpAddr, Ipv6Addr};

use ferry::config::MeshConfig;
use ferry::identity::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match MeshConfig::parse(text) {
        Ok(config) => config,
        Err(e) => {
            // The message is shown to operators (and the running file stays): building it must not
            // panic either.
            let _ = e.to_string();
            return;
        }
    };
    let td = TrustDomain::new(&config.trust_domain).expect("a loaded trust domain is a SPIFFE trust domain");
    for pod in &config.pods {
        let id = SpiffeId::workload(&td, &pod.namespace, &pod.service_account)
            .unwrap_or_else(|e| panic!("pod {} loaded but has no SPIFFE ID: {e}", pod.key()));
        assert_eq!(id.namespace(), Some(pod.namespace.as_str()), "{id}");
        assert_eq!(id.service_account(), Some(pod.service_account.as_str()), "{id}");
        assert!(pod.ips().next().is_some(), "pod {} loaded without an address", pod.key());
        for ip in pod.ips() {
            let found = config.pod_by_ip(ip).map(|p| p.key());
            assert_eq!(found, Some(pod.key()), "{ip} does not find its pod");
            // Dual-stack sockets show IPv4 peers as IPv4-mapped addresses.
            if let IpAddr::V4(v4) = ip {
                let mapped = IpAddr::V6(v4.to_ipv6_mapped());
                assert_eq!(config.pod_by_ip(mapped).map(|p| p.key()), Some(pod.key()), "{mapped}");
            }
        }
        for &(port, protocol) in &pod.ports {
            assert_eq!(config.declared_protocol(pod, port), Some(protocol), "{} port {port}", pod.key());
        }
        let _ = config.declared_protocol(pod, 0);
    }
    for service in &config.services {
        assert_eq!(config.endpoints(service).count(), service.endpoints.len(), "{}", service.key());
        for pod in config.endpoints(service) {
            assert_eq!(
                pod.namespace,
                service.namespace,
                "{} has an endpoint in another namespace",
                service.key()
            );
        }
        for &vip in &service.vips {
            assert!(config.pod_by_ip(vip).is_none(), "{vip} is both a VIP and a pod address");
            for port in &service.ports {
                let (found, found_port) = config
                    .service_by_vip(vip, port.port)
                    .unwrap_or_else(|| panic!("{vip}:{} does not find {}", port.port, service.key()));
                assert_eq!((found.key(), found_port), (service.key(), port), "{vip}:{}", port.port);
                if let IpAddr::V4(v4) = vip {
                    let mapped = config.service_by_vip(IpAddr::V6(v4.to_ipv6_mapped()), port.port);
                    assert_eq!(
                        mapped.map(|(s, _)| s.key()),
                        Some(service.key()),
                        "mapped {vip}:{}",
                        port.port
                    );
                }
            }
        }
    }
    assert!(config.local_pods().all(|p| p.netns.is_some() || p.uid.is_some()), "a local pod has no netns");
    let _ = config.pod_by_ip(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    // A reload compares the new model with the running one: the same text must give the same model.
    assert_eq!(MeshConfig::parse(text).ok().as_ref(), Some(&config), "parsing is not deterministic");
});
