//! Finding a pod on this node from its UID: its network namespace and its pod-level cgroup
//! directory, from the host's /proc (the agent runs with hostPID) and the cgroup2 mount.
//!
//! - Every process's `/proc/PID/cgroup` names its cgroup; the kubelet puts the pod UID in the
//!   pod-level directory's name, for both cgroup drivers and any container runtime:
//!   systemd `…/kubepods-<qos>-pod<UID with _>.slice/cri-containerd-<id>.scope` (or `crio-<id>.scope`),
//!   Guaranteed `…/kubepods-pod<UID_>.slice/…`, cgroupfs `…/kubepods/<qos>/pod<UID>/<id>`,
//!   Guaranteed `…/kubepods/pod<UID>/<id>`, with any prefix (kind, nested setups).
//! - The pod's oldest process (the sandbox's pause process) gives the netns, `/proc/PID/ns/net`.
//! - The match is only accepted if that netns holds one of the pod's IPs, so a stale or reused
//!   process can never enroll the wrong netns.
//! - The pod-level directory (not a container's) is the attach point, so every container of the
//!   pod is covered, including ones started later.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::netlink::Rtnl;

/// Where a pod was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The pod's network namespace file (`/proc/PID/ns/net` of its oldest process).
    pub netns: PathBuf,
    /// The pod-level cgroup directory.
    pub cgroup: PathBuf,
    /// The process whose netns that is.
    pub pid: u32,
}

/// Why a pod could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No process on the node runs in a cgroup of the pod (not started yet, or not on this node).
    #[error("no process of pod UID {0} on this node (not running yet?)")]
    NoProcess(String),
    /// The cgroup2 mount could not be found.
    #[error("no cgroup2 mount in {0}")]
    NoCgroup2(PathBuf),
    /// The pod's processes are in a netns that holds none of its IPs.
    #[error("pod UID {uid}: the netns of pid {pid} holds none of {ips:?}")]
    WrongNetns {
        /// The pod UID.
        uid: String,
        /// The process checked.
        pid: u32,
        /// The pod's IPs.
        ips: Vec<IpAddr>,
    },
    /// The pod-level cgroup directory is not under the cgroup2 mount.
    #[error("pod UID {uid}: its cgroup directory {dir} does not exist")]
    NoCgroupDir {
        /// The pod UID.
        uid: String,
        /// The directory looked for.
        dir: PathBuf,
    },
    /// Reading /proc or entering the netns failed.
    #[error("{0}")]
    Io(String, #[source] io::Error),
}

/// Where to look: the host's /proc and the cgroup2 mount as the agent sees them.
#[derive(Clone, Debug)]
pub struct Host {
    /// The host's /proc (with hostPID, the agent's own).
    pub proc: PathBuf,
    /// Where the host's cgroup2 hierarchy is mounted.
    pub cgroup2: PathBuf,
}

impl Host {
    /// The agent's /proc and the cgroup2 mount it names in /proc/mounts.
    pub fn current() -> Result<Self, DiscoveryError> {
        Self::at(PathBuf::from("/proc"), None)
    }

    /// The host's /proc at `proc` (`/host/proc` in the DaemonSet) and its cgroup2 root at
    /// `cgroup2`, or, without one, the cgroup2 mount the agent's own /proc/mounts names.
    pub fn at(proc: PathBuf, cgroup2: Option<PathBuf>) -> Result<Self, DiscoveryError> {
        let cgroup2 = match cgroup2 {
            Some(root) => root,
            None => {
                let mounts = fs::read_to_string("/proc/self/mounts")
                    .map_err(|e| DiscoveryError::Io("reading /proc/self/mounts".into(), e))?;
                cgroup2_mount(&mounts).ok_or_else(|| DiscoveryError::NoCgroup2("/proc/self/mounts".into()))?
            }
        };
        Ok(Self { proc, cgroup2 })
    }

