//! The `ferry-testapp` workload: its wire format (echo trailer, payload), its JSON reports, and
//! helpers that run it inside pods.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{ChildStdin, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::{ChildGuard, CollectedChild, Pod, bin_path};

/// The binary's name (see [`crate::bin_path`]).
pub const TESTAPP: &str = "ferry-testapp";

/// How long [`serve`] waits for the server's `{"listening":...}` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client and the server speak on each connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wire {
    /// Raw bytes echoed as they come, and a [`Trailer`] after the client half-closes ([`serve`]).
    #[default]
    Echo,
    /// HTTP/1.1 on keep-alive connections: each request a POST whose Content-Length body the
    /// server echoes as a Content-Length body, naming itself in `x-ferry-*` headers
    /// ([`serve_http`]).
    Http,
}

impl Wire {
    /// The testapp flags that select this wire (none for the echo).
    fn args(self) -> &'static [&'static str] {
        match self {
            Wire::Echo => &[],
            Wire::Http => &["--http"],
        }
    }
}

/// The line a server prints once bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listening {
    /// The bound address.
    pub listening: String,
}

/// What `ferry-testapp connect` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Connections whose echo and trailer were correct.
    pub ok: u64,
    /// Connections that failed.
    pub failed: u64,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// How many successful connections each server tag answered.
    pub tags: BTreeMap<String, u64>,
    /// Echoed payload bytes over all successful connections.
    pub bytes_echoed: u64,
    /// The client's local address of each connection that was established.
    pub local_addrs: Vec<String>,
    /// What getpeername() returned on each established connection (echo wire only).
    #[serde(default)]
    pub peer_addrs: Vec<String>,
    /// The peer address each server reported in its trailer.
    pub peers_seen_by_server: Vec<String>,
}

/// What `ferry-testapp rr` prints: round-trip latencies in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RrReport {
    /// Measured round trips (warm-up excluded).
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl RrReport {
    /// A report of `count` round trips with these latencies.
    pub fn new(count: u64, latency: Latency) -> Self {
        let Latency { p50_us, p90_us, p99_us, mean_us } = latency;
        Self { count, p50_us, p90_us, p99_us, mean_us }
    }
}

/// Percentiles and mean of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// Nearest-rank percentiles and the mean of `samples_us`, in any order; all zero for none.
    pub fn of(mut samples_us: Vec<f64>) -> Self {
        samples_us.sort_by(f64::total_cmp);
        let n = samples_us.len();
        Self {
            p50_us: percentile(&samples_us, 0.50),
            p90_us: percentile(&samples_us, 0.90),
            p99_us: percentile(&samples_us, 0.99),
            mean_us: if n == 0 { 0.0 } else { samples_us.iter().sum::<f64>() / n as f64 },
        }
    }
}

/// What `ferry-testapp crr` prints: sequential connections, each connect, one request and its
/// echo, then close; latencies are measured from the start of `connect()`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CrrReport {
    /// Measured connections (warm-up excluded).
    pub count: u64,
    /// Wall time of the measured connections, back to back.
    pub elapsed_s: f64,
    /// Measured connections per second of wall time.
    pub conns_per_s: f64,
    /// Until `connect()` returned.
    pub connect: Latency,
    /// Until the whole echo of the request had arrived.
    pub first_response: Latency,
    /// Until the server's close was read after the client's half-close: the whole connection.
    pub total: Latency,
    /// The client's distinct local IPs.
    pub local_ips: Vec<String>,
    /// The distinct client IPs the server named in its trailers.
    pub peer_ips_seen_by_server: Vec<String>,
}

/// What `ferry-testapp load` prints: open-loop requests at a fixed total rate over persistent
/// connections. Latencies run from each request's intended send time (start + i/rate) to the end
/// of its response, so a stall shows up as the queueing delay of every request it held back
/// (coordinated omission corrected). Warm-up requests are not counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Measured requests that completed.
    pub requests: u64,
    /// Requests sent in all, warm-up included: what the measured system carried.
    pub sent: u64,
    /// Requests that failed; each failure ends its connection.
    pub errors: u64,
    /// The first few failure messages.
    pub error_messages: Vec<String>,
    /// Measured requests per second of measured wall time.
    pub achieved_rps: f64,
    /// The requested rate.
    pub target_rps: f64,
    /// Persistent connections the requests were spread over.
    pub conns: usize,
    /// Median latency.
    pub p50_us: f64,
    /// 90th percentile latency.
    pub p90_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// 99.9th percentile latency.
    pub p999_us: f64,
    /// Highest latency.
    pub max_us: f64,
    /// Mean latency.
    pub mean_us: f64,
    /// Measured wall time: from the first measured request's intended time to the last response.
    pub duration_s: f64,
    /// 99th percentile of the client's own lateness in sending (timer wake-up, not queueing behind
    /// a slow response): how faithful the schedule was.
    pub send_lag_p99_us: f64,
}

