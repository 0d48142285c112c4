//! Protocol detection on an undeclared port: the first bytes a client sends are the HTTP/2 preface,
//! an HTTP/1 request line, or something else (opaque TCP). Detection waits a bounded time, so a
//! protocol where the server speaks first only waits that long, and it never consumes what it read:
//! the bytes are handed on in a [`Rewind`](super::rewind::Rewind).

use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest request line detection waits for; a longer one is not taken for HTTP (hyper would
/// refuse it anyway).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Longest method token accepted by detection (the longest registered method is 17 bytes).
const MAX_METHOD: usize = 32;

/// What the first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else, including nothing at all before the wait ended.
    Opaque,
}

/// What `buf` says so far: decided, or not yet (`None`).
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Some(Detected::Http2) } else { None };
    }
    classify_http1(buf)
}

/// `METHOD SP TARGET SP HTTP/1.x (CR)LF`, where the method is a token and the target has no
/// whitespace or control bytes.
fn classify_http1(buf: &[u8]) -> Option<Detected> {
    let opaque = Some(Detected::Opaque);
    let method_len = buf.iter().position(|&b| b == b' ').unwrap_or(buf.len());
    if method_len > MAX_METHOD || !buf[..method_len].iter().all(|&b| is_tchar(b)) {
        return opaque;
    }
    if method_len == buf.len() {
        return None;
    }
    if method_len == 0 {
        return opaque;
    }
    let rest = &buf[method_len + 1..];
    let target_len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    if !rest[..target_len].iter().all(|&b| b > b' ' && b != 0x7f) {
        return opaque;
    }
    if target_len == rest.len() {
        return if buf.len() >= MAX_REQUEST_LINE { opaque } else { None };
    }
    if target_len == 0 {
        return opaque;
    }
    let version = &rest[target_len + 1..];
    const V: &[u8] = b"HTTP/1.";
    let n = version.len().min(V.len());
    if version[..n] != V[..n] {
        return opaque;
    }
    match version.get(V.len()..) {
        None | Some([]) => None,
        Some([d, tail @ ..]) if d.is_ascii_digit() => match tail {
            [] | [b'\r'] => None,
            [b'\n', ..] | [b'\r', b'\n', ..] => Some(Detected::Http1),
            _ => opaque,
        },
        Some(_) => opaque,
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `io` into `buf` until the bytes decide, the client closes, or `wait` passes (then
/// opaque). `wait` of `None` waits as long as the client takes (a port declared HTTP).
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    wait: Option<Duration>,
) -> io::Result<Detected> {
    let reading = async {
        loop {
            if let Some(found) = classify(buf) {
                return Ok(found);
            }
            buf.reserve(1024);
            if io.read_buf(buf).await? == 0 {
                return Ok(Detected::Opaque);
            }
        }
    };
    match wait {
        None => reading.await,
        Some(wait) => tokio::time::timeout(wait, reading).await.unwrap_or(Ok(Detected::Opaque)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_http() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Some(Detected::Http1)),
            (b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n", Some(Detected::Http1)),
            (b"GET / HTTP/1.1\n", Some(Detected::Http1)),
            (b"M-SEARCH * HTTP/1.1\r\n", Some(Detected::Http1)),
            (H2_PREFACE, Some(Detected::Http2)),
            (b"PRI * HTTP/2.0\r\n", None),
            (b"GET /", None),
            (b"GET / HTTP/1.", None),
            (b"GET / HTTP/1.1\r", None),
            (b"G", None),
        ] {
            assert_eq!(classify(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn everything_else_is_opaque() {
        for bytes in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"GET  / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET /\x00 HTTP/1.1\r\n",
            b"GET / HTTP/1.1x\r\n",
            b"PRI * HTTP/2.1\r\n",
            b"\r\n",
        ] {
            assert_eq!(classify(bytes), Some(Detected::Opaque), "{:?}", String::from_utf8_lossy(bytes));
        }
        let long = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE]].concat();
        assert_eq!(classify(&long), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_wait_and_nothing_is_lost() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let wait = Some(Duration::from_millis(20));
        assert_eq!(detect(&mut server, &mut buf, wait).await.unwrap(), Detected::Opaque);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HT").await.unwrap();
        assert_eq!(detect(&mut server, &mut buf, wait).await.unwrap(), Detected::Opaque);
        assert_eq!(&buf[..], b"GET / HT", "what was read is kept");
        tokio::io::AsyncWriteExt::write_all(&mut client, b"TP/1.1\r\n").await.unwrap();
        assert_eq!(detect(&mut server, &mut buf, wait).await.unwrap(), Detected::Http1);
    }
}
