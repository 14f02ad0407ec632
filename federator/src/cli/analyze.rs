//! `meshfed analyze`: problems across the federation, as `istioctl analyze` finds them in one
//! cluster, from what running federators and agents report (their `/status`) and from policy
//! files (for CI). Each finding has a code, a severity, the object it is about, what is wrong
//! and a fix; the exit code is 1 when any finding is an error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::args;
use meshfed_agent::{AgentReport, EXPIRY_WARNING_DAYS};
use meshfed_federation::status::FederationReport;
use meshfed_model::policy::PolicySet;

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// A federator's admin address (its view of every member).
    #[arg(long, value_parser = args::host_port)]
    federator: Vec<String>,
    /// An agent's admin address (its cluster's view: peers, bundles, certificates, proxies).
    #[arg(long, value_parser = args::host_port)]
    agent: Vec<String>,
    /// Failover policy files or directories to check (no running process needed).
    #[arg(long)]
    policy: Vec<PathBuf>,
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub severity: Severity,
    /// What it is about: a cluster, a peer seen from a cluster, a policy's file:line:column.
    pub object: String,
    pub message: String,
    pub fix: String,
}

fn finding(
    code: &'static str,
    severity: Severity,
    object: String,
    message: String,
    fix: &str,
) -> Finding {
    Finding {
        code,
        severity,
        object,
        message,
        fix: fix.to_string(),
    }
}

/// What a federator's view shows: stale and disconnected members, conflicting exports,
/// imports from another network that has no east-west gateway.
pub fn federation(r: &FederationReport) -> Vec<Finding> {
    let mut out = Vec::new();
    let members: Vec<_> = r.clusters.iter().filter(|c| c.lease != "left").collect();
    for c in &members {
        let at = format!("cluster {}", c.cluster);
        if c.lease == "stale" {
            out.push(finding(
                "MF101",
                Severity::Error,
                at.clone(),
                match c.last_heartbeat_age_ms {
                    Some(ms) => format!("stale: no heartbeat for {:.1} s", ms as f64 / 1000.0),
                    None => "stale: no heartbeat since the federator started".into(),
                },
                "start the cluster's agent, or check its path to the federator (its `meshfed status` names the error)",
            ));
        } else if !c.connected {
            out.push(finding(
                "MF102",
                Severity::Warning,
                at.clone(),
                "not connected (its lease has not expired yet)".into(),
                "check the cluster's agent; it turns stale when the lease expires",
            ));
        }
        for k in &c.conflicts {
            out.push(finding(
                "MF103",
                Severity::Error,
                at.clone(),
                format!("export conflict: {k}"),
                "export the service with the same ports and protocol from every cluster (the oldest export wins meanwhile)",
            ));
        }
        for (from, n) in &c.imports_from {
            let Some(src) = members.iter().find(|m| &m.cluster == from) else {
                continue;
            };
            if src.network != c.network && src.gateways.is_empty() && *n > 0 {
                out.push(finding(
                    "MF104",
                    Severity::Error,
                    at.clone(),
                    format!(
                        "imports {n} services from {from} on network {}, which has no east-west gateway: they cannot be reached from network {}",
                        src.network, c.network
                    ),
                    "run an east-west gateway for that network and join (or re-join) its cluster with --gateway",
                ));
            }
        }
    }
    out
}

