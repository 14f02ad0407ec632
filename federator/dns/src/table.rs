//! The mesh's names: which services answer under `cluster.local` and `clusterset.local`, with
//! which VIPs and ports. Built from the agent's model (local and imported services) and the
//! persisted VIP allocation; the VM agent receives the same table from its cluster's agent, so
//! a VM and the pods of its cluster see the same addresses.
//!
//! Names (MCS DNS specification 1.0.0 for `clusterset.local`):
//! - `<svc>.<ns>.svc.cluster.local`: every local service and every imported one (no placeholder
//!   Service needed) -> A/AAAA = its VIP;
//! - `<svc>.<ns>.svc.clusterset.local`: services in the clusterset (exported here or imported)
//!   -> A/AAAA = the same VIP (ClusterSetIP);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV -> `<svc>.<ns>.svc.<zone>` (named ports only);
//! - `dns-version.clusterset.local` TXT "1.0.0".
//!
//! A headless service (`clusterIP: None`, MCS type Headless) has no VIP: its name answers with
//! the addresses of its healthy endpoints that this cluster reaches directly (its own and those
//! of clusters on its network; an endpoint behind another network's gateway has no routable
//! address here and is left out), and `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`
//! with one endpoint's address, for endpoints with a hostname (a StatefulSet's pods).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

pub const CLUSTER_ZONE: &str = "cluster.local";
pub const CLUSTERSET_ZONE: &str = "clusterset.local";
pub const MCS_DNS_VERSION: &str = "1.0.0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortName {
    pub name: String,
    pub port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNames {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    pub ports: Vec<PortName>,
    /// Answers under `cluster.local`.
    pub cluster: bool,
    /// Answers under `clusterset.local`.
    pub clusterset: bool,
    /// Headless: no VIPs; the name answers with `endpoints`.
    #[serde(default)]
    pub headless: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<HeadlessEndpoint>,
}

/// One endpoint of a headless service that this cluster reaches directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadlessEndpoint {
    pub address: IpAddr,
    /// Its own name `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` (when not empty).
    pub hostname: String,
    pub cluster: String,
}

/// Keyed by (namespace, name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameTable {
    pub services: BTreeMap<(String, String), ServiceNames>,
}

