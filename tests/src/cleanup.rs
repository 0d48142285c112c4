//! Removing what crashed earlier runs left behind: `fy*` network namespaces, `ferry-test-*`
//! cgroups and `ferry-test-*` pin roots under bpffs whose creating process is gone.
//!
//! Only names of the harness's exact shape (`fy<pid>-<n>-<name>`, `ferry-test-<pid>-<n>-<name>`)
//! are touched, and only when `<pid>` is not a live process: objects of this process and of
//! concurrently running test processes are left alone. (A recycled pid makes a leftover look
//! live; it is then kept, never a live object removed.)

use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use anyhow::Result;

use crate::names::{CGROUP_PREFIX, NETNS_PREFIX, owner_pid};
use crate::{cgroup, netns};

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Namespaces and cgroups removed.
    pub removed: Vec<String>,
    /// Pids killed because they were inside a leftover namespace or cgroup.
    pub killed: Vec<i32>,
    /// What could not be removed, with why.
    pub errors: Vec<String>,
}

/// Removes leftovers of harness runs whose process has exited (see the module docs).
pub fn sweep_stale() -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let stale_netns: Vec<String> = netns::list()?.into_iter().filter(|n| is_stale(n, NETNS_PREFIX)).collect();
    let mount = cgroup::cgroup2_mount()?;
    let stale_cgroups: Vec<String> = cgroup::children(&mount)?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| is_stale(n, CGROUP_PREFIX))
        .collect();

    // Processes first: a cgroup with members cannot be removed, and a process pins its netns.
    let mut doomed = Vec::new();
    for name in &stale_cgroups {
        doomed.extend(cgroup::procs_recursive(&mount.join(name))?);
    }
    doomed.extend(processes_in_netns(&stale_netns));
    doomed.sort_unstable();
    doomed.dedup();
    let me = std::process::id() as i32;
    for pid in doomed.into_iter().filter(|&p| p != me) {
        // SAFETY: plain kill(2) of a process inside a leftover of ours.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            report.killed.push(pid);
        }
    }

    for name in stale_netns {
        match netns::delete(&name) {
            Ok(()) => report.removed.push(format!("netns {name}")),
            Err(e) => report.errors.push(format!("netns {name}: {e:#}")),
        }
    }
    for name in stale_cgroups {
        let path = mount.join(&name);
        match cgroup::remove_tree(&path, Duration::from_secs(2)) {
            Ok(()) => report.removed.push(format!("cgroup {}", path.display())),
            Err(e) => report.errors.push(format!("{e:#}")),
        }
    }
    // Pinned datapaths of agents whose test process died (the agents died with it).
    let pins = std::fs::read_dir(crate::agent::BPFFS).into_iter().flatten().flatten();
    for entry in pins {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_stale(&name, CGROUP_PREFIX) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => report.removed.push(format!("pins {}", entry.path().display())),
                Err(e) => report.errors.push(format!("pins {}: {e}", entry.path().display())),
            }
        }
    }
    Ok(report)
}

/// Whether `name` is a harness object (`prefix` shape) whose creating process no longer runs.
fn is_stale(name: &str, prefix: &str) -> bool {
    match owner_pid(name, prefix) {
        Some(pid) => pid != std::process::id() && !running(pid),
        None => false,
    }
}

/// Whether `pid` is a running process (a zombie has finished running: it only awaits its reaper).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may itself contain ") ".
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// The pids whose network namespace is one of the named namespaces `names`.
fn processes_in_netns(names: &[String]) -> Vec<i32> {
    let ids: Vec<(u64, u64)> = names
        .iter()
        .filter_map(|n| std::fs::metadata(netns::path_of(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_owners_are_stale() {
        let me = std::process::id();
        assert!(!is_stale(&format!("fy{me}-0-node"), NETNS_PREFIX));
        // pid 1 always runs.
        assert!(!is_stale("fy1-0-node", NETNS_PREFIX));
        // Above the kernel's pid limit (4194304), so never a live process.
        assert!(is_stale("fy4194999-0-node", NETNS_PREFIX));
        assert!(is_stale("ferry-test-4194999-3-node-a", CGROUP_PREFIX));
        assert!(!is_stale("cni-4194999-0-x", NETNS_PREFIX));
        assert!(!is_stale("fy4194999-node", NETNS_PREFIX));
    }

    #[test]
    fn zombies_do_not_count_as_running() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Unreaped, the exited child is a zombie.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!running(pid));
        child.wait().unwrap();
        assert!(running(std::process::id()));
        assert!(!running(4_194_999));
    }
}
