//! The measuring clients behind `ferry-testapp load` and `ferry-testapp bulk`, against its echo
//! server.
//!
//! `load` is open loop: request `i` is due at `start + i / rate` whatever happened before, and its
//! latency runs from that intended time to the end of its response. A connection that stalls
//! therefore charges the stall to every request that waited behind it, instead of quietly sending
//! fewer requests (coordinated omission). One blocking thread per connection sleeps until each of
//! its requests is due: a sleeping thread costs nothing, and a fine timer slack keeps its wake-ups
//! within microseconds, where an async runtime's millisecond timer wheel would add up to a
//! millisecond of the client's own lateness to every latency.
//!
//! Both also speak HTTP/1.1 ([`Wire::Http`]) against `ferry-testapp serve --http`: each request is
//! a POST with a Content-Length body on a keep-alive connection, each response is read by its
//! Content-Length ([`HttpConn`]). That fixed shape is all the client parses; anything else in a
//! response (chunked framing, a close, a status other than 200) is a failed request.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::testapp::{BulkReport, LoadOpts, LoadReport, Trailer, Wire, payload};

/// Highest latency the histograms hold, in microseconds (10 minutes); higher ones are clamped.
const MAX_LATENCY_US: u64 = 600_000_000;
/// Significant digits the histograms keep.
const SIGFIGS: u8 = 3;
/// How many failure messages a report keeps.
const MAX_ERROR_MESSAGES: usize = 5;
/// Connect, read and write timeout of each connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Lead between the start of the schedule and the spawning of the connection threads.
const START_LEAD: Duration = Duration::from_millis(20);
/// Bytes per write of a bulk stream.
const BULK_CHUNK: usize = 64 * 1024;
/// Bytes of a bulk stream's end kept to find the trailer in (far longer than any trailer).
const TAIL: usize = 512;
/// How long a bulk stream may take past its window to half-close and drain.
const BULK_DRAIN: Duration = Duration::from_secs(30);
/// Body of each request of an HTTP bulk stream.
const HTTP_BULK_BODY: usize = 256 * 1024;
/// The largest response head the HTTP client reads.
const MAX_HEAD: usize = 16 * 1024;

/// Open-loop requests against the echo server at `addr` (see the module doc). Failed requests are
/// counted in the report (each ends its connection); an error means the run could not start.
pub fn open_loop(addr: SocketAddr, opts: &LoadOpts) -> Result<LoadReport> {
    open_loop_over(addr, opts, Wire::Echo)
}

/// [`open_loop`] speaking `wire`: over HTTP each request is a POST of `opts.size` bytes whose
/// response must echo them.
pub fn open_loop_over(addr: SocketAddr, opts: &LoadOpts, wire: Wire) -> Result<LoadReport> {
    ensure!(opts.rate.is_finite() && opts.rate > 0.0, "rate must be positive, got {}", opts.rate);
    ensure!(opts.conns > 0, "conns must be at least 1");
    ensure!(opts.size > 0, "size must be at least 1 byte");
    let schedule = Schedule::new(opts);
    let streams = (0..opts.conns)
        .map(|c| dial(addr).with_context(|| format!("connection {c}")))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now() + START_LEAD;
    let results: Vec<ConnResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(c, stream)| {
                let schedule = &schedule;
                scope.spawn(move || run_conn(c, Client::new(wire, addr, stream), schedule, start, opts.size))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("connection thread panicked"))))
            .collect::<Result<_>>()
    })?;
    report(&schedule, start, results)
}

/// Which requests there are and when each is due.
struct Schedule {
    rate: f64,
    conns: usize,
    /// Requests in all, warm-up included.
    total: u64,
    /// The first measured request.
    first_measured: u64,
}

impl Schedule {
    fn new(opts: &LoadOpts) -> Self {
        let rate = opts.rate;
        let count = |d: Duration| (d.as_secs_f64() * rate).round() as u64;
        let first_measured = count(opts.warmup);
        Self { rate, conns: opts.conns, total: first_measured + count(opts.duration), first_measured }
    }

    /// When request `i` is due, after `start`.
    fn due(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }
}

