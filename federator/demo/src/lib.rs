//! `meshfed demo`: a whole federation on this machine, on embedded defaults.
//!
//! A federator and three clusters - east (us-east1), west (us-west1), eu (europe-west1) - each
//! with its own CA and trust domain, its agent and its east-west gateway, all real `meshfed`
//! processes (this binary), and small coffee-shop workloads. `payment` runs in east and west
//! and is exported; `order` in eu calls it over mTLS, finding the endpoints and the peers'
//! trust bundles only through the federation. `inventory` runs in east, exported to west only,
//! and west's payment calls it: the other direction across the federation. eu has a failover policy (prefer us-west1, then
//! the rest); its agent pushes the priority table over xDS and `order` follows it. The script
//! then takes west down (its payment server stops, its agent is killed): west's lease expires,
//! eu's agent pushes a table ranking west last, and calls continue on east; west comes back
//! and is preferred again.
//!
//! A VM joins eu through eu's east-west gateway from a `meshfed vm bootstrap` package: one-time
//! token, durable credential, WorkloadEntry auto-registered and gated by the group's probe;
//! order calls `stock` on it over mTLS, and the VM's mesh DNS resolves an imported service.
//! When the VM's agent dies, its entry goes after the grace period.
//!
//! With etcd on the machine (Debian's etcd-server; `scripts/test` installs it), the federator
//! runs as two replicas on an etcd the demo starts in the federator's network: tokens are made
//! from etcd, clusters spread over both replicas, and one replica is killed and started again
//! while the federation goes on. Without etcd, one federator keeps its state in sled.
//!
//! Run as root with `ip`, every cluster, the VM and the federator get their own network
//! namespace, joined by veth pairs through a router namespace (see [`meshfed_harness::netns`]); the
//! processes run there (`ip netns exec`) and the workloads on runtimes whose threads entered
//! the namespace. Otherwise everything shares loopback, each cluster on its own 127.0.x.1
//! address. Either way the tables name each network's east-west gateway, and every
//! cross-cluster call crosses one: the gateway routes on the SNI without terminating TLS.
//! Everything the demo checks it reads as a user would: the admin endpoints' `/status`,
//! `/debug/syncz` and `/metrics`. Ctrl-C or SIGTERM drops the run, which kills the processes
//! and deletes the namespaces (and with them the veth links and routes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trust::ca::policy::AnyWorkload;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CertificateAuthority, SpiffeId, TrustBundle, TrustDomain, TrustStore};

use layout::Layout;
pub use layout::NetworkMode;
use meshfed_agent::AgentReport;
use meshfed_federation::status::FederationReport;
use meshfed_harness::loadgen::{Stats, Target};
use procs::Proc;

mod layout;
mod procs;
mod vm;

const LEASE_TTL: Duration = Duration::from_secs(3);
const PAYMENT_CLUSTER: &str = "outbound|18080||payment.shop.svc.cluster.local";

/// eu's failover policy for payment: prefer us-west1, then anything else.
const EU_POLICY: &str = "apiVersion: meshfed.io/v1alpha1
kind: FailoverPolicy
metadata: {name: payment, namespace: shop}
spec:
  host: payment.shop.svc.cluster.local
  failover:
    - {from: europe-west1, to: us-west1}
  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 10s, maxEjectionPercent: 100}
  staleness: {onExpiry: deprioritize}
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
# Calls to payment that carry x-version: v2 go to subset v2 (west's); the rest to the service.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment.shop.svc.cluster.local]
  http:
    - name: v2-by-header
      match: [{headers: {x-version: {exact: v2}}}]
      route: [{destination: {host: payment.shop.svc.cluster.local, subset: v2}}]
    - route: [{destination: {host: payment.shop.svc.cluster.local}}]
";
/// east's and west's policy for payment: only its subsets, published with the export, so each
/// exporter's gateway routes the subsets' SNIs (`outbound_.<port>_.v2_.<host>`).
const EXPORTER_POLICY: &str = "apiVersion: meshfed.io/v1alpha1
kind: FailoverPolicy
metadata: {name: payment-subsets, namespace: shop}
spec:
  host: payment.shop.svc.cluster.local
  publish: true
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
";
const PAYMENT_PORT: u16 = 18080;
/// inventory runs in east and is exported to west only; west's payment calls it.
const INVENTORY_PORT: u16 = 18081;
const INVENTORY_CLUSTER: &str = "outbound|18081||inventory.shop.svc.cluster.local";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub state_dir: Option<PathBuf>,
    /// Assert each expected outcome and exit non-zero if one fails.
    pub check: bool,
    pub network: NetworkMode,
}

struct ClusterSpec {
    name: &'static str,
    region: &'static str,
    /// Loopback address of this cluster's workloads (loopback mode).
    loopback: &'static str,
    /// Network number in namespace mode (10.215.<index>.2).
    index: u8,
    runs_payment: bool,
}

const CLUSTERS: [ClusterSpec; 3] = [
    ClusterSpec {
        name: "east",
        region: "us-east1",
        loopback: "127.0.1.1",
        index: 1,
        runs_payment: true,
    },
    ClusterSpec {
        name: "west",
        region: "us-west1",
        loopback: "127.0.2.1",
        index: 2,
        runs_payment: true,
    },
    ClusterSpec {
        name: "eu",
        region: "europe-west1",
        loopback: "127.0.3.1",
        index: 3,
        runs_payment: false,
    },
];

fn registry(c: &ClusterSpec, addr: &str, vm_addr: &str) -> String {
    let mut y = String::from("services:\n");
    if c.runs_payment {
        y.push_str(&format!(
            "  - namespace: shop\n    name: payment\n    ports: [{{name: https, port: {PAYMENT_PORT}, appProtocol: tls}}]\n    export: true\n    endpoints: [{{address: {addr}, serviceAccount: payment, labels: {{version: {}}}}}]\n",
            // east runs payment v1 and west v2: eu's policy names both as subsets.
            if c.name == "west" { "v2" } else { "v1" }
        ));
        if c.name == "east" {
            y.push_str(&format!(
                "  - namespace: shop\n    name: inventory\n    ports: [{{name: https, port: {INVENTORY_PORT}, appProtocol: tls}}]\n    exportTo: [west]\n    endpoints: [{{address: {addr}, serviceAccount: inventory}}]\n"
            ));
        }
    } else {
        y.push_str(&format!(
            "  - namespace: shop\n    name: order\n    ports: [{{name: http, port: 8082}}]\n    endpoints: [{{address: {addr}, serviceAccount: order}}]\n"
        ));
        // A headless service (a StatefulSet's, in Kubernetes): per-endpoint DNS names.
        y.push_str(&format!(
            "  - namespace: shop\n    name: db\n    ports: [{{name: pg, port: 5432}}]\n    headless: true\n    export: true\n    endpoints: [{{address: {addr}, hostname: db-0, serviceAccount: db}}]\n"
        ));
        y.push_str(&vm::registry(vm_addr));
    }
    y
}

/// One line of the scripted run, and whether it held (in --check mode).
struct Checks {
    check: bool,
    passed: u32,
    failed: u32,
}

impl Checks {
    fn assert(&mut self, ok: bool, what: &str, detail: String) {
        let mark = if ok { "PASS" } else { "FAIL" };
        if self.check {
            println!("[{mark}] {what}: {detail}");
        } else {
            println!("  {} {what}: {detail}", if ok { "ok " } else { "!! " });
        }
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// A workload's server: mTLS with its SVID, accepting only `allowed`, answering one line.
struct Server {
    cluster: &'static str,
    service: &'static str,
    port: u16,
    /// The one client identity accepted, and its trust domain's bundle.
    allowed: SpiffeId,
    client_bundle: TrustBundle,
}

impl Server {
    /// Starts in the cluster's network with an SVID from the cluster's CA; `stop` makes it
    /// refuse new connections (a workload going down).
    async fn start(
        self,
        layout: &Layout,
        ca: &CertificateAuthority,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<(tokio::task::JoinHandle<()>, Arc<SvidResolver>)> {
        let id = SpiffeId::istio_workload(ca.trust_domain(), "shop", self.service)?;
        let svid = ca.issue_svid(&id, &AnyWorkload, time::Duration::hours(1))?;
        let mut set = BundleSet::new();
        set.insert(self.client_bundle.clone())?;
        let resolver = SvidResolver::with(&svid)?;
        let cfg = trust::tls::server_config(
            resolver.clone(),
            SpiffeVerifier::new(TrustStore::new(set), Authorizer::id(self.allowed.clone())),
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let site = layout.cluster(self.cluster)?;
        let addr = site.addr.clone();
        let (cluster, service, port) = (self.cluster, self.service, self.port);
        let task = site
            .rt
            .run(async move {
                let listener = TcpListener::bind((addr.as_str(), port))
                    .await
                    .with_context(|| {
                        format!("cannot listen on {addr}:{port} for {cluster}'s {service}")
                    })?;
                Ok::<_, anyhow::Error>(tokio::spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        tokio::spawn(answer(acceptor.clone(), tcp, move |req| {
                            format!("{service} in {cluster} answered {req}")
                        }));
                    }
                }))
            })
            .await??;
        Ok((task, resolver))
    }
}

/// `cluster`'s payment server, accepting eu's order.
async fn start_payment(
    layout: &Layout,
    cluster: &'static str,
    ca: &CertificateAuthority,
    eu_bundle: TrustBundle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (task, _) = Server {
        cluster,
        service: "payment",
        port: PAYMENT_PORT,
        allowed: SpiffeId::istio_workload(&TrustDomain::new("eu.mesh")?, "shop", "order")?,
        client_bundle: eu_bundle,
    }
    .start(layout, ca, stop)
    .await?;
    Ok(task)
}

/// Reads one request over (m)TLS and answers it with `reply(request)`. A connection that does
/// not complete the handshake (a TCP probe) is dropped.
async fn answer(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    reply: impl FnOnce(&str) -> String,
) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut buf = [0u8; 64];
    if let Ok(n) = tls.read(&mut buf).await {
        let r = reply(String::from_utf8_lossy(&buf[..n]).trim());
        let _ = tls.write_all(r.as_bytes()).await;
        let _ = tls.shutdown().await;
    }
}

