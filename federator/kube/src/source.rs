//! The watches: one kube-runtime watcher (list, then watch from the list's resourceVersion,
//! relisting on `410 Gone`, with backoff) and reflector store per type, and one task that
//! rebuilds the [`View`] from the stores after changes (coalesced) and publishes it when it
//! differs. Nothing is polled. While the API server is unreachable the stores keep the last
//! state, so the view (and everything served from it) stays; [`WatchHealth`] says since when a
//! watch fails.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

use crate::types::{DestinationRule, ServiceEntry, ServiceExport, WorkloadEntry, WorkloadGroup};
use crate::view::{Builder, Objects, Scope, View};

/// A Kubernetes client, for configurations that are `Debug`.
#[derive(Clone)]
pub struct KubeClient(pub Client);

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClient")
    }
}

/// A client from a kubeconfig file, or the in-cluster configuration (service account token)
/// when none is given.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let mut cfg = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("--kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", p.display()))?
        }
        None => kube::Config::incluster().context(
            "no --kubeconfig and not running in a pod (in-cluster configuration unavailable)",
        )?,
    };
    // The watchers back off and retry by themselves (and report each failure); the client's
    // own retry layer would hide an unreachable API server for minutes.
    cfg.default_retry = false;
    Client::try_from(cfg).context("cannot build the Kubernetes client")
}

/// One watch's state, for `meshfed status`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WatchHealth {
    /// The first full list arrived.
    pub synced: bool,
    /// The last error, while the watch fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when it fails (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    /// The API server does not serve this kind (an optional kind whose CRD is not
    /// installed, e.g. Istio's WorkloadEntry without Istio): not a failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_served: bool,
}

/// What the running source publishes.
#[derive(Debug, Clone)]
pub struct KubeSource {
    /// `None` until every watch has listed once.
    pub view: watch::Receiver<Option<Arc<View>>>,
    /// Per watched kind.
    pub health: watch::Receiver<BTreeMap<String, WatchHealth>>,
    /// The watched Pods, Nodes and Namespaces (read-only), for questions about one pod.
    pub workloads: Workloads,
}

/// Read-only handles on the watched Pods, Nodes and Namespaces: where a pod runs, for the
/// workload API and the injection webhook.
#[derive(Clone)]
pub struct Workloads {
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
}

impl Debug for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workloads").finish_non_exhaustive()
    }
}

/// Where a pod runs, as the API server says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Placement {
    pub service_account: String,
    pub ip: String,
    pub labels: BTreeMap<String, String>,
    /// From its Node's topology labels; `None` when the pod is not scheduled, its Node is
    /// unknown or has no region label.
    pub locality: Option<proto::Locality>,
}

impl Workloads {
    /// The pod `namespace/name`, or why it cannot be answered for.
    pub fn placement(&self, namespace: &str, name: &str) -> Result<Placement, String> {
        let key = reflector::ObjectRef::<Pod>::new(name).within(namespace);
        let pod = self
            .pods
            .get(&key)
            .ok_or_else(|| format!("no pod {namespace}/{name} is known to the agent"))?;
        let spec = pod.spec.clone().unwrap_or_default();
        let locality = spec.node_name.as_deref().and_then(|n| {
            self.nodes
                .get(&reflector::ObjectRef::<Node>::new(n))
                .and_then(|node| crate::view::node_locality(&node))
        });
        Ok(Placement {
            service_account: spec
                .service_account_name
                .unwrap_or_else(|| "default".to_string()),
            ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            locality,
        })
    }

