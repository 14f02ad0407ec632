//! The federation API against bad input: tokens, CA pins, clusters speaking for others,
//! malformed and oversized messages, missing client certificates. A real federator runs
//! in-process on loopback; clients are real gRPC clients over mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use meshfed_federation::{Federator, FederatorConfig, StoreChoice};
use meshfed_identity::cluster::{self as identity, ClusterIdentity, JoinParams};
use meshfed_identity::token::Claims;
use proto::cluster_message::Kind;
use proto::federation_client::FederationClient;
use proto::{ClusterMessage, ExportDelta, Hello, Port, ServiceExport};
use tokio_stream::wrappers::ReceiverStream;
use trust::TrustDomain;

/// A test's directory and the store its federators use: sled, or a real etcd started for the
/// test when `MESHFED_TEST_STORE=etcd` (scripts/test runs this file both ways).
struct Env {
    dir: tempfile::TempDir,
    etcd: Option<meshfed_store::etcd::local::LocalEtcd>,
}

impl Env {
    fn new() -> Env {
        let etcd = match std::env::var("MESHFED_TEST_STORE").as_deref() {
            Ok("etcd") => Some(meshfed_store::etcd::local::LocalEtcd::start().unwrap()),
            Ok("sled") | Err(_) => None,
            Ok(other) => panic!("MESHFED_TEST_STORE={other}: sled or etcd"),
        };
        Env {
            dir: tempfile::tempdir().unwrap(),
            etcd,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A federator of this test's federation (a restart is another `Federator::start` of it).
    fn config(&self) -> FederatorConfig {
        let mut cfg = FederatorConfig::new(self.path().join("fed"), "127.0.0.1:0".parse().unwrap());
        cfg.lease_ttl = Duration::from_secs(5);
        if let Some(e) = &self.etcd {
            cfg.store = StoreChoice::Etcd(e.config("/fed"));
        }
        cfg
    }
}

async fn federator(env: &Env) -> Federator {
    Federator::start(env.config()).await.unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token(f: &Federator, _dir: &Path, cluster: &str, ttl: i64, created: i64) -> String {
    f.tokens()
        .create(
            cluster,
            ttl,
            f.advertise().to_vec(),
            f.ca_fingerprint(),
            f.trust_domain().to_string(),
            created,
        )
        .unwrap()
        .1
}

fn params(dir: &Path, token: String, cluster: &str) -> JoinParams {
    JoinParams {
        token,
        state_dir: dir.join(cluster),
        cluster: cluster.into(),
        network: format!("net-{cluster}"),
        trust_domain: TrustDomain::new(&format!("{cluster}.mesh")).unwrap(),
        locality: meshfed_model::validate::parse_locality("us-east1/us-east1-b").unwrap(),
        gateways: vec!["127.0.0.1:15443".into()],
        ca: None,
        rejoin: false,
    }
}

async fn join_err(p: JoinParams) -> String {
    let dir = p.state_dir.clone();
    let existed = dir.exists();
    let e = format!("{:#}", identity::join(p).await.unwrap_err());
    assert!(
        !dir.join("identity").join("identity.json").exists(),
        "nothing is stored on a refused join"
    );
    // Not even the cluster CA: the directory is as it was, and a retry starts clean.
    assert_eq!(
        dir.exists(),
        existed,
        "{} after a refused join",
        dir.display()
    );
    e
}

fn members(f: &Federator) -> usize {
    f.report().unwrap().clusters.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_nothing_is_stored() {
    let d = Env::new();
    let f = federator(&d).await;

    let expired = token(&f, d.path(), "east", 60, now() - 3600);
    let e = join_err(params(d.path(), expired, "east")).await;
    assert!(e.contains("the join token expired"), "{e}");

    let good = token(&f, d.path(), "east", 900, now());
    let mut claims = Claims::decode(&good).unwrap();
    claims.secret = "00".repeat(24);
    let e = join_err(params(d.path(), claims.encode(), "east")).await;
    assert!(e.contains("secret does not match (forged)"), "{e}");

    let e = join_err(params(d.path(), "mft1.garbage!".into(), "east")).await;
    assert!(e.contains("malformed"), "{e}");

    let revoked = token(&f, d.path(), "east", 900, now());
    let id = Claims::decode(&revoked).unwrap().id;
    f.tokens().revoke(&id).unwrap();
    let e = join_err(params(d.path(), revoked, "east")).await;
    assert!(e.contains("revoked"), "{e}");

    // A token bound to east cannot join west (checked locally and by the federator).
    let e = join_err(params(d.path(), good.clone(), "west")).await;
    assert!(e.contains("for cluster \"east\""), "{e}");
    assert_eq!(members(&f), 0);

    // The good token works once, then never again.
    identity::join(params(d.path(), good.clone(), "east"))
        .await
        .unwrap();
    assert_eq!(members(&f), 1);
    let mut p = params(d.path(), good, "east");
    p.state_dir = d.path().join("east-again");
    let e = join_err(p).await;
    assert!(e.contains("already used"), "{e}");
    assert!(f
        .metrics_text()
        .contains("meshfed_federation_joins_total{reason=\"token\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federator_whose_ca_does_not_match_the_pin_is_refused() {
    let d = Env::new();
    let f = federator(&d).await;
    let good = token(&f, d.path(), "east", 900, now());
    let mut claims = Claims::decode(&good).unwrap();
    claims.ca_sha256 = "ab".repeat(32);
    let e = join_err(params(d.path(), claims.encode(), "east")).await;
    assert!(e.contains("does not match the pinned fingerprint"), "{e}");
    assert_eq!(members(&f), 0, "the federator never saw a join");
}

async fn joined(f: &Federator, dir: &Path, cluster: &str) -> ClusterIdentity {
    identity::join(params(dir, token(f, dir, cluster, 900, now()), cluster))
        .await
        .unwrap()
}

async fn client(id: &ClusterIdentity) -> FederationClient<tonic::transport::Channel> {
    let (cfg, _) = id.client_config().unwrap();
    FederationClient::new(
        meshfed_net::channel(id.file.federators.clone(), cfg, "federator").unwrap(),
    )
}

/// Opens a Sync stream and sends `msgs`; returns the status the stream ended with.
async fn sync_until_error(id: &ClusterIdentity, msgs: Vec<ClusterMessage>) -> tonic::Status {
    let mut c = client(id).await.max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut inbound = match c.sync(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return s,
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("stream should end with an error")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(s) => return s,
        }
    }
}

/// Reads `inbound` until the federator acknowledges export `version`, without an error.
async fn export_acked(inbound: &mut tonic::Streaming<proto::FederatorMessage>, version: u64) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("an acknowledgement")
            .unwrap()
            .expect("the stream stays open");
        if let Some(proto::federator_message::Kind::ExportAck(a)) = m.kind {
            assert_eq!((a.version, a.error.as_str()), (version, ""));
            return;
        }
    }
}

/// Reads a stream to its end and returns the status it ended with (`what` names the wait).
async fn ends_with(
    inbound: &mut tonic::Streaming<proto::FederatorMessage>,
    what: &str,
) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .unwrap_or_else(|_| panic!("{what}: the stream did not end"))
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{what}: the stream ended without a status"),
            Err(s) => return s,
        }
    }
}

