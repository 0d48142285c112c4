//! `--flamegraph`: samples the mesh processes' stacks with Linux `perf` during the headline
//! open-loop run and turns them into `OUT/flame-<scenario>.folded` and `.svg` ([`crate::flame`],
//! with inferno), each stack rooted at the process it was sampled in.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result, bail, ensure};

use crate::flame;
use crate::plan::{HEADLINE_CONNS, RATE};

/// The perf binary; Debian's `linux-perf` package, which `cargo xtask setup` installs.
const PERF: &str = "perf";
/// Samples per second of a busy thread: odd, so sampling does not run in step with timers.
const FREQUENCY: &str = "999";
/// How perf walks the stacks. Release builds keep no frame pointers, so `-g` (frame pointers)
/// loses every Rust caller above the leaf; DWARF unwinding from a copy of the user stack works,
/// and a tokio worker's stack needs the largest copy (64 KiB less 8 bytes): 32 KiB cut a quarter
/// of the ferry-mtls stacks short of the thread's start.
const CALL_GRAPH: &str = "dwarf,65528";

/// Fails, naming perf, unless `perf` runs here: checked before any scenario so a missing perf
/// does not cost a whole run.
pub fn check() -> Result<()> {
    let out = Command::new(PERF).arg("--version").output().with_context(|| {
        format!("--flamegraph needs {PERF} (Debian package linux-perf; `cargo xtask setup` installs it)")
    })?;
    ensure!(
        out.status.success(),
        "--flamegraph needs {PERF}, but `{PERF} --version` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Where one scenario's samples go: `OUT/flame-<scenario>.perf.data` while recording.
pub fn data_path(out: &Path, scenario: &str) -> PathBuf {
    out.join(format!("flame-{scenario}.perf.data"))
}

/// A running `perf record` of some processes; stopped (SIGINT) when dropped.
pub struct Recording {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
}

impl Recording {
    /// Starts sampling the stacks of every thread of `pids` into `data`.
    pub fn start(pids: &[u32], data: &Path) -> Result<Recording> {
        ensure!(!pids.is_empty(), "no processes to profile");
        let log = data.with_extension("log");
        let stderr = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new(PERF)
            .args(["record", "-F", FREQUENCY, "--call-graph", CALL_GRAPH, "--quiet", "-o"])
            .arg(data)
            .args(["-p", &pids.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start `{PERF} record` (is linux-perf installed?)"))?;
        Ok(Recording { child: Some(child), data: data.to_owned(), log })
    }

    /// Stops the recording and waits for perf to write its data; an error, with perf's own
    /// words, when perf failed.
    pub fn stop(mut self) -> Result<()> {
        let Some(child) = self.child.take() else { return Ok(()) };
        let status = interrupt(child)?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        // perf record stops on SIGINT by re-raising it once its data is written.
        let interrupted = std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGINT);
        ensure!(status.success() || interrupted, "`{PERF} record` failed ({status}): {}", log.trim());
        ensure!(self.data.is_file(), "`{PERF} record` wrote no {}: {}", self.data.display(), log.trim());
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = interrupt(child);
        }
    }
}

/// SIGINT to our perf child, then waits for it.
fn interrupt(mut child: Child) -> Result<std::process::ExitStatus> {
    let pid = child.id() as i32;
    if child.try_wait()?.is_none() {
        // SAFETY: kill(2) of our own child, which is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    child.wait().with_context(|| format!("cannot wait for `{PERF} record` (pid {pid})"))
}

/// Turns a scenario's recorded samples into `OUT/flame-<scenario>.folded` and `.svg` and removes
/// the raw data; `processes` names the sampled pids (each stack's root), `mode` (full, quick)
/// goes in the picture's title.
pub fn write(data: &Path, out: &Path, scenario: &str, mode: &str, processes: &[(u32, String)]) -> Result<()> {
    // `+pid`: a sample's header names its process as well as its thread, which the stacks are
    // rooted at (perf's default for a `-p` recording names the thread only).
    let script = Command::new(PERF)
        .args(["script", "-F", "+pid"])
        .arg("-i")
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{PERF} script`"))?;
    if !script.status.success() {
        bail!(
            "`{PERF} script -i {}` failed ({}): {}",
            data.display(),
            script.status,
            String::from_utf8_lossy(&script.stderr).trim()
        );
    }
    let folded = flame::collapse(&script.stdout, processes)?;
    ensure!(
        !folded.is_empty(),
        "`{PERF} record` caught no samples of the mesh processes ({})",
        data.display()
    );
    let title = format!(
        "{scenario}: mesh processes' stacks, 1 KiB at {RATE} req/s over {HEADLINE_CONNS} connections ({mode} run)"
    );
    for (ext, text) in [
        ("folded", flame::folded_text(&folded)),
        ("svg", flame::svg(&folded, &title, flame::unit(&script.stdout))?),
    ] {
        let path = out.join(format!("flame-{scenario}.{ext}"));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    std::fs::remove_file(data).with_context(|| format!("cannot remove {}", data.display()))?;
    Ok(())
}
