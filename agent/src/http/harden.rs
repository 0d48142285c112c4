//! What hyper leaves to a proxy (see `../shared/reference/l7.md`): requests whose framing or
//! authority is ambiguous are refused before policy sees them, and hop-by-hop headers are removed
//! before a message is forwarded, so the app reads exactly what was authorized.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version, header};

/// Why a request was refused with 400; [`Rejection::reason`] is the metric and log label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Content-Length and Transfer-Encoding together: two framings, so the message is ambiguous.
    /// hyper's HTTP/1 parser already resolves it (chunked wins, Content-Length is dropped, the
    /// connection closes after the response); this catches the pair wherever it still arrives.
    ContentLengthAndTransferEncoding,
    /// More than one Content-Length field.
    DuplicateContentLength,
    /// A Transfer-Encoding other than exactly `chunked`.
    TransferEncoding,
    /// HTTP/1.1 without Host.
    MissingHost,
    /// More than one Host field.
    DuplicateHost,
    /// Host differs from the authority of the target (absolute form, or h2's `:authority`).
    HostMismatch,
    /// An authority-form or otherwise unusable target on a method that is not CONNECT.
    Target,
    /// A path that normalization refuses (`%00`, bad percent-encoding).
    Path,
}

impl Rejection {
    /// The label value.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::ContentLengthAndTransferEncoding => "content_length_and_transfer_encoding",
            Rejection::DuplicateContentLength => "duplicate_content_length",
            Rejection::TransferEncoding => "transfer_encoding",
            Rejection::MissingHost => "missing_host",
            Rejection::DuplicateHost => "duplicate_host",
            Rejection::HostMismatch => "host_mismatch",
            Rejection::Target => "invalid_target",
            Rejection::Path => "invalid_path",
        }
    }

    /// Whether the refusal is about how the message is framed: then where the next request on an
    /// HTTP/1 connection starts is in doubt too, and the connection must close after the 400.
    pub fn is_framing(self) -> bool {
        matches!(
            self,
            Rejection::ContentLengthAndTransferEncoding
                | Rejection::DuplicateContentLength
                | Rejection::TransferEncoding
        )
    }
}

/// Checks a request head as hyper parsed it; `Ok` gives the authority policy keys on.
pub fn check<'a>(
    method: &Method,
    uri: &'a http::Uri,
    version: Version,
    headers: &'a HeaderMap,
) -> Result<&'a str, Rejection> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let has_length = lengths.next().is_some();
    if lengths.next().is_some() {
        return Err(Rejection::DuplicateContentLength);
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(coding) = codings.next() {
        if has_length {
            return Err(Rejection::ContentLengthAndTransferEncoding);
        }
        if codings.next().is_some() || !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(Rejection::TransferEncoding);
        }
    }
    // Authority-form is CONNECT's alone; `GET host:80` would be authorized as path "/".
    if *method != Method::CONNECT && uri.scheme().is_none() && uri.authority().is_some() {
        return Err(Rejection::Target);
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::DuplicateHost);
    }
    let host = host.map(|h| h.to_str().map_err(|_| Rejection::HostMismatch)).transpose()?;
    match (uri.authority(), host) {
        (Some(authority), Some(host)) if !authority.as_str().eq_ignore_ascii_case(host) => {
            Err(Rejection::HostMismatch)
        }
        (Some(authority), _) => Ok(authority.as_str()),
        (None, Some(host)) => Ok(host),
        (None, None) if version == Version::HTTP_11 => Err(Rejection::MissingHost),
        (None, None) => Ok(""),
    }
}

/// Headers that describe one hop and are never forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers and those `Connection` names; `TE: trailers` is kept (gRPC needs
/// it), and `Upgrade` with `Connection: upgrade` when the message asks to switch protocols
/// (`upgrading`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let upgrade = upgrading.then(|| headers.get(header::UPGRADE).cloned()).flatten();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|c| c.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether an HTTP/1 request asks to switch protocols (`Connection: upgrade` and `Upgrade`) to one
/// the proxy lets through. `h2c` never is: after the switch the client would speak HTTP/2 to the
/// app directly, and its requests would bypass per-request policy (h2c smuggling); its Upgrade
/// header is then removed like any hop-by-hop header, so the app answers in HTTP/1.1.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let tokens = |name: header::HeaderName, token: &'static str| {
        headers.get_all(name).into_iter().any(move |v| {
            v.to_str().map_or(true, |v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    headers.contains_key(header::UPGRADE)
        && !tokens(header::UPGRADE, "h2c")
        && tokens(header::CONNECTION, "upgrade")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn check_h1(target: &str, pairs: &[(&str, &str)]) -> Result<String, Rejection> {
        let uri: http::Uri = target.parse().unwrap();
        let map = headers(pairs);
        check(&Method::GET, &uri, Version::HTTP_11, &map).map(str::to_owned)
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        use Rejection::*;
        for (pairs, want) in [
            (
                &[("host", "a"), ("content-length", "3"), ("transfer-encoding", "chunked")][..],
                ContentLengthAndTransferEncoding,
            ),
            (&[("host", "a"), ("content-length", "3"), ("content-length", "3")], DuplicateContentLength),
            (&[("host", "a"), ("transfer-encoding", "gzip, chunked")], TransferEncoding),
            (
                &[("host", "a"), ("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
                TransferEncoding,
            ),
            (&[], MissingHost),
            (&[("host", "a"), ("host", "b")], DuplicateHost),
        ] {
            assert_eq!(check_h1("/", pairs), Err(want), "{pairs:?}");
        }
        assert_eq!(check_h1("http://b/x", &[("host", "a")]), Err(HostMismatch));
        assert_eq!(check_h1("a:80", &[("host", "a:80")]), Err(Target));
    }

    #[test]
    fn only_framing_refusals_end_the_connection() {
        use Rejection::*;
        for r in [ContentLengthAndTransferEncoding, DuplicateContentLength, TransferEncoding] {
            assert!(r.is_framing(), "{r:?}");
        }
        for r in [MissingHost, DuplicateHost, HostMismatch, Target, Path] {
            assert!(!r.is_framing(), "{r:?}");
        }
    }

    #[test]
    fn the_authority_comes_from_the_target_or_host() {
        assert_eq!(check_h1("/x", &[("host", "Echo.Demo:8080")]).unwrap(), "Echo.Demo:8080");
        assert_eq!(check_h1("http://echo/x", &[("host", "ECHO")]).unwrap(), "echo");
        assert_eq!(check_h1("/x", &[("host", "a"), ("transfer-encoding", "Chunked")]).unwrap(), "a");
        let uri: http::Uri = "/".parse().unwrap();
        assert_eq!(check(&Method::GET, &uri, Version::HTTP_10, &HeaderMap::new()), Ok(""));
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let mut names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(map["te"], "trailers");
    }

    #[test]
    fn an_h2c_upgrade_is_never_let_through() {
        for upgrade in ["h2c", "H2C", "websocket, h2c"] {
            let mut map = headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ]);
            assert!(!wants_upgrade(&map), "{upgrade}");
            strip_hop_by_hop(&mut map, false);
            assert!(map.is_empty(), "{upgrade}: {map:?}");
        }
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut map =
            headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(wants_upgrade(&map));
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["connection"], "upgrade");
        assert_eq!(map["sec-websocket-key"], "k");
    }
}
