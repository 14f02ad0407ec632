//! The CA on disk, in Istio's plug-in `cacerts` layout so that Istio tooling reads it and a
//! cluster already running Istio keeps its root:
//!
//! | file | content |
//! | --- | --- |
//! | `ca-cert.pem` | the signing (intermediate) CA certificate |
//! | `ca-key.pem` | its private key, PKCS#8, mode 0600 |
//! | `cert-chain.pem` | `ca-cert.pem` followed by the chain up to and including the root |
//! | `root-cert.pem` | every root currently in the trust bundle |
//!
//! meshfed adds `meshfed-ca.json` (trust domain, bundle sequence, rotation state) and keeps
//! each generation, active or not, under `generations/<n>/` with the same files plus
//! `root-key.pem` when meshfed made the root.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::{CaOptions, CertificateAuthority, Generation, GenerationState, Signer};
use crate::error::{Result, TrustError};
use crate::files;
use crate::keys;
use crate::spiffe_id::TrustDomain;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const METADATA: &str = "meshfed-ca.json";
/// Roots that stay published without a generation of their own (from a plug-in root-cert.pem).
pub const EXTRA_ROOTS: &str = "extra-roots.pem";
const SCHEMA_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Metadata {
    pub(crate) schema_version: u32,
    pub(crate) trust_domain: String,
    pub(crate) bundle_sequence: u64,
    pub(crate) refresh_hint_secs: i64,
    pub(crate) generations: Vec<GenerationMeta>,
}

// No deny_unknown_fields here: serde does not support it together with `flatten`.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct GenerationMeta {
    pub(crate) dir: String,
    #[serde(flatten)]
    pub(crate) state: GenerationState,
    pub(crate) last_issued_expiry: i64,
    /// SHA-256 of the root (absent in files written before rotation ran in the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) root_fingerprint: Option<String>,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    keys::certs_from_pem(&files::read(path)?, &path.display().to_string())
}

fn read_key(path: &Path) -> Result<rcgen::KeyPair> {
    let what = path.display().to_string();
    let pkcs8 = keys::private_key_from_pem(&files::read(path)?, &what)?;
    keys::signing_key(&pkcs8, &what)
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, c)) => c.subject() == c.issuer() && c.verify_signature(None).is_ok(),
        Err(_) => false,
    }
}

fn signed_by(child: &CertificateDer<'_>, parent: &CertificateDer<'_>) -> bool {
    match (
        x509_parser::parse_x509_certificate(child),
        x509_parser::parse_x509_certificate(parent),
    ) {
        (Ok((_, c)), Ok((_, p))) => {
            c.issuer() == p.subject() && c.verify_signature(Some(p.public_key())).is_ok()
        }
        _ => false,
    }
}

/// Loads an Istio plug-in CA directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
/// optional `cert-chain.pem`) for trust domain `td`, checking that the key matches, that the
/// chain links up signature by signature to a root in `root-cert.pem`, and that the signing
/// certificate may sign for `td`.
pub fn load_plugin(
    dir: &Path,
    td: &TrustDomain,
    options: CaOptions,
) -> Result<CertificateAuthority> {
    let generation = load_generation_files(dir, td)?;
    let mut roots = read_certs(&dir.join(ROOT_CERT))?;
    roots.retain(|r| r != &generation.root);
    if !roots.is_empty() {
        tracing::info!(dir = %dir.display(), extra = roots.len(), "root-cert.pem holds roots besides the signing one; they stay in the published bundle");
    }
    let generations = vec![generation];
    Ok(CertificateAuthority {
        trust_domain: td.clone(),
        generations,
        extra_roots: roots,
        bundle_sequence: 1,
        refresh_hint: options.refresh_hint,
        options,
    })
}

