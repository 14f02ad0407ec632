//! Hot-swappable certificate resolvers: a listener or client built once picks up renewed
//! SVIDs on its next handshake, without restarting.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::PrivateKeyDer;

use crate::error::{Result, TrustError};
use crate::svid::Svid;

/// Holds the current SVID as a rustls [`CertifiedKey`].
#[derive(Debug, Default)]
pub struct SvidResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl SvidResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(SvidResolver::default())
    }

    /// A resolver already holding `svid`.
    pub fn with(svid: &Svid) -> Result<Arc<Self>> {
        let r = Self::new();
        r.install(svid)?;
        Ok(r)
    }

    /// Replaces the SVID served from the next handshake on.
    pub fn install(&self, svid: &Svid) -> Result<()> {
        let provider = rustls::crypto::ring::default_provider();
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(svid.key.clone_key()))
            .map_err(|e| TrustError::key(format!("key of {}", svid.id), e.to_string()))?;
        let ck = CertifiedKey::new(svid.chain.clone(), key);
        self.current.store(Some(Arc::new(ck)));
        tracing::debug!(id = %svid.id, not_after = %svid.not_after, "installed SVID");
        Ok(())
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}
