//! Fixtures for the identity tests: a real PKI, an issuer that can be made to fail, a manual clock,
//! and a real TLS handshake over an in-memory pipe.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::bundle::TrustBundle;
use super::ca::{
    DEFAULT_NODE_VALIDITY, DEFAULT_ROOT_VALIDITY, IssueError, NodeCa, RootCa, SvidIssuer, SvidRequest,
};
use super::spiffe::{SpiffeId, TrustDomain};
use super::verifier::peer_identity;

/// A trust domain that is known to be valid.
pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).expect("test trust domain")
}

/// The wall clock, so certificates also make sense to webpki's own checks.
pub fn test_now() -> UnixTime {
    UnixTime::now()
}

/// `t` plus `secs` seconds.
pub fn at(t: UnixTime, secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t.as_secs() + secs))
}

/// `t` minus `secs` seconds.
pub fn ago(t: UnixTime, secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t.as_secs() - secs))
}

fn datetime(t: UnixTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(i64::try_from(t.as_secs()).expect("time fits")).expect("valid time")
}

/// A node intermediate (and its root) for a trust domain, made by the real CA code.
pub struct TestPki {
    /// The node intermediate; its trust bundle holds the root.
    pub node: NodeCa,
}

/// A fresh PKI for `trust_domain`, valid from `now`.
pub fn test_pki(trust_domain: &str, now: UnixTime) -> TestPki {
    let root = RootCa::generate(&td(trust_domain), DEFAULT_ROOT_VALIDITY, now).expect("root");
    let node = root.issue_node("node-a", DEFAULT_NODE_VALIDITY, now).expect("node CA");
    TestPki { node }
}

/// A certificate chain (leaf first) with the leaf's private key.
pub struct Leaf {
    /// Leaf and intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl TestPki {
    /// The bundle holding this PKI's root.
    pub fn bundle(&self) -> TrustBundle {
        self.node.trust_bundle().clone()
    }

    /// A leaf with the given URI SANs, shaped like a good SVID valid at `now` and then altered by
    /// `tweak`, signed by the node intermediate.
    pub fn leaf(&self, uris: &[&str], now: UnixTime, tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "test");
        params.distinguished_name = dn;
        params.subject_alt_names =
            uris.iter().map(|u| SanType::URI(Ia5String::try_from(*u).expect("ia5 uri"))).collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = datetime(ago(now, 300));
        params.not_after = datetime(at(now, 3600));
        tweak(&mut params);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let issuer = Issuer::from_ca_cert_der(self.node.cert(), self.node.signing_key()).expect("issuer");
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        Leaf {
            chain: vec![cert.der().clone(), self.node.cert().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

/// An issuer backed by a real node CA that fails on demand and counts calls.
#[derive(Debug)]
pub struct FlakyIssuer {
    node: NodeCa,
    /// While true, every issuance fails with [`IssueError::Unavailable`].
    pub failing: AtomicBool,
    /// Issuance attempts so far.
    pub calls: AtomicUsize,
}

impl FlakyIssuer {
    /// Wraps the node CA of `pki`.
    pub fn new(pki: TestPki) -> Self {
        Self { node: pki.node, failing: AtomicBool::new(false), calls: AtomicUsize::new(0) }
    }

    /// The bundle of the wrapped CA.
    pub fn bundle(&self) -> TrustBundle {
        self.node.trust_bundle().clone()
    }
}

impl SvidIssuer for FlakyIssuer {
    fn issue(&self, req: &SvidRequest<'_>) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(IssueError::Unavailable("test CA is down".into()));
        }
        self.node.issue(req)
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock showing `t`.
    pub fn new(t: UnixTime) -> Self {
        Self(AtomicU64::new(t.as_secs()))
    }

    /// Moves the clock to `t`.
    pub fn set(&self, t: UnixTime) {
        self.0.store(t.as_secs(), Ordering::SeqCst);
    }

    /// The time shown.
    pub fn now(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(self.0.load(Ordering::SeqCst)))
    }
}

impl TimeProvider for ManualClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.now())
    }
}

/// What each side of a handshake saw.
#[derive(Debug)]
pub struct Outcome {
    /// The server identity as the client saw it, or why the client failed.
    pub server_seen_by_client: Result<SpiffeId, String>,
    /// The client identity as the server saw it, or why the server failed.
    pub client_seen_by_server: Result<SpiffeId, String>,
    /// The client's TLS error, if it failed with one.
    pub client_error: Option<rustls::Error>,
    /// The server's TLS error, if it failed with one.
    pub server_error: Option<rustls::Error>,
    /// The negotiated ALPN protocol, as the client saw it.
    pub alpn: Option<Vec<u8>>,
}

/// Runs a full TLS handshake between `client` and `server` over an in-memory duplex pipe, then has
/// the server send a greeting: in TLS 1.3 the client finishes before the server has judged the
/// client's certificate, so only a successful read proves both sides accepted each other.
pub async fn handshake(client: ClientConfig, server: ServerConfig) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(Arc::new(client));
    let acceptor = TlsAcceptor::from(Arc::new(server));
    // SPIFFE verification ignores the name; HBONE dials pod IPs.
    let name = ServerName::try_from("hbone.invalid").expect("server name");
    let client_side = async move {
        let mut tls = connector.connect(name, client_io).await?;
        let mut greeting = [0u8; 5];
        tls.read_exact(&mut greeting).await?;
        let (_, conn) = tls.get_ref();
        Ok::<_, io::Error>((
            peer_identity(conn.peer_certificates()),
            conn.alpn_protocol().map(<[u8]>::to_vec),
        ))
    };
    let server_side = async move {
        let mut tls = acceptor.accept(server_io).await?;
        tls.write_all(b"hello").await?;
        tls.flush().await?;
        let (_, conn) = tls.get_ref();
        Ok::<_, io::Error>(peer_identity(conn.peer_certificates()))
    };
    let (client_result, server_result) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(client_side, server_side) })
            .await
            .expect("handshake timed out");
    let tls_error =
        |e: &io::Error| e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
    let (server_seen_by_client, alpn, client_error) = match client_result {
        Ok((id, alpn)) => (id.map_err(|r| r.to_string()), alpn, None),
        Err(e) => (Err(e.to_string()), None, tls_error(&e)),
    };
    let (client_seen_by_server, server_error) = match server_result {
        Ok(id) => (id.map_err(|r| r.to_string()), None),
        Err(e) => (Err(e.to_string()), tls_error(&e)),
    };
    Outcome { server_seen_by_client, client_seen_by_server, client_error, server_error, alpn }
}