    /// Finds pod `uid`, checking that its netns holds one of `ips`.
    pub fn locate(&self, uid: &str, ips: &[IpAddr]) -> Result<Located, DiscoveryError> {
        let wanted = normalize_uid(uid);
        let mut best: Option<(u64, u32, String)> = None;
        let entries = fs::read_dir(&self.proc)
            .map_err(|e| DiscoveryError::Io(format!("reading {}", self.proc.display()), e))?;
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            // Processes come and go while we look: any read error just skips the process.
            let Ok(cgroup) = fs::read_to_string(entry.path().join("cgroup")) else { continue };
            let Some(path) = unified_path(&cgroup) else { continue };
            let Some((found, pod_dir)) = pod_of(path) else { continue };
            if found != wanted {
                continue;
            }
            let Some(started) = start_time(&entry.path()) else { continue };
            if best.as_ref().is_none_or(|(t, _, _)| started < *t) {
                best = Some((started, pid, pod_dir.to_owned()));
            }
        }
        let (_, pid, pod_dir) = best.ok_or_else(|| DiscoveryError::NoProcess(uid.to_owned()))?;
        let netns = self.proc.join(pid.to_string()).join("ns/net");
        if !netns_holds_any(&netns, ips)? {
            return Err(DiscoveryError::WrongNetns { uid: uid.to_owned(), pid, ips: ips.to_vec() });
        }
        let cgroup = self.pod_cgroup_dir(uid, &pod_dir)?;
        Ok(Located { netns, cgroup, pid })
    }

    /// The pod-level directory under the cgroup2 mount. A path seen through a cgroup namespace
    /// (the agent's container has its own) starts with `/..`; then the directory is found by name.
    fn pod_cgroup_dir(&self, uid: &str, pod_dir: &str) -> Result<PathBuf, DiscoveryError> {
        let name = pod_dir.rsplit('/').next().unwrap_or(pod_dir);
        let direct = self.cgroup2.join(pod_dir.trim_start_matches('/'));
        if !pod_dir.contains("/..") && direct.is_dir() {
            return Ok(direct);
        }
        find_dir(&self.cgroup2, name, 6)
            .ok_or_else(|| DiscoveryError::NoCgroupDir { uid: uid.to_owned(), dir: direct })
    }
}

/// The cgroup2 mount point in a /proc/mounts text.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

