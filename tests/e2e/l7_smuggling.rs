//! Request smuggling and malformed HTTP against the destination agent's HTTP layer, end to end:
//! raw bytes from a mesh client go through its agent and the mutual-TLS tunnel to the server's
//! agent, which must refuse what is ambiguous and forward only normalized messages to the app. The
//! app is the capturing server of `ferry_tests::http_app`, which records the exact bytes of every
//! HTTP/1 request (and every HTTP/2 request hyper hands it), so each case asserts both what the
//! client got and exactly what reached the app. Table-driven: every case names itself on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ferry_tests::http_app::{CAPTURED_BODY, RawRequest};
use ferry_tests::http_client::{
    After, DATA, END_HEADERS, END_STREAM, GOAWAY, H1, H1Response, HEADERS, RST_STREAM, RawFrame, frame,
    h2_raw, hpack_literals, hpack_status,
};
use ferry_tests::l7_mesh::{At, CAPTURE_PORT, L7Mesh};
use ferry_tests::prometheus::{METRICS_ADDR, http_get};
use serde_json::Value;

/// How long a client waits for the agent to close a connection it must close.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// What every generated header value is replaced with in [`canonical`].
const GENERATED: &str = "<generated>";

// ---- HTTP/1.

/// How the agent refuses an HTTP/1 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// hyper's parser refuses the head: 400, the service never runs (no request record), and the
    /// connection closes.
    Parser,
    /// The agent's hardening refuses it after parsing: 400 "bad request", recorded with this
    /// reason. A refusal for the framing closes the connection; any other leaves it usable, which
    /// a follow-up request on it shows.
    Hardening(&'static str),
    /// The head is fine and goes on to the app, the body is not: the exchange is broken off, the
    /// client gets 400 "bad request" with response flag DPE (its protocol error, not the app's),
    /// the connection closes, and the app never reads a complete request.
    Body,
}

impl Refusal {
    fn closes(self) -> bool {
        match self {
            Refusal::Parser | Refusal::Body => true,
            Refusal::Hardening(reason) => {
                matches!(
                    reason,
                    "content_length_and_transfer_encoding" | "duplicate_content_length" | "transfer_encoding"
                )
            }
        }
    }
}

/// What a case must lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// 400, and nothing at all reached the app.
    Refused(Refusal),
    /// The app's answer came back (200), the app read exactly one request whose canonical form
    /// (see [`canonical`]) is this, and the connection closes if `closes`, else stays open.
    Forwarded { canonical: &'static str, closes: bool },
}

impl Want {
    /// What the client does after the response.
    fn then(self, name: &str) -> Then {
        match self {
            Want::Refused(how) if !how.closes() => Then::FollowUp(follow_up(name)),
            Want::Refused(_) | Want::Forwarded { closes: true, .. } => Then::AwaitClose,
            Want::Forwarded { closes: false, .. } => Then::StaysOpen,
        }
    }
}

/// What the client does after a case's response.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Then {
    /// Waits (up to [`CLOSE_WAIT`]) for the agent to close the connection.
    AwaitClose,
    /// Watches briefly: the connection must neither close nor carry anything more.
    StaysOpen,
    /// Sends this request on the same connection.
    FollowUp(Vec<u8>),
}

/// The follow-up request of case `name`: a plain GET of `/after/NAME`.
fn follow_up(name: &str) -> Vec<u8> {
    format!("GET /after/{name} HTTP/1.1\r\nHost: echo\r\n\r\n").into_bytes()
}

struct H1Case {
    name: &'static str,
    bytes: Vec<u8>,
    want: Want,
}

fn case(name: &'static str, bytes: &str, want: Want) -> H1Case {
    H1Case { name, bytes: bytes.as_bytes().to_vec(), want }
}

fn refused_by_parser() -> Want {
    Want::Refused(Refusal::Parser)
}

fn refused(reason: &'static str) -> Want {
    Want::Refused(Refusal::Hardening(reason))
}

