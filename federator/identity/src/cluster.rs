//! The cluster's federation identity on disk (`<state-dir>/identity/`) and the join that
//! creates it. The cluster key is generated here and never leaves the cluster.
//!
//! | file | content |
//! | --- | --- |
//! | `identity.json` | cluster facts, federation trust domain, federator endpoints |
//! | `cert-chain.pem`, `key.pem` (0600) | the cluster certificate (`spiffe://<federation>/cluster/<id>`) |
//! | `federation-bundle.json` | the federation CA's SPIFFE bundle |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use proto::federation_client::FederationClient;
use proto::{ClusterFacts, JoinRequest, Locality};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use trust::tls::{Authorizer, PinnedRootVerifier, SpiffeVerifier, SvidResolver};
use trust::{
    BundleSet, CaOptions, CertificateAuthority, Svid, TrustBundle, TrustDomain, TrustStore,
};

use crate::ids::{cluster_spiffe_id, federator_spiffe_id};
use crate::token::Claims;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    pub cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub locality: String,
    pub gateways: Vec<String>,
    pub federation_trust_domain: String,
    pub federators: Vec<String>,
}

/// A joined cluster's identity, loaded.
#[derive(Debug, Clone)]
pub struct ClusterIdentity {
    pub file: IdentityFile,
    pub svid: Svid,
    pub federation_bundle: TrustBundle,
    pub dir: PathBuf,
}

pub fn identity_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

pub fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

impl ClusterIdentity {
    pub fn locality(&self) -> Locality {
        meshfed_model::validate::parse_locality(&self.file.locality).unwrap_or_default()
    }

    pub fn facts(&self) -> ClusterFacts {
        ClusterFacts {
            cluster_id: self.file.cluster.clone(),
            network: self.file.network.clone(),
            trust_domain: self.file.trust_domain.clone(),
            locality: Some(self.locality()),
            gateways: self.file.gateways.clone(),
        }
    }

    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = identity_dir(state_dir);
        let path = dir.join("identity.json");
        let raw = std::fs::read(&path).with_context(|| {
            format!(
                "{} not found: this cluster has not joined a federation (run `meshfed join`)",
                path.display()
            )
        })?;
        let file: IdentityFile = serde_json::from_slice(&raw)
            .with_context(|| format!("{} is malformed", path.display()))?;
        let (svid, _) = Svid::load(&dir)
            .with_context(|| format!("cannot load the cluster certificate in {}", dir.display()))?;
        let federation_bundle = read_federation_bundle(&dir, &file.federation_trust_domain)?;
        Ok(ClusterIdentity {
            file,
            svid,
            federation_bundle,
            dir,
        })
    }

    /// Keeps the federator addresses the federation named (it tells members when replicas
    /// change): each must be host:port, and there must be one. Returns whether they changed.
    pub fn set_federators(&mut self, addresses: &[String]) -> anyhow::Result<bool> {
        anyhow::ensure!(
            !addresses.is_empty(),
            "the federator named no address to reach it"
        );
        for (i, a) in addresses.iter().enumerate() {
            meshfed_model::validate::check_host_port(&format!("federator address #{}", i + 1), a)
                .map_err(anyhow::Error::msg)?;
        }
        let (mut now, mut held) = (addresses.to_vec(), self.file.federators.clone());
        now.sort();
        held.sort();
        now.dedup();
        if now == held {
            return Ok(false);
        }
        let mut file = self.file.clone();
        file.federators = now;
        trust::files::write_atomic(
            &self.dir.join("identity.json"),
            &serde_json::to_vec_pretty(&file)?,
            trust::files::PUBLIC_MODE,
        )?;
        self.file = file;
        Ok(true)
    }

    /// Replaces the cluster certificate (after a renewal).
    pub fn store_svid(&mut self, svid: Svid) -> anyhow::Result<()> {
        svid.write_files(&self.dir, &self.federation_bundle.x509_authorities)?;
        self.svid = svid;
        Ok(())
    }

    /// An mTLS client configuration for talking to the federator as this cluster.
    pub fn client_config(&self) -> anyhow::Result<(rustls::ClientConfig, Arc<SvidResolver>)> {
        let resolver = SvidResolver::with(&self.svid)?;
        let cfg = federator_client_config(
            resolver.clone(),
            &self.federation_bundle,
            &self.file.federation_trust_domain,
        )?;
        Ok((cfg, resolver))
    }
}