fn diff(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0)))
        .collect()
}

/// The SPIFFE bundle map an agent writes for its proxies (`<state>/xds/spiffe-bundle-map.json`),
/// as bundles kept apart per trust domain: a server is verified against the bundle of its own
/// trust domain only.
fn bundle_map_file(path: &Path) -> TrustStore {
    let mut set = BundleSet::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Before the agent wrote its first map the store is empty: every server is refused.
    for b in trust::bundle::parse_bundle_map(&text, &path.display().to_string()).unwrap_or_default()
    {
        let _ = set.insert(b);
    }
    TrustStore::new(set)
}

/// A workload's client of `host:port`: every 20 ms, following the table its cluster's agent
/// pushes over xDS, through the gateways the table names, verifying each server (one of
/// `expect`) against the bundle of its own trust domain as the agent received it through the
/// federation (the bundle map the agent writes for proxies, under `state`).
fn mesh_client(
    host: &str,
    port: u16,
    state: &Path,
    svid: trust::Svid,
    expect: Vec<SpiffeId>,
) -> Target {
    let roots = state.join("xds").join("spiffe-bundle-map.json");
    Target {
        cluster: format!("outbound|{port}||{host}"),
        sni: format!("outbound_.{port}_._.{host}"),
        svid,
        roots: Arc::new(move || bundle_map_file(&roots)),
        expect: Authorizer::Ids(expect),
        label: Arc::new(|td: &TrustDomain| td.as_str().trim_end_matches(".mesh").to_string()),
        interval: Duration::from_millis(20),
        attempts: 2,
        timeout: Duration::from_millis(500),
    }
}

/// A workload's proxy: an xDS client of its cluster's agent, started in the cluster's network.
async fn proxy_of(
    layout: &Layout,
    cluster: &str,
    workload: &str,
    zone: &str,
) -> anyhow::Result<meshfed_xds::client::AdsClient> {
    let addr = layout.addr(cluster);
    let region = zone.rsplit_once('-').map(|(r, _)| r).unwrap_or(zone);
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: format!("sidecar~{addr}~{workload}.shop~shop.svc.cluster.local"),
        user_agent_name: "meshfed-demo".into(),
        locality: Some(envoy_types::pb::envoy::config::core::v3::Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    };
    layout
        .cluster(cluster)?
        .rt
        .run(async move {
            meshfed_xds::client::AdsClient::start(format!("http://{addr}:15010"), node)
        })
        .await
}

/// payment's routes as eu's xDS serves them to a proxyless client: `header=value -> cluster`
/// per route, `*` for a route matching every call.
async fn subset_routes(layout: &Layout) -> anyhow::Result<Vec<String>> {
    use envoy_types::pb::envoy::config::route::v3 as route;
    let addr = layout.addr("eu");
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: format!("sidecar~{addr}~routes.shop~shop.svc.cluster.local"),
        user_agent_name: "meshfed-demo".into(),
        ..Default::default()
    };
    let name = format!("payment.shop.svc.cluster.local:{PAYMENT_PORT}");
    let found = layout
        .cluster("eu")?
        .rt
        .run(async move {
            meshfed_xds::client::fetch_once(
                &format!("http://{addr}:15010"),
                &node,
                meshfed_xds::ROUTE_TYPE,
                &[name],
                Duration::from_secs(10),
            )
            .await
        })
        .await??;
    let any = found.first().context("no route configuration")?;
    let rc = <route::RouteConfiguration as prost::Message>::decode(any.value.as_slice())?;
    let mut out = Vec::new();
    for r in rc.virtual_hosts.iter().flat_map(|v| v.routes.iter()) {
        let when: Vec<String> = r
            .r#match
            .iter()
            .flat_map(|m| m.headers.iter())
            .map(|h| match &h.header_match_specifier {
                Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(m)) => match &m
                    .match_pattern
                {
                    Some(envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(v)) => {
                        format!("{}={v}", h.name)
                    }
                    other => format!("{}~{other:?}", h.name),
                },
                other => format!("{}?{other:?}", h.name),
            })
            .collect();
        let to = match &r.action {
            Some(route::route::Action::Route(a)) => match &a.cluster_specifier {
                Some(route::route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        };
        let when = if when.is_empty() {
            "*".to_string()
        } else {
            when.join(",")
        };
        out.push(format!("{when} -> {to}"));
    }
    Ok(out)
}

/// Whose gateway an address is.
fn gateway_owner(layout: &Layout, addr: &str) -> Option<&'static str> {
    CLUSTERS
        .iter()
        .map(|c| c.name)
        .find(|c| format!("{}:15443", layout.addr(c)) == addr)
}

/// The payment table as eu's agent pushed it: one line per priority.
fn describe_table(layout: &Layout, tables: &meshfed_xds::client::Tables) -> Vec<String> {
    let Some(t) = tables.get(PAYMENT_CLUSTER) else {
        return vec!["(no table yet)".into()];
    };
    let mut by_prio: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (p, addr, healthy) in meshfed_xds::client::endpoints(t) {
        let who = gateway_owner(layout, &addr)
            .map(|c| format!("{c} gateway"))
            .unwrap_or_else(|| "workload".into());
        by_prio.entry(p).or_default().push(format!(
            "{addr} ({who}{})",
            if healthy { "" } else { ", unhealthy" }
        ));
    }
    by_prio
        .into_iter()
        .map(|(p, v)| format!("P{p}: {}", v.join(", ")))
        .collect()
}

/// The cluster whose gateway is at priority 0 of the payment table.
fn p0_cluster(layout: &Layout, tables: &meshfed_xds::client::Tables) -> Option<&'static str> {
    let t = tables.get(PAYMENT_CLUSTER)?;
    let eps = meshfed_xds::client::endpoints(t);
    let (_, addr, _) = eps.iter().find(|e| e.0 == 0)?;
    gateway_owner(layout, addr)
}

async fn agent_report(admin: &str) -> Option<AgentReport> {
    let v = meshfed_net::admin::fetch_status(admin).await.ok()?;
    serde_json::from_value(v).ok()
}

async fn federation_report(admin: &str) -> anyhow::Result<FederationReport> {
    let v = meshfed_net::admin::fetch_status(admin).await?;
    Ok(serde_json::from_value(v)?)
}

