//! The routing table: which local endpoints serve a (host, port), which SNI names lead to the
//! control plane. Built from the agent's xDS tables (clusters `outbound|<port>|<subset>|<host>`)
//! by the caller; replaced whole on every change, read lock-free by connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::sni::Target;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// (host, port, subset) -> healthy endpoints, best priority first.
    pub services: BTreeMap<(String, u16, String), Vec<SocketAddr>>,
    /// SNI names routed to fixed addresses (the agent's mTLS port for VMs and other networks).
    pub fixed: BTreeMap<String, Vec<SocketAddr>>,
}

/// Why a connection has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    UnknownService(String),
    AmbiguousPort(String, Vec<u16>),
    NoHealthyEndpoint(String),
}

impl std::fmt::Display for NoRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoRoute::UnknownService(h) => write!(f, "no local service {h}"),
            NoRoute::AmbiguousPort(h, ports) => {
                write!(f, "{h} has several ports ({ports:?}); name one in the SNI")
            }
            NoRoute::NoHealthyEndpoint(h) => write!(f, "{h} has no healthy local endpoint"),
        }
    }
}

impl Routes {
    /// Parses `outbound|<port>|<subset>|<host>` cluster names with their endpoints.
    pub fn from_clusters<'a>(
        clusters: impl IntoIterator<Item = (&'a str, Vec<SocketAddr>)>,
    ) -> Routes {
        let mut r = Routes::default();
        for (name, eps) in clusters {
            if let Ok(t) = crate::sni::parse(name) {
                if let Some(port) = t.port {
                    r.services.insert((t.host, port, t.subset), eps);
                }
            }
        }
        r
    }

    /// The endpoints for a ClientHello's SNI. A `.svc.clusterset.local` host (the name an
    /// importer's sidecars use for a ServiceEntry meshfed wrote) is the exported service of
    /// the same namespace and name.
    pub fn lookup(&self, sni: &str, target: &Target) -> Result<&[SocketAddr], NoRoute> {
        if let Some(f) = self.fixed.get(sni) {
            return Ok(f);
        }
        let local;
        let target = match target.host.strip_suffix(".svc.clusterset.local") {
            Some(base) => {
                local = Target {
                    host: format!("{base}.svc.cluster.local"),
                    ..target.clone()
                };
                &local
            }
            None => target,
        };
        let key = match target.port {
            Some(p) => (target.host.clone(), p, target.subset.clone()),
            None => {
                let ports: Vec<u16> = self
                    .services
                    .keys()
                    .filter(|(h, _, s)| *h == target.host && s.is_empty())
                    .map(|(_, p, _)| *p)
                    .collect();
                match ports.as_slice() {
                    [p] => (target.host.clone(), *p, String::new()),
                    [] => return Err(NoRoute::UnknownService(target.host.clone())),
                    _ => return Err(NoRoute::AmbiguousPort(target.host.clone(), ports)),
                }
            }
        };
        match self.services.get(&key) {
            None => Err(NoRoute::UnknownService(format!("{}:{}", key.0, key.1))),
            Some(e) if e.is_empty() => {
                Err(NoRoute::NoHealthyEndpoint(format!("{}:{}", key.0, key.1)))
            }
            Some(e) => Ok(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_by_istio_sni_plain_host_and_fixed_names() {
        let a: SocketAddr = "10.0.0.1:9080".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:9090".parse().unwrap();
        let mut r = Routes::from_clusters([
            ("outbound|9080||reviews.shop.svc.cluster.local", vec![a]),
            ("outbound|9090||multi.shop.svc.cluster.local", vec![b]),
            ("outbound|9091||multi.shop.svc.cluster.local", vec![b]),
            ("outbound|80||empty.shop.svc.cluster.local", vec![]),
        ]);
        r.fixed.insert("istiod.istio-system.svc".into(), vec![b]);
        let t = crate::sni::parse("outbound_.9080_._.reviews.shop.svc.cluster.local").unwrap();
        assert_eq!(r.lookup("x", &t).unwrap(), &[a]);
        let t = crate::sni::parse("reviews.shop.svc.cluster.local").unwrap();
        assert_eq!(r.lookup("x", &t).unwrap(), &[a]);
        let t = crate::sni::parse("multi.shop.svc.cluster.local").unwrap();
        assert!(matches!(
            r.lookup("x", &t),
            Err(NoRoute::AmbiguousPort(_, _))
        ));
        let t = crate::sni::parse("outbound_.80_._.empty.shop.svc.cluster.local").unwrap();
        assert!(matches!(
            r.lookup("x", &t),
            Err(NoRoute::NoHealthyEndpoint(_))
        ));
        let t = crate::sni::parse("outbound_.1_._.nope.shop.svc.cluster.local").unwrap();
        assert!(matches!(r.lookup("x", &t), Err(NoRoute::UnknownService(_))));
        let t = crate::sni::parse("istiod.istio-system.svc").unwrap();
        assert_eq!(r.lookup("istiod.istio-system.svc", &t).unwrap(), &[b]);
    }

    #[test]
    fn subsets_and_clusterset_names_route_to_their_endpoints() {
        let all: SocketAddr = "10.0.0.1:9080".parse().unwrap();
        let v2: SocketAddr = "10.0.0.2:9080".parse().unwrap();
        let r = Routes::from_clusters([
            (
                "outbound|9080||reviews.shop.svc.cluster.local",
                vec![all, v2],
            ),
            ("outbound|9080|v2|reviews.shop.svc.cluster.local", vec![v2]),
        ]);
        let t = crate::sni::parse("outbound_.9080_.v2_.reviews.shop.svc.cluster.local").unwrap();
        assert_eq!(r.lookup("x", &t).unwrap(), &[v2]);
        // The ServiceEntry host an Istio importer's sidecars send is the same service.
        let t = crate::sni::parse("outbound_.9080_.v2_.reviews.shop.svc.clusterset.local").unwrap();
        assert_eq!(r.lookup("x", &t).unwrap(), &[v2]);
        let t = crate::sni::parse("outbound_.9080_._.reviews.shop.svc.clusterset.local").unwrap();
        assert_eq!(r.lookup("x", &t).unwrap(), &[all, v2]);
        // A subset the exporter does not define has no route (never the whole service).
        let t = crate::sni::parse("outbound_.9080_.v3_.reviews.shop.svc.cluster.local").unwrap();
        assert!(matches!(r.lookup("x", &t), Err(NoRoute::UnknownService(_))));
    }
}
