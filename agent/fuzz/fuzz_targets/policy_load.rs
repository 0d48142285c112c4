//! Policy files are written by users and arrive through ConfigMaps: whatever their bytes, loading
//! them must fail with a message, never panic, and what loads must be decidable. So: bytes (as
//! UTF-8 when they are) go to `parse_file`; a set that loads is indexed for workloads its own
//! selectors pick, and every decision on a few fixed connections must agree with what `explain`
//! (what `ferry trace` shows) says of each policy.

#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use ferry::policy::{
    Action, Authorizer, Connection, Considered, DEFAULT_ROOT_NAMESPACE, Decision, Outcome, Peer, Reason,
    RuleRef, Verdict, WorkloadRef, parse_file,
};
use libfuzzer_sys::fuzz_target;

/// Workloads made from the set's own selectors, at most: enough to reach every kind of match while
/// keeping each input fast.
const MAX_WORKLOADS: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let policies = match parse_file(Path::new("fuzz.yaml"), text) {
        Ok(policies) => policies,
        Err(e) => {
            // The message is shown to operators: building it must not panic either.
            let _ = e.to_string();
            return;
        }
    };
    // One workload selected by each of the first policies, plus one no selector names.
    let mut workloads: Vec<(String, String, BTreeMap<String, String>)> = policies
        .iter()
        .take(MAX_WORKLOADS)
        .enumerate()
        .map(|(i, (p, _))| {
            (format!("{}/w{i}", p.namespace), p.namespace.clone(), p.selector.clone().unwrap_or_default())
        })
        .collect();
    workloads.push(("default/plain".into(), "default".into(), BTreeMap::new()));
    let refs: Vec<WorkloadRef<'_>> =
        workloads.iter().map(|(key, namespace, labels)| WorkloadRef { key, namespace, labels }).collect();
    let a = Authorizer::new(policies, DEFAULT_ROOT_NAMESPACE, refs.iter().copied());
    let conns = connections();
    for w in &refs {
        for conn in &conns {
            let d = a.decide(w.key, conn);
            let explained = a.explain(*w, conn);
            assert_eq!(d, from_explanation(&a, *w, &explained), "decide and explain disagree for {}", w.key);
        }
    }
    assert_eq!(a.decide("nowhere/none", &conns[0]).enforced.reason, Reason::UnknownWorkload);
});

/// mTLS with a Kubernetes SPIFFE ID, plaintext, an ID of another form over IPv6 (IPv4-mapped source),
/// and a connection with no known source address.
fn connections() -> [Connection<'static>; 4] {
    let k8s = Peer {
        principal: "cluster.local/ns/default/sa/default",
        namespace: Some("default"),
        service_account: Some("default"),
    };
    let other = Peer { principal: "example.org/workload", namespace: None, service_account: None };
    let ip = |s: &str| s.parse().expect("address");
    [
        Connection {
            source_ip: Some(ip("10.0.0.1")),
            peer: Some(k8s),
            destination_ip: ip("10.0.0.2"),
            destination_port: 8080,
        },
        Connection {
            source_ip: Some(ip("192.168.1.1")),
            peer: None,
            destination_ip: ip("10.0.0.2"),
            destination_port: 80,
        },
        Connection {
            source_ip: Some(ip("::ffff:10.1.2.3")),
            peer: Some(other),
            destination_ip: ip("fd00::1"),
            destination_port: 443,
        },
        Connection { source_ip: None, peer: None, destination_ip: ip("10.0.0.2"), destination_port: 1 },
    ]
}

/// The decision that Istio's order gives to what `explain` says of each policy: the first matching
/// DENY, else the first matching ALLOW when any ALLOW selects, else allow; dry-run policies count
/// only in the dry-run outcome; AUDIT (dry-run or not) only in `audit`.
fn from_explanation(a: &Authorizer, w: WorkloadRef<'_>, explained: &[Considered]) -> Decision {
    // `explain` lists the policies of the root namespace and the workload's, in load order.
    let indexes: Vec<u32> = (0..a.policies().len() as u32)
        .filter(|&i| {
            a.policy(i).is_some_and(|p| p.namespace == a.root_namespace() || p.namespace == w.namespace)
        })
        .collect();
    assert_eq!(indexes.len(), explained.len(), "explain lists other policies than the workload's scope");
    let mut entries: Vec<(u32, Action, &Considered)> = Vec::new();
    for (&i, c) in indexes.iter().zip(explained) {
        let p = a.policy(i).expect("policy");
        assert_eq!(c.policy, p.key(), "explain lists the policies out of order");
        if c.selects {
            entries.push((i, p.action, c));
        }
    }
    let matched = |(i, _, c): &(u32, Action, &Considered)| {
        c.matched.then(|| RuleRef { policy: *i, rule: c.rule.expect("a matched policy names its rule") })
    };
    let outcome = |with_dry_run: bool| {
        let counted = |e: &&(u32, Action, &Considered)| with_dry_run || !e.2.dry_run;
        let of = |action: Action| entries.iter().filter(move |e| e.1 == action).filter(counted);
        if let Some(by) = of(Action::Deny).find_map(matched) {
            return Outcome { verdict: Verdict::Deny, reason: Reason::DenyMatched, by: Some(by) };
        }
        if of(Action::Allow).next().is_none() {
            return Outcome { verdict: Verdict::Allow, reason: Reason::NoAllowPolicies, by: None };
        }
        match of(Action::Allow).find_map(matched) {
            Some(by) => Outcome { verdict: Verdict::Allow, reason: Reason::AllowMatched, by: Some(by) },
            None => Outcome { verdict: Verdict::Deny, reason: Reason::NoAllowMatched, by: None },
        }
    };
    let has_dry_run = entries.iter().any(|(_, action, c)| c.dry_run && *action != Action::Audit);
    Decision {
        enforced: outcome(false),
        dry_run: has_dry_run.then(|| outcome(true)),
        audit: entries.iter().filter(|e| e.1 == Action::Audit).find_map(matched),
    }
}
