//! The node's workload identities and the pooled HBONE client, present when the mesh file names a CA.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::UnixTime;

use crate::{
    config::{CaSettings, MeshConfig, Pod},
    hbone::{HbonePool, PoolSettings},
    identity::{IdentityStore, NodeCa, SpiffeId, StoreSettings, TrustDomain},
};

/// Why mTLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// The node CA directory is unusable.
    #[error("loading the node CA from {0}")]
    Ca(String, #[source] crate::identity::ca::CaError),
    /// The CA serves another trust domain than the mesh file.
    #[error("the node CA in {dir} is for trust domain {ca:?}, but the mesh file says {mesh:?}")]
    TrustDomain {
        /// The CA directory.
        dir: String,
        /// The CA's trust domain.
        ca: String,
        /// The mesh file's trust domain.
        mesh: String,
    },
    /// A pod's identity is not a valid SPIFFE ID.
    #[error("pod {0}: invalid identity")]
    Identity(String, #[source] crate::identity::SpiffeIdError),
    /// The first SVID for an identity could not be issued.
    #[error("issuing the SVID for {0}")]
    Issue(String, #[source] crate::identity::StoreError),
}

/// Identities and the tunnel client pool.
pub struct Mtls {
    /// SVIDs of the identities served on this node, renewed at half-life.
    pub store: Arc<IdentityStore>,
    /// Pooled HBONE connections per (source identity, tunnel).
    pub pool: HbonePool,
    trust_domain: TrustDomain,
}

impl Mtls {
    /// Loads the node CA and issues an SVID for every identity of the node's pods.
    pub fn start(ca: &CaSettings, config: &MeshConfig) -> Result<Self, MtlsError> {
        let dir = ca.dir.display().to_string();
        let node_ca =
            NodeCa::load(Path::new(&ca.dir), UnixTime::now()).map_err(|e| MtlsError::Ca(dir.clone(), e))?;
        let trust_domain = node_ca.trust_bundle().trust_domain().clone();
        if trust_domain.as_str() != config.trust_domain {
            return Err(MtlsError::TrustDomain {
                dir,
                ca: trust_domain.as_str().into(),
                mesh: config.trust_domain.clone(),
            });
        }
        let bundle = node_ca.trust_bundle().clone();
        let settings =
            StoreSettings { svid_ttl: Duration::from_secs(ca.svid_ttl_seconds), ..Default::default() };
        let store = Arc::new(IdentityStore::new(Arc::new(node_ca), bundle, settings));
        let mtls = Self { pool: HbonePool::new(store.clone(), PoolSettings::default()), store, trust_domain };
        mtls.sync_identities(config)?;
        mtls.store.spawn_renewal();
        Ok(mtls)
    }

    /// Issues SVIDs for identities of local pods that have none yet and drops identities no local
    /// pod uses any more, so the node holds exactly its pods' identities.
    pub fn sync_identities(&self, config: &MeshConfig) -> Result<(), MtlsError> {
        let mut wanted = Vec::new();
        for pod in config.local_pods() {
            let id = self.identity_of(pod)?;
            if !self.store.serves(&id) {
                self.store.add(&id, UnixTime::now()).map_err(|e| MtlsError::Issue(id.to_string(), e))?;
            }
            wanted.push(id);
        }
        for status in self.store.status() {
            if !wanted.contains(&status.id) {
                self.store.remove(&status.id);
            }
        }
        Ok(())
    }

    /// The SPIFFE ID a pod runs as: spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT.
    pub fn identity_of(&self, pod: &Pod) -> Result<SpiffeId, MtlsError> {
        SpiffeId::workload(&self.trust_domain, &pod.namespace, &pod.service_account)
            .map_err(|e| MtlsError::Identity(pod.key(), e))
    }
}
