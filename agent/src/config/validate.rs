//! Turns the raw file into the typed [`MeshConfig`], checking every value and every cross-reference.
//!
//! Checks run in file order and stop at the first error, whose path and message name the bad value.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::error::ConfigError;
use super::schema::{RawCa, RawCapture, RawConfig, RawDatapath, RawHttp, RawPod, RawService};
use super::{
    AppProtocol, CaSettings, CaptureMode, CaptureSettings, DEFAULT_SVID_TTL_SECONDS, DEFAULT_TRUST_DOMAIN,
    DatapathSettings, HttpSettings, Index, MeshConfig, Mode, Pod, Service, ServicePort, names,
};

/// Validates `raw` and builds the lookup indexes.
pub(super) fn validate(raw: RawConfig) -> Result<MeshConfig, ConfigError> {
    names::dns_subdomain(&raw.node).map_err(|m| ConfigError::invalid("node", m))?;
    let trust_domain = raw.trust_domain.unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
    names::trust_domain(&trust_domain).map_err(|m| ConfigError::invalid("trust_domain", m))?;
    let capture = raw.capture.map(capture).transpose()?.unwrap_or_default();
    let ca = raw.ca.map(ca).transpose()?;
    let datapath = raw.datapath.map(datapath).unwrap_or_default();
    let http = raw.http.map(http).transpose()?.unwrap_or_default();

    let mut index = Index::default();
    let mut pod_names = HashMap::new();
    let mut pods: Vec<Pod> = Vec::with_capacity(raw.pods.len());
    for (i, raw_pod) in raw.pods.into_iter().enumerate() {
        let path = format!("pods[{i}]");
        let owner = |ip| index.pod_by_ip.get(&ip).map(|&other| pods[other].key());
        let pod = pod(&path, raw_pod, &raw.node, capture.mode, owner)?;
        unique_name(&mut pod_names, &path, &pod.namespace, &pod.name, i)?;
        index.pod_by_ip.extend(pod.ips().map(|ip| (ip, i)));
        pods.push(pod);
    }

    let mut service_names = HashMap::new();
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, raw_service) in raw.services.into_iter().enumerate() {
        let path = format!("services[{i}]");
        let service = service(&path, raw_service, &pod_names)?;
        unique_name(&mut service_names, &path, &service.namespace, &service.name, i)?;
        for (v, &vip) in service.vips.iter().enumerate() {
            if let Some(pod) = index.pod_by_ip.get(&vip).map(|&p| &pods[p]) {
                let msg = format!("{:?} is the address of pod {:?}", vip.to_string(), pod.key());
                return Err(ConfigError::invalid(format!("{path}.vips[{v}]"), msg));
            }
            for (p, port) in service.ports.iter().enumerate() {
                match index.service_by_vip.entry(SocketAddr::new(vip, port.port)) {
                    Entry::Occupied(taken) => {
                        let other: &Service = &services[taken.get().0];
                        let msg = format!("{} is already used by service {:?}", taken.key(), other.key());
                        return Err(ConfigError::invalid(format!("{path}.vips[{v}]"), msg));
                    }
                    Entry::Vacant(slot) => {
                        slot.insert((i, p));
                    }
                }
            }
        }
        services.push(service);
    }

    let root_namespace =
        raw.root_namespace.unwrap_or_else(|| crate::policy::DEFAULT_ROOT_NAMESPACE.to_owned());
    names::dns_label(&root_namespace).map_err(|m| ConfigError::invalid("root_namespace", m))?;
    let mut policies = Vec::with_capacity(raw.policies.len());
    for (i, source) in raw.policies.into_iter().enumerate() {
        if source.is_empty() {
            return Err(ConfigError::invalid(format!("policies[{i}]"), "an empty path names no policy file"));
        }
        policies.push(PathBuf::from(source));
    }

    Ok(MeshConfig {
        node: raw.node,
        trust_domain,
        capture,
        ca,
        datapath,
        http,
        root_namespace,
        policies,
        pods,
        services,
        index,
    })
}

/// Shortest and longest SVID lifetimes accepted: renewal at half-life must have room to retry, and a
/// stolen key must not stay useful for long.
const SVID_TTL_RANGE: std::ops::RangeInclusive<i64> = 10..=30 * 86_400;

