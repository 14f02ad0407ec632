//! The federator process: the gRPC service (Join, Sync, Leave, Renew, Status), lease tracking,
//! and the admin HTTP endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use proto::cluster_message::Kind as In;
use proto::federation_server::Federation;
use proto::wire::{FederatorMessageWire, ImportDeltaWire, ImportedServiceWire, Kind as Out};
use proto::{
    ClusterMessage, ClusterStatus, FederatorMessage, ImportKey, JoinRequest, JoinResponse,
    LeaveRequest, LeaveResponse, PeerBundle, PeerCluster, PeerStates, RenewRequest, RenewResponse,
    StatusRequest, StatusResponse, Welcome,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trust::tls::{Authorizer, SpiffeVerifier};
use trust::{BundleSet, TrustBundle, TrustDomain, TrustStore};

use super::status::{ClusterReport, FederationReport};
use crate::ca::FederationCa;
use crate::metrics::FederationMetrics;
use meshfed_identity::certs::{issue_fn, Backoff, Managed};
use meshfed_identity::ids::cluster_of;
use meshfed_identity::token::{Claims, TokenError, TokenStore};
use meshfed_model::validate::{self, MAX_SERVICES_PER_DELTA};
use meshfed_net::admin::AdminConfig;
use meshfed_net::drain::{DrainReport, Tasks};
use meshfed_store::{Change, ClusterRecord, Cursor, MemberCert, Store, StoreError};

mod admin;
mod raw_sync;

/// How many export changes one import delta carries at most. Small chunks bound the memory a
/// full resync of many importers takes at once.
const IMPORT_CHUNK: usize = 200;
/// The first message of a Sync stream must arrive within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct FederatorConfig {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Addresses joiners and agents use to reach this federator (default: the listen address).
    pub advertise: Vec<String>,
    pub admin: Option<SocketAddr>,
    /// The probe listener (`/healthz`, `/readyz`, `/metrics` only).
    pub probe: Option<SocketAddr>,
    pub trust_domain: Option<TrustDomain>,
    pub lease_ttl: Duration,
    /// Messages per second a cluster may send on its stream (bursts up to 4x).
    pub rate_limit: u32,
    /// Federation root rotation: started by `meshfed ca rotate start --ca <state-dir>/ca` or,
    /// with a period, by the federator itself; a new root signs only after the lead and once
    /// every member holds the bundle carrying it.
    pub ca_rotation: meshfed_identity::live_ca::RotationPolicy,
    /// Lifetime of cluster certificates (and of the federator's own is `server_cert_ttl`).
    pub cluster_cert_ttl: time::Duration,
    pub server_cert_ttl: time::Duration,
    /// The most services one cluster may export; an export delta that would go beyond is
    /// refused, and what was acknowledged before stays.
    pub max_services_per_cluster: usize,
    /// Where the federation's state lives.
    pub store: StoreChoice,
    /// With etcd: how often the replicas' addresses are read to tell members of a change.
    pub replica_poll: Duration,
    /// TLS handshakes the gRPC listener runs at once; more connections wait in the accept
    /// queue (a restart's reconnect storm is served in order instead of timing out together).
    pub max_handshakes: usize,
    /// How often tombstones every member has read are dropped (`None`: never).
    pub tombstone_compaction: Option<Duration>,
}

/// Where the federation's state lives.
#[derive(Debug, Clone, Default)]
pub enum StoreChoice {
    /// sled in `<state-dir>/store`, tokens and the CA in the state directory: one federator.
    #[default]
    Sled,
    /// etcd: the store, join tokens, the federation CA and the replicas' addresses, shared by
    /// every replica (the state directory keeps a working copy of the CA).
    Etcd(meshfed_store::etcd::EtcdConfig),
}

impl FederatorConfig {
    pub fn new(state_dir: PathBuf, listen: SocketAddr) -> Self {
        FederatorConfig {
            state_dir,
            listen,
            advertise: Vec::new(),
            admin: None,
            probe: None,
            trust_domain: None,
            lease_ttl: Duration::from_secs(30),
            rate_limit: 200,
            ca_rotation: meshfed_identity::live_ca::RotationPolicy {
                period: None,
                publish_lead: time::Duration::minutes(20),
            },
            cluster_cert_ttl: crate::ca::CLUSTER_CERT_TTL,
            server_cert_ttl: crate::ca::SERVER_CERT_TTL,
            store: StoreChoice::Sled,
            max_services_per_cluster: validate::DEFAULT_MAX_SERVICES_PER_CLUSTER,
            replica_poll: Duration::from_secs(10),
            max_handshakes: meshfed_net::MAX_CONCURRENT_HANDSHAKES,
            tombstone_compaction: Some(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Default)]
struct Live {
    last_heartbeat: Option<Instant>,
    connected: bool,
    generation: u64,
    stale: bool,
    /// Highest import revision the cluster acknowledged, or was brought to without a delta.
    acked: u64,
    /// The federation bundle sequence the cluster says it holds.
    federation_sequence: u64,
    /// Connected (to this replica, or with etcd to any) as the last peer states said.
    told_connected: bool,
}

struct Hub {
    cfg: FederatorConfig,
    advertise: Vec<String>,
    store: Store,
    tokens: TokenStore,
    ca: FederationCa,
    /// With etcd: the federation CA as the replicas share it.
    shared_ca: Option<crate::shared::SharedCa>,
    metrics: FederationMetrics,
    head: watch::Sender<u64>,
    peers: watch::Sender<u64>,
    live: Mutex<HashMap<String, Live>>,
    started: Instant,
    join_lock: tokio::sync::Mutex<()>,
    /// The process's tasks: Sync streams end at its drain signal.
    tasks: Tasks,
    /// The federation bundle as members are sent it (changes with a federation root rotation).
    fed_bundle: watch::Sender<proto::FederationBundle>,
    /// Where members reach the federation ([`Hub::endpoints`]), as last read: members are sent
    /// it on connect and when it changes (a replica added or moved).
    addresses: watch::Sender<Vec<String>>,
}

/// The message that carries the federation CA's bundle and its signing root.
fn federation_bundle_message(ca: &FederationCa) -> anyhow::Result<proto::FederationBundle> {
    Ok(proto::FederationBundle {
        bundle_json: ca.bundle().to_json()?,
        signer_root_sha256: ca.root_fingerprint(),
    })
}

/// How an eviction reads in the status and in the evicted cluster's error.
fn eviction_text(e: &meshfed_store::Eviction) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(e.at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    if e.reason.is_empty() {
        format!("evicted by {} at {at}", e.by)
    } else {
        format!("evicted by {} at {at}: {}", e.by, e.reason)
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// When the newest root of a member's stored bundle expires, if the bundle parses.
fn bundle_not_after(r: &ClusterRecord) -> Option<time::OffsetDateTime> {
    let td = TrustDomain::new(&r.trust_domain).ok()?;
    TrustBundle::from_json(td, &r.bundle_json, "stored bundle")
        .ok()?
        .x509_authorities
        .iter()
        .filter_map(|c| trust::svid::validity(c).ok().map(|v| v.1))
        .max()
}

/// Aborts a task when dropped (a session's reader ends with the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves when the store's view stops following its backend (never with sled).
async fn store_lost_signal(rx: &mut watch::Receiver<meshfed_store::Version>) {
    // The guard is dropped here: the future stays Send.
    let _ = rx.wait_for(|v| !v.following).await.map(|_| ());
}

/// Why a replica that lost its store ends or refuses a stream (UNAVAILABLE: the agent
/// reconnects, to another replica).
fn store_lost(why: &str) -> Status {
    Status::unavailable(format!(
        "this federator replica cannot reach its store ({why}); connect to another replica"
    ))
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::UnknownCluster(c) => {
            Status::permission_denied(format!("cluster {c} is not a member of this federation"))
        }
        StoreError::Left(c) => proto::reason::left(format!(
            "cluster {c} has left the federation; join again with a new token"
        )),
        e @ StoreError::Etcd { .. } => {
            tracing::warn!(error = %e, "state store unreachable: nothing was written");
            Status::unavailable(e.to_string())
        }
        e @ StoreError::EtcdLimit(_) => Status::resource_exhausted(e.to_string()),
        other => {
            tracing::error!(error = %other, "state store failure");
            Status::internal(other.to_string())
        }
    }
}

impl Hub {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump_head(&self, rev: u64) {
        self.metrics.head_revision.set(rev as i64);
        // Forwarded from the store's view too (another replica's write): tell once.
        self.head.send_if_modified(|h| {
            let moved = rev > *h;
            *h = (*h).max(rev);
            moved
        });
    }

    /// Where members reach the federation: this federator's addresses, and with replicas
    /// every replica's (as registered in etcd), sorted.
    fn endpoints(&self) -> Vec<String> {
        self.replica_list().unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the replicas' addresses; naming this replica's only");
            self.advertise.clone()
        })
    }

    fn replica_list(&self) -> anyhow::Result<Vec<String>> {
        let mut all = match self.store.records(crate::shared::REPLICAS) {
            None => self.advertise.clone(),
            Some(r) => crate::shared::replica_addresses(&r, &self.advertise)?,
        };
        all.sort();
        Ok(all)
    }

    fn bump_peers(&self) {
        self.peers.send_modify(|v| *v += 1);
    }

    /// The cluster a request's client certificate names, if it is a current member.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let certs = req
            .extensions()
            .get::<meshfed_net::PeerInfo>()
            .and_then(|i| i.certs.clone())
            .ok_or_else(|| {
                Status::unauthenticated("this call needs a cluster certificate (mTLS); join first")
            })?;
        let id = trust::tls::peer_id(Some(certs.as_slice())).ok_or_else(|| {
            Status::unauthenticated("the client certificate carries no SPIFFE ID")
        })?;
        let cluster = cluster_of(&id, &self.ca.trust_domain).ok_or_else(|| {
            self.metrics
                .refused
                .with_label_values(&["", "permission_denied"])
                .inc();
            Status::permission_denied(format!("{id} is not a cluster identity of this federation"))
        })?;
        match self.store.cluster(&cluster).map_err(store_status)? {
            None => Err(store_status(StoreError::UnknownCluster(cluster))),
            Some(r) if r.left => Err(store_status(StoreError::Left(cluster))),
            Some(r) => {
                // Only the certificates issued in the current membership authenticate it: one
                // of an earlier join is refused, however soon the re-join came. (A record from
                // before certificates were listed falls back to comparing issue times, which
                // X.509 keeps to the second; issued certificates are back-dated by `BACKDATE`.)
                let stale = if r.certs.is_empty() {
                    let issued = trust::svid::validity(&certs[0])
                        .map(|(nb, _)| nb + trust::ca::BACKDATE)
                        .map_err(|e| Status::unauthenticated(e.to_string()))?;
                    issued.unix_timestamp() < r.joined_at
                } else {
                    let fp = trust::keys::fingerprint(&certs[0]);
                    !r.certs.iter().any(|c| c.fingerprint == fp)
                };
                if stale {
                    self.metrics
                        .refused
                        .with_label_values(&[&cluster, "stale_certificate"])
                        .inc();
                    return Err(Status::permission_denied(format!(
                        "this certificate of cluster {cluster} predates its current membership; use the identity of the latest join"
                    )));
                }
                Ok(cluster)
            }
        }
    }

