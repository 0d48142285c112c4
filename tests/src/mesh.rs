//! Building the agent's standalone mesh file (TOML) from simulated pods.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::Pod;

/// The whole mesh file for one node's agent.
#[derive(Debug, Clone, Serialize)]
pub struct MeshFile {
    node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    trust_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root_namespace: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    policies: Vec<String>,
    capture: Capture,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<Ca>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datapath: Option<Datapath>,
    pods: Vec<PodEntry>,
    services: Vec<ServiceEntry>,
}

/// The `[capture]` table.
#[derive(Debug, Clone, Default, Serialize)]
struct Capture {
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    exclude_ports: Vec<u16>,
    exclude_cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    original_source: Option<bool>,
}

/// The `[ca]` table.
#[derive(Debug, Clone, Serialize)]
struct Ca {
    dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_ttl_seconds: Option<u64>,
}

/// The `[datapath]` table.
#[derive(Debug, Clone, Serialize)]
struct Datapath {
    local_shortcut: bool,
}

/// One `[[pods]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct PodEntry {
    name: String,
    namespace: String,
    service_account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    /// Declared application protocols (`ports = [{ port, protocol }]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<PodPort>,
    /// Last: a table, which TOML writes after the plain values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
}

/// One entry of a pod's `ports`.
#[derive(Debug, Clone, Serialize)]
struct PodPort {
    port: u16,
    protocol: String,
}

/// One `[[services]]` entry.
#[derive(Debug, Clone, Serialize)]
struct ServiceEntry {
    name: String,
    namespace: String,
    vips: Vec<String>,
    ports: Vec<ServicePort>,
    endpoints: Vec<String>,
}

/// One entry of a service's `ports`.
#[derive(Debug, Clone, Serialize)]
struct ServicePort {
    port: u16,
    target_port: u16,
}

impl MeshFile {
    /// An empty mesh file for node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            trust_domain: None,
            root_namespace: None,
            policies: Vec::new(),
            capture: Capture::default(),
            ca: None,
            datapath: None,
            pods: Vec::new(),
            services: Vec::new(),
        }
    }

    /// Sets `trust_domain`.
    pub fn trust_domain(&mut self, domain: &str) -> &mut Self {
        self.trust_domain = Some(domain.to_owned());
        self
    }

    /// Sets `root_namespace`: the namespace whose authorization policies apply mesh-wide (the
    /// agent's default is "ferry-system").
    pub fn root_namespace(&mut self, namespace: &str) -> &mut Self {
        self.root_namespace = Some(namespace.to_owned());
        self
    }

    /// Adds a source of Istio AuthorizationPolicy YAML to `policies`: a file, or a directory whose
    /// `*.yaml`/`*.yml` files count; a relative path is taken from the mesh file's directory.
    pub fn policies(&mut self, path: &Path) -> &mut Self {
        self.policies.push(path.display().to_string());
        self
    }

    /// Adds `pod` (its netns, cgroup and both IPs) in Kubernetes namespace `namespace` with
    /// `service_account`; the returned entry can be given a mode or a node.
    pub fn pod(&mut self, pod: &Pod, namespace: &str, service_account: &str) -> &mut PodEntry {
        self.pods.push(PodEntry {
            name: pod.name().to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            node: None,
            netns: Some(pod.netns_path().display().to_string()),
            cgroup: Some(pod.cgroup_path().display().to_string()),
            uid: None,
            ips: vec![pod.ipv4().to_string(), pod.ipv6().to_string()],
            mode: None,
            ports: Vec::new(),
            labels: BTreeMap::new(),
        });
        self.pods.last_mut().expect("just pushed")
    }

    /// Adds service `name` with its VIPs, (port, target_port) pairs and endpoint pod names.
    pub fn service(
        &mut self,
        name: &str,
        namespace: &str,
        vips: &[&str],
        ports: &[(u16, u16)],
        endpoints: &[&str],
    ) -> &mut Self {
        self.services.push(ServiceEntry {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            vips: vips.iter().map(|v| v.to_string()).collect(),
            ports: ports.iter().map(|&(port, target_port)| ServicePort { port, target_port }).collect(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        });
        self
    }

    /// Sets `capture.mode`: "ebpf" (the agent's default) or "iptables" (a sidecar per pod, see
    /// [`crate::Agent::start_sidecar`]).
    pub fn capture_mode(&mut self, mode: &str) -> &mut Self {
        self.capture.mode = Some(mode.to_owned());
        self
    }

    /// Excludes destination port `port` from capture.
    pub fn exclude_port(&mut self, port: u16) -> &mut Self {
        self.capture.exclude_ports.push(port);
        self
    }

    /// Sets `[ca]`: the node CA directory (from `ferry ca issue-node`) and optionally the SVID TTL.
    pub fn ca(&mut self, dir: &std::path::Path, svid_ttl_seconds: Option<u64>) -> &mut Self {
        self.ca = Some(Ca { dir: dir.display().to_string(), svid_ttl_seconds });
        self
    }

    /// Sets `datapath.local_shortcut`: pod to pod on one node without the HBONE tunnel.
    pub fn local_shortcut(&mut self, on: bool) -> &mut Self {
        self.datapath = Some(Datapath { local_shortcut: on });
        self
    }

    /// Sets `capture.original_source`: whether apps see their clients' real addresses.
    pub fn original_source(&mut self, on: bool) -> &mut Self {
        self.capture.original_source = Some(on);
        self
    }

    /// Excludes destination CIDR `cidr` from capture.
    pub fn exclude_cidr(&mut self, cidr: &str) -> &mut Self {
        self.capture.exclude_cidrs.push(cidr.to_owned());
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        // Plain strings, integers and arrays of tables: serialization cannot fail.
        toml::to_string(self).expect("mesh file types always serialize to TOML")
    }
}

