//! The Kubernetes source: `ferry run --kubernetes` against a list/watch server started by the test
//! (`ferry_tests::kube_api`: no kube-apiserver can be had here), with real pods (netns, cgroups
//! laid out as the kubelet lays them out, a sandbox process each) that the agent finds by UID.

mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use common::*;
use ferry_tests::{Agent, ChildGuard, Pod, kube_api::*};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod as KubePod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

const NODE: &str = "node-a";

/// A kubelet-style pod: its UID, the container cgroup its sandbox and clients run in.
struct KubeletPod {
    pod: Pod,
    uid: String,
    leaf: PathBuf,
    _sandbox: ChildGuard,
}

/// The scenario's pods made into Kubernetes pods of namespace `demo` on node-a, the API server,
/// and (once started) the agent.
struct Cluster {
    api: KubeApi,
    pods: Vec<KubeletPod>,
    _ca: tempfile::TempDir,
    settings: String,
    /// The scenario's node and its echo servers; dropped last.
    scenario: ScenarioPods,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let scenario = ScenarioPods::start(name).unwrap();
        let api = KubeApi::start(scenario.node.netns_path()).unwrap();
        let root = scenario.node.cgroup_root().to_path_buf();
        let mut pods = Vec::new();
        let all: Vec<&Pod> =
            std::iter::once(&scenario.client).chain(&scenario.servers).chain([&scenario.outsider]).collect();
        for (i, pod) in all.into_iter().enumerate() {
            // Unique per run: the agent looks for the UID among all of the machine's processes,
            // and other tests' pods are there too.
            let uid = format!("{:08x}-{:04x}-4000-8000-{:012x}", fastrand::u32(..), fastrand::u16(..), i + 1);
            let pod_dir =
                root.join("kubepods.slice").join(format!("kubepods-pod{}.slice", uid.replace('-', "_")));
            std::fs::create_dir_all(&pod_dir).unwrap();
            let leaf = pod_dir.join(format!("cri-containerd-{i:04}.scope"));
            ferry_tests::cgroup::create(&leaf).unwrap();
            let mut cmd = pod.command_in_cgroup("sleep", &leaf);
            cmd.arg("600").stdout(Stdio::null()).stderr(Stdio::null());
            let sandbox = pod.spawn(cmd).unwrap();
            pods.push(KubeletPod { pod: pod.clone(), uid, leaf, _sandbox: sandbox });
        }
        let ca = ferry_tests::ca::make_ca("cluster.local", &[NODE]).unwrap();
        let settings = format!(
            "node = \"set-by---node\"\nroot_namespace = \"istio-system\"\n[ca]\ndir = \"{}\"\n",
            ca.path().join("nodes").join(NODE).display()
        );
        Cluster { api, pods, _ca: ca, settings, scenario }
    }

    fn pod(&self, name: &str) -> &KubeletPod {
        self.pods.iter().find(|p| p.pod.name() == name).unwrap()
    }

    /// Publishes namespace `demo` with `labels`.
    fn namespace(&self, labels: Value) {
        let ns: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": labels}}))
        .unwrap();
        self.api.apply(NAMESPACES, ns).unwrap();
    }

    /// Publishes pod `name` as running on node-a with `labels` (and `extra` merged into its spec).
    fn publish(&self, name: &str, labels: Value, extra_spec: Value) {
        let p = self.pod(name);
        let sa = if name.starts_with("server") { SERVICE } else { name };
        let mut spec = json!({"nodeName": NODE, "serviceAccountName": sa,
                              "containers": [{"name": "app", "image": "testapp"}]});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            spec.extend(extra.clone());
        }
        let pod: KubePod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": p.uid, "labels": labels},
            "spec": spec,
            "status": {"phase": "Running", "podIP": p.pod.ipv4().to_string(),
                       "podIPs": [{"ip": p.pod.ipv4().to_string()}, {"ip": p.pod.ipv6().to_string()}]},
        }))
        .unwrap();
        self.api.apply(PODS, pod).unwrap();
    }

    /// Service `echo` (VIP4, port 80 -> 8080) and its EndpointSlice listing `ready` servers.
    fn service(&self, ready: &[&str]) {
        let svc: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {"clusterIP": VIP4, "clusterIPs": [VIP4],
                     "ports": [{"name": "tcp-echo", "port": SERVICE_PORT, "targetPort": SERVER_PORT, "protocol": "TCP"}]}}))
        .unwrap();
        self.api.apply(SERVICES, svc).unwrap();
        let endpoints: Vec<Value> = ready
            .iter()
            .map(|n| {
                json!({"addresses": [self.pod(n).pod.ipv4().to_string()], "conditions": {"ready": true},
                       "nodeName": NODE, "targetRef": {"kind": "Pod", "name": n, "namespace": NAMESPACE}})
            })
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({"apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "echo-abc", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": SERVICE}},
            "addressType": "IPv4", "ports": [{"name": "tcp-echo", "port": SERVER_PORT, "protocol": "TCP"}],
            "endpoints": endpoints}))
        .unwrap();
        self.api.apply(ENDPOINT_SLICES, slice).unwrap();
    }

    /// Publishes the four scenario pods: client, server-1, server-2, outsider (not in the mesh).
    fn publish_all(&self) {
        for name in ["client", "server-1", "server-2"] {
            self.publish(name, json!({"app": name}), json!({}));
        }
        self.publish("outsider", json!({"app": "outsider", "ferry.dev/mesh": "disabled"}), json!({}));
    }

    /// A cluster whose namespace is in the mesh, with the scenario's pods published and the agent
    /// started with all three mesh pods enrolled.
    fn meshed(name: &str) -> (Cluster, Agent) {
        let c = Cluster::new(name);
        c.namespace(json!({"ferry.dev/mesh": "enabled"}));
        c.publish_all();
        let agent = c.start();
        wait_enrolled(&agent, &["client", "server-1", "server-2"]);
        (c, agent)
    }

    /// Starts the agent and waits for its first sync.
    fn start(&self) -> Agent {
        let agent =
            Agent::start_kubernetes(&self.scenario.node, &self.settings, &self.api.kubeconfig(), NODE)
                .unwrap();
        agent.wait_for_event(|e| e["event"] == "synced", EVENT_WAIT).unwrap();
        agent
    }
}

