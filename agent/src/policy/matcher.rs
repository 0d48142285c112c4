//! Istio's value matching: the four string forms (exact, `prefix*`, `*suffix`, `*` for present and
//! non-empty), IP blocks and ports. Matching never allocates: it runs for every connection.

use std::net::IpAddr;

use ipnet::IpNet;

/// One string value of a policy, in one of Istio's four forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    /// The whole value.
    Exact(String),
    /// `prefix*`.
    Prefix(String),
    /// `*suffix`.
    Suffix(String),
    /// `*`: present and non-empty.
    Present,
}

impl StrMatch {
    /// Reads Istio's notation: a leading or trailing `*` is a wildcard, `*` alone means present.
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            StrMatch::Present
        } else if let Some(prefix) = value.strip_suffix('*') {
            StrMatch::Prefix(prefix.to_owned())
        } else if let Some(suffix) = value.strip_prefix('*') {
            StrMatch::Suffix(suffix.to_owned())
        } else {
            StrMatch::Exact(value.to_owned())
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(v) => value == v,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
            StrMatch::Present => !value.is_empty(),
        }
    }

    /// Whether the concatenation of `parts` matches, without building it.
    pub fn matches_parts(&self, parts: &[&str]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        match self {
            StrMatch::Exact(v) => v.len() == len && starts_with_parts(v, parts),
            StrMatch::Prefix(p) => len >= p.len() && parts_start_with(parts, p),
            StrMatch::Suffix(s) => len >= s.len() && parts_end_with(parts, s),
            StrMatch::Present => len > 0,
        }
    }

    /// ASCII case-insensitive match (hosts).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let (v, s) = (value.as_bytes(), self);
        match s {
            StrMatch::Exact(x) => value.eq_ignore_ascii_case(x),
            StrMatch::Prefix(p) => v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes()),
            StrMatch::Suffix(x) => {
                v.len() >= x.len() && v[v.len() - x.len()..].eq_ignore_ascii_case(x.as_bytes())
            }
            StrMatch::Present => !value.is_empty(),
        }
    }
}

impl std::fmt::Display for StrMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StrMatch::Exact(v) => f.write_str(v),
            StrMatch::Prefix(p) => write!(f, "{p}*"),
            StrMatch::Suffix(s) => write!(f, "*{s}"),
            StrMatch::Present => f.write_str("*"),
        }
    }
}

