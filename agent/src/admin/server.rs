//! Serves [`AdminState`] on a Unix socket that only root can open.

use std::{
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use tokio::net::{UnixListener, UnixStream};

use super::{
    AdminState, StateError,
    httpd::{self, Body},
    log_level, parse_source, parse_trace_dest, query,
};

/// The largest `POST /log-level` body read.
const MAX_BODY: usize = 4096;

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminServerError {
    /// Another agent answers on the socket.
    #[error("another Ferry agent is already serving {}", .0.display())]
    AlreadyRunning(PathBuf),
    /// The path holds something that is not a socket; it is left alone.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// A filesystem or socket operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AdminServerError + 'a {
    move |source| AdminServerError::Io { what, path: path.to_owned(), source }
}

/// A bound admin socket, ready to serve. Dropping it removes the socket file if it is still ours.
#[derive(Debug)]
pub struct AdminServer {
    listener: UnixListener,
    guard: SocketFile,
}

impl AdminServer {
    /// Binds `path` with mode 0600 (owned by root when running as root), creating missing parent
    /// directories with mode 0700. A stale socket left by a dead agent is replaced; a live one is not.
    pub async fn bind(path: &Path) -> Result<Self, AdminServerError> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(io_err("creating the directory", &parent))?;
        clear_stale(path).await?;
        let listener = if private_dir(&parent)? {
            // Nobody else can reach into the directory: bind in place, so the kernel (and `ss -xl`,
            // `lsof`) name the socket by the path operators know.
            let listener = UnixListener::bind(path).map_err(io_err("binding", path))?;
            restrict(path).map(|()| listener)
        } else {
            bind_privately(&parent, path)
        }?;
        let guard = SocketFile::record(path)?;
        tracing::info!(socket = %path.display(), "admin API listening");
        Ok(Self { listener, guard })
    }

    /// Binds `path` in place of the agent this one took over from (which answers there until
    /// it exits, and never removes a successor's socket).
    pub async fn bind_replacing(path: &Path) -> Result<Self, AdminServerError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the previous agent's socket", path)(e)),
        }
        Self::bind(path).await
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.guard.path
    }

    /// Serves until `shutdown` completes, then removes the socket file.
    pub async fn serve(self, state: Arc<dyn AdminState>, shutdown: impl Future<Output = ()>) {
        let Self { listener, guard } = self;
        httpd::serve(listener, move |req| route(state.clone(), req), shutdown).await;
        drop(guard);
    }
}

/// Whether `dir` is ours and closed to group and others, so nobody else can connect to a socket in
/// it in the moment before its mode is set.
fn private_dir(dir: &Path) -> Result<bool, AdminServerError> {
    let meta = std::fs::metadata(dir).map_err(io_err("inspecting", dir))?;
    Ok(meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0)
}

/// Binds in a fresh 0700 directory beside `path` and renames into place once the mode is right:
/// nobody else can connect while the socket still has the umask's permissions, and a connection
/// made in that moment would outlive the chmod. The kernel keeps the bind-time name, so `ss -xl`
/// shows the temporary path; only used when the parent directory is shared.
fn bind_privately(parent: &Path, path: &Path) -> Result<UnixListener, AdminServerError> {
    let private = parent.join(format!(".ferry-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_err("creating the directory", &private))?;
    let tmp = private.join("admin.sock");
    let placed = UnixListener::bind(&tmp).map_err(io_err("binding", &tmp)).and_then(|listener| {
        restrict(&tmp)?;
        std::fs::rename(&tmp, path).map_err(io_err("moving the socket into place at", path))?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    placed
}

/// Sets mode 0600 (and root ownership when root) on the socket at `path`.
fn restrict(path: &Path) -> Result<(), AdminServerError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("setting the mode of", path))?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(io_err("chowning", path))?;
    }
    Ok(())
}

/// Removes a socket no process answers on; refuses a live socket or a non-socket file.
async fn clear_stale(path: &Path) -> Result<(), AdminServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspecting", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(AdminServerError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(AdminServerError::AlreadyRunning(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing a stale admin socket");
            std::fs::remove_file(path).map_err(io_err("removing the stale socket", path))
        }
        Err(e) => Err(io_err("probing the existing socket", path)(e)),
    }
}