    fn lease_of(&self, id: &str, live: &HashMap<String, Live>) -> (bool, Option<u64>, bool) {
        let ttl = self.cfg.lease_ttl;
        let (connected, age, stale) = match live.get(id) {
            Some(l) => match l.last_heartbeat {
                Some(t) => {
                    let age = t.elapsed();
                    (l.connected, Some(age.as_millis() as u64), age > ttl)
                }
                None => (l.connected, None, self.started.elapsed() > ttl),
            },
            None => (false, None, self.started.elapsed() > ttl),
        };
        // Replicas: a cluster whose liveness key exists is connected to one of them and
        // heartbeating, whichever holds its stream; its absence is the shared stale verdict
        // (this replica's own recent heartbeat still counts while the key is being written).
        match self.store.shared_live(id) {
            Some(true) => (true, age, false),
            _ => (connected, age, stale),
        }
    }

    fn peer_states(&self, exclude: &str) -> Result<PeerStates, Status> {
        let records = self.store.clusters().map_err(store_status)?;
        let live = self.live();
        let mut out = PeerStates::default();
        for r in records {
            if r.id == exclude {
                continue;
            }
            if r.left {
                out.removed.push(r.id.clone());
                continue;
            }
            let (connected, age, stale) = self.lease_of(&r.id, &live);
            out.peers.push(PeerCluster {
                facts: Some(r.facts()),
                lease: if stale {
                    proto::LeaseState::Stale
                } else {
                    proto::LeaseState::Fresh
                } as i32,
                last_heartbeat_age_ms: age.unwrap_or(0),
                heartbeat_seen: age.is_some(),
                connected,
            });
        }
        Ok(out)
    }

    fn heartbeat(&self, cluster: &str) {
        self.store.heartbeat(cluster);
        let mut live = self.live();
        let l = live.entry(cluster.to_string()).or_default();
        l.last_heartbeat = Some(Instant::now());
        if l.stale {
            l.stale = false;
            drop(live);
            self.bump_peers();
        }
    }

    /// Marks a new stream for `cluster`; a previous stream of the same cluster is superseded.
    fn connect(&self, cluster: &str) -> u64 {
        self.store.heartbeat(cluster);
        let mut live = self.live();
        let l = live.entry(cluster.to_string()).or_default();
        l.generation += 1;
        l.connected = true;
        l.last_heartbeat = Some(Instant::now());
        l.stale = false;
        let g = l.generation;
        drop(live);
        self.bump_peers();
        g
    }

    fn disconnect(&self, cluster: &str, generation: u64) {
        let mut live = self.live();
        if let Some(l) = live.get_mut(cluster) {
            if l.generation == generation {
                l.connected = false;
                drop(live);
                self.bump_peers();
            }
        }
    }

    /// The lowest import revision any member has acknowledged (this replica's sessions know
    /// their clusters' latest; others' are as stored, which is never higher): tombstones at or
    /// below it have been read by everyone who may ever ask. `None` without members.
    fn compaction_horizon(&self) -> Option<u64> {
        let records = self.store.clusters().ok()?;
        let live = self.live();
        records
            .iter()
            .filter(|r| !r.left)
            .map(|r| {
                live.get(&r.id)
                    .map(|l| l.acked)
                    .unwrap_or(0)
                    .max(r.imports_acked_revision)
            })
            .min()
    }

    /// Drops the tombstones every member has read, a batch per transaction.
    fn compact_tombstones(&self) -> Result<usize, StoreError> {
        const BATCH: usize = 1000;
        let Some(horizon) = self.compaction_horizon() else {
            return Ok(0);
        };
        let mut total = 0;
        loop {
            let n = self.store.compact_tombstones(horizon, BATCH)?;
            total += n;
            if n < BATCH {
                break;
            }
        }
        self.metrics.tombstones_compacted.inc_by(total as u64);
        self.metrics.tombstones.set(self.store.tombstones() as i64);
        if total > 0 {
            tracing::info!(
                compacted = total,
                horizon,
                floor = self.store.floor(),
                "dropped tombstones every member has read"
            );
        }
        Ok(total)
    }

    /// The cluster left or was evicted at `rev`: its streams here end (they see its record
    /// left when the peers change), and members hear of it.
    fn removed(&self, cluster: &str, rev: u64) {
        self.bump_head(rev);
        if let Some(l) = self.live().get_mut(cluster) {
            l.connected = false;
            l.generation += 1;
        }
        self.bump_peers();
    }

    fn generation(&self, cluster: &str) -> u64 {
        self.live().get(cluster).map(|l| l.generation).unwrap_or(0)
    }

