//! VM join tokens (`mvt1.<base64url(JSON claims)>`): single-use, expiring, bound to one
//! WorkloadGroup (namespace, group, service account) of one cluster. The agent that issued one
//! keeps only the SHA-256 of its secret; the VM presents the whole token once.

use serde::{Deserialize, Serialize};

use crate::token::{decode_claims, encode_claims, TokenError, TokenKind};

const PREFIX: &str = "mvt1.";

/// What a VM token says; the secret authenticates it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmClaims {
    pub id: String,
    pub secret: String,
    pub cluster: String,
    pub trust_domain: String,
    pub namespace: String,
    pub group: String,
    pub service_account: String,
    /// Unix seconds.
    pub expires: i64,
}

impl VmClaims {
    pub fn encode(&self) -> String {
        encode_claims(PREFIX, self)
    }

    pub fn decode(token: &str) -> Result<Self, TokenError> {
        decode_claims(TokenKind::Vm, PREFIX, token)
    }

    /// What the token record is bound to.
    pub fn binding(&self) -> String {
        binding(&self.namespace, &self.group, &self.service_account)
    }
}

pub fn binding(namespace: &str, group: &str, service_account: &str) -> String {
    format!("workloadgroup {namespace}/{group} as {service_account}")
}
