//! The per-cluster control plane (`meshfed agent`): reads the cluster's registry, publishes its
//! exports and trust bundle to the federator over one mTLS stream, and keeps the imports in a
//! local cache and in the in-process model ([`meshfed_model::store`]).

pub mod cache;
pub mod injection;
pub mod metrics;
pub mod sync;
pub mod workload_api;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trust::tls::{Authorizer, SpiffeVerifier};
use trust::{BundleSet, TrustDomain, TrustStore};

use crate::metrics::AgentMetrics;
use meshfed_dns::table::NameTable;
use meshfed_identity::certs::{issue_fn, Backoff, Managed};
use meshfed_identity::cluster::ClusterIdentity;
use meshfed_identity::ids::{agent_spiffe_id, federator_spiffe_id};
use meshfed_identity::live_ca::{CaReport, LiveCa, RotationPolicy};
use meshfed_model::policy::PolicySet;
use meshfed_model::registry::{FileRegistry, Registry, RegistrySource};
use meshfed_model::store::{self as store, LocalWriter, Reader};
use meshfed_net::admin::AdminConfig;
use meshfed_net::drain::{DrainReport, Tasks};
use meshfed_vm::entries::Entries;
use meshfed_xds::server::XdsState;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// The registry file (services, WorkloadGroups, WorkloadEntries); optional with the
    /// Kubernetes source.
    pub registry: Option<PathBuf>,
    /// The Kubernetes source (`--source kubernetes`): its client.
    pub kubernetes: Option<meshfed_kube::source::KubeClient>,
    /// With the Kubernetes source: only these namespaces.
    pub namespace_selector: Option<meshfed_kube::selector::NamespaceSelector>,
    pub admin: Option<SocketAddr>,
    /// The probe listener (`/healthz`, `/readyz`, `/metrics` only).
    pub probe: Option<SocketAddr>,
    /// How often the registry and policy files are checked for changes.
    pub registry_poll: Duration,
    /// Failover policy files or directories (`*.yaml`).
    pub policies: Vec<PathBuf>,
    /// The xDS server; `None` runs the agent without one.
    pub xds: Option<meshfed_xds::XdsConfig>,
    /// The VM API (`meshfed vm agent` joins and registers here); `None` = off.
    pub vm_api: Option<SocketAddr>,
    /// How long a disconnected VM's WorkloadEntry is kept before it is deleted.
    pub vm_grace: Duration,
    /// The mesh DNS server; `None` = off.
    pub dns: Option<meshfed_dns::DnsConfig>,
    /// Where service VIPs come from.
    pub vip_range_v4: ipnet::Ipv4Net,
    pub vip_range_v6: Option<ipnet::Ipv6Net>,
    /// The SPIFFE bundle endpoint (`https_spiffe`, the agent's serving SVID); `None` = off.
    pub bundle_endpoint: Option<SocketAddr>,
    /// `https_web` profile: the Web PKI certificate the bundle endpoint presents instead of the
    /// agent's SVID.
    pub bundle_endpoint_web: Option<Arc<meshfed_net::bundle_endpoint::WebCert>>,
    /// When the cluster CA rotates by itself, and how long a new root is published before it
    /// signs (checked every `registry_poll`).
    pub ca_rotation: RotationPolicy,
    /// Lifetime of the agent's own serving certificate (renewed at 50-80 % of it, and at once
    /// when a new root signs). A retiring root stays published until the last one expires.
    pub serving_cert_ttl: time::Duration,
    /// With the Kubernetes source: elect one leader among the replicas that share this
    /// cluster's state (a Lease). Only the leader writes to the Kubernetes API, holds the
    /// cluster's Sync stream and steps the CA; the others observe. `None`: this agent is the
    /// only one.
    pub leader_election: Option<meshfed_kube::leader::LeaseConfig>,
    /// With leader election: the Secret (`namespace`, `name`) the replicas share the cluster's
    /// identity and CA through (`meshfed join --state-secret` wrote it). The leader writes the
    /// CA into it after every change; followers take it from there.
    pub state_secret: Option<(String, String)>,
    /// The audiences a service-account token must be for to be accepted by the CA API
    /// (`--token-audience`; Istio's clients use `istio-ca`).
    pub token_audiences: Vec<String>,
    /// DNS names in the agent's serving certificate beside its SPIFFE ID, for clients that
    /// check the name they dialled (gRPC, Go): the in-cluster Service's names by default.
    pub serving_dns_names: Vec<String>,
    /// With the Kubernetes source: the injection webhook (`--injection-webhook`); `None` = off.
    pub injection: Option<injection::InjectionConfig>,
    /// With the Kubernetes source: feed the cluster's istiod (`--istio`); `None` = off.
    pub istio: Option<IstioConfig>,
}

/// What the agent writes for the cluster's istiod (docs/istio.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioConfig {
    /// The ConfigMap (`namespace`, `name`) meshfed owns whose `mesh` key carries the peers'
    /// roots, for istiod's `SHARED_MESH_CONFIG`; `None`: not written.
    pub mesh_config: Option<(String, String)>,
}

/// What the agent last wrote for istiod (`meshfed status`, `meshfed analyze`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IstioReport {
    pub service_entries: u64,
    pub workload_entries: u64,
    pub destination_rules: u64,
    /// Hosts and policies meshfed did not write, and why.
    #[serde(default)]
    pub findings: Vec<meshfed_kube::istio::Finding>,
    /// `namespace/name` of the mesh config ConfigMap, when written.
    #[serde(default)]
    pub mesh_config: Option<String>,
    /// The trust domains whose roots it carries.
    #[serde(default)]
    pub mesh_config_trust_domains: Vec<String>,
    /// Peer bundles left out of it, and why.
    #[serde(default)]
    pub mesh_config_errors: Vec<String>,
}

/// The cluster's dashboard (`/ui/` on the agent's admin server): one page, embedded.
pub const CLUSTER_PAGE: &str = include_str!("../ui/cluster.html");

/// The names of the agent's Service in `deploy/kubernetes/agent`.
pub fn default_serving_dns_names() -> Vec<String> {
    vec![
        "meshfed-agent.meshfed-system.svc".into(),
        "meshfed-agent.meshfed-system.svc.cluster.local".into(),
    ]
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
    /// Kubernetes objects the source cannot use (`kind ns/name: reason`).
    pub kubernetes_problems: Vec<String>,
    /// The last failed write to the Kubernetes API, until a write succeeds.
    pub kubernetes_write_error: Option<String>,
    /// With `--istio`: what was last written for istiod.
    pub istio: Option<IstioReport>,
}

/// The agent's shared state. Sources write the model through their own writers (held by their
/// tasks, not here); everything else here is read through handles.
#[derive(Debug)]
pub struct Inner {
    identity: Mutex<ClusterIdentity>,
    pub cache: cache::Cache,
    /// The service model, read-only (the local source and the sync hold the writers).
    pub model: Reader,
    /// The exports the registry asks for, with published policies attached.
    /// What the cluster exports (shared: the sync, the name table and the status read it).
    pub exports: watch::Sender<Arc<meshfed_model::snapshot::Services>>,
    /// The cluster CA's bundle JSON.
    pub bundle: watch::Sender<String>,
    /// The cluster certificate the federation issued (authenticates the Sync stream).
    pub cluster_cert: Arc<Managed>,
    pub federator_verifier: SpiffeVerifier,
    pub metrics: AgentMetrics,
    status: Mutex<SyncStatus>,
    /// The failover policies from files, last good set.
    pub policies: watch::Sender<Arc<PolicySet>>,
    /// The policies of the files alone (the Kubernetes objects' are merged into `policies`).
    pub file_policies: watch::Sender<Arc<PolicySet>>,
    /// Policy objects from the Kubernetes API that could not be used.
    pub policy_problems: watch::Sender<Vec<meshfed_kube::view::Problem>>,
    /// The xDS server's state, when it runs.
    pub xds: Option<Arc<XdsState>>,
    /// The last good registry.
    pub registry: watch::Sender<Option<Arc<Registry>>>,
    /// What the federator last acknowledged in this process (for ServiceExport conditions;
    /// before the first acknowledgement the cache says what it acknowledged before).
    pub exports_acked: watch::Sender<Option<Arc<meshfed_model::snapshot::Services>>>,
    /// The Kubernetes watches' health (with the Kubernetes source).
    pub kube_health:
        std::sync::OnceLock<watch::Receiver<BTreeMap<String, meshfed_kube::source::WatchHealth>>>,
    /// WorkloadEntries auto-registered by VMs.
    pub entries: Arc<Entries>,
    /// The mesh's names and VIPs (the agent's DNS and its VMs' DNS answer from this).
    pub names: watch::Sender<Arc<NameTable>>,
    /// The cluster CA (signs, rotates, publishes the bundle).
    pub ca: Arc<LiveCa>,
    /// The leader election's view; without one, always the leader.
    pub leadership: watch::Sender<meshfed_kube::leader::Leadership>,
    /// Whether replicas elect a leader (the report shows the election only then).
    pub elected: bool,
    /// Whether this replica speaks for the cluster (its Sync stream is the cluster's, it
    /// serves VMs): see [`sync::speaks`]. Always, for the only agent.
    pub speaks: watch::Sender<bool>,
    /// When the federator last spoke, and when each peer's state arrived.
    pub heard: Mutex<Heard>,
    /// The election's state when another replica's stream replaced this one's (see
    /// [`sync::refresh_speaks`]).
    pub superseded: Mutex<Option<sync::RoleKey>>,
}

/// Receive times, to report ages as of now rather than as of the last message.
#[derive(Debug, Clone, Default)]
pub struct Heard {
    pub federator: Option<std::time::Instant>,
    pub peers: BTreeMap<String, std::time::Instant>,
}

impl Inner {
    pub fn identity(&self) -> MutexGuard<'_, ClusterIdentity> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> MutexGuard<'_, SyncStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this replica speaks for the cluster (always, without leader election).
    pub fn is_leader(&self) -> bool {
        self.leadership.borrow().leader
    }

    /// The last good registry, if any.
    pub fn registry(&self) -> Option<Arc<Registry>> {
        self.registry.borrow().clone()
    }

