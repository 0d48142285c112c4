//! Istio's validation and the lowering of one `AuthorizationPolicy` document into Ferry's rule model:
//! what Istio's webhook rejects is rejected here with the same meaning, and what Ferry cannot
//! enforce (CUSTOM, `targetRefs`, unknown `when` keys) is rejected as unsupported, never dropped.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::error::FieldError;
use super::matcher::{PathMatch, StrMatch, parse_ip_block, parse_port};
use super::model::{self, Strings};

/// The annotation that makes a policy evaluated and logged but not enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow; once any ALLOW policy selects a workload, a connection must match one.
    Allow,
    /// Deny, before any ALLOW is considered.
    Deny,
    /// Log the match; never changes the decision.
    Audit,
}

impl Action {
    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// One compiled policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `metadata.namespace` (`default` when the document names none, as kubectl does).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.action`.
    pub action: Action,
    /// Annotated `istio.io/dry-run: "true"`.
    pub dry_run: bool,
    /// `spec.selector.matchLabels`; `None` selects every workload in scope.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.rules`, OR'd.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Sources, OR'd; empty matches any source.
    pub(super) from: Vec<Clause>,
    /// Operations, OR'd; empty matches any operation.
    pub(super) to: Vec<Clause>,
    /// Conditions, AND'd.
    pub(super) when: Clause,
    /// Whether any part needs HTTP attributes, which plain TCP does not have.
    pub needs_http: bool,
}

/// Predicates that must all hold (one `source`, one `operation`, or the `when` list).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Clause(pub Vec<Predicate>);

/// One field of a clause: its values are OR'd; `negated` (the `notX` forms) means none matches.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Predicate {
    /// The field as the user wrote it, for explanations (`source.principals`, `when source.ip`).
    pub field: String,
    /// `notX` or `notValues`.
    pub negated: bool,
    /// What is compared, and with what.
    pub test: Test,
}

/// An attribute and the values it is compared with.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Test {
    /// The peer's SPIFFE ID without `spiffe://`.
    Principal(Vec<StrMatch>),
    /// The peer's namespace (from its SPIFFE ID).
    Namespace(Vec<StrMatch>),
    /// The peer's `namespace/serviceaccount` (from its SPIFFE ID).
    ServiceAccount(Vec<StrMatch>),
    /// The connection's source address.
    SourceIp(Vec<IpNet>),
    /// The connection's original destination address.
    DestinationIp(Vec<IpNet>),
    /// The destination app's port.
    DestinationPort(Vec<u16>),
    /// An HTTP attribute (hosts, methods, paths, headers, request principals, remote IPs, JWT
    /// claims, SNI): plain TCP has none of them.
    Http(HttpTest),
}

/// An attribute only HTTP requests carry.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum HttpTest {
    /// `hosts` (case-insensitive).
    Host(Vec<StrMatch>),
    /// `methods`.
    Method(Vec<StrMatch>),
    /// `paths`, matched after normalization.
    Path(Vec<PathMatch>),
    /// `request.headers[NAME]` (name lower-cased).
    Header(String, Vec<StrMatch>),
    /// `remoteIpBlocks` and `remote.ip`: from X-Forwarded-For.
    RemoteIp(Vec<IpNet>),
    /// `connection.sni`: the app's own TLS, which the node proxy does not terminate.
    Sni(Vec<StrMatch>),
}

/// The API versions whose `AuthorizationPolicy` Ferry reads.
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Checks a document's `apiVersion` and `kind` (already known not to be a `List`).
pub(super) fn check_type(doc: &model::Document) -> Result<(), FieldError> {
    match doc.api_version.as_deref() {
        Some(v) if API_VERSIONS.contains(&v) => {}
        Some(v) => {
            return Err(FieldError::new(
                "apiVersion",
                format!("{v:?} is not supported; use \"security.istio.io/v1\" (or v1beta1)"),
            ));
        }
        None => return Err(FieldError::new("apiVersion", "missing; use \"security.istio.io/v1\"")),
    }
    match doc.kind.as_deref() {
        Some("AuthorizationPolicy") => Ok(()),
        Some(k) => Err(FieldError::new(
            "kind",
            format!("{k:?} is not supported here; policy files hold AuthorizationPolicy documents"),
        )),
        None => Err(FieldError::new("kind", "missing; use \"AuthorizationPolicy\"")),
    }
}

