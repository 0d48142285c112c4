//! The embedded CA: a root kept offline by the operator, one intermediate per node, and SVID
//! issuance with a node's intermediate behind the [`SvidIssuer`] trait (so an external CA can
//! replace it). All keys are ECDSA P-256.
//!
//! On disk (`ferry ca init DIR`, `ferry ca issue-node DIR NODE`):
//! `DIR/root.pem`, `DIR/root.key`, and `DIR/nodes/NODE/{ca.pem,ca.key,root.pem}`. A node's agent
//! reads only its own node directory, so it never sees the root key. It reads that directory again
//! for every SVID it signs: a renewed intermediate (`ferry ca issue-node` again, an updated
//! Kubernetes Secret) is used without a restart, and a directory that can no longer be read stops
//! issuance (the identity store then keeps each still-valid SVID and retries).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::bundle::{BundleError, TrustBundle};
use super::crypto_provider;
use super::spiffe::{SpiffeId, TrustDomain};

/// Root certificate file in a CA directory.
pub const ROOT_CERT_FILE: &str = "root.pem";
/// Root private key file in a CA directory.
pub const ROOT_KEY_FILE: &str = "root.key";
/// Sub-directory of a CA directory that holds one directory per node.
pub const NODES_DIR: &str = "nodes";
/// A node's intermediate certificate, in its node directory.
pub const NODE_CERT_FILE: &str = "ca.pem";
/// A node's intermediate private key, in its node directory.
pub const NODE_KEY_FILE: &str = "ca.key";
/// The root certificate (trust bundle), copied into each node directory.
pub const NODE_ROOT_FILE: &str = "root.pem";

const DAY: u64 = 24 * 60 * 60;
/// Default lifetime of a root certificate.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY);
/// Default lifetime of a node intermediate.
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(365 * DAY);
/// Default SVID lifetime.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(DAY);
/// Certificates start this far in the past so small clock skew between nodes does not reject them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// What to sign: one SVID for `id` over `public_key`.
#[derive(Debug)]
pub struct SvidRequest<'a> {
    /// The identity the SVID asserts.
    pub id: &'a SpiffeId,
    /// The DER SubjectPublicKeyInfo of the key pair the caller holds.
    pub public_key: &'a SubjectPublicKeyInfoDer<'a>,
    /// Requested lifetime; the CA may shorten it (for example to its own expiry).
    pub ttl: Duration,
    /// The caller's clock; an external CA may use its own instead.
    pub now: UnixTime,
}

/// A certificate authority that signs X.509 SVIDs.
pub trait SvidIssuer: fmt::Debug + Send + Sync {
    /// Signs an SVID and returns the chain, leaf first, without the root.
    fn issue(&self, req: &SvidRequest<'_>) -> Result<Vec<CertificateDer<'static>>, IssueError>;
}

/// Why an SVID could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The requested ID is outside the CA's trust domain.
    #[error("cannot issue {id}: this CA serves trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The requested ID.
        id: SpiffeId,
        /// The CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The requested ID names a trust domain, not a workload.
    #[error("cannot issue {0}: an SVID needs a workload path")]
    NoWorkloadPath(SpiffeId),
    /// The lifetime is too short to be useful.
    #[error("SVID lifetime {0:?} is under one second")]
    TtlTooShort(Duration),
    /// The issuing certificate has expired.
    #[error("cannot issue {id}: the CA certificate expired at {at}")]
    CaExpired {
        /// The requested ID.
        id: SpiffeId,
        /// When the CA certificate expired.
        at: OffsetDateTime,
    },
    /// The public key is not one this CA can certify.
    #[error("cannot issue {id}: unusable public key: {detail}")]
    PublicKey {
        /// The requested ID.
        id: SpiffeId,
        /// The parser's complaint.
        detail: String,
    },
    /// Signing failed.
    #[error("cannot issue {id}: signing failed: {detail}")]
    Sign {
        /// The requested ID.
        id: SpiffeId,
        /// The signer's complaint.
        detail: String,
    },
    /// An external CA could not be reached or refused the request.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    /// The node CA directory no longer holds a usable CA (unreadable, missing, expired, mismatched).
    #[error("cannot sign with the node CA: {cause}")]
    NodeCa {
        /// The node CA directory.
        dir: PathBuf,
        /// What is wrong with it; its message names the file. Boxed: the error travels in every
        /// issuance result, which should stay small.
        cause: Box<CaError>,
    },
    /// The node directory's root differs from the one the agent started with, which its peers'
    /// verification and its own trust bundle still use.
    #[error("{}: the root changed since the agent started; a new root takes a restart", path.display())]
    RootChanged {
        /// The root certificate file.
        path: PathBuf,
    },
}

