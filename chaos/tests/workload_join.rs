//! A pod joins the mesh with nothing but its service-account token and the cluster's root:
//! `meshfed workload agent` obtains its certificate from the agent's CA API, its placement and
//! the trust bundles from the agent, writes a gRPC xDS bootstrap, renews, and relays xDS; a
//! grpcio client that has only those files calls a service of another cluster (another trust
//! domain) over mTLS. The API-server double plays Kubernetes (the pod, its node, TokenReview).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chaos::apiserver::{ApiServer, Token};
use chaos::*;
use serde_json::json;

fn token(api: &ApiServer, dir: &Path, name: &str, ns: &str, sa: &str) -> std::path::PathBuf {
    let text = format!("token-{name}-{}", free_port());
    api.add_token(
        &text,
        Token {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: vec!["istio-ca".into()],
            pod: Some(format!("{sa}-0")),
            expired: false,
        },
    );
    let p = dir.join(format!("{name}.token"));
    std::fs::write(&p, text).unwrap();
    p
}

/// `meshfed workload <cmd>` arguments for pod `pod` of shop, writing into `out`.
fn workload_args(
    cmd: &str,
    c: &Cluster,
    sa: &str,
    pod: &str,
    token: &Path,
    out: &Path,
) -> Vec<String> {
    let mut v: Vec<String> = [
        "workload",
        cmd,
        "--agent",
        &c.xds_mtls,
        "--trust-domain",
        &format!("{}.mesh", c.name),
        "--namespace",
        "shop",
        "--service-account",
        sa,
        "--pod-name",
        pod,
        "--timeout",
        "20s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if cmd == "agent" {
        // Any free port: several pods share this host's loopback here.
        v.extend(["--xds-listen".into(), "127.0.0.1:0".into()]);
    }
    v.push("--token-file".into());
    v.push(token.display().to_string());
    v.push("--root-cert".into());
    v.push(c.dir.join("ca/root-cert.pem").display().to_string());
    v.push("--out".into());
    v.push(out.display().to_string());
    v
}

