//! `meshfed agent --istio` as a real process against the Kubernetes API-server double (no
//! istiod or kube-apiserver runs here; the double checks every Istio object meshfed writes
//! against Istio's schema, `meshfed_kube::istio_schema`): east runs Istio and imports west's
//! `ledger` (another network, another trust domain). The import appears as a ServiceEntry and
//! WorkloadEntries at west's gateway with west's network; west's roots appear in the mesh
//! config ConfigMap meshfed owns and follow a rotation; a user's ServiceEntry for a host wins
//! and is reported; a policy becomes a DestinationRule with its subsets; the exporter's
//! removal deletes what meshfed wrote, and nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chaos::apiserver::ApiServer;
use chaos::*;
use serde_json::{json, Value};

const LEDGER: &str = "services:
  - namespace: shop
    name: ledger
    export: true
    ports: [{name: grpc, port: 9090, appProtocol: grpc}]
    endpoints:
      - {address: 10.8.0.1, locality: us-west1/us-west1-a, labels: {app: ledger, version: v1}, serviceAccount: ledger}
      - {address: 10.8.0.2, locality: us-west1/us-west1-a, labels: {app: ledger, version: v1}, serviceAccount: ledger}
      - {address: 10.8.0.3, locality: us-west1/us-west1-b, labels: {app: ledger, version: v2}, serviceAccount: ledger}
";

