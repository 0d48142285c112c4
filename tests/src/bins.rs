//! Finding the project's built binaries (the agent, the test app) from a test process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable naming the directory of built binaries (set by `cargo xtask test`).
pub const BIN_DIR_ENV: &str = "FERRY_BIN_DIR";

/// The path of the built binary `name`: in `$FERRY_BIN_DIR` if set, else beside the running test
/// (target/<profile>/deps/.. = target/<profile>). Panics, naming the path, when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("cannot find the test executable: {e}"));
    let path = bin_dir(std::env::var_os(BIN_DIR_ENV), &exe).join(name);
    if !path.is_file() {
        panic!(
            "binary {name} not found at {} (build it first, e.g. `cargo build --bins`, or set {BIN_DIR_ENV})",
            path.display()
        );
    }
    path
}

/// The directory to look in, given `$FERRY_BIN_DIR` and the running executable.
fn bin_dir(env: Option<OsString>, exe: &Path) -> PathBuf {
    if let Some(dir) = env.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_owned()
    } else {
        dir.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_wins_then_deps_parent() {
        let exe = Path::new("/w/target/debug/deps/harness-123");
        assert_eq!(bin_dir(Some("/bins".into()), exe), PathBuf::from("/bins"));
        assert_eq!(bin_dir(None, exe), PathBuf::from("/w/target/debug"));
        assert_eq!(bin_dir(Some("".into()), exe), PathBuf::from("/w/target/debug"));
        assert_eq!(bin_dir(None, Path::new("/w/target/release/tool")), PathBuf::from("/w/target/release"));
    }

    #[test]
    #[should_panic(expected = "no-such-binary-xyz not found at")]
    fn missing_binary_names_the_path() {
        bin_path("no-such-binary-xyz");
    }
}