fn hello(id: &ClusterIdentity) -> ClusterMessage {
    ClusterMessage {
        kind: Some(Kind::Hello(Hello {
            observer: false,
            facts: Some(id.facts()),
            imports_applied_revision: 0,
            federation_bundle_sequence: 0,
        })),
    }
}

fn export(name: &str, port: u32) -> ServiceExport {
    ServiceExport {
        namespace: "shop".into(),
        name: name.into(),
        ports: vec![Port {
            name: "http".into(),
            port,
            protocol: "TCP".into(),
            app_protocol: String::new(),
        }],
        ..Default::default()
    }
}

fn exports(version: u64, e: Vec<ServiceExport>) -> ClusterMessage {
    ClusterMessage {
        kind: Some(Kind::Exports(ExportDelta {
            version,
            full: false,
            upserts: e,
            removals: vec![],
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_may_only_speak_for_itself() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let _west = joined(&f, d.path(), "west").await;
    let mut forged = east.facts();
    forged.cluster_id = "west".into();
    let s = sync_until_error(
        &east,
        vec![ClusterMessage {
            kind: Some(Kind::Hello(Hello {
                observer: false,
                facts: Some(forged),
                imports_applied_revision: 0,
                federation_bundle_sequence: 0,
            })),
        }],
    )
    .await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(
        s.message()
            .contains("authenticated as cluster east; it may not speak for cluster west"),
        "{}",
        s.message()
    );
    // A trust domain other than the one it joined with is refused as well.
    let mut other_td = east.facts();
    other_td.trust_domain = "west.mesh".into();
    let s = sync_until_error(
        &east,
        vec![ClusterMessage {
            kind: Some(Kind::Hello(Hello {
                observer: false,
                facts: Some(other_td),
                imports_applied_revision: 0,
                federation_bundle_sequence: 0,
            })),
        }],
    )
    .await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(
        f.metrics_text().contains(
            "meshfed_federation_refused_total{cluster=\"east\",reason=\"permission_denied\"} 2"
        ),
        "{}",
        f.metrics_text()
    );
    assert_eq!(
        f.report()
            .unwrap()
            .clusters
            .iter()
            .find(|c| c.cluster == "west")
            .unwrap()
            .exports,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_are_refused_naming_the_field_without_hurting_others() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let west = joined(&f, d.path(), "west").await;

    // west keeps a healthy stream open throughout.
    let mut wc = client(&west).await;
    let (wtx, wrx) = tokio::sync::mpsc::channel(16);
    wtx.send(hello(&west)).await.unwrap();
    let mut w_in = wc
        .sync(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();

    let s = sync_until_error(
        &east,
        vec![hello(&east), exports(1, vec![export("payment", 0)])],
    )
    .await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "exports.upserts[0].ports[0].port: 0 is not in 1-65535"
    );

    let mut bad_name = export("Payment", 80);
    bad_name.namespace = "shop".into();
    let s = sync_until_error(&east, vec![hello(&east), exports(1, vec![bad_name])]).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(
        s.message().starts_with("exports.upserts[0].name:"),
        "{}",
        s.message()
    );

    let s = sync_until_error(&east, vec![ClusterMessage { kind: None }]).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);

    let s = sync_until_error(&east, vec![exports(1, vec![export("payment", 80)])]).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().contains("must be hello"), "{}", s.message());

    let mut huge = export("payment", 80);
    huge.labels.insert("blob".into(), "x".repeat(17 << 20));
    let s = sync_until_error(&east, vec![hello(&east), exports(1, vec![huge])]).await;
    assert!(
        matches!(
            s.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{s:?}"
    );

    let bad_bundle = ClusterMessage {
        kind: Some(Kind::Bundle(proto::BundleUpdate {
            bundle_json: "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": []}]}"
                .into(),
        })),
    };
    let s = sync_until_error(&east, vec![hello(&east), bad_bundle]).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().contains("keys[0].x5c"), "{}", s.message());

    // west's stream is unaffected: a valid export from east still reaches it.
    let mut ec = client(&east).await;
    let (etx, erx) = tokio::sync::mpsc::channel(16);
    etx.send(hello(&east)).await.unwrap();
    etx.send(exports(1, vec![export("payment", 80)]))
        .await
        .unwrap();
    let _e_in = ec
        .sync(ReceiverStream::new(erx))
        .await
        .unwrap()
        .into_inner();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = w_in.message().await.unwrap().unwrap();
            if let Some(proto::federator_message::Kind::Imports(d)) = m.kind {
                if d.upserts.iter().any(|u| u.source_cluster == "east") {
                    return d;
                }
            }
        }
    })
    .await
    .expect("west receives east's export");
    assert_eq!(got.upserts[0].export.as_ref().unwrap().name, "payment");
    assert!(f.metrics_text().contains("reason=\"invalid_argument\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_cluster_certificate_are_refused() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let claims = Claims {
        id: "00".into(),
        secret: String::new(),
        cluster: "east".into(),
        federators: f.advertise().to_vec(),
        ca_sha256: f.ca_fingerprint(),
        federation_trust_domain: f.trust_domain().to_string(),
        expires: 0,
    };
    let verifier = trust::tls::PinnedRootVerifier::new(
        &claims.ca_sha256,
        f.trust_domain().clone(),
        trust::tls::Authorizer::Any,
    );
    let cfg = trust::tls::client_config_with(
        trust::tls::SvidResolver::new(),
        std::sync::Arc::new(verifier),
    )
    .unwrap();
    let mut c = FederationClient::new(
        meshfed_net::channel(claims.federators.clone(), cfg, "federator").unwrap(),
    );
    let s = c.leave(proto::LeaveRequest {}).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    let s = c.status(proto::StatusRequest {}).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    // With its certificate, east may read the status.
    let st = client(&east)
        .await
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.clusters.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_an_earlier_membership_are_refused() {
    let d = Env::new();
    let f = federator(&d).await;
    let old = joined(&f, d.path(), "east").await;
    assert!(client(&old)
        .await
        .status(proto::StatusRequest {})
        .await
        .is_ok());
    // east loses its state and joins again at once (within the same second) with a new token.
    let mut p = params(d.path(), token(&f, d.path(), "east", 900, now()), "east");
    p.state_dir = d.path().join("east-new");
    let new = identity::join(p).await.unwrap();
    let s = client(&old)
        .await
        .status(proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(
        s.message().contains("predates its current membership"),
        "{}",
        s.message()
    );
    assert!(client(&new)
        .await
        .status(proto::StatusRequest {})
        .await
        .is_ok());
    // A renewal adds its certificate to the membership, and the renewed one works until it
    // expires.
    let (key, csr) = trust::keys::key_and_csr(&new.svid.id).unwrap();
    let chain = client(&new)
        .await
        .renew(proto::RenewRequest { csr_der: csr })
        .await
        .unwrap()
        .into_inner()
        .cert_chain_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let mut renewed = ClusterIdentity::load(&d.path().join("east-new")).unwrap();
    renewed
        .store_svid(trust::Svid::new(chain, key).unwrap())
        .unwrap();
    for id in [&renewed, &new] {
        assert!(client(id)
            .await
            .status(proto::StatusRequest {})
            .await
            .is_ok());
    }
    // And after leaving, no certificate of east works.
    client(&new)
        .await
        .leave(proto::LeaveRequest {})
        .await
        .unwrap();
    let s = client(&new)
        .await
        .status(proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(s.message().contains("has left"), "{}", s.message());
    assert!(
        proto::reason::is_left(&s),
        "the refusal says so in meshfed-reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_rpc_reports_what_the_http_status_reports() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let rpc = client(&east)
        .await
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let http = f.report().unwrap();
    let c = rpc
        .clusters
        .iter()
        .find(|c| c.facts.as_ref().is_some_and(|f| f.cluster_id == "east"))
        .expect("east in the RPC status");
    let h = http.clusters.iter().find(|c| c.cluster == "east").unwrap();
    let rfc = h.bundle_not_after.as_deref().expect("HTTP has the expiry");
    let t =
        time::OffsetDateTime::parse(rfc, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(c.bundle_not_after > now(), "{}", c.bundle_not_after);
    assert_eq!(c.bundle_not_after, t.unix_timestamp());
    assert_eq!(c.bundle_sequence, h.bundle_sequence);
}

/// The federator's drain ends every Sync stream with UNAVAILABLE (agents reconnect, to
/// another replica where there is one) and stops within the deadline; what it acknowledged
/// is there when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_sync_streams_with_unavailable_and_keeps_what_was_acknowledged() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let mut c = client(&east).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(hello(&east)).await.unwrap();
    tx.send(exports(1, vec![export("payment", 8080)]))
        .await
        .unwrap();
    let mut inbound = c.sync(ReceiverStream::new(rx)).await.unwrap().into_inner();
    export_acked(&mut inbound, 1).await;
    let report = f.drain(Duration::from_secs(10)).await;
    assert!(report.aborted.is_empty(), "{report}");
    let end = ends_with(&mut inbound, "the stream ends").await;
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert_eq!(end.message(), "the federator is shutting down");
    drop(tx);
    let f = federator(&d).await;
    let r = f.report().unwrap();
    let east = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_eq!((east.exports, east.exports_acked_version), (1, 1));
}

/// A cluster's bundle sequence never goes back: an older bundle after a newer one ends the
/// stream with FAILED_PRECONDITION naming both numbers, is counted, and the newer one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_sequence_regression_is_refused() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let td = TrustDomain::new("east.mesh").unwrap();
    let ca = identity::open_cluster_ca(&d.path().join("east"), &td, None).unwrap();
    let bundle = |seq: u64| {
        let mut b = ca.bundle();
        b.sequence = Some(seq);
        ClusterMessage {
            kind: Some(Kind::Bundle(proto::BundleUpdate {
                bundle_json: b.to_json().unwrap(),
            })),
        }
    };
    let e = sync_until_error(&east, vec![hello(&east), bundle(5), bundle(4)]).await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("4 is lower than the stored bundle's 5"),
        "{e:?}"
    );
    assert!(f.metrics_text().contains(
        "meshfed_federation_refused_total{cluster=\"east\",reason=\"bundle_sequence_regression\"} 1"
    ), "{}", f.metrics_text());
    let r = f.report().unwrap();
    let c = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_eq!(c.bundle_sequence, 5);
}

/// A trust bundle larger than 64 KiB is refused with RESOURCE_EXHAUSTED naming the field and
/// the size, and counted; the stored bundle stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_bundle_is_refused_naming_its_size() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let td = TrustDomain::new("east.mesh").unwrap();
    let ca = identity::open_cluster_ca(&d.path().join("east"), &td, None).unwrap();
    let mut b = ca.bundle();
    // The same root many times over: valid JSON, beyond the size.
    let root = b.x509_authorities[0].clone();
    b.x509_authorities = vec![root; 200];
    b.sequence = Some(9);
    let json = b.to_json().unwrap();
    assert!(json.len() > 64 * 1024, "{}", json.len());
    let e = sync_until_error(
        &east,
        vec![
            hello(&east),
            ClusterMessage {
                kind: Some(Kind::Bundle(proto::BundleUpdate {
                    bundle_json: json.clone(),
                })),
            },
        ],
    )
    .await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(
        e.message(),
        format!("bundle.bundle_json: {} bytes, at most 65536", json.len())
    );
    assert!(f.metrics_text().contains("reason=\"bundle_size\""));
    let r = f.report().unwrap();
    let c = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_ne!(c.bundle_sequence, 9, "the stored bundle stays");
}

/// Opens a Sync stream that stays open; returns its sender and the federator's messages.
async fn open_sync(
    id: &ClusterIdentity,
) -> (
    tokio::sync::mpsc::Sender<ClusterMessage>,
    tonic::Streaming<proto::FederatorMessage>,
) {
    let mut c = client(id).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(hello(id)).await.unwrap();
    let inbound = c.sync(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, inbound)
}

/// BundleDistribution names the members that do not hold the caller's stored bundle yet: a
/// member holds it once it acknowledged an import revision carrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_distribution_names_who_does_not_hold_the_bundle_yet() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let west = joined(&f, d.path(), "west").await;
    let td = TrustDomain::new("east.mesh").unwrap();
    let ca = identity::open_cluster_ca(&d.path().join("east"), &td, None).unwrap();
    let mut b = ca.bundle();
    b.sequence = Some(5);
    let (etx, mut ein) = open_sync(&east).await;
    etx.send(ClusterMessage {
        kind: Some(Kind::Bundle(proto::BundleUpdate {
            bundle_json: b.to_json().unwrap(),
        })),
    })
    .await
    .unwrap();
    let mut ec = client(&east).await;
    // The bundle is stored when the federator has processed it (the stream is in order:
    // wait for an answer to a later message).
    etx.send(exports(1, vec![])).await.unwrap();
    loop {
        let m = ein.message().await.unwrap().unwrap();
        if let Some(proto::federator_message::Kind::ExportAck(_)) = m.kind {
            break;
        }
    }
    let got = ec
        .bundle_distribution(proto::BundleDistributionRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stored_sequence, 5);
    assert_eq!(got.pending, vec!["west".to_string()]);
    assert!(got.holders.is_empty());

    // west connects and acknowledges what it was sent: now it holds east's bundle.
    let (wtx, mut win) = open_sync(&west).await;
    loop {
        let m = win.message().await.unwrap().unwrap();
        if let Some(proto::federator_message::Kind::Imports(delta)) = m.kind {
            if delta.bundles.iter().any(|b| b.trust_domain == "east.mesh") {
                wtx.send(ClusterMessage {
                    kind: Some(Kind::ImportAck(proto::ImportAck {
                        revision: delta.revision,
                        error: String::new(),
                    })),
                })
                .await
                .unwrap();
                break;
            }
        }
    }
    let mut waited = 0;
    loop {
        let got = ec
            .bundle_distribution(proto::BundleDistributionRequest {})
            .await
            .unwrap()
            .into_inner();
        if got.holders == vec!["west".to_string()] && got.pending.is_empty() {
            break;
        }
        // The acknowledgement is processed by west's session concurrently: ask again when
        // west's stream has delivered more (a heartbeat round trip), at most 100 times.
        wtx.send(ClusterMessage {
            kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
        })
        .await
        .unwrap();
        tokio::task::yield_now().await;
        waited += 1;
        assert!(
            waited < 100,
            "west never counted as holding the bundle: {got:?}"
        );
    }
}

