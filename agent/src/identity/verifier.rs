//! rustls certificate verifiers that enforce the SPIFFE X509-SVID rules on top of webpki's chain
//! and signature checks, count every rejection by reason and log it.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::bundle::TrustBundle;
use super::spiffe::{SpiffeId, SpiffeIdError};

/// Why a peer's certificate was refused. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The certificate could not be parsed, or has duplicate extensions.
    Malformed,
    /// The leaf has no URI SAN.
    NoUriSan,
    /// The leaf has more than one URI SAN.
    MultipleUriSans,
    /// The URI SAN's scheme is not `spiffe`.
    NotSpiffeUri,
    /// The URI SAN breaks the SPIFFE ID syntax (trust domain or path), or names no workload.
    InvalidSpiffeId,
    /// The URI SAN is over 2048 bytes.
    SpiffeIdTooLong,
    /// The leaf says CA=true.
    LeafIsCa,
    /// The leaf may sign certificates or CRLs (keyCertSign or cRLSign).
    LeafCanSign,
    /// The leaf's key usage lacks digitalSignature.
    LeafMissingDigitalSignature,
    /// The peer belongs to another trust domain.
    ForeignTrustDomain,
    /// The leaf or a CA in its chain has expired.
    Expired,
    /// The leaf or a CA in its chain is not valid yet.
    NotYetValid,
    /// The chain does not lead to a root in the trust bundle.
    UnknownIssuer,
    /// Any other chain failure (bad signature, wrong extended key usage, ...).
    BadChain,
    /// The identity is valid but not one the destination may have.
    UnexpectedIdentity,
}

impl RejectReason {
    /// Every reason, in counter order.
    pub const ALL: [RejectReason; 15] = [
        Self::Malformed,
        Self::NoUriSan,
        Self::MultipleUriSans,
        Self::NotSpiffeUri,
        Self::InvalidSpiffeId,
        Self::SpiffeIdTooLong,
        Self::LeafIsCa,
        Self::LeafCanSign,
        Self::LeafMissingDigitalSignature,
        Self::ForeignTrustDomain,
        Self::Expired,
        Self::NotYetValid,
        Self::UnknownIssuer,
        Self::BadChain,
        Self::UnexpectedIdentity,
    ];

    /// A stable snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NoUriSan => "no_uri_san",
            Self::MultipleUriSans => "multiple_uri_sans",
            Self::NotSpiffeUri => "not_spiffe_uri",
            Self::InvalidSpiffeId => "invalid_spiffe_id",
            Self::SpiffeIdTooLong => "spiffe_id_too_long",
            Self::LeafIsCa => "leaf_is_ca",
            Self::LeafCanSign => "leaf_can_sign",
            Self::LeafMissingDigitalSignature => "leaf_missing_digital_signature",
            Self::ForeignTrustDomain => "foreign_trust_domain",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BadChain => "bad_chain",
            Self::UnexpectedIdentity => "unexpected_identity",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused peer certificate: the reason and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer certificate rejected ({reason}): {detail}")]
pub struct Rejection {
    /// Why.
    pub reason: RejectReason,
    /// What exactly was wrong, naming identities where known.
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    /// Finds the rejection inside a rustls error returned by one of these verifiers.
    pub fn from_rustls(err: &rustls::Error) -> Option<&Rejection> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref()
            }
            _ => None,
        }
    }
}

impl From<Rejection> for rustls::Error {
    fn from(r: Rejection) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
    }
}

/// Rejection counts, one per [`RejectReason`].
#[derive(Debug, Default)]
pub struct RejectionCounters {
    counts: [AtomicU64; RejectReason::ALL.len()],
}

