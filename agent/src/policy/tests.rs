//! Table-driven tests of the policy engine: Istio's semantics case by case, and its validation
//! messages.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;

const TD: &str = "cluster.local";

/// The workloads every case can target.
fn workloads() -> Vec<(String, String, BTreeMap<String, String>)> {
    let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    vec![
        ("demo/echo".into(), "demo".into(), labels(&[("app", "echo"), ("version", "v1")])),
        ("demo/db".into(), "demo".into(), labels(&[("app", "db")])),
        ("other/web".into(), "other".into(), labels(&[("app", "web")])),
    ]
}

fn authorizer(yaml: &str) -> Authorizer {
    let policies = parse_file(Path::new("test.yaml"), yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let w = workloads();
    Authorizer::new(
        policies,
        DEFAULT_ROOT_NAMESPACE,
        w.iter().map(|(key, namespace, labels)| WorkloadRef { key, namespace, labels }),
    )
}

/// A source: `mtls NS SA IP` or `plain IP`.
struct Src {
    principal: Option<String>,
    ns: Option<String>,
    sa: Option<String>,
    ip: &'static str,
}

fn mtls(ns: &str, sa: &str, ip: &'static str) -> Src {
    Src { principal: Some(format!("{TD}/ns/{ns}/sa/{sa}")), ns: Some(ns.into()), sa: Some(sa.into()), ip }
}

fn plain(ip: &'static str) -> Src {
    Src { principal: None, ns: None, sa: None, ip }
}

fn decide(a: &Authorizer, workload: &str, src: &Src, dst: &str, port: u16) -> Decision {
    let peer = src.principal.as_deref().map(|principal| Peer {
        principal,
        namespace: src.ns.as_deref(),
        service_account: src.sa.as_deref(),
    });
    let conn = Connection {
        source_ip: Some(src.ip.parse().unwrap()),
        peer,
        destination_ip: dst.parse().unwrap(),
        destination_port: port,
    };
    a.decide(workload, &conn)
}

/// What a case expects: the verdict and the deciding `namespace/name` and rule, if any.
type Want = (Verdict, Option<(&'static str, u32)>);

const ALLOW: Verdict = Verdict::Allow;
const DENY: Verdict = Verdict::Deny;

fn check(name: &str, yaml: &str, cases: &[(&str, Src, u16, Want)]) {
    let a = authorizer(yaml);
    for (i, (workload, src, port, (verdict, by))) in cases.iter().enumerate() {
        let d = decide(&a, workload, src, "10.1.0.2", *port);
        let got_by = d.enforced.by.map(|r| (a.policy(r.policy).unwrap().key(), r.rule));
        let want_by = by.map(|(k, r)| (k.to_owned(), r));
        assert_eq!(
            (d.enforced.verdict, got_by),
            (*verdict, want_by),
            "{name}, case {i} ({workload}, {:?} {})",
            src.principal,
            src.ip
        );
    }
}

const HDR: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

fn doc(ns: &str, name: &str, spec: &str) -> String {
    format!("{HDR}metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

#[test]
fn no_policy_allows_everything() {
    check(
        "none",
        "",
        &[
            ("demo/echo", plain("10.9.0.1"), 80, (ALLOW, None)),
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
}

#[test]
fn empty_spec_denies_everything_in_scope() {
    let yaml = format!("{HDR}metadata:\n  name: allow-nothing\n  namespace: demo\nspec: {{}}\n");
    check(
        "spec {}",
        &yaml,
        &[
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, None)),
            ("demo/db", mtls("demo", "client", "10.9.0.1"), 80, (DENY, None)),
            // Another namespace is out of scope.
            ("other/web", plain("10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
}

#[test]
fn one_empty_rule_allows_all_or_denies_all() {
    let allow_all = doc("demo", "allow-all", "  rules:\n  - {}\n");
    check(
        "allow all",
        &allow_all,
        &[("demo/echo", plain("10.9.0.1"), 80, (ALLOW, Some(("demo/allow-all", 0))))],
    );
    let deny_all = doc("demo", "deny-all", "  action: DENY\n  rules:\n  - {}\n");
    check(
        "deny all",
        &deny_all,
        &[
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (DENY, Some(("demo/deny-all", 0)))),
            ("other/web", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
}

#[test]
fn principals_without_scheme_and_plaintext_has_none() {
    let yaml = doc(
        "demo",
        "by-principal",
        "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n",
    );
    check(
        "principals",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, Some(("demo/by-principal", 0)))),
            ("demo/echo", mtls("demo", "other", "10.9.0.1"), 80, (DENY, None)),
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, None)),
        ],
    );
}

#[test]
fn not_principals_star_denies_plaintext_only() {
    // Istio's own acceptance case: DENY notPrincipals ["*"]: plaintext deny, mTLS allow.
    let yaml = doc(
        "demo",
        "require-mtls",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n",
    );
    check(
        "notPrincipals *",
        &yaml,
        &[
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, Some(("demo/require-mtls", 0)))),
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
}

#[test]
fn string_match_forms_on_principals() {
    let yaml = doc(
        "demo",
        "forms",
        "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/prod/*\", \"*/sa/admin\", \"exact.td/ns/x/sa/y\"]\n",
    );
    check(
        "forms",
        &yaml,
        &[
            ("demo/echo", mtls("prod", "anything", "10.9.0.1"), 80, (ALLOW, Some(("demo/forms", 0)))),
            ("demo/echo", mtls("dev", "admin", "10.9.0.1"), 80, (ALLOW, Some(("demo/forms", 0)))),
            ("demo/echo", mtls("dev", "admins", "10.9.0.1"), 80, (DENY, None)),
            ("demo/echo", mtls("production", "x", "10.9.0.1"), 80, (DENY, None)),
        ],
    );
    let present =
        doc("demo", "any-peer", "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]\n");
    check(
        "present",
        &present,
        &[
            ("demo/echo", mtls("dev", "a", "10.9.0.1"), 80, (ALLOW, Some(("demo/any-peer", 0)))),
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, None)),
        ],
    );
}

#[test]
fn namespaces_and_not_namespaces() {
    let yaml = doc(
        "demo",
        "deny-ns",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"bad\", \"test-*\"]\n",
    );
    check(
        "namespaces",
        &yaml,
        &[
            ("demo/echo", mtls("bad", "a", "10.9.0.1"), 80, (DENY, Some(("demo/deny-ns", 0)))),
            ("demo/echo", mtls("test-1", "a", "10.9.0.1"), 80, (DENY, Some(("demo/deny-ns", 0)))),
            ("demo/echo", mtls("good", "a", "10.9.0.1"), 80, (ALLOW, None)),
            // Plaintext has no namespace: a positive namespaces field never matches it.
            ("demo/echo", plain("10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
    let not = doc(
        "demo",
        "only-demo",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [\"demo\"]\n",
    );
    check(
        "notNamespaces",
        &not,
        &[
            ("demo/echo", mtls("demo", "a", "10.9.0.1"), 80, (ALLOW, None)),
            ("demo/echo", mtls("other", "a", "10.9.0.1"), 80, (DENY, Some(("demo/only-demo", 0)))),
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, Some(("demo/only-demo", 0)))),
        ],
    );
}

#[test]
fn service_accounts() {
    let yaml = doc(
        "demo",
        "by-sa",
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"demo/client\"]\n",
    );
    check(
        "serviceAccounts",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, Some(("demo/by-sa", 0)))),
            ("demo/echo", mtls("demo", "clients", "10.9.0.1"), 80, (DENY, None)),
            ("demo/echo", mtls("demox", "client", "10.9.0.1"), 80, (DENY, None)),
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, None)),
        ],
    );
    let not = doc(
        "demo",
        "not-sa",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        notServiceAccounts: [\"demo/client\"]\n",
    );
    check(
        "notServiceAccounts",
        &not,
        &[
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, None)),
            ("demo/echo", mtls("demo", "x", "10.9.0.1"), 80, (DENY, Some(("demo/not-sa", 0)))),
        ],
    );
}

#[test]
fn ip_blocks_and_not_ip_blocks() {
    let yaml = doc(
        "demo",
        "lan",
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.9.0.0/16\", \"192.0.2.7\"]\n",
    );
    check(
        "ipBlocks",
        &yaml,
        &[
            ("demo/echo", plain("10.9.3.4"), 80, (ALLOW, Some(("demo/lan", 0)))),
            ("demo/echo", plain("192.0.2.7"), 80, (ALLOW, Some(("demo/lan", 0)))),
            ("demo/echo", plain("192.0.2.8"), 80, (DENY, None)),
            ("demo/echo", plain("::ffff:10.9.0.1"), 80, (ALLOW, Some(("demo/lan", 0)))),
        ],
    );
    let not = doc(
        "demo",
        "not-lan",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        notIpBlocks: [\"10.9.0.0/16\"]\n",
    );
    check(
        "notIpBlocks",
        &not,
        &[
            ("demo/echo", plain("10.9.3.4"), 80, (ALLOW, None)),
            ("demo/echo", plain("10.8.0.1"), 80, (DENY, Some(("demo/not-lan", 0)))),
        ],
    );
}

#[test]
fn ports_and_not_ports_are_the_app_port() {
    let yaml = doc("demo", "ports", "  rules:\n  - to:\n    - operation:\n        ports: [\"8080\", 9090]\n");
    check(
        "ports",
        &yaml,
        &[
            ("demo/echo", plain("10.9.0.1"), 8080, (ALLOW, Some(("demo/ports", 0)))),
            ("demo/echo", plain("10.9.0.1"), 9090, (ALLOW, Some(("demo/ports", 0)))),
            ("demo/echo", plain("10.9.0.1"), 15008, (DENY, None)),
        ],
    );
    let not = doc(
        "demo",
        "not-ports",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        notPorts: [\"8080\"]\n",
    );
    check(
        "notPorts",
        &not,
        &[
            ("demo/echo", plain("10.9.0.1"), 8080, (ALLOW, None)),
            ("demo/echo", plain("10.9.0.1"), 22, (DENY, Some(("demo/not-ports", 0)))),
        ],
    );
}

#[test]
fn fields_in_a_source_are_anded_and_entries_ored() {
    let yaml = doc(
        "demo",
        "combo",
        "  rules:\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n        ipBlocks: [\"10.9.0.0/16\"]\n    - source:\n        principals: [\"cluster.local/ns/ops/sa/admin\"]\n    to:\n    - operation:\n        ports: [\"80\"]\n",
    );
    check(
        "and/or",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "a", "10.9.0.1"), 80, (ALLOW, Some(("demo/combo", 0)))),
            // namespace matches, address does not: that source entry fails as a whole.
            ("demo/echo", mtls("demo", "a", "10.8.0.1"), 80, (DENY, None)),
            // the second entry matches on its own.
            ("demo/echo", mtls("ops", "admin", "10.8.0.1"), 80, (ALLOW, Some(("demo/combo", 0)))),
            // from matches, to does not.
            ("demo/echo", mtls("ops", "admin", "10.8.0.1"), 81, (DENY, None)),
        ],
    );
}

