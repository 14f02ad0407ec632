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
    echo_server(name, name, addrs, tls, dir).unwrap()
}

/// With openssl and a CA's signing key (Istio cacerts layout: ca-cert.pem, ca-key.pem,
/// cert-chain.pem), mints a leaf for `id` into `out` (cert-chain.pem, key.pem), as someone
/// holding that CA's key could: no meshfed code is involved.
fn forge(ca: &Path, id: &str, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl {args:?}: {o:?}");
    };
    std::fs::write(
        out.join("ext.cnf"),
        format!("subjectAltName=critical,URI:{id}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )
    .unwrap();
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "key.pem",
        "-subj",
        "/O=rogue",
        "-out",
        "leaf.csr",
    ]);
    let (cert, key) = (ca.join("ca-cert.pem"), ca.join("ca-key.pem"));
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        cert.to_str().unwrap(),
        "-CAkey",
        key.to_str().unwrap(),
        "-set_serial",
        "4242",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "leaf.pem",
    ]);
    let chain = std::fs::read_to_string(ca.join("cert-chain.pem"))
        .or_else(|_| std::fs::read_to_string(&cert))
        .unwrap();
    let leaf = std::fs::read_to_string(out.join("leaf.pem")).unwrap();
    std::fs::write(out.join("cert-chain.pem"), leaf + &chain).unwrap();
}

fn bootstrap(dir: &Path, xds: &str, certs: &Path, trust: &Path) -> PathBuf {
    grpc_bootstrap(
        &dir.join("bootstrap.json"),
        xds,
        "sidecar~127.0.0.1~client.shop~shop.svc.cluster.local",
        certs,
        trust,
    )
    .unwrap()
}

fn client(name: &str, target: &str, secure: bool, bootstrap: &Path, dir: &Path) -> Proc {
    client_with(name, target, secure, bootstrap, dir, &[])
}

