//! What federator replicas share besides the store, in the same etcd: join tokens
//! (`<prefix>/tokens/<id>`, spent with a compare-and-swap), the federation CA's files
//! (`<prefix>/ca/snapshot`) and the replicas' addresses (`<prefix>/replicas/<address>`).
//!
//! The CA: each replica keeps a working copy in `<state-dir>/ca` (its live CA signs from it).
//! At start a replica takes etcd's CA, or offers its own (made now, or left by a one-machine
//! federator being moved to etcd) when etcd has none; of two replicas offering at once, one
//! wins and the other takes the winner's. While running, a replica takes any newer CA before
//! each rotation step and offers what a step changed with a compare on the revision it took:
//! a replica that lost takes the winner's and steps again from it, so rotation advances once
//! for the federation, never twice. Whoever can read the prefix can read the federation CA's
//! key: access to etcd is root-equivalent for the federation (docs/federation-protocol.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use meshfed_identity::token::{SharedRecords, TokenKind, TokenStore};
use meshfed_store::etcd::Records;
use serde::{Deserialize, Serialize};
use trust::files::snapshot;
use trust::TrustDomain;

use crate::ca::FederationCa;

/// Join tokens in etcd.
#[derive(Debug)]
struct EtcdRecords(Records);

impl SharedRecords for EtcdRecords {
    fn get(&self, id: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
        self.0.get(id).map_err(|e| e.to_string())
    }
    fn list(&self) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.0.list().map_err(|e| e.to_string())
    }
    fn swap(&self, id: &str, value: Vec<u8>, expected: i64) -> Result<bool, String> {
        self.0
            .swap(id, value, expected)
            .map(|r| r.is_some())
            .map_err(|e| e.to_string())
    }
}

/// The join tokens replicas share.
pub fn tokens(records: Records) -> TokenStore {
    TokenStore::shared(Arc::new(EtcdRecords(records)), TokenKind::Join)
}

/// The record key of the CA's files.
const SNAPSHOT: &str = "snapshot";
/// The state directory's part the record carries.
const CA_DIR: &str = "ca";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CaSnapshot {
    trust_domain: String,
    /// Path relative to the state directory -> contents.
    files: BTreeMap<String, String>,
}

/// The federation CA as replicas share it.
#[derive(Debug)]
pub struct SharedCa {
    records: Records,
    state_dir: PathBuf,
    /// The record's revision and files as this replica last took or wrote them.
    last: Mutex<(i64, BTreeMap<String, String>)>,
    /// The record's revision the live CA signs from (set after each rotation step).
    applied: std::sync::atomic::AtomicI64,
}

impl SharedCa {
    /// Takes etcd's CA into `<state_dir>/ca`, or offers this replica's when etcd has none, and
    /// opens it.
    pub fn open(
        records: Records,
        state_dir: &Path,
        td: Option<&TrustDomain>,
    ) -> anyhow::Result<(FederationCa, SharedCa)> {
        let shared = SharedCa {
            records,
            state_dir: state_dir.to_path_buf(),
            last: Mutex::new((0, BTreeMap::new())),
            applied: Default::default(),
        };
        if !shared.pull(td)? {
            let ca = FederationCa::open_or_create(state_dir, td)?;
            let snap = shared.read_local(&ca.trust_domain)?;
            let bytes = serde_json::to_vec(&snap)?;
            match shared.records.swap(SNAPSHOT, bytes, 0)? {
                Some(rev) => {
                    tracing::info!(trust_domain = %ca.trust_domain, "this replica's federation CA is now the federation's (etcd had none)");
                    *shared.lock() = (rev, snap.files);
                    shared.applied();
                    return Ok((ca, shared));
                }
                None => {
                    // Another replica offered its CA first: take that one.
                    drop(ca);
                    shared.pull(td)?;
                }
            }
        }
        let ca = FederationCa::open_or_create(state_dir, td)?;
        shared.applied();
        Ok((ca, shared))
    }

    /// The live CA has stepped since the last take or offer: it signs from that revision.
    pub fn applied(&self) {
        let rev = self.lock().0;
        self.applied
            .store(rev, std::sync::atomic::Ordering::Release);
    }

