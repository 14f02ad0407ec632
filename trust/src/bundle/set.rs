//! The bundles a verifier trusts, keyed by trust domain and never merged, and the shared,
//! lock-free handle ([`TrustStore`]) through which listeners see bundle updates live.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::TrustAnchor;

use super::{BundleError, TrustBundle};
use crate::spiffe_id::TrustDomain;

/// A bundle together with the trust anchors derived from it.
#[derive(Debug)]
pub struct BundleEntry {
    pub bundle: TrustBundle,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
}

impl BundleEntry {
    fn new(bundle: TrustBundle) -> Result<Self, BundleError> {
        let mut anchors = Vec::with_capacity(bundle.x509_authorities.len());
        for (i, cert) in bundle.x509_authorities.iter().enumerate() {
            let a = webpki::anchor_from_trusted_cert(cert).map_err(|e| BundleError::Unusable {
                trust_domain: bundle.trust_domain.to_string(),
                reason: format!("authority #{} cannot be a trust anchor: {e}", i + 1),
            })?;
            anchors.push(a.to_owned());
        }
        Ok(BundleEntry { bundle, anchors })
    }
}

/// Bundles keyed by trust domain.
#[derive(Debug, Default, Clone)]
pub struct BundleSet {
    entries: BTreeMap<TrustDomain, Arc<BundleEntry>>,
}

/// What [`BundleSet::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updated {
    Added,
    Replaced,
    Unchanged,
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the bundle of its trust domain, replacing any previous one.
    pub fn insert(&mut self, bundle: TrustBundle) -> Result<(), BundleError> {
        let td = bundle.trust_domain.clone();
        self.entries.insert(td, Arc::new(BundleEntry::new(bundle)?));
        Ok(())
    }

    /// Like [`insert`](Self::insert), but refuses a bundle whose `spiffe_sequence` is older
    /// than the one held (a replayed or rolled-back bundle).
    pub fn update(&mut self, bundle: TrustBundle) -> Result<Updated, BundleError> {
        if let Some(old) = self.entries.get(&bundle.trust_domain) {
            if old.bundle == bundle {
                return Ok(Updated::Unchanged);
            }
            if let (Some(held), Some(offered)) = (old.bundle.sequence, bundle.sequence) {
                if offered < held {
                    return Err(BundleError::Regression {
                        trust_domain: bundle.trust_domain.to_string(),
                        offered,
                        held,
                    });
                }
            }
            self.insert(bundle)?;
            return Ok(Updated::Replaced);
        }
        self.insert(bundle)?;
        Ok(Updated::Added)
    }

    pub fn remove(&mut self, td: &TrustDomain) -> Option<TrustBundle> {
        self.entries.remove(td).map(|e| e.bundle.clone())
    }

    pub fn get(&self, td: &str) -> Option<&TrustBundle> {
        self.entry(td).map(|e| &e.bundle)
    }

    pub(crate) fn entry(&self, td: &str) -> Option<&Arc<BundleEntry>> {
        // TrustDomain orders by its string, so a borrowed lookup is a linear scan only when
        // the name is not a valid trust domain (which never matches anyway).
        TrustDomain::new(td).ok().and_then(|t| self.entries.get(&t))
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.entries.keys()
    }

    pub fn bundles(&self) -> impl Iterator<Item = &TrustBundle> {
        self.entries.values().map(|e| &e.bundle)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A shared, atomically swapped [`BundleSet`]. Verifiers hold a clone and read the current set
/// on every handshake; updates are copy-on-write and never block a handshake.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    inner: Arc<ArcSwap<BundleSet>>,
}

impl TrustStore {
    pub fn new(set: BundleSet) -> Self {
        TrustStore {
            inner: Arc::new(ArcSwap::from_pointee(set)),
        }
    }

    /// The current set.
    pub fn load(&self) -> Arc<BundleSet> {
        self.inner.load_full()
    }

    /// Replaces the whole set.
    pub fn store(&self, set: BundleSet) {
        self.inner.store(Arc::new(set));
    }

    /// Applies [`BundleSet::update`] to one bundle.
    pub fn update(&self, bundle: TrustBundle) -> Result<Updated, BundleError> {
        let mut result = Ok(Updated::Unchanged);
        self.inner.rcu(|cur| {
            let mut next = BundleSet::clone(cur);
            result = next.update(bundle.clone());
            next
        });
        result
    }

    /// Removes a trust domain's bundle (a peer that left the federation).
    pub fn remove(&self, td: &TrustDomain) {
        self.inner.rcu(|cur| {
            let mut next = BundleSet::clone(cur);
            next.remove(td);
            next
        });
    }
}
