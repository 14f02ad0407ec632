//! The federator's state: durable in sled (one machine) or etcd (replicas), served from
//! memory. Every mutation is planned from the in-memory view under one write lock and committed
//! in one transaction (sled: across trees, flushed to disk; etcd: one transaction that compares
//! the head key, see [`etcd`]) before the caller acknowledges anything. Then the in-memory view
//! (with its revision and per-service indexes) is updated: by the writer with sled, by the
//! prefix's watch with etcd, so a replica's view also follows the others' writes. Reads never
//! touch the backend; memory is the size of the data.
//!
//! sled trees:
//! - `meta`: `schema` (u32), `revision` (u64, the head revision)
//! - `clusters`: cluster id -> [`ClusterRecord`] (JSON)
//! - `exports`: `<cluster>\0<ns>/<name>` -> [`ExportRecord`] (binary, see `encode`)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use prost::Message;
use proto::{ClusterFacts, ExportDelta, ServiceExport};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

pub mod etcd;

use meshfed_model::validate::{export_conflict, service_key, MAX_CHUNK_BYTES};

/// 2: export records are protobuf (prost); 1: a hand-written layout, migrated on open.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// etcd could not be reached or refused a request: nothing was written.
    #[error("state store (etcd) {what}: {message}")]
    Etcd { what: String, message: String },
    /// A write larger than etcd is configured to take.
    #[error("state store (etcd): {0}")]
    EtcdLimit(String),
    #[error("state store: record {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("state store in {dir} has schema version {found}; this meshfed reads version {SCHEMA_VERSION}")]
    Schema { dir: String, found: u32 },
    #[error("unknown cluster {0}")]
    UnknownCluster(String),
    #[error("cluster {0} has left the federation")]
    Left(String),
    #[error("bundle.sequence: {got} is lower than the stored bundle's {stored}; a trust bundle's sequence never goes back")]
    SequenceRegression { got: u64, stored: u64 },
    #[error("export version {got} does not follow the stored version {stored}; send a full set")]
    VersionGap { got: u64, stored: u64 },
    #[error("exports: cluster {cluster} would export {after} services; a cluster may export at most {max} (the federator's --max-services-per-cluster)")]
    TooManyServices {
        cluster: String,
        after: usize,
        max: usize,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What the federator knows about one member cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterRecord {
    pub id: String,
    pub network: String,
    pub trust_domain: String,
    pub region: String,
    pub zone: String,
    pub subzone: String,
    pub gateways: Vec<String>,
    pub joined_at: i64,
    pub cert_fingerprint: String,
    pub bundle_json: String,
    pub bundle_sequence: u64,
    /// Revision at which the bundle, facts or membership last changed.
    pub revision: u64,
    pub exports_acked_version: u64,
    pub imports_acked_revision: u64,
    pub left: bool,
    /// The certificates issued in the current membership (at the join and at each renewal)
    /// that have not expired. Only these authenticate the cluster; a re-join starts a new list,
    /// so a certificate of an earlier membership is refused however soon the re-join came.
    #[serde(default)]
    pub certs: Vec<MemberCert>,
    /// Set when an operator removed the cluster (`meshfed federator evict`): who and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<Eviction>,
}

/// An operator's removal of a member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Eviction {
    /// The operator's admin name.
    pub by: String,
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

/// A certificate the federation issued to a member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberCert {
    /// SHA-256 (hex) of the leaf certificate's DER.
    pub fingerprint: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl ClusterRecord {
    pub fn facts(&self) -> ClusterFacts {
        ClusterFacts {
            cluster_id: self.id.clone(),
            network: self.network.clone(),
            trust_domain: self.trust_domain.clone(),
            locality: Some(proto::Locality {
                region: self.region.clone(),
                zone: self.zone.clone(),
                subzone: self.subzone.clone(),
            }),
            gateways: self.gateways.clone(),
        }
    }

    pub fn set_facts(&mut self, f: &ClusterFacts) {
        self.network = f.network.clone();
        self.trust_domain = f.trust_domain.clone();
        let l = f.locality.clone().unwrap_or_default();
        self.region = l.region;
        self.zone = l.zone;
        self.subzone = l.subzone;
        self.gateways = f.gateways.clone();
    }
}

/// One cluster's export of one service, or its tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRecord {
    pub cluster: String,
    /// Revision of the export's creation: decides which export is the oldest in a conflict.
    pub created: u64,
    pub modified: u64,
    pub deleted: bool,
    /// Why this export is excluded (a conflict with an older export), if it is.
    pub conflict: Option<String>,
    /// Every cluster that could ever have imported this service under this key (`*` for all):
    /// only they are told when it changes out of their view.
    pub audience: BTreeSet<String>,
    pub export: ServiceExport,
}

/// Adds who may see `e` to an audience.
fn widen(audience: &mut BTreeSet<String>, e: &ServiceExport) {
    if e.export_to.is_empty() {
        audience.insert("*".to_string());
    } else {
        audience.extend(e.export_to.iter().cloned());
    }
}

fn could_have_seen(audience: &BTreeSet<String>, importer: &str) -> bool {
    audience.contains("*") || audience.contains(importer)
}

/// How an export record is stored (schema 2): a protobuf message, encoded and decoded by
/// prost. The cluster is the first part of the key.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredExport {
    #[prost(uint64, tag = "1")]
    created: u64,
    #[prost(uint64, tag = "2")]
    modified: u64,
    #[prost(bool, tag = "3")]
    deleted: bool,
    /// Empty when there is no conflict.
    #[prost(string, tag = "4")]
    conflict: String,
    #[prost(string, repeated, tag = "5")]
    audience: Vec<String>,
    #[prost(message, optional, tag = "6")]
    export: Option<ServiceExport>,
}

fn corrupt(key: &[u8], reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

impl ExportRecord {
    fn encode(&self) -> Vec<u8> {
        StoredExport {
            created: self.created,
            modified: self.modified,
            deleted: self.deleted,
            conflict: self.conflict.clone().unwrap_or_default(),
            audience: self.audience.iter().cloned().collect(),
            export: Some(self.export.clone()),
        }
        .encode_to_vec()
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<Self> {
        let r = StoredExport::decode(v).map_err(|e| corrupt(key, &e.to_string()))?;
        let cluster = key.split(|b| *b == 0).next().unwrap_or_default();
        Ok(ExportRecord {
            cluster: String::from_utf8_lossy(cluster).into_owned(),
            created: r.created,
            modified: r.modified,
            deleted: r.deleted,
            conflict: (!r.conflict.is_empty()).then_some(r.conflict),
            audience: r.audience.into_iter().collect(),
            export: r.export.ok_or_else(|| corrupt(key, "no export"))?,
        })
    }
}

/// Schema 1 stored export records in a hand-written binary layout; a store of that schema is
/// rewritten to schema 2 when it is opened, in one transaction. This is the only reader left.
mod schema1 {
    use super::{corrupt, ExportRecord, Result, ServiceExport};
    use prost::Message;

    pub(super) fn decode(key: &[u8], v: &[u8]) -> Result<ExportRecord> {
        let corrupt = |reason: &str| corrupt(key, reason);
        if v.len() < 19 {
            return Err(corrupt("too short"));
        }
        let created = u64::from_be_bytes(v[0..8].try_into().map_err(|_| corrupt("created"))?);
        let modified = u64::from_be_bytes(v[8..16].try_into().map_err(|_| corrupt("modified"))?);
        let deleted = v[16] != 0;
        let clen = u16::from_be_bytes([v[17], v[18]]) as usize;
        let conflict = v
            .get(19..19 + clen)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| corrupt("conflict text"))?;
        let at = 19 + clen;
        let alen_bytes: [u8; 4] = v
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("audience length"))?;
        let alen = u32::from_be_bytes(alen_bytes) as usize;
        let audience_text = v
            .get(at + 4..at + 4 + alen)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| corrupt("audience"))?;
        let export =
            ServiceExport::decode(&v[at + 4 + alen..]).map_err(|e| corrupt(&e.to_string()))?;
        let cluster = key.split(|b| *b == 0).next().unwrap_or_default();
        Ok(ExportRecord {
            cluster: String::from_utf8_lossy(cluster).into_owned(),
            created,
            modified,
            deleted,
            conflict: (!conflict.is_empty()).then(|| conflict.to_string()),
            audience: audience_text
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
            export,
        })
    }

    /// The schema 1 layout (tests write legacy stores with it).
    #[cfg(test)]
    pub(super) fn encode(r: &ExportRecord) -> Vec<u8> {
        let conflict = r.conflict.as_deref().unwrap_or("");
        let audience = r.audience.iter().cloned().collect::<Vec<_>>().join(",");
        let mut v = Vec::new();
        v.extend_from_slice(&r.created.to_be_bytes());
        v.extend_from_slice(&r.modified.to_be_bytes());
        v.push(u8::from(r.deleted));
        v.extend_from_slice(&(conflict.len() as u16).to_be_bytes());
        v.extend_from_slice(conflict.as_bytes());
        v.extend_from_slice(&(audience.len() as u32).to_be_bytes());
        v.extend_from_slice(audience.as_bytes());
        r.export.encode(&mut v).unwrap_or_default();
        v
    }
}

