use std::{os::unix::fs::PermissionsExt as _, sync::atomic::Ordering};

use bytes::Bytes;
use http::{Method, StatusCode};

use super::*;
use crate::{
    admin::test_support::RunningAdmin,
    cli::client::{AdminClient, Answer},
};

async fn send(admin: &RunningAdmin, method: Method, uri: &str, body: &str) -> Answer {
    AdminClient::new(&admin.socket)
        .send(method, uri, Bytes::copy_from_slice(body.as_bytes()))
        .await
        .unwrap_or_else(|e| panic!("{uri}: {e}"))
}

fn json(answer: &Answer) -> serde_json::Value {
    serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", answer.body))
}

fn error_message(answer: &Answer) -> String {
    json(answer)["error"].as_str().unwrap_or_else(|| panic!("no error field: {:?}", answer.body)).to_owned()
}

#[tokio::test]
async fn socket_is_private_and_removed_on_shutdown() {
    let admin = RunningAdmin::start().await;
    let meta = std::fs::symlink_metadata(&admin.socket).expect("socket exists");
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
    }
    let parent = std::fs::metadata(admin.dir().join("run")).expect("parent");
    assert_eq!(parent.permissions().mode() & 0o777, 0o700);
    let leftovers: Vec<_> = std::fs::read_dir(admin.dir().join("run"))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, ["admin.sock"], "no temporary socket left behind");
    let socket = admin.socket.clone();
    admin.stop().await;
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn binds_in_place_in_a_private_dir_and_privately_in_a_shared_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let path = dir.path().join("admin.sock");
    let server = AdminServer::bind(&path).await.expect("bind");
    let bound = server.listener.local_addr().expect("local addr");
    assert_eq!(bound.as_pathname(), Some(path.as_path()), "the kernel knows the socket by its path");
    drop(server);

    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = shared.join("admin.sock");
    let server = AdminServer::bind(&path).await.expect("bind");
    let meta = std::fs::symlink_metadata(&path).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let bound = server.listener.local_addr().expect("local addr");
    assert_ne!(bound.as_pathname(), Some(path.as_path()), "bound in a private directory, then moved");
    let leftovers: Vec<_> =
        std::fs::read_dir(&shared).expect("read dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(leftovers, ["admin.sock"], "no temporary directory left behind");
}

#[tokio::test]
async fn refuses_to_start_beside_a_live_agent() {
    let admin = RunningAdmin::start().await;
    let err = AdminServer::bind(&admin.socket).await.expect_err("second agent");
    assert!(matches!(err, AdminServerError::AlreadyRunning(_)), "{err:?}");
    assert!(err.to_string().contains("already serving"), "{err}");
    let answer = send(&admin, Method::GET, "/live", "").await;
    assert_eq!(answer.status, StatusCode::OK, "the first agent still answers");
    admin.stop().await;
}

#[tokio::test]
async fn replaces_a_stale_socket_but_not_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let server = AdminServer::bind(&path).await.expect("stale socket replaced");
    assert_eq!(server.path(), path);
    drop(server);
    assert!(!path.exists(), "dropping the server removes its socket");

    std::fs::write(&path, "keep me").expect("regular file");
    let err = AdminServer::bind(&path).await.expect_err("not a socket");
    assert!(matches!(err, AdminServerError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read_to_string(&path).expect("still there"), "keep me");
}

#[tokio::test]
async fn get_endpoints_answer_json() {
    let admin = RunningAdmin::start().await;
    let status = json(&send(&admin, Method::GET, "/status", "").await);
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["ready"], true);
    assert_eq!(status["uptime_seconds"], 3725);
    let workloads = json(&send(&admin, Method::GET, "/workloads/", "").await);
    assert_eq!(workloads[0]["identity"], crate::admin::test_support::CLIENT_ID);
    assert_eq!(workloads[1]["mode"], "permissive");
    let services = json(&send(&admin, Method::GET, "/services", "").await);
    assert_eq!(services[0]["ports"][0]["target_port"], 8080);
    let certs = json(&send(&admin, Method::GET, "/certs", "").await);
    assert_eq!(certs[0]["not_after"], "2026-05-21T10:00:00Z");
    let conns = json(&send(&admin, Method::GET, "/connections", "").await);
    assert_eq!(conns[0]["original_dst"], "10.96.0.10:80");
    let bpf = json(&send(&admin, Method::GET, "/bpf", "").await);
    assert_eq!(bpf["pods"][0]["links"][0]["id"], 7);
    let dump = json(&send(&admin, Method::GET, "/config_dump", "").await);
    assert_eq!(dump["capture"]["exclude_ports"][0], 22);
    let index = json(&send(&admin, Method::GET, "/", "").await);
    assert!(index["endpoints"].as_array().expect("list").contains(&"/trace".into()));
    assert_eq!(json(&send(&admin, Method::GET, "/live", "").await)["live"], true);
    admin.stop().await;
}

