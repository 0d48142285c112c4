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
//!
//! With `--http`, each speaks HTTP/1.1 instead: `serve --http` is a hyper server that answers
//! every request with its body (and `x-ferry-tag`/`x-ferry-peer`/`x-ferry-bytes` headers in place
//! of the trailer), and the clients send POSTs with a Content-Length body on keep-alive
//! connections and read each response by its Content-Length ([`loadgen::HttpConn`]).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ferry_tests::loadgen::{self, HttpConn};
use ferry_tests::testapp::{
    ConnectReport, CrrReport, Latency, Listening, LoadOpts, RrReport, Trailer, Wire, payload, verify_echo,
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, header};
use hyper_util::rt::TokioIo;
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
        /// Serve HTTP/1.1: answer each request with its body and x-ferry-* headers.
        #[arg(long)]
        http: bool,
        /// With --http, the body of the answer to a request without a body.
        #[arg(long, default_value_t = 1024)]
        size: usize,
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
        #[arg(long, conflicts_with = "http")]
        hold_stdin: bool,
        /// Speak HTTP/1.1 to `serve --http`: each connection POSTs --bytes --requests times.
        #[arg(long)]
        http: bool,
        /// With --http, requests per connection, one after another.
        #[arg(long, default_value_t = 1, requires = "http")]
        requests: u32,
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
        /// Speak HTTP/1.1 (256 KiB POSTs, one after another per stream) to `serve --http`.
        #[arg(long)]
        http: bool,
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
    /// Speak HTTP/1.1 to `serve --http` (POSTs of --size bytes on keep-alive connections).
    #[arg(long)]
    http: bool,
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
    /// Speak HTTP/1.1 to `serve --http` (one POST of --size bytes per round trip).
    #[arg(long)]
    http: bool,
}

/// The wire a `--http` flag selects.
fn wire(http: bool) -> Wire {
    if http { Wire::Http } else { Wire::Echo }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve { port, tag, bind, http: false, .. } => {
            runtime().and_then(|rt| rt.block_on(serve(port, tag, bind)))
        }
        Cmd::Serve { port, tag, bind, http: true, size } => {
            runtime().and_then(|rt| rt.block_on(serve_http(port, tag, bind, size)))
        }
        Cmd::Connect { addr, bytes, hold_ms, conns, timeout_ms, hold_stdin, http, requests } => {
            let hold = Hold { ms: hold_ms, until_stdin_eof: hold_stdin };
            let report = if http {
                Ok(connect_http(addr, bytes, hold_ms, conns, requests, timeout_ms))
            } else {
                runtime().map(|rt| rt.block_on(connect(addr, bytes, hold, conns, timeout_ms)))
            };
            report.map(|report| {
                print_json(&report);
                std::process::exit(if report.failed == 0 { 0 } else { 1 });
            })
        }
        Cmd::Rr(Load { addr, size, count, warmup, http }) => {
            rr(wire(http), addr, size, count, warmup).map(|r| print_json(&r))
        }
        Cmd::Crr(Load { addr, size, count, warmup, http }) => {
            crr(wire(http), addr, size, count, warmup).map(|r| print_json(&r))
        }
        Cmd::Load(OpenLoop { addr, rate, conns, duration_ms, size, warmup_ms, http }) => {
            let duration = Duration::from_millis(duration_ms);
            let opts = LoadOpts { rate, conns, duration, size, warmup: Duration::from_millis(warmup_ms) };
            loadgen::open_loop_over(addr, &opts, wire(http)).map(|report| {
                print_json(&report);
                std::process::exit(if report.errors == 0 { 0 } else { 1 });
            })
        }
        Cmd::Bulk { addr, streams, duration_ms, http: true } => {
            loadgen::bulk_http(addr, streams, Duration::from_millis(duration_ms)).map(|r| print_json(&r))
        }
        Cmd::Bulk { addr, streams, duration_ms, http: false } => runtime()
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
    let listener = listen(port, bind)?;
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

/// HTTP/1.1 echo server (hyper, keep-alive): each request is answered with its body, or `size`
/// bytes of payload when it has none, naming the server and the peer it saw in headers.
async fn serve_http(port: u16, tag: String, bind: Option<IpAddr>, size: usize) -> Result<()> {
    serve_http_on(listen(port, bind)?, tag, size).await
}

/// [`serve_http`] on a bound listener.
async fn serve_http_on(listener: TcpListener, tag: String, size: usize) -> Result<()> {
    let tag: Arc<str> = tag.into();
    let fallback = Bytes::from(payload(0, size));
    loop {
        let (stream, peer) = listener.accept().await.context("accept failed")?;
        let _ = stream.set_nodelay(true);
        let peer: Arc<str> = canonical(peer).to_string().into();
        let (tag, fallback) = (tag.clone(), fallback.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                http_echo(request, tag.clone(), peer.clone(), fallback.clone())
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                eprintln!("ferry-testapp serve --http: connection: {e}");
            }
        });
    }
}

