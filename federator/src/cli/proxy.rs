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

/// What a proxy is: a gateway (`router~` node, meshfed's east-west gateway or Istio's), a
/// proxyless gRPC client, or an Envoy sidecar.
fn proxy_type(p: &ProxyReport) -> &str {
    if p.kind == "router" {
        "gateway"
    } else {
        &p.flavor
    }
}

/// The `proxy-status` table, each column as wide as its longest value (node ids are long).
fn status_table(proxies: &[ProxyReport]) -> String {
    let col = |p: &ProxyReport, k: Kind| match p.types.get(k.short()) {
        Some(t) => format!("{} ({})", t.state, t.sent_version),
        None => "-".into(),
    };
    let rows: Vec<[String; 8]> = proxies
        .iter()
        .map(|p| {
            [
                p.proxy.clone(),
                proxy_type(p).to_string(),
                p.locality.clone(),
                p.network.clone(),
                col(p, Kind::Cluster),
                col(p, Kind::Listener),
                col(p, Kind::Endpoint),
                col(p, Kind::Route),
            ]
        })
        .collect();
    let head = [
        "PROXY", "TYPE", "LOCALITY", "NETWORK", "CDS", "LDS", "EDS", "RDS",
    ];
    let widths: Vec<usize> = (0..8)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(&head);
    for r in &rows {
        out.push_str(&line(&r.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out
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
            print!("{}", status_table(&proxies));
            for p in &proxies {
                for (k, t) in &p.types {
                    if let Some(e) = &t.error {
                        println!("{} {k} NACK: {e}", p.proxy);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_fits_long_node_ids_and_names_gateways() {
        let p = |id: &str, kind: &str, flavor: &str| ProxyReport {
            proxy: id.into(),
            connection: 1,
            flavor: flavor.into(),
            kind: kind.into(),
            locality: "us-east1/us-east1-b".into(),
            network: "net-e".into(),
            cluster: "east".into(),
            stream: "sotw".into(),
            identity: None,
            types: Default::default(),
        };
        let long = "router~10.244.1.17~eastwest-gateway-7d9c5b6f4-x2k8p.meshfed-system~meshfed-system.svc.cluster.local";
        let t = status_table(&[
            p(long, "router", "envoy"),
            p(
                "sidecar~10.0.0.1~a.shop~shop.svc.cluster.local",
                "sidecar",
                "grpc",
            ),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("PROXY"), "{t}");
        // Every row's second column starts where the header's does: nothing is cut or shifted.
        let at = lines[0].find("TYPE").unwrap();
        assert_eq!(&lines[1][..long.len()], long);
        assert!(lines[1][at..].starts_with("gateway"), "{t}");
        assert!(lines[2][at..].starts_with("grpc"), "{t}");
    }
}