/// Why CA material could not be created, read or written.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file or directory could not be written.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Creating a root would overwrite an existing one.
    #[error("{}: already exists; refusing to overwrite an existing CA", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A key file holds no PEM private key.
    #[error("{}: not a PEM private key", path.display())]
    NotAKey {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds a key of the wrong kind.
    #[error("{}: not an ECDSA P-256 private key: {detail}", path.display())]
    WrongKeyType {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{}: not a PEM certificate", path.display())]
    NotACert {
        /// The file.
        path: PathBuf,
    },
    /// A certificate is unusable as a CA certificate.
    #[error("{}: {detail}", path.display())]
    BadCert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A private key does not belong to the certificate next to it.
    #[error("{}: key does not match certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// An intermediate was not signed by the root beside it.
    #[error("{}: not signed by root {}", cert.display(), root.display())]
    NotSignedByRoot {
        /// The intermediate certificate file.
        cert: PathBuf,
        /// The root certificate file.
        root: PathBuf,
    },
    /// A certificate has expired.
    #[error("{}: certificate expired at {at}", path.display())]
    Expired {
        /// The file.
        path: PathBuf,
        /// Its notAfter.
        at: OffsetDateTime,
    },
    /// A certificate is not valid yet.
    #[error("{}: certificate not valid until {at}", path.display())]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Its notBefore.
        at: OffsetDateTime,
    },
    /// An intermediate names another trust domain than its root.
    #[error("{}: trust domain {got} differs from the root's {want}", path.display())]
    TrustDomainMismatch {
        /// The intermediate certificate file.
        path: PathBuf,
        /// The intermediate's trust domain.
        got: String,
        /// The root's trust domain.
        want: TrustDomain,
    },
    /// A node name cannot be used as a directory name and certificate subject.
    #[error("invalid node name {0:?}: use 1-253 characters from [a-z0-9.-_], not \".\" or \"..\"")]
    BadNodeName(String),
    /// The root could not form a trust bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Key generation or signing failed.
    #[error("cannot create {what}: {detail}")]
    Generate {
        /// What was being created.
        what: &'static str,
        /// The generator's complaint.
        detail: String,
    },
}

/// A CA certificate with its key.
struct Authority {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    key: KeyPair,
    not_after: i64,
}

impl Authority {
    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, rcgen::Error> {
        Issuer::from_ca_cert_der(&self.cert, &self.key)
    }
}

impl fmt::Debug for Authority {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The trust domain's root CA: creates node intermediates. Its key belongs on the operator's
/// machine, not on nodes.
#[derive(Debug)]
pub struct RootCa {
    auth: Authority,
}

impl RootCa {
    /// Creates a new self-signed root for `trust_domain`, in memory.
    pub fn generate(trust_domain: &TrustDomain, validity: Duration, now: UnixTime) -> Result<Self, CaError> {
        let key = new_key("root CA key")?;
        let mut params = ca_params(trust_domain, "ferry root CA", now, validity, None)?;
        // The root may sign node intermediates, which may sign only leaves.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let cert = params.self_signed(&key).map_err(|e| generate_err("root CA certificate", e))?;
        let not_after = params.not_after.unix_timestamp();
        Ok(Self {
            auth: Authority { trust_domain: trust_domain.clone(), cert: cert.der().clone(), key, not_after },
        })
    }

    /// `ferry ca init DIR`: creates a root and writes `DIR/root.pem` and `DIR/root.key`, refusing to
    /// overwrite an existing root.
    pub fn init_dir(
        dir: &Path,
        trust_domain: &TrustDomain,
        validity: Duration,
        now: UnixTime,
    ) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let root = Self::generate(trust_domain, validity, now)?;
        fs::create_dir_all(dir).map_err(|source| CaError::Write { path: dir.to_owned(), source })?;
        write_file(&key_path, root.auth.key.serialize_pem().as_bytes(), 0o600, true)?;
        write_file(&cert_path, cert_pem(&root.auth.cert).as_bytes(), 0o644, true)?;
        Ok(root)
    }

