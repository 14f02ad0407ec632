//! The federator's durable state in sled: cluster records, exports (with tombstones) and one
//! global revision counter. Every mutation runs in one sled transaction across trees and is
//! flushed to disk before the caller acknowledges anything.
//!
//! Trees:
//! - `meta`: `schema` (u32), `revision` (u64, the head revision)
//! - `clusters`: cluster id -> [`ClusterRecord`] (JSON)
//! - `exports`: `<cluster>\0<ns>/<name>` -> [`ExportRecord`] (binary, see `encode`)
//! - `by_rev`: `<mod revision, 8 bytes BE><cluster>\0<ns>/<name>` -> empty (changes index)
//! - `by_service`: `<ns>/<name>\0<cluster>` -> empty (who exports a service, for conflicts)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use prost::Message;
use proto::{ClusterFacts, ExportDelta, ServiceExport};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::types::{port_conflict, service_key};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    #[error("state store: record {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("state store in {dir} has schema version {found}; this meshfed reads version {SCHEMA_VERSION}")]
    Schema { dir: String, found: u32 },
    #[error("unknown cluster {0}")]
    UnknownCluster(String),
    #[error("cluster {0} has left the federation")]
    Left(String),
    #[error("export version {got} does not follow the stored version {stored}; send a full set")]
    VersionGap { got: u64, stored: u64 },
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
    pub export: ServiceExport,
}

impl ExportRecord {
    fn encode(&self) -> Vec<u8> {
        let conflict = self.conflict.as_deref().unwrap_or("");
        let mut v = Vec::with_capacity(19 + conflict.len() + self.export.encoded_len());
        v.extend_from_slice(&self.created.to_be_bytes());
        v.extend_from_slice(&self.modified.to_be_bytes());
        v.push(u8::from(self.deleted));
        v.extend_from_slice(&(conflict.len() as u16).to_be_bytes());
        v.extend_from_slice(conflict.as_bytes());
        self.export.encode(&mut v).unwrap_or_default();
        v
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<Self> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        };
        if v.len() < 19 {
            return Err(corrupt("too short"));
        }
        let created = u64::from_be_bytes(v[0..8].try_into().map_err(|_| corrupt("created"))?);
        let modified = u64::from_be_bytes(v[8..16].try_into().map_err(|_| corrupt("modified"))?);
        let deleted = v[16] != 0;
        let clen = u16::from_be_bytes([v[17], v[18]]) as usize;
        if v.len() < 19 + clen {
            return Err(corrupt("conflict text truncated"));
        }
        let conflict =
            std::str::from_utf8(&v[19..19 + clen]).map_err(|_| corrupt("conflict text"))?;
        let export = ServiceExport::decode(&v[19 + clen..]).map_err(|e| corrupt(&e.to_string()))?;
        let cluster = key.split(|b| *b == 0).next().unwrap_or_default();
        Ok(ExportRecord {
            cluster: String::from_utf8_lossy(cluster).into_owned(),
            created,
            modified,
            deleted,
            conflict: (!conflict.is_empty()).then(|| conflict.to_string()),
            export,
        })
    }
}

fn export_key(cluster: &str, skey: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(cluster.len() + 1 + skey.len());
    k.extend_from_slice(cluster.as_bytes());
    k.push(0);
    k.extend_from_slice(skey.as_bytes());
    k
}

fn rev_key(rev: u64, ekey: &[u8]) -> Vec<u8> {
    let mut k = rev.to_be_bytes().to_vec();
    k.extend_from_slice(ekey);
    k
}

fn service_index_key(skey: &str, cluster: &str) -> Vec<u8> {
    let mut k = skey.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(cluster.as_bytes());
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
    Upsert(ExportRecord),
    Remove {
        cluster: String,
        namespace: String,
        name: String,
    },
}

pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    clusters: sled::Tree,
    exports: sled::Tree,
    by_rev: sled::Tree,
    by_service: sled::Tree,
    /// One writer at a time: reads that a transaction depends on happen under this lock.
    write: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("head", &self.head()).finish()
    }
}