impl RejectionCounters {
    /// How many certificates were refused for `reason`.
    pub fn get(&self, reason: RejectReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    /// All counters, in [`RejectReason::ALL`] order.
    pub fn snapshot(&self) -> Vec<(RejectReason, u64)> {
        RejectReason::ALL.iter().map(|&r| (r, self.get(r))).collect()
    }

    fn record(&self, reason: RejectReason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// The SPIFFE ID of a peer's leaf certificate, after the leaf checks of the X509-SVID spec (one
/// spiffe URI SAN, CA=false, digitalSignature and no signing key usages). The chain is not checked
/// here; after a completed handshake with these verifiers it already was.
pub fn svid_id(leaf: &CertificateDer<'_>) -> Result<SpiffeId, Rejection> {
    use RejectReason as R;
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| Rejection::new(R::Malformed, format!("cannot parse leaf: {e}")))?;
    let malformed = |what: &str, e: x509_parser::error::X509Error| {
        Rejection::new(R::Malformed, format!("leaf {what} extension: {e}"))
    };
    let constraints = cert.basic_constraints().map_err(|e| malformed("basicConstraints", e))?;
    if constraints.is_some_and(|bc| bc.value.ca) {
        return Err(Rejection::new(R::LeafIsCa, "leaf certificate has CA=true"));
    }
    match cert.key_usage().map_err(|e| malformed("keyUsage", e))? {
        Some(ku) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            return Err(Rejection::new(R::LeafCanSign, "leaf certificate has keyCertSign or cRLSign"));
        }
        Some(ku) if ku.value.digital_signature() => {}
        Some(_) => {
            return Err(Rejection::new(
                R::LeafMissingDigitalSignature,
                "leaf key usage lacks digitalSignature",
            ));
        }
        None => return Err(Rejection::new(R::LeafMissingDigitalSignature, "leaf has no keyUsage extension")),
    }
    let san = cert.subject_alternative_name().map_err(|e| malformed("subjectAltName", e))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(Rejection::new(R::NoUriSan, "leaf has no URI SAN")),
        [uri] => *uri,
        many => {
            let list: Vec<String> = many.iter().map(|u| shorten(u)).collect();
            return Err(Rejection::new(
                R::MultipleUriSans,
                format!("leaf has {} URI SANs: {}", many.len(), list.join(", ")),
            ));
        }
    };
    let scheme = uri.split_once(':').map_or("", |(scheme, _)| scheme);
    if !scheme.eq_ignore_ascii_case("spiffe") {
        return Err(Rejection::new(
            R::NotSpiffeUri,
            format!("URI SAN {} is not a spiffe:// URI", shorten(uri)),
        ));
    }
    let id = SpiffeId::parse(uri).map_err(|e| match e {
        SpiffeIdError::TooLong(_) => {
            Rejection::new(R::SpiffeIdTooLong, format!("URI SAN {}: {e}", shorten(uri)))
        }
        _ => Rejection::new(R::InvalidSpiffeId, format!("URI SAN {}: {e}", shorten(uri))),
    })?;
    if id.path().is_empty() {
        return Err(Rejection::new(R::InvalidSpiffeId, format!("{id} names a trust domain, not a workload")));
    }
    Ok(id)
}

/// The SPIFFE ID of a connection's peer, from `peer_certificates()`.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, Rejection> {
    match certs.and_then(|c| c.first()) {
        Some(leaf) => svid_id(leaf),
        None => Err(Rejection::new(RejectReason::Malformed, "peer presented no certificate")),
    }
}

/// Untrusted text in errors and logs is cut short.
fn shorten(s: &str) -> String {
    const MAX: usize = 128;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// The checks both sides share, in order: leaf profile, trust domain, chain, allowed identities.
#[derive(Debug, Clone)]
struct SvidChecker {
    bundle: TrustBundle,
    counters: Arc<RejectionCounters>,
    provider: Arc<CryptoProvider>,
    /// "client" or "server": whose certificate this checker verifies, for logs.
    peer_role: &'static str,
}

impl SvidChecker {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        chain: impl FnOnce() -> Result<(), rustls::Error>,
        allowed: Option<&BTreeSet<SpiffeId>>,
    ) -> Result<SpiffeId, Rejection> {
        let result = self.check_inner(end_entity, chain, allowed);
        if let Err(rejection) = &result {
            self.counters.record(rejection.reason);
            tracing::warn!(
                peer_role = self.peer_role,
                reason = rejection.reason.as_str(),
                detail = %rejection.detail,
                "rejected peer certificate"
            );
        }
        result
    }

    fn check_inner(
        &self,
        end_entity: &CertificateDer<'_>,
        chain: impl FnOnce() -> Result<(), rustls::Error>,
        allowed: Option<&BTreeSet<SpiffeId>>,
    ) -> Result<SpiffeId, Rejection> {
        let id = svid_id(end_entity)?;
        let td = self.bundle.trust_domain();
        if !id.is_member_of(td) {
            return Err(Rejection::new(
                RejectReason::ForeignTrustDomain,
                format!("{id} is in trust domain {}, this node trusts {td}", id.trust_domain()),
            ));
        }
        chain().map_err(|e| Rejection::new(chain_reason(&e), format!("{id}: {e}")))?;
        if let Some(allowed) = allowed
            && !allowed.contains(&id)
        {
            let expected: Vec<&str> = allowed.iter().map(SpiffeId::as_str).collect();
            return Err(Rejection::new(
                RejectReason::UnexpectedIdentity,
                format!("expected one of [{}], got {id}", expected.join(", ")),
            ));
        }
        Ok(id)
    }
}

