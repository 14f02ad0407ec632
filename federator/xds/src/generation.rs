//! One generation of xDS state: every resource computed once from the model snapshot and the
//! policies, shared by all proxies. EDS tables depend on the asking proxy; they are computed
//! lazily, once per (cluster, proxy class), so cost grows with distinct classes, not proxies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use proto::OnExpiry;

use super::node::{LocalFacts, NodeKind, ProxyNode};
use super::resources::{self, Res, SharedRes, TlsForm};
use super::Kind;
use meshfed_failover::{self as table, EndpointIn, Loc, ProxyIn, Table};
use meshfed_model::policy::routes::Routes;
use meshfed_model::policy::{OnExpiryPolicy, Policy, PolicySet};
use meshfed_model::snapshot::Snapshot;

/// The label that turns mTLS on for a service (on the service or on every endpoint), as in Istio.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// What EDS needs for one service port.
#[derive(Debug, PartialEq)]
pub struct ServicePort {
    pub host: String,
    pub port: u32,
    pub cluster: Arc<str>,
    pub policy: Option<Arc<Policy>>,
    pub endpoints: Vec<EndpointIn>,
}

type Slot = Arc<OnceLock<(SharedRes, Arc<Table>)>>;

/// What one service's resources are built from: when a new generation finds the same inputs
/// as its predecessor, it takes the service's resources over instead of building them again.
#[derive(Debug, PartialEq)]
struct HostInputs {
    policy: Option<Arc<Policy>>,
    routes: Option<Arc<Routes>>,
    exported_here: bool,
    instances: Vec<InstanceIn>,
}

#[derive(Debug, PartialEq)]
struct InstanceIn {
    cluster: String,
    local: bool,
    network: String,
    gateways: Vec<String>,
    fresh: bool,
    trust_domain: String,
    /// Shared with the snapshot: an unchanged service compares by pointer.
    export: Arc<proto::ServiceExport>,
}

type Named = Vec<(Arc<str>, SharedRes)>;

/// One service's resources, with what they were built from.
#[derive(Debug)]
struct HostPart {
    inputs: HostInputs,
    listeners: Named,
    routes: Named,
    grpc: Named,
    envoy: Named,
    router: Named,
    ports: Vec<(Arc<str>, Arc<ServicePort>)>,
}

#[derive(Debug, Default)]
pub struct Generation {
    pub version: u64,
    pub local: LocalFacts,
    pub listeners: BTreeMap<Arc<str>, SharedRes>,
    pub routes: BTreeMap<Arc<str>, SharedRes>,
    pub clusters_grpc: BTreeMap<Arc<str>, SharedRes>,
    pub clusters_envoy: BTreeMap<Arc<str>, SharedRes>,
    /// What east-west gateways (`router~` nodes) are sent: the clusters of the services this
    /// cluster exports, and nothing else, so a gateway cannot route to a service that is not.
    pub clusters_router: BTreeMap<Arc<str>, SharedRes>,
    pub ports: HashMap<Arc<str>, Arc<ServicePort>>,
    /// Network -> its east-west gateways (`ip:port`).
    pub gateways: BTreeMap<String, Vec<String>>,
    /// The policies in effect, by host.
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// What the policies in effect name that the endpoints do not have (for `meshfed analyze`).
    pub policy_findings: Vec<PolicyFinding>,
    eds_cache: Mutex<HashMap<(Arc<str>, u64), Slot>>,
    /// Each service's resources and inputs, by `ns/name` (for the next generation to reuse).
    hosts: HashMap<String, Arc<HostPart>>,
    /// How many services' resources were taken over from the previous generation.
    pub hosts_reused: usize,
    /// How many EDS tables were computed (not served from the class cache).
    pub eds_computed: AtomicU64,
}

/// Something a policy in effect names that this cluster's view of the service lacks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct PolicyFinding {
    pub host: String,
    /// Where the policy came from (`file:line:column` or `published by cluster <id>`).
    pub origin: String,
    /// `empty-subset` (no endpoint carries its labels), `empty-locality` (no endpoint in a
    /// locality it sends traffic to), `subset-without-route` (an exporter on another network
    /// publishes no policy defining the subset, so its gateway may not route the subset's SNI),
    /// `route-unknown-subset` / `route-unknown-port` (a VirtualService sends calls to a subset
    /// no policy defines, or to a port the service lacks: those calls fail).
    pub kind: String,
    pub message: String,
}

