//! The handshake bound of the mTLS listeners: connections beyond it wait in the accept queue,
//! and are served in order once earlier handshakes end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use trust::ca::policy::AnyWorkload;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CaOptions, CertificateAuthority, SpiffeId, TrustDomain, TrustStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_bound_wait_in_the_accept_queue() {
    let td = TrustDomain::new("fed.mesh").unwrap();
    let ca = CertificateAuthority::create(td.clone(), CaOptions::default()).unwrap();
    let server_id = SpiffeId::from_parts(&td, "/federator").unwrap();
    let store = || {
        let mut set = BundleSet::new();
        set.insert(ca.bundle()).unwrap();
        TrustStore::new(set)
    };
    let svid = ca
        .issue_svid(&server_id, &AnyWorkload, time::Duration::hours(1))
        .unwrap();
    let server = trust::tls::server_config_optional_client(
        SvidResolver::with(&svid).unwrap(),
        SpiffeVerifier::new(store(), Authorizer::trust_domain(td.clone())),
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let limit = meshfed_net::Handshakes::new(2);
    let mut incoming = meshfed_net::tls_incoming_limited(l, server, limit.clone());

    // Five clients that connect and never say hello: two hold the two handshakes, three wait
    // in the accept queue.
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // A real client behind them (the accept queue is first in, first out).
    let client = trust::tls::client_config(
        SvidResolver::new(),
        SpiffeVerifier::new(store(), Authorizer::id(server_id.clone())),
    )
    .unwrap();
    let real = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(
                rustls_pki_types::ServerName::try_from("federator").unwrap(),
                tcp,
            )
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while limit.in_flight() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("two handshakes under way");
    // Unbounded, the real client would be accepted behind the five and finish with them still
    // open (six at once). Bounded, it finishes only once the stalled clients go.
    drop(stalled);
    let tls = tokio::time::timeout(Duration::from_secs(10), real)
        .await
        .expect("the real client is served once the stalled ones left")
        .unwrap();
    assert!(tls.is_ok(), "{tls:?}");
    let conn = tokio::time::timeout(Duration::from_secs(10), incoming.next())
        .await
        .unwrap()
        .unwrap();
    assert!(conn.is_ok());
    assert_eq!(limit.peak(), 2, "never more than the bound at once");
}