    /// The labels of a namespace, `None` when it is not known.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&reflector::ObjectRef::<Namespace>::new(name))
            .map(|n| n.metadata.labels.clone().unwrap_or_default())
    }

    /// Waits until the Pods, Nodes and Namespaces have been listed once.
    pub async fn wait_until_ready(&self) -> bool {
        self.pods.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.namespaces.wait_until_ready().await.is_ok()
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Whether a watch error says the client may not use the kind (403: RBAC without a grant).
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

/// Whether a watch error says the kind is not served at all (404 on the list).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

fn follow<K>(
    client: &Client,
    kind: &'static str,
    optional: bool,
    changed: Arc<Notify>,
    health: watch::Sender<BTreeMap<String, WatchHealth>>,
) -> (Store<K>, futures::future::BoxFuture<'static, ()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let probe_api = api.clone();
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let fut = async move {
        let mut stream = std::pin::pin!(stream);
        // A watch that resumed after a failure says nothing until its next event: while this
        // kind fails, a one-item list every 5 s tells whether the API server answers again
        // (nothing is listed while all is well).
        let mut failing = false;
        let mut probe = tokio::time::interval(Duration::from_secs(5));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let item = tokio::select! {
                item = stream.next() => match item {
                    Some(item) => item,
                    None => break,
                },
                _ = probe.tick(), if failing => {
                    let lp = kube::api::ListParams::default().limit(1);
                    if probe_api.list(&lp).await.is_ok() {
                        tracing::info!(kind, "the Kubernetes API answers again");
                        failing = false;
                        health.send_modify(|h| {
                            if let Some(e) = h.get_mut(kind) {
                                e.error = None;
                                e.failing_since = None;
                            }
                        });
                    }
                    continue;
                }
            };
            match item {
                Ok(ev) => {
                    failing = false;
                    health.send_if_modified(|h| {
                        let e = h.entry(kind.to_string()).or_default();
                        let was = e.clone();
                        if matches!(ev, watcher::Event::InitDone) {
                            e.synced = true;
                        }
                        e.error = None;
                        e.failing_since = None;
                        e.not_served = false;
                        *e != was
                    });
                    if matches!(
                        ev,
                        watcher::Event::InitDone
                            | watcher::Event::Apply(_)
                            | watcher::Event::Delete(_)
                    ) {
                        changed.notify_one();
                    }
                }
                // An optional kind the API server does not serve, or that the agent's RBAC does
                // not grant (an upgrade that did not apply the new ClusterRole): the view goes on
                // without it; a 403 is reported as the watch's error.
                Err(err) if optional && (not_served(&err) || forbidden(&err)) => {
                    let denied = forbidden(&err).then(|| {
                        format!("forbidden: the agent may not list and watch {kind} (apply the deploy's ClusterRole): {err}")
                    });
                    health.send_if_modified(|h| {
                        let e = h.entry(kind.to_string()).or_default();
                        let was = e.clone();
                        e.not_served = true;
                        if e.error.is_some() != denied.is_some() {
                            e.failing_since = denied.as_ref().map(|_| now_rfc3339());
                        }
                        e.error = denied.clone();
                        if let (Some(d), false) = (&denied, was.error.is_some()) {
                            tracing::warn!(kind, error = %d, "going on without this kind");
                        } else if !was.not_served && denied.is_none() {
                            tracing::info!(kind, "the API server does not serve this kind (its CRD is not installed); watching for it to appear");
                        }
                        *e != was
                    });
                }
                Err(err) => {
                    if !failing {
                        failing = true;
                        probe.reset();
                    }
                    tracing::warn!(kind, error = %err, "Kubernetes watch failing; serving what it last listed");
                    health.send_modify(|h| {
                        let e = h.entry(kind.to_string()).or_default();
                        e.error = Some(err.to_string());
                        if e.failing_since.is_none() {
                            e.failing_since = Some(now_rfc3339());
                        }
                    });
                }
            }
        }
    };
    (reader, Box::pin(fut))
}

