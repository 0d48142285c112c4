//! Request correlation headers: `x-request-id` (Envoy's) is added when absent, and a W3C
//! `traceparent` passes unchanged or, when absent and configured, is started here so the app's
//! own spans have a parent.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};

/// Envoy's request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// W3C Trace Context's header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Adds what is missing: a request id always, a `traceparent` when `start_trace`. Returns the
/// request id the request carries (for the access log).
pub fn ensure(headers: &mut HeaderMap, start_trace: bool) -> HeaderValue {
    let id = match headers.get(&REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = hex_value(&uuid_v4());
            headers.insert(REQUEST_ID, id.clone());
            id
        }
    };
    if start_trace && !headers.contains_key(&TRACEPARENT) {
        headers.insert(TRACEPARENT, traceparent());
    }
    id
}

/// A random (version 4) UUID in its usual text form.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// `00-TRACE_ID-PARENT_ID-00`: a new trace, not sampled, since this proxy records no spans itself.
fn traceparent() -> HeaderValue {
    // All-zero ids are invalid in W3C Trace Context; a random one is zero with negligible odds, but
    // the rule is cheap to keep.
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    hex_value(&format!("00-{trace:032x}-{span:016x}-00"))
}

fn hex_value(text: &str) -> HeaderValue {
    // Only hex digits and dashes: always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ids_are_added_and_present_ones_kept() {
        let mut headers = HeaderMap::new();
        let id = ensure(&mut headers, true);
        let text = id.to_str().unwrap();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "4", "version 4: {text}");
        let parent = headers[&TRACEPARENT].to_str().unwrap().to_owned();
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 32, 16, 2], "{parent}");

        let mut given = HeaderMap::new();
        given.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        given.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(ensure(&mut given, true), "abc");
        assert_eq!(given[&TRACEPARENT], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");

        let mut off = HeaderMap::new();
        ensure(&mut off, false);
        assert!(!off.contains_key(&TRACEPARENT));
    }
}
