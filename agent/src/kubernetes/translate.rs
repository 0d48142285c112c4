//! From the cluster's objects to the mesh file's model: which pods are in the mesh (and where),
//! the services and their ready endpoints, each pod's mode from Istio's PeerAuthentication, and
//! Istio's AuthorizationPolicies for the policy engine. Pure functions over a snapshot, so the
//! result goes through the very validation and apply path the standalone mesh file does.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use serde_json::{Value, json};
use toml::{Table, Value as Toml};

use crate::policy::{self, Origin, Policy, PolicyError};

/// The label that puts a pod (or every pod of a namespace) in the mesh.
pub const MESH_LABEL: &str = "ferry.dev/mesh";

/// What the reflectors hold at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Pods of the cluster (this node's and the others', for their identities and addresses).
    pub pods: Vec<Arc<Pod>>,
    /// Namespaces, for their labels.
    pub namespaces: Vec<Arc<Namespace>>,
    /// Services.
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices.
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Istio AuthorizationPolicies; `None` when the CRD is not installed.
    pub authorization: Option<Vec<Arc<DynamicObject>>>,
    /// Istio PeerAuthentications; `None` when the CRD is not installed.
    pub peer_authentication: Option<Vec<Arc<DynamicObject>>>,
}

/// Why a pod of the cluster is not in the mesh file, for pods on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Left {
    /// Not labelled into the mesh (or labelled out).
    NotInMesh,
    /// hostNetwork pods share the node's netns: never enrolled.
    HostNetwork,
    /// Not running yet, or without an address: it waits.
    NotReady(String),
}

/// The `[[pods]]` and `[[services]]` of the mesh file for node `node`, added to `base` (the
/// agent's settings file), and the local pods left out with why.
pub fn mesh(base: &Table, node: &str, snapshot: &Snapshot) -> (Table, Vec<(String, Left)>) {
    let root_namespace =
        base.get("root_namespace").and_then(Toml::as_str).unwrap_or("ferry-system").to_owned();
    let ns_labels: BTreeMap<&str, &BTreeMap<String, String>> = snapshot
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
        .collect();
    let mut pods = Vec::new();
    let mut in_mesh: BTreeMap<(String, String), ()> = BTreeMap::new();
    let mut left = Vec::new();
    for pod in &snapshot.pods {
        let (Some(name), Some(namespace)) = (pod.metadata.name.clone(), pod.metadata.namespace.clone())
        else {
            continue;
        };
        let spec = pod.spec.as_ref();
        let pod_node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        let local = pod_node == node;
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let verdict = membership(
            &labels,
            ns_labels.get(namespace.as_str()).copied(),
            spec.and_then(|s| s.host_network),
        );
        if let Err(why) = verdict {
            if local {
                left.push((format!("{namespace}/{name}"), why));
            }
            continue;
        }
        let ips = pod_ips(pod);
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        if phase != "Running" || ips.is_empty() {
            if local {
                let why = if ips.is_empty() { "no IP yet".to_owned() } else { format!("phase {phase}") };
                left.push((format!("{namespace}/{name}"), Left::NotReady(why)));
            }
            continue;
        }
        let mut entry = Table::new();
        entry.insert("name".into(), name.clone().into());
        entry.insert("namespace".into(), namespace.clone().into());
        let sa = spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        entry.insert("service_account".into(), sa.into());
        entry.insert("node".into(), pod_node.into());
        entry.insert("ips".into(), Toml::Array(ips.iter().map(|ip| ip.to_string().into()).collect()));
        if local && let Some(uid) = &pod.metadata.uid {
            entry.insert("uid".into(), uid.clone().into());
        }
        let strict =
            strict_mode(snapshot.peer_authentication.as_deref(), &namespace, &labels, &root_namespace);
        entry.insert("mode".into(), if strict { "strict" } else { "permissive" }.into());
        if !labels.is_empty() {
            let table: Table = labels.into_iter().map(|(k, v)| (k, Toml::String(v))).collect();
            entry.insert("labels".into(), Toml::Table(table));
        }
        in_mesh.insert((namespace, name), ());
        pods.push(Toml::Table(entry));
    }
    let services = services(snapshot, &in_mesh);
    let mut out = base.clone();
    out.insert("node".into(), node.into());
    out.insert("pods".into(), Toml::Array(pods));
    out.insert("services".into(), Toml::Array(services));
    (out, left)
}