/// What `ferry-testapp bulk` prints: streams writing to the echo server while reading it back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkReport {
    /// Concurrent streams.
    pub streams: usize,
    /// Echoed bytes the client received during the measured window, over all streams.
    pub bytes: u64,
    /// The measured window.
    pub duration_s: f64,
    /// Echoed bits received per second, in units of 1e9.
    pub gbps: f64,
}

/// The line a server writes after the client half-closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// The server's tag.
    pub tag: String,
    /// Bytes the server received on the connection.
    pub bytes: u64,
    /// The client address as the server saw it.
    pub peer: String,
}

impl Trailer {
    /// The wire form: `\nFERRY-TRAILER tag=<tag> bytes=<n> peer=<addr>\n`.
    pub fn to_line(&self) -> String {
        format!("\nFERRY-TRAILER tag={} bytes={} peer={}\n", self.tag, self.bytes, self.peer)
    }

    /// Parses the wire form (exactly, nothing before or after it).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| anyhow!("trailer is not UTF-8: {bytes:?}"))?;
        let body = text
            .strip_prefix("\nFERRY-TRAILER ")
            .and_then(|t| t.strip_suffix('\n'))
            .ok_or_else(|| anyhow!("no trailer after the echo, got {text:?}"))?;
        let mut fields = BTreeMap::new();
        for field in body.split(' ') {
            let (key, value) = field.split_once('=').ok_or_else(|| anyhow!("bad trailer field {field:?}"))?;
            fields.insert(key, value);
        }
        let get =
            |key: &str| fields.get(key).copied().ok_or_else(|| anyhow!("trailer lacks {key}: {text:?}"));
        Ok(Self {
            tag: get("tag")?.to_owned(),
            bytes: get("bytes")?.parse().with_context(|| format!("bad bytes in trailer {text:?}"))?,
            peer: get("peer")?.to_owned(),
        })
    }
}

/// The deterministic pseudo-random payload of connection `conn` with `len` bytes.
pub fn payload(conn: u64, len: usize) -> Vec<u8> {
    let mut rng =
        fastrand::Rng::with_seed(0x5eed_0000 ^ conn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ len as u64);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    data
}

/// Checks that `received` is `sent` echoed byte for byte followed by a trailer; the trailer.
pub fn verify_echo(sent: &[u8], received: &[u8]) -> Result<Trailer> {
    if received.len() < sent.len() {
        bail!("short echo: got {} of {} bytes", received.len(), sent.len());
    }
    if let Some(i) = sent.iter().zip(received).position(|(a, b)| a != b) {
        bail!("echo differs at byte {i}: sent {:#04x}, got {:#04x}", sent[i], received[i]);
    }
    let trailer = Trailer::parse(&received[sent.len()..])?;
    if trailer.bytes != sent.len() as u64 {
        bail!("server {} received {} bytes, client sent {}", trailer.tag, trailer.bytes, sent.len());
    }
    Ok(trailer)
}

/// The `p` quantile (0..=1, nearest rank) of sorted `values`; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Starts an echo server in `pod` (netns and cgroup) on `[::]:port`, dual-stack, answering with
/// `tag`; returns once it is listening.
pub fn serve(pod: &Pod, port: u16, tag: &str) -> Result<ChildGuard> {
    let mut cmd = pod.command(bin_path(TESTAPP));
    cmd.args(["serve", "--port", &port.to_string(), "--tag", tag]);
    pod.spawn_server(cmd)
}

/// Starts an HTTP/1.1 echo server in `pod` (netns and cgroup) on `[::]:port`, dual-stack: it
/// answers each request with its body (1 KiB of payload for a request without one) and the
/// headers `x-ferry-tag` (`tag`), `x-ferry-peer` (the client as it saw it) and `x-ferry-bytes`
/// (the request body's length); returns once it is listening.
pub fn serve_http(pod: &Pod, port: u16, tag: &str) -> Result<ChildGuard> {
    let mut cmd = pod.command(bin_path(TESTAPP));
    cmd.args(["serve", "--http", "--port", &port.to_string(), "--tag", tag]);
    pod.spawn_server(cmd)
}

