//! The node's live state and how a mesh file is applied to it: enroll pods that appeared, unenroll
//! pods that left, re-enroll pods that changed, and swap in the new routes, without touching pods
//! whose entry did not change.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    bpf::Datapath,
    config::Pod,
    enroll::{EnrollError, Enrollment, discover::Host},
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
}

/// First retry of a pod that failed to enroll; doubled per failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts at one pod.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A pod that should be enrolled and is not, yet.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The last attempt's error.
    pub reason: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next: Instant,
}

impl Waiting {
    fn after(previous: Option<&Waiting>, reason: String) -> Self {
        let attempts = previous.map_or(1, |w| w.attempts.saturating_add(1));
        let backoff = RETRY_FIRST.saturating_mul(1 << (attempts - 1).min(6)).min(RETRY_MAX);
        Self { reason, attempts, next: Instant::now() + backoff }
    }
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
    /// Pods that should be enrolled but failed, retried with backoff; one never blocks the others.
    waiting: Mutex<BTreeMap<String, Waiting>>,
    /// Where pods given by UID are looked for; `None` when the node's cgroup2 root is unknown.
    host: Option<Host>,
    /// Whether the source has delivered its state once (the Kubernetes caches are listed).
    synced: std::sync::atomic::AtomicBool,
    /// Whether pins of pods that left while no agent ran may still be in bpffs.
    sweep_pending: std::sync::atomic::AtomicBool,
    /// Listeners the previous agent handed over, taken as the pods enroll.
    pub inherited: crate::handoff::Inherited,
}

impl NodeState {
    /// Wraps freshly loaded programs (if any), proxy state and where pods are found on the node;
    /// nothing is enrolled yet.
    pub fn new(datapath: Option<Datapath>, shared: Arc<ProxyShared>, host: Option<Host>) -> Self {
        Self {
            datapath: datapath.map(Mutex::new),
            shared,
            enrolled: Default::default(),
            waiting: Default::default(),
            host,
            synced: std::sync::atomic::AtomicBool::new(true),
            sweep_pending: std::sync::atomic::AtomicBool::new(true),
            inherited: Default::default(),
        }
    }

    /// Enrolls pods on the listeners the previous agent handed over, where they match.
    pub fn with_inherited(mut self, inherited: crate::handoff::Inherited) -> Self {
        self.inherited = inherited;
        self
    }

