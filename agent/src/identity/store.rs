//! The node's identities: one key pair and SVID per SPIFFE ID served here, issued through an
//! [`SvidIssuer`], renewed at half-life, kept while still valid when renewal fails (retrying with
//! exponential backoff), and refused once expired (fail closed).
//!
//! Renewal is driven by [`IdentityStore::tick`], either from a test with an explicit time or from
//! the task started by [`IdentityStore::spawn_renewal`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::sign::CertifiedKey;
use rustls::time_provider::{DefaultTimeProvider, TimeProvider};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::bundle::TrustBundle;
use super::ca::{DEFAULT_SVID_TTL, IssueError, SvidIssuer, SvidRequest};
use super::crypto_provider;
use super::spiffe::{SpiffeId, TrustDomain};
use super::verifier::{RejectionCounters, SpiffeServerVerifier};

/// Lifetimes and retry pacing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// Requested SVID lifetime; renewal starts at half of it.
    pub svid_ttl: Duration,
    /// First retry delay after a failed issuance; doubles on each further failure.
    pub retry_initial: Duration,
    /// Upper bound of the retry delay.
    pub retry_max: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            svid_ttl: DEFAULT_SVID_TTL,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Why the store cannot provide a certificate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The identity was never added (or was removed).
    #[error("identity {0} is not served on this node")]
    NotServed(SpiffeId),
    /// The identity belongs to another trust domain.
    #[error("identity {id} is outside this node's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The identity.
        id: SpiffeId,
        /// This node's trust domain.
        trust_domain: TrustDomain,
    },
    /// No certificate has been issued yet.
    #[error("no certificate for {id} yet: {last_error}")]
    NotIssued {
        /// The identity.
        id: SpiffeId,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// The certificate expired and renewal has not succeeded.
    #[error("certificate for {id} expired at unix time {expired_at}; refusing to use it")]
    Expired {
        /// The identity.
        id: SpiffeId,
        /// Its notAfter, in seconds since the Unix epoch.
        expired_at: u64,
    },
    /// The CA refused or failed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// The CA returned something this store cannot use.
    #[error("certificate issued for {id} is unusable: {detail}")]
    BadIssuedCert {
        /// The identity.
        id: SpiffeId,
        /// What is wrong with it.
        detail: String,
    },
    /// A key pair could not be generated.
    #[error("cannot generate a key pair for {id}: {detail}")]
    KeyGeneration {
        /// The identity.
        id: SpiffeId,
        /// The generator's complaint.
        detail: String,
    },
    /// A TLS configuration could not be built.
    #[error("cannot build TLS config: {0}")]
    Tls(String),
}

/// One issued SVID with its key.
#[derive(Debug, Clone)]
pub struct Svid {
    /// Chain and key, ready for rustls.
    pub certified: Arc<CertifiedKey>,
    /// The leaf's notAfter.
    pub not_after: UnixTime,
    /// When renewal starts: halfway between issuance and notAfter.
    pub refresh_at: UnixTime,
}

/// What the admin API and `ferry certs` show about one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidStatus {
    /// The identity.
    pub id: SpiffeId,
    /// The current certificate's notAfter, if one was issued.
    pub not_after: Option<UnixTime>,
    /// When the next issuance attempt is due.
    pub next_attempt: UnixTime,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    current: Option<Svid>,
    next_attempt: UnixTime,
    failures: u32,
    last_error: Option<String>,
}

/// The SVIDs of every identity served on this node.
#[derive(Debug)]
pub struct IdentityStore {
    issuer: Arc<dyn SvidIssuer>,
    bundle: TrustBundle,
    settings: StoreSettings,
    time: Arc<dyn TimeProvider>,
    counters: Arc<RejectionCounters>,
    entries: RwLock<HashMap<SpiffeId, Entry>>,
    /// Wakes the renewal task when an identity is added.
    changed: tokio::sync::Notify,
}

