//! SDS from the agent: what an Envoy's `sds-grpc` cluster gets when it points at the agent.
//! `ROOTCA` carries Envoy's SPIFFE validator with one bundle per trust domain; `default` is a
//! certificate for exactly the identity the proxy authenticated with, only on the mTLS port.
//! The issued chain is checked with openssl; the resources against golden JSON written from
//! Envoy's documented fields (tests/golden/secret-*.json). No Envoy runs here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use meshfed_net::drain::Signal;
use meshfed_xds::node::LocalFacts;
use meshfed_xds::secrets::{self, CERT_SECRET, ROOT_SECRET};
use meshfed_xds::server::{Sds, XdsState};
use meshfed_xds::{Kind, SECRET_TYPE};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use trust::ca::policy::{AnyWorkload, ExactIds};
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CaOptions, CertificateAuthority, SpiffeId, TrustDomain, TrustStore};

fn ca(td: &str) -> Arc<CertificateAuthority> {
    Arc::new(
        CertificateAuthority::create(TrustDomain::new(td).unwrap(), CaOptions::default()).unwrap(),
    )
}

fn roots_pem(ca: &CertificateAuthority) -> String {
    trust::keys::certs_to_pem(ca.bundle().x509_authorities.iter())
}

fn pem(d: &Option<DataSource>) -> String {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.clone(),
        other => panic!("not an inline string: {other:?}"),
    }
}

fn node() -> Node {
    let mut md = envoy_types::pb::google::protobuf::Struct::default();
    md.fields.insert(
        "NAMESPACE".into(),
        envoy_types::pb::google::protobuf::Value {
            kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                "shop".into(),
            )),
        },
    );
    Node {
        id: "sidecar~10.1.0.9~payment-1.shop~shop.svc.cluster.local".into(),
        metadata: Some(md),
        ..Default::default()
    }
}

fn local() -> LocalFacts {
    LocalFacts {
        cluster: "east".into(),
        network: "east-net".into(),
        trust_domain: "east.mesh".into(),
        ..Default::default()
    }
}

/// A state whose `ROOTCA` holds east's and west's roots and whose issuer is east's CA.
fn state(east: &Arc<CertificateAuthority>, west: &CertificateAuthority) -> Arc<XdsState> {
    let state = XdsState::new(local(), &prometheus::Registry::new());
    state.secrets.set_root(meshfed_xds::resources::Res::new(
        ROOT_SECRET,
        &secrets::root_secret(&[
            ("east.mesh".into(), roots_pem(east)),
            ("west.mesh".into(), roots_pem(west)),
        ]),
    ));
    let e = east.clone();
    state.secrets.set_issuer(Arc::new(move |id: &SpiffeId| {
        Ok(e.issue_svid(id, &ExactIds(vec![id.clone()]), time::Duration::hours(1))?)
    }));
    state
}

