//! Deciding: the policies that select each workload, indexed once per policy or pod change, and the
//! evaluator the proxy calls for every connection (no allocation) and `ferry trace` calls to explain
//! (the same code, so what trace says is what the proxy does).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::compile::{Action, Clause, HttpTest, Policy, Predicate, Rule, Test};
use super::load::Origin;
use super::matcher::{StrMatch, ip_in};

/// The peer of an mTLS connection, from its verified SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// The SPIFFE ID without `spiffe://` (`TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT`), as principals are written.
    pub principal: &'a str,
    /// Its namespace, when the ID has Kubernetes' form.
    pub namespace: Option<&'a str>,
    /// Its service account, when the ID has Kubernetes' form.
    pub service_account: Option<&'a str>,
}

impl<'a> Peer<'a> {
    /// The peer named by a SPIFFE ID.
    pub fn from_spiffe(id: &'a crate::identity::SpiffeId) -> Self {
        let s = id.as_str();
        Peer {
            principal: s.strip_prefix("spiffe://").unwrap_or(s),
            namespace: id.namespace(),
            service_account: id.service_account(),
        }
    }
}

/// What an L4 decision looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection<'a> {
    /// The source address (for plaintext the client's, for HBONE the tunnel peer's); unknown in
    /// some traces.
    pub source_ip: Option<IpAddr>,
    /// The verified peer; `None` for plaintext, which has no principal.
    pub peer: Option<Peer<'a>>,
    /// The original destination address.
    pub destination_ip: IpAddr,
    /// The destination app's port.
    pub destination_port: u16,
}

/// What an HTTP decision also looks at: one request, as the HTTP layer read it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a str,
    /// The authority (`Host` or `:authority`), as sent.
    pub host: &'a str,
    /// The path, normalized, without query or fragment.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The connection may proceed.
    Allow,
    /// The connection is refused (or closed).
    Deny,
}

impl Verdict {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// Why the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No ALLOW policy selects the workload and no DENY matched.
    NoAllowPolicies,
    /// An ALLOW policy matched.
    AllowMatched,
    /// A DENY policy matched.
    DenyMatched,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatched,
    /// The policy set failed to load at start: everything is denied until a valid one loads.
    PolicyError,
    /// The destination is no workload this node can place.
    UnknownWorkload,
}

impl Reason {
    /// A short label value (the metrics' `reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoAllowPolicies => "no_allow_policies",
            Reason::AllowMatched => "allow_policy",
            Reason::DenyMatched => "deny_policy",
            Reason::NoAllowMatched => "no_allow_match",
            Reason::PolicyError => "policy_error",
            Reason::UnknownWorkload => "unknown_workload",
        }
    }
}

/// A policy and the index of its rule that matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// Index into the set's policies.
    pub policy: u32,
    /// Index of the matching rule in the policy.
    pub rule: u32,
}

/// One outcome: the verdict, why, and the deciding policy and rule when one decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// The deciding policy's rule, when one decided.
    pub by: Option<RuleRef>,
}

/// A decision; `Copy` and allocation-free, with names resolved through [`Authorizer::policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What is enforced.
    pub enforced: Outcome,
    /// What would be enforced if the dry-run policies selecting the workload were enforced too;
    /// `None` when none selects it.
    pub dry_run: Option<Outcome>,
    /// The first AUDIT policy rule that matched, to be logged.
    pub audit: Option<RuleRef>,
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn allowed(&self) -> bool {
        self.enforced.verdict == Verdict::Allow
    }

    fn deny(reason: Reason) -> Self {
        Decision {
            enforced: Outcome { verdict: Verdict::Deny, reason, by: None },
            dry_run: None,
            audit: None,
        }
    }
}

/// The indexes of the policies selecting one workload, by role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Selected {
    deny: Vec<u32>,
    allow: Vec<u32>,
    audit: Vec<u32>,
    dry_deny: Vec<u32>,
    dry_allow: Vec<u32>,
}

/// A workload as policies select it.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadRef<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// The loaded policies and, for each known workload, the ones that select it.
#[derive(Debug, Default)]
pub struct Authorizer {
    policies: Vec<Policy>,
    origins: Vec<Origin>,
    root_namespace: String,
    /// Set when the policies failed to load at start: every decision denies.
    failed: Option<String>,
    by_workload: HashMap<String, Selected>,
}

