//! Who is asking: the xDS node of a proxy (Envoy sidecar or gateway, proxyless gRPC, meshfed's
//! gateway) and everything about it that an EDS table depends on.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind as ValueKind, Struct};

use meshfed_failover::Loc;

/// What the agent knows about its own cluster (defaults for proxies that say nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalFacts {
    pub cluster: String,
    pub network: String,
    pub locality: Loc,
    pub trust_domain: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Proxyless gRPC: api_listener LDS, A29 certificate-provider TLS.
    Grpc,
    /// Envoy (and meshfed's gateway): Istio-style SDS TLS with SNI and ALPN.
    Envoy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Sidecar,
    /// A gateway (`router~...` node id): only its own network's endpoints, no failover ranking.
    Router,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProxyNode {
    pub id: String,
    pub kind: NodeKind,
    pub flavor: Flavor,
    pub locality: Loc,
    pub labels: BTreeMap<String, String>,
    pub cluster: String,
    pub network: String,
    pub namespace: String,
    pub user_agent: String,
    /// Hash of everything above that EDS tables depend on (labels are added per policy).
    #[serde(skip)]
    pub class: u64,
}

pub const MAX_NODE_ID: usize = 512;

fn string_field(s: &Struct, key: &str) -> Option<String> {
    match s.fields.get(key)?.kind.as_ref()? {
        ValueKind::StringValue(v) => Some(v.clone()),
        _ => None,
    }
}

impl ProxyNode {
    /// Reads the node; errors say which field is wrong.
    pub fn from_node(node: &Node, local: &LocalFacts) -> Result<ProxyNode, String> {
        if node.id.is_empty() {
            return Err("node.id is empty: every xDS client must name itself".into());
        }
        if node.id.len() > MAX_NODE_ID {
            return Err(format!(
                "node.id is {} bytes long; at most {MAX_NODE_ID}",
                node.id.len()
            ));
        }
        let md = node.metadata.clone().unwrap_or_default();
        let mut labels = BTreeMap::new();
        if let Some(v) = md.fields.get("LABELS") {
            match &v.kind {
                Some(ValueKind::StructValue(s)) => {
                    for (k, v) in &s.fields {
                        match &v.kind {
                            Some(ValueKind::StringValue(x)) => {
                                labels.insert(k.clone(), x.clone());
                            }
                            _ => return Err(format!("node.metadata.LABELS.{k} is not a string")),
                        }
                    }
                }
                _ => return Err("node.metadata.LABELS is not a map of strings".into()),
            }
        }
        if labels.len() > 64 {
            return Err(format!(
                "node.metadata.LABELS has {} labels; at most 64",
                labels.len()
            ));
        }
        let locality = match &node.locality {
            Some(l) if !l.region.is_empty() => Loc::new(&l.region, &l.zone, &l.sub_zone),
            _ => local.locality.clone(),
        };
        let ua = node.user_agent_name.clone();
        let grpc = ua.to_ascii_lowercase().contains("grpc")
            || node
                .client_features
                .iter()
                .any(|f| f == "envoy.lb.does_not_support_overprovisioning");
        let kind = if node.id.starts_with("router~") {
            NodeKind::Router
        } else {
            NodeKind::Sidecar
        };
        let mut p = ProxyNode {
            id: node.id.clone(),
            kind,
            flavor: if grpc { Flavor::Grpc } else { Flavor::Envoy },
            locality,
            labels,
            cluster: string_field(&md, "CLUSTER_ID").unwrap_or_else(|| local.cluster.clone()),
            network: string_field(&md, "NETWORK").unwrap_or_else(|| local.network.clone()),
            namespace: string_field(&md, "NAMESPACE").unwrap_or_default(),
            user_agent: ua,
            class: 0,
        };
        let mut h = std::hash::DefaultHasher::new();
        (p.kind, p.flavor, &p.locality, &p.cluster, &p.network).hash(&mut h);
        p.class = h.finish();
        Ok(p)
    }

    /// The class of this proxy for one policy: its base class plus the labels the policy reads.
    pub fn class_for<'a>(&self, keys: impl Iterator<Item = &'a str>) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.class.hash(&mut h);
        for k in keys {
            (k, self.labels.get(k)).hash(&mut h);
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::google::protobuf::Value;

    fn s(v: &str) -> Value {
        Value {
            kind: Some(ValueKind::StringValue(v.into())),
        }
    }

    #[test]
    fn reads_grpc_nodes_and_defaults_from_the_cluster() {
        let local = LocalFacts {
            cluster: "east".into(),
            network: "east-net".into(),
            locality: Loc::new("us-east1", "", ""),
            trust_domain: "east.mesh".into(),
        };
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), s("client"));
        let mut md = Struct::default();
        md.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(ValueKind::StructValue(labels)),
            },
        );
        md.fields.insert("NETWORK".into(), s("vm-net"));
        let node = Node {
            id: "sidecar~10.0.0.1~client.shop~shop.svc.cluster.local".into(),
            user_agent_name: "gRPC C-core linux Python".into(),
            locality: Some(Locality {
                region: "us-east1".into(),
                zone: "us-east1-b".into(),
                sub_zone: String::new(),
            }),
            metadata: Some(md),
            ..Default::default()
        };
        let p = ProxyNode::from_node(&node, &local).unwrap();
        assert_eq!(p.flavor, Flavor::Grpc);
        assert_eq!(p.kind, NodeKind::Sidecar);
        assert_eq!(p.labels["app"], "client");
        assert_eq!(p.network, "vm-net");
        assert_eq!(p.cluster, "east");
        assert_eq!(p.locality.zone, "us-east1-b");
        let bare = ProxyNode::from_node(
            &Node {
                id: "router~1.2.3.4~gw~x".into(),
                ..Default::default()
            },
            &local,
        )
        .unwrap();
        assert_eq!((bare.kind, bare.flavor), (NodeKind::Router, Flavor::Envoy));
        assert_eq!(bare.locality, local.locality);
        assert_ne!(bare.class, p.class);
        assert!(ProxyNode::from_node(&Node::default(), &local)
            .unwrap_err()
            .contains("node.id"));
    }
}