fn load_generation_files(dir: &Path, td: &TrustDomain) -> Result<Generation> {
    let ca_cert_path = dir.join(CA_CERT);
    let ca_certs = read_certs(&ca_cert_path)?;
    if ca_certs.len() != 1 {
        return Err(TrustError::cert(
            ca_cert_path.display().to_string(),
            format!(
                "holds {} certificates; expected exactly the signing CA certificate",
                ca_certs.len()
            ),
        ));
    }
    let ca_cert = ca_certs[0].clone();
    crate::svid::check_signer(&ca_cert, td)
        .map_err(|e| TrustError::cert(ca_cert_path.display().to_string(), e.to_string()))?;
    let key_path = dir.join(CA_KEY);
    let key = read_key(&key_path)?;
    if !keys::key_matches_cert(&key, &ca_cert) {
        return Err(TrustError::key(
            key_path.display().to_string(),
            format!(
                "does not match the public key in {}",
                ca_cert_path.display()
            ),
        ));
    }
    let root_path = dir.join(ROOT_CERT);
    let roots = read_certs(&root_path)?;
    let chain_path = dir.join(CERT_CHAIN);
    let mut chain = if chain_path.exists() {
        let chain = read_certs(&chain_path)?;
        if chain[0] != ca_cert {
            return Err(TrustError::cert(
                chain_path.display().to_string(),
                format!(
                    "does not start with the certificate in {}",
                    ca_cert_path.display()
                ),
            ));
        }
        chain
    } else {
        vec![ca_cert.clone()]
    };
    for (i, pair) in chain.windows(2).enumerate() {
        if !signed_by(&pair[0], &pair[1]) {
            return Err(TrustError::cert(
                chain_path.display().to_string(),
                format!(
                    "certificate #{} is not signed by certificate #{}",
                    i + 1,
                    i + 2
                ),
            ));
        }
    }
    // The chain must end at one of the roots: either it includes the root, or its last
    // certificate is signed by one.
    let last = chain.last().cloned().unwrap_or_else(|| ca_cert.clone());
    let root = if let Some(r) = roots.iter().find(|r| **r == last && is_self_signed(r)) {
        r.clone()
    } else if let Some(r) = roots.iter().find(|r| signed_by(&last, r)) {
        chain.push(r.clone());
        r.clone()
    } else {
        return Err(TrustError::cert(
            root_path.display().to_string(),
            format!(
                "no root in it signs the chain of {}",
                ca_cert_path.display()
            ),
        ));
    };
    let root_key_path = dir.join(ROOT_KEY);
    let root_key = if root_key_path.exists() {
        let k = read_key(&root_key_path)?;
        if !keys::key_matches_cert(&k, &root) {
            return Err(TrustError::key(
                root_key_path.display().to_string(),
                "does not match the root certificate",
            ));
        }
        Some(k)
    } else {
        None
    };
    Ok(Generation {
        root,
        root_key,
        signer: Signer::new(chain, key)?,
        state: GenerationState::Active,
        last_issued_expiry: Default::default(),
    })
}

fn write_generation(dir: &Path, g: &Generation) -> Result<()> {
    files::create_dir(dir)?;
    files::write_atomic(
        &dir.join(CA_CERT),
        keys::certs_to_pem([g.signer.cert()]).as_bytes(),
        files::PUBLIC_MODE,
    )?;
    files::write_atomic(
        &dir.join(CA_KEY),
        g.signer.key_pem().as_bytes(),
        files::PRIVATE_MODE,
    )?;
    files::write_atomic(
        &dir.join(CERT_CHAIN),
        keys::certs_to_pem(&g.signer.chain).as_bytes(),
        files::PUBLIC_MODE,
    )?;
    files::write_atomic(
        &dir.join(ROOT_CERT),
        keys::certs_to_pem([&g.root]).as_bytes(),
        files::PUBLIC_MODE,
    )?;
    if let Some(k) = &g.root_key {
        files::write_atomic(
            &dir.join(ROOT_KEY),
            k.serialize_pem().as_bytes(),
            files::PRIVATE_MODE,
        )?;
    }
    Ok(())
}