fn ca(raw: RawCa) -> Result<CaSettings, ConfigError> {
    if !raw.dir.starts_with('/') {
        return Err(ConfigError::invalid("ca.dir", format!("{:?} must be an absolute path", raw.dir)));
    }
    let ttl = raw.svid_ttl_seconds.unwrap_or(DEFAULT_SVID_TTL_SECONDS as i64);
    if !SVID_TTL_RANGE.contains(&ttl) {
        let msg = format!("{ttl} is outside {}..={} seconds", SVID_TTL_RANGE.start(), SVID_TTL_RANGE.end());
        return Err(ConfigError::invalid("ca.svid_ttl_seconds", msg));
    }
    Ok(CaSettings { dir: PathBuf::from(raw.dir), svid_ttl_seconds: ttl as u64 })
}

fn datapath(raw: RawDatapath) -> DatapathSettings {
    // Without a CA there is no tunnel to skip, so the flag is harmless there and not an error.
    DatapathSettings { local_shortcut: raw.local_shortcut.unwrap_or(false) }
}

/// Longest detection wait accepted: a server-first protocol waits this long for its greeting.
const MAX_DETECT_TIMEOUT_MS: i64 = 10_000;

fn http(raw: RawHttp) -> Result<HttpSettings, ConfigError> {
    let defaults = HttpSettings::default();
    let detect_timeout = match raw.detect_timeout_ms {
        None => defaults.detect_timeout,
        Some(ms @ 1..=MAX_DETECT_TIMEOUT_MS) => std::time::Duration::from_millis(ms as u64),
        Some(ms) => {
            let msg = format!("{ms} is outside 1..={MAX_DETECT_TIMEOUT_MS} milliseconds");
            return Err(ConfigError::invalid("http.detect_timeout_ms", msg));
        }
    };
    let start_traceparent = raw.start_traceparent.unwrap_or(defaults.start_traceparent);
    let path_normalization = match raw.path_normalization.as_deref() {
        None => defaults.path_normalization,
        Some(name) => crate::http::path::Normalization::parse(name).ok_or_else(|| {
            let msg = format!(
                "{name:?} is not a normalization; use \"BASE\", \"MERGE_SLASHES\" or \"DECODE_AND_MERGE_SLASHES\""
            );
            ConfigError::invalid("http.path_normalization", msg)
        })?,
    };
    Ok(HttpSettings { detect_timeout, start_traceparent, path_normalization })
}

/// An `appProtocol` value Ferry knows.
fn protocol(path: &str, value: &str) -> Result<AppProtocol, ConfigError> {
    AppProtocol::parse(value).ok_or_else(|| {
        let msg = format!("{value:?} is not a protocol; use \"http\", \"http2\", \"grpc\" or \"tcp\"");
        ConfigError::invalid(path, msg)
    })
}

