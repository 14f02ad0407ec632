//! From Kubernetes objects to the model: a pure function of what the watches hold, so it is
//! tested without any API server. A Service becomes one `ServiceExport` of the model with its
//! ports and the endpoints of its EndpointSlices (locality from the endpoint's Node, labels
//! and service account from its Pod, target ports from the slice's named ports); it is
//! exported when a ServiceExport of the same namespace and name exists (MCS). Objects that
//! cannot be used are reported as problems naming `kind namespace/name` and the reason; the
//! others are unaffected.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshfed_model::validate;
use proto::{Endpoint, Locality, OnExpiry, Port, ServiceExport as Export};

use crate::selector::NamespaceSelector;
use crate::types::WorkloadEntry;
use crate::types::{
    ServiceExport, EXPORT_TO, ON_EXPIRY, REGION_LABEL, SERVICE_NAME_LABEL, SUBZONE_LABEL,
    ZONE_LABEL,
};

/// What the watches hold.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
    pub pods: Vec<Arc<Pod>>,
    pub exports: Vec<Arc<ServiceExport>>,
    /// Istio WorkloadEntries (VMs), selected by Services' selectors.
    pub workload_entries: Vec<Arc<WorkloadEntry>>,
    /// Istio WorkloadGroups (VM templates).
    pub workload_groups: Vec<Arc<crate::types::WorkloadGroup>>,
    /// Istio ServiceEntries and DestinationRules (what users wrote shadows meshfed's).
    pub service_entries: Vec<Arc<crate::types::ServiceEntry>>,
    pub destination_rules: Vec<Arc<crate::types::DestinationRule>>,
}

/// An object meshfed could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// The cluster's services as the model wants them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct View {
    /// Every usable Service, by `ns/name`.
    pub local: meshfed_model::snapshot::Services,
    /// The exported ones (a ServiceExport exists and is valid), by `ns/name`.
    pub exports: meshfed_model::snapshot::Services,
    pub problems: Vec<Problem>,
    /// Every ServiceExport seen, by (namespace, name): valid, or why not (an MCS condition
    /// reason and a message).
    pub service_exports: BTreeMap<(String, String), Result<(), (String, String)>>,
    /// Usable WorkloadGroups of the read namespaces, by key.
    pub workload_groups: Vec<meshfed_model::workload::WorkloadGroup>,
    /// Every Service of the cluster (namespace, name), read or not: an import of the same
    /// name is merged into it by istiod rather than given the name.
    pub service_names: std::collections::BTreeSet<(String, String)>,
    /// The Istio ServiceEntries and DestinationRules users wrote, by host.
    pub istio_user: crate::istio::UserObjects,
}

/// A WorkloadGroup object as the registry file's type: the same fields are accepted and
/// checked (an unknown field, a template with an address or a bad probe is the reason it is
/// refused).
pub fn workload_group(
    g: &crate::types::WorkloadGroup,
) -> Result<meshfed_model::workload::WorkloadGroup, String> {
    let (ns, name) = name_of(&g.metadata);
    let doc = serde_json::json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadGroup",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": g.metadata.labels.clone().unwrap_or_default(),
            "annotations": g.metadata.annotations.clone().unwrap_or_default(),
        },
        "spec": g.spec,
    });
    let wg: meshfed_model::workload::WorkloadGroup =
        serde_json::from_value(doc).map_err(|e| format!("spec: {e}"))?;
    wg.check()?;
    Ok(wg)
}

fn name_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// A Node's locality from its topology labels; `None` without a region.
pub(crate) fn node_locality(n: &Node) -> Option<Locality> {
    let labels = n.metadata.labels.as_ref()?;
    let region = labels.get(REGION_LABEL)?.clone();
    Some(Locality {
        region,
        zone: labels.get(ZONE_LABEL).cloned().unwrap_or_default(),
        subzone: labels.get(SUBZONE_LABEL).cloned().unwrap_or_default(),
    })
}

struct ExportOptions {
    export_to: Vec<String>,
    on_expiry: OnExpiry,
}

/// The export of a service (a Service or a ServiceEntry) with its ServiceExport's options.
fn export(
    ns: &str,
    name: &str,
    headless: bool,
    ports: Vec<Port>,
    endpoints: Vec<Endpoint>,
    opts: Option<&ExportOptions>,
    labels: Option<&BTreeMap<String, String>>,
) -> Export {
    Export {
        headless,
        namespace: ns.to_string(),
        name: name.to_string(),
        ports,
        endpoints,
        export_to: opts.map(|o| o.export_to.clone()).unwrap_or_default(),
        on_expiry: opts.map_or(OnExpiry::Deprioritize, |o| o.on_expiry) as i32,
        labels: labels
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        failover_policy: String::new(),
    }
}

fn export_options(se: &ServiceExport) -> Result<ExportOptions, String> {
    let ann = se.metadata.annotations.clone().unwrap_or_default();
    let export_to = match ann.get(EXPORT_TO) {
        None => Vec::new(),
        Some(v) => {
            let ids: Vec<String> = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            for id in &ids {
                validate::check_label(&format!("annotation {EXPORT_TO}"), id)
                    .map_err(|e| e.to_string())?;
            }
            if ids.is_empty() {
                return Err(format!(
                    "annotation {EXPORT_TO}: {v:?} names no cluster (remove it to export to all)"
                ));
            }
            ids
        }
    };
    let on_expiry = match ann.get(ON_EXPIRY).map(|s| s.trim()) {
        None | Some("deprioritize") => OnExpiry::Deprioritize,
        Some("withdraw") => OnExpiry::Withdraw,
        Some(other) => {
            return Err(format!(
                "annotation {ON_EXPIRY}: {other:?} is not withdraw or deprioritize"
            ))
        }
    };
    Ok(ExportOptions {
        export_to,
        on_expiry,
    })
}

/// Builds the view; `default_locality` stands in for endpoints whose Node is unknown or has
/// no region label. (Every Service computed anew: [`Builder`] keeps the unchanged ones.)
pub fn build(o: &Objects, default_locality: &Locality) -> View {
    Builder::default().build(o, default_locality)
}