#[tokio::test]
async fn ready_follows_the_state() {
    let admin = RunningAdmin::start().await;
    let answer = send(&admin, Method::GET, "/ready", "").await;
    assert_eq!((answer.status, json(&answer)["ready"].clone()), (StatusCode::OK, true.into()));
    admin.state.ready.store(false, Ordering::Relaxed);
    let answer = send(&admin, Method::GET, "/ready", "").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&answer)["ready"], false);
    admin.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_refused() {
    let admin = RunningAdmin::start().await;
    let answer = send(&admin, Method::GET, "/nope", "").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(error_message(&answer).contains("/nope"));
    let answer = send(&admin, Method::POST, "/status", "").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    let answer = send(&admin, Method::GET, "/log-level?level=debug", "").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(admin.state.levels.lock().expect("lock").is_empty(), "GET must not change the level");
    admin.state.bpf_fails.store(true, Ordering::Relaxed);
    let answer = send(&admin, Method::GET, "/bpf", "").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(error_message(&answer).contains("EPERM"));
    admin.stop().await;
}

#[tokio::test]
async fn log_level_takes_query_or_body_and_refuses_bad_values() {
    let admin = RunningAdmin::start().await;
    for (uri, body, want) in [
        ("/log-level?level=debug", "", "debug"),
        ("/log-level", " warn\n", "warn"),
        ("/log-level", "level=info%2Cferry%3A%3Aproxy%3Dtrace", "info,ferry::proxy=trace"),
        ("/log-level", "{\"level\": \"ERROR\"}", "ERROR"),
    ] {
        let answer = send(&admin, Method::POST, uri, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri} {body}: {:?}", answer.body);
        assert_eq!(json(&answer)["level"], want, "{uri} {body}");
        assert_eq!(admin.state.levels.lock().expect("lock").last().map(String::as_str), Some(want));
    }
    let applied = admin.state.levels.lock().expect("lock").len();
    for (uri, body, needle) in [
        ("/log-level?level=degub", "", "unknown log level \"degub\""),
        ("/log-level", "ferry=loud", "invalid log filter"),
        ("/log-level", "", "no level given"),
        ("/log-level", "{\"lvl\": 1}", "no string \"level\""),
        ("/log-level?level=%zz", "", "bad percent escape"),
    ] {
        let answer = send(&admin, Method::POST, uri, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{uri} {body}");
        let message = error_message(&answer);
        assert!(message.contains(needle), "{uri} {body}: {message}");
    }
    assert_eq!(admin.state.levels.lock().expect("lock").len(), applied, "bad levels never applied");
    admin.stop().await;
}

#[tokio::test]
async fn trace_checks_its_parameters() {
    let admin = RunningAdmin::start().await;
    let answer = send(&admin, Method::GET, "/trace?pod=default%2Fclient&dest=10.96.0.10%3A80", "").await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let trace = json(&answer);
    assert_eq!(trace["service"]["name"], "default/web");
    assert_eq!(trace["captured"], true);
    let answer = send(&admin, Method::GET, "/trace?pod=default/client&dest=[fd00::1]:22", "").await;
    assert_eq!(json(&answer)["dest"], "[fd00::1]:22");
    for (uri, status, needle) in [
        ("/trace?dest=10.0.0.1:80", StatusCode::BAD_REQUEST, "missing src"),
        ("/trace?src=spiffe://&dest=10.0.0.1:80", StatusCode::BAD_REQUEST, "not a valid SPIFFE ID"),
        ("/trace?src=default/client&dest=default/web:0", StatusCode::BAD_REQUEST, "1..65535"),
        ("/trace?pod=default/client", StatusCode::BAD_REQUEST, "missing dest"),
        ("/trace?pod=client&dest=10.0.0.1:80", StatusCode::BAD_REQUEST, "NAMESPACE/NAME"),
        ("/trace?pod=default/client&dest=web:80", StatusCode::BAD_REQUEST, "IP:PORT"),
        ("/trace?pod=default/client&dest=10.0.0.1:0", StatusCode::BAD_REQUEST, "port 0"),
        ("/trace?pod=other/pod&dest=10.0.0.1:80", StatusCode::NOT_FOUND, "not on this node"),
    ] {
        let answer = send(&admin, Method::GET, uri, "").await;
        assert_eq!(answer.status, status, "{uri}");
        let message = error_message(&answer);
        assert!(message.contains(needle), "{uri}: {message}");
    }
    admin.stop().await;
}

#[tokio::test]
async fn policies_lists_each_rule() {
    let admin = RunningAdmin::start().await;
    let answer = send(&admin, Method::GET, "/policies", "").await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let policies = json(&answer);
    assert_eq!(policies[0]["name"], "allow-client");
    assert_eq!(policies[0]["rules"][0]["enforcement"], "L4");
    admin.stop().await;
}