    /// The agent's status report (for `/status` and `meshfed status`).
    pub fn report(&self) -> AgentReport {
        let snap = self.model.current();
        let st = self.status().clone();
        let id = self.identity().file.clone();
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Borrowed once: two borrows of one watch in a statement deadlock when the registry's
        // writer queues between them (std's RwLock makes the second reader wait for it).
        let exports = self.exports.borrow().clone();
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
            kubernetes_problems: st
                .kubernetes_problems
                .into_iter()
                .chain(self.policy_problems.borrow().iter().map(|p| p.to_string()))
                .collect(),
            kubernetes_write_error: st.kubernetes_write_error,
            istio: st.istio,
            leadership: self.elected.then(|| self.leadership.borrow().clone()),
            kubernetes_watches: self
                .kube_health
                .get()
                .map(|h| h.borrow().clone())
                .unwrap_or_default(),
            policies: self
                .policies
                .borrow()
                .by_host
                .values()
                .map(|p| format!("{} ({}/{} at {})", p.host, p.namespace, p.name, p.origin))
                .collect(),
            routes: self
                .policies
                .borrow()
                .routes_by_host
                .values()
                .map(|r| format!("{} ({}/{} at {})", r.host, r.namespace, r.name, r.origin))
                .collect(),
            xds: self.xds.as_ref().map(|x| {
                let proxies = x.proxies.report();
                let current = x.current();
                XdsReport {
                    generation: current.version,
                    policy_findings: current.policy_findings.clone(),
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
                            (i.cluster.to_string(), n)
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
            config_warnings: config_warnings(
                &snap,
                &exports,
                st.connected,
                &self.entries.current(),
            ),
            ca: Some(self.ca.report(time::OffsetDateTime::now_utc())),
            cluster_cert_not_after: self.cluster_cert.current().map(|c| {
                c.not_after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            }),
            cluster_cert_expired: self
                .cluster_cert
                .current()
                .is_some_and(|c| c.not_after <= time::OffsetDateTime::now_utc()),
            exports: exports.len() as u64,
            // What the federator acknowledged and this agent stored (also across restarts).
            exports_acked_version: self.cache.acked_version(),
            federator_last_heard_ms: heard.federator.map(|t| t.elapsed().as_millis() as u64),
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
                        // The federator's measurement plus the time since it arrived: the
                        // age as of now (unknown for peers restored from the cache).
                        last_heartbeat_age_ms: heard
                            .peers
                            .get(&f.cluster_id)
                            .filter(|_| p.heartbeat_seen)
                            .map(|t| p.last_heartbeat_age_ms + t.elapsed().as_millis() as u64),
                        bundle: snap.bundles.contains_key(&f.trust_domain),
                        bundle_sequence: bundle_facts(
                            &f.trust_domain,
                            snap.bundles.get(&f.trust_domain),
                        )
                        .0,
                        bundle_days_left: bundle_facts(
                            &f.trust_domain,
                            snap.bundles.get(&f.trust_domain),
                        )
                        .1,
                    })
                })
                .collect(),
        }
    }
}

/// Accepted configuration that does nothing: an export to a cluster that is not a member
/// (checked only while the federator is connected, so the member list is current), and a
/// registered VM whose address no service of the cluster has as an endpoint (its group's
/// labels match no service `selector`).
fn config_warnings(
    snap: &meshfed_model::snapshot::Snapshot,
    exports: &meshfed_model::snapshot::Services,
    connected: bool,
    entries: &BTreeMap<String, meshfed_model::entry::AutoEntry>,
) -> Vec<String> {
    let mut out = Vec::new();
    if connected {
        for (k, e) in exports {
            for c in &e.export_to {
                if !snap.peers.contains_key(c) && *c != snap.facts.cluster_id {
                    out.push(format!(
                        "service {k} is exported to {c}, which is not a member of the federation"
                    ));
                }
            }
        }
    }
    let addresses: std::collections::BTreeSet<&str> = snap
        .local
        .values()
        .flat_map(|s| s.endpoints.iter().map(|e| e.address.as_str()))
        .collect();
    for e in entries.values() {
        if !addresses.contains(e.address.as_str()) {
            out.push(format!(
                "VM entry {}/{} ({}) is an endpoint of no service: no service's selector matches the labels of WorkloadGroup {} (docs/vm.md)",
                e.namespace, e.name, e.address, e.group
            ));
        }
    }
    out
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerReport {
    pub cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub connected: bool,
    pub lease: String,
    /// Milliseconds since the peer's last heartbeat, as of now: the federator's measurement
    /// plus the time since it arrived. `None` when the federator has seen none since it
    /// started, or the peer's state was restored from the cache and not heard since.
    pub last_heartbeat_age_ms: Option<u64>,
    /// Whether we hold the peer's trust bundle.
    pub bundle: bool,
    /// The held bundle's sequence.
    #[serde(default)]
    pub bundle_sequence: Option<u64>,
    /// Whole days until the first root in the held bundle expires.
    #[serde(default)]
    pub bundle_days_left: Option<i64>,
}

/// Sequence and days until the first root expires, of a held bundle.
fn bundle_facts(td: &str, json: Option<&String>) -> (Option<u64>, Option<i64>) {
    let Some(b) = json.and_then(|j| {
        trust::TrustBundle::from_json(TrustDomain::new(td).ok()?, j, "held bundle").ok()
    }) else {
        return (None, None);
    };
    let now = time::OffsetDateTime::now_utc();
    let first = b
        .x509_authorities
        .iter()
        .filter_map(|c| trust::svid::validity(c).ok().map(|v| v.1))
        .min();
    (b.sequence, first.map(|t| (t - now).whole_days()))
}

/// Certificates and bundles closer than this to expiry are warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

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
    /// VirtualServices in effect (files and objects): `host (ns/name at origin)`.
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub xds: Option<XdsReport>,
    pub exports: u64,
    pub exports_acked_version: u64,
    /// Milliseconds since the federator last sent anything on the Sync stream (`None`:
    /// nothing since this agent started).
    #[serde(default)]
    pub federator_last_heard_ms: Option<u64>,
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
    /// What is accepted but probably not meant: an `exportTo` naming no member, a VM no
    /// service selects (reported as warnings).
    #[serde(default)]
    pub config_warnings: Vec<String>,
    /// Names the mesh DNS answers for.
    #[serde(default)]
    pub dns_names: u64,
    /// The cluster CA: generations, rotation, expiry.
    #[serde(default)]
    pub ca: Option<CaReport>,
    /// Kubernetes objects the source cannot use (`kind ns/name: reason`; warnings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kubernetes_problems: Vec<String>,
    /// The last failed write to the Kubernetes API, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_write_error: Option<String>,
    /// With `--istio`: what was last written for istiod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioReport>,
    /// The Kubernetes watches, by kind (with the Kubernetes source).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kubernetes_watches: BTreeMap<String, meshfed_kube::source::WatchHealth>,
    /// The leader election among replicas, when there is one.
    #[serde(default)]
    pub leadership: Option<meshfed_kube::leader::Leadership>,
    /// When the cluster certificate (the federation identity) expires, RFC 3339.
    #[serde(default)]
    pub cluster_cert_not_after: Option<String>,
    /// It has expired: the cluster cannot reach the federator until it joins again.
    #[serde(default)]
    pub cluster_cert_expired: bool,
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
    /// What the policies in effect name that the endpoints lack.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_findings: Vec<meshfed_xds::generation::PolicyFinding>,
}

