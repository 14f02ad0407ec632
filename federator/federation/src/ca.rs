//! The federation CA (in `<state-dir>/ca`): it signs the federator's server certificate and one
//! cluster certificate per member, `spiffe://<td>/cluster/<id>`.

use std::path::Path;

use anyhow::Context;
use meshfed_identity::ids::{admin_spiffe_id, cluster_spiffe_id, federator_spiffe_id};
use meshfed_identity::live_ca::LiveCa;
use rustls_pki_types::CertificateDer;
use time::Duration;
use trust::ca::policy::ExactIds;
use trust::{CaOptions, CertificateAuthority, IssuedCert, Svid, TrustDomain};

/// Trust domain of the federation when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "federation.meshfed";
/// Lifetime of cluster certificates; agents renew them at 50-80 % of it.
pub const CLUSTER_CERT_TTL: Duration = Duration::days(7);
/// Lifetime of the federator's own serving certificate.
pub const SERVER_CERT_TTL: Duration = Duration::hours(24);

pub struct FederationCa {
    pub trust_domain: TrustDomain,
    /// The CA as `meshfed ca rotate --ca <state-dir>/ca` sees it: one directory, one lock.
    pub live: LiveCa,
    /// Lifetime of cluster certificates.
    pub cluster_ttl: Duration,
    /// Lifetime of the federator's serving certificate.
    pub server_ttl: Duration,
}

impl std::fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationCa")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl FederationCa {
    /// Loads `<state_dir>/ca`, which must exist (commands other than the federator itself
    /// never create a federation CA).
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("ca");
        if !CertificateAuthority::exists_in(&dir) {
            anyhow::bail!(
                "{} is not a federator's state directory (it holds no federation CA); start `meshfed federator --state-dir {}` once, which creates it",
                state_dir.display(),
                state_dir.display()
            );
        }
        Self::open_or_create(state_dir, None)
    }

    /// Loads `<state_dir>/ca`, creating it for `td` the first time.
    pub fn open_or_create(state_dir: &Path, td: Option<&TrustDomain>) -> anyhow::Result<Self> {
        let dir = state_dir.join("ca");
        if CertificateAuthority::exists_in(&dir) {
            let ca = CertificateAuthority::load(&dir)?;
            if let Some(td) = td {
                anyhow::ensure!(
                    ca.trust_domain() == td,
                    "{} holds the CA of federation trust domain {}, not {td}",
                    dir.display(),
                    ca.trust_domain()
                );
            }
        } else {
            let td = match td {
                Some(t) => t.clone(),
                None => TrustDomain::new(DEFAULT_TRUST_DOMAIN)?,
            };
            let ca = CertificateAuthority::create(td, CaOptions::default())?;
            ca.save(&dir)
                .with_context(|| format!("cannot write the federation CA to {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), trust_domain = %ca.trust_domain(), "created the federation CA");
        }
        let live = LiveCa::open(dir)?;
        Ok(FederationCa {
            trust_domain: live.trust_domain(),
            live,
            cluster_ttl: CLUSTER_CERT_TTL,
            server_ttl: SERVER_CERT_TTL,
        })
    }

    /// The root joiners pin: the one that signs now (a CA always has one active generation;
    /// the first published root stands in should it not).
    pub fn root(&self) -> Option<CertificateDer<'static>> {
        self.live
            .signing_root()
            .or_else(|| self.live.roots().into_iter().next())
    }

    pub fn root_fingerprint(&self) -> String {
        self.root()
            .map(|r| trust::keys::fingerprint(&r))
            .unwrap_or_default()
    }

    pub fn bundle(&self) -> trust::TrustBundle {
        self.live.bundle()
    }

    pub fn not_after(&self) -> time::OffsetDateTime {
        self.live.signer_not_after()
    }

    /// Signs a cluster's CSR; its URI SAN must be exactly that cluster's federation identity.
    /// The issuance is recorded, so a retiring root stays published while this certificate
    /// is valid.
    pub fn sign_cluster(&self, csr_der: &[u8], cluster: &str) -> anyhow::Result<IssuedCert> {
        let id = cluster_spiffe_id(&self.trust_domain, cluster)?;
        self.live
            .sign_csr(csr_der, &ExactIds(vec![id]), self.cluster_ttl)
    }

    /// An operator's admin certificate, `spiffe://<td>/admin/<name>`, valid `ttl` (the key is
    /// made here and written only to the operator's identity directory).
    pub fn issue_admin(&self, name: &str, ttl: Duration) -> anyhow::Result<Svid> {
        let id = admin_spiffe_id(&self.trust_domain, name)?;
        self.live.issue_svid(&id, &ExactIds(vec![id.clone()]), ttl)
    }

    /// The federator's serving certificate; its chain ends with every published root so a
    /// joiner can pin the one its token names.
    pub fn server_svid(&self) -> anyhow::Result<Svid> {
        let id = federator_spiffe_id(&self.trust_domain)?;
        let mut svid = self
            .live
            .issue_svid(&id, &ExactIds(vec![id.clone()]), self.server_ttl)?;
        svid.chain.extend(self.live.roots());
        Ok(svid)
    }
}
