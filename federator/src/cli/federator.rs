//! `meshfed federator` and `meshfed federator token create|list|revoke`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use trust::TrustDomain;

use super::args;
use meshfed_federation::ca::FederationCa;
use meshfed_federation::server::ENDPOINTS_FILE;
use meshfed_federation::{Federator, FederatorConfig};
use meshfed_identity::token::TokenStore;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FederatorArgs {
    #[command(subcommand)]
    token: Option<TokenCommand>,
    /// State directory (federation CA, store, tokens).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// gRPC listen address (Join, Sync, Leave, Status; mTLS).
    #[arg(long, default_value = "0.0.0.0:15100", value_parser = args::socket_addr)]
    listen: std::net::SocketAddr,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /status); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:15101", value_parser = args::listen)]
    admin: args::Listen,
    /// A second HTTP listener with /healthz, /readyz and /metrics only (kubelet probes and
    /// Prometheus on the pod IP, without /status or /debug); `off` by default.
    #[arg(long, default_value = "off", value_parser = args::listen)]
    probe: args::Listen,
    /// Address clusters use to reach this federator, HOST:PORT (repeatable; default: the
    /// listen address).
    #[arg(long, value_parser = args::host_port)]
    advertise: Vec<String>,
    /// Trust domain of the federation CA (first start only).
    #[arg(long, value_parser = args::trust_domain)]
    trust_domain: Option<TrustDomain>,
    /// Lease TTL: a cluster silent for longer is stale.
    #[arg(long, default_value = "30s", value_parser = args::std_duration)]
    lease_ttl: std::time::Duration,
    /// Messages per second a cluster may send on its stream.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit: u32,
    /// The most services one cluster may export: an export beyond is refused (the stream ends
    /// with RESOURCE_EXHAUSTED naming the limit) and what was acknowledged before stays.
    #[arg(long, default_value_t = meshfed_model::validate::DEFAULT_MAX_SERVICES_PER_CLUSTER,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_services_per_cluster: usize,
    /// On SIGTERM, streams and requests get this long to finish before they are cut.
    #[arg(long, default_value = "5s", value_parser = args::std_duration)]
    drain_timeout: std::time::Duration,
    /// Start a federation root rotation when the active root is this old (`off`: only
    /// `meshfed ca rotate start --ca <state-dir>/ca`).
    #[arg(long, default_value = "off", value_parser = args::duration_or_off)]
    ca_rotation_period: args::MaybeDuration,
    /// How long a new federation root is published before it signs (it also waits until
    /// every member acknowledged the bundle carrying it).
    #[arg(long, default_value = "20m", value_parser = args::duration)]
    ca_publish_lead: time::Duration,
    /// Lifetime of cluster certificates (members renew at 50-80 % of it).
    #[arg(long, default_value = "7d", value_parser = args::duration)]
    cluster_cert_ttl: time::Duration,
    /// Lifetime of the federator's own serving certificate.
    #[arg(long, default_value = "24h", value_parser = args::duration)]
    serving_cert_ttl: time::Duration,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Manage join tokens.
    #[command(subcommand)]
    Token(Token),
}

#[derive(Debug, Subcommand)]
enum Token {
    /// Create a single-use join token bound to one cluster name.
    Create {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, value_parser = args::label)]
        cluster: String,
        #[arg(long, default_value = "15m", value_parser = args::duration)]
        ttl: time::Duration,
        /// Federator address(es) the joiner dials (default: what the federator advertises).
        #[arg(long)]
        federator: Vec<String>,
    },
    /// List join tokens and their state.
    List {
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Revoke a join token.
    Revoke {
        #[arg(long)]
        state_dir: PathBuf,
        /// Token id (from `token list`).
        id: String,
    },
}

pub async fn run(a: FederatorArgs) -> anyhow::Result<ExitCode> {
    if let Some(TokenCommand::Token(t)) = a.token {
        return token(t);
    }
    let state_dir = a.state_dir.context("--state-dir is required")?;
    let mut cfg = FederatorConfig::new(state_dir, a.listen);
    cfg.admin = a.admin.0;
    cfg.probe = a.probe.0;
    cfg.advertise = a.advertise;
    cfg.trust_domain = a.trust_domain;
    cfg.lease_ttl = a.lease_ttl;
    cfg.rate_limit = a.rate_limit;
    cfg.max_services_per_cluster = a.max_services_per_cluster;
    cfg.ca_rotation = meshfed_identity::live_ca::RotationPolicy {
        period: a.ca_rotation_period.0,
        publish_lead: a.ca_publish_lead,
    };
    cfg.cluster_cert_ttl = a.cluster_cert_ttl;
    cfg.server_cert_ttl = a.serving_cert_ttl;
    let f = Federator::start(cfg).await?;
    println!(
        "federator serving on {} (admin {})",
        f.grpc_addr,
        f.admin_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    let tasks = f.tasks().clone();
    Ok(super::serve_until_signal(&tasks, a.drain_timeout, f.drain(a.drain_timeout)).await)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token(t: Token) -> anyhow::Result<ExitCode> {
    match t {
        Token::Create {
            state_dir,
            cluster,
            ttl,
            federator,
        } => {
            let ca = FederationCa::open(&state_dir)?;
            let federators = if federator.is_empty() {
                let p = state_dir.join(ENDPOINTS_FILE);
                let raw = std::fs::read(&p).with_context(|| {
                    format!(
                        "{} not found: start the federator once or pass --federator HOST:PORT",
                        p.display()
                    )
                })?;
                serde_json::from_slice(&raw)
                    .with_context(|| format!("{} is malformed", p.display()))?
            } else {
                for (i, f) in federator.iter().enumerate() {
                    meshfed_model::validate::check_host_port(&format!("--federator #{}", i + 1), f)
                        .map_err(anyhow::Error::msg)?;
                }
                federator
            };
            let store = TokenStore::new(&state_dir);
            let (rec, tok) = store.create(
                &cluster,
                ttl.whole_seconds(),
                federators,
                ca.root_fingerprint(),
                ca.trust_domain.to_string(),
                now(),
            )?;
            eprintln!(
                "token {} for cluster {cluster}, single use, expires {}",
                rec.id,
                args::rfc3339_unix(rec.expires)
            );
            println!("{tok}");
        }
        Token::List { state_dir } => {
            let now = now();
            println!(
                "{:<18} {:<16} {:<9} {:<22} USED BY",
                "ID", "CLUSTER", "STATE", "EXPIRES"
            );
            for r in TokenStore::new(&state_dir).list()? {
                let state = if r.revoked {
                    "revoked"
                } else if r.used_by.is_some() {
                    "used"
                } else if now >= r.expires {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "{:<18} {:<16} {:<9} {:<22} {}",
                    r.id,
                    r.cluster,
                    state,
                    args::rfc3339_unix(r.expires),
                    r.used_by.unwrap_or_default()
                );
            }
        }
        Token::Revoke { state_dir, id } => {
            let r = TokenStore::new(&state_dir).revoke(&id)?;
            println!("revoked token {} (cluster {})", r.id, r.cluster);
        }
    }
    Ok(ExitCode::SUCCESS)
}
