//! Debian's `prometheus` server in a node's network namespace, scraping an agent's metrics, and
//! queries through its HTTP API; plus a plain HTTP GET from inside a namespace.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::netns::in_netns;
use crate::{ChildGuard, SimNode};

/// Where an agent serves metrics inside its node's network namespace (its default).
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);

/// `GET path` over HTTP/1.0 (the server closes after the body) from a thread in `netns`; the
/// status code and the body.
pub fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    in_netns(netns, || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).with_context(|| format!("reading the answer of {addr}{path}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no HTTP status line from {addr}{path}: {head:?}"))?;
        Ok((status, body.to_owned()))
    })?
}

/// Percent-encodes a URL query component.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 in `netns` (bound and released).
fn free_port(netns: &Path) -> Result<u16> {
    let addr = in_netns(netns, || TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))??;
    Ok(addr.port())
}

/// The `prometheus` process with its own config and storage in a temporary directory, scraping
/// one target every second. Dropping it kills the process by pid (its [`ChildGuard`]), then removes
/// the directory.
#[derive(Debug)]
pub struct Prometheus {
    child: ChildGuard,
    netns: PathBuf,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it in `node`'s netns scraping `target` and waits (bounded) until `/-/ready` answers.
    pub fn start(node: &SimNode, target: SocketAddr) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-prom-").tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port(node.netns_path())?);
        // Debian's defaults point at /etc/prometheus and /var/lib/prometheus on 0.0.0.0:9090:
        // override every one.
        let mut cmd = node.command("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--web.console.templates=/etc/prometheus/consoles")
            .arg("--web.console.libraries=/etc/prometheus/console_libraries")
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log"))?)
            .stderr(std::fs::File::create(dir.path().join("stderr.log"))?);
        let child = node
            .spawn(cmd)
            .context("starting prometheus (Debian package `prometheus`; `cargo xtask setup` installs it)")?;
        let mut prom = Prometheus { child, netns: node.netns_path().to_owned(), addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = prom.child.try_wait()? {
                bail!("prometheus exited ({status}) before it was ready:\n{}", prom.log());
            }
            if matches!(http_get(&prom.netns, addr, "/-/ready"), Ok((200, _))) {
                return Ok(prom);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready on {addr} within 30 s:\n{}", prom.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// What it wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// `/api/v1/targets`, for failure messages.
    pub fn targets(&self) -> String {
        http_get(&self.netns, self.addr, "/api/v1/targets").map(|(_, b)| b).unwrap_or_default()
    }

    /// Evaluates an instant PromQL query; the vector's samples as (labels, value).
    pub fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(&self.netns, self.addr, &path)?;
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("{promql}: HTTP {status}: {body}"))?;
        if v["status"] != "success" {
            bail!("{promql}: {v}");
        }
        let samples = v["data"]["result"].as_array().cloned().unwrap_or_default();
        samples
            .into_iter()
            .map(|s| {
                let value = s["value"][1].as_str().and_then(|x| x.parse().ok());
                let value = value.with_context(|| format!("{promql}: sample without a value: {s}"))?;
                Ok((s["metric"].clone(), value))
            })
            .collect()
    }

    /// The single value of an aggregating query; `None` while it has no sample yet.
    pub fn scalar(&self, promql: &str) -> Result<Option<f64>> {
        let samples = self.query(promql)?;
        match samples.as_slice() {
            [] => Ok(None),
            [(_, v)] => Ok(Some(*v)),
            more => bail!("{promql} gave {} samples, expected one: {more:?}", more.len()),
        }
    }
}