    /// Re-evaluates leases; tells every stream when one turned stale.
    fn tick_leases(&self) {
        let records = match self.store.clusters() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read cluster records");
                return;
            }
        };
        let mut changed = false;
        let (mut connected, mut stale, mut fresh) = (0, 0, 0);
        {
            let mut live = self.live();
            for r in records.iter().filter(|r| !r.left) {
                let (is_connected, _, is_stale) = self.lease_of(&r.id, &live);
                let l = live.entry(r.id.clone()).or_default();
                // With replicas, a cluster connects and leaves on another one: members hear
                // of it from here.
                if l.told_connected != is_connected {
                    l.told_connected = is_connected;
                    changed = true;
                }
                if l.stale != is_stale {
                    l.stale = is_stale;
                    changed = true;
                    if is_stale {
                        tracing::warn!(cluster = %r.id, ttl_ms = self.cfg.lease_ttl.as_millis() as u64, "lease expired: cluster is stale");
                    } else {
                        tracing::info!(cluster = %r.id, "lease renewed: cluster is fresh");
                    }
                }
                connected += i64::from(is_connected);
                if is_stale {
                    stale += 1;
                } else {
                    fresh += 1;
                }
            }
        }
        self.metrics
            .clusters
            .with_label_values(&["connected"])
            .set(connected);
        self.metrics
            .clusters
            .with_label_values(&["stale"])
            .set(stale);
        self.metrics
            .clusters
            .with_label_values(&["fresh"])
            .set(fresh);
        if changed {
            self.bump_peers();
        }
    }

    /// Which members hold `cluster`'s stored bundle: those whose acknowledged import revision
    /// reached the revision at which the bundle (or the record carrying it) last changed.
    /// Members (not left) that have not acknowledged federation bundle `sequence`.
    fn federation_bundle_pending(&self, sequence: u64) -> Result<Vec<String>, StoreError> {
        let records = self.store.clusters()?;
        let live = self.live();
        Ok(records
            .iter()
            .filter(|r| !r.left)
            .filter(|r| {
                live.get(&r.id)
                    .is_none_or(|l| l.federation_sequence < sequence)
            })
            .map(|r| r.id.clone())
            .collect())
    }

    fn note_federation_sequence(&self, cluster: &str, sequence: u64) {
        if let Some(l) = self.live().get_mut(cluster) {
            l.federation_sequence = l.federation_sequence.max(sequence);
        }
    }

    fn bundle_distribution(
        &self,
        cluster: &str,
    ) -> Result<proto::BundleDistributionResponse, Status> {
        let records = self.store.clusters().map_err(store_status)?;
        let me = records
            .iter()
            .find(|r| r.id == cluster)
            .ok_or_else(|| store_status(StoreError::UnknownCluster(cluster.to_string())))?;
        let live = self.live();
        let mut out = proto::BundleDistributionResponse {
            stored_sequence: me.bundle_sequence,
            ..Default::default()
        };
        for r in records.iter().filter(|r| r.id != cluster && !r.left) {
            let acked = live
                .get(&r.id)
                .map(|l| l.acked)
                .unwrap_or(0)
                .max(r.imports_acked_revision);
            if acked >= me.revision {
                out.holders.push(r.id.clone());
            } else {
                out.pending.push(r.id.clone());
            }
        }
        Ok(out)
    }

    fn report(&self) -> Result<FederationReport, Status> {
        let head = self.store.head();
        let records = self.store.clusters().map_err(store_status)?;
        let counts = self.store.counts();
        let live = self.live();
        let mut clusters = Vec::new();
        for r in &records {
            let (connected, age, stale) = self.lease_of(&r.id, &live);
            let acked = live
                .get(&r.id)
                .map(|l| l.acked)
                .unwrap_or(0)
                .max(r.imports_acked_revision);
            let exports = counts.exports.get(&r.id).copied().unwrap_or(0);
            let imports_from = counts.imports_from.get(&r.id).cloned().unwrap_or_default();
            let bundle_not_after = bundle_not_after(r).and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
            clusters.push(ClusterReport {
                cluster: r.id.clone(),
                network: r.network.clone(),
                trust_domain: r.trust_domain.clone(),
                locality: validate::locality_string(&r.facts().locality),
                gateways: r.gateways.clone(),
                connected: connected && !r.left,
                lease: if r.left {
                    "left".into()
                } else if stale {
                    "stale".into()
                } else {
                    "fresh".into()
                },
                last_heartbeat_age_ms: age,
                exports,
                imports: imports_from.values().sum(),
                imports_from,
                exports_acked_version: r.exports_acked_version,
                imports_acked_revision: acked,
                import_lag: head.saturating_sub(acked),
                bundle_sequence: r.bundle_sequence,
                bundle_not_after,
                conflicts: self.store.conflicts_of(&r.id).map_err(store_status)?,
                evicted: r.evicted.as_ref().map(eviction_text),
            });
        }
        Ok(FederationReport {
            kind: "federator".into(),
            federation_trust_domain: self.ca.trust_domain.to_string(),
            federation_ca_not_after: self
                .ca
                .not_after()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            federation_ca: self.ca.live.report(time::OffsetDateTime::now_utc()),
            head_revision: head,
            lease_ttl_ms: self.cfg.lease_ttl.as_millis() as u64,
            clusters,
            store: crate::status::StoreReport {
                backend: self.store.backend_name().to_string(),
                unavailable: self.store.unavailable(),
                tombstones: counts.tombstones,
                floor: self.store.floor(),
            },
        })
    }
}

/// A running federator.
pub struct Federator {
    hub: Arc<Hub>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    tasks: Tasks,
}