fn export_key(cluster: &str, skey: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(cluster.len() + 1 + skey.len());
    k.extend_from_slice(cluster.as_bytes());
    k.push(0);
    k.extend_from_slice(skey.as_bytes());
    k
}

/// The result of storing an export delta.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The new head revision, or `None` when nothing visible changed.
    pub revision: Option<u64>,
    /// Conflicts now standing against this cluster's exports.
    pub conflicts: Vec<String>,
}

/// A change an importer must apply.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert(Imported),
    Remove {
        cluster: String,
        namespace: String,
        name: String,
    },
}

/// A live export an importer may see, as the store holds it: the `ServiceExport` encoded once
/// and shared (cloning it is a reference count), sent to importers without decoding.
#[derive(Debug, Clone)]
pub struct Imported {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub encoded: bytes::Bytes,
}

impl Imported {
    /// The export, decoded (tests and tools; the federator sends `encoded` as it is).
    pub fn export(&self) -> ServiceExport {
        ServiceExport::decode(self.encoded.clone()).unwrap_or_default()
    }
}

/// An export as kept in memory: encoded once, shared by every importer's read.
struct Stored {
    cluster: String,
    created: u64,
    modified: u64,
    deleted: bool,
    conflict: Option<String>,
    audience: BTreeSet<String>,
    export_to: Vec<String>,
    namespace: String,
    name: String,
    encoded: bytes::Bytes,
    /// What decides a conflict (headless, ports), kept decoded: the conflict check of one
    /// cluster's export compares it with every other cluster's export of the service, which
    /// with a service exported by all of 255 clusters meant 254 decodes per service written.
    shape: ServiceExport,
}

/// The part of an export a conflict depends on ([`meshfed_model::validate::export_conflict`]).
fn shape_of(e: &ServiceExport) -> ServiceExport {
    ServiceExport {
        headless: e.headless,
        ports: e.ports.clone(),
        ..Default::default()
    }
}

impl Stored {
    fn record(&self) -> ExportRecord {
        ExportRecord {
            cluster: self.cluster.clone(),
            created: self.created,
            modified: self.modified,
            deleted: self.deleted,
            conflict: self.conflict.clone(),
            audience: self.audience.clone(),
            export: ServiceExport::decode(self.encoded.clone()).unwrap_or_default(),
        }
    }

    fn visible_to(&self, importer: &str) -> bool {
        !self.deleted
            && self.conflict.is_none()
            && meshfed_model::validate::visible_to(&self.export_to, importer)
    }
}

/// Counts for status (see [`Store::counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Cluster -> its live exports (conflicting ones included).
    pub exports: HashMap<String, u64>,
    /// Importer -> exporting cluster -> services it may import from it.
    pub imports_from: HashMap<String, BTreeMap<String, u64>>,
    /// Tombstones held.
    pub tombstones: u64,
}

/// Where an importer's reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// Every change up to and including this revision has been read.
    AfterRevision(u64),
    /// Reading stopped inside a revision, after this (revision, cluster, `ns/name`) entry.
    AfterKey(u64, String, String),
}

/// The in-memory view of the store.
#[derive(Default)]
struct Mem {
    head: u64,
    clusters: BTreeMap<String, ClusterRecord>,
    /// (cluster, `ns/name`) -> record, tombstones included.
    exports: BTreeMap<(String, String), Arc<Stored>>,
    /// (modified revision, cluster, `ns/name`): the change index importers read.
    by_rev: BTreeSet<(u64, String, String)>,
    /// `ns/name` -> clusters with a live export of it (for conflicts).
    by_service: HashMap<String, BTreeSet<String>>,
    /// etcd: the revision at which the head key last changed (what a write compares).
    head_mod: i64,
    /// Bumped at every cluster record change.
    cluster_changes: u64,
    /// etcd: the clusters whose liveness key exists (a replica forwards their heartbeats).
    live: BTreeSet<String>,
    /// The newest revision of a tombstone compacted away ([`Store::compact_tombstones`]): an
    /// importer that applied less than this may have missed a removal and is resynced.
    floor: u64,
}

impl Mem {
    /// A committed plan (sled: the process's own write is the only one).
    fn apply(&mut self, plan: Plan) {
        if let Some(h) = plan.head {
            self.head = h;
        }
        for c in plan.clusters {
            self.put_cluster(c);
        }
        for e in plan.exports {
            self.put_export(e);
        }
        for (cluster, skey) in plan.dropped {
            self.drop_export(&cluster, &skey);
        }
        if let Some(f) = plan.floor {
            self.floor = self.floor.max(f);
        }
    }

    /// A compacted tombstone leaves the view.
    fn drop_export(&mut self, cluster: &str, skey: &str) {
        let k = (cluster.to_string(), skey.to_string());
        if let Some(old) = self.exports.remove(&k) {
            self.by_rev.remove(&(old.modified, k.0, k.1));
        }
    }

    fn put_cluster(&mut self, c: ClusterRecord) {
        self.cluster_changes += 1;
        self.clusters.insert(c.id.clone(), c);
    }

    fn put_export(&mut self, r: ExportRecord) {
        let skey = service_key(&r.export.namespace, &r.export.name);
        let k = (r.cluster.clone(), skey.clone());
        if let Some(old) = self.exports.get(&k) {
            self.by_rev
                .remove(&(old.modified, k.0.clone(), k.1.clone()));
        }
        self.by_rev.insert((r.modified, k.0.clone(), k.1.clone()));
        let owners = self.by_service.entry(skey.clone()).or_default();
        if r.deleted {
            owners.remove(&r.cluster);
            if owners.is_empty() {
                self.by_service.remove(&skey);
            }
        } else {
            owners.insert(r.cluster.clone());
        }
        let stored = Stored {
            shape: shape_of(&r.export),
            encoded: r.export.encode_to_vec().into(),
            export_to: r.export.export_to.clone(),
            namespace: r.export.namespace.clone(),
            name: r.export.name.clone(),
            cluster: r.cluster,
            created: r.created,
            modified: r.modified,
            deleted: r.deleted,
            conflict: r.conflict,
            audience: r.audience,
        };
        self.exports.insert(k, Arc::new(stored));
    }
}

/// What one write stores, computed from the in-memory view under the write lock and committed
/// by the backend in one transaction.
#[derive(Debug, Default)]
struct Plan {
    /// The new head revision, when the write changes what importers or peers see.
    head: Option<u64>,
    clusters: Vec<ClusterRecord>,
    exports: Vec<ExportRecord>,
    /// Flushed to disk before the write returns (sled; etcd commits are always durable).
    flush: bool,
    /// Tombstones compacted away: (cluster, `ns/name`).
    dropped: Vec<(String, String)>,
    /// The new floor, with `dropped`.
    floor: Option<u64>,
}

/// Where the state lives.
enum Backend {
    Sled(SledDb),
    Etcd(Box<etcd::Etcd>),
}

/// The sled database of a one-machine federator.
struct SledDb {
    db: sled::Db,
    meta: sled::Tree,
    clusters: sled::Tree,
    exports: sled::Tree,
}

/// What the store has changed, for whoever serves it: the head revision (exports, membership,
/// facts, bundles) and a counter of cluster record changes. With etcd these also move when
/// another replica writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub head: u64,
    pub clusters: u64,
    /// The view follows the backend (always with sled; with etcd, while its watch runs; see
    /// [`Store::unavailable`] for why not).
    pub following: bool,
}

impl Default for Version {
    fn default() -> Self {
        Version {
            head: 0,
            clusters: 0,
            following: true,
        }
    }
}

pub struct Store {
    backend: Backend,
    /// etcd: heartbeats to record (see [`Store::start_liveness`]).
    heartbeats: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
    mem: Arc<RwLock<Mem>>,
    /// One writer at a time in this process: what a plan is computed from cannot change under
    /// it (with etcd, other replicas are kept out by the transaction's compare on the head).
    write: Mutex<()>,
    version: tokio::sync::watch::Sender<Version>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .field("head", &self.head())
            .finish()
    }
}

fn txn_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

