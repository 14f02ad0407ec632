//! The CA directory as a store shared by processes: the running agent (which advances
//! rotation and issues its own certificates) and the command line (`meshfed ca rotate`,
//! `meshfed ca issue`). Every read-modify-write holds an exclusive lock on `<dir>/.lock`, and
//! every issuance records the latest `notAfter` its generation signed in `meshfed-ca.json`, so
//! a retiring root is kept until the last certificate any process issued under it has expired.

use std::fs::File;
use std::path::{Path, PathBuf};

use time::Duration;

use super::cacerts::{Metadata, METADATA};
use super::{CertificateAuthority, IssuancePolicy};
use crate::error::{Result, TrustError};
use crate::files;
use crate::keys;
use crate::spiffe_id::SpiffeId;
use crate::svid::Svid;

/// A CA directory written by [`CertificateAuthority::save`].
#[derive(Debug, Clone)]
pub struct CaDir {
    dir: PathBuf,
}

/// Held while a process reads or changes the CA directory; released on drop.
#[derive(Debug)]
pub struct CaLock {
    _file: File,
}

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory holds a CA saved by meshfed.
    pub fn exists(&self) -> bool {
        CertificateAuthority::exists_in(&self.dir)
    }

    /// Waits for the exclusive lock.
    pub fn lock(&self) -> Result<CaLock> {
        files::create_dir(&self.dir)?;
        let path = self.dir.join(".lock");
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(files::PRIVATE_MODE);
        }
        let file = opts.open(&path).map_err(|e| TrustError::io(&path, e))?;
        file.lock().map_err(|e| TrustError::io(&path, e))?;
        Ok(CaLock { _file: file })
    }

    /// The raw `meshfed-ca.json`: what a process compares to see whether another one changed
    /// the CA.
    pub fn metadata(&self, _lock: &CaLock) -> Result<Vec<u8>> {
        files::read(&self.dir.join(METADATA))
    }

    /// Loads the CA (the caller holds the lock).
    pub fn load(&self, _lock: &CaLock) -> Result<CertificateAuthority> {
        CertificateAuthority::load(&self.dir)
    }

    /// Saves the CA (the caller holds the lock), keeping every issuance another process
    /// recorded meanwhile.
    pub fn save(&self, lock: &CaLock, ca: &CertificateAuthority) -> Result<()> {
        self.merge_recorded(lock, ca)?;
        ca.save(&self.dir)
    }

    /// Loads the CA, changes it with `f` and saves it, all under the lock.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut CertificateAuthority) -> Result<T>,
    ) -> Result<(T, CertificateAuthority)> {
        let lock = self.lock()?;
        let mut ca = self.load(&lock)?;
        let out = f(&mut ca)?;
        self.save(&lock, &ca)?;
        Ok((out, ca))
    }

    /// Issues an SVID from the CA on disk and records the issuance (for tools such as
    /// `meshfed ca issue`; a running agent uses its live CA and [`CaDir::record_issued`]).
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> Result<(Svid, CertificateAuthority)> {
        let lock = self.lock()?;
        let ca = self.load(&lock)?;
        let svid = ca.issue_svid(id, policy, ttl)?;
        self.record_issued_locked(&lock, &ca)?;
        Ok((svid, ca))
    }

    /// Writes the latest expiry each generation of `ca` has signed into `meshfed-ca.json`
    /// (the larger of what is there and what `ca` knows). Returns the file as it was found and
    /// as it is now: a holder of `ca` that finds the first different from what it last saw
    /// knows another process changed the CA.
    pub fn record_issued(&self, ca: &CertificateAuthority) -> Result<(Vec<u8>, Vec<u8>)> {
        let lock = self.lock()?;
        let before = self.metadata(&lock)?;
        let after = self.record_issued_locked(&lock, ca)?;
        Ok((before, after))
    }

    fn record_issued_locked(&self, lock: &CaLock, ca: &CertificateAuthority) -> Result<Vec<u8>> {
        let path = self.dir.join(METADATA);
        let mut meta = self.read_meta(lock)?;
        let mut changed = false;
        for g in ca.generations() {
            let fp = keys::fingerprint(&g.root);
            let mine = g
                .last_issued_expiry
                .load(std::sync::atomic::Ordering::Acquire);
            if let Some(m) = meta
                .generations
                .iter_mut()
                .find(|m| m.root_fingerprint.as_deref() == Some(fp.as_str()))
            {
                if mine > m.last_issued_expiry {
                    m.last_issued_expiry = mine;
                    changed = true;
                }
            }
        }
        if !changed {
            return files::read(&path);
        }
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| TrustError::Ca(e.to_string()))?;
        files::write_atomic(&path, &json, files::PUBLIC_MODE)?;
        Ok(json)
    }

    /// Raises `ca`'s recorded expiries to what the file on disk holds (call before advancing a
    /// CA held in memory, so retirement counts certificates other processes issued).
    pub fn merge_recorded(&self, lock: &CaLock, ca: &CertificateAuthority) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        let meta = self.read_meta(lock)?;
        for g in ca.generations() {
            let fp = keys::fingerprint(&g.root);
            if let Some(m) = meta
                .generations
                .iter()
                .find(|m| m.root_fingerprint.as_deref() == Some(fp.as_str()))
            {
                g.last_issued_expiry
                    .fetch_max(m.last_issued_expiry, std::sync::atomic::Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn read_meta(&self, _lock: &CaLock) -> Result<Metadata> {
        let path = self.dir.join(METADATA);
        let raw = files::read(&path)?;
        serde_json::from_slice(&raw).map_err(|e| TrustError::Ca(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::policy::AnyWorkload;
    use crate::ca::{CaOptions, GenerationState};
    use crate::spiffe_id::TrustDomain;
    use time::OffsetDateTime;

    fn setup() -> (tempfile::TempDir, CaDir) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("east.mesh").unwrap();
        let ca = CertificateAuthority::create(td, CaOptions::default()).unwrap();
        ca.save(dir.path()).unwrap();
        let store = CaDir::new(dir.path());
        (dir, store)
    }

    /// A certificate issued by one process is remembered by the CA another process saves
    /// later, so the retiring root outlives it.
    #[test]
    fn issuance_by_another_process_keeps_the_old_root_until_its_leaf_expires() {
        let (_d, store) = setup();
        let id = SpiffeId::new("spiffe://east.mesh/ns/a/sa/b").unwrap();
        // The "agent" holds the CA in memory from before the tool's issuance.
        let lock = store.lock().unwrap();
        let mut agent = store.load(&lock).unwrap();
        drop(lock);
        // The "tool" issues a long leaf from the files.
        let (leaf, _) = store
            .issue_svid(&id, &AnyWorkload, Duration::hours(5))
            .unwrap();
        // The agent rotates what it holds in memory, under the lock.
        let t0 = OffsetDateTime::now_utc();
        let lock = store.lock().unwrap();
        store.merge_recorded(&lock, &agent).unwrap();
        agent.begin_rotation(t0, Duration::ZERO).unwrap();
        agent.advance(t0);
        store.save(&lock, &agent).unwrap();
        let back = store.load(&lock).unwrap();
        let GenerationState::Retiring { remove_after } = back.generations()[0].state().clone()
        else {
            panic!("{:?}", back.generations()[0].state())
        };
        assert!(
            remove_after >= leaf.not_after - Duration::seconds(1),
            "the old root would leave at {remove_after}, before the tool's leaf expires at {}",
            leaf.not_after
        );
    }

    #[test]
    fn update_changes_and_saves_under_the_lock() {
        let (_d, store) = setup();
        let now = OffsetDateTime::now_utc();
        let ((), ca) = store
            .update(|ca| ca.begin_rotation(now, Duration::minutes(5)))
            .unwrap();
        assert_eq!(ca.bundle_sequence(), 2);
        let lock = store.lock().unwrap();
        assert_eq!(store.load(&lock).unwrap().bundle_sequence(), 2);
        drop(lock);
        // A second start is refused and nothing is written.
        let e = store
            .update(|ca| ca.begin_rotation(now, Duration::minutes(5)))
            .unwrap_err();
        assert!(e.to_string().contains("already in progress"), "{e}");
    }
}
