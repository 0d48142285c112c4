//! The cross-node bench's report: `cross_node.json` and its table, and how rounds and cold samples
//! are summarized into them.

use ferry_tests::testapp::{CrrReport, Latency};
use serde::Serialize;

use crate::rounds::{Comparison, Delta, Summary, median_of, paired_median, range_of, rr_rows, spread_line};
use crate::{Host, RrPlan};

/// How many new connections to measure.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConnPlan {
    /// Rounds of each warm scenario (direct, mesh with the tunnel pooled).
    pub rounds: usize,
    /// Measured connections per round.
    pub connections: u64,
    /// Unmeasured connections before them.
    pub warmup: u64,
    /// Agent restarts, each followed by one cold and one warm connection.
    pub cold_samples: usize,
}

impl ConnPlan {
    /// The plan of a quick or a full run.
    pub fn new(quick: bool) -> Self {
        if quick {
            ConnPlan { rounds: 3, connections: 1_000, warmup: 100, cold_samples: 10 }
        } else {
            ConnPlan { rounds: 5, connections: 10_000, warmup: 500, cold_samples: 50 }
        }
    }
}

/// Both plans.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    /// Round trips on one connection.
    pub rr: RrPlan,
    /// New connections.
    pub connections: ConnPlan,
}

/// The cross_node.json document.
#[derive(Debug, Serialize)]
pub struct Results {
    /// "cross_node".
    pub benchmark: &'static str,
    /// "quick" or "full".
    pub mode: &'static str,
    /// Request and response size.
    pub size_bytes: usize,
    /// How much was measured.
    pub plan: Plan,
    /// Round-trip latency on one open connection.
    pub rr: RrResults,
    /// New connections, one after another, while the tunnel is pooled.
    pub connections: ConnResults,
    /// The first connection after an agent restart, which opens the tunnel.
    pub cold: ColdResults,
    /// Where it was measured.
    pub environment: Environment,
}

/// Round trips, direct against mesh.
#[derive(Debug, Serialize)]
pub struct RrResults {
    /// What one sample is.
    pub method: &'static str,
    /// Between the unenrolled pods.
    pub direct: Summary,
    /// Between the enrolled pods, through both agents over mTLS.
    pub mesh_mtls: Summary,
    /// The difference.
    pub mesh_vs_direct: Comparison,
}

/// One scenario's connection rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ConnSummary {
    /// Median over rounds of each round's connections per second.
    pub conns_per_s: f64,
    /// Smallest and largest per-round rate.
    pub conns_per_s_range: [f64; 2],
    /// Median over rounds of each round's figures: until `connect()` returned.
    pub connect: Latency,
    /// Likewise: until the whole echo had arrived (setup plus one round trip).
    pub first_response: Latency,
    /// Likewise: until the server's close arrived (the whole connection).
    pub total: Latency,
    /// Each round's report, in order.
    pub rounds: Vec<CrrReport>,
}

/// Summarizes one scenario's connection rounds.
pub fn summarize_conns(rounds: Vec<CrrReport>) -> ConnSummary {
    let latency = |pick: fn(&CrrReport) -> &Latency| Latency {
        p50_us: median_of(&rounds, |r| pick(r).p50_us),
        p90_us: median_of(&rounds, |r| pick(r).p90_us),
        p99_us: median_of(&rounds, |r| pick(r).p99_us),
        mean_us: median_of(&rounds, |r| pick(r).mean_us),
    };
    ConnSummary {
        conns_per_s: median_of(&rounds, |r| r.conns_per_s),
        conns_per_s_range: range_of(&rounds, |r| r.conns_per_s),
        connect: latency(|r| &r.connect),
        first_response: latency(|r| &r.first_response),
        total: latency(|r| &r.total),
        rounds,
    }
}

/// New connections, direct against mesh.
#[derive(Debug, Serialize)]
pub struct ConnResults {
    /// What one sample is.
    pub method: &'static str,
    /// Between the unenrolled pods.
    pub direct: ConnSummary,
    /// Between the enrolled pods, each connection a new HBONE stream on the pooled TLS connection.
    pub mesh_mtls_pooled: ConnSummary,
    /// The difference.
    pub mesh_vs_direct: ConnComparison,
}