/// What one connection's thread measured.
struct ConnResult {
    /// Requests sent, warm-up included.
    sent: u64,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    /// When its last measured response ended.
    last_end: Option<Instant>,
    /// The request that failed and why.
    error: Option<String>,
}

/// One open-loop connection, as its wire speaks: it sends one request and checks its response.
enum Client {
    /// Raw echo: the response is the request's bytes.
    Echo { stream: TcpStream, response: Vec<u8> },
    /// HTTP/1.1: the request is built once per connection (its body is the connection's payload).
    Http { conn: HttpConn, request: Option<Vec<u8>>, body: Vec<u8> },
}

impl Client {
    fn new(wire: Wire, addr: SocketAddr, stream: TcpStream) -> Client {
        match wire {
            Wire::Echo => Client::Echo { stream, response: Vec::new() },
            Wire::Http => Client::Http { conn: HttpConn::new(stream, addr), request: None, body: Vec::new() },
        }
    }

    /// Sends `payload` and checks the answer echoes it.
    fn exchange(&mut self, payload: &[u8]) -> Result<()> {
        match self {
            Client::Echo { stream, response } => {
                response.resize(payload.len(), 0);
                stream.write_all(payload).context("send")?;
                stream.read_exact(response).context("receive the echo")?;
                ensure_echo(payload, response)
            }
            Client::Http { conn, request, body } => {
                let request = request.get_or_insert_with(|| conn.request(payload));
                let head = conn.exchange(request, body)?;
                head.expect_echo(payload, body)?;
                ensure!(!head.close, "the server closed the keep-alive connection");
                Ok(())
            }
        }
    }

    /// Half-closes and drains, so the server ends the connection without a reset.
    fn finish(self) {
        let mut stream = match self {
            Client::Echo { stream, .. } => stream,
            Client::Http { conn, .. } => conn.into_stream(),
        };
        if stream.shutdown(Shutdown::Write).is_ok() {
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        }
    }
}

/// Connection `c`'s share of the schedule (requests c, c + conns, ...), each sent when due or at
/// once if the previous response came late, its latency taken from when it was due.
fn run_conn(
    c: usize,
    mut client: Client,
    schedule: &Schedule,
    start: Instant,
    size: usize,
) -> Result<ConnResult> {
    fine_timer_slack();
    let mut result =
        ConnResult { sent: 0, latency: histogram()?, send_lag: histogram()?, last_end: None, error: None };
    let request = payload(c as u64, size);
    let mut prev_end = start;
    for i in (c as u64..schedule.total).step_by(schedule.conns) {
        let due = start + schedule.due(i);
        sleep_until(due);
        let sent = Instant::now();
        result.sent += 1;
        let exchanged = client.exchange(&request);
        let end = Instant::now();
        if let Err(e) = exchanged {
            result.error = Some(format!("connection {c}, request {i}: {e:#}"));
            return Ok(result);
        }
        if i >= schedule.first_measured {
            result.latency.saturating_record(micros(end - due));
            result.send_lag.saturating_record(micros(sent - due.max(prev_end)));
            result.last_end = Some(end);
        }
        prev_end = end;
    }
    // Let the server finish its trailer rather than hitting a reset; the numbers are in already.
    client.finish();
    Ok(result)
}

