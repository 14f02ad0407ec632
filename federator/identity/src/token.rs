//! Join tokens: single-use, expiring, bound to one cluster name, carrying the federator
//! addresses and the federation CA fingerprint the joiner pins.
//!
//! The token string is `mft1.<base64url(JSON claims)>`. The federator keeps only a SHA-256 of
//! each token's secret, one file per token under `<state-dir>/tokens/` (mode 0600), written
//! atomically: creating, using and revoking a token never needs the running federator.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "mft1.";

/// What a token says. The secret authenticates it; everything else is for the joiner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub id: String,
    pub secret: String,
    pub cluster: String,
    pub federators: Vec<String>,
    /// SHA-256 (hex) of the federation root certificate.
    pub ca_sha256: String,
    pub federation_trust_domain: String,
    /// Unix seconds.
    pub expires: i64,
}

/// Which kind of one-time token an error is about (the messages name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A cluster's join token (`meshfed federator token create`).
    Join,
    /// A VM's token (`meshfed vm bootstrap`).
    Vm,
    /// A workload's token for the CA API (`meshfed workload token`).
    Workload,
}

impl TokenKind {
    fn renew(&self) -> &'static str {
        match self {
            TokenKind::Join => "create a new one with `meshfed federator token create`",
            TokenKind::Vm => "create a new package with `meshfed vm bootstrap` (a VM that joined once reconnects with its credential and needs no token)",
            TokenKind::Workload => "create a new one with `meshfed workload token` (a workload that holds a valid certificate renews with it and needs no token)",
        }
    }
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenKind::Join => "join token",
            TokenKind::Vm => "VM token",
            TokenKind::Workload => "workload token",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("the {0} is malformed: {1}")]
    Malformed(TokenKind, String),
    #[error("the {0} is not known here (forged, or from another federation or cluster)")]
    Unknown(TokenKind),
    #[error("the {0}'s secret does not match (forged)")]
    Forged(TokenKind),
    #[error("the {kind} was issued for {bound}, not {asked}")]
    WrongBinding {
        kind: TokenKind,
        bound: String,
        asked: String,
    },
    #[error("the {0} expired {1} seconds ago; {hint}", hint = .0.renew())]
    Expired(TokenKind, i64),
    #[error("the {0} was already used (by {1}); tokens are single-use")]
    Used(TokenKind, String),
    #[error("the {0} was revoked")]
    Revoked(TokenKind),
    #[error("token store: {0}")]
    Store(String),
}

/// `<prefix><base64url(JSON claims)>`.
pub fn encode_claims<T: Serialize>(prefix: &str, claims: &T) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(json))
}

