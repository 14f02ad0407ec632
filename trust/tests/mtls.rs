//! mTLS between workloads of two trust domains with rustls, and every way it must fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use time::{Duration, OffsetDateTime};
use trust::tls::Authorizer;

#[test]
fn east_and_west_complete_mtls_when_each_holds_the_others_bundle() {
    let east = ca("east.mesh");
    let west = ca("west.mesh");
    let server = svid(&east, "spiffe://east.mesh/ns/shop/sa/payment");
    let client = svid(&west, "spiffe://west.mesh/ns/shop/sa/order");
    let (c_saw, s_saw) = handshake(
        client_cfg(
            &client,
            store(&[&east]),
            Authorizer::trust_domain(td("east.mesh")),
        ),
        server_cfg(
            &server,
            store(&[&west]),
            Authorizer::id(id("spiffe://west.mesh/ns/shop/sa/order")),
        ),
    )
    .unwrap();
    assert_eq!(c_saw.as_str(), "spiffe://east.mesh/ns/shop/sa/payment");
    assert_eq!(s_saw.as_str(), "spiffe://west.mesh/ns/shop/sa/order");
}

#[test]
fn missing_bundle_is_refused_naming_the_trust_domain() {
    let east = ca("east.mesh");
    let west = ca("west.mesh");
    let server = svid(&east, "spiffe://east.mesh/ns/shop/sa/payment");
    let client = svid(&west, "spiffe://west.mesh/ns/shop/sa/order");
    // The server holds only its own bundle: west's clients cannot be verified.
    let err = handshake(
        client_cfg(&client, store(&[&east]), Authorizer::Any),
        server_cfg(&server, store(&[&east]), Authorizer::Any),
    )
    .unwrap_err();
    assert!(err.starts_with("server:"), "{err}");
    assert!(
        err.contains("no trust bundle for trust domain west.mesh"),
        "{err}"
    );
    // And the client without east's bundle refuses the server.
    let err = handshake(
        client_cfg(&client, store(&[&west]), Authorizer::Any),
        server_cfg(&server, store(&[&west]), Authorizer::Any),
    )
    .unwrap_err();
    assert!(
        err.starts_with("client:") && err.contains("trust domain east.mesh"),
        "{err}"
    );
}

#[test]
fn chain_to_another_root_of_the_same_name_is_refused() {
    let east = ca("east.mesh");
    let impostor = ca("west.mesh");
    let west = ca("west.mesh");
    let server = svid(&east, "spiffe://east.mesh/ns/shop/sa/payment");
    let client = svid(&impostor, "spiffe://west.mesh/ns/shop/sa/order");
    let err = handshake(
        client_cfg(&client, store(&[&east]), Authorizer::Any),
        server_cfg(&server, store(&[&west]), Authorizer::Any),
    )
    .unwrap_err();
    assert!(
        err.contains("does not verify against the bundle of trust domain west.mesh"),
        "{err}"
    );
    assert!(err.contains("does not lead to any root"), "{err}");
}

#[test]
fn west_ca_cannot_speak_for_east() {
    // West's CA signs a certificate claiming an east identity. A verifier that holds both
    // bundles must check it against east's bundle only (no pooled roots) and refuse it.
    let east = ca("east.mesh");
    let west = ca("west.mesh");
    let dir = tempfile::tempdir().unwrap();
    let west_signer = raw_signer(&west, dir.path());
    let (chain, key) = craft(
        &west_signer,
        Craft {
            uris: vec!["spiffe://east.mesh/ns/shop/sa/payment".into()],
            ..Craft::default()
        },
    );
    let server = svid(&east, "spiffe://east.mesh/ns/shop/sa/inventory");
    let err = handshake(
        client_cfg_raw(chain, key, store(&[&east, &west])),
        server_cfg(&server, store(&[&east, &west]), Authorizer::Any),
    )
    .unwrap_err();
    assert!(err.starts_with("server:"), "{err}");
    assert!(
        err.contains("spiffe://east.mesh/ns/shop/sa/payment"),
        "{err}"
    );
    assert!(
        err.contains("bundle of trust domain east.mesh")
            && err.contains("does not lead to any root"),
        "{err}"
    );
}

fn refused_client(spec: Craft) -> String {
    let east = ca("east.mesh");
    let west = ca("west.mesh");
    let dir = tempfile::tempdir().unwrap();
    let signer = raw_signer(&west, dir.path());
    let (chain, key) = craft(&signer, spec);
    let server = svid(&east, "spiffe://east.mesh/ns/shop/sa/payment");
    handshake(
        client_cfg_raw(chain, key, store(&[&east])),
        server_cfg(&server, store(&[&west]), Authorizer::Any),
    )
    .unwrap_err()
}

#[test]
fn expired_leaf_is_refused() {
    let now = OffsetDateTime::now_utc();
    let err = refused_client(Craft {
        uris: vec!["spiffe://west.mesh/ns/shop/sa/order".into()],
        not_before: Some(now - Duration::hours(2)),
        not_after: Some(now - Duration::hours(1)),
        ..Craft::default()
    });
    assert!(err.contains("expired"), "{err}");
    assert!(err.contains("west.mesh"), "{err}");
}