#[test]
fn rules_are_ored_and_the_first_match_is_reported() {
    let yaml = doc(
        "demo",
        "two-rules",
        "  rules:\n  - to:\n    - operation:\n        ports: [\"81\"]\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n",
    );
    check(
        "rules",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "a", "10.9.0.1"), 80, (ALLOW, Some(("demo/two-rules", 1)))),
            ("demo/echo", plain("10.9.0.1"), 81, (ALLOW, Some(("demo/two-rules", 0)))),
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, None)),
        ],
    );
}

#[test]
fn when_conditions_are_anded_with_values_and_not_values() {
    let yaml = doc(
        "demo",
        "when",
        "  rules:\n  - when:\n    - key: source.ip\n      values: [\"10.9.0.0/16\"]\n      notValues: [\"10.9.9.9\"]\n    - key: destination.port\n      values: [\"80\"]\n",
    );
    check(
        "when",
        &yaml,
        &[
            ("demo/echo", plain("10.9.0.1"), 80, (ALLOW, Some(("demo/when", 0)))),
            ("demo/echo", plain("10.9.9.9"), 80, (DENY, None)),
            ("demo/echo", plain("10.9.0.1"), 81, (DENY, None)),
        ],
    );
}

#[test]
fn when_identity_keys() {
    let yaml = doc(
        "demo",
        "when-id",
        "  rules:\n  - when:\n    - key: source.namespace\n      values: [\"demo\"]\n    - key: source.principal\n      values: [\"*/sa/client\"]\n    - key: source.serviceAccount\n      notValues: [\"demo/banned\"]\n",
    );
    check(
        "when identity",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, Some(("demo/when-id", 0)))),
            ("demo/echo", mtls("other", "client", "10.9.0.1"), 80, (DENY, None)),
            ("demo/echo", mtls("demo", "server", "10.9.0.1"), 80, (DENY, None)),
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, None)),
        ],
    );
}

