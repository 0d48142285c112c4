//! The load an agent upgrade must not disturb: long-lived connections doing checksummed
//! request/response, large checksummed transfers both ways, half-closed connections that keep
//! receiving, and a churn of new connections at a fixed rate with a short connect timeout and no
//! retries. Servers run on threads in a pod's netns ([`serve`]); the client runs in a forked child
//! in the client pod's netns and cgroup, so the agent captures it, until a stop file appears.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::Pod;

/// How long a read may stall before the load calls it an error.
const STALL: Duration = Duration::from_secs(20);

/// FNV-1a, 64 bits: the checksum both ends compute.
pub fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// FNV-1a's offset basis.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A deterministic byte stream (xorshift), so both ends know what the other must send. Byte
/// granular: however the reads split it, the same bytes come out.
struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    fn new(seed: u64) -> Self {
        Self { state: seed | 1, word: [0; 8], used: 8 }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// A running load server; dropping it stops accepting (open connections finish on their own).
pub struct Server {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept (from the pod's netns this may fail: then the thread ends with the test).
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Starts the load server on `port` of every address in `pod`'s netns.
pub fn serve(pod: &Pod, port: u16) -> Result<Server> {
    let listener = pod.run(move || TcpListener::bind(("::", port)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let addr = SocketAddr::new(pod.ipv4().into(), port);
    let flag = stop.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(conn) = conn {
                std::thread::spawn(move || {
                    let _ = serve_one(conn);
                });
            }
        }
    });
    Ok(Server { stop, addr })
}

fn serve_one(mut c: TcpStream) -> io::Result<()> {
    c.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    c.read_exact(&mut mode)?;
    match mode[0] {
        b'R' => loop {
            let mut head = [0u8; 12];
            match c.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let len = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) as usize;
            let mut payload = vec![0u8; len];
            c.read_exact(&mut payload)?;
            let mut reply = Vec::with_capacity(16 + len);
            reply.extend_from_slice(&head[..8]);
            reply.extend_from_slice(&fnv(FNV_START, &payload).to_le_bytes());
            reply.extend_from_slice(&payload);
            c.write_all(&reply)?;
        },
        b'U' => {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut hash, mut total) = (FNV_START, 0u64);
            loop {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hash = fnv(hash, &buf[..n]);
                total += n as u64;
            }
            let mut reply = hash.to_le_bytes().to_vec();
            reply.extend_from_slice(&total.to_le_bytes());
            c.write_all(&reply)?;
            c.shutdown(Shutdown::Write)
        }
        b'D' => {
            let mut args = [0u8; 16];
            c.read_exact(&mut args)?;
            let total = u64::from_le_bytes(args[..8].try_into().unwrap_or_default());
            let mut stream = Stream::new(u64::from_le_bytes(args[8..].try_into().unwrap_or_default()));
            // The client half-closed: what is left of this connection is the download.
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(buf.len() as u64) as usize;
                stream.fill(&mut buf[..n]);
                c.write_all(&buf[..n])?;
                sent += n as u64;
            }
            c.shutdown(Shutdown::Write)
        }
        b'H' => {
            let mut args = [0u8; 16];
            c.read_exact(&mut args)?;
            let ticks = u64::from_le_bytes(args[..8].try_into().unwrap_or_default());
            let every = Duration::from_millis(u64::from_le_bytes(args[8..].try_into().unwrap_or_default()));
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)?;
            for i in 0..ticks {
                std::thread::sleep(every);
                c.write_all(&i.to_le_bytes())?;
            }
            c.shutdown(Shutdown::Write)
        }
        other => Err(io::Error::other(format!("unknown mode {other}"))),
    }
}

/// One destination of the load and what runs against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// The path's name in the report ("plaintext", "mtls", "shortcut").
    pub name: String,
    /// Where the client connects.
    pub addr: SocketAddr,
    /// Long-lived request/response connections.
    pub long_lived: usize,
    /// Bytes of each bulk transfer (alternately up and down); 0 for none.
    pub bulk_bytes: u64,
    /// Half-closed connections at a time (each receives ticks for a while after its EOF).
    pub half_closed: usize,
    /// New connections per second.
    pub churn_per_sec: u32,
}