fn txn_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4]));
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        dir: dir.display().to_string(),
                        found,
                    });
                }
            }
        }
        Ok(Store {
            clusters: db.open_tree("clusters")?,
            exports: db.open_tree("exports")?,
            by_rev: db.open_tree("by_rev")?,
            by_service: db.open_tree("by_service")?,
            meta,
            db,
            write: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The head revision: every change has a revision at or below it.
    pub fn head(&self) -> u64 {
        self.meta
            .get("revision")
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    pub fn cluster(&self, id: &str) -> Result<Option<ClusterRecord>> {
        match self.clusters.get(id)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: id.to_string(),
                    reason: e.to_string(),
                }),
        }
    }

    pub fn clusters(&self) -> Result<Vec<ClusterRecord>> {
        let mut out = Vec::new();
        for kv in self.clusters.iter() {
            let (k, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Writes a cluster record at a new revision (join, facts or bundle change, leave).
    fn put_cluster_at_new_revision(&self, mut rec: ClusterRecord) -> Result<u64> {
        let rev = self.head() + 1;
        rec.revision = rev;
        let json = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt {
            key: rec.id.clone(),
            reason: e.to_string(),
        })?;
        (&self.meta, &self.clusters)
            .transaction(|(meta, clusters)| {
                meta.insert("revision", &rev.to_be_bytes())?;
                clusters.insert(rec.id.as_bytes(), json.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(txn_err)?;
        self.flush()?;
        Ok(rev)
    }

    /// Records a newly joined cluster (a re-join after leaving replaces the old record).
    pub fn join(&self, rec: ClusterRecord) -> Result<u64> {
        let _g = self.lock();
        if let Some(old) = self.cluster(&rec.id)? {
            if !old.left {
                tracing::info!(cluster = %rec.id, "cluster joined again; its previous record is replaced");
            }
        }
        self.put_cluster_at_new_revision(rec)
    }

    /// Updates a member's facts (addresses, locality) when they changed.
    pub fn update_facts(&self, id: &str, facts: &ClusterFacts) -> Result<Option<u64>> {
        let _g = self.lock();
        let mut rec = self.member(id)?;
        let before = rec.clone();
        rec.set_facts(facts);
        if rec == before {
            return Ok(None);
        }
        self.put_cluster_at_new_revision(rec).map(Some)
    }

    /// Stores a member's trust bundle when it changed.
    pub fn set_bundle(&self, id: &str, json: &str, sequence: u64) -> Result<Option<u64>> {
        let _g = self.lock();
        let mut rec = self.member(id)?;
        if rec.bundle_json == json {
            return Ok(None);
        }
        rec.bundle_json = json.to_string();
        rec.bundle_sequence = sequence;
        self.put_cluster_at_new_revision(rec).map(Some)
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

    /// Records the import revision a cluster has applied (not flushed on its own: losing it
    /// only costs a resend).
    pub fn set_imports_acked(&self, id: &str, revision: u64) -> Result<()> {
        let _g = self.lock();
        if let Some(mut rec) = self.cluster(id)? {
            if rec.imports_acked_revision != revision {
                rec.imports_acked_revision = revision;
                let json = serde_json::to_vec(&rec).unwrap_or_default();
                self.clusters.insert(id.as_bytes(), json)?;
            }
        }
        Ok(())
    }

    /// The live (non-deleted) exports of `cluster`, keyed by `ns/name`.
    pub fn exports_of(&self, cluster: &str) -> Result<BTreeMap<String, ExportRecord>> {
        let mut prefix = cluster.as_bytes().to_vec();
        prefix.push(0);
        let mut out = BTreeMap::new();
        for kv in self.exports.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let rec = ExportRecord::decode(&k, &v)?;
            if !rec.deleted {
                out.insert(service_key(&rec.export.namespace, &rec.export.name), rec);
            }
        }
        Ok(out)
    }

    fn exporters_of(&self, skey: &str) -> Result<Vec<ExportRecord>> {
        let mut prefix = skey.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.by_service.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let cluster = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let ekey = export_key(&cluster, skey);
            if let Some(v) = self.exports.get(&ekey)? {
                let rec = ExportRecord::decode(&ekey, &v)?;
                if !rec.deleted {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Stores an export delta from `cluster`: durable before this returns.
    pub fn apply_exports(&self, cluster: &str, delta: &ExportDelta) -> Result<Applied> {
        let _g = self.lock();
        let mut rec = self.member(cluster)?;
        if !delta.full && delta.version != rec.exports_acked_version + 1 {
            return Err(StoreError::VersionGap {
                got: delta.version,
                stored: rec.exports_acked_version,
            });
        }
        let rev = self.head() + 1;
        let current = self.exports_of(cluster)?;
        // Desired end state of this cluster's exports after the delta.
        let mut next: BTreeMap<String, ServiceExport> = if delta.full {
            BTreeMap::new()
        } else {
            current
                .iter()
                .map(|(k, r)| (k.clone(), r.export.clone()))
                .collect()
        };
        for k in &delta.removals {
            next.remove(&service_key(&k.namespace, &k.name));
        }
        for e in &delta.upserts {
            next.insert(service_key(&e.namespace, &e.name), e.clone());
        }
        // Records to write: changed or new exports, and tombstones.
        let mut writes: BTreeMap<String, ExportRecord> = BTreeMap::new();
        let mut old_revs: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for (k, e) in &next {
            match current.get(k) {
                Some(old) if old.export == *e => {}
                Some(old) => {
                    old_revs.push((old.modified, export_key(cluster, k)));
                    writes.insert(
                        k.clone(),
                        ExportRecord {
                            modified: rev,
                            export: e.clone(),
                            ..old.clone()
                        },
                    );
                    touched.insert(k.clone());
                }
                None => {
                    // A tombstone may exist under the key; its index entry goes too.
                    let ekey = export_key(cluster, k);
                    if let Some(v) = self.exports.get(&ekey)? {
                        let t = ExportRecord::decode(&ekey, &v)?;
                        old_revs.push((t.modified, ekey));
                    }
                    writes.insert(
                        k.clone(),
                        ExportRecord {
                            cluster: cluster.to_string(),
                            created: rev,
                            modified: rev,
                            deleted: false,
                            conflict: None,
                            export: e.clone(),
                        },
                    );
                    touched.insert(k.clone());
                }
            }
        }
        for (k, old) in &current {
            if !next.contains_key(k) {
                old_revs.push((old.modified, export_key(cluster, k)));
                writes.insert(
                    k.clone(),
                    ExportRecord {
                        modified: rev,
                        deleted: true,
                        conflict: None,
                        ..old.clone()
                    },
                );
                touched.insert(k.clone());
            }
        }
        // Conflicts: for every touched service, the oldest live export wins; newer ones that
        // disagree on ports are excluded. A flag that changes bumps that export's revision.
        let mut conflicts = Vec::new();
        for skey in &touched {
            let mut all: BTreeMap<String, ExportRecord> = self
                .exporters_of(skey)?
                .into_iter()
                .map(|r| (r.cluster.clone(), r))
                .collect();
            if let Some(w) = writes.get(skey) {
                all.insert(cluster.to_string(), w.clone());
            }
            let mut live: Vec<&ExportRecord> = all.values().filter(|r| !r.deleted).collect();
            live.sort_by_key(|r| (r.created, r.cluster.clone()));
            let mut flags: Vec<(String, Option<String>)> = Vec::new();
            if let Some((oldest, rest)) = live.split_first() {
                flags.push((oldest.cluster.clone(), None));
                for r in rest {
                    let c = port_conflict(&oldest.export, &r.export).map(|why| {
                        format!(
                            "{skey}: {why} (cluster {} exported it first)",
                            oldest.cluster
                        )
                    });
                    flags.push((r.cluster.clone(), c));
                }
            }
            for (c, flag) in flags {
                let mut r = match writes.get(skey).filter(|_| c == cluster) {
                    Some(w) => w.clone(),
                    None => all[&c].clone(),
                };
                if c == cluster {
                    if let Some(f) = &flag {
                        conflicts.push(f.clone());
                    }
                }
                if r.conflict != flag {
                    if c != cluster || !writes.contains_key(skey) {
                        old_revs.push((r.modified, export_key(&c, skey)));
                    }
                    r.conflict = flag;
                    r.modified = rev;
                    if c == cluster {
                        writes.insert(skey.clone(), r);
                    } else {
                        writes.insert(format!("\u{1}{c}\u{1}{skey}"), r);
                    }
                }
            }
        }
        rec.exports_acked_version = delta.version;
        let rec_json = serde_json::to_vec(&rec).unwrap_or_default();
        let changed = !writes.is_empty();
        let encoded: Vec<(Vec<u8>, Vec<u8>, String, bool)> = writes
            .values()
            .map(|r| {
                let skey = service_key(&r.export.namespace, &r.export.name);
                (export_key(&r.cluster, &skey), r.encode(), skey, r.deleted)
            })
            .collect();
        (
            &self.meta,
            &self.clusters,
            &self.exports,
            &self.by_rev,
            &self.by_service,
        )
            .transaction(|(meta, clusters, exports, by_rev, by_service)| {
                if changed {
                    meta.insert("revision", &rev.to_be_bytes())?;
                }
                clusters.insert(cluster.as_bytes(), rec_json.as_slice())?;
                for (r, k) in &old_revs {
                    by_rev.remove(rev_key(*r, k))?;
                }
                for (ekey, val, skey, deleted) in &encoded {
                    exports.insert(ekey.as_slice(), val.as_slice())?;
                    by_rev.insert(rev_key(rev, ekey), &[])?;
                    let owner = ekey.split(|b| *b == 0).next().unwrap_or_default();
                    let sk = service_index_key(skey, &String::from_utf8_lossy(owner));
                    if *deleted {
                        by_service.remove(sk)?;
                    } else {
                        by_service.insert(sk, &[])?;
                    }
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(txn_err)?;
        self.flush()?;
        Ok(Applied {
            revision: changed.then_some(rev),
            conflicts,
        })
    }

    /// The cluster leaves: its exports become tombstones and its record is marked left.
    pub fn leave(&self, cluster: &str) -> Result<u64> {
        let delta = ExportDelta {
            version: 0,
            full: true,
            ..Default::default()
        };
        self.apply_exports(cluster, &delta)?;
        let _g = self.lock();
        let mut rec = self.member(cluster)?;
        rec.left = true;
        rec.bundle_json.clear();
        self.put_cluster_at_new_revision(rec)
    }

    /// Export changes after revision `since`, oldest first, cut at a revision boundary once
    /// `limit` changes are collected. Returns the changes and the revision they bring the
    /// reader to. The importer's own exports are skipped.
    pub fn changes_since(
        &self,
        importer: &str,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<Change>, u64)> {
        let head = self.head();
        let mut out = Vec::new();
        let mut upto = since;
        let mut truncated = false;
        let start = (since + 1).to_be_bytes();
        for kv in self.by_rev.range(start.as_slice()..) {
            let (k, _) = kv?;
            if k.len() < 8 {
                continue;
            }
            let rev = u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8]));
            if rev > head {
                break;
            }
            if rev != upto && out.len() >= limit {
                truncated = true;
                break;
            }
            upto = rev;
            let ekey = &k[8..];
            let Some(v) = self.exports.get(ekey)? else {
                continue;
            };
            let r = ExportRecord::decode(ekey, &v)?;
            if r.cluster == importer {
                continue;
            }
            let visible =
                !r.deleted && r.conflict.is_none() && crate::types::visible_to(&r.export, importer);
            if visible {
                out.push(Change::Upsert(r));
            } else {
                out.push(Change::Remove {
                    cluster: r.cluster,
                    namespace: r.export.namespace,
                    name: r.export.name,
                });
            }
        }
        if !truncated {
            // Everything up to the head has been read (some revisions touch only clusters).
            upto = head.max(since);
        }
        Ok((out, upto))
    }

    /// Number of live exports visible to `importer` (for status).
    pub fn import_count(&self, importer: &str) -> Result<u64> {
        let mut n = 0;
        for kv in self.exports.iter() {
            let (k, v) = kv?;
            let r = ExportRecord::decode(&k, &v)?;
            if r.cluster != importer
                && !r.deleted
                && r.conflict.is_none()
                && crate::types::visible_to(&r.export, importer)
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Conflicts standing against `cluster`'s exports.
    pub fn conflicts_of(&self, cluster: &str) -> Result<Vec<String>> {
        Ok(self
            .exports_of(cluster)?
            .into_values()
            .filter_map(|r| r.conflict)
            .collect())
    }
}
