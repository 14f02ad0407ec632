//! Mesh DNS (hickory-dns): authoritative for `cluster.local` and `clusterset.local` from the
//! [`table::NameTable`], everything else relayed to upstream resolvers. The agent runs it for
//! its cluster's pods; the VM agent runs it on the VM with the table its agent sends.

pub mod server;
pub mod table;
pub mod vips;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use crate::agent::Inner;
use table::NameTable;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP address.
    pub listen: String,
    /// `IP[:PORT]`; empty = /etc/resolv.conf's nameservers.
    pub upstream: Vec<String>,
}

#[derive(Debug)]
pub struct Served {
    pub addr: SocketAddr,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Parses upstream resolvers (`IP` or `IP:PORT`); none given = /etc/resolv.conf's.
pub fn upstreams(given: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let parse = |s: &str| -> anyhow::Result<SocketAddr> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a);
        }
        let ip: std::net::IpAddr = s
            .trim_matches(['[', ']'])
            .parse()
            .with_context(|| format!("DNS upstream {s:?} is not IP or IP:PORT"))?;
        Ok(SocketAddr::new(ip, 53))
    };
    if !given.is_empty() {
        return given.iter().map(|s| parse(s)).collect();
    }
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| parse(a.trim()).ok())
        .collect())
}

/// Serves DNS on `listen` (UDP and TCP) from `names`.
pub async fn serve(
    listen: &str,
    names: watch::Receiver<Arc<NameTable>>,
    upstream: Vec<SocketAddr>,
    registry: &prometheus::Registry,
) -> anyhow::Result<Served> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("DNS address {listen:?} is not IP:PORT"))?;
    let udp = tokio::net::UdpSocket::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}/udp (DNS)"))?;
    let bound = udp.local_addr()?;
    // TCP on the same port as UDP (port 0 picks one for UDP first).
    let tcp = tokio::net::TcpListener::bind(bound)
        .await
        .with_context(|| format!("cannot listen on {bound}/tcp (DNS)"))?;
    let upstream: Vec<SocketAddr> = upstream.into_iter().filter(|u| *u != bound).collect();
    let handler = server::MeshDns::new(names, upstream, registry)?;
    let mut srv = hickory_server::Server::new(handler);
    srv.register_socket(udp);
    srv.register_listener(tcp, std::time::Duration::from_secs(10), 64);
    let task = tokio::spawn(async move {
        // Runs until the task is aborted (the server's sockets close with it).
        let token = srv.shutdown_token().clone();
        token.cancelled().await;
        let _ = srv.shutdown_gracefully().await;
    });
    Ok(Served {
        addr: bound,
        tasks: vec![task],
    })
}

/// The agent's DNS: the table from its model.
pub async fn serve_agent(
    cfg: &DnsConfig,
    inner: Arc<Inner>,
    _state_dir: &std::path::Path,
) -> anyhow::Result<Served> {
    serve(
        &cfg.listen,
        inner.names.subscribe(),
        upstreams(&cfg.upstream)?,
        &inner.metrics.registry,
    )
    .await
}

/// Rebuilds the agent's name table whenever its model changes (VIPs from `vips`).
pub async fn follow_names(inner: Arc<Inner>, mut vips: vips::Vips) {
    let mut rx = inner.model.subscribe();
    let mut exp_rx = inner.exports.subscribe();
    loop {
        let snap = rx.borrow_and_update().clone();
        let exported: BTreeSet<String> = exp_rx.borrow_and_update().keys().cloned().collect();
        let live: BTreeSet<String> = snap.services().keys().cloned().collect();
        let t = table::build(&snap, &exported, |k| {
            let v = vips.get(k, &live);
            (v.v4, v.v6)
        });
        vips.flush();
        inner.names.send_if_modified(|cur| {
            if **cur == t {
                false
            } else {
                *cur = Arc::new(t);
                true
            }
        });
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            r = exp_rx.changed() => if r.is_err() { return },
        }
    }
}
