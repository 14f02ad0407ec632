//! What the agent writes for an istiod that runs in its cluster (`meshfed agent --istio`):
//! every imported service as Istio objects, so istiod programs its sidecars to reach it
//! through the exporters' east-west gateways, and the peers' roots in a mesh config istiod
//! merges under its own. Pure functions from the model to objects; [`crate::sink::ManagedWriter`]
//! applies them. The rules these follow, with their sources in istio/istio, are in docs/istio.md.
//!
//! - A `ServiceEntry` `meshfed-<service>` in the service's namespace: `MESH_INTERNAL`, `STATIC`,
//!   hosts `<svc>.<ns>.svc.clusterset.local` and, where no Service of that name exists in the
//!   cluster, `<svc>.<ns>.svc.cluster.local`; the exporters' ports with Istio protocols; the
//!   meshfed VIP as its address; `subjectAltNames` the exporters' workload identities (istiod
//!   derives a WorkloadEntry's identity in its own trust domain); a `workloadSelector` on the
//!   label only meshfed's WorkloadEntries for this service carry.
//! - `WorkloadEntry`s `meshfed-<service>-<cluster>-<hash>`: on the cluster's own network one per
//!   healthy endpoint (its address, ports, labels, locality, weight, service account); from
//!   another network one per endpoint group (same locality, labels and service account) and
//!   gateway of that network, addressed to the gateway with every port mapped to the gateway's
//!   port and the group's weight, `network` the exporter's. Each carries the endpoint's labels
//!   (so a local Service whose selector matches takes them as endpoints too, as istiod does
//!   for VMs), `security.istio.io/tlsMode: istio` (the gateway passes only TLS through; istiod
//!   drops remote endpoints that cannot do mTLS), and meshfed's labels.
//! - A `DestinationRule` `meshfed-<service>` per written host that has a meshfed policy (the
//!   cluster's own or the exporter's published one), unless the user wrote one for that host:
//!   `localityLbSetting` and `outlierDetection`, subsets. What Istio cannot express is named in
//!   the findings and the rule is not written.
//! - A user-written ServiceEntry for a host wins: meshfed leaves that host out and reports it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use meshfed_model::policy::Policy;
use meshfed_model::snapshot::Instance;
use serde_json::{json, Value};

use crate::types::{MANAGED_BY, MANAGED_BY_LABEL};

/// The cluster an imported WorkloadEntry's endpoints come from: the view never reads these as
/// the cluster's own workloads.
pub const IMPORTED_FROM_LABEL: &str = "meshfed.io/imported-from";
/// The imported service a WorkloadEntry belongs to: its ServiceEntry selects on it.
pub const IMPORTED_SERVICE_LABEL: &str = "meshfed.io/imported-service";
/// The selector of everything the Istio writer writes (ServiceEntries, WorkloadEntries and
/// DestinationRules of imports), apart from VMs' WorkloadEntries.
pub const IMPORTS_SELECTOR: &str =
    "app.kubernetes.io/managed-by=meshfed,meshfed.io/imported-service";
/// Istio's label that makes an endpoint mTLS-capable.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Istio's default east-west gateway port, for gateways advertised without one.
pub const DEFAULT_GATEWAY_PORT: u16 = 15443;

/// Istio objects meshfed did not write, by the host they name (fully qualified).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserObjects {
    /// host -> `namespace/name` of every user-written ServiceEntry naming it.
    pub service_entries: BTreeMap<String, Vec<String>>,
    /// host -> `namespace/name` of every user-written DestinationRule for it.
    pub destination_rules: BTreeMap<String, Vec<String>>,
}

impl UserObjects {
    /// Adds a ServiceEntry's hosts (`spec.hosts`), skipping wildcards.
    pub fn add_service_entry(&mut self, namespace: &str, name: &str, hosts: &[String]) {
        for h in hosts.iter().filter(|h| !h.contains('*')) {
            self.service_entries
                .entry(h.to_ascii_lowercase())
                .or_default()
                .push(format!("{namespace}/{name}"));
        }
    }

    /// Adds a DestinationRule's host; a short name is relative to the rule's namespace, as
    /// istiod reads it.
    pub fn add_destination_rule(&mut self, namespace: &str, name: &str, host: &str) {
        if host.contains('*') || host.is_empty() {
            return;
        }
        let host = if host.contains('.') {
            host.to_ascii_lowercase()
        } else {
            format!(
                "{}.{namespace}.svc.cluster.local",
                host.to_ascii_lowercase()
            )
        };
        self.destination_rules
            .entry(host)
            .or_default()
            .push(format!("{namespace}/{name}"));
    }
}

