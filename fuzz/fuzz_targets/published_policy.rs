//! A failover policy published by another cluster (the `failover_policy` of an export) arrives
//! from the network: checking it must never panic, and an accepted policy must write back to
//! YAML that parses to the same policy (what the importer compiles is what was published).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshfed_model::validate::check_published_policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let export = proto::ServiceExport {
        namespace: "shop".into(),
        name: "payment".into(),
        failover_policy: text.to_string(),
        ..Default::default()
    };
    if let Ok(p) = check_published_policy(&export, "fuzz") {
        let again = proto::ServiceExport {
            failover_policy: p.to_yaml(),
            ..export
        };
        let back = check_published_policy(&again, "roundtrip");
        assert_eq!(back.as_ref().ok(), Some(&p), "round trip changed the policy");
    }
});