impl std::fmt::Debug for Federator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federator")
            .field("grpc_addr", &self.grpc_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

/// Where the federator tells token makers it can be reached.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

impl Federator {
    /// Opens the state, binds the listeners and starts serving.
    pub async fn start(cfg: FederatorConfig) -> anyhow::Result<Federator> {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
        let (store, tokens, mut ca, shared_ca) = match &cfg.store {
            StoreChoice::Sled => {
                let ca = FederationCa::open_or_create(&cfg.state_dir, cfg.trust_domain.as_ref())?;
                let store = Store::open(&cfg.state_dir.join("store")).with_context(|| {
                    format!("cannot open the state store in {}", cfg.state_dir.display())
                })?;
                (store, TokenStore::new(&cfg.state_dir), ca, None)
            }
            StoreChoice::Etcd(e) => {
                let (e, dir, td) = (e.clone(), cfg.state_dir.clone(), cfg.trust_domain.clone());
                // Connecting and loading block: off the runtime's workers.
                tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let store = Store::open_etcd(&e).with_context(|| {
                        format!(
                            "cannot open the state store in etcd ({}, prefix {})",
                            e.endpoints.join(","),
                            e.prefix
                        )
                    })?;
                    let records = |part: &str| {
                        store
                            .records(part)
                            .context("the etcd store has no records handle")
                    };
                    let tokens = crate::shared::tokens(records("tokens")?);
                    let (ca, shared) =
                        crate::shared::SharedCa::open(records("ca")?, &dir, td.as_ref())?;
                    Ok((store, tokens, ca, Some(shared)))
                })
                .await??
            }
        };
        ca.cluster_ttl = cfg.cluster_cert_ttl;
        ca.server_ttl = cfg.server_cert_ttl;
        let fed_bundle = watch::Sender::new(federation_bundle_message(&ca)?);
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let grpc_addr = listener.local_addr()?;
        let advertise = if cfg.advertise.is_empty() {
            vec![grpc_addr.to_string()]
        } else {
            cfg.advertise.clone()
        };
        trust::files::write_atomic(
            &cfg.state_dir.join(ENDPOINTS_FILE),
            &serde_json::to_vec(&advertise)?,
            trust::files::PUBLIC_MODE,
        )?;
        let head = store.head();
        if let Some(r) = store.records(crate::shared::REPLICAS) {
            // Every replica's addresses, for join tokens made from etcd.
            let (id, addrs) = (advertise.join(","), serde_json::to_vec(&advertise)?);
            tokio::task::spawn_blocking(move || r.put(&id, addrs)).await??;
        }
        let hub = Arc::new(Hub {
            advertise,
            tokens,
            shared_ca,
            metrics: FederationMetrics::new(),
            head: watch::Sender::new(head),
            peers: watch::Sender::new(0),
            live: Mutex::new(HashMap::new()),
            started: Instant::now(),
            join_lock: tokio::sync::Mutex::new(()),
            tasks: Tasks::new(),
            fed_bundle,
            addresses: watch::Sender::new(Vec::new()),
            store,
            ca,
            cfg,
        });
        hub.metrics.head_revision.set(head as i64);
        hub.addresses.send_replace(hub.endpoints());
        hub.store.start_liveness(hub.cfg.lease_ttl);
        if let Some(every) = hub.cfg.tombstone_compaction {
            let compact_hub = hub.clone();
            hub.tasks.spawn("tombstone compaction", async move {
                let mut t = tokio::time::interval(every);
                t.tick().await;
                loop {
                    t.tick().await;
                    let h = compact_hub.clone();
                    if let Ok(Err(e)) =
                        tokio::task::spawn_blocking(move || h.compact_tombstones()).await
                    {
                        tracing::warn!(error = %e, "tombstone compaction failed; trying again later");
                    }
                }
            });
        }
        if hub.store.records(crate::shared::REPLICAS).is_some() {
            let poll_hub = hub.clone();
            hub.tasks.spawn("replica addresses", async move {
                let mut t = tokio::time::interval(poll_hub.cfg.replica_poll);
                loop {
                    t.tick().await;
                    let h = poll_hub.clone();
                    // Unreadable now: members keep what they were told.
                    if let Ok(Ok(now)) = tokio::task::spawn_blocking(move || h.replica_list()).await {
                        poll_hub.addresses.send_if_modified(|held| {
                            let changed = *held != now;
                            if changed {
                                tracing::info!(addresses = ?now, "the replicas' addresses changed; telling members");
                                *held = now;
                            }
                            changed
                        });
                    }
                }
            });
        }
        // The store's view moves with every replica's writes: sessions hear of them as of
        // this replica's own.
        let mut store_version = hub.store.subscribe();
        let forward_hub = hub.clone();
        hub.tasks.spawn("store changes", async move {
            let mut seen = *store_version.borrow_and_update();
            while store_version.changed().await.is_ok() {
                let v = *store_version.borrow_and_update();
                forward_hub.bump_head(v.head);
                if v.clusters != seen.clusters {
                    forward_hub.bump_peers();
                }
                seen = v;
            }
        });
        // Weak: the check stays registered after a drain and must not keep the store open.
        let ready_hub = Arc::downgrade(&hub);
        hub.tasks.readiness_check(
            "state store",
            Arc::new(
                move || match ready_hub.upgrade().and_then(|h| h.store.unavailable()) {
                    Some(why) => Err(why),
                    None => Ok(()),
                },
            ),
        );

        // TLS: the federator's own certificate, renewed in the background; clients verified
        // against the federation bundle when they present a certificate (Join needs none).
        let serving = Managed::new("federator serving", Some(hub.ca.server_svid()?))?;
        let resolver = serving.resolver();
        let mut fed_set = BundleSet::new();
        fed_set.insert(hub.ca.bundle())?;
        let fed_trust = TrustStore::new(fed_set);
        let verifier = SpiffeVerifier::new(
            fed_trust.clone(),
            Authorizer::trust_domain(hub.ca.trust_domain.clone()),
        );
        let tls = trust::tls::server_config_optional_client(resolver.clone(), verifier)?;
        let mut tls = tls;
        tls.alpn_protocols = vec![meshfed_net::ALPN_H2.to_vec()];
        let incoming = meshfed_net::tls_incoming_limited(
            listener,
            tls,
            meshfed_net::Handshakes::new(hub.cfg.max_handshakes),
        );

        let tasks = hub.tasks.clone();
        let svc = raw_sync::FederationService::new(Service { hub: hub.clone() });
        let admin_svc = admin::AdminService::new(hub.clone()).server();
        tasks.spawn_server("federation gRPC server", |drain| async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(admin_svc)
                .serve_with_incoming_shutdown(incoming, drain.drained_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        let ticker_hub = hub.clone();
        tasks.spawn("lease ticker", async move {
            let every = (ticker_hub.cfg.lease_ttl / 10)
                .clamp(Duration::from_millis(50), Duration::from_millis(500));
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                ticker_hub.tick_leases();
            }
        });
        tasks.spawn(
            "federation CA",
            federation_ca(hub.clone(), fed_trust, serving.clone()),
        );
        let renew_hub = hub.clone();
        tasks.spawn(
            "federator certificate",
            serving.run(
                issue_fn(move || {
                    let hub = renew_hub.clone();
                    async move { hub.ca.server_svid() }
                }),
                Backoff::default(),
            ),
        );
        let admin_addr = match hub.cfg.admin {
            Some(addr) => {
                let report_hub = hub.clone();
                let metrics_hub = hub.clone();
                let status: meshfed_net::admin::StatusFn = Arc::new(move || {
                    report_hub
                        .report()
                        .map(|r| serde_json::to_value(r).unwrap_or_default())
                        .map_err(|s| s.message().to_string())
                });
                Some(
                    meshfed_net::admin::serve(
                        &tasks,
                        AdminConfig {
                            addr,
                            // Per-cluster gauges are set from the status at each scrape.
                            registry: Arc::new(move || {
                                if let Ok(r) = metrics_hub.report() {
                                    metrics_hub.metrics.observe(&r);
                                }
                                metrics_hub.metrics.registry.clone()
                            }),
                            status: status.clone(),
                            extra: None,
                            ui: Some((crate::FEDERATION_PAGE, status)),
                            probe: hub.cfg.probe,
                        },
                    )
                    .await?
                    .admin,
                )
            }
            None => None,
        };
        tracing::info!(%grpc_addr, admin = ?admin_addr, trust_domain = %hub.ca.trust_domain, head, "federator serving");
        Ok(Federator {
            hub,
            grpc_addr,
            admin_addr,
            tasks,
        })
    }

    pub fn report(&self) -> anyhow::Result<FederationReport> {
        self.hub
            .report()
            .map_err(|s| anyhow::anyhow!(s.message().to_string()))
    }

    /// The Prometheus text of the federator's metrics.
    /// Drops the tombstones every member has read now (the federator does so every
    /// `tombstone_compaction`); returns how many went.
    pub fn compact_tombstones(&self) -> anyhow::Result<usize> {
        Ok(self.hub.compact_tombstones()?)
    }

    pub fn metrics_text(&self) -> String {
        meshfed_net::metrics::render(&self.hub.metrics.registry)
    }

    /// The federation bundle as members are sent it, as it changes (a root rotation).
    pub fn federation_bundle(&self) -> watch::Receiver<proto::FederationBundle> {
        self.hub.fed_bundle.subscribe()
    }

    /// The store's changes, and whether its view follows the backend.
    pub fn store_version(&self) -> watch::Receiver<meshfed_store::Version> {
        self.hub.store.subscribe()
    }

    /// The join tokens this federator accepts (in its state directory, or in etcd).
    pub fn tokens(&self) -> &TokenStore {
        &self.hub.tokens
    }

    /// The federation CA's root fingerprint (what join tokens pin).
    pub fn ca_fingerprint(&self) -> String {
        self.hub.ca.root_fingerprint()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.hub.ca.trust_domain
    }

    pub fn advertise(&self) -> &[String] {
        &self.hub.advertise
    }

    /// The federator's tasks (health, readiness, drain).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Drains: stops accepting, ends every Sync stream with UNAVAILABLE (agents reconnect,
    /// to another replica where there is one), records what each cluster acknowledged, and
    /// waits up to `deadline` for it all.
    pub async fn drain(self, deadline: Duration) -> DrainReport {
        self.tasks.drain(deadline).await
    }

    /// Stops serving (a drain with a short deadline).
    pub async fn stop(self) {
        self.drain(Duration::from_secs(2)).await;
    }
}