    /// Whether the source has delivered its state once; readiness waits for it.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records whether the source has delivered its state once.
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, std::sync::atomic::Ordering::Release);
    }

    /// Enrolls every local pod of the current config; a pod that fails waits for its retry and
    /// does not stop the others. Returns how many are enrolled.
    pub async fn enroll_all(&self) -> usize {
        let config = self.shared.state().config.clone();
        let mut enrolled = self.enrolled.lock().await;
        for pod in config.local_pods() {
            match self.enroll(pod).await {
                Ok(e) => {
                    enrolled.insert(pod.key(), (pod.clone(), e));
                }
                Err(err) => self.wait(&pod.key(), &err),
            }
        }
        self.sweep_departed(&enrolled);
        enrolled.len()
    }

    /// Unpins what an earlier agent left for pods that are gone, once the desired state is known
    /// and every pod in it is enrolled: a pod still waiting may be one of those pins' owners, and
    /// its pins keep it failing closed until it is served again.
    fn sweep_departed(&self, enrolled: &BTreeMap<String, (Pod, Enrollment)>) {
        use std::sync::atomic::Ordering;
        if !self.sweep_pending.load(Ordering::Acquire)
            || !self.synced()
            || !self.waiting.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
        {
            return;
        }
        self.sweep_pending.store(false, Ordering::Release);
        let Some(datapath) = &self.datapath else { return };
        let claimed = enrolled.values().filter_map(|(_, e)| e.pin_dir()).collect();
        let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
        let pods = dp.remove_unclaimed_pods(&claimed);
        let addresses = dp.steering().prune_unowned();
        if pods > 0 || addresses > 0 {
            tracing::info!(pods, addresses, "removed the pins of pods that left while no agent ran");
            self.shared
                .events
                .emit(json!({ "event": "departed_unpinned", "pods": pods, "addresses": addresses }));
        }
    }

    /// Retries the waiting pods whose backoff has passed.
    pub async fn retry_waiting(&self) {
        let due: Vec<String> = {
            let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            waiting.iter().filter(|(_, w)| w.next <= now).map(|(k, _)| k.clone()).collect()
        };
        if due.is_empty() {
            if self.sweep_pending.load(std::sync::atomic::Ordering::Acquire) {
                self.sweep_departed(&*self.enrolled.lock().await);
            }
            return;
        }
        let config = self.shared.state().config.clone();
        let mut enrolled = self.enrolled.lock().await;
        for key in due {
            let Some(pod) = config.local_pods().find(|p| p.key() == key) else {
                self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                continue;
            };
            if enrolled.contains_key(&key) {
                continue;
            }
            match self.enroll(pod).await {
                Ok(e) => {
                    enrolled.insert(key, (pod.clone(), e));
                }
                Err(err) => self.wait(&key, &err),
            }
        }
        self.sweep_departed(&enrolled);
    }

    /// The pods that should be enrolled and are not, with why.
    pub fn waiting(&self) -> BTreeMap<String, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a failed enrollment of `key` and schedules its retry.
    fn wait(&self, key: &str, err: &EnrollError) {
        let reason = error_chain(err);
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let next = Waiting::after(waiting.get(key), reason.clone());
        tracing::warn!(pod = %key, attempt = next.attempts, error = %reason, "pod not enrolled; retrying");
        self.shared.events.emit(json!({
            "event": "enroll_failed", "pod": key, "error": reason, "attempt": next.attempts,
        }));
        waiting.insert(key.to_owned(), next);
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
        // Labels, mode and declared ports are read from the config at each connection: a change
        // to them alone is applied in place. Re-enrolling would detach the programs for a moment,
        // a window in which plaintext could reach a STRICT app.
        for (key, (pod, _)) in enrolled.iter_mut() {
            if let Some(new) = wanted.get(key)
                && new != pod
                && same_placement(new, pod)
            {
                *pod = new.clone();
            }
        }
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
                Err(err) => {
                    report.failed.push((key.clone(), error_chain(&err)));
                    // A changed entry gets its first retry on the normal schedule.
                    self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    self.wait(&key, &err);
                }
            }
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|key, _| !enrolled.contains_key(key) && config_has(&self.shared, key));
        drop(waiting);
        self.sweep_departed(&enrolled);
        Ok(report)
    }

    /// Stops serving every pod but leaves the datapath pinned (programs attached, addresses
    /// steered to nothing): until the next agent serves them, the pods fail closed.
    pub async fn shutdown(&self) {
        for (_, (_, e)) in std::mem::take(&mut *self.enrolled.lock().await) {
            e.release();
        }
    }

    /// Each enrolled pod's listeners (duplicates), for the next agent.
    pub async fn listener_offer(
        &self,
    ) -> Vec<(String, u64, Vec<(std::net::SocketAddr, std::os::fd::OwnedFd)>)> {
        let enrolled = self.enrolled.lock().await;
        enrolled.iter().map(|(key, (_, e))| (key.clone(), e.netns_cookie(), e.listener_fds())).collect()
    }

    /// Runs `f` over the enrolled pods from a blocking thread (the admin API and metrics scrapes
    /// call in from blocking threads; never call this from async code).
    pub fn with_enrolled_blocking<T>(&self, f: impl FnOnce(&BTreeMap<String, (Pod, Enrollment)>) -> T) -> T {
        f(&self.enrolled.blocking_lock())
    }

    async fn enroll(&self, pod: &Pod) -> Result<Enrollment, EnrollError> {
        let e = Enrollment::enroll(
            pod,
            self.datapath.as_ref(),
            self.shared.clone(),
            self.host.as_ref(),
            &self.inherited,
        )
        .await?;
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&e.key);
        tracing::info!(pod = %e.key, adopted_links = e.adopted_links(), "enrolled");
        self.shared.events.emit(json!({
            "event": "enrolled", "pod": e.key, "cgroup": e.cgroup, "netns_cookie": e.netns_cookie(),
            "adopted_links": e.adopted_links(),
            "links": e.link_ids().iter().map(|(p, id)| json!({"program": p, "id": id})).collect::<Vec<_>>(),
        }));
        Ok(e)
    }
}

/// Whether two entries of one pod put it in the same place with the same identity: everything but
/// its labels, mode and declared ports (which the proxy reads from the config as it goes).
fn same_placement(a: &Pod, b: &Pod) -> bool {
    let strip = |p: &Pod| Pod {
        labels: Default::default(),
        mode: crate::config::Mode::Permissive,
        ports: Vec::new(),
        ..p.clone()
    };
    strip(a) == strip(b)
}

/// An error and its causes on one line.
fn error_chain(err: &EnrollError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether the current config still has local pod `key`.
fn config_has(shared: &ProxyShared, key: &str) -> bool {
    shared.state().config.local_pods().any(|p| p.key() == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_mode_and_ports_change_in_place_but_addresses_do_not() {
        let config = crate::config::MeshConfig::parse(
            "node = \"n\"\n[[pods]]\nname = \"a\"\nnamespace = \"d\"\nservice_account = \"s\"\n\
             netns = \"/n\"\ncgroup = \"/c\"\nips = [\"10.0.0.1\"]\n",
        )
        .expect("valid");
        let pod = config.pods[0].clone();
        let mut relabelled = pod.clone();
        relabelled.labels.insert("app".into(), "web".into());
        relabelled.mode = crate::config::Mode::Strict;
        assert!(same_placement(&pod, &relabelled));
        let mut moved = pod.clone();
        moved.ipv4 = Some("10.0.0.2".parse().expect("ip"));
        assert!(!same_placement(&pod, &moved));
        let mut renamed = pod.clone();
        renamed.service_account = "other".into();
        assert!(!same_placement(&pod, &renamed), "a new identity needs new listeners");
    }

    #[test]
    fn retries_back_off_from_one_second_to_a_minute() {
        let mut w: Option<Waiting> = None;
        let mut waits = Vec::new();
        for _ in 0..9 {
            let before = Instant::now();
            let next = Waiting::after(w.as_ref(), "no netns".into());
            waits.push((next.next - before).as_secs());
            w = Some(next);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(w.map(|w| w.attempts), Some(9));
    }
}