fn report(schedule: &Schedule, start: Instant, results: Vec<ConnResult>) -> Result<LoadReport> {
    let (mut latency, mut send_lag) = (histogram()?, histogram()?);
    let mut last_end = None;
    let mut error_messages = Vec::new();
    let (mut errors, mut sent) = (0, 0);
    for r in results {
        sent += r.sent;
        latency.add(&r.latency).context("merge latency histograms")?;
        send_lag.add(&r.send_lag).context("merge send-lag histograms")?;
        last_end = last_end.max(r.last_end);
        if let Some(e) = r.error {
            errors += 1;
            if error_messages.len() < MAX_ERROR_MESSAGES {
                error_messages.push(e);
            }
        }
    }
    let measured_from = start + schedule.due(schedule.first_measured);
    let duration_s = last_end.map_or(0.0, |end: Instant| (end - measured_from).as_secs_f64());
    let requests = latency.len();
    let at = |q: f64| if requests == 0 { 0.0 } else { latency.value_at_quantile(q) as f64 };
    Ok(LoadReport {
        requests,
        sent,
        errors,
        error_messages,
        achieved_rps: if duration_s > 0.0 { requests as f64 / duration_s } else { 0.0 },
        target_rps: schedule.rate,
        conns: schedule.conns,
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: if requests == 0 { 0.0 } else { latency.max() as f64 },
        mean_us: if requests == 0 { 0.0 } else { latency.mean() },
        duration_s,
        send_lag_p99_us: if requests == 0 { 0.0 } else { send_lag.value_at_quantile(0.99) as f64 },
    })
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGFIGS).context("cannot create a histogram")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ensure_echo(request: &[u8], response: &[u8]) -> Result<()> {
    match request.iter().zip(response).position(|(a, b)| a != b) {
        Some(at) => bail!("the echo differs from the request at byte {at}"),
        None => Ok(()),
    }
}

/// A blocking connection with Nagle off and I/O timeouts.
pub fn dial(addr: SocketAddr) -> Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Asks the kernel to wake this thread's sleeps on time rather than up to 50 µs late (the default
/// slack), since that lateness would count as latency.
fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only changes this thread's timer slack.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Sleeps until `t`; returns at once when it has passed.
fn sleep_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        std::thread::sleep(t - now);
    }
}

/// Streams that each write 64 KiB chunks to the echo server at `addr` while reading the echo back,
/// for `duration`; then half-close, drain, and check the server's trailer counted every byte.
/// Counts the echoed bytes that arrived within the window; an error when any stream fails.
pub async fn bulk(addr: SocketAddr, streams: usize, duration: Duration) -> Result<BulkReport> {
    ensure!(streams > 0, "streams must be at least 1");
    let mut conns = Vec::with_capacity(streams);
    for s in 0..streams {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("stream {s}: cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        conns.push(stream);
    }
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|stream| {
            let limit = duration + BULK_DRAIN;
            tokio::spawn(async move {
                tokio::time::timeout(limit, bulk_stream(stream, deadline))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("did not finish within {limit:?}")))
            })
        })
        .collect();
    let mut bytes = 0;
    for (s, task) in tasks.into_iter().enumerate() {
        let in_window = task.await.map_err(|e| anyhow!("{e}")).and_then(|r| r);
        bytes += in_window.with_context(|| format!("stream {s} to {addr}"))?;
    }
    let duration_s = duration.as_secs_f64();
    let gbps = if duration_s > 0.0 { bytes as f64 * 8.0 / duration_s / 1e9 } else { 0.0 };
    Ok(BulkReport { streams, bytes, duration_s, gbps })
}

/// One bulk stream; the echoed bytes that arrived before `deadline`.
async fn bulk_stream(stream: tokio::net::TcpStream, deadline: Instant) -> Result<u64> {
    let (mut reader, mut writer) = stream.into_split();
    let write = async {
        let chunk = payload(0, BULK_CHUNK);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            writer.write_all(&chunk).await.context("send")?;
            sent += BULK_CHUNK as u64;
        }
        writer.shutdown().await.context("half-close")?;
        Ok::<_, anyhow::Error>(sent)
    };
    let read = async {
        let mut buf = vec![0u8; BULK_CHUNK];
        let (mut in_window, mut total) = (0u64, 0u64);
        // The last bytes received: the trailer once the server closes.
        let mut tail = Vec::with_capacity(2 * TAIL);
        loop {
            let n = reader.read(&mut buf).await.context("receive")?;
            if n == 0 {
                break;
            }
            if Instant::now() < deadline {
                in_window += n as u64;
            }
            total += n as u64;
            tail.extend_from_slice(&buf[n.saturating_sub(TAIL)..n]);
            if tail.len() > TAIL {
                tail.drain(..tail.len() - TAIL);
            }
        }
        Ok::<_, anyhow::Error>((in_window, total, tail))
    };
    // Either side failing ends the stream: a writer blocked on a server that stopped reading
    // must not outlive a reader that already saw the reset.
    let (sent, (in_window, total, tail)) = tokio::try_join!(write, read)?;
    let trailer_len = usize::try_from(total.saturating_sub(sent)).unwrap_or(usize::MAX);
    if total <= sent || trailer_len > tail.len() {
        bail!("sent {sent} bytes but received {total} before the server closed: no echo and trailer");
    }
    let trailer = Trailer::parse(&tail[tail.len() - trailer_len..])?;
    ensure!(
        trailer.bytes == sent,
        "server {} received {} bytes, client sent {sent}",
        trailer.tag,
        trailer.bytes
    );
    Ok(in_window)
}