/// An observer stream (a follower replica of west's agent) receives what west imports, does
/// not replace west's primary stream (which keeps exchanging), and is refused anything but
/// import acknowledgements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_stream_receives_imports_without_replacing_the_cluster() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let west = joined(&f, d.path(), "west").await;
    let (etx, mut ein) = open_sync(&east).await;
    etx.send(exports(1, vec![export("payment", 8080)]))
        .await
        .unwrap();
    loop {
        let m = ein.message().await.unwrap().unwrap();
        if let Some(proto::federator_message::Kind::ExportAck(_)) = m.kind {
            break;
        }
    }
    // A primary stream of west is replaced by a newer one: it ends with Aborted, marked as
    // superseded (an agent replica that is not the leader then observes).
    let (_old_tx, mut old_in) = open_sync(&west).await;
    old_in.message().await.unwrap().unwrap();
    // West's primary stream, then an observer of west.
    let (wtx, _win) = open_sync(&west).await;
    let status = ends_with(&mut old_in, "the replaced stream ends").await;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(proto::reason::is_superseded(&status), "{status:?}");
    let mut c = client(&west).await;
    let (otx, orx) = tokio::sync::mpsc::channel(16);
    let mut hello_observer = hello(&west);
    if let Some(Kind::Hello(h)) = hello_observer.kind.as_mut() {
        h.observer = true;
    }
    otx.send(hello_observer).await.unwrap();
    let mut oin = c.sync(ReceiverStream::new(orx)).await.unwrap().into_inner();
    let imported = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), oin.message())
            .await
            .expect("imports reach the observer")
            .unwrap()
            .unwrap();
        if let Some(proto::federator_message::Kind::Imports(delta)) = m.kind {
            if let Some(u) = delta.upserts.iter().find(|u| u.source_cluster == "east") {
                otx.send(ClusterMessage {
                    kind: Some(Kind::ImportAck(proto::ImportAck {
                        revision: delta.revision,
                        error: String::new(),
                    })),
                })
                .await
                .unwrap();
                break u.export.clone().unwrap();
            }
        }
    };
    assert_eq!(imported.name, "payment");
    // West's primary stream was not replaced: it still exchanges (an export is acknowledged).
    let mut wc = client(&west).await;
    wtx.send(exports(1, vec![export("ledger", 9090)]))
        .await
        .unwrap();
    let got = loop {
        let s = wc
            .status(proto::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let c = s
            .clusters
            .iter()
            .find(|c| c.facts.as_ref().is_some_and(|f| f.cluster_id == "west"))
            .cloned()
            .unwrap();
        if c.exports_acked_version == 1 {
            break c;
        }
        // Ask again once the stream delivered more: a heartbeat round trip on the primary.
        wtx.send(ClusterMessage {
            kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
        })
        .await
        .unwrap();
        tokio::task::yield_now().await;
    };
    assert!(got.connected, "the primary stream is still west's");
    // The observer may not export.
    otx.send(exports(2, vec![export("rogue", 7070)]))
        .await
        .unwrap();
    let status = ends_with(&mut oin, "the observer's export is refused").await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("observer"), "{status:?}");

    // An observer of west's membership ends when west joins again.
    let mut c = client(&west).await;
    let (otx, orx) = tokio::sync::mpsc::channel(16);
    let mut hello_observer = hello(&west);
    if let Some(Kind::Hello(h)) = hello_observer.kind.as_mut() {
        h.observer = true;
    }
    otx.send(hello_observer).await.unwrap();
    let mut oin = c.sync(ReceiverStream::new(orx)).await.unwrap().into_inner();
    // It is open (its first messages arrive), then west joins again.
    oin.message().await.unwrap().unwrap();
    let t = token(&f, d.path(), "west", 900, now());
    let again = d.path().join("again");
    identity::join(params(&again, t, "west")).await.unwrap();
    let status = ends_with(&mut oin, "the observer of the earlier membership ends").await;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("earlier membership"),
        "{status:?}"
    );
}

