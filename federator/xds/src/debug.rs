//! The agent's xDS debug endpoints (what `meshfed proxy-status` and `proxy-config` read):
//! `/debug/syncz` (per proxy and type: SYNCED, STALE or NACK, with versions) and
//! `/debug/config_dump?proxy=ID[&type=listener|route|cluster|endpoint|secret]` (private keys
//! redacted); for the cluster's dashboard, `/ui/services` and `/ui/failover` (the what-if
//! failover table).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::server::XdsState;
use super::Kind;

#[derive(Debug, serde::Deserialize)]
struct DumpQuery {
    proxy: String,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn syncz(State(s): State<Arc<XdsState>>) -> impl IntoResponse {
    Json(s.proxies.report())
}

async fn config_dump(
    State(s): State<Arc<XdsState>>,
    Query(q): Query<DumpQuery>,
) -> axum::response::Response {
    let kind = match q.kind.as_deref() {
        None | Some("") | Some("all") => None,
        Some(k) => match Kind::from_short(k) {
            Some(k) => Some(k),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("type {k:?} is not one of listener, route, cluster, endpoint, secret"),
                )
                    .into_response()
            }
        },
    };
    let dump = tokio::task::spawn_blocking(move || s.proxies.config_dump(&q.proxy, kind)).await;
    match dump {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => (StatusCode::NOT_FOUND, e).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub fn router(state: Arc<XdsState>) -> Router {
    Router::new()
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/ui/services", get(services))
        .route("/ui/failover", get(failover))
        .with_state(state)
}

/// The service ports a what-if can be asked for (`/ui/services`).
async fn services(State(s): State<Arc<XdsState>>) -> impl IntoResponse {
    let g = s.current();
    let mut out: Vec<serde_json::Value> = g
        .ports
        .values()
        .map(|sp| {
            serde_json::json!({
                "service": &*sp.cluster, "host": sp.host, "port": sp.port,
                "policy": sp.policy.is_some(),
                "clusters": sp.endpoints.iter().map(|e| e.cluster.clone())
                    .collect::<std::collections::BTreeSet<_>>(),
            })
        })
        .collect();
    out.sort_by(|a, b| a["service"].as_str().cmp(&b["service"].as_str()));
    Json(out)
}

#[derive(Debug, serde::Deserialize)]
struct WhatIf {
    /// The service port (its cluster name, as `/ui/services` lists it).
    service: Option<String>,
    /// The proxy's locality, `region/zone[/subzone]` (default: this cluster's).
    locality: Option<String>,
    /// The proxy's network (default: this cluster's).
    network: Option<String>,
    /// Clusters taken as stale, comma-separated.
    #[serde(default)]
    failed: String,
    /// Locality patterns whose endpoints are taken as unhealthy, comma-separated.
    #[serde(default)]
    down: String,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

fn refuse(code: StatusCode, msg: String) -> axum::response::Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

/// `/ui/failover`: the table a sidecar at a locality would be pushed for a service, as things
/// are or with clusters failed and localities down (what `meshfed policy check` computes, from
/// this agent's live endpoints and policies). The answer carries its inputs in `policy check`'s
/// endpoints-file form, so the two can be compared.
async fn failover(
    State(s): State<Arc<XdsState>>,
    q: Result<Query<WhatIf>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "the query does not parse".into());
    };
    let Some(service) = q.service.filter(|x| !x.is_empty()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "name a service port: ?service=<cluster name from /ui/services>".into(),
        );
    };
    let g = s.current();
    let locality = match q.locality.as_deref().filter(|l| !l.is_empty()) {
        None => g.local.locality.clone(),
        Some(l) => match meshfed_failover::Loc::parse(l) {
            Ok(l) => l,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("locality {l:?}: {e}")),
        },
    };
    let network = q
        .network
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| g.local.network.clone());
    let proxy = meshfed_failover::ProxyIn {
        locality: locality.clone(),
        labels: Default::default(),
        cluster: g.local.cluster.clone(),
        network: Some(network.clone()),
    };
    let (failed, down) = (list(&q.failed), list(&q.down));
    let Some(t) = g.what_if(&service, &proxy, &failed, &down) else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no service port {service:?} in this cluster's xDS (see /ui/services)"),
        );
    };
    let sp = &g.ports[service.as_str()];
    let endpoints: Vec<serde_json::Value> = sp
        .endpoints
        .iter()
        .map(|e| {
            serde_json::json!({
                "address": e.address, "locality": e.locality.to_string(), "labels": e.labels,
                "weight": e.weight, "cluster": e.cluster, "network": e.network,
                "healthy": e.healthy && !down.iter().any(|d| e.locality.matches(d)),
                "stale": e.stale || failed.contains(&e.cluster),
            })
        })
        .collect();
    Json(serde_json::json!({
        "service": service,
        "host": sp.host,
        "proxy": {"locality": locality.to_string(), "network": network, "cluster": g.local.cluster},
        "failed": failed,
        "down": down,
        "rows": t.rows.iter().map(|r| serde_json::json!({
            "priority": r.priority, "locality": r.locality.to_string(), "weight": r.weight,
            "endpoints": r.endpoints,
        })).collect::<Vec<_>>(),
        "notes": t.notes,
        "inputs": {"endpoints": endpoints, "gateways": g.gateways},
    }))
    .into_response()
}
