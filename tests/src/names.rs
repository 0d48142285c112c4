//! Unique names for what one harness instance creates, and how leftovers are recognised later.
//!
//! Every network namespace is `fy<pid>-<n>-<name>` and every top-level cgroup is
//! `ferry-test-<pid>-<n>-<name>`: the pid says which process made it (so a later sweep can tell a
//! crashed run's objects from a running one's) and `n` keeps instances within one process apart.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Result, bail};

/// Prefix of every network namespace the harness creates.
pub const NETNS_PREFIX: &str = "fy";
/// Prefix of every top-level cgroup directory the harness creates.
pub const CGROUP_PREFIX: &str = "ferry-test-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short id unique to this process and call: `<pid>-<n>`.
pub fn fresh_uid() -> String {
    format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The network namespace name for `name` under `uid`.
pub fn netns_name(uid: &str, name: &str) -> String {
    format!("{NETNS_PREFIX}{uid}-{name}")
}

/// The top-level cgroup directory name for `name` under `uid`.
pub fn cgroup_dir_name(uid: &str, name: &str) -> String {
    format!("{CGROUP_PREFIX}{uid}-{name}")
}

/// The pid that created `object` if it is named `<prefix><pid>-<n>-<name>`, else `None`.
pub fn owner_pid(object: &str, prefix: &str) -> Option<u32> {
    let rest = object.strip_prefix(prefix)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let counter = parts.next()?;
    let name = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) || name.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Checks that a node or pod name is safe in file, namespace and cgroup names.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(ok_char) {
        bail!("{kind} name {name:?} must be 1 to 64 characters of [A-Za-z0-9._-], not starting with '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner_pid() {
        let uid = fresh_uid();
        let ns = netns_name(&uid, "node-a");
        let cg = cgroup_dir_name(&uid, "node-a");
        assert_eq!(owner_pid(&ns, NETNS_PREFIX), Some(std::process::id()));
        assert_eq!(owner_pid(&cg, CGROUP_PREFIX), Some(std::process::id()));
        assert_ne!(fresh_uid(), uid);
    }

    #[test]
    fn foreign_names_have_no_owner() {
        for name in ["fyx-1-a", "fy12-a", "fy12-3-", "fy-1-2-a", "ferry-test-1-2-a", "cni-1234", ""] {
            assert_eq!(owner_pid(name, NETNS_PREFIX), None, "{name}");
        }
        assert_eq!(owner_pid("ferry-test-77-0-a-b", CGROUP_PREFIX), Some(77));
        assert_eq!(owner_pid("ferry-test-x-0-a", CGROUP_PREFIX), None);
    }

    #[test]
    fn check_name_rejects_path_characters() {
        assert!(check_name("pod", "server-1").is_ok());
        for bad in ["", "a/b", ".hidden", "sp ace", &"x".repeat(65)] {
            assert!(check_name("pod", bad).is_err(), "{bad}");
        }
    }
}
