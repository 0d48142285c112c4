//! A small Kubernetes list/watch server for the Kubernetes source's tests: no kube-apiserver can be
//! had on these machines. It serves real Kubernetes JSON (objects built from k8s-openapi types)
//! with what kube-rs's watcher relies on, and nothing the agent could lean on that a real API
//! server lacks:
//! - `GET <collection>`: a list with `metadata.resourceVersion`;
//! - `GET <collection>?watch=1&resourceVersion=N`: every change after N as ADDED, MODIFIED or
//!   DELETED lines, BOOKMARKs while idle, the stream ending at `timeoutSeconds`;
//! - a watch from a version older than the last compaction gets an ERROR event with a 410 Status
//!   (kube-rs then relists);
//! - collections it does not serve (Istio's CRDs when "not installed") answer 404.
//!
//! It listens inside a node's network namespace, where the agent runs.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{Either, Full, channel::Channel};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

/// The collections served, by path.
pub const PODS: &str = "/api/v1/pods";
/// Namespaces.
pub const NAMESPACES: &str = "/api/v1/namespaces";
/// Services.
pub const SERVICES: &str = "/api/v1/services";
/// EndpointSlices.
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// Istio's AuthorizationPolicies.
pub const AUTHORIZATION_POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
/// Istio's PeerAuthentications.
pub const PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";

/// The objects and their history.
#[derive(Default)]
struct State {
    version: u64,
    /// (collection, namespace, name) -> (version, object).
    objects: BTreeMap<(String, String, String), (u64, Value)>,
    /// Every change: (version, collection, type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Watches from before this version get 410 Gone.
    compacted: u64,
    /// Collections answered with 404 (CRDs not installed).
    absent: Vec<String>,
}

/// A running server; stops when dropped.
pub struct KubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    /// `true` while the server is "down": connections are refused and watches end.
    down: watch::Sender<bool>,
    _runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl KubeApi {
    /// Starts the server on a free port of loopback in the netns at `netns`.
    pub fn start(netns: &Path) -> Result<KubeApi> {
        let listener = crate::netns::in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0"))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let (down, down_rx) = watch::channel(false);
        {
            let (state, changed) = (state.clone(), changed.clone());
            runtime.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { continue };
                    if *down_rx.borrow() {
                        drop(tcp);
                        continue;
                    }
                    let (state, changed, down_rx) = (state.clone(), changed.clone(), down_rx.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let (state, changed, down_rx) = (state.clone(), changed.clone(), down_rx.clone());
                            async move { Ok::<_, Infallible>(answer(req, state, changed, down_rx).await) }
                        });
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                    });
                }
            });
        }
        let dir = tempfile::tempdir()?;
        let api = KubeApi { addr, state, changed, down, _runtime: runtime, dir };
        std::fs::write(api.kubeconfig(), kubeconfig(addr))?;
        Ok(api)
    }

    /// A kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Creates or replaces `object` (any Kubernetes object with metadata) in `collection`.
    pub fn apply(&self, collection: &str, object: impl serde::Serialize) -> Result<()> {
        let mut object = serde_json::to_value(object).context("serializing the object")?;
        let (ns, name) = key_of(&object)?;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.version += 1;
        let version = s.version;
        object["metadata"]["resourceVersion"] = version.to_string().into();
        let key = (collection.to_owned(), ns, name);
        let kind = if s.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        s.objects.insert(key, (version, object.clone()));
        s.history.push((version, collection.to_owned(), kind, object));
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Deletes the object `namespace`/`name` of `collection` (namespace "" for cluster objects).
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        if let Some((_, mut object)) = s.objects.remove(&key) {
            s.version += 1;
            object["metadata"]["resourceVersion"] = s.version.to_string().into();
            let version = s.version;
            s.history.push((version, collection.to_owned(), "DELETED", object));
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Forgets history: a watch resuming from any version seen so far gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.compacted = s.version + 1;
        s.history.clear();
    }

    /// Answers 404 for `collection`, as an API server without that CRD does.
    pub fn without(&self, collection: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).absent.push(collection.to_owned());
    }

    /// Takes the server down (`true`: connections refused, watches cut) or brings it back.
    pub fn set_down(&self, down: bool) {
        let _ = self.down.send(down);
        self.changed.notify_waiters();
    }

    /// The address the server listens on, inside the node's netns.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn key_of(object: &Value) -> Result<(String, String)> {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().context("the object has no metadata.name")?.to_owned();
    let ns = meta["namespace"].as_str().unwrap_or_default().to_owned();
    Ok((ns, name))
}

