//! `ferry-testapp`: the workload of the end-to-end tests. Every subcommand prints one JSON line.
//!
//! - `serve`: a dual-stack TCP echo server that ends each connection with a trailer naming its tag,
//!   the bytes it received and the peer it saw.
//! - `connect`: concurrent connections that send a payload, check the echo and read the trailer.
//! - `rr`: request/response round trips on one connection, reporting latency percentiles.
//! - `crr`: one connection per request/response, one after another, reporting the connection rate
//!   and latency percentiles.
//! - `load`: open-loop requests at a fixed rate over persistent connections, latency measured
//!   from each request's intended send time (coordinated omission corrected).
//! - `bulk`: streams writing to the echo server while reading it back, reporting throughput.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ferry_tests::loadgen;
use ferry_tests::testapp::{
    ConnectReport, CrrReport, Latency, Listening, LoadOpts, RrReport, Trailer, payload, verify_echo,
};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Command line.
#[derive(Parser)]
#[command(about = "Ferry's end-to-end test workload")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server with a trailer after the client half-closes.
    Serve {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
        /// Name written in each trailer.
        #[arg(long, default_value = "server")]
        tag: String,
        /// Address to bind (default: [::], dual-stack).
        #[arg(long)]
        bind: Option<IpAddr>,
    },
    /// Concurrent echo clients.
    Connect {
        /// Server address, such as 10.96.0.10:80 or [fd00::1]:80.
        addr: SocketAddr,
        /// Payload bytes per connection.
        #[arg(long)]
        bytes: usize,
        /// Keep each connection open this long after sending, before half-closing.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Per-connection timeout.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// After sending (and --hold-ms), keep every connection open until standard input reaches
        /// end of file: the caller decides when they half-close, not a timer.
        #[arg(long)]
        hold_stdin: bool,
    },
    /// Request/response round trips on one connection to an echo server.
    Rr(Load),
    /// Sequential connections to an echo server: connect, one request and its echo, close.
    Crr(Load),
    /// Open-loop requests at a fixed total rate over persistent connections to an echo server.
    Load(OpenLoop),
    /// Throughput: streams writing to an echo server while reading the echo back.
    Bulk {
        /// Server address.
        addr: SocketAddr,
        /// Concurrent streams.
        #[arg(long, default_value_t = 8)]
        streams: usize,
        /// Measured time.
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
    },
}

/// What the open-loop client does.
#[derive(Args)]
struct OpenLoop {
    /// Server address.
    addr: SocketAddr,
    /// Total requests per second over all connections.
    #[arg(long)]
    rate: f64,
    /// Persistent connections; requests go round-robin over them.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Measured time.
    #[arg(long, default_value_t = 10_000)]
    duration_ms: u64,
    /// Bytes per request (and response).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Unmeasured time first, at the same rate.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
}