/// Mesh against direct for new connections.
#[derive(Debug, Clone, Serialize)]
pub struct ConnComparison {
    /// Mesh connections per second over direct ones.
    pub conns_per_s_ratio: f64,
    /// Median time to the first response.
    pub first_response_p50: Delta,
    /// Median time of the whole connection.
    pub total_p50: Delta,
    /// Median over rounds of (mesh - direct) p50 time to the first response in the same round.
    pub added_first_response_p50_paired_us: f64,
}

/// Compares two scenarios' connection rounds.
pub fn compare_conns(direct: &ConnSummary, mesh: &ConnSummary) -> ConnComparison {
    ConnComparison {
        conns_per_s_ratio: Delta::new(direct.conns_per_s, mesh.conns_per_s).ratio,
        first_response_p50: Delta::new(direct.first_response.p50_us, mesh.first_response.p50_us),
        total_p50: Delta::new(direct.total.p50_us, mesh.total.p50_us),
        added_first_response_p50_paired_us: paired_median(&direct.rounds, &mesh.rounds, |r| {
            r.first_response.p50_us
        }),
    }
}

/// One agent restart and the two connections after it.
#[derive(Debug, Clone, Serialize)]
pub struct ColdSample {
    /// From starting node-a's agent until it reported ready.
    pub agent_ready_ms: f64,
    /// The first connection to the server: it opened the TLS connection.
    pub first: CrrReport,
    /// The connection right after it, over the tunnel the first one opened.
    pub next: CrrReport,
}

/// The cold samples summarized. Over fewer than 100 samples, p99 is the largest sample.
#[derive(Debug, Serialize)]
pub struct ColdResults {
    /// What one sample is.
    pub method: &'static str,
    /// Samples taken.
    pub samples: usize,
    /// The first connection's time until the whole echo had arrived.
    pub first_response: Latency,
    /// The first connection's whole time, close included.
    pub total: Latency,
    /// The next connection's time until the whole echo had arrived.
    pub next_first_response: Latency,
    /// The next connection's whole time.
    pub next_total: Latency,
    /// Median over samples of (first - next) time to the first response: opening the tunnel.
    pub tunnel_setup_added_us: f64,
    /// 1 / median whole time of a cold connection: the rate of one sequential client if every
    /// connection had to open its own TLS connection (implied, not measured as a rate).
    pub implied_conns_per_s: f64,
    /// Median time the agent took to become ready after a restart.
    pub agent_ready_ms_p50: f64,
    /// The longest of those times.
    pub agent_ready_ms_max: f64,
    /// Every sample.
    pub per_sample: Vec<ColdSample>,
}

/// Summarizes the cold samples.
pub fn summarize_cold(method: &'static str, samples: Vec<ColdSample>) -> ColdResults {
    let of = |f: fn(&ColdSample) -> f64| Latency::of(samples.iter().map(f).collect());
    let total = of(|s| s.first.total.p50_us);
    let mut added: Vec<f64> =
        samples.iter().map(|s| s.first.first_response.p50_us - s.next.first_response.p50_us).collect();
    added.sort_by(f64::total_cmp);
    ColdResults {
        method,
        samples: samples.len(),
        first_response: of(|s| s.first.first_response.p50_us),
        next_first_response: of(|s| s.next.first_response.p50_us),
        next_total: of(|s| s.next.total.p50_us),
        tunnel_setup_added_us: ferry_tests::testapp::percentile(&added, 0.5),
        implied_conns_per_s: if total.p50_us > 0.0 { 1e6 / total.p50_us } else { 0.0 },
        agent_ready_ms_p50: of(|s| s.agent_ready_ms).p50_us,
        agent_ready_ms_max: samples.iter().map(|s| s.agent_ready_ms).fold(0.0, f64::max),
        total,
        per_sample: samples,
    }
}

/// Where the figures were measured.
#[derive(Debug, Serialize)]
pub struct Environment {
    /// The machine.
    #[serde(flatten)]
    pub host: Host,
    /// The direct scenario's path.
    pub direct_path: String,
    /// The mesh scenario's path.
    pub mesh_path: String,
    /// Settings the bench changed.
    pub tuning: &'static str,
}