type Pods<'a> = HashMap<(&'a str, &'a str), &'a Arc<Pod>>;
type Nodes<'a> = HashMap<&'a str, (&'a Arc<Node>, Option<Locality>)>;

/// What one Service's part of the view was computed from: the objects themselves, held so
/// that an unchanged object (the watch cache keeps the same `Arc` until the object changes)
/// is recognised by its pointer, which cannot be reused while it is held here.
#[derive(Debug)]
struct Inputs {
    svc: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    export: Option<Arc<ServiceExport>>,
    pods: Vec<Arc<Pod>>,
    nodes: Vec<Arc<Node>>,
    entries: Vec<Arc<WorkloadEntry>>,
}

/// The Pod an endpoint's `targetRef` names (its namespace defaults to the slice's).
fn pod_of<'a>(
    e: &k8s_openapi::api::discovery::v1::Endpoint,
    ns: &str,
    pods: &Pods<'a>,
) -> Option<&'a Arc<Pod>> {
    let r = e
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))?;
    pods.get(&(
        r.namespace.as_deref().unwrap_or(ns),
        r.name.as_deref().unwrap_or_default(),
    ))
    .copied()
}

fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

impl PartialEq for Inputs {
    fn eq(&self, o: &Inputs) -> bool {
        Arc::ptr_eq(&self.svc, &o.svc)
            && same(&self.slices, &o.slices)
            && match (&self.export, &o.export) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
            && same(&self.pods, &o.pods)
            && same(&self.nodes, &o.nodes)
            && same(&self.entries, &o.entries)
    }
}

impl Inputs {
    /// The Service, its slices, its ServiceExport, and the Pods and Nodes its endpoints name.
    fn of(
        svc: &Arc<Service>,
        slices: &[&Arc<EndpointSlice>],
        export: Option<&Arc<ServiceExport>>,
        ns: &str,
        pods: &Pods<'_>,
        nodes: &Nodes<'_>,
        entries: &[&Arc<WorkloadEntry>],
    ) -> Inputs {
        let mut used_pods = Vec::new();
        let mut used_nodes = Vec::new();
        for s in slices {
            for e in &s.endpoints {
                if let Some((n, _)) = e.node_name.as_deref().and_then(|n| nodes.get(n)) {
                    used_nodes.push(Arc::clone(n));
                }
                if let Some(p) = pod_of(e, ns, pods) {
                    used_pods.push(Arc::clone(p));
                }
            }
        }
        Inputs {
            svc: svc.clone(),
            slices: slices.iter().map(|s| Arc::clone(s)).collect(),
            export: export.cloned(),
            pods: used_pods,
            nodes: used_nodes,
            entries: entries.iter().map(|e| Arc::clone(e)).collect(),
        }
    }
}

/// Builds views one after another, computing again only the Services whose objects changed
/// (its Service, slices, ServiceExport, or the Pods and Nodes of its endpoints); the others
/// keep their part of the previous view, shared.
#[derive(Debug, Default)]
pub struct Builder {
    cache: HashMap<(String, String), (Inputs, View)>,
    /// How many Services' parts were reused (not computed) so far.
    pub reused: usize,
    scope: Scope,
}

/// Which namespaces the source reads.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    /// `--namespace-selector`: only namespaces whose labels it selects (all without one).
    pub selector: Option<NamespaceSelector>,
    /// The cluster's network: a namespace labelled `topology.istio.io/network` with another
    /// network is not read (its services are reported), since meshfed places every endpoint
    /// of a cluster on the cluster's network. Empty: not checked.
    pub network: String,
}

/// The namespace label that places workloads on a network (as Istio reads it).
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

impl Builder {
    pub fn new(scope: Scope) -> Builder {
        Builder {
            scope,
            ..Default::default()
        }
    }

