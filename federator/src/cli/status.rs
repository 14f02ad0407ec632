//! `meshfed status`: the measured state of a federator or an agent, from its admin endpoint.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::{EXIT_CHECK_FAILED, EXIT_PEERS_DEGRADED};
use meshfed_agent::AgentReport;
use meshfed_federation::status::FederationReport;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Admin address of a federator (default 127.0.0.1:15101) or an agent (127.0.0.1:15014).
    #[arg(long, default_value = "127.0.0.1:15101")]
    admin: String,
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

fn age(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let v = meshfed_net::admin::fetch_status(&a.admin).await?;
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let mut peer_problems = Vec::new();
    let problems = match kind.as_str() {
        "federator" => {
            let r: FederationReport =
                serde_json::from_value(v.clone()).context("unexpected federator status")?;
            if let Output::Text = a.output {
                println!(
                    "federation {} (CA expires {}), head revision {}, lease TTL {}",
                    r.federation_trust_domain,
                    r.federation_ca_not_after,
                    r.head_revision,
                    age(Some(r.lease_ttl_ms))
                );
                println!(
                    "{:<12} {:<10} {:<9} {:<7} {:>9} {:>7} {:>7} {:>9} {:>5} {:>6}  TRUST DOMAIN",
                    "CLUSTER",
                    "NETWORK",
                    "CONNECTED",
                    "LEASE",
                    "HEARTBEAT",
                    "EXPORTS",
                    "IMPORTS",
                    "ACKED",
                    "LAG",
                    "BUNDLE",
                );
                for c in r.clusters.iter().filter(|c| c.lease != "left") {
                    println!(
                        "{:<12} {:<10} {:<9} {:<7} {:>9} {:>7} {:>7} {:>9} {:>5} {:>6}  {}",
                        c.cluster,
                        c.network,
                        if c.connected { "yes" } else { "no" },
                        c.lease,
                        age(c.last_heartbeat_age_ms),
                        c.exports,
                        c.imports,
                        format!("v{}/r{}", c.exports_acked_version, c.imports_acked_revision),
                        c.import_lag,
                        c.bundle_sequence,
                        c.trust_domain
                    );
                }
                let left: Vec<&str> = r
                    .clusters
                    .iter()
                    .filter(|c| c.lease == "left" && c.evicted.is_none())
                    .map(|c| c.cluster.as_str())
                    .collect();
                if !left.is_empty() {
                    println!("left the federation: {}", left.join(", "));
                }
                for c in r.clusters.iter().filter(|c| c.lease == "left") {
                    if let Some(e) = &c.evicted {
                        println!("{}: {e}", c.cluster);
                    }
                }
            }
            peer_problems = r.peer_problems();
            r.problems()
        }
        "agent" => {
            let r: AgentReport =
                serde_json::from_value(v.clone()).context("unexpected agent status")?;
            if let Output::Text = a.output {
                println!(
                    "cluster {} ({}, network {}, {}), federator {}: {}",
                    r.cluster,
                    r.trust_domain,
                    r.network,
                    r.locality,
                    r.federators.join(","),
                    if r.connected {
                        "connected"
                    } else {
                        "NOT connected"
                    }
                );
                println!(
                    "exports: {} (acknowledged version {}), imports applied up to revision {}",
                    r.exports, r.exports_acked_version, r.imports_applied_revision
                );
                if let Some(l) = &r.leadership {
                    println!("{}", leadership_line(l));
                }
                if !r.connected {
                    println!(
                        "the federator was last heard from {}: the peer states below are as it last told them (heartbeat ages still count up)",
                        r.federator_last_heard_ms
                            .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                            .unwrap_or_else(|| "never since this agent started".into())
                    );
                }
                println!(
                    "{:<12} {:<10} {:<9} {:<7} {:>9} {:>8} {:>10} {:>12}",
                    "PEER",
                    "NETWORK",
                    "CONNECTED",
                    "LEASE",
                    "HEARTBEAT",
                    "IMPORTS",
                    "BUNDLE SEQ",
                    "ROOT EXPIRY"
                );
                for p in &r.peers {
                    println!(
                        "{:<12} {:<10} {:<9} {:<7} {:>9} {:>8} {:>10} {:>12}",
                        p.cluster,
                        p.network,
                        if p.connected { "yes" } else { "no" },
                        p.lease,
                        age(p.last_heartbeat_age_ms),
                        r.imports.get(&p.cluster).copied().unwrap_or(0),
                        match (p.bundle, p.bundle_sequence) {
                            (false, _) => "none".to_string(),
                            (true, Some(s)) => s.to_string(),
                            (true, None) => "yes".to_string(),
                        },
                        p.bundle_days_left
                            .map(|d| format!("{d} days"))
                            .unwrap_or_else(|| "-".into())
                    );
                }
                if let Some(ca) = &r.ca {
                    print!("{}", super::ca::render_report(ca));
                }
                for w in r.warnings() {
                    println!("warning: {w}");
                }
                if !r.workload_entries.is_empty() {
                    println!(
                        "{:<36} {:<16} {:<9} HEALTH",
                        "WORKLOADENTRY (VM)", "ADDRESS", "CONNECTED"
                    );
                    for e in &r.workload_entries {
                        println!(
                            "{:<36} {:<16} {:<9} {}",
                            format!("{}/{}", e.namespace, e.name),
                            e.address,
                            if e.connected { "yes" } else { "no (grace)" },
                            match e.healthy {
                                Some(true) => "healthy".to_string(),
                                Some(false) => format!("unhealthy: {}", e.health_message),
                                None => "not reported yet".to_string(),
                            }
                        );
                    }
                }
                println!("mesh DNS: {} names", r.dns_names);
            }
            peer_problems = r.peer_problems();
            r.problems()
        }
        "gateway" => {
            let services: Vec<String> = v["services"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let xds = v["xds_connected"].as_bool().unwrap_or(false);
            if let Output::Text = a.output {
                println!(
                    "east-west gateway: {} routed services, {} open connections, xDS {}",
                    services.len(),
                    v["open_connections"].as_u64().unwrap_or(0),
                    if xds {
                        "connected"
                    } else {
                        "disconnected (serving the last routes)"
                    }
                );
                for s in &services {
                    println!("  {s}");
                }
            }
            let mut p = Vec::new();
            if !xds {
                p.push("not connected to the agent's xDS (serving the last routes)".to_string());
            }
            p
        }
        "vm" => {
            let vm_id = v["vm_id"].as_str().unwrap_or_default();
            let connected = v["connected"].as_bool().unwrap_or(false);
            if let Output::Text = a.output {
                println!(
                    "VM {vm_id} of {}/{} in cluster {} at {}: {}",
                    v["namespace"].as_str().unwrap_or_default(),
                    v["group"].as_str().unwrap_or_default(),
                    v["cluster"].as_str().unwrap_or_default(),
                    v["address"].as_str().unwrap_or_default(),
                    if connected {
                        "attached"
                    } else {
                        "NOT attached"
                    }
                );
                println!(
                    "entry {}, identity {} (expires {}), credential expires {}, DNS {} ({} names)",
                    v["entry"].as_str().unwrap_or("-"),
                    v["svid"].as_str().unwrap_or_default(),
                    v["svid_expires"].as_str().unwrap_or_default(),
                    v["credential_expires"].as_str().unwrap_or_default(),
                    v["dns"].as_str().unwrap_or("off"),
                    v["names"].as_u64().unwrap_or(0)
                );
            }
            let mut p = Vec::new();
            if !connected {
                p.push(format!(
                    "not attached to the control plane{}",
                    v["last_error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            if v["healthy"].as_bool() == Some(false) {
                p.push(format!(
                    "the readiness probe fails: {}",
                    v["health_message"].as_str().unwrap_or_default()
                ));
            }
            p
        }
        other => anyhow::bail!("{} answered an unknown status kind {other:?}", a.admin),
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text => {
            for p in &problems {
                println!("problem: {p}");
            }
            for p in &peer_problems {
                println!("peer: {p}");
            }
        }
    }
    Ok(exit_code(&problems, &peer_problems))
}

/// 1 when this component is unhealthy; 3 when it is healthy but another cluster is stale,
/// disconnected or in conflict; 0 otherwise.
fn exit_code(own: &[String], peers: &[String]) -> ExitCode {
    if !own.is_empty() {
        ExitCode::from(EXIT_CHECK_FAILED)
    } else if !peers.is_empty() {
        ExitCode::from(EXIT_PEERS_DEGRADED)
    } else {
        ExitCode::SUCCESS
    }
}

/// One line on an agent replica's role (leader election).
fn leadership_line(l: &meshfed_kube::leader::Leadership) -> String {
    let since = l.since.as_deref().unwrap_or("?");
    if l.leader {
        format!(
            "replica: leader since {since} (writes to the Kubernetes API, speaks for the cluster)"
        )
    } else if l.held_last {
        format!(
            "replica: not leading since {since} ({}); it still speaks for the cluster to the federator until another replica leads",
            l.error.as_deref().unwrap_or("the Lease could not be renewed")
        )
    } else {
        format!(
            "replica: follower since {since}, leader {} (observes the federation, serves xDS and DNS)",
            l.holder.as_deref().unwrap_or("none yet")
        )
    }
}

#[cfg(test)]
mod leadership_tests {
    use super::leadership_line;
    use meshfed_kube::leader::Leadership;

    #[test]
    fn the_role_line_names_the_leader() {
        let f = Leadership {
            leader: false,
            holder: Some("meshfed-agent-1".into()),
            since: Some("2026-12-04T10:00:00Z".into()),
            ..Default::default()
        };
        assert_eq!(
            leadership_line(&f),
            "replica: follower since 2026-12-04T10:00:00Z, leader meshfed-agent-1 (observes the federation, serves xDS and DNS)"
        );
        let l = Leadership { leader: true, ..f };
        assert!(leadership_line(&l).starts_with("replica: leader since 2026-12-04T10:00:00Z"));
        let stepped_down = Leadership {
            leader: false,
            held_last: true,
            error: Some("Lease meshfed-system/meshfed-agent: 503".into()),
            ..l
        };
        assert_eq!(
            leadership_line(&stepped_down),
            "replica: not leading since 2026-12-04T10:00:00Z (Lease meshfed-system/meshfed-agent: 503); it still speaks for the cluster to the federator until another replica leads"
        );
    }
}