/// The human-readable tables with a legend.
pub fn table(r: &Results) -> String {
    let rr = &r.rr;
    let mut out = format!(
        "\ncross-node rr (pod on node-a -> pod on node-b): {} B request/response, closed loop, one \
         connection; {} rounds x {} round trips ({})\n",
        r.size_bytes, r.plan.rr.rounds, r.plan.rr.round_trips, r.mode
    );
    out += &rr_rows(["direct", "mesh (mTLS)"], &rr.direct, &rr.mesh_mtls, &rr.mesh_vs_direct);
    out += &spread_line(&rr.direct, &rr.mesh_mtls, &rr.mesh_vs_direct);
    let (c, cold) = (&r.connections, &r.cold);
    out += &format!(
        "\ncross-node new connections, one client, one at a time (connect, {} B request, {} B \
         response, close); {} rounds x {} connections, {} cold samples ({})\n",
        r.size_bytes,
        r.size_bytes,
        r.plan.connections.rounds,
        r.plan.connections.connections,
        cold.samples,
        r.mode
    );
    let head = ["conn/s", "resp p50", "resp p90", "resp p99", "close p50"];
    out += &format!(
        "{:<30} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "", head[0], head[1], head[2], head[3], head[4]
    );
    let row = |name: &str, rate: String, resp: &Latency, total: &Latency| {
        format!(
            "{name:<30} {rate:>10} {:>10.1} {:>10.1} {:>10.1} {:>10.1}\n",
            resp.p50_us, resp.p90_us, resp.p99_us, total.p50_us
        )
    };
    out += &row("direct", format!("{:.0}", c.direct.conns_per_s), &c.direct.first_response, &c.direct.total);
    let warm = &c.mesh_mtls_pooled;
    out += &row(
        "mesh, tunnel pooled (warm)",
        format!("{:.0}", warm.conns_per_s),
        &warm.first_response,
        &warm.total,
    );
    out += &row(
        "mesh, new tunnel (cold)",
        format!("{:.0}*", cold.implied_conns_per_s),
        &cold.first_response,
        &cold.total,
    );
    out += &row("mesh, next conn after cold", "-".into(), &cold.next_first_response, &cold.next_total);
    let cmp = &c.mesh_vs_direct;
    out += &format!(
        "warm mesh vs direct: {:.2}x the rate, +{:.1} us resp p50 (paired over rounds: +{:.1} us)\n",
        cmp.conns_per_s_ratio, cmp.first_response_p50.added_us, cmp.added_first_response_p50_paired_us
    );
    out += &format!(
        "opening the tunnel added {:.1} us to the first connection (median of cold - next, paired); \
         agent restart to ready: p50 {:.0} ms\n",
        cold.tunnel_setup_added_us, cold.agent_ready_ms_p50
    );
    out += "  conn/s     completed connections per second of one sequential client (median over rounds)\n";
    out += "             * implied for cold: 1 / median close time, as if every connection opened its own\n";
    out += "               TLS connection (one per agent restart was measured, not a rate)\n";
    out += "  resp pNN   us from connect() until the whole echo arrived: setup plus one round trip\n";
    out += "  close p50  us from connect() until the server's close arrived after the client's\n";
    out += "             half-close: the whole connection\n";
    out += "  cold       the first connection after node-a's agent restarted: TCP + TLS 1.3 (mutual, full\n";
    out += "             handshake) + HTTP/2 to node-b, then CONNECT; p99 of under 100 samples is the max\n";
    let host = &r.environment.host;
    out += &format!("{} CPUs, load average {} at the end\n", host.cpus, host.load_average);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rounds::tests::report;
    use crate::rounds::{compare, summarize};

    fn lat(p50: f64) -> Latency {
        Latency { p50_us: p50, p90_us: p50 * 2.0, p99_us: p50 * 3.0, mean_us: p50 + 1.0 }
    }

    fn crr(rate: f64, resp_p50: f64) -> CrrReport {
        CrrReport {
            count: 100,
            elapsed_s: 100.0 / rate,
            conns_per_s: rate,
            connect: lat(resp_p50 / 10.0),
            first_response: lat(resp_p50),
            total: lat(resp_p50 + 50.0),
            local_ips: vec!["127.0.0.1".into()],
            peer_ips_seen_by_server: vec!["127.0.0.1".into()],
        }
    }

    fn cold(first: f64, next: f64, ready_ms: f64) -> ColdSample {
        ColdSample { agent_ready_ms: ready_ms, first: crr(1.0, first), next: crr(1.0, next) }
    }

    #[test]
    fn connection_rounds_take_the_median_of_each_figure() {
        let s = summarize_conns(vec![crr(3000.0, 100.0), crr(1000.0, 300.0), crr(2000.0, 200.0)]);
        assert_eq!(s.conns_per_s, 2000.0);
        assert_eq!(s.conns_per_s_range, [1000.0, 3000.0]);
        assert_eq!(s.first_response, lat(200.0));
        assert_eq!(s.total, lat(250.0));
        assert_eq!(s.connect.p50_us, 20.0);
        assert_eq!(s.rounds.len(), 3);
    }

    #[test]
    fn connection_comparison_pairs_rounds() {
        let direct = summarize_conns(vec![crr(4000.0, 100.0), crr(5000.0, 90.0), crr(3000.0, 120.0)]);
        let mesh = summarize_conns(vec![crr(1000.0, 300.0), crr(2000.0, 200.0), crr(1500.0, 400.0)]);
        let c = compare_conns(&direct, &mesh);
        assert_eq!(c.conns_per_s_ratio, 1500.0 / 4000.0);
        assert_eq!(c.first_response_p50, Delta { added_us: 200.0, ratio: 3.0 });
        // Per round: 200, 110, 280; the median is 200.
        assert_eq!(c.added_first_response_p50_paired_us, 200.0);
    }

    #[test]
    fn cold_samples_pair_the_first_and_the_next_connection() {
        let c = summarize_cold(
            "m",
            vec![cold(900.0, 200.0, 40.0), cold(1500.0, 300.0, 60.0), cold(1000.0, 100.0, 50.0)],
        );
        assert_eq!(c.samples, 3);
        assert_eq!((c.first_response.p50_us, c.first_response.p99_us), (1000.0, 1500.0));
        assert_eq!(c.next_first_response.p50_us, 200.0);
        // Per sample: 700, 1200, 900.
        assert_eq!(c.tunnel_setup_added_us, 900.0);
        assert_eq!(c.total.p50_us, 1050.0);
        assert_eq!(c.implied_conns_per_s, 1e6 / 1050.0);
        assert_eq!((c.agent_ready_ms_p50, c.agent_ready_ms_max), (50.0, 60.0));
        assert_eq!(summarize_cold("m", Vec::new()).implied_conns_per_s, 0.0);
    }

    #[test]
    fn table_names_every_scenario_and_explains_the_columns() {
        let direct = summarize(vec![report(40.0)]);
        let mesh = summarize(vec![report(100.0)]);
        let conns_direct = summarize_conns(vec![crr(5000.0, 150.0)]);
        let conns_mesh = summarize_conns(vec![crr(1250.0, 600.0)]);
        let results = Results {
            benchmark: "cross_node",
            mode: "quick",
            size_bytes: 1024,
            plan: Plan { rr: RrPlan::new(true), connections: ConnPlan::new(true) },
            rr: RrResults { method: "", mesh_vs_direct: compare(&direct, &mesh), direct, mesh_mtls: mesh },
            connections: ConnResults {
                method: "",
                mesh_vs_direct: compare_conns(&conns_direct, &conns_mesh),
                direct: conns_direct,
                mesh_mtls_pooled: conns_mesh,
            },
            cold: summarize_cold("", vec![cold(2000.0, 600.0, 80.0)]),
            environment: Environment {
                host: Host::now(),
                direct_path: String::new(),
                mesh_path: String::new(),
                tuning: "",
            },
        };
        let text = table(&results);
        assert!(text.contains("mesh (mTLS)     100.0     200.0     300.0     101.0"), "{text}");
        assert!(text.contains("added            60.0     120.0     180.0      60.0"), "{text}");
        let rows: Vec<&str> =
            text.lines().filter(|l| l.starts_with("direct") || l.starts_with("mesh,")).collect();
        assert_eq!(rows.len(), 5, "{text}");
        assert!(
            rows[1].starts_with("direct") && rows[1].contains(" 5000 ") && rows[1].contains("150.0"),
            "{text}"
        );
        assert!(rows[2].contains(" 1250 ") && rows[2].contains("600.0  "), "{text}");
        // 1 / 2050 us.
        assert!(rows[3].contains(" 488* ") && rows[3].contains("2000.0"), "{text}");
        assert!(rows[4].contains(" - ") && rows[4].contains("600.0"), "{text}");
        assert!(text.contains("0.25x the rate, +450.0 us resp p50"), "{text}");
        assert!(text.contains("opening the tunnel added 1400.0 us"), "{text}");
        assert!(text.contains("resp pNN   us from connect()"), "{text}");
    }
}
