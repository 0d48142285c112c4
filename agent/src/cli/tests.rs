use clap::{CommandFactory as _, Parser};

use super::*;
use crate::admin::test_support::{CLIENT_ID, RunningAdmin};

/// The shape `main.rs` gives the CLI: global options plus the client commands.
#[derive(Debug, Parser)]
#[command(name = "ferry")]
struct TestCli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: ClientCommand,
}

struct Outcome {
    exit: Exit,
    out: String,
    err: String,
}

async fn ferry(socket: &std::path::Path, args: &[&str]) -> Outcome {
    let mut argv = vec!["ferry", "--admin-socket", socket.to_str().expect("utf-8 path")];
    argv.extend_from_slice(args);
    let cli = TestCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = execute(&cli.global, cli.command, TestCli::command, &mut out, &mut err).await;
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    Outcome { exit, out: text(out), err: text(err) }
}

#[tokio::test]
async fn tables_for_each_command() {
    let admin = RunningAdmin::start().await;
    let run = |args: &'static [&'static str]| ferry(&admin.socket, args);

    let o = run(&["workloads"]).await;
    assert_eq!(o.exit, Exit::Ok, "{}", o.err);
    let lines: Vec<&str> = o.out.lines().collect();
    assert_eq!(
        lines[0],
        "NAMESPACE   NAME     IP                 STEERED              APP-PEER   MODE         IDENTITY                                      PROGRAMS"
    );
    assert_eq!(
        lines[1],
        format!(
            "default     client   10.0.0.5           10.0.0.5,10.0.0.99   client     strict       {CLIENT_ID}   connect4,sk_lookup"
        )
    );
    assert!(
        lines[2].starts_with(
            "default     web-1    10.0.1.7,fd00::7   -                    -          permissive   -"
        ),
        "{}",
        o.out
    );
    assert!(lines[2].ends_with("not enrolled"), "{}", o.out);

    let o = run(&["services"]).await;
    assert_eq!(
        o.out,
        "NAMESPACE   NAME   VIPS         PORTS          ENDPOINTS\n\
                       default     web    10.96.0.10   80->8080,443   default/web-1\n"
    );

    let o = run(&["connections"]).await;
    let lines: Vec<&str> = o.out.lines().collect();
    assert!(lines[0].starts_with("ID   DIRECTION   POD"), "{}", o.out);
    assert!(lines[0].ends_with("BYTES_SENT   BYTES_RECEIVED   AGE"), "{}", o.out);
    for cell in [
        "42",
        "outbound",
        "10.0.0.5:41234",
        "10.0.1.7:8080",
        "default/client -> default/web",
        "5120",
        "312",
        "3m12s",
    ] {
        assert!(lines[1].contains(cell), "missing {cell:?} in {}", lines[1]);
    }

    let o = run(&["certs"]).await;
    assert!(o.out.starts_with("IDENTITY"), "{}", o.out);
    assert!(o.out.contains("5f:0a:91   2026-05-21T10:00:00Z ("), "{}", o.out);
    assert!(o.out.lines().nth(1).is_some_and(|l| l.ends_with("valid")), "{}", o.out);

    let o = run(&["bpf"]).await;
    for want in [
        "Programs:",
        "ferry_connect4   41   cgroup_sock_addr",
        "Links:",
        "Pod counters:",
        "ORIG_DST_BY_COOKIE   2         65536",
        "redirects   10",
    ] {
        assert!(o.out.contains(want), "missing {want:?} in\n{}", o.out);
    }

    let o = run(&["status"]).await;
    assert!(o.out.contains("Node:                node-a\n"), "{}", o.out);
    assert!(o.out.contains("Version:             0.1.0 (0a2b440)\n"), "{}", o.out);
    assert!(o.out.contains("Uptime:              1h2m\n"), "{}", o.out);
    assert!(o.out.contains("Ready:               yes\n"), "{}", o.out);

    let o = run(&["config-dump"]).await;
    assert!(o.out.contains("capture:\n  exclude_ports:\n    - 22\n"), "{}", o.out);
    assert!(o.out.contains("flag: \"yes\"\n"), "{}", o.out);
    admin.stop().await;
}

