//! `meshfed vm agent`: the VM side. First start: the one-time token buys a durable VM
//! credential and a workload SVID. Every start after that (a reboot, an expired token) renews
//! with the credential. Then, for as long as it runs: an Attach stream that keeps the VM's
//! WorkloadEntry registered and reports the group's probe; the workload certificate files
//! renewed before expiry; a plaintext xDS relay on 127.0.0.1 that forwards to the cluster's mTLS
//! xDS port with the VM's SVID (as Istio's pilot-agent does for Envoy) and a gRPC xDS bootstrap
//! that points at it; the mesh DNS.
//!
//! State (`stateDir`, 0700): `credential/{cert-chain,key,root-cert}.pem`, `vm-id`, `roots.pem`
//! (the cluster's roots as last received). Workload files (`certDir`): `cert-chain.pem`,
//! `key.pem`, `root-cert.pem` (the cluster's roots), `spiffe-bundle-map.json` (one SPIFFE bundle
//! per trust domain: the cluster's and every peer's); `grpc-bootstrap.json` beside them.

pub mod config;
pub mod probe;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use proto::vm::vm_registration_client::VmRegistrationClient;
use proto::vm::{agent_message, vm_message, Certificates, Health, Register, VmMessage};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::watch;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, SpiffeId, Svid, TrustBundle, TrustDomain, TrustStore};

use crate::config::VmConfig;
use crate::probe::Readiness;
use meshfed_dns::table::NameTable;
use meshfed_identity::vm_token::VmClaims;
use meshfed_net::admin::AdminConfig;
use meshfed_net::drain::{DrainReport, Tasks};

/// The SPIFFE bundle map beside the workload files (`certDir`).
pub const BUNDLE_MAP_FILE: &str = "spiffe-bundle-map.json";

/// What `/status` shows.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VmStatus {
    pub kind: String,
    pub vm_id: String,
    pub cluster: String,
    pub group: String,
    pub namespace: String,
    pub address: String,
    pub entry: Option<String>,
    pub connected: bool,
    pub healthy: Option<bool>,
    pub health_message: String,
    pub svid: String,
    pub svid_expires: String,
    pub credential_expires: String,
    pub last_error: Option<String>,
    pub dns: Option<String>,
    pub xds_relay: Option<String>,
    pub names: usize,
}

/// A running VM agent.
#[derive(Debug)]
pub struct VmAgent {
    pub status: Arc<Mutex<VmStatus>>,
    pub dns: Option<SocketAddr>,
    pub xds_relay: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    tasks: Tasks,
}

impl VmAgent {
    /// Stops at once, as a crash would.
    pub fn stop(self) {
        self.tasks.abort_all();
    }

    /// The VM agent's tasks (health, readiness, drain).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Drains: the Attach stream and the relay end, DNS answers what is in flight; up to
    /// `deadline`. The WorkloadEntry then waits out its grace period at the agent.
    pub async fn drain(self, deadline: Duration) -> DrainReport {
        self.tasks.drain(deadline).await
    }

    pub fn status(&self) -> VmStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Shared {
    cfg: VmConfig,
    td: TrustDomain,
    vm_id: String,
    /// The cluster's roots: what the agent's certificate must chain to.
    own_roots: TrustStore,
    credential: Arc<SvidResolver>,
    svid: Arc<SvidResolver>,
    status: Arc<Mutex<VmStatus>>,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, VmStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn agent_verifier(&self) -> anyhow::Result<SpiffeVerifier> {
        Ok(SpiffeVerifier::new(
            self.own_roots.clone(),
            Authorizer::id(meshfed_identity::ids::agent_spiffe_id(&self.td)?),
        ))
    }

    fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let tls = trust::tls::client_config(self.credential.clone(), self.agent_verifier()?)?;
        meshfed_net::channel(
            self.cfg.control_plane.clone(),
            tls,
            &self.cfg.control_plane_sni,
        )
    }