/// The apiVersion and kind of a collection's objects.
fn kind_of(collection: &str) -> (&'static str, &'static str) {
    match collection {
        NAMESPACES => ("v1", "Namespace"),
        SERVICES => ("v1", "Service"),
        ENDPOINT_SLICES => ("discovery.k8s.io/v1", "EndpointSlice"),
        AUTHORIZATION_POLICIES => ("security.istio.io/v1", "AuthorizationPolicy"),
        PEER_AUTHENTICATIONS => ("security.istio.io/v1", "PeerAuthentication"),
        _ => ("v1", "Pod"),
    }
}

fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
         current-context: test\n"
    )
}

type Body = Either<Full<Bytes>, Channel<Bytes>>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    response
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    down: watch::Receiver<bool>,
) -> Response<Body> {
    if *down.borrow() {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &status(503, "ServiceUnavailable", "down"));
    }
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let known = [PODS, NAMESPACES, SERVICES, ENDPOINT_SLICES, AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS];
    let absent = state.lock().unwrap_or_else(|p| p.into_inner()).absent.contains(&path);
    if !known.contains(&path.as_str()) || absent {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "the server could not find the requested resource"),
        );
    }
    let watching = query.get("watch").is_some_and(|v| v == "1" || v == "true");
    // The one field selector the agent uses: spec.nodeName=NODE.
    let node = query.get("fieldSelector").and_then(|f| {
        let f = f.replace("%3D", "=").replace("%3d", "=");
        f.strip_prefix("spec.nodeName=").map(str::to_owned)
    });
    let selected =
        move |object: &Value| node.as_ref().is_none_or(|n| object["spec"]["nodeName"] == n.as_str());
    if !watching {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((c, _, _), (_, o))| *c == path && selected(o))
            .map(|(_, (_, o))| o.clone())
            .collect();
        let list = json!({"kind": "List", "apiVersion": "v1",
                          "metadata": {"resourceVersion": s.version.to_string()}, "items": items});
        return json_response(StatusCode::OK, &list);
    }
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64).min(290);
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut sent = from;
        let mut down = down;
        loop {
            // Armed before the history is read, so a change made after the read still wakes it.
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (events, gone, latest) = {
                let s = state.lock().unwrap_or_else(|p| p.into_inner());
                let gone = sent < s.compacted && sent != 0;
                let events: Vec<(u64, &'static str, Value)> = s
                    .history
                    .iter()
                    .filter(|(v, c, _, o)| *v > sent && *c == path && selected(o))
                    .map(|(v, _, t, o)| (*v, *t, o.clone()))
                    .collect();
                (events, gone, s.version)
            };
            if gone {
                let line =
                    json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
                let _ = tx.send(Frame::data(Bytes::from(format!("{line}\n")))).await;
                return;
            }
            for (version, kind, object) in events {
                let line = json!({"type": kind, "object": object});
                if tx.send(Frame::data(Bytes::from(format!("{line}\n")))).await.is_err() {
                    return;
                }
                sent = version;
            }
            tokio::select! {
                () = notified => {}
                _ = down.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    // Idle: a BOOKMARK carries the latest version, as the API server sends them.
                    let (api_version, kind) = kind_of(&path);
                    let line = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": latest.to_string()}}});
                    if tx.send(Frame::data(Bytes::from(format!("{line}\n")))).await.is_err() {
                        return;
                    }
                    sent = sent.max(latest);
                }
                () = tokio::time::sleep_until(deadline) => return,
            }
            if *down.borrow() {
                return;
            }
        }
    });
    let mut response = Response::new(Either::Right(body));
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    response
}
