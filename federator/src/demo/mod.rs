//! `meshfed demo`: a whole federation on this machine, on embedded defaults.
//!
//! A federator and three clusters - east (us-east1), west (us-west1), eu (europe-west1) - each
//! with its own CA and trust domain, its agent, and small coffee-shop workloads. `payment` runs
//! in east and west and is exported; `order` in eu calls it over mTLS, finding the endpoints
//! and the peers' trust bundles only through the federation. eu has a failover policy (prefer
//! us-west1, then the rest); its agent pushes the priority table over xDS and `order` follows
//! it. The script then takes west down (its payment server and its agent): west's lease
//! expires, eu's agent pushes a table ranking west last, and calls continue on east; west comes
//! back and is preferred again.
//!
//! A VM (127.0.4.1) joins eu through eu's east-west gateway from a `meshfed vm bootstrap`
//! package: one-time token, durable credential, WorkloadEntry auto-registered and gated by the
//! group's probe; order calls `stock` on it over mTLS, and the VM's mesh DNS resolves an
//! imported service. When the VM's agent stops, its entry goes after the grace period.
//!
//! Run as root with `ip`, every cluster, the VM and the federator get their own network
//! namespace, joined by veth pairs through a router namespace (see [`crate::netns`]); each
//! component runs on a runtime whose threads live in its network, so its sockets are there.
//! Otherwise everything shares loopback, each cluster on its own 127.0.x.1 address. Either
//! way the tables name each network's east-west gateway, and every cross-cluster call crosses
//! one: the gateway routes on the SNI without terminating TLS. Ctrl-C or SIGTERM drops the run,
//! which deletes the namespaces (and with them the veth links and routes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trust::ca::policy::AnyWorkload;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CertificateAuthority, SpiffeId, TrustBundle, TrustDomain, TrustStore};

use crate::agent::identity::{self, JoinParams};
use crate::agent::{Agent, AgentConfig};
use crate::federation::token::TokenStore;
use crate::federation::{Federator, FederatorConfig};
use crate::loadgen::{Stats, Target};
use crate::netns::{NsRuntime, Topology};

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
";
const PAYMENT_PORT: u16 = 18080;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub state_dir: Option<PathBuf>,
    /// Assert each expected outcome and exit non-zero if one fails.
    pub check: bool,
    pub network: NetworkMode,
}

/// Where the demo's networks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkMode {
    /// Network namespaces when running as root with `ip`, loopback otherwise.
    Auto,
    /// Network namespaces, or fail.
    Netns,
    /// Loopback addresses (127.0.x.1) in the host's network.
    Loopback,
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

/// One network: its address and the runtime whose sockets live there.
struct Site {
    addr: String,
    rt: NsRuntime,
}

/// The demo's networks: the federator's, one per cluster, the VM's. The runtimes are
/// shut down before the topology (and its namespaces) goes: fields drop in order.
struct Layout {
    fed: Site,
    clusters: BTreeMap<&'static str, Site>,
    vm: Site,
    description: String,
    topology: Option<Topology>,
}

const DEMO_NS_STEM: &str = "mfd";
const DEMO_OCTET: u8 = 215;

impl Layout {
    fn loopback(why: Option<String>) -> anyhow::Result<Layout> {
        for c in &CLUSTERS {
            std::net::TcpListener::bind((c.loopback, 0)).with_context(|| {
                format!(
                    "cannot bind {} (loopback mode needs the 127.0.0.0/8 range)",
                    c.loopback
                )
            })?;
        }
        let site = |a: &str| Site {
            addr: a.into(),
            rt: NsRuntime::current(),
        };
        Ok(Layout {
            fed: site("127.0.0.1"),
            clusters: CLUSTERS
                .iter()
                .map(|c| (c.name, site(c.loopback)))
                .collect(),
            vm: site(vm::LOOPBACK_ADDR),
            description: format!(
                "loopback: one network, each cluster's workloads on their own 127.0.x.1 address{}",
                why.map(|w| format!(" (no network namespaces: {w})"))
                    .unwrap_or_default()
            ),
            topology: None,
        })
    }