/// A cluster may export at most `max_services_per_cluster` services: the delta that would go
/// beyond ends the stream with RESOURCE_EXHAUSTED naming the cluster, the count and the flag,
/// and is counted; what was acknowledged before stays, and a delta within the limit (one that
/// replaces a service) is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_beyond_the_per_cluster_limit_are_refused_and_the_acknowledged_stay() {
    let d = Env::new();
    let mut cfg = d.config();
    cfg.lease_ttl = Duration::from_secs(5);
    cfg.max_services_per_cluster = 2;
    let f = Federator::start(cfg).await.unwrap();
    let east = joined(&f, d.path(), "east").await;

    let acked = |f: &Federator| {
        let r = f.report().unwrap();
        let e = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
        (e.exports, e.exports_acked_version)
    };
    // Two services: within the limit.
    let mut c = client(&east).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(hello(&east)).await.unwrap();
    tx.send(exports(
        1,
        vec![export("payment", 8080), export("ledger", 9090)],
    ))
    .await
    .unwrap();
    let mut inbound = c.sync(ReceiverStream::new(rx)).await.unwrap().into_inner();
    export_acked(&mut inbound, 1).await;
    // A third: refused, naming the cluster, the count and the limit.
    tx.send(exports(2, vec![export("stock", 7070)]))
        .await
        .unwrap();
    let end = ends_with(&mut inbound, "the stream ends").await;
    assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
    assert_eq!(
        end.message(),
        "exports: cluster east would export 3 services; a cluster may export at most 2 \
         (the federator's --max-services-per-cluster)"
    );
    assert_eq!(acked(&f), (2, 1), "what was acknowledged stays");
    assert!(f.metrics_text().contains("reason=\"services_limit\""));

    // Replacing one (a removal with the upsert) stays within the limit and is accepted.
    let mut c = client(&east).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(hello(&east)).await.unwrap();
    tx.send(ClusterMessage {
        kind: Some(Kind::Exports(ExportDelta {
            version: 2,
            full: false,
            upserts: vec![export("stock", 7070)],
            removals: vec![proto::ServiceKey {
                namespace: "shop".into(),
                name: "ledger".into(),
            }],
        })),
    })
    .await
    .unwrap();
    let mut inbound = c.sync(ReceiverStream::new(rx)).await.unwrap().into_inner();
    export_acked(&mut inbound, 2).await;
    assert_eq!(acked(&f), (2, 2));
    // A full set of three is refused too.
    let s = sync_until_error(
        &east,
        vec![
            hello(&east),
            ClusterMessage {
                kind: Some(Kind::Exports(ExportDelta {
                    version: 3,
                    full: true,
                    upserts: vec![export("a", 1), export("b", 2), export("c", 3)],
                    removals: vec![],
                })),
            },
        ],
    )
    .await;
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert_eq!(acked(&f), (2, 2));
}

