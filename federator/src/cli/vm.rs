//! `meshfed vm bootstrap | agent | list | revoke`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::args;
use meshfed_vm::package::{self, Bootstrap, Format};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Make a VM bootstrap package (one-time token bound to a WorkloadGroup) on the cluster side.
    Bootstrap(Box<BootstrapArgs>),
    /// Run on the VM: join (first start) or reconnect, register, probe, certificates, DNS.
    Agent(VmAgentArgs),
    /// The VMs that joined this cluster, and its VM tokens.
    List(ListArgs),
    /// Revoke a VM: its credential stops working at once (its entry goes after the grace period).
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// The cluster agent's state directory (its identity and CA): the token is made there.
    #[arg(long, required_unless_present = "agent", conflicts_with = "agent")]
    state_dir: Option<PathBuf>,
    /// Or: make the token at the running agent (its mTLS xDS address, e.g.
    /// meshfed-agent.meshfed-system.svc:15012 through a port-forward), which asks the API
    /// server who --bearer-token-file is and whether it may update the WorkloadGroup.
    #[arg(long, value_parser = args::host_port)]
    agent: Option<String>,
    /// With --agent: the TLS server name sent to the agent (checked by its SPIFFE ID).
    #[arg(
        long,
        default_value = "meshfed-agent.meshfed-system.svc",
        requires = "agent"
    )]
    agent_server_name: String,
    /// With --agent: the cluster's roots (PEM) to check the agent with, e.g. the injection
    /// webhook's caBundle, which the agent keeps current.
    #[arg(long, requires = "agent")]
    root_cert: Option<PathBuf>,
    /// With --agent: the cluster's trust domain.
    #[arg(long, requires = "agent", value_parser = args::trust_domain)]
    trust_domain: Option<trust::TrustDomain>,
    /// With --agent: a file holding your Kubernetes bearer token (`kubectl create token ...`).
    #[arg(long, requires = "agent")]
    bearer_token_file: Option<PathBuf>,
    /// The agent's registry file, which holds the WorkloadGroup.
    #[arg(
        long,
        required_unless_present_any = ["kubernetes", "agent"],
        conflicts_with_all = ["kubernetes", "agent"]
    )]
    registry: Option<PathBuf>,
    /// Read the WorkloadGroup from the Kubernetes API instead (networking.istio.io/v1, as the
    /// agent's `--source kubernetes` does).
    #[arg(long, conflicts_with = "agent")]
    kubernetes: bool,
    /// With --kubernetes: the kubeconfig (default: the in-cluster configuration).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, value_parser = args::label)]
    group: String,
    #[arg(long, value_parser = args::label)]
    namespace: String,
    /// Output: a directory (dir), or OUT.tar.gz / OUT.deb.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "dir")]
    format: Format,
    /// How long the one-time token stays valid.
    #[arg(long, default_value = "1h", value_parser = args::std_duration)]
    token_ttl: Duration,
    /// The VM's network, when it is not the cluster's.
    #[arg(long, value_parser = args::label)]
    vm_network: Option<String>,
    /// The VM API address(es) the VM dials (default: the cluster's east-west gateways).
    #[arg(long, value_parser = args::host_port)]
    control_plane: Vec<String>,
    /// The mTLS xDS address (default: the first control-plane address; a gateway tells the two
    /// apart by SNI).
    #[arg(long, value_parser = args::host_port)]
    xds: Option<String>,
}

#[derive(Debug, Args)]
pub struct VmAgentArgs {
    /// The VM's configuration, as `meshfed vm bootstrap` wrote it. Fields (camelCase; docs/vm.md
    /// has the table with defaults): cluster, trustDomain, network, namespace, group,
    /// serviceAccount, controlPlane (required); xds, controlPlaneSni, xdsSni, rootCert,
    /// tokenFile, stateDir, certDir, address, vmNetwork, locality, labels, xdsListen,
    /// dnsListen, dnsUpstream, admin, drainTimeout.
    #[arg(long, default_value = "/etc/meshfed/vm.yaml")]
    config: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[arg(long)]
    state_dir: PathBuf,
    /// The VM id (`meshfed vm list`).
    vm_id: String,
}