    fn namespaces() -> anyhow::Result<Layout> {
        crate::netns::remove_stale(DEMO_NS_STEM);
        let prefix = format!("{DEMO_NS_STEM}{}", std::process::id() % 1_000_000);
        let mut t = Topology::new(&prefix, DEMO_OCTET)?;
        let mut site = |name: &str, index: u8| -> anyhow::Result<Site> {
            let n = t.add(name, index)?;
            Ok(Site {
                rt: NsRuntime::new(&n.ns, 1)?,
                addr: n.addr,
            })
        };
        let mut clusters = BTreeMap::new();
        for c in &CLUSTERS {
            clusters.insert(c.name, site(c.name, c.index)?);
        }
        let vm = site("vm", 4)?;
        let fed = site("fed", 5)?;
        let description = format!(
            "network namespaces: {} joined through router namespace {} (veth pairs; the host reaches them via 10.{DEMO_OCTET}.255.2)",
            t.networks()
                .iter()
                .map(|n| format!("{} {} ({})", n.name, n.addr, n.ns))
                .collect::<Vec<_>>()
                .join(", "),
            t.router()
        );
        Ok(Layout {
            fed,
            clusters,
            vm,
            description,
            topology: Some(t),
        })
    }

    fn new(mode: NetworkMode) -> anyhow::Result<Layout> {
        match mode {
            NetworkMode::Loopback => Layout::loopback(None),
            NetworkMode::Netns => {
                if let Some(why) = crate::netns::unavailable() {
                    bail!("--network netns: cannot make network namespaces here: {why}");
                }
                Layout::namespaces()
            }
            NetworkMode::Auto => match crate::netns::unavailable() {
                Some(why) => Layout::loopback(Some(why)),
                None => match Layout::namespaces() {
                    Ok(l) => Ok(l),
                    Err(e) => Layout::loopback(Some(format!("{e:#}"))),
                },
            },
        }
    }

    fn cluster(&self, name: &str) -> anyhow::Result<&Site> {
        self.clusters
            .get(name)
            .with_context(|| format!("no network for {name}"))
    }

    fn addr(&self, name: &str) -> String {
        self.clusters
            .get(name)
            .map(|s| s.addr.clone())
            .unwrap_or_default()
    }

    fn netns(&self) -> bool {
        self.topology.is_some()
    }

    /// An address to listen on for an admin endpoint: fixed in a namespace (reachable from
    /// the host's shell), any free port on loopback.
    fn admin(&self, site: &Site, port: u16) -> String {
        if self.netns() {
            format!("{}:{port}", site.addr)
        } else {
            "127.0.0.1:0".into()
        }
    }
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
            "  - namespace: shop\n    name: payment\n    ports: [{{name: https, port: {PAYMENT_PORT}, appProtocol: tls}}]\n    export: true\n    endpoints: [{{address: {addr}, serviceAccount: payment, labels: {{version: v1}}}}]\n"
        ));
        y.push_str(&format!(
            "  - namespace: shop\n    name: inventory\n    ports: [{{name: http, port: 8081}}]\n    exportTo: [{}]\n    endpoints: [{{address: {}}}]\n",
            if c.name == "east" { "west" } else { "east" },
            addr
        ));
    } else {
        y.push_str(&format!(
            "  - namespace: shop\n    name: order\n    ports: [{{name: http, port: 8082}}]\n    endpoints: [{{address: {addr}, serviceAccount: order}}]\n"
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

/// A payment server: mTLS with the cluster's SVID, accepting only order from eu.
async fn payment_server(
    cluster: String,
    addr: String,
    svid: trust::Svid,
    store: TrustStore,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let allowed = SpiffeId::istio_workload(&TrustDomain::new("eu.mesh")?, "shop", "order")?;
    let cfg = trust::tls::server_config(
        SvidResolver::with(&svid)?,
        SpiffeVerifier::new(store, Authorizer::id(allowed)),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind((addr.as_str(), PAYMENT_PORT))
        .await
        .with_context(|| {
            format!("cannot listen on {addr}:{PAYMENT_PORT} for {cluster}'s payment")
        })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let acceptor = acceptor.clone();
            let cluster = cluster.clone();
            tokio::spawn(answer(acceptor, tcp, move |req| {
                format!("paid by {cluster} for {req}")
            }));
        }
    }))
}

