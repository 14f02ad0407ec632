//! A cluster's certificate authority: a root (self-made, or an Istio plug-in CA), the signing
//! intermediate, X509-SVID issuance under an [`IssuancePolicy`], and make-before-break root
//! rotation (see [`rotation`]).

pub mod cacerts;
pub mod policy;
pub mod rotation;
pub mod store;

use std::sync::atomic::{AtomicI64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::bundle::TrustBundle;
use crate::error::{Result, TrustError};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::Svid;

pub use policy::IssuancePolicy;
pub use rotation::GenerationState;
pub use store::CaDir;

/// Workload certificates live 24 hours unless asked otherwise.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::hours(24);
/// Certificates are back-dated by this much to tolerate clock skew between machines.
pub const BACKDATE: Duration = Duration::seconds(60);

/// Key algorithm for keys the CA generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    pub fn generate(self) -> Result<KeyPair> {
        Ok(KeyPair::generate_for(self.rcgen())?)
    }
}

/// Lifetimes and algorithms for a new CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub root_ttl: Duration,
    pub intermediate_ttl: Duration,
    pub key_algorithm: KeyAlgorithm,
    /// How often bundle consumers should poll (`spiffe_refresh_hint`).
    pub refresh_hint: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            root_ttl: Duration::days(3650),
            intermediate_ttl: Duration::days(365),
            key_algorithm: KeyAlgorithm::EcdsaP256,
            refresh_hint: Duration::minutes(5),
        }
    }
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&b)
}

/// One CA certificate that signs, with its key and the chain above it.
pub(crate) struct Signer {
    /// `[signing cert, intermediates..., root]`; a self-signed root signer is `[root]`.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) not_after: OffsetDateTime,
}