#[test]
fn when_destination_ip() {
    let yaml = doc(
        "demo",
        "dst",
        "  action: DENY\n  rules:\n  - when:\n    - key: destination.ip\n      values: [\"10.1.0.2\"]\n",
    );
    let a = authorizer(&yaml);
    let d = decide(&a, "demo/echo", &plain("10.9.0.1"), "10.1.0.2", 80);
    assert_eq!(d.enforced.verdict, DENY);
    let d = decide(&a, "demo/echo", &plain("10.9.0.1"), "10.1.0.3", 80);
    assert_eq!(d.enforced.verdict, ALLOW);
}

#[test]
fn deny_wins_over_allow() {
    let yaml = [
        doc("demo", "allow-all", "  rules:\n  - {}\n"),
        doc(
            "demo",
            "deny-bad",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"bad\"]\n",
        ),
    ]
    .join("---\n");
    check(
        "deny first",
        &yaml,
        &[
            ("demo/echo", mtls("bad", "a", "10.9.0.1"), 80, (DENY, Some(("demo/deny-bad", 0)))),
            ("demo/echo", mtls("good", "a", "10.9.0.1"), 80, (ALLOW, Some(("demo/allow-all", 0)))),
        ],
    );
}

#[test]
fn root_namespace_policies_apply_everywhere() {
    let yaml = [
        doc(DEFAULT_ROOT_NAMESPACE, "allow-nothing", "  {}\n"),
        doc(
            "demo",
            "allow-client",
            "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n",
        ),
    ]
    .join("---\n");
    check(
        "mesh-wide deny-all",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "client", "10.9.0.1"), 80, (ALLOW, Some(("demo/allow-client", 0)))),
            ("demo/echo", mtls("demo", "other", "10.9.0.1"), 80, (DENY, None)),
            ("other/web", mtls("demo", "client", "10.9.0.1"), 80, (DENY, None)),
        ],
    );
}

