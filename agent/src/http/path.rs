//! Istio's path normalization, applied before a request is authorized and before it is forwarded,
//! so the policy and the app see the same path: BASE (RFC 3986 dot-segment removal, `\` to `/`,
//! percent-encoded unreserved characters decoded) by default, `MERGE_SLASHES` also merges `//`, and
//! `DECODE_AND_MERGE_SLASHES` also decodes `%2F` and `%5C` first. The query and fragment are never
//! part of the matched path. Past bypasses this closes: `/public/../admin` (CVE-2019-9901), `//admin`
//! and `%2F` with the slash options (CVE-2021-31920), `#fragment` (CVE-2021-39156).

use std::fmt;

/// Which of Istio's normalizations applies (`meshConfig.pathNormalization`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Normalization {
    /// RFC 3986 normalization plus `\` to `/` (Istio's default).
    #[default]
    Base,
    /// BASE, then `//` merged into `/`.
    MergeSlashes,
    /// `%2F` and `%5C` decoded, then BASE and MERGE_SLASHES.
    DecodeAndMergeSlashes,
}

impl Normalization {
    /// Reads Istio's names (`BASE`, `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "BASE" => Some(Normalization::Base),
            "MERGE_SLASHES" => Some(Normalization::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Some(Normalization::DecodeAndMergeSlashes),
            _ => None,
        }
    }
}

/// Why a request target is refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// `%00`: a NUL would end the path early in many apps.
    EncodedNul,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// The path does not start with `/` (origin-form is required here).
    NotAbsolute,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::EncodedNul => "the path contains %00",
            PathError::BadPercentEncoding => "the path has a malformed percent-encoding",
            PathError::NotAbsolute => "the path does not start with /",
        })
    }
}

impl std::error::Error for PathError {}

/// The path of `target` (an origin-form request target: path, then `?query`, then `#fragment`),
/// normalized as `mode` says. The query and fragment are dropped: policy never matches on them.
pub fn normalize(target: &str, mode: Normalization) -> Result<String, PathError> {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let path = &target[..end];
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode(path, mode == Normalization::DecodeAndMergeSlashes)?;
    let slashed = decoded.replace('\\', "/");
    let merged = if mode == Normalization::Base { slashed } else { merge_slashes(&slashed) };
    Ok(remove_dot_segments(&merged))
}

/// Decodes percent-encoded unreserved characters (and `%2F`/`%5C` when `slashes`), upper-cases the
/// hex of the encodings it keeps, and refuses `%00` and malformed encodings.
fn decode(path: &str, slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Everything else is copied as is: the request line was checked by the HTTP parser.
            let next = path[i..].find('%').map_or(path.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let hex = |b: u8| (b as char).to_digit(16);
        let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
            return Err(PathError::BadPercentEncoding);
        };
        let (Some(h), Some(l)) = (hex(h), hex(l)) else { return Err(PathError::BadPercentEncoding) };
        let c = (h * 16 + l) as u8;
        if c == 0 {
            return Err(PathError::EncodedNul);
        }
        let unreserved = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
        if unreserved || (slashes && matches!(c, b'/' | b'\\')) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push_str(&format!("{c:02X}"));
        }
        i += 3;
    }
    Ok(out)
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// RFC 3986 section 5.2.4, on a path that starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path.split('/').skip(1).peekable();
    // A final `.` or `..` still leaves a trailing slash (`/a/b/..` is `/a/`).
    let mut trailing_slash = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_normalization_closes_the_known_bypasses() {
        let cases = [
            ("/public", "/public"),
            ("/public/../public", "/public"),
            ("/public/../private", "/private"),
            ("/public/%2E%2E/private", "/private"),
            ("/public/%2e%2e/private", "/private"),
            ("/public/./x", "/public/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../etc", "/etc"),
            ("/", "/"),
            ("/allow/admin?x=y", "/allow/admin"),
            ("/allow/admin#frag", "/allow/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/%41dmin", "/Admin"),
            ("/a%2fb", "/a%2Fb"),
            ("//private", "//private"),
            ("/a%20b", "/a%20b"),
        ];
        for (target, want) in cases {
            assert_eq!(normalize(target, Normalization::Base).as_deref(), Ok(want), "{target}");
        }
    }

    #[test]
    fn slash_options() {
        assert_eq!(normalize("//private", Normalization::MergeSlashes).as_deref(), Ok("/private"));
        assert_eq!(normalize("/a//b///c", Normalization::MergeSlashes).as_deref(), Ok("/a/b/c"));
        assert_eq!(normalize("/a%2Fb", Normalization::MergeSlashes).as_deref(), Ok("/a%2Fb"));
        assert_eq!(normalize("/a%2F%2Fb", Normalization::DecodeAndMergeSlashes).as_deref(), Ok("/a/b"));
        assert_eq!(
            normalize("/x%5C..%5Cadmin", Normalization::DecodeAndMergeSlashes).as_deref(),
            Ok("/admin")
        );
        assert_eq!(Normalization::parse("MERGE_SLASHES"), Some(Normalization::MergeSlashes));
        assert_eq!(Normalization::parse("merge"), None);
    }

    #[test]
    fn refused_targets() {
        assert_eq!(normalize("/a%00b", Normalization::Base), Err(PathError::EncodedNul));
        assert_eq!(normalize("/a%0", Normalization::Base), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize("/a%zz", Normalization::Base), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize("a/b", Normalization::Base), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*", Normalization::Base), Err(PathError::NotAbsolute));
    }
}
