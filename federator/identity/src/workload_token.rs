//! Workload tokens (`mwt1.<base64url(JSON claims)>`): how a workload outside Kubernetes (a
//! process on a host, the demo's workloads) authenticates to the agent's CA API once, where a
//! pod would send its service-account token. Single-use, expiring, bound to one service
//! account (namespace, name) of one cluster. The agent keeps only the SHA-256 of the secret
//! (`<state>/workload-tokens/<id>.json`, 0600), so `meshfed workload token` creates them beside
//! the agent's state without the running agent. After its first certificate, the workload
//! renews with the certificate it holds.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::token::{decode_claims, encode_claims, Record, TokenError, TokenKind, TokenStore};

const PREFIX: &str = "mwt1.";

/// What a workload token says; the secret authenticates it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadClaims {
    pub id: String,
    pub secret: String,
    pub cluster: String,
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// Unix seconds.
    pub expires: i64,
}

impl WorkloadClaims {
    pub fn encode(&self) -> String {
        encode_claims(PREFIX, self)
    }

    pub fn decode(token: &str) -> Result<Self, TokenError> {
        decode_claims(TokenKind::Workload, PREFIX, token)
    }

    /// What the token record is bound to.
    pub fn binding(&self) -> String {
        binding(&self.namespace, &self.service_account)
    }
}

/// Whether `token` is a workload token (rather than, say, a Kubernetes service-account token).
pub fn is_workload_token(token: &str) -> bool {
    token.trim().starts_with(PREFIX)
}

pub fn binding(namespace: &str, service_account: &str) -> String {
    format!("service account {namespace}/{service_account}")
}

pub fn token_store(state_dir: &Path) -> TokenStore {
    TokenStore::in_dir(state_dir.join("workload-tokens"), TokenKind::Workload)
}

/// Creates a token for `namespace/service_account` of this cluster, valid `ttl_secs`.
pub fn create(
    state_dir: &Path,
    cluster: &str,
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
    ttl_secs: i64,
    now: i64,
) -> Result<(Record, String), TokenError> {
    let (rec, secret) =
        token_store(state_dir).create_bound(&binding(namespace, service_account), ttl_secs, now)?;
    let claims = WorkloadClaims {
        id: rec.id.clone(),
        secret,
        cluster: cluster.into(),
        trust_domain: trust_domain.into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
        expires: rec.expires,
    };
    Ok((rec, claims.encode()))
}

/// Spends a presented token: checks it against its record (the secret, this cluster, its
/// binding, expiry, not used or revoked) and marks it used. The caller serializes calls.
pub fn spend(
    store: &TokenStore,
    token: &str,
    cluster: &str,
    now: i64,
) -> Result<WorkloadClaims, TokenError> {
    let claims = WorkloadClaims::decode(token)?;
    if claims.cluster != cluster {
        return Err(TokenError::WrongBinding {
            kind: TokenKind::Workload,
            bound: format!("cluster {}", claims.cluster),
            asked: format!("cluster {cluster}"),
        });
    }
    let rec = store.check_secret(&claims.id, &claims.secret, &claims.binding(), now)?;
    store.consume(rec, "a certificate request", now)?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_is_spent_once_for_its_account_of_its_cluster() {
        let d = tempfile::tempdir().unwrap();
        let (_, tok) = create(d.path(), "eu", "eu.mesh", "shop", "order", 600, 1000).unwrap();
        assert!(is_workload_token(&tok));
        let store = token_store(d.path());
        assert!(matches!(
            spend(&store, &tok, "east", 1001).unwrap_err(),
            TokenError::WrongBinding { .. }
        ));
        // Expired.
        assert!(matches!(
            spend(&store, &tok, "eu", 1600).unwrap_err(),
            TokenError::Expired(TokenKind::Workload, 0)
        ));
        let c = spend(&store, &tok, "eu", 1001).unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.service_account.as_str()),
            ("shop", "order")
        );
        assert!(matches!(
            spend(&store, &tok, "eu", 1002).unwrap_err(),
            TokenError::Used(TokenKind::Workload, _)
        ));
        // Claims changed to another account: the record's binding refuses them.
        let (_, tok2) = create(d.path(), "eu", "eu.mesh", "shop", "order", 600, 1000).unwrap();
        let mut c2 = WorkloadClaims::decode(&tok2).unwrap();
        c2.service_account = "admin".into();
        assert!(matches!(
            spend(&store, &c2.encode(), "eu", 1001).unwrap_err(),
            TokenError::WrongBinding { .. }
        ));
        c2.service_account = "order".into();
        c2.secret = "00".into();
        assert_eq!(
            spend(&store, &c2.encode(), "eu", 1001).unwrap_err(),
            TokenError::Forged(TokenKind::Workload)
        );
        assert!(matches!(
            spend(&store, "mwt1.!!", "eu", 1001).unwrap_err(),
            TokenError::Malformed(TokenKind::Workload, _)
        ));
    }
}
