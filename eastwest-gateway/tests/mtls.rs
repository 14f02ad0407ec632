//! mTLS between rustls workloads of two trust domains, through the gateway: the handshake
//! completes end to end, each side verifies the other's SPIFFE ID against its own trust
//! domain's bundle, and the gateway holds no key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use eastwest_gateway::proxy::{Gateway, GatewayConfig};
use eastwest_gateway::routes::Routes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trust::ca::policy::AnyWorkload;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CaOptions, CertificateAuthority, SpiffeId, TrustDomain, TrustStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_mtls_across_trust_domains_through_the_gateway() {
    let east_td = TrustDomain::new("east.mesh").unwrap();
    let west_td = TrustDomain::new("west.mesh").unwrap();
    let east = CertificateAuthority::create(east_td.clone(), CaOptions::default()).unwrap();
    let west = CertificateAuthority::create(west_td.clone(), CaOptions::default()).unwrap();
    let client_id = SpiffeId::istio_workload(&west_td, "shop", "order").unwrap();
    let server_id = SpiffeId::istio_workload(&east_td, "shop", "payment").unwrap();
    let store = |b: trust::TrustBundle| {
        let mut s = BundleSet::new();
        s.insert(b).unwrap();
        TrustStore::new(s)
    };

    // payment in east.mesh: accepts order from west.mesh only, verified with west's bundle.
    let mut server_cfg = trust::tls::server_config(
        SvidResolver::with(
            &east
                .issue_svid(&server_id, &AnyWorkload, time::Duration::hours(1))
                .unwrap(),
        )
        .unwrap(),
        SpiffeVerifier::new(store(west.bundle()), Authorizer::id(client_id.clone())),
    )
    .unwrap();
    server_cfg.alpn_protocols = vec![b"istio".to_vec()];
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = trust::tls::peer_id(tls.get_ref().1.peer_certificates()).unwrap();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(format!("paid for {peer}").as_bytes())
            .await
            .unwrap();
        tls.shutdown().await.unwrap();
    });

    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Routes::from_clusters([(
        "outbound|18080||payment.shop.svc.cluster.local",
        vec![backend],
    )])));
    let gw = Gateway::new(GatewayConfig::default(), rx, &prometheus::Registry::new());
    let gl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = gl.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(gw.serve(gl, stop_rx));

    // order in west.mesh: verifies payment with east's bundle (as received through the federation).
    let mut client_cfg = trust::tls::client_config(
        SvidResolver::with(
            &west
                .issue_svid(&client_id, &AnyWorkload, time::Duration::hours(1))
                .unwrap(),
        )
        .unwrap(),
        SpiffeVerifier::new(store(east.bundle()), Authorizer::id(server_id.clone())),
    )
    .unwrap();
    client_cfg.alpn_protocols = vec![b"istio".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw_addr).await.unwrap();
    let sni =
        rustls_pki_types::ServerName::try_from("outbound_.18080_._.payment.shop.svc.cluster.local")
            .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(sni, tcp)
        .await
        .unwrap();
    let server_peer = trust::tls::peer_id(tls.get_ref().1.peer_certificates()).unwrap();
    assert_eq!(
        server_peer, server_id,
        "the client sees payment's own SVID, not the gateway's"
    );
    tls.write_all(b"order").await.unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "paid for spiffe://west.mesh/ns/shop/sa/order");
    server.await.unwrap();
}