/// Whether a pod is in the mesh: its own label, else its namespace's; hostNetwork never.
fn membership(
    labels: &BTreeMap<String, String>,
    namespace: Option<&BTreeMap<String, String>>,
    host_network: Option<bool>,
) -> Result<(), Left> {
    if host_network == Some(true) {
        return Err(Left::HostNetwork);
    }
    match labels.get(MESH_LABEL).map(String::as_str) {
        Some("disabled") => Err(Left::NotInMesh),
        Some("enabled") => Ok(()),
        _ if namespace.and_then(|l| l.get(MESH_LABEL)).map(String::as_str) == Some("enabled") => Ok(()),
        _ => Err(Left::NotInMesh),
    }
}

/// At most one IPv4 and one IPv6 address, from `status.podIPs` (or `status.podIP`).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else { return Vec::new() };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let texts: Vec<&str> = listed.chain(status.pod_ip.as_deref()).collect();
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in texts.into_iter().filter_map(|t| t.parse::<IpAddr>().ok()) {
        if !out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            out.push(ip);
        }
    }
    out.sort_by_key(|ip| !ip.is_ipv4());
    out
}

/// Whether PeerAuthentication makes a pod STRICT, as Istio resolves it: the mode comes from the
/// policy selecting the pod (the oldest, if several do), else its namespace's, else the root
/// namespace's, each level's absent or UNSET `mtls` inheriting from the next; PERMISSIVE when none
/// says. DISABLE is treated as PERMISSIVE. A port set STRICT in the selecting policy's
/// `portLevelMtls` makes the pod STRICT (Ferry's modes are per pod, and failing closed on the other
/// ports beats failing open on that one).
fn strict_mode(
    pas: Option<&[Arc<DynamicObject>]>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    root_namespace: &str,
) -> bool {
    let Some(pas) = pas else { return false };
    let selects = |pa: &DynamicObject| -> Option<bool> {
        match pa.data.get("spec").and_then(|s| s.get("selector")).and_then(|s| s.get("matchLabels")) {
            None => None,
            Some(Value::Object(want)) => {
                Some(want.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()))
            }
            Some(_) => Some(false),
        }
    };
    // Oldest first, as Istio breaks ties; the name makes the order total.
    let mut ordered: Vec<&Arc<DynamicObject>> = pas.iter().collect();
    ordered
        .sort_by_key(|pa| (pa.metadata.creation_timestamp.as_ref().map(|t| t.0), pa.metadata.name.clone()));
    let in_ns = |ns: &str, selecting: bool| {
        ordered.iter().copied().find(|pa| {
            pa.metadata.namespace.as_deref() == Some(ns)
                && if selecting { selects(pa) == Some(true) } else { selects(pa).is_none() }
        })
    };
    let workload = in_ns(namespace, true);
    let levels = [workload, in_ns(namespace, false), in_ns(root_namespace, false)];
    let mode = |pa: &DynamicObject| -> Option<String> {
        let mode = pa.data.get("spec")?.get("mtls")?.get("mode")?.as_str()?;
        (mode != "UNSET").then(|| mode.to_owned())
    };
    let effective = levels.iter().flatten().find_map(|pa| mode(pa));
    // Istio only honours portLevelMtls with a selector; a STRICT port at any level that applies is
    // still taken as STRICT (failing closed).
    let port_strict = levels.iter().flatten().any(|pa| {
        let ports = pa.data.get("spec").and_then(|s| s.get("portLevelMtls")).and_then(Value::as_object);
        ports.is_some_and(|ports| {
            ports.values().any(|p| p.get("mode").and_then(Value::as_str) == Some("STRICT"))
        })
    });
    effective.as_deref() == Some("STRICT") || port_strict
}