/// Opens a sled database, waiting up to 5 s for a lock that a just-closed handle in this process
/// is still releasing (sled's background threads hold it briefly); a lock held by another
/// process is reported as such.
pub fn open_sled(config: sled::Config, dir: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut said = false;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                let holder = lock_holder(dir)
                    .map(|h| format!("process {h}"))
                    .unwrap_or_else(|| "another process".into());
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(format!(
                        "{} is in use by {holder} (is another meshfed running with this state directory?)",
                        dir.display()
                    )))));
                }
                if !std::mem::replace(&mut said, true) {
                    tracing::warn!(dir = %dir.display(), %holder, "the store is locked; waiting up to 5 s for it");
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Who holds the lock on the sled database in `dir`, from Linux's `/proc/locks` (the lock is on
/// its `db` file): `<pid> (<command line>)`, when it can be told.
pub fn lock_holder(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(dir.join("db")).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 12345 08:01:123456 0 EOF" (a "->" marks a waiter).
        let f: Vec<&str> = f.into_iter().filter(|x| *x != "->").collect();
        let node = f.get(5)?;
        (node.rsplit(':').next()?.parse::<u64>().ok()? == ino)
            .then(|| f.get(4).map(|p| p.to_string()))?
    })?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Some(if cmd.is_empty() {
        pid
    } else {
        format!("{pid} ({cmd})")
    })
}

