//! `meshfed proxy-status` and `meshfed proxy-config`, like istioctl's: what each connected
//! proxy was sent and whether it accepted it, from an agent's admin endpoint.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::{EXIT_BAD_INPUT, EXIT_CHECK_FAILED};
use meshfed_xds::status::ProxyReport;
use meshfed_xds::Kind;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ProxyStatusArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: String,
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConfigType {
    All,
    Listener,
    Route,
    Cluster,
    Endpoint,
    /// SDS secrets (private keys redacted).
    Secret,
}

#[derive(Debug, Args)]
pub struct ProxyConfigArgs {
    /// The proxy's node id (or a unique prefix of it).
    proxy: String,
    /// Which resources to show.
    #[arg(value_enum, default_value = "all")]
    kind: ConfigType,
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: String,
}

/// Exit 1 when any proxy has a NACK.
pub async fn status(a: ProxyStatusArgs) -> anyhow::Result<ExitCode> {
    let v = meshfed_net::admin::fetch_json(&a.admin, "/debug/syncz").await?;
    let proxies: Vec<ProxyReport> = serde_json::from_value(v.clone())?;
    let nack = proxies.iter().any(|p| {
        p.types
            .values()
            .any(|t| t.state == meshfed_xds::status::SyncState::Nack)
    });
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text => {
            println!(
                "{:<48} {:<6} {:<22} {:<12} {:<10} {:<10} {:<10} {:<10}",
                "PROXY", "FLAVOR", "LOCALITY", "NETWORK", "CDS", "LDS", "EDS", "RDS"
            );
            for p in &proxies {
                let col = |k: Kind| match p.types.get(k.short()) {
                    Some(t) => format!("{} ({})", t.state, t.sent_version),
                    None => "-".into(),
                };
                println!(
                    "{:<48} {:<6} {:<22} {:<12} {:<10} {:<10} {:<10} {:<10}",
                    p.proxy,
                    p.flavor,
                    p.locality,
                    p.network,
                    col(Kind::Cluster),
                    col(Kind::Listener),
                    col(Kind::Endpoint),
                    col(Kind::Route)
                );
                for (k, t) in &p.types {
                    if let Some(e) = &t.error {
                        println!("  {k} NACK: {e}");
                    }
                }
            }
            if proxies.is_empty() {
                println!("(no proxies connected)");
            }
        }
    }
    Ok(if nack {
        ExitCode::from(EXIT_CHECK_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn config(a: ProxyConfigArgs) -> anyhow::Result<ExitCode> {
    if a.proxy.is_empty() || a.proxy.len() > meshfed_xds::node::MAX_NODE_ID {
        eprintln!(
            "error: PROXY must be a node id of 1-{} bytes",
            meshfed_xds::node::MAX_NODE_ID
        );
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    let kind = match a.kind {
        ConfigType::All => "all",
        ConfigType::Listener => "listener",
        ConfigType::Route => "route",
        ConfigType::Cluster => "cluster",
        ConfigType::Endpoint => "endpoint",
        ConfigType::Secret => "secret",
    };
    let mut q = String::from("/debug/config_dump?proxy=");
    for b in a.proxy.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    q.push_str("&type=");
    q.push_str(kind);
    let v = meshfed_net::admin::fetch_json(&a.admin, &q).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}
