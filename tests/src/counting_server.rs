//! An echo server that counts the connections it accepts: for tests that must show that an
//! application never saw a connection (one the mesh refused), which `ferry-testapp serve` cannot.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::Pod;
use crate::testapp::Trailer;

/// How long a connection may stay silent before the server gives up on it.
const IDLE_LIMIT: Duration = Duration::from_secs(120);

/// A dual-stack echo server on `[::]:PORT` in a pod's network namespace (not its cgroup), run by
/// threads of the test process. It answers like `ferry-testapp serve --tag TAG` (the echo, then
/// the trailer once the client half-closes), so `ferry-testapp connect` works against it, and it
/// counts every connection it accepts. Dropping it stops accepting; connections still open end
/// when their client goes away or after [`IDLE_LIMIT`] of silence.
#[derive(Debug)]
pub struct CountingServer {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CountingServer {
    /// Listens on `[::]:port` inside `pod`'s network namespace and starts accepting.
    pub fn start(pod: &Pod, port: u16, tag: &str) -> Result<Self> {
        let listener = pod.listen(port, 128)?;
        // Non-blocking so the accept loop can notice the stop flag.
        listener.set_nonblocking(true)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped, tag) = (Arc::clone(&accepted), Arc::clone(&stop), tag.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("counting-server-{port}"))
            .spawn(move || accept_loop(&listener, &count, &stopped, &tag))
            .context("cannot start the accept thread")?;
        Ok(Self { accepted, stop, thread: Some(thread) })
    }

    /// How many connections the server has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, accepted: &AtomicUsize, stop: &AtomicBool, tag: &str) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                let tag = tag.to_owned();
                std::thread::spawn(move || {
                    // The client may vanish at any point: nothing to report then.
                    let _ = echo(stream, peer, &tag);
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("ferry-tests: counting server stops accepting: {e}");
                return;
            }
        }
    }
}

/// Echoes until the client half-closes, then writes the trailer and closes.
fn echo(mut stream: TcpStream, peer: SocketAddr, tag: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_LIMIT))?;
    let mut buf = [0u8; 16 * 1024];
    let mut received = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n as u64;
        stream.write_all(&buf[..n])?;
    }
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string();
    stream.write_all(Trailer { tag: tag.to_owned(), bytes: received, peer }.to_line().as_bytes())?;
    stream.shutdown(Shutdown::Write)
}
