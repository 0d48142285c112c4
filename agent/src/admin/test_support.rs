//! A fake [`AdminState`] with fixed data, for the server's and the CLI's tests.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::oneshot;

use super::{
    AdminServer, AdminState, StateError, TraceDest, TraceSource,
    model::{
        BpfLinkView, BpfMapView, BpfPodView, BpfProgramView, BpfView, CertState, CertView, ConnectionView,
        Direction, EndpointView, ModeView, PolicyRuleView, PolicyView, ServicePortView, ServiceView,
        StatusView, Timestamp, TraceEndpointView, TraceServiceView, TraceView, Transport, WorkloadView,
    },
};

/// Fixed answers plus the state the tests change.
#[derive(Debug, Default)]
pub(crate) struct FakeState {
    /// What `/ready` answers.
    pub ready: AtomicBool,
    /// Directives applied through `set_log_level`.
    pub levels: Mutex<Vec<String>>,
    /// Makes `/bpf` fail as a map read would.
    pub bpf_fails: AtomicBool,
    /// The HTTP request of each trace asked for.
    pub traced: Mutex<Vec<Option<super::TraceRequest>>>,
}

pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub(crate) const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

impl AdminState for FakeState {
    fn status(&self) -> StatusView {
        StatusView {
            version: "0.1.0".into(),
            commit: Some("0a2b440".into()),
            node: "node-a".into(),
            uptime_seconds: 3725,
            pods_enrolled: 2,
            ready: self.ready(),
            active_connections: 1,
            log_level: self.levels.lock().expect("lock").last().cloned(),
            policies: 1,
            policy_error: None,
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({"node": "node-a", "capture": {"exclude_ports": [22]}, "flag": "yes"})
    }

    fn workloads(&self) -> Vec<WorkloadView> {
        vec![
            WorkloadView {
                namespace: "default".into(),
                name: "client".into(),
                ips: vec!["10.0.0.5".parse().expect("ip")],
                mode: ModeView::Strict,
                identity: Some(CLIENT_ID.into()),
                programs: vec!["ferry_connect4".into(), "ferry_sk_lookup".into()],
                enrolled: true,
                netns: Some("/var/run/netns/client".into()),
                cgroup: None,
                uid: None,
                node: Some("node-a".into()),
                steered_ips: vec!["10.0.0.5".parse().expect("ip"), "10.0.0.99".parse().expect("ip")],
                unsteered: vec![],
                app_source: Some("client".into()),
                app_source_note: None,
                waiting: None,
            },
            WorkloadView {
                namespace: "default".into(),
                name: "web-1".into(),
                ips: vec!["10.0.1.7".parse().expect("ip"), "fd00::7".parse().expect("ip")],
                mode: ModeView::Permissive,
                identity: None,
                programs: vec![],
                enrolled: false,
                netns: None,
                cgroup: None,
                uid: None,
                node: Some("node-a".into()),
                steered_ips: vec![],
                unsteered: vec![],
                app_source: None,
                app_source_note: None,
                waiting: None,
            },
        ]
    }

    fn services(&self) -> Vec<ServiceView> {
        vec![ServiceView {
            namespace: "default".into(),
            name: "web".into(),
            vips: vec!["10.96.0.10".parse().expect("ip")],
            ports: vec![
                ServicePortView { port: 80, target_port: 8080 },
                ServicePortView { port: 443, target_port: 443 },
            ],
            endpoints: vec![EndpointView { pod: "default/web-1".into(), ips: vec![], active_connections: 1 }],
        }]
    }

    fn certs(&self) -> Vec<CertView> {
        vec![CertView {
            identity: CLIENT_ID.into(),
            serial: "5f:0a:91".into(),
            not_before: Timestamp::from_unix_seconds(1_779_271_200),
            not_after: Timestamp::from_unix_seconds(1_779_357_600),
            next_renewal: None,
            state: CertState::Valid,
            pods: vec!["default/client".into()],
        }]
    }

    fn connections(&self) -> Vec<ConnectionView> {
        vec![ConnectionView {
            id: 42,
            direction: Direction::Outbound,
            pod: "default/client".into(),
            src: addr("10.0.0.5:41234"),
            original_dst: addr("10.96.0.10:80"),
            endpoint: Some(addr("10.0.1.7:8080")),
            service: Some("default/web".into()),
            source_identity: Some(CLIENT_ID.into()),
            destination_identity: Some(WEB_ID.into()),
            security: Some("mutual_tls".into()),
            protocol: Some("tcp".into()),
            requests: 0,
            bytes_sent: 5120,
            bytes_received: 312,
            age_seconds: 192.4,
        }]
    }

    fn bpf(&self) -> Result<BpfView, StateError> {
        if self.bpf_fails.load(Ordering::Relaxed) {
            return Err(StateError::Failed("reading map COUNTERS: EPERM".into()));
        }
        Ok(BpfView {
            capture: "ebpf".into(),
            programs: vec![BpfProgramView {
                name: "ferry_connect4".into(),
                id: 41,
                kind: Some("cgroup_sock_addr".into()),
            }],
            pods: vec![BpfPodView {
                pod: "default/client".into(),
                cgroup: None,
                links: vec![BpfLinkView { program: "ferry_connect4".into(), id: 7 }],
                outbound_redirects: 10,
                inbound_steers: 3,
            }],
            maps: vec![BpfMapView {
                name: "ORIG_DST_BY_COOKIE".into(),
                entries: 2,
                max_entries: Some(65536),
            }],
            counters: [("redirects".to_owned(), 10)].into_iter().collect(),
        })
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn set_log_level(&self, directive: &str) -> Result<(), StateError> {
        self.levels.lock().expect("lock").push(directive.to_owned());
        Ok(())
    }

    fn policies(&self) -> Result<Vec<PolicyView>, StateError> {
        Ok(vec![PolicyView {
            namespace: "default".into(),
            name: "allow-client".into(),
            action: "ALLOW".into(),
            dry_run: false,
            source: "/etc/ferry/policies/p.yaml#1".into(),
            selector: None,
            workloads: vec!["default/web-1".into()],
            rules: vec![PolicyRuleView { index: 0, enforcement: "L4".into() }],
        }])
    }

    fn trace(
        &self,
        src: &TraceSource,
        dest: &TraceDest,
        request: Option<&super::TraceRequest>,
    ) -> Result<TraceView, StateError> {
        self.traced.lock().expect("lock").push(request.cloned());
        let TraceSource::Pod(pod) = src else {
            return Err(StateError::Invalid("the fake traces pods only".into()));
        };
        if pod != "default/client" {
            return Err(StateError::NotFound(format!("pod {pod} is not on this node")));
        }
        let &TraceDest::Address(dest) = dest else {
            return Err(StateError::Invalid("the fake traces addresses only".into()));
        };
        let service = (dest == addr("10.96.0.10:80")).then(|| TraceServiceView {
            name: "default/web".into(),
            vip: dest,
            target_port: 8080,
        });
        Ok(TraceView {
            pod: pod.clone(),
            dest,
            captured: dest.port() != 22,
            program: Some("ferry_connect4".into()),
            reason: if dest.port() == 22 { "port 22 is excluded" } else { "not excluded" }.into(),
            endpoint: service.as_ref().map(|_| TraceEndpointView {
                pod: Some("default/web-1".into()),
                address: addr("10.0.1.7:8080"),
                node: Some("node-b".into()),
            }),
            service,
            source_identity: Some(CLIENT_ID.into()),
            destination_identity: Some(WEB_ID.into()),
            transport: Some(Transport::Hbone),
            destination_mode: Some(ModeView::Strict),
            allowed: Some(true),
            decision: Some("allow".into()),
            policy: Some("default/allow-client".into()),
            rule: Some(0),
            decision_reason: Some("allowed by policy default/allow-client rule 0".into()),
            dry_run: None,
            request: None,
            policies: vec![],
            notes: vec![],
        })
    }
}

/// An admin server on a socket in a temp dir, stopped when dropped.
pub(crate) struct RunningAdmin {
    /// The fake behind the server.
    pub state: Arc<FakeState>,
    /// The socket path.
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl RunningAdmin {
    /// Binds `DIR/run/admin.sock` (the parent made by bind) and serves a fresh fake.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run").join("admin.sock");
        let state = Arc::new(FakeState::default());
        state.ready.store(true, Ordering::Relaxed);
        let server = AdminServer::bind(&socket).await.expect("bind admin socket");
        let (stop, stopped) = oneshot::channel();
        let shared: Arc<dyn AdminState> = state.clone();
        let task = tokio::spawn(server.serve(shared, async {
            let _ = stopped.await;
        }));
        Self { state, socket, stop: Some(stop), task: Some(task), _dir: dir }
    }

    /// The temp dir holding the socket's parent.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}