    /// Loads `DIR/root.pem` and `DIR/root.key`, checking that they form a valid root.
    pub fn load(dir: &Path, now: UnixTime) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
        let cert = read_cert(&cert_path)?;
        let key = read_key(&key_path)?;
        let facts = inspect_ca_cert(&cert_path, &cert, now)?;
        if !facts.self_signed {
            return Err(bad_cert(&cert_path, "not a self-signed root certificate"));
        }
        if key.subject_public_key_info() != facts.spki {
            return Err(CaError::KeyMismatch { key: key_path, cert: cert_path });
        }
        let trust_domain = facts.trust_domain(&cert_path)?;
        Ok(Self { auth: Authority { trust_domain, cert, key, not_after: facts.not_after } })
    }

    /// Creates the intermediate for one node, in memory.
    pub fn issue_node(&self, node: &str, validity: Duration, now: UnixTime) -> Result<NodeCa, CaError> {
        validate_node_name(node)?;
        let key = new_key("node CA key")?;
        let params = ca_params(
            &self.auth.trust_domain,
            &format!("ferry node {node}"),
            now,
            validity,
            Some(self.auth.not_after),
        )?;
        let issuer = self.auth.issuer().map_err(|e| generate_err("node CA certificate", e))?;
        let cert = params.signed_by(&key, &issuer).map_err(|e| generate_err("node CA certificate", e))?;
        let auth = Authority {
            trust_domain: self.auth.trust_domain.clone(),
            cert: cert.der().clone(),
            key,
            not_after: params.not_after.unix_timestamp(),
        };
        NodeCa::new(auth, self.auth.cert.clone())
    }

    /// `ferry ca issue-node DIR NODE`: creates a node intermediate and writes it to
    /// `DIR/nodes/NODE/`, replacing any previous one. Returns the node directory.
    pub fn issue_node_dir(
        &self,
        dir: &Path,
        node: &str,
        validity: Duration,
        now: UnixTime,
    ) -> Result<PathBuf, CaError> {
        let node_ca = self.issue_node(node, validity, now)?;
        let node_dir = dir.join(NODES_DIR).join(node);
        node_ca.write(&node_dir)?;
        Ok(node_dir)
    }

    /// The trust domain this root anchors.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.auth.trust_domain
    }

    /// The root certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.auth.cert
    }
}

/// A node's intermediate CA, which signs the SVIDs of the identities on that node.
#[derive(Debug)]
pub struct NodeCa {
    /// The intermediate as created or first loaded.
    auth: Authority,
    root: CertificateDer<'static>,
    bundle: TrustBundle,
    /// The directory [`NodeCa::load`] read, read again at every issuance; `None` for a CA made
    /// in memory, which signs with `auth`.
    source: Option<PathBuf>,
    /// The intermediate the last issuance signed with, so a renewed one is logged once.
    last_signer: Mutex<CertificateDer<'static>>,
}

impl NodeCa {
    fn new(auth: Authority, root: CertificateDer<'static>) -> Result<Self, CaError> {
        let bundle = TrustBundle::new(auth.trust_domain.clone(), vec![root.clone()])?;
        let last_signer = Mutex::new(auth.cert.clone());
        Ok(Self { auth, root, bundle, source: None, last_signer })
    }

    /// Loads a node directory (`ca.pem`, `ca.key`, `root.pem`), checking that the key matches the
    /// intermediate, that the root signed it, and that both are valid at `now`. The CA keeps the
    /// directory's path and reads it again for each SVID it signs (see the module docs).
    pub fn load(node_dir: &Path, now: UnixTime) -> Result<Self, CaError> {
        let (auth, root) = read_node_dir(node_dir, now)?;
        let mut ca = Self::new(auth, root)?;
        ca.source = Some(node_dir.to_owned());
        Ok(ca)
    }

    /// The authority to sign with at `now`: the one in memory, or the node directory as it is now.
    fn signer(&self, now: UnixTime) -> Result<SignerRef<'_>, IssueError> {
        let Some(dir) = &self.source else { return Ok(SignerRef::Own(&self.auth)) };
        let (auth, root) = read_node_dir(dir, now)
            .map_err(|cause| IssueError::NodeCa { dir: dir.clone(), cause: Box::new(cause) })?;
        // The trust bundle handed out at start (and the peers' bundles) hold the old root.
        if root != self.root {
            return Err(IssueError::RootChanged { path: dir.join(NODE_ROOT_FILE) });
        }
        let mut last = self.last_signer.lock().unwrap_or_else(|p| p.into_inner());
        if *last != auth.cert {
            tracing::info!(
                dir = %dir.display(), not_after = auth.not_after,
                "the node CA's intermediate changed on disk; signing with the new one"
            );
            *last = auth.cert.clone();
        }
        Ok(SignerRef::Fresh(auth))
    }

    /// Writes `ca.pem`, `ca.key` (mode 0600) and `root.pem` into `node_dir`, replacing old files.
    pub fn write(&self, node_dir: &Path) -> Result<(), CaError> {
        fs::create_dir_all(node_dir)
            .map_err(|source| CaError::Write { path: node_dir.to_owned(), source })?;
        write_file(&node_dir.join(NODE_KEY_FILE), self.auth.key.serialize_pem().as_bytes(), 0o600, false)?;
        write_file(&node_dir.join(NODE_CERT_FILE), cert_pem(&self.auth.cert).as_bytes(), 0o644, false)?;
        write_file(&node_dir.join(NODE_ROOT_FILE), cert_pem(&self.root).as_bytes(), 0o644, false)
    }

    /// The roots that this node's peers chain to.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The intermediate certificate as created or first loaded (issuance may use a newer one).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.auth.cert
    }

    /// The intermediate's key, so tests can sign deliberately broken leaves.
    #[cfg(test)]
    pub(crate) fn signing_key(&self) -> &KeyPair {
        &self.auth.key
    }

    /// When the intermediate of [`NodeCa::cert`] expires; SVIDs never outlive the one they are
    /// signed with.
    pub fn not_after(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(self.auth.not_after).unwrap_or(0)))
    }
}

