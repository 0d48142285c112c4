//! The agent refuses to start on an invalid mesh file and says exactly what is wrong.

use std::process::Command;

use ferry_tests::bin_path;

/// (description, file contents, expected message fragment)
const BAD_FILES: &[(&str, &str, &str)] = &[
    ("syntax error", "node = \"a\"\n[[pods]\n", "line 2"),
    ("missing node", "trust_domain = \"cluster.local\"\n", "missing field \"node\""),
    (
        "bad ca ttl",
        "node = \"a\"\n[ca]\ndir = \"/x\"\nsvid_ttl_seconds = 5\n",
        "ca.svid_ttl_seconds: 5 is outside",
    ),
    ("relative ca dir", "node = \"a\"\n[ca]\ndir = \"x\"\n", "ca.dir: \"x\" must be an absolute path"),
    (
        "bad ip",
        "node = \"a\"\n[[pods]]\nname = \"p\"\nnamespace = \"n\"\nservice_account = \"s\"\nnetns = \"/x\"\ncgroup = \"/y\"\nips = [\"10.0.0.300\"]\n",
        "pods[0].ips[0]: \"10.0.0.300\" is not an IP address",
    ),
    (
        "unknown field",
        "node = \"a\"\n[[pods]]\nname = \"p\"\nnamespace = \"n\"\nservice_account = \"s\"\nnetns = \"/x\"\ncgroup = \"/y\"\nips = [\"10.0.0.3\"]\nipz = 1\n",
        "ipz",
    ),
    (
        "relative netns",
        "node = \"a\"\n[[pods]]\nname = \"p\"\nnamespace = \"n\"\nservice_account = \"s\"\nnetns = \"rel/x\"\ncgroup = \"/y\"\nips = [\"10.0.0.3\"]\n",
        "pods[0].netns",
    ),
    (
        "endpoint that does not exist",
        "node = \"a\"\n[[pods]]\nname = \"p\"\nnamespace = \"n\"\nservice_account = \"s\"\nnetns = \"/x\"\ncgroup = \"/y\"\nips = [\"10.0.0.3\"]\n[[services]]\nname = \"svc\"\nnamespace = \"n\"\nvips = [\"10.96.0.1\"]\nports = [{ port = 80 }]\nendpoints = [\"nope\"]\n",
        "services[0].endpoints[0]",
    ),
    ("bad port", "node = \"a\"\n[capture]\nexclude_ports = [0]\n", "capture.exclude_ports[0]"),
    ("bad cidr", "node = \"a\"\n[capture]\nexclude_cidrs = [\"10.0.0.0/33\"]\n", "capture.exclude_cidrs[0]"),
];

#[test]
fn invalid_mesh_file_is_rejected_with_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (what, text, expected) in BAD_FILES {
        let path = dir.path().join("mesh.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin_path("ferry")).arg("run").arg("--config").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the agent must refuse to start");
        assert!(stderr.contains("invalid mesh file"), "{what}: {stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{what}: names the file: {stderr}");
        assert!(stderr.contains(expected), "{what}: expected {expected:?} in {stderr}");
    }
    // A missing file is an error too, naming the path.
    let out =
        Command::new(bin_path("ferry")).args(["run", "--config", "/nonexistent/mesh.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mesh.toml"));
}
