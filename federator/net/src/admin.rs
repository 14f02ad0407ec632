//! The admin HTTP endpoint shared by the federator and the agent: `/metrics` (Prometheus text),
//! `/healthz` (every task of the process runs), `/readyz` (every readiness condition holds and
//! the process is not draining) and `/status` (JSON), plus the agent's `/debug/...`.
//!
//! The admin address is for operators (loopback by default). An optional probe listener
//! (`--probe`) serves only `/healthz`, `/readyz` and `/metrics`: what kubelet probes and a
//! Prometheus scrape need on the pod IP, without `/status` or `/debug/config_dump`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::drain::Tasks;

pub type RegistryFn = Arc<dyn Fn() -> prometheus::Registry + Send + Sync>;
pub type StatusFn = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

#[derive(Clone)]
struct Admin {
    registry: RegistryFn,
    status: StatusFn,
    tasks: Tasks,
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&(a.registry)()),
    )
}

/// 200 while every task of the process runs; 503 naming each task that ended early.
async fn healthz(State(a): State<Admin>) -> impl IntoResponse {
    match a.tasks.health() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {e}\n")),
    }
}

/// 200 when every readiness condition holds and the process is not draining.
async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    match a.tasks.readiness_report() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
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

/// What an admin server shows.
#[derive(Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub registry: RegistryFn,
    pub status: StatusFn,
    /// More routes (the agent's `/debug/...` xDS endpoints).
    pub extra: Option<Router>,
    /// The dashboard page served at `/ui/`, and what its event stream (`/ui/events`) sends;
    /// `None`: no dashboard.
    pub ui: Option<(&'static str, StatusFn)>,
    /// A second listener with `/healthz`, `/readyz` and `/metrics` only.
    pub probe: Option<SocketAddr>,
}

/// Where the admin server (and its probe listener) listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddrs {
    pub admin: SocketAddr,
    pub probe: Option<SocketAddr>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Binds the admin address and serves `/metrics`, `/healthz` and `/readyz` (from `tasks`),
/// `/status` and the extra routes, as the process's admin task: it keeps answering during
/// the drain and stops after everything else. The probe listener, if any, serves the first
/// three only. Returns the bound addresses.
pub async fn serve(tasks: &Tasks, cfg: AdminConfig) -> anyhow::Result<AdminAddrs> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", cfg.addr))?;
    let probe_listener = match cfg.probe {
        Some(p) => Some(
            tokio::net::TcpListener::bind(p)
                .await
                .with_context(|| format!("cannot listen on {p} (probe)"))?,
        ),
        None => None,
    };
    let bound = AdminAddrs {
        admin: listener.local_addr()?,
        probe: match &probe_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        },
    };
    let state = Admin {
        registry: cfg.registry,
        status: cfg.status,
        tasks: tasks.clone(),
    };
    let probes = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let app = probes
        .clone()
        .route("/status", get(status))
        .with_state(state.clone());
    let app = match cfg.extra {
        Some(r) => app.merge(r),
        None => app,
    };
    let app = match cfg.ui {
        Some((page, feed)) => app.merge(crate::dashboard::routes(page, feed)),
        None => app,
    };
    tasks.spawn_admin("admin server", move |stop| async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.drained_owned())
            .await
        {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    if let Some(l) = probe_listener {
        let app = probes.with_state(state);
        tasks.spawn_admin("probe server", move |stop| async move {
            if let Err(e) = axum::serve(l, app)
                .with_graceful_shutdown(stop.drained_owned())
                .await
            {
                tracing::error!(error = %e, "probe server failed");
            }
        });
    }
    Ok(bound)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The probe listener answers health, readiness and metrics, and nothing an operator's
    /// admin address has (`/status`, extra `/debug/...` routes); the admin address has all.
    #[tokio::test]
    async fn the_probe_listener_serves_probes_and_metrics_only() {
        let tasks = Tasks::new();
        let reg = prometheus::Registry::new();
        let c = prometheus::IntCounter::new("meshfed_test_total", "a test counter").unwrap();
        reg.register(Box::new(c.clone())).unwrap();
        c.inc();
        let addrs = serve(
            &tasks,
            AdminConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                registry: Arc::new(move || reg.clone()),
                status: Arc::new(|| Ok(serde_json::json!({"kind": "test"}))),
                extra: Some(Router::new().route("/debug/config_dump", get(|| async { "dump" }))),
                ui: None,
                probe: Some("127.0.0.1:0".parse().unwrap()),
            },
        )
        .await
        .unwrap();
        let (admin, probe) = (addrs.admin.to_string(), addrs.probe.unwrap().to_string());
        assert_ne!(admin, probe);
        for path in ["/healthz", "/readyz"] {
            assert!(fetch_text(&probe, path).await.is_ok(), "{path}");
            assert!(fetch_text(&admin, path).await.is_ok(), "{path}");
        }
        assert!(fetch_text(&probe, "/metrics")
            .await
            .unwrap()
            .contains("meshfed_test_total 1"));
        for path in ["/status", "/debug/config_dump"] {
            let e = fetch_text(&probe, path).await.unwrap_err().to_string();
            assert!(e.contains("404"), "{path}: {e}");
            assert!(fetch_text(&admin, path).await.is_ok(), "{path}");
        }
    }
}
