//! `meshfed agent --source kubernetes` as a real process against the API-server double (no
//! kube-apiserver runs here; `chaos/src/apiserver.rs`): east's services come from Services,
//! EndpointSlices, Nodes, Pods and MCS ServiceExports; west, on the file registry, imports
//! what east exports. Endpoint changes flow through, a deleted ServiceExport withdraws the
//! export, a compaction (`410 Gone`) makes east relist without dropping what it serves, an
//! unreachable API server leaves the last state in service (and `meshfed status` says since
//! when), and an object meshfed cannot use is reported by namespace/name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chaos::apiserver::ApiServer;
use chaos::*;
use serde_json::{json, Value};

fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "payment", "namespace": "shop", "labels": {"app": "payment"}},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                 "selector": {"app": "payment"}}})
}

fn slice(ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b",
                   "targetRef": {"kind": "Pod", "name": format!("payment-{i}"), "namespace": "shop"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "payment-x1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "payment"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

fn export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": "shop"}})
}

/// West's view of east's payment: how many endpoints it imported.
fn west_endpoints(west: &Cluster) -> anyhow::Result<u64> {
    Ok(west.status()?["endpoints"]["shop/payment"]["east"]
        .as_u64()
        .unwrap_or(0))
}

#[test]
fn services_and_exports_come_from_the_kubernetes_api() {
    let api = ApiServer::start().unwrap();
    let f = Federation::start("5s").unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b",
        "labels": {"topology.kubernetes.io/region": "us-east1", "topology.kubernetes.io/zone": "us-east1-b"}}}))
        .unwrap();
    for i in 0..3 {
        api.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("payment-{i}"), "namespace": "shop", "labels": {"app": "payment"}},
            "spec": {"serviceAccountName": "payment", "containers": [{"name": "app", "image": "payment"}]}}))
            .unwrap();
    }
    api.apply(service()).unwrap();
    api.apply(slice(&["10.1.0.5"])).unwrap();
    api.apply(export("payment")).unwrap();
    let east = f
        .add_kube_cluster(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            "services: []\n",
            &kubeconfig,
        )
        .unwrap();
    // west runs on Kubernetes too (its own API server): it writes what it imports as MCS
    // ServiceImports, and never touches one a user made.
    let west_api = ApiServer::start().unwrap();
    let west_kubeconfig = west_api
        .kubeconfig(&f.root.path().join("west-kubeconfig"))
        .unwrap();
    west_api
        .apply(
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": "user-made", "namespace": "shop"},
            "spec": {"type": "ClusterSetIP", "ports": [{"port": 80, "protocol": "TCP"}]}}),
        )
        .unwrap();
    let west = f
        .add_kube_cluster(
            "west",
            "net-w",
            "us-west1/us-west1-a",
            "services: []\n",
            &west_kubeconfig,
        )
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "west imports east's payment",
        || Ok((west_endpoints(&west)? == 1).then_some(())),
    )
    .unwrap();
    let si = wait_for(
        Duration::from_secs(20),
        "west's ServiceImport shop/payment",
        || {
            Ok(west_api
                .get("ServiceImport", "shop", "payment")
                .filter(|v| v["status"]["clusters"] == json!([{"cluster": "east"}])))
        },
    )
    .unwrap();
    assert_eq!(si["spec"]["type"], "ClusterSetIP", "{si}");
    assert_eq!(
        si["spec"]["ports"],
        json!([{"name": "http", "port": 80, "protocol": "TCP"}]),
        "{si}"
    );
    // The VIPs west's mesh DNS answers for payment (IPv4 from --vip-range, and IPv6).
    assert!(
        si["spec"]["ips"][0]
            .as_str()
            .is_some_and(|ip| ip.starts_with("240.240.0.")),
        "{si}"
    );
    assert_eq!(
        si["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshfed"
    );
    // And its EndpointSlice: east is on another network, so its gateway, every port mapped
    // to the gateway's port (split horizon).
    let gw = east.status().unwrap()["federators"].clone();
    let west_slice = wait_for(
        Duration::from_secs(20),
        "west's EndpointSlice payment-east",
        || Ok(west_api.get("EndpointSlice", "shop", "payment-east")),
    )
    .unwrap();
    assert_eq!(
        west_slice["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
        "payment"
    );
    assert_eq!(
        west_slice["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "east"
    );
    assert_eq!(west_slice["addressType"], "IPv4", "{west_slice} {gw}");
    assert_eq!(
        west_slice["endpoints"][0]["addresses"][0], "127.0.0.1",
        "{west_slice}"
    );
    assert_ne!(
        west_slice["ports"][0]["port"], 80,
        "the gateway's port, not the service's: {west_slice}"
    );
    let s = east.status().unwrap();
    for kind in ["Service", "EndpointSlice", "Node", "Pod", "ServiceExport"] {
        assert_eq!(s["kubernetes_watches"][kind]["synced"], true, "{kind}: {s}");
    }

    // An endpoint is added: it reaches west.
    api.apply(slice(&["10.1.0.5", "10.1.0.6"])).unwrap();
    wait_for(Duration::from_secs(20), "two endpoints at west", || {
        Ok((west_endpoints(&west)? == 2).then_some(()))
    })
    .unwrap();

    // The ServiceExport goes: the export is withdrawn; the Service stays east's own.
    api.delete("ServiceExport", "shop", "payment").unwrap();
    wait_for(
        Duration::from_secs(20),
        "the export withdrawn at west",
        || Ok((west.status()?["imports"]["east"].as_u64().unwrap_or(0) == 0).then_some(())),
    )
    .unwrap();
    assert_eq!(
        east.status().unwrap()["endpoints"]["shop/payment"]["east"],
        2
    );
    wait_for(Duration::from_secs(20), "west's ServiceImport gone", || {
        Ok((west_api.get("ServiceImport", "shop", "payment").is_none()
            && west_api
                .get("EndpointSlice", "shop", "payment-east")
                .is_none())
        .then_some(()))
    })
    .unwrap();
    assert!(
        west_api.get("ServiceImport", "shop", "user-made").is_some(),
        "a ServiceImport meshfed did not write is never deleted"
    );
    api.apply(export("payment")).unwrap();
    wait_for(Duration::from_secs(20), "exported again", || {
        Ok((west_endpoints(&west)? == 2
            && west_api.get("ServiceImport", "shop", "payment").is_some())
        .then_some(()))
    })
    .unwrap();

    // A compaction: east's watches get 410 Gone and list again; what changed meanwhile
    // arrives, and nothing was withdrawn in between.
    let lists = api.requests("LIST /api/v1/services");
    api.apply(slice(&["10.1.0.5", "10.1.0.6", "10.1.0.7"]))
        .unwrap();
    api.compact();
    api.apply(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c",
        "labels": {"topology.kubernetes.io/region": "us-east1"}}}),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "three endpoints at west, the Service watch listed again after 410 Gone",
        || {
            Ok(
                (west_endpoints(&west)? == 3 && api.requests("LIST /api/v1/services") > lists)
                    .then_some(()),
            )
        },
    )
    .unwrap();

    // An object meshfed cannot use is named in east's status; the rest goes on.
    api.apply(export("ghost")).unwrap();
    wait_for(Duration::from_secs(20), "the ghost export reported", || {
        let s = east.status()?;
        Ok(s["kubernetes_problems"]
            .as_array()
            .is_some_and(|p| {
                p.iter().any(|x| {
                    x.as_str() == Some("ServiceExport shop/ghost: no Service shop/ghost to export")
                })
            })
            .then_some(()))
    })
    .unwrap();
    let (_, out, _) = meshfed(&["status", "--admin", &east.admin]).unwrap();
    assert!(out.contains("ServiceExport shop/ghost"), "{out}");
    // ... and as a Warning Event on that ServiceExport.
    let ev = wait_for(
        Duration::from_secs(20),
        "an Event on the ghost export",
        || {
            Ok(api.list("Event").into_iter().find(|e| {
                e["regarding"]["kind"] == "ServiceExport" && e["regarding"]["name"] == "ghost"
            }))
        },
    )
    .unwrap();
    assert_eq!(ev["type"], "Warning", "{ev}");
    assert_eq!(ev["reason"], "Refused", "{ev}");
    assert_eq!(ev["reportingController"], "meshfed-agent", "{ev}");
    assert!(
        ev["note"]
            .as_str()
            .is_some_and(|n| n.contains("no Service shop/ghost")),
        "{ev}"
    );

    // MCS conditions on the ServiceExports (status subresource).
    let conds = |api: &ApiServer, name: &str| -> Vec<(String, String, String)> {
        api.get("ServiceExport", "shop", name)
            .and_then(|v| v["status"]["conditions"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap_or_default().to_string(),
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let row = |t: &str, s: &str, r: &str| (t.to_string(), s.to_string(), r.to_string());
    wait_for(
        Duration::from_secs(20),
        "east's ServiceExport conditions",
        || {
            Ok((conds(&api, "payment")
                == [
                    row("Valid", "True", "Valid"),
                    row("Conflict", "False", "NoConflicts"),
                    row("Ready", "True", "Exported"),
                ]
                && conds(&api, "ghost")
                    == [
                        row("Valid", "False", "NoService"),
                        row("Conflict", "False", "NoConflicts"),
                        row("Ready", "False", "NoService"),
                    ])
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?} {:?}",
            conds(&api, "payment"),
            conds(&api, "ghost")
        )
    });
    // west exports its own payment with port 80 over UDP: the federator finds it at odds with
    // east's older export, and west's ServiceExport says so.
    west_api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "UDP"}]}}))
        .unwrap();
    west_api.apply(export("payment")).unwrap();
    wait_for(
        Duration::from_secs(20),
        "west's ServiceExport in conflict",
        || {
            Ok(conds(&west_api, "payment")
                .iter()
                .any(|c| *c == row("Conflict", "True", "PortConflict"))
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", conds(&west_api, "payment")));
    west_api.delete("ServiceExport", "shop", "payment").unwrap();
    west_api.delete("Service", "shop", "payment").unwrap();

    // Failover policies as objects: a FailoverPolicy applies; a bad one, and an opted-in
    // DestinationRule for a host that already has a policy, are refused by name (status and an
    // Event); a DestinationRule without the opt-in label is not read at all.
    api.apply(
        json!({"apiVersion": "meshfed.io/v1alpha1", "kind": "FailoverPolicy",
        "metadata": {"name": "payment", "namespace": "shop"},
        "spec": {"host": "payment.shop.svc.cluster.local",
                 "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s"}}}),
    )
    .unwrap();
    api.apply(
        json!({"apiVersion": "meshfed.io/v1alpha1", "kind": "FailoverPolicy",
        "metadata": {"name": "ledger", "namespace": "shop"},
        "spec": {"host": "ledger.shop.svc.cluster.local", "bogus": 1}}),
    )
    .unwrap();
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "payment-dr", "namespace": "shop", "labels": {"meshfed.io/failover": "true"}},
        "spec": {"host": "payment.shop.svc.cluster.local"}}))
        .unwrap();
    api.apply(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "istio-only", "namespace": "shop"},
        "spec": {"host": "other.shop.svc.cluster.local", "whatever": {}}}),
    )
    .unwrap();
    // Routes: an opted-in VirtualService applies, a bad one is refused by name, one without
    // the label is not read.
    let vs = |name: &str, labelled: bool, http: Value| {
        let labels = if labelled {
            json!({"meshfed.io/routes": "true"})
        } else {
            json!({})
        };
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"hosts": ["payment"], "http": http}})
    };
    api.apply(vs(
        "payment-routes",
        true,
        json!([{"match": [{"headers": {"x-version": {"exact": "v2"}}}],
                "route": [{"destination": {"host": "payment", "subset": "v2"}}]},
               {"route": [{"destination": {"host": "payment"}}]}]),
    ))
    .unwrap();
    api.apply(vs(
        "payment-mirror",
        true,
        json!([{"route": [{"destination": {"host": "payment"}}], "mirror": {"host": "x"}}]),
    ))
    .unwrap();
    api.apply(vs(
        "istio-routes",
        false,
        json!([{"route": [{"destination": {"host": "payment"}}], "fault": {}}]),
    ))
    .unwrap();
    let s = wait_for(Duration::from_secs(20), "policies from the Kubernetes API", || {
        let s = east.status()?;
        let problems = s["kubernetes_problems"].to_string();
        Ok((s["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x.as_str() == Some("payment.shop.svc.cluster.local (shop/payment at FailoverPolicy shop/payment)")))
            && s["routes"].as_array().is_some_and(|r| r.iter().any(|x| x.as_str() == Some("payment.shop.svc.cluster.local (shop/payment-routes at VirtualService shop/payment-routes)")))
            && problems.contains("FailoverPolicy shop/ledger:")
            && problems.contains("VirtualService shop/payment-mirror:")
            && problems.contains("spec.http[0].mirror: not applied")
            && problems.contains("DestinationRule shop/payment-dr: spec.host"))
        .then_some(s))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", east.status().unwrap_or_default()));
    assert!(
        s["kubernetes_problems"].to_string().contains("bogus"),
        "{s}"
    );
    assert!(
        !s["kubernetes_problems"].to_string().contains("istio-only")
            && !s["kubernetes_problems"]
                .to_string()
                .contains("istio-routes"),
        "{s}"
    );
    wait_for(
        Duration::from_secs(20),
        "an Event on the bad FailoverPolicy",
        || {
            Ok(api
                .list("Event")
                .into_iter()
                .any(|e| {
                    e["regarding"]["kind"] == "FailoverPolicy" && e["regarding"]["name"] == "ledger"
                })
                .then_some(()))
        },
    )
    .unwrap();

    // The API server goes away: east keeps serving and exporting what it last listed, and
    // says which watches fail since when.
    api.set_down(true);
    wait_for(
        Duration::from_secs(30),
        "east to report failing watches",
        || {
            let s = east.status()?;
            Ok(s["kubernetes_watches"]["Service"]["failing_since"]
                .is_string()
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            east.status()
                .map(|s| s["kubernetes_watches"].clone())
                .unwrap_or_default()
        )
    });
    assert_eq!(west_endpoints(&west).unwrap(), 3);
    assert_eq!(
        east.status().unwrap()["endpoints"]["shop/payment"]["east"],
        3
    );
    api.set_down(false);
    api.apply(slice(&["10.1.0.5"])).unwrap();
    wait_for(
        Duration::from_secs(60),
        "east follows the API again",
        || Ok((west_endpoints(&west)? == 1).then_some(())),
    )
    .unwrap();
}

/// The source in-process against the double: an unreachable API server shows as failing
/// watches (with since when) while the last view stays published; back up, they recover.
#[test]
fn the_source_reports_an_unreachable_api_server_and_keeps_its_view() {
    let api = ApiServer::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(&d.path().join("kubeconfig")).unwrap();
    api.apply(service()).unwrap();
    api.apply(slice(&["10.1.0.5"])).unwrap();
    api.apply(export("payment")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let src = source(&kubeconfig, Default::default()).await;
        let mut view = src.view.clone();
        view.wait_for(|v| v.as_ref().is_some_and(|v| v.exports.len() == 1))
            .await
            .unwrap();
        api.set_down(true);
        let mut health = src.health.clone();
        let h = tokio::time::timeout(
            Duration::from_secs(30),
            health.wait_for(|h| h.values().all(|w| w.failing_since.is_some())),
        )
        .await
        .map(|h| h.unwrap().clone());
        let h = h.unwrap_or_else(|_| panic!("{:?}", src.health.borrow()));
        assert!(h["Service"].error.is_some(), "{h:?}");
        assert_eq!(src.view.borrow().as_ref().unwrap().exports.len(), 1);
        api.set_down(false);
        tokio::time::timeout(
            Duration::from_secs(60),
            health.wait_for(|h| h.values().all(|w| w.error.is_none())),
        )
        .await
        .unwrap_or_else(|_| panic!("{:?}", src.health.borrow()))
        .unwrap();
    });
}

/// After a restart the writer finds the ServiceImports it wrote before by their label and
/// deletes those no longer imported; one a user made is left alone.
#[test]
fn the_import_writer_cleans_up_its_own_after_a_restart_and_nothing_else() {
    let api = ApiServer::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(&d.path().join("kubeconfig")).unwrap();
    let si = |name: &str, ours: bool| {
        let mut v = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"type": "ClusterSetIP", "ports": [{"port": 80, "protocol": "TCP"}]}});
        if ours {
            v["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "meshfed"});
        }
        v
    };
    api.apply(si("stale", true)).unwrap();
    api.apply(si("user-made", false)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let done = rt.block_on(async {
        let client = meshfed_kube::source::client(Some(&kubeconfig))
            .await
            .unwrap();
        let mut w = meshfed_kube::sink::ImportWriter::default();
        w.sync(&client, &Default::default()).await.unwrap()
    });
    assert_eq!(done.deleted, 1);
    assert!(api.get("ServiceImport", "shop", "stale").is_none());
    assert!(api.get("ServiceImport", "shop", "user-made").is_some());
}

