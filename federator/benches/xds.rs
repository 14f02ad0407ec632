//! xDS push benchmark (not a test): a fleet of simulated ADS clients (SotW, one HTTP/2
//! connection each, like real proxies) against meshfed's ADS server running in a child
//! process, over loopback.
//!
//! Measures, for 1k / 5k / 10k proxies (MESHFED_BENCH_PROXIES="1000,5000,10000"):
//! - the time from an endpoint change to each proxy's receipt and to the last ACK (p50/p99);
//! - the server's resident memory per connected proxy;
//! - all proxies reconnecting at once: time until every one holds its full configuration;
//!
//! and the policy compile time for 10k endpoints over 100 localities.
//!
//!   cargo bench -p meshfed-federator --bench xds
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use meshfed_failover::{self as table, EndpointIn, Loc, ProxyIn};
use meshfed_model::policy::PolicySet;
use meshfed_model::snapshot::Snapshot;
use meshfed_xds::generation::Generation;
use meshfed_xds::node::LocalFacts;
use meshfed_xds::server::{Ads, XdsState};
use meshfed_xds::{CLUSTER_TYPE, ENDPOINT_TYPE};
use proto::{Endpoint, Port, ServiceExport};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

// The same allocator as the meshfed binary, so memory figures match it, wrapped to count live
// heap bytes (RSS also holds what the allocator keeps cached).
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// The only unsafe code in meshfed: a measurement wrapper that forwards to mimalloc unchanged.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SERVICES: usize = 50;
const ZONES: usize = 10;

fn local() -> LocalFacts {
    LocalFacts {
        cluster: "east".into(),
        network: "east-net".into(),
        locality: Loc::new("us-east1", "z0", ""),
        trust_domain: "east.mesh".into(),
    }
}

/// SERVICES services with 3 endpoints in each of ZONES zones; `bump` moves one endpoint.
fn snapshot(bump: u64) -> Snapshot {
    let mut s = Snapshot::default();
    s.facts.cluster_id = "east".into();
    s.facts.network = "east-net".into();
    s.facts.trust_domain = "east.mesh".into();
    for i in 0..SERVICES {
        let mut eps = Vec::new();
        for z in 0..ZONES {
            for k in 0..3 {
                eps.push(Endpoint {
                    address: format!("10.{i}.{z}.{}", k + 1),
                    locality: Some(proto::Locality {
                        region: "us-east1".into(),
                        zone: format!("z{z}"),
                        subzone: String::new(),
                    }),
                    weight: 1,
                    healthy: true,
                    ..Default::default()
                });
            }
        }
        if i == 0 {
            eps[0].address = format!("10.200.{}.{}", bump / 250, bump % 250 + 1);
        }
        s.local.insert(
            format!("shop/svc-{i}"),
            ServiceExport {
                namespace: "shop".into(),
                name: format!("svc-{i}"),
                ports: vec![Port {
                    name: "http".into(),
                    port: 8080,
                    protocol: "TCP".into(),
                    app_protocol: String::new(),
                }],
                endpoints: eps,
                ..Default::default()
            }
            .into(),
        );
    }
    s
}

fn policies() -> PolicySet {
    let mut text = String::new();
    for i in 0..SERVICES {
        text.push_str(&format!(
            "---\napiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: svc-{i}, namespace: shop}}\nspec:\n  host: svc-{i}.shop.svc.cluster.local\n  outlierDetection: {{consecutive5xxErrors: 3}}\n"
        ));
    }
    PolicySet::from_sources(&[("bench.yaml".into(), text)]).unwrap()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The server process: serves ADS, answers commands on stdin.
fn server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let state = XdsState::new(local(), &prometheus::Registry::new());
        let pol = policies();
        state
            .gens
            .send_replace(Arc::new(Generation::build(1, &snapshot(0), &pol, &local())));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("port {}", l.local_addr().unwrap().port());
        let svc = Ads::server(state.clone(), false, meshfed_net::drain::Signal::never());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let mut lines =
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
        let mut version = 1;
        while let Ok(Some(cmd)) = lines.next_line().await {
            match cmd.as_str() {
                "rss" => println!(
                    "rss {} proxies {} live {}",
                    rss_kib(),
                    state.proxies.len(),
                    LIVE.load(Ordering::Relaxed) / 1024
                ),
                "bump" => {
                    version += 1;
                    let t = Instant::now();
                    let g = Generation::build(version, &snapshot(version), &pol, &local());
                    let build = t.elapsed();
                    state.gens.send_replace(Arc::new(g));
                    let want = state.proxies.len();
                    // The last ACK: every proxy acked an EDS response of this generation.
                    loop {
                        let acked = state
                            .proxies
                            .all()
                            .iter()
                            .filter(|c| {
                                c.types()
                                    .get(&meshfed_xds::Kind::Endpoint)
                                    .is_some_and(|s| s.acked_version == version.to_string())
                            })
                            .count();
                        if acked >= want {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    println!(
                        "acked {} build {}",
                        t.elapsed().as_micros(),
                        build.as_micros()
                    );
                }
                _ => println!("?"),
            }
        }
    });
}

