//! A snapshot of the services a cluster can reach: its own services and the imported ones, with
//! the source cluster's network, gateways, locality and lease state, and the peers' trust
//! bundles. Snapshots are immutable; [`crate::store`] publishes a new one on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proto::{ClusterFacts, LeaseState, OnExpiry, PeerCluster, ServiceExport};

/// Services by `ns/name`, shared: a snapshot, a view or a set of exports that keeps a service
/// unchanged shares it with the one before, so copying and comparing them costs little.
pub type Services = BTreeMap<String, Arc<ServiceExport>>;

/// One instance of a service: where it runs and what the federation says about that place.
/// It borrows from the snapshot, so listing every instance of a large mesh copies nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Instance<'a> {
    pub cluster: &'a str,
    pub local: bool,
    pub network: &'a str,
    pub gateways: &'a [String],
    /// False when the source cluster's lease expired.
    pub fresh: bool,
    pub last_heartbeat_age_ms: u64,
    /// Shared with the snapshot (compare by pointer to tell an unchanged service).
    pub export: &'a Arc<ServiceExport>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub facts: ClusterFacts,
    /// This cluster's services (exported or not), by `ns/name`.
    pub local: Services,
    /// Which of `local` the cluster exports (`export: true` or `exportTo`), by `ns/name`: the
    /// only ones its east-west gateways route to.
    pub exported: BTreeSet<String>,
    /// Imported services by (source cluster, `ns/name`).
    pub imports: BTreeMap<(String, String), Arc<ServiceExport>>,
    pub peers: BTreeMap<String, PeerCluster>,
    /// Peer trust bundles: trust domain -> JSON.
    pub bundles: BTreeMap<String, String>,
    pub federator_connected: bool,
    pub applied_revision: u64,
}

impl Snapshot {
    /// Every reachable service, by `ns/name`, with one instance per cluster. Instances of a
    /// stale cluster whose service says `withdraw` are left out; `deprioritize` keeps them,
    /// marked not fresh, for the failover tables to rank last.
    pub fn services(&self) -> BTreeMap<String, Vec<Instance<'_>>> {
        let mut all = self.instances();
        for v in all.values_mut() {
            v.retain(|i| i.fresh || i.export.on_expiry != OnExpiry::Withdraw as i32);
        }
        all.retain(|_, v| !v.is_empty());
        all
    }

    /// Every instance, stale ones included whatever their staleness setting (a failover policy
    /// may override it).
    pub fn instances(&self) -> BTreeMap<String, Vec<Instance<'_>>> {
        let mut out: BTreeMap<String, Vec<Instance<'_>>> = BTreeMap::new();
        for (k, e) in &self.local {
            out.entry(k.clone()).or_default().push(Instance {
                cluster: &self.facts.cluster_id,
                local: true,
                network: &self.facts.network,
                gateways: &self.facts.gateways,
                fresh: true,
                last_heartbeat_age_ms: 0,
                export: e,
            });
        }
        for ((cluster, k), e) in &self.imports {
            let peer = self.peers.get(cluster);
            let fresh = peer.is_some_and(|p| p.lease == LeaseState::Fresh as i32);
            let facts = peer.and_then(|p| p.facts.as_ref());
            out.entry(k.clone()).or_default().push(Instance {
                cluster,
                local: false,
                network: facts.map(|f| f.network.as_str()).unwrap_or_default(),
                gateways: facts.map(|f| f.gateways.as_slice()).unwrap_or_default(),
                fresh,
                last_heartbeat_age_ms: peer.map(|p| p.last_heartbeat_age_ms).unwrap_or(0),
                export: e,
            });
        }
        out
    }
}

/// The bundle JSON of the cluster's own trust domain and of every peer bundle it holds, by
/// trust domain (unchecked: [`bundle_map_document`] keeps only those that parse).
pub fn bundles_by_trust_domain(
    own_td: &str,
    own_json: &str,
    snap: &Snapshot,
) -> std::collections::BTreeMap<String, String> {
    let mut out: std::collections::BTreeMap<String, String> = snap
        .bundles
        .iter()
        .map(|(td, j)| (td.clone(), j.clone()))
        .collect();
    out.insert(own_td.to_string(), own_json.to_string());
    out
}

/// A SPIFFE bundle map (gRFC A87) `{"trust_domains": {"<td>": <bundle>}}` of `bundles`
/// (trust domain -> bundle JSON). A bundle that does not parse as a SPIFFE bundle of its own
/// trust domain is left out, with a warning.
pub fn bundle_map_document<'a>(
    bundles: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> serde_json::Value {
    let mut domains = serde_json::Map::new();
    for (td, json) in bundles {
        let ok = trust::TrustDomain::new(td)
            .ok()
            .and_then(|d| trust::TrustBundle::from_json(d, json, td).ok())
            .is_some();
        match serde_json::from_str::<serde_json::Value>(json) {
            Ok(v) if ok => {
                domains.insert(td.clone(), v);
            }
            _ => tracing::warn!(trust_domain = %td, "bundle left out of the bundle map"),
        }
    }
    serde_json::json!({ "trust_domains": domains })
}

/// The roots of the cluster's own trust domain and of every peer bundle it holds, by trust
/// domain (own first). A bundle that does not parse is left out, with a warning.
pub fn trust_roots(
    own_td: &str,
    own_json: &str,
    snap: &Snapshot,
) -> Vec<(String, Vec<rustls_pki_types::CertificateDer<'static>>)> {
    let mut out = Vec::new();
    let bundles = std::iter::once((own_td, own_json)).chain(
        snap.bundles
            .iter()
            .filter(|(td, _)| td.as_str() != own_td)
            .map(|(td, j)| (td.as_str(), j.as_str())),
    );
    for (td, json) in bundles {
        let parsed = trust::TrustDomain::new(td)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                trust::TrustBundle::from_json(d, json, &format!("bundle of {td}"))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(b) => out.push((td.to_string(), b.x509_authorities)),
            Err(e) => {
                tracing::warn!(trust_domain = %td, error = %e, "bundle left out of the trust roots")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(on_expiry: OnExpiry) -> ServiceExport {
        ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            on_expiry: on_expiry as i32,
            ..Default::default()
        }
    }

    fn peer(id: &str, lease: LeaseState) -> PeerCluster {
        PeerCluster {
            facts: Some(ClusterFacts {
                cluster_id: id.into(),
                network: format!("{id}-net"),
                ..Default::default()
            }),
            lease: lease as i32,
            last_heartbeat_age_ms: 5,
            connected: true,
            heartbeat_seen: true,
        }
    }

    #[test]
    fn stale_peers_are_ranked_or_withdrawn_per_policy() {
        let mut s = Snapshot::default();
        s.imports.insert(
            ("east".into(), "shop/payment".into()),
            Arc::new(export(OnExpiry::Deprioritize)),
        );
        s.imports.insert(
            ("west".into(), "shop/payment".into()),
            Arc::new(export(OnExpiry::Withdraw)),
        );
        s.peers
            .insert("east".into(), peer("east", LeaseState::Stale));
        s.peers
            .insert("west".into(), peer("west", LeaseState::Fresh));
        let svc = &s.services()["shop/payment"];
        assert_eq!(svc.len(), 2);
        assert!(!svc.iter().find(|i| i.cluster == "east").unwrap().fresh);
        assert_eq!(
            svc.iter().find(|i| i.cluster == "west").unwrap().network,
            "west-net"
        );
        s.peers
            .insert("west".into(), peer("west", LeaseState::Stale));
        let svc = &s.services()["shop/payment"];
        assert_eq!(svc.len(), 1, "withdraw drops the stale instance");
    }
}
