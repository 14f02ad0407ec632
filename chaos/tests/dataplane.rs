//! The data plane never depends on the federator: a proxyless gRPC client (grpcio) in east
//! calls west's service over mTLS across trust domains, 20 calls a second, while the federator
//! is killed (-9) for 60 s (`MESHFED_CHAOS_FEDERATOR_DOWN`, e.g. `10s`, shortens it). Not one
//! call fails; when the federator returns, both agents reconnect (jittered backoff) and resume
//! from their acknowledged versions without a full resend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos::*;

fn results(p: &Proc) -> Vec<String> {
    p.log()
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("err "))
        .map(str::to_string)
        .collect()
}

fn down_for() -> Duration {
    std::env::var("MESHFED_CHAOS_FEDERATOR_DOWN")
        .ok()
        .and_then(|v| v.trim_end_matches('s').parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60))
}

#[test]
fn federator_down_cross_cluster_calls_never_fail() {
    let mut f = Federation::start("5s").unwrap();
    let dir = f.root.path().to_path_buf();
    let port = free_port();
    let west_reg = format!(
        "services:\n  - namespace: shop\n    name: ledger\n    ports: [{{name: grpc, port: {port}}}]\n    export: true\n    labels: {{security.istio.io/tlsMode: istio}}\n    endpoints: [{{address: 127.0.0.51, serviceAccount: ledger}}]\n"
    );
    let mut east = f
        .add_cluster("east", "net1", "us-east1/us-east1-b", "services: []\n")
        .unwrap();
    let mut west = f
        .add_cluster("west", "net1", "us-west1/us-west1-a", &west_reg)
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "east imports ledger and west's bundle",
        || {
            let s = east.status()?;
            let bundle = east.has_bundle_of("west")?;
            Ok((s["imports"]["west"].as_u64() == Some(1) && bundle).then_some(()))
        },
    )
    .unwrap();
    wait_for(Duration::from_secs(20), "west holds east's bundle", || {
        Ok(west.has_bundle_of("east")?.then_some(()))
    })
    .unwrap();

    // west's server: its own SVID, trusting east's root (as received through the federation).
    let server_certs = dir.join("ledger-certs");
    west.issue_svid("spiffe://west.mesh/ns/shop/sa/ledger", &server_certs)
        .unwrap();
    let py = python().unwrap();
    // The server takes clients of east.mesh only: east's roots, as west's agent wrote them from
    // the bundle it received.
    let east_roots = west.dir.join("xds/roots/east.mesh.pem");
    let srv = echo_server(
        "ledger",
        "ledger-west",
        &[format!("127.0.0.51:{port}")],
        Some((&server_certs, &east_roots)),
        &dir,
    )
    .unwrap();

    let client_certs = dir.join("client-certs");
    east.issue_svid("spiffe://east.mesh/ns/shop/sa/client", &client_certs)
        .unwrap();
    let boot = grpc_bootstrap(
        &dir.join("client-bootstrap.json"),
        &east.xds,
        "sidecar~127.0.0.1~client.shop~shop.svc.cluster.local",
        &client_certs,
        &east.dir.join("xds"),
    )
    .unwrap();
    let b = boot.display().to_string();
    let client = Proc::spawn_program(
        "client",
        &py,
        &[
            py_script("xds_echo.py").display().to_string(),
            "client".into(),
            "--target".into(),
            format!("xds:///ledger.shop.svc.cluster.local:{port}"),
            "--secure".into(),
        ],
        &[("GRPC_XDS_BOOTSTRAP", b.as_str()), GRPC_SPIFFE_ENV],
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "calls to succeed", || {
        let r = results(&client);
        Ok((r.len() >= 20 && r.iter().rev().take(20).all(|l| l == "ok ledger-west")).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{:?}",
            results(&client).iter().rev().take(5).collect::<Vec<_>>()
        )
    });
    let before = results(&client).len();

    // The federator dies; the agents keep serving what they know.
    f.federator.kill9();
    let down = down_for();
    let t = Instant::now();
    while t.elapsed() < down {
        std::thread::sleep(Duration::from_secs(1));
        let failed: Vec<String> = results(&client)
            .into_iter()
            .skip(before)
            .filter(|l| !l.starts_with("ok "))
            .collect();
        assert!(
            failed.is_empty(),
            "calls failed while the federator was down: {failed:?}"
        );
    }
    let during = results(&client).len() - before;
    assert!(east.status().unwrap()["connected"] == false);
    println!("federator down {down:?}: {during} cross-cluster mTLS calls, 0 failed");
    assert!(
        during as f64 >= down.as_secs_f64() * 5.0,
        "the client kept calling: {during}"
    );

    f.federator.start().unwrap();
    let t = Instant::now();
    for c in [&east, &west] {
        wait_for(Duration::from_secs(60), "the agents to reconnect", || {
            Ok((c.status()?["connected"] == true).then_some(()))
        })
        .unwrap();
    }
    println!(
        "both agents reconnected {:?} after the federator returned",
        t.elapsed()
    );
    for c in [&mut east, &mut west] {
        let log = c.agent().unwrap().log();
        assert!(
            !log.contains("export versions differ"),
            "{} resent its full export set\n{log}",
            c.name
        );
        let full = metric(
            &c.admin,
            "meshfed_agent_export_deltas_sent_total{kind=\"full\"}",
        )
        .unwrap();
        assert_eq!(
            full.unwrap_or(0.0),
            0.0,
            "{} sent a full export set",
            c.name
        );
    }
    let failed = results(&client)
        .into_iter()
        .skip(before)
        .filter(|l| !l.starts_with("ok "))
        .count();
    assert_eq!(failed, 0);
    drop(client);
    drop(srv);
}
