//! The sink: what the agent writes to the Kubernetes API. One MCS `ServiceImport` per service
//! the cluster imports from another cluster (type `ClusterSetIP` with `ips` = the service's
//! meshfed VIPs, or `Headless` without when every exporter's Service is headless; the union of
//! the exporters' ports, `status.clusters` = the exporting clusters), its EndpointSlices, and
//! the ServiceExports' conditions, written with server-side apply under one field manager, only when it changed, and
//! labelled `app.kubernetes.io/managed-by: meshfed`. A ServiceImport is deleted only when it
//! carries that label and the service is no longer imported: nothing a user wrote is deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use meshfed_model::snapshot::Instance;
use serde_json::{json, Value};

use crate::types::{ServiceImport, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL};

/// The ServiceImports the cluster should hold: `(namespace, name) -> (object, status)`.
/// `services` is [`meshfed_model::snapshot::Snapshot::services`] (computed once by the caller for both writers).
pub fn desired_imports(
    services: &BTreeMap<String, Vec<Instance>>,
    vips: impl Fn(&str, &str) -> Vec<IpAddr>,
) -> BTreeMap<(String, String), (Value, Value)> {
    let mut out = BTreeMap::new();
    for (key, insts) in services {
        let remote: BTreeSet<&str> = insts
            .iter()
            .filter(|i| !i.local)
            .map(|i| i.cluster)
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
        // Headless when every exporter it imports from says so (as the name table: no VIP).
        let headless = insts.iter().filter(|i| !i.local).all(|i| i.export.headless);
        let spec = if headless {
            json!({"type": "Headless", "ports": ports})
        } else {
            let ips: Vec<String> = vips(ns, name).iter().map(|ip| ip.to_string()).collect();
            json!({"type": "ClusterSetIP", "ports": ports, "ips": ips})
        };
        let obj = json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": ns, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
            "spec": spec,
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

/// The Istio WorkloadEntries of the VMs registered with this agent (as istiod writes them for
/// auto-registration): one per entry, in its group's namespace, with the entry's address,
/// labels, service account, locality, network, weight and ports, meshfed's `managed-by`
/// label, the VM and group as annotations, and, for groups with a health probe, the
/// `Healthy` condition in the status. Entries leave when the agent removes them (after the
/// grace period), and the writer deletes their objects.
pub fn desired_workload_entries(
    entries: &BTreeMap<String, meshfed_model::entry::AutoEntry>,
) -> BTreeMap<(String, String), (Value, Value)> {
    let mut out = BTreeMap::new();
    for e in entries.values() {
        let mut annotations: serde_json::Map<String, Value> = e
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        annotations.insert("meshfed.io/vm-id".into(), json!(e.vm_id));
        if e.health_checks {
            annotations.insert(crate::types::HEALTH_CHECKS_ANNOTATION.into(), json!("true"));
        }
        annotations.insert("meshfed.io/workload-group".into(), json!(e.group));
        let mut spec = json!({"address": e.address, "labels": e.labels});
        for (k, v) in [
            ("serviceAccount", &e.service_account),
            ("locality", &e.locality),
            ("network", &e.network),
        ] {
            if !v.is_empty() {
                spec[k] = json!(v);
            }
        }
        if e.weight > 0 {
            spec["weight"] = json!(e.weight);
        }
        if !e.ports.is_empty() {
            spec["ports"] = json!(e.ports);
        }
        let obj = json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": e.name, "namespace": e.namespace,
                         "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                         "annotations": annotations},
            "spec": spec,
        });
        let status = if e.health_checks {
            let (st, reason) = match e.healthy {
                Some(true) => ("True", "HealthCheckPassed"),
                Some(false) => ("False", "HealthCheckFailed"),
                None => ("Unknown", "NoReportYet"),
            };
            let mut c =
                json!({"type": crate::types::HEALTHY_CONDITION, "status": st, "reason": reason});
            if !e.health_message.is_empty() {
                c["message"] = json!(e.health_message);
            }
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                   "status": {"conditions": [c]}})
        } else {
            Value::Null
        };
        out.insert((e.namespace.clone(), e.name.clone()), (obj, status));
    }
    out
}

/// The writer of auto-registered VMs' WorkloadEntries.
pub type EntryWriter = ManagedWriter<crate::types::WorkloadEntry>;

