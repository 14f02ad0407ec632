//! The agent's xDS debug endpoints (what `meshfed proxy-status` and `proxy-config` read):
//! `/debug/syncz` (per proxy and type: SYNCED, STALE or NACK, with versions) and
//! `/debug/config_dump?proxy=ID[&type=listener|route|cluster|endpoint|secret]` (private keys
//! redacted).

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
        .with_state(state)
}