/// Starts the server of `wire` ([`serve`] or [`serve_http`]).
pub fn serve_wire(pod: &Pod, wire: Wire, port: u16, tag: &str) -> Result<ChildGuard> {
    match wire {
        Wire::Echo => serve(pod, port, tag),
        Wire::Http => serve_http(pod, port, tag),
    }
}

/// Spawns `cmd` in `pod` with stdout piped and waits for its `{"listening":...}` line.
pub(crate) fn spawn_listening(pod: &Pod, mut cmd: Command) -> Result<ChildGuard> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = pod.spawn(cmd)?;
    let stdout = guard.take_stdout().ok_or_else(|| anyhow!("server stdout not piped"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(LISTEN_TIMEOUT) {
        Ok(Some(Ok(line))) => line,
        other => {
            // Give a crashing server a moment to finish writing stderr.
            let status = guard.wait_timeout(Duration::from_millis(200)).ok();
            bail!(
                "{program} in pod {} did not report listening ({other:?}, exit {status:?}): {}",
                pod.name(),
                guard.stderr()
            );
        }
    };
    serde_json::from_str::<Listening>(&line)
        .with_context(|| format!("{program} in pod {} printed {line:?}, not a listening line", pod.name()))?;
    Ok(guard)
}

/// Options of [`connect`].
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Payload bytes per connection.
    pub bytes: usize,
    /// Concurrent connections.
    pub conns: usize,
    /// How long each connection stays open after sending, before half-closing.
    pub hold_ms: u64,
    /// Per-connection timeout.
    pub timeout_ms: u64,
    /// Run in the pod's cgroup (captured when enrolled); false runs in its netns only.
    pub in_cgroup: bool,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        Self { bytes: 4096, conns: 1, hold_ms: 0, timeout_ms: 10_000, in_cgroup: true }
    }
}

/// Runs `ferry-testapp connect` from `pod` to `addr` and returns its report (failed connections
/// are in the report, not an error; an error means the client itself could not run or report).
pub fn connect(pod: &Pod, addr: impl Display, opts: &ConnectOpts) -> Result<ConnectReport> {
    let cmd = connect_command(pod, addr, opts, opts.timeout_ms);
    run_json(pod, cmd, report_wait(opts))
}

/// [`connect`] over HTTP/1.1 against [`serve_http`]: each connection sends `requests` POSTs of
/// `opts.bytes` one after another, checks every echo, and closes. The report counts connections
/// in `ok`/`failed` and each response in `tags` and `peers_seen_by_server` (from the `x-ferry-*`
/// headers), so a proxy that balances requests of one connection over servers shows it.
pub fn connect_http(
    pod: &Pod,
    addr: impl Display,
    opts: &ConnectOpts,
    requests: u32,
) -> Result<ConnectReport> {
    let mut cmd = connect_command(pod, addr, opts, opts.timeout_ms);
    cmd.args(["--http", "--requests", &requests.to_string()]);
    run_json(pod, cmd, report_wait(opts))
}

/// How long a held connection ([`connect_held`]) may wait for its release before its own
/// per-connection timeout fails it.
pub const HELD_LIMIT: Duration = Duration::from_secs(120);

/// Starts `ferry-testapp connect` like [`connect`], but every connection, once it has sent its
/// payload (and held `opts.hold_ms`), stays open until [`HeldConnect::release`]: for tests that
/// look at live connections or change something while they are open, without guessing how long
/// that takes.
pub fn connect_held(pod: &Pod, addr: impl Display, opts: &ConnectOpts) -> Result<HeldConnect> {
    let limit = opts.timeout_ms + HELD_LIMIT.as_millis() as u64;
    let mut cmd = connect_command(pod, addr, opts, limit);
    cmd.arg("--hold-stdin").stdin(Stdio::piped());
    let mut child = pod.spawn_collected(cmd)?;
    let stdin = child.take_stdin().ok_or_else(|| anyhow!("testapp stdin not piped"))?;
    Ok(HeldConnect { pod: pod.clone(), child, stdin, wait: report_wait(opts) })
}

/// A running [`connect_held`] client; dropping it kills the client.
#[derive(Debug)]
pub struct HeldConnect {
    pod: Pod,
    child: CollectedChild,
    /// Closing it is the release.
    stdin: ChildStdin,
    wait: Duration,
}

impl HeldConnect {
    /// Lets the connections half-close and finish, and returns the report as [`connect`] does.
    pub fn release(self) -> Result<ConnectReport> {
        drop(self.stdin);
        let out = self.child.wait(self.wait)?;
        parse_report(&self.pod, &out)
    }
}