fn secrets_of(r: &DiscoveryResponse) -> Vec<tls::Secret> {
    assert_eq!(r.type_url, SECRET_TYPE);
    r.resources
        .iter()
        .map(|a| tls::Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

fn spiffe_domains(s: &tls::Secret) -> Vec<(String, String)> {
    let Some(tls::secret::Type::ValidationContext(vc)) = &s.r#type else {
        panic!("{} is not a validation context", s.name)
    };
    assert!(
        vc.trusted_ca.is_none(),
        "the SPIFFE validator takes no trusted_ca"
    );
    let cfg = vc.custom_validator_config.as_ref().unwrap();
    assert_eq!(cfg.name, "envoy.tls.cert_validator.spiffe");
    let any = cfg.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    tls::SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .unwrap()
        .trust_domains
        .iter()
        .map(|t| (t.name.clone(), pem(&t.trust_bundle)))
        .collect()
}

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn open(
        mut c: SecretDiscoveryServiceClient<tonic::transport::Channel>,
        names: &[&str],
    ) -> Result<Stream, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(DiscoveryRequest {
            node: Some(node()),
            type_url: SECRET_TYPE.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = c
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream { tx, rx })
    }

    async fn recv(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.next())
            .await
            .expect("an SDS response within 10 s")
            .expect("the stream stays open")
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.tx
            .send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: SECRET_TYPE.into(),
                resource_names: names.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Verifies a served certificate secret with openssl against `root_pem` and returns its
/// SPIFFE ID as openssl prints it.
fn openssl_verifies(secret: &tls::Secret, root_pem: &str) -> String {
    let Some(tls::secret::Type::TlsCertificate(t)) = &secret.r#type else {
        panic!("not a certificate")
    };
    let d = tempfile::tempdir().unwrap();
    let chain = trust::keys::certs_from_pem(pem(&t.certificate_chain).as_bytes(), "chain").unwrap();
    let leaf = d.path().join("leaf.pem");
    let inter = d.path().join("inter.pem");
    let root = d.path().join("root.pem");
    let key = d.path().join("key.pem");
    std::fs::write(&leaf, trust::keys::certs_to_pem(chain[..1].iter())).unwrap();
    std::fs::write(&inter, trust::keys::certs_to_pem(chain[1..].iter())).unwrap();
    std::fs::write(&root, root_pem).unwrap();
    std::fs::write(&key, pem(&t.private_key)).unwrap();
    let out = common::openssl()
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The key is the certificate's: the public keys openssl derives from both are equal.
    let pubkey = |args: &[&str], file: &std::path::Path| {
        let o = common::openssl().args(args).arg(file).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], &leaf),
        pubkey(&["pkey", "-pubout", "-in"], &key)
    );
    let san = common::openssl()
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    String::from_utf8_lossy(&san.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("URI:").map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn sds_serves_the_authenticated_identity_and_one_bundle_per_trust_domain() {
    let (east, west) = (ca("east.mesh"), ca("west.mesh"));
    let east_td = TrustDomain::new("east.mesh").unwrap();
    let state = state(&east, &west);
    let agent_id = SpiffeId::istio_workload(&east_td, "meshfed-system", "meshfed-agent").unwrap();
    let store = || {
        let mut set = BundleSet::new();
        set.insert(east.bundle()).unwrap();
        TrustStore::new(set)
    };
    let server_svid = east
        .issue_svid(&agent_id, &AnyWorkload, time::Duration::hours(1))
        .unwrap();
    let tls_cfg = trust::tls::server_config(
        SvidResolver::with(&server_svid).unwrap(),
        SpiffeVerifier::new(store(), Authorizer::trust_domain(east_td.clone())),
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Sds::server(state.clone(), true, Signal::never()))
            .serve_with_incoming(meshfed_net::tls_incoming(l, tls_cfg)),
    );
    let payment = SpiffeId::istio_workload(&east_td, "shop", "payment").unwrap();
    let bootstrap = east
        .issue_svid(&payment, &AnyWorkload, time::Duration::hours(1))
        .unwrap();
    let cfg = trust::tls::client_config(
        SvidResolver::with(&bootstrap).unwrap(),
        SpiffeVerifier::new(store(), Authorizer::id(agent_id.clone())),
    )
    .unwrap();
    let client = SecretDiscoveryServiceClient::new(
        meshfed_net::channel(vec![addr.clone()], cfg, "meshfed-agent").unwrap(),
    );

    let names = [CERT_SECRET, ROOT_SECRET];
    let mut s = Stream::open(client.clone(), &names).await.unwrap();
    let r = s.recv().await.unwrap();
    let got = secrets_of(&r);
    let by_name = |n: &str| got.iter().find(|s| s.name == n).cloned().unwrap();
    // ROOTCA: east's roots under east.mesh only, west's under west.mesh only.
    assert_eq!(
        spiffe_domains(&by_name(ROOT_SECRET)),
        vec![
            ("east.mesh".to_string(), roots_pem(&east)),
            ("west.mesh".to_string(), roots_pem(&west)),
        ]
    );
    // default: a new certificate (not the bootstrap one) for exactly the authenticated ID,
    // chaining to east's root, its key matching (openssl checks both).
    let cert = by_name(CERT_SECRET);
    assert_eq!(
        openssl_verifies(&cert, &roots_pem(&east)),
        "spiffe://east.mesh/ns/shop/sa/payment"
    );
    s.ack(&r, &names).await;

    // A peer bundle changes: a new ROOTCA is pushed, the certificate is not resent.
    let north = ca("north.mesh");
    state.secrets.set_root(meshfed_xds::resources::Res::new(
        ROOT_SECRET,
        &secrets::root_secret(&[
            ("east.mesh".into(), roots_pem(&east)),
            ("west.mesh".into(), roots_pem(&west)),
            ("north.mesh".into(), roots_pem(&north)),
        ]),
    ));
    let r2 = s.recv().await.unwrap();
    assert_ne!(r2.version_info, r.version_info);
    let got2 = secrets_of(&r2);
    assert_eq!(got2.len(), 1, "only what changed");
    assert_eq!(
        spiffe_domains(&got2[0])
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        ["east.mesh", "north.mesh", "west.mesh"]
    );
    s.ack(&r2, &names).await;

    // A new CA generation signs: the certificate is issued again and pushed.
    state.secrets.reissue_all();
    let r3 = s.recv().await.unwrap();
    let got3 = secrets_of(&r3);
    assert_eq!(got3.len(), 1);
    assert_eq!(got3[0].name, CERT_SECRET);
    assert_ne!(got3[0], cert, "a new certificate");
    assert_eq!(
        openssl_verifies(&got3[0], &roots_pem(&east)),
        "spiffe://east.mesh/ns/shop/sa/payment"
    );
    s.ack(&r3, &names).await;

    // The config dump shows the secrets with the key redacted.
    let dump = state
        .proxies
        .config_dump("sidecar~10.1.0.9~payment-1", Some(Kind::Secret))
        .unwrap()
        .to_string();
    assert!(dump.contains("[redacted]"), "{dump}");
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    assert!(dump.contains("envoy.tls.cert_validator.spiffe"), "{dump}");

    // FetchSecrets answers the same way, once.
    let mut c = client.clone();
    let f = c
        .fetch_secrets(DiscoveryRequest {
            node: Some(node()),
            type_url: SECRET_TYPE.into(),
            resource_names: vec![CERT_SECRET.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let fetched = secrets_of(&f);
    assert_eq!(fetched.len(), 1);
    assert_eq!(
        openssl_verifies(&fetched[0], &roots_pem(&east)),
        "spiffe://east.mesh/ns/shop/sa/payment"
    );
}

/// The plaintext port checks no identity: it serves ROOTCA (public) but never a certificate,
/// and says so (a metric; FetchSecrets refuses with the reason).
#[tokio::test]
async fn the_plaintext_port_serves_roots_but_no_certificate() {
    let (east, west) = (ca("east.mesh"), ca("west.mesh"));
    let state = state(&east, &west);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Sds::server(state.clone(), false, Signal::never()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let client = SecretDiscoveryServiceClient::connect(url).await.unwrap();
    let mut s = Stream::open(client.clone(), &[CERT_SECRET, ROOT_SECRET])
        .await
        .unwrap();
    let r = s.recv().await.unwrap();
    let got = secrets_of(&r);
    assert_eq!(
        got.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        [ROOT_SECRET]
    );
    assert_eq!(
        state
            .metrics
            .refused
            .with_label_values(&["secret_without_identity"])
            .get(),
        1
    );
    let e = client
        .clone()
        .fetch_secrets(DiscoveryRequest {
            node: Some(node()),
            type_url: SECRET_TYPE.into(),
            resource_names: vec![CERT_SECRET.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("mTLS port"), "{}", e.message());
    // Another type on the SDS service is not served.
    let e = client
        .clone()
        .fetch_secrets(DiscoveryRequest {
            node: Some(node()),
            type_url: meshfed_xds::CLUSTER_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

/// The secrets, rendered as Envoy JSON, match golden files written from Envoy's documented
/// fields (PEM replaced by placeholders); each round-trips through envoy-types.
#[test]
fn secrets_match_golden_envoy_json() {
    let (east, west) = (ca("east.mesh"), ca("west.mesh"));
    let (e_pem, w_pem) = (roots_pem(&east), roots_pem(&west));
    let root = meshfed_xds::resources::Res::new(
        ROOT_SECRET,
        &secrets::root_secret(&[
            ("west.mesh".into(), w_pem.clone()),
            ("east.mesh".into(), e_pem.clone()),
        ]),
    );
    let id = SpiffeId::new("spiffe://east.mesh/ns/shop/sa/payment").unwrap();
    let svid = east
        .issue_svid(&id, &ExactIds(vec![id.clone()]), time::Duration::hours(1))
        .unwrap();
    let cert = meshfed_xds::resources::Res::new(CERT_SECRET, &secrets::cert_secret(&svid));
    let chain_pem = trust::keys::certs_to_pem(svid.chain.iter());
    let key_pem = trust::keys::pkcs8_to_pem(&svid.key);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for (name, res, subst) in [
        (
            "secret-rootca",
            &root,
            vec![
                (e_pem.as_str(), "<east.mesh roots PEM>"),
                (w_pem.as_str(), "<west.mesh roots PEM>"),
            ],
        ),
        (
            "secret-default",
            &cert,
            vec![
                (chain_pem.as_str(), "<certificate chain PEM>"),
                (key_pem.as_str(), "<private key PEM>"),
            ],
        ),
    ] {
        let bytes = &res.any.value;
        let again = tls::Secret::decode(bytes.as_slice())
            .unwrap()
            .encode_to_vec();
        assert_eq!(&again, bytes, "{name} round-trips");
        let mut json = meshfed_xds::json::any_to_json(&res.any).unwrap();
        fn replace(v: &mut serde_json::Value, subst: &[(&str, &str)]) {
            match v {
                serde_json::Value::String(s) => {
                    if let Some((_, p)) = subst.iter().find(|(from, _)| s == from) {
                        *s = p.to_string();
                    }
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(|x| replace(x, subst)),
                serde_json::Value::Object(o) => o.values_mut().for_each(|x| replace(x, subst)),
                _ => {}
            }
        }
        replace(&mut json, &subst);
        let path = dir.join(format!("{name}.json"));
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json, want, "{name} differs from {}", path.display());
    }
}

/// An Envoy configured with `sds_config: {ads: {}}` asks for secrets on its ADS stream: the
/// same secrets, the same rules (here the plaintext port: ROOTCA only).
#[tokio::test]
async fn secrets_are_served_on_the_ads_stream_too() {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let (east, west) = (ca("east.mesh"), ca("west.mesh"));
    let state = state(&east, &west);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(meshfed_xds::server::Ads::server(
                state.clone(),
                false,
                Signal::never(),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let mut c = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node()),
        type_url: SECRET_TYPE.into(),
        resource_names: vec![ROOT_SECRET.into(), CERT_SECRET.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = c
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let got = secrets_of(&r);
    assert_eq!(got.len(), 1);
    assert_eq!(
        spiffe_domains(&got[0])
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        ["east.mesh", "west.mesh"]
    );
    drop(tx);
}