#[tokio::test]
async fn json_and_yaml_carry_the_same_data() {
    let admin = RunningAdmin::start().await;
    for cmd in ["status", "workloads", "services", "certs", "connections", "bpf", "config-dump"] {
        let j = ferry(&admin.socket, &["-o", "json", cmd]).await;
        assert_eq!(j.exit, Exit::Ok, "{cmd}: {}", j.err);
        let from_json: Value = serde_json::from_str(&j.out).expect("valid JSON");
        let y = ferry(&admin.socket, &[cmd, "--output", "yaml"]).await;
        assert_eq!(y.exit, Exit::Ok, "{cmd}: {}", y.err);
        let from_yaml: Value =
            serde_saphyr::from_str(&y.out).unwrap_or_else(|e| panic!("{cmd}: invalid YAML: {e}\n{}", y.out));
        // Compare as JSON values to check nothing was lost or retyped.
        assert_eq!(from_yaml, from_json, "{cmd}:\n{}", y.out);
    }
    admin.stop().await;
}

#[tokio::test]
async fn trace_is_explained() {
    let admin = RunningAdmin::start().await;
    let o = ferry(&admin.socket, &["trace", "default/client", "10.96.0.10:80"]).await;
    assert_eq!(o.exit, Exit::Ok, "{}", o.err);
    assert!(o.out.starts_with("default/client -> 10.96.0.10:80\n"), "{}", o.out);
    assert!(o.out.contains("Service:           default/web (VIP 10.96.0.10:80"), "{}", o.out);
    assert!(o.out.contains("Endpoint:          default/web-1 at 10.0.1.7:8080 on node node-b"), "{}", o.out);
    let o = ferry(&admin.socket, &["trace", "default/client", "[fd00::1]:22"]).await;
    assert!(o.out.contains("Captured:  no: port 22 is excluded"), "{}", o.out);
    let o = ferry(&admin.socket, &["trace", "other/pod", "10.0.0.1:80"]).await;
    assert_eq!(o.exit, Exit::Failed);
    assert!(o.err.contains("404 Not Found") && o.err.contains("not on this node"), "{}", o.err);
    let args = ["trace", "default/client", "10.96.0.10:80", "--path", "/a b?x", "--header", "X-Team: pay"];
    let o = ferry(&admin.socket, &[&args[..], &["--header", "x-b:2"]].concat()).await;
    assert_eq!(o.exit, Exit::Ok, "{}", o.err);
    let bad = ["ferry", "trace", "default/client", "10.96.0.10:80", "--header", "nocolon"];
    let e = TestCli::try_parse_from(bad).expect_err("a header without a colon");
    assert_eq!(e.exit_code(), Exit::Usage as i32);
    assert!(e.to_string().contains("is not NAME:VALUE"), "{e}");
    let traced = admin.state.traced.lock().expect("lock").clone();
    let want = crate::admin::TraceRequest {
        method: "GET".into(),
        path: "/a b?x".into(),
        host: None,
        headers: vec![("x-team".into(), "pay".into()), ("x-b".into(), "2".into())],
    };
    assert_eq!(traced, [None, None, None, Some(want)], "the L7 part reaches the agent only when given");
    let traced_before = traced.len();
    let o = ferry(&admin.socket, &["trace", "default/client", "10.96.0.10:80", "--method", "GE T"]).await;
    assert_eq!(o.exit, Exit::Failed, "the agent refuses a bad method");
    assert!(o.err.contains("400 Bad Request") && o.err.contains("is not a method"), "{}", o.err);
    assert_eq!(admin.state.traced.lock().expect("lock").len(), traced_before);
    admin.stop().await;
}

#[tokio::test]
async fn log_level_reports_success_and_agent_errors() {
    let admin = RunningAdmin::start().await;
    let o = ferry(&admin.socket, &["log-level", "info,ferry=debug"]).await;
    assert_eq!(o.exit, Exit::Ok, "{}", o.err);
    assert_eq!(o.out, "log level set to info,ferry=debug\n");
    assert_eq!(*admin.state.levels.lock().expect("lock"), ["info,ferry=debug"]);
    let o = ferry(&admin.socket, &["log-level", "degub"]).await;
    assert_eq!(o.exit, Exit::Failed);
    assert_eq!(
        o.err.trim_end(),
        "error: the agent refused the request (400 Bad Request): unknown log level \"degub\": \
         expected one of trace, debug, info, warn, error, off, or directives such as \
         \"info,ferry::proxy=debug\""
    );
    assert!(o.out.is_empty());
    admin.stop().await;
}

