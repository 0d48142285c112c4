//! cgroup v2 directories: finding the mount, creating, listing members and removing trees.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

/// The cgroup2 mount point, read once from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = MOUNT.get_or_init(|| {
        let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
        parse_cgroup2_mount(&mounts)
    });
    found.clone().ok_or_else(|| anyhow!("no cgroup2 file system in /proc/mounts"))
}

/// The mount point of the first `cgroup2` entry of a /proc/mounts text.
fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(dir)))
    })
}

/// Undoes the octal escapes (`\040` for a space) of /proc/mounts fields.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates the cgroup directory `path` (its parent must exist).
pub fn create(path: &Path) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("cannot create cgroup {}", path.display()))
}

/// The pids listed in `path`/cgroup.procs (empty when the cgroup is gone).
pub fn procs(path: &Path) -> Result<Vec<i32>> {
    let file = path.join("cgroup.procs");
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    text.lines()
        .map(|l| l.trim().parse().with_context(|| format!("bad pid {l:?} in {}", file.display())))
        .collect()
}

/// The child cgroup directories of `path`.
pub fn children(path: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", path.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// The pids in `path` and all its descendants.
pub fn procs_recursive(path: &Path) -> Result<Vec<i32>> {
    let mut pids = procs(path)?;
    for child in children(path)? {
        pids.extend(procs_recursive(&child)?);
    }
    Ok(pids)
}

/// Removes `path` and its descendants (deepest first). A cgroup whose last processes are still
/// exiting is busy for a moment, so busy directories are retried until `patience` runs out.
pub fn remove_tree(path: &Path, patience: Duration) -> Result<()> {
    for child in children(path)? {
        remove_tree(&child, patience)?;
    }
    let deadline = Instant::now() + patience;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                let pids = procs(path).unwrap_or_default();
                bail!("cannot remove cgroup {} (processes {pids:?}): {e}", path.display());
            }
        }
    }
}

/// The cgroup v2 path (relative to the mount, like "/a/b") that `/proc/<pid>/cgroup` names.
pub fn of_process(pid: &str) -> Result<String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{file} has no cgroup v2 (\"0::\") line: {text:?}"))
}

/// `path` relative to the cgroup2 mount, as /proc/PID/cgroup writes it ("/a/b").
pub fn relative(path: &Path) -> Result<String> {
    let mount = cgroup2_mount()?;
    let rel = path
        .strip_prefix(&mount)
        .with_context(|| format!("{} is not under {}", path.display(), mount.display()))?;
    Ok(format!("/{}", rel.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert_eq!(unescape_mount_field(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_field(r"/plain\x"), r"/plain\x");
    }
}