/// One answer of [`serve_http`].
async fn http_echo(
    request: Request<Incoming>,
    tag: Arc<str>,
    peer: Arc<str>,
    fallback: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let received = request.into_body().collect().await.map(|b| b.to_bytes());
    let response = match received {
        Ok(body) => {
            let len = body.len();
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header("x-ferry-tag", &*tag)
                .header("x-ferry-peer", &*peer)
                .header("x-ferry-bytes", len)
                .body(Full::new(if body.is_empty() { fallback } else { body }))
        }
        Err(e) => Response::builder().status(400).body(Full::new(Bytes::from(format!("request body: {e}")))),
    };
    Ok(response.expect("static header names and values that are valid"))
}

/// A v4 client of the dual-stack socket shows up as ::ffff:a.b.c.d; this is it as plain v4.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// The listening socket of a server: `[::]:port` dual-stack, or `bind:port`.
fn listen(port: u16, bind: Option<IpAddr>) -> Result<TcpListener> {
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
    Ok(listener)
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
    let peer = canonical(peer);
    let trailer = Trailer { tag: tag.to_owned(), bytes: received, peer: peer.to_string() };
    stream.write_all(trailer.to_line().as_bytes()).await.context("trailer write")?;
    stream.shutdown().await.context("shutdown")?;
    Ok(())
}

