//! The verifiers of workload mTLS read a peer's certificate chain before anything else is known of
//! it, on both ends of every tunnel: whatever the bytes, they must not panic, must refuse with one
//! counted reason, and must never accept a certificate our CA did not sign. The input is the chain
//! as DER certificates back to back (the end entity first, then up to three intermediates; bytes
//! that do not frame as DER end the chain as one last certificate), checked at a fixed time by
//! both the client verifier (server side) and the server verifier (client side) against a fixed
//! trust anchor.
//!
//! The anchor is generated with rcgen at start from a published fuzzing-only key, so the seed
//! chains in corpus/svid_verifier, signed under that key, reach the signature, chain and SPIFFE
//! checks instead of stopping at an unknown issuer. The seeds are compiled in with what each
//! verifier must decide of them; any other accepted end entity is a finding.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry::identity::verifier::{SpiffeClientVerifier, SpiffeServerVerifier, peer_identity, svid_id};
use ferry::identity::{
    RejectReason, Rejection, RejectionCounters, SpiffeId, TrustBundle, TrustDomain, crypto_provider,
};
use libfuzzer_sys::fuzz_target;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

/// The fuzzing root's P-256 key. Not a secret: the seeds are signed under it, which is what lets
/// mutations of them reach past the issuer lookup. Nothing outside this target trusts it.
const ROOT_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgK76Od+g8o7ljsrt2
7LFfEfHNj6xFjd3umhUP3J9bQVuhRANCAASu1g6s1/CVIzI9y6Tf/FOlVIfJfKoE
RvgcAiamzz3y6g2DY/BobyUxaEQ9+25gOX5HCrLGeCsr6xEzJEoe6TqT
-----END PRIVATE KEY-----
";

/// Every seed chain (all signed under the fuzzing root) and what the client and server verifiers
/// decide of it: `None` accepts, otherwise the reason. Checked at start, so the target cannot pass
/// vacuously; and their end entities are the only ones that may ever be accepted.
const SEEDS: [(&[u8], Option<RejectReason>, Option<RejectReason>); 12] = {
    use RejectReason as R;
    macro_rules! seed {
        ($file:literal) => {
            include_bytes!(concat!("../corpus/svid_verifier/", $file))
        };
    }
    [
        (seed!("client-svid.der"), None, Some(R::UnexpectedIdentity)),
        (seed!("server-svid.der"), None, None),
        (seed!("server-svid-from-root.der"), None, None),
        (seed!("leaf-with-root-and-junk.der"), None, None),
        // serverAuth only: a server may present it, a client may not.
        (seed!("server-auth-only.der"), Some(R::BadChain), None),
        (seed!("leaf-without-intermediate.der"), Some(R::UnknownIssuer), Some(R::UnknownIssuer)),
        (seed!("expired.der"), Some(R::Expired), Some(R::Expired)),
        (seed!("ca-leaf.der"), Some(R::LeafIsCa), Some(R::LeafIsCa)),
        (seed!("intermediate-as-leaf.der"), Some(R::LeafIsCa), Some(R::LeafIsCa)),
        (seed!("two-uri-sans.der"), Some(R::MultipleUriSans), Some(R::MultipleUriSans)),
        (seed!("dns-san-only.der"), Some(R::NoUriSan), Some(R::NoUriSan)),
        (seed!("foreign-trust-domain.der"), Some(R::ForeignTrustDomain), Some(R::ForeignTrustDomain)),
    ]
};

/// The identity the server verifier expects, as a client's pool names it.
const SERVER: &str = "spiffe://example.org/ns/b/sa/server";

/// The end entity plus this many intermediates at most: deeper chains only repeat the same checks.
const MAX_CERTS: usize = 4;

struct Fixture {
    client: SpiffeClientVerifier,
    server: SpiffeServerVerifier,
    counters: Arc<RejectionCounters>,
    /// The end entities of [`SEEDS`]: the only ones our fuzzing CA signed.
    signed: Vec<&'static [u8]>,
    /// 2026-01-01: inside every seed's validity but the expired one's, on any day the target runs.
    now: UnixTime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let td = TrustDomain::new("example.org").expect("trust domain");
        let bundle = TrustBundle::new(td.clone(), vec![root(&td)]).expect("bundle");
        let counters = Arc::new(RejectionCounters::default());
        let server_id = SpiffeId::parse(SERVER).expect("id");
        let fixture = Fixture {
            client: SpiffeClientVerifier::new(bundle.clone(), counters.clone(), crypto_provider())
                .expect("client verifier"),
            server: SpiffeServerVerifier::new(bundle, [server_id], counters.clone(), crypto_provider()),
            counters,
            signed: SEEDS.iter().map(|(chain, _, _)| split(chain)[0]).collect(),
            now: UnixTime::since_unix_epoch(Duration::from_secs(1_767_225_600)),
        };
        for (i, &(chain, client_says, server_says)) in SEEDS.iter().enumerate() {
            let (leaf, intermediates) = chain_of(chain);
            let to_client = fixture.client.verify_svid(&leaf, &intermediates, fixture.now);
            let to_server = fixture.server.verify_svid(&leaf, &intermediates, fixture.now);
            assert_eq!(to_client.err().map(|r| r.reason), client_says, "seed {i}, client verifier");
            assert_eq!(to_server.err().map(|r| r.reason), server_says, "seed {i}, server verifier");
        }
        fixture
    })
}