#[test]
fn root_namespace_selector_matches_labels_in_any_namespace() {
    let yaml = doc(
        DEFAULT_ROOT_NAMESPACE,
        "deny-web",
        "  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - {}\n",
    );
    check(
        "root selector",
        &yaml,
        &[
            ("other/web", plain("10.9.0.1"), 80, (DENY, Some(("ferry-system/deny-web", 0)))),
            ("demo/echo", plain("10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
}

#[test]
fn a_non_root_namespace_policy_never_leaves_its_namespace() {
    let yaml = doc("other", "deny", "  action: DENY\n  rules:\n  - {}\n");
    check(
        "namespace scope",
        &yaml,
        &[
            ("demo/echo", plain("10.9.0.1"), 80, (ALLOW, None)),
            ("other/web", plain("10.9.0.1"), 80, (DENY, Some(("other/deny", 0)))),
        ],
    );
}

#[test]
fn selectors_need_every_label() {
    let yaml = doc(
        "demo",
        "echo-v1",
        "  selector:\n    matchLabels:\n      app: echo\n      version: v1\n  action: DENY\n  rules:\n  - {}\n",
    );
    check(
        "selector",
        &yaml,
        &[
            ("demo/echo", plain("10.9.0.1"), 80, (DENY, Some(("demo/echo-v1", 0)))),
            ("demo/db", plain("10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
    let v2 = doc(
        "demo",
        "echo-v2",
        "  selector:\n    matchLabels:\n      app: echo\n      version: v2\n  {}\n"
            .replace("  {}\n", "")
            .as_str(),
    );
    check("selector v2", &v2, &[("demo/echo", plain("10.9.0.1"), 80, (ALLOW, None))]);
}

#[test]
fn a_workload_the_node_cannot_place_is_denied() {
    let a = authorizer("");
    let d = decide(&a, "nowhere/pod", &plain("10.9.0.1"), "10.1.0.2", 80);
    assert_eq!((d.enforced.verdict, d.enforced.reason), (DENY, Reason::UnknownWorkload));
}

#[test]
fn a_failed_policy_set_denies_everything() {
    let a = Authorizer::failed("bad file".into());
    let d = decide(&a, "demo/echo", &plain("10.9.0.1"), "10.1.0.2", 80);
    assert_eq!((d.enforced.verdict, d.enforced.reason), (DENY, Reason::PolicyError));
    assert_eq!(a.failure(), Some("bad file"));
}

#[test]
fn dry_run_is_evaluated_but_not_enforced() {
    let yaml = format!(
        "{HDR}metadata:\n  name: try-deny\n  namespace: demo\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n"
    );
    let a = authorizer(&yaml);
    let d = decide(&a, "demo/echo", &mtls("demo", "client", "10.9.0.1"), "10.1.0.2", 80);
    assert_eq!(d.enforced.verdict, ALLOW);
    let dry = d.dry_run.expect("dry-run outcome");
    assert_eq!(dry.verdict, DENY);
    assert_eq!(a.policy(dry.by.unwrap().policy).unwrap().key(), "demo/try-deny");
    // A workload no dry-run policy selects has no dry-run outcome.
    assert!(decide(&a, "other/web", &plain("10.9.0.1"), "10.1.0.2", 80).dry_run.is_none());
}

#[test]
fn dry_run_allow_shows_what_enforcing_it_would_deny() {
    let yaml = format!(
        "{HDR}metadata:\n  name: try-allow\n  namespace: demo\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  rules:\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n"
    );
    let a = authorizer(&yaml);
    let other = decide(&a, "demo/echo", &mtls("other", "x", "10.9.0.1"), "10.1.0.2", 80);
    assert_eq!(other.enforced.verdict, ALLOW);
    assert_eq!(other.dry_run.map(|o| (o.verdict, o.reason)), Some((DENY, Reason::NoAllowMatched)));
    let same = decide(&a, "demo/echo", &mtls("demo", "x", "10.9.0.1"), "10.1.0.2", 80);
    assert_eq!(same.dry_run.map(|o| o.verdict), Some(ALLOW));
}

#[test]
fn audit_is_logged_and_never_decides() {
    let yaml = [
        doc("demo", "audit-all", "  action: AUDIT\n  rules:\n  - {}\n"),
        doc("demo", "allow-demo", "  rules:\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n"),
    ]
    .join("---\n");
    let a = authorizer(&yaml);
    let d = decide(&a, "demo/echo", &mtls("other", "x", "10.9.0.1"), "10.1.0.2", 80);
    assert_eq!(d.enforced.verdict, DENY, "AUDIT must not allow");
    assert_eq!(d.audit.map(|r| a.policy(r.policy).unwrap().key()), Some("demo/audit-all".into()));
    let only_audit = authorizer(&doc("demo", "audit-all", "  action: AUDIT\n  rules:\n  - {}\n"));
    let d = decide(&only_audit, "demo/echo", &plain("10.9.0.1"), "10.1.0.2", 80);
    assert_eq!(
        (d.enforced.verdict, d.enforced.reason),
        (ALLOW, Reason::NoAllowPolicies),
        "AUDIT must not deny"
    );
    assert!(d.audit.is_some());
}

#[test]
fn http_fields_on_tcp_fail_closed() {
    // ALLOW needing HTTP never matches; the workload is selected, so plain TCP is denied.
    let allow = doc("demo", "get-only", "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n");
    check("allow methods", &allow, &[("demo/echo", plain("10.9.0.1"), 80, (DENY, None))]);
    for (field, spec) in [
        ("paths", "  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]\n"),
        ("hosts", "  rules:\n  - to:\n    - operation:\n        hosts: [\"example.com\"]\n"),
        ("notMethods", "  rules:\n  - to:\n    - operation:\n        notMethods: [\"DELETE\"]\n"),
        ("remoteIpBlocks", "  rules:\n  - from:\n    - source:\n        remoteIpBlocks: [\"10.0.0.0/8\"]\n"),
        ("header", "  rules:\n  - when:\n    - key: request.headers[x-foo]\n      values: [\"foo\"]\n"),
        ("sni", "  rules:\n  - when:\n    - key: connection.sni\n      values: [\"a.example\"]\n"),
    ] {
        let deny = doc("demo", "http-deny", &format!("  action: DENY\n{spec}"));
        check(
            &format!("deny {field}"),
            &deny,
            &[("demo/echo", plain("10.9.0.1"), 80, (DENY, Some(("demo/http-deny", 0))))],
        );
        let allow = doc("demo", "http-allow", spec);
        check(
            &format!("allow {field}"),
            &allow,
            &[("demo/echo", mtls("demo", "c", "10.9.0.1"), 80, (DENY, None))],
        );
    }
    // A DENY whose L4 part does not match still does not deny.
    let scoped = doc(
        "demo",
        "deny-admin",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9000\"]\n        paths: [\"/admin\"]\n",
    );
    check(
        "deny scoped",
        &scoped,
        &[
            ("demo/echo", plain("10.9.0.1"), 9000, (DENY, Some(("demo/deny-admin", 0)))),
            ("demo/echo", plain("10.9.0.1"), 80, (ALLOW, None)),
        ],
    );
}

#[test]
fn an_allow_rule_needing_http_does_not_spoil_its_neighbours() {
    let yaml = doc(
        "demo",
        "mixed",
        "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n",
    );
    check(
        "mixed",
        &yaml,
        &[
            ("demo/echo", mtls("demo", "c", "10.9.0.1"), 80, (ALLOW, Some(("demo/mixed", 1)))),
            ("demo/echo", mtls("x", "c", "10.9.0.1"), 80, (DENY, None)),
        ],
    );
}

#[test]
fn enforcement_is_reported_per_rule() {
    let yaml = [
        doc("demo", "a", "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n  - {}\n"),
        doc("demo", "d", "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/x\"]\n"),
    ]
    .join("---\n");
    let a = authorizer(&yaml);
    let kinds: Vec<Vec<&str>> = a
        .policies()
        .iter()
        .map(|p| p.rules.iter().map(|r| Authorizer::enforcement(p, r).as_str()).collect())
        .collect();
    assert_eq!(
        kinds,
        vec![vec!["needs HTTP: never matches", "L4"], vec!["needs HTTP: denies the connection"]]
    );
    assert_eq!(a.selected_workloads(0), vec!["demo/db", "demo/echo"]);
}

#[test]
fn explain_names_the_failing_field_and_the_value() {
    let yaml = [
        doc(
            "demo",
            "allow-client",
            "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n",
        ),
        doc("demo", "db-only", "  selector:\n    matchLabels:\n      app: db\n  rules:\n  - {}\n"),
    ]
    .join("---\n");
    let a = authorizer(&yaml);
    let w = workloads();
    let (key, namespace, labels) = &w[0];
    let conn = Connection {
        source_ip: Some("10.9.0.1".parse().unwrap()),
        peer: Some(Peer {
            principal: "cluster.local/ns/demo/sa/other",
            namespace: Some("demo"),
            service_account: Some("other"),
        }),
        destination_ip: "10.1.0.2".parse().unwrap(),
        destination_port: 80,
    };
    let why = a.explain(WorkloadRef { key, namespace, labels }, &conn);
    assert_eq!(why.len(), 2);
    assert!(!why[0].matched && why[0].selects);
    assert!(why[0].why.contains("source.principals \"cluster.local/ns/demo/sa/other\" matches none of [cluster.local/ns/demo/sa/client]"), "{}", why[0].why);
    assert!(!why[1].selects && why[1].why.contains("app=db"), "{}", why[1].why);
}

#[test]
fn list_documents_and_multi_document_files_load() {
    let yaml = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n---\n# comment-only documents are skipped\n---\n{}",
        "{apiVersion: security.istio.io/v1beta1, kind: AuthorizationPolicy, metadata: {name: a, namespace: demo}, spec: {}}",
        doc("demo", "b", "  action: DENY\n  rules:\n  - {}\n"),
    );
    let a = authorizer(&yaml);
    let keys: Vec<String> = a.policies().iter().map(Policy::key).collect();
    assert_eq!(keys, ["demo/a", "demo/b"]);
}

#[test]
fn a_policy_from_istio_docs_loads_unchanged() {
    // https://istio.io/latest/docs/reference/config/security/authorization-policy/ (first example).
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.headers[x-team]
      values: ["payments"]
"#;
    let policies = parse_file(Path::new("istio.yaml"), yaml).expect("Istio's example");
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].0.rules.len(), 1);
    assert!(policies[0].0.rules[0].needs_http);
}

/// Each rejected document and a piece of its message (which names field and value).
#[test]
fn validation_errors_name_the_field_and_the_value() {
    let cases: &[(&str, &str)] = &[
        (
            "  action: CUSTOM\n  provider:\n    name: ext\n  rules:\n  - {}\n",
            "spec.action: \"CUSTOM\" (an external authorizer) is not supported",
        ),
        ("  action: REJECT\n", "spec.action: \"REJECT\" is not an action"),
        ("  action: DENY\n", "spec.rules: a DENY policy needs rules"),
        (
            "  targetRefs:\n  - kind: Service\n    name: x\n",
            "spec.targetRefs: attaching to a Gateway or Service is not supported",
        ),
        ("  targetRef:\n    kind: Gateway\n    name: x\n", "spec.targetRef: attaching"),
        ("  rules:\n  - from: []\n", "spec.rules[0].from: must not be empty"),
        ("  rules:\n  - to: []\n", "spec.rules[0].to: must not be empty"),
        ("  rules:\n  - from:\n    - {}\n", "spec.rules[0].from[0].source: must not be null"),
        ("  rules:\n  - from:\n    - source: {}\n", "spec.rules[0].from[0].source: must not be empty"),
        ("  rules:\n  - to:\n    - operation: {}\n", "spec.rules[0].to[0].operation: must not be empty"),
        (
            "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.300\"]\n",
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.300\" is not an IP address or CIDR",
        ),
        (
            "  rules:\n  - to:\n    - operation:\n        ports: [\"0\"]\n",
            "spec.rules[0].to[0].operation.ports[0]: port 0 is not in 1..65535",
        ),
        ("  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n", "\"http\" is not a port number"),
        (
            "  rules:\n  - from:\n    - source:\n        principals: [\"\"]\n",
            "source.principals[0]: empty value not allowed",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/a/sa/b\"]\n",
            "write principals without \"spiffe://\"",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"a/b\"]\n        namespaces: [\"a\"]\n",
            "serviceAccounts: cannot be set together with principals or namespaces",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"justname\"]\n",
            "\"justname\" must be NAMESPACE/SERVICEACCOUNT",
        ),
        (
            "  rules:\n  - when:\n    - key: source.ipp\n      values: [\"1.2.3.4\"]\n",
            "spec.rules[0].when[0].key: unknown attribute \"source.ipp\"",
        ),
        (
            "  rules:\n  - when:\n    - key: experimental.envoy.filters.x\n      values: [\"a\"]\n",
            "is not supported by Ferry",
        ),
        (
            "  rules:\n  - when:\n    - key: source.ip\n",
            "at least one of values or notValues must be set for key \"source.ip\"",
        ),
        (
            "  rules:\n  - when:\n    - key: source.ip\n      values: [\"nope\"]\n",
            "spec.rules[0].when[0].values[0]: \"nope\" is not an IP address or CIDR",
        ),
        (
            "  rules:\n  - when:\n    - key: destination.port\n      notValues: [\"70000\"]\n",
            "when[0].notValues[0]: port 70000 is not in 1..65535",
        ),
        ("  rules:\n  - when:\n    - key: request.headers[]\n      values: [\"a\"]\n", "names no header"),
        ("  rules:\n  - when:\n    - values: [\"a\"]\n", "spec.rules[0].when[0].key: must not be empty"),
        (
            "  rules:\n  - from:\n    - source:\n        principal: [\"a\"]\n",
            "spec.rules[0].from[0].source: unknown field \"principal\"",
        ),
        ("  rule:\n  - {}\n", "unknown field \"rule\""),
        (
            "  selector:\n    matchLabels:\n      app: \"a b\"\n",
            "spec.selector.matchLabels[app]: \"a b\" is not a valid label value",
        ),
        ("  rules:\n  - null\n", "spec.rules[0]: a rule must not be null"),
        (
            "  rules:\n  - from:\n    - source:\n        principals: {a: b}\n",
            "spec.rules[0].from[0].source.principals",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n",
            "spec.rules[0].from[0].source.requestPrincipals: \"requestPrincipals\" is not supported by Ferry: it needs JWT validation",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        notRequestPrincipals: [\"*\"]\n",
            "\"notRequestPrincipals\" is not supported by Ferry",
        ),
        (
            "  rules:\n  - when:\n    - key: request.auth.claims[iss]\n      values: [\"a\"]\n",
            "spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not supported by Ferry",
        ),
        (
            "  rules:\n  - when:\n    - key: request.auth.principal\n      values: [\"a\"]\n",
            "\"request.auth.principal\" is not supported by Ferry",
        ),
    ];
    for (spec, want) in cases {
        let yaml = doc("demo", "bad", spec);
        let err = parse_file(Path::new("/etc/ferry/policies/p.yaml"), &yaml).expect_err(spec).to_string();
        assert!(err.starts_with("policy file /etc/ferry/policies/p.yaml, document 1 (demo/bad): "), "{err}");
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
}

#[test]
fn document_level_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a}\n",
            "apiVersion: \"security.istio.io/v2\" is not supported",
        ),
        ("kind: AuthorizationPolicy\nmetadata: {name: a}\n", "apiVersion: missing"),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n",
            "kind: \"PeerAuthentication\" is not supported here",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: a}\n",
            "metadata.name: missing",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: Bad_Name}\n",
            "metadata.name: \"Bad_Name\" is not a valid Kubernetes name",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, annotations: {istio.io/dry-run: maybe}}\n",
            "metadata.annotations[istio.io/dry-run]: \"maybe\" must be \"true\" or \"false\"",
        ),
        ("- just\n- a list\n", "expected a map"),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspce: {}\n",
            "unknown field \"spce\"",
        ),
    ];
    for (yaml, want) in cases {
        let err = parse_file(Path::new("p.yaml"), yaml).expect_err(yaml).to_string();
        assert!(err.contains("document 1"), "{err}");
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
    let second = format!("{}---\n{}", doc("demo", "ok", "  {}\n"), doc("demo", "bad", "  action: NOPE\n"));
    let err = parse_file(Path::new("p.yaml"), &second).unwrap_err().to_string();
    assert!(err.contains("document 2 (demo/bad): spec.action: \"NOPE\""), "{err}");
}