/// The federation bundle an identity directory keeps (`federation-bundle.json`).
pub(crate) fn read_federation_bundle(dir: &Path, td: &str) -> anyhow::Result<TrustBundle> {
    let td = TrustDomain::new(td)?;
    let path = dir.join("federation-bundle.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(TrustBundle::from_json(
        td,
        &text,
        &path.display().to_string(),
    )?)
}

/// A client of the federator presenting `resolver`'s certificate and checking the server as the
/// federation's federator identity under `bundle`.
pub(crate) fn federator_client_config(
    resolver: Arc<SvidResolver>,
    bundle: &TrustBundle,
    td: &str,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut set = BundleSet::new();
    set.insert(bundle.clone())?;
    let td = TrustDomain::new(td)?;
    let verifier = SpiffeVerifier::new(
        TrustStore::new(set),
        Authorizer::id(federator_spiffe_id(&td)?),
    );
    Ok(trust::tls::client_config(resolver, verifier)?)
}

/// What `meshfed join` was told about the cluster.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub token: String,
    pub state_dir: PathBuf,
    pub cluster: String,
    pub network: String,
    pub trust_domain: TrustDomain,
    pub locality: Locality,
    pub gateways: Vec<String>,
    /// Replace an existing identity of the same cluster (see `meshfed join --rejoin`).
    pub rejoin: bool,
    /// An existing meshfed CA directory to use as the cluster CA (default: create one).
    pub ca: Option<PathBuf>,
}

/// Opens the cluster CA in the state directory, importing or creating it the first time.
pub fn open_cluster_ca(
    state_dir: &Path,
    td: &TrustDomain,
    import: Option<&Path>,
) -> anyhow::Result<CertificateAuthority> {
    let (ca, new) = prepare_cluster_ca(state_dir, td, import)?;
    if new {
        ca.save(&ca_dir(state_dir))?;
    }
    Ok(ca)
}

/// The cluster CA of the state directory, or a new (imported or created) one that is not
/// saved yet (`true`): a join saves it only once the federator accepted the cluster, so a
/// refused join leaves the directory as it was.
fn prepare_cluster_ca(
    state_dir: &Path,
    td: &TrustDomain,
    import: Option<&Path>,
) -> anyhow::Result<(CertificateAuthority, bool)> {
    let dir = ca_dir(state_dir);
    if CertificateAuthority::exists_in(&dir) {
        let ca = CertificateAuthority::load(&dir)?;
        if ca.trust_domain() != td {
            bail!(
                "{} holds the CA of trust domain {}, not {td}",
                dir.display(),
                ca.trust_domain()
            );
        }
        return Ok((ca, false));
    }
    let ca = match import {
        Some(src) => {
            let ca = CertificateAuthority::load(src)
                .with_context(|| format!("cannot load the CA in {}", src.display()))?;
            if ca.trust_domain() != td {
                bail!(
                    "{} holds the CA of trust domain {}, not {td}",
                    src.display(),
                    ca.trust_domain()
                );
            }
            ca
        }
        None => CertificateAuthority::create(td.clone(), CaOptions::default())?,
    };
    Ok((ca, true))
}

