//! Running the xDS server: the generation builder (debounced), the plaintext and mTLS ports,
//! and the trust files for file_watcher certificate providers (a SPIFFE bundle map, the own
//! domain's roots, one roots file per trust domain).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::generation::Generation;
use super::node::LocalFacts;
use super::server::{Ads, Sds, XdsState};
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

/// The mTLS port's TLS: the agent's serving SVID; a client certificate, when one is presented,
/// verified against the cluster's bundle (live) and required to belong to its trust domain. A
/// client may connect without one: ADS and SDS then refuse it (`UNAUTHENTICATED`), and the
/// CA API served beside them takes a service-account token instead (as istiod's 15012 does).
pub fn mtls_server_config(
    own: trust::TrustStore,
    td: &trust::TrustDomain,
    resolver: Arc<trust::tls::SvidResolver>,
) -> anyhow::Result<rustls::ServerConfig> {
    let verifier =
        trust::tls::SpiffeVerifier::new(own, trust::tls::Authorizer::trust_domain(td.clone()));
    let mut tls = trust::tls::server_config_optional_client(resolver, verifier)?;
    tls.alpn_protocols = vec![meshfed_net::ALPN_H2.to_vec()];
    Ok(tls)
}

/// Adds gRPC services to a port's routes.
pub type AddRoutes = Box<dyn FnOnce(tonic::service::Routes) -> tonic::service::Routes + Send>;