#[test]
fn syntax_errors_and_hostile_yaml_are_refused_without_panic() {
    let err = parse_file(Path::new("p.yaml"), "spec: [unclosed\n").unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err}");
    // An alias bomb stays within the parser's budget.
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 { "a".to_owned() } else { format!("b{}", i - 1) };
        bomb.push_str(&format!("b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    assert!(parse_file(Path::new("p.yaml"), &bomb).is_err());
    let deep = "[".repeat(10_000);
    assert!(parse_file(Path::new("p.yaml"), &deep).is_err());
}

#[test]
fn a_policy_defined_twice_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), doc("demo", "same", "  {}\n")).unwrap();
    std::fs::write(dir.path().join("b.yml"), doc("demo", "same", "  {}\n")).unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), "not: [valid").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml at all: [").unwrap();
    let snap = snapshot(&[dir.path().to_owned()]).unwrap();
    assert_eq!(snap.files.len(), 2, "only *.yaml and *.yml, no dot-files");
    let err = compile_snapshot(&snap).unwrap_err().to_string();
    assert!(
        err.contains("b.yml, document 1 (demo/same): metadata.name: this policy is already defined in"),
        "{err}"
    );
    let missing = snapshot(&[dir.path().join("nope.yaml")]).unwrap_err().to_string();
    assert!(missing.contains("cannot read policy source") && missing.contains("nope.yaml"), "{missing}");
}

