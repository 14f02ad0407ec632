//! The injection webhook on the agent (`--injection-webhook`): HTTPS with the agent's serving
//! certificate (its Service's DNS names), `POST /inject` answering the API server's
//! AdmissionReviews (`meshfed_kube::inject`), and the leader keeping the
//! MutatingWebhookConfiguration's `caBundle` equal to the cluster's roots.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use tokio::sync::watch;
use trust::TrustDomain;

use meshfed_kube::inject::{BundleSync, Injection};
use meshfed_net::drain::Tasks;

/// `--injection-*`.
#[derive(Debug, Clone)]
pub struct InjectionConfig {
    pub listen: SocketAddr,
    /// The image of the injected containers (meshfed's own).
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle the leader keeps.
    pub webhook_config: String,
    /// The agent's mTLS xDS address as pods reach it.
    pub agent_address: String,
    /// The agent's namespace (never injected).
    pub agent_namespace: String,
}

/// The cluster's roots, PEM, from its bundle JSON (empty when it does not parse).
fn roots_pem(td: &TrustDomain, bundle_json: &str) -> String {
    match trust::TrustBundle::from_json(td.clone(), bundle_json, "the cluster's bundle") {
        Ok(b) => trust::keys::certs_to_pem(b.x509_authorities.iter()),
        Err(e) => {
            tracing::warn!(error = %e, "the cluster's bundle does not parse; no roots to inject");
            String::new()
        }
    }
}

#[derive(Clone)]
struct WebhookState {
    base: Arc<Injection>,
    td: TrustDomain,
    bundle: watch::Receiver<String>,
    workloads: meshfed_kube::source::Workloads,
}

async fn inject(State(s): State<WebhookState>, body: Bytes) -> impl IntoResponse {
    let mut inj = (*s.base).clone();
    inj.roots_pem = roots_pem(&s.td, &s.bundle.borrow());
    let (code, v) =
        meshfed_kube::inject::review(&body, &inj, |ns| s.workloads.namespace_labels(ns));
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        Json(v),
    )
}

/// Serves the webhook (`base`: what is injected, without the roots, which are read at each
/// review); returns the bound address.
pub async fn serve(
    tasks: &Tasks,
    listen: SocketAddr,
    base: Injection,
    tls: rustls::ServerConfig,
    td: TrustDomain,
    bundle: watch::Receiver<String>,
    workloads: meshfed_kube::source::Workloads,
) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/inject", post(inject))
        .with_state(WebhookState {
            base: Arc::new(base),
            td,
            bundle,
            workloads,
        });
    meshfed_net::https::serve(tasks, "injection webhook", listen, tls, app).await
}

/// While this replica leads: the configuration's caBundle follows the cluster's roots (at
/// every change, and every minute against edits by others); a configuration not applied yet
/// is looked for every 5 s, and a failed write is retried after 5 s.
pub async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    td: TrustDomain,
    mut bundle: watch::Receiver<String>,
    mut leadership: watch::Receiver<meshfed_kube::leader::Leadership>,
) {
    let mut missing_said = false;
    loop {
        if leadership.wait_for(|l| l.leader).await.is_err() {
            return;
        }
        let pem = roots_pem(&td, &bundle.borrow_and_update());
        let wait = if pem.is_empty() {
            Duration::from_secs(5)
        } else {
            match meshfed_kube::inject::sync_ca_bundle(client.clone(), &name, &pem).await {
                Ok(BundleSync::Updated(n)) => {
                    missing_said = false;
                    tracing::info!(config = %name, webhooks = n, "injection webhook caBundle set to the cluster's roots");
                    Duration::from_secs(60)
                }
                Ok(BundleSync::Unchanged) => {
                    missing_said = false;
                    Duration::from_secs(60)
                }
                Ok(BundleSync::Missing) => {
                    if !missing_said {
                        tracing::warn!(config = %name, "no MutatingWebhookConfiguration of this name: the API server will not call the injection webhook until it is applied");
                        missing_said = true;
                    }
                    // Looked for again soon: an operator applying it expects injection to work.
                    Duration::from_secs(5)
                }
                Err(e) => {
                    tracing::warn!(config = %name, error = %e, "cannot set the injection webhook's caBundle; retrying in 5 s");
                    Duration::from_secs(5)
                }
            }
        };
        tokio::select! {
            r = bundle.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