/// Validates and compiles one document already known to be an `AuthorizationPolicy`.
pub(super) fn compile(doc: model::Document) -> Result<Policy, FieldError> {
    check_type(&doc)?;
    let meta = doc.metadata;
    let name = meta.name.ok_or_else(|| FieldError::new("metadata.name", "missing"))?;
    dns_name("metadata.name", &name, 253)?;
    let namespace = meta.namespace.unwrap_or_else(|| "default".to_owned());
    dns_name("metadata.namespace", &namespace, 63)?;
    let dry_run = match meta.annotations.get(DRY_RUN_ANNOTATION).map(|v| v.0.as_str()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            let field = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
            return Err(FieldError::new(field, format!("{other:?} must be \"true\" or \"false\"")));
        }
    };
    let spec = doc.spec.unwrap_or_default();
    if spec.target_ref.is_some() {
        return Err(unsupported_target("spec.targetRef"));
    }
    if spec.target_refs.is_some() {
        return Err(unsupported_target("spec.targetRefs"));
    }
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            return Err(FieldError::new(
                "spec.action",
                "\"CUSTOM\" (an external authorizer) is not supported by Ferry",
            ));
        }
        Some(other) => {
            return Err(FieldError::new(
                "spec.action",
                format!("{other:?} is not an action; use ALLOW, DENY or AUDIT"),
            ));
        }
    };
    if spec.provider.is_some() {
        return Err(FieldError::new(
            "spec.provider",
            "only meaningful with action CUSTOM, which Ferry does not support",
        ));
    }
    let selector = spec.selector.map(|s| selector(s.match_labels)).transpose()?;
    let raw_rules = spec.rules.unwrap_or_default();
    if action == Action::Deny && raw_rules.is_empty() {
        return Err(FieldError::new(
            "spec.rules",
            "a DENY policy needs rules (without them it would match nothing)",
        ));
    }
    let mut rules = Vec::with_capacity(raw_rules.len());
    for (i, rule) in raw_rules.into_iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let rule = rule.ok_or_else(|| FieldError::new(&path, "a rule must not be null"))?;
        rules.push(compile_rule(&path, rule)?);
    }
    Ok(Policy { namespace, name, action, dry_run, selector, rules })
}

fn unsupported_target(field: &str) -> FieldError {
    FieldError::new(
        field,
        "attaching to a Gateway or Service is not supported by a node proxy; select workloads with \
         spec.selector.matchLabels",
    )
}

/// A Kubernetes name: lower-case alphanumerics, `-` and `.`, starting and ending alphanumeric.
fn dns_name(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(FieldError::new(field, format!("{value:?} is not a valid Kubernetes name"))) }
}

fn selector(labels: BTreeMap<String, model::Scalar>) -> Result<BTreeMap<String, String>, FieldError> {
    let mut out = BTreeMap::new();
    for (key, value) in labels {
        let field = format!("spec.selector.matchLabels[{key}]");
        if key.is_empty() || key.len() > 317 || key.contains(char::is_whitespace) {
            return Err(FieldError::new(field, format!("{key:?} is not a valid label key")));
        }
        let v = value.0;
        let valid_value =
            v.len() <= 63 && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_value {
            return Err(FieldError::new(field, format!("{v:?} is not a valid label value")));
        }
        if v.contains('*') {
            return Err(FieldError::new(field, "wildcards are not allowed in label values"));
        }
        out.insert(key, v);
    }
    Ok(out)
}

fn compile_rule(path: &str, rule: model::Rule) -> Result<Rule, FieldError> {
    let from = entries(path, "from", "source", rule.from, |f| f.source, compile_source)?;
    let to = entries(path, "to", "operation", rule.to, |t| t.operation, compile_operation)?;
    let mut when = Clause::default();
    for (j, c) in rule.when.unwrap_or_default().into_iter().enumerate() {
        let p = format!("{path}.when[{j}]");
        let c = c.ok_or_else(|| FieldError::new(&p, "must not be null"))?;
        compile_condition(&p, c, &mut when)?;
    }
    let needs_http = from.iter().chain(&to).chain(std::iter::once(&when)).any(Clause::needs_http);
    Ok(Rule { from, to, when, needs_http })
}