/// What a measuring client does.
#[derive(Args)]
struct Load {
    /// Server address.
    addr: SocketAddr,
    /// Bytes per request (and response).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Measured round trips (rr) or connections (crr).
    #[arg(long)]
    count: u64,
    /// Unmeasured ones first.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve { port, tag, bind } => runtime().and_then(|rt| rt.block_on(serve(port, tag, bind))),
        Cmd::Connect { addr, bytes, hold_ms, conns, timeout_ms, hold_stdin } => {
            let hold = Hold { ms: hold_ms, until_stdin_eof: hold_stdin };
            runtime().map(|rt| rt.block_on(connect(addr, bytes, hold, conns, timeout_ms))).map(|report| {
                print_json(&report);
                std::process::exit(if report.failed == 0 { 0 } else { 1 });
            })
        }
        Cmd::Rr(Load { addr, size, count, warmup }) => rr(addr, size, count, warmup).map(|r| print_json(&r)),
        Cmd::Crr(Load { addr, size, count, warmup }) => {
            crr(addr, size, count, warmup).map(|r| print_json(&r))
        }
        Cmd::Load(OpenLoop { addr, rate, conns, duration_ms, size, warmup_ms }) => {
            let duration = Duration::from_millis(duration_ms);
            let opts = LoadOpts { rate, conns, duration, size, warmup: Duration::from_millis(warmup_ms) };
            loadgen::open_loop(addr, &opts).map(|report| {
                print_json(&report);
                std::process::exit(if report.errors == 0 { 0 } else { 1 });
            })
        }
        Cmd::Bulk { addr, streams, duration_ms } => runtime()
            .and_then(|rt| rt.block_on(loadgen::bulk(addr, streams, Duration::from_millis(duration_ms))))
            .map(|r| print_json(&r)),
    };
    if let Err(e) = result {
        print_json(&json!({ "error": format!("{e:#}") }));
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

fn print_json(value: &impl serde::Serialize) {
    let line = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Echo server: echoes every byte as it arrives, then writes the trailer at the client's EOF.
async fn serve(port: u16, tag: String, bind: Option<IpAddr>) -> Result<()> {
    let addr = SocketAddr::new(bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), port);
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
        .context("cannot create the listening socket")?;
    if bind.is_none() {
        socket.set_only_v6(false).context("cannot make the socket dual-stack")?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).with_context(|| format!("cannot bind {addr}"))?;
    socket.listen(1024).with_context(|| format!("cannot listen on {addr}"))?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(socket.into())?;
    print_json(&Listening { listening: listener.local_addr()?.to_string() });
    loop {
        let (stream, peer) = listener.accept().await.context("accept failed")?;
        let tag = tag.clone();
        tokio::spawn(async move {
            if let Err(e) = echo(stream, peer, &tag).await {
                eprintln!("ferry-testapp serve: connection from {peer}: {e:#}");
            }
        });
    }
}

async fn echo(mut stream: TcpStream, peer: SocketAddr, tag: &str) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        let n = stream.read(&mut buf).await.context("read")?;
        if n == 0 {
            break;
        }
        received += n as u64;
        stream.write_all(&buf[..n]).await.context("echo write")?;
    }
    // A v4 client of the dual-stack socket shows up as ::ffff:a.b.c.d; report it as plain v4.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let trailer = Trailer { tag: tag.to_owned(), bytes: received, peer: peer.to_string() };
    stream.write_all(trailer.to_line().as_bytes()).await.context("trailer write")?;
    stream.shutdown().await.context("shutdown")?;
    Ok(())
}

/// The outcome of one client connection: its local address (once connected) and the result.
struct ConnOutcome {
    local: Option<SocketAddr>,
    result: Result<Trailer>,
}

/// How long each connection stays open after sending, before half-closing.
#[derive(Clone, Copy)]
struct Hold {
    /// At least this long.
    ms: u64,
    /// And then until standard input reaches end of file.
    until_stdin_eof: bool,
}

/// A flag that turns true once standard input reached end of file (or failed).
fn stdin_released() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(true);
    });
    rx
}

async fn connect(addr: SocketAddr, bytes: usize, hold: Hold, conns: usize, timeout_ms: u64) -> ConnectReport {
    let released = hold.until_stdin_eof.then(stdin_released);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let released = released.clone();
            tokio::spawn(async move {
                let mut local = None;
                let limit = Duration::from_millis(timeout_ms);
                let conn = one_conn(addr, i as u64, bytes, hold.ms, released, &mut local);
                let result = match tokio::time::timeout(limit, conn).await {
                    Ok(result) => result,
                    Err(_) => Err(anyhow::anyhow!("timed out after {timeout_ms} ms")),
                };
                ConnOutcome { local, result }
            })
        })
        .collect();
    let mut report = ConnectReport::default();
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = match task.await {
            Ok(outcome) => outcome,
            Err(e) => ConnOutcome { local: None, result: Err(anyhow::anyhow!("task failed: {e}")) },
        };
        if let Some(local) = outcome.local {
            report.local_addrs.push(local.to_string());
        }
        match outcome.result {
            Ok(trailer) => {
                report.ok += 1;
                report.bytes_echoed += trailer.bytes;
                *report.tags.entry(trailer.tag).or_default() += 1;
                report.peers_seen_by_server.push(trailer.peer);
            }
            Err(e) => {
                report.failed += 1;
                if report.errors.len() < 5 {
                    let local = outcome.local.map(|l| format!(" from {l}")).unwrap_or_default();
                    report.errors.push(format!("conn {i}{local} to {addr}: {e:#}"));
                }
            }
        }
    }
    report
}

