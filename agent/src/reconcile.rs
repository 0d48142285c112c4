//! The node's live state and how a mesh file is applied to it: enroll pods that appeared, unenroll
//! pods that left, re-enroll pods that changed, and swap in the new routes, without touching pods
//! whose entry did not change.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde_json::json;

use crate::{
    bpf::Datapath,
    config::Pod,
    enroll::{EnrollError, Enrollment},
    proxy::{MeshState, ProxyShared, mtls::MtlsError},
    sources::Desired,
};

/// Why a mesh file could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A setting that only takes effect at start-up changed.
    #[error("changing {0} requires restarting the agent")]
    NeedsRestart(&'static str),
    /// Identities for new pods could not be issued.
    #[error("workload identities")]
    Identities(#[source] MtlsError),
    /// A pod could not be enrolled (only fatal at start-up).
    #[error("enrolling pods")]
    Enroll(#[source] EnrollError),
}

/// What an apply changed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ApplyReport {
    /// Pods newly enrolled.
    pub enrolled: Vec<String>,
    /// Pods unenrolled.
    pub unenrolled: Vec<String>,
    /// Pods re-enrolled because their entry changed.
    pub reenrolled: Vec<String>,
    /// Pods that failed to enroll (name, error).
    pub failed: Vec<(String, String)>,
    /// Policies now in force.
    pub policies: usize,
    /// Live connections closed because the new policies deny them.
    pub closed_by_policy: usize,
}

/// The agent's live state: programs, proxy state and enrolled pods.
pub struct NodeState {
    /// The loaded kernel programs and maps; `None` with iptables capture, which loads none.
    pub datapath: Option<Mutex<Datapath>>,
    /// What the proxy tasks share.
    pub shared: Arc<ProxyShared>,
    enrolled: tokio::sync::Mutex<BTreeMap<String, (Pod, Enrollment)>>,
}

impl NodeState {
    /// Wraps freshly loaded programs (if any) and proxy state; nothing is enrolled yet.
    pub fn new(datapath: Option<Datapath>, shared: Arc<ProxyShared>) -> Self {
        Self { datapath: datapath.map(Mutex::new), shared, enrolled: Default::default() }
    }

    /// Enrolls every local pod of the current config; any failure undoes everything and fails.
    pub async fn enroll_all(&self) -> Result<usize, ApplyError> {
        let config = self.shared.state().config.clone();
        let mut enrolled = self.enrolled.lock().await;
        for pod in config.local_pods() {
            match self.enroll(pod).await {
                Ok(e) => {
                    enrolled.insert(pod.key(), (pod.clone(), e));
                }
                Err(err) => {
                    for (_, (_, e)) in std::mem::take(&mut *enrolled) {
                        e.unenroll();
                    }
                    return Err(ApplyError::Enroll(err));
                }
            }
        }
        Ok(enrolled.len())
    }

    /// Applies a new, already validated desired state (mesh and policies). Pods whose entry is
    /// unchanged are not touched, so their connections go on, unless the new policies deny them;
    /// a pod that fails to enroll is reported and the rest still apply.
    pub async fn apply(&self, desired: Desired) -> Result<ApplyReport, ApplyError> {
        let Desired { config, policies } = desired;
        let current = self.shared.state();
        let old = &current.config;
        for (what, same) in [
            ("node", old.node == config.node),
            ("trust_domain", old.trust_domain == config.trust_domain),
            ("capture", old.capture == config.capture),
            ("ca", old.ca == config.ca),
        ] {
            if !same {
                return Err(ApplyError::NeedsRestart(what));
            }
        }
        if let Some(mtls) = &self.shared.mtls {
            mtls.sync_identities(&config).map_err(ApplyError::Identities)?;
        }
        let wanted: BTreeMap<String, Pod> = config.local_pods().map(|p| (p.key(), p.clone())).collect();
        let mut report = ApplyReport { policies: policies.len(), ..Default::default() };
        self.shared.set_state(MeshState::new(config, Ok(policies)));
        // Decisions must not go stale on long-lived connections (ztunnel#311): re-check them all.
        report.closed_by_policy = self.shared.recheck_connections();

        let mut enrolled = self.enrolled.lock().await;
        let stale: Vec<String> = enrolled
            .iter()
            .filter(|(k, (pod, _))| wanted.get(*k) != Some(pod))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some((_, e)) = enrolled.remove(&key) {
                e.unenroll();
                if wanted.contains_key(&key) {
                    report.reenrolled.push(key);
                } else {
                    report.unenrolled.push(key);
                }
            }
        }
        for (key, pod) in wanted {
            if enrolled.contains_key(&key) {
                continue;
            }
            match self.enroll(&pod).await {
                Ok(e) => {
                    if !report.reenrolled.contains(&key) {
                        report.enrolled.push(key.clone());
                    }
                    enrolled.insert(key, (pod, e));
                }
                Err(err) => report.failed.push((key, format!("{:#}", anyhow::Error::new(err)))),
            }
        }
        Ok(report)
    }

    /// Unenrolls everything (detaching programs and closing listeners).
    pub async fn shutdown(&self) {
        for (_, (_, e)) in std::mem::take(&mut *self.enrolled.lock().await) {
            e.unenroll();
        }
    }

    /// Runs `f` over the enrolled pods from a blocking thread (the admin API and metrics scrapes
    /// call in from blocking threads; never call this from async code).
    pub fn with_enrolled_blocking<T>(&self, f: impl FnOnce(&BTreeMap<String, (Pod, Enrollment)>) -> T) -> T {
        f(&self.enrolled.blocking_lock())
    }

    async fn enroll(&self, pod: &Pod) -> Result<Enrollment, EnrollError> {
        let e = Enrollment::enroll(pod, self.datapath.as_ref(), self.shared.clone()).await?;
        tracing::info!(pod = %e.key, "enrolled");
        self.shared.events.emit(json!({
            "event": "enrolled", "pod": e.key, "cgroup": e.cgroup, "netns_cookie": e.netns_cookie(),
            "links": e.link_ids().iter().map(|(p, id)| json!({"program": p, "id": id})).collect::<Vec<_>>(),
        }));
        Ok(e)
    }
}