#[tokio::test]
async fn exit_code_3_when_no_agent_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("admin.sock");
    let o = ferry(&missing, &["status"]).await;
    assert_eq!(o.exit, Exit::NotRunning);
    assert_eq!(
        o.err.trim_end(),
        format!("error: the Ferry agent is not running (no socket at {})", missing.display())
    );
    assert!(o.out.is_empty());
    // A socket file left by a dead agent: connection refused.
    drop(std::os::unix::net::UnixListener::bind(&missing).expect("stale socket"));
    let o = ferry(&missing, &["workloads"]).await;
    assert_eq!(o.exit, Exit::NotRunning);
    assert!(o.err.contains("refuses connections"), "{}", o.err);
    assert_eq!(std::process::ExitCode::from(Exit::NotRunning), std::process::ExitCode::from(3));
}

#[tokio::test]
async fn empty_lists_say_so_on_stderr() {
    // An agent serving nothing at all: a raw socket answering `[]` to everything.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(crate::admin::httpd::serve(
        listener,
        |_req| async { crate::admin::httpd::json(http::StatusCode::OK, &serde_json::json!([])) },
        std::future::pending(),
    ));
    let o = ferry(&path, &["connections"]).await;
    assert_eq!((o.exit, o.out.as_str(), o.err.as_str()), (Exit::Ok, "", "No connections found.\n"));
    let o = ferry(&path, &["status"]).await;
    assert_eq!(o.exit, Exit::Failed, "a status that is not an object is a version mismatch");
    assert!(o.err.contains("is not what this CLI expects"), "{}", o.err);
    server.abort();
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_codes() {
    for bad in [
        vec!["ferry", "trace", "client", "10.0.0.1:80"],
        vec!["ferry", "trace", "default/client", "10.0.0.1"],
        vec!["ferry", "-o", "xml", "status"],
        vec!["ferry", "frobnicate"],
    ] {
        let e = TestCli::try_parse_from(&bad).expect_err("usage error");
        assert_eq!(e.exit_code(), Exit::Usage as i32, "{bad:?}: {e}");
    }
    let e = TestCli::try_parse_from(["ferry", "trace", "client", "10.0.0.1:80"]).expect_err("bad pod");
    assert!(e.to_string().contains("NAMESPACE/NAME"), "{e}");
    let help = TestCli::command().find_subcommand_mut("status").expect("status").render_long_help();
    assert!(help.to_string().contains("3  the agent is not running"), "{help}");
}

#[test]
fn socket_defaults_and_env() {
    // The environment is left alone (tests run in parallel); the default applies unless the caller
    // exported FERRY_ADMIN_SOCKET.
    let cli = TestCli::try_parse_from(["ferry", "status"]).expect("parse");
    if std::env::var_os("FERRY_ADMIN_SOCKET").is_none() {
        assert_eq!(cli.global.admin_socket, PathBuf::from(admin::DEFAULT_SOCKET));
    }
    assert_eq!(cli.global.output, OutputFormat::Table);
    let arg = TestCli::command()
        .get_arguments()
        .find(|a| a.get_id() == "admin_socket")
        .and_then(|a| a.get_env().map(|e| e.to_owned()));
    assert_eq!(arg.as_deref(), Some(std::ffi::OsStr::new("FERRY_ADMIN_SOCKET")));
}

#[tokio::test]
async fn completions_name_the_commands() {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let global = GlobalArgs { admin_socket: "/nonexistent".into(), output: OutputFormat::Table };
    let cmd = ClientCommand::Completions { shell: clap_complete::Shell::Bash };
    let exit = execute(&global, cmd, TestCli::command, &mut out, &mut err).await;
    assert_eq!(exit, Exit::Ok);
    let script = String::from_utf8(out).expect("utf-8");
    for word in ["_ferry()", "workloads", "log-level", "--admin-socket"] {
        assert!(script.contains(word), "completion script lacks {word}");
    }
}
