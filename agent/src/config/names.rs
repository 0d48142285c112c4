//! Syntax rules for the names in the mesh file, as Kubernetes and SPIFFE define them.
//!
//! Each check returns the whole message (naming the value) so callers only add the field path.

/// Longest DNS label (RFC 1123).
const MAX_LABEL: usize = 63;
/// Longest DNS subdomain (RFC 1123, as Kubernetes uses it).
const MAX_SUBDOMAIN: usize = 253;
/// Longest trust domain (SPIFFE ID spec).
const MAX_TRUST_DOMAIN: usize = 255;

/// Checks a Kubernetes name such as a pod name or namespace: an RFC 1123 DNS label.
pub(super) fn dns_label(value: &str) -> Result<(), String> {
    label_rule(value).map_err(|why| format!("{value:?} is not a valid DNS label: {why}"))
}

/// Checks a dotted name such as a service account or node name: an RFC 1123 DNS subdomain.
pub(super) fn dns_subdomain(value: &str) -> Result<(), String> {
    let rule = || {
        if value.len() > MAX_SUBDOMAIN {
            return Err(format!("it is longer than {MAX_SUBDOMAIN} characters"));
        }
        value.split('.').try_for_each(label_rule)
    };
    rule().map_err(|why| format!("{value:?} is not a valid DNS subdomain: {why}"))
}

/// Checks a SPIFFE trust domain: lowercase letters, digits, '.', '-' and '_'.
pub(super) fn trust_domain(value: &str) -> Result<(), String> {
    let why = if value.is_empty() {
        "it is empty".to_owned()
    } else if value.len() > MAX_TRUST_DOMAIN {
        format!("it is longer than {MAX_TRUST_DOMAIN} characters")
    } else if !value.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')) {
        "only lowercase letters, digits, '.', '-' and '_' are allowed".to_owned()
    } else {
        return Ok(());
    };
    Err(format!("{value:?} is not a valid trust domain: {why}"))
}

/// Checks a Kubernetes label value: at most 63 characters of alphanumerics, '-', '_' and '.',
/// starting and ending alphanumeric; empty is allowed.
pub(super) fn label_value(value: &str) -> Result<(), String> {
    qualified_rule(value, true).map_err(|why| format!("{value:?} is not a valid label value: {why}"))
}

/// Checks a Kubernetes label key: an optional DNS-subdomain prefix and '/', then a name with the
/// rules of a label value (but not empty).
pub(super) fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns_subdomain(prefix).map_err(|why| format!("{key:?} is not a valid label key: its prefix {why}"))?;
    }
    qualified_rule(name, false).map_err(|why| format!("{key:?} is not a valid label key: {why}"))
}

/// The reason `value` is not a Kubernetes qualified name (the part of a label after any prefix).
fn qualified_rule(value: &str, empty_ok: bool) -> Result<(), String> {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    if value.is_empty() {
        return if empty_ok { Ok(()) } else { Err("it is empty".to_owned()) };
    }
    if value.len() > MAX_LABEL {
        Err(format!("it is longer than {MAX_LABEL} characters"))
    } else if !value.bytes().all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.')) {
        Err("only letters, digits, '-', '_' and '.' are allowed".to_owned())
    } else if !value.bytes().next().is_some_and(alnum) || !value.bytes().last().is_some_and(alnum) {
        Err("it must start and end with a letter or digit".to_owned())
    } else {
        Ok(())
    }
}

/// The reason `value` is not an RFC 1123 label, if it is not.
fn label_rule(value: &str) -> Result<(), String> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if value.is_empty() {
        Err("it has an empty label".to_owned())
    } else if value.len() > MAX_LABEL {
        Err(format!("a label is longer than {MAX_LABEL} characters"))
    } else if !value.bytes().all(|b| alnum(b) || b == b'-') {
        Err("only lowercase letters, digits and '-' are allowed".to_owned())
    } else if !value.bytes().next().is_some_and(alnum) || !value.bytes().last().is_some_and(alnum) {
        Err("a label must start and end with a lowercase letter or digit".to_owned())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `rule` accepts every `good` name and rejects every `bad` one, quoting it and saying `why`.
    fn check(rule: fn(&str) -> Result<(), String>, good: &[&str], bad: &[(&str, &str)]) {
        for good in good {
            assert_eq!(rule(good), Ok(()), "{good}");
        }
        for (bad, why) in bad {
            let err = rule(bad).expect_err(bad);
            assert!(err.contains(why) && err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn labels() {
        let bad = [
            ("", "empty"),
            ("Client", "only lowercase"),
            ("a.b", "only lowercase"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            (&"x".repeat(64), "longer than 63"),
        ];
        check(dns_label, &["a", "client", "server-1", "0abc", &"x".repeat(63)], &bad);
    }

    #[test]
    fn subdomains() {
        let bad = [
            ("a..b", "empty label"),
            (".a", "empty label"),
            ("a_b", "only lowercase"),
            ("a.-b", "start and end"),
            (&"a.".repeat(127), "longer than 253"),
        ];
        check(dns_subdomain, &["client", "node-a.example.com", "sa.x-1"], &bad);
    }

    #[test]
    fn trust_domains() {
        let bad = [
            ("", "empty"),
            ("Cluster.local", "only lowercase"),
            ("a/b", "only"),
            (&"a".repeat(256), "longer"),
        ];
        check(trust_domain, &["cluster.local", "example_org", "td-1"], &bad);
    }
}