/// `[[services]]`: ClusterIP services with at least one ready endpoint that is a mesh pod; the
/// rest go to the cluster's own service handling (passthrough).
fn services(snapshot: &Snapshot, in_mesh: &BTreeMap<(String, String), ()>) -> Vec<Toml> {
    let mut out = Vec::new();
    for svc in &snapshot.services {
        let (Some(name), Some(namespace)) = (&svc.metadata.name, &svc.metadata.namespace) else { continue };
        let Some(spec) = &svc.spec else { continue };
        let vips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.as_ref())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let mut vips_unique: Vec<IpAddr> = Vec::new();
        for ip in vips {
            if !vips_unique.contains(&ip) {
                vips_unique.push(ip);
            }
        }
        if vips_unique.is_empty() {
            continue;
        }
        let slices: Vec<&EndpointSlice> = snapshot
            .slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(name)
            })
            .map(Arc::as_ref)
            .collect();
        let mut endpoints: Vec<String> = Vec::new();
        for slice in &slices {
            for ep in slice.endpoints.iter().flatten() {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                let Some(target) = &ep.target_ref else { continue };
                let Some(pod) = target.name.clone() else { continue };
                if target.kind.as_deref() == Some("Pod")
                    && in_mesh.contains_key(&(namespace.clone(), pod.clone()))
                    && !endpoints.contains(&pod)
                {
                    endpoints.push(pod);
                }
            }
        }
        if endpoints.is_empty() {
            continue;
        }
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            // A named targetPort is resolved by the EndpointSlices (they carry the number).
            let by_slice = slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                // An unnamed service port is "" in its slices.
                .find(|p| p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or(""))
                .and_then(|p| p.port);
            let target = match &port.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => Some(*n),
                _ => None,
            };
            let target = by_slice.or(target).unwrap_or(port.port);
            let mut entry = Table::new();
            entry.insert("port".into(), i64::from(port.port).into());
            entry.insert("target_port".into(), i64::from(target).into());
            if let Some(protocol) = protocol_of(port.app_protocol.as_deref(), port.name.as_deref()) {
                entry.insert("protocol".into(), protocol.into());
            }
            ports.push(Toml::Table(entry));
        }
        if ports.is_empty() {
            continue;
        }
        let mut entry = Table::new();
        entry.insert("name".into(), name.clone().into());
        entry.insert("namespace".into(), namespace.clone().into());
        entry.insert("vips".into(), Toml::Array(vips_unique.iter().map(|v| v.to_string().into()).collect()));
        entry.insert("ports".into(), Toml::Array(ports));
        entry.insert("endpoints".into(), Toml::Array(endpoints.into_iter().map(Toml::String).collect()));
        out.push(Toml::Table(entry));
    }
    out
}

/// A port's protocol from its `appProtocol`, else its name's prefix (`http-`, `grpc-`, ...), as
/// Istio reads them; `None` when neither says (the destination then detects).
pub fn protocol_of(app_protocol: Option<&str>, name: Option<&str>) -> Option<&'static str> {
    let by_app = match app_protocol {
        Some("http") => Some("http"),
        Some("http2") | Some("kubernetes.io/h2c") => Some("http2"),
        Some("grpc") => Some("grpc"),
        Some("tcp") => Some("tcp"),
        _ => None,
    };
    by_app.or_else(|| {
        let name = name?;
        let prefix = name.split_once('-').map_or(name, |(p, _)| p);
        match prefix {
            "http" => Some("http"),
            "http2" => Some("http2"),
            "grpc" => Some("grpc"),
            "tcp" => Some("tcp"),
            _ => None,
        }
    })
}

