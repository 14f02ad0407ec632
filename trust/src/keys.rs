//! PEM parsing of certificates and private keys, and conversion of every key encoding found
//! in the field (PKCS#8, SEC1 `EC PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY`) into PKCS#8, which is
//! what rcgen, rustls and gRPC's file_watcher want.

use pkcs8::der::{Decode, Encode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};

use crate::error::{Result, TrustError};

/// All certificates in a PEM document, in order. `what` names the source in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    for (i, item) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let der = item.map_err(|e| TrustError::Pem {
            what: what.to_string(),
            reason: format!("certificate #{} is not valid PEM: {e}", i + 1),
        })?;
        x509_parser::parse_x509_certificate(&der).map_err(|e| {
            TrustError::cert(
                what,
                format!(
                    "certificate #{} is not a valid X.509 certificate: {e}",
                    i + 1
                ),
            )
        })?;
        out.push(der);
    }
    if out.is_empty() {
        return Err(TrustError::Pem {
            what: what.to_string(),
            reason: "no \"BEGIN CERTIFICATE\" block found".into(),
        });
    }
    Ok(out)
}

/// PEM-encodes certificates, one block each.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect()
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Parses the first private key in a PEM document and returns it as PKCS#8.
pub fn private_key_from_pem(pem: &[u8], what: &str) -> Result<PrivatePkcs8KeyDer<'static>> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        TrustError::key(
            what,
            format!(
                "no private key found ({e}); expected \"PRIVATE KEY\", \"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\" PEM"
            ),
        )
    })?;
    to_pkcs8(key, what)
}

const OID_EC_PUBLIC_KEY: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_RSA_ENCRYPTION: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Converts any supported key encoding into PKCS#8.
pub fn to_pkcs8(key: PrivateKeyDer<'_>, what: &str) -> Result<PrivatePkcs8KeyDer<'static>> {
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k.clone_key()),
        PrivateKeyDer::Sec1(k) => sec1_to_pkcs8(&k, what),
        PrivateKeyDer::Pkcs1(k) => pkcs1_to_pkcs8(&k, what),
        _ => Err(TrustError::key(what, "unsupported private key encoding")),
    }
}

fn sec1_to_pkcs8(key: &PrivateSec1KeyDer<'_>, what: &str) -> Result<PrivatePkcs8KeyDer<'static>> {
    let ec = sec1::EcPrivateKey::from_der(key.secret_sec1_der())
        .map_err(|e| TrustError::key(what, format!("malformed SEC1 EC private key: {e}")))?;
    let curve = ec
        .parameters
        .and_then(|p| p.named_curve())
        .ok_or_else(|| TrustError::key(what, "SEC1 EC private key does not name its curve"))?;
    if ec.public_key.is_none() {
        return Err(TrustError::key(
            what,
            "SEC1 EC private key lacks its public key; convert it with `openssl pkcs8 -topk8 -nocrypt`",
        ));
    }
    let info = pkcs8::PrivateKeyInfo {
        algorithm: pkcs8::AlgorithmIdentifierRef {
            oid: OID_EC_PUBLIC_KEY,
            parameters: Some(pkcs8::der::asn1::AnyRef::from(&curve)),
        },
        private_key: key.secret_sec1_der(),
        public_key: None,
    };
    encode_info(&info, what)
}

fn pkcs1_to_pkcs8(key: &PrivatePkcs1KeyDer<'_>, what: &str) -> Result<PrivatePkcs8KeyDer<'static>> {
    let info = pkcs8::PrivateKeyInfo {
        algorithm: pkcs8::AlgorithmIdentifierRef {
            oid: OID_RSA_ENCRYPTION,
            parameters: Some(pkcs8::der::asn1::AnyRef::NULL),
        },
        private_key: key.secret_pkcs1_der(),
        public_key: None,
    };
    encode_info(&info, what)
}

fn encode_info(
    info: &pkcs8::PrivateKeyInfo<'_>,
    what: &str,
) -> Result<PrivatePkcs8KeyDer<'static>> {
    let der = info
        .to_der()
        .map_err(|e| TrustError::key(what, format!("cannot re-encode key as PKCS#8: {e}")))?;
    Ok(PrivatePkcs8KeyDer::from(der))
}

/// Loads a PKCS#8 key into an rcgen key pair (for signing certificates).
pub fn signing_key(pkcs8: &PrivatePkcs8KeyDer<'_>, what: &str) -> Result<rcgen::KeyPair> {
    rcgen::KeyPair::try_from(pkcs8).map_err(|e| {
        TrustError::key(
            what,
            format!("unsupported or malformed key ({e}); ECDSA P-256/P-384, Ed25519 and RSA are supported"),
        )
    })
}

/// PEM for a CSR (`CERTIFICATE REQUEST`), as Istio's CA API takes it.
pub fn csr_to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE REQUEST", der)
}

/// PEM for a PKCS#8 key (`PRIVATE KEY`).
pub fn pkcs8_to_pem(key: &PrivatePkcs8KeyDer<'_>) -> String {
    pem_block("PRIVATE KEY", key.secret_pkcs8_der())
}

/// Whether `key` is the private half of the public key in `cert`.
pub fn key_matches_cert(key: &rcgen::KeyPair, cert: &CertificateDer<'_>) -> bool {
    use rcgen::PublicKeyData;
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, c)) => {
            c.tbs_certificate
                .subject_pki
                .subject_public_key
                .data
                .as_ref()
                == key.der_bytes()
        }
        Err(_) => false,
    }
}

/// A new ECDSA P-256 key and a CSR (DER) whose single URI SAN is `id`. The key stays with the
/// caller; only the CSR travels.
pub fn key_and_csr(
    id: &crate::spiffe_id::SpiffeId,
) -> Result<(PrivatePkcs8KeyDer<'static>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names =
        vec![rcgen::SanType::URI(id.as_str().try_into().map_err(
            |_| TrustError::Csr(format!("{id} is not a valid URI")),
        )?)];
    let csr = params.serialize_request(&key)?;
    Ok((
        PrivatePkcs8KeyDer::from(key.serialize_der()),
        csr.der().to_vec(),
    ))
}

/// SHA-256 of a DER certificate, lowercase hex (how meshfed pins a CA).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_roundtrip_and_mismatch() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let pem = kp.serialize_pem();
        let k = private_key_from_pem(pem.as_bytes(), "key.pem").unwrap();
        let kp2 = signing_key(&k, "key.pem").unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert!(key_matches_cert(&kp2, cert.der()));
        let other = rcgen::KeyPair::generate().unwrap();
        assert!(!key_matches_cert(&other, cert.der()));
    }

    #[test]
    fn garbage_is_a_named_error() {
        let e = private_key_from_pem(b"hello", "ca-key.pem")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ca-key.pem: no private key found"), "{e}");
        let e = certs_from_pem(b"", "root-cert.pem")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("root-cert.pem") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = certs_from_pem(bad.as_bytes(), "c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.pem") && e.contains("#1"), "{e}");
    }
}
