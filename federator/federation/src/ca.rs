//! The federation CA (in `<state-dir>/ca`): it signs the federator's server certificate and one
//! cluster certificate per member, `spiffe://<td>/cluster/<id>`.

use std::path::Path;

use anyhow::Context;
use meshfed_identity::ids::{cluster_spiffe_id, federator_spiffe_id};
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
    ca: std::sync::Mutex<CertificateAuthority>,
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationCa")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl FederationCa {
    /// Loads `<state_dir>/ca`, creating it for `td` the first time.
    pub fn open_or_create(state_dir: &Path, td: Option<&TrustDomain>) -> anyhow::Result<Self> {
        let dir = state_dir.join("ca");
        let ca = if CertificateAuthority::exists_in(&dir) {
            let ca = CertificateAuthority::load(&dir)?;
            if let Some(td) = td {
                anyhow::ensure!(
                    ca.trust_domain() == td,
                    "{} holds the CA of federation trust domain {}, not {td}",
                    dir.display(),
                    ca.trust_domain()
                );
            }
            ca
        } else {
            let td = match td {
                Some(t) => t.clone(),
                None => TrustDomain::new(DEFAULT_TRUST_DOMAIN)?,
            };
            let ca = CertificateAuthority::create(td, CaOptions::default())?;
            ca.save(&dir)
                .with_context(|| format!("cannot write the federation CA to {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), trust_domain = %ca.trust_domain(), "created the federation CA");
            ca
        };
        Ok(FederationCa {
            trust_domain: ca.trust_domain().clone(),
            ca: std::sync::Mutex::new(ca),
            dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CertificateAuthority> {
        self.ca.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The root certificate joiners pin.
    pub fn root(&self) -> CertificateDer<'static> {
        self.lock().roots()[0].clone()
    }

    pub fn root_fingerprint(&self) -> String {
        trust::keys::fingerprint(&self.root())
    }

    pub fn bundle(&self) -> trust::TrustBundle {
        self.lock().bundle()
    }

    pub fn not_after(&self) -> time::OffsetDateTime {
        self.lock().expires_at()
    }

    /// Signs a cluster's CSR; its URI SAN must be exactly that cluster's federation identity.
    pub fn sign_cluster(&self, csr_der: &[u8], cluster: &str) -> anyhow::Result<IssuedCert> {
        let id = cluster_spiffe_id(&self.trust_domain, cluster)?;
        let ca = self.lock();
        let issued = ca.sign_csr(csr_der, &ExactIds(vec![id]), CLUSTER_CERT_TTL)?;
        ca.save(&self.dir)?;
        Ok(issued)
    }

    /// The federator's serving certificate; its chain ends with the root so a joiner can pin it.
    pub fn server_svid(&self) -> anyhow::Result<Svid> {
        let id = federator_spiffe_id(&self.trust_domain)?;
        let ca = self.lock();
        let mut svid = ca.issue_svid(&id, &ExactIds(vec![id.clone()]), SERVER_CERT_TTL)?;
        svid.chain.extend(ca.roots());
        Ok(svid)
    }
}
