//! SPIFFE trust bundles: the JWK Set format (`use: x509-svid`, one `x5c` certificate per key,
//! `spiffe_sequence`, `spiffe_refresh_hint`), parsed strictly and written; and the per-trust-
//! domain [`BundleSet`] that verifiers read. Bundles of different trust domains are never merged.

mod json;
pub mod set;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Map, Value};
use time::Duration;
use x509_parser::public_key::PublicKey;

use crate::spiffe_id::TrustDomain;

pub use set::{BundleSet, TrustStore};

/// Why a bundle or bundle map was refused. `at` names the JSON location (`keys[1].x5c`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("{what}: invalid JSON: {reason}")]
    Json { what: String, reason: String },
    #[error("{what}: {at}: {reason}")]
    Field {
        what: String,
        at: String,
        reason: String,
    },
    #[error("trust bundle for {trust_domain}: {reason}")]
    Unusable {
        trust_domain: String,
        reason: String,
    },
    #[error(
        "trust bundle for {trust_domain}: sequence {offered} is older than the {held} already held"
    )]
    Regression {
        trust_domain: String,
        offered: u64,
        held: u64,
    },
}

/// A trust domain's bundle: the X.509 authorities that sign its SVIDs.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    pub x509_authorities: Vec<CertificateDer<'static>>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("authorities", &self.x509_authorities.len())
            .field("sequence", &self.sequence)
            .field("refresh_hint", &self.refresh_hint)
            .finish()
    }
}

fn field(what: &str, at: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError::Field {
        what: what.to_string(),
        at: at.into(),
        reason: reason.into(),
    }
}

/// JWK key parameters describing a certificate's public key.
fn jwk_params(cert: &CertificateDer<'_>) -> Result<Map<String, Value>, String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spki = c.public_key();
    let mut m = Map::new();
    let parsed = spki
        .parsed()
        .map_err(|e| format!("unreadable public key: {e}"))?;
    match parsed {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let crv = match curve.as_str() {
                "1.2.840.10045.3.1.7" => "P-256",
                "1.3.132.0.34" => "P-384",
                "1.3.132.0.35" => "P-521",
                other => return Err(format!("unsupported EC curve {other}")),
            };
            let data = point.data();
            if data.first() != Some(&4) || data.len() % 2 != 1 {
                return Err("EC point is not in uncompressed form".into());
            }
            let n = (data.len() - 1) / 2;
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(&data[1..1 + n]).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(&data[1 + n..]).into());
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| {
                let i = b
                    .iter()
                    .position(|x| *x != 0)
                    .unwrap_or(b.len().saturating_sub(1));
                b[i..].to_vec()
            };
            m.insert("kty".into(), "RSA".into());
            m.insert(
                "n".into(),
                URL_SAFE_NO_PAD.encode(strip(rsa.modulus)).into(),
            );
            m.insert(
                "e".into(),
                URL_SAFE_NO_PAD.encode(strip(rsa.exponent)).into(),
            );
        }
        PublicKey::Unknown(raw) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            m.insert("kty".into(), "OKP".into());
            m.insert("crv".into(), "Ed25519".into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(raw).into());
        }
        _ => return Err("unsupported public key type".into()),
    }
    Ok(m)
}

const KNOWN_KTY: [&str; 3] = ["EC", "RSA", "OKP"];

impl TrustBundle {
    /// A bundle with no sequence or refresh hint.
    pub fn new(trust_domain: TrustDomain, x509_authorities: Vec<CertificateDer<'static>>) -> Self {
        TrustBundle {
            trust_domain,
            x509_authorities,
            sequence: None,
            refresh_hint: None,
        }
    }

    /// The bundle as a JSON value (JWK Set).
    pub fn to_json_value(&self) -> Result<Value, BundleError> {
        let mut keys = Vec::new();
        for (i, cert) in self.x509_authorities.iter().enumerate() {
            let mut m = jwk_params(cert).map_err(|reason| BundleError::Unusable {
                trust_domain: self.trust_domain.to_string(),
                reason: format!("authority #{}: {reason}", i + 1),
            })?;
            m.insert("use".into(), "x509-svid".into());
            m.insert("x5c".into(), json!([STANDARD.encode(cert)]));
            keys.push(Value::Object(m));
        }
        let mut top = Map::new();
        top.insert("keys".into(), Value::Array(keys));
        if let Some(s) = self.sequence {
            top.insert("spiffe_sequence".into(), s.into());
        }
        if let Some(h) = self.refresh_hint {
            top.insert("spiffe_refresh_hint".into(), h.whole_seconds().into());
        }
        Ok(Value::Object(top))
    }

    /// The bundle's JSON text, pretty-printed.
    pub fn to_json(&self) -> Result<String, BundleError> {
        Ok(serde_json::to_string_pretty(&self.to_json_value()?).unwrap_or_default())
    }

