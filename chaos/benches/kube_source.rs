//! The Kubernetes source at scale (issue 14): N Services (default 10,000) with 10 endpoints
//! each in the API-server double, exported by east (`meshfed agent --source kubernetes`) and
//! imported by west (same network, so west's tables carry east's addresses). Measured:
//! - east's agent memory per endpoint (RSS with N services minus RSS of an agent with none),
//! - the time from the agent's start until the federator stored all N exports,
//! - from an EndpointSlice change to east's xDS push (an ADS client of east's agent), and
//! - to west's xDS push (the import applied and pushed in another cluster),
//!   p50/p99 over 50 changes.
//!
//! `MESHFED_BIN=target/release/meshfed cargo bench -p meshfed-chaos --bench kube_source`
//! (`KUBE_BENCH_SERVICES` to change N). No kube-apiserver or other controller runs here to
//! compare with: the figures are meshfed's alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos::apiserver::ApiServer;
use chaos::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use serde_json::json;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn slice(i: usize, gen: usize) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..10)
        .map(|e| {
            json!({"addresses": [format!("10.{}.{}.{}", (i / 250) % 250, i % 250, 10 + e + gen * 10 % 200)],
                   "conditions": {"ready": true}, "nodeName": format!("node-{}", e % 10)})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abc"), "namespace": format!("ns-{}", i % 100),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n: usize = std::env::var("KUBE_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let api = ApiServer::start().unwrap();
    for k in 0..10 {
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{k}"),
            "labels": {"topology.kubernetes.io/region": "us-east1", "topology.kubernetes.io/zone": format!("us-east1-{}", k % 3)}}}))
            .unwrap();
    }
    let f = Federation::start("30s").unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    let args = [
        "--source",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    // The baseline: an agent whose cluster has no Services yet.
    let mut east = f
        .add_cluster_with(
            "east",
            "net-a",
            "us-east1/us-east1-b",
            "services: []\n",
            None,
            &[],
            &args,
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net-a", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    let pid = east.agent().unwrap().pid().unwrap();
    let rss0 = rss_kib(pid);
    // N Services with 10 endpoints each, all exported; then the agent starts on them.
    east.agent().unwrap().kill9();
    for i in 0..n {
        let ns = format!("ns-{}", i % 100);
        api.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))
            .unwrap();
        api.apply(slice(i, 0)).unwrap();
        api.apply(
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": format!("svc-{i}"), "namespace": ns}}),
        )
        .unwrap();
    }
    let t0 = Instant::now();
    east.agent().unwrap().start().unwrap();
    wait_for(
        Duration::from_secs(600),
        "the federator stores every export",
        || Ok((f.cluster_status("east")?["exports"].as_u64() == Some(n as u64)).then_some(())),
    )
    .unwrap();
    let sync = t0.elapsed();
    let pid = east.agent().unwrap().pid().unwrap();
    let rss_n = rss_kib(pid);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = "outbound|80||svc-0.ns-0.svc.cluster.local".to_string();
    let (mut east_push, mut west_push) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let mut e = meshfed_xds::client::AdsClient::start(
            format!("http://{}", east.xds),
            node("sidecar~10.0.0.1~bench-e.ns-0~ns-0.svc.cluster.local"),
        );
        let mut w = meshfed_xds::client::AdsClient::start(
            format!("http://{}", west.xds),
            node("sidecar~10.0.0.2~bench-w.ns-0~ns-0.svc.cluster.local"),
        );
        let has = |t: &meshfed_xds::client::Tables, addr: &str| {
            t.get(&cluster).is_some_and(|c| {
                meshfed_xds::client::endpoints(c)
                    .iter()
                    .any(|(_, a, _)| a.starts_with(&format!("{addr}:")))
            })
        };
        let first = "10.0.0.10".to_string();
        assert!(
            e.wait_for(Duration::from_secs(600), |t| has(t, &first))
                .await
        );
        assert!(
            w.wait_for(Duration::from_secs(600), |t| has(t, &first))
                .await
        );
        for gen in 1..=50usize {
            let s = slice(0, gen);
            let addr = s["endpoints"][0]["addresses"][0]
                .as_str()
                .unwrap()
                .to_string();
            let t = Instant::now();
            api.apply(s).unwrap();
            if !e.wait_for(Duration::from_secs(60), |x| has(x, &addr)).await {
                let log = std::fs::read_to_string(f.root.path().join("agent-east.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                panic!(
                    "change {gen} did not reach east's xDS in 60 s; east's log (newest first):\n{}",
                    tail.join("\n")
                );
            }
            east_push.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(w.wait_for(Duration::from_secs(60), |x| has(x, &addr)).await);
            west_push.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    });
    let per_ep = (rss_n.saturating_sub(rss0)) as f64 * 1024.0 / (n as f64 * 10.0);
    println!("services={n} endpoints={}", n * 10);
    println!("east agent RSS: {rss0} KiB without services, {rss_n} KiB with them: {per_ep:.0} B per endpoint");
    println!(
        "agent start -> federator stored all {n} exports: {:.2} s",
        sync.as_secs_f64()
    );
    println!(
        "EndpointSlice change -> east's xDS push: p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut east_push.clone(), 0.5),
        pct(&mut east_push, 0.99)
    );
    println!(
        "EndpointSlice change -> west's xDS push (import applied in another cluster): p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut west_push.clone(), 0.5),
        pct(&mut west_push, 0.99)
    );
}
