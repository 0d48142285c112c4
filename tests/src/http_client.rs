//! HTTP clients for the L7 tests, meant to run inside a pod (usually in a forked child, see
//! [`crate::Pod::run_in_cgroup`], so the pod's connects are captured): a raw HTTP/1 connection
//! that sends exactly the bytes it is given ([`H1`]), HTTP/2 over the `h2` crate with prior
//! knowledge ([`h2_exchange`]), and raw HTTP/2 frames for what no well-behaved client sends
//! ([`h2_raw`]). Everything they return is serializable, to travel back from the child.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::http_app::H2_PREFACE;

/// How long a client waits for a connect or for the next bytes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A response as an HTTP/1 client read it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct H1Response {
    /// The status code.
    pub status: u16,
    /// The header fields in order, as sent.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl H1Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What followed a response on its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum After {
    /// The server closed (EOF or reset).
    Closed,
    /// Nothing came and the connection stayed open for the whole wait.
    Open,
    /// More bytes came (another response?).
    Extra(String),
}

/// A raw HTTP/1 client connection: it writes exactly what it is given and parses responses.
pub struct H1 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl H1 {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: Vec::new() })
    }

    /// Writes `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes `bytes` and reads one response.
    pub fn request(&mut self, bytes: &[u8]) -> std::io::Result<H1Response> {
        self.send(bytes)?;
        self.response()
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn eof() -> std::io::Error {
        std::io::Error::new(ErrorKind::UnexpectedEof, "the connection closed mid-response")
    }

    /// Reads one response (a 1xx one too): its head, then its body by its framing.
    pub fn response(&mut self) -> std::io::Result<H1Response> {
        let head_end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.fill()? == 0 {
                return Err(Self::eof());
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut response = H1Response { status, headers, body: Vec::new() };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(response);
        }
        if response.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            response.body = self.chunked()?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().map_err(|_| std::io::Error::other("bad content-length"))?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(Self::eof());
                }
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            // Close-delimited.
            while self.fill()? > 0 {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..p + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..p]).into_owned());
            }
            if self.fill()? == 0 {
                return Err(Self::eof());
            }
        }
    }

    fn chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                while !self.line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.exact(size)?);
            self.exact(2)?;
        }
    }

    /// Reads exactly `n` raw bytes (after a switch of protocols, say).
    pub fn exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(Self::eof());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Waits up to `wait` for what follows: the server closing, more bytes, or nothing.
    pub fn after(&mut self, wait: Duration) -> After {
        if !self.buf.is_empty() {
            return After::Extra(String::from_utf8_lossy(&self.buf).into_owned());
        }
        let _ = self.stream.set_read_timeout(Some(wait));
        let deadline = Instant::now() + wait;
        let result = loop {
            match self.fill() {
                Ok(0) => break After::Closed,
                Ok(_) => break After::Extra(String::from_utf8_lossy(&self.buf).into_owned()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break After::Open;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted && Instant::now() < deadline => continue,
                Err(_) => break After::Closed,
            }
        };
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        result
    }

    /// Half-closes the connection (no more requests).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// One HTTP/2 request for [`h2_exchange`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct H2Request {
    /// The method.
    pub method: String,
    /// `:authority`.
    pub authority: String,
    /// `:path` (query included).
    pub path: String,
    /// Regular header fields (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The body; none when empty.
    pub body: Vec<u8>,
    /// Trailers; none when empty.
    pub trailers: Vec<(String, String)>,
}

impl H2Request {
    /// `method path` to `authority` without headers or body.
    pub fn new(method: &str, authority: &str, path: &str) -> Self {
        Self { method: method.into(), authority: authority.into(), path: path.into(), ..Self::default() }
    }

    /// Adds a header field.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// Adds a trailer field.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.into(), value.into()));
        self
    }
}

/// An HTTP/2 response, or how its stream failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct H2Response {
    /// The status (0 when there was no response).
    pub status: u16,
    /// The header fields.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The trailers.
    pub trailers: Vec<(String, String)>,
    /// Why the stream or connection failed, if it did.
    pub error: Option<String>,
}

