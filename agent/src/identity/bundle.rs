//! A trust bundle: the root certificates that anchor one SPIFFE trust domain.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

use super::spiffe::TrustDomain;

/// Why a set of root certificates cannot form a trust bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// No root certificates were given.
    #[error("trust bundle for {0} has no root certificates")]
    Empty(TrustDomain),
    /// A root certificate could not be used as a trust anchor.
    #[error("trust bundle for {td}: root certificate {index} is unusable: {source}")]
    BadRoot {
        /// The bundle's trust domain.
        td: TrustDomain,
        /// Position of the certificate in the input.
        index: usize,
        /// What webpki said about it.
        source: rustls::Error,
    },
}

/// The trust domain this node belongs to and the roots its peers' SVIDs must chain to.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    certs: Arc<[CertificateDer<'static>]>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates for `trust_domain`.
    pub fn new(trust_domain: TrustDomain, certs: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::Empty(trust_domain));
        }
        let mut roots = RootCertStore::empty();
        for (index, cert) in certs.iter().enumerate() {
            if let Err(source) = roots.add(cert.clone()) {
                return Err(BundleError::BadRoot { td: trust_domain, index, source });
            }
        }
        Ok(Self { trust_domain, roots: Arc::new(roots), certs: certs.into() })
    }

    /// The trust domain whose members this bundle authenticates.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots as a rustls store.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The roots as DER certificates.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_garbage_roots() {
        let td = TrustDomain::new("example.org").unwrap();
        assert!(matches!(TrustBundle::new(td.clone(), vec![]), Err(BundleError::Empty(_))));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = TrustBundle::new(td, vec![garbage]).unwrap_err();
        assert!(matches!(err, BundleError::BadRoot { index: 0, .. }), "{err}");
    }
}