/// Rewrites every export record of a schema 1 store in the schema 2 encoding and records
/// the new schema, in one transaction (a crash leaves the store as it was).
fn migrate_from_schema1(db: &sled::Db, meta: &sled::Tree) -> Result<()> {
    let exports = db.open_tree("exports")?;
    let mut rewritten = Vec::new();
    for kv in exports.iter() {
        let (k, v) = kv?;
        rewritten.push((k.to_vec(), schema1::decode(&k, &v)?.encode()));
    }
    (meta, &exports)
        .transaction(|(meta, exports)| {
            for (k, v) in &rewritten {
                exports.insert(k.as_slice(), v.as_slice())?;
            }
            meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(txn_err)?;
    db.flush()?;
    tracing::info!(
        records = rewritten.len(),
        "state store migrated from schema 1 to {SCHEMA_VERSION}"
    );
    Ok(())
}

impl Store {
    /// Opens (creating) the sled store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        // sled caches up to 1 GiB by default; reads are served from memory here.
        let db = open_sled(sled::Config::new().path(dir).cache_capacity(16 << 20), dir)?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4]));
                if found == 1 {
                    migrate_from_schema1(&db, &meta)?;
                } else if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        dir: dir.display().to_string(),
                        found,
                    });
                }
            }
        }
        let clusters = db.open_tree("clusters")?;
        let exports = db.open_tree("exports")?;
        let read_u64 = |key: &str| -> Result<u64> {
            Ok(meta
                .get(key)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0))
        };
        let mut mem = Mem {
            head: read_u64("revision")?,
            floor: read_u64("floor")?,
            ..Default::default()
        };
        for kv in clusters.iter() {
            let (k, v) = kv?;
            let rec: ClusterRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: e.to_string(),
                })?;
            mem.clusters.insert(rec.id.clone(), rec);
        }
        for kv in exports.iter() {
            let (k, v) = kv?;
            mem.put_export(ExportRecord::decode(&k, &v)?);
        }
        let version = tokio::sync::watch::Sender::new(Version {
            head: mem.head,
            ..Default::default()
        });
        Ok(Store {
            backend: Backend::Sled(SledDb {
                db,
                meta,
                clusters,
                exports,
            }),
            mem: Arc::new(RwLock::new(mem)),
            write: Mutex::new(()),
            version,
            heartbeats: Default::default(),
        })
    }

    /// Connects to etcd and loads everything under the configured prefix; this replica's view
    /// then follows the prefix (its own writes and every other replica's) through a watch.
    pub fn open_etcd(cfg: &etcd::EtcdConfig) -> Result<Self> {
        let mem = Arc::new(RwLock::new(Mem::default()));
        let version = tokio::sync::watch::Sender::new(Version::default());
        let backend = etcd::Etcd::open(cfg, mem.clone(), version.clone())?;
        Ok(Store {
            backend: Backend::Etcd(Box::new(backend)),
            mem,
            write: Mutex::new(()),
            version,
            heartbeats: Default::default(),
        })
    }

    /// `sled` or `etcd`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sled(_) => "sled",
            Backend::Etcd(_) => "etcd",
        }
    }

    /// Why the store cannot take writes now (etcd unreachable, its watch broken), or `None`.
    pub fn unavailable(&self) -> Option<String> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Etcd(e) => e.unavailable(),
        }
    }

    /// The records of `part` in the same etcd (`None` with sled: those parts keep files in the
    /// state directory).
    pub fn records(&self, part: &str) -> Option<etcd::Records> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Etcd(e) => Some(etcd::Records::new(e.conn().clone(), part)),
        }
    }

    /// With etcd: starts recording the heartbeats this replica receives (see
    /// [`heartbeat`](Self::heartbeat)) as liveness keys with a lease of `ttl`. Nothing with
    /// sled: one federator's own clock decides.
    pub fn start_liveness(&self, ttl: std::time::Duration) {
        if let Backend::Etcd(e) = &self.backend {
            let _ = self
                .heartbeats
                .get_or_init(|| etcd::start_liveness(e.conn(), ttl));
        }
    }

    /// A heartbeat of `cluster` reached this replica (recorded in the background, at most
    /// four times per TTL; never blocks).
    pub fn heartbeat(&self, cluster: &str) {
        if let Some(tx) = self.heartbeats.get() {
            let _ = tx.send(cluster.to_string());
        }
    }

    /// With etcd: whether `cluster`'s liveness key exists (some replica received its heartbeat
    /// within the TTL), the verdict every replica shares. `None` with sled.
    pub fn shared_live(&self, cluster: &str) -> Option<bool> {
        match self.backend {
            Backend::Sled(_) => None,
            Backend::Etcd(_) => Some(self.read().live.contains(cluster)),
        }
    }

    /// Follows what the store changed (see [`Version`]).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Version> {
        self.version.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Mem> {
        self.mem.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits a plan computed under the write lock from the view as it was at `basis` (its
    /// head revision and the head key's etcd revision, read before planning began). `Ok(false)`:
    /// another replica wrote since (etcd); the view now includes its write and the caller
    /// computes the plan again.
    fn commit(&self, plan: Plan, basis: (i64, u64)) -> Result<bool> {
        if plan.head.is_none()
            && plan.clusters.is_empty()
            && plan.exports.is_empty()
            && plan.dropped.is_empty()
        {
            return Ok(true);
        }
        match &self.backend {
            Backend::Sled(s) => {
                s.commit(&plan)?;
                let mut m = self.mem.write().unwrap_or_else(|p| p.into_inner());
                m.apply(plan);
                let v = Version {
                    head: m.head,
                    clusters: m.cluster_changes,
                    following: true,
                };
                drop(m);
                self.version.send_if_modified(|old| {
                    let changed = *old != v;
                    *old = v;
                    changed
                });
                Ok(true)
            }
            // The compare is on the basis the plan was computed from, never on a newer view:
            // another replica's write applied while planning makes the compare fail.
            Backend::Etcd(e) => e.commit(&plan, basis.0, basis.1),
        }
    }

    /// Runs `plan` (computing a write from the view) and commits it, again when another replica
    /// wrote first.
    fn write_with<T>(&self, mut plan: impl FnMut() -> Result<(Plan, T)>) -> Result<T> {
        let _g = self.lock();
        loop {
            let basis = self.basis();
            let (p, out) = plan()?;
            if self.commit(p, basis)? {
                return Ok(out);
            }
        }
    }

    /// What a plan is computed from: the head key's etcd revision and the head.
    fn basis(&self) -> (i64, u64) {
        let m = self.read();
        (m.head_mod, m.head)
    }

    /// The head revision: every change has a revision at or below it.
    pub fn head(&self) -> u64 {
        self.read().head
    }

    /// The newest revision of a compacted tombstone: an importer that applied less than this
    /// (and more than 0) cannot be brought up to date by changes and is resynced from scratch.
    pub fn floor(&self) -> u64 {
        self.read().floor
    }

    /// Tombstones every importer has read: those at or below `horizon` (the lowest import
    /// revision any member has acknowledged), at most `max` of them per call, oldest first, in
    /// one transaction. Returns how many went. The floor rises to the newest one dropped.
    pub fn compact_tombstones(&self, horizon: u64, max: usize) -> Result<usize> {
        self.write_with(|| {
            let m = self.read();
            let mut plan = Plan::default();
            for (rev, cluster, skey) in m.by_rev.iter() {
                if *rev > horizon || plan.dropped.len() >= max {
                    break;
                }
                let k = (cluster.clone(), skey.clone());
                if m.exports.get(&k).is_some_and(|r| r.deleted) {
                    plan.dropped.push(k);
                    plan.floor = Some(*rev);
                }
            }
            // Durable before it returns, as every write.
            plan.flush = true;
            let n = plan.dropped.len();
            Ok((plan, n))
        })
    }

    /// Tombstones held now.
    pub fn tombstones(&self) -> usize {
        self.read().exports.values().filter(|r| r.deleted).count()
    }

    pub fn cluster(&self, id: &str) -> Result<Option<ClusterRecord>> {
        Ok(self.read().clusters.get(id).cloned())
    }

    pub fn clusters(&self) -> Result<Vec<ClusterRecord>> {
        Ok(self.read().clusters.values().cloned().collect())
    }

    /// A plan writing a cluster record at a new revision (join, facts or bundle change).
    fn at_new_revision(&self, mut rec: ClusterRecord) -> (Plan, u64) {
        let rev = self.head() + 1;
        rec.revision = rev;
        (
            Plan {
                head: Some(rev),
                clusters: vec![rec],
                flush: true,
                ..Default::default()
            },
            rev,
        )
    }

    /// Records a newly joined cluster (a re-join after leaving replaces the old record).
    pub fn join(&self, rec: ClusterRecord) -> Result<u64> {
        self.write_with(|| {
            if self.cluster(&rec.id)?.is_some_and(|old| !old.left) {
                // A member joining again (e.g. after losing its state): its old exports go, in
                // the same transaction that writes the new record.
                tracing::info!(cluster = %rec.id, "cluster joined again; its previous exports are withdrawn");
                let (plan, applied) = self.plan_exports(
                    &rec.id,
                    &ExportDelta {
                        version: 0,
                        full: true,
                        ..Default::default()
                    },
                    Some(rec.clone()),
                    usize::MAX,
                )?;
                let rev = applied.revision.unwrap_or_else(|| self.head());
                return Ok((plan, rev));
            }
            Ok(self.at_new_revision(rec.clone()))
        })
    }

    /// Updates a member's facts (addresses, locality) when they changed.
    pub fn update_facts(&self, id: &str, facts: &ClusterFacts) -> Result<Option<u64>> {
        // Unchanged facts (every reconnect's hello) take no write lock: a hello must not wait
        // behind other clusters' export writes (a cluster that cannot be welcomed for a lease
        // TTL turns stale).
        {
            let mut rec = self.member(id)?;
            let before = rec.clone();
            rec.set_facts(facts);
            if rec == before {
                return Ok(None);
            }
        }
        self.write_with(|| {
            let mut rec = self.member(id)?;
            let before = rec.clone();
            rec.set_facts(facts);
            if rec == before {
                return Ok((Plan::default(), None));
            }
            let (plan, rev) = self.at_new_revision(rec);
            Ok((plan, Some(rev)))
        })
    }

    /// Stores a member's trust bundle when it changed.
    pub fn set_bundle(&self, id: &str, json: &str, sequence: u64) -> Result<Option<u64>> {
        self.write_with(|| {
            let mut rec = self.member(id)?;
            if rec.bundle_json == json {
                return Ok((Plan::default(), None));
            }
            if !rec.bundle_json.is_empty() && sequence < rec.bundle_sequence {
                return Err(StoreError::SequenceRegression {
                    got: sequence,
                    stored: rec.bundle_sequence,
                });
            }
            rec.bundle_json = json.to_string();
            rec.bundle_sequence = sequence;
            let (plan, rev) = self.at_new_revision(rec);
            Ok((plan, Some(rev)))
        })
    }

    fn member(&self, id: &str) -> Result<ClusterRecord> {
        let rec = self
            .cluster(id)?
            .ok_or_else(|| StoreError::UnknownCluster(id.to_string()))?;
        if rec.left {
            return Err(StoreError::Left(id.to_string()));
        }
        Ok(rec)
    }

    /// Adds a renewed certificate to a member's current membership (dropping the expired ones);
    /// durable before this returns, so a certificate handed out is always accepted.
    pub fn add_cert(&self, id: &str, cert: MemberCert, now: i64) -> Result<()> {
        self.write_with(|| {
            let mut rec = self.member(id)?;
            rec.certs.retain(|c| c.not_after > now);
            rec.certs.push(cert.clone());
            Ok((
                Plan {
                    clusters: vec![rec],
                    flush: true,
                    ..Default::default()
                },
                (),
            ))
        })
    }

    /// Records the import revision a cluster has applied (not flushed on its own: losing it
    /// only costs a resend; with etcd it is a key of its own, written without the head's
    /// compare, so acknowledgements never contend with exports).
    pub fn set_imports_acked(&self, id: &str, revision: u64) -> Result<()> {
        let _g = self.lock();
        let Some(mut rec) = self.cluster(id)? else {
            return Ok(());
        };
        if rec.imports_acked_revision == revision {
            return Ok(());
        }
        match &self.backend {
            Backend::Etcd(e) => e.set_acked(id, revision),
            Backend::Sled(_) => {
                rec.imports_acked_revision = revision;
                let basis = self.basis();
                self.commit(
                    Plan {
                        clusters: vec![rec],
                        ..Default::default()
                    },
                    basis,
                )
                .map(|_| ())
            }
        }
    }

    /// The live (non-deleted) exports of `cluster`, keyed by `ns/name`.
    pub fn exports_of(&self, cluster: &str) -> Result<BTreeMap<String, ExportRecord>> {
        let m = self.read();
        Ok(m.exports
            .range((cluster.to_string(), String::new())..)
            .take_while(|((c, _), _)| c == cluster)
            .filter(|(_, r)| !r.deleted)
            .map(|((_, k), r)| (k.clone(), r.record()))
            .collect())
    }

    /// Stores an export delta from `cluster`: durable before this returns.
    pub fn apply_exports(&self, cluster: &str, delta: &ExportDelta) -> Result<Applied> {
        self.apply_exports_within(cluster, delta, usize::MAX)
    }

    /// [`apply_exports`](Self::apply_exports), refused with
    /// [`StoreError::TooManyServices`] (nothing stored) when it would leave `cluster` more
    /// than `max_services` live exports.
    pub fn apply_exports_within(
        &self,
        cluster: &str,
        delta: &ExportDelta,
        max_services: usize,
    ) -> Result<Applied> {
        self.write_with(|| self.plan_exports(cluster, delta, None, max_services))
    }

    /// The plan of [`apply_exports`](Self::apply_exports). With `replace`, the cluster record
    /// is replaced by it (leave, re-join) in the same transaction.
    fn plan_exports(
        &self,
        cluster: &str,
        delta: &ExportDelta,
        replace: Option<ClusterRecord>,
        max_services: usize,
    ) -> Result<(Plan, Applied)> {
        let mut rec = self.member(cluster)?;
        if replace.is_none()
            && !delta.full
            && rec.exports_acked_version.checked_add(1) != Some(delta.version)
        {
            return Err(StoreError::VersionGap {
                got: delta.version,
                stored: rec.exports_acked_version,
            });
        }
        let rev = self.head() + 1;
        // This cluster's live exports, still encoded: only what changes is decoded.
        let current: BTreeMap<String, Arc<Stored>> = {
            let m = self.read();
            m.exports
                .range((cluster.to_string(), String::new())..)
                .take_while(|((c, _), _)| c == cluster)
                .filter(|(_, r)| !r.deleted)
                .map(|((_, k), r)| (k.clone(), r.clone()))
                .collect()
        };
        let mut upserts: BTreeMap<String, &ServiceExport> = BTreeMap::new();
        for e in &delta.upserts {
            upserts.insert(service_key(&e.namespace, &e.name), e);
        }
        let removed: Vec<String> = if delta.full {
            current
                .keys()
                .filter(|k| !upserts.contains_key(*k))
                .cloned()
                .collect()
        } else {
            delta
                .removals
                .iter()
                .map(|k| service_key(&k.namespace, &k.name))
                .filter(|k| current.contains_key(k) && !upserts.contains_key(k))
                .collect()
        };
        let after = current.len() + upserts.keys().filter(|k| !current.contains_key(*k)).count()
            - removed.len();
        if after > max_services {
            return Err(StoreError::TooManyServices {
                cluster: cluster.to_string(),
                after,
                max: max_services,
            });
        }
        // Records to write, keyed by (cluster, ns/name): changed or new exports, tombstones,
        // and other clusters' exports whose conflict flag changes.
        let mut writes: BTreeMap<(String, String), ExportRecord> = BTreeMap::new();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        {
            let m = self.read();
            for (k, e) in &upserts {
                let old = current.get(k);
                // Maps encode in no fixed order, so equal exports may differ in bytes: compare
                // decoded, and only when the sizes match.
                if old
                    .is_some_and(|o| o.encoded.len() == e.encoded_len() && o.record().export == **e)
                {
                    continue;
                }
                // The audience outlives tombstones: whoever saw an earlier incarnation of
                // this key must hear about its later changes.
                let mut audience = m
                    .exports
                    .get(&(cluster.to_string(), k.clone()))
                    .map(|o| o.audience.clone())
                    .unwrap_or_default();
                widen(&mut audience, e);
                writes.insert(
                    (cluster.to_string(), k.clone()),
                    ExportRecord {
                        cluster: cluster.to_string(),
                        created: old.map(|o| o.created).unwrap_or(rev),
                        modified: rev,
                        deleted: false,
                        conflict: old.and_then(|o| o.conflict.clone()),
                        audience,
                        export: (*e).clone(),
                    },
                );
                touched.insert(k.clone());
            }
            for k in &removed {
                if let Some(old) = current.get(k) {
                    writes.insert(
                        (cluster.to_string(), k.clone()),
                        ExportRecord {
                            modified: rev,
                            deleted: true,
                            conflict: None,
                            ..old.record()
                        },
                    );
                    touched.insert(k.clone());
                }
            }
            // Conflicts: for every touched service the oldest live export wins; newer ones
            // that disagree on ports are excluded. A flag that changes bumps that export.
            for skey in &touched {
                // Every live export of the service: the other clusters' as stored (only their
                // shape is read; one is decoded only if its flag changes), this cluster's as
                // planned.
                struct Live {
                    created: u64,
                    cluster: String,
                    shape: ServiceExport,
                    conflict: Option<String>,
                    stored: Option<Arc<Stored>>,
                }
                let mut live: Vec<Live> = m
                    .by_service
                    .get(skey)
                    .into_iter()
                    .flatten()
                    .filter(|c| c.as_str() != cluster)
                    .filter_map(|c| m.exports.get(&(c.clone(), skey.clone())))
                    .map(|r| Live {
                        created: r.created,
                        cluster: r.cluster.clone(),
                        shape: r.shape.clone(),
                        conflict: r.conflict.clone(),
                        stored: Some(r.clone()),
                    })
                    .collect();
                if let Some(w) = writes.get(&(cluster.to_string(), skey.clone())) {
                    if !w.deleted {
                        live.push(Live {
                            created: w.created,
                            cluster: w.cluster.clone(),
                            shape: shape_of(&w.export),
                            conflict: w.conflict.clone(),
                            stored: None,
                        });
                    }
                }
                live.sort_by(|a, b| (a.created, &a.cluster).cmp(&(b.created, &b.cluster)));
                let Some((oldest, rest)) = live.split_first() else {
                    continue;
                };
                let mut flags = vec![(oldest, None)];
                for r in rest {
                    let c = export_conflict(&oldest.shape, &r.shape).map(|why| {
                        format!(
                            "{skey}: {why} (cluster {} exported it first)",
                            oldest.cluster
                        )
                    });
                    flags.push((r, c));
                }
                for (r, flag) in flags {
                    if r.conflict == flag {
                        continue;
                    }
                    let key = (r.cluster.clone(), skey.clone());
                    match &r.stored {
                        Some(s) => {
                            let mut rec = s.record();
                            rec.conflict = flag;
                            rec.modified = rev;
                            writes.insert(key, rec);
                        }
                        None => {
                            if let Some(w) = writes.get_mut(&key) {
                                w.conflict = flag;
                                w.modified = rev;
                            }
                        }
                    }
                }
            }
        }
        let conflicts: Vec<String> = current
            .keys()
            .chain(upserts.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| !removed.contains(*k))
            .filter_map(|k| {
                writes
                    .get(&(cluster.to_string(), k.clone()))
                    .map(|w| w.conflict.clone())
                    .unwrap_or_else(|| current.get(k).and_then(|c| c.conflict.clone()))
            })
            .collect();
        let changed = !writes.is_empty() || replace.is_some();
        match replace {
            Some(mut r) => {
                r.revision = rev;
                rec = r;
            }
            None => rec.exports_acked_version = delta.version,
        }
        let revision = changed.then_some(rev);
        Ok((
            Plan {
                head: revision,
                clusters: vec![rec],
                exports: writes.into_values().collect(),
                flush: true,
                ..Default::default()
            },
            Applied {
                revision,
                conflicts,
            },
        ))
    }

    /// The cluster leaves: its exports become tombstones and its record is marked left.
    pub fn leave(&self, cluster: &str) -> Result<u64> {
        self.remove_member(cluster, None)
    }

    /// An operator removes the cluster: as [`Store::leave`], with who and why recorded.
    pub fn evict(&self, cluster: &str, eviction: Eviction) -> Result<u64> {
        self.remove_member(cluster, Some(eviction))
    }

    fn remove_member(&self, cluster: &str, eviction: Option<Eviction>) -> Result<u64> {
        self.write_with(|| {
            let mut rec = self.member(cluster)?;
            rec.left = true;
            rec.evicted = eviction.clone();
            rec.bundle_json.clear();
            // Tombstones and the left record in one transaction: no export can slip in between.
            let delta = ExportDelta {
                version: 0,
                full: true,
                ..Default::default()
            };
            let (plan, applied) = self.plan_exports(cluster, &delta, Some(rec), usize::MAX)?;
            let rev = applied.revision.unwrap_or_else(|| self.head());
            Ok((plan, rev))
        })
    }

    /// Export changes after `cursor`, oldest first, at most `limit` of them (a chunk may end
    /// inside a revision). Returns the changes, where to continue, and the last revision that
    /// is now completely read (what the reader may acknowledge). The importer's own exports are
    /// skipped.
    pub fn changes_since(
        &self,
        importer: &str,
        cursor: &Cursor,
        limit: usize,
    ) -> Result<(Vec<Change>, Cursor, u64)> {
        use std::ops::Bound;
        let m = self.read();
        let head = m.head;
        let start = match cursor {
            Cursor::AfterRevision(r) => Bound::Included((r + 1, String::new(), String::new())),
            Cursor::AfterKey(r, c, k) => Bound::Excluded((*r, c.clone(), k.clone())),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last: Option<&(u64, String, String)> = None;
        for key in m.by_rev.range((start, Bound::Unbounded)) {
            let (rev, cluster, skey) = key;
            if *rev > head {
                break;
            }
            if out.len() >= limit || bytes >= MAX_CHUNK_BYTES {
                // Stopped at `key`: the last revision read is complete only if `key` starts a new one.
                let prev = last.map(|l| l.0).unwrap_or(0);
                let complete = if prev == *rev {
                    prev.saturating_sub(1)
                } else {
                    prev
                };
                let (r, c, k) = last.cloned().unwrap_or_default();
                let floor = match cursor {
                    Cursor::AfterRevision(r) => *r,
                    Cursor::AfterKey(r, ..) => r.saturating_sub(1),
                };
                return Ok((out, Cursor::AfterKey(r, c, k), complete.max(floor)));
            }
            last = Some(key);
            if cluster == importer {
                continue;
            }
            let Some(r) = m.exports.get(&(cluster.clone(), skey.clone())) else {
                continue;
            };
            if r.visible_to(importer) {
                bytes += r.encoded.len();
                out.push(Change::Upsert(Imported {
                    cluster: r.cluster.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    encoded: r.encoded.clone(),
                }));
            } else if could_have_seen(&r.audience, importer) {
                out.push(Change::Remove {
                    cluster: r.cluster.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                });
            }
        }
        let floor = match cursor {
            Cursor::AfterRevision(r) => *r,
            Cursor::AfterKey(r, ..) => r.saturating_sub(1),
        };
        let complete = head.max(floor);
        Ok((out, Cursor::AfterRevision(complete), complete))
    }

    /// For status, in one pass over the exports without decoding any: each cluster's live
    /// exports, and what each cluster may import, by exporting cluster. (Per-cluster calls of
    /// [`exports_of`](Self::exports_of) and [`import_counts`](Self::import_counts) cost the
    /// whole store each, so a status of N clusters cost N times the store.)
    pub fn counts(&self) -> Counts {
        let m = self.read();
        let mut out = Counts::default();
        let mut to_all: BTreeMap<&str, u64> = BTreeMap::new();
        let mut specific: HashMap<&str, BTreeMap<&str, u64>> = HashMap::new();
        for r in m.exports.values() {
            if r.deleted {
                out.tombstones += 1;
                continue;
            }
            *out.exports.entry(r.cluster.clone()).or_insert(0) += 1;
            if r.conflict.is_some() {
                continue;
            }
            if r.export_to.is_empty() {
                *to_all.entry(r.cluster.as_str()).or_insert(0) += 1;
            } else {
                for i in &r.export_to {
                    if *i != r.cluster {
                        *specific
                            .entry(i.as_str())
                            .or_default()
                            .entry(r.cluster.as_str())
                            .or_insert(0) += 1;
                    }
                }
            }
        }
        for importer in m.clusters.keys() {
            let mut from: BTreeMap<String, u64> = to_all
                .iter()
                .filter(|(e, _)| **e != importer.as_str())
                .map(|(e, n)| (e.to_string(), *n))
                .collect();
            for (e, n) in specific.get(importer.as_str()).into_iter().flatten() {
                *from.entry(e.to_string()).or_insert(0) += n;
            }
            out.imports_from.insert(importer.clone(), from);
        }
        out
    }

    /// Number of live exports visible to `importer` (for status).
    pub fn import_count(&self, importer: &str) -> Result<u64> {
        let m = self.read();
        Ok(m.exports
            .values()
            .filter(|r| r.cluster != importer && r.visible_to(importer))
            .count() as u64)
    }

    /// What `importer` may see, by exporting cluster: the number of services each gives it.
    pub fn import_counts(&self, importer: &str) -> Result<std::collections::BTreeMap<String, u64>> {
        let m = self.read();
        let mut out = std::collections::BTreeMap::new();
        for r in m
            .exports
            .values()
            .filter(|r| r.cluster != importer && r.visible_to(importer))
        {
            *out.entry(r.cluster.clone()).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Conflicts standing against `cluster`'s exports, read from the records without decoding
    /// them (the status asks for every cluster's at each scrape: decoding every export of every
    /// cluster there cost a full decode of the store per status).
    pub fn conflicts_of(&self, cluster: &str) -> Result<Vec<String>> {
        let m = self.read();
        Ok(m.exports
            .range((cluster.to_string(), String::new())..)
            .take_while(|((c, _), _)| c == cluster)
            .filter(|(_, r)| !r.deleted)
            .filter_map(|(_, r)| r.conflict.clone())
            .collect())
    }
}

impl SledDb {
    /// One sled transaction across the trees, flushed when the plan says so.
    fn commit(&self, plan: &Plan) -> Result<()> {
        let clusters: Vec<(Vec<u8>, Vec<u8>)> = plan
            .clusters
            .iter()
            .map(|r| {
                (
                    r.id.as_bytes().to_vec(),
                    serde_json::to_vec(r).unwrap_or_default(),
                )
            })
            .collect();
        let exports: Vec<(Vec<u8>, Vec<u8>)> = plan
            .exports
            .iter()
            .map(|r| {
                let k = export_key(
                    &r.cluster,
                    &service_key(&r.export.namespace, &r.export.name),
                );
                (k, r.encode())
            })
            .collect();
        let dropped: Vec<Vec<u8>> = plan.dropped.iter().map(|(c, k)| export_key(c, k)).collect();
        (&self.meta, &self.clusters, &self.exports)
            .transaction(|(meta, tc, te)| {
                if let Some(rev) = plan.head {
                    meta.insert("revision", &rev.to_be_bytes())?;
                }
                if let Some(f) = plan.floor {
                    meta.insert("floor", &f.to_be_bytes())?;
                }
                for k in &dropped {
                    te.remove(k.as_slice())?;
                }
                for (k, v) in &clusters {
                    tc.insert(k.as_slice(), v.as_slice())?;
                }
                for (k, v) in &exports {
                    te.insert(k.as_slice(), v.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(txn_err)?;
        if plan.flush {
            self.db.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Port;

    /// Where a test's store lives: a sled directory, or a prefix of a real etcd (a fresh one
    /// per test). `open` again is a restart.
    enum Backing {
        Sled(tempfile::TempDir),
        Etcd(etcd::local::LocalEtcd),
    }

    impl Backing {
        fn open(&self) -> Store {
            match self {
                Backing::Sled(d) => Store::open(d.path()).unwrap(),
                Backing::Etcd(e) => Store::open_etcd(&e.config("/test")).unwrap(),
            }
        }
    }

    /// The test `$name(&Backing)` on sled and on etcd.
    macro_rules! on_both {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[test]
                fn sled() {
                    super::$name(&super::Backing::Sled(tempfile::tempdir().unwrap()));
                }
                #[test]
                fn etcd() {
                    super::$name(&super::Backing::Etcd(
                        crate::etcd::local::LocalEtcd::start().unwrap(),
                    ));
                }
            }
        )*};
    }

    on_both!(
        tombstones_every_importer_read_are_compacted_and_the_floor_survives_a_reopen,
        oldest_export_wins_a_conflict_and_the_newer_appears_when_it_goes,
        the_services_limit_counts_what_would_be_live_and_a_refusal_stores_nothing,
        chunks_never_claim_a_revision_they_did_not_finish,
        joining_again_withdraws_the_old_exports_and_leave_is_one_step,
        resending_an_unchanged_set_changes_nothing,
        restricted_exports_are_never_named_to_clusters_that_could_not_see_them,
        a_bundle_sequence_never_goes_back,
        everything_survives_a_reopen,
    );

    pub(crate) fn record(id: &str) -> ClusterRecord {
        ClusterRecord {
            id: id.into(),
            network: format!("net-{id}"),
            trust_domain: format!("{id}.mesh"),
            region: String::new(),
            zone: String::new(),
            subzone: String::new(),
            gateways: vec![],
            joined_at: 0,
            cert_fingerprint: String::new(),
            bundle_json: String::new(),
            bundle_sequence: 0,
            revision: 0,
            exports_acked_version: 0,
            imports_acked_revision: 0,
            left: false,
            certs: Vec::new(),
            evicted: None,
        }
    }

    fn export(name: &str, port: u32, protocol: &str) -> ServiceExport {
        ServiceExport {
            namespace: "shop".into(),
            name: name.into(),
            ports: vec![Port {
                name: "http".into(),
                port,
                protocol: protocol.into(),
                app_protocol: String::new(),
            }],
            ..Default::default()
        }
    }

    fn delta(version: u64, upserts: Vec<ServiceExport>, removals: Vec<&str>) -> ExportDelta {
        ExportDelta {
            version,
            full: false,
            upserts,
            removals: removals
                .into_iter()
                .map(|n| proto::ServiceKey {
                    namespace: "shop".into(),
                    name: n.into(),
                })
                .collect(),
        }
    }

    fn upserted(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Upsert(r) => Some(format!("{}:{}", r.cluster, r.export().name)),
                Change::Remove { .. } => None,
            })
            .collect()
    }

    fn oldest_export_wins_a_conflict_and_the_newer_appears_when_it_goes(b: &Backing) {
        let s = b.open();
        for c in ["c1", "c2", "c3"] {
            s.join(record(c)).unwrap();
        }
        s.apply_exports(
            "c1",
            &delta(1, vec![export("payment", 8080, "TCP")], vec![]),
        )
        .unwrap();
        let a = s
            .apply_exports(
                "c2",
                &delta(1, vec![export("payment", 8080, "UDP")], vec![]),
            )
            .unwrap();
        assert_eq!(a.conflicts.len(), 1, "{:?}", a.conflicts);
        assert!(
            a.conflicts[0].contains("cluster c1 exported it first"),
            "{:?}",
            a.conflicts
        );
        let (ch, cursor, _) = s
            .changes_since("c3", &Cursor::AfterRevision(0), 100)
            .unwrap();
        assert_eq!(
            upserted(&ch),
            vec!["c1:payment"],
            "the conflicting export is not imported"
        );
        assert_eq!(s.conflicts_of("c2").unwrap().len(), 1);
        assert_eq!(s.import_count("c3").unwrap(), 1);

        // The older export goes away: the newer one is published, the old one removed.
        s.apply_exports("c1", &delta(2, vec![], vec!["payment"]))
            .unwrap();
        let (ch, _, _) = s.changes_since("c3", &cursor, 100).unwrap();
        assert_eq!(upserted(&ch), vec!["c2:payment"]);
        assert!(ch
            .iter()
            .any(|c| matches!(c, Change::Remove { cluster, .. } if cluster == "c1")));
        assert!(s.conflicts_of("c2").unwrap().is_empty());

        // A version gap is refused; a full set is always accepted.
        assert!(matches!(
            s.apply_exports("c2", &delta(5, vec![], vec![])),
            Err(StoreError::VersionGap { got: 5, stored: 1 })
        ));
        let mut full = delta(9, vec![export("ledger", 9090, "TCP")], vec![]);
        full.full = true;
        s.apply_exports("c2", &full).unwrap();
        assert_eq!(
            s.exports_of("c2")
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>(),
            vec!["shop/ledger"]
        );
    }

    /// The per-cluster limit counts what would be live after the delta: new services count,
    /// replaced and removed ones do not, a full set is its own size; a refused delta stores
    /// nothing and leaves the version where it was.
    fn the_services_limit_counts_what_would_be_live_and_a_refusal_stores_nothing(b: &Backing) {
        let s = b.open();
        s.join(record("c1")).unwrap();
        let two = vec![export("a", 1, "TCP"), export("b", 2, "TCP")];
        s.apply_exports_within("c1", &delta(1, two, vec![]), 2)
            .unwrap();
        let head = s.head();
        assert!(matches!(
            s.apply_exports_within("c1", &delta(2, vec![export("c", 3, "TCP")], vec![]), 2),
            Err(StoreError::TooManyServices {
                after: 3,
                max: 2,
                ..
            })
        ));
        assert_eq!(s.head(), head, "nothing stored");
        assert_eq!(s.exports_of("c1").unwrap().len(), 2);
        // Changing one, and replacing one (removal with an upsert), stay within the limit.
        s.apply_exports_within("c1", &delta(2, vec![export("a", 10, "TCP")], vec![]), 2)
            .unwrap();
        s.apply_exports_within("c1", &delta(3, vec![export("c", 3, "TCP")], vec!["b"]), 2)
            .unwrap();
        let mut full = delta(
            4,
            vec![
                export("x", 1, "TCP"),
                export("y", 2, "TCP"),
                export("z", 3, "TCP"),
            ],
            vec![],
        );
        full.full = true;
        assert!(matches!(
            s.apply_exports_within("c1", &full, 2),
            Err(StoreError::TooManyServices { after: 3, .. })
        ));
        full.upserts.pop();
        s.apply_exports_within("c1", &full, 2).unwrap();
        let keys: Vec<String> = s.exports_of("c1").unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["shop/x", "shop/y"]);
    }

    fn chunks_never_claim_a_revision_they_did_not_finish(b: &Backing) {
        let s = b.open();
        s.join(record("c1")).unwrap();
        s.join(record("c2")).unwrap();
        let many: Vec<_> = (0..1200)
            .map(|i| export(&format!("s{i}"), 80, "TCP"))
            .collect();
        let rev = s
            .apply_exports("c1", &delta(1, many, vec![]))
            .unwrap()
            .revision
            .unwrap();
        let (a, cur, complete) = s
            .changes_since("c2", &Cursor::AfterRevision(0), 500)
            .unwrap();
        assert_eq!(a.len(), 500);
        assert_eq!(complete, rev - 1, "revision {rev} is only partly read");
        let (b, cur, complete) = s.changes_since("c2", &cur, 500).unwrap();
        assert_eq!(b.len(), 500);
        assert_eq!(complete, rev - 1);
        let (c, cur, complete) = s.changes_since("c2", &cur, 500).unwrap();
        assert_eq!(c.len(), 200);
        assert_eq!(complete, rev);
        assert_eq!(cur, Cursor::AfterRevision(rev));
        let (none, _, _) = s.changes_since("c2", &cur, 500).unwrap();
        assert!(none.is_empty());
        // The exporter itself never reads its own exports back.
        let (own, _, complete) = s
            .changes_since("c1", &Cursor::AfterRevision(0), 500)
            .unwrap();
        assert!(own.is_empty());
        assert_eq!(complete, s.head());
    }

    fn joining_again_withdraws_the_old_exports_and_leave_is_one_step(b: &Backing) {
        let s = b.open();
        s.join(record("c1")).unwrap();
        s.join(record("c2")).unwrap();
        s.apply_exports(
            "c1",
            &delta(1, vec![export("payment", 8080, "TCP")], vec![]),
        )
        .unwrap();
        let (_, cursor, _) = s
            .changes_since("c2", &Cursor::AfterRevision(0), 100)
            .unwrap();
        // c1 lost its state and joins again: its old export is withdrawn everywhere.
        s.join(record("c1")).unwrap();
        assert!(s.exports_of("c1").unwrap().is_empty());
        assert_eq!(s.cluster("c1").unwrap().unwrap().exports_acked_version, 0);
        let (ch, cursor, _) = s.changes_since("c2", &cursor, 100).unwrap();
        assert!(
            matches!(&ch[..], [Change::Remove { cluster, name, .. }] if cluster == "c1" && name == "payment")
        );
        // Leave: tombstones and the left record at one revision.
        s.apply_exports("c1", &delta(1, vec![export("ledger", 9090, "TCP")], vec![]))
            .unwrap();
        let rev = s.leave("c1").unwrap();
        assert_eq!(s.head(), rev);
        let c1 = s.cluster("c1").unwrap().unwrap();
        assert!(c1.left && c1.revision == rev);
        assert!(matches!(
            s.apply_exports("c1", &delta(2, vec![], vec![])),
            Err(StoreError::Left(_))
        ));
        let (ch, _, _) = s.changes_since("c2", &cursor, 100).unwrap();
        assert!(ch.iter().all(|c| matches!(c, Change::Remove { .. })));
        // A version that would overflow is a gap, not a panic.
        s.join(record("c3")).unwrap();
        let mut full = delta(u64::MAX, vec![], vec![]);
        full.full = true;
        s.apply_exports("c3", &full).unwrap();
        assert!(matches!(
            s.apply_exports("c3", &delta(0, vec![], vec![])),
            Err(StoreError::VersionGap { .. })
        ));
    }

    fn resending_an_unchanged_set_changes_nothing(b: &Backing) {
        let s = b.open();
        s.join(record("c1")).unwrap();
        let labelled = || {
            let mut e = export("payment", 8080, "TCP");
            // Many labels: a fresh map iterates (and encodes) them in another order.
            e.labels = (0..16)
                .map(|i| (format!("k{i}"), format!("v{i}")))
                .collect();
            e
        };
        s.apply_exports("c1", &delta(1, vec![labelled()], vec![]))
            .unwrap();
        let head = s.head();
        for v in 2..8 {
            let mut full = delta(v, vec![labelled()], vec![]);
            full.full = true;
            let a = s.apply_exports("c1", &full).unwrap();
            assert_eq!(a.revision, None, "an unchanged export was stored again");
        }
        assert_eq!(s.head(), head);
    }

    fn restricted_exports_are_never_named_to_clusters_that_could_not_see_them(b: &Backing) {
        let s = b.open();
        for c in ["c1", "c2", "c3"] {
            s.join(record(c)).unwrap();
        }
        let mut secret = export("secret", 9000, "TCP");
        secret.export_to = vec!["c2".into()];
        s.apply_exports("c1", &delta(1, vec![secret.clone()], vec![]))
            .unwrap();
        let (c2, c2_cur, _) = s
            .changes_since("c2", &Cursor::AfterRevision(0), 100)
            .unwrap();
        assert_eq!(upserted(&c2), vec!["c1:secret"]);
        let (c3, c3_cur, _) = s
            .changes_since("c3", &Cursor::AfterRevision(0), 100)
            .unwrap();
        assert!(c3.is_empty(), "c3 must not even learn the name");
        s.apply_exports("c1", &delta(2, vec![], vec!["secret"]))
            .unwrap();
        let (c3, _, _) = s.changes_since("c3", &c3_cur, 100).unwrap();
        assert!(c3.is_empty(), "nor on removal");
        let (c2, _, _) = s.changes_since("c2", &c2_cur, 100).unwrap();
        assert!(matches!(&c2[..], [Change::Remove { name, .. }] if name == "secret"));

        // Public, then restricted: everyone who could see it is told it went out of view,
        // even across a restart.
        let public = export("menu", 80, "TCP");
        s.apply_exports("c1", &delta(3, vec![public], vec![]))
            .unwrap();
        let (_, c3_cur, _) = s
            .changes_since("c3", &Cursor::AfterRevision(0), 100)
            .unwrap();
        let mut narrowed = export("menu", 80, "TCP");
        narrowed.export_to = vec!["c2".into()];
        s.apply_exports("c1", &delta(4, vec![narrowed], vec![]))
            .unwrap();
        drop(s);
        let s = b.open();
        let (c3, _, _) = s.changes_since("c3", &c3_cur, 100).unwrap();
        assert!(matches!(&c3[..], [Change::Remove { name, .. }] if name == "menu"));
    }

    /// Every export record and tombstone, as loaded.
    fn all_records(s: &Store) -> Vec<((String, String), ExportRecord)> {
        s.read()
            .exports
            .iter()
            .map(|(k, r)| (k.clone(), r.record()))
            .collect()
    }

    #[test]
    fn a_schema1_store_is_migrated_to_prost_records_and_loses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let before = {
            let s = Store::open(d.path()).unwrap();
            s.join(record("c1")).unwrap();
            s.join(record("c2")).unwrap();
            let mut restricted = export("ledger", 9090, "TCP");
            restricted.export_to = vec!["c2".into()];
            s.apply_exports(
                "c1",
                &delta(1, vec![export("payment", 8080, "TCP"), restricted], vec![]),
            )
            .unwrap();
            // A conflict (same port, other protocol) and a tombstone.
            s.apply_exports(
                "c2",
                &delta(1, vec![export("payment", 8080, "UDP")], vec![]),
            )
            .unwrap();
            s.apply_exports("c1", &delta(2, vec![], vec!["ledger"]))
                .unwrap();
            all_records(&s)
        };
        assert!(before.iter().any(|r| r.1.conflict.is_some()), "{before:?}");
        assert!(before.iter().any(|r| r.1.deleted), "{before:?}");
        // Rewrite the store as schema 1 wrote it.
        {
            // `open_sled` waits for the dropped store's threads to release the lock.
            let db = open_sled(sled::Config::new().path(d.path()), d.path()).unwrap();
            let exports = db.open_tree("exports").unwrap();
            let mut n = 0;
            for kv in exports.iter() {
                let (k, v) = kv.unwrap();
                let r = ExportRecord::decode(&k, &v).unwrap();
                exports.insert(k, schema1::encode(&r)).unwrap();
                n += 1;
            }
            assert!(n >= 3, "{n} records");
            db.open_tree("meta")
                .unwrap()
                .insert("schema", &1u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(all_records(&s), before);
        let Backend::Sled(db) = &s.backend else {
            unreachable!()
        };
        let schema = db.meta.get("schema").unwrap().unwrap();
        assert_eq!(schema.as_ref(), SCHEMA_VERSION.to_be_bytes());
        drop(s);
        // And it opens again as schema 2.
        let s = Store::open(d.path()).unwrap();
        assert_eq!(all_records(&s), before);
        // A future schema is refused with the directory named.
        let Backend::Sled(db) = &s.backend else {
            unreachable!()
        };
        db.meta.insert("schema", &9u32.to_be_bytes()).unwrap();
        db.db.flush().unwrap();
        drop(s);
        let e = Store::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("schema version 9"), "{e}");
    }

    /// The one-pass counts equal the per-cluster ones (exports with exportTo, a conflict, a
    /// tombstone).
    #[test]
    fn counts_in_one_pass_equal_the_per_cluster_ones() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        for c in ["c1", "c2", "c3"] {
            s.join(record(c)).unwrap();
        }
        let mut only_c2 = export("ledger", 9090, "TCP");
        only_c2.export_to = vec!["c2".into()];
        s.apply_exports(
            "c1",
            &delta(
                1,
                vec![
                    export("payment", 8080, "TCP"),
                    only_c2,
                    export("menu", 80, "TCP"),
                ],
                vec![],
            ),
        )
        .unwrap();
        s.apply_exports(
            "c2",
            &delta(1, vec![export("payment", 8080, "UDP")], vec![]),
        )
        .unwrap();
        s.apply_exports("c1", &delta(2, vec![], vec!["menu"]))
            .unwrap();
        let counts = s.counts();
        for c in ["c1", "c2", "c3"] {
            assert_eq!(
                counts.exports.get(c).copied().unwrap_or(0),
                s.exports_of(c).unwrap().len() as u64,
                "{c}"
            );
            assert_eq!(counts.imports_from[c], s.import_counts(c).unwrap(), "{c}");
        }
        assert_eq!(counts.imports_from["c2"]["c1"], 2);
        assert_eq!(counts.imports_from["c3"]["c1"], 1);
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let e = ExportRecord::decode(b"c1\0shop/payment", b"\xff\xff").unwrap_err();
        assert!(
            e.to_string().contains("\"c1\\0shop/payment\" is corrupt"),
            "{e}"
        );
        let e = schema1::decode(b"c1\0shop/payment", b"short").unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
    }

    fn a_bundle_sequence_never_goes_back(b: &Backing) {
        let s = b.open();
        s.join(record("c1")).unwrap();
        assert!(s.set_bundle("c1", "{\"v\": 5}", 5).unwrap().is_some());
        let e = s.set_bundle("c1", "{\"v\": 4}", 4).unwrap_err();
        assert!(
            matches!(e, StoreError::SequenceRegression { got: 4, stored: 5 }),
            "{e}"
        );
        assert_eq!(s.cluster("c1").unwrap().unwrap().bundle_sequence, 5);
        // The same bundle again is no change; a newer one is stored.
        assert!(s.set_bundle("c1", "{\"v\": 5}", 5).unwrap().is_none());
        assert!(s.set_bundle("c1", "{\"v\": 6}", 6).unwrap().is_some());
    }

    fn removed(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Remove { cluster, name, .. } => Some(format!("{cluster}:{name}")),
                Change::Upsert(_) => None,
            })
            .collect()
    }

    fn tombstones_every_importer_read_are_compacted_and_the_floor_survives_a_reopen(b: &Backing) {
        let (r2, r3);
        {
            let s = b.open();
            s.join(record("c1")).unwrap();
            s.join(record("c2")).unwrap();
            let all = vec![
                export("a", 80, "TCP"),
                export("b", 81, "TCP"),
                export("c", 82, "TCP"),
            ];
            s.apply_exports("c1", &delta(1, all, vec![])).unwrap();
            r2 = s
                .apply_exports("c1", &delta(2, vec![], vec!["a"]))
                .unwrap()
                .revision
                .unwrap();
            r3 = s
                .apply_exports("c1", &delta(3, vec![], vec!["b"]))
                .unwrap()
                .revision
                .unwrap();
            assert_eq!((s.tombstones(), s.floor()), (2, 0));
            // Below the horizon only: a's tombstone goes, b's stays.
            assert_eq!(s.compact_tombstones(r2, 100).unwrap(), 1);
            assert_eq!((s.tombstones(), s.floor()), (1, r2));
            let (changes, _, _) = s
                .changes_since("c2", &Cursor::AfterRevision(r2), 100)
                .unwrap();
            assert_eq!(removed(&changes), ["c1:b"], "b's removal is still told");
            let (changes, _, _) = s
                .changes_since("c2", &Cursor::AfterRevision(0), 100)
                .unwrap();
            assert_eq!(removed(&changes), ["c1:b"], "a's tombstone is gone");
            assert_eq!(upserted(&changes), ["c1:c"]);
            // At most `max` per call.
            s.apply_exports("c1", &delta(4, vec![], vec!["c"])).unwrap();
            let head = s.head();
            assert_eq!(s.compact_tombstones(head, 1).unwrap(), 1);
            assert_eq!((s.tombstones(), s.floor()), (1, r3));
            assert_eq!(s.compact_tombstones(head, 100).unwrap(), 1);
            assert_eq!(s.compact_tombstones(head, 100).unwrap(), 0, "nothing left");
            assert_eq!(s.head(), head, "compaction is no change for importers");
        }
        let s = b.open();
        assert_eq!(s.tombstones(), 0);
        assert!(s.floor() > r3);
        assert_eq!(s.floor(), s.head());
        assert!(s.exports_of("c1").unwrap().is_empty());
    }

    fn everything_survives_a_reopen(b: &Backing) {
        {
            let s = b.open();
            s.join(record("c1")).unwrap();
            s.apply_exports(
                "c1",
                &delta(1, vec![export("payment", 8080, "TCP")], vec![]),
            )
            .unwrap();
            s.set_bundle("c1", "{\"keys\": []}", 3).unwrap();
        }
        // `open_sled` waits for sled's threads to release the lock of the dropped handle.
        let s = b.open();
        let c1 = s.cluster("c1").unwrap().unwrap();
        assert_eq!(c1.exports_acked_version, 1);
        assert_eq!(c1.bundle_sequence, 3);
        assert_eq!(s.exports_of("c1").unwrap().len(), 1);
        assert_eq!(s.head(), c1.revision);
    }

    /// Who holds the store's lock is named (issue 19: a second federator waited silently).
    #[test]
    fn the_lock_holder_is_named() {
        let d = tempfile::tempdir().unwrap();
        let db = open_sled(sled::Config::new().path(d.path()), d.path()).unwrap();
        let holder = lock_holder(d.path()).expect("the lock is in /proc/locks");
        assert!(
            holder.starts_with(&std::process::id().to_string()),
            "{holder}"
        );
        drop(db);
    }
}
