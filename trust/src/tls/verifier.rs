//! rustls verifiers for SPIFFE peers. The peer's trust domain is taken from its SVID; the chain
//! is validated against that trust domain's bundle only (bundles are never pooled); the
//! X509-SVID rules are enforced; then the peer's ID is authorized.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::authorize::Authorizer;
use crate::bundle::TrustStore;
use crate::spiffe_id::SpiffeId;
use crate::svid::{self, SvidError};

/// Why a peer was refused. Every message names the peer's identity or trust domain.
///
/// `Debug` prints the same text as `Display`, because rustls shows the verifier's error with
/// `{:?}` in its own messages.
#[derive(Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("peer certificate is not a valid X509-SVID: {0}")]
    Svid(Box<SvidError>),
    #[error("no trust bundle for trust domain {trust_domain}, so {id} cannot be verified")]
    NoBundle { trust_domain: String, id: String },
    #[error("certificate for {id} does not verify against the bundle of trust domain {trust_domain}: {reason}")]
    Chain {
        id: String,
        trust_domain: String,
        reason: String,
    },
    #[error("intermediate certificate in the chain of {id} is not a signing certificate of trust domain {trust_domain}: {reason}")]
    Intermediate {
        id: String,
        trust_domain: String,
        reason: Box<SvidError>,
    },
    #[error("{id} is not authorized: {reason}")]
    Unauthorized { id: String, reason: String },
}

impl std::fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Which side the peer plays, which decides the extended key usage required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Server,
    Client,
}

fn describe_webpki(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => "the chain does not lead to any root in that bundle".into(),
        E::CertExpired { not_after, .. } => {
            format!("certificate expired at {} (unix seconds)", not_after.as_secs())
        }
        E::CertNotValidYet { not_before, .. } => {
            format!("certificate is not valid before {} (unix seconds)", not_before.as_secs())
        }
        E::InvalidSignatureForPublicKey => {
            "the chain does not lead to any root in that bundle (a certificate names an issuer found there, but its signature does not verify)".into()
        }
        E::CaUsedAsEndEntity => "the leaf is a CA certificate".into(),
        E::EndEntityUsedAsCa => "a leaf certificate was used as an intermediate".into(),
        E::RequiredEkuNotFoundContext(_) => {
            "the certificate lacks the extended key usage for this role".into()
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "the chain uses an unsupported signature algorithm".into()
        }
        other => format!("{other:?}"),
    }
}

/// The three signature-checking methods every verifier here shares: handshake signatures are
/// checked with the provider's algorithms (`self.algs()`), whatever the certificate policy.
macro_rules! signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, self.algs())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, self.algs())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs().supported_schemes()
        }
    };
}

/// Verifies SPIFFE peers against a live [`TrustStore`].
#[derive(Debug, Clone)]
pub struct SpiffeVerifier {
    store: TrustStore,
    authorizer: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    fn algs(&self) -> &WebPkiSupportedAlgorithms {
        &self.algorithms
    }

    pub fn new(store: TrustStore, authorizer: Authorizer) -> Self {
        SpiffeVerifier {
            store,
            authorizer,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    pub fn store(&self) -> &TrustStore {
        &self.store
    }

    /// Verifies a presented chain (leaf, then intermediates) at `now` and returns the peer's ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, VerifyError> {
        let leaf = svid::check_leaf(end_entity).map_err(|e| VerifyError::Svid(Box::new(e)))?;
        let id = leaf.id;
        let td = id.trust_domain();
        let set = self.store.load();
        let entry = set
            .entry(td.as_str())
            .ok_or_else(|| VerifyError::NoBundle {
                trust_domain: td.to_string(),
                id: id.to_string(),
            })?;
        let chain_err = |reason: String| VerifyError::Chain {
            id: id.to_string(),
            trust_domain: td.to_string(),
            reason,
        };
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| chain_err(describe_webpki(&e)))?;
        let usage = match role {
            PeerRole::Server => webpki::KeyUsage::server_auth(),
            PeerRole::Client => webpki::KeyUsage::client_auth(),
        };
        let path = ee
            .verify_for_usage(
                self.algorithms.all,
                &entry.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| chain_err(describe_webpki(&e)))?;
        // Peers may send extra certificates; only those on the verified path must be signing
        // certificates of the leaf's own trust domain.
        for inter in path.intermediate_certificates() {
            svid::check_signer(&inter.der(), &td).map_err(|reason| VerifyError::Intermediate {
                id: id.to_string(),
                trust_domain: td.to_string(),
                reason: Box::new(reason),
            })?;
        }
        self.authorizer
            .check(&id)
            .map_err(|reason| VerifyError::Unauthorized {
                id: id.to_string(),
                reason,
            })?;
        Ok(id)
    }

