//! What the gateway's integration tests share: a gateway serving given routes, and the
//! ClientHello an Istio sidecar sends.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use eastwest_gateway::proxy::{Gateway, GatewayConfig};
use eastwest_gateway::routes::Routes;
use tokio::sync::watch;

pub const HOST: &str = "reviews.shop.svc.cluster.local";

/// A started gateway: its address, the gateway, the routes' and the stop senders, and its
/// metrics registry.
pub type Started = (
    SocketAddr,
    Arc<Gateway>,
    watch::Sender<Arc<Routes>>,
    watch::Sender<bool>,
    prometheus::Registry,
);

/// The bytes the gateway counted, both directions, every service.
pub fn forwarded_bytes(reg: &prometheus::Registry) -> f64 {
    reg.gather()
        .iter()
        .filter(|f| f.name() == "meshfed_gateway_bytes_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// A gateway serving `routes` on a loopback port: its address, the gateway, the routes' and
/// the stop senders, and its metrics registry.
pub async fn gateway(routes: Routes, cfg: GatewayConfig) -> Started {
    let (tx, rx) = watch::channel(Arc::new(routes));
    let reg = prometheus::Registry::new();
    let gw = Gateway::new(cfg, rx, &reg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(gw.clone().serve(l, stop_rx));
    (addr, gw, tx, stop_tx, reg)
}

/// A gateway with one route, `outbound|9080||HOST` to `be`.
pub async fn gateway_to(be: SocketAddr, cfg: GatewayConfig) -> Started {
    let routes = Routes::from_clusters([(format!("outbound|9080||{HOST}").as_str(), vec![be])]);
    gateway(routes, cfg).await
}

/// The ClientHello of an Istio sidecar calling `HOST` on port 9080: SNI
/// `outbound_.9080_._.HOST` and ALPN `istio`.
pub fn istio_hello() -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"istio".to_vec()];
    let mut c = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls_pki_types::ServerName::try_from(format!("outbound_.9080_._.{HOST}")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}
