//! `meshfed workload init | agent`: a pod joins the mesh (its certificate from the agent's CA
//! API with its service-account token, the trust bundles, a gRPC xDS bootstrap). The injection
//! webhook adds both to pods labelled `meshfed.io/inject: grpc`; every flag can come from the
//! environment the webhook sets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::args;

#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Obtain the pod's certificate and write its files and gRPC xDS bootstrap, then exit (an
    /// init container).
    Init(WorkloadArgs),
    /// The same, then keep it current: renew the certificate, follow the trust bundles, relay
    /// the pod's xDS to the agent over mTLS (a sidecar).
    Agent(WorkloadAgentArgs),
    /// Make a one-time token for a workload outside Kubernetes to obtain its first certificate
    /// with (`meshfed workload init --token-file`), beside the agent's state.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The cluster agent's state directory.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, value_parser = args::label)]
    namespace: String,
    #[arg(long, value_parser = args::label)]
    service_account: String,
    /// How long the token stays valid.
    #[arg(long, default_value = "10m", value_parser = args::std_duration)]
    ttl: Duration,
    /// Write the token here (0600) instead of printing it.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// The cluster agent's mTLS xDS address (repeatable: tried in order).
    #[arg(long, env = "MESHFED_AGENT", value_delimiter = ',', default_value = "meshfed-agent.meshfed-system.svc:15012", value_parser = args::host_port)]
    agent: Vec<String>,
    /// The TLS server name sent to the agent (its certificate is checked by its SPIFFE ID).
    #[arg(
        long,
        env = "MESHFED_AGENT_SERVER_NAME",
        default_value = "meshfed-agent.meshfed-system.svc"
    )]
    server_name: String,
    /// The cluster's trust domain.
    #[arg(long, env = "MESHFED_TRUST_DOMAIN", value_parser = args::trust_domain)]
    trust_domain: trust::TrustDomain,
    /// The pod's namespace (downward API: metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", value_parser = args::label)]
    namespace: String,
    /// The pod's service account (downward API: spec.serviceAccountName).
    #[arg(long, env = "SERVICE_ACCOUNT", value_parser = args::label)]
    service_account: String,
    /// The pod's name (downward API: metadata.name); outside Kubernetes leave it out.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod_name: String,
    /// The pod's IP, for the xDS node id (downward API: status.podIP).
    #[arg(long, env = "POD_IP")]
    pod_ip: Option<std::net::IpAddr>,
    /// The projected service-account token (audience: the agent's --token-audience).
    #[arg(
        long,
        env = "MESHFED_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/meshfed-token"
    )]
    token_file: PathBuf,
    /// The cluster's roots (PEM), to check the agent with; or the PEM itself in
    /// MESHFED_ROOT_CERTS (the webhook injects it).
    #[arg(long, env = "MESHFED_ROOT_CERT")]
    root_cert: Option<PathBuf>,
    /// Where the files go (an emptyDir shared with the application's containers).
    #[arg(long, env = "MESHFED_WORKLOAD_DIR", default_value = "/var/run/meshfed")]
    out: PathBuf,
    /// The xDS relay's address on the pod's loopback, named in the bootstrap (`agent` listens
    /// there; with `agent`, port 0 takes any free port).
    #[arg(long, env = "MESHFED_XDS_LISTEN", default_value = meshfed_workload::XDS_LISTEN, value_parser = args::socket_addr)]
    xds_listen: std::net::SocketAddr,
    /// The certificate lifetime to ask for (default: the agent's maximum, --sds-cert-ttl).
    #[arg(long, value_parser = args::std_duration)]
    cert_ttl: Option<Duration>,
    /// Give up after this long (the agent may be starting, or not have seen the pod yet).
    #[arg(long, default_value = "60s", value_parser = args::std_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub struct WorkloadAgentArgs {
    #[command(flatten)]
    common: WorkloadArgs,
    /// How long a drain may take.
    #[arg(long, default_value = "5s", value_parser = args::std_duration)]
    drain_timeout: Duration,
}

impl WorkloadArgs {
    fn config(self) -> meshfed_workload::WorkloadConfig {
        meshfed_workload::WorkloadConfig {
            agent: self.agent,
            server_name: self.server_name,
            trust_domain: self.trust_domain,
            namespace: self.namespace,
            service_account: self.service_account,
            pod_name: self.pod_name,
            pod_ip: self.pod_ip.map(|i| i.to_string()),
            token_file: self.token_file,
            root_cert: self.root_cert,
            root_pem: std::env::var("MESHFED_ROOT_CERTS")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            out: self.out,
            xds_listen: self.xds_listen,
            cert_ttl: self.cert_ttl,
        }
    }
}

fn print(o: &meshfed_workload::Obtained, out: &std::path::Path) {
    println!(
        "{} until {} (cluster {}, network {}, locality {}); bundles of {}; files in {}",
        o.id,
        args::rfc3339(o.expires),
        o.cluster,
        o.network,
        o.locality,
        o.trust_domains.join(", "),
        out.display()
    );
}

pub async fn run(c: WorkloadCommand) -> anyhow::Result<ExitCode> {
    match c {
        WorkloadCommand::Token(a) => {
            let id = meshfed_identity::cluster::ClusterIdentity::load(&a.state_dir)?;
            // The output is checked before a token exists.
            if let Some(dir) = a.out.as_ref().and_then(|o| o.parent()) {
                if !dir.as_os_str().is_empty() && !dir.is_dir() {
                    anyhow::bail!("--out {}: no such directory", dir.display());
                }
            }
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let (rec, token) = meshfed_identity::workload_token::create(
                &a.state_dir,
                &id.file.cluster,
                &id.file.trust_domain,
                &a.namespace,
                &a.service_account,
                i64::try_from(a.ttl.as_secs()).unwrap_or(i64::MAX),
                now,
            )?;
            match &a.out {
                Some(path) => {
                    if let Err(e) = trust::files::write_atomic(
                        path,
                        token.as_bytes(),
                        trust::files::PRIVATE_MODE,
                    ) {
                        let _ = meshfed_identity::workload_token::token_store(&a.state_dir)
                            .revoke(&rec.id);
                        anyhow::bail!(
                            "cannot write {} (the token was revoked): {e}",
                            path.display()
                        );
                    }
                    println!(
                        "one-time token {} for spiffe://{}/ns/{}/sa/{} in {}, expires {}",
                        rec.id,
                        id.file.trust_domain,
                        a.namespace,
                        a.service_account,
                        path.display(),
                        args::rfc3339_unix(rec.expires)
                    );
                }
                None => println!("{token}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkloadCommand::Init(a) => {
            let timeout = a.timeout;
            let cfg = a.config();
            let out = cfg.out.clone();
            let o = meshfed_workload::init(cfg, timeout).await?;
            print(&o, &out);
            Ok(ExitCode::SUCCESS)
        }
        WorkloadCommand::Agent(a) => {
            let timeout = a.common.timeout;
            let cfg = a.common.config();
            let out = cfg.out.clone();
            let agent = meshfed_workload::agent(cfg, timeout).await?;
            print(&agent.obtained, &out);
            println!("xDS relay on {}", agent.xds_relay);
            let tasks = agent.tasks().clone();
            Ok(
                super::serve_until_signal(&tasks, a.drain_timeout, agent.drain(a.drain_timeout))
                    .await,
            )
        }
    }
}
