//! The soak's traffic, against `ferry-testapp serve` (the echo, see [`crate::testapp::serve`]) and
//! `serve --http` ([`crate::testapp::serve_http`]). Per [`Target`]: a few long-lived connections
//! doing request/response at a steady pace, a churn of short connections at a fixed rate, and a
//! bulk transfer every so often. Every byte that comes back is compared with what was sent, and
//! the echo server's trailer must count every byte it received.
//!
//! Plain blocking threads in one process: the worker runs inside a pod's netns and cgroup (so the
//! agent captures its connects), until told to stop, reporting cumulative counters as it goes
//! ([`run`]). Nothing is retried: a failed connect or a broken connection is an error of the run,
//! though the load goes on (a long-lived connection reconnects) so the soak still measures.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::loadgen::HttpConn;
use crate::testapp::{Trailer, Wire, verify_echo};

/// How long a connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read or write may stall before the connection counts as broken.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a broken long-lived connection waits before it reconnects.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Error messages kept per target (the counters keep counting).
const MAX_MESSAGES: usize = 10;
/// Bytes per write of a bulk transfer, and the block of its pattern.
const BULK_BLOCK: usize = 64 * 1024;
/// Largest request on a long-lived connection.
const MAX_REQUEST: usize = 4096;
/// Largest payload of a churn connection.
const MAX_CHURN: usize = 2048;
/// When the first bulk transfer starts: early, so that the warm-up already holds the agents'
/// buffers at their peak and the baseline is not taken below it.
const FIRST_BULK: Duration = Duration::from_secs(2);
/// The longest a stopping thread sleeps before it looks at the stop flag again.
const STOP_POLL: Duration = Duration::from_millis(100);
/// More bytes than any trailer after a bulk echo: the server sent something else.
const MAX_TRAILER: usize = 1024;

/// One destination and the traffic it gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Its name in reports (`mtls`, `shortcut`, ...).
    pub name: String,
    /// Where the worker connects.
    pub addr: SocketAddr,
    /// What the server there speaks.
    pub wire: Wire,
    /// Connections kept open for the whole run.
    pub long_lived: usize,
    /// Pause between two requests on each long-lived connection, in milliseconds.
    pub interval_ms: u64,
    /// New short connections per second, each carrying one request.
    pub churn_per_s: f64,
    /// Bytes of each bulk transfer (rounded up to 64 KiB over the echo); 0 for none.
    pub bulk_bytes: u64,
    /// Seconds between the starts of two bulk transfers.
    pub bulk_every_s: u64,
}

/// What the load saw on one target so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStats {
    /// The target's name.
    pub name: String,
    /// Connections established.
    pub connections: u64,
    /// Requests answered correctly (on long-lived and churn connections).
    pub requests: u64,
    /// Bulk transfers completed.
    pub bulk_transfers: u64,
    /// Payload bytes that came back intact.
    pub bytes: u64,
    /// Connects that failed or timed out.
    pub connect_failures: u64,
    /// Established connections that broke: a reset, a stall, an early close, a broken response.
    pub broken: u64,
    /// Answers that differ from what was sent: bytes, length, the trailer's count, the status.
    pub mismatches: u64,
    /// The slowest request on a long-lived connection, in milliseconds.
    pub max_latency_ms: f64,
    /// The first error messages, each with when it happened.
    pub messages: Vec<String>,
}

impl TargetStats {
    /// Errors of every kind.
    pub fn errors(&self) -> u64 {
        self.connect_failures + self.broken + self.mismatches
    }
}

/// One report of a worker (a line of its stdout): cumulative counters, one entry per target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Seconds since the load started.
    pub elapsed_s: f64,
    /// Whether the load stopped and every connection finished: the last report.
    pub done: bool,
    /// One per target, in the plan's order.
    pub targets: Vec<TargetStats>,
}

/// Why one connection or request failed.
#[derive(Debug)]
enum Fault {
    /// The connect failed.
    Connect(String),
    /// The connection broke after it was established.
    Broken(String),
    /// The answer was wrong.
    Mismatch(String),
}

