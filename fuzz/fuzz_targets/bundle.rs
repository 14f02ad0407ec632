//! Bundle and bundle-map parsing must never panic; an accepted bundle must write back to JSON
//! that parses to the same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust::bundle::parse_bundle_map;
use trust::{TrustBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(td) = TrustDomain::new("fuzz.mesh") else {
        return;
    };
    if let Ok(b) = TrustBundle::from_json(td.clone(), s, "fuzz") {
        if let Ok(text) = b.to_json() {
            let back = TrustBundle::from_json(td, &text, "roundtrip");
            assert_eq!(back.as_ref().ok(), Some(&b), "round trip changed the bundle");
        }
    }
    let _ = parse_bundle_map(s, "fuzz");
});