/// A cluster that stops reading its imports (a large backlog it is slow to take) while its
/// heartbeats keep coming stays fresh: the federator sends imports only when the stream's queue
/// has room and reads the cluster's messages in between, so heartbeats never wait behind the
/// backlog. Observed over three lease TTLs, with the backlog real (east's imports not applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_are_read_while_a_stalled_importers_backlog_waits() {
    let d = Env::new();
    let mut cfg = d.config();
    let ttl = Duration::from_secs(1);
    cfg.lease_ttl = ttl;
    let f = Federator::start(cfg).await.unwrap();
    let west = joined(&f, d.path(), "west").await;
    let east = joined(&f, d.path(), "east").await;

    // west exports about 6 MB in 40 import chunks to everyone: far more than the stream's
    // queue and HTTP/2 windows hold.
    let big: Vec<ServiceExport> = (0..8000)
        .map(|i| {
            let mut e = export(&format!("svc-{i}"), 8080);
            e.export_to = vec![];
            e.endpoints = (0..8)
                .map(|j| proto::Endpoint {
                    address: format!("10.{}.{}.{}", i / 250, i % 250, j + 1),
                    weight: 1,
                    healthy: true,
                    service_account: "a-rather-long-service-account-name-for-size".into(),
                    ..Default::default()
                })
                .collect();
            e
        })
        .collect();
    let mut wc = client(&west).await.max_encoding_message_size(64 << 20);
    let (wtx, wrx) = tokio::sync::mpsc::channel(16);
    wtx.send(hello(&west)).await.unwrap();
    let mut delta = exports(1, big);
    if let Some(Kind::Exports(x)) = &mut delta.kind {
        x.full = true;
    }
    wtx.send(delta).await.unwrap();
    let mut w_in = wc
        .sync(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    export_acked(&mut w_in, 1).await;
    // west keeps heartbeating and reading, as a healthy agent does.
    let w_beats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 5);
        loop {
            tick.tick().await;
            let beat = ClusterMessage {
                kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
            };
            if wtx.send(beat).await.is_err() {
                return;
            }
        }
    });
    // west reads everything; the federator pushes it the peers' states whenever a lease
    // changes, so east's lease as west is told it is the condition the test waits on.
    let (lease_tx, mut east_lease) = tokio::sync::watch::channel(None::<i32>);
    let w_reader = tokio::spawn(async move {
        while let Ok(Some(m)) = w_in.message().await {
            if let Some(proto::federator_message::Kind::Peers(p)) = m.kind {
                let east = p
                    .peers
                    .iter()
                    .find(|c| c.facts.as_ref().is_some_and(|f| f.cluster_id == "east"));
                if let Some(c) = east {
                    lease_tx.send_replace(Some(c.lease));
                }
            }
        }
    });

    // east opens its stream and heartbeats every TTL/5, but never reads what it is sent.
    let mut ec = client(&east).await;
    let (etx, erx) = tokio::sync::mpsc::channel(16);
    etx.send(hello(&east)).await.unwrap();
    let _e_in = ec
        .sync(ReceiverStream::new(erx))
        .await
        .unwrap()
        .into_inner();
    let e_beats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 5);
        loop {
            tick.tick().await;
            let beat = ClusterMessage {
                kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
            };
            if etx.send(beat).await.is_err() {
                return;
            }
        }
    });

    // east's lease ran out while west's export was stored: first its stream's heartbeats
    // make it fresh again.
    let fresh = proto::LeaseState::Fresh as i32;
    let stale = proto::LeaseState::Stale as i32;
    tokio::time::timeout(
        Duration::from_secs(20),
        east_lease.wait_for(|l| *l == Some(fresh)),
    )
    .await
    .expect("east's heartbeats never made it fresh")
    .unwrap();
    // Then it stays fresh for three TTLs: no lease change to stale reaches west.
    let t = std::time::Instant::now();
    let turned = tokio::time::timeout(3 * ttl, east_lease.wait_for(|l| *l == Some(stale))).await;
    assert!(turned.is_err(), "east turned stale after {:?}", t.elapsed());
    // The backlog is real: east applied nothing of it. (The report walks every service: it
    // runs off the runtime's workers, so it cannot starve the clients' heartbeat tasks.)
    let (acked, lag) = tokio::task::spawn_blocking(move || {
        let r = f.report().unwrap();
        let e = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
        (e.imports_acked_revision, e.import_lag)
    })
    .await
    .unwrap();
    assert_eq!(
        acked, 0,
        "east applied nothing: its backlog is real (lag {lag})"
    );
    assert!(lag > 0, "east has imports outstanding");
    e_beats.abort();
    w_beats.abort();
    w_reader.abort();
}

/// Two federator replicas on one etcd (always etcd, whatever MESHFED_TEST_STORE says).
async fn replicas(etcd: &meshfed_store::etcd::local::LocalEtcd, d: &Path) -> [Federator; 2] {
    let start = |name: &str| {
        let mut cfg = FederatorConfig::new(d.join(name), "127.0.0.1:0".parse().unwrap());
        cfg.lease_ttl = Duration::from_secs(5);
        cfg.store = StoreChoice::Etcd(etcd.config("/fed"));
        Federator::start(cfg)
    };
    let a = start("a").await.unwrap();
    let b = start("b").await.unwrap();
    [a, b]
}

/// Federator replicas share the federation: one CA, the join tokens, and each other's writes.
/// A cluster joined on one replica and exporting there is imported by a cluster connected to
/// the other; the store's revision means the same on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_ca_the_tokens_and_each_others_writes() {
    let etcd = meshfed_store::etcd::local::LocalEtcd::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let [a, b] = replicas(&etcd, d.path()).await;
    assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
    assert_eq!(a.trust_domain(), b.trust_domain());
    // A token made through one replica is spent on the other (the token names only b).
    let mut claims = Claims::decode(&token(&a, d.path(), "east", 900, now())).unwrap();
    claims.federators = b.advertise().to_vec();
    let mut east = identity::join(params(d.path(), claims.encode(), "east"))
        .await
        .unwrap();
    let mut west = joined(&a, d.path(), "west").await;
    // A join names every replica (an agent's connection starts at a random one): the test
    // pins each cluster to one.
    assert_eq!(east.file.federators.len(), 2, "{:?}", east.file.federators);
    west.file.federators = a.advertise().to_vec();
    east.file.federators = b.advertise().to_vec();
    // West on a, east on b: east's export reaches west through etcd.
    let (_wtx, mut win) = open_sync(&west).await;
    let (etx, mut ein) = open_sync(&east).await;
    etx.send(exports(1, vec![export("payment", 8080)]))
        .await
        .unwrap();
    export_acked(&mut ein, 1).await;
    let revision = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), win.message())
            .await
            .expect("east's export reaches west on the other replica")
            .unwrap()
            .unwrap();
        if let Some(proto::federator_message::Kind::Imports(delta)) = m.kind {
            if delta.upserts.iter().any(|u| u.source_cluster == "east") {
                break delta.revision;
            }
        }
    };
    for f in [&a, &b] {
        let r = f.report().unwrap();
        assert_eq!(r.clusters.len(), 2, "{:?}", r.clusters);
        assert!(r.head_revision >= revision);
        assert_eq!(r.store.backend, "etcd");
        assert_eq!(r.store.unavailable, None);
    }
    // The revision west acknowledged means the same on either replica.
    assert_eq!(
        a.report().unwrap().head_revision,
        b.report().unwrap().head_revision
    );
}

