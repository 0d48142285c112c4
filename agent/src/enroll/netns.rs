//! A worker thread that lives in a pod's network namespace and creates sockets there.
//!
//! setns() is per thread, so the agent keeps one thread per pod inside the pod's netns; sockets it
//! creates stay in that netns for their lifetime while the process itself stays in the node's netns
//! and cgroup (which is why the agent's own connects are never captured by the pod's programs).

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Errors entering a pod's network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns file could not be opened.
    #[error("opening netns {path}")]
    Open {
        /// The netns path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// setns() failed (the file is not a network namespace, or no permission).
    #[error("entering netns {path}")]
    Enter {
        /// The netns path.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
    /// SO_NETNS_COOKIE could not be read inside the netns.
    #[error("reading the netns cookie of {path}")]
    Cookie {
        /// The netns path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The worker thread is gone (agent shutting down).
    #[error("netns worker for {0} has stopped")]
    Stopped(PathBuf),
}

/// Handle to a pod's netns worker; the thread exits when the last handle is dropped.
#[derive(Clone)]
pub struct PodNetns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    cookie: u64,
}

impl PodNetns {
    /// Opens `path`, starts the worker inside that netns and reads the netns cookie.
    pub fn open(path: &Path, thread_name: String) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                drop(file);
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(NetnsError::Enter { path: path.to_owned(), source }),
            Err(_) => return Err(NetnsError::Stopped(path.to_owned())),
        }
        let mut netns = Self { path: path.to_owned(), jobs, cookie: 0 };
        netns.cookie = netns
            .run_blocking(netns_cookie)?
            .map_err(|source| NetnsError::Cookie { path: path.to_owned(), source })?;
        Ok(netns)
    }

    /// The netns path this worker lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cookie for this netns, as the sock_ops program records it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the worker (inside the pod's netns) and waits for it from async code.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Stopped(self.path.clone()))?;
        rx.await.map_err(|_| NetnsError::Stopped(self.path.clone()))
    }

    /// Runs `f` on the worker and blocks the calling thread until it returns.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Stopped(self.path.clone()))?;
        rx.recv().map_err(|_| NetnsError::Stopped(self.path.clone()))
    }
}

/// SO_NETNS_COOKIE of the calling thread's netns, read from a throwaway socket.
pub fn netns_cookie() -> std::io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_netns_file_is_a_clear_error() {
        let err = PodNetns::open(Path::new("/nonexistent/netns"), "t".into()).err().map(|e| e.to_string());
        assert_eq!(err.as_deref().map(|e| e.starts_with("opening netns /nonexistent/netns")), Some(true));
    }

    #[test]
    fn a_file_that_is_not_a_netns_is_refused() {
        let err = PodNetns::open(Path::new("/proc/self/status"), "t".into()).err().map(|e| e.to_string());
        assert_eq!(err.as_deref().map(|e| e.starts_with("entering netns /proc/self/status")), Some(true));
    }

    #[test]
    fn own_netns_has_a_stable_cookie() {
        let a = PodNetns::open(Path::new("/proc/self/ns/net"), "t".into());
        let b = PodNetns::open(Path::new("/proc/self/ns/net"), "t".into());
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_ne!(a.cookie(), 0);
                assert_eq!(a.cookie(), b.cookie());
            }
            // Without CAP_SYS_ADMIN setns fails even for our own netns; the suite runs as root.
            (a, b) => panic!("setns into own netns failed (run as root): {:?} {:?}", a.err(), b.err()),
        }
    }
}
