//! The per-cluster control plane (`meshfed agent`): reads the cluster's registry, publishes its
//! exports and trust bundle to the federator over one mTLS stream, and keeps the imports in a
//! local cache and in the in-process [`model::Model`].

pub mod cache;
pub mod identity;
pub mod model;
pub mod registry;
pub mod sync;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use proto::ServiceExport;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, TrustDomain, TrustStore};

use crate::federation::identity::federator_spiffe_id;
use crate::metrics::AgentMetrics;
use crate::policy::PolicySet;
use identity::ClusterIdentity;
use registry::{FileRegistry, RegistrySource};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub registry: PathBuf,
    pub admin: Option<String>,
    /// How often the registry and policy files are checked for changes.
    pub registry_poll: Duration,
    /// Failover policy files or directories (`*.yaml`).
    pub policies: Vec<PathBuf>,
    /// The xDS server; `None` runs the agent without one.
    pub xds: Option<crate::xds::XdsConfig>,
    /// The VM API (`meshfed vm agent` joins and registers here); `None` = off.
    pub vm_api: Option<String>,
    /// How long a disconnected VM's WorkloadEntry is kept before it is deleted.
    pub vm_grace: Duration,
    /// The mesh DNS server; `None` = off.
    pub dns: Option<crate::dns::DnsConfig>,
    /// Where service VIPs come from.
    pub vip_range_v4: ipnet::Ipv4Net,
    pub vip_range_v6: Option<ipnet::Ipv6Net>,
}

/// Istio's auto-allocation range for service entries' VIPs.
pub fn default_vip_range_v4() -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(240, 240, 0, 0), 16).unwrap_or_default()
}

/// What the sync loop reports about itself.
#[derive(Debug, Default, Clone)]
pub struct SyncStatus {
    pub connected: bool,
    pub left: bool,
    pub last_error: Option<String>,
    pub exports_acked_version: u64,
    pub conflicts: Vec<String>,
    pub lease_ttl_ms: u64,
    pub registry_error: Option<String>,
    pub policy_error: Option<String>,
}

#[derive(Debug)]
pub struct Inner {
    identity: Mutex<ClusterIdentity>,
    pub cache: cache::Cache,
    pub model: model::Model,
    /// The exports the registry currently asks for.
    pub exports: watch::Sender<BTreeMap<String, ServiceExport>>,
    /// The exports as the registry states them, before published policies are attached.
    registry_exports: Mutex<BTreeMap<String, ServiceExport>>,
    /// The cluster CA's bundle JSON.
    pub bundle: watch::Sender<String>,
    pub resolver: Arc<SvidResolver>,
    pub federator_verifier: SpiffeVerifier,
    pub metrics: AgentMetrics,
    status: Mutex<SyncStatus>,
    /// The failover policies from files, last good set.
    pub policies: watch::Sender<Arc<PolicySet>>,
    pub xds: std::sync::OnceLock<Arc<crate::xds::server::XdsState>>,
    /// The last good registry.
    registry: Mutex<Option<registry::Registry>>,
    default_locality: proto::Locality,
    /// WorkloadEntries auto-registered by VMs.
    pub entries: Arc<crate::vm::entries::Entries>,
    /// Where the mesh DNS server listens, when it runs.
    pub dns_addr: std::sync::OnceLock<SocketAddr>,
    /// The mesh's names and VIPs (the agent's DNS and its VMs' DNS answer from this).
    pub names: watch::Sender<Arc<crate::dns::table::NameTable>>,
}

impl Inner {
    pub fn identity(&self) -> MutexGuard<'_, ClusterIdentity> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> MutexGuard<'_, SyncStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the registry's exports with the policies marked `publish: true` attached to
    /// the services they are for.
    pub fn publish_exports(&self) {
        let mut exports = self
            .registry_exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let policies = self.policies.borrow().clone();
        for e in exports.values_mut() {
            let host = format!("{}.{}.svc.cluster.local", e.name, e.namespace);
            if let Some(p) = policies.by_host.get(&host).filter(|p| p.publish) {
                e.failover_policy = p.to_yaml();
            }
        }
        self.exports.send_if_modified(|cur| {
            if *cur == exports {
                false
            } else {
                *cur = exports;
                true
            }
        });
    }