#[test]
fn ca_leaf_is_refused() {
    let err = refused_client(Craft {
        uris: vec!["spiffe://west.mesh/ns/shop/sa/order".into()],
        is_ca: true,
        ..Craft::default()
    });
    assert!(err.contains("cA=true"), "{err}");
}

#[test]
fn two_uri_sans_are_refused() {
    let err = refused_client(Craft {
        uris: vec![
            "spiffe://west.mesh/ns/shop/sa/order".into(),
            "spiffe://west.mesh/ns/shop/sa/admin".into(),
        ],
        ..Craft::default()
    });
    assert!(err.contains("2 URI SANs"), "{err}");
}

#[test]
fn no_uri_san_is_refused() {
    let err = refused_client(Craft::default());
    assert!(err.contains("no URI SAN"), "{err}");
}

#[test]
fn unauthorized_identity_is_refused_by_name() {
    let east = ca("east.mesh");
    let west = ca("west.mesh");
    let server = svid(&east, "spiffe://east.mesh/ns/shop/sa/payment");
    let client = svid(&west, "spiffe://west.mesh/ns/shop/sa/order");
    let err = handshake(
        client_cfg(&client, store(&[&east]), Authorizer::Any),
        server_cfg(
            &server,
            store(&[&west]),
            Authorizer::id(id("spiffe://west.mesh/ns/shop/sa/frontend")),
        ),
    )
    .unwrap_err();
    assert!(
        err.contains("spiffe://west.mesh/ns/shop/sa/order is not authorized"),
        "{err}"
    );
}

#[test]
fn ca_refuses_identities_outside_its_domain_or_policy() {
    use trust::ca::policy::IstioIdentity;
    let east = ca("east.mesh");
    let e = east
        .issue_svid(
            &id("spiffe://west.mesh/ns/a/sa/b"),
            &trust::ca::policy::AnyWorkload,
            Duration::hours(1),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused to issue spiffe://west.mesh/ns/a/sa/b")
            && e.contains("signs only for east.mesh"),
        "{e}"
    );
    let policy = IstioIdentity {
        namespace: "shop".into(),
        service_account: None,
    };
    let e = east
        .issue_svid(
            &id("spiffe://east.mesh/ns/kube-system/sa/admin"),
            &policy,
            Duration::hours(1),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("namespace \"kube-system\""), "{e}");
    assert!(east
        .issue_svid(
            &id("spiffe://east.mesh"),
            &trust::ca::policy::AnyWorkload,
            Duration::hours(1)
        )
        .is_err());
}

#[test]
fn csr_signing_takes_only_the_san_and_checks_policy() {
    use trust::ca::policy::ExactIds;
    let east = ca("east.mesh");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://east.mesh/ns/shop/sa/payment".try_into().unwrap(),
    )];
    // A CSR asking to be a CA gets a leaf anyway: only the SAN is honoured.
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let allowed = ExactIds(vec![id("spiffe://east.mesh/ns/shop/sa/payment")]);
    let issued = east
        .sign_csr(csr.as_bytes(), &allowed, Duration::hours(24))
        .unwrap();
    let info = trust::svid::check_leaf(&issued.chain[0]).unwrap();
    assert_eq!(info.id, issued.id);
    assert!(issued.not_after > OffsetDateTime::now_utc() + Duration::hours(23));
    let other = ExactIds(vec![id("spiffe://east.mesh/ns/shop/sa/order")]);
    let e = east
        .sign_csr(csr.as_bytes(), &other, Duration::hours(24))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("may only obtain spiffe://east.mesh/ns/shop/sa/order"),
        "{e}"
    );
    // Two URI SANs and a DNS SAN are refused with the reason.
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://east.mesh/a".try_into().unwrap()),
        rcgen::SanType::URI("spiffe://east.mesh/b".try_into().unwrap()),
    ];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let e = east
        .sign_csr(
            csr.as_bytes(),
            &trust::ca::policy::AnyWorkload,
            Duration::hours(1),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 URI SANs"), "{e}");
    let e = east
        .sign_csr(
            b"garbage",
            &trust::ca::policy::AnyWorkload,
            Duration::hours(1),
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("certificate signing request:"), "{e}");
}

#[test]
fn issued_svid_satisfies_every_rule_and_carries_full_chain() {
    let east = ca("east.mesh");
    let s = svid(&east, "spiffe://east.mesh/ns/shop/sa/payment");
    assert_eq!(s.chain.len(), 2, "leaf + intermediate");
    let (_, leaf) = x509_parser::parse_x509_certificate(&s.chain[0]).unwrap();
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject => critical SAN");
    assert_eq!(san.value.general_names.len(), 1);
    let ttl = s.not_after - s.not_before;
    assert!(ttl >= Duration::hours(1) && ttl <= Duration::hours(1) + Duration::minutes(2));
}