/// How a rule is enforced on connections that are not HTTP, for `ferry policies` (rules with HTTP
/// fields are decided per request on HTTP connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Every field is known at L4.
    L4,
    /// An ALLOW (or AUDIT) rule that needs HTTP never matches plain TCP.
    NeedsHttpNeverMatches,
    /// A DENY rule that needs HTTP denies the whole connection (its HTTP parts count as matched).
    NeedsHttpDeniesConnection,
}

impl Enforcement {
    /// The text the CLI shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::L4 => "L4",
            Enforcement::NeedsHttpNeverMatches => "needs HTTP: never matches",
            Enforcement::NeedsHttpDeniesConnection => "needs HTTP: denies the connection",
        }
    }
}

/// One policy's part in an explained decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Considered {
    /// `namespace/name`.
    pub policy: String,
    /// ALLOW, DENY or AUDIT.
    pub action: String,
    /// Whether it is dry-run only.
    pub dry_run: bool,
    /// Whether it selects the workload.
    pub selects: bool,
    /// Whether one of its rules matched.
    pub matched: bool,
    /// The matching rule.
    pub rule: Option<u32>,
    /// Why it matched or did not.
    pub why: String,
}

impl Authorizer {
    /// Indexes `policies` for `workloads`; `root_namespace` holds the mesh-wide policies.
    pub fn new<'a>(
        policies: Vec<(Policy, Origin)>,
        root_namespace: &str,
        workloads: impl IntoIterator<Item = WorkloadRef<'a>>,
    ) -> Self {
        let (policies, origins) = policies.into_iter().unzip();
        let mut me = Authorizer {
            policies,
            origins,
            root_namespace: root_namespace.to_owned(),
            failed: None,
            by_workload: HashMap::new(),
        };
        for w in workloads {
            let selected = me.select(w);
            me.by_workload.insert(w.key.to_owned(), selected);
        }
        me
    }

    /// A set that denies everything: the policies named at start could not be loaded.
    pub fn failed(error: String) -> Self {
        Authorizer { failed: Some(error), ..Default::default() }
    }

    /// Why the set denies everything, if it does.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The loaded policies, in load order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Where policy `index` came from.
    pub fn origin(&self, index: u32) -> Option<&Origin> {
        self.origins.get(index as usize)
    }

    /// Policy `index`.
    pub fn policy(&self, index: u32) -> Option<&Policy> {
        self.policies.get(index as usize)
    }

    /// The root namespace.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The same policies indexed for other workloads (after a pod change).
    pub fn reindex<'a>(&self, workloads: impl IntoIterator<Item = WorkloadRef<'a>>) -> Self {
        if let Some(e) = &self.failed {
            return Self::failed(e.clone());
        }
        let policies = self.policies.iter().cloned().zip(self.origins.iter().cloned()).collect();
        Self::new(policies, &self.root_namespace, workloads)
    }

    /// Whether policy `p` selects workload `w`: in its namespace or the root namespace, and labels
    /// matching the selector.
    pub fn selects(&self, p: &Policy, w: WorkloadRef<'_>) -> bool {
        (p.namespace == self.root_namespace || p.namespace == w.namespace)
            && p.selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }

    fn select(&self, w: WorkloadRef<'_>) -> Selected {
        let mut s = Selected::default();
        for (i, p) in self.policies.iter().enumerate() {
            if !self.selects(p, w) {
                continue;
            }
            let i = i as u32;
            match (p.action, p.dry_run) {
                (Action::Deny, false) => s.deny.push(i),
                (Action::Allow, false) => s.allow.push(i),
                (Action::Deny, true) => s.dry_deny.push(i),
                (Action::Allow, true) => s.dry_allow.push(i),
                (Action::Audit, _) => s.audit.push(i),
            }
        }
        s
    }

    /// The workloads (by key, sorted) that policy `index` selects.
    pub fn selected_workloads(&self, index: u32) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .by_workload
            .iter()
            .filter(|(_, s)| {
                [&s.deny, &s.allow, &s.audit, &s.dry_deny, &s.dry_allow].iter().any(|l| l.contains(&index))
            })
            .map(|(k, _)| k.as_str())
            .collect();
        keys.sort_unstable();
        keys
    }

    /// How each rule of `p` is enforced on plain TCP.
    pub fn enforcement(p: &Policy, rule: &Rule) -> Enforcement {
        match (rule.needs_http, p.action) {
            (false, _) => Enforcement::L4,
            (true, Action::Deny) => Enforcement::NeedsHttpDeniesConnection,
            (true, _) => Enforcement::NeedsHttpNeverMatches,
        }
    }

    /// Decides a plain-TCP connection to `workload` (`namespace/name`): DENY first, then ALLOW.
    pub fn decide(&self, workload: &str, conn: &Connection<'_>) -> Decision {
        self.decide_at(workload, &At { conn, req: None, unread: false })
    }

    /// Decides one HTTP request on `conn`: the HTTP fields now mean what Istio says.
    pub fn decide_request(&self, workload: &str, conn: &Connection<'_>, req: &Request<'_>) -> Decision {
        self.decide_at(workload, &At { conn, req: Some(req), unread: false })
    }

    /// Decides a connection that may carry HTTP whose requests are not read yet: denied only when
    /// every request on it would be (a DENY on L4 fields alone, or no ALLOW any request could
    /// match). Each request is then decided by [`Authorizer::decide_request`].
    pub fn decide_unread(&self, workload: &str, conn: &Connection<'_>) -> Decision {
        self.decide_at(workload, &At { conn, req: None, unread: true })
    }

    fn decide_at(&self, workload: &str, at: &At<'_>) -> Decision {
        if self.failed.is_some() {
            return Decision::deny(Reason::PolicyError);
        }
        let Some(s) = self.by_workload.get(workload) else { return Decision::deny(Reason::UnknownWorkload) };
        let enforced = self.outcome(at, s.deny.iter(), s.allow.iter());
        let dry_run = (!s.dry_deny.is_empty() || !s.dry_allow.is_empty())
            .then(|| self.outcome(at, s.deny.iter().chain(&s.dry_deny), s.allow.iter().chain(&s.dry_allow)));
        let audit = s.audit.iter().find_map(|&i| self.first_match(i, at));
        Decision { enforced, dry_run, audit }
    }

    fn outcome<'s>(
        &self,
        conn: &At<'_>,
        deny: impl Iterator<Item = &'s u32>,
        allow: impl Iterator<Item = &'s u32> + Clone,
    ) -> Outcome {
        for &i in deny {
            if let Some(by) = self.first_match(i, conn) {
                return Outcome { verdict: Verdict::Deny, reason: Reason::DenyMatched, by: Some(by) };
            }
        }
        let mut any_allow = false;
        for &i in allow {
            any_allow = true;
            if let Some(by) = self.first_match(i, conn) {
                return Outcome { verdict: Verdict::Allow, reason: Reason::AllowMatched, by: Some(by) };
            }
        }
        if any_allow {
            Outcome { verdict: Verdict::Deny, reason: Reason::NoAllowMatched, by: None }
        } else {
            Outcome { verdict: Verdict::Allow, reason: Reason::NoAllowPolicies, by: None }
        }
    }

    /// The first rule of policy `i` that matches `conn`.
    fn first_match(&self, i: u32, conn: &At<'_>) -> Option<RuleRef> {
        let p = self.policies.get(i as usize)?;
        let deny = p.action == Action::Deny;
        p.rules
            .iter()
            .position(|r| rule_matches(r, conn, deny))
            .map(|rule| RuleRef { policy: i, rule: rule as u32 })
    }

    /// Explains a decision: every policy of the workload's namespace and the root namespace, whether
    /// it selects the workload, and why it matched or not.
    pub fn explain(&self, workload: WorkloadRef<'_>, conn: &Connection<'_>) -> Vec<Considered> {
        self.explain_with(workload, &At { conn, req: None, unread: false })
    }

    /// Explains the decision on one HTTP request, as [`Authorizer::explain`] does for TCP.
    pub fn explain_request(
        &self,
        workload: WorkloadRef<'_>,
        conn: &Connection<'_>,
        req: &Request<'_>,
    ) -> Vec<Considered> {
        self.explain_with(workload, &At { conn, req: Some(req), unread: false })
    }

    fn explain_with(&self, workload: WorkloadRef<'_>, conn: &At<'_>) -> Vec<Considered> {
        let mut out = Vec::new();
        for p in &self.policies {
            if p.namespace != self.root_namespace && p.namespace != workload.namespace {
                continue;
            }
            let mut c = Considered {
                policy: p.key(),
                action: p.action.as_str().to_owned(),
                dry_run: p.dry_run,
                selects: self.selects(p, workload),
                matched: false,
                rule: None,
                why: String::new(),
            };
            if !c.selects {
                let labels: Vec<String> =
                    p.selector.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
                c.why = format!("its selector {} does not select this workload", labels.join(","));
                out.push(c);
                continue;
            }
            if p.rules.is_empty() {
                c.why = "it has no rules, so it matches nothing".into();
                out.push(c);
                continue;
            }
            let deny = p.action == Action::Deny;
            let mut whys = Vec::new();
            for (r, rule) in p.rules.iter().enumerate() {
                if rule_matches(rule, conn, deny) {
                    c.matched = true;
                    c.rule = Some(r as u32);
                    let note = if rule.needs_http && deny && conn.req.is_none() {
                        " (its HTTP fields count as matched on TCP)"
                    } else {
                        ""
                    };
                    c.why = format!("rule {r} matches{note}");
                    break;
                }
                whys.push(format!("rule {r}: {}", why_not(rule, conn, deny)));
            }
            if !c.matched {
                c.why = whys.join("; ");
            }
            out.push(c);
        }
        out
    }
}

