//! Running the xDS server: the generation builder (debounced), the plaintext and mTLS ports,
//! and the trust-roots file for file_watcher certificate providers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::generation::Generation;
use super::node::LocalFacts;
use super::server::{Ads, XdsState};
use super::XdsConfig;
use meshfed_model::policy::PolicySet;
use meshfed_model::snapshot::Snapshot;
use meshfed_model::store::Reader;
use meshfed_net::drain::Tasks;

#[derive(Debug)]
pub struct Served {
    pub state: Arc<XdsState>,
    pub plaintext: Option<SocketAddr>,
    pub mtls: Option<SocketAddr>,
}

/// Starts the builder and the listeners as tasks of `tasks` (the ports stop at its drain and
/// every ADS stream ends with UNAVAILABLE). `tls` is the server configuration of the mTLS
/// port.
pub async fn start(
    tasks: &Tasks,
    cfg: &XdsConfig,
    state: Arc<XdsState>,
    model: Reader,
    policies: watch::Receiver<Arc<PolicySet>>,
    tls: Option<rustls::ServerConfig>,
) -> anyhow::Result<Served> {
    // The first generation is built before the ports open, so no proxy sees an empty world; an
    // agent that cannot build one does not serve (proxies keep what they last had).
    // The receivers are taken before the first build, so a change that lands between it and
    // the loop's start is seen by the loop.
    let mut snaps = model.subscribe();
    let mut policies = policies;
    let snap = snaps.borrow_and_update().clone();
    let set = policies.borrow_and_update().clone();
    let builder: BuildFn = Arc::new(Generation::build);
    let first = build(&state, &builder, 1, snap, set)
        .await
        .ok_or_else(|| anyhow::anyhow!("building the first xDS generation failed (see the log)"))?;
    state.gens.send_replace(Arc::new(first));
    tasks.spawn(
        "xDS builder",
        build_loop(state.clone(), snaps, policies, cfg.debounce, builder),
    );
    let mut plaintext = None;
    if let Some(addr) = &cfg.plaintext {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (xDS plaintext)"))?;
        plaintext = Some(l.local_addr()?);
        let svc = Ads::server(state.clone(), false, tasks.signal());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        tasks.spawn_server("xDS plaintext server", |drain| async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, drain.drained_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "xDS plaintext server failed");
            }
        });
    }
    let mut mtls = None;
    if let (Some(addr), Some(tls)) = (&cfg.mtls, tls) {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (xDS mTLS)"))?;
        mtls = Some(l.local_addr()?);
        let svc = Ads::server(state.clone(), true, tasks.signal());
        let incoming = meshfed_net::tls_incoming(l, tls);
        tasks.spawn_server("xDS mTLS server", |drain| async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, drain.drained_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "xDS mTLS server failed");
            }
        });
    }
    Ok(Served {
        state,
        plaintext,
        mtls,
    })
}

/// Computes a generation from a snapshot and the policies.
type BuildFn = Arc<dyn Fn(u64, &Snapshot, &PolicySet, &LocalFacts) -> Generation + Send + Sync>;

/// Builds generation `version` on a blocking thread. `None` when the build failed (panicked):
/// the caller keeps the generation it serves.
async fn build(
    state: &Arc<XdsState>,
    builder: &BuildFn,
    version: u64,
    snap: Arc<Snapshot>,
    pol: Arc<PolicySet>,
) -> Option<Generation> {
    let local = state.local.clone();
    let f = builder.clone();
    let t = Instant::now();
    let g = match tokio::task::spawn_blocking(move || f(version, &snap, &pol, &local)).await {
        Ok(g) => g,
        Err(e) => {
            state.metrics.build_failures.inc();
            tracing::error!(version, error = %e, "building the xDS generation failed; the last good one stays in service");
            return None;
        }
    };
    state
        .metrics
        .build_seconds
        .with_label_values(&["generation"])
        .observe(t.elapsed().as_secs_f64());
    state.metrics.generation.set(version as i64);
    Some(g)
}

/// Builds a generation after every change the receivers have not seen (generation 1 was built
/// from what they had seen).
async fn build_loop(
    state: Arc<XdsState>,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    mut policies: watch::Receiver<Arc<PolicySet>>,
    debounce: Duration,
    builder: BuildFn,
) {
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
        if let Some(g) = build(&state, &builder, version, snap, pol).await {
            tracing::debug!(version, "new xDS generation");
            state.gens.send_replace(Arc::new(g));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A build that panics (a bug in a generator, an input nobody foresaw) leaves the last good
    /// generation in service: no proxy is ever sent an empty configuration because of it.
    #[tokio::test]
    async fn a_failed_build_keeps_the_last_good_generation() {
        let state = XdsState::new(LocalFacts::default(), &prometheus::Registry::new());
        let (local, _fed, reader) = meshfed_model::store::new(Snapshot::default());
        let svc = |port: u32| {
            let mut e = proto::ServiceExport {
                namespace: "shop".into(),
                name: "payment".into(),
                ..Default::default()
            };
            e.ports.push(proto::Port {
                name: "grpc".into(),
                port,
                protocol: "TCP".into(),
                ..Default::default()
            });
            [("shop/payment".to_string(), e)].into()
        };
        local.set_local(svc(8080));
        let builder: BuildFn = Arc::new(|v, snap: &Snapshot, pol: &PolicySet, l: &LocalFacts| {
            if snap
                .local
                .values()
                .any(|e| e.ports.iter().any(|p| p.port == 6666))
            {
                panic!("a generator bug");
            }
            Generation::build(v, snap, pol, l)
        });
        let pols = watch::Sender::new(Arc::new(PolicySet::default()));
        let (mut snaps, mut pol_rx) = (reader.subscribe(), pols.subscribe());
        let (snap, set) = (
            snaps.borrow_and_update().clone(),
            pol_rx.borrow_and_update().clone(),
        );
        let first = build(&state, &builder, 1, snap, set).await.unwrap();
        assert!(!first.clusters_grpc.is_empty());
        state.gens.send_replace(Arc::new(first));
        let mut gens = state.gens.subscribe();
        gens.borrow_and_update();
        tokio::spawn(build_loop(
            state.clone(),
            snaps,
            pol_rx,
            Duration::ZERO,
            builder,
        ));
        // The panicking input: no new generation is published, and the failure is counted.
        local.set_local(svc(6666));
        let mut failures = 0;
        while failures == 0 {
            tokio::task::yield_now().await;
            failures = state.metrics.build_failures.get();
        }
        assert!(!gens.has_changed().unwrap());
        assert_eq!(state.current().version, 1);
        assert!(!state.current().clusters_grpc.is_empty());
        // A good input again: generation 3 is served.
        local.set_local(svc(9090));
        gens.changed().await.unwrap();
        assert_eq!(state.current().version, 3);
    }
}