/// Steps the federation CA (every 500 ms): picks up a rotation begun by
/// `meshfed ca rotate start --ca <state-dir>/ca` (or starts one on the period), lets a pending
/// root sign only once its lead has passed and every member acknowledged the bundle carrying
/// it, and drops a retiring root after the last certificate it signed expired. A new bundle
/// goes to the TLS verifier of member certificates and to every member's stream; a new signer
/// renews the federator's own certificate at once.
async fn federation_ca(hub: Arc<Hub>, fed_trust: TrustStore, serving: Arc<Managed>) {
    let mut t = tokio::time::interval(Duration::from_millis(500));
    loop {
        t.tick().await;
        let now = time::OffsetDateTime::now_utc();
        let hub2 = hub.clone();
        let stepped = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            // Replicas: another's change first (the live CA reloads it in this step).
            if let Some(shared) = &hub2.shared_ca {
                shared.pull(Some(&hub2.ca.trust_domain))?;
            }
            let due = hub2.ca.live.activation_due(now);
            let pending = match due {
                Some(seq) => hub2.federation_bundle_pending(seq)?,
                None => Vec::new(),
            };
            hub2.ca.live.set_waiting_for(pending.clone());
            let may = due.is_some() && pending.is_empty();
            let Some(shared) = &hub2.shared_ca else {
                return hub2.ca.live.step(now, &hub2.cfg.ca_rotation, may);
            };
            // Other replicas sign too and record their issuances only in their own copy: a
            // root that stops signing stays published as long as a certificate they issued
            // under it may live.
            let others = hub2.cfg.cluster_cert_ttl.max(hub2.cfg.server_cert_ttl);
            let stepped = hub2
                .ca
                .live
                .step_with(now, &hub2.cfg.ca_rotation, may, others)?;
            if stepped.began || stepped.bundle_changed || stepped.signer_changed {
                shared.push(&hub2.ca.trust_domain)?;
            }
            // The live CA now signs from what was taken or offered.
            shared.applied();
            Ok(stepped)
        })
        .await;
        let stepped = match stepped {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "federation CA step failed");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "federation CA step panicked");
                continue;
            }
        };
        if stepped.bundle_changed {
            if let Err(e) = fed_trust.update(hub.ca.bundle()) {
                tracing::error!(error = %e, "cannot install the new federation bundle in the member verifier");
            }
            tracing::info!(sequence = ?hub.ca.bundle().sequence, roots = hub.ca.bundle().x509_authorities.len(), "federation bundle changed; sending it to every member");
        }
        if stepped.signer_changed {
            tracing::info!(root = %hub.ca.root_fingerprint(), "a new federation root signs; members renew onto it");
            serving.renew_soon();
        }
        if stepped.bundle_changed || stepped.signer_changed {
            match federation_bundle_message(&hub.ca) {
                Ok(m) => {
                    hub.fed_bundle.send_replace(m);
                }
                Err(e) => tracing::error!(error = %e, "cannot encode the federation bundle"),
            }
        }
    }
}

struct Service {
    hub: Arc<Hub>,
}

/// A token bucket: `rate` per second, up to `burst`.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Bucket {
            tokens: rate * 4.0,
            rate,
            burst: rate * 4.0,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

type Tx = mpsc::Sender<Result<FederatorMessageWire, Status>>;

async fn send(tx: &Tx, kind: Out) -> Result<(), Status> {
    tx.send(Ok(FederatorMessageWire { kind: Some(kind) }))
        .await
        .map_err(|_| Status::cancelled("the cluster went away"))
}

struct Session {
    hub: Arc<Hub>,
    cluster: String,
    trust_domain: String,
    tx: Tx,
    /// Last import revision completely sent (not necessarily acknowledged).
    sent: u64,
    /// Where reading the change index continues.
    cursor: Cursor,
    /// Highest revision the cluster has acknowledged.
    acked: u64,
    /// Revision of the last delta actually sent (later revisions touched only this cluster).
    last_delta: u64,
    bucket: Bucket,
    /// An observer stream: imports, peers and bundles only (see `Hello.observer`).
    observer: bool,
}

impl Session {
    fn refuse(&self, reason: &str, status: Status) -> Status {
        self.hub
            .metrics
            .refused
            .with_label_values(&[&self.cluster, reason])
            .inc();
        tracing::warn!(cluster = %self.cluster, reason, message = %status.message(), "refused");
        status
    }

    /// Sends the next chunk (at most [`IMPORT_CHUNK`] services) of the changes after the
    /// cursor; `false` once there is nothing more. The stream's loop calls it only when the
    /// outbound queue has room, so reading the cluster's messages (heartbeats, ACKs) never
    /// waits behind a slow importer's backlog.
    async fn push_imports_step(&mut self) -> Result<bool, Status> {
        {
            // Tombstones this stream had not read yet were compacted away (an observer's stream
            // is not counted in the horizon, nor a stream still reading a long history): it may
            // miss a removal, so it starts again from scratch.
            let floor = self.hub.store.floor();
            let at = match &self.cursor {
                Cursor::AfterRevision(r) => *r,
                Cursor::AfterKey(r, ..) => r.saturating_sub(1),
            };
            if self.sent > 0 && at < floor {
                tracing::warn!(cluster = %self.cluster, at, floor, "tombstones this stream had not read were compacted; resyncing it from scratch");
                send(
                    &self.tx,
                    Out::Imports(ImportDeltaWire {
                        revision: 0,
                        full: true,
                        ..Default::default()
                    }),
                )
                .await?;
                self.sent = 0;
                self.acked = 0;
                self.cursor = Cursor::AfterRevision(0);
            }
            let (changes, next, complete) = self
                .hub
                .store
                .changes_since(&self.cluster, &self.cursor, IMPORT_CHUNK)
                .map_err(store_status)?;
            let moved = next != self.cursor;
            if !moved && changes.is_empty() {
                return Ok(false);
            }
            let records = self.hub.store.clusters().map_err(store_status)?;
            let mut delta = ImportDeltaWire {
                revision: complete,
                ..Default::default()
            };
            let mut peers_changed = false;
            for r in records.iter().filter(|r| {
                r.id != self.cluster && r.revision > self.sent && r.revision <= complete
            }) {
                peers_changed = true;
                if r.left || r.bundle_json.is_empty() {
                    delta.bundle_removals.push(r.trust_domain.clone());
                } else {
                    delta.bundles.push(PeerBundle {
                        trust_domain: r.trust_domain.clone(),
                        source_cluster: r.id.clone(),
                        bundle_json: r.bundle_json.clone(),
                    });
                }
            }
            for c in changes {
                match c {
                    // The stored bytes, as they are: no decoding, no encoding per importer.
                    Change::Upsert(r) => delta.upserts.push(ImportedServiceWire {
                        source_cluster: r.cluster,
                        export: r.encoded,
                    }),
                    Change::Remove {
                        cluster,
                        namespace,
                        name,
                    } => delta.removals.push(ImportKey {
                        source_cluster: cluster,
                        namespace,
                        name,
                    }),
                }
            }
            let empty = delta.upserts.is_empty()
                && delta.removals.is_empty()
                && delta.bundles.is_empty()
                && delta.bundle_removals.is_empty();
            if empty {
                // Only this cluster's own changes happened: no push. If nothing is outstanding,
                // the cluster is simply up to date.
                if self.acked == self.sent && complete > self.acked {
                    self.acked = complete;
                    self.note_acked(complete);
                }
            } else {
                self.hub
                    .metrics
                    .import_deltas
                    .with_label_values(&[&self.cluster])
                    .inc();
                self.last_delta = complete;
                send(&self.tx, Out::Imports(delta)).await?;
            }
            self.sent = self.sent.max(complete);
            self.cursor = next;
            if peers_changed {
                let p = self.hub.peer_states(&self.cluster)?;
                send(&self.tx, Out::Peers(p)).await?;
            }
            Ok(true)
        }
    }

    /// Records an acknowledged import revision in memory; it is written to the store when the
    /// stream ends (it only feeds status: losing it costs nothing, and a write per ACK made
    /// sled's memory grow with every acknowledgement).
    fn note_acked(&self, rev: u64) {
        if self.observer {
            // The cluster's lag is its primary stream's.
            return;
        }
        if let Some(l) = self.hub.live().get_mut(&self.cluster) {
            l.acked = l.acked.max(rev);
        }
    }

