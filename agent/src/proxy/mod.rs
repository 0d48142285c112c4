//! The node proxy: per-pod listeners, the outbound and inbound paths, and what they share.

mod accept;
pub mod authorize;
pub mod balance;
pub mod conns;
pub mod deliver;
pub mod inbound;
pub mod mtls;
pub mod orig_dst;
pub mod outbound;
pub mod relay;
pub mod routes;
pub mod shortcut;
pub mod sockets;
pub mod tunnel;

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    config::{MeshConfig, Mode},
    enroll::{
        netns::PodNetns,
        transparent::{Transparency, TransparencyRegistry},
    },
    events::EventSink,
    identity::SpiffeId,
    metrics::Metrics,
    policy::{Authorizer, Origin, Policy, WorkloadRef},
};
pub(crate) use accept::accept_loop;
use conns::ConnTable;
use mtls::Mtls;
use orig_dst::OrigDst;
use routes::Routes;

/// The proxy's own ports; connections aimed at them directly are refused, never forwarded.
#[derive(Clone, Copy, Debug)]
pub struct ProxyPorts {
    /// In-pod outbound listener (loopback).
    pub outbound: u16,
    /// In-pod inbound plaintext listener.
    pub inbound: u16,
    /// HBONE tunnel listener.
    pub tunnel: u16,
}

impl ProxyPorts {
    /// Whether `port` is one of the proxy's own ports.
    pub fn contains(&self, port: u16) -> bool {
        port == self.outbound || port == self.inbound || port == self.tunnel
    }
}

/// The mesh as the proxy sees it: config plus the routing table and the policy index built from it.
#[derive(Debug)]
pub struct MeshState {
    /// The validated mesh file.
    pub config: MeshConfig,
    /// Outbound routing built from `config`.
    pub routes: Routes,
    /// Authorization policies indexed for the pods of `config`.
    pub authz: Authorizer,
}

impl MeshState {
    /// Builds the state from a config and its policies; policies that failed to load (`Err`, the
    /// reason) deny every inbound connection until a valid set is applied.
    pub fn new(config: MeshConfig, policies: Result<Vec<(Policy, Origin)>, String>) -> Self {
        let routes = Routes::build(&config);
        let authz = match policies {
            Ok(policies) => {
                let keys: Vec<String> = config.pods.iter().map(|p| p.key()).collect();
                let workloads = config.pods.iter().zip(&keys).map(|(p, key)| WorkloadRef {
                    key,
                    namespace: &p.namespace,
                    labels: &p.labels,
                });
                Authorizer::new(policies, &config.root_namespace, workloads)
            }
            Err(error) => Authorizer::failed(error),
        };
        Self { config, routes, authz }
    }
}

/// What every pod's proxy tasks share.
pub struct ProxyShared {
    /// How original destinations are recovered (eBPF map or `SO_ORIGINAL_DST`).
    pub orig_dst: OrigDst,
    /// Event sink (access log).
    pub events: EventSink,
    /// The proxy's own ports.
    pub ports: ProxyPorts,
    /// Identities and the tunnel pool; `None` when the mesh file names no CA (plaintext only).
    pub mtls: Option<Mtls>,
    /// One line per connection, for operators.
    pub access_log: EventSink,
    /// Prometheus families.
    pub metrics: Arc<Metrics>,
    /// Connections being relayed.
    pub conns: ConnTable,
    /// Pod netns with transparent inbound installed.
    pub transparency: TransparencyRegistry,
    /// Handing relays over to the next agent.
    pub handoff: Arc<crate::handoff::Hub>,
    state: RwLock<Arc<MeshState>>,
    /// Enrolled pods by key, for the node-local shortcut. Weak: each context holds this struct.
    local_pods: RwLock<HashMap<String, Weak<PodContext>>>,
    next_conn_id: AtomicU64,
}

impl ProxyShared {
    /// Creates the shared state.
    pub fn new(
        orig_dst: OrigDst,
        sinks: Sinks,
        ports: ProxyPorts,
        mtls: Option<Mtls>,
        state: MeshState,
    ) -> Self {
        Self {
            orig_dst,
            events: sinks.events,
            access_log: sinks.access_log,
            metrics: sinks.metrics,
            conns: ConnTable::default(),
            transparency: TransparencyRegistry::default(),
            handoff: Arc::default(),
            ports,
            mtls,
            state: RwLock::new(Arc::new(state)),
            local_pods: RwLock::default(),
            next_conn_id: AtomicU64::new(1),
        }
    }

    /// The current mesh state (cheap: one Arc clone).
    pub fn state(&self) -> Arc<MeshState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the mesh state; connections already routed keep what they picked.
    pub fn set_state(&self, state: MeshState) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
    }

    /// Makes an enrolled pod reachable by the node-local shortcut.
    pub(crate) fn register_pod(&self, pod: &Arc<PodContext>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        pods.insert(pod.key.clone(), Arc::downgrade(pod));
    }

    /// Forgets `pod`, unless its key already names a newer enrollment.
    pub(crate) fn unregister_pod(&self, pod: &Arc<PodContext>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        if pods.get(&pod.key).is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(pod))) {
            pods.remove(&pod.key);
        }
    }

    /// The enrolled pod `key` ("namespace/name"), if it is enrolled on this node.
    pub(crate) fn local_pod(&self, key: &str) -> Option<Arc<PodContext>> {
        self.local_pods.read().unwrap_or_else(|p| p.into_inner()).get(key)?.upgrade()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where the proxy reports what it does.
pub struct Sinks {
    /// Machine-readable events (tests, the demo).
    pub events: EventSink,
    /// The access log.
    pub access_log: EventSink,
    /// Prometheus families.
    pub metrics: Arc<Metrics>,
}

/// One enrolled pod as its proxy tasks see it.
pub struct PodContext {
    /// "namespace/name".
    pub key: String,
    /// The pod's name.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's netns worker.
    pub netns: PodNetns,
    /// The pod's SPIFFE identity, when the node has a CA.
    pub identity: Option<SpiffeId>,
    /// STRICT refuses plaintext inbound; PERMISSIVE accepts and records it.
    pub mode: Mode,
    /// The pod's own addresses: the only tunnel targets it accepts.
    pub ips: Vec<std::net::IpAddr>,
    /// Transparent inbound in the pod's netns: the app sees each client's real address. Held by
    /// every connection of the pod through this context, so its routing outlives none of them.
    pub transparency: Option<Arc<Transparency>>,
    /// Why the app sees the proxy on loopback instead, when it does.
    pub source_note: Option<String>,
    /// Shared proxy state.
    pub shared: Arc<ProxyShared>,
}
