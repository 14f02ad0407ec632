//! The status report `meshfed status` prints, as JSON for the admin API. Every figure is
//! measured (heartbeat ages, acknowledged versions, lag), never assumed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterReport {
    pub cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub locality: String,
    pub gateways: Vec<String>,
    pub connected: bool,
    /// `fresh`, `stale` or `left`.
    pub lease: String,
    /// Milliseconds since the last heartbeat; absent when none was seen since the federator started.
    pub last_heartbeat_age_ms: Option<u64>,
    pub exports: u64,
    pub imports: u64,
    /// The services it may see, by exporting cluster (the dashboard's import edges).
    #[serde(default)]
    pub imports_from: std::collections::BTreeMap<String, u64>,
    pub exports_acked_version: u64,
    pub imports_acked_revision: u64,
    pub import_lag: u64,
    pub bundle_sequence: u64,
    /// RFC 3339 expiry of the cluster's newest bundle root, when known.
    pub bundle_not_after: Option<String>,
    pub conflicts: Vec<String>,
    /// When an operator removed it (`meshfed federator evict`): by whom, when and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FederationReport {
    pub kind: String,
    pub federation_trust_domain: String,
    pub federation_ca_not_after: String,
    /// The federation CA's generations (rotation) and who a pending root waits on.
    #[serde(default)]
    pub federation_ca: meshfed_identity::live_ca::CaReport,
    pub head_revision: u64,
    pub lease_ttl_ms: u64,
    pub clusters: Vec<ClusterReport>,
    /// Where the federation's state lives.
    #[serde(default)]
    pub store: StoreReport,
}

/// The federator's store as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreReport {
    /// `sled` or `etcd`.
    pub backend: String,
    /// Why the store takes no writes now (etcd unreachable), since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Tombstones of removed exports held (dropped once every member has read them).
    #[serde(default)]
    pub tombstones: u64,
    /// The newest revision of a dropped tombstone: a member that applied less is resynced.
    #[serde(default)]
    pub floor: u64,
}

impl FederationReport {
    /// What is wrong with the federator itself (`meshfed status` exits 1). Its member clusters'
    /// states are [`peer_problems`](Self::peer_problems).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = &self.store.unavailable {
            out.push(format!(
                "the state store ({}) takes no writes: {why}",
                self.store.backend
            ));
        }
        out
    }

    /// Member clusters that are disconnected, stale or in conflict (`meshfed status` exits 3
    /// when only these are found).
    pub fn peer_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.clusters {
            if c.lease == "left" {
                continue;
            }
            if !c.connected {
                out.push(format!("cluster {} is not connected", c.cluster));
            }
            if c.lease == "stale" {
                out.push(match c.last_heartbeat_age_ms {
                    Some(ms) => format!(
                        "cluster {} is stale (last heartbeat {:.1}s ago)",
                        c.cluster,
                        ms as f64 / 1000.0
                    ),
                    None => format!(
                        "cluster {} is stale (no heartbeat since this federator started)",
                        c.cluster
                    ),
                });
            }
            for x in &c.conflicts {
                out.push(format!("cluster {}: conflict: {x}", c.cluster));
            }
        }
        out
    }
}