#[test]
fn the_default_namespace_is_kubectls() {
    let yaml = format!("{HDR}metadata:\n  name: x\nspec: {{}}\n");
    let a = authorizer(&yaml);
    assert_eq!(a.policies()[0].key(), "default/x");
}

/// One HTTP request to demo/echo from a plaintext client: `(method, host, target, headers)`.
fn decide_http(a: &Authorizer, method: &str, host: &str, target: &str, headers: &[(&str, &str)]) -> Verdict {
    use crate::http::path::{Normalization, normalize};
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let Ok(path) = normalize(target, Normalization::Base) else { return DENY };
    let conn = Connection {
        source_ip: Some("10.9.0.1".parse().unwrap()),
        peer: None,
        destination_ip: "10.1.0.2".parse().unwrap(),
        destination_port: 80,
    };
    let req = Request { method, host, path: &path, headers: &map };
    a.decide_request("demo/echo", &conn, &req).enforced.verdict
}

#[test]
fn http_paths_as_istios_acceptance_tests_check_them() {
    let public = authorizer(&doc(
        "demo",
        "public",
        "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/public*\"]\n",
    ));
    for (target, want) in [
        ("/public", ALLOW),
        ("/public/../public", ALLOW),
        ("/private", DENY),
        ("/public/../private", DENY),
        ("/public/%2E%2E/private", DENY),
        ("/public%00", DENY),
    ] {
        assert_eq!(decide_http(&public, "GET", "echo", target, &[]), want, "GET {target}");
    }
    assert_eq!(decide_http(&public, "POST", "echo", "/public", &[]), DENY, "POST is not GET");
    let yaml = [
        doc(
            "demo",
            "deny-admin",
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/allow/admin\"]\n",
        ),
        doc("demo", "allow", "  rules:\n  - to:\n    - operation:\n        paths: [\"/allow*\"]\n"),
    ]
    .join("---\n");
    let a = authorizer(&yaml);
    for (target, want) in
        [("/allow/admin", DENY), ("/allow/admin?x=y", DENY), ("/allow/admin#x", DENY), ("/allow", ALLOW)]
    {
        assert_eq!(decide_http(&a, "GET", "echo", target, &[]), want, "{target}");
    }
}