/// Two replicas spending one join token at the same moment: exactly one join succeeds, the
/// other is told the token was used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_to_spend_one_token_admit_exactly_one() {
    let etcd = meshfed_store::etcd::local::LocalEtcd::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let [a, b] = replicas(&etcd, d.path()).await;
    for round in 0..5 {
        let cluster = format!("east{round}");
        let tok = token(&a, d.path(), &cluster, 900, now());
        let mut claims = Claims::decode(&tok).unwrap();
        let mut via = |f: &Federator, dir: &str| {
            claims.federators = f.advertise().to_vec();
            let mut p = params(d.path(), claims.encode(), &cluster);
            p.state_dir = d.path().join(format!("{cluster}-{dir}"));
            p
        };
        let (pa, pb) = (via(&a, "a"), via(&b, "b"));
        let (ra, rb) = tokio::join!(identity::join(pa), identity::join(pb));
        let oks = [ra.is_ok(), rb.is_ok()];
        assert_eq!(
            oks.iter().filter(|o| **o).count(),
            1,
            "round {round}: {:?} {:?}",
            ra.as_ref().err(),
            rb.as_ref().err()
        );
        let e = format!("{:#}", ra.err().or(rb.err()).unwrap());
        assert!(e.contains("already used"), "round {round}: {e}");
    }
}

/// A replica that loses etcd is not ready and says why; with etcd back it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_etcd_is_not_ready_and_says_why() {
    let mut etcd = meshfed_store::etcd::local::LocalEtcd::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut cfg = FederatorConfig::new(d.path().join("a"), "127.0.0.1:0".parse().unwrap());
    cfg.store = StoreChoice::Etcd(etcd.config("/fed"));
    let a = Federator::start(cfg).await.unwrap();
    let mut store = a.store_version();
    assert_eq!(a.tasks().readiness_report(), Ok(()));
    etcd.kill(0);
    tokio::time::timeout(Duration::from_secs(30), store.wait_for(|v| !v.following))
        .await
        .expect("the replica notices etcd is gone")
        .unwrap();
    let why = a.tasks().readiness_report().unwrap_err();
    assert!(why.contains("state store: etcd:"), "{why}");
    let problems = a.report().unwrap().problems();
    assert!(problems.iter().any(|p| p.contains("etcd")), "{problems:?}");
    etcd.restart(0).unwrap();
    tokio::time::timeout(Duration::from_secs(30), store.wait_for(|v| v.following))
        .await
        .expect("the replica follows etcd again")
        .unwrap();
    assert_eq!(a.tasks().readiness_report(), Ok(()));
}

/// What `cluster`'s lease is, and whether it is connected, as the federator tells the reader
/// of `inbound` (the peer states it pushes).
fn lease_as_told(
    mut inbound: tonic::Streaming<proto::FederatorMessage>,
    cluster: &'static str,
) -> tokio::sync::watch::Receiver<Option<(i32, bool)>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if let Some(proto::federator_message::Kind::Peers(p)) = m.kind {
                let c = p
                    .peers
                    .iter()
                    .find(|c| c.facts.as_ref().is_some_and(|f| f.cluster_id == cluster));
                if let Some(c) = c {
                    tx.send_replace(Some((c.lease, c.connected)));
                }
            }
        }
    });
    rx
}

/// A cluster connected to one replica is fresh on every replica while it heartbeats; frozen,
/// it turns stale on every replica, from etcd's lease (one verdict, not one per replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_verdicts_agree_across_replicas_for_a_frozen_cluster() {
    let etcd = meshfed_store::etcd::local::LocalEtcd::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(2);
    let start = |name: &str| {
        let mut cfg = FederatorConfig::new(d.path().join(name), "127.0.0.1:0".parse().unwrap());
        cfg.lease_ttl = ttl;
        cfg.store = StoreChoice::Etcd(etcd.config("/fed"));
        Federator::start(cfg)
    };
    let (a, b) = (start("a").await.unwrap(), start("b").await.unwrap());
    let join_on = |f: &Federator, cluster: &'static str| {
        let mut claims = Claims::decode(&token(&a, d.path(), cluster, 900, now())).unwrap();
        claims.federators = f.advertise().to_vec();
        identity::join(params(d.path(), claims.encode(), cluster))
    };
    // Each pinned to one replica (a join names both; an agent starts at a random one).
    let pinned = |mut id: ClusterIdentity, f: &Federator| {
        id.file.federators = f.advertise().to_vec();
        id
    };
    let west = pinned(join_on(&a, "west").await.unwrap(), &a);
    let south = pinned(join_on(&b, "south").await.unwrap(), &b);
    let east = pinned(join_on(&b, "east").await.unwrap(), &b);
    let (_wtx, w_in) = open_sync(&west).await;
    let (_stx, s_in) = open_sync(&south).await;
    let mut on_a = lease_as_told(w_in, "east");
    let mut on_b = lease_as_told(s_in, "east");
    // East on b, heartbeating every TTL/5 until frozen.
    let (etx, _e_in) = open_sync(&east).await;
    let (freeze, mut frozen) = tokio::sync::oneshot::channel::<()>();
    let beats = tokio::spawn(async move {
        let mut t = tokio::time::interval(ttl / 5);
        loop {
            tokio::select! {
                _ = t.tick() => {}
                _ = &mut frozen => return etx,
            }
            let beat = ClusterMessage {
                kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
            };
            if etx.send(beat).await.is_err() {
                return etx;
            }
        }
    });
    let (fresh, stale) = (
        proto::LeaseState::Fresh as i32,
        proto::LeaseState::Stale as i32,
    );
    for (replica, rx) in [("a", &mut on_a), ("b", &mut on_b)] {
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|l| *l == Some((fresh, true))),
        )
        .await
        .unwrap_or_else(|_| panic!("east never fresh as replica {replica} tells it"))
        .unwrap();
    }
    for f in [&a, &b] {
        let r = f.report().unwrap();
        let e = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
        assert_eq!((e.lease.as_str(), e.connected), ("fresh", true), "{e:?}");
    }
    // Frozen: the stream stays open and silent.
    freeze.send(()).unwrap();
    let _etx = beats.await.unwrap();
    for (replica, rx) in [("a", &mut on_a), ("b", &mut on_b)] {
        tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|l| l.is_some_and(|l| l.0 == stale)),
        )
        .await
        .unwrap_or_else(|_| panic!("east never stale as replica {replica} tells it"))
        .unwrap();
    }
    for f in [&a, &b] {
        let r = f.report().unwrap();
        let e = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
        assert_eq!(e.lease, "stale", "{e:?}");
    }
}

/// An admin identity of `f`'s federation, issued from the CA in its state directory (what
/// `meshfed federator admin-identity` does).
fn admin_identity(
    env_dir: &Path,
    f: &Federator,
    name: &str,
) -> meshfed_identity::admin::AdminIdentity {
    let ca = meshfed_federation::ca::FederationCa::open(&env_dir.join("fed")).unwrap();
    let svid = ca.issue_admin(name, time::Duration::hours(1)).unwrap();
    let dir = env_dir.join(format!("admin-{name}"));
    let file = meshfed_identity::admin::AdminFile {
        name: name.into(),
        federation_trust_domain: f.trust_domain().to_string(),
        federators: f.advertise().to_vec(),
        expires: now() + 3600,
    };
    meshfed_identity::admin::AdminIdentity::write(&dir, &file, &svid, &ca.bundle()).unwrap();
    meshfed_identity::admin::AdminIdentity::load(&dir).unwrap()
}

