//! Finding pods on the node by UID, as on a Kubernetes node: the agent reads the pod UID from each
//! process's cgroup path (laid out here exactly as the kubelet lays it out, for the systemd and the
//! cgroupfs drivers), takes the netns of the pod's oldest process, checks that it holds one of the
//! pod's IPs, and attaches to the pod-level cgroup directory, so every container is covered.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use ferry_tests::{Agent, ChildGuard, MeshFile, Pod};
use serde_json::Value;

const UID_SYSTEMD: &str = "5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const UID_CGROUPFS: &str = "0f9e8d7c-6b5a-4948-8372-6150a4b3c2d1";
/// The agent looks for a UID among all of the machine's processes: each test has its own.
const UID_WRONG_NETNS: &str = "7e6d5c4b-3a29-4817-a6b5-c4d3e2f1a0b9";

/// Makes `dirs` (each inside the previous) under `root` and returns the innermost.
fn cgroup_chain(root: &Path, dirs: &[String]) -> PathBuf {
    let mut path = root.to_path_buf();
    for dir in dirs {
        path = path.join(dir);
        ferry_tests::cgroup::create(&path).unwrap();
    }
    path
}

/// A long-running process in `pod`'s netns and in the container cgroup `leaf`: the pod's sandbox.
fn sandbox(pod: &Pod, leaf: &Path) -> ChildGuard {
    let mut cmd = pod.command_in_cgroup("sleep", leaf);
    cmd.arg("600").stdout(Stdio::null()).stderr(Stdio::null());
    pod.spawn(cmd).unwrap()
}

/// `ferry-testapp connect` run from `pod`'s netns inside the cgroup `leaf` (a container of the pod).
fn connect_from_container(pod: &Pod, leaf: &Path, target: &str) -> Value {
    let mut cmd = pod.command_in_cgroup(ferry_tests::bin_path("ferry-testapp"), leaf);
    cmd.args(["connect", target, "--bytes", "64"]);
    let out = pod.output(cmd, Duration::from_secs(20)).unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn netns_and_cgroup_are_discovered_for_systemd_and_cgroupfs_layouts() {
    let pods = ScenarioPods::start("disc").unwrap();
    let root = pods.node.cgroup_root().to_path_buf();
    let systemd_uid = UID_SYSTEMD.replace('-', "_");
    // systemd driver, containerd: kubepods.slice/kubepods-besteffort.slice/…-pod<UID_>.slice/…scope
    let systemd_pod = [
        "kubepods.slice".to_owned(),
        "kubepods-besteffort.slice".to_owned(),
        format!("kubepods-besteffort-pod{systemd_uid}.slice"),
    ];
    let systemd_pod_dir = cgroup_chain(&root, &systemd_pod);
    let systemd_leaf = cgroup_chain(&systemd_pod_dir, &["cri-containerd-1111aaaa.scope".to_owned()]);
    let second_container = cgroup_chain(&systemd_pod_dir, &["cri-containerd-2222bbbb.scope".to_owned()]);
    // cgroupfs driver, CRI-O naming does not matter there: kubepods/burstable/pod<UID>/<id>
    let cgroupfs_pod = ["kubepods".to_owned(), "burstable".to_owned(), format!("pod{UID_CGROUPFS}")];
    let cgroupfs_pod_dir = cgroup_chain(&root, &cgroupfs_pod);
    let cgroupfs_leaf = cgroup_chain(&cgroupfs_pod_dir, &["3333cccc".to_owned()]);
    let (s1, s2) = (&pods.servers[0], &pods.servers[1]);
    let _sandboxes = [sandbox(s1, &systemd_leaf), sandbox(s2, &cgroupfs_leaf)];

    let mut mesh = MeshFile::new("node-a");
    mesh.pod(&pods.client, NAMESPACE, "client");
    mesh.pod(s1, NAMESPACE, SERVICE).uid(UID_SYSTEMD);
    mesh.pod(s2, NAMESPACE, SERVICE).uid(&UID_CGROUPFS.to_uppercase());
    let agent = Agent::start(&pods.node, &mesh.to_toml()).unwrap();

    for (pod, uid, dir) in [(s1, UID_SYSTEMD, &systemd_pod_dir), (s2, UID_CGROUPFS, &cgroupfs_pod_dir)] {
        let w = agent.workload(pod.name()).unwrap();
        assert_eq!(w["enrolled"], true, "{w}");
        assert_eq!(w["uid"], uid, "{w}");
        // The pod-level directory, not the container's: every container of the pod is covered.
        assert_eq!(w["cgroup"], dir.display().to_string(), "{w}");
        let netns = w["netns"].as_str().unwrap();
        assert!(netns.starts_with("/proc/") && netns.ends_with("/ns/net"), "{w}");
        // Inbound: the discovered netns is the pod's, so its address is steered.
        let target = sock(pod.ipv4().into(), SERVER_PORT);
        let r = connect(&pods.outsider, &target, &["--bytes", "32"]).unwrap();
        assert_eq!(r["ok"], 1, "{target}: {r}");
        let e = wait_events(&agent, 1, |e| {
            e["event"] == "conn_close" && e["direction"] == "inbound" && e["orig_dst"] == target.as_str()
        });
        assert_eq!(e[0]["pod"], format!("{NAMESPACE}/{}", pod.name()), "{}", e[0]);
    }
    // Outbound from both containers of the systemd pod is captured: the programs sit on the
    // pod-level directory.
    let target = sock(pods.client.ipv4().into(), 9);
    let _sink = serve(&pods.client, 9, "client").unwrap();
    for leaf in [&systemd_leaf, &second_container] {
        let r = connect_from_container(s1, leaf, &target);
        assert_eq!(r["ok"], 1, "{r}");
        assert!(r["local_addrs"][0].as_str().unwrap().starts_with("127.0.0.1:"), "redirected: {r}");
    }
    let out = wait_events(&agent, 2, |e| {
        e["event"] == "conn_close" && e["direction"] == "outbound" && e["pod"] == "demo/server-1"
    });
    assert_eq!(out.len(), 2, "{:?}", agent.events());
}

#[test]
fn a_pod_whose_netns_lacks_its_ip_is_not_enrolled() {
    let pods = ScenarioPods::start("discip").unwrap();
    let root = pods.node.cgroup_root().to_path_buf();
    let leaf =
        cgroup_chain(&root, &["kubepods".to_owned(), format!("pod{UID_WRONG_NETNS}"), "c1".to_owned()]);
    // The process runs in server-1's netns, but the mesh file says the pod has server-2's IPs.
    let _sandbox = sandbox(&pods.servers[0], &leaf);
    let mut mesh = MeshFile::new("node-a");
    mesh.pod(&pods.servers[1], NAMESPACE, SERVICE).uid(UID_WRONG_NETNS);
    let agent = Agent::start(&pods.node, &mesh.to_toml()).unwrap();
    let w = agent.workload("server-2").unwrap();
    assert_eq!(w["enrolled"], false, "{w}");
    let why = w["waiting"].as_str().unwrap_or_default();
    assert!(why.contains("holds none of"), "{w}");
}
