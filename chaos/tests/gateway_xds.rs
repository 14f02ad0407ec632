//! `meshfed gateway` fed by a real agent over xDS: routes follow registry changes live, and
//! openssl s_client reaches openssl s_server through it by SNI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use chaos::*;

fn cert(dir: &Path, cn: &str) {
    assert!(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={cn}")
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{cn}.key")))
        .arg("-out")
        .arg(dir.join(format!("{cn}.pem")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success());
}

fn s_server(dir: &Path, cn: &str, addr: &str) -> std::process::Child {
    let c = Command::new("openssl")
        .args(["s_server", "-accept", addr, "-alpn", "istio", "-www"])
        .arg("-cert")
        .arg(dir.join(format!("{cn}.pem")))
        .arg("-key")
        .arg(dir.join(format!("{cn}.key")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "s_server", || {
        Ok(std::net::TcpStream::connect(addr).ok().map(|_| ()))
    })
    .unwrap();
    c
}

fn s_client(gw: &str, sni: &str) -> String {
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            gw,
            "-servername",
            sni,
            "-alpn",
            "istio",
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// reviews (exported) at `ips`, and internal (not exported) at backend-a's address.
fn registry(port: u16, ips: &[&str]) -> String {
    let eps: Vec<String> = ips.iter().map(|ip| format!("{{address: {ip}}}")).collect();
    format!("services:\n  - namespace: shop\n    name: reviews\n    export: true\n    ports: [{{name: tls, port: {port}}}]\n    endpoints: [{}]\n  - namespace: shop\n    name: internal\n    ports: [{{name: tls, port: {port}}}]\n    endpoints: [{{address: 127.0.0.41}}]\n", eps.join(", "))
}

/// Every query of the shipped Grafana dashboard names metrics that the federator, an agent or
/// a gateway exports (read from their `/metrics` after traffic, a refused handshake and a
/// refused CA request).
fn grafana_dashboard_reads_what_meshfed_exports(
    f: &Federation,
    east: &Cluster,
    gateway_admin: &str,
    dir: &Path,
) {
    // A refused TLS handshake at east, and a CA request with a token nobody made.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&east.xds_mtls).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    }
    let bogus = dir.join("bogus.token");
    std::fs::write(&bogus, "not-a-token").unwrap();
    let (code, _, _) = meshfed(&[
        "workload",
        "init",
        "--agent",
        &east.xds_mtls,
        "--trust-domain",
        "east.mesh",
        "--namespace",
        "shop",
        "--service-account",
        "x",
        "--token-file",
        bogus.to_str().unwrap(),
        "--root-cert",
        east.dir.join("ca/root-cert.pem").to_str().unwrap(),
        "--out",
        dir.join("bogus-out").to_str().unwrap(),
        "--timeout",
        "5s",
    ])
    .unwrap();
    assert_ne!(code, 0);
    let mut exported = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(10), "the refusals counted", || {
        exported.clear();
        for admin in [f.admin.as_str(), east.admin.as_str(), gateway_admin] {
            let (_, m) = http_get(admin, "/metrics")?;
            for l in m.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                exported.insert(name.to_string());
                exported.insert(base.to_string());
            }
        }
        Ok((exported.contains("meshfed_tls_handshakes_refused_total")
            && exported.contains("meshfed_ca_requests_total")
            && exported.contains("meshfed_agent_imported_services"))
        .then_some(()))
    })
    .unwrap();
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/meshfed-federation.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut checked = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| w.starts_with("meshfed_") || w.starts_with("istio_"))
                .collect();
            assert!(!names.is_empty(), "{}: {expr}", p["title"]);
            for n in names {
                assert!(
                    exported.contains(n),
                    "panel {:?} queries {n}, which no meshfed process exports",
                    p["title"]
                );
                checked += 1;
            }
        }
    }
    println!("Grafana dashboard: {checked} metric names in its queries, all exported");
}