/// The selector of VMs' WorkloadEntries (meshfed's, not written for an import).
pub const VM_ENTRIES_SELECTOR: &str =
    "app.kubernetes.io/managed-by=meshfed,!meshfed.io/imported-service";

/// Applies desired objects of one kind (`(namespace, name) -> (object, status or null)`) with
/// server-side apply; remembers what it wrote so that unchanged objects are not written again,
/// and deletes what it no longer wants only while the object still carries its labels
/// (meshfed's `app.kubernetes.io/managed-by`, and what tells its objects from another
/// writer's of the same kind: imports' Istio WorkloadEntries from VMs').
#[derive(Debug)]
pub struct ManagedWriter<K> {
    written: BTreeMap<(String, String), (Value, Value)>,
    /// Whether the ones meshfed wrote earlier (another process, a restart) were listed.
    listed: bool,
    /// The label selector of this writer's objects.
    selector: &'static str,
    kind: std::marker::PhantomData<K>,
}

/// The label selector of everything meshfed writes.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=meshfed";

impl<K> Default for ManagedWriter<K> {
    fn default() -> Self {
        ManagedWriter::with_selector(MANAGED_SELECTOR)
    }
}

impl<K> ManagedWriter<K> {
    /// A writer whose objects are those `selector` selects (it must require
    /// [`MANAGED_SELECTOR`]'s label too): two writers of one kind must select disjoint sets,
    /// or each would delete the other's.
    pub fn with_selector(selector: &'static str) -> Self {
        ManagedWriter {
            written: BTreeMap::new(),
            listed: false,
            selector,
            kind: std::marker::PhantomData,
        }
    }
}

/// The ServiceImport writer.
pub type ImportWriter = ManagedWriter<ServiceImport>;
/// The writer of EndpointSlices for imported services.
pub type SliceWriter = ManagedWriter<k8s_openapi::api::discovery::v1::EndpointSlice>;

/// What one [`ManagedWriter::sync`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    pub applied: usize,
    pub deleted: usize,
}

impl<K> ManagedWriter<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    pub async fn sync(
        &mut self,
        client: &Client,
        desired: &BTreeMap<(String, String), (Value, Value)>,
    ) -> anyhow::Result<Synced> {
        let mut out = Synced::default();
        if !self.listed {
            // Ours from before (a restart): known by the label, so they are cleaned up too.
            let all: Api<K> = Api::all(client.clone());
            let lp = ListParams::default().labels(self.selector);
            for o in all.list(&lp).await?.items {
                let m = k8s_openapi::Metadata::metadata(&o);
                let key = (
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                );
                self.written
                    .entry(key)
                    .or_insert((Value::Null, Value::Null));
            }
            self.listed = true;
        }
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        for (key, (obj, status)) in desired {
            if self.written.get(key) == Some(&(obj.clone(), status.clone())) {
                continue;
            }
            let api: Api<K> = Api::namespaced(client.clone(), &key.0);
            api.patch(&key.1, &pp, &Patch::Apply(obj)).await?;
            if !status.is_null() {
                api.patch_status(&key.1, &pp, &Patch::Apply(status)).await?;
            }
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
            let api: Api<K> = Api::namespaced(client.clone(), &key.0);
            // Only an object that still says this writer manages it.
            if let Some(o) = api.get_opt(&key.1).await? {
                let labels = k8s_openapi::Metadata::metadata(&o)
                    .labels
                    .clone()
                    .unwrap_or_default();
                let ours = labels
                    .get(MANAGED_BY_LABEL)
                    .is_some_and(|v| v == MANAGED_BY)
                    && crate::selector::parse(self.selector).is_ok_and(|s| s.matches(&labels));
                if ours {
                    api.delete(&key.1, &DeleteParams::default()).await?;
                    out.deleted += 1;
                }
            }
            self.written.remove(&key);
        }
        Ok(out)
    }
}

/// The label MCS consumers find an imported service's slices by.
pub const MCS_SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
pub const MCS_SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// Tells the built-in EndpointSlice controller to leave these slices alone.
pub const SLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_MANAGED_BY: &str = "meshfed.io";

/// A slice's address type and port list (`name -> port`): what all its endpoints share.
type SliceShape = (&'static str, Vec<(String, u32)>);

fn addr_type(a: &str) -> &'static str {
    match a.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "IPv4",
        Ok(IpAddr::V6(_)) => "IPv6",
        Err(_) => "FQDN",
    }
}