impl SvidIssuer for NodeCa {
    fn issue(&self, req: &SvidRequest<'_>) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        let id = req.id;
        // The root, and so the trust domain, is the one loaded at start (`signer` checks it).
        if !id.is_member_of(&self.auth.trust_domain) {
            return Err(IssueError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.auth.trust_domain.clone(),
            });
        }
        if id.path().is_empty() {
            return Err(IssueError::NoWorkloadPath(id.clone()));
        }
        if req.ttl < Duration::from_secs(1) {
            return Err(IssueError::TtlTooShort(req.ttl));
        }
        let auth = self.signer(req.now)?;
        if secs(req.now) >= auth.not_after {
            return Err(IssueError::CaExpired { id: id.clone(), at: to_datetime(auth.not_after) });
        }
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(req.public_key)
            .map_err(|e| IssueError::PublicKey { id: id.clone(), detail: e.to_string() })?;
        let sign_err = |detail: String| IssueError::Sign { id: id.clone(), detail };

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        let uri = Ia5String::try_from(id.as_str()).map_err(|e| sign_err(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial().map_err(sign_err)?);
        let (not_before, not_after) = validity(req.now, req.ttl, Some(auth.not_after));
        params.not_before = not_before;
        params.not_after = not_after;

        let issuer = auth.issuer().map_err(|e| sign_err(e.to_string()))?;
        let leaf = params.signed_by(&public_key, &issuer).map_err(|e| sign_err(e.to_string()))?;
        Ok(vec![leaf.der().clone(), auth.cert.clone()])
    }
}

/// The authority one issuance signs with.
enum SignerRef<'a> {
    /// The CA's own, for a CA made in memory.
    Own(&'a Authority),
    /// Just read from the node directory.
    Fresh(Authority),
}

impl std::ops::Deref for SignerRef<'_> {
    type Target = Authority;

    fn deref(&self) -> &Authority {
        match self {
            SignerRef::Own(auth) => auth,
            SignerRef::Fresh(auth) => auth,
        }
    }
}

/// Reads and checks a node directory: the intermediate with its key, and the root that signed it.
fn read_node_dir(node_dir: &Path, now: UnixTime) -> Result<(Authority, CertificateDer<'static>), CaError> {
    let cert_path = node_dir.join(NODE_CERT_FILE);
    let key_path = node_dir.join(NODE_KEY_FILE);
    let root_path = node_dir.join(NODE_ROOT_FILE);
    let cert = read_cert(&cert_path)?;
    let key = read_key(&key_path)?;
    let root = read_cert(&root_path)?;

    let root_facts = inspect_ca_cert(&root_path, &root, now)?;
    if !root_facts.self_signed {
        return Err(bad_cert(&root_path, "not a self-signed root certificate"));
    }
    let trust_domain = root_facts.trust_domain(&root_path)?;
    let facts = inspect_ca_cert(&cert_path, &cert, now)?;
    if key.subject_public_key_info() != facts.spki {
        return Err(CaError::KeyMismatch { key: key_path, cert: cert_path });
    }
    if !signed_by(&cert, &root) {
        return Err(CaError::NotSignedByRoot { cert: cert_path, root: root_path });
    }
    match &facts.uri {
        Some(uri) if *uri == trust_domain.id().as_str() => {}
        got => {
            return Err(CaError::TrustDomainMismatch {
                path: cert_path,
                got: got.clone().unwrap_or_else(|| "(none)".into()),
                want: trust_domain,
            });
        }
    }
    Ok((Authority { trust_domain, cert, key, not_after: facts.not_after }, root))
}

/// Certificate parameters shared by the root and node intermediates.
fn ca_params(
    trust_domain: &TrustDomain,
    common_name: &str,
    now: UnixTime,
    lifetime: Duration,
    issuer_not_after: Option<i64>,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let serial = random_serial().map_err(|detail| CaError::Generate { what: "serial number", detail })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    // A unique subject per CA: otherwise a certificate from another root of the same name is
    // reported as a bad signature instead of an unknown issuer.
    let suffix: String = serial.as_ref().iter().take(4).map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("{common_name} {suffix}"));
    params.distinguished_name = dn;
    // The CA's URI SAN names its trust domain, so loading a directory needs no other config.
    let uri =
        Ia5String::try_from(trust_domain.id().as_str()).map_err(|e| generate_err("CA certificate", e))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = issuer_not_after.is_some();
    params.serial_number = Some(serial);
    let (not_before, not_after) = validity(now, lifetime, issuer_not_after);
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// Backdated start and end of a certificate, never past its issuer's end.
fn validity(
    now: UnixTime,
    lifetime: Duration,
    issuer_not_after: Option<i64>,
) -> (OffsetDateTime, OffsetDateTime) {
    let now = secs(now);
    let backdate = i64::try_from(BACKDATE.as_secs()).unwrap_or(0);
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
    let end = now.saturating_add(lifetime).min(issuer_not_after.unwrap_or(i64::MAX));
    (to_datetime(now.saturating_sub(backdate)), to_datetime(end))
}

