//! X509-SVIDs: checking a certificate against every X509-SVID rule, and the SVID credential
//! (chain + key) with the file layout Envoy and gRPC's file_watcher read.

use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::error::{Result, TrustError};
use crate::files;
use crate::keys;
use crate::spiffe_id::{ParseIdError, SpiffeId, TrustDomain};

/// File names of an SVID on disk (the names Istio, Envoy and gRPC use).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Why a certificate is not a valid X509-SVID (or SVID signing certificate).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is malformed: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN (an X509-SVID has exactly one)")]
    NoUriSan,
    #[error("certificate has {} URI SANs ({}); an X509-SVID has exactly one", .0.len(), .0.join(", "))]
    MultipleUriSans(Vec<String>),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(ParseIdError),
    #[error("leaf SPIFFE ID {0} has no path; only signing certificates may carry a trust domain's root ID")]
    LeafWithoutPath(String),
    #[error("leaf certificate for {0} has cA=true")]
    LeafIsCa(String),
    #[error("leaf certificate for {0} has no key usage extension")]
    NoKeyUsage(String),
    #[error("leaf certificate for {0} has a non-critical key usage extension")]
    KeyUsageNotCritical(String),
    #[error("leaf certificate for {0} lacks the digitalSignature key usage")]
    NoDigitalSignature(String),
    #[error("leaf certificate for {0} has the {1} key usage, which only CAs may have")]
    CaKeyUsageOnLeaf(String, &'static str),
    #[error("leaf certificate for {0} has an extended key usage without {1}")]
    ExtendedKeyUsage(String, &'static str),
    #[error("signing certificate {0} is not a CA (cA=false or no basic constraints)")]
    SignerNotCa(String),
    #[error("signing certificate {0} lacks the keyCertSign key usage")]
    SignerNoKeyCertSign(String),
    #[error("signing certificate carries SPIFFE ID {0}, which has a path")]
    SignerIdWithPath(String),
    #[error("signing certificate belongs to trust domain {found}, not {expected}")]
    SignerOtherTrustDomain { found: String, expected: String },
}

/// What the checks learnt from a valid leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub id: SpiffeId,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(cert)
}

fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(format!("subject alternative names: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn time_of(t: &x509_parser::time::ASN1Time) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The single SPIFFE ID of a certificate (leaf or signer) without any other check.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse(der)?;
    single_id(&cert)
}

fn single_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(cert)?;
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [one] => SpiffeId::new(one).map_err(SvidError::BadId),
        _ => Err(SvidError::MultipleUriSans(uris)),
    }
}

/// Checks every X509-SVID leaf rule and returns the leaf's identity and validity.
pub fn check_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let cert = parse(der)?;
    let id = single_id(&cert)?;
    let ids = id.to_string();
    if id.path().is_empty() {
        return Err(SvidError::LeafWithoutPath(ids));
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| SvidError::Malformed(format!("basic constraints: {e}")))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(SvidError::LeafIsCa(ids));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| SvidError::Malformed(format!("key usage: {e}")))?
        .ok_or_else(|| SvidError::NoKeyUsage(ids.clone()))?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical(ids));
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature(ids));
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::CaKeyUsageOnLeaf(ids, "keyCertSign"));
    }
    if ku.value.crl_sign() {
        return Err(SvidError::CaKeyUsageOnLeaf(ids, "cRLSign"));
    }
    if let Some(eku) = cert
        .extended_key_usage()
        .map_err(|e| SvidError::Malformed(format!("extended key usage: {e}")))?
    {
        if !eku.value.any {
            if !eku.value.server_auth {
                return Err(SvidError::ExtendedKeyUsage(ids, "serverAuth"));
            }
            if !eku.value.client_auth {
                return Err(SvidError::ExtendedKeyUsage(ids, "clientAuth"));
            }
        }
    }
    Ok(LeafInfo {
        id,
        not_before: time_of(&cert.validity().not_before),
        not_after: time_of(&cert.validity().not_after),
    })
}

