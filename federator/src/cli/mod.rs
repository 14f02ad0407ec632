//! The `meshfed` command line. Only commands that work exist.

mod agent;
mod analyze;
mod args;
mod bundle;
mod ca;
mod federator;
mod gateway;
mod policy;
mod proxy;
mod status;
mod vm;
mod workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad input or a failed operation (clap uses 2 for usage errors too).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for a check that ran and found a problem (e.g. an invalid chain, an unhealthy status).
pub const EXIT_CHECK_FAILED: u8 = 1;
/// `meshfed status`: this component is healthy, but another cluster is stale, disconnected
/// or in conflict.
pub const EXIT_PEERS_DEGRADED: u8 = 3;

/// Whether a command runs a server (the federator, an agent, a gateway, a VM agent, the demo)
/// rather than printing a result and ending.
pub fn is_server(c: &Command) -> bool {
    matches!(
        c,
        Command::Federator(_)
            | Command::Agent(_)
            | Command::Gateway(_)
            | Command::Demo(_)
            | Command::Vm(vm::VmCommand::Agent(_))
            | Command::Workload(workload::WorkloadCommand::Agent(_))
    )
}

/// An error and its causes on one line, joined by ": ", each said once: a cause whose text the
/// line already holds (an error that prints its source, then the source itself) is left out.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for part in e.chain().map(|c| c.to_string()) {
        if part.is_empty() || out.contains(&part) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&part);
    }
    out
}

#[cfg(test)]
mod one_line_tests {
    #[test]
    fn a_reason_is_said_once() {
        let io = std::io::Error::from_raw_os_error(1);
        let inner = anyhow::Error::new(io).context(format!(
            "cannot create /x: {}",
            std::io::Error::from_raw_os_error(1)
        ));
        let e = inner.context("vm bootstrap");
        let line = super::one_line(&e);
        assert_eq!(line.matches("Operation not permitted").count(), 1, "{line}");
        assert!(
            line.starts_with("vm bootstrap: cannot create /x: "),
            "{line}"
        );
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "meshfed",
    version,
    about = "Multi-cluster service-mesh federation",
    long_about = "meshfed federates service meshes running in several clusters and VMs on different networks: \
                  per-cluster certificate authorities and SPIFFE trust bundles, exported services, east-west \
                  gateways and locality-aware failover."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage a cluster's certificate authority (Istio `cacerts` layout).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Show and check SPIFFE trust bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Run the federation service, or manage its join tokens.
    Federator(Box<federator::FederatorArgs>),
    /// Join this cluster to a federation (creates the cluster's keys locally).
    Join(agent::JoinArgs),
    /// Run the per-cluster control plane.
    Agent(Box<agent::AgentArgs>),
    /// Leave the federation: this cluster's exports and bundle are removed everywhere.
    Leave(agent::LeaveArgs),
    /// Show the measured state of a federator or an agent (exit 1 when it is unhealthy, 3 when
    /// only another cluster is).
    Status(status::StatusArgs),
    /// Run the east-west gateway: SNI passthrough on 15443, routes from the local agent's xDS.
    Gateway(gateway::GatewayArgs),
    /// Check failover policies against endpoints: the effective priority table.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Per connected proxy and xDS type: SYNCED, STALE or NACK, with versions (exit 1 on NACK).
    ProxyStatus(proxy::ProxyStatusArgs),
    /// What the agent sent to one proxy, as Envoy JSON.
    ProxyConfig(proxy::ProxyConfigArgs),
    /// VMs: bootstrap packages, the VM agent, joined VMs.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Pods: obtain the certificate and gRPC xDS bootstrap (init), keep them current (agent).
    #[command(subcommand)]
    Workload(workload::WorkloadCommand),
    /// Run a whole federation on this machine and show it working (--check: assert and exit).
    Demo(DemoArgs),
    /// Print the CustomResourceDefinitions meshfed reads (FailoverPolicy; with --mcs also the
    /// MCS ServiceExport and ServiceImport) as YAML for `kubectl apply -f -`.
    Crds(CrdsArgs),
    /// Problems across the federation (stale or conflicting members, unreachable networks,
    /// missing or expiring bundles and certificates, NACKs, risky policies), from federators',
    /// agents' and policy files' views; exit 1 when any is an error.
    Analyze(analyze::AnalyzeArgs),
    /// The dashboard of a federator's (the federation) or an agent's (its cluster) admin server:
    /// checks that it answers, prints its URL, and opens it where a desktop browser is available.
    Dashboard(DashboardArgs),
}

#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// The admin address of a federator (15101) or an agent (15014).
    #[arg(long, default_value = "127.0.0.1:15101", value_parser = args::host_port)]
    admin: String,
    /// Print the URL only; do not open a browser.
    #[arg(long)]
    no_open: bool,
}