/// Something meshfed did not write, and why (shown in `meshfed status` and by `meshfed analyze`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// `shadowed` (a user object wins), `not-expressible` (a policy Istio cannot express),
    /// `skipped` (an endpoint or port Istio objects cannot carry), `invalid` (an object
    /// Istio's schema would refuse: not written).
    pub kind: String,
    /// `namespace/name` of the imported service.
    pub service: String,
    pub host: String,
    pub message: String,
}

/// What the cluster should hold.
#[derive(Debug, Default)]
pub struct Desired {
    pub service_entries: BTreeMap<(String, String), (Value, Value)>,
    pub workload_entries: BTreeMap<(String, String), (Value, Value)>,
    pub destination_rules: BTreeMap<(String, String), (Value, Value)>,
    pub findings: Vec<Finding>,
}

/// The inputs: the model's services, the names table and the cluster's own objects.
#[allow(missing_debug_implementations)]
pub struct Inputs<'a> {
    /// This cluster's network.
    pub network: &'a str,
    /// [`meshfed_model::snapshot::Snapshot::services`].
    pub services: &'a BTreeMap<String, Vec<Instance<'a>>>,
    /// Cluster id -> trust domain, for the peers' workload identities.
    pub trust_domains: &'a BTreeMap<String, String>,
    /// A service's meshfed VIPs.
    pub vips: &'a dyn Fn(&str, &str) -> Vec<IpAddr>,
    /// Services (`namespace`, `name`) that exist in this cluster: their `cluster.local` name is
    /// the local Service's.
    pub local_names: &'a BTreeSet<(String, String)>,
    pub user: &'a UserObjects,
    /// The policy in effect by host (`<svc>.<ns>.svc.cluster.local`).
    pub policies: &'a BTreeMap<String, Arc<Policy>>,
}

/// Istio's protocol for a port: the application protocol, else the name's prefix (Istio's
/// protocol selection), else TCP. `None` for UDP and SCTP, which a ServiceEntry port cannot
/// carry through an east-west gateway.
pub fn istio_protocol(p: &proto::Port) -> Option<&'static str> {
    if !p.protocol.is_empty() && !p.protocol.eq_ignore_ascii_case("TCP") {
        return None;
    }
    let by = |s: &str| -> Option<&'static str> {
        Some(match s.to_ascii_lowercase().as_str() {
            "grpc" => "GRPC",
            "grpc-web" => "GRPC-Web",
            "http" => "HTTP",
            "http2" | "h2c" | "kubernetes.io/h2c" => "HTTP2",
            "https" => "HTTPS",
            "tls" => "TLS",
            "mongo" => "Mongo",
            "redis" => "Redis",
            "mysql" => "MySQL",
            "tcp" => "TCP",
            _ => return None,
        })
    };
    by(&p.app_protocol)
        .or_else(|| by(p.name.split('-').next().unwrap_or("")))
        .or(Some("TCP"))
}

/// A short stable hash (FNV-1a, 32 bits, hex) for object names.
fn hash8(parts: &[&str]) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    format!("{h:08x}")
}

/// `host:port` (or `[v6]:port`) into an IP and a port; `None` for a host name.
fn gateway_addr(g: &str) -> Option<(IpAddr, u16)> {
    if let Ok(sa) = g.parse::<std::net::SocketAddr>() {
        return Some((sa.ip(), sa.port()));
    }
    g.parse::<IpAddr>()
        .ok()
        .map(|ip| (ip, DEFAULT_GATEWAY_PORT))
}

fn locality_str(l: &Option<proto::Locality>) -> String {
    match l {
        Some(l) if !l.region.is_empty() => [&l.region, &l.zone, &l.subzone]
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("/"),
        _ => String::new(),
    }
}