/// A connection, and the request on it when the decision is per request.
struct At<'a> {
    conn: &'a Connection<'a>,
    req: Option<&'a Request<'a>>,
    /// HTTP whose requests are not read yet: HTTP parts may match an ALLOW and never make a DENY.
    unread: bool,
}

fn rule_matches(rule: &Rule, at: &At<'_>, deny: bool) -> bool {
    // Plain TCP has no HTTP attributes: an ALLOW or AUDIT rule that needs them never matches, and a
    // DENY rule counts them as matched, so the deny covers the whole connection. Both fail closed.
    if rule.needs_http && !deny && at.req.is_none() && !at.unread {
        return false;
    }
    any_or_empty(&rule.from, at, deny)
        && any_or_empty(&rule.to, at, deny)
        && clause_holds(&rule.when, at, deny)
}

fn any_or_empty(clauses: &[Clause], at: &At<'_>, deny: bool) -> bool {
    clauses.is_empty() || clauses.iter().any(|c| clause_holds(c, at, deny))
}

fn clause_holds(clause: &Clause, at: &At<'_>, deny: bool) -> bool {
    clause.0.iter().all(|p| holds(p, at, deny))
}

/// Whether one predicate holds. An attribute the connection lacks (no peer for plaintext, no source
/// address, no JWT) matches no value, so a positive field fails and a `notX` field passes.
fn holds(p: &Predicate, at: &At<'_>, deny: bool) -> bool {
    let conn = at.conn;
    let hit = match &p.test {
        Test::Principal(v) => conn.peer.is_some_and(|peer| v.iter().any(|m| m.matches(peer.principal))),
        Test::Namespace(v) => {
            conn.peer.and_then(|peer| peer.namespace).is_some_and(|ns| v.iter().any(|m| m.matches(ns)))
        }
        Test::ServiceAccount(v) => {
            conn.peer.is_some_and(|peer| match (peer.namespace, peer.service_account) {
                (Some(ns), Some(sa)) => v.iter().any(|m| m.matches_parts(&[ns, "/", sa])),
                _ => false,
            })
        }
        Test::SourceIp(nets) => conn.source_ip.is_some_and(|ip| ip_in(nets, ip)),
        Test::DestinationIp(nets) => ip_in(nets, conn.destination_ip),
        Test::DestinationPort(ports) => ports.contains(&conn.destination_port),
        Test::Http(test) => match at.req {
            // On plain TCP only DENY rules get here (see rule_matches): the part counts as matched.
            // Before the requests are read, it may let an ALLOW match but never makes a DENY.
            None => return if at.unread { !deny } else { deny },
            Some(req) => http_hit(test, req, conn, deny != p.negated),
        },
    };
    hit != p.negated
}

