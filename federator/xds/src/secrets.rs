//! SDS: the secrets Envoy proxies name in the clusters meshfed sends them (Istio's names, so an
//! istio-proxy's `sds-grpc` cluster, pointed at the agent, finds them):
//!
//! - `ROOTCA`: a validation context holding Envoy's SPIFFE certificate validator
//!   (`envoy.tls.cert_validator.spiffe`) with one entry per trust domain, each with that domain's
//!   roots only. Envoy merges it into the cluster's default validation context (which names the
//!   accepted SPIFFE IDs), so a peer is verified against the bundle of its own SVID's trust
//!   domain, never a pool. Served on both ports: roots are public.
//! - `default`: the proxy's workload certificate and key, issued by the cluster CA for exactly the
//!   SPIFFE ID the proxy authenticated with on the mTLS port, and renewed (a new version pushed)
//!   at a jittered 50-80 % of its life or when another CA generation starts signing. The
//!   plaintext port, which checks no identity, never serves it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::resources::{any, Res, SharedRes};
use meshfed_model::snapshot::Snapshot;
use trust::{SpiffeId, Svid};

/// The validation context secret (Istio's name).
pub const ROOT_SECRET: &str = "ROOTCA";
/// The workload certificate secret (Istio's name).
pub const CERT_SECRET: &str = "default";
/// Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// Issues a workload certificate for an authenticated SPIFFE ID.
pub type Issuer = Arc<dyn Fn(&SpiffeId) -> anyhow::Result<Svid> + Send + Sync>;

fn inline(s: String) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(s)),
        ..Default::default()
    })
}

/// `ROOTCA` for `(trust domain, roots PEM)` pairs, one validator entry per trust domain, in
/// trust domain order.
pub fn root_secret(roots: &[(String, String)]) -> tls::Secret {
    let mut roots: Vec<&(String, String)> = roots.iter().filter(|(_, p)| !p.is_empty()).collect();
    roots.sort();
    let config = tls::SpiffeCertValidatorConfig {
        trust_domains: roots
            .iter()
            .map(|(td, pem)| tls::spiffe_cert_validator_config::TrustDomain {
                name: td.clone(),
                trust_bundle: inline(pem.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    tls::Secret {
        name: ROOT_SECRET.into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                custom_validator_config: Some(core::TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.into(),
                    typed_config: Some(any(&config)),
                }),
                ..Default::default()
            },
        )),
    }
}

/// `default` for one SVID: the chain (leaf first) and its PKCS#8 key, inline.
pub fn cert_secret(svid: &Svid) -> tls::Secret {
    tls::Secret {
        name: CERT_SECRET.into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(trust::keys::certs_to_pem(svid.chain.iter())),
            private_key: inline(trust::keys::pkcs8_to_pem(&svid.key)),
            ..Default::default()
        })),
    }
}

/// The `ROOTCA` resource for the own bundle and every peer bundle of `snap` (a bundle that
/// does not parse is left out, as in the trust files).
pub fn root_resource(own_td: &str, own_json: &str, snap: &Snapshot) -> SharedRes {
    let roots: Vec<(String, String)> = meshfed_model::snapshot::trust_roots(own_td, own_json, snap)
        .into_iter()
        .map(|(td, r)| (td, trust::keys::certs_to_pem(r.iter())))
        .collect();
    Res::new(ROOT_SECRET, &root_secret(&roots))
}

/// One issued workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub res: SharedRes,
    pub renew_at: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The secrets the ADS and SDS streams serve: the current `ROOTCA` and the workload
/// certificates, one per SPIFFE ID, shared by every stream of that identity.
pub struct Secrets {
    root: watch::Sender<Option<SharedRes>>,
    /// Bumped when every workload certificate must be issued again (a new CA generation signs).
    epoch: watch::Sender<u64>,
    issuer: OnceLock<Issuer>,
    certs: Mutex<HashMap<String, Issued>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("root", &self.root.borrow().as_ref().map(|r| r.version()))
            .field("issuer", &self.issuer.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Secrets {
    fn default() -> Self {
        Secrets {
            root: watch::Sender::new(None),
            epoch: watch::Sender::new(0),
            issuer: OnceLock::new(),
            certs: Mutex::new(HashMap::new()),
        }
    }
}

impl Secrets {
    /// Sets how workload certificates are issued (once; the agent's cluster CA).
    pub fn set_issuer(&self, issuer: Issuer) {
        let _ = self.issuer.set(issuer);
    }

    /// Replaces `ROOTCA`; streams are told only when its content changed.
    pub fn set_root(&self, res: SharedRes) {
        self.root.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.hash == res.hash) {
                false
            } else {
                *cur = Some(res);
                true
            }
        });
    }

    pub fn root(&self) -> watch::Receiver<Option<SharedRes>> {
        self.root.subscribe()
    }

    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Forgets every issued certificate and tells the streams holding one to get a new one
    /// (called when another CA generation starts signing).
    pub fn reissue_all(&self) {
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.epoch.send_modify(|e| *e += 1);
    }

    /// The workload certificate for `id`: the shared one while it is not due for renewal,
    /// otherwise a new one.
    pub fn cert_for(&self, id: &SpiffeId) -> Result<Issued, String> {
        let issuer = self
            .issuer
            .get()
            .ok_or_else(|| "this agent issues no workload certificates".to_string())?;
        let now = OffsetDateTime::now_utc();
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = certs.get(id.as_str()) {
            if now < c.renew_at {
                return Ok(c.clone());
            }
        }
        let svid = issuer(id).map_err(|e| format!("cannot issue a certificate for {id}: {e:#}"))?;
        let issued = Issued {
            res: Res::new(CERT_SECRET, &cert_secret(&svid)),
            renew_at: svid.renew_at(),
            not_after: svid.not_after,
        };
        certs.retain(|_, c| c.not_after > now);
        certs.insert(id.as_str().to_string(), issued.clone());
        Ok(issued)
    }
}