/// Starts `cluster`'s payment server in its network, with an SVID from its CA.
async fn start_payment(
    layout: &Layout,
    cluster: &'static str,
    ca: &CertificateAuthority,
    eu_bundle: TrustBundle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let id = SpiffeId::istio_workload(ca.trust_domain(), "shop", "payment")?;
    let svid = ca.issue_svid(&id, &AnyWorkload, time::Duration::hours(1))?;
    let mut set = BundleSet::new();
    set.insert(eu_bundle)?;
    let site = layout.cluster(cluster)?;
    site.rt
        .run(payment_server(
            cluster.to_string(),
            site.addr.clone(),
            svid,
            TrustStore::new(set),
            stop,
        ))
        .await?
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

/// order in eu: calls payment every 20 ms, following the priority table eu's agent pushes over
/// xDS, through the gateways the table names, verifying each server against the bundle of its
/// own trust domain as received through the federation.
fn order_client(agent: Arc<crate::agent::Inner>, svid: trust::Svid) -> anyhow::Result<Target> {
    let ids = ["east", "west"]
        .iter()
        .map(|c| {
            SpiffeId::istio_workload(&TrustDomain::new(&format!("{c}.mesh"))?, "shop", "payment")
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Target {
        cluster: PAYMENT_CLUSTER.into(),
        sni: format!("outbound_.{PAYMENT_PORT}_._.payment.shop.svc.cluster.local"),
        svid,
        roots: Arc::new(move || {
            let mut set = BundleSet::new();
            for (td, json) in &agent.model.current().bundles {
                if let Ok(t) = TrustDomain::new(td) {
                    if let Ok(b) = TrustBundle::from_json(t, json, "peer bundle") {
                        let _ = set.insert(b);
                    }
                }
            }
            TrustStore::new(set)
        }),
        expect: Authorizer::Ids(ids),
        label: Arc::new(|td: &TrustDomain| td.as_str().trim_end_matches(".mesh").to_string()),
        interval: Duration::from_millis(20),
        attempts: 2,
        timeout: Duration::from_millis(500),
    })
}

/// The payment table as eu's agent pushed it: one line per priority.
fn describe_table(
    tables: &crate::xds::client::Tables,
    snap: &crate::agent::model::Snapshot,
) -> Vec<String> {
    let Some(t) = tables.get(PAYMENT_CLUSTER) else {
        return vec!["(no table yet)".into()];
    };
    let mut by_prio: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (p, addr, healthy) in crate::xds::client::endpoints(t) {
        let who = snap
            .peers
            .values()
            .filter_map(|p| p.facts.as_ref())
            .find(|f| f.gateways.contains(&addr))
            .map(|f| format!("{} gateway", f.cluster_id))
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
fn p0_cluster(
    tables: &crate::xds::client::Tables,
    snap: &crate::agent::model::Snapshot,
) -> Option<String> {
    let t = tables.get(PAYMENT_CLUSTER)?;
    let eps = crate::xds::client::endpoints(t);
    let (_, addr, _) = eps.iter().find(|e| e.0 == 0)?;
    snap.peers
        .values()
        .filter_map(|p| p.facts.as_ref())
        .find(|f| f.gateways.contains(addr))
        .map(|f| f.cluster_id.clone())
}

fn calls_to(m: &BTreeMap<String, u64>, cluster: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.split(' ').next() == Some(cluster))
        .map(|(_, v)| *v)
        .sum()
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
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
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "meshfed demo: a federation of three clusters on this machine (state in {})",
        root.display()
    );
    let layout = Layout::new(opts.network)?;
    println!("mode: {}\n", layout.description);
    let mut checks = Checks {
        check: opts.check,
        passed: 0,
        failed: 0,
    };

    let listen = if layout.netns() {
        format!("{}:15100", layout.fed.addr)
    } else {
        "127.0.0.1:0".into()
    };
    let mut cfg = FederatorConfig::new(root.join("federator"), listen);
    cfg.admin = Some(layout.admin(&layout.fed, 15101));
    cfg.lease_ttl = LEASE_TTL;
    let fed = layout.fed.rt.run(Federator::start(cfg)).await??;
    println!(
        "federator   gRPC {}  admin http://{}/status  trust domain {}",
        fed.grpc_addr,
        fed.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        fed.trust_domain()
    );

    let tokens = TokenStore::new(&root.join("federator"));
    let mut agents: BTreeMap<&str, Agent> = BTreeMap::new();
    let mut cas: BTreeMap<&str, CertificateAuthority> = BTreeMap::new();
    let mut xds_addrs = BTreeMap::new();
    for c in &CLUSTERS {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (_, tok) = tokens.create(
            c.name,
            900,
            fed.advertise().to_vec(),
            fed.ca_fingerprint(),
            fed.trust_domain().to_string(),
            now,
        )?;
        let dir = root.join(c.name);
        let site = layout.cluster(c.name)?;
        let addr = site.addr.clone();
        let id = site
            .rt
            .run(identity::join(JoinParams {
                token: tok,
                state_dir: dir.clone(),
                cluster: c.name.into(),
                network: format!("net-{}", c.name),
                trust_domain: TrustDomain::new(&format!("{}.mesh", c.name))?,
                locality: crate::types::parse_locality(&format!("{}/{}-b", c.region, c.region))
                    .map_err(anyhow::Error::msg)?,
                gateways: vec![format!("{addr}:15443")],
                ca: None,
            }))
            .await??;
        let reg = dir.join("registry.yaml");
        std::fs::write(&reg, registry(c, &addr, &layout.vm.addr))?;
        let mut policies = Vec::new();
        if c.name == "eu" {
            let p = dir.join("policies.yaml");
            std::fs::write(&p, EU_POLICY)?;
            policies.push(p);
        }
        let agent = site
            .rt
            .run(Agent::start(agent_config(&layout, c, &dir, policies)))
            .await??;
        println!(
            "cluster {:<5} trust domain {:<10} region {:<13} workloads on {}  agent admin http://{}/status  xDS {}",
            c.name,
            id.file.trust_domain,
            c.region,
            addr,
            agent.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
            agent.xds_plaintext.map(|a| a.to_string()).unwrap_or_default()
        );
        xds_addrs.insert(c.name, agent.xds_plaintext);
        cas.insert(c.name, CertificateAuthority::load(&dir.join("ca"))?);
        agents.insert(c.name, agent);
    }
    // East-west gateways, fed by their agents over xDS; eu's also exposes its agent's VM API
    // and mTLS xDS port (as Istio's expose-istiod does) for the VM.
    let mut gateways = Vec::new();
    for c in CLUSTERS.iter() {
        let site = layout.cluster(c.name)?;
        let addr = &site.addr;
        let mut expose = BTreeMap::new();
        if c.name == "eu" {
            expose.insert(
                crate::vm::config::VM_API_SNI.to_string(),
                vec![format!("{addr}:15018").parse()?],
            );
            expose.insert(
                crate::vm::config::XDS_SNI.to_string(),
                vec![format!("{addr}:15012").parse()?],
            );
        }
        let xds = xds_addrs
            .get(c.name)
            .copied()
            .flatten()
            .context("xDS address")?;
        let g = site
            .rt
            .run(crate::gateway::start(
                crate::gateway::GatewayOptions {
                    listen: format!("{addr}:15443"),
                    xds: xds.to_string(),
                    admin: None,
                    expose,
                    node_id: format!(
                        "router~{addr}~eastwest-gateway~meshfed-system.svc.cluster.local"
                    ),
                    network: None,
                    config: eastwest_gateway::proxy::GatewayConfig::default(),
                },
                prometheus::Registry::new(),
            ))
            .await??;
        println!(
            "gateway {:<5} {} (SNI passthrough, routes from its agent over xDS)",
            c.name, g.addr
        );
        gateways.push(g);
    }
    checks.assert(
        fed.report()?.clusters.len() == 3,
        "joins",
        "east, west and eu joined with one-time tokens".into(),
    );

    // Imports and bundles reach eu through the federation.
    let eu = agents.get("eu").context("eu agent")?.inner.clone();
    let got = wait_until(Duration::from_secs(15), || {
        let s = eu.model.current();
        s.services().get("shop/payment").map(|v| v.len()) == Some(2)
            && s.bundles.contains_key("east.mesh")
            && s.bundles.contains_key("west.mesh")
    })
    .await;
    let s = eu.model.current();
    let sources: Vec<String> = s
        .services()
        .get("shop/payment")
        .map(|v| v.iter().map(|i| i.cluster.clone()).collect())
        .unwrap_or_default();
    checks.assert(
        got,
        "imports",
        format!("eu imports shop/payment from [{}]", sources.join(", ")),
    );
    checks.assert(
        got,
        "bundles",
        format!(
            "eu holds the trust bundles of [{}] (never merged)",
            s.bundles.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    );
    let inv_at_eu = s.services().contains_key("shop/inventory");
    let west_inv = wait_until(Duration::from_secs(10), || {
        agents
            .get("west")
            .map(|a| {
                a.model()
                    .current()
                    .imports
                    .keys()
                    .any(|(c, k)| c == "east" && k == "shop/inventory")
            })
            .unwrap_or(false)
    })
    .await;
    checks.assert(
        west_inv && !inv_at_eu,
        "exportTo",
        "east's inventory (exportTo: [west]) reaches west and not eu".into(),
    );

    // The VM: joins eu through eu's gateway with a bootstrap package.
    let vm_addr = layout.vm.addr.clone();
    let eu_addr = layout.addr("eu");
    println!("\nVM: stock runs on a VM ({vm_addr}) that joins eu through eu's east-west gateway with `meshfed vm bootstrap`'s package");
    let vm_agent = layout
        .vm
        .rt
        .run(vm::join(
            root.clone(),
            root.join("eu"),
            format!("{eu_addr}:15443"),
            vm_addr.clone(),
        ))
        .await??;
    let vm_status = vm_agent.status();
    let entry_name = format!("stock-vm-{vm_addr}");
    let registered = wait_until(Duration::from_secs(10), || {
        eu.entries
            .current()
            .get(&entry_name)
            .is_some_and(|e| e.connected)
    })
    .await;
    checks.assert(
        registered,
        "VM join",
        format!(
            "VM {} joined with its one-time token through eu's gateway (SNI {}), got {} and a durable credential; WorkloadEntry {entry_name} auto-registered",
            vm_status.vm_id,
            crate::vm::config::VM_API_SNI,
            vm_status.svid
        ),
    );
    let cert_dir = root.join("vm/etc/meshfed/certs");
    let stock = layout
        .vm
        .rt
        .run(vm::stock_server(cert_dir, vm_addr.clone()))
        .await??;
    let probed = wait_until(Duration::from_secs(10), || {
        eu.model
            .current()
            .local
            .get("shop/stock")
            .is_some_and(|e| e.endpoints.iter().any(|ep| ep.address == vm_addr))
    })
    .await;
    let east_sees_vm = wait_until(Duration::from_secs(10), || {
        agents.get("east").is_some_and(|a| {
            a.model()
                .current()
                .imports
                .get(&("eu".to_string(), "shop/stock".to_string()))
                .is_some_and(|e| e.endpoints.iter().any(|ep| ep.address == vm_addr))
        })
    })
    .await;
    checks.assert(
        probed && east_sees_vm,
        "VM health",
        "the group's probe (tcpSocket) passed: the VM became stock's endpoint in eu, and east imports it".into(),
    );
    let order_id_vm = SpiffeId::istio_workload(&TrustDomain::new("eu.mesh")?, "shop", "order")?;
    let order_vm_svid = cas.get("eu").context("eu ca")?.issue_svid(
        &order_id_vm,
        &AnyWorkload,
        time::Duration::hours(1),
    )?;
    let mut eu_set = BundleSet::new();
    eu_set.insert(cas.get("eu").context("eu ca")?.bundle())?;
    let eu_rt = &layout.cluster("eu")?.rt;
    let reply = eu_rt
        .run(vm::call_stock(
            order_vm_svid,
            TrustStore::new(eu_set),
            format!("{vm_addr}:{}", vm::STOCK_PORT),
        ))
        .await?;
    checks.assert(
        reply
            .as_ref()
            .is_ok_and(|r| r.contains("answered by the VM")),
        "VM reachable",
        format!(
            "order called stock on the VM over mTLS (server spiffe://eu.mesh/ns/shop/sa/stock): {}",
            match &reply {
                Ok(r) => r.clone(),
                Err(e) => format!("{e:#}"),
            }
        ),
    );
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

    // Workloads: payment in east and west, order in eu.
    let stop_all = Arc::new(AtomicBool::new(false));
    let mut servers = BTreeMap::new();
    let eu_bundle = cas.get("eu").context("eu ca")?.bundle();
    for c in CLUSTERS.iter().filter(|c| c.runs_payment) {
        let ca = cas.get(c.name).context("ca")?;
        let stop = Arc::new(AtomicBool::new(false));
        let task = start_payment(&layout, c.name, ca, eu_bundle.clone(), stop.clone()).await?;
        servers.insert(c.name, (task, stop));
    }
    let order_id = SpiffeId::istio_workload(&TrustDomain::new("eu.mesh")?, "shop", "order")?;
    let order_svid = cas.get("eu").context("eu ca")?.issue_svid(
        &order_id,
        &AnyWorkload,
        time::Duration::hours(1),
    )?;
    let counters = Arc::new(Stats::default());
    // order's proxy: an xDS client of eu's agent, in europe-west1.
    let eu_xds = xds_addrs
        .get("eu")
        .copied()
        .flatten()
        .context("eu xDS address")?;
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: format!("sidecar~{eu_addr}~order.shop~shop.svc.cluster.local"),
        user_agent_name: "meshfed-demo".into(),
        locality: Some(envoy_types::pb::envoy::config::core::v3::Locality {
            region: "europe-west1".into(),
            zone: "europe-west1-b".into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    };
    let mut order_proxy = eu_rt
        .run(async move { crate::xds::client::AdsClient::start(format!("http://{eu_xds}"), node) })
        .await?;
    let got_table = order_proxy
        .wait_for(Duration::from_secs(10), |t| {
            p0_cluster(t, &eu.model.current()).as_deref() == Some("west")
        })
        .await;
    let tables = order_proxy.tables.clone();
    println!("\neu's failover policy for payment: failover europe-west1 -> us-west1, outlierDetection on; table pushed to order's proxy over xDS:");
    for l in describe_table(&tables.borrow(), &eu.model.current()) {
        println!("  {l}");
    }
    checks.assert(
        got_table,
        "xDS table",
        "eu's agent pushed payment's table to order: P0 west's gateway, P1 east's (per the policy, split horizon)".into(),
    );
    let lg = eu_rt.spawn(crate::loadgen::run(
        order_client(eu.clone(), order_svid)?,
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

    println!("phase 1: both payment clusters healthy (west is priority 0 for eu)");
    let (p1, f1) = phase("steady", 3).await;
    checks.assert(
        calls_to(&p1, "west") > 10 && calls_to(&p1, "east") == 0 && f1 == 0,
        "cross-trust-domain mTLS",
        format!(
            "order (eu.mesh) called payment in west.mesh (priority 0) only: {}",
            fmt_counts(&p1, f1)
        ),
    );

    println!("\nphase 2: west goes down (its payment server and its agent stop)");
    if let Some((task, stop)) = servers.remove("west") {
        stop.store(true, Ordering::Relaxed);
        task.abort();
    }
    if let Some(a) = agents.remove("west") {
        a.stop();
    }
    let t0 = Instant::now();
    let stale = wait_until(LEASE_TTL + Duration::from_secs(3), || {
        eu.model
            .current()
            .peers
            .get("west")
            .is_some_and(|p| p.lease == proto::LeaseState::Stale as i32)
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
            p0_cluster(t, &eu.model.current()).as_deref() == Some("east")
        })
        .await;
    println!("  table after west went stale:");
    for l in describe_table(&tables.borrow(), &eu.model.current()) {
        println!("    {l}");
    }
    checks.assert(
        pushed,
        "xDS push",
        format!(
            "eu's agent pushed a new table {:.0} ms after west turned stale: east's gateway at P0, west ranked last (deprioritize)",
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
    let fs = fed.report()?;
    let west_lease = fs
        .clusters
        .iter()
        .find(|c| c.cluster == "west")
        .map(|c| c.lease.clone())
        .unwrap_or_default();
    checks.assert(
        west_lease == "stale" && !fs.problems().is_empty(),
        "status",
        format!(
            "the federator reports west {west_lease}; `meshfed status` exits 1 with: {}",
            fs.problems().join("; ")
        ),
    );

    println!("\nphase 3: west comes back");
    let wspec = CLUSTERS.iter().find(|c| c.name == "west").context("west")?;
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
    let wdir = root.join("west");
    let west = layout
        .cluster("west")?
        .rt
        .run(Agent::start(agent_config(
            &layout,
            wspec,
            &wdir,
            Vec::new(),
        )))
        .await??;
    agents.insert("west", west);
    let fresh = wait_until(Duration::from_secs(10), || {
        eu.model
            .current()
            .peers
            .get("west")
            .is_some_and(|p| p.lease == proto::LeaseState::Fresh as i32)
    })
    .await;
    checks.assert(
        fresh,
        "recovery",
        "west reconnected (resuming from its cached versions) and is fresh again".into(),
    );
    let back = order_proxy
        .wait_for(Duration::from_secs(5), |t| {
            p0_cluster(t, &eu.model.current()).as_deref() == Some("west")
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
    let synced = eu
        .xds
        .get()
        .map(|x| {
            let r = x.proxies.report();
            !r.is_empty()
                && r.iter().all(|p| {
                    p.types
                        .values()
                        .all(|t| t.state == crate::xds::status::SyncState::Synced)
                })
        })
        .unwrap_or(false);
    checks.assert(
        synced,
        "proxy-status",
        "every response eu's agent sent was ACKed (meshfed proxy-status: SYNCED, no NACK)".into(),
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
    let forwarded: u64 = gateways
        .iter()
        .map(|g| {
            g.gateway
                .metrics
                .connections
                .with_label_values(&[&format!("payment.shop.svc.cluster.local:{PAYMENT_PORT}")])
                .get()
        })
        .sum();
    checks.assert(
        forwarded >= calls,
        "gateways",
        format!("the east and west gateways forwarded {forwarded} connections by SNI without terminating TLS (every successful call crossed one)"),
    );
    println!("\nthe VM goes away (its agent stops)");
    stock.abort();
    vm_agent.stop();
    let t0 = Instant::now();
    let gone = wait_until(Duration::from_secs(15), || {
        !eu.entries.current().contains_key(&entry_name)
            && agents.get("east").is_some_and(|a| {
                !a.model()
                    .current()
                    .imports
                    .get(&("eu".to_string(), "shop/stock".to_string()))
                    .is_some_and(|e| e.endpoints.iter().any(|ep| ep.address == vm_addr))
            })
    })
    .await;
    checks.assert(
        gone,
        "VM cleanup",
        format!(
            "its WorkloadEntry was deleted after the 3 s grace period and the endpoint left east too ({:.1}s)",
            t0.elapsed().as_secs_f64()
        ),
    );
    for g in gateways {
        g.abort();
    }
    for (_, a) in agents {
        a.stop();
    }
    fed.stop().await;
    println!("\n{} passed, {} failed", checks.passed, checks.failed);
    Ok(checks.failed == 0)
}

fn agent_config(
    layout: &Layout,
    c: &ClusterSpec,
    dir: &std::path::Path,
    policies: Vec<PathBuf>,
) -> AgentConfig {
    let addr = layout.addr(c.name);
    AgentConfig {
        state_dir: dir.to_path_buf(),
        registry: dir.join("registry.yaml"),
        admin: layout.cluster(c.name).ok().map(|s| layout.admin(s, 15014)),
        registry_poll: Duration::from_millis(200),
        policies,
        xds: Some(crate::xds::XdsConfig {
            // Fixed ports: the cluster's gateway follows its agent across a restart.
            plaintext: Some(format!("{addr}:15010")),
            mtls: Some(format!("{addr}:15012")),
            debounce: Duration::from_millis(100),
        }),
        vm_api: Some(format!("{addr}:15018")),
        vm_grace: Duration::from_secs(3),
        dns: Some(crate::dns::DnsConfig {
            listen: format!("{addr}:15053"),
            upstream: Vec::new(),
        }),
        vip_range_v4: crate::agent::default_vip_range_v4(),
        vip_range_v6: None,
    }
}
