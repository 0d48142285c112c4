//! Named network namespaces through `ip`, and running code inside one on a helper thread.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context as _, Result, bail};

/// Where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Concurrent first-time `ip netns add` calls race on making NETNS_DIR a shared mount.
static ADD_LOCK: Mutex<()> = Mutex::new(());

/// The file of the named namespace `name`.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates the named namespace `name`.
pub fn add(name: &str) -> Result<()> {
    let _serial = ADD_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    run_ip(None, &["netns", "add", name])
}

/// Deletes the named namespace `name`; a namespace that is (or meanwhile went) away is not an error.
pub fn delete(name: &str) -> Result<()> {
    if !path_of(name).exists() {
        return Ok(());
    }
    match run_ip(None, &["netns", "delete", name]) {
        Err(_) if !path_of(name).exists() => Ok(()),
        other => other,
    }
}

/// The names of all named namespaces.
pub fn list() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Runs `ip [-n netns] args...`, failing with its stderr when it fails.
pub fn run_ip(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(args).output().context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}{}` failed ({}): {}",
            netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n netns -batch -` over `lines`, so one process configures a whole namespace.
pub fn run_ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).context("cannot write to `ip -batch`")?;
    }
    let out = child.wait_with_output().context("cannot wait for `ip -batch`")?;
    if !out.status.success() {
        bail!(
            "`ip -n {netns} -batch` failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns` (and nothing else).
///
/// Sockets created by `f` stay in that namespace for their whole life, whichever thread uses them
/// later. A panic in `f` is resumed on the caller's thread.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("cannot open netns {}", netns.display()))?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            // SAFETY: setns only changes this thread's namespace; the fd is valid for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let err = std::io::Error::last_os_error();
                return Err(err).with_context(|| format!("setns into {}", netns.display()));
            }
            Ok(f())
        });
        handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes `value` to the per-namespace sysctl file `key` (a path under /proc/sys) inside `netns`.
pub fn write_sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    // /proc/sys/net resolves to the namespace of the thread that opens it.
    in_netns(netns, || std::fs::write(&path, value))?
        .with_context(|| format!("cannot set {} in {}", path.display(), netns.display()))
}

/// Reads the per-namespace sysctl file `key` (a path under /proc/sys) inside `netns`.
pub fn read_sysctl(netns: &Path, key: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(key);
    let text = in_netns(netns, || std::fs::read_to_string(&path))?
        .with_context(|| format!("cannot read {} in {}", path.display(), netns.display()))?;
    Ok(text.trim().to_owned())
}

/// The interface names inside `netns`.
pub fn links(netns: &str) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "link", "show"])
        .output()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!("`ip -n {netns} link show` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // Lines look like "3: eth0@if4: <BROADCAST,...> ...".
    let text = String::from_utf8_lossy(&out.stdout);
    let names = text
        .lines()
        .filter_map(|line| line.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .collect();
    Ok(names)
}