    async fn handle(&mut self, msg: ClusterMessage) -> Result<(), Status> {
        if !self.bucket.take() {
            return Err(self.refuse(
                "rate_limited",
                Status::resource_exhausted(format!(
                    "cluster {} sent more than {} messages per second; slow down",
                    self.cluster, self.hub.cfg.rate_limit
                )),
            ));
        }
        let kind = msg.kind.ok_or_else(|| {
            self.refuse(
                "invalid_argument",
                Status::invalid_argument("message has no kind"),
            )
        })?;
        let label = match &kind {
            In::Hello(_) => "hello",
            In::Exports(_) => "exports",
            In::Bundle(_) => "bundle",
            In::Heartbeat(_) => "heartbeat",
            In::ImportAck(_) => "import_ack",
            In::FederationBundleAck(_) => "federation_bundle_ack",
        };
        self.hub
            .metrics
            .messages
            .with_label_values(&[&self.cluster, label])
            .inc();
        if self.observer && !matches!(kind, In::ImportAck(_) | In::Hello(_)) {
            return Err(self.refuse(
                "observer",
                Status::failed_precondition(format!(
                    "an observer stream of cluster {} may only acknowledge imports, not send {label}",
                    self.cluster
                )),
            ));
        }
        match kind {
            In::Hello(_) => Err(self.refuse(
                "invalid_argument",
                Status::invalid_argument("hello may only be the first message of a stream"),
            )),
            In::Heartbeat(_) => Ok(()),
            In::FederationBundleAck(a) => {
                if a.error.is_empty() {
                    self.hub.note_federation_sequence(&self.cluster, a.sequence);
                } else {
                    tracing::warn!(cluster = %self.cluster, sequence = a.sequence, error = %a.error, "cluster refused the federation bundle");
                }
                Ok(())
            }
            In::ImportAck(a) => {
                if !a.error.is_empty() {
                    self.hub
                        .metrics
                        .import_nacks
                        .with_label_values(&[&self.cluster])
                        .inc();
                    tracing::warn!(cluster = %self.cluster, revision = a.revision, error = %a.error, "cluster refused an import delta (NACK)");
                    // Later deltas build on the refused one: end the stream; the cluster
                    // resumes from the revision it stored when it reconnects.
                    return Err(Status::aborted(format!(
                        "import delta {} was refused ({}); reconnect to resume from the last stored revision",
                        a.revision, a.error
                    )));
                } else if a.revision <= self.sent && a.revision > self.acked {
                    // Acknowledging the last delta sent also covers the revisions after it
                    // that carried nothing for this cluster.
                    let upto = if a.revision == self.last_delta {
                        self.sent
                    } else {
                        a.revision
                    };
                    self.acked = upto;
                    self.note_acked(upto);
                }
                Ok(())
            }
            In::Bundle(b) => {
                let td = TrustDomain::new(&self.trust_domain)
                    .map_err(|e| Status::internal(e.to_string()))?;
                validate::check_bundle_size("bundle.bundle_json", &b.bundle_json)
                    .map_err(|m| self.refuse("bundle_size", Status::resource_exhausted(m)))?;
                let bundle = TrustBundle::from_json(td, &b.bundle_json, "bundle.bundle_json")
                    .map_err(|e| {
                        self.refuse("invalid_argument", Status::invalid_argument(e.to_string()))
                    })?;
                if bundle.x509_authorities.is_empty() {
                    return Err(self.refuse(
                        "invalid_argument",
                        Status::invalid_argument(
                            "bundle.bundle_json: holds no x509-svid authority",
                        ),
                    ));
                }
                if let Some(rev) = tokio::task::block_in_place(|| {
                    self.hub.store.set_bundle(
                        &self.cluster,
                        &b.bundle_json,
                        bundle.sequence.unwrap_or(0),
                    )
                })
                .map_err(|e| match e {
                    StoreError::SequenceRegression { .. } => self.refuse(
                        "bundle_sequence_regression",
                        Status::failed_precondition(e.to_string()),
                    ),
                    other => store_status(other),
                })? {
                    tracing::info!(cluster = %self.cluster, sequence = ?bundle.sequence, "trust bundle updated");
                    self.hub.bump_head(rev);
                }
                Ok(())
            }
            In::Exports(delta) => {
                if delta.upserts.len() > MAX_SERVICES_PER_DELTA
                    || delta.removals.len() > MAX_SERVICES_PER_DELTA
                {
                    return Err(self.refuse(
                        "invalid_argument",
                        Status::invalid_argument(format!(
                            "exports: more than {MAX_SERVICES_PER_DELTA} services in one delta"
                        )),
                    ));
                }
                for (i, e) in delta.upserts.iter().enumerate() {
                    validate::check_export(e, &format!("exports.upserts[{i}]")).map_err(|m| {
                        self.refuse("invalid_argument", Status::invalid_argument(m))
                    })?;
                }
                for (i, k) in delta.removals.iter().enumerate() {
                    validate::check_label(
                        &format!("exports.removals[{i}].namespace"),
                        &k.namespace,
                    )
                    .and_then(|_| {
                        validate::check_label(&format!("exports.removals[{i}].name"), &k.name)
                    })
                    .map_err(|m| self.refuse("invalid_argument", Status::invalid_argument(m)))?;
                }
                let started = Instant::now();
                let max = self.hub.cfg.max_services_per_cluster;
                let result = tokio::task::block_in_place(|| {
                    self.hub
                        .store
                        .apply_exports_within(&self.cluster, &delta, max)
                });
                self.hub
                    .metrics
                    .export_apply_seconds
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(applied) => {
                        send(
                            &self.tx,
                            Out::ExportAck(proto::ExportAck {
                                version: delta.version,
                                error: String::new(),
                                conflicts: applied.conflicts,
                            }),
                        )
                        .await?;
                        if let Some(rev) = applied.revision {
                            self.hub.bump_head(rev);
                        }
                        Ok(())
                    }
                    Err(e @ StoreError::VersionGap { .. }) => {
                        send(
                            &self.tx,
                            Out::ExportAck(proto::ExportAck {
                                version: delta.version,
                                error: e.to_string(),
                                conflicts: Vec::new(),
                            }),
                        )
                        .await
                    }
                    Err(e @ StoreError::TooManyServices { .. }) => {
                        Err(self
                            .refuse("services_limit", Status::resource_exhausted(e.to_string())))
                    }
                    Err(e) => Err(store_status(e)),
                }
            }
        }
    }
}

/// What the Sync route sends (see `raw_sync`).
type WireStream = ReceiverStream<Result<FederatorMessageWire, Status>>;

/// The generated trait's Sync (reached only when the generated server is mounted without the
/// raw route): the same stream, each message decoded as `FederatorMessage`.
type SyncStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<FederatorMessage, Status>> + Send>>;

