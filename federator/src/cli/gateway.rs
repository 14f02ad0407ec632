//! `meshfed gateway`: run the east-west gateway for this cluster's network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use eastwest_gateway::proxy::GatewayConfig;

use super::args;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Where cross-network TLS arrives (Istio AUTO_PASSTHROUGH port).
    #[arg(long, default_value = "0.0.0.0:15443", value_parser = args::socket_addr)]
    listen: SocketAddr,
    /// The local agent's plaintext xDS address.
    #[arg(long, default_value = "127.0.0.1:15010", value_parser = args::host_port)]
    xds: String,
    /// Admin HTTP address (/metrics, /healthz, /readyz once routes arrived, /status); `off`
    /// disables it.
    #[arg(long, default_value = "127.0.0.1:15021", value_parser = args::listen)]
    admin: args::Listen,
    /// A second HTTP listener with /healthz, /readyz and /metrics only (kubelet probes and
    /// Prometheus on the pod IP, without /status or /debug); `off` by default.
    #[arg(long, default_value = "off", value_parser = args::listen)]
    probe: args::Listen,
    /// Forward connections with this SNI to fixed addresses, e.g. the agent's mTLS xDS port
    /// for VMs and other networks: `--expose meshfed-xds.meshfed-system.svc=10.0.0.2:15012`
    /// (a host name is resolved at start, e.g. the agent's Kubernetes Service).
    #[arg(long, value_parser = parse_expose)]
    expose: Vec<(String, String)>,
    /// The network this gateway serves (default: the agent's).
    #[arg(long)]
    network: Option<String>,
    /// The cluster it forwards into: `destination_cluster` of Istio's TCP metrics (default:
    /// `unknown`).
    #[arg(long, default_value = "", value_parser = cluster_label)]
    cluster: String,
    /// Accept any ALPN instead of requiring one of Istio's mTLS values.
    #[arg(long)]
    any_alpn: bool,
    /// A client must finish its ClientHello within this time.
    #[arg(long, default_value = "10s", value_parser = args::std_duration)]
    hello_timeout: Duration,
    /// Connections idle this long are closed.
    #[arg(long, default_value = "1h", value_parser = args::std_duration)]
    idle_timeout: Duration,
    /// On SIGTERM, open connections get this long to finish.
    #[arg(long, default_value = "30s", value_parser = args::std_duration)]
    drain_timeout: Duration,
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_per_source: u32,
    /// Endpoint choice among healthy endpoints.
    #[arg(long, value_enum, default_value = "round-robin")]
    lb: Lb,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Lb {
    RoundRobin,
    LeastConn,
}

fn parse_expose(s: &str) -> Result<(String, String), String> {
    let (sni, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SNI=HOST:PORT"))?;
    if sni.is_empty() {
        return Err(format!("{s:?}: empty SNI"));
    }
    meshfed_model::validate::check_host_port(&format!("{s:?}"), addr)?;
    Ok((sni.to_ascii_lowercase(), addr.to_string()))
}

pub async fn run(a: GatewayArgs) -> anyhow::Result<ExitCode> {
    // Names (a Kubernetes Service's, say) are resolved once, at start: all their addresses.
    let mut expose: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for (sni, addr) in a.expose {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr.as_str())
            .await
            .with_context(|| format!("--expose {sni}={addr}: cannot resolve {addr}"))?
            .collect();
        if addrs.is_empty() {
            anyhow::bail!("--expose {sni}={addr}: {addr} has no addresses");
        }
        expose.entry(sni).or_default().extend(addrs);
    }
    let g = crate::gateway::start(
        crate::gateway::GatewayOptions {
            listen: a.listen,
            xds: a.xds.clone(),
            admin: a.admin.0,
            probe: a.probe.0,
            expose,
            node_id: node_id(&a.xds, a.listen),
            network: a.network,
            config: GatewayConfig {
                cluster: a.cluster.clone(),
                hello_timeout: a.hello_timeout,
                idle_timeout: a.idle_timeout,
                drain_timeout: a.drain_timeout,
                max_connections: usize::try_from(a.max_connections).unwrap_or(usize::MAX),
                max_per_source: a.max_per_source,
                balance: match a.lb {
                    Lb::RoundRobin => eastwest_gateway::proxy::Balance::RoundRobin,
                    Lb::LeastConn => eastwest_gateway::proxy::Balance::LeastConnections,
                },
                require_alpn: if a.any_alpn {
                    None
                } else {
                    GatewayConfig::default().require_alpn
                },
                ..Default::default()
            },
        },
        prometheus::Registry::new(),
    )
    .await?;
    println!(
        "east-west gateway on {} (admin {})",
        g.addr,
        g.admin.map(|a| a.to_string()).unwrap_or_default()
    );
    // The whole drain is bounded by the connections' drain timeout, plus a moment for the rest.
    let deadline = a.drain_timeout + Duration::from_secs(1);
    let tasks = g.tasks().clone();
    Ok(super::serve_until_signal(&tasks, deadline, g.drain(deadline)).await)
}

/// Istio's form for a gateway: `router~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`,
/// with the pod's IP (`INSTANCE_IP` or `POD_IP`, as Istio's injector sets them), else the
/// listen address, else the address this host reaches the agent's xDS from.
fn node_id(xds: &str, listen: SocketAddr) -> String {
    let ip = ["INSTANCE_IP", "POD_IP"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<std::net::IpAddr>().ok())
        .or_else(|| Some(listen.ip()).filter(|ip| !ip.is_unspecified()))
        .or_else(|| {
            // A UDP "connection" sends nothing: it only picks the outgoing address.
            let to = std::net::ToSocketAddrs::to_socket_addrs(xds).ok()?.next()?;
            let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = std::net::UdpSocket::bind(bind).ok()?;
            s.connect(to).ok()?;
            Some(s.local_addr().ok()?.ip())
        })
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "0.0.0.0".into());
    let ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "meshfed-system".into());
    format!("router~{ip}~{}.{ns}~{ns}.svc.cluster.local", hostname())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "gateway".into())
}

/// A cluster name (or empty).
fn cluster_label(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    args::label(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_id_has_istios_router_form_with_an_address() {
        let id = node_id("127.0.0.1:15010", "10.1.2.3:15443".parse().unwrap());
        if std::env::var("INSTANCE_IP").is_err() && std::env::var("POD_IP").is_err() {
            assert!(id.starts_with("router~10.1.2.3~"), "{id}");
            // Listening on every address: the one this host reaches the agent from.
            let id = node_id("127.0.0.1:15010", "0.0.0.0:15443".parse().unwrap());
            assert!(id.starts_with("router~127.0.0.1~"), "{id}");
        }
        let parts: Vec<&str> = id.split('~').collect();
        assert_eq!(parts.len(), 4, "{id}");
        assert!(parts[2].ends_with(".meshfed-system") || std::env::var("POD_NAMESPACE").is_ok());
        assert!(parts[3].ends_with(".svc.cluster.local"), "{id}");
    }
}
