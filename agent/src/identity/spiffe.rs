//! SPIFFE IDs (`spiffe://TRUST_DOMAIN/PATH`), parsed and validated per the SPIFFE ID specification.
//!
//! The parser is a pure function over `&str` so it can be fuzzed directly.

use std::fmt;
use std::str::FromStr;

/// Maximum length of a SPIFFE ID in bytes (SPIFFE ID spec, section 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME_PREFIX: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The input is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {0} bytes long, over the {MAX_SPIFFE_ID_LEN}-byte limit")]
    TooLong(usize),
    /// The scheme is not `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    /// The authority holds a user-info part (`user@`).
    #[error("SPIFFE ID must not contain user info ('@')")]
    UserInfo,
    /// The authority holds a port (`:port`).
    #[error("SPIFFE ID must not contain a port (':')")]
    Port,
    /// The URI holds a query (`?`).
    #[error("SPIFFE ID must not contain a query ('?')")]
    Query,
    /// The URI holds a fragment (`#`).
    #[error("SPIFFE ID must not contain a fragment ('#')")]
    Fragment,
    /// A trust domain character outside `[a-z0-9.-_]`.
    #[error("trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    TrustDomainChar(char),
    /// A path character outside `[A-Za-z0-9.-_]` (percent-encoding is not allowed either).
    #[error("path contains {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
    /// Two slashes in a row, or a trailing slash.
    #[error("path has an empty segment (\"//\" or a trailing '/')")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("path has a '.' or '..' segment")]
    DotSegment,
}

/// A validated SPIFFE trust domain name, such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://NAME` (used as the CA certificates' URI SAN).
    pub fn id(&self) -> SpiffeId {
        SpiffeId { td_end: SCHEME_PREFIX.len() + self.0.len(), uri: format!("{SCHEME_PREFIX}{}", self.0) }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI, exactly as validated.
    uri: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID such as `spiffe://example.org/ns/default/sa/web`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let td_end = validate(s)?;
        Ok(Self { uri: s.to_owned(), td_end })
    }

    /// The Kubernetes-style workload ID `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
    pub fn workload(trust_domain: &TrustDomain, ns: &str, sa: &str) -> Result<Self, SpiffeIdError> {
        // A '/' inside a part would silently change the ID's shape rather than fail validation.
        if ns.contains('/') || sa.contains('/') {
            return Err(SpiffeIdError::PathChar('/'));
        }
        Self::parse(&format!("{SCHEME_PREFIX}{trust_domain}/ns/{ns}/sa/{sa}"))
    }

    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain name (the URI's authority).
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.td_end]
    }

    /// True when this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain() == td.as_str()
    }

    /// The path, starting with `/`, or empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    /// The namespace of a `/ns/NS/sa/SA` workload ID.
    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().map(|(ns, _)| ns)
    }

    /// The service account of a `/ns/NS/sa/SA` workload ID.
    pub fn service_account(&self) -> Option<&str> {
        self.workload_parts().map(|(_, sa)| sa)
    }

    fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (segments.next(), segments.next(), segments.next(), segments.next(), segments.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Validates a SPIFFE ID and returns the byte offset where its path starts.
pub fn validate(s: &str) -> Result<usize, SpiffeIdError> {
    if s.is_empty() {
        return Err(SpiffeIdError::Empty);
    }
    if s.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdError::TooLong(s.len()));
    }
    let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(SpiffeIdError::WrongScheme)?;
    let td_len = rest.find('/').unwrap_or(rest.len());
    validate_trust_domain(&rest[..td_len])?;
    validate_path(&rest[td_len..])?;
    Ok(SCHEME_PREFIX.len() + td_len)
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            '@' => return Err(SpiffeIdError::UserInfo),
            ':' => return Err(SpiffeIdError::Port),
            other => return Err(uri_delimiter(other).unwrap_or(SpiffeIdError::TrustDomainChar(other))),
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so a non-empty path starts with one.
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        for c in segment.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                other => return Err(uri_delimiter(other).unwrap_or(SpiffeIdError::PathChar(other))),
            }
        }
    }
    Ok(())
}