impl Service {
    /// A Sync stream: the session runs in a task of its own and sends on the returned stream.
    async fn open_sync(
        &self,
        req: Request<Streaming<ClusterMessage>>,
    ) -> Result<Response<WireStream>, Status> {
        let cluster = self.hub.authenticate(&req)?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        // Tracked, so the drain waits for the acknowledged revision to be recorded.
        self.hub.tasks.track(async move {
            let mut connected_as = None;
            let result = Service::run_session(
                hub.clone(),
                cluster.clone(),
                inbound,
                tx.clone(),
                &mut connected_as,
            )
            .await;
            if let Err(status) = result {
                if status.code() != tonic::Code::Cancelled {
                    tracing::info!(%cluster, code = ?status.code(), message = %status.message(), "sync stream ended");
                }
                let _ = tx.send(Err(status)).await;
            }
            // Only the stream that connected as this generation may mark the cluster gone.
            if let Some(g) = connected_as {
                let acked = hub.live().get(&cluster).map(|l| l.acked).unwrap_or(0);
                if acked > 0 {
                    if let Err(e) =
                        tokio::task::block_in_place(|| hub.store.set_imports_acked(&cluster, acked))
                    {
                        tracing::warn!(error = %e, "cannot record the acknowledged import revision");
                    }
                }
                hub.disconnect(&cluster, g);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn run_session(
        hub: Arc<Hub>,
        cluster: String,
        mut inbound: Streaming<ClusterMessage>,
        tx: Tx,
        connected_as: &mut Option<u64>,
    ) -> Result<(), Status> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(In::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a Sync stream must be hello",
                ))
            }
        };
        let facts = hello
            .facts
            .ok_or_else(|| Status::invalid_argument("hello.facts is missing"))?;
        if facts.cluster_id != cluster {
            hub.metrics
                .refused
                .with_label_values(&[&cluster, "permission_denied"])
                .inc();
            tracing::warn!(%cluster, claimed = %facts.cluster_id, "cluster tried to speak for another cluster");
            return Err(Status::permission_denied(format!(
                "this stream is authenticated as cluster {cluster}; it may not speak for cluster {}",
                facts.cluster_id
            )));
        }
        validate::check_facts(&facts, "hello.facts").map_err(Status::invalid_argument)?;
        // A replica that cannot reach etcd would acknowledge nothing: the cluster goes to
        // another replica (its next connection starts from a random one).
        if let Some(why) = hub.store.unavailable() {
            return Err(store_lost(&why));
        }
        let mut store_rx = hub.store.subscribe();
        let rec: ClusterRecord = hub
            .store
            .cluster(&cluster)
            .map_err(store_status)?
            .ok_or_else(|| store_status(StoreError::UnknownCluster(cluster.clone())))?;
        if rec.trust_domain != facts.trust_domain {
            hub.metrics
                .refused
                .with_label_values(&[&cluster, "permission_denied"])
                .inc();
            return Err(Status::permission_denied(format!(
                "cluster {cluster} joined with trust domain {}; it may not claim {}",
                rec.trust_domain, facts.trust_domain
            )));
        }
        let observer = hello.observer;
        // The membership this stream belongs to: a join of the cluster (again) makes a new one.
        let membership = (rec.joined_at, rec.cert_fingerprint.clone());
        // An observer neither changes the cluster's facts nor replaces its stream.
        let generation = if observer {
            None
        } else {
            if let Some(rev) =
                tokio::task::block_in_place(|| hub.store.update_facts(&cluster, &facts))
                    .map_err(store_status)?
            {
                hub.bump_head(rev);
            }
            let generation = hub.connect(&cluster);
            hub.note_federation_sequence(&cluster, hello.federation_bundle_sequence);
            *connected_as = Some(generation);
            Some(generation)
        };
        let mut head_rx = hub.head.subscribe();
        let mut peers_rx = hub.peers.subscribe();
        let mut fed_rx = hub.fed_bundle.subscribe();
        let mut endpoints_rx = hub.addresses.subscribe();
        send(
            &tx,
            Out::Welcome(Welcome {
                exports_acked_version: rec.exports_acked_version,
                lease_ttl_ms: hub.cfg.lease_ttl.as_millis() as u64,
                heartbeat_interval_ms: (hub.cfg.lease_ttl / 3).as_millis() as u64,
            }),
        )
        .await?;
        let mut s = Session {
            trust_domain: rec.trust_domain.clone(),
            hub: hub.clone(),
            cluster: cluster.clone(),
            tx: tx.clone(),
            sent: hello.imports_applied_revision,
            cursor: Cursor::AfterRevision(hello.imports_applied_revision),
            acked: hello.imports_applied_revision,
            last_delta: hello.imports_applied_revision,
            bucket: Bucket::new(hub.cfg.rate_limit),
            observer,
        };
        let floor = hub.store.floor();
        if s.sent > hub.store.head() || (s.sent > 0 && s.sent < floor) {
            if s.sent > floor {
                tracing::warn!(%cluster, applied = s.sent, head = hub.store.head(), "cluster is ahead of this federator's store; resyncing it from scratch");
            } else {
                // Removals it has not read may have been compacted away.
                tracing::warn!(%cluster, applied = s.sent, floor, "cluster applied less than the compacted tombstones' floor; resyncing it from scratch");
            }
            send(
                &tx,
                Out::Imports(ImportDeltaWire {
                    revision: 0,
                    full: true,
                    ..Default::default()
                }),
            )
            .await?;
            s.sent = 0;
            s.acked = 0;
            s.cursor = Cursor::AfterRevision(0);
        }
        let fed = fed_rx.borrow_and_update().clone();
        send(&tx, Out::FederationBundle(fed)).await?;
        // Read afresh: a replica that started before the others registered has not polled
        // them yet, and a shorter list would replace the member's longer one.
        if let Ok(now) = tokio::task::block_in_place(|| hub.replica_list()) {
            hub.addresses.send_if_modified(|held| {
                let changed = *held != now;
                *held = now;
                changed
            });
        }
        let addresses = endpoints_rx.borrow_and_update().clone();
        send(&tx, Out::Endpoints(proto::FederatorEndpoints { addresses })).await?;
        send(&tx, Out::Peers(hub.peer_states(&cluster)?)).await?;
        tracing::info!(%cluster, applied = hello.imports_applied_revision, observer, "cluster connected");
        let drain = hub.tasks.signal();
        // What this stream owes the cluster goes out only when the outbound queue has room
        // for it, between reading the cluster's messages: a cluster slow to take a large
        // backlog still has its heartbeats read, and does not turn stale. Imports may be
        // outstanding from the start and after every head change; the federation bundle and
        // the peer states after their changes (sent as they are then, the latest).
        // The cluster's messages are read by a task of their own, which renews its lease as
        // each arrives: a session busy with a slow write (its export waiting behind other
        // clusters' writes in a join storm) still hears the cluster's heartbeats.
        let (to_session, mut from_cluster) = mpsc::channel::<Result<ClusterMessage, Status>>(64);
        let reader_hub = hub.clone();
        let reader_cluster = cluster.clone();
        let reader = tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if !observer {
                            reader_hub.heartbeat(&reader_cluster);
                        }
                        if to_session.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = to_session.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let mut imports_pending = true;
        let (mut fed_pending, mut peers_pending, mut endpoints_pending) = (false, false, false);
        let room = tx.clone();
        loop {
            tokio::select! {
                // Two slots: an import chunk may be followed by the peer states.
                r = room.reserve_many(2), if imports_pending || fed_pending || peers_pending || endpoints_pending => {
                    // The slots are released and taken again by the sends (this loop is the
                    // only sender on the stream).
                    drop(r.map_err(|_| Status::cancelled("the cluster went away"))?);
                    if fed_pending {
                        fed_pending = false;
                        let fed = fed_rx.borrow_and_update().clone();
                        send(&tx, Out::FederationBundle(fed)).await?;
                    } else if endpoints_pending {
                        endpoints_pending = false;
                        let addresses = endpoints_rx.borrow_and_update().clone();
                        send(&tx, Out::Endpoints(proto::FederatorEndpoints { addresses })).await?;
                    } else if peers_pending {
                        peers_pending = false;
                        send(&tx, Out::Peers(hub.peer_states(&cluster)?)).await?;
                    } else {
                        imports_pending = s.push_imports_step().await?;
                    }
                }
                _ = drain.drained() => {
                    return Err(Status::unavailable("the federator is shutting down"));
                }
                _ = store_lost_signal(&mut store_rx) => {
                    let why = hub.store.unavailable().unwrap_or_else(|| "etcd: lost".into());
                    tracing::warn!(%cluster, reason = %why, "ending the stream: this replica lost its store");
                    return Err(store_lost(&why));
                }
                msg = from_cluster.recv() => match msg {
                    Some(Ok(m)) => s.handle(m).await?,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                r = head_rx.changed() => {
                    if r.is_err() { return Ok(()); }
                    imports_pending = true;
                }
                r = fed_rx.changed(), if !fed_pending => {
                    if r.is_err() { return Ok(()); }
                    fed_pending = true;
                }
                r = endpoints_rx.changed(), if !endpoints_pending => {
                    if r.is_err() { return Ok(()); }
                    endpoints_pending = true;
                }
                r = peers_rx.changed() => {
                    if r.is_err() { return Ok(()); }
                    // Leaving also bumps the generation: say that it left, not that it was
                    // replaced, so its agent stops at once.
                    let now = hub.store.cluster(&cluster).ok().flatten();
                    if now.as_ref().is_none_or(|r| r.left) {
                        return Err(proto::reason::left(match now.as_ref().and_then(|r| r.evicted.as_ref()) {
                            Some(e) => format!("cluster {cluster} was {}; it may join again only with a new token", eviction_text(e)),
                            None => format!("cluster {cluster} has left the federation"),
                        }));
                    }
                    if generation.is_some_and(|g| hub.generation(&cluster) != g) {
                        return Err(proto::reason::superseded("a newer stream of this cluster replaced this one"));
                    }
                    // An observer has no generation that a join would bump: it ends when the
                    // cluster's membership is no longer the one it opened under.
                    if observer && now.is_some_and(|r| (r.joined_at, r.cert_fingerprint) != membership) {
                        return Err(Status::aborted("the cluster joined again; this observer stream belongs to its earlier membership"));
                    }
                    peers_pending = true;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Federation for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let hub = &self.hub;
        let r = req.into_inner();
        let refuse = |reason: &str, s: Status| {
            hub.metrics.joins.with_label_values(&[reason]).inc();
            tracing::warn!(reason, message = %s.message(), "join refused");
            s
        };
        let claims = Claims::decode(&r.token)
            .map_err(|e| refuse("malformed_token", Status::unauthenticated(e.to_string())))?;
        let facts = r.facts.ok_or_else(|| {
            refuse(
                "invalid_argument",
                Status::invalid_argument("facts is missing"),
            )
        })?;
        validate::check_facts(&facts, "facts")
            .map_err(|m| refuse("invalid_argument", Status::invalid_argument(m)))?;
        let td = TrustDomain::new(&facts.trust_domain)
            .map_err(|e| refuse("invalid_argument", Status::invalid_argument(e.to_string())))?;
        validate::check_bundle_size("trust_bundle_json", &r.trust_bundle_json)
            .map_err(|m| refuse("bundle_size", Status::resource_exhausted(m)))?;
        let bundle = TrustBundle::from_json(td.clone(), &r.trust_bundle_json, "trust_bundle_json")
            .map_err(|e| refuse("invalid_argument", Status::invalid_argument(e.to_string())))?;
        if bundle.x509_authorities.is_empty() {
            return Err(refuse(
                "invalid_argument",
                Status::invalid_argument("trust_bundle_json: holds no x509-svid authority"),
            ));
        }
        if td == hub.ca.trust_domain {
            return Err(refuse(
                "invalid_argument",
                Status::invalid_argument(
                    "facts.trust_domain: a cluster may not use the federation's own trust domain",
                ),
            ));
        }
        let _guard = hub.join_lock.lock().await;
        let now = now_unix();
        let token = hub
            .tokens
            .check(&claims, &facts.cluster_id, now)
            .map_err(|e| {
                let status = match &e {
                    TokenError::Store(_) => Status::internal(e.to_string()),
                    TokenError::Malformed(..) => Status::unauthenticated(e.to_string()),
                    _ => Status::permission_denied(e.to_string()),
                };
                refuse("token", status)
            })?;
        for other in hub.store.clusters().map_err(store_status)? {
            if !other.left
                && other.id != facts.cluster_id
                && other.trust_domain == facts.trust_domain
            {
                return Err(refuse(
                    "trust_domain_taken",
                    Status::already_exists(format!(
                        "trust domain {} already belongs to cluster {}",
                        other.trust_domain, other.id
                    )),
                ));
            }
        }
        let issued =
            tokio::task::block_in_place(|| hub.ca.sign_cluster(&r.csr_der, &facts.cluster_id))
                .map_err(|e| {
                    refuse(
                        "invalid_argument",
                        Status::invalid_argument(format!("csr_der: {e:#}")),
                    )
                })?;
        hub.tokens
            .consume(token, &facts.cluster_id, now)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut rec = ClusterRecord {
            id: facts.cluster_id.clone(),
            network: String::new(),
            trust_domain: String::new(),
            region: String::new(),
            zone: String::new(),
            subzone: String::new(),
            gateways: Vec::new(),
            joined_at: now,
            cert_fingerprint: trust::keys::fingerprint(&issued.chain[0]),
            bundle_json: r.trust_bundle_json.clone(),
            bundle_sequence: bundle.sequence.unwrap_or(0),
            revision: 0,
            exports_acked_version: 0,
            imports_acked_revision: 0,
            left: false,
            certs: vec![MemberCert {
                fingerprint: trust::keys::fingerprint(&issued.chain[0]),
                not_after: issued.not_after.unix_timestamp(),
            }],
            evicted: None,
        };
        rec.set_facts(&facts);
        let rev = tokio::task::block_in_place(|| hub.store.join(rec)).map_err(store_status)?;
        if let Some(l) = hub.live().get_mut(&facts.cluster_id) {
            // Streams of an earlier membership are superseded; generations only grow.
            l.generation += 1;
            l.connected = false;
            l.acked = 0;
        }
        hub.bump_peers();
        hub.bump_head(rev);
        hub.metrics.joins.with_label_values(&["ok"]).inc();
        tracing::info!(cluster = %facts.cluster_id, trust_domain = %facts.trust_domain, network = %facts.network, "cluster joined");
        Ok(Response::new(JoinResponse {
            cert_chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
            federation_bundle_json: hub
                .ca
                .bundle()
                .to_json()
                .map_err(|e| Status::internal(e.to_string()))?,
            federation_trust_domain: hub.ca.trust_domain.to_string(),
            federator_endpoints: tokio::task::block_in_place(|| hub.endpoints()),
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<Streaming<ClusterMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        use prost::Message;
        use tokio_stream::StreamExt;
        let stream = self.open_sync(req).await?.into_inner().map(|m| {
            m.and_then(|m| {
                FederatorMessage::decode(m.encode_to_vec().as_slice())
                    .map_err(|e| Status::internal(e.to_string()))
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let cluster = self.hub.authenticate(&req)?;
        let rev =
            tokio::task::block_in_place(|| self.hub.store.leave(&cluster)).map_err(store_status)?;
        self.hub.removed(&cluster, rev);
        tracing::info!(%cluster, revision = rev, "cluster left the federation");
        Ok(Response::new(LeaveResponse { revision: rev }))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let cluster = self.hub.authenticate(&req)?;
        let r = req.into_inner();
        // Replicas: a renewal (typically onto a root that just began to sign, announced by
        // another replica) is signed only with the federation CA etcd holds now; a replica
        // still taking it answers UNAVAILABLE and the agent retries.
        if let Some(shared) = &self.hub.shared_ca {
            match tokio::task::block_in_place(|| shared.current()) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Status::unavailable(
                        "this replica is taking a newer federation CA from etcd; retry",
                    ))
                }
                Err(e) => return Err(Status::unavailable(format!("{e:#}"))),
            }
        }
        let issued = tokio::task::block_in_place(|| self.hub.ca.sign_cluster(&r.csr_der, &cluster))
            .map_err(|e| Status::invalid_argument(format!("csr_der: {e:#}")))?;
        let cert = MemberCert {
            fingerprint: trust::keys::fingerprint(&issued.chain[0]),
            not_after: issued.not_after.unix_timestamp(),
        };
        tokio::task::block_in_place(|| self.hub.store.add_cert(&cluster, cert, now_unix()))
            .map_err(store_status)?;
        tracing::info!(%cluster, "renewed cluster certificate");
        Ok(Response::new(RenewResponse {
            cert_chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
        }))
    }

    async fn bundle_distribution(
        &self,
        req: Request<proto::BundleDistributionRequest>,
    ) -> Result<Response<proto::BundleDistributionResponse>, Status> {
        let cluster = self.hub.authenticate(&req)?;
        let out = tokio::task::block_in_place(|| self.hub.bundle_distribution(&cluster))?;
        Ok(Response::new(out))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.hub.authenticate(&req)?;
        let rep = self.hub.report()?;
        let clusters = rep
            .clusters
            .iter()
            .map(|c| {
                let rec = self.hub.store.cluster(&c.cluster).ok().flatten();
                ClusterStatus {
                    facts: rec.as_ref().map(|r| r.facts()),
                    connected: c.connected,
                    lease: match c.lease.as_str() {
                        "stale" => proto::LeaseState::Stale,
                        "fresh" => proto::LeaseState::Fresh,
                        _ => proto::LeaseState::Unspecified,
                    } as i32,
                    last_heartbeat_age_ms: c.last_heartbeat_age_ms.unwrap_or(0),
                    exports: c.exports,
                    imports: c.imports,
                    exports_acked_version: c.exports_acked_version,
                    imports_acked_revision: c.imports_acked_revision,
                    import_lag: c.import_lag,
                    bundle_sequence: c.bundle_sequence,
                    bundle_not_after: rec
                        .as_ref()
                        .and_then(bundle_not_after)
                        .map(|t| t.unix_timestamp())
                        .unwrap_or(0),
                    conflicts: c.conflicts.clone(),
                    left: c.lease == "left",
                }
            })
            .collect();
        Ok(Response::new(StatusResponse {
            revision: rep.head_revision,
            clusters,
            federation_trust_domain: rep.federation_trust_domain,
            federation_ca_not_after: self.hub.ca.not_after().unix_timestamp(),
            federation_bundle_sequence: self.hub.ca.bundle().sequence.unwrap_or(0),
        }))
    }
}
