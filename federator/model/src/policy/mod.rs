//! Failover policies: meshfed's `FailoverPolicy` and Istio's `DestinationRule` YAML (`spec`),
//! compiled into per-locality priority tables with Istio's semantics (`table`). The agent
//! watches policy files and applies policies published with imported services.

pub mod routes;
pub mod spec;
mod virtual_service;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Larger policy files are refused before parsing.
pub const MAX_POLICY_FILE_BYTES: usize = 1024 * 1024;

/// `failoverPriority` entry: `key` (compare with the proxy's own label) or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriorityLabel {
    pub key: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FailoverPair {
    pub from: String,
    pub to: String,
}

/// `distribute` entry; `to` is ordered most specific pattern first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Distribute {
    pub from: String,
    pub to: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Outlier {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval_ms: Option<u64>,
    pub base_ejection_time_ms: Option<u64>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OnExpiryPolicy {
    Deprioritize,
    Withdraw,
}

/// A validated policy for one host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// Fully qualified: `<name>.<namespace>.svc.cluster.local`.
    pub host: String,
    /// Where it came from: `file:line:column`, or `published by cluster <id>`.
    pub origin: String,
    /// `localityLbSetting.enabled: false` turns locality load balancing off.
    pub enabled: bool,
    pub failover_priority: Vec<PriorityLabel>,
    pub failover: Vec<FailoverPair>,
    pub distribute: Vec<Distribute>,
    pub outlier: Option<Outlier>,
    /// Overrides the exporter's staleness setting for this cluster's proxies.
    pub on_expiry: Option<OnExpiryPolicy>,
    pub allow_without_health_signal: bool,
    /// Attach to this cluster's export of the host so every importer applies it.
    pub publish: bool,
    /// Named groups of the host's endpoints (Istio's DestinationRule `subsets`).
    pub subsets: Vec<Subset>,
}

/// A DestinationRule subset: the endpoints whose labels include all of `labels`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Subset {
    /// Whether an endpoint with these labels is in the subset.
    pub fn selects<'a>(&self, mut get: impl FnMut(&str) -> Option<&'a str>) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| get(k).is_some_and(|x| x == v))
    }
}

impl Policy {
    /// Istio applies failover only with a health signal (outlier detection); meshfed refuses
    /// such policies at load time unless the user accepted it explicitly.
    pub fn failover_enabled(&self) -> bool {
        self.enabled && (self.outlier.is_some() || self.allow_without_health_signal)
    }

    /// The proxy label keys this policy reads (the rest of a proxy's labels cannot change
    /// its tables).
    pub fn label_keys(&self) -> impl Iterator<Item = &str> {
        self.failover_priority
            .iter()
            .filter(|p| p.value.is_none())
            .map(|p| p.key.as_str())
    }
}

impl Policy {
    /// The policy as one canonical `FailoverPolicy` document (what is published with an
    /// export; a DestinationRule is converted).
    pub fn to_yaml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut y = format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  host: {}\n",
            q(&self.name),
            q(&self.namespace),
            q(&self.host)
        );
        // A disabled rule publishes as a policy without locality settings (all priority 0).
        let on = self.enabled;
        if on && !self.failover_priority.is_empty() {
            y.push_str("  failoverPriority:\n");
            for p in &self.failover_priority {
                let e = match &p.value {
                    Some(v) => format!("{}={v}", p.key),
                    None => p.key.clone(),
                };
                y.push_str(&format!("    - {}\n", q(&e)));
            }
        }
        if on && !self.failover.is_empty() {
            y.push_str("  failover:\n");
            for f in &self.failover {
                y.push_str(&format!(
                    "    - {{from: {}, to: {}}}\n",
                    q(&f.from),
                    q(&f.to)
                ));
            }
        }
        if on && !self.distribute.is_empty() {
            y.push_str("  distribute:\n");
            for d in &self.distribute {
                y.push_str(&format!("    - from: {}\n      to:\n", q(&d.from)));
                for (pat, w) in &d.to {
                    y.push_str(&format!("        {}: {w}\n", q(pat)));
                }
            }
        }
        if let Some(o) = self.outlier.as_ref().filter(|_| on) {
            y.push_str("  outlierDetection:\n");
            if let Some(v) = o.consecutive_5xx_errors {
                y.push_str(&format!("    consecutive5xxErrors: {v}\n"));
            }
            if let Some(v) = o.consecutive_gateway_errors {
                y.push_str(&format!("    consecutiveGatewayErrors: {v}\n"));
            }
            if let Some(v) = o.interval_ms {
                y.push_str(&format!("    interval: {v}ms\n"));
            }
            if let Some(v) = o.base_ejection_time_ms {
                y.push_str(&format!("    baseEjectionTime: {v}ms\n"));
            }
            if let Some(v) = o.max_ejection_percent {
                y.push_str(&format!("    maxEjectionPercent: {v}\n"));
            }
        }
        if let Some(e) = self.on_expiry {
            let v = match e {
                OnExpiryPolicy::Deprioritize => "deprioritize",
                OnExpiryPolicy::Withdraw => "withdraw",
            };
            y.push_str(&format!("  staleness: {{onExpiry: {v}}}\n"));
        }
        if self.allow_without_health_signal {
            y.push_str("  allowWithoutHealthSignal: true\n");
        }
        if !self.subsets.is_empty() {
            y.push_str("  subsets:\n");
            for s in &self.subsets {
                y.push_str(&format!("    - name: {}\n      labels:", q(&s.name)));
                if s.labels.is_empty() {
                    y.push_str(" {}\n");
                } else {
                    y.push('\n');
                    for (k, v) in &s.labels {
                        y.push_str(&format!("        {}: {}\n", q(k), q(v)));
                    }
                }
            }
        }
        y
    }
}

