//! Federation push benchmark (not a test): N simulated clusters x S services x E endpoints
//! against a real `meshfed federator` process over loopback gRPC with mTLS.
//!
//! Reports the time from an export change to every importer's ACK (p50/p99), per-importer
//! latency, the initial full-sync time, and the federator's resident memory per cluster.
//!
//!   cargo bench -p meshfed-federator --bench federation
//!   MESHFED_BENCH_CLUSTERS=20 cargo bench -p meshfed-federator --bench federation   # smaller
//!
//! The same-run peer is etcd (`apt-get install etcd-server`); without it that part is skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshfed_identity::cluster::{self as identity, ClusterIdentity, JoinParams};
use meshfed_identity::token::TokenStore;
use prost::Message;
use proto::cluster_message::Kind as Out;
use proto::federation_client::FederationClient;
use proto::federator_message::Kind as In;
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
    Synced,
    Marker { marker: usize, at: Instant },
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let clusters = env("MESHFED_BENCH_CLUSTERS", 100);
    let services = env("MESHFED_BENCH_SERVICES", 1000);
    let endpoints = env("MESHFED_BENCH_ENDPOINTS", 10);
    let changes = env("MESHFED_BENCH_CHANGES", 50);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("federator");
    let grpc = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let admin = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    // MESHFED_BENCH_WRAP runs the federator under a tool, e.g. "valgrind --tool=massif".
    let wrap: Vec<String> = std::env::var("MESHFED_BENCH_WRAP")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut cmd = match wrap.split_first() {
        Some((tool, args)) => {
            let mut c = Command::new(tool);
            c.args(args).arg(env!("CARGO_BIN_EXE_meshfed"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_meshfed")),
    };
    let mut fed = cmd
        .args([
            "federator",
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            &grpc,
            "--admin",
            &admin,
            "--lease-ttl",
            "120s",
            "--rate-limit",
            "1000",
        ])
        .env("MESHFED_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = fed.id();
    let t = Instant::now();
    while meshfed_net::admin::fetch_status(&admin).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "federator did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_idle = rss_kib(pid);
    println!("federator pid {pid}, idle RSS {} MiB; {clusters} clusters x {services} services x {endpoints} endpoints", rss_idle / 1024);

    // Join every cluster (what `meshfed join` does), 8 at a time.
    let (fp, td) = {
        let ca = meshfed_federation::ca::FederationCa::open_or_create(&state, None).unwrap();
        (ca.root_fingerprint(), ca.trust_domain.to_string())
    };
    let tokens = TokenStore::new(&state);
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
    println!(
        "joined {clusters} clusters in {:.1}s",
        t_join.elapsed().as_secs_f64()
    );

    // One simulated agent per cluster: full export, then ACK every import delta at once.
    let expected = ((clusters - 1) * services) as u64;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let mut cmd_txs = Vec::new();
    let t_sync = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let (cfg, _) = id.client_config().unwrap();
        let channel = meshfed_net::channel(id.file.federators.clone(), cfg, "federator").unwrap();
        let mut client = FederationClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<ClusterMessage>(64);
        tx.send(ClusterMessage {
            kind: Some(Out::Hello(Hello {
                observer: false,
                facts: Some(id.facts()),
                imports_applied_revision: 0,
                federation_bundle_sequence: 0,
            })),
        })
        .await
        .unwrap();
        tx.send(ClusterMessage {
            kind: Some(Out::Exports(ExportDelta {
                version: 1,
                full: true,
                upserts: (0..services)
                    .map(|s| service(i, s, endpoints, None))
                    .collect(),
                removals: vec![],
            })),
        })
        .await
        .unwrap();
        cmd_txs.push(tx.clone());
        let ev = ev_tx.clone();
        tokio::spawn(async move {
            let mut inbound = client
                .sync(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut imported = 0u64;
            let mut synced = false;
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(In::Imports(d)) = m.kind {
                    let at = Instant::now();
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
                    }
                    for u in &d.upserts {
                        if let Some(m) =
                            u.export.as_ref().and_then(|e| e.labels.get("bench-marker"))
                        {
                            let _ = ev.send(Event::Marker {
                                marker: m.parse().unwrap_or(usize::MAX),
                                at,
                            });
                        }
                    }
                }
            }
        });
    }
    let mut synced = 0;
    while synced < clusters {
        match tokio::time::timeout(Duration::from_secs(600), ev_rx.recv()).await {
            Ok(Some(Event::Synced)) => synced += 1,
            Ok(Some(_)) => {}
            _ => panic!("initial sync did not finish ({synced}/{clusters})"),
        }
    }
    let sync_s = t_sync.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_loaded = rss_kib(pid);
    if std::env::var("MESHFED_BENCH_SMAPS").is_ok() {
        println!(
            "{}",
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default()
        );
        let _ = Command::new("sh").arg("-c").arg(format!("sort -k2 -n -r <(grep -E '^[0-9a-f]+-' /proc/{pid}/maps | head -0) ; awk '/^[0-9a-f]+-/{{name=$6}} /^Rss:/{{if ($2>10000) print $2, name}}' /proc/{pid}/smaps | sort -n -r | head")).status();
    }
    println!(
        "initial sync: every cluster imported {expected} services in {sync_s:.1}s; federator RSS {} MiB",
        rss_loaded / 1024
    );

    // Export changes: one service of one cluster at a time; wait for every importer's ACK.
    let mut all_acked_ms = Vec::new();
    let mut each_ms = Vec::new();
    let versions = Arc::new(std::sync::Mutex::new(vec![1u64; clusters]));
    for k in 0..changes {
        let src = k % clusters;
        let v = {
            let mut vs = versions.lock().unwrap();
            vs[src] += 1;
            vs[src]
        };
        let t0 = Instant::now();
        cmd_txs[src]
            .send(ClusterMessage {
                kind: Some(Out::Exports(ExportDelta {
                    version: v,
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
            match tokio::time::timeout(Duration::from_secs(30), ev_rx.recv()).await {
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
    let per_cluster_mib = (rss_loaded.saturating_sub(rss_idle)) as f64 / 1024.0 / clusters as f64;
    // Steady state: the same federator after the change phase, transient buffers released.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_steady = rss_kib(pid);
    let steady_mib = (rss_steady.saturating_sub(rss_idle)) as f64 / 1024.0 / clusters as f64;
    println!("--- results ---");
    println!("export change -> every importer ACKed: p50 {:.1} ms, p99 {:.1} ms ({changes} changes, {} importers each)", percentile(&mut all_acked_ms.clone(), 0.5), percentile(&mut all_acked_ms, 0.99), clusters - 1);
    println!(
        "export change -> one importer ACKed:   p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut each_ms.clone(), 0.5),
        percentile(&mut each_ms, 0.99)
    );
    println!("initial full sync of {clusters} clusters: {sync_s:.1} s");
    println!(
        "federator RSS: idle {:.1} MiB, right after the full sync {:.1} MiB ({per_cluster_mib:.2} MiB per cluster), steady {:.1} MiB ({steady_mib:.2} MiB per cluster)",
        rss_idle as f64 / 1024.0,
        rss_loaded as f64 / 1024.0,
        rss_steady as f64 / 1024.0
    );
    // SIGTERM lets a wrapping profiler write its report.
    let ours_p50 = percentile(&mut all_acked_ms.clone(), 0.5);
    let ours_p99 = percentile(&mut all_acked_ms.clone(), 0.99);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = fed.kill();
    let _ = fed.wait();

    // Same-run peer: etcd (Debian's etcd-server) fanning one ~1.2 KB value change out to the
    // same number of watchers, through its HTTP/JSON gateway.
    match etcd_peer(
        clusters - 1,
        changes,
        service(0, 0, endpoints, None).encoded_len(),
    )
    .await
    {
        Ok((p50, p99)) => {
            println!("peer etcd: put -> every watcher received: p50 {p50:.1} ms, p99 {p99:.1} ms ({} watchers)", clusters - 1);
            println!(
                "ratio meshfed/etcd: p50 {:.2}, p99 {:.2}",
                ours_p50 / p50,
                ours_p99 / p99
            );
        }
        Err(e) => println!("peer etcd skipped: {e:#}"),
    }
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
