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