fn forwarded(canonical: &'static str) -> Want {
    Want::Forwarded { canonical, closes: false }
}

/// Every HTTP/1 case. Each request's target starts with `/s/NAME` (or names it), so what the app
/// and the access log saw is attributed to its case.
fn h1_cases() -> Vec<H1Case> {
    vec![
        // Two framings. hyper's parser resolves them as RFC 9112 allows: chunked frames the body,
        // Content-Length is dropped (the app reads one framing) and the connection closes after
        // the response, so nothing after the body is ever read as a request.
        case(
            "cl_and_te",
            "POST /s/cl_and_te HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Want::Forwarded {
                canonical: "POST /s/cl_and_te HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                            transfer-encoding: chunked\nx-request-id: <generated>\n\n(chunked) ",
                closes: true,
            },
        ),
        // CL.TE: by Content-Length the body is "0\r\n\r\nG"; by chunked it ends early and the
        // rest is a second request, which must never reach the app.
        case(
            "cl_te_hides_a_request",
            "POST /s/cl_te_hides_a_request HTTP/1.1\r\nHost: echo\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /s/cl_te_hidden HTTP/1.1\r\nHost: echo\r\n\r\n",
            Want::Forwarded {
                canonical: "POST /s/cl_te_hides_a_request HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                            transfer-encoding: chunked\nx-request-id: <generated>\n\n(chunked) ",
                closes: true,
            },
        ),
        // TE.CL: the chunked body ends early; by Content-Length it holds the next request.
        case(
            "te_cl_hides_a_request",
            "POST /s/te_cl_hides_a_request HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\nContent-Length: 44\r\n\r\n0\r\n\r\nGET /s/te_cl_hidden HTTP/1.1\r\nHost: echo\r\n\r\n",
            Want::Forwarded {
                canonical: "POST /s/te_cl_hides_a_request HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                            transfer-encoding: chunked\nx-request-id: <generated>\n\n(chunked) ",
                closes: true,
            },
        ),
        // Content-Length. Repeated equal values are merged by hyper's parser into one field (RFC
        // 9110, section 8.6 allows it), so the app reads a single Content-Length.
        case(
            "duplicate_content_length_same_value",
            "POST /s/duplicate_content_length_same_value HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            forwarded(
                "POST /s/duplicate_content_length_same_value HTTP/1.1\ncontent-length: 3\nhost: echo\n\
                 traceparent: <generated>\nx-request-id: <generated>\n\nabc",
            ),
        ),
        case(
            "duplicate_content_length_differing",
            "POST /s/duplicate_content_length_differing HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            refused_by_parser(),
        ),
        case(
            "content_length_list",
            "POST /s/content_length_list HTTP/1.1\r\nHost: echo\r\nContent-Length: 3, 3\r\n\r\nabc",
            refused_by_parser(),
        ),
        case(
            "content_length_with_plus_sign",
            "POST /s/content_length_with_plus_sign HTTP/1.1\r\nHost: echo\r\nContent-Length: +3\r\n\r\nabc",
            refused_by_parser(),
        ),
        case(
            "content_length_hex",
            "POST /s/content_length_hex HTTP/1.1\r\nHost: echo\r\nContent-Length: 0x3\r\n\r\nabc",
            refused_by_parser(),
        ),
        case(
            "content_length_negative",
            "POST /s/content_length_negative HTTP/1.1\r\nHost: echo\r\nContent-Length: -3\r\n\r\nabc",
            refused_by_parser(),
        ),
        case(
            "content_length_not_a_number",
            "POST /s/content_length_not_a_number HTTP/1.1\r\nHost: echo\r\nContent-Length: three\r\n\r\nabc",
            refused_by_parser(),
        ),
        // Transfer-Encoding.
        case(
            "te_chunked_identity",
            "POST /s/te_chunked_identity HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "te_xchunked",
            "POST /s/te_xchunked HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "te_identity_chunked",
            "POST /s/te_identity_chunked HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused("transfer_encoding"),
        ),
        case(
            "te_in_two_fields",
            "POST /s/te_in_two_fields HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused("transfer_encoding"),
        ),
        case(
            "te_on_http_1_0",
            "POST /s/te_on_http_1_0 HTTP/1.0\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "te_uppercase_is_chunked",
            "POST /s/te_uppercase_is_chunked HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            forwarded(
                "POST /s/te_uppercase_is_chunked HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                 transfer-encoding: chunked\nx-request-id: <generated>\n\n(chunked) abc",
            ),
        ),
        // Header syntax.
        case(
            "obs_fold",
            "GET /s/obs_fold HTTP/1.1\r\nHost: echo\r\nX-Folded: a\r\n b\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "obs_fold_of_transfer_encoding",
            "POST /s/obs_fold_of_transfer_encoding HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding:\r\n chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "space_before_colon",
            "POST /s/space_before_colon HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "nul_in_header_value",
            "GET /s/nul_in_header_value HTTP/1.1\r\nHost: echo\r\nX-Nul: a\0b\r\n\r\n",
            refused_by_parser(),
        ),
        case(
            "bare_cr_in_header_value",
            "GET /s/bare_cr_in_header_value HTTP/1.1\r\nHost: echo\r\nX-Cr: a\rb\r\n\r\n",
            refused_by_parser(),
        ),
        // Bare LF line endings are read, and never forwarded: the app gets CRLF only.
        case(
            "bare_lf_line_endings",
            "GET /s/bare_lf_line_endings HTTP/1.1\nHost: echo\nX-Lf: 1\n\n",
            forwarded(
                "GET /s/bare_lf_line_endings HTTP/1.1\nhost: echo\ntraceparent: <generated>\nx-lf: 1\n\
                 x-request-id: <generated>\n\n",
            ),
        ),
        // Host and target.
        case("missing_host", "GET /s/missing_host HTTP/1.1\r\n\r\n", refused("missing_host")),
        case(
            "duplicate_host",
            "GET /s/duplicate_host HTTP/1.1\r\nHost: echo\r\nHost: evil.example\r\n\r\n",
            refused("duplicate_host"),
        ),
        case(
            "duplicate_host_same_value",
            "GET /s/duplicate_host_same_value HTTP/1.1\r\nHost: echo\r\nHost: echo\r\n\r\n",
            refused("duplicate_host"),
        ),
        case(
            "absolute_form_host_mismatch",
            "GET http://evil.example/s/absolute_form_host_mismatch HTTP/1.1\r\nHost: echo\r\n\r\n",
            refused("host_mismatch"),
        ),
        case(
            "authority_form_on_get",
            "GET echo:9090 HTTP/1.1\r\nHost: echo:9090\r\nX-Case: authority_form_on_get\r\n\r\n",
            refused("invalid_target"),
        ),
        case(
            "encoded_nul_in_path",
            "GET /s/encoded_nul_in_path/%00 HTTP/1.1\r\nHost: echo\r\n\r\n",
            refused("invalid_path"),
        ),
        // Hop-by-hop headers never reach the app; Connection: close ends the client's connection.
        case(
            "connection_names_a_header",
            "GET /s/connection_names_a_header HTTP/1.1\r\nHost: echo\r\nConnection: close, x-foo\r\nX-Foo: secret\r\nX-Bar: kept\r\n\r\n",
            Want::Forwarded {
                canonical: "GET /s/connection_names_a_header HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                            x-bar: kept\nx-request-id: <generated>\n\n",
                closes: true,
            },
        ),
        case(
            "standard_hop_by_hop_headers",
            "GET /s/standard_hop_by_hop_headers HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers, gzip\r\n\r\n",
            forwarded(
                "GET /s/standard_hop_by_hop_headers HTTP/1.1\nhost: echo\nte: trailers\n\
                 traceparent: <generated>\nx-request-id: <generated>\n\n",
            ),
        ),
        // An Upgrade to h2c would carry later requests past per-request policy: the app answers
        // in HTTP/1.1 and never sees the upgrade.
        case(
            "h2c_upgrade_is_stripped",
            "GET /s/h2c_upgrade_is_stripped HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            forwarded(
                "GET /s/h2c_upgrade_is_stripped HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                 x-request-id: <generated>\n\n",
            ),
        ),
        // Chunk sizes hyper cannot read: the head was already on its way to the app.
        case(
            "bad_chunk_size",
            "POST /s/bad_chunk_size HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            Want::Refused(Refusal::Body),
        ),
        case(
            "chunk_size_overflow",
            "POST /s/chunk_size_overflow HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
            Want::Refused(Refusal::Body),
        ),
        // A well-formed body in both framings, for contrast.
        case(
            "plain_content_length_body",
            "POST /s/plain_content_length_body HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello",
            forwarded(
                "POST /s/plain_content_length_body HTTP/1.1\ncontent-length: 5\nhost: echo\n\
                 traceparent: <generated>\nx-request-id: <generated>\n\nhello",
            ),
        ),
        case(
            "chunk_extension",
            "POST /s/chunk_extension HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n",
            forwarded(
                "POST /s/chunk_extension HTTP/1.1\nhost: echo\ntraceparent: <generated>\n\
                 transfer-encoding: chunked\nx-request-id: <generated>\n\n(chunked) hello",
            ),
        ),
    ]
}

