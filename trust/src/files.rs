//! Writing credentials to disk: atomically (write a temporary file, then rename) and with
//! the right modes. Private keys are always 0600.

use std::io::Write;
use std::path::Path;

use crate::error::{Result, TrustError};

/// Mode for private keys.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode for certificates and bundles.
pub const PUBLIC_MODE: u32 = 0o644;

/// Writes `contents` to `path` atomically with the given Unix mode. The temporary file is
/// created with the final mode, so a key is never readable by others, even briefly.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| TrustError::io(path, std::io::Error::other("not a file path")))?;
    // Unique per process and per call: two writers of one file in one process (an
    // agent and the CLI it embeds, or two tasks) must not share a temporary file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp{}.{seq}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(|e| TrustError::io(&tmp, e))?;
    #[cfg(unix)]
    {
        // The mode given to open() is masked by the umask; set it exactly.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| TrustError::io(&tmp, e))?;
    }
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| TrustError::io(&tmp, e));
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TrustError::io(path, e)
    })?;
    Ok(())
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| TrustError::io(path, e))
}

/// Creates a directory (and parents), naming it in the error.
pub fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| TrustError::io(path, e))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_0600_even_with_open_umask() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&p, b"secret", PRIVATE_MODE).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }
}

/// The text files of some directories of a state directory, as one value (what replicas
/// share through a Kubernetes Secret or etcd): path relative to the state directory ->
/// contents. Lock and temporary files (names starting with `.`) are not part of it.
pub mod snapshot {
    use std::collections::BTreeMap;
    use std::path::{Component, Path, PathBuf};

    use crate::error::{Result, TrustError};

    /// Reads every file under `state_dir/<d>` for each of `dirs`.
    pub fn read(state_dir: &Path, dirs: &[&str]) -> Result<BTreeMap<String, String>> {
        let mut files = BTreeMap::new();
        for d in dirs {
            collect(state_dir, &state_dir.join(d), &mut files)?;
        }
        Ok(files)
    }

    /// Writes every file into the state directory (atomically each; `*key.pem` 0600) and
    /// returns how many differed from what was there. A path that is not a file under one of
    /// `dirs`, or that would leave the directory, is refused before anything is written.
    pub fn write(
        state_dir: &Path,
        files: &BTreeMap<String, String>,
        dirs: &[&str],
    ) -> Result<usize> {
        let mut paths = Vec::new();
        for (rel, contents) in files {
            paths.push((safe_join(state_dir, rel, dirs)?, rel, contents));
        }
        let mut changed = 0;
        for (path, rel, contents) in paths {
            if std::fs::read(&path).ok().as_deref() == Some(contents.as_bytes()) {
                continue;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| TrustError::io(parent, e))?;
            }
            let mode = if rel.ends_with("key.pem") {
                super::PRIVATE_MODE
            } else {
                super::PUBLIC_MODE
            };
            super::write_atomic(&path, contents.as_bytes(), mode)?;
            changed += 1;
        }
        Ok(changed)
    }

    fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| TrustError::io(dir, e))?;
        for e in entries {
            let e = e.map_err(|e| TrustError::io(dir, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let ft = e.file_type().map_err(|e| TrustError::io(&path, e))?;
            if ft.is_dir() {
                collect(root, &path, out)?;
                continue;
            }
            let contents = std::fs::read_to_string(&path).map_err(|e| TrustError::io(&path, e))?;
            let rel = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().to_string())
                .map_err(|_| {
                    TrustError::io(&path, std::io::Error::other("outside the state directory"))
                })?;
            out.insert(rel, contents);
        }
        Ok(())
    }

    /// `root/rel`, refusing absolute paths, `..`, hidden names and anything outside `dirs`
    /// (a snapshot's paths are data, not trusted).
    pub fn safe_join(root: &Path, rel: &str, dirs: &[&str]) -> Result<PathBuf> {
        let p = Path::new(rel);
        let ok = !rel.is_empty()
            && p.components().all(
                |c| matches!(c, Component::Normal(n) if !n.to_string_lossy().starts_with('.')),
            )
            && dirs.iter().any(|d| p.starts_with(d) && p != Path::new(d));
        if !ok {
            return Err(TrustError::io(
                Path::new(rel),
                std::io::Error::other(format!(
                    "not a file under {} (nor a hidden one)",
                    dirs.iter()
                        .map(|d| format!("{d}/"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
            ));
        }
        Ok(root.join(p))
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::snapshot;

    #[test]
    fn a_snapshot_round_trips_and_refuses_paths_outside_its_directories() {
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("ca/generations/0")).unwrap();
        std::fs::write(a.path().join("ca/root-cert.pem"), "root").unwrap();
        std::fs::write(a.path().join("ca/generations/0/ca-key.pem"), "key").unwrap();
        std::fs::write(a.path().join("ca/.lock"), "").unwrap();
        std::fs::write(a.path().join("other.txt"), "not shared").unwrap();
        let files = snapshot::read(a.path(), &["ca"]).unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["ca/generations/0/ca-key.pem", "ca/root-cert.pem"]
        );
        let b = tempfile::tempdir().unwrap();
        assert_eq!(snapshot::write(b.path(), &files, &["ca"]).unwrap(), 2);
        assert_eq!(snapshot::write(b.path(), &files, &["ca"]).unwrap(), 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(b.path().join("ca/generations/0/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, super::PRIVATE_MODE);
        for bad in [
            "../x",
            "/etc/passwd",
            "ca",
            "ca/.lock",
            "identity/x",
            "ca/../../x",
            "",
        ] {
            let mut f = files.clone();
            f.insert(bad.to_string(), "x".into());
            let e = snapshot::write(b.path(), &f, &["ca"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a file under ca/"), "{bad}: {e}");
        }
    }
}