/// A client with more arguments (`--header k=v`, `--sni NAME`).
fn client_with(
    name: &str,
    target: &str,
    secure: bool,
    bootstrap: &Path,
    dir: &Path,
    extra: &[String],
) -> Proc {
    let mut args = vec![
        py_script("xds_echo.py").display().to_string(),
        "client".into(),
        "--target".into(),
        target.into(),
    ];
    args.extend(extra.iter().cloned());
    if secure {
        args.push("--secure".into());
    }
    let b = bootstrap.display().to_string();
    Proc::spawn_program(
        name,
        &python().unwrap(),
        &args,
        &[("GRPC_XDS_BOOTSTRAP", b.as_str()), GRPC_SPIFFE_ENV],
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

/// meshfed's Rust client as a proxy would use it: east's client SVID, the servers verified
/// against east's bundle map (one bundle per trust domain), the expected SPIFFE ID required.
/// How the TLS handshake with `addr` ended.
fn rust_handshake(certs: &Path, map: &Path, addr: &str, expect: &str) -> Result<(), String> {
    let (svid, _) = trust::Svid::load(certs).unwrap();
    let mut set = trust::BundleSet::new();
    let text = std::fs::read_to_string(map).unwrap();
    for b in trust::bundle::parse_bundle_map(&text, "bundle map").unwrap() {
        set.insert(b).unwrap();
    }
    let mut cfg = trust::tls::client_config(
        trust::tls::SvidResolver::with(&svid).unwrap(),
        trust::tls::SpiffeVerifier::new(
            trust::TrustStore::new(set),
            trust::tls::Authorizer::id(trust::SpiffeId::new(expect).unwrap()),
        ),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("outbound.mesh").unwrap();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

#[test]
fn grpcio_follows_priorities_failover_and_policy_changes_with_mtls_across_trust_domains() {
    let f = Federation::start("3s").unwrap();
    let dir = f.root.path().to_path_buf();
    let port = free_port();
    let (sport, iport, fport) = (free_port(), free_port(), free_port());
    let east_reg = format!(
        "services:\n  - namespace: shop\n    name: echo\n    ports: [{{name: grpc, port: {port}}}]\n    export: true\n    endpoints:\n      - {{address: 127.0.0.11, locality: us-east1/us-east1-b}}\n      - {{address: 127.0.0.12, locality: us-east1/us-east1-b}}\n  - namespace: shop\n    name: forged\n    ports: [{{name: grpc, port: {fport}}}]\n    labels: {{security.istio.io/tlsMode: istio}}\n    endpoints: [{{address: 127.0.0.32, locality: us-east1/us-east1-b, serviceAccount: forged}}]\n"
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
    let boot = bootstrap(&dir, &east.xds, &client_certs, &east.dir.join("xds"));
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
    // west's server takes clients of east.mesh: east's roots as west's agent received them.
    let east_at_west = west.dir.join("xds/roots/east.mesh.pem");
    let _s = server(
        "secure",
        &[format!("127.0.0.31:{sport}"), format!("127.0.0.31:{iport}")],
        Some((&secure_certs, &east_at_west)),
        &dir,
    );
    // east's agent keeps a SPIFFE bundle map with west's bundle under west.mesh, and its
    // fallback roots file holds east's roots only.
    let map: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(east.dir.join("xds/spiffe-bundle-map.json")).unwrap(),
    )
    .unwrap();
    assert!(
        map["trust_domains"]["west.mesh"]["keys"].is_array()
            && map["trust_domains"]["east.mesh"]["keys"].is_array(),
        "{map}"
    );
    let own = std::fs::read_to_string(east.dir.join("xds/trust-roots.pem")).unwrap();
    let west_pem = std::fs::read_to_string(east.dir.join("xds/roots/west.mesh.pem")).unwrap();
    assert!(
        !own.is_empty() && !own.contains(west_pem.trim()),
        "not a pool"
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

    // (f) A compromised CA of one cluster cannot speak for another: west's CA (its key, used
    // by openssl as an attacker would) signs spiffe://east.mesh/ns/shop/sa/forged, and a
    // server presenting it as the endpoint of east's own `forged` service (the right SAN) is
    // refused by east's client, because an east.mesh identity is verified against east's
    // bundle only. With a pooled roots file (own and peer roots together) it was accepted.
    let rogue = dir.join("rogue-certs");
    forge(
        &west.dir.join("ca"),
        "spiffe://east.mesh/ns/shop/sa/forged",
        &rogue,
    );
    let _r = server(
        "forged",
        &[format!("127.0.0.32:{fport}")],
        Some((&rogue, &east.dir.join("xds/trust-roots.pem"))),
        &dir,
    );
    // Its own node id, so `proxy-config` below still names the first client.
    let rogue_boot = grpc_bootstrap(
        &dir.join("forged-bootstrap.json"),
        &east.xds,
        "sidecar~127.0.0.1~forged-client.shop~shop.svc.cluster.local",
        &client_certs,
        &east.dir.join("xds"),
    )
    .unwrap();
    let rc = client(
        "client-forged",
        &format!("xds:///forged.shop.svc.cluster.local:{fport}"),
        true,
        &rogue_boot,
        &dir,
    );
    wait_for(
        Duration::from_secs(30),
        "the forged certificate's fate",
        || {
            let l = lines(&rc, 0);
            Ok((l.len() >= 5).then_some(l))
        },
    )
    .map(|l| {
        assert!(
            l.iter().all(|x| x.starts_with("err")),
            "an east.mesh SVID minted by west's CA must be refused: {l:?}"
        );
        println!(
            "(f) east.mesh identity signed by west's CA refused: {}",
            l[l.len() - 1]
        );
    })
    .unwrap();
    // The same with meshfed's Rust client and east's bundle map: the forged server is
    // refused (naming east's bundle), west's genuine one accepted.
    let map = east.dir.join("xds/spiffe-bundle-map.json");
    let forged = rust_handshake(
        &client_certs,
        &map,
        &format!("127.0.0.32:{fport}"),
        "spiffe://east.mesh/ns/shop/sa/forged",
    );
    assert!(
        forged.as_ref().is_err_and(|e| e.contains("east.mesh")),
        "{forged:?}"
    );
    let genuine = rust_handshake(
        &client_certs,
        &map,
        &format!("127.0.0.31:{sport}"),
        "spiffe://west.mesh/ns/shop/sa/secure",
    );
    assert!(genuine.is_ok(), "{genuine:?}");
    println!(
        "(f) meshfed's Rust client: forged refused ({}), genuine accepted",
        forged.unwrap_err()
    );
    // A client that does not read the bundle map (no GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE) falls
    // back to `ca_certificate_file`, east's own roots only: it fails closed on west's genuine
    // server rather than trusting a pool.
    let b = boot.display().to_string();
    let nc = Proc::spawn_program(
        "client-no-spiffe",
        &python().unwrap(),
        &[
            py_script("xds_echo.py").display().to_string(),
            "client".into(),
            "--target".into(),
            format!("xds:///secure.shop.svc.cluster.local:{sport}"),
            "--secure".into(),
        ],
        &[("GRPC_XDS_BOOTSTRAP", b.as_str())],
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the fallback's verdict", || {
        let l = lines(&nc, 0);
        Ok((l.len() >= 3).then_some(l))
    })
    .map(|l| {
        assert!(
            l.iter().all(|x| x.starts_with("err")),
            "without the bundle map only east's roots are trusted: {l:?}"
        );
    })
    .unwrap();
    // The genuine west server still works for a client that reads the map.
    wait_streak(
        &sc,
        &["secure"],
        5,
        Duration::from_secs(30),
        "the genuine west server still answering",
    );

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

/// Routes select a subset for proxyless gRPC, across networks. east's policy names subsets v1
/// (east runs it) and v2 (west runs it, on another network), and a VirtualService sends calls
/// without `x-version: v2` (no such header, or another value: `withoutHeaders`) to v1, and
/// those with it to v2. east's grpcio client, routed by the RDS east's
/// agent serves, reaches v2 only through west's east-west gateway by the subset's SNI (grpcio
/// sends the SNI it is given as its TLS target name: it does not send the cluster's `sni`), with
/// mTLS end to end from east.mesh to west.mesh; its other calls go to east's v1 directly. When
/// the route goes, the header no longer selects v2.
#[test]
fn grpcio_is_routed_to_a_subset_through_the_gateway_by_subset_sni() {
    let f = Federation::start("3s").unwrap();
    let dir = f.root.path().to_path_buf();
    let port = free_port();
    let gw = format!("127.0.0.1:{}", free_port());
    let gw_admin = format!("127.0.0.1:{}", free_port());
    let host = "ledger.shop.svc.cluster.local";
    let registry = |ip: &str, locality: &str, version: &str| {
        format!(
            "services:\n  - namespace: shop\n    name: ledger\n    ports: [{{name: grpc, port: {port}}}]\n    export: true\n    labels: {{security.istio.io/tlsMode: istio}}\n    endpoints:\n      - {{address: {ip}, locality: {locality}, serviceAccount: ledger, labels: {{version: {version}}}}}\n"
        )
    };
    let subsets = |name: &str, extra: &str, list: &str| {
        format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  host: ledger\n{extra}  subsets:\n{list}"
        )
    };
    let v1 = "    - {name: v1, labels: {version: v1}}\n";
    let v2 = "    - {name: v2, labels: {version: v2}}\n";
    let east = f
        .add_cluster(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            &registry("127.0.0.11", "us-east1/us-east1-b", "v1"),
        )
        .unwrap();
    let west = f
        .add_cluster_in(
            "west",
            "net-w",
            "us-west1/us-west1-a",
            &registry("127.0.0.21", "us-west1/us-west1-a", "v2"),
            None,
            std::slice::from_ref(&gw),
        )
        .unwrap();
    // west defines v2 and publishes it, so its gateway routes v2's SNI.
    west.write_policy(
        "ledger.yaml",
        &subsets("ledger-west", "  publish: true\n", v2),
    )
    .unwrap();
    east.write_policy("ledger.yaml", &subsets("ledger", "", &format!("{v1}{v2}")))
        .unwrap();
    // Every call meets one of the two routes: without x-version: v2 (the header absent, or
    // another value) to v1; with it to v2.
    let routes = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ledger, namespace: shop}\nspec:\n  hosts: [ledger]\n  http:\n    - name: not-v2\n      match: [{withoutHeaders: {x-version: {exact: v2}}}]\n      route: [{destination: {host: ledger, subset: v1}}]\n    - name: v2-by-header\n      match: [{headers: {x-version: {exact: v2}}}]\n      route: [{destination: {host: ledger, subset: v2}}]\n";
    east.write_policy("ledger-routes.yaml", routes).unwrap();
    wait_peered(&east, &west, 1, Duration::from_secs(30)).unwrap();
    // A proxyless client offers ALPN h2, not Istio's: the gateway takes any.
    let _gw = west
        .start_gateway_with("gw-west", &gw, &gw_admin, &dir, &["--any-alpn"])
        .unwrap();

    // v1 in east with east's identity, v2 in west with west's; each takes east.mesh clients.
    let (east_certs, west_certs) = (dir.join("east-ledger"), dir.join("west-ledger"));
    east.issue_svid("spiffe://east.mesh/ns/shop/sa/ledger", &east_certs)
        .unwrap();
    west.issue_svid("spiffe://west.mesh/ns/shop/sa/ledger", &west_certs)
        .unwrap();
    let east_roots = east.dir.join("xds/trust-roots.pem");
    let east_at_west = west.dir.join("xds/roots/east.mesh.pem");
    let _s1 = server(
        "v1",
        &[format!("127.0.0.11:{port}")],
        Some((&east_certs, &east_roots)),
        &dir,
    );
    let _s2 = server(
        "v2",
        &[format!("127.0.0.21:{port}")],
        Some((&west_certs, &east_at_west)),
        &dir,
    );

    let client_certs = dir.join("client-certs");
    east.issue_svid("spiffe://east.mesh/ns/shop/sa/client", &client_certs)
        .unwrap();
    let boot = bootstrap(&dir, &east.xds, &client_certs, &east.dir.join("xds"));
    let target = format!("xds:///{host}:{port}");
    let sni_v2 = format!("outbound_.{port}_.v2_.{host}");
    let routed = |name: &str, version: Option<&str>| {
        let mut extra = vec!["--sni".to_string(), sni_v2.clone()];
        if let Some(v) = version {
            extra.extend(["--header".to_string(), format!("x-version={v}")]);
        }
        client_with(name, &target, true, &boot, &dir, &extra)
    };
    let gw_connections = || {
        metric(
            &gw_admin,
            &format!("meshfed_gateway_connections_total{{destination_service=\"{host}:{port}\"}}"),
        )
        .ok()
        .flatten()
        .unwrap_or(0.0)
    };
    let before = gw_connections();
    let to_v2 = routed("client-v2", Some("v2"));
    wait_streak(
        &to_v2,
        &["v2"],
        20,
        Duration::from_secs(60),
        "calls routed to v2",
    );
    let rest = routed("client-rest", None);
    wait_streak(
        &rest,
        &["v1"],
        20,
        Duration::from_secs(60),
        "calls without the header to v1",
    );
    let v3 = routed("client-v3", Some("v3"));
    wait_streak(
        &v3,
        &["v1"],
        20,
        Duration::from_secs(60),
        "calls with x-version: v3 to v1",
    );
    // Windows of 20 more calls each: only their subset answers.
    let (n2, n1, n3) = (count(&to_v2), count(&rest), count(&v3));
    wait_for(Duration::from_secs(30), "20 more calls each", || {
        Ok(
            (count(&to_v2) >= n2 + 20 && count(&rest) >= n1 + 20 && count(&v3) >= n3 + 20)
                .then_some(()),
        )
    })
    .unwrap();
    let (w2, w1, w3) = (lines(&to_v2, n2), lines(&rest, n1), lines(&v3, n3));
    assert!(
        w2.iter().all(|l| l == "ok v2"),
        "x-version: v2 -> v2 only: {w2:?}"
    );
    assert!(
        w1.iter().all(|l| l == "ok v1"),
        "no header -> v1 only: {w1:?}"
    );
    assert!(
        w3.iter().all(|l| l == "ok v1"),
        "x-version: v3 -> v1 only: {w3:?}"
    );
    let through = gw_connections() - before;
    assert!(
        through >= 1.0,
        "v2's calls crossed west's gateway ({through} connections)"
    );
    let refused = metric(
        &gw_admin,
        "meshfed_gateway_refused_total{reason=\"no_sni\"}",
    )
    .unwrap()
    .unwrap_or(0.0);
    assert_eq!(refused, 0.0, "grpcio sent the subset SNI");
    println!(
        "{} calls with x-version: v2 all answered by west's v2 through its gateway ({through} connections by SNI {sni_v2}); {} without the header and {} with v3 by east's v1",
        w2.len(),
        w1.len(),
        w3.len()
    );

    // Without the VirtualService, the host's one route takes every call to the whole service
    // (v1 or v2): the header selects nothing any more.
    std::fs::remove_file(east.policy_dir.join("ledger-routes.yaml")).unwrap();
    let n = count(&to_v2);
    wait_for(
        Duration::from_secs(30),
        "a call with the header answered by v1",
        || Ok(lines(&to_v2, n).iter().any(|l| l == "ok v1").then_some(())),
    )
    .unwrap();
    println!("routes removed: calls with the header reach v1 too");
}

/// Retries from a VirtualService reach grpcio (gRFC A44): a server failing every second call
/// with UNAVAILABLE fails about half of them until the route says `retries: {attempts: 2,
/// retryOn: unavailable}`; then every call succeeds while the server goes on failing attempts.
#[test]
fn grpcio_retries_as_the_virtual_service_says() {
    let f = Federation::start("3s").unwrap();
    let dir = f.root.path().to_path_buf();
    let port = free_port();
    let east = f
        .add_cluster(
            "east",
            "net1",
            "us-east1/us-east1-b",
            &format!("services:\n  - namespace: shop\n    name: flaky\n    ports: [{{name: grpc, port: {port}}}]\n    endpoints: [{{address: 127.0.0.41, locality: us-east1/us-east1-b}}]\n"),
        )
        .unwrap();
    let server = Proc::spawn_program(
        "flaky",
        &python().unwrap(),
        &[
            py_script("xds_echo.py").display().to_string(),
            "server".into(),
            "--name".into(),
            "flaky".into(),
            "--addr".into(),
            format!("127.0.0.41:{port}"),
            "--fail-every".into(),
            "2".into(),
        ],
        &[],
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the flaky server", || {
        Ok(server.log().contains("serving").then_some(()))
    })
    .unwrap();
    let certs = dir.join("client-certs");
    east.issue_svid("spiffe://east.mesh/ns/shop/sa/client", &certs)
        .unwrap();
    let boot = bootstrap(&dir, &east.xds, &certs, &east.dir.join("xds"));
    let c = client(
        "client-flaky",
        &format!("xds:///flaky.shop.svc.cluster.local:{port}"),
        false,
        &boot,
        &dir,
    );
    // Without retries: calls fail.
    wait_for(Duration::from_secs(60), "a failed call", || {
        Ok(lines(&c, 0)
            .iter()
            .any(|l| l.starts_with("err UNAVAILABLE"))
            .then_some(()))
    })
    .unwrap();
    east.write_policy(
        "flaky.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: flaky, namespace: shop}\nspec:\n  hosts: [flaky]\n  http:\n    - route: [{destination: {host: flaky}}]\n      retries: {attempts: 2, retryOn: unavailable}\n",
    )
    .unwrap();
    // With them: 40 calls in a row succeed (without, at most one in two does), while the
    // server fails every second attempt.
    wait_streak(&c, &["flaky"], 40, Duration::from_secs(60), "calls retried");
    let failed = server
        .log()
        .lines()
        .filter(|l| l.starts_with("failed"))
        .count();
    let n = count(&c);
    wait_for(Duration::from_secs(30), "20 more calls", || {
        Ok((count(&c) >= n + 20).then_some(()))
    })
    .unwrap();
    let window = lines(&c, n);
    assert!(window.iter().all(|l| l == "ok flaky"), "{window:?}");
    let failed_after = server
        .log()
        .lines()
        .filter(|l| l.starts_with("failed"))
        .count();
    assert!(
        failed_after >= failed + 10,
        "the server failed attempts meanwhile ({failed} -> {failed_after})"
    );
    println!(
        "{} calls without a failure; the server failed {} attempts meanwhile",
        window.len(),
        failed_after - failed
    );
}