    pub fn build(&mut self, o: &Objects, default_locality: &Locality) -> View {
        let mut view = View::default();
        let no_labels = BTreeMap::new();
        let ns_labels: HashMap<&str, &BTreeMap<String, String>> = o
            .namespaces
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.as_deref()?,
                    n.metadata.labels.as_ref().unwrap_or(&no_labels),
                ))
            })
            .collect();
        // Why a namespace is not read, if it is not.
        let skipped = |ns: &str| -> Option<String> {
            let labels = ns_labels.get(ns).copied().unwrap_or(&no_labels);
            if let Some(sel) = &self.scope.selector {
                if !sel.matches(labels) {
                    return Some(format!(
                        "namespace {ns} is not selected by --namespace-selector {:?}",
                        sel.text
                    ));
                }
            }
            match labels.get(NETWORK_LABEL) {
                Some(net) if !self.scope.network.is_empty() && *net != self.scope.network => {
                    Some(format!(
                        "namespace {ns} is labelled {NETWORK_LABEL}={net}, but this cluster is on network {}; meshfed places every endpoint of a cluster on its network, so its services are not read",
                        self.scope.network
                    ))
                }
                _ => None,
            }
        };
        let nodes: Nodes<'_> = o
            .nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, (n, node_locality(n)))))
            .collect();
        let pods: Pods<'_> = o
            .pods
            .iter()
            .map(|p| {
                (
                    (
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        p.metadata.name.as_deref().unwrap_or_default(),
                    ),
                    p,
                )
            })
            .collect();
        let mut slices: HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = HashMap::new();
        for s in &o.slices {
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                slices.entry((ns, svc.as_str())).or_default().push(s);
            }
        }
        for v in slices.values_mut() {
            v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        let mut exports: HashMap<(&str, &str), &Arc<ServiceExport>> = o
            .exports
            .iter()
            .map(|se| {
                (
                    (
                        se.metadata.namespace.as_deref().unwrap_or_default(),
                        se.metadata.name.as_deref().unwrap_or_default(),
                    ),
                    se,
                )
            })
            .collect();
        for svc in &o.services {
            view.service_names.insert(name_of(&svc.metadata));
        }
        let ours = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.labels
                .as_ref()
                .and_then(|l| l.get(crate::types::MANAGED_BY_LABEL))
                .is_some_and(|v| v == crate::types::MANAGED_BY)
        };
        for se in o.service_entries.iter().filter(|x| !ours(&x.metadata)) {
            let (ns, name) = name_of(&se.metadata);
            let hosts: Vec<String> = se.spec["hosts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            view.istio_user.add_service_entry(&ns, &name, &hosts);
        }
        for dr in o.destination_rules.iter().filter(|x| !ours(&x.metadata)) {
            let (ns, name) = name_of(&dr.metadata);
            if let Some(h) = dr.spec["host"].as_str() {
                view.istio_user.add_destination_rule(&ns, &name, h);
            }
        }
        let mut entries_by_ns: HashMap<&str, Vec<&Arc<WorkloadEntry>>> = HashMap::new();
        // The WorkloadEntries meshfed wrote for imports are other clusters' workloads.
        for w in o.workload_entries.iter().filter(|w| {
            !w.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(crate::istio::IMPORTED_FROM_LABEL))
        }) {
            entries_by_ns
                .entry(w.metadata.namespace.as_deref().unwrap_or_default())
                .or_default()
                .push(w);
        }
        let mut cache = HashMap::with_capacity(o.services.len());
        for svc in &o.services {
            let (ns, name) = name_of(&svc.metadata);
            if name.is_empty() {
                continue;
            }
            let here = (
                svc.metadata.namespace.as_deref().unwrap_or_default(),
                svc.metadata.name.as_deref().unwrap_or_default(),
            );
            if let Some(why) = skipped(&ns) {
                // Not read; an export of it is refused with the reason (an unselected
                // namespace's Services are simply not the mesh's).
                if exports.remove(&here).is_some() {
                    view.service_exports.insert(
                        (ns.clone(), name.clone()),
                        Err(("InvalidService".into(), why.clone())),
                    );
                    view.problems.push(Problem {
                        kind: "ServiceExport",
                        namespace: ns.clone(),
                        name: name.clone(),
                        reason: why,
                    });
                }
                continue;
            }
            let key = (ns, name);
            let svc_slices: &[&Arc<EndpointSlice>] =
                slices.get(&here).map(|v| v.as_slice()).unwrap_or_default();
            let export = exports.remove(&here);
            // The WorkloadEntries of its namespace its selector selects (as Istio does).
            let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
            let svc_entries: Vec<&Arc<WorkloadEntry>> = match selector {
                Some(sel) if !sel.is_empty() => entries_by_ns
                    .get(key.0.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|w| sel.iter().all(|(k, v)| w.spec.labels.get(k) == Some(v)))
                    .copied()
                    .collect(),
                _ => Vec::new(),
            };
            let inputs = Inputs::of(svc, svc_slices, export, &key.0, &pods, &nodes, &svc_entries);
            let one = match self.cache.remove(&key) {
                Some((was, one)) if was == inputs => {
                    self.reused += 1;
                    one
                }
                _ => one_service(
                    svc,
                    svc_slices,
                    &svc_entries,
                    export.map(|se| export_options(se)),
                    &pods,
                    &nodes,
                    &self.scope.network,
                    default_locality,
                ),
            };
            view.local
                .extend(one.local.iter().map(|(k, v)| (k.clone(), v.clone())));
            view.exports
                .extend(one.exports.iter().map(|(k, v)| (k.clone(), v.clone())));
            view.problems.extend(one.problems.iter().cloned());
            view.service_exports.extend(
                one.service_exports
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            cache.insert(key, (inputs, one));
        }
        self.cache = cache;
        // Services made of Istio objects: a user's ServiceEntry (MESH_INTERNAL, STATIC) with
        // its inline endpoints or the WorkloadEntries it selects, exported by a ServiceExport
        // of its name, as a Service would be. A Service of the same name wins (as in istiod).
        for se in o.service_entries.iter().filter(|x| !ours(&x.metadata)) {
            let (ns, name) = name_of(&se.metadata);
            if name.is_empty() || skipped(&ns).is_some() {
                continue;
            }
            let key = validate::service_key(&ns, &name);
            let export = exports.remove(&(
                se.metadata.namespace.as_deref().unwrap_or_default(),
                se.metadata.name.as_deref().unwrap_or_default(),
            ));
            if view.local.contains_key(&key) {
                continue;
            }
            let selected: Vec<&Arc<WorkloadEntry>> = match se.spec["workloadSelector"]["labels"]
                .as_object()
            {
                Some(sel) if !sel.is_empty() => entries_by_ns
                    .get(ns.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|w| {
                        sel.iter()
                            .all(|(k, v)| w.spec.labels.get(k).map(|x| x.as_str()) == v.as_str())
                    })
                    .copied()
                    .collect(),
                _ => Vec::new(),
            };
            let one = one_service_entry(
                se,
                &selected,
                export.map(|x| export_options(x)),
                &self.scope.network,
                default_locality,
            );
            view.local.extend(one.local);
            view.exports.extend(one.exports);
            view.problems.extend(one.problems);
            view.service_exports.extend(one.service_exports);
        }
        // ServiceExports whose Service does not exist (MCS condition Valid=False, NoService).
        let mut orphans: Vec<(String, String)> = exports
            .into_keys()
            .map(|(ns, name)| (ns.to_string(), name.to_string()))
            .collect();
        orphans.sort();
        for (ns, name) in orphans {
            // In a namespace that is not read, that is the reason; else the Service is missing.
            let (reason, message) = match skipped(&ns) {
                Some(why) => ("InvalidService", why),
                None => ("NoService", format!("no Service {ns}/{name} to export")),
            };
            view.service_exports.insert(
                (ns.clone(), name.clone()),
                Err((reason.into(), message.clone())),
            );
            view.problems.push(Problem {
                kind: "ServiceExport",
                namespace: ns.clone(),
                name: name.clone(),
                reason: message,
            });
        }
        // WorkloadGroups: templates for VMs, read as the registry file's are.
        for g in &o.workload_groups {
            let (ns, name) = name_of(&g.metadata);
            if skipped(&ns).is_some() {
                continue;
            }
            match workload_group(g) {
                Ok(wg) => view.workload_groups.push(wg),
                Err(reason) => view.problems.push(Problem {
                    kind: "WorkloadGroup",
                    namespace: ns,
                    name,
                    reason,
                }),
            }
        }
        view.workload_groups.sort_by_key(|g| g.key());
        view.problems.sort();
        // A WorkloadEntry selected by several Services is reported once.
        view.problems.dedup();
        view
    }
}

/// Istio's port protocol as a Kubernetes port: (protocol, appProtocol).
fn port_protocols(istio: &str) -> (&'static str, String) {
    match istio.to_ascii_uppercase().as_str() {
        "UDP" => ("UDP", String::new()),
        "" | "TCP" => ("TCP", String::new()),
        other => ("TCP", other.to_ascii_lowercase()),
    }
}

