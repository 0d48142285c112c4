//! Running the Ferry agent on a simulated node and reading its JSON-lines events.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{ChildGuard, Pod, SimNode, bin_path, iptables::PROXY_GID};

/// How long [`Agent::start`] waits for the `ready` event.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Agent::stop`] waits after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running agent (`ferry run`) in a node's network namespace, in no pod's cgroup, or a sidecar in
/// a pod's network namespace ([`Agent::start_sidecar`]). Its mesh file, events and logs live in a
/// temporary directory. Dropping it kills the agent; dropping it during a panic also prints its
/// stderr and events to help the failing test.
#[derive(Debug)]
pub struct Agent {
    /// In a mutex so waiting (which reaps on exit) works through a shared reference.
    child: Mutex<ChildGuard>,
    pid: u32,
    /// Shared with the agent's successors ([`Agent::start_successor`]): one node's files.
    dir: Arc<tempfile::TempDir>,
    /// The node's pinned datapath: removed once the last agent of the node is gone (declared after
    /// `child`, so the process is dead first).
    pins: Arc<Pins>,
    /// 0 for the first agent of a node, n for its n-th successor (its own events and logs).
    generation: u32,
    /// How the agent was started, for a successor.
    launch: Launch,
}

/// How an agent was started: what a successor repeats.
#[derive(Debug, Clone)]
struct Launch {
    program: PathBuf,
    extra: Vec<String>,
    access_log: bool,
}

/// One node's pin root under bpffs (`/sys/fs/bpf/ferry-test-<pid>-<n>-agent`, a name the sweep
/// recognises), removed when dropped: what `ferry uninstall` would remove, minus the node's
/// loopback addresses, which go with the node's netns.
#[derive(Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    fn new() -> Self {
        let name = crate::names::cgroup_dir_name(&crate::names::fresh_uid(), "agent");
        Self { root: Path::new(BPFFS).join(name) }
    }

    /// The pin root the agent is given.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("ferry-tests: removing pins {}: {e}", self.root.display());
        }
    }
}

/// Where the harness's pin roots live.
pub const BPFFS: &str = "/sys/fs/bpf";

impl Agent {
    /// Starts `ferry run --config DIR/mesh.toml --events DIR/events.jsonl` in `node`'s netns and
    /// waits for its `{"event":"ready"}` line.
    pub fn start(node: &SimNode, mesh_toml: &str) -> Result<Agent> {
        Self::start_program(node, &bin_path("ferry"), mesh_toml)
    }

    /// [`Agent::start`] with another program in place of the `ferry` binary.
    pub fn start_program(node: &SimNode, program: &Path, mesh_toml: &str) -> Result<Agent> {
        let what = format!("agent on node {}", node.name());
        Self::launch_with(
            node.command(program),
            mesh_toml,
            |cmd| node.spawn(cmd),
            &what,
            true,
            &probe_cgroup(node),
        )
    }

    /// `ferry run --kubernetes --node NODE_NAME` in `node`'s netns with `settings_toml` as its settings
    /// file and `KUBECONFIG=kubeconfig`; waits for `ready` (the agent's start, before its first
    /// sync; wait for the `synced` event for that).
    pub fn start_kubernetes(
        node: &SimNode,
        settings_toml: &str,
        kubeconfig: &Path,
        node_name: &str,
    ) -> Result<Agent> {
        let mut cmd = node.command(bin_path("ferry"));
        cmd.env("KUBECONFIG", kubeconfig).env_remove("FERRY_NODE");
        let what = format!("Kubernetes agent on node {}", node.name());
        let mut extra = vec!["--kubernetes".to_owned(), format!("--node={node_name}")];
        extra.extend(probe_cgroup(node));
        Self::launch_with(cmd, settings_toml, |cmd| node.spawn(cmd), &what, true, &extra)
    }

    /// [`Agent::start`] as operators run it by default, without an access log (the bench: the
    /// sidecars it is compared with log nothing either). The events file is still written.
    pub fn start_without_access_log(node: &SimNode, mesh_toml: &str) -> Result<Agent> {
        let what = format!("agent on node {}", node.name());
        let extra = probe_cgroup(node);
        Self::launch_with(
            node.command(bin_path("ferry")),
            mesh_toml,
            |cmd| node.spawn(cmd),
            &what,
            false,
            &extra,
        )
    }

    /// Starts `ferry run` as a classic sidecar of `pod`: inside the pod's netns (not its cgroup),
    /// with group id [`PROXY_GID`] so the pod's iptables rules (see [`crate::iptables::install`])
    /// leave its own connections alone. `mesh_toml` should set `capture.mode = "iptables"` and name
    /// the pod's node as its own `node`. The pod's teardown kills it too.
    pub fn start_sidecar(pod: &Pod, mesh_toml: &str) -> Result<Agent> {
        let mut cmd = pod.netns_command(bin_path("ferry"));
        cmd.gid(PROXY_GID);
        let what = format!("sidecar in pod {}", pod.name());
        Self::launch(cmd, mesh_toml, |cmd| pod.spawn(cmd), &what, true)
    }