/// One WorkloadGroup, read from the API and checked as the view checks it (for
/// `meshfed vm bootstrap --kubernetes`).
pub async fn workload_group(
    client: Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<meshfed_model::workload::WorkloadGroup> {
    let api: kube::Api<WorkloadGroup> = kube::Api::namespaced(client, namespace);
    let obj = api
        .get_opt(name)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read WorkloadGroup {namespace}/{name}: {e}"))?
        .ok_or_else(|| {
            anyhow::anyhow!("no WorkloadGroup {namespace}/{name} in the Kubernetes API")
        })?;
    crate::view::workload_group(&obj)
        .map_err(|e| anyhow::anyhow!("WorkloadGroup {namespace}/{name}: {e}"))
}

/// Starts watching; the returned future runs the watches and the view builder (spawn it).
/// `debounce` coalesces bursts of changes into one rebuild.
pub fn start(
    client: Client,
    default_locality: proto::Locality,
    scope: Scope,
    debounce: Duration,
) -> (
    KubeSource,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let changed = Arc::new(Notify::new());
    let health = watch::Sender::new(BTreeMap::new());
    let (services, f1) =
        follow::<Service>(&client, "Service", false, changed.clone(), health.clone());
    let (slices, f2) = follow::<EndpointSlice>(
        &client,
        "EndpointSlice",
        false,
        changed.clone(),
        health.clone(),
    );
    let (nodes, f3) = follow::<Node>(&client, "Node", false, changed.clone(), health.clone());
    let (pods, f4) = follow::<Pod>(&client, "Pod", false, changed.clone(), health.clone());
    let (namespaces, f6) =
        follow::<Namespace>(&client, "Namespace", false, changed.clone(), health.clone());
    let (exports, f5) = follow::<ServiceExport>(
        &client,
        "ServiceExport",
        false,
        changed.clone(),
        health.clone(),
    );
    // Istio's WorkloadEntries are optional: a cluster without Istio does not serve them.
    let (entries, f7) = follow::<WorkloadEntry>(
        &client,
        "WorkloadEntry",
        true,
        changed.clone(),
        health.clone(),
    );
    let (groups, f8) = follow::<WorkloadGroup>(
        &client,
        "WorkloadGroup",
        true,
        changed.clone(),
        health.clone(),
    );
    let (service_entries, f9) = follow::<ServiceEntry>(
        &client,
        "ServiceEntry",
        true,
        changed.clone(),
        health.clone(),
    );
    let (destination_rules, f10) = follow::<DestinationRule>(
        &client,
        "DestinationRule",
        true,
        changed.clone(),
        health.clone(),
    );
    let view = watch::Sender::new(None);
    let src = KubeSource {
        view: view.subscribe(),
        health: health.subscribe(),
        workloads: Workloads {
            pods: pods.clone(),
            nodes: nodes.clone(),
            namespaces: namespaces.clone(),
        },
    };
    let builder = async move {
        // Nothing is published before every kind has listed once: an empty view would
        // withdraw every export.
        for r in [
            services.wait_until_ready().await,
            slices.wait_until_ready().await,
            nodes.wait_until_ready().await,
            pods.wait_until_ready().await,
            exports.wait_until_ready().await,
            namespaces.wait_until_ready().await,
        ] {
            if r.is_err() {
                return;
            }
        }
        // The optional kinds (Istio's): each one's list, or word that it is not served.
        let mut h = health.subscribe();
        tokio::select! {
            r = entries.wait_until_ready() => if r.is_err() { return },
            _ = h.wait_for(|m| m.get("WorkloadEntry").is_some_and(|w| w.not_served)) => {}
        }
        tokio::select! {
            r = groups.wait_until_ready() => if r.is_err() { return },
            _ = h.wait_for(|m| m.get("WorkloadGroup").is_some_and(|w| w.not_served)) => {}
        }
        tokio::select! {
            r = service_entries.wait_until_ready() => if r.is_err() { return },
            _ = h.wait_for(|m| m.get("ServiceEntry").is_some_and(|w| w.not_served)) => {}
        }
        tokio::select! {
            r = destination_rules.wait_until_ready() => if r.is_err() { return },
            _ = h.wait_for(|m| m.get("DestinationRule").is_some_and(|w| w.not_served)) => {}
        }
        tracing::info!("Kubernetes watches synced");
        let mut builder = Builder::new(scope);
        loop {
            let objects = Objects {
                namespaces: namespaces.state(),
                workload_entries: entries.state(),
                workload_groups: groups.state(),
                services: services.state(),
                slices: slices.state(),
                nodes: nodes.state(),
                pods: pods.state(),
                exports: exports.state(),
                service_entries: service_entries.state(),
                destination_rules: destination_rules.state(),
            };
            let v = builder.build(&objects, &default_locality);
            for p in &v.problems {
                tracing::debug!(problem = %p, "Kubernetes object not used");
            }
            view.send_if_modified(|cur| {
                if cur.as_deref() == Some(&v) {
                    false
                } else {
                    tracing::info!(
                        services = v.local.len(),
                        exported = v.exports.len(),
                        problems = v.problems.len(),
                        "Kubernetes view updated"
                    );
                    *cur = Some(Arc::new(v));
                    true
                }
            });
            changed.notified().await;
            tokio::time::sleep(debounce).await;
        }
    };
    let all = async move {
        futures::future::join(
            futures::future::join_all([f1, f2, f3, f4, f5, f6, f7, f8, f9, f10]),
            builder,
        )
        .await;
    };
    (src, all)
}