impl IdentityStore {
    /// A store issuing through `issuer` for the trust domain of `bundle`, on the system clock.
    pub fn new(issuer: Arc<dyn SvidIssuer>, bundle: TrustBundle, settings: StoreSettings) -> Self {
        Self {
            issuer,
            bundle,
            settings,
            time: Arc::new(DefaultTimeProvider),
            counters: Arc::default(),
            entries: RwLock::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Replaces the clock used by handshakes and the renewal task (tests use a manual one).
    pub fn with_time_provider(mut self, time: Arc<dyn TimeProvider>) -> Self {
        self.time = time;
        self
    }

    /// The current time on the store's clock.
    pub fn now(&self) -> UnixTime {
        self.time.current_time().unwrap_or_else(UnixTime::now)
    }

    /// The clock, for TLS configs built elsewhere.
    pub fn time_provider(&self) -> &Arc<dyn TimeProvider> {
        &self.time
    }

    /// The trust bundle peers are verified against.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Peer certificate rejections counted by this store's verifiers.
    pub fn rejection_counters(&self) -> &Arc<RejectionCounters> {
        &self.counters
    }

    /// Starts serving `id` and issues its first SVID now. Adding a served identity is a no-op. If
    /// issuance fails the identity stays registered and is retried by [`tick`](Self::tick).
    pub fn add(&self, id: &SpiffeId, now: UnixTime) -> Result<(), StoreError> {
        let td = self.bundle.trust_domain();
        if !id.is_member_of(td) {
            return Err(StoreError::ForeignTrustDomain { id: id.clone(), trust_domain: td.clone() });
        }
        {
            let mut entries = self.write();
            if entries.contains_key(id) {
                return Ok(());
            }
            let entry = Entry { current: None, next_attempt: now, failures: 0, last_error: None };
            entries.insert(id.clone(), entry);
        }
        let result = self.issue(id, now);
        let outcome = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        self.record(id, result, now);
        self.changed.notify_one();
        outcome.map_err(|last_error| StoreError::NotIssued { id: id.clone(), last_error })
    }

    /// Stops serving `id`; later lookups fail with [`StoreError::NotServed`].
    pub fn remove(&self, id: &SpiffeId) {
        self.write().remove(id);
    }

    /// True when `id` was added and not removed.
    pub fn serves(&self, id: &SpiffeId) -> bool {
        self.read().contains_key(id)
    }

    /// The certificate and key for `id`, if it has one that is valid at `now`.
    pub fn get(&self, id: &SpiffeId, now: UnixTime) -> Result<Arc<CertifiedKey>, StoreError> {
        let entries = self.read();
        let entry = entries.get(id).ok_or_else(|| StoreError::NotServed(id.clone()))?;
        match &entry.current {
            None => Err(StoreError::NotIssued {
                id: id.clone(),
                last_error: entry.last_error.clone().unwrap_or_else(|| "not attempted yet".into()),
            }),
            Some(svid) if now >= svid.not_after => {
                Err(StoreError::Expired { id: id.clone(), expired_at: svid.not_after.as_secs() })
            }
            Some(svid) => Ok(svid.certified.clone()),
        }
    }

    /// Renews every identity whose attempt is due at `now`; returns when the next one is due.
    pub fn tick(&self, now: UnixTime) -> Option<UnixTime> {
        let due: Vec<SpiffeId> =
            self.read().iter().filter(|(_, e)| e.next_attempt <= now).map(|(id, _)| id.clone()).collect();
        for id in due {
            // Issue without holding the lock: an external CA may be slow.
            let result = self.issue(&id, now);
            self.record(&id, result, now);
        }
        self.read().values().map(|e| e.next_attempt).min()
    }

    /// Per-identity state, sorted by identity.
    pub fn status(&self) -> Vec<SvidStatus> {
        let mut out: Vec<SvidStatus> = self
            .read()
            .iter()
            .map(|(id, e)| SvidStatus {
                id: id.clone(),
                not_after: e.current.as_ref().map(|s| s.not_after),
                next_attempt: e.next_attempt,
                failures: e.failures,
                last_error: e.last_error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Runs [`tick`](Self::tick) on the store's clock whenever something is due, until aborted.
    /// The issuer is called from this task, so it must not block for long.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        const IDLE: Duration = Duration::from_secs(60);
        const MIN_SLEEP: Duration = Duration::from_millis(200);
        let store = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let now = store.now();
                let wait = match store.tick(now) {
                    Some(next) => Duration::from_secs(next.as_secs().saturating_sub(now.as_secs())).min(IDLE),
                    None => IDLE,
                };
                tokio::select! {
                    () = tokio::time::sleep(wait.max(MIN_SLEEP)) => {}
                    () = store.changed.notified() => {}
                }
            }
        })
    }

    /// Generates a fresh key pair and has it certified for `id`.
    fn issue(&self, id: &SpiffeId, now: UnixTime) -> Result<Svid, StoreError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| StoreError::KeyGeneration { id: id.clone(), detail: e.to_string() })?;
        let public_key = SubjectPublicKeyInfoDer::from(key.subject_public_key_info());
        let request = SvidRequest { id, public_key: &public_key, ttl: self.settings.svid_ttl, now };
        let chain = self.issuer.issue(&request)?;
        let bad = |detail: String| StoreError::BadIssuedCert { id: id.clone(), detail };
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| bad("empty chain".into()))?;
        // Catch a misconfigured CA here rather than in every peer's handshake.
        let check =
            SpiffeServerVerifier::new(self.bundle.clone(), [id.clone()], Arc::default(), crypto_provider());
        check.verify_svid(leaf, intermediates, now).map_err(|r| bad(r.to_string()))?;
        let not_after = leaf_not_after(leaf).ok_or_else(|| bad("cannot read notAfter".into()))?;
        if not_after <= now {
            return Err(bad("already expired".into()));
        }
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified =
            CertifiedKey::from_der(chain, private_key, &crypto_provider()).map_err(|e| bad(e.to_string()))?;
        let half_life = (not_after.as_secs() - now.as_secs()) / 2;
        let refresh_at = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + half_life.max(1)));
        Ok(Svid { certified: Arc::new(certified), not_after, refresh_at })
    }

    /// Stores an issuance result and schedules the next attempt.
    fn record(&self, id: &SpiffeId, result: Result<Svid, StoreError>, now: UnixTime) {
        let mut entries = self.write();
        let Some(entry) = entries.get_mut(id) else {
            return; // removed while issuing
        };
        match result {
            Ok(svid) => {
                tracing::info!(%id, not_after = svid.not_after.as_secs(), "issued SVID");
                entry.next_attempt = svid.refresh_at;
                entry.current = Some(svid);
                entry.failures = 0;
                entry.last_error = None;
            }
            Err(err) => {
                entry.failures = entry.failures.saturating_add(1);
                let delay = backoff(&self.settings, entry.failures);
                entry.next_attempt =
                    UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + delay.as_secs()));
                match entry.current.as_ref().filter(|svid| svid.not_after > now) {
                    Some(svid) => tracing::warn!(
                        %id, error = %err, failures = entry.failures, retry_in_secs = delay.as_secs(),
                        valid_until = svid.not_after.as_secs(),
                        "SVID renewal failed; keeping the current certificate"
                    ),
                    None => tracing::error!(
                        %id, error = %err, failures = entry.failures, retry_in_secs = delay.as_secs(),
                        "no valid SVID; connections for this identity fail closed"
                    ),
                }
                entry.last_error = Some(err.to_string());
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<SpiffeId, Entry>> {
        // A panic while holding the lock leaves the map consistent (every update is one assignment).
        self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Delay before attempt `failures + 1`: initial * 2^(failures-1), capped, at least one second.
fn backoff(settings: &StoreSettings, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
    settings.retry_initial.saturating_mul(factor).min(settings.retry_max).max(Duration::from_secs(1))
}

fn leaf_not_after(leaf: &CertificateDer<'_>) -> Option<UnixTime> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UnixTime::since_unix_epoch(Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::test_support::{FlakyIssuer, at, test_now, test_pki};
    use super::*;

    const HOUR: u64 = 3600;

    fn store(issuer: Arc<FlakyIssuer>) -> IdentityStore {
        let bundle = issuer.bundle();
        let settings = StoreSettings {
            svid_ttl: Duration::from_secs(HOUR),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
        };
        IdentityStore::new(issuer, bundle, settings)
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    /// A store serving one identity since `t0`, with its issuer and first certificate.
    fn serving_web() -> (UnixTime, Arc<FlakyIssuer>, IdentityStore, SpiffeId, Arc<CertifiedKey>) {
        let t0 = test_now();
        let issuer = Arc::new(FlakyIssuer::new(test_pki("example.org", t0)));
        let store = store(issuer.clone());
        let web = id("spiffe://example.org/ns/shop/sa/web");
        store.add(&web, t0).unwrap();
        let first = store.get(&web, t0).unwrap();
        (t0, issuer, store, web, first)
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = StoreSettings {
            svid_ttl: DEFAULT_SVID_TTL,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
        };
        let delays: Vec<u64> = (1..=6).map(|f| backoff(&s, f).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        assert_eq!(backoff(&s, u32::MAX).as_secs(), 8);
    }

    #[test]
    fn add_issues_immediately_and_lookups_name_their_failure() {
        let t0 = test_now();
        let issuer = Arc::new(FlakyIssuer::new(test_pki("example.org", t0)));
        let store = store(issuer.clone());
        let web = id("spiffe://example.org/ns/shop/sa/web");
        store.add(&web, t0).unwrap();
        assert!(store.serves(&web));
        let key = store.get(&web, t0).unwrap();
        assert_eq!(key.cert.len(), 2, "leaf and intermediate");
        assert_eq!(super::super::verifier::svid_id(&key.cert[0]).unwrap(), web);
        store.add(&web, t0).unwrap();
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 1, "adding twice issues once");

        let other = id("spiffe://example.org/ns/shop/sa/other");
        assert!(matches!(store.get(&other, t0), Err(StoreError::NotServed(_))));
        let foreign = store.add(&id("spiffe://evil.org/ns/a/sa/b"), t0).unwrap_err();
        assert!(matches!(foreign, StoreError::ForeignTrustDomain { .. }), "{foreign}");
        store.remove(&web);
        assert!(matches!(store.get(&web, t0), Err(StoreError::NotServed(_))));
    }

    #[test]
    fn renewal_at_half_life_swaps_the_certificate() {
        let (t0, issuer, store, web, first) = serving_web();

        assert_eq!(store.tick(at(t0, HOUR / 2 - 1)), Some(at(t0, HOUR / 2)));
        assert!(Arc::ptr_eq(&first, &store.get(&web, at(t0, HOUR / 2 - 1)).unwrap()), "not renewed early");

        let renewed_at = at(t0, HOUR / 2);
        assert_eq!(store.tick(renewed_at), Some(at(renewed_at, HOUR / 2)));
        let second = store.get(&web, renewed_at).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "renewed at half-life");
        assert_ne!(first.cert[0], second.cert[0]);
        assert_eq!(store.status()[0].not_after, Some(at(renewed_at, HOUR)));
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn failed_renewal_keeps_the_valid_certificate_then_fails_closed() {
        let (t0, issuer, store, web, first) = serving_web();

        issuer.failing.store(true, Ordering::SeqCst);
        let mut now = at(t0, HOUR / 2);
        // Retries back off 1, 2, 4, 8, 8 s; the old certificate stays in use throughout.
        for (failures, delay) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8)] {
            let next = store.tick(now);
            assert_eq!(next, Some(at(now, delay)), "after {failures} failures");
            let status = &store.status()[0];
            assert_eq!(status.failures, failures);
            assert!(status.last_error.as_deref().unwrap_or("").contains("CA unavailable"), "{status:?}");
            assert!(Arc::ptr_eq(&first, &store.get(&web, now).unwrap()));
            // Ticking before the retry is due makes no attempt.
            let calls = issuer.calls.load(Ordering::SeqCst);
            store.tick(now);
            assert_eq!(issuer.calls.load(Ordering::SeqCst), calls);
            now = at(now, delay);
        }

        // Still valid one second before notAfter, refused from notAfter on.
        assert!(store.get(&web, at(t0, HOUR - 1)).is_ok());
        store.tick(at(t0, HOUR));
        let err = store.get(&web, at(t0, HOUR)).unwrap_err();
        assert!(matches!(err, StoreError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("refusing to use it"), "{err}");

        // Recovery: the next successful attempt restores service.
        issuer.failing.store(false, Ordering::SeqCst);
        let retry = store.status()[0].next_attempt;
        store.tick(retry);
        assert!(store.get(&web, retry).is_ok());
        assert_eq!(store.status()[0].failures, 0);
    }

    #[test]
    fn an_unreadable_node_ca_keeps_the_certificate_then_fails_closed_then_recovers() {
        use super::super::ca::{DEFAULT_NODE_VALIDITY, DEFAULT_ROOT_VALIDITY, NODE_KEY_FILE, NodeCa, RootCa};
        use super::super::test_support::td;

        let dir = tempfile::tempdir().unwrap();
        let t0 = test_now();
        let root = RootCa::init_dir(dir.path(), &td("example.org"), DEFAULT_ROOT_VALIDITY, t0).unwrap();
        let node_dir = root.issue_node_dir(dir.path(), "node-a", DEFAULT_NODE_VALIDITY, t0).unwrap();
        let node = NodeCa::load(&node_dir, t0).unwrap();
        let bundle = node.trust_bundle().clone();
        let settings = StoreSettings { svid_ttl: Duration::from_secs(HOUR), ..StoreSettings::default() };
        let store = IdentityStore::new(Arc::new(node), bundle, settings);
        let web = id("spiffe://example.org/ns/shop/sa/web");
        store.add(&web, t0).unwrap();
        let first = store.get(&web, t0).unwrap();

        // The node's key goes away: renewal at half-life fails, naming the file, and the
        // still-valid certificate stays in use.
        let (key, away) = (node_dir.join(NODE_KEY_FILE), node_dir.join("ca.key.away"));
        std::fs::rename(&key, &away).unwrap();
        store.tick(at(t0, HOUR / 2));
        let status = &store.status()[0];
        assert_eq!(status.failures, 1);
        let error = status.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("cannot sign with the node CA") && error.contains("ca.key"), "{error}");
        assert!(Arc::ptr_eq(&first, &store.get(&web, at(t0, HOUR - 1)).unwrap()));

        // Expired with the CA still gone: refused.
        store.tick(at(t0, HOUR));
        assert!(matches!(store.get(&web, at(t0, HOUR)), Err(StoreError::Expired { .. })));

        // The key is back: the next attempt issues a fresh certificate.
        std::fs::rename(&away, &key).unwrap();
        let retry = store.status()[0].next_attempt;
        store.tick(retry);
        let fresh = store.get(&web, retry).unwrap();
        assert_ne!(fresh.cert[0], first.cert[0]);
        assert_eq!(store.status()[0].failures, 0);
    }

    #[test]
    fn a_failed_first_issuance_is_retried() {
        let t0 = test_now();
        let issuer = Arc::new(FlakyIssuer::new(test_pki("example.org", t0)));
        issuer.failing.store(true, Ordering::SeqCst);
        let store = store(issuer.clone());
        let web = id("spiffe://example.org/ns/shop/sa/web");
        let err = store.add(&web, t0).unwrap_err();
        assert!(err.to_string().contains("CA unavailable"), "{err}");
        let not_issued = store.get(&web, t0).unwrap_err();
        assert!(matches!(not_issued, StoreError::NotIssued { .. }), "{not_issued}");
        issuer.failing.store(false, Ordering::SeqCst);
        assert_eq!(store.tick(at(t0, 1)), Some(at(t0, 1 + HOUR / 2)));
        assert!(store.get(&web, at(t0, 1)).is_ok());
    }

    #[test]
    fn certificates_from_a_misconfigured_ca_are_refused() {
        let t0 = test_now();
        // The issuer signs with one PKI while the store trusts another.
        let issuer = Arc::new(FlakyIssuer::new(test_pki("example.org", t0)));
        let other_bundle = test_pki("example.org", t0).bundle();
        let store = IdentityStore::new(issuer, other_bundle, StoreSettings::default());
        let err = store.add(&id("spiffe://example.org/ns/a/sa/b"), t0).unwrap_err();
        assert!(err.to_string().contains("unknown_issuer"), "{err}");
    }

    #[tokio::test]
    async fn the_renewal_task_renews_on_the_system_clock() {
        let now = UnixTime::now();
        let issuer = Arc::new(FlakyIssuer::new(test_pki("example.org", now)));
        let bundle = issuer.bundle();
        let settings = StoreSettings { svid_ttl: Duration::from_secs(2), ..StoreSettings::default() };
        let store = Arc::new(IdentityStore::new(issuer.clone(), bundle, settings));
        let task = store.spawn_renewal();
        let web = id("spiffe://example.org/ns/shop/sa/web");
        store.add(&web, store.now()).unwrap();
        let first = store.get(&web, store.now()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let current = store.get(&web, store.now()).unwrap();
            if !Arc::ptr_eq(&first, &current) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not renewed within 10s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        task.abort();
    }
}