impl PodEntry {
    /// Sets the enrollment mode (such as "strict" or "permissive").
    pub fn mode(&mut self, mode: &str) -> &mut Self {
        self.mode = Some(mode.to_owned());
        self
    }

    /// Marks the pod as running on node `node` (a remote pod for this agent).
    pub fn node(&mut self, node: &str) -> &mut Self {
        self.node = Some(node.to_owned());
        self
    }

    /// Adds pod labels (`labels = { app = "echo" }`), which policies select with `matchLabels`.
    pub fn labels(&mut self, labels: &[(&str, &str)]) -> &mut Self {
        self.labels.extend(labels.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())));
        self
    }

    /// Declares the application protocol of `port` on this pod (`"http"`, `"tcp"`, ... as
    /// Kubernetes' `appProtocol` names them).
    pub fn port_protocol(&mut self, port: u16, protocol: &str) -> &mut Self {
        self.ports.push(PodPort { port, protocol: protocol.to_owned() });
        self
    }

    /// Sets the pod's cgroup directory (say, one that does not exist yet).
    pub fn cgroup(&mut self, path: &Path) -> &mut Self {
        self.cgroup = Some(path.display().to_string());
        self
    }

    /// Gives the pod by its Kubernetes UID instead of its netns and cgroup: the agent finds them.
    pub fn uid(&mut self, uid: &str) -> &mut Self {
        (self.netns, self.cgroup, self.uid) = (None, None, Some(uid.to_owned()));
        self
    }

    /// Replaces the IPs (for example to list only the IPv4 address).
    pub fn ips(&mut self, ips: &[&str]) -> &mut Self {
        self.ips = ips.iter().map(|ip| ip.to_string()).collect();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ips: &[&str]) -> PodEntry {
        PodEntry {
            name: name.into(),
            namespace: "demo".into(),
            service_account: name.into(),
            node: None,
            netns: Some(format!("/var/run/netns/{name}")),
            cgroup: Some(format!("/sys/fs/cgroup/x/{name}")),
            uid: None,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            mode: None,
            ports: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn renders_the_documented_shape() {
        let mut mesh = MeshFile::new("node-a");
        mesh.exclude_port(22).exclude_cidr("169.254.0.0/16");
        mesh.pods.push(pod("client", &["10.233.1.2", "fd00:233:1::2"]));
        mesh.pods.push(pod("server-1", &[]));
        mesh.pods[1].mode("strict").node("node-b").ips(&["10.233.2.2"]);
        mesh.service("echo", "demo", &["10.96.0.10"], &[(80, 8080)], &["server-1", "server-2"]);
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert_eq!(value["node"].as_str(), Some("node-a"));
        assert!(value.get("trust_domain").is_none());
        assert!(value["capture"].get("mode").is_none(), "the agent's default applies");
        assert_eq!(value["capture"]["exclude_ports"][0].as_integer(), Some(22));
        assert_eq!(value["capture"]["exclude_cidrs"][0].as_str(), Some("169.254.0.0/16"));
        let pods = value["pods"].as_array().unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0]["ips"][1].as_str(), Some("fd00:233:1::2"));
        assert_eq!(pods[0]["netns"].as_str(), Some("/var/run/netns/client"));
        assert!(pods[0].get("mode").is_none() && pods[0].get("node").is_none());
        assert!(pods[0].get("labels").is_none(), "no labels unless set");
        assert_eq!(pods[1]["mode"].as_str(), Some("strict"));
        assert_eq!(pods[1]["node"].as_str(), Some("node-b"));
        assert_eq!(pods[1]["ips"].as_array().unwrap().len(), 1);
        let svc = &value["services"][0];
        assert_eq!(svc["vips"][0].as_str(), Some("10.96.0.10"));
        assert_eq!(svc["ports"][0]["port"].as_integer(), Some(80));
        assert_eq!(svc["ports"][0]["target_port"].as_integer(), Some(8080));
        assert_eq!(svc["endpoints"][1].as_str(), Some("server-2"));
    }

    #[test]
    fn trust_domain_and_capture_mode_are_written_when_set() {
        let mut mesh = MeshFile::new("n");
        mesh.trust_domain("example.org");
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert_eq!(value["trust_domain"].as_str(), Some("example.org"));
        mesh.capture_mode("iptables");
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert_eq!(value["capture"]["mode"].as_str(), Some("iptables"));
        assert_eq!(value["pods"].as_array().map(Vec::len), Some(0));
        assert!(value.get("datapath").is_none(), "the agent's default applies");
        mesh.local_shortcut(true);
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert_eq!(value["datapath"]["local_shortcut"].as_bool(), Some(true));
    }

    #[test]
    fn policies_root_namespace_and_labels_are_written_when_set() {
        let mut mesh = MeshFile::new("n");
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert!(value.get("policies").is_none() && value.get("root_namespace").is_none());
        mesh.root_namespace("istio-config")
            .policies(Path::new("/etc/ferry/policies"))
            .policies(Path::new("p.yaml"));
        mesh.pods.push(pod("server", &["10.233.2.2"]));
        mesh.pods[0].labels(&[("app", "echo"), ("version", "v1")]).mode("strict");
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert_eq!(value["root_namespace"].as_str(), Some("istio-config"));
        let sources: Vec<&str> =
            value["policies"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(sources, ["/etc/ferry/policies", "p.yaml"]);
        let pod = &value["pods"][0];
        assert_eq!(pod["labels"]["app"].as_str(), Some("echo"));
        assert_eq!(pod["labels"]["version"].as_str(), Some("v1"));
        assert_eq!(pod["mode"].as_str(), Some("strict"), "plain values still belong to the pod");
    }

    #[test]
    fn declared_port_protocols_are_written_when_set() {
        let mut mesh = MeshFile::new("n");
        mesh.pods.push(pod("server", &["10.233.2.2"]));
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        assert!(value["pods"][0].get("ports").is_none(), "no ports unless declared");
        mesh.pods[0].port_protocol(8080, "http").labels(&[("app", "echo")]).mode("strict");
        let value: toml::Value = toml::from_str(&mesh.to_toml()).unwrap();
        let pod = &value["pods"][0];
        assert_eq!(pod["ports"][0]["port"].as_integer(), Some(8080));
        assert_eq!(pod["ports"][0]["protocol"].as_str(), Some("http"));
        assert_eq!(pod["labels"]["app"].as_str(), Some("echo"));
        assert_eq!(pod["mode"].as_str(), Some("strict"));
    }
}
