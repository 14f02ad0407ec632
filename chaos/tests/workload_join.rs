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

/// The federation both tests use: east reads the API double (12-second certificates, and
/// `east_args`), west exports `ledger`, served by grpcio over mTLS with west's SVID (clients of
/// east.mesh only); pod `client-0` of shop runs on node-c (us-east1-c).
struct Setup {
    api: ApiServer,
    _f: Federation,
    dir: std::path::PathBuf,
    east: Cluster,
    _west: Cluster,
    _srv: Proc,
    port: u16,
}

fn setup(east_args: &[&str]) -> Setup {
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
    // east issues 12-second certificates, so a test sees pods renew.
    let mut args = vec![
        "--source",
        "kubernetes",
        "--kubeconfig",
        &kc,
        "--sds-cert-ttl",
        "12s",
    ];
    args.extend_from_slice(east_args);
    let east = f
        .add_cluster_with(
            "east",
            "net1",
            "us-east1/us-east1-b",
            "services: []\n",
            None,
            &[],
            &args,
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net1", "us-west1/us-west1-a", &west_reg)
        .unwrap();
    wait_peered(&east, &west, 1, Duration::from_secs(20)).unwrap();

    // west's server: its own SVID, taking clients of east.mesh only.
    let server_certs = dir.join("ledger-certs");
    west.issue_svid("spiffe://west.mesh/ns/shop/sa/ledger", &server_certs)
        .unwrap();
    let east_roots = west.dir.join("xds/roots/east.mesh.pem");
    let srv = echo_server(
        "ledger",
        "ledger-west",
        &[format!("127.0.0.52:{port}")],
        Some((&server_certs, &east_roots)),
        &dir,
    )
    .unwrap();
    Setup {
        api,
        _f: f,
        dir,
        east,
        _west: west,
        _srv: srv,
        port,
    }
}

fn results(p: &Proc) -> Vec<String> {
    p.log()
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("err "))
        .map(str::to_string)
        .collect()
}

/// grpcio calling west's ledger through xDS, with `env` (its bootstrap) and nothing else.
fn grpc_client(s: &Setup, name: &str, env: &[(&str, &str)]) -> Proc {
    Proc::spawn_program(
        name,
        &python().unwrap(),
        &[
            py_script("xds_echo.py").display().to_string(),
            "client".into(),
            "--target".into(),
            format!("xds:///ledger.shop.svc.cluster.local:{}", s.port),
            "--secure".into(),
        ],
        env,
        &s.dir,
    )
    .unwrap()
}