/// `meshfed dashboard`.
async fn dashboard(a: DashboardArgs) -> anyhow::Result<ExitCode> {
    let status = meshfed_net::dashboard::first_status(&a.admin)
        .await
        .map_err(|e| anyhow::anyhow!("no dashboard at {}: {e:#}", a.admin))?;
    let url = format!("http://{}/ui/", a.admin);
    // A federator's stream carries its clusters; an agent's, its own status and proxies.
    match status["clusters"].as_array() {
        Some(c) => println!(
            "{url}  ({} clusters; live while this federator runs)",
            c.len()
        ),
        None => println!(
            "{url}  (cluster {}; live while this agent runs)",
            status["status"]["cluster"].as_str().unwrap_or("?")
        ),
    }
    let desktop =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !a.no_open && desktop {
        match std::process::Command::new("xdg-open").arg(&url).status() {
            Ok(s) if s.success() => {}
            _ => println!("(could not open a browser: open the URL yourself)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct CrdsArgs {
    /// Also the MCS CRDs (multicluster.x-k8s.io/v1alpha1), for a cluster that does not have
    /// them from kubernetes-sigs/mcs-api.
    #[arg(long)]
    mcs: bool,
}

/// The CRDs `meshfed crds` prints, as YAML.
pub fn crds_yaml(mcs: bool) -> anyhow::Result<String> {
    let mut all = vec![meshfed_kube::crds::failover_policy()?];
    if mcs {
        all.extend(meshfed_kube::crds::mcs()?);
    }
    meshfed_kube::crds::to_yaml(&all)
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the demo's state here (default: a temporary directory, removed afterwards).
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// Assert every expected outcome, print one line per assertion, exit 0 only if all hold.
    #[arg(long)]
    check: bool,
    /// auto: a network namespace per cluster when root with `ip`, loopback otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    network: meshfed_demo::NetworkMode,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ca(c) => ca::run(c),
        Command::Bundle(c) => bundle::run(c),
        Command::Federator(a) => runtime()?.block_on(federator::run(*a)),
        Command::Join(a) => runtime()?.block_on(agent::join(a)),
        Command::Agent(a) => runtime()?.block_on(agent::run(*a)),
        Command::Leave(a) => runtime()?.block_on(agent::leave(a)),
        Command::Status(a) => runtime()?.block_on(status::run(a)),
        Command::Policy(c) => policy::run(c),
        Command::Gateway(a) => runtime()?.block_on(gateway::run(a)),
        Command::ProxyStatus(a) => runtime()?.block_on(proxy::status(a)),
        Command::ProxyConfig(a) => runtime()?.block_on(proxy::config(a)),
        Command::Vm(c) => runtime()?.block_on(vm::run(c)),
        Command::Workload(c) => runtime()?.block_on(workload::run(c)),
        Command::Dashboard(a) => runtime()?.block_on(dashboard(a)),
        Command::Analyze(a) => runtime()?.block_on(analyze::run(a)),
        Command::Crds(a) => {
            print!("{}", crds_yaml(a.mcs)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(a) => {
            let opts = meshfed_demo::DemoOptions {
                state_dir: a.state_dir,
                check: a.check,
                network: a.network,
            };
            let ok = runtime()?.block_on(async {
                tokio::select! {
                    r = meshfed_demo::run(opts) => r,
                    _ = shutdown_signal() => {
                        println!("interrupted; cleaning up");
                        Ok(false)
                    }
                }
            })?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CHECK_FAILED)
            })
        }
    }
}

/// Serves until SIGTERM or Ctrl-C, then runs `drain` (which has `deadline`). A second signal
/// during the drain cuts it short (exit 1).
pub(crate) async fn serve_until_signal(
    tasks: &meshfed_net::drain::Tasks,
    deadline: std::time::Duration,
    drain: impl std::future::Future<Output = meshfed_net::drain::DrainReport>,
) -> ExitCode {
    shutdown_signal().await;
    println!(
        "draining (deadline {})",
        humantime::format_duration(deadline)
    );
    tokio::select! {
        r = drain => {
            println!("{r}");
            ExitCode::SUCCESS
        }
        _ = shutdown_signal() => {
            tasks.abort_all();
            println!("second signal: stopped without finishing the drain");
            ExitCode::from(EXIT_CHECK_FAILED)
        }
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Every flag's value parser agrees with the field it fills: clap checks that only when
    /// the parsed command is built, so each command is parsed here with its defaults.
    #[test]
    fn commands_parse_with_their_defaults() {
        for argv in [
            &["meshfed", "agent", "--state-dir", "s", "--registry", "r"][..],
            &[
                "meshfed",
                "agent",
                "--state-dir",
                "s",
                "--registry",
                "r",
                "--ca-rotation-period",
                "90d",
            ],
            &["meshfed", "federator", "--state-dir", "s"],
            &["meshfed", "gateway", "--xds", "127.0.0.1:15010"],
            &["meshfed", "ca", "rotate", "start", "--state-dir", "s"],
            &["meshfed", "ca", "rotate", "status", "--ca", "c"],
            &[
                "meshfed",
                "ca",
                "rotate",
                "activate",
                "--state-dir",
                "s",
                "--force",
            ],
        ] {
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("{argv:?}: {e}");
            }
        }
        // One CA location, not both.
        assert!(Cli::try_parse_from([
            "meshfed",
            "ca",
            "rotate",
            "start",
            "--state-dir",
            "s",
            "--ca",
            "c"
        ])
        .is_err());
    }
}