/// One EndpointSlice per imported service and source cluster (`<service>-<cluster>`), for MCS
/// consumers: on the importer's own network the workloads' addresses (ready = healthy, zone
/// from the locality); from another network the source network's east-west gateways (split
/// horizon), every service port mapped to the gateway's port. IPv6 addresses and gateway host
/// names go in their own slices (`<service>-<cluster>-v6`, `-fqdn`), as do endpoints whose
/// target ports differ (a further `-<n>`): a slice has one address type and one port list.
/// One endpoint of an EndpointSlice meshfed writes.
struct SliceEndpoint {
    address: String,
    ready: bool,
    zone: String,
    /// A headless service's endpoint hostname (empty for none).
    hostname: String,
    /// The port of every service port, by name.
    ports: BTreeMap<String, u32>,
}

pub fn desired_slices(
    own_network: &str,
    services: &BTreeMap<String, Vec<Instance>>,
) -> BTreeMap<(String, String), (Value, Value)> {
    let mut out = BTreeMap::new();
    for (key, insts) in services {
        let Some((ns, name)) = key.split_once('/') else {
            continue;
        };
        for i in insts.iter().filter(|i| !i.local) {
            let mut eps: Vec<SliceEndpoint> = Vec::new();
            if i.network.is_empty() || i.network == own_network {
                for e in &i.export.endpoints {
                    let ports = i
                        .export
                        .ports
                        .iter()
                        .map(|p| {
                            (
                                p.name.clone(),
                                e.ports.get(&p.name).copied().unwrap_or(p.port),
                            )
                        })
                        .collect();
                    let zone = e
                        .locality
                        .as_ref()
                        .map(|l| l.zone.clone())
                        .unwrap_or_default();
                    eps.push(SliceEndpoint {
                        address: e.address.clone(),
                        ready: e.healthy,
                        zone,
                        hostname: e.hostname.clone(),
                        ports,
                    });
                }
            } else {
                for g in i.gateways {
                    let Some((host, port)) = g.rsplit_once(':') else {
                        continue;
                    };
                    let Ok(port) = port.parse::<u32>() else {
                        continue;
                    };
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let ports = i
                        .export
                        .ports
                        .iter()
                        .map(|p| (p.name.clone(), port))
                        .collect();
                    eps.push(SliceEndpoint {
                        address: host.to_string(),
                        ready: true,
                        zone: String::new(),
                        hostname: String::new(),
                        ports,
                    });
                }
            }
            // One slice per address type and port mapping (a slice has one ports list).
            let mut groups: BTreeMap<SliceShape, Vec<Value>> = BTreeMap::new();
            for SliceEndpoint {
                address: addr,
                ready,
                zone,
                hostname,
                ports,
            } in &eps
            {
                let mut e = json!({"addresses": [addr], "conditions": {"ready": ready}});
                if !zone.is_empty() {
                    e["zone"] = json!(zone);
                }
                if !hostname.is_empty() {
                    e["hostname"] = json!(hostname);
                }
                groups
                    .entry((addr_type(addr), ports.clone().into_iter().collect()))
                    .or_default()
                    .push(e);
            }
            let mut per_type: BTreeMap<&'static str, usize> = BTreeMap::new();
            for ((at, ports), endpoints) in groups {
                let n = per_type.entry(at).or_default();
                let suffix = match at {
                    "IPv6" => "-v6",
                    "FQDN" => "-fqdn",
                    _ => "",
                };
                let slice_name = if *n == 0 {
                    format!("{name}-{}{suffix}", i.cluster)
                } else {
                    format!("{name}-{}{suffix}-{n}", i.cluster)
                };
                *n += 1;
                let ports: Vec<Value> = ports
                    .iter()
                    .map(|(pn, port)| {
                        let proto = i
                            .export
                            .ports
                            .iter()
                            .find(|p| &p.name == pn)
                            .map(|p| p.protocol.clone())
                            .unwrap_or_else(|| "TCP".into());
                        let mut v = json!({"port": port, "protocol": proto});
                        if !pn.is_empty() {
                            v["name"] = json!(pn);
                        }
                        v
                    })
                    .collect();
                let obj = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"name": slice_name, "namespace": ns, "labels": {
                        MCS_SERVICE_NAME_LABEL: name,
                        MCS_SOURCE_CLUSTER_LABEL: i.cluster,
                        SLICE_MANAGED_BY_LABEL: SLICE_MANAGED_BY,
                        MANAGED_BY_LABEL: MANAGED_BY,
                    }},
                    "addressType": at,
                    "ports": ports,
                    "endpoints": endpoints,
                });
                out.insert((ns.to_string(), slice_name), (obj, Value::Null));
            }
        }
    }
    out
}