/// `ferry-testapp connect ADDR` with `opts` and a per-connection timeout of `timeout_ms`.
fn connect_command(pod: &Pod, addr: impl Display, opts: &ConnectOpts, timeout_ms: u64) -> Command {
    let program = bin_path(TESTAPP);
    let mut cmd = if opts.in_cgroup { pod.command(program) } else { pod.netns_command(program) };
    cmd.args(["connect", &addr.to_string()])
        .args(["--bytes", &opts.bytes.to_string(), "--conns", &opts.conns.to_string()])
        .args(["--hold-ms", &opts.hold_ms.to_string(), "--timeout-ms", &timeout_ms.to_string()]);
    cmd
}

/// How long to wait for a connect client's report once its connections run on their own.
fn report_wait(opts: &ConnectOpts) -> Duration {
    Duration::from_millis(opts.timeout_ms + opts.hold_ms) + Duration::from_secs(10)
}

/// How much a measuring client ([`rr`], [`crr`]) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Bytes per request (and response).
    pub size: usize,
    /// Measured round trips or connections.
    pub count: u64,
    /// Unmeasured ones first.
    pub warmup: u64,
}

/// Runs `ferry-testapp rr` from `pod` (in its cgroup) against the echo server at `addr`.
pub fn rr(pod: &Pod, addr: impl Display, size: usize, count: u64, warmup: u64) -> Result<RrReport> {
    rr_over(pod, Wire::Echo, addr, Load { size, count, warmup })
}

/// [`rr`] speaking `wire` (against the server of that wire).
pub fn rr_over(pod: &Pod, wire: Wire, addr: impl Display, load: Load) -> Result<RrReport> {
    let mut cmd = load_command(pod, "rr", addr, load);
    cmd.args(wire.args());
    run_json(pod, cmd, Duration::from_secs(120))
}

/// Runs `ferry-testapp crr` from `pod` (in its cgroup) against the echo server at `addr`.
pub fn crr(pod: &Pod, addr: impl Display, load: Load) -> Result<CrrReport> {
    crr_over(pod, Wire::Echo, addr, load)
}

/// [`crr`] speaking `wire`: over HTTP, each connection is one request and its response.
pub fn crr_over(pod: &Pod, wire: Wire, addr: impl Display, load: Load) -> Result<CrrReport> {
    let mut cmd = load_command(pod, "crr", addr, load);
    cmd.args(wire.args());
    run_json(pod, cmd, Duration::from_secs(300))
}

/// Options of [`load`] (and of `ferry-testapp load`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOpts {
    /// Total requests per second over all connections.
    pub rate: f64,
    /// Persistent connections; requests go round-robin over them.
    pub conns: usize,
    /// Measured time.
    pub duration: Duration,
    /// Bytes per request (and response).
    pub size: usize,
    /// Unmeasured time first, at the same rate.
    pub warmup: Duration,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            rate: 1000.0,
            conns: 16,
            duration: Duration::from_secs(10),
            size: 1024,
            warmup: Duration::from_secs(1),
        }
    }
}

/// Runs `ferry-testapp load` from `pod` (in its cgroup) against the echo server at `to`; an error
/// (with the client's output) when any request failed.
pub fn load(pod: &Pod, to: SocketAddr, opts: &LoadOpts) -> Result<LoadReport> {
    load_over(pod, Wire::Echo, to, opts)
}

/// [`load`] speaking `wire`: over HTTP, each request is a POST of `opts.size` bytes and its
/// response the echo of it, on keep-alive connections.
pub fn load_over(pod: &Pod, wire: Wire, to: SocketAddr, opts: &LoadOpts) -> Result<LoadReport> {
    let mut cmd = pod.command(bin_path(TESTAPP));
    cmd.args(["load", &to.to_string(), "--rate", &opts.rate.to_string()])
        .args(wire.args())
        .args(["--conns", &opts.conns.to_string(), "--size", &opts.size.to_string()])
        .args(["--duration-ms", &opts.duration.as_millis().to_string()])
        .args(["--warmup-ms", &opts.warmup.as_millis().to_string()]);
    let timeout = opts.warmup + opts.duration + Duration::from_secs(30);
    run_checked(pod, cmd, timeout)
}

/// Runs `ferry-testapp bulk` from `pod` (in its cgroup) against the echo server at `to`; an error
/// (with the client's output) when any stream failed.
pub fn bulk(pod: &Pod, to: SocketAddr, streams: usize, duration: Duration) -> Result<BulkReport> {
    bulk_over(pod, Wire::Echo, to, streams, duration)
}