fn admin_client(
    id: &meshfed_identity::admin::AdminIdentity,
) -> proto::federation_admin_client::FederationAdminClient<tonic::transport::Channel> {
    proto::federation_admin_client::FederationAdminClient::new(
        meshfed_net::channel(
            id.file.federators.clone(),
            id.client_config().unwrap(),
            "federator",
        )
        .unwrap(),
    )
}

/// The admin API: tokens made, listed and revoked by an operator's certificate, and refused to
/// anyone else (no certificate, a cluster's); bad requests named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_manages_tokens_for_admin_certificates_only() {
    let d = Env::new();
    let f = federator(&d).await;
    let ops = admin_identity(d.path(), &f, "ops");
    let mut api = admin_client(&ops);
    let made = api
        .create_token(proto::CreateJoinTokenRequest {
            cluster: "east".into(),
            ttl_seconds: 600,
            federators: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let rec = made.record.clone().unwrap();
    assert_eq!(rec.cluster, "east");
    let claims = Claims::decode(&made.token).unwrap();
    assert_eq!(
        claims.federators,
        f.advertise().to_vec(),
        "the token names where to join"
    );
    assert_eq!(claims.ca_sha256, f.ca_fingerprint());
    // The token joins, once.
    let east = identity::join(params(d.path(), made.token.clone(), "east"))
        .await
        .unwrap();
    let listed = api
        .list_tokens(proto::ListJoinTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let t = listed.iter().find(|t| t.id == rec.id).unwrap();
    assert_eq!(t.used_by, "east");
    // Revoked: the list says so and it joins no one.
    let other = api
        .create_token(proto::CreateJoinTokenRequest {
            cluster: "west".into(),
            ttl_seconds: 600,
            federators: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let revoked = api
        .revoke_token(proto::RevokeJoinTokenRequest {
            id: other.record.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    let e = join_err(params(d.path(), other.token, "west")).await;
    assert!(e.contains("revoked"), "{e}");
    // Bad requests, each named.
    for (req, needle) in [
        (
            proto::CreateJoinTokenRequest {
                cluster: "East_1".into(),
                ttl_seconds: 600,
                federators: vec![],
            },
            "cluster",
        ),
        (
            proto::CreateJoinTokenRequest {
                cluster: "east2".into(),
                ttl_seconds: 5,
                federators: vec![],
            },
            "ttl_seconds",
        ),
        (
            proto::CreateJoinTokenRequest {
                cluster: "east2".into(),
                ttl_seconds: 600,
                federators: vec!["no-port".into()],
            },
            "federators[0]",
        ),
    ] {
        let s = api.create_token(req).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(needle), "{needle}: {s:?}");
    }
    let s = api
        .revoke_token(proto::RevokeJoinTokenRequest {
            id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");
    // A cluster's certificate is not an admin's.
    let (cfg, _) = east.client_config().unwrap();
    let mut as_cluster = proto::federation_admin_client::FederationAdminClient::new(
        meshfed_net::channel(east.file.federators.clone(), cfg, "federator").unwrap(),
    );
    let s = as_cluster
        .list_tokens(proto::ListJoinTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("cluster identity"), "{s:?}");
    // No certificate at all.
    let verifier = trust::tls::PinnedRootVerifier::new(
        &f.ca_fingerprint(),
        f.trust_domain().clone(),
        trust::tls::Authorizer::Any,
    );
    let cfg = trust::tls::client_config_with(
        trust::tls::SvidResolver::new(),
        std::sync::Arc::new(verifier),
    )
    .unwrap();
    let mut anonymous = proto::federation_admin_client::FederationAdminClient::new(
        meshfed_net::channel(f.advertise().to_vec(), cfg, "federator").unwrap(),
    );
    let s = anonymous
        .evict(proto::EvictRequest {
            cluster: "east".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert_eq!(members(&f), 1, "nothing was evicted");
}

/// `evict`: the cluster's stream ends saying who evicted it and why, its exports leave every
/// importer, its certificate no longer works, the status shows it; evicting it again, or a
/// cluster that never joined, is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_cluster_is_gone_everywhere_and_told_why() {
    let d = Env::new();
    let f = federator(&d).await;
    let east = joined(&f, d.path(), "east").await;
    let west = joined(&f, d.path(), "west").await;
    let (etx, mut ein) = open_sync(&east).await;
    etx.send(exports(1, vec![export("payment", 8080)]))
        .await
        .unwrap();
    export_acked(&mut ein, 1).await;
    let (wtx, mut win) = open_sync(&west).await;
    imports_until(&mut win, &wtx, |d| {
        d.upserts.iter().any(|u| u.source_cluster == "east")
    })
    .await;
    let ops = admin_identity(d.path(), &f, "ops");
    let mut api = admin_client(&ops);
    let rev = api
        .evict(proto::EvictRequest {
            cluster: "east".into(),
            reason: "datacenter decommissioned".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    // East's stream ends, naming the operator and the reason.
    let s = ends_with(&mut ein, "east's stream after the eviction").await;
    assert!(proto::reason::is_left(&s), "{s:?}");
    assert!(
        s.message().contains("evicted by ops") && s.message().contains("datacenter decommissioned"),
        "{s:?}"
    );
    // West is told payment is gone, at the eviction's revision.
    let removal = imports_until(&mut win, &wtx, |d| {
        d.removals
            .iter()
            .any(|k| k.source_cluster == "east" && k.name == "payment")
    })
    .await;
    assert!(removal.revision >= rev);
    // Its certificate is refused from now on.
    let s = sync_until_error(&east, vec![hello(&east)]).await;
    assert!(proto::reason::is_left(&s), "{s:?}");
    let r = f.report().unwrap();
    let c = r.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_eq!(c.lease, "left");
    assert!(
        c.evicted
            .as_deref()
            .is_some_and(|e| e.starts_with("evicted by ops at ")
                && e.ends_with(": datacenter decommissioned")),
        "{:?}",
        c.evicted
    );
    assert_eq!(c.exports, 0);
    for (cluster, code) in [
        ("east", tonic::Code::FailedPrecondition),
        ("north", tonic::Code::NotFound),
    ] {
        let s = api
            .evict(proto::EvictRequest {
                cluster: cluster.into(),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), code, "{cluster}: {s:?}");
        assert!(s.message().contains(cluster), "{s:?}");
    }
    let s = api
        .evict(proto::EvictRequest {
            cluster: "west".into(),
            reason: "line\nbreak".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
}

/// Members are told where every replica is: on connect, and when a replica joins later (the
/// agent keeps the addresses with its identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hear_of_a_replica_added_after_they_joined() {
    let etcd = meshfed_store::etcd::local::LocalEtcd::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let mut cfg = FederatorConfig::new(d.path().join(name), "127.0.0.1:0".parse().unwrap());
        cfg.store = StoreChoice::Etcd(etcd.config("/fed"));
        cfg.replica_poll = Duration::from_millis(100);
        Federator::start(cfg)
    };
    let a = start("a").await.unwrap();
    let mut east = joined(&a, d.path(), "east").await;
    assert_eq!(east.file.federators, a.advertise().to_vec());
    let (_etx, mut ein) = open_sync(&east).await;
    let mut told = Vec::new();
    let mut next_addresses = async || loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ein.message())
            .await
            .expect("the federator's addresses")
            .unwrap()
            .unwrap();
        if let Some(proto::federator_message::Kind::Endpoints(e)) = m.kind {
            return e.addresses;
        }
    };
    told.push(next_addresses().await);
    assert_eq!(told[0], a.advertise().to_vec(), "on connect");
    let b = start("b").await.unwrap();
    let mut both = [a.advertise().to_vec(), b.advertise().to_vec()].concat();
    both.sort();
    told.push(next_addresses().await);
    assert_eq!(told[1], both, "after replica b started");
    // What the agent does with them: kept with the identity, for its next connection.
    assert!(east.set_federators(&told[1]).unwrap());
    assert!(!east.set_federators(&told[1]).unwrap(), "unchanged");
    let reloaded = ClusterIdentity::load(&d.path().join("east")).unwrap();
    assert_eq!(reloaded.file.federators, both);
    assert!(east.set_federators(&["nohost".into()]).is_err());
    assert!(east.set_federators(&[]).is_err());
    assert_eq!(
        ClusterIdentity::load(&d.path().join("east"))
            .unwrap()
            .file
            .federators,
        both,
        "bad addresses change nothing"
    );
    drop(b);
}

/// Waits (yielding, bounded) until `f`'s status says `cluster` acknowledged `rev`.
async fn acked_at_least(f: &Federator, cluster: &str, rev: u64) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let r = f.report().unwrap();
            if r.clusters
                .iter()
                .any(|c| c.cluster == cluster && c.imports_acked_revision >= rev)
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{cluster} never acknowledged {rev}"));
}

/// The next import delta on `inbound` that `want`s, acknowledging the ones before it on `ack`.
async fn imports_until(
    inbound: &mut tonic::Streaming<proto::FederatorMessage>,
    ack: &tokio::sync::mpsc::Sender<ClusterMessage>,
    want: impl Fn(&proto::ImportDelta) -> bool,
) -> proto::ImportDelta {
    loop {
        let d = next_imports(inbound).await;
        if want(&d) {
            return d;
        }
        ack.send(import_ack(d.revision)).await.unwrap();
    }
}

/// The next import delta on `inbound`.
async fn next_imports(
    inbound: &mut tonic::Streaming<proto::FederatorMessage>,
) -> proto::ImportDelta {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), inbound.message())
            .await
            .expect("an import delta")
            .unwrap()
            .expect("the stream stays open");
        if let Some(proto::federator_message::Kind::Imports(d)) = m.kind {
            return d;
        }
    }
}

/// [`export_acked`] for a cluster that also acknowledges every import delta it is sent.
async fn export_acked_acking(
    inbound: &mut tonic::Streaming<proto::FederatorMessage>,
    tx: &tokio::sync::mpsc::Sender<ClusterMessage>,
    version: u64,
) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("an acknowledgement")
            .unwrap()
            .expect("the stream stays open");
        match m.kind {
            Some(proto::federator_message::Kind::ExportAck(a)) => {
                assert_eq!((a.version, a.error.as_str()), (version, ""));
                return;
            }
            Some(proto::federator_message::Kind::Imports(d)) => {
                tx.send(import_ack(d.revision)).await.unwrap();
            }
            _ => {}
        }
    }
}

fn import_ack(revision: u64) -> ClusterMessage {
    ClusterMessage {
        kind: Some(Kind::ImportAck(proto::ImportAck {
            revision,
            error: String::new(),
        })),
    }
}

/// Tombstones are dropped only once every member acknowledged them; a member that reconnects
/// having applied less than the dropped ones' floor is resynced from scratch (it may have
/// missed a removal), one at or above it gets only what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_go_once_every_member_read_them_and_a_member_behind_is_resynced() {
    let d = Env::new();
    let mut cfg = d.config();
    cfg.tombstone_compaction = None;
    let f = Federator::start(cfg).await.unwrap();
    let east = joined(&f, d.path(), "east").await;
    let west = joined(&f, d.path(), "west").await;
    let (etx, mut ein) = open_sync(&east).await;
    let (wtx, mut win) = open_sync(&west).await;
    etx.send(exports(1, vec![export("a", 80), export("b", 81)]))
        .await
        .unwrap();
    export_acked_acking(&mut ein, &etx, 1).await;
    let first = imports_until(&mut win, &wtx, |d| !d.upserts.is_empty()).await;
    assert_eq!(first.upserts.len(), 2);
    wtx.send(import_ack(first.revision)).await.unwrap();
    let r1 = first.revision;
    etx.send(ClusterMessage {
        kind: Some(Kind::Exports(ExportDelta {
            version: 2,
            full: false,
            upserts: vec![],
            removals: vec![proto::ServiceKey {
                namespace: "shop".into(),
                name: "a".into(),
            }],
        })),
    })
    .await
    .unwrap();
    export_acked_acking(&mut ein, &etx, 2).await;
    let removal = imports_until(&mut win, &wtx, |d| !d.removals.is_empty()).await;
    assert_eq!(removal.removals.len(), 1);
    let r2 = removal.revision;
    acked_at_least(&f, "west", r1).await;
    // West has not acknowledged the removal: its tombstone stays.
    assert_eq!(f.compact_tombstones().unwrap(), 0);
    assert_eq!(f.report().unwrap().store.tombstones, 1);
    wtx.send(import_ack(r2)).await.unwrap();
    acked_at_least(&f, "west", r2).await;
    acked_at_least(&f, "east", r2).await;
    assert_eq!(f.compact_tombstones().unwrap(), 1);
    let store = f.report().unwrap().store;
    assert_eq!((store.tombstones, store.floor), (0, r2));
    assert!(f
        .metrics_text()
        .contains("meshfed_federation_tombstones_compacted_total 1"));
    drop((wtx, win));

    // West back from an older state (it applied r1 only): resynced from scratch.
    let resume = |applied: u64| ClusterMessage {
        kind: Some(Kind::Hello(Hello {
            observer: false,
            facts: Some(west.facts()),
            imports_applied_revision: applied,
            federation_bundle_sequence: 0,
        })),
    };
    let mut c = client(&west).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(resume(r1)).await.unwrap();
    let mut inbound = c.sync(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let reset = next_imports(&mut inbound).await;
    assert!(reset.full && reset.upserts.is_empty(), "{reset:?}");
    let again = imports_until(&mut inbound, &tx, |d| !d.upserts.is_empty()).await;
    assert_eq!(
        again
            .upserts
            .iter()
            .map(|u| u.export.as_ref().unwrap().name.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    drop((tx, inbound));
    // From r2 on: only the next change, no resync.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(resume(r2)).await.unwrap();
    let mut inbound = c.sync(ReceiverStream::new(rx)).await.unwrap().into_inner();
    etx.send(exports(3, vec![export("c", 82)])).await.unwrap();
    export_acked_acking(&mut ein, &etx, 3).await;
    let next = imports_until(&mut inbound, &tx, |d| d.full || !d.upserts.is_empty()).await;
    assert!(!next.full, "{next:?}");
    assert_eq!(next.upserts.len(), 1);
}
