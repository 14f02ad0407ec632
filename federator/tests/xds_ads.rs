//! The agent's ADS server against a Rust ADS client (envoy-types' generated client): SotW and
//! Delta, ACK/NACK tracking, no resend of unchanged resources, per-class EDS sharing, bad
//! nodes, and golden Envoy JSON of what is generated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshfed_failover::Loc;
use meshfed_model::policy::PolicySet;
use meshfed_model::snapshot::Snapshot;
use meshfed_net::drain::{Signal, Tasks};
use meshfed_xds::generation::Generation;
use meshfed_xds::node::LocalFacts;
use meshfed_xds::server::{Ads, XdsState};
use meshfed_xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE};
use prost::Message;
use proto::{ClusterFacts, Endpoint, LeaseState, PeerCluster, Port, ServiceExport};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

fn local() -> LocalFacts {
    LocalFacts {
        cluster: "east".into(),
        network: "east-net".into(),
        locality: Loc::new("us-east1", "us-east1-b", ""),
        trust_domain: "east.mesh".into(),
    }
}

fn ep(addr: &str, region: &str, zone: &str) -> Endpoint {
    Endpoint {
        address: addr.into(),
        locality: Some(proto::Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        }),
        weight: 1,
        healthy: true,
        service_account: "payment".into(),
        ..Default::default()
    }
}

fn export(name: &str, port: u32, eps: Vec<Endpoint>, tls: bool) -> ServiceExport {
    let mut labels = std::collections::HashMap::new();
    if tls {
        labels.insert("security.istio.io/tlsMode".to_string(), "istio".to_string());
    }
    ServiceExport {
        namespace: "shop".into(),
        name: name.into(),
        ports: vec![Port {
            name: "http".into(),
            port,
            protocol: "TCP".into(),
            app_protocol: String::new(),
        }],
        endpoints: eps,
        labels,
        ..Default::default()
    }
}

/// east (local) and west (another network, two endpoints behind one gateway).
fn snapshot(west_eps: usize) -> Snapshot {
    let mut s = Snapshot {
        facts: ClusterFacts {
            cluster_id: "east".into(),
            network: "east-net".into(),
            trust_domain: "east.mesh".into(),
            gateways: vec!["192.0.2.10:15443".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    s.local.insert(
        "shop/payment".into(),
        export(
            "payment",
            8080,
            vec![
                ep("10.1.0.5", "us-east1", "us-east1-b"),
                ep("10.1.0.6", "us-east1", "us-east1-c"),
            ],
            true,
        )
        .into(),
    );
    let west: Vec<Endpoint> = (0..west_eps)
        .map(|i| ep(&format!("10.2.0.{}", i + 5), "us-west1", "us-west1-a"))
        .collect();
    s.imports.insert(
        ("west".into(), "shop/payment".into()),
        export("payment", 8080, west, true).into(),
    );
    s.imports.insert(
        ("west".into(), "shop/ledger".into()),
        export(
            "ledger",
            9090,
            vec![ep("10.2.1.5", "us-west1", "us-west1-a")],
            false,
        )
        .into(),
    );
    s.peers.insert(
        "west".into(),
        PeerCluster {
            facts: Some(ClusterFacts {
                cluster_id: "west".into(),
                network: "west-net".into(),
                trust_domain: "west.mesh".into(),
                gateways: vec!["192.0.2.20:15443".into()],
                ..Default::default()
            }),
            lease: LeaseState::Fresh as i32,
            connected: true,
            last_heartbeat_age_ms: 1,
            heartbeat_seen: true,
        },
    );
    s
}

const POLICY: &str = "apiVersion: meshfed.io/v1alpha1
kind: FailoverPolicy
metadata: {name: payment, namespace: shop}
spec:
  host: payment.shop.svc.cluster.local
  outlierDetection: {consecutive5xxErrors: 3, interval: 1s}
";

fn policies() -> PolicySet {
    PolicySet::from_sources(&[("p.yaml".into(), POLICY.into())]).unwrap()
}

fn publish(state: &XdsState, version: u64, snap: &Snapshot) {
    state.gens.send_replace(Arc::new(Generation::build(
        version,
        snap,
        &policies(),
        &local(),
    )));
}

async fn serve(state: Arc<XdsState>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Ads::server(state, false, Signal::never()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    format!("http://{addr}")
}

fn node(id: &str, zone: &str, grpc: bool) -> Node {
    Node {
        id: id.into(),
        user_agent_name: if grpc {
            "gRPC C-core linux Python"
        } else {
            "envoy"
        }
        .into(),
        locality: Some(Locality {
            region: "us-east1".into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    }
}

async fn next(rx: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .expect("a response")
        .unwrap()
        .unwrap()
}

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(url: &str) -> Sotw {
        let mut c = AggregatedDiscoveryServiceClient::connect(url.to_string())
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = c
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Sotw { tx, rx }
    }

    async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.next())
            .await
            .expect("a response")
            .unwrap()
            .unwrap()
    }

    async fn nothing(&mut self, ms: u64) {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(ms), self.rx.next()).await {
            panic!(
                "unexpected response: {:?}",
                r.map(|r| (r.type_url, r.resources.len()))
            );
        }
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            type_url: r.type_url.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }
}

fn cla(r: &DiscoveryResponse) -> Vec<ClusterLoadAssignment> {
    r.resources
        .iter()
        .map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).unwrap())
        .collect()
}