/// One HTTP/1.1 client connection of the fixed shape the bench speaks: requests are POSTs with a
/// Content-Length body, sent one at a time on a keep-alive connection, and each response is read
/// by its Content-Length. Bytes read past a response stay for the next one.
pub struct HttpConn {
    stream: TcpStream,
    host: String,
    /// Read but not yet consumed.
    buf: Vec<u8>,
}

/// What a response's head said that the client uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpHead {
    /// The status code.
    pub status: u16,
    /// The body's length (0 when the status has no body).
    pub content_length: usize,
    /// Whether the server said `Connection: close`.
    pub close: bool,
    /// `x-ferry-tag`: which server answered.
    pub tag: Option<String>,
    /// `x-ferry-peer`: the client address as the server saw it.
    pub peer: Option<String>,
    /// `x-ferry-bytes`: the request body's length as the server received it.
    pub received: Option<u64>,
}

impl HttpHead {
    /// Checks this was a 200 whose `body` is `sent` and that the server received all of `sent`.
    pub fn expect_echo(&self, sent: &[u8], body: &[u8]) -> Result<()> {
        if self.status != 200 {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            bail!("status {} ({text:?}), not 200", self.status);
        }
        ensure!(body.len() == sent.len(), "the response has {} body bytes, not {}", body.len(), sent.len());
        ensure_echo(sent, body)?;
        if let Some(received) = self.received {
            ensure!(received == sent.len() as u64, "the server received {received} of {} bytes", sent.len());
        }
        Ok(())
    }
}

impl HttpConn {
    /// A client on `stream`, a connection to `addr` (which the Host header names).
    pub fn new(stream: TcpStream, addr: SocketAddr) -> HttpConn {
        HttpConn { stream, host: addr.to_string(), buf: Vec::with_capacity(4096) }
    }

