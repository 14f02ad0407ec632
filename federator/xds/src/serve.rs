//! Running the xDS server: the generation builder (debounced), the plaintext and mTLS ports,
//! and the trust-roots file for file_watcher certificate providers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::generation::Generation;
use super::server::{Ads, XdsState};
use super::XdsConfig;
use meshfed_model::policy::PolicySet;
use meshfed_model::snapshot::Snapshot;
use meshfed_model::store::Reader;

#[derive(Debug)]
pub struct Served {
    pub state: Arc<XdsState>,
    pub plaintext: Option<SocketAddr>,
    pub mtls: Option<SocketAddr>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts the builder and the listeners. `tls` is the server configuration of the mTLS port.
pub async fn start(
    cfg: &XdsConfig,
    state: Arc<XdsState>,
    model: Reader,
    policies: watch::Receiver<Arc<PolicySet>>,
    tls: Option<rustls::ServerConfig>,
) -> anyhow::Result<Served> {
    let mut tasks = Vec::new();
    // The first generation is built before the ports open, so no proxy sees an empty world.
    let set = policies.borrow().clone();
    let first = build(&state, 1, model.current(), set).await;
    state.gens.send_replace(Arc::new(first));
    tasks.push(tokio::spawn(build_loop(
        state.clone(),
        model,
        policies,
        cfg.debounce,
    )));
    let mut plaintext = None;
    if let Some(addr) = &cfg.plaintext {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (xDS plaintext)"))?;
        plaintext = Some(l.local_addr()?);
        let svc = Ads::server(state.clone(), false);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "xDS plaintext server failed");
            }
        }));
    }
    let mut mtls = None;
    if let (Some(addr), Some(tls)) = (&cfg.mtls, tls) {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (xDS mTLS)"))?;
        mtls = Some(l.local_addr()?);
        let svc = Ads::server(state.clone(), true);
        let incoming = meshfed_net::tls_incoming(l, tls);
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "xDS mTLS server failed");
            }
        }));
    }
    Ok(Served {
        state,
        plaintext,
        mtls,
        tasks,
    })
}

async fn build(
    state: &Arc<XdsState>,
    version: u64,
    snap: Arc<Snapshot>,
    pol: Arc<PolicySet>,
) -> Generation {
    let local = state.local.clone();
    let t = Instant::now();
    let g =
        match tokio::task::spawn_blocking(move || Generation::build(version, &snap, &pol, &local))
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "building the xDS generation failed");
                Generation::empty(&state.local)
            }
        };
    state
        .metrics
        .build_seconds
        .with_label_values(&["generation"])
        .observe(t.elapsed().as_secs_f64());
    state.metrics.generation.set(version as i64);
    g
}

async fn build_loop(
    state: Arc<XdsState>,
    model: Reader,
    mut policies: watch::Receiver<Arc<PolicySet>>,
    debounce: Duration,
) {
    let mut snaps = model.subscribe();
    snaps.borrow_and_update();
    policies.borrow_and_update();
    let mut version = 1u64;
    loop {
        tokio::select! {
            r = snaps.changed() => if r.is_err() { return },
            r = policies.changed() => if r.is_err() { return },
        }
        // Coalesce: everything that changes within the window goes out in one push.
        tokio::time::sleep(debounce).await;
        let snap = snaps.borrow_and_update().clone();
        let pol = policies.borrow_and_update().clone();
        version += 1;
        let g = build(&state, version, snap, pol).await;
        tracing::debug!(version, "new xDS generation");
        state.gens.send_replace(Arc::new(g));
    }
}

/// Keeps `path` holding the PEM roots of every trust domain the cluster trusts: its own and
/// each peer bundle received through the federation.
pub async fn write_trust_roots(
    path: PathBuf,
    own_td: String,
    own_bundle: watch::Receiver<String>,
    model: Reader,
) {
    let mut own = own_bundle;
    let mut snaps = model.subscribe();
    let mut last = String::new();
    loop {
        let mut pem = String::new();
        let snap = snaps.borrow_and_update().clone();
        for (td, roots) in
            meshfed_model::snapshot::trust_roots(&own_td, &own.borrow_and_update(), &snap)
        {
            pem.push_str(&format!("# {td}\n"));
            pem.push_str(&trust::keys::certs_to_pem(roots.iter()));
        }
        if pem != last {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match trust::files::write_atomic(&path, pem.as_bytes(), 0o644) {
                Ok(()) => last = pem,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the trust roots")
                }
            }
        }
        tokio::select! {
            r = own.changed() => if r.is_err() { return },
            r = snaps.changed() => if r.is_err() { return },
        }
    }
}
