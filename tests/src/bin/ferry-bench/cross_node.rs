//! Pod to pod across two nodes (`OUT/cross_node.json`): direct between two pods outside the mesh,
//! against enrolled client (node-a) -> enrolled server (node-b) through Ferry, where each app
//! connection goes outbound listener -> HBONE stream (HTTP/2 CONNECT over mutual TLS 1.3, pooled
//! per source identity and destination) -> the server pod's tunnel listener -> the app over
//! loopback. Three measurements, in this order:
//! 1. round trips on one open connection (`ferry-testapp rr`), interleaved rounds;
//! 2. new connections one after another (`ferry-testapp crr`), interleaved rounds, while a
//!    long-lived connection from the client keeps the TLS connection pooled;
//! 3. cold: node-a's agent restarted (which drops its pool), then one connection, which opens a
//!    new TLS connection, then one more over it; repeated.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use ferry_tests::scenario::{EVENT_WAIT, NAMESPACE, wait_events};
use ferry_tests::testapp::{self, ConnectOpts, CrrReport, Load, RrReport};
use ferry_tests::{ChildGuard, bin_path};
use serde_json::Value;

use crate::cross_report::{
    ColdSample, ConnPlan, ConnResults, Environment, Plan, Results, RrResults, compare_conns, summarize_cold,
    summarize_conns, table,
};
use crate::rounds::{Kind, Pair, compare, interleave, summarize};
use crate::two_nodes::TwoNodes;
use crate::{Host, RrPlan, SIZE, check_direct_path, mode, rr_rounds, write_results};

/// Where the mesh client's connections appear: redirected to the outbound listener on loopback.
const LOOPBACK: &str = "127.0.0.1";

/// Measures, writes `out/cross_node.json` and prints the tables.
pub fn run(quick: bool, out: &Path) -> Result<()> {
    let plan = Plan { rr: RrPlan::new(quick), connections: ConnPlan::new(quick) };
    eprintln!("ferry-bench: two nodes: starting the nodes, the CA and both agents...");
    let mut t = TwoNodes::start().context("cannot start the two-node bench topology")?;
    check_direct_path(&t.direct_client, t.direct_to())?;
    check_mesh_path(&t)?;

    let before = Seen::of(&t)?;
    let (rr_direct, rr_mesh) =
        rr_rounds(plan.rr, (&t.direct_client, t.direct_to()), (&t.client, t.mesh_to()))?;
    let holder = hold_tunnel(&t)?;
    let held = Seen::of(&t)?;
    let (conns_direct, conns_mesh) = conn_rounds(&t, plan.connections)?;
    // Every mesh connection crossed both agents over mTLS, the connection rounds opened no TLS
    // connection, and the direct rounds were not seen at all.
    let per_round = plan.connections.connections + plan.connections.warmup;
    let mesh_conns = plan.rr.rounds + plan.connections.rounds * per_round as usize;
    let want = Seen {
        outbound: before.outbound + mesh_conns,
        inbound: before.inbound + mesh_conns,
        inbound_mtls: before.inbound_mtls + mesh_conns,
        tunnels: held.tunnels,
    };
    let seen = Seen::wait(&t, |s| s.inbound >= want.inbound && s.outbound >= want.outbound)?;
    ensure!(
        seen == want,
        "after {mesh_conns} mesh connections (and a long-lived one still open) the agents should have \
         recorded {want:?}, not {seen:?}"
    );
    drop(holder);
    let cold = cold_samples(&mut t, plan.connections.cold_samples)?;

    let results = results(quick, plan, &t, (rr_direct, rr_mesh), (conns_direct, conns_mesh), cold);
    let path = write_results(out, "cross_node.json", &results)?;
    print!("{}", table(&results));
    println!("written to {}", path.display());
    Ok(())
}