/// A request as a stable text: the request line, the header lines sorted (generated values, of
/// `x-request-id` and `traceparent`, replaced by [`GENERATED`]), an empty line, then the body
/// (de-chunked and marked `(chunked) ` when it came chunked). Lines end in `\n` here; the bytes
/// themselves are checked for CRLF separately.
fn canonical(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut headers: Vec<String> = lines
        .map(|l| match l.split_once(':') {
            Some((k, _))
                if k.eq_ignore_ascii_case("x-request-id") || k.eq_ignore_ascii_case("traceparent") =>
            {
                format!("{}: {GENERATED}", k.to_ascii_lowercase())
            }
            _ => l.to_owned(),
        })
        .collect();
    headers.sort();
    let chunked = headers.iter().any(|h| h.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked { format!("(chunked) {}", dechunk(body)) } else { body.to_owned() };
    format!("{request_line}\n{}\n\n{body}", headers.join("\n"))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest.get(size + 2..).unwrap_or_default();
    }
    out
}

/// Whether every LF in `bytes` ends a CRLF.
fn crlf_only(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| b != b'\n' || (i > 0 && bytes[i - 1] == b'\r'))
}

/// What the client saw of one case: the response (or why none came), what followed it, and the
/// follow-up's response when there was one.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct H1Seen {
    response: Result<H1Response, String>,
    after: Option<After>,
    follow_up: Option<Result<H1Response, String>>,
}