fn ours(api: &ApiServer, kind: &str) -> Vec<Value> {
    api.list(kind)
        .into_iter()
        .filter(|o| o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshfed")
        .collect()
}

/// Cluster east, reading the API double at `kubeconfig`, with `--istio` and `extra` flags.
fn istio_east(f: &Federation, kubeconfig: &std::path::Path, extra: &[&str]) -> Cluster {
    let mut args = vec![
        "--source",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--istio",
    ];
    args.extend_from_slice(extra);
    f.add_cluster_with(
        "east",
        "net-e",
        "us-east1/us-east1-b",
        "services: []\n",
        None,
        &[],
        &args,
    )
    .unwrap()
}

fn mesh_config(api: &ApiServer) -> Option<Value> {
    let cm = api.get("ConfigMap", "istio-system", "meshfed-mesh")?;
    serde_saphyr::from_str(cm["data"]["mesh"].as_str()?).ok()
}

#[test]
fn imports_reach_istiod_as_istio_objects_and_peer_roots() {
    let f = Federation::start("5s").unwrap();
    let west = f
        .add_cluster("west", "net-w", "us-west1/us-west1-a", LEDGER)
        .unwrap();
    let api = ApiServer::start().unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    // A user's ServiceEntry for an unrelated host, and the `istio` ConfigMap: never touched.
    let user_se = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "payments-api", "namespace": "shop"},
        "spec": {"hosts": ["api.payments.example"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                 "ports": [{"number": 443, "name": "https", "protocol": "TLS"}]}});
    api.apply(user_se.clone()).unwrap();
    // A service made of Istio objects (a VM's WorkloadEntry behind a ServiceEntry), exported.
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {"hosts": ["legacy.shop.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                 "workloadSelector": {"labels": {"app": "legacy"}}}}))
        .unwrap();
    api.apply(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "legacy-vm", "namespace": "shop"},
        "spec": {"address": "10.6.0.1", "labels": {"app": "legacy"}, "serviceAccount": "legacy"}}),
    )
    .unwrap();
    api.apply(
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "legacy", "namespace": "shop"}}),
    )
    .unwrap();
    let istio_cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "trustDomain: east.mesh\n"}});
    api.apply(istio_cm.clone()).unwrap();
    let east = istio_east(&f, &kubeconfig, &[]);

    // The ServiceEntry: both names (no Service called ledger here), west's identity, the VIP.
    let se = wait_for(
        Duration::from_secs(30),
        "east's ServiceEntry for ledger",
        || Ok(api.get("ServiceEntry", "shop", "meshfed-ledger")),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", east.status().unwrap_or_default()));
    let spec = &se["spec"];
    assert_eq!(
        spec["hosts"],
        json!([
            "ledger.shop.svc.cluster.local",
            "ledger.shop.svc.clusterset.local"
        ]),
        "{se}"
    );
    assert_eq!(spec["location"], "MESH_INTERNAL");
    assert_eq!(spec["resolution"], "STATIC");
    assert_eq!(
        spec["ports"],
        json!([{"name": "grpc", "number": 9090, "protocol": "GRPC"}])
    );
    assert_eq!(
        spec["subjectAltNames"],
        json!(["spiffe://west.mesh/ns/shop/sa/ledger"])
    );
    assert!(
        spec["addresses"][0]
            .as_str()
            .is_some_and(|a| a.starts_with("240.240.")),
        "{se}"
    );
    // WorkloadEntries at west's gateway (the harness advertises one on a loopback port),
    // west's network, by group.
    let entries = wait_for(Duration::from_secs(60), "two WorkloadEntries", || {
        let e = ours(&api, "WorkloadEntry");
        Ok((e.len() == 2).then_some(e))
    })
    .unwrap_or_else(|e| {
        let log = |n: &str| {
            std::fs::read_to_string(f.root.path().join(format!("{n}.log"))).unwrap_or_default()
        };
        panic!(
            "{e}: {:?}; east: {}\nEAST LOG:\n{}\nFEDERATOR LOG:\n{}",
            ours(&api, "WorkloadEntry"),
            east.status().unwrap_or_default(),
            log("agent-east"),
            log("federator"),
        )
    });
    let mut seen = Vec::new();
    for we in &entries {
        let s = &we["spec"];
        assert_eq!(s["address"], "127.0.0.1", "{we}");
        let port = s["ports"]["grpc"].as_u64().unwrap();
        assert!(port > 0 && port != 9090, "the gateway's port: {we}");
        assert_eq!(s["network"], "net-w");
        assert_eq!(s["labels"]["security.istio.io/tlsMode"], "istio");
        assert_eq!(s["labels"]["meshfed.io/imported-service"], "ledger");
        assert_eq!(we["metadata"]["labels"]["meshfed.io/imported-from"], "west");
        seen.push((
            s["locality"].as_str().unwrap().to_string(),
            s["labels"]["version"].as_str().unwrap().to_string(),
            s["weight"].as_u64().unwrap(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("us-west1/us-west1-a".into(), "v1".into(), 2),
            ("us-west1/us-west1-b".into(), "v2".into(), 1)
        ]
    );
    // The entries meshfed wrote for an import are not east's own workloads; the service made
    // of the user's ServiceEntry and WorkloadEntry is, and west imports it.
    wait_for(
        Duration::from_secs(30),
        "west imports east's legacy",
        || Ok((west.status()?["endpoints"]["shop/legacy"]["east"] == 1).then_some(())),
    )
    .unwrap();
    let s = east.status().unwrap();
    assert_eq!(s["exports"], 1, "{s}");
    assert_eq!(s["endpoints"]["shop/ledger"]["east"], Value::Null, "{s}");

    // West's roots, for istiod (meshfed's own ConfigMap; the user's `istio` is untouched).
    let mesh = wait_for(Duration::from_secs(20), "the mesh config", || {
        Ok(mesh_config(&api))
    })
    .unwrap();
    assert_eq!(mesh["trustDomainAliases"], json!(["west.mesh"]), "{mesh}");
    let certs = mesh["caCertificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "{mesh}");
    assert_eq!(certs[0]["trustDomains"], json!(["west.mesh"]));
    let pem = certs[0]["pem"].as_str().unwrap().to_string();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);
    let verified = openssl_verify_against(&pem, &west);
    assert!(
        verified,
        "west's root in the mesh config verifies west's own certificate"
    );
    assert_eq!(
        api.get("ConfigMap", "istio-system", "istio").unwrap()["data"],
        istio_cm["data"]
    );
    let s = east.status().unwrap();
    assert_eq!(s["istio"]["service_entries"], 1, "{s}");
    assert_eq!(
        s["istio"]["mesh_config_trust_domains"],
        json!(["west.mesh"])
    );

    // West rotates its root: the mesh config carries both roots of west.
    let out = rotate_cluster_ca(&west.dir, "1s").unwrap();
    assert!(out.contains("holds 2 roots"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "both of west's roots for istiod",
        || {
            Ok(mesh_config(&api).filter(|m| {
                m["caCertificates"][0]["pem"]
                    .as_str()
                    .is_some_and(|p| p.matches("BEGIN CERTIFICATE").count() == 2)
            }))
        },
    )
    .unwrap();

    // A user's ServiceEntry for the clusterset name wins: meshfed leaves it out and says so.
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "my-ledger", "namespace": "shop"},
        "spec": {"hosts": ["ledger.shop.svc.clusterset.local"], "location": "MESH_INTERNAL",
                 "resolution": "STATIC", "ports": [{"number": 9090, "name": "grpc", "protocol": "GRPC"}],
                 "endpoints": [{"address": "10.9.9.9"}]}}))
        .unwrap();
    wait_for(Duration::from_secs(20), "the user's host left out", || {
        Ok(api
            .get("ServiceEntry", "shop", "meshfed-ledger")
            .filter(|se| se["spec"]["hosts"] == json!(["ledger.shop.svc.cluster.local"])))
    })
    .unwrap();
    let s = east.status().unwrap();
    let findings = s["istio"]["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["kind"] == "shadowed"
            && f["host"] == "ledger.shop.svc.clusterset.local"
            && f["message"].as_str().unwrap().contains("shop/my-ledger")),
        "{s}"
    );
    // meshfed analyze reports it.
    let (code, out, _) = meshfed(&["analyze", "--agent", &east.admin]).unwrap();
    assert!(
        out.contains("MF401") && out.contains("shop/my-ledger"),
        "{code} {out}"
    );

    // A policy for ledger becomes a DestinationRule with its subsets, for both names.
    std::fs::write(
        east.policy_dir.join("ledger.yaml"),
        "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: ledger, namespace: shop}\nspec:\n  host: ledger.shop.svc.cluster.local\n  failover: [{from: us-east1, to: us-west1}]\n  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}\n  subsets:\n    - {name: v2, labels: {version: v2}}\n",
    )
    .unwrap();
    let dr = wait_for(Duration::from_secs(20), "meshfed's DestinationRule", || {
        Ok(api.get("DestinationRule", "shop", "meshfed-ledger"))
    })
    .unwrap();
    assert_eq!(dr["spec"]["host"], "ledger.shop.svc.cluster.local");
    assert_eq!(
        dr["spec"]["subsets"],
        json!([{"name": "v2", "labels": {"version": "v2"}}])
    );
    assert_eq!(
        dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["failover"],
        json!([{"from": "us-east1", "to": "us-west1"}])
    );
    assert_eq!(
        dr["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"],
        3
    );

    // West stops exporting ledger: everything meshfed wrote for it goes; the users' stay.
    west.write_registry("services: []\n").unwrap();
    wait_for(
        Duration::from_secs(30),
        "meshfed's Istio objects deleted",
        || {
            Ok((ours(&api, "ServiceEntry").is_empty()
                && ours(&api, "WorkloadEntry").is_empty()
                && ours(&api, "DestinationRule").is_empty())
            .then_some(()))
        },
    )
    .unwrap();
    assert_eq!(
        api.get("ServiceEntry", "shop", "payments-api").unwrap()["spec"],
        user_se["spec"]
    );
    assert!(api.get("ServiceEntry", "shop", "my-ledger").is_some());
}