/// Names the URI parts that the spec forbids, so errors say "query" rather than "bad char '?'".
fn uri_delimiter(c: char) -> Option<SpiffeIdError> {
    match c {
        '?' => Some(SpiffeIdError::Query),
        '#' => Some(SpiffeIdError::Fragment),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for good in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default/sa/web",
            "spiffe://a",
            "spiffe://cluster.local/ns/kube-system/sa/coredns",
            "spiffe://td_with-under.score9/Path.With-Mixed_Case/0",
            "spiffe://example.org/a/b/c/d/e/f",
            "spiffe://example.org/...",
            "spiffe://example.org/.hidden",
        ] {
            assert!(SpiffeId::parse(good).is_ok(), "{good} should be valid");
        }
    }

    #[test]
    fn rejects_invalid_ids_with_specific_errors() {
        use SpiffeIdError as E;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", E::Empty),
            ("http://example.org/a", E::WrongScheme),
            ("SPIFFE://example.org/a", E::WrongScheme),
            ("spiffe:/example.org/a", E::WrongScheme),
            ("example.org/a", E::WrongScheme),
            ("spiffe://", E::EmptyTrustDomain),
            ("spiffe:///path", E::EmptyTrustDomain),
            ("spiffe://Example.org/a", E::TrustDomainChar('E')),
            ("spiffe://exa mple.org", E::TrustDomainChar(' ')),
            ("spiffe://exämple.org", E::TrustDomainChar('ä')),
            ("spiffe://user@example.org/a", E::UserInfo),
            ("spiffe://example.org:8080/a", E::Port),
            ("spiffe://example.org/a?x=1", E::Query),
            ("spiffe://example.org?x=1", E::Query),
            ("spiffe://example.org/a#frag", E::Fragment),
            ("spiffe://example.org/", E::EmptySegment),
            ("spiffe://example.org//a", E::EmptySegment),
            ("spiffe://example.org/a/", E::EmptySegment),
            ("spiffe://example.org/a/./b", E::DotSegment),
            ("spiffe://example.org/..", E::DotSegment),
            ("spiffe://example.org/a%20b", E::PathChar('%')),
            ("spiffe://example.org/a b", E::PathChar(' ')),
            ("spiffe://example.org/a:b", E::PathChar(':')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn enforces_the_length_limit() {
        let prefix = "spiffe://example.org/";
        let at_limit = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(at_limit.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&at_limit).is_ok());
        let over = format!("{at_limit}a");
        assert_eq!(SpiffeId::parse(&over), Err(SpiffeIdError::TooLong(MAX_SPIFFE_ID_LEN + 1)));
    }

    #[test]
    fn workload_ids_expose_their_parts() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "shop", "cart").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/cart");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.service_account(), Some("cart"));
        assert!(id.is_member_of(&td));
        assert!(!id.is_member_of(&TrustDomain::new("other.org").unwrap()));
    }

    #[test]
    fn workload_rejects_bad_parts() {
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(SpiffeId::workload(&td, "", "sa"), Err(SpiffeIdError::EmptySegment));
        assert_eq!(SpiffeId::workload(&td, "..", "sa"), Err(SpiffeIdError::DotSegment));
        assert_eq!(SpiffeId::workload(&td, "ns", "s?a"), Err(SpiffeIdError::Query));
        assert_eq!(SpiffeId::workload(&td, "a/sa/b", "c"), Err(SpiffeIdError::PathChar('/')));
        assert_eq!(SpiffeId::workload(&td, "a", "b/c"), Err(SpiffeIdError::PathChar('/')));
    }

    #[test]
    fn non_workload_paths_have_no_namespace() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default",
            "spiffe://example.org/ns/default/sa/web/extra",
            "spiffe://example.org/namespace/default/sa/web",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.namespace(), None, "{s}");
            assert_eq!(id.service_account(), None, "{s}");
        }
    }

    #[test]
    fn trust_domains_validate_like_id_authorities() {
        assert!(TrustDomain::new("example.org").is_ok());
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::EmptyTrustDomain));
        assert_eq!(TrustDomain::new("Example"), Err(SpiffeIdError::TrustDomainChar('E')));
        assert_eq!(TrustDomain::new("a/b"), Err(SpiffeIdError::TrustDomainChar('/')));
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(td.id().trust_domain(), "example.org");
        assert_eq!(td.id().path(), "");
    }
}