impl CertificateAuthority {
    /// Writes the CA to `dir`: the Istio layout for the active generation at the top, every
    /// generation under `generations/`, and `meshfed-ca.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        files::create_dir(dir)?;
        let mut metas = Vec::new();
        for (i, g) in self.generations.iter().enumerate() {
            let rel = format!("generations/{i}");
            write_generation(&dir.join(&rel), g)?;
            metas.push(GenerationMeta {
                dir: rel,
                state: g.state.clone(),
                last_issued_expiry: g
                    .last_issued_expiry
                    .load(std::sync::atomic::Ordering::Acquire),
                root_fingerprint: Some(keys::fingerprint(&g.root)),
            });
        }
        let active = self.active();
        files::write_atomic(
            &dir.join(CA_CERT),
            keys::certs_to_pem([active.signer.cert()]).as_bytes(),
            files::PUBLIC_MODE,
        )?;
        files::write_atomic(
            &dir.join(CA_KEY),
            active.signer.key_pem().as_bytes(),
            files::PRIVATE_MODE,
        )?;
        files::write_atomic(
            &dir.join(CERT_CHAIN),
            keys::certs_to_pem(&active.signer.chain).as_bytes(),
            files::PUBLIC_MODE,
        )?;
        files::write_atomic(
            &dir.join(ROOT_CERT),
            keys::certs_to_pem(&self.roots()).as_bytes(),
            files::PUBLIC_MODE,
        )?;
        let meta = Metadata {
            schema_version: SCHEMA_VERSION,
            trust_domain: self.trust_domain.to_string(),
            bundle_sequence: self.bundle_sequence,
            refresh_hint_secs: self.refresh_hint.whole_seconds(),
            generations: metas,
        };
        let extra = dir.join(EXTRA_ROOTS);
        if self.extra_roots.is_empty() {
            if extra.exists() {
                std::fs::remove_file(&extra).map_err(|e| TrustError::io(&extra, e))?;
            }
        } else {
            files::write_atomic(
                &extra,
                keys::certs_to_pem(&self.extra_roots).as_bytes(),
                files::PUBLIC_MODE,
            )?;
        }
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| TrustError::Ca(e.to_string()))?;
        files::write_atomic(&dir.join(METADATA), &json, files::PUBLIC_MODE)
    }

    /// Loads a CA written by [`CertificateAuthority::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let meta_path: PathBuf = dir.join(METADATA);
        let raw = files::read(&meta_path)?;
        let meta: Metadata = serde_json::from_slice(&raw)
            .map_err(|e| TrustError::Ca(format!("{}: {e}", meta_path.display())))?;
        if meta.schema_version != SCHEMA_VERSION {
            return Err(TrustError::Ca(format!(
                "{}: schema version {} is not supported (expected {SCHEMA_VERSION})",
                meta_path.display(),
                meta.schema_version
            )));
        }
        let td = TrustDomain::new(&meta.trust_domain)?;
        let mut generations = Vec::new();
        for gm in meta.generations {
            if gm.dir.contains("..") || gm.dir.starts_with('/') {
                return Err(TrustError::Ca(format!(
                    "{}: generation directory {:?} escapes the CA directory",
                    meta_path.display(),
                    gm.dir
                )));
            }
            let mut g = load_generation_files(&dir.join(&gm.dir), &td)?;
            g.state = gm.state;
            g.last_issued_expiry = gm.last_issued_expiry.into();
            generations.push(g);
        }
        if generations
            .iter()
            .filter(|g| g.state == GenerationState::Active)
            .count()
            != 1
        {
            return Err(TrustError::Ca(format!(
                "{}: exactly one generation must be active",
                meta_path.display()
            )));
        }
        let refresh_hint = Duration::seconds(meta.refresh_hint_secs.max(1));
        let extra = dir.join(EXTRA_ROOTS);
        let extra_roots = if extra.exists() {
            read_certs(&extra)?
        } else {
            Vec::new()
        };
        Ok(CertificateAuthority {
            trust_domain: td,
            generations,
            extra_roots,
            bundle_sequence: meta.bundle_sequence,
            refresh_hint,
            options: CaOptions {
                refresh_hint,
                ..CaOptions::default()
            },
        })
    }

    /// Whether `dir` holds a CA saved by meshfed (as opposed to a bare Istio `cacerts`).
    pub fn exists_in(dir: &Path) -> bool {
        dir.join(METADATA).is_file()
    }

    /// The time the active signing certificate expires.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.signer_not_after()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::policy::AnyWorkload;
    use crate::spiffe_id::SpiffeId;

    #[test]
    fn save_and_load_keep_every_generation_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("east.mesh").unwrap();
        let mut ca = CertificateAuthority::create(td.clone(), CaOptions::default()).unwrap();
        let id = SpiffeId::new("spiffe://east.mesh/ns/a/sa/b").unwrap();
        let leaf = ca
            .issue_svid(&id, &AnyWorkload, Duration::hours(2))
            .unwrap();
        ca.begin_rotation(OffsetDateTime::now_utc(), Duration::minutes(20))
            .unwrap();
        ca.save(dir.path()).unwrap();
        let back = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(back.bundle(), ca.bundle());
        assert_eq!(back.generations().len(), 2);
        assert_eq!(back.generations()[1].state(), ca.generations()[1].state());
        assert_eq!(
            back.generations()[0]
                .last_issued_expiry()
                .map(|t| t.unix_timestamp()),
            Some(leaf.not_after.unix_timestamp())
        );
        // The top level is a loadable Istio plug-in CA on its own.
        let plug = load_plugin(dir.path(), &td, CaOptions::default()).unwrap();
        assert!(plug
            .issue_svid(&id, &AnyWorkload, Duration::hours(1))
            .is_ok());
        // A tampered metadata file is refused with its name.
        std::fs::write(dir.path().join(METADATA), b"{\"schema_version\": 9}").unwrap();
        let e = CertificateAuthority::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("meshfed-ca.json"), "{e}");
    }

    #[test]
    fn plugin_with_mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("east.mesh").unwrap();
        let ca = CertificateAuthority::create(td.clone(), CaOptions::default()).unwrap();
        ca.save(dir.path()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join(CA_KEY), other.serialize_pem()).unwrap();
        let e = load_plugin(dir.path(), &td, CaOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ca-key.pem") && e.contains("does not match"),
            "{e}"
        );
        // And one whose chain is cut off from its root.
        let ca2 = CertificateAuthority::create(td.clone(), CaOptions::default()).unwrap();
        ca.save(dir.path()).unwrap();
        std::fs::write(dir.path().join(ROOT_CERT), keys::certs_to_pem(&ca2.roots())).unwrap();
        std::fs::remove_file(dir.path().join(CERT_CHAIN)).unwrap();
        let e = load_plugin(dir.path(), &td, CaOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("root-cert.pem") && e.contains("no root in it signs"),
            "{e}"
        );
        // A plug-in CA for another trust domain is refused.
        ca.save(dir.path()).unwrap();
        let e = load_plugin(
            dir.path(),
            &TrustDomain::new("west.mesh").unwrap(),
            CaOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("belongs to trust domain east.mesh, not west.mesh"),
            "{e}"
        );
    }
}