/// The trust anchor: the same subject and key as the root the seeds were signed under (webpki's
/// anchor is only those and name constraints, so its own signature may differ).
fn root(td: &TrustDomain) -> CertificateDer<'static> {
    let key = KeyPair::from_pem(ROOT_KEY).expect("root key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, "ferry fuzz root");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(td.id().as_str()).expect("uri"))];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(SerialNumber::from_slice(&[0x01, 0x02]));
    params.not_before = date_time_ymd(2025, 1, 1);
    params.not_after = date_time_ymd(2035, 1, 1);
    params.self_signed(&key).expect("root certificate").der().clone()
}

/// The certificates of `data`: each DER SEQUENCE in turn, and what does not frame as one last.
fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut certs = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && certs.len() < MAX_CERTS - 1 {
        let Some(len) = der_len(rest) else { break };
        let (cert, tail) = rest.split_at(len);
        certs.push(cert);
        rest = tail;
    }
    if !rest.is_empty() || certs.is_empty() {
        certs.push(rest);
    }
    certs
}

/// The length of the DER SEQUENCE at the start of `data`, header included, if it fits.
fn der_len(data: &[u8]) -> Option<usize> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (header, body) = match first {
        0..=0x7f => (2, usize::from(first)),
        0x81..=0x83 => {
            let n = usize::from(first - 0x80);
            let bytes = rest.get(..n)?;
            (2 + n, bytes.iter().fold(0, |len, &b| len << 8 | usize::from(b)))
        }
        _ => return None,
    };
    let len = header + body;
    (len <= data.len()).then_some(len)
}

fn chain_of(data: &[u8]) -> (CertificateDer<'_>, Vec<CertificateDer<'_>>) {
    let mut certs = split(data).into_iter().map(CertificateDer::from);
    let leaf = certs.next().expect("split gives at least one");
    (leaf, certs.collect())
}

fn rejections(counters: &RejectionCounters) -> u64 {
    counters.snapshot().iter().map(|&(_, n)| n).sum()
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (leaf, intermediates) = chain_of(data);
    let before = rejections(&f.counters);

    // What rustls calls on the server side, so the rejection must come back out of its error.
    let to_client = f.client.verify_client_cert(&leaf, &intermediates, f.now).map(|_| ()).map_err(|e| {
        Rejection::from_rustls(&e).cloned().unwrap_or_else(|| panic!("not a counted rejection: {e}"))
    });
    let to_server = f.server.verify_svid(&leaf, &intermediates, f.now);
    let refused = u64::from(to_client.is_err()) + u64::from(to_server.is_err());
    assert_eq!(rejections(&f.counters) - before, refused, "each refusal is counted once");

    let profile = svid_id(&leaf);
    let chain: Vec<CertificateDer<'_>> = std::iter::once(leaf.clone()).chain(intermediates.clone()).collect();
    assert_eq!(peer_identity(Some(&chain)), profile);
    if let Err(rejection) = &profile {
        // The leaf profile is checked first: a leaf that fails it fails both verifiers for that reason.
        let _ = rejection.to_string();
        assert_eq!(to_client.as_ref().map_err(|r| r.reason), Err(rejection.reason));
        assert_eq!(to_server.as_ref().map_err(|r| r.reason), Err(rejection.reason));
    }
    if to_client.is_ok() || to_server.is_ok() {
        assert!(
            f.signed.contains(&leaf.as_ref()),
            "an end entity our CA did not sign was accepted: {:02x?}",
            leaf.as_ref()
        );
        let id = profile.as_ref().expect("an accepted leaf has an SVID profile");
        assert_eq!(id.trust_domain(), "example.org");
        if let Ok(server_id) = &to_server {
            assert_eq!(server_id.as_str(), SERVER);
        }
    }
});