/// What a VirtualService sends calls to that does not exist: a subset no policy in effect
/// defines, a port the service does not have (each such call fails at the client).
fn check_routes(
    routes: &Routes,
    policy: Option<&Policy>,
    instances: &[meshfed_model::snapshot::Instance],
) -> Vec<PolicyFinding> {
    let mut out = Vec::new();
    let f = |kind: &str, message: String| PolicyFinding {
        host: routes.host.clone(),
        origin: routes.origin.clone(),
        kind: kind.to_string(),
        message,
    };
    for s in routes.subsets() {
        if !policy.is_some_and(|p| p.subsets.iter().any(|d| d.name == s)) {
            out.push(f(
                "route-unknown-subset",
                format!(
                    "VirtualService {}/{} routes to subset {s}, which {}: calls taking that route fail",
                    routes.namespace,
                    routes.name,
                    match policy {
                        Some(p) => format!("the policy in effect ({}) does not define", p.origin),
                        None => "no policy in effect defines".to_string(),
                    }
                ),
            ));
        }
    }
    let ports: BTreeSet<u32> = instances
        .iter()
        .flat_map(|i| i.export.ports.iter().map(|p| p.port))
        .collect();
    let mut named: BTreeSet<u32> = BTreeSet::new();
    for r in &routes.http {
        named.extend(r.to.iter().filter_map(|d| d.port));
        named.extend(r.matches.iter().filter_map(|m| m.port));
    }
    for p in named.difference(&ports) {
        out.push(f(
            "route-unknown-port",
            format!(
                "VirtualService {}/{} names port {p}, which {} does not have",
                routes.namespace, routes.name, routes.host
            ),
        ));
    }
    out
}

