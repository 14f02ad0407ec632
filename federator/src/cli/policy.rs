//! `meshfed policy check`: the effective priority table a proxy would get for a service.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;

use super::EXIT_BAD_INPUT;
use meshfed_failover::{self as table, EndpointIn, Loc, ProxyIn};
use meshfed_model::policy::PolicySet;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the priority table a proxy at a locality gets for the policy's service.
    Check(CheckArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file (FailoverPolicy or DestinationRule; several documents allowed).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Endpoints YAML: `endpoints: [{address: "ip:port", locality: "r/z/s", labels: {...},
    /// weight: 1, cluster: c, network: n, healthy: true, stale: false}]`, optionally
    /// `gateways: {network: ["ip:port"]}`.
    #[arg(long)]
    endpoints: PathBuf,
    /// The proxy's locality, region/zone/subzone.
    #[arg(long, value_parser = parse_loc)]
    proxy_locality: Loc,
    /// A proxy label K=V; repeatable.
    #[arg(long = "proxy-label", value_parser = parse_label)]
    proxy_labels: Vec<(String, String)>,
    /// The proxy's network: endpoints on other networks are replaced by their gateways.
    #[arg(long)]
    proxy_network: Option<String>,
    /// The proxy's cluster (topology.istio.io/cluster).
    #[arg(long, default_value = "")]
    proxy_cluster: String,
    /// Which host, when the file has policies for several.
    #[arg(long)]
    host: Option<String>,
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

fn parse_loc(s: &str) -> Result<Loc, String> {
    Loc::parse(s)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    gateways: BTreeMap<String, Vec<String>>,
}

fn one() -> u32 {
    1
}
fn no_locality() -> serde_saphyr::Spanned<String> {
    serde_saphyr::Spanned::new(
        String::new(),
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSpec {
    address: serde_saphyr::Spanned<String>,
    #[serde(default = "no_locality")]
    locality: serde_saphyr::Spanned<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    network: String,
    #[serde(default = "yes")]
    healthy: bool,
    #[serde(default)]
    stale: bool,
}

/// The documented JSON form, fields in this order.
#[derive(Debug, serde::Serialize)]
struct JsonTable {
    host: String,
    table: Vec<JsonRow>,
}

#[derive(Debug, serde::Serialize)]
struct JsonRow {
    priority: u32,
    locality: String,
    weight: u32,
    endpoints: Vec<String>,
}

fn bad(msg: String) -> anyhow::Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(EXIT_BAD_INPUT))
}

pub fn run(c: PolicyCommand) -> anyhow::Result<ExitCode> {
    match c {
        PolicyCommand::Check(a) => check(a),
    }
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let set = match PolicySet::load_paths(std::slice::from_ref(&a.file)) {
        Ok(s) => s,
        Err(e) => return bad(e),
    };
    let policy = match (&a.host, set.by_host.len()) {
        (Some(h), _) => match set.by_host.get(h) {
            Some(p) => p.clone(),
            None => {
                return bad(format!(
                    "{} has no policy for {h}; it has: {}",
                    a.file.display(),
                    set.by_host.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }
        },
        (None, 1) => match set.by_host.values().next() {
            Some(p) => p.clone(),
            None => return bad("no policy".into()),
        },
        (None, 0) => return bad(format!("{} holds no policy", a.file.display())),
        (None, _) => {
            return bad(format!(
                "{} has policies for several hosts; pick one with --host: {}",
                a.file.display(),
                set.by_host.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        }
    };
    let what = a.endpoints.display().to_string();
    let text = match std::fs::read_to_string(&a.endpoints) {
        Ok(t) => t,
        Err(e) => return bad(format!("{what}: {e}")),
    };
    let file: EndpointsFile = match meshfed_model::policy::spec::parse_yaml(&text, &what) {
        Ok(f) => f,
        Err(e) => return bad(e),
    };
    let mut eps = Vec::new();
    for (i, e) in file.endpoints.into_iter().enumerate() {
        // `file:line:column: endpoints[i].field: reason`, as the parser's own errors.
        let at = |field: &str, l: &serde_saphyr::Location| {
            format!("{what}:{}:{}: endpoints[{i}].{field}", l.line(), l.column())
        };
        match e.address.value.parse::<std::net::SocketAddr>() {
            Ok(_) => {}
            Err(_) => {
                return bad(format!(
                    "{}: {:?} is not ip:port",
                    at("address", &e.address.referenced),
                    e.address.value
                ))
            }
        }
        let locality = if e.locality.value.is_empty() {
            Loc::default()
        } else {
            match Loc::parse(&e.locality.value) {
                Ok(l) => l,
                Err(m) => return bad(format!("{}: {m}", at("locality", &e.locality.referenced))),
            }
        };
        eps.push(EndpointIn {
            address: e.address.value,
            locality,
            labels: e.labels,
            weight: e.weight.max(1),
            cluster: e.cluster,
            network: e.network,
            healthy: e.healthy,
            stale: e.stale,
        });
    }
    let proxy = ProxyIn {
        locality: a.proxy_locality.clone(),
        labels: a.proxy_labels.into_iter().collect(),
        cluster: a.proxy_cluster,
        network: a.proxy_network.clone(),
    };
    let t = table::compute(Some(&policy), &proxy, &eps, &file.gateways);
    match a.output {
        Output::Json => {
            let out = JsonTable {
                host: policy.host.clone(),
                table: t
                    .rows
                    .iter()
                    .map(|r| JsonRow {
                        priority: r.priority,
                        locality: r.locality.to_string(),
                        weight: r.weight,
                        endpoints: r.endpoints.iter().map(|e| e.address.clone()).collect(),
                    })
                    .collect(),
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Text => {
            println!(
                "host {}  policy {}/{} ({})",
                policy.host, policy.namespace, policy.name, policy.origin
            );
            println!(
                "proxy at {}{}",
                a.proxy_locality,
                a.proxy_network
                    .as_ref()
                    .map(|n| format!(" on network {n}"))
                    .unwrap_or_default()
            );
            let shares = t.healthy_shares();
            println!(
                "{:<9} {:<32} {:>7} {:>7}  ENDPOINTS",
                "PRIORITY", "LOCALITY", "WEIGHT", "SHARE"
            );
            for (r, share) in t.rows.iter().zip(shares) {
                let eps: Vec<String> = r
                    .endpoints
                    .iter()
                    .map(|e| {
                        let mut s = e.address.clone();
                        if let Some(n) = &e.gateway_for {
                            s.push_str(&format!(" (gateway of {n})"));
                        }
                        if !e.healthy {
                            s.push_str(" (unhealthy)");
                        }
                        s
                    })
                    .collect();
                println!(
                    "{:<9} {:<32} {:>7} {:>6.1}%  {}",
                    r.priority,
                    r.locality.to_string(),
                    r.weight,
                    share * 100.0,
                    eps.join(", ")
                );
            }
            println!("SHARE is each row's part of the traffic while every endpoint is healthy.");
            for n in &t.notes {
                println!("note: {n}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
