//! Request routing for one host: Istio's `VirtualService` `http` routes, as meshfed's xDS
//! serves them to proxyless gRPC clients (RDS). What selects a subset of the host's endpoints
//! for a call: a header, a method path, or a weight.

use serde::{Deserialize, Serialize};

/// A validated `VirtualService` for one host of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Routes {
    pub name: String,
    pub namespace: String,
    /// Fully qualified: `<name>.<namespace>.svc.cluster.local`.
    pub host: String,
    /// Where it came from: `file:line:column`.
    pub origin: String,
    /// In order: the first route whose match a call meets takes it. A call that meets none
    /// fails (UNAVAILABLE at a gRPC client), as in Istio, where no route means 404.
    pub http: Vec<HttpRoute>,
}

/// One `http` entry: any of its matches (none: every call) sends a call to its destinations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpRoute {
    pub name: String,
    /// Alternatives: a call meeting any of them takes the route. Empty: every call.
    pub matches: Vec<RouteMatch>,
    /// Weighted destinations (weights relative, at least one above 0).
    pub to: Vec<Destination>,
    /// The call's deadline at most (gRPC A31: `max_stream_duration`).
    pub timeout_ms: Option<u64>,
    /// Retries (gRPC A44).
    pub retries: Option<Retries>,
}

/// Istio's `retries`, as gRPC's client applies them: on status codes only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retries {
    /// Retries after the first attempt (gRPC makes at most 5 attempts in all).
    pub attempts: u32,
    /// gRPC status codes, as Envoy names them (`unavailable`, `cancelled`, ...).
    pub on: Vec<String>,
}

/// The status codes gRPC's client retries on (gRFC A44), by Envoy's names.
pub const GRPC_RETRY_ON: [&str; 5] = [
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// What meshfed retries on when `retryOn` is left out: the gRPC codes of Istio's default
/// (`connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`).
pub const DEFAULT_RETRY_ON: [&str; 2] = ["cancelled", "unavailable"];

/// All conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteMatch {
    /// On the request path (`/package.Service/Method` for gRPC).
    pub uri: Option<StringMatch>,
    /// Headers (lower case) that must be present and match.
    pub headers: Vec<(String, StringMatch)>,
    /// Headers that must not match: absent, or a value that does not match (served as one
    /// route per combination of the two, since an inverted matcher fails on an absent header).
    pub without_headers: Vec<(String, StringMatch)>,
    /// The route applies to this port of the host only.
    pub port: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// An RE2 regular expression, matched against the whole value.
    Regex(String),
}

/// A destination: the host's subset (empty: the whole host) on a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Destination {
    pub subset: String,
    /// The port of the host; `None` is the port the call was made to.
    pub port: Option<u32>,
    pub weight: u32,
}

impl Routes {
    /// The subsets the routes send calls to (each once).
    pub fn subsets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .http
            .iter()
            .flat_map(|r| r.to.iter())
            .map(|d| d.subset.as_str())
            .filter(|s| !s.is_empty())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The routes that apply to calls made to `port`, in order.
    pub fn for_port(&self, port: u32) -> impl Iterator<Item = (&HttpRoute, Vec<&RouteMatch>)> {
        self.http.iter().filter_map(move |r| {
            if r.matches.is_empty() {
                return Some((r, Vec::new()));
            }
            let ms: Vec<&RouteMatch> = r
                .matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == port))
                .collect();
            (!ms.is_empty()).then_some((r, ms))
        })
    }
}
