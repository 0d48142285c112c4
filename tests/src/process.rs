//! Child processes the harness starts: entering a pod before exec, tracking pids so teardown can
//! kill them, and waiting with timeouts.
//!
//! Every child is forked by one long-lived spawner thread and gets `PR_SET_PDEATHSIG(SIGKILL)`, so
//! when the test process dies (crash, Ctrl-C, timeout kill) its children die with it. The death
//! signal follows the forking thread, which is why forks happen on a thread that never exits.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

/// The pids of live, unreaped children that one node's teardown must kill.
///
/// Only unreaped children are listed (a guard removes its pid under this lock when it reaps),
/// so a pid here can never have been recycled for an unrelated process.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pids: Mutex<HashSet<i32>>,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, HashSet<i32>> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends SIGKILL to every tracked child; their guards reap them later.
    pub(crate) fn kill_all(&self) {
        for &pid in self.lock().iter() {
            // SAFETY: plain kill(2) of a child we have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A request to the spawner thread: the command and where to send the child.
type SpawnRequest = (Command, Sender<io::Result<Child>>);

/// Forks `cmd` on the spawner thread with a parent-death signal.
fn spawn_with_death_signal(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Sender<SpawnRequest>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl, getppid and _exit are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("ferry-test-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = channel();
    spawner.send((cmd, reply_tx)).map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Adds a pre-exec step that joins the network namespace at `netns` and, when given, the cgroup
/// directory `cgroup`. The files are opened now, before fork, so the child only makes syscalls.
///
/// Panics (naming the path) when they cannot be opened: that means the node was already torn
/// down, which is a bug in the test.
pub(crate) fn enter_on_exec(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) {
    let ns = File::open(netns)
        .unwrap_or_else(|e| panic!("cannot open netns {} (node torn down?): {e}", netns.display()));
    let procs: Option<File> = cgroup.map(|dir| {
        let path = dir.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {} (node torn down?): {e}", path.display()))
    });
    // SAFETY: setns and write are async-signal-safe; the fds live as long as the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                // "0" moves the writing process.
                if libc::write(procs.as_raw_fd(), c"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A pipe drained on a background thread, so the child never blocks on a full pipe.
#[derive(Debug)]
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Drain {
    fn start(mut pipe: impl Read + Send + 'static) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&chunk[..n]);
            }
        });
        Self { buf, thread }
    }

    fn contents(&self) -> Vec<u8> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (at most `patience`: a grandchild may hold the pipe open) for EOF, then the bytes.
    fn finish(self, patience: Duration) -> Vec<u8> {
        let deadline = Instant::now() + patience;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.contents()
    }
}

/// A started child that is killed (SIGKILL by pid, then reaped) when the guard drops.
///
/// When the command's stderr was `Stdio::piped()`, it is collected in the background and
/// readable with [`ChildGuard::stderr`].
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    pid: i32,
    tracker: Arc<Tracker>,
    status: Option<ExitStatus>,
    stderr: Option<Drain>,
}

impl ChildGuard {
    /// Spawns `cmd` and tracks its pid in `tracker`.
    pub(crate) fn spawn(cmd: Command, tracker: &Arc<Tracker>) -> Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = spawn_with_death_signal(cmd).with_context(|| format!("cannot start {program}"))?;
        let pid = child.id() as i32;
        tracker.lock().insert(pid);
        let stderr = child.stderr.take().map(Drain::start);
        Ok(Self { child, pid, tracker: Arc::clone(tracker), status: None, stderr })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The child's stdin, when it was piped and not taken yet.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The child's stdout, when it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// What the child wrote to its piped stderr so far (empty when stderr was not piped).
    pub fn stderr(&self) -> String {
        self.stderr.as_ref().map(|d| String::from_utf8_lossy(&d.contents()).into_owned()).unwrap_or_default()
    }

    /// The exit status if the child has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        // Reap and untrack under one lock, so teardown never signals a reaped (reusable) pid.
        let mut pids = self.tracker.lock();
        let status = self.child.try_wait().with_context(|| format!("cannot wait for pid {}", self.pid))?;
        if let Some(status) = status {
            pids.remove(&self.pid);
            self.status = Some(status);
        }
        Ok(status)
    }

    /// Waits up to `timeout` for the child to exit; an error (the child still running) after that.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("pid {} still running after {timeout:?}", self.pid);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (such as `libc::SIGTERM`) to the child unless it was already reaped.
    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: plain kill(2) of our unreaped child.
        if unsafe { libc::kill(self.pid, signal) } != 0 {
            let err = io::Error::last_os_error();
            return Err(err).with_context(|| format!("cannot signal pid {}", self.pid));
        }
        Ok(())
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        // Untracked first: from here only this guard may signal the pid, and it is not reaped yet.
        self.tracker.lock().remove(&self.pid);
        // SAFETY: plain kill(2) of our unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let status = self.child.wait().with_context(|| format!("cannot reap pid {}", self.pid))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("ferry-tests: {e:#}");
        }
    }
}

/// A started child whose stdout and stderr are collected in the background, to be finished
/// with [`CollectedChild::wait`]. Its stdin is left as the command set it.
#[derive(Debug)]
pub struct CollectedChild {
    program: String,
    guard: ChildGuard,
    stdout: Drain,
}

impl CollectedChild {
    /// Starts `cmd` with stdout and stderr piped and drained, tracked in `tracker`.
    pub(crate) fn spawn(mut cmd: Command, tracker: &Arc<Tracker>) -> Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn(cmd, tracker)?;
        let stdout = Drain::start(guard.take_stdout().ok_or_else(|| anyhow!("{program}: stdout not piped"))?);
        Ok(Self { program, guard, stdout })
    }

    /// The child's stdin, when the command piped it and it was not taken yet.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.guard.take_stdin()
    }

    /// Waits for the child to exit and returns its output; an error (the child killed) after
    /// `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let (program, stdout) = (&self.program, self.stdout);
        let status = match self.guard.wait_timeout(timeout) {
            Ok(status) => status,
            Err(_) => {
                self.guard.kill()?;
                let out = String::from_utf8_lossy(&stdout.finish(Duration::from_millis(200))).into_owned();
                bail!(
                    "{program} timed out after {timeout:?}\nstdout: {out}\nstderr: {}",
                    self.guard.stderr()
                );
            }
        };
        // Normally EOF is already there; the patience is for a drain thread starved on a loaded
        // machine (or a grandchild holding the pipe), and cutting the output short loses the report.
        let patience = Duration::from_secs(10);
        let stderr = self.guard.stderr.take().map(|d| d.finish(patience)).unwrap_or_default();
        Ok(Output { status, stdout: stdout.finish(patience), stderr })
    }
}

/// Runs `cmd` to completion (stdin closed), capturing its output; an error (the child killed)
/// after `timeout`.
pub(crate) fn output_with_timeout(
    mut cmd: Command,
    tracker: &Arc<Tracker>,
    timeout: Duration,
) -> Result<Output> {
    cmd.stdin(Stdio::null());
    CollectedChild::spawn(cmd, tracker)?.wait(timeout)
}
