//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, mutual authentication with the
//! store's SVIDs and the SPIFFE verifiers. Certificates are looked up on every handshake, so a
//! renewed SVID is used at once and an expired one makes the handshake fail (fail closed).

use std::sync::Arc;

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use super::crypto_provider;
use super::spiffe::SpiffeId;
use super::store::{IdentityStore, StoreError};
use super::verifier::{SpiffeClientVerifier, SpiffeServerVerifier};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

impl IdentityStore {
    /// A server config presenting `id`'s SVID and requiring a client SVID from this trust domain.
    pub fn server_config_for(self: &Arc<Self>, id: &SpiffeId) -> Result<ServerConfig, StoreError> {
        self.require_served(id)?;
        let provider = crypto_provider();
        let verifier = SpiffeClientVerifier::new(
            self.trust_bundle().clone(),
            self.rejection_counters().clone(),
            provider.clone(),
        )
        .map_err(|e| StoreError::Tls(e.to_string()))?;
        let mut config = ServerConfig::builder_with_details(provider, self.time_provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| StoreError::Tls(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(StoreResolver { store: self.clone(), id: id.clone() }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: every connection re-verifies a live certificate.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// A client config presenting `src`'s SVID and accepting only servers whose identity is in
    /// `allowed_peers` (none when it is empty).
    pub fn client_config_for(
        self: &Arc<Self>,
        src: &SpiffeId,
        allowed_peers: impl IntoIterator<Item = SpiffeId>,
    ) -> Result<ClientConfig, StoreError> {
        self.require_served(src)?;
        let provider = crypto_provider();
        let verifier = SpiffeServerVerifier::new(
            self.trust_bundle().clone(),
            allowed_peers,
            self.rejection_counters().clone(),
            provider.clone(),
        );
        let mut config = ClientConfig::builder_with_details(provider, self.time_provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| StoreError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(StoreResolver { store: self.clone(), id: src.clone() }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        Ok(config)
    }

    fn require_served(&self, id: &SpiffeId) -> Result<(), StoreError> {
        if self.serves(id) { Ok(()) } else { Err(StoreError::NotServed(id.clone())) }
    }
}

/// Presents one identity's current SVID, or nothing when it has no valid one.
#[derive(Debug)]
struct StoreResolver {
    store: Arc<IdentityStore>,
    id: SpiffeId,
}

impl StoreResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self.store.get(&self.id, self.store.now()) {
            Ok(key) => Some(key),
            Err(err) => {
                tracing::warn!(id = %self.id, error = %err, "no usable SVID; refusing the handshake");
                None
            }
        }
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::store::StoreSettings;
    use super::super::test_support::{FlakyIssuer, ManualClock, at, handshake, test_now, test_pki};
    use super::super::verifier::{RejectReason, Rejection};
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn store_at(clock: &Arc<ManualClock>, ttl: Duration) -> (Arc<IdentityStore>, Arc<FlakyIssuer>) {
        let issuer = Arc::new(FlakyIssuer::new(test_pki("example.org", clock.now())));
        let settings = StoreSettings { svid_ttl: ttl, ..StoreSettings::default() };
        let store =
            IdentityStore::new(issuer.clone(), issuer.bundle(), settings).with_time_provider(clock.clone());
        (Arc::new(store), issuer)
    }

    const CLIENT: &str = "spiffe://example.org/ns/a/sa/client";
    const SERVER: &str = "spiffe://example.org/ns/b/sa/server";

    /// A store serving CLIENT and SERVER with SVIDs of lifetime `ttl`.
    fn serving_both(clock: &Arc<ManualClock>, ttl: Duration) -> (Arc<IdentityStore>, Arc<FlakyIssuer>) {
        let (store, issuer) = store_at(clock, ttl);
        store.add(&id(CLIENT), clock.now()).unwrap();
        store.add(&id(SERVER), clock.now()).unwrap();
        (store, issuer)
    }

    #[tokio::test]
    async fn mutual_handshake_yields_both_identities() {
        let clock = Arc::new(ManualClock::new(test_now()));
        let (store, _) = serving_both(&clock, Duration::from_secs(3600));
        let (client_id, server_id) = (id(CLIENT), id(SERVER));
        let client = store.client_config_for(&client_id, [server_id.clone()]).unwrap();
        let server = store.server_config_for(&server_id).unwrap();
        let outcome = handshake(client, server).await;
        assert_eq!(outcome.server_seen_by_client.unwrap(), server_id);
        assert_eq!(outcome.client_seen_by_server.unwrap(), client_id);
        assert_eq!(outcome.alpn.as_deref(), Some(ALPN_H2));
        assert!(store.rejection_counters().snapshot().iter().all(|&(_, n)| n == 0));
    }

    #[tokio::test]
    async fn a_server_outside_the_allowed_set_is_refused() {
        let clock = Arc::new(ManualClock::new(test_now()));
        let (store, _) = store_at(&clock, Duration::from_secs(3600));
        let client_id = id("spiffe://example.org/ns/a/sa/client");
        let (server_id, expected) =
            (id("spiffe://example.org/ns/b/sa/imposter"), id("spiffe://example.org/ns/b/sa/db"));
        store.add(&client_id, clock.now()).unwrap();
        store.add(&server_id, clock.now()).unwrap();
        let client = store.client_config_for(&client_id, [expected]).unwrap();
        let server = store.server_config_for(&server_id).unwrap();
        let outcome = handshake(client, server).await;
        let err = outcome.server_seen_by_client.unwrap_err();
        let rejection = Rejection::from_rustls(outcome.client_error.as_ref().unwrap()).unwrap();
        assert_eq!(rejection.reason, RejectReason::UnexpectedIdentity, "{err}");
        assert_eq!(
            rejection.detail,
            "expected one of [spiffe://example.org/ns/b/sa/db], got spiffe://example.org/ns/b/sa/imposter"
        );
        assert!(outcome.client_seen_by_server.is_err());
        assert_eq!(store.rejection_counters().get(RejectReason::UnexpectedIdentity), 1);
    }

    #[tokio::test]
    async fn after_expiry_the_store_fails_closed() {
        let clock = Arc::new(ManualClock::new(test_now()));
        let (store, issuer) = serving_both(&clock, Duration::from_secs(60));
        let (client_id, server_id) = (id(CLIENT), id(SERVER));
        issuer.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        clock.set(at(clock.now(), 30));
        store.tick(clock.now());
        let server = store.server_config_for(&server_id).unwrap();

        // Renewal failed but the certificates are still valid: handshakes succeed.
        let client = store.client_config_for(&client_id, [server_id.clone()]).unwrap();
        let outcome = handshake(client, server.clone()).await;
        assert_eq!(outcome.server_seen_by_client.unwrap(), server_id);

        // Once expired, the server has no certificate to present and the handshake fails.
        clock.set(at(clock.now(), 31));
        store.tick(clock.now());
        assert!(matches!(store.get(&server_id, clock.now()), Err(StoreError::Expired { .. })));
        let client = store.client_config_for(&client_id, [server_id.clone()]).unwrap();
        let outcome = handshake(client, server).await;
        assert!(outcome.server_seen_by_client.is_err());
        assert!(outcome.client_seen_by_server.is_err());
        let server_err = outcome.server_error.unwrap().to_string();
        assert!(server_err.contains("no server certificate"), "{server_err}");
    }

    #[tokio::test]
    async fn configs_require_a_served_identity() {
        let clock = Arc::new(ManualClock::new(test_now()));
        let (store, _) = store_at(&clock, Duration::from_secs(60));
        let unknown = id("spiffe://example.org/ns/x/sa/y");
        assert!(matches!(store.server_config_for(&unknown), Err(StoreError::NotServed(_))));
        assert!(matches!(store.client_config_for(&unknown, []), Err(StoreError::NotServed(_))));
    }
}
