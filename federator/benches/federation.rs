//! Federation push benchmark (not a test): N simulated clusters x S services x E endpoints
//! against a real `meshfed federator` process over loopback gRPC with mTLS.
//!
//! Reports, for the federator on sled and on etcd (`MESHFED_BENCH_STORES`, default
//! `sled,etcd`): the time from an export change to every importer's ACK (p50/p99),
//! per-importer latency, the initial full-sync time, the time until every cluster is current
//! after a federator restart, the federator's resident memory per cluster, etcd's database
//! size, and the most clusters stale at once. Simulated agents heartbeat as `meshfed agent`
//! does, with the default lease TTL.
//!
//!   cargo bench -p meshfed --bench federation
//!   MESHFED_BENCH_CLUSTERS=20 cargo bench -p meshfed --bench federation   # smaller
//!   MESHFED_BENCH_FED_BIN=/path/to/other/meshfed ...                      # another federator build
//!
//! The same-run peer is etcd's own watch fan-out (`apt-get install etcd-server`); without etcd
//! the etcd store and the peer are skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshfed_identity::cluster::{self as identity, ClusterIdentity, JoinParams};
use meshfed_identity::token::TokenStore;
use prost::Message;
use proto::cluster_message::Kind as Out;
use proto::wire::{FederatorMessageWire, Kind as In};
use proto::{
    ClusterMessage, Endpoint, ExportDelta, Hello, ImportAck, Locality, Port, ServiceExport,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn service(cluster: usize, i: usize, endpoints: usize, marker: Option<usize>) -> ServiceExport {
    let mut labels = HashMap::new();
    if let Some(m) = marker {
        labels.insert("bench-marker".to_string(), m.to_string());
    }
    ServiceExport {
        headless: false,
        namespace: "bench".into(),
        name: format!("svc-{i}"),
        ports: vec![Port {
            name: "http".into(),
            port: 8080,
            protocol: "TCP".into(),
            app_protocol: "http".into(),
        }],
        endpoints: (0..endpoints)
            .map(|e| Endpoint {
                address: format!(
                    "10.{}.{}.{}",
                    cluster % 250,
                    (i * endpoints + e) / 250 % 250,
                    (i * endpoints + e) % 250 + 1
                ),
                locality: Some(Locality {
                    region: format!("region-{}", cluster % 5),
                    zone: format!("zone-{}", e % 3),
                    subzone: String::new(),
                }),
                labels: HashMap::from([("version".to_string(), "v1".to_string())]),
                weight: 1,
                healthy: true,
                service_account: "bench".into(),
                ..Default::default()
            })
            .collect(),
        export_to: vec![],
        on_expiry: 0,
        labels,
        failover_policy: String::new(),
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

enum Event {
    /// Agent `i` has every foreign service.
    Synced,
    Marker {
        marker: usize,
        at: Instant,
    },
    /// Agent `i`'s stream is open again after a federator restart (its Welcome arrived).
    Welcomed(usize),
}

/// Where the benchmarked federator keeps its state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backing {
    Sled,
    Etcd,
}

/// One scenario's figures.
#[derive(Debug, Default)]
struct Row {
    all_p50: f64,
    all_p99: f64,
    one_p50: f64,
    one_p99: f64,
    sync_s: f64,
    reconnect_s: f64,
    rss_idle_mib: f64,
    per_cluster_mib: f64,
    steady_per_cluster_mib: f64,
    etcd_db_mib: Option<f64>,
    max_stale: f64,
    join_s: f64,
    /// Initial sync: when each cluster's stream was welcomed, p50 and the last.
    welcome_p50_s: f64,
    welcome_max_s: f64,
}

fn free_addr() -> String {
    format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    )
}

/// The federator binary: this build's, or `MESHFED_BENCH_FED_BIN` (another build of meshfed, for
/// before/after runs on one machine).
fn fed_bin() -> String {
    std::env::var("MESHFED_BENCH_FED_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshfed").into())
}

/// The federator process, (re)startable with the same arguments.
struct Fed {
    args: Vec<String>,
    child: Option<std::process::Child>,
    admin: String,
}

impl Fed {
    async fn start(&mut self) -> u32 {
        // MESHFED_BENCH_WRAP runs the federator under a tool, e.g. "valgrind --tool=massif".
        let wrap: Vec<String> = std::env::var("MESHFED_BENCH_WRAP")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut cmd = match wrap.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(fed_bin());
                c
            }
            None => Command::new(fed_bin()),
        };
        let child = cmd
            .args(&self.args)
            .env("MESHFED_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.child = Some(child);
        let t = Instant::now();
        while meshfed_net::admin::fetch_status(&self.admin).await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "federator did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pid
    }

    /// SIGTERM (a wrapping profiler writes its report), then kill.
    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Heartbeats as `meshfed agent` sends them: every lease TTL / 3.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// One simulated agent: holds a Sync stream, acknowledges every import delta, heartbeats, and