impl H2Response {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The first value of trailer `name`.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

/// Sends `requests` one after the other as streams of one HTTP/2 (prior knowledge) connection to
/// `addr`; an error only when the connection itself cannot be made.
pub fn h2_exchange(addr: SocketAddr, requests: &[H2Request]) -> Result<Vec<H2Response>, String> {
    h2_exchange_holding(addr, requests, || {})
}

/// [`h2_exchange`], then `hold` runs while the connection is still open (it closes after).
pub fn h2_exchange_holding(
    addr: SocketAddr,
    requests: &[H2Request],
    hold: impl FnOnce(),
) -> Result<Vec<H2Response>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let tcp = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (client, connection) =
            h2::client::handshake(tcp).await.map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut out = Vec::new();
        for request in requests {
            let result = tokio::time::timeout(IO_TIMEOUT, one_h2(client.clone(), request)).await;
            out.push(match result {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => H2Response { error: Some(e), ..H2Response::default() },
                Err(_) => H2Response { error: Some("timed out".into()), ..H2Response::default() },
            });
        }
        hold();
        Ok(out)
    })
}

async fn one_h2(client: h2::client::SendRequest<Bytes>, r: &H2Request) -> Result<H2Response, String> {
    let describe = |e: h2::Error| match e.reason() {
        Some(reason) => format!("{reason:?}: {e}"),
        None => e.to_string(),
    };
    let mut client = client.ready().await.map_err(describe)?;
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(r.authority.as_str())
        .path_and_query(r.path.as_str())
        .build()
        .map_err(|e| format!("bad URI: {e}"))?;
    let mut builder = http::Request::builder().method(r.method.as_str()).uri(uri);
    for (k, v) in &r.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let request = builder.body(()).map_err(|e| format!("bad request: {e}"))?;
    let end = r.body.is_empty() && r.trailers.is_empty();
    let (response, mut stream) = client.send_request(request, end).map_err(describe)?;
    if !r.body.is_empty() {
        stream.send_data(Bytes::from(r.body.clone()), r.trailers.is_empty()).map_err(describe)?;
    }
    if !r.trailers.is_empty() {
        let mut map = http::HeaderMap::new();
        for (k, v) in &r.trailers {
            let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
            map.append(name, v.parse().map_err(|_| "bad trailer value".to_owned())?);
        }
        stream.send_trailers(map).map_err(describe)?;
    }
    let response = response.await.map_err(describe)?;
    let mut out = H2Response {
        status: response.status().as_u16(),
        headers: pairs(response.headers()),
        ..H2Response::default()
    };
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                out.body.extend_from_slice(&chunk);
            }
            Err(e) => {
                out.error = Some(describe(e));
                return Ok(out);
            }
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => out.trailers = pairs(&trailers),
        Ok(None) => {}
        Err(e) => out.error = Some(describe(e)),
    }
    Ok(out)
}

// ---- Raw HTTP/2 frames.

/// Frame types.
pub const DATA: u8 = 0x0;
/// HEADERS.
pub const HEADERS: u8 = 0x1;
/// RST_STREAM.
pub const RST_STREAM: u8 = 0x3;
/// SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// END_STREAM flag (DATA, HEADERS).
pub const END_STREAM: u8 = 0x1;
/// END_HEADERS flag (HEADERS).
pub const END_HEADERS: u8 = 0x4;
/// ACK flag (SETTINGS, PING).
pub const ACK: u8 = 0x1;

/// One frame as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawFrame {
    /// Its type.
    pub kind: u8,
    /// Its flags.
    pub flags: u8,
    /// Its stream.
    pub stream: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK header block of literal fields without indexing, never Huffman-coded: any name, any