fn enrolled(agent: &Agent) -> Vec<String> {
    let list = agent.cli_json(&["workloads"]).unwrap();
    let mut out: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["enrolled"] == true)
        .map(|w| w["name"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// Waits until the enrolled pods are `want`.
fn wait_enrolled(agent: &Agent, want: &[&str]) {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let now = enrolled(agent);
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "enrolled {now:?}, want {want:?}: {:?}", agent.events());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ferry-testapp connect` from `pod`'s container cgroup (so its connects are captured).
fn connect_in(pod: &KubeletPod, target: &str, args: &[&str]) -> Value {
    let mut cmd = pod.pod.command_in_cgroup(ferry_tests::bin_path("ferry-testapp"), &pod.leaf);
    cmd.arg("connect").arg(target).args(args);
    let out = pod.pod.output(cmd, Duration::from_secs(30)).unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn plaintext_reaches(c: &Cluster, server: &str) -> bool {
    let target = sock(c.pod(server).pod.ipv4().into(), SERVER_PORT);
    let r = connect(&c.scenario.outsider, &target, &["--bytes", "16", "--timeout-ms", "3000"]).unwrap();
    r["ok"] == 1
}

#[test]
fn labeling_a_namespace_enrolls_its_pods() {
    let c = Cluster::new("k8lab");
    c.namespace(json!({}));
    c.publish_all();
    let agent = c.start();
    assert!(enrolled(&agent).is_empty(), "nothing is labelled yet");
    c.namespace(json!({"ferry.dev/mesh": "enabled"}));
    wait_enrolled(&agent, &["client", "server-1", "server-2"]);
    let w = agent.workload("server-1").unwrap();
    assert_eq!(w["uid"], c.pod("server-1").uid, "{w}");
    assert!(w["netns"].as_str().unwrap().starts_with("/proc/"), "found on the node: {w}");
    // Traffic now goes through the agent.
    let target = sock(c.pod("server-1").pod.ipv4().into(), SERVER_PORT);
    let r = connect(&c.scenario.outsider, &target, &["--bytes", "16"]).unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    let e = wait_events(&agent, 1, |e| e["event"] == "conn_close" && e["orig_dst"] == target.as_str());
    assert_eq!(e[0]["pod"], "demo/server-1");
}

#[test]
fn removing_the_label_unenrolls() {
    let (c, agent) = Cluster::meshed("k8unl");
    c.namespace(json!({}));
    wait_enrolled(&agent, &[]);
    // Unenrolled: plaintext reaches the app directly again.
    let target = sock(c.pod("server-1").pod.ipv4().into(), SERVER_PORT);
    let r = connect(&c.scenario.outsider, &target, &["--bytes", "16"]).unwrap();
    assert_eq!(r["peers_seen_by_server"][0], r["local_addrs"][0], "{r}");
}

#[test]
fn pod_opt_out_label_is_honoured() {
    let c = Cluster::new("k8opt");
    c.namespace(json!({"ferry.dev/mesh": "enabled"}));
    c.publish_all();
    c.publish("server-2", json!({"app": "server-2", "ferry.dev/mesh": "disabled"}), json!({}));
    let agent = c.start();
    wait_enrolled(&agent, &["client", "server-1"]);
    // In a labelled namespace, a pod without the namespace's label but with its own enabled joins.
    c.namespace(json!({}));
    c.publish("server-2", json!({"app": "server-2", "ferry.dev/mesh": "enabled"}), json!({}));
    wait_enrolled(&agent, &["server-2"]);
}

#[test]
fn host_network_pod_is_never_enrolled() {
    let c = Cluster::new("k8host");
    c.namespace(json!({"ferry.dev/mesh": "enabled"}));
    c.publish_all();
    c.publish(
        "server-2",
        json!({"app": "server-2", "ferry.dev/mesh": "enabled"}),
        json!({"hostNetwork": true}),
    );
    let agent = c.start();
    wait_enrolled(&agent, &["client", "server-1"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(enrolled(&agent), ["client", "server-1"]);
}

#[test]
fn endpointslice_change_moves_balancing() {
    let c = Cluster::new("k8eps");
    c.namespace(json!({"ferry.dev/mesh": "enabled"}));
    c.publish_all();
    c.service(&["server-1"]);
    let agent = c.start();
    wait_enrolled(&agent, &["client", "server-1", "server-2"]);
    let vip = format!("{VIP4}:{SERVICE_PORT}");
    let tags = |r: &Value| -> BTreeMap<String, u64> { serde_json::from_value(r["tags"].clone()).unwrap() };
    let r = connect_in(c.pod("client"), &vip, &["--bytes", "32", "--conns", "6"]);
    assert_eq!(r["ok"], 6, "{r}");
    assert_eq!(tags(&r).keys().collect::<Vec<_>>(), ["server-1"], "{r}");
    c.service(&["server-2"]);
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let r = connect_in(c.pod("client"), &vip, &["--bytes", "32", "--conns", "6"]);
        if r["ok"] == 6 && tags(&r).keys().collect::<Vec<_>>() == ["server-2"] {
            break;
        }
        assert!(Instant::now() < deadline, "traffic never moved to server-2: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.service(&["server-1", "server-2"]);
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let r = connect_in(c.pod("client"), &vip, &["--bytes", "32", "--conns", "12"]);
        if r["ok"] == 12 && tags(&r).len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never balanced over both: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn authorization_policy_crd_is_enforced() {
    let (c, agent) = Cluster::meshed("k8ap");
    assert!(plaintext_reaches(&c, "server-1"));
    // Istio's documentation's shape: deny by source IP block, selected by label.
    let outsider = c.scenario.outsider.ipv4().to_string();
    c.api
        .apply(
            AUTHORIZATION_POLICIES,
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "deny-outsider", "namespace": NAMESPACE},
                   "spec": {"selector": {"matchLabels": {"app": "server-1"}}, "action": "DENY",
                            "rules": [{"from": [{"source": {"ipBlocks": [format!("{outsider}/32")]}}]}]}}),
        )
        .unwrap();
    // Denied means refused by that policy (a connection that merely timed out on a busy machine
    // does not count).
    let denied_by_it =
        || agent.events().iter().any(|e| e["event"] == "conn_refused" && e["policy"] == "demo/deny-outsider");
    let deadline = Instant::now() + EVENT_WAIT;
    while plaintext_reaches(&c, "server-1") || !denied_by_it() {
        assert!(Instant::now() < deadline, "the DENY never took effect: {:?}", agent.events());
    }
    assert!(plaintext_reaches(&c, "server-2"), "the selector limits it to server-1");
    c.api.delete(AUTHORIZATION_POLICIES, NAMESPACE, "deny-outsider");
    let deadline = Instant::now() + EVENT_WAIT;
    while !plaintext_reaches(&c, "server-1") {
        assert!(Instant::now() < deadline, "still denied after the policy was deleted");
    }
}

#[test]
fn peer_authentication_strict_refuses_plaintext() {
    let (c, agent) = Cluster::meshed("k8pa");
    assert!(plaintext_reaches(&c, "server-1"), "PERMISSIVE without a PeerAuthentication");
    c.api
        .apply(
            PEER_AUTHENTICATIONS,
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                   "metadata": {"name": "default", "namespace": NAMESPACE},
                   "spec": {"mtls": {"mode": "STRICT"}}}),
        )
        .unwrap();
    let refused_strict = || {
        agent.events().iter().any(|e| {
            e["event"] == "conn_refused"
                && e["pod"] == "demo/server-1"
                && e["reason"] == "plaintext refused: STRICT mode"
        })
    };
    let deadline = Instant::now() + EVENT_WAIT;
    while plaintext_reaches(&c, "server-1") || !refused_strict() {
        assert!(Instant::now() < deadline, "STRICT never took effect");
    }
    assert_eq!(agent.workload("server-1").unwrap()["mode"], "strict");
    // Mutual TLS from the client pod still gets through.
    let r = connect_in(
        c.pod("client"),
        &sock(c.pod("server-1").pod.ipv4().into(), SERVER_PORT),
        &["--bytes", "64"],
    );
    assert_eq!(r["ok"], 1, "{r}");
}

#[test]
fn istio_crds_absent_runs_without_them() {
    let c = Cluster::new("k8nocrd");
    c.api.without(AUTHORIZATION_POLICIES);
    c.api.without(PEER_AUTHENTICATIONS);
    c.namespace(json!({"ferry.dev/mesh": "enabled"}));
    c.publish_all();
    let agent = c.start();
    wait_enrolled(&agent, &["client", "server-1", "server-2"]);
    assert!(agent.stderr().contains("Istio's CRD is not installed"), "{}", agent.stderr());
}

#[test]
fn api_server_outage_keeps_serving_and_recovers() {
    let (c, agent) = Cluster::meshed("k8out");
    c.api.set_down(true);
    std::thread::sleep(Duration::from_secs(2));
    // The last state stays in force: the pods are still enrolled and served.
    assert_eq!(enrolled(&agent), ["client", "server-1", "server-2"]);
    assert!(plaintext_reaches(&c, "server-1"));
    // A change made while the agent cannot see it, and history compacted: the agent's watch
    // resumes from a version that is gone (410) and must relist to catch up.
    c.api.set_down(false);
    c.api.compact();
    c.publish("server-2", json!({"app": "server-2", "ferry.dev/mesh": "disabled"}), json!({}));
    c.api.compact();
    wait_enrolled(&agent, &["client", "server-1"]);
    assert!(plaintext_reaches(&c, "server-1"), "and kept serving");
}

#[test]
fn unenrollable_pod_does_not_block_others_in_a_cluster() {
    let c = Cluster::new("k8wait");
    c.namespace(json!({"ferry.dev/mesh": "enabled"}));
    c.publish_all();
    // A pod the API says runs here, whose processes the node does not have (yet).
    let ghost: KubePod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ghost", "namespace": NAMESPACE, "uid": "deadbeef-0000-4000-8000-000000000001"},
        "spec": {"nodeName": NODE, "serviceAccountName": "ghost", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.233.1.250", "podIPs": [{"ip": "10.233.1.250"}]},
    }))
    .unwrap();
    c.api.apply(PODS, ghost).unwrap();
    let agent = c.start();
    wait_enrolled(&agent, &["client", "server-1", "server-2"]);
    let w = agent.workload("ghost").unwrap();
    assert_eq!(w["enrolled"], false, "{w}");
    assert!(w["waiting"].as_str().is_some_and(|why| why.contains("no process of pod UID")), "{w}");
    assert!(plaintext_reaches(&c, "server-1"), "the others serve");
    let status = agent.cli_json(&["status"]).unwrap();
    assert_eq!(status["ready"], false, "not ready while a pod waits: {status}");
    // Once the API no longer lists it, the node is ready.
    c.api.delete(PODS, NAMESPACE, "ghost");
    let deadline = Instant::now() + EVENT_WAIT;
    while agent.cli_json(&["status"]).unwrap()["ready"] != true {
        assert!(Instant::now() < deadline, "never ready: {:?}", agent.cli_json(&["workloads"]));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_invalid_authorization_policy_denies_what_it_selects() {
    let (c, agent) = Cluster::meshed("k8bad");
    let mtls_reaches = |server: &str| {
        let target = sock(c.pod(server).pod.ipv4().into(), SERVER_PORT);
        connect_in(c.pod("client"), &target, &["--bytes", "16", "--timeout-ms", "3000"])["ok"] == 1
    };
    assert!(mtls_reaches("server-1"));
    // CUSTOM is not something Ferry can enforce: rejected, naming the object, and in its place a
    // DENY of everything it selects (server-1 only), never an opening.
    let custom = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "ext-authz", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"app": "server-1"}}, "action": "CUSTOM",
                 "provider": {"name": "opa"}, "rules": [{}]}});
    c.api.apply(AUTHORIZATION_POLICIES, custom).unwrap();
    let deadline = Instant::now() + EVENT_WAIT;
    while mtls_reaches("server-1") {
        assert!(Instant::now() < deadline, "the invalid policy never closed server-1: {}", agent.stderr());
    }
    assert!(agent.stderr().contains("kubernetes:demo/ext-authz"), "the error names the object");
    assert!(mtls_reaches("server-2"), "only what it selects is closed");
    // Other changes still apply meanwhile, and fixing the policy reopens.
    c.publish("server-2", json!({"app": "server-2", "ferry.dev/mesh": "disabled"}), json!({}));
    wait_enrolled(&agent, &["client", "server-1"]);
    c.api.delete(AUTHORIZATION_POLICIES, NAMESPACE, "ext-authz");
    let deadline = Instant::now() + EVENT_WAIT;
    while !mtls_reaches("server-1") {
        assert!(Instant::now() < deadline, "still closed after the policy was deleted");
    }
}