    /// The cluster's own roots: the workload's `root-cert.pem` (peers of other trust domains
    /// are verified against their own bundles, from `spiffe-bundle-map.json`).
    fn own_root_certs(&self) -> Vec<CertificateDer<'static>> {
        self.own_roots
            .load()
            .get(self.td.as_str())
            .map(|b| b.x509_authorities.clone())
            .unwrap_or_default()
    }

    /// Writes the SPIFFE bundle map (the cluster's and every peer's bundle, one per trust
    /// domain) beside the workload files. A bundle that does not parse as one of its own trust
    /// domain is left out.
    fn set_bundles(
        &self,
        bundles: &std::collections::HashMap<String, String>,
    ) -> anyhow::Result<()> {
        let doc = meshfed_model::snapshot::bundle_map_document(bundles);
        trust::files::write_atomic(
            &self.cfg.cert_dir.join(BUNDLE_MAP_FILE),
            serde_json::to_string_pretty(&doc)?.as_bytes(),
            trust::files::PUBLIC_MODE,
        )?;
        Ok(())
    }

    /// Installs the cluster's new roots (kept in the state dir, used to check the agent) and
    /// rewrites the workload root file with them.
    fn set_roots(&self, own: &[Vec<u8>]) -> anyhow::Result<()> {
        if !own.is_empty() {
            let own: Vec<CertificateDer<'static>> = own
                .iter()
                .map(|d| CertificateDer::from(d.clone()))
                .collect();
            for c in &own {
                trust::svid::check_signer(c, &self.td)
                    .map_err(|e| anyhow::anyhow!("a root from the agent is unusable: {e}"))?;
            }
            let mut set = BundleSet::new();
            set.insert(TrustBundle::new(self.td.clone(), own.clone()))?;
            self.own_roots.store(set);
            trust::files::write_atomic(
                &self.cfg.state_dir.join("roots.pem"),
                trust::keys::certs_to_pem(own.iter()).as_bytes(),
                trust::files::PUBLIC_MODE,
            )?;
        }
        let roots = self.own_root_certs();
        trust::files::write_atomic(
            &self.cfg.cert_dir.join("root-cert.pem"),
            trust::keys::certs_to_pem(roots.iter()).as_bytes(),
            trust::files::PUBLIC_MODE,
        )?;
        Ok(())
    }
}

fn credential_dir(cfg: &VmConfig) -> PathBuf {
    cfg.state_dir.join("credential")
}

