//! `meshfed gateway`: the east-west gateway fed by the local agent over xDS. It connects as a
//! `router~` node, so the agent sends only this network's endpoints; every EDS change replaces
//! the routing table, and if the agent goes away the last table stays in use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use eastwest_gateway::proxy::{Gateway, GatewayConfig};
use eastwest_gateway::routes::Routes;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use tokio::sync::watch;

use meshfed_net::admin::AdminConfig;
use meshfed_net::drain::{DrainReport, Tasks};
use meshfed_xds::client::{endpoints, AdsClient, Tables};

#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub listen: SocketAddr,
    /// The agent's plaintext xDS address, `host:port`.
    pub xds: String,
    pub admin: Option<SocketAddr>,
    /// The probe listener (`/healthz`, `/readyz`, `/metrics` only).
    pub probe: Option<SocketAddr>,
    /// SNI names forwarded to fixed addresses (e.g. the agent's mTLS port).
    pub expose: BTreeMap<String, Vec<SocketAddr>>,
    pub node_id: String,
    pub network: Option<String>,
    pub config: GatewayConfig,
}

/// A running gateway.
#[derive(Debug)]
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    pub routes: watch::Receiver<Arc<Routes>>,
    tasks: Tasks,
    _ads: Arc<AdsClient>,
}

impl RunningGateway {
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Stops accepting and waits for open connections up to the gateway's drain timeout
    /// (`deadline` bounds the whole drain; give it a little more).
    pub async fn drain(self, deadline: std::time::Duration) -> DrainReport {
        self.tasks.drain(deadline).await
    }

    pub fn abort(self) {
        self.tasks.abort_all();
    }
}

/// Healthy endpoints of every cluster, best priority first.
pub fn routes_from(tables: &Tables, expose: &BTreeMap<String, Vec<SocketAddr>>) -> Routes {
    let mut r = Routes::from_clusters(tables.iter().map(|(name, cla)| {
        let eps: Vec<SocketAddr> = endpoints(cla)
            .into_iter()
            .filter(|e| e.2)
            .filter_map(|e| e.1.parse().ok())
            .collect();
        (name.as_str(), eps)
    }));
    r.fixed = expose.clone();
    r
}

pub async fn start(
    o: GatewayOptions,
    registry: prometheus::Registry,
) -> anyhow::Result<RunningGateway> {
    let mut md = envoy_types::pb::google::protobuf::Struct::default();
    if let Some(n) = &o.network {
        md.fields.insert(
            "NETWORK".into(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                    n.clone(),
                )),
            },
        );
    }
    let ads = Arc::new(AdsClient::start(
        format!("http://{}", o.xds),
        Node {
            id: o.node_id.clone(),
            user_agent_name: "meshfed-gateway".into(),
            locality: Some(Locality::default()),
            metadata: Some(md),
            ..Default::default()
        },
    ));
    let (routes_tx, routes_rx) =
        watch::channel(Arc::new(routes_from(&Tables::default(), &o.expose)));
    let mut tables = ads.tables.clone();
    let expose = o.expose.clone();
    let tasks = Tasks::new();
    tasks.spawn("routes from xDS", async move {
        loop {
            let t = tables.borrow_and_update().clone();
            let r = routes_from(&t, &expose);
            routes_tx.send_if_modified(|cur| {
                if **cur == r {
                    false
                } else {
                    tracing::info!(
                        services = r.services.values().filter(|e| !e.is_empty()).count(),
                        without_endpoints = r.services.values().filter(|e| e.is_empty()).count(),
                        "gateway routes updated"
                    );
                    *cur = Arc::new(r);
                    true
                }
            });
            if tables.changed().await.is_err() {
                return;
            }
        }
    });
    let gateway = Gateway::new(o.config.clone(), routes_rx.clone(), &registry);
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("cannot listen on {} (gateway)", o.listen))?;
    let addr = listener.local_addr()?;
    let gw = gateway.clone();
    tasks.spawn_server("gateway listener", |drain| async move {
        let (stop, stop_rx) = watch::channel(false);
        let serve = gw.serve(listener, stop_rx);
        tokio::pin!(serve);
        tokio::select! {
            _ = &mut serve => return,
            _ = drain.drained() => {}
        }
        // Stop accepting; open connections get the gateway's drain timeout.
        stop.send_replace(true);
        serve.await;
    });
    // Ready once it has routes.
    let r2 = routes_rx.clone();
    tasks.readiness_check(
        "routes",
        Arc::new(move || {
            let routes = r2.borrow().clone();
            if routes.services.is_empty() && routes.fixed.is_empty() {
                Err("no routes yet".into())
            } else {
                Ok(())
            }
        }),
    );
    let mut admin = None;
    if let Some(a) = o.admin {
        let (g, r, up, reg) = (
            gateway.clone(),
            routes_rx.clone(),
            ads.connected.clone(),
            registry.clone(),
        );
        admin = Some(
            meshfed_net::admin::serve(
                &tasks,
                AdminConfig {
                    addr: a,
                    registry: Arc::new(move || reg.clone()),
                    status: Arc::new(move || {
                        let routes = r.borrow().clone();
                        Ok(status_json(&routes, g.open_connections(), *up.borrow()))
                    }),
                    extra: None,
                    ui: None,
                    probe: o.probe,
                },
            )
            .await?
            .admin,
        );
    }
    Ok(RunningGateway {
        addr,
        admin,
        gateway,
        routes: routes_rx,
        tasks,
        _ads: ads,
    })
}

/// The gateway's `/status`: the services it routes to (with an endpoint in its network), and
/// apart those it knows but has no endpoint for here (it refuses their connections).
fn status_json(routes: &Routes, open_connections: u64, xds_connected: bool) -> serde_json::Value {
    let name = |(h, p, s): &(String, u16, String)| {
        if s.is_empty() {
            format!("{h}:{p}")
        } else {
            format!("{h}:{p} ({s})")
        }
    };
    let (with, without): (Vec<_>, Vec<_>) =
        routes.services.iter().partition(|(_, eps)| !eps.is_empty());
    serde_json::json!({
        "kind": "gateway",
        "services": with.iter().map(|(k, _)| name(k)).collect::<Vec<_>>(),
        "services_without_endpoints": without.iter().map(|(k, _)| name(k)).collect::<Vec<_>>(),
        "open_connections": open_connections,
        "xds_connected": xds_connected,
    })
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn services_without_an_endpoint_here_are_not_counted_as_routed() {
        let mut r = Routes::default();
        r.services.insert(
            ("reviews.shop.svc.cluster.local".into(), 9080, String::new()),
            vec!["10.0.0.1:9080".parse().unwrap()],
        );
        r.services.insert(
            ("stock.shop.svc.cluster.local".into(), 8080, String::new()),
            Vec::new(),
        );
        let v = status_json(&r, 0, true);
        assert_eq!(
            v["services"],
            serde_json::json!(["reviews.shop.svc.cluster.local:9080"])
        );
        assert_eq!(
            v["services_without_endpoints"],
            serde_json::json!(["stock.shop.svc.cluster.local:8080"])
        );
    }
}