/// Whether an HTTP attribute matches. `lenient` says which way a header with several values leans:
/// when a match helps deny, any value (or all of them joined) matching is a match; when it helps
/// allow, every value must match, so adding a second value never widens an ALLOW or escapes a DENY.
fn http_hit(test: &HttpTest, req: &Request<'_>, conn: &Connection<'_>, lenient: bool) -> bool {
    match test {
        HttpTest::Host(v) => v.iter().any(|m| m.matches_ignore_case(req.host)),
        HttpTest::Method(v) => v.iter().any(|m| m.matches(req.method)),
        HttpTest::Path(v) => v.iter().any(|m| m.matches(req.path)),
        HttpTest::Header(name, v) => header_hit(req.headers, name, v, lenient),
        // Without trusted proxies, the remote address is the connection's source.
        HttpTest::RemoteIp(nets) => conn.source_ip.is_some_and(|ip| ip_in(nets, ip)),
        // The app's own TLS is not terminated here: there is no SNI to see.
        HttpTest::Sni(_) => false,
    }
}

/// Header matching; joins several values only on the lenient side, the one place it may allocate.
fn header_hit(headers: &http::HeaderMap, name: &str, v: &[StrMatch], lenient: bool) -> bool {
    let one = |value: &http::HeaderValue| value.to_str().is_ok_and(|s| v.iter().any(|m| m.matches(s)));
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return false };
    if values.next().is_none() {
        return one(first);
    }
    let all = || headers.get_all(name).iter();
    if !lenient {
        return all().all(one);
    }
    if all().any(one) {
        return true;
    }
    let joined: Option<Vec<&str>> = all().map(|h| h.to_str().ok()).collect();
    joined.is_some_and(|j| {
        let j = j.join(",");
        v.iter().any(|m| m.matches(&j))
    })
}