/// A user's ServiceEntry as a service of the cluster (like [`one_service`] for a Service):
/// `MESH_INTERNAL` with `STATIC` resolution only (an external or DNS entry is not a workload
/// of this cluster); its ports; its inline endpoints, or the WorkloadEntries it selects.
fn one_service_entry(
    se: &crate::types::ServiceEntry,
    selected: &[&Arc<WorkloadEntry>],
    want: Option<Result<ExportOptions, String>>,
    network: &str,
    default_locality: &Locality,
) -> View {
    let mut view = View::default();
    let (ns, name) = name_of(&se.metadata);
    let has_export = want.is_some();
    let refuse = |view: &mut View, reason: String| {
        if has_export {
            view.service_exports.insert(
                (ns.clone(), name.clone()),
                Err((
                    "InvalidService".into(),
                    format!("ServiceEntry {ns}/{name}: {reason}"),
                )),
            );
        }
        view.problems.push(Problem {
            kind: "ServiceEntry",
            namespace: ns.clone(),
            name: name.clone(),
            reason,
        });
    };
    let spec = &se.spec;
    let location = spec["location"].as_str().unwrap_or("MESH_EXTERNAL");
    let resolution = spec["resolution"].as_str().unwrap_or("NONE");
    if location != "MESH_INTERNAL" || resolution != "STATIC" {
        // Not a service of this cluster's workloads: only an export of it is a problem.
        if has_export {
            refuse(
                &mut view,
                format!(
                    "location {location}, resolution {resolution}: only a MESH_INTERNAL ServiceEntry with STATIC resolution names workloads meshfed can export"
                ),
            );
        }
        return view;
    }
    let mut ports = Vec::new();
    for (i, p) in spec["ports"].as_array().into_iter().flatten().enumerate() {
        let Some(number) = p["number"].as_u64().filter(|n| (1..=65535).contains(n)) else {
            refuse(
                &mut view,
                format!("spec.ports[{i}].number: not a port in 1-65535"),
            );
            return view;
        };
        let (protocol, app) = port_protocols(p["protocol"].as_str().unwrap_or(""));
        ports.push(Port {
            name: p["name"].as_str().unwrap_or("").to_string(),
            port: number as u32,
            protocol: protocol.into(),
            app_protocol: app,
        });
    }
    let mut endpoints = Vec::new();
    let inline: Vec<(String, crate::types::WorkloadEntrySpec, bool)> = match spec.get("endpoints") {
        Some(v) => {
            match serde_json::from_value::<Vec<crate::types::WorkloadEntrySpec>>(v.clone()) {
                Ok(list) => list
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| (format!("spec.endpoints[{i}]"), e, true))
                    .collect(),
                Err(e) => {
                    refuse(&mut view, format!("spec.endpoints: {e}"));
                    return view;
                }
            }
        }
        None => Vec::new(),
    };
    let from_entries = selected.iter().map(|w| {
        let (wns, wname) = name_of(&w.metadata);
        (
            format!("WorkloadEntry {wns}/{wname}"),
            w.spec.clone(),
            w.healthy(),
        )
    });
    for (at, e, healthy) in inline.into_iter().chain(from_entries) {
        match entry_endpoint(&e, healthy, &ports, network, default_locality) {
            Ok(ep) => endpoints.push(ep),
            Err(why) => view.problems.push(Problem {
                kind: "ServiceEntry",
                namespace: ns.clone(),
                name: name.clone(),
                reason: format!("{at}: {why}"),
            }),
        }
    }
    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    endpoints.dedup_by(|a, b| a.address == b.address);
    let opts = match want {
        Some(Ok(o)) => Some(o),
        Some(Err(e)) => {
            refuse(&mut view, e);
            None
        }
        None => None,
    };
    let e = export(
        &ns,
        &name,
        false,
        ports,
        endpoints,
        opts.as_ref(),
        se.metadata.labels.as_ref(),
    );
    if let Err(err) = validate::check_export(&e, "ServiceEntry") {
        refuse(&mut view, err.to_string());
        return view;
    }
    let key = validate::service_key(&ns, &name);
    let e = Arc::new(e);
    if opts.is_some() {
        view.service_exports
            .insert((ns.clone(), name.clone()), Ok(()));
        view.exports.insert(key.clone(), e.clone());
    }
    view.local.insert(key, e);
    view
}

/// Why a WorkloadEntry (or a ServiceEntry's inline endpoint) is not an endpoint.
#[derive(Debug)]
enum EntryRefused {
    Address(String),
    /// (the entry's, the cluster's)
    OtherNetwork(String, String),
    Locality(String),
}

impl std::fmt::Display for EntryRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryRefused::Address(a) => write!(f, "spec.address: {a:?} is not an IP address"),
            EntryRefused::OtherNetwork(n, ours) => write!(
                f,
                "spec.network: {n} is not this cluster's network {ours}; meshfed places every endpoint of a cluster on its network"
            ),
            EntryRefused::Locality(e) => write!(f, "spec.locality: {e}"),
        }
    }
}

/// A WorkloadEntry's spec as an endpoint of a service with `ports` (its `ports` map names
/// the target port of a service port).
fn entry_endpoint(
    spec: &crate::types::WorkloadEntrySpec,
    healthy: bool,
    ports: &[Port],
    network: &str,
    default_locality: &Locality,
) -> Result<Endpoint, EntryRefused> {
    if spec.address.parse::<std::net::IpAddr>().is_err() {
        return Err(EntryRefused::Address(spec.address.clone()));
    }
    if !network.is_empty() && !spec.network.is_empty() && spec.network != network {
        return Err(EntryRefused::OtherNetwork(
            spec.network.clone(),
            network.to_string(),
        ));
    }
    let locality = if spec.locality.is_empty() {
        default_locality.clone()
    } else {
        validate::parse_locality(&spec.locality).map_err(|e| EntryRefused::Locality(e.reason))?
    };
    let target: BTreeMap<String, u32> = ports
        .iter()
        .filter_map(|p| {
            let t = *spec.ports.get(&p.name)?;
            (t != p.port && (1..=65535).contains(&t)).then(|| (p.name.clone(), t))
        })
        .collect();
    Ok(Endpoint {
        address: spec.address.clone(),
        locality: Some(locality),
        labels: spec.labels.clone().into_iter().collect(),
        weight: spec.weight.max(1),
        healthy,
        service_account: spec.service_account.clone(),
        ports: target.into_iter().collect(),
        hostname: String::new(),
    })
}