fn capture(raw: RawCapture) -> Result<CaptureSettings, ConfigError> {
    let defaults = CaptureSettings::default();
    let mode = match raw.mode.as_deref() {
        None | Some("ebpf") => CaptureMode::Ebpf,
        Some("iptables") => CaptureMode::Iptables,
        Some(other) => {
            let msg = format!("{other:?} is not a capture mode; use \"ebpf\" or \"iptables\"");
            return Err(ConfigError::invalid("capture.mode", msg));
        }
    };
    // The exclusions are written into the eBPF maps; with iptables the pod's rules decide alone,
    // and silently ignoring them would capture what the operator meant to leave alone.
    if mode == CaptureMode::Iptables {
        for (name, set) in [
            ("exclude_ports", !raw.exclude_ports.is_empty()),
            ("exclude_cidrs", !raw.exclude_cidrs.is_empty()),
        ] {
            if set {
                let msg = "has no effect with mode = \"iptables\": the pod's iptables rules decide what \
                           is captured";
                return Err(ConfigError::invalid(format!("capture.{name}"), msg));
            }
        }
    }
    let mut exclude_ports = Vec::with_capacity(raw.exclude_ports.len());
    for (i, &value) in raw.exclude_ports.iter().enumerate() {
        let path = format!("capture.exclude_ports[{i}]");
        let port = valid_port(&path, value)?;
        if exclude_ports.contains(&port) {
            return Err(ConfigError::invalid(path, format!("{port} is listed twice")));
        }
        exclude_ports.push(port);
    }
    let mut exclude_cidrs = Vec::with_capacity(raw.exclude_cidrs.len());
    for (i, text) in raw.exclude_cidrs.iter().enumerate() {
        let path = format!("capture.exclude_cidrs[{i}]");
        let net: ipnet::IpNet = text.parse().map_err(|_| {
            ConfigError::invalid(&path, format!("{text:?} is not a CIDR such as \"10.0.0.0/8\""))
        })?;
        if net.trunc() != net {
            let msg = format!("{text:?} has host bits set; the network is \"{}\"", net.trunc());
            return Err(ConfigError::invalid(path, msg));
        }
        if exclude_cidrs.contains(&net) {
            return Err(ConfigError::invalid(path, format!("{text:?} is listed twice")));
        }
        exclude_cidrs.push(net);
    }

    let [outbound_port, inbound_port, tunnel_port] = proxy_ports([
        ("outbound_port", raw.outbound_port, defaults.outbound_port),
        ("inbound_port", raw.inbound_port, defaults.inbound_port),
        ("tunnel_port", raw.tunnel_port, defaults.tunnel_port),
    ])?;
    // Transparent inbound needs the eBPF datapath's steering; with iptables REDIRECT the pod's
    // conntrack would rewrite the replies, so asking for it there is refused, not ignored.
    if mode == CaptureMode::Iptables && raw.original_source == Some(true) {
        let msg = "needs mode = \"ebpf\": with iptables the app sees the proxy on loopback";
        return Err(ConfigError::invalid("capture.original_source", msg));
    }
    let original_source = raw.original_source.unwrap_or(mode == CaptureMode::Ebpf);
    Ok(CaptureSettings {
        mode,
        exclude_ports,
        exclude_cidrs,
        outbound_port,
        inbound_port,
        tunnel_port,
        original_source,
    })
}

/// The proxy's listener ports, given as (name, value, default): each valid and all distinct.
fn proxy_ports(ports: [(&str, Option<i64>, u16); 3]) -> Result<[u16; 3], ConfigError> {
    let mut values = [0; 3];
    for (i, &(name, value, default)) in ports.iter().enumerate() {
        values[i] = value.map(|v| valid_port(&format!("capture.{name}"), v)).transpose()?.unwrap_or(default);
        let Some(j) = values[..i].iter().position(|&earlier| earlier == values[i]) else { continue };
        // Blame a port the file sets rather than one left at its default.
        let (blamed, other) = if ports[i].1.is_some() { (i, j) } else { (j, i) };
        let note = if ports[other].1.is_none() { " (its default)" } else { "" };
        let msg = format!("{} is also the {}{note}", values[i], ports[other].0);
        return Err(ConfigError::invalid(format!("capture.{}", ports[blamed].0), msg));
    }
    Ok(values)
}

