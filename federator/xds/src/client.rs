//! A small ADS client (SotW): subscribes to every cluster and its endpoints, ACKs what it
//! accepts, reconnects with jittered backoff and keeps the last tables while the server is
//! away. Used by the demo's workloads, the benchmark fleet and meshfed's gateway.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::{CLUSTER_TYPE, ENDPOINT_TYPE};

/// Endpoints by cluster name, as last received.
pub type Tables = Arc<BTreeMap<String, ClusterLoadAssignment>>;

#[derive(Debug)]
pub struct AdsClient {
    pub tables: watch::Receiver<Tables>,
    /// True while the stream is up.
    pub connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AdsClient {
    /// Starts following `server` (`http://host:port`) as `node`.
    pub fn start(server: String, node: Node) -> AdsClient {
        let (tables_tx, tables) = watch::channel(Tables::default());
        let (up_tx, connected) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match run_once(&server, &node, &tables_tx, &up_tx).await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => tracing::debug!(server = %server, error = %e, "ADS stream failed"),
                }
                up_tx.send_replace(false);
                let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
                tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        AdsClient {
            tables,
            connected,
            task,
        }
    }

    /// Waits until `f` holds for the tables, or `timeout` passes.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&Tables) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if f(&self.tables.borrow_and_update().clone()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.tables.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

fn ack(
    r: &DiscoveryResponse,
    names: Vec<String>,
    error: Option<String>,
    last_ok: &str,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: if error.is_some() {
            last_ok.to_string()
        } else {
            r.version_info.clone()
        },
        response_nonce: r.nonce.clone(),
        type_url: r.type_url.clone(),
        resource_names: names,
        error_detail: error.map(|message| RpcStatus {
            code: 3,
            message,
            details: vec![],
        }),
        ..Default::default()
    }
}

/// An ADS stream to `server` whose first request is `first`: the sender of the requests that
/// follow, and the responses. Unbounded: an ACK never waits for the send window, so a reader
/// always reads the next response (a client that stops reading while its requests wait can
/// deadlock a server that is busy writing).
async fn open(
    server: &str,
    first: DiscoveryRequest,
) -> anyhow::Result<(
    mpsc::UnboundedSender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
)> {
    let mut client = AggregatedDiscoveryServiceClient::connect(server.to_string()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(first)?;
    let inbound = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

async fn run_once(
    server: &str,
    node: &Node,
    tables_tx: &watch::Sender<Tables>,
    up: &watch::Sender<bool>,
) -> anyhow::Result<()> {
    let (tx, mut inbound) = open(
        server,
        DiscoveryRequest {
            node: Some(node.clone()),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        },
    )
    .await?;
    up.send_replace(true);
    let mut names: Vec<String> = Vec::new();
    let (mut cds_ok, mut eds_ok) = (String::new(), String::new());
    while let Some(r) = inbound.next().await {
        let r = r?;
        match r.type_url.as_str() {
            CLUSTER_TYPE => {
                let decoded: Result<Vec<Cluster>, _> = r
                    .resources
                    .iter()
                    .map(|a| Cluster::decode(a.value.as_slice()))
                    .collect();
                match decoded {
                    Ok(cs) => {
                        let mut new: Vec<String> = cs.into_iter().map(|c| c.name).collect();
                        new.sort();
                        cds_ok = r.version_info.clone();
                        tx.send(ack(&r, vec![], None, &cds_ok))?;
                        // Forget tables of clusters that are gone (SotW CDS removes them).
                        tables_tx.send_if_modified(|t| {
                            let before = t.len();
                            let kept: BTreeMap<String, ClusterLoadAssignment> = t
                                .iter()
                                .filter(|(k, _)| new.binary_search(k).is_ok())
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect();
                            let changed = kept.len() != before;
                            *t = Arc::new(kept);
                            changed
                        });
                        if new != names {
                            names = new;
                            tx.send(DiscoveryRequest {
                                type_url: ENDPOINT_TYPE.into(),
                                resource_names: names.clone(),
                                version_info: eds_ok.clone(),
                                ..Default::default()
                            })?;
                        }
                    }
                    Err(e) => tx.send(ack(&r, vec![], Some(e.to_string()), &cds_ok))?,
                }
            }
            ENDPOINT_TYPE => {
                let decoded: Result<Vec<ClusterLoadAssignment>, _> = r
                    .resources
                    .iter()
                    .map(|a| ClusterLoadAssignment::decode(a.value.as_slice()))
                    .collect();
                match decoded {
                    Ok(cs) => {
                        eds_ok = r.version_info.clone();
                        tx.send(ack(&r, names.clone(), None, &eds_ok))?;
                        tables_tx.send_modify(|t| {
                            let mut m = BTreeMap::clone(t);
                            for c in cs {
                                m.insert(c.cluster_name.clone(), c);
                            }
                            *t = Arc::new(m);
                        });
                    }
                    Err(e) => tx.send(ack(&r, names.clone(), Some(e.to_string()), &eds_ok))?,
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One request for `names` of `type_url` from `server` as `node`: the first response's
/// resources (what a proxyless client asking for them would be sent), or an error after
/// `timeout`.
pub async fn fetch_once(
    server: &str,
    node: &Node,
    type_url: &str,
    names: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<envoy_types::pb::google::protobuf::Any>> {
    let once = async {
        let (_tx, mut inbound) = open(
            server,
            DiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.into(),
                resource_names: names.to_vec(),
                ..Default::default()
            },
        )
        .await?;
        match inbound.next().await {
            Some(r) => Ok(r?.resources),
            None => anyhow::bail!("{server} closed the stream without answering"),
        }
    };
    tokio::time::timeout(timeout, once)
        .await
        .map_err(|_| anyhow::anyhow!("{server}: no {type_url} within {timeout:?}"))?
}

/// `(priority, address, healthy)` of every endpoint in a table, in priority order.
pub fn endpoints(c: &ClusterLoadAssignment) -> Vec<(u32, String, bool)> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address, HealthStatus};
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let mut out = Vec::new();
    for l in &c.endpoints {
        for e in &l.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            let host = if sa.address.contains(':') {
                format!("[{}]", sa.address)
            } else {
                sa.address.clone()
            };
            let healthy = e.health_status != HealthStatus::Unhealthy as i32
                && e.health_status != HealthStatus::Draining as i32;
            out.push((l.priority, format!("{host}:{port}"), healthy));
        }
    }
    out.sort_by_key(|x| x.0);
    out
}