/// A [`Fault::Broken`] maker for an I/O step, for `map_err`.
fn broken(step: &'static str) -> impl FnOnce(std::io::Error) -> Fault {
    move |e| Fault::Broken(format!("{step}: {e}"))
}

/// What every load thread of one target shares.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    target: &'a Target,
    stats: &'a Mutex<TargetStats>,
    stop: &'a AtomicBool,
    start: Instant,
}

impl Ctx<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn record(&self, f: impl FnOnce(&mut TargetStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn fail(&self, fault: Fault, what: &str) {
        let at = self.start.elapsed().as_secs_f64();
        self.record(|s| {
            let (kind, detail) = match fault {
                Fault::Connect(d) => (&mut s.connect_failures, d),
                Fault::Broken(d) => (&mut s.broken, d),
                Fault::Mismatch(d) => (&mut s.mismatches, d),
            };
            *kind += 1;
            if s.messages.len() < MAX_MESSAGES {
                s.messages.push(format!("at {at:.1} s, {what}: {detail}"));
            }
        });
    }

    /// A new connection to the target, counted once established.
    fn dial(&self) -> Result<TcpStream, Fault> {
        let addr = self.target.addr;
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| Fault::Connect(format!("connect to {addr}: {e}")))?;
        self.record(|s| s.connections += 1);
        stream.set_nodelay(true).map_err(broken("set TCP_NODELAY"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(broken("set the read timeout"))?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(broken("set the write timeout"))?;
        Ok(stream)
    }

    /// A seed for one activity of this target, so each connection sends its own bytes.
    fn seed(&self, activity: u64, n: u64) -> u64 {
        let name = self
            .target
            .name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        name ^ activity.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n.rotate_left(32)
    }
}

/// Sleeps until `until` unless stopped first; whether the load is still running.
fn pause(stop: &AtomicBool, until: Instant) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(STOP_POLL));
    }
}

/// The next due time of a paced activity; after a slow step it starts afresh from now rather than
/// bursting to catch up (a burst would be a different load from the one asked for).
fn next_due(due: Instant, every: Duration) -> Instant {
    (due + every).max(Instant::now())
}

/// Where `a` and `b` first differ (a length difference counts, at the shorter length).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Runs the load on every target until `stop` is set, calling `report` every `every` with the
/// counters so far; then lets every connection finish cleanly and returns (and reports) the last
/// counters, `done` set.
pub fn run(
    targets: &[Target],
    stop: &AtomicBool,
    every: Duration,
    mut report: impl FnMut(&Progress),
) -> Progress {
    let start = Instant::now();
    let stats: Vec<Mutex<TargetStats>> = targets
        .iter()
        .map(|t| Mutex::new(TargetStats { name: t.name.clone(), ..TargetStats::default() }))
        .collect();
    let snapshot = |done: bool| Progress {
        elapsed_s: start.elapsed().as_secs_f64(),
        done,
        targets: stats.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect(),
    };
    std::thread::scope(|scope| {
        for (target, stats) in targets.iter().zip(&stats) {
            let ctx = Ctx { target, stats, stop, start };
            for i in 0..target.long_lived {
                scope.spawn(move || long_lived(ctx, i as u64));
            }
            if target.churn_per_s > 0.0 {
                scope.spawn(move || churn(ctx));
            }
            if target.bulk_bytes > 0 {
                scope.spawn(move || bulk(ctx));
            }
        }
        let mut due = start + every;
        while pause(stop, due) {
            report(&snapshot(false));
            due = next_due(due, every);
        }
    });
    let last = snapshot(true);
    report(&last);
    last
}