/// Keeps `ROOTCA` current from the cluster's own bundle and the peers' bundles in the model.
pub async fn follow_roots(
    secrets: Arc<super::server::XdsState>,
    own_td: String,
    mut own: watch::Receiver<String>,
    model: meshfed_model::store::Reader,
) {
    let mut snaps = model.subscribe();
    loop {
        let snap = snaps.borrow_and_update().clone();
        let own_json = own.borrow_and_update().clone();
        secrets
            .secrets
            .set_root(root_resource(&own_td, &own_json, &snap));
        tokio::select! {
            r = own.changed() => if r.is_err() { return },
            r = snaps.changed() => if r.is_err() { return },
        }
    }
}

/// Replaces the private key of any `tlsCertificate` in a rendered secret (config dumps).
pub fn redact(v: &mut serde_json::Value) {
    if let Some(key) = v
        .get_mut("tlsCertificate")
        .and_then(|t| t.get_mut("privateKey"))
    {
        *key = serde_json::json!({"inlineString": "[redacted]"});
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn ca(td: &str) -> trust::CertificateAuthority {
        trust::CertificateAuthority::create(
            trust::TrustDomain::new(td).unwrap(),
            trust::ca::CaOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn root_secret_has_one_validator_entry_per_trust_domain() {
        let s = root_secret(&[
            ("west.mesh".into(), "W".into()),
            ("east.mesh".into(), "E".into()),
            ("empty.mesh".into(), String::new()),
        ]);
        let Some(tls::secret::Type::ValidationContext(vc)) = s.r#type else {
            panic!("not a validation context")
        };
        assert!(vc.trusted_ca.is_none());
        let cfg = vc.custom_validator_config.unwrap();
        assert_eq!(cfg.name, SPIFFE_VALIDATOR);
        let v = tls::SpiffeCertValidatorConfig::decode(cfg.typed_config.unwrap().value.as_slice())
            .unwrap();
        let names: Vec<&str> = v.trust_domains.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["east.mesh", "west.mesh"]);
    }

    #[test]
    fn certificates_are_shared_until_due_and_reissued_after_reissue_all() {
        let east = Arc::new(ca("east.mesh"));
        let s = Secrets::default();
        let id = SpiffeId::new("spiffe://east.mesh/ns/shop/sa/payment").unwrap();
        assert!(s.cert_for(&id).unwrap_err().contains("issues no"));
        let c = east.clone();
        s.set_issuer(Arc::new(move |id| {
            Ok(c.issue_svid(
                id,
                &trust::ca::policy::ExactIds(vec![id.clone()]),
                time::Duration::hours(1),
            )?)
        }));
        let a = s.cert_for(&id).unwrap();
        let b = s.cert_for(&id).unwrap();
        assert_eq!(a.res.hash, b.res.hash, "one certificate per identity");
        let epoch = s.epoch();
        s.reissue_all();
        assert!(epoch.has_changed().unwrap());
        let c = s.cert_for(&id).unwrap();
        assert_ne!(a.res.hash, c.res.hash);
        // The secret holds that identity's chain and a key that matches it.
        let sec = tls::Secret::decode(c.res.any.value.as_slice()).unwrap();
        let Some(tls::secret::Type::TlsCertificate(t)) = sec.r#type else {
            panic!()
        };
        let pem = |d: Option<core::DataSource>| match d.unwrap().specifier.unwrap() {
            core::data_source::Specifier::InlineString(s) => s,
            _ => panic!(),
        };
        let chain = trust::keys::certs_from_pem(pem(t.certificate_chain).as_bytes(), "c").unwrap();
        let key = trust::keys::private_key_from_pem(pem(t.private_key).as_bytes(), "k").unwrap();
        let svid = Svid::new(chain, key).unwrap();
        assert_eq!(svid.id, id);
    }

    #[test]
    fn redact_hides_the_key_only() {
        let mut v = serde_json::json!({"name": "default", "tlsCertificate": {
            "certificateChain": {"inlineString": "CHAIN"},
            "privateKey": {"inlineString": "KEY"}}});
        redact(&mut v);
        assert_eq!(
            v["tlsCertificate"]["privateKey"]["inlineString"],
            "[redacted]"
        );
        assert_eq!(
            v["tlsCertificate"]["certificateChain"]["inlineString"],
            "CHAIN"
        );
    }
}