/// The claims of a token made by [`encode_claims`]; every failure is `Malformed` with why.
pub fn decode_claims<T: serde::de::DeserializeOwned>(
    kind: TokenKind,
    prefix: &str,
    token: &str,
) -> Result<T, TokenError> {
    let body = token
        .trim()
        .strip_prefix(prefix)
        .ok_or_else(|| TokenError::Malformed(kind, format!("it does not start with {prefix:?}")))?;
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|e| TokenError::Malformed(kind, format!("not base64url: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(kind, e.to_string()))
}

impl Claims {
    pub fn encode(&self) -> String {
        encode_claims(PREFIX, self)
    }

    pub fn decode(token: &str) -> Result<Self, TokenError> {
        decode_claims(TokenKind::Join, PREFIX, token)
    }
}

/// A token as the federator stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub id: String,
    pub cluster: String,
    pub secret_sha256: String,
    pub created: i64,
    pub expires: i64,
    pub used_at: Option<i64>,
    pub used_by: Option<String>,
    pub revoked: bool,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

/// Token records kept where several federator replicas see them (etcd): each record has a
/// revision, and a write succeeds only if the record's revision is still the one read, so two
/// replicas can never both spend one token.
pub trait SharedRecords: Send + Sync + std::fmt::Debug {
    /// The record and its revision.
    fn get(&self, id: &str) -> Result<Option<(Vec<u8>, i64)>, String>;
    /// Every record: (id, value).
    fn list(&self) -> Result<Vec<(String, Vec<u8>)>, String>;
    /// Writes `value` if the record's revision is still `expected` (0: it must not exist);
    /// false when another writer changed it first.
    fn swap(&self, id: &str, value: Vec<u8>, expected: i64) -> Result<bool, String>;
}

#[derive(Debug, Clone)]
enum Records {
    /// One file per token in a directory (one federator, or an agent's VM tokens).
    Dir(PathBuf),
    Shared(std::sync::Arc<dyn SharedRecords>),
}

/// The token records.
#[derive(Debug, Clone)]
pub struct TokenStore {
    records: Records,
    kind: TokenKind,
}

impl TokenStore {
    pub fn new(state_dir: &Path) -> Self {
        Self::in_dir(state_dir.join("tokens"), TokenKind::Join)
    }

    /// A store of `kind` token records in `dir` (VM tokens live beside the agent's state).
    pub fn in_dir(dir: PathBuf, kind: TokenKind) -> Self {
        TokenStore {
            records: Records::Dir(dir),
            kind,
        }
    }

    /// A store of `kind` token records that federator replicas share.
    pub fn shared(records: std::sync::Arc<dyn SharedRecords>, kind: TokenKind) -> Self {
        TokenStore {
            records: Records::Shared(records),
            kind,
        }
    }

    /// Creates a record bound to `bound_to`, valid `ttl_secs`; returns it with the secret (which
    /// is stored only as a hash).
    pub fn create_bound(
        &self,
        bound_to: &str,
        ttl_secs: i64,
        now: i64,
    ) -> Result<(Record, String), TokenError> {
        let secret = random_hex(24);
        let rec = Record {
            id: random_hex(8),
            cluster: bound_to.to_string(),
            secret_sha256: sha256_hex(&secret),
            created: now,
            expires: now + ttl_secs,
            used_at: None,
            used_by: None,
            revoked: false,
        };
        if !self.write(&rec, 0)? {
            return Err(TokenError::Store(format!(
                "a token with id {} exists already",
                rec.id
            )));
        }
        Ok((rec, secret))
    }

    /// Checks a presented id and secret without using the token up.
    pub fn check_secret(
        &self,
        id: &str,
        secret: &str,
        bound_to: &str,
        now: i64,
    ) -> Result<Record, TokenError> {
        let rec = self.get(id)?.ok_or(TokenError::Unknown(self.kind))?;
        if rec.secret_sha256 != sha256_hex(secret) {
            return Err(TokenError::Forged(self.kind));
        }
        if rec.revoked {
            return Err(TokenError::Revoked(self.kind));
        }
        if let Some(by) = &rec.used_by {
            return Err(TokenError::Used(self.kind, by.clone()));
        }
        if rec.cluster != bound_to {
            return Err(TokenError::WrongBinding {
                kind: self.kind,
                bound: rec.cluster,
                asked: bound_to.to_string(),
            });
        }
        if now >= rec.expires {
            return Err(TokenError::Expired(self.kind, now - rec.expires));
        }
        Ok(rec)
    }

    fn check_id(&self, id: &str) -> Result<(), TokenError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed(
                self.kind,
                format!("token id {id:?} is not hexadecimal"),
            ));
        }
        Ok(())
    }

    fn path(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    /// Writes a record. Shared records are written only if their revision is still
    /// `expected` (see [`SharedRecords::swap`]); false when another writer came first.
    fn write(&self, rec: &Record, expected: i64) -> Result<bool, TokenError> {
        self.check_id(&rec.id)?;
        let json = serde_json::to_vec_pretty(rec).unwrap_or_default();
        match &self.records {
            Records::Dir(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| TokenError::Store(format!("{}: {e}", dir.display())))?;
                trust::files::write_atomic(
                    &Self::path(dir, &rec.id),
                    &json,
                    trust::files::PRIVATE_MODE,
                )
                .map_err(|e| TokenError::Store(e.to_string()))?;
                Ok(true)
            }
            Records::Shared(s) => s.swap(&rec.id, json, expected).map_err(TokenError::Store),
        }
    }

    /// The record and its revision (0 in a directory).
    fn get_rev(&self, id: &str) -> Result<Option<(Record, i64)>, TokenError> {
        self.check_id(id)?;
        let (bytes, rev, at) = match &self.records {
            Records::Dir(dir) => {
                let p = Self::path(dir, id);
                match std::fs::read(&p) {
                    Ok(b) => (b, 0, p.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(TokenError::Store(format!("{}: {e}", p.display()))),
                }
            }
            Records::Shared(s) => match s.get(id).map_err(TokenError::Store)? {
                Some((b, rev)) => (b, rev, format!("token record {id}")),
                None => return Ok(None),
            },
        };
        serde_json::from_slice(&bytes)
            .map(|r| Some((r, rev)))
            .map_err(|e| TokenError::Store(format!("{at}: {e}")))
    }

    pub fn get(&self, id: &str) -> Result<Option<Record>, TokenError> {
        Ok(self.get_rev(id)?.map(|(r, _)| r))
    }

    /// Creates a token for `cluster`, valid `ttl` seconds.
    pub fn create(
        &self,
        cluster: &str,
        ttl_secs: i64,
        federators: Vec<String>,
        ca_sha256: String,
        federation_trust_domain: String,
        now: i64,
    ) -> Result<(Record, String), TokenError> {
        let (rec, secret) = self.create_bound(cluster, ttl_secs, now)?;
        let claims = Claims {
            id: rec.id.clone(),
            secret,
            cluster: cluster.to_string(),
            federators,
            ca_sha256,
            federation_trust_domain,
            expires: rec.expires,
        };
        Ok((rec, claims.encode()))
    }

    pub fn list(&self) -> Result<Vec<Record>, TokenError> {
        let mut out = Vec::new();
        match &self.records {
            Records::Dir(dir) => {
                let rd = match std::fs::read_dir(dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(TokenError::Store(format!("{}: {e}", dir.display()))),
                };
                for entry in rd.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Some(id) = name.strip_suffix(".json") {
                        if let Some(r) = self.get(id)? {
                            out.push(r);
                        }
                    }
                }
            }
            Records::Shared(s) => {
                for (id, bytes) in s.list().map_err(TokenError::Store)? {
                    out.push(
                        serde_json::from_slice(&bytes)
                            .map_err(|e| TokenError::Store(format!("token record {id}: {e}")))?,
                    );
                }
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    pub fn revoke(&self, id: &str) -> Result<Record, TokenError> {
        loop {
            let (mut rec, rev) = self.get_rev(id)?.ok_or(TokenError::Unknown(self.kind))?;
            rec.revoked = true;
            if self.write(&rec, rev)? {
                return Ok(rec);
            }
            // Spent or revoked by another replica meanwhile: read it again.
        }
    }

    /// Checks a presented token without using it up.
    pub fn check(&self, claims: &Claims, cluster: &str, now: i64) -> Result<Record, TokenError> {
        self.check_secret(&claims.id, &claims.secret, cluster, now)
    }

    /// Marks a checked token used, durably. The record is read again first, so a revoke made
    /// meanwhile (by the CLI) is not overwritten. In a directory the caller serializes check +
    /// consume; shared records are spent with a compare on the revision read, so of two
    /// replicas spending one token at once exactly one succeeds and the other is told it was
    /// used.
    pub fn consume(&self, rec: Record, cluster: &str, now: i64) -> Result<(), TokenError> {
        loop {
            let (mut rec, rev) = self
                .get_rev(&rec.id)?
                .ok_or(TokenError::Unknown(self.kind))?;
            if rec.revoked {
                return Err(TokenError::Revoked(self.kind));
            }
            if let Some(by) = &rec.used_by {
                return Err(TokenError::Used(self.kind, by.clone()));
            }
            rec.used_at = Some(now);
            rec.used_by = Some(cluster.to_string());
            if self.write(&rec, rev)? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let d = tempfile::tempdir().unwrap();
        let s = TokenStore::new(d.path());
        let (rec, tok) = s
            .create(
                "east",
                900,
                vec!["127.0.0.1:15100".into()],
                "ab".into(),
                "fed.mesh".into(),
                1000,
            )
            .unwrap();
        let claims = Claims::decode(&tok).unwrap();
        assert_eq!(claims.cluster, "east");
        assert_eq!(
            s.check(&claims, "west", 1001).unwrap_err(),
            TokenError::WrongBinding {
                kind: TokenKind::Join,
                bound: "east".into(),
                asked: "west".into()
            }
        );
        assert!(matches!(
            s.check(&claims, "east", 1900),
            Err(TokenError::Expired(TokenKind::Join, 0))
        ));
        let mut forged = claims.clone();
        forged.secret = "00".into();
        assert_eq!(
            s.check(&forged, "east", 1001).unwrap_err(),
            TokenError::Forged(TokenKind::Join)
        );
        let mut unknown = claims.clone();
        unknown.id = "ffff".into();
        assert_eq!(
            s.check(&unknown, "east", 1001).unwrap_err(),
            TokenError::Unknown(TokenKind::Join)
        );
        let r = s.check(&claims, "east", 1001).unwrap();
        s.consume(r, "east", 1001).unwrap();
        assert_eq!(
            s.check(&claims, "east", 1002).unwrap_err(),
            TokenError::Used(TokenKind::Join, "east".into())
        );
        let (rec2, tok2) = s
            .create("west", 900, vec![], "ab".into(), "fed.mesh".into(), 1000)
            .unwrap();
        s.revoke(&rec2.id).unwrap();
        assert_eq!(
            s.check(&Claims::decode(&tok2).unwrap(), "west", 1001)
                .unwrap_err(),
            TokenError::Revoked(TokenKind::Join)
        );
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(s
            .list()
            .unwrap()
            .iter()
            .any(|r| r.id == rec.id && r.used_by.as_deref() == Some("east")));
        assert!(matches!(
            Claims::decode("abc"),
            Err(TokenError::Malformed(..))
        ));
        assert!(matches!(
            Claims::decode("mft1.!!"),
            Err(TokenError::Malformed(..))
        ));
        assert!(matches!(s.get("../x"), Err(TokenError::Malformed(..))));
    }
}
