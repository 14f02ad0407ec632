//! Failover policies and routes from the Kubernetes API: meshfed's `FailoverPolicy` objects
//! (meshfed.io/v1alpha1), Istio `DestinationRule`s (networking.istio.io/v1) labelled
//! `meshfed.io/failover: "true"` and Istio `VirtualService`s labelled `meshfed.io/routes:
//! "true"`, fed to the same policy compiler as the files. Each object is parsed on its own: a
//! bad one is a problem naming it (and the field), a second policy (or VirtualService) for a
//! host already taken (by a file, or an older object) too; the others apply.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use meshfed_model::policy::PolicySet;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::view::Problem;

/// The label that opts an Istio DestinationRule in.
pub const DESTINATION_RULE_LABEL: &str = "meshfed.io/failover";
/// The label that opts an Istio VirtualService in (its routes for meshfed's proxyless clients).
pub const VIRTUAL_SERVICE_LABEL: &str = "meshfed.io/routes";

/// Policy objects as documents for the compiler: `(what, JSON text)`, `what` naming the object
/// (`FailoverPolicy shop/payment`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PolicyDocs {
    pub docs: Vec<(&'static str, String, String, String)>,
}

/// The document the compiler reads for one object: apiVersion, kind, name and namespace,
/// and its spec; nothing the API server adds (status, managed fields, versions).
pub fn document(api_version: &str, kind: &str, o: &DynamicObject) -> String {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": o.metadata.name.clone().unwrap_or_default(),
            "namespace": o.metadata.namespace.clone().unwrap_or_default(),
        },
        "spec": o.data.get("spec").cloned().unwrap_or(Value::Null),
    })
    .to_string()
}

/// Merges the objects' policies into `files` (which win): returns the set and the problems.
pub fn merge(files: &PolicySet, objects: &PolicyDocs) -> (PolicySet, Vec<Problem>) {
    let mut set = files.clone();
    let mut problems = Vec::new();
    for (kind, ns, name, text) in &objects.docs {
        let what = format!("{kind} {ns}/{name}");
        let problem = |reason: String| Problem {
            kind,
            namespace: ns.clone(),
            name: name.clone(),
            reason,
        };
        match PolicySet::from_sources(&[(what.clone(), text.clone())]) {
            Ok(one) => {
                for (host, mut p) in one.by_host {
                    if let Some(prev) = set.by_host.get(&host) {
                        problems.push(problem(format!(
                            "spec.host: {host:?} already has a policy ({}/{} at {}); one policy per host",
                            prev.namespace, prev.name, prev.origin
                        )));
                        continue;
                    }
                    p.origin = what.clone();
                    set.by_host.insert(host, p);
                }
                for (host, mut r) in one.routes_by_host {
                    if let Some(prev) = set.routes_by_host.get(&host) {
                        problems.push(problem(format!(
                            "spec.hosts: {host:?} already has a VirtualService ({}/{} at {}); one per host",
                            prev.namespace, prev.name, prev.origin
                        )));
                        continue;
                    }
                    r.origin = what.clone();
                    set.routes_by_host.insert(host, r);
                }
            }
            Err(e) => problems.push(problem(
                e.strip_prefix(&format!("{what}:"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or(e),
            )),
        }
    }
    problems.sort();
    (set, problems)
}

fn follow(
    client: &Client,
    gvk: GroupVersionKind,
    plural: &str,
    labels: Option<&str>,
    changed: Arc<Notify>,
) -> (
    Store<DynamicObject>,
    futures::future::BoxFuture<'static, ()>,
) {
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let writer = reflector::store::Writer::new(ar);
    let reader = writer.as_reader();
    let mut cfg = watcher::Config::default();
    if let Some(l) = labels {
        cfg = cfg.labels(l);
    }
    let kind = gvk.kind.clone();
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    let fut = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(
                    watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_),
                ) => changed.notify_one(),
                Ok(_) => {}
                // A cluster without the CRD answers 404: no such policies; the watcher keeps
                // trying (backing off to 30 s), so a CRD installed later is picked up.
                Err(e) => tracing::debug!(kind = %kind, error = %e, "policy watch failing"),
            }
        }
    };
    (reader, Box::pin(fut))
}