    /// Runs `cmd` as `ferry run` with a fresh directory of files and waits for readiness.
    fn launch(
        cmd: Command,
        mesh_toml: &str,
        spawn: impl FnOnce(Command) -> Result<ChildGuard>,
        what: &str,
        access_log: bool,
    ) -> Result<Agent> {
        Self::launch_with(cmd, mesh_toml, spawn, what, access_log, &[])
    }

    /// [`Agent::launch`] with `extra` arguments to `ferry run`.
    fn launch_with(
        cmd: Command,
        mesh_toml: &str,
        spawn: impl FnOnce(Command) -> Result<ChildGuard>,
        what: &str,
        access_log: bool,
        extra: &[String],
    ) -> Result<Agent> {
        let dir = Arc::new(
            tempfile::Builder::new().prefix("ferry-agent-").tempdir().context("cannot create a temp dir")?,
        );
        let mesh = dir.path().join("mesh.toml");
        std::fs::write(&mesh, mesh_toml).with_context(|| format!("cannot write {}", mesh.display()))?;
        let launch = Launch { program: PathBuf::from(cmd.get_program()), extra: extra.to_vec(), access_log };
        let agent = Self::spawn_generation(cmd, dir, Arc::new(Pins::new()), 0, launch, spawn)?;
        agent
            .wait_for_event(|e| e["event"] == "ready", READY_TIMEOUT)
            .with_context(|| format!("{what} did not become ready"))?;
        Ok(agent)
    }