/// Policies by host, from files and from the federation, and the routes of the files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySet {
    pub by_host: BTreeMap<String, Policy>,
    /// `VirtualService`s by host (one per host).
    pub routes_by_host: BTreeMap<String, routes::Routes>,
}

impl PolicySet {
    /// Parses several files; two policies, or two VirtualServices, for one host (in one file
    /// or across files) are an error naming both places.
    pub fn from_sources(sources: &[(String, String)]) -> Result<PolicySet, String> {
        let mut set = PolicySet::default();
        let mut errors = Vec::new();
        for (what, text) in sources {
            match spec::parse_all(text, what) {
                Ok(ps) => {
                    for (parsed, at) in ps {
                        let origin = format!("{what}:{}:{}", at.line, at.column);
                        match parsed {
                            spec::Parsed::Policy(mut p) => {
                                p.origin = origin;
                                if let Some(prev) = set.by_host.get(&p.host) {
                                    errors.push(format!(
                                        "{}: spec.host: {:?} already has a policy ({}/{} at {}); one policy per host",
                                        p.origin, p.host, prev.namespace, prev.name, prev.origin
                                    ));
                                    continue;
                                }
                                set.by_host.insert(p.host.clone(), p);
                            }
                            spec::Parsed::Routes(mut r) => {
                                r.origin = origin;
                                if let Some(prev) = set.routes_by_host.get(&r.host) {
                                    errors.push(format!(
                                        "{}: spec.hosts: {:?} already has a VirtualService ({}/{} at {}); one per host",
                                        r.origin, r.host, prev.namespace, prev.name, prev.origin
                                    ));
                                    continue;
                                }
                                set.routes_by_host.insert(r.host.clone(), r);
                            }
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors.join("\n"))
        }
    }

    pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, String> {
        let mut sources = Vec::new();
        for p in policy_files(paths)? {
            let text = read_limited(&p)?;
            sources.push((p.display().to_string(), text));
        }
        PolicySet::from_sources(&sources)
    }
}

fn read_limited(p: &Path) -> Result<String, String> {
    let md = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if md.len() > MAX_POLICY_FILE_BYTES as u64 {
        return Err(format!(
            "{}: {} bytes is more than the {MAX_POLICY_FILE_BYTES} bytes a policy file may have",
            p.display(),
            md.len()
        ));
    }
    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Files named directly, plus `*.yaml`/`*.yml` in named directories (sorted).
pub fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && matches!(f.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"))
                })
                .collect();
            files.sort();
            out.extend(files);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    Ok(out)
}

/// A cheap change token for the watched paths: names, sizes and modification times.
pub fn paths_version(paths: &[PathBuf]) -> String {
    let mut v = String::new();
    for f in policy_files(paths).unwrap_or_default() {
        if let Ok(md) = std::fs::metadata(&f) {
            let mtime = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            v.push_str(&format!("{}:{}:{};", f.display(), md.len(), mtime));
        }
    }
    v
}
