//! The sink: what the agent writes to the Kubernetes API. For now, one MCS `ServiceImport` per
//! service the cluster imports from another cluster (type `ClusterSetIP`, the union of the
//! exporters' ports, `ips` = the service's meshfed VIP, `status.clusters` = the exporting
//! clusters), written with server-side apply under one field manager, only when it changed, and
//! labelled `app.kubernetes.io/managed-by: meshfed`. A ServiceImport is deleted only when it
//! carries that label and the service is no longer imported: nothing a user wrote is deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use meshfed_model::snapshot::Snapshot;
use serde_json::{json, Value};

use crate::types::{ServiceImport, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL};

/// The ServiceImports the cluster should hold: `(namespace, name) -> (object, status)`.
pub fn desired_imports(
    snap: &Snapshot,
    vips: impl Fn(&str, &str) -> Vec<IpAddr>,
) -> BTreeMap<(String, String), (Value, Value)> {
    let mut out = BTreeMap::new();
    for (key, insts) in snap.services() {
        let remote: BTreeSet<&str> = insts
            .iter()
            .filter(|i| !i.local)
            .map(|i| i.cluster.as_str())
            .collect();
        if remote.is_empty() {
            continue;
        }
        let Some((ns, name)) = key.split_once('/') else {
            continue;
        };
        let mut ports: Vec<Value> = Vec::new();
        let mut seen = BTreeSet::new();
        for i in insts.iter().filter(|i| !i.local) {
            for p in &i.export.ports {
                if seen.insert((p.name.clone(), p.port, p.protocol.clone())) {
                    let mut v = json!({"port": p.port, "protocol": p.protocol});
                    if !p.name.is_empty() {
                        v["name"] = json!(p.name);
                    }
                    if !p.app_protocol.is_empty() {
                        v["appProtocol"] = json!(p.app_protocol);
                    }
                    ports.push(v);
                }
            }
        }
        let ips: Vec<String> = vips(ns, name).iter().map(|ip| ip.to_string()).collect();
        let obj = json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": ns, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
            "spec": {"type": "ClusterSetIP", "ports": ports, "ips": ips},
        });
        let status = json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport",
            "status": {"clusters": remote.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>()},
        });
        out.insert((ns.to_string(), name.to_string()), (obj, status));
    }
    out
}

/// Applies the desired ServiceImports; remembers what it wrote so that unchanged objects are
/// not written again.
#[derive(Debug, Default)]
pub struct ImportWriter {
    written: BTreeMap<(String, String), (Value, Value)>,
    /// Whether the ones meshfed wrote earlier (another process, a restart) were listed.
    listed: bool,
}

/// What one [`ImportWriter::sync`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    pub applied: usize,
    pub deleted: usize,
}

impl ImportWriter {
    pub async fn sync(
        &mut self,
        client: &Client,
        desired: &BTreeMap<(String, String), (Value, Value)>,
    ) -> anyhow::Result<Synced> {
        let mut out = Synced::default();
        if !self.listed {
            // Ours from before (a restart): known by the label, so they are cleaned up too.
            let all: Api<ServiceImport> = Api::all(client.clone());
            let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
            for si in all.list(&lp).await?.items {
                let (ns, name) = (
                    si.metadata.namespace.clone().unwrap_or_default(),
                    si.metadata.name.clone().unwrap_or_default(),
                );
                self.written
                    .entry((ns, name))
                    .or_insert((Value::Null, Value::Null));
            }
            self.listed = true;
        }
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        for (key, (obj, status)) in desired {
            if self.written.get(key) == Some(&(obj.clone(), status.clone())) {
                continue;
            }
            let api: Api<ServiceImport> = Api::namespaced(client.clone(), &key.0);
            api.patch(&key.1, &pp, &Patch::Apply(obj)).await?;
            api.patch_status(&key.1, &pp, &Patch::Apply(status)).await?;
            self.written
                .insert(key.clone(), (obj.clone(), status.clone()));
            out.applied += 1;
        }
        let gone: Vec<(String, String)> = self
            .written
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let api: Api<ServiceImport> = Api::namespaced(client.clone(), &key.0);
            // Only a ServiceImport that still says meshfed manages it.
            match api.get_opt(&key.1).await? {
                Some(si)
                    if si
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(MANAGED_BY_LABEL))
                        .is_some_and(|v| v == MANAGED_BY) =>
                {
                    api.delete(&key.1, &DeleteParams::default()).await?;
                    out.deleted += 1;
                }
                _ => {}
            }
            self.written.remove(&key);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proto::{ClusterFacts, LeaseState, PeerCluster, Port, ServiceExport};

    #[test]
    fn one_import_per_service_imported_from_elsewhere() {
        let mut s = Snapshot {
            facts: ClusterFacts {
                cluster_id: "west".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let svc = |ports: Vec<Port>| ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            ports,
            ..Default::default()
        };
        let http = Port {
            name: "http".into(),
            port: 80,
            protocol: "TCP".into(),
            app_protocol: "http".into(),
        };
        let grpc = Port {
            name: "grpc".into(),
            port: 9090,
            protocol: "TCP".into(),
            ..Default::default()
        };
        s.local
            .insert("shop/payment".into(), svc(vec![http.clone()]));
        s.local.insert(
            "shop/local-only".into(),
            ServiceExport {
                namespace: "shop".into(),
                name: "local-only".into(),
                ..Default::default()
            },
        );
        s.imports.insert(
            ("east".into(), "shop/payment".into()),
            svc(vec![http.clone(), grpc]),
        );
        s.imports
            .insert(("eu".into(), "shop/payment".into()), svc(vec![http]));
        for c in ["east", "eu"] {
            s.peers.insert(
                c.into(),
                PeerCluster {
                    lease: LeaseState::Fresh as i32,
                    ..Default::default()
                },
            );
        }
        let d = desired_imports(&s, |_, _| vec!["240.240.0.3".parse().unwrap()]);
        assert_eq!(d.len(), 1, "local-only services get no ServiceImport");
        let (obj, status) = &d[&("shop".to_string(), "payment".to_string())];
        // Checked against the ServiceImport type (the MCS API's JSON).
        let si: ServiceImport = serde_json::from_value(obj.clone()).unwrap();
        assert_eq!(si.spec.type_, "ClusterSetIP");
        assert_eq!(si.spec.ips, ["240.240.0.3"]);
        assert_eq!(
            si.spec
                .ports
                .iter()
                .map(|p| (p.name.as_str(), p.port))
                .collect::<Vec<_>>(),
            [("http", 80), ("grpc", 9090)]
        );
        assert_eq!(
            status["status"]["clusters"],
            json!([{"cluster": "east"}, {"cluster": "eu"}])
        );
        assert_eq!(si.metadata.labels.unwrap()[MANAGED_BY_LABEL], MANAGED_BY);
    }
}