impl AgentReport {
    /// What will break if nobody acts: certificates and bundles within
    /// [`EXPIRY_WARNING_DAYS`] of expiry (reported, not failures).
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .kubernetes_problems
            .iter()
            .map(|p| format!("Kubernetes: {p}"))
            .collect();
        out.extend(self.config_warnings.iter().cloned());
        if let Some(ca) = &self.ca {
            if ca.signer_days_left < EXPIRY_WARNING_DAYS {
                out.push(format!(
                    "the cluster CA's signing certificate expires in {} days ({}); rotate it: meshfed ca rotate start",
                    ca.signer_days_left, ca.signer_not_after
                ));
            }
        }
        for p in &self.peers {
            if let Some(d) = p.bundle_days_left.filter(|d| *d < EXPIRY_WARNING_DAYS) {
                out.push(format!(
                    "peer {}'s trust bundle (sequence {}) has a root that expires in {d} days",
                    p.cluster,
                    p.bundle_sequence.unwrap_or(0)
                ));
            }
        }
        out
    }

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
        if let Some(e) = &self.kubernetes_write_error {
            out.push(e.clone());
        }
        if let Some(e) = self.leadership.as_ref().and_then(|l| l.error.as_ref()) {
            out.push(format!("leader election: {e}"));
        }
        for (kind, w) in &self.kubernetes_watches {
            if let Some(e) = &w.error {
                out.push(format!(
                    "the Kubernetes {kind} watch fails since {} (serving what it last listed): {e}",
                    w.failing_since.as_deref().unwrap_or("?")
                ));
            } else if !w.synced && !w.not_served {
                out.push(format!("the Kubernetes {kind} watch has not listed yet"));
            }
        }
        if self.cluster_cert_expired {
            out.push(format!(
                "the cluster certificate expired at {}: the federator no longer accepts it and it cannot be renewed; get a new join token for cluster {} (meshfed federator token create --cluster {}) and run `meshfed join --rejoin --token ...` with this state directory, then restart the agent (the cluster keeps its CA, trust domain and cache)",
                self.cluster_cert_not_after.as_deref().unwrap_or("?"),
                self.cluster,
                self.cluster
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

    /// Other clusters that are stale, as the federator says (`meshfed status` exits 3 when only
    /// these are found: this agent is healthy).
    pub fn peer_problems(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|p| p.lease == "stale")
            .map(|p| match p.last_heartbeat_age_ms {
                Some(ms) => format!(
                    "peer {} is stale (last heartbeat {:.1}s ago)",
                    p.cluster,
                    ms as f64 / 1000.0
                ),
                None => format!(
                    "peer {} is stale (the federator has seen no heartbeat of it since it started)",
                    p.cluster
                ),
            })
            .collect()
    }
}

/// A running agent.
pub struct Agent {
    pub inner: Arc<Inner>,
    pub admin_addr: Option<SocketAddr>,
    pub xds_plaintext: Option<SocketAddr>,
    pub xds_mtls: Option<SocketAddr>,
    pub vm_api: Option<SocketAddr>,
    /// Where the mesh DNS server listens, when it runs.
    pub dns_addr: Option<SocketAddr>,
    /// Where the SPIFFE bundle endpoint listens, when it runs.
    pub bundle_endpoint: Option<SocketAddr>,
    /// Where the injection webhook listens, when it runs.
    pub injection_webhook: Option<SocketAddr>,
    tasks: Tasks,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl Agent {
    /// Starts the agent. Every listener binds before anything speaks to the federator or
    /// writes to the Kubernetes API: an agent that cannot start has published nothing, and
    /// what it spawned is stopped.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let tasks = Tasks::new();
        match Self::start_on(cfg, tasks.clone()).await {
            Ok(a) => Ok(a),
            Err(e) => {
                tasks.abort_all();
                Err(e)
            }
        }
    }

    async fn start_on(cfg: AgentConfig, tasks: Tasks) -> anyhow::Result<Agent> {
        check_listeners(&cfg)?;
        let identity = ClusterIdentity::load(&cfg.state_dir)?;
        let td = TrustDomain::new(&identity.file.trust_domain)?;
        // Creates the CA the first time; from then on the live CA follows its directory.
        meshfed_identity::cluster::open_cluster_ca(&cfg.state_dir, &td, None)?;
        let ca = Arc::new(LiveCa::open(meshfed_identity::cluster::ca_dir(
            &cfg.state_dir,
        ))?);
        let cache_dir = cfg.state_dir.join("cache");
        let cache = cache::Cache::open(&cache_dir)?;
        let metrics = AgentMetrics::new();

        // Static stability: serve what we last knew before the federator answers.
        let mut snap = meshfed_model::snapshot::Snapshot {
            facts: identity.facts(),
            applied_revision: cache.applied_revision(),
            ..Default::default()
        };
        for (src, e) in cache.imports()? {
            snap.imports.insert(
                (
                    src,
                    meshfed_model::validate::service_key(&e.namespace, &e.name),
                ),
                Arc::new(e),
            );
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

        let source = cfg.registry.clone().map(|path| FileRegistry { path });
        let default_locality = identity.locality();
        let mut registry_error = None;
        let entries = Arc::new(Entries::open(
            cache.tree("workload_entries")?,
            meshfed_model::entry::now_ms(),
        )?);
        let mut loaded = None;
        let loaded_registry = match &source {
            Some(f) => f.load(),
            None => Ok(Registry::default()),
        };
        let initial_exports = match loaded_registry {
            Ok(reg) if cfg.kubernetes.is_some() => {
                // Until the watches have listed, export what the federator last acknowledged.
                loaded = Some(Arc::new(reg));
                cache.acked_exports()?
            }
            Ok(reg) => {
                let (local, exports) = reg.view(&default_locality, &entries.current());
                snap.local = local;
                snap.exported = exports.keys().cloned().collect();
                loaded = Some(Arc::new(reg));
                exports
            }
            Err(e) => {
                tracing::error!(error = %e, "registry is invalid; exporting what the federator last acknowledged");
                registry_error = Some(e);
                cache.acked_exports()?
            }
        };
        let (local_writer, federation_writer, reader) = store::new(snap);
        // The cache restored what the federation last said: that is this source's first word.
        federation_writer.mark_ready();

        let mut set = BundleSet::new();
        set.insert(identity.federation_bundle.clone())?;
        let fed_td = TrustDomain::new(&identity.file.federation_trust_domain)?;
        let federator_verifier = SpiffeVerifier::new(
            TrustStore::new(set),
            Authorizer::id(federator_spiffe_id(&fed_td)?),
        );
        let cluster_cert = Managed::new("cluster", Some(identity.svid.clone()))?;
        let (policy_set, policy_error) = match PolicySet::load_paths(&cfg.policies) {
            Ok(p) => (p, None),
            Err(e) => {
                tracing::error!(error = %e, "failover policies are invalid; serving without them until fixed");
                (PolicySet::default(), Some(e))
            }
        };
        let identity_network = identity.file.network.clone();
        let cluster_name = identity.file.cluster.clone();
        let xds_state = cfg.xds.as_ref().map(|_| {
            XdsState::new(
                meshfed_xds::node::LocalFacts {
                    cluster: identity.file.cluster.clone(),
                    network: identity.file.network.clone(),
                    locality: meshfed_failover::Loc::parse(&identity.file.locality)
                        .unwrap_or_default(),
                    trust_domain: identity.file.trust_domain.clone(),
                },
                &metrics.registry,
            )
        });
        let exports = attach_published_policies(initial_exports.clone(), &policy_set);
        let inner = Arc::new(Inner {
            identity: Mutex::new(identity),
            cache,
            model: reader,
            exports: watch::Sender::new(Arc::new(exports)),
            bundle: watch::Sender::new(ca.bundle().to_json()?),
            ca: ca.clone(),
            cluster_cert,
            federator_verifier,
            metrics,
            status: Mutex::new(SyncStatus {
                registry_error,
                policy_error,
                ..Default::default()
            }),
            file_policies: watch::Sender::new(Arc::new(policy_set.clone())),
            policy_problems: watch::Sender::new(Vec::new()),
            policies: watch::Sender::new(Arc::new(policy_set)),
            xds: xds_state.clone(),
            registry: watch::Sender::new(loaded),
            kube_health: std::sync::OnceLock::new(),
            exports_acked: watch::Sender::new(None),
            entries,
            names: watch::Sender::new(Arc::new(NameTable::default())),
            leadership: watch::Sender::new(meshfed_kube::leader::Leadership {
                // Without an election this agent is the only one; with one, nobody leads
                // until the Lease says so.
                leader: cfg.leader_election.is_none(),
                ..Default::default()
            }),
            elected: cfg.leader_election.is_some(),
            speaks: watch::Sender::new(cfg.leader_election.is_none()),
            heard: Mutex::new(Heard::default()),
            superseded: Mutex::new(None),
        });
        let election = match cfg.leader_election.clone() {
            Some(lease) => {
                let Some(client) = cfg.kubernetes.clone() else {
                    anyhow::bail!(
                        "leader election needs the Kubernetes source (its Lease is in the API)"
                    );
                };
                lease.validate().map_err(anyhow::Error::msg)?;
                Some((client, lease))
            }
            None => None,
        };
        // Ready once the model is: the local source loaded (or fell back to what the
        // federator acknowledged) and the federation part restored from the cache.
        let model_ready = tasks.readiness("model");
        let model = inner.model.clone();
        tasks.track(async move {
            model.wait_until_ready().await;
            model_ready.set_ready();
        });
        let mut writer = None;
        let mut workloads = None;
        let kube = match cfg.kubernetes.clone() {
            Some(client) => {
                let (src, run) = meshfed_kube::source::start(
                    client.0.clone(),
                    default_locality.clone(),
                    meshfed_kube::view::Scope {
                        selector: cfg.namespace_selector.clone(),
                        network: identity_network.clone(),
                    },
                    Duration::from_millis(100),
                );
                tasks.spawn("Kubernetes source", run);
                writer = Some((client.0.clone(), src.view.clone(), src.health.clone()));
                let _ = inner.kube_health.set(src.health.clone());
                workloads = Some(src.workloads.clone());
                Some(src)
            }
            None => None,
        };
        tasks.spawn(
            "local source",
            local_source(
                inner.clone(),
                local_writer,
                LocalSourceConfig {
                    kube,
                    file: source,
                    default_locality: default_locality.clone(),
                    poll: cfg.registry_poll,
                    vm_grace: cfg.vm_grace,
                    initial_exports,
                },
            ),
        );
        tasks.spawn(
            "policy watcher",
            watch_policies(inner.clone(), cfg.policies.clone(), cfg.registry_poll),
        );
        let kube_policies = match &cfg.kubernetes {
            Some(client) => {
                let (docs, run) =
                    meshfed_kube::policies::start(client.0.clone(), Duration::from_millis(100));
                tasks.spawn("Kubernetes policies", run);
                Some(docs)
            }
            None => None,
        };
        tasks.spawn(
            "policy merger",
            merge_policies(inner.clone(), kube_policies),
        );
        // Every TLS verifier of this cluster's own peers follows the live bundle.
        let own_trust = TrustStore::new({
            let mut set = BundleSet::new();
            set.insert(ca.bundle())?;
            set
        });
        let (mut xds_plaintext, mut xds_mtls, mut vm_api, mut dns_addr) = (None, None, None, None);
        // The agent's serving SVID (xDS mTLS port and VM API), issued by the cluster CA.
        let serving_cert = Managed::new(
            "agent serving",
            Some(serving_svid(
                &ca,
                cfg.serving_cert_ttl,
                &cfg.serving_dns_names,
            )?),
        )?;
        let serving = serving_cert.resolver();
        tasks.spawn(
            "own bundle",
            follow_own_bundle(
                inner.clone(),
                own_trust.clone(),
                serving_cert.clone(),
                xds_state.clone(),
            ),
        );
        tasks.spawn(
            "agent serving certificate",
            serving_cert.run(
                {
                    let ca = ca.clone();
                    let ttl = cfg.serving_cert_ttl;
                    let names = cfg.serving_dns_names.clone();
                    issue_fn(move || {
                        let (ca, names) = (ca.clone(), names.clone());
                        async move { serving_svid(&ca, ttl, &names) }
                    })
                },
                Backoff::default(),
            ),
        );
        if let (Some(xcfg), Some(state)) = (&cfg.xds, xds_state) {
            let tls =
                meshfed_xds::serve::mtls_server_config(own_trust.clone(), &td, serving.clone())?;
            // SDS: a proxy on the mTLS port gets a certificate for exactly the identity it
            // authenticated with (the port admits only this trust domain's SVIDs).
            {
                let ca = ca.clone();
                let ttl = xcfg.workload_cert_ttl;
                state
                    .secrets
                    .set_issuer(Arc::new(move |id: &trust::SpiffeId| {
                        ca.issue_svid(id, &trust::ca::policy::ExactIds(vec![id.clone()]), ttl)
                    }));
            }
            tasks.spawn(
                "SDS root secret",
                meshfed_xds::secrets::follow_roots(
                    state.clone(),
                    td.to_string(),
                    inner.bundle.subscribe(),
                    inner.model.clone(),
                ),
            );
            // Istio's CA API beside ADS on the mTLS port: pods authenticate with their
            // service-account token (a TokenReview), holders of a certificate renew with it.
            let ca_api = {
                let ca = ca.clone();
                let signer: meshfed_identity::ca_api::Signer =
                    Arc::new(move |csr, policy, ttl| ca.sign_csr(csr, policy, ttl));
                let tokens = Some(Arc::new(AgentTokens {
                    kube: cfg.kubernetes.as_ref().map(|k| KubeTokens {
                        client: k.0.clone(),
                        audiences: cfg.token_audiences.clone(),
                    }),
                    workload: meshfed_identity::workload_token::token_store(&cfg.state_dir),
                    cluster: cluster_name.clone(),
                    spending: tokio::sync::Mutex::new(()),
                })
                    as Arc<dyn meshfed_identity::ca_api::Authenticator>);
                meshfed_identity::ca_api::CaApi::new(
                    td.clone(),
                    signer,
                    tokens,
                    xcfg.workload_cert_ttl,
                    meshfed_identity::ca_api::CaMetrics::new(&inner.metrics.registry),
                )
            };
            // What a pod's `meshfed workload` needs beside its certificate.
            let workload_api = workload_api::WorkloadApi::new(workload_api::Inputs {
                cluster: cluster_name.clone(),
                network: identity_network.clone(),
                trust_domain: td.to_string(),
                default_locality: default_locality.clone(),
                own_bundle: inner.bundle.subscribe(),
                model: inner.model.clone(),
                workloads: workloads.clone(),
            });
            // VM tokens made at the running agent (`meshfed vm bootstrap --agent`), where VMs
            // join (the VM API is on).
            let vm_admin = cfg.vm_api.map(|_| {
                let id = inner.identity();
                meshfed_vm::admin::VmAdminApi::new(
                    meshfed_vm::admin::AdminInputs {
                        cluster: id.file.cluster.clone(),
                        trust_domain: id.file.trust_domain.clone(),
                        network: id.file.network.clone(),
                        gateways: id.file.gateways.clone(),
                        own_bundle: inner.bundle.subscribe(),
                        registry: inner.registry.subscribe(),
                        leading: inner.speaks.subscribe(),
                        auth: cfg.kubernetes.as_ref().map(|k| {
                            Arc::new(KubeAdmin {
                                client: k.0.clone(),
                            }) as Arc<dyn meshfed_vm::admin::AdminAuth>
                        }),
                    },
                    &cfg.state_dir,
                )
            });
            let served = meshfed_xds::serve::start(
                &tasks,
                xcfg,
                state,
                inner.model.clone(),
                inner.policies.subscribe(),
                Some(tls),
                Some(Box::new(move |r: tonic::service::Routes| {
                    let r = r
                        .add_service(ca_api.server())
                        .add_service(workload_api.server());
                    match vm_admin {
                        Some(a) => r.add_service(a.server()),
                        None => r,
                    }
                })),
            )
            .await?;
            xds_plaintext = served.plaintext;
            xds_mtls = served.mtls;
            tasks.spawn(
                "trust files",
                meshfed_xds::serve::write_trust_files(
                    cfg.state_dir.join("xds"),
                    td.to_string(),
                    inner.bundle.subscribe(),
                    inner.model.clone(),
                ),
            );
        }
        if let Some(addr) = &cfg.vm_api {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (VM API)"))?;
            vm_api = Some(l.local_addr()?);
            let verifier =
                SpiffeVerifier::new(own_trust.clone(), Authorizer::trust_domain(td.clone()));
            let tls = trust::tls::server_config_optional_client(serving.clone(), verifier)?;
            let (cluster, trust_domain) = {
                let id = inner.identity();
                (id.file.cluster.clone(), id.file.trust_domain.clone())
            };
            let svc = meshfed_vm::server::VmApi::new(
                meshfed_vm::server::VmApiInputs {
                    cluster,
                    trust_domain,
                    model: inner.model.clone(),
                    own_bundle: inner.bundle.subscribe(),
                    names: inner.names.subscribe(),
                    registry: inner.registry.subscribe(),
                    entries: inner.entries.clone(),
                    drain: tasks.signal(),
                    leading: inner.speaks.subscribe(),
                },
                ca.clone(),
                &cfg.state_dir,
            )
            .server();
            let incoming = meshfed_net::tls_incoming(l, tls);
            tasks.spawn_server("VM API server", |drain| async move {
                // Keepalives find a VM that vanished without closing its stream (power loss,
                // partition) in about 10 s, which starts its entry's grace period.
                let r = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(5)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(5)))
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, drain.drained_owned())
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "VM API server failed");
                }
            });
        }
        let bundle_endpoint = match cfg.bundle_endpoint {
            Some(addr) => Some(
                meshfed_net::bundle_endpoint::serve(
                    &tasks,
                    addr,
                    match &cfg.bundle_endpoint_web {
                        Some(web) => {
                            web.watch(&tasks, Duration::from_secs(5));
                            web.server_config()?
                        }
                        None => trust::tls::server_config_no_client(serving.clone())?,
                    },
                    inner.bundle.subscribe(),
                )
                .await?,
            ),
            None => None,
        };
        let mut injection_webhook = None;
        if let Some(icfg) = &cfg.injection {
            let (Some(workloads), Some(client)) = (workloads.clone(), cfg.kubernetes.as_ref())
            else {
                anyhow::bail!("--injection-webhook needs --source kubernetes");
            };
            let ttl = cfg
                .xds
                .as_ref()
                .map(|x| x.workload_cert_ttl)
                .unwrap_or(time::Duration::hours(1));
            let base = meshfed_kube::inject::Injection {
                image: icfg.image.clone(),
                image_pull_policy: icfg.image_pull_policy.clone(),
                trust_domain: td.to_string(),
                agent: icfg.agent_address.clone(),
                server_name: cfg
                    .serving_dns_names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "meshfed-agent.meshfed-system.svc".into()),
                token_audience: cfg
                    .token_audiences
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "istio-ca".into()),
                // The projected token outlives a certificate, so a sidecar that lost its
                // certificate can obtain one again (the kubelet refreshes it at 80 %).
                token_seconds: ttl.whole_seconds().max(3600),
                roots_pem: String::new(),
                agent_namespace: icfg.agent_namespace.clone(),
            };
            injection_webhook = Some(
                injection::serve(
                    &tasks,
                    icfg.listen,
                    base,
                    trust::tls::server_config_no_client(serving.clone())?,
                    td.clone(),
                    inner.bundle.subscribe(),
                    workloads,
                )
                .await?,
            );
            tasks.spawn(
                "injection caBundle",
                injection::keep_ca_bundle(
                    client.0.clone(),
                    icfg.webhook_config.clone(),
                    td.clone(),
                    inner.bundle.subscribe(),
                    inner.leadership.subscribe(),
                ),
            );
        }
        let vips = meshfed_dns::vips::Vips::open(
            inner.cache.tree("service_vips")?,
            cfg.vip_range_v4,
            cfg.vip_range_v6,
        )?;
        // A follower replica takes its leader's VIPs (`share_vips`); without one, none pinned.
        let (vip_pins, pins_rx) = watch::channel(None);
        let vips_assigned = watch::Sender::new(Arc::new(BTreeMap::new()));
        tasks.spawn(
            "name table",
            meshfed_dns::follow_names(
                inner.model.clone(),
                inner.exports.subscribe(),
                inner.names.clone(),
                vips,
                pins_rx,
                vips_assigned.clone(),
            ),
        );
        if let Some(dcfg) = &cfg.dns {
            let served = meshfed_dns::serve(
                &tasks,
                dcfg.listen,
                inner.names.subscribe(),
                dcfg.upstream.clone(),
                &inner.metrics.registry,
            )
            .await?;
            dns_addr = Some(served.addr);
        }
        let admin_addr = match cfg.admin {
            Some(addr) => {
                let (ri, si) = (inner.clone(), inner.clone());
                Some(
                    meshfed_net::admin::serve(
                        &tasks,
                        AdminConfig {
                            addr,
                            // Per-peer gauges are set from the status at each scrape.
                            registry: Arc::new(move || {
                                ri.metrics.observe_peers(&ri.report());
                                ri.metrics.registry.clone()
                            }),
                            status: Arc::new(move || {
                                serde_json::to_value(si.report()).map_err(|e| e.to_string())
                            }),
                            extra: inner
                                .xds
                                .as_ref()
                                .map(|x| meshfed_xds::debug::router(x.clone())),
                            // The cluster's dashboard: its status and its proxies' sync states.
                            ui: Some((CLUSTER_PAGE, {
                                let ui = inner.clone();
                                Arc::new(move || {
                                    let proxies = ui
                                        .xds
                                        .as_ref()
                                        .map(|x| x.proxies.report())
                                        .unwrap_or_default();
                                    Ok(serde_json::json!({
                                        "status": serde_json::to_value(ui.report()).map_err(|e| e.to_string())?,
                                        "proxies": proxies,
                                    }))
                                })
                            })),
                            probe: cfg.probe,
                        },
                    )
                    .await?
                    .admin,
                )
            }
            None => None,
        };
        // Every listener is bound: from here on the agent speaks to the federator, renews its
        // certificate, steps its CA, runs for the Lease and writes to the Kubernetes API.
        if let Some((client, lease)) = &election {
            tasks.spawn(
                "shared VIPs",
                share_vips(
                    inner.clone(),
                    client.0.clone(),
                    lease.namespace.clone(),
                    meshfed_kube::shared_vips::name_for(&lease.name),
                    vip_pins,
                    vips_assigned.subscribe(),
                ),
            );
        }
        if let Some((client, lease)) = election {
            let tx = inner.leadership.clone();
            let mut rx = tx.subscribe();
            let i = inner.clone();
            // The metric and who speaks for the cluster follow the election (a loop the drain
            // drops, so it never holds a drain up).
            tasks.spawn("leadership", async move {
                while rx.changed().await.is_ok() {
                    let leader = rx.borrow_and_update().leader;
                    i.metrics.leader.set(i64::from(leader));
                    sync::refresh_speaks(&i);
                }
            });
            // On drain the leader releases the Lease, so a follower takes over at once.
            tasks.spawn_server("leader election", move |drain| {
                meshfed_kube::leader::run(client.0, lease, tx, drain.drained_owned())
            });
        }
        inner.metrics.leader.set(i64::from(inner.is_leader()));
        tasks.spawn(
            "federation sync",
            sync::run(inner.clone(), federation_writer),
        );
        tasks.spawn(
            "cluster certificate",
            inner.cluster_cert.clone().run(
                {
                    let inner = inner.clone();
                    issue_fn(move || renew_cluster_cert(inner.clone()))
                },
                Backoff::default(),
            ),
        );
        tasks.spawn(
            "cluster CA",
            run_ca(
                inner.clone(),
                cfg.ca_rotation,
                cfg.registry_poll,
                match (&cfg.state_secret, &cfg.kubernetes) {
                    (Some((namespace, name)), Some(client)) => Some(SharedCa {
                        client: client.0.clone(),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        state_dir: cfg.state_dir.clone(),
                    }),
                    _ => None,
                },
                // Replicas sign under the active root until they take the new CA from the
                // Secret (one read, 10 s, later): a retiring root stays for the longest
                // certificate they issue (workload or serving) past that.
                match &cfg.state_secret {
                    Some(_) => {
                        cfg.xds
                            .as_ref()
                            .map(|x| x.workload_cert_ttl)
                            .unwrap_or(time::Duration::ZERO)
                            .max(cfg.serving_cert_ttl)
                            + time::Duration::try_from(SHARED_CA_PULL * 2)
                                .unwrap_or(time::Duration::ZERO)
                    }
                    None => time::Duration::ZERO,
                },
            ),
        );
        if let Some((client, view, health)) = writer {
            tasks.spawn(
                "Kubernetes writer",
                write_kubernetes(inner.clone(), client, view, health, cfg.istio.clone()),
            );
        }
        Ok(Agent {
            inner,
            admin_addr,
            xds_plaintext,
            xds_mtls,
            vm_api,
            dns_addr,
            bundle_endpoint,
            injection_webhook,
            tasks,
        })
    }

    pub fn model(&self) -> &Reader {
        &self.inner.model
    }

    /// The agent's tasks (health, readiness, drain).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Drains: the ports stop accepting, ADS and VM streams end with UNAVAILABLE (proxies
    /// and VMs reconnect and keep their configuration meanwhile), the loops stop; up to
    /// `deadline`.
    pub async fn drain(self, deadline: Duration) -> DrainReport {
        self.tasks.drain(deadline).await
    }

    /// Stops at once, as a crash would (tests of static stability).
    pub fn stop(self) {
        self.tasks.abort_all();
    }
}