/// One long-lived connection's thread: a session until the stop, reconnecting after a failure.
fn long_lived(ctx: Ctx, i: u64) {
    let mut rng = fastrand::Rng::with_seed(ctx.seed(1, i));
    while !ctx.stopped() {
        let session = match ctx.target.wire {
            Wire::Echo => echo_session(ctx, &mut rng),
            Wire::Http => http_session(ctx, &mut rng),
        };
        if let Err(fault) = session {
            ctx.fail(fault, &format!("long-lived connection {i}"));
            pause(ctx.stop, Instant::now() + RECONNECT_PAUSE);
        }
    }
}

/// Request/response over one echo connection until the stop; then half-closes and checks the
/// server counted every byte.
fn echo_session(ctx: Ctx, rng: &mut fastrand::Rng) -> Result<(), Fault> {
    let mut stream = ctx.dial()?;
    let every = Duration::from_millis(ctx.target.interval_ms);
    let (mut request, mut echo) = (Vec::new(), Vec::new());
    let (mut sent, mut n) = (0u64, 0u64);
    let mut due = Instant::now();
    while pause(ctx.stop, due) {
        request.resize(rng.usize(1..=MAX_REQUEST), 0);
        rng.fill(&mut request);
        let began = Instant::now();
        stream.write_all(&request).map_err(broken("send a request"))?;
        echo.resize(request.len(), 0);
        stream.read_exact(&mut echo).map_err(broken("receive the echo"))?;
        if let Some(at) = first_difference(&request, &echo) {
            return Err(Fault::Mismatch(format!("request {n}: the echo differs at byte {at}")));
        }
        let ms = began.elapsed().as_secs_f64() * 1e3;
        sent += request.len() as u64;
        n += 1;
        ctx.record(|s| {
            s.requests += 1;
            s.bytes += request.len() as u64;
            s.max_latency_ms = s.max_latency_ms.max(ms);
        });
        due = next_due(due, every);
    }
    stream.shutdown(Shutdown::Write).map_err(broken("half-close"))?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).map_err(broken("read the trailer"))?;
    let trailer = Trailer::parse(&rest).map_err(|e| Fault::Mismatch(format!("{e:#}")))?;
    if trailer.bytes != sent {
        return Err(Fault::Mismatch(format!("the server counted {} bytes, {sent} were sent", trailer.bytes)));
    }
    Ok(())
}

/// POSTs one after another on one keep-alive HTTP connection until the stop; then closes it.
fn http_session(ctx: Ctx, rng: &mut fastrand::Rng) -> Result<(), Fault> {
    let mut conn = HttpConn::new(ctx.dial()?, ctx.target.addr);
    let every = Duration::from_millis(ctx.target.interval_ms);
    let (mut body, mut response) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    let mut due = Instant::now();
    while pause(ctx.stop, due) {
        body.resize(rng.usize(1..=MAX_REQUEST), 0);
        rng.fill(&mut body);
        let began = Instant::now();
        http_exchange(&mut conn, &body, &mut response).map_err(|f| in_request(f, n))?;
        let ms = began.elapsed().as_secs_f64() * 1e3;
        n += 1;
        ctx.record(|s| {
            s.requests += 1;
            s.bytes += body.len() as u64;
            s.max_latency_ms = s.max_latency_ms.max(ms);
        });
        due = next_due(due, every);
    }
    close_http(conn)
}

/// Names the request in a fault's message.
fn in_request(fault: Fault, n: u64) -> Fault {
    match fault {
        Fault::Connect(d) => Fault::Connect(d),
        Fault::Broken(d) => Fault::Broken(format!("request {n}: {d}")),
        Fault::Mismatch(d) => Fault::Mismatch(format!("request {n}: {d}")),
    }
}

/// One POST of `body` and its checked echo; the connection must stay open.
fn http_exchange(conn: &mut HttpConn, body: &[u8], response: &mut Vec<u8>) -> Result<(), Fault> {
    let request = conn.request(body);
    let head = conn.exchange(&request, response).map_err(|e| Fault::Broken(format!("{e:#}")))?;
    head.expect_echo(body, response).map_err(|e| Fault::Mismatch(format!("{e:#}")))?;
    if head.close {
        return Err(Fault::Broken("the server closed the keep-alive connection".into()));
    }
    Ok(())
}