/// Starts the builder and the listeners as tasks of `tasks` (the ports stop at its drain and
/// every ADS stream ends with UNAVAILABLE). `tls` is the server configuration of the mTLS
/// port (see [`mtls_server_config`]); `mtls_extra`, gRPC services served on it beside ADS and
/// SDS (the agent's CA API).
pub async fn start(
    tasks: &Tasks,
    cfg: &XdsConfig,
    state: Arc<XdsState>,
    model: Reader,
    policies: watch::Receiver<Arc<PolicySet>>,
    tls: Option<rustls::ServerConfig>,
    mtls_extra: Option<AddRoutes>,
) -> anyhow::Result<Served> {
    // The first generation is built before the ports open, so no proxy sees an empty world; an
    // agent that cannot build one does not serve (proxies keep what they last had).
    // The receivers are taken before the first build, so a change that lands between it and
    // the loop's start is seen by the loop.
    let mut snaps = model.subscribe();
    let mut policies = policies;
    let snap = snaps.borrow_and_update().clone();
    let set = policies.borrow_and_update().clone();
    let builder: BuildFn = Arc::new(Generation::build_after);
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
        let sds = Sds::server(state.clone(), false, tasks.signal());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        tasks.spawn_server("xDS plaintext server", |drain| async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .add_service(sds)
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
        let sds = Sds::server(state.clone(), true, tasks.signal());
        let mut routes = tonic::service::Routes::new(svc).add_service(sds);
        if let Some(add) = mtls_extra {
            routes = add(routes);
        }
        let incoming = meshfed_net::tls_incoming(l, tls);
        tasks.spawn_server("xDS mTLS server", |drain| async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_routes(routes)
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

/// Computes a generation from a snapshot and the policies (taking over what did not change
/// from the previous one).
type BuildFn = Arc<
    dyn Fn(Option<&Generation>, u64, &Snapshot, &PolicySet, &LocalFacts) -> Generation
        + Send
        + Sync,
>;

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
    let prev = state.current();
    let t = Instant::now();
    let g = match tokio::task::spawn_blocking(move || {
        let g = f(Some(&prev), version, &snap, &pol, &local);
        g.reuse_tables(&prev);
        // The previous generation is dropped here, off the async workers, unless a stream
        // still holds it.
        drop(prev);
        g
    })
    .await
    {
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

/// What the agent writes for its proxies' certificate providers, under `<state>/xds/`.
pub const BUNDLE_MAP_FILE: &str = "spiffe-bundle-map.json";
/// The PEM roots of the cluster's own trust domain only: the `ca_certificate_file` a gRPC
/// client falls back to when it does not read the bundle map, so that a client without SPIFFE
/// support fails closed on other trust domains instead of trusting a pool.
pub const OWN_ROOTS_FILE: &str = "trust-roots.pem";
/// One PEM file per trust domain (`roots/<trust domain>.pem`), for tools that take one CA file
/// per peer.
pub const ROOTS_DIR: &str = "roots";

/// The SPIFFE bundle map (gRFC A87) of the cluster's own trust domain and every peer bundle:
/// `{"trust_domains": {"<td>": <SPIFFE bundle>}}`. A client that reads it verifies a peer only
/// against the bundle of the peer SVID's own trust domain.
pub fn bundle_map(own_td: &str, own_json: &str, snap: &Snapshot) -> serde_json::Value {
    meshfed_model::snapshot::bundle_map_document(&meshfed_model::snapshot::bundles_by_trust_domain(
        own_td, own_json, snap,
    ))
}

/// Keeps the trust files of `dir` current: the bundle map, the own-domain roots and one roots
/// file per trust domain. Every write is atomic; nothing is written when nothing changed.
pub async fn write_trust_files(
    dir: PathBuf,
    own_td: String,
    own_bundle: watch::Receiver<String>,
    model: Reader,
) {
    let mut own = own_bundle;
    let mut snaps = model.subscribe();
    let mut last: Option<(String, Vec<(String, String)>)> = None;
    loop {
        let snap = snaps.borrow_and_update().clone();
        let own_json = own.borrow_and_update().clone();
        let map = serde_json::to_string_pretty(&bundle_map(&own_td, &own_json, &snap))
            .unwrap_or_default();
        let per_td: Vec<(String, String)> =
            meshfed_model::snapshot::trust_roots(&own_td, &own_json, &snap)
                .into_iter()
                .map(|(td, roots)| (td, trust::keys::certs_to_pem(roots.iter())))
                .collect();
        let now = (map, per_td);
        if last.as_ref() != Some(&now) {
            match write_trust(&dir, &own_td, &now.0, &now.1) {
                Ok(()) => last = Some(now),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the trust files")
                }
            }
        }
        tokio::select! {
            r = own.changed() => if r.is_err() { return },
            r = snaps.changed() => if r.is_err() { return },
        }
    }
}

fn write_trust(
    dir: &std::path::Path,
    own_td: &str,
    map: &str,
    per_td: &[(String, String)],
) -> anyhow::Result<()> {
    let roots = dir.join(ROOTS_DIR);
    std::fs::create_dir_all(&roots)
        .with_context(|| format!("cannot create {}", roots.display()))?;
    for (td, pem) in per_td {
        trust::files::write_atomic(&roots.join(format!("{td}.pem")), pem.as_bytes(), 0o644)?;
    }
    // Domains no longer trusted lose their file.
    for e in std::fs::read_dir(&roots)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(td) = name.strip_suffix(".pem") {
            if !per_td.iter().any(|(t, _)| t == td) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let own = per_td
        .iter()
        .find(|(t, _)| t == own_td)
        .map(|(_, p)| p.as_str())
        .unwrap_or_default();
    trust::files::write_atomic(&dir.join(OWN_ROOTS_FILE), own.as_bytes(), 0o644)?;
    // The map last: a client that sees it finds the roots files in place too.
    trust::files::write_atomic(&dir.join(BUNDLE_MAP_FILE), map.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_json(td: &str) -> String {
        let ca = trust::CertificateAuthority::create(
            trust::TrustDomain::new(td).unwrap(),
            trust::ca::CaOptions::default(),
        )
        .unwrap();
        ca.bundle().to_json().unwrap()
    }

    /// The trust files: a bundle map with one entry per trust domain (a bundle that does not
    /// parse is left out), the own domain's roots alone in the fallback file, one roots file
    /// per domain, and a domain no longer trusted loses its file.
    #[tokio::test]
    async fn trust_files_keep_trust_domains_apart() {
        let d = tempfile::tempdir().unwrap();
        let (east, west) = (bundle_json("east.mesh"), bundle_json("west.mesh"));
        let mut snap = Snapshot::default();
        snap.bundles.insert("west.mesh".into(), west.clone());
        snap.bundles
            .insert("bad.mesh".into(), "{\"keys\": 3}".into());
        let (_l, fed, reader) = meshfed_model::store::new(snap);
        let (_own_tx, own_rx) = watch::channel(east.clone());
        tokio::spawn(write_trust_files(
            d.path().to_path_buf(),
            "east.mesh".into(),
            own_rx,
            reader,
        ));
        let map_path = d.path().join(BUNDLE_MAP_FILE);
        let read_map = || -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(&map_path).unwrap_or_default())
                .unwrap_or_default()
        };
        while read_map()["trust_domains"].as_object().is_none() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let map = read_map();
        let domains = map["trust_domains"].as_object().unwrap();
        assert_eq!(
            domains.keys().collect::<Vec<_>>(),
            vec!["east.mesh", "west.mesh"]
        );
        let parsed: serde_json::Value = serde_json::from_str(&west).unwrap();
        assert_eq!(domains["west.mesh"], parsed);
        let own = std::fs::read_to_string(d.path().join(OWN_ROOTS_FILE)).unwrap();
        let east_pem = std::fs::read_to_string(d.path().join("roots/east.mesh.pem")).unwrap();
        let west_pem = std::fs::read_to_string(d.path().join("roots/west.mesh.pem")).unwrap();
        assert_eq!(own, east_pem);
        assert!(!own.contains(west_pem.trim()) && !west_pem.is_empty());
        // west leaves: its roots file goes, the map follows.
        fed.update(|i| i.bundles.clear());
        while d.path().join("roots/west.mesh.pem").exists() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(read_map()["trust_domains"].as_object().unwrap().len(), 1);
    }

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
            [("shop/payment".to_string(), Arc::new(e))].into()
        };
        local.set_local(svc(8080), Default::default());
        let builder: BuildFn = Arc::new(
            |prev: Option<&Generation>, v, snap: &Snapshot, pol: &PolicySet, l: &LocalFacts| {
                if snap
                    .local
                    .values()
                    .any(|e| e.ports.iter().any(|p| p.port == 6666))
                {
                    panic!("a generator bug");
                }
                Generation::build_after(prev, v, snap, pol, l)
            },
        );
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
        local.set_local(svc(6666), Default::default());
        let mut failures = 0;
        while failures == 0 {
            tokio::task::yield_now().await;
            failures = state.metrics.build_failures.get();
        }
        assert!(!gens.has_changed().unwrap());
        assert_eq!(state.current().version, 1);
        assert!(!state.current().clusters_grpc.is_empty());
        // A good input again: generation 3 is served.
        local.set_local(svc(9090), Default::default());
        gens.changed().await.unwrap();
        assert_eq!(state.current().version, 3);
    }
}