/// What an agent's view shows: missing or expiring peer bundles, an expiring cluster
/// certificate, stale peers, configuration the agent could not use, proxies that NACKed.
pub fn agent(r: &AgentReport) -> Vec<Finding> {
    let mut out = Vec::new();
    let at = format!("cluster {}", r.cluster);
    if r.cluster_cert_expired {
        out.push(finding(
            "MF201",
            Severity::Error,
            at.clone(),
            "the cluster certificate has expired: the federator refuses its stream".into(),
            "join again with a new token (meshfed join --if-not-joined renews a missing one)",
        ));
    }
    for p in &r.peers {
        let peer = format!("cluster {} (peer {})", r.cluster, p.cluster);
        if !p.bundle {
            out.push(finding(
                "MF202",
                Severity::Error,
                peer.clone(),
                format!(
                    "holds no trust bundle of {}: its workloads cannot be verified",
                    p.trust_domain
                ),
                "check that the peer's agent runs and publishes its bundle (its `meshfed status`)",
            ));
        }
        if let Some(d) = p.bundle_days_left.filter(|d| *d < EXPIRY_WARNING_DAYS) {
            out.push(finding(
                "MF203",
                if d <= 0 {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                peer.clone(),
                format!(
                    "the first root of {}'s bundle expires in {d} days",
                    p.trust_domain
                ),
                "rotate that cluster's CA (meshfed ca rotate start) well before",
            ));
        }
        if p.lease == "stale" {
            out.push(finding(
                "MF204",
                Severity::Warning,
                peer,
                "stale here: its services are served as its staleness policy says".into(),
                "see the federator's view (meshfed analyze --federator)",
            ));
        }
    }
    for w in &r.config_warnings {
        out.push(finding(
            "MF205",
            Severity::Warning,
            at.clone(),
            w.clone(),
            "correct the registry or policy the warning names",
        ));
    }
    for p in &r.kubernetes_problems {
        out.push(finding(
            "MF206",
            Severity::Warning,
            at.clone(),
            p.clone(),
            "correct the object named (its Events say the same)",
        ));
    }
    if let Some(istio) = &r.istio {
        for f in &istio.findings {
            let (code, fix) = match f.kind.as_str() {
                "shadowed" => (
                    "MF401",
                    "delete the user's object to have meshfed's, or keep it (it wins in istiod)",
                ),
                "not-expressible" => (
                    "MF402",
                    "give the policy what Istio needs (outlierDetection) or write the DestinationRule yourself",
                ),
                _ => (
                    "MF403",
                    "correct what the message names at the exporter (gateway IP addresses, TCP ports)",
                ),
            };
            out.push(finding(
                code,
                Severity::Warning,
                format!("{at} {}", f.service),
                format!("{}: {}", f.host, f.message),
                fix,
            ));
        }
        if let Some(cm) = &istio.mesh_config {
            for p in r.peers.iter().filter(|p| p.bundle) {
                if !istio.mesh_config_trust_domains.contains(&p.trust_domain) {
                    out.push(finding(
                        "MF404",
                        Severity::Error,
                        format!("{at} peer {}", p.cluster),
                        format!(
                            "the mesh config {cm} istiod reads lacks trust domain {}: sidecars refuse its workloads",
                            p.trust_domain
                        ),
                        "see the mesh config errors in meshfed status; the peer's bundle must hold X.509 roots",
                    ));
                }
            }
            for e in &istio.mesh_config_errors {
                out.push(finding(
                    "MF404",
                    Severity::Error,
                    format!("{at} {cm}"),
                    format!("left out of the mesh config: {e}"),
                    "the peer must publish a valid bundle (meshfed bundle show on that cluster)",
                ));
            }
        }
    }
    if let Some(x) = &r.xds {
        for p in &x.policy_findings {
            let (code, severity, fix) = match p.kind.as_str() {
                "empty-subset" => (
                    "MF302",
                    Severity::Warning,
                    "correct the subset's labels, or label the endpoints that should be in it",
                ),
                "empty-locality" => (
                    "MF303",
                    Severity::Warning,
                    "name a locality where the service runs (meshfed status shows its endpoints by cluster)",
                ),
                "route-unknown-subset" => (
                    "MF305",
                    Severity::Error,
                    "define the subset in the host's policy (FailoverPolicy or DestinationRule subsets), or route to one it defines",
                ),
                "route-unknown-port" => (
                    "MF306",
                    Severity::Error,
                    "name one of the service's ports (meshfed status shows them), or leave the port out",
                ),
                _ => (
                    "MF304",
                    Severity::Warning,
                    "define the subset in the exporter's policy and publish it (publish: true)",
                ),
            };
            out.push(finding(
                code,
                severity,
                format!("{at} {} ({})", p.host, p.origin),
                p.message.clone(),
                fix,
            ));
        }
        for n in &x.nacks {
            out.push(finding(
                "MF207",
                Severity::Error,
                at.clone(),
                format!("a proxy refused its configuration: {n}"),
                "meshfed proxy-status and proxy-config show what was sent",
            ));
        }
    }
    out
}

/// What policy files show: failover allowed without a health signal (Istio applies locality
/// failover only with outlier detection; without it, traffic fails over on connection
/// failures only).
pub fn policies(set: &PolicySet) -> Vec<Finding> {
    let mut out: Vec<Finding> = set
        .by_host
        .values()
        .filter(|p| p.enabled && p.outlier.is_none() && p.allow_without_health_signal)
        .map(|p| {
            finding(
                "MF301",
                Severity::Warning,
                p.origin.clone(),
                format!(
                    "failover for {} without a health signal (allowWithoutHealthSignal): endpoints that answer with errors are never left",
                    p.host
                ),
                "add outlierDetection to the policy",
            )
        })
        .collect();
    // A route to a subset the files' own policy for the host lacks (without a policy in the
    // files, an exporter's published one may define it: only a running agent can tell).
    for r in set.routes_by_host.values() {
        let Some(p) = set.by_host.get(&r.host) else {
            continue;
        };
        for s in r.subsets() {
            if !p.subsets.iter().any(|d| d.name == s) {
                out.push(finding(
                    "MF305",
                    Severity::Error,
                    r.origin.clone(),
                    format!(
                        "VirtualService {}/{} routes to subset {s}, which the policy for {} ({}) does not define: calls taking that route fail",
                        r.namespace, r.name, r.host, p.origin
                    ),
                    "define the subset in the host's policy (FailoverPolicy or DestinationRule subsets), or route to one it defines",
                ));
            }
        }
    }
    out
}

pub async fn run(a: AnalyzeArgs) -> anyhow::Result<ExitCode> {
    if a.federator.is_empty() && a.agent.is_empty() && a.policy.is_empty() {
        anyhow::bail!(
            "name what to analyze: --federator ADDR, --agent ADDR or --policy PATH (repeatable)"
        );
    }
    let mut found = Vec::new();
    for addr in &a.federator {
        let v = meshfed_net::admin::fetch_status(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--federator {addr}: {e:#}"))?;
        let r: FederationReport = serde_json::from_value(v)
            .map_err(|e| anyhow::anyhow!("--federator {addr}: not a federator's status: {e}"))?;
        found.extend(federation(&r));
    }
    for addr in &a.agent {
        let v = meshfed_net::admin::fetch_status(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--agent {addr}: {e:#}"))?;
        let r: AgentReport = serde_json::from_value(v)
            .map_err(|e| anyhow::anyhow!("--agent {addr}: not an agent's status: {e}"))?;
        found.extend(agent(&r));
    }
    if !a.policy.is_empty() {
        let set = PolicySet::load_paths(&a.policy).map_err(|e| anyhow::anyhow!(e))?;
        found.extend(policies(&set));
    }
    found.sort_by(|x, y| (x.severity, x.code, &x.object).cmp(&(y.severity, y.code, &y.object)));
    found.dedup();
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
        Output::Text => {
            for f in &found {
                let sev = match f.severity {
                    Severity::Error => "Error",
                    Severity::Warning => "Warning",
                };
                println!(
                    "{sev} [{}] {}: {}\n    fix: {}",
                    f.code, f.object, f.message, f.fix
                );
            }
            let errors = found
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            println!(
                "{} findings: {errors} errors, {} warnings",
                found.len(),
                found.len() - errors
            );
        }
    }
    Ok(if found.iter().any(|f| f.severity == Severity::Error) {
        ExitCode::from(super::EXIT_CHECK_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use meshfed_federation::status::ClusterReport;

    fn cluster(name: &str, network: &str, gateways: &[&str]) -> ClusterReport {
        serde_json::from_value(serde_json::json!({
            "cluster": name, "network": network, "trust_domain": format!("{name}.mesh"),
            "locality": "r/z", "gateways": gateways, "connected": true, "lease": "fresh",
            "last_heartbeat_age_ms": 100, "exports": 1, "imports": 1, "exports_acked_version": 1,
            "imports_acked_revision": 1, "import_lag": 0, "bundle_sequence": 1,
            "bundle_not_after": null, "conflicts": []
        }))
        .unwrap()
    }

    #[test]
    fn a_federators_view_names_stale_conflicting_and_unreachable_members() {
        let mut east = cluster("east", "net-e", &["gw:15443"]);
        let mut west = cluster("west", "net-w", &[]);
        let mut eu = cluster("eu", "net-e", &[]);
        let mut ap = cluster("ap", "net-e", &["gw2:15443"]);
        ap.connected = false;
        east.imports_from.insert("west".into(), 2);
        eu.imports_from.insert("east".into(), 1);
        west.lease = "stale".into();
        west.last_heartbeat_age_ms = Some(4200);
        eu.conflicts = vec!["shop/payment: ports differ from east's".into()];
        let r = FederationReport {
            kind: "federator".into(),
            federation_trust_domain: "fed".into(),
            federation_ca_not_after: String::new(),
            federation_ca: Default::default(),
            head_revision: 1,
            lease_ttl_ms: 3000,
            clusters: vec![east, west, eu, ap],
            store: Default::default(),
        };
        let codes: Vec<(&str, String)> = federation(&r)
            .into_iter()
            .map(|f| (f.code, f.object))
            .collect();
        assert_eq!(
            codes,
            [
                ("MF104", "cluster east".to_string()),
                ("MF101", "cluster west".to_string()),
                ("MF103", "cluster eu".to_string()),
                ("MF102", "cluster ap".to_string()),
            ]
        );
        // eu imports from east, on its own network: no finding for that.
    }

    #[test]
    fn an_agents_view_names_bundles_certificates_and_nacks() {
        let r: AgentReport = serde_json::from_value(serde_json::json!({
            "kind": "agent", "cluster": "east", "network": "n", "trust_domain": "east.mesh",
            "locality": "r/z", "federators": [], "connected": true, "left": false,
            "exports": 0, "exports_acked_version": 0, "imports_applied_revision": 0,
            "imports": {}, "conflicts": [], "dns_names": 0, "cluster_cert_expired": true,
            "peers": [
                {"cluster": "west", "network": "n", "trust_domain": "west.mesh", "connected": true,
                 "lease": "fresh", "bundle": false},
                {"cluster": "eu", "network": "n", "trust_domain": "eu.mesh", "connected": false,
                 "lease": "stale", "bundle": true, "bundle_sequence": 2, "bundle_days_left": 12}
            ],
            "config_warnings": ["export to cluster mars, which is not a member"],
            "kubernetes_problems": ["Service shop/x: no ports"],
            "xds": {"generation": 3, "proxies": 1, "nacks": ["sidecar~1 cluster: bad"],
                    "policy_findings": [
                        {"host": "l.shop.svc.cluster.local", "origin": "p.yaml:1:1", "kind": "empty-subset", "message": "subset v9"},
                        {"host": "l.shop.svc.cluster.local", "origin": "p.yaml:1:1", "kind": "empty-locality", "message": "mars1"},
                        {"host": "l.shop.svc.cluster.local", "origin": "p.yaml:1:1", "kind": "subset-without-route", "message": "v1"},
                        {"host": "l.shop.svc.cluster.local", "origin": "r.yaml:5:3", "kind": "route-unknown-subset", "message": "v7"},
                        {"host": "l.shop.svc.cluster.local", "origin": "r.yaml:5:3", "kind": "route-unknown-port", "message": "9"}]}
        }))
        .unwrap();
        let found = agent(&r);
        let mut codes: Vec<&str> = found.iter().map(|f| f.code).collect();
        codes.sort();
        assert_eq!(
            codes,
            [
                "MF201", "MF202", "MF203", "MF204", "MF205", "MF206", "MF207", "MF302", "MF303",
                "MF304", "MF305", "MF306"
            ]
        );
        // A route to nothing fails calls: an error, where the object and its file are named.
        let mf305 = found.iter().find(|f| f.code == "MF305").unwrap();
        assert_eq!(mf305.severity, Severity::Error);
        assert!(
            mf305
                .object
                .ends_with("l.shop.svc.cluster.local (r.yaml:5:3)"),
            "{mf305:?}"
        );
    }

    #[test]
    fn policy_files_with_a_route_to_a_subset_their_policy_lacks() {
        let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: l, namespace: shop}\nspec:\n  host: l\n  subsets: [{name: v1, labels: {version: v1}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: l, namespace: shop}\nspec:\n  hosts: [l]\n  http:\n    - route: [{destination: {host: l, subset: v2}}]\n";
        let set = PolicySet::from_sources(&[("p.yaml".into(), text.into())]).unwrap();
        let found = policies(&set);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].code, "MF305");
        assert_eq!(found[0].object, "p.yaml:12:11");
        assert!(found[0].message.contains("subset v2"), "{found:?}");
        // Defined: nothing found.
        let fixed = text.replace("subset: v2", "subset: v1");
        let set = PolicySet::from_sources(&[("p.yaml".into(), fixed)]).unwrap();
        assert!(policies(&set).is_empty());
    }

    #[test]
    fn what_meshfed_could_not_write_for_istiod_is_found() {
        let r: AgentReport = serde_json::from_value(serde_json::json!({
            "kind": "agent", "cluster": "east", "network": "n", "trust_domain": "east.mesh",
            "locality": "r/z", "federators": [], "connected": true, "left": false,
            "exports": 0, "exports_acked_version": 0, "imports_applied_revision": 0,
            "imports": {}, "conflicts": [], "dns_names": 0,
            "peers": [
                {"cluster": "west", "network": "n", "trust_domain": "west.mesh", "connected": true,
                 "lease": "fresh", "bundle": true, "bundle_sequence": 1},
                {"cluster": "eu", "network": "n", "trust_domain": "eu.mesh", "connected": true,
                 "lease": "fresh", "bundle": true, "bundle_sequence": 1}
            ],
            "istio": {"service_entries": 1, "workload_entries": 2, "destination_rules": 0,
                "findings": [
                    {"kind": "shadowed", "service": "shop/ledger", "host": "ledger.shop.svc.clusterset.local",
                     "message": "ServiceEntry shop/mine names it: it wins"},
                    {"kind": "not-expressible", "service": "shop/ledger", "host": "ledger.shop.svc.cluster.local",
                     "message": "allowWithoutHealthSignal"},
                    {"kind": "skipped", "service": "shop/ledger", "host": "ledger.shop.svc.clusterset.local",
                     "message": "port 53 (UDP) is not TCP"}
                ],
                "mesh_config": "istio-system/meshfed-mesh",
                "mesh_config_trust_domains": ["west.mesh"],
                "mesh_config_errors": []}
        }))
        .unwrap();
        let found = agent(&r);
        let mut codes: Vec<&str> = found.iter().map(|f| f.code).collect();
        codes.sort();
        assert_eq!(codes, ["MF401", "MF402", "MF403", "MF404"]);
        let missing = found.iter().find(|f| f.code == "MF404").unwrap();
        assert!(missing.message.contains("eu.mesh"), "{missing:?}");
        assert!(matches!(missing.severity, Severity::Error));
    }
}