/// [`bulk`] speaking `wire`: over HTTP, each stream sends large POSTs one after another and counts
/// their echoed bodies.
pub fn bulk_over(
    pod: &Pod,
    wire: Wire,
    to: SocketAddr,
    streams: usize,
    duration: Duration,
) -> Result<BulkReport> {
    let mut cmd = pod.command(bin_path(TESTAPP));
    cmd.args(["bulk", &to.to_string(), "--streams", &streams.to_string()])
        .args(wire.args())
        .args(["--duration-ms", &duration.as_millis().to_string()]);
    run_checked(pod, cmd, duration + Duration::from_secs(60))
}

/// `ferry-testapp SUBCOMMAND ADDR --size --count --warmup` in `pod`'s netns and cgroup.
fn load_command(pod: &Pod, subcommand: &str, addr: impl Display, load: Load) -> Command {
    let mut cmd = pod.command(bin_path(TESTAPP));
    cmd.args([subcommand, &addr.to_string()]).args([
        "--size",
        &load.size.to_string(),
        "--count",
        &load.count.to_string(),
        "--warmup",
        &load.warmup.to_string(),
    ]);
    cmd
}

/// Runs `cmd` in `pod` and parses the last line of its stdout as JSON.
fn run_json<T: serde::de::DeserializeOwned>(pod: &Pod, cmd: Command, timeout: Duration) -> Result<T> {
    let out = pod.output(cmd, timeout)?;
    parse_report(pod, &out)
}

/// Like [`run_json`], but a non-zero exit is an error even when a report was printed.
fn run_checked<T: serde::de::DeserializeOwned>(pod: &Pod, cmd: Command, timeout: Duration) -> Result<T> {
    let out = pod.output(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "testapp in pod {} failed ({}): stdout {:?}, stderr {:?}",
            pod.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_report(pod, &out)
}

/// The last line of `out`'s stdout as JSON; an error naming the whole output otherwise.
fn parse_report<T: serde::de::DeserializeOwned>(pod: &Pod, out: &Output) -> Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!(
            "testapp in pod {} ({}) printed no report: stdout {stdout:?}, stderr {:?}",
            pod.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trips() {
        let t = Trailer { tag: "server-1".into(), bytes: 42, peer: "[fd00:233:1::2]:4000".into() };
        assert_eq!(Trailer::parse(t.to_line().as_bytes()).unwrap(), t);
        assert!(Trailer::parse(b"FERRY-TRAILER tag=a bytes=1 peer=x\n").is_err());
        assert!(Trailer::parse(b"\nFERRY-TRAILER tag=a bytes=z peer=x\n").is_err());
        assert!(Trailer::parse(b"\nFERRY-TRAILER tag=a peer=x\n").is_err());
    }

    #[test]
    fn payload_is_deterministic_and_differs_per_connection() {
        assert_eq!(payload(3, 100), payload(3, 100));
        assert_ne!(payload(3, 100), payload(4, 100));
        assert_eq!(payload(0, 0), Vec::<u8>::new());
    }

    #[test]
    fn verify_echo_finds_each_fault() {
        let sent = payload(1, 10);
        let trailer = Trailer { tag: "t".into(), bytes: 10, peer: "1.2.3.4:5".into() };
        let mut good = sent.clone();
        good.extend_from_slice(trailer.to_line().as_bytes());
        assert_eq!(verify_echo(&sent, &good).unwrap(), trailer);

        let mut corrupt = good.clone();
        corrupt[4] ^= 0xff;
        assert!(verify_echo(&sent, &corrupt).unwrap_err().to_string().contains("byte 4"));
        assert!(verify_echo(&sent, &sent[..5]).unwrap_err().to_string().contains("short echo"));
        assert!(verify_echo(&sent, &sent).unwrap_err().to_string().contains("no trailer"));
        let mut wrong_count = sent.clone();
        wrong_count.extend_from_slice(Trailer { bytes: 9, ..trailer }.to_line().as_bytes());
        assert!(verify_echo(&sent, &wrong_count).is_err());
    }

    #[test]
    fn latency_sorts_its_samples() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let l = Latency::of(samples);
        assert_eq!((l.p50_us, l.p90_us, l.p99_us, l.mean_us), (50.0, 90.0, 99.0, 50.5));
        assert_eq!(Latency::of(Vec::new()), Latency::default());
        let r = RrReport::new(3, Latency { p50_us: 1.0, p90_us: 2.0, p99_us: 3.0, mean_us: 4.0 });
        assert_eq!((r.count, r.p50_us, r.p90_us, r.p99_us, r.mean_us), (3, 1.0, 2.0, 3.0, 4.0));
    }

    #[test]
    fn percentile_uses_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.9), 90.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