fn serial(path: &Path) -> String {
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-ext", "subjectAltName", "-in"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn a_pod_joins_with_its_token_and_a_proxyless_client_calls_another_cluster() {
    let api = ApiServer::start().unwrap();
    let f = Federation::start("5s").unwrap();
    let dir = f.root.path().to_path_buf();
    let kubeconfig = api.kubeconfig(&dir.join("kubeconfig")).unwrap();
    // The pod runs on a node in another zone than the cluster's default locality: the
    // bootstrap's locality comes from the node.
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c",
        "labels": {"topology.kubernetes.io/region": "us-east1", "topology.kubernetes.io/zone": "us-east1-c"}}}))
        .unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client-0", "namespace": "shop", "labels": {"app": "client", "version": "v1"}},
        "spec": {"serviceAccountName": "client", "nodeName": "node-c", "containers": [{"name": "app", "image": "client"}]},
        "status": {"podIP": "127.0.0.1"}}))
        .unwrap();
    let port = free_port();
    let west_reg = format!(
        "services:\n  - namespace: shop\n    name: ledger\n    ports: [{{name: grpc, port: {port}}}]\n    export: true\n    labels: {{security.istio.io/tlsMode: istio}}\n    endpoints: [{{address: 127.0.0.52, serviceAccount: ledger}}]\n"
    );
    let kc = kubeconfig.display().to_string();
    // east issues 12-second certificates, so the test sees the pod renew.
    let east = f
        .add_cluster_with(
            "east",
            "net1",
            "us-east1/us-east1-b",
            "services: []\n",
            None,
            &[],
            &[
                "--source",
                "kubernetes",
                "--kubeconfig",
                &kc,
                "--sds-cert-ttl",
                "12s",
            ],
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net1", "us-west1/us-west1-a", &west_reg)
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "east imports ledger and both hold each other's bundle",
        || {
            let s = east.status()?;
            Ok((s["imports"]["west"].as_u64() == Some(1)
                && east.has_bundle_of("west")?
                && west.has_bundle_of("east")?)
            .then_some(()))
        },
    )
    .unwrap();

    // west's server: its own SVID, taking clients of east.mesh only.
    let server_certs = dir.join("ledger-certs");
    west.issue_svid("spiffe://west.mesh/ns/shop/sa/ledger", &server_certs)
        .unwrap();
    let py = python().unwrap();
    let srv = Proc::spawn_program(
        "ledger",
        &py,
        &[
            py_script("xds_echo.py").display().to_string(),
            "server".into(),
            "--name".into(),
            "ledger-west".into(),
            "--addr".into(),
            format!("127.0.0.52:{port}"),
            "--cert".into(),
            server_certs.join("cert-chain.pem").display().to_string(),
            "--key".into(),
            server_certs.join("key.pem").display().to_string(),
            "--roots".into(),
            west.dir
                .join("xds/roots/east.mesh.pem")
                .display()
                .to_string(),
        ],
        &[],
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the ledger server", || {
        Ok(srv.log().contains("serving").then_some(()))
    })
    .unwrap();

    // The pod's sidecar: token in, files out.
    let pod = dir.join("pod");
    let tok = token(&api, &dir, "client", "shop", "client");
    let mut sidecar = Proc::spawn(
        "workload-agent",
        &workload_args("agent", &east, "client", "client-0", &tok, &pod),
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the workload agent", || {
        let log = sidecar.log();
        assert!(!sidecar.exited(), "the workload agent exited:\n{log}");
        Ok(log.contains("xDS relay on").then_some(()))
    })
    .unwrap();
    let log = sidecar.log();
    assert!(
        log.contains("spiffe://east.mesh/ns/shop/sa/client until")
            && log.contains("locality us-east1/us-east1-c")
            && log.contains("bundles of east.mesh, west.mesh"),
        "{log}"
    );
    let first = serial(&pod.join("cert-chain.pem"));
    assert!(
        first.contains("URI:spiffe://east.mesh/ns/shop/sa/client"),
        "{first}"
    );
    let v = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(pod.join("root-cert.pem"))
        .arg("-untrusted")
        .arg(pod.join("cert-chain.pem"))
        .arg(pod.join("cert-chain.pem"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{v:?}");
    let boot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pod.join("grpc-bootstrap.json")).unwrap()).unwrap();
    assert_eq!(
        boot["node"]["id"],
        "sidecar~127.0.0.1~client-0.shop~shop.svc.cluster.local"
    );
    assert_eq!(boot["node"]["locality"]["zone"], "us-east1-c", "{boot}");
    assert_eq!(boot["node"]["metadata"]["NETWORK"], "net1");
    assert_eq!(boot["node"]["metadata"]["CLUSTER_ID"], "east");
    assert_eq!(boot["node"]["metadata"]["LABELS"]["app"], "client");
    let map: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pod.join("spiffe-bundle-map.json")).unwrap())
            .unwrap();
    assert!(
        map["trust_domains"]["west.mesh"]["keys"].is_array(),
        "{map}"
    );

    // The application: grpcio with the bootstrap and nothing else.
    let b = pod.join("grpc-bootstrap.json").display().to_string();
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
    let results = |p: &Proc| -> Vec<String> {
        p.log()
            .lines()
            .filter(|l| l.starts_with("ok ") || l.starts_with("err "))
            .map(str::to_string)
            .collect()
    };
    wait_for(
        Duration::from_secs(30),
        "mTLS calls to west's ledger",
        || {
            let r = results(&client);
            Ok(
                (r.len() >= 10 && r.iter().rev().take(10).all(|l| l == "ok ledger-west"))
                    .then_some(()),
            )
        },
    )
    .unwrap_or_else(|e| {
        let r = results(&client);
        panic!(
            "{e}\n{:?}\n{}\n{}",
            r.last(),
            sidecar.log(),
            east.agent.as_ref().map(|a| a.log()).unwrap_or_default()
        )
    });
    // The agent sees the pod as an xDS client in its node's locality.
    let ps = meshfed_ok(&["proxy-status", "--admin", &east.admin]).unwrap();
    assert!(ps.contains("sidecar~127.0.0.1~client-0.shop"), "{ps}");

    // Renewal: a new certificate before the 12-second one expires, and calls go on.
    let before = results(&client).len();
    wait_for(Duration::from_secs(30), "a renewed certificate", || {
        let now = serial(&pod.join("cert-chain.pem"));
        Ok((now != first).then_some(()))
    })
    .unwrap();
    wait_for(Duration::from_secs(30), "calls after the renewal", || {
        let r = results(&client);
        Ok((r.len() >= before + 10).then_some(r))
    })
    .map(|r| {
        let failed: Vec<_> = r[before..]
            .iter()
            .filter(|l| !l.starts_with("ok "))
            .collect();
        assert!(
            failed.is_empty(),
            "calls failed across the renewal: {failed:?}"
        );
    })
    .unwrap();
    println!(
        "pod joined; {} calls to west, renewed while calling",
        results(&client).len()
    );

    // Refusals, each named, each quick (nothing to wait for):
    // a token of another service account cannot speak for client-0 ...
    let other = token(&api, &dir, "other", "shop", "other");
    let (code, _, err) = meshfed(
        &workload_args(
            "init",
            &east,
            "other",
            "client-0",
            &other,
            &dir.join("other"),
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("pod shop/client-0 runs as service account client"),
        "{err}"
    );
    // ... a token for one account cannot obtain another's certificate ...
    let (code, _, err) = meshfed(
        &workload_args(
            "init",
            &east,
            "client",
            "client-0",
            &other,
            &dir.join("other2"),
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("PERMISSION_DENIED") || err.contains("may obtain only"),
        "{err}"
    );
    // ... and without a token or a certificate there is nothing to ask with.
    let (code, _, err) = meshfed(
        &workload_args(
            "init",
            &east,
            "client",
            "client-0",
            &dir.join("missing.token"),
            &dir.join("empty"),
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("missing.token"), "{err}");
    sidecar.term().unwrap();
}