/// The cgroup v2 path in a `/proc/PID/cgroup` text (its `0::PATH` line).
fn unified_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The pod UID (lower case, with dashes) and the pod-level directory (the path up to and
/// including it) of a cgroup path, for the systemd and cgroupfs layouts.
pub fn pod_of(path: &str) -> Option<(String, &str)> {
    let mut end = 0;
    for segment in path.split('/') {
        end += segment.len();
        let uid = match segment.strip_suffix(".slice") {
            // systemd: kubepods[-qos]-pod<UID_>.slice, with any prefix (kubelet-kubepods-…).
            Some(slice) if slice.contains("kubepods") => slice.rsplit_once("-pod").map(|(_, uid)| uid),
            Some(_) => None,
            // cgroupfs: pod<UID>.
            None => segment.strip_prefix("pod"),
        };
        if let Some(uid) = uid.map(normalize_uid).filter(|u| is_uid(u)) {
            return Some((uid, &path[..end]));
        }
        end += 1;
    }
    None
}

/// UIDs as the API writes them: lower case, dashes (the systemd driver writes underscores).
fn normalize_uid(uid: &str) -> String {
    uid.replace('_', "-").to_ascii_lowercase()
}

/// An RFC 4122 UID: 8-4-4-4-12 hex digits.
pub fn is_uid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_time(proc_pid: &Path) -> Option<u64> {
    let stat = fs::read_to_string(proc_pid.join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the netns at `netns` has one of `ips` as a local address (read with rtnetlink from a
/// thread that enters it).
fn netns_holds_any(netns: &Path, ips: &[IpAddr]) -> Result<bool, DiscoveryError> {
    let file =
        fs::File::open(netns).map_err(|e| DiscoveryError::Io(format!("opening {}", netns.display()), e))?;
    let ips = ips.to_vec();
    let found = std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<bool> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                let addrs = Rtnl::open()?.addresses()?;
                Ok(addrs.iter().any(|(_, a)| ips.contains(a)))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns check panicked")))
    });
    found.map_err(|e| DiscoveryError::Io(format!("reading the addresses of {}", netns.display()), e))
}

/// A directory named `name` under `root`, at most `depth` levels down.
fn find_dir(root: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    for entry in fs::read_dir(root).ok()?.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry.file_name() == name {
            return Some(entry.path());
        }
        // Only the kubelet's hierarchy (and prefixes such as kubelet.slice) can hold pods.
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if (n.starts_with("kube") || n.ends_with(".slice"))
            && let Some(found) = find_dir(&entry.path(), name, depth - 1)
        {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2a9c1e-7b4d-4e8a-9c0f-1a2b3c4d5e6f";

    #[test]
    fn the_pod_uid_and_directory_come_from_every_kubelet_layout() {
        let cases = [
            // systemd driver, containerd
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f2a9c1e_7b4d_4e8a_9c0f_1a2b3c4d5e6f.slice/cri-containerd-0123abcd.scope",
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f2a9c1e_7b4d_4e8a_9c0f_1a2b3c4d5e6f.slice",
            ),
            // systemd driver, CRI-O, Guaranteed QoS
            (
                "/kubepods.slice/kubepods-pod3f2a9c1e_7b4d_4e8a_9c0f_1a2b3c4d5e6f.slice/crio-0123abcd.scope",
                "/kubepods.slice/kubepods-pod3f2a9c1e_7b4d_4e8a_9c0f_1a2b3c4d5e6f.slice",
            ),
            // systemd driver under kind's prefix, seen through a cgroup namespace
            (
                "/../../kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod3f2a9c1e_7b4d_4e8a_9c0f_1a2b3c4d5e6f.slice/cri-containerd-9.scope",
                "/../../kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod3f2a9c1e_7b4d_4e8a_9c0f_1a2b3c4d5e6f.slice",
            ),
            // cgroupfs driver
            (
                "/kubepods/burstable/pod3f2a9c1e-7b4d-4e8a-9c0f-1a2b3c4d5e6f/0123abcd",
                "/kubepods/burstable/pod3f2a9c1e-7b4d-4e8a-9c0f-1a2b3c4d5e6f",
            ),
            // cgroupfs driver, Guaranteed QoS, the pod cgroup itself
            (
                "/kubepods/pod3f2a9c1e-7b4d-4e8a-9c0f-1a2b3c4d5e6f",
                "/kubepods/pod3f2a9c1e-7b4d-4e8a-9c0f-1a2b3c4d5e6f",
            ),
        ];
        for (path, dir) in cases {
            assert_eq!(pod_of(path), Some((UID.to_owned(), dir)), "{path}");
        }
    }

    #[test]
    fn paths_without_a_pod_are_not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/kubepods/burstable",
            "/user.slice/podman-1234.scope",
            "/kubepods/podnot-a-uid/abc",
            "/kubepods.slice/kubepods-podXYZ.slice",
        ] {
            assert_eq!(pod_of(path), None, "{path}");
        }
    }

    #[test]
    fn the_cgroup2_mount_is_read_from_proc_mounts() {
        let mounts = "proc /proc proc rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn an_absent_pod_is_a_clear_error() {
        let host = Host::current().expect("cgroup2 is mounted here");
        let err = host.locate(UID, &["10.0.0.1".parse().unwrap()]).unwrap_err();
        assert!(matches!(err, DiscoveryError::NoProcess(_)), "{err}");
        assert!(err.to_string().contains(UID), "{err}");
    }
}