/// Half-closes an HTTP connection and reads to the server's close: nothing may come after the
/// last response.
fn close_http(conn: HttpConn) -> Result<(), Fault> {
    let mut stream = conn.into_stream();
    stream.shutdown(Shutdown::Write).map_err(broken("half-close"))?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).map_err(broken("read to the close"))?;
    if !rest.is_empty() {
        return Err(Fault::Mismatch(format!("{} bytes after the last response", rest.len())));
    }
    Ok(())
}

/// The churn thread: one short connection after another at the target's rate.
fn churn(ctx: Ctx) {
    let every = Duration::from_secs_f64(1.0 / ctx.target.churn_per_s);
    let mut rng = fastrand::Rng::with_seed(ctx.seed(2, 0));
    let mut n = 0u64;
    let mut due = Instant::now();
    while pause(ctx.stop, due) {
        let mut payload = vec![0u8; rng.usize(1..=MAX_CHURN)];
        rng.fill(&mut payload);
        let outcome = match ctx.target.wire {
            Wire::Echo => churn_echo(ctx, &payload),
            Wire::Http => churn_http(ctx, &payload),
        };
        match outcome {
            Ok(()) => ctx.record(|s| {
                s.requests += 1;
                s.bytes += payload.len() as u64;
            }),
            Err(fault) => ctx.fail(fault, &format!("churn connection {n}")),
        }
        n += 1;
        due = next_due(due, every);
    }
}

/// One echo connection: the payload, a half-close, the echo and the trailer.
fn churn_echo(ctx: Ctx, payload: &[u8]) -> Result<(), Fault> {
    let mut stream = ctx.dial()?;
    stream.write_all(payload).map_err(broken("send"))?;
    stream.shutdown(Shutdown::Write).map_err(broken("half-close"))?;
    let mut received = Vec::with_capacity(payload.len() + 128);
    stream.read_to_end(&mut received).map_err(broken("receive the echo"))?;
    verify_echo(payload, &received).map_err(|e| Fault::Mismatch(format!("{e:#}")))?;
    Ok(())
}

/// One HTTP connection: one POST and its echo, then the close.
fn churn_http(ctx: Ctx, payload: &[u8]) -> Result<(), Fault> {
    let mut conn = HttpConn::new(ctx.dial()?, ctx.target.addr);
    http_exchange(&mut conn, payload, &mut Vec::new())?;
    close_http(conn)
}

/// The bulk thread: a transfer every `bulk_every_s`, the first soon after the start.
fn bulk(ctx: Ctx) {
    let every = Duration::from_secs(ctx.target.bulk_every_s.max(1));
    let mut n = 0u64;
    let mut due = ctx.start + FIRST_BULK;
    while pause(ctx.stop, due) {
        let seed = ctx.seed(3, n);
        let outcome = match ctx.target.wire {
            Wire::Echo => bulk_echo(ctx, seed),
            Wire::Http => bulk_http(ctx, seed),
        };
        match outcome {
            Ok(bytes) => ctx.record(|s| {
                s.bulk_transfers += 1;
                s.bytes += bytes;
            }),
            Err(fault) => ctx.fail(fault, &format!("bulk transfer {n}")),
        }
        n += 1;
        due = next_due(due, every);
    }
}

/// A deterministic byte stream in blocks of [`BULK_BLOCK`], so the reader can check what the
/// writer sent however the reads split it (both draw whole blocks from the same seed).
struct Pattern {
    rng: fastrand::Rng,
    block: Vec<u8>,
    /// Bytes of `block` already compared.
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Self { rng: fastrand::Rng::with_seed(seed), block: vec![0; BULK_BLOCK], used: BULK_BLOCK }
    }

    /// The next whole block, for the writer.
    fn next_block(&mut self) -> &[u8] {
        self.rng.fill(&mut self.block);
        self.used = BULK_BLOCK;
        &self.block
    }

    /// Compares `data` with the stream's next bytes, for the reader; where it first differs.
    fn check(&mut self, data: &[u8]) -> Option<usize> {
        let mut at = 0;
        while at < data.len() {
            if self.used == BULK_BLOCK {
                self.rng.fill(&mut self.block);
                self.used = 0;
            }
            let n = (BULK_BLOCK - self.used).min(data.len() - at);
            if let Some(i) = first_difference(&self.block[self.used..self.used + n], &data[at..at + n]) {
                return Some(at + i);
            }
            self.used += n;
            at += n;
        }
        None
    }
}

