//! What the admin API and the metrics endpoint show: the daemon's side of [`AdminState`] and of the
//! eBPF counter hook, read from the live node state.

mod policies;
mod trace;

use std::{path::PathBuf, sync::Arc, time::Instant};

use rustls::pki_types::UnixTime;

use crate::{
    admin::{
        AdminState, StateError, TraceDest, TraceSource,
        log_level::LogControl,
        model::{
            BpfLinkView, BpfMapView, BpfPodView, BpfProgramView, BpfView, CertState, CertView,
            ConnectionView, EndpointView, ModeView, PolicyView, ServicePortView, ServiceView, StatusView,
            Timestamp, TraceView, WorkloadView,
        },
    },
    config::CaptureMode,
    metrics::{BpfRedirects, RedirectDirection},
    reconcile::NodeState,
};

/// The daemon's answers to the admin API.
pub struct Introspect {
    node: Arc<NodeState>,
    log: Option<LogControl>,
    started: Instant,
    config_path: PathBuf,
}

impl Introspect {
    /// Reads from `node`; `log` changes the log filter at run time.
    pub fn new(node: Arc<NodeState>, log: Option<LogControl>, config_path: PathBuf) -> Self {
        Self { node, log, started: Instant::now(), config_path }
    }

    /// Per-pod redirect counters from the kernel, for `ferry_bpf_redirects_total`.
    /// None with iptables capture: no program redirects anything.
    pub fn bpf_redirects(node: &NodeState) -> Vec<BpfRedirects> {
        let Some(datapath) = &node.datapath else { return Vec::new() };
        let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
        node.with_enrolled_blocking(|enrolled| {
            let mut rows = Vec::new();
            for (key, (_, e)) in enrolled {
                rows.push(BpfRedirects {
                    direction: RedirectDirection::Outbound,
                    pod: key.clone(),
                    value: e.cgroup_id.map_or(0, |id| dp.pod_outbound_redirects(id)),
                });
                let inbound = e.steered().ips.iter().map(|ip| dp.inbound_steers(*ip)).sum();
                rows.push(BpfRedirects {
                    direction: RedirectDirection::Inbound,
                    pod: key.clone(),
                    value: inbound,
                });
            }
            rows
        })
    }
}

impl AdminState for Introspect {
    fn status(&self) -> StatusView {
        let state = self.node.shared.state();
        let enrolled = self.node.with_enrolled_blocking(|e| e.len() as u64);
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: option_env!("FERRY_GIT_COMMIT").map(str::to_owned),
            node: state.config.node.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            pods_enrolled: enrolled,
            ready: self.ready(),
            active_connections: self.node.shared.conns.len() as u64,
            log_level: self.log.as_ref().and_then(|l| l.current()),
            policies: state.authz.policies().len() as u64,
            policy_error: state.authz.failure().map(str::to_owned),
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        // The file as the agent read it, as JSON: what is running, not what is on disk now.
        let text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        let parsed: serde_json::Value = toml::from_str::<toml::Value>(&text)
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({ "mesh_file": self.config_path, "mesh": parsed })
    }

