//! URL query strings for the admin API: `application/x-www-form-urlencoded` pairs, decoded by the
//! server and encoded by the CLI.

/// Why a query string could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A `%` not followed by two hex digits.
    #[error("bad percent escape in {0:?}")]
    BadEscape(String),
    /// The decoded bytes are not UTF-8.
    #[error("query value {0:?} is not UTF-8 once decoded")]
    NotUtf8(String),
}

/// Decodes `a=1&b=x%2Fy` into pairs, in order. A key without `=` has an empty value.
pub fn parse(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Decodes one component: `+` is a space and `%XX` a byte.
pub fn decode(component: &str) -> Result<String, QueryError> {
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(b) if hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit())) => {
                        out.push(b);
                        i += 2;
                    }
                    _ => return Err(QueryError::BadEscape(component.to_owned())),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8(component.to_owned()))
}

/// Encodes one component, leaving only unreserved characters (RFC 3986) as they are.
pub fn encode(component: &str) -> String {
    let mut out = String::with_capacity(component.len());
    for b in component.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds `k1=v1&k2=v2` with both sides encoded.
pub fn build(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_awkward_values() {
        let pairs = [("pod", "default/web 1"), ("dest", "[fd00::1]:80"), ("level", "a=b,c&d+é%")];
        let query = build(&pairs);
        assert!(!query.contains('/') && !query.contains(' ') && !query.contains('['), "{query}");
        let back = parse(&query).expect("parse");
        let want: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(back, want);
    }

    #[test]
    fn decodes_forms() {
        assert_eq!(decode("a+b%2fc").expect("decode"), "a b/c");
        assert_eq!(parse("flag&x=1").expect("parse"), [("flag".into(), "".into()), ("x".into(), "1".into())]);
    }

    #[test]
    fn refuses_bad_escapes() {
        assert!(matches!(decode("50%"), Err(QueryError::BadEscape(_))));
        assert!(matches!(decode("%zz"), Err(QueryError::BadEscape(_))));
        assert!(matches!(decode("%+1"), Err(QueryError::BadEscape(_))));
        assert!(matches!(decode("%ff"), Err(QueryError::NotUtf8(_))));
    }
}
