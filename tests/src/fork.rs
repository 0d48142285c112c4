//! Running a Rust closure in a forked child that has joined a pod's netns and cgroup.
//!
//! Caveats of fork in a multi-threaded test process: the child holds only the forking thread, so
//! a lock another thread held at fork time stays locked forever in the child. glibc's malloc is
//! fork-safe, but other locks (stdout, an async runtime's internals, a Mutex shared with other
//! threads) may not be: the closure should use fresh resources only (a new tokio runtime is fine,
//! one inherited from the parent is not). The child never returns into the caller: it ends with
//! `_exit`, so no destructors of the parent's state run twice.
//!
//! A panic is the sharpest case: std's default panic hook takes a process-wide lock to print, which
//! another test thread that is panicking (and printing a backtrace, slow on a loaded machine) may
//! hold at fork time, and unwinding walks the loaded objects under the dynamic loader's lock. So
//! in the child a panic never reaches either: a hook installed before the first fork sends the
//! panic message back as the answer and ends the child on the spot.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Forks, joins `netns` and the cgroup directory `cgroup` in the child, runs `f` there and returns
/// its result (sent back as JSON). A panic in `f` becomes an error carrying the panic message.
pub(crate) fn run_forked<T, F>(netns: &Path, cgroup: &Path, timeout: Duration, f: F) -> Result<T>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> T,
{
    let ns = File::open(netns).with_context(|| format!("cannot open netns {}", netns.display()))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("cannot open {}", procs_path.display()))?;
    let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
    route_child_panics();
    // SAFETY: the child only runs `child_main` and then `_exit`s; see the module caveats.
    match unsafe { fork() }.context("fork failed")? {
        ForkResult::Child => {
            drop(read_end);
            CHILD_ANSWER_FD.store(write_end.as_raw_fd(), Ordering::Relaxed);
            let code = std::panic::catch_unwind(AssertUnwindSafe(|| child_main(&ns, &procs, write_end, f)))
                .unwrap_or(101);
            // SAFETY: ends the child without running the parent's destructors or atexit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            parent_main(child, read_end, timeout)
        }
    }
}

/// In the child: enter netns and cgroup, run `f`, write the JSON result; the exit code.
fn child_main<T: Serialize>(ns: &File, procs: &File, out: OwnedFd, f: impl FnOnce() -> T) -> i32 {
    let mut out = File::from(out);
    let result: Result<T, String> = enter(ns, procs).and_then(|()| {
        // Normally the hook of [`route_child_panics`] answers first; this covers a test that
        // replaced the process's panic hook.
        std::panic::catch_unwind(AssertUnwindSafe(f))
            .map_err(|panic| format!("closure panicked: {}", panic_message(panic.as_ref())))
    });
    let bytes = serde_json::to_vec(&result).unwrap_or_else(|e| {
        serde_json::to_vec(&Err::<(), _>(format!("cannot encode result: {e}"))).unwrap_or_default()
    });
    if out.write_all(&bytes).is_err() {
        return 2;
    }
    0
}

/// The answer pipe's write end in a forked child; -1 in the test process itself.
static CHILD_ANSWER_FD: AtomicI32 = AtomicI32::new(-1);

/// Installs (once, before the first fork) a panic hook that, in a forked child, writes the
/// panic message to the answer pipe and `_exit`s: no lock, no output, no unwinding there. In
/// the test process itself it hands over to the hook that was in place.
fn route_child_panics() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let fd = CHILD_ANSWER_FD.load(Ordering::Relaxed);
            if fd < 0 {
                return previous(info);
            }
            let message = format!("closure panicked: {}", panic_message(info.payload()));
            let bytes = serde_json::to_vec(&Err::<(), _>(message)).unwrap_or_default();
            write_fd(fd, &bytes);
            // SAFETY: ends the forked child, as `run_forked` does, without unwinding.
            unsafe { libc::_exit(101) }
        }));
    });
}

/// Writes all of `bytes` to `fd` with plain write(2) calls, giving up on an error.
fn write_fd(fd: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid buffer of its length; `fd` is the child's open pipe end.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(n) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n..],
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A panic payload as text (`panic!` makes a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// Joins the netns and cgroup (this single-threaded child is the whole process).
fn enter(ns: &File, procs: &File) -> Result<(), String> {
    // SAFETY: setns on a valid fd.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    let mut procs = procs;
    procs.write_all(b"0").map_err(|e| format!("joining the cgroup: {e}"))
}

/// In the parent: read the child's answer (bounded by `timeout`), reap it, decode.
fn parent_main<T: DeserializeOwned>(child: Pid, read_end: OwnedFd, timeout: Duration) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let read = File::from(read_end).read_to_end(&mut bytes).map(|_| bytes);
        let _ = tx.send(read);
    });
    let answer = rx.recv_timeout(timeout);
    if answer.is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    let status = waitpid(child, None).with_context(|| format!("cannot reap forked child {child}"))?;
    let bytes = match answer {
        Ok(read) => read.context("cannot read the forked child's answer")?,
        Err(_) => bail!("forked child {child} did not finish within {timeout:?} ({status:?})"),
    };
    if bytes.is_empty() {
        bail!("forked child {child} gave no answer ({status:?})");
    }
    let result: Result<T, String> = serde_json::from_slice(&bytes)
        .with_context(|| format!("bad answer from forked child: {}", String::from_utf8_lossy(&bytes)))?;
    result.map_err(|e| anyhow!("in forked child {child}: {e}"))
}