/// Every listener the configuration asks for, tried at once: one error names every address
/// that is taken (several agents on one host clash on all their default ports, not one per
/// run). The servers bind for real afterwards; this only reports clashes together.
fn check_listeners(cfg: &AgentConfig) -> anyhow::Result<()> {
    let mut tcp: Vec<(&str, SocketAddr)> = Vec::new();
    let mut udp: Vec<(&str, SocketAddr)> = Vec::new();
    let mut add = |name: &'static str, a: Option<SocketAddr>| {
        if let Some(a) = a.filter(|a| a.port() != 0) {
            tcp.push((name, a));
        }
    };
    add("--admin", cfg.admin);
    add("--probe", cfg.probe);
    add(
        "--xds-plaintext",
        cfg.xds.as_ref().and_then(|x| x.plaintext),
    );
    add("--xds-mtls", cfg.xds.as_ref().and_then(|x| x.mtls));
    add("--vm-api", cfg.vm_api);
    add("--bundle-endpoint", cfg.bundle_endpoint);
    add(
        "--injection-webhook",
        cfg.injection.as_ref().map(|i| i.listen),
    );
    if let Some(d) = cfg.dns.as_ref().filter(|d| d.listen.port() != 0) {
        tcp.push(("--dns (TCP)", d.listen));
        udp.push(("--dns (UDP)", d.listen));
    }
    let mut taken = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for (name, a) in &tcp {
        if let Some(other) = seen.insert(*a, *name) {
            taken.push(format!("{name} {a} (also {other})"));
            continue;
        }
        if let Err(e) = std::net::TcpListener::bind(a) {
            taken.push(format!("{name} {a}: {e}"));
        }
    }
    for (name, a) in &udp {
        if let Err(e) = std::net::UdpSocket::bind(a) {
            taken.push(format!("{name} {a}: {e}"));
        }
    }
    match taken.len() {
        0 => Ok(()),
        _ => anyhow::bail!(
            "cannot listen on {} address{}: {} (another agent on this host? give each its own ports, or its own address with --listen-address)",
            taken.len(),
            if taken.len() == 1 { "" } else { "es" },
            taken.join("; ")
        ),
    }
}

