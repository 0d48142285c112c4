//! A simulated pod: its own network namespace plus a cgroup, and ways to run things inside it.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::process::{self, ChildGuard, CollectedChild, Tracker};
use crate::{cgroup, fork, netns};

/// How long [`Pod::run_in_cgroup`] waits before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A cheaply cloneable handle on a pod of a [`crate::SimNode`]; the node owns (and tears down) it.
#[derive(Debug, Clone)]
pub struct Pod {
    inner: Arc<PodInner>,
}

/// What a pod is made of; fixed when the pod is created.
#[derive(Debug)]
pub(crate) struct PodInner {
    pub(crate) name: String,
    pub(crate) netns_name: String,
    pub(crate) netns_path: PathBuf,
    pub(crate) cgroup_path: PathBuf,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
    pub(crate) host_ifname: String,
    pub(crate) node_netns: String,
    pub(crate) tracker: Arc<Tracker>,
}

impl Pod {
    pub(crate) fn new(inner: PodInner) -> Self {
        Self { inner: Arc::new(inner) }
    }

    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The file of the pod's network namespace (/var/run/netns/NAME).
    pub fn netns_path(&self) -> &Path {
        &self.inner.netns_path
    }

    /// The name of the pod's network namespace (for `ip -n`).
    pub fn netns_name(&self) -> &str {
        &self.inner.netns_name
    }

    /// The pod's cgroup directory.
    pub fn cgroup_path(&self) -> &Path {
        &self.inner.cgroup_path
    }

    /// The pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.inner.ipv4
    }

    /// The pod's IPv6 address.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.inner.ipv6
    }

    /// The node-side end of the pod's veth (attached to the node's br0); the pod side is eth0.
    pub fn host_ifname(&self) -> &str {
        &self.inner.host_ifname
    }

    /// A command that runs `program` in the pod's network namespace and cgroup.
    ///
    /// Panics when the pod's namespace or cgroup is gone (its node was torn down).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        process::enter_on_exec(&mut cmd, &self.inner.netns_path, Some(&self.inner.cgroup_path));
        cmd
    }

    /// A command that runs `program` in the pod's network namespace and in cgroup `dir` instead of
    /// the pod's own (a container cgroup laid out as the kubelet lays them out, say).
    pub fn command_in_cgroup(&self, program: impl AsRef<OsStr>, dir: &Path) -> Command {
        let mut cmd = Command::new(program);
        process::enter_on_exec(&mut cmd, &self.inner.netns_path, Some(dir));
        cmd
    }

    /// A command that runs `program` in the pod's network namespace only, outside its cgroup: a
    /// process that cgroup programs attached to the pod do not see (a "not enrolled" peer).
    pub fn netns_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        process::enter_on_exec(&mut cmd, &self.inner.netns_path, None);
        cmd
    }

    /// Starts `cmd` (usually from [`Pod::command`]) and tracks it so the node's teardown kills it.
    pub fn spawn(&self, cmd: Command) -> Result<ChildGuard> {
        ChildGuard::spawn(cmd, &self.inner.tracker)
    }

    /// Starts a server `cmd` (stdout is piped by this call) and returns once it printed its
    /// `{"listening":"ADDR"}` line, as `ferry-testapp serve` does; an error (naming its stderr) if
    /// it exits or stays silent for 10 s.
    pub fn spawn_server(&self, cmd: Command) -> Result<ChildGuard> {
        crate::testapp::spawn_listening(self, cmd)
    }

    /// Runs `cmd` to completion, capturing its output; an error (the child killed) after `timeout`.
    pub fn output(&self, cmd: Command, timeout: Duration) -> Result<Output> {
        process::output_with_timeout(cmd, &self.inner.tracker, timeout)
    }

    /// Starts `cmd` with its output collected, for a caller that talks to it (stdin) before
    /// waiting for that output.
    pub fn spawn_collected(&self, cmd: Command) -> Result<CollectedChild> {
        CollectedChild::spawn(cmd, &self.inner.tracker)
    }

    /// Runs `f` on a fresh thread inside the pod's network namespace and returns its result.
    ///
    /// Network namespace only: sockets made here are NOT in the pod's cgroup, so cgroup programs
    /// attached to the pod (connect4/connect6 capture) do not see them. Use it for servers, and
    /// for peers that must look "not enrolled". Panics when the namespace cannot be entered.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::in_netns(&self.inner.netns_path, f)
            .unwrap_or_else(|e| panic!("cannot run in pod {}: {e:#}", self.inner.name))
    }

    /// A dual-stack listener on `[::]:port` in the pod's network namespace (not its cgroup), for a
    /// server run by a thread of the test process.
    pub fn listen(&self, port: u16, backlog: i32) -> Result<std::net::TcpListener> {
        let addr = std::net::SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        self.run(|| -> std::io::Result<std::net::TcpListener> {
            let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(backlog)?;
            Ok(socket.into())
        })
        .with_context(|| format!("cannot listen on {addr} in pod {}", self.name()))
    }

    /// Runs `f` in a forked child that joined the pod's network namespace AND cgroup, so its
    /// connects are captured like the pod's own. The result travels back as JSON; a panic in `f`
    /// becomes an error. Fork caveats: the child holds only the calling thread, so `f` must not
    /// use locks, runtimes or connections of the parent (another thread may have held them at fork
    /// time); build what it needs inside it (a fresh tokio runtime is fine). The child ends with
    /// `_exit`, so no destructor of the parent's state runs twice.
    pub fn run_in_cgroup<T, F>(&self, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> T,
    {
        self.run_in_cgroup_timeout(DEFAULT_TIMEOUT, f)
    }

    /// [`Pod::run_in_cgroup`] with its own timeout (the child is killed after it).
    pub fn run_in_cgroup_timeout<T, F>(&self, timeout: Duration, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> T,
    {
        fork::run_forked(&self.inner.netns_path, &self.inner.cgroup_path, timeout, f)
    }

    /// Deletes the pod's veth, namespace and cgroup (each step tolerates a missing object), and
    /// returns what could not be removed. Tracked processes must already have been killed.
    pub(crate) fn teardown(&self) -> Vec<String> {
        let inner = &self.inner;
        let mut errors = Vec::new();
        // Deleting the veth explicitly removes the interfaces even if a socket still pins the netns.
        if netns::path_of(&inner.node_netns).exists()
            && netns::links(&inner.node_netns).is_ok_and(|l| l.contains(&inner.host_ifname))
            && let Err(e) = netns::run_ip(Some(&inner.node_netns), &["link", "del", &inner.host_ifname])
        {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = netns::delete(&inner.netns_name) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = remove_cgroup(&inner.cgroup_path) {
            errors.push(format!("{e:#}"));
        }
        errors
    }
}

/// Removes a harness cgroup; if it stays busy, kills what is still in it and tries again. Only the
/// harness puts processes into its uniquely named cgroups, so those are harness-started processes
/// or their descendants.
pub(crate) fn remove_cgroup(path: &Path) -> Result<()> {
    let patience = Duration::from_secs(2);
    if cgroup::remove_tree(path, patience).is_ok() {
        return Ok(());
    }
    for pid in cgroup::procs_recursive(path)? {
        // SAFETY: plain kill(2) of a pid listed in our own cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    cgroup::remove_tree(path, patience)
}