fn secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

/// Clamps to what X.509 can encode (years 0000-9999).
fn to_datetime(unix: i64) -> OffsetDateTime {
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    OffsetDateTime::from_unix_timestamp(unix.clamp(0, MAX)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    crypto_provider().secure_random.fill(&mut bytes).map_err(|e| format!("no randomness: {e:?}"))?;
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and never zero
    Ok(SerialNumber::from_slice(&bytes))
}

/// PEM text of a DER certificate.
pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref()))
}

fn new_key(what: &'static str) -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate_err(what, e))
}

fn generate_err(what: &'static str, e: impl fmt::Display) -> CaError {
    CaError::Generate { what, detail: e.to_string() }
}

fn bad_cert(path: &Path, detail: impl Into<String>) -> CaError {
    CaError::BadCert { path: path.to_owned(), detail: detail.into() }
}

fn validate_node_name(node: &str) -> Result<(), CaError> {
    let chars_ok = node.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'));
    if node.is_empty() || node.len() > 253 || !chars_ok || node == "." || node == ".." {
        return Err(CaError::BadNodeName(node.to_owned()));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read { path: path.to_owned(), source })
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let pem = read_file(path)?;
    CertificateDer::from_pem_slice(&pem).map_err(|_| CaError::NotACert { path: path.to_owned() })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = read_file(path)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| CaError::NotAKey { path: path.to_owned() })?;
    KeyPair::from_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::WrongKeyType { path: path.to_owned(), detail: e.to_string() })
}

/// Writes a file with `mode`; `create_new` refuses to replace one, otherwise the swap is atomic.
fn write_file(path: &Path, contents: &[u8], mode: u32, create_new: bool) -> Result<(), CaError> {
    let write_err = |source| CaError::Write { path: path.to_owned(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = if create_new { path.to_owned() } else { path.with_file_name(format!(".{file_name}.tmp")) };
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(mode);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let mut file = options.open(&tmp).map_err(write_err)?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(write_err)?;
    if !create_new {
        fs::rename(&tmp, path).map_err(write_err)?;
    }
    Ok(())
}

/// What loading needs to know about a CA certificate.
struct CaCertFacts {
    spki: Vec<u8>,
    uri: Option<String>,
    not_after: i64,
    self_signed: bool,
}

impl CaCertFacts {
    fn trust_domain(&self, path: &Path) -> Result<TrustDomain, CaError> {
        let uri =
            self.uri.as_deref().ok_or_else(|| bad_cert(path, "CA certificate has no spiffe:// URI SAN"))?;
        let td = uri.strip_prefix("spiffe://").ok_or_else(|| {
            bad_cert(path, format!("CA certificate URI SAN {uri:?} is not a spiffe:// trust domain"))
        })?;
        TrustDomain::new(td).map_err(|e| bad_cert(path, format!("CA certificate trust domain {td:?}: {e}")))
    }
}

/// Parses a CA certificate and checks that it is a CA, may sign certificates and is valid at `now`.
fn inspect_ca_cert(path: &Path, der: &CertificateDer<'_>, now: UnixTime) -> Result<CaCertFacts, CaError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| bad_cert(path, format!("cannot parse certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(bad_cert(path, "not a CA certificate (basicConstraints CA is not true)"));
    }
    let can_sign = cert.key_usage().ok().flatten().is_some_and(|ku| ku.value.key_cert_sign());
    if !can_sign {
        return Err(bad_cert(path, "CA certificate lacks the keyCertSign key usage"));
    }
    let validity = cert.validity();
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    let now = secs(now);
    if now > not_after {
        return Err(CaError::Expired { path: path.to_owned(), at: to_datetime(not_after) });
    }
    if now < not_before {
        return Err(CaError::NotYetValid { path: path.to_owned(), at: to_datetime(not_before) });
    }
    let uri = cert.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
    });
    Ok(CaCertFacts {
        spki: cert.public_key().raw.to_vec(),
        uri,
        not_after,
        self_signed: cert.verify_signature(None).is_ok(),
    })
}

