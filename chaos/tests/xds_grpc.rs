//! grpcio (PyPI) as a real proxyless gRPC client and server against the agent's xDS server:
//! locality priorities, failover when the local endpoints die, a pushed policy change, mTLS
//! across trust domains with SAN checks, and no NACK in `meshfed proxy-status`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chaos::*;

const OUTLIER: &str = "
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 1s
    baseEjectionTime: 10s
    maxEjectionPercent: 100
";

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: echo, namespace: shop}}\nspec:\n  host: echo.shop.svc.cluster.local\n{spec}"
    )
}

fn server(name: &str, addrs: &[String], tls: Option<(&Path, &Path)>, dir: &Path) -> Proc {
    let mut args = vec![
        py_script("xds_echo.py").display().to_string(),
        "server".into(),
        "--name".into(),
        name.into(),
    ];
    for a in addrs {
        args.push("--addr".into());
        args.push(a.clone());
    }
    if let Some((certs, roots)) = tls {
        args.extend([
            "--cert".into(),
            certs.join("cert-chain.pem").display().to_string(),
            "--key".into(),
            certs.join("key.pem").display().to_string(),
            "--roots".into(),
            roots.display().to_string(),
        ]);
    }
    let p = Proc::spawn_program(name, &python().unwrap(), &args, &[], dir).unwrap();
    wait_for(Duration::from_secs(20), &format!("server {name}"), || {
        Ok(p.log().contains("serving").then_some(()))
    })
    .unwrap();
    p
}

fn bootstrap(dir: &Path, xds: &str, certs: &Path, roots: &Path) -> PathBuf {
    grpc_bootstrap(
        &dir.join("bootstrap.json"),
        xds,
        "sidecar~127.0.0.1~client.shop~shop.svc.cluster.local",
        certs,
        roots,
    )
    .unwrap()
}

fn client(name: &str, target: &str, secure: bool, bootstrap: &Path, dir: &Path) -> Proc {
    let mut args = vec![
        py_script("xds_echo.py").display().to_string(),
        "client".into(),
        "--target".into(),
        target.into(),
    ];
    if secure {
        args.push("--secure".into());
    }
    let b = bootstrap.display().to_string();
    Proc::spawn_program(
        name,
        &python().unwrap(),
        &args,
        &[("GRPC_XDS_BOOTSTRAP", b.as_str())],
        dir,
    )
    .unwrap()
}

/// The client's result lines after line `from`.
fn lines(p: &Proc, from: usize) -> Vec<String> {
    p.log()
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("err "))
        .skip(from)
        .map(str::to_string)
        .collect()
}

fn count(p: &Proc) -> usize {
    lines(p, 0).len()
}

/// Waits until the last `n` results are all `ok` from servers in `names`.
fn wait_streak(p: &Proc, names: &[&str], n: usize, timeout: Duration, what: &str) -> Duration {
    let start = Instant::now();
    wait_for(timeout, what, || {
        let l = lines(p, 0);
        let tail: Vec<&String> = l.iter().rev().take(n).collect();
        let ok = tail.len() == n
            && tail
                .iter()
                .all(|x| names.iter().any(|s| x.as_str() == format!("ok {s}")));
        Ok(ok.then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nclient log tail: {:?}",
            lines(p, 0).iter().rev().take(10).collect::<Vec<_>>()
        )
    });
    start.elapsed()
}