/// Starts watching policy objects; the returned future runs the watches (spawn it). The
/// receiver holds the documents, rebuilt after changes (coalesced by `debounce`).
pub fn start(
    client: Client,
    debounce: Duration,
) -> (
    watch::Receiver<Arc<PolicyDocs>>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let changed = Arc::new(Notify::new());
    let (fp, f1) = follow(
        &client,
        GroupVersionKind::gvk("meshfed.io", "v1alpha1", "FailoverPolicy"),
        "failoverpolicies",
        None,
        changed.clone(),
    );
    let (dr, f2) = follow(
        &client,
        GroupVersionKind::gvk("networking.istio.io", "v1", "DestinationRule"),
        "destinationrules",
        Some(&format!("{DESTINATION_RULE_LABEL}=true")),
        changed.clone(),
    );
    let (vs, f3) = follow(
        &client,
        GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
        "virtualservices",
        Some(&format!("{VIRTUAL_SERVICE_LABEL}=true")),
        changed.clone(),
    );
    let tx = watch::Sender::new(Arc::new(PolicyDocs::default()));
    let rx = tx.subscribe();
    let builder = async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(debounce).await;
            let mut docs = Vec::new();
            for (store, kind, api_version) in [
                (&fp, "FailoverPolicy", "meshfed.io/v1alpha1"),
                (&dr, "DestinationRule", "networking.istio.io/v1"),
                (&vs, "VirtualService", "networking.istio.io/v1"),
            ] {
                let mut objs: BTreeMap<(String, String), String> = BTreeMap::new();
                for o in store.state() {
                    objs.insert(
                        (
                            o.metadata.namespace.clone().unwrap_or_default(),
                            o.metadata.name.clone().unwrap_or_default(),
                        ),
                        document(api_version, kind, &o),
                    );
                }
                for ((ns, name), text) in objs {
                    docs.push((kind, ns, name, text));
                }
            }
            let next = PolicyDocs { docs };
            tx.send_if_modified(|cur| {
                if **cur == next {
                    false
                } else {
                    *cur = Arc::new(next);
                    true
                }
            });
        }
    };
    let run = async move {
        futures::future::join(futures::future::join3(f1, f2, f3), builder).await;
    };
    (rx, run)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn objects_become_policies_and_bad_or_duplicate_ones_are_problems() {
        let fp = obj(
            json!({"apiVersion": "meshfed.io/v1alpha1", "kind": "FailoverPolicy",
            "metadata": {"name": "payment", "namespace": "shop", "resourceVersion": "9", "uid": "x"},
            "spec": {"host": "payment.shop.svc.cluster.local",
                     "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s"}},
            "status": {"whatever": true}}),
        );
        let bad = obj(
            json!({"apiVersion": "meshfed.io/v1alpha1", "kind": "FailoverPolicy",
            "metadata": {"name": "ledger", "namespace": "shop"},
            "spec": {"host": "ledger.shop.svc.cluster.local", "bogus": 1}}),
        );
        let dup = obj(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "payment-dr", "namespace": "shop"},
            "spec": {"host": "payment.shop.svc.cluster.local",
                     "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"}}}}),
        );
        let docs = PolicyDocs {
            docs: vec![
                (
                    "FailoverPolicy",
                    "shop".into(),
                    "ledger".into(),
                    document("meshfed.io/v1alpha1", "FailoverPolicy", &bad),
                ),
                (
                    "FailoverPolicy",
                    "shop".into(),
                    "payment".into(),
                    document("meshfed.io/v1alpha1", "FailoverPolicy", &fp),
                ),
                (
                    "DestinationRule",
                    "shop".into(),
                    "payment-dr".into(),
                    document("networking.istio.io/v1", "DestinationRule", &dup),
                ),
            ],
        };
        let vs = |name: &str, spec: Value| {
            let o = obj(
                json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec}),
            );
            (
                "VirtualService",
                "shop".to_string(),
                name.to_string(),
                document("networking.istio.io/v1", "VirtualService", &o),
            )
        };
        let mut docs = docs;
        docs.docs.push(vs(
            "payment-routes",
            json!({"hosts": ["payment"], "http": [{"route": [{"destination": {"host": "payment", "subset": "v2"}}]}]}),
        ));
        docs.docs.push(vs(
            "payment-again",
            json!({"hosts": ["payment"], "http": [{"route": [{"destination": {"host": "payment"}}]}]}),
        ));
        docs.docs.push(vs(
            "faulty",
            json!({"hosts": ["ledger"], "http": [{"route": [{"destination": {"host": "ledger"}}], "fault": {"abort": {"httpStatus": 503}}}]}),
        ));
        let (set, problems) = merge(&PolicySet::default(), &docs);
        let r = &set.routes_by_host["payment.shop.svc.cluster.local"];
        assert_eq!(r.origin, "VirtualService shop/payment-routes");
        assert_eq!(r.subsets(), ["v2"]);
        assert!(!set
            .routes_by_host
            .contains_key("ledger.shop.svc.cluster.local"));
        let (problems, vs_problems): (Vec<Problem>, Vec<Problem>) = problems
            .into_iter()
            .partition(|p| p.kind != "VirtualService");
        let vs_text: Vec<String> = vs_problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(vs_text.len(), 2, "{vs_text:?}");
        assert!(vs_text[1].starts_with("VirtualService shop/payment-again: spec.hosts: \"payment.shop.svc.cluster.local\" already has a VirtualService (shop/payment-routes at VirtualService shop/payment-routes)"), "{vs_text:?}");
        assert!(
            vs_text[0].starts_with("VirtualService shop/faulty:")
                && vs_text[0].contains("spec.http[0].fault: not applied"),
            "{vs_text:?}"
        );
        let p = &set.by_host["payment.shop.svc.cluster.local"];
        assert_eq!(p.origin, "FailoverPolicy shop/payment");
        assert!(p.outlier.is_some());
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(text[0].starts_with("DestinationRule shop/payment-dr: spec.host: \"payment.shop.svc.cluster.local\" already has a policy"), "{text:?}");
        assert!(
            text[1].starts_with("FailoverPolicy shop/ledger:") && text[1].contains("bogus"),
            "{text:?}"
        );
    }
}
