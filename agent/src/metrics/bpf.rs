//! `ferry_bpf_redirects_total{direction, pod}`: kernel counters, read when Prometheus scrapes
//! rather than copied into user space on a timer.

use std::sync::{Arc, RwLock};

use prometheus::{
    IntCounterVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::MetricsError;

/// The family name.
pub(super) const FAMILY: &str = "ferry_bpf_redirects_total";
const HELP: &str = "Connections the eBPF programs sent to the proxy, by pod and direction.";
const LABELS: [&str; 2] = ["direction", "pod"];

/// Which program redirected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedirectDirection {
    /// connect4/connect6 rewrote an outbound connect.
    Outbound,
    /// sk_lookup steered an inbound SYN.
    Inbound,
}

impl RedirectDirection {
    fn as_str(self) -> &'static str {
        match self {
            RedirectDirection::Outbound => "outbound",
            RedirectDirection::Inbound => "inbound",
        }
    }
}

/// One counter row read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfRedirects {
    /// Which way.
    pub direction: RedirectDirection,
    /// "namespace/name" of the pod.
    pub pod: String,
    /// The kernel's running total (summed over CPUs).
    pub value: u64,
}

/// Reads the kernel counters; called on every scrape, on a blocking thread.
pub trait BpfCounterSource: Send + Sync + 'static {
    /// Current totals; rows with the same direction and pod are added together.
    fn redirects(&self) -> Vec<BpfRedirects>;
}

impl<F> BpfCounterSource for F
where
    F: Fn() -> Vec<BpfRedirects> + Send + Sync + 'static,
{
    fn redirects(&self) -> Vec<BpfRedirects> {
        self()
    }
}

/// Builds the family from the source at collect time.
pub(super) struct BpfCollector {
    template: IntCounterVec,
    source: RwLock<Option<Arc<dyn BpfCounterSource>>>,
}

impl BpfCollector {
    pub(super) fn new() -> Result<Self, MetricsError> {
        let template = family().map_err(|source| MetricsError::Register { name: FAMILY, source })?;
        Ok(Self { template, source: RwLock::new(None) })
    }

    pub(super) fn set_source(&self, source: Arc<dyn BpfCounterSource>) {
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }
}

fn family() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(FAMILY, HELP), &LABELS)
}

/// The registry owns its collectors; this shares ours with [`super::Metrics`].
pub(super) struct Registered(pub(super) Arc<BpfCollector>);

impl Collector for Registered {
    fn desc(&self) -> Vec<&Desc> {
        self.0.template.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let source = self.0.source.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(source) = source else { return Vec::new() };
        // A fresh family each scrape: pods that left disappear instead of freezing at their last value.
        let Ok(fresh) = family() else { return Vec::new() };
        for row in source.redirects() {
            fresh.with_label_values(&[row.direction.as_str(), row.pod.as_str()]).inc_by(row.value);
        }
        fresh.collect()
    }
}