/// The exports with the policies marked `publish: true` attached to the services they are for.
fn attach_published_policies(
    mut exports: meshfed_model::snapshot::Services,
    policies: &PolicySet,
) -> meshfed_model::snapshot::Services {
    for e in exports.values_mut() {
        let host = format!("{}.{}.svc.cluster.local", e.name, e.namespace);
        if let Some(p) = policies.by_host.get(&host).filter(|p| p.publish) {
            let yaml = p.to_yaml();
            if e.failover_policy != yaml {
                Arc::make_mut(e).failover_policy = yaml;
            }
        }
    }
    exports
}

#[derive(Debug)]
struct LocalSourceConfig {
    /// The Kubernetes source, when the agent runs with one: its services join the registry's.
    kube: Option<meshfed_kube::source::KubeSource>,
    file: Option<FileRegistry>,
    default_locality: proto::Locality,
    poll: Duration,
    vm_grace: Duration,
    /// What to export while no registry has loaded (what the federator last acknowledged).
    initial_exports: meshfed_model::snapshot::Services,
}

/// The local source, the only writer of the model's local part: the registry file (reloaded
/// when it changes; a broken file never replaces the last good one) and the auto-registered
/// WorkloadEntries (followed as VMs come and go, and deleted when their VM stayed away longer
/// than the grace period or their WorkloadGroup is gone). It also publishes the exports they
/// imply, with the published failover policies attached. The sweep runs every grace/4 (at
/// least 250 ms), so an entry goes within grace + grace/4.
async fn local_source(inner: Arc<Inner>, writer: LocalWriter, mut cfg: LocalSourceConfig) {
    let mut seen = cfg.file.as_ref().map(|f| f.version());
    // A receiver that never changes stands in when there is no Kubernetes source.
    let (_no_kube, mut kube_rx) = match &cfg.kube {
        Some(k) => (None, k.view.clone()),
        None => {
            let (tx, rx) = watch::channel(None);
            (Some(tx), rx)
        }
    };
    let mut poll = tokio::time::interval(cfg.poll);
    let mut sweep = tokio::time::interval((cfg.vm_grace / 4).max(Duration::from_millis(250)));
    let mut entries_rx = inner.entries.subscribe();
    let mut policies_rx = inner.policies.subscribe();
    let mut registry_exports = cfg.initial_exports;
    // The registry file as last loaded; what the VM API and the sweep read (`inner.registry`)
    // is it with the Kubernetes API's WorkloadGroups added.
    let mut file_registry = inner.registry();
    // The API's WorkloadGroups as last merged, by key: one edited into a bad state keeps its
    // last good version (as the registry file does), so its VMs are not swept for a typo.
    let mut api_groups: BTreeMap<String, meshfed_model::workload::WorkloadGroup> = BTreeMap::new();
    // Whether the groups VMs join through include the API's (the sweep waits for that).
    let mut groups_merged = cfg.kube.is_none();
    let mut dirty = true;
    loop {
        if dirty {
            let kube_view = kube_rx.borrow_and_update().clone();
            // With a Kubernetes source, nothing is written before its watches have listed.
            let kube_ready = cfg.kube.is_none() || kube_view.is_some();
            let mut group_problems = Vec::new();
            if let (Some(file), true) = (&file_registry, kube_ready) {
                if let Some(v) = &kube_view {
                    let mut now: BTreeMap<String, meshfed_model::workload::WorkloadGroup> = v
                        .workload_groups
                        .iter()
                        .map(|g| (g.key(), g.clone()))
                        .collect();
                    for p in v.problems.iter().filter(|p| p.kind == "WorkloadGroup") {
                        let key = meshfed_model::validate::service_key(&p.namespace, &p.name);
                        if let Some(last) = api_groups.get(&key) {
                            group_problems.push(format!(
                                "WorkloadGroup {key}: keeping its last good version until it is fixed"
                            ));
                            now.insert(key, last.clone());
                        }
                    }
                    api_groups = now;
                    groups_merged = true;
                }
                let merged = match &kube_view {
                    Some(_) if !api_groups.is_empty() => {
                        let mut reg = Registry::clone(file);
                        for g in api_groups.values() {
                            if file
                                .group(&g.metadata.namespace.0, &g.metadata.name.0)
                                .is_some()
                            {
                                group_problems.push(format!(
                                    "WorkloadGroup {}: also listed in the registry file, which wins",
                                    g.key()
                                ));
                            } else {
                                reg.workload_groups.push(g.clone());
                            }
                        }
                        Arc::new(reg)
                    }
                    _ => file.clone(),
                };
                inner.registry.send_if_modified(|cur| {
                    if cur.as_ref() == Some(&merged) {
                        false
                    } else {
                        *cur = Some(merged);
                        true
                    }
                });
            }
            if let (Some(reg), true) = (inner.registry(), kube_ready) {
                let (mut local, mut exports) =
                    reg.view(&cfg.default_locality, &inner.entries.current());
                if let Some(v) = &kube_view {
                    let mut problems: Vec<String> =
                        v.problems.iter().map(|p| p.to_string()).collect();
                    problems.append(&mut group_problems);
                    for (k, e) in &v.local {
                        if local.contains_key(k) {
                            problems.push(format!(
                                "Service {k}: also listed in the registry file, which wins"
                            ));
                            continue;
                        }
                        local.insert(k.clone(), e.clone());
                        if let Some(x) = v.exports.get(k) {
                            exports.insert(k.clone(), x.clone());
                        }
                    }
                    inner.metrics.kubernetes_problems.set(problems.len() as i64);
                    inner.status().kubernetes_problems = problems;
                }
                writer.set_local(local, exports.keys().cloned().collect());
                registry_exports = exports;
            }
            let policies = policies_rx.borrow_and_update().clone();
            let exports = attach_published_policies(registry_exports.clone(), &policies);
            inner.exports.send_if_modified(|cur| {
                if **cur == exports {
                    false
                } else {
                    *cur = Arc::new(exports);
                    true
                }
            });
            if kube_ready {
                writer.mark_ready();
            }
            dirty = false;
        }
        tokio::select! {
            r = kube_rx.changed(), if cfg.kube.is_some() => {
                if r.is_err() {
                    cfg.kube = None;
                }
                dirty = true;
            }
            _ = poll.tick() => {
                let Some(file) = &cfg.file else { continue };
                let v = Some(file.version());
                if v == seen {
                    continue;
                }
                seen = v;
                match file.load() {
                    Ok(reg) => {
                        inner.metrics.registry_reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(
                            services = reg.services.len(),
                            groups = reg.workload_groups.len(),
                            "registry reloaded"
                        );
                        inner.status().registry_error = None;
                        file_registry = Some(Arc::new(reg));
                        dirty = true;
                    }
                    Err(e) => {
                        inner.metrics.registry_reloads.with_label_values(&["invalid"]).inc();
                        tracing::error!(error = %e, "registry is invalid; keeping the last good one");
                        inner.status().registry_error = Some(e);
                    }
                }
            }
            r = entries_rx.changed() => {
                if r.is_err() {
                    return;
                }
                entries_rx.borrow_and_update();
                dirty = true;
            }
            r = policies_rx.changed() => {
                if r.is_err() {
                    return;
                }
                dirty = true;
            }
            _ = sweep.tick() => {
                // Before the API's WorkloadGroups are merged, an entry of one is not "of a
                // group that is gone".
                if !groups_merged {
                    continue;
                }
                let groups = inner.registry().map(|r| {
                    r.workload_groups.iter().map(|g| g.key()).collect::<std::collections::BTreeSet<_>>()
                });
                let gone = inner.entries.sweep(
                    meshfed_model::entry::now_ms(),
                    cfg.vm_grace.as_millis() as i64,
                    groups.as_ref(),
                );
                for name in gone {
                    tracing::info!(entry = %name, "WorkloadEntry deleted (its VM stayed away past the grace period, or its group is gone)");
                }
            }
        }
    }
}

/// Keeps one MCS ServiceImport and its EndpointSlices per imported service in the cluster, the
/// conditions of every ServiceExport, the registered VMs' WorkloadEntries and the Events of
/// refused objects current (`meshfed_kube::sink`), after every change of the model, the VIPs,
/// the Kubernetes view or what the federator acknowledged; a failed write is retried after 5 s
/// and reported in `meshfed status` until one succeeds. With leader election, only while this
/// replica leads.
async fn write_kubernetes(
    inner: Arc<Inner>,
    client: kube::Client,
    view: watch::Receiver<Option<Arc<meshfed_kube::view::View>>>,
    health: watch::Receiver<BTreeMap<String, meshfed_kube::source::WatchHealth>>,
    istio: Option<IstioConfig>,
) {
    let mut role = inner.leadership.subscribe();
    loop {
        if role.wait_for(|l| l.leader).await.is_err() {
            return;
        }
        if inner.elected {
            tracing::info!("leading: writing to the Kubernetes API");
        }
        // A term: its writers start from what they list, so a new leader takes over the
        // objects the previous one wrote. Losing the Lease cancels the pass in flight.
        tokio::select! {
            _ = write_kubernetes_while_leading(inner.clone(), client.clone(), view.clone(), health.clone(), istio.clone()) => return,
            r = role.wait_for(|l| !l.leader) => {
                if r.is_err() {
                    return;
                }
                tracing::info!("no longer the leader: stopped writing to the Kubernetes API");
                inner.status().kubernetes_write_error = None;
            }
        }
    }
}

