//! `meshfed join`, `meshfed agent` and `meshfed leave`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use trust::TrustDomain;

use super::args;
use crate::agent::identity::{self, ClusterIdentity, JoinParams};
use crate::agent::{Agent, AgentConfig};

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Join token from `meshfed federator token create`.
    #[arg(long, env = "MESHFED_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// This cluster's state directory (its CA, identity and cache live here).
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, value_parser = args::label)]
    cluster: String,
    #[arg(long, value_parser = args::label)]
    network: String,
    #[arg(long, value_parser = args::trust_domain)]
    trust_domain: TrustDomain,
    /// Default locality of the cluster's workloads: region/zone/subzone.
    #[arg(long, value_parser = args::locality)]
    locality: proto::Locality,
    /// East-west gateway address, HOST:PORT (repeatable).
    #[arg(long, value_parser = args::host_port)]
    gateway: Vec<String>,
    /// Use this existing meshfed CA directory as the cluster CA (default: create one).
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long)]
    state_dir: PathBuf,
    /// The registry file (YAML) listing the cluster's services and exports.
    #[arg(long)]
    registry: PathBuf,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /status).
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: String,
    /// How often the registry file is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = args::std_duration)]
    registry_poll: Duration,
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    #[arg(long)]
    state_dir: PathBuf,
}

pub async fn join(a: JoinArgs) -> anyhow::Result<ExitCode> {
    let id = identity::join(JoinParams {
        token: a.token,
        state_dir: a.state_dir.clone(),
        cluster: a.cluster,
        network: a.network,
        trust_domain: a.trust_domain,
        locality: a.locality,
        gateways: a.gateway,
        ca: a.ca,
    })
    .await?;
    println!(
        "joined as {} (federation {})",
        id.svid.id, id.file.federation_trust_domain
    );
    println!("federator: {}", id.file.federators.join(", "));
    println!("identity written to {}", id.dir.display());
    Ok(ExitCode::SUCCESS)
}

pub async fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    let agent = Agent::start(AgentConfig {
        state_dir: a.state_dir,
        registry: a.registry,
        admin: Some(a.admin),
        registry_poll: a.registry_poll,
    })
    .await?;
    println!(
        "agent for cluster {} running (admin {})",
        agent.inner.identity().file.cluster,
        agent.admin_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    super::shutdown_signal().await;
    agent.stop();
    Ok(ExitCode::SUCCESS)
}

pub async fn leave(a: LeaveArgs) -> anyhow::Result<ExitCode> {
    let id = ClusterIdentity::load(&a.state_dir)?;
    let (cfg, _) = id.client_config()?;
    let mut client = proto::federation_client::FederationClient::new(crate::net::channel(
        id.file.federators.clone(),
        cfg,
        "federator",
    )?);
    let resp = client
        .leave(proto::LeaveRequest {})
        .await
        .map_err(|s| identity::describe_status("the federator refused the leave", &s))?
        .into_inner();
    // The identity is kept aside (not deleted) for the record; a new join needs a new token.
    let dir = identity::identity_dir(&a.state_dir);
    let aside = a.state_dir.join(format!(
        "identity.left-{}",
        time::OffsetDateTime::now_utc().unix_timestamp()
    ));
    std::fs::rename(&dir, &aside)
        .with_context(|| format!("cannot move {} aside", dir.display()))?;
    println!(
        "cluster {} left the federation at revision {}",
        id.file.cluster, resp.revision
    );
    Ok(ExitCode::SUCCESS)
}
