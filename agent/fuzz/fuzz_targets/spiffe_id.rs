//! SPIFFE IDs arrive from peers' certificates (the URI SAN), from policy principals and from the
//! mesh file: whatever the string, parsing must not panic, and an ID it accepts must keep the
//! spec's promises, since policy compares IDs as strings: it reads back unchanged, splits into a
//! trust domain and a path that rebuild it, has no query, fragment, port, user info, dot segment or
//! empty segment, fits in 2048 bytes, and a `/ns/NS/sa/SA` ID rebuilds from its parts.

#![no_main]

use ferry::identity::spiffe::{MAX_SPIFFE_ID_LEN, validate};
use ferry::identity::{SpiffeId, SpiffeIdError, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_id(text);
    // The same bytes as a bare trust domain and as a path, so mutations need not keep the prefix.
    check_trust_domain(text);
    check_id(&format!("spiffe://example.org/{text}"));
    // Kubernetes-style parts, as the proxy builds them from a pod's namespace and service account.
    let (ns, sa) = text.split_once('\n').unwrap_or((text, "default"));
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    if let Ok(id) = SpiffeId::workload(&td, ns, sa) {
        assert_eq!((id.namespace(), id.service_account()), (Some(ns), Some(sa)), "{id}");
        assert!(id.is_member_of(&td), "{id}");
    }
});

fn check_id(text: &str) {
    let parsed = SpiffeId::parse(text);
    assert_eq!(
        parsed.as_ref().map(|id| id.trust_domain().len() + "spiffe://".len()),
        validate(text).as_ref().copied()
    );
    let id = match parsed {
        Ok(id) => id,
        Err(e) => {
            // The message names the offending character for operators: it must build.
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(id.as_str(), text);
    assert_eq!(id.to_string(), text);
    assert!(text.len() <= MAX_SPIFFE_ID_LEN, "{} bytes accepted", text.len());
    assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), text);
    let rest = &text["spiffe://".len()..];
    assert!(!rest.contains(['?', '#', '@', ':', '%', '\\']), "{text:?} accepted");
    let td =
        TrustDomain::new(id.trust_domain()).unwrap_or_else(|e| panic!("{text:?}: its trust domain: {e}"));
    assert!(id.is_member_of(&td));
    assert_eq!(SpiffeId::parse(td.id().as_str()), Ok(td.id()), "{text:?}: its trust domain's own ID");
    if !id.path().is_empty() {
        assert!(id.path().starts_with('/'), "{text:?}");
        for segment in id.path()[1..].split('/') {
            assert!(!matches!(segment, "" | "." | ".."), "{text:?} accepted with segment {segment:?}");
        }
    }
    if let (Some(ns), Some(sa)) = (id.namespace(), id.service_account()) {
        assert_eq!(SpiffeId::workload(&td, ns, sa).as_ref(), Ok(&id), "{text:?}");
    }
    assert_eq!(text.parse::<SpiffeId>().as_ref(), Ok(&id));
}

fn check_trust_domain(text: &str) {
    let Ok(td) = TrustDomain::new(text) else { return };
    assert_eq!(td.as_str(), text);
    let id = td.id();
    assert_eq!((id.trust_domain(), id.path()), (text, ""), "{text:?}");
    // A trust domain's own ID is a SPIFFE ID like any other, unless the name alone is too long to be
    // one: TrustDomain::new does not bound the length, the ID parser does.
    match SpiffeId::parse(id.as_str()) {
        Ok(parsed) => assert_eq!(parsed, id),
        Err(SpiffeIdError::TooLong(_)) => {}
        Err(e) => panic!("{text:?} is a trust domain but spiffe://{text} is refused: {e}"),
    }
}
