//! mTLS between SPIFFE workloads with rustls: verifiers, hot-swappable SVID resolvers, and
//! ready-made client and server configurations.

pub mod authorize;
pub mod resolver;
pub mod verifier;

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::CertificateDer;

pub use authorize::Authorizer;
pub use resolver::SvidResolver;
pub use verifier::{PeerRole, PinnedRootVerifier, SpiffeVerifier, VerifyError};

use crate::error::{Result, TrustError};
use crate::spiffe_id::SpiffeId;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that presents the resolver's SVID and requires a client SVID that
/// `verifier` accepts.
///
/// Session resumption is off on both sides: a resumed session skips certificate verification,
/// so a peer whose bundle was withdrawn could otherwise keep opening connections.
pub fn server_config(
    resolver: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
) -> Result<ServerConfig> {
    server_config_with(resolver, Arc::new(verifier))
}

fn server_config_with(
    resolver: Arc<SvidResolver>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Ca(format!("TLS configuration: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A server that presents the resolver's SVID and asks no client certificate (a SPIFFE bundle
/// endpoint, `https_spiffe` profile: anyone may read a bundle; the client authenticates the
/// server against the bundle it already holds).
pub fn server_config_no_client(resolver: Arc<SvidResolver>) -> Result<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Ca(format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// Like [`server_config`], but a client may connect without a certificate: handlers then see
/// no peer identity and must refuse what needs one. A certificate that is presented is still
/// fully verified. (The federator's `Join` is the one call made before a cluster has an
/// identity.)
pub fn server_config_optional_client(
    resolver: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
) -> Result<ServerConfig> {
    server_config_with(resolver, Arc::new(verifier::Optional(verifier)))
}

/// A client configuration that presents the resolver's SVID and accepts a server SVID that
/// `verifier` accepts.
pub fn client_config(
    resolver: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
) -> Result<ClientConfig> {
    client_config_with(resolver, Arc::new(verifier))
}

/// A client configuration that presents the resolver's SVID (if any) and checks the server with
/// any rustls verifier (e.g. [`PinnedRootVerifier`]).
pub fn client_config_with(
    resolver: Arc<SvidResolver>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<ClientConfig> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Ca(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The SPIFFE ID of a verified peer, from its presented certificates.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    crate::svid::spiffe_id_of(leaf).ok()
}