    /// Parses a SPIFFE bundle document for `trust_domain`. `what` names the source in errors.
    pub fn from_json(
        trust_domain: TrustDomain,
        text: &str,
        what: &str,
    ) -> Result<Self, BundleError> {
        let v = json::parse_strict(text).map_err(|e| BundleError::Json {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json_value(trust_domain, &v, what, "")
    }

    pub(crate) fn from_json_value(
        trust_domain: TrustDomain,
        v: &Value,
        what: &str,
        prefix: &str,
    ) -> Result<Self, BundleError> {
        let top = v.as_object().ok_or_else(|| {
            field(
                what,
                format!("{prefix}(top level)"),
                "a bundle is a JSON object",
            )
        })?;
        let keys = top
            .get("keys")
            .ok_or_else(|| field(what, format!("{prefix}keys"), "is missing"))?
            .as_array()
            .ok_or_else(|| field(what, format!("{prefix}keys"), "must be an array"))?;
        let sequence = match top.get("spiffe_sequence") {
            None => None,
            Some(s) => Some(s.as_u64().ok_or_else(|| {
                field(
                    what,
                    format!("{prefix}spiffe_sequence"),
                    "must be a non-negative integer",
                )
            })?),
        };
        let refresh_hint = match top.get("spiffe_refresh_hint") {
            None => None,
            Some(s) => {
                let secs = s.as_i64().filter(|s| *s >= 0).ok_or_else(|| {
                    field(
                        what,
                        format!("{prefix}spiffe_refresh_hint"),
                        "must be a non-negative integer (seconds)",
                    )
                })?;
                Some(Duration::seconds(secs))
            }
        };
        let mut x509_authorities = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let at = format!("{prefix}keys[{i}]");
            let obj = key
                .as_object()
                .ok_or_else(|| field(what, &at, "must be an object"))?;
            match obj.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {}
                other => {
                    tracing::debug!(%at, r#use = ?other, "ignoring bundle entry that is not use=x509-svid");
                    continue;
                }
            }
            let Some(kty) = obj.get("kty").and_then(Value::as_str) else {
                return Err(field(what, format!("{at}.kty"), "is missing"));
            };
            if !KNOWN_KTY.contains(&kty) {
                tracing::debug!(%at, kty, "ignoring bundle entry with unknown kty");
                continue;
            }
            if obj.contains_key("kid") {
                return Err(field(
                    what,
                    format!("{at}.kid"),
                    "x509-svid entries must not carry a kid",
                ));
            }
            let Some(x5c) = obj.get("x5c") else {
                tracing::debug!(%at, "ignoring x509-svid entry without x5c");
                continue;
            };
            let x5c = x5c
                .as_array()
                .ok_or_else(|| field(what, format!("{at}.x5c"), "must be an array"))?;
            if x5c.len() != 1 {
                return Err(field(
                    what,
                    format!("{at}.x5c"),
                    format!(
                        "holds {} certificates; an x509-svid entry holds exactly one",
                        x5c.len()
                    ),
                ));
            }
            let b64 = x5c[0]
                .as_str()
                .ok_or_else(|| field(what, format!("{at}.x5c[0]"), "must be a string"))?;
            let der = STANDARD
                .decode(b64)
                .map_err(|e| field(what, format!("{at}.x5c[0]"), format!("is not base64: {e}")))?;
            let cert = CertificateDer::from(der);
            let expected = jwk_params(&cert).map_err(|r| field(what, format!("{at}.x5c[0]"), r))?;
            for (k, want) in &expected {
                if let Some(got) = obj.get(k) {
                    if got != want {
                        return Err(field(
                            what,
                            format!("{at}.{k}"),
                            format!("is {got} but the certificate's key has {want}"),
                        ));
                    }
                }
            }
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| field(what, format!("{at}.x5c[0]"), e.to_string()))?;
            if !parsed.is_ca() {
                return Err(field(
                    what,
                    format!("{at}.x5c[0]"),
                    "certificate is not a CA (cA=false)",
                ));
            }
            x509_authorities.push(cert);
        }
        Ok(TrustBundle {
            trust_domain,
            x509_authorities,
            sequence,
            refresh_hint,
        })
    }
}

/// Parses a bundle map `{"trust_domains": {"<td>": <bundle>, ...}}`, rejecting duplicate trust
/// domains and invalid trust domain names.
pub fn parse_bundle_map(text: &str, what: &str) -> Result<Vec<TrustBundle>, BundleError> {
    let v = json::parse_strict(text).map_err(|e| BundleError::Json {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    let tds = v
        .get("trust_domains")
        .ok_or_else(|| field(what, "trust_domains", "is missing"))?
        .as_object()
        .ok_or_else(|| field(what, "trust_domains", "must be an object"))?;
    let mut out = Vec::new();
    for (name, b) in tds {
        let td = TrustDomain::new(name)
            .map_err(|e| field(what, format!("trust_domains.{name}"), e.reason.to_string()))?;
        out.push(TrustBundle::from_json_value(
            td,
            b,
            what,
            &format!("trust_domains.{name}."),
        )?);
    }
    Ok(out)
}

/// Writes a bundle map document.
pub fn bundle_map_json<'a>(
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
) -> Result<String, BundleError> {
    let mut tds = Map::new();
    for b in bundles {
        tds.insert(b.trust_domain.to_string(), b.to_json_value()?);
    }
    Ok(serde_json::to_string_pretty(&json!({ "trust_domains": tds })).unwrap_or_default())
}

/// Whether `text` looks like a bundle map rather than a single bundle.
pub fn is_bundle_map(text: &str) -> bool {
    serde_json::from_str::<Value>(text)
        .map(|v| v.get("trust_domains").is_some())
        .unwrap_or(false)
}
