//! `meshfed workload init | agent`: the pod side of joining the mesh.
//!
//! `init` (an init container) obtains the pod's SVID from the cluster agent's CA API (Istio's
//! `CreateCertificate` on the mTLS xDS port) with the pod's projected service-account token,
//! asks the agent's `WorkloadConfig` (with that SVID) for the pod's placement and the trust
//! bundles, and writes, each file replaced atomically:
//!
//! | file | what |
//! | --- | --- |
//! | `cert-chain.pem`, `key.pem` | the SVID (leaf and signing certificate) and its PKCS#8 key |
//! | `root-cert.pem` | the cluster's own roots |
//! | `spiffe-bundle-map.json` | one SPIFFE bundle per trust domain, the cluster's and every peer's |
//! | `grpc-bootstrap.json` | gRPC's xDS bootstrap: node id, locality, network, metadata, the `file_watcher` certificate provider on the files above, and the xDS server: the relay on the pod's loopback |
//!
//! `agent` (a sidecar) does the same at start, then keeps it current: renews the SVID with the
//! current one at 50-80 % of its life, rewrites the roots and the bundle map when the agent
//! streams new ones, and relays the local gRPC clients' xDS (plaintext on the pod's loopback,
//! 127.0.0.1:15010 by default) to the agent's mTLS port with the pod's SVID. (A Unix socket in
//! the shared volume was tried first: grpcio 1.85.1's xDS stream over it was reset by the
//! agent's HTTP/2 server with PROTOCOL_ERROR, so the relay listens on TCP.)

use std::net::SocketAddr;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use proto::workload::workload_config_client::WorkloadConfigClient;
use rustls_pki_types::CertificateDer;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, SpiffeId, Svid, TrustBundle, TrustDomain, TrustStore};

use meshfed_identity::certs::{issue_fn, Backoff, Managed};
use meshfed_net::drain::Tasks;

/// The bundle map file.
pub const BUNDLE_MAP_FILE: &str = "spiffe-bundle-map.json";
/// The gRPC xDS bootstrap file.
pub const BOOTSTRAP_FILE: &str = "grpc-bootstrap.json";
/// The relay's default address: the pod's loopback, the port Istio's agent uses for xDS.
pub const XDS_LISTEN: &str = "127.0.0.1:15010";

/// What `meshfed workload` is told (flags, or the downward API's environment).
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The agent's mTLS xDS address(es), `host:port`.
    pub agent: Vec<String>,
    /// The TLS server name sent to the agent (its certificate is checked by SPIFFE ID).
    pub server_name: String,
    pub trust_domain: TrustDomain,
    pub namespace: String,
    pub service_account: String,
    /// The pod's name (empty outside Kubernetes).
    pub pod_name: String,
    /// The pod's IP, for the node id (else what the agent sees, else 127.0.0.1).
    pub pod_ip: Option<String>,
    /// The projected service-account token.
    pub token_file: PathBuf,
    /// The cluster's roots: a file, and/or PEM text (the injected `MESHFED_ROOT_CERTS`).
    pub root_cert: Option<PathBuf>,
    pub root_pem: Option<String>,
    /// Where the files go.
    pub out: PathBuf,
    /// The relay's address (named in the bootstrap; port 0 only for `agent`: any free port).
    pub xds_listen: SocketAddr,
    /// The lifetime asked for (`None`: the agent's maximum).
    pub cert_ttl: Option<Duration>,
}

impl WorkloadConfig {
    /// The SPIFFE ID the pod obtains.
    pub fn id(&self) -> anyhow::Result<SpiffeId> {
        Ok(SpiffeId::istio_workload(
            &self.trust_domain,
            &self.namespace,
            &self.service_account,
        )?)
    }
}

/// What `init` did.
#[derive(Debug, Clone)]
pub struct Obtained {
    pub id: String,
    pub expires: time::OffsetDateTime,
    pub cluster: String,
    pub network: String,
    pub locality: String,
    pub trust_domains: Vec<String>,
}

struct Client {
    cfg: WorkloadConfig,
    /// The cluster's own roots (the agent's certificate must chain to them).
    roots: TrustStore,
    svid: Arc<SvidResolver>,
}