/// reconnects (resuming from its applied revision) when the stream ends.
#[allow(clippy::too_many_arguments)]
async fn agent(
    i: usize,
    id: ClusterIdentity,
    full: ExportDelta,
    expected: u64,
    mut cmds: mpsc::Receiver<ClusterMessage>,
    ev: mpsc::UnboundedSender<Event>,
) {
    let mut applied = 0u64;
    let mut imported = 0u64;
    let mut synced = false;
    let mut first = true;
    loop {
        let (cfg, _) = id.client_config().unwrap();
        let channel = meshfed_net::channel(id.file.federators.clone(), cfg, "federator").unwrap();
        // The stream is read as proto::wire's twin of FederatorMessage (the same bytes): each
        // import's export stays encoded, as a real agent's would be decoded on its own CPUs,
        // not on the two this benchmark shares with the federator. An export is decoded once
        // the cluster is synced (the changes carry the markers).
        let mut client = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<ClusterMessage>(64);
        let hello = ClusterMessage {
            kind: Some(Out::Hello(Hello {
                observer: false,
                facts: Some(id.facts()),
                imports_applied_revision: applied,
                federation_bundle_sequence: 0,
            })),
        };
        let _ = tx.send(hello).await;
        if std::mem::take(&mut first) {
            let _ = tx
                .send(ClusterMessage {
                    kind: Some(Out::Exports(full.clone())),
                })
                .await;
        }
        let opened = async {
            client
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client
                .streaming(
                    tonic::Request::new(ReceiverStream::new(rx)),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/meshfed.federation.v1.Federation/Sync",
                    ),
                    tonic_prost::ProstCodec::<ClusterMessage, FederatorMessageWire>::default(),
                )
                .await
        };
        let mut inbound = match opened.await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100 + rand_ms(400))).await;
                continue;
            }
        };
        let mut beat = tokio::time::interval(LEASE_TTL / 3);
        beat.tick().await;
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => match m.kind {
                        Some(In::Welcome(_)) => {
                            let _ = ev.send(Event::Welcomed(i));
                        }
                        Some(In::Imports(d)) => {
                            let at = Instant::now();
                            applied = d.revision;
                            let _ = tx
                                .send(ClusterMessage {
                                    kind: Some(Out::ImportAck(ImportAck {
                                        revision: d.revision,
                                        error: String::new(),
                                    })),
                                })
                                .await;
                            if !synced {
                                imported += d.upserts.len() as u64;
                                if imported >= expected {
                                    synced = true;
                                    let _ = ev.send(Event::Synced);
                                }
                                continue;
                            }
                            for u in &d.upserts {
                                let e = ServiceExport::decode(u.export.clone()).unwrap();
                                if let Some(m) = e.labels.get("bench-marker") {
                                    let _ = ev.send(Event::Marker {
                                        marker: m.parse().unwrap_or(usize::MAX),
                                        at,
                                    });
                                }
                            }
                        }
                        _ => {}
                    },
                    _ => break,
                },
                c = cmds.recv() => match c {
                    Some(c) => { let _ = tx.send(c).await; }
                    None => return,
                },
                _ = beat.tick() => {
                    let _ = tx
                        .send(ClusterMessage {
                            kind: Some(Out::Heartbeat(proto::Heartbeat {})),
                        })
                        .await;
                }
            }
        }
        // The agent's reconnect backoff starts at 250 ms with jitter.
        tokio::time::sleep(Duration::from_millis(125 + rand_ms(125))).await;
    }
}

fn rand_ms(max: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) % max.max(1))
        .unwrap_or(0)
}

