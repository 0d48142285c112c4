//! Workload identity and mTLS: SPIFFE IDs, the embedded CA, SVID issuance and renewal, and the rustls
//! verifiers that enforce the SPIFFE X509-SVID rules.
//!
//! This module depends on no other agent module; callers pass plain parameters.

pub mod bundle;
pub mod ca;
pub mod spiffe;
pub mod store;
pub mod tls;
pub mod verifier;

#[cfg(test)]
mod test_support;

pub use bundle::TrustBundle;
pub use ca::{IssueError, NodeCa, RootCa, SvidIssuer, SvidRequest};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{IdentityStore, StoreError, StoreSettings};
pub use verifier::{RejectReason, Rejection, RejectionCounters};

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The crypto provider every identity component uses (rustls' aws-lc-rs default), built once.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}
