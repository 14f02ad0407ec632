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
    /// Where the federation's state lives: `sled` (in the state directory; one federator) or
    /// `etcd` (shared by replicas: the store, join tokens, the federation CA).
    #[arg(long, default_value = "sled", value_parser = ["sled", "etcd"])]
    store: String,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// How to reach etcd (`--store etcd`, and the token commands without a state directory).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd members, comma-separated or repeated: `host:port`, `http://host:port`, or
    /// `https://host:port` (with --etcd-ca).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Every key lives under this prefix (several federations may share one etcd).
    #[arg(long, default_value = meshfed_store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA of etcd's serving certificates: TLS to etcd (with --etcd-cert and --etcd-key: mTLS).
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// This client's certificate for etcd (PEM).
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// This client's key for etcd (PEM).
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// How long one etcd request may take; a write that cannot commit within it fails and is
    /// not acknowledged.
    #[arg(long, default_value = "5s", value_parser = args::std_duration)]
    etcd_timeout: std::time::Duration,
}

impl EtcdArgs {
    /// The etcd configuration, if endpoints were given; every flag checked by name.
    pub fn config(&self) -> anyhow::Result<Option<meshfed_store::etcd::EtcdConfig>> {
        if self.etcd_endpoints.is_empty() {
            if self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some() {
                anyhow::bail!("--etcd-ca, --etcd-cert and --etcd-key need --etcd-endpoints");
            }
            return Ok(None);
        }
        let tls = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(meshfed_store::etcd::EtcdTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => anyhow::bail!(
                "--etcd-ca, --etcd-cert and --etcd-key go together (mTLS to etcd): give all three or none"
            ),
        };
        let mut endpoints = Vec::new();
        for (i, e) in self.etcd_endpoints.iter().enumerate() {
            endpoints
                .push(etcd_endpoint(e, tls.is_some()).map_err(|why| {
                    anyhow::anyhow!("--etcd-endpoints #{} ({e:?}): {why}", i + 1)
                })?);
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.trim_end_matches('/').is_empty() {
            anyhow::bail!(
                "--etcd-prefix {:?}: a key prefix starting with '/' and naming something (e.g. /meshfed)",
                self.etcd_prefix
            );
        }
        Ok(Some(meshfed_store::etcd::EtcdConfig {
            endpoints,
            prefix: self.etcd_prefix.clone(),
            tls,
            timeout: self.etcd_timeout,
        }))
    }
}

/// An etcd endpoint as the client dials it: `http(s)://host:port`.
fn etcd_endpoint(e: &str, tls: bool) -> Result<String, String> {
    let (scheme, rest) = match e.split_once("://") {
        Some((s, r)) => (s, r),
        None => (if tls { "https" } else { "http" }, e),
    };
    match (scheme, tls) {
        ("http", true) => return Err("http:// with --etcd-ca: use https://".into()),
        ("https", false) => {
            return Err("https:// needs --etcd-ca (and --etcd-cert, --etcd-key)".into())
        }
        ("http" | "https", _) => {}
        (other, _) => return Err(format!("scheme {other:?}: use http:// or https://")),
    }
    meshfed_model::validate::check_host_port("endpoint", rest.trim_end_matches('/'))
        .map_err(|e| e.reason)?;
    Ok(format!("{scheme}://{}", rest.trim_end_matches('/')))
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
        /// The federator's state directory (sled), or --etcd-endpoints (replicas).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
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
        /// The federator's state directory (sled), or --etcd-endpoints (replicas).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Revoke a join token.
    Revoke {
        /// The federator's state directory (sled), or --etcd-endpoints (replicas).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Token id (from `token list`).
        id: String,
    },
}

pub async fn run(a: FederatorArgs) -> anyhow::Result<ExitCode> {
    if let Some(TokenCommand::Token(t)) = a.token {
        return token(t);
    }
    let state_dir = a.state_dir.context("--state-dir is required")?;
    let etcd = a.etcd.config()?;
    let store = match (a.store.as_str(), etcd) {
        ("etcd", Some(e)) => meshfed_federation::StoreChoice::Etcd(e),
        ("etcd", None) => anyhow::bail!("--store etcd needs --etcd-endpoints"),
        (_, Some(_)) => anyhow::bail!("--etcd-endpoints is for --store etcd (the store is sled)"),
        _ => meshfed_federation::StoreChoice::Sled,
    };
    let mut cfg = FederatorConfig::new(state_dir, a.listen);
    cfg.store = store;
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

/// Where the token commands find the tokens: a state directory or etcd, exactly one.
enum TokenHome {
    Dir(PathBuf),
    Etcd(Box<meshfed_federation::shared::EtcdAdmin>),
}

impl TokenHome {
    fn open(state_dir: Option<PathBuf>, etcd: &EtcdArgs) -> anyhow::Result<Self> {
        match (state_dir, etcd.config()?) {
            (Some(d), None) => Ok(TokenHome::Dir(d)),
            (None, Some(e)) => Ok(TokenHome::Etcd(Box::new(
                meshfed_federation::shared::EtcdAdmin::open(&e)?,
            ))),
            (Some(_), Some(_)) => anyhow::bail!(
                "--state-dir and --etcd-endpoints: give one (the state directory of a sled federator, or the etcd of replicas)"
            ),
            (None, None) => anyhow::bail!(
                "--state-dir (a sled federator) or --etcd-endpoints (replicas) is required"
            ),
        }
    }

    fn tokens(&self) -> TokenStore {
        match self {
            TokenHome::Dir(d) => TokenStore::new(d),
            TokenHome::Etcd(a) => a.tokens.clone(),
        }
    }
}

fn token(t: Token) -> anyhow::Result<ExitCode> {
    match t {
        Token::Create {
            state_dir,
            etcd,
            cluster,
            ttl,
            federator,
        } => {
            let home = TokenHome::open(state_dir, &etcd)?;
            let (fingerprint, td) = match &home {
                TokenHome::Dir(d) => {
                    let ca = FederationCa::open(d)?;
                    (ca.root_fingerprint(), ca.trust_domain.clone())
                }
                TokenHome::Etcd(a) => a.federation()?,
            };
            let federators = if federator.is_empty() {
                match &home {
                    TokenHome::Dir(d) => {
                        let p = d.join(ENDPOINTS_FILE);
                        let raw = std::fs::read(&p).with_context(|| {
                            format!(
                                "{} not found: start the federator once or pass --federator HOST:PORT",
                                p.display()
                            )
                        })?;
                        serde_json::from_slice(&raw)
                            .with_context(|| format!("{} is malformed", p.display()))?
                    }
                    TokenHome::Etcd(a) => {
                        let r = a.replicas()?;
                        anyhow::ensure!(
                            !r.is_empty(),
                            "no replica has registered its address in etcd: start one, or pass --federator HOST:PORT"
                        );
                        r
                    }
                }
            } else {
                for (i, f) in federator.iter().enumerate() {
                    meshfed_model::validate::check_host_port(&format!("--federator #{}", i + 1), f)
                        .map_err(anyhow::Error::msg)?;
                }
                federator
            };
            let (rec, tok) = home.tokens().create(
                &cluster,
                ttl.whole_seconds(),
                federators,
                fingerprint,
                td.to_string(),
                now(),
            )?;
            eprintln!(
                "token {} for cluster {cluster}, single use, expires {}",
                rec.id,
                args::rfc3339_unix(rec.expires)
            );
            println!("{tok}");
        }
        Token::List { state_dir, etcd } => {
            let home = TokenHome::open(state_dir, &etcd)?;
            let now = now();
            println!(
                "{:<18} {:<16} {:<9} {:<22} USED BY",
                "ID", "CLUSTER", "STATE", "EXPIRES"
            );
            for r in home.tokens().list()? {
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
        Token::Revoke {
            state_dir,
            etcd,
            id,
        } => {
            let r = TokenHome::open(state_dir, &etcd)?.tokens().revoke(&id)?;
            println!("revoked token {} (cluster {})", r.id, r.cluster);
        }
    }
    Ok(ExitCode::SUCCESS)
}