async fn write_kubernetes_while_leading(
    inner: Arc<Inner>,
    client: kube::Client,
    mut view: watch::Receiver<Option<Arc<meshfed_kube::view::View>>>,
    mut health: watch::Receiver<BTreeMap<String, meshfed_kube::source::WatchHealth>>,
    istio: Option<IstioConfig>,
) {
    let mut istio_writer = istio.map(IstioWriter::new);
    let mut policies = inner.policies.subscribe();
    inner.model.wait_until_ready().await;
    let mut snaps = inner.model.subscribe();
    let mut names = inner.names.subscribe();
    let mut acks = inner.exports_acked.subscribe();
    let mut policy_problems = inner.policy_problems.subscribe();
    let mut stored: Option<std::collections::BTreeSet<String>> = None;
    let mut writer = meshfed_kube::sink::ImportWriter::default();
    let mut statuses = meshfed_kube::sink::ExportStatusWriter::default();
    let mut slices = meshfed_kube::sink::SliceWriter::default();
    let mut vm_entries =
        meshfed_kube::sink::EntryWriter::with_selector(meshfed_kube::sink::VM_ENTRIES_SELECTOR);
    let mut entries_rx = inner.entries.subscribe();

    // The pod's name (the downward API's POD_NAME, when the manifest sets it) tells replicas'
    // Events apart.
    let mut events =
        meshfed_kube::sink::ProblemEvents::new(client.clone(), std::env::var("POD_NAME").ok());
    loop {
        let snap = snaps.borrow_and_update().clone();
        let table = names.borrow_and_update().clone();
        let retry;
        // The model's services, computed once for both writers.
        let services = snap.services();
        let desired =
            meshfed_kube::sink::desired_imports(&services, |ns, name| table.vips(ns, name));
        // What the federator stored: read from the cache only when it acknowledged something.
        if acks.has_changed().unwrap_or(false) || stored.is_none() {
            let acked = acks.borrow_and_update().clone();
            stored = Some(match acked {
                Some(m) => m.keys().cloned().collect(),
                None => inner
                    .cache
                    .acked_exports()
                    .map(|m| m.into_keys().collect())
                    .unwrap_or_default(),
            });
        }
        let current_view = view.borrow_and_update().clone();
        let conditions = match current_view.clone() {
            Some(v) => {
                let conflicts = inner.status().conflicts.clone();
                meshfed_kube::sink::export_conditions(
                    &v,
                    &conflicts,
                    stored.as_ref().unwrap_or(&Default::default()),
                )
            }
            None => Default::default(),
        };
        // Every input is read (and marked seen) before writing, so that a failed pass waits for
        // the retry or a new change, not for an input it did not get to.
        let entries = entries_rx.borrow_and_update().clone();
        // VMs' WorkloadEntries, where the API server serves the kind (Istio's CRD).
        let entries_served = health
            .borrow_and_update()
            .get("WorkloadEntry")
            .is_some_and(|w| w.synced && !w.not_served);
        let mut problems: Vec<meshfed_kube::view::Problem> = current_view
            .as_ref()
            .map(|v| v.problems.clone())
            .unwrap_or_default();
        problems.extend(policy_problems.borrow_and_update().iter().cloned());
        let policy_set = policies.borrow_and_update().clone();
        let result = async {
            let mut done = writer.sync(&client, &desired).await?;
            if let Some(w) = istio_writer.as_mut() {
                let d = w
                    .sync(
                        &client,
                        &snap,
                        &services,
                        &table,
                        current_view.as_deref(),
                        &policy_set,
                    )
                    .await?;
                done.applied += d.applied;
                done.deleted += d.deleted;
                inner.status().istio = Some(w.report.clone());
            }
            let s = slices
                .sync(
                    &client,
                    &meshfed_kube::sink::desired_slices(&snap.facts.network, &services),
                )
                .await?;
            done.applied += s.applied;
            done.deleted += s.deleted;
            if entries_served {
                let w = vm_entries
                    .sync(
                        &client,
                        &meshfed_kube::sink::desired_workload_entries(&entries),
                    )
                    .await?;
                done.applied += w.applied;
                done.deleted += w.deleted;
            }
            let statuses_written = statuses.sync(&client, &conditions).await?;
            events.sync(&problems).await?;
            anyhow::Ok((done, statuses_written))
        }
        .await;
        match result {
            Ok((done, statuses_written)) => {
                if done.applied + done.deleted + statuses_written > 0 {
                    tracing::info!(
                        applied = done.applied,
                        deleted = done.deleted,
                        statuses = statuses_written,
                        "Kubernetes objects written"
                    );
                }
                inner.status().kubernetes_write_error = None;
                retry = None;
            }
            Err(e) => {
                let e = format!("writing to the Kubernetes API: {e:#}");
                tracing::warn!(error = %e, "retrying in 5 s");
                inner.status().kubernetes_write_error = Some(e);
                retry = Some(tokio::time::Instant::now() + Duration::from_secs(5));
            }
        }
        tokio::select! {
            r = snaps.changed() => if r.is_err() { return },
            r = names.changed() => if r.is_err() { return },
            r = view.changed() => if r.is_err() { return },
            r = acks.changed() => if r.is_err() { return },
            r = policy_problems.changed() => if r.is_err() { return },
            r = policies.changed() => if r.is_err() { return },
            r = entries_rx.changed() => if r.is_err() { return },
            // The WorkloadEntry kind may become served later.
            r = health.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)), if retry.is_some() => {}
        }
        // Coalesce a burst of changes into one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

use meshfed_kube::sink::ManagedWriter;

/// The writers of what istiod reads (`--istio`): the imports as ServiceEntries, WorkloadEntries
/// and DestinationRules, and the peers' roots in the mesh config ConfigMap meshfed owns.
struct IstioWriter {
    config: IstioConfig,
    service_entries: meshfed_kube::sink::ManagedWriter<meshfed_kube::types::ServiceEntry>,
    workload_entries: meshfed_kube::sink::ManagedWriter<meshfed_kube::types::WorkloadEntry>,
    destination_rules: meshfed_kube::sink::ManagedWriter<meshfed_kube::types::DestinationRule>,
    /// The mesh config last written (not written again while it is the same).
    mesh_written: Option<String>,
    report: IstioReport,
}

impl IstioWriter {
    fn new(config: IstioConfig) -> IstioWriter {
        IstioWriter {
            config,
            service_entries: ManagedWriter::with_selector(meshfed_kube::istio::IMPORTS_SELECTOR),
            workload_entries: ManagedWriter::with_selector(meshfed_kube::istio::IMPORTS_SELECTOR),
            destination_rules: ManagedWriter::with_selector(meshfed_kube::istio::IMPORTS_SELECTOR),
            mesh_written: None,
            report: IstioReport::default(),
        }
    }

    async fn sync(
        &mut self,
        client: &kube::Client,
        snap: &meshfed_model::snapshot::Snapshot,
        services: &BTreeMap<String, Vec<meshfed_model::snapshot::Instance<'_>>>,
        names: &NameTable,
        view: Option<&meshfed_kube::view::View>,
        policy_set: &PolicySet,
    ) -> anyhow::Result<meshfed_kube::sink::Synced> {
        let mut trust_domains: BTreeMap<String, String> = BTreeMap::new();
        for (id, p) in &snap.peers {
            if let Some(f) = &p.facts {
                trust_domains.insert(id.clone(), f.trust_domain.clone());
            }
        }
        // The policy in effect for each imported host: the cluster's own, else the one its
        // exporters published (as the xDS generation chooses).
        let mut policies: BTreeMap<String, Arc<meshfed_model::policy::Policy>> = BTreeMap::new();
        for (key, insts) in services {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let host = format!("{name}.{ns}.svc.cluster.local");
            if let Some(p) = policy_set
                .by_host
                .get(&host)
                .cloned()
                .or_else(|| meshfed_xds::generation::published_policy(insts))
            {
                policies.insert(host, Arc::new(p));
            }
        }
        let empty_names = Default::default();
        let empty_user = Default::default();
        let vips = |ns: &str, name: &str| names.vips(ns, name);
        let desired = meshfed_kube::istio::desired(&meshfed_kube::istio::Inputs {
            network: &snap.facts.network,
            services,
            trust_domains: &trust_domains,
            vips: &vips,
            local_names: view.map(|v| &v.service_names).unwrap_or(&empty_names),
            user: view.map(|v| &v.istio_user).unwrap_or(&empty_user),
            policies: &policies,
        });
        let mut done = self
            .service_entries
            .sync(client, &desired.service_entries)
            .await?;
        for d in [
            self.workload_entries
                .sync(client, &desired.workload_entries)
                .await?,
            self.destination_rules
                .sync(client, &desired.destination_rules)
                .await?,
        ] {
            done.applied += d.applied;
            done.deleted += d.deleted;
        }
        let mut report = IstioReport {
            service_entries: desired.service_entries.len() as u64,
            workload_entries: desired.workload_entries.len() as u64,
            destination_rules: desired.destination_rules.len() as u64,
            findings: desired.findings,
            ..Default::default()
        };
        if let Some((ns, name)) = &self.config.mesh_config {
            let (mesh, errors) =
                meshfed_kube::istio::mesh_config(&snap.facts.trust_domain, &snap.bundles);
            if self.mesh_written.as_ref() != Some(&mesh) {
                meshfed_kube::istio::write_mesh_config(client, ns, name, &mesh).await?;
                self.mesh_written = Some(mesh);
                done.applied += 1;
            }
            report.mesh_config = Some(format!("{ns}/{name}"));
            report.mesh_config_trust_domains = snap
                .bundles
                .keys()
                .filter(|td| **td != snap.facts.trust_domain)
                .filter(|td| !errors.iter().any(|e| e.contains(td.as_str())))
                .cloned()
                .collect();
            report.mesh_config_errors = errors;
        }
        self.report = report;
        Ok(done)
    }
}

/// The agent's serving identity `spiffe://<td>/ns/meshfed-system/sa/meshfed-agent`, issued
/// from the cluster CA (what xDS clients and VMs check).
fn serving_svid(ca: &LiveCa, ttl: time::Duration, dns: &[String]) -> anyhow::Result<trust::Svid> {
    let id = agent_spiffe_id(&ca.trust_domain())?;
    ca.issue_svid_with_dns(&id, dns, &trust::ca::policy::AnyWorkload, ttl)
}