    fn rustls_error(e: VerifyError) -> rustls::Error {
        tracing::warn!(error = %e, "refused TLS peer");
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server name is not used: SPIFFE peers are identified by their SPIFFE ID.
        self.verify(end_entity, intermediates, now, PeerRole::Server)
            .map(|_| ServerCertVerified::assertion())
            .map_err(Self::rustls_error)
    }

    signature_methods!();
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Peers come from many trust domains; hints would only leak the bundle set.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, PeerRole::Client)
            .map(|_| ClientCertVerified::assertion())
            .map_err(Self::rustls_error)
    }

    signature_methods!();
}

/// A client verifier that lets clients without a certificate through (see
/// `server_config_optional_client`), and fully verifies those that present one.
#[derive(Debug)]
pub(crate) struct Optional(pub(crate) SpiffeVerifier);

impl Optional {
    fn algs(&self) -> &WebPkiSupportedAlgorithms {
        &self.0.algorithms
    }
}

impl ClientCertVerifier for Optional {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        ClientCertVerifier::verify_client_cert(&self.0, end_entity, intermediates, now)
    }

    signature_methods!();
}

/// Verifies a server before any bundle is known, by a pinned root: the server must send a
/// certificate whose SHA-256 is `pin`, and the rest of its chain must verify as an SVID of
/// `trust_domain` under that root (with `authorizer` applied). This is how a joining cluster
/// trusts the federator named in its join token.
#[derive(Debug)]
pub struct PinnedRootVerifier {
    pin: String,
    trust_domain: crate::spiffe_id::TrustDomain,
    authorizer: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedRootVerifier {
    fn algs(&self) -> &WebPkiSupportedAlgorithms {
        &self.algorithms
    }

    pub fn new(
        pin: &str,
        trust_domain: crate::spiffe_id::TrustDomain,
        authorizer: Authorizer,
    ) -> Self {
        PinnedRootVerifier {
            pin: pin.to_ascii_lowercase(),
            trust_domain,
            authorizer,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedRootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let root = intermediates
            .iter()
            .find(|c| crate::keys::fingerprint(c) == self.pin)
            .ok_or_else(|| {
                let got: Vec<String> = intermediates.iter().map(|c| crate::keys::fingerprint(c)).collect();
                rustls::Error::General(format!(
                    "the server's CA does not match the pinned fingerprint sha256:{} (it sent sha256:[{}])",
                    self.pin,
                    got.join(", ")
                ))
            })?;
        let mut set = crate::bundle::BundleSet::new();
        set.insert(crate::bundle::TrustBundle::new(
            self.trust_domain.clone(),
            vec![root.clone().into_owned()],
        ))
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| *c != root)
            .cloned()
            .collect();
        SpiffeVerifier::new(TrustStore::new(set), self.authorizer.clone())
            .verify(end_entity, &rest, now, PeerRole::Server)
            .map(|_| ServerCertVerified::assertion())
            .map_err(SpiffeVerifier::rustls_error)
    }

    signature_methods!();
}