impl NameTable {
    /// A service's VIPs (IPv4, then IPv6); none for an unknown or headless service.
    pub fn vips(&self, namespace: &str, name: &str) -> Vec<std::net::IpAddr> {
        self.services
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| {
                s.v4.map(std::net::IpAddr::V4)
                    .into_iter()
                    .chain(s.v6.map(std::net::IpAddr::V6))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What a query name means to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Not under our zones: forward it.
    Foreign,
    /// Under our zones, and no such name.
    NxDomain,
    /// `dns-version.clusterset.local`.
    Version,
    /// A service name.
    Service {
        zone: &'static str,
        svc: &'a ServiceNames,
        namespace: String,
        name: String,
    },
    /// An SRV name of a service port.
    Port {
        zone: &'static str,
        svc: &'a ServiceNames,
        namespace: String,
        name: String,
        port: &'a PortName,
    },
    /// One endpoint of a headless service, by hostname and cluster.
    Endpoint { zone: &'static str, address: IpAddr },
    /// A name that exists only as a parent of others (e.g. `shop.svc.cluster.local`): NOERROR
    /// with no records.
    Empty,
}

impl NameTable {
    /// Resolves a query name (any case, with or without the final dot).
    pub fn lookup(&self, qname: &str) -> Lookup<'_> {
        let name = qname.trim_end_matches('.').to_ascii_lowercase();
        let (zone, rest) = if let Some(r) = strip_zone(&name, CLUSTER_ZONE) {
            (CLUSTER_ZONE, r)
        } else if let Some(r) = strip_zone(&name, CLUSTERSET_ZONE) {
            (CLUSTERSET_ZONE, r)
        } else {
            return Lookup::Foreign;
        };
        let labels: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('.').collect()
        };
        if zone == CLUSTERSET_ZONE && labels == ["dns-version"] {
            return Lookup::Version;
        }
        // A headless service without endpoints does not exist, nor do the names below it.
        let exists = |s: &ServiceNames| !s.headless || !s.endpoints.is_empty();
        let in_zone = |s: &ServiceNames| {
            if zone == CLUSTER_ZONE {
                s.cluster
            } else {
                s.clusterset
            }
        };
        match labels.as_slice() {
            [] | ["svc"] => Lookup::Empty,
            [ns, "svc"] => {
                if self
                    .services
                    .iter()
                    .any(|((n, _), s)| n == ns && in_zone(s))
                {
                    Lookup::Empty
                } else {
                    Lookup::NxDomain
                }
            }
            [svc, ns, "svc"] => match self.get(ns, svc).filter(|s| in_zone(s)) {
                Some(s) => Lookup::Service {
                    zone,
                    svc: s,
                    namespace: ns.to_string(),
                    name: svc.to_string(),
                },
                None => Lookup::NxDomain,
            },
            [proto, svc, ns, "svc"] if proto.starts_with('_') => {
                match self.get(ns, svc).filter(|s| in_zone(s) && exists(s)) {
                    Some(s)
                        if s.ports
                            .iter()
                            .any(|p| proto[1..] == *p.protocol && !p.name.is_empty()) =>
                    {
                        Lookup::Empty
                    }
                    _ => Lookup::NxDomain,
                }
            }
            [host, cluster, svc, ns, "svc"]
                if zone == CLUSTERSET_ZONE && !host.starts_with('_') =>
            {
                match self.get(ns, svc).filter(|s| s.headless && in_zone(s)) {
                    Some(s) => match s
                        .endpoints
                        .iter()
                        .find(|e| e.hostname == *host && e.cluster == *cluster)
                    {
                        Some(e) => Lookup::Endpoint {
                            zone,
                            address: e.address,
                        },
                        None => Lookup::NxDomain,
                    },
                    None => Lookup::NxDomain,
                }
            }
            [cluster, svc, ns, "svc"] if zone == CLUSTERSET_ZONE && !cluster.starts_with('_') => {
                // The parent of a headless service's endpoint names.
                match self.get(ns, svc).filter(|s| s.headless && in_zone(s)) {
                    Some(s)
                        if s.endpoints
                            .iter()
                            .any(|e| e.cluster == *cluster && !e.hostname.is_empty()) =>
                    {
                        Lookup::Empty
                    }
                    _ => Lookup::NxDomain,
                }
            }
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                let Some(s) = self.get(ns, svc).filter(|s| in_zone(s) && exists(s)) else {
                    return Lookup::NxDomain;
                };
                match s
                    .ports
                    .iter()
                    .find(|p| !p.name.is_empty() && p.name == port[1..] && p.protocol == proto[1..])
                {
                    Some(p) => Lookup::Port {
                        zone,
                        svc: s,
                        namespace: ns.to_string(),
                        name: svc.to_string(),
                        port: p,
                    },
                    None => Lookup::NxDomain,
                }
            }
            _ => Lookup::NxDomain,
        }
    }

    fn get(&self, ns: &str, name: &str) -> Option<&ServiceNames> {
        self.services.get(&(ns.to_string(), name.to_string()))
    }

    /// How many names the table answers for (for metrics and the benchmark).
    pub fn name_count(&self) -> usize {
        self.services
            .values()
            .map(|s| usize::from(s.cluster) + usize::from(s.clusterset))
            .sum()
    }
}

fn strip_zone<'a>(name: &'a str, zone: &str) -> Option<&'a str> {
    if name == zone {
        return Some("");
    }
    name.strip_suffix(zone)?.strip_suffix('.')
}

