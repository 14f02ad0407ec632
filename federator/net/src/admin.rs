//! The admin HTTP endpoint shared by the federator and the agent: `/metrics` (Prometheus text),
//! `/healthz` (the process serves), `/readyz` (the status can be computed) and `/status` (JSON).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

pub type RegistryFn = Arc<dyn Fn() -> prometheus::Registry + Send + Sync>;
pub type StatusFn = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

#[derive(Clone)]
struct Admin {
    registry: RegistryFn,
    status: StatusFn,
    /// Readiness, when it differs from "the status can be computed".
    ready: Option<StatusFn>,
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&(a.registry)()),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    let status = a.ready.clone().unwrap_or_else(|| a.status.clone());
    match tokio::task::spawn_blocking(move || status()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn status(State(a): State<Admin>) -> impl IntoResponse {
    let status = a.status.clone();
    match tokio::task::spawn_blocking(move || status()).await {
        Ok(Ok(v)) => (StatusCode::OK, axum::Json(v)).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Binds `addr` and serves the admin endpoints. Returns the bound address and the task.
pub async fn serve(
    addr: &str,
    registry: RegistryFn,
    status_fn: StatusFn,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, registry, status_fn, None, None).await
}

/// Like [`serve`], with more routes (the agent's `/debug/...` xDS endpoints).
pub async fn serve_with(
    addr: &str,
    registry: RegistryFn,
    status_fn: StatusFn,
    extra: Option<Router>,
    ready: Option<StatusFn>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (admin)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(Admin {
            registry,
            status: status_fn,
            ready,
        });
    let app = match extra {
        Some(r) => app.merge(r),
        None => app,
    };
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok((bound, task))
}

/// Fetches `/status` from an admin address (used by `meshfed status`).
pub async fn fetch_status(addr: &str) -> anyhow::Result<serde_json::Value> {
    fetch_json(addr, "/status").await
}

/// Fetches a JSON document from an admin address.
pub async fn fetch_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let body = fetch(addr, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("{addr}{path} did not return JSON"))
}

/// Fetches a text document (`/metrics`) from an admin address.
pub async fn fetch_text(addr: &str, path: &str) -> anyhow::Result<String> {
    let body = fetch(addr, path).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn fetch(addr: &str, path: &str) -> anyhow::Result<bytes::Bytes> {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .with_context(|| format!("{addr:?} is not host:port"))?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .with_context(|| format!("the admin endpoint {addr} did not answer in 10 s"))?
        .with_context(|| format!("cannot reach the admin endpoint {addr}"))?;
    let code = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        code.is_success(),
        "{addr}{path} answered {code}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    Ok(body)
}
