//! Running child commands: from the repository root, with cargo's bin directories on PATH,
//! inherited stdio, and errors that name the command.

use anyhow::{Context as _, Result, bail};
use std::ffi::OsStr;
use std::process::{Command, ExitStatus};

use crate::paths;

/// A command that runs in the repository root with cargo's bin directories on PATH.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(paths::repo_root()).env("PATH", paths::search_path());
    cmd
}

/// A `cargo` command (the rustup proxy, so `+nightly` works).
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = command("cargo");
    cmd.args(args);
    cmd
}

/// Runs with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("+ {}", describe(cmd));
    cmd.status().with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs with inherited stdio; an error when it cannot start or does not exit with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs quietly and returns its stdout; an error carrying stderr when it fails.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// True when the command starts and exits with 0; its output is discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|out| out.status.success())
}

/// The command line, for messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout() {
        assert_eq!(stdout(command("echo").arg("hi")).unwrap(), "hi\n");
    }

    #[test]
    fn failure_names_the_command_and_stderr() {
        let err = stdout(command("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn run_reports_non_zero_exit() {
        assert!(run(command("false").stdout(std::process::Stdio::null())).is_err());
        assert!(run(&mut command("true")).is_ok());
    }

    #[test]
    fn succeeds_is_false_for_a_missing_program() {
        assert!(!succeeds(&mut command("/nonexistent/ferry-no-such-program")));
        assert!(succeeds(&mut command("true")));
    }
}