/// Istio's AuthorizationPolicies, compiled by the policy engine exactly as files are. Each object
/// is handed over as the document `kubectl get -o json` prints (bookkeeping fields dropped), under
/// the name `kubernetes:NAMESPACE/NAME`, so errors name the object. An object that does not compile
/// fails closed on its own: it becomes a DENY of everything for the workloads it selects (its whole
/// namespace when its selector is unusable), and its error is returned beside the set, so one
/// tenant's bad policy neither opens nor freezes anyone else's.
pub fn policies(snapshot: &Snapshot) -> (Vec<(Policy, Origin)>, Vec<PolicyError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut objects: Vec<&Arc<DynamicObject>> = snapshot.authorization.iter().flatten().collect();
    objects.sort_by_key(|o| (o.metadata.namespace.clone(), o.metadata.name.clone()));
    for object in objects {
        let ns = object.metadata.namespace.clone().unwrap_or_default();
        let name = object.metadata.name.clone().unwrap_or_default();
        let mut meta = serde_json::Map::new();
        meta.insert("name".into(), name.clone().into());
        meta.insert("namespace".into(), ns.clone().into());
        if let Some(annotations) = &object.metadata.annotations {
            meta.insert("annotations".into(), serde_json::to_value(annotations).unwrap_or_default());
        }
        let mut doc = serde_json::Map::new();
        let api_version =
            object.types.as_ref().map_or("security.istio.io/v1".to_owned(), |t| t.api_version.clone());
        doc.insert("apiVersion".into(), api_version.into());
        doc.insert("kind".into(), "AuthorizationPolicy".into());
        doc.insert("metadata".into(), Value::Object(meta));
        if let Some(spec) = object.data.get("spec") {
            doc.insert("spec".into(), spec.clone());
        }
        let selector = object.data.get("spec").and_then(|s| s.get("selector")).cloned();
        let text = Value::Object(doc.clone()).to_string();
        let origin = PathBuf::from(format!("kubernetes:{ns}/{name}"));
        match policy::parse_file(&origin, &text) {
            Ok(compiled) => out.extend(compiled),
            Err(e) => {
                errors.push(e);
                out.extend(deny_all(&origin, doc, selector));
            }
        }
    }
    (out, errors)
}