/// value, in the given order (so malformed blocks can be written too). Names and values must be
/// shorter than 127 bytes.
pub fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127, "hpack_literals keeps to one-byte lengths");
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Writes the preface, an empty SETTINGS and `frames` to `addr`, acknowledges the server's
/// SETTINGS, and reads frames until stream 1 ends (END_STREAM or RST_STREAM), a GOAWAY comes, the
/// server closes, or [`IO_TIMEOUT`] passes; returns the frames read (SETTINGS, PING and
/// WINDOW_UPDATE left out).
pub fn h2_raw(addr: SocketAddr, frames: &[u8]) -> Result<Vec<RawFrame>, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut out = H2_PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend_from_slice(frames);
    s.write_all(&out).map_err(|e| format!("writing: {e}"))?;
    let mut seen = Vec::new();
    let mut buf = Vec::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        while buf.len() >= 9 {
            let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let f = RawFrame {
                kind: buf[3],
                flags: buf[4],
                stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                payload: buf[9..9 + len].to_vec(),
            };
            buf.drain(..9 + len);
            match f.kind {
                SETTINGS => {
                    if f.flags & ACK == 0 {
                        let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[]));
                    }
                }
                // PING, WINDOW_UPDATE.
                0x6 | 0x8 => {}
                _ => {
                    let ends = f.kind == GOAWAY
                        || (f.stream == 1 && (f.kind == RST_STREAM || f.flags & END_STREAM != 0));
                    seen.push(f);
                    if ends {
                        return Ok(seen);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Ok(seen);
        }
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Ok(seen),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The `:status` of a response header block as HTTP/2 servers encode it: an indexed field of
/// HPACK's static table, or a literal with the `:status` name index and a (possibly Huffman-coded)
/// value of three digits. `None` for anything else.
pub fn hpack_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    // Indexed fields 8..=14 of the static table.
    let indexed = [200, 204, 206, 304, 400, 404, 500];
    if first & 0x80 != 0 {
        return indexed.get(usize::from(first & 0x7f).checked_sub(8)?).copied();
    }
    // Literal with incremental indexing (01xxxxxx), without indexing (0000xxxx) or never indexed
    // (0001xxxx), its name one of the :status entries.
    let name_index = if first & 0xc0 == 0x40 { first & 0x3f } else { first & 0x0f };
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let len_byte = *block.get(1)?;
    let len = usize::from(len_byte & 0x7f);
    let value = block.get(2..2 + len)?;
    let text = if len_byte & 0x80 == 0 {
        String::from_utf8_lossy(value).into_owned()
    } else {
        huffman_digits(value)?
    };
    text.parse().ok()
}

/// Decodes a Huffman-coded string of digits (RFC 7541, Appendix B: '0'-'2' have 5-bit codes,
/// '3'-'9' 6-bit ones); `None` at any other code.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).collect();
    let value = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |acc, b| (acc << 1) | b);
    let mut out = String::new();
    let mut i = 0;
    while i + 5 <= bits.len() {
        let five = value(i, 5);
        if five <= 2 {
            out.push(char::from(b'0' + five));
            i += 5;
            continue;
        }
        if i + 6 <= bits.len() {
            let six = value(i, 6);
            if (0x19..=0x1f).contains(&six) {
                out.push(char::from(b'3' + (six - 0x19)));
                i += 6;
                continue;
            }
        }
        break;
    }
    // What is left must be padding: fewer than 8 one-bits.
    let rest = &bits[i..];
    (rest.len() < 8 && rest.iter().all(|&b| b == 1)).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decode_from_index_literal_and_huffman() {
        assert_eq!(hpack_status(&[0x88]), Some(200));
        assert_eq!(hpack_status(&[0x8c]), Some(400));
        assert_eq!(hpack_status(&[0x48, 3, b'4', b'0', b'3']), Some(403));
        // "503" Huffman-coded: 011011 00000 011001, padded with ones.
        let bits = "01101100000011001";
        let padded = format!("{bits:1<24}");
        let bytes: Vec<u8> =
            (0..3).map(|i| u8::from_str_radix(&padded[i * 8..i * 8 + 8], 2).unwrap()).collect();
        assert_eq!(hpack_status(&[0x48, 0x80 | 3, bytes[0], bytes[1], bytes[2]]), Some(503));
        assert_eq!(hpack_status(&[0x40]), None);
    }

    #[test]
    fn frames_and_literals_have_their_wire_shape() {
        assert_eq!(frame(HEADERS, END_HEADERS, 1, b"ab"), [0, 0, 2, 1, 4, 0, 0, 0, 1, b'a', b'b']);
        assert_eq!(hpack_literals(&[(":path", "/")]), [0, 5, b':', b'p', b'a', b't', b'h', 1, b'/']);
    }
}