/// Whether openssl verifies west's CA signing certificate (`ca-cert.pem` in its state
/// directory) against `pem`.
fn openssl_verify_against(pem: &str, west: &Cluster) -> bool {
    fn find(dir: &std::path::Path) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == "ca-cert.pem") {
                return Some(p);
            }
        }
        None
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let leaf = find(&west.dir).expect("west's ca-cert.pem");
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(&leaf)
        .output()
        .unwrap();
    out.status.success()
}

/// A ConfigMap of the mesh config's name that meshfed did not write is never changed: the agent
/// says so in its status (and keeps writing the imports' objects).
#[test]
fn a_mesh_config_map_meshfed_did_not_write_is_left_alone_and_reported() {
    let f = Federation::start("5s").unwrap();
    let _west = f
        .add_cluster("west", "net-w", "us-west1/us-west1-a", LEDGER)
        .unwrap();
    let api = ApiServer::start().unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shared-mesh", "namespace": "istio-system"},
        "data": {"mesh": "accessLogFile: /dev/stdout\n"}});
    api.apply(theirs.clone()).unwrap();
    let east = istio_east(
        &f,
        &kubeconfig,
        &["--istio-mesh-config", "istio-system/shared-mesh"],
    );
    let s = wait_for(
        Duration::from_secs(30),
        "the refusal in east's status",
        || {
            let s = east.status()?;
            Ok(s["kubernetes_write_error"]
                .as_str()
                .is_some_and(|e| {
                    e.contains("istio-system/shared-mesh") && e.contains("not written by meshfed")
                })
                .then_some(s))
        },
    )
    .unwrap();
    // The imports' objects are still written (before the mesh config, in every pass).
    wait_for(Duration::from_secs(30), "the ServiceEntry", || {
        Ok(api.get("ServiceEntry", "shop", "meshfed-ledger"))
    })
    .unwrap_or_else(|e| panic!("{e}: {s}"));
    assert_eq!(
        api.get("ConfigMap", "istio-system", "shared-mesh").unwrap()["data"],
        theirs["data"]
    );
    assert!(
        api.get("ConfigMap", "istio-system", "shared-mesh").unwrap()["metadata"]["labels"]
            .is_null()
    );
}

