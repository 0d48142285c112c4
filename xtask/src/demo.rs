//! `cargo xtask demo`: builds, then runs the demo (tests crate's `ferry-demo`) with the
//! terminal attached, exiting with its code.

use anyhow::{Result, ensure};
use std::process::ExitStatus;

use crate::{build, cmd, paths, setup};

/// Sets up, builds and runs the demo; exits the process with the demo's exit code.
pub fn run() -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    build::bins()?;
    let demo = paths::target_dir().join("debug/ferry-demo");
    ensure!(
        demo.is_file(),
        "the demo binary {} does not exist: the tests crate has no `ferry-demo` bin yet",
        demo.display()
    );
    let status = cmd::status(&mut cmd::command(&demo))?;
    std::process::exit(exit_code(status));
}

/// The shell's convention: the exit code, or 128 + signal number when killed by a signal.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.code().or_else(|| status.signal().map(|sig| 128 + sig)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn passes_exit_codes_and_maps_signals() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 128 + 9);
    }
}