/// Validates one pod; `owner` names the pod that already has an address, if any.
fn pod(
    path: &str,
    raw: RawPod,
    this_node: &str,
    capture: CaptureMode,
    owner: impl Fn(IpAddr) -> Option<String>,
) -> Result<Pod, ConfigError> {
    let field = |name: &str| format!("{path}.{name}");
    names::dns_label(&raw.name).map_err(|m| ConfigError::invalid(field("name"), m))?;
    names::dns_label(&raw.namespace).map_err(|m| ConfigError::invalid(field("namespace"), m))?;
    names::dns_subdomain(&raw.service_account)
        .map_err(|m| ConfigError::invalid(field("service_account"), m))?;
    let node = raw.node.unwrap_or_else(|| this_node.to_owned());
    names::dns_subdomain(&node).map_err(|m| ConfigError::invalid(field("node"), m))?;
    let local = node == this_node;
    // A pod given by UID is found on the node at enrollment: its paths are discovered, not given.
    if let Some(uid) = &raw.uid {
        if !crate::enroll::discover::is_uid(uid) {
            let msg = format!("{uid:?} is not a Kubernetes UID (8-4-4-4-12 hex digits)");
            return Err(ConfigError::invalid(field("uid"), msg));
        }
        for (name, given) in [("netns", raw.netns.is_some()), ("cgroup", raw.cgroup.is_some())] {
            if given {
                let msg = "give either the pod's uid (found on the node) or its netns and cgroup, not both";
                return Err(ConfigError::invalid(field(name), msg));
            }
        }
    }
    let by_uid = raw.uid.is_some();
    let netns = host_path(&field("netns"), raw.netns, local && !by_uid, this_node)?;
    // Only the eBPF programs attach to the cgroup; iptables capture lives in the netns.
    let cgroup_needed = local && !by_uid && capture == CaptureMode::Ebpf;
    let cgroup = host_path(&field("cgroup"), raw.cgroup, cgroup_needed, this_node)?;

    if raw.ips.is_empty() {
        return Err(ConfigError::invalid(field("ips"), "at least one address is required"));
    }
    let (mut ipv4, mut ipv6) = (None, None);
    for (j, text) in raw.ips.iter().enumerate() {
        let path = format!("{path}.ips[{j}]");
        let ip = address(&path, text)?;
        if let Some(other) = owner(ip) {
            let msg = format!("{text:?} is already the address of pod {other:?}");
            return Err(ConfigError::invalid(path, msg));
        }
        match ip {
            IpAddr::V4(ip) if ipv4.is_none() => ipv4 = Some(ip),
            IpAddr::V6(ip) if ipv6.is_none() => ipv6 = Some(ip),
            ip => {
                let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                let msg = format!("{text:?} is a second {family} address; a pod has at most one of each");
                return Err(ConfigError::invalid(path, msg));
            }
        }
    }

    for (key, value) in &raw.labels {
        let path = format!("{path}.labels.{key}");
        names::label_key(key).map_err(|m| ConfigError::invalid(&path, m))?;
        names::label_value(value).map_err(|m| ConfigError::invalid(&path, m))?;
    }

    let mut ports: Vec<(u16, AppProtocol)> = Vec::with_capacity(raw.ports.len());
    for (p, raw_port) in raw.ports.iter().enumerate() {
        let path = format!("{path}.ports[{p}]");
        let port = valid_port(&format!("{path}.port"), raw_port.port)?;
        if ports.iter().any(|(other, _)| *other == port) {
            return Err(ConfigError::invalid(format!("{path}.port"), format!("{port} is listed twice")));
        }
        ports.push((port, protocol(&format!("{path}.protocol"), &raw_port.protocol)?));
    }

    let mode = match raw.mode.as_deref() {
        None | Some("permissive") => Mode::Permissive,
        Some("strict") => Mode::Strict,
        Some(other) => {
            let msg = format!("{other:?} is not a mode; use \"strict\" or \"permissive\"");
            return Err(ConfigError::invalid(field("mode"), msg));
        }
    };

    Ok(Pod {
        name: raw.name,
        namespace: raw.namespace,
        service_account: raw.service_account,
        node,
        netns,
        cgroup,
        uid: raw.uid.map(|u| u.to_ascii_lowercase()),
        ipv4,
        ipv6,
        mode,
        labels: raw.labels,
        ports,
    })
}

/// A netns or cgroup path: absolute when given, and present when `required` (pods on this node).
fn host_path(
    path: &str,
    value: Option<String>,
    required: bool,
    this_node: &str,
) -> Result<Option<PathBuf>, ConfigError> {
    match value {
        None if required => {
            let msg = format!("missing; it is required for pods on this node ({this_node:?})");
            Err(ConfigError::invalid(path, msg))
        }
        None => Ok(None),
        Some(text) if !text.starts_with('/') => {
            Err(ConfigError::invalid(path, format!("{text:?} must be an absolute path")))
        }
        Some(text) => Ok(Some(PathBuf::from(text))),
    }
}

/// `(namespace, name)` to the index of the entry that holds it.
type NameIndex = HashMap<(String, String), usize>;