struct Child {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

impl Child {
    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One simulated proxy: CDS wildcard, EDS for every cluster, ACKs everything; reports each EDS
/// response's version and arrival time.
async fn proxy(
    url: String,
    i: usize,
    full: Arc<AtomicUsize>,
    seen: mpsc::UnboundedSender<(usize, u64, Instant)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Like a real proxy: retry with jitter when the connection is refused or reset (a
    // listen backlog overflows when thousands connect in the same millisecond).
    let mut counted = false;
    loop {
        let r = proxy_once(&url, i, &full, &mut counted, &seen, &mut stop).await;
        if r.is_ok() || *stop.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50 + rand::random_range(0..200))).await;
    }
}

async fn proxy_once(
    url: &str,
    i: usize,
    full: &AtomicUsize,
    counted: &mut bool,
    seen: &mpsc::UnboundedSender<(usize, u64, Instant)>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut c = AggregatedDiscoveryServiceClient::connect(url.to_string()).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: format!(
                "sidecar~10.9.{}.{}~p{i}.shop~shop.svc.cluster.local",
                i / 250,
                i % 250
            ),
            user_agent_name: "envoy".into(),
            locality: Some(Locality {
                region: "us-east1".into(),
                zone: format!("z{}", i % ZONES),
                sub_zone: String::new(),
            }),
            ..Default::default()
        }),
        type_url: if idle() {
            "idle".into()
        } else {
            CLUSTER_TYPE.into()
        },
        ..Default::default()
    })
    .await?;
    let mut inbound = c
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    if idle() && !*counted {
        *counted = true;
        full.fetch_add(1, Ordering::Relaxed);
    }
    let mut names = Vec::new();
    let mut eds_seen = 0usize;
    loop {
        let r = tokio::select! {
            r = inbound.next() => match r { Some(r) => r?, None => anyhow::bail!("stream ended") },
            _ = stop.changed() => return Ok(()),
        };
        let now = Instant::now();
        if r.type_url == CLUSTER_TYPE {
            names = r
                .resources
                .iter()
                .map(|a| {
                    use prost::Message;
                    envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                        .map(|c| c.name)
                        .unwrap_or_default()
                })
                .collect();
            tx.send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: CLUSTER_TYPE.into(),
                ..Default::default()
            })
            .await?;
            tx.send(DiscoveryRequest {
                type_url: ENDPOINT_TYPE.into(),
                resource_names: names.clone(),
                ..Default::default()
            })
            .await?;
        } else {
            eds_seen += r.resources.len();
            if eds_seen >= SERVICES && !*counted {
                *counted = true;
                full.fetch_add(1, Ordering::Relaxed);
            }
            let _ = seen.send((i, r.version_info.parse().unwrap_or(0), now));
            tx.send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: ENDPOINT_TYPE.into(),
                resource_names: names.clone(),
                ..Default::default()
            })
            .await?;
        }
    }
}

/// MESHFED_BENCH_IDLE=1: streams that subscribe to nothing (the transport's own cost).
fn idle() -> bool {
    std::env::var_os("MESHFED_BENCH_IDLE").is_some()
}

fn policy_compile() -> (f64, f64) {
    // 10k endpoints over 100 localities (10 regions x 10 zones), failoverPriority + failover.
    let mut eps = Vec::new();
    for i in 0..10_000 {
        let r = i % 10;
        let z = (i / 10) % 10;
        let mut labels = BTreeMap::new();
        labels.insert(
            "version".to_string(),
            if i % 3 == 0 { "v2" } else { "v1" }.to_string(),
        );
        eps.push(EndpointIn {
            address: format!("10.{}.{}.{}:8080", i / 62500, (i / 250) % 250, i % 250 + 1),
            locality: Loc::new(&format!("region-{r}"), &format!("zone-{z}"), ""),
            labels,
            weight: 1,
            cluster: format!("c{r}"),
            network: format!("net-{}", r % 3),
            healthy: true,
            stale: false,
        });
    }
    let text = "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  host: p.shop.svc.cluster.local\n  failoverPriority: [version=v2, topology.istio.io/network]\n  failover: [{from: region-0, to: region-1}]\n  outlierDetection: {consecutive5xxErrors: 3}\n";
    let set = PolicySet::from_sources(&[("p.yaml".into(), text.into())]).unwrap();
    let p = set.by_host.values().next().unwrap();
    let proxy = ProxyIn {
        locality: Loc::new("region-0", "zone-0", ""),
        labels: BTreeMap::new(),
        cluster: "c0".into(),
        network: Some("net-0".into()),
    };
    let gws: BTreeMap<String, Vec<String>> = (0..3)
        .map(|n| (format!("net-{n}"), vec![format!("192.0.2.{n}:15443")]))
        .collect();
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let tb = table::compute(Some(p), &proxy, &eps, &gws);
        assert!(!tb.rows.is_empty());
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (pct(&mut times.clone(), 0.5), pct(&mut times, 0.99))
}