fn wait_calls(client: &Proc, n: usize, extra: &dyn Fn() -> String) {
    wait_for(
        Duration::from_secs(30),
        "mTLS calls to west's ledger",
        || {
            let r = results(client);
            Ok(
                (r.len() >= n && r.iter().rev().take(n).all(|l| l == "ok ledger-west"))
                    .then_some(()),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", results(client).last(), extra()));
}

#[test]
fn a_pod_joins_with_its_token_and_a_proxyless_client_calls_another_cluster() {
    let s = setup(&[]);
    let (api, dir, east) = (&s.api, s.dir.clone(), &s.east);
    // The pod's sidecar: token in, files out.
    let pod = dir.join("pod");
    let tok = token(api, &dir, "client", "shop", "client");
    let mut sidecar = Proc::spawn(
        "workload-agent",
        &workload_args("agent", east, "client", "client-0", &tok, &pod),
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
    let client = grpc_client(
        &s,
        "client",
        &[("GRPC_XDS_BOOTSTRAP", b.as_str()), GRPC_SPIFFE_ENV],
    );
    wait_calls(&client, 10, &|| {
        format!(
            "{}\n{}",
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

    // Refusals, each named, each quick (nothing to wait for).
    let refused = |sa: &str, token: &Path, out: &str| -> String {
        let args = workload_args("init", east, sa, "client-0", token, &dir.join(out));
        let (code, _, err) = meshfed(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_ne!(code, 0, "{err}");
        err
    };
    // A token of another service account cannot speak for client-0 ...
    let other = token(api, &dir, "other", "shop", "other");
    let err = refused("other", &other, "other");
    assert!(
        err.contains("pod shop/client-0 runs as service account client"),
        "{err}"
    );
    // ... a token for one account cannot obtain another's certificate ...
    let err = refused("client", &other, "other2");
    assert!(err.contains("may obtain only"), "{err}");
    // ... and without a token or a certificate there is nothing to ask with.
    let err = refused("client", &dir.join("missing.token"), "empty");
    assert!(err.contains("missing.token"), "{err}");
    sidecar.term().unwrap();
}

/// The env of an injected container as the kubelet would give it, for pod `pod`: downward API
/// fields resolved; the volume paths and the agent Service's name mapped to this host (the
/// kubelet's mounts and the cluster DNS do that in a cluster).
fn container_env(
    c: &serde_json::Value,
    pod: &str,
    agent: &str,
    paths: &[(&str, &Path)],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod.to_string(),
            Some("metadata.namespace") => "shop".into(),
            Some("status.podIP") => "127.0.0.1".into(),
            Some("spec.serviceAccountName") => "client".into(),
            Some(other) => panic!("unexpected field {other}"),
            None => e["value"].as_str().unwrap().to_string(),
        };
        let mut value = value.replace("meshfed-agent.meshfed-system.svc:15012", agent);
        for (from, to) in paths {
            value = value.replace(from, &to.display().to_string());
        }
        out.push((name, value));
    }
    out
}

#[test]
fn a_deployment_joins_by_one_label_through_the_injection_webhook() {
    let hook = format!("127.0.0.1:{}", free_port());
    let s = setup(&[
        "--injection-webhook",
        &hook,
        "--injection-image",
        "registry.example/meshfed:test",
    ]);
    let (api, dir, east) = (&s.api, s.dir.clone(), &s.east);
    // The operator's MutatingWebhookConfiguration, as deploy/kubernetes/agent applies it: no
    // caBundle; the agent sets it to the cluster's roots.
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/agent/injector.yaml"),
    )
    .unwrap();
    let hook_cfg: serde_json::Value = serde_saphyr_json(&manifest);
    api.apply(hook_cfg).unwrap();
    let roots = std::fs::read_to_string(east.dir.join("ca/root-cert.pem")).unwrap();
    let ca_bundle = wait_for(Duration::from_secs(20), "the webhook's caBundle", || {
        let v = api
            .get("MutatingWebhookConfiguration", "", "meshfed-injector")
            .unwrap();
        let hooks = v["webhooks"].as_array().unwrap().clone();
        let bundles: Vec<String> = hooks
            .iter()
            .filter_map(|w| w["clientConfig"]["caBundle"].as_str().map(str::to_string))
            .collect();
        Ok((bundles.len() == hooks.len()).then_some(bundles))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            east.agent.as_ref().map(|a| a.log()).unwrap_or_default()
        )
    });
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for b in &ca_bundle {
        assert_eq!(String::from_utf8(b64.decode(b).unwrap()).unwrap(), roots);
    }
    let ca_file = dir.join("ca-bundle.pem");
    std::fs::write(&ca_file, &roots).unwrap();

    // The API server's call: HTTPS to the Service's name, verified with the caBundle (curl).
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../federator/kube/tests/fixtures/admission-pod-create.json");
    let hook_port = hook.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &format!("meshfed-agent.meshfed-system.svc:{hook_port}:127.0.0.1"),
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", fixture.display()))
        .arg(format!(
            "https://meshfed-agent.meshfed-system.svc:{hook_port}/inject"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(review["response"]["allowed"], true, "{review}");
    assert_eq!(
        review["response"]["uid"],
        "0d2c7b8e-9a41-4f5e-a6a4-2f1f8f3f6b11"
    );
    let patch: json_patch::Patch = serde_json::from_slice(
        &b64.decode(review["response"]["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let request: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();

    // The API server stores the pod; the scheduler puts it on node-c.
    let name = "client-7d9c6b5f4-x2x9q";
    pod["metadata"]["name"] = json!(name);
    pod["spec"]["nodeName"] = json!("node-c");
    pod["status"] = json!({"podIP": "127.0.0.1"});
    api.apply(pod.clone()).unwrap();

    // The kubelet: the projected token, the init container, then the sidecar and the app.
    let volume = dir.join("injected-pod");
    let tokens = dir.join("injected-tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let tok = token(api, &dir, "injected", "shop", "client");
    std::fs::copy(&tok, tokens.join("meshfed-token")).unwrap();
    let paths = [
        ("/var/run/meshfed", volume.as_path()),
        ("/var/run/secrets/tokens", tokens.as_path()),
    ];
    let relay = format!("127.0.0.1:{}", free_port());
    let run_env = |c: &serde_json::Value| {
        let mut env = container_env(c, name, &east.xds_mtls, &paths);
        // Every pod has its own loopback; here they share one.
        env.push(("MESHFED_XDS_LISTEN".into(), relay.clone()));
        env
    };
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "meshfed-init");
    assert_eq!(init["image"], "registry.example/meshfed:test");
    let args: Vec<String> = serde_json::from_value(init["args"].clone()).unwrap();
    let o = Command::new(meshfed_bin().unwrap())
        .args(&args)
        .envs(run_env(init))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let said = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        said.contains("spiffe://east.mesh/ns/shop/sa/client until")
            && said.contains("locality us-east1/us-east1-c"),
        "{said}"
    );
    let containers = pod["spec"]["containers"].as_array().unwrap();
    let side = containers
        .iter()
        .find(|c| c["name"] == "meshfed-agent")
        .unwrap();
    let side_args: Vec<String> = serde_json::from_value(side["args"].clone()).unwrap();
    let env = run_env(side);
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut sidecar = Proc::spawn_program(
        "injected-sidecar",
        &meshfed_bin().unwrap(),
        &side_args,
        &env_ref,
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the injected sidecar", || {
        assert!(!sidecar.exited(), "{}", sidecar.log());
        Ok(sidecar.log().contains("xDS relay on").then_some(()))
    })
    .unwrap();
    let app = containers.iter().find(|c| c["name"] == "client").unwrap();
    let app_env = container_env(app, name, &east.xds_mtls, &paths);
    let app_ref: Vec<(&str, &str)> = app_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(
        app_ref.contains(&("GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE", "true")),
        "{app_ref:?}"
    );
    let client = grpc_client(&s, "injected-client", &app_ref);
    wait_calls(&client, 10, &|| sidecar.log());
    let ps = meshfed_ok(&["proxy-status", "--admin", &east.admin]).unwrap();
    assert!(
        ps.contains(&format!("sidecar~127.0.0.1~{name}.shop")),
        "{ps}"
    );
    println!("an injected pod of a Deployment called west over mTLS with only what meshfed wrote");
    sidecar.term().unwrap();
}

/// A YAML manifest (one document) as JSON.
fn serde_saphyr_json(yaml: &str) -> serde_json::Value {
    serde_saphyr::from_str(yaml).unwrap()
}

/// Outside Kubernetes, a workload's first certificate is bought with a one-time token made
/// beside the agent's state (`meshfed workload token`); the token works once.
#[test]
fn a_workload_outside_kubernetes_joins_with_a_one_time_token() {
    let f = Federation::start("5s").unwrap();
    let dir = f.root.path().to_path_buf();
    let east = f
        .add_cluster("east", "net1", "us-east1/us-east1-b", "services: []\n")
        .unwrap();
    let tok = dir.join("order.token");
    let said = meshfed_ok(&[
        "workload",
        "token",
        "--state-dir",
        east.dir.to_str().unwrap(),
        "--namespace",
        "shop",
        "--service-account",
        "order",
        "--ttl",
        "5m",
        "--out",
        tok.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        said.contains("for spiffe://east.mesh/ns/shop/sa/order"),
        "{said}"
    );
    let init = |out: &str, token: &Path| {
        let args = workload_args("init", &east, "order", "", token, &dir.join(out));
        meshfed(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
    };
    let (code, out, err) = init("first", &tok);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("spiffe://east.mesh/ns/shop/sa/order until")
            && out.contains("locality us-east1/us-east1-b"),
        "{out}"
    );
    let svid = serial(&dir.join("first/cert-chain.pem"));
    assert!(
        svid.contains("URI:spiffe://east.mesh/ns/shop/sa/order"),
        "{svid}"
    );
    // Spent: the same token buys nothing more.
    let (code, _, err) = init("second", &tok);
    assert_ne!(code, 0);
    assert!(err.contains("workload token was already used"), "{err}");
    // A Kubernetes-style token means nothing to an agent that does not read Kubernetes.
    let sa_token = dir.join("sa.token");
    std::fs::write(&sa_token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln").unwrap();
    let (code, _, err) = init("third", &sa_token);
    assert_ne!(code, 0);
    assert!(err.contains("this agent does not read Kubernetes"), "{err}");
    let refused = metric(
        &east.admin,
        "meshfed_ca_requests_total{result=\"unauthenticated\"}",
    )
    .unwrap();
    assert_eq!(refused, Some(2.0));
}