/// True when `issuer`'s key made `cert`'s signature.
fn signed_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    match (X509Certificate::from_der(cert), X509Certificate::from_der(issuer)) {
        (Ok((_, cert)), Ok((_, issuer))) => cert.verify_signature(Some(issuer.public_key())).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::test_support::{ago, td, test_now};
    use super::*;

    fn setup_node(dir: &Path, now: UnixTime) -> (RootCa, PathBuf) {
        let root = RootCa::init_dir(dir, &td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        let node_dir = root.issue_node_dir(dir, "node-a", DEFAULT_NODE_VALIDITY, now).unwrap();
        (root, node_dir)
    }

    /// A node CA whose intermediate lives `validity` from `now`.
    fn node_ca(validity: Duration, now: UnixTime) -> NodeCa {
        let root = RootCa::generate(&td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        root.issue_node("node-a", validity, now).unwrap()
    }

    /// A fresh P-256 key pair and its SubjectPublicKeyInfo.
    fn fresh_key() -> (KeyPair, SubjectPublicKeyInfoDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = SubjectPublicKeyInfoDer::from(key.subject_public_key_info());
        (key, spki)
    }

    fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        X509Certificate::from_der(der).unwrap().1
    }

    #[test]
    fn init_and_issue_node_write_loadable_files() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (root, node_dir) = setup_node(dir.path(), now);
        assert_eq!(node_dir, dir.path().join("nodes/node-a"));
        let key_mode = fs::metadata(dir.path().join(ROOT_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let node_key_mode = fs::metadata(node_dir.join(NODE_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(node_key_mode & 0o777, 0o600);

        let loaded_root = RootCa::load(dir.path(), now).unwrap();
        assert_eq!(loaded_root.trust_domain().as_str(), "example.org");
        assert_eq!(loaded_root.cert(), root.cert());

        let node = NodeCa::load(&node_dir, now).unwrap();
        assert_eq!(node.trust_bundle().trust_domain().as_str(), "example.org");
        assert_eq!(node.trust_bundle().certs(), std::slice::from_ref(root.cert()));

        let inter = parse(node.cert());
        let bc = inter.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = inter.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign());
        assert!(inter.verify_signature(Some(parse(root.cert()).public_key())).is_ok());
    }

    #[test]
    fn init_refuses_to_overwrite_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        RootCa::init_dir(dir.path(), &td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        let err = RootCa::init_dir(dir.path(), &td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("root.pem: already exists"), "{err}");
    }

    #[test]
    fn issued_svid_follows_the_x509_svid_profile() {
        let now = test_now();
        let node = node_ca(DEFAULT_NODE_VALIDITY, now);
        let (key, spki) = fresh_key();
        let id = SpiffeId::parse("spiffe://example.org/ns/shop/sa/cart").unwrap();
        let ttl = Duration::from_secs(3600);
        let chain = node.issue(&SvidRequest { id: &id, public_key: &spki, ttl, now }).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], node.cert());

        let leaf = parse(&chain[0]);
        assert!(!leaf.is_ca());
        assert!(leaf.basic_constraints().unwrap().is_some(), "CA=false must be explicit");
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let sans: Vec<_> = leaf.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        assert_eq!(sans, vec![GeneralName::URI("spiffe://example.org/ns/shop/sa/cart")]);
        assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice());
        let v = leaf.validity();
        assert_eq!(v.not_before.timestamp(), secs(now) - 300);
        assert_eq!(v.not_after.timestamp(), secs(now) + 3600);
        assert!(leaf.verify_signature(Some(parse(node.cert()).public_key())).is_ok());
    }

    #[test]
    fn svids_never_outlive_the_intermediate() {
        let now = test_now();
        let node = node_ca(Duration::from_secs(600), now);
        let (_key, spki) = fresh_key();
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        let ttl = DEFAULT_SVID_TTL;
        let chain = node.issue(&SvidRequest { id: &id, public_key: &spki, ttl, now }).unwrap();
        assert_eq!(parse(&chain[0]).validity().not_after.timestamp(), secs(now) + 600);
        assert_eq!(node.not_after().as_secs(), now.as_secs() + 600);
    }

    #[test]
    fn issue_refuses_bad_requests() {
        let now = test_now();
        let node = node_ca(Duration::from_secs(600), now);
        let (_key, spki) = fresh_key();
        let ttl = Duration::from_secs(60);
        let issue = |id: &str, ttl, now| {
            let id = SpiffeId::parse(id).unwrap();
            node.issue(&SvidRequest { id: &id, public_key: &spki, ttl, now })
        };
        let foreign = issue("spiffe://other.org/ns/a/sa/b", ttl, now).unwrap_err();
        assert!(matches!(foreign, IssueError::ForeignTrustDomain { .. }), "{foreign}");
        let bare = issue("spiffe://example.org", ttl, now).unwrap_err();
        assert!(matches!(bare, IssueError::NoWorkloadPath(_)), "{bare}");
        let short = issue("spiffe://example.org/a", Duration::from_millis(10), now).unwrap_err();
        assert!(matches!(short, IssueError::TtlTooShort(_)), "{short}");
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 601));
        let expired = issue("spiffe://example.org/a", ttl, later).unwrap_err();
        assert!(matches!(expired, IssueError::CaExpired { .. }), "{expired}");
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let junk = SubjectPublicKeyInfoDer::from(vec![1u8, 2, 3]);
        let bad_key = node.issue(&SvidRequest { id: &id, public_key: &junk, ttl, now }).unwrap_err();
        assert!(matches!(bad_key, IssueError::PublicKey { .. }), "{bad_key}");
    }

    #[test]
    fn node_names_cannot_escape_the_nodes_dir() {
        let now = test_now();
        let root = RootCa::generate(&td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        for bad in ["", "..", ".", "../x", "a/b", "Node", &"a".repeat(254)] {
            let err = root.issue_node(bad, DEFAULT_NODE_VALIDITY, now).unwrap_err();
            assert!(matches!(err, CaError::BadNodeName(_)), "{bad:?}: {err}");
        }
    }

    /// Loads `node_dir` and returns the error message, which must name `file`.
    fn load_error(node_dir: &Path, now: UnixTime, file: &str) -> String {
        let err = NodeCa::load(node_dir, now).unwrap_err().to_string();
        assert!(err.contains(&format!("nodes/node-a/{file}")), "{err}");
        err
    }

    #[test]
    fn bad_node_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (_root, node_dir) = setup_node(dir.path(), now);
        let good_key = fs::read(node_dir.join(NODE_KEY_FILE)).unwrap();
        let good_cert = fs::read(node_dir.join(NODE_CERT_FILE)).unwrap();

        fs::write(node_dir.join(NODE_KEY_FILE), "not a key\n").unwrap();
        assert!(load_error(&node_dir, now, "ca.key").ends_with("ca.key: not a PEM private key"));

        // A certificate where the key should be is still not a key.
        fs::write(node_dir.join(NODE_KEY_FILE), &good_cert).unwrap();
        assert!(load_error(&node_dir, now, "ca.key").ends_with("not a PEM private key"));

        fs::write(node_dir.join(NODE_KEY_FILE), &good_key).unwrap();
        fs::write(node_dir.join(NODE_CERT_FILE), &good_key).unwrap();
        assert!(load_error(&node_dir, now, "ca.pem").ends_with("ca.pem: not a PEM certificate"));

        fs::write(node_dir.join(NODE_CERT_FILE), &good_cert).unwrap();
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(node_dir.join(NODE_KEY_FILE), other_key.serialize_pem()).unwrap();
        let err = load_error(&node_dir, now, "ca.key");
        assert!(err.contains("key does not match certificate") && err.contains("ca.pem"), "{err}");

        fs::remove_file(node_dir.join(NODE_KEY_FILE)).unwrap();
        assert!(load_error(&node_dir, now, "ca.key").contains("ca.key: cannot read"));

        fs::write(node_dir.join(NODE_KEY_FILE), &good_key).unwrap();
        assert!(NodeCa::load(&node_dir, now).is_ok(), "restored files load again");
    }

    /// Issues one SVID for `spiffe://example.org/ns/a/sa/b` with `node` at `now`.
    fn issue_one(node: &NodeCa, now: UnixTime) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        let (_key, spki) = fresh_key();
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        node.issue(&SvidRequest { id: &id, public_key: &spki, ttl: DEFAULT_SVID_TTL, now })
    }

    #[test]
    fn issuance_reads_the_node_directory_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (_root, node_dir) = setup_node(dir.path(), now);
        let node = NodeCa::load(&node_dir, now).unwrap();
        assert!(issue_one(&node, now).is_ok());
        // The key gone from the node (a lost volume, a deleted Secret): the copy in memory is not
        // used either, so the outage shows (the store keeps its still-valid SVIDs meanwhile).
        let (key, away) = (node_dir.join(NODE_KEY_FILE), node_dir.join("ca.key.away"));
        fs::rename(&key, &away).unwrap();
        let err = issue_one(&node, now).unwrap_err();
        assert!(matches!(err, IssueError::NodeCa { .. }), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("cannot sign with the node CA: "), "{text}");
        assert!(text.contains("nodes/node-a/ca.key: cannot read"), "{text}");
        fs::rename(&away, &key).unwrap();
        assert!(issue_one(&node, now).is_ok(), "issues again once the key is back");
    }

    #[test]
    fn a_renewed_intermediate_is_used_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let root = RootCa::init_dir(dir.path(), &td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        let node_dir = root.issue_node_dir(dir.path(), "node-a", Duration::from_secs(600), now).unwrap();
        let node = NodeCa::load(&node_dir, now).unwrap();
        let first = node.cert().clone();
        // Past the loaded intermediate's end nothing can be signed...
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 601));
        let err = issue_one(&node, later).unwrap_err();
        assert!(err.to_string().contains("ca.pem: certificate expired at"), "{err}");
        // ...until `ferry ca issue-node` renews it, which the running CA picks up.
        root.issue_node_dir(dir.path(), "node-a", DEFAULT_NODE_VALIDITY, now).unwrap();
        let chain = issue_one(&node, later).unwrap();
        assert_ne!(chain[1], first, "signed by the renewed intermediate");
        assert_eq!(chain[1], read_cert(&node_dir.join(NODE_CERT_FILE)).unwrap());
        assert!(parse(&chain[0]).verify_signature(Some(parse(&chain[1]).public_key())).is_ok());
        assert_eq!(node.cert(), &first, "cert() still names the intermediate loaded at start");
    }

    #[test]
    fn a_new_root_on_disk_is_refused_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (_root, node_dir) = setup_node(dir.path(), now);
        let node = NodeCa::load(&node_dir, now).unwrap();
        let bundle = node.trust_bundle().certs().to_vec();
        let other = RootCa::generate(&td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        other.issue_node("node-a", DEFAULT_NODE_VALIDITY, now).unwrap().write(&node_dir).unwrap();
        let err = issue_one(&node, now).unwrap_err();
        assert!(matches!(err, IssueError::RootChanged { .. }), "{err}");
        assert!(err.to_string().contains("nodes/node-a/root.pem: the root changed"), "{err}");
        assert_eq!(node.trust_bundle().certs(), bundle.as_slice(), "the bundle is the one of the start");
    }

    #[test]
    fn an_intermediate_from_another_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (_root, node_dir) = setup_node(dir.path(), now);
        let other = RootCa::generate(&td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        fs::write(node_dir.join(NODE_ROOT_FILE), cert_pem(other.cert())).unwrap();
        let err = load_error(&node_dir, now, "ca.pem");
        assert!(err.contains("not signed by root") && err.contains("root.pem"), "{err}");
    }

    #[test]
    fn an_intermediate_of_another_trust_domain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (root, node_dir) = setup_node(dir.path(), now);
        // Same root key, different trust domain on the root certificate.
        let foreign_params = ca_params(&td("other.org"), "x", now, DEFAULT_ROOT_VALIDITY, None).unwrap();
        let foreign_root = foreign_params.self_signed(&root.auth.key).unwrap();
        fs::write(node_dir.join(NODE_ROOT_FILE), foreign_root.pem()).unwrap();
        let err = load_error(&node_dir, now, "ca.pem");
        assert!(err.contains("trust domain spiffe://example.org differs from the root's other.org"), "{err}");
    }

    #[test]
    fn an_expired_intermediate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let then = ago(test_now(), 2 * 365 * DAY);
        let root = RootCa::init_dir(dir.path(), &td("example.org"), DEFAULT_ROOT_VALIDITY, then).unwrap();
        let node_dir = root.issue_node_dir(dir.path(), "node-a", Duration::from_secs(DAY), then).unwrap();
        let err = load_error(&node_dir, test_now(), "ca.pem");
        assert!(err.contains("ca.pem: certificate expired at"), "{err}");
        assert!(NodeCa::load(&node_dir, then).is_ok());
    }

    #[test]
    fn a_leaf_certificate_is_not_accepted_as_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        let (_root, node_dir) = setup_node(dir.path(), now);
        let node = NodeCa::load(&node_dir, now).unwrap();
        let (key, spki) = fresh_key();
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let chain =
            node.issue(&SvidRequest { id: &id, public_key: &spki, ttl: DEFAULT_SVID_TTL, now }).unwrap();
        fs::write(node_dir.join(NODE_CERT_FILE), cert_pem(&chain[0])).unwrap();
        fs::write(node_dir.join(NODE_KEY_FILE), key.serialize_pem()).unwrap();
        assert!(
            load_error(&node_dir, now, "ca.pem")
                .ends_with("not a CA certificate (basicConstraints CA is not true)")
        );
    }

    #[test]
    fn root_load_checks_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let now = test_now();
        RootCa::init_dir(dir.path(), &td("example.org"), DEFAULT_ROOT_VALIDITY, now).unwrap();
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(dir.path().join(ROOT_KEY_FILE), other_key.serialize_pem()).unwrap();
        let err = RootCa::load(dir.path(), now).unwrap_err().to_string();
        assert!(err.contains("root.key: key does not match certificate"), "{err}");
        let missing = RootCa::load(&dir.path().join("absent"), now).unwrap_err().to_string();
        assert!(missing.contains("absent/root.pem: cannot read"), "{missing}");
    }
}