#[test]
fn http_headers_and_several_values() {
    let allow = authorizer(&doc(
        "demo",
        "hdr",
        "  rules:\n  - when:\n    - key: request.headers[X-Foo]\n      values: [\"foo\"]\n",
    ));
    assert_eq!(decide_http(&allow, "GET", "h", "/", &[("x-foo", "foo")]), ALLOW);
    assert_eq!(decide_http(&allow, "GET", "h", "/", &[("x-foo", "bar")]), DENY);
    assert_eq!(decide_http(&allow, "GET", "h", "/", &[]), DENY, "missing header");
    // A second value never widens an ALLOW.
    assert_eq!(decide_http(&allow, "GET", "h", "/", &[("x-foo", "foo"), ("x-foo", "bar")]), DENY);
    let deny = authorizer(&doc(
        "demo",
        "hdr-deny",
        "  action: DENY\n  rules:\n  - when:\n    - key: request.headers[x-user]\n      values: [\"admin\"]\n",
    ));
    // ...and never escapes a DENY, whichever value comes first, nor when joined.
    assert_eq!(decide_http(&deny, "GET", "h", "/", &[("x-user", "bob"), ("x-user", "admin")]), DENY);
    assert_eq!(decide_http(&deny, "GET", "h", "/", &[("x-user", "bob")]), ALLOW);
    let joined = authorizer(&doc(
        "demo",
        "hdr-joined",
        "  action: DENY\n  rules:\n  - when:\n    - key: request.headers[x-user]\n      values: [\"bob,admin\"]\n",
    ));
    assert_eq!(decide_http(&joined, "GET", "h", "/", &[("x-user", "bob"), ("x-user", "admin")]), DENY);
}