/// Streams the pattern of `seed` to the echo server while reading it back and comparing, then
/// checks the trailer; the bytes moved.
fn bulk_echo(ctx: Ctx, seed: u64) -> Result<u64, Fault> {
    let stream = ctx.dial()?;
    let mut writer = stream.try_clone().map_err(broken("clone the socket"))?;
    let total = ctx.target.bulk_bytes.div_ceil(BULK_BLOCK as u64) * BULK_BLOCK as u64;
    std::thread::scope(|scope| {
        let write = scope.spawn(move || -> Result<(), Fault> {
            let mut pattern = Pattern::new(seed);
            for _ in 0..total / BULK_BLOCK as u64 {
                writer.write_all(pattern.next_block()).map_err(broken("send"))?;
            }
            writer.shutdown(Shutdown::Write).map_err(broken("half-close"))
        });
        let read = read_bulk_echo(&stream, seed, total);
        if read.is_err() {
            // Unblocks a writer stuck on a server that stopped reading.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let written = write.join().unwrap_or_else(|_| Err(Fault::Broken("the writer panicked".into())));
        // The reader's fault explains a writer's broken pipe, so it comes first.
        read.and(written).map(|()| total)
    })
}

/// The reading half of [`bulk_echo`].
fn read_bulk_echo(mut stream: &TcpStream, seed: u64, total: u64) -> Result<(), Fault> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; BULK_BLOCK];
    let (mut echoed, mut tail) = (0u64, Vec::new());
    loop {
        let n = stream.read(&mut buf).map_err(broken("receive the echo"))?;
        if n == 0 {
            break;
        }
        let echo = usize::try_from(total - echoed).unwrap_or(usize::MAX).min(n);
        if let Some(at) = pattern.check(&buf[..echo]) {
            return Err(Fault::Mismatch(format!("the echo differs at byte {}", echoed + at as u64)));
        }
        echoed += echo as u64;
        tail.extend_from_slice(&buf[echo..n]);
        if tail.len() > MAX_TRAILER {
            return Err(Fault::Mismatch(format!("{} bytes more than were sent came back", tail.len())));
        }
    }
    if echoed < total {
        return Err(Fault::Broken(format!("the server closed after {echoed} of {total} bytes")));
    }
    let trailer = Trailer::parse(&tail).map_err(|e| Fault::Mismatch(format!("{e:#}")))?;
    if trailer.bytes != total {
        return Err(Fault::Mismatch(format!(
            "the server counted {} bytes, {total} were sent",
            trailer.bytes
        )));
    }
    Ok(())
}