/// The socket file we created, identified by inode so we never remove a successor's socket.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn record(path: &Path) -> Result<Self, AdminServerError> {
        let meta = std::fs::symlink_metadata(path).map_err(io_err("inspecting", path))?;
        Ok(Self { path: path.to_owned(), dev: meta.dev(), ino: meta.ino() })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(socket = %self.path.display(), error = %e, "removing the admin socket");
        }
    }
}

/// The admin endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Index,
    Status,
    ConfigDump,
    Workloads,
    Services,
    Certs,
    Connections,
    Bpf,
    Ready,
    Live,
    LogLevel,
    Trace,
    Policies,
}

/// Paths in the order `GET /` lists them.
const PATHS: [(&str, Endpoint); 13] = [
    ("/", Endpoint::Index),
    ("/status", Endpoint::Status),
    ("/config_dump", Endpoint::ConfigDump),
    ("/workloads", Endpoint::Workloads),
    ("/services", Endpoint::Services),
    ("/certs", Endpoint::Certs),
    ("/connections", Endpoint::Connections),
    ("/bpf", Endpoint::Bpf),
    ("/ready", Endpoint::Ready),
    ("/live", Endpoint::Live),
    ("/log-level", Endpoint::LogLevel),
    ("/trace", Endpoint::Trace),
    ("/policies", Endpoint::Policies),
];

async fn route(state: Arc<dyn AdminState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let Some(&(_, endpoint)) = PATHS.iter().find(|(p, _)| *p == path) else {
        return httpd::error(StatusCode::NOT_FOUND, &format!("no endpoint {path}; GET / lists them"));
    };
    let (want, allowed) =
        if endpoint == Endpoint::LogLevel { (Method::POST, "POST") } else { (Method::GET, "GET") };
    if req.method() != want {
        return httpd::method_not_allowed(allowed);
    }
    let result = match endpoint {
        Endpoint::Index => {
            let paths: Vec<&str> = PATHS.iter().map(|(p, _)| *p).collect();
            Ok(httpd::json(StatusCode::OK, &serde_json::json!({ "endpoints": paths })))
        }
        Endpoint::Live => Ok(httpd::json(StatusCode::OK, &serde_json::json!({ "live": true }))),
        Endpoint::Ready => call(&state, |s| s.ready()).await.map(|ready| {
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            httpd::json(status, &serde_json::json!({ "ready": ready }))
        }),
        Endpoint::Status => ok_json(call(&state, |s| s.status()).await),
        Endpoint::ConfigDump => ok_json(call(&state, |s| s.config_dump()).await),
        Endpoint::Workloads => ok_json(call(&state, |s| s.workloads()).await),
        Endpoint::Services => ok_json(call(&state, |s| s.services()).await),
        Endpoint::Certs => ok_json(call(&state, |s| s.certs()).await),
        Endpoint::Connections => ok_json(call(&state, |s| s.connections()).await),
        Endpoint::Bpf => ok_json(flatten(call(&state, |s| s.bpf()).await)),
        Endpoint::LogLevel => set_log_level(&state, req).await,
        Endpoint::Trace => trace(&state, req.uri().query().unwrap_or("")).await,
        Endpoint::Policies => ok_json(flatten(call(&state, |s| s.policies()).await)),
    };
    result.unwrap_or_else(|Reject(status, message)| httpd::error(status, &message))
}

/// A refused request: the status and the message for `{"error": ...}`.
struct Reject(StatusCode, String);

type Handled<T> = Result<T, Reject>;

/// Runs a state method on a blocking thread: it may read maps or take locks.
async fn call<T, F>(state: &Arc<dyn AdminState>, f: F) -> Handled<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn AdminState) -> T + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(state.as_ref())).await.map_err(|e| {
        tracing::error!(error = %e, "admin state call failed");
        Reject(StatusCode::INTERNAL_SERVER_ERROR, "the agent failed answering; see its log".into())
    })
}

fn flatten<T>(r: Handled<Result<T, StateError>>) -> Handled<T> {
    r?.map_err(|e| state_error(&e))
}

