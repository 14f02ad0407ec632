//! Helpers shared by the trust crate's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use time::{Duration, OffsetDateTime};
use trust::ca::policy::AnyWorkload;
use trust::tls::{self, Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CaOptions, CertificateAuthority, SpiffeId, Svid, TrustDomain, TrustStore};

pub fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub fn ca(name: &str) -> CertificateAuthority {
    CertificateAuthority::create(td(name), CaOptions::default()).unwrap()
}

pub fn svid(ca: &CertificateAuthority, s: &str) -> Svid {
    ca.issue_svid(&id(s), &AnyWorkload, Duration::hours(1))
        .unwrap()
}

pub fn store(bundles: &[&CertificateAuthority]) -> TrustStore {
    let mut set = BundleSet::new();
    for c in bundles {
        set.insert(c.bundle()).unwrap();
    }
    TrustStore::new(set)
}

pub fn server_cfg(svid: &Svid, store: TrustStore, auth: Authorizer) -> Arc<ServerConfig> {
    let r = SvidResolver::with(svid).unwrap();
    Arc::new(tls::server_config(r, SpiffeVerifier::new(store, auth)).unwrap())
}

pub fn client_cfg(svid: &Svid, store: TrustStore, auth: Authorizer) -> Arc<ClientConfig> {
    let r = SvidResolver::with(svid).unwrap();
    Arc::new(tls::client_config(r, SpiffeVerifier::new(store, auth)).unwrap())
}

/// Runs a handshake in memory. Ok((id the client saw, id the server saw)) or Err(the first
/// side's error, prefixed with "client:" or "server:").
pub fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<(SpiffeId, SpiffeId), String> {
    let mut c = ClientConnection::new(client, ServerName::try_from("peer").unwrap()).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        if let Err(e) = s.process_new_packets() {
            return Err(format!("server: {e}"));
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        if let Err(e) = c.process_new_packets() {
            return Err(format!("client: {e}"));
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            let seen_by_client = tls::peer_id(c.peer_certificates()).unwrap();
            let seen_by_server = tls::peer_id(s.peer_certificates()).unwrap();
            return Ok((seen_by_client, seen_by_server));
        }
    }
    Err("handshake did not finish".into())
}

/// A certificate authority's signing key and certificate as loaded from its saved directory,
/// for crafting certificates that break the rules.
pub struct RawSigner {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: KeyPair,
}

pub fn raw_signer(ca: &CertificateAuthority, dir: &Path) -> RawSigner {
    ca.save(dir).unwrap();
    let chain =
        trust::keys::certs_from_pem(&std::fs::read(dir.join("cert-chain.pem")).unwrap(), "chain")
            .unwrap();
    let k =
        trust::keys::private_key_from_pem(&std::fs::read(dir.join("ca-key.pem")).unwrap(), "key")
            .unwrap();
    RawSigner {
        chain,
        key: trust::keys::signing_key(&k, "key").unwrap(),
    }
}

/// How a crafted leaf deviates from a proper SVID.
#[derive(Default)]
pub struct Craft {
    pub uris: Vec<String>,
    pub is_ca: bool,
    pub not_before: Option<OffsetDateTime>,
    pub not_after: Option<OffsetDateTime>,
}

/// Signs a crafted leaf with `signer`; returns it as an SVID-like pair (chain, key) that
/// bypasses the leaf checks of `Svid::new`.
pub fn craft(
    signer: &RawSigner,
    spec: Craft,
) -> (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = spec
        .uris
        .iter()
        .map(|u| SanType::URI(u.as_str().try_into().unwrap()))
        .collect();
    if spec.is_ca {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = spec.not_before.unwrap_or(now - Duration::minutes(1));
    p.not_after = spec.not_after.unwrap_or(now + Duration::hours(1));
    let issuer = Issuer::from_ca_cert_der(&signer.chain[0], &signer.key).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let mut chain = vec![cert.der().clone()];
    chain.extend(signer.chain[..signer.chain.len() - 1].iter().cloned());
    (chain, PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A client config presenting a crafted (possibly invalid) chain.
pub fn client_cfg_raw(
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    store: TrustStore,
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier::new(store, Authorizer::Any)))
        .with_client_auth_cert(chain, key.into())
        .unwrap();
    Arc::new(cfg)
}