/// The fail-closed stand-in for a policy that does not compile: DENY everything, for its selector
/// when that compiles, else for its whole namespace.
fn deny_all(
    origin: &Path,
    mut doc: serde_json::Map<String, Value>,
    selector: Option<Value>,
) -> Vec<(Policy, Origin)> {
    let attempt = |selector: Option<Value>, doc: &mut serde_json::Map<String, Value>| {
        let mut spec = serde_json::Map::new();
        if let Some(selector) = selector {
            spec.insert("selector".into(), selector);
        }
        spec.insert("action".into(), "DENY".into());
        spec.insert("rules".into(), json!([{}]));
        doc.insert("spec".into(), Value::Object(spec));
        if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("annotations");
        }
        policy::parse_file(origin, &Value::Object(doc.clone()).to_string()).ok()
    };
    attempt(selector, &mut doc).or_else(|| attempt(None, &mut doc)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: Value) -> Arc<Pod> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn running(name: &str, node: &str, labels: Value, ips: &[&str]) -> Arc<Pod> {
        pod(json!({
            "metadata": {"name": name, "namespace": "demo", "uid": format!("00000000-0000-4000-8000-00000000000{}", name.len()), "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": "echo", "containers": []},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
        }))
    }

    fn namespace(name: &str, labels: Value) -> Arc<Namespace> {
        Arc::new(serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap())
    }

    fn pa(ns: &str, spec: Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(
                json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "pa", "namespace": ns}, "spec": spec}),
            )
            .unwrap(),
        )
    }

    fn names(table: &Table) -> Vec<String> {
        table["pods"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn labels_decide_membership_and_host_network_never_joins() {
        let mut s = Snapshot {
            namespaces: vec![namespace("demo", json!({MESH_LABEL: "enabled"}))],
            ..Default::default()
        };
        s.pods.push(running("a", "n1", json!({}), &["10.0.0.1"]));
        s.pods.push(running("b", "n1", json!({MESH_LABEL: "disabled"}), &["10.0.0.2"]));
        let mut host = (*running("c", "n1", json!({MESH_LABEL: "enabled"}), &["10.0.0.3"])).clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        s.pods.push(Arc::new(host));
        let mut pending = (*running("d", "n1", json!({}), &[])).clone();
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        s.pods.push(Arc::new(pending));
        s.pods.push(running("e", "n2", json!({}), &["10.0.1.5", "fd00::5"]));
        let (table, left) = mesh(&Table::new(), "n1", &s);
        assert_eq!(names(&table), ["a", "e"]);
        let left: Vec<(&str, &Left)> = left.iter().map(|(k, w)| (k.as_str(), w)).collect();
        assert_eq!(
            left,
            [
                ("demo/b", &Left::NotInMesh),
                ("demo/c", &Left::HostNetwork),
                ("demo/d", &Left::NotReady("no IP yet".into()))
            ]
        );
        let pods = table["pods"].as_array().unwrap();
        // The local pod is found by UID; the remote one is only an address and an identity.
        assert!(pods[0].get("uid").is_some() && pods[1].get("uid").is_none());
        assert_eq!(pods[1]["ips"].as_array().unwrap().len(), 2);
        assert_eq!(pods[1]["node"].as_str(), Some("n2"));
        // Without the namespace label only a labelled pod joins.
        s.namespaces = vec![namespace("demo", json!({}))];
        s.pods.push(running("f", "n1", json!({MESH_LABEL: "enabled"}), &["10.0.0.6"]));
        assert_eq!(names(&mesh(&Table::new(), "n1", &s).0), ["f"]);
    }

    #[test]
    fn peer_authentication_picks_the_most_specific_and_port_strict_wins() {
        let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let root = "istio-system";
        let strict = json!({"mtls": {"mode": "STRICT"}});
        let permissive = json!({"mtls": {"mode": "PERMISSIVE"}});
        let cases: Vec<(Vec<Arc<DynamicObject>>, bool)> = vec![
            (vec![], false),
            (vec![pa(root, strict.clone())], true),
            (vec![pa(root, strict.clone()), pa("demo", permissive.clone())], false),
            (
                vec![
                    pa("demo", permissive.clone()),
                    pa(
                        "demo",
                        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
                    ),
                ],
                true,
            ),
            (
                vec![pa(
                    "demo",
                    json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}}),
                )],
                false,
            ),
            (vec![pa("demo", json!({"mtls": {"mode": "DISABLE"}}))], false),
            (
                vec![pa(
                    "demo",
                    json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
                )],
                true,
            ),
            (vec![pa("other", strict.clone())], false),
            // An absent or UNSET mode inherits: a workload policy with only ports, under a STRICT
            // namespace, leaves the pod STRICT.
            (
                vec![
                    pa("demo", strict.clone()),
                    pa(
                        "demo",
                        json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
                    ),
                ],
                true,
            ),
            (vec![pa(root, strict.clone()), pa("demo", json!({"mtls": {"mode": "UNSET"}}))], true),
            (vec![pa(root, strict), pa("demo", json!({"mtls": {}}))], true),
        ];
        for (i, (pas, want)) in cases.into_iter().enumerate() {
            assert_eq!(strict_mode(Some(&pas), "demo", &labels, root), want, "case {i}");
        }
        assert!(!strict_mode(None, "demo", &labels, root), "no CRD: permissive");
    }

    #[test]
    fn ports_get_their_protocol_from_app_protocol_or_name() {
        let cases = [
            (Some("http"), None, Some("http")),
            (Some("kubernetes.io/h2c"), None, Some("http2")),
            (Some("grpc"), Some("tcp-x"), Some("grpc")),
            (None, Some("http-web"), Some("http")),
            (None, Some("grpc"), Some("grpc")),
            (None, Some("tcp-db"), Some("tcp")),
            (None, Some("web"), None),
            (Some("kubernetes.io/ws"), Some("metrics"), None),
        ];
        for (app, name, want) in cases {
            assert_eq!(protocol_of(app, name), want, "{app:?} {name:?}");
        }
    }

    #[test]
    fn services_keep_ready_mesh_endpoints_and_resolve_named_ports() {
        let mut s = Snapshot {
            namespaces: vec![namespace("demo", json!({MESH_LABEL: "enabled"}))],
            pods: vec![
                running("a", "n1", json!({}), &["10.0.0.1"]),
                running("b", "n2", json!({}), &["10.0.0.2"]),
            ],
            ..Default::default()
        };
        s.services.push(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "echo", "namespace": "demo"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                         "ports": [{"name": "http-web", "port": 80, "targetPort": "web", "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}]}
            }))
            .unwrap(),
        ));
        s.slices.push(Arc::new(serde_json::from_value(json!({
            "metadata": {"name": "echo-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http-web", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "a"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "b"}},
                {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": "not-in-mesh"}}
            ]
        })).unwrap()));
        let (table, _) = mesh(&Table::new(), "n1", &s);
        let svc = &table["services"].as_array().unwrap()[0];
        assert_eq!(svc["vips"].as_array().unwrap().len(), 2);
        assert_eq!(svc["endpoints"].as_array().unwrap(), &vec![Toml::from("a")]);
        let ports = svc["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "UDP is not proxied");
        assert_eq!(ports[0]["target_port"].as_integer(), Some(8080));
        assert_eq!(ports[0]["protocol"].as_str(), Some("http"));
        // A single unnamed port with a named target: the slice lists it under "".
        let mut svc = (*s.services[0]).clone();
        let spec = svc.spec.as_mut().unwrap();
        spec.ports = Some(vec![
            serde_json::from_value(json!({"port": 80, "targetPort": "web", "protocol": "TCP"})).unwrap(),
        ]);
        s.services = vec![Arc::new(svc)];
        let mut slice = (*s.slices[0]).clone();
        slice.ports =
            Some(vec![serde_json::from_value(json!({"name": "", "port": 9090, "protocol": "TCP"})).unwrap()]);
        s.slices = vec![Arc::new(slice)];
        let (table, _) = mesh(&Table::new(), "n1", &s);
        let port = &table["services"].as_array().unwrap()[0]["ports"].as_array().unwrap()[0];
        assert_eq!(port["target_port"].as_integer(), Some(9090));
    }

    #[test]
    fn authorization_policies_compile_and_errors_name_the_object() {
        let ap = |name: &str, spec: Value| -> Arc<DynamicObject> {
            Arc::new(serde_json::from_value(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "demo", "resourceVersion": "7", "uid": "x"}, "spec": spec})).unwrap())
        };
        let good = ap(
            "allow",
            json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}),
        );
        let s = Snapshot { authorization: Some(vec![good.clone()]), ..Default::default() };
        let (set, errors) = policies(&s);
        assert_eq!((set.len(), errors.len()), (1, 0));
        // An invalid one is named, and stands in as a DENY of everything it selects.
        let bad = ap(
            "bad",
            json!({"selector": {"matchLabels": {"app": "web"}}, "action": "CUSTOM", "provider": {"name": "x"}}),
        );
        let worse = ap("worse", json!({"selector": {"matchLabels": "not-a-map"}, "action": "ALLOW"}));
        let s = Snapshot { authorization: Some(vec![good, bad, worse]), ..Default::default() };
        let (set, errors) = policies(&s);
        assert_eq!(errors.len(), 2);
        assert!(errors[0].to_string().contains("kubernetes:demo/bad"), "{}", errors[0]);
        assert_eq!(set.len(), 3, "the valid one and two fail-closed stand-ins");
        assert!(set[1..].iter().all(|(p, _)| p.action == crate::policy::Action::Deny), "{set:?}");
    }
}
