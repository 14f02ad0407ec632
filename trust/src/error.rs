//! The trust crate's error type. Every variant names what was being processed (a file, a
//! field, an identity) and why it was refused, so the command line can print one clear line.

use std::path::PathBuf;

use crate::bundle::BundleError;
use crate::spiffe_id::ParseIdError;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Id(#[from] ParseIdError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: {reason}")]
    Key { what: String, reason: String },
    #[error("{what}: {reason}")]
    Certificate { what: String, reason: String },
    #[error("certificate signing request: {0}")]
    Csr(String),
    #[error("refused to issue {id}: {reason}")]
    Refused { id: String, reason: String },
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

impl TrustError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrustError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn cert(what: impl Into<String>, reason: impl Into<String>) -> Self {
        TrustError::Certificate {
            what: what.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn key(what: impl Into<String>, reason: impl Into<String>) -> Self {
        TrustError::Key {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = TrustError> = std::result::Result<T, E>;