impl Client {
    fn new(cfg: WorkloadConfig) -> anyhow::Result<Client> {
        let roots = initial_roots(&cfg)?;
        let mut set = BundleSet::new();
        set.insert(TrustBundle::new(cfg.trust_domain.clone(), roots))?;
        Ok(Client {
            cfg,
            roots: TrustStore::new(set),
            svid: SvidResolver::new(),
        })
    }

    fn own_roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots
            .load()
            .get(self.cfg.trust_domain.as_str())
            .map(|b| b.x509_authorities.clone())
            .unwrap_or_default()
    }

    /// TLS to the agent: its certificate must chain to the cluster's roots and name the
    /// agent's SPIFFE ID; this side presents `client` (which may hold no certificate yet).
    fn tls(&self, client: Arc<SvidResolver>) -> anyhow::Result<rustls::ClientConfig> {
        let verifier = SpiffeVerifier::new(
            self.roots.clone(),
            Authorizer::id(meshfed_identity::ids::agent_spiffe_id(
                &self.cfg.trust_domain,
            )?),
        );
        Ok(trust::tls::client_config(client, verifier)?)
    }

    /// A gRPC channel to the agent over [`Client::tls`].
    fn channel(&self, client: Arc<SvidResolver>) -> anyhow::Result<tonic::transport::Channel> {
        meshfed_net::channel(
            self.cfg.agent.clone(),
            self.tls(client)?,
            &self.cfg.server_name,
        )
    }

    /// A new SVID from the CA API: with the token, or (no token) over mTLS with `current`.
    async fn create_certificate(
        &self,
        token: Option<&str>,
        current: Arc<SvidResolver>,
    ) -> anyhow::Result<Svid> {
        let id = self.cfg.id()?;
        let (key, csr) = trust::keys::key_and_csr(&id)?;
        let mut req = tonic::Request::new(proto::istio_ca::IstioCertificateRequest {
            csr: trust::keys::csr_to_pem(&csr),
            validity_duration: self.cfg.cert_ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
            metadata: None,
        });
        let client = match token {
            Some(t) => {
                let v = format!("Bearer {}", t.trim())
                    .parse()
                    .context("the token holds characters a header cannot carry")?;
                req.metadata_mut().insert("authorization", v);
                SvidResolver::new()
            }
            None => current,
        };
        let resp = IstioCertificateServiceClient::new(self.channel(client)?)
            .create_certificate(req)
            .await
            .map_err(|s| rpc_error("the agent's CA refused the certificate", &s))?
            .into_inner();
        let mut chain = Vec::new();
        for (i, pem) in resp.cert_chain.iter().enumerate() {
            chain.extend(trust::keys::certs_from_pem(
                pem.as_bytes(),
                &format!("certificate {i} of the CA's answer"),
            )?);
        }
        // The answer ends with the root; the chain file holds the leaf and signer only.
        let roots = self.own_roots();
        chain.retain(|c| !roots.contains(c));
        let svid = Svid::new(chain, key).context("the certificate from the CA is unusable")?;
        if svid.id != id {
            bail!("the CA issued {} and {id} was asked for", svid.id);
        }
        Ok(svid)
    }

    /// Obtains an SVID: with the token when it can be read, else by renewing the one on disk.
    async fn obtain(&self) -> anyhow::Result<Svid> {
        match std::fs::read_to_string(&self.cfg.token_file) {
            Ok(t) if !t.trim().is_empty() => {
                self.create_certificate(Some(&t), SvidResolver::new()).await
            }
            read => {
                let why = match read {
                    Ok(_) => "is empty".to_string(),
                    Err(e) => e.to_string(),
                };
                let current = current_svid(&self.cfg.out).with_context(|| {
                    format!(
                        "the service-account token {} {why}, and no valid certificate is in {}",
                        self.cfg.token_file.display(),
                        self.cfg.out.display()
                    )
                })?;
                let r = SvidResolver::with(&current)?;
                self.create_certificate(None, r).await
            }
        }
    }

    /// Renews with the certificate in use; with the token when that fails.
    async fn renew(&self) -> anyhow::Result<Svid> {
        match self.create_certificate(None, self.svid.clone()).await {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "renewal with the current certificate failed; trying the token");
                self.obtain().await
            }
        }
    }

    fn install(&self, svid: &Svid) -> anyhow::Result<()> {
        svid.write_files(&self.cfg.out, &self.own_roots())?;
        self.svid.install(svid)?;
        Ok(())
    }

    /// The WorkloadConfig stream (with the installed SVID).
    async fn watch(&self) -> anyhow::Result<tonic::Streaming<proto::workload::Config>> {
        Ok(WorkloadConfigClient::new(self.channel(self.svid.clone())?)
            .watch(proto::workload::WatchRequest {
                pod_name: self.cfg.pod_name.clone(),
            })
            .await
            .map_err(|s| rpc_error("the agent refused the workload config", &s))?
            .into_inner())
    }

    /// Writes the bundle map and the own roots from one config message.
    fn write_trust(&self, c: &proto::workload::Config) -> anyhow::Result<Vec<String>> {
        let td = self.cfg.trust_domain.as_str();
        if c.trust_domain != td {
            bail!(
                "the agent's trust domain is {}, and this workload was told {td}",
                c.trust_domain
            );
        }
        let own = c
            .bundles
            .get(td)
            .with_context(|| format!("the agent sent no bundle of its own trust domain {td}"))?;
        let bundle =
            TrustBundle::from_json(self.cfg.trust_domain.clone(), own, "the agent's own bundle")?;
        if bundle.x509_authorities.is_empty() {
            bail!("the agent's own bundle holds no root");
        }
        let mut set = BundleSet::new();
        set.insert(bundle.clone())?;
        self.roots.store(set);
        let doc = meshfed_model::snapshot::bundle_map_document(&c.bundles);
        trust::files::write_atomic(
            &self.cfg.out.join("root-cert.pem"),
            trust::keys::certs_to_pem(bundle.x509_authorities.iter()).as_bytes(),
            trust::files::PUBLIC_MODE,
        )?;
        trust::files::write_atomic(
            &self.cfg.out.join(BUNDLE_MAP_FILE),
            serde_json::to_string_pretty(&doc)?.as_bytes(),
            trust::files::PUBLIC_MODE,
        )?;
        Ok(doc["trust_domains"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }
}

/// The SVID in `dir`, if it is valid for at least another minute.
fn current_svid(dir: &Path) -> anyhow::Result<Svid> {
    let (svid, _) = Svid::load(dir)?;
    if svid.not_after <= time::OffsetDateTime::now_utc() + time::Duration::minutes(1) {
        bail!("the certificate in {} has expired", dir.display());
    }
    Ok(svid)
}

/// The cluster's roots to check the agent with: the ones last written (a restarted container),
/// the file and the injected PEM; each must be a CA certificate of the trust domain.
fn initial_roots(cfg: &WorkloadConfig) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut out: Vec<CertificateDer<'static>> = Vec::new();
    let mut add = |pem: &[u8], what: &str| -> anyhow::Result<()> {
        for c in trust::keys::certs_from_pem(pem, what)? {
            trust::svid::check_signer(&c, &cfg.trust_domain).map_err(|e| {
                anyhow::anyhow!(
                    "{what}: not a CA certificate of trust domain {}: {e}",
                    cfg.trust_domain
                )
            })?;
            if !out.contains(&c) {
                out.push(c);
            }
        }
        Ok(())
    };
    let written = cfg.out.join("root-cert.pem");
    if let Ok(pem) = std::fs::read(&written) {
        add(&pem, &written.display().to_string())?;
    }
    if let Some(p) = &cfg.root_cert {
        let pem = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        add(&pem, &p.display().to_string())?;
    }
    if let Some(pem) = &cfg.root_pem {
        add(pem.as_bytes(), "MESHFED_ROOT_CERTS")?;
    }
    if out.is_empty() {
        bail!(
            "no root to check the agent with: give --root-cert FILE or MESHFED_ROOT_CERTS (the \
             injection webhook sets it)"
        );
    }
    Ok(out)
}

