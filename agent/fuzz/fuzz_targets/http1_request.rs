//! The HTTP/1 request path of the destination agent, whole: raw client bytes go through hyper's
//! server, the hardening checks, path normalization, a policy hook and the app-side client, to an
//! app that records what it received. Whatever the bytes, nothing panics, and the app never gets a
//! message a smuggling attack needs: two framings, two Content-Lengths, two Hosts, a hop-by-hop
//! header, an unnormalized path, or a request the policy denied.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ferry::http::path::Normalization;
use ferry::http::server::{self, RequestHooks, RequestLog, Settings, Verdict};
use ferry::http::upstream::{AppConn, Dial, Upstream, Version};
use ferry::policy;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the app received: each request's head.
type Seen = Arc<Mutex<Vec<http::request::Parts>>>;

struct Hooks;

impl RequestHooks for Hooks {
    fn authorize(&self, request: &policy::Request<'_>) -> Verdict {
        Verdict { allowed: !request.path.starts_with("/deny"), policy: None, rule: None }
    }

    fn finished(&self, log: &RequestLog) {
        // Building what the access log would print must not panic either.
        let _ = format!("{log:?}");
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// A dialler whose every connection is served by an in-memory HTTP/1 app recording into `seen`.
fn app(seen: Seen) -> Dial {
    Arc::new(move || {
        let seen = seen.clone();
        Box::pin(async move {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        seen.lock().expect("seen").push(parts);
                        let _ = body.collect().await;
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(theirs), service)
                    .with_upgrades()
                    .await;
            });
            Ok(Box::new(ours) as AppConn)
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let seen: Seen = Arc::default();
    runtime().block_on(async {
        let (mut client, proxy_side) = tokio::io::duplex(64 * 1024);
        let upstream = Upstream::new(Version::Http1, None, app(seen.clone()));
        let settings = Settings { normalization: Normalization::Base, start_traceparent: true };
        let served = tokio::spawn(server::serve(proxy_side, Version::Http1, upstream, Arc::new(Hooks), settings));
        let exchange = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut response = Vec::new();
            let _ = client.read_to_end(&mut response).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), exchange).await;
        served.abort();
    });
    for parts in seen.lock().expect("seen").iter() {
        let h = &parts.headers;
        assert!(h.get_all("content-length").iter().count() <= 1, "two Content-Lengths reached the app: {parts:?}");
        assert!(
            !(h.contains_key("content-length") && h.contains_key("transfer-encoding")),
            "two framings reached the app: {parts:?}"
        );
        assert!(h.get_all("host").iter().count() <= 1, "two Hosts reached the app: {parts:?}");
        for hop in ["keep-alive", "proxy-connection"] {
            assert!(!h.contains_key(hop), "hop-by-hop {hop} reached the app: {parts:?}");
        }
        let path = parts.uri.path();
        assert!(!path.starts_with("/deny"), "a denied request reached the app: {parts:?}");
        if path.starts_with('/') {
            assert!(
                path.split('/').all(|s| s != "." && s != ".."),
                "an unnormalized path reached the app: {parts:?}"
            );
        }
    }
});
