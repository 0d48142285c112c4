//! The policy set that `benches/policy_decision.rs` and `tests/policy_decision_allocates_nothing.rs`
//! share through `#[path]`, so the library carries none of it: 1,000 Istio `AuthorizationPolicy`
//! documents, as YAML text, for a node running 100 workloads (20 namespaces of 5), of which exactly
//! 20 select the measured workload, and the connections that reach each kind of decision there.
//!
//! The set mixes what real meshes write: a mesh-wide DENY and AUDIT in the root namespace, per
//! namespace `require-mtls` DENYs, probe and Prometheus ALLOWs, a dry-run DENY, per-service ALLOWs
//! on principals (exact, `prefix*`, `*suffix`, `*`), namespaces, service accounts, IP blocks,
//! ports and `when` keys (`source.ip`, `destination.port`, `source.namespace`), rules with HTTP
//! fields, and policies of namespaces that have no workload on this node (a node sees the cluster's).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use ferry::policy::{
    Authorizer, Connection, DEFAULT_ROOT_NAMESPACE, Decision, Outcome, Peer, Reason, Verdict, WorkloadRef,
    parse_file,
};

/// How many policies the set has.
pub const POLICIES: usize = 1_000;

/// How many of them select [`TARGET`].
pub const SELECTING_TARGET: usize = 20;

/// The measured workload, `namespace/name`.
pub const TARGET: &str = "team-07/svc-3";

/// Namespaces with workloads on this node; further namespaces only hold policies.
const LOCAL_NAMESPACES: usize = 20;

/// Workloads per local namespace.
const SERVICES: usize = 5;

/// The trust domain of every principal.
const TRUST_DOMAIN: &str = "cluster.local";

/// TARGET's namespace and service numbers.
const TARGET_AT: (usize, usize) = (7, 3);

/// One workload on this node.
pub struct Workload {
    /// `namespace/name`.
    pub key: String,
    /// Its namespace.
    pub namespace: String,
    /// Its pod labels.
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// The form `Authorizer::new` takes.
    pub fn as_ref(&self) -> WorkloadRef<'_> {
        WorkloadRef { key: &self.key, namespace: &self.namespace, labels: &self.labels }
    }
}

/// The 100 workloads: `team-NN/svc-K`, labelled `app`, `tier` and `version`.
pub fn workloads() -> Vec<Workload> {
    let mut out = Vec::with_capacity(LOCAL_NAMESPACES * SERVICES);
    for n in 0..LOCAL_NAMESPACES {
        for k in 0..SERVICES {
            let labels =
                [("app", format!("svc-{k}")), ("tier", tier(k).into()), ("version", version(n, k).into())];
            out.push(Workload {
                key: format!("{}/svc-{k}", ns(n)),
                namespace: ns(n),
                labels: labels.into_iter().map(|(key, v)| (key.to_owned(), v)).collect(),
            });
        }
    }
    out
}

fn ns(n: usize) -> String {
    format!("team-{n:02}")
}

fn tier(k: usize) -> &'static str {
    if k < 2 { "front" } else { "back" }
}

fn version(n: usize, k: usize) -> &'static str {
    if (n + k).is_multiple_of(3) { "v2" } else { "v1" }
}

/// Pod addresses: 10.(100+N).K.10, clear of the node range 10.0.0.0/24 that probes come from.
fn pod_ip(n: usize, k: usize) -> String {
    format!("10.{}.{k}.10", 100 + n)
}

/// The whole set as one multi-document YAML file.
pub fn policies_yaml() -> String {
    let mut docs = root_policies();
    for n in 0..LOCAL_NAMESPACES {
        docs.extend(namespace_policies(n));
        for k in 0..SERVICES {
            let all = service_policies(n, k);
            // The measured workload is a busy one; the others have fewer policies of their own.
            let keep = if (n, k) == TARGET_AT { all.len() } else { 5 + (n + k) % 4 };
            docs.extend(all.into_iter().take(keep));
        }
    }
    // The rest belongs to namespaces with no workload here: indexed away, never evaluated.
    let mut n = LOCAL_NAMESPACES;
    while docs.len() < POLICIES {
        docs.extend(namespace_policies(n));
        docs.extend((0..SERVICES).flat_map(|k| service_policies(n, k)));
        n += 1;
    }
    docs.truncate(POLICIES);
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        doc.write(&mut out, i);
    }
    out
}