/// Records `name` in `namespace`, failing when an earlier entry holds it.
fn unique_name(
    seen: &mut NameIndex,
    path: &str,
    namespace: &str,
    name: &str,
    index: usize,
) -> Result<(), ConfigError> {
    match seen.entry((namespace.to_owned(), name.to_owned())) {
        Entry::Occupied(_) => {
            let msg = format!("{name:?} is already used in namespace {namespace:?}");
            Err(ConfigError::invalid(format!("{path}.name"), msg))
        }
        Entry::Vacant(slot) => {
            slot.insert(index);
            Ok(())
        }
    }
}

fn service(path: &str, raw: RawService, pods: &NameIndex) -> Result<Service, ConfigError> {
    let field = |name: &str| format!("{path}.{name}");
    names::dns_label(&raw.name).map_err(|m| ConfigError::invalid(field("name"), m))?;
    names::dns_label(&raw.namespace).map_err(|m| ConfigError::invalid(field("namespace"), m))?;

    if raw.vips.is_empty() {
        return Err(ConfigError::invalid(field("vips"), "at least one address is required"));
    }
    let mut vips = Vec::with_capacity(raw.vips.len());
    for (v, text) in raw.vips.iter().enumerate() {
        let path = format!("{path}.vips[{v}]");
        let vip = address(&path, text)?;
        if vips.contains(&vip) {
            return Err(ConfigError::invalid(path, format!("{text:?} is listed twice")));
        }
        vips.push(vip);
    }

    if raw.ports.is_empty() {
        return Err(ConfigError::invalid(field("ports"), "at least one port is required"));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw.ports.len());
    for (p, raw_port) in raw.ports.iter().enumerate() {
        let path = format!("{path}.ports[{p}]");
        let port = valid_port(&format!("{path}.port"), raw_port.port)?;
        if ports.iter().any(|other| other.port == port) {
            return Err(ConfigError::invalid(format!("{path}.port"), format!("{port} is listed twice")));
        }
        let target_port = match raw_port.target_port {
            Some(value) => valid_port(&format!("{path}.target_port"), value)?,
            None => port,
        };
        let protocol =
            raw_port.protocol.as_deref().map(|v| protocol(&format!("{path}.protocol"), v)).transpose()?;
        ports.push(ServicePort { port, target_port, protocol });
    }

    if raw.endpoints.is_empty() {
        return Err(ConfigError::invalid(field("endpoints"), "at least one endpoint pod is required"));
    }
    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    for (e, name) in raw.endpoints.iter().enumerate() {
        let path = format!("{path}.endpoints[{e}]");
        let Some(&pod) = pods.get(&(raw.namespace.clone(), name.clone())) else {
            let msg = format!("no pod {name:?} in namespace {:?}", raw.namespace);
            return Err(ConfigError::invalid(path, msg));
        };
        if endpoints.contains(&pod) {
            return Err(ConfigError::invalid(path, format!("{name:?} is listed twice")));
        }
        endpoints.push(pod);
    }

    Ok(Service { name: raw.name, namespace: raw.namespace, vips, ports, endpoints })
}

/// A TCP port: 1 to 65535.
fn valid_port(path: &str, value: i64) -> Result<u16, ConfigError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ConfigError::invalid(path, format!("{value} is not a valid port (1-65535)"))),
    }
}