/// The outcome of one client connection: its local address (once connected) and the result.
struct ConnOutcome {
    local: Option<SocketAddr>,
    /// What getpeername() said once connected.
    peer: Option<SocketAddr>,
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
                let (mut local, mut peer) = (None, None);
                let limit = Duration::from_millis(timeout_ms);
                let conn = one_conn(addr, i as u64, bytes, hold.ms, released, &mut local, &mut peer);
                let result = match tokio::time::timeout(limit, conn).await {
                    Ok(result) => result,
                    Err(_) => Err(anyhow::anyhow!("timed out after {timeout_ms} ms")),
                };
                ConnOutcome { local, peer, result }
            })
        })
        .collect();
    let mut report = ConnectReport::default();
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = match task.await {
            Ok(outcome) => outcome,
            Err(e) => {
                ConnOutcome { local: None, peer: None, result: Err(anyhow::anyhow!("task failed: {e}")) }
            }
        };
        if let Some(local) = outcome.local {
            report.local_addrs.push(local.to_string());
        }
        if let Some(peer) = outcome.peer {
            report.peer_addrs.push(peer.to_string());
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
    peer: &mut Option<SocketAddr>,
) -> Result<Trailer> {
    let stream = TcpStream::connect(addr).await.context("connect")?;
    *local = Some(stream.local_addr()?);
    *peer = Some(stream.peer_addr()?);
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

/// Round trips on one blocking connection: write `size` bytes, read exactly `size` back (over
/// HTTP: one POST of `size` bytes and its echoed body).
fn rr(wire: Wire, addr: SocketAddr, size: usize, count: u64, warmup: u64) -> Result<RrReport> {
    let mut stream = dial(addr)?;
    let request = payload(0, size);
    let mut http = (wire == Wire::Http).then(|| {
        let conn = HttpConn::new(stream.try_clone().expect("cloning a socket"), addr);
        let whole = conn.request(&request);
        (conn, whole, Vec::new())
    });
    let mut response = vec![0u8; size];
    let mut samples = Vec::with_capacity(count as usize);
    for i in 0..warmup + count {
        let start = Instant::now();
        match &mut http {
            None => {
                stream.write_all(&request).context("send")?;
                stream.read_exact(&mut response).with_context(|| format!("receive (round trip {i})"))?;
                anyhow::ensure!(response == request, "round trip {i}: the echo differs from the request");
            }
            Some((conn, whole, body)) => {
                let head = conn.exchange(whole, body).with_context(|| format!("round trip {i}"))?;
                head.expect_echo(&request, body).with_context(|| format!("round trip {i}"))?;
            }
        }
        let elapsed = start.elapsed();
        if i >= warmup {
            samples.push(elapsed.as_secs_f64() * 1e6);
        }
    }
    // Let the server finish its trailer rather than hitting a reset.
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    Ok(RrReport::new(samples.len() as u64, Latency::of(samples)))
}

/// A blocking connection to `addr` with Nagle off and I/O timeouts, as the measuring clients use.
fn dial(addr: SocketAddr) -> Result<std::net::TcpStream> {
    loadgen::dial(addr)
}

/// [`connect`] over HTTP/1.1: `conns` connections at once, each POSTing `bytes` `requests` times
/// one after another (then holding `hold_ms`) and closing; every response must echo its request.
/// Tags and peers are counted per response.
fn connect_http(
    addr: SocketAddr,
    bytes: usize,
    hold_ms: u64,
    conns: usize,
    requests: u32,
    timeout_ms: u64,
) -> ConnectReport {
    let outcomes: Vec<(Option<SocketAddr>, Result<Vec<loadgen::HttpHead>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                scope.spawn(move || {
                    let mut local = None;
                    let result =
                        http_conn_once(addr, i as u64, bytes, hold_ms, requests, timeout_ms, &mut local);
                    (local, result)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| (None, Err(anyhow::anyhow!("connection thread panicked")))))
            .collect()
    });
    let mut report = ConnectReport::default();
    for (i, (local, result)) in outcomes.into_iter().enumerate() {
        if let Some(local) = local {
            report.local_addrs.push(local.to_string());
        }
        match result {
            Ok(heads) => {
                report.ok += 1;
                for head in heads {
                    report.bytes_echoed += bytes as u64;
                    *report.tags.entry(head.tag.unwrap_or_default()).or_default() += 1;
                    report.peers_seen_by_server.push(head.peer.unwrap_or_default());
                }
            }
            Err(e) => {
                report.failed += 1;
                if report.errors.len() < 5 {
                    let local = local.map(|l| format!(" from {l}")).unwrap_or_default();
                    report.errors.push(format!("conn {i}{local} to {addr}: {e:#}"));
                }
            }
        }
    }
    report
}