/// The real Kubernetes source, in this process, against the double.
async fn source(
    kubeconfig: &std::path::Path,
    scope: meshfed_kube::view::Scope,
) -> meshfed_kube::source::KubeSource {
    let client = meshfed_kube::source::client(Some(kubeconfig))
        .await
        .unwrap();
    let (src, run) =
        meshfed_kube::source::start(client, Default::default(), scope, Duration::from_millis(10));
    tokio::spawn(run);
    src
}

/// `dig +short` against a cluster's mesh DNS.
/// A headless Service (a StatefulSet's: `clusterIP: None`, slices with hostnames) exported by
/// east reaches west, on the same network, as MCS DNS names answered by west's mesh DNS (dig):
/// every endpoint under the service's name, one under `<hostname>.east.<svc>...`; an endpoint
/// that stops being ready leaves both. The export is headless at the federator too.
#[test]
fn a_headless_service_resolves_by_hostname_in_a_cluster_of_its_network() {
    let api = ApiServer::start().unwrap();
    let f = Federation::start("5s").unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    let db_slice = |ready1: bool| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-x1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.20"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.1.0.21"], "hostname": "db-1", "conditions": {"ready": ready1}}]})
    };
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}}))
        .unwrap();
    api.apply(db_slice(true)).unwrap();
    api.apply(export("db")).unwrap();
    let args = [
        "--source",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    let _east = f
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
    let all = wait_for(
        Duration::from_secs(60),
        "west's DNS answers db with east's endpoints",
        || {
            let v = dig(&west, "db.shop.svc.clusterset.local", "A")?;
            Ok((v.len() == 2).then_some(v))
        },
    )
    .unwrap();
    assert_eq!(all, ["10.1.0.20", "10.1.0.21"]);
    assert_eq!(
        dig(&west, "db-1.east.db.shop.svc.clusterset.local", "A").unwrap(),
        ["10.1.0.21"]
    );
    let srv = dig(&west, "_pg._tcp.db.shop.svc.clusterset.local", "SRV").unwrap();
    assert_eq!(
        srv,
        [
            "0 100 5432 db-0.east.db.shop.svc.clusterset.local.",
            "0 100 5432 db-1.east.db.shop.svc.clusterset.local."
        ]
    );
    // db-1 is no longer ready: it leaves the service's answer and its own name.
    api.apply(db_slice(false)).unwrap();
    wait_for(
        Duration::from_secs(60),
        "db-1 leaves west's answers",
        || Ok((dig(&west, "db.shop.svc.clusterset.local", "A")? == ["10.1.0.20"]).then_some(())),
    )
    .unwrap();
    assert!(dig(&west, "db-1.east.db.shop.svc.clusterset.local", "A")
        .unwrap()
        .is_empty());
}