fn ok_json<T: serde::Serialize>(r: Handled<T>) -> Handled<Response<Body>> {
    r.map(|v| httpd::json(StatusCode::OK, &v))
}

fn state_error(e: &StateError) -> Reject {
    let status = match e {
        StateError::NotFound(_) => StatusCode::NOT_FOUND,
        StateError::Invalid(_) => StatusCode::BAD_REQUEST,
        StateError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Reject(status, e.to_string())
}

fn bad_request(message: impl std::fmt::Display) -> Reject {
    Reject(StatusCode::BAD_REQUEST, message.to_string())
}

/// The query's pairs, or a 400.
fn query_pairs(query: &str) -> Handled<Vec<(String, String)>> {
    query::parse(query).map_err(bad_request)
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn set_log_level(state: &Arc<dyn AdminState>, req: Request<Incoming>) -> Handled<Response<Body>> {
    let pairs = query_pairs(req.uri().query().unwrap_or(""))?;
    let directive = match param(&pairs, "level") {
        Some(level) => level.to_owned(),
        None => level_from_body(req.into_body()).await?,
    };
    log_level::parse_directive(&directive).map_err(bad_request)?;
    let directive = directive.trim().to_owned();
    let applied = directive.clone();
    flatten(call(state, move |s| s.set_log_level(&applied)).await)?;
    tracing::info!(level = %directive, "log level changed through the admin API");
    Ok(httpd::json(StatusCode::OK, &serde_json::json!({ "level": directive })))
}

/// Reads the level from a body: `level=...`, `{"level": "..."}` or the bare directive.
async fn level_from_body(body: Incoming) -> Handled<String> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    let text = std::str::from_utf8(&bytes).map_err(|_| bad_request("the body is not UTF-8"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(bad_request("no level given: send level=LEVEL in the query or the body"));
    }
    if text.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad_request(format!("the JSON body: {e}")))?;
        return v
            .get("level")
            .and_then(|l| l.as_str())
            .map(str::to_owned)
            .ok_or_else(|| bad_request("the JSON body has no string \"level\""));
    }
    if text.starts_with("level=") {
        let pairs = query_pairs(text)?;
        return Ok(param(&pairs, "level").unwrap_or_default().to_owned());
    }
    Ok(text.to_owned())
}

async fn trace(state: &Arc<dyn AdminState>, query: &str) -> Handled<Response<Body>> {
    const USAGE: &str = "use /trace?src=SOURCE&dest=DEST[&method=M&path=P&host=H&header=NAME:VALUE]";
    let pairs = query_pairs(query)?;
    let src = param(&pairs, "src")
        .or_else(|| param(&pairs, "pod"))
        .ok_or_else(|| bad_request(format!("missing src; {USAGE}")))?;
    let dest = param(&pairs, "dest").ok_or_else(|| bad_request(format!("missing dest; {USAGE}")))?;
    let src = parse_source(src).map_err(bad_request)?;
    let dest = parse_trace_dest(dest).map_err(bad_request)?;
    let request = trace_request(&pairs).map_err(bad_request)?;
    ok_json(flatten(call(state, move |s| s.trace(&src, &dest, request.as_ref())).await))
}

/// The L7 part of a trace query (`method`, `path`, `host`, `header=NAME:VALUE` repeated); `None`
/// when none is given.
fn trace_request(pairs: &[(String, String)]) -> Result<Option<super::TraceRequest>, String> {
    let headers = pairs
        .iter()
        .filter(|(k, _)| k == "header")
        .map(|(_, v)| super::parse_trace_header(v))
        .collect::<Result<Vec<_>, _>>()?;
    let (method, path, host) = (param(pairs, "method"), param(pairs, "path"), param(pairs, "host"));
    if method.is_none() && path.is_none() && host.is_none() && headers.is_empty() {
        return Ok(None);
    }
    let method = method.unwrap_or("GET");
    http::Method::from_bytes(method.as_bytes()).map_err(|_| format!("method {method:?} is not a method"))?;
    Ok(Some(super::TraceRequest {
        method: method.to_owned(),
        path: path.unwrap_or("/").to_owned(),
        host: host.map(str::to_owned),
        headers,
    }))
}

#[cfg(test)]
mod tests;
