//! How much each scenario measures, for a full, a quick and a smoke run.

use std::time::Duration;

use serde::Serialize;

/// The request rate of the open-loop load, whatever the connection count.
pub const RATE: u64 = 1_000;
/// Request and response size.
pub const SIZE: usize = 1024;
/// The open-loop connection counts, in the order they run.
pub const CONNS: [usize; 3] = [1, 16, 64];
/// The connection count whose latency is a scenario's headline row.
pub const HEADLINE_CONNS: usize = 16;
/// Parallel streams of the multi-stream bulk test.
pub const BULK_STREAMS: usize = 8;

/// The amounts of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    /// "full", "quick" or "smoke".
    pub mode: &'static str,
    /// Measured time of each open-loop run.
    #[serde(serialize_with = "as_secs")]
    pub load: Duration,
    /// Unmeasured time before it.
    #[serde(serialize_with = "as_secs")]
    pub load_warmup: Duration,
    /// Closed-loop round trips (after `rr_warmup` unmeasured ones).
    pub rr_count: u64,
    /// Unmeasured closed-loop round trips.
    pub rr_warmup: u64,
    /// New connections of the connection-rate test.
    pub crr_count: u64,
    /// Measured time of each bulk run.
    #[serde(serialize_with = "as_secs")]
    pub bulk: Duration,
    /// Rounds over all scenarios; the report gives medians.
    pub rounds: u32,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Plan {
    /// The full run: three rounds of about 40 s per scenario.
    pub fn full() -> Self {
        Plan {
            mode: "full",
            load: Duration::from_secs(6),
            load_warmup: Duration::from_secs(1),
            rr_count: 10_000,
            rr_warmup: 500,
            crr_count: 2_000,
            bulk: Duration::from_secs(3),
            rounds: 3,
        }
    }

    /// About two minutes in all.
    pub fn quick() -> Self {
        Plan {
            mode: "quick",
            load: Duration::from_secs(2),
            load_warmup: Duration::from_millis(300),
            rr_count: 2_000,
            rr_warmup: 200,
            crr_count: 300,
            bulk: Duration::from_secs(1),
            rounds: 1,
        }
    }

    /// Just enough traffic to prove every scenario still runs end to end (CI); its figures mean
    /// nothing.
    pub fn smoke() -> Self {
        Plan {
            mode: "smoke",
            load: Duration::from_millis(300),
            load_warmup: Duration::from_millis(100),
            rr_count: 100,
            rr_warmup: 10,
            crr_count: 20,
            bulk: Duration::from_millis(200),
            rounds: 1,
        }
    }
}
