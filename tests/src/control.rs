//! Driving a running agent from outside, as an operator does: its `ferry` CLI, and changes to the
//! files it watches (its mesh file, its policy files) followed by the reload they cause.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::scenario::{EVENT_WAIT, wait_events};
use crate::{Agent, bin_path};

/// Runs `ferry --admin-socket SOCKET ARGS...` against `agent` and returns what it printed; an
/// error, quoting its output, when it fails.
pub fn ferry(agent: &Agent, args: &[&str]) -> Result<String> {
    let out = Command::new(bin_path("ferry"))
        .arg("--admin-socket")
        .arg(agent.admin_socket())
        .args(args)
        .env_remove("FERRY_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .context("cannot run the ferry CLI")?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "ferry {args:?} failed ({}): {stdout}{stderr}", out.status);
    Ok(stdout.into_owned())
}

/// Whether event `e` ends a reload: `reloaded` or `reload_rejected`.
pub fn is_reload_outcome(e: &Value) -> bool {
    e["event"] == "reloaded" || e["event"] == "reload_rejected"
}

/// Makes `change` (to a file `agent` watches) and returns the agent's next reload outcome; an error
/// if `change` fails or none comes within [`EVENT_WAIT`].
pub fn next_reload(agent: &Agent, change: impl FnOnce() -> Result<()>) -> Result<Value> {
    let before = agent.events().iter().filter(|e| is_reload_outcome(e)).count();
    change()?;
    let seen = wait_events(agent, before + 1, is_reload_outcome);
    seen.get(before).cloned().with_context(|| format!("the agent did not reload within {EVENT_WAIT:?}"))
}
