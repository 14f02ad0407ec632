//! VM join tokens and VM records, both files in the agent's state directory.
//!
//! A token (`mvt1.<base64url(JSON claims)>`) is single-use, expires, and is bound to one
//! WorkloadGroup (namespace, group, service account) of one cluster. The agent keeps only the
//! SHA-256 of its secret (`<state>/vm-tokens/<id>.json`, 0600), so `meshfed vm bootstrap` can
//! create tokens without the running agent. A used token becomes a VM record
//! (`<state>/vms/<id>.json`): the VM's durable identity, which its credential certificate
//! (`spiffe://<td>/meshfed/vm/<id>`) names and `meshfed vm revoke` ends.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use meshfed_identity::token::{TokenKind, TokenStore};
pub use meshfed_identity::vm_token::{binding, VmClaims};

pub fn token_store(state_dir: &Path) -> TokenStore {
    TokenStore::in_dir(state_dir.join("vm-tokens"), TokenKind::Vm)
}

/// A VM that joined: its durable identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmRecord {
    pub vm_id: String,
    pub namespace: String,
    pub group: String,
    pub service_account: String,
    /// Unix seconds.
    pub joined: i64,
    pub last_seen: i64,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct VmStore {
    dir: PathBuf,
}

impl VmStore {
    pub fn new(state_dir: &Path) -> Self {
        VmStore {
            dir: state_dir.join("vms"),
        }
    }

    fn path(&self, id: &str) -> anyhow::Result<PathBuf> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            anyhow::bail!("VM id {id:?} is not hexadecimal");
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<VmRecord>> {
        let p = self.path(id)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", p.display())),
        }
    }

    pub fn put(&self, r: &VmRecord) -> anyhow::Result<()> {
        let _lock = self.lock()?;
        self.write(r)
    }

    /// Read-modify-write of one record under the store's lock, so that a concurrent
    /// writer (the agent noting `last_seen`, `meshfed vm revoke` in another process)
    /// cannot undo this change or have its own undone. `None` when there is no such VM.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> anyhow::Result<Option<VmRecord>> {
        let _lock = self.lock()?;
        let Some(mut r) = self.get(id)? else {
            return Ok(None);
        };
        change(&mut r);
        self.write(&r)?;
        Ok(Some(r))
    }

    fn write(&self, r: &VmRecord) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(r)?;
        trust::files::write_atomic(&self.path(&r.vm_id)?, &json, trust::files::PRIVATE_MODE)?;
        Ok(())
    }

    /// An exclusive advisory lock on `<dir>/.lock`, held until the file is dropped;
    /// it serialises writers across threads and processes.
    fn lock(&self) -> anyhow::Result<std::fs::File> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.dir.display()))?;
        let p = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        f.lock()
            .map_err(|e| anyhow::anyhow!("locking {}: {e}", p.display()))?;
        Ok(f)
    }

    pub fn list(&self) -> anyhow::Result<Vec<VmRecord>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if let Some(r) = self.get(id)? {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| (a.joined, &a.vm_id).cmp(&(b.joined, &b.vm_id)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_identity::token::TokenError;

    #[test]
    fn claims_round_trip_and_bad_tokens() {
        let c = VmClaims {
            id: "ab12".into(),
            secret: "s".into(),
            cluster: "east".into(),
            trust_domain: "east.mesh".into(),
            namespace: "shop".into(),
            group: "payment-vm".into(),
            service_account: "payment".into(),
            expires: 5,
        };
        assert_eq!(VmClaims::decode(&c.encode()).unwrap(), c);
        for bad in ["", "mft1.abc", "mvt1.!!", "mvt1.e30"] {
            assert!(
                matches!(VmClaims::decode(bad), Err(TokenError::Malformed(..))),
                "{bad}"
            );
        }
    }

    fn record(id: &str) -> VmRecord {
        VmRecord {
            vm_id: id.into(),
            namespace: "shop".into(),
            group: "g".into(),
            service_account: "sa".into(),
            joined: 1,
            last_seen: 1,
            revoked: false,
        }
    }

    #[test]
    fn records() {
        let d = tempfile::tempdir().unwrap();
        let s = VmStore::new(d.path());
        assert!(s.get("00ff").unwrap().is_none());
        assert!(s.get("../etc").is_err());
        let r = record("00ff");
        s.put(&r).unwrap();
        assert_eq!(s.get("00ff").unwrap().unwrap(), r);
        assert_eq!(s.list().unwrap().len(), 1);
        assert!(s.update("0aaa", |r| r.revoked = true).unwrap().is_none());
    }

    /// A revocation racing with the agent's `last_seen` updates (threads here; the CLI
    /// and the agent are separate processes in production, and the lock is a file
    /// lock) is never undone, and no writer fails on another's temporary file.
    #[test]
    fn concurrent_updates_keep_a_revocation() {
        let d = tempfile::tempdir().unwrap();
        let s = VmStore::new(d.path());
        s.put(&record("00ff")).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4i64 {
                let s = s.clone();
                scope.spawn(move || {
                    for i in 0..50 {
                        s.update("00ff", |r| r.last_seen = t * 1000 + i).unwrap();
                    }
                });
            }
            let s = s.clone();
            scope.spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                s.update("00ff", |r| r.revoked = true).unwrap();
            });
        });
        assert!(s.get("00ff").unwrap().unwrap().revoked);
        let leftovers: Vec<_> = std::fs::read_dir(d.path().join("vms"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