/// The handshake-signature methods both verifier traits require: plain webpki checks with the
/// provider's algorithms, the same on both sides.
macro_rules! handshake_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.checker.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.checker.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.checker.provider.signature_verification_algorithms.supported_schemes()
        }
    };
}

fn chain_reason(err: &rustls::Error) -> RejectReason {
    use CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => RejectReason::Expired,
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            RejectReason::NotYetValid
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => RejectReason::UnknownIssuer,
        _ => RejectReason::BadChain,
    }
}

/// Verifies a server's SVID on the client side: it must chain to the bundle and be one of the
/// identities the destination may have. The TLS server name is ignored: SVIDs carry no DNS names.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    checker: SvidChecker,
    allowed: BTreeSet<SpiffeId>,
}

impl SpiffeServerVerifier {
    /// A verifier accepting only the `allowed` identities (none accepted when empty).
    pub fn new(
        bundle: TrustBundle,
        allowed: impl IntoIterator<Item = SpiffeId>,
        counters: Arc<RejectionCounters>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        let checker = SvidChecker { bundle, counters, provider, peer_role: "server" };
        Self { checker, allowed: allowed.into_iter().collect() }
    }

    /// Runs every check and returns the server's identity.
    pub fn verify_svid(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Rejection> {
        let chain = || {
            let cert = ParsedCertificate::try_from(end_entity)?;
            let algs = self.checker.provider.signature_verification_algorithms.all;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                self.checker.bundle.roots(),
                intermediates,
                now,
                algs,
            )
        };
        self.checker.check(end_entity, chain, Some(&self.allowed))
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_svid(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signature_checks!();
}

/// Verifies a client's SVID on the server side: any workload of the trust domain passes; policy
/// decides later what it may do. Client certificates are mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    checker: SvidChecker,
    webpki: Arc<dyn ClientCertVerifier>,
}

impl SpiffeClientVerifier {
    /// A verifier for clients of `bundle`'s trust domain.
    pub fn new(
        bundle: TrustBundle,
        counters: Arc<RejectionCounters>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, VerifierBuilderError> {
        let webpki =
            WebPkiClientVerifier::builder_with_provider(bundle.roots().clone(), provider.clone()).build()?;
        Ok(Self { checker: SvidChecker { bundle, counters, provider, peer_role: "client" }, webpki })
    }

    /// Runs every check and returns the client's identity.
    pub fn verify_svid(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Rejection> {
        let chain = || self.webpki.verify_client_cert(end_entity, intermediates, now).map(|_| ());
        self.checker.check(end_entity, chain, None)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_svid(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signature_checks!();
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
    use rustls::pki_types::UnixTime;
    use rustls::{ClientConfig, ServerConfig};

    use super::super::crypto_provider;
    use super::super::test_support::{Leaf, TestPki, ago, handshake, test_now, test_pki};
    use super::*;

    const SERVER: &str = "spiffe://example.org/ns/b/sa/server";
    const CLIENT: &str = "spiffe://example.org/ns/a/sa/client";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn server_config(leaf: &Leaf, verifier: SpiffeClientVerifier) -> ServerConfig {
        ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
            .unwrap()
    }

    fn client_config(leaf: &Leaf, verifier: SpiffeServerVerifier) -> ClientConfig {
        ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(leaf.chain.clone(), leaf.key.clone_key())
            .unwrap()
    }

    /// Which side presents the certificate under test.
    #[derive(Debug, Clone, Copy)]
    enum Presenter {
        Client,
        Server,
    }

    /// Handshakes with `bad` presented by `presenter` (the other side holding a good SVID) and
    /// asserts that the verifying side refused it for `reason`, counted once.
    async fn assert_refused(pki: &TestPki, bad: &Leaf, presenter: Presenter, reason: RejectReason) {
        let now = test_now();
        let good_client = pki.leaf(&[CLIENT], now, |_| {});
        let good_server = pki.leaf(&[SERVER], now, |_| {});
        let (client_leaf, server_leaf) = match presenter {
            Presenter::Client => (bad, &good_server),
            Presenter::Server => (&good_client, bad),
        };
        let client_counters = Arc::new(RejectionCounters::default());
        let server_counters = Arc::new(RejectionCounters::default());
        let to_server =
            SpiffeServerVerifier::new(pki.bundle(), [id(SERVER)], client_counters.clone(), crypto_provider());
        let to_client =
            SpiffeClientVerifier::new(pki.bundle(), server_counters.clone(), crypto_provider()).unwrap();
        let outcome =
            handshake(client_config(client_leaf, to_server), server_config(server_leaf, to_client)).await;

        assert!(outcome.server_seen_by_client.is_err(), "{presenter:?}/{reason}: client must fail too");
        assert!(outcome.client_seen_by_server.is_err(), "{presenter:?}/{reason}: server must fail too");
        let (verifier_error, counters) = match presenter {
            Presenter::Client => (outcome.server_error, &server_counters),
            Presenter::Server => (outcome.client_error, &client_counters),
        };
        let verifier_error = verifier_error.unwrap_or_else(|| panic!("{presenter:?}/{reason}: no TLS error"));
        let rejection = Rejection::from_rustls(&verifier_error)
            .unwrap_or_else(|| panic!("{presenter:?}/{reason}: not a rejection: {verifier_error}"));
        assert_eq!(rejection.reason, reason, "{presenter:?}: {rejection}");
        let counts: Vec<_> = counters.snapshot().into_iter().filter(|&(_, n)| n > 0).collect();
        assert_eq!(counts, vec![(reason, 1)], "{presenter:?}/{reason}");
    }

    async fn assert_refused_both_ways(pki: &TestPki, bad: &Leaf, reason: RejectReason) {
        assert_refused(pki, bad, Presenter::Client, reason).await;
        assert_refused(pki, bad, Presenter::Server, reason).await;
    }

    /// `now` shifted by `secs` seconds, as an X.509 time.
    fn offset(now: UnixTime, secs: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(now.as_secs()).unwrap() + secs).unwrap()
    }

    #[tokio::test]
    async fn good_mutual_handshake_yields_both_identities() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let counters = Arc::new(RejectionCounters::default());
        let to_server =
            SpiffeServerVerifier::new(pki.bundle(), [id(SERVER)], counters.clone(), crypto_provider());
        let to_client = SpiffeClientVerifier::new(pki.bundle(), counters.clone(), crypto_provider()).unwrap();
        let client = client_config(&pki.leaf(&[CLIENT], now, |_| {}), to_server);
        let server = server_config(&pki.leaf(&[SERVER], now, |_| {}), to_client);
        let outcome = handshake(client, server).await;
        assert_eq!(outcome.server_seen_by_client.unwrap(), id(SERVER));
        assert_eq!(outcome.client_seen_by_server.unwrap(), id(CLIENT));
        assert!(counters.snapshot().iter().all(|&(_, n)| n == 0));
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_certificates_are_refused() {
        let now = test_now();
        let pki = test_pki("example.org", ago(now, 7200));
        // (presenter, notBefore, notAfter, reason), times relative to now in seconds.
        let cases = [
            (Presenter::Client, -7200, -3600, RejectReason::Expired),
            (Presenter::Server, -300, -1, RejectReason::Expired),
            (Presenter::Client, 3600, 7200, RejectReason::NotYetValid),
            (Presenter::Server, 600, 3600, RejectReason::NotYetValid),
        ];
        for (presenter, not_before, not_after, reason) in cases {
            let bad = pki.leaf(&[SERVER], now, |p| {
                p.not_before = offset(now, not_before);
                p.not_after = offset(now, not_after);
            });
            assert_refused(&pki, &bad, presenter, reason).await;
        }
    }

    #[tokio::test]
    async fn a_foreign_trust_domain_is_refused() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let foreign = test_pki("other.org", now);
        let bad = foreign.leaf(&["spiffe://other.org/ns/b/sa/server"], now, |_| {});
        assert_refused_both_ways(&pki, &bad, RejectReason::ForeignTrustDomain).await;
    }

    #[tokio::test]
    async fn an_unknown_issuer_is_refused() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        // Same trust domain, different root.
        let impostor = test_pki("example.org", now);
        let bad = impostor.leaf(&[SERVER], now, |_| {});
        assert_refused_both_ways(&pki, &bad, RejectReason::UnknownIssuer).await;
    }

    #[tokio::test]
    async fn two_uri_sans_are_refused() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let bad = pki.leaf(&[SERVER, CLIENT], now, |_| {});
        assert_refused_both_ways(&pki, &bad, RejectReason::MultipleUriSans).await;
    }