/// A duration in milliseconds as Istio's duration string (seconds, as protobuf's JSON form
/// and Go's both read it).
fn duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// The DestinationRule `spec` for a policy on `host`, or why Istio cannot express it.
pub fn destination_rule_spec(p: &Policy, host: &str) -> Result<Value, String> {
    if p.allow_without_health_signal && p.outlier.is_none() && p.enabled {
        return Err(
            "allowWithoutHealthSignal: istiod applies locality failover only with outlierDetection, \
             so a rule without it would not fail over as meshfed's table does"
                .into(),
        );
    }
    let mut lb = serde_json::Map::new();
    lb.insert("enabled".into(), json!(p.enabled));
    if !p.failover_priority.is_empty() {
        let fp: Vec<String> = p
            .failover_priority
            .iter()
            .map(|l| match &l.value {
                Some(v) => format!("{}={v}", l.key),
                None => l.key.clone(),
            })
            .collect();
        lb.insert("failoverPriority".into(), json!(fp));
    }
    if !p.failover.is_empty() {
        lb.insert(
            "failover".into(),
            json!(p
                .failover
                .iter()
                .map(|f| json!({"from": f.from, "to": f.to}))
                .collect::<Vec<_>>()),
        );
    }
    if !p.distribute.is_empty() {
        lb.insert(
            "distribute".into(),
            json!(p
                .distribute
                .iter()
                .map(|d| json!({"from": d.from,
                    "to": d.to.iter().map(|(k, w)| (k.clone(), json!(w))).collect::<serde_json::Map<_, _>>()}))
                .collect::<Vec<_>>()),
        );
    }
    let mut tp = json!({"loadBalancer": {"localityLbSetting": Value::Object(lb)}});
    if let Some(o) = &p.outlier {
        let mut od = serde_json::Map::new();
        if let Some(v) = o.consecutive_5xx_errors {
            od.insert("consecutive5xxErrors".into(), json!(v));
        }
        if let Some(v) = o.consecutive_gateway_errors {
            od.insert("consecutiveGatewayErrors".into(), json!(v));
        }
        if let Some(v) = o.interval_ms {
            od.insert("interval".into(), json!(duration(v)));
        }
        if let Some(v) = o.base_ejection_time_ms {
            od.insert("baseEjectionTime".into(), json!(duration(v)));
        }
        if let Some(v) = o.max_ejection_percent {
            od.insert("maxEjectionPercent".into(), json!(v));
        }
        tp["outlierDetection"] = Value::Object(od);
    }
    let mut spec = json!({"host": host, "trafficPolicy": tp});
    if !p.subsets.is_empty() {
        spec["subsets"] = json!(p
            .subsets
            .iter()
            .map(|s| json!({"name": s.name, "labels": s.labels}))
            .collect::<Vec<_>>());
    }
    Ok(spec)
}

fn labels_base(name: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert(MANAGED_BY_LABEL.into(), json!(MANAGED_BY));
    m.insert(IMPORTED_SERVICE_LABEL.into(), json!(name));
    m
}

/// An Istio networking object meshfed writes, with the second value (the object's status,
/// none) the writers expect.
fn istio_object(
    kind: &str,
    ns: &str,
    name: &str,
    labels: serde_json::Map<String, Value>,
    spec: Value,
) -> (Value, Value) {
    (
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": kind,
            "metadata": {"name": name, "namespace": ns, "labels": Value::Object(labels)},
            "spec": spec,
        }),
        Value::Null,
    )
}