/// Sends the payload while reading the echo, holds (`hold_ms`, then until `released` turns true
/// when given), half-closes, reads to EOF and checks everything.
async fn one_conn(
    addr: SocketAddr,
    conn: u64,
    bytes: usize,
    hold_ms: u64,
    released: Option<tokio::sync::watch::Receiver<bool>>,
    local: &mut Option<SocketAddr>,
) -> Result<Trailer> {
    let stream = TcpStream::connect(addr).await.context("connect")?;
    *local = Some(stream.local_addr()?);
    let sent = payload(conn, bytes);
    let (mut reader, mut writer) = stream.into_split();
    let write = async {
        writer.write_all(&sent).await.context("send")?;
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        if let Some(mut released) = released {
            // An error means the reader thread is gone, which also ends the hold.
            let _ = released.wait_for(|r| *r).await;
        }
        writer.shutdown().await.context("half-close")
    };
    let read = async {
        let mut received = Vec::with_capacity(bytes + 128);
        reader.read_to_end(&mut received).await.context("receive")?;
        Ok::<_, anyhow::Error>(received)
    };
    let (written, received) = tokio::join!(write, read);
    let received = received?;
    written?;
    verify_echo(&sent, &received)
}

/// Round trips on one blocking connection: write `size` bytes, read exactly `size` back.
fn rr(addr: SocketAddr, size: usize, count: u64, warmup: u64) -> Result<RrReport> {
    let mut stream = dial(addr)?;
    let request = payload(0, size);
    let mut response = vec![0u8; size];
    let mut samples = Vec::with_capacity(count as usize);
    for i in 0..warmup + count {
        let start = Instant::now();
        stream.write_all(&request).context("send")?;
        stream.read_exact(&mut response).with_context(|| format!("receive (round trip {i})"))?;
        let elapsed = start.elapsed();
        anyhow::ensure!(response == request, "round trip {i}: the echo differs from the request");
        if i >= warmup {
            samples.push(elapsed.as_secs_f64() * 1e6);
        }
    }
    // Let the server finish its trailer rather than hitting a reset.
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    Ok(RrReport::new(samples.len() as u64, Latency::of(samples)))
}

/// A blocking connection to `addr` with Nagle off and a read timeout, as both measuring clients use.
fn dial(addr: SocketAddr) -> Result<std::net::TcpStream> {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// The timings of one `crr` connection, in microseconds from the start of `connect()`.
struct CrrSample {
    connect_us: f64,
    first_response_us: f64,
    total_us: f64,
    local: SocketAddr,
    trailer: Trailer,
}

/// Sequential connections, each: connect, send `size` bytes, read their echo, half-close, read the
/// server's trailer up to its close. The client closes first, like an HTTP/1.0 client would.
fn crr(addr: SocketAddr, size: usize, count: u64, warmup: u64) -> Result<CrrReport> {
    let request = payload(0, size);
    let (mut connect, mut first_response, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let (mut local_ips, mut peer_ips) = (BTreeSet::new(), BTreeSet::new());
    let mut measured_since = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            measured_since = Instant::now();
        }
        let sample = crr_once(addr, &request).with_context(|| format!("connection {i} to {addr}"))?;
        local_ips.insert(sample.local.ip().to_canonical().to_string());
        // The trailer names the peer as the server saw it; keep just its IP.
        let peer = sample.trailer.peer.parse::<SocketAddr>().map(|a| a.ip().to_string());
        peer_ips.insert(peer.unwrap_or(sample.trailer.peer));
        if i >= warmup {
            connect.push(sample.connect_us);
            first_response.push(sample.first_response_us);
            total.push(sample.total_us);
        }
    }
    let elapsed_s = if count == 0 { 0.0 } else { measured_since.elapsed().as_secs_f64() };
    Ok(CrrReport {
        count,
        elapsed_s,
        conns_per_s: if elapsed_s > 0.0 { count as f64 / elapsed_s } else { 0.0 },
        connect: Latency::of(connect),
        first_response: Latency::of(first_response),
        total: Latency::of(total),
        local_ips: local_ips.into_iter().collect(),
        peer_ips_seen_by_server: peer_ips.into_iter().collect(),
    })
}