/// The largest number of stale clusters the federator reported, sampled every second while
/// `run` is true.
fn watch_stale(
    admin: String,
    run: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        let mut max: f64 = 0.0;
        while run.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(r) = meshfed_net::admin::fetch_status(&admin).await {
                let stale = r["clusters"]
                    .as_array()
                    .map(|c| c.iter().filter(|c| c["lease"] == "stale").count())
                    .unwrap_or(0);
                max = max.max(stale as f64);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        max
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let clusters = env("MESHFED_BENCH_CLUSTERS", 100);
    let services = env("MESHFED_BENCH_SERVICES", 1000);
    let endpoints = env("MESHFED_BENCH_ENDPOINTS", 10);
    let changes = env("MESHFED_BENCH_CHANGES", 50);
    let stores = std::env::var("MESHFED_BENCH_STORES").unwrap_or_else(|_| "sled,etcd".into());
    let mut rows = Vec::new();
    for store in stores.split(',') {
        let backing = match store {
            "sled" => Backing::Sled,
            "etcd" if which("etcd").is_some() => Backing::Etcd,
            "etcd" => {
                println!("etcd store skipped: etcd not installed (apt-get install etcd-server)");
                continue;
            }
            other => panic!("MESHFED_BENCH_STORES: {other}? (sled, etcd)"),
        };
        let row = scenario(backing, clusters, services, endpoints, changes).await;
        // Printed as soon as a store's scenario ends (a long run keeps what it measured).
        println!("[{store}] done: {row:?}");
        rows.push((store.to_string(), row));
    }
    let peer = etcd_peer(
        clusters - 1,
        changes,
        service(0, 0, endpoints, None).encoded_len(),
    )
    .await;
    println!("--- results: {clusters} clusters x {services} services x {endpoints} endpoints, lease TTL {LEASE_TTL:?}, heartbeats every TTL/3 ---");
    for (store, r) in &rows {
        println!("[{store}] export change -> every importer ACKed: p50 {:.1} ms, p99 {:.1} ms ({changes} changes, {} importers each)", r.all_p50, r.all_p99, clusters - 1);
        println!(
            "[{store}] export change -> one importer ACKed:   p50 {:.1} ms, p99 {:.1} ms",
            r.one_p50, r.one_p99
        );
        println!(
            "[{store}] join of {clusters} clusters (8 at a time): {:.1} s",
            r.join_s
        );
        println!(
            "[{store}] initial full sync of {clusters} clusters at once: {:.1} s (streams welcomed: p50 {:.1} s, last {:.1} s)",
            r.sync_s, r.welcome_p50_s, r.welcome_max_s
        );
        println!(
            "[{store}] federator restart -> every cluster reconnected and current: {:.1} s",
            r.reconnect_s
        );
        println!("[{store}] federator RSS: idle {:.1} MiB; {:.2} MiB per cluster right after the sync, {:.2} steady", r.rss_idle_mib, r.per_cluster_mib, r.steady_per_cluster_mib);
        if let Some(db) = r.etcd_db_mib {
            println!("[{store}] etcd's database: {db:.1} MiB");
        }
        println!(
            "[{store}] most clusters stale at once during the run: {}",
            r.max_stale
        );
    }
    match peer {
        Ok((p50, p99)) => {
            println!("peer etcd: put -> every watcher received: p50 {p50:.1} ms, p99 {p99:.1} ms ({} watchers)", clusters - 1);
            for (store, r) in &rows {
                println!(
                    "ratio meshfed [{store}] / etcd: p50 {:.2}, p99 {:.2}",
                    r.all_p50 / p50,
                    r.all_p99 / p99
                );
            }
        }
        Err(e) => println!("peer etcd skipped: {e:#}"),
    }
}

async fn scenario(
    backing: Backing,
    clusters: usize,
    services: usize,
    endpoints: usize,
    changes: usize,
) -> Row {
    let mut row = Row::default();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("federator");
    let (grpc, admin) = (free_addr(), free_addr());
    let etcd =
        (backing == Backing::Etcd).then(|| meshfed_store::etcd::local::LocalEtcd::start().unwrap());
    let mut args: Vec<String> = [
        "federator",
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        &grpc,
        "--admin",
        &admin,
        "--rate-limit",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(e) = &etcd {
        args.extend([
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            e.endpoints().join(","),
        ]);
    }
    let mut fed = Fed {
        args,
        child: None,
        admin: admin.clone(),
    };
    let pid = fed.start().await;
    let rss_idle = rss_kib(pid);
    row.rss_idle_mib = rss_idle as f64 / 1024.0;
    println!("[{backing:?}] federator pid {pid}, idle RSS {} MiB; {clusters} clusters x {services} services x {endpoints} endpoints", rss_idle / 1024);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stale = watch_stale(admin.clone(), running.clone());

    // Join every cluster (what `meshfed join` does), 8 at a time.
    let (tokens, fp, td) = match &etcd {
        None => {
            let ca = meshfed_federation::ca::FederationCa::open_or_create(&state, None).unwrap();
            (
                TokenStore::new(&state),
                ca.root_fingerprint(),
                ca.trust_domain.to_string(),
            )
        }
        Some(e) => {
            let a = meshfed_federation::shared::EtcdAdmin::open(
                &e.config(meshfed_store::etcd::DEFAULT_PREFIX),
            )
            .unwrap();
            let (fp, td) = a.federation().unwrap();
            (a.tokens.clone(), fp, td.to_string())
        }
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut ids: Vec<ClusterIdentity> = Vec::new();
    let t_join = Instant::now();
    for chunk in (0..clusters).collect::<Vec<_>>().chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let name = format!("c{i}");
            let (_, tok) = tokens
                .create(&name, 600, vec![grpc.clone()], fp.clone(), td.clone(), now)
                .unwrap();
            let p = JoinParams {
                token: tok,
                state_dir: dir.path().join(&name),
                cluster: name.clone(),
                network: format!("net-{i}"),
                trust_domain: trust::TrustDomain::new(&format!("{name}.bench")).unwrap(),
                locality: Locality {
                    region: format!("region-{}", i % 5),
                    zone: "zone-0".into(),
                    subzone: String::new(),
                },
                gateways: vec![format!("10.255.0.{}:15443", i % 250 + 1)],
                ca: None,
                rejoin: false,
            };
            set.spawn(async move { (i, identity::join(p).await.unwrap()) });
        }
        let mut got: Vec<_> = set.join_all().await;
        got.sort_by_key(|(i, _)| *i);
        ids.extend(got.into_iter().map(|(_, id)| id));
    }
    row.join_s = t_join.elapsed().as_secs_f64();
    println!(
        "[{backing:?}] joined {clusters} clusters in {:.1}s",
        row.join_s
    );

    // One simulated agent per cluster: full export, then ACK every import delta at once.
    let expected = ((clusters - 1) * services) as u64;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let mut cmd_txs = Vec::new();
    let t_sync = Instant::now();
    for (i, id) in ids.into_iter().enumerate() {
        let full = ExportDelta {
            version: 1,
            full: true,
            upserts: (0..services)
                .map(|s| service(i, s, endpoints, None))
                .collect(),
            removals: vec![],
        };
        let (tx, rx) = mpsc::channel::<ClusterMessage>(64);
        cmd_txs.push(tx);
        tokio::spawn(agent(i, id, full, expected, rx, ev_tx.clone()));
    }
    let mut synced = 0;
    let mut welcomes = Vec::new();
    while synced < clusters {
        match tokio::time::timeout(Duration::from_secs(3600), ev_rx.recv()).await {
            Ok(Some(Event::Synced)) => synced += 1,
            Ok(Some(Event::Welcomed(_))) => welcomes.push(t_sync.elapsed().as_secs_f64()),
            Ok(Some(_)) => {}
            _ => panic!("initial sync did not finish ({synced}/{clusters})"),
        }
    }
    row.sync_s = t_sync.elapsed().as_secs_f64();
    row.welcome_p50_s = percentile(&mut welcomes.clone(), 0.5);
    row.welcome_max_s = percentile(&mut welcomes, 1.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_loaded = rss_kib(pid);
    println!(
        "[{backing:?}] initial sync: every cluster imported {expected} services in {:.1}s; federator RSS {} MiB",
        row.sync_s,
        rss_loaded / 1024
    );

    // Export changes: one service of one cluster at a time; wait for every importer's ACK.
    let mut all_acked_ms = Vec::new();
    let mut each_ms = Vec::new();
    let mut versions = vec![1u64; clusters];
    for k in 0..changes {
        let src = k % clusters;
        versions[src] += 1;
        let t0 = Instant::now();
        cmd_txs[src]
            .send(ClusterMessage {
                kind: Some(Out::Exports(ExportDelta {
                    version: versions[src],
                    full: false,
                    upserts: vec![service(src, k % services, endpoints, Some(k))],
                    removals: vec![],
                })),
            })
            .await
            .unwrap();
        let mut seen = 0;
        let mut last = t0;
        while seen < clusters - 1 {
            match tokio::time::timeout(Duration::from_secs(60), ev_rx.recv()).await {
                Ok(Some(Event::Marker { marker, at })) if marker == k => {
                    seen += 1;
                    each_ms.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                    last = last.max(at);
                }
                Ok(Some(_)) => {}
                _ => panic!(
                    "change {k} did not reach every importer ({seen}/{})",
                    clusters - 1
                ),
            }
        }
        all_acked_ms.push(last.duration_since(t0).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    row.per_cluster_mib = (rss_loaded.saturating_sub(rss_idle)) as f64 / 1024.0 / clusters as f64;
    // Steady state: the same federator after the change phase, transient buffers released.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_steady = rss_kib(pid);
    row.steady_per_cluster_mib =
        (rss_steady.saturating_sub(rss_idle)) as f64 / 1024.0 / clusters as f64;
    row.all_p50 = percentile(&mut all_acked_ms.clone(), 0.5);
    row.all_p99 = percentile(&mut all_acked_ms, 0.99);
    row.one_p50 = percentile(&mut each_ms.clone(), 0.5);
    row.one_p99 = percentile(&mut each_ms, 0.99);

    // Restart: every agent reconnects (jittered) and resumes from its applied revision; the
    // clock runs from starting the new process until every cluster is connected with no import
    // lag in its status.
    fed.stop().await;
    while ev_rx.try_recv().is_ok() {}
    let t_restart = Instant::now();
    fed.start().await;
    let mut welcomed = std::collections::HashSet::new();
    while welcomed.len() < clusters {
        match tokio::time::timeout(Duration::from_secs(600), ev_rx.recv()).await {
            Ok(Some(Event::Welcomed(i))) => {
                welcomed.insert(i);
            }
            Ok(Some(_)) => {}
            _ => panic!("{}/{clusters} clusters came back", welcomed.len()),
        }
    }
    loop {
        if let Ok(r) = meshfed_net::admin::fetch_status(&admin).await {
            let current = r["clusters"].as_array().is_some_and(|cs| {
                cs.len() == clusters
                    && cs
                        .iter()
                        .all(|c| c["connected"] == true && c["import_lag"] == 0)
            });
            if current {
                break;
            }
        }
        assert!(
            t_restart.elapsed() < Duration::from_secs(600),
            "not current after a restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    row.reconnect_s = t_restart.elapsed().as_secs_f64();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    row.max_stale = stale.await.unwrap_or(f64::NAN);
    if let Some(e) = &etcd {
        row.etcd_db_mib = e
            .status()
            .ok()
            .and_then(|v| v[0]["Status"]["dbSize"].as_f64())
            .map(|b| b / 1048576.0);
    }
    drop(cmd_txs);
    fed.stop().await;
    row
}

/// etcd watch fan-out: `watchers` HTTP watch streams on one key, `changes` puts of `size` bytes;
/// returns p50/p99 of put -> every watcher received.
async fn etcd_peer(watchers: usize, changes: usize, size: usize) -> anyhow::Result<(f64, f64)> {
    use base64::Engine;
    use http_body_util::BodyExt;
    let b64 = base64::engine::general_purpose::STANDARD;
    let etcd = which("etcd")
        .ok_or_else(|| anyhow::anyhow!("etcd not installed (apt-get install etcd-server)"))?;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let peer = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(etcd)
        .args([
            "--data-dir",
            dir.path().to_str().unwrap_or_default(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let post = |path: &str, body: String| {
        let req = hyper::Request::post(format!("{url}{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)));
        let client = client.clone();
        async move { Ok::<_, anyhow::Error>(client.request(req?).await?) }
    };
    let key = b64.encode("bench/payment");
    let t = Instant::now();
    while post(
        "/v3/kv/put",
        format!("{{\"key\":\"{key}\",\"value\":\"\"}}"),
    )
    .await
    .is_err()
    {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    for _ in 0..watchers {
        let resp = post(
            "/v3/watch",
            format!("{{\"create_request\":{{\"key\":\"{key}\"}}}}"),
        )
        .await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let at = Instant::now();
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                        continue;
                    };
                    for ev in v["result"]["events"].as_array().into_iter().flatten() {
                        let val = ev["kv"]["value"]
                            .as_str()
                            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok());
                        if let Some(m) = val.and_then(|v| {
                            String::from_utf8_lossy(&v)
                                .split(';')
                                .next()
                                .and_then(|m| m.parse().ok())
                        }) {
                            let _ = tx.send((m, at));
                        }
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all = Vec::new();
    for k in 0..changes {
        let value = format!("{k};{}", "x".repeat(size.saturating_sub(8)));
        let t0 = Instant::now();
        post(
            "/v3/kv/put",
            format!("{{\"key\":\"{key}\",\"value\":\"{}\"}}", b64.encode(value)),
        )
        .await?;
        let (mut seen, mut last) = (0, t0);
        while seen < watchers {
            let (m, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("watchers gone"))?;
            if m == k {
                seen += 1;
                last = last.max(at);
            }
        }
        all.push(last.duration_since(t0).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok((
        percentile(&mut all.clone(), 0.5),
        percentile(&mut all, 0.99),
    ))
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(bin))
        .find(|p| p.is_file())
}