pub async fn run(c: VmCommand) -> anyhow::Result<ExitCode> {
    match c {
        VmCommand::Bootstrap(a) => {
            let a = *a;
            let output = package::Output {
                out: a.out.clone(),
                format: a.format,
                token_ttl: a.token_ttl,
                vm_network: a.vm_network.clone(),
                control_plane: a.control_plane.clone(),
                xds: a.xds.clone(),
                binary: None,
            };
            let built = match (&a.agent, &a.state_dir) {
                (Some(agent), _) => {
                    let need = |what: &str| anyhow::anyhow!("--agent needs {what}");
                    let root = a
                        .root_cert
                        .clone()
                        .ok_or_else(|| need("--root-cert FILE"))?;
                    let td = a
                        .trust_domain
                        .clone()
                        .ok_or_else(|| need("--trust-domain"))?;
                    let bearer_file = a
                        .bearer_token_file
                        .clone()
                        .ok_or_else(|| need("--bearer-token-file FILE"))?;
                    let pem = std::fs::read(&root)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", root.display()))?;
                    let roots = trust::keys::certs_from_pem(&pem, &root.display().to_string())?;
                    let bearer = std::fs::read_to_string(&bearer_file).map_err(|e| {
                        anyhow::anyhow!("cannot read {}: {e}", bearer_file.display())
                    })?;
                    package::build_at_agent(
                        &package::Remote {
                            agent: vec![agent.clone()],
                            server_name: a.agent_server_name.clone(),
                            roots,
                            trust_domain: td,
                            bearer,
                            namespace: a.namespace.clone(),
                            group: a.group.clone(),
                        },
                        &output,
                    )
                    .await?
                }
                (None, Some(state_dir)) => {
                    let group_from = match a.registry {
                        Some(path) => package::GroupFrom::Registry(path),
                        None => package::GroupFrom::Object(Box::new(
                            kube_group(a.kubeconfig.as_deref(), &a.namespace, &a.group).await?,
                        )),
                    };
                    package::build(&Bootstrap {
                        agent_state_dir: state_dir.clone(),
                        group_from,
                        namespace: a.namespace.clone(),
                        group: a.group.clone(),
                        output,
                    })?
                }
                (None, None) => anyhow::bail!("give --state-dir DIR or --agent HOST:PORT"),
            };
            println!(
                "VM bootstrap package for WorkloadGroup {}/{}: {}",
                a.namespace,
                a.group,
                built.path.display()
            );
            println!(
                "one-time token {} expires {} (keep the package secret until the VM has joined)",
                built.token_id,
                meshfed_model::entry::rfc3339(built.expires * 1000)
            );
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Agent(a) => {
            let cfg = meshfed_vm_agent::config::VmConfig::load(&a.config)
                .map_err(|e| anyhow::anyhow!(e))?;
            let deadline = cfg.drain_timeout;
            let agent = meshfed_vm_agent::start(cfg).await?;
            let st = agent.status();
            println!(
                "VM {} of {}/{} in cluster {} running (address {}, DNS {}, xDS relay {})",
                st.vm_id,
                st.namespace,
                st.group,
                st.cluster,
                st.address,
                st.dns.as_deref().unwrap_or("off"),
                st.xds_relay.as_deref().unwrap_or("off"),
            );
            let tasks = agent.tasks().clone();
            Ok(super::serve_until_signal(&tasks, deadline, agent.drain(deadline)).await)
        }
        VmCommand::List(a) => {
            let vms = meshfed_vm::token::VmStore::new(&a.state_dir).list()?;
            println!(
                "{:<18} {:<28} {:<16} {:<8} LAST SEEN",
                "VM", "GROUP", "SA", "STATE"
            );
            for v in vms {
                println!(
                    "{:<18} {:<28} {:<16} {:<8} {}",
                    v.vm_id,
                    format!("{}/{}", v.namespace, v.group),
                    v.service_account,
                    if v.revoked { "revoked" } else { "active" },
                    meshfed_model::entry::rfc3339(v.last_seen * 1000)
                );
            }
            let tokens = meshfed_vm::token::token_store(&a.state_dir).list()?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            println!();
            println!("{:<18} {:<48} STATE", "TOKEN", "BOUND TO");
            for t in tokens {
                let state = if t.revoked {
                    "revoked".to_string()
                } else if let Some(by) = &t.used_by {
                    format!("used by {by}")
                } else if now >= t.expires {
                    "expired".to_string()
                } else {
                    format!("valid for {} s", t.expires - now)
                };
                println!("{:<18} {:<48} {state}", t.id, t.cluster);
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Revoke(a) => {
            let store = meshfed_vm::token::VmStore::new(&a.state_dir);
            store
                .update(&a.vm_id, |r| r.revoked = true)?
                .ok_or_else(|| anyhow::anyhow!("no VM {} in {}", a.vm_id, a.state_dir.display()))?;
            println!("VM {} revoked", a.vm_id);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The WorkloadGroup `namespace/name` from the Kubernetes API, checked as the agent checks it.
async fn kube_group(
    kubeconfig: Option<&std::path::Path>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<meshfed_model::workload::WorkloadGroup> {
    let client = meshfed_kube::source::client(kubeconfig).await?;
    meshfed_kube::source::workload_group(client, namespace, name).await
}