/// What the load saw on one path.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PathReport {
    /// The path's name.
    pub name: String,
    /// Requests answered on long-lived connections.
    pub requests: u64,
    /// Slowest request on a long-lived connection, in microseconds.
    pub max_latency_us: u64,
    /// Median request latency, in microseconds.
    pub p50_latency_us: u64,
    /// Requests slower than 20 ms: (ms since the load started, latency in µs).
    pub slow: Vec<(u64, u64)>,
    /// Bulk transfers completed and their bytes.
    pub bulk_done: u64,
    /// Bytes moved by bulk transfers.
    pub bulk_bytes: u64,
    /// Half-closed connections completed.
    pub half_closed_done: u64,
    /// Churn connections attempted and completed.
    pub churn_attempts: u64,
    /// Churn connections that succeeded.
    pub churn_ok: u64,
    /// Longest churn connect, in microseconds.
    pub churn_max_connect_us: u64,
    /// Connects that failed (refused, timed out).
    pub connect_failures: u64,
    /// Established connections that broke (reset, unexpected EOF, stall).
    pub resets: u64,
    /// Wrong checksum, length or order.
    pub checksum_errors: u64,
    /// The first errors, for the failure message.
    pub errors: Vec<String>,
}

/// The whole load's report.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    /// One per target.
    pub paths: Vec<PathReport>,
}

impl LoadReport {
    /// Failures of every kind, over all paths.
    pub fn failures(&self) -> u64 {
        self.paths.iter().map(|p| p.connect_failures + p.resets + p.checksum_errors).sum()
    }
}

/// Runs the load from `pod` (forked into its netns and cgroup) until `stop` exists.
pub fn run(pod: &Pod, targets: Vec<Target>, stop: PathBuf, limit: Duration) -> Result<LoadReport> {
    pod.run_in_cgroup_timeout(limit, move || run_here(targets, &stop))
}

struct Shared {
    start: Instant,
    stop: PathBuf,
    report: Mutex<PathReport>,
    latencies: Mutex<Vec<u64>>,
    stopped: AtomicBool,
}

impl Shared {
    fn stopping(&self) -> bool {
        if self.stopped.load(Ordering::Relaxed) {
            return true;
        }
        let s = self.stop.exists();
        if s {
            self.stopped.store(true, Ordering::Relaxed);
        }
        s
    }

