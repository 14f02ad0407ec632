//! SPIFFE bundle JSON: round trip and strict parsing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::*;
use serde_json::json;
use trust::bundle::{bundle_map_json, parse_bundle_map};
use trust::{BundleError, BundleSet, TrustBundle};

fn b64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

#[test]
fn round_trip() {
    let east = ca("east.mesh");
    let b = east.bundle();
    let text = b.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = &v["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert!(key.get("kid").is_none());
    assert_eq!(key["x5c"].as_array().unwrap().len(), 1);
    assert_eq!(v["spiffe_sequence"], 1);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    let back = TrustBundle::from_json(td("east.mesh"), &text, "bundle.json").unwrap();
    assert_eq!(back, b);

    let west = ca("west.mesh");
    let map = bundle_map_json([&b, &west.bundle()]).unwrap();
    let parsed = parse_bundle_map(&map, "map.json").unwrap();
    assert_eq!(parsed.len(), 2);
    assert!(parsed.contains(&b) && parsed.contains(&west.bundle()));
}

#[test]
fn duplicate_trust_domains_in_a_map_are_rejected() {
    let east = ca("east.mesh");
    let one = east.bundle().to_json().unwrap();
    let text =
        format!("{{\"trust_domains\": {{\n\"east.mesh\": {one},\n\"east.mesh\": {one}\n}}}}");
    let e = parse_bundle_map(&text, "map.json").unwrap_err().to_string();
    assert!(
        e.contains("map.json") && e.contains("duplicate key \"east.mesh\""),
        "{e}"
    );
    assert!(e.contains("line"), "{e}");
    let e = parse_bundle_map(r#"{"trust_domains": {"East.Mesh": {"keys": []}}}"#, "m")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trust_domains.East.Mesh") && e.contains("uppercase"),
        "{e}"
    );
}

#[test]
fn keys_with_unknown_use_or_kty_are_ignored() {
    let east = ca("east.mesh");
    let root = b64(&east.roots()[0]);
    let doc = json!({"keys": [
        {"use": "jwt-svid", "kty": "EC", "kid": "abc", "crv": "P-256", "x": "AA", "y": "AA"},
        {"use": "something-new", "kty": "EC", "x5c": [root]},
        {"use": "x509-svid", "kty": "QUANTUM", "x5c": [root]},
        {"kty": "EC", "x5c": [root]},
        {"use": "x509-svid", "kty": "EC", "x5c": [root]}
    ], "spiffe_sequence": 7});
    let b = TrustBundle::from_json(td("east.mesh"), &doc.to_string(), "b").unwrap();
    assert_eq!(b.x509_authorities.len(), 1);
    assert_eq!(b.sequence, Some(7));
}

fn reject(doc: serde_json::Value) -> String {
    TrustBundle::from_json(td("east.mesh"), &doc.to_string(), "bundle.json")
        .unwrap_err()
        .to_string()
}

#[test]
fn x5c_with_zero_or_two_certificates_is_rejected() {
    let east = ca("east.mesh");
    let root = b64(&east.roots()[0]);
    let e = reject(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": []}]}));
    assert!(
        e.contains("keys[0].x5c") && e.contains("holds 0 certificates"),
        "{e}"
    );
    let e = reject(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [root, root]}]}));
    assert!(
        e.contains("keys[0].x5c") && e.contains("holds 2 certificates"),
        "{e}"
    );
}

#[test]
fn malformed_entries_are_rejected_with_their_location() {
    let east = ca("east.mesh");
    let root = b64(&east.roots()[0]);
    let leaf = svid(&east, "spiffe://east.mesh/ns/a/sa/b");
    let e = reject(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["%%%"]}]}));
    assert!(e.contains("keys[0].x5c[0]") && e.contains("base64"), "{e}");
    let e =
        reject(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [b64(&leaf.chain[0])]}]}));
    assert!(e.contains("not a CA"), "{e}");
    let e = reject(json!({"keys": [{"use": "x509-svid", "kty": "RSA", "x5c": [root]}]}));
    assert!(e.contains("keys[0].kty"), "{e}");
    let e =
        reject(json!({"keys": [{"use": "x509-svid", "kty": "EC", "kid": "k1", "x5c": [root]}]}));
    assert!(e.contains("keys[0].kid"), "{e}");
    let e =
        reject(json!({"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-384", "x5c": [root]}]}));
    assert!(e.contains("keys[0].crv"), "{e}");
    let e = reject(json!({"spiffe_sequence": 1}));
    assert!(e.contains("keys: is missing"), "{e}");
    let e = reject(json!({"keys": [], "spiffe_sequence": -1}));
    assert!(e.contains("spiffe_sequence"), "{e}");
    let e = TrustBundle::from_json(td("east.mesh"), "{\"keys\": [\n", "bundle.json")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("bundle.json: invalid JSON") && e.contains("line 2"),
        "{e}"
    );
}

#[test]
fn bundle_sequence_cannot_go_back() {
    let mut east = ca("east.mesh");
    let old = east.bundle();
    east.begin_rotation(time::OffsetDateTime::now_utc(), time::Duration::minutes(1))
        .unwrap();
    let new = east.bundle();
    let mut set = BundleSet::new();
    set.update(new.clone()).unwrap();
    match set.update(old) {
        Err(BundleError::Regression {
            offered: 1,
            held: 2,
            ..
        }) => {}
        other => panic!("expected a regression error, got {other:?}"),
    }
    assert_eq!(set.get("east.mesh"), Some(&new));
}