/// Drives the cluster CA: reloads it when `meshfed ca rotate` changed it, starts rotations on
/// the policy's schedule, and lets a pending root sign only once the federator says every
/// member holds the bundle that carries it.
async fn run_ca(
    inner: Arc<Inner>,
    policy: RotationPolicy,
    every: Duration,
    shared: Option<SharedCa>,
    others_until: time::Duration,
) {
    let mut t = tokio::time::interval(every);
    // When a follower last read the shared Secret, and whether the leader owes it a write.
    let mut pulled: Option<tokio::time::Instant> = None;
    let mut publish = false;
    // This leader took the Secret's CA since it began leading.
    let mut synced = false;
    // The identity (certificate expiry, federation bundle sequence) this leader last wrote to
    // the Secret: its files are read only when that changes.
    let mut pushed_identity = None;
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Replicas with a leader: only the leader starts rotations and lets a new root sign (it
    // asks the federator, over its cluster identity, who holds the bundle); a follower's step
    // only reloads and advances by the clock.
    let follower_policy = RotationPolicy {
        period: None,
        ..policy
    };
    loop {
        t.tick().await;
        let now = time::OffsetDateTime::now_utc();
        let leader = inner.is_leader();
        let policy = if leader { policy } else { follower_policy };
        if !leader {
            synced = false;
        }
        if let Some(sh) = &shared {
            // A follower takes the leader's CA from the Secret (every 10 s); a new leader takes
            // it before its first step and does not step until it could (it may have missed
            // the last change: a rotation it started from a stale CA would fork it).
            let due = pulled.is_none_or(|p| p.elapsed() >= SHARED_CA_PULL);
            if (!leader && due) || (leader && !synced) {
                let r = tokio::time::timeout(SHARED_CA_TIMEOUT, sh.pull(&inner))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("no answer within {SHARED_CA_TIMEOUT:?}"))
                    });
                pulled = Some(tokio::time::Instant::now());
                match r {
                    Ok(n) => {
                        synced = leader;
                        if n > 0 {
                            tracing::info!(files = n, secret = %sh.name, "took the cluster CA's changes from the shared Secret");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot read the shared Secret; keeping this replica's CA");
                        if leader {
                            continue;
                        }
                    }
                }
            }
        }
        let may_activate = match inner.ca.activation_due(now).filter(|_| leader) {
            None => false,
            Some(sequence) => match bundle_distribution(&inner).await {
                Ok(d) if d.stored_sequence >= sequence && d.pending.is_empty() => {
                    inner.ca.set_waiting_for(Vec::new());
                    true
                }
                Ok(d) => {
                    let mut waiting = d.pending;
                    if d.stored_sequence < sequence {
                        waiting.insert(0, "federator".into());
                    }
                    inner.ca.set_waiting_for(waiting);
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot ask the federator whether the new root has been distributed; it does not sign yet");
                    inner.ca.set_waiting_for(vec!["federator".into()]);
                    false
                }
            },
        };
        let ca = inner.ca.clone();
        match tokio::task::spawn_blocking(move || {
            ca.step_with(now, &policy, may_activate, others_until)
        })
        .await
        {
            Ok(Ok(s)) => {
                if s.signer_changed {
                    inner.metrics.ca_rotations.inc();
                }
                let seq = inner.ca.bundle().sequence.unwrap_or(0);
                inner.metrics.ca_bundle_sequence.set(seq as i64);
                publish |=
                    leader && (s.began || s.bundle_changed || s.signer_changed || s.reloaded);
            }
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "cluster CA step failed"),
            Err(e) => tracing::error!(error = %e, "cluster CA step panicked"),
        }
        // Leadership is checked again: the federator's answer above may have taken a while.
        if let (Some(sh), true) = (&shared, publish && leader && inner.is_leader()) {
            let r = tokio::time::timeout(SHARED_CA_TIMEOUT, sh.push(&inner))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {SHARED_CA_TIMEOUT:?}")));
            match r {
                Ok(changed) => {
                    publish = false;
                    if changed {
                        tracing::info!(secret = %sh.name, "wrote the cluster CA's change to the shared Secret");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot write the cluster CA to the shared Secret; trying again")
                }
            }
        }
        if !leader {
            publish = false;
            pushed_identity = None;
        }
        // The leader keeps the Secret's identity current too: its cluster certificate renews
        // (and the federation bundle may change), and a replica that starts later restores
        // what is there.
        let identity_now = (
            inner.cluster_cert.current().map(|c| c.not_after),
            inner.identity().federation_bundle.sequence,
        );
        let stale = pushed_identity != Some(identity_now);
        if let (Some(sh), true) = (&shared, stale && leader && synced && inner.is_leader()) {
            let r = tokio::time::timeout(SHARED_CA_TIMEOUT, sh.push_identity(&inner))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {SHARED_CA_TIMEOUT:?}")));
            if r.is_ok() {
                pushed_identity = Some(identity_now);
            }
            match r {
                Ok(true) => {
                    tracing::info!(secret = %sh.name, "wrote the cluster identity's change (a renewed certificate) to the shared Secret")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot write the cluster identity to the shared Secret; trying again")
                }
            }
        }
    }
}

/// Replicas answer with the same service VIPs: the leader writes its assignment to a
/// ConfigMap whenever it changes; a follower reads it every second and its name table uses
/// exactly those addresses (allocating none). Which VIP a pod gets does not depend on the
/// replica its DNS query or its proxy's xDS stream reached.
async fn share_vips(
    inner: Arc<Inner>,
    client: kube::Client,
    namespace: String,
    name: String,
    pins: watch::Sender<Option<meshfed_dns::Pinned>>,
    mut assigned: watch::Receiver<Arc<BTreeMap<String, meshfed_dns::vips::Vip>>>,
) {
    let mut role = inner.leadership.subscribe();
    let mut written: Option<Arc<BTreeMap<String, meshfed_dns::vips::Vip>>> = None;
    loop {
        let leader = role.borrow_and_update().leader;
        if leader {
            // The leader allocates (from what it adopted as a follower) and publishes.
            pins.send_if_modified(|p| p.take().is_some());
            let now = assigned.borrow_and_update().clone();
            if written.as_ref() != Some(&now) {
                let r = match serde_json::to_string(&*now) {
                    Ok(j) => tokio::time::timeout(
                        SHARED_CA_TIMEOUT,
                        meshfed_kube::shared_vips::write(client.clone(), &namespace, &name, &j),
                    )
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer"))),
                    Err(e) => Err(e.into()),
                };
                match r {
                    Ok(()) => written = Some(now),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot share the service VIPs with the other replicas; trying again")
                    }
                }
            }
        } else {
            written = None;
            let r = tokio::time::timeout(
                SHARED_CA_TIMEOUT,
                meshfed_kube::shared_vips::read(client.clone(), &namespace, &name),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer")));
            match r.and_then(|j| {
                j.map(|j| serde_json::from_str::<BTreeMap<String, meshfed_dns::vips::Vip>>(&j))
                    .transpose()
                    .map_err(anyhow::Error::from)
            }) {
                Ok(got) => {
                    let got = Arc::new(got.unwrap_or_default());
                    pins.send_if_modified(|p| {
                        if p.as_ref() == Some(&got) {
                            false
                        } else {
                            *p = Some(got);
                            true
                        }
                    });
                }
                // Unreadable: the addresses in use stay.
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "cannot read the leader's service VIPs")
                }
            }
        }
        // A follower reads again in a second; so does a leader whose write failed.
        let again = !leader || written.as_ref() != Some(&*assigned.borrow());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)), if again => {}
            r = assigned.changed(), if leader => if r.is_err() { return },
            r = role.changed() => if r.is_err() { return },
        }
    }
}

/// How often a follower reads the shared Secret for the leader's CA changes (a new root is
/// published for 20 minutes by default before it signs).
const SHARED_CA_PULL: Duration = Duration::from_secs(10);
/// How long one read or write of the shared Secret may take.
const SHARED_CA_TIMEOUT: Duration = Duration::from_secs(10);

/// The Secret replicas share the CA through.
struct SharedCa {
    client: kube::Client,
    namespace: String,
    name: String,
    state_dir: PathBuf,
}

impl SharedCa {
    /// Writes the Secret's CA files into this replica's CA directory; how many differed.
    async fn pull(&self, inner: &Inner) -> anyhow::Result<usize> {
        let Some(state) =
            meshfed_kube::state_secret::fetch(self.client.clone(), &self.namespace, &self.name)
                .await?
        else {
            anyhow::bail!("Secret {}/{} does not exist", self.namespace, self.name);
        };
        let cluster = inner.identity().file.cluster.clone();
        if state.cluster != cluster {
            anyhow::bail!(
                "Secret {}/{} holds the state of cluster {:?}, not {cluster:?}",
                self.namespace,
                self.name,
                state.cluster
            );
        }
        let ca = state.only(meshfed_kube::state_secret::CA);
        let dir = self.state_dir.clone();
        let td = inner.identity().file.trust_domain.clone();
        let (ns, name) = (self.namespace.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || {
            // Checked before it replaces anything: a CA that loads, of this cluster's domain.
            let tmp = tempfile::tempdir_in(&dir)?;
            ca.write(tmp.path())?;
            let got =
                trust::CertificateAuthority::load(&tmp.path().join(meshfed_kube::state_secret::CA))
                    .with_context(|| format!("the CA in Secret {ns}/{name}"))?;
            if got.trust_domain().as_str() != td {
                anyhow::bail!(
                    "Secret {ns}/{name} holds a CA of trust domain {}, not {td}",
                    got.trust_domain()
                );
            }
            // Under the CA directory's lock, as every other writer of it.
            let _lock = trust::ca::CaDir::new(meshfed_identity::cluster::ca_dir(&dir)).lock()?;
            ca.write(&dir)
        })
        .await?
    }

    /// Writes this replica's identity directory into the Secret; whether the Secret changed.
    async fn push_identity(&self, inner: &Inner) -> anyhow::Result<bool> {
        let cluster = inner.identity().file.cluster.clone();
        let state = meshfed_kube::state_secret::SharedState::read(
            &self.state_dir,
            &cluster,
            &[meshfed_kube::state_secret::IDENTITY],
        )?;
        meshfed_kube::state_secret::update_dir(
            self.client.clone(),
            &self.namespace,
            &self.name,
            meshfed_kube::state_secret::IDENTITY,
            &state,
        )
        .await
    }

    /// Writes this replica's CA directory into the Secret; whether it changed.
    async fn push(&self, inner: &Inner) -> anyhow::Result<bool> {
        let cluster = inner.identity().file.cluster.clone();
        let state = {
            let _lock =
                trust::ca::CaDir::new(meshfed_identity::cluster::ca_dir(&self.state_dir)).lock()?;
            meshfed_kube::state_secret::SharedState::read(
                &self.state_dir,
                &cluster,
                &[meshfed_kube::state_secret::CA],
            )?
        };
        meshfed_kube::state_secret::update_dir(
            self.client.clone(),
            &self.namespace,
            &self.name,
            meshfed_kube::state_secret::CA,
            &state,
        )
        .await
    }
}

/// Asks the federator which members hold this cluster's bundle.
async fn bundle_distribution(inner: &Inner) -> anyhow::Result<proto::BundleDistributionResponse> {
    let federators = inner.identity().file.federators.clone();
    let cfg = trust::tls::client_config(
        inner.cluster_cert.resolver(),
        inner.federator_verifier.clone(),
    )?;
    let mut client = proto::federation_client::FederationClient::new(meshfed_net::channel(
        federators,
        cfg,
        "federator",
    )?);
    Ok(client
        .bundle_distribution(proto::BundleDistributionRequest {})
        .await
        .map_err(|s| meshfed_identity::cluster::describe_status("bundle distribution", &s))?
        .into_inner())
}

/// Puts the CA's bundle everywhere this cluster's own peers are verified and published (the
/// federator, the proxies' trust files, the bundle endpoint, VMs), and renews the serving
/// certificate as soon as a new root signs.
async fn follow_own_bundle(
    inner: Arc<Inner>,
    own: TrustStore,
    serving: Arc<Managed>,
    xds: Option<Arc<XdsState>>,
) {
    let mut bundles = inner.ca.subscribe_bundle();
    let mut signer = inner.ca.subscribe_signer();
    loop {
        tokio::select! {
            r = bundles.changed() => {
                if r.is_err() {
                    return;
                }
                let b = bundles.borrow_and_update().clone();
                if let Err(e) = own.update(b.clone()) {
                    tracing::error!(error = %e, "cannot install the cluster's new bundle in its verifiers");
                }
                match b.to_json() {
                    Ok(json) => {
                        inner.bundle.send_replace(json);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot encode the cluster's bundle"),
                }
            }
            r = signer.changed() => {
                if r.is_err() {
                    return;
                }
                signer.borrow_and_update();
                serving.renew_soon();
                // Proxies' SDS certificates move onto the new signer too.
                if let Some(x) = &xds {
                    x.secrets.reissue_all();
                }
            }
        }
    }
}

/// Who may make VM tokens at the running agent: the API server says who the bearer token is
/// (its own audience) and whether that user may update the WorkloadGroup.
struct KubeAdmin {
    client: kube::Client,
}

impl std::fmt::Debug for KubeAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeAdmin")
    }
}