/// Two writers of WorkloadEntries (the imports' and the VMs') never delete each other's: each
/// lists and deletes only what its selector selects. (Before they had their own selectors, the
/// VM writer's first pass could delete the entries of imports written a moment before.)
#[test]
fn the_import_and_vm_entry_writers_leave_each_others_entries_alone() {
    let api = ApiServer::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(&d.path().join("kubeconfig")).unwrap();
    let we = |name: &str, labels: Value| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"address": "10.1.2.3", "serviceAccount": "sa"}})
    };
    api.apply(we(
        "meshfed-ledger-west-1",
        json!({"app.kubernetes.io/managed-by": "meshfed", "meshfed.io/imported-service": "ledger",
               "meshfed.io/imported-from": "west"}),
    ))
    .unwrap();
    api.apply(we(
        "vm-1",
        json!({"app.kubernetes.io/managed-by": "meshfed"}),
    ))
    .unwrap();
    api.apply(we("users", json!({}))).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = meshfed_kube::source::client(Some(&kubeconfig))
            .await
            .unwrap();
        // The VM writer wants no entry: it deletes its own (vm-1) only.
        let mut vms =
            meshfed_kube::sink::EntryWriter::with_selector(meshfed_kube::sink::VM_ENTRIES_SELECTOR);
        let done = vms.sync(&client, &Default::default()).await.unwrap();
        assert_eq!(done.deleted, 1);
        assert!(api.get("WorkloadEntry", "shop", "vm-1").is_none());
        assert!(api
            .get("WorkloadEntry", "shop", "meshfed-ledger-west-1")
            .is_some());
        // The imports' writer wants none either: it deletes the import's entry only.
        let mut imports: meshfed_kube::sink::ManagedWriter<meshfed_kube::types::WorkloadEntry> =
            meshfed_kube::sink::ManagedWriter::with_selector(meshfed_kube::istio::IMPORTS_SELECTOR);
        let done = imports.sync(&client, &Default::default()).await.unwrap();
        assert_eq!(done.deleted, 1);
    });
    assert!(api
        .get("WorkloadEntry", "shop", "meshfed-ledger-west-1")
        .is_none());
    assert!(api.get("WorkloadEntry", "shop", "users").is_some());
}