    /// Spawns `ferry run` generation `generation` of a node: the node's mesh file, admin socket
    /// and pin root, its own events file and logs.
    fn spawn_generation(
        mut cmd: Command,
        dir: Arc<tempfile::TempDir>,
        pins: Arc<Pins>,
        generation: u32,
        launch: Launch,
        spawn: impl FnOnce(Command) -> Result<ChildGuard>,
    ) -> Result<Agent> {
        let file = |name: &str| dir.path().join(generation_name(name, generation));
        let log = |name: &str| -> Result<File> {
            let path = file(name);
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))
        };
        // Logs go to files rather than pipes: nothing to drain, and they outlive the process.
        cmd.arg("run")
            .arg("--config")
            .arg(dir.path().join("mesh.toml"))
            .arg("--events")
            .arg(file("events.jsonl"))
            .arg("--admin-socket")
            .arg(dir.path().join("admin.sock"))
            .arg("--bpf-root")
            .arg(pins.root())
            .stdin(Stdio::null())
            .stdout(log("stdout.log")?)
            .stderr(log("stderr.log")?);
        if launch.access_log {
            cmd.arg("--access-log").arg(dir.path().join("access.log"));
        }
        cmd.args(&launch.extra);
        let child = spawn(cmd)?;
        Ok(Agent { pid: child.pid(), child: Mutex::new(child), dir, pins, generation, launch })
    }

    /// The node's pin root.
    pub fn pins(&self) -> &Path {
        self.pins.root()
    }

    /// Starts the next agent of `node` (same mesh file, admin socket and pin root, its own events
    /// and logs) and waits for its `ready`: while this one runs, an upgrade by handoff; after
    /// [`Agent::kill`] or [`Agent::stop`], a restart that adopts the pinned datapath.
    pub fn start_successor(&self, node: &SimNode) -> Result<Agent> {
        let agent = self.spawn_successor(node)?;
        agent.wait_for_event(|e| e["event"] == "ready", READY_TIMEOUT).with_context(|| {
            format!("successor {} on node {} did not become ready", agent.generation, node.name())
        })?;
        Ok(agent)
    }

    /// [`Agent::start_successor`] without waiting for readiness.
    pub fn spawn_successor(&self, node: &SimNode) -> Result<Agent> {
        Self::spawn_generation(
            node.command(&self.launch.program),
            self.dir.clone(),
            self.pins.clone(),
            self.generation + 1,
            self.launch.clone(),
            |cmd| node.spawn(cmd),
        )
    }

    /// `ferry uninstall` for this node (in its netns, with its admin socket and pin root): its
    /// output, after checking it succeeded.
    pub fn uninstall(&self, node: &SimNode) -> Result<String> {
        let out = node
            .command(&self.launch.program)
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .arg("uninstall")
            .arg("--bpf-root")
            .arg(self.pins())
            .output()
            .context("running ferry uninstall")?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("ferry uninstall failed ({}): {text}", out.status);
        }
        Ok(text)
    }

    /// SIGKILL, as a crash: nothing of the agent's own cleanup runs; the pinned datapath stays.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.child().kill()
    }

    /// Waits up to `timeout` for the agent to exit by itself (after handing over).
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        self.child().wait_timeout(timeout)
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn child(&self) -> MutexGuard<'_, ChildGuard> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent's admin socket (DIR/admin.sock), for `ferry --admin-socket`.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Runs the `ferry` CLI against this agent with `-o json` and parses what it prints; an error
    /// (with its stderr) when it fails.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(bin_path("ferry"))
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .args(["-o", "json"])
            .args(args)
            .env_remove("FERRY_ADMIN_SOCKET")
            .stdin(Stdio::null())
            .output()
            .context("cannot run the ferry CLI")?;
        if !out.status.success() {
            bail!("ferry {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("ferry {args:?} printed no JSON"))
    }

    /// The `ferry workloads` entry of pod `name`.
    pub fn workload(&self, name: &str) -> Result<Value> {
        let list = self.cli_json(&["workloads"])?;
        let found = list.as_array().into_iter().flatten().find(|w| w["name"] == name).cloned();
        found.with_context(|| format!("no workload {name} in {list}"))
    }

    /// The access log's lines (DIR/access.log), parsed.
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The directory holding mesh.toml, events.jsonl, stdout.log and stderr.log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The events file.
    pub fn events_path(&self) -> PathBuf {
        self.dir.path().join(generation_name("events.jsonl", self.generation))
    }

    /// Rewrites the mesh file (for hot-reload tests).
    pub fn write_mesh(&self, mesh_toml: &str) -> Result<()> {
        let path = self.dir.path().join("mesh.toml");
        // Write then rename, so the agent never reads half a file.
        let tmp = self.dir.path().join("mesh.toml.tmp");
        std::fs::write(&tmp, mesh_toml).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
    }

    /// All complete event lines so far, parsed. Panics, quoting the line, on a line that is not JSON.
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.events_path()).unwrap_or_default();
        parse_events(&text)
    }

    /// What the agent wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(generation_name("stderr.log", self.generation)))
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for an event matching `pred`; an error if the agent exits first or
    /// time runs out (naming the last events and stderr).
    pub fn wait_for_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.events().into_iter().find(|e| pred(e)) {
                return Ok(event);
            }
            if let Some(status) = self.child().try_wait()? {
                bail!("agent exited ({status}) before the event\nstderr:\n{}", self.stderr());
            }
            if Instant::now() >= deadline {
                let events = self.events();
                let tail = &events[events.len().saturating_sub(10)..];
                bail!(
                    "no matching event within {timeout:?}; last events: {}\nstderr:\n{}",
                    serde_json::to_string(tail).unwrap_or_default(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits up to [`STOP_TIMEOUT`] for the agent to exit; an error (after
    /// SIGKILL) if it does not.
    pub fn stop(&self) -> Result<ExitStatus> {
        let mut child = self.child();
        child.signal(libc::SIGTERM)?;
        match child.wait_timeout(STOP_TIMEOUT) {
            Ok(status) => Ok(status),
            Err(_) => {
                let status = child.kill()?;
                bail!(
                    "agent ignored SIGTERM for {STOP_TIMEOUT:?}; killed ({status})\nstderr:\n{}",
                    self.stderr()
                );
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent {} stderr ---\n{}", self.pid(), self.stderr());
            let text = std::fs::read_to_string(self.events_path()).unwrap_or_default();
            eprintln!("--- agent {} events ---\n{text}", self.pid());
        }
        // The ChildGuard field then kills and reaps the process.
    }
}

/// `name` for generation `generation` of a node's agent: `events.jsonl`, `events.1.jsonl`, ...
fn generation_name(name: &str, generation: u32) -> String {
    match (generation, name.rsplit_once('.')) {
        (0, _) | (_, None) => name.to_owned(),
        (g, Some((stem, ext))) => format!("{stem}.{g}.{ext}"),
    }
}

/// Parses complete (newline-terminated) lines; a trailing partial line is still being written.
fn parse_events(text: &str) -> Vec<Value> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return Vec::new(),
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("agent event line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

/// `--probe-cgroup` for an agent on `node`: the node's cgroup root, where its "kubelet" runs (see
/// [`SimNode::command_in_cgroup`]), so the probe programs never touch the machine's other processes.
fn probe_cgroup(node: &SimNode) -> Vec<String> {
    vec![format!("--probe-cgroup={}", node.cgroup_root().display())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_complete_lines_only() {
        let text = "{\"event\":\"ready\"}\n\n{\"event\":\"conn_close\",\"bytes_sent\":3}\n{\"event\":\"par";
        let events = parse_events(text);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["bytes_sent"], 3);
        assert!(parse_events("{\"event\":\"ready\"}").is_empty());
    }

    #[test]
    #[should_panic(expected = "not JSON")]
    fn garbage_lines_panic_with_the_line() {
        parse_events("not json\n");
    }
}
