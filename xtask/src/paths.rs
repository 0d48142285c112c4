//! Where things are: the repository, its target directory and cargo's install directories.

use std::env;
use std::path::{Path, PathBuf};

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR as cargo does.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// Cargo's home: CARGO_HOME, else ~/.cargo.
fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
    })
}

/// Where `cargo install` puts binaries: CARGO_INSTALL_ROOT/bin, else CARGO_HOME/bin.
pub fn install_bin_dir() -> PathBuf {
    match env::var_os("CARGO_INSTALL_ROOT") {
        Some(root) => PathBuf::from(root).join("bin"),
        None => cargo_home().join("bin"),
    }
}

/// PATH for child processes: the current PATH with cargo's bin directories in front when missing,
/// so that a freshly installed bpf-linker is found even when the caller's PATH lacks ~/.cargo/bin.
pub fn search_path() -> std::ffi::OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    let wanted = [install_bin_dir(), cargo_home().join("bin")];
    prepend_missing(&current, &wanted)
}

/// Puts each directory of `dirs` that `path` lacks in front of it, keeping their order.
fn prepend_missing(path: &std::ffi::OsStr, dirs: &[PathBuf]) -> std::ffi::OsString {
    let existing: Vec<PathBuf> = env::split_paths(path).collect();
    let mut front: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        if !existing.contains(dir) && !front.contains(dir) {
            front.push(dir.clone());
        }
    }
    env::join_paths(front.into_iter().chain(existing)).unwrap_or_else(|_| path.to_os_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepends_only_missing_dirs() {
        let path = prepend_missing("/usr/bin:/a/bin".as_ref(), &["/a/bin".into(), "/b/bin".into()]);
        assert_eq!(path, "/b/bin:/usr/bin:/a/bin");
    }

    #[test]
    fn does_not_repeat_a_dir() {
        let path = prepend_missing("/usr/bin".as_ref(), &["/c/bin".into(), "/c/bin".into()]);
        assert_eq!(path, "/c/bin:/usr/bin");
    }

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("xtask/Cargo.toml").is_file());
    }
}