    fn fail(&self, kind: &str, what: String) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            "connect" => r.connect_failures += 1,
            "checksum" => r.checksum_errors += 1,
            _ => r.resets += 1,
        }
        if r.errors.len() < 10 {
            let at = self.start.elapsed().as_millis();
            r.errors.push(format!("{kind} at {at} ms: {what}"));
        }
    }

    fn with(&self, f: impl FnOnce(&mut PathReport)) {
        f(&mut self.report.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

fn run_here(targets: Vec<Target>, stop: &Path) -> LoadReport {
    let start = Instant::now();
    let mut handles = Vec::new();
    let mut shared_all = Vec::new();
    for t in targets {
        let shared = Arc::new(Shared {
            start,
            stop: stop.to_owned(),
            report: Mutex::new(PathReport { name: t.name.clone(), ..Default::default() }),
            latencies: Mutex::default(),
            stopped: AtomicBool::new(false),
        });
        shared_all.push(shared.clone());
        for i in 0..t.long_lived {
            let (s, addr) = (shared.clone(), t.addr);
            handles.push(std::thread::spawn(move || long_lived(&s, addr, i as u64)));
        }
        if t.bulk_bytes > 0 {
            let (s, addr, bytes) = (shared.clone(), t.addr, t.bulk_bytes);
            handles.push(std::thread::spawn(move || bulk(&s, addr, bytes)));
        }
        for _ in 0..t.half_closed {
            let (s, addr) = (shared.clone(), t.addr);
            handles.push(std::thread::spawn(move || half_closed(&s, addr)));
        }
        if t.churn_per_sec > 0 {
            let (s, addr, rate) = (shared.clone(), t.addr, t.churn_per_sec);
            handles.push(std::thread::spawn(move || churn(&s, addr, rate)));
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let paths = shared_all
        .iter()
        .map(|s| {
            let mut r = s.report.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut lat = s.latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
            lat.sort_unstable();
            r.p50_latency_us = lat.get(lat.len() / 2).copied().unwrap_or(0);
            r
        })
        .collect();
    LoadReport { paths }
}

fn kind_of(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::InvalidData => "checksum",
        _ => "reset",
    }
}

fn dial(s: &Shared, addr: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    let t = Instant::now();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(c) => {
            let _ = c.set_nodelay(true);
            let _ = c.set_read_timeout(Some(STALL));
            let _ = c.set_write_timeout(Some(STALL));
            let us = t.elapsed().as_micros() as u64;
            s.with(|r| r.churn_max_connect_us = r.churn_max_connect_us.max(us));
            Some(c)
        }
        Err(e) => {
            s.fail("connect", format!("{addr}: {e}"));
            None
        }
    }
}

/// One request/response: a random payload, answered with its checksum and itself.
fn request(c: &mut TcpStream, seq: u64, stream: &mut Stream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    stream.fill(&mut len);
    let len = 1 + usize::from(u16::from_le_bytes(len)) % 4096;
    buf.resize(len, 0);
    stream.fill(buf);
    let mut msg = Vec::with_capacity(12 + len);
    msg.extend_from_slice(&seq.to_le_bytes());
    msg.extend_from_slice(&(len as u32).to_le_bytes());
    msg.extend_from_slice(buf);
    c.write_all(&msg)?;
    let mut head = [0u8; 16];
    c.read_exact(&mut head)?;
    let mut back = vec![0u8; len];
    c.read_exact(&mut back)?;
    let got_seq = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let got_sum = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
    if got_seq != seq || got_sum != fnv(FNV_START, buf) || back != *buf {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("request {seq}: wrong answer")));
    }
    Ok(())
}

fn long_lived(s: &Shared, addr: SocketAddr, i: u64) {
    let Some(mut c) = dial(s, addr, Duration::from_secs(5)) else { return };
    let mut stream = Stream::new(0x9e37_79b9_7f4a_7c15 ^ (i + 1));
    let mut buf = Vec::new();
    if let Err(e) = c.write_all(b"R") {
        return s.fail("reset", e.to_string());
    }
    let mut seq = 0;
    while !s.stopping() {
        let t = Instant::now();
        if let Err(e) = request(&mut c, seq, &mut stream, &mut buf) {
            return s.fail(kind_of(&e), format!("long-lived {i}: {e}"));
        }
        let us = t.elapsed().as_micros() as u64;
        s.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        s.with(|r| {
            r.requests += 1;
            r.max_latency_us = r.max_latency_us.max(us);
            if us > 20_000 {
                r.slow.push((s.start.elapsed().as_millis() as u64, us));
            }
        });
        seq += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    // A clean end: half-close, and the server's EOF follows.
    let _ = c.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    match c.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => {}
        Ok(_) => s.fail("checksum", format!("long-lived {i}: {} stray bytes at the end", rest.len())),
        Err(e) => s.fail("reset", format!("long-lived {i} closing: {e}")),
    }
}

fn bulk(s: &Shared, addr: SocketAddr, bytes: u64) {
    let mut up = true;
    let mut seed = 7u64;
    while !s.stopping() {
        let Some(mut c) = dial(s, addr, Duration::from_secs(5)) else { return };
        seed += 1;
        let result = if up { upload(&mut c, bytes, seed) } else { download(&mut c, bytes, seed) };
        match result {
            Ok(()) => s.with(|r| {
                r.bulk_done += 1;
                r.bulk_bytes += bytes;
            }),
            Err(e) => return s.fail(kind_of(&e), format!("bulk {}: {e}", if up { "up" } else { "down" })),
        }
        up = !up;
    }
}

