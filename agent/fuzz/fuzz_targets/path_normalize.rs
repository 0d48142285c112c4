//! Istio's path normalization decides what policy matches and what the app is sent: whatever the
//! request target, it must not panic, and what it returns must be a fixed point that no dot segment,
//! query, fragment or encoded NUL survives (the shapes of CVE-2019-9901, CVE-2021-31920 and
//! CVE-2021-39156).

#![no_main]

use ferry::http::path::{Normalization, normalize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    for mode in [Normalization::Base, Normalization::MergeSlashes, Normalization::DecodeAndMergeSlashes] {
        let Ok(path) = normalize(target, mode) else { continue };
        assert!(path.starts_with('/'), "{target:?} -> {path:?} ({mode:?}) is not absolute");
        assert!(!path.contains(['?', '#', '\\']), "{target:?} -> {path:?} ({mode:?}) kept a query, fragment or backslash");
        for segment in path.split('/') {
            assert!(segment != "." && segment != "..", "{target:?} -> {path:?} ({mode:?}) kept a dot segment");
        }
        assert!(!path.contains("%00"), "{target:?} -> {path:?} ({mode:?}) kept an encoded NUL");
        if mode != Normalization::Base {
            assert!(!path.contains("//"), "{target:?} -> {path:?} ({mode:?}) kept a double slash");
        }
        let again = normalize(&path, mode);
        assert_eq!(again.as_deref(), Ok(path.as_str()), "{target:?}: normalizing {path:?} ({mode:?}) again changed it");
    }
});