#[test]
fn grpcio_follows_priorities_failover_and_policy_changes_with_mtls_across_trust_domains() {
    let f = Federation::start("3s").unwrap();
    let dir = f.root.path().to_path_buf();
    let port = free_port();
    let (sport, iport) = (free_port(), free_port());
    let east_reg = format!(
        "services:\n  - namespace: shop\n    name: echo\n    ports: [{{name: grpc, port: {port}}}]\n    export: true\n    endpoints:\n      - {{address: 127.0.0.11, locality: us-east1/us-east1-b}}\n      - {{address: 127.0.0.12, locality: us-east1/us-east1-b}}\n"
    );
    let west_reg = format!(
        "services:\n  - namespace: shop\n    name: echo\n    ports: [{{name: grpc, port: {port}}}]\n    export: true\n    endpoints:\n      - {{address: 127.0.0.21, locality: us-west1/us-west1-a}}\n  - namespace: shop\n    name: secure\n    ports: [{{name: grpc, port: {sport}}}]\n    export: true\n    labels: {{security.istio.io/tlsMode: istio}}\n    endpoints: [{{address: 127.0.0.31, locality: us-west1/us-west1-a, serviceAccount: secure}}]\n  - namespace: shop\n    name: impostor\n    ports: [{{name: grpc, port: {iport}}}]\n    export: true\n    labels: {{security.istio.io/tlsMode: istio}}\n    endpoints: [{{address: 127.0.0.31, locality: us-west1/us-west1-a, serviceAccount: payment}}]\n"
    );
    // One network, two clusters with their own CAs and trust domains.
    let east = f
        .add_cluster("east", "net1", "us-east1/us-east1-b", &east_reg)
        .unwrap();
    east.write_policy("echo.yaml", &policy(OUTLIER)).unwrap();
    let west = f
        .add_cluster("west", "net1", "us-west1/us-west1-a", &west_reg)
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "east imports west's services and bundle",
        || {
            let s = east.status()?;
            let bundle = east.has_bundle_of("west")?;
            Ok((s["imports"]["west"].as_u64() == Some(3) && bundle).then_some(()))
        },
    )
    .unwrap();
    wait_for(Duration::from_secs(20), "west holds east's bundle", || {
        Ok(west.has_bundle_of("east")?.then_some(()))
    })
    .unwrap();

    let a = |ip: &str, p: u16| vec![format!("{ip}:{p}")];
    let mut e1 = server("e1", &a("127.0.0.11", port), None, &dir);
    let mut e2 = server("e2", &a("127.0.0.12", port), None, &dir);
    let _w1 = server("w1", &a("127.0.0.21", port), None, &dir);

    // (a) the client's own locality first.
    let client_certs = dir.join("client-certs");
    east.issue_svid("spiffe://east.mesh/ns/shop/sa/client", &client_certs)
        .unwrap();
    let east_roots = east.dir.join("xds/trust-roots.pem");
    let boot = bootstrap(&dir, &east.xds, &client_certs, &east_roots);
    let target = format!("xds:///echo.shop.svc.cluster.local:{port}");
    let c = client("client-echo", &target, false, &boot, &dir);
    wait_streak(
        &c,
        &["e1", "e2"],
        20,
        Duration::from_secs(30),
        "calls to east's endpoints",
    );
    // A window of the next 20 calls.
    let n = count(&c);
    wait_for(Duration::from_secs(30), "20 more calls", || {
        Ok((count(&c) >= n + 20).then_some(()))
    })
    .unwrap();
    let window = lines(&c, n);
    assert!(window.len() >= 20, "{window:?}");
    assert!(
        window.iter().all(|l| l == "ok e1" || l == "ok e2"),
        "priority 0 (own locality) only: {window:?}"
    );
    assert!(window.iter().any(|l| l == "ok e1") && window.iter().any(|l| l == "ok e2"));
    println!("(a) {} calls, all to the client's locality", window.len());

    // (b) the local endpoints die: calls go to the next priority.
    let before = count(&c);
    e1.kill9();
    e2.kill9();
    let took = wait_streak(&c, &["w1"], 20, Duration::from_secs(30), "failover to west");
    let during = lines(&c, before);
    let failed = during.iter().filter(|l| l.starts_with("err")).count();
    println!(
        "(b) failover to priority 1 in {:.1}s, {failed} of {} calls failed meanwhile",
        took.as_secs_f64(),
        during.len()
    );

    // ... and come back when they return.
    e1.start().unwrap();
    e2.start().unwrap();
    wait_streak(
        &c,
        &["e1", "e2"],
        20,
        Duration::from_secs(60),
        "traffic back to east",
    );
    println!("(b) traffic back to priority 0 after the endpoints returned");

    // (c) a policy change is pushed and the traffic follows it.
    east.write_policy(
        "echo.yaml",
        &policy("  distribute:\n    - from: us-east1/*\n      to: {\"us-west1/*\": 100}\n"),
    )
    .unwrap();
    let took = wait_streak(
        &c,
        &["w1"],
        20,
        Duration::from_secs(30),
        "traffic to follow the new policy",
    );
    println!("(c) new policy followed in {:.1}s", took.as_secs_f64());

    // (d) mTLS with the server of another trust domain, its bundle from the federation.
    let secure_certs = dir.join("secure-certs");
    west.issue_svid("spiffe://west.mesh/ns/shop/sa/secure", &secure_certs)
        .unwrap();
    let west_roots = west.dir.join("xds/trust-roots.pem");
    let _s = server(
        "secure",
        &[format!("127.0.0.31:{sport}"), format!("127.0.0.31:{iport}")],
        Some((&secure_certs, &west_roots)),
        &dir,
    );
    let roots = std::fs::read_to_string(&east_roots).unwrap();
    assert!(
        roots.contains("# west.mesh"),
        "east's trust roots carry west's bundle: {roots}"
    );
    let sc = client(
        "client-secure",
        &format!("xds:///secure.shop.svc.cluster.local:{sport}"),
        true,
        &boot,
        &dir,
    );
    wait_streak(
        &sc,
        &["secure"],
        5,
        Duration::from_secs(30),
        "mTLS calls to west's server",
    );
    println!("(d) mTLS east client -> west server (spiffe://west.mesh/ns/shop/sa/secure) works");
    // The same server behind a service whose identity is payment: the SAN check refuses it.
    let ic = client(
        "client-impostor",
        &format!("xds:///impostor.shop.svc.cluster.local:{iport}"),
        true,
        &boot,
        &dir,
    );
    wait_for(Duration::from_secs(30), "the SAN mismatch", || {
        let l = lines(&ic, 0);
        Ok((l.len() >= 5).then_some(l))
    })
    .map(|l| {
        assert!(
            l.iter().all(|x| x.starts_with("err")),
            "a wrong SAN must fail: {l:?}"
        );
        println!("(d) wrong SAN refused: {}", l[l.len() - 1]);
    })
    .unwrap();
    // A plaintext client cannot reach the mTLS server either.
    let pc = client(
        "client-plain",
        &format!("xds:///secure.shop.svc.cluster.local:{sport}"),
        false,
        &boot,
        &dir,
    );
    wait_for(Duration::from_secs(30), "plaintext refused", || {
        let l = lines(&pc, 0);
        Ok((l.len() >= 3).then_some(l))
    })
    .map(|l| assert!(l.iter().all(|x| x.starts_with("err")), "{l:?}"))
    .unwrap();

    // west publishes a policy with its `secure` export; east's proxies get it.
    west.write_policy(
        "secure.yaml",
        "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: secure, namespace: shop}\nspec:\n  host: secure.shop.svc.cluster.local\n  publish: true\n  outlierDetection: {consecutive5xxErrors: 7, interval: 2s}\n",
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "west's published policy at east's proxies",
        || {
            let d = meshfed_ok(&[
                "proxy-config",
                "sidecar~127.0.0.1~client.shop",
                "cluster",
                "--admin",
                &east.admin,
            ])?;
            let v: serde_json::Value = serde_json::from_str(&d)?;
            let secure = v["cluster"].as_array().and_then(|cs| {
                cs.iter()
                    .find(|c| {
                        c["name"] == format!("outbound|{sport}||secure.shop.svc.cluster.local")
                    })
                    .cloned()
            });
            Ok(secure
                .filter(|c| c["outlierDetection"]["consecutive5xx"] == 7)
                .map(|_| ()))
        },
    )
    .unwrap();
    println!("(c) a policy published by west with its export is applied by east");

    // (e) every response was ACKed.
    let (code, out, err) = meshfed(&["proxy-status", "--admin", &east.admin]).unwrap();
    println!("{out}");
    assert_eq!(code, 0, "proxy-status reports a NACK: {out}{err}");
    assert!(out.contains("SYNCED") && !out.contains("NACK"), "{out}");
    let (code, json, _) = meshfed(&["proxy-status", "--admin", &east.admin, "-o", "json"]).unwrap();
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let proxies = v.as_array().unwrap();
    assert!(proxies.len() >= 4, "{json}");
    for p in proxies {
        for t in ["listener", "route", "cluster", "endpoint"] {
            assert_eq!(
                p["types"][t]["state"], "SYNCED",
                "{t} of {}: {json}",
                p["connection"]
            );
        }
    }
    let dump = meshfed_ok(&[
        "proxy-config",
        "sidecar~127.0.0.1~client.shop",
        "cluster",
        "--admin",
        &east.admin,
    ])
    .unwrap();
    assert!(
        dump.contains(&format!("outbound|{sport}||secure.shop.svc.cluster.local")),
        "{dump}"
    );
    assert!(
        dump.contains("spiffe://west.mesh/ns/shop/sa/secure"),
        "{dump}"
    );
}