/// Checks the rules for a certificate that signs SVIDs of `td`: cA=true, keyCertSign, and a
/// SPIFFE ID, if present, that is `td`'s own (no path).
pub fn check_signer(der: &[u8], td: &TrustDomain) -> Result<(), SvidError> {
    let cert = parse(der)?;
    let name = cert.subject().to_string();
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| SvidError::Malformed(format!("basic constraints: {e}")))?
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(SvidError::SignerNotCa(name));
    }
    if let Some(ku) = cert
        .key_usage()
        .map_err(|e| SvidError::Malformed(format!("key usage: {e}")))?
    {
        if !ku.value.key_cert_sign() {
            return Err(SvidError::SignerNoKeyCertSign(name));
        }
    }
    for uri in uri_sans(&cert)? {
        if let Ok(id) = SpiffeId::new(&uri) {
            if !id.path().is_empty() {
                return Err(SvidError::SignerIdWithPath(uri));
            }
            if id.trust_domain_str() != td.as_str() {
                return Err(SvidError::SignerOtherTrustDomain {
                    found: id.trust_domain_str().to_string(),
                    expected: td.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Validity window of any certificate.
pub fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), SvidError> {
    let cert = parse(der)?;
    Ok((
        time_of(&cert.validity().not_before),
        time_of(&cert.validity().not_after),
    ))
}

/// An X509-SVID with its private key: what a workload presents.
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Svid {
    /// Builds an SVID from a chain and key, checking the leaf rules and that the key matches.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> Result<Self> {
        let leaf = chain
            .first()
            .ok_or_else(|| TrustError::cert("certificate chain", "is empty"))?;
        let info =
            check_leaf(leaf).map_err(|e| TrustError::cert("leaf certificate", e.to_string()))?;
        let kp = keys::signing_key(&key, "private key")?;
        if !keys::key_matches_cert(&kp, leaf) {
            return Err(TrustError::key(
                "private key",
                format!(
                    "does not match the public key of the certificate for {}",
                    info.id
                ),
            ));
        }
        Ok(Svid {
            id: info.id,
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Writes `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem` into `dir`.
    pub fn write_files(&self, dir: &Path, roots: &[CertificateDer<'static>]) -> Result<()> {
        files::create_dir(dir)?;
        files::write_atomic(
            &dir.join(CERT_CHAIN_FILE),
            keys::certs_to_pem(&self.chain).as_bytes(),
            files::PUBLIC_MODE,
        )?;
        files::write_atomic(
            &dir.join(KEY_FILE),
            keys::pkcs8_to_pem(&self.key).as_bytes(),
            files::PRIVATE_MODE,
        )?;
        files::write_atomic(
            &dir.join(ROOT_CERT_FILE),
            keys::certs_to_pem(roots).as_bytes(),
            files::PUBLIC_MODE,
        )
    }

    /// Loads an SVID written by [`Svid::write_files`] (the roots are returned beside it).
    pub fn load(dir: &Path) -> Result<(Svid, Vec<CertificateDer<'static>>)> {
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let key_path = dir.join(KEY_FILE);
        let root_path = dir.join(ROOT_CERT_FILE);
        let chain = keys::certs_from_pem(
            &files::read(&chain_path)?,
            &chain_path.display().to_string(),
        )?;
        let key =
            keys::private_key_from_pem(&files::read(&key_path)?, &key_path.display().to_string())?;
        let roots =
            keys::certs_from_pem(&files::read(&root_path)?, &root_path.display().to_string())?;
        Ok((Svid::new(chain, key)?, roots))
    }

    /// When to renew: a uniformly jittered point between 50 % and 80 % of the lifetime, so a
    /// fleet issued at once does not renew at once.
    pub fn renew_at(&self) -> OffsetDateTime {
        renewal_time(self.not_before, self.not_after, rand::random::<f64>())
    }
}

/// The renewal point for a certificate valid from `not_before` to `not_after`, given a
/// jitter `u` in [0, 1): `start + lifetime * (0.5 + 0.3 u)`, where the lifetime counts from
/// the issuance (`not_before` plus the CA's back-dating, [`crate::ca::BACKDATE`]), so that a
/// short-lived certificate is not renewed the moment it arrives.
pub fn renewal_time(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    u: f64,
) -> OffsetDateTime {
    let not_before = if not_after - not_before > crate::ca::BACKDATE {
        not_before + crate::ca::BACKDATE
    } else {
        not_before
    };
    let life = not_after - not_before;
    let frac = 0.5 + 0.3 * u.clamp(0.0, 1.0);
    not_before + life * frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    #[test]
    fn renewal_is_between_half_and_eighty_percent() {
        // Issued at `nb` (valid from a minute before) for 24 hours.
        let nb = OffsetDateTime::UNIX_EPOCH;
        let na = nb + Duration::hours(24);
        let nb_dated = nb - crate::ca::BACKDATE;
        assert_eq!(renewal_time(nb_dated, na, 0.0), nb + Duration::hours(12));
        let hi = renewal_time(nb_dated, na, 0.999_999);
        assert!(hi < nb + Duration::minutes(1152) + Duration::seconds(1));
        assert!(hi > nb + Duration::minutes(1151));
        for _ in 0..1000 {
            let t = renewal_time(nb_dated, na, rand::random());
            assert!(t >= nb + Duration::hours(12) && t <= nb + Duration::minutes(1152));
        }
    }

    /// A certificate back-dated by a minute and valid for 4 s after its issuance renews 2 to
    /// 3.2 s after the issuance, not at once.
    #[test]
    fn short_lived_certificates_count_their_life_from_the_issuance() {
        let issued = OffsetDateTime::UNIX_EPOCH + Duration::hours(1);
        let nb = issued - crate::ca::BACKDATE;
        let na = issued + Duration::seconds(4);
        assert_eq!(renewal_time(nb, na, 0.0), issued + Duration::seconds(2));
        let hi = renewal_time(nb, na, 0.999_999);
        assert!(
            hi > issued + Duration::milliseconds(3199)
                && hi <= issued + Duration::milliseconds(3200)
        );
    }
}