/// One MCS condition of a ServiceExport, as meshfed computes it (without its time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

fn cond(type_: &'static str, status: bool, reason: &str, message: String) -> Cond {
    Cond {
        type_,
        status,
        reason: reason.into(),
        message,
    }
}

/// The conditions of every ServiceExport the source saw (KEP-1645): `Valid` (its Service
/// exists and can be exported; reasons NoService, InvalidServiceType, InvalidService,
/// InvalidAnnotation), `Conflict` (the federator found this export's ports at odds with an
/// older export of the same service elsewhere: PortConflict, or TypeConflict when one is
/// headless and the other not) and `Ready` (the federator stored
/// it: Exported; Pending until then).
pub fn export_conditions(
    view: &crate::view::View,
    conflicts: &[String],
    stored: &BTreeSet<String>,
) -> BTreeMap<(String, String), Vec<Cond>> {
    let mut out = BTreeMap::new();
    for ((ns, name), state) in &view.service_exports {
        let key = format!("{ns}/{name}");
        let mut c = Vec::new();
        match state {
            Ok(()) => c.push(cond(
                "Valid",
                true,
                "Valid",
                "the Service can be exported".into(),
            )),
            Err((reason, message)) => c.push(cond("Valid", false, reason, message.clone())),
        }
        match conflicts.iter().find(|x| x.starts_with(&format!("{key}:"))) {
            Some(m) => {
                let type_conflict = m[key.len() + 1..]
                    .trim_start()
                    .starts_with(meshfed_model::validate::TYPE_CONFLICT);
                let reason = if type_conflict {
                    "TypeConflict"
                } else {
                    "PortConflict"
                };
                c.push(cond("Conflict", true, reason, m.clone()))
            }
            None => c.push(cond("Conflict", false, "NoConflicts", String::new())),
        }
        c.push(match state {
            Err((reason, _)) => cond("Ready", false, reason, "not exported".into()),
            Ok(()) if stored.contains(&key) => cond(
                "Ready",
                true,
                "Exported",
                "the federator stored this export".into(),
            ),
            Ok(()) => cond(
                "Ready",
                false,
                "Pending",
                "waiting for the federator to store it".into(),
            ),
        });
        out.insert((ns.clone(), name.clone()), c);
    }
    out
}

/// Writes ServiceExport conditions (server-side apply on the status subresource) when they
/// change; a condition keeps its `lastTransitionTime` while its status stays the same.
#[derive(Debug, Default)]
pub struct ExportStatusWriter {
    written: BTreeMap<(String, String), Vec<(Cond, String)>>,
}

impl ExportStatusWriter {
    /// Returns how many ServiceExports were written.
    pub async fn sync(
        &mut self,
        client: &Client,
        desired: &BTreeMap<(String, String), Vec<Cond>>,
    ) -> anyhow::Result<usize> {
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut n = 0;
        for (key, conds) in desired {
            let before = self.written.get(key);
            if before.is_some_and(|b| b.iter().map(|(c, _)| c).eq(conds.iter())) {
                continue;
            }
            let timed: Vec<(Cond, String)> = conds
                .iter()
                .map(|c| {
                    let kept = before.and_then(|b| {
                        b.iter()
                            .find(|(o, _)| o.type_ == c.type_ && o.status == c.status)
                            .map(|(_, t)| t.clone())
                    });
                    (c.clone(), kept.unwrap_or_else(|| now.clone()))
                })
                .collect();
            let body = json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport",
                "status": {"conditions": timed.iter().map(|(c, t)| json!({
                    "type": c.type_,
                    "status": if c.status { "True" } else { "False" },
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime": t,
                })).collect::<Vec<_>>()},
            });
            let api: Api<crate::types::ServiceExport> = Api::namespaced(client.clone(), &key.0);
            api.patch_status(&key.1, &pp, &Patch::Apply(&body)).await?;
            self.written.insert(key.clone(), timed);
            n += 1;
        }
        self.written.retain(|k, _| desired.contains_key(k));
        Ok(n)
    }
}