fn main() {
    if std::env::var_os("MESHFED_BENCH_ROLE").is_some() {
        server();
        return;
    }
    let (p50, p99) = policy_compile();
    println!("policy compile, 10k endpoints / 100 localities / failoverPriority+failover+split horizon: p50 {p50:.2} ms, p99 {p99:.2} ms");
    let sizes: Vec<usize> = std::env::var("MESHFED_BENCH_PROXIES")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in sizes {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .env("MESHFED_BENCH_ROLE", "server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        let port: u16 = l.trim().strip_prefix("port ").unwrap().parse().unwrap();
        let mut srv = Child { child, stdin, out };
        let base = srv.cmd("rss");
        let base_rss: u64 = base.split_whitespace().nth(1).unwrap().parse().unwrap();
        let base_live: u64 = base.split_whitespace().nth(5).unwrap().parse().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        rt.block_on(async {
            let run_fleet = |label: &'static str| {
                let full = Arc::new(AtomicUsize::new(0));
                let (seen_tx, seen_rx) = mpsc::unbounded_channel();
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let t = Instant::now();
                for i in 0..n {
                    tokio::spawn(proxy(url.clone(), i, full.clone(), seen_tx.clone(), stop_rx.clone()));
                }
                async move {
                    while full.load(Ordering::Relaxed) < n {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if t.elapsed() > Duration::from_secs(300) {
                            panic!("{label}: only {} of {n} proxies got their config", full.load(Ordering::Relaxed));
                        }
                    }
                    (t.elapsed(), seen_rx, stop_tx)
                }
            };
            let (connect, mut seen_rx, stop_tx) = run_fleet("connect").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let line = tokio::task::block_in_place(|| srv.cmd("rss"));
            let rss: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            let per_proxy = (rss.saturating_sub(base_rss)) as f64 / n as f64;
            if idle() {
                let live: u64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
                println!(
                    "{n} idle streams (no subscriptions): server memory {per_proxy:.1} KiB/stream RSS, {:.1} KiB/stream live heap",
                    (live.saturating_sub(base_live)) as f64 / n as f64
                );
                return;
            }
            while seen_rx.try_recv().is_ok() {}
            // Endpoint changes: receipt latency per proxy and time to the last ACK.
            let mut receipt = Vec::new();
            let mut last_ack = Vec::new();
            for round in 0..5 {
                let t = Instant::now();
                let line = tokio::task::block_in_place(|| srv.cmd("bump"));
                let acked_us: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                last_ack.push(acked_us / 1000.0);
                let version = round + 2;
                let mut got = 0;
                while got < n {
                    match tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await {
                        Ok(Some((_, v, at))) if v == version => {
                            receipt.push(at.saturating_duration_since(t).as_secs_f64() * 1000.0);
                            got += 1;
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let line = tokio::task::block_in_place(|| srv.cmd("rss"));
            let steady: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            let steady_per_proxy = (steady.saturating_sub(base_rss)) as f64 / n as f64;
            let live: u64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
            let live_per_proxy = (live.saturating_sub(base_live)) as f64 / n as f64;
            let (r50, r99) = (pct(&mut receipt.clone(), 0.5), pct(&mut receipt, 0.99));
            let (a50, a99) = (pct(&mut last_ack.clone(), 0.5), pct(&mut last_ack, 0.99));
            println!(
                "{n} proxies: initial connect+full config {:.2}s; endpoint change -> receipt p50 {r50:.1} ms p99 {r99:.1} ms; -> last ACK p50 {a50:.1} ms p99 {a99:.1} ms (5 changes); server memory {per_proxy:.1} KiB/proxy after connecting, {steady_per_proxy:.1} KiB/proxy steady (RSS), {live_per_proxy:.1} KiB/proxy live heap",
                connect.as_secs_f64()
            );
            // Everyone reconnects at once.
            let _ = stop_tx.send(true);
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let (reconnect, _rx, stop2) = run_fleet("reconnect").await;
            println!("{n} proxies reconnecting at once: all hold their full config after {:.2}s", reconnect.as_secs_f64());
            let _ = stop2.send(true);
        });
        let _ = srv.child.kill();
    }
}