const PAYMENT: &str = "outbound|8080||payment.shop.svc.cluster.local";

#[tokio::test]
async fn sotw_priorities_split_horizon_acks_nacks_and_no_resend() {
    let reg = prometheus::Registry::new();
    let state = XdsState::new(local(), &reg);
    publish(&state, 1, &snapshot(2));
    let url = serve(state.clone()).await;
    let mut s = Sotw::open(&url).await;
    s.send(DiscoveryRequest {
        node: Some(node(
            "sidecar~10.1.0.9~c.shop~shop.svc.cluster.local",
            "us-east1-b",
            true,
        )),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await;
    let cds = s.recv().await;
    assert_eq!(cds.resources.len(), 2, "payment and ledger");
    s.ack(&cds, &[]).await;
    s.send(DiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names: vec![PAYMENT.into()],
        ..Default::default()
    })
    .await;
    let eds = s.recv().await;
    let c = &cla(&eds)[0];
    // Own zone, other zone of the region, then west's gateway standing for both west endpoints.
    let rows: Vec<(u32, String, u32, Vec<String>)> = c
        .endpoints
        .iter()
        .map(|l| {
            (
                l.priority,
                l.locality.clone().unwrap().zone,
                l.load_balancing_weight.unwrap().value,
                l.lb_endpoints
                    .iter()
                    .map(|e| match &e.host_identifier {
                        Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                            match &ep.address.as_ref().unwrap().address {
                                Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => format!(
                                    "{}:{}",
                                    sa.address,
                                    match sa.port_specifier {
                                        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p,
                                        _ => 0,
                                    }
                                ),
                                _ => String::new(),
                            }
                        }
                        _ => String::new(),
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, "us-east1-b".into(), 1, vec!["10.1.0.5:8080".into()]),
            (1, "us-east1-c".into(), 1, vec!["10.1.0.6:8080".into()]),
            (2, "us-west1-a".into(), 2, vec!["192.0.2.20:15443".into()]),
        ]
    );
    s.ack(&eds, &[PAYMENT]).await;

    // The same content again: nothing is sent.
    publish(&state, 2, &snapshot(2));
    s.nothing(400).await;

    // One more west endpoint: only EDS of payment changes (the gateway's weight).
    publish(&state, 3, &snapshot(3));
    let eds = s.recv().await;
    assert_eq!(eds.type_url, ENDPOINT_TYPE);
    let c = &cla(&eds)[0];
    assert_eq!(c.endpoints[2].load_balancing_weight.unwrap().value, 3);
    s.nothing(300).await;

    // A NACK is recorded with the client's error.
    s.send(DiscoveryRequest {
        version_info: "1".into(),
        response_nonce: eds.nonce.clone(),
        type_url: ENDPOINT_TYPE.into(),
        resource_names: vec![PAYMENT.into()],
        error_detail: Some(RpcStatus {
            code: 3,
            message: "priority 2 >= number of localities".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    eventually(&state, "the NACK is recorded", || {
        state.proxies.report()[0].types["endpoint"].state == meshfed_xds::status::SyncState::Nack
    })
    .await;
    let report = state.proxies.report();
    let t = &report[0].types["endpoint"];
    assert_eq!(t.state, meshfed_xds::status::SyncState::Nack);
    assert_eq!(
        t.error.as_deref(),
        Some("priority 2 >= number of localities")
    );
    assert_eq!(
        report[0].types["cluster"].state,
        meshfed_xds::status::SyncState::Synced
    );
    let m = meshfed_net::metrics::render(&reg);
    assert!(
        m.contains("meshfed_xds_nacks_total{kind=\"endpoint\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn proxies_of_one_class_share_one_table() {
    let state = XdsState::new(local(), &prometheus::Registry::new());
    publish(&state, 1, &snapshot(2));
    let url = serve(state.clone()).await;
    let mut streams = Vec::new();
    for i in 0..40 {
        let zone = if i % 2 == 0 {
            "us-east1-b"
        } else {
            "us-east1-c"
        };
        let mut s = Sotw::open(&url).await;
        s.send(DiscoveryRequest {
            node: Some(node(
                &format!("sidecar~10.1.1.{i}~p{i}.shop~shop.svc.cluster.local"),
                zone,
                false,
            )),
            type_url: ENDPOINT_TYPE.into(),
            resource_names: vec![PAYMENT.into()],
            ..Default::default()
        })
        .await;
        let r = s.recv().await;
        let c = &cla(&r)[0];
        assert_eq!(
            c.endpoints[0].locality.clone().unwrap().zone,
            zone,
            "own zone first"
        );
        streams.push(s);
    }
    let g = state.current();
    assert_eq!(
        g.eds_computed.load(Ordering::Relaxed),
        2,
        "one table per locality, not per proxy"
    );
    assert_eq!(state.proxies.len(), 40);
    drop(streams);
    eventually(&state, "closed streams are forgotten", || {
        state.proxies.is_empty()
    })
    .await;
}

/// east's view with payment and ledger as east's own services, exported or not as given.
fn gateway_snapshot(exported: &[&str]) -> Snapshot {
    let mut s = snapshot(2);
    s.local.insert(
        "shop/ledger".into(),
        export(
            "ledger",
            9090,
            vec![ep("10.1.1.5", "us-east1", "us-east1-b")],
            false,
        )
        .into(),
    );
    s.exported = exported.iter().map(|k| k.to_string()).collect();
    s
}

#[tokio::test]
async fn delta_sends_changes_and_removals_only() {
    let state = XdsState::new(local(), &prometheus::Registry::new());
    publish(
        &state,
        1,
        &gateway_snapshot(&["shop/payment", "shop/ledger"]),
    );
    let url = serve(state.clone()).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(url.clone())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut rx = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        node: Some(node("router~10.1.0.2~gw~east", "us-east1-b", false)),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    // A gateway is sent the clusters of east's exported services only (west's imports are not
    // east's to route).
    let mut names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "outbound|8080||payment.shop.svc.cluster.local",
            "outbound|9090||ledger.shop.svc.cluster.local"
        ]
    );
    let versions: std::collections::HashMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names_subscribe: vec![PAYMENT.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    let c =
        ClusterLoadAssignment::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice())
            .unwrap();
    // A gateway gets only its own network's endpoints, all at priority 0.
    let n: usize = c.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(n, 2);
    assert!(c.endpoints.iter().all(|l| l.priority == 0));

    // ledger is no longer exported (it still runs in east): CDS says so in removed_resources,
    // nothing else is resent.
    publish(&state, 2, &gateway_snapshot(&["shop/payment"]));
    let r = next(&mut rx).await;
    assert_eq!(r.type_url, CLUSTER_TYPE);
    assert!(r.resources.is_empty());
    assert_eq!(
        r.removed_resources,
        vec!["outbound|9090||ledger.shop.svc.cluster.local".to_string()]
    );
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.next())
        .await
        .is_err());
    drop(tx);

    // A reconnecting client that already holds payment's cluster is not sent it again.
    let (tx, rx2) = mpsc::channel(16);
    let mut rx2 = client
        .delta_aggregated_resources(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        node: Some(node("router~10.1.0.2~gw~east", "us-east1-b", false)),
        type_url: CLUSTER_TYPE.into(),
        initial_resource_versions: [(PAYMENT.to_string(), versions[PAYMENT].clone())]
            .into_iter()
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx2).await;
    assert!(
        r.resources.is_empty(),
        "{:?}",
        r.resources.iter().map(|x| &x.name).collect::<Vec<_>>()
    );
}

/// A gateway asking by name for a service east does not export gets nothing: not its cluster,
/// not its endpoints; a sidecar of east still gets both.
#[test]
fn gateways_get_only_exported_services() {
    use meshfed_xds::Kind;
    let g = Generation::build(
        1,
        &gateway_snapshot(&["shop/payment"]),
        &policies(),
        &local(),
    );
    let router = meshfed_xds::node::ProxyNode::from_node(
        &node("router~10.1.0.2~gw~east", "us-east1-b", false),
        &local(),
    )
    .unwrap();
    const LEDGER: &str = "outbound|9090||ledger.shop.svc.cluster.local";
    assert!(g.get(Kind::Cluster, LEDGER, &router).is_none());
    assert!(g.get(Kind::Endpoint, LEDGER, &router).is_none());
    assert!(g.get(Kind::Cluster, PAYMENT, &router).is_some());
    let names: Vec<String> = g
        .all(Kind::Cluster, &router)
        .iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(names, [PAYMENT]);
    let side = sidecar(false);
    assert!(g.get(Kind::Cluster, LEDGER, &side).is_some());
    assert!(g.get(Kind::Endpoint, LEDGER, &side).is_some());
}

/// The process's drain ends every ADS stream with UNAVAILABLE (the proxy reconnects and keeps
/// its configuration meanwhile), and the server stops within the deadline.
#[tokio::test]
async fn a_drain_ends_ads_streams_with_unavailable_and_stops_the_port() {
    let state = XdsState::new(local(), &prometheus::Registry::new());
    publish(&state, 1, &snapshot(2));
    let tasks = Tasks::new();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let svc = Ads::server(state.clone(), false, tasks.signal());
    tasks.spawn_server("xDS", |drain| async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(l),
                drain.drained_owned(),
            )
            .await
            .unwrap();
    });
    let mut client = AggregatedDiscoveryServiceClient::connect(url.clone())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut rx = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        node: Some(node(
            "sidecar~10.1.0.9~c.shop~shop.svc.cluster.local",
            "us-east1-b",
            false,
        )),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(next(&mut rx).await.resources.len(), 2);
    let report = tasks.drain(Duration::from_secs(10)).await;
    let end = tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .expect("the stream ends");
    let status = end.expect("an error, not a clean end").unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the agent is shutting down");
    assert!(report.aborted.is_empty(), "{report}");
    assert!(tasks.running().is_empty());
    assert!(AggregatedDiscoveryServiceClient::connect(url)
        .await
        .is_err());
    drop(tx);
}

#[tokio::test]
async fn bad_nodes_are_refused_with_the_reason() {
    let state = XdsState::new(local(), &prometheus::Registry::new());
    publish(&state, 1, &snapshot(1));
    let url = serve(state.clone()).await;
    for (n, want) in [
        (None, "must carry the node"),
        (Some(Node::default()), "node.id is empty"),
        (
            Some(Node {
                id: "x".repeat(600),
                ..Default::default()
            }),
            "at most 512",
        ),
    ] {
        let mut s = Sotw::open(&url).await;
        s.send(DiscoveryRequest {
            node: n,
            type_url: LISTENER_TYPE.into(),
            ..Default::default()
        })
        .await;
        let e = tokio::time::timeout(Duration::from_secs(5), s.rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(want), "{}", e.message());
    }
    assert_eq!(state.proxies.len(), 0);

    // A resource name of 2000 bytes ends the stream with a named reason.
    let mut s = Sotw::open(&url).await;
    s.send(DiscoveryRequest {
        node: Some(node(
            "sidecar~1~x.shop~shop.svc.cluster.local",
            "us-east1-b",
            true,
        )),
        type_url: ENDPOINT_TYPE.into(),
        resource_names: vec!["n".repeat(2000)],
        ..Default::default()
    })
    .await;
    let e = tokio::time::timeout(Duration::from_secs(5), s.rx.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("2000 bytes"), "{}", e.message());
    // Garbage bytes on the wire are a transport error for that connection, not a crash.
    let addr = url.trim_start_matches("http://");
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"\x16\x03\x01garbage-not-http2\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut raw, &mut buf),
    )
    .await;
    let mut s = Sotw::open(&url).await;
    s.send(DiscoveryRequest {
        node: Some(node(
            "sidecar~2~y.shop~shop.svc.cluster.local",
            "us-east1-b",
            true,
        )),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        s.recv().await.type_url,
        CLUSTER_TYPE,
        "the server still serves"
    );
}

/// The test sidecar in us-east1-b, as Envoy (`false`) or proxyless gRPC (`true`).
fn sidecar(grpc: bool) -> meshfed_xds::node::ProxyNode {
    meshfed_xds::node::ProxyNode::from_node(
        &node(
            "sidecar~10.1.0.9~c.shop~shop.svc.cluster.local",
            "us-east1-b",
            grpc,
        ),
        &local(),
    )
    .unwrap()
}

/// Generated Envoy resources, decoded again by envoy-types and rendered as Envoy JSON, must
/// match the golden files (set MESHFED_UPDATE_GOLDEN=1 to rewrite them after a deliberate change).
#[test]
fn generated_resources_match_golden_envoy_json() {
    let g = Generation::build(1, &snapshot(2), &policies(), &local());
    let envoy = sidecar(false);
    let grpc = sidecar(true);
    use meshfed_xds::Kind;
    let cases = [
        (
            "cluster-envoy-mtls",
            g.get(Kind::Cluster, PAYMENT, &envoy).unwrap(),
        ),
        (
            "cluster-grpc-mtls",
            g.get(Kind::Cluster, PAYMENT, &grpc).unwrap(),
        ),
        (
            "listener-grpc",
            g.get(Kind::Listener, "payment.shop.svc.cluster.local:8080", &grpc)
                .unwrap(),
        ),
        (
            "route-grpc",
            g.get(Kind::Route, "payment.shop.svc.cluster.local:8080", &grpc)
                .unwrap(),
        ),
        (
            "endpoints-us-east1-b",
            g.get(Kind::Endpoint, PAYMENT, &envoy).unwrap(),
        ),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("MESHFED_UPDATE_GOLDEN").is_some();
    for (name, res) in cases {
        // Round trip through envoy-types' own types.
        let bytes = &res.any.value;
        let again = match name {
            n if n.starts_with("cluster") => {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(bytes.as_slice())
                    .unwrap()
                    .encode_to_vec()
            }
            n if n.starts_with("listener") => {
                envoy_types::pb::envoy::config::listener::v3::Listener::decode(bytes.as_slice())
                    .unwrap()
                    .encode_to_vec()
            }
            n if n.starts_with("route") => {
                envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
                    bytes.as_slice(),
                )
                .unwrap()
                .encode_to_vec()
            }
            _ => ClusterLoadAssignment::decode(bytes.as_slice())
                .unwrap()
                .encode_to_vec(),
        };
        assert_eq!(&again, bytes, "{name} round-trips");
        let json = serde_json::to_string_pretty(&meshfed_xds::json::any_to_json(&res.any).unwrap())
            .unwrap()
            + "\n";
        let path = dir.join(format!("{name}.json"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &json).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap();
        assert_eq!(json, want, "{name} differs from {}", path.display());
    }
}

/// The mTLS port: clients present an SVID of the cluster's trust domain and speak only for
/// their own namespace; other trust domains and clients without a certificate are refused.
#[tokio::test]
async fn mtls_port_requires_an_svid_of_the_cluster_and_its_own_namespace() {
    use trust::ca::policy::AnyWorkload;
    use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
    use trust::{BundleSet, CaOptions, CertificateAuthority, SpiffeId, TrustDomain, TrustStore};

    let east_td = TrustDomain::new("east.mesh").unwrap();
    let east = CertificateAuthority::create(east_td.clone(), CaOptions::default()).unwrap();
    let west =
        CertificateAuthority::create(TrustDomain::new("west.mesh").unwrap(), CaOptions::default())
            .unwrap();
    let agent_id = SpiffeId::istio_workload(&east_td, "meshfed-system", "meshfed-agent").unwrap();
    let store = || {
        let mut set = BundleSet::new();
        set.insert(east.bundle()).unwrap();
        TrustStore::new(set)
    };
    let server_svid = east
        .issue_svid(&agent_id, &AnyWorkload, time::Duration::hours(1))
        .unwrap();
    // The agent's own configuration of the port.
    let tls = meshfed_xds::serve::mtls_server_config(
        store(),
        &east_td,
        SvidResolver::with(&server_svid).unwrap(),
    )
    .unwrap();
    let state = XdsState::new(local(), &prometheus::Registry::new());
    publish(&state, 1, &snapshot(1));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Ads::server(state.clone(), true, Signal::never()))
            .serve_with_incoming(meshfed_net::tls_incoming(l, tls)),
    );
    let client = |resolver: Arc<SvidResolver>| {
        let cfg = trust::tls::client_config(
            resolver,
            SpiffeVerifier::new(store(), Authorizer::id(agent_id.clone())),
        )
        .unwrap();
        AggregatedDiscoveryServiceClient::new(
            meshfed_net::channel(vec![addr.clone()], cfg, "meshfed-agent").unwrap(),
        )
    };
    let open = |mut c: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
                ns: &'static str| async move {
        let (tx, rx) = mpsc::channel(4);
        let mut n = node(
            "sidecar~10.1.0.9~c.shop~shop.svc.cluster.local",
            "us-east1-b",
            true,
        );
        let mut md = envoy_types::pb::google::protobuf::Struct::default();
        md.fields.insert(
            "NAMESPACE".into(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                    ns.into(),
                )),
            },
        );
        n.metadata = Some(md);
        tx.send(DiscoveryRequest {
            node: Some(n),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let r = match c.stream_aggregated_resources(ReceiverStream::new(rx)).await {
            Ok(s) => tokio::time::timeout(Duration::from_secs(5), s.into_inner().next())
                .await
                .unwrap()
                .unwrap(),
            Err(e) => Err(e),
        };
        drop(tx);
        r
    };
    let shop = SpiffeId::istio_workload(&east_td, "shop", "client").unwrap();
    let shop_svid = east
        .issue_svid(&shop, &AnyWorkload, time::Duration::hours(1))
        .unwrap();
    let ok = open(client(SvidResolver::with(&shop_svid).unwrap()), "shop")
        .await
        .unwrap();
    assert_eq!(ok.type_url, CLUSTER_TYPE);
    assert_eq!(
        state
            .proxies
            .report()
            .first()
            .and_then(|p| p.identity.clone())
            .as_deref(),
        Some("spiffe://east.mesh/ns/shop/sa/client")
    );
    // The same certificate claiming another namespace.
    let e = open(client(SvidResolver::with(&shop_svid).unwrap()), "payments")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("namespace \"shop\""),
        "{}",
        e.message()
    );
    // Another trust domain's workload: no TLS session.
    let w = SpiffeId::istio_workload(&TrustDomain::new("west.mesh").unwrap(), "shop", "client")
        .unwrap();
    let w_svid = west
        .issue_svid(&w, &AnyWorkload, time::Duration::hours(1))
        .unwrap();
    let e = open(client(SvidResolver::with(&w_svid).unwrap()), "shop")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("fatal alert"), "{e:?}");
    // No certificate at all (a pod on its way to the CA API): the session opens, ADS refuses.
    let e = open(client(SvidResolver::new()), "shop").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("present an SVID"), "{}", e.message());
}