/// One Service's part of the view (its export, problems and ServiceExport validity), from the
/// Service, its slices (sorted by name), its ServiceExport's options, and the Pods and Nodes.
#[allow(clippy::too_many_arguments)]
fn one_service(
    svc: &Service,
    slices: &[&Arc<EndpointSlice>],
    entries: &[&Arc<WorkloadEntry>],
    want: Option<Result<ExportOptions, String>>,
    pods: &Pods<'_>,
    nodes: &Nodes<'_>,
    network: &str,
    default_locality: &Locality,
) -> View {
    let mut view = View::default();
    let (ns, name) = name_of(&svc.metadata);
    let has_export = want.is_some();
    let mut invalid = |reason: &str, message: String| {
        if has_export {
            view.service_exports.insert(
                (ns.clone(), name.clone()),
                Err((reason.to_string(), message)),
            );
        }
    };
    let problem = |reason: String| Problem {
        kind: "Service",
        namespace: ns.clone(),
        name: name.clone(),
        reason,
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        if want.is_some() {
            let m = "an ExternalName Service has no endpoints to export".to_string();
            invalid("InvalidServiceType", m.clone());
            view.problems.push(problem(m));
        }
        return view;
    }
    let mut ports = Vec::new();
    let mut bad = None;
    for (i, p) in spec.ports.clone().unwrap_or_default().iter().enumerate() {
        match u32::try_from(p.port)
            .ok()
            .filter(|n| (1..=65535).contains(n))
        {
            Some(port) => ports.push(Port {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
            }),
            None => {
                bad = Some(format!(
                    "spec.ports[{i}].port: {} is not in 1-65535",
                    p.port
                ));
                break;
            }
        }
    }
    if let Some(b) = bad {
        invalid("InvalidService", b.clone());
        view.problems.push(problem(b));
        return view;
    }
    let mut endpoints = Vec::new();
    for s in slices {
        if s.address_type == "FQDN" {
            continue;
        }
        let slice_ports: HashMap<String, u32> = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u32::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for e in &s.endpoints {
            let Some(address) = e.addresses.first() else {
                continue;
            };
            let c = e.conditions.clone().unwrap_or_default();
            // `ready` unset means ready (API conventions); a terminating endpoint takes no
            // new connections.
            let healthy = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
            let locality = e
                .node_name
                .as_ref()
                .and_then(|n| nodes.get(n.as_str()).and_then(|(_, l)| l.clone()))
                .unwrap_or_else(|| Locality {
                    zone: e
                        .zone
                        .clone()
                        .unwrap_or_else(|| default_locality.zone.clone()),
                    ..default_locality.clone()
                });
            let pod = pod_of(e, &ns, pods).map(|p| &**p);
            let mut target = BTreeMap::new();
            for p in &ports {
                if let Some(tp) = slice_ports.get(&p.name) {
                    if *tp != p.port {
                        target.insert(p.name.clone(), *tp);
                    }
                }
            }
            endpoints.push(Endpoint {
                hostname: e.hostname.clone().unwrap_or_default(),
                address: address.clone(),
                locality: Some(locality),
                labels: pod
                    .and_then(|p| p.metadata.labels.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                weight: 1,
                healthy,
                service_account: pod
                    .and_then(|p| p.spec.as_ref())
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                ports: target.into_iter().collect(),
            });
        }
    }
    for w in entries {
        let (wns, wname) = name_of(&w.metadata);
        let ours = w
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::types::MANAGED_BY_LABEL))
            .is_some_and(|v| v == crate::types::MANAGED_BY);
        match entry_endpoint(&w.spec, w.healthy(), &ports, network, default_locality) {
            Ok(e) => endpoints.push(e),
            // meshfed's own entry of a VM on another network: the VM is served through its
            // registration, not as a Kubernetes endpoint; not a problem of the user's.
            Err(EntryRefused::OtherNetwork(..)) if ours => {}
            Err(e) => view.problems.push(Problem {
                kind: "WorkloadEntry",
                namespace: wns,
                name: wname,
                reason: e.to_string(),
            }),
        }
    }
    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    endpoints.dedup_by(|a, b| a.address == b.address);
    let opts = match want {
        Some(Ok(o)) => Some(o),
        Some(Err(e)) => {
            invalid("InvalidAnnotation", e.clone());
            view.problems.push(Problem {
                kind: "ServiceExport",
                namespace: ns.clone(),
                name: name.clone(),
                reason: e,
            });
            None
        }
        None => None,
    };
    let e = export(
        &ns,
        &name,
        spec.cluster_ip.as_deref() == Some("None"),
        ports,
        endpoints,
        opts.as_ref(),
        svc.metadata.labels.as_ref(),
    );
    if let Err(err) = validate::check_export(&e, "service") {
        invalid("InvalidService", err.to_string());
        view.problems.push(problem(err.to_string()));
        return view;
    }
    let key = validate::service_key(&ns, &name);
    let e = Arc::new(e);
    if opts.is_some() {
        view.service_exports
            .insert((ns.clone(), name.clone()), Ok(()));
        view.exports.insert(key.clone(), e.clone());
    }
    view.local.insert(key, e);
    view
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn objects() -> Objects {
        Objects {
            namespaces: Vec::new(),
            workload_entries: Vec::new(),
            workload_groups: Vec::new(),
            service_entries: Vec::new(),
            destination_rules: Vec::new(),
            services: vec![
                obj(serde_json::json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "payment", "namespace": "shop", "labels": {"app": "payment"}},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                                       {"name": "grpc", "port": 9090, "appProtocol": "grpc"}],
                             "selector": {"app": "payment"}}})),
                obj(serde_json::json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "internal", "namespace": "shop"},
                    "spec": {"ports": [{"port": 7000}]}})),
                obj(serde_json::json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "dns", "namespace": "shop"},
                    "spec": {"type": "ExternalName", "externalName": "example.com"}})),
            ],
            slices: vec![obj(
                serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "payment-abc", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "payment"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                          {"name": "grpc", "port": 9090, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "nodeName": "node-b",
                     "zone": "us-east1-b", "targetRef": {"kind": "Pod", "name": "payment-1", "namespace": "shop"}},
                    {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "serving": true, "terminating": true},
                     "nodeName": "node-unknown", "zone": "us-east1-c"}
                ]}),
            )],
            nodes: vec![obj(serde_json::json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-b", "labels": {"topology.kubernetes.io/region": "us-east1",
                    "topology.kubernetes.io/zone": "us-east1-b", "topology.istio.io/subzone": "rack7"}}}))],
            pods: vec![obj(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "payment-1", "namespace": "shop", "labels": {"app": "payment", "version": "v2"}},
                "spec": {"serviceAccountName": "payment", "containers": [{"name": "app"}]}}))],
            exports: vec![obj(
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "payment", "namespace": "shop",
                             "annotations": {"meshfed.io/export-to": "west, eu", "meshfed.io/on-expiry": "withdraw"}}}),
            )],
        }
    }

    fn default_loc() -> Locality {
        Locality {
            region: "us-east1".into(),
            zone: "us-east1-a".into(),
            subzone: String::new(),
        }
    }

    #[test]
    fn services_slices_nodes_pods_and_exports_become_the_model() {
        let v = build(&objects(), &default_loc());
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(
            v.local.keys().collect::<Vec<_>>(),
            ["shop/internal", "shop/payment"]
        );
        assert_eq!(v.exports.keys().collect::<Vec<_>>(), ["shop/payment"]);
        let p = &v.exports["shop/payment"];
        assert_eq!(p.export_to, ["west", "eu"]);
        assert_eq!(p.on_expiry, OnExpiry::Withdraw as i32);
        assert_eq!(p.ports[0].name, "http");
        assert_eq!(p.ports[1].app_protocol, "grpc");
        let e = &p.endpoints[0];
        assert_eq!(e.address, "10.1.0.5");
        assert!(e.healthy);
        assert_eq!(e.service_account, "payment");
        assert_eq!(e.labels.get("version").map(String::as_str), Some("v2"));
        let l = e.locality.clone().unwrap();
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
            ("us-east1", "us-east1-b", "rack7")
        );
        // http's target port differs (80 -> 8080); grpc's does not.
        assert_eq!(e.ports.get("http"), Some(&8080));
        assert_eq!(e.ports.get("grpc"), None);
        // The terminating endpoint is unhealthy; its unknown node gives the default region
        // and the slice's zone.
        let t = &p.endpoints[1];
        assert!(!t.healthy);
        assert_eq!(t.locality.clone().unwrap().zone, "us-east1-c");
        assert!(t.service_account.is_empty());
    }

    /// A headless Service (`clusterIP: None`) is exported as headless, its endpoints with
    /// the slice's hostnames (a StatefulSet's pods).
    #[test]
    fn a_headless_service_keeps_its_endpoints_hostnames() {
        let mut o = objects();
        o.services.push(obj(
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        ));
        o.slices
            .push(obj(serde_json::json!({"apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "db-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432}],
            "endpoints": [{"addresses": ["10.1.0.20"], "hostname": "db-0"},
                          {"addresses": ["10.1.0.21"], "hostname": "db-1"}]})));
        o.exports.push(obj(
            serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "db", "namespace": "shop"}}),
        ));
        let v = build(&o, &default_loc());
        let db = &v.exports["shop/db"];
        assert!(db.headless);
        let hosts: Vec<&str> = db.endpoints.iter().map(|e| e.hostname.as_str()).collect();
        assert_eq!(hosts, ["db-0", "db-1"]);
        assert!(!v.exports["shop/payment"].headless);
    }

    /// `--namespace-selector` reads only selected namespaces (an export elsewhere is refused
    /// with the reason), and a namespace placed on another network is not read.
    #[test]
    fn the_scope_leaves_out_unselected_namespaces_and_other_networks() {
        let mut o = objects();
        o.namespaces = vec![obj(
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"meshfed.io/federate": "true"}}}),
        )];
        let scope = |sel: &str| Scope {
            selector: Some(crate::selector::parse(sel).unwrap()),
            network: "net-a".into(),
        };
        let v = Builder::new(scope("meshfed.io/federate=true")).build(&o, &default_loc());
        assert_eq!(v.exports.keys().collect::<Vec<_>>(), ["shop/payment"]);
        let mut with_ghost = o.clone();
        with_ghost.exports.push(obj(
            serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "ghost", "namespace": "shop"}}),
        ));
        let v = Builder::new(scope("meshfed.io/federate=false")).build(&with_ghost, &default_loc());
        assert!(v.local.is_empty() && v.exports.is_empty());
        let text: Vec<String> = v.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "ServiceExport shop/ghost: namespace shop is not selected by --namespace-selector \"meshfed.io/federate=false\"",
                "ServiceExport shop/payment: namespace shop is not selected by --namespace-selector \"meshfed.io/federate=false\""
            ]
        );
        assert!(matches!(
            &v.service_exports[&("shop".to_string(), "payment".to_string())],
            Err((r, _)) if r == "InvalidService"
        ));
        // The namespace moves to another network: nothing of it is read.
        o.namespaces = vec![obj(
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"meshfed.io/federate": "true",
                "topology.istio.io/network": "net-b"}}}),
        )];
        let mut b = Builder::new(scope("meshfed.io/federate"));
        let v = b.build(&o, &default_loc());
        assert!(v.local.is_empty());
        assert!(
            v.problems[0]
                .reason
                .contains("topology.istio.io/network=net-b"),
            "{:?}",
            v.problems
        );
        // Back on the cluster's network: read again.
        o.namespaces = vec![obj(
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"meshfed.io/federate": "true",
                "topology.istio.io/network": "net-a"}}}),
        )];
        assert_eq!(b.build(&o, &default_loc()).exports.len(), 1);
    }

    /// A user's ServiceEntry (MESH_INTERNAL, STATIC) is a service of the cluster, exported by a
    /// ServiceExport of its name: its ports, its inline endpoints or the WorkloadEntries it
    /// selects (not the ones meshfed wrote for imports). An external one is refused when
    /// exported, naming it; a Service of the same name wins; meshfed's own entries are skipped.
    #[test]
    fn service_entries_are_services_and_can_be_exported() {
        let mut o = objects();
        let se = |name: &str, spec: serde_json::Value| -> Arc<crate::types::ServiceEntry> {
            obj(
                serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec}),
            )
        };
        o.service_entries = vec![
            se(
                "legacy",
                serde_json::json!({"hosts": ["legacy.shop.internal"], "location": "MESH_INTERNAL",
                "resolution": "STATIC", "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                "workloadSelector": {"labels": {"app": "legacy"}}}),
            ),
            se(
                "inline",
                serde_json::json!({"hosts": ["inline.shop.internal"], "location": "MESH_INTERNAL",
                "resolution": "STATIC", "ports": [{"number": 9000, "name": "tcp", "protocol": "TCP"}],
                "endpoints": [{"address": "10.7.0.1", "ports": {"tcp": 9001}, "locality": "us-west1/us-west1-b"},
                              {"address": "not-an-ip"}]}),
            ),
            se(
                "external",
                serde_json::json!({"hosts": ["api.example.com"], "location": "MESH_EXTERNAL",
                "resolution": "DNS", "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}),
            ),
            // The name of a Service: the Service is the one served.
            se(
                "payment",
                serde_json::json!({"hosts": ["payment.example"], "location": "MESH_INTERNAL",
                "resolution": "STATIC", "ports": [{"number": 1, "name": "x"}]}),
            ),
        ];
        let we = |name: &str, labels: serde_json::Value, addr: &str| -> Arc<WorkloadEntry> {
            obj(
                serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "spec": {"address": addr, "labels": {"app": "legacy"}, "serviceAccount": "legacy"}}),
            )
        };
        o.workload_entries = vec![
            we("legacy-1", serde_json::json!({}), "10.6.0.1"),
            we("legacy-2", serde_json::json!({}), "10.6.0.2"),
            // An import meshfed wrote: another cluster's workload, never this one's.
            we(
                "meshfed-legacy-west-1",
                serde_json::json!({"meshfed.io/imported-from": "west",
                "app.kubernetes.io/managed-by": "meshfed"}),
                "10.6.0.3",
            ),
        ];
        o.exports = vec![
            obj(
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "legacy", "namespace": "shop"}}),
            ),
            obj(
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "external", "namespace": "shop"}}),
            ),
        ];
        let v = build(&o, &default_loc());
        let legacy = &v.exports["shop/legacy"];
        assert_eq!(legacy.ports[0].port, 8080);
        assert_eq!(legacy.ports[0].app_protocol, "http");
        let addrs: Vec<&str> = legacy
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(addrs, ["10.6.0.1", "10.6.0.2"]);
        assert_eq!(legacy.endpoints[0].service_account, "legacy");
        assert_eq!(
            v.service_exports[&("shop".to_string(), "legacy".to_string())],
            Ok(())
        );
        // Not exported, but a service of the cluster; its bad endpoint named.
        let inline = &v.local["shop/inline"];
        assert!(!v.exports.contains_key("shop/inline"));
        assert_eq!(inline.endpoints.len(), 1);
        assert_eq!(inline.endpoints[0].ports.get("tcp"), Some(&9001));
        let problems: Vec<String> = v.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            problems.iter().any(|p| p.starts_with("ServiceEntry shop/inline: spec.endpoints[1]: spec.address")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("ServiceEntry shop/external: location MESH_EXTERNAL")),
            "{problems:?}"
        );
        assert!(matches!(
            &v.service_exports[&("shop".to_string(), "external".to_string())],
            Err((reason, _)) if reason == "InvalidService"
        ));
        assert!(!v.local.contains_key("shop/external"));
        // payment is the Service's (its port 80), not the ServiceEntry's.
        assert_eq!(v.local["shop/payment"].ports[0].port, 80);
    }

    /// Istio WorkloadEntries selected by a Service's selector in its namespace are its
    /// endpoints (locality, labels, service account, target ports from `ports`); one that
    /// cannot be used is a problem naming it; a change of one is seen by the builder.
    #[test]
    fn workload_entries_selected_by_a_service_are_its_endpoints() {
        let we = |name: &str, ns: &str, spec: serde_json::Value| -> Arc<WorkloadEntry> {
            obj(
                serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": name, "namespace": ns}, "spec": spec}),
            )
        };
        let mut o = objects();
        o.workload_entries = vec![
            we(
                "vm-1",
                "shop",
                serde_json::json!({"address": "10.5.0.9",
                "labels": {"app": "payment", "version": "vm"}, "locality": "us-west1/us-west1-a",
                "ports": {"http": 9080}, "serviceAccount": "payment-vm", "network": "net-a", "weight": 3}),
            ),
            we(
                "vm-dns",
                "shop",
                serde_json::json!({"address": "vm.example.com", "labels": {"app": "payment"}}),
            ),
            we(
                "vm-far",
                "shop",
                serde_json::json!({"address": "10.9.0.9", "labels": {"app": "payment"}, "network": "net-b"}),
            ),
            we(
                "vm-other-ns",
                "bank",
                serde_json::json!({"address": "10.5.0.10", "labels": {"app": "payment"}}),
            ),
            we(
                "vm-other-app",
                "shop",
                serde_json::json!({"address": "10.5.0.11", "labels": {"app": "ledger"}}),
            ),
        ];
        let mut b = Builder::new(Scope {
            selector: None,
            network: "net-a".into(),
        });
        let v = b.build(&o, &default_loc());
        let p = &v.exports["shop/payment"];
        let addrs: Vec<&str> = p.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["10.1.0.5", "10.1.0.6", "10.5.0.9"]);
        let vm = &p.endpoints[2];
        assert_eq!(vm.service_account, "payment-vm");
        assert_eq!(vm.weight, 3);
        assert_eq!(vm.ports.get("http"), Some(&9080));
        assert_eq!(vm.labels.get("version").map(String::as_str), Some("vm"));
        assert_eq!(vm.locality.as_ref().unwrap().region, "us-west1");
        let text: Vec<String> = v.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("WorkloadEntry shop/vm-dns: spec.address"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("WorkloadEntry shop/vm-far: spec.network: net-b"),
            "{text:?}"
        );
        // The VM's entry changes its address: payment is computed again.
        o.workload_entries[0] = we(
            "vm-1",
            "shop",
            serde_json::json!({"address": "10.5.0.19",
            "labels": {"app": "payment"}}),
        );
        let v = b.build(&o, &default_loc());
        assert!(v.exports["shop/payment"]
            .endpoints
            .iter()
            .any(|e| e.address == "10.5.0.19"));
        assert_eq!(
            v,
            Builder::new(Scope {
                selector: None,
                network: "net-a".into()
            })
            .build(&o, &default_loc())
        );
    }

    /// A builder computes again only the Services whose objects changed, and its view is the
    /// one built from scratch.
    #[test]
    fn workload_groups_are_read_as_the_registry_files_and_bad_ones_named() {
        let g = |name: &str,
                 ns: &str,
                 spec: serde_json::Value|
         -> Arc<crate::types::WorkloadGroup> {
            obj(
                serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                "metadata": {"name": name, "namespace": ns, "uid": "u-1", "resourceVersion": "7",
                             "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
                "spec": spec}),
            )
        };
        let mut o = objects();
        o.workload_groups = vec![
            g(
                "payment-vm",
                "shop",
                serde_json::json!({"metadata": {"labels": {"app": "payment"}},
                    "template": {"serviceAccount": "payment", "network": "vm-net"},
                    "probe": {"periodSeconds": 5, "tcpSocket": {"port": 8443}}}),
            ),
            g(
                "with-address",
                "shop",
                serde_json::json!({"template": {"address": "10.0.0.1"}}),
            ),
            g("typo", "shop", serde_json::json!({"templat": {}})),
            g(
                "two-checks",
                "shop",
                serde_json::json!({"probe": {"tcpSocket": {"port": 1}, "httpGet": {"port": 2}}}),
            ),
        ];
        let v = build(&o, &default_loc());
        assert_eq!(v.workload_groups.len(), 1);
        let wg = &v.workload_groups[0];
        assert_eq!(wg.key(), "shop/payment-vm");
        assert_eq!(wg.spec.metadata.labels["app"], "payment");
        assert_eq!(
            wg.spec
                .template
                .service_account
                .as_ref()
                .map(|s| s.0.as_str()),
            Some("payment")
        );
        assert_eq!(wg.spec.probe.as_ref().map(|p| p.period_seconds), Some(5));
        let text: Vec<String> = v
            .problems
            .iter()
            .filter(|p| p.kind == "WorkloadGroup")
            .map(|p| p.to_string())
            .collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with("WorkloadGroup shop/two-checks: spec.probe"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("WorkloadGroup shop/typo: spec: unknown field `templat`"),
            "{text:?}"
        );
        assert!(
            text[2].starts_with("WorkloadGroup shop/with-address: spec.template.address"),
            "{text:?}"
        );
        // A group in a namespace the selector leaves out is not read.
        let v = Builder::new(Scope {
            selector: Some(crate::selector::parse("meshfed.io/federate=true").unwrap()),
            network: String::new(),
        })
        .build(&o, &default_loc());
        assert!(v.workload_groups.is_empty());
    }

    #[test]
    fn the_builder_recomputes_only_what_changed() {
        let mut o = objects();
        let mut b = Builder::default();
        let first = b.build(&o, &default_loc());
        assert_eq!(first, build(&o, &default_loc()));
        assert_eq!(b.reused, 0);
        // The same objects: every Service reused (payment, internal and the ExternalName one).
        let again = b.build(&o, &default_loc());
        assert_eq!(again, first);
        assert_eq!(b.reused, 3);
        assert!(Arc::ptr_eq(
            &again.local["shop/payment"],
            &first.local["shop/payment"]
        ));
        // The Pod behind payment's endpoint changes its labels: payment is computed again.
        o.pods = vec![obj(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "payment-1", "namespace": "shop", "labels": {"app": "payment", "version": "v3"}},
            "spec": {"serviceAccountName": "payment", "containers": [{"name": "app"}]}}))];
        let v = b.build(&o, &default_loc());
        assert_eq!(b.reused, 5, "internal and dns reused, payment not");
        assert_eq!(v, build(&o, &default_loc()));
        assert_eq!(
            v.local["shop/payment"].endpoints[0]
                .labels
                .get("version")
                .map(String::as_str),
            Some("v3")
        );
        // The Node's zone changes: payment again.
        o.nodes = vec![obj(serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-b", "labels": {"topology.kubernetes.io/region": "us-east1",
                "topology.kubernetes.io/zone": "us-east1-d"}}}))];
        let v = b.build(&o, &default_loc());
        assert_eq!(b.reused, 7);
        assert_eq!(v, build(&o, &default_loc()));
        // The ServiceExport goes: payment is no longer exported.
        o.exports.clear();
        let v = b.build(&o, &default_loc());
        assert!(v.exports.is_empty());
        assert_eq!(v, build(&o, &default_loc()));
        // A Service goes: its part goes with it.
        o.services
            .retain(|s| s.metadata.name.as_deref() != Some("internal"));
        let v = b.build(&o, &default_loc());
        assert!(!v.local.contains_key("shop/internal"));
        assert_eq!(v, build(&o, &default_loc()));
    }

    #[test]
    fn bad_objects_are_problems_naming_them_and_the_rest_goes_on() {
        let mut o = objects();
        o.services.push(obj(
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 70000}]}}),
        ));
        o.exports.push(obj(
            serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "ghost", "namespace": "shop"}}),
        ));
        o.exports.push(obj(
            serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "internal", "namespace": "shop",
            "annotations": {"meshfed.io/on-expiry": "sometimes"}}}),
        ));
        o.exports.push(obj(
            serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "dns", "namespace": "shop"}}),
        ));
        let v = build(&o, &default_loc());
        let text: Vec<String> = v.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "Service shop/broken: spec.ports[0].port: 70000 is not in 1-65535",
                "Service shop/dns: an ExternalName Service has no endpoints to export",
                "ServiceExport shop/ghost: no Service shop/ghost to export",
                "ServiceExport shop/internal: annotation meshfed.io/on-expiry: \"sometimes\" is not withdraw or deprioritize",
            ]
        );
        let state = |n: &str| v.service_exports[&("shop".to_string(), n.to_string())].clone();
        assert_eq!(state("payment"), Ok(()));
        assert_eq!(state("ghost").unwrap_err().0, "NoService");
        assert_eq!(state("internal").unwrap_err().0, "InvalidAnnotation");
        assert_eq!(state("dns").unwrap_err().0, "InvalidServiceType");
        // payment is still exported; internal runs but is not exported.
        assert_eq!(v.exports.keys().collect::<Vec<_>>(), ["shop/payment"]);
        assert!(v.local.contains_key("shop/internal"));
    }
}