/// Why `rule` does not match `conn`, naming the first failing field and the connection's value.
fn why_not(rule: &Rule, conn: &At<'_>, deny: bool) -> String {
    if rule.needs_http && !deny && conn.req.is_none() {
        return "needs HTTP fields, so it never matches plain TCP".into();
    }
    if !any_or_empty(&rule.from, conn, deny) {
        return format!("no from entry matches ({})", failing(&rule.from, conn, deny));
    }
    if !any_or_empty(&rule.to, conn, deny) {
        return format!("no to entry matches ({})", failing(&rule.to, conn, deny));
    }
    failing(std::slice::from_ref(&rule.when), conn, deny)
}

fn failing(clauses: &[Clause], conn: &At<'_>, deny: bool) -> String {
    let mut parts = Vec::new();
    for c in clauses {
        if let Some(p) = c.0.iter().find(|p| !holds(p, conn, deny)) {
            let not = if p.negated { "matches a value of" } else { "matches none of" };
            parts.push(format!("{} {} {not} {}", p.field, value_of(p, conn), values_of(p)));
        }
    }
    parts.join(", ")
}

fn value_of(p: &Predicate, at: &At<'_>) -> String {
    let plaintext = "(none: plaintext has no peer identity)";
    let conn = at.conn;
    match &p.test {
        Test::Principal(_) => conn.peer.map_or(plaintext.into(), |x| format!("{:?}", x.principal)),
        Test::Namespace(_) => {
            conn.peer.and_then(|x| x.namespace).map_or(plaintext.into(), |n| format!("{n:?}"))
        }
        Test::ServiceAccount(_) => match conn.peer.map(|x| (x.namespace, x.service_account)) {
            Some((Some(ns), Some(sa))) => format!("\"{ns}/{sa}\""),
            _ => plaintext.into(),
        },
        Test::SourceIp(_) => conn.source_ip.map_or("(unknown source address)".into(), |ip| ip.to_string()),
        Test::DestinationIp(_) => conn.destination_ip.to_string(),
        Test::DestinationPort(_) => conn.destination_port.to_string(),
        Test::Http(t) => match (t, at.req) {
            (_, None) => "(no HTTP on this connection)".into(),
            (HttpTest::Host(_), Some(r)) => format!("{:?}", r.host),
            (HttpTest::Method(_), Some(r)) => format!("{:?}", r.method),
            (HttpTest::Path(_), Some(r)) => format!("{:?}", r.path),
            (HttpTest::Header(name, _), Some(r)) => {
                let values: Vec<&str> =
                    r.headers.get_all(name.as_str()).iter().filter_map(|h| h.to_str().ok()).collect();
                if values.is_empty() { "(absent)".into() } else { format!("{values:?}") }
            }
            (HttpTest::RemoteIp(_), Some(_)) => {
                conn.source_ip.map_or("(unknown)".into(), |ip| ip.to_string())
            }
            (HttpTest::Sni(_), Some(_)) => "(none: the app's TLS is not terminated)".into(),
        },
    }
}

fn values_of(p: &Predicate) -> String {
    let list: Vec<String> = match &p.test {
        Test::Principal(v) | Test::Namespace(v) | Test::ServiceAccount(v) => {
            v.iter().map(|m| m.to_string()).collect()
        }
        Test::SourceIp(n) | Test::DestinationIp(n) => n.iter().map(|n| n.to_string()).collect(),
        Test::DestinationPort(ports) => ports.iter().map(|p| p.to_string()).collect(),
        Test::Http(t) => match t {
            HttpTest::Host(v) | HttpTest::Method(v) | HttpTest::Header(_, v) | HttpTest::Sni(v) => {
                v.iter().map(|m| m.to_string()).collect()
            }
            HttpTest::Path(v) => v.iter().map(|m| m.to_string()).collect(),
            HttpTest::RemoteIp(n) => n.iter().map(|n| n.to_string()).collect(),
        },
    };
    format!("[{}]", list.join(", "))
}