/// One large POST on a new connection and its checked echo; the bytes moved.
fn bulk_http(ctx: Ctx, seed: u64) -> Result<u64, Fault> {
    let mut body = vec![0u8; usize::try_from(ctx.target.bulk_bytes).unwrap_or(usize::MAX)];
    fastrand::Rng::with_seed(seed).fill(&mut body);
    let mut conn = HttpConn::new(ctx.dial()?, ctx.target.addr);
    http_exchange(&mut conn, &body, &mut Vec::new())?;
    close_http(conn)?;
    Ok(body.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    /// An echo server on loopback that behaves as `ferry-testapp serve` (echo, then a trailer at
    /// the client's EOF); with `corrupt`, it flips one byte of every connection's first read.
    fn echo_server(corrupt: bool) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut received = 0u64;
                    loop {
                        let Ok(n) = s.read(&mut buf) else { return };
                        if n == 0 {
                            break;
                        }
                        if corrupt && received == 0 {
                            buf[0] ^= 0xff;
                        }
                        received += n as u64;
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    let trailer = Trailer { tag: "t".into(), bytes: received, peer: "p".into() };
                    let _ = s.write_all(trailer.to_line().as_bytes());
                });
            }
        });
        addr
    }

    /// A keep-alive HTTP/1.1 server on loopback that answers each POST with its body, as
    /// `ferry-testapp serve --http` does (in the fixed shape [`HttpConn`] reads).
    fn http_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 16 * 1024];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            match s.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nx-ferry-bytes: {len}\r\n\r\n"
                        );
                        if s.write_all(head.as_bytes()).and_then(|()| s.write_all(&body)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn target(addr: SocketAddr, wire: Wire) -> Target {
        Target {
            name: "t".into(),
            addr,
            wire,
            long_lived: 2,
            interval_ms: 20,
            churn_per_s: 50.0,
            bulk_bytes: 300 * 1024,
            bulk_every_s: 1,
        }
    }

    /// Runs `targets` for `secs`, counting the progress reports.
    fn run_for(targets: &[Target], secs: f64) -> (Progress, usize) {
        let stop = AtomicBool::new(false);
        let mut reports = 0;
        let last = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_secs_f64(secs));
                stop.store(true, Ordering::Relaxed);
            });
            run(targets, &stop, Duration::from_millis(200), |_| reports += 1)
        });
        (last, reports)
    }

    #[test]
    fn a_clean_run_counts_everything_and_no_error() {
        let targets = [target(echo_server(false), Wire::Echo), {
            let mut t = target(http_server(), Wire::Http);
            t.name = "h".into();
            t
        }];
        let (last, reports) = run_for(&targets, 3.5);
        assert!(last.done && reports >= 5, "{reports} reports");
        for t in &last.targets {
            assert_eq!(t.errors(), 0, "{t:?}");
            // Two long-lived connections at 50/s each and 50 churn connections/s for 3.5 s.
            assert!(t.requests > 100 && t.connections > 50, "{t:?}");
            assert!(t.bulk_transfers >= 1, "the first transfer starts at 2 s: {t:?}");
            assert!(t.bytes >= 300 * 1024, "{t:?}");
        }
        assert_eq!(last.targets[1].name, "h");
    }

    #[test]
    fn a_corrupting_server_shows_as_mismatches() {
        let (last, _) = run_for(&[target(echo_server(true), Wire::Echo)], 2.5);
        let t = &last.targets[0];
        assert!(t.mismatches > 10 && t.connect_failures == 0, "{t:?}");
        assert!(t.messages.len() == MAX_MESSAGES && t.messages[0].contains("differs"), "{t:?}");
    }

    #[test]
    fn a_closed_port_shows_as_connect_failures() {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
        let (last, _) = run_for(&[target(port, Wire::Echo)], 1.0);
        let t = &last.targets[0];
        assert!(t.connect_failures > 5 && t.connections == 0 && t.requests == 0, "{t:?}");
    }

    #[test]
    fn the_pattern_checks_however_the_reads_split_it() {
        let mut writer = Pattern::new(9);
        let sent: Vec<u8> = (0..3).flat_map(|_| writer.next_block().to_vec()).collect();
        let mut reader = Pattern::new(9);
        for chunk in sent.chunks(10_007) {
            assert_eq!(reader.check(chunk), None);
        }
        let mut reader = Pattern::new(9);
        let mut bad = sent.clone();
        bad[BULK_BLOCK + 5] ^= 1;
        assert_eq!(reader.check(&bad[..BULK_BLOCK]), None);
        assert_eq!(reader.check(&bad[BULK_BLOCK..]), Some(5));
    }

    #[test]
    fn first_difference_counts_length() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"abc", b"ab"), Some(2));
    }
}
