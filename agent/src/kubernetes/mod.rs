//! The Kubernetes source: `ferry run --kubernetes`. kube-rs reflectors (list, then watch, relisting
//! on 410 Gone, with backoff) keep caches of this node's Pods (field selector `spec.nodeName`), the
//! cluster's Pods (identities and addresses of remote endpoints), Namespaces, Services,
//! EndpointSlices and, when installed, Istio's AuthorizationPolicy and PeerAuthentication. Every
//! change turns the caches into a mesh file (the agent's settings file plus `[[pods]]` and
//! `[[services]]`, see [`translate`]) that goes through the same parse, validation and apply as the
//! standalone source: one reconcile path for both. An AuthorizationPolicy that does not compile
//! denies everything it selects until it is fixed (fail closed), without holding up the rest.
//!
//! The API server going away leaves the caches, and so the node's state, as they were; the
//! reflectors reconnect with backoff and catch up.

pub mod translate;

use std::{fmt::Debug, hash::Hash, path::Path, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Lookup, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    config::{ConfigError, MeshConfig},
    sources::Desired,
};
pub use translate::{Left, Snapshot};

/// How long changes are gathered before one apply: a rollout touches many objects at once.
const SETTLE: Duration = Duration::from_millis(200);

/// Why the Kubernetes source could not start or a change could not be turned into a mesh.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The settings file is unreadable or not TOML.
    #[error("reading the settings file {path}: {message}")]
    Settings {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// No in-cluster service account and no kubeconfig.
    #[error("connecting to the Kubernetes API")]
    Client(#[source] kube::Error),
    /// The cluster's objects make an invalid mesh (the message names the object).
    #[error(transparent)]
    Mesh(#[from] ConfigError),
}

/// The running reflectors and what turns their caches into desired states.
pub struct KubeSource {
    base: toml::Table,
    node: String,
    stores: Stores,
    changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
    synced: bool,
}

struct Stores {
    /// This node's pods (field selector `spec.nodeName`): the ones to enroll.
    local: Store<Pod>,
    /// Every pod, for the identities and addresses of endpoints on other nodes.
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    authorization: Option<Store<DynamicObject>>,
    peer_authentication: Option<Store<DynamicObject>>,
}

impl KubeSource {
    /// Reads the settings file at `settings` (a mesh file without pods or services; `node` is
    /// replaced by `node`), connects with the in-cluster service account or the kubeconfig
    /// (`KUBECONFIG`, `~/.kube/config`), and starts the reflectors.
    pub async fn start(settings: &Path, node: &str) -> Result<Self, KubeError> {
        let base = read_settings(settings)?;
        let client = Client::try_default().await.map_err(KubeError::Client)?;
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let local = reflect(Api::<Pod>::all(client.clone()), on_node, &changed, &mut tasks);
        let pods = reflect(Api::<Pod>::all(client.clone()), Default::default(), &changed, &mut tasks);
        let namespaces =
            reflect(Api::<Namespace>::all(client.clone()), Default::default(), &changed, &mut tasks);
        let services = reflect(Api::<Service>::all(client.clone()), Default::default(), &changed, &mut tasks);
        let slices =
            reflect(Api::<EndpointSlice>::all(client.clone()), Default::default(), &changed, &mut tasks);
        let authorization = istio(&client, "AuthorizationPolicy", &changed, &mut tasks).await;
        let peer_authentication = istio(&client, "PeerAuthentication", &changed, &mut tasks).await;
        let stores = Stores { local, pods, namespaces, services, slices, authorization, peer_authentication };
        Ok(Self { base, node: node.to_owned(), stores, changed, tasks, synced: false })
    }

    /// The node's settings without any pod: what the agent starts with before the first sync.
    pub fn initial(&self) -> Result<MeshConfig, KubeError> {
        let (table, _) = translate::mesh(&self.base, &self.node, &Snapshot::default());
        Ok(MeshConfig::parse(&toml_text(&table))?)
    }

    /// Waits for the caches to be filled (the first call) or for a change, then returns the
    /// desired state, or why the cluster's objects could not make one.
    pub async fn next(&mut self) -> (Result<Desired, KubeError>, Vec<(String, Left)>) {
        if self.synced {
            self.changed.notified().await;
        } else {
            self.wait_until_ready().await;
            self.synced = true;
        }
        // Let a burst of changes settle into one apply.
        tokio::time::sleep(SETTLE).await;
        let snapshot = self.snapshot();
        let (table, left) = translate::mesh(&self.base, &self.node, &snapshot);
        let (policies, errors) = translate::policies(&snapshot);
        for e in &errors {
            let error = format!("{:#}", anyhow::Error::new(e.clone()));
            tracing::error!(%error, "AuthorizationPolicy rejected: it denies everything it selects until fixed");
        }
        let desired = MeshConfig::parse(&toml_text(&table))
            .map_err(KubeError::from)
            .map(|config| Desired { config, policies });
        (desired, left)
    }

    async fn wait_until_ready(&self) {
        let s = &self.stores;
        let _ = s.local.wait_until_ready().await;
        let _ = s.pods.wait_until_ready().await;
        let _ = s.namespaces.wait_until_ready().await;
        let _ = s.services.wait_until_ready().await;
        let _ = s.slices.wait_until_ready().await;
        for store in [&s.authorization, &s.peer_authentication].into_iter().flatten() {
            let _ = store.wait_until_ready().await;
        }
    }

    fn snapshot(&self) -> Snapshot {
        let s = &self.stores;
        // This node's pods from the field-selected watch (current even if the cluster-wide one
        // lags), the rest from the cluster-wide one.
        let local = s.local.state();
        let node = self.node.as_str();
        let remote = s
            .pods
            .state()
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) != Some(node));
        Snapshot {
            pods: local.into_iter().chain(remote).collect(),
            namespaces: s.namespaces.state(),
            services: s.services.state(),
            slices: s.slices.state(),
            authorization: s.authorization.as_ref().map(Store::state),
            peer_authentication: s.peer_authentication.as_ref().map(Store::state),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A reflector over `api`: its cache, kept by a task that wakes `changed` on every event.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Lookup + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K as Lookup>::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (reader, writer) = reflector::store();
    spawn_stream(reflector::reflector(writer, watcher(api, config).default_backoff()), changed, tasks);
    reader
}

fn spawn_stream<S, T, E>(stream: S, changed: &Arc<Notify>, tasks: &mut Vec<JoinHandle<()>>)
where
    S: futures::Stream<Item = Result<T, E>> + Send + 'static,
    T: Send,
    E: std::fmt::Display + Send,
{
    let changed = changed.clone();
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                // The backoff retries; the cache keeps what it had meanwhile.
                Err(e) => tracing::warn!(error = %e, "Kubernetes watch failed; retrying"),
            }
        }
    }));
}

/// A reflector over one of Istio's `security.istio.io/v1` kinds, or `None` (said once) when the
/// cluster does not have the CRD: Ferry then runs without it.
async fn istio(
    client: &Client,
    kind: &str,
    changed: &Arc<Notify>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Option<Store<DynamicObject>> {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", kind);
    let resource = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    match api.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(status)) if status.code == 404 => {
            tracing::warn!(kind, "Istio's CRD is not installed: running without it");
            return None;
        }
        // Unreachable for now: the watcher's backoff keeps trying.
        _ => {}
    }
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, Default::default()).default_backoff());
    spawn_stream(stream, changed, tasks);
    Some(reader)
}

fn read_settings(path: &Path) -> Result<toml::Table, KubeError> {
    let fail = |message: String| KubeError::Settings { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| fail(e.to_string()))?;
    for key in ["pods", "services"] {
        if table.contains_key(key) {
            return Err(fail(format!("`{key}` comes from the Kubernetes API with --kubernetes; remove it")));
        }
    }
    Ok(table)
}

fn toml_text(table: &toml::Table) -> String {
    // A table of strings, numbers, arrays and tables always serializes.
    toml::to_string(table).unwrap_or_default()
}