impl Signer {
    pub(crate) fn new(chain: Vec<CertificateDer<'static>>, key: KeyPair) -> Result<Self> {
        let first = chain
            .first()
            .ok_or_else(|| TrustError::Ca("signing certificate chain is empty".into()))?;
        if !crate::keys::key_matches_cert(&key, first) {
            return Err(TrustError::key(
                "CA key",
                "does not match the public key of the CA certificate",
            ));
        }
        let (_, not_after) = crate::svid::validity(first)
            .map_err(|e| TrustError::cert("CA certificate", e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(first, key)
            .map_err(|e| TrustError::cert("CA certificate", e.to_string()))?;
        Ok(Signer {
            chain,
            issuer,
            not_after,
        })
    }

    pub(crate) fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The chain a leaf presents after itself: everything but the root.
    fn presented_intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain[..self.chain.len().saturating_sub(1)]
    }

    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// One root with the signer under it: the unit that rotation adds and retires.
pub struct Generation {
    pub(crate) root: CertificateDer<'static>,
    /// Present when meshfed made this root; an Istio plug-in CA brings no root key.
    pub(crate) root_key: Option<KeyPair>,
    pub(crate) signer: Signer,
    pub(crate) state: GenerationState,
    /// Latest `notAfter` of any certificate this generation signed (Unix seconds, 0 = none).
    pub(crate) last_issued_expiry: AtomicI64,
}

impl Generation {
    /// Makes a new self-signed root and a signing intermediate under it.
    pub(crate) fn create(td: &TrustDomain, opts: &CaOptions, now: OffsetDateTime) -> Result<Self> {
        let root_key = opts.key_algorithm.generate()?;
        let mut root = ca_params(td, "root", now, opts.root_ttl)?;
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key)?;
        let root_der = root_cert.der().clone();
        let root_issuer = Issuer::new(root, &root_key);

        let int_key = opts.key_algorithm.generate()?;
        let mut int = ca_params(
            td,
            "intermediate",
            now,
            opts.intermediate_ttl.min(opts.root_ttl),
        )?;
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.use_authority_key_identifier_extension = true;
        let int_cert = int.signed_by(&int_key, &root_issuer)?;
        drop(root_issuer);
        let signer = Signer::new(vec![int_cert.der().clone(), root_der.clone()], int_key)?;
        Ok(Generation {
            root: root_der,
            root_key: Some(root_key),
            signer,
            state: GenerationState::Active,
            last_issued_expiry: AtomicI64::new(0),
        })
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    pub fn state(&self) -> &GenerationState {
        &self.state
    }

    /// When this generation's signing certificate became valid (its `notBefore` without the
    /// back-dating): the start of the generation's life, which rotation periods count from.
    pub fn created_at(&self) -> OffsetDateTime {
        crate::svid::validity(self.signer.cert())
            .map(|(nb, _)| nb + BACKDATE)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// When the root expires.
    pub fn root_not_after(&self) -> OffsetDateTime {
        crate::svid::validity(&self.root)
            .map(|(_, na)| na)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// When the signing certificate expires.
    pub fn signer_not_after(&self) -> OffsetDateTime {
        self.signer.not_after
    }

    pub fn last_issued_expiry(&self) -> Option<OffsetDateTime> {
        match self.last_issued_expiry.load(Ordering::Acquire) {
            0 => None,
            t => OffsetDateTime::from_unix_timestamp(t).ok(),
        }
    }

    fn record_issued(&self, not_after: OffsetDateTime) {
        self.last_issued_expiry
            .fetch_max(not_after.unix_timestamp(), Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("state", &self.state)
            .field("has_root_key", &self.root_key.is_some())
            .field("last_issued_expiry", &self.last_issued_expiry())
            .finish_non_exhaustive()
    }
}

fn ca_params(
    td: &TrustDomain,
    role: &str,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshfed");
    dn.push(DnType::CommonName, format!("meshfed {role} CA for {td}"));
    p.distinguished_name = dn;
    p.subject_alt_names =
        vec![SanType::URI(td.id_string().try_into().map_err(|_| {
            TrustError::Ca(format!("trust domain {td} is not a valid URI"))
        })?)];
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - BACKDATE;
    p.not_after = now + ttl;
    p.serial_number = Some(random_serial());
    Ok(p)
}

/// A certificate the CA signed from a CSR (the caller keeps the key).
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub id: SpiffeId,
    /// Leaf first, then intermediates (no root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The root the chain ends at (the signing generation's).
    pub root: CertificateDer<'static>,
    pub not_after: OffsetDateTime,
}

/// A trust domain's certificate authority.
pub struct CertificateAuthority {
    pub(crate) trust_domain: TrustDomain,
    /// Oldest first; exactly one is [`GenerationState::Active`].
    pub(crate) generations: Vec<Generation>,
    /// Roots published without a generation (extra roots of a plug-in `root-cert.pem`).
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
    pub(crate) bundle_sequence: u64,
    pub(crate) refresh_hint: Duration,
    pub(crate) options: CaOptions,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("generations", &self.generations)
            .field("bundle_sequence", &self.bundle_sequence)
            .finish()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh self-signed root and a signing intermediate.
    pub fn create(trust_domain: TrustDomain, options: CaOptions) -> Result<Self> {
        let generation = Generation::create(&trust_domain, &options, OffsetDateTime::now_utc())?;
        Ok(CertificateAuthority {
            trust_domain,
            generations: vec![generation],
            extra_roots: Vec::new(),
            bundle_sequence: 1,
            refresh_hint: options.refresh_hint,
            options,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn generations(&self) -> &[Generation] {
        &self.generations
    }

    pub fn bundle_sequence(&self) -> u64 {
        self.bundle_sequence
    }

    pub(crate) fn active(&self) -> &Generation {
        // Invariant kept by every constructor and by rotation: one generation is active.
        self.generations
            .iter()
            .find(|g| g.state == GenerationState::Active)
            .unwrap_or(&self.generations[0])
    }

    /// Every root currently published (pending, active and retiring), oldest first.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots: Vec<_> = self.generations.iter().map(|g| g.root.clone()).collect();
        roots.extend(self.extra_roots.iter().cloned());
        roots
    }

    /// The SPIFFE trust bundle to publish.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: self.roots(),
            sequence: Some(self.bundle_sequence),
            refresh_hint: Some(self.refresh_hint),
        }
    }

    /// The active signer's expiry (what `meshfed status` reports as CA expiry).
    pub fn signer_not_after(&self) -> OffsetDateTime {
        self.active().signer.not_after
    }

    /// Signs a PEM or DER CSR into an X509-SVID, if the CSR's single URI SAN is an identity of
    /// this trust domain that `policy` allows. Only the SAN is taken from the CSR: every other
    /// extension is set by the CA.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> Result<IssuedCert> {
        let params = if csr.starts_with(b"-----") {
            let text =
                std::str::from_utf8(csr).map_err(|_| TrustError::Csr("PEM is not UTF-8".into()))?;
            rcgen::CertificateSigningRequestParams::from_pem(text)
        } else {
            rcgen::CertificateSigningRequestParams::from_der(&csr.to_vec().into())
        }
        .map_err(|e| TrustError::Csr(format!("cannot parse or verify the CSR: {e}")))?;
        let mut uris = Vec::new();
        for san in &params.params.subject_alt_names {
            match san {
                SanType::URI(u) => uris.push(u.as_str().to_string()),
                other => {
                    return Err(TrustError::Csr(format!(
                        "requests the SAN {other:?}; meshfed issues only the SPIFFE URI SAN"
                    )))
                }
            }
        }
        let id = match uris.as_slice() {
            [one] => SpiffeId::new(one)?,
            [] => {
                return Err(TrustError::Csr(
                    "has no URI SAN; put the SPIFFE ID in one".into(),
                ))
            }
            _ => {
                return Err(TrustError::Csr(format!(
                    "has {} URI SANs ({}); an X509-SVID has exactly one",
                    uris.len(),
                    uris.join(", ")
                )))
            }
        };
        self.authorize(&id, policy)?;
        let chain = self.sign_leaf(&id, &[], &params.public_key, ttl)?;
        let not_after = crate::svid::validity(&chain[0])
            .map_err(|e| TrustError::Ca(e.to_string()))?
            .1;
        Ok(IssuedCert {
            id,
            chain,
            root: self.active().root.clone(),
            not_after,
        })
    }

    /// Issues an SVID with a key generated here (for the CA's own use and for tools; workloads
    /// should send a CSR so their key never leaves them).
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> Result<Svid> {
        self.issue_svid_with_dns(id, &[], policy, ttl)
    }

    /// [`Self::issue_svid`] with DNS names beside the SPIFFE ID (X509-SVID allows other SAN
    /// types next to its one URI SAN): for a server that clients also reach by a name they
    /// check, as gRPC and Go's TLS do.
    pub fn issue_svid_with_dns(
        &self,
        id: &SpiffeId,
        dns: &[String],
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> Result<Svid> {
        self.authorize(id, policy)?;
        let key = self.options.key_algorithm.generate()?;
        let chain = self.sign_leaf(id, dns, &key, ttl)?;
        let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
        Svid::new(chain, pkcs8)
    }

    fn authorize(&self, id: &SpiffeId, policy: &dyn IssuancePolicy) -> Result<()> {
        let refuse = |reason: String| TrustError::Refused {
            id: id.to_string(),
            reason,
        };
        if id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(refuse(format!(
                "it belongs to trust domain {}, and this CA signs only for {}",
                id.trust_domain_str(),
                self.trust_domain
            )));
        }
        if id.path().is_empty() {
            return Err(refuse("a workload ID needs a path".into()));
        }
        policy.check(id).map_err(refuse)
    }

    fn sign_leaf(
        &self,
        id: &SpiffeId,
        dns: &[String],
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>> {
        let generation = self.active();
        let signer = &generation.signer;
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        // Empty subject: the SAN extension is then marked critical, as X509-SVID requires.
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names =
            vec![SanType::URI(id.as_str().try_into().map_err(|_| {
                TrustError::Ca(format!("{id} is not a valid URI"))
            })?)];
        for name in dns {
            p.subject_alt_names.push(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|_| TrustError::Ca(format!("{name:?} is not a DNS name")))?,
            ));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if public_key.algorithm() == &rcgen::PKCS_RSA_SHA256 {
            p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        p.not_before = now - BACKDATE;
        p.not_after = (now + ttl).min(signer.not_after);
        if p.not_after <= now {
            return Err(TrustError::Ca(format!(
                "the signing certificate expired at {}; rotate the CA",
                signer.not_after
            )));
        }
        let leaf = p.signed_by(public_key, &signer.issuer)?;
        generation.record_issued(p.not_after);
        let mut chain = vec![leaf.der().clone()];
        chain.extend(signer.presented_intermediates().iter().cloned());
        Ok(chain)
    }

    /// Issues a new intermediate CA under the active root (requires the root key, which
    /// meshfed holds for roots it made). Returns `(chain [intermediate, ..., root], key)`.
    pub fn issue_intermediate(
        &self,
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair)> {
        let g = self.active();
        let root_key = g.root_key.as_ref().ok_or_else(|| {
            TrustError::Ca("this CA was loaded without its root key (plug-in CA); intermediates must be issued where the root key is kept".into())
        })?;
        let issuer = Issuer::from_ca_cert_der(&g.root, root_key)
            .map_err(|e| TrustError::cert("root certificate", e.to_string()))?;
        let key = self.options.key_algorithm.generate()?;
        let mut p = ca_params(
            &self.trust_domain,
            "intermediate",
            OffsetDateTime::now_utc(),
            ttl,
        )?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.use_authority_key_identifier_extension = true;
        let (_, root_not_after) =
            crate::svid::validity(&g.root).map_err(|e| TrustError::Ca(e.to_string()))?;
        p.not_after = p.not_after.min(root_not_after);
        let cert = p.signed_by(&key, &issuer)?;
        g.record_issued(p.not_after);
        Ok((vec![cert.der().clone(), g.root.clone()], key))
    }
}