/// The document from the rounds and samples.
fn results(
    quick: bool,
    plan: Plan,
    t: &TwoNodes,
    rr: Pair<RrReport>,
    conns: Pair<CrrReport>,
    cold: Vec<ColdSample>,
) -> Results {
    let (rr_direct, rr_mesh) = (summarize(rr.0), summarize(rr.1));
    let (conns_direct, conns_mesh) = (summarize_conns(conns.0), summarize_conns(conns.1));
    Results {
        benchmark: "cross_node",
        mode: mode(quick),
        size_bytes: SIZE,
        plan,
        rr: RrResults {
            method: "closed loop: 1 KiB request, then its 1 KiB echo, on one persistent TCP connection \
                     between pods on two nodes; percentiles are the median over rounds of each round's",
            mesh_vs_direct: compare(&rr_direct, &rr_mesh),
            direct: rr_direct,
            mesh_mtls: rr_mesh,
        },
        connections: ConnResults {
            method: "one client, sequential connections: connect, 1 KiB request, its 1 KiB echo, \
                     half-close, read the server's close; conns_per_s = connections / wall time; the \
                     mesh's TLS connection stays pooled (a long-lived connection holds it open); \
                     figures are the median over rounds",
            mesh_vs_direct: compare_conns(&conns_direct, &conns_mesh),
            direct: conns_direct,
            mesh_mtls_pooled: conns_mesh,
        },
        cold: summarize_cold(
            "per sample: stop node-a's agent (SIGTERM, which closes its pooled TLS connections), \
             start it again, then one connection as above (it opens a new TLS connection to \
             node-b: full TLS 1.3 handshake, no resumption) and one more over that connection",
            cold,
        ),
        environment: Environment {
            host: Host::now(),
            direct_path: format!(
                "{} on node-a (not enrolled) -> {} on node-b (not enrolled), routed over the node link",
                t.direct_client.name(),
                t.direct_to()
            ),
            mesh_path: format!(
                "{NAMESPACE}/{} on node-a -> outbound listener -> HBONE (HTTP/2 CONNECT over mTLS 1.3) -> \
                 {}:15008 tunnel listener on node-b -> {} over loopback",
                t.client.name(),
                t.server.ipv4(),
                t.mesh_to()
            ),
            tuning: "net.ipv4.tcp_tw_reuse=1 in all four pods (each connection leaves a TIME_WAIT \
                     socket on the side that closed first, all to one server address)",
        },
    }
}

/// What the agents recorded so far: closed outbound connections on node-a, closed inbound ones on
/// node-b (all, and those over mTLS from the enrolled client), TLS connections node-b accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    outbound: usize,
    inbound: usize,
    inbound_mtls: usize,
    tunnels: usize,
}

impl Seen {
    fn of(t: &TwoNodes) -> Result<Self> {
        Ok(Self::count(&t.a()?.events(), &t.b.events(), &format!("{NAMESPACE}/{}", t.client.name())))
    }

    fn count(a: &[Value], b: &[Value], client: &str) -> Self {
        let closes = |events: &[Value], direction: &str| -> Vec<Value> {
            events
                .iter()
                .filter(|e| e["event"] == "conn_close" && e["direction"] == direction)
                .cloned()
                .collect()
        };
        let inbound = closes(b, "inbound");
        Seen {
            outbound: closes(a, "outbound").len(),
            inbound_mtls: inbound
                .iter()
                .filter(|e| e["security"] == "mutual_tls" && e["src_pod"] == client)
                .count(),
            inbound: inbound.len(),
            tunnels: b.iter().filter(|e| e["event"] == "tunnel_accept").count(),
        }
    }