/// `--namespace-selector` with the real source and the double: a namespace that is not
/// selected is not read (its ServiceExport is a problem naming the selector); labelling the
/// namespace (a Namespace watch event) brings its Service in.
#[test]
fn the_namespace_selector_follows_namespace_labels() {
    let api = ApiServer::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(&d.path().join("kubeconfig")).unwrap();
    let ns = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": labels}})
    };
    api.apply(ns(json!({}))).unwrap();
    api.apply(service()).unwrap();
    api.apply(slice(&["10.1.0.5"])).unwrap();
    api.apply(export("payment")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let scope = meshfed_kube::view::Scope {
            selector: Some(meshfed_kube::selector::parse("meshfed.io/federate=true").unwrap()),
            network: "net-a".into(),
        };
        let src = source(&kubeconfig, scope).await;
        let mut view = src.view.clone();
        let wait = Duration::from_secs(30);
        let v = tokio::time::timeout(wait, view.wait_for(|v| v.is_some()))
            .await
            .unwrap()
            .unwrap()
            .clone()
            .unwrap();
        assert!(v.exports.is_empty());
        assert!(
            v.problems[0]
                .to_string()
                .contains("namespace shop is not selected"),
            "{:?}",
            v.problems
        );
        api.apply(ns(json!({"meshfed.io/federate": "true"})))
            .unwrap();
        tokio::time::timeout(
            wait,
            view.wait_for(|v| v.as_ref().is_some_and(|v| v.exports.len() == 1)),
        )
        .await
        .unwrap_or_else(|_| panic!("{:?}", src.view.borrow()))
        .unwrap();
    });
}