/// A workload that listens elsewhere for a named port (WorkloadEntry `ports`, e.g. a VM whose
/// `http` is 9080 while the service port is 8080) gets that port in EDS; other endpoints keep
/// the service port, and another network's endpoints stay behind its gateway (which resolves
/// the target port in its own cluster).
#[test]
fn named_target_ports_of_workloads_reach_eds() {
    let mut snap = snapshot(1);
    let mut vm = ep("10.1.0.7", "us-east1", "us-east1-b");
    vm.ports.insert("http".into(), 9080);
    let mut other = ep("10.1.0.8", "us-east1", "us-east1-b");
    other.ports.insert("grpc".into(), 7070); // names no port of this service: ignored
    if let Some(p) = snap.local.get_mut("shop/payment").map(Arc::make_mut) {
        p.endpoints.push(vm);
        p.endpoints.push(other);
    }
    let g = Generation::build(1, &snap, &policies(), &local());
    let envoy = sidecar(false);
    let res = g.get(meshfed_xds::Kind::Endpoint, PAYMENT, &envoy).unwrap();
    let cla = ClusterLoadAssignment::decode(res.any.value.as_slice()).unwrap();
    let mut addrs: Vec<String> = meshfed_xds::client::endpoints(&cla)
        .into_iter()
        .map(|e| e.1)
        .collect();
    addrs.sort();
    assert_eq!(
        addrs,
        [
            "10.1.0.5:8080",
            "10.1.0.6:8080",
            "10.1.0.7:9080",
            "10.1.0.8:8080",
            "192.0.2.20:15443"
        ]
    );
    // Federation input is checked: a port outside 1-65535 or a bad name is refused by name.
    let mut bad = export("payment", 8080, vec![ep("10.1.0.7", "us-east1", "")], true);
    bad.endpoints[0].ports.insert("http".into(), 70000);
    let e = meshfed_model::validate::check_export(&bad, "upserts[0]").unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.reason.as_str()),
        (
            "upserts[0].endpoints[0].ports[\"http\"]",
            "70000 is not in 1-65535"
        )
    );
    assert_eq!(
        e.to_string(),
        "upserts[0].endpoints[0].ports[\"http\"]: 70000 is not in 1-65535"
    );
    bad.endpoints[0].ports.clear();
    bad.endpoints[0].ports.insert("Not_A_Label".into(), 80);
    let e = meshfed_model::validate::check_export(&bad, "upserts[0]").unwrap_err();
    assert_eq!(e.field, "upserts[0].endpoints[0].ports key", "{e}");
}

