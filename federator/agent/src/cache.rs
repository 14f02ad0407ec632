//! The agent's sled cache: what the federator last acknowledged of our exports, and the imports,
//! peer states and peer bundles last received. Restarted while the federator is down, the
//! agent serves from here at once (static stability).

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use proto::{ImportDelta, PeerCluster, PeerStates, ServiceExport};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use meshfed_model::validate::service_key;

pub struct Cache {
    db: sled::Db,
    meta: sled::Tree,
    acked: sled::Tree,
    imports: sled::Tree,
    peers: sled::Tree,
    bundles: sled::Tree,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("applied_revision", &self.applied_revision())
            .finish()
    }
}

fn u64_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0)
}

fn import_key(source: &str, ns: &str, name: &str) -> Vec<u8> {
    let mut k = source.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(service_key(ns, name).as_bytes());
    k
}

fn txn<T>(r: Result<T, TransactionError<String>>) -> anyhow::Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(m) => anyhow::anyhow!(m),
        TransactionError::Storage(e) => anyhow::anyhow!("cache: {e}"),
    })
}

/// An imported service as cached: (source cluster, export).
pub type Imported = (String, ServiceExport);

impl Cache {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = meshfed_store::open_sled(sled::Config::new().path(dir), dir)
            .map_err(|e| anyhow::anyhow!("cannot open the cache in {}: {e}", dir.display()))?;
        Ok(Cache {
            meta: db.open_tree("meta")?,
            acked: db.open_tree("acked_exports")?,
            imports: db.open_tree("imports")?,
            peers: db.open_tree("peers")?,
            bundles: db.open_tree("bundles")?,
            db,
        })
    }

    /// Another tree of the same database (for state kept beside the cache).
    pub fn tree(&self, name: &str) -> anyhow::Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    pub fn applied_revision(&self) -> u64 {
        u64_of(self.meta.get("applied_revision").ok().flatten())
    }

    pub fn acked_version(&self) -> u64 {
        u64_of(self.meta.get("acked_version").ok().flatten())
    }

    pub fn acked_exports(&self) -> anyhow::Result<meshfed_model::snapshot::Services> {
        let mut out = BTreeMap::new();
        for kv in self.acked.iter() {
            let (k, v) = kv?;
            out.insert(
                String::from_utf8_lossy(&k).into_owned(),
                std::sync::Arc::new(ServiceExport::decode(v.as_ref())?),
            );
        }
        Ok(out)
    }

    /// Records that the federator durably holds `snapshot` as export version `version`;
    /// `current` is what the cache holds now (the last acknowledged set), so only the
    /// difference is written.
    pub fn set_acked(
        &self,
        version: u64,
        current: &meshfed_model::snapshot::Services,
        snapshot: &meshfed_model::snapshot::Services,
    ) -> anyhow::Result<()> {
        let stale: Vec<String> = current
            .keys()
            .filter(|k| !snapshot.contains_key(*k))
            .cloned()
            .collect();
        let changed: Vec<(String, Vec<u8>)> = snapshot
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(v))
            .map(|(k, v)| (k.clone(), v.encode_to_vec()))
            .collect();
        txn((&self.meta, &self.acked).transaction(|(meta, acked)| {
            for k in &stale {
                acked.remove(k.as_bytes())?;
            }
            for (k, v) in &changed {
                acked.insert(k.as_bytes(), v.as_slice())?;
            }
            meta.insert("acked_version", &version.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<String>>(())
        }))?;
        self.db.flush()?;
        Ok(())
    }

    /// Applies an import delta atomically and durably (before it is acknowledged).
    pub fn apply_imports(&self, d: &ImportDelta) -> anyhow::Result<()> {
        let (clear_imports, clear_bundles): (Vec<sled::IVec>, Vec<sled::IVec>) = if d.full {
            (
                self.imports.iter().keys().collect::<Result<_, _>>()?,
                self.bundles.iter().keys().collect::<Result<_, _>>()?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let mut puts = Vec::with_capacity(d.upserts.len());
        for (i, u) in d.upserts.iter().enumerate() {
            let e = u
                .export
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("imports.upserts[{i}].export is missing"))?;
            meshfed_model::validate::check_export(e, &format!("imports.upserts[{i}].export"))
                .map_err(anyhow::Error::msg)?;
            meshfed_model::validate::check_label(
                &format!("imports.upserts[{i}].source_cluster"),
                &u.source_cluster,
            )
            .map_err(anyhow::Error::msg)?;
            puts.push((
                import_key(&u.source_cluster, &e.namespace, &e.name),
                e.encode_to_vec(),
            ));
        }
        let dels: Vec<Vec<u8>> = d
            .removals
            .iter()
            .map(|r| import_key(&r.source_cluster, &r.namespace, &r.name))
            .collect();
        let mut bundle_puts = Vec::new();
        for (i, b) in d.bundles.iter().enumerate() {
            let td = trust::TrustDomain::new(&b.trust_domain)
                .map_err(|e| anyhow::anyhow!("imports.bundles[{i}].trust_domain: {e}"))?;
            trust::TrustBundle::from_json(td, &b.bundle_json, &format!("imports.bundles[{i}]"))?;
            bundle_puts.push((
                b.trust_domain.clone(),
                serde_json::to_vec(&(b.source_cluster.as_str(), b.bundle_json.as_str()))?,
            ));
        }
        txn(
            (&self.meta, &self.imports, &self.bundles).transaction(|(meta, imports, bundles)| {
                for k in &clear_imports {
                    imports.remove(k)?;
                }
                for k in &clear_bundles {
                    bundles.remove(k)?;
                }
                for k in &dels {
                    imports.remove(k.as_slice())?;
                }
                for (k, v) in &puts {
                    imports.insert(k.as_slice(), v.as_slice())?;
                }
                for td in &d.bundle_removals {
                    bundles.remove(td.as_bytes())?;
                }
                for (td, v) in &bundle_puts {
                    bundles.insert(td.as_bytes(), v.as_slice())?;
                }
                meta.insert("applied_revision", &d.revision.to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<String>>(())
            }),
        )?;
        self.db.flush()?;
        Ok(())
    }

    pub fn set_peers(&self, p: &PeerStates) -> anyhow::Result<()> {
        for r in &p.removed {
            self.peers.remove(r.as_bytes())?;
        }
        for peer in &p.peers {
            if let Some(f) = &peer.facts {
                self.peers
                    .insert(f.cluster_id.as_bytes(), peer.encode_to_vec())?;
            }
        }
        Ok(())
    }

    pub fn imports(&self) -> anyhow::Result<Vec<Imported>> {
        let mut out = Vec::new();
        for kv in self.imports.iter() {
            let (k, v) = kv?;
            let source = k.split(|b| *b == 0).next().unwrap_or_default();
            out.push((
                String::from_utf8_lossy(source).into_owned(),
                ServiceExport::decode(v.as_ref())?,
            ));
        }
        Ok(out)
    }

    pub fn peers(&self) -> anyhow::Result<Vec<PeerCluster>> {
        let mut out = Vec::new();
        for kv in self.peers.iter() {
            let (_, v) = kv?;
            out.push(PeerCluster::decode(v.as_ref())?);
        }
        Ok(out)
    }

    /// Peer bundles: trust domain -> (source cluster, bundle JSON).
    pub fn bundles(&self) -> anyhow::Result<BTreeMap<String, (String, String)>> {
        let mut out = BTreeMap::new();
        for kv in self.bundles.iter() {
            let (k, v) = kv?;
            let (src, json): (String, String) = serde_json::from_slice(&v)?;
            out.insert(String::from_utf8_lossy(&k).into_owned(), (src, json));
        }
        Ok(out)
    }

    /// Forgets everything (after leaving the federation).
    pub fn clear(&self) -> anyhow::Result<()> {
        for t in [
            &self.meta,
            &self.acked,
            &self.imports,
            &self.peers,
            &self.bundles,
        ] {
            t.clear()?;
        }
        self.db.flush()?;
        Ok(())
    }
}
