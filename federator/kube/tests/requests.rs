//! Request level (kube's tower-test mock, as kube-rs/controller-rs does): what the import writer
//! sends to the API server, and how it reacts to an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use meshfed_kube::sink::ImportWriter;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn desired() -> BTreeMap<(String, String), (Value, Value)> {
    let obj = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": "payment", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "meshfed"}},
        "spec": {"type": "ClusterSetIP", "ports": [{"port": 80, "protocol": "TCP"}], "ips": ["240.240.0.1"]}});
    let status = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "status": {"clusters": [{"cluster": "east"}]}});
    [(("shop".to_string(), "payment".to_string()), (obj, status))].into()
}

fn ok(v: Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .body(Body::from(serde_json::to_vec(&v).unwrap()))
        .unwrap()
}

async fn next(
    h: &mut Handle,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .expect("a request within 10 s")
        .expect("the client is alive")
}

fn query(r: &Request<Body>) -> String {
    r.uri().query().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_import_writer_lists_its_own_applies_and_retries_after_an_error() {
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let server = tokio::spawn(async move {
        // 1. It lists the ServiceImports it wrote earlier, by its label.
        let (r, send) = next(&mut h).await;
        assert_eq!(r.method(), "GET");
        assert_eq!(
            r.uri().path(),
            "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports"
        );
        assert!(
            query(&r).contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dmeshfed"),
            "{}",
            query(&r)
        );
        send.send_response(ok(json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImportList", "metadata": {"resourceVersion": "1"}, "items": []})));
        // 2. Server-side apply of the object, under its field manager, forced.
        let (r, send) = next(&mut h).await;
        assert_eq!(r.method(), "PATCH");
        assert_eq!(
            r.uri().path(),
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports/payment"
        );
        assert!(query(&r).contains("fieldManager=meshfed") && query(&r).contains("force=true"));
        assert_eq!(r.headers()["content-type"], "application/apply-patch+yaml");
        let body: Value =
            serde_json::from_slice(&r.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["spec"]["ips"], json!(["240.240.0.1"]));
        // The API server fails: the writer must try again next time.
        send.send_response(
            Response::builder()
                .status(500)
                .body(Body::from(
                    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Status",
                        "status": "Failure", "message": "etcd is sad", "reason": "InternalError", "code": 500}))
                    .unwrap(),
                ))
                .unwrap(),
        );
        // 3. The retry: the object, then its status subresource.
        let (r, send) = next(&mut h).await;
        assert_eq!(r.method(), "PATCH");
        send.send_response(ok(desired()[&("shop".into(), "payment".into())].0.clone()));
        let (r, send) = next(&mut h).await;
        assert_eq!(r.method(), "PATCH");
        assert!(r.uri().path().ends_with("/serviceimports/payment/status"));
        let body: Value =
            serde_json::from_slice(&r.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["status"]["clusters"], json!([{"cluster": "east"}]));
        send.send_response(ok(desired()[&("shop".into(), "payment".into())].0.clone()));
        h
    });
    let mut w = ImportWriter::default();
    let e = w.sync(&client, &desired()).await.unwrap_err();
    assert!(format!("{e:#}").contains("etcd is sad"), "{e:#}");
    let done = w.sync(&client, &desired()).await.unwrap();
    assert_eq!(done.applied, 1);
    let _h = server.await.unwrap();
    // Unchanged: nothing is sent (the mock answers nothing, so a request would not return).
    let again = tokio::time::timeout(Duration::from_secs(10), w.sync(&client, &desired()))
        .await
        .expect("no request for an unchanged object")
        .unwrap();
    assert_eq!(again.applied, 0);
}