fn upload(c: &mut TcpStream, bytes: u64, seed: u64) -> io::Result<()> {
    c.write_all(b"U")?;
    let mut stream = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut hash) = (0u64, FNV_START);
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..n]);
        hash = fnv(hash, &buf[..n]);
        c.write_all(&buf[..n])?;
        sent += n as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)?;
    let ok = reply.len() == 16 && reply[..8] == hash.to_le_bytes() && reply[8..] == bytes.to_le_bytes();
    if !ok {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "upload checksum or length differs"));
    }
    Ok(())
}

fn download(c: &mut TcpStream, bytes: u64, seed: u64) -> io::Result<()> {
    let mut req = b"D".to_vec();
    req.extend_from_slice(&bytes.to_le_bytes());
    req.extend_from_slice(&seed.to_le_bytes());
    c.write_all(&req)?;
    c.shutdown(Shutdown::Write)?;
    let mut stream = Stream::new(seed);
    let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut got = 0u64;
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("download differs at byte {got}"),
            ));
        }
        got += n as u64;
    }
    if got != bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("download ended at {got} of {bytes}"),
        ));
    }
    Ok(())
}

fn half_closed(s: &Shared, addr: SocketAddr) {
    while !s.stopping() {
        let Some(mut c) = dial(s, addr, Duration::from_secs(5)) else { return };
        let ticks = 30u64;
        let mut req = b"H".to_vec();
        req.extend_from_slice(&ticks.to_le_bytes());
        req.extend_from_slice(&100u64.to_le_bytes());
        let result = (|| -> io::Result<()> {
            c.write_all(&req)?;
            c.shutdown(Shutdown::Write)?;
            let mut back = Vec::new();
            c.read_to_end(&mut back)?;
            let want: Vec<u8> = (0..ticks).flat_map(|i| i.to_le_bytes()).collect();
            if back != want {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} tick bytes", back.len())));
            }
            Ok(())
        })();
        match result {
            Ok(()) => s.with(|r| r.half_closed_done += 1),
            Err(e) => return s.fail(kind_of(&e), format!("half-closed: {e}")),
        }
    }
}

fn churn(s: &Arc<Shared>, addr: SocketAddr, rate: u32) {
    let every = Duration::from_secs(1) / rate;
    let mut next = Instant::now();
    let mut workers = Vec::new();
    let n = AtomicU64::new(0);
    while !s.stopping() {
        let i = n.fetch_add(1, Ordering::Relaxed);
        let s2 = s.clone();
        workers.push(std::thread::spawn(move || {
            s2.with(|r| r.churn_attempts += 1);
            // One second to connect, no retry: a refused or dropped SYN is a failure.
            let Some(mut c) = dial(&s2, addr, Duration::from_secs(1)) else { return };
            let mut stream = Stream::new(0x5151 + i);
            let result = c.write_all(b"R").and_then(|()| request(&mut c, 0, &mut stream, &mut Vec::new()));
            match result {
                Ok(()) => s2.with(|r| r.churn_ok += 1),
                Err(e) => s2.fail(kind_of(&e), format!("churn {i}: {e}")),
            }
        }));
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        workers.retain(|w| !w.is_finished());
    }
    for w in workers {
        let _ = w.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_the_same_on_both_ends_however_it_is_split() {
        let (mut a, mut b) = (Stream::new(3), Stream::new(3));
        let (mut x, mut y) = ([0u8; 100], [0u8; 100]);
        a.fill(&mut x);
        for chunk in y.chunks_mut(7) {
            b.fill(chunk);
        }
        assert_eq!(x, y);
        assert_ne!(fnv(FNV_START, b"ab"), fnv(FNV_START, b"ba"));
    }
}
