//! The agent's xDS server: Aggregated Discovery Service over tonic with Envoy's v3 types, both
//! State-of-the-World and Delta. Resources come from the agent's service model and the failover
//! policies; see docs/architecture.md ("xDS push") for the data flow.

pub mod client;
pub mod debug;
pub mod generation;
pub mod json;
pub mod node;
pub mod resources;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod status;
pub mod transport;

use std::time::Duration;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The resource types meshfed serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Cluster,
    Endpoint,
    Listener,
    Route,
    /// SDS: the workload certificate (`default`) and the per-trust-domain validation context
    /// (`ROOTCA`), see [`secrets`].
    Secret,
}

impl Kind {
    /// Push order: clusters before the endpoints and listeners that refer to them.
    pub const ALL: [Kind; 5] = [
        Kind::Cluster,
        Kind::Endpoint,
        Kind::Listener,
        Kind::Route,
        Kind::Secret,
    ];

    pub fn from_url(url: &str) -> Option<Kind> {
        match url {
            LISTENER_TYPE => Some(Kind::Listener),
            ROUTE_TYPE => Some(Kind::Route),
            CLUSTER_TYPE => Some(Kind::Cluster),
            ENDPOINT_TYPE => Some(Kind::Endpoint),
            SECRET_TYPE => Some(Kind::Secret),
            _ => None,
        }
    }

    pub fn url(self) -> &'static str {
        match self {
            Kind::Listener => LISTENER_TYPE,
            Kind::Route => ROUTE_TYPE,
            Kind::Cluster => CLUSTER_TYPE,
            Kind::Endpoint => ENDPOINT_TYPE,
            Kind::Secret => SECRET_TYPE,
        }
    }

    /// The short name used by `meshfed proxy-status` and `proxy-config`.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Route => "route",
            Kind::Cluster => "cluster",
            Kind::Endpoint => "endpoint",
            Kind::Secret => "secret",
        }
    }

    pub fn from_short(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.short() == s)
    }

    /// Listeners and clusters are state of the world: an empty subscription means all of them,
    /// and a SotW response must carry every subscribed resource.
    pub fn wildcard_capable(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }
}

#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// Plaintext ADS for the local cluster (default 0.0.0.0:15010); `None` turns it off.
    pub plaintext: Option<std::net::SocketAddr>,
    /// ADS over mTLS; clients present an SVID of the cluster's trust domain (default 0.0.0.0:15012).
    pub mtls: Option<std::net::SocketAddr>,
    /// Changes within this window after the first one are pushed together.
    pub debounce: Duration,
    /// Lifetime of the workload certificates served over SDS (`default`).
    pub workload_cert_ttl: time::Duration,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            plaintext: Some(std::net::SocketAddr::from(([0, 0, 0, 0], 15010))),
            mtls: Some(std::net::SocketAddr::from(([0, 0, 0, 0], 15012))),
            debounce: Duration::from_millis(100),
            workload_cert_ttl: time::Duration::hours(24),
        }
    }
}