/// Kubernetes Events (events.k8s.io/v1, type Warning, reason `Refused`) for every object the
/// source cannot use, on that object, once per problem: a problem that goes away and comes back
/// is reported again. Written by kube-runtime's event recorder as reporting controller
/// `meshfed-agent`.
pub struct ProblemEvents {
    recorder: kube::runtime::events::Recorder,
    published: BTreeSet<crate::view::Problem>,
}

impl std::fmt::Debug for ProblemEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProblemEvents")
            .field("published", &self.published.len())
            .finish()
    }
}

impl ProblemEvents {
    /// `instance`: this agent's pod name, when known.
    pub fn new(client: Client, instance: Option<String>) -> ProblemEvents {
        ProblemEvents {
            recorder: kube::runtime::events::Recorder::new(
                client,
                kube::runtime::events::Reporter {
                    controller: "meshfed-agent".into(),
                    instance,
                },
            ),
            published: BTreeSet::new(),
        }
    }

    /// Publishes the problems not published yet; returns how many.
    pub async fn sync(&mut self, problems: &[crate::view::Problem]) -> anyhow::Result<usize> {
        let now: BTreeSet<crate::view::Problem> = problems.iter().cloned().collect();
        self.published.retain(|p| now.contains(p));
        let mut n = 0;
        for p in now.difference(&self.published.clone()) {
            let api_version = match p.kind {
                "ServiceExport" => "multicluster.x-k8s.io/v1alpha1",
                "FailoverPolicy" => "meshfed.io/v1alpha1",
                "DestinationRule" => "networking.istio.io/v1",
                _ => "v1",
            };
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(api_version.into()),
                kind: Some(p.kind.into()),
                name: Some(p.name.clone()),
                namespace: Some(p.namespace.clone()),
                ..Default::default()
            };
            let mut note = p.reason.clone();
            note.truncate(1000);
            self.recorder
                .publish(
                    &kube::runtime::events::Event {
                        type_: kube::runtime::events::EventType::Warning,
                        reason: "Refused".into(),
                        note: Some(note),
                        action: "Federate".into(),
                        secondary: None,
                    },
                    &reference,
                )
                .await?;
            self.published.insert(p.clone());
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use meshfed_model::snapshot::Snapshot;
    use proto::{ClusterFacts, LeaseState, PeerCluster, Port, ServiceExport};

    #[test]
    fn export_conditions_follow_validity_conflicts_and_the_federator() {
        let mut v = crate::view::View::default();
        let k = |n: &str| ("shop".to_string(), n.to_string());
        v.service_exports.insert(k("payment"), Ok(()));
        v.service_exports.insert(k("ledger"), Ok(()));
        v.service_exports.insert(k("db"), Ok(()));
        v.service_exports.insert(
            k("ghost"),
            Err(("NoService".into(), "no Service shop/ghost to export".into())),
        );
        let db = meshfed_model::validate::export_conflict(
            &ServiceExport {
                headless: true,
                ..Default::default()
            },
            &ServiceExport::default(),
        )
        .unwrap();
        let conflicts = [
            "shop/ledger: port 80 is UDP here but TCP in the older export (cluster east exported it first)".to_string(),
            format!("shop/db: {db} (cluster east exported it first)"),
        ];
        let stored: BTreeSet<String> = ["shop/payment".to_string()].into();
        let c = export_conditions(&v, &conflicts, &stored);
        let row = |n: &str| {
            c[&k(n)]
                .iter()
                .map(|x| (x.type_, x.status, x.reason.as_str()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("payment"),
            [
                ("Valid", true, "Valid"),
                ("Conflict", false, "NoConflicts"),
                ("Ready", true, "Exported")
            ]
        );
        assert_eq!(
            row("ledger"),
            [
                ("Valid", true, "Valid"),
                ("Conflict", true, "PortConflict"),
                ("Ready", false, "Pending")
            ]
        );
        assert_eq!(row("db")[1], ("Conflict", true, "TypeConflict"));
        assert!(c[&k("db")][1]
            .message
            .contains("ClusterSetIP here but Headless"));
        assert_eq!(
            row("ghost"),
            [
                ("Valid", false, "NoService"),
                ("Conflict", false, "NoConflicts"),
                ("Ready", false, "NoService")
            ]
        );
    }

    #[test]
    fn slices_hold_workloads_on_the_same_network_and_gateways_from_another() {
        use proto::{Endpoint, Locality};
        let mut s = Snapshot {
            facts: ClusterFacts {
                cluster_id: "west".into(),
                network: "net-w".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let export = |eps: Vec<Endpoint>| ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
                ..Default::default()
            }],
            endpoints: eps,
            ..Default::default()
        };
        let ep = |a: &str, healthy: bool| Endpoint {
            address: a.into(),
            healthy,
            locality: Some(Locality {
                region: "r".into(),
                zone: "r-b".into(),
                subzone: String::new(),
            }),
            ports: [("http".to_string(), 8080)].into(),
            ..Default::default()
        };
        s.imports.insert(
            ("near".into(), "shop/payment".into()),
            export(vec![ep("10.2.0.5", true), ep("10.2.0.6", false)]).into(),
        );
        s.imports.insert(
            ("far".into(), "shop/payment".into()),
            export(vec![ep("10.9.0.5", true)]).into(),
        );
        for (c, net, gw) in [
            ("near", "net-w", vec![]),
            (
                "far",
                "net-f",
                vec![
                    "192.0.2.7:15443".to_string(),
                    "gw.far.example:15443".to_string(),
                ],
            ),
        ] {
            s.peers.insert(
                c.into(),
                PeerCluster {
                    facts: Some(ClusterFacts {
                        cluster_id: c.into(),
                        network: net.into(),
                        gateways: gw,
                        ..Default::default()
                    }),
                    lease: LeaseState::Fresh as i32,
                    ..Default::default()
                },
            );
        }
        let d = desired_slices(&s.facts.network, &s.services());
        let slice = |n: &str| {
            let (v, _) = &d[&("shop".to_string(), n.to_string())];
            serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(v.clone())
                .unwrap()
        };
        let near = slice("payment-near");
        assert_eq!(near.address_type, "IPv4");
        let labels = near.metadata.labels.clone().unwrap();
        assert_eq!(labels[MCS_SERVICE_NAME_LABEL], "payment");
        assert_eq!(labels[MCS_SOURCE_CLUSTER_LABEL], "near");
        assert_eq!(labels[SLICE_MANAGED_BY_LABEL], SLICE_MANAGED_BY);
        assert!(!labels.contains_key("kubernetes.io/service-name"));
        assert_eq!(near.ports.as_ref().unwrap()[0].port, Some(8080));
        let ready: Vec<(String, Option<bool>, Option<String>)> = near
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].clone(),
                    e.conditions.as_ref().and_then(|c| c.ready),
                    e.zone.clone(),
                )
            })
            .collect();
        assert_eq!(
            ready,
            [
                ("10.2.0.5".to_string(), Some(true), Some("r-b".to_string())),
                ("10.2.0.6".to_string(), Some(false), Some("r-b".to_string()))
            ]
        );
        // Another network: its gateways, the service port mapped to the gateway's.
        let far = slice("payment-far");
        assert_eq!(far.address_type, "IPv4");
        assert_eq!(far.endpoints[0].addresses, ["192.0.2.7"]);
        assert_eq!(far.ports.as_ref().unwrap()[0].port, Some(15443));
        let fqdn = slice("payment-far-fqdn");
        assert_eq!(fqdn.address_type, "FQDN");
        assert_eq!(fqdn.endpoints[0].addresses, ["gw.far.example"]);
        assert_eq!(d.len(), 3);
    }

    /// A headless service imported from a cluster on the same network: a `Headless`
    /// ServiceImport without ips, and an EndpointSlice whose endpoints keep their hostnames.
    #[test]
    fn a_headless_import_has_no_ips_and_its_endpoints_keep_their_hostnames() {
        use proto::Endpoint;
        let mut s = Snapshot {
            facts: ClusterFacts {
                cluster_id: "west".into(),
                network: "net".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let db = ServiceExport {
            namespace: "shop".into(),
            name: "db".into(),
            headless: true,
            ports: vec![Port {
                name: "pg".into(),
                port: 5432,
                protocol: "TCP".into(),
                ..Default::default()
            }],
            endpoints: (0..2)
                .map(|i| Endpoint {
                    address: format!("10.2.0.{}", 5 + i),
                    hostname: format!("db-{i}"),
                    healthy: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        s.imports
            .insert(("east".into(), "shop/db".into()), db.into());
        s.peers.insert(
            "east".into(),
            PeerCluster {
                facts: Some(ClusterFacts {
                    cluster_id: "east".into(),
                    network: "net".into(),
                    ..Default::default()
                }),
                lease: LeaseState::Fresh as i32,
                ..Default::default()
            },
        );
        let services = s.services();
        let d = desired_imports(&services, |_, _| {
            panic!("a headless import asks for no VIP")
        });
        let si: ServiceImport =
            serde_json::from_value(d[&("shop".to_string(), "db".to_string())].0.clone()).unwrap();
        assert_eq!(si.spec.type_, "Headless");
        assert!(si.spec.ips.is_empty());
        let slices = desired_slices("net", &services);
        let (obj, _) = &slices[&("shop".to_string(), "db-east".to_string())];
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(obj.clone()).unwrap();
        let hosts: Vec<Option<String>> =
            slice.endpoints.iter().map(|e| e.hostname.clone()).collect();
        assert_eq!(hosts, [Some("db-0".into()), Some("db-1".into())]);
    }

    /// A registered VM becomes an Istio WorkloadEntry (checked against the type) with the
    /// Healthy condition of its probe; without a probe, no status.
    #[test]
    fn registered_vms_become_workload_entries_with_their_health() {
        use meshfed_model::entry::AutoEntry;
        let mut e = AutoEntry {
            name: "payment-vm-10.0.3.7".into(),
            namespace: "shop".into(),
            group: "payment-vm".into(),
            vm_id: "vm-1".into(),
            address: "10.0.3.7".into(),
            locality: "us-east1/us-east1-b".into(),
            labels: [("app".to_string(), "payment".to_string())].into(),
            ports: [("http".to_string(), 9080)].into(),
            weight: 2,
            service_account: "payment-vm".into(),
            health_checks: true,
            healthy: Some(false),
            health_message: "GET /healthz: 503".into(),
            connected: true,
            ..Default::default()
        };
        let d = desired_workload_entries(&[(e.name.clone(), e.clone())].into());
        let (obj, status) = &d[&("shop".to_string(), "payment-vm-10.0.3.7".to_string())];
        let mut we: crate::types::WorkloadEntry = serde_json::from_value(obj.clone()).unwrap();
        assert_eq!(we.spec.address, "10.0.3.7");
        assert_eq!(we.spec.service_account, "payment-vm");
        assert_eq!(we.spec.ports.get("http"), Some(&9080));
        assert_eq!(
            we.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL],
            MANAGED_BY
        );
        assert_eq!(
            we.metadata.annotations.as_ref().unwrap()["meshfed.io/workload-group"],
            "payment-vm"
        );
        we.status = serde_json::from_value(status["status"].clone()).unwrap();
        assert!(!we.healthy(), "the failing probe reads back as unhealthy");
        assert_eq!(
            we.status.as_ref().unwrap().conditions[0].message,
            "GET /healthz: 503"
        );
        // Health-checked: healthy only once the condition says True (not before any status,
        // not while Unknown).
        let read_back = |healthy: Option<bool>, with_status: bool| {
            let mut e2 = e.clone();
            e2.healthy = healthy;
            let d = desired_workload_entries(&[(e2.name.clone(), e2)].into());
            let (obj, status) = d.values().next().unwrap().clone();
            let mut we: crate::types::WorkloadEntry = serde_json::from_value(obj).unwrap();
            if with_status {
                we.status = serde_json::from_value(status["status"].clone()).unwrap();
            }
            we.healthy()
        };
        assert!(!read_back(Some(true), false), "applied before its status");
        assert!(!read_back(None, true), "Unknown");
        assert!(read_back(Some(true), true));
        e.health_checks = false;
        let d = desired_workload_entries(&[(e.name.clone(), e)].into());
        assert!(d.values().all(|(_, st)| st.is_null()));
    }

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
            .insert("shop/payment".into(), svc(vec![http.clone()]).into());
        s.local.insert(
            "shop/local-only".into(),
            ServiceExport {
                namespace: "shop".into(),
                name: "local-only".into(),
                ..Default::default()
            }
            .into(),
        );
        s.imports.insert(
            ("east".into(), "shop/payment".into()),
            svc(vec![http.clone(), grpc]).into(),
        );
        s.imports
            .insert(("eu".into(), "shop/payment".into()), svc(vec![http]).into());
        for c in ["east", "eu"] {
            s.peers.insert(
                c.into(),
                PeerCluster {
                    lease: LeaseState::Fresh as i32,
                    ..Default::default()
                },
            );
        }
        let d = desired_imports(&s.services(), |_, _| vec!["240.240.0.3".parse().unwrap()]);
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