/// A unicast address a pod or VIP can have.
fn address(path: &str, text: &str) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr =
        text.parse().map_err(|_| ConfigError::invalid(path, format!("{text:?} is not an IP address")))?;
    let why = match ip {
        _ if ip.is_unspecified() => "the unspecified address",
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_multicast() => "a multicast address",
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address",
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            "an IPv4-mapped IPv6 address; write the IPv4 address"
        }
        _ => return Ok(ip),
    };
    Err(ConfigError::invalid(path, format!("{text:?} is {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid file that each bad case below breaks in one place.
    const BASE: &str = include_str!("testdata/mesh.toml");

    fn error(text: &str) -> String {
        match MeshConfig::parse(text) {
            Ok(_) => panic!("accepted a bad file:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_files_name_field_and_value() {
        let pod = |extra: &str| {
            format!(
                "{BASE}\n[[pods]]\nname = \"p\"\nnamespace = \"demo\"\nservice_account = \"p\"\n\
                 node = \"node-c\"\n{extra}\n"
            )
        };
        let svc = |extra: &str| format!("{BASE}\n[[services]]\nnamespace = \"demo\"\n{extra}\n");
        let cases: Vec<(String, &str)> = vec![
            // TOML syntax and structure.
            ("node = \"a\"\n[capture\n".into(), "TOML syntax error at line 2, column"),
            ("node = \"a\"\nnode = \"b\"\n".into(), "TOML syntax error at line 2, column 1: duplicate key"),
            ("trust_domain = \"x\"\n".into(), "missing field \"node\""),
            (
                format!("nodes = 1\n{BASE}"),
                "unknown field \"nodes\", expected one of \"node\", \"trust_domain\"",
            ),
            ("node = \"a\"\n[[pods]]\nipz = []\n".into(), "pods[0]: unknown field \"ipz\""),
            (pod("ips = \"10.0.0.1\""), "pods[3].ips: invalid type: string \"10.0.0.1\", expected an array"),
            (
                svc("ports = [{ port = 1, targetport = 2 }]"),
                "services[1].ports[0]: unknown field \"targetport\"",
            ),
            // Top level.
            ("node = \"Node_A\"\n".into(), "node: \"Node_A\" is not a valid DNS subdomain"),
            (
                "node = \"a\"\ntrust_domain = \"Cluster.Local\"\n".into(),
                "trust_domain: \"Cluster.Local\" is not a valid trust domain",
            ),
            // Capture.
            (
                "node = \"a\"\n[capture]\nexclude_ports = [0]\n".into(),
                "capture.exclude_ports[0]: 0 is not a valid port",
            ),
            (
                "node = \"a\"\n[capture]\nexclude_ports = [22, 70000]\n".into(),
                "capture.exclude_ports[1]: 70000 is not a valid port",
            ),
            (
                "node = \"a\"\n[capture]\nexclude_ports = [22, 22]\n".into(),
                "capture.exclude_ports[1]: 22 is listed twice",
            ),
            (
                "node = \"a\"\n[capture]\nexclude_cidrs = [\"10.0.0.0\"]\n".into(),
                "capture.exclude_cidrs[0]: \"10.0.0.0\" is not a CIDR",
            ),
            (
                "node = \"a\"\n[capture]\nexclude_cidrs = [\"10.1.0.0/8\"]\n".into(),
                "\"10.1.0.0/8\" has host bits set; the network is \"10.0.0.0/8\"",
            ),
            (
                "node = \"a\"\n[capture]\ninbound_port = 15001\n".into(),
                "capture.inbound_port: 15001 is also the outbound_port (its default)",
            ),
            (
                "node = \"a\"\n[capture]\ntunnel_port = 15006\n".into(),
                "capture.tunnel_port: 15006 is also the inbound_port (its default)",
            ),
            (
                "node = \"a\"\n[capture]\noutbound_port = 0\n".into(),
                "capture.outbound_port: 0 is not a valid port",
            ),
            (
                "node = \"a\"\n[capture]\nmode = \"nftables\"\n".into(),
                "capture.mode: \"nftables\" is not a capture mode; use \"ebpf\" or \"iptables\"",
            ),
            ("node = \"a\"\n[capture]\nmode = 1\n".into(), "capture.mode: invalid type: integer `1`"),
            (
                "node = \"a\"\n[datapath]\nlocal_shortcut = \"yes\"\n".into(),
                "datapath.local_shortcut: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "node = \"a\"\n[datapath]\nlocal_shortcuts = true\n".into(),
                "datapath: unknown field \"local_shortcuts\", expected \"local_shortcut\"",
            ),
            (
                "node = \"a\"\n[capture]\nmode = \"iptables\"\nexclude_ports = [22]\n".into(),
                "capture.exclude_ports: has no effect with mode = \"iptables\"",
            ),
            (
                "node = \"a\"\n[capture]\nmode = \"iptables\"\nexclude_cidrs = [\"10.0.0.0/8\"]\n".into(),
                "capture.exclude_cidrs: has no effect with mode = \"iptables\"",
            ),
            (
                "node = \"a\"\n[capture]\nmode = \"iptables\"\n[[pods]]\nname = \"p\"\nnamespace = \"d\"\n\
                 service_account = \"p\"\nips = [\"10.0.0.1\"]\n"
                    .into(),
                "pods[0].netns: missing; it is required for pods on this node (\"a\")",
            ),
            // Pods.
            (pod("ips = [\"10.0.0.300\"]"), "pods[3].ips[0]: \"10.0.0.300\" is not an IP address"),
            (pod("ips = []"), "pods[3].ips: at least one address is required"),
            (
                pod("ips = [\"10.0.0.1\", \"10.0.0.2\"]"),
                "pods[3].ips[1]: \"10.0.0.2\" is a second IPv4 address",
            ),
            (pod("ips = [\"fd00::1\", \"fd00::2\"]"), "pods[3].ips[1]: \"fd00::2\" is a second IPv6 address"),
            (pod("ips = [\"127.0.0.1\"]"), "pods[3].ips[0]: \"127.0.0.1\" is a loopback address"),
            (
                pod("ips = [\"::ffff:10.0.0.1\"]"),
                "pods[3].ips[0]: \"::ffff:10.0.0.1\" is an IPv4-mapped IPv6 address",
            ),
            (
                pod("ips = [\"10.233.1.2\"]"),
                "pods[3].ips[0]: \"10.233.1.2\" is already the address of pod \"demo/client\"",
            ),
            (
                pod("ips = [\"fd00:233:1::3\", \"10.0.0.9\"]"),
                "pods[3].ips[0]: \"fd00:233:1::3\" is already the address of pod \"demo/server-1\"",
            ),
            (pod("ips = [\"10.0.0.1\"]\nmode = \"STRICT\""), "pods[3].mode: \"STRICT\" is not a mode"),
            (
                pod("ips = [\"10.0.0.1\"]\nnetns = \"relative/path\""),
                "pods[3].netns: \"relative/path\" must be an absolute path",
            ),
            (
                BASE.replace("name = \"server-1\"", "name = \"client\""),
                "pods[1].name: \"client\" is already used in namespace \"demo\"",
            ),
            (
                BASE.replace("name = \"client\"", "name = \"Client\""),
                "pods[0].name: \"Client\" is not a valid DNS label",
            ),
            (
                BASE.replace(
                    "namespace = \"demo\"\nservice_account = \"client\"",
                    "namespace = \"demo\"\nservice_account = \"a..b\"",
                ),
                "pods[0].service_account: \"a..b\" is not a valid DNS subdomain",
            ),
            (
                BASE.replace("netns = \"/var/run/netns/client\"\n", ""),
                "pods[0].netns: missing; it is required for pods on this node (\"node-a\")",
            ),
            (
                BASE.replace("cgroup = \"/sys/fs/cgroup/unified/ferry/client\"", "cgroup = \"sys/fs\""),
                "pods[0].cgroup: \"sys/fs\" must be an absolute path",
            ),
            // Services.
            (
                svc(
                    "name = \"e2\"\nvips = [\"10.96.0.11\"]\nports = [{ port = 80 }]\nendpoints = [\"server-1\", \"server-9\"]",
                ),
                "services[1].endpoints[1]: no pod \"server-9\" in namespace \"demo\"",
            ),
            (
                svc("name = \"e2\"\nvips = [\"10.96.0.11\"]\nports = [{ port = 80 }]\nendpoints = []"),
                "services[1].endpoints: at least one endpoint pod is required",
            ),
            (
                svc(
                    "name = \"e2\"\nvips = [\"10.96.0.10\"]\nports = [{ port = 80 }]\nendpoints = [\"client\"]",
                ),
                "services[1].vips[0]: 10.96.0.10:80 is already used by service \"demo/echo\"",
            ),
            (
                svc(
                    "name = \"e2\"\nvips = [\"10.233.1.2\"]\nports = [{ port = 80 }]\nendpoints = [\"client\"]",
                ),
                "services[1].vips[0]: \"10.233.1.2\" is the address of pod \"demo/client\"",
            ),
            (
                svc(
                    "name = \"e2\"\nvips = [\"10.96.0.11\", \"10.96.0.11\"]\nports = [{ port = 80 }]\nendpoints = [\"client\"]",
                ),
                "services[1].vips[1]: \"10.96.0.11\" is listed twice",
            ),
            (
                svc("name = \"e2\"\nvips = []\nports = [{ port = 80 }]\nendpoints = [\"client\"]"),
                "services[1].vips: at least one address is required",
            ),
            (
                svc(
                    "name = \"e2\"\nvips = [\"10.96.0.11\"]\nports = [{ port = 80, target_port = 0 }]\nendpoints = [\"client\"]",
                ),
                "services[1].ports[0].target_port: 0 is not a valid port",
            ),
            (
                svc(
                    "name = \"e2\"\nvips = [\"10.96.0.11\"]\nports = [{ port = 80 }, { port = 80 }]\nendpoints = [\"client\"]",
                ),
                "services[1].ports[1].port: 80 is listed twice",
            ),
            (
                svc("name = \"e2\"\nvips = [\"10.96.0.11\"]\nports = []\nendpoints = [\"client\"]"),
                "services[1].ports: at least one port is required",
            ),
            (
                svc(
                    "name = \"echo\"\nvips = [\"10.96.0.11\"]\nports = [{ port = 80 }]\nendpoints = [\"client\"]",
                ),
                "services[1].name: \"echo\" is already used in namespace \"demo\"",
            ),
        ];
        for (text, expected) in cases {
            let message = error(&text);
            assert!(message.contains(expected), "expected {expected:?} in {message:?}\nfor file:\n{text}");
        }
    }

    #[test]
    fn defaults_apply() {
        let text = "node = \"node-a\"\n[[pods]]\nname = \"p\"\nnamespace = \"demo\"\n\
                    service_account = \"p\"\nnetns = \"/n\"\ncgroup = \"/c\"\nips = [\"10.0.0.1\"]\n";
        let config = MeshConfig::parse(text).expect("valid");
        assert_eq!(config.trust_domain, DEFAULT_TRUST_DOMAIN);
        assert_eq!(config.capture, CaptureSettings::default());
        assert!(!config.datapath.local_shortcut, "the shortcut is opt-in");
        assert_eq!((config.pods[0].node.as_str(), config.pods[0].mode), ("node-a", Mode::Permissive));
        assert!(config.services.is_empty());
    }

    #[test]
    fn local_shortcut_is_read() {
        let config = MeshConfig::parse("node = \"a\"\n[datapath]\nlocal_shortcut = true\n").expect("valid");
        assert!(config.datapath.local_shortcut);
        let config = MeshConfig::parse("node = \"a\"\n[datapath]\n").expect("valid");
        assert!(!config.datapath.local_shortcut);
    }

    #[test]
    fn iptables_capture_needs_no_cgroup() {
        let text = "node = \"node-a\"\n[capture]\nmode = \"iptables\"\n[[pods]]\nname = \"p\"\n\
                    namespace = \"demo\"\nservice_account = \"p\"\nnetns = \"/n\"\nips = [\"10.0.0.1\"]\n";
        let config = MeshConfig::parse(text).expect("valid");
        assert_eq!(config.capture.mode, CaptureMode::Iptables);
        assert_eq!(config.capture.mode.to_string(), "iptables");
        assert_eq!(config.pods[0].cgroup, None);
        // The same pod with eBPF capture must name its cgroup.
        let ebpf = text.replace("mode = \"iptables\"\n", "");
        assert!(error(&ebpf).contains("pods[0].cgroup: missing; it is required"), "{}", error(&ebpf));
    }

    #[test]
    fn same_vip_on_other_port_and_same_name_in_other_namespace_are_fine() {
        let text = format!(
            "{BASE}\n[[services]]\nname = \"echo\"\nnamespace = \"other\"\nvips = [\"10.96.0.10\"]\n\
             ports = [{{ port = 81 }}]\nendpoints = [\"client\"]\n\n[[pods]]\nname = \"client\"\n\
             namespace = \"other\"\nservice_account = \"client\"\nnode = \"node-b\"\nips = [\"10.233.3.3\"]\n"
        );
        let config = MeshConfig::parse(&text).expect("valid");
        assert_eq!(config.services[1].endpoints, vec![3]);
        assert_eq!(config.services[1].ports, vec![ServicePort { port: 81, target_port: 81, protocol: None }]);
    }
}