    /// The whole request that POSTs `body`: head and body in one buffer, for one write.
    pub fn request(&self, body: &[u8]) -> Vec<u8> {
        let mut request = format!(
            "POST /echo HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    }

    /// Writes `request` (from [`HttpConn::request`]) and reads its response: the head, with the
    /// body in `body` (replaced). Interim (1xx) responses are skipped.
    pub fn exchange(&mut self, request: &[u8], body: &mut Vec<u8>) -> Result<HttpHead> {
        self.stream.write_all(request).context("send the request")?;
        let head = loop {
            let head = self.read_head()?;
            if !(100..200).contains(&head.status) {
                break head;
            }
        };
        body.clear();
        let buffered = head.content_length.min(self.buf.len());
        body.extend(self.buf.drain(..buffered));
        if body.len() < head.content_length {
            let have = body.len();
            body.resize(head.content_length, 0);
            self.stream.read_exact(&mut body[have..]).context("receive the response body")?;
        }
        Ok(head)
    }

    /// The underlying connection, for closing it.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Reads up to the end of the next response head and parses it, leaving what follows in `buf`.
    fn read_head(&mut self) -> Result<HttpHead> {
        let mut searched = 0;
        loop {
            if let Some(at) = find(&self.buf[searched..], b"\r\n\r\n") {
                let end = searched + at + 4;
                let head = parse_head(&self.buf[..end]);
                self.buf.drain(..end);
                return head;
            }
            searched = self.buf.len().saturating_sub(3);
            ensure!(self.buf.len() < MAX_HEAD, "no end of the response head in {MAX_HEAD} bytes");
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).context("receive the response head")?;
            ensure!(n > 0, "the server closed the connection before a response");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response head (status line and header fields, through the empty line). Only
/// Content-Length framing is accepted: a Transfer-Encoding, several or malformed lengths, or
/// folded lines are errors.
fn parse_head(head: &[u8]) -> Result<HttpHead> {
    let text = std::str::from_utf8(head).map_err(|_| anyhow!("the response head is not UTF-8"))?;
    let mut lines = text.strip_suffix("\r\n\r\n").unwrap_or(text).split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .ok_or_else(|| anyhow!("not an HTTP/1.1 status line: {status_line:?}"))?;
    let code = rest.get(..3).filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let status: u16 = match code {
        Some(code) if rest.len() == 3 || rest.as_bytes()[3] == b' ' => code.parse()?,
        _ => bail!("bad status line {status_line:?}"),
    };
    let mut parsed = HttpHead { status, ..HttpHead::default() };
    let mut length = None;
    for line in lines {
        ensure!(!line.starts_with([' ', '\t']), "folded header line {line:?}");
        let (name, value) = line.split_once(':').ok_or_else(|| anyhow!("bad header line {line:?}"))?;
        ensure!(!name.is_empty() && !name.contains([' ', '\t']), "bad header name in {line:?}");
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                ensure!(length.is_none(), "more than one Content-Length");
                ensure!(
                    !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()),
                    "bad Content-Length {value:?}"
                );
                length = Some(value.parse::<usize>()?);
            }
            "transfer-encoding" => bail!("Transfer-Encoding {value:?}: only Content-Length framing is read"),
            "connection" => parsed.close |= value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")),
            "x-ferry-tag" => parsed.tag = Some(value.to_owned()),
            "x-ferry-peer" => parsed.peer = Some(value.to_owned()),
            "x-ferry-bytes" => parsed.received = Some(value.parse()?),
            _ => {}
        }
    }
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    parsed.content_length = match (length, bodiless) {
        (_, true) => 0,
        (Some(length), false) => length,
        (None, false) => bail!("status {status} without a Content-Length"),
    };
    Ok(parsed)
}

/// [`bulk`] over HTTP/1.1: each stream POSTs 256 KiB bodies one after another on its keep-alive
/// connection until `duration` is over, checking every echo; counts the echoed body bytes of the
/// responses that ended within the window. An error when any stream fails.
pub fn bulk_http(addr: SocketAddr, streams: usize, duration: Duration) -> Result<BulkReport> {
    ensure!(streams > 0, "streams must be at least 1");
    let conns = (0..streams)
        .map(|s| dial(addr).with_context(|| format!("stream {s}")))
        .collect::<Result<Vec<_>>>()?;
    let deadline = Instant::now() + duration;
    let bytes: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(s, stream)| {
                scope.spawn(move || {
                    let mut conn = HttpConn::new(stream, addr);
                    let sent = payload(s as u64, HTTP_BULK_BODY);
                    let request = conn.request(&sent);
                    let (mut body, mut bytes) = (Vec::new(), 0u64);
                    while Instant::now() < deadline {
                        let head = conn.exchange(&request, &mut body)?;
                        head.expect_echo(&sent, &body)?;
                        if Instant::now() < deadline {
                            bytes += body.len() as u64;
                        }
                    }
                    Client::Http { conn, request: None, body }.finish();
                    Ok(bytes)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(s, h)| {
                let r: Result<u64> = h.join().unwrap_or_else(|_| Err(anyhow!("stream thread panicked")));
                r.with_context(|| format!("stream {s} to {addr}"))
            })
            .collect::<Result<_>>()
    })?;
    let bytes = bytes.iter().sum();
    let duration_s = duration.as_secs_f64();
    let gbps = if duration_s > 0.0 { bytes as f64 * 8.0 / duration_s / 1e9 } else { 0.0 };
    Ok(BulkReport { streams, bytes, duration_s, gbps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// How the test echo server misbehaves.
    #[derive(Clone, Copy, Default)]
    struct Fault {
        /// Once, on whichever connection first passes this many received bytes, sleep this long.
        stall: Option<(u64, Duration)>,
        /// Close each connection after receiving this many bytes, without a trailer.
        close_after: Option<u64>,
    }

    /// An echo server on loopback like `ferry-testapp serve` (echo, then a trailer at the client's
    /// EOF), one thread per connection.
    fn echo_server(fault: Fault) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let (mut s, stalled) = (s.unwrap(), stalled.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut received = 0u64;
                    loop {
                        let Ok(n) = s.read(&mut buf) else { return };
                        if n == 0 {
                            break;
                        }
                        received += n as u64;
                        if fault.close_after.is_some_and(|limit| received >= limit) {
                            return;
                        }
                        if let Some((after, pause)) = fault.stall
                            && received >= after
                            && !stalled.swap(true, Ordering::SeqCst)
                        {
                            std::thread::sleep(pause);
                        }
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

    fn opts(rate: f64, conns: usize, duration_ms: u64, warmup_ms: u64) -> LoadOpts {
        LoadOpts {
            rate,
            conns,
            duration: Duration::from_millis(duration_ms),
            size: 1024,
            warmup: Duration::from_millis(warmup_ms),
        }
    }

    #[test]
    fn open_loop_sends_the_scheduled_requests_at_the_rate() {
        let addr = echo_server(Fault::default());
        let began = Instant::now();
        let r = open_loop(addr, &opts(200.0, 4, 1000, 200)).unwrap();
        let took = began.elapsed();
        // 200 rps for 1 s after a 0.2 s warm-up: 200 measured requests, paced rather than blasted.
        assert_eq!((r.requests, r.sent, r.errors, r.conns), (200, 240, 0, 4), "{r:?}");
        assert_eq!(r.target_rps, 200.0);
        assert!(took >= Duration::from_millis(1150), "finished in {took:?}: not paced");
        assert!(r.duration_s >= 0.95 && r.duration_s < 5.0, "{r:?}");
        assert!(r.achieved_rps > 40.0 && r.achieved_rps <= 211.0, "{r:?}");
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p90_us && r.p90_us <= r.p99_us, "{r:?}");
        assert!(r.p99_us <= r.p999_us && r.p999_us <= r.max_us && r.mean_us <= r.max_us, "{r:?}");
        assert!(r.error_messages.is_empty());
    }

    #[test]
    fn open_loop_charges_a_stall_to_every_request_queued_behind_it() {
        // Connection 0 (half of 200 rps: one request every 10 ms) stalls once for 400 ms, holding
        // back about 40 requests due during the stall. Their latencies from the intended time run
        // 400, 390, 380, ... ms; a closed-loop count would show one slow request among 300 and a
        // p99 of well under a millisecond.
        let stall = Some((30 * 1024, Duration::from_millis(400)));
        let addr = echo_server(Fault { stall, close_after: None });
        let r = open_loop(addr, &opts(200.0, 2, 1500, 0)).unwrap();
        assert_eq!((r.requests, r.errors), (300, 0), "{r:?}");
        assert!(r.max_us >= 380_000.0, "{r:?}");
        assert!(r.p99_us >= 250_000.0, "the queued requests' delay is missing: {r:?}");
    }

    #[test]
    fn open_loop_reports_a_failing_connection() {
        let addr = echo_server(Fault { stall: None, close_after: Some(1) });
        let r = open_loop(addr, &opts(100.0, 2, 300, 0)).unwrap();
        assert_eq!((r.requests, r.sent, r.errors), (0, 2, 2), "{r:?}");
        assert_eq!(r.error_messages.len(), 2);
        assert!(r.error_messages[0].contains("connection 0, request 0"), "{r:?}");
        assert_eq!((r.achieved_rps, r.p99_us, r.max_us), (0.0, 0.0, 0.0));
    }

    #[test]
    fn open_loop_rejects_bad_options() {
        let addr = echo_server(Fault::default());
        assert!(open_loop(addr, &opts(0.0, 1, 100, 0)).unwrap_err().to_string().contains("rate"));
        assert!(open_loop(addr, &opts(f64::NAN, 1, 100, 0)).is_err());
        assert!(open_loop(addr, &opts(10.0, 0, 100, 0)).unwrap_err().to_string().contains("conns"));
        let mut no_size = opts(10.0, 1, 100, 0);
        no_size.size = 0;
        assert!(open_loop(addr, &no_size).unwrap_err().to_string().contains("size"));
    }

    #[test]
    fn response_heads_are_read_by_content_length_only() {
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX-Ferry-Tag: s1\r\nx-ferry-peer: 127.0.0.1:9\r\n\
              x-ferry-bytes: 5\r\nConnection: keep-alive\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            head,
            HttpHead {
                status: 200,
                content_length: 5,
                close: false,
                tag: Some("s1".into()),
                peer: Some("127.0.0.1:9".into()),
                received: Some(5),
            }
        );
        let close =
            parse_head(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: Close\r\n\r\n");
        assert_eq!(close.map(|h| (h.status, h.close)).unwrap(), (503, true));
        assert_eq!(parse_head(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap().content_length, 0);
        assert_eq!(parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().content_length, 0);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n folded\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 20 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A one-connection HTTP server that answers each request (read by its Content-Length) with
    /// `answer(body)`, written a few bytes at a time, so the client must reassemble every part.
    fn trickling_http_server(answer: fn(&[u8]) -> Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let Ok(n) = s.read(&mut chunk) else { return };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(end) = find(&buf, b"\r\n\r\n") else { continue };
                let head = std::str::from_utf8(&buf[..end]).unwrap().to_ascii_lowercase();
                let len: usize = head
                    .split("content-length: ")
                    .nth(1)
                    .unwrap()
                    .split("\r\n")
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                if buf.len() < end + 4 + len {
                    continue;
                }
                let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                for part in answer(&body).chunks(7) {
                    if s.write_all(part).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        addr
    }

    fn echo_answer(body: &[u8]) -> Vec<u8> {
        let mut r =
            format!("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn http_responses_in_pieces_are_reassembled() {
        let addr = trickling_http_server(echo_answer);
        let mut conn = HttpConn::new(dial(addr).unwrap(), addr);
        let sent = payload(7, 300);
        let request = conn.request(&sent);
        assert!(request.starts_with(format!("POST /echo HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()));
        let mut body = Vec::new();
        for _ in 0..3 {
            let head = conn.exchange(&request, &mut body).unwrap();
            head.expect_echo(&sent, &body).unwrap();
        }
        let wrong = payload(8, 300);
        let head = conn.exchange(&conn.request(&wrong), &mut body).unwrap();
        assert!(head.expect_echo(&sent, &body).is_err(), "another body is no echo");
    }

    #[test]
    fn http_open_loop_counts_a_closing_or_failing_server_as_errors() {
        fn close(body: &[u8]) -> Vec<u8> {
            let mut r =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                    .into_bytes();
            r.extend_from_slice(body);
            r
        }
        fn forbidden(_: &[u8]) -> Vec<u8> {
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 19\r\n\r\nRBAC: access denied".to_vec()
        }
        for (answer, says) in
            [(close as fn(&[u8]) -> Vec<u8>, "closed the keep-alive"), (forbidden, "status 403")]
        {
            let addr = trickling_http_server(answer);
            let r = open_loop_over(addr, &opts(100.0, 1, 100, 0), Wire::Http).unwrap();
            assert_eq!((r.requests, r.errors), (0, 1), "{r:?}");
            assert!(r.error_messages[0].contains(says), "{r:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_counts_the_echo_within_the_window() {
        let addr = echo_server(Fault::default());
        let r = bulk(addr, 2, Duration::from_millis(300)).await.unwrap();
        assert_eq!((r.streams, r.duration_s), (2, 0.3));
        assert!(r.bytes > 0 && r.gbps > 0.0, "{r:?}");
        assert!((r.gbps - r.bytes as f64 * 8.0 / 0.3 / 1e9).abs() < 1e-9, "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_fails_when_the_server_closes_early() {
        let addr = echo_server(Fault { stall: None, close_after: Some(256 * 1024) });
        let e = bulk(addr, 2, Duration::from_millis(500)).await.unwrap_err();
        assert!(format!("{e:#}").contains("stream 0"), "{e:#}");
    }
}