/// The raw requests the app read whose request line names `marker`.
fn raw_for<'a>(raw: &'a [RawRequest], marker: &str) -> Vec<&'a RawRequest> {
    raw.iter().filter(|r| r.request_line().contains(marker)).collect()
}

/// The access-log lines of case `name`: those whose path names it, or, for a target without a
/// path (authority-form), those refused for `reason` (unique in the corpus).
fn lines_for<'a>(lines: &'a [Value], name: &str, reason: Option<&str>) -> Vec<&'a Value> {
    let marker = format!("/s/{name}");
    lines
        .iter()
        .filter(|l| {
            l["path"].as_str().is_some_and(|p| p == marker || p.starts_with(&format!("{marker}/")))
                || (l["path"] == "" && reason.is_some_and(|r| l["rejected"] == r))
        })
        .collect()
}

/// Checks one HTTP/1 case; the complaints, empty when it passed.
fn check_h1(case: &H1Case, seen: &H1Seen, raw: &[RawRequest], lines: &[Value]) -> Vec<String> {
    let mut bad = Vec::new();
    let response = match &seen.response {
        Ok(r) => r,
        Err(e) => return vec![format!("no response: {e}")],
    };
    let at_app = raw_for(raw, &format!("/s/{} ", case.name));
    // The hidden request of the smuggling cases is named after the case too.
    let hidden = format!("/s/{}", case.name.replace("hides_a_request", "hidden"));
    let hidden_at_app =
        if case.name.contains("hides_a_request") { raw_for(raw, &hidden) } else { Vec::new() };
    if !hidden_at_app.is_empty() {
        bad.push(format!("a hidden request reached the app: {hidden_at_app:?}"));
    }
    let follow_ups = raw_for(raw, &format!("/after/{} ", case.name));
    match case.want {
        Want::Refused(how) => {
            if response.status != 400 {
                bad.push(format!("status {} (want 400): {response:?}", response.status));
            }
            if !at_app.is_empty() {
                bad.push(format!("the app must read nothing, it read {at_app:?}"));
            }
            if how.closes() {
                if seen.after != Some(After::Closed) {
                    bad.push(format!("the connection must close after the refusal, got {:?}", seen.after));
                }
            } else {
                // The connection stays usable: the follow-up got the app's answer.
                let ok =
                    matches!(&seen.follow_up, Some(Ok(r)) if r.status == 200 && r.text() == CAPTURED_BODY);
                if !ok || follow_ups.len() != 1 {
                    bad.push(format!(
                        "the connection must stay usable: follow-up {:?}, the app read {follow_ups:?}",
                        seen.follow_up
                    ));
                }
            }
            let reason = match how {
                Refusal::Hardening(reason) => Some(reason),
                Refusal::Parser | Refusal::Body => None,
            };
            let logged = lines_for(lines, case.name, reason);
            match how {
                Refusal::Parser => {
                    if !logged.is_empty() {
                        bad.push(format!("hyper's parser refuses it before any request record: {logged:?}"));
                    }
                }
                Refusal::Body => {
                    let ok = logged.len() == 1
                        && logged[0]["response_flags"] == "DPE"
                        && logged[0]["status"] == 400;
                    if !ok {
                        bad.push(format!(
                            "want one access-log line with status 400 and flag DPE, got {logged:?}"
                        ));
                    }
                    if response.text() != "bad request" {
                        bad.push(format!("the agent's 400 says \"bad request\": {response:?}"));
                    }
                }
                Refusal::Hardening(reason) => {
                    let ok =
                        logged.len() == 1 && logged[0]["rejected"] == reason && logged[0]["status"] == 400;
                    if !ok {
                        bad.push(format!("want one access-log line rejected={reason:?}, got {logged:?}"));
                    }
                    if response.text() != "bad request" {
                        bad.push(format!("the agent's 400 says \"bad request\": {response:?}"));
                    }
                }
            }
        }
        Want::Forwarded { canonical: want, closes } => {
            if response.status != 200 || response.text() != CAPTURED_BODY {
                bad.push(format!("want the app's 200 {CAPTURED_BODY:?}, got {response:?}"));
            }
            match at_app.as_slice() {
                [one] => {
                    let got = canonical(&one.bytes);
                    if got != want {
                        bad.push(format!("the app read\n{got}\nwant\n{want}"));
                    }
                    if !crlf_only(&one.bytes) {
                        bad.push(format!(
                            "a bare LF reached the app: {:?}",
                            String::from_utf8_lossy(&one.bytes)
                        ));
                    }
                }
                more => bad.push(format!("want exactly one request at the app, got {more:?}")),
            }
            let want_after = if closes { After::Closed } else { After::Open };
            if seen.after.as_ref() != Some(&want_after) {
                bad.push(format!("after the response want {want_after:?}, got {:?}", seen.after));
            }
            let logged = lines_for(lines, case.name, None);
            if logged.len() != 1 || logged[0]["status"] != 200 || !logged[0]["rejected"].is_null() {
                bad.push(format!("want one access-log line with status 200, got {logged:?}"));
            }
        }
    }
    bad
}