/// Joins the federation named in the token and stores the cluster identity.
pub async fn join(p: JoinParams) -> anyhow::Result<ClusterIdentity> {
    let claims = Claims::decode(&p.token)?;
    if claims.cluster != p.cluster {
        bail!(
            "this join token is for cluster {:?}, not {:?}",
            claims.cluster,
            p.cluster
        );
    }
    let idir = identity_dir(&p.state_dir);
    let existing = idir.join("identity.json");
    if existing.exists() {
        if !p.rejoin {
            bail!(
                "{} already holds a cluster identity; run `meshfed leave --state-dir {}` first (or, to join again as the same cluster with a new token, add --rejoin)",
                idir.display(),
                p.state_dir.display()
            );
        }
        let raw = std::fs::read(&existing)
            .with_context(|| format!("cannot read {}", existing.display()))?;
        let old: IdentityFile = serde_json::from_slice(&raw)
            .with_context(|| format!("{} is malformed", existing.display()))?;
        if old.cluster != p.cluster || old.trust_domain != p.trust_domain.as_str() {
            bail!(
                "--rejoin: {} holds the identity of cluster {:?} (trust domain {}), not {:?} ({})",
                existing.display(),
                old.cluster,
                old.trust_domain,
                p.cluster,
                p.trust_domain
            );
        }
    }
    let fed_td = TrustDomain::new(&claims.federation_trust_domain)
        .context("the token's federation trust domain")?;
    let (ca, new_ca) = prepare_cluster_ca(&p.state_dir, &p.trust_domain, p.ca.as_deref())?;
    let id = cluster_spiffe_id(&fed_td, &p.cluster)?;
    let (key, csr) = trust::keys::key_and_csr(&id)?;
    let verifier = PinnedRootVerifier::new(
        &claims.ca_sha256,
        fed_td.clone(),
        Authorizer::id(federator_spiffe_id(&fed_td)?),
    );
    let cfg = trust::tls::client_config_with(SvidResolver::new(), Arc::new(verifier))?;
    let channel = meshfed_net::channel(claims.federators.clone(), cfg, "federator")?;
    let mut client = FederationClient::new(channel);
    let facts = ClusterFacts {
        cluster_id: p.cluster.clone(),
        network: p.network.clone(),
        trust_domain: p.trust_domain.to_string(),
        locality: Some(p.locality.clone()),
        gateways: p.gateways.clone(),
    };
    let resp = client
        .join(JoinRequest {
            token: p.token.clone(),
            facts: Some(facts),
            trust_bundle_json: ca.bundle().to_json()?,
            csr_der: csr,
        })
        .await
        .map_err(|s| describe_status("the federator refused the join", &s))?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let svid = Svid::new(
        chain,
        PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()),
    )
    .context("the federator returned an unusable cluster certificate")?;
    anyhow::ensure!(
        svid.id == id,
        "the federator issued {} instead of {id}",
        svid.id
    );
    let bundle = TrustBundle::from_json(
        fed_td.clone(),
        &resp.federation_bundle_json,
        "federation bundle",
    )?;
    anyhow::ensure!(
        bundle
            .x509_authorities
            .iter()
            .any(|r| trust::keys::fingerprint(r) == claims.ca_sha256),
        "the federation bundle does not contain the pinned CA"
    );
    let file = IdentityFile {
        cluster: p.cluster.clone(),
        network: p.network.clone(),
        trust_domain: p.trust_domain.to_string(),
        locality: meshfed_model::validate::locality_string(&Some(p.locality.clone())),
        gateways: p.gateways.clone(),
        federation_trust_domain: resp.federation_trust_domain,
        federators: if resp.federator_endpoints.is_empty() {
            claims.federators
        } else {
            resp.federator_endpoints
        },
    };
    // Accepted: from here on the state is written (the CA first, identity.json last).
    if new_ca {
        ca.save(&ca_dir(&p.state_dir))?;
    }
    std::fs::create_dir_all(&idir)?;
    svid.write_files(&idir, &bundle.x509_authorities)?;
    trust::files::write_atomic(
        &idir.join("federation-bundle.json"),
        bundle.to_json()?.as_bytes(),
        trust::files::PUBLIC_MODE,
    )?;
    // identity.json last: its presence means the join completed.
    trust::files::write_atomic(
        &idir.join("identity.json"),
        &serde_json::to_vec_pretty(&file)?,
        trust::files::PUBLIC_MODE,
    )?;
    Ok(ClusterIdentity {
        file,
        svid,
        federation_bundle: bundle,
        dir: idir,
    })
}

/// One line for a gRPC failure, with transport causes spelled out.
pub fn describe_status(what: &str, s: &tonic::Status) -> anyhow::Error {
    let mut msg = format!("{what}: {}", s.message());
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(s);
    while let Some(e) = src {
        let t = e.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = e.source();
    }
    anyhow::anyhow!(msg)
}