#[tonic::async_trait]
impl meshfed_vm::admin::AdminAuth for KubeAdmin {
    async fn authorize(
        &self,
        bearer: &str,
        namespace: &str,
        group: &str,
    ) -> Result<String, tonic::Status> {
        use meshfed_kube::token_review::{authenticate, may, Access, ReviewError};
        let status = |e: ReviewError, refused: fn(String) -> tonic::Status| match e {
            ReviewError::Refused(why) => refused(why),
            ReviewError::Unavailable(why) => {
                tonic::Status::unavailable(format!("the API server cannot be asked now: {why}"))
            }
        };
        let user = authenticate(self.client.clone(), bearer)
            .await
            .map_err(|e| {
                status(e, |w| {
                    tonic::Status::unauthenticated(format!("the token was not accepted: {w}"))
                })
            })?;
        let access = Access {
            verb: "update",
            group: "networking.istio.io",
            resource: "workloadgroups",
            namespace,
            name: group,
        };
        may(self.client.clone(), &user, &access)
            .await
            .map_err(|e| status(e, tonic::Status::permission_denied))?;
        Ok(user.username)
    }
}

/// Service-account tokens, checked with a TokenReview for the configured audiences.
struct KubeTokens {
    client: kube::Client,
    audiences: Vec<String>,
}

/// The CA API's bearer tokens: meshfed workload tokens (`mwt1.`, one-time, from
/// `meshfed workload token`) spent from the agent's state, anything else a Kubernetes
/// service-account token (with the Kubernetes source).
struct AgentTokens {
    kube: Option<KubeTokens>,
    workload: meshfed_identity::token::TokenStore,
    cluster: String,
    /// Check-and-spend of a workload token is one step.
    spending: tokio::sync::Mutex<()>,
}

#[tonic::async_trait]
impl meshfed_identity::ca_api::Authenticator for AgentTokens {
    async fn authenticate(
        &self,
        token: &str,
    ) -> Result<meshfed_identity::ca_api::ServiceAccount, meshfed_identity::ca_api::TokenRefusal>
    {
        use meshfed_identity::ca_api::{ServiceAccount, TokenRefusal};
        use meshfed_identity::workload_token;
        if workload_token::is_workload_token(token) {
            let _one = self.spending.lock().await;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            return match workload_token::spend(&self.workload, token, &self.cluster, now) {
                Ok(c) => Ok(ServiceAccount {
                    namespace: c.namespace,
                    name: c.service_account,
                }),
                Err(meshfed_identity::token::TokenError::Store(e)) => {
                    Err(TokenRefusal::Unavailable(format!("the token store: {e}")))
                }
                Err(e) => Err(TokenRefusal::Invalid(e.to_string())),
            };
        }
        match &self.kube {
            Some(k) => k.authenticate(token).await,
            None => Err(TokenRefusal::Invalid(
                "not a meshfed workload token, and this agent does not read Kubernetes (no \
                 TokenReview for service-account tokens)"
                    .into(),
            )),
        }
    }
}

impl KubeTokens {
    async fn authenticate(
        &self,
        token: &str,
    ) -> Result<meshfed_identity::ca_api::ServiceAccount, meshfed_identity::ca_api::TokenRefusal>
    {
        use meshfed_identity::ca_api::{ServiceAccount, TokenRefusal};
        use meshfed_kube::token_review::{review, ReviewError};
        match review(self.client.clone(), token, &self.audiences).await {
            Ok(r) => Ok(ServiceAccount {
                namespace: r.namespace,
                name: r.service_account,
            }),
            Err(ReviewError::Refused(why)) => Err(TokenRefusal::Invalid(why)),
            Err(ReviewError::Unavailable(why)) => Err(TokenRefusal::Unavailable(why)),
        }
    }
}

/// The default lifetime of the agent's serving certificate.
pub const SERVING_CERT_TTL: time::Duration = time::Duration::hours(24);

/// Reloads the policy files when they change; a broken file never replaces the last good set.
/// The policies in effect: the files', and the Kubernetes objects' (FailoverPolicy, opted-in
/// DestinationRules) where no file has one for the host; objects that cannot be used are
/// problems (status, Events).
async fn merge_policies(
    inner: Arc<Inner>,
    mut kube: Option<watch::Receiver<Arc<meshfed_kube::policies::PolicyDocs>>>,
) {
    let mut files = inner.file_policies.subscribe();
    loop {
        let f = files.borrow_and_update().clone();
        let (set, problems) = match &mut kube {
            Some(k) => meshfed_kube::policies::merge(&f, &k.borrow_and_update()),
            None => ((*f).clone(), Vec::new()),
        };
        inner.policy_problems.send_if_modified(|cur| {
            if *cur == problems {
                false
            } else {
                *cur = problems;
                true
            }
        });
        inner.policies.send_if_modified(|cur| {
            if **cur == set {
                false
            } else {
                tracing::info!(policies = set.by_host.len(), "failover policies in effect");
                *cur = Arc::new(set);
                true
            }
        });
        let kube_changed = async {
            match &mut kube {
                Some(k) => k.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = files.changed() => if r.is_err() { return },
            ok = kube_changed => if !ok { kube = None },
        }
    }
}

async fn watch_policies(inner: Arc<Inner>, paths: Vec<PathBuf>, poll: Duration) {
    if paths.is_empty() {
        // Nothing to watch; the task stays (a task that ends is reported as a failure).
        return std::future::pending().await;
    }
    let mut seen = meshfed_model::policy::paths_version(&paths);
    let mut t = tokio::time::interval(poll);
    loop {
        t.tick().await;
        let v = meshfed_model::policy::paths_version(&paths);
        if v == seen {
            continue;
        }
        seen = v;
        match PolicySet::load_paths(&paths) {
            Ok(set) => {
                tracing::info!(policies = set.by_host.len(), "failover policies reloaded");
                inner.status().policy_error = None;
                inner.file_policies.send_if_modified(|cur| {
                    if **cur == set {
                        false
                    } else {
                        *cur = Arc::new(set);
                        true
                    }
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "failover policies are invalid; keeping the last good ones");
                inner.status().policy_error = Some(e);
            }
        }
    }
}

/// Renews the cluster certificate with the federator (make-before-break: the old certificate
/// stays valid until it expires) and stores it in the identity directory.
async fn renew_cluster_cert(inner: Arc<Inner>) -> anyhow::Result<trust::Svid> {
    let (id, federators) = {
        let i = inner.identity();
        (i.svid.id.clone(), i.file.federators.clone())
    };
    let (key, csr) = trust::keys::key_and_csr(&id)?;
    let cfg = trust::tls::client_config(
        inner.cluster_cert.resolver(),
        inner.federator_verifier.clone(),
    )?;
    let mut client = proto::federation_client::FederationClient::new(meshfed_net::channel(
        federators,
        cfg,
        "federator",
    )?);
    let resp = client
        .renew(proto::RenewRequest { csr_der: csr })
        .await
        .map_err(|s| meshfed_identity::cluster::describe_status("renewal refused", &s))?
        .into_inner();
    let chain = resp
        .cert_chain_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let svid = trust::Svid::new(chain, key).context("the renewed certificate is unusable")?;
    inner.identity().store_svid(svid.clone())?;
    Ok(svid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19: an export to a cluster that is not a member and a VM no service selects are
    /// warned about by name (the member list only counts while the federator is connected).
    #[test]
    fn exports_to_strangers_and_vms_no_service_selects_are_warned_about() {
        let mut snap = meshfed_model::snapshot::Snapshot::default();
        snap.facts.cluster_id = "east".into();
        snap.peers
            .insert("west".into(), proto::PeerCluster::default());
        let svc = |addr: &str, to: &[&str]| {
            Arc::new(proto::ServiceExport {
                namespace: "shop".into(),
                name: "payment".into(),
                export_to: to.iter().map(|s| s.to_string()).collect(),
                endpoints: vec![proto::Endpoint {
                    address: addr.into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        snap.local
            .insert("shop/payment".into(), svc("10.0.0.5", &[]));
        let exports: meshfed_model::snapshot::Services = [(
            "shop/payment".to_string(),
            svc("10.0.0.5", &["west", "nosuchcluster"]),
        )]
        .into();
        let entry = |name: &str, addr: &str| meshfed_model::entry::AutoEntry {
            name: name.into(),
            namespace: "shop".into(),
            group: "ledger-vm".into(),
            address: addr.into(),
            ..Default::default()
        };
        let entries: BTreeMap<String, meshfed_model::entry::AutoEntry> = [
            ("a".to_string(), entry("payment-vm-10-0-0-5", "10.0.0.5")),
            ("b".to_string(), entry("ledger-vm-10-0-0-9", "10.0.0.9")),
        ]
        .into();
        let w = config_warnings(&snap, &exports, true, &entries);
        assert_eq!(
            w,
            [
                "service shop/payment is exported to nosuchcluster, which is not a member of the federation",
                "VM entry shop/ledger-vm-10-0-0-9 (10.0.0.9) is an endpoint of no service: no service's selector matches the labels of WorkloadGroup ledger-vm (docs/vm.md)",
            ]
        );
        // Not connected: the member list may be stale, so exports are not judged.
        assert_eq!(config_warnings(&snap, &exports, false, &entries).len(), 1);
    }

    /// A CA signer or a peer's root inside the warning window is warned about, with the days
    /// left; one outside it is not.
    #[test]
    fn expiry_within_thirty_days_is_warned_about() {
        let peer = |cluster: &str, days: Option<i64>| PeerReport {
            cluster: cluster.into(),
            network: "n".into(),
            trust_domain: format!("{cluster}.mesh"),
            connected: true,
            lease: "fresh".into(),
            last_heartbeat_age_ms: Some(0),
            bundle: days.is_some(),
            bundle_sequence: days.map(|_| 3),
            bundle_days_left: days,
        };
        let mut r = AgentReport {
            ca: Some(CaReport {
                signer_days_left: 365,
                ..Default::default()
            }),
            peers: vec![
                peer("east", Some(400)),
                peer("west", Some(12)),
                peer("eu", None),
            ],
            ..Default::default()
        };
        assert_eq!(
            r.warnings(),
            vec![
                "peer west's trust bundle (sequence 3) has a root that expires in 12 days"
                    .to_string()
            ]
        );
        r.ca = Some(CaReport {
            signer_days_left: 29,
            signer_not_after: "2027-01-01T00:00:00Z".into(),
            ..Default::default()
        });
        let w = r.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("expires in 29 days") && w[0].contains("meshfed ca rotate start"),
            "{w:?}"
        );
        // Warnings are not problems: status exits 0 for them.
        assert!(r.problems().iter().all(|p| !p.contains("expires")));
    }
}
