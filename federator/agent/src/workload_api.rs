//! `meshfed.workload.v1.WorkloadConfig` on the mTLS xDS port: what a pod's `meshfed workload`
//! needs beside its certificate. The caller authenticates with its SVID (the port verifies it
//! against the cluster's own roots) and learns only about itself: its pod's placement (checked
//! against the namespace and service account of that SVID), the cluster's network, and the
//! trust bundles, streamed again whenever they change.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use proto::workload::workload_config_server::{WorkloadConfig, WorkloadConfigServer};
use proto::workload::{Config, Locality, WatchRequest};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use meshfed_model::store::Reader;

/// What the service reads; each a read-only handle.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub default_locality: proto::Locality,
    /// The cluster's own bundle JSON.
    pub own_bundle: watch::Receiver<String>,
    /// Peer bundles.
    pub model: Reader,
    /// With the Kubernetes source: the watched pods and nodes.
    pub workloads: Option<meshfed_kube::source::Workloads>,
}

/// How long a Watch waits for a pod the agent has not seen yet (a pod that was just created:
/// its init container may call before the agent's watch delivers it).
const POD_WAIT: Duration = Duration::from_secs(10);

/// The service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    inputs: Inputs,
}

impl WorkloadApi {
    pub fn new(inputs: Inputs) -> WorkloadApi {
        WorkloadApi { inputs }
    }

    pub fn server(self) -> WorkloadConfigServer<WorkloadApi> {
        WorkloadConfigServer::new(self)
    }

    /// The caller's placement: its pod, checked against its identity.
    async fn placement(&self, ns: &str, sa: &str, pod: &str) -> Result<Config, Status> {
        let mut cfg = Config {
            cluster: self.inputs.cluster.clone(),
            network: self.inputs.network.clone(),
            trust_domain: self.inputs.trust_domain.clone(),
            locality: Some(locality(&self.inputs.default_locality)),
            ..Default::default()
        };
        let Some(w) = &self.inputs.workloads else {
            return Ok(cfg);
        };
        if pod.is_empty() {
            return Err(Status::invalid_argument(
                "pod_name is empty: this agent reads Kubernetes, and answers for a named pod \
                 (set POD_NAME from the downward API's metadata.name)",
            ));
        }
        if !w.wait_until_ready().await {
            return Err(Status::unavailable("the agent's Kubernetes watches ended"));
        }
        let deadline = tokio::time::Instant::now() + POD_WAIT;
        let p = loop {
            match w.placement(ns, pod) {
                Ok(p) => break p,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::not_found(e));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if p.service_account != sa {
            return Err(Status::permission_denied(format!(
                "pod {ns}/{pod} runs as service account {}, and the caller's certificate is \
                 for {sa}",
                p.service_account
            )));
        }
        if let Some(l) = &p.locality {
            cfg.locality = Some(locality(l));
        }
        cfg.labels = p.labels.into_iter().collect();
        cfg.pod_ip = p.ip;
        Ok(cfg)
    }
}

fn locality(l: &proto::Locality) -> Locality {
    Locality {
        region: l.region.clone(),
        zone: l.zone.clone(),
        subzone: l.subzone.clone(),
    }
}

type ConfigStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Config, Status>> + Send>>;

#[tonic::async_trait]
impl WorkloadConfig for WorkloadApi {
    type WatchStream = ConfigStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<ConfigStream>, Status> {
        let id = req
            .extensions()
            .get::<meshfed_net::PeerInfo>()
            .and_then(|i| trust::tls::peer_id(i.certs.as_deref().map(|c| c.as_slice())))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no client certificate: obtain one from the CA API on this port first",
                )
            })?;
        let Some((ns, sa)) = id.istio_parts() else {
            return Err(Status::permission_denied(format!(
                "{id} is not a workload identity (spiffe://<td>/ns/<namespace>/sa/<account>)"
            )));
        };
        let (ns, sa) = (ns.to_string(), sa.to_string());
        let pod = req.into_inner().pod_name;
        let first = self.placement(&ns, &sa, &pod).await?;
        tracing::info!(caller = %id, pod = %pod, "workload config stream opened");
        let (tx, rx) = mpsc::channel(4);
        let mut own = self.inputs.own_bundle.clone();
        let mut snaps = self.inputs.model.subscribe();
        let td = self.inputs.trust_domain.clone();
        tokio::spawn(async move {
            let mut sent: Option<BTreeMap<String, String>> = None;
            loop {
                let own_json = own.borrow_and_update().clone();
                let snap = snaps.borrow_and_update().clone();
                let bundles =
                    meshfed_model::snapshot::bundles_by_trust_domain(&td, &own_json, &snap);
                if sent.as_ref() != Some(&bundles) {
                    let mut msg = first.clone();
                    msg.bundles = bundles.clone().into_iter().collect();
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    sent = Some(bundles);
                }
                tokio::select! {
                    r = own.changed() => if r.is_err() { return },
                    r = snaps.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