#[test]
fn http_hosts_ignore_case_and_ports_need_a_wildcard() {
    let a = authorizer(&doc(
        "demo",
        "hosts",
        "  rules:\n  - to:\n    - operation:\n        hosts: [\"example.com\", \"api.example.com:*\"]\n",
    ));
    for (host, want) in [
        ("example.com", ALLOW),
        ("EXAMPLE.Com", ALLOW),
        ("example.com:80", DENY),
        ("api.example.com:8080", ALLOW),
        ("API.example.com:8080", ALLOW),
        ("evil.com", DENY),
    ] {
        assert_eq!(decide_http(&a, "GET", host, "/", &[]), want, "{host}");
    }
}

#[test]
fn http_not_forms_templates_and_tcp_only_rules() {
    let not = authorizer(&doc(
        "demo",
        "not-delete",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        notMethods: [\"GET\", \"HEAD\"]\n        notPaths: [\"/healthz\"]\n",
    ));
    assert_eq!(decide_http(&not, "GET", "h", "/x", &[]), ALLOW);
    assert_eq!(decide_http(&not, "DELETE", "h", "/x", &[]), DENY);
    assert_eq!(decide_http(&not, "DELETE", "h", "/healthz", &[]), ALLOW);
    let tmpl = authorizer(&doc(
        "demo",
        "tmpl",
        "  rules:\n  - to:\n    - operation:\n        paths: [\"/api/{*}/items/{**}\"]\n",
    ));
    assert_eq!(decide_http(&tmpl, "GET", "h", "/api/v1/items/7/x", &[]), ALLOW);
    assert_eq!(decide_http(&tmpl, "GET", "h", "/api/v1/v2/items/7", &[]), DENY);
    // An L4-only rule decides HTTP requests just as it decides TCP.
    let l4 = authorizer(&doc(
        "demo",
        "lan",
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.9.0.0/16\"]\n",
    ));
    assert_eq!(decide_http(&l4, "GET", "h", "/", &[]), ALLOW);
}

#[test]
fn path_template_errors_name_the_value() {
    let err = parse_file(
        Path::new("p.yaml"),
        &doc("demo", "t", "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{**}/b\"]\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("spec.rules[0].to[0].operation.paths[0]: \"/a/{**}/b\": {**} must be the last segment"),
        "{err}"
    );
}

/// Before its requests are read, an HTTP connection is refused only when no request could pass.
#[test]
fn unread_http_is_denied_only_when_every_request_would_be() {
    let conn = Connection {
        source_ip: Some("10.9.0.1".parse().unwrap()),
        peer: None,
        destination_ip: "10.1.0.2".parse().unwrap(),
        destination_port: 80,
    };
    let unread = |yaml: &str| authorizer(yaml).decide_unread("demo/echo", &conn).enforced.verdict;
    let get_only = doc("demo", "get", "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n");
    assert_eq!(unread(&get_only), ALLOW, "a GET could pass");
    let not_get = doc("demo", "nget", "  rules:\n  - to:\n    - operation:\n        notMethods: [\"GET\"]\n");
    assert_eq!(unread(&not_get), ALLOW, "a POST could pass");
    let deny_admin = doc(
        "demo",
        "admin",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]\n",
    );
    assert_eq!(unread(&deny_admin), ALLOW, "only some requests are denied");
    let deny_lan = doc(
        "demo",
        "lan",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.9.0.0/16\"]\n",
    );
    assert_eq!(unread(&deny_lan), DENY, "an L4 DENY covers every request");
    let other_source = doc(
        "demo",
        "other",
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.8.0.0/16\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n",
    );
    assert_eq!(unread(&other_source), DENY, "no request from 10.9/16 can match");
    // On plain TCP the same GET-only policy never matches.
    assert_eq!(authorizer(&get_only).decide("demo/echo", &conn).enforced.verdict, DENY);
}
