//! `meshfed federator`, `meshfed federator token create|list|revoke`, `meshfed federator
//! admin-identity` and `meshfed federator evict`.

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
    command: Option<Command>,
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
    /// TLS handshakes the gRPC port runs at once; further connections wait in the kernel's
    /// accept queue and are taken in order (a reconnect storm of hundreds of clusters is
    /// served instead of timing out together).
    #[arg(long, default_value_t = meshfed_net::MAX_CONCURRENT_HANDSHAKES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    max_tls_handshakes: usize,
    /// How often tombstones of removed exports that every member has read are dropped (`off`:
    /// kept forever). A member that has not acknowledged them holds them back: evict members
    /// that are gone for good.
    #[arg(long, default_value = "60s", value_parser = args::duration_or_off)]
    tombstone_compaction: args::MaybeDuration,
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
enum Command {
    /// Manage join tokens.
    #[command(subcommand)]
    Token(Token),
    /// Make an operator's admin identity for the federator's admin API (token management and
    /// evict against a running federator or its replicas): a certificate
    /// spiffe://<federation>/admin/<name> signed by the federation CA, so it needs the CA
    /// (the state directory or etcd), which is root-equivalent anyway.
    AdminIdentity {
        /// The federator's state directory (sled), or --etcd-endpoints (replicas).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The operator's name (a DNS label), recorded with every change it makes.
        #[arg(long, value_parser = args::label)]
        name: String,
        /// Lifetime of the certificate (at most 7d; there is no revocation: keep it short).
        #[arg(long, default_value = "12h", value_parser = args::duration)]
        ttl: time::Duration,
        /// Where the federator's admin API is served, HOST:PORT (repeatable; default: what
        /// the federator advertises, every replica's with etcd).
        #[arg(long)]
        api: Vec<String>,
        /// Directory to write the identity into (created; the key is 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove a member that cannot leave by itself (a cluster that is gone): its exports are
    /// withdrawn from every importer, its certificates stop working, its streams end, and it
    /// may come back only with a new join token. Through the admin API.
    Evict {
        /// The cluster to remove.
        #[arg(value_parser = args::label)]
        cluster: String,
        /// Why, recorded with the eviction and shown in the status and to the cluster.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        admin: AdminApiArgs,
    },
}

/// How to reach the admin API: an admin identity, and optionally other addresses.
#[derive(Debug, Clone, Args)]
pub struct AdminApiArgs {
    /// An admin identity directory (`meshfed federator admin-identity --out DIR`).
    #[arg(long)]
    admin_identity: Option<PathBuf>,
    /// The admin API's address, HOST:PORT (repeatable; default: the identity's).
    #[arg(long)]
    api: Vec<String>,
}

impl AdminApiArgs {
    /// A client of the admin API, if an identity was given.
    fn client(
        &self,
    ) -> anyhow::Result<
        Option<proto::federation_admin_client::FederationAdminClient<tonic::transport::Channel>>,
    > {
        let Some(dir) = &self.admin_identity else {
            anyhow::ensure!(self.api.is_empty(), "--api needs --admin-identity");
            return Ok(None);
        };
        let id = meshfed_identity::admin::AdminIdentity::load(dir)?;
        id.check_current(now())?;
        let addrs = if self.api.is_empty() {
            id.file.federators.clone()
        } else {
            check_addresses("--api", &self.api)?;
            self.api.clone()
        };
        anyhow::ensure!(
            !addrs.is_empty(),
            "{} names no federator address: pass --api HOST:PORT",
            dir.display()
        );
        Ok(Some(
            proto::federation_admin_client::FederationAdminClient::new(meshfed_net::channel(
                addrs,
                id.client_config()?,
                "federator",
            )?),
        ))
    }
}

fn check_addresses(flag: &str, addrs: &[String]) -> anyhow::Result<()> {
    for (i, f) in addrs.iter().enumerate() {
        meshfed_model::validate::check_host_port(&format!("{flag} #{}", i + 1), f)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// An admin API refusal, said plainly.
fn admin_error(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
}

#[derive(Debug, Subcommand)]
enum Token {
    /// Create a single-use join token bound to one cluster name.
    Create {
        /// The federator's state directory (sled), or --etcd-endpoints (replicas), or
        /// --admin-identity (a running federator's admin API).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        admin: AdminApiArgs,
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
        /// The federator's state directory (sled), or --etcd-endpoints (replicas), or
        /// --admin-identity (a running federator's admin API).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        admin: AdminApiArgs,
    },
    /// Revoke a join token.
    Revoke {
        /// The federator's state directory (sled), or --etcd-endpoints (replicas), or
        /// --admin-identity (a running federator's admin API).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        admin: AdminApiArgs,
        /// Token id (from `token list`).
        id: String,
    },
}

pub async fn run(a: FederatorArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        Some(Command::Token(t)) => return token(t).await,
        Some(Command::AdminIdentity {
            state_dir,
            etcd,
            name,
            ttl,
            api,
            out,
        }) => return admin_identity(state_dir, &etcd, &name, ttl, api, &out),
        Some(Command::Evict {
            cluster,
            reason,
            admin,
        }) => return evict(&cluster, reason, &admin).await,
        None => {}
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
    cfg.max_handshakes = a.max_tls_handshakes;
    cfg.tombstone_compaction = a
        .tombstone_compaction
        .0
        .map(|d| std::time::Duration::try_from(d).context("--tombstone-compaction"))
        .transpose()?;
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

/// The admin API's client when --admin-identity was given (and no other home).
fn admin_home(
    state_dir: &Option<PathBuf>,
    etcd: &EtcdArgs,
    admin: &AdminApiArgs,
) -> anyhow::Result<
    Option<proto::federation_admin_client::FederationAdminClient<tonic::transport::Channel>>,
> {
    if admin.admin_identity.is_some() && (state_dir.is_some() || !etcd.etcd_endpoints.is_empty()) {
        anyhow::bail!(
            "--admin-identity goes to a running federator's admin API: give it without --state-dir or --etcd-endpoints"
        );
    }
    admin.client()
}

/// One row of `token list`.
fn token_row(id: &str, cluster: &str, revoked: bool, used_by: &str, expires: i64, now: i64) {
    let state = if revoked {
        "revoked"
    } else if !used_by.is_empty() {
        "used"
    } else if now >= expires {
        "expired"
    } else {
        "valid"
    };
    println!(
        "{:<18} {:<16} {:<9} {:<22} {}",
        id,
        cluster,
        state,
        args::rfc3339_unix(expires),
        used_by
    );
}

fn token_header() {
    println!(
        "{:<18} {:<16} {:<9} {:<22} USED BY",
        "ID", "CLUSTER", "STATE", "EXPIRES"
    );
}

async fn token(t: Token) -> anyhow::Result<ExitCode> {
    match t {
        Token::Create {
            state_dir,
            etcd,
            admin,
            cluster,
            ttl,
            federator,
        } => {
            if let Some(mut api) = admin_home(&state_dir, &etcd, &admin)? {
                check_addresses("--federator", &federator)?;
                let r = api
                    .create_token(proto::CreateJoinTokenRequest {
                        cluster: cluster.clone(),
                        ttl_seconds: ttl.whole_seconds(),
                        federators: federator,
                    })
                    .await
                    .map_err(|s| admin_error("create token", s))?
                    .into_inner();
                let rec = r.record.unwrap_or_default();
                eprintln!(
                    "token {} for cluster {cluster}, single use, expires {}",
                    rec.id,
                    args::rfc3339_unix(rec.expires)
                );
                println!("{}", r.token);
                return Ok(ExitCode::SUCCESS);
            }
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
        Token::List {
            state_dir,
            etcd,
            admin,
        } => {
            let now = now();
            if let Some(mut api) = admin_home(&state_dir, &etcd, &admin)? {
                let r = api
                    .list_tokens(proto::ListJoinTokensRequest {})
                    .await
                    .map_err(|s| admin_error("list tokens", s))?
                    .into_inner();
                token_header();
                for t in r.tokens {
                    token_row(&t.id, &t.cluster, t.revoked, &t.used_by, t.expires, now);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let home = TokenHome::open(state_dir, &etcd)?;
            token_header();
            for r in home.tokens().list()? {
                let used_by = r.used_by.unwrap_or_default();
                token_row(&r.id, &r.cluster, r.revoked, &used_by, r.expires, now);
            }
        }
        Token::Revoke {
            state_dir,
            etcd,
            admin,
            id,
        } => {
            if let Some(mut api) = admin_home(&state_dir, &etcd, &admin)? {
                let r = api
                    .revoke_token(proto::RevokeJoinTokenRequest { id })
                    .await
                    .map_err(|s| admin_error("revoke token", s))?
                    .into_inner();
                println!("revoked token {} (cluster {})", r.id, r.cluster);
                return Ok(ExitCode::SUCCESS);
            }
            let r = TokenHome::open(state_dir, &etcd)?.tokens().revoke(&id)?;
            println!("revoked token {} (cluster {})", r.id, r.cluster);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The longest admin certificate `admin-identity` makes.
const MAX_ADMIN_TTL: time::Duration = time::Duration::days(7);

fn admin_identity(
    state_dir: Option<PathBuf>,
    etcd: &EtcdArgs,
    name: &str,
    ttl: time::Duration,
    api: Vec<String>,
    out: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        ttl <= MAX_ADMIN_TTL && ttl >= time::Duration::minutes(1),
        "--ttl {ttl}: an admin certificate lives 1m to 7d (there is no revocation: keep it short)"
    );
    check_addresses("--api", &api)?;
    let home = TokenHome::open(state_dir, etcd)?;
    let issue = |ca: &FederationCa| -> anyhow::Result<_> {
        Ok((
            ca.issue_admin(name, ttl)?,
            ca.bundle(),
            ca.trust_domain.clone(),
        ))
    };
    let ((svid, bundle, td), federators) = match &home {
        TokenHome::Dir(d) => {
            let ca = FederationCa::open(d)?;
            let addrs = if api.is_empty() {
                std::fs::read(d.join(ENDPOINTS_FILE))
                    .ok()
                    .and_then(|raw| serde_json::from_slice(&raw).ok())
                    .unwrap_or_default()
            } else {
                api
            };
            (issue(&ca)?, addrs)
        }
        TokenHome::Etcd(a) => {
            let addrs = if api.is_empty() { a.replicas()? } else { api };
            (a.with_ca(issue)?, addrs)
        }
    };
    let expires = (time::OffsetDateTime::now_utc() + ttl).unix_timestamp();
    let file = meshfed_identity::admin::AdminFile {
        name: name.to_string(),
        federation_trust_domain: td.to_string(),
        federators,
        expires,
    };
    meshfed_identity::admin::AdminIdentity::write(out, &file, &svid, &bundle)?;
    println!(
        "admin identity spiffe://{td}/admin/{name} in {}, expires {}{}",
        out.display(),
        args::rfc3339_unix(expires),
        if file.federators.is_empty() {
            " (no federator address known: pass --api HOST:PORT when using it)".to_string()
        } else {
            format!(", for {}", file.federators.join(","))
        }
    );
    Ok(ExitCode::SUCCESS)
}

async fn evict(cluster: &str, reason: String, admin: &AdminApiArgs) -> anyhow::Result<ExitCode> {
    let mut api = admin
        .client()?
        .context("evict goes through the admin API: pass --admin-identity DIR")?;
    let r = api
        .evict(proto::EvictRequest {
            cluster: cluster.to_string(),
            reason,
        })
        .await
        .map_err(|s| admin_error(&format!("evict {cluster}"), s))?
        .into_inner();
    println!(
        "evicted cluster {cluster}: its exports are withdrawn at revision {}; it may join again only with a new token",
        r.revision
    );
    Ok(ExitCode::SUCCESS)
}
