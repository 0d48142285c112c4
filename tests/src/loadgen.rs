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

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::testapp::{BulkReport, LoadOpts, LoadReport, Trailer, payload};

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

/// Open-loop requests against the echo server at `addr` (see the module doc). Failed requests are
/// counted in the report (each ends its connection); an error means the run could not start.
pub fn open_loop(addr: SocketAddr, opts: &LoadOpts) -> Result<LoadReport> {
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
                scope.spawn(move || run_conn(c, stream, schedule, start, opts.size))
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

/// Connection `c`'s share of the schedule (requests c, c + conns, ...), each sent when due or at
/// once if the previous response came late, its latency taken from when it was due.
fn run_conn(
    c: usize,
    mut stream: TcpStream,
    schedule: &Schedule,
    start: Instant,
    size: usize,
) -> Result<ConnResult> {
    fine_timer_slack();
    let mut result =
        ConnResult { sent: 0, latency: histogram()?, send_lag: histogram()?, last_end: None, error: None };
    let request = payload(c as u64, size);
    let mut response = vec![0u8; size];
    let mut prev_end = start;
    for i in (c as u64..schedule.total).step_by(schedule.conns) {
        let due = start + schedule.due(i);
        sleep_until(due);
        let sent = Instant::now();
        result.sent += 1;
        let exchanged = stream
            .write_all(&request)
            .context("send")
            .and_then(|()| stream.read_exact(&mut response).context("receive the echo"))
            .and_then(|()| ensure_echo(&request, &response));
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
    if stream.shutdown(Shutdown::Write).is_ok() {
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
    }
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
fn dial(addr: SocketAddr) -> Result<TcpStream> {
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