/// Compiles `from` or `to`: absent is "any", an empty list or a null entry or inner object is an
/// error (as in Istio's validation), each inner object is compiled by `compile`.
fn entries<E, I>(
    path: &str,
    name: &str,
    inner: &str,
    list: Option<Vec<Option<E>>>,
    unwrap: impl Fn(E) -> Option<I>,
    compile: impl Fn(&str, I) -> Result<Clause, FieldError>,
) -> Result<Vec<Clause>, FieldError> {
    let Some(list) = list else { return Ok(Vec::new()) };
    if list.is_empty() {
        return Err(FieldError::new(format!("{path}.{name}"), "must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (j, entry) in list.into_iter().enumerate() {
        let p = format!("{path}.{name}[{j}]");
        let entry = entry.ok_or_else(|| FieldError::new(&p, "must not be null"))?;
        let p = format!("{p}.{inner}");
        let value = unwrap(entry).ok_or_else(|| FieldError::new(&p, "must not be null"))?;
        out.push(compile(&p, value)?);
    }
    Ok(out)
}

impl Clause {
    fn needs_http(&self) -> bool {
        self.0.iter().any(|p| matches!(p.test, Test::Http(_)))
    }
}

/// A list field: `None` when absent or empty (Istio treats both alike), each value checked.
fn values<'a>(path: &str, name: &str, list: &'a Option<Strings>) -> Result<Option<&'a [String]>, FieldError> {
    let Some(list) = list.as_ref().filter(|l| !l.0.is_empty()) else { return Ok(None) };
    for (k, v) in list.0.iter().enumerate() {
        if v.is_empty() {
            return Err(FieldError::new(format!("{path}.{name}[{k}]"), "empty value not allowed"));
        }
    }
    Ok(Some(&list.0))
}

fn strings(values: &[String]) -> Vec<StrMatch> {
    values.iter().map(|v| StrMatch::parse(v)).collect()
}

fn paths(path: &str, name: &str, values: &[String]) -> Result<Vec<PathMatch>, FieldError> {
    parse_each(path, name, values, PathMatch::parse)
}

fn ip_blocks(path: &str, name: &str, values: &[String]) -> Result<Vec<IpNet>, FieldError> {
    parse_each(path, name, values, parse_ip_block)
}

fn ports(path: &str, name: &str, values: &[String]) -> Result<Vec<u16>, FieldError> {
    parse_each(path, name, values, parse_port)
}

/// Parses every value, naming the first bad one by its index.
fn parse_each<T>(
    path: &str,
    name: &str,
    values: &[String],
    parse: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| parse(v).map_err(|m| FieldError::new(format!("{path}.{name}[{k}]"), m)))
        .collect()
}

fn principals(path: &str, name: &str, values: &[String]) -> Result<Vec<StrMatch>, FieldError> {
    for (k, v) in values.iter().enumerate() {
        if v.starts_with("spiffe://") {
            return Err(FieldError::new(
                format!("{path}.{name}[{k}]"),
                format!(
                    "{v:?}: write principals without \"spiffe://\" (TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT)"
                ),
            ));
        }
    }
    Ok(strings(values))
}

fn service_accounts(path: &str, name: &str, values: &[String]) -> Result<Vec<StrMatch>, FieldError> {
    for (k, v) in values.iter().enumerate() {
        let ok = matches!(v.split_once('/'), Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
        if !ok || v.contains('*') {
            return Err(FieldError::new(
                format!("{path}.{name}[{k}]"),
                format!("{v:?} must be NAMESPACE/SERVICEACCOUNT, without wildcards"),
            ));
        }
    }
    Ok(strings(values))
}

fn compile_source(path: &str, s: model::Source) -> Result<Clause, FieldError> {
    let mut clause = Clause::default();
    let mut push = |name: &str, negated: bool, test: Test| {
        clause.0.push(Predicate { field: format!("source.{name}"), negated, test });
    };
    let has = |l: &Option<Strings>| l.as_ref().is_some_and(|l| !l.0.is_empty());
    if (has(&s.service_accounts) || has(&s.not_service_accounts))
        && (has(&s.principals) || has(&s.not_principals) || has(&s.namespaces) || has(&s.not_namespaces))
    {
        return Err(FieldError::new(
            format!("{path}.serviceAccounts"),
            "cannot be set together with principals or namespaces",
        ));
    }
    for (name, negated, list) in
        [("principals", false, &s.principals), ("notPrincipals", true, &s.not_principals)]
    {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::Principal(principals(path, name, v)?));
        }
    }
    for (name, negated, list) in
        [("namespaces", false, &s.namespaces), ("notNamespaces", true, &s.not_namespaces)]
    {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::Namespace(strings(v)));
        }
    }
    for (name, negated, list) in [
        ("serviceAccounts", false, &s.service_accounts),
        ("notServiceAccounts", true, &s.not_service_accounts),
    ] {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::ServiceAccount(service_accounts(path, name, v)?));
        }
    }
    for (name, negated, list) in [("ipBlocks", false, &s.ip_blocks), ("notIpBlocks", true, &s.not_ip_blocks)]
    {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::SourceIp(ip_blocks(path, name, v)?));
        }
    }
    for (name, list) in
        [("requestPrincipals", &s.request_principals), ("notRequestPrincipals", &s.not_request_principals)]
    {
        if values(path, name, list)?.is_some() {
            return Err(jwt_unsupported(format!("{path}.{name}"), name));
        }
    }
    for (name, negated, list) in
        [("remoteIpBlocks", false, &s.remote_ip_blocks), ("notRemoteIpBlocks", true, &s.not_remote_ip_blocks)]
    {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::Http(HttpTest::RemoteIp(ip_blocks(path, name, v)?)));
        }
    }
    if clause.0.is_empty() {
        return Err(FieldError::new(path, "must not be empty"));
    }
    Ok(clause)
}

