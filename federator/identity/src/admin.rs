//! An operator's identity for the federator's admin API, on disk (`meshfed federator
//! admin-identity --out DIR`): a short-lived certificate `spiffe://<federation>/admin/<name>`
//! signed by the federation CA, its key, the federation bundle to check the federator with, and
//! where the federator is served.
//!
//! | file | content |
//! | --- | --- |
//! | `admin.json` | name, federation trust domain, federator addresses, expiry |
//! | `cert-chain.pem`, `key.pem` (0600), `root-cert.pem` | the admin certificate |
//! | `federation-bundle.json` | the federation CA's SPIFFE bundle |

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use trust::tls::SvidResolver;
use trust::{Svid, TrustBundle};

pub const ADMIN_FILE: &str = "admin.json";
const BUNDLE_FILE: &str = "federation-bundle.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub name: String,
    pub federation_trust_domain: String,
    /// host:port of every replica when the identity was made.
    pub federators: Vec<String>,
    /// Unix seconds: the certificate's expiry.
    pub expires: i64,
}

/// An operator's admin identity, loaded.
#[derive(Debug, Clone)]
pub struct AdminIdentity {
    pub file: AdminFile,
    pub svid: Svid,
    pub federation_bundle: TrustBundle,
    pub dir: PathBuf,
}

impl AdminIdentity {
    /// Writes an identity issued for `file.name` into `dir`.
    pub fn write(
        dir: &Path,
        file: &AdminFile,
        svid: &Svid,
        federation_bundle: &TrustBundle,
    ) -> anyhow::Result<()> {
        svid.write_files(dir, &federation_bundle.x509_authorities)
            .with_context(|| format!("cannot write the admin certificate to {}", dir.display()))?;
        trust::files::write_atomic(
            &dir.join(BUNDLE_FILE),
            federation_bundle.to_json()?.as_bytes(),
            trust::files::PUBLIC_MODE,
        )?;
        trust::files::write_atomic(
            &dir.join(ADMIN_FILE),
            &serde_json::to_vec_pretty(file)?,
            trust::files::PUBLIC_MODE,
        )?;
        Ok(())
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(ADMIN_FILE);
        let raw = std::fs::read(&path).with_context(|| {
            format!(
                "{} not found: make an admin identity with `meshfed federator admin-identity --out {}`",
                path.display(),
                dir.display()
            )
        })?;
        let file: AdminFile = serde_json::from_slice(&raw)
            .with_context(|| format!("{} is malformed", path.display()))?;
        let (svid, _) = Svid::load(dir)
            .with_context(|| format!("cannot load the admin certificate in {}", dir.display()))?;
        let federation_bundle =
            crate::cluster::read_federation_bundle(dir, &file.federation_trust_domain)
                .with_context(|| format!("{}: the federation bundle", path.display()))?;
        Ok(AdminIdentity {
            file,
            svid,
            federation_bundle,
            dir: dir.to_path_buf(),
        })
    }

    /// Refuses an identity whose certificate expired (the federator would refuse it, less
    /// clearly).
    pub fn check_current(&self, now: i64) -> anyhow::Result<()> {
        anyhow::ensure!(
            now < self.file.expires,
            "the admin identity in {} ({}) expired at {}: make a new one with `meshfed federator admin-identity`",
            self.dir.display(),
            self.file.name,
            time::OffsetDateTime::from_unix_timestamp(self.file.expires)
                .map(|t| t.to_string())
                .unwrap_or_default()
        );
        Ok(())
    }

    /// An mTLS client configuration for the admin API: this identity's certificate, and the
    /// federator checked as the federation's federator identity.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        crate::cluster::federator_client_config(
            SvidResolver::with(&self.svid)?,
            &self.federation_bundle,
            &self.file.federation_trust_domain,
        )
    }
}