    /// The last good registry, if any.
    pub fn registry(&self) -> Option<registry::Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Recomputes the local services and the exports from the last good registry and the
    /// auto-registered WorkloadEntries, and publishes them.
    pub fn apply_registry(&self) {
        let Some(reg) = self.registry() else {
            return;
        };
        let (local, exports) = reg.view(&self.default_locality, &self.entries.current());
        self.model.update(|s| s.local = local);
        *self
            .registry_exports
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = exports;
        self.publish_exports();
    }

    pub fn set_connected(&self, up: bool) {
        self.status().connected = up;
        self.metrics.connected.set(i64::from(up));
        self.model.update(|s| s.federator_connected = up);
    }

    /// The agent's status report (for `/status` and `meshfed status`).
    pub fn report(&self) -> AgentReport {
        let snap = self.model.current();
        let st = self.status().clone();
        let id = self.identity().file.clone();
        let mut imports: BTreeMap<String, u64> = BTreeMap::new();
        for (src, _) in snap.imports.keys() {
            *imports.entry(src.clone()).or_default() += 1;
        }
        AgentReport {
            kind: "agent".into(),
            cluster: id.cluster,
            network: id.network,
            trust_domain: id.trust_domain,
            locality: id.locality,
            federators: id.federators,
            connected: st.connected,
            left: st.left,
            last_error: st.last_error,
            registry_error: st.registry_error,
            policy_error: st.policy_error,
            policies: self
                .policies
                .borrow()
                .by_host
                .values()
                .map(|p| format!("{} ({}/{} at {})", p.host, p.namespace, p.name, p.origin))
                .collect(),
            xds: self.xds.get().map(|x| {
                let proxies = x.proxies.report();
                XdsReport {
                    generation: x.current().version,
                    proxies: proxies.len() as u64,
                    nacks: proxies
                        .iter()
                        .flat_map(|p| {
                            p.types.iter().filter_map(move |(k, t)| {
                                t.error.as_ref().map(|e| format!("{} {k}: {e}", p.proxy))
                            })
                        })
                        .collect(),
                }
            }),
            endpoints: snap
                .services()
                .into_iter()
                .map(|(k, insts)| {
                    let per = insts
                        .iter()
                        .map(|i| {
                            let n = i.export.endpoints.iter().filter(|e| e.healthy).count() as u64;
                            (i.cluster.clone(), n)
                        })
                        .collect();
                    (k, per)
                })
                .collect(),
            workload_entries: self
                .entries
                .current()
                .values()
                .map(|e| EntryReport {
                    name: e.name.clone(),
                    namespace: e.namespace.clone(),
                    group: e.group.clone(),
                    address: e.address.clone(),
                    connected: e.connected,
                    healthy: e.healthy,
                    health_message: e.health_message.clone(),
                    annotations: e.annotations.clone(),
                })
                .collect(),
            dns_names: self.names.borrow().name_count() as u64,
            exports: self.exports.borrow().len() as u64,
            exports_acked_version: st.exports_acked_version,
            imports_applied_revision: snap.applied_revision,
            imports,
            conflicts: st.conflicts,
            peers: snap
                .peers
                .values()
                .filter_map(|p| {
                    let f = p.facts.as_ref()?;
                    Some(PeerReport {
                        cluster: f.cluster_id.clone(),
                        network: f.network.clone(),
                        trust_domain: f.trust_domain.clone(),
                        connected: p.connected,
                        lease: if p.lease == proto::LeaseState::Stale as i32 {
                            "stale".into()
                        } else {
                            "fresh".into()
                        },
                        last_heartbeat_age_ms: p.last_heartbeat_age_ms,
                        bundle: snap.bundles.contains_key(&f.trust_domain),
                    })
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerReport {
    pub cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub connected: bool,
    pub lease: String,
    /// As measured by the federator when it last told us.
    pub last_heartbeat_age_ms: u64,
    /// Whether we hold the peer's trust bundle.
    pub bundle: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentReport {
    pub kind: String,
    pub cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub locality: String,
    pub federators: Vec<String>,
    pub connected: bool,
    pub left: bool,
    pub last_error: Option<String>,
    pub registry_error: Option<String>,
    #[serde(default)]
    pub policy_error: Option<String>,
    /// Policies in effect from files: `host (ns/name at file:line:column)`.
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub xds: Option<XdsReport>,
    pub exports: u64,
    pub exports_acked_version: u64,
    pub imports_applied_revision: u64,
    /// Imported services by source cluster.
    pub imports: BTreeMap<String, u64>,
    pub conflicts: Vec<String>,
    pub peers: Vec<PeerReport>,
    /// Serving endpoints per service and cluster (`ns/name` -> cluster -> count).
    #[serde(default)]
    pub endpoints: BTreeMap<String, BTreeMap<String, u64>>,
    /// WorkloadEntries registered by VMs.
    #[serde(default)]
    pub workload_entries: Vec<EntryReport>,
    /// Names the mesh DNS answers for.
    #[serde(default)]
    pub dns_names: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryReport {
    pub name: String,
    pub namespace: String,
    pub group: String,
    pub address: String,
    pub connected: bool,
    /// `null` before the first report.
    pub healthy: Option<bool>,
    pub health_message: String,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct XdsReport {
    pub generation: u64,
    pub proxies: u64,
    /// `proxy type: error` for every proxy whose last response of a type was rejected.
    pub nacks: Vec<String>,
}

impl AgentReport {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.left {
            out.push("this cluster has left the federation".into());
        } else if !self.connected {
            out.push(format!(
                "not connected to the federator{}",
                self.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(e) = &self.registry_error {
            out.push(format!("registry: {e}"));
        }
        if let Some(e) = &self.policy_error {
            out.push(format!("policies: {e}"));
        }
        for n in self.xds.iter().flat_map(|x| x.nacks.iter()) {
            out.push(format!("xDS NACK: {n}"));
        }
        for p in &self.peers {
            if p.lease == "stale" {
                out.push(format!(
                    "peer {} is stale (last heartbeat {:.1}s ago)",
                    p.cluster,
                    p.last_heartbeat_age_ms as f64 / 1000.0
                ));
            }
        }
        for c in &self.conflicts {
            out.push(format!("conflict: {c}"));
        }
        for e in &self.workload_entries {
            if e.healthy == Some(false) {
                out.push(format!(
                    "VM entry {}/{} is unhealthy: {}",
                    e.namespace, e.name, e.health_message
                ));
            }
        }
        out
    }
}

/// A running agent.
pub struct Agent {
    pub inner: Arc<Inner>,
    pub admin_addr: Option<SocketAddr>,
    pub xds_plaintext: Option<SocketAddr>,
    pub xds_mtls: Option<SocketAddr>,
    pub vm_api: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl Agent {
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let identity = ClusterIdentity::load(&cfg.state_dir)?;
        let td = TrustDomain::new(&identity.file.trust_domain)?;
        let ca = identity::open_cluster_ca(&cfg.state_dir, &td, None)?;
        let cache_dir = cfg.state_dir.join("cache");
        let cache = cache::Cache::open(&cache_dir)?;
        let metrics = AgentMetrics::new();

        // Static stability: serve what we last knew before the federator answers.
        let mut snap = model::Snapshot {
            facts: identity.facts(),
            applied_revision: cache.applied_revision(),
            ..Default::default()
        };
        for (src, e) in cache.imports()? {
            snap.imports
                .insert((src, crate::types::service_key(&e.namespace, &e.name)), e);
        }
        for p in cache.peers()? {
            if let Some(f) = &p.facts {
                snap.peers.insert(f.cluster_id.clone(), p.clone());
            }
        }
        for (td, (_, json)) in cache.bundles()? {
            snap.bundles.insert(td, json);
        }
        tracing::info!(
            imports = snap.imports.len(),
            peers = snap.peers.len(),
            revision = snap.applied_revision,
            "serving the last known imports from the cache"
        );

        let source = FileRegistry {
            path: cfg.registry.clone(),
        };
        let default_locality = identity.locality();
        let mut registry_error = None;
        let entries = Arc::new(crate::vm::entries::Entries::open(
            cache.tree("workload_entries")?,
            crate::vm::entries::now_ms(),
        )?);
        let mut loaded = None;
        let initial_exports = match source.load() {
            Ok(reg) => {
                let (local, exports) = reg.view(&default_locality, &entries.current());
                snap.local = local;
                loaded = Some(reg);
                exports
            }
            Err(e) => {
                tracing::error!(error = %e, "registry is invalid; exporting what the federator last acknowledged");
                registry_error = Some(e);
                cache.acked_exports()?
            }
        };
        let model = model::Model::new(snap);

        let mut set = BundleSet::new();
        set.insert(identity.federation_bundle.clone())?;
        let fed_td = TrustDomain::new(&identity.file.federation_trust_domain)?;
        let federator_verifier = SpiffeVerifier::new(
            TrustStore::new(set),
            Authorizer::id(federator_spiffe_id(&fed_td)?),
        );
        let resolver = SvidResolver::with(&identity.svid)?;
        let (policy_set, policy_error) = match PolicySet::load_paths(&cfg.policies) {
            Ok(p) => (p, None),
            Err(e) => {
                tracing::error!(error = %e, "failover policies are invalid; serving without them until fixed");
                (PolicySet::default(), Some(e))
            }
        };
        let local = crate::xds::node::LocalFacts {
            cluster: identity.file.cluster.clone(),
            network: identity.file.network.clone(),
            locality: crate::policy::table::Loc::parse(&identity.file.locality).unwrap_or_default(),
            trust_domain: identity.file.trust_domain.clone(),
        };
        let inner = Arc::new(Inner {
            identity: Mutex::new(identity),
            cache,
            model,
            exports: watch::Sender::new(BTreeMap::new()),
            registry_exports: Mutex::new(initial_exports),
            bundle: watch::Sender::new(ca.bundle().to_json()?),
            resolver,
            federator_verifier,
            metrics,
            status: Mutex::new(SyncStatus {
                registry_error,
                policy_error,
                ..Default::default()
            }),
            policies: watch::Sender::new(Arc::new(policy_set)),
            xds: std::sync::OnceLock::new(),
            registry: Mutex::new(loaded),
            default_locality: default_locality.clone(),
            entries,
            dns_addr: std::sync::OnceLock::new(),
            names: watch::Sender::new(Arc::new(crate::dns::table::NameTable::default())),
        });
        inner.publish_exports();
        let mut tasks = vec![
            tokio::spawn(sync::run(inner.clone())),
            tokio::spawn(watch_registry(inner.clone(), source, cfg.registry_poll)),
            tokio::spawn(watch_entries(inner.clone(), cfg.vm_grace)),
            tokio::spawn(renew_cluster_cert(inner.clone())),
            tokio::spawn(watch_policies(
                inner.clone(),
                cfg.policies.clone(),
                cfg.registry_poll,
            )),
        ];
        let ca = Arc::new(ca);
        let (mut xds_plaintext, mut xds_mtls, mut vm_api) = (None, None, None);
        // The agent's serving SVID (xDS mTLS port and VM API), renewed at 50-80 %.
        let serving = serving_svid(&ca)?;
        tasks.push(tokio::spawn(renew_serving_cert(
            ca.clone(),
            serving.clone(),
        )));
        if let Some(xcfg) = &cfg.xds {
            let state = crate::xds::server::XdsState::new(local, &inner.metrics.registry);
            let _ = inner.xds.set(state.clone());
            let tls = xds_tls(&ca, &td, serving.clone())?;
            let served = crate::xds::serve::start(
                xcfg,
                state,
                inner.model.clone(),
                inner.policies.subscribe(),
                Some(tls),
            )
            .await?;
            xds_plaintext = served.plaintext;
            xds_mtls = served.mtls;
            tasks.extend(served.tasks);
            tasks.push(tokio::spawn(crate::xds::serve::write_trust_roots(
                cfg.state_dir.join("xds").join("trust-roots.pem"),
                td.to_string(),
                inner.bundle.subscribe(),
                inner.model.clone(),
            )));
        }
        if let Some(addr) = &cfg.vm_api {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (VM API)"))?;
            vm_api = Some(l.local_addr()?);
            let mut set = BundleSet::new();
            set.insert(ca.bundle())?;
            let verifier =
                SpiffeVerifier::new(TrustStore::new(set), Authorizer::trust_domain(td.clone()));
            let tls = trust::tls::server_config_optional_client(serving.clone(), verifier)?;
            let svc =
                crate::vm::server::VmApi::new(inner.clone(), ca.clone(), &cfg.state_dir).server();
            let incoming = crate::net::tls_incoming(l, tls);
            tasks.push(tokio::spawn(async move {
                // Keepalives find a VM that vanished without closing its stream (power loss,
                // partition) in about 10 s, which starts its entry's grace period.
                let r = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(5)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(5)))
                    .add_service(svc)
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "VM API server failed");
                }
            }));
        }
        let vips = crate::dns::vips::Vips::open(
            inner.cache.tree("service_vips")?,
            cfg.vip_range_v4,
            cfg.vip_range_v6,
        )?;
        tasks.push(tokio::spawn(crate::dns::follow_names(inner.clone(), vips)));
        if let Some(dcfg) = &cfg.dns {
            let served = crate::dns::serve_agent(dcfg, inner.clone(), &cfg.state_dir).await?;
            tasks.extend(served.tasks);
            inner.dns_addr.set(served.addr).ok();
        }
        let admin_addr = match &cfg.admin {
            Some(a) => {
                let (ri, si) = (inner.clone(), inner.clone());
                let (addr, task) = crate::admin::serve_with(
                    a,
                    Arc::new(move || ri.metrics.registry.clone()),
                    Arc::new(move || serde_json::to_value(si.report()).map_err(|e| e.to_string())),
                    inner
                        .xds
                        .get()
                        .map(|x| crate::xds::debug::router(x.clone())),
                    None,
                )
                .await?;
                tasks.push(task);
                Some(addr)
            }
            None => None,
        };
        Ok(Agent {
            inner,
            admin_addr,
            xds_plaintext,
            xds_mtls,
            vm_api,
            tasks,
        })
    }

    pub fn model(&self) -> &model::Model {
        &self.inner.model
    }

    pub fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

async fn watch_registry(inner: Arc<Inner>, source: FileRegistry, poll: Duration) {
    let mut seen = source.version();
    let mut t = tokio::time::interval(poll);
    loop {
        t.tick().await;
        let v = source.version();
        if v == seen {
            continue;
        }
        seen = v;
        match source.load() {
            Ok(reg) => {
                inner
                    .metrics
                    .registry_reloads
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(
                    services = reg.services.len(),
                    groups = reg.workload_groups.len(),
                    "registry reloaded"
                );
                inner.status().registry_error = None;
                *inner.registry.lock().unwrap_or_else(|p| p.into_inner()) = Some(reg);
                inner.apply_registry();
            }
            Err(e) => {
                inner
                    .metrics
                    .registry_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                tracing::error!(error = %e, "registry is invalid; keeping the last good one");
                inner.status().registry_error = Some(e);
            }
        }
    }
}

/// Follows the auto-registered WorkloadEntries into the services, and deletes those whose VM
/// stayed away longer than `grace` or whose WorkloadGroup is gone. The sweep runs every
/// grace/4 (at least 250 ms), so an entry goes within grace + grace/4.
async fn watch_entries(inner: Arc<Inner>, grace: Duration) {
    let mut rx = inner.entries.subscribe();
    let every = (grace / 4).max(Duration::from_millis(250));
    let mut t = tokio::time::interval(every);
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                rx.borrow_and_update();
                inner.apply_registry();
            }
            _ = t.tick() => {
                let groups = inner.registry().map(|r| {
                    r.workload_groups.iter().map(|g| g.key()).collect::<std::collections::BTreeSet<_>>()
                });
                let gone = inner.entries.sweep(
                    crate::vm::entries::now_ms(),
                    grace.as_millis() as i64,
                    groups.as_ref(),
                );
                for name in gone {
                    tracing::info!(entry = %name, "WorkloadEntry deleted (its VM stayed away past the grace period, or its group is gone)");
                }
            }
        }
    }
}

/// The agent's serving identity `spiffe://<td>/ns/meshfed-system/sa/meshfed-agent`, issued
/// from the cluster CA (what xDS clients and VMs check).
fn serving_svid(ca: &trust::CertificateAuthority) -> anyhow::Result<Arc<SvidResolver>> {
    let id = agent_spiffe_id(ca.trust_domain())?;
    let svid = ca.issue_svid(&id, &trust::ca::policy::AnyWorkload, SERVING_CERT_TTL)?;
    Ok(SvidResolver::with(&svid)?)
}

pub fn agent_spiffe_id(td: &TrustDomain) -> anyhow::Result<trust::SpiffeId> {
    Ok(trust::SpiffeId::istio_workload(
        td,
        "meshfed-system",
        "meshfed-agent",
    )?)
}

/// The xDS mTLS port's TLS: the agent's serving SVID, clients verified against the cluster's
/// bundle and required to belong to its trust domain.
fn xds_tls(
    ca: &trust::CertificateAuthority,
    td: &TrustDomain,
    resolver: Arc<SvidResolver>,
) -> anyhow::Result<rustls::ServerConfig> {
    let mut set = BundleSet::new();
    set.insert(ca.bundle())?;
    let verifier = SpiffeVerifier::new(TrustStore::new(set), Authorizer::trust_domain(td.clone()));
    let mut tls = trust::tls::server_config(resolver, verifier)?;
    tls.alpn_protocols = vec![crate::net::ALPN_H2.to_vec()];
    Ok(tls)
}

const SERVING_CERT_TTL: time::Duration = time::Duration::hours(24);

/// Re-issues the serving certificate at 50-80 % of its lifetime.
async fn renew_serving_cert(ca: Arc<trust::CertificateAuthority>, resolver: Arc<SvidResolver>) {
    loop {
        let wait = SERVING_CERT_TTL.whole_milliseconds() as u64 * rand::random_range(50..80) / 100;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match agent_spiffe_id(ca.trust_domain())
            .and_then(|id| {
                Ok(ca.issue_svid(&id, &trust::ca::policy::AnyWorkload, SERVING_CERT_TTL)?)
            })
            .and_then(|s| Ok(resolver.install(&s)?))
        {
            Ok(()) => tracing::info!("renewed the agent's serving certificate"),
            Err(e) => tracing::warn!(error = %e, "cannot renew the agent's serving certificate"),
        }
    }
}

/// Reloads the policy files when they change; a broken file never replaces the last good set.
async fn watch_policies(inner: Arc<Inner>, paths: Vec<PathBuf>, poll: Duration) {
    if paths.is_empty() {
        return;
    }
    let mut seen = crate::policy::paths_version(&paths);
    let mut t = tokio::time::interval(poll);
    loop {
        t.tick().await;
        let v = crate::policy::paths_version(&paths);
        if v == seen {
            continue;
        }
        seen = v;
        match PolicySet::load_paths(&paths) {
            Ok(set) => {
                tracing::info!(policies = set.by_host.len(), "failover policies reloaded");
                inner.status().policy_error = None;
                inner.policies.send_if_modified(|cur| {
                    if **cur == set {
                        false
                    } else {
                        *cur = Arc::new(set);
                        true
                    }
                });
                inner.publish_exports();
            }
            Err(e) => {
                tracing::error!(error = %e, "failover policies are invalid; keeping the last good ones");
                inner.status().policy_error = Some(e);
            }
        }
    }
}

/// Renews the cluster certificate at a jittered 50-80 % of its lifetime (make-before-break: the
/// old certificate stays valid until it expires).
async fn renew_cluster_cert(inner: Arc<Inner>) {
    loop {
        let at = inner.identity().svid.renew_at();
        let wait = (at - time::OffsetDateTime::now_utc())
            .whole_milliseconds()
            .max(1000) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match renew_once(&inner).await {
            Ok(()) => tracing::info!("renewed the cluster certificate"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot renew the cluster certificate; retrying in 30 s");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

async fn renew_once(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let (id, federators) = {
        let i = inner.identity();
        (i.svid.id.clone(), i.file.federators.clone())
    };
    let (key, csr) = trust::keys::key_and_csr(&id)?;
    let cfg = trust::tls::client_config(inner.resolver.clone(), inner.federator_verifier.clone())?;
    let mut client = proto::federation_client::FederationClient::new(crate::net::channel(
        federators,
        cfg,
        "federator",
    )?);
    let resp = client
        .renew(proto::RenewRequest { csr_der: csr })
        .await
        .map_err(|s| identity::describe_status("renewal refused", &s))?
        .into_inner();
    let chain = resp
        .cert_chain_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let svid = trust::Svid::new(chain, key).context("the renewed certificate is unusable")?;
    inner.identity().store_svid(svid.clone())?;
    inner.resolver.install(&svid)?;
    Ok(())
}