/// Whether `whole` (exactly as long as the parts together) equals the parts' concatenation.
fn starts_with_parts(whole: &str, parts: &[&str]) -> bool {
    let mut rest = whole;
    for part in parts {
        match rest.strip_prefix(part) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// Whether the concatenation of `parts` starts with `prefix`.
fn parts_start_with(parts: &[&str], prefix: &str) -> bool {
    let mut need = prefix;
    for part in parts {
        if need.is_empty() {
            return true;
        }
        let n = need.len().min(part.len());
        if part.as_bytes()[..n] != need.as_bytes()[..n] {
            return false;
        }
        need = &need[n..];
    }
    need.is_empty()
}

/// Whether the concatenation of `parts` ends with `suffix`.
fn parts_end_with(parts: &[&str], suffix: &str) -> bool {
    let mut need = suffix.as_bytes();
    for part in parts.iter().rev() {
        if need.is_empty() {
            return true;
        }
        let p = part.as_bytes();
        let n = need.len().min(p.len());
        if p[p.len() - n..] != need[need.len() - n..] {
            return false;
        }
        need = &need[..need.len() - n];
    }
    need.is_empty()
}

/// One `paths` value: one of the string forms, or a template with `{*}` (one segment) and `{**}`
/// (the rest of the path, last only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// Exact, `prefix*`, `*suffix` or `*`.
    Str(StrMatch),
    /// Segments after the leading `/`.
    Template(Vec<Segment>),
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// This text exactly.
    Literal(String),
    /// `{*}`: any one non-empty segment.
    One,
    /// `{**}`: one or more segments, to the end.
    Rest,
}

impl PathMatch {
    /// Reads a `paths` value, refusing the template forms Istio refuses.
    pub fn parse(value: &str) -> Result<Self, String> {
        if !value.contains('{') && !value.contains('}') {
            return Ok(PathMatch::Str(StrMatch::parse(value)));
        }
        let Some(rest) = value.strip_prefix('/') else {
            return Err(format!("{value:?}: a path template must start with /"));
        };
        if value.contains('*') && value.replace("{*}", "").replace("{**}", "").contains('*') {
            return Err(format!("{value:?}: a path template cannot be combined with * wildcards"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "{*}" => Segment::One,
                "{**}" if i + 1 == parts.len() => Segment::Rest,
                "{**}" => return Err(format!("{value:?}: {{**}} must be the last segment")),
                p if p.contains('{') || p.contains('}') => {
                    return Err(format!("{value:?}: {p:?} is not a template segment (use {{*}} or {{**}})"));
                }
                p => Segment::Literal(p.to_owned()),
            });
        }
        Ok(PathMatch::Template(segments))
    }

    /// Whether the normalized `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let mut parts = rest.split('/');
                for seg in segments {
                    match seg {
                        Segment::Rest => return parts.next().is_some_and(|p| !p.is_empty()),
                        Segment::One => {
                            if parts.next().is_none_or(|p| p.is_empty()) {
                                return false;
                            }
                        }
                        Segment::Literal(l) => {
                            if parts.next() != Some(l.as_str()) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

impl std::fmt::Display for PathMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathMatch::Str(m) => m.fmt(f),
            PathMatch::Template(segments) => {
                for s in segments {
                    match s {
                        Segment::Literal(l) => write!(f, "/{l}")?,
                        Segment::One => f.write_str("/{*}")?,
                        Segment::Rest => f.write_str("/{**}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is in any of `nets`.
pub fn ip_in(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Parses an Istio IP block: an address (a /32 or /128) or a CIDR; host bits are cleared.
pub fn parse_ip_block(value: &str) -> Result<IpNet, String> {
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(canonical_net(net.trunc()));
    }
    match value.parse::<IpAddr>() {
        Ok(ip) => Ok(canonical_net(IpNet::from(ip))),
        Err(_) => Err(format!("{value:?} is not an IP address or CIDR")),
    }
}

/// An IPv4-mapped IPv6 block becomes the IPv4 block, as addresses are compared in canonical form.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n);
    }
    net
}

/// Parses a port as Istio's validation does: a decimal number in 1..=65535.
pub fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is not in 1..65535")),
        Err(_) => Err(format!("{value:?} is not a port number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms() {
        let cases = [
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("ab*", "abcd", true),
            ("ab*", "ab", true),
            ("ab*", "a", false),
            ("*cd", "abcd", true),
            ("*cd", "abc", false),
            ("*", "x", true),
            ("*", "", false),
            ("a*b", "a*b", true),
            ("a*b", "axb", false),
        ];
        for (pattern, value, want) in cases {
            let m = StrMatch::parse(pattern);
            assert_eq!(m.matches(value), want, "{pattern} vs {value}");
            // The split form agrees with the whole form at every split point.
            for at in 0..=value.len() {
                let parts = [&value[..at], &value[at..]];
                assert_eq!(m.matches_parts(&parts), want, "{pattern} vs {parts:?}");
            }
        }
        // A `*` inside a value is no wildcard (Istio has only the leading and trailing forms).
        assert_eq!(StrMatch::parse("a*b"), StrMatch::Exact("a*b".into()));
    }

    #[test]
    fn ip_blocks_and_ports() {
        let nets = [parse_ip_block("10.1.0.0/16").unwrap(), parse_ip_block("fd00::1").unwrap()];
        assert!(ip_in(&nets, "10.1.2.3".parse().unwrap()));
        assert!(ip_in(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!ip_in(&nets, "10.2.0.1".parse().unwrap()));
        assert!(ip_in(&nets, "fd00::1".parse().unwrap()));
        assert_eq!(parse_ip_block("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_ip_block("::ffff:10.0.0.0/104").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_ip_block("10.0.0.300").unwrap_err().contains("\"10.0.0.300\""));
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").unwrap_err().contains("1..65535"));
        assert!(parse_port("80-90").unwrap_err().contains("not a port"));
    }

    #[test]
    fn path_templates() {
        let m = |t: &str| PathMatch::parse(t).unwrap();
        assert!(m("/api/{*}/info").matches("/api/v1/info"));
        assert!(!m("/api/{*}/info").matches("/api/v1/v2/info"));
        assert!(!m("/api/{*}/info").matches("/api//info"));
        assert!(m("/api/{**}").matches("/api/a/b/c"));
        assert!(!m("/api/{**}").matches("/api"));
        assert!(m("/public*").matches("/public/x"));
        assert!(PathMatch::parse("/a/{**}/b").unwrap_err().contains("last segment"));
        assert!(PathMatch::parse("/a/{x}").unwrap_err().contains("not a template segment"));
        assert!(PathMatch::parse("/a/{*}*").unwrap_err().contains("wildcards"));
        assert_eq!(m("/api/{*}/{**}").to_string(), "/api/{*}/{**}");
    }

    #[test]
    fn hosts_ignore_case() {
        assert!(StrMatch::parse("Example.COM").matches_ignore_case("example.com"));
        assert!(StrMatch::parse("*.EXAMPLE.com").matches_ignore_case("a.example.COM"));
        assert!(StrMatch::parse("API.*").matches_ignore_case("api.example"));
    }
}