fn crr_once(addr: SocketAddr, request: &[u8]) -> Result<CrrSample> {
    let start = Instant::now();
    let micros = |since: Instant| since.duration_since(start).as_secs_f64() * 1e6;
    let mut stream = dial(addr)?;
    let connected = Instant::now();
    let local = stream.local_addr()?;
    stream.write_all(request).context("send")?;
    let mut received = vec![0u8; request.len()];
    stream.read_exact(&mut received).context("receive the echo")?;
    let answered = Instant::now();
    stream.shutdown(std::net::Shutdown::Write).context("half-close")?;
    stream.read_to_end(&mut received).context("receive the trailer")?;
    let closed = Instant::now();
    let trailer = verify_echo(request, &received)?;
    Ok(CrrSample {
        connect_us: micros(connected),
        first_response_us: micros(answered),
        total_us: micros(closed),
        local,
        trailer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener as StdListener};

    /// A blocking echo server on loopback for `conns` connections, like `serve` (echo, then the
    /// trailer at the client's EOF); `corrupt` flips the first echoed byte.
    fn echo_server(conns: usize, corrupt: bool) -> SocketAddr {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..conns {
                let (mut s, peer) = listener.accept().unwrap();
                let mut buf = vec![0u8; 4096];
                let mut received = 0u64;
                loop {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    if corrupt && received == 0 {
                        buf[0] ^= 0xff;
                    }
                    received += n as u64;
                    s.write_all(&buf[..n]).unwrap();
                }
                let trailer = Trailer { tag: "t".into(), bytes: received, peer: peer.to_string() };
                s.write_all(trailer.to_line().as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn crr_measures_each_connection_after_the_warm_up() {
        let addr = echo_server(7, false);
        let r = crr(addr, 1024, 5, 2).unwrap();
        assert_eq!(r.count, 5);
        assert!(r.elapsed_s > 0.0 && r.conns_per_s > 0.0, "{r:?}");
        assert_eq!(r.local_ips, ["127.0.0.1"]);
        assert_eq!(r.peer_ips_seen_by_server, ["127.0.0.1"]);
        // Each connection's phases are nested, so every percentile is ordered too.
        assert!(r.connect.p50_us > 0.0);
        assert!(r.connect.p99_us <= r.first_response.p99_us, "{r:?}");
        assert!(r.first_response.p99_us <= r.total.p99_us, "{r:?}");
        assert!(r.connect.mean_us <= r.first_response.mean_us && r.first_response.mean_us <= r.total.mean_us);
    }

    #[test]
    fn crr_fails_on_a_wrong_echo_naming_the_connection() {
        let addr = echo_server(1, true);
        let e = crr(addr, 100, 1, 0).unwrap_err();
        assert!(format!("{e:#}").contains("connection 0"), "{e:#}");
        assert!(format!("{e:#}").contains("echo differs at byte 0"), "{e:#}");
    }

    #[test]
    fn crr_without_connections_reports_zero_rate() {
        let r = crr(echo_server(0, false), 10, 0, 0).unwrap();
        assert_eq!((r.count, r.conns_per_s, r.elapsed_s), (0, 0.0, 0.0));
        assert!(r.local_ips.is_empty());
    }
}