/// Builds the table from the agent's model: every local service answers under cluster.local;
/// exported and imported services also under clusterset.local; an imported service answers
/// under cluster.local too. `vip` gives a service its addresses.
pub fn build(
    snap: &meshfed_model::snapshot::Snapshot,
    exported: &std::collections::BTreeSet<String>,
    mut vip: impl FnMut(&str) -> (Option<Ipv4Addr>, Option<Ipv6Addr>),
) -> NameTable {
    let mut t = NameTable::default();
    for (key, insts) in snap.services() {
        let Some((ns, name)) = key.split_once('/') else {
            continue;
        };
        let local = insts.iter().any(|i| i.local);
        let imported = insts.iter().any(|i| !i.local);
        let clusterset = imported || exported.contains(&key);
        let mut ports: Vec<PortName> = Vec::new();
        for i in &insts {
            for p in &i.export.ports {
                let pn = PortName {
                    name: p.name.clone(),
                    port: p.port as u16,
                    protocol: p.protocol.to_ascii_lowercase(),
                };
                if !ports.contains(&pn) {
                    ports.push(pn);
                }
            }
        }
        // Headless when every instance that counts says so: the imported ones and this
        // cluster's own when it exports it (a conflicting newer export is not imported).
        // (A service of this cluster alone is what its own Service says.)
        let mut counted: Vec<_> = insts
            .iter()
            .filter(|i| !i.local || exported.contains(&key))
            .collect();
        if counted.is_empty() {
            counted = insts.iter().collect();
        }
        let headless = counted.iter().all(|i| i.export.headless);
        let (v4, v6) = if headless { (None, None) } else { vip(&key) };
        let mut endpoints = Vec::new();
        if headless {
            for i in insts
                .iter()
                .filter(|i| i.local || i.network.is_empty() || i.network == snap.facts.network)
            {
                for e in i.export.endpoints.iter().filter(|e| e.healthy) {
                    if let Ok(address) = e.address.parse::<IpAddr>() {
                        endpoints.push(HeadlessEndpoint {
                            address,
                            hostname: e.hostname.clone(),
                            cluster: i.cluster.to_string(),
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| (&a.cluster, a.address).cmp(&(&b.cluster, b.address)));
        }
        t.services.insert(
            (ns.to_string(), name.to_string()),
            ServiceNames {
                v4,
                v6,
                ports,
                cluster: local || imported,
                clusterset,
                headless,
                endpoints,
            },
        );
    }
    t
}

impl NameTable {
    pub fn to_proto(&self) -> proto::vm::Names {
        proto::vm::Names {
            services: self
                .services
                .iter()
                .map(|((ns, name), s)| proto::vm::ServiceName {
                    namespace: ns.clone(),
                    name: name.clone(),
                    vip4: s.v4.map(|a| a.to_string()).unwrap_or_default(),
                    vip6: s.v6.map(|a| a.to_string()).unwrap_or_default(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| proto::vm::NamedPort {
                            name: p.name.clone(),
                            port: u32::from(p.port),
                            protocol: p.protocol.clone(),
                        })
                        .collect(),
                    cluster: s.cluster,
                    clusterset: s.clusterset,
                    headless: s.headless,
                    endpoints: s
                        .endpoints
                        .iter()
                        .map(|e| proto::vm::HeadlessEndpoint {
                            address: e.address.to_string(),
                            hostname: e.hostname.clone(),
                            cluster: e.cluster.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The table a VM received; entries that do not make sense are left out (and named).
    pub fn from_proto(n: &proto::vm::Names) -> (NameTable, Vec<String>) {
        let mut t = NameTable::default();
        let mut bad = Vec::new();
        for s in &n.services {
            let key = format!("{}/{}", s.namespace, s.name);
            if !meshfed_model::validate::is_dns_label(&s.namespace)
                || !meshfed_model::validate::is_dns_label(&s.name)
            {
                bad.push(format!("{key}: not DNS labels"));
                continue;
            }
            let v4 = match s.vip4.as_str() {
                "" => None,
                a => match a.parse() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        bad.push(format!("{key}: vip4 {a:?}"));
                        continue;
                    }
                },
            };
            let v6 = match s.vip6.as_str() {
                "" => None,
                a => match a.parse() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        bad.push(format!("{key}: vip6 {a:?}"));
                        continue;
                    }
                },
            };
            let mut endpoints = Vec::new();
            for e in &s.endpoints {
                let (Ok(address), true, true) = (
                    e.address.parse::<IpAddr>(),
                    e.hostname.is_empty() || meshfed_model::validate::is_dns_label(&e.hostname),
                    meshfed_model::validate::is_dns_label(&e.cluster),
                ) else {
                    bad.push(format!(
                        "{key}: endpoint {:?} (hostname {:?}, cluster {:?})",
                        e.address, e.hostname, e.cluster
                    ));
                    continue;
                };
                endpoints.push(HeadlessEndpoint {
                    address,
                    hostname: e.hostname.clone(),
                    cluster: e.cluster.clone(),
                });
            }
            t.services.insert(
                (s.namespace.clone(), s.name.clone()),
                ServiceNames {
                    v4,
                    v6,
                    ports: s
                        .ports
                        .iter()
                        .filter(|p| p.port > 0 && p.port <= 65535)
                        .map(|p| PortName {
                            name: p.name.clone(),
                            port: p.port as u16,
                            protocol: p.protocol.to_ascii_lowercase(),
                        })
                        .collect(),
                    cluster: s.cluster,
                    clusterset: s.clusterset,
                    headless: s.headless,
                    endpoints,
                },
            );
        }
        (t, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> NameTable {
        let mut t = NameTable::default();
        t.services.insert(
            ("shop".into(), "payment".into()),
            ServiceNames {
                endpoints: Vec::new(),
                headless: false,
                v4: Some(Ipv4Addr::new(240, 240, 0, 1)),
                v6: None,
                ports: vec![
                    PortName {
                        name: "http".into(),
                        port: 8080,
                        protocol: "tcp".into(),
                    },
                    PortName {
                        name: String::new(),
                        port: 9000,
                        protocol: "tcp".into(),
                    },
                ],
                cluster: true,
                clusterset: true,
            },
        );
        t.services.insert(
            ("shop".into(), "internal".into()),
            ServiceNames {
                endpoints: Vec::new(),
                headless: false,
                v4: Some(Ipv4Addr::new(240, 240, 0, 2)),
                v6: None,
                ports: vec![],
                cluster: true,
                clusterset: false,
            },
        );
        t
    }

    #[test]
    fn names() {
        let t = table();
        assert!(matches!(
            t.lookup("Payment.SHOP.svc.cluster.local."),
            Lookup::Service {
                zone: CLUSTER_ZONE,
                ..
            }
        ));
        assert!(matches!(
            t.lookup("payment.shop.svc.clusterset.local"),
            Lookup::Service {
                zone: CLUSTERSET_ZONE,
                ..
            }
        ));
        assert_eq!(
            t.lookup("internal.shop.svc.clusterset.local"),
            Lookup::NxDomain,
            "not in the clusterset"
        );
        assert!(matches!(
            t.lookup("internal.shop.svc.cluster.local"),
            Lookup::Service { .. }
        ));
        assert!(matches!(
            t.lookup("_http._tcp.payment.shop.svc.clusterset.local"),
            Lookup::Port {
                port: PortName { port: 8080, .. },
                ..
            }
        ));
        assert_eq!(
            t.lookup("_http._udp.payment.shop.svc.clusterset.local"),
            Lookup::NxDomain
        );
        assert_eq!(
            t.lookup("_tcp.payment.shop.svc.cluster.local"),
            Lookup::Empty
        );
        assert_eq!(t.lookup("shop.svc.cluster.local"), Lookup::Empty);
        assert_eq!(t.lookup("cluster.local"), Lookup::Empty);
        assert_eq!(t.lookup("nope.svc.cluster.local"), Lookup::NxDomain);
        assert_eq!(
            t.lookup("x.payment.shop.svc.cluster.local.x"),
            Lookup::Foreign
        );
        assert_eq!(t.lookup("example.com"), Lookup::Foreign);
        assert_eq!(t.lookup("notcluster.local"), Lookup::Foreign);
        assert_eq!(t.lookup("dns-version.clusterset.local"), Lookup::Version);
        assert_eq!(
            t.lookup("a.b.c.payment.shop.svc.cluster.local"),
            Lookup::NxDomain
        );
        assert_eq!(t.name_count(), 3);
    }
}
