//! The policy set of `ferry-mtls-policy` and the proof that the agents enforce it: Istio's
//! mesh-wide allow-nothing, one ALLOW that lets the client's identity reach the servers, and a
//! handful of policies of other namespaces, so the agents index and skip a realistic set.

use std::net::SocketAddr;

use anyhow::{Result, bail, ensure};
use serde_json::Value;

use ferry_tests::policy_dir::PolicyDir;
use ferry_tests::scenario::{NAMESPACE, SERVER_PORT, SERVICE, pod_key, wait_events};
use ferry_tests::testapp::{self, ConnectOpts};
use ferry_tests::{Agent, Pod};

use crate::plan::SIZE;
use crate::world::{CLIENT_SA, World};

/// The namespace whose policies apply mesh-wide (also the agent's default).
pub const ROOT_NAMESPACE: &str = "ferry-system";
/// The policy that lets the client in, as the agents name it in their records.
const ALLOW_CLIENT: &str = "demo/allow-client";
/// How many policies [`write_set`] writes; each agent must load them all.
const POLICIES: u64 = 8;

/// Istio's "allow nothing": an ALLOW without rules in the root namespace selects every workload
/// and matches nothing, so only a namespace's own ALLOW lets a connection in.
const ALLOW_NOTHING: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: ferry-system
spec: {}
"#;

/// Policies of namespaces the bench has no pods in: they select no workload here, and the agents
/// must still load, index and pass over them.
const OTHER_NAMESPACES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: payments
spec:
  selector:
    matchLabels:
      app: payments
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["frontend"]
    to:
    - operation:
        ports: ["8443"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-outside-cluster
  namespace: payments
spec:
  action: DENY
  rules:
  - from:
    - source:
        notIpBlocks: ["10.0.0.0/8"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-ingress
  namespace: frontend
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/istio-ingress/sa/ingressgateway"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-scrape
  namespace: monitoring
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        serviceAccounts: ["monitoring/prometheus"]
    to:
    - operation:
        ports: ["9090", "9100"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-other-namespaces
  namespace: batch
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["batch", "ferry-system"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-all
  namespace: legacy
spec:
  action: AUDIT
  rules:
  - {}
"#;

/// The SPIFFE ID of service account `sa` of the bench's namespace without `spiffe://`, as
/// policies write principals.
fn principal(sa: &str) -> String {
    format!("{}/ns/{NAMESPACE}/sa/{sa}", crate::meshes::TRUST_DOMAIN)
}

/// The servers' namespace ALLOW: the client's principal to the echo workload's app port.
fn allow_client() -> String {
    let (namespace, name) = ALLOW_CLIENT.split_once('/').expect("namespace/name");
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: {namespace}
spec:
  selector:
    matchLabels:
      app: {SERVICE}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{principal}"]
    to:
    - operation:
        ports: ["{SERVER_PORT}"]
"#,
        principal = principal(CLIENT_SA)
    )
}

/// Writes the whole set into a new directory, for both agents' mesh files.
pub fn write_set() -> Result<PolicyDir> {
    PolicyDir::with_files(&[
        ("mesh-wide.yaml", ALLOW_NOTHING),
        ("demo.yaml", &allow_client()),
        ("other-namespaces.yaml", OTHER_NAMESPACES),
    ])
}

/// Proves the set is in force and lets the client in: both agents loaded all of it; the servers'
/// agent allowed each of the client's `conns` connections by [`ALLOW_CLIENT`]; and a connection
/// from another identity (one server to another, service account `echo`) is denied.
pub fn check(world: &World, client_agent: &Agent, server_agent: &Agent, conns: usize) -> Result<()> {
    for agent in [client_agent, server_agent] {
        let loaded =
            agent.events().into_iter().find(|e| e["event"] == "ready").map(|e| e["policies"].clone());
        ensure!(
            loaded == Some(POLICIES.into()),
            "agent {} loaded {loaded:?} policies, not {POLICIES}",
            agent.pid()
        );
    }
    let client_id = format!("spiffe://{}", principal(CLIENT_SA));
    let from_client = |e: &Value| {
        e["event"] == "conn_close" && e["direction"] == "inbound" && e["src_identity"] == client_id.as_str()
    };
    let records = wait_events(server_agent, conns, from_client);
    ensure!(
        records.len() >= conns,
        "the servers' agent recorded {} of {conns} client connections",
        records.len()
    );
    let not_allowed: Vec<&Value> = records
        .iter()
        .filter(|e| e["policy_decision"] != "allow" || e["policy"] != ALLOW_CLIENT || e["policy_rule"] != 0)
        .collect();
    ensure!(
        not_allowed.is_empty(),
        "client connections not allowed by {ALLOW_CLIENT} rule 0: {not_allowed:?}"
    );
    denied_between_servers(world, server_agent)
}

/// One server calls another directly: its identity matches no ALLOW, so the allow-nothing policy
/// must refuse it at the destination's agent, and the caller gets no echo.
fn denied_between_servers(world: &World, server_agent: &Agent) -> Result<()> {
    let [from, to, ..] = world.servers.as_slice() else { bail!("the check needs two servers") };
    let addr = SocketAddr::new(to.ipv4().into(), SERVER_PORT);
    let r = testapp::connect(from, addr, &ConnectOpts { bytes: SIZE, ..ConnectOpts::default() })?;
    ensure!((r.ok, r.failed) == (0, 1), "{} -> {addr} must be refused: {r:?}", from.name());
    let refused = wait_events(server_agent, 1, |e| refused_at(e, to));
    ensure!(refused.len() == 1, "the servers' agent recorded {} refusals at {}", refused.len(), to.name());
    let decision = &refused[0]["policy_decision"];
    ensure!(decision == "deny", "the refusal at {} was decided {decision}: {}", to.name(), refused[0]);
    Ok(())
}

/// Whether `e` is the destination's refusal of a connection into `pod` from a server (whose
/// identity is the service's account): the only such connection is the probe's.
fn refused_at(e: &Value, pod: &Pod) -> bool {
    let id = format!("spiffe://{}", principal(SERVICE));
    e["event"] == "conn_refused"
        && e["direction"] == "inbound"
        && e["pod"] == pod_key(pod).as_str()
        && e["src_identity"] == id.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_has_the_policies_the_check_counts() {
        let texts = [ALLOW_NOTHING.to_owned(), allow_client(), OTHER_NAMESPACES.to_owned()];
        let documents: usize = texts.iter().map(|t| t.matches("kind: AuthorizationPolicy\n").count()).sum();
        assert_eq!(documents as u64, POLICIES);
        assert!(ALLOW_NOTHING.contains(&format!("namespace: {ROOT_NAMESPACE}\n")), "{ALLOW_NOTHING}");
        let allow = allow_client();
        assert!(allow.contains(r#"principals: ["cluster.local/ns/demo/sa/client"]"#), "{allow}");
        assert!(allow.contains("  name: allow-client\n  namespace: demo\n"), "{allow}");
    }
}
