//! The `meshfed` command line. Only commands that work exist.

mod args;
mod bundle;
mod ca;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad input or a failed operation (clap uses 2 for usage errors too).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for a check that ran and found a problem (e.g. an invalid chain).
pub const EXIT_CHECK_FAILED: u8 = 1;

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
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ca(c) => ca::run(c),
        Command::Bundle(c) => bundle::run(c),
    }
}
