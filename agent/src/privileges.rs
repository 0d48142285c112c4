//! What the agent needs from the host, in one place: the Linux capabilities its code uses and the
//! host paths it reads. The DaemonSet in `deploy/kubernetes/base` grants exactly these (a test
//! below keeps the two in step), and `ferry run` says at start which ones it lacks.

/// A capability the agent uses, and what for.
#[derive(Clone, Copy, Debug)]
pub struct Capability {
    /// Its name without `CAP_`, as a pod's `securityContext.capabilities.add` writes it.
    pub name: &'static str,
    /// Its bit in `CapEff`.
    pub bit: u32,
    /// What needs it.
    pub why: &'static str,
}

/// Every capability the agent's code uses.
pub const CAPABILITIES: &[Capability] = &[
    // SYS_ADMIN (needed for setns) implies BPF's rights; BPF is listed so that the intent stays
    // if setns ever stops needing SYS_ADMIN.
    Capability { name: "BPF", bit: 39, why: "loading the eBPF programs and creating their maps" },
    Capability {
        name: "NET_ADMIN",
        bit: 12,
        why: "attaching cgroup and sk_lookup programs, sockhash updates, and in pods: IP_TRANSPARENT, \
              SO_MARK, the reply-routing rule and routes, net.ipv4.tcp_fwmark_accept",
    },
    Capability { name: "NET_RAW", bit: 13, why: "SO_BINDTODEVICE on the transparent sockets to apps" },
    Capability { name: "SYS_ADMIN", bit: 21, why: "setns() into pods' network namespaces" },
    Capability {
        name: "SYS_PTRACE",
        bit: 19,
        why: "opening /proc/PID/ns/net of pods' processes, which run as other users",
    },
];

/// Host paths the DaemonSet mounts, where the agent expects them, and what for.
pub const HOST_MOUNTS: &[(&str, &str, &str)] = &[
    ("/proc", "/host/proc", "pods' processes: their cgroup paths (pod UIDs) and netns files"),
    (
        "/sys/fs/cgroup",
        "/host/sys/fs/cgroup",
        "the cgroup2 root: pods' cgroup directories, the attach points",
    ),
    ("/sys/fs/bpf", "/sys/fs/bpf", "bpffs, for pinned programs and maps"),
    ("/var/run/netns", "/var/run/netns", "named network namespaces"),
    (
        "/run/ferry",
        "/run/ferry",
        "the admin and handoff sockets, shared by the old and new agent of an upgrade",
    ),
];

/// The capabilities in [`CAPABILITIES`] that the effective set `cap_eff` (hex, as
/// `/proc/self/status` prints it) lacks.
pub fn missing(cap_eff: u64) -> Vec<&'static Capability> {
    CAPABILITIES.iter().filter(|c| cap_eff & (1u64 << c.bit) == 0).collect()
}

/// The calling process's effective capabilities, from `/proc/self/status`.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named() {
        assert!(missing(u64::MAX).is_empty());
        let names: Vec<&str> = missing(0).iter().map(|c| c.name).collect();
        assert_eq!(names, ["BPF", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]);
        let only_bpf = 1u64 << 39;
        assert!(!missing(only_bpf).iter().any(|c| c.name == "BPF"));
    }

    /// The DaemonSet grants exactly the capabilities and host mounts above: one drifting from the
    /// other fails here.
    #[test]
    fn the_daemonset_grants_what_the_code_uses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/base/daemonset.yaml");
        let text = std::fs::read_to_string(path).expect("the DaemonSet manifest");
        let ds: serde_json::Value = serde_saphyr::from_str(&text).expect("valid YAML");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostPID"], true, "pods are found through the host's /proc");
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        assert_eq!(security["privileged"], false);
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let added: Vec<&str> =
            security["capabilities"]["add"].as_array().unwrap().iter().filter_map(|c| c.as_str()).collect();
        let wanted: Vec<&str> = CAPABILITIES.iter().map(|c| c.name).collect();
        assert_eq!(added, wanted, "capabilities granted vs used");
        let volumes = pod["volumes"].as_array().unwrap();
        let mounts = container["volumeMounts"].as_array().unwrap();
        for (host, inside, why) in HOST_MOUNTS {
            let volume = volumes
                .iter()
                .find(|v| v["hostPath"]["path"] == *host)
                .unwrap_or_else(|| panic!("no hostPath volume for {host} ({why})"));
            let mount = mounts.iter().find(|m| m["name"] == volume["name"]).expect("mounted");
            assert_eq!(mount["mountPath"], *inside, "{host} ({why})");
        }
        let host_paths = volumes.iter().filter(|v| v.get("hostPath").is_some()).count();
        assert_eq!(host_paths, HOST_MOUNTS.len(), "no host path the code does not use");
        let args: Vec<&str> =
            container["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
        assert!(args.contains(&"--host-proc=/host/proc"), "{args:?}");
        assert!(args.contains(&"--cgroup-root=/host/sys/fs/cgroup"), "{args:?}");
    }
}