/// Istio WorkloadEntries with the real source and the double: without Istio's CRD (the
/// double answers 404) the source publishes its view anyway and says the kind is not served
/// (not a failure); once served, a WorkloadEntry that payment's selector selects becomes one of
/// payment's endpoints.
#[test]
fn workload_entries_are_optional_and_join_the_services_that_select_them() {
    let api = ApiServer::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(&d.path().join("kubeconfig")).unwrap();
    api.set_served("WorkloadEntry", false);
    // An agent whose RBAC does not grant WorkloadGroups (an upgrade without the new
    // ClusterRole) still publishes its view, and says why the kind is missing.
    api.set_forbidden("WorkloadGroup", true);
    api.apply(service()).unwrap();
    api.apply(slice(&["10.1.0.5"])).unwrap();
    api.apply(export("payment")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let src = source(&kubeconfig, Default::default()).await;
        let wait = Duration::from_secs(60);
        let mut view = src.view.clone();
        tokio::time::timeout(
            wait,
            view.wait_for(|v| v.as_ref().is_some_and(|v| v.exports.len() == 1)),
        )
        .await
        .unwrap_or_else(|_| panic!("no view without WorkloadEntries: {:?}", src.health.borrow()))
        .unwrap();
        let h = src.health.borrow().clone();
        assert!(h["WorkloadEntry"].not_served, "{h:?}");
        assert!(h["WorkloadEntry"].error.is_none(), "{h:?}");
        let g = &h["WorkloadGroup"];
        assert!(
            g.error.as_deref().is_some_and(
                |e| e.starts_with("forbidden: the agent may not list and watch WorkloadGroup")
            ),
            "{h:?}"
        );
        api.set_forbidden("WorkloadGroup", false);
        // Istio is installed and a VM joins payment.
        api.set_served("WorkloadEntry", true);
        api.apply(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "payment-vm-1", "namespace": "shop"},
            "spec": {"address": "10.5.0.9", "labels": {"app": "payment"},
                     "serviceAccount": "payment-vm", "ports": {"http": 9080}}}),
        )
        .unwrap();
        tokio::time::timeout(
            wait,
            view.wait_for(|v| {
                v.as_ref().is_some_and(|v| {
                    v.exports["shop/payment"]
                        .endpoints
                        .iter()
                        .any(|e| e.address == "10.5.0.9" && e.service_account == "payment-vm")
                })
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{:?}", src.view.borrow()))
        .unwrap();
        assert!(!src.health.borrow()["WorkloadEntry"].not_served);
    });
}