fn load_roots(cfg: &VmConfig, td: &TrustDomain) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    // The roots last received from the agent win over the package's (the CA may have rotated).
    let stored = cfg.state_dir.join("roots.pem");
    let path = if stored.exists() {
        stored
    } else {
        cfg.root_cert.clone()
    };
    let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let roots = trust::keys::certs_from_pem(&pem, &path.display().to_string())?;
    for r in &roots {
        trust::svid::check_signer(r, td).with_context(|| {
            format!(
                "{}: not a CA certificate of trust domain {td}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

fn chain(ders: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    ders.iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect()
}

/// Starts the VM agent: gets its identity (join or renew), then runs everything else.
pub async fn start(cfg: VmConfig) -> anyhow::Result<VmAgent> {
    let td = TrustDomain::new(&cfg.trust_domain)?;
    trust::files::create_dir(&cfg.state_dir)?;
    trust::files::create_dir(&cfg.cert_dir)?;
    let roots = load_roots(&cfg, &td)?;
    let mut set = BundleSet::new();
    set.insert(TrustBundle::new(td.clone(), roots))?;
    let own_roots = TrustStore::new(set);
    let status = Arc::new(Mutex::new(VmStatus {
        kind: "vm".into(),
        cluster: cfg.cluster.0.clone(),
        group: cfg.group.0.clone(),
        namespace: cfg.namespace.0.clone(),
        ..Default::default()
    }));

    let cred_dir = credential_dir(&cfg);
    let stored = Svid::load(&cred_dir).ok().map(|(s, _)| s);
    let now = time::OffsetDateTime::now_utc();
    let shared;
    match stored.filter(|s| s.not_after > now + time::Duration::minutes(1)) {
        Some(cred) => {
            let vm_id = std::fs::read_to_string(cfg.state_dir.join("vm-id"))
                .context("the VM credential exists but vm-id does not")?
                .trim()
                .to_string();
            shared = Arc::new(Shared {
                td: td.clone(),
                vm_id,
                own_roots,
                credential: SvidResolver::with(&cred)?,
                svid: SvidResolver::new(),
                status: status.clone(),
                cfg,
            });
            shared.status().credential_expires = cred.not_after.to_string();
            match renew(&shared, &cred).await {
                Ok(()) => tracing::info!(vm = %shared.vm_id, "reconnected with the VM credential"),
                Err(e) => {
                    // Static stability: a VM that reboots while its control plane is away keeps
                    // serving with the workload certificate it has, and keeps trying.
                    let current = Svid::load(&shared.cfg.cert_dir)
                        .ok()
                        .map(|(s, _)| s)
                        .filter(|s| s.not_after > now + time::Duration::minutes(1));
                    let Some(svid) = current else {
                        return Err(e.context(
                            "cannot renew the VM's identity with its credential (is the control plane reachable?), and no valid workload certificate is on disk",
                        ));
                    };
                    tracing::warn!(error = %format!("{e:#}"), "cannot reach the control plane; starting with the current workload certificate and retrying");
                    shared.svid.install(&svid)?;
                    let mut st = shared.status();
                    st.svid = svid.id.to_string();
                    st.svid_expires = svid.not_after.to_string();
                    st.last_error = Some(format!("{e:#}"));
                }
            }
        }
        None => {
            let token_path = cfg.token_file.clone();
            let token = std::fs::read_to_string(&token_path).with_context(|| {
                format!(
                    "this VM has no credential yet and its join token {} cannot be read",
                    token_path.display()
                )
            })?;
            let claims = VmClaims::decode(&token)
                .map_err(|e| anyhow::anyhow!("{}: {e}", token_path.display()))?;
            if claims.group != cfg.group.0 || claims.namespace != cfg.namespace.0 {
                bail!(
                    "{}: the token is for WorkloadGroup {}/{}, and vm.yaml names {}/{}",
                    token_path.display(),
                    claims.namespace,
                    claims.group,
                    cfg.namespace.0,
                    cfg.group.0
                );
            }
            shared = Arc::new(Shared {
                td: td.clone(),
                vm_id: claims.id.clone(),
                own_roots,
                credential: SvidResolver::new(),
                svid: SvidResolver::new(),
                status: status.clone(),
                cfg,
            });
            join(&shared, &token).await?;
            tracing::info!(vm = %shared.vm_id, "joined with the one-time token");
        }
    }
    shared.status().vm_id = shared.vm_id.clone();
    let address = match &shared.cfg.address {
        Some(a) => *a,
        None => local_address(&shared.cfg.control_plane[0]).await?,
    };
    shared.status().address = address.to_string();

    let tasks = Tasks::new();
    // One registry for everything this process measures; the admin server serves it.
    let registry = prometheus::Registry::new();
    let (names_tx, names_rx) = watch::channel(Arc::new(NameTable::default()));
    let mut dns = None;
    if let Some(listen) = shared.cfg.dns_listen.0 {
        let upstream = if shared.cfg.dns_upstream.is_empty() {
            meshfed_dns::system_upstreams()
        } else {
            shared.cfg.dns_upstream.iter().map(|u| u.0).collect()
        };
        let served =
            meshfed_dns::serve(&tasks, listen, names_rx.clone(), upstream, &registry).await?;
        dns = Some(served.addr);
        shared.status().dns = Some(served.addr.to_string());
    }
    let mut xds_relay = None;
    if let Some(listen) = shared.cfg.xds_listen.0 {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (xDS relay)"))?;
        xds_relay = Some(l.local_addr()?);
        shared.status().xds_relay = Some(l.local_addr()?.to_string());
        write_grpc_bootstrap(&shared.cfg, address, l.local_addr()?)?;
        let relay = shared.clone();
        tasks.spawn_server("xDS relay", |drain| async move {
            tokio::select! {
                _ = relay_xds(relay, l) => {}
                _ = drain.drained() => {}
            }
        });
    }
    tasks.spawn("attach", attach_loop(shared.clone(), address, names_tx));
    let workload = meshfed_identity::certs::Managed::with_resolver(
        "workload",
        Svid::load(&shared.cfg.cert_dir).ok().map(|(s, _)| s),
        shared.svid.clone(),
    )?;
    tasks.spawn(
        "workload certificate",
        workload.run(
            {
                let shared = shared.clone();
                meshfed_identity::certs::issue_fn(move || renew_workload(shared.clone()))
            },
            meshfed_identity::certs::Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
        ),
    );
    // Ready while attached to the control plane and the group's probe passes.
    let st = shared.status.clone();
    tasks.readiness_check(
        "control plane",
        Arc::new(move || {
            let s = st.lock().unwrap_or_else(|p| p.into_inner());
            if !s.connected {
                Err(format!(
                    "not attached{}",
                    s.last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ))
            } else if s.healthy == Some(false) {
                Err(format!("the readiness probe fails: {}", s.health_message))
            } else {
                Ok(())
            }
        }),
    );
    let mut admin_addr = None;
    if let Some(addr) = shared.cfg.admin.0 {
        let st = shared.status.clone();
        admin_addr = Some(
            meshfed_net::admin::serve(
                &tasks,
                AdminConfig {
                    addr,
                    registry: Arc::new(move || registry.clone()),
                    status: Arc::new(move || {
                        serde_json::to_value(st.lock().unwrap_or_else(|p| p.into_inner()).clone())
                            .map_err(|e| e.to_string())
                    }),
                    extra: None,
                    ui: None,
                    // A VM's health is read on the VM itself (systemd, the admin address).
                    probe: None,
                },
            )
            .await?
            .admin,
        );
    }
    Ok(VmAgent {
        status,
        dns,
        xds_relay,
        admin: admin_addr,
        tasks,
    })
}

/// The local address the kernel would use to reach `target` (no packet is sent).
async fn local_address(target: &str) -> anyhow::Result<IpAddr> {
    let dst = meshfed_net::resolve(target).await?;
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = tokio::net::UdpSocket::bind(bind).await?;
    s.connect(dst).await?;
    Ok(s.local_addr()?.ip())
}

fn new_csr(
    id: &SpiffeId,
) -> anyhow::Result<(rustls_pki_types::PrivatePkcs8KeyDer<'static>, Vec<u8>)> {
    Ok(trust::keys::key_and_csr(id)?)
}

fn workload_id(cfg: &VmConfig, td: &TrustDomain) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::istio_workload(
        td,
        &cfg.namespace.0,
        &cfg.service_account.0,
    )?)
}

async fn join(shared: &Arc<Shared>, token: &str) -> anyhow::Result<()> {
    let cred_id = meshfed_identity::ids::credential_id(&shared.td, &shared.vm_id)
        .map_err(|e| anyhow::anyhow!(e))?;
    let (cred_key, cred_csr) = new_csr(&cred_id)?;
    let (svid_key, svid_csr) = new_csr(&workload_id(&shared.cfg, &shared.td)?)?;
    let tls = trust::tls::client_config(SvidResolver::new(), shared.agent_verifier()?)?;
    let ch = meshfed_net::channel(
        shared.cfg.control_plane.clone(),
        tls,
        &shared.cfg.control_plane_sni,
    )?;
    let resp = VmRegistrationClient::new(ch)
        .join(proto::vm::JoinRequest {
            token: token.trim().to_string(),
            credential_csr_der: cred_csr,
            svid_csr_der: svid_csr,
        })
        .await
        .map_err(|s| {
            meshfed_identity::cluster::describe_status("the cluster refused the join", &s)
        })?
        .into_inner();
    let certs = resp
        .certificates
        .context("the join response has no certificates")?;
    let cred = Svid::new(chain(&certs.credential_chain_der), cred_key)
        .context("the VM credential from the agent is unusable")?;
    shared.set_roots(&certs.roots_der)?;
    cred.write_files(&credential_dir(&shared.cfg), &shared.own_root_certs())?;
    trust::files::write_atomic(
        &shared.cfg.state_dir.join("vm-id"),
        shared.vm_id.as_bytes(),
        trust::files::PUBLIC_MODE,
    )?;
    shared.credential.install(&cred)?;
    shared.status().credential_expires = cred.not_after.to_string();
    install_svid(shared, &certs, svid_key)
}

fn install_svid(
    shared: &Arc<Shared>,
    certs: &Certificates,
    key: rustls_pki_types::PrivatePkcs8KeyDer<'static>,
) -> anyhow::Result<()> {
    let svid = Svid::new(chain(&certs.svid_chain_der), key)
        .context("the workload SVID from the agent is unusable")?;
    let want = workload_id(&shared.cfg, &shared.td)?;
    if svid.id != want {
        tracing::warn!(got = %svid.id, configured = %want, "the group's service account differs from vm.yaml's; using the agent's");
    }
    shared.set_roots(&certs.roots_der)?;
    svid.write_files(&shared.cfg.cert_dir, &shared.own_root_certs())?;
    shared.svid.install(&svid)?;
    let mut st = shared.status();
    st.svid = svid.id.to_string();
    st.svid_expires = svid.not_after.to_string();
    Ok(())
}

/// A fresh workload SVID, and a fresh credential when the current one is past half its life.
async fn renew(shared: &Arc<Shared>, cred: &Svid) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let half = cred.not_before + (cred.not_after - cred.not_before) / 2;
    let (svid_key, svid_csr) = new_csr(&workload_id(&shared.cfg, &shared.td)?)?;
    let new_cred = if now >= half {
        Some(new_csr(&cred.id)?)
    } else {
        None
    };
    let resp = VmRegistrationClient::new(shared.channel()?)
        .renew(proto::vm::RenewRequest {
            svid_csr_der: svid_csr,
            credential_csr_der: new_cred.as_ref().map(|c| c.1.clone()).unwrap_or_default(),
        })
        .await
        .map_err(|s| {
            meshfed_identity::cluster::describe_status("the cluster refused the renewal", &s)
        })?
        .into_inner();
    let certs = resp
        .certificates
        .context("the renewal has no certificates")?;
    if let Some((key, _)) = new_cred {
        let c = Svid::new(chain(&certs.credential_chain_der), key)
            .context("the renewed VM credential is unusable")?;
        shared.set_roots(&certs.roots_der)?;
        c.write_files(&credential_dir(&shared.cfg), &shared.own_root_certs())?;
        shared.credential.install(&c)?;
        shared.status().credential_expires = c.not_after.to_string();
        tracing::info!("renewed the VM credential");
    }
    install_svid(shared, &certs, svid_key)
}

/// Renews the workload SVID with the VM credential (and the credential with it when due); the
/// certificate manager decides when (50-80 % of its life) and retries with backoff.
async fn renew_workload(shared: Arc<Shared>) -> anyhow::Result<Svid> {
    let (cred, _) = Svid::load(&credential_dir(&shared.cfg))
        .map_err(|e| anyhow::anyhow!("the VM credential cannot be read: {e}"))?;
    let r = renew(&shared, &cred).await;
    if let Err(e) = &r {
        shared.status().last_error = Some(format!("{e:#}"));
    }
    r?;
    let (svid, _) = Svid::load(&shared.cfg.cert_dir)
        .map_err(|e| anyhow::anyhow!("the renewed workload certificate cannot be read: {e}"))?;
    Ok(svid)
}

/// Keeps the Attach stream up (jittered backoff from 200 ms to 10 s), registering the VM and
/// reporting its probe.
async fn attach_loop(shared: Arc<Shared>, address: IpAddr, names: watch::Sender<Arc<NameTable>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = std::time::Instant::now();
        let r = attach_once(&shared, address, &names).await;
        {
            let mut st = shared.status();
            st.connected = false;
            if let Err(e) = &r {
                st.last_error = Some(format!("{e:#}"));
            }
        }
        match r {
            Ok(()) => tracing::warn!("the control plane closed the Attach stream; reconnecting"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "Attach failed; reconnecting"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        let jitter = rand::random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn attach_once(
    shared: &Arc<Shared>,
    address: IpAddr,
    names: &watch::Sender<Arc<NameTable>>,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<VmMessage>(8);
    let locality = shared.cfg.locality.as_ref().map(|l| proto::vm::Locality {
        region: l.0.region.clone(),
        zone: l.0.zone.clone(),
        subzone: l.0.subzone.clone(),
    });
    tx.send(VmMessage {
        kind: Some(vm_message::Kind::Register(Register {
            group: shared.cfg.group.0.clone(),
            namespace: shared.cfg.namespace.0.clone(),
            address: address.to_string(),
            network: shared
                .cfg
                .vm_network
                .as_ref()
                .map(|n| n.0.clone())
                .unwrap_or_default(),
            locality,
            labels: shared.cfg.labels.clone().into_iter().collect(),
            hostname: hostname(),
        })),
    })
    .await?;
    let mut inbound = VmRegistrationClient::new(shared.channel()?)
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            meshfed_identity::cluster::describe_status("the cluster refused the registration", &s)
        })?
        .into_inner();
    // Aborted when this attempt ends, however it ends (the agent's task may be aborted too).
    let mut probe_task: Option<AbortOnDrop> = None;
    let (ready_tx, mut ready_rx) = watch::channel::<Readiness>((false, "not probed yet".into()));
    let result = async {
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let Some(m) = m.map_err(|s| anyhow::anyhow!("{}", s.message()))? else {
                        return Ok(());
                    };
                    match m.kind {
                        Some(agent_message::Kind::Registered(r)) => {
                            tracing::info!(entry = %r.entry, "WorkloadEntry registered");
                            {
                                let mut st = shared.status();
                                st.entry = Some(r.entry.clone());
                                st.connected = true;
                                st.last_error = None;
                            }
                            if r.probe_yaml.is_empty() {
                                ready_tx.send_replace((true, String::new()));
                            } else {
                                let p: meshfed_model::workload::Probe =
                                    meshfed_model::policy::spec::parse_yaml(&r.probe_yaml, "the group's probe from the agent")
                                        .map_err(|e| anyhow::anyhow!(e))?;
                                p.check().map_err(|e| anyhow::anyhow!(e))?;
                                let tx = ready_tx.clone();
                                probe_task = Some(AbortOnDrop(tokio::spawn(probe::run(p, tx))));
                            }
                        }
                        Some(agent_message::Kind::Roots(r)) => {
                            shared.set_roots(&r.roots_der)?;
                            shared.set_bundles(&r.bundles)?;
                        }
                        Some(agent_message::Kind::Names(n)) => {
                            let (t, bad) = NameTable::from_proto(&n);
                            for b in bad {
                                tracing::warn!(entry = %b, "a name from the agent was left out");
                            }
                            shared.status().names = t.name_count();
                            names.send_replace(Arc::new(t));
                        }
                        None => {}
                    }
                }
                r = ready_rx.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let (healthy, message) = ready_rx.borrow_and_update().clone();
                    {
                        let mut st = shared.status();
                        st.healthy = Some(healthy);
                        st.health_message = message.clone();
                    }
                    tx.send(VmMessage { kind: Some(vm_message::Kind::Health(Health { healthy, message })) }).await?;
                }
            }
        }
    }
    .await;
    drop(probe_task);
    result
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Plaintext xDS from local proxies, forwarded over mTLS with the VM's SVID to the cluster's
/// xDS port (through the east-west gateway when the VM is on another network).
async fn relay_xds(shared: Arc<Shared>, l: tokio::net::TcpListener) {
    loop {
        let Ok((local, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let r = async {
                let tls = trust::tls::client_config(shared.svid.clone(), shared.agent_verifier()?)?;
                let _ = local.set_nodelay(true);
                meshfed_net::relay_tls(
                    local,
                    tls,
                    &[shared.cfg.xds_address().to_string()],
                    &shared.cfg.xds_sni,
                )
                .await
            }
            .await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "xDS relay connection ended");
            }
        });
    }
}