/// One connection of [`connect_http`]: the response heads, in order.
fn http_conn_once(
    addr: SocketAddr,
    conn: u64,
    bytes: usize,
    hold_ms: u64,
    requests: u32,
    timeout_ms: u64,
    local: &mut Option<SocketAddr>,
) -> Result<Vec<loadgen::HttpHead>> {
    let limit = Duration::from_millis(timeout_ms);
    let stream = std::net::TcpStream::connect_timeout(&addr, limit).context("connect")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    *local = Some(stream.local_addr()?);
    let mut http = HttpConn::new(stream, addr);
    let sent = payload(conn, bytes);
    let request = http.request(&sent);
    let mut body = Vec::new();
    let mut heads = Vec::new();
    for r in 0..requests {
        let head = http.exchange(&request, &mut body).with_context(|| format!("request {r}"))?;
        head.expect_echo(&sent, &body).with_context(|| format!("request {r}"))?;
        heads.push(head);
    }
    std::thread::sleep(Duration::from_millis(hold_ms));
    let mut stream = http.into_stream();
    stream.shutdown(std::net::Shutdown::Write).context("half-close")?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).context("receive the close")?;
    anyhow::ensure!(rest.is_empty(), "{} bytes after the last response", rest.len());
    Ok(heads)
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
fn crr(wire: Wire, addr: SocketAddr, size: usize, count: u64, warmup: u64) -> Result<CrrReport> {
    let request = payload(0, size);
    let (mut connect, mut first_response, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let (mut local_ips, mut peer_ips) = (BTreeSet::new(), BTreeSet::new());
    let mut measured_since = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            measured_since = Instant::now();
        }
        let sample = match wire {
            Wire::Echo => crr_once(addr, &request),
            Wire::Http => crr_once_http(addr, &request),
        };
        let sample = sample.with_context(|| format!("connection {i} to {addr}"))?;
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

/// One `crr` connection over HTTP: connect, one POST and its response, half-close, read the
/// server's close. The "trailer" is made of the response's `x-ferry-*` headers.
fn crr_once_http(addr: SocketAddr, request: &[u8]) -> Result<CrrSample> {
    let start = Instant::now();
    let micros = |since: Instant| since.duration_since(start).as_secs_f64() * 1e6;
    let stream = dial(addr)?;
    let connected = Instant::now();
    let local = stream.local_addr()?;
    let mut http = HttpConn::new(stream, addr);
    let whole = http.request(request);
    let mut body = Vec::new();
    let head = http.exchange(&whole, &mut body)?;
    let answered = Instant::now();
    head.expect_echo(request, &body)?;
    let mut stream = http.into_stream();
    stream.shutdown(std::net::Shutdown::Write).context("half-close")?;
    stream.read_to_end(&mut body).context("receive the close")?;
    let closed = Instant::now();
    let trailer = Trailer {
        tag: head.tag.unwrap_or_default(),
        bytes: head.received.unwrap_or_default(),
        peer: head.peer.unwrap_or_default(),
    };
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
        let r = crr(Wire::Echo, addr, 1024, 5, 2).unwrap();
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
        let e = crr(Wire::Echo, addr, 100, 1, 0).unwrap_err();
        assert!(format!("{e:#}").contains("connection 0"), "{e:#}");
        assert!(format!("{e:#}").contains("echo differs at byte 0"), "{e:#}");
    }

    /// `serve --http` on a loopback port, on a runtime of its own thread.
    fn http_server() -> SocketAddr {
        let rt = runtime().unwrap();
        let listener = rt.block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || rt.block_on(serve_http_on(listener, "h".into(), 1024)));
        addr
    }

    #[test]
    fn every_client_speaks_http_to_the_http_server() {
        let addr = http_server();
        let r = rr(Wire::Http, addr, 1024, 50, 5).unwrap();
        assert_eq!(r.count, 50);
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
        let c = crr(Wire::Http, addr, 1024, 5, 1).unwrap();
        assert_eq!((c.count, c.peer_ips_seen_by_server.as_slice()), (5, ["127.0.0.1".to_owned()].as_slice()));
        let report = connect_http(addr, 1024, 0, 3, 4, 5_000);
        assert_eq!((report.ok, report.failed, report.bytes_echoed), (3, 0, 3 * 4 * 1024), "{report:?}");
        assert_eq!(report.tags.get("h"), Some(&12), "tags count responses: {report:?}");
        assert!(report.peers_seen_by_server.iter().all(|p| p.starts_with("127.0.0.1:")), "{report:?}");
        let opts = LoadOpts {
            rate: 400.0,
            conns: 4,
            duration: Duration::from_millis(300),
            size: 1024,
            warmup: Duration::from_millis(50),
        };
        let load = loadgen::open_loop_over(addr, &opts, Wire::Http).unwrap();
        assert_eq!((load.requests, load.errors), (120, 0), "{load:?}");
        let bulk = loadgen::bulk_http(addr, 2, Duration::from_millis(200)).unwrap();
        assert!(bulk.bytes > 0 && bulk.bytes.is_multiple_of(256 * 1024), "{bulk:?}");
    }

    #[test]
    fn the_echo_client_fails_against_the_http_server_and_back() {
        let addr = http_server();
        // Raw bytes are not a request: hyper answers 400 and closes, which is no echo.
        assert!(rr(Wire::Echo, addr, 64, 1, 0).is_err());
        let echo = echo_server(1, false);
        assert!(rr(Wire::Http, echo, 64, 1, 0).is_err(), "an echo of the request is no response");
    }

    #[test]
    fn crr_without_connections_reports_zero_rate() {
        let r = crr(Wire::Echo, echo_server(0, false), 10, 0, 0).unwrap();
        assert_eq!((r.count, r.conns_per_s, r.elapsed_s), (0, 0.0, 0.0));
        assert!(r.local_ips.is_empty());
    }
}
