//! The round-trip latency Ferry adds between two pods of one node (`OUT/rr.json`).
//!
//! One node with the agent running (the shared scenario) plus two pods that are not in the mesh
//! file. Two scenarios, measured in the same run with the same sizes and counts:
//! - `direct`: between the two unenrolled pods (plain TCP over the node's bridge);
//! - `mesh`: from the enrolled client pod to an enrolled server pod's address, so each round trip
//!   crosses the outbound proxy hop in the client pod and the inbound hop in the server pod
//!   (plaintext L4: the scenario has no CA).
//!
//! Each measurement is `ferry-testapp rr`: one persistent connection, closed loop (the next 1 KiB
//! request is sent once the previous 1 KiB response has fully arrived), so it measures per-hop
//! latency at a concurrency of one, not throughput or latency under load.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use ferry_tests::Pod;
use ferry_tests::scenario::{SERVER_PORT, Scenario, events_of, pod_key, serve, wait_events};
use ferry_tests::testapp::{self, ConnectOpts};
use serde::Serialize;

use crate::rounds::{Comparison, Summary, compare, rr_rows, spread_line, summarize};
use crate::{Host, RrPlan, SIZE, check_direct_path, mode, rr_rounds, write_results};

/// The rr.json document.
#[derive(Debug, Serialize)]
struct Results {
    benchmark: &'static str,
    method: &'static str,
    mode: &'static str,
    size_bytes: usize,
    plan: RrPlan,
    direct: Summary,
    mesh: Summary,
    mesh_vs_direct: Comparison,
    environment: Environment,
}

/// Where the figures were measured.
#[derive(Debug, Serialize)]
struct Environment {
    #[serde(flatten)]
    host: Host,
    direct_path: String,
    mesh_path: String,
}

/// Measures, writes `out/rr.json` and prints the table.
pub fn run(quick: bool, out: &Path) -> Result<()> {
    let plan = RrPlan::new(quick);
    eprintln!("ferry-bench: one node: starting the node and the agent...");
    let mut s = Scenario::start("bench").context("cannot start the bench scenario")?;
    let direct_client = s.node.add_pod("direct-a")?;
    let direct_server = s.node.add_pod("direct-b")?;
    let _direct_echo = serve(&direct_server, SERVER_PORT, direct_server.name())?;
    let mesh_server = &s.servers[0];
    let direct_to = SocketAddr::new(direct_server.ipv4().into(), SERVER_PORT);
    let mesh_to = SocketAddr::new(mesh_server.ipv4().into(), SERVER_PORT);
    check_direct_path(&direct_client, direct_to)?;
    check_mesh_path(&s, mesh_to)?;
    let closes_before = events_of(&s.agent, "conn_close").len();

    let (direct, mesh) = rr_rounds(plan, (&direct_client, direct_to), (&s.client, mesh_to))?;
    // Each mesh round is one connection through two proxy hops; direct rounds are not seen at all.
    let want = closes_before + 2 * plan.rounds;
    let closes = wait_events(&s.agent, want, |e| e["event"] == "conn_close");
    ensure!(
        closes.len() == want,
        "expected {} proxy records for {} mesh rounds and none for direct rounds, got {:?}",
        2 * plan.rounds,
        plan.rounds,
        &closes[closes_before.min(closes.len())..]
    );
    let (direct, mesh) = (summarize(direct), summarize(mesh));
    let results = Results {
        benchmark: "rr",
        method: "closed loop: 1 KiB request, then its 1 KiB echo, on one persistent TCP connection; \
                 per-scenario percentiles are the median over rounds of each round's percentile",
        mode: mode(quick),
        size_bytes: SIZE,
        plan,
        mesh_vs_direct: compare(&direct, &mesh),
        direct,
        mesh,
        environment: environment(&s, &direct_client, direct_to, mesh_to),
    };
    let path = write_results(out, "rr.json", &results)?;
    print!("{}", table(&results));
    println!("written to {}", path.display());
    Ok(())
}

/// The mesh pair goes through both hops: the app is redirected to loopback, and the agent records
/// an outbound and an inbound connection.
fn check_mesh_path(s: &Scenario, to: SocketAddr) -> Result<()> {
    let r = testapp::connect(&s.client, to, &ConnectOpts { bytes: SIZE, ..ConnectOpts::default() })?;
    ensure!(r.ok == 1, "mesh path client -> {to} does not work: {r:?}");
    ensure!(r.local_addrs.iter().all(|a| a.starts_with("127.0.0.1:")), "client was not redirected: {r:?}");
    let dst = to.to_string();
    let hops = wait_events(&s.agent, 2, |e| e["event"] == "conn_close" && e["orig_dst"] == dst.as_str());
    let client = pod_key(&s.client);
    ensure!(
        hops.iter().any(|e| e["direction"] == "outbound" && e["pod"] == client.as_str())
            && hops.iter().any(|e| e["direction"] == "inbound" && e["src_pod"] == client.as_str()),
        "mesh path client -> {to} did not cross both proxy hops: {hops:?}"
    );
    Ok(())
}

fn environment(s: &Scenario, direct: &Pod, direct_to: SocketAddr, mesh_to: SocketAddr) -> Environment {
    Environment {
        host: Host::now(),
        direct_path: format!("{} (not enrolled) -> {direct_to} (not enrolled)", direct.name()),
        mesh_path: format!("{} -> outbound proxy -> inbound proxy -> {mesh_to}", pod_key(&s.client)),
    }
}

/// The human-readable table.
fn table(r: &Results) -> String {
    let (d, m, c) = (&r.direct, &r.mesh, &r.mesh_vs_direct);
    let mut out = format!(
        "\nrr: {} B request/response, closed loop, one connection; {} rounds x {} round trips ({})\n",
        r.size_bytes, r.plan.rounds, r.plan.round_trips, r.mode
    );
    out += &rr_rows(["direct", "mesh"], d, m, c);
    out += &spread_line(d, m, c);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rounds::tests::report;

    #[test]
    fn table_shows_both_scenarios_and_the_difference() {
        let direct = summarize(vec![report(10.0)]);
        let mesh = summarize(vec![report(25.0)]);
        let results = Results {
            benchmark: "rr",
            method: "",
            mode: "quick",
            size_bytes: SIZE,
            plan: RrPlan::new(true),
            mesh_vs_direct: compare(&direct, &mesh),
            direct,
            mesh,
            environment: Environment {
                host: Host::now(),
                direct_path: String::new(),
                mesh_path: String::new(),
            },
        };
        let text = table(&results);
        assert!(text.contains("direct          10.0      20.0      30.0      11.0"), "{text}");
        assert!(text.contains("added           15.0      30.0      45.0      15.0"), "{text}");
        assert!(text.contains("ratio          2.50x"), "{text}");
    }
}