/// Parses the set, indexes it for [`workloads`] and checks that [`SELECTING_TARGET`] policies select
/// [`TARGET`].
pub fn authorizer() -> Authorizer {
    let yaml = policies_yaml();
    let policies = parse_file(Path::new("policy-set.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(policies.len(), POLICIES);
    let workloads = workloads();
    let a = Authorizer::new(policies, DEFAULT_ROOT_NAMESPACE, workloads.iter().map(Workload::as_ref));
    let selecting = (0..POLICIES as u32).filter(|&i| a.selected_workloads(i).contains(&TARGET)).count();
    assert_eq!(selecting, SELECTING_TARGET, "policies selecting {TARGET}");
    a
}

/// One policy document.
struct Doc {
    namespace: String,
    name: String,
    dry_run: bool,
    /// `matchLabels` as a YAML flow map; empty selects the whole namespace.
    selector: String,
    action: &'static str,
    /// Each rule as a YAML flow map.
    rules: Vec<String>,
}

impl Doc {
    fn new(namespace: &str, name: impl Into<String>, action: &'static str, rules: &[String]) -> Self {
        Doc {
            namespace: namespace.to_owned(),
            name: name.into(),
            dry_run: false,
            selector: String::new(),
            action,
            rules: rules.to_vec(),
        }
    }

    fn selecting(mut self, labels: String) -> Self {
        self.selector = labels;
        self
    }

    fn dry_run(mut self) -> Self {
        self.dry_run = true;
        self
    }

    /// Writes the document in kubectl's block layout, rules in flow style; every third document
    /// uses the v1beta1 API, as older manifests do.
    fn write(&self, out: &mut String, index: usize) {
        let api = if index % 3 == 2 { "v1beta1" } else { "v1" };
        let _ = write!(
            out,
            "---\napiVersion: security.istio.io/{api}\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  \
             namespace: {}\n",
            self.name, self.namespace
        );
        if self.dry_run {
            out.push_str("  annotations:\n    istio.io/dry-run: \"true\"\n");
        }
        out.push_str("spec:\n");
        if !self.selector.is_empty() {
            let _ = writeln!(out, "  selector:\n    matchLabels: {}", self.selector);
        }
        let _ = writeln!(out, "  action: {}\n  rules:", self.action);
        for rule in &self.rules {
            let _ = writeln!(out, "  - {rule}");
        }
    }
}

/// Mesh-wide policies in the root namespace: they select every workload.
fn root_policies() -> Vec<Doc> {
    let root = DEFAULT_ROOT_NAMESPACE;
    vec![
        Doc::new(
            root,
            "mesh-deny-quarantine",
            "DENY",
            &[format!(
                r#"{{from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/quarantine/*", "*/sa/compromised"]}}}}, {{source: {{namespaces: ["quarantine"]}}}}]}}"#
            )],
        ),
        Doc::new(root, "mesh-audit-metrics", "AUDIT", &[r#"{to: [{operation: {ports: ["9090"]}}]}"#.into()]),
        Doc::new(
            root,
            "mesh-deny-external-admin",
            "DENY",
            &[r#"{from: [{source: {notIpBlocks: ["10.0.0.0/8", "fd00::/8"]}}], to: [{operation: {ports: [15000, 15004]}}]}"#.into()],
        ),
    ]
}

/// Namespace-wide policies of namespace `n` (no selector).
fn namespace_policies(n: usize) -> Vec<Doc> {
    let ns = ns(n);
    let dry = format!("team-{:02}", (n + 17) % 20);
    vec![
        Doc::new(
            &ns,
            "require-mtls",
            "DENY",
            &[r#"{from: [{source: {notPrincipals: ["*"]}}], to: [{operation: {ports: ["8080", "8443"]}}]}"#.into()],
        ),
        Doc::new(
            &ns,
            "allow-kubelet-probes",
            "ALLOW",
            &[r#"{from: [{source: {ipBlocks: ["10.0.0.0/24"]}}], to: [{operation: {ports: ["8081"]}}]}"#.into()],
        ),
        Doc::new(
            &ns,
            "allow-prometheus",
            "ALLOW",
            &[r#"{from: [{source: {namespaces: ["monitoring"]}}], to: [{operation: {ports: ["9090"]}}]}"#.into()],
        ),
        // Paths need HTTP: on plain TCP a DENY counts them as matched, so it covers the port.
        Doc::new(
            &ns,
            "deny-admin-paths",
            "DENY",
            &[format!(
                r#"{{from: [{{source: {{notNamespaces: ["{ns}"]}}}}], to: [{{operation: {{ports: ["8443"], paths: ["/admin/*", "/debug/*"]}}}}]}}"#
            )],
        ),
        Doc::new(&ns, "audit-external", "AUDIT", &[r#"{when: [{key: source.ip, notValues: ["10.0.0.0/8"]}]}"#.into()]),
        Doc::new(
            &ns,
            format!("dry-run-deny-{dry}"),
            "DENY",
            &[format!(
                r#"{{from: [{{source: {{namespaces: ["{dry}"]}}}}], when: [{{key: destination.port, values: ["8080"]}}]}}"#
            )],
        )
        .dry_run(),
    ]
}

/// The policies of service `k` in namespace `n`, in the order a busy service accumulates them.
fn service_policies(n: usize, k: usize) -> Vec<Doc> {
    let ns = ns(n);
    let app = format!("{{app: svc-{k}}}");
    let team = |d: usize| format!("team-{:02}", (n + d) % 20);
    let (dry, front, reports, client) = (team(17), team(1), team(2), team(15));
    let client_net = format!("10.{}.0.0/16", 100 + (n + 15) % 20);
    let other_version = if version(n, k) == "v1" { "v2" } else { "v1" };
    let s = |name: &str| format!("svc-{k}-{name}");
    vec![
        // For a canary that runs elsewhere: selects no workload of this node.
        Doc::new(
            &ns,
            s("allow-canary-probes"),
            "ALLOW",
            &[r#"{from: [{source: {ipBlocks: ["10.0.0.0/24"]}}], to: [{operation: {ports: ["8082"]}}]}"#.into()],
        )
        .selecting(format!("{{app: svc-{k}, version: {other_version}}}")),
        Doc::new(
            &ns,
            s("allow-api-reads"),
            "ALLOW",
            &[r#"{from: [{source: {namespaces: ["team-*"]}}], to: [{operation: {methods: ["GET", "HEAD"], paths: ["/api/*"]}}]}"#.into()],
        )
        .selecting(app.clone()),
        Doc::new(&ns, s("deny-debug-ports"), "DENY", &[r#"{to: [{operation: {ports: [6060, 6061]}}]}"#.into()])
            .selecting(app.clone()),
        Doc::new(
            &ns,
            s("deny-outside-ranges"),
            "DENY",
            &[r#"{when: [{key: source.ip, values: ["192.168.0.0/16", "172.16.0.0/12"]}, {key: destination.port, values: ["8080"]}]}"#.into()],
        )
        .selecting(app.clone()),
        Doc::new(
            &ns,
            s(&format!("allow-{dry}")),
            "ALLOW",
            &[format!(r#"{{from: [{{source: {{namespaces: ["{dry}"]}}}}], to: [{{operation: {{ports: ["8080"]}}}}]}}"#)],
        )
        .selecting(app.clone()),
        Doc::new(
            &ns,
            s("allow-frontends"),
            "ALLOW",
            &[format!(
                r#"{{from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/{front}/sa/svc-0", "{TRUST_DOMAIN}/ns/{front}/sa/svc-1"]}}}}], to: [{{operation: {{ports: ["8080"]}}}}]}}"#
            )],
        )
        .selecting(app.clone()),
        Doc::new(
            &ns,
            s("allow-reporting"),
            "ALLOW",
            &[format!(
                r#"{{from: [{{source: {{serviceAccounts: ["{reports}/svc-2"]}}}}], to: [{{operation: {{ports: ["8080", "8443"]}}}}]}}"#
            )],
        )
        .selecting(format!("{{app: svc-{k}, tier: {}}}", tier(k))),
        Doc::new(
            &ns,
            s("allow-batch"),
            "ALLOW",
            &[r#"{from: [{source: {namespaces: ["batch-*"]}}], to: [{operation: {notPorts: ["15000"]}}], when: [{key: source.namespace, notValues: ["batch-sandbox"]}]}"#.into()],
        )
        .selecting(app.clone()),
        Doc::new(
            &ns,
            s("allow-canaries"),
            "ALLOW",
            &[
                format!(r#"{{from: [{{source: {{principals: ["*/sa/svc-{k}-canary"]}}}}]}}"#),
                format!(
                    r#"{{from: [{{source: {{ipBlocks: ["10.{}.{k}.0/24"]}}}}], to: [{{operation: {{ports: ["8080"]}}}}]}}"#,
                    100 + n
                ),
            ],
        )
        .selecting(format!("{{app: svc-{k}, version: {}}}", version(n, k))),
        Doc::new(
            &ns,
            s("allow-same-namespace"),
            "ALLOW",
            &[format!(
                r#"{{from: [{{source: {{namespaces: ["{ns}"]}}}}], to: [{{operation: {{notPorts: ["15000", "15004"]}}}}]}}"#
            )],
        )
        .selecting(app.clone()),
        Doc::new(
            &ns,
            s("allow-ingress"),
            "ALLOW",
            &[format!(
                r#"{{from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/ingress/sa/gateway"]}}}}], when: [{{key: source.ip, values: ["10.250.0.0/16"]}}, {{key: destination.port, values: ["8080", "8443"]}}]}}"#
            )],
        )
        .selecting(app.clone()),
        Doc::new(
            &ns,
            s("allow-clients"),
            "ALLOW",
            &[format!(
                r#"{{from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/{client}/sa/svc-1"]}}}}], to: [{{operation: {{ports: ["8080"]}}}}], when: [{{key: source.ip, values: ["{client_net}"]}}]}}"#
            )],
        )
        .selecting(app),
    ]
}

/// An outcome as a case expects it: verdict, reason, and the deciding `namespace/name` and rule.
pub type Expect = (Verdict, Reason, Option<(&'static str, u32)>);

/// A connection to [`TARGET`] and the decision the set must give it.
pub struct Case {
    /// What the case exercises.
    pub name: &'static str,
    /// (principal, namespace, service account) of an mTLS peer; `None` for plaintext.
    peer: Option<(String, String, String)>,
    source_ip: IpAddr,
    destination_port: u16,
    /// The enforced outcome.
    pub enforced: Expect,
    /// The outcome with dry-run policies enforced too (TARGET has a dry-run policy, so always some).
    pub dry_run: Expect,
    /// The AUDIT policy and rule that match, if any.
    pub audit: Option<(&'static str, u32)>,
}

impl Case {
    /// The connection to decide.
    pub fn connection(&self) -> Connection<'_> {
        Connection {
            source_ip: Some(self.source_ip),
            peer: self.peer.as_ref().map(|(principal, namespace, service_account)| Peer {
                principal,
                namespace: Some(namespace),
                service_account: Some(service_account),
            }),
            destination_ip: pod_ip(TARGET_AT.0, TARGET_AT.1).parse().expect("pod address"),
            destination_port: self.destination_port,
        }
    }

    /// Panics, naming the case, unless `d` (for this case's connection) is what the case expects.
    pub fn check(&self, a: &Authorizer, d: &Decision) {
        let named = |o: &Outcome| {
            (o.verdict, o.reason, o.by.map(|r| (a.policy(r.policy).expect("policy").key(), r.rule)))
        };
        let want = |e: &Expect| (e.0, e.1, e.2.map(|(key, rule)| (key.to_owned(), rule)));
        let audit = d.audit.map(|r| (a.policy(r.policy).expect("policy").key(), r.rule));
        assert_eq!(named(&d.enforced), want(&self.enforced), "{}: enforced", self.name);
        assert_eq!(d.dry_run.as_ref().map(named), Some(want(&self.dry_run)), "{}: dry run", self.name);
        assert_eq!(audit, self.audit.map(|(key, rule)| (key.to_owned(), rule)), "{}: audit", self.name);
    }
}

/// An outcome that `key` (`namespace/name`) decided with its first rule.
fn by(verdict: Verdict, key: &'static str) -> Expect {
    let reason = if verdict == Verdict::Allow { Reason::AllowMatched } else { Reason::DenyMatched };
    (verdict, reason, Some((key, 0)))
}

/// The connections to [`TARGET`] that reach each kind of decision; the first is the benchmark's mTLS
/// call, the second its plaintext one, the third the longest walk (every policy, no match).
pub fn cases() -> Vec<Case> {
    use Verdict::{Allow, Deny};
    let no_allow = (Deny, Reason::NoAllowMatched, None);
    let (clients, probes) =
        (by(Allow, "team-07/svc-3-allow-clients"), by(Allow, "team-07/allow-kubelet-probes"));
    let quarantine = by(Deny, "ferry-system/mesh-deny-quarantine");
    let require_mtls = by(Deny, "team-07/require-mtls");
    let team_04 = by(Allow, "team-07/svc-3-allow-team-04");
    let prometheus = by(Allow, "team-07/allow-prometheus");
    let admin_paths = by(Deny, "team-07/deny-admin-paths");
    let external_admin = by(Deny, "ferry-system/mesh-deny-external-admin");
    let dry_deny = Some(by(Deny, "team-07/dry-run-deny-team-04"));
    let (metrics, external) =
        (Some(("ferry-system/mesh-audit-metrics", 0)), Some(("team-07/audit-external", 0)));
    // Name; mTLS peer (namespace, service account) or plaintext; source; port; enforced outcome;
    // the dry-run outcome where it differs; the AUDIT match.
    #[rustfmt::skip]
    let rows = [
        ("mtls, the last ALLOW", Some(("team-02", "svc-1")), "10.102.1.10", 8080, clients, None, None),
        ("plaintext probe allowed by ipBlocks", None, "10.0.0.5", 8081, probes, None, None),
        ("mtls matching no ALLOW", Some(("team-05", "svc-0")), "10.105.0.10", 8080, no_allow, None, None),
        ("quarantined", Some(("quarantine", "scanner")), "10.201.0.7", 8080, quarantine, None, None),
        ("plaintext to the app port", None, "10.102.1.10", 8080, require_mtls, None, None),
        ("dry-run DENY", Some(("team-04", "svc-1")), "10.104.1.10", 8080, team_04, dry_deny, None),
        ("audited scrape", Some(("monitoring", "prometheus")), "10.200.0.5", 9090, prometheus, None, metrics),
        ("DENY with HTTP fields", Some(("team-09", "svc-2")), "10.109.2.10", 8443, admin_paths, None, None),
        ("external plaintext to the admin port", None, "203.0.113.7", 15000, external_admin, None, external),
    ];
    rows.into_iter()
        .map(|(name, peer, source, destination_port, enforced, dry_run, audit)| Case {
            name,
            peer: peer.map(|(namespace, account)| {
                (
                    format!("{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"),
                    namespace.to_owned(),
                    account.to_owned(),
                )
            }),
            source_ip: source.parse().expect("address"),
            destination_port,
            enforced,
            dry_run: dry_run.unwrap_or(enforced),
            audit,
        })
        .collect()
}