fn locality_string(l: Option<&proto::workload::Locality>) -> String {
    match l {
        Some(l) if !l.region.is_empty() => [&l.region, &l.zone, &l.subzone]
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("/"),
        _ => "-".into(),
    }
}

/// gRPC's xDS bootstrap for the pod's proxyless clients (`GRPC_XDS_BOOTSTRAP`).
pub fn bootstrap_document(
    cfg: &WorkloadConfig,
    relay: SocketAddr,
    c: &proto::workload::Config,
) -> serde_json::Value {
    let ns = &cfg.namespace;
    let ip = cfg
        .pod_ip
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| (!c.pod_ip.is_empty()).then(|| c.pod_ip.clone()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let name = if cfg.pod_name.is_empty() {
        cfg.service_account.clone()
    } else {
        cfg.pod_name.clone()
    };
    let labels: std::collections::BTreeMap<_, _> = c.labels.iter().collect();
    let mut node = serde_json::json!({
        "id": format!("sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local"),
        "metadata": {
            "NAMESPACE": ns,
            "CLUSTER_ID": c.cluster,
            "NETWORK": c.network,
            "LABELS": labels,
            "SERVICE_ACCOUNT": cfg.service_account,
            "POD_NAME": cfg.pod_name,
            "TRUST_DOMAIN": cfg.trust_domain.as_str(),
        },
    });
    if let Some(l) = c.locality.as_ref().filter(|l| !l.region.is_empty()) {
        node["locality"] = serde_json::json!({
            "region": l.region, "zone": l.zone, "sub_zone": l.subzone,
        });
    }
    let dir = &cfg.out;
    serde_json::json!({
        "xds_servers": [{
            "server_uri": relay.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": node,
        "certificate_providers": {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": dir.join(trust::svid::CERT_CHAIN_FILE),
                    "private_key_file": dir.join(trust::svid::KEY_FILE),
                    // The cluster's roots only: a client that does not read the bundle map
                    // (GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true) fails closed on other domains.
                    "ca_certificate_file": dir.join("root-cert.pem"),
                    "spiffe_bundle_map_file": dir.join(BUNDLE_MAP_FILE),
                    "spiffe_trust_bundle_map_file": dir.join(BUNDLE_MAP_FILE),
                    "refresh_interval": "10s",
                },
            },
        },
    })
}

/// The first config from the agent (retried with backoff until `deadline`: the agent may not
/// have seen a pod that was just created).
async fn first_config(
    client: &Client,
    deadline: tokio::time::Instant,
) -> anyhow::Result<(
    proto::workload::Config,
    tonic::Streaming<proto::workload::Config>,
)> {
    let mut wait = Duration::from_millis(200);
    loop {
        let r = async {
            let mut s = client.watch().await?;
            let first = s
                .message()
                .await
                .map_err(|st| rpc_error("the workload config stream failed", &st))?
                .context("the agent ended the workload config stream at once")?;
            anyhow::Ok((first, s))
        }
        .await;
        match r {
            Ok(x) => return Ok(x),
            Err(e) if tokio::time::Instant::now() + wait < deadline && retryable(&e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "no workload config yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `meshfed workload init`: obtain, write, return. Tries for up to `timeout`.
pub async fn init(cfg: WorkloadConfig, timeout: Duration) -> anyhow::Result<Obtained> {
    if cfg.xds_listen.port() == 0 {
        bail!("--xds-listen: the bootstrap must name the relay's port; 0 is for `agent` only");
    }
    let relay = cfg.xds_listen;
    let (client, obtained, _) = start(cfg, relay, timeout).await?;
    drop(client);
    Ok(obtained)
}

async fn start(
    cfg: WorkloadConfig,
    relay: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(
    Arc<Client>,
    Obtained,
    tonic::Streaming<proto::workload::Config>,
)> {
    trust::files::create_dir(&cfg.out)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let client = Arc::new(Client::new(cfg)?);
    let mut wait = Duration::from_millis(200);
    let svid = loop {
        match client.obtain().await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() + wait < deadline && retryable(&e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "no certificate yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    };
    client.install(&svid)?;
    let (first, stream) = first_config(&client, deadline).await?;
    let domains = client.write_trust(&first)?;
    let doc = bootstrap_document(&client.cfg, relay, &first);
    trust::files::write_atomic(
        &client.cfg.out.join(BOOTSTRAP_FILE),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
        trust::files::PUBLIC_MODE,
    )?;
    let obtained = Obtained {
        id: svid.id.to_string(),
        expires: svid.not_after,
        cluster: first.cluster.clone(),
        network: first.network.clone(),
        locality: locality_string(first.locality.as_ref()),
        trust_domains: domains,
    };
    Ok((client, obtained, stream))
}

/// A refusal that asking again will not change (the token, the identity or the request was
/// refused); anything else (the agent is starting, the API server is slow, the pod is not
/// known yet) is retried until the deadline.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A gRPC error as an error that says whether it is final.
fn rpc_error(what: &str, s: &tonic::Status) -> anyhow::Error {
    let e = meshfed_identity::cluster::describe_status(what, s);
    match s.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::InvalidArgument => anyhow::Error::new(Refused(e.to_string())),
        _ => e,
    }
}

fn retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().is_none()
}

/// A running `meshfed workload agent`.
#[derive(Debug)]
pub struct WorkloadAgent {
    pub obtained: Obtained,
    pub xds_relay: SocketAddr,
    tasks: Tasks,
}

impl WorkloadAgent {
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    pub async fn drain(self, deadline: Duration) -> meshfed_net::drain::DrainReport {
        self.tasks.drain(deadline).await
    }
}

/// `meshfed workload agent`: `init`, then renewal, the trust material kept current, and the
/// xDS relay.
pub async fn agent(cfg: WorkloadConfig, timeout: Duration) -> anyhow::Result<WorkloadAgent> {
    // Bound first: the bootstrap names the address it got.
    let listener = tokio::net::TcpListener::bind(cfg.xds_listen)
        .await
        .with_context(|| format!("cannot listen on {} (xDS relay)", cfg.xds_listen))?;
    let relay = listener.local_addr()?;
    let (client, obtained, stream) = start(cfg, relay, timeout).await?;
    let tasks = Tasks::new();
    let current = Svid::load(&client.cfg.out).ok().map(|(s, _)| s);
    let managed = Managed::with_resolver("workload", current, client.svid.clone())?;
    tasks.spawn(
        "workload certificate",
        managed.run(
            {
                let client = client.clone();
                issue_fn(move || {
                    let client = client.clone();
                    async move {
                        let s = client.renew().await?;
                        client.install(&s)?;
                        Ok(s)
                    }
                })
            },
            Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
        ),
    );
    tasks.spawn("trust bundles", follow_config(client.clone(), Some(stream)));
    let relayed = client.clone();
    tasks.spawn_server("xDS relay", |drain| async move {
        tokio::select! {
            _ = relay_loop(relayed, listener) => {}
            _ = drain.drained() => {}
        }
    });
    Ok(WorkloadAgent {
        obtained,
        xds_relay: relay,
        tasks,
    })
}

/// Rewrites the roots and the bundle map from the agent's stream; reconnects with jittered
/// backoff (200 ms .. 10 s) when it ends.
async fn follow_config(
    client: Arc<Client>,
    mut stream: Option<tonic::Streaming<proto::workload::Config>>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let r = async {
            let mut s = match stream.take() {
                Some(s) => s,
                None => client.watch().await?,
            };
            while let Some(c) = s
                .message()
                .await
                .map_err(|st| anyhow::anyhow!("{}", st.message()))?
            {
                let domains = client.write_trust(&c)?;
                tracing::info!(trust_domains = ?domains, "trust bundles updated");
            }
            anyhow::Ok(())
        }
        .await;
        match r {
            Ok(()) => tracing::warn!("the agent ended the workload config stream; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "workload config stream failed; reconnecting")
            }
        }
        let jitter = rand::random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn relay_loop(client: Arc<Client>, l: tokio::net::TcpListener) {
    loop {
        let local = match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, "xDS relay accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let client = client.clone();
        tokio::spawn(async move {
            let r = async {
                let tls = client.tls(client.svid.clone())?;
                meshfed_net::relay_tls(local, tls, &client.cfg.agent, &client.cfg.server_name).await
            }
            .await;
            if let Err(e) = r {
                tracing::debug!(error = %format!("{e:#}"), "xDS relay connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use trust::ca::{CaOptions, CertificateAuthority};

    fn cfg(dir: &Path) -> WorkloadConfig {
        WorkloadConfig {
            agent: vec!["127.0.0.1:1".into()],
            server_name: "meshfed-agent.meshfed-system.svc".into(),
            trust_domain: TrustDomain::new("east.mesh").unwrap(),
            namespace: "shop".into(),
            service_account: "client".into(),
            pod_name: "client-0".into(),
            pod_ip: None,
            token_file: dir.join("token"),
            root_cert: None,
            root_pem: None,
            out: dir.join("out"),
            xds_listen: XDS_LISTEN.parse().unwrap(),
            cert_ttl: None,
        }
    }

    #[test]
    fn the_bootstrap_names_the_pod_its_placement_and_the_files() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let config = proto::workload::Config {
            cluster: "east".into(),
            network: "net-e".into(),
            trust_domain: "east.mesh".into(),
            locality: Some(proto::workload::Locality {
                region: "us-east1".into(),
                zone: "us-east1-c".into(),
                subzone: String::new(),
            }),
            labels: [("app".to_string(), "client".to_string())].into(),
            pod_ip: "10.1.2.3".into(),
            bundles: Default::default(),
        };
        let doc = bootstrap_document(&c, c.xds_listen, &config);
        assert_eq!(
            doc["node"]["id"],
            "sidecar~10.1.2.3~client-0.shop~shop.svc.cluster.local"
        );
        assert_eq!(doc["node"]["locality"]["zone"], "us-east1-c");
        assert_eq!(doc["node"]["metadata"]["NETWORK"], "net-e");
        assert_eq!(doc["node"]["metadata"]["LABELS"]["app"], "client");
        assert_eq!(doc["xds_servers"][0]["server_uri"], "127.0.0.1:15010");
        let p = &doc["certificate_providers"]["default"]["config"];
        assert_eq!(
            p["spiffe_bundle_map_file"],
            p["spiffe_trust_bundle_map_file"]
        );
        assert!(p["ca_certificate_file"]
            .as_str()
            .unwrap()
            .ends_with("out/root-cert.pem"));
        // A flag's pod IP wins over what the agent saw; no region, no locality.
        let mut c2 = c.clone();
        c2.pod_ip = Some("10.9.9.9".into());
        let mut bare = config.clone();
        bare.locality = None;
        let doc = bootstrap_document(&c2, c.xds_listen, &bare);
        assert!(doc["node"]["id"].as_str().unwrap().contains("~10.9.9.9~"));
        assert!(doc["node"].get("locality").is_none());
    }

    #[test]
    fn roots_must_be_the_trust_domains_cas_and_some_must_be_given() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        let e = initial_roots(&c).unwrap_err().to_string();
        assert!(e.contains("--root-cert FILE or MESHFED_ROOT_CERTS"), "{e}");
        let west = CertificateAuthority::create(
            TrustDomain::new("west.mesh").unwrap(),
            CaOptions::default(),
        )
        .unwrap();
        c.root_pem = Some(trust::keys::certs_to_pem(west.roots().iter()));
        let e = format!("{:#}", initial_roots(&c).unwrap_err());
        assert!(
            e.contains("MESHFED_ROOT_CERTS: not a CA certificate of trust domain east.mesh"),
            "{e}"
        );
        let east = CertificateAuthority::create(
            TrustDomain::new("east.mesh").unwrap(),
            CaOptions::default(),
        )
        .unwrap();
        c.root_pem = Some(trust::keys::certs_to_pem(east.roots().iter()));
        std::fs::write(d.path().join("roots.pem"), "not PEM").unwrap();
        c.root_cert = Some(d.path().join("roots.pem"));
        let e = format!("{:#}", initial_roots(&c).unwrap_err());
        assert!(e.contains("roots.pem"), "{e}");
        c.root_cert = None;
        assert_eq!(initial_roots(&c).unwrap(), east.roots());
    }

    #[test]
    fn refusals_are_final_and_outages_are_retried() {
        for (code, retry) in [
            (tonic::Code::PermissionDenied, false),
            (tonic::Code::Unauthenticated, false),
            (tonic::Code::InvalidArgument, false),
            (tonic::Code::Unavailable, true),
            (tonic::Code::NotFound, true),
        ] {
            let e = rpc_error("x", &tonic::Status::new(code, "why"));
            assert_eq!(retryable(&e), retry, "{code:?}");
            assert_eq!(e.to_string(), "x: why");
        }
    }
}