/// The Istio objects for every imported service.
pub fn desired(inp: &Inputs) -> Desired {
    let mut out = Desired::default();
    for (key, insts) in inp.services {
        let remote: Vec<&Instance> = insts.iter().filter(|i| !i.local).collect();
        if remote.is_empty() {
            continue;
        }
        let Some((ns, name)) = key.split_once('/') else {
            continue;
        };
        let local_host = format!("{name}.{ns}.svc.cluster.local");
        let set_host = format!("{name}.{ns}.svc.clusterset.local");
        let exists_here = inp
            .local_names
            .contains(&(ns.to_string(), name.to_string()))
            || insts.iter().any(|i| i.local);
        let mut hosts = Vec::new();
        for h in [&local_host, &set_host] {
            if h == &local_host && exists_here {
                continue;
            }
            if let Some(users) = inp.user.service_entries.get(h.as_str()) {
                out.findings.push(Finding {
                    kind: "shadowed".into(),
                    service: key.clone(),
                    host: h.clone(),
                    message: format!(
                        "ServiceEntry {} names {h}: it wins, meshfed does not write the host",
                        users.join(", ")
                    ),
                });
                continue;
            }
            hosts.push(h.clone());
        }
        // Ports: the union of the exporters' (by name; a ServiceEntry's ports are keyed by name).
        let mut ports: BTreeMap<String, (u32, &'static str)> = BTreeMap::new();
        for i in &remote {
            for p in &i.export.ports {
                let Some(proto) = istio_protocol(p) else {
                    out.findings.push(Finding {
                        kind: "skipped".into(),
                        service: key.clone(),
                        host: set_host.clone(),
                        message: format!(
                            "port {} ({}) is not TCP: an east-west gateway carries TCP only",
                            p.port, p.protocol
                        ),
                    });
                    continue;
                };
                let pname = if p.name.is_empty() {
                    format!("tcp-{}", p.port)
                } else {
                    p.name.clone()
                };
                ports.entry(pname).or_insert((p.port, proto));
            }
        }
        if hosts.is_empty() || ports.is_empty() {
            continue;
        }
        let by_port: BTreeMap<u32, &str> =
            ports.iter().map(|(n, (p, _))| (*p, n.as_str())).collect();
        let mut sans: BTreeSet<String> = BTreeSet::new();
        let mut entries: BTreeMap<(String, String), (Value, Value)> = BTreeMap::new();
        for i in &remote {
            let td = inp
                .trust_domains
                .get(i.cluster)
                .map(|s| s.as_str())
                .unwrap_or("");
            let same_network = i.network.is_empty() || i.network == inp.network;
            // Endpoint groups: (locality, labels, service account) -> (endpoints, weight).
            let mut groups: BTreeMap<(String, BTreeMap<String, String>, String), u32> =
                BTreeMap::new();
            for e in i.export.endpoints.iter().filter(|e| e.healthy) {
                let sa = if e.service_account.is_empty() {
                    "default"
                } else {
                    &e.service_account
                };
                if !td.is_empty() {
                    sans.insert(format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
                }
                let loc = locality_str(&e.locality);
                let mut labels: BTreeMap<String, String> = e
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                labels.insert(TLS_MODE_LABEL.into(), "istio".into());
                if same_network {
                    let Ok(ip) = e.address.parse::<IpAddr>() else {
                        out.findings.push(Finding {
                            kind: "skipped".into(),
                            service: key.clone(),
                            host: set_host.clone(),
                            message: format!(
                                "endpoint {} of cluster {} is not an IP address",
                                e.address, i.cluster
                            ),
                        });
                        continue;
                    };
                    let mut wports = serde_json::Map::new();
                    for (pnum, pname) in &by_port {
                        let sp = i.export.ports.iter().find(|p| p.port == *pnum);
                        if let Some(sp) = sp {
                            let t = e.ports.get(&sp.name).copied().unwrap_or(*pnum);
                            if t != *pnum {
                                wports.insert((*pname).to_string(), json!(t));
                            }
                        }
                    }
                    let wname = format!(
                        "meshfed-{name}-{}-{}",
                        i.cluster,
                        hash8(&[&ip.to_string(), i.cluster])
                    );
                    entries.insert(
                        (ns.to_string(), wname.clone()),
                        workload_entry(
                            ns,
                            &wname,
                            name,
                            i.cluster,
                            &ip.to_string(),
                            Value::Object(wports),
                            &labels,
                            i.network,
                            &loc,
                            e.weight.max(1),
                            sa,
                        ),
                    );
                } else {
                    *groups.entry((loc, labels, sa.to_string())).or_default() += e.weight.max(1);
                }
            }
            if groups.is_empty() {
                continue;
            }
            let gws: Vec<(IpAddr, u16)> =
                i.gateways.iter().filter_map(|g| gateway_addr(g)).collect();
            if gws.is_empty() {
                out.findings.push(Finding {
                    kind: "skipped".into(),
                    service: key.clone(),
                    host: set_host.clone(),
                    message: format!(
                        "cluster {} is on network {} with no east-west gateway given as an IP address ({})",
                        i.cluster,
                        i.network,
                        if i.gateways.is_empty() { "none".to_string() } else { i.gateways.join(", ") }
                    ),
                });
                continue;
            }
            for ((loc, labels, sa), weight) in groups {
                for (gip, gport) in &gws {
                    let wports: serde_json::Map<String, Value> =
                        ports.keys().map(|n| (n.clone(), json!(gport))).collect();
                    let lab: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let wname = format!(
                        "meshfed-{name}-{}-{}",
                        i.cluster,
                        hash8(&[&gip.to_string(), &loc, &lab.join(","), &sa, i.cluster])
                    );
                    // Split across the network's gateways as istiod splits weights.
                    let w = (weight / gws.len() as u32).max(1);
                    entries.insert(
                        (ns.to_string(), wname.clone()),
                        workload_entry(
                            ns,
                            &wname,
                            name,
                            i.cluster,
                            &gip.to_string(),
                            Value::Object(wports),
                            &labels,
                            i.network,
                            &loc,
                            w,
                            &sa,
                        ),
                    );
                }
            }
        }
        let mut se_ports: Vec<Value> = ports
            .iter()
            .map(|(n, (p, proto))| json!({"name": n, "number": p, "protocol": proto}))
            .collect();
        se_ports.sort_by_key(|p| p["number"].as_u64());
        let mut spec = json!({
            "hosts": hosts,
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": se_ports,
            "workloadSelector": {"labels": {IMPORTED_SERVICE_LABEL: name}},
        });
        let vips: Vec<String> = (inp.vips)(ns, name)
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        if !vips.is_empty() {
            spec["addresses"] = json!(vips);
        }
        if !sans.is_empty() {
            spec["subjectAltNames"] = json!(sans);
        }
        let se_name = format!("meshfed-{name}");
        out.service_entries.insert(
            (ns.to_string(), se_name.clone()),
            istio_object("ServiceEntry", ns, &se_name, labels_base(name), spec),
        );
        out.workload_entries.extend(entries);
        // The policy in effect, for each host sidecars may call.
        if let Some(p) = inp.policies.get(&local_host) {
            for h in [&local_host, &set_host] {
                if h == &local_host && !exists_here && !hosts.contains(h) {
                    continue;
                }
                if h == &set_host && !hosts.contains(h) {
                    continue;
                }
                if let Some(users) = inp.user.destination_rules.get(h.as_str()) {
                    out.findings.push(Finding {
                        kind: "shadowed".into(),
                        service: key.clone(),
                        host: h.clone(),
                        message: format!(
                            "DestinationRule {} is for {h}: it wins over meshfed's policy ({})",
                            users.join(", "),
                            p.origin
                        ),
                    });
                    continue;
                }
                match destination_rule_spec(p, h) {
                    Ok(spec) => {
                        let dr = if h == &local_host {
                            format!("meshfed-{name}")
                        } else {
                            format!("meshfed-{name}-clusterset")
                        };
                        out.destination_rules.insert(
                            (ns.to_string(), dr.clone()),
                            istio_object("DestinationRule", ns, &dr, labels_base(name), spec),
                        );
                    }
                    Err(why) => out.findings.push(Finding {
                        kind: "not-expressible".into(),
                        service: key.clone(),
                        host: h.clone(),
                        message: format!(
                            "policy {} not written as a DestinationRule: {why}",
                            p.origin
                        ),
                    }),
                }
            }
        }
    }
    // Nothing is written that Istio's schema refuses: such an object is reported instead.
    for map in [
        &mut out.service_entries,
        &mut out.workload_entries,
        &mut out.destination_rules,
    ] {
        map.retain(
            |(ns, name), (obj, _)| match crate::istio_schema::check(obj) {
                Ok(()) => true,
                Err(e) => {
                    let service = obj["metadata"]["labels"][IMPORTED_SERVICE_LABEL]
                        .as_str()
                        .unwrap_or(name);
                    out.findings.push(Finding {
                        kind: "invalid".into(),
                        service: format!("{ns}/{service}"),
                        host: String::new(),
                        message: format!("{ns}/{name} not written: {e}"),
                    });
                    false
                }
            },
        );
    }
    out.findings.sort();
    out.findings.dedup();
    out
}

#[allow(clippy::too_many_arguments)]
fn workload_entry(
    ns: &str,
    wname: &str,
    service: &str,
    cluster: &str,
    address: &str,
    ports: Value,
    labels: &BTreeMap<String, String>,
    network: &str,
    locality: &str,
    weight: u32,
    sa: &str,
) -> (Value, Value) {
    let mut meta = labels_base(service);
    meta.insert(IMPORTED_FROM_LABEL.into(), json!(cluster));
    let mut spec_labels: serde_json::Map<String, Value> =
        labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    spec_labels.insert(IMPORTED_SERVICE_LABEL.into(), json!(service));
    let mut spec = json!({
        "address": address,
        "labels": Value::Object(spec_labels),
        "weight": weight,
        "serviceAccount": sa,
    });
    if ports.as_object().is_some_and(|m| !m.is_empty()) {
        spec["ports"] = ports;
    }
    if !network.is_empty() {
        spec["network"] = json!(network);
    }
    if !locality.is_empty() {
        spec["locality"] = json!(locality);
    }
    istio_object("WorkloadEntry", ns, wname, meta, spec)
}

/// The mesh config meshfed owns (`data.mesh` of its ConfigMap, merged by istiod under its own
/// through `SHARED_MESH_CONFIG`): one `caCertificates` entry per peer trust domain with its
/// roots' PEM and `trustDomains: [<td>]`, and the peers' trust domains as `trustDomainAliases`
/// (istiod checks an imported endpoint's identity in its own trust domain and in its aliases).
/// A bundle that does not parse is left out and named in the error list: istiod refuses the
/// whole update when one certificate is bad.
pub fn mesh_config(
    own_trust_domain: &str,
    bundles: &BTreeMap<String, String>,
) -> (String, Vec<String>) {
    let mut errors = Vec::new();
    let mut certs = Vec::new();
    let mut aliases = Vec::new();
    for (td, text) in bundles {
        if td == own_trust_domain {
            continue;
        }
        let parsed = trust::TrustDomain::new(td)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                trust::bundle::TrustBundle::from_json(t, text, &format!("bundle of {td}"))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(b) if !b.x509_authorities.is_empty() => {
                certs.push(json!({
                    "pem": trust::keys::certs_to_pem(b.x509_authorities.iter()),
                    "trustDomains": [td],
                }));
                aliases.push(td.clone());
            }
            Ok(_) => errors.push(format!("bundle of {td}: no X.509 authority")),
            Err(e) => errors.push(e),
        }
    }
    let v = json!({"caCertificates": certs, "trustDomainAliases": aliases});
    // JSON is YAML: istiod's mesh config reader takes it as is.
    (serde_json::to_string_pretty(&v).unwrap_or_default(), errors)
}

/// Writes meshfed's mesh config ConfigMap `namespace/name` (`data.mesh`), with server-side
/// apply. A ConfigMap of that name meshfed did not create is never changed: the error names it.
pub async fn write_mesh_config(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    mesh: &str,
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), namespace);
    if let Some(cm) = api.get_opt(name).await? {
        let ours = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY);
        if !ours {
            anyhow::bail!(
                "ConfigMap {namespace}/{name} exists and was not written by meshfed (no {MANAGED_BY_LABEL}: {MANAGED_BY} label): meshfed does not change it; name another with --istio-mesh-config"
            );
        }
    }
    let obj = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "data": {"mesh": mesh},
    });
    api.patch(
        name,
        &kube::api::PatchParams::apply(crate::types::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_model::snapshot::Snapshot;
    use proto::{ClusterFacts, Endpoint, LeaseState, Locality, PeerCluster, Port, ServiceExport};

    fn ep(addr: &str, zone: &str, version: &str, sa: &str) -> Endpoint {
        Endpoint {
            address: addr.into(),
            locality: Some(Locality {
                region: "us-west1".into(),
                zone: zone.into(),
                subzone: String::new(),
            }),
            labels: [
                ("app".to_string(), "ledger".to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into_iter()
            .collect(),
            weight: 1,
            healthy: true,
            service_account: sa.into(),
            ..Default::default()
        }
    }

    fn export(name: &str, endpoints: Vec<Endpoint>) -> Arc<ServiceExport> {
        Arc::new(ServiceExport {
            namespace: "shop".into(),
            name: name.into(),
            ports: vec![Port {
                name: "grpc".into(),
                port: 9090,
                protocol: "TCP".into(),
                app_protocol: "grpc".into(),
            }],
            endpoints,
            ..Default::default()
        })
    }

    fn peer(id: &str, network: &str, td: &str, gateways: &[&str]) -> PeerCluster {
        PeerCluster {
            facts: Some(ClusterFacts {
                cluster_id: id.into(),
                network: network.into(),
                trust_domain: td.into(),
                gateways: gateways.iter().map(|g| g.to_string()).collect(),
                ..Default::default()
            }),
            lease: LeaseState::Fresh as i32,
            ..Default::default()
        }
    }

    /// east imports `ledger` from west (another network: through west's gateway) and `audit`
    /// from eu (east's own network: the workloads themselves).
    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        s.facts.cluster_id = "east".into();
        s.facts.network = "net-east".into();
        s.facts.trust_domain = "east.mesh".into();
        s.peers.insert(
            "west".into(),
            peer("west", "net-west", "west.mesh", &["192.0.2.7:15443"]),
        );
        s.peers
            .insert("eu".into(), peer("eu", "net-east", "eu.mesh", &[]));
        s.imports.insert(
            ("west".into(), "shop/ledger".into()),
            export(
                "ledger",
                vec![
                    ep("10.1.0.1", "us-west1-a", "v1", "ledger"),
                    ep("10.1.0.2", "us-west1-a", "v1", "ledger"),
                    ep("10.1.0.3", "us-west1-b", "v2", "ledger"),
                ],
            ),
        );
        s.imports.insert(
            ("eu".into(), "shop/audit".into()),
            export("audit", vec![ep("10.2.0.1", "us-west1-a", "v1", "")]),
        );
        s
    }

    fn tds() -> BTreeMap<String, String> {
        [("west", "west.mesh"), ("eu", "eu.mesh")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn run(
        snap: &Snapshot,
        local: &BTreeSet<(String, String)>,
        user: &UserObjects,
        policies: &BTreeMap<String, Arc<Policy>>,
    ) -> Desired {
        let services = snap.services();
        let vips = |_: &str, name: &str| -> Vec<IpAddr> {
            if name == "ledger" {
                vec!["240.240.0.5".parse().unwrap()]
            } else {
                Vec::new()
            }
        };
        desired(&Inputs {
            network: "net-east",
            services: &services,
            trust_domains: &tds(),
            vips: &vips,
            local_names: local,
            user,
            policies,
        })
    }

    /// The ServiceEntry for a remote-only service, compared with the shape of istio.io's
    /// "MESH_INTERNAL with workloadSelector" example (details-svc), and its WorkloadEntries:
    /// per locality and labels through west's gateway, each endpoint of eu's on east's network.
    #[test]
    fn imports_become_service_entries_and_workload_entries() {
        let d = run(
            &snapshot(),
            &BTreeSet::new(),
            &UserObjects::default(),
            &BTreeMap::new(),
        );
        assert!(d.findings.is_empty(), "{:?}", d.findings);
        let (se, _) = &d.service_entries[&("shop".to_string(), "meshfed-ledger".to_string())];
        assert_eq!(
            se,
            &json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": "meshfed-ledger", "namespace": "shop",
                             "labels": {"app.kubernetes.io/managed-by": "meshfed",
                                        "meshfed.io/imported-service": "ledger"}},
                "spec": {
                    "hosts": ["ledger.shop.svc.cluster.local", "ledger.shop.svc.clusterset.local"],
                    "addresses": ["240.240.0.5"],
                    "location": "MESH_INTERNAL",
                    "resolution": "STATIC",
                    "ports": [{"name": "grpc", "number": 9090, "protocol": "GRPC"}],
                    "workloadSelector": {"labels": {"meshfed.io/imported-service": "ledger"}},
                    "subjectAltNames": ["spiffe://west.mesh/ns/shop/sa/ledger"],
                }
            })
        );
        let ledger: Vec<&Value> = d
            .workload_entries
            .values()
            .map(|(o, _)| o)
            .filter(|o| o["metadata"]["labels"]["meshfed.io/imported-service"] == "ledger")
            .collect();
        // Two groups (us-west1-a v1 with weight 2, us-west1-b v2), both at west's gateway.
        assert_eq!(ledger.len(), 2);
        for we in &ledger {
            let s = &we["spec"];
            assert_eq!(s["address"], "192.0.2.7");
            assert_eq!(s["ports"], json!({"grpc": 15443}));
            assert_eq!(s["network"], "net-west");
            assert_eq!(s["serviceAccount"], "ledger");
            assert_eq!(s["labels"]["security.istio.io/tlsMode"], "istio");
            assert_eq!(s["labels"]["meshfed.io/imported-service"], "ledger");
            assert_eq!(we["metadata"]["labels"]["meshfed.io/imported-from"], "west");
            let want = if s["labels"]["version"] == "v1" {
                (json!("us-west1/us-west1-a"), json!(2))
            } else {
                (json!("us-west1/us-west1-b"), json!(1))
            };
            assert_eq!((s["locality"].clone(), s["weight"].clone()), want);
        }
        let audit: Vec<&Value> = d
            .workload_entries
            .values()
            .map(|(o, _)| o)
            .filter(|o| o["metadata"]["labels"]["meshfed.io/imported-service"] == "audit")
            .collect();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0]["spec"]["address"], "10.2.0.1");
        assert_eq!(audit[0]["spec"]["network"], "net-east");
        assert_eq!(audit[0]["spec"]["serviceAccount"], "default");
        assert!(audit[0]["spec"].get("ports").is_none());
        // Without a VIP there is no address (istiod may allocate one).
        let (se, _) = &d.service_entries[&("shop".to_string(), "meshfed-audit".to_string())];
        assert!(se["spec"].get("addresses").is_none());
        assert!(d.destination_rules.is_empty());
    }

    #[test]
    fn a_local_service_keeps_its_name_and_user_objects_win() {
        let local: BTreeSet<(String, String)> = [("shop".to_string(), "ledger".to_string())].into();
        let mut user = UserObjects::default();
        user.add_service_entry("shop", "mine", &["audit.shop.svc.clusterset.local".into()]);
        user.add_destination_rule("shop", "mine", "ledger");
        let p = meshfed_model::policy::PolicySet::from_sources(&[(
            "p.yaml".into(),
            "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: ledger, namespace: shop}\nspec:\n  host: ledger\n  failover: [{from: us-east1, to: us-west1}]\n  outlierDetection: {consecutive5xxErrors: 3, interval: 500ms, baseEjectionTime: 30s}\n  subsets:\n    - {name: v2, labels: {version: v2}}\n".into(),
        )])
        .unwrap();
        let policies: BTreeMap<String, Arc<Policy>> = p
            .by_host
            .iter()
            .map(|(h, p)| (h.clone(), Arc::new(p.clone())))
            .collect();
        let d = run(&snapshot(), &local, &user, &policies);
        let (se, _) = &d.service_entries[&("shop".to_string(), "meshfed-ledger".to_string())];
        assert_eq!(
            se["spec"]["hosts"],
            json!(["ledger.shop.svc.clusterset.local"])
        );
        // audit's clusterset name is the user's; its cluster.local name is still written.
        let (se, _) = &d.service_entries[&("shop".to_string(), "meshfed-audit".to_string())];
        assert_eq!(se["spec"]["hosts"], json!(["audit.shop.svc.cluster.local"]));
        // The user's rule for ledger's local name wins; the clusterset name gets meshfed's.
        assert!(!d
            .destination_rules
            .contains_key(&("shop".to_string(), "meshfed-ledger".to_string())));
        let (dr, _) =
            &d.destination_rules[&("shop".to_string(), "meshfed-ledger-clusterset".to_string())];
        assert_eq!(
            dr["spec"],
            json!({"host": "ledger.shop.svc.clusterset.local",
                   "trafficPolicy": {
                       "loadBalancer": {"localityLbSetting": {"enabled": true,
                           "failover": [{"from": "us-east1", "to": "us-west1"}]}},
                       "outlierDetection": {"consecutive5xxErrors": 3, "interval": "0.500s",
                                            "baseEjectionTime": "30s"}},
                   "subsets": [{"name": "v2", "labels": {"version": "v2"}}]})
        );
        let kinds: Vec<(&str, &str)> = d
            .findings
            .iter()
            .map(|f| (f.kind.as_str(), f.host.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("shadowed", "audit.shop.svc.clusterset.local"),
                ("shadowed", "ledger.shop.svc.cluster.local"),
            ]
        );
        assert!(d.findings[0].message.contains("shop/mine"));
    }

    #[test]
    fn what_istio_cannot_express_is_named_not_written() {
        let p = meshfed_model::policy::PolicySet::from_sources(&[(
            "p.yaml".into(),
            "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: ledger, namespace: shop}\nspec:\n  host: ledger\n  failover: [{from: us-east1, to: us-west1}]\n  allowWithoutHealthSignal: true\n".into(),
        )])
        .unwrap();
        let policies: BTreeMap<String, Arc<Policy>> = p
            .by_host
            .iter()
            .map(|(h, p)| (h.clone(), Arc::new(p.clone())))
            .collect();
        let d = run(
            &snapshot(),
            &BTreeSet::new(),
            &UserObjects::default(),
            &policies,
        );
        assert!(d.destination_rules.is_empty());
        assert_eq!(d.findings.len(), 2, "{:?}", d.findings);
        assert!(
            d.findings
                .iter()
                .all(|f| f.kind == "not-expressible"
                    && f.message.contains("allowWithoutHealthSignal"))
        );
        // A gateway given by name cannot be a STATIC WorkloadEntry's address: named.
        let mut s = snapshot();
        s.peers.insert(
            "west".into(),
            peer("west", "net-west", "west.mesh", &["gw.west.example:15443"]),
        );
        let d = run(
            &s,
            &BTreeSet::new(),
            &UserObjects::default(),
            &BTreeMap::new(),
        );
        assert!(d
            .findings
            .iter()
            .any(|f| f.kind == "skipped" && f.message.contains("gw.west.example")));
        assert!(!d
            .workload_entries
            .values()
            .any(|(o, _)| o["metadata"]["labels"]["meshfed.io/imported-from"] == "west"));
    }

    #[test]
    fn the_mesh_config_carries_each_peer_root_and_names_bad_bundles() {
        let ca = trust::CertificateAuthority::create(
            trust::TrustDomain::new("west.mesh").unwrap(),
            trust::CaOptions::default(),
        )
        .unwrap();
        let bundle = ca.bundle().to_json().unwrap();
        let bundles: BTreeMap<String, String> = [
            ("west.mesh".to_string(), bundle.clone()),
            ("east.mesh".to_string(), bundle),
            ("eu.mesh".to_string(), "{\"keys\": 5}".to_string()),
        ]
        .into();
        let (mesh, errors) = mesh_config("east.mesh", &bundles);
        let v: Value = serde_json::from_str(&mesh).unwrap();
        assert_eq!(v["trustDomainAliases"], json!(["west.mesh"]));
        assert_eq!(v["caCertificates"][0]["trustDomains"], json!(["west.mesh"]));
        let pem = v["caCertificates"][0]["pem"].as_str().unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(v["caCertificates"].as_array().unwrap().len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("eu.mesh"), "{errors:?}");
    }
}