/// Waits until `cond` holds, re-checking on every change of the proxy registry (connect, leave,
/// ACK, NACK); fails after 10 s.
async fn eventually(state: &XdsState, what: &str, cond: impl Fn() -> bool) {
    let mut changes = state.proxies.subscribe();
    let wait = async {
        loop {
            changes.borrow_and_update();
            if cond() {
                return;
            }
            changes.changed().await.expect("the registry lives");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting: {what}"));
}

/// A push of 10,000 services (about 4 MB of endpoints) reaches a client that answers every
/// response with an ACK naming all 10,000 clusters (as Envoy's SotW EDS does) and stops
/// reading while it cannot send; the push comes in at most MAX_CHUNKS responses, not
/// thousands of 4 KiB ones. (The stall this guards against was seen in the kube_source
/// benchmark, where east's initial push stopped after 473 responses; this test with the old
/// server did not reproduce it, so it checks completion and the response count.)
#[tokio::test]
async fn a_large_push_reaches_a_client_that_acks_every_response_with_every_name() {
    const N: usize = 10_000;
    let reg = prometheus::Registry::new();
    let state = XdsState::new(local(), &reg);
    let mut snap = snapshot(1);
    for i in 0..N {
        let eps = (0..10)
            .map(|e| {
                ep(
                    &format!("10.{}.{}.{}", 3 + i / 250, i % 250, e + 1),
                    "us-west1",
                    "us-west1-a",
                )
            })
            .collect();
        snap.imports.insert(
            ("west".into(), format!("shop/svc-{i}")),
            export(&format!("svc-{i}"), 8080, eps, false).into(),
        );
    }
    publish(&state, 1, &snap);
    let url = serve(state.clone()).await;
    let mut c = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .unwrap();
    // A one-slot queue: the client waits for each ACK to be taken before it reads on.
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(node(
            "sidecar~10.1.0.9~big.shop~shop.svc.cluster.local",
            "us-east1-b",
            false,
        )),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = c
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let run = async {
        let mut names: Vec<String> = Vec::new();
        let mut got = std::collections::BTreeSet::new();
        let mut eds_responses = 0;
        while let Some(r) = rx.next().await {
            let r = r.unwrap();
            if r.type_url == CLUSTER_TYPE {
                names = r
                    .resources
                    .iter()
                    .map(|a| {
                        envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(
                            a.value.as_slice(),
                        )
                        .unwrap()
                        .name
                    })
                    .collect();
                tx.send(DiscoveryRequest {
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    type_url: CLUSTER_TYPE.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
                tx.send(DiscoveryRequest {
                    type_url: ENDPOINT_TYPE.into(),
                    resource_names: names.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
                continue;
            }
            eds_responses += 1;
            for c in cla(&r) {
                got.insert(c.cluster_name);
            }
            tx.send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: ENDPOINT_TYPE.into(),
                resource_names: names.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
            if !names.is_empty() && got.len() == names.len() {
                return (names.len(), eds_responses);
            }
        }
        panic!(
            "the stream ended with {} of {} tables",
            got.len(),
            names.len()
        );
    };
    // A bound on failure only: the test ends as soon as every table arrived.
    let (tables, responses) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("every table arrives");
    assert!(tables > N, "{tables} clusters");
    assert!(
        responses <= meshfed_xds::server::MAX_CHUNKS,
        "{responses} EDS responses for one push"
    );
}

/// A new generation takes over the EDS tables of the service ports that did not change and
/// computes the changed one again; a change of gateways takes over nothing.
#[test]
fn unchanged_services_keep_their_tables_across_generations() {
    const LEDGER: &str = "outbound|9090||ledger.shop.svc.cluster.local";
    let p = sidecar(false);
    let snap = snapshot(2);
    let g1 = Generation::build(1, &snap, &policies(), &local());
    let pay1 = g1.get(meshfed_xds::Kind::Endpoint, PAYMENT, &p).unwrap();
    g1.get(meshfed_xds::Kind::Endpoint, LEDGER, &p).unwrap();
    assert_eq!(g1.eds_computed.load(Ordering::Relaxed), 2);

    // ledger gains an endpoint; payment does not change.
    let mut snap2 = snap.clone();
    let ledger = snap2
        .imports
        .get_mut(&("west".to_string(), "shop/ledger".to_string()))
        .map(Arc::make_mut)
        .unwrap();
    ledger
        .endpoints
        .push(ep("10.2.1.6", "us-west1", "us-west1-a"));
    let g2 = Generation::build(2, &snap2, &policies(), &local());
    assert_eq!(g2.reuse_tables(&g1), 1);
    let pay2 = g2.get(meshfed_xds::Kind::Endpoint, PAYMENT, &p).unwrap();
    assert!(Arc::ptr_eq(&pay1, &pay2), "payment's table is taken over");
    assert_eq!(g2.eds_computed.load(Ordering::Relaxed), 0);
    let led2 = g2.get(meshfed_xds::Kind::Endpoint, LEDGER, &p).unwrap();
    assert_eq!(
        g2.eds_computed.load(Ordering::Relaxed),
        1,
        "ledger's is computed again"
    );
    let cla = ClusterLoadAssignment::decode(led2.any.value.as_slice()).unwrap();
    let n: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(
        n, 1,
        "west is another network: one gateway endpoint stands for both"
    );

    // Another gateway address for west: every table depends on it.
    let mut snap3 = snap2.clone();
    if let Some(f) = snap3.peers.get_mut("west").and_then(|p| p.facts.as_mut()) {
        f.gateways = vec!["192.0.2.21:15443".into()];
    }
    let g3 = Generation::build(3, &snap3, &policies(), &local());
    assert_eq!(g3.reuse_tables(&g2), 0);
}

/// A generation built after another takes over the resources of services whose inputs did
/// not change, builds the others, and is the same as one built from scratch.
#[test]
fn a_new_generation_rebuilds_only_the_services_that_changed() {
    let digest = |g: &Generation| {
        let m = |x: &std::collections::BTreeMap<Arc<str>, meshfed_xds::resources::SharedRes>| {
            x.iter()
                .map(|(k, r)| (k.to_string(), r.hash))
                .collect::<Vec<_>>()
        };
        (
            m(&g.listeners),
            m(&g.routes),
            m(&g.clusters_grpc),
            m(&g.clusters_envoy),
            m(&g.clusters_router),
            g.gateways.clone(),
        )
    };
    let snap = gateway_snapshot(&["shop/payment"]);
    let g1 = Generation::build(1, &snap, &policies(), &local());
    // The same snapshot: every service taken over.
    let same = Generation::build_after(Some(&g1), 2, &snap, &policies(), &local());
    assert_eq!(same.hosts_reused, 2, "payment and ledger");
    assert_eq!(digest(&same), digest(&g1));
    // ledger gains an endpoint: payment is taken over, ledger built again.
    let mut snap2 = snap.clone();
    let ledger = snap2
        .imports
        .get_mut(&("west".to_string(), "shop/ledger".to_string()))
        .map(Arc::make_mut)
        .unwrap();
    ledger
        .endpoints
        .push(ep("10.2.1.6", "us-west1", "us-west1-a"));
    let g2 = Generation::build_after(Some(&g1), 3, &snap2, &policies(), &local());
    assert_eq!(g2.hosts_reused, 1);
    assert_eq!(
        digest(&g2),
        digest(&Generation::build(3, &snap2, &policies(), &local()))
    );
    // West's gateway moves: every service with an instance in west is built again.
    let mut snap3 = snap2.clone();
    if let Some(f) = snap3.peers.get_mut("west").and_then(|p| p.facts.as_mut()) {
        f.gateways = vec!["192.0.2.21:15443".into()];
    }
    let g3 = Generation::build_after(Some(&g2), 4, &snap3, &policies(), &local());
    assert_eq!(g3.hosts_reused, 0);
    assert_eq!(
        digest(&g3),
        digest(&Generation::build(4, &snap3, &policies(), &local()))
    );
    // Exported here no more: payment's router cluster goes.
    let mut snap4 = snap3.clone();
    snap4.exported.clear();
    let g4 = Generation::build_after(Some(&g3), 5, &snap4, &policies(), &local());
    assert!(g4.clusters_router.is_empty());
    assert_eq!(
        digest(&g4),
        digest(&Generation::build(5, &snap4, &policies(), &local()))
    );
}
