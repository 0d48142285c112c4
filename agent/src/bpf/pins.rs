//! Where the datapath lives between agents: bpffs pins under a root whose path carries the maps'
//! layout version. Programs, maps and every link are pinned, so the datapath outlives the agent (a
//! SIGTERM, a crash or an upgrade never opens a bypass), a starting agent adopts what it finds, and
//! an agent built with other maps never reuses these (the kernel does not check sizes on reuse).
//!
//! ```text
//! ROOT/v{LAYOUT_VERSION}/maps/NAME
//! ROOT/v{LAYOUT_VERSION}/programs/NAME
//! ROOT/v{LAYOUT_VERSION}/pods/CGROUPID-NETNSCOOKIE/PROGRAM   one pod's links
//! ROOT/v{LAYOUT_VERSION}/node/CGROUPID/PROGRAM               the probe programs' links
//! ```

use std::{
    io,
    path::{Path, PathBuf},
};

use ferry_common::LAYOUT_VERSION;

/// The default pin root.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/ferry";
/// The standard bpffs mount point, the one place Ferry mounts bpffs itself when it is missing.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// statfs(2) magic of bpffs.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Why the pin directories could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The root is not on a bpffs (and is not under the standard mount point, which Ferry mounts).
    #[error("{0} is not on a bpf filesystem (mount one there, or pass --bpf-root under /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    /// A directory could not be created, read or removed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The pin directories of one layout version.
#[derive(Clone, Debug)]
pub struct PinRoot {
    root: PathBuf,
    dir: PathBuf,
}

impl PinRoot {
    /// Opens (creating when needed) the directories under `root`, mounting bpffs at
    /// `/sys/fs/bpf` first when `root` is below it and nothing is mounted there.
    pub fn open(root: &Path) -> Result<Self, PinError> {
        ensure_bpffs(root)?;
        let dir = root.join(format!("v{LAYOUT_VERSION}"));
        for sub in ["maps", "programs", "pods", "node"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| PinError::Io {
                what: "creating pin directory",
                path,
                source,
            })?;
        }
        Ok(Self { root: root.to_owned(), dir })
    }

    /// The pin of map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// The pin of program `name`.
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join("programs").join(name)
    }

    /// The directory of the links of the pod with cgroup `cgroup_id` in netns `netns_cookie`.
    pub fn pod(&self, cgroup_id: u64, netns_cookie: u64) -> PathBuf {
        self.dir.join("pods").join(format!("{cgroup_id}-{netns_cookie}"))
    }

    /// The directory of the probe programs' links on cgroup `cgroup_id`.
    pub fn node(&self, cgroup_id: u64) -> PathBuf {
        self.dir.join("node").join(cgroup_id.to_string())
    }

    /// Every pod link directory pinned now.
    pub fn pods(&self) -> Vec<PathBuf> {
        subdirs(&self.dir.join("pods"))
    }

    /// Every probe link directory pinned now.
    pub fn nodes(&self) -> Vec<PathBuf> {
        subdirs(&self.dir.join("node"))
    }

    /// Every pinned link of program `name`, over all pods and the node.
    pub fn links_of(&self, name: &str) -> Vec<PathBuf> {
        self.pods().into_iter().chain(self.nodes()).map(|d| d.join(name)).filter(|p| p.exists()).collect()
    }

    /// Other layout versions' directories left by agents of another build.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        subdirs(&self.root).into_iter().filter(|d| *d != self.dir).collect()
    }

    /// The root (all versions).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Removes a pod's or the node's link directory: the links detach as soon as no process holds
/// them open.
pub fn remove_links(dir: &Path) -> Result<(), PinError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinError::Io { what: "removing pinned links", path: dir.to_owned(), source }),
    }
}

/// The netns cookies of every pod with links pinned under `root` (every layout version): the pods
/// this installation enrolled, read from the directory names before `uninstall` removes them.
pub fn pinned_pod_netns(root: &Path) -> std::collections::HashSet<u64> {
    subdirs(root)
        .iter()
        .flat_map(|version| subdirs(&version.join("pods")))
        .filter_map(|dir| netns_cookie_of(&dir))
        .collect()
}

/// The netns cookie in a pod link directory's name (`CGROUPID-NETNSCOOKIE`).
fn netns_cookie_of(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_str()?;
    let (_cgroup, cookie) = name.split_once('-')?;
    cookie.parse().ok()
}

/// Removes everything pinned under `root`, every layout version: `ferry uninstall`. Returns whether
/// anything was there.
pub fn uninstall(root: &Path) -> Result<bool, PinError> {
    if !root.exists() {
        return Ok(false);
    }
    // Links first, so no pod keeps a program whose maps are already gone from the filesystem.
    for version in subdirs(root) {
        for kind in ["pods", "node"] {
            for dir in subdirs(&version.join(kind)) {
                remove_links(&dir)?;
            }
        }
    }
    std::fs::remove_dir_all(root).map_err(|source| PinError::Io {
        what: "removing pins",
        path: root.to_owned(),
        source,
    })?;
    Ok(true)
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> =
        entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect();
    out.sort();
    out
}

/// Makes sure `root` can hold pins: its nearest existing ancestor is on bpffs, or is the standard
/// mount point with nothing mounted (then bpffs is mounted there, as Cilium does).
fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let standard = Path::new(BPFFS_MOUNT);
    if existing == standard || (existing.starts_with(standard) && !is_bpffs(standard)) {
        mount_bpffs(standard)?;
        if is_bpffs(standard) {
            return Ok(());
        }
    }
    Err(PinError::NotBpffs(root.to_owned()))
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // f_type's width differs by architecture; the magic is 32 bits.
    rc == 0 && st.f_type as u32 == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> Result<(), PinError> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(at.as_os_str().as_bytes()).map_err(|e| PinError::Io {
        what: "mounting bpffs at",
        path: at.to_owned(),
        source: e.into(),
    })?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(c"bpffs".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(PinError::Io {
            what: "mounting bpffs at",
            path: at.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(path = %at.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_version_is_in_every_path() {
        let pins = PinRoot { root: "/r".into(), dir: format!("/r/v{LAYOUT_VERSION}").into() };
        let v = format!("/r/v{LAYOUT_VERSION}");
        assert_eq!(pins.map("POD_ADDRS"), Path::new(&format!("{v}/maps/POD_ADDRS")));
        assert_eq!(pins.program("ferry_connect4"), Path::new(&format!("{v}/programs/ferry_connect4")));
        assert_eq!(pins.pod(12, 34), Path::new(&format!("{v}/pods/12-34")));
        assert_eq!(pins.node(1), Path::new(&format!("{v}/node/1")));
    }

    #[test]
    fn pod_directory_names_give_their_netns_cookie() {
        assert_eq!(netns_cookie_of(Path::new("/x/pods/1234-4096")), Some(4096));
        assert_eq!(netns_cookie_of(Path::new("/x/pods/1234")), None);
        assert_eq!(netns_cookie_of(Path::new("/x/pods/1234-abc")), None);
    }

    #[test]
    fn a_directory_outside_bpffs_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = PinRoot::open(&dir.path().join("ferry")).expect_err("tmpfs is not bpffs");
        assert!(matches!(err, PinError::NotBpffs(_)), "{err}");
    }
}