    #[tokio::test]
    async fn a_ca_leaf_is_refused() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let bad = pki.leaf(&[SERVER], now, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert_refused_both_ways(&pki, &bad, RejectReason::LeafIsCa).await;
    }

    #[tokio::test]
    async fn a_leaf_with_key_cert_sign_is_refused() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let bad = pki.leaf(&[SERVER], now, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
        assert_refused_both_ways(&pki, &bad, RejectReason::LeafCanSign).await;
    }

    #[tokio::test]
    async fn malformed_spiffe_ids_are_refused() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let cases: [(String, RejectReason); 4] = [
            ("https://example.org/ns/b/sa/server".into(), RejectReason::NotSpiffeUri),
            ("spiffe://Example.org/ns/b/sa/server".into(), RejectReason::InvalidSpiffeId),
            ("spiffe://example.org/ns/../sa/server".into(), RejectReason::InvalidSpiffeId),
            (format!("spiffe://example.org/{}", "a".repeat(2100)), RejectReason::SpiffeIdTooLong),
        ];
        for (uri, reason) in cases {
            let bad = pki.leaf(&[uri.as_str()], now, |_| {});
            assert_refused_both_ways(&pki, &bad, reason).await;
        }
    }

    #[test]
    fn leaf_profile_checks_name_their_reason() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let reason = |leaf: Leaf| svid_id(&leaf.chain[0]).unwrap_err().reason;
        assert_eq!(reason(pki.leaf(&[], now, |_| {})), RejectReason::NoUriSan);
        assert_eq!(
            reason(pki.leaf(&[SERVER], now, |p| p.key_usages = vec![KeyUsagePurpose::KeyAgreement])),
            RejectReason::LeafMissingDigitalSignature
        );
        assert_eq!(
            reason(pki.leaf(&[SERVER], now, |p| p.key_usages.clear())),
            RejectReason::LeafMissingDigitalSignature
        );
        assert_eq!(
            reason(pki.leaf(&[SERVER], now, |p| p.key_usages.push(KeyUsagePurpose::CrlSign))),
            RejectReason::LeafCanSign
        );
        assert_eq!(reason(pki.leaf(&["spiffe://example.org"], now, |_| {})), RejectReason::InvalidSpiffeId);
        let garbage = CertificateDer::from(vec![0x30, 0x01, 0x00]);
        assert_eq!(svid_id(&garbage).unwrap_err().reason, RejectReason::Malformed);
        assert_eq!(peer_identity(None).unwrap_err().reason, RejectReason::Malformed);
        assert_eq!(svid_id(&pki.leaf(&[SERVER], now, |_| {}).chain[0]).unwrap(), id(SERVER));
    }

    #[test]
    fn rejection_details_are_bounded_and_name_the_identities() {
        let now = test_now();
        let pki = test_pki("example.org", now);
        let long = format!("https://{}", "x".repeat(5000));
        let leaf = pki.leaf(&[long.as_str()], now, |_| {});
        let rejection = svid_id(&leaf.chain[0]).unwrap_err();
        assert!(rejection.detail.len() < 300, "{}", rejection.detail.len());

        let counters = Arc::new(RejectionCounters::default());
        let verifier =
            SpiffeServerVerifier::new(pki.bundle(), [id(SERVER)], counters.clone(), crypto_provider());
        let leaf = pki.leaf(&[CLIENT], now, |_| {});
        let rejection = verifier.verify_svid(&leaf.chain[0], &leaf.chain[1..], now).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::UnexpectedIdentity);
        assert_eq!(rejection.detail, format!("expected one of [{SERVER}], got {CLIENT}"));
        assert_eq!(counters.get(RejectReason::UnexpectedIdentity), 1);

        let nobody = SpiffeServerVerifier::new(pki.bundle(), [], counters.clone(), crypto_provider());
        let leaf = pki.leaf(&[SERVER], now, |_| {});
        let rejection = nobody.verify_svid(&leaf.chain[0], &leaf.chain[1..], now).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::UnexpectedIdentity, "an empty allowed set admits nobody");
    }

    #[test]
    fn reason_names_are_unique() {
        let names: BTreeSet<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), RejectReason::ALL.len());
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