/// Runs every case from the mesh client, each on its own connection, in one forked child.
fn run_h1_cases(t: &L7Mesh, cases: &[H1Case], to: SocketAddr) -> Vec<H1Seen> {
    let inputs: Vec<(Vec<u8>, Then)> = cases.iter().map(|c| (c.bytes.clone(), c.want.then(c.name))).collect();
    t.run(&t.client, move || {
        inputs
            .iter()
            .map(|(bytes, then)| {
                let mut conn = match H1::connect(to) {
                    Ok(c) => c,
                    Err(e) => {
                        return H1Seen {
                            response: Err(format!("connecting: {e}")),
                            after: None,
                            follow_up: None,
                        };
                    }
                };
                let response = conn.request(bytes).map_err(|e| e.to_string());
                let (after, follow_up) = match then {
                    Then::AwaitClose => (Some(conn.after(CLOSE_WAIT)), None),
                    Then::StaysOpen => (Some(conn.after(Duration::from_millis(500))), None),
                    Then::FollowUp(next) => (None, Some(conn.request(next).map_err(|e| e.to_string()))),
                };
                H1Seen { response, after, follow_up }
            })
            .collect()
    })
}

#[test]
fn http1_smuggling_corpus() {
    let t = L7Mesh::start("smug1", At::Remote, &[]).unwrap();
    let cases = h1_cases();
    let names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    assert!(cases.len() >= 20, "a corpus of at least 20 cases: {names:?}");
    let seen = run_h1_cases(&t, &cases, t.addr(CAPTURE_PORT));
    assert_eq!(seen.len(), cases.len());

    // Every forwarded case and every hardening refusal leaves its record; wait for them all.
    let recorded = cases.iter().filter(|c| !matches!(c.want, Want::Refused(Refusal::Parser))).count();
    let lines = t.wait_request_lines(recorded, |l| {
        l["path"].as_str().is_some_and(|p| p.starts_with("/s/") || p.is_empty())
    });
    let raw = t.capture.raw_requests();
    let mut failures = BTreeMap::new();
    for (case, seen) in cases.iter().zip(&seen) {
        let bad = check_h1(case, seen, &raw, &lines);
        if !bad.is_empty() {
            failures.insert(case.name, bad);
        }
    }
    // Nothing reached the app but the forwarded cases' requests and the follow-ups.
    let forwarded = cases
        .iter()
        .filter(|c| matches!(c.want, Want::Forwarded { .. } | Want::Refused(Refusal::Hardening(_))))
        .filter(|c| !matches!(c.want, Want::Refused(how) if how.closes()))
        .count();
    assert!(
        failures.is_empty(),
        "{} of {} HTTP/1 cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures
            .iter()
            .map(|(n, b)| format!("- {n}:\n    {}", b.join("\n    ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(raw.len(), forwarded, "exactly the forwarded cases reached the app: {raw:#?}");

    // The refusals are counted by reason.
    let (_, body) = http_get(t.dest().1.netns_path(), METRICS_ADDR, "/metrics").unwrap();
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &cases {
        if let Want::Refused(Refusal::Hardening(reason)) = c.want {
            *reasons.entry(reason).or_default() += 1;
        }
    }
    for (reason, n) in reasons {
        let series = body
            .lines()
            .find(|l| {
                l.starts_with("ferry_http_rejected_requests_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no rejection series for {reason}:\n{body}"));
        assert!(
            series.contains("reporter=\"destination\"") && series.contains("destination_workload=\"server\""),
            "{series}"
        );
        assert_eq!(series.rsplit(' ').next(), Some(n.to_string().as_str()), "{series}");
    }
}

// ---- HTTP/2.

/// HTTP/2's PROTOCOL_ERROR.
const PROTOCOL_ERROR: u32 = 0x1;

/// What the client got for stream 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Out {
    /// A response with this status.
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
}

/// What must reach the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtApp {
    /// No request at all.
    Nothing,
    /// No complete request: the head may have been forwarded before the body turned out bad,
    /// but then its stream was reset with no body byte delivered.
    NoCompleteRequest,
    /// One complete request.
    One,
}

struct H2Case {
    name: &'static str,
    frames: Vec<u8>,
    want: H2Out,
    at_app: AtApp,
}

/// The usual pseudo-headers of a GET to the case's own path.
fn base(name: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".into()),
        (":scheme", "http".into()),
        (":authority", "echo".into()),
        (":path", format!("/h2/{name}")),
    ]
}

/// A HEADERS frame on stream 1 with `fields`, ending the stream unless `body` follows in DATA.
fn h2_request(fields: &[(&str, String)], body: Option<&[u8]>) -> Vec<u8> {
    let refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let block = hpack_literals(&refs);
    let flags = END_HEADERS | if body.is_none() { END_STREAM } else { 0 };
    let mut out = frame(HEADERS, flags, 1, &block);
    if let Some(body) = body {
        out.extend(frame(DATA, END_STREAM, 1, body));
    }
    out
}

fn h2_case(
    name: &'static str,
    edit: impl FnOnce(&mut Vec<(&'static str, String)>),
    body: Option<&[u8]>,
    want: H2Out,
    at_app: AtApp,
) -> H2Case {
    let mut fields = base(name);
    edit(&mut fields);
    H2Case { name, frames: h2_request(&fields, body), want, at_app }
}

fn h2_cases() -> Vec<H2Case> {
    use AtApp::*;
    use H2Out::*;
    let reset = Reset(PROTOCOL_ERROR);
    let remove =
        |name: &'static str| move |f: &mut Vec<(&'static str, String)>| f.retain(|(k, _)| *k != name);
    let add = |name: &'static str, value: &'static str| {
        move |f: &mut Vec<(&'static str, String)>| f.push((name, value.into()))
    };
    let post = |f: &mut Vec<(&'static str, String)>| f[0].1 = "POST".into();
    vec![
        h2_case("well_formed", |_| {}, None, Status(200), One),
        // The h2 crate treats an upper-case name (which HPACK cannot carry in a valid block) and an
        // unknown pseudo-header as errors of the whole connection.
        h2_case("uppercase_header_name", add("X-Upper", "1"), None, GoAway(PROTOCOL_ERROR), Nothing),
        h2_case("connection_header", add("connection", "keep-alive"), None, reset, Nothing),
        h2_case("transfer_encoding_header", add("transfer-encoding", "chunked"), None, reset, Nothing),
        h2_case("te_other_than_trailers", add("te", "gzip"), None, reset, Nothing),
        h2_case("missing_method", remove(":method"), None, reset, Nothing),
        h2_case("missing_scheme", remove(":scheme"), None, reset, Nothing),
        h2_case("missing_path", |f| f.retain(|(k, _)| *k != ":path"), None, reset, Nothing),
        h2_case("empty_path", |f| f[3].1 = String::new(), None, reset, Nothing),
        h2_case(
            "duplicate_path",
            |f| f.push((":path", "/h2/duplicate_path/again".into())),
            None,
            reset,
            Nothing,
        ),
        h2_case(
            "pseudo_header_after_regular",
            |f| {
                let path = f.pop().expect("the :path");
                f.push(("x-early", "1".into()));
                f.push(path);
            },
            None,
            reset,
            Nothing,
        ),
        h2_case("unknown_pseudo_header", add(":foo", "bar"), None, GoAway(PROTOCOL_ERROR), Nothing),
        h2_case("response_pseudo_header", add(":status", "200"), None, reset, Nothing),
        h2_case(
            "content_length_longer_than_data",
            |f| {
                post(f);
                f.push(("content-length", "10".into()));
            },
            Some(b"abc"),
            reset,
            NoCompleteRequest,
        ),
        h2_case(
            "content_length_shorter_than_data",
            |f| {
                post(f);
                f.push(("content-length", "3".into()));
            },
            Some(b"abcdefghij"),
            reset,
            NoCompleteRequest,
        ),
        h2_case(
            "duplicate_content_length",
            |f| {
                post(f);
                f.push(("content-length", "3".into()));
                f.push(("content-length", "3".into()));
            },
            Some(b"abc"),
            Status(400),
            Nothing,
        ),
        h2_case("authority_and_host_differ", add("host", "evil.example"), None, Status(400), Nothing),
    ]
}

/// What the frames say about stream 1.
fn h2_outcome(frames: &[RawFrame]) -> Option<H2Out> {
    let code = |p: &[u8], at: usize| p.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    frames.iter().find_map(|f| match f.kind {
        HEADERS if f.stream == 1 => hpack_status(&f.payload).map(H2Out::Status),
        RST_STREAM if f.stream == 1 => code(&f.payload, 0).map(H2Out::Reset),
        GOAWAY => code(&f.payload, 4).map(H2Out::GoAway),
        _ => None,
    })
}

#[test]
fn http2_pseudo_header_and_content_length_errors() {
    let t = L7Mesh::start("smug2", At::Remote, &[]).unwrap();
    let cases = h2_cases();
    let to = t.addr(CAPTURE_PORT);
    let inputs: Vec<Vec<u8>> = cases.iter().map(|c| c.frames.clone()).collect();
    let seen: Vec<Result<Vec<RawFrame>, String>> =
        t.run(&t.client, move || inputs.iter().map(|frames| h2_raw(to, frames)).collect());

    // Let any stream the agent did forward settle at the app before counting: the well-formed
    // case's access-log line comes after its response, so wait for it.
    let lines = t.wait_request_lines(1, |l| l["path"] == "/h2/well_formed");
    assert_eq!(lines.len(), 1, "{:?}", t.request_lines());
    let received = t.capture.requests();
    let mut failures = BTreeMap::new();
    for (case, seen) in cases.iter().zip(&seen) {
        let mut bad = Vec::new();
        match seen {
            Err(e) => bad.push(format!("no exchange: {e}")),
            Ok(frames) => {
                let got = h2_outcome(frames);
                if got != Some(case.want) {
                    bad.push(format!("want {:?}, got {got:?} from {frames:?}", case.want));
                }
            }
        }
        let path = format!("/h2/{}", case.name);
        let at_app: Vec<_> = received
            .iter()
            .filter(|r| r.path() == path || r.path().starts_with(&format!("{path}/")))
            .collect();
        let ok = match case.at_app {
            AtApp::Nothing => at_app.is_empty(),
            AtApp::NoCompleteRequest => at_app.iter().all(|r| !r.complete && r.body.is_empty()),
            AtApp::One => at_app.len() == 1 && at_app[0].complete && at_app[0].version == "HTTP/2.0",
        };
        if !ok {
            bad.push(format!("want {:?} at the app, it got {at_app:#?}", case.at_app));
        }
        if !bad.is_empty() {
            failures.insert(case.name, bad);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} HTTP/2 cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures
            .iter()
            .map(|(n, b)| format!("- {n}:\n    {}", b.join("\n    ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let complete: Vec<_> = received.iter().filter(|r| r.complete).collect();
    assert_eq!(complete.len(), 1, "only the well-formed request reached the app whole: {received:#?}");
    // The agent's own 400s are logged with their reasons.
    for (name, reason) in [
        ("duplicate_content_length", "duplicate_content_length"),
        ("authority_and_host_differ", "host_mismatch"),
    ] {
        let logged = t.wait_request_lines(1, |l| l["path"] == format!("/h2/{name}"));
        assert!(
            logged.len() == 1 && logged[0]["rejected"] == reason && logged[0]["protocol"] == "HTTP/2",
            "{name}: {logged:?}"
        );
    }
}
