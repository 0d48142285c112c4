//! Every HBONE stream starts with a CONNECT that any peer holding an SVID of the trust domain may
//! send: whatever its method, target and headers, reading it must not panic, must refuse with 405
//! or 400 what is not a CONNECT to a non-zero `ip:port`, and must hand the handler exactly the
//! target, declared protocol (`x-ferry-app-protocol`) and `Forwarded` source that the request
//! carries. The input is text like an HTTP/1 head, so seeds stay readable: `METHOD TARGET` on the
//! first line, then `name: value` lines; parts that http's types refuse are dropped, since h2
//! never delivers them.

#![no_main]

use std::sync::OnceLock;

use ferry::config::AppProtocol;
use ferry::hbone::server::{forwarded_for, forwarded_value, parse_connect};
use ferry::hbone::{PROTOCOL_HEADER, Refusal};
use ferry::identity::SpiffeId;
use http::header::{FORWARDED, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;

fn peer() -> &'static SpiffeId {
    static PEER: OnceLock<SpiffeId> = OnceLock::new();
    PEER.get_or_init(|| SpiffeId::parse("spiffe://cluster.local/ns/a/sa/client").expect("id"))
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let (method, target) = match request_line.iter().position(|&b| b == b' ') {
        Some(space) => (&request_line[..space], &request_line[space + 1..]),
        None => (request_line, &b""[..]),
    };
    let mut request = Request::new(());
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let value = line[colon + 1..].trim_ascii_start();
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if let Ok(text) = value.to_str() {
            check_header_value(text);
        }
        request.headers_mut().append(name, value);
    }
    if let Some(status) =
        data.get(..2).and_then(|b| StatusCode::from_u16(u16::from_be_bytes([b[0], b[1]])).ok())
    {
        let refusal = Refusal::new(status, "fuzz");
        assert!(!refusal.status().is_success(), "a refusal with {status} reads as acceptance");
    }
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(target)) else { return };
    *request.method_mut() = method;
    *request.uri_mut() = uri;

    match parse_connect(&request, peer()) {
        Ok(connect) => {
            assert_eq!(request.method(), Method::CONNECT);
            let uri = request.uri();
            assert!(uri.scheme().is_none() && uri.path_and_query().is_none(), "{uri} is not authority-form");
            let authority = uri.authority().expect("a CONNECT target has an authority");
            assert_eq!(authority.as_str().parse().ok(), Some(connect.target), "{uri}");
            assert_ne!(connect.target.port(), 0, "{uri}");
            assert_eq!(&connect.peer, peer());
            let first = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
            assert_eq!(connect.protocol, first(PROTOCOL_HEADER).and_then(AppProtocol::parse));
            assert_eq!(connect.forwarded_for, first(FORWARDED.as_str()).and_then(forwarded_for));
            // Whatever address the source agent writes as `Forwarded` must read back; any will do.
            assert_eq!(forwarded_for(&forwarded_value(connect.target)), Some(connect.target));
        }
        Err(status) => {
            let want = if request.method() == Method::CONNECT {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::METHOD_NOT_ALLOWED
            };
            assert_eq!(status, want, "{} {}", request.method(), request.uri());
        }
    }
});

/// What any header value gives the two readers: a `Forwarded` source writes back as a valid header
/// that reads the same, and a declared protocol names itself.
fn check_header_value(text: &str) {
    if let Some(source) = forwarded_for(text) {
        let written = forwarded_value(source);
        assert!(HeaderValue::try_from(written.as_str()).is_ok(), "{written:?} is not a header value");
        assert_eq!(forwarded_for(&written), Some(source), "{text:?} -> {written:?}");
    }
    if let Some(protocol) = AppProtocol::parse(text) {
        assert_eq!(AppProtocol::parse(protocol.as_str()), Some(protocol), "{text:?}");
    }
}