    /// Waits up to [`EVENT_WAIT`] for `done`; what was seen then.
    fn wait(t: &TwoNodes, done: impl Fn(&Seen) -> bool) -> Result<Self> {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let seen = Self::of(t)?;
            if done(&seen) || Instant::now() > deadline {
                return Ok(seen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The enrolled pair goes through both agents over mTLS: the app is redirected to loopback, node-a
/// records an outbound connection and node-b an inbound one, both with the workload identities.
fn check_mesh_path(t: &TwoNodes) -> Result<()> {
    let to = t.mesh_to();
    let r = testapp::connect(&t.client, to, &ConnectOpts { bytes: SIZE, ..ConnectOpts::default() })?;
    ensure!(r.ok == 1, "mesh path client -> {to} does not work: {r:?}");
    ensure!(r.local_addrs.iter().all(|a| a.starts_with("127.0.0.1:")), "client was not redirected: {r:?}");
    let seen = Seen::wait(t, |s| s.outbound >= 1 && s.inbound >= 1)?;
    ensure!(
        seen == Seen { outbound: 1, inbound: 1, inbound_mtls: 1, tunnels: 1 },
        "mesh path client -> {to} did not cross both agents over one mTLS connection: {seen:?}\n\
         node-a: {:?}\nnode-b: {:?}",
        t.a()?.events(),
        t.b.events()
    );
    Ok(())
}

/// Opens a connection from the enrolled client to the server that stays open until the guard
/// drops, so node-a's agent keeps its TLS connection to node-b pooled (it closes idle ones).
fn hold_tunnel(t: &TwoNodes) -> Result<ChildGuard> {
    let opened = |e: &Value| e["event"] == "conn_open" && e["direction"] == "inbound";
    let before = t.b.events().iter().filter(|e| opened(e)).count();
    let day = (24 * 3600 * 1000u64).to_string();
    let mut cmd = t.client.command(bin_path("ferry-testapp"));
    cmd.args(["connect", &t.mesh_to().to_string(), "--bytes", "1", "--hold-ms", &day, "--timeout-ms", &day])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let holder = t.client.spawn(cmd)?;
    if wait_events(&t.b, before + 1, opened).len() <= before {
        bail!("the long-lived connection did not reach node-b: {}", holder.stderr());
    }
    Ok(holder)
}

/// Interleaved `crr` rounds, direct and through the pooled tunnel; each round is checked to have
/// taken its path (direct: the server saw the client's own address; mesh: redirected).
fn conn_rounds(t: &TwoNodes, plan: ConnPlan) -> Result<Pair<CrrReport>> {
    let load = Load { size: SIZE, count: plan.connections, warmup: plan.warmup };
    eprintln!(
        "ferry-bench: crr: {} rounds x {} connections (+{} warm-up) per scenario",
        plan.rounds, load.count, load.warmup
    );
    let own = t.direct_client.ipv4().to_string();
    interleave(plan.rounds, |kind, round| {
        let (pod, to, ips) = match kind {
            Kind::Direct => (&t.direct_client, t.direct_to(), own.as_str()),
            Kind::Mesh => (&t.client, t.mesh_to(), LOOPBACK),
        };
        let r = testapp::crr(pod, to, load)?;
        ensure!(r.count == load.count && r.local_ips == [ips], "not the {} path: {r:?}", kind.name());
        if kind == Kind::Direct {
            ensure!(r.peer_ips_seen_by_server == [ips], "the direct server saw another peer: {r:?}");
        }
        eprintln!(
            "  round {round} {:<6} {:>7.0} conn/s, resp p50 {:>8.1} us",
            kind.name(),
            r.conns_per_s,
            r.first_response.p50_us
        );
        Ok(r)
    })
}

/// `samples` times: restart node-a's agent, then one connection (which must open exactly one new
/// TLS connection on node-b) and one more (which must not).
fn cold_samples(t: &mut TwoNodes, samples: usize) -> Result<Vec<ColdSample>> {
    eprintln!("ferry-bench: cold: {samples} agent restarts, each followed by two connections");
    let one = Load { size: SIZE, count: 1, warmup: 0 };
    let mut out = Vec::with_capacity(samples);
    for i in 1..=samples {
        let ready = t.restart_a().with_context(|| format!("cold sample {i}"))?;
        let before = Seen::of(t)?;
        let first = testapp::crr(&t.client, t.mesh_to(), one).with_context(|| format!("cold sample {i}"))?;
        let next = testapp::crr(&t.client, t.mesh_to(), one).with_context(|| format!("cold sample {i}"))?;
        for r in [&first, &next] {
            ensure!(r.count == 1 && r.local_ips == [LOOPBACK], "cold sample {i}: not redirected: {r:?}");
        }
        let want = Seen {
            outbound: before.outbound + 2,
            inbound: before.inbound + 2,
            inbound_mtls: before.inbound_mtls + 2,
            tunnels: before.tunnels + 1,
        };
        let seen = Seen::wait(t, |s| s.inbound >= want.inbound && s.outbound >= want.outbound)?;
        ensure!(
            seen == want,
            "cold sample {i}: expected two mTLS connections over one new TLS connection ({want:?}), \
             saw {seen:?}"
        );
        eprintln!(
            "  sample {i}: ready {:>5.0} ms, resp first {:>8.1} us, next {:>8.1} us",
            ready.as_secs_f64() * 1e3,
            first.first_response.p50_us,
            next.first_response.p50_us
        );
        out.push(ColdSample { agent_ready_ms: ready.as_secs_f64() * 1e3, first, next });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seen_counts_each_kind_of_record() {
        let a = [
            json!({"event": "conn_close", "direction": "outbound"}),
            json!({"event": "conn_open", "direction": "outbound"}),
            json!({"event": "conn_close", "direction": "inbound"}),
        ];
        let b = [
            json!({"event": "tunnel_accept"}),
            json!({"event": "conn_close", "direction": "inbound", "security": "mutual_tls", "src_pod": "demo/client"}),
            json!({"event": "conn_close", "direction": "inbound", "security": "none", "src_pod": "demo/client"}),
            json!({"event": "conn_close", "direction": "inbound", "security": "mutual_tls", "src_pod": "demo/other"}),
            json!({"event": "conn_open", "direction": "inbound"}),
        ];
        let seen = Seen::count(&a, &b, "demo/client");
        assert_eq!(seen, Seen { outbound: 1, inbound: 3, inbound_mtls: 1, tunnels: 1 });
    }
}