#[test]
fn gateway_routes_follow_the_agent_over_xds() {
    let f = Federation::start("5s").unwrap();
    let dir = f.root.path().to_path_buf();
    cert(&dir, "backend-a");
    cert(&dir, "backend-b");
    let port = free_port();
    let east = f
        .add_cluster(
            "east",
            "net1",
            "us-east1/us-east1-b",
            &registry(port, &["127.0.0.41"]),
        )
        .unwrap();
    // A peer, so east imports (and the dashboard's import and peer panels have series).
    let _west = f
        .add_cluster(
            "west",
            "net2",
            "us-west1/us-west1-a",
            &registry_yaml("w", 1, 8080, ""),
        )
        .unwrap();
    let mut a = s_server(&dir, "backend-a", &format!("127.0.0.41:{port}"));
    let mut b = s_server(&dir, "backend-b", &format!("127.0.0.42:{port}"));
    let gw = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let probe = format!("127.0.0.1:{}", free_port());
    let mut g = Proc::spawn(
        "gateway",
        &[
            "gateway",
            "--listen",
            &gw,
            "--xds",
            &east.xds,
            "--admin",
            &admin,
            "--probe",
            &probe,
            "--drain-timeout",
            "20s",
            "--cluster",
            "east",
        ]
        .map(String::from),
        &dir,
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the gateway to be ready (routes from xDS)",
        || {
            Ok(status(&admin)
                .ok()
                .filter(|(_, v)| v["services"].as_array().is_some_and(|s| !s.is_empty()))
                .map(|_| ()))
        },
    )
    .unwrap();
    let sni = format!("outbound_.{port}_._.reviews.shop.svc.cluster.local");
    let out = s_client(&gw, &sni);
    assert!(
        out.contains("backend-a") && out.contains("ALPN protocol: istio"),
        "{out}"
    );
    // Istio's standard TCP metrics, with Istio's labels, beside meshfed's own.
    let (_, m) = http_get(&admin, "/metrics").unwrap();
    let istio = m
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap_or_else(|| panic!("{m}"));
    for want in [
        "reporter=\"source\"",
        "destination_cluster=\"east\"",
        "destination_service=\"reviews.shop.svc.cluster.local\"",
        "destination_service_name=\"reviews\"",
        "destination_service_namespace=\"shop\"",
        "source_cluster=\"unknown\"",
    ] {
        assert!(istio.contains(want), "{want} in {istio}");
    }
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_tcp_received_bytes_total{") && !l.ends_with(" 0")),
        "{m}"
    );
    // east does not export internal: the gateway has no route to it, though it runs in east
    // (at the very address that just answered for reviews).
    let (_, st) = status(&admin).unwrap();
    assert_eq!(
        st["services"],
        serde_json::json!([format!("reviews.shop.svc.cluster.local:{port}")])
    );
    let out = s_client(
        &gw,
        &format!("outbound_.{port}_._.internal.shop.svc.cluster.local"),
    )
    .to_lowercase();
    assert!(
        out.contains("unrecognized name") && !out.contains("backend-a"),
        "{out}"
    );
    grafana_dashboard_reads_what_meshfed_exports(&f, &east, &admin, &dir);
    // The probe listener answers kubelet's questions, and nothing an operator's admin address
    // has.
    assert_eq!(http_get(&probe, "/healthz").unwrap().0, 200);
    let (code, metrics) = http_get(&probe, "/metrics").unwrap();
    assert!(
        code == 200 && metrics.contains("meshfed_gateway_refused_total"),
        "{metrics}"
    );
    assert_eq!(http_get(&probe, "/status").unwrap().0, 404);

    // The endpoint moves: the gateway follows without a restart.
    east.write_registry(&registry(port, &["127.0.0.42"]))
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "traffic at the new endpoint",
        || Ok(s_client(&gw, &sni).contains("backend-b").then_some(())),
    )
    .unwrap();
    // No endpoints: the gateway refuses with a TLS alert.
    east.write_registry(&registry(port, &[])).unwrap();
    wait_for(Duration::from_secs(20), "the route to be withdrawn", || {
        let out = s_client(&gw, &sni).to_lowercase();
        Ok(out.contains("unrecognized name").then_some(()))
    })
    .unwrap();
    let refused = metric(
        &admin,
        "meshfed_gateway_refused_total{reason=\"no_endpoint\"}",
    )
    .unwrap()
    .unwrap_or(0.0)
        + metric(
            &admin,
            "meshfed_gateway_refused_total{reason=\"unknown_sni\"}",
        )
        .unwrap()
        .unwrap_or(0.0);
    assert!(refused >= 1.0);

    // SIGTERM with a forwarded connection open: no new connections, the open one may finish,
    // then the process exits.
    east.write_registry(&registry(port, &["127.0.0.42"]))
        .unwrap();
    wait_for(Duration::from_secs(20), "the route back", || {
        Ok(s_client(&gw, &sni).contains("backend-b").then_some(()))
    })
    .unwrap();
    // The agent dies: the gateway keeps routing on its last table (static stability).
    let mut east = east;
    east.agent().unwrap().kill9();
    wait_for(
        Duration::from_secs(20),
        "the gateway to see its xDS stream gone",
        || {
            Ok(status(&admin)
                .ok()
                .filter(|(_, v)| v["xds_connected"] == false)
                .map(|_| ()))
        },
    )
    .unwrap();
    let out = s_client(&gw, &sni);
    assert!(out.contains("backend-b"), "routes survive the agent: {out}");
    // No SNI at all: refused with unrecognized_name.
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &gw,
            "-noservername",
            "-alpn",
            "istio",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = c.stdin.take();
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
    .to_lowercase();
    assert!(text.contains("unrecognized name"), "{text}");

    let mut open = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &gw,
            "-servername",
            &sni,
            "-alpn",
            "istio",
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the gateway to hold the open connection",
        || {
            Ok(status(&admin)
                .ok()
                .filter(|(_, v)| v["open_connections"] == 1)
                .map(|_| ()))
        },
    )
    .unwrap();
    g.term().unwrap();
    wait_for(Duration::from_secs(10), "the listener to close", || {
        Ok(std::net::TcpStream::connect(&gw).is_err().then_some(()))
    })
    .unwrap();
    assert!(!g.exited(), "still draining while a connection is open");
    // The admin server answers during the drain: not ready, still healthy.
    let (code, body) = http_get(&admin, "/readyz").unwrap();
    assert!(
        code == 503 && body.contains("not ready: draining"),
        "{body}"
    );
    let (code, body) = http_get(&admin, "/healthz").unwrap();
    assert!(code == 200 && body.ends_with("ok\n"), "{body}");
    let mut stdin = open.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(stdin);
    let out = open.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("backend-b"),
        "the open connection finished its exchange"
    );
    wait_for(
        Duration::from_secs(10),
        "the gateway to exit after draining",
        || Ok(g.exited().then_some(())),
    )
    .unwrap();
    assert!(g.log().contains("drained in"), "{}", g.log());
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
}