/// The gRPC xDS bootstrap for proxyless workloads on the VM (`GRPC_XDS_BOOTSTRAP`).
fn write_grpc_bootstrap(cfg: &VmConfig, address: IpAddr, relay: SocketAddr) -> anyhow::Result<()> {
    let ns = &cfg.namespace.0;
    let mut node = serde_json::json!({
        "id": format!("sidecar~{address}~{}.{ns}~{ns}.svc.cluster.local", cfg.group.0),
        "metadata": {
            "NAMESPACE": ns,
            "CLUSTER_ID": cfg.cluster.0,
            "NETWORK": cfg.vm_network.as_ref().unwrap_or(&cfg.network).0,
            "LABELS": cfg.labels,
            "AUTO_REGISTER_GROUP": cfg.group.0,
        },
    });
    if let Some(l) = &cfg.locality {
        node["locality"] = serde_json::json!({
            "region": l.0.region, "zone": l.0.zone, "sub_zone": l.0.subzone,
        });
    }
    let dir = &cfg.cert_dir;
    let doc = serde_json::json!({
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
                    "certificate_file": dir.join("cert-chain.pem"),
                    "private_key_file": dir.join("key.pem"),
                    // The cluster's roots only: a client that does not read the bundle map
                    // (GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true) fails closed on other domains.
                    "ca_certificate_file": dir.join("root-cert.pem"),
                    "spiffe_bundle_map_file": dir.join(BUNDLE_MAP_FILE),
                    "spiffe_trust_bundle_map_file": dir.join(BUNDLE_MAP_FILE),
                    "refresh_interval": "60s",
                },
            },
        },
    });
    trust::files::write_atomic(
        &cfg.cert_dir.join("grpc-bootstrap.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
        trust::files::PUBLIC_MODE,
    )?;
    Ok(())
}

/// For tests: whether `dir` holds a usable credential.
pub fn has_credential(state_dir: &Path) -> bool {
    Svid::load(&state_dir.join("credential")).is_ok()
}
