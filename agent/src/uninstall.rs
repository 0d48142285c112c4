//! `ferry uninstall`: the end of an installation (and the demo's teardown). Removes every pinned
//! program, map and link and the probe source addresses, after which the pods talk directly.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Removes what the agents of this node left in the kernel; refused while one is running (it
/// holds the links open, so they would stay attached, and it would go on serving half a mesh).
pub fn run(admin_socket: &Path, bpf_root: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(admin_socket).is_ok() {
        anyhow::bail!(
            "an agent is running on this node (its admin socket {} answers): stop it first",
            admin_socket.display()
        );
    }
    // Read before the pins go: which netns hold this installation's pods.
    let mut ours = crate::bpf::pins::pinned_pod_netns(bpf_root);
    let removed = crate::bpf::pins::uninstall(bpf_root)
        .with_context(|| format!("removing the pinned datapath under {}", bpf_root.display()))?;
    crate::probes::remove_from_loopback().context("removing the probe source addresses from loopback")?;
    // Stopped agents leave their pods' transparent-inbound routing for the next agent. The pins
    // name the pods' netns by cookie only, so the node's netns are visited until each is found;
    // those of other installations (a simulated node beside this one) are left alone.
    for netns in every_netns() {
        if ours.is_empty() {
            break;
        }
        if let Err(e) = crate::enroll::transparent::remove_from(&netns, &mut ours) {
            tracing::debug!(netns = %netns.display(), error = %e, "netns not cleaned (gone, or not ours)");
        }
    }
    if removed {
        println!("removed the pinned datapath under {}; the pods talk directly", bpf_root.display());
    } else {
        println!("nothing pinned under {}", bpf_root.display());
    }
    Ok(())
}

/// One path to each network namespace of the node: every process's, and the named ones.
fn every_netns() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let own = std::fs::metadata("/proc/self/ns/net").ok().map(|m| (m.dev(), m.ino()));
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| {
        let name = e.file_name();
        name.to_str()?.parse::<u32>().ok()?;
        Some(e.path().join("ns/net"))
    });
    let named = std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
    procs
        .chain(named)
        .filter(|p| {
            let Ok(m) = std::fs::metadata(p) else { return false };
            let id = (m.dev(), m.ino());
            Some(id) != own && seen.insert(id)
        })
        .collect()
}