/// Polls an agent's `/status` until `f` holds; the last report seen.
async fn wait_agent(
    admin: &str,
    timeout: Duration,
    f: impl Fn(&AgentReport) -> bool,
) -> (bool, Option<AgentReport>) {
    let end = Instant::now() + timeout;
    loop {
        let r = agent_report(admin).await;
        if r.as_ref().is_some_and(&f) {
            return (true, r);
        }
        if Instant::now() > end {
            return (false, r);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lease_of(r: &AgentReport, peer: &str) -> Option<String> {
    r.peers
        .iter()
        .find(|p| p.cluster == peer)
        .map(|p| p.lease.clone())
}

fn endpoints_of(r: &AgentReport, service: &str, cluster: &str) -> u64 {
    r.endpoints
        .get(service)
        .and_then(|m| m.get(cluster))
        .copied()
        .unwrap_or(0)
}

/// One Prometheus sample (`name{labels}` as exposed) from an admin endpoint's `/metrics`.
async fn metric(admin: &str, series: &str) -> Option<f64> {
    let text = meshfed_net::admin::fetch_text(admin, "/metrics")
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A cluster's processes and addresses.
struct ClusterRun {
    admin: String,
    agent: Proc,
    gateway: Option<Proc>,
}

fn agent_args(dir: &Path, addr: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "agent",
        "--state-dir",
        &dir.display().to_string(),
        "--registry",
        &dir.join("registry.yaml").display().to_string(),
        "--admin",
        &format!("{addr}:15014"),
        "--registry-poll",
        "200ms",
        "--xds-plaintext",
        &format!("{addr}:15010"),
        "--xds-mtls",
        &format!("{addr}:15012"),
        "--vm-api",
        &format!("{addr}:15018"),
        "--vm-grace",
        "3s",
        "--dns",
        &format!("{addr}:15053"),
        "--dns-upstream",
        "127.0.0.1:9",
        "--vip-range-v6",
        "off",
        "--bundle-endpoint",
        &format!("{addr}:15019"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend([
        "--policy".into(),
        dir.join("policies.yaml").display().to_string(),
    ]);
    v
}

/// `td`'s bundle as the agent under `dir` holds it (its bundle map) and as the bundle endpoint
/// at `addr:15019` serves it (authenticated with the held one): their `keys`, and the URL.
async fn fetch_peer_bundle(
    dir: &Path,
    td: &str,
    addr: &str,
) -> anyhow::Result<(serde_json::Value, serde_json::Value, String)> {
    let path = dir.join("xds").join("spiffe-bundle-map.json");
    let domain = TrustDomain::new(td)?;
    let held = trust::bundle::parse_bundle_map(
        &std::fs::read_to_string(&path)?,
        &path.display().to_string(),
    )?
    .into_iter()
    .find(|b| b.trust_domain == domain)
    .with_context(|| format!("{}: no bundle of {td}", path.display()))?;
    let held_keys: serde_json::Value = serde_json::from_str(&held.to_json()?)?;
    let mut set = BundleSet::new();
    set.insert(held)?;
    let endpoint = SpiffeId::new(&format!("spiffe://{td}/ns/meshfed-system/sa/meshfed-agent"))?;
    let tls = trust::tls::client_config(
        trust::tls::SvidResolver::new(),
        trust::tls::SpiffeVerifier::new(TrustStore::new(set), Authorizer::id(endpoint)),
    )?;
    let url = format!("https://{addr}:15019/");
    let body = meshfed_net::bundle_endpoint::fetch(&url, tls).await?;
    let fetched = TrustBundle::from_json(domain, &body, &url)?;
    let fetched: serde_json::Value = serde_json::from_str(&fetched.to_json()?)?;
    Ok((held_keys["keys"].clone(), fetched["keys"].clone(), url))
}

/// eu's SDS `ROOTCA` (what its Envoy proxies validate peers with), read over SDS from the
/// agent's xDS port as an Envoy `sds-grpc` cluster does: per trust domain, whether its roots
/// are exactly the ones the agent holds for that domain (`<state>/xds/roots/<td>.pem`).
async fn sds_root_domains(dir: &Path, addr: &str) -> anyhow::Result<Vec<(String, bool)>> {
    use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, Node};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use prost::Message;
    let mut c = SecretDiscoveryServiceClient::connect(format!("http://{addr}:15010")).await?;
    let r = c
        .fetch_secrets(DiscoveryRequest {
            node: Some(Node {
                id: "sidecar~10.0.0.1~demo.shop~shop.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: meshfed_xds::SECRET_TYPE.into(),
            resource_names: vec![meshfed_xds::secrets::ROOT_SECRET.into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    let any = r.resources.first().context("no ROOTCA secret")?;
    let secret = tls::Secret::decode(any.value.as_slice())?;
    let Some(tls::secret::Type::ValidationContext(vc)) = secret.r#type else {
        anyhow::bail!("ROOTCA is not a validation context");
    };
    let cfg = vc.custom_validator_config.context("no custom validator")?;
    anyhow::ensure!(
        cfg.name == meshfed_xds::secrets::SPIFFE_VALIDATOR,
        "validator {}",
        cfg.name
    );
    let v = tls::SpiffeCertValidatorConfig::decode(
        cfg.typed_config
            .context("no typed config")?
            .value
            .as_slice(),
    )?;
    let mut out = Vec::new();
    for t in v.trust_domains {
        let pem = match t.trust_bundle.and_then(|b| b.specifier) {
            Some(Specifier::InlineString(p)) => p,
            _ => String::new(),
        };
        let held = std::fs::read_to_string(
            dir.join("xds")
                .join("roots")
                .join(format!("{}.pem", t.name)),
        )
        .unwrap_or_default();
        out.push((t.name, !pem.is_empty() && pem == held));
    }
    Ok(out)
}

/// Opens a TLS connection to a gateway with `sni` and returns how the handshake ended.
async fn gateway_answer(gateway: &str, sni: &str) -> String {
    let cfg = match trust::tls::client_config(
        trust::tls::SvidResolver::new(),
        trust::tls::SpiffeVerifier::new(
            TrustStore::new(BundleSet::new()),
            Authorizer::trust_domain(
                TrustDomain::new("eu.mesh").unwrap_or_else(|_| unreachable!()),
            ),
        ),
    ) {
        Ok(mut c) => {
            // Istio's mTLS ALPN, as a sidecar sends it (the gateway requires it).
            c.alpn_protocols = vec![b"istio".to_vec()];
            c
        }
        Err(e) => return format!("no client config: {e}"),
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(sni.to_string()) else {
        return format!("{sni} is not a server name");
    };
    let tcp = match tokio::net::TcpStream::connect(gateway).await {
        Ok(t) => t,
        Err(e) => return format!("connect: {e}"),
    };
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(_)) => "handshake completed".into(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer in 5 s".into(),
    }
}

/// Who answers a TLS connection to `gateway` with `sni` and Istio's ALPN: the server's SPIFFE
/// ID, verified against `bundle` (the workload's own trust domain's bundle), or why not.
async fn gateway_peer(gateway: &str, sni: &str, bundle: TrustBundle) -> Result<String, String> {
    let mut set = BundleSet::new();
    set.insert(bundle).map_err(|e| e.to_string())?;
    let mut cfg = trust::tls::client_config(
        SvidResolver::new(),
        SpiffeVerifier::new(TrustStore::new(set), Authorizer::Any),
    )
    .map_err(|e| format!("no client config: {e}"))?;
    cfg.alpn_protocols = vec![b"istio".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(sni.to_string())
        .map_err(|_| format!("{sni} is not a server name"))?;
    let tcp = tokio::net::TcpStream::connect(gateway)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| "no answer in 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    trust::tls::peer_id(tls.get_ref().1.peer_certificates())
        .map(|id| id.to_string())
        .ok_or_else(|| "the server presented no SPIFFE ID".into())
}

/// The federation bundle a joined cluster holds (`identity/federation-bundle.json`) and
/// whether its cluster certificate chains to `root` alone.
fn federation_view(
    cluster_dir: &Path,
    root: Option<&rustls_pki_types::CertificateDer<'static>>,
) -> anyhow::Result<(TrustBundle, bool)> {
    let id = meshfed_identity::cluster::ClusterIdentity::load(cluster_dir)?;
    let b = id.federation_bundle.clone();
    let chains = match root {
        Some(r) => {
            let mut one = b.clone();
            one.x509_authorities = vec![r.clone()];
            let mut set = BundleSet::new();
            set.insert(one)?;
            trust::tls::SpiffeVerifier::new(
                TrustStore::new(set),
                Authorizer::id(id.svid.id.clone()),
            )
            .verify(
                &id.svid.chain[0],
                &id.svid.chain[1..],
                rustls_pki_types::UnixTime::now(),
                trust::tls::PeerRole::Client,
            )
            .is_ok()
        }
        None => false,
    };
    Ok((b, chains))
}

fn calls_to(m: &BTreeMap<String, u64>, cluster: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.split(' ').next() == Some(cluster))
        .map(|(_, v)| *v)
        .sum()
}

fn fmt_counts(m: &BTreeMap<String, u64>, failed: u64) -> String {
    let mut parts: Vec<String> = m
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.push(format!("failed={failed}"));
    parts.join(" ")
}

/// A loopback port nothing listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<bool> {
    let tmp;
    let root: PathBuf = match &opts.state_dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "{} is not empty; give the demo an empty or new directory",
                    d.display()
                );
            }
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let logs = root.join("logs");
    println!(
        "meshfed demo: a federation of three clusters on this machine (state in {}, process logs in {})",
        root.display(),
        logs.display()
    );
    let layout = Layout::new(opts.network)?;
    println!("mode: {}\n", layout.description);
    let mut checks = Checks {
        check: opts.check,
        passed: 0,
        failed: 0,
    };

    // The federator.
    let fed_dir = root.join("federator");
    let (fed_grpc, fed_admin) = if layout.netns() {
        (
            format!("{}:15100", layout.fed.addr),
            format!("{}:15101", layout.fed.addr),
        )
    } else {
        (
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        )
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Replicas on etcd when it is installed; one federator on sled otherwise.
    let etcd = if meshfed_store::etcd::local::installed() {
        let prefix = layout
            .fed
            .ns()
            .map(|ns| s(&["ip", "netns", "exec", ns]))
            .unwrap_or_default();
        Some(
            meshfed_store::etcd::local::LocalEtcd::start_at(&layout.fed.addr, prefix)
                .context("cannot start the demo's etcd")?,
        )
    } else {
        println!(
            "etcd is not installed (apt-get install etcd-server): one federator, its state in sled"
        );
        None
    };
    let etcd_endpoints = etcd.as_ref().map(|e| e.endpoints().join(","));
    let store_args = |v: &mut Vec<String>| {
        if let Some(e) = &etcd_endpoints {
            v.extend(s(&["--store", "etcd", "--etcd-endpoints", e]));
        }
    };
    let fed_args = |dir: &Path, grpc: &str, admin: &str| {
        let mut v = s(&[
            "federator",
            "--state-dir",
            &dir.display().to_string(),
            "--listen",
            grpc,
            "--admin",
            admin,
            "--lease-ttl",
            &format!("{}s", LEASE_TTL.as_secs()),
        ]);
        store_args(&mut v);
        v
    };
    let mut federator = Proc::spawn(
        "federator",
        layout.fed.ns(),
        &fed_args(&fed_dir, &fed_grpc, &fed_admin),
        &logs,
    )?;
    procs::wait_serving(&mut federator, &fed_admin, Duration::from_secs(20)).await?;
    let fr = federation_report(&fed_admin).await?;
    println!(
        "federator   pid {:<7} gRPC {fed_grpc}  admin http://{fed_admin}/status  trust domain {}",
        federator.pid().unwrap_or_default(),
        fr.federation_trust_domain
    );
    // The second replica, on the same etcd.
    let mut replica = match &etcd {
        None => None,
        Some(e) => {
            let (grpc, admin) = if layout.netns() {
                (
                    format!("{}:15102", layout.fed.addr),
                    format!("{}:15103", layout.fed.addr),
                )
            } else {
                (
                    format!("127.0.0.1:{}", free_port()?),
                    format!("127.0.0.1:{}", free_port()?),
                )
            };
            let mut p = Proc::spawn(
                "federator-b",
                layout.fed.ns(),
                &fed_args(&root.join("federator-b"), &grpc, &admin),
                &logs,
            )?;
            procs::wait_serving(&mut p, &admin, Duration::from_secs(20)).await?;
            println!(
                "replica     pid {:<7} gRPC {grpc}  admin http://{admin}/status  (both on etcd {})",
                p.pid().unwrap_or_default(),
                e.endpoints().join(",")
            );
            Some((p, admin))
        }
    };
    println!(
        "dashboard   http://{fed_admin}/ui/  (live: open it in a browser while the demo runs)"
    );

    // The clusters: one-time token, join, agent, gateway.
    let mut clusters: BTreeMap<&str, ClusterRun> = BTreeMap::new();
    let mut cas: BTreeMap<&str, CertificateAuthority> = BTreeMap::new();
    for c in &CLUSTERS {
        let site = layout.cluster(c.name)?;
        let addr = site.addr.clone();
        let home = match &etcd_endpoints {
            Some(e) => s(&["--etcd-endpoints", e]),
            None => s(&["--state-dir", &fed_dir.display().to_string()]),
        };
        let mut token_args = s(&["federator", "token", "create", "--cluster", c.name]);
        token_args.extend(home);
        let token = procs::run_once(None, &token_args).await?;
        let dir = root.join(c.name);
        procs::run_once(
            site.ns(),
            &s(&[
                "join",
                "--token",
                token.trim(),
                "--state-dir",
                &dir.display().to_string(),
                "--cluster",
                c.name,
                "--network",
                &format!("net-{}", c.name),
                "--trust-domain",
                &format!("{}.mesh", c.name),
                "--locality",
                &format!("{}/{}-b", c.region, c.region),
                "--gateway",
                &format!("{addr}:15443"),
            ]),
        )
        .await
        .with_context(|| format!("joining {}", c.name))?;
        std::fs::write(
            dir.join("registry.yaml"),
            registry(c, &addr, &layout.vm.addr),
        )?;
        std::fs::write(
            dir.join("policies.yaml"),
            if c.name == "eu" {
                EU_POLICY
            } else {
                EXPORTER_POLICY
            },
        )?;
        let admin = format!("{addr}:15014");
        let mut agent = Proc::spawn(
            &format!("agent-{}", c.name),
            site.ns(),
            &agent_args(&dir, &addr),
            &logs,
        )?;
        procs::wait_serving(&mut agent, &admin, Duration::from_secs(20)).await?;
        println!(
            "cluster {:<5} pid {:<7} trust domain {:<10} region {:<13} workloads on {addr}  agent admin http://{admin}/status  xDS {addr}:15010",
            c.name,
            agent.pid().unwrap_or_default(),
            format!("{}.mesh", c.name),
            c.region,
        );
        cas.insert(c.name, CertificateAuthority::load(&dir.join("ca"))?);
        clusters.insert(
            c.name,
            ClusterRun {
                admin,
                agent,
                gateway: None,
            },
        );
    }
    // East-west gateways, fed by their agents over xDS; eu's also exposes its agent's VM API
    // and mTLS xDS port (as Istio's expose-istiod does) for the VM.
    for c in &CLUSTERS {
        let site = layout.cluster(c.name)?;
        let addr = &site.addr;
        let mut args = s(&[
            "gateway",
            "--listen",
            &format!("{addr}:15443"),
            "--xds",
            &format!("{addr}:15010"),
            "--admin",
            &format!("{addr}:15021"),
            "--drain-timeout",
            "1s",
            "--cluster",
            c.name,
        ]);
        if c.name == "eu" {
            args.extend(s(&[
                "--expose",
                &format!("{}={addr}:15018", meshfed_vm_agent::config::VM_API_SNI),
                "--expose",
                &format!("{}={addr}:15012", meshfed_vm_agent::config::XDS_SNI),
            ]));
        }
        let mut g = Proc::spawn(&format!("gateway-{}", c.name), site.ns(), &args, &logs)?;
        procs::wait_serving(&mut g, &format!("{addr}:15021"), Duration::from_secs(20)).await?;
        println!(
            "gateway {:<5} pid {:<7} {addr}:15443 (SNI passthrough, routes from its agent over xDS)  admin http://{addr}:15021/metrics",
            c.name,
            g.pid().unwrap_or_default()
        );
        if let Some(r) = clusters.get_mut(c.name) {
            r.gateway = Some(g);
        }
    }
    let admin_of = |c: &str| clusters.get(c).map(|r| r.admin.clone()).unwrap_or_default();
    let (east_admin, west_admin, eu_admin) = (admin_of("east"), admin_of("west"), admin_of("eu"));
    let joined = federation_report(&fed_admin)
        .await
        .map(|r| r.clusters.len())
        .unwrap_or(0);
    checks.assert(
        joined == 3,
        "joins",
        format!("{joined} clusters joined with one-time tokens (east, west, eu), each its own CA and trust domain"),
    );

    // Imports and bundles reach eu through the federation.
    let (got, r) = wait_agent(&eu_admin, Duration::from_secs(20), |r| {
        endpoints_of(r, "shop/payment", "east") > 0
            && endpoints_of(r, "shop/payment", "west") > 0
            && ["east", "west"]
                .iter()
                .all(|p| r.peers.iter().any(|x| x.cluster == *p && x.bundle))
    })
    .await;
    let r = r.unwrap_or_default();
    checks.assert(
        got,
        "imports",
        format!(
            "eu imports shop/payment from [{}]",
            r.endpoints
                .get("shop/payment")
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        ),
    );
    checks.assert(
        got,
        "bundles",
        format!(
            "eu holds the trust bundles of [{}] (never merged)",
            r.peers
                .iter()
                .filter(|p| p.bundle)
                .map(|p| p.trust_domain.clone())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let inv_at_eu = r.endpoints.contains_key("shop/inventory");
    let (west_inv, _) = wait_agent(&west_admin, Duration::from_secs(10), |r| {
        endpoints_of(r, "shop/inventory", "east") > 0
    })
    .await;
    checks.assert(
        west_inv && !inv_at_eu,
        "exportTo",
        "east's inventory (exportTo: [west]) reaches west and not eu".into(),
    );

    // Replicas: the second is killed; the clusters it served move to the first, which has
    // every cluster's messages; the second comes back and is ready.
    if let Some((b, b_admin)) = replica.as_mut() {
        b.kill();
        let t0 = Instant::now();
        let mut moved = false;
        while t0.elapsed() < Duration::from_secs(30) && !moved {
            let mut all = true;
            for c in ["east", "west", "eu"] {
                let series = format!(
                    "meshfed_federation_messages_total{{cluster=\"{c}\",kind=\"heartbeat\"}}"
                );
                let before = metric(&fed_admin, &series).await.unwrap_or(0.0);
                let connected = agent_report(&admin_of(c))
                    .await
                    .is_some_and(|r| r.connected);
                all &= connected && before > 0.0;
            }
            moved = all;
            if !moved {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let moved_in = t0.elapsed().as_secs_f64();
        b.start()?;
        let back = procs::wait_serving(b, b_admin, Duration::from_secs(20))
            .await
            .is_ok();
        let (still, _) = wait_agent(&eu_admin, Duration::from_secs(10), |r| {
            endpoints_of(r, "shop/payment", "east") > 0
                && endpoints_of(r, "shop/payment", "west") > 0
        })
        .await;
        checks.assert(
            moved && back && still,
            "federator replicas",
            format!(
                "two federators on etcd; one killed with -9: east, west and eu heartbeat on the other within {moved_in:.1}s and eu still imports payment from both; the killed one starts again and serves"
            ),
        );
    }

    // The VM: joins eu through eu's gateway with a bootstrap package.
    let vm_addr = layout.vm.addr.clone();
    let eu_addr = layout.addr("eu");
    println!("\nVM: stock runs on a VM ({vm_addr}) that joins eu through eu's east-west gateway with `meshfed vm bootstrap`'s package");
    let eu_dir = root.join("eu");
    let vm_config = vm::package(&root, &eu_dir, &format!("{eu_addr}:15443"), &vm_addr)?;
    let mut vm_agent = Proc::spawn(
        "vm-agent",
        layout.vm.ns(),
        &s(&["vm", "agent", "--config", &vm_config.display().to_string()]),
        &logs,
    )?;
    let vm_admin = format!("{vm_addr}:15020");
    procs::wait_serving(&mut vm_agent, &vm_admin, Duration::from_secs(20)).await?;
    let entry_name = format!("stock-vm-{vm_addr}");
    let (registered, _) = wait_agent(&eu_admin, Duration::from_secs(10), |r| {
        r.workload_entries
            .iter()
            .any(|e| e.name == entry_name && e.connected)
    })
    .await;
    let vm_status = meshfed_net::admin::fetch_status(&vm_admin)
        .await
        .unwrap_or_default();
    checks.assert(
        registered,
        "VM join",
        format!(
            "VM {} (pid {}) joined with its one-time token through eu's gateway (SNI {}), got {} and a durable credential; WorkloadEntry {entry_name} auto-registered",
            vm_status["vm_id"].as_str().unwrap_or("?"),
            vm_agent.pid().unwrap_or_default(),
            meshfed_vm_agent::config::VM_API_SNI,
            vm_status["svid"].as_str().unwrap_or("?"),
        ),
    );
    let cert_dir = root.join("vm/etc/meshfed/certs");
    let stock = layout
        .vm
        .rt
        .run(vm::stock_server(cert_dir, vm_addr.clone()))
        .await??;
    let (probed, _) = wait_agent(&eu_admin, Duration::from_secs(10), |r| {
        endpoints_of(r, "shop/stock", "eu") == 1
            && r.workload_entries
                .iter()
                .any(|e| e.name == entry_name && e.healthy == Some(true))
    })
    .await;
    let (east_sees_vm, _) = wait_agent(&east_admin, Duration::from_secs(10), |r| {
        endpoints_of(r, "shop/stock", "eu") == 1
    })
    .await;
    checks.assert(
        probed && east_sees_vm,
        "VM health",
        "the group's probe (tcpSocket) passed: the VM became stock's endpoint in eu, and east imports it".into(),
    );
    let eu_ca = cas.get("eu").context("eu ca")?;
    let order_id = SpiffeId::istio_workload(eu_ca.trust_domain(), "shop", "order")?;
    // order's identity comes from eu's CA API (Istio's CreateCertificate on the agent's mTLS
    // xDS port), as a pod's does with `meshfed workload init`: here bought once with a
    // one-time workload token (a pod sends its service-account token; the demo runs no
    // Kubernetes), then renewed with the certificate itself.
    let order_dir = root.join("order");
    std::fs::create_dir_all(&order_dir)?;
    let order_token = order_dir.join("token");
    procs::run_once(
        None,
        &s(&[
            "workload",
            "token",
            "--state-dir",
            &eu_dir.display().to_string(),
            "--namespace",
            "shop",
            "--service-account",
            "order",
            "--out",
            &order_token.display().to_string(),
        ]),
    )
    .await?;
    let eu_ns = layout.cluster("eu")?.ns();
    let order_certs = order_dir.join("certs");
    let init = |out: &std::path::Path| {
        s(&[
            "workload",
            "init",
            "--agent",
            &format!("{eu_addr}:15012"),
            "--trust-domain",
            "eu.mesh",
            "--namespace",
            "shop",
            "--service-account",
            "order",
            "--token-file",
            &order_token.display().to_string(),
            "--root-cert",
            &eu_dir.join("ca/root-cert.pem").display().to_string(),
            "--out",
            &out.display().to_string(),
            "--xds-listen",
            &format!("{eu_addr}:15010"),
            "--timeout",
            "20s",
        ])
    };
    let said = procs::run_once(eu_ns, &init(&order_certs)).await?;
    let (order_svid, _) = trust::Svid::load(&order_certs)?;
    // The token was spent: a second use is refused.
    let spent = procs::run_once(eu_ns, &init(&order_dir.join("again"))).await;
    checks.assert(
        order_svid.id == order_id
            && spent
                .as_ref()
                .is_err_and(|e| e.to_string().contains("already used")),
        "workload identity",
        format!(
            "order obtained {} from eu's CA API with a one-time token ({}); the token was refused a second time: {}",
            order_svid.id,
            said.trim(),
            match &spent {
                Ok(_) => "not refused".to_string(),
                Err(e) => {
                    let e = format!("{e:#}");
                    e.rsplit("error: ").next().unwrap_or_default().trim().to_string()
                }
            }
        ),
    );
    let order_vm_svid = order_svid.clone();
    let mut eu_set = BundleSet::new();
    eu_set.insert(eu_ca.bundle())?;
    let eu_rt = &layout.cluster("eu")?.rt;
    let vm_dns = format!("{vm_addr}:15053");
    let eu_dns = format!("{eu_addr}:15053");
    let mut dns_ok = false;
    let mut dns_detail = String::new();
    for _ in 0..20 {
        let name = "payment.shop.svc.clusterset.local.";
        let on_vm = eu_rt.run(vm::resolve(vm_dns.clone(), name)).await?;
        let on_eu = eu_rt.run(vm::resolve(eu_dns.clone(), name)).await?;
        if let (Ok(a), Ok(b)) = (&on_vm, &on_eu) {
            if !a.is_empty() && a == b {
                dns_ok = true;
                dns_detail = format!(
                    "payment.shop.svc.clusterset.local -> {} on the VM and in eu (imported only: no placeholder Service)",
                    a[0]
                );
                break;
            }
        }
        dns_detail = format!("VM {on_vm:?}, eu {on_eu:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    checks.assert(dns_ok, "VM DNS", dns_detail);

    // The headless db: its endpoint by hostname in eu and on eu's VM; east, on another
    // network, cannot route to the pod address and does not answer it.
    let db0 = "db-0.eu.db.shop.svc.clusterset.local.";
    let east_dns = format!("{}:15053", layout.addr("east"));
    let east_rt = &layout.cluster("east")?.rt;
    let mut headless_ok = false;
    let mut headless_detail = String::new();
    for _ in 0..20 {
        let in_eu = eu_rt.run(vm::resolve(eu_dns.clone(), db0)).await?;
        let on_vm = eu_rt.run(vm::resolve(vm_dns.clone(), db0)).await?;
        let in_east = east_rt.run(vm::resolve(east_dns.clone(), db0)).await?;
        let want: Result<std::net::IpAddr, _> = eu_addr.parse();
        if let (Ok(a), Ok(b), Ok(c), Ok(w)) = (&in_eu, &on_vm, &in_east, &want) {
            if a == &[*w] && b == a && c.is_empty() {
                headless_ok = true;
                headless_detail = format!(
                    "{} -> {w} in eu and on its VM (no VIP); east, on another network, does not answer it",
                    db0.trim_end_matches('.')
                );
                break;
            }
        }
        headless_detail = format!("eu {in_eu:?}, VM {on_vm:?}, east {in_east:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    checks.assert(headless_ok, "headless DNS", headless_detail);

    // Workloads: payment in east and west, order in eu.
    let stop_all = Arc::new(AtomicBool::new(false));
    let mut servers = BTreeMap::new();
    let eu_bundle = eu_ca.bundle();
    for c in CLUSTERS.iter().filter(|c| c.runs_payment) {
        let ca = cas.get(c.name).context("ca")?;
        let stop = Arc::new(AtomicBool::new(false));
        let task = start_payment(&layout, c.name, ca, eu_bundle.clone(), stop.clone()).await?;
        servers.insert(c.name, (task, stop));
    }
    let counters = Arc::new(Stats::default());
    // order's proxy: an xDS client of eu's agent, in europe-west1.
    let mut order_proxy = proxy_of(&layout, "eu", "order", "europe-west1-b").await?;
    let got_table = order_proxy
        .wait_for(Duration::from_secs(10), |t| {
            p0_cluster(&layout, t) == Some("west")
        })
        .await;
    let tables = order_proxy.tables.clone();
    // order finds stock through its xDS table: the VM's address, on the port the group's
    // template maps the service port to.
    let mut stock_at = String::new();
    order_proxy
        .wait_for(Duration::from_secs(10), |t| {
            if let Some(c) = t.get(vm::STOCK_CLUSTER) {
                if let Some((_, a, _)) = meshfed_xds::client::endpoints(c).into_iter().next() {
                    stock_at = a;
                }
            }
            !stock_at.is_empty()
        })
        .await;
    let reply = if stock_at.is_empty() {
        Err(anyhow::anyhow!(
            "no endpoint for stock in order's xDS table"
        ))
    } else {
        eu_rt
            .run(vm::call_stock(
                order_vm_svid,
                TrustStore::new(eu_set),
                stock_at.clone(),
            ))
            .await?
    };
    checks.assert(
        reply
            .as_ref()
            .is_ok_and(|r| r.contains("answered by the VM"))
            && stock_at == format!("{vm_addr}:{}", vm::STOCK_VM_PORT),
        "VM reachable",
        format!(
            "order called stock at {stock_at} as its xDS table says (service port {}, the group's template maps it to {}) over mTLS (server spiffe://eu.mesh/ns/shop/sa/stock): {}",
            vm::STOCK_PORT,
            vm::STOCK_VM_PORT,
            match &reply {
                Ok(r) => r.clone(),
                Err(e) => format!("{e:#}"),
            }
        ),
    );
    println!("\neu's failover policy for payment: failover europe-west1 -> us-west1, outlierDetection on; table pushed to order's proxy over xDS:");
    for l in describe_table(&layout, &tables.borrow()) {
        println!("  {l}");
    }
    checks.assert(
        got_table,
        "xDS table",
        "eu's agent pushed payment's table to order: P0 west's gateway, P1 east's (per the policy, split horizon)".into(),
    );
    let lg = eu_rt.spawn(meshfed_harness::loadgen::run(
        mesh_client(
            "payment.shop.svc.cluster.local",
            PAYMENT_PORT,
            &eu_dir,
            order_svid,
            ["east", "west"]
                .iter()
                .map(|c| {
                    SpiffeId::istio_workload(
                        &TrustDomain::new(&format!("{c}.mesh"))?,
                        "shop",
                        "payment",
                    )
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        tables.clone(),
        counters.clone(),
        stop_all.clone(),
    ));
    println!("\nworkloads: payment in east and west (spiffe://<cluster>.mesh/ns/shop/sa/payment), order in eu calling it every 20 ms over mTLS");
    println!("(each call goes to the east-west gateway its table names, with SNI outbound_.{PAYMENT_PORT}_._.payment.shop.svc.cluster.local; mTLS stays end to end)\n");

    let phase = |name: &str, secs: u64| {
        let name = name.to_string();
        let counters = counters.clone();
        async move {
            let (before, f0) = counters.snapshot();
            for _ in 0..secs {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (now, f) = counters.snapshot();
                println!(
                    "  [{name}] calls since phase start: {}",
                    fmt_counts(&diff(&before, &now), f - f0)
                );
            }
            let (after, f1) = counters.snapshot();
            (diff(&before, &after), f1 - f0)
        }
    };

    // inventory runs in east and is exported to west only: west's payment calls it, the
    // other way across the federation, through east's gateway.
    let east_ca = cas.get("east").context("east ca")?;
    let west_ca = cas.get("west").context("west ca")?;
    let west_payment = SpiffeId::istio_workload(west_ca.trust_domain(), "shop", "payment")?;
    let inventory_stop = Arc::new(AtomicBool::new(false));
    let (inventory, inventory_cert) = Server {
        cluster: "east",
        service: "inventory",
        port: INVENTORY_PORT,
        allowed: west_payment.clone(),
        client_bundle: west_ca.bundle(),
    }
    .start(&layout, east_ca, inventory_stop.clone())
    .await?;
    let mut west_proxy = proxy_of(&layout, "west", "payment", "us-west1-a").await?;
    let east_gw = format!("{}:15443", layout.addr("east"));
    let inv_table = west_proxy
        .wait_for(Duration::from_secs(10), |t| {
            t.get(INVENTORY_CLUSTER).is_some_and(|c| {
                meshfed_xds::client::endpoints(c)
                    .iter()
                    .any(|e| e.1 == east_gw)
            })
        })
        .await;
    let inv_stats = Arc::new(Stats::default());
    let inv_client_stop = Arc::new(AtomicBool::new(false));
    let inv_lg = layout
        .cluster("west")?
        .rt
        .spawn(meshfed_harness::loadgen::run(
            mesh_client(
                "inventory.shop.svc.cluster.local",
                INVENTORY_PORT,
                &root.join("west"),
                west_ca.issue_svid(&west_payment, &AnyWorkload, time::Duration::hours(1))?,
                vec![SpiffeId::istio_workload(
                    east_ca.trust_domain(),
                    "shop",
                    "inventory",
                )?],
            ),
            west_proxy.tables.clone(),
            inv_stats.clone(),
            inv_client_stop.clone(),
        ));

    println!("phase 1: both payment clusters healthy (west is priority 0 for eu); west's payment checks stock levels with inventory in east");
    // Meanwhile east's root rotates, make-before-break, while west calls east's inventory.
    let east_dir = root.join("east");
    let rot_t0 = Instant::now();
    let rotate = procs::run_once(
        None,
        &s(&[
            "ca",
            "rotate",
            "start",
            "--state-dir",
            &east_dir.display().to_string(),
            "--publish-lead",
            "1s",
        ]),
    )
    .await?;
    println!(
        "  meshfed ca rotate start (east): {}",
        rotate.lines().next().unwrap_or_default()
    );
    let (p1, f1) = phase("steady", 3).await;
    let east_seq = |r: &AgentReport| {
        r.peers
            .iter()
            .find(|p| p.cluster == "east")
            .and_then(|p| p.bundle_sequence)
    };
    let (held_eu, _) = wait_agent(&eu_admin, Duration::from_secs(10), |r| {
        east_seq(r) == Some(2)
    })
    .await;
    let west_admin = format!("{}:15014", layout.addr("west"));
    let (held_west, _) = wait_agent(&west_admin, Duration::from_secs(10), |r| {
        east_seq(r) == Some(2)
    })
    .await;
    let east_admin = format!("{}:15014", layout.addr("east"));
    let (signing, east_report) = wait_agent(&east_admin, Duration::from_secs(10), |r| {
        r.ca.as_ref().is_some_and(|c| {
            c.generations.iter().any(|g| g.state == "retiring")
                && c.generations.iter().any(|g| g.state == "active")
        })
    })
    .await;
    let signed_after = rot_t0.elapsed();
    // inventory renews onto the new root (recorded in east's CA directory, as `meshfed ca
    // issue` does), and west's calls keep succeeding with the new certificate.
    let new_cert = trust::ca::CaDir::new(east_dir.join("ca")).issue_svid(
        &SpiffeId::istio_workload(east_ca.trust_domain(), "shop", "inventory")?,
        &AnyWorkload,
        time::Duration::hours(1),
    );
    let renewed = match new_cert {
        Ok((svid, _)) => inventory_cert.install(&svid).is_ok(),
        Err(_) => false,
    };
    let before_renewal = inv_stats.snapshot();
    let more = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = inv_stats.snapshot();
            let n = |s: &(BTreeMap<String, u64>, u64)| s.0.values().sum::<u64>() + s.1;
            if n(&now) >= n(&before_renewal) + 20 {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    inv_client_stop.store(true, Ordering::Relaxed);
    let _ = inv_lg.await;
    let (inv, inv_failed) = inv_stats.snapshot();
    checks.assert(
        held_eu && held_west && signing && renewed && more && inv_failed == 0,
        "CA rotation",
        format!(
            "east published a second root (bundle sequence 2, held by eu and west), and found it signing {:.1}s after `meshfed ca rotate start` (it may sign once the 1 s publish lead has passed and every member holds it); inventory renewed onto it and west's calls to it went on: {} ok, {inv_failed} failed; {} generations at east (the old root stays until the last certificate it signed expires)",
            signed_after.as_secs_f64(),
            inv.values().sum::<u64>(),
            east_report.as_ref().and_then(|r| r.ca.as_ref()).map(|c| c.generations.len()).unwrap_or(0)
        ),
    );
    checks.assert(
        inv_table && calls_to(&inv, "east") > 10 && inv_failed == 0,
        "other direction",
        format!(
            "payment (west.mesh) called inventory in east.mesh (exportTo: [west]) through east's gateway {east_gw}, as west's table says: {}",
            fmt_counts(&inv, inv_failed)
        ),
    );
    inventory_stop.store(true, Ordering::Relaxed);
    inventory.abort();
    drop(west_proxy);
    checks.assert(
        calls_to(&p1, "west") > 10 && calls_to(&p1, "east") == 0 && f1 == 0,
        "cross-trust-domain mTLS",
        format!(
            "order (eu.mesh) called payment in west.mesh (priority 0) only: {}",
            fmt_counts(&p1, f1)
        ),
    );

    // SPIFFE federation without the federator: eu reads east's bundle from east's bundle
    // endpoint, authenticating it with the east bundle eu's agent already holds.
    let (ok, detail) = match fetch_peer_bundle(&eu_dir, "east.mesh", &layout.addr("east")).await {
        Ok((held, fetched, url)) => (
            held == fetched,
            format!(
                "eu fetched east.mesh's bundle from {url} (https_spiffe, endpoint spiffe://east.mesh/ns/meshfed-system/sa/meshfed-agent): {} root(s), the same as the bundle eu received through the federation",
                fetched.as_array().map(|k| k.len()).unwrap_or(0)
            ),
        ),
        Err(e) => (false, format!("{e:#}")),
    };
    checks.assert(ok, "bundle endpoint", detail);

    // The federation's own root rotates too: every member receives the new root before it
    // signs, then renews its cluster certificate onto it, without joining again.
    println!(
        "\nfederation root rotation: meshfed ca rotate start --ca <federator>/ca --publish-lead 1s"
    );
    let names = ["east", "west", "eu"];
    let before = federation_view(&root.join("eu"), None)?.0;
    let fed_t0 = Instant::now();
    procs::run_once(
        None,
        &s(&[
            "ca",
            "rotate",
            "start",
            "--ca",
            &fed_dir.join("ca").display().to_string(),
            "--publish-lead",
            "1s",
        ]),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut new_root = None;
    let mut moved = false;
    while Instant::now() < deadline {
        let views: Vec<(TrustBundle, bool)> = names
            .iter()
            .filter_map(|n| federation_view(&root.join(n), new_root.as_ref()).ok())
            .collect();
        if new_root.is_none() {
            new_root = views.first().and_then(|(b, _)| {
                b.x509_authorities
                    .iter()
                    .find(|r| !before.x509_authorities.contains(r))
                    .cloned()
            });
        }
        moved = views.len() == names.len()
            && views
                .iter()
                .all(|(b, chains)| b.sequence == Some(2) && *chains);
        if moved {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fed_ca = meshfed_net::admin::fetch_status(&fed_admin)
        .await
        .map(|v| v["federation_ca"]["generations"].clone())
        .unwrap_or_default();
    let active_new = fed_ca.as_array().is_some_and(|g| {
        g.iter().any(|x| x["state"] == "active") && g.iter().any(|x| x["state"] == "retiring")
    });
    checks.assert(
        moved && active_new,
        "federation root rotation",
        format!(
            "east, west and eu hold federation bundle 2 (both roots) and their cluster certificates chain to the new root, {:.1}s after `meshfed ca rotate start --ca <federator>/ca`, without joining again (the old root stays until what it signed expires)",
            fed_t0.elapsed().as_secs_f64()
        ),
    );

    // Envoy proxies: eu's agent serves SDS; its ROOTCA is Envoy's SPIFFE validator with each
    // trust domain's own roots (never a pool).
    let (ok, detail) = match sds_root_domains(&eu_dir, &layout.addr("eu")).await {
        Ok(d) => (
            d.len() == 3 && d.iter().all(|(_, same)| *same),
            format!(
                "eu's SDS secret ROOTCA (envoy.tls.cert_validator.spiffe) has {} trust domains, each with only its own roots: {}",
                d.len(),
                d.iter()
                    .map(|(td, same)| format!("{td}{}", if *same { "" } else { " (roots differ!)" }))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(e) => (false, format!("{e:#}")),
    };
    checks.assert(ok, "Envoy SDS per trust domain", detail);

    // A gateway routes only what its cluster exports: eu runs order but does not export it.
    let eu_gw = format!("{}:15443", layout.addr("eu"));
    let answer = gateway_answer(&eu_gw, "outbound_.8082_._.order.shop.svc.cluster.local").await;
    checks.assert(
        answer.contains("UnrecognisedName"),
        "gateway exports only",
        format!("eu's gateway {eu_gw} refused SNI outbound_.8082_._.order.shop.svc.cluster.local (order runs in eu, not exported): {answer}"),
    );

    println!("\nphase 2: west goes down (its payment server stops, its agent is killed)");
    if let Some((task, stop)) = servers.remove("west") {
        stop.store(true, Ordering::Relaxed);
        task.abort();
    }
    if let Some(w) = clusters.get_mut("west") {
        w.agent.kill();
    }
    let t0 = Instant::now();
    let (stale, _) = wait_agent(&eu_admin, LEASE_TTL + Duration::from_secs(3), |r| {
        lease_of(r, "west").as_deref() == Some("stale")
    })
    .await;
    let stale_after = t0.elapsed();
    checks.assert(
        stale && stale_after <= LEASE_TTL + Duration::from_secs(1),
        "lease",
        format!(
            "eu saw west turn stale {:.1}s after it went silent (TTL {}s)",
            stale_after.as_secs_f64(),
            LEASE_TTL.as_secs()
        ),
    );
    let t1 = Instant::now();
    let pushed = order_proxy
        .wait_for(Duration::from_secs(3), |t| {
            p0_cluster(&layout, t) == Some("east")
        })
        .await;
    println!("  table after west went stale:");
    for l in describe_table(&layout, &tables.borrow()) {
        println!("    {l}");
    }
    checks.assert(
        pushed,
        "xDS push",
        format!(
            "eu's agent pushed a new table {:.0} ms after eu saw west stale: east's gateway at P0, west ranked last (deprioritize)",
            t1.elapsed().as_secs_f64() * 1000.0
        ),
    );
    let (p2, f2) = phase("west down", 2).await;
    checks.assert(
        calls_to(&p2, "west") == 0 && calls_to(&p2, "east") > 10 && f2 == 0,
        "failover",
        format!(
            "calls moved to east (east.mesh) with the table: {}",
            fmt_counts(&p2, f2)
        ),
    );
    let fs = federation_report(&fed_admin).await?;
    let west_lease = fs
        .clusters
        .iter()
        .find(|c| c.cluster == "west")
        .map(|c| c.lease.clone())
        .unwrap_or_default();
    checks.assert(
        west_lease == "stale" && !fs.peer_problems().is_empty(),
        "status",
        format!(
            "the federator reports west {west_lease}; `meshfed status --admin {fed_admin}` exits 3 (a member is stale) with: {}",
            fs.peer_problems().join("; ")
        ),
    );

    // `meshfed analyze` names the problem, with its fix.
    let (code, out) = procs::run_any(
        None,
        &s(&["analyze", "--federator", &fed_admin, "-o", "json"]),
    )
    .await?;
    let findings: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    let stale_found = findings
        .iter()
        .any(|f| f["code"] == "MF101" && f["object"] == "cluster west");
    checks.assert(
        stale_found && code == 1,
        "analyze",
        format!(
            "`meshfed analyze --federator {fed_admin}` exits {code} with: {}",
            findings
                .iter()
                .map(|f| format!(
                    "{} {}: {}",
                    f["code"].as_str().unwrap_or(""),
                    f["object"].as_str().unwrap_or(""),
                    f["message"].as_str().unwrap_or("")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );

    // The dashboard's live stream says the same: what an open page shows now.
    let shown = meshfed_net::dashboard::first_status(&fed_admin).await;
    let west_shown = shown
        .as_ref()
        .ok()
        .and_then(|s| s["clusters"].as_array().cloned())
        .and_then(|c| c.into_iter().find(|c| c["cluster"] == "west"))
        .map(|c| c["lease"].as_str().unwrap_or_default().to_string());
    checks.assert(
        west_shown.as_deref() == Some("stale"),
        "dashboard",
        match &shown {
            Ok(_) => format!(
                "http://{fed_admin}/ui/ answers and its event stream shows west {}",
                west_shown.as_deref().unwrap_or("missing")
            ),
            Err(e) => format!("http://{fed_admin}/ui/events: {e:#}"),
        },
    );

    println!("\nphase 3: west comes back");
    let stop = Arc::new(AtomicBool::new(false));
    let task = start_payment(
        &layout,
        "west",
        cas.get("west").context("west ca")?,
        eu_bundle.clone(),
        stop.clone(),
    )
    .await?;
    servers.insert("west", (task, stop));
    if let Some(w) = clusters.get_mut("west") {
        w.agent.start()?;
        procs::wait_serving(&mut w.agent, &west_admin, Duration::from_secs(20)).await?;
    }
    let (fresh, _) = wait_agent(&eu_admin, Duration::from_secs(10), |r| {
        lease_of(r, "west").as_deref() == Some("fresh")
    })
    .await;
    checks.assert(
        fresh,
        "recovery",
        "west's agent restarted, reconnected (resuming from its cached versions) and is fresh again".into(),
    );
    let back = order_proxy
        .wait_for(Duration::from_secs(5), |t| {
            p0_cluster(&layout, t) == Some("west")
        })
        .await;
    let (p3, f3) = phase("recovered", 2).await;
    checks.assert(
        back && calls_to(&p3, "west") > 10 && f3 == 0,
        "recovery traffic",
        format!(
            "west is priority 0 again and gets the calls: {}",
            fmt_counts(&p3, f3)
        ),
    );
    // Healthy again: `meshfed analyze` has nothing to say about the federator and agents.
    let (code, out) = procs::run_any(
        None,
        &s(&[
            "analyze",
            "--federator",
            &fed_admin,
            "--agent",
            &east_admin,
            "--agent",
            &west_admin,
            "--agent",
            &eu_admin,
            "-o",
            "json",
        ]),
    )
    .await?;
    let left: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    checks.assert(
        code == 0 && left.is_empty(),
        "analyze clean",
        format!(
            "`meshfed analyze` over the federator and the three agents exits {code} with {} findings{}",
            left.len(),
            if left.is_empty() { String::new() } else { format!(": {out}") }
        ),
    );
    // Subsets: eu's policy names payment's v1 (east runs it) and v2 (west): each subset's
    // cluster holds only its version's endpoints, v2's through west's gateway by subset SNI.
    let mut by_subset = Vec::new();
    for subset in ["v1", "v2"] {
        let path = format!(
            "/ui/failover?service=outbound%7C{PAYMENT_PORT}%7C{subset}%7Cpayment.shop.svc.cluster.local"
        );
        let t = meshfed_net::admin::fetch_json(&eu_admin, &path).await?;
        let clusters: std::collections::BTreeSet<String> = t["inputs"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["labels"]["version"] == subset)
            .filter_map(|e| e["cluster"].as_str().map(String::from))
            .collect();
        let all = t["inputs"]["endpoints"].as_array().map_or(0, |a| a.len());
        by_subset.push((subset, clusters, all));
    }
    checks.assert(
        by_subset.iter().all(|(s, c, all)| {
            *all == 1 && c.len() == 1 && c.contains(if *s == "v1" { "east" } else { "west" })
        }),
        "subsets",
        format!(
            "eu's subset clusters outbound|{PAYMENT_PORT}|v1|payment and |v2| hold {}",
            by_subset
                .iter()
                .map(|(s, c, all)| format!("{s}: {all} endpoint(s) from {c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    // And on the wire: west's gateway routes payment's v2 subset SNI to west's payment (v2),
    // verified as west.mesh's workload, and has no route for v1, which west does not run.
    let west_gw = format!("{}:15443", layout.addr("west"));
    let west_bundle = cas.get("west").context("west ca")?.bundle();
    let sni = |subset: &str| {
        format!("outbound_.{PAYMENT_PORT}_.{subset}_.payment.shop.svc.cluster.local")
    };
    let v2 = gateway_peer(&west_gw, &sni("v2"), west_bundle.clone()).await;
    let v1 = gateway_peer(&west_gw, &sni("v1"), west_bundle.clone()).await;
    // The name an Istio importer's sidecar sends for meshfed's ServiceEntry (docs/istio.md).
    let set_sni = sni("v2").replace(".svc.cluster.local", ".svc.clusterset.local");
    let set = gateway_peer(&west_gw, &set_sni, west_bundle).await;
    let payment = Ok("spiffe://west.mesh/ns/shop/sa/payment");
    checks.assert(
        v2.as_deref() == payment && set.as_deref() == payment && v1.is_err(),
        "subset SNI",
        format!(
            "west's gateway {west_gw}: SNI {} reached {v2:?}, and {set_sni} {set:?}; SNI {} answered {v1:?}",
            sni("v2"),
            sni("v1")
        ),
    );
    // Routes: eu's VirtualService, as eu's xDS serves it to a proxyless gRPC client (RDS):
    // x-version: v2 to subset v2's cluster, everything else to the service's.
    let routes = subset_routes(&layout).await;
    let want = [
        format!("x-version=v2 -> outbound|{PAYMENT_PORT}|v2|payment.shop.svc.cluster.local"),
        format!("* -> outbound|{PAYMENT_PORT}||payment.shop.svc.cluster.local"),
    ];
    checks.assert(
        routes.as_ref().is_ok_and(|r| r[..] == want[..]),
        "subset routes",
        format!(
            "eu's RDS for payment.shop.svc.cluster.local:{PAYMENT_PORT} (its VirtualService): {}",
            match &routes {
                Ok(r) => r.join("; "),
                Err(e) => format!("{e:#}"),
            }
        ),
    );
    let syncz = meshfed_net::admin::fetch_json(&eu_admin, "/debug/syncz")
        .await
        .ok()
        .and_then(|v| serde_json::from_value::<Vec<meshfed_xds::status::ProxyReport>>(v).ok())
        .unwrap_or_default();
    let synced = !syncz.is_empty()
        && syncz.iter().all(|p| {
            p.types
                .values()
                .all(|t| t.state == meshfed_xds::status::SyncState::Synced)
        });
    checks.assert(
        synced,
        "proxy-status",
        format!(
            "every response eu's agent sent to its {} proxies was ACKed (meshfed proxy-status --admin {eu_admin}: SYNCED, no NACK)",
            syncz.len()
        ),
    );

    // The operator's admin API: an admin identity made from the federation CA, a join token
    // made through it for a cluster that joins and never comes up, and that cluster evicted.
    let ops = root.join("ops");
    let mut identity_args = s(&[
        "federator",
        "admin-identity",
        "--name",
        "demo-ops",
        "--ttl",
        "1h",
        "--out",
        &ops.display().to_string(),
    ]);
    identity_args.extend(match &etcd_endpoints {
        Some(e) => s(&["--etcd-endpoints", e]),
        None => s(&["--state-dir", &fed_dir.display().to_string()]),
    });
    let made = procs::run_once(None, &identity_args).await?;
    let admin_id = made
        .split_whitespace()
        .find(|w| w.starts_with("spiffe://"))
        .unwrap_or("?")
        .to_string();
    let ops_dir = ops.display().to_string();
    let ap_token = procs::run_once(
        None,
        &s(&[
            "federator",
            "token",
            "create",
            "--admin-identity",
            &ops_dir,
            "--cluster",
            "ap",
            "--ttl",
            "5m",
        ]),
    )
    .await?;
    procs::run_once(
        None,
        &s(&[
            "join",
            "--token",
            ap_token.trim(),
            "--state-dir",
            &root.join("ap").display().to_string(),
            "--cluster",
            "ap",
            "--network",
            "net-ap",
            "--trust-domain",
            "ap.mesh",
            "--locality",
            "asia-east1/asia-east1-b",
            "--gateway",
            "192.0.2.1:15443",
        ]),
    )
    .await
    .context("joining ap with a token from the admin API")?;
    let evicted = procs::run_once(
        None,
        &s(&[
            "federator",
            "evict",
            "ap",
            "--admin-identity",
            &ops_dir,
            "--reason",
            "demo: this cluster never came up",
        ]),
    )
    .await?;
    let ap = federation_report(&fed_admin)
        .await?
        .clusters
        .into_iter()
        .find(|c| c.cluster == "ap");
    let token_list = procs::run_once(
        None,
        &s(&["federator", "token", "list", "--admin-identity", &ops_dir]),
    )
    .await?;
    let spent = token_list
        .lines()
        .any(|l| l.contains(" ap ") && l.contains("used") && l.trim_end().ends_with("ap"));
    checks.assert(
        ap.as_ref().is_some_and(|c| {
            c.lease == "left"
                && c.evicted
                    .as_deref()
                    .is_some_and(|e| e.starts_with("evicted by demo-ops"))
        }) && spent,
        "admin API",
        format!(
            "an admin identity ({admin_id}) made a join token through the federator's admin API; cluster ap joined with it and never came up; `meshfed federator evict ap` -> {}; the federator's status: {}",
            evicted.trim(),
            ap.and_then(|c| c.evicted).unwrap_or_else(|| "not evicted".into())
        ),
    );

    stop_all.store(true, Ordering::Relaxed);
    let _ = lg.await;
    let (total, failed) = counters.snapshot();
    let calls: u64 = total.values().sum();
    let retried = counters.retried();
    println!(
        "\ntotal: {calls} successful calls ({}); {retried} attempts went to west while it was down and not yet stale and were retried on another host (outlier ejection then moved the rest to P1)",
        fmt_counts(&total, failed)
    );
    if let Some(e) = counters.last_error() {
        println!("last failed attempt: {e}");
    }
    checks.assert(
        failed == 0,
        "errors",
        format!("{failed} failed calls of {}: every attempt that hit west while it was down was retried on east ({retried} retries)", calls + failed),
    );
    let mut forwarded = 0.0;
    for c in CLUSTERS.iter().filter(|c| c.runs_payment) {
        forwarded += metric(
            &format!("{}:15021", layout.addr(c.name)),
            &format!("meshfed_gateway_connections_total{{destination_service=\"payment.shop.svc.cluster.local:{PAYMENT_PORT}\"}}"),
        )
        .await
        .unwrap_or(0.0);
    }
    checks.assert(
        forwarded >= calls as f64,
        "gateways",
        format!("the east and west gateways forwarded {forwarded} connections by SNI without terminating TLS (every successful call crossed one; from their /metrics)"),
    );
    println!("\nthe VM goes away (its agent is killed)");
    stock.abort();
    vm_agent.kill();
    let t0 = Instant::now();
    let (gone_eu, _) = wait_agent(&eu_admin, Duration::from_secs(15), |r| {
        !r.workload_entries.iter().any(|e| e.name == entry_name)
    })
    .await;
    let (gone_east, _) = wait_agent(&east_admin, Duration::from_secs(5), |r| {
        endpoints_of(r, "shop/stock", "eu") == 0
    })
    .await;
    checks.assert(
        gone_eu && gone_east,
        "VM cleanup",
        format!(
            "its WorkloadEntry was deleted after the 3 s grace period and the endpoint left east too ({:.1}s)",
            t0.elapsed().as_secs_f64()
        ),
    );
    drop(order_proxy);
    drop(clusters);
    drop(federator);
    println!("\n{} passed, {} failed", checks.passed, checks.failed);
    Ok(checks.failed == 0)
}
