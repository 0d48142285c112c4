//! Runs every workload of one scenario from its client pod and reads what the mesh cost meanwhile.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use ferry_tests::testapp::{self, BulkReport, CrrReport, Load, LoadOpts, LoadReport, RrReport};
use serde::Serialize;

use crate::cost;
use crate::plan::{BULK_STREAMS, CONNS, HEADLINE_CONNS, Plan, RATE, SIZE};
use crate::profile::Recording;
use crate::world::World;

/// How often peak memory is sampled during the open-loop load.
const RSS_SAMPLE: Duration = Duration::from_millis(100);

/// Everything measured in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Open-loop runs at [`RATE`], one per connection count of [`CONNS`].
    pub load: Vec<LoadReport>,
    /// Closed-loop round trips on one connection.
    pub rr: RrReport,
    /// One new connection per request.
    pub crr: CrrReport,
    /// Bulk throughput over one stream.
    pub bulk_1: BulkReport,
    /// Bulk throughput over [`BULK_STREAMS`] streams.
    pub bulk_n: BulkReport,
    /// CPU seconds of the mesh processes during the open-loop runs, warm-ups included.
    pub cpu_s: f64,
    /// Requests sent during the open-loop runs, warm-ups included.
    pub requests_sent: u64,
    /// Peak summed resident memory of the mesh processes during the open-loop runs, in MB.
    pub rss_mb: f64,
    /// How many mesh processes those figures add up.
    pub mesh_processes: usize,
}

impl Measured {
    /// CPU seconds per 1,000 requests; 0 without mesh processes.
    pub fn cpu_s_per_1k(&self) -> f64 {
        if self.requests_sent == 0 { 0.0 } else { self.cpu_s * 1000.0 / self.requests_sent as f64 }
    }

    /// The open-loop run with `conns` connections.
    pub fn load_at(&self, conns: usize) -> Option<&LoadReport> {
        self.load.iter().find(|l| l.conns == conns)
    }
}

/// Runs the workloads from `world.client` to the service, in the world's wire (raw echo or
/// HTTP/1.1), with `pids` as the mesh's processes.
/// With `profile`, perf samples those processes' stacks into that file during the headline
/// open-loop run.
pub fn run(world: &World, pids: &[u32], plan: &Plan, profile: Option<&Path>) -> Result<Measured> {
    let to = world.service();
    let client = &world.client;
    let wire = world.wire;
    let rr_load = Load { size: SIZE, count: plan.rr_count, warmup: plan.rr_warmup };
    let rr = testapp::rr_over(client, wire, to, rr_load).context("closed-loop rr")?;
    ensure!(rr.count == plan.rr_count, "rr measured {} of {} round trips", rr.count, plan.rr_count);

    let sampling = AtomicBool::new(true);
    let cpu_before = cost::cpu_seconds(pids)?;
    let (load, peak_rss) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| peak_rss(pids, &sampling));
        let load = CONNS
            .iter()
            .map(|&conns| {
                let opts = LoadOpts {
                    rate: RATE as f64,
                    conns,
                    duration: plan.load,
                    warmup: plan.load_warmup,
                    size: SIZE,
                };
                let recording = match profile {
                    Some(data) if conns == HEADLINE_CONNS => Some(Recording::start(pids, data)?),
                    _ => None,
                };
                let report = testapp::load_over(client, wire, to, &opts)
                    .with_context(|| format!("open loop, {conns} connections"))?;
                if let Some(recording) = recording {
                    recording.stop().context("profiling the mesh processes with perf")?;
                }
                ensure!(report.errors == 0, "open loop with {conns} connections had errors: {report:?}");
                Ok(report)
            })
            .collect::<Result<Vec<_>>>();
        sampling.store(false, Ordering::Relaxed);
        let peak = sampler.join().map_err(|_| anyhow::anyhow!("the memory sampler panicked"));
        (load, peak)
    });
    let cpu_s = cost::cpu_seconds(pids)? - cpu_before;
    let load = load?;
    let rss_mb = peak_rss??;
    // Warm-up requests are not recorded, but the CPU time covers them too.
    let requests_sent = load.iter().map(|l| l.sent).sum();

    let crr = testapp::crr_over(client, wire, to, Load { size: SIZE, count: plan.crr_count, warmup: 10 })
        .context("connection rate")?;
    let bulk_1 = testapp::bulk_over(client, wire, to, 1, plan.bulk).context("bulk, one stream")?;
    let bulk_n =
        testapp::bulk_over(client, wire, to, BULK_STREAMS, plan.bulk).context("bulk, several streams")?;
    Ok(Measured { load, rr, crr, bulk_1, bulk_n, cpu_s, requests_sent, rss_mb, mesh_processes: pids.len() })
}

/// The largest summed resident memory of `pids` seen while `running`; 0 without processes.
fn peak_rss(pids: &[u32], running: &AtomicBool) -> Result<f64> {
    let mut peak: f64 = 0.0;
    if pids.is_empty() {
        return Ok(peak);
    }
    loop {
        peak = peak.max(cost::rss_mb(pids)?);
        if !running.load(Ordering::Relaxed) {
            return Ok(peak);
        }
        std::thread::sleep(RSS_SAMPLE);
    }
}
