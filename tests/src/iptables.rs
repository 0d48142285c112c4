//! Classic sidecar capture: iptables REDIRECT rules inside a pod's netns, the way a sidecar mesh's
//! init container writes them. The app's outbound TCP goes to the sidecar's outbound port, inbound
//! TCP to its inbound port; the sidecar's own sockets are told apart by their group id
//! ([`PROXY_GID`]), so its upstream connections are not captured again.
//!
//! The rules live in the pod's netns and disappear with it: there is nothing to clean up.

use std::io::Write as _;
use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use crate::Pod;

/// The group id a sidecar runs with; its sockets bypass the capture (Istio uses 1337 as well).
pub const PROXY_GID: u32 = 1337;

/// Which ports the capture sends traffic to.
#[derive(Debug, Clone)]
pub struct SidecarCapture {
    /// Where the app's outbound TCP connections are redirected (on loopback).
    pub outbound_port: u16,
    /// Where inbound TCP connections to the pod are redirected (on the pod's address).
    pub inbound_port: u16,
    /// Inbound destination ports left alone (a sidecar's own mTLS port, say).
    pub inbound_exclude: Vec<u16>,
}

/// The `iptables-restore` input for one address family (`loopback` is 127.0.0.0/8 or ::1/128).
fn rules(capture: &SidecarCapture, loopback: &str) -> String {
    let mut out = String::from("*nat\n");
    for port in &capture.inbound_exclude {
        out += &format!("-A PREROUTING -p tcp --dport {port} -j RETURN\n");
    }
    out += &format!("-A PREROUTING -p tcp -j REDIRECT --to-ports {}\n", capture.inbound_port);
    out += &format!("-A OUTPUT -p tcp -m owner --gid-owner {PROXY_GID} -j RETURN\n");
    out += &format!("-A OUTPUT -p tcp -d {loopback} -j RETURN\n");
    out += &format!("-A OUTPUT -p tcp -j REDIRECT --to-ports {}\n", capture.outbound_port);
    out + "COMMIT\n"
}

/// Installs the capture rules (IPv4 and IPv6) in `pod`'s netns.
pub fn install(pod: &Pod, capture: &SidecarCapture) -> Result<()> {
    for (program, loopback) in [("iptables-restore", "127.0.0.0/8"), ("ip6tables-restore", "::1/128")] {
        restore(pod, program, &rules(capture, loopback))?;
    }
    Ok(())
}

/// Balances new connections from `pod` to `vip` over `endpoints` with DNAT, the way kube-proxy's
/// iptables mode does for a ClusterIP service (IPv4 only): each rule takes its share at random.
pub fn install_service_dnat(pod: &Pod, vip: SocketAddrV4, endpoints: &[SocketAddrV4]) -> Result<()> {
    ensure!(!endpoints.is_empty(), "service {vip} has no endpoints");
    restore(pod, "iptables-restore", &dnat_rules(vip, endpoints))
}

/// The `iptables-restore` input of [`install_service_dnat`].
fn dnat_rules(vip: SocketAddrV4, endpoints: &[SocketAddrV4]) -> String {
    let mut out = String::from("*nat\n:FERRY-SVC - [0:0]\n");
    out += &format!("-A OUTPUT -p tcp -d {}/32 --dport {} -j FERRY-SVC\n", vip.ip(), vip.port());
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let left = n - i;
        let pick = if left > 1 {
            format!("-m statistic --mode random --probability {:.10} ", 1.0 / left as f64)
        } else {
            String::new()
        };
        out += &format!("-A FERRY-SVC -p tcp {pick}-j DNAT --to-destination {ep}\n");
    }
    out + "COMMIT\n"
}

/// Loads `input` with `program --noflush FILE` (iptables-restore or ip6tables-restore) in `pod`'s
/// netns, through the pod's own tracked, time-limited runner.
fn restore(pod: &Pod, program: &str, input: &str) -> Result<()> {
    let mut file = tempfile::NamedTempFile::new().context("cannot create a rules file")?;
    file.write_all(input.as_bytes()).context("cannot write the rules file")?;
    let mut cmd = pod.netns_command(program);
    cmd.arg("--noflush").arg(file.path());
    let out = pod
        .output(cmd, Duration::from_secs(20))
        .with_context(|| format!("cannot run {program} in pod {} (is iptables installed?)", pod.name()))?;
    ensure!(
        out.status.success(),
        "{program} in pod {} failed: {}\nrules:\n{input}",
        pod.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exclude_the_proxy_and_loopback_before_redirecting() {
        let capture =
            SidecarCapture { outbound_port: 15001, inbound_port: 15006, inbound_exclude: vec![15008] };
        let text = rules(&capture, "127.0.0.0/8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], "-A PREROUTING -p tcp --dport 15008 -j RETURN");
        assert_eq!(lines[2], "-A PREROUTING -p tcp -j REDIRECT --to-ports 15006");
        assert_eq!(lines[3], "-A OUTPUT -p tcp -m owner --gid-owner 1337 -j RETURN");
        assert_eq!(lines[4], "-A OUTPUT -p tcp -d 127.0.0.0/8 -j RETURN");
        assert_eq!(lines[5], "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001");
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn dnat_gives_each_endpoint_an_equal_share() {
        let vip: SocketAddrV4 = "10.96.0.10:80".parse().unwrap();
        let eps: Vec<SocketAddrV4> = ["10.233.1.3:8080", "10.233.1.4:8080", "10.233.1.5:8080"]
            .iter()
            .map(|e| e.parse().unwrap())
            .collect();
        let text = dnat_rules(vip, &eps);
        assert!(text.contains("-A OUTPUT -p tcp -d 10.96.0.10/32 --dport 80 -j FERRY-SVC\n"), "{text}");
        // 1/3, then 1/2 of the rest, then all that is left: a third each.
        assert!(
            text.contains("--probability 0.3333333333 -j DNAT --to-destination 10.233.1.3:8080"),
            "{text}"
        );
        assert!(
            text.contains("--probability 0.5000000000 -j DNAT --to-destination 10.233.1.4:8080"),
            "{text}"
        );
        assert!(text.contains("-A FERRY-SVC -p tcp -j DNAT --to-destination 10.233.1.5:8080\n"), "{text}");
    }
}