/// What `policy` names that `instances` lack.
fn check_policy(
    host: &str,
    policy: &Policy,
    own_network: &str,
    instances: &[meshfed_model::snapshot::Instance],
) -> Vec<PolicyFinding> {
    let mut out = Vec::new();
    let f = |kind: &str, message: String| PolicyFinding {
        host: host.to_string(),
        origin: policy.origin.clone(),
        kind: kind.to_string(),
        message,
    };
    let endpoints = || instances.iter().flat_map(|i| i.export.endpoints.iter());
    for sub in &policy.subsets {
        if !endpoints().any(|e| sub.selects(|k| e.labels.get(k).map(String::as_str))) {
            out.push(f(
                "empty-subset",
                format!(
                    "subset {} ({}) selects no endpoint in any cluster",
                    sub.name,
                    sub.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ));
        }
        for i in instances
            .iter()
            .filter(|i| !i.local && !i.network.is_empty() && i.network != own_network)
        {
            let published = meshfed_model::validate::check_published_policy(i.export, "")
                .ok()
                .filter(|_| !i.export.failover_policy.is_empty());
            if !published.is_some_and(|p| p.subsets.iter().any(|s| s.name == sub.name)) {
                out.push(f(
                    "subset-without-route",
                    format!(
                        "subset {} is reached through cluster {}'s gateway (network {}), but {} publishes no policy defining it: its gateway routes outbound_.<port>_.{}_.{host} only if its own policy does",
                        sub.name, i.cluster, i.network, i.cluster, sub.name
                    ),
                ));
            }
        }
    }
    let locs: Vec<Loc> = endpoints()
        .map(|e| {
            let l = e.locality.clone().unwrap_or_default();
            Loc::new(&l.region, &l.zone, &l.subzone)
        })
        .collect();
    if policy.enabled {
        for fo in &policy.failover {
            if !locs.iter().any(|l| l.matches(&fo.to)) {
                out.push(f(
                    "empty-locality",
                    format!(
                        "failover from {} to {}: no endpoint is in {}",
                        fo.from, fo.to, fo.to
                    ),
                ));
            }
        }
        for d in &policy.distribute {
            for (pat, w) in &d.to {
                if !locs.iter().any(|l| l.matches(pat)) {
                    out.push(f(
                        "empty-locality",
                        format!(
                            "distribute from {} sends {w}% to {pat}, where no endpoint is",
                            d.from
                        ),
                    ));
                }
            }
        }
    }
    out
}

fn host_of(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.cluster.local")
}

fn addr(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The policy published with the service by its exporters: the local cluster's first, then the
/// lowest cluster id's. An invalid one is ignored (the federator refuses them at export time).
pub fn published_policy(instances: &[meshfed_model::snapshot::Instance]) -> Option<Policy> {
    let mut sorted: Vec<&meshfed_model::snapshot::Instance> = instances.iter().collect();
    sorted.sort_by(|a, b| b.local.cmp(&a.local).then(a.cluster.cmp(b.cluster)));
    sorted
        .into_iter()
        .filter(|i| !i.export.failover_policy.is_empty())
        .find_map(|i| {
            match meshfed_model::validate::check_published_policy(i.export, &format!("policy published by cluster {}", i.cluster)) {
                Ok(mut p) => {
                    p.origin = format!("published by cluster {}", i.cluster);
                    Some(p)
                }
                Err(e) => {
                    tracing::warn!(cluster = %i.cluster, error = %e, "ignoring an invalid published policy");
                    None
                }
            }
        })
}

impl Generation {
    pub fn empty(local: &LocalFacts) -> Generation {
        Generation {
            local: local.clone(),
            ..Default::default()
        }
    }

    pub fn build(
        version: u64,
        snap: &Snapshot,
        policies: &PolicySet,
        local: &LocalFacts,
    ) -> Generation {
        Generation::build_after(None, version, snap, policies, local)
    }

    /// Builds a generation; the resources of a service whose inputs (its instances, their
    /// places and trust domains, its policy, whether it is exported here) are those of `prev`
    /// are taken over from `prev`, not built again.
    pub fn build_after(
        prev: Option<&Generation>,
        version: u64,
        snap: &Snapshot,
        policies: &PolicySet,
        local: &LocalFacts,
    ) -> Generation {
        // Resources depend on the cluster's own facts too: none are taken over if they changed.
        let prev = prev.filter(|p| p.local == *local);
        let mut g = Generation {
            version,
            local: local.clone(),
            ..Default::default()
        };
        let mut tds: BTreeMap<&str, &str> = BTreeMap::new();
        tds.insert(&local.cluster, &local.trust_domain);
        for (id, p) in &snap.peers {
            if let Some(f) = &p.facts {
                tds.insert(id, &f.trust_domain);
            }
        }
        for (key, instances) in snap.instances() {
            let Some(first) = instances.first() else {
                continue;
            };
            let exported_here = snap.exported.contains(&key) && instances.iter().any(|i| i.local);
            let (ns, name) = (first.export.namespace.clone(), first.export.name.clone());
            let host = host_of(&ns, &name);
            let policy = policies
                .by_host
                .get(&host)
                .cloned()
                .or_else(|| published_policy(&instances))
                .map(Arc::new);
            if let Some(p) = &policy {
                g.policies.insert(host.clone(), p.clone());
                g.policy_findings
                    .extend(check_policy(&host, p, &local.network, &instances));
            }
            let routes = policies.routes_by_host.get(&host).cloned().map(Arc::new);
            if let Some(r) = &routes {
                g.policy_findings
                    .extend(check_routes(r, policy.as_deref(), &instances));
            }
            for i in &instances {
                if !i.gateways.is_empty() && !i.network.is_empty() {
                    g.gateways
                        .entry(i.network.to_string())
                        .or_insert_with(|| i.gateways.to_vec());
                }
            }
            let inputs = HostInputs {
                policy: policy.clone(),
                routes: routes.clone(),
                exported_here,
                instances: instances
                    .iter()
                    .map(|i| InstanceIn {
                        cluster: i.cluster.to_string(),
                        local: i.local,
                        network: i.network.to_string(),
                        gateways: i.gateways.to_vec(),
                        fresh: i.fresh,
                        trust_domain: tds.get(i.cluster).copied().unwrap_or("").to_string(),
                        export: i.export.clone(),
                    })
                    .collect(),
            };
            if let Some(part) = prev
                .and_then(|p| p.hosts.get(&key))
                .filter(|p| p.inputs == inputs)
            {
                g.take_over(part);
                g.hosts.insert(key, part.clone());
                g.hosts_reused += 1;
                continue;
            }
            let mut part = HostPart {
                inputs,
                listeners: Vec::new(),
                routes: Vec::new(),
                grpc: Vec::new(),
                envoy: Vec::new(),
                router: Vec::new(),
                ports: Vec::new(),
            };
            let mut ports: BTreeSet<u32> = BTreeSet::new();
            let mut sans: BTreeSet<String> = BTreeSet::new();
            let mut all_tls = true;
            let mut any_ep = false;
            let mut service_tls = false;
            for i in &instances {
                ports.extend(i.export.ports.iter().map(|p| p.port));
                service_tls |= i
                    .export
                    .labels
                    .get(TLS_MODE_LABEL)
                    .is_some_and(|v| v == "istio");
                let td = tds.get(i.cluster).copied().unwrap_or("");
                for e in &i.export.endpoints {
                    any_ep = true;
                    all_tls &= e.labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio");
                    if !td.is_empty() {
                        let sa = if e.service_account.is_empty() {
                            "default"
                        } else {
                            &e.service_account
                        };
                        sans.insert(format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
                    }
                }
            }
            let mtls = service_tls || (any_ep && all_tls);
            let sans: Vec<String> = if mtls {
                sans.into_iter().collect()
            } else {
                Vec::new()
            };
            for port in ports {
                let cname: Arc<str> = resources::cluster_name(&host, port, "").into();
                let lname = resources::listener_name(&host, port);
                let mut eps = Vec::new();
                for i in &instances {
                    let Some(sp) = i.export.ports.iter().find(|p| p.port == port) else {
                        continue;
                    };
                    let withdraw = match policy.as_ref().and_then(|p| p.on_expiry) {
                        Some(OnExpiryPolicy::Withdraw) => true,
                        Some(OnExpiryPolicy::Deprioritize) => false,
                        None => i.export.on_expiry == OnExpiry::Withdraw as i32,
                    };
                    if !i.fresh && withdraw {
                        continue;
                    }
                    for e in &i.export.endpoints {
                        let l = e.locality.clone().unwrap_or_default();
                        // A workload may listen elsewhere for a named port (WorkloadEntry
                        // `ports`); a cross-network endpoint is replaced by its network's
                        // gateway later, which resolves the target port in its own cluster.
                        let target = e
                            .ports
                            .get(&sp.name)
                            .copied()
                            .filter(|p| (1..=65535).contains(p))
                            .unwrap_or(port);
                        eps.push(EndpointIn {
                            address: addr(&e.address, target),
                            locality: Loc::new(&l.region, &l.zone, &l.subzone),
                            labels: e.labels.clone().into_iter().collect(),
                            weight: e.weight.max(1),
                            cluster: i.cluster.to_string(),
                            network: i.network.to_string(),
                            healthy: e.healthy,
                            stale: !i.fresh,
                        });
                    }
                }
                eps.sort_by(|a, b| a.address.cmp(&b.address).then(a.cluster.cmp(&b.cluster)));
                let lkey: Arc<str> = lname.clone().into();
                part.listeners.push((
                    lkey.clone(),
                    Res::new(&lname, &resources::listener(&host, port)),
                ));
                part.routes.push((
                    lkey,
                    Res::new(
                        &lname,
                        &resources::route_configuration(&host, port, routes.as_deref()),
                    ),
                ));
                let pol = policy.as_deref();
                // The service's cluster, then one per subset of its policy (Istio's
                // `outbound|<port>|<subset>|<host>`): the subset's endpoints only, the same
                // policy, and the subset in the SNI so a gateway routes to those endpoints.
                let subsets = pol.map(|p| p.subsets.as_slice()).unwrap_or(&[]);
                let mut clusters = vec![(cname, String::new(), eps)];
                for sub in subsets {
                    let name: Arc<str> = resources::cluster_name(&host, port, &sub.name).into();
                    let picked: Vec<EndpointIn> = clusters[0]
                        .2
                        .iter()
                        .filter(|e| sub.selects(|k| e.labels.get(k).map(String::as_str)))
                        .cloned()
                        .collect();
                    clusters.push((name, sub.name.clone(), picked));
                }
                for (cname, subset, eps) in clusters {
                    let grpc = Res::new(
                        &cname,
                        &resources::cluster(&host, port, &subset, pol, &sans, TlsForm::Grpc),
                    );
                    let envoy = if sans.is_empty() {
                        grpc.clone()
                    } else {
                        Res::new(
                            &cname,
                            &resources::cluster(&host, port, &subset, pol, &sans, TlsForm::Envoy),
                        )
                    };
                    if exported_here {
                        part.router.push((cname.clone(), envoy.clone()));
                    }
                    part.grpc.push((cname.clone(), grpc));
                    part.envoy.push((cname.clone(), envoy));
                    part.ports.push((
                        cname.clone(),
                        Arc::new(ServicePort {
                            host: host.clone(),
                            port,
                            cluster: cname,
                            policy: policy.clone(),
                            endpoints: eps,
                        }),
                    ));
                }
            }
            let part = Arc::new(part);
            g.take_over(&part);
            g.hosts.insert(key, part);
        }
        g
    }

    /// Puts one service's resources into this generation's tables.
    fn take_over(&mut self, part: &HostPart) {
        for (k, r) in &part.listeners {
            self.listeners.insert(k.clone(), r.clone());
        }
        for (k, r) in &part.routes {
            self.routes.insert(k.clone(), r.clone());
        }
        for (k, r) in &part.grpc {
            self.clusters_grpc.insert(k.clone(), r.clone());
        }
        for (k, r) in &part.envoy {
            self.clusters_envoy.insert(k.clone(), r.clone());
        }
        for (k, r) in &part.router {
            self.clusters_router.insert(k.clone(), r.clone());
        }
        for (k, p) in &part.ports {
            self.ports.insert(k.clone(), p.clone());
        }
    }

    /// Takes over from `prev` the EDS tables already computed for every service port that did
    /// not change (the same endpoints and policy, and the same gateways everywhere), so that a
    /// change to one service computes that service's tables again, not every table. Returns
    /// how many tables were taken over.
    pub fn reuse_tables(&self, prev: &Generation) -> usize {
        if self.gateways != prev.gateways {
            return 0;
        }
        let old = prev.eds_cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = self.eds_cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut same: HashMap<&str, bool> = HashMap::new();
        let mut n = 0;
        for ((cluster, class), slot) in old.iter() {
            if slot.get().is_none() {
                continue;
            }
            let unchanged = *same.entry(cluster).or_insert_with(|| {
                match (self.ports.get(cluster), prev.ports.get(cluster)) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                    _ => false,
                }
            });
            if unchanged {
                mine.insert((cluster.clone(), *class), slot.clone());
                n += 1;
            }
        }
        n
    }

    fn clusters(&self, p: &ProxyNode) -> &BTreeMap<Arc<str>, SharedRes> {
        match (p.kind, p.flavor) {
            (NodeKind::Router, _) => &self.clusters_router,
            (_, super::node::Flavor::Grpc) => &self.clusters_grpc,
            (_, super::node::Flavor::Envoy) => &self.clusters_envoy,
        }
    }

    /// Every resource of a wildcard-capable type this proxy should have.
    pub fn all(&self, kind: Kind, p: &ProxyNode) -> Vec<SharedRes> {
        match kind {
            Kind::Cluster => self.clusters(p).values().cloned().collect(),
            Kind::Listener if p.flavor == super::node::Flavor::Grpc => {
                self.listeners.values().cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// One named resource for this proxy, if it exists.
    pub fn get(&self, kind: Kind, name: &str, p: &ProxyNode) -> Option<SharedRes> {
        match kind {
            Kind::Listener => self.listeners.get(name).cloned(),
            Kind::Route => self.routes.get(name).cloned(),
            Kind::Cluster => self.clusters(p).get(name).cloned(),
            Kind::Endpoint => self.endpoints(name, p).map(|(r, _)| r),
            // Secrets depend on the asking proxy's identity: see `server::World`.
            Kind::Secret => None,
        }
    }

    /// The EDS resource and its table for a proxy, from the class cache when possible.
    pub fn endpoints(&self, cluster: &str, p: &ProxyNode) -> Option<(SharedRes, Arc<Table>)> {
        if p.kind == NodeKind::Router && !self.clusters_router.contains_key(cluster) {
            return None;
        }
        let sp = self.ports.get(cluster)?;
        let keys = sp
            .policy
            .as_deref()
            .into_iter()
            .flat_map(|pol| pol.label_keys());
        let class = p.class_for(keys);
        let slot = {
            let mut cache = self.eds_cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .entry((sp.cluster.clone(), class))
                .or_default()
                .clone()
        };
        let v = slot.get_or_init(|| {
            self.eds_computed.fetch_add(1, Ordering::Relaxed);
            let t = Arc::new(self.table(sp, p));
            (
                Res::new(cluster, &resources::load_assignment(cluster, &t)),
                t,
            )
        });
        Some(v.clone())
    }

    /// What-if: the table a sidecar `proxy` would be pushed for the service port `cluster` if
    /// the clusters in `failed` went stale (their lease expired: ranked as the service's
    /// policy says for stale endpoints) and the endpoints in the localities matching `down`
    /// (`region/zone` patterns, `*` allowed) failed their health checks. `None`: no such
    /// service port.
    pub fn what_if(
        &self,
        cluster: &str,
        proxy: &ProxyIn,
        failed: &[String],
        down: &[String],
    ) -> Option<Table> {
        let sp = self.ports.get(cluster)?;
        let eps: Vec<EndpointIn> = sp
            .endpoints
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if failed.contains(&e.cluster) {
                    e.stale = true;
                }
                if down.iter().any(|d| e.locality.matches(d)) {
                    e.healthy = false;
                }
                e
            })
            .collect();
        Some(table::compute(
            sp.policy.as_deref(),
            proxy,
            &eps,
            &self.gateways,
        ))
    }

    fn table(&self, sp: &ServicePort, p: &ProxyNode) -> Table {
        match p.kind {
            // A gateway forwards only into its own network, to any healthy endpoint there.
            NodeKind::Router => {
                let eps: Vec<EndpointIn> = sp
                    .endpoints
                    .iter()
                    .filter(|e| e.network == p.network || e.network.is_empty())
                    .cloned()
                    .collect();
                table::compute(None, &ProxyIn::default(), &eps, &self.gateways)
            }
            NodeKind::Sidecar => {
                let proxy = ProxyIn {
                    locality: p.locality.clone(),
                    labels: p.labels.clone(),
                    cluster: p.cluster.clone(),
                    network: Some(p.network.clone()),
                };
                table::compute(sp.policy.as_deref(), &proxy, &sp.endpoints, &self.gateways)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{ClusterFacts, Endpoint, LeaseState, Locality, PeerCluster, Port, ServiceExport};

    fn ep(addr: &str, region: &str, version: &str) -> Endpoint {
        Endpoint {
            address: addr.into(),
            locality: Some(Locality {
                region: region.into(),
                zone: format!("{region}-a"),
                subzone: String::new(),
            }),
            labels: [
                ("version".to_string(), version.to_string()),
                (TLS_MODE_LABEL.to_string(), "istio".to_string()),
            ]
            .into(),
            weight: 1,
            healthy: true,
            service_account: "ledger".into(),
            ..Default::default()
        }
    }

    fn export(endpoints: Vec<Endpoint>, policy: &str) -> Arc<ServiceExport> {
        Arc::new(ServiceExport {
            namespace: "shop".into(),
            name: "ledger".into(),
            ports: vec![Port {
                name: "grpc".into(),
                port: 9090,
                protocol: "TCP".into(),
                app_protocol: String::new(),
            }],
            endpoints,
            failover_policy: policy.into(),
            ..Default::default()
        })
    }

    const POLICY: &str = "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: ledger, namespace: shop}\nspec:\n  host: ledger\n  failover: [{from: us-east1, to: mars1}]\n  outlierDetection: {consecutive5xxErrors: 3}\n  subsets:\n    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n    - {name: v9, labels: {version: v9}}\n";

    /// east runs ledger v1; west (another network, through its gateway) runs v2. Each subset
    /// cluster has only its subset's endpoints, with the subset in the SNI; what the policy
    /// names that no endpoint has, and the subset west does not define, are found.
    #[test]
    fn subsets_get_their_own_clusters_and_what_is_missing_is_found() {
        let mut snap = Snapshot::default();
        snap.facts.cluster_id = "east".into();
        snap.facts.network = "net-e".into();
        snap.local.insert(
            "shop/ledger".into(),
            export(vec![ep("10.0.0.1", "us-east1", "v1")], ""),
        );
        snap.peers.insert(
            "west".into(),
            PeerCluster {
                facts: Some(ClusterFacts {
                    cluster_id: "west".into(),
                    network: "net-w".into(),
                    trust_domain: "west.mesh".into(),
                    gateways: vec!["192.0.2.7:15443".into()],
                    ..Default::default()
                }),
                lease: LeaseState::Fresh as i32,
                ..Default::default()
            },
        );
        // west publishes a policy defining v2 only.
        let published = POLICY
            .replace("    - {name: v1, labels: {version: v1}}\n", "")
            .replace("    - {name: v9, labels: {version: v9}}\n", "")
            .replace("spec:\n", "spec:\n  publish: true\n");
        snap.imports.insert(
            ("west".into(), "shop/ledger".into()),
            export(vec![ep("10.1.0.1", "us-west1", "v2")], &published),
        );
        let policies = PolicySet::from_sources(&[("p.yaml".into(), POLICY.into())]).unwrap();
        let local = LocalFacts {
            cluster: "east".into(),
            network: "net-e".into(),
            locality: Loc::new("us-east1", "us-east1-a", ""),
            trust_domain: "east.mesh".into(),
        };
        let g = Generation::build(1, &snap, &policies, &local);
        let host = "ledger.shop.svc.cluster.local";
        for (subset, want) in [("", 2), ("v1", 1), ("v2", 1), ("v9", 0)] {
            let name = resources::cluster_name(host, 9090, subset);
            let sp = &g.ports[name.as_str()];
            assert_eq!(sp.endpoints.len(), want, "{name}");
            assert!(
                sp.endpoints
                    .iter()
                    .all(|e| subset.is_empty() || e.labels["version"] == subset),
                "{name}"
            );
            assert!(g.clusters_grpc.contains_key(name.as_str()));
        }
        let sni = |subset: &str| -> String {
            let c = &g.clusters_envoy[resources::cluster_name(host, 9090, subset).as_str()];
            let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
                prost::Message::decode(c.any.value.as_slice()).unwrap();
            let ts = c.transport_socket.unwrap();
            let Some(
                envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                    a,
                ),
            ) = ts.config_type
            else {
                panic!("no TLS")
            };
            let tls: envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext =
                prost::Message::decode(a.value.as_slice()).unwrap();
            tls.sni
        };
        assert_eq!(sni(""), format!("outbound_.9090_._.{host}"));
        assert_eq!(sni("v2"), format!("outbound_.9090_.v2_.{host}"));
        // Only east exports nothing here, so no router clusters; east's gateway would route
        // subsets of what it exports.
        let mut kinds: Vec<(String, String)> = g
            .policy_findings
            .iter()
            .map(|f| {
                (
                    f.kind.clone(),
                    f.message.split(':').next().unwrap_or("").to_string(),
                )
            })
            .collect();
        kinds.sort();
        assert_eq!(
            kinds.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            [
                "empty-locality",
                "empty-subset",
                "subset-without-route",
                "subset-without-route"
            ],
            "{:?}",
            g.policy_findings
        );
        let no_route: Vec<&str> = g
            .policy_findings
            .iter()
            .filter(|f| f.kind == "subset-without-route")
            .map(|f| f.message.as_str())
            .collect();
        assert!(
            no_route.iter().any(|m| m.starts_with("subset v1 ")),
            "{no_route:?}"
        );
        assert!(
            no_route.iter().any(|m| m.starts_with("subset v9 ")),
            "{no_route:?}"
        );
    }

    const ROUTES: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ledger, namespace: shop}\nspec:\n  hosts: [ledger]\n  http:\n    - match: [{headers: {x-version: {exact: v2}}}]\n      route: [{destination: {host: ledger, subset: v2}}]\n    - match: [{headers: {x-version: {exact: v7}}}]\n      route: [{destination: {host: ledger, subset: v7, port: {number: 7000}}}]\n    - route: [{destination: {host: ledger, subset: v1}}]\n";

    /// A VirtualService beside the policy: the route configuration sends calls to the subset
    /// clusters in order; a route to a subset no policy defines, or to a port the service does
    /// not have, is found; a change of the routes alone rebuilds the service's resources.
    #[test]
    fn routes_select_subset_clusters_and_what_they_miss_is_found() {
        use envoy_types::pb::envoy::config::route::v3 as route;
        let mut snap = Snapshot::default();
        snap.facts.cluster_id = "east".into();
        snap.local.insert(
            "shop/ledger".into(),
            export(
                vec![
                    ep("10.0.0.1", "us-east1", "v1"),
                    ep("10.0.0.2", "us-east1", "v2"),
                ],
                "",
            ),
        );
        let local = LocalFacts {
            cluster: "east".into(),
            network: "net-e".into(),
            locality: Loc::new("us-east1", "us-east1-a", ""),
            trust_domain: "east.mesh".into(),
        };
        let policies = PolicySet::from_sources(&[
            ("p.yaml".into(), POLICY.into()),
            ("r.yaml".into(), ROUTES.into()),
        ])
        .unwrap();
        let g = Generation::build(1, &snap, &policies, &local);
        let host = "ledger.shop.svc.cluster.local";
        let rc = &g.routes[resources::listener_name(host, 9090).as_str()];
        let rc: route::RouteConfiguration =
            prost::Message::decode(rc.any.value.as_slice()).unwrap();
        let clusters: Vec<String> = rc.virtual_hosts[0]
            .routes
            .iter()
            .map(|r| match &r.action {
                Some(route::route::Action::Route(a)) => match &a.cluster_specifier {
                    Some(route::route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            clusters,
            [
                format!("outbound|9090|v2|{host}"),
                format!("outbound|7000|v7|{host}"),
                format!("outbound|9090|v1|{host}"),
            ]
        );
        // The clusters the routes name that exist are served.
        assert!(g
            .clusters_grpc
            .contains_key(format!("outbound|9090|v2|{host}").as_str()));
        let mut kinds: Vec<&str> = g
            .policy_findings
            .iter()
            .filter(|f| f.kind.starts_with("route-"))
            .map(|f| f.kind.as_str())
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            ["route-unknown-port", "route-unknown-subset"],
            "{:?}",
            g.policy_findings
        );
        let f = g
            .policy_findings
            .iter()
            .find(|f| f.kind == "route-unknown-subset")
            .unwrap();
        assert_eq!(f.origin, "r.yaml:5:11");
        assert!(
            f.message
                .contains("subset v7, which the policy in effect (p.yaml:5:9) does not define"),
            "{f:?}"
        );

        // Without the routes: one route to the service's cluster; the service was rebuilt.
        let plain = PolicySet::from_sources(&[("p.yaml".into(), POLICY.into())]).unwrap();
        let g2 = Generation::build_after(Some(&g), 2, &snap, &plain, &local);
        assert_eq!(g2.hosts_reused, 0);
        let rc = &g2.routes[resources::listener_name(host, 9090).as_str()];
        let rc: route::RouteConfiguration =
            prost::Message::decode(rc.any.value.as_slice()).unwrap();
        assert_eq!(rc.virtual_hosts[0].routes.len(), 1);
        let g3 = Generation::build_after(Some(&g2), 3, &snap, &plain, &local);
        assert_eq!(g3.hosts_reused, 1);
    }
}