    /// Whether the live CA signs from the revision etcd holds now (one read of etcd).
    pub fn current(&self) -> anyhow::Result<bool> {
        let now = self.records.get(SNAPSHOT)?.map(|(_, rev)| rev).unwrap_or(0);
        Ok(now == self.applied.load(std::sync::atomic::Ordering::Acquire))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (i64, BTreeMap<String, String>)> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_local(&self, td: &TrustDomain) -> anyhow::Result<CaSnapshot> {
        let _lock = trust::ca::CaDir::new(self.state_dir.join(CA_DIR)).lock()?;
        Ok(CaSnapshot {
            trust_domain: td.to_string(),
            files: snapshot::read(&self.state_dir, &[CA_DIR])?,
        })
    }

    /// Writes etcd's CA into the working copy when it is newer than what this replica took;
    /// false when etcd holds none. A CA of another trust domain than `td` is refused.
    pub fn pull(&self, td: Option<&TrustDomain>) -> anyhow::Result<bool> {
        let Some((bytes, rev)) = self.records.get(SNAPSHOT)? else {
            return Ok(false);
        };
        if self.lock().0 == rev {
            return Ok(true);
        }
        let snap: CaSnapshot = serde_json::from_slice(&bytes)
            .context("the federation CA in etcd (ca/snapshot) is not meshfed's")?;
        if let Some(td) = td {
            anyhow::ensure!(
                snap.trust_domain == td.as_str(),
                "etcd holds the federation CA of trust domain {}, not {td}",
                snap.trust_domain
            );
        }
        // Checked before it replaces anything: a CA that loads, of the domain it claims.
        let tmp = tempfile::tempdir_in(&self.state_dir)
            .with_context(|| format!("cannot make a directory in {}", self.state_dir.display()))?;
        snapshot::write(tmp.path(), &snap.files, &[CA_DIR])?;
        let got = trust::CertificateAuthority::load(&tmp.path().join(CA_DIR))
            .context("the federation CA in etcd (ca/snapshot) does not load")?;
        anyhow::ensure!(
            got.trust_domain().as_str() == snap.trust_domain,
            "the federation CA in etcd is of trust domain {}, but says {}",
            got.trust_domain(),
            snap.trust_domain
        );
        {
            let _lock = trust::ca::CaDir::new(self.state_dir.join(CA_DIR)).lock()?;
            let mut n = snapshot::write(&self.state_dir, &snap.files, &[CA_DIR])?;
            // What the taken CA no longer has (a generation it dropped) goes too.
            for rel in snapshot::read(&self.state_dir, &[CA_DIR])?.keys() {
                if !snap.files.contains_key(rel) {
                    let p = self.state_dir.join(rel);
                    std::fs::remove_file(&p)
                        .with_context(|| format!("cannot remove {}", p.display()))?;
                    n += 1;
                }
            }
            if n > 0 {
                tracing::info!(
                    files = n,
                    revision = rev,
                    "took the federation CA from etcd"
                );
            }
        }
        *self.lock() = (rev, snap.files);
        Ok(true)
    }

    /// Offers the working copy after a rotation step changed it. False when another replica
    /// changed the CA first: its CA was taken instead, and the caller steps again from it.
    pub fn push(&self, td: &TrustDomain) -> anyhow::Result<bool> {
        let snap = self.read_local(td)?;
        let expected = {
            let last = self.lock();
            if last.1 == snap.files {
                return Ok(true);
            }
            last.0
        };
        let bytes = serde_json::to_vec(&snap)?;
        match self.records.swap(SNAPSHOT, bytes, expected)? {
            Some(rev) => {
                *self.lock() = (rev, snap.files);
                tracing::info!(revision = rev, "wrote the federation CA's change to etcd");
                Ok(true)
            }
            None => {
                tracing::info!("another replica changed the federation CA first; taking its CA");
                self.pull(Some(td))?;
                Ok(false)
            }
        }
    }
}

/// The record part of the replicas' addresses.
pub const REPLICAS: &str = "replicas";

/// Every address the replicas registered in `records`, `first` first (a replica names itself
/// first to those it answers).
pub fn replica_addresses(records: &Records, first: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = first.to_vec();
    for (id, v) in records.list()? {
        let addrs: Vec<String> = serde_json::from_slice(&v)
            .with_context(|| format!("etcd record {REPLICAS}/{id} is not a list of addresses"))?;
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// What `meshfed federator token create|list|revoke --etcd-endpoints ...` needs, straight from
/// etcd (no state directory, no running replica needed).
#[derive(Debug)]
pub struct EtcdAdmin {
    pub tokens: TokenStore,
    ca: Records,
    replicas: Records,
}

impl EtcdAdmin {
    pub fn open(cfg: &meshfed_store::etcd::EtcdConfig) -> anyhow::Result<Self> {
        let conn = meshfed_store::etcd::Conn::open(cfg).with_context(|| {
            format!(
                "cannot reach etcd ({}, prefix {})",
                cfg.endpoints.join(","),
                cfg.prefix
            )
        })?;
        Ok(EtcdAdmin {
            tokens: tokens(Records::new(conn.clone(), "tokens")),
            ca: Records::new(conn.clone(), "ca"),
            replicas: Records::new(conn, REPLICAS),
        })
    }

    /// The federation CA's root fingerprint (what join tokens pin) and trust domain.
    pub fn federation(&self) -> anyhow::Result<(String, TrustDomain)> {
        self.with_ca(|ca| Ok((ca.root_fingerprint(), ca.trust_domain.clone())))
    }

    /// Runs `f` on the federation CA etcd holds (a working copy in a temporary directory).
    pub fn with_ca<T>(
        &self,
        f: impl FnOnce(&FederationCa) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let tmp = tempfile::tempdir()?;
        let shared = SharedCa {
            records: self.ca.clone(),
            state_dir: tmp.path().to_path_buf(),
            last: Mutex::new((0, BTreeMap::new())),
            applied: Default::default(),
        };
        anyhow::ensure!(
            shared.pull(None)?,
            "etcd holds no federation CA under this prefix: start a federator replica with --store etcd first"
        );
        let ca = FederationCa::open(tmp.path())?;
        f(&ca)
    }

    /// Every replica's advertised addresses, as they registered them.
    pub fn replicas(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for (id, v) in self.replicas.list()? {
            let addrs: Vec<String> = serde_json::from_slice(&v).with_context(|| {
                format!("etcd record {REPLICAS}/{id} is not a list of addresses")
            })?;
            for a in addrs {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }
}