fn compile_operation(path: &str, o: model::Operation) -> Result<Clause, FieldError> {
    let mut clause = Clause::default();
    let mut push = |name: &str, negated: bool, test: Test| {
        clause.0.push(Predicate { field: format!("operation.{name}"), negated, test });
    };
    for (name, negated, list) in [("ports", false, &o.ports), ("notPorts", true, &o.not_ports)] {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::DestinationPort(ports(path, name, v)?));
        }
    }
    for (name, negated, list) in [("hosts", false, &o.hosts), ("notHosts", true, &o.not_hosts)] {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::Http(HttpTest::Host(strings(v))));
        }
    }
    for (name, negated, list) in [("methods", false, &o.methods), ("notMethods", true, &o.not_methods)] {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::Http(HttpTest::Method(strings(v))));
        }
    }
    for (name, negated, list) in [("paths", false, &o.paths), ("notPaths", true, &o.not_paths)] {
        if let Some(v) = values(path, name, list)? {
            push(name, negated, Test::Http(HttpTest::Path(paths(path, name, v)?)));
        }
    }
    if clause.0.is_empty() {
        return Err(FieldError::new(path, "must not be empty"));
    }
    Ok(clause)
}

/// The `when` keys Ferry knows, as Istio's validation lists them.
fn compile_condition(path: &str, c: model::Condition, when: &mut Clause) -> Result<(), FieldError> {
    let key = c.key.unwrap_or_default();
    if key.is_empty() {
        return Err(FieldError::new(format!("{path}.key"), "must not be empty"));
    }
    let pos = values(path, "values", &c.values)?;
    let neg = values(path, "notValues", &c.not_values)?;
    if pos.is_none() && neg.is_none() {
        return Err(FieldError::new(
            path,
            format!("at least one of values or notValues must be set for key {key:?}"),
        ));
    }
    for (name, negated, list) in [("values", false, pos), ("notValues", true, neg)] {
        let Some(list) = list else { continue };
        let test = condition_test(path, name, &key, list)?;
        when.0.push(Predicate { field: format!("when {key}"), negated, test });
    }
    Ok(())
}

fn condition_test(path: &str, name: &str, key: &str, list: &[String]) -> Result<Test, FieldError> {
    Ok(match key {
        "source.ip" => Test::SourceIp(ip_blocks(path, name, list)?),
        "source.namespace" => Test::Namespace(strings(list)),
        "source.principal" => Test::Principal(principals(path, name, list)?),
        "source.serviceAccount" => Test::ServiceAccount(service_accounts(path, name, list)?),
        "destination.ip" => Test::DestinationIp(ip_blocks(path, name, list)?),
        "destination.port" => Test::DestinationPort(ports(path, name, list)?),
        "remote.ip" => Test::Http(HttpTest::RemoteIp(ip_blocks(path, name, list)?)),
        "connection.sni" => Test::Http(HttpTest::Sni(strings(list))),
        "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => {
            return Err(jwt_unsupported(format!("{path}.key"), key));
        }
        _ => {
            if let Some(header) = bracketed(key, "request.headers") {
                if header.is_empty() {
                    return Err(FieldError::new(format!("{path}.key"), format!("{key:?} names no header")));
                }
                Test::Http(HttpTest::Header(header.to_ascii_lowercase(), strings(list)))
            } else if let Some(claim) = bracketed(key, "request.auth.claims") {
                if claim.is_empty() {
                    return Err(FieldError::new(format!("{path}.key"), format!("{key:?} names no claim")));
                }
                return Err(jwt_unsupported(format!("{path}.key"), key));
            } else if key.starts_with("experimental.") {
                return Err(FieldError::new(
                    format!("{path}.key"),
                    format!("{key:?} is not supported by Ferry"),
                ));
            } else {
                return Err(FieldError::new(format!("{path}.key"), format!("unknown attribute {key:?}")));
            }
        }
    })
}

/// Request principals and claims come from a validated JWT, which Ferry does not validate: a rule
/// on them is refused rather than left to match nothing.
fn jwt_unsupported(field: String, what: &str) -> FieldError {
    FieldError::new(
        field,
        format!(
            "{what:?} is not supported by Ferry: it needs JWT validation (RequestAuthentication), which Ferry does not do"
        ),
    )
}

/// `NAME` from `prefix[NAME]`.
fn bracketed<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')
}