    fn workloads(&self) -> Vec<WorkloadView> {
        let state = self.node.shared.state();
        let mtls = self.node.shared.mtls.as_ref();
        let waiting = self.node.waiting();
        self.node.with_enrolled_blocking(|enrolled| {
            state
                .config
                .local_pods()
                .map(|pod| {
                    let e = enrolled.get(&pod.key()).map(|(_, e)| e);
                    WorkloadView {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        ips: pod.ips().collect(),
                        mode: ModeView::from(pod.mode),
                        identity: mtls.and_then(|m| m.identity_of(pod).ok()).map(|i| i.to_string()),
                        programs: e
                            .map(|e| e.link_ids().iter().map(|(p, _)| p.to_string()).collect())
                            .unwrap_or_default(),
                        enrolled: e.is_some(),
                        // Where the agent found it, for a pod given by UID.
                        netns: e
                            .map(|e| e.netns_path().to_path_buf())
                            .or_else(|| pod.netns.clone())
                            .map(|p| p.display().to_string()),
                        cgroup: e
                            .and_then(|e| e.cgroup.clone())
                            .or_else(|| pod.cgroup.clone())
                            .map(|p| p.display().to_string()),
                        uid: pod.uid.clone(),
                        node: Some(pod.node.clone()),
                        steered_ips: e.map(|e| e.steered().ips.into_iter().collect()).unwrap_or_default(),
                        unsteered: e
                            .map(|e| {
                                e.steered()
                                    .refused
                                    .into_iter()
                                    .map(|(ip, why)| format!("{ip}: {why}"))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        app_source: e
                            .map(|e| if e.source_note().is_none() { "client" } else { "loopback" }.into()),
                        app_source_note: e.and_then(|e| e.source_note().map(str::to_owned)),
                        waiting: waiting
                            .get(&pod.key())
                            .map(|w| format!("attempt {} failed: {}", w.attempts, w.reason)),
                    }
                })
                .collect()
        })
    }

    fn services(&self) -> Vec<ServiceView> {
        let state = self.node.shared.state();
        let active = self.node.shared.conns.per_endpoint_pod();
        state
            .config
            .services
            .iter()
            .map(|svc| ServiceView {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                vips: svc.vips.clone(),
                ports: svc
                    .ports
                    .iter()
                    .map(|p| ServicePortView { port: p.port, target_port: p.target_port })
                    .collect(),
                endpoints: svc
                    .endpoints
                    .iter()
                    .filter_map(|&i| state.config.pods.get(i))
                    .map(|p| EndpointView {
                        pod: p.key(),
                        ips: p.ips().collect(),
                        active_connections: active.get(&p.key()).copied().unwrap_or(0),
                    })
                    .collect(),
            })
            .collect()
    }

    fn certs(&self) -> Vec<CertView> {
        let Some(mtls) = &self.node.shared.mtls else { return Vec::new() };
        let state = self.node.shared.state();
        let now = UnixTime::now();
        mtls.store
            .status()
            .into_iter()
            .filter_map(|status| {
                let key = mtls.store.get(&status.id, now).ok();
                let (serial, not_before, not_after) = key
                    .as_ref()
                    .and_then(|k| k.cert.first())
                    .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
                    .map(|(_, c)| {
                        (
                            c.raw_serial_as_string(),
                            c.validity().not_before.timestamp(),
                            c.validity().not_after.timestamp(),
                        )
                    })?;
                let expired = now.as_secs() as i64 >= not_after;
                let renewing = status.failures > 0 || status.next_attempt.as_secs() <= now.as_secs();
                Some(CertView {
                    identity: status.id.to_string(),
                    serial,
                    not_before: Timestamp::from_unix_seconds(not_before),
                    not_after: Timestamp::from_unix_seconds(not_after),
                    next_renewal: Some(Timestamp::from_unix_seconds(status.next_attempt.as_secs() as i64)),
                    state: if expired {
                        CertState::Expired
                    } else if renewing {
                        CertState::Renewing
                    } else {
                        CertState::Valid
                    },
                    pods: state
                        .config
                        .local_pods()
                        .filter(|p| mtls.identity_of(p).ok().as_ref() == Some(&status.id))
                        .map(|p| p.key())
                        .collect(),
                })
            })
            .collect()
    }

    fn connections(&self) -> Vec<ConnectionView> {
        self.node.shared.conns.views()
    }

    fn bpf(&self) -> Result<BpfView, StateError> {
        let Some(datapath) = &self.node.datapath else {
            // A sidecar behind iptables rules: nothing in the kernel belongs to this agent.
            return Ok(BpfView { capture: CaptureMode::Iptables.to_string(), ..Default::default() });
        };
        let redirects = Self::bpf_redirects(&self.node);
        let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
        let programs = dp
            .program_ids()
            .into_iter()
            .map(|(name, id)| {
                let kind = match name.as_str() {
                    "ferry_connect4" => "cgroup/connect4",
                    "ferry_connect6" => "cgroup/connect6",
                    "ferry_sockops" => "sockops",
                    "ferry_getpeername4" => "cgroup/getpeername4",
                    "ferry_getpeername6" => "cgroup/getpeername6",
                    "ferry_probe_connect4" => "cgroup/connect4 (probes)",
                    "ferry_probe_connect6" => "cgroup/connect6 (probes)",
                    _ => "sk_lookup",
                };
                BpfProgramView { name, id, kind: Some(kind.to_owned()) }
            })
            .collect();
        let counters = dp.counters();
        let names = [
            "outbound_redirected",
            "outbound_bypassed",
            "tuple_recorded",
            "inbound_steered",
            "inbound_no_listener",
            "tunnel_steered",
            "tunnel_no_listener",
            "peer_rewritten",
            "node_passed",
            "probe_bound",
        ];
        drop(dp);
        let pods = self.node.with_enrolled_blocking(|enrolled| {
            enrolled
                .iter()
                .map(|(key, (_, e))| {
                    let count = |d: RedirectDirection| {
                        redirects.iter().filter(|r| &r.pod == key && r.direction == d).map(|r| r.value).sum()
                    };
                    BpfPodView {
                        pod: key.clone(),
                        cgroup: e.cgroup.as_ref().map(|c| c.display().to_string()),
                        links: e
                            .link_ids()
                            .iter()
                            .map(|(p, id)| BpfLinkView { program: p.to_string(), id: *id })
                            .collect(),
                        outbound_redirects: count(RedirectDirection::Outbound),
                        inbound_steers: count(RedirectDirection::Inbound),
                    }
                })
                .collect::<Vec<_>>()
        });
        let listeners: u64 = pods.len() as u64;
        Ok(BpfView {
            capture: CaptureMode::Ebpf.to_string(),
            programs,
            maps: vec![BpfMapView {
                name: ferry_common::maps::INBOUND_LISTENERS.to_owned(),
                entries: self
                    .node
                    .with_enrolled_blocking(|e| e.values().map(|(_, e)| e.steered().ips.len() as u64).sum()),
                max_entries: Some(4096),
            }],
            pods,
            counters: names
                .iter()
                .zip(counters)
                .map(|(n, v)| ((*n).to_owned(), v))
                .chain([("enrolled_pods".to_owned(), listeners)])
                .collect(),
        })
    }

    fn ready(&self) -> bool {
        if !self.node.synced() {
            return false;
        }
        let state = self.node.shared.state();
        let wanted = state.config.local_pods().count();
        self.node.with_enrolled_blocking(|e| e.len() == wanted)
    }

    fn set_log_level(&self, directive: &str) -> Result<(), StateError> {
        match &self.log {
            Some(log) => log.set(directive).map_err(Into::into),
            None => Err(StateError::Failed("logging is not reloadable in this process".into())),
        }
    }

    fn policies(&self) -> Result<Vec<PolicyView>, StateError> {
        policies::views(&self.node.shared.state().authz)
    }

    fn trace(
        &self,
        src: &TraceSource,
        dest: &TraceDest,
        request: Option<&crate::admin::TraceRequest>,
    ) -> Result<TraceView, StateError> {
        trace::trace(&self.node, src, dest, request)
    }
}
